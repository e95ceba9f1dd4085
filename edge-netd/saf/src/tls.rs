//! Mutual TLS to `https://` destinations: the vehicle's certificate ([`ClientIdentity`]),
//! the server checked as a cloud identity of the fleet (`CloudVerifier`), and the
//! connector of the forwarder's https pools (the interface-bound TCP connector, then
//! rustls).
//!
//! Invariants:
//! - The server's chain, validity and signatures are always webpki's checks against
//!   `ca_pem`. Its *identity* is its one URI SAN, which must be
//!   `spiffe://<trust domain>/cloud/<name>`, not the URL's host name (the cloud sidecar
//!   has no DNS SAN): a name mismatch is the one webpki error let through, and only for
//!   such a certificate. A matching name alone accepts nothing: a vehicle certificate
//!   carries serverAuth too and must never pass as the cloud.
//! - A [`TlsIdentity`] never changes; a new identity means new rustls configurations
//!   (so no session of the old certificate is resumed) and new pools (the forwarder
//!   drops the old ones).

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::Uri;
use hyper::rt::{Read, Write};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use misaki_identity::{Kind, SpiffeId, TrustDomain};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use crate::config::HttpVersion;

/// The vehicle's credential for `https://` destinations, handed to a running forwarder
/// with [`crate::StoreForward::set_identity`] (or [`crate::StoreForward::follow_identity`]).
///
/// edge-netd builds one from its current credential (the files `tls:` names, or what
/// enrolment and renewal wrote) and hands over a new one whenever the certificate is
/// renewed; new connections use the newest, and connections made with an older one are
/// closed once their requests end. A certificate past its `notAfter` is never used: its
/// connections are closed and https deliveries wait for a renewed one.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The vehicle's certificate, PEM, leaf first (then any intermediates). Its one URI
    /// SAN is `spiffe://<trust_domain>/vehicle/<id>`: the cloud sidecar reads the calling
    /// vehicle from it.
    pub cert_chain_pem: String,
    /// The certificate's private key, PEM (PKCS#8, SEC1 or PKCS#1). `Debug` never shows it.
    pub key_pem: String,
    /// The CA certificates a destination's certificate must chain to (the fleet CA), PEM.
    pub ca_pem: String,
    /// The fleet's trust domain (`misaki.local`): a destination must present
    /// `spiffe://<trust_domain>/cloud/<name>`, and the vehicle's certificate must be of it.
    pub trust_domain: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("trust_domain", &self.trust_domain)
            .field("cert_chain_pem_bytes", &self.cert_chain_pem.len())
            .field("key_pem", &"<redacted>")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .finish()
    }
}

