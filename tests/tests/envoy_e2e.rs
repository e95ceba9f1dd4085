//! End to end with the real Envoy 1.40: misaki-cp serves a vehicle sidecar (SotW and
//! delta) and a cloud sidecar; requests go through them to local upstreams standing in
//! for services; policy edits take effect live; bad edits change nothing; a restarted
//! control plane resyncs cleanly.

use std::fs;
use std::path::Path;
use std::time::Duration;

use misaki_e2e::http;
use misaki_e2e::policy::{CloudService, MeshPorts, policy_doc};
use misaki_e2e::process::wait_for;
use misaki_e2e::{ControlPlane, Envoy, Upstream, free_port};

/// Two uplinks, the three classes of the quickstart.
const HEAD: &str = "uplinks:
  - { name: wifi, kind: wifi, cost: 1 }
  - { name: lte, kind: lte, metered: true, cost: 10 }
classes:
  - { name: critical, priority: high, timeout: 2s, retries: 2, uplinks: [lte, wifi], dscp: 46 }
  - { name: standard, timeout: 5s, retries: 1, uplinks: [wifi, lte] }
  - { name: bulk, timeout: 30s, uplinks: [wifi], deferrable: true, dscp: 8 }
";

fn policy(p: &MeshPorts, maps_upstream: u16, telemetry_upstream: u16, maps_prefix: &str) -> String {
    policy_doc(
        p,
        HEAD,
        &[
            CloudService {
                name: "maps",
                upstream: maps_upstream,
                route: maps_prefix,
                class: "standard",
            },
            CloudService {
                name: "telemetry",
                upstream: telemetry_upstream,
                route: "/telemetry",
                class: "bulk",
            },
        ],
    )
}

/// Write `text` the way editors do: to a temp file, then rename over the original.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp~");
    fs::write(&tmp, text).expect("write temp policy");
    fs::rename(&tmp, path).expect("rename policy into place");
}

fn get_body(port: u16, path: &str) -> Option<String> {
    http::get(port, path)
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}

