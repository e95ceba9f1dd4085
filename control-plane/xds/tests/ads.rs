//! End-to-end tests of the ADS server: a real tonic server on 127.0.0.1:0, a tonic
//! ADS client, and a snapshot source the test drives through a `watch::Sender`.
//!
//! Timing: every wait for a response has a generous timeout (the machine is shared);
//! the only timing assertions are "nothing arrives within QUIET".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::Key;
use envoy_types::pb::envoy::config::route::v3::scoped_route_configuration::key::{
    Fragment, fragment,
};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, ScopedRouteConfiguration};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use misaki_compiler::node::NodeInfo;
use misaki_compiler::snapshot::{Resource, ResourceType, Resources, Snapshot};
use misaki_xds::{ServeConfig, SnapshotSource, StreamRegistry, XdsServer};
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const SDS: ResourceType = ResourceType::Secret;
const CDS: ResourceType = ResourceType::Cluster;
const EDS: ResourceType = ResourceType::Endpoint;
const LDS: ResourceType = ResourceType::Listener;
const SRDS: ResourceType = ResourceType::ScopedRoute;
const RDS: ResourceType = ResourceType::Route;

/// How long to wait for something that must arrive.
const PATIENCE: Duration = Duration::from_secs(15);
/// How long nothing must arrive for "nothing is sent" to count as true.
const QUIET: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------- snapshots

