//! The in-memory index over the log: which records are live, where they are, which class
//! they belong to, and the budget and scheduling decisions made from it.
//!
//! Everything here runs under the queue's one mutex and does no I/O except sending commands
//! to the writer thread (a channel send), so the lock is held for microseconds.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fs::File,
    sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc::Sender},
};

use crate::{
    command::Cmd,
    error::QueueError,
    record::{AckKind, DeadLetter},
};

/// What the queue's handle and its writer thread share: the state behind the one mutex.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
}

/// A poisoned lock means a panic elsewhere; the state is still consistent enough to serve
/// reads, and refusing would turn one bug into a wedged queue.
pub(crate) fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where one live record sits on disk.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) id: u64,
    pub(crate) seg: u64,
    pub(crate) offset: u64,
    /// Whole frame length; the unit of the byte budget.
    pub(crate) len: u32,
    pub(crate) expires_at: Option<u64>,
    /// Hand-outs since open (for `Message::attempt`).
    pub(crate) attempts: u32,
}

impl Entry {
    pub(crate) fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// One traffic class: its ready messages in id (= enqueue) order.
#[derive(Debug)]
pub(crate) struct ClassQueue {
    pub(crate) rank: u8,
    pub(crate) name: Arc<str>,
    pub(crate) ready: BTreeMap<u64, Entry>,
    pub(crate) ready_bytes: u64,
    pub(crate) in_flight: u64,
    pub(crate) in_flight_bytes: u64,
    /// Share-scheduler credit, in percent of a pick (see the crate doc, "Scheduling").
    pub(crate) credit: u32,
    /// Drops of this class since open (kept when the class drains, for reports).
    pub(crate) expired: u64,
    pub(crate) evicted: u64,
    pub(crate) dead_lettered: u64,
}

/// A message handed to the forwarder and not yet acked or nacked.
#[derive(Debug)]
pub(crate) struct InFlight {
    pub(crate) rank: u8,
    pub(crate) class: Arc<str>,
    pub(crate) entry: Entry,
    /// Filled once the record was read back; needed for the dead-letter entry.
    pub(crate) key: String,
    pub(crate) service: String,
    pub(crate) method: String,
    pub(crate) path: String,
}

/// Per segment file: how many of its records are live, and which are acked (the ack log
/// must keep those entries while the file exists).
#[derive(Debug, Default)]
pub(crate) struct SegMeta {
    pub(crate) live: u64,
    pub(crate) acked: Vec<u64>,
    pub(crate) bytes: u64,
}

/// Monotonic counters since open.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub(crate) accepted: u64,
    pub(crate) delivered: u64,
    pub(crate) expired: u64,
    pub(crate) evicted: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) nacked: u64,
    pub(crate) corrupt_skipped: u64,
    pub(crate) corrupt_bytes: u64,
    pub(crate) torn_tail_bytes: u64,
    pub(crate) write_errors: u64,
    pub(crate) group_commits: u64,
}

pub(crate) struct State {
    /// Sorted by (rank, name): index 0 is the highest priority.
    pub(crate) classes: Vec<ClassQueue>,
    pub(crate) in_flight: HashMap<u64, InFlight>,
    pub(crate) segments: BTreeMap<u64, SegMeta>,
    pub(crate) active_seg: Option<u64>,
    pub(crate) next_id: u64,
    /// Frame bytes of live (ready + in-flight) records.
    pub(crate) live_bytes: u64,
    /// Frame bytes sent to the writer and not yet committed or failed.
    pub(crate) reserved_bytes: u64,
    pub(crate) ack_log_bytes: u64,
    pub(crate) counters: Counters,
    pub(crate) dead_letters: VecDeque<DeadLetter>,
    pub(crate) dead_letter_keep: usize,
    /// Read-only handles for pread by `next_batch`; dropped when the segment is deleted.
    pub(crate) readers: HashMap<u64, Arc<File>>,
    /// Commands to the writer. Sent under this lock so appends reach the log in id order.
    /// `None` once the queue is closing.
    pub(crate) tx: Option<Sender<Cmd>>,
    pub(crate) budget_bytes: u64,
    pub(crate) min_share_percent: u32,
}

