//! misaki-cp serving a second, independent xDS client: grpcio's proxyless xDS. It asks
//! for a Listener named after the target, insists on weighted localities and a router
//! filter, and resolves `xds:///maps` to the endpoints misaki compiled.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use misaki_e2e::{ControlPlane, free_port, repo_root};

fn python() -> std::path::PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} missing: run scripts/setup.sh (installs grpcio into .venv)",
        py.display()
    );
    py
}

#[test]
fn grpc_proxyless_client_reaches_a_grpc_service_through_xds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = repo_root().join("tests/grpc/proxyless.py");

    // The gRPC service the policy points at.
    let mut server = Command::new(python())
        .arg(&script)
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start gRPC server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server port");
    let port: u16 = line.trim().parse().expect("port number");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);

    let policy = dir.path().join("mesh.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\n\
             mesh: {{ vehicle_outbound_port: {}, vehicle_inbound_port: {}, cloud_inbound_port: {} }}\n\
             uplinks: [{{ name: lte, kind: lte }}]\n\
             classes: [{{ name: standard, timeout: 5s, retries: 1, uplinks: [lte] }}]\n\
             services:\n\
             \x20 - {{ name: maps, location: cloud, protocol: grpc, port: 8080, endpoints: [\"127.0.0.1:{port}\"], routes: [\"/misaki.demo.Echo\"], class: standard }}\n",
            free_port(),
            free_port(),
            free_port()
        ),
    )
    .expect("write policy");
    let cp = ControlPlane::start(&policy, dir.path());

    let bootstrap = dir.path().join("xds-bootstrap.json");
    std::fs::write(
        &bootstrap,
        serde_json::json!({
            "xds_servers": [{
                "server_uri": format!("127.0.0.1:{}", cp.xds_port),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "car-grpc-1", "cluster": "vehicle", "metadata": {"vehicle_id": "car-grpc-1"}},
        })
        .to_string(),
    )
    .expect("write bootstrap");
    let out = Command::new(python())
        .arg(&script)
        .args(["client", "maps"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .output()
        .expect("run gRPC client");
    assert!(
        out.status.success(),
        "proxyless client failed:\n{}\n{}\nmisaki-cp:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cp.proc.log_text()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "echo:hello from a proxyless client"
    );
    // The client ACKed every resource type it was sent (it may have disconnected by
    // now, so the counters rather than /nodes tell).
    let metrics = cp.admin("/metrics").body;
    for t in ["lds", "rds", "cds", "eds"] {
        let acks: u64 = metrics
            .lines()
            .find(|l| l.starts_with(&format!("misaki_xds_acks_total{{type=\"{t}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            acks >= 1,
            "no {t} ACK from the proxyless client:\n{metrics}"
        );
    }
}
