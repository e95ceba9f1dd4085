//! Simulated vehicle sidecars: one ADS stream each, behaving like Envoy.
//!
//! What "like Envoy" means here (and why):
//! - the first request on a stream carries the node (`set_node_on_first_message_only`,
//!   as misaki's vehicle bootstrap sets it); node.id `veh-{i}`, cluster `vehicle`;
//! - CDS and LDS are wildcard subscriptions; EDS follows the EDS clusters of the
//!   latest accepted CDS; RDS follows the RDS names inside the listeners' HTTP
//!   connection managers; a connection manager on scoped routes over SRDS subscribes
//!   SRDS (a wildcard, no names, as Envoy does), and RDS then also follows the route
//!   configurations of the scopes that are not `on_demand` (an on-demand scope's table
//!   is fetched on first use, which a client sending no traffic never does) — all
//!   derived by decoding the resources, as Envoy does, so a policy edit that adds a
//!   cluster or route also exercises the subscription path;
//! - every response is answered at once: ACK (SotW: the response's version and nonce,
//!   with the full current subscription, as Envoy repeats it; delta: the nonce) or a
//!   NACK when told to (`--nack-every`, `--nack-version`), which keeps the previously
//!   accepted config, as Envoy does;
//! - a stream is *ready* once every type it subscribes to has been answered.
//!
//! Timing: each stream stamps the arrival of every response per type into atomics the
//! driver reads, so measuring costs the hot path two relaxed stores.
//!
//! Decoding: all simulated vehicles receive byte-identical resources, so the derived
//! names are cached by version across streams. Without it the load generator would
//! spend the shared 2 cores decoding the same listener 10,000 times and the numbers
//! would measure the client, not misaki-cp.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::ScopedRouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::ConfigSpecifier;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{Connector, FleetTls};

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const SRDS: &str = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Resource types a client follows.
pub const N: usize = 5;
/// Index order used by every per-type array here: the server's push order.
pub const TYPES: [&str; N] = [CDS, EDS, LDS, SRDS, RDS];
pub const SHORT: [&str; N] = ["cds", "eds", "lds", "srds", "rds"];
const C: usize = 0;
const E: usize = 1;
const L: usize = 2;
/// SRDS: what a vehicle's reach changes in cloud snapshots.
pub const S: usize = 3;
/// RDS: the type a fleet-wide route edit surely changes.
pub const R: usize = 4;
/// In derived names: a wildcard subscription (SRDS), sent as no names at all.
const WILDCARD: &str = "*";

/// The subscriptions one resource brings: (type index, name).
type Children = Vec<(usize, String)>;

fn type_index(url: &str) -> Option<usize> {
    TYPES.iter().position(|t| *t == url)
}

/// State-of-the-world or incremental ADS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Sotw,
    Delta,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        }
    }
}

/// How every simulated client behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub mode: Mode,
    /// NACK every K-th response a stream receives (0: never).
    pub nack_every: u64,
    /// NACK every response whose version contains this string.
    pub nack_version: Option<String>,
    /// `node.cluster`, i.e. the role: `vehicle`, or `cloud` for a cloud sidecar.
    pub cluster: &'static str,
}

/// What one stream has seen, readable by the driver while the stream runs.
#[derive(Debug, Default)]
pub struct StreamRec {
    /// Arrival of the latest response per type, ns since [`Shared::epoch`] (0: none).
    pub last: [AtomicU64; N],
    /// Every subscribed type has been answered at least once.
    pub ready: AtomicBool,
    /// When `ready` became true, ns since [`Shared::epoch`] (0: not yet).
    pub ready_ns: AtomicU64,
    /// Woken once when `ready` becomes true (single-vehicle trials wait on it).
    pub ready_notify: tokio::sync::Notify,
    pub nacks: AtomicU64,
    /// Responses received per type.
    pub count: [AtomicU64; N],
    /// When the ACK of the latest accepted response per type was queued on the stream,
    /// ns since [`Shared::epoch`] (0: none).
    pub acked: [AtomicU64; N],
    /// Hash of the version of the latest response per type (SotW `version_info`, delta
    /// `system_version_info`).
    pub version: [AtomicU64; N],
}