/// The whole vehicle story for one ADS flavour.
fn vehicle_sidecar_routes_live(bootstrap: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("A");
    let b = Upstream::start("B");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    save(&policy_path, &policy(&p, a.port, a.port, "/maps"));
    let cp = ControlPlane::start(&policy_path, dir.path());
    let envoy = Envoy::start(bootstrap, "car-1", cp.xds_port, dir.path());

    // 1. A request through the vehicle sidecar reaches the upstream standing in for the
    //    cloud service, tagged with the service's traffic class.
    let body = wait_for(Duration::from_secs(10), || {
        get_body(p.outbound, "/maps/tile/1")
    })
    .expect("request through the vehicle sidecar");
    assert_eq!(body.trim(), "A /maps/tile/1 class=standard");
    let body = get_body(p.outbound, "/telemetry/upload").expect("telemetry route");
    assert_eq!(body.trim(), "A /telemetry/upload class=bulk");
    // Host-based routing reaches the same service by name.
    let r = http::request(p.outbound, "GET", "/x", &[("host", "maps")], b"").expect("by host");
    assert_eq!(r.body.trim(), "A /x class=standard");

    // 2. A valid edit changes routing live: maps moves to upstream B and a new prefix,
    //    and a new service appears (a new cluster: Envoy must warm it over EDS).
    let weather = format!(
        "  - {{ name: weather, location: edge, port: 8080, endpoints: [\"127.0.0.1:{}\"], routes: [\"/weather\"], class: critical }}\n",
        b.port
    );
    save(
        &policy_path,
        &(policy(&p, b.port, a.port, "/maps/v2") + &weather),
    );
    let moved = wait_for(Duration::from_secs(10), || {
        get_body(p.outbound, "/maps/v2/x").filter(|b| b.starts_with("B "))
    });
    assert_eq!(
        moved.as_deref().map(str::trim),
        Some("B /maps/v2/x class=standard")
    );
    let acked = cp.admin_json("/nodes");
    let stream = &acked["streams"][0];
    assert_eq!(stream["node_id"], "car-1");
    for t in ["cds", "eds", "lds", "rds"] {
        let ty = &stream["types"][t];
        assert_eq!(
            ty["last_acked_version"], ty["last_sent_version"],
            "{t} acked: {acked}"
        );
        assert!(ty["last_nack"].is_null(), "{t} has a NACK: {acked}");
    }
    let good_version = cp.admin_json("/policy")["version"].clone();

    // 3. An invalid edit is rejected: named on /policy and in a metric, the old config
    //    keeps serving.
    let bad = policy(&p, a.port, a.port, "/maps").replace("class: standard", "class: platinum");
    save(&policy_path, &bad);
    let rejected = wait_for(Duration::from_secs(10), || {
        let v = cp.admin_json("/policy");
        (!v["last_error"].is_null()).then_some(v)
    })
    .expect("the bad edit shows on /policy");
    assert_eq!(
        rejected["version"], good_version,
        "version in force unchanged"
    );
    let errors = rejected["last_error"]["errors"].to_string();
    assert!(
        errors.contains("mesh.yaml") && errors.contains("services[0].class"),
        "{errors}"
    );
    assert!(cp.admin("/metrics").body.contains("misaki_policy_valid 0"));
    assert_eq!(
        get_body(p.outbound, "/maps/v2/still")
            .as_deref()
            .map(str::trim),
        Some("B /maps/v2/still class=standard")
    );

    // 4. A restarted control plane (new instance, new version prefix) is followed by a
    //    clean resync: Envoy reconnects, takes the new config, ACKs it.
    let (xds_port, admin_port) = (cp.xds_port, cp.admin_port);
    drop(cp);
    save(&policy_path, &policy(&p, a.port, b.port, "/maps"));
    let cp = ControlPlane::start_on(&policy_path, dir.path(), xds_port, admin_port);
    let resynced = wait_for(Duration::from_secs(30), || {
        get_body(p.outbound, "/telemetry/x").filter(|b| b.starts_with("B "))
    });
    assert_eq!(
        resynced.as_deref().map(str::trim),
        Some("B /telemetry/x class=bulk")
    );
    assert_eq!(
        get_body(p.outbound, "/maps/y").as_deref().map(str::trim),
        Some("A /maps/y class=standard")
    );
    let nodes = wait_for(Duration::from_secs(10), || {
        let v = cp.admin_json("/nodes");
        let ty = &v["streams"][0]["types"]["rds"];
        (ty["last_acked_version"] == ty["last_sent_version"] && !ty["last_acked_version"].is_null())
            .then_some(v)
    });
    assert!(nodes.is_some(), "Envoy ACKed the new instance's config");
    assert_eq!(envoy.stat("control_plane.connected_state"), Some(1));
}

#[test]
fn sotw_vehicle_sidecar_routes_edits_live_rejects_bad_edits_and_resyncs_after_restart() {
    vehicle_sidecar_routes_live("vehicle-sidecar.yaml");
}

#[test]
fn delta_vehicle_sidecar_routes_edits_live_rejects_bad_edits_and_resyncs_after_restart() {
    vehicle_sidecar_routes_live("vehicle-sidecar-delta.yaml");
}

