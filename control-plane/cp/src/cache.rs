//! The snapshot cache: compiled snapshots per compile key, followed by xDS streams.
//!
//! Invariants:
//! - nodes with the same [`CompileKey`] share one `Arc<Snapshot>` and one watch
//!   channel, so a fleet of identical vehicles costs one compilation and one copy of
//!   every resource, not one per vehicle;
//! - a policy change recompiles only keys that have live streams, and a key's
//!   watchers are woken only if its snapshot actually changed (by versions), so only
//!   the nodes a change affects get pushes;
//! - the cache never holds a snapshot compiled from an invalid policy: it only ever
//!   sees validated [`Policy`] values.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::Snapshot;
use misaki_policy::Policy;
use misaki_xds::SnapshotSource;
use tokio::sync::watch;

/// What a node's snapshot depends on besides the policy: the role, whether the client
/// is proxyless gRPC, whether it speaks delta xDS (vehicle Envoys on delta take
/// undeclared services on demand), and where its certificates are (data-plane mTLS
/// names its file-based SDS files; the same for a whole fleet unless set per node).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompileKey {
    pub role: Role,
    pub proxyless: bool,
    pub delta: bool,
    pub tls_dir: Option<String>,
}

impl CompileKey {
    pub fn of(node: &NodeInfo) -> Self {
        CompileKey {
            role: node.role,
            proxyless: node.proxyless,
            delta: node.delta,
            tls_dir: node.tls_dir.clone(),
        }
    }

    /// A representative node for compiling this key.
    fn node(&self) -> NodeInfo {
        NodeInfo {
            id: String::new(),
            role: self.role,
            vehicle_id: None,
            proxyless: self.proxyless,
            delta: self.delta,
            tls_dir: self.tls_dir.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner {
    policy: Arc<Policy>,
    entries: HashMap<CompileKey, watch::Sender<Arc<Snapshot>>>,
}

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    prefix: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

impl SnapshotCache {
    /// `prefix` makes resource versions unique to this server instance.
    pub fn new(policy: Arc<Policy>, prefix: impl Into<Arc<str>>) -> Self {
        SnapshotCache {
            prefix: prefix.into(),
            inner: Arc::new(Mutex::new(Inner {
                policy,
                entries: HashMap::new(),
            })),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.inner.lock().expect("cache lock").policy.clone()
    }

    /// Put a new policy in force; returns how many compile keys got a changed snapshot.
    pub fn set_policy(&self, policy: Arc<Policy>) -> usize {
        let mut inner = self.inner.lock().expect("cache lock");
        inner.policy = policy;
        // Forget keys nobody follows any more rather than recompiling them.
        inner.entries.retain(|_, tx| tx.receiver_count() > 0);
        let mut changed = 0;
        let policy = inner.policy.clone();
        for (key, tx) in &inner.entries {
            let snap = misaki_compiler::compile(&policy, &key.node(), &self.prefix);
            let updated = tx.send_if_modified(|cur| Snapshot::replace_if_changed(cur, snap));
            changed += usize::from(updated);
        }
        changed
    }
}

impl SnapshotSource for SnapshotCache {
    fn watch(&self, node: &NodeInfo) -> watch::Receiver<Arc<Snapshot>> {
        let key = CompileKey::of(node);
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some(tx) = inner.entries.get(&key) {
            return tx.subscribe();
        }
        let snap = misaki_compiler::compile(&inner.policy, &key.node(), &self.prefix);
        let (tx, rx) = watch::channel(Arc::new(snap));
        inner.entries.insert(key, tx);
        rx
    }
}
