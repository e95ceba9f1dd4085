//! Certificates and keys as edge-netd needs them: a certificate's validity, identity
//! and public key; whether a key is the certificate's; a new key pair and its CSR.
//! Pure (no I/O, no clock): the caller says what "now" is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use misaki_identity::{Kind, SpiffeId};
use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::extensions::GeneralName;

use super::Credential;

/// What edge-netd reads from a certificate (the first in a PEM chain: the leaf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Its one URI SAN, as a SPIFFE ID (any trust domain).
    pub id: SpiffeId,
    /// The subject public key's bits (for EC keys, the point).
    pub public_key: Vec<u8>,
}

fn unix(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// Read the leaf certificate of `pem`.
pub(crate) fn cert_info(pem: &str) -> Result<CertInfo, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    if block.label != "CERTIFICATE" {
        return Err(format!("expected a CERTIFICATE, found {}", block.label));
    }
    let cert = block
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "expected one URI SAN (a SPIFFE ID), found {}",
            uris.len()
        ));
    };
    let id = SpiffeId::parse(uri).map_err(|e| e.to_string())?;
    Ok(CertInfo {
        not_before: unix(cert.validity().not_before.timestamp()),
        not_after: unix(cert.validity().not_after.timestamp()),
        id,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// The public key bits of a PKCS#8 PEM private key.
pub(crate) fn key_public(pem: &str) -> Result<Vec<u8>, String> {
    let key = KeyPair::from_pem(pem).map_err(|e| format!("not a PKCS#8 PEM private key: {e}"))?;
    Ok(key.public_key_raw().to_vec())
}

/// Whether `key_pem` is the private key of `cert_pem` (false if either does not parse).
pub(crate) fn is_pair(cert_pem: &str, key_pem: &str) -> bool {
    match (cert_info(cert_pem), key_public(key_pem)) {
        (Ok(c), Ok(k)) => c.public_key == k,
        _ => false,
    }
}

/// Why a certificate and key cannot be used as this vehicle's credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unusable {
    #[error("unreadable certificate: {0}")]
    Cert(String),
    #[error("unreadable key: {0}")]
    Key(String),
    #[error("the key is not the certificate's")]
    KeyMismatch,
    #[error("the certificate is {0}, not this vehicle's identity")]
    NotThisVehicle(String),
    #[error("the certificate expired at {} (unix)", unix_secs(*.0))]
    Expired(SystemTime),
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The credential, if `cert_pem` and `key_pem` are a pair naming
/// `spiffe://*/vehicle/<vehicle_id>` that has not expired at `now`. Never a
/// certificate whose public key is not the key's.
pub(crate) fn check(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    vehicle_id: &str,
    now: SystemTime,
) -> Result<Credential, Unusable> {
    let info = cert_info(cert_pem).map_err(Unusable::Cert)?;
    let key = key_public(key_pem).map_err(Unusable::Key)?;
    if info.public_key != key {
        return Err(Unusable::KeyMismatch);
    }
    if info.id.kind() != Kind::Vehicle || info.id.name() != vehicle_id {
        return Err(Unusable::NotThisVehicle(info.id.to_string()));
    }
    if now >= info.not_after {
        return Err(Unusable::Expired(info.not_after));
    }
    Ok(Credential {
        cert_pem: cert_pem.to_owned(),
        key_pem: key_pem.to_owned(),
        ca_pem: ca_pem.to_owned(),
        spiffe_id: info.id.to_string(),
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

/// A new ECDSA P-256 key pair, made here: the private key never leaves the vehicle.
pub(crate) fn new_key() -> Result<KeyPair, String> {
    KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))
}

/// A PKCS#10 CSR (PEM) for `id`, signed by `key`. misaki-cp uses only its public key
/// (and sets the SAN itself); the SAN here says what is asked for.
pub(crate) fn csr(key: &KeyPair, id: &SpiffeId) -> Result<String, String> {
    let mut params = CertificateParams::default();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e| format!("{id}: {e}"))?;
    params.subject_alt_names.push(SanType::URI(uri));
    let request = params
        .serialize_request(key)
        .map_err(|e| format!("cannot make the CSR: {e}"))?;
    request
        .pem()
        .map_err(|e| format!("cannot encode the CSR: {e}"))
}

/// `spiffe://TD/vehicle/<vehicle_id>` in the trust domain of `like` (the claim's, or
/// the current certificate's).
pub(crate) fn vehicle_id_like(like: &SpiffeId, vehicle_id: &str) -> Result<SpiffeId, String> {
    SpiffeId::new(like.trust_domain().clone(), Kind::Vehicle, vehicle_id).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::testkit::TestCa;
    use super::*;
    use rcgen::PublicKeyData;

    const CAR1: &str = "spiffe://misaki.local/vehicle/car-1";
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_pair_for_this_vehicle_that_has_not_expired_is_usable() {
        let ca = TestCa::new();
        let (cert, key) = ca.issue_now(CAR1, DAY);
        let now = SystemTime::now();
        let c = check(&cert, &key, &ca.pem(), "car-1", now).unwrap();
        assert_eq!(c.spiffe_id, CAR1);
        assert!(c.not_after > now + DAY - Duration::from_secs(5));
        assert!(c.not_before < now);
        assert_eq!((c.cert_pem, c.key_pem, c.ca_pem), (cert, key, ca.pem()));
    }

    #[test]
    fn every_reason_not_to_use_a_pair_is_named() {
        let ca = TestCa::new();
        let now = SystemTime::now();
        let (cert, key) = ca.issue_now(CAR1, DAY);
        let (other_cert, other_key) = ca.issue_now(CAR1, DAY);
        let chk = |c: &str, k: &str, id: &str, at| check(c, k, "", id, at).unwrap_err();
        assert_eq!(chk(&cert, &other_key, "car-1", now), Unusable::KeyMismatch);
        assert_eq!(chk(&other_cert, &key, "car-1", now), Unusable::KeyMismatch);
        assert_eq!(
            chk(&cert, &key, "car-2", now),
            Unusable::NotThisVehicle(CAR1.into())
        );
        let (claim, claim_key) = ca.issue_now("spiffe://misaki.local/claim/car-1", DAY);
        assert!(matches!(
            chk(&claim, &claim_key, "car-1", now),
            Unusable::NotThisVehicle(_)
        ));
        let info = cert_info(&cert).unwrap();
        assert_eq!(
            chk(&cert, &key, "car-1", info.not_after),
            Unusable::Expired(info.not_after),
            "expired at not_after itself"
        );
        assert!(matches!(
            chk("garbage", &key, "car-1", now),
            Unusable::Cert(_)
        ));
        assert!(matches!(chk(&cert, &cert, "car-1", now), Unusable::Key(_)));
        // No SPIFFE ID, or two: no identity.
        let (two, two_key) = {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::default();
            for u in [CAR1, "spiffe://misaki.local/vehicle/car-2"] {
                p.subject_alt_names
                    .push(SanType::URI(u.try_into().unwrap()));
            }
            (p.self_signed(&key).unwrap().pem(), key.serialize_pem())
        };
        let e = chk(&two, &two_key, "car-1", now);
        assert!(
            matches!(&e, Unusable::Cert(m) if m.contains("found 2")),
            "{e}"
        );
    }

    #[test]
    fn a_csr_carries_the_key_and_asks_for_the_vehicle_in_the_claims_trust_domain() {
        let claim = SpiffeId::parse("spiffe://fleet.example/claim/car-1").unwrap();
        let id = vehicle_id_like(&claim, "car-1").unwrap();
        assert_eq!(id.to_string(), "spiffe://fleet.example/vehicle/car-1");
        let key = new_key().unwrap();
        let pem = csr(&key, &id).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        assert_eq!(parsed.public_key.der_bytes(), key.public_key_raw());
        assert_eq!(
            parsed.params.subject_alt_names,
            vec![SanType::URI(id.to_string().try_into().unwrap())]
        );
        // The key is not in it.
        assert!(!pem.contains("PRIVATE KEY"));
        assert_eq!(
            key_public(&key.serialize_pem()).unwrap(),
            key.public_key_raw()
        );
    }

    #[test]
    fn the_key_is_kept_out_of_debug_output() {
        let ca = TestCa::new();
        let (cert, key) = ca.issue_now(CAR1, DAY);
        let c = check(&cert, &key, "", "car-1", SystemTime::now()).unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains(CAR1) && shown.contains("redacted"),
            "{shown}"
        );
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        let body = key.lines().nth(1).unwrap();
        assert!(!shown.contains(body), "{shown}");
    }
}