/// Resources by name with a content tag: a different tag is different content.
#[derive(Debug, Clone, Default)]
struct Spec {
    secrets: Vec<(&'static str, u32)>,
    clusters: Vec<(&'static str, u32)>,
    endpoints: Vec<(&'static str, u32)>,
    listeners: Vec<(&'static str, u32)>,
    routes: Vec<(&'static str, u32)>,
    /// Scopes: (name, route configuration it names, tag).
    scopes: Vec<(&'static str, &'static str, u32)>,
    /// On-demand clusters and routes: in no wildcard subscription.
    od_clusters: Vec<(&'static str, u32)>,
    od_routes: Vec<(&'static str, u32)>,
}

const PREFIX: &str = "test1-";

fn cluster(&(n, tag): &(&'static str, u32)) -> Arc<Resource> {
    let c = Cluster {
        name: n.into(),
        alt_stat_name: format!("v{tag}"),
        ..Default::default()
    };
    Arc::new(Resource::new(PREFIX, n, &c))
}

fn route(&(n, tag): &(&'static str, u32)) -> Arc<Resource> {
    let r = RouteConfiguration {
        name: n.into(),
        internal_only_headers: vec![format!("x-v{tag}")],
        ..Default::default()
    };
    Arc::new(Resource::new(PREFIX, n, &r))
}

fn snapshot(s: &Spec) -> Arc<Snapshot> {
    let secrets = s.secrets.iter().map(|&(n, tag)| {
        // A generic secret stands in: only the name and the content tag matter here.
        let g = Secret {
            name: n.into(),
            r#type: Some(
                envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type::GenericSecret(
                    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::GenericSecret {
                        secret: Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                            specifier: Some(
                                envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                                    format!("v{tag}"),
                                ),
                            ),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            ),
        };
        Arc::new(Resource::new(PREFIX, n, &g))
    });
    let endpoints = s.endpoints.iter().map(|&(n, tag)| {
        let c = ClusterLoadAssignment {
            cluster_name: n.into(),
            endpoints: vec![LocalityLbEndpoints {
                priority: tag,
                ..Default::default()
            }],
            ..Default::default()
        };
        Arc::new(Resource::new(PREFIX, n, &c))
    });
    let listeners = s.listeners.iter().map(|&(n, tag)| {
        let l = Listener {
            name: n.into(),
            stat_prefix: format!("v{tag}"),
            ..Default::default()
        };
        Arc::new(Resource::new(PREFIX, n, &l))
    });
    let scopes = s.scopes.iter().map(|&(n, route, tag)| {
        let sc = ScopedRouteConfiguration {
            name: n.into(),
            route_configuration_name: route.into(),
            on_demand: true,
            key: Some(Key {
                fragments: vec![Fragment {
                    r#type: Some(fragment::Type::StringKey(format!("{n}-{tag}"))),
                }],
            }),
            ..Default::default()
        };
        Arc::new(Resource::new(PREFIX, n, &sc))
    });
    Arc::new(
        Snapshot::new(
            Resources::with_on_demand(
                PREFIX,
                s.clusters.iter().map(cluster),
                s.od_clusters.iter().map(cluster),
            ),
            Resources::from_items(PREFIX, endpoints),
            Resources::from_items(PREFIX, listeners),
            Resources::with_on_demand(
                PREFIX,
                s.routes.iter().map(route),
                s.od_routes.iter().map(route),
            ),
        )
        .with_scoped_routes(Resources::from_items(PREFIX, scopes))
        .with(SDS, Resources::from_items(PREFIX, secrets)),
    )
}

/// Two clusters with endpoints, one listener with its route.
fn base() -> Spec {
    Spec {
        clusters: vec![("a", 1), ("b", 1)],
        endpoints: vec![("a", 1), ("b", 1)],
        listeners: vec![("l", 1)],
        routes: vec![("r", 1)],
        ..Default::default()
    }
}

/// [`base`] plus a scope "s1" on route "r", an on-demand cluster "od", an
/// on-demand route "r-od" and a secret "ca".
fn on_demand() -> Spec {
    Spec {
        secrets: vec![("ca", 1)],
        scopes: vec![("s1", "r", 1)],
        od_clusters: vec![("od", 1)],
        od_routes: vec![("r-od", 1)],
        ..base()
    }
}

/// [`on_demand`] with a change to every type.
fn every_type_changed() -> Spec {
    Spec {
        clusters: vec![("a", 2), ("b", 1)],
        endpoints: vec![("a", 1), ("b", 2)],
        listeners: vec![("l", 2)],
        routes: vec![("r", 2)],
        scopes: vec![("s1", "r", 2)],
        secrets: vec![("ca", 2)],
        ..on_demand()
    }
}

fn resource_name(a: &Any) -> String {
    let b = a.value.as_slice();
    match ResourceType::from_type_url(&a.type_url).expect("known type") {
        SDS => Secret::decode(b).unwrap().name,
        CDS => Cluster::decode(b).unwrap().name,
        EDS => ClusterLoadAssignment::decode(b).unwrap().cluster_name,
        LDS => Listener::decode(b).unwrap().name,
        SRDS => ScopedRouteConfiguration::decode(b).unwrap().name,
        RDS => RouteConfiguration::decode(b).unwrap().name,
    }
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources.iter().map(resource_name).collect()
}

fn delta_names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    r.resources.iter().map(|x| x.name.clone()).collect()
}

fn type_of(url: &str) -> ResourceType {
    ResourceType::from_type_url(url).expect("known type")
}

// ---------------------------------------------------------------- server

/// A snapshot source every node shares, driven by the test.
#[derive(Debug)]
struct TestSource {
    tx: watch::Sender<Arc<Snapshot>>,
    nodes: Mutex<Vec<NodeInfo>>,
}

impl SnapshotSource for TestSource {
    fn watch(&self, node: &NodeInfo) -> watch::Receiver<Arc<Snapshot>> {
        self.nodes.lock().unwrap().push(node.clone());
        self.tx.subscribe()
    }
}

struct Harness {
    addr: std::net::SocketAddr,
    source: Arc<TestSource>,
    xds: XdsServer,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn start(spec: &Spec) -> Harness {
        Self::start_with(spec, ServeConfig::default()).await
    }

    async fn start_with(spec: &Spec, config: ServeConfig) -> Harness {
        let (tx, _) = watch::channel(snapshot(spec));
        let source = Arc::new(TestSource {
            tx,
            nodes: Mutex::new(Vec::new()),
        });
        let xds = XdsServer::new(source.clone(), StreamRegistry::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = {
            let xds = xds.clone();
            tokio::spawn(async move {
                misaki_xds::serve(
                    listener,
                    &xds,
                    tonic::service::Routes::default(),
                    &config,
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
            })
        };
        Harness {
            addr,
            source,
            xds,
            shutdown: Some(stop),
            server,
        }
    }

    fn publish(&self, spec: &Spec) {
        self.source.tx.send_replace(snapshot(spec));
    }

    async fn client(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect")
    }

    /// Open an ADS stream (`what` for the failure message) with `call`, the client's
    /// method for it: the request sender and the response stream.
    async fn open<Req, Resp, Fut>(
        &self,
        what: &str,
        call: impl FnOnce(AggregatedDiscoveryServiceClient<Channel>, ReceiverStream<Req>) -> Fut,
    ) -> (mpsc::Sender<Req>, Streaming<Resp>)
    where
        Fut: Future<Output = Result<tonic::Response<Streaming<Resp>>, tonic::Status>>,
    {
        let (tx, rx) = mpsc::channel(16);
        let stream = call(self.client().await, ReceiverStream::new(rx))
            .await
            .unwrap_or_else(|e| panic!("open {what} stream: {e}"))
            .into_inner();
        (tx, stream)
    }

    async fn sotw(&self) -> Sotw {
        let (tx, rx) = self
            .open("sotw", |mut c, rx| async move {
                c.stream_aggregated_resources(rx).await
            })
            .await;
        Sotw {
            tx,
            rx,
            node_sent: false,
            names: HashMap::new(),
        }
    }

    async fn delta(&self) -> Delta {
        let (tx, rx) = self
            .open("delta", |mut c, rx| async move {
                c.delta_aggregated_resources(rx).await
            })
            .await;
        Delta {
            tx,
            rx,
            node_sent: false,
        }
    }

    fn nodes_json(&self) -> serde_json::Value {
        self.xds.streams().to_json()
    }

    /// The registry's view of the only stream, once `pred` holds for it.
    async fn stream_status_when(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let j = self.nodes_json();
            let s = &j["streams"][0];
            if pred(s) {
                return s.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry never reached the expected state: {j:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn vehicle(id: &str) -> Node {
    Node {
        id: id.into(),
        cluster: "vehicle".into(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- both clients

/// The receiving side the SotW and the delta client share.
trait Client {
    type Response;
    fn rx(&mut self) -> &mut Streaming<Self::Response>;
    fn type_url(r: &Self::Response) -> &str;
    fn names(r: &Self::Response) -> Vec<String>;
    /// What a failure message says of a response beyond its type and names.
    fn detail(r: &Self::Response) -> String;

    /// A response for a failure message: its type, names, and detail.
    fn describe(r: &Self::Response) -> String {
        let t = type_of(Self::type_url(r)).short();
        format!("{t} {:?} {}", Self::names(r), Self::detail(r))
    }

    /// The next response (within PATIENCE, the stream healthy and open), no name twice.
    async fn recv(&mut self) -> Self::Response {
        let r = tokio::time::timeout(PATIENCE, self.rx().message())
            .await
            .expect("a response within the timeout")
            .expect("stream healthy")
            .expect("stream open");
        let names = Self::names(&r);
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(
            names.len(),
            dedup.len(),
            "a name twice in one reply: {names:?}"
        );
        r
    }

    /// The types of the next `n` responses.
    async fn recv_types(&mut self, n: usize) -> Vec<ResourceType> {
        let mut types = Vec::new();
        for _ in 0..n {
            types.push(type_of(Self::type_url(&self.recv().await)));
        }
        types
    }

    async fn recv_type(&mut self, t: ResourceType) -> Self::Response {
        let r = self.recv().await;
        let got = type_of(Self::type_url(&r));
        assert_eq!(got, t, "unexpected type: {}", Self::describe(&r));
        r
    }

    /// Nothing arrives within QUIET.
    async fn assert_quiet(&mut self) {
        if let Ok(r) = tokio::time::timeout(QUIET, self.rx().message()).await {
            let r = r.expect("stream healthy").expect("stream open");
            panic!("expected no response, got {}", Self::describe(&r));
        }
    }
}

/// The `error_detail` of a NACK saying `message`.
fn nack_detail(message: &str) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: Code::InvalidArgument as i32,
        message: message.into(),
        details: vec![],
    })
}

// ---------------------------------------------------------------- SotW client

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node_sent: bool,
    /// Current subscription per type, resent with every ACK as Envoy does.
    names: HashMap<ResourceType, Vec<String>>,
}

impl Sotw {
    async fn send(&mut self, mut req: DiscoveryRequest) {
        if !self.node_sent {
            req.node = Some(vehicle("car-1"));
            self.node_sent = true;
        }
        self.tx.send(req).await.expect("request stream open");
    }

    /// Subscribe to `names` of `t` (replacing the previous list), acknowledging `last`.
    async fn request(&mut self, t: ResourceType, names: &[&str], last: Option<&DiscoveryResponse>) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        self.names.insert(t, names.clone());
        self.send(DiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names: names,
            version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&mut self, r: &DiscoveryResponse) {
        let t = type_of(&r.type_url);
        let names = self.names.get(&t).cloned().unwrap_or_default();
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            resource_names: names,
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&mut self, r: &DiscoveryResponse, previous_version: &str, message: &str) {
        let t = type_of(&r.type_url);
        let names = self.names.get(&t).cloned().unwrap_or_default();
        self.send(DiscoveryRequest {
            type_url: r.type_url.clone(),
            resource_names: names,
            version_info: previous_version.into(),
            response_nonce: r.nonce.clone(),
            error_detail: nack_detail(message),
            ..Default::default()
        })
        .await;
    }

    /// [`Sotw::request`], then the response of type `t` (not ACKed).
    async fn ask(
        &mut self,
        t: ResourceType,
        names: &[&str],
        last: Option<&DiscoveryResponse>,
    ) -> DiscoveryResponse {
        self.request(t, names, last).await;
        self.recv_type(t).await
    }

    /// First subscription of `t` to `names`: the response, ACKed.
    async fn take(&mut self, t: ResourceType, names: &[&str]) -> DiscoveryResponse {
        let r = self.ask(t, names, None).await;
        self.ack(&r).await;
        r
    }

    /// The usual Envoy start: wildcard CDS, EDS for its clusters, wildcard LDS, RDS.
    /// Returns the four ACKed responses.
    async fn bootstrap(&mut self, eds: &[&str], rds: &[&str]) -> [DiscoveryResponse; 4] {
        [
            self.take(CDS, &[]).await,
            self.take(EDS, eds).await,
            self.take(LDS, &[]).await,
            self.take(RDS, rds).await,
        ]
    }
}

/// `impl Client` for a client struct whose `rx` streams `$response`, named by `$names`,
/// detailed by `$detail`.
macro_rules! client {
    ($client:ty, $response:ty, $names:path, $detail:expr) => {
        impl Client for $client {
            type Response = $response;
            fn rx(&mut self) -> &mut Streaming<$response> {
                &mut self.rx
            }
            fn type_url(r: &$response) -> &str {
                &r.type_url
            }
            fn names(r: &$response) -> Vec<String> {
                $names(r)
            }
            fn detail(r: &$response) -> String {
                $detail(r)
            }
        }
    };
}

client!(Sotw, DiscoveryResponse, names, |r: &DiscoveryResponse| {
    format!("version {}", r.version_info)
});

// ---------------------------------------------------------------- delta client

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    node_sent: bool,
}

impl Delta {
    async fn send(&mut self, mut req: DeltaDiscoveryRequest) {
        if !self.node_sent {
            req.node = Some(vehicle("car-2"));
            self.node_sent = true;
        }
        self.tx.send(req).await.expect("request stream open");
    }

    async fn subscribe(&mut self, t: ResourceType, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn unsubscribe(&mut self, t: ResourceType, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names_unsubscribe: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&mut self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    /// Subscribe to `names` of `t`: the response, ACKed.
    async fn take(&mut self, t: ResourceType, names: &[&str]) -> DeltaDiscoveryResponse {
        self.subscribe(t, names).await;
        let r = self.recv_type(t).await;
        self.ack(&r).await;
        r
    }

    /// Receive a response of type `t` and ACK it: `(names sent, names removed)`.
    async fn recv_ack(&mut self, t: ResourceType) -> (Vec<String>, Vec<String>) {
        let r = self.recv_type(t).await;
        self.ack(&r).await;
        (sorted(delta_names(&r)), sorted(r.removed_resources))
    }

    async fn nack(&mut self, r: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: nack_detail(message),
            ..Default::default()
        })
        .await;
    }
}

client!(
    Delta,
    DeltaDiscoveryResponse,
    delta_names,
    |r: &DeltaDiscoveryResponse| { format!("removed {:?}", r.removed_resources) }
);

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ================================================================ SotW tests

#[tokio::test]
async fn sotw_serves_wildcard_clusters_and_listeners_then_named_endpoints_and_routes() {
    let mut spec = base();
    spec.endpoints.push(("unrequested", 1));
    let h = Harness::start(&spec).await;
    let mut c = h.sotw().await;
    let [cds, eds, lds, rds] = c.bootstrap(&["a"], &["r"]).await;
    assert_eq!(names(&cds), ["a", "b"]);
    assert_eq!(names(&eds), ["a"], "named EDS carries only what was asked");
    assert_eq!(names(&lds), ["l"]);
    assert_eq!(names(&rds), ["r"]);
    assert_eq!(
        cds.version_info,
        snapshot(&spec).get(CDS).version,
        "a wildcard reply carries the type's snapshot version"
    );
    assert!(cds.version_info.starts_with(PREFIX));
    let nonces: std::collections::HashSet<_> = [&cds, &eds, &lds, &rds]
        .iter()
        .map(|r| r.nonce.clone())
        .collect();
    assert_eq!(nonces.len(), 4, "every response gets its own nonce");
    assert_eq!(h.source.nodes.lock().unwrap()[0].id, "car-1");
    c.assert_quiet().await;
}

#[tokio::test]
async fn sotw_ack_is_recorded_per_type_in_the_stream_registry() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    let [cds, _, lds, _] = c.bootstrap(&["a", "b"], &["r"]).await;
    let s = h
        .stream_status_when(|s| !s["types"]["rds"]["last_acked_version"].is_null())
        .await;
    assert_eq!(s["node_id"], "car-1");
    assert_eq!(s["role"], "vehicle");
    assert_eq!(s["vehicle_id"], "car-1");
    assert_eq!(s["kind"], "sotw");
    assert_eq!(s["types"]["cds"]["last_acked_version"], cds.version_info);
    assert_eq!(s["types"]["cds"]["last_sent_version"], cds.version_info);
    assert_eq!(s["types"]["lds"]["last_acked_version"], lds.version_info);
    assert!(s["types"]["cds"]["last_nack"].is_null());
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_the_rejected_version_is_not_resent_until_the_snapshot_changes() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    let [_, _, lds, _] = c.bootstrap(&["a", "b"], &["r"]).await;

    // A new listener version that the client rejects.
    let mut bad = base();
    bad.listeners = vec![("l", 2)];
    h.publish(&bad);
    let lds2 = c.recv_type(LDS).await;
    // Warming: a changed listener is followed by its routes.
    let rds2 = c.recv_type(RDS).await;
    c.ack(&rds2).await;
    c.nack(&lds2, &lds.version_info, "bad listener l").await;

    let s = h
        .stream_status_when(|s| !s["types"]["lds"]["last_nack"].is_null())
        .await;
    let nack = &s["types"]["lds"]["last_nack"];
    assert_eq!(nack["version"], lds2.version_info);
    assert_eq!(nack["nonce"], lds2.nonce);
    assert_eq!(nack["message"], "bad listener l");
    assert_eq!(s["types"]["lds"]["last_acked_version"], lds.version_info);

    // The NACK itself is not answered with the same version ...
    c.assert_quiet().await;
    // ... nor is it resent when another type changes.
    let mut other = bad.clone();
    other.endpoints = vec![("a", 2), ("b", 1)];
    h.publish(&other);
    let eds = c.recv_type(EDS).await;
    c.ack(&eds).await;
    c.assert_quiet().await;

    // A fixed listener goes out.
    let mut fixed = other.clone();
    fixed.listeners = vec![("l", 3)];
    h.publish(&fixed);
    let lds3 = c.recv_type(LDS).await;
    assert_ne!(lds3.version_info, lds2.version_info);
    assert_eq!(names(&lds3), ["l"]);
}

#[tokio::test]
async fn sotw_request_with_a_stale_nonce_is_ignored() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    let first = c.ask(EDS, &["a"], None).await;
    c.ack(&first).await;

    let mut changed = base();
    changed.endpoints = vec![("a", 2), ("b", 1)];
    h.publish(&changed);
    let second = c.recv_type(EDS).await;
    assert_ne!(second.nonce, first.nonce);

    // A request still naming the first response's nonce is stale, even though it asks
    // for a new name.
    c.request(EDS, &["a", "b"], Some(&first)).await;
    c.assert_quiet().await;

    // The same request with the latest nonce is answered.
    let third = c.ask(EDS, &["a", "b"], Some(&second)).await;
    assert_eq!(names(&third), ["a", "b"]);
}

#[tokio::test]
async fn sotw_newly_requested_name_is_answered_even_if_unchanged() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    let r1 = c.ask(EDS, &["a", "b"], None).await;
    assert_eq!(names(&r1), ["a", "b"]);
    c.ack(&r1).await;
    c.assert_quiet().await;

    // Dropping a name needs no reply ...
    c.request(EDS, &["a"], Some(&r1)).await;
    c.assert_quiet().await;
    // ... asking for it again does, though nothing changed.
    let r2 = c.ask(EDS, &["a", "b"], Some(&r1)).await;
    assert_eq!(names(&r2), ["a", "b"]);
}

#[tokio::test]
async fn sotw_requested_name_that_does_not_exist_yet_is_sent_when_it_appears() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    let r1 = c.ask(EDS, &["a", "later"], None).await;
    assert_eq!(names(&r1), ["a"]);
    c.ack(&r1).await;
    c.assert_quiet().await;

    let mut spec = base();
    spec.endpoints.push(("later", 1));
    h.publish(&spec);
    let r2 = c.recv_type(EDS).await;
    assert_eq!(names(&r2), ["a", "later"]);
}

#[tokio::test]
async fn sotw_change_to_every_type_is_pushed_in_sds_cds_eds_lds_srds_rds_order() {
    let h = Harness::start(&on_demand()).await;
    let mut c = h.sotw().await;
    c.bootstrap(&["a", "b"], &["r"]).await;
    c.take(SRDS, &[]).await;
    // Warming: a new scope is followed by the routes.
    let rds = c.recv_type(RDS).await;
    c.ack(&rds).await;
    // Secrets by name, as Envoy asks once a cluster names one.
    let sds = c.take(SDS, &["ca"]).await;
    assert_eq!(names(&sds), ["ca"]);
    c.assert_quiet().await;

    h.publish(&every_type_changed());
    assert_eq!(c.recv_types(6).await, [SDS, CDS, EDS, LDS, SRDS, RDS]);
    c.assert_quiet().await;
}

#[tokio::test]
async fn sotw_scopes_are_a_full_state_wildcard_and_changed_scopes_warm_routes() {
    let mut spec = on_demand();
    let h = Harness::start(&spec).await;
    let mut c = h.sotw().await;
    c.take(LDS, &[]).await;
    let srds = c.take(SRDS, &[]).await;
    assert_eq!(names(&srds), ["s1"], "Envoy subscribes SRDS with no names");
    assert_eq!(srds.version_info, snapshot(&spec).get(SRDS).version);
    c.take(RDS, &["r"]).await;
    c.assert_quiet().await;
    let s = h
        .stream_status_when(|s| !s["types"]["srds"]["last_acked_version"].is_null())
        .await;
    assert_eq!(s["types"]["srds"]["last_acked_version"], srds.version_info);

    // Added, then changed: every scope goes out, then the routes (warming).
    for scopes in [
        vec![("s1", "r", 1), ("s2", "r", 1)],
        vec![("s1", "r", 2), ("s2", "r", 1)],
    ] {
        spec.scopes = scopes;
        h.publish(&spec);
        let r = c.recv_type(SRDS).await;
        assert_eq!(names(&r), ["s1", "s2"]);
        c.ack(&r).await;
        let r = c.recv_type(RDS).await;
        assert_eq!(names(&r), ["r"]);
        c.ack(&r).await;
        c.assert_quiet().await;
    }
    // Removed: left out of the full state, nothing to warm.
    spec.scopes = vec![("s1", "r", 2)];
    h.publish(&spec);
    let r = c.recv_type(SRDS).await;
    assert_eq!(names(&r), ["s1"]);
    c.ack(&r).await;
    c.assert_quiet().await;
}

#[tokio::test]
async fn sotw_on_demand_route_is_fetched_by_name_when_a_scope_needs_it() {
    let mut spec = on_demand();
    let h = Harness::start(&spec).await;
    let mut c = h.sotw().await;
    let rds = c.take(RDS, &["r"]).await;
    // Envoy adds an on-demand scope's route to its RDS names on first use.
    let rds = c.ask(RDS, &["r", "r-od"], Some(&rds)).await;
    assert_eq!(names(&rds), ["r", "r-od"]);
    c.ack(&rds).await;
    spec.od_routes = vec![("r-od", 2)];
    h.publish(&spec);
    let rds = c.recv_type(RDS).await;
    assert_eq!(names(&rds), ["r", "r-od"]);
}

#[tokio::test]
async fn sotw_on_demand_cluster_goes_only_to_the_stream_that_names_it() {
    let mut spec = on_demand();
    let h = Harness::start(&spec).await;
    let mut c = h.sotw().await;
    let cds = c.take(CDS, &[]).await;
    assert_eq!(names(&cds), ["a", "b"], "not part of the wildcard");
    assert_eq!(cds.version_info, snapshot(&spec).get(CDS).version);
    let mut other = h.sotw().await;
    other.take(CDS, &[]).await;

    let mut last = c.ask(CDS, &["*", "od"], Some(&cds)).await;
    assert_eq!(names(&last), ["a", "b", "od"]);
    c.ack(&last).await;
    c.assert_quiet().await;

    // Changed, removed, back: only the stream that names it hears of it.
    for (od, expected) in [
        (vec![("od", 2)], &["a", "b", "od"][..]),
        (vec![], &["a", "b"]),
        (vec![("od", 3)], &["a", "b", "od"]),
    ] {
        spec.od_clusters = od;
        h.publish(&spec);
        last = c.recv_type(CDS).await;
        assert_eq!(names(&last), expected);
        c.ack(&last).await;
        other.assert_quiet().await;
    }

    // Dropped from the names: left out of the full state, then no more updates.
    let r = c.ask(CDS, &["*"], Some(&last)).await;
    assert_eq!(names(&r), ["a", "b"]);
    c.ack(&r).await;
    spec.od_clusters = vec![("od", 4)];
    h.publish(&spec);
    c.assert_quiet().await;
}

#[tokio::test]
async fn sotw_only_types_whose_content_changed_are_pushed() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    c.bootstrap(&["a"], &["r"]).await;
    // "b" is not subscribed on EDS: its change means nothing to this stream.
    let mut spec = base();
    spec.endpoints = vec![("a", 1), ("b", 2)];
    h.publish(&spec);
    c.assert_quiet().await;
    spec.routes = vec![("r", 2)];
    h.publish(&spec);
    let r = c.recv_type(RDS).await;
    assert_eq!(names(&r), ["r"]);
    c.assert_quiet().await;
}

#[tokio::test]
async fn sotw_changed_cluster_is_followed_by_eds_even_if_its_endpoints_did_not_change() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    let [_, eds, _, _] = c.bootstrap(&["a", "b"], &["r"]).await;
    let mut spec = base();
    spec.clusters = vec![("a", 2), ("b", 1)];
    h.publish(&spec);
    let cds = c.recv_type(CDS).await;
    assert_eq!(names(&cds), ["a", "b"]);
    let eds2 = c.recv_type(EDS).await;
    assert_eq!(names(&eds2), ["a", "b"]);
    assert_eq!(
        eds2.version_info, eds.version_info,
        "same content, same version"
    );
    assert_ne!(eds2.nonce, eds.nonce);
}

#[tokio::test]
async fn sotw_removed_clusters_go_last_after_endpoints_listeners_and_routes() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    c.bootstrap(&["a", "b"], &["r"]).await;

    // Routes move from "a" to "c": "a" must stay until they have.
    h.publish(&Spec {
        clusters: vec![("b", 1), ("c", 1)],
        endpoints: vec![("b", 1), ("c", 1)],
        listeners: vec![("l", 1)],
        routes: vec![("r", 2)],
        ..Default::default()
    });
    let cds1 = c.recv_type(CDS).await;
    assert_eq!(names(&cds1), ["a", "b", "c"], "old and new clusters first");
    let eds = c.recv_type(EDS).await;
    assert_eq!(names(&eds), ["b"], "EDS still for the subscribed names");
    let rds = c.recv_type(RDS).await;
    assert_eq!(names(&rds), ["r"]);
    let cds2 = c.recv_type(CDS).await;
    assert_eq!(names(&cds2), ["b", "c"], "stale cluster removed last");
    assert_ne!(cds1.version_info, cds2.version_info);
    c.assert_quiet().await;
}

#[tokio::test]
async fn sotw_cluster_removal_alone_goes_out_in_one_reply() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    c.bootstrap(&["a", "b"], &["r"]).await;
    let mut spec = base();
    spec.clusters = vec![("b", 1)];
    h.publish(&spec);
    let cds = c.recv_type(CDS).await;
    assert_eq!(names(&cds), ["b"]);
    c.assert_quiet().await;
}

#[tokio::test]
async fn stream_whose_first_request_has_no_node_is_refused_with_invalid_argument() {
    let h = Harness::start(&base()).await;
    let mut c = h.sotw().await;
    c.node_sent = true; // pretend, so the request goes out without a node
    c.request(CDS, &[], None).await;
    let err = tokio::time::timeout(PATIENCE, c.rx.message())
        .await
        .expect("an answer")
        .expect_err("the stream fails");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node"), "{}", err.message());
}

#[tokio::test]
async fn stream_from_a_node_with_an_unknown_role_is_refused_with_invalid_argument() {
    let h = Harness::start(&base()).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "x".into(),
            cluster: "spaceship".into(),
            ..Default::default()
        }),
        type_url: CDS.type_url().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = h
        .client()
        .await
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("an answer")
        .expect_err("the stream fails");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("spaceship"), "{}", err.message());
}

#[tokio::test]
async fn an_aged_connection_is_cut_and_its_client_comes_back() {
    let config = ServeConfig {
        max_connection_age: Some(Duration::from_millis(300)),
        max_connection_age_grace: Duration::from_millis(200),
        ..ServeConfig::default()
    };
    let h = Harness::start_with(&base(), config).await;
    let mut s = h.sotw().await;
    s.request(CDS, &[], None).await;
    s.recv_type(CDS).await;
    // An ADS stream never ends by itself: past age + grace its connection is cut.
    let end = tokio::time::timeout(PATIENCE, s.rx.message())
        .await
        .expect("the aged connection is cut");
    assert!(
        !matches!(end, Ok(Some(_))),
        "a response instead of the end: {end:?}"
    );
    // A new connection is served as before.
    let mut again = h.sotw().await;
    again.request(CDS, &[], None).await;
    again.recv_type(CDS).await;
}

#[tokio::test]
async fn shutdown_ends_every_stream_and_the_server_returns() {
    let mut h = Harness::start(&base()).await;
    let mut s = h.sotw().await;
    s.request(CDS, &[], None).await;
    s.recv_type(CDS).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &[]).await;
    d.recv_type(CDS).await;
    assert_eq!(h.xds.streams().len(), 2);

