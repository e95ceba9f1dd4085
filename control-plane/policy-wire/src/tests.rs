use std::collections::BTreeMap;
use std::time::Duration;

use misaki_policy::{Endpoint, LowPowerAction, MeshSettings, Service, TrafficClass, Uplink};
use proptest::prelude::*;

use super::*;

const QUICKSTART: &str = include_str!("../../../examples/quickstart/mesh.yaml");

fn quickstart() -> Policy {
    misaki_policy::parse("quickstart", QUICKSTART).expect("quickstart is valid")
}

#[test]
fn the_quickstart_round_trips_and_keeps_its_version() {
    let p = quickstart();
    let w = to_wire(&p);
    assert_eq!(from_wire(&w).unwrap(), p);
    assert_eq!(w.version, version(&p));
    assert_eq!(w.version.len(), 16);
    let again = to_wire(&from_wire(&w).unwrap());
    assert_eq!(again, w, "same policy, same bytes, same version");
}

#[test]
fn a_change_changes_the_version() {
    let p = quickstart();
    let mut q = p.clone();
    q.mesh.vehicle_outbound_port = 16001;
    assert_ne!(version(&p), version(&q));
}

#[test]
fn an_update_from_an_older_control_plane_gets_default_ports_and_no_services() {
    let mut w = to_wire(&quickstart());
    w.mesh = None;
    w.services.clear();
    for c in &mut w.classes {
        c.timeout_ms = None;
    }
    let p = from_wire(&w).unwrap();
    assert_eq!(p.mesh, MeshSettings::default());
    assert!(p.services.is_empty());
    assert_eq!(
        p.classes["critical"].timeout,
        misaki_policy::DEFAULT_TIMEOUT
    );
}

#[test]
fn mtls_and_the_trust_domain_travel_and_defaults_keep_the_old_encoding() {
    let p = quickstart();
    let w = to_wire(&p);
    let m = w.mesh.clone().unwrap();
    assert_eq!(m.mtls, pb::mesh_settings::MtlsMode::Off as i32);
    assert_eq!(m.trust_domain, "", "the default travels as empty");
    // What an older control plane sent (ports only) encodes to the same bytes, so the
    // version of a policy without mTLS did not change with the new fields.
    let old = pb::MeshSettings {
        vehicle_outbound_port: m.vehicle_outbound_port,
        vehicle_inbound_port: m.vehicle_inbound_port,
        cloud_inbound_port: m.cloud_inbound_port,
        ..Default::default()
    };
    assert_eq!(old.encode_to_vec(), m.encode_to_vec());

    let mut q = p.clone();
    q.mesh.mtls = MtlsMode::Strict;
    q.mesh.trust_domain = TrustDomain::new("fleet.example").unwrap();
    let w = to_wire(&q);
    let m = w.mesh.clone().unwrap();
    assert_eq!(m.mtls, pb::mesh_settings::MtlsMode::Strict as i32);
    assert_eq!(m.trust_domain, "fleet.example");
    assert_ne!(w.version, version(&p));
    assert_eq!(from_wire(&w).unwrap(), q);
}

#[test]
fn a_bad_mtls_mode_or_trust_domain_on_the_wire_is_located() {
    let mut w = to_wire(&quickstart());
    let m = w.mesh.as_mut().unwrap();
    m.mtls = 9;
    m.trust_domain = "Not/A/Domain".into();
    let errs = from_wire(&w).unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["mesh.mtls", "mesh.trust_domain"], "{errs}");
    assert!(errs.0[0].message.contains("`wire value 9`"), "{errs}");
}

/// A quickstart with the vehicle gateway on and `diagnostics` moving to its cloud
/// replica on low power.
fn with_gateway() -> Policy {
    let mut p = quickstart();
    p.mesh.vehicle_gateway_port = 16444;
    p.mesh.vehicle_tunnel_port = 16445;
    p.mesh.vehicle_gateways = vec!["198.18.0.10".into(), "2001:db8::10".into()];
    p.mesh.vehicle_tunnel_class = Some("critical".into());
    let diag = p.services.get_mut("diagnostics").unwrap();
    diag.cloud_replica = vec![
        Endpoint {
            host: "2001:db8::2".into(),
            port: 8080,
        },
        Endpoint {
            host: "diag.cloud.example".into(),
            port: 8080,
        },
    ];
    diag.on_low_power = LowPowerAction::Cloud;
    p
}

