//! Data-plane mTLS (`mesh.mtls`): TLS contexts on vehicle clusters and on the cloud
//! sidecar's inbound per mode; secrets only from `compile_vehicle` with a credential.

mod common;

use common::decode;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{
    ConfigSource, address, config_source, data_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, Secret, UpstreamTlsContext, common_tls_context, secret,
};
use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher;
use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::{ResourceType, Snapshot};
use misaki_compiler::{VehicleCredential, VehicleState, compile, compile_vehicle};
use misaki_policy::Policy;
use prost::Message;

/// Two cloud services (maps: two instances on one host, one on another; a gRPC one),
/// a vehicle service, a deferrable class; `mesh` as given.
fn policy(mesh: &str) -> Policy {
    let text = format!(
        "version: 1
mesh: {{ cloud_inbound_port: 15443, {mesh} }}
uplinks:
  - {{ name: wifi, kind: wifi }}
  - {{ name: lte, kind: lte }}
classes:
  - {{ name: std, uplinks: [wifi, lte], retries: 1 }}
  - {{ name: bulk, uplinks: [wifi], deferrable: true }}
services:
  - {{ name: maps, location: cloud, port: 8080, endpoints: [\"10.0.0.1:8080\", \"10.0.0.1:8081\", \"10.0.0.2:8080\"], routes: [/maps], class: std }}
  - {{ name: hazards, location: edge, protocol: grpc, port: 9090, endpoints: [\"mec.example.net:9090\"], routes: [/hazards], class: bulk }}
  - {{ name: diag, location: vehicle, port: 18090, routes: [/diag], class: std }}
"
    );
    misaki_policy::parse("mesh.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn node(role: Role, tls_dir: Option<&str>) -> NodeInfo {
    NodeInfo {
        id: "n".into(),
        role,
        vehicle_id: (role == Role::Vehicle).then(|| "car-1".into()),
        proxyless: false,
        delta: false,
        tls_dir: tls_dir.map(str::to_string),
    }
}

fn credential() -> Arc<VehicleCredential> {
    Arc::new(VehicleCredential {
        cert_chain_pem: "-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END CERTIFICATE-----\n".into(),
        key_pem: "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleQ==\n-----END PRIVATE KEY-----\n"
            .into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\nY2E=\n-----END CERTIFICATE-----\n".into(),
    })
}

fn state(credential: Option<Arc<VehicleCredential>>) -> VehicleState {
    let mut s = VehicleState::default();
    s.interfaces.insert("wifi".into(), "wlan0".into());
    s.interfaces.insert("lte".into(), "wwan0".into());
    s.selected.insert("std".into(), Some("wifi".into()));
    s.credential = credential;
    s
}

fn cluster(s: &Snapshot, name: &str) -> Cluster {
    decode::<Cluster>(s, ResourceType::Cluster)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

fn upstream_tls(c: &Cluster) -> Option<UpstreamTlsContext> {
    let ts = c.transport_socket.as_ref()?;
    assert_eq!(ts.name, "envoy.transport_sockets.tls");
    let Some(transport_socket::ConfigType::TypedConfig(a)) = &ts.config_type else {
        panic!("typed config");
    };
    Some(UpstreamTlsContext::decode(a.value.as_slice()).expect("upstream TLS"))
}

/// `host:port` of a cluster's endpoints (EDS assignment or inline).
fn endpoints(s: &Snapshot, c: &Cluster) -> Vec<String> {
    let cla = c.load_assignment.clone().unwrap_or_else(|| {
        decode::<ClusterLoadAssignment>(s, ResourceType::Endpoint)
            .into_iter()
            .find(|e| e.cluster_name == c.name)
            .expect("assignment")
    });
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("endpoint");
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.clone())
            else {
                panic!("socket address");
            };
            let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else {
                panic!("port");
            };
            format!("{}:{p}", sa.address)
        })
        .collect()
}

/// Where an SDS secret comes from: `file:<path>` or `ads`.
fn source(c: &Option<ConfigSource>) -> String {
    match c.as_ref().and_then(|c| c.config_source_specifier.clone()) {
        Some(config_source::ConfigSourceSpecifier::PathConfigSource(p)) => {
            format!("file:{}", p.path)
        }
        Some(config_source::ConfigSourceSpecifier::Ads(_)) => "ads".into(),
        other => panic!("unexpected SDS source {other:?}"),
    }
}

/// (own certificate name and source, CA name and source, URI SAN prefixes, ALPN).
fn summary(ctx: &CommonTlsContext) -> (String, String, Vec<String>, Vec<String>) {
    let cert = &ctx.tls_certificate_sds_secret_configs;
    assert_eq!(cert.len(), 1);
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
        &ctx.validation_context_type
    else {
        panic!("combined validation context");
    };
    let ca = v.validation_context_sds_secret_config.as_ref().expect("CA");
    let sans = v
        .default_validation_context
        .as_ref()
        .expect("SAN matchers")
        .match_typed_subject_alt_names
        .iter()
        .map(|m| {
            assert_eq!(m.san_type, 3, "URI");
            match m.matcher.as_ref().and_then(|m| m.match_pattern.clone()) {
                Some(string_matcher::MatchPattern::Prefix(p)) => p,
                other => panic!("a prefix, not {other:?}"),
            }
        })
        .collect();
    (
        format!("{} {}", cert[0].name, source(&cert[0].sds_config)),
        format!("{} {}", ca.name, source(&ca.sds_config)),
        sans,
        ctx.alpn_protocols.clone(),
    )
}

fn has_http2(c: &Cluster) -> bool {
    c.typed_extension_protocol_options
        .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
}

#[test]
fn off_is_plaintext_to_the_instances_and_nothing_about_tls_anywhere() {
    let p = policy("mtls: off");
    assert_eq!(
        p,
        policy("vehicle_outbound_port: 15001"),
        "off is the default"
    );
    let v = compile(&p, &node(Role::Vehicle, None), "x-");
    let maps = cluster(&v, "out|maps");
    assert!(upstream_tls(&maps).is_none() && !has_http2(&maps));
    assert_eq!(
        endpoints(&v, &maps),
        ["10.0.0.1:8080", "10.0.0.1:8081", "10.0.0.2:8080"]
    );
    let c = compile(&p, &node(Role::Cloud, None), "x-");
    let l: Vec<Listener> = decode(&c, ResourceType::Listener);
    assert_eq!(l.len(), 1);
    assert!(l[0].listener_filters.is_empty() && l[0].filter_chains.len() == 1);
    assert!(l[0].filter_chains[0].transport_socket.is_none());
    let names: Vec<String> = hcm_of(&l[0].filter_chains[0])
        .http_filters
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.decompressor",
            "envoy.filters.http.router"
        ]
    );
    let s = compile_vehicle(
        &p,
        &node(Role::Vehicle, None),
        &state(Some(credential())),
        "x-",
    );
    assert!(
        s.get(ResourceType::Secret).items.is_empty(),
        "no key without mTLS"
    );
}

#[test]
fn a_vehicle_fed_by_misaki_cp_calls_the_sidecars_over_tls_with_file_based_sds() {
    for mode in ["permissive", "strict"] {
        let p = policy(&format!("mtls: {mode}, trust_domain: fleet.example"));
        let v = compile(&p, &node(Role::Vehicle, Some("/run/misaki/tls/")), "x-");
        assert!(v.get(ResourceType::Secret).items.is_empty());
        for name in ["out|maps", "out|hazards"] {
            let c = cluster(&v, name);
            let tls = upstream_tls(&c).unwrap_or_else(|| panic!("{name} has TLS"));
            assert_eq!(
                summary(tls.common_tls_context.as_ref().unwrap()),
                (
                    "misaki_vehicle_cert file:/run/misaki/tls/sds-vehicle-cert.yaml".into(),
                    "misaki_fleet_ca file:/run/misaki/tls/sds-fleet-ca.yaml".into(),
                    vec!["spiffe://fleet.example/cloud/".to_string()],
                    vec!["h2".to_string()],
                ),
                "{name}"
            );
            assert!(has_http2(&c), "{name} speaks HTTP/2 (ALPN offers only h2)");
            let params = tls
                .common_tls_context
                .as_ref()
                .unwrap()
                .tls_params
                .clone()
                .unwrap();
            assert_eq!(params.tls_maximum_protocol_version, 4, "TLS 1.3 offered");
        }
        // The sidecar on each instance's host, once per host.
        let maps = cluster(&v, "out|maps");
        assert_eq!(endpoints(&v, &maps), ["10.0.0.1:15443", "10.0.0.2:15443"]);
        let hazards = cluster(&v, "out|hazards");
        assert_eq!(endpoints(&v, &hazards), ["mec.example.net:15443"]);
        // Its own services stay local and plaintext.
        assert!(upstream_tls(&cluster(&v, "in|diag")).is_none());
    }
    // Without metadata: the default directory.
    let v = compile(&policy("mtls: strict"), &node(Role::Vehicle, None), "x-");
    let tls = upstream_tls(&cluster(&v, "out|maps")).unwrap();
    let (cert, ca, sans, _) = summary(tls.common_tls_context.as_ref().unwrap());
    assert_eq!(
        (cert.as_str(), ca.as_str()),
        (
            "misaki_vehicle_cert file:/etc/misaki/tls/sds-vehicle-cert.yaml",
            "misaki_fleet_ca file:/etc/misaki/tls/sds-fleet-ca.yaml"
        )
    );
    assert_eq!(sans, ["spiffe://misaki.local/cloud/"]);
}

#[test]
fn edge_netd_serves_the_vehicles_own_credential_over_ads_and_nothing_without_one() {
    let p = policy("mtls: strict");
    let n = node(Role::Vehicle, Some("/ignored"));
    let with = compile_vehicle(&p, &n, &state(Some(credential())), "x-");
    for name in ["out|maps|wifi", "out|maps|lte", "out|hazards|wifi"] {
        let c = cluster(&with, name);
        let tls = upstream_tls(&c).unwrap_or_else(|| panic!("{name} has TLS"));
        let (cert, ca, _, _) = summary(tls.common_tls_context.as_ref().unwrap());
        assert_eq!(
            (cert.as_str(), ca.as_str()),
            ("misaki_vehicle_cert ads", "misaki_fleet_ca ads")
        );
    }
    let secrets: Vec<Secret> = decode(&with, ResourceType::Secret);
    let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["misaki_fleet_ca", "misaki_vehicle_cert"]);
    let inline = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.clone())
    {
        Some(data_source::Specifier::InlineString(s)) => s,
        other => panic!("inline PEM, not {other:?}"),
    };
    let c = credential();
    match &secrets[0].r#type {
        Some(secret::Type::ValidationContext(v)) => assert_eq!(inline(&v.trusted_ca), c.ca_pem),
        other => panic!("{other:?}"),
    }
    match &secrets[1].r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            assert_eq!(inline(&t.certificate_chain), c.cert_chain_pem);
            assert_eq!(inline(&t.private_key), c.key_pem);
        }
        other => panic!("{other:?}"),
    }
    // Not enrolled yet: the same TLS clusters, no secrets (Envoy waits for them).
    let without = compile_vehicle(&p, &n, &state(None), "x-");
    assert!(without.get(ResourceType::Secret).items.is_empty());
    assert_eq!(
        without.get(ResourceType::Cluster).version,
        with.get(ResourceType::Cluster).version,
        "the credential changes only SDS"
    );
    // A renewed certificate: an SDS-only change.
    let mut renewed = (*credential()).clone();
    renewed.cert_chain_pem.push('\n');
    let again = compile_vehicle(&p, &n, &state(Some(Arc::new(renewed))), "x-");
    assert_ne!(
        again.get(ResourceType::Secret).version,
        with.get(ResourceType::Secret).version
    );
    for t in ResourceType::PUSH_ORDER.into_iter().skip(1) {
        assert_eq!(again.get(t).version, with.get(t).version, "{t:?}");
    }
    // And the key never shows in debug output of the state or the snapshot.
    let shown = format!("{:?} {with:?}", state(Some(credential())));
    assert!(
        !shown.contains("c2VjcmV0") && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );
}

