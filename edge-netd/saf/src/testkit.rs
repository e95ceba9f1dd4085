//! Test and benchmark support: a receiver standing in for the cloud service behind the
//! cloud sidecar. Not used by the daemon.
//!
//! The receiver speaks HTTP/1.1 and h2c, undoes `Content-Encoding: zstd` as Envoy's
//! decompressor would, records every request's `Idempotency-Key` (and, if asked, the
//! decoded body), and answers a configurable status (default 200, per path prefix
//! overrides). `GET /_stats` and `GET /_keys` expose what it saw to other processes.
//!
//! In TLS mode ([`Receiver::start_tls`], configuration from [`server_tls_config`]) it is
//! the cloud sidecar's mutual TLS listener instead: HTTP/1.1 and HTTP/2 over TLS, a
//! client certificate required, and each delivery records the client certificate and its
//! URI SAN (`spiffe://TD/vehicle/ID`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// One request the receiver answered.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub key: String,
    pub class: Option<String>,
    pub method: String,
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub content_encoding: Option<String>,
    pub content_type: Option<String>,
    /// Decoded body.
    pub body: Vec<u8>,
    pub wire_len: usize,
    pub status: u16,
    pub at_unix_ms: u64,
    /// TLS mode: the client certificate's URI SAN (the first, if several).
    pub peer_uri: Option<String>,
    /// TLS mode: the client's leaf certificate, DER.
    pub peer_cert: Option<Vec<u8>>,
}

/// The client of one TLS connection.
#[derive(Clone, Debug, Default)]
struct Peer {
    uri: Option<String>,
    cert: Option<Vec<u8>>,
}

#[derive(Debug, Default)]
struct Seen {
    deliveries: Vec<Delivery>,
    /// 2xx-answered deliveries per key.
    ok_keys: HashMap<String, u32>,
    ok: u64,
    wire_bytes: u64,
    body_bytes: u64,
    first_ok_ms: Option<u64>,
    last_ok_ms: Option<u64>,
}