impl StreamRec {
    pub fn last_ns(&self, t: usize) -> u64 {
        self.last[t].load(Ordering::Acquire)
    }

    pub fn acked_ns(&self, t: usize) -> u64 {
        self.acked[t].load(Ordering::Acquire)
    }

    pub fn version_hash(&self, t: usize) -> u64 {
        self.version[t].load(Ordering::Acquire)
    }

    /// Responses received, all types.
    pub fn responses(&self) -> u64 {
        self.count.iter().map(|c| c.load(Ordering::Acquire)).sum()
    }
}

pub(crate) fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// State shared by every stream of one run.
#[derive(Debug)]
pub struct Shared {
    pub epoch: Instant,
    /// Responses received by all streams: the driver waits for this to stop moving.
    pub responses: AtomicU64,
    pub ready: AtomicUsize,
    pub failed: AtomicUsize,
    /// Stream retries after a failed connection or stream (see [`run_with_retries`]).
    pub reconnects: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Derived subscription names by resource (or SotW response) version; see the
    /// module docs.
    names: Mutex<HashMap<String, Arc<Children>>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            epoch: Instant::now(),
            responses: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
            names: Mutex::new(HashMap::new()),
        }
    }
}

impl Shared {
    /// Now, in ns since the epoch; never 0 so 0 can mean "never".
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    fn derived(&self, key: String, compute: impl FnOnce() -> Children) -> Arc<Children> {
        if let Some(v) = self.names.lock().expect("names").get(&key) {
            return v.clone();
        }
        let v = Arc::new(compute());
        self.names.lock().expect("names").insert(key, v.clone());
        v
    }
}

/// The EDS name a cluster subscribes to, if it takes endpoints over EDS.
fn eds_names(any: &Any) -> Children {
    let Ok(c) = Cluster::decode(any.value.as_slice()) else {
        return Vec::new();
    };
    match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {
            let service = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .unwrap_or_default();
            vec![(E, if service.is_empty() { c.name } else { service })]
        }
        _ => Vec::new(),
    }
}

