//! The cloud → vehicle path: reverse tunnels and the cloud sidecar's `vehicle_gateway`.
//!
//! Vehicles sit behind carrier NAT, so the cloud cannot dial them. Each vehicle's
//! Envoy keeps reverse tunnels to the cloud sidecars of `mesh.vehicle_gateways` (it
//! dials out, on `mesh.vehicle_tunnel_port`); a cloud service sends its request to its
//! cloud sidecar's `vehicle_gateway` listener with `x-misaki-target-vehicle: <id>`, and
//! the sidecar sends it down that vehicle's tunnel to the vehicle's inbound routes.
//!
//! What a call does depends on the vehicle's state in the fleet registry, so the
//! gateway's routes are scoped by vehicle (SRDS keyed on [`TARGET_HEADER`]): one
//! [`ScopedRouteConfiguration`] per known vehicle, naming one of three shared route
//! tables by [`Reach`]:
//!
//! | reach | a vehicle service's calls go to |
//! |---|---|
//! | online | the vehicle, through its tunnel |
//! | low power | its `cloud_replica` when `on_low_power: cloud`, else the vehicle |
//! | offline | its `cloud_replica` when it has one, else `503` `x-misaki-reason: vehicle-offline` at once |
//!
//! A vehicle's state change is then one small SRDS resource (see [`scope`]); the route
//! tables change only with the policy. A vehicle the registry has never seen has no
//! scope: `503` `vehicle-unknown`; no header: `400` `no-target-vehicle` (local replies).
//!
//! On the vehicle side, [`VehicleConditions::low_power`] moves the vehicle's own
//! callers of an `on_low_power: cloud` service to its replica (see `compile`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, DataSource, Http2ProtocolOptions, KeepaliveSettings, SocketAddress, TransportSocket, address,
    data_source, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteMatch, ScopedRouteConfiguration, header_matcher, route_match,
    scoped_route_configuration,
};
use envoy_types::pb::envoy::extensions::clusters::reverse_connection::v3::ReverseConnectionClusterConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, LocalReplyConfig, ResponseMapper, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::reverse_tunnel::v3::{
    ReverseTunnel, Validation,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use envoy_types::pb::google::protobuf::UInt32Value;
use misaki_policy::{Location, MtlsMode, Policy, TrustDomain};

use crate::envoy::{
    REASON_HEADER, any, direct_response, failover_retry_limit, hcm_chain, hcm_routed, header,
    http2_upstream, load_assignment, pb_duration, socket,
};
use crate::snapshot::{Resource, Resources};
use crate::{mtls, on_demand};

/// The request header naming the vehicle a cloud call is for.
pub const TARGET_HEADER: &str = "x-misaki-target-vehicle";

/// The cloud sidecar's listener (and scoped-routes config) for calls to vehicles.
pub const VEHICLE_GATEWAY: &str = "vehicle_gateway";

/// How the cloud can reach a vehicle now, from the fleet registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reach {
    Online,
    /// Online, and the vehicle reports low power (or shutting down).
    LowPower,
    Offline,
}

impl Reach {
    pub const ALL: [Reach; 3] = [Reach::Online, Reach::LowPower, Reach::Offline];

    pub fn as_str(self) -> &'static str {
        match self {
            Reach::Online => "online",
            Reach::LowPower => "low-power",
            Reach::Offline => "offline",
        }
    }

    /// The gateway route table of vehicles in this state.
    pub fn route_table(self) -> String {
        format!("{VEHICLE_GATEWAY}|{}", self.as_str())
    }
}

/// What misaki-cp knows of a vehicle that changes the vehicle's own snapshot (a vehicle
/// Envoy it feeds directly; edge-netd's tier has it in `VehicleState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VehicleConditions {
    pub low_power: bool,
}

/// One vehicle's gateway scope: its id as the key, the table of its reach.
pub fn scope(prefix: &str, vehicle: &str, reach: Reach) -> Arc<Resource> {
    let s = ScopedRouteConfiguration {
        name: scope_name(vehicle),
        route_configuration_name: reach.route_table(),
        key: Some(scoped_route_configuration::Key {
            fragments: vec![scoped_route_configuration::key::Fragment {
                r#type: Some(scoped_route_configuration::key::fragment::Type::StringKey(
                    vehicle.to_string(),
                )),
            }],
        }),
        ..Default::default()
    };
    Arc::new(Resource::new(prefix, s.name.clone(), &s))
}