    h.shutdown.take().unwrap().send(()).unwrap();
    let e = tokio::time::timeout(PATIENCE, s.rx.message())
        .await
        .expect("sotw stream ends")
        .expect_err("with a status");
    assert_eq!(e.code(), Code::Unavailable);
    let e = tokio::time::timeout(PATIENCE, d.rx.message())
        .await
        .expect("delta stream ends")
        .expect_err("with a status");
    assert_eq!(e.code(), Code::Unavailable);
    tokio::time::timeout(PATIENCE, &mut h.server)
        .await
        .expect("server returns")
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !h.xds.streams().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "registry entries linger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ================================================================ delta tests

#[tokio::test]
async fn delta_wildcard_subscription_gets_every_cluster_and_named_gets_only_its_names() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &[]).await;
    let cds = d.recv_type(CDS).await;
    assert_eq!(sorted(delta_names(&cds)), ["a", "b"]);
    assert_eq!(cds.system_version_info, snapshot(&base()).get(CDS).version);
    for r in &cds.resources {
        assert!(r.version.starts_with(PREFIX), "per-resource versions");
    }
    d.ack(&cds).await;
    d.subscribe(EDS, &["b"]).await;
    let eds = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds), ["b"]);
    d.ack(&eds).await;
    // Explicit "*" is a wildcard too.
    d.subscribe(LDS, &["*"]).await;
    let lds = d.recv_type(LDS).await;
    assert_eq!(delta_names(&lds), ["l"]);
    d.ack(&lds).await;
    d.assert_quiet().await;

    let s = h
        .stream_status_when(|s| !s["types"]["lds"]["last_acked_version"].is_null())
        .await;
    assert_eq!(s["kind"], "delta");
    assert_eq!(
        s["types"]["cds"]["last_acked_version"],
        cds.system_version_info
    );
}

