//! The single writer thread: group commit.
//!
//! It blocks for one command, takes every other command already waiting (up to
//! `max_group_bytes` of appends), writes acks, dead letters and appends with one `write` each,
//! `fdatasync`s each file it touched once, publishes the new records to readers, and only then
//! completes the enqueuers' waiters. Many requests thus share one fsync.

use std::{
    fs::{self, File},
    path::PathBuf,
    sync::{Arc, mpsc::Receiver},
    time::{Duration, Instant},
};

use tracing::{error, warn};

use crate::{
    command::{Cmd, Pending},
    error::QueueError,
    io::Storage,
    message::Accepted,
    record::{self, AckKind, DeadLetter, SEGMENT_MAGIC},
    recovery::{rewrite_ack_log, segment_path},
    state::{Entry, Shared, State, lock},
};

struct ActiveSegment {
    no: u64,
    file: File,
    len: u64,
}

pub(crate) struct Writer {
    pub(crate) dir: PathBuf,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) rx: Receiver<Cmd>,
    pub(crate) next_seg: u64,
    pub(crate) segment_bytes: u64,
    pub(crate) max_group_bytes: usize,
    pub(crate) ack_file: File,
    pub(crate) ack_len: u64,
    pub(crate) dl_file: File,
    pub(crate) dl_len: u64,
    active: Option<ActiveSegment>,
    /// Ack log is rewritten once it grows past this.
    compact_at: u64,
    /// A failed ack write may have left a partial entry: rewrite before appending again.
    ack_dirty: bool,
    buf: Vec<u8>,
}

