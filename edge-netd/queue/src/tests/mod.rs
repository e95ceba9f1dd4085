//! Unit tests of the queue as a whole: recovery, budget and TTL, injected faults,
//! scheduling, and a model-based proptest. The kill -9 test lives in `tests/crash.rs`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    Destination, ManualClock, Message, NewMessage, Queue, QueueConfig, StdStorage, Storage,
};

mod budget;
mod faults;
mod model;
mod recovery;
mod scheduling;

pub(crate) const T0: u64 = 1_700_000_000_000;

pub(crate) fn msg(class: &str, rank: u8, body: &[u8]) -> NewMessage {
    NewMessage {
        idempotency_key: None,
        class: class.into(),
        rank,
        ttl: None,
        destination: Destination {
            service: "telemetry".into(),
            method: "POST".into(),
            path: "/v1/upload".into(),
            headers: vec![("content-type".into(), "application/json".into())],
        },
        body: body.to_vec(),
    }
}

pub(crate) fn open_with(
    config: QueueConfig,
    clock: &Arc<ManualClock>,
    storage: Arc<dyn Storage>,
) -> Queue {
    Queue::open_with(config, clock.clone(), storage).expect("open queue")
}

pub(crate) fn open(dir: &Path, clock: &Arc<ManualClock>) -> Queue {
    open_with(QueueConfig::new(dir), clock, Arc::new(StdStorage))
}

pub(crate) fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0))
}

pub(crate) fn all(_: &str) -> bool {
    true
}

pub(crate) fn drain(q: &Queue) -> Vec<Message> {
    q.next_batch(&all, usize::MAX)
}

pub(crate) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("seg-"))
        .collect();
    v.sort();
    v
}

pub(crate) fn ids(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.id).collect()
}