/// What a listener's HTTP connection managers subscribe to: their RDS route
/// configuration, or SRDS (wildcard) for scoped routes over SRDS.
fn route_names(any: &Any) -> Children {
    let Ok(l) = Listener::decode(any.value.as_slice()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for fc in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &fc.filters {
            if let Some(ConfigType::TypedConfig(tc)) = &f.config_type
                && tc.type_url.ends_with(".HttpConnectionManager")
                && let Ok(hcm) = HttpConnectionManager::decode(tc.value.as_slice())
            {
                match hcm.route_specifier {
                    Some(RouteSpecifier::Rds(rds)) => out.push((R, rds.route_config_name)),
                    Some(RouteSpecifier::ScopedRoutes(sr))
                        if matches!(sr.config_specifier, Some(ConfigSpecifier::ScopedRds(_))) =>
                    {
                        out.push((S, WILDCARD.to_string()))
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// The route configuration a scope subscribes to at once: none when it is on demand.
fn scope_names(any: &Any) -> Children {
    match ScopedRouteConfiguration::decode(any.value.as_slice()) {
        Ok(s) if !s.on_demand => vec![(R, s.route_configuration_name)],
        _ => Vec::new(),
    }
}

/// Child subscriptions (EDS for clusters, SRDS/RDS for listeners, RDS for scopes)
/// of one resource.
fn child_names(t: usize, any: &Any) -> Children {
    match t {
        C => eds_names(any),
        L => route_names(any),
        S => scope_names(any),
        _ => Vec::new(),
    }
}

/// Whether resources of type `t` name children.
fn is_parent(t: usize) -> bool {
    matches!(t, C | L | S)
}

pub fn node(id: &str, cluster: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: cluster.to_string(),
        user_agent_name: "misaki-loadgen".to_string(),
        ..Default::default()
    }
}

/// Where the simulated vehicles connect, and how: plaintext, or mutual TLS with each
/// vehicle's own certificate.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub tls: Option<Arc<FleetTls>>,
}

impl Target {
    pub fn plain(addr: impl Into<String>) -> Arc<Target> {
        Arc::new(Target {
            addr: addr.into(),
            tls: None,
        })
    }

    /// One HTTP/2 connection for vehicle `node_id` (a tonic `Channel` is exactly one).
    pub async fn connect(&self, node_id: &str) -> Result<Channel> {
        // The URI is `http` either way: with TLS our connector does the handshake.
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            // As the vehicle bootstrap: find a dead control plane within ~40 s.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match &self.tls {
            None => endpoint.connect().await,
            Some(tls) => {
                let connector = Connector {
                    addr: self.addr.clone(),
                    config: tls.get(node_id)?,
                };
                endpoint.connect_with_connector(connector).await
            }
        };
        channel.with_context(|| format!("connecting to {}", self.addr))
    }
}

fn nack_status(n: u64) -> RpcStatus {
    RpcStatus {
        code: 3, // INVALID_ARGUMENT, what Envoy reports for a rejected config
        message: format!("misaki-loadgen: rejecting response #{n} as told"),
        details: Vec::new(),
    }
}

/// Whether this stream must NACK its `n`-th response, of version `version`.
fn must_nack(cfg: &ClientConfig, n: u64, version: &str) -> bool {
    (cfg.nack_every > 0 && n.is_multiple_of(cfg.nack_every))
        || cfg
            .nack_version
            .as_deref()
            .is_some_and(|v| !v.is_empty() && version.contains(v))
}

/// Run one stream until the server ends it, it fails, or the task is aborted.
pub async fn run_stream(
    channel: Channel,
    cfg: &ClientConfig,
    node_id: &str,
    rec: &StreamRec,
    shared: &Shared,
) -> Result<()> {
    match cfg.mode {
        Mode::Sotw => run_sotw(channel, cfg, node_id, rec, shared).await,
        Mode::Delta => run_delta(channel, cfg, node_id, rec, shared).await,
    }
}

/// Record a stream that gave up, for the driver to report.
pub fn record_failure(shared: &Shared, node_id: &str, e: &anyhow::Error) {
    shared.failed.fetch_add(1, Ordering::Relaxed);
    *shared.last_error.lock().expect("last_error") = Some(format!("{node_id}: {e:#}"));
}

/// Like Envoy's ADS client: when the connection or stream fails, reconnect after a
/// jittered exponential backoff (Envoy: 500 ms base; shorter here so a benchmark
/// does not idle), and give up after `MAX_ATTEMPTS`. Each retry is counted in
/// `shared.reconnects`: a fleet reconnecting at once overflows the server's accept
/// queue, and Envoy's answer to that is exactly this.
pub async fn run_with_retries(
    target: Arc<Target>,
    channel: Option<Channel>,
    cfg: Arc<ClientConfig>,
    node_id: String,
    rec: Arc<StreamRec>,
    shared: Arc<Shared>,
) {
    const MAX_ATTEMPTS: u32 = 6;
    let mut attempt = 0u32;
    loop {
        let ch = match &channel {
            Some(c) => Ok(c.clone()),
            None => target.connect(&node_id).await,
        };
        let r = match ch {
            Ok(ch) => run_stream(ch, &cfg, &node_id, &rec, &shared).await,
            Err(e) => Err(e),
        };
        let e = r.err().unwrap_or_else(|| anyhow::anyhow!("stream ended"));
        attempt += 1;
        if attempt >= MAX_ATTEMPTS {
            record_failure(&shared, &node_id, &e);
            return;
        }
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
        let base = 100u64 << attempt.min(5);
        let jitter = node_id.bytes().map(u64::from).sum::<u64>() % base;
        tokio::time::sleep(Duration::from_millis(base + jitter)).await;
    }
}

/// What a stream subscribes to, and which types have been answered: the bookkeeping
/// common to both variants. CDS and LDS are wildcards from the start; EDS, SRDS and
/// RDS follow what the held clusters, listeners and scopes name.
#[derive(Default)]
struct Subs {
    /// Per parent type (CDS, LDS, SRDS): held resource → its children, for resources
    /// that have any (a fleet holds thousands of on-demand scopes). Delta keys by
    /// resource name; SotW holds one entry, "", for the latest accepted response.
    from: [BTreeMap<String, Arc<Children>>; N],
    /// The derived subscription per type ([`WILDCARD`] for SRDS's).
    names: [BTreeSet<String>; N],
    answered: [bool; N],
}

/// A change of one type's derived subscription, as a delta request puts it.
#[derive(Debug, PartialEq)]
struct Change {
    t: usize,
    /// Without [`WILDCARD`]: a wildcard is subscribed by naming nothing (legacy).
    subscribe: Vec<String>,
    unsubscribe: Vec<String>,
}

impl Subs {
    /// A response of type `t` arrived: stamp it for the driver.
    fn arrived(&mut self, t: usize, version: &str, rec: &StreamRec, shared: &Shared) {
        rec.version[t].store(hash_str(version), Ordering::Release);
        rec.count[t].fetch_add(1, Ordering::AcqRel);
        rec.last[t].store(shared.now_ns(), Ordering::Release);
        shared.responses.fetch_add(1, Ordering::Relaxed);
        self.answered[t] = true;
    }

    /// Resource `key` of type `t` now names `children`.
    fn hold(&mut self, t: usize, key: String, children: Arc<Children>) {
        if children.is_empty() {
            self.from[t].remove(&key);
        } else {
            self.from[t].insert(key, children);
        }
    }

    /// EDS, SRDS and RDS only count once something is subscribed.
    fn subscribed(&self, t: usize) -> bool {
        t == C || t == L || !self.names[t].is_empty()
    }

    /// Type `t`'s subscription as sent in a SotW request.
    fn sotw_names(&self, t: usize) -> Vec<String> {
        self.names[t]
            .iter()
            .filter(|n| *n != WILDCARD)
            .cloned()
            .collect()
    }

    /// After a response of type `t` was accepted: derive the subscriptions again from
    /// what is held; the changes, in push order.
    fn resync(&mut self, t: usize) -> Vec<Change> {
        if !is_parent(t) {
            return Vec::new();
        }
        let mut want: [BTreeSet<String>; N] = Default::default();
        for (t, name) in self
            .from
            .iter()
            .flat_map(|m| m.values())
            .flat_map(|v| v.iter())
        {
            want[*t].insert(name.clone());
        }
        let mut out = Vec::new();
        for (t, want) in want.into_iter().enumerate() {
            let have = &self.names[t];
            if want != *have {
                out.push(Change {
                    t,
                    subscribe: want
                        .difference(have)
                        .filter(|n| *n != WILDCARD)
                        .cloned()
                        .collect(),
                    unsubscribe: have.difference(&want).cloned().collect(),
                });
                self.names[t] = want;
            }
        }
        out
    }

    fn check(&self, rec: &StreamRec, shared: &Shared) {
        if rec.ready.load(Ordering::Relaxed) {
            return;
        }
        if (0..N).all(|t| self.answered[t] || !self.subscribed(t)) {
            rec.ready_ns.store(shared.now_ns(), Ordering::Release);
            rec.ready.store(true, Ordering::Release);
            shared.ready.fetch_add(1, Ordering::AcqRel);
            rec.ready_notify.notify_one();
        }
    }
}

/// A SotW request of type `t`: the accepted version, the nonce, the subscription.
fn sotw_req(t: usize, st: &SotwType, subs: &Subs, node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: st.accepted.clone(),
        node,
        resource_names: subs.sotw_names(t),
        type_url: TYPES[t].to_string(),
        response_nonce: st.nonce.clone(),
        error_detail: None,
        ..Default::default()
    }
}

#[derive(Default)]
struct SotwType {
    accepted: String,
    nonce: String,
}

async fn send<T>(tx: &mpsc::Sender<T>, m: T) -> Result<()> {
    tx.send(m)
        .await
        .map_err(|_| anyhow::anyhow!("request stream closed"))
}

async fn run_sotw(
    channel: Channel,
    cfg: &ClientConfig,
    node_id: &str,
    rec: &StreamRec,
    shared: &Shared,
) -> Result<()> {
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(8);
    let mut types: [SotwType; N] = Default::default();
    let mut subs = Subs::default();
    send(
        &tx,
        sotw_req(C, &types[C], &subs, Some(node(node_id, cfg.cluster))),
    )
    .await?;
    send(&tx, sotw_req(L, &types[L], &subs, None)).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening SotW ADS stream")?
        .into_inner();
    let mut n = 0u64;
    while let Some(resp) = inbound.message().await.context("SotW ADS stream")? {
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = resp;
        let Some(t) = type_index(&type_url) else {
            continue;
        };
        subs.arrived(t, &version_info, rec, shared);
        n += 1;
        types[t].nonce = nonce;
        if must_nack(cfg, n, &version_info) {
            rec.nacks.fetch_add(1, Ordering::Relaxed);
            let mut req = sotw_req(t, &types[t], &subs, None);
            req.error_detail = Some(nack_status(n));
            send(&tx, req).await?;
            subs.check(rec, shared);
            continue;
        }
        // A parent's response is its whole state: it replaces what the last one named.
        if is_parent(t) {
            let key = format!("{}:{version_info}", SHORT[t]);
            let names = shared.derived(key, || {
                resources.iter().flat_map(|a| child_names(t, a)).collect()
            });
            subs.hold(t, String::new(), names);
        }
        types[t].accepted = version_info;
        send(&tx, sotw_req(t, &types[t], &subs, None)).await?;
        rec.acked[t].store(shared.now_ns(), Ordering::Release);
        for c in subs.resync(t) {
            send(&tx, sotw_req(c.t, &types[c.t], &subs, None)).await?;
        }
        subs.check(rec, shared);
    }
    bail!("server closed the stream")
}

async fn run_delta(
    channel: Channel,
    cfg: &ClientConfig,
    node_id: &str,
    rec: &StreamRec,
    shared: &Shared,
) -> Result<()> {
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
    // Legacy wildcard: a first request that subscribes to nothing (what Envoy sends).
    send(
        &tx,
        DeltaDiscoveryRequest {
            node: Some(node(node_id, cfg.cluster)),
            type_url: CDS.to_string(),
            ..Default::default()
        },
    )
    .await?;
    send(
        &tx,
        DeltaDiscoveryRequest {
            type_url: LDS.to_string(),
            ..Default::default()
        },
    )
    .await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut inbound = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening delta ADS stream")?
        .into_inner();
    let mut subs = Subs::default();
    let mut n = 0u64;
    while let Some(resp) = inbound.message().await.context("delta ADS stream")? {
        let DeltaDiscoveryResponse {
            system_version_info,
            resources,
            type_url,
            removed_resources,
            nonce,
            ..
        } = resp;
        let Some(t) = type_index(&type_url) else {
            continue;
        };
        subs.arrived(t, &system_version_info, rec, shared);
        n += 1;
        let mut ack = DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce,
            ..Default::default()
        };
        if must_nack(cfg, n, &system_version_info) {
            rec.nacks.fetch_add(1, Ordering::Relaxed);
            ack.error_detail = Some(nack_status(n));
            send(&tx, ack).await?;
            subs.check(rec, shared);
            continue;
        }
        for r in resources {
            if is_parent(t)
                && let Some(body) = &r.resource
            {
                let key = format!("{}:{}:{}", SHORT[t], r.name, r.version);
                subs.hold(t, r.name, shared.derived(key, || child_names(t, body)));
            }
        }
        // Held resources are not tracked by version (no `initial_resource_versions`
        // on a reconnect): only what they subscribe to.
        for name in removed_resources {
            subs.from[t].remove(&name);
        }
        send(&tx, ack).await?;
        rec.acked[t].store(shared.now_ns(), Ordering::Release);
        for c in subs.resync(t) {
            send(
                &tx,
                DeltaDiscoveryRequest {
                    type_url: TYPES[c.t].to_string(),
                    resource_names_subscribe: c.subscribe,
                    resource_names_unsubscribe: c.unsubscribe,
                    ..Default::default()
                },
            )
            .await?;
        }
        subs.check(rec, shared);
    }
    bail!("server closed the stream")
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        Rds, ScopedRds, ScopedRoutes,
    };

    fn any(type_url: &str, m: &impl Message) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{type_url}"),
            value: m.encode_to_vec(),
        }
    }

    fn listener(specs: Vec<RouteSpecifier>) -> Any {
        let filters = specs
            .into_iter()
            .map(|spec| Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(ConfigType::TypedConfig(any(
                    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    &HttpConnectionManager {
                        route_specifier: Some(spec),
                        ..Default::default()
                    },
                ))),
            })
            .collect();
        let l = Listener {
            filter_chains: vec![FilterChain {
                filters,
                ..Default::default()
            }],
            ..Default::default()
        };
        any("envoy.config.listener.v3.Listener", &l)
    }

    fn scoped(srds: bool) -> RouteSpecifier {
        RouteSpecifier::ScopedRoutes(ScopedRoutes {
            config_specifier: srds.then(|| ConfigSpecifier::ScopedRds(ScopedRds::default())),
            ..Default::default()
        })
    }

    fn scope(name: &str, on_demand: bool) -> Any {
        let s = ScopedRouteConfiguration {
            on_demand,
            name: name.into(),
            route_configuration_name: format!("rc/{name}"),
            ..Default::default()
        };
        any("envoy.config.route.v3.ScopedRouteConfiguration", &s)
    }

    #[test]
    fn listeners_name_rds_or_the_srds_wildcard_and_scopes_their_eager_tables() {
        let rds = RouteSpecifier::Rds(Rds {
            route_config_name: "vehicle_inbound".into(),
            ..Default::default()
        });
        assert_eq!(
            child_names(L, &listener(vec![rds, scoped(true)])),
            vec![(R, "vehicle_inbound".into()), (S, WILDCARD.into())]
        );
        // Scopes given inline subscribe nothing over SRDS.
        assert!(child_names(L, &listener(vec![scoped(false)])).is_empty());
        assert_eq!(child_names(S, &scope("a", false)), vec![(R, "rc/a".into())]);
        assert!(child_names(S, &scope("b", true)).is_empty());
        assert!(child_names(R, &scope("a", false)).is_empty());
    }

    #[test]
    fn srds_is_a_wildcard_with_no_names_and_eager_scopes_subscribe_rds() {
        let mut subs = Subs::default();
        let l = Arc::new(child_names(L, &listener(vec![scoped(true)])));
        subs.hold(L, "vehicle_outbound".into(), l);
        let change = |t, sub: &[&str], unsub: &[&str]| Change {
            t,
            subscribe: sub.iter().map(|s| s.to_string()).collect(),
            unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(subs.resync(L), vec![change(S, &[], &[])]);
        assert!(subs.subscribed(S) && !subs.subscribed(R));
        assert!(subs.sotw_names(S).is_empty(), "SotW: legacy wildcard");
        for (name, on_demand) in [("a", false), ("b", true), ("c", false)] {
            let c = Arc::new(child_names(S, &scope(name, on_demand)));
            subs.hold(S, name.into(), c);
        }
        assert_eq!(subs.from[S].len(), 2, "on-demand scopes are not kept");
        assert_eq!(subs.resync(S), vec![change(R, &["rc/a", "rc/c"], &[])]);
        assert_eq!(subs.sotw_names(R), vec!["rc/a", "rc/c"]);
        assert!(subs.resync(S).is_empty());
        assert!(
            subs.resync(R).is_empty(),
            "only parents change subscriptions"
        );
        subs.from[S].remove("a");
        subs.from[L].clear();
        assert_eq!(
            subs.resync(L),
            vec![change(S, &[], &["*"]), change(R, &[], &["rc/a"])]
        );
    }

    #[test]
    fn nack_every_k_and_by_version() {
        let cfg = ClientConfig {
            mode: Mode::Sotw,
            nack_every: 3,
            nack_version: Some("bad".into()),
            cluster: "vehicle",
        };
        let nacked: Vec<u64> = (1..=7).filter(|n| must_nack(&cfg, *n, "v1")).collect();
        assert_eq!(nacked, vec![3, 6]);
        assert!(must_nack(&cfg, 1, "x-bad-1"));
        let never = ClientConfig {
            mode: Mode::Delta,
            nack_every: 0,
            nack_version: Some(String::new()),
            cluster: "vehicle",
        };
        assert!(!(1..100).any(|n| must_nack(&never, n, "anything")));
    }
}
