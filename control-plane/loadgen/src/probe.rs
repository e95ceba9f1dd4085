//! Where mTLS memory and CPU go, without misaki-cp around it: a bare server process
//! (this binary, `probe-server`) that holds N connections, plaintext or rustls with
//! misaki-cp's server configuration, each having read one request and written one
//! reply (the size of a vehicle's initial config) and then idling with a read
//! pending, as hyper keeps one on every connection. Its RSS per connection, TLS minus
//! plaintext, is what rustls and tokio-rustls keep per connection (and what the
//! handshakes leave behind in the allocator); its CPU per 1,000 connections, TLS minus
//! plaintext, is the handshake's.
//!
//! The server configuration is built as misaki-cp's `tls::load` builds it (that
//! function is crate-private): ring, the client verifier over `--client-ca` with the
//! CRL checked for the client's own certificate, ALPN h2, no session storage, no
//! TLS 1.3 tickets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use misaki_harness::{Process, poll, procfs, try_free_port};
use rustls::RootCertStore;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::mtls::{Transport, vehicle_ids};
use crate::tls::{FleetTls, ServerFiles};

/// What a client sends first: about an ADS request's size.
pub const REQUEST: usize = 512;

/// misaki-cp's rustls server configuration, from the same files.
fn server_config(f: &ServerFiles) -> Result<Arc<rustls::ServerConfig>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let chain = CertificateDer::pem_slice_iter(&read(&f.cert)?).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(&read(&f.key)?)?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&f.client_ca)?) {
        roots.add(ca?)?;
    }
    let crls = CertificateRevocationListDer::pem_slice_iter(&read(&f.crl)?)
        .collect::<Result<Vec<_>, _>>()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Read the request, write the reply, then hold the connection with a read pending
/// until the client closes it.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, reply: Arc<Vec<u8>>) {
    let mut req = [0u8; REQUEST];
    if s.read_exact(&mut req).await.is_err() {
        return;
    }
    if s.write_all(&reply).await.is_err() || s.flush().await.is_err() {
        return;
    }
    let mut one = [0u8; 1];
    let _ = s.read(&mut one).await;
}

/// The `probe-server` process: serve on `port` until killed.
pub async fn server(port: u16, tls: Option<ServerFiles>, reply_bytes: usize) -> Result<()> {
    let acceptor = match &tls {
        Some(f) => Some(TlsAcceptor::from(server_config(f)?)),
        None => None,
    };
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    // misaki-cp's backlog: a fleet dialling at once waits in the accept queue.
    let listener = socket.listen(4096)?;
    let reply = Arc::new(vec![0x5a; reply_bytes]);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => continue,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, reply) = (acceptor.clone(), reply.clone());
        tokio::spawn(async move {
            match acceptor {
                Some(a) => {
                    if let Ok(s) = a.accept(tcp).await {
                        serve_one(s, reply).await;
                    }
                }
                None => serve_one(tcp, reply).await,
            }
        });
    }
}

/// One client: connect, handshake (mTLS as `id`), request, whole reply; the stream is
/// returned to be held open.
async fn client(
    port: u16,
    tls: Option<(Arc<FleetTls>, String)>,
    reply_bytes: usize,
) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, n: usize) -> Result<()> {
        s.write_all(&[0xa5; REQUEST]).await?;
        s.flush().await?;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await?;
        Ok(())
    }
    match tls {
        Some((fleet, id)) => {
            let name = ServerName::try_from("127.0.0.1")?;
            let mut s = TlsConnector::from(fleet.get(&id)?)
                .connect(name, tcp)
                .await?;
            exchange(&mut s, reply_bytes).await?;
            Ok(Box::new(s))
        }
        None => {
            let mut s = tcp;
            exchange(&mut s, reply_bytes).await?;
            Ok(Box::new(s))
        }
    }
}

/// One probe row.
#[derive(Debug, Clone)]
pub struct ProbeRow {
    pub transport: Transport,
    pub conns: usize,
    pub wall: Duration,
    pub cpu: f64,
    pub rss_idle: u64,
    pub rss_held: u64,
    pub retries: u64,
}

