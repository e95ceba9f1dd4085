use std::fmt::Write as _;
use std::time::Duration;

use misaki_policy::Endpoint;
use proptest::prelude::*;

use super::*;
use crate::tests::arb_policy;

/// The policy `bench/lib/config_scale_policy.py --services n` prints (n cloud services
/// `svc-<i>`, class round robin, every 4th with a second endpoint; 4 vehicle services).
fn scale_policy(n: usize) -> Policy {
    let mut yaml = String::from(
        "version: 1\nuplinks:\n\
         \x20 - { name: wifi, kind: wifi, cost: 1 }\n\
         \x20 - { name: lte, kind: lte, metered: true, cost: 5 }\n\
         classes:\n\
         \x20 - { name: critical, timeout: 5s, retries: 1, uplinks: [wifi, lte], max_loss_percent: 50 }\n\
         \x20 - { name: standard, timeout: 5s, retries: 1, uplinks: [wifi, lte], max_loss_percent: 50 }\n\
         \x20 - { name: bulk, timeout: 5s, retries: 1, uplinks: [wifi], deferrable: true, max_loss_percent: 50 }\n\
         services:\n",
    );
    for i in 0..n {
        let mut eps = format!("\"198.18.0.{}:{}\"", 2 + i % 200, 8000 + i % 100);
        if i % 4 == 0 {
            let _ = write!(eps, ", \"127.0.0.1:{}\"", 20000 + i);
        }
        let class = ["critical", "standard", "bulk"][i % 3];
        let _ = writeln!(
            yaml,
            "  - {{ name: svc-{i}, location: cloud, port: 8080, endpoints: [{eps}], routes: [/svc-{i}], class: {class} }}"
        );
    }
    for k in 0..4 {
        let _ = writeln!(
            yaml,
            "  - {{ name: vsvc-{k}, location: vehicle, port: {}, routes: [/vsvc-{k}], class: standard }}",
            18090 + k
        );
    }
    misaki_policy::parse("scale", &yaml).expect("the scale policy is valid")
}

/// `diff(a, b)` applied to `a`: checks the round trip and returns the delta.
fn delta_of(a: &Policy, b: &Policy) -> pb::PolicyUpdate {
    let (wa, wb) = (to_wire(a), to_wire(b));
    let d = diff(&wa, &wb).expect("whole, versioned updates diff");
    assert_eq!(d.base_version, wa.version);
    assert_eq!(d.version, wb.version);
    assert_eq!(apply(&wa, &d).as_ref(), Ok(&wb));
    d
}

#[test]
fn a_one_route_edit_of_a_3000_service_policy_is_a_small_delta() {
    let a = scale_policy(3000);
    let mut b = a.clone();
    b.services.get_mut("svc-1").unwrap().routes = vec!["/svc-1-v2".into()];
    let d = delta_of(&a, &b);
    let (full, delta) = (to_wire(&b).encoded_len(), d.encoded_len());
    assert!(full > 100_000, "the whole policy is {full} bytes");
    assert!(delta < 4096, "the delta is {delta} bytes (whole: {full})");
    assert_eq!(d.services.len(), 1);
    assert_eq!(d.services[0].name, "svc-1");
    assert!(d.uplinks.is_empty() && d.classes.is_empty() && d.mesh.is_none());
    assert_eq!(from_wire(&apply(&to_wire(&a), &d).unwrap()).unwrap(), b);
}

#[test]
fn a_removed_service_is_named_and_nothing_else_travels() {
    let a = scale_policy(30);
    let mut b = a.clone();
    b.services.remove("svc-7");
    let d = delta_of(&a, &b);
    assert_eq!(d.removed_services, vec!["svc-7"]);
    assert!(d.services.is_empty() && d.removed_classes.is_empty() && d.removed_uplinks.is_empty());
}