const MIN_COMPACT_AT: u64 = 4 << 20;
/// Upper bound on how long a group waits for more appends (see `run`).
const MAX_LINGER: Duration = Duration::from_millis(2);
/// A group closes once no append arrived for this long.
const LINGER_GAP: Duration = Duration::from_micros(100);

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dir: PathBuf,
        storage: Arc<dyn Storage>,
        shared: Arc<Shared>,
        rx: Receiver<Cmd>,
        next_seg: u64,
        segment_bytes: u64,
        max_group_bytes: usize,
        ack: (File, u64),
        dl: (File, u64),
    ) -> Self {
        Self {
            dir,
            storage,
            shared,
            rx,
            next_seg,
            segment_bytes,
            max_group_bytes,
            ack_file: ack.0,
            ack_len: ack.1,
            dl_file: dl.0,
            dl_len: dl.1,
            active: None,
            compact_at: MIN_COMPACT_AT,
            ack_dirty: false,
            buf: Vec::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Runs until every sender is gone; everything sent before that is processed.
    pub(crate) fn run(mut self) {
        let mut batch = Vec::new();
        // How long the last group's syncs took, and how many appends it carried.
        let mut last_sync = Duration::ZERO;
        let mut last_appends = 0usize;
        while let Ok(first) = self.rx.recv() {
            let mut bytes = cmd_bytes(&first);
            batch.push(first);
            // Under concurrency, enqueuers woken by the previous group resubmit a few
            // microseconds apart. Catching them in this group instead of the next halves the
            // number of fsyncs per message when fsync is slow. Only engaged when the last
            // group was shared, so a lone client pays nothing; bounded by half the last sync
            // time, so waiting never costs more than it can save.
            let linger = if last_appends > 1 {
                (last_sync / 2).min(MAX_LINGER)
            } else {
                Duration::ZERO
            };
            let started = Instant::now();
            while bytes < self.max_group_bytes {
                let c = match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => {
                        let left = linger.saturating_sub(started.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        match self.rx.recv_timeout(left.min(LINGER_GAP)) {
                            Ok(c) => c,
                            Err(_) => break,
                        }
                    }
                };
                bytes += cmd_bytes(&c);
                batch.push(c);
            }
            last_appends = batch.iter().filter(|c| matches!(c, Cmd::Append(_))).count();
            let t = Instant::now();
            self.process(&mut batch);
            last_sync = t.elapsed();
        }
    }

    fn process(&mut self, batch: &mut Vec<Cmd>) {
        let mut appends = Vec::new();
        let mut acks = Vec::new();
        let mut dead = Vec::new();
        let mut flushes = Vec::new();
        for c in batch.drain(..) {
            match c {
                Cmd::Append(p) => appends.push(p),
                Cmd::Ack(k, id) => acks.push((k, id)),
                Cmd::DeadLetter(d) => dead.push(d),
                Cmd::Flush(w) => flushes.push(w),
            }
        }

        // Acks first: an eviction's ack is durable no later than the message it made room for.
        let ack_result = if acks.is_empty() {
            Ok(())
        } else {
            self.write_acks(&acks)
        };
        let dl_result = if dead.is_empty() {
            Ok(())
        } else {
            self.write_dead_letters(&dead)
        };
        let (results, touched) = self.write_appends(&mut appends);

        let mut done = Vec::with_capacity(appends.len());
        let doomed = {
            let mut st = lock(&self.shared.state);
            st.counters.group_commits += 1;
            for (no, len) in touched {
                st.segments.entry(no).or_default().bytes = len;
            }
            st.active_seg = self.active.as_ref().map(|a| a.no);
            for (p, res) in appends.into_iter().zip(results) {
                let len = p.frame.len() as u64;
                st.reserved_bytes -= len;
                match res {
                    Ok((seg, offset)) => {
                        st.insert_ready(
                            p.rank,
                            &p.class,
                            Entry {
                                id: p.id,
                                seg,
                                offset,
                                len: len as u32,
                                expires_at: p.expires_at,
                                attempts: 0,
                            },
                        );
                        st.counters.accepted += 1;
                        done.push((
                            p.waiter,
                            Ok(Accepted {
                                id: p.id,
                                idempotency_key: p.key,
                            }),
                        ));
                    }
                    Err(e) => done.push((p.waiter, Err(e))),
                }
            }
            if ack_result.is_err() || dl_result.is_err() {
                st.counters.write_errors += 1;
            }
            st.ack_log_bytes = self.ack_len;
            // Segments whose records are all finished, except the one being appended to.
            let doomed: Vec<u64> = st
                .segments
                .iter()
                .filter(|(no, m)| m.live == 0 && Some(**no) != st.active_seg)
                .map(|(no, _)| *no)
                .collect();
            for no in &doomed {
                st.readers.remove(no);
            }
            doomed
        };
        for (w, r) in done {
            // The enqueuer may have gone away (request cancelled): the message stays queued.
            let _ = w.send(r);
        }
        self.delete_segments(&doomed);
        if self.ack_dirty || self.ack_len > self.compact_at {
            self.compact_acks();
        }
        for w in flushes {
            // An ack lost by an earlier failed write counts until a rewrite has succeeded.
            let r = match (&ack_result, &dl_result) {
                (Err(e), _) | (_, Err(e)) => Err(e.duplicate()),
                _ if self.ack_dirty => Err(QueueError::Io(std::io::Error::other(
                    "ack log could not be written",
                ))),
                _ => Ok(()),
            };
            let _ = w.send(r);
        }
    }

    fn write_acks(&mut self, acks: &[(AckKind, u64)]) -> Result<(), QueueError> {
        if self.ack_dirty {
            self.compact_acks();
        }
        let mut buf = Vec::with_capacity(acks.len() * record::ACK_ENTRY);
        for &(k, id) in acks {
            buf.extend_from_slice(&record::encode_ack(k, id));
        }
        let storage = &*self.storage;
        append_synced(storage, &mut self.ack_file, &mut self.ack_len, &buf).map_err(|e| {
            // The acks are still applied in memory; on disk they are lost until the next
            // compaction rewrites them from memory. A crash before then resends them.
            warn!(error = %e, "ack log write failed; will rewrite it");
            self.ack_dirty = true;
            QueueError::from_io(e)
        })
    }

    fn compact_acks(&mut self) {
        let (high_water, acked): (u64, Vec<u64>) = {
            let st = self.state();
            (
                st.next_id,
                st.segments
                    .values()
                    .flat_map(|s| s.acked.iter().copied())
                    .collect(),
            )
        };
        match rewrite_ack_log(&self.dir, &*self.storage, high_water, acked.into_iter()) {
            Ok((f, len)) => {
                self.ack_file = f;
                self.ack_len = len;
                self.ack_dirty = false;
                self.compact_at = MIN_COMPACT_AT.max(len * 2);
            }
            Err(e) => {
                warn!(error = %e, "ack log compaction failed; retrying later");
                self.ack_dirty = true;
            }
        }
    }

    fn write_dead_letters(&mut self, dead: &[Box<DeadLetter>]) -> Result<(), QueueError> {
        let mut buf = Vec::new();
        for d in dead {
            buf.extend_from_slice(&record::encode_dead_letter(d));
        }
        let storage = &*self.storage;
        append_synced(storage, &mut self.dl_file, &mut self.dl_len, &buf).map_err(|e| {
            // The dead-letter list is a report, not the queue: keep it in memory, cut the
            // partial write so later entries stay parseable.
            warn!(error = %e, "dead-letter log write failed");
            let _ = storage.set_len(&self.dl_file, self.dl_len);
            QueueError::from_io(e)
        })
    }

    fn open_segment(&mut self) -> Result<(), QueueError> {
        let no = self.next_seg;
        let path = segment_path(&self.dir, no);
        // The number is used up even on failure: a half-created file must not be reused.
        self.next_seg += 1;
        let file = self.storage.create(&path).map_err(QueueError::from_io)?;
        // The directory entry must be durable before any record in it is acknowledged.
        if let Err(e) = self.storage.sync_dir(&self.dir) {
            let _ = fs::remove_file(&path);
            return Err(QueueError::from_io(e));
        }
        self.active = Some(ActiveSegment { no, file, len: 0 });
        Ok(())
    }

    /// Write the group's records, rolling segments as they fill. Each segment's chunk is
    /// one write plus one fdatasync; a failed chunk fails its records (and the rest of the
    /// group) and abandons the segment, since after a failed fsync its page state is unknown.
    #[allow(clippy::type_complexity)]
    fn write_appends(
        &mut self,
        appends: &mut [Pending],
    ) -> (Vec<Result<(u64, u64), QueueError>>, Vec<(u64, u64)>) {
        let mut results = Vec::with_capacity(appends.len());
        let mut touched = Vec::new();
        let mut i = 0;
        while i < appends.len() {
            if self.active.is_none()
                && let Err(e) = self.open_segment()
            {
                error!(error = %e, "cannot create a queue segment");
                for _ in i..appends.len() {
                    results.push(Err(e.duplicate()));
                }
                self.state().counters.write_errors += 1;
                break;
            }
            let seg = self.active.as_mut().expect("opened above");
            let start = seg.len;
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            if start == 0 {
                buf.extend_from_slice(SEGMENT_MAGIC);
            }
            let mut j = i;
            while j < appends.len() {
                let flen = appends[j].frame.len() as u64;
                let has_records = j > i || start > SEGMENT_MAGIC.len() as u64;
                if has_records && start + buf.len() as u64 + flen > self.segment_bytes {
                    break;
                }
                record::seal(&mut appends[j].frame);
                results.push(Ok((seg.no, start + buf.len() as u64)));
                buf.extend_from_slice(&appends[j].frame);
                j += 1;
            }
            let res = self
                .storage
                .write_all(&mut seg.file, &buf)
                .and_then(|_| self.storage.sync_data(&seg.file));
            let no = seg.no;
            match res {
                Ok(()) => {
                    seg.len = start + buf.len() as u64;
                    touched.push((no, seg.len));
                    if j < appends.len() {
                        // Full: the file is synced, the next chunk goes to a new segment.
                        self.active = None;
                    }
                }
                Err(e) => {
                    let e = QueueError::from_io(e);
                    error!(error = %e, segment = no, "queue append failed; abandoning segment");
                    // Best effort: cut the partial write so the file ends on a record boundary.
                    let _ = self.storage.set_len(&seg.file, start);
                    touched.push((no, start));
                    self.active = None;
                    results.truncate(i);
                    for _ in i..appends.len() {
                        results.push(Err(e.duplicate()));
                    }
                    self.state().counters.write_errors += 1;
                    self.buf = buf;
                    break;
                }
            }
            self.buf = buf;
            i = j;
        }
        (results, touched)
    }

    /// Unlink fully finished segments. A segment leaves the in-memory map only once its
    /// unlink succeeded, so the ack log keeps its acks for as long as the file exists.
    fn delete_segments(&mut self, doomed: &[u64]) {
        if doomed.is_empty() {
            return;
        }
        let mut removed = Vec::new();
        for &no in doomed {
            match fs::remove_file(segment_path(&self.dir, no)) {
                Ok(()) => removed.push(no),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => removed.push(no),
                Err(e) => warn!(segment = no, error = %e, "cannot delete finished segment"),
            }
        }
        if let Err(e) = self.storage.sync_dir(&self.dir) {
            warn!(error = %e, "cannot sync queue directory after deleting segments");
        }
        let mut st = self.state();
        for no in removed {
            st.segments.remove(&no);
        }
    }
}

/// Appends `buf` to `file` and `fdatasync`s it; `len` (what is durable of the file)
/// moves on only when both succeeded.
fn append_synced(
    storage: &dyn Storage,
    file: &mut File,
    len: &mut u64,
    buf: &[u8],
) -> std::io::Result<()> {
    storage.write_all(file, buf)?;
    storage.sync_data(file)?;
    *len += buf.len() as u64;
    Ok(())
}

fn cmd_bytes(c: &Cmd) -> usize {
    match c {
        Cmd::Append(p) => p.frame.len(),
        _ => 16,
    }
}
