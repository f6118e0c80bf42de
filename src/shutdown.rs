//! The relay's stop signal: one [`Trigger`] held by whoever decides to stop, and a cloneable
//! [`Shutdown`] handed to every task that must end (or start draining) when it does.
//!
//! The signal is a level, not an event (as mini-redis's `Shutdown`): once the trigger has
//! fired, [`Shutdown::requested`] resolves at once for every handle, including those cloned
//! afterwards. Dropping the trigger without firing it counts as a request too, so a relay that
//! is dropped without a drain still stops its tasks.

use tokio::sync::watch;

/// The sending side: [`Trigger::signal`] starts the shutdown.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A task's view of the stop signal. Cheap to clone; each task keeps its own.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and the first handle that listens to it.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Starts the shutdown; every [`Shutdown`] handle sees it. Signalling twice is harmless.
    pub fn signal(&self) {
        self.0.send_replace(true);
    }

    /// Another handle listening to this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether the trigger has fired.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the trigger has fired (at once if it already has) or been dropped.
    /// Cancel-safe: use it as a `select!` branch as often as needed.
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn resolves(shutdown: &mut Shutdown) -> bool {
        tokio::time::timeout(Duration::from_millis(50), shutdown.requested()).await.is_ok()
    }

    #[tokio::test]
    async fn a_signal_reaches_every_handle_and_stays_set() {
        let (trigger, mut first) = channel();
        let mut second = first.clone();
        assert!(!first.is_shutdown());
        assert!(!resolves(&mut first).await);
        trigger.signal();
        assert!(first.is_shutdown() && second.is_shutdown());
        assert!(resolves(&mut first).await);
        assert!(resolves(&mut second).await);
        // A level, not an event: asking again, or from a later clone, resolves at once.
        assert!(resolves(&mut first).await);
        assert!(resolves(&mut trigger.subscribe()).await);
    }

    #[tokio::test]
    async fn dropping_the_trigger_is_a_request_too() {
        let (trigger, mut shutdown) = channel();
        drop(trigger);
        assert!(resolves(&mut shutdown).await);
        assert!(!shutdown.is_shutdown());
    }
}
