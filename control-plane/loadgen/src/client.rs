//! Simulated vehicle sidecars: one ADS stream each, behaving like Envoy.
//!
//! What "like Envoy" means here (and why):
//! - the first request on a stream carries the node (`set_node_on_first_message_only`,
//!   as misaki's vehicle bootstrap sets it); node.id `veh-{i}`, cluster `vehicle`;
//! - CDS and LDS are wildcard subscriptions; EDS follows the EDS clusters of the
//!   latest accepted CDS, RDS follows the RDS names inside the listeners' HTTP
//!   connection managers — both derived by decoding the resources, as Envoy does, so
//!   a policy edit that adds a cluster or route also exercises the subscription path;
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
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
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

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Index order used by every per-type array here: the server's push order.
pub const TYPES: [&str; 4] = [CDS, EDS, LDS, RDS];
pub const SHORT: [&str; 4] = ["cds", "eds", "lds", "rds"];
const C: usize = 0;
const E: usize = 1;
const L: usize = 2;
const R: usize = 3;

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
}

/// What one stream has seen, readable by the driver while the stream runs.
#[derive(Debug, Default)]
pub struct StreamRec {
    /// Arrival of the latest response per type, ns since [`Shared::epoch`] (0: none).
    pub last: [AtomicU64; 4],
    /// Every subscribed type has been answered at least once.
    pub ready: AtomicBool,
    /// Woken once when `ready` becomes true (single-vehicle trials wait on it).
    pub ready_notify: tokio::sync::Notify,
    pub nacks: AtomicU64,
}

impl StreamRec {
    pub fn last_ns(&self, t: usize) -> u64 {
        self.last[t].load(Ordering::Acquire)
    }
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
    names: Mutex<HashMap<String, Arc<Vec<String>>>>,
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

    fn derived(&self, key: String, compute: impl FnOnce() -> Vec<String>) -> Arc<Vec<String>> {
        if let Some(v) = self.names.lock().expect("names").get(&key) {
            return v.clone();
        }
        let v = Arc::new(compute());
        self.names.lock().expect("names").insert(key, v.clone());
        v
    }
}

/// The EDS name a cluster subscribes to, if it takes endpoints over EDS.
fn eds_names(any: &Any) -> Vec<String> {
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
            vec![if service.is_empty() { c.name } else { service }]
        }
        _ => Vec::new(),
    }
}

/// The RDS route configuration names a listener's HTTP connection managers use.
fn rds_names(any: &Any) -> Vec<String> {
    let Ok(l) = Listener::decode(any.value.as_slice()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for fc in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &fc.filters {
            if let Some(ConfigType::TypedConfig(tc)) = &f.config_type
                && tc.type_url.ends_with(".HttpConnectionManager")
                && let Ok(hcm) = HttpConnectionManager::decode(tc.value.as_slice())
                && let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier
            {
                out.push(rds.route_config_name);
            }
        }
    }
    out
}

/// Child names (EDS for clusters, RDS for listeners) of one resource.
fn child_names(t: usize, any: &Any) -> Vec<String> {
    match t {
        C => eds_names(any),
        L => rds_names(any),
        _ => Vec::new(),
    }
}

pub fn node(id: &str) -> Node {
    Node {
        id: id.to_string(),
        cluster: "vehicle".to_string(),
        user_agent_name: "misaki-loadgen".to_string(),
        ..Default::default()
    }
}

/// One HTTP/2 connection to the xDS server (a tonic `Channel` is exactly one).
pub async fn connect(addr: &str) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        // As the vehicle bootstrap: find a dead control plane within ~40 s.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
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
    addr: String,
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
            None => connect(&addr).await,
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

/// Readiness bookkeeping common to both variants.
struct Ready {
    answered: [bool; 4],
    /// EDS/RDS only count once something is subscribed.
    subscribed: [bool; 4],
}

impl Ready {
    fn new() -> Self {
        Ready {
            answered: [false; 4],
            subscribed: [true, false, true, false],
        }
    }

    fn check(&self, rec: &StreamRec, shared: &Shared) {
        if rec.ready.load(Ordering::Relaxed) {
            return;
        }
        if (0..4).all(|t| self.answered[t] || !self.subscribed[t]) {
            rec.ready.store(true, Ordering::Release);
            shared.ready.fetch_add(1, Ordering::AcqRel);
            rec.ready_notify.notify_one();
        }
    }
}

#[derive(Default)]
struct SotwType {
    /// Subscription (EDS/RDS; CDS/LDS are wildcard and send no names).
    names: BTreeSet<String>,
    accepted: String,
    nonce: String,
}

