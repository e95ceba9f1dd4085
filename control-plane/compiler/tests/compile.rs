//! Compiler tests on the quickstart policy and small policies built in place.

mod common;

use common::decode;
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    RouteConfiguration, VirtualHost, route, route_action,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::{ResourceType, Snapshot};
use misaki_compiler::{compile, inbound_cluster, outbound_cluster};
use misaki_policy::Policy;
use proptest::prelude::*;
use prost::Message;

const QUICKSTART: &str = include_str!("../../../examples/quickstart/mesh.yaml");

fn quickstart() -> Policy {
    misaki_policy::parse("mesh.yaml", QUICKSTART).expect("quickstart is valid")
}

fn vehicle() -> NodeInfo {
    NodeInfo {
        id: "car-1".into(),
        role: Role::Vehicle,
        vehicle_id: Some("car-1".into()),
        proxyless: false,
        delta: false,
        tls_dir: None,
    }
}

fn cloud() -> NodeInfo {
    NodeInfo {
        id: "cloud-1".into(),
        role: Role::Cloud,
        vehicle_id: None,
        proxyless: false,
        delta: false,
        tls_dir: None,
    }
}

/// The catch-all (by path) virtual host of the vehicle's outbound routes.
fn outbound_by_path(s: &Snapshot) -> VirtualHost {
    let rc: Vec<RouteConfiguration> = decode(s, ResourceType::Route);
    let out = rc
        .into_iter()
        .find(|r| r.name == "vehicle_outbound")
        .expect("outbound");
    out.virtual_hosts
        .into_iter()
        .find(|v| v.domains == ["*"])
        .expect("*")
}

/// The HTTP connection manager of a listener's first filter chain.
fn hcm_of(l: &Listener) -> HttpConnectionManager {
    let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type
    else {
        panic!("listener {} has no HTTP connection manager", l.name)
    };
    HttpConnectionManager::decode(any.value.as_slice()).expect("hcm")
}

fn names(s: &Snapshot, t: ResourceType) -> Vec<String> {
    s.get(t).items.keys().cloned().collect()
}

#[test]
fn vehicle_gets_outbound_clusters_for_remote_services_and_inbound_for_its_own() {
    let s = compile(&quickstart(), &vehicle(), "p-");
    let clusters = names(&s, ResourceType::Cluster);
    assert!(clusters.contains(&outbound_cluster("maps")));
    assert!(clusters.contains(&outbound_cluster("hazard-alerts")));
    assert!(clusters.contains(&inbound_cluster("diagnostics")));
    assert!(!clusters.contains(&outbound_cluster("diagnostics")));
    assert_eq!(
        names(&s, ResourceType::Listener),
        vec!["vehicle_inbound", "vehicle_outbound"]
    );
}

#[test]
fn cloud_gets_only_cloud_and_edge_services() {
    let s = compile(&quickstart(), &cloud(), "p-");
    let clusters = names(&s, ResourceType::Cluster);
    assert!(clusters.contains(&inbound_cluster("maps")));
    assert!(clusters.contains(&inbound_cluster("hazard-alerts")));
    assert!(!clusters.iter().any(|c| c.contains("diagnostics")));
    assert_eq!(names(&s, ResourceType::Listener), vec!["cloud_inbound"]);
}

#[test]
fn every_routed_cluster_exists_and_every_eds_cluster_has_its_assignment() {
    for node in [vehicle(), cloud()] {
        let s = compile(&quickstart(), &node, "p-");
        let clusters: Vec<Cluster> = decode(&s, ResourceType::Cluster);
        let cla_names = names(&s, ResourceType::Endpoint);
        for c in &clusters {
            let eds = c.cluster_discovery_type
                == Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Eds as i32,
                ));
            assert_eq!(eds, cla_names.contains(&c.name), "{}", c.name);
        }
        let routes: Vec<RouteConfiguration> = decode(&s, ResourceType::Route);
        for rc in &routes {
            for vh in &rc.virtual_hosts {
                for r in &vh.routes {
                    let Some(route::Action::Route(a)) = &r.action else {
                        panic!("route without action")
                    };
                    let Some(route_action::ClusterSpecifier::Cluster(c)) = &a.cluster_specifier
                    else {
                        panic!("route without cluster")
                    };
                    assert!(clusters.iter().any(|x| &x.name == c), "dangling {c}");
                }
            }
        }
        // Each listener's RDS name has a route configuration.
        let listeners: Vec<Listener> = decode(&s, ResourceType::Listener);
        for l in &listeners {
            let hcm = hcm_of(l);
            let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier
            else {
                panic!("not RDS")
            };
            assert!(routes.iter().any(|r| r.name == rds.route_config_name));
        }
    }
}

