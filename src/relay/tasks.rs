//! The relay's tasks in one set, each tagged with its [`Phase`]: what it is for decides when a
//! drain waits for it and when it is cut off, so [`crate::Relay::shutdown`] names phases instead
//! of keeping a list of handles per kind.

use std::future::Future;
use std::time::Instant;

use tokio::task::JoinHandle;

/// A task's part in the relay's life, and so in its drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepts connections and writes their answers: waited for last, so every answer is
    /// written before the relay stops.
    FrontEnd,
    /// A batch driver: hands everything queued to the sink before it ends; one still running
    /// at the end of the grace period makes the drain incomplete.
    Driver,
    /// Serves the relay while it runs (sink services, audit, admin, systemd): nothing to
    /// finish, so it is aborted once the others are done.
    Background,
}

/// Every task the relay spawned, with its phase.
#[derive(Debug, Default)]
pub struct Tasks(Vec<(Phase, JoinHandle<()>)>);

impl Tasks {
    /// Spawns `task` as part of `phase`.
    pub fn spawn(&mut self, phase: Phase, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push((phase, tokio::spawn(task)));
    }

    /// Takes in tasks spawned elsewhere (a component that starts its own), as part of `phase`.
    pub fn adopt(&mut self, phase: Phase, tasks: impl IntoIterator<Item = JoinHandle<()>>) {
        self.0.extend(tasks.into_iter().map(|t| (phase, t)));
    }

    /// Waits for the tasks of `phase` until `deadline`; whether all of them ended by then. One
    /// still running is let go, not aborted.
    pub async fn join(&mut self, phase: Phase, deadline: Instant) -> bool {
        let mut all = true;
        for task in self.take(phase) {
            all &= tokio::time::timeout_at(deadline.into(), task).await.is_ok();
        }
        all
    }

    /// Aborts the tasks of `phase`.
    pub fn abort(&mut self, phase: Phase) {
        for task in self.take(phase) {
            task.abort();
        }
    }

    fn take(&mut self, phase: Phase) -> Vec<JoinHandle<()>> {
        let (taken, kept) = std::mem::take(&mut self.0).into_iter().partition(|(p, _)| *p == phase);
        self.0 = kept;
        taken.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_phase_is_joined_or_aborted_alone() {
        let mut tasks = Tasks::default();
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        tasks.spawn(Phase::Driver, async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            f.store(true, Ordering::Relaxed);
        });
        let background = tokio::spawn(std::future::pending::<()>());
        let aborted = background.abort_handle();
        tasks.adopt(Phase::Background, [background]);
        tasks.spawn(Phase::FrontEnd, std::future::pending());

        let soon = Instant::now() + Duration::from_secs(5);
        assert!(tasks.join(Phase::Driver, soon).await);
        assert!(finished.load(Ordering::Relaxed));
        // A front-end that does not end by the deadline makes the join incomplete.
        let now = Instant::now() + Duration::from_millis(10);
        assert!(!tasks.join(Phase::FrontEnd, now).await);
        assert!(!aborted.is_finished());
        tasks.abort(Phase::Background);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(aborted.is_finished());
        assert!(tasks.0.is_empty());
    }
}
