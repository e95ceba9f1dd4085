//! misaki's xDS server: ADS, state-of-the-world and delta, on one gRPC service.
//!
//! The server knows nothing of policy: it asks a [`SnapshotSource`] for a node's
//! snapshot and follows it as it changes.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]

use std::sync::Arc;

use misaki_compiler::node::NodeInfo;
use misaki_compiler::snapshot::Snapshot;
use tokio::sync::watch;

/// Supplies each node's snapshot and tells the server when it changes.
///
/// The server calls `watch` once per stream, after the first request names the node.
/// The receiver's current value is the snapshot to serve now; every later value is a
/// push. Unchanged resources (same version) are not resent.
pub trait SnapshotSource: Send + Sync + 'static {
    fn watch(&self, node: &NodeInfo) -> watch::Receiver<Arc<Snapshot>>;
}
