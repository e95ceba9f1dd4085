//! misaki-cp with mutual TLS on its gRPC port, in process, against real gRPC clients
//! (tonic over rustls, with client certificates). Every certificate comes from
//! misaki-cp's own CA code (`misaki_cp::ca`, what `misaki-cp ca` runs).
//!
//! Timing: waits have generous timeouts (the machine is shared); the only deliberate
//! delays are the 1 s handshake timeout and the file watcher.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use misaki_cp::ca::{Ca, Subject};
use misaki_cp::cli::{ServeArgs, TlsArgs};
use misaki_cp::run::QUICKSTART;
use misaki_identity::TrustDomain;
use misaki_proto::fleet_v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};

const PATIENCE: Duration = Duration::from_secs(15);
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A fleet CA and misaki-cp's server certificate, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(
            &dir.path().join("ca"),
            TrustDomain::default(),
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let pki = Pki { dir, ca };
        pki.issue(
            "server",
            Subject::Server(vec!["localhost".into(), "127.0.0.1".into()]),
        );
        pki
    }

    /// Issue into `<dir>/<name>`; returns that directory.
    fn issue(&self, name: &str, subject: Subject) -> PathBuf {
        let out = self.dir.path().join(name);
        self.ca
            .issue(&subject, Duration::from_secs(3600))
            .unwrap()
            .write(&out)
            .unwrap();
        out
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn tls_args(&self, crl: Option<PathBuf>) -> TlsArgs {
        TlsArgs {
            tls_cert: Some(self.path("server/cert.pem")),
            tls_key: Some(self.path("server/key.pem")),
            client_ca: Some(self.path("clients-ca.pem")),
            crl,
            ca: Some(self.path("ca")),
            trust_domain: None,
            handshake_timeout: Duration::from_secs(1),
            max_handshakes: 2,
        }
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `misaki-cp serve` in this process, stopped on drop.
struct Cp {
    xds: SocketAddr,
    admin: SocketAddr,
    policy: PathBuf,
    _stop: oneshot::Sender<()>,
}

async fn start(pki: &Pki, crl: Option<PathBuf>) -> Cp {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    std::fs::copy(pki.path("ca/ca.pem"), pki.path("clients-ca.pem")).unwrap();
    let policy = pki.path("mesh.yaml");
    std::fs::write(&policy, QUICKSTART).unwrap();
    let (xds, admin) = (free_addr(), free_addr());
    let args = ServeArgs {
        policy: Some(policy.clone()),
        xds_addr: xds,
        admin_addr: admin,
        probe_addr: None,
        tls: pki.tls_args(crl),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(misaki_cp::run::serve(args, async {
        let _ = stopped.await;
    }));
    let cp = Cp {
        xds,
        admin,
        policy,
        _stop: stop,
    };
    wait_until("misaki-cp ready", || async {
        cp.get("/readyz").await.is_some()
    })
    .await;
    cp
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cp {
    /// An admin GET; `None` unless 200.
    async fn get(&self, path: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }

    async fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path).await.expect("admin 200")).unwrap()
    }

    async fn metric(&self, series: &str) -> u64 {
        let text = self.get("/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A gRPC channel over TLS, presenting the certificate in `client` (if any).
    async fn channel(&self, pki: &Pki, client: Option<&Path>) -> Result<Channel, String> {
        let ca = std::fs::read(pki.path("ca/ca.pem")).unwrap();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some(dir) = client {
            let cert = std::fs::read(dir.join("cert.pem")).unwrap();
            let key = std::fs::read(dir.join("key.pem")).unwrap();
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{}", self.xds))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }
}

fn node(id: &str, role: &str, vehicle_id: Option<&str>) -> Node {
    let mut fields = std::collections::BTreeMap::new();
    if let Some(v) = vehicle_id {
        fields.insert(
            "vehicle_id".to_string(),
            Value {
                kind: Some(Kind::StringValue(v.into())),
            },
        );
    }
    Node {
        id: id.into(),
        cluster: role.into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// An open SotW stream subscribed to every cluster.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Ads {
    async fn open(channel: Channel, node: Node) -> Result<Ads, Status> {
        let (tx, requests) = mpsc::channel(8);
        tx.send(DiscoveryRequest {
            node: Some(node),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .stream_aggregated_resources(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok(Ads { tx, rx })
    }

    /// The next response, ACKed.
    async fn next(&mut self) -> Result<DiscoveryResponse, Status> {
        let r = tokio::time::timeout(PATIENCE, self.rx.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no response"))??
            .ok_or_else(|| Status::cancelled("stream ended"))?;
        let ack = DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            type_url: r.type_url.clone(),
            ..Default::default()
        };
        let _ = self.tx.send(ack).await;
        Ok(r)
    }
}

/// Connect with `client`'s certificate and fetch the clusters as `node`: the first
/// response, or why there is none (connect error or gRPC status).
async fn fetch(cp: &Cp, pki: &Pki, client: Option<&Path>, node: Node) -> Result<Ads, String> {
    let channel = cp.channel(pki, client).await?;
    let mut ads = Ads::open(channel, node)
        .await
        .map_err(|s| format!("{s:?}"))?;
    ads.next().await.map_err(|s| format!("{s:?}"))?;
    Ok(ads)
}

async fn car(cp: &Cp, pki: &Pki, dir: &str, id: &str) -> Result<Ads, String> {
    fetch(cp, pki, Some(&pki.path(dir)), node(id, "vehicle", Some(id))).await
}

/// The report sender (the stream ends when it is dropped) and the control stream.
type Report = (
    mpsc::Sender<pb::VehicleReport>,
    Streaming<pb::ControlMessage>,
);

/// Open a fleet report stream that says Hello as `vehicle`.
async fn report_as(channel: Channel, vehicle: &str) -> Result<Report, Status> {
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        vehicle_id: vehicle.into(),
        heartbeat_interval_ms: 1000,
        ..Default::default()
    };
    tx.send(pb::VehicleReport {
        seq: 1,
        observed_unix_ms: 1,
        report: Some(pb::vehicle_report::Report::Hello(hello)),
    })
    .await
    .unwrap();
    let stream = pb::fleet_service_client::FleetServiceClient::new(channel)
        .report(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vehicle_gets_its_config_and_is_listed_with_its_certificate_identity() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let cp = start(&pki, None).await;
    // node.id is free per sidecar; the effective vehicle id is what must match.
    let sidecar = node("car-1-sidecar", "vehicle", Some("car-1"));
    let _ads = fetch(&cp, &pki, Some(&pki.path("car-1")), sidecar)
        .await
        .expect("car-1 gets its clusters");
    let nodes = cp.json("/nodes").await;
    assert_eq!(nodes["streams"][0]["node_id"], "car-1-sidecar");
    assert_eq!(
        nodes["streams"][0]["identity"],
        "spiffe://misaki.local/vehicle/car-1"
    );

    let channel = cp.channel(&pki, Some(&pki.path("car-1"))).await.unwrap();
    let (_tx, mut control) = report_as(channel, "car-1")
        .await
        .expect("reports as itself");
    control.message().await.unwrap().expect("an ack");
    let fleet = cp.json("/fleet/car-1").await;
    assert_eq!(fleet["identity"], "spiffe://misaki.local/vehicle/car-1");
    assert_eq!(
        cp.metric("misaki_tls_handshakes_total{result=\"ok\"}")
            .await,
        2
    );

    // A cloud identity gets the cloud sidecar's config.
    pki.issue("maps", Subject::Cloud("maps".into()));
    fetch(
        &cp,
        &pki,
        Some(&pki.path("maps")),
        node("maps-1", "cloud", None),
    )
    .await
    .expect("a cloud sidecar gets its config");
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_other_cas_expired_and_revoked_certificates_are_refused_in_the_handshake() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let revoked = pki
        .ca
        .issue(&Subject::Vehicle("car-r".into()), Duration::from_secs(3600))
        .unwrap();
    revoked.write(&pki.path("car-r")).unwrap();
    let crl = pki.ca.revoke(&revoked.serial_hex).unwrap();
    let now = time::OffsetDateTime::now_utc();
    pki.ca
        .issue_between(
            &Subject::Vehicle("car-old".into()),
            now - time::Duration::hours(2),
            now - time::Duration::minutes(1),
        )
        .unwrap()
        .write(&pki.path("car-old"))
        .unwrap();
    let other = Ca::init(
        &pki.path("other-ca"),
        TrustDomain::default(),
        Duration::from_secs(7200),
    )
    .unwrap();
    other
        .issue(&Subject::Vehicle("car-1".into()), Duration::from_secs(600))
        .unwrap()
        .write(&pki.path("car-1-other"))
        .unwrap();
    let cp = start(&pki, Some(crl)).await;

    // Plaintext gRPC on the TLS port.
    let plain = Channel::from_shared(format!("http://{}", cp.xds))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => Ads::open(ch, node("car-1", "vehicle", None)).await.is_err(),
    };
    assert!(refused, "plaintext was served");
    for (dir, id, label) in [
        ("car-1-other", "car-1", "unknown_ca"),
        ("car-old", "car-old", "expired"),
        ("car-r", "car-r", "revoked"),
    ] {
        let e = car(&cp, &pki, dir, id)
            .await
            .err()
            .unwrap_or_else(|| panic!("{dir} was served"));
        // The client may see the alert before the server has counted it.
        let series = format!("misaki_tls_handshakes_total{{result=\"{label}\"}}");
        wait_until(&format!("{dir} refused as {label}: {e}"), || async {
            cp.metric(&series).await >= 1
        })
        .await;
    }
    // No client certificate at all.
    assert!(
        fetch(&cp, &pki, None, node("car-1", "vehicle", None))
            .await
            .is_err()
    );
    wait_until("refused as no_certificate", || async {
        cp.metric("misaki_tls_handshakes_total{result=\"no_certificate\"}")
            .await
            >= 1
    })
    .await;
    assert!(
        cp.metric("misaki_tls_handshakes_total{result=\"protocol\"}")
            .await
            >= 1
    );
    // The good certificate still works.
    let _ads = car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("car-1 served");
    assert_eq!(
        cp.json("/nodes").await["streams"].as_array().unwrap().len(),
        1
    );
}

fn denied(e: &str, code: Code) -> bool {
    e.contains(&format!("{code:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_one_vehicle_can_neither_fetch_nor_report_for_another() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    pki.issue("maps", Subject::Cloud("maps".into()));
    let cp = start(&pki, None).await;

    // node.metadata.vehicle_id says car-2.
    let e = fetch(
        &cp,
        &pki,
        Some(&pki.path("car-1")),
        node("car-1", "vehicle", Some("car-2")),
    )
    .await
    .err()
    .expect("spoofed vehicle refused");
    assert!(denied(&e, Code::PermissionDenied), "{e}");
    assert!(
        e.contains("spiffe://misaki.local/vehicle/car-1") && e.contains("\\\"car-2\\\""),
        "the message names both: {e}"
    );
    // node.id says car-2 (no metadata), a cloud role, a claim credential.
    for (dir, n) in [
        ("car-1", node("car-2", "vehicle", None)),
        ("car-1", node("car-1", "cloud", None)),
        ("maps", node("car-1", "vehicle", None)),
        ("claim-1", node("car-1", "vehicle", None)),
    ] {
        let e = fetch(&cp, &pki, Some(&pki.path(dir)), n)
            .await
            .err()
            .expect("refused");
        assert!(denied(&e, Code::PermissionDenied), "{dir}: {e}");
    }

    // Delta xDS is held to the same rule.
    let channel = cp.channel(&pki, Some(&pki.path("car-1"))).await.unwrap();
    let (tx, requests) = mpsc::channel(1);
    let first = DeltaDiscoveryRequest {
        node: Some(node("car-2", "vehicle", None)),
        type_url: CDS.into(),
        ..Default::default()
    };
    tx.send(first).await.unwrap();
    let mut delta = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(requests))
        .await
        .expect("stream opened")
        .into_inner();
    let status = delta.message().await.expect_err("delta refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A fleet report as car-2 with car-1's certificate, or as car-1 with its claim.
    for (dir, vehicle) in [("car-1", "car-2"), ("claim-1", "car-1")] {
        let channel = cp.channel(&pki, Some(&pki.path(dir))).await.unwrap();
        let status = report_as(channel, vehicle)
            .await
            .expect_err("report refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{dir}: {status:?}");
        assert!(status.message().contains(vehicle), "{status:?}");
    }
    // Every refused ADS stream is counted (six above; fleet reports are not ADS).
    assert_eq!(cp.metric("misaki_xds_identity_denied_total").await, 6);
    let fleet = cp.json("/fleet").await;
    assert_eq!(fleet["total"], 0, "nothing reached the registry: {fleet}");
    assert!(
        cp.json("/nodes").await["streams"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Append a cloud service to the policy: a new cluster for every vehicle.
fn add_service(policy: &Path, name: &str) {
    let mut text = std::fs::read_to_string(policy).unwrap();
    text.push_str(&format!(
        "  - {{ name: {name}, location: cloud, port: 8080, endpoints: [\"127.0.0.1:18081\"], routes: [\"/{name}\"], class: standard }}\n"
    ));
    let tmp = policy.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, policy).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_on_disk_keeps_valid_streams_and_a_new_crl_cuts_revoked_ones() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let car2 = pki
        .ca
        .issue(&Subject::Vehicle("car-2".into()), Duration::from_secs(3600))
        .unwrap();
    car2.write(&pki.path("car-2")).unwrap();
    // The CRL file serve reads: one CRL per trusted CA (`ca init` writes an empty one).
    let crls = pki.path("crls.pem");
    let bundle = |files: &[&str]| {
        let text = files
            .iter()
            .map(|f| std::fs::read_to_string(pki.path(f)).unwrap());
        text.collect::<String>()
    };
    std::fs::write(&crls, bundle(&["ca/crl.pem"])).unwrap();
    let cp = start(&pki, Some(crls.clone())).await;
    let mut one = car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("car-1 connects");
    let mut two = car(&cp, &pki, "car-2", "car-2")
        .await
        .expect("car-2 connects");

    // New server certificate and key, and a client CA bundle that adds a second CA.
    pki.issue("server", Subject::Server(vec!["localhost".into()]));
    let next = Ca::init(
        &pki.path("next-ca"),
        TrustDomain::default(),
        Duration::from_secs(7200),
    )
    .unwrap();
    next.issue(&Subject::Vehicle("car-3".into()), Duration::from_secs(600))
        .unwrap()
        .write(&pki.path("car-3"))
        .unwrap();
    let both_crls = bundle(&["ca/crl.pem", "next-ca/crl.pem"]);
    misaki_cp::ca::write_atomic(&crls, both_crls.as_bytes(), 0o644).unwrap();
    let both_cas = bundle(&["ca/ca.pem", "next-ca/ca.pem"]);
    misaki_cp::ca::write_atomic(&pki.path("clients-ca.pem"), both_cas.as_bytes(), 0o644).unwrap();
    wait_until("the TLS files reloaded", || async {
        cp.metric("misaki_tls_reloads_total{result=\"ok\"}").await >= 1
            && car(&cp, &pki, "car-3", "car-3").await.is_ok()
    })
    .await;
    // The established streams are still served: a policy edit reaches them.
    add_service(&cp.policy, "weather");
    for ads in [&mut one, &mut two] {
        let pushed = ads.next().await.expect("still connected after rotation");
        assert!(pushed.resources.len() > 1, "{pushed:?}");
    }
    assert_eq!(
        cp.metric("misaki_tls_connections_closed_total{reason=\"revoked\"}")
            .await,
        0
    );

    // Revoking car-2 closes its stream, and only its.
    pki.ca.revoke(&car2.serial_hex).unwrap();
    let both_crls = bundle(&["ca/crl.pem", "next-ca/crl.pem"]);
    misaki_cp::ca::write_atomic(&crls, both_crls.as_bytes(), 0o644).unwrap();
    let cut = tokio::time::timeout(PATIENCE, async {
        loop {
            if two.next().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "car-2's stream outlived its revocation");
    assert_eq!(
        cp.metric("misaki_tls_connections_closed_total{reason=\"revoked\"}")
            .await,
        1
    );
    add_service(&cp.policy, "radar");
    one.next().await.expect("car-1 keeps being served");
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_and_garbage_time_out_without_blocking_other_clients() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let cp = start(&pki, None).await;
    // Both handshake permits taken by clients that never speak.
    let stalled = [
        tokio::net::TcpStream::connect(cp.xds).await.unwrap(),
        tokio::net::TcpStream::connect(cp.xds).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cp.metric("misaki_tls_handshakes_in_flight").await, 2);
    let started = std::time::Instant::now();
    car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("served once a permit frees up");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        cp.metric("misaki_tls_handshakes_total{result=\"timeout\"}")
            .await,
        2
    );
    drop(stalled);

    let mut garbage = tokio::net::TcpStream::connect(cp.xds).await.unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    garbage.write_all(&[0u8; 64]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, garbage.read_to_end(&mut buf)).await;
    wait_until("garbage counted", || async {
        cp.metric("misaki_tls_handshakes_total{result=\"protocol\"}")
            .await
            + cp.metric("misaki_tls_handshakes_total{result=\"timeout\"}")
                .await
            >= 3
    })
    .await;
}