#[test]
fn a_proxyless_grpc_client_gets_its_certificate_from_its_own_bootstrap() {
    let p = policy("mtls: strict");
    let mut n = node(Role::Vehicle, None);
    n.proxyless = true;
    let cp = compile(&p, &n, "x-");
    let edge = compile_vehicle(&p, &n, &state(Some(credential())), "x-");
    assert!(
        edge.get(ResourceType::Secret).items.is_empty(),
        "no SDS for gRPC"
    );
    for (s, name) in [(&cp, "out|maps"), (&edge, "out|maps|wifi")] {
        let tls = upstream_tls(&cluster(s, name)).expect("TLS");
        let ctx = tls.common_tls_context.unwrap();
        // gRPC takes no SDS and no TLS parameters (it NACKs the cluster otherwise).
        assert!(ctx.tls_certificate_sds_secret_configs.is_empty() && ctx.tls_params.is_none());
        let own = ctx
            .tls_certificate_provider_instance
            .expect("own certificate");
        assert_eq!(own.instance_name, misaki_compiler::GRPC_CERT_PROVIDER);
        let Some(common_tls_context::ValidationContextType::ValidationContext(v)) =
            ctx.validation_context_type
        else {
            panic!("a plain validation context");
        };
        let ca = v.ca_certificate_provider_instance.expect("CA");
        assert_eq!(ca.instance_name, "misaki");
        let sans: Vec<_> = v
            .match_typed_subject_alt_names
            .iter()
            .map(|m| m.san_type)
            .collect();
        assert_eq!(sans, [3], "a URI SAN check");
        assert_eq!(ctx.alpn_protocols, ["h2"]);
    }
}

