//! A cloud sidecar over mutual TLS to misaki-cp, with the shipped
//! `envoy-configs/cloud-sidecar-mtls.yaml`: with its cloud certificate it gets the cloud
//! configuration (its `cloud_inbound` listener) and is listed with its cloud identity;
//! the same bootstrap holding a vehicle's certificate gets nothing.

use std::fs;
use std::path::Path;
use std::time::Duration;

use misaki_e2e::process::{repo_root, wait_for};
use misaki_e2e::tls::{FleetCa, TLS_DIR_IN_CONFIGS, install_sds};
use misaki_e2e::{ControlPlane, Envoy, free_port, http};

/// `cloud-sidecar-mtls.yaml` for one Envoy: misaki-cp's port, a fresh admin port and the
/// certificates in `tls`. Returns the text and the admin port.
fn bootstrap(xds_port: u16, tls: &Path) -> (String, u16) {
    let text = fs::read_to_string(repo_root().join("envoy-configs/cloud-sidecar-mtls.yaml"))
        .expect("read cloud-sidecar-mtls.yaml");
    let admin = free_port();
    let cfg = text
        .replace("port_value: 18000", &format!("port_value: {xds_port}"))
        .replace("port_value: 19906", &format!("port_value: {admin}"))
        .replace(TLS_DIR_IN_CONFIGS, &tls.display().to_string());
    (cfg, admin)
}

fn listeners(admin: u16) -> String {
    http::get(admin, "/listeners")
        .map(|r| r.body)
        .unwrap_or_default()
}

#[test]
fn a_cloud_sidecar_gets_cloud_config_only_with_a_cloud_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let server = dir.path().join("server");
    ca.issue(&["--server", "localhost", "127.0.0.1"], &server);
    let cloud_port = free_port();
    let policy = dir.path().join("mesh.yaml");
    fs::write(
        &policy,
        format!(
            "version: 1\nmesh: {{ vehicle_outbound_port: {}, vehicle_inbound_port: {}, cloud_inbound_port: {cloud_port} }}\n\
             uplinks:\n  - {{ name: lte, kind: lte }}\n\
             classes:\n  - {{ name: standard, timeout: 5s, uplinks: [lte] }}\n\
             services:\n  - {{ name: maps, location: cloud, port: 8080, endpoints: [\"127.0.0.1:{}\"], routes: [\"/maps\"], class: standard }}\n",
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .expect("write policy");
    let args = ca.serve_args(&server);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &args);

    let cloud_tls = dir.path().join("cloud");
    ca.issue(&["--cloud", "maps"], &cloud_tls);
    install_sds(&cloud_tls);
    let (cfg, admin) = bootstrap(cp.xds_port, &cloud_tls);
    let _cloud =
        Envoy::try_start_config("cloud", &cfg, admin, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let got = wait_for(Duration::from_secs(15), || {
        listeners(admin).contains("cloud_inbound").then_some(())
    });
    assert!(got.is_some(), "no cloud_inbound: {}", listeners(admin));
    let streams = cp.admin_json("/nodes")["streams"].clone();
    assert_eq!(
        streams[0]["identity"], "spiffe://misaki.local/cloud/maps",
        "{streams}"
    );

    // The same bootstrap with a vehicle's certificate: refused, so no listener at all.
    let vehicle_tls = dir.path().join("vehicle");
    ca.issue(&["--vehicle", "car-1"], &vehicle_tls);
    install_sds(&vehicle_tls);
    let (cfg, admin) = bootstrap(cp.xds_port, &vehicle_tls);
    // It never goes LIVE (it waits for the configuration it is refused).
    let _posing = Envoy::spawn_config("posing", &cfg, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let denied = wait_for(Duration::from_secs(15), || {
        let m = cp.admin("/metrics").body;
        m.lines()
            .any(|l| l.starts_with("misaki_xds_identity_denied_total") && !l.ends_with(" 0"))
            .then_some(())
    });
    assert!(denied.is_some(), "the vehicle certificate was not refused");
    assert!(!listeners(admin).contains("cloud_inbound"));
}
