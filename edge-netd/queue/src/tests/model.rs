//! Model-based test (after Vector's `tests/model`): random operation sequences run against
//! the real queue and a plain in-memory model of what it must contain.
//!
//! Invariants checked after every step:
//! - every handed-out message was accepted, is not acked, is not already in flight, belongs
//!   to an allowed class, is not expired, and has the body and key it was enqueued with;
//! - nothing is withheld: a batch shorter than `max` leaves no ready, allowed, unexpired
//!   message behind;
//! - FIFO within a class, priority across classes up to the share rule;
//! - across restarts nothing accepted is lost and nothing acked comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::{Clock, QueueConfig};

const CLASSES: [(&str, u8); 3] = [("critical", 0), ("standard", 1), ("bulk", 2)];
const SHARE: u32 = 30;

#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        class: usize,
        size: usize,
        ttl_ms: Option<u64>,
    },
    NextBatch {
        allowed: [bool; 3],
        max: usize,
    },
    Ack(usize),
    Nack(usize),
    DeadLetter(usize),
    Reopen,
    Advance(u64),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..300usize, proptest::option::weighted(0.3, 1..5_000u64))
            .prop_map(|(class, size, ttl_ms)| Op::Enqueue { class, size, ttl_ms }),
        3 => (any::<[bool; 3]>(), 1..8usize).prop_map(|(allowed, max)| Op::NextBatch { allowed, max }),
        2 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Nack),
        1 => any::<usize>().prop_map(Op::DeadLetter),
        1 => Just(Op::Reopen),
        1 => (0..3_000u64).prop_map(Op::Advance),
        1 => Just(Op::Expire),
    ]
}

#[derive(Debug)]
struct Expect {
    class: usize,
    expires_at: Option<u64>,
    key: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct Model {
    /// Accepted and not finished (acked, dead-lettered). May include expired ones, which
    /// the queue is free to have dropped already.
    live: BTreeMap<u64, Expect>,
    in_flight: BTreeSet<u64>,
    finished: BTreeSet<u64>,
    max_id: u64,
}

impl Model {
    fn expired(&self, id: u64, now: u64) -> bool {
        self.live[&id].expires_at.is_some_and(|t| t <= now)
    }
    fn ready(&self, now: u64) -> impl Iterator<Item = (&u64, &Expect)> + '_ {
        self.live.iter().filter(move |(id, e)| {
            !self.in_flight.contains(id) && e.expires_at.is_none_or(|t| t > now)
        })
    }
    fn pick_in_flight(&self, i: usize) -> Option<u64> {
        (!self.in_flight.is_empty())
            .then(|| *self.in_flight.iter().nth(i % self.in_flight.len()).unwrap())
    }
}

fn body_of(id_hint: usize, size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + id_hint) as u8).collect()
}