/// The SRDS resource name of a vehicle's scope.
pub fn scope_name(vehicle: &str) -> String {
    format!("{VEHICLE_GATEWAY}/{vehicle}")
}

/// Every vehicle's scope, plus the [`anchors`], as a cloud sidecar's SRDS content.
pub fn scopes(prefix: &str, fleet: &BTreeMap<String, Reach>) -> Resources {
    let vehicles = fleet.iter().map(|(v, r)| scope(prefix, v, *r));
    Resources::from_items(prefix, anchors(prefix).into_iter().chain(vehicles))
}

/// One scope per route table, under a key no vehicle id can be (`!` is not allowed in
/// one), so Envoy keeps every table loaded: a vehicle whose scope moves to a table no
/// other vehicle used would otherwise find no route (`vehicle-unknown`) for the few
/// milliseconds Envoy takes to fetch it. A request naming such a key is routed like a
/// vehicle without a tunnel.
pub fn anchors(prefix: &str) -> Vec<Arc<Resource>> {
    Reach::ALL
        .iter()
        .map(|r| scope(prefix, &format!("!{}", r.as_str()), *r))
        .collect()
}

/// `x-misaki-reason` of a cloud call to an offline vehicle with no replica to take it.
pub const VEHICLE_OFFLINE: &str = "vehicle-offline";

/// `x-misaki-reason` of a cloud call to a vehicle the registry has never seen.
pub const VEHICLE_UNKNOWN: &str = "vehicle-unknown";

/// `x-misaki-reason` of a call to a vehicle that has no tunnel to this gateway now.
pub const NO_TUNNEL: &str = "no-tunnel";

/// `x-misaki-reason` of a gateway call without [`TARGET_HEADER`].
pub const NO_TARGET: &str = "no-target-vehicle";

/// `x-misaki-reason` of a gateway call for a path no vehicle service has.
pub const NO_SUCH_SERVICE: &str = "no-such-service";

/// The cloud sidecar's cluster of vehicles' tunnels; a request picks the tunnel of the
/// vehicle its [`TARGET_HEADER`] names.
pub const TUNNEL_CLUSTER: &str = "vehicle|tunnel";

/// The cloud sidecar's listener the vehicles' tunnels arrive at.
pub const TUNNEL_LISTENER: &str = "vehicle_tunnel";

/// Tunnels each vehicle keeps to each gateway host. More than the cloud sidecar's
/// worker threads: each worker can use only the tunnels it accepted.
pub const TUNNELS_PER_GATEWAY: u32 = 4;

/// A vehicle's cluster of a gateway host (over `uplink`, on a vehicle whose state says
/// which: bound to that uplink's interface).
pub fn gateway_cluster(host: &str, uplink: Option<&str>) -> String {
    // An rc:// address splits on `:`, so an IPv6 host cannot appear in it as is.
    let host = host.replace(':', "_");
    match uplink {
        Some(u) => format!("{VEHICLE_GATEWAY}|{host}|{u}"),
        None => format!("{VEHICLE_GATEWAY}|{host}"),
    }
}

