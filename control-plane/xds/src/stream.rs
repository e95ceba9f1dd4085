//! The per-stream task shared by both ADS variants.
//!
//! Invariants:
//! - exactly one tokio task per stream owns that stream's protocol state; nothing else
//!   touches it, so it needs no lock;
//! - the task talks to the client through a small bounded channel: a slow client
//!   blocks only its own task, and while it is blocked the snapshot `watch` keeps
//!   only the newest value, so bursts coalesce and a fleet-wide change never waits on
//!   any single stream;
//! - responses hold the snapshot's `Arc<Resource>`s until the ADS service sends them
//!   around each resource's shared pre-encoded bytes: no stream copies a body into an
//!   `Any` or encodes a resource itself;
//! - the stream ends with `UNAVAILABLE` when the server drains, so a graceful
//!   shutdown never waits on a long-lived stream (Envoy reconnects elsewhere);
//! - over mutual TLS (the request carries a [`TlsPeer`]) the node's role and effective
//!   vehicle id must be what the peer certificate says ([`misaki_identity::authorize`]),
//!   else the stream ends with `PERMISSION_DENIED` before anything is served; without
//!   TLS the node is taken at its word, as before.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::{ResourceType, SharedStr, Snapshot};
use misaki_identity::{Claimed, TlsPeer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::SnapshotSource;
use crate::metrics::Metrics;
use crate::status::{NackRecord, StreamHandle, StreamKind, StreamRegistry};
use crate::wire::WireMessage;

/// Responses queued per stream before the stream's task waits for the client. Enough
/// for one full push (CDS, EDS, LDS, SRDS, RDS and the final CDS and EDS removals)
/// without waiting.
const STREAM_BUFFER: usize = 7;

/// What the per-stream channel carries. Boxed: tokio's channel allocates its slots
/// 32 at a time whatever its capacity, so a pointer-sized item keeps that block at a
/// few hundred bytes per stream instead of 32 whole replies (`Status` is a box too).
type Queued<P> = Result<Box<<P as Protocol>::Out>, Status>;

/// Everything a protocol state machine may record about its stream.
#[derive(Debug)]
pub(crate) struct StreamCtx {
    pub node_id: String,
    pub status: StreamHandle,
    pub metrics: Metrics,
}

impl StreamCtx {
    pub fn pushed(&self, t: ResourceType, version: &SharedStr, bytes: usize) {
        let m = self.metrics.of(t);
        m.pushes.inc();
        m.push_bytes.inc_by(bytes as u64);
        self.status.sent(t, version);
        debug!(
            r#type = t.short(),
            version = version.as_str(),
            bytes,
            "push"
        );
    }

    pub fn acked(&self, t: ResourceType, version: &SharedStr) {
        self.metrics.of(t).acks.inc();
        self.status.acked(t, version);
        debug!(r#type = t.short(), version = version.as_str(), "ack");
    }

    /// NACKs are data: log them with everything an operator needs, count them, and keep
    /// the last one per type for `/nodes`.
    pub fn nacked(&self, t: ResourceType, version: Option<&str>, nonce: &str, err: &RpcStatus) {
        self.metrics.of(t).nacks.inc();
        warn!(
            node = %self.node_id,
            type_url = t.type_url(),
            version = version.unwrap_or("(unknown: stale nonce)"),
            nonce,
            code = err.code,
            error_detail = %err.message,
            "client rejected xDS response (NACK)"
        );
        self.status.nacked(
            t,
            NackRecord {
                version: version.map(str::to_string),
                nonce: nonce.to_string(),
                message: err.message.clone(),
                at: SystemTime::now(),
            },
        );
    }

    pub fn stale(&self, t: ResourceType, nonce: &str) {
        self.metrics.of(t).stale.inc();
        debug!(r#type = t.short(), nonce, "stale nonce: request ignored");
    }

    /// A context for driving a state machine in unit tests, with its own registry.
    #[cfg(test)]
    pub fn for_test(kind: StreamKind) -> Self {
        Self::for_test_in(kind, &StreamRegistry::new())
    }

    /// A context for unit tests whose stream is listed in `registry`.
    #[cfg(test)]
    pub fn for_test_in(kind: StreamKind, registry: &StreamRegistry) -> Self {
        let node = NodeInfo {
            id: "car-1".into(),
            role: misaki_compiler::node::Role::Vehicle,
            vehicle_id: Some("car-1".into()),
            proxyless: false,
            delta: kind == StreamKind::Delta,
            tls_dir: None,
        };
        StreamCtx {
            node_id: node.id.clone(),
            status: registry.register(node, kind),
            metrics: Metrics::default(),
        }
    }
}

/// One ADS variant's per-stream protocol state machine.
///
/// Both methods return the responses to send, in order. They are synchronous and do
/// no I/O: the task around them does the waiting.
pub(crate) trait Protocol: Sized + Send + 'static {
    type Req: prost::Message + Default + Send + 'static;
    /// A decided response that still shares its bodies with the snapshot; the ADS
    /// service sends it as it is ([`WireMessage`]).
    type Out: WireMessage + Send + 'static;
    const KIND: StreamKind;

    fn node(req: &Self::Req) -> Option<&Node>;
    fn new(snapshot: Arc<Snapshot>) -> Self;
    fn on_request(&mut self, req: Self::Req, ctx: &StreamCtx) -> Vec<Self::Out>;
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, ctx: &StreamCtx) -> Vec<Self::Out>;
}

/// What a stream task needs from the server.
#[derive(Clone)]
pub(crate) struct Shared {
    pub source: Arc<dyn SnapshotSource>,
    pub registry: StreamRegistry,
    pub metrics: Metrics,
    pub drain: watch::Receiver<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// The replies the ADS service sends, then the status the stream ends with (if not OK).
pub type ResponseStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send + 'static>>;

/// Start the task for one stream and return the stream of decided responses the ADS
/// service sends (around the shared pre-encoded resource bytes).
pub(crate) fn spawn_replies<P: Protocol>(
    shared: Shared,
    peer: Option<TlsPeer>,
    requests: Streaming<P::Req>,
) -> ResponseStream<P::Out> {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let span = info_span!("xds_stream", kind = P::KIND.as_str(), node = field::Empty);
    tokio::spawn(run::<P>(shared, peer, requests, tx).instrument(span));
    Box::pin(ReceiverStream::new(rx).map(|r: Queued<P>| r.map(|out| *out)))
}

/// Why a stream ended; logged once when it does.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("client closed the stream")]
    ClientClosed,
    #[error("client went away (response channel closed)")]
    ClientGone,
    #[error("server is draining")]
    Drained,
    #[error("transport error: {0}")]
    Transport(Status),
    #[error("invalid node: {0}")]
    Node(#[from] misaki_compiler::node::NodeError),
    #[error("{0}")]
    Denied(String),
}

/// Whether the verified peer (if the stream came over mutual TLS) may be `node`; the
/// error names the certificate's identity and the node's claim.
fn authorize(peer: Option<&TlsPeer>, node: &NodeInfo) -> Result<(), String> {
    let Some(peer) = peer else {
        return Ok(());
    };
    let claimed = match (node.role, node.vehicle_id.as_deref()) {
        (Role::Vehicle, Some(v)) => Claimed::Vehicle(v),
        // NodeInfo always has a vehicle id for a vehicle; an empty one matches nothing.
        (Role::Vehicle, None) => Claimed::Vehicle(""),
        (Role::Cloud, _) => Claimed::Cloud,
    };
    misaki_identity::authorize(&peer.identity, claimed)
        .map_err(|denied| format!("node {:?}: {denied}", node.id))
}

/// Wait for drain; if the drain sender is gone (server dropped), never.
async fn drained(drain: &mut watch::Receiver<bool>) {
    if drain.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run<P: Protocol>(
    shared: Shared,
    peer: Option<TlsPeer>,
    requests: Streaming<P::Req>,
    tx: mpsc::Sender<Queued<P>>,
) {
    let mut drain = shared.drain.clone();
    let gauge = shared.metrics.streams(P::KIND).clone();
    gauge.inc();
    let end = serve::<P>(shared, peer, &mut drain, requests, &tx).await;
    gauge.dec();
    match &end {
        // try_send: a client too slow to have room for the final status must not hold
        // up shutdown; dropping `tx` still ends its stream.
        StreamEnd::Drained => {
            let _ = tx.try_send(Err(Status::unavailable(
                "misaki control plane is shutting down; reconnect",
            )));
        }
        StreamEnd::Node(e) => {
            let _ = tx.try_send(Err(Status::invalid_argument(e.to_string())));
        }
        StreamEnd::Denied(why) => {
            let _ = tx.try_send(Err(Status::permission_denied(why.clone())));
        }
        StreamEnd::Transport(_) | StreamEnd::ClientClosed | StreamEnd::ClientGone => {}
    }
    match end {
        StreamEnd::Node(e) => warn!(error = %e, "refused xDS stream"),
        StreamEnd::Denied(why) => warn!(reason = %why, "refused xDS stream: identity"),
        StreamEnd::Transport(e) => info!(error = %e, "xDS stream ended"),
        e => info!(reason = %e, "xDS stream ended"),
    }
}

/// Wait for the stream's first request, which names the node (nothing can be served
/// before it), and check that node against the verified peer.
async fn accept<P: Protocol>(
    shared: &Shared,
    peer: Option<&TlsPeer>,
    drain: &mut watch::Receiver<bool>,
    requests: &mut Streaming<P::Req>,
) -> Result<(P::Req, NodeInfo), StreamEnd> {
    let first = tokio::select! {
        biased;
        _ = drained(drain) => return Err(StreamEnd::Drained),
        msg = requests.message() => match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Err(StreamEnd::ClientClosed),
            Err(s) => return Err(StreamEnd::Transport(s)),
        },
    };
    let node = match NodeInfo::from_node(P::node(&first)) {
        Ok(n) => NodeInfo {
            delta: P::KIND == StreamKind::Delta,
            ..n
        },
        Err(e) => {
            shared.metrics.node_error();
            return Err(e.into());
        }
    };
    tracing::Span::current().record("node", field::display(&node.id));
    if let Err(why) = authorize(peer, &node) {
        shared.metrics.identity_denied();
        return Err(StreamEnd::Denied(why));
    }
    Ok((first, node))
}

async fn serve<P: Protocol>(
    shared: Shared,
    peer: Option<TlsPeer>,
    drain: &mut watch::Receiver<bool>,
    mut requests: Streaming<P::Req>,
    tx: &mpsc::Sender<Queued<P>>,
) -> StreamEnd {
    let (first, node) = match accept::<P>(&shared, peer.as_ref(), drain, &mut requests).await {
        Ok(accepted) => accepted,
        Err(end) => return end,
    };
    let identity = peer.as_ref().and_then(TlsPeer::identity_uri);
    info!(role = node.role.as_str(), vehicle = ?node.vehicle_id, identity = ?identity, "xDS stream connected");

    let Shared {
        source,
        registry,
        metrics,
        ..
    } = shared;
    let mut snapshots = source.watch(&node);
    let ctx = StreamCtx {
        node_id: node.id.clone(),
        status: registry.register_verified(node, P::KIND, identity),
        metrics,
    };
    let mut state = P::new(snapshots.borrow_and_update().clone());
    let mut source_open = true;
    let mut pending = Some(first);

    loop {
        let out = if let Some(req) = pending.take() {
            state.on_request(req, &ctx)
        } else {
            tokio::select! {
                biased;
                _ = drained(drain) => return StreamEnd::Drained,
                msg = requests.message() => match msg {
                    Ok(Some(r)) => state.on_request(r, &ctx),
                    Ok(None) => return StreamEnd::ClientClosed,
                    Err(s) => return StreamEnd::Transport(s),
                },
                changed = snapshots.changed(), if source_open => match changed {
                    Ok(()) => {
                        let snap = snapshots.borrow_and_update().clone();
                        state.on_snapshot(snap, &ctx)
                    }
                    Err(_) => {
                        // The source dropped this node's sender: keep serving the last
                        // snapshot (requests still need answers) but stop polling it.
                        debug!("snapshot source closed");
                        source_open = false;
                        Vec::new()
                    }
                },
            }
        };
        for resp in out {
            tokio::select! {
                biased;
                _ = drained(drain) => return StreamEnd::Drained,
                sent = tx.send(Ok(Box::new(resp))) => if sent.is_err() {
                    return StreamEnd::ClientGone;
                },
            }
        }
    }
}
