//! Per-stream status for the admin API (`/nodes`).
//!
//! Invariants:
//! - one entry per live ADS stream; the entry is removed when the stream's task ends
//!   (the [`StreamHandle`] removes it on drop, so no exit path can leak one);
//! - the registry-wide lock is taken only to add, remove or list streams; a stream
//!   updates its own entry under its own lock, so a fleet-wide push does not
//!   serialise 10,000 streams on one mutex;
//! - a stream that came over mutual TLS is listed with the identity its certificate
//!   proved (`identity` on `/nodes`; null over plaintext);
//! - times are wall-clock (`SystemTime`) because operators read them; nothing in the
//!   protocol logic depends on them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use misaki_compiler::node::NodeInfo;
use misaki_compiler::snapshot::{ResourceType, SharedStr};
use serde_json::{Value, json};

/// Which ADS variant a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
    /// Incremental (`DeltaAggregatedResources`).
    Delta,
}

impl StreamKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            StreamKind::Sotw => "sotw",
            StreamKind::Delta => "delta",
        }
    }
}

/// A rejected response, as the client reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackRecord {
    /// The version the client rejected; `None` when the NACK named an older nonce
    /// whose version this stream no longer remembers.
    pub version: Option<String>,
    pub nonce: String,
    pub message: String,
    pub at: SystemTime,
}

/// What one stream has sent and heard back for one resource type. Versions are
/// shared with the snapshot (or the stream's state), not copied per stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeStatus {
    pub last_sent: Option<SharedStr>,
    pub last_acked: Option<SharedStr>,
    pub last_nack: Option<NackRecord>,
}

/// The status of one live stream.
#[derive(Debug, Clone)]
pub struct StreamStatus {
    pub node: NodeInfo,
    pub kind: StreamKind,
    pub connected_since: SystemTime,
    pub types: [TypeStatus; ResourceType::COUNT],
}

type Entry = Arc<Mutex<StreamStatus>>;

/// A listed stream: its status, and the peer identity verified when it connected
/// (kept beside [`StreamStatus`], which edge-netd builds and reports too).
#[derive(Debug)]
struct Listed {
    status: Entry,
    identity: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, Listed>>,
}

/// All live xDS streams. Cheap to clone: clones share one registry.
#[derive(Debug, Clone, Default)]
pub struct StreamRegistry {
    inner: Arc<Inner>,
}

/// A poisoned lock only means another stream's task panicked mid-update; the status
/// is still the best information there is, so keep serving it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StreamRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a stream; it stays listed until the returned handle is dropped.
    pub fn register(&self, node: NodeInfo, kind: StreamKind) -> StreamHandle {
        self.register_verified(node, kind, None)
    }

    /// [`Self::register`] for a stream whose peer proved `identity` (a SPIFFE ID).
    pub fn register_verified(
        &self,
        node: NodeInfo,
        kind: StreamKind,
        identity: Option<String>,
    ) -> StreamHandle {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Mutex::new(StreamStatus {
            node,
            kind,
            connected_since: SystemTime::now(),
            types: Default::default(),
        }));
        let listed = Listed {
            status: entry.clone(),
            identity: identity.map(Arc::from),
        };
        lock(&self.inner.streams).insert(id, listed);
        StreamHandle {
            id,
            entry,
            registry: self.inner.clone(),
        }
    }

    /// Number of live streams.
    pub fn len(&self) -> usize {
        lock(&self.inner.streams).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every live stream's status, in connection order.
    pub fn snapshot(&self) -> Vec<StreamStatus> {
        // Clone the entry handles first so the registry lock is not held while each
        // stream's own lock is taken.
        let entries: Vec<Entry> = lock(&self.inner.streams)
            .values()
            .map(|l| l.status.clone())
            .collect();
        entries.iter().map(|e| lock(e).clone()).collect()
    }

    /// The `/nodes` document: one object per live stream.
    pub fn to_json(&self) -> Value {
        let entries: Vec<(Entry, Option<Arc<str>>)> = lock(&self.inner.streams)
            .values()
            .map(|l| (l.status.clone(), l.identity.clone()))
            .collect();
        let streams: Vec<Value> = entries
            .iter()
            .map(|(e, identity)| status_json(&lock(e), identity.as_deref()))
            .collect();
        json!({ "streams": streams })
    }
}

fn status_json(s: &StreamStatus, identity: Option<&str>) -> Value {
    let mut types = serde_json::Map::new();
    for t in ResourceType::PUSH_ORDER {
        let ts = &s.types[t.index()];
        types.insert(
            t.short().to_string(),
            json!({
                "type_url": t.type_url(),
                "last_sent_version": ts.last_sent.as_deref(),
                "last_acked_version": ts.last_acked.as_deref(),
                "last_nack": ts.last_nack.as_ref().map(|n| json!({
                    "version": n.version,
                    "nonce": n.nonce,
                    "message": n.message,
                    "at_unix_ms": unix_ms(n.at),
                })),
            }),
        );
    }
    json!({
        "node_id": s.node.id,
        "role": s.node.role.as_str(),
        "vehicle_id": s.node.vehicle_id,
        "identity": identity,
        "kind": s.kind.as_str(),
        "connected_since_unix_ms": unix_ms(s.connected_since),
        "types": types,
    })
}

/// One stream's entry in the registry; removes it when dropped.
#[derive(Debug)]
pub struct StreamHandle {
    id: u64,
    entry: Entry,
    registry: Arc<Inner>,
}

impl StreamHandle {
    pub(crate) fn sent(&self, t: ResourceType, version: &SharedStr) {
        lock(&self.entry).types[t.index()].last_sent = Some(version.clone());
    }

    pub(crate) fn acked(&self, t: ResourceType, version: &SharedStr) {
        lock(&self.entry).types[t.index()].last_acked = Some(version.clone());
    }

    pub(crate) fn nacked(&self, t: ResourceType, nack: NackRecord) {
        lock(&self.entry).types[t.index()].last_nack = Some(nack);
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        lock(&self.registry.streams).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use misaki_compiler::node::Role;

    fn node() -> NodeInfo {
        NodeInfo {
            id: "car-1".into(),
            role: Role::Vehicle,
            vehicle_id: Some("car-1".into()),
            proxyless: false,
            delta: false,
            tls_dir: None,
        }
    }

    #[test]
    fn entry_lives_exactly_as_long_as_its_handle() {
        let reg = StreamRegistry::new();
        let h = reg.register(node(), StreamKind::Delta);
        h.sent(ResourceType::Cluster, &"v1".into());
        h.acked(ResourceType::Cluster, &"v1".into());
        let j = reg.to_json();
        assert_eq!(j["streams"][0]["kind"], "delta");
        assert_eq!(j["streams"][0]["types"]["cds"]["last_acked_version"], "v1");
        assert_eq!(j["streams"][0]["types"]["eds"]["last_nack"], Value::Null);
        assert_eq!(j["streams"][0]["identity"], Value::Null);
        let verified = reg.register_verified(
            node(),
            StreamKind::Sotw,
            Some("spiffe://misaki.local/vehicle/car-1".into()),
        );
        let j = reg.to_json();
        assert_eq!(
            j["streams"][1]["identity"],
            "spiffe://misaki.local/vehicle/car-1"
        );
        drop((h, verified));
        assert!(reg.is_empty());
    }
}
