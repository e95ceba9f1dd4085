//! Typed errors; each maps to one HTTP status for the store-and-forward endpoint.

use std::{io, path::PathBuf};

/// Failure to open (lock + recover) a queue directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("queue directory {path} is locked by another process")]
    Locked { path: PathBuf },
    #[error("queue directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid queue config: {0}")]
    Config(&'static str),
}

/// Failure of one enqueue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The body exceeds `max_body_bytes`.
    #[error("message body is {size} bytes, the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The byte budget is used up and nothing of lower priority may be evicted.
    #[error("queue budget full: {needed} bytes needed, {used} of {budget} in use")]
    Full { needed: u64, used: u64, budget: u64 },
    /// The disk said ENOSPC/EDQUOT while writing or syncing.
    #[error("disk full while writing the queue: {0}")]
    DiskFull(#[source] io::Error),
    /// Any other I/O failure while writing or syncing (EIO, ...); the message was not accepted.
    #[error("queue write failed: {0}")]
    Io(#[source] io::Error),
    /// A field does not fit the record format.
    #[error("invalid message field {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
    /// The queue is shutting down.
    #[error("queue is closed")]
    Closed,
}

impl QueueError {
    /// The HTTP status the store-and-forward endpoint answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            Self::Full { .. } | Self::DiskFull(_) => 507,
            Self::Invalid { .. } => 400,
            Self::Io(_) | Self::Closed => 503,
        }
    }

    pub(crate) fn from_io(e: io::Error) -> Self {
        // ENOSPC (28) and EDQUOT (122) both mean "no room": the app should back off, not retry now.
        if e.kind() == io::ErrorKind::StorageFull
            || e.kind() == io::ErrorKind::QuotaExceeded
            || matches!(e.raw_os_error(), Some(28) | Some(122))
        {
            Self::DiskFull(e)
        } else {
            Self::Io(e)
        }
    }

    /// A copy for fanning one group's failure out to every waiter in it.
    pub(crate) fn duplicate(&self) -> Self {
        let copy_io = |e: &io::Error| match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        match self {
            Self::TooLarge { size, limit } => Self::TooLarge {
                size: *size,
                limit: *limit,
            },
            Self::Full {
                needed,
                used,
                budget,
            } => Self::Full {
                needed: *needed,
                used: *used,
                budget: *budget,
            },
            Self::DiskFull(e) => Self::DiskFull(copy_io(e)),
            Self::Io(e) => Self::Io(copy_io(e)),
            Self::Invalid { field, reason } => Self::Invalid { field, reason },
            Self::Closed => Self::Closed,
        }
    }
}
