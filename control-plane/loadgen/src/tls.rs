//! Mutual TLS to misaki-cp, as a fleet dials it: one client certificate per vehicle.
//!
//! misaki-cp refuses an xDS stream whose node is not the vehicle in its client
//! certificate, so simulated vehicle `car-7` needs a certificate for
//! `spiffe://<trust domain>/vehicle/car-7`. They come from misaki-cp's own CA code
//! (`misaki_cp::ca`, what `misaki-cp ca issue` runs), in process, before anything is
//! timed: issuing 10,000 takes seconds, not the benchmark's time.
//!
//! Client side, chosen so each connection costs misaki-cp what a vehicle's costs:
//! - one rustls `ClientConfig` per vehicle (its own certificate and key), all sharing
//!   the trust anchors and the crypto provider (ring, as misaki-cp);
//! - session resumption off: every connection, retries included, is a full handshake
//!   with a certificate check (misaki-cp resumes nothing either);
//! - ALPN `h2`, the server name checked against misaki-cp's certificate (an IP SAN
//!   for 127.0.0.1);
//! - our own connector (TCP, then rustls) under tonic, over an `http://` URI: tonic's
//!   `ClientTlsConfig` cannot turn resumption off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use hyper_util::rt::TokioIo;
use misaki_cp::ca::{Ca, Subject};
use misaki_identity::TrustDomain;
use rustls::RootCertStore;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::Service;
use tonic::transport::Uri;

/// How long the benchmark's certificates are valid: a run, with a wide margin.
const VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Files `misaki-cp serve` needs for mutual TLS, all from one fresh CA.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: PathBuf,
    pub ca_dir: PathBuf,
}

impl ServerFiles {
    /// `serve` arguments for these files.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a = Vec::new();
        for (flag, path) in [
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
            ("--client-ca", &self.client_ca),
            ("--crl", &self.crl),
            ("--ca", &self.ca_dir),
        ] {
            a.push(flag.into());
            a.push(path.into());
        }
        a
    }
}

/// A fleet CA and the trust every vehicle puts in misaki-cp's certificate.
#[derive(Debug)]
pub struct Pki {
    ca: Ca,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

fn roots_from(ca_pem: &[u8], what: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.with_context(|| format!("{}: bad PEM", what.display()))?)
            .with_context(|| format!("{}: not a usable trust anchor", what.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate in it", what.display());
    }
    Ok(Arc::new(roots))
}

impl Pki {
    /// A new CA in `dir/ca` (trust domain `misaki.local`) and misaki-cp's certificate
    /// for `localhost` and 127.0.0.1 in `dir/server`, as `ca init` and
    /// `ca issue --server` make them.
    pub fn create(dir: &Path) -> Result<(Pki, ServerFiles)> {
        let ca_dir = dir.join("ca");
        let ca = Ca::init(&ca_dir, TrustDomain::default(), VALIDITY * 2)
            .with_context(|| format!("creating a CA in {}", ca_dir.display()))?;
        let server = dir.join("server");
        ca.issue(
            &Subject::Server(vec!["localhost".into(), "127.0.0.1".into()]),
            VALIDITY,
        )?
        .write(&server)?;
        let files = ServerFiles {
            cert: server.join("cert.pem"),
            key: server.join("key.pem"),
            client_ca: ca_dir.join("ca.pem"),
            crl: ca_dir.join("crl.pem"),
            ca_dir,
        };
        Ok((Pki::load(&files.ca_dir)?, files))
    }

    /// The CA in `dir` (`misaki-cp ca init DIR`); vehicles trust its `ca.pem`.
    pub fn load(dir: &Path) -> Result<Pki> {
        let ca = Ca::load(dir).with_context(|| format!("loading the CA in {}", dir.display()))?;
        let ca_pem = dir.join(misaki_cp::ca::CA_CERT);
        let roots = roots_from(&std::fs::read(&ca_pem)?, &ca_pem)?;
        Ok(Pki {
            ca,
            roots,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// A client configuration for vehicle `id`: its own new key and certificate.
    fn vehicle(&self, id: &str) -> Result<Arc<rustls::ClientConfig>> {
        let issued = self.ca.issue(&Subject::Vehicle(id.to_string()), VALIDITY)?;
        let cert = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(vec![cert], key)?;
        config.resumption = Resumption::disabled();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client configurations for `ids`, issued on every core (this runs before the
    /// measurement, so using them all costs the benchmark nothing).
    pub fn vehicles(&self, ids: &[String]) -> Result<FleetTls> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = ids.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<Issued>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|id| Ok((id.clone(), self.vehicle(id)?)))
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("issuing thread panicked"))
                .collect()
        });
        let mut configs = HashMap::with_capacity(ids.len());
        for part in parts {
            configs.extend(part?);
        }
        Ok(FleetTls { configs })
    }
}

/// A vehicle's id and its client configuration.
type Issued = (String, Arc<rustls::ClientConfig>);

/// Every simulated vehicle's client configuration, by node id (= vehicle id).
#[derive(Debug, Default)]
pub struct FleetTls {
    configs: HashMap<String, Arc<rustls::ClientConfig>>,
}

impl FleetTls {
    pub fn get(&self, id: &str) -> Result<Arc<rustls::ClientConfig>> {
        self.configs
            .get(id)
            .cloned()
            .with_context(|| format!("no client certificate issued for vehicle {id:?}"))
    }
}

/// TCP to `addr`, then a TLS handshake as `config`'s vehicle: what tonic dials through
/// (`Endpoint::connect_with_connector`).
#[derive(Debug, Clone)]
pub struct Connector {
    pub addr: String,
    pub config: Arc<rustls::ClientConfig>,
}

impl Connector {
    /// The name misaki-cp's certificate must carry: the host part of `addr`.
    fn server_name(&self) -> std::io::Result<ServerName<'static>> {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    }
}

type Connecting =
    Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let name = this.server_name()?;
            let tcp = TcpStream::connect(&this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(this.config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_one_certificate_per_vehicle_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, files) = Pki::create(dir.path()).unwrap();
        assert!(files.cert.is_file() && files.crl.is_file());
        let ids: Vec<String> = (0..5).map(|i| format!("car-{i}")).collect();
        let fleet = pki.vehicles(&ids).unwrap();
        let a = fleet.get("car-0").unwrap();
        let b = fleet.get("car-4").unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(fleet.get("car-5").is_err());
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec()]);
        let issued = pki
            .ca
            .issue(&Subject::Vehicle("car-9".into()), VALIDITY)
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        let id = misaki_identity::from_certificate(&der, &TrustDomain::default()).unwrap();
        assert_eq!(id.to_string(), "spiffe://misaki.local/vehicle/car-9");
    }

    #[test]
    fn server_name_is_the_host_of_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, _) = Pki::create(dir.path()).unwrap();
        let config = pki.vehicle("car-1").unwrap();
        let c = |addr: &str| Connector {
            addr: addr.into(),
            config: config.clone(),
        };
        assert_eq!(
            c("127.0.0.1:18000").server_name().unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            c("cp.fleet.example:443").server_name().unwrap(),
            ServerName::try_from("cp.fleet.example").unwrap()
        );
    }
}
