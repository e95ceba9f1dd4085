//! End to end with the real Envoy 1.40 over mutual TLS: misaki-cp serves its gRPC port
//! with TLS (certificates from its own `misaki-cp ca` command line); a vehicle Envoy with
//! `envoy-configs/vehicle-sidecar-mtls.yaml` (client certificate and CA by file-based
//! SDS) gets its configuration and routes a request; it and misaki-cp take renewed
//! certificates from disk without a restart and without dropping the stream; an Envoy
//! holding another vehicle's certificate, and a plaintext one, get nothing and are told
//! why.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use misaki_e2e::process::wait_for;
use misaki_e2e::tls::{FleetCa, install_sds, mtls_bootstrap};
use misaki_e2e::{ControlPlane, Envoy, Upstream, free_port, http};

/// Listener ports of the policy: vehicle outbound, vehicle inbound, cloud inbound.
type Ports = [u16; 3];

/// A policy with one cloud service behind `upstream`, routed by `prefix`, on listener
/// ports nobody else holds.
fn policy([outbound, inbound, cloud]: Ports, upstream: u16, prefix: &str) -> String {
    format!(
        r#"version: 1
mesh: {{ vehicle_outbound_port: {outbound}, vehicle_inbound_port: {inbound}, cloud_inbound_port: {cloud} }}
uplinks:
  - {{ name: lte, kind: lte, cost: 10 }}
classes:
  - {{ name: standard, timeout: 5s, retries: 1, uplinks: [lte] }}
services:
  - {{ name: maps, location: cloud, port: 8080, endpoints: ["127.0.0.1:{upstream}"], routes: ["{prefix}"], class: standard }}
"#
    )
}

/// A fleet CA, misaki-cp's server certificate, and misaki-cp serving over mTLS.
struct Fleet {
    dir: tempfile::TempDir,
    ca: FleetCa,
    cp: ControlPlane,
    ports: Ports,
    policy: PathBuf,
    upstream: Upstream,
}

fn fleet() -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let server = dir.path().join("server");
    ca.issue(&["--server", "localhost", "127.0.0.1"], &server);
    let upstream = Upstream::start("maps");
    let ports = [free_port(), free_port(), free_port()];
    let policy_path = dir.path().join("mesh.yaml");
    fs::write(&policy_path, policy(ports, upstream.port, "/maps")).expect("write policy");
    let args = ca.serve_args(&server);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = ControlPlane::start_with(&policy_path, dir.path(), free_port(), free_port(), &args);
    Fleet {
        dir,
        ca,
        cp,
        ports,
        policy: policy_path,
        upstream,
    }
}

impl Fleet {
    /// A vehicle's certificate directory (cert.pem, key.pem, ca.pem and the SDS files).
    fn vehicle_certs(&self, name: &str, vehicle: &str) -> PathBuf {
        let tls = self.dir.path().join(name);
        self.ca.issue(&["--vehicle", vehicle], &tls);
        install_sds(&tls);
        tls
    }