#[test]
fn endpoints_carry_a_weighted_locality() {
    let s = compile(&quickstart(), &vehicle(), "p-");
    let clas: Vec<ClusterLoadAssignment> = decode(&s, ResourceType::Endpoint);
    assert!(!clas.is_empty());
    for cla in clas {
        for l in &cla.endpoints {
            assert!(l.locality.is_some(), "{}", cla.cluster_name);
            assert_eq!(l.load_balancing_weight.as_ref().map(|w| w.value), Some(1));
        }
    }
}

#[test]
fn class_sets_timeout_retries_priority_and_class_header() {
    let s = compile(&quickstart(), &vehicle(), "p-");
    let by_path = outbound_by_path(&s);
    let hazard = by_path
        .routes
        .iter()
        .find(|r| r.name.starts_with("hazard-alerts:"))
        .expect("hazard route");
    let Some(route::Action::Route(a)) = &hazard.action else {
        panic!()
    };
    assert_eq!(a.priority, 1, "critical → HIGH");
    assert_eq!(a.timeout.as_ref().map(|d| d.seconds), Some(2));
    assert_eq!(
        a.retry_policy
            .as_ref()
            .and_then(|p| p.num_retries.as_ref())
            .map(|n| n.value),
        Some(3)
    );
    let h = &hazard.request_headers_to_add[0];
    assert_eq!(
        h.header.as_ref().map(|h| h.value.as_str()),
        Some("critical")
    );
    // DSCP 46 is set on the critical class's cluster (IP_TOS = 46 << 2).
    let clusters: Vec<Cluster> = decode(&s, ResourceType::Cluster);
    let c = clusters
        .iter()
        .find(|c| c.name == outbound_cluster("hazard-alerts"))
        .expect("cluster");
    let opt = &c
        .upstream_bind_config
        .as_ref()
        .expect("bind config")
        .socket_options[0];
    assert_eq!(
        opt.value,
        Some(envoy_types::pb::envoy::config::core::v3::socket_option::Value::IntValue(184))
    );
}

#[test]
fn longer_prefixes_are_matched_first() {
    let text = QUICKSTART.replace(
        "routes: [\"/maps\"]",
        "routes: [\"/maps\", \"/hazards/maps\"]",
    );
    let Ok(p) = misaki_policy::parse("m.yaml", &text) else {
        // The quickstart's formatting changed; keep the test honest rather than silent.
        panic!("could not derive the test policy from the quickstart");
    };
    let s = compile(&p, &vehicle(), "p-");
    let by_path = outbound_by_path(&s);
    let pos = |name: &str| by_path.routes.iter().position(|r| r.name == name).unwrap();
    assert!(pos("maps:/hazards/maps") < pos("hazard-alerts:/hazards"));
}

#[test]
fn output_is_deterministic_and_versions_follow_content() {
    let p = quickstart();
    let a = compile(&p, &vehicle(), "p-");
    let b = compile(&p, &vehicle(), "p-");
    assert_eq!(a, b);
    let c = compile(&p, &vehicle(), "q-");
    assert_ne!(
        a.get(ResourceType::Cluster).version,
        c.get(ResourceType::Cluster).version
    );
    // Changing one service's endpoint changes that assignment's version only.
    let text = QUICKSTART.replacen("\"127.0.0.1:18081\"", "\"127.0.0.1:18082\"", 1);
    let p2 = misaki_policy::parse("m.yaml", &text).expect("valid");
    let d = compile(&p2, &vehicle(), "p-");
    let changed: Vec<&String> = a
        .get(ResourceType::Endpoint)
        .items
        .iter()
        .filter(|(n, r)| d.get(ResourceType::Endpoint).items[*n].version != r.version)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(
        a.get(ResourceType::Listener).version,
        d.get(ResourceType::Listener).version
    );
}

fn policy_with(n: usize, timeout_ms: u64, retries: u32) -> String {
    let mut s = String::from("version: 1\nuplinks:\n  - { name: wifi, kind: wifi }\nclasses:\n");
    s.push_str(&format!(
        "  - {{ name: c, timeout: {timeout_ms}ms, retries: {retries}, uplinks: [wifi] }}\nservices:\n"
    ));
    for i in 0..n {
        let loc = ["vehicle", "edge", "cloud"][i % 3];
        s.push_str(&format!(
            "  - {{ name: s{i}, location: {loc}, port: {}, endpoints: [\"10.0.0.{}:80\"], routes: [\"/s{i}\"], class: c }}\n",
            20000 + i,
            i % 250 + 1
        ));
    }
    s
}