#[test]
fn the_vehicle_gateway_and_low_power_fields_travel_and_defaults_keep_the_old_encoding() {
    let plain = to_wire(&quickstart());
    let m = plain.mesh.clone().unwrap();
    assert_eq!((m.vehicle_gateway_port, m.vehicle_tunnel_port), (0, 0));
    assert!(m.vehicle_gateways.is_empty() && m.vehicle_tunnel_class.is_empty());
    for s in &plain.services {
        assert!(s.cloud_replica.is_empty());
        assert_eq!(s.on_low_power, pb::service::LowPowerAction::Stay as i32);
    }

    let p = with_gateway();
    let w = to_wire(&p);
    let m = w.mesh.clone().unwrap();
    assert_eq!(
        (m.vehicle_gateway_port, m.vehicle_tunnel_port),
        (16444, 16445)
    );
    assert_eq!(m.vehicle_gateways, ["198.18.0.10", "2001:db8::10"]);
    assert_eq!(m.vehicle_tunnel_class, "critical");
    let diag = w.services.iter().find(|s| s.name == "diagnostics").unwrap();
    assert_eq!(diag.cloud_replica[0].host, "2001:db8::2");
    assert_eq!(diag.on_low_power, pb::service::LowPowerAction::Cloud as i32);
    assert_ne!(w.version, plain.version);
    assert_eq!(from_wire(&w).unwrap(), p);

    // The default ports set explicitly are the same policy, so the same bytes.
    let mut q = quickstart();
    q.mesh.vehicle_gateway_port = 15444;
    q.mesh.vehicle_tunnel_port = 15445;
    assert_eq!(to_wire(&q), plain);
}

#[test]
fn ipv6_endpoints_travel_without_brackets_and_come_back() {
    let mut p = quickstart();
    p.services.get_mut("maps").unwrap().endpoints = vec![Endpoint {
        host: "2001:db8::1".into(),
        port: 8080,
    }];
    let w = to_wire(&p);
    let maps = w.services.iter().find(|s| s.name == "maps").unwrap();
    assert_eq!(maps.endpoints[0].host, "2001:db8::1");
    assert_eq!(from_wire(&w).unwrap(), p);
}

/// A bad update is rejected by the policy parser, with its field path and message.
#[test]
fn invalid_updates_are_rejected_with_the_policy_checks_messages() {
    type Edit = Box<dyn Fn(&mut pb::PolicyUpdate)>;
    let svc = |w: &mut pb::PolicyUpdate| -> usize {
        w.services.iter().position(|s| s.name == "maps").unwrap()
    };
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(move |w| {
                let i = svc(w);
                w.services[i].class = "nope".into()
            }),
            "unknown class `nope`",
        ),
        (
            Box::new(move |w| {
                let i = svc(w);
                w.services[i].port = 70000
            }),
            "port",
        ),
        (
            Box::new(move |w| {
                let i = svc(w);
                w.services[i].routes = vec!["maps".into()]
            }),
            "routes[0]",
        ),
        (
            Box::new(move |w| {
                let i = svc(w);
                w.services[i].location = 0
            }),
            "location",
        ),
        (
            Box::new(move |w| {
                let i = svc(w);
                w.services[i].endpoints.clear()
            }),
            "endpoints",
        ),
        (
            Box::new(|w| {
                let mut s = w.services[0].clone();
                s.name = "logs".into();
                w.services.push(s);
            }),
            "already used by service",
        ),
        (
            Box::new(|w| w.services.push(w.services[0].clone())),
            "duplicate service name",
        ),
        (
            Box::new(|w| w.classes[0].uplinks = vec!["sat".into()]),
            "unknown uplink `sat`",
        ),
        (Box::new(|w| w.classes[0].dscp = 64), "dscp"),
        (
            Box::new(|w| w.classes[0].max_loss_percent = Some(101)),
            "max_loss_percent",
        ),
        (Box::new(|w| w.classes[0].priority = 7), "priority"),
        (Box::new(|w| w.uplinks[0].kind = 0), "kind"),
        (
            Box::new(|w| w.uplinks.push(w.uplinks[0].clone())),
            "duplicate uplink name",
        ),
        (Box::new(|w| w.uplinks.clear()), "uplinks"),
        (
            Box::new(|w| w.mesh.as_mut().unwrap().vehicle_inbound_port = 15001),
            "mesh ports must all differ",
        ),
        (Box::new(|w| w.classes[0].name = "Bad Name".into()), "name"),
        (
            Box::new(|w| w.mesh.as_mut().unwrap().vehicle_tunnel_port = 15443),
            "mesh ports must all differ",
        ),
        (
            Box::new(|w| w.mesh.as_mut().unwrap().vehicle_tunnel_class = "critical".into()),
            "`vehicle_tunnel_class` without `vehicle_gateways`",
        ),
        (
            Box::new(|w| {
                let m = w.mesh.as_mut().unwrap();
                m.vehicle_gateways = vec!["gw.example".into()];
                m.vehicle_tunnel_class = "nope".into();
            }),
            "unknown class `nope`",
        ),
        (
            Box::new(|w| w.mesh.as_mut().unwrap().vehicle_gateways = vec!["gw.example".into()]),
            "needs `vehicle_tunnel_class`",
        ),
        (
            Box::new(|w| {
                let m = w.mesh.as_mut().unwrap();
                m.vehicle_gateways = vec!["gw.example:443".into()];
                m.vehicle_tunnel_class = "critical".into();
            }),
            "mesh.vehicle_gateways[0]",
        ),
        (
            Box::new(|w| {
                let i = w
                    .services
                    .iter()
                    .position(|s| s.name == "diagnostics")
                    .unwrap();
                w.services[i].on_low_power = pb::service::LowPowerAction::Cloud as i32;
            }),
            "add `cloud_replica`",
        ),
        (
            Box::new(|w| {
                let i = w
                    .services
                    .iter()
                    .position(|s| s.name == "diagnostics")
                    .unwrap();
                w.services[i].on_low_power = 7;
            }),
            "`wire value 7`",
        ),
        (
            Box::new(move |w| {
                let i = svc(w);
                w.services[i].cloud_replica = vec![pb::Endpoint {
                    host: "10.0.0.1".into(),
                    port: 80,
                }];
            }),
            "`cloud_replica` is for vehicle services",
        ),
    ];
    for (edit, needle) in cases {
        let mut w = to_wire(&quickstart());
        edit(&mut w);
        let e = from_wire(&w).unwrap_err().to_string();
        assert!(e.contains(needle), "expected {needle:?} in: {e}");
        assert!(e.contains("policy update"), "names its source: {e}");
    }
}