#[tokio::test]
async fn delta_reconnect_with_initial_versions_gets_only_differences_and_removals() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &[]).await;
    let cds = d.recv_type(CDS).await;
    let held: HashMap<String, String> = cds
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(d);

    // While disconnected: "a" changes, "b" goes away, "c" appears.
    h.publish(&Spec {
        clusters: vec![("a", 2), ("c", 1)],
        ..base()
    });
    let mut d = h.delta().await;
    let mut held_with_stale = held.clone();
    held_with_stale.insert("gone-long-ago".into(), "old".into());
    d.send(DeltaDiscoveryRequest {
        type_url: CDS.type_url().into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: held_with_stale,
        ..Default::default()
    })
    .await;
    let r = d.recv_type(CDS).await;
    assert_eq!(sorted(delta_names(&r)), ["a", "c"]);
    assert_eq!(sorted(r.removed_resources.clone()), ["b", "gone-long-ago"]);
    d.ack(&r).await;
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_reconnect_with_everything_current_gets_an_empty_answer_only() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(EDS, &["a", "b"]).await;
    let eds = d.recv_type(EDS).await;
    let held: HashMap<String, String> = eds
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    drop(d);
    let mut d = h.delta().await;
    d.send(DeltaDiscoveryRequest {
        type_url: EDS.type_url().into(),
        resource_names_subscribe: vec!["a".into(), "b".into()],
        initial_resource_versions: held,
        ..Default::default()
    })
    .await;
    let r = d.recv_type(EDS).await;
    assert!(
        r.resources.is_empty() && r.removed_resources.is_empty(),
        "{r:?}"
    );
    d.ack(&r).await;
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_sends_only_changed_resources_and_removals_when_the_snapshot_changes() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &[]).await;
    let cds = d.recv_type(CDS).await;
    d.ack(&cds).await;
    d.subscribe(EDS, &["a", "b"]).await;
    let eds = d.recv_type(EDS).await;
    d.ack(&eds).await;

    // "b" goes away entirely; nothing else changes.
    h.publish(&Spec {
        clusters: vec![("a", 1)],
        endpoints: vec![("a", 1)],
        ..base()
    });
    let r = d.recv_type(CDS).await;
    assert!(r.resources.is_empty(), "unchanged clusters are not resent");
    assert_eq!(r.removed_resources, ["b"]);
    d.ack(&r).await;
    let r = d.recv_type(EDS).await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["b"]);
    d.ack(&r).await;
    d.assert_quiet().await;

    // One cluster changes: only it is sent, and its endpoints follow (warming).
    h.publish(&Spec {
        clusters: vec![("a", 2)],
        endpoints: vec![("a", 1)],
        ..base()
    });
    let r = d.recv_type(CDS).await;
    assert_eq!(delta_names(&r), ["a"]);
    let r = d.recv_type(EDS).await;
    assert_eq!(delta_names(&r), ["a"]);
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_removed_clusters_go_last_when_other_types_change() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &[]).await;
    d.recv_type(CDS).await;
    d.subscribe(RDS, &["r"]).await;
    d.recv_type(RDS).await;
    h.publish(&Spec {
        clusters: vec![("b", 1), ("c", 1)],
        routes: vec![("r", 2)],
        ..base()
    });
    let r = d.recv_type(CDS).await;
    assert_eq!(delta_names(&r), ["c"]);
    assert!(r.removed_resources.is_empty());
    let r = d.recv_type(RDS).await;
    assert_eq!(delta_names(&r), ["r"]);
    let r = d.recv_type(CDS).await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["a"]);
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_unsubscribed_resources_are_no_longer_sent() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(EDS, &["a", "b"]).await;
    let r = d.recv_type(EDS).await;
    d.ack(&r).await;
    d.unsubscribe(EDS, &["b"]).await;
    d.assert_quiet().await;
    h.publish(&Spec {
        endpoints: vec![("a", 1), ("b", 2)],
        ..base()
    });
    d.assert_quiet().await;
    h.publish(&Spec {
        endpoints: vec![("a", 2), ("b", 3)],
        ..base()
    });
    let r = d.recv_type(EDS).await;
    assert_eq!(delta_names(&r), ["a"]);
}

