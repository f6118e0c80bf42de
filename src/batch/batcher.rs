//! The sans-IO batcher: coalesces items per destination subject and decides when a batch is
//! ready — at `max_events`, before `max_bytes` would be exceeded, or `linger` after the batch's
//! first item. Time is an argument; nothing here reads a clock, spawns or touches a socket,
//! so tests drive it with a simulated clock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What the batcher needs to know of an item.
pub trait Item {
    /// Destination subject; items of one subject are batched together, in push order.
    fn subject(&self) -> &str;
    /// Bytes the item adds to an encoded batch.
    fn size(&self) -> usize;
}

/// When a batch is flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A batch is flushed as soon as it holds this many items (1 = no batching).
    pub max_events: usize,
    /// A batch never exceeds this many bytes, unless it holds a single larger item.
    pub max_bytes: usize,
    /// A batch is flushed at the latest this long after its first item.
    pub linger: Duration,
}

/// Why a batch was flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// It reached `max_events`.
    Events,
    /// The next item would have taken it past `max_bytes` (or this one reached it).
    Bytes,
    /// Its linger time passed.
    Linger,
    /// Nothing was waiting for an acknowledgement, so there was no reason to wait, or an
    /// early flush was due ([`crate::batch::early`]) ([`Batcher::flush_all`] with this
    /// reason).
    Idle,
    /// Shutdown ([`Batcher::flush_all`] with this reason).
    Drain,
}

/// A batch ready to publish.
#[derive(Debug)]
pub struct Ready<T> {
    pub subject: String,
    pub items: Vec<T>,
    pub bytes: usize,
    /// When its first item was pushed.
    pub opened: Instant,
    pub reason: FlushReason,
}

/// The batches being filled, one per subject.
#[derive(Debug)]
pub struct Batcher<T> {
    limits: Limits,
    open: HashMap<String, Open<T>>,
    /// Linger deadlines in the order batches were opened (so in deadline order); an entry whose
    /// generation no longer matches the open batch is stale and skipped.
    deadlines: VecDeque<(Instant, String, u64)>,
    next_generation: u64,
    items: usize,
}

#[derive(Debug)]
struct Open<T> {
    items: Vec<T>,
    bytes: usize,
    opened: Instant,
    generation: u64,
}

impl<T: Item> Batcher<T> {
    pub fn new(limits: Limits) -> Self {
        assert!(limits.max_events > 0 && limits.max_bytes > 0, "limits must be positive");
        Self {
            limits,
            open: HashMap::new(),
            deadlines: VecDeque::new(),
            next_generation: 0,
            items: 0,
        }
    }

    /// Batches from now on follow `limits` (a reload). Open batches keep their linger
    /// deadline; one already past the new `max_events` is flushed by its next item.
    pub fn set_limits(&mut self, limits: Limits) {
        assert!(limits.max_events > 0 && limits.max_bytes > 0, "limits must be positive");
        self.limits = limits;
    }

    /// Adds `item` at time `now`; batches that became ready are appended to `out`.
    pub fn push(&mut self, item: T, now: Instant, out: &mut Vec<Ready<T>>) {
        let size = item.size();
        if let Some(open) = self.open.get_mut(item.subject()) {
            if open.bytes + size > self.limits.max_bytes {
                let subject = item.subject().to_owned();
                self.flush(&subject, FlushReason::Bytes, out);
            }
        }
        let open = match self.open.get_mut(item.subject()) {
            Some(open) => open,
            None => {
                let subject = item.subject().to_owned();
                let generation = self.next_generation;
                self.next_generation += 1;
                self.deadlines.push_back((now + self.limits.linger, subject.clone(), generation));
                self.open.entry(subject).or_insert(Open {
                    items: Vec::with_capacity(self.limits.max_events.min(64)),
                    bytes: 0,
                    opened: now,
                    generation,
                })
            }
        };
        open.items.push(item);
        open.bytes += size;
        self.items += 1;
        let reason = if open.items.len() >= self.limits.max_events {
            Some(FlushReason::Events)
        } else if open.bytes >= self.limits.max_bytes {
            Some(FlushReason::Bytes)
        } else {
            None
        };
        if let Some(reason) = reason {
            let subject = open.items[0].subject().to_owned();
            self.flush(&subject, reason, out);
        }
    }

    /// Flushes every batch whose linger time has passed at `now`.
    pub fn poll_flush(&mut self, now: Instant, out: &mut Vec<Ready<T>>) {
        while let Some((deadline, _, _)) = self.deadlines.front() {
            if *deadline > now {
                break;
            }
            let Some((_, subject, generation)) = self.deadlines.pop_front() else { break };
            if self.open.get(&subject).is_some_and(|o| o.generation == generation) {
                self.flush(&subject, FlushReason::Linger, out);
            }
        }
    }