/// Start a `probe-server`, hold `n` connections to it, measure it.
pub async fn run(
    dir: &Path,
    transport: Transport,
    n: usize,
    reply_bytes: usize,
    tls: Option<&(ServerFiles, Arc<FleetTls>)>,
) -> Result<ProbeRow> {
    let port = try_free_port()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("probe-server")
        .arg("--port")
        .arg(port.to_string())
        .arg("--reply-bytes")
        .arg(reply_bytes.to_string());
    let fleet = match (transport, tls) {
        (Transport::Plain, _) => None,
        (Transport::Mtls, Some((files, fleet))) => {
            for (flag, p) in [
                ("--tls-cert", &files.cert),
                ("--tls-key", &files.key),
                ("--client-ca", &files.client_ca),
                ("--crl", &files.crl),
            ] {
                cmd.arg(flag).arg(p);
            }
            Some(fleet.clone())
        }
        (Transport::Mtls, None) => bail!("an mTLS probe needs certificates issued first"),
    };
    let tag = format!("probe-{transport}");
    let mut server = Process::try_spawn(&tag, &mut cmd, dir.join(format!("{tag}.log")))?;
    poll(Duration::from_secs(10), Duration::from_millis(20), || {
        server.check_alive()?;
        std::io::Result::Ok(
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ()),
        )
    })?
    .context("timed out after 10s waiting for probe-server listening")?;
    // The readiness probe's own connection must be gone before idle is read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.pid();
    let rss_idle = procfs::vm_bytes(pid, "VmRSS")?;
    let cpu0 = procfs::cpu_secs(pid)?;
    let start = Instant::now();
    let mut set = JoinSet::new();
    let ids = vehicle_ids(n);
    for id in ids {
        let tls = fleet.clone().map(|f| (f, id));
        set.spawn(async move {
            // As the ADS clients: a dial the accept queue dropped is retried.
            let mut retries = 0u64;
            loop {
                match client(port, tls.clone(), reply_bytes).await {
                    Ok(s) => return Ok((s, retries)),
                    Err(e) if retries >= 5 => return Err(e),
                    Err(_) => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(100 << retries)).await;
                    }
                }
            }
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut retries = 0;
    while let Some(r) = set.join_next().await {
        let (s, k) = r??;
        held.push(s);
        retries += k;
    }
    let wall = start.elapsed();
    let cpu = procfs::cpu_secs(pid)? - cpu0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.check_alive()?;
    let rss_held = procfs::vm_bytes(pid, "VmRSS")?;
    drop(held);
    Ok(ProbeRow {
        transport,
        conns: n,
        wall,
        cpu,
        rss_idle,
        rss_held,
        retries,
    })
}

fn per_conn_kib(r: &ProbeRow) -> f64 {
    (r.rss_held as f64 - r.rss_idle as f64) / r.conns.max(1) as f64 / 1024.0
}

pub fn print_table(rows: &[ProbeRow], reply_bytes: usize) {
    println!(
        "| bare server (no misaki-cp) | connections | all served (s) | server CPU per 1,000 (s) | server RSS idle → held (MiB) | RSS per connection (KiB) | retries |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.2} | {:.3} | {:.1} → {:.1} | {:.1} | {} |",
            r.transport.as_str(),
            r.conns,
            r.wall.as_secs_f64(),
            r.cpu / r.conns.max(1) as f64 * 1000.0,
            r.rss_idle as f64 / 1048576.0,
            r.rss_held as f64 / 1048576.0,
            per_conn_kib(r),
            r.retries,
        );
    }
    println!();
    println!(
        "Bare server: tokio + (rustls with misaki-cp's server configuration | plain TCP); each connection reads a {REQUEST} B request, writes a {reply_bytes} B reply (what misaki-cp pushed per vehicle on connect), then idles with a read pending. A `rustls::ServerConnection` is {} B inline; while a read is pending its receive buffer is kept at 4 KiB (rustls' read size), its other buffers are empty.",
        std::mem::size_of::<rustls::ServerConnection>()
    );
}

/// `probe-server`'s TLS arguments, when all are given.
pub fn files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    crl: Option<PathBuf>,
) -> Result<Option<ServerFiles>> {
    match (cert, key, client_ca, crl) {
        (None, None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(client_ca), Some(crl)) => Ok(Some(ServerFiles {
            cert,
            key,
            client_ca,
            crl,
            ca_dir: PathBuf::new(),
        })),
        _ => bail!("--tls-cert, --tls-key, --client-ca and --crl go together"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{Connector, Pki};
    use tonic::codegen::Service;

    /// A vehicle's connector gets through misaki-cp's server configuration (client
    /// certificate, CRL, server name) and carries data.
    #[tokio::test]
    async fn a_vehicle_connector_passes_misaki_cps_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, files) = Pki::create(dir.path()).unwrap();
        let fleet = pki.vehicles(&["car-0".to_string()]).unwrap();
        let port = try_free_port().unwrap();
        let server = tokio::spawn(server(port, Some(files), 3000));
        let mut connector = Connector {
            addr: format!("127.0.0.1:{port}"),
            config: fleet.get("car-0").unwrap(),
        };
        let mut io = None;
        for _ in 0..100 {
            match connector.call("http://x".parse().unwrap()).await {
                Ok(s) => {
                    io = Some(s.into_inner());
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let mut io = io.expect("handshake with the probe server");
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        io.write_all(&[1; REQUEST]).await.unwrap();
        let mut reply = vec![0; 3000];
        io.read_exact(&mut reply).await.unwrap();
        server.abort();
    }
}