/// The last route of each gateway table: a path no vehicle service has. Without it
/// Envoy's 404 would carry the same flag as a vehicle without a scope.
pub(crate) fn no_such_service() -> Route {
    Route {
        name: NO_SUCH_SERVICE.to_string(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(direct_response(
            404,
            "no vehicle service at this host or path\n".to_string(),
        )),
        response_headers_to_add: vec![header(REASON_HEADER, NO_SUCH_SERVICE)],
        ..Default::default()
    }
}

/// The cloud sidecar's `vehicle_gateway`: routes scoped by [`TARGET_HEADER`]; Envoy's
/// own answers for a missing header or a vehicle without a scope say why.
pub(crate) fn gateway_listener(port: u16) -> Listener {
    use envoy_types::pb::envoy::config::accesslog::v3::{
        AccessLogFilter, AndFilter, ExtensionFilter, HeaderFilter, ResponseFlagFilter,
        access_log_filter::FilterSpecifier, extension_filter,
    };
    use envoy_types::pb::envoy::extensions::access_loggers::filters::cel::v3::ExpressionFilter;
    let mapper = |filter: FilterSpecifier, status: u32, reason: &str, body: &str| ResponseMapper {
        filter: Some(AccessLogFilter {
            filter_specifier: Some(filter),
        }),
        status_code: Some(UInt32Value { value: status }),
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(body.to_string())),
            ..Default::default()
        }),
        headers_to_add: vec![header(REASON_HEADER, reason)],
        ..Default::default()
    };
    let no_header = FilterSpecifier::HeaderFilter(HeaderFilter {
        header: Some(HeaderMatcher {
            name: TARGET_HEADER.to_string(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
            invert_match: true,
            ..Default::default()
        }),
    });
    // A known, online vehicle without a tunnel here: the tunnels' cluster fails at once
    // (UF). Only that cluster's: a replica's connect failure is no tunnel's fault.
    // (`startsWith`: in Envoy 1.40 `xds.cluster_name == '...'` never matched.)
    let no_tunnel = FilterSpecifier::AndFilter(AndFilter {
        filters: [
            FilterSpecifier::ResponseFlagFilter(ResponseFlagFilter {
                flags: vec!["UF".to_string()],
            }),
            FilterSpecifier::ExtensionFilter(ExtensionFilter {
                name: "envoy.access_loggers.extension_filters.cel".to_string(),
                config_type: Some(extension_filter::ConfigType::TypedConfig(any(
                    &ExpressionFilter {
                        expression: format!("xds.cluster_name.startsWith('{TUNNEL_CLUSTER}')"),
                        ..Default::default()
                    },
                ))),
            }),
        ]
        .into_iter()
        .map(|f| AccessLogFilter {
            filter_specifier: Some(f),
        })
        .collect(),
    });
    // No scope for the key: Envoy's "no route" (NR).
    let no_scope = FilterSpecifier::ResponseFlagFilter(ResponseFlagFilter {
        flags: vec!["NR".to_string()],
    });
    let mut hcm = hcm_routed(
        VEHICLE_GATEWAY,
        http_connection_manager::RouteSpecifier::ScopedRoutes(on_demand::scoped_routes_by(
            VEHICLE_GATEWAY,
            TARGET_HEADER,
        )),
        Vec::new(),
    );
    hcm.local_reply_config = Some(LocalReplyConfig {
        mappers: vec![
            mapper(
                no_header,
                400,
                NO_TARGET,
                "a call through the vehicle gateway names its vehicle in x-misaki-target-vehicle\n",
            ),
            mapper(
                no_scope,
                503,
                VEHICLE_UNKNOWN,
                "the fleet registry does not know this vehicle\n",
            ),
            mapper(
                no_tunnel,
                503,
                NO_TUNNEL,
                "the vehicle has no tunnel to this gateway now\n",
            ),
        ],
        ..Default::default()
    });
    Listener {
        name: VEHICLE_GATEWAY.to_string(),
        address: Some(socket("0.0.0.0", port)),
        filter_chains: vec![hcm_chain(&hcm)],
        ..Default::default()
    }
}

