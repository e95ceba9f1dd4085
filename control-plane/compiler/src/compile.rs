//! (policy, node) → [`Snapshot`]: the translation of mesh policy into Envoy resources.
//!
//! Invariants:
//! - pure: no I/O, no clocks, no randomness; the same inputs give byte-identical output
//!   (policy maps are `BTreeMap`s, so iteration order is fixed);
//! - every cluster a route names exists in the same snapshot, and every EDS cluster has
//!   exactly one ClusterLoadAssignment of the same name;
//! - endpoints always carry a locality with a load-balancing weight (proxyless gRPC
//!   clients reject endpoints without one).
//!
//! What a node gets:
//!
//! | role    | listener (port)                           | routes to                                   |
//! |---------|-------------------------------------------|---------------------------------------------|
//! | vehicle | `vehicle_outbound` (127.0.0.1:outbound)   | every service: `out|svc` (cloud/edge) or `in|svc` (on this vehicle) |
//! | vehicle, with [`VehicleState`] (edge-netd's local tier) | `vehicle_outbound` | cloud/edge services: `out|svc|uplink`, the uplink selected for the class; none usable: a 503 `x-misaki-reason: no-uplink`, or `misaki|defer` (store-and-forward) for deferrable classes |
//! | vehicle | `vehicle_inbound` (0.0.0.0:inbound)       | the vehicle's own services: `in|svc`         |
//! | cloud   | `cloud_inbound` (0.0.0.0:cloud_inbound)   | cloud and edge services: `in|svc`            |
//!
//! Uplink-bound clusters (vehicle state given): every cloud/edge service gets one
//! cluster per uplink its class allows and the vehicle has, pinned to that uplink's
//! interface (`SO_BINDTODEVICE`) and marked with the class's DSCP. They exist whatever
//! the selection, so a selection change alters only route configurations (RDS): no
//! cluster warms, and no pooled connection over the old uplink is reused.
//!
//! Each listener's HTTP connection manager takes its routes over RDS (a route
//! configuration of the listener's name), and clusters take endpoints over EDS when
//! every endpoint is an IP address (STRICT_DNS with inline endpoints otherwise: EDS
//! endpoints cannot be DNS names).
//!
//! With `mesh.mtls` on (see [`crate::mtls`]) a vehicle reaches a cloud or edge service
//! through the cloud sidecar next to each instance, `<endpoint host>:<cloud_inbound_port>`,
//! over TLS and HTTP/2; that sidecar's `cloud_inbound` takes TLS (`strict`) or TLS and
//! plaintext (`permissive`) and routes to the instances as before. Off, a vehicle's
//! clusters go to the instances themselves, in plaintext.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, OutlierDetection, cluster};
use envoy_types::pb::envoy::config::core::v3::{BindConfig, SocketOption, socket_option};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, RuntimeFeatureFlag, TypedExtensionConfig, data_source,
};
use envoy_types::pb::envoy::config::core::v3::{RoutingPriority, TransportSocket};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch,
    ScopedRouteConfiguration, VirtualHost, retry_policy, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig as AggregateClusterConfig;
