//! End to end with the real Envoy 1.40: data-plane mutual TLS (`mesh.mtls`). misaki-cp
//! (plaintext xDS) serves a vehicle sidecar and a cloud sidecar, each taking its
//! certificate and the fleet CA by file-based SDS from its `metadata.tls_dir`
//! (certificates from `misaki-cp ca issue`). A request from the vehicle's app reaches a
//! header-echoing service behind the cloud sidecar over mTLS, and the service learns
//! which vehicle called (`x-misaki-vehicle`, XFCC) whatever the app or a client claimed.
//! Clients without a certificate, with one from another CA, or with a claim credential
//! are refused at `cloud_inbound`; `permissive` also lets plaintext through, never with
//! a vehicle id. A proxyless gRPC client gets through with the certificate its own
//! bootstrap names.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use misaki_e2e::mtls_lab::{
    HeaderEcho, cloud_sidecar, echoed, issue_with_sds, single_service_policy,
};
use misaki_e2e::policy::MeshPorts;
use misaki_e2e::process::wait_for;
use misaki_e2e::tls::{FleetCa, MtlsClient, mtls_client_bootstrap, sidecar_bootstrap};
use misaki_e2e::{ControlPlane, Envoy, free_port, http};

const FORGED_XFCC: &str =
    "By=spiffe://misaki.local/cloud/maps;URI=spiffe://misaki.local/vehicle/car-9";

/// What an app sends to claim it is car-9.
const FORGED: [(&str, &str); 2] = [
    ("x-misaki-vehicle", "car-9"),
    ("x-forwarded-client-cert", FORGED_XFCC),
];

/// A fleet CA, misaki-cp serving a policy with `mtls` on, the header echo behind a
/// cloud sidecar, and a vehicle sidecar (`vehicle_bootstrap`) with car-1's certificate.
struct Lab {
    dir: tempfile::TempDir,
    ca: FleetCa,
    ports: MeshPorts,
    /// The cloud sidecar's certificate directory (its `tls_dir`); holds the fleet CA.
    cloud_tls: PathBuf,
    cloud: Envoy,
    vehicle: Envoy,
    _cp: ControlPlane,
    _echo: HeaderEcho,
}

fn lab(mtls: &str, vehicle_bootstrap: &str) -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let echo = HeaderEcho::start();
    let ports = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    let text = single_service_policy(&ports, mtls, "http", echo.port, "/maps");
    fs::write(&policy_path, text).expect("write policy");
    let cp = ControlPlane::start(&policy_path, dir.path());

    let (cloud_tls, cloud) = cloud_sidecar(dir.path(), &ca, &cp);
    let car_tls = issue_with_sds(dir.path(), &ca, "car-1-tls", &["--vehicle", "car-1"]);
    let (cfg, admin) = sidecar_bootstrap(vehicle_bootstrap, "car-1", cp.xds_port, &car_tls);
    let vehicle =
        Envoy::try_start_config("car-1", &cfg, admin, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    Lab {
        dir,
        ca,
        ports,
        cloud_tls,
        cloud,
        vehicle,
        _cp: cp,
        _echo: echo,
    }
}

impl Lab {
    /// A GET of `/maps/...` on `port` with `headers`, retried until it answers 200.
    fn get_ok(&self, port: u16, headers: &[(&str, &str)]) -> Option<String> {
        wait_for(Duration::from_secs(20), || {
            http::request(port, "GET", "/maps/tile/1", headers, b"")
                .ok()
                .filter(|r| r.status == 200)
                .map(|r| r.body)
        })
    }

    /// A forged request from the vehicle's app through its sidecar: the service's answer.
    fn through_vehicle(&self) -> String {
        self.get_ok(self.ports.outbound, &FORGED)
            .unwrap_or_else(|| {
                panic!(
                    "no answer through the vehicle sidecar: {}",
                    self.vehicle.proc.log_text()
                )
            })
    }