/// Why a [`ClientIdentity`] cannot be used; the forwarder keeps the one it had.
#[derive(Debug, thiserror::Error)]
pub enum ClientIdentityError {
    #[error("trust_domain: {0}")]
    TrustDomain(misaki_identity::IdentityError),
    #[error("cert_chain_pem: {0}")]
    Chain(String),
    #[error("cert_chain_pem: not a vehicle identity of the trust domain: {0}")]
    NotVehicle(String),
    #[error("key_pem: {0}")]
    Key(String),
    #[error("ca_pem: {0}")]
    Ca(String),
    #[error("the key does not fit the certificate, or TLS refused them: {0}")]
    Tls(#[from] rustls::Error),
}

/// A checked [`ClientIdentity`], ready for handshakes: one rustls configuration per ALPN.
#[derive(Debug)]
pub(crate) struct TlsIdentity {
    id: SpiffeId,
    not_after: SystemTime,
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
}

impl TlsIdentity {
    pub(crate) fn load(identity: &ClientIdentity) -> Result<Self, ClientIdentityError> {
        use ClientIdentityError as E;
        let td = TrustDomain::new(&identity.trust_domain).map_err(E::TrustDomain)?;
        let chain = CertificateDer::pem_slice_iter(identity.cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| E::Chain(e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| E::Chain("no PEM certificate in it".into()))?;
        let id = misaki_identity::from_certificate(leaf, &td)
            .map_err(|e| E::NotVehicle(e.to_string()))?;
        if id.kind() != Kind::Vehicle {
            return Err(E::NotVehicle(id.to_string()));
        }
        let not_after = not_after(leaf).map_err(E::Chain)?;
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
            .map_err(|e| E::Key(format!("no PEM private key in it ({e})")))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(identity.ca_pem.as_bytes()) {
            let ca = ca.map_err(|e| E::Ca(e.to_string()))?;
            roots.add(ca).map_err(|e| E::Ca(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(E::Ca("no PEM certificate in it".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| E::Ca(e.to_string()))?;
        let verifier = Arc::new(CloudVerifier {
            webpki,
            trust_domain: td,
        });
        let config = |alpn: &[u8]| -> Result<Arc<ClientConfig>, E> {
            // Checks that the key is the certificate's.
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())?;
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        Ok(Self {
            id,
            not_after,
            http1: config(b"http/1.1")?,
            http2: config(b"h2")?,
        })
    }

    /// The vehicle's SPIFFE ID, as the certificate names it.
    pub(crate) fn id(&self) -> &SpiffeId {
        &self.id
    }

    pub(crate) fn not_after_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    fn config(&self, version: HttpVersion) -> Arc<ClientConfig> {
        match version {
            HttpVersion::Http1 => self.http1.clone(),
            HttpVersion::Http2 => self.http2.clone(),
        }
    }
}

fn not_after(der: &CertificateDer<'_>) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let secs = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// webpki for everything but the name; the name is the cloud SPIFFE ID (module docs).
#[derive(Debug)]
struct CloudVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    trust_domain: TrustDomain,
}

impl ServerCertVerifier for CloudVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name last, after chain, validity and signatures: a name
            // error means all of those passed.
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(without_time(e)),
        }
        let td = &self.trust_domain;
        match misaki_identity::from_certificate(end_entity, td) {
            Ok(id) if id.kind() == Kind::Cloud => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(refused(format!(
                "it is {id}, not a cloud identity (spiffe://{td}/cloud/NAME)"
            ))),
            Err(e) => Err(refused(format!("no cloud identity of {td} in it: {e}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn refused(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        io::Error::other(why),
    ))))
}

/// The same error without the verification time in it, so a failure reads the same on
/// every attempt (the forwarder logs a reason once per change).
fn without_time(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            CertificateError::Expired.into()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            CertificateError::NotValidYet.into()
        }
        other => other,
    }
}

/// A handshake error as one line that says what was wrong.
fn handshake_error(authority: &str, e: io::Error) -> io::Error {
    let why = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) => {
            format!("server certificate refused: {o}")
        }
        Some(r) => r.to_string(),
        None => e.to_string(),
    };
    io::Error::new(
        e.kind(),
        format!("TLS handshake with {authority} failed: {why}"),
    )
}

/// TCP by the given (interface-bound) connector, then a TLS handshake as the vehicle.
#[derive(Clone)]
pub(crate) struct TlsConnector {
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
    handshake_timeout: Duration,
}

impl TlsConnector {
    pub(crate) fn new(
        mut tcp: HttpConnector,
        identity: &TlsIdentity,
        version: HttpVersion,
        handshake_timeout: Duration,
    ) -> Self {
        // It is handed https:// URIs; the TLS is ours, on top of its TCP.
        tcp.enforce_http(false);
        Self {
            tcp,
            tls: tokio_rustls::TlsConnector::from(identity.config(version)),
            handshake_timeout,
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TlsConn>> + Send>>;

impl Service<Uri> for TlsConnector {
    type Response = TlsConn;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        let tls = self.tls.clone();
        let timeout = self.handshake_timeout;
        Box::pin(async move {
            let authority = uri.authority().map_or_else(String::new, |a| a.to_string());
            let host = uri.host().unwrap_or_default();
            // Sent as SNI when it is a DNS name; the certificate need not carry it.
            let name = ServerName::try_from(host.trim_matches(&['[', ']'][..]).to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tcp.call(uri).await.map_err(io::Error::other)?.into_inner();
            let stream = tokio::time::timeout(timeout, tls.connect(name, stream))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("TLS handshake with {authority}: no answer within {timeout:?}"),
                    )
                })?
                .map_err(|e| handshake_error(&authority, e))?;
            Ok(TlsConn(TokioIo::new(stream)))
        })
    }
}