use envoy_types::pb::envoy::extensions::compression::zstd::decompressor::v3::Zstd as ZstdDecompressor;
use envoy_types::pb::envoy::extensions::filters::http::decompressor::v3::{
    Decompressor, decompressor,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use misaki_policy::{
    Location, LowPowerAction, MtlsMode, Policy, Protocol, RoutePriority, Service, TrafficClass,
};
use prost::{Message, Name};

use crate::envoy::{
    ads, any, direct_response, failover_retry_limit, hcm, hcm_chain, hcm_routed, header,
    http2_upstream, load_assignment, pb_duration, socket,
};
use crate::gateway::{self, Reach, VehicleConditions};
use crate::local::VehicleState;
use crate::mtls::{self, SecretSource};
use crate::node::{NodeInfo, Role};
use crate::on_demand;
use crate::scope::{Presence, Scope};
use crate::snapshot::{Resource, ResourceType, Resources, Snapshot};

/// Listener and route-configuration names (one route configuration per listener).
pub const VEHICLE_OUTBOUND: &str = "vehicle_outbound";
pub const VEHICLE_INBOUND: &str = "vehicle_inbound";
pub const CLOUD_INBOUND: &str = "cloud_inbound";

/// Request header carrying the traffic class, so upstreams (and edge-netd) see it.
pub const CLASS_HEADER: &str = "x-misaki-class";

pub use crate::envoy::REASON_HEADER;

/// `x-misaki-reason` of a request for a service outside a closed vehicle scope.
pub const NOT_IN_SCOPE: &str = "not-in-scope";

/// Cluster of edge-netd's store-and-forward ingest (deferrable classes without uplink).
pub const DEFER_CLUSTER: &str = "misaki|defer";

/// Cluster for a service reached over one uplink (vehicle state given).
pub fn uplink_cluster(svc: &str, uplink: &str) -> String {
    format!("out|{svc}|{uplink}")
}

/// Aggregate cluster for a service: `first`'s uplink cluster, then the class's others
/// (vehicle state with `cross_uplink_retry`).
pub fn failover_cluster(svc: &str, first: &str) -> String {
    format!("agg|{svc}|{first}")
}

/// Cluster for a service reached across the network from a vehicle.
pub fn outbound_cluster(svc: &str) -> String {
    format!("out|{svc}")
}

/// Cluster for a service's local instances (on this vehicle, or behind this cloud sidecar).
pub fn inbound_cluster(svc: &str) -> String {
    format!("in|{svc}")
}

/// Compile the snapshot for one node. `version_prefix` makes versions unique per
/// server instance (see [`crate::snapshot`]).
pub fn compile(policy: &Policy, node: &NodeInfo, version_prefix: &str) -> Snapshot {
    compile_for(
        policy,
        node,
        None,
        VehicleConditions::default(),
        version_prefix,
    )
}

/// [`compile`] for a vehicle node in `conditions` (what misaki-cp's fleet registry
/// knows of it: low power moves its own callers of `on_low_power: cloud` services to
/// the cloud replica). Other roles ignore them.
pub fn compile_in(
    policy: &Policy,
    node: &NodeInfo,
    conditions: VehicleConditions,
    version_prefix: &str,
) -> Snapshot {
    compile_for(policy, node, None, conditions, version_prefix)
}

/// Compile a vehicle node's snapshot with what only the vehicle knows: uplink-bound
/// clusters, routes following the selection (edge-netd's local xDS tier). Other roles
/// ignore `state`.
pub fn compile_vehicle(
    policy: &Policy,
    node: &NodeInfo,
    state: &VehicleState,
    version_prefix: &str,
) -> Snapshot {
    let conditions = VehicleConditions {
        low_power: state.low_power,
    };
    compile_for(policy, node, Some(state), conditions, version_prefix)
}

fn compile_for(
    policy: &Policy,
    node: &NodeInfo,
    state: Option<&VehicleState>,
    conditions: VehicleConditions,
    version_prefix: &str,
) -> Snapshot {
    let scope = Scope::of(policy);
    // Envoys on delta xDS can fetch what they do not hold yet; SotW and proxyless
    // gRPC clients cannot.
    let on_demand = node.delta && !node.proxyless;
    let mut out = match node.role {
        Role::Vehicle => {
            let mut out = Output::default();
            if policy.mesh.mtls != MtlsMode::Off {
                out.vehicle_tls(policy, node, state);
            }
            vehicle(&mut out, policy, &scope, state, conditions, on_demand);
            out.add_gateway_clusters(policy, state);
            if let Some(id) = &node.vehicle_id {
                out.add_tunnel_listeners(policy, id, state);
            }
            out
        }
        Role::Cloud => cloud(policy, node.tls_dir()),
    };
    if node.proxyless {
        out.add_api_listeners(policy, &scope, node.role);
    }
    out.into_snapshot(version_prefix)
}

/// `shared`, compiled by [`compile_in`] for a vehicle node without its vehicle id (a
/// compile key shared by a fleet), plus what only vehicle `vehicle` has: its tunnel
/// listeners. The same as compiling for the node with its id (tested). Without
/// gateways in the policy, `shared` itself.
pub fn with_vehicle_id(
    shared: &Arc<Snapshot>,
    policy: &Policy,
    vehicle: &str,
    version_prefix: &str,
) -> Arc<Snapshot> {
    let mut out = Output::default();
    out.add_tunnel_listeners(policy, vehicle, None);
    if out.listeners.is_empty() {
        return shared.clone();
    }
    let own = out
        .listeners
        .iter()
        .map(|l| Arc::new(Resource::new(version_prefix, l.name.clone(), l)));
    let listeners = shared
        .get(ResourceType::Listener)
        .eager()
        .cloned()
        .chain(own);
    let snapshot = (**shared).clone().with(
        ResourceType::Listener,
        Resources::from_items(version_prefix, listeners),
    );
    Arc::new(snapshot)
}

/// The class whose uplinks carry the vehicles' tunnels (`None`: no gateways).
fn tunnel_class(policy: &Policy) -> Option<&TrafficClass> {
    let m = &policy.mesh;
    if m.vehicle_gateways.is_empty() {
        return None;
    }
    m.vehicle_tunnel_class.as_ref().map(|c| &policy.classes[c])
}

/// Resources before versioning.
#[derive(Default)]
struct Output {
    secrets: Vec<Secret>,
    clusters: Vec<Cluster>,
    endpoints: Vec<ClusterLoadAssignment>,
    listeners: Vec<Listener>,
    routes: Vec<RouteConfiguration>,
    scoped_routes: Vec<ScopedRouteConfiguration>,
    /// Resources sent only to clients that ask for them by name.
    on_demand: BTreeSet<(ResourceType, String)>,
    /// Aggregate cluster → its member clusters: an on-demand aggregate brings its
    /// members along (Envoy fetches the cluster a route names, never its members).
    members: Vec<(String, Vec<String>)>,
    /// Vehicle clusters to cloud/edge services go over TLS to the sidecars' inbound
    /// port (`mesh.mtls` on).
    upstream_tls: Option<UpstreamTls>,
}

/// How a vehicle reaches cloud and edge sidecars with mTLS on.
struct UpstreamTls {
    socket: TransportSocket,
    /// The sidecars' `cloud_inbound_port`, on each instance's host.
    port: u16,
}

impl Output {
    fn into_snapshot(self, prefix: &str) -> Snapshot {
        let on_demand = &self.on_demand;
        let versioned = |t: ResourceType, items: Vec<Arc<Resource>>| {
            let (lazy, eager): (Vec<_>, Vec<_>) = items
                .into_iter()
                .partition(|r| on_demand.contains(&(t, r.name.to_string())));
            Resources::with_on_demand(prefix, eager, lazy)
        };
        fn encoded<M: Message + Name>(
            prefix: &str,
            items: &[M],
            name: impl Fn(&M) -> &str,
        ) -> Vec<Arc<Resource>> {
            items
                .iter()
                .map(|m| Arc::new(Resource::new(prefix, name(m), m)))
                .collect()
        }
        use ResourceType as T;
        let members = self
            .members
            .iter()
            .filter(|(agg, _)| on_demand.contains(&(T::Cluster, agg.clone())))
            .cloned();
        Snapshot::new(
            versioned(T::Cluster, encoded(prefix, &self.clusters, |c| &c.name))
                .with_companions(prefix, members),
            versioned(
                T::Endpoint,
                encoded(prefix, &self.endpoints, |c| &c.cluster_name),
            ),
            versioned(T::Listener, encoded(prefix, &self.listeners, |l| &l.name)),
            versioned(T::Route, encoded(prefix, &self.routes, |r| &r.name)),
        )
        .with_scoped_routes(versioned(
            T::ScopedRoute,
            encoded(prefix, &self.scoped_routes, |s| &s.name),
        ))
        .with(
            T::Secret,
            versioned(T::Secret, encoded(prefix, &self.secrets, |s| &s.name)),
        )
    }

    /// mTLS to cloud and edge sidecars: SDS by file on the node's disk when misaki-cp
    /// feeds it; over ADS from edge-netd's tier (`state`), which also serves the
    /// vehicle's own credential, when it has one. A proxyless gRPC client takes
    /// neither: its own bootstrap provides its certificate.
    fn vehicle_tls(&mut self, policy: &Policy, node: &NodeInfo, state: Option<&VehicleState>) {
        let td = &policy.mesh.trust_domain;
        let socket = match state {
            _ if node.proxyless => mtls::proxyless_upstream(td),
            Some(_) => mtls::vehicle_upstream(td, SecretSource::Ads),
            None => mtls::vehicle_upstream(td, SecretSource::Files(node.tls_dir())),
        };
        self.upstream_tls = Some(UpstreamTls {
            socket,
            port: policy.mesh.cloud_inbound_port,
        });
        let credential = state.and_then(|s| s.credential.as_deref());
        if let Some(c) = credential.filter(|_| !node.proxyless) {
            self.secrets = mtls::vehicle_secrets(c);
        }
    }

    /// Mark what was added since `clusters`/`endpoints` resources as on demand.
    fn on_demand_since(&mut self, clusters: usize, endpoints: usize) {
        for c in &self.clusters[clusters..] {
            self.on_demand
                .insert((ResourceType::Cluster, c.name.clone()));
        }
        for e in &self.endpoints[endpoints..] {
            self.on_demand
                .insert((ResourceType::Endpoint, e.cluster_name.clone()));
        }
    }

    /// Proxyless gRPC clients resolve `xds:///<service>` through a Listener named after
    /// the service whose `api_listener` points at the role's route configuration; the
    /// service's Host-matched virtual host (domain = service name) does the rest.
    fn add_api_listeners(&mut self, policy: &Policy, scope: &Scope<'_>, role: Role) {
        let route_config = match role {
            Role::Vehicle => VEHICLE_OUTBOUND,
            Role::Cloud => CLOUD_INBOUND,
        };
        for svc in policy.services.values() {
            let absent = match role {
                Role::Cloud => svc.location == Location::Vehicle,
                Role::Vehicle => scope.presence(svc, false) == Presence::Absent,
            };
            if absent {
                continue;
            }
            let hcm = hcm(route_config, Vec::new());
            self.listeners.push(Listener {
                name: svc.name.clone(),
                api_listener: Some(ApiListener {
                    api_listener: Some(any(&hcm)),
                }),
                ..Default::default()
            });
        }
    }

    /// The vehicle's outbound listener over scoped routes (see [`crate::on_demand`]);
    /// `hosts` are the services' routes in the order of `presences`.
    fn add_scoped_outbound(
        &mut self,
        port: u16,
        presences: &[(&str, Presence)],
        hosts: Vec<(VirtualHost, Vec<Route>)>,
    ) {
        let mut scopes = on_demand::Scopes::default();
        for ((svc, presence), (by_host, by_path)) in presences.iter().zip(hosts) {
            scopes.add(svc, &by_host, by_path, *presence == Presence::Eager);
        }
        let built = scopes.finish(VEHICLE_OUTBOUND);
        for (rc, lazy) in built.routes {
            if lazy {
                self.on_demand
                    .insert((ResourceType::Route, rc.name.clone()));
            }
            self.routes.push(rc);
        }
        self.scoped_routes = built.scopes;
        let hcm = hcm_routed(
            VEHICLE_OUTBOUND,
            http_connection_manager::RouteSpecifier::ScopedRoutes(on_demand::scoped_routes(
                VEHICLE_OUTBOUND,
            )),
            on_demand::filters(),
        );
        self.listeners
            .push(listener(VEHICLE_OUTBOUND, "127.0.0.1", port, &hcm));
    }

    /// The clusters of a service the vehicle reaches across the network, and where its
    /// routes go: `out|svc` following the routing table (no vehicle state), or the
    /// uplink-bound ones. `defer`: set when the class goes to store-and-forward now.
    fn add_remote(
        &mut self,
        svc: &Service,
        class: &TrafficClass,
        state: Option<&VehicleState>,
        defer: &mut bool,
    ) -> Target {
        match state {
            None => {
                let cluster = outbound_cluster(&svc.name);
                self.add_cluster(cluster.clone(), svc, class, false, None);
                Target::Cluster(cluster)
            }
            Some(state) => {
                let target = self.add_uplink_clusters(svc, class, state);
                *defer |= target.is_defer();
                target
            }
        }
    }

    /// The vehicle-state clusters of a cloud/edge service: one bound cluster per uplink
    /// its class allows and the vehicle has, plus the cross-uplink aggregates when on;
    /// returns where the class's routes go now.
    fn add_uplink_clusters(
        &mut self,
        svc: &Service,
        class: &TrafficClass,
        state: &VehicleState,
    ) -> Target {
        let mut bound = Vec::new();
        for uplink in &class.uplinks {
            if let Some(iface) = state.interfaces.get(uplink) {
                let cluster = uplink_cluster(&svc.name, uplink);
                self.add_cluster(cluster.clone(), svc, class, false, Some(iface));
                bound.push((uplink.as_str(), cluster));
            }
        }
        // Crossing uplinks needs somewhere to cross to, and retries.
        let failover = state.cross_uplink_retry && bound.len() > 1 && class.retries > 0;
        if failover {
            // A connect that hangs on a dead uplink must also end within the try's
            // share, so the retry can cross.
            let share = per_try_timeout(class).min(Duration::from_secs(5));
            for c in self.clusters.iter_mut().rev().take(bound.len()) {
                c.connect_timeout = Some(pb_duration(share));
                c.circuit_breakers = Some(failover_retry_limit());
            }
            for (first, _) in &bound {
                self.add_failover_cluster(&svc.name, first, &bound);
            }
        }
        match state.uplink_for(&class.name, &class.uplinks) {
            Some(u) if failover => Target::Failover(failover_cluster(&svc.name, u)),
            Some(u) => Target::Cluster(uplink_cluster(&svc.name, u)),
            None if class.deferrable && state.defer_to.is_some() => {
                Target::Cluster(DEFER_CLUSTER.to_string())
            }
            None => Target::NoUplink,
        }
    }

    /// An aggregate cluster over `svc`'s uplink clusters, `first`'s at priority 0, the
    /// others in the class's order after it.
    fn add_failover_cluster(&mut self, svc: &str, first: &str, bound: &[(&str, String)]) {
        let order: Vec<String> = bound
            .iter()
            .filter(|(u, _)| *u == first)
            .chain(bound.iter().filter(|(u, _)| *u != first))
            .map(|(_, c)| c.clone())
            .collect();
        self.members
            .push((failover_cluster(svc, first), order.clone()));
        self.clusters.push(Cluster {
            name: failover_cluster(svc, first),
            lb_policy: cluster::LbPolicy::ClusterProvided as i32,
            circuit_breakers: Some(failover_retry_limit()),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::ClusterType(
                cluster::CustomClusterType {
                    name: "envoy.clusters.aggregate".to_string(),
                    typed_config: Some(any(&AggregateClusterConfig { clusters: order })),
                },
            )),
            ..Default::default()
        });
    }

    /// Add a cluster for `svc`'s instances; EDS when possible. `interface`: bind its
    /// connections to that uplink (`SO_BINDTODEVICE`).
    fn add_cluster(
        &mut self,
        name: String,
        svc: &Service,
        class: &TrafficClass,
        local: bool,
        interface: Option<&str>,
    ) {
        let tls = self.upstream_tls.as_ref().filter(|_| !local);
        let endpoints = if svc.endpoints.is_empty() {
            // Vehicle services without explicit endpoints listen on the vehicle's loopback.
            vec![("127.0.0.1".to_string(), svc.port)]
        } else if let Some(tls) = tls {
            // The cloud sidecar on each instance's host; once per host.
            let mut hosts: Vec<(String, u16)> = Vec::new();
            for e in &svc.endpoints {
                if !hosts.iter().any(|(h, _)| *h == e.host) {
                    hosts.push((e.host.clone(), tls.port));
                }
            }
            hosts
        } else {
            svc.endpoints
                .iter()
                .map(|e| (e.host.clone(), e.port))
                .collect()
        };
        let cla = load_assignment(&name, svc.location, &endpoints);
        let all_ip = endpoints.iter().all(|(h, _)| h.parse::<IpAddr>().is_ok());
        let mut c = Cluster {
            name: name.clone(),
            connect_timeout: Some(pb_duration(class.timeout.min(Duration::from_secs(5)))),
            ..Default::default()
        };
        if all_ip {
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Eds as i32,
            ));
            c.eds_cluster_config = Some(cluster::EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: String::new(),
            });
            self.endpoints.push(cla);
        } else {
            c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32,
            ));
            c.load_assignment = Some(cla);
        }
        if let Some(tls) = tls {
            c.transport_socket = Some(tls.socket.clone());
        }
        // gRPC needs HTTP/2; so does TLS to a sidecar, which offers only h2 by ALPN.
        if svc.protocol == Protocol::Grpc || tls.is_some() {
            c.typed_extension_protocol_options.insert(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
                any(&http2_upstream()),
            );
        }
        if !local {
            // Across the network: eject failing endpoints fast so retries go elsewhere.
            c.outlier_detection = Some(OutlierDetection {
                consecutive_5xx: Some(UInt32Value { value: 5 }),
                interval: Some(pb_duration(Duration::from_secs(5))),
                ..Default::default()
            });
            let mut socket_options = Vec::new();
            socket_options.extend(interface.map(bind_to_device));
            if class.dscp != 0 {
                socket_options.push(dscp_option(class.dscp));
            }
            if !socket_options.is_empty() {
                c.upstream_bind_config = Some(BindConfig {
                    socket_options,
                    ..Default::default()
                });
            }
        }
        self.clusters.push(c);
    }
}

