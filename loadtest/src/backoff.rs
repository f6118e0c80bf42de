//! Reconnect pacing shared by the modes: after a failed connect, wait 10 ms, doubling per
//! consecutive failure up to 1 s, so a relay that is down is not hammered.

use std::time::Duration;

use tokio::time::{sleep_until, Instant};

/// First reconnect delay after a failed connect; doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(10);

/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Reconnect pacing after failed connects.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    not_before: Option<Instant>,
}

impl Backoff {
    /// Delay before the next attempt after `failures` consecutive failures.
    fn delay(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        (BACKOFF_BASE * 2u32.pow(doublings)).min(BACKOFF_MAX)
    }

    /// Waits until the next connect attempt is allowed.
    pub async fn wait(&self) {
        if let Some(at) = self.not_before {
            sleep_until(at).await;
        }
    }

    /// Records a failed connect at `now`; returns true on the first failure of a streak.
    pub fn failed(&mut self, now: Instant) -> bool {
        self.failures += 1;
        self.not_before = Some(now + Self::delay(self.failures));
        self.failures == 1
    }

    /// Records a successful connect: the next failure starts a new streak.
    pub fn succeeded(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(Backoff::delay(1), Duration::from_millis(10));
        assert_eq!(Backoff::delay(2), Duration::from_millis(20));
        assert_eq!(Backoff::delay(4), Duration::from_millis(80));
        assert_eq!(Backoff::delay(8), Duration::from_secs(1));
        assert_eq!(Backoff::delay(u32::MAX), Duration::from_secs(1));

        let now = Instant::now();
        let mut b = Backoff::default();
        assert!(b.failed(now));
        assert!(!b.failed(now));
        assert_eq!(b.not_before, Some(now + Duration::from_millis(20)));
        b.succeeded();
        assert_eq!(b.not_before, None);
    }
}