    /// The earliest time [`poll_flush`](Self::poll_flush) has something to do, if any.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        // Drop stale entries so the answer is the real next deadline, not a past one.
        while let Some((_, subject, generation)) = self.deadlines.front() {
            if self.open.get(subject).is_some_and(|o| o.generation == *generation) {
                break;
            }
            self.deadlines.pop_front();
        }
        self.deadlines.front().map(|(d, _, _)| *d)
    }

    /// Flushes every open batch, oldest first.
    pub fn flush_all(&mut self, reason: FlushReason, out: &mut Vec<Ready<T>>) {
        self.flush_oldest(usize::MAX, reason, out);
    }

    /// Flushes the `n` oldest open batches (or all, if fewer are open).
    pub fn flush_oldest(&mut self, n: usize, reason: FlushReason, out: &mut Vec<Ready<T>>) {
        let mut flushed = 0;
        while flushed < n {
            let Some((_, subject, generation)) = self.deadlines.pop_front() else { break };
            if self.open.get(&subject).is_some_and(|o| o.generation == generation) {
                self.flush(&subject, reason, out);
                flushed += 1;
            }
        }
    }

    /// Batches open (being filled).
    pub fn open_batches(&self) -> usize {
        self.open.len()
    }

    /// Items waiting in open batches.
    pub fn len(&self) -> usize {
        self.items
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    fn flush(&mut self, subject: &str, reason: FlushReason, out: &mut Vec<Ready<T>>) {
        if let Some((subject, open)) = self.open.remove_entry(subject) {
            self.items -= open.items.len();
            out.push(Ready {
                subject,
                items: open.items,
                bytes: open.bytes,
                opened: open.opened,
                reason,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Ev(&'static str, usize, u32);

    impl Item for Ev {
        fn subject(&self) -> &str {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
    }

    fn limits(max_events: usize, max_bytes: usize, linger_ms: u64) -> Limits {
        Limits { max_events, max_bytes, linger: Duration::from_millis(linger_ms) }
    }

    fn ids(r: &Ready<Ev>) -> Vec<u32> {
        r.items.iter().map(|e| e.2).collect()
    }

    /// A batcher with `limits` fed `events` at `now`, and the batches it flushed meanwhile.
    fn fed(
        limits: Limits,
        events: impl IntoIterator<Item = Ev>,
        now: Instant,
    ) -> (Batcher<Ev>, Vec<Ready<Ev>>) {
        fed_over(limits, events.into_iter().map(|e| (0, e)), now)
    }

    /// A batcher with `limits` fed each `(ms, event)` at `t0 + ms`, and the batches it
    /// flushed meanwhile.
    fn fed_over(
        limits: Limits,
        events: impl IntoIterator<Item = (u64, Ev)>,
        t0: Instant,
    ) -> (Batcher<Ev>, Vec<Ready<Ev>>) {
        let mut b = Batcher::new(limits);
        let mut out = Vec::new();
        for (ms, e) in events {
            b.push(e, t0 + Duration::from_millis(ms), &mut out);
        }
        (b, out)
    }

    #[test]
    fn flushes_by_count() {
        let t0 = Instant::now();
        let (b, out) = fed(limits(3, 1000, 50), (0..7).map(|i| Ev("a", 10, i)), t0);
        assert_eq!(out.len(), 2);
        assert_eq!(ids(&out[0]), [0, 1, 2]);
        assert_eq!(ids(&out[1]), [3, 4, 5]);
        assert!(out.iter().all(|r| r.reason == FlushReason::Events && r.bytes == 30));
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn new_limits_apply_from_the_next_push() {
        let t0 = Instant::now();
        let (mut b, mut out) = fed(limits(8, 1000, 50), (0..4).map(|i| Ev("a", 10, i)), t0);
        assert!(out.is_empty());
        b.set_limits(limits(2, 1000, 50));
        b.push(Ev("a", 10, 4), t0, &mut out);
        b.push(Ev("a", 10, 5), t0, &mut out);
        b.push(Ev("a", 10, 6), t0, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(ids(&out[0]), [0, 1, 2, 3, 4]);
        assert_eq!(ids(&out[1]), [5, 6]);
    }

    #[test]
    fn flushes_by_bytes_before_exceeding() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 100, 50));
        let mut out = Vec::new();
        b.push(Ev("a", 40, 0), t0, &mut out);
        b.push(Ev("a", 40, 1), t0, &mut out);
        assert!(out.is_empty());
        b.push(Ev("a", 40, 2), t0, &mut out); // 120 > 100: the first two go out alone
        assert_eq!(out.len(), 1);
        assert_eq!(
            (ids(&out[0]), out[0].bytes, out[0].reason),
            (vec![0, 1], 80, FlushReason::Bytes)
        );
        b.push(Ev("a", 60, 3), t0, &mut out); // exactly 100: flushed at once
        assert_eq!(out.len(), 2);
        assert_eq!(ids(&out[1]), [2, 3]);
        // An item larger than max_bytes travels alone.
        b.push(Ev("a", 500, 4), t0, &mut out);
        assert_eq!(ids(&out[2]), [4]);
        assert!(b.is_empty());
    }

    #[test]
    fn flushes_by_linger_on_a_simulated_clock() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(Batcher::<Ev>::new(limits(100, 10_000, 5)).next_deadline(), None);
        let events = [(0, Ev("a", 1, 0)), (2, Ev("b", 1, 1)), (3, Ev("a", 1, 2))];
        let (mut b, mut out) = fed_over(limits(100, 10_000, 5), events, t0);
        assert_eq!(b.next_deadline(), Some(t0 + ms(5)));
        b.poll_flush(t0 + ms(4), &mut out);
        assert!(out.is_empty());
        b.poll_flush(t0 + ms(5), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].subject.as_str(), ids(&out[0])), ("a", vec![0, 2]));
        assert_eq!(out[0].reason, FlushReason::Linger);
        assert_eq!(out[0].opened, t0);
        assert_eq!(b.next_deadline(), Some(t0 + ms(7)));
        b.poll_flush(t0 + ms(100), &mut out);
        assert_eq!(ids(&out[1]), [1]);
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn a_batch_flushed_early_leaves_no_stale_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The first two are flushed by count; the third opens a new batch, deadline t0+8.
        let events = [(0, Ev("a", 1, 0)), (0, Ev("a", 1, 1)), (3, Ev("a", 1, 2))];
        let (mut b, mut out) = fed_over(limits(2, 10_000, 5), events, t0);
        assert_eq!(b.next_deadline(), Some(t0 + ms(8)));
        b.poll_flush(t0 + ms(6), &mut out);
        assert_eq!(out.len(), 1, "the old deadline must not flush the new batch early");
        b.poll_flush(t0 + ms(8), &mut out);
        assert_eq!(ids(&out[1]), [2]);
    }

    #[test]
    fn order_within_a_subject_is_preserved_across_subjects_and_batches() {
        let t0 = Instant::now();
        let subjects = ["x", "y", "z"];
        let events = (0..30u32).map(|i| Ev(subjects[(i % 3) as usize], 1, i));
        let (mut b, mut out) = fed(limits(4, 10_000, 5), events, t0);
        b.flush_all(FlushReason::Drain, &mut out);
        assert!(b.is_empty());
        for s in subjects {
            let seen: Vec<u32> = out.iter().filter(|r| r.subject == s).flat_map(ids).collect();
            let mut sorted = seen.clone();
            sorted.sort();
            assert_eq!(seen, sorted, "subject {s}");
            assert_eq!(seen.len(), 10);
        }
    }

    #[test]
    fn flush_all_empties_every_batch_oldest_first() {
        let t0 = Instant::now();
        let events = [Ev("y", 1, 0), Ev("x", 1, 1), Ev("y", 1, 2)];
        let (mut b, mut out) = fed(limits(10, 10_000, 5), events, t0);
        b.flush_all(FlushReason::Idle, &mut out);
        let got: Vec<(&str, Vec<u32>)> = out.iter().map(|r| (r.subject.as_str(), ids(r))).collect();
        assert_eq!(got, [("y", vec![0, 2]), ("x", vec![1])]);
        assert!(out.iter().all(|r| r.reason == FlushReason::Idle));
        assert!(b.is_empty());
        assert_eq!(b.next_deadline(), None);
    }

    #[test]
    fn flush_oldest_takes_the_oldest_batches_only() {
        let t0 = Instant::now();
        let events = [Ev("y", 1, 0), Ev("x", 1, 1), Ev("z", 1, 2), Ev("y", 1, 3)];
        let (mut b, mut out) = fed(limits(10, 10_000, 5), events, t0);
        assert_eq!(b.open_batches(), 3);
        b.flush_oldest(2, FlushReason::Idle, &mut out);
        let got: Vec<(&str, Vec<u32>)> = out.iter().map(|r| (r.subject.as_str(), ids(r))).collect();
        assert_eq!(got, [("y", vec![0, 3]), ("x", vec![1])]);
        assert_eq!((b.open_batches(), b.len()), (1, 1));
        b.flush_oldest(0, FlushReason::Idle, &mut out);
        assert_eq!(out.len(), 2);
        // z keeps its linger deadline.
        assert_eq!(b.next_deadline(), Some(t0 + Duration::from_millis(5)));
    }

    #[test]
    fn max_events_one_turns_batching_off() {
        let t0 = Instant::now();
        let (mut b, out) = fed(limits(1, 10_000, 5), (0..5).map(|i| Ev("a", 1, i)), t0);
        assert_eq!(out.len(), 5);
        assert_eq!(b.next_deadline(), None);
    }
}