/// A vehicle node's resources, into `out` (which says how to reach sidecars).
fn vehicle(
    out: &mut Output,
    policy: &Policy,
    scope: &Scope<'_>,
    state: Option<&VehicleState>,
    conditions: VehicleConditions,
    on_demand: bool,
) {
    let mut outbound_hosts = Vec::new();
    let mut inbound_hosts = Vec::new();
    let mut presences = Vec::new();
    let mut defer = false;
    for svc in policy.services.values() {
        let presence = scope.presence(svc, on_demand);
        if presence == Presence::Absent {
            continue;
        }
        let (clusters_before, endpoints_before) = (out.clusters.len(), out.endpoints.len());
        let class = policy.class_of(svc);
        match svc.location {
            Location::Vehicle => {
                // Same-vehicle traffic goes straight to the local instance.
                let cluster = inbound_cluster(&svc.name);
                out.add_cluster(cluster.clone(), svc, class, true, None);
                let local = Target::Cluster(cluster);
                // The replica's clusters exist whatever the power, so a power change
                // only swaps routes (RDS), as an uplink change does.
                let moves = svc.on_low_power == LowPowerAction::Cloud;
                let outbound = match replica_service(svc).filter(|_| moves) {
                    Some(replica) => {
                        let to_cloud = out.add_remote(&replica, class, state, &mut defer);
                        if conditions.low_power {
                            to_cloud
                        } else {
                            local.clone()
                        }
                    }
                    None => local.clone(),
                };
                outbound_hosts.push(virtual_host(svc, class, &outbound));
                inbound_hosts.push(virtual_host(svc, class, &local));
            }
            Location::Edge | Location::Cloud => {
                let target = out.add_remote(svc, class, state, &mut defer);
                outbound_hosts.push(virtual_host(svc, class, &target));
            }
        }
        if presence == Presence::OnDemand {
            out.on_demand_since(clusters_before, endpoints_before);
        }
        presences.push((svc.name.as_str(), presence));
    }
    if let Some(addr) = state.and_then(|s| s.defer_to).filter(|_| defer) {
        out.clusters.push(defer_cluster(addr));
    }
    let m = &policy.mesh;
    if presences.iter().any(|(_, p)| *p == Presence::OnDemand) {
        out.add_scoped_outbound(m.vehicle_outbound_port, &presences, outbound_hosts);
    } else {
        out.listeners.push(http_listener(
            VEHICLE_OUTBOUND,
            "127.0.0.1",
            m.vehicle_outbound_port,
            Vec::new(),
        ));
        let mut outbound = route_config(VEHICLE_OUTBOUND, outbound_hosts);
        if scope.is_closed() {
            // Say why rather than Envoy's bare 404: the service may exist in the mesh.
            if let Some(by_path) = outbound.virtual_hosts.last_mut() {
                by_path.routes.push(not_in_scope());
            }
        }
        out.routes.push(outbound);
    }
    if !inbound_hosts.is_empty() {
        out.listeners.push(http_listener(
            VEHICLE_INBOUND,
            "0.0.0.0",
            m.vehicle_inbound_port,
            Vec::new(),
        ));
    }
    // Tunnel listeners take the inbound routes too, even when there are none.
    if !inbound_hosts.is_empty() || tunnel_class(policy).is_some() {
        out.routes
            .push(route_config(VEHICLE_INBOUND, inbound_hosts));
    }
}