#[test]
fn misaki_cp_never_puts_a_secret_in_a_snapshot() {
    for mesh in ["mtls: off", "mtls: permissive", "mtls: strict"] {
        let p = policy(mesh);
        for role in [Role::Vehicle, Role::Cloud] {
            for (proxyless, delta) in [(false, false), (false, true), (true, false)] {
                let mut n = node(role, None);
                n.proxyless = proxyless;
                n.delta = delta;
                let s = compile(&p, &n, "x-");
                assert!(s.get(ResourceType::Secret).items.is_empty(), "{mesh} {n:?}");
            }
        }
    }
}

fn hcm_of(chain: &FilterChain) -> HttpConnectionManager {
    let Some(filter::ConfigType::TypedConfig(a)) = &chain.filters[0].config_type else {
        panic!("HCM");
    };
    HttpConnectionManager::decode(a.value.as_slice()).expect("hcm")
}

fn downstream_tls(chain: &FilterChain) -> DownstreamTlsContext {
    let ts = chain.transport_socket.as_ref().expect("TLS chain");
    let Some(transport_socket::ConfigType::TypedConfig(a)) = &ts.config_type else {
        panic!("typed config");
    };
    DownstreamTlsContext::decode(a.value.as_slice()).expect("downstream TLS")
}

fn filter_names(h: &HttpConnectionManager) -> Vec<String> {
    h.http_filters.iter().map(|f| f.name.clone()).collect()
}