#[tokio::test]
async fn delta_subscription_to_a_missing_name_is_answered_as_removed_and_sent_when_it_appears() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(EDS, &["a", "later"]).await;
    let r = d.recv_type(EDS).await;
    assert_eq!(delta_names(&r), ["a"]);
    assert_eq!(r.removed_resources, ["later"], "does-not-exist answer");
    d.ack(&r).await;
    d.assert_quiet().await;
    h.publish(&Spec {
        endpoints: vec![("a", 1), ("b", 1), ("later", 1)],
        ..base()
    });
    let r = d.recv_type(EDS).await;
    assert_eq!(delta_names(&r), ["later"]);
    assert!(r.removed_resources.is_empty());
}

#[tokio::test]
async fn delta_resubscribing_to_a_held_resource_resends_it() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(EDS, &["a"]).await;
    let r = d.recv_type(EDS).await;
    d.ack(&r).await;
    d.subscribe(EDS, &["a"]).await;
    let r = d.recv_type(EDS).await;
    assert_eq!(delta_names(&r), ["a"], "the client may have forgotten it");
}

#[tokio::test]
async fn delta_named_cluster_subscription_is_not_a_wildcard() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &["b"]).await;
    let r = d.recv_type(CDS).await;
    assert_eq!(delta_names(&r), ["b"]);
    d.ack(&r).await;
    h.publish(&Spec {
        clusters: vec![("a", 2), ("b", 1), ("z", 1)],
        ..base()
    });
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_unsubscribing_a_name_also_covered_by_the_wildcard_resends_it() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(CDS, &["*", "a"]).await;
    let r = d.recv_type(CDS).await;
    assert_eq!(sorted(delta_names(&r)), ["a", "b"]);
    d.ack(&r).await;
    d.unsubscribe(CDS, &["a"]).await;
    let r = d.recv_type(CDS).await;
    assert_eq!(delta_names(&r), ["a"], "still covered by the wildcard");
}

