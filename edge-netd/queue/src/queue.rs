//! The public face: open, enqueue, next_batch, ack/nack/dead_letter, stats.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    hash::{BuildHasher, RandomState},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::oneshot;
use tracing::warn;

use crate::{
    clock::{Clock, SystemClock},
    command::{Cmd, Pending},
    error::{OpenError, QueueError},
    io::{StdStorage, Storage},
    message::{Accepted, Message, NewMessage},
    record::{self, AckKind, DeadLetter, FRAME_HEADER, FrameAt, MessageFields, SEGMENT_MAGIC},
    recovery::{self, LOCK_FILE, segment_path},
    state::{Counters, Shared, State, lock},
    writer::Writer,
};

/// Tuning and limits of one queue directory.
#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub dir: PathBuf,
    /// A segment is closed once the next record would take it past this size.
    pub segment_bytes: u64,
    /// Budget for live record bytes (ready + in flight + being written).
    pub budget_bytes: u64,
    /// Larger bodies are refused with [`QueueError::TooLarge`].
    pub max_body_bytes: usize,
    /// Guaranteed share, in percent of picks, of each non-empty class below the top one.
    pub min_share_percent: u32,
    /// Default time to live per class name, for messages that bring none.
    pub class_ttl: HashMap<String, Duration>,
    /// Upper bound on the append bytes of one group commit (bounds its latency).
    pub max_group_bytes: usize,
    /// How many dead letters are kept (and listed).
    pub dead_letter_keep: usize,
}

impl QueueConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 16 << 20,
            budget_bytes: 512 << 20,
            max_body_bytes: 8 << 20,
            min_share_percent: 10,
            class_ttl: HashMap::new(),
            max_group_bytes: 4 << 20,
            dead_letter_keep: 1000,
        }
    }
}

/// Depth of one class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassDepth {
    pub class: String,
    pub rank: u8,
    pub ready: u64,
    pub in_flight: u64,
    pub bytes: u64,
    /// Drops of this class since open.
    pub expired: u64,
    pub evicted: u64,
    pub dead_lettered: u64,
}

/// Counters since open (monotonic) and gauges (current).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub delivered: u64,
    pub expired: u64,
    pub evicted: u64,
    pub dead_lettered: u64,
    pub nacked: u64,
    /// Corrupt regions skipped at recovery plus records unreadable later.
    pub corrupt_skipped: u64,
    pub corrupt_bytes: u64,
    /// Bytes of incomplete last records truncated at recovery.
    pub torn_tail_bytes: u64,
    /// Failed write/fsync/create calls on the write path.
    pub write_errors: u64,
    pub group_commits: u64,
    /// Gauge: frame bytes of live records (what the budget counts).
    pub live_bytes: u64,
    pub budget_bytes: u64,
    /// Gauge: segment files plus ack log on disk.
    pub disk_bytes: u64,
    pub segments: u64,
    pub depth: Vec<ClassDepth>,
}

/// The durable queue. One per directory per machine (enforced by a lock file).
pub struct Queue {
    shared: Arc<Shared>,
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    max_body_bytes: usize,
    segment_bytes: u64,
    class_ttl: HashMap<String, Duration>,
    key_prefix: u64,
    key_seq: AtomicU64,
    writer: Option<JoinHandle<()>>,
    /// Held for the queue's life; the OS releases the lock if the process dies.
    _lock: File,
}

impl Queue {
    /// Open (creating if needed) and recover a queue directory with the system clock and
    /// real file system. Does blocking I/O: call it from `spawn_blocking` in async code.
    pub fn open(config: QueueConfig) -> Result<Self, OpenError> {
        Self::open_with(config, Arc::new(SystemClock), Arc::new(StdStorage))
    }