    /// A static Envoy with one mTLS client per `(name, certificate dir)`, calling the
    /// cloud sidecar; their listen ports by name.
    fn clients(&self, certs: &[(&str, PathBuf)]) -> (Envoy, Vec<u16>) {
        let clients: Vec<MtlsClient> = certs
            .iter()
            .map(|(name, dir)| MtlsClient {
                name: name.to_string(),
                listen: free_port(),
                cert_dir: dir.clone(),
            })
            .collect();
        let ca = self.cloud_tls.join("ca.pem");
        let (cfg, admin) = mtls_client_bootstrap(&clients, self.ports.cloud, &ca);
        let envoy = Envoy::try_start_config("clients", &cfg, admin, self.dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        (envoy, clients.iter().map(|c| c.listen).collect())
    }

    /// A stat of the cloud sidecar's `cloud_inbound` listener (`ssl.handshake`, ...).
    fn listener_stat(&self, name: &str) -> u64 {
        let stat = format!("listener.0.0.0.0_{}.{name}", self.ports.cloud);
        self.cloud.stat(&stat).unwrap_or(0)
    }
}

/// The vehicle id and XFCC a forged request got to the service as.
fn assert_replaced(body: &str, vehicle: &str) {
    assert_eq!(echoed(body, "x-misaki-vehicle"), [vehicle], "{body}");
    let xfcc = echoed(body, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{body}");
    assert!(
        xfcc[0].contains(&format!("URI=spiffe://misaki.local/vehicle/{vehicle}"))
            && xfcc[0].contains("By=spiffe://misaki.local/cloud/maps")
            && !xfcc[0].contains("car-9"),
        "{body}"
    );
}

#[test]
fn strict_mtls_names_the_calling_vehicle_and_refuses_everyone_else() {
    let lab = lab("strict", "vehicle-sidecar.yaml");

    // The vehicle's app, claiming to be car-9: the service sees car-1, the identity in
    // the certificate the vehicle sidecar presented.
    let forged = FORGED;
    let body = lab.through_vehicle();
    assert_replaced(&body, "car-1");
    assert!(lab.listener_stat("ssl.handshake") >= 1);
    // TLS 1.3: the vehicle's certificate (its id) does not cross the uplink in clear.
    assert!(lab.listener_stat("ssl.versions.TLSv1.3") >= 1);
    assert!(
        lab.cloud
            .stat("http.cloud_inbound.downstream_cx_http2_total")
            >= Some(1),
        "the vehicle talks HTTP/2 to the cloud sidecar"
    );

    // Plaintext at cloud_inbound: no HTTP answer at all.
    let plain = http::request(lab.ports.cloud, "GET", "/maps/x", &forged, b"");
    assert!(plain.is_err(), "plaintext got an answer: {plain:?}");

    direct_clients_are_judged_by_their_certificate(&lab, &forged);
}

/// Direct mTLS clients at the strict `cloud_inbound`, forwarding a forged XFCC and
/// vehicle id: a vehicle, a cloud peer, a claim credential of the same CA, a vehicle
/// certificate of another CA.
fn direct_clients_are_judged_by_their_certificate(lab: &Lab, forged: &[(&str, &str)]) {
    let other = FleetCa::init(&lab.dir.path().join("other-ca"));
    let ours =
        |name: &str, identity: &[&str]| issue_with_sds(lab.dir.path(), &lab.ca, name, identity);
    let (_clients, ports) = lab.clients(&[
        ("car1", ours("car-1-direct", &["--vehicle", "car-1"])),
        ("batch", ours("batch", &["--cloud", "batch"])),
        (
            "claim",
            ours("claim", &["--claim", "car-1", "--valid-for", "24h"]),
        ),
        (
            "otherca",
            issue_with_sds(lab.dir.path(), &other, "other", &["--vehicle", "car-1"]),
        ),
    ]);
    let body = lab.get_ok(ports[0], forged).expect("a vehicle certificate");
    assert_replaced(&body, "car-1");
    // A cloud peer: named in XFCC, no vehicle id.
    let body = lab.get_ok(ports[1], forged).expect("a cloud certificate");
    assert!(echoed(&body, "x-misaki-vehicle").is_empty(), "{body}");
    let xfcc = echoed(&body, "x-forwarded-client-cert");
    assert!(
        xfcc.len() == 1
            && xfcc[0].ends_with(";URI=spiffe://misaki.local/cloud/batch")
            && !xfcc[0].contains("vehicle"),
        "{body}"
    );
    // Refused in the handshake, each for its reason (the cloud sidecar's counters).
    for (port, why) in [
        (ports[2], "ssl.fail_verify_san"),
        (ports[3], "ssl.fail_verify_error"),
    ] {
        let before = lab.listener_stat(why);
        let r = http::request(port, "GET", "/maps/x", forged, b"").expect("client answers");
        assert_eq!(r.status, 503, "{why}: {}", r.body);
        assert!(r.body.contains("connection failure"), "{why}: {}", r.body);
        assert!(lab.listener_stat(why) > before, "refused for {why}");
    }
}

#[test]
fn permissive_mtls_also_takes_plaintext_but_never_with_a_vehicle_id() {
    let lab = lab("permissive", "vehicle-sidecar-delta.yaml");
    let forged = FORGED;
    let body = lab.through_vehicle();
    assert_replaced(&body, "car-1");

    // Plaintext is served, stripped of what it claimed.
    let body = lab
        .get_ok(lab.ports.cloud, &forged)
        .expect("plaintext is served");
    assert!(echoed(&body, "x-misaki-vehicle").is_empty(), "{body}");
    assert!(
        echoed(&body, "x-forwarded-client-cert").is_empty(),
        "{body}"
    );

    // TLS is still mutual and from the fleet CA only.
    let other = FleetCa::init(&lab.dir.path().join("other-ca"));
    let (_clients, ports) = lab.clients(&[(
        "otherca",
        issue_with_sds(lab.dir.path(), &other, "other", &["--vehicle", "car-1"]),
    )]);
    let r = http::request(ports[0], "GET", "/maps/x", &forged, b"").expect("client answers");
    assert_eq!(r.status, 503, "{}", r.body);
}

/// A gRPC client in Python (grpcio, as tests/grpc/proxyless.py) that lets xDS secure
/// its channel: the xDS credentials take the TLS the cluster asks for, with the
/// certificate of the bootstrap's `certificate_providers`.
const XDS_SECURE_CLIENT: &str = r#"import grpc
creds = grpc.xds_channel_credentials()
with grpc.secure_channel("xds:///maps", creds) as channel:
    say = channel.unary_unary("/misaki.demo.Echo/Say")
    print(say(b"hello over mtls", timeout=20, wait_for_ready=True).decode())
"#;

/// The gRPC demo server of tests/grpc/proxyless.py; runs while its stdin is open.
fn grpc_server() -> (Child, u16) {
    let mut child = Command::new(misaki_e2e::repo_root().join(".venv/bin/python"))
        .arg(misaki_e2e::repo_root().join("tests/grpc/proxyless.py"))
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the gRPC server (scripts/setup.sh installs grpcio)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("server port");
    let port = line.trim().parse().expect("a port number");
    (child, port)
}

#[test]
fn a_proxyless_grpc_client_calls_through_a_strict_cloud_sidecar_with_its_own_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let (mut server, server_port) = grpc_server();
    let ports = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    let text = single_service_policy(&ports, "strict", "grpc", server_port, "/misaki.demo.Echo");
    fs::write(&policy_path, text).expect("write policy");
    let cp = ControlPlane::start(&policy_path, dir.path());
    let (_, cloud) = cloud_sidecar(dir.path(), &ca, &cp);

    let car = issue_with_sds(dir.path(), &ca, "car-grpc", &["--vehicle", "car-grpc-1"]);
    let file = |f: &str| car.join(f).display().to_string();
    let bootstrap = serde_json::json!({
        "xds_servers": [{
            "server_uri": format!("127.0.0.1:{}", cp.xds_port),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": "car-grpc-1", "cluster": "vehicle", "metadata": {"vehicle_id": "car-grpc-1"}},
        "certificate_providers": {
            misaki_compiler::GRPC_CERT_PROVIDER: {"plugin_name": "file_watcher", "config": {
                "certificate_file": file("cert.pem"),
                "private_key_file": file("key.pem"),
                "ca_certificate_file": file("ca.pem"),
                "refresh_interval": "60s",
            }},
        },
    });
    let bootstrap_path = dir.path().join("grpc-bootstrap.json");
    fs::write(&bootstrap_path, bootstrap.to_string()).expect("write bootstrap");
    let client_path = dir.path().join("client.py");
    fs::write(&client_path, XDS_SECURE_CLIENT).expect("write client");
    let out = Command::new(misaki_e2e::repo_root().join(".venv/bin/python"))
        .arg(&client_path)
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap_path)
        .output()
        .expect("run the gRPC client");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "proxyless client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "echo:hello over mtls"
    );
    let handshakes = format!("listener.0.0.0.0_{}.ssl.versions.TLSv1.3", ports.cloud);
    assert!(cloud.stat(&handshakes) >= Some(1), "over mTLS, TLS 1.3");
}