/// The last route of a closed scope: a request for a service outside it.
fn not_in_scope() -> Route {
    Route {
        name: "not-in-scope".to_string(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::DirectResponse(DirectResponseAction {
            status: 404,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(
                    "no service of this vehicle consumes a service at this host or path (see `consumes` in the mesh policy)\n"
                        .to_string(),
                )),
                ..Default::default()
            }),
            ..Default::default()
        })),
        response_headers_to_add: vec![header(REASON_HEADER, NOT_IN_SCOPE)],
        ..Default::default()
    }
}

/// Edge-netd's store-and-forward ingest on the vehicle's loopback: a static cluster,
/// so no EDS round trip stands between a dead uplink and a 202.
fn defer_cluster(addr: std::net::SocketAddr) -> Cluster {
    Cluster {
        name: DEFER_CLUSTER.to_string(),
        connect_timeout: Some(pb_duration(Duration::from_secs(1))),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(load_assignment(
            DEFER_CLUSTER,
            Location::Vehicle,
            &[(addr.ip().to_string(), addr.port())],
        )),
        ..Default::default()
    }
}

/// The class's timeout shared among its tries (with cross-uplink retries).
fn per_try_timeout(class: &TrafficClass) -> Duration {
    class.timeout / class.retries.saturating_add(1)
}