/// An established TLS connection, as hyper's client pool takes it.
pub(crate) struct TlsConn(TokioIo<TlsStream<TcpStream>>);

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let (tcp, session) = self.0.inner().get_ref();
        let connected = tcp.connected();
        if session.alpn_protocol() == Some(b"h2") {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl Read for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    use super::*;

    /// A CA named `name` (a verifier finds an issuer by name: two CAs need two names).
    fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let pem = params.self_signed(&key).unwrap().pem();
        (pem, Issuer::new(params, key))
    }

    /// (certificate PEM, key PEM) with these SANs, clientAuth and serverAuth.
    fn leaf(issuer: &Issuer<'static, KeyPair>, sans: Vec<SanType>) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    fn identity(ca_pem: &str, (cert, key): (String, String)) -> ClientIdentity {
        ClientIdentity {
            cert_chain_pem: cert,
            key_pem: key,
            ca_pem: ca_pem.to_string(),
            trust_domain: "misaki.local".into(),
        }
    }

    #[test]
    fn an_identity_must_be_a_readable_vehicle_certificate_with_its_own_key() {
        let (ca_pem, issuer) = ca("fleet");
        let car = leaf(&issuer, vec![uri("spiffe://misaki.local/vehicle/car-1")]);
        let good = identity(&ca_pem, car.clone());
        let loaded = TlsIdentity::load(&good).unwrap();
        assert_eq!(
            loaded.id().to_string(),
            "spiffe://misaki.local/vehicle/car-1"
        );
        assert!(!loaded.expired(SystemTime::now()));
        assert_eq!(loaded.http2.alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(loaded.http1.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let debug = format!("{good:?}");
        assert!(
            !debug.contains("PRIVATE KEY") && debug.contains("<redacted>"),
            "{debug}"
        );

        let cloud = leaf(&issuer, vec![uri("spiffe://misaki.local/cloud/maps")]);
        let other_key = leaf(&issuer, vec![uri("spiffe://misaki.local/vehicle/car-1")]).1;
        let cases = [
            identity(&ca_pem, cloud),
            identity(&ca_pem, (car.0.clone(), other_key)),
            ClientIdentity {
                ca_pem: "garbage".into(),
                ..good.clone()
            },
            ClientIdentity {
                trust_domain: "Other".into(),
                ..good.clone()
            },
            ClientIdentity {
                trust_domain: "other.local".into(),
                ..good.clone()
            },
            ClientIdentity {
                key_pem: String::new(),
                ..good.clone()
            },
            ClientIdentity {
                cert_chain_pem: String::new(),
                ..good.clone()
            },
        ];
        let errors: Vec<String> = cases
            .iter()
            .map(|c| TlsIdentity::load(c).unwrap_err().to_string())
            .collect();
        assert!(errors[0].contains("cloud/maps"), "{errors:?}");
        assert!(errors[1].starts_with("the key does not fit"), "{errors:?}");
        assert!(errors[2].starts_with("ca_pem"), "{errors:?}");
        assert!(errors[3].starts_with("trust_domain"), "{errors:?}");
        assert!(errors[4].contains("other.local"), "{errors:?}");
        assert!(errors[5].starts_with("key_pem"), "{errors:?}");
        assert!(errors[6].starts_with("cert_chain_pem"), "{errors:?}");
    }

    /// The verifier's answer for a server certificate with `sans`, from `issuer`, dialled
    /// as 127.0.0.1.
    fn verify(
        trusted: &str,
        issuer: &Issuer<'static, KeyPair>,
        sans: Vec<SanType>,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(trusted.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = CloudVerifier {
            webpki: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
            trust_domain: TrustDomain::default(),
        };
        let (cert, _) = leaf(issuer, sans);
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        verifier.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn the_server_is_a_cloud_identity_of_the_fleet_whatever_the_host_name() {
        let (ca_pem, issuer) = ca("fleet");
        let (_, other) = ca("other");
        let ip = SanType::IpAddress("127.0.0.1".parse().unwrap());
        // Accepted: a cloud identity from the fleet CA, no name of the host.
        verify(
            &ca_pem,
            &issuer,
            vec![uri("spiffe://misaki.local/cloud/ingest")],
        )
        .unwrap();
        let refused = |sans: Vec<SanType>, from: &Issuer<'static, KeyPair>| {
            verify(&ca_pem, from, sans).unwrap_err().to_string()
        };
        let cloud = || vec![uri("spiffe://misaki.local/cloud/ingest")];
        let e = refused(cloud(), &other);
        assert!(e.contains("UnknownIssuer"), "{e}");
        let e = refused(vec![uri("spiffe://misaki.local/vehicle/car-9")], &issuer);
        assert!(e.contains("vehicle/car-9, not a cloud identity"), "{e}");
        let e = refused(vec![uri("spiffe://other.local/cloud/ingest")], &issuer);
        assert!(e.contains("other.local"), "{e}");
        // The dialled name alone is no identity.
        let e = refused(vec![ip.clone()], &issuer);
        assert!(e.contains("no cloud identity"), "{e}");
        let e = refused(
            vec![
                ip,
                uri("spiffe://misaki.local/cloud/a"),
                uri("spiffe://misaki.local/cloud/b"),
            ],
            &issuer,
        );
        assert!(e.contains("2 URI SANs"), "{e}");
    }
}
