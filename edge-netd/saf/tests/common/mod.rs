//! Shared test harness: a policy, an in-process store-and-forward on loopback with a real
//! queue directory, a recording receiver, and a small HTTP client.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use misaki_queue::{Queue, QueueConfig};
use misaki_saf::{
    DestinationConfig, HttpVersion, SafConfig, StaticUplinks, StoreForward, testkit::Receiver,
};
use tokio::{net::TcpListener, sync::oneshot};

pub const POLICY: &str = r#"
version: 1
uplinks:
  - {name: wifi, kind: wifi}
  - {name: lte, kind: lte, metered: true}
classes:
  - {name: standard, uplinks: [wifi, lte]}
  - {name: bulk, uplinks: [wifi], deferrable: true, ttl: 1h}
services:
  - {name: telemetry, location: cloud, protocol: http, port: 8080, endpoints: ["127.0.0.1:1"], routes: ["/telemetry"], class: bulk}
  - {name: maps, location: cloud, protocol: http, port: 8080, endpoints: ["127.0.0.1:1"], routes: ["/maps"], class: standard}
"#;

pub fn policy() -> misaki_policy::Policy {
    misaki_policy::parse("test-policy.yaml", POLICY).expect("test policy is valid")
}

pub struct Options {
    pub budget_bytes: u64,
    pub max_body_bytes: usize,
    pub version: HttpVersion,
    pub all_up: bool,
    /// `Some`: the receiver is a TLS one with this configuration, the destination https://.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            budget_bytes: 64 << 20,
            max_body_bytes: 1 << 20,
            version: HttpVersion::Http2,
            all_up: true,
            tls: None,
        }
    }
}

pub struct Harness {
    pub saf: StoreForward,
    pub uplinks: Arc<StaticUplinks>,
    pub receiver: Receiver,
    pub ingest: SocketAddr,
    pub client: Client<HttpConnector, Full<Bytes>>,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl Harness {
    pub async fn start(opts: Options) -> Self {
        let any = "127.0.0.1:0".parse().unwrap();
        let (receiver, scheme) = match opts.tls {
            Some(config) => (Receiver::start_tls(any, true, config).await, "https"),
            None => (Receiver::start(any, true).await, "http"),
        };
        let receiver = receiver.expect("receiver binds");
        let dir = tempfile::tempdir().unwrap();
        let mut qcfg = QueueConfig::new(dir.path().join("queue"));
        qcfg.budget_bytes = opts.budget_bytes;
        qcfg.segment_bytes = 4 << 20;
        let queue = tokio::task::spawn_blocking(move || Queue::open(qcfg))
            .await
            .unwrap()
            .expect("queue opens");
        let policy = policy();
        let uplinks = StaticUplinks::from_policy(&policy);
        if opts.all_up {
            uplinks.set_all_up();
        }
        let config = SafConfig {
            default_destination: Some(DestinationConfig::new(
                format!("{scheme}://{}", receiver.addr()),
                opts.version,
            )),
            max_body_bytes: opts.max_body_bytes,
            max_in_flight: 16,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(300),
            request_timeout: Duration::from_secs(5),
            ..SafConfig::default()
        };
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(policy));
        // The watch sender may drop: receivers keep the last policy.
        let (stop, stopped) = oneshot::channel::<()>();
        let saf = StoreForward::start(config, Arc::new(queue), rx, uplinks.clone(), async {
            let _ = stopped.await;
        })
        .expect("config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ingest = listener.local_addr().unwrap();
        tokio::spawn({
            let saf = saf.clone();
            async move { saf.serve(listener).await }
        });
        Self {
            saf,
            uplinks,
            receiver,
            ingest,
            client: Client::builder(TokioExecutor::new()).build_http(),
            dir,
            stop: Some(stop),
        }
    }

    /// POST `body` to the ingest endpoint; returns status, idempotency key, body text.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, Option<String>, String) {
        post(&self.client, self.ingest, path, headers, body).await
    }

    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.saf.stopped().await;
    }
}

pub async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Option<String>, String) {
    let mut req = Request::post(format!("http://{addr}{path}"));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("ingest answers");
    let status = resp.status();
    let key = resp
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, key, String::from_utf8_lossy(&text).into_owned())
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub use misaki_saf::testkit::telemetry_json;