proptest! {
    #[test]
    fn any_valid_policy_compiles_deterministically_with_consistent_references(
        n in 0usize..12, timeout_ms in 1u64..60_000, retries in 0u32..5
    ) {
        let p = misaki_policy::parse("gen.yaml", &policy_with(n, timeout_ms, retries)).expect("valid");
        for node in [vehicle(), cloud()] {
            let a = compile(&p, &node, "x-");
            prop_assert_eq!(&a, &compile(&p, &node, "x-"));
            let clusters = names(&a, ResourceType::Cluster);
            let expected = match node.role {
                Role::Vehicle => n,
                Role::Cloud => n - n.div_ceil(3),
            };
            prop_assert_eq!(clusters.len(), expected);
            prop_assert_eq!(names(&a, ResourceType::Endpoint), clusters);
        }
    }
}

#[test]
fn cloud_listener_decompresses_zstd_requests_when_a_cloud_service_takes_deferred_traffic() {
    let filters = |p: &Policy| -> Vec<String> {
        let s = compile(p, &cloud(), "p-");
        let listeners: Vec<Listener> = decode(&s, ResourceType::Listener);
        let hcm = hcm_of(&listeners[0]);
        hcm.http_filters.into_iter().map(|f| f.name).collect()
    };
    assert_eq!(
        filters(&quickstart()),
        [
            "envoy.filters.http.decompressor",
            "envoy.filters.http.router"
        ]
    );
    let no_deferral = QUICKSTART.replace("deferrable: true", "deferrable: false");
    assert_ne!(no_deferral, QUICKSTART);
    let p = misaki_policy::parse("m.yaml", &no_deferral).expect("valid");
    assert_eq!(filters(&p), ["envoy.filters.http.router"]);
}

/// The quickstart vehicle with wlan0/wwan0 (no dsrc), `standard` on wifi, `critical`
/// on lte, `bulk` without uplink.
fn state(defer: bool) -> misaki_compiler::VehicleState {
    let mut s = misaki_compiler::VehicleState::default();
    s.interfaces.insert("wifi".into(), "wlan0".into());
    s.interfaces.insert("lte".into(), "wwan0".into());
    s.selected.insert("standard".into(), Some("wifi".into()));
    s.selected.insert("critical".into(), Some("lte".into()));
    s.selected.insert("bulk".into(), None);
    if defer {
        s.defer_to = Some("127.0.0.1:15080".parse().unwrap());
    }
    s
}

fn route_named<'a>(
    vh: &'a VirtualHost,
    name: &str,
) -> &'a envoy_types::pb::envoy::config::route::v3::Route {
    vh.routes
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no route {name}"))
}

fn cluster_of(r: &envoy_types::pb::envoy::config::route::v3::Route) -> Option<String> {
    match &r.action {
        Some(route::Action::Route(a)) => match &a.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => Some(c.clone()),
            _ => None,
        },
        _ => None,
    }
}

#[test]
fn with_vehicle_state_each_allowed_uplink_gets_a_bound_cluster() {
    use envoy_types::pb::envoy::config::core::v3::socket_option;
    let s = misaki_compiler::compile_vehicle(&quickstart(), &vehicle(), &state(false), "p-");
    let clusters: Vec<Cluster> = decode(&s, ResourceType::Cluster);
    let find = |n: &str| clusters.iter().find(|c| c.name == n);
    // maps is `standard` [wifi, lte]; hazard-alerts is `critical` [dsrc, lte, wifi] and
    // this vehicle has no dsrc.
    for name in [
        "out|maps|wifi",
        "out|maps|lte",
        "out|hazard-alerts|lte",
        "out|hazard-alerts|wifi",
    ] {
        assert!(find(name).is_some(), "{name} missing");
    }
    assert!(find("out|hazard-alerts|dsrc").is_none());
    assert!(
        find("out|maps").is_none(),
        "no unbound cluster for remote services"
    );
    let c = find("out|hazard-alerts|lte").unwrap();
    let opts = &c
        .upstream_bind_config
        .as_ref()
        .expect("bound")
        .socket_options;
    let bind = opts
        .iter()
        .find(|o| o.level == 1 && o.name == 25)
        .expect("SO_BINDTODEVICE");
    assert_eq!(
        bind.value,
        Some(socket_option::Value::BufValue(b"wwan0\0".to_vec()))
    );
    assert_eq!(bind.state, socket_option::SocketState::StatePrebind as i32);
    let tos = opts
        .iter()
        .find(|o| o.level == 0 && o.name == 1)
        .expect("IP_TOS");
    assert_eq!(tos.value, Some(socket_option::Value::IntValue(46 << 2)));
    // Vehicle-local services stay on their unbound local cluster.
    assert!(find(&inbound_cluster("diagnostics")).is_some());

    let by_path = outbound_by_path(&s);
    assert_eq!(
        cluster_of(route_named(&by_path, "maps:/maps")).as_deref(),
        Some("out|maps|wifi")
    );
    assert_eq!(
        cluster_of(route_named(&by_path, "hazard-alerts:/hazards")).as_deref(),
        Some("out|hazard-alerts|lte")
    );
}