#[test]
fn a_class_change_carries_that_class_only() {
    let a = scale_policy(30);
    let mut b = a.clone();
    b.classes.get_mut("standard").unwrap().timeout = Duration::from_secs(7);
    let d = delta_of(&a, &b);
    let names: Vec<&str> = d.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["standard"]);
    assert_eq!(d.classes[0].timeout_ms, Some(7000));
    assert!(d.services.is_empty() && d.uplinks.is_empty() && d.mesh.is_none());
}

#[test]
fn the_mesh_travels_only_when_its_ports_change() {
    let a = scale_policy(3);
    let mut b = a.clone();
    b.mesh.cloud_inbound_port = 16443;
    let d = delta_of(&a, &b);
    assert_eq!(d.mesh.map(|m| m.cloud_inbound_port), Some(16443));
    assert!(d.services.is_empty() && d.classes.is_empty() && d.uplinks.is_empty());
    // Turning mTLS on, or moving the trust domain, is a mesh change too.
    let mut c = a.clone();
    c.mesh.mtls = misaki_policy::MtlsMode::Permissive;
    c.mesh.trust_domain = misaki_policy::TrustDomain::new("fleet.example").unwrap();
    let d = delta_of(&a, &c);
    let m = d.mesh.clone().expect("the mesh travels");
    assert_eq!(m.mtls, pb::mesh_settings::MtlsMode::Permissive as i32);
    assert_eq!(m.trust_domain, "fleet.example");
    assert_eq!(from_wire(&apply(&to_wire(&a), &d).unwrap()).unwrap(), c);
    // An unchanged policy: a delta with nothing in it but the versions.
    let same = delta_of(&a, &a);
    assert_eq!(
        same,
        pb::PolicyUpdate {
            version: version(&a),
            base_version: version(&a),
            ..Default::default()
        }
    );
}

#[test]
fn a_delta_against_another_base_is_rejected() {
    let a = scale_policy(3);
    let mut b = a.clone();
    b.uplinks.get_mut("lte").unwrap().cost = 9;
    let mut held = a.clone();
    held.mesh.vehicle_outbound_port = 16001;
    let d = diff(&to_wire(&a), &to_wire(&b)).unwrap();
    assert_eq!(
        apply(&to_wire(&held), &d),
        Err(DeltaError::BaseMismatch {
            base: version(&a),
            held: version(&held),
        })
    );
    // Nothing held: no base either.
    assert!(matches!(
        apply(&pb::PolicyUpdate::default(), &d),
        Err(DeltaError::BaseMismatch { held, .. }) if held.is_empty()
    ));
}

#[test]
fn a_delta_whose_result_is_not_its_version_is_rejected() {
    let a = scale_policy(3);
    let mut b = a.clone();
    b.services.get_mut("svc-2").unwrap().endpoints = vec![Endpoint {
        host: "198.18.0.250".into(),
        port: 9999,
    }];
    let mut d = diff(&to_wire(&a), &to_wire(&b)).unwrap();
    d.services[0].port = 8081;
    let e = apply(&to_wire(&a), &d).unwrap_err();
    assert!(
        matches!(&e, DeltaError::VersionMismatch { version, .. } if *version == d.version),
        "{e}"
    );
}

#[test]
fn whole_and_unversioned_updates_are_not_deltas() {
    let (a, b) = (to_wire(&scale_policy(1)), to_wire(&scale_policy(2)));
    assert!(!is_delta(&a));
    assert_eq!(apply(&a, &b), Err(DeltaError::NotADelta));
    let d = diff(&a, &b).unwrap();
    assert!(is_delta(&d));
    assert_eq!(diff(&d, &b), None, "a delta is no base");
    assert_eq!(
        diff(&pb::PolicyUpdate::default(), &b),
        None,
        "no version, no base"
    );
    let mut no_mesh = b.clone();
    no_mesh.mesh = None;
    assert_eq!(diff(&a, &no_mesh), None, "a delta cannot drop the mesh");
}