impl State {
    pub(crate) fn send(&self, cmd: Cmd) -> Result<(), QueueError> {
        match &self.tx {
            Some(tx) => tx.send(cmd).map_err(|_| QueueError::Closed),
            None => Err(QueueError::Closed),
        }
    }

    /// Index of the class, creating it in priority order if new.
    pub(crate) fn class_idx(&mut self, rank: u8, name: &str) -> usize {
        match self
            .classes
            .binary_search_by(|c| (c.rank, &*c.name).cmp(&(rank, name)))
        {
            Ok(i) => i,
            Err(i) => {
                self.classes.insert(
                    i,
                    ClassQueue {
                        rank,
                        name: Arc::from(name),
                        ready: BTreeMap::new(),
                        ready_bytes: 0,
                        in_flight: 0,
                        in_flight_bytes: 0,
                        credit: 0,
                        expired: 0,
                        evicted: 0,
                        dead_lettered: 0,
                    },
                );
                i
            }
        }
    }

    /// A committed record becomes visible to readers.
    pub(crate) fn insert_ready(&mut self, rank: u8, class: &str, entry: Entry) {
        let i = self.class_idx(rank, class);
        let seg = self.segments.entry(entry.seg).or_default();
        seg.live += 1;
        self.live_bytes += u64::from(entry.len);
        let c = &mut self.classes[i];
        c.ready_bytes += u64::from(entry.len);
        c.ready.insert(entry.id, entry);
    }

    /// A live record leaves the queue for good: account for it and log the ack.
    /// The caller already removed it from its ready/in-flight container.
    fn release(&mut self, class: usize, entry: &Entry, kind: AckKind) {
        self.live_bytes -= u64::from(entry.len);
        let cq = &mut self.classes[class];
        match kind {
            AckKind::Expired => cq.expired += 1,
            AckKind::Evicted => cq.evicted += 1,
            AckKind::DeadLettered => cq.dead_lettered += 1,
            _ => {}
        }
        if let Some(seg) = self.segments.get_mut(&entry.seg) {
            seg.live -= 1;
            seg.acked.push(entry.id);
        }
        let c = &mut self.counters;
        match kind {
            AckKind::Delivered => c.delivered += 1,
            AckKind::Expired => c.expired += 1,
            AckKind::Evicted => c.evicted += 1,
            AckKind::DeadLettered => c.dead_lettered += 1,
            AckKind::Unreadable => c.corrupt_skipped += 1,
            AckKind::HighWater => {}
        }
        // If the writer is gone the ack is lost, which only means a resend after restart.
        let _ = self.send(Cmd::Ack(kind, entry.id));
    }

    fn pop_ready(&mut self, i: usize) -> Option<Entry> {
        let c = &mut self.classes[i];
        let (_, e) = c.ready.pop_first()?;
        c.ready_bytes -= u64::from(e.len);
        Some(e)
    }

    /// Drop expired messages at the head of class `i`.
    fn expire_front(&mut self, i: usize, now: u64) {
        while self.classes[i]
            .ready
            .first_key_value()
            .is_some_and(|(_, e)| e.expired(now))
        {
            let e = self.pop_ready(i).expect("non-empty");
            self.release(i, &e, AckKind::Expired);
        }
    }

    /// Sweep every ready message for expiry; returns how many were dropped.
    pub(crate) fn expire_all(&mut self, now: u64) -> usize {
        let mut dropped = Vec::new();
        for (i, c) in self.classes.iter_mut().enumerate() {
            let ids: Vec<u64> = c
                .ready
                .values()
                .filter(|e| e.expired(now))
                .map(|e| e.id)
                .collect();
            for id in ids {
                let e = c.ready.remove(&id).expect("present");
                c.ready_bytes -= u64::from(e.len);
                dropped.push((i, e));
            }
        }
        for (i, e) in &dropped {
            self.release(*i, e, AckKind::Expired);
        }
        dropped.len()
    }