#[test]
fn a_selection_change_is_a_route_only_change() {
    let p = quickstart();
    let a = misaki_compiler::compile_vehicle(&p, &vehicle(), &state(false), "p-");
    let mut moved = state(false);
    moved.selected.insert("standard".into(), Some("lte".into()));
    let b = misaki_compiler::compile_vehicle(&p, &vehicle(), &moved, "p-");
    for t in [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
    ] {
        assert_eq!(a.get(t).version, b.get(t).version, "{t:?} must not change");
    }
    assert_ne!(
        a.get(ResourceType::Route).version,
        b.get(ResourceType::Route).version
    );
    let by_path = outbound_by_path(&b);
    assert_eq!(
        cluster_of(route_named(&by_path, "maps:/maps")).as_deref(),
        Some("out|maps|lte")
    );
}

#[test]
fn no_usable_uplink_is_an_immediate_503_or_store_and_forward_when_deferrable() {
    let p = quickstart();
    let mut none = state(false);
    none.selected.insert("standard".into(), None);
    let s = misaki_compiler::compile_vehicle(&p, &vehicle(), &none, "p-");
    let by_path = outbound_by_path(&s);
    let r = route_named(&by_path, "maps:/maps");
    let Some(route::Action::DirectResponse(d)) = &r.action else {
        panic!("expected a direct response: {r:?}")
    };
    assert_eq!(d.status, 503);
    let h = r.response_headers_to_add[0].header.as_ref().unwrap();
    assert_eq!(
        (h.key.as_str(), h.value.as_str()),
        ("x-misaki-reason", "no-uplink")
    );
    // bulk (deferrable) has no uplink either: without an ingest it is a 503 too ...
    assert!(cluster_of(route_named(&by_path, "telemetry:/telemetry")).is_none());
    // ... and with one it goes to store-and-forward, over a static loopback cluster.
    let s = misaki_compiler::compile_vehicle(&p, &vehicle(), &state(true), "p-");
    let by_path = outbound_by_path(&s);
    assert_eq!(
        cluster_of(route_named(&by_path, "telemetry:/telemetry")).as_deref(),
        Some(misaki_compiler::DEFER_CLUSTER)
    );
    let clusters: Vec<Cluster> = decode(&s, ResourceType::Cluster);
    let defer = clusters
        .iter()
        .find(|c| c.name == misaki_compiler::DEFER_CLUSTER)
        .unwrap();
    assert_eq!(
        defer.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32
        ))
    );
    // A selection the class does not allow (stale state) is no uplink, never a wrong one.
    let mut odd = state(false);
    odd.selected.insert("standard".into(), Some("dsrc".into()));
    let s = misaki_compiler::compile_vehicle(&p, &vehicle(), &odd, "p-");
    assert!(cluster_of(route_named(&outbound_by_path(&s), "maps:/maps")).is_none());
}

