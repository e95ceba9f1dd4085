//! Cloud → vehicle through reverse tunnels, and the fleet state driving it, on loopback:
//! the real `misaki-cp`, the real `edge-netd` (uplink `lo`, a power file), the vehicle's
//! Envoy fed by edge-netd, and a cloud sidecar Envoy fed by misaki-cp.
//!
//! A cloud caller reaches the vehicle's `diag` service by sending to the cloud sidecar's
//! `vehicle_gateway` with `x-misaki-target-vehicle: car-1`; the sidecar has no route to
//! the vehicle except the tunnels the vehicle's Envoy dialled. Low power moves callers
//! on both sides to `diag`'s cloud replica and back; an offline vehicle's calls go to
//! the replica, or answer `503 vehicle-offline` at once for `cam`, which has none; the
//! gateway says why for a missing header, an unknown vehicle, an unknown path.
//! (tests/tests/vehicle_gateway_nat.rs puts the vehicle behind NAT in namespaces.)

use misaki_e2e::gateway::{GatewayLab, TARGET_HEADER as TARGET};
use misaki_e2e::http;
use misaki_e2e::process::wait_for;

const LONG: std::time::Duration = std::time::Duration::from_secs(60);

#[test]
fn cloud_calls_a_vehicle_service_through_its_tunnel_and_fleet_state_moves_them() {
    let mut lab = GatewayLab::start();

    // Through the tunnel: the vehicle's own instance answers, with its class.
    let r = lab.gateway_reaches("/diag/status", "vehicle-diag");
    assert!(r.body.contains("class=standard"), "{}", r.body);
    lab.gateway_reaches("/cam/frame", "vehicle-cam");
    // By `Host`, as on the vehicle.
    let r = http::request(
        lab.ports.gateway,
        "GET",
        "/frame",
        &[("host", "cam"), (TARGET, "car-1")],
        b"",
    )
    .expect("gateway request by host");
    assert!(r.body.starts_with("vehicle-cam /frame"), "{r:?}");

    // The gateway says why it answers itself.
    let r = lab.via_gateway("/diag/status", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("no-target-vehicle"));
    let r = lab.via_gateway("/diag/status", Some("car-9"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("vehicle-unknown"));
    let r = lab.via_gateway("/nowhere", Some("car-1"));
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("no-such-service"));

    // Low power: diag (on_low_power: cloud) moves to its replica for callers on both
    // sides; cam stays on the vehicle.
    lab.vehicle_reaches("/diag/x", "vehicle-diag");
    lab.set_power("low");
    lab.gateway_reaches("/diag/status", "replica-diag");
    lab.vehicle_reaches("/diag/x", "replica-diag");
    lab.gateway_reaches("/cam/frame", "vehicle-cam");
    lab.set_power("on");
    lab.gateway_reaches("/diag/status", "vehicle-diag");
    lab.vehicle_reaches("/diag/x", "vehicle-diag");

    // Offline (edge-netd gone, so the registry marks car-1 offline): diag to its
    // replica, cam answered at once.
    drop(lab.netd.take());
    lab.gateway_reaches("/diag/status", "replica-diag");
    let r = lab.via_gateway("/cam/frame", Some("car-1"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("vehicle-offline"));

    // Back online: through the tunnel again.
    lab.start_netd();
    lab.gateway_reaches("/diag/status", "vehicle-diag");
    lab.gateway_reaches("/cam/frame", "vehicle-cam");

    // Online but without a tunnel (its Envoy gone, edge-netd still reporting): Envoy's
    // own failure, named.
    lab.vehicle.proc.kill();
    let r = wait_for(LONG, || {
        let r = lab.via_gateway("/cam/frame", Some("car-1"));
        (r.status == 503).then_some(r)
    })
    .expect("calls fail once the vehicle's Envoy is gone");
    assert_eq!(r.header("x-misaki-reason"), Some("no-tunnel"), "{r:?}");
    assert_eq!(
        lab.cp.admin_json("/fleet/car-1")["online"],
        serde_json::Value::Bool(true)
    );
}
