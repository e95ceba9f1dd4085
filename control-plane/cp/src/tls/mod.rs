//! Mutual TLS on misaki-cp's gRPC port (`serve --tls-cert --tls-key --client-ca
//! [--crl]`; docs/security.md).
//!
//! tonic's own TLS configuration is fixed when the server starts, so misaki-cp
//! terminates TLS itself (rustls) and hands tonic finished connections through
//! `misaki_xds::serve_incoming`:
//!
//! ```text
//! TcpIncoming ─▶ accept loop ─(one of --max-handshakes permits)─▶ handshake task (--handshake-timeout)
//!   ─▶ TlsConn { TLS stream, TlsPeer, kill switch } ─▶ tonic: every request carries the TlsPeer
//! ```
//!
//! Invariants:
//! - a connection reaches tonic only after a complete handshake in which the client
//!   presented a certificate that chains to `--client-ca`, is within its validity and
//!   is not on the CRL; plaintext, garbage and other CAs' certificates never do;
//! - at most `--max-handshakes` handshakes run at once, each for at most
//!   `--handshake-timeout`; further connections wait in the kernel's accept queue;
//!   handshakes run in their own tasks, so established streams never wait on them;
//! - the files are re-read when they change ([`reload`]); a set that does not load
//!   (unreadable, key not matching the certificate, expired server certificate, bad
//!   CRL) is refused whole and the previous one keeps serving;
//! - a reload never closes a connection whose client certificate still verifies under
//!   the new CA and CRL; one that no longer does (revoked, CA rotated away) is closed,
//!   and so is one whose certificate expires while it is connected ([`conn`]);
//! - no TLS session resumption: every connection's certificate is verified in full,
//!   against the CA and CRL in force when it connects;
//! - identities are read once per connection ([`misaki_identity::from_certificate`]);
//!   what a stream may do is decided per stream by the xDS and fleet services.
//!
//! Metrics (`misaki_tls_*`): `handshakes_total{result}` (ok, timeout, expired, revoked,
//! unknown_ca, no_crl, no_certificate, bad_certificate, not_yet_valid, protocol,
//! peer_alert, io), `handshakes_in_flight`, `connections`, `connections_closed_total{reason}`
//! (revoked, untrusted, expired: closed by the control plane), `reloads_total{result}`.

mod accept;
mod conn;
mod reload;

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use misaki_identity::TrustDomain;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::RootCertStore;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::sync::watch;

pub use accept::Incoming;
pub use conn::TlsConn;

use crate::cli::TlsArgs;

/// The files `serve` was given.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The files named by `args`, if TLS is on.
    pub fn from_args(args: &TlsArgs) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: args.tls_cert.clone()?,
            key: args.tls_key.clone()?,
            client_ca: args.client_ca.clone()?,
            crl: args.crl.clone(),
        })
    }

    fn all(&self) -> impl Iterator<Item = &Path> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .chain(self.crl.as_ref())
            .map(PathBuf::as_path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{path}: the server certificate expired at {not_after}")]
    ServerExpired { path: PathBuf, not_after: String },
    #[error("client CA / CRL: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("server certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_err(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// One consistent set of certificates, key, CA and CRL, ready to serve.
pub(crate) struct Loaded {
    pub config: Arc<rustls::ServerConfig>,
    /// The client verifier inside `config`, kept to re-check live connections.
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// A hash of the files' bytes: an event that changed nothing reloads nothing.
    pub fingerprint: u64,
    /// A hash of the client CAs and CRLs alone: live connections are verified again
    /// only when these change (a new server certificate leaves them valid).
    pub trust_fingerprint: u64,
    /// The trust anchors (`--client-ca`), to check that `--ca` is one of them.
    pub client_cas: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, hasher: &mut impl Hasher) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    bytes.hash(hasher);
    Ok(bytes)
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Refuse a server certificate that has expired: the server could serve no one.
fn check_not_expired(path: &Path, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).map_err(|e| file_err(path, e))?;
    let not_after = x509.validity().not_after;
    let expired = not_after.timestamp()
        < SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if expired {
        return Err(TlsError::ServerExpired {
            path: path.to_path_buf(),
            not_after: not_after.to_string(),
        });
    }
    Ok(())
}