#[tokio::test]
async fn delta_change_to_every_type_goes_out_in_sds_cds_eds_lds_srds_rds_order() {
    let h = Harness::start(&on_demand()).await;
    let mut d = h.delta().await;
    for (t, names) in [
        (CDS, &[][..]),
        (EDS, &["a", "b"]),
        (LDS, &[]),
        (SRDS, &[]),
        (RDS, &["r"]),
        (SDS, &["ca"]),
    ] {
        d.take(t, names).await;
    }
    d.assert_quiet().await;
    h.publish(&every_type_changed());
    assert_eq!(d.recv_types(6).await, [SDS, CDS, EDS, LDS, SRDS, RDS]);
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_nack_is_recorded_and_the_rejected_version_is_not_resent() {
    let h = Harness::start(&base()).await;
    let mut d = h.delta().await;
    d.subscribe(LDS, &[]).await;
    let r = d.recv_type(LDS).await;
    d.ack(&r).await;
    h.publish(&Spec {
        listeners: vec![("l", 2)],
        ..base()
    });
    let bad = d.recv_type(LDS).await;
    d.nack(&bad, "listener l: bad filter").await;
    let s = h
        .stream_status_when(|s| !s["types"]["lds"]["last_nack"].is_null())
        .await;
    assert_eq!(s["types"]["lds"]["last_nack"]["nonce"], bad.nonce);
    assert_eq!(
        s["types"]["lds"]["last_nack"]["version"],
        bad.system_version_info
    );
    assert_eq!(
        s["types"]["lds"]["last_nack"]["message"],
        "listener l: bad filter"
    );
    d.assert_quiet().await;
    // Another type changing does not bring the rejected listener back.
    h.publish(&Spec {
        listeners: vec![("l", 2)],
        clusters: vec![("a", 1)],
        ..base()
    });
    d.assert_quiet().await;
    h.publish(&Spec {
        listeners: vec![("l", 3)],
        clusters: vec![("a", 1)],
        ..base()
    });
    let r = d.recv_type(LDS).await;
    assert_eq!(delta_names(&r), ["l"]);
    assert_ne!(r.resources[0].version, bad.resources[0].version);
}

#[tokio::test]
async fn delta_scopes_are_a_wildcard_and_their_routes_are_fetched_by_name() {
    let mut spec = on_demand();
    let h = Harness::start(&spec).await;
    let mut d = h.delta().await;
    d.take(LDS, &[]).await;
    let srds = d.take(SRDS, &[]).await;
    assert_eq!(
        delta_names(&srds),
        ["s1"],
        "Envoy subscribes SRDS with no names"
    );
    d.take(RDS, &["r"]).await;
    d.assert_quiet().await;
    let s = h
        .stream_status_when(|s| !s["types"]["srds"]["last_acked_version"].is_null())
        .await;
    assert_eq!(
        s["types"]["srds"]["last_acked_version"],
        srds.system_version_info
    );

    // Added: only the new scope; its on-demand route is not subscribed, so no RDS.
    spec.scopes.push(("s2", "r-od", 1));
    h.publish(&spec);
    assert_eq!(d.recv_ack(SRDS).await, (vec!["s2".into()], vec![]));
    d.assert_quiet().await;
    // First use of the on-demand scope: Envoy asks for its route by name.
    assert_eq!(delta_names(&d.take(RDS, &["r-od"]).await), ["r-od"]);
    // Changed: the scope, then the route it names (warming).
    spec.scopes = vec![("s1", "r", 1), ("s2", "r-od", 2)];
    h.publish(&spec);
    assert_eq!(d.recv_ack(SRDS).await, (vec!["s2".into()], vec![]));
    assert_eq!(d.recv_ack(RDS).await, (vec!["r-od".into()], vec![]));
    d.assert_quiet().await;
    // Removed.
    spec.scopes = vec![("s1", "r", 1)];
    h.publish(&spec);
    assert_eq!(d.recv_ack(SRDS).await, (vec![], vec!["s2".into()]));
    d.assert_quiet().await;
}

#[tokio::test]
async fn delta_on_demand_cluster_goes_only_to_the_stream_that_names_it() {
    let mut spec = on_demand();
    let h = Harness::start(&spec).await;
    let mut d = h.delta().await;
    let cds = d.take(CDS, &["*"]).await;
    assert_eq!(
        sorted(delta_names(&cds)),
        ["a", "b"],
        "not part of the wildcard"
    );
    let mut other = h.delta().await;
    other.take(CDS, &["*"]).await;

    // Envoy's on-demand CDS adds the name without repeating "*".
    assert_eq!(delta_names(&d.take(CDS, &["od"]).await), ["od"]);
    // A name that does not exist is answered at once, so the lookup fails fast.
    let r = d.take(CDS, &["nope"]).await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["nope"]);
    d.assert_quiet().await;

    for (od, expected) in [
        (vec![("od", 2)], (vec!["od".to_string()], vec![])),
        (vec![], (vec![], vec!["od".to_string()])),
        (vec![("od", 3)], (vec!["od".to_string()], vec![])),
    ] {
        spec.od_clusters = od;
        h.publish(&spec);
        assert_eq!(d.recv_ack(CDS).await, expected);
        other.assert_quiet().await;
    }

    // Unsubscribed: nothing to say, and no more updates; the wildcard stays.
    d.unsubscribe(CDS, &["od"]).await;
    d.assert_quiet().await;
    spec.od_clusters = vec![("od", 4)];
    h.publish(&spec);
    d.assert_quiet().await;
    spec.clusters = vec![("a", 2), ("b", 1)];
    h.publish(&spec);
    assert_eq!(d.recv_ack(CDS).await, (vec!["a".into()], vec![]));
    assert_eq!(other.recv_ack(CDS).await, (vec!["a".into()], vec![]));
}

#[tokio::test]
async fn nacks_are_counted_in_metrics_by_type() {
    let h = Harness::start(&base()).await;
    let mut reg = prometheus_client::registry::Registry::default();
    h.xds.register_metrics(&mut reg);
    let mut c = h.sotw().await;
    let r = c.ask(CDS, &[], None).await;
    c.nack(&r, "", "nope").await;
    let _ = h
        .stream_status_when(|s| !s["types"]["cds"]["last_nack"].is_null())
        .await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(
        text.contains("misaki_xds_nacks_total{type=\"cds\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("misaki_xds_streams{kind=\"sotw\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("misaki_xds_push_bytes_total{type=\"cds\"}"),
        "{text}"
    );
    assert!(
        text.contains("misaki_xds_push_bytes_total{type=\"srds\"} 0"),
        "every type has its series from the start: {text}"
    );
}
