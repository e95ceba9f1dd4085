//! The cloud → vehicle path (issue 13): the cloud sidecar's tunnel listener and cluster,
//! the `vehicle_gateway` scoped by vehicle and its three route tables, the vehicles'
//! reverse tunnels, and low power moving a vehicle's own callers to the replica.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::decode;
use envoy_types::pb::envoy::config::accesslog::v3::access_log_filter::FilterSpecifier;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, socket_option, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteConfiguration, ScopedRouteConfiguration, VirtualHost, route, route_action,
    scoped_route_configuration,
};
use envoy_types::pb::envoy::extensions::clusters::reverse_connection::v3::ReverseConnectionClusterConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::scoped_routes::scope_key_builder::fragment_builder;
use envoy_types::pb::envoy::extensions::filters::network::reverse_tunnel::v3::ReverseTunnel;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::UpstreamProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
use misaki_compiler::gateway::{self, Reach};
use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::{ResourceType, Snapshot};
use misaki_compiler::{
    REASON_HEADER, VEHICLE_INBOUND, VehicleConditions, VehicleState, compile, compile_in,
    compile_vehicle, inbound_cluster, outbound_cluster, uplink_cluster, with_vehicle_id,
};
use misaki_policy::Policy;
use prost::Message;

const GATEWAYS: &str = "vehicle_gateways: [gw-1.cloud.example, 198.18.0.10, \"2001:db8::1\"], \
     vehicle_tunnel_class: tunnel, vehicle_gateway_port: 25444, vehicle_tunnel_port: 25445";

/// A cloud service; three vehicle services: `diag` (replica, moves to it on low power),
/// `logs` (replica, stays), `cam` (no replica). `tunnel` is a class no service uses, so
/// its selection touches only the tunnels. `mesh`: extra mesh fields (e.g. [`GATEWAYS`]).
fn policy(mesh: &str) -> Policy {
    policy_with(mesh, "on_low_power: cloud")
}