impl Target {
    fn is_defer(&self) -> bool {
        matches!(self, Target::Cluster(c) if c == DEFER_CLUSTER)
    }
}

/// Where a service's routes send requests.
#[derive(Clone)]
enum Target {
    Cluster(String),
    /// An aggregate cluster whose priorities are uplinks: retries move down them.
    Failover(String),
    /// The class has no usable uplink: answer at once rather than wait for a timeout.
    NoUplink,
    /// A cloud call for a vehicle service of a vehicle the registry has offline, and no
    /// replica to take it: answer at once rather than wait for a tunnel.
    VehicleOffline,
}

/// A vehicle service's cloud replica as a cloud service of the same name (`None`: it
/// has none).
fn replica_service(svc: &Service) -> Option<Service> {
    (!svc.cloud_replica.is_empty()).then(|| Service {
        location: Location::Cloud,
        endpoints: svc.cloud_replica.clone(),
        consumes: None,
        cloud_replica: Vec::new(),
        on_low_power: LowPowerAction::Stay,
        ..svc.clone()
    })
}

/// A cloud (or edge) sidecar's resources; `tls_dir` holds its certificate's SDS files.
fn cloud(policy: &Policy, tls_dir: &str) -> Output {
    let mut out = Output::default();
    let mut hosts = Vec::new();
    let replicas: Vec<Service> = policy
        .services
        .values()
        .filter_map(replica_service)
        .collect();
    let served = policy
        .services
        .values()
        .filter(|s| s.location != Location::Vehicle)
        .chain(&replicas);
    for svc in served {
        let class = policy.class_of(svc);
        let cluster = inbound_cluster(&svc.name);
        out.add_cluster(cluster.clone(), svc, class, true, None);
        hosts.push(virtual_host(svc, class, &Target::Cluster(cluster)));
    }
    // Deferred traffic arrives from edge-netd zstd-compressed; Envoy undoes it so the
    // service sees a plain body.
    let deferred = policy
        .services
        .values()
        .any(|s| s.location != Location::Vehicle && policy.class_of(s).deferrable);
    let filters = if deferred {
        vec![zstd_request_decompressor()]
    } else {
        Vec::new()
    };
    let m = &policy.mesh;
    out.listeners.push(match m.mtls {
        MtlsMode::Off => http_listener(CLOUD_INBOUND, "0.0.0.0", m.cloud_inbound_port, filters),
        mode => mtls::cloud_inbound(
            CLOUD_INBOUND,
            mode,
            &m.trust_domain,
            tls_dir,
            m.cloud_inbound_port,
            &filters,
        ),
    });
    out.routes.push(route_config(CLOUD_INBOUND, hosts));
    if !m.vehicle_gateways.is_empty() {
        out.add_vehicle_gateway(policy, tls_dir);
    }
    out
}

