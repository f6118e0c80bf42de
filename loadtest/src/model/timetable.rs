//! The timetable of a run: which request is due when, and which ones are measured. Plain
//! arithmetic on the rate, the warm-up and the duration; the driver that follows it is
//! `schedule`.
//!
//! Rates are in events per second; a mode that packs `E` events into one request runs the
//! timetable at `rate / E` requests per second. Request `i` is due at `i / request_rate`, fixed
//! before the run starts; a closed loop (`--rate 0`) has no due times and is phased by the
//! clock instead.

use std::time::Duration;

use anyhow::ensure;

/// The timetable of a run: which request is sent when, and which ones are measured.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pacing: Pacing,
    events_per_request: u32,
    warmup: Duration,
    duration: Duration,
    /// Keep the index of every measured request whose events were all accepted
    /// ([`super::Measurements::acked`]), to check end-to-end delivery against.
    track_acked: bool,
}

/// Open loop at a fixed request rate, or closed loop.
#[derive(Clone, Copy, Debug)]
enum Pacing {
    /// Request `i` is due at `i / request_rate`; requests before `warmup_requests` are the
    /// warm-up, the run ends at `total_requests`.
    Open { request_rate: f64, warmup_requests: u64, total_requests: u64 },
    /// Each worker sends as soon as its previous request is answered, until the time is up.
    Closed,
}

/// Whether a request belongs to the warm-up (sent, not recorded) or to the measurement.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Phase {
    Warmup,
    Measured,
}

impl Schedule {
    /// A constant `rate` (events/s) in requests of `events_per_request` events, for `warmup`
    /// then `duration`.
    pub fn open(
        rate: f64,
        events_per_request: u32,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        ensure!(rate.is_finite() && rate > 0.0, "rate must be a positive number");
        ensure!(events_per_request > 0, "a request must carry at least one event");
        let request_rate = rate / f64::from(events_per_request);
        let warmup_requests = count_before(warmup, request_rate);
        let total_requests = count_before(warmup + duration, request_rate);
        ensure!(
            total_requests > warmup_requests,
            "--rate × --duration must cover at least one request"
        );
        Ok(Self {
            pacing: Pacing::Open { request_rate, warmup_requests, total_requests },
            events_per_request,
            warmup,
            duration,
            track_acked: false,
        })
    }

    /// A closed loop in requests of `events_per_request` events, for `warmup` then `duration`.
    pub fn closed(
        events_per_request: u32,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        ensure!(events_per_request > 0, "a request must carry at least one event");
        ensure!(!duration.is_zero(), "--duration must be positive");
        Ok(Self {
            pacing: Pacing::Closed,
            events_per_request,
            warmup,
            duration,
            track_acked: false,
        })
    }

    /// The same schedule, keeping [`super::Measurements::acked`] when `track` is true.
    pub fn tracking_acked(self, track: bool) -> Self {
        Self { track_acked: track, ..self }
    }

    /// Offered rate in events per second; `None` in a closed loop.
    pub fn rate(&self) -> Option<f64> {
        match self.pacing {
            Pacing::Open { request_rate, .. } => {
                Some(request_rate * f64::from(self.events_per_request))
            }
            Pacing::Closed => None,
        }
    }

    /// True for a closed loop (`--rate 0`).
    pub fn is_closed_loop(&self) -> bool {
        matches!(self.pacing, Pacing::Closed)
    }

    /// True when the driver keeps the index of every accepted measured request.
    pub fn tracks_acked(&self) -> bool {
        self.track_acked
    }

    /// Events in each request.
    pub fn events_per_request(&self) -> u32 {
        self.events_per_request
    }

    /// Length of the warm-up.
    pub fn warmup(&self) -> Duration {
        self.warmup
    }

    /// Length of the measurement window.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Number of requests offered during the measurement window; `None` in a closed loop.
    pub fn measured_requests(&self) -> Option<u64> {
        match self.pacing {
            Pacing::Open { warmup_requests, total_requests, .. } => {
                Some(total_requests - warmup_requests)
            }
            Pacing::Closed => None,
        }
    }

    /// Number of requests in the whole run, warm-up included; `None` in a closed loop.
    pub fn total_requests(&self) -> Option<u64> {
        match self.pacing {
            Pacing::Open { total_requests, .. } => Some(total_requests),
            Pacing::Closed => None,
        }
    }