/// The cloud listener's TLS chain: client certificate required from the fleet CA, a
/// vehicle or cloud identity; XFCC set; the vehicle header filter first.
fn check_tls_chain(chain: &FilterChain, dir: &str) {
    let tls = downstream_tls(chain);
    assert_eq!(tls.require_client_certificate.map(|b| b.value), Some(true));
    assert_eq!(
        summary(tls.common_tls_context.as_ref().unwrap()),
        (
            format!("misaki_cloud_cert file:{dir}/sds-cloud-cert.yaml"),
            format!("misaki_fleet_ca file:{dir}/sds-fleet-ca.yaml"),
            vec![
                "spiffe://misaki.local/vehicle/".to_string(),
                "spiffe://misaki.local/cloud/".to_string()
            ],
            vec!["h2".to_string(), "http/1.1".to_string()],
        )
    );
    let h = hcm_of(chain);
    assert_eq!(
        h.forward_client_cert_details,
        http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32
    );
    let set = h.set_current_client_cert_details.expect("set XFCC fields");
    assert!(set.uri && !set.cert && !set.chain && !set.dns && set.subject.is_none());
    // A certificate is checked only in the handshake: the connection must not outlive it.
    let age = h
        .common_http_protocol_options
        .as_ref()
        .and_then(|o| o.max_connection_duration.as_ref())
        .expect("a TLS connection has a maximum age");
    assert_eq!(
        age.seconds as u64,
        misaki_compiler::MAX_TLS_CONNECTION_AGE.as_secs()
    );
    assert_eq!(
        filter_names(&h),
        [
            "envoy.filters.http.lua",
            "envoy.filters.http.decompressor",
            "envoy.filters.http.router"
        ]
    );
}