#[test]
fn cloud_sidecar_routes_inbound_requests_to_cloud_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("maps");
    let t = Upstream::start("telemetry");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    save(&policy_path, &policy(&p, a.port, t.port, "/maps"));
    let cp = ControlPlane::start(&policy_path, dir.path());
    let _envoy = Envoy::start("cloud-sidecar.yaml", "cloud-1", cp.xds_port, dir.path());
    let body = wait_for(Duration::from_secs(10), || {
        get_body(p.cloud, "/telemetry/batch")
    })
    .expect("request through the cloud sidecar");
    assert_eq!(body.trim(), "telemetry /telemetry/batch class=bulk");
    assert_eq!(
        get_body(p.cloud, "/maps/1").as_deref().map(str::trim),
        Some("maps /maps/1 class=standard")
    );
    let nodes = cp.admin_json("/nodes");
    assert_eq!(nodes["streams"][0]["role"], "cloud");

    // Deferred traffic (class bulk) arrives zstd-compressed from edge-netd; the cloud
    // sidecar's decompressor hands the service the plain body.
    let plain = br#"{"vehicle":"car-1","speed_kmh":87.5,"battery":0.71}"#.repeat(20);
    let packed = zstd::encode_all(&plain[..], 3).expect("zstd");
    assert!(packed.len() < plain.len());
    let r = http::request(
        p.cloud,
        "POST",
        "/telemetry/batch",
        &[
            ("content-encoding", "zstd"),
            ("content-type", "application/json"),
        ],
        &packed,
    )
    .expect("compressed POST");
    assert_eq!(r.status, 200);
    let expected = format!(
        "telemetry /telemetry/batch class=bulk body={}",
        String::from_utf8_lossy(&plain)
    );
    assert_eq!(
        r.body.trim(),
        expected,
        "the service sees the plain body, no encoding header"
    );
}

/// Envoy rejects a listener it cannot bind (the port is held by a process without
/// SO_REUSEPORT): the NACK is recorded with Envoy's error text, the rejected version is
/// not pushed again, and the next good edit is taken and ACKed.
#[test]
fn nack_from_real_envoy_is_recorded_not_resent_and_a_fixed_edit_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("A");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    let vehicle_service = "  - { name: diag, location: vehicle, port: 18999, routes: [\"/diag\"], class: standard }\n";
    save(
        &policy_path,
        &(policy(&p, a.port, a.port, "/maps") + vehicle_service),
    );
    let cp = ControlPlane::start(&policy_path, dir.path());
    let _envoy = Envoy::start("vehicle-sidecar.yaml", "car-nack", cp.xds_port, dir.path());

    // Hold a port without SO_REUSEPORT, then point the inbound listener at it.
    let blocker = std::net::TcpListener::bind("0.0.0.0:0").expect("bind blocker");
    let held = blocker.local_addr().expect("addr").port();
    let bad = MeshPorts { inbound: held, ..p };
    save(
        &policy_path,
        &(policy(&bad, a.port, a.port, "/maps") + vehicle_service),
    );
    let nacked = wait_for(Duration::from_secs(15), || {
        let v = cp.admin_json("/nodes");
        let nack = v["streams"][0]["types"]["lds"]["last_nack"].clone();
        (!nack.is_null()).then_some(nack)
    })
    .expect("Envoy NACKed the listener it cannot bind");
    let message = nack_text(&nacked);
    assert!(
        message.contains(&held.to_string()),
        "NACK names the port: {nacked}"
    );

    // Not resent: the LDS push counter stays put while nothing changes.
    let pushes = || lds_pushes(&cp.admin("/metrics").body);
    let before = pushes();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pushes(), before, "the NACKed version was pushed again");
    assert!(
        cp.admin("/metrics")
            .body
            .contains("misaki_xds_nacks_total{type=\"lds\"} 1")
    );

    // A fixed edit is pushed and ACKed.
    let fixed = MeshPorts {
        inbound: free_port(),
        ..p
    };
    save(
        &policy_path,
        &(policy(&fixed, a.port, a.port, "/maps") + vehicle_service),
    );
    let acked = wait_for(Duration::from_secs(15), || {
        let v = cp.admin_json("/nodes");
        let lds = &v["streams"][0]["types"]["lds"];
        (lds["last_acked_version"] == lds["last_sent_version"]
            && lds["last_acked_version"] != nacked["version"])
            .then_some(())
    });
    assert!(
        acked.is_some(),
        "fixed edit ACKed: {}",
        cp.admin_json("/nodes")
    );
    assert_eq!(
        get_body(fixed.outbound, "/maps/ok")
            .as_deref()
            .map(str::trim),
        Some("A /maps/ok class=standard")
    );
    drop(blocker);
}

fn nack_text(v: &serde_json::Value) -> String {
    v["message"].as_str().unwrap_or_default().to_string()
}

fn lds_pushes(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("misaki_xds_pushes_total{type=\"lds\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
