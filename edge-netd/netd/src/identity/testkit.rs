//! A fleet CA for tests (rcgen, in memory): certificates with any SPIFFE ID and
//! validity, over a given or a new key. Uses nothing of `identity`, so every module's
//! tests can use it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};

/// Whole seconds: X.509 times have no fractions, so tests compare like with like.
pub(crate) fn secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap().as_secs())
}

pub(crate) struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

impl TestCa {
    pub(crate) fn new() -> TestCa {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `uri` over `key`, valid between the two instants.
    pub(crate) fn sign(
        &self,
        uri: &str,
        key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> String {
        let mut params = CertificateParams::default();
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        params.signed_by(key, &self.issuer).unwrap().pem()
    }

    /// A new key and its certificate for `uri`: (cert PEM, key PEM).
    pub(crate) fn issue(
        &self,
        uri: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        (
            self.sign(uri, &key, not_before, not_after),
            key.serialize_pem(),
        )
    }

    /// Valid from an hour ago for `valid_for` from now (real time).
    pub(crate) fn issue_now(&self, uri: &str, valid_for: Duration) -> (String, String) {
        let now = secs(SystemTime::now());
        self.issue(uri, now - Duration::from_secs(3600), now + valid_for)
    }
}