#[test]
fn a_strict_cloud_sidecar_takes_only_mtls_and_names_the_vehicle() {
    let p = policy("mtls: strict");
    let c = compile(&p, &node(Role::Cloud, Some("/srv/tls")), "x-");
    let l: Vec<Listener> = decode(&c, ResourceType::Listener);
    assert_eq!((l.len(), l[0].name.as_str()), (1, "cloud_inbound"));
    assert!(l[0].listener_filters.is_empty());
    assert_eq!(l[0].filter_chains.len(), 1);
    assert!(l[0].filter_chains[0].filter_chain_match.is_none());
    check_tls_chain(&l[0].filter_chains[0], "/srv/tls");
    // Its clusters to the instances stay plaintext: the sidecar is next to them.
    for cl in decode::<Cluster>(&c, ResourceType::Cluster) {
        assert!(cl.transport_socket.is_none(), "{}", cl.name);
    }
}

#[test]
fn a_permissive_cloud_sidecar_also_takes_plaintext_without_a_vehicle_id() {
    let p = policy("mtls: permissive");
    let c = compile(&p, &node(Role::Cloud, None), "x-");
    let l: Vec<Listener> = decode(&c, ResourceType::Listener);
    let names: Vec<&str> = l[0]
        .listener_filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["envoy.filters.listener.tls_inspector"]);
    let protocols: Vec<&str> = l[0]
        .filter_chains
        .iter()
        .map(|c| {
            c.filter_chain_match
                .as_ref()
                .unwrap()
                .transport_protocol
                .as_str()
        })
        .collect();
    assert_eq!(protocols, ["tls", "raw_buffer"]);
    check_tls_chain(&l[0].filter_chains[0], "/etc/misaki/tls");
    let plain = &l[0].filter_chains[1];
    assert!(plain.transport_socket.is_none());
    let h = hcm_of(plain);
    assert_eq!(
        h.forward_client_cert_details,
        http_connection_manager::ForwardClientCertDetails::Sanitize as i32
    );
    assert!(h.set_current_client_cert_details.is_none());
    // The same filters: the Lua removes any x-misaki-vehicle a plaintext client sent.
    assert_eq!(filter_names(&h)[0], "envoy.filters.http.lua");
    assert_eq!(
        h.route_specifier,
        hcm_of(&l[0].filter_chains[0]).route_specifier
    );
}