    fn streams(&self) -> Vec<serde_json::Value> {
        self.cp.admin_json("/nodes")["streams"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// The serial numbers in Envoy's `/certs` (the certificates it holds now).
fn envoy_serials(admin_port: u16) -> String {
    http::get(admin_port, "/certs")
        .map(|r| r.body)
        .unwrap_or_default()
}

#[test]
fn an_mtls_vehicle_envoy_gets_its_config_and_renews_its_certificate_without_a_restart() {
    let f = fleet();
    let tls = f.vehicle_certs("car-1", "car-1");
    let (cfg, admin) = mtls_bootstrap("car-1-sidecar", "car-1", f.cp.xds_port, &tls);
    let envoy = Envoy::try_start_config("car-1", &cfg, admin, f.dir.path())
        .unwrap_or_else(|e| panic!("{e}"));

    let get = |path: &str| {
        wait_for(Duration::from_secs(15), || {
            http::get(f.ports[0], path).ok().filter(|r| r.status == 200)
        })
        .map(|r| r.body.trim().to_string())
    };
    let body = get("/maps/tile/1").expect("a request through the mTLS-configured sidecar");
    assert_eq!(body, "maps /maps/tile/1 class=standard");
    let streams = f.streams();
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert_eq!(
        streams[0]["identity"],
        "spiffe://misaki.local/vehicle/car-1"
    );
    let since = streams[0]["connected_since_unix_ms"].clone();

    // Renew: a new certificate and key on disk. Envoy's SDS picks them up (its /certs
    // shows the new serial), without a restart and without a new xDS stream.
    let before = envoy_serials(admin);
    f.ca.issue(&["--vehicle", "car-1"], &tls);
    let renewed = wait_for(Duration::from_secs(15), || {
        let now = envoy_serials(admin);
        (now != before && !now.is_empty()).then_some(now)
    });
    assert!(
        renewed.is_some(),
        "Envoy did not load the renewed certificate"
    );
    // And misaki-cp's own certificate: re-read from disk, no restart.
    f.ca.issue(
        &["--server", "localhost", "127.0.0.1"],
        &f.dir.path().join("server"),
    );
    let reloaded = wait_for(Duration::from_secs(15), || {
        let m = f.cp.admin("/metrics").body;
        m.contains("misaki_tls_reloads_total{result=\"ok\"}")
            .then_some(())
    });
    assert!(
        reloaded.is_some(),
        "misaki-cp did not reload its certificate"
    );
    // The stream is the same one, and still serves: a route edit arrives over it.
    let edited = policy(f.ports, f.upstream.port, "/atlas");
    fs::write(&f.policy, edited).expect("edit policy");
    let body = get("/atlas/tile/2").expect("the edit reached Envoy");
    assert_eq!(body, "maps /atlas/tile/2 class=standard");
    let streams = f.streams();
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert_eq!(
        streams[0]["connected_since_unix_ms"], since,
        "the stream was not replaced"
    );
    assert_eq!(envoy.stat("control_plane.connected_state"), Some(1));
}

/// Wait until misaki-cp's log says `what`; the log.
fn cp_log_with(cp: &ControlPlane, what: &[&str]) -> Option<String> {
    wait_for(Duration::from_secs(15), || {
        let log = cp.proc.log_text();
        what.iter().all(|w| log.contains(w)).then_some(log)
    })
}

#[test]
fn an_envoy_with_another_vehicles_certificate_or_none_gets_nothing_and_is_told_why() {
    let f = fleet();
    let tls = f.vehicle_certs("car-2", "car-2");
    // car-2's certificate, a node that says car-1.
    let (cfg, _) = mtls_bootstrap("car-1-sidecar", "car-1", f.cp.xds_port, &tls);
    let mut spoof = Envoy::spawn_config("spoof", &cfg, f.dir.path()).expect("spawn Envoy");
    let log = cp_log_with(&f.cp, &["refused xDS stream: identity"]).expect("misaki-cp refused it");
    assert!(
        log.contains("spiffe://misaki.local/vehicle/car-2") && log.contains("car-1"),
        "the refusal names both identities:\n{log}"
    );
    // Envoy heard why: gRPC status 7 (PERMISSION_DENIED) with the message, which
    // Envoy logs percent-encoded as it came in grpc-message.
    let envoy_log = wait_for(Duration::from_secs(15), || {
        let l = spoof.log_text();
        (l.contains("misaki_xds closed: 7,") && l.contains("vehicle/car-2%20does%20not%20match"))
            .then_some(l)
    });
    assert!(envoy_log.is_some(), "Envoy's log:\n{}", spoof.log_text());
    assert!(
        spoof.try_wait().is_none(),
        "Envoy keeps running (and retrying)"
    );

    // A plaintext Envoy on the TLS port: refused in the handshake.
    let plain =
        fs::read_to_string(misaki_e2e::repo_root().join("envoy-configs/vehicle-sidecar.yaml"))
            .expect("vehicle-sidecar.yaml")
            .replace(
                "port_value: 18000",
                &format!("port_value: {}", f.cp.xds_port),
            )
            .replace("port_value: 19901", &format!("port_value: {}", free_port()));
    let _plain = Envoy::spawn_config("plain", &plain, f.dir.path()).expect("spawn Envoy");
    let refused = wait_for(Duration::from_secs(15), || {
        let m = f.cp.admin("/metrics").body;
        m.lines()
            .any(|l| l.starts_with("misaki_tls_handshakes_total{result=\"protocol\"}"))
            .then_some(())
    });
    assert!(refused.is_some(), "{}", f.cp.admin("/metrics").body);
    assert!(
        f.streams().is_empty(),
        "nothing was served: {:?}",
        f.streams()
    );
    assert_eq!(f.cp.admin_json("/fleet")["total"], 0);
}

/// Every bootstrap in envoy-configs/ passes Envoy's own validator; the mTLS one once its
/// certificates and SDS files are where its header says to put them (file-based SDS
/// paths must exist, so it cannot validate before that).
#[test]
fn every_shipped_bootstrap_passes_envoys_validator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let tls = dir.path().join("tls");
    ca.issue(&["--vehicle", "demo-1"], &tls);
    install_sds(&tls);
    let configs = misaki_e2e::process::repo_root().join("envoy-configs");
    let mut checked = Vec::new();
    for entry in fs::read_dir(&configs).expect("envoy-configs") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("read bootstrap").replace(
            misaki_e2e::tls::TLS_DIR_IN_CONFIGS,
            &tls.display().to_string(),
        );
        let copy = dir.path().join(path.file_name().expect("a file"));
        fs::write(&copy, text).expect("write bootstrap");
        let out = std::process::Command::new(misaki_e2e::process::envoy_bin())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&copy)
            .output()
            .expect("run envoy --mode validate");
        assert!(
            out.status.success(),
            "{} fails Envoy's validator:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    assert!(
        checked.iter().any(|f| f == "vehicle-sidecar-mtls.yaml") && checked.len() >= 5,
        "{checked:?}"
    );
}
