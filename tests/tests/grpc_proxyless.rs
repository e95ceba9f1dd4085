//! misaki-cp serving a second, independent xDS client: grpcio's proxyless xDS. It asks
//! for a Listener named after the target, insists on weighted localities and a router
//! filter, and resolves `xds:///maps` to the endpoints misaki compiled.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use std::path::Path;
use std::time::Duration;

use misaki_e2e::process::{Process, target_bin, wait_for};
use misaki_e2e::{ControlPlane, free_port, http, repo_root};

fn python() -> std::path::PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh (installs grpcio into .venv)",
        py.display()
    );
    py
}

/// The gRPC demo server, killed on drop.
struct Server {
    child: std::process::Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn script() -> std::path::PathBuf {
    repo_root().join("tests/grpc/proxyless.py")
}

fn start_server() -> Server {
    let mut child = Command::new(python())
        .arg(script())
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gRPC server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server port");
    let port: u16 = line.trim().parse().expect("port number");
    Server { child, port }
}

/// A policy with one gRPC cloud service `maps` at the demo server, class `standard` on
/// the uplink `lte`.
fn write_policy(dir: &Path, server_port: u16) -> std::path::PathBuf {
    let policy = dir.join("mesh.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\n\
             mesh: {{ vehicle_outbound_port: {}, vehicle_inbound_port: {}, cloud_inbound_port: {} }}\n\
             uplinks: [{{ name: lte, kind: lte }}]\n\
             classes: [{{ name: standard, timeout: 5s, retries: 1, uplinks: [lte] }}]\n\
             services:\n\
             \x20 - {{ name: maps, location: cloud, protocol: grpc, port: 8080, endpoints: [\"127.0.0.1:{server_port}\"], routes: [\"/misaki.demo.Echo\"], class: standard }}\n",
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .expect("write policy");
    policy
}

/// Run the proxyless client against the xDS server on `xds_port`; its stdout on success.
fn call_maps(dir: &Path, xds_port: u16, logs: &dyn Fn() -> String) -> String {
    let bootstrap = dir.join("xds-bootstrap.json");
    std::fs::write(
        &bootstrap,
        serde_json::json!({
            "xds_servers": [{
                "server_uri": format!("127.0.0.1:{xds_port}"),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "car-grpc-1", "cluster": "vehicle", "metadata": {"vehicle_id": "car-grpc-1"}},
        })
        .to_string(),
    )
    .expect("write bootstrap");
    let out = Command::new(python())
        .arg(script())
        .args(["client", "maps"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .output()
        .expect("run gRPC client");
    assert!(
        out.status.success(),
        "proxyless client failed:\n{}\n{}\nserver side:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How many ACKs of each type an xDS server's `/metrics` counted.
fn assert_acked_every_type(metrics: &str, prefix: &str) {
    for t in ["lds", "rds", "cds", "eds"] {
        let acks: u64 = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{prefix}{{type=\"{t}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            acks >= 1,
            "no {t} ACK from the proxyless client:\n{metrics}"
        );
    }
}

#[test]
fn grpc_proxyless_client_reaches_a_grpc_service_through_xds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server();
    let policy = write_policy(dir.path(), server.port);
    let cp = ControlPlane::start(&policy, dir.path());
    let reply = call_maps(dir.path(), cp.xds_port, &|| cp.proc.log_text());
    assert_eq!(reply, "echo:hello from a proxyless client");
    // The client ACKed every resource type it was sent (it may have disconnected by
    // now, so the counters rather than /nodes tell).
    assert_acked_every_type(&cp.admin("/metrics").body, "misaki_xds_acks_total");
}

/// The same client against edge-netd's vehicle-local xDS tier: edge-netd got the policy
/// from misaki-cp over the fleet stream and compiles the vehicle's configuration itself
/// (uplink `lte` is the loopback interface here).
#[test]
fn grpc_proxyless_client_reaches_a_grpc_service_through_edge_netd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start_server();
    let policy = write_policy(dir.path(), server.port);
    let probe = format!("127.0.0.1:{}", free_port());
    let cp = ControlPlane::start_with(
        &policy,
        dir.path(),
        free_port(),
        free_port(),
        &["--probe-addr", &probe],
    );
    let (api, xds) = (free_port(), free_port());
    let config = dir.path().join("edge-netd.yaml");
    std::fs::write(
        &config,
        format!(
            "vehicle_id: car-grpc-1\n\
             control_plane: http://127.0.0.1:{}\n\
             api: 127.0.0.1:{api}\n\
             xds: 127.0.0.1:{xds}\n\
             state_dir: {}\n\
             uplinks: [{{ name: lte, interface: lo, kind: lte }}]\n\
             probe: {{ targets: [\"{probe}\"], interval: 100ms }}\n",
            cp.xds_port,
            dir.path().join("state").display()
        ),
    )
    .expect("write edge-netd config");
    let netd = Process::spawn(
        "edge-netd",
        Command::new(target_bin("edge-netd"))
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info"),
        dir.path().join("edge-netd.log"),
    );
    // Ready = an uplink selected and the policy from misaki-cp in force.
    let ready = wait_for(Duration::from_secs(20), || {
        (http::get(api, "/readyz").ok()?.status == 200).then_some(())
    });
    assert!(
        ready.is_some(),
        "edge-netd never ready:\n{}",
        netd.log_text()
    );
    let reply = call_maps(dir.path(), xds, &|| netd.log_text());
    assert_eq!(reply, "echo:hello from a proxyless client");
    assert_acked_every_type(
        &http::get(api, "/metrics").unwrap().body,
        "misaki_xds_acks_total",
    );
}