    /// Intended send time of request `i`, relative to the start of the run; zero in a closed
    /// loop (where requests have no intended time).
    pub fn offset(&self, i: u64) -> Duration {
        match self.pacing {
            // Computed from `i` directly, not by adding intervals, so rounding does not
            // accumulate.
            Pacing::Open { request_rate, .. } => {
                Duration::from_nanos((i as f64 * 1e9 / request_rate).round() as u64)
            }
            Pacing::Closed => Duration::ZERO,
        }
    }

    /// Open loop: the phase request `i` belongs to, or `None` once the run is over. A closed
    /// loop has no end by index ([`Schedule::phase_at`] decides), so this is the warm-up for
    /// every `i`.
    pub fn phase(&self, i: u64) -> Option<Phase> {
        match self.pacing {
            Pacing::Open { warmup_requests, total_requests, .. } => {
                if i < warmup_requests {
                    Some(Phase::Warmup)
                } else if i < total_requests {
                    Some(Phase::Measured)
                } else {
                    None
                }
            }
            Pacing::Closed => Some(Phase::Warmup),
        }
    }

    /// Closed loop: the phase of a request sent `elapsed` after the start, or `None` once the
    /// run is over.
    pub fn phase_at(&self, elapsed: Duration) -> Option<Phase> {
        if elapsed < self.warmup {
            Some(Phase::Warmup)
        } else if elapsed < self.warmup + self.duration {
            Some(Phase::Measured)
        } else {
            None
        }
    }
}

/// Number of requests `i >= 0` whose intended time `i / rate` falls before `t`: `ceil(t·rate)`,
/// with a tolerance so `2s × 1000/s` is exactly 2000 despite floating point.
fn count_before(t: Duration, rate: f64) -> u64 {
    let x = t.as_secs_f64() * rate;
    let nearest = x.round();
    if (x - nearest).abs() <= 1e-9 * nearest.max(1.0) {
        nearest as u64
    } else {
        x.ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_follow_the_rate() {
        let s = Schedule::open(1000.0, 1, Duration::from_secs(2), Duration::from_secs(10)).unwrap();
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(2500), Duration::from_millis(2500));

        let s = Schedule::open(3.0, 1, Duration::ZERO, Duration::from_secs(1)).unwrap();
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(2), Duration::from_nanos(666_666_667));
        assert_eq!(s.offset(3_000_000), Duration::from_secs(1_000_000));
    }

    #[test]
    fn phases_split_warmup_and_measurement() {
        let s = Schedule::open(1000.0, 1, Duration::from_secs(2), Duration::from_secs(10)).unwrap();
        assert_eq!(s.phase(0), Some(Phase::Warmup));
        assert_eq!(s.phase(1999), Some(Phase::Warmup));
        assert_eq!(s.phase(2000), Some(Phase::Measured));
        assert_eq!(s.phase(11_999), Some(Phase::Measured));
        assert_eq!(s.phase(12_000), None);
        assert_eq!(s.measured_requests(), Some(10_000));

        // 0.5/s: requests at 0s, 2s, 4s, ...; warm-up [0, 1s) holds one, [1s, 5s) holds two.
        let s = Schedule::open(0.5, 1, Duration::from_secs(1), Duration::from_secs(4)).unwrap();
        assert_eq!(s.phase(0), Some(Phase::Warmup));
        assert_eq!(s.phase(1), Some(Phase::Measured));
        assert_eq!(s.phase(2), Some(Phase::Measured));
        assert_eq!(s.phase(3), None);
    }

    #[test]
    fn rejects_empty_schedules() {
        let second = Duration::from_secs(1);
        assert!(Schedule::open(0.0, 1, Duration::ZERO, second).is_err());
        assert!(Schedule::open(f64::NAN, 1, Duration::ZERO, second).is_err());
        assert!(Schedule::open(1.0, 1, Duration::ZERO, Duration::ZERO).is_err());
        assert!(Schedule::open(1.0, 0, Duration::ZERO, second).is_err());
        assert!(Schedule::closed(1, second, Duration::ZERO).is_err());
    }

    #[test]
    fn requests_carry_several_events_at_the_event_rate() {
        // 1600 events/s in requests of 16: 100 requests/s, 10 ms apart.
        let s = Schedule::open(1600.0, 16, Duration::from_secs(1), Duration::from_secs(2)).unwrap();
        assert_eq!(s.rate(), Some(1600.0));
        assert_eq!(s.offset(3), Duration::from_millis(30));
        assert_eq!(s.measured_requests(), Some(200));
        assert_eq!(s.phase(99), Some(Phase::Warmup));
        assert_eq!(s.phase(100), Some(Phase::Measured));
        assert_eq!(s.phase(300), None);
    }
}
