//! What the mTLS and enrolment tests share: a fleet CA in a temporary directory,
//! misaki-cp serving in process, gRPC clients over TLS with a client certificate.
// Each test binary uses its own subset.
#![allow(dead_code)]

pub mod etcd;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use misaki_cp::ca::{Ca, Subject};
use misaki_cp::cli::{ServeArgs, TlsArgs};
use misaki_cp::run::QUICKSTART;
use misaki_identity::TrustDomain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Status, Streaming};

pub const PATIENCE: Duration = Duration::from_secs(15);
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A fleet CA and misaki-cp's server certificate, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
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
    pub fn issue(&self, name: &str, subject: Subject) -> PathBuf {
        let out = self.dir.path().join(name);
        self.ca
            .issue(&subject, Duration::from_secs(3600))
            .unwrap()
            .write(&out)
            .unwrap();
        out
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn tls_args(&self, crl: Option<PathBuf>) -> TlsArgs {
        TlsArgs {
            tls_cert: Some(self.path("server/cert.pem")),
            tls_key: Some(self.path("server/key.pem")),
            client_ca: Some(self.path("clients-ca.pem")),
            crl,
            ca: Some(self.path("ca")),
            trust_domain: None,
            enrol_valid_for: Duration::from_secs(3600),
            handshake_timeout: Duration::from_secs(1),
            max_handshakes: 2,
        }
    }
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], misaki_harness::free_port()))
}

/// `misaki-cp serve` in this process, stopped on drop.
pub struct Cp {
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub policy: PathBuf,
    _stop: oneshot::Sender<()>,
}

pub async fn start(pki: &Pki, crl: Option<PathBuf>) -> Cp {
    start_with(pki, pki.tls_args(crl)).await
}

/// `start` with these TLS flags (`TlsArgs::default()`: plaintext).
pub async fn start_with(pki: &Pki, tls: TlsArgs) -> Cp {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    std::fs::copy(pki.path("ca/ca.pem"), pki.path("clients-ca.pem")).unwrap();
    let policy = pki.path("mesh.yaml");
    std::fs::write(&policy, QUICKSTART).unwrap();
    let args = ServeArgs {
        policy: Some(policy.clone()),
        tls,
        ..serve_args()
    };
    let (xds, admin) = (args.xds_addr, args.admin_addr);
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

/// `misaki-cp serve` with these arguments in this process, stopped on drop; not
/// waited for (a shared-mode replica is not ready until etcd has a policy).
/// `serve`'s arguments as the command line's defaults give them, on free loopback
/// ports: tests name only what they change.
pub fn serve_args() -> ServeArgs {
    use clap::Parser;
    let cli = misaki_cp::cli::Cli::parse_from(["misaki-cp", "serve"]);
    let misaki_cp::cli::Command::Serve(args) = cli.command else {
        unreachable!("parsed `serve`")
    };
    ServeArgs {
        xds_addr: free_addr(),
        admin_addr: free_addr(),
        ..*args
    }
}

pub fn spawn_serve(args: ServeArgs) -> Cp {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_test_writer()
        .try_init();
    let (stop, stopped) = oneshot::channel::<()>();
    let cp = Cp {
        xds: args.xds_addr,
        admin: args.admin_addr,
        policy: args.policy.clone().unwrap_or_default(),
        _stop: stop,
    };
    tokio::spawn(misaki_cp::run::serve(args, async {
        let _ = stopped.await;
    }));
    cp
}

pub async fn wait_until<F, Fut>(what: &str, mut f: F)
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
    pub async fn get(&self, path: &str) -> Option<String> {
        let (status, body) = self.get_any(path).await?;
        (status == 200).then_some(body)
    }

    /// An admin GET: status and body.
    pub async fn get_any(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, body.to_string()))
    }

    pub async fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path).await.expect("admin 200")).unwrap()
    }

    pub async fn metric(&self, series: &str) -> u64 {
        let text = self.get("/metrics").await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A gRPC channel over TLS, presenting the certificate in `client` (if any).
    pub async fn channel(&self, pki: &Pki, client: Option<&Path>) -> Result<Channel, String> {
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

pub fn node(id: &str, role: &str, vehicle_id: Option<&str>) -> Node {
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
pub struct Ads {
    pub tx: mpsc::Sender<DiscoveryRequest>,
    pub rx: Streaming<DiscoveryResponse>,
}

impl Ads {
    pub async fn open(channel: Channel, node: Node) -> Result<Ads, Status> {
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
    pub async fn next(&mut self) -> Result<DiscoveryResponse, Status> {
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
pub async fn fetch(cp: &Cp, pki: &Pki, client: Option<&Path>, node: Node) -> Result<Ads, String> {
    let channel = cp.channel(pki, client).await?;
    let mut ads = Ads::open(channel, node)
        .await
        .map_err(|s| format!("{s:?}"))?;
    ads.next().await.map_err(|s| format!("{s:?}"))?;
    Ok(ads)
}

pub async fn car(cp: &Cp, pki: &Pki, dir: &str, id: &str) -> Result<Ads, String> {
    fetch(cp, pki, Some(&pki.path(dir)), node(id, "vehicle", Some(id))).await
}