/// Read and check every file; build the rustls configuration.
pub(crate) fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let chain = certs(&files.cert, &read(&files.cert, &mut hasher)?)?;
    check_not_expired(&files.cert, &chain[0])?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key, &mut hasher)?)
        .map_err(|e| file_err(&files.key, format!("no PEM private key: {e}")))?;
    let client_cas = certs(&files.client_ca, &read(&files.client_ca, &mut hasher)?)?;
    let mut roots = RootCertStore::empty();
    for ca in &client_cas {
        roots
            .add(ca.clone())
            .map_err(|e| file_err(&files.client_ca, e))?;
    }
    let crls = match &files.crl {
        Some(path) => {
            let pem = read(path, &mut hasher)?;
            let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err(path, e))?;
            if crls.is_empty() {
                return Err(file_err(path, "no PEM CRL in it"));
            }
            crls
        }
        None => Vec::new(),
    };
    let mut trust = std::collections::hash_map::DefaultHasher::new();
    client_cas.hash(&mut trust);
    crls.hash(&mut trust);
    let trust_fingerprint = trust.finish();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        // Only the client's own certificate: a brought CA's intermediates are covered
        // by its root's CRL, which an operator may not have. A client whose issuer has
        // no CRL in the file is refused (unknown status), never let through.
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Loaded {
        config: Arc::new(config),
        verifier,
        fingerprint: hasher.finish(),
        trust_fingerprint,
        client_cas,
    })
}

/// Label values of `misaki_tls_*` metrics.
type Label = [(&'static str, &'static str); 1];

#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics {
    handshakes: Family<Label, Counter>,
    in_flight: Gauge,
    connections: Gauge,
    closed: Family<Label, Counter>,
    reloads: Family<Label, Counter>,
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("misaki_tls");
        r.register(
            "handshakes",
            "TLS handshakes on the gRPC port, by result (ok, or why it failed)",
            self.handshakes.clone(),
        );
        r.register(
            "handshakes_in_flight",
            "TLS handshakes in progress",
            self.in_flight.clone(),
        );
        r.register(
            "connections",
            "Established TLS connections on the gRPC port",
            self.connections.clone(),
        );
        r.register(
            "connections_closed",
            "TLS connections the control plane closed because their client certificate stopped being valid, by reason",
            self.closed.clone(),
        );
        r.register(
            "reloads",
            "Reloads of the TLS files, by result (ok, error)",
            self.reloads.clone(),
        );
    }

    fn handshake(&self, result: &'static str) {
        self.handshakes.get_or_create(&[("result", result)]).inc();
    }

    fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&[("reason", reason)]).inc();
    }

    fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&[("result", result)]).inc();
    }
}

/// Limits on the handshakes of the TLS port.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
}

/// mTLS for the gRPC port: the configuration in force, the live connections and the
/// metrics. Load it before binding anything ([`TlsServer::load`]), then
/// [`TlsServer::incoming`] wraps the port's TCP connections.
#[derive(Debug)]
pub struct TlsServer {
    files: TlsFiles,
    trust_domain: TrustDomain,
    limits: Limits,
    current: watch::Sender<Arc<Loaded>>,
    live: conn::LiveConns,
    metrics: Metrics,
}

impl TlsServer {
    /// Load the files once (an error here is a configuration error: exit 64).
    pub fn load(
        files: TlsFiles,
        trust_domain: TrustDomain,
        limits: Limits,
    ) -> Result<Self, TlsError> {
        let loaded = load(&files)?;
        let metrics = Metrics::default();
        Ok(TlsServer {
            files,
            trust_domain,
            limits,
            current: watch::channel(Arc::new(loaded)).0,
            live: conn::LiveConns::new(metrics.clone()),
            metrics,
        })
    }

    /// Whether `ca` (a certificate, DER) is one of the `--client-ca` trust anchors.
    pub fn trusts(&self, ca: &CertificateDer<'_>) -> bool {
        self.current
            .borrow()
            .client_cas
            .iter()
            .any(|c| c.as_ref() == ca.as_ref())
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// TLS connections from `tcp`, handshaken under the configuration in force; and
    /// the task that re-reads the files and expires connections until `shutdown`.
    pub fn incoming(
        &self,
        tcp: tonic::transport::server::TcpIncoming,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (
        Incoming,
        tokio::task::JoinHandle<Result<(), crate::watcher::WatchError>>,
    ) {
        let acceptor = accept::Acceptor {
            config: self.current.subscribe(),
            trust_domain: self.trust_domain.clone(),
            limits: self.limits,
            live: self.live.clone(),
            metrics: self.metrics.clone(),
        };
        let task = tokio::spawn(reload::run(
            self.files.clone(),
            self.current.clone(),
            self.live.clone(),
            self.metrics.clone(),
            shutdown,
        ));
        (acceptor.incoming(tcp), task)
    }
}

#[cfg(test)]
pub(crate) mod tests;