/// [`policy`] with `diag`'s low-power field as given (`""`: the default, stay).
fn policy_with(mesh: &str, diag_low_power: &str) -> Policy {
    let diag_low_power = if diag_low_power.is_empty() {
        String::new()
    } else {
        format!(", {diag_low_power}")
    };
    let text = format!(
        "version: 1
mesh: {{ trust_domain: fleet.example, {mesh} }}
uplinks:
  - {{ name: wifi, kind: wifi }}
  - {{ name: lte, kind: lte }}
classes:
  - {{ name: std, uplinks: [wifi, lte], retries: 1 }}
  - {{ name: tunnel, uplinks: [lte, wifi] }}
services:
  - {{ name: maps, location: cloud, port: 8080, endpoints: [\"10.0.0.1:8080\"], routes: [/maps], class: std }}
  - {{ name: diag, location: vehicle, port: 7070, routes: [/diag], class: std, cloud_replica: [\"10.20.0.30:7070\"]{diag_low_power} }}
  - {{ name: logs, location: vehicle, port: 7071, routes: [/logs], class: std, cloud_replica: [\"10.20.0.31:7071\"] }}
  - {{ name: cam, location: vehicle, port: 7072, routes: [/cam], class: std }}
"
    );
    misaki_policy::parse("mesh.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn vehicle_node(id: Option<&str>) -> NodeInfo {
    NodeInfo {
        id: id.unwrap_or("shared").into(),
        role: Role::Vehicle,
        vehicle_id: id.map(str::to_string),
        proxyless: false,
        delta: false,
        tls_dir: None,
    }
}

fn cloud_node() -> NodeInfo {
    NodeInfo {
        id: "cloud-1".into(),
        role: Role::Cloud,
        vehicle_id: None,
        proxyless: false,
        delta: false,
        tls_dir: None,
    }
}

fn names(s: &Snapshot, t: ResourceType) -> Vec<String> {
    s.get(t).items.keys().cloned().collect()
}

fn versions(s: &Snapshot) -> Vec<(ResourceType, String)> {
    ResourceType::PUSH_ORDER
        .iter()
        .map(|t| (*t, s.get(*t).version.to_string()))
        .collect()
}

/// The types whose versions differ between `a` and `b`.
fn changed_types(a: &Snapshot, b: &Snapshot) -> Vec<ResourceType> {
    ResourceType::PUSH_ORDER
        .into_iter()
        .filter(|t| a.get(*t).version != b.get(*t).version)
        .collect()
}

fn listener(s: &Snapshot, name: &str) -> Listener {
    decode::<Listener>(s, ResourceType::Listener)
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no listener {name}"))
}

fn cluster_named(s: &Snapshot, name: &str) -> Cluster {
    decode::<Cluster>(s, ResourceType::Cluster)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn route_config(s: &Snapshot, name: &str) -> RouteConfiguration {
    decode::<RouteConfiguration>(s, ResourceType::Route)
        .into_iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route configuration {name}"))
}

fn hcm_of(l: &Listener) -> HttpConnectionManager {
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type
    else {
        panic!("listener {} has no typed filter", l.name)
    };
    HttpConnectionManager::decode(any.value.as_slice()).expect("hcm")
}

fn port_of(l: &Listener) -> u32 {
    let Some(address::Address::SocketAddress(sa)) =
        l.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("listener {} has no socket address", l.name)
    };
    match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => p,
        _ => panic!("no port"),
    }
}

fn cluster_of(r: &Route) -> Option<String> {
    match &r.action {
        Some(route::Action::Route(a)) => match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => Some(c.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Where `svc`'s requests go in `rc`: its Host-matched virtual host and its path route
/// must agree. `Ok(cluster)` or `Err((status, reason header))` for a direct response.
fn target(rc: &RouteConfiguration, svc: &str) -> Result<String, (u32, String)> {
    let by_host = rc
        .virtual_hosts
        .iter()
        .find(|v| v.name == svc)
        .unwrap_or_else(|| panic!("{}: no virtual host {svc}", rc.name));
    let by_path = rc
        .virtual_hosts
        .iter()
        .find(|v| v.domains == ["*"])
        .expect("by-path host");
    let path_route = by_path
        .routes
        .iter()
        .find(|r| r.name == format!("{svc}:/{svc}"))
        .unwrap_or_else(|| panic!("{}: no path route of {svc}", rc.name));
    let of = |r: &Route| match &r.action {
        Some(route::Action::Route(_)) => Ok(cluster_of(r).expect("cluster")),
        Some(route::Action::DirectResponse(d)) => {
            let reason = r
                .response_headers_to_add
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == REASON_HEADER)
                .map(|h| h.value.clone())
                .unwrap_or_default();
            Err((d.status, reason))
        }
        other => panic!("unexpected action {other:?}"),
    };
    let host = of(&by_host.routes[0]);
    assert_eq!(
        host,
        of(path_route),
        "{}: {svc} by host and by path",
        rc.name
    );
    host
}

fn all_clusters_routed_exist(s: &Snapshot) {
    let clusters = names(s, ResourceType::Cluster);
    for rc in decode::<RouteConfiguration>(s, ResourceType::Route) {
        for vh in &rc.virtual_hosts {
            for r in &vh.routes {
                if let Some(c) = cluster_of(r) {
                    assert!(clusters.contains(&c), "{}: dangling {c}", rc.name);
                }
            }
        }
    }
}

// 1. Without gateways nothing changes.

#[test]
fn without_gateways_there_are_no_tunnels_and_no_vehicle_gateway() {
    let p = policy("");
    let cloud = compile(&p, &cloud_node(), "p-");
    assert_eq!(names(&cloud, ResourceType::Listener), ["cloud_inbound"]);
    let clusters = names(&cloud, ResourceType::Cluster);
    assert!(
        !clusters.iter().any(|c| c.starts_with("vehicle")),
        "{clusters:?}"
    );
    assert_eq!(names(&cloud, ResourceType::Route), ["cloud_inbound"]);
    assert!(cloud.get(ResourceType::ScopedRoute).items.is_empty());

    let car = compile(&p, &vehicle_node(Some("car-1")), "p-");
    assert_eq!(
        names(&car, ResourceType::Listener),
        ["vehicle_inbound", "vehicle_outbound"]
    );
    let clusters = names(&car, ResourceType::Cluster);
    assert!(
        !clusters.iter().any(|c| c.starts_with("vehicle")),
        "{clusters:?}"
    );

    // The vehicle id adds nothing, so a fleet shares one snapshot whole.
    let shared = Arc::new(compile(&p, &vehicle_node(None), "p-"));
    assert_eq!(versions(&shared), versions(&car));
    let own = with_vehicle_id(&shared, &p, "car-1", "p-");
    assert!(Arc::ptr_eq(&shared, &own));
}

#[test]
fn low_power_changes_nothing_when_no_service_moves_to_the_cloud() {
    for mesh in ["", GATEWAYS] {
        let p = policy_with(mesh, "");
        for node in [
            vehicle_node(Some("car-1")),
            vehicle_node(None),
            cloud_node(),
        ] {
            let normal = compile_in(&p, &node, VehicleConditions { low_power: false }, "p-");
            let low = compile_in(&p, &node, VehicleConditions { low_power: true }, "p-");
            assert_eq!(
                versions(&normal),
                versions(&low),
                "{mesh:?} {:?}",
                node.role
            );
            assert_eq!(versions(&normal), versions(&compile(&p, &node, "p-")));
        }
    }
}

// 2. The cloud sidecar's side.

#[test]
fn cloud_gets_the_tunnel_listener_and_cluster_and_the_scoped_vehicle_gateway() {
    let s = compile(&policy(GATEWAYS), &cloud_node(), "p-");
    assert_eq!(
        names(&s, ResourceType::Listener),
        ["cloud_inbound", "vehicle_gateway", "vehicle_tunnel"]
    );
    all_clusters_routed_exist(&s);

    // The tunnels arrive here, in plaintext with mTLS off and no id check.
    let t = listener(&s, gateway::TUNNEL_LISTENER);
    assert_eq!(port_of(&t), 25445);
    assert_eq!(t.filter_chains.len(), 1);
    let f = &t.filter_chains[0].filters[0];
    assert_eq!(f.name, "envoy.filters.network.reverse_tunnel");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!("untyped")
    };
    let rt = ReverseTunnel::decode(any.value.as_slice()).expect("reverse tunnel");
    assert!(rt.ping_interval.is_some());
    assert!(rt.validation.is_none());
    assert!(t.filter_chains[0].transport_socket.is_none());

    // The gateway: scoped by the target header, Envoy's own answers say why.
    let g = listener(&s, gateway::VEHICLE_GATEWAY);
    assert_eq!(port_of(&g), 25444);
    let hcm = hcm_of(&g);
    let Some(http_connection_manager::RouteSpecifier::ScopedRoutes(sr)) = &hcm.route_specifier
    else {
        panic!("the gateway is not scoped: {:?}", hcm.route_specifier)
    };
    assert_eq!(sr.name, gateway::VEHICLE_GATEWAY);
    let fragments = &sr
        .scope_key_builder
        .as_ref()
        .expect("key builder")
        .fragments;
    assert_eq!(fragments.len(), 1);
    let Some(fragment_builder::Type::HeaderValueExtractor(h)) = &fragments[0].r#type else {
        panic!("not a header key")
    };
    assert_eq!(h.name, "x-misaki-target-vehicle");
    assert_eq!(h.name, gateway::TARGET_HEADER);
    let mappers = &hcm
        .local_reply_config
        .as_ref()
        .expect("local replies")
        .mappers;
    let mapped: Vec<(u32, String)> = mappers
        .iter()
        .map(|m| {
            let reason = m
                .headers_to_add
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == REASON_HEADER)
                .expect("reason")
                .value
                .clone();
            (m.status_code.expect("status").value, reason)
        })
        .collect();
    assert!(
        mapped.contains(&(400, "no-target-vehicle".into())),
        "{mapped:?}"
    );
    assert!(
        mapped.contains(&(503, "vehicle-unknown".into())),
        "{mapped:?}"
    );
    assert!(mapped.contains(&(503, "no-tunnel".into())), "{mapped:?}");
    // The 400 is for a request without the header.
    let no_header = mappers
        .iter()
        .find(|m| m.status_code.map(|s| s.value) == Some(400))
        .expect("400");
    let Some(FilterSpecifier::HeaderFilter(hf)) = no_header
        .filter
        .as_ref()
        .and_then(|f| f.filter_specifier.as_ref())
    else {
        panic!("400 mapper is not a header filter")
    };
    let hm = hf.header.as_ref().expect("header matcher");
    assert_eq!(hm.name, gateway::TARGET_HEADER);
    assert!(hm.invert_match);

    // One cluster of every vehicle's tunnels, the host picked by the header.
    let c = cluster_named(&s, "vehicle|tunnel");
    let Some(cluster::ClusterDiscoveryType::ClusterType(ct)) = &c.cluster_discovery_type else {
        panic!("not a custom cluster")
    };
    assert_eq!(ct.name, "envoy.clusters.reverse_connection");
    let cfg = ReverseConnectionClusterConfig::decode(
        ct.typed_config.as_ref().expect("config").value.as_slice(),
    )
    .expect("reverse connection config");
    assert_eq!(cfg.host_id_format, "%REQ(x-misaki-target-vehicle)%");
    assert_eq!(c.lb_policy, cluster::LbPolicy::ClusterProvided as i32);
    let opts = c
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        .expect("protocol options");
    let opts = HttpProtocolOptions::decode(opts.value.as_slice()).expect("options");
    let Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) = opts.upstream_protocol_options
    else {
        panic!("not explicit")
    };
    let Some(ProtocolConfig::Http2ProtocolOptions(h2)) = e.protocol_config else {
        panic!("not HTTP/2")
    };
    let ka = h2.connection_keepalive.expect("HTTP/2 keepalive");
    assert!(ka.interval.is_some() && ka.timeout.is_some());
}

#[test]
fn with_mtls_strict_the_tunnel_listener_takes_only_vehicle_certificates_of_their_own_id() {
    let p = policy(&format!("mtls: strict, {GATEWAYS}"));
    let s = compile(&p, &cloud_node(), "p-");
    let t = listener(&s, gateway::TUNNEL_LISTENER);
    let ts = t.filter_chains[0]
        .transport_socket
        .as_ref()
        .expect("TLS on the tunnel listener");
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        panic!("untyped transport socket")
    };
    let tls = DownstreamTlsContext::decode(any.value.as_slice()).expect("downstream TLS");
    assert_eq!(tls.require_client_certificate.map(|b| b.value), Some(true));
    let Some(filter::ConfigType::TypedConfig(any)) = &t.filter_chains[0].filters[0].config_type
    else {
        panic!("untyped")
    };
    let rt = ReverseTunnel::decode(any.value.as_slice()).expect("reverse tunnel");
    let v = rt.validation.expect("tunnel ids are validated");
    let prefix = "spiffe://fleet.example/vehicle/";
    for (format, header) in [
        (&v.node_id_format, "x-envoy-reverse-tunnel-node-id"),
        (&v.cluster_id_format, "x-envoy-reverse-tunnel-cluster-id"),
    ] {
        assert!(format.contains(prefix), "{format}");
        assert!(
            format.contains(&format!("{} + size(", prefix.len())),
            "{format}"
        );
        assert!(format.contains(header), "{format}");
    }
}

#[test]
fn the_gateway_tables_follow_the_routing_table() {
    let s = compile(&policy(GATEWAYS), &cloud_node(), "p-");
    let tables: Vec<String> = names(&s, ResourceType::Route)
        .into_iter()
        .filter(|n| n.starts_with("vehicle_gateway"))
        .collect();
    assert_eq!(
        tables,
        [
            "vehicle_gateway|low-power",
            "vehicle_gateway|offline",
            "vehicle_gateway|online"
        ]
    );
    let tunnel = || Ok("vehicle|tunnel".to_string());
    let replica = |svc: &str| Ok(inbound_cluster(svc));
    let offline = || Err((503, "vehicle-offline".to_string()));
    let expected = [
        (Reach::Online, [tunnel(), tunnel(), tunnel()]),
        (Reach::LowPower, [replica("diag"), tunnel(), tunnel()]),
        (
            Reach::Offline,
            [replica("diag"), replica("logs"), offline()],
        ),
    ];
    for (reach, want) in expected {
        let rc = route_config(&s, &reach.route_table());
        for (svc, want) in ["diag", "logs", "cam"].into_iter().zip(want) {
            assert_eq!(target(&rc, svc), want, "{reach:?} {svc}");
        }
        // Only vehicle services are on the gateway.
        assert!(
            !rc.virtual_hosts.iter().any(|v| v.name == "maps"),
            "{reach:?}"
        );
        // Last: a path no vehicle service has.
        let by_path: &VirtualHost = rc.virtual_hosts.last().expect("by path");
        assert_eq!(by_path.domains, ["*"]);
        let last = by_path.routes.last().expect("routes");
        let Some(route::Action::DirectResponse(d)) = &last.action else {
            panic!("{reach:?}: last route is not a direct response")
        };
        assert_eq!(d.status, 404);
        let reason = last.response_headers_to_add[0].header.as_ref().expect("h");
        assert_eq!(
            (reason.key.as_str(), reason.value.as_str()),
            (REASON_HEADER, "no-such-service")
        );
    }
    // The replicas' clusters are cloud_inbound's, which routes them too.
    let inbound = route_config(&s, "cloud_inbound");
    assert_eq!(target(&inbound, "maps"), Ok(inbound_cluster("maps")));
    assert_eq!(target(&inbound, "diag"), Ok(inbound_cluster("diag")));
    assert_eq!(target(&inbound, "logs"), Ok(inbound_cluster("logs")));
    assert!(!inbound.virtual_hosts.iter().any(|v| v.name == "cam"));
    let diag = cluster_named(&s, &inbound_cluster("diag"));
    assert!(
        diag.load_assignment.is_none(),
        "an IP replica goes over EDS"
    );
    assert!(names(&s, ResourceType::Endpoint).contains(&inbound_cluster("diag")));
}

#[test]
fn a_replica_is_routed_by_cloud_inbound_even_without_gateways() {
    let s = compile(&policy(""), &cloud_node(), "p-");
    let inbound = route_config(&s, "cloud_inbound");
    assert_eq!(target(&inbound, "diag"), Ok(inbound_cluster("diag")));
    all_clusters_routed_exist(&s);
}

// 3. Scopes.

fn decode_scope(r: &misaki_compiler::snapshot::Resource) -> ScopedRouteConfiguration {
    ScopedRouteConfiguration::decode(r.body.value.as_slice()).expect("scope")
}

#[test]
fn one_scope_per_vehicle_keyed_by_its_id_naming_the_table_of_its_reach() {
    let fleet: BTreeMap<String, Reach> = [
        ("car-1".to_string(), Reach::Online),
        ("car-2".to_string(), Reach::LowPower),
        ("car-3".to_string(), Reach::Offline),
    ]
    .into();
    let scopes = gateway::scopes("p-", &fleet);
    // Every table is named by an anchor scope whatever the fleet, so Envoy keeps it.
    let anchors: Vec<_> = scopes.items.keys().filter(|k| k.contains('!')).collect();
    assert_eq!(
        anchors,
        [
            "vehicle_gateway/!low-power",
            "vehicle_gateway/!offline",
            "vehicle_gateway/!online"
        ]
    );
    assert_eq!(
        scopes
            .items
            .keys()
            .filter(|k| !k.contains('!'))
            .collect::<Vec<_>>(),
        [
            "vehicle_gateway/car-1",
            "vehicle_gateway/car-2",
            "vehicle_gateway/car-3"
        ]
    );
    for (vehicle, reach) in &fleet {
        let r = &scopes.items[&gateway::scope_name(vehicle)];
        assert_eq!(r.body.type_url, ResourceType::ScopedRoute.type_url());
        let s = decode_scope(r);
        assert_eq!(s.name, format!("vehicle_gateway/{vehicle}"));
        assert_eq!(s.route_configuration_name, reach.route_table());
        let key = s.key.expect("key");
        assert_eq!(key.fragments.len(), 1);
        assert_eq!(
            key.fragments[0].r#type,
            Some(scoped_route_configuration::key::fragment::Type::StringKey(
                vehicle.clone()
            ))
        );
        // `scope` is what `scopes` holds.
        assert_eq!(*gateway::scope("p-", vehicle, *reach), **r);
    }
    assert_eq!(gateway::scopes("p-", &BTreeMap::new()).items.len(), 3);
}

#[test]
fn a_reach_change_changes_only_that_vehicles_scope() {
    let mut fleet: BTreeMap<String, Reach> = [
        ("car-1".to_string(), Reach::Online),
        ("car-2".to_string(), Reach::Online),
    ]
    .into();
    let before = gateway::scopes("p-", &fleet);
    fleet.insert("car-1".into(), Reach::Offline);
    let after = gateway::scopes("p-", &fleet);
    assert_ne!(before.version, after.version);
    let v = |r: &misaki_compiler::snapshot::Resources, n: &str| r.items[n].version.clone();
    assert_ne!(
        v(&before, "vehicle_gateway/car-1"),
        v(&after, "vehicle_gateway/car-1")
    );
    assert_eq!(
        v(&before, "vehicle_gateway/car-2"),
        v(&after, "vehicle_gateway/car-2")
    );
    // Back to online: the same versions as before.
    fleet.insert("car-1".into(), Reach::Online);
    assert_eq!(gateway::scopes("p-", &fleet), before);
    // Each reach has its own table, so its own version.
    let all: std::collections::BTreeSet<String> = Reach::ALL
        .iter()
        .map(|r| gateway::scope("p-", "car-1", *r).version.to_string())
        .collect();
    assert_eq!(all.len(), 3);
}

// 4. The vehicle's side.

fn tunnel_address(l: &Listener) -> (String, u32, String) {
    let Some(address::Address::SocketAddress(sa)) =
        l.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("listener {} has no socket address", l.name)
    };
    let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        panic!("no port")
    };
    (sa.address.clone(), port, sa.resolver_name.clone())
}

fn tunnel_listeners(s: &Snapshot) -> Vec<Listener> {
    decode::<Listener>(s, ResourceType::Listener)
        .into_iter()
        .filter(|l| l.name.starts_with("vehicle_tunnel|"))
        .collect()
}

#[test]
fn a_vehicle_with_an_id_keeps_tunnels_to_every_gateway_host() {
    let p = policy(GATEWAYS);
    let s = compile(&p, &vehicle_node(Some("car-1")), "p-");
    let tunnels = tunnel_listeners(&s);
    let by_name: BTreeMap<String, (String, u32, String)> = tunnels
        .iter()
        .map(|l| (l.name.clone(), tunnel_address(l)))
        .collect();
    let resolver = "envoy.resolvers.reverse_connection".to_string();
    let expected: BTreeMap<String, (String, u32, String)> = [
        ("gw-1.cloud.example", "gw-1.cloud.example"),
        ("198.18.0.10", "198.18.0.10"),
        // An rc:// address splits on `:`.
        ("2001:db8::1", "2001_db8__1"),
    ]
    .into_iter()
    .map(|(host, in_cluster)| {
        (
            format!("vehicle_tunnel|{host}"),
            (
                format!("rc://car-1:car-1:misaki@vehicle_gateway|{in_cluster}:4"),
                0,
                resolver.clone(),
            ),
        )
    })
    .collect();
    assert_eq!(by_name, expected);
    // What arrives through a tunnel takes the vehicle's inbound routes, which exist.
    for l in &tunnels {
        let hcm = hcm_of(l);
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier else {
            panic!("not RDS")
        };
        assert_eq!(rds.route_config_name, VEHICLE_INBOUND);
        assert!(
            hcm.http2_protocol_options
                .and_then(|h| h.connection_keepalive)
                .is_some()
        );
    }
    assert!(names(&s, ResourceType::Route).contains(&VEHICLE_INBOUND.to_string()));
    // Each named cluster exists: DNS names by STRICT_DNS, IPs static, at the tunnel port.
    for (host, kind) in [
        (
            "vehicle_gateway|gw-1.cloud.example",
            cluster::DiscoveryType::StrictDns,
        ),
        (
            "vehicle_gateway|198.18.0.10",
            cluster::DiscoveryType::Static,
        ),
        (
            "vehicle_gateway|2001_db8__1",
            cluster::DiscoveryType::Static,
        ),
    ] {
        let c = cluster_named(&s, host);
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
            "{host}"
        );
        let la = c.load_assignment.expect("inline endpoints");
        let Some(lb_endpoint::HostIdentifier::Endpoint(e)) =
            &la.endpoints[0].lb_endpoints[0].host_identifier
        else {
            panic!("no endpoint")
        };
        let Some(address::Address::SocketAddress(sa)) =
            e.address.as_ref().and_then(|a| a.address.as_ref())
        else {
            panic!("no address")
        };
        assert_eq!(
            sa.port_specifier,
            Some(socket_address::PortSpecifier::PortValue(25445))
        );
        assert!(c.transport_socket.is_none(), "mTLS off");
    }
    all_clusters_routed_exist(&s);

    // Without an id: the clusters (shared by the fleet), no tunnels.
    let shared = compile(&p, &vehicle_node(None), "p-");
    assert!(tunnel_listeners(&shared).is_empty());
    assert_eq!(
        names(&shared, ResourceType::Cluster),
        names(&s, ResourceType::Cluster)
    );
}

#[test]
fn with_mtls_a_vehicles_gateway_clusters_go_over_tls() {
    let p = policy(&format!("mtls: strict, {GATEWAYS}"));
    let s = compile(&p, &vehicle_node(Some("car-1")), "p-");
    let c = cluster_named(&s, "vehicle_gateway|gw-1.cloud.example");
    assert!(c.transport_socket.is_some());
}

#[test]
fn with_vehicle_id_over_the_shared_snapshot_is_compiling_with_the_id() {
    let p_gw = policy(GATEWAYS);
    let p_mtls = policy(&format!("mtls: strict, {GATEWAYS}"));
    for p in [&p_gw, &p_mtls] {
        for low_power in [false, true] {
            for delta in [false, true] {
                let conditions = VehicleConditions { low_power };
                let mut anon = vehicle_node(None);
                anon.delta = delta;
                let mut car = vehicle_node(Some("car-7"));
                car.delta = delta;
                let shared = Arc::new(compile_in(p, &anon, conditions, "p-"));
                let own = with_vehicle_id(&shared, p, "car-7", "p-");
                let direct = compile_in(p, &car, conditions, "p-");
                assert_eq!(versions(&own), versions(&direct), "low_power {low_power}");
                assert_eq!(*own, direct);
                for t in ResourceType::PUSH_ORDER {
                    let same = std::ptr::eq(own.get(t), shared.get(t));
                    assert_eq!(same, t != ResourceType::Listener, "{t:?} shared?");
                }
                assert_eq!(tunnel_listeners(&own).len(), 3);
            }
        }
    }
}

fn tunnel_state(selected: Option<&str>) -> VehicleState {
    let mut s = VehicleState::default();
    s.interfaces.insert("wifi".into(), "wlan0".into());
    s.interfaces.insert("lte".into(), "wwan0".into());
    s.selected.insert("std".into(), Some("wifi".into()));
    s.selected
        .insert("tunnel".into(), selected.map(str::to_string));
    s
}

fn bound_device(c: &Cluster) -> Vec<u8> {
    let opts = &c
        .upstream_bind_config
        .as_ref()
        .expect("bind config")
        .socket_options;
    let o = opts
        .iter()
        .find(|o| o.level == 1 && o.name == 25)
        .unwrap_or_else(|| panic!("{}: no SO_BINDTODEVICE", c.name));
    match &o.value {
        Some(socket_option::Value::BufValue(b)) => b.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn with_vehicle_state_each_tunnel_uplink_gets_a_bound_cluster_and_the_listener_the_selected_one() {
    let p = policy(GATEWAYS);
    let node = vehicle_node(Some("car-1"));
    let s = compile_vehicle(&p, &node, &tunnel_state(Some("lte")), "p-");
    let clusters = names(&s, ResourceType::Cluster);
    let gw: Vec<&String> = clusters
        .iter()
        .filter(|c| c.starts_with("vehicle_gateway|"))
        .collect();
    assert_eq!(gw.len(), 6, "{gw:?}");
    for host in ["gw-1.cloud.example", "198.18.0.10", "2001_db8__1"] {
        for (uplink, iface) in [("lte", "wwan0"), ("wifi", "wlan0")] {
            let c = cluster_named(&s, &format!("vehicle_gateway|{host}|{uplink}"));
            assert_eq!(bound_device(&c), format!("{iface}\0").into_bytes());
        }
        assert!(!clusters.contains(&format!("vehicle_gateway|{host}")));
    }
    let addresses: Vec<String> = tunnel_listeners(&s)
        .iter()
        .map(|l| tunnel_address(l).0)
        .collect();
    assert_eq!(addresses.len(), 3);
    for a in &addresses {
        assert!(
            a.starts_with("rc://car-1:car-1:misaki@vehicle_gateway|"),
            "{a}"
        );
        assert!(a.ends_with("|lte:4"), "{a}");
    }
    all_clusters_routed_exist(&s);

    // A vehicle without lte: only wifi's clusters.
    let mut wifi_only = tunnel_state(Some("wifi"));
    wifi_only.interfaces.remove("lte");
    let s = compile_vehicle(&p, &node, &wifi_only, "p-");
    let gw: Vec<String> = names(&s, ResourceType::Cluster)
        .into_iter()
        .filter(|c| c.starts_with("vehicle_gateway|"))
        .collect();
    assert_eq!(gw.len(), 3);
    assert!(gw.iter().all(|c| c.ends_with("|wifi")), "{gw:?}");
}

#[test]
fn no_usable_tunnel_uplink_means_no_tunnel_listener() {
    let p = policy(GATEWAYS);
    let node = vehicle_node(Some("car-1"));
    let mut not_owned = tunnel_state(Some("lte"));
    not_owned.interfaces.remove("lte");
    let mut unknown = tunnel_state(None);
    unknown.selected.remove("tunnel");
    for state in [tunnel_state(None), not_owned, unknown] {
        let s = compile_vehicle(&p, &node, &state, "p-");
        assert!(tunnel_listeners(&s).is_empty(), "{:?}", state.selected);
        assert!(names(&s, ResourceType::Listener).contains(&"vehicle_inbound".to_string()));
    }
}

#[test]
fn a_tunnel_selection_change_alters_only_listeners() {
    let p = policy(GATEWAYS);
    let node = vehicle_node(Some("car-1"));
    let lte = compile_vehicle(&p, &node, &tunnel_state(Some("lte")), "p-");
    let wifi = compile_vehicle(&p, &node, &tunnel_state(Some("wifi")), "p-");
    let none = compile_vehicle(&p, &node, &tunnel_state(None), "p-");
    assert_eq!(changed_types(&lte, &wifi), [ResourceType::Listener]);
    assert_eq!(changed_types(&lte, &none), [ResourceType::Listener]);
}

// 5. Low power on the vehicle.

fn outbound_target(s: &Snapshot, svc: &str) -> Result<String, (u32, String)> {
    target(&route_config(s, "vehicle_outbound"), svc)
}

#[test]
fn low_power_moves_the_vehicles_own_callers_to_the_replica_by_routes_only() {
    for mesh in ["", GATEWAYS] {
        let p = policy(mesh);
        let node = vehicle_node(Some("car-1"));
        let normal = compile_in(&p, &node, VehicleConditions { low_power: false }, "p-");
        let low = compile_in(&p, &node, VehicleConditions { low_power: true }, "p-");
        assert_eq!(
            outbound_target(&normal, "diag"),
            Ok(inbound_cluster("diag"))
        );
        assert_eq!(outbound_target(&low, "diag"), Ok(outbound_cluster("diag")));
        // `logs` stays (it has a replica, but not on_low_power: cloud); `cam` has none.
        for s in [&normal, &low] {
            assert_eq!(outbound_target(s, "logs"), Ok(inbound_cluster("logs")));
            assert_eq!(outbound_target(s, "cam"), Ok(inbound_cluster("cam")));
            // Calls arriving at the vehicle still go to its own instance.
            let inbound = route_config(s, VEHICLE_INBOUND);
            assert_eq!(target(&inbound, "diag"), Ok(inbound_cluster("diag")));
            all_clusters_routed_exist(s);
        }
        assert!(!names(&normal, ResourceType::Cluster).contains(&outbound_cluster("logs")));
        assert_eq!(
            changed_types(&normal, &low),
            [ResourceType::Route],
            "{mesh:?}"
        );
        // The replica's cluster reaches the replica.
        assert!(names(&low, ResourceType::Endpoint).contains(&outbound_cluster("diag")));
    }
}

#[test]
fn vehicle_state_low_power_moves_callers_to_the_replica_over_the_selected_uplink() {
    let p = policy(GATEWAYS);
    let node = vehicle_node(Some("car-1"));
    let normal = tunnel_state(Some("lte"));
    let mut low = normal.clone();
    low.low_power = true;
    let normal = compile_vehicle(&p, &node, &normal, "p-");
    let low = compile_vehicle(&p, &node, &low, "p-");
    assert_eq!(
        outbound_target(&normal, "diag"),
        Ok(inbound_cluster("diag"))
    );
    assert_eq!(
        outbound_target(&low, "diag"),
        Ok(uplink_cluster("diag", "wifi"))
    );
    assert_eq!(outbound_target(&low, "logs"), Ok(inbound_cluster("logs")));
    assert_eq!(changed_types(&normal, &low), [ResourceType::Route]);
    let clusters = names(&normal, ResourceType::Cluster);
    assert!(clusters.contains(&uplink_cluster("diag", "wifi")));
    assert!(clusters.contains(&uplink_cluster("diag", "lte")));
    all_clusters_routed_exist(&low);
}

#[test]
fn with_mtls_low_power_callers_reach_the_replica_through_its_cloud_sidecar() {
    let p = policy(&format!(
        "mtls: strict, cloud_inbound_port: 15443, {GATEWAYS}"
    ));
    let node = vehicle_node(Some("car-1"));
    let low = compile_in(&p, &node, VehicleConditions { low_power: true }, "p-");
    assert_eq!(outbound_target(&low, "diag"), Ok(outbound_cluster("diag")));
    let c = cluster_named(&low, &outbound_cluster("diag"));
    assert!(c.transport_socket.is_some(), "TLS to the replica's sidecar");
    let cla = decode::<envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>(
        &low,
        ResourceType::Endpoint,
    )
    .into_iter()
    .find(|e| e.cluster_name == outbound_cluster("diag"))
    .expect("replica endpoints");
    let Some(lb_endpoint::HostIdentifier::Endpoint(e)) =
        &cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        panic!("no endpoint")
    };
    let Some(address::Address::SocketAddress(sa)) =
        e.address.as_ref().and_then(|a| a.address.as_ref())
    else {
        panic!("no address")
    };
    assert_eq!(sa.address, "10.20.0.30");
    assert_eq!(
        sa.port_specifier,
        Some(socket_address::PortSpecifier::PortValue(15443))
    );
    // ... where that sidecar's cloud_inbound routes it to the replica.
    let cloud = compile(&p, &cloud_node(), "p-");
    let inbound = route_config(&cloud, "cloud_inbound");
    assert_eq!(target(&inbound, "diag"), Ok(inbound_cluster("diag")));
}

// Gateways in a policy with no vehicle service (yet): the tunnels' routes must exist.

#[test]
fn tunnel_listeners_name_an_existing_route_configuration_without_vehicle_services() {
    let text = format!(
        "version: 1
mesh: {{ {GATEWAYS} }}
uplinks:
  - {{ name: lte, kind: lte }}
classes:
  - {{ name: tunnel, uplinks: [lte] }}
services:
  - {{ name: maps, location: cloud, port: 8080, endpoints: [\"10.0.0.1:8080\"], routes: [/maps], class: tunnel }}
"
    );
    let p = misaki_policy::parse("mesh.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let s = compile(&p, &vehicle_node(Some("car-1")), "p-");
    let routes = names(&s, ResourceType::Route);
    for l in decode::<Listener>(&s, ResourceType::Listener) {
        let hcm = hcm_of(&l);
        if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier {
            assert!(
                routes.contains(&rds.route_config_name),
                "listener {} names route configuration {} which the snapshot lacks ({routes:?})",
                l.name,
                rds.route_config_name
            );
        }
    }
}