impl Output {
    /// The cloud sidecar's side of the cloud → vehicle path (see [`crate::gateway`]):
    /// the tunnels' listener and cluster, the `vehicle_gateway` listener scoped by
    /// vehicle, and one route table per [`Reach`]. Replica clusters (`in|svc`) are the
    /// ones `cloud_inbound` uses.
    fn add_vehicle_gateway(&mut self, policy: &Policy, tls_dir: &str) {
        let m = &policy.mesh;
        self.listeners
            .push(gateway::tunnel_listener(policy, tls_dir));
        self.clusters.push(gateway::tunnel_cluster());
        self.listeners
            .push(gateway::gateway_listener(m.vehicle_gateway_port));
        let vehicle_services = || {
            policy
                .services
                .values()
                .filter(|s| s.location == Location::Vehicle)
        };
        for reach in Reach::ALL {
            let hosts = vehicle_services()
                .map(|svc| {
                    let replica = Target::Cluster(inbound_cluster(&svc.name));
                    let has_replica = !svc.cloud_replica.is_empty();
                    let tunnel = Target::Cluster(gateway::TUNNEL_CLUSTER.to_string());
                    let target = match reach {
                        Reach::Online => tunnel,
                        Reach::LowPower if svc.on_low_power == LowPowerAction::Cloud => replica,
                        Reach::LowPower => tunnel,
                        Reach::Offline if has_replica => replica,
                        Reach::Offline => Target::VehicleOffline,
                    };
                    virtual_host(svc, policy.class_of(svc), &target)
                })
                .collect();
            let mut table = route_config(&reach.route_table(), hosts);
            if let Some(by_path) = table.virtual_hosts.last_mut() {
                by_path.routes.push(gateway::no_such_service());
            }
            self.routes.push(table);
        }
    }