/// Small valid edits of a policy, as (kind, which, value) triples.
fn edited(mut p: Policy, edits: &[(u8, usize, u16)]) -> Policy {
    for &(kind, i, v) in edits {
        match kind {
            0 => {
                let n = p.services.len().max(1);
                if let Some(s) = p.services.values_mut().nth(i % n) {
                    s.endpoints = vec![Endpoint {
                        host: "198.18.0.77".into(),
                        port: v.max(1),
                    }];
                    // A vehicle service may move to a cloud replica on low power.
                    if s.location == misaki_policy::Location::Vehicle && v % 2 == 1 {
                        s.cloud_replica = vec![Endpoint {
                            host: "198.18.0.78".into(),
                            port: v,
                        }];
                        s.on_low_power = misaki_policy::LowPowerAction::Cloud;
                    }
                }
            }
            1 => {
                let n = p.classes.len();
                p.classes.values_mut().nth(i % n).unwrap().retries = u32::from(v % 11);
            }
            2 => {
                let n = p.uplinks.len();
                p.uplinks.values_mut().nth(i % n).unwrap().cost = u32::from(v % 1000);
            }
            3 => match v % 5 {
                0 => p.mesh.cloud_inbound_port = 22000 + v % 10,
                1 => p.mesh.mtls = misaki_policy::MtlsMode::ALL[usize::from(v / 5 % 3)].1,
                3 => p.mesh.vehicle_gateway_port = 23000 + v % 10,
                4 => {
                    // Gateways on (carried by some class) or off.
                    if p.mesh.vehicle_gateways.is_empty() {
                        p.mesh.vehicle_gateways = vec!["198.18.0.66".into()];
                        p.mesh.vehicle_tunnel_class = p.classes.keys().next().cloned();
                    } else {
                        p.mesh.vehicle_gateways.clear();
                        p.mesh.vehicle_tunnel_class = None;
                    }
                }
                _ => {
                    p.mesh.trust_domain = misaki_policy::TrustDomain::new(&format!("td{}", v % 4))
                        .expect("a valid trust domain")
                }
            },
            _ => {
                // Remove a service and every mention of it.
                if let Some((gone, _)) = p.services.pop_last() {
                    for s in p.services.values_mut() {
                        if let Some(c) = &mut s.consumes {
                            c.retain(|n| *n != gone);
                        }
                    }
                }
            }
        }
    }
    p
}

fn arb_edits() -> impl Strategy<Value = Vec<(u8, usize, u16)>> {
    prop::collection::vec((0u8..5, any::<usize>(), any::<u16>()), 1..4)
}

proptest! {
    /// Unrelated policies (names from the same small pools: items added, changed,
    /// removed in every section).
    #[test]
    fn a_delta_applied_gives_the_target(a in arb_policy(), b in arb_policy()) {
        let (wa, wb) = (to_wire(&a), to_wire(&b));
        let d = diff(&wa, &wb).unwrap();
        let whole = apply(&wa, &d);
        prop_assert_eq!(whole.as_ref(), Ok(&wb));
        prop_assert_eq!(&whole.unwrap().version, &version(&b));
    }

    /// Nearby policies (a few edits): unchanged items stay out of the delta.
    #[test]
    fn a_delta_of_a_few_edits_applies_and_validates(a in arb_policy(), edits in arb_edits()) {
        let b = edited(a.clone(), &edits);
        let (wa, wb) = (to_wire(&a), to_wire(&b));
        let d = diff(&wa, &wb).unwrap();
        prop_assert!(d.services.iter().all(|s| !wa.services.contains(s)));
        prop_assert!(d.classes.iter().all(|c| !wa.classes.contains(c)));
        prop_assert!(d.uplinks.iter().all(|u| !wa.uplinks.contains(u)));
        let whole = apply(&wa, &d).unwrap();
        prop_assert_eq!(&whole, &wb);
        prop_assert_eq!(whole.version, version(&b));
        prop_assert_eq!(from_wire(&wb).unwrap(), b);
    }
}
