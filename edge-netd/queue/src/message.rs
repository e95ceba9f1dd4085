//! The public shapes of a queued message.

use std::time::Duration;

/// Where the forwarder sends a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    /// Mesh service name.
    pub service: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers to replay, in order (a small list; names may repeat).
    pub headers: Vec<(String, String)>,
}

/// What an app hands to [`crate::Queue::enqueue`].
#[derive(Clone, Debug, Default)]
pub struct NewMessage {
    /// The app's `Idempotency-Key`; one is generated when absent.
    pub idempotency_key: Option<String>,
    /// Traffic class name (`critical`, `standard`, `bulk`, ...), at most 255 bytes.
    pub class: String,
    /// Priority rank of the class: 0 is the highest.
    pub rank: u8,
    /// Time to live from enqueue; `None` falls back to the class default, if any.
    pub ttl: Option<Duration>,
    pub destination: Destination,
    pub body: Vec<u8>,
}

/// A message handed to the forwarder by [`crate::Queue::next_batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Monotonic id, unique for the life of the queue directory.
    pub id: u64,
    pub idempotency_key: String,
    pub class: String,
    pub rank: u8,
    /// Unix ms, from the queue's clock.
    pub enqueued_at_ms: u64,
    /// Unix ms after which the message is dropped as expired.
    pub expires_at_ms: Option<u64>,
    pub destination: Destination,
    pub body: Vec<u8>,
    /// 1 on the first hand-out since the queue was opened, +1 per nack'd retry.
    pub attempt: u32,
}

/// The answer to an enqueue: the message is on disk and fsync'd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub id: u64,
    pub idempotency_key: String,
}