#[test]
fn every_uplink_kind_maps_both_ways() {
    for (_, k) in UplinkKind::ALL {
        assert_eq!(kind_from_wire(kind_to_wire(k) as i32), Some(k));
    }
    assert_eq!(kind_from_wire(0), None);
}

fn arb_duration() -> impl Strategy<Value = Duration> {
    (1u64..100_000_000).prop_map(Duration::from_millis)
}

prop_compose! {
    fn arb_uplink(name: String)(kind in 0usize..6, metered: bool, cost in 0u32..1000) -> Uplink {
        Uplink { name: name.clone(), kind: UplinkKind::ALL[kind].1, metered, cost }
    }
}

/// The default trust domain (which travels as empty) or another valid one.
fn arb_trust_domain() -> impl Strategy<Value = TrustDomain> {
    prop_oneof![
        Just(TrustDomain::default()),
        "[a-z0-9._-]{1,40}".prop_map(|s| TrustDomain::new(&s).expect("valid by construction")),
    ]
}

/// Valid policies by construction: names from fixed pools, references into them,
/// routes and vehicle ports unique, mesh ports distinct from vehicle ports.
pub(crate) fn arb_policy() -> impl Strategy<Value = Policy> {
    let uplinks = prop::sample::subsequence(vec!["wifi", "lte", "5g-a", "dsrc"], 1..=4)
        .prop_flat_map(|names| {
            names
                .into_iter()
                .map(|n| arb_uplink(n.to_string()))
                .collect::<Vec<_>>()
        });
    uplinks
        .prop_flat_map(|uplinks| {
            let names: Vec<String> = uplinks.iter().map(|u| u.name.clone()).collect();
            let class = (
                any::<bool>(),
                arb_duration(),
                0u32..=10,
                prop::sample::subsequence(names.clone(), 1..=names.len()).prop_shuffle(),
                any::<bool>(),
                0u8..=63,
                prop::option::of(arb_duration()),
                prop::option::of(0u8..=100),
                prop::option::of(arb_duration()),
            );
            let classes = prop::collection::vec(class, 1..4);
            (Just(uplinks), classes)
        })
        .prop_flat_map(|(uplinks, classes)| {
            let n_classes = classes.len();
            let service = (
                0usize..3,
                any::<bool>(),
                prop::collection::vec(
                    (
                        prop::sample::select(vec!["198.18.0.1", "2001:db8::7", "maps.internal"]),
                        1u16..=65535,
                    ),
                    0..3,
                ),
                0usize..n_classes,
                1usize..3,
                prop::option::of(prop::collection::btree_set(0usize..5, 0..3)),
                (
                    prop::collection::btree_set(
                        (
                            prop::sample::select(vec![
                                "198.18.1.1",
                                "2001:db8::8",
                                "replica.cloud.example",
                            ]),
                            1u16..=65535,
                        ),
                        0..3,
                    ),
                    any::<bool>(),
                ),
            );
            (
                Just(uplinks),
                Just(classes),
                prop::collection::vec(service, 0..5),
                (20000u16..20010, 21000u16..21010, 22000u16..22010),
                (0usize..3, arb_trust_domain()),
                (
                    prop_oneof![Just(15444u16), 23000u16..23010],
                    prop_oneof![Just(15445u16), 24000u16..24010],
                    prop::sample::subsequence(
                        vec!["198.18.2.1", "2001:db8::9", "gw.cloud.example"],
                        0..=3,
                    )
                    .prop_shuffle(),
                    0usize..n_classes,
                ),
            )
        })
        .prop_map(
            |(
                uplinks,
                classes,
                services,
                ports,
                (mtls, trust_domain),
                (gateway_port, tunnel_port, gateways, tunnel_class),
            )| {
                let classes: BTreeMap<String, TrafficClass> = classes
                    .into_iter()
                    .enumerate()
                    .map(
                        |(i, (high, timeout, retries, ups, deferrable, dscp, rtt, loss, ttl))| {
                            let name = format!("class-{i}");
                            let c = TrafficClass {
                                name: name.clone(),
                                priority: if high {
                                    RoutePriority::High
                                } else {
                                    RoutePriority::Default
                                },
                                timeout,
                                retries,
                                uplinks: ups,
                                deferrable,
                                dscp,
                                max_rtt: rtt,
                                max_loss_percent: loss,
                                ttl,
                            };
                            (name, c)
                        },
                    )
                    .collect();
                let class_names: Vec<&String> = classes.keys().collect();
                let n_services = services.len();
                let services = services
                    .into_iter()
                    .enumerate()
                    .map(
                        |(i, (loc, grpc, eps, class, n_routes, consumes, (replica, cloud)))| {
                            let location = Location::ALL[loc].1;
                            let mut endpoints: Vec<Endpoint> = eps
                                .into_iter()
                                .map(|(h, port)| Endpoint {
                                    host: h.to_string(),
                                    port,
                                })
                                .collect();
                            if location != Location::Vehicle && endpoints.is_empty() {
                                endpoints.push(Endpoint {
                                    host: "198.18.0.9".into(),
                                    port: 80,
                                });
                            }
                            // Only vehicle services have a replica and a low-power action;
                            // `cloud` needs a replica.
                            let cloud_replica: Vec<Endpoint> = replica
                                .into_iter()
                                .filter(|_| location == Location::Vehicle)
                                .map(|(h, port)| Endpoint {
                                    host: h.to_string(),
                                    port,
                                })
                                .collect();
                            let on_low_power = if cloud && !cloud_replica.is_empty() {
                                LowPowerAction::Cloud
                            } else {
                                LowPowerAction::Stay
                            };
                            let name = format!("svc-{i}");
                            let s = Service {
                                name: name.clone(),
                                location,
                                protocol: if grpc { Protocol::Grpc } else { Protocol::Http },
                                port: 30000 + i as u16,
                                endpoints,
                                routes: (0..n_routes).map(|r| format!("/{name}/r{r}")).collect(),
                                class: class_names[class].clone(),
                                // Only vehicle services may declare what they call.
                                consumes: consumes.filter(|_| location == Location::Vehicle).map(
                                    |c| {
                                        c.into_iter()
                                            .filter(|&j| j < n_services)
                                            .map(|j| format!("svc-{j}"))
                                            .collect()
                                    },
                                ),
                                cloud_replica,
                                on_low_power,
                            };
                            (name, s)
                        },
                    )
                    .collect();
                Policy {
                    mesh: MeshSettings {
                        vehicle_outbound_port: ports.0,
                        vehicle_inbound_port: ports.1,
                        cloud_inbound_port: ports.2,
                        mtls: MtlsMode::ALL[mtls].1,
                        trust_domain,
                        vehicle_gateway_port: gateway_port,
                        vehicle_tunnel_port: tunnel_port,
                        // A tunnel class only with gateways.
                        vehicle_tunnel_class: (!gateways.is_empty())
                            .then(|| class_names[tunnel_class].clone()),
                        vehicle_gateways: gateways.into_iter().map(str::to_string).collect(),
                    },
                    uplinks: uplinks.into_iter().map(|u| (u.name.clone(), u)).collect(),
                    classes,
                    services,
                }
            },
        )
}

proptest! {
    #[test]
    fn every_valid_policy_round_trips(p in arb_policy()) {
        let w = to_wire(&p);
        let back = from_wire(&w);
        prop_assert!(back.is_ok(), "{}\n{}", render(&w), back.unwrap_err());
        prop_assert_eq!(back.unwrap(), p.clone());
        prop_assert_eq!(w.version, version(&p));
    }

    /// Whatever arrives over the wire, conversion never panics.
    #[test]
    fn arbitrary_updates_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(w) = pb::PolicyUpdate::decode(bytes.as_slice()) {
            let _ = from_wire(&w);
        }
    }
}