    /// Pick the next message to hand out among classes `allowed` says may send now.
    ///
    /// Strict priority with a guaranteed share: every eligible class below the top one
    /// earns `min_share_percent` credit per pick; one that reaches 100 is served (and pays
    /// 100). Credit is reset while a class is empty or not allowed, so a class cannot save
    /// up a burst while it has nothing to send.
    pub(crate) fn pick(
        &mut self,
        allowed: &dyn Fn(&str) -> bool,
        now: u64,
    ) -> Option<(usize, Entry)> {
        let mut eligible = Vec::with_capacity(self.classes.len());
        for i in 0..self.classes.len() {
            let ok = !self.classes[i].ready.is_empty() && allowed(&self.classes[i].name);
            if ok {
                self.expire_front(i, now);
            }
            if ok && !self.classes[i].ready.is_empty() {
                eligible.push(i);
            } else {
                self.classes[i].credit = 0;
            }
        }
        let (&top, lower) = eligible.split_first()?;
        self.classes[top].credit = 0;
        let mut chosen = top;
        let mut best = 0;
        for &i in lower {
            let c = &mut self.classes[i];
            c.credit += self.min_share_percent;
            // Strictly greater: ties go to the higher-priority class (earlier in order).
            if c.credit >= 100 && c.credit > best {
                best = c.credit;
                chosen = i;
            }
        }
        if chosen != top {
            self.classes[chosen].credit -= 100;
        }
        let e = self.pop_ready(chosen)?;
        Some((chosen, e))
    }

    /// Move a picked entry to in-flight.
    pub(crate) fn hand_out(&mut self, class_idx: usize, mut entry: Entry) -> Entry {
        entry.attempts += 1;
        let c = &mut self.classes[class_idx];
        c.in_flight += 1;
        c.in_flight_bytes += u64::from(entry.len);
        self.in_flight.insert(
            entry.id,
            InFlight {
                rank: c.rank,
                class: c.name.clone(),
                entry: entry.clone(),
                key: String::new(),
                service: String::new(),
                method: String::new(),
                path: String::new(),
            },
        );
        entry
    }

    /// Take a message out of in-flight, fixing up its class's in-flight accounting.
    pub(crate) fn take_in_flight(&mut self, id: u64) -> Option<(usize, InFlight)> {
        let f = self.in_flight.remove(&id)?;
        let i = self.class_idx(f.rank, &f.class);
        let c = &mut self.classes[i];
        c.in_flight -= 1;
        c.in_flight_bytes -= u64::from(f.entry.len);
        Some((i, f))
    }

    pub(crate) fn finish(&mut self, id: u64, kind: AckKind) -> Option<InFlight> {
        let (i, f) = self.take_in_flight(id)?;
        self.release(i, &f.entry, kind);
        Some(f)
    }

    pub(crate) fn nack(&mut self, id: u64) -> bool {
        let Some((i, f)) = self.take_in_flight(id) else {
            return false;
        };
        let c = &mut self.classes[i];
        c.ready_bytes += u64::from(f.entry.len);
        c.ready.insert(id, f.entry);
        self.counters.nacked += 1;
        true
    }

    /// Make room for `needed` more bytes by evicting the oldest ready messages of classes
    /// strictly below `rank`, lowest priority first. Evicts nothing unless that is enough.
    pub(crate) fn make_room(&mut self, rank: u8, needed: u64) -> Result<(), QueueError> {
        let used = self.live_bytes + self.reserved_bytes;
        if used + needed <= self.budget_bytes {
            return Ok(());
        }
        let over = used + needed - self.budget_bytes;
        let evictable: u64 = self
            .classes
            .iter()
            .filter(|c| c.rank > rank)
            .map(|c| c.ready_bytes)
            .sum();
        if evictable < over {
            return Err(QueueError::Full {
                needed,
                used,
                budget: self.budget_bytes,
            });
        }
        let mut freed = 0;
        for i in (0..self.classes.len()).rev() {
            if self.classes[i].rank <= rank {
                break;
            }
            while freed < over {
                let Some(e) = self.pop_ready(i) else { break };
                freed += u64::from(e.len);
                self.release(i, &e, AckKind::Evicted);
            }
        }
        Ok(())
    }

    pub(crate) fn push_dead_letter(&mut self, d: DeadLetter) {
        if self.dead_letters.len() >= self.dead_letter_keep {
            self.dead_letters.pop_front();
        }
        self.dead_letters.push_back(d);
    }
}