    /// A vehicle's clusters of the gateway hosts: per uplink of the tunnel class the
    /// vehicle has, bound to its interface, when the vehicle state says which; else
    /// one per host, following the routing table. They exist whatever the vehicle, so
    /// a fleet shares them; only the tunnel listeners name the vehicle.
    fn add_gateway_clusters(&mut self, policy: &Policy, state: Option<&VehicleState>) {
        let m = &policy.mesh;
        let Some(class) = tunnel_class(policy) else {
            return;
        };
        let tls = self.upstream_tls.as_ref().map(|t| t.socket.clone());
        for host in &m.vehicle_gateways {
            let port = m.vehicle_tunnel_port;
            let Some(state) = state else {
                let name = gateway::gateway_cluster(host, None);
                let c = gateway::vehicle_gateway_cluster(&name, host, port, tls.clone());
                self.clusters.push(c);
                continue;
            };
            for uplink in &class.uplinks {
                if let Some(iface) = state.interfaces.get(uplink) {
                    let name = gateway::gateway_cluster(host, Some(uplink));
                    let mut c = gateway::vehicle_gateway_cluster(&name, host, port, tls.clone());
                    c.upstream_bind_config = Some(BindConfig {
                        socket_options: vec![bind_to_device(iface)],
                        ..Default::default()
                    });
                    self.clusters.push(c);
                }
            }
        }
    }

    /// The vehicle's reverse tunnels, one listener per gateway host, over the cluster
    /// of the tunnel class's selected uplink (none usable: no tunnel) or, without
    /// vehicle state, the one following the routing table. Requests arriving through
    /// them take the vehicle's inbound routes.
    fn add_tunnel_listeners(
        &mut self,
        policy: &Policy,
        vehicle: &str,
        state: Option<&VehicleState>,
    ) {
        let Some(class) = tunnel_class(policy) else {
            return;
        };
        let uplink = match state {
            None => None,
            Some(state) => match state.uplink_for(&class.name, &class.uplinks) {
                Some(u) => Some(u),
                None => return,
            },
        };
        for host in &policy.mesh.vehicle_gateways {
            let cluster = gateway::gateway_cluster(host, uplink);
            let hcm = hcm(VEHICLE_INBOUND, Vec::new());
            self.listeners.push(gateway::vehicle_tunnel_listener(
                vehicle, host, &cluster, &hcm,
            ));
        }
    }
}

/// One virtual host per service, matched by its name as Host (`svc`, `svc:port`,
/// `svc.mesh`); the catch-all host routes by path prefix (see [`route_config`]).
fn virtual_host(svc: &Service, class: &TrafficClass, target: &Target) -> (VirtualHost, Vec<Route>) {
    let by_host = VirtualHost {
        name: svc.name.clone(),
        domains: vec![
            svc.name.clone(),
            format!("{}:{}", svc.name, svc.port),
            format!("{}.mesh", svc.name),
        ],
        routes: vec![route(svc, class, target, "/")],
        ..Default::default()
    };
    let by_path = svc
        .routes
        .iter()
        .map(|p| route(svc, class, target, p))
        .collect();
    (by_host, by_path)
}

fn route_config(name: &str, hosts: Vec<(VirtualHost, Vec<Route>)>) -> RouteConfiguration {
    let mut virtual_hosts = Vec::with_capacity(hosts.len() + 1);
    let mut by_path: Vec<Route> = Vec::new();
    for (vh, routes) in hosts {
        virtual_hosts.push(vh);
        by_path.extend(routes);
    }
    // Longest prefix first: Envoy takes the first match, and "/maps/tiles" must win
    // over "/maps" whatever the services' names are.
    by_path.sort_by(|a, b| {
        let len = |r: &Route| match &r.r#match {
            Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix(p)),
                ..
            }) => p.len(),
            _ => 0,
        };
        len(b).cmp(&len(a))
    });
    virtual_hosts.push(VirtualHost {
        name: "by-path".to_string(),
        domains: vec!["*".to_string()],
        routes: by_path,
        ..Default::default()
    });
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}