/// The cloud sidecar's listener for vehicles' tunnels. With mTLS on, only vehicle
/// certificates of the fleet, and a vehicle can only offer its own tunnel: the node and
/// cluster ids it declares must be the id in its certificate.
pub(crate) fn tunnel_listener(policy: &Policy, tls_dir: &str) -> Listener {
    let m = &policy.mesh;
    let mut tunnel = ReverseTunnel {
        ping_interval: Some(pb_duration(PING_INTERVAL)),
        ..Default::default()
    };
    let transport_socket = match m.mtls {
        MtlsMode::Off => None,
        _ => {
            let td = &m.trust_domain;
            tunnel.validation = Some(Validation {
                node_id_format: expected_tunnel_id(td, "x-envoy-reverse-tunnel-node-id"),
                cluster_id_format: expected_tunnel_id(td, "x-envoy-reverse-tunnel-cluster-id"),
                ..Default::default()
            });
            Some(mtls::tunnel_downstream(&m.trust_domain, tls_dir))
        }
    };
    Listener {
        name: TUNNEL_LISTENER.to_string(),
        address: Some(socket("0.0.0.0", m.vehicle_tunnel_port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.reverse_tunnel".to_string(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&tunnel))),
            }],
            transport_socket,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What the cloud sidecar expects a tunnel's declared id (`header`: the handshake's
/// node or cluster id header) to be: the vehicle id in the verified client certificate,
/// `spiffe://<td>/vehicle/<id>`, else `denied` (Envoy compares the two and answers the
/// handshake 403). Envoy's formatters print the URI whole, and a tunnel id cannot hold
/// its `:`; Envoy 1.40's CEL has no concatenation, hence prefix, suffix and length.
fn expected_tunnel_id(td: &TrustDomain, header: &str) -> String {
    let prefix = format!("spiffe://{td}/vehicle/");
    let san = "connection.uri_san_peer_certificate";
    let declared = format!("request.headers['{header}']");
    format!(
        "%CEL({san}.startsWith('{prefix}') && {san}.endsWith({declared}) && size({san}) == {} + size({declared}) ? {declared} : 'denied')%",
        prefix.len()
    )
}

/// How often each end checks a tunnel; a silent vehicle's tunnels go after a few.
const PING_INTERVAL: Duration = Duration::from_secs(2);

/// HTTP/2 pings on a tunnel: a peer silent for about three seconds is gone.
fn keepalive() -> KeepaliveSettings {
    KeepaliveSettings {
        interval: Some(pb_duration(PING_INTERVAL)),
        timeout: Some(pb_duration(Duration::from_secs(1))),
        ..Default::default()
    }
}

/// The cloud sidecar's cluster of tunnels: the host is the vehicle the request names.
/// HTTP/2 keepalive finds a silent vehicle in seconds rather than at the route timeout.
pub(crate) fn tunnel_cluster() -> Cluster {
    let config = ReverseConnectionClusterConfig {
        cleanup_interval: Some(pb_duration(Duration::from_secs(60))),
        host_id_format: format!("%REQ({TARGET_HEADER})%"),
        ..Default::default()
    };
    let mut http2 = http2_upstream();
    if let Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) =
        http2.upstream_protocol_options.as_mut()
        && let Some(ProtocolConfig::Http2ProtocolOptions(h2)) = e.protocol_config.as_mut()
    {
        h2.connection_keepalive = Some(keepalive());
    }
    let mut c = Cluster {
        name: TUNNEL_CLUSTER.to_string(),
        connect_timeout: Some(pb_duration(Duration::from_secs(5))),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::ClusterType(
            cluster::CustomClusterType {
                name: "envoy.clusters.reverse_connection".to_string(),
                typed_config: Some(any(&config)),
            },
        )),
        // Retries to a replica or another tunnel must not hit Envoy's default of 3.
        circuit_breakers: Some(failover_retry_limit()),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        any(&http2),
    );
    c
}

/// A vehicle's cluster of one gateway host's tunnel port (TLS with the vehicle's
/// certificate when mTLS is on).
pub(crate) fn vehicle_gateway_cluster(
    name: &str,
    host: &str,
    port: u16,
    tls: Option<TransportSocket>,
) -> Cluster {
    let kind = if host.parse::<IpAddr>().is_ok() {
        cluster::DiscoveryType::Static
    } else {
        cluster::DiscoveryType::StrictDns
    };
    Cluster {
        name: name.to_string(),
        connect_timeout: Some(pb_duration(Duration::from_secs(5))),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        load_assignment: Some(load_assignment(
            name,
            Location::Cloud,
            &[(host.to_string(), port)],
        )),
        transport_socket: tls,
        ..Default::default()
    }
}

/// A vehicle's reverse tunnels to one gateway host over `cluster`: a listener whose
/// "address" makes Envoy dial out and keep [`TUNNELS_PER_GATEWAY`] connections, each
/// announcing the vehicle id (as node and cluster: the gateway matches either).
pub(crate) fn vehicle_tunnel_listener(
    vehicle: &str,
    host: &str,
    cluster: &str,
    hcm: &HttpConnectionManager,
) -> Listener {
    let address = format!("rc://{vehicle}:{vehicle}:misaki@{cluster}:{TUNNELS_PER_GATEWAY}");
    // The cloud speaks HTTP/2 down the tunnel; pinging it closes a tunnel to a cloud
    // gone silent, which the vehicle would otherwise never notice.
    let mut hcm = hcm.clone();
    hcm.http2_protocol_options = Some(Http2ProtocolOptions {
        connection_keepalive: Some(keepalive()),
        ..Default::default()
    });
    Listener {
        name: format!("{TUNNEL_LISTENER}|{host}"),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address,
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                resolver_name: "envoy.resolvers.reverse_connection".to_string(),
                ..Default::default()
            })),
        }),
        filter_chains: vec![hcm_chain(&hcm)],
        ..Default::default()
    }
}