fn sotw_req(t: usize, st: &SotwType, node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: st.accepted.clone(),
        node,
        resource_names: st.names.iter().cloned().collect(),
        type_url: TYPES[t].to_string(),
        response_nonce: st.nonce.clone(),
        error_detail: None,
        ..Default::default()
    }
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
    let mut types: [SotwType; 4] = Default::default();
    send(&tx, sotw_req(C, &types[C], Some(node(node_id)))).await?;
    send(&tx, sotw_req(L, &types[L], None)).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .context("opening SotW ADS stream")?
        .into_inner();
    let mut ready = Ready::new();
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
        rec.last[t].store(shared.now_ns(), Ordering::Release);
        shared.responses.fetch_add(1, Ordering::Relaxed);
        n += 1;
        types[t].nonce = nonce;
        ready.answered[t] = true;
        if must_nack(cfg, n, &version_info) {
            rec.nacks.fetch_add(1, Ordering::Relaxed);
            let mut req = sotw_req(t, &types[t], None);
            req.error_detail = Some(nack_status(n));
            send(&tx, req).await?;
            ready.check(rec, shared);
            continue;
        }
        // Child subscription from the accepted parent (CDS → EDS, LDS → RDS).
        let child = match t {
            C => Some(E),
            L => Some(R),
            _ => None,
        }
        .map(|child| {
            let key = format!("{}:{version_info}", SHORT[t]);
            let names = shared.derived(key, || {
                let set: BTreeSet<String> =
                    resources.iter().flat_map(|a| child_names(t, a)).collect();
                set.into_iter().collect()
            });
            (child, names)
        });
        types[t].accepted = version_info;
        send(&tx, sotw_req(t, &types[t], None)).await?;
        if let Some((c, names)) = child {
            let names: BTreeSet<String> = names.iter().cloned().collect();
            let was_requested = ready.subscribed[c];
            if names != types[c].names {
                types[c].names = names;
                ready.subscribed[c] = !types[c].names.is_empty();
                if was_requested || ready.subscribed[c] {
                    send(&tx, sotw_req(c, &types[c], None)).await?;
                }
            }
        }
        ready.check(rec, shared);
    }
    bail!("server closed the stream")
}

#[derive(Default)]
struct DeltaType {
    /// What the client holds: name → version.
    has: BTreeMap<String, String>,
    /// CDS/LDS: each held resource's child names.
    children: BTreeMap<String, Arc<Vec<String>>>,
    /// EDS/RDS: the explicit subscription.
    subscribed: BTreeSet<String>,
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
            node: Some(node(node_id)),
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
    let mut types: [DeltaType; 4] = Default::default();
    let mut ready = Ready::new();
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
        rec.last[t].store(shared.now_ns(), Ordering::Release);
        shared.responses.fetch_add(1, Ordering::Relaxed);
        n += 1;
        ready.answered[t] = true;
        let mut ack = DeltaDiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: nonce,
            ..Default::default()
        };
        if must_nack(cfg, n, &system_version_info) {
            rec.nacks.fetch_add(1, Ordering::Relaxed);
            ack.error_detail = Some(nack_status(n));
            send(&tx, ack).await?;
            ready.check(rec, shared);
            continue;
        }
        let st = &mut types[t];
        for r in resources {
            if matches!(t, C | L)
                && let Some(body) = &r.resource
            {
                let key = format!("{}:{}:{}", SHORT[t], r.name, r.version);
                let names = shared.derived(key, || child_names(t, body));
                st.children.insert(r.name.clone(), names);
            }
            st.has.insert(r.name, r.version);
        }
        for name in removed_resources {
            st.has.remove(&name);
            st.children.remove(&name);
        }
        send(&tx, ack).await?;
        if let Some(c) = match t {
            C => Some(E),
            L => Some(R),
            _ => None,
        } {
            let want: BTreeSet<String> = types[t]
                .children
                .values()
                .flat_map(|v| v.iter().cloned())
                .collect();
            let have = &types[c].subscribed;
            let subscribe: Vec<String> = want.difference(have).cloned().collect();
            let unsubscribe: Vec<String> = have.difference(&want).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                send(
                    &tx,
                    DeltaDiscoveryRequest {
                        type_url: TYPES[c].to_string(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    },
                )
                .await?;
                ready.subscribed[c] = !want.is_empty();
                types[c].subscribed = want;
            }
        }
        ready.check(rec, shared);
    }
    bail!("server closed the stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nack_every_k_and_by_version() {
        let cfg = ClientConfig {
            mode: Mode::Sotw,
            nack_every: 3,
            nack_version: Some("bad".into()),
        };
        let nacked: Vec<u64> = (1..=7).filter(|n| must_nack(&cfg, *n, "v1")).collect();
        assert_eq!(nacked, vec![3, 6]);
        assert!(must_nack(&cfg, 1, "x-bad-1"));
        let never = ClientConfig {
            mode: Mode::Delta,
            nack_every: 0,
            nack_version: Some(String::new()),
        };
        assert!(!(1..100).any(|n| must_nack(&never, n, "anything")));
    }
}
