use super::*;
use crate::ca::{Ca, Subject};
use time::OffsetDateTime;

/// A CA and a server certificate from it, written under `dir`.
pub(super) struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
    pub files: TlsFiles,
}

pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(
        &dir.path().join("ca"),
        TrustDomain::default(),
        Duration::from_secs(24 * 3600),
    )
    .unwrap();
    let server = dir.path().join("server");
    ca.issue(
        &Subject::Server(vec!["localhost".into()]),
        Duration::from_secs(3600),
    )
    .unwrap()
    .write(&server)
    .unwrap();
    let files = TlsFiles {
        cert: server.join("cert.pem"),
        key: server.join("key.pem"),
        client_ca: server.join("ca.pem"),
        crl: None,
    };
    Fixture { dir, ca, files }
}

#[test]
fn a_consistent_set_loads_and_any_bad_file_is_named() {
    let f = fixture();
    let loaded = load(&f.files).unwrap();
    assert_eq!(loaded.config.alpn_protocols, [b"h2".to_vec()]);
    assert_eq!(loaded.client_cas.len(), 1);
    assert_eq!(load(&f.files).unwrap().fingerprint, loaded.fingerprint);

    // A key from another issue: rustls refuses the pair.
    let other = f.dir.path().join("other");
    f.ca.issue(&Subject::Server(vec!["x".into()]), Duration::from_secs(60))
        .unwrap()
        .write(&other)
        .unwrap();
    let mismatched = TlsFiles {
        key: other.join("key.pem"),
        ..f.files.clone()
    };
    assert!(matches!(load(&mismatched), Err(TlsError::Rustls(_))));

    // Not a CRL, not a certificate, a missing file: each names its path.
    let no_crl = TlsFiles {
        crl: Some(f.files.cert.clone()),
        ..f.files.clone()
    };
    let e = load(&no_crl).unwrap_err().to_string();
    assert!(e.contains("cert.pem") && e.contains("no PEM CRL"), "{e}");
    let no_ca = TlsFiles {
        client_ca: f.files.key.clone(),
        ..f.files.clone()
    };
    assert!(
        load(&no_ca)
            .unwrap_err()
            .to_string()
            .contains("no PEM certificate")
    );
    let missing = TlsFiles {
        cert: f.dir.path().join("nope.pem"),
        ..f.files.clone()
    };
    assert!(load(&missing).unwrap_err().to_string().contains("nope.pem"));
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let f = fixture();
    let now = OffsetDateTime::now_utc();
    let old = f.dir.path().join("old");
    f.ca.issue_between(
        &Subject::Server(vec!["localhost".into()]),
        now - time::Duration::hours(2),
        now - time::Duration::hours(1),
    )
    .unwrap()
    .write(&old)
    .unwrap();
    let files = TlsFiles {
        cert: old.join("cert.pem"),
        key: old.join("key.pem"),
        ..f.files.clone()
    };
    assert!(matches!(load(&files), Err(TlsError::ServerExpired { .. })));
}

#[test]
fn handshake_failures_are_labelled_by_cause() {
    use rustls::CertificateError as C;
    let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let certificate = [
        (C::Expired, "expired"),
        (C::Revoked, "revoked"),
        (C::UnknownIssuer, "unknown_ca"),
        (C::UnknownRevocationStatus, "no_crl"),
        (C::BadSignature, "bad_certificate"),
    ]
    .map(|(c, label)| (tls(rustls::Error::InvalidCertificate(c)), label));
    let cases = certificate.into_iter().chain([
        (
            tls(rustls::Error::NoCertificatesPresented),
            "no_certificate",
        ),
        (tls(rustls::Error::General("x".into())), "protocol"),
        (std::io::ErrorKind::UnexpectedEof.into(), "io"),
    ]);
    for (error, label) in cases {
        assert_eq!(accept::classify(&error), label, "{error}");
    }
}