fn config(dir: &Path) -> QueueConfig {
    let mut c = QueueConfig::new(dir);
    c.min_share_percent = SHARE;
    c.segment_bytes = 8192;
    c
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut q = Some(open_with(config(dir.path()), &clock, Arc::new(StdStorage)));
    let mut m = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let queue = q.as_ref().unwrap();
        let now = clock.now_ms();
        match op {
            Op::Enqueue {
                class,
                size,
                ttl_ms,
            } => {
                let (name, rank) = CLASSES[class];
                let mut new = msg(name, rank, &body_of(step, size));
                new.ttl = ttl_ms.map(Duration::from_millis);
                let a = rt.block_on(queue.enqueue(new.clone())).unwrap();
                prop_assert!(a.id > m.max_id, "ids are monotonic");
                m.max_id = a.id;
                m.live.insert(
                    a.id,
                    Expect {
                        class,
                        expires_at: ttl_ms.map(|t| now + t),
                        key: a.idempotency_key,
                        body: new.body,
                    },
                );
            }
            Op::NextBatch { allowed, max } => {
                let is_allowed = |c: &str| {
                    CLASSES
                        .iter()
                        .position(|(n, _)| *n == c)
                        .is_some_and(|i| allowed[i])
                };
                let batch = queue.next_batch(&is_allowed, max);
                prop_assert!(batch.len() <= max);
                let mut per_class = [0usize; 3];
                let top = (0..3).find(|&c| allowed[c] && m.ready(now).any(|(_, e)| e.class == c));
                for got in &batch {
                    let e = m.live.get(&got.id);
                    prop_assert!(
                        e.is_some(),
                        "id {} handed out but not live (acked or never accepted)",
                        got.id
                    );
                    let e = e.unwrap();
                    prop_assert!(
                        !m.in_flight.contains(&got.id),
                        "id {} handed out twice",
                        got.id
                    );
                    prop_assert!(allowed[e.class], "class not allowed");
                    prop_assert!(!m.expired(got.id, now), "expired message handed out");
                    prop_assert_eq!(&got.body, &e.body);
                    prop_assert_eq!(&got.idempotency_key, &e.key);
                    // FIFO: nothing older of the same class was still ready.
                    let older = m
                        .ready(now)
                        .find(|(id, x)| x.class == e.class && **id < got.id);
                    prop_assert!(
                        older.is_none(),
                        "id {} handed out before older {:?}",
                        got.id,
                        older.map(|o| *o.0)
                    );
                    per_class[e.class] += 1;
                    m.in_flight.insert(got.id);
                }
                if batch.len() < max {
                    let left: Vec<u64> = m
                        .ready(now)
                        .filter(|(_, e)| allowed[e.class])
                        .map(|(id, _)| *id)
                        .collect();
                    prop_assert!(left.is_empty(), "withheld {:?}", left);
                }
                // While the top class still has messages, each lower class gets at most its
                // share of this batch (plus credit carried over from earlier batches).
                if let Some(top) = top
                    && m.ready(now).any(|(_, e)| e.class == top)
                {
                    let bound = 2 + batch.len() * SHARE as usize / 100;
                    for (c, &n) in per_class.iter().enumerate().skip(top + 1) {
                        prop_assert!(n <= bound, "class {} got {} of {}", c, n, batch.len());
                    }
                }
            }
            Op::Ack(i) | Op::DeadLetter(i) => {
                if let Some(id) = m.pick_in_flight(i) {
                    let ok = if matches!(op, Op::Ack(_)) {
                        queue.ack(id)
                    } else {
                        queue.dead_letter(id, Some(500), "model")
                    };
                    prop_assert!(ok);
                    m.in_flight.remove(&id);
                    m.live.remove(&id);
                    m.finished.insert(id);
                } else {
                    prop_assert!(!queue.ack(m.max_id + 1));
                }
            }
            Op::Nack(i) => {
                if let Some(id) = m.pick_in_flight(i) {
                    prop_assert!(queue.nack(id));
                    m.in_flight.remove(&id);
                }
            }
            Op::Reopen => {
                drop(q.take());
                q = Some(open_with(config(dir.path()), &clock, Arc::new(StdStorage)));
                // In-flight is memory only: after a restart those messages are ready again.
                m.in_flight.clear();
            }
            Op::Advance(ms) => clock.advance(ms),
            Op::Expire => {
                queue.expire();
                let expired: Vec<u64> = m
                    .live
                    .keys()
                    .copied()
                    .filter(|id| !m.in_flight.contains(id) && m.expired(*id, now))
                    .collect();
                for id in expired {
                    m.live.remove(&id);
                }
            }
        }
        // The queue holds at least every unexpired live message and at most every live one.
        let queue = q.as_ref().unwrap();
        let now = clock.now_ms();
        let unexpired = m
            .live
            .keys()
            .filter(|id| m.in_flight.contains(id) || !m.expired(**id, now))
            .count();
        prop_assert!(
            queue.len() >= unexpired && queue.len() <= m.live.len(),
            "queue holds {}, model {}..={}",
            queue.len(),
            unexpired,
            m.live.len()
        );
    }

    // Final restart: exactly the unfinished, unexpired messages come back.
    drop(q.take());
    let queue = open_with(config(dir.path()), &clock, Arc::new(StdStorage));
    let now = clock.now_ms();
    let got: BTreeSet<u64> = drain(&queue).into_iter().map(|x| x.id).collect();
    let want: BTreeSet<u64> = m
        .live
        .keys()
        .copied()
        .filter(|id| !m.expired(*id, now))
        .collect();
    prop_assert_eq!(&got, &want);
    prop_assert!(got.is_disjoint(&m.finished), "an acked message came back");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_the_model_across_random_operations_and_restarts(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