#[test]
fn cross_uplink_retry_routes_to_an_aggregate_with_the_selected_uplink_first() {
    use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
    let p = quickstart();
    let mut st = state(false);
    st.cross_uplink_retry = true;
    let s = misaki_compiler::compile_vehicle(&p, &vehicle(), &st, "p-");
    let clusters: Vec<Cluster> = decode(&s, ResourceType::Cluster);
    let order = |name: &str| -> Vec<String> {
        let c = clusters
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let Some(cluster::ClusterDiscoveryType::ClusterType(t)) = &c.cluster_discovery_type else {
            panic!("{name} is not an aggregate")
        };
        assert_eq!(t.name, "envoy.clusters.aggregate");
        ClusterConfig::decode(t.typed_config.as_ref().unwrap().value.as_slice())
            .unwrap()
            .clusters
    };
    // maps: standard [wifi, lte]; one aggregate per possible first uplink.
    assert_eq!(order("agg|maps|wifi"), ["out|maps|wifi", "out|maps|lte"]);
    assert_eq!(order("agg|maps|lte"), ["out|maps|lte", "out|maps|wifi"]);
    // telemetry (bulk) may only use wifi: nothing to cross to, no aggregate.
    assert!(!clusters.iter().any(|c| c.name.starts_with("agg|telemetry")));
    let by_path = outbound_by_path(&s);
    let r = route_named(&by_path, "maps:/maps");
    assert_eq!(cluster_of(r).as_deref(), Some("agg|maps|wifi"));
    let Some(route::Action::Route(a)) = &r.action else {
        panic!()
    };
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(
        retry.retry_priority.as_ref().unwrap().name,
        "envoy.retry_priorities.previous_priorities"
    );
    // standard: 10 s, 2 retries → 3 tries of 3.333 s.
    assert_eq!(retry.per_try_timeout.as_ref().unwrap().seconds, 3);
    let wifi = clusters.iter().find(|c| c.name == "out|maps|wifi").unwrap();
    assert_eq!(wifi.connect_timeout.as_ref().unwrap().seconds, 3);
    // Every caught request may cross at once (Envoy's default is 3 concurrent retries).
    for name in ["agg|maps|wifi", "out|maps|wifi"] {
        let c = clusters.iter().find(|c| c.name == name).unwrap();
        let t = &c
            .circuit_breakers
            .as_ref()
            .expect("circuit breakers")
            .thresholds;
        assert_eq!(t.len(), 2, "{name}: default and high priority");
        assert_eq!(t[0].max_retries.as_ref().unwrap().value, 1024);
    }
    // A selection change is still a route-only change.
    let mut moved = st.clone();
    moved.selected.insert("standard".into(), Some("lte".into()));
    let m = misaki_compiler::compile_vehicle(&p, &vehicle(), &moved, "p-");
    assert_eq!(
        s.get(ResourceType::Cluster).version,
        m.get(ResourceType::Cluster).version
    );
    assert_eq!(
        cluster_of(route_named(&outbound_by_path(&m), "maps:/maps")).as_deref(),
        Some("agg|maps|lte")
    );
}

/// The quickstart with its vehicle service declaring what it consumes.
fn quickstart_consuming(list: &str) -> Policy {
    let anchor = "    routes: [\"/diagnostics\"]\n    class: standard\n";
    assert!(QUICKSTART.contains(anchor), "test bug: quickstart changed");
    let text = QUICKSTART.replacen(anchor, &format!("{anchor}    consumes: {list}\n"), 1);
    misaki_policy::parse("mesh.yaml", &text).expect("valid")
}

#[test]
fn a_closed_scope_holds_only_declared_services_and_says_why_for_the_rest() {
    let p = quickstart_consuming("[maps]");
    let s = compile(&p, &vehicle(), "p-");
    let clusters = names(&s, ResourceType::Cluster);
    assert!(clusters.contains(&outbound_cluster("maps")));
    assert!(clusters.contains(&inbound_cluster("diagnostics")));
    assert!(
        !clusters.contains(&outbound_cluster("hazard-alerts")),
        "{clusters:?}"
    );
    let by_path = outbound_by_path(&s);
    let last = by_path.routes.last().expect("routes");
    let Some(route::Action::DirectResponse(d)) = &last.action else {
        panic!("last route is not the not-in-scope answer: {last:?}")
    };
    assert_eq!(d.status, 404);
    assert!(
        last.response_headers_to_add
            .iter()
            .any(|h| h.header.as_ref().unwrap().value == misaki_compiler::NOT_IN_SCOPE)
    );
    // Every other route of the vehicle still routes to a held cluster.
    for r in &by_path.routes[..by_path.routes.len() - 1] {
        let Some(route::Action::Route(a)) = &r.action else {
            panic!("{r:?}")
        };
        let Some(route_action::ClusterSpecifier::Cluster(c)) = &a.cluster_specifier else {
            panic!("{a:?}")
        };
        assert!(clusters.contains(c), "{c}");
    }
    // Proxyless clients get listeners only for what is in scope.
    let mut proxyless = vehicle();
    proxyless.proxyless = true;
    let s = compile(&p, &proxyless, "p-");
    let listeners = names(&s, ResourceType::Listener);
    assert!(listeners.contains(&"maps".to_string()));
    assert!(!listeners.contains(&"hazard-alerts".to_string()));
    // The cloud side is not scoped.
    assert_eq!(
        compile(&p, &cloud(), "p-"),
        compile(&quickstart(), &cloud(), "p-")
    );
}

