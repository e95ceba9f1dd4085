//! # misaki-queue: edge-netd's durable store-and-forward queue
//!
//! Deferrable requests (telemetry uploads, logs, camera clips) are appended to an on-disk
//! log and answered `202 Accepted` only once fsync'd; a forwarder drains them later over an
//! allowed uplink, by class priority, and acks each one. Modelled on Vector's `disk_v2`
//! buffer (segment files, CRC32C per record, one writer, I/O behind a trait).
//!
//! ## Invariants
//!
//! - **Accepted means durable.** `enqueue` resolves `Ok` only after the record's bytes *and*
//!   the directory entry of its segment file were synced (`fdatasync` / directory `fsync`).
//!   A message that got `Ok` survives `kill -9` and power loss.
//! - **One writer.** A directory is used by one process (`lock` file, `flock` via
//!   `File::try_lock`) and within it by one thread, which owns every file write.
//! - **Ids are monotonic** for the life of the directory, also across restarts and across
//!   deletion of every segment (the ack log carries a high-water mark). Ids are allocated
//!   under the queue lock and sent to the writer under it, so file order is id order.
//! - **Every record carries a CRC32C** over its length and payload; nothing unverified is
//!   ever handed out.
//! - **Recovery never wedges.** A torn tail (an incomplete write at the end of the newest
//!   segment) is truncated; a bad region followed by a good record is skipped, counted in
//!   `corrupt_skipped`, and copied to `corrupt/`. Nobody has to delete files by hand.
//! - **At-least-once.** A message leaves the queue only through an ack (delivered, expired,
//!   evicted, dead-lettered, unreadable), and the ack is written to the ack log before its
//!   segment may be deleted. A crash between delivery and the ack's group commit resends;
//!   receivers dedupe by the idempotency key every message carries.
//! - **A segment file is deleted only when all its records are acked**, and it leaves the
//!   in-memory map (and so the ack log's rewrite) only after the unlink succeeded.
//! - **Full is an answer, not a crash.** Budget exhausted → [`QueueError::Full`]; ENOSPC/EIO
//!   from the disk → [`QueueError::DiskFull`]/[`QueueError::Io`] for that group only. The
//!   failed segment is abandoned, the next group starts a new one; reads keep working.
//! - **Eviction never takes from a class of equal or higher priority** than the incoming
//!   message, and never takes in-flight messages.
//!
//! ## On-disk format
//!
//! All integers little-endian.
//!
//! ```text
//! <dir>/
//!   lock                          flock'd while a process has the queue open
//!   seg-00000000000000000001.log  append-only segments, numbered, never reused
//!   acks.log                      fixed-size ack entries (rewritten compactly at open
//!                                 and when it grows past max(4 MiB, 2x its last size))
//!   deadletter.log                framed dead-letter entries (last N kept)
//!   corrupt/seg-<n>-at-<off>.bin  bytes skipped by recovery, kept for a human
//!
//! segment  := "MSKQSEG1" frame*
//! frame    := magic "MQR1" | len u32 | crc32c u32 (over len bytes ++ payload) | payload[len]
//! payload  := kind u8 (=1 message) | id u64 | enqueued_at_ms u64
//!             | expires_at_ms u64 (0 = never) | rank u8
//!             | class str8 | idempotency_key str16
//!             | service str16 | method str16 | path str16
//!             | n_headers u16 (name str16, value str16)*
//!             | body_len u32 | body
//! str8     := len u8  | utf-8 bytes      str16 := len u16 | utf-8 bytes
//!
//! acks.log := entry*            entry := crc32c u32 (over kind ++ id) | kind u8 | id u64
//!   kind: 0 high-water (next id to allocate; not an ack), 1 delivered, 2 expired,
//!         3 evicted, 4 dead-lettered, 5 unreadable
//!
//! deadletter.log := frame*      payload := id u64 | at_ms u64 | status u16 (0 = none)
//!                                          | class str8 | key, service, method, path,
//!                                            reason: str16
//! ```
//!
//! The record magic lets recovery resynchronise after a corrupt region: it searches for the
//! next offset where a frame with a matching checksum starts.
//!
//! ## Operations
//!
//! - **open** ([`Queue::open`]): take the lock (or [`OpenError::Locked`]); read `acks.log`
//!   into a set of finished ids; scan every segment in order, verifying each frame: a good
//!   record whose id is not acked is indexed; a bad region with a good frame after it is
//!   corruption; a bad region reaching the end of the newest segment is a torn tail and is
//!   truncated (no waiter was ever told it was durable). Segments with nothing live are
//!   deleted; `acks.log` is rewritten with the high-water mark and only the acks still
//!   needed. New records always go to a fresh segment.
//! - **enqueue** ([`Queue::enqueue`]): validate (size → [`QueueError::TooLarge`]); encode
//!   outside the lock; under the lock: budget check / eviction, allocate the id, send to the
//!   writer; await the group commit.
//! - **group commit** (writer thread): block for one command, take all others waiting (up
//!   to `max_group_bytes`), write the acks, the dead letters and the appends each with one
//!   `write`, `fdatasync` each file once, publish the new records, then complete every
//!   waiter. Segments roll at `segment_bytes`; a new segment's directory entry is synced
//!   before any record in it is acknowledged.
//! - **next_batch / ack / nack / dead_letter**: records are read back with `pread` and
//!   re-verified; a record that no longer verifies is dropped and counted (never wedges).
//!   In-flight messages are not persisted as such: after a restart they are ready again.
//! - **TTL**: `expires_at = enqueue time + (message ttl or class default)`. Expired
//!   messages are dropped (counted in `expired`) when they reach the head of their class in
//!   `next_batch`, and all at once by [`Queue::expire`], which edge-netd calls periodically.
//! - **Budget**: the budget counts frame bytes of live records (ready, in flight, being
//!   written). When an enqueue would exceed it, the oldest ready messages of the lowest
//!   class strictly below the incoming one are evicted (then the next lowest, ...), but only
//!   if that frees enough; otherwise [`QueueError::Full`] and nothing is evicted. Disk use can
//!   exceed the budget by partly acked segments (at most one segment per stuck record);
//!   smaller `segment_bytes` trade file count for less slack.
//!
//! ## Scheduling
//!
//! Classes are ordered by (rank, name); rank 0 is the highest priority. Among classes that
//! have ready messages and whose uplink `allowed` returns true, the first is served by
//! default (strict priority). Each *other* eligible class earns `min_share_percent` credit
//! per pick; a class reaching 100 is served instead and pays 100. So each non-empty lower
//! class gets at least `min_share_percent` % of picks (when the shares sum to at most 100),
//! and nothing starves. Credit resets while a class is empty or not allowed, so it cannot
//! hoard a burst. Within a class, order is FIFO by id; a nack'd message goes back to the head.
//!
//! ## Fault model
//!
//! The write path's calls (create, write, fdatasync, directory sync, truncate) go through
//! [`Storage`], which tests replace to inject ENOSPC and EIO.

mod clock;
mod command;
mod error;
mod io;
mod message;
mod queue;
mod record;
mod recovery;
mod state;
mod writer;

#[cfg(test)]
mod tests;

pub use crate::{
    clock::{Clock, ManualClock, SystemClock},
    error::{OpenError, QueueError},
    io::{StdStorage, Storage},
    message::{Accepted, Destination, Message, NewMessage},
    queue::{ClassDepth, Queue, QueueConfig, Stats},
    record::DeadLetter,
};
