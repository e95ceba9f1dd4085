//! What the queue asks of its writer thread: the commands sent over the channel that
//! [`crate::state::State`] holds and [`crate::writer::Writer`] drains. A module of its own
//! so that both ends import it and neither imports the other.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::{
    error::QueueError,
    message::Accepted,
    record::{AckKind, DeadLetter},
};

/// An encoded message waiting for its group.
pub(crate) struct Pending {
    pub(crate) id: u64,
    pub(crate) rank: u8,
    pub(crate) class: Arc<str>,
    pub(crate) key: String,
    pub(crate) expires_at: Option<u64>,
    /// Id patched in, checksum not yet computed ([`crate::record::seal`] runs in the writer).
    pub(crate) frame: Vec<u8>,
    pub(crate) waiter: oneshot::Sender<Result<Accepted, QueueError>>,
}

pub(crate) enum Cmd {
    Append(Pending),
    Ack(AckKind, u64),
    DeadLetter(Box<DeadLetter>),
    /// Completed once everything sent before it is durable.
    Flush(oneshot::Sender<Result<(), QueueError>>),
}