#[test]
fn a_delta_vehicle_gets_undeclared_services_on_demand_through_scopes() {
    use envoy_types::pb::envoy::config::route::v3::ScopedRouteConfiguration;
    let p = quickstart();
    let mut node = vehicle();
    node.delta = true;
    let s = compile(&p, &node, "p-");
    let clusters = s.get(ResourceType::Cluster);
    assert!(clusters.is_on_demand(&outbound_cluster("maps")));
    assert!(
        !clusters.is_on_demand(&inbound_cluster("diagnostics")),
        "own services are held"
    );
    // The outbound listener takes scopes over SRDS instead of one table.
    let listeners: Vec<Listener> = decode(&s, ResourceType::Listener);
    let out = listeners
        .iter()
        .find(|l| l.name == "vehicle_outbound")
        .unwrap();
    assert!(matches!(
        hcm_of(out).route_specifier,
        Some(http_connection_manager::RouteSpecifier::ScopedRoutes(_))
    ));
    let filters: Vec<String> = hcm_of(out)
        .http_filters
        .iter()
        .map(|f| f.name.clone())
        .collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.http.lua",
            "envoy.filters.http.on_demand",
            "envoy.filters.http.router"
        ]
    );
    // Each scope's table is in the snapshot (a fetch never hangs); on demand unless
    // it holds a service the vehicle keeps.
    let scopes: Vec<ScopedRouteConfiguration> = decode(&s, ResourceType::ScopedRoute);
    let routes = s.get(ResourceType::Route);
    for sc in &scopes {
        assert!(
            routes.items.contains_key(&sc.route_configuration_name),
            "{}",
            sc.name
        );
        assert_eq!(
            sc.on_demand,
            routes.is_on_demand(&sc.route_configuration_name),
            "{}",
            sc.name
        );
    }
    // A key's scope is its bucket; its routes there match the key exactly.
    let scope_of = |key: &str| {
        let name = format!("vehicle_outbound/{}", misaki_compiler::scope_bucket(key));
        scopes
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{key}: no scope {name}"))
    };
    assert!(
        scope_of("host/maps").on_demand
            || scope_of("host/maps").name == scope_of("host/diagnostics").name
    );
    assert!(
        !scope_of("host/diagnostics").on_demand,
        "the vehicle's own service is held"
    );
    let tables: Vec<RouteConfiguration> = decode(&s, ResourceType::Route);
    let maps_table = tables
        .iter()
        .find(|t| t.name == scope_of("path/maps").route_configuration_name)
        .expect("table of path/maps");
    let keys: Vec<String> = maps_table.virtual_hosts[0]
        .routes
        .iter()
        .flat_map(|r| &r.r#match.as_ref().unwrap().headers)
        .filter(|h| h.name == misaki_compiler::KEY_HEADER)
        .map(|h| format!("{:?}", h.header_match_specifier))
        .collect();
    assert!(keys.iter().any(|k| k.contains("\"path/maps\"")), "{keys:?}");

    // Every route goes to a cluster of the snapshot.
    for rc in decode::<RouteConfiguration>(&s, ResourceType::Route) {
        for r in rc.virtual_hosts.iter().flat_map(|v| &v.routes) {
            if let Some(route::Action::Route(a)) = &r.action {
                let Some(route_action::ClusterSpecifier::Cluster(c)) = &a.cluster_specifier else {
                    panic!("{a:?}")
                };
                assert!(clusters.items.contains_key(c), "{c}");
            }
        }
    }
    // SotW keeps the full single table; declaring everything needs no scopes.
    let sotw = compile(&p, &vehicle(), "p-");
    assert!(sotw.get(ResourceType::ScopedRoute).items.is_empty());
    assert!(!sotw.get(ResourceType::Cluster).has_on_demand());
    let closed = compile(&quickstart_consuming("[maps]"), &node, "p-");
    assert!(closed.get(ResourceType::ScopedRoute).items.is_empty());
}