fn route(svc: &Service, class: &TrafficClass, target: &Target, prefix: &str) -> Route {
    let action = match target {
        Target::Cluster(cluster) => route::Action::Route(route_action(svc, class, cluster)),
        Target::Failover(cluster) => {
            let mut action = route_action(svc, class, cluster);
            if let Some(retry) = action.retry_policy.as_mut() {
                // Each try gets its share of the class timeout, so a try stuck on a dead
                // uplink leaves time for the next one.
                retry.per_try_timeout = Some(pb_duration(per_try_timeout(class)));
                retry.retry_priority = Some(retry_policy::RetryPriority {
                    name: "envoy.retry_priorities.previous_priorities".to_string(),
                    config_type: Some(retry_policy::retry_priority::ConfigType::TypedConfig(any(
                        &PreviousPrioritiesConfig {
                            update_frequency: 1,
                        },
                    ))),
                });
            }
            route::Action::Route(action)
        }
        Target::NoUplink => {
            direct_response(503, format!("no usable uplink for class {}\n", class.name))
        }
        Target::VehicleOffline => direct_response(
            503,
            format!(
                "the vehicle is offline and {} has no cloud replica\n",
                svc.name
            ),
        ),
    };
    let response_headers_to_add = match target {
        Target::Cluster(_) | Target::Failover(_) => Vec::new(),
        Target::NoUplink => vec![header(REASON_HEADER, "no-uplink")],
        Target::VehicleOffline => vec![header(REASON_HEADER, gateway::VEHICLE_OFFLINE)],
    };
    Route {
        name: format!("{}:{}", svc.name, prefix),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.to_string())),
            ..Default::default()
        }),
        action: Some(action),
        // Apps cannot pick their own class.
        request_headers_to_add: vec![header(CLASS_HEADER, &class.name)],
        response_headers_to_add,
        ..Default::default()
    }
}

fn route_action(svc: &Service, class: &TrafficClass, cluster: &str) -> RouteAction {
    let mut action = RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
        timeout: Some(pb_duration(class.timeout)),
        priority: match class.priority {
            RoutePriority::High => RoutingPriority::High as i32,
            RoutePriority::Default => RoutingPriority::Default as i32,
        },
        ..Default::default()
    };
    if class.retries > 0 {
        action.retry_policy = Some(RetryPolicy {
            retry_on: match svc.protocol {
                Protocol::Http => "5xx,reset,connect-failure,refused-stream".to_string(),
                Protocol::Grpc => {
                    "reset,connect-failure,refused-stream,unavailable,cancelled".to_string()
                }
            },
            num_retries: Some(UInt32Value {
                value: class.retries,
            }),
            ..Default::default()
        });
    }
    action
}

/// An HTTP listener whose routes are the route configuration of the same name.
fn http_listener(name: &str, ip: &str, port: u16, filters: Vec<HttpFilter>) -> Listener {
    listener(name, ip, port, &hcm(name, filters))
}

/// A listener running `hcm`.
fn listener(name: &str, ip: &str, port: u16, hcm: &HttpConnectionManager) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket(ip, port)),
        filter_chains: vec![hcm_chain(hcm)],
        ..Default::default()
    }
}

/// Envoy's decompressor filter with the zstd library, requests only: responses go
/// back to the vehicle as the service sent them.
fn zstd_request_decompressor() -> HttpFilter {
    let cfg = Decompressor {
        decompressor_library: Some(TypedExtensionConfig {
            name: "zstd".to_string(),
            typed_config: Some(any(&ZstdDecompressor::default())),
        }),
        response_direction_config: Some(decompressor::ResponseDirectionConfig {
            common_config: Some(decompressor::CommonDirectionConfig {
                enabled: Some(RuntimeFeatureFlag {
                    default_value: Some(BoolValue { value: false }),
                    runtime_key: "misaki.decompressor.response_enabled".to_string(),
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.decompressor".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&cfg))),
        ..Default::default()
    }
}

/// Pin a cluster's connections to one uplink's interface. Works unprivileged on Linux
/// ≥ 5.7; older kernels need CAP_NET_RAW (see docs/edge-netd.md).
pub(crate) fn bind_to_device(interface: &str) -> SocketOption {
    const SOL_SOCKET: i64 = 1;
    const SO_BINDTODEVICE: i64 = 25;
    let mut name = interface.as_bytes().to_vec();
    name.push(0); // the kernel reads a C string
    SocketOption {
        description: format!("bind to {interface}"),
        level: SOL_SOCKET,
        name: SO_BINDTODEVICE,
        value: Some(socket_option::Value::BufValue(name)),
        state: socket_option::SocketState::StatePrebind as i32,
        ..Default::default()
    }
}

/// `IP_TOS` carries DSCP in its upper six bits.
fn dscp_option(dscp: u8) -> SocketOption {
    const IPPROTO_IP: i64 = 0;
    const IP_TOS: i64 = 1;
    SocketOption {
        description: format!("dscp {dscp}"),
        level: IPPROTO_IP,
        name: IP_TOS,
        value: Some(socket_option::Value::IntValue(i64::from(dscp) << 2)),
        state: socket_option::SocketState::StatePrebind as i32,
        ..Default::default()
    }
}