    /// Open with an injected clock and storage (tests: time control, fault injection).
    pub fn open_with(
        config: QueueConfig,
        clock: Arc<dyn Clock>,
        storage: Arc<dyn Storage>,
    ) -> Result<Self, OpenError> {
        if config.segment_bytes < 4096 {
            return Err(OpenError::Config("segment_bytes must be at least 4096"));
        }
        if config.min_share_percent > 100 {
            return Err(OpenError::Config("min_share_percent must be at most 100"));
        }
        let dir = config.dir.clone();
        let io_err = |source| OpenError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // A freshly created queue directory must itself survive power loss.
            storage.sync_dir(parent).map_err(io_err)?;
        }
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io_err)?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::Locked { path: dir.clone() });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }

        let rec = recovery::recover(&dir, &*storage, config.dead_letter_keep).map_err(io_err)?;
        let (tx, rx) = mpsc::channel();
        let mut state = State {
            classes: Vec::new(),
            in_flight: HashMap::new(),
            segments: rec.segments,
            active_seg: None,
            next_id: rec.next_id,
            live_bytes: 0,
            reserved_bytes: 0,
            ack_log_bytes: rec.ack_len,
            counters: Counters {
                corrupt_skipped: rec.corrupt_skipped,
                corrupt_bytes: rec.corrupt_bytes,
                torn_tail_bytes: rec.torn_tail_bytes,
                ..Counters::default()
            },
            dead_letters: rec.dead_letters,
            dead_letter_keep: config.dead_letter_keep,
            readers: HashMap::new(),
            tx: Some(tx),
            budget_bytes: config.budget_bytes,
            min_share_percent: config.min_share_percent,
        };
        for e in rec.entries {
            state.insert_ready(e.rank, &e.class, e.entry);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
        });
        let writer = Writer::new(
            dir.clone(),
            storage,
            shared.clone(),
            rx,
            rec.next_seg,
            config.segment_bytes,
            config.max_group_bytes,
            (rec.ack_file, rec.ack_len),
            (rec.dl_file, rec.dl_len),
        );
        let handle = std::thread::Builder::new()
            .name("misaki-queue-writer".into())
            .spawn(move || writer.run())
            .map_err(io_err)?;
        Ok(Self {
            shared,
            dir,
            clock,
            max_body_bytes: config.max_body_bytes,
            segment_bytes: config.segment_bytes,
            class_ttl: config.class_ttl,
            key_prefix: RandomState::new().hash_one(std::process::id()),
            key_seq: AtomicU64::new(0),
            writer: Some(handle),
            _lock: lock_file,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Append a message; resolves once it is fsync'd (answer 202 then, not before).
    ///
    /// If this future is dropped after the message was handed to the writer, the message
    /// may still be committed; the app's retry with the same idempotency key makes that a
    /// duplicate the receiver drops.
    pub async fn enqueue(&self, msg: NewMessage) -> Result<Accepted, QueueError> {
        if msg.body.len() > self.max_body_bytes {
            return Err(QueueError::TooLarge {
                size: msg.body.len(),
                limit: self.max_body_bytes,
            });
        }
        validate(&msg)?;
        let now = self.clock.now_ms();
        let ttl = msg.ttl.or_else(|| self.class_ttl.get(&msg.class).copied());
        let expires_at = ttl.map(|t| now.saturating_add(t.as_millis() as u64));
        let key = match msg.idempotency_key {
            Some(k) => k,
            None => format!(
                "mq-{:016x}-{}",
                self.key_prefix,
                self.key_seq.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let fields = MessageFields {
            enqueued_at_ms: now,
            expires_at_ms: expires_at,
            rank: msg.rank,
            class: &msg.class,
            key: &key,
            destination: &msg.destination,
            body: &msg.body,
        };
        let flen = record::message_frame_len(&fields) as u64;
        if flen + SEGMENT_MAGIC.len() as u64 > self.segment_bytes {
            return Err(QueueError::TooLarge {
                size: msg.body.len(),
                limit: self.segment_bytes as usize - (flen as usize - msg.body.len()) - 8,
            });
        }
        // Encoding (the memcpy of the body) happens outside the lock.
        let mut frame = record::encode_message(&fields);
        let (wtx, wrx) = oneshot::channel();
        {
            let mut st = self.state();
            if st.tx.is_none() {
                return Err(QueueError::Closed);
            }
            st.make_room(msg.rank, flen)?;
            let id = st.next_id;
            st.next_id += 1;
            record::set_frame_id(&mut frame, id);
            let class_idx = st.class_idx(msg.rank, &msg.class);
            let class = st.classes[class_idx].name.clone();
            st.reserved_bytes += flen;
            let pending = Pending {
                id,
                rank: msg.rank,
                class,
                key,
                expires_at,
                frame,
                waiter: wtx,
            };
            if st.send(Cmd::Append(pending)).is_err() {
                st.reserved_bytes -= flen;
                return Err(QueueError::Closed);
            }
        }
        wrx.await.map_err(|_| QueueError::Closed)?
    }

    /// Hand out up to `max` messages from classes for which `allowed(class)` is true, by
    /// priority with guaranteed shares (crate doc, "Scheduling"). They stay in flight until
    /// [`ack`](Self::ack), [`nack`](Self::nack) or [`dead_letter`](Self::dead_letter).
    /// Expired messages met on the way are dropped and counted.
    ///
    /// Reads record bodies with `pread` (normally from the page cache) outside the lock.
    pub fn next_batch(&self, allowed: &dyn Fn(&str) -> bool, max: usize) -> Vec<Message> {
        let now = self.clock.now_ms();
        let mut picks = Vec::new();
        {
            let mut st = self.state();
            while picks.len() < max {
                let Some((ci, entry)) = st.pick(allowed, now) else {
                    break;
                };
                let entry = st.hand_out(ci, entry);
                let file = match st.readers.get(&entry.seg) {
                    Some(f) => Some(f.clone()),
                    None => match File::open(segment_path(&self.dir, entry.seg)) {
                        Ok(f) => {
                            let f = Arc::new(f);
                            st.readers.insert(entry.seg, f.clone());
                            Some(f)
                        }
                        Err(error) => {
                            warn!(segment = entry.seg, %error, "cannot open queue segment for reading");
                            None
                        }
                    },
                };
                picks.push((entry, file));
            }
        }
        let mut out = Vec::with_capacity(picks.len());
        let mut unreadable = Vec::new();
        for (entry, file) in picks {
            match file.map(|f| read_record(&f, entry.offset, entry.len)) {
                Some(Some(mut m)) if m.id == entry.id => {
                    m.attempt = entry.attempts;
                    out.push(m);
                }
                _ => unreadable.push(entry.id),
            }
        }
        let mut st = self.state();
        for m in &out {
            if let Some(f) = st.in_flight.get_mut(&m.id) {
                f.key.clone_from(&m.idempotency_key);
                f.service.clone_from(&m.destination.service);
                f.method.clone_from(&m.destination.method);
                f.path.clone_from(&m.destination.path);
            }
        }
        for id in unreadable {
            warn!(
                id,
                "queued record unreadable; dropped and counted as corrupt"
            );
            st.counters.corrupt_bytes +=
                st.in_flight.get(&id).map_or(0, |f| u64::from(f.entry.len));
            st.finish(id, AckKind::Unreadable);
        }
        out
    }

    /// The message was delivered: it will not be handed out again, even after a restart
    /// (once the ack is on disk, which the next group commit does).
    /// Returns false if `id` was not in flight.
    pub fn ack(&self, id: u64) -> bool {
        self.state().finish(id, AckKind::Delivered).is_some()
    }

    /// Delivery failed for now: the message goes back to the head of its class.
    /// Backoff is the caller's business. Returns false if `id` was not in flight.
    pub fn nack(&self, id: u64) -> bool {
        self.state().nack(id)
    }

    /// Delivery failed for good: drop the message and record it in the dead-letter list.
    /// Returns false if `id` was not in flight.
    pub fn dead_letter(&self, id: u64, status: Option<u16>, reason: &str) -> bool {
        let now = self.clock.now_ms();
        let mut st = self.state();
        let Some(f) = st.finish(id, AckKind::DeadLettered) else {
            return false;
        };
        let d = DeadLetter {
            id,
            idempotency_key: f.key,
            class: f.class.to_string(),
            service: f.service,
            method: f.method,
            path: f.path,
            status,
            reason: reason.to_string(),
            at_ms: now,
        };
        let _ = st.send(Cmd::DeadLetter(Box::new(d.clone())));
        st.push_dead_letter(d);
        true
    }

    /// The most recent dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state().dead_letters.iter().cloned().collect()
    }

    /// Drop every expired ready message now (call periodically); returns how many.
    pub fn expire(&self) -> usize {
        let now = self.clock.now_ms();
        self.state().expire_all(now)
    }

    /// Resolves once every ack, dead letter and append issued before it is durable.
    pub async fn flush(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        self.state().send(Cmd::Flush(tx))?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    pub fn stats(&self) -> Stats {
        let st = self.state();
        let c = &st.counters;
        Stats {
            accepted: c.accepted,
            delivered: c.delivered,
            expired: c.expired,
            evicted: c.evicted,
            dead_lettered: c.dead_lettered,
            nacked: c.nacked,
            corrupt_skipped: c.corrupt_skipped,
            corrupt_bytes: c.corrupt_bytes,
            torn_tail_bytes: c.torn_tail_bytes,
            write_errors: c.write_errors,
            group_commits: c.group_commits,
            live_bytes: st.live_bytes,
            budget_bytes: st.budget_bytes,
            disk_bytes: st.segments.values().map(|s| s.bytes).sum::<u64>() + st.ack_log_bytes,
            segments: st.segments.len() as u64,
            depth: st
                .classes
                .iter()
                .map(|c| ClassDepth {
                    class: c.name.to_string(),
                    rank: c.rank,
                    ready: c.ready.len() as u64,
                    in_flight: c.in_flight,
                    bytes: c.ready_bytes + c.in_flight_bytes,
                    expired: c.expired,
                    evicted: c.evicted,
                    dead_lettered: c.dead_lettered,
                })
                .collect(),
        }
    }

    /// Total ready + in-flight messages.
    pub fn len(&self) -> usize {
        let st = self.state();
        st.classes.iter().map(|c| c.ready.len()).sum::<usize>() + st.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for Queue {
    /// Closing drains the writer: every command sent before is written and synced.
    fn drop(&mut self) {
        self.state().tx = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

fn read_record(file: &File, offset: u64, len: u32) -> Option<Message> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).ok()?;
    match record::frame_at(&buf, 0) {
        FrameAt::Valid(n) if n == buf.len() => record::decode_message(&buf[FRAME_HEADER..]).ok(),
        _ => None,
    }
}

fn validate(msg: &NewMessage) -> Result<(), QueueError> {
    const U16: usize = u16::MAX as usize;
    let too_long = |field, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(QueueError::Invalid {
                field,
                reason: "too long",
            })
        }
    };
    too_long("class", msg.class.len() <= 255)?;
    if msg.class.is_empty() {
        return Err(QueueError::Invalid {
            field: "class",
            reason: "empty",
        });
    }
    if let Some(k) = &msg.idempotency_key {
        too_long("idempotency_key", k.len() <= U16)?;
    }
    let d = &msg.destination;
    too_long("destination.service", d.service.len() <= U16)?;
    too_long("destination.method", d.method.len() <= U16)?;
    too_long("destination.path", d.path.len() <= U16)?;
    too_long("destination.headers", d.headers.len() <= U16)?;
    for (n, v) in &d.headers {
        too_long("destination.headers", n.len() <= U16 && v.len() <= U16)?;
    }
    too_long("body", msg.body.len() <= u32::MAX as usize)
}