#[derive(Debug)]
struct State {
    seen: Mutex<Seen>,
    default_status: AtomicU16,
    path_status: Mutex<Vec<(String, u16)>>,
    keep_bodies: bool,
    /// `Some`: TLS mode, with the configuration new handshakes use.
    tls: Mutex<Option<Arc<ServerConfig>>>,
    /// TLS mode: the client certificate of every open connection, by connection number.
    open: Mutex<Vec<(u64, Vec<u8>)>>,
    /// TLS mode: handshakes that failed (refused by either side).
    handshake_failures: AtomicU64,
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Receiver {
    /// Listen on `addr` (port 0 for any) on the current runtime. With `keep_bodies`, every
    /// request is kept in [`Receiver::deliveries`] (tests); without, only per-key counts
    /// (benchmarks with millions of messages).
    pub async fn start(addr: SocketAddr, keep_bodies: bool) -> std::io::Result<Self> {
        Self::listen(addr, keep_bodies, None).await
    }

    /// [`Receiver::start`] in TLS mode: every connection is a TLS handshake with `config`
    /// (or what [`Receiver::set_tls_config`] put in its place).
    pub async fn start_tls(
        addr: SocketAddr,
        keep_bodies: bool,
        config: Arc<ServerConfig>,
    ) -> std::io::Result<Self> {
        Self::listen(addr, keep_bodies, Some(config)).await
    }

    async fn listen(
        addr: SocketAddr,
        keep_bodies: bool,
        tls: Option<Arc<ServerConfig>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            seen: Mutex::new(Seen::default()),
            default_status: AtomicU16::new(200),
            path_status: Mutex::new(Vec::new()),
            keep_bodies,
            tls: Mutex::new(tls),
            open: Mutex::new(Vec::new()),
            handshake_failures: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, state.clone(), stop_rx));
        Ok(Self { addr, state, stop })
    }

    /// TLS mode: the configuration of the next handshakes (open connections keep theirs).
    pub fn set_tls_config(&self, config: Arc<ServerConfig>) {
        *lock(&self.state.tls) = Some(config);
    }

    /// TLS mode: the client certificates (DER) of the connections open now, one per
    /// connection.
    pub fn open_tls_connections(&self) -> Vec<Vec<u8>> {
        lock(&self.state.open)
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// TLS mode: handshakes that failed so far.
    pub fn tls_handshake_failures(&self) -> u64 {
        self.state.handshake_failures.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop listening and drop every connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Status for every request without a path override.
    pub fn set_status(&self, status: u16) {
        self.state.default_status.store(status, Ordering::SeqCst);
    }

    /// Status for requests whose path starts with `prefix` (first match wins).
    pub fn set_path_status(&self, prefix: &str, status: u16) {
        self.state
            .path_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((prefix.to_string(), status));
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.seen(|s| s.deliveries.clone())
    }

    /// 2xx-answered deliveries per idempotency key.
    pub fn ok_keys(&self) -> HashMap<String, u32> {
        self.seen(|s| s.ok_keys.clone())
    }

    pub fn stats_json(&self) -> serde_json::Value {
        self.seen(stats)
    }

    fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&self
            .state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, st: Arc<State>, mut stop_rx: watch::Receiver<bool>) {
    let mut n = 0u64;
    loop {
        let (stream, _) = tokio::select! {
            _ = stop_rx.wait_for(|s| *s) => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let _ = stream.set_nodelay(true);
        n += 1;
        let tls = lock(&st.tls).clone();
        let (st, stop_rx) = (st.clone(), stop_rx.clone());
        match tls {
            None => {
                tokio::spawn(serve_conn(stream, st, Peer::default(), stop_rx));
            }
            Some(config) => {
                tokio::spawn(serve_tls(stream, n, config, st, stop_rx));
            }
        }
    }
}

/// Handshake (a client certificate required by `config`), then serve; the connection is
/// listed in `open` while it lasts.
async fn serve_tls(
    stream: TcpStream,
    n: u64,
    config: Arc<ServerConfig>,
    st: Arc<State>,
    stop_rx: watch::Receiver<bool>,
) {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let Ok(Ok(tls)) = tokio::time::timeout(std::time::Duration::from_secs(10), accept).await else {
        st.handshake_failures.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let peer = Peer {
        uri: cert.as_deref().and_then(uri_san),
        cert: cert.clone(),
    };
    lock(&st.open).push((n, cert.unwrap_or_default()));
    serve_conn(tls, st.clone(), peer, stop_rx).await;
    lock(&st.open).retain(|(i, _)| *i != n);
}

async fn serve_conn<I>(io: I, st: Arc<State>, peer: Peer, mut stop_rx: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let (st, peer) = (st.clone(), peer.clone());
        async move { Ok::<_, Infallible>(answer(&st, &peer, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    // A stopped receiver drops its connections at once, like a crashed server.
    tokio::select! {
        _ = conn => {}
        _ = stop_rx.wait_for(|s| *s) => {}
    }
}

/// The first URI SAN of a DER certificate.
fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let sans = cert.subject_alternative_name().ok()??;
    sans.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_string()),
        _ => None,
    })
}

/// A TLS configuration for [`Receiver::start_tls`], as the cloud sidecar's mutual TLS
/// listener has it: `cert_chain_pem`/`key_pem` served, a client certificate chaining to
/// `client_ca_pem` required, ALPN `h2` and `http/1.1`.
pub fn server_tls_config(
    cert_chain_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<ServerConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots
            .add(ca.map_err(|e| format!("client CA: {e}"))?)
            .map_err(|e| format!("client CA: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
        })
        .map_err(|e| format!("server config: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stats(s: &Seen) -> serde_json::Value {
    let unique = s.ok_keys.len() as u64;
    serde_json::json!({
        "ok": s.ok,
        "unique": unique,
        "duplicates": s.ok - unique,
        "wire_bytes": s.wire_bytes,
        "body_bytes": s.body_bytes,
        "first_ok_unix_ms": s.first_ok_ms,
        "last_ok_unix_ms": s.last_ok_ms,
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn answer(
    st: &State,
    peer: &Peer,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let lock = || st.seen.lock().unwrap_or_else(PoisonError::into_inner);
    match path.as_str() {
        "/_stats" => return text(StatusCode::OK, stats(&lock()).to_string()),
        "/_keys" => {
            let s = lock();
            let mut out = String::with_capacity(s.ok_keys.len() * 24);
            for (k, n) in &s.ok_keys {
                out.push_str(&format!("{k} {n}\n"));
            }
            return text(StatusCode::OK, out);
        }
        _ => {}
    }
    let h = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let Ok(wire) = body.collect().await.map(|b| b.to_bytes()) else {
        return text(StatusCode::BAD_REQUEST, "body read failed".into());
    };
    let encoding = h("content-encoding");
    let decoded = match encoding.as_deref() {
        Some("zstd") => match zstd::decode_all(&wire[..]) {
            Ok(b) => b,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad zstd: {e}")),
        },
        _ => wire.to_vec(),
    };
    let status = st
        .path_status
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|(p, _)| path.starts_with(p.as_str()))
        .map_or_else(|| st.default_status.load(Ordering::SeqCst), |(_, s)| *s);
    let key = h("idempotency-key").unwrap_or_default();
    let at = now_ms();
    let mut s = lock();
    if (200..300).contains(&status) {
        *s.ok_keys.entry(key.clone()).or_default() += 1;
        s.ok += 1;
        s.wire_bytes += wire.len() as u64;
        s.body_bytes += decoded.len() as u64;
        s.first_ok_ms.get_or_insert(at);
        s.last_ok_ms = Some(at);
    }
    if !st.keep_bodies {
        drop(s);
        return text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            String::new(),
        );
    }
    s.deliveries.push(Delivery {
        key,
        class: h("x-misaki-class"),
        method: parts.method.to_string(),
        path,
        version: format!("{:?}", parts.version),
        content_encoding: encoding,
        content_type: h("content-type"),
        body: decoded,
        wire_len: wire.len(),
        status,
        at_unix_ms: at,
        peer_uri: peer.uri.clone(),
        peer_cert: peer.cert.clone(),
    });
    drop(s);
    text(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        String::new(),
    )
}

/// Telemetry-like JSON of about `n` bytes (vehicle samples with varying values), for
/// compression tests and benchmarks. Deterministic for a given `seed`.
pub fn telemetry_json(n: usize, seed: u64) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut out = String::from("[");
    let mut i = seed;
    while out.len() < n {
        i = i
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let _ = write!(
            out,
            r#"{{"ts":{},"vin":"WDB1234561A{:06}","speed_kmh":{}.{},"rpm":{},"soc":{},"lat":48.{:06},"lon":11.{:06}}},"#,
            1_700_000_000_000u64 + (i >> 40),
            seed % 1_000_000,
            (i >> 33) % 180,
            (i >> 20) % 10,
            800 + (i >> 30) % 4000,
            (i >> 50) % 100,
            (i >> 12) % 1_000_000,
            (i >> 24) % 1_000_000
        );
    }
    out.push(']');
    out.into_bytes()
}
