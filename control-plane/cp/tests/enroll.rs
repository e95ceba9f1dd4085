//! Certificate enrolment (`misaki.fleet.v1.EnrollmentService`) on misaki-cp's mutual-TLS
//! gRPC port, in process, against real gRPC clients: the vehicle's key and CSR are made
//! here with rcgen (as edge-netd makes them), the claim, vehicle and cloud certificates
//! with misaki-cp's CA code, and records and revocations are the CA directory's files.

mod common;

use std::path::{Path, PathBuf};

use common::{Cp, Pki, car, start, start_with};
use misaki_cp::ca::Subject;
use misaki_cp::cli::TlsArgs;
use misaki_identity::TrustDomain;
use misaki_proto::fleet_v1 as pb;
use pb::enrollment_service_client::EnrollmentServiceClient;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// `serve --enrol-valid-for` in these tests (`Pki::tls_args`).
const VALID_FOR: i64 = 3600;

/// A CSR for `key` that asks for the URI SAN `uri` (which misaki-cp must ignore).
fn csr(key: &KeyPair, uri: &str) -> String {
    let mut params = rcgen::CertificateParams::default();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(uri.try_into().unwrap()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "please make me car-2");
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn car_csr(key: &KeyPair) -> String {
    csr(key, "spiffe://misaki.local/vehicle/car-1")
}

/// The CA directory's `crl.pem`, which `ca revoke` rewrites: enrolment needs `--crl`.
fn crl(pki: &Pki) -> Option<PathBuf> {
    Some(pki.path("ca/crl.pem"))
}

async fn enrol_on(channel: Channel, csr_pem: String) -> Result<pb::EnrollResponse, Status> {
    let request = pb::EnrollRequest { csr_pem };
    let response = EnrollmentServiceClient::new(channel)
        .enroll(request)
        .await?;
    Ok(response.into_inner())
}

/// Enrol over TLS with the certificate in `pki/<client>`.
async fn enrol(
    cp: &Cp,
    pki: &Pki,
    client: &str,
    csr_pem: String,
) -> Result<pb::EnrollResponse, Status> {
    let channel = cp.channel(pki, Some(&pki.path(client))).await.unwrap();
    enrol_on(channel, csr_pem).await
}

/// Install an enrolled certificate with its key in `pki/<name>`, as a client identity.
fn install(pki: &Pki, name: &str, issued: &pb::EnrollResponse, key: &KeyPair) -> PathBuf {
    let dir = pki.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), &issued.certificate_pem).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    dir
}

fn serial(dir: &Path) -> String {
    misaki_cp::ca::serial_of(&dir.join("cert.pem")).unwrap()
}

/// The certificate is for `vehicle` (one URI SAN), over `key`, signed by the fleet CA,
/// client and server, valid for `--enrol-valid-for` (plus the backdating).
fn check_issued(pki: &Pki, issued: &pb::EnrollResponse, key: &KeyPair, vehicle: &str) {
    let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.public_key().raw, key.subject_public_key_info());
    let (_, ca) = x509_parser::parse_x509_certificate(pki.ca.cert_der()).unwrap();
    cert.verify_signature(Some(ca.public_key()))
        .expect("signed by the fleet CA");
    let id = misaki_identity::from_certificate(&der, &TrustDomain::default()).unwrap();
    let want = format!("spiffe://misaki.local/vehicle/{vehicle}");
    assert_eq!((id.to_string(), &issued.spiffe_id), (want.clone(), &want));
    let eku = cert.extended_key_usage().unwrap().expect("an EKU").value;
    assert!(eku.client_auth && eku.server_auth, "{eku:?}");
    assert_eq!(cert.validity().not_after.timestamp(), issued.not_after_unix);
    assert_eq!(
        cert.validity().not_before.timestamp(),
        issued.not_before_unix
    );
    let skew = i64::try_from(misaki_cp::ca::CLOCK_SKEW.as_secs()).unwrap();
    assert_eq!(
        issued.not_after_unix - issued.not_before_unix,
        VALID_FOR + skew
    );
    assert_eq!(issued.ca_pem, pki.ca.cert_pem());
}

fn record(pki: &Pki, vehicle: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(pki.path(&format!("ca/enrolled/{vehicle}.json")))
        .expect("an enrolment record");
    serde_json::from_str(&text).unwrap()
}

fn assert_denied(status: &Status, code: Code, says: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for s in says {
        assert!(status.message().contains(s), "{s:?} not in {status:?}");
    }
}

async fn counted(cp: &Cp, caller: &str, result: &str) -> u64 {
    let series = format!("misaki_enrolments_total{{caller=\"{caller}\",result=\"{result}\"}}");
    cp.metric(&series).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_enrols_its_vehicle_once_and_the_certificate_fetches_config_as_that_vehicle() {
    let pki = Pki::new();
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    let cp = start(&pki, crl(&pki)).await;

    // The CSR asks for car-2; the claim credential is car-1's.
    let key = KeyPair::generate().unwrap();
    let wants_car_2 = csr(&key, "spiffe://misaki.local/vehicle/car-2");
    let issued = enrol(&cp, &pki, "claim-1", wants_car_2.clone())
        .await
        .expect("the claim enrols its vehicle");
    check_issued(&pki, &issued, &key, "car-1");
    let dir = install(&pki, "car-1", &issued, &key);
    let _ads = car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("the enrolled certificate fetches car-1's config");

    let rec = record(&pki, "car-1");
    let first = &rec["certificates"][0];
    assert_eq!(first["serial"], serial(&dir).as_str(), "{rec}");
    assert_eq!(first["how"], "claim");
    assert_eq!(first["caller"], "spiffe://misaki.local/claim/car-1");

    // The answer lost on the way: the same key gets the same certificate, no second one.
    let again = enrol(&cp, &pki, "claim-1", wants_car_2).await.unwrap();
    assert_eq!(again.certificate_pem, issued.certificate_pem);
    assert_eq!(
        record(&pki, "car-1")["certificates"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Another key: car-1 holds a live certificate, the claim is spent.
    let other = KeyPair::generate().unwrap();
    let e = enrol(&cp, &pki, "claim-1", car_csr(&other))
        .await
        .expect_err("a second live identity");
    let says = [serial(&dir), "renew with it, or revoke it first".into()];
    let says: Vec<&str> = says.iter().map(String::as_str).collect();
    assert_denied(&e, Code::PermissionDenied, &says);
    assert_eq!(counted(&cp, "claim", "issued").await, 2);
    assert_eq!(counted(&cp, "claim", "denied").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vehicle_renews_and_its_claim_enrols_again_once_every_certificate_is_revoked() {
    let pki = Pki::new();
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    let cp = start(&pki, crl(&pki)).await;
    let first_key = KeyPair::generate().unwrap();
    let first = enrol(&cp, &pki, "claim-1", car_csr(&first_key))
        .await
        .unwrap();
    let first = install(&pki, "car-1", &first, &first_key);

    // Renewal with the enrolled certificate, a new key, whatever the CSR asks for.
    let key = KeyPair::generate().unwrap();
    let wants_car_2 = csr(&key, "spiffe://misaki.local/vehicle/car-2");
    let renewed = enrol(&cp, &pki, "car-1", wants_car_2)
        .await
        .expect("the vehicle renews");
    check_issued(&pki, &renewed, &key, "car-1");
    let second = install(&pki, "car-1-renewed", &renewed, &key);
    let _ads = car(&cp, &pki, "car-1-renewed", "car-1")
        .await
        .expect("the renewed certificate fetches car-1's config");
    assert_eq!(record(&pki, "car-1")["certificates"][1]["how"], "renew");

    // Both are live: the claim is refused, naming both.
    let (a, b) = (serial(&first), serial(&second));
    let claim =
        || async { enrol(&cp, &pki, "claim-1", car_csr(&KeyPair::generate().unwrap())).await };
    let e = claim().await.expect_err("two live certificates");
    assert_denied(
        &e,
        Code::PermissionDenied,
        &[&a, &b, "revoke them all first"],
    );
    // Revoking the newest leaves the first live.
    pki.ca.revoke(&b).unwrap();
    let e = claim().await.expect_err("the first is still live");
    assert_denied(&e, Code::PermissionDenied, &[&a, "revoke it first"]);
    assert!(!e.message().contains(&b), "{e:?}");
    pki.ca.revoke(&a).unwrap();
    let third = claim().await.expect("nothing live: the claim enrols again");
    assert_eq!(third.spiffe_id, "spiffe://misaki.local/vehicle/car-1");
    assert_eq!(counted(&cp, "vehicle", "issued").await, 1);
    assert_eq!(counted(&cp, "claim", "issued").await, 2);
    assert_eq!(counted(&cp, "claim", "denied").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_claims_cannot_both_win_and_the_record_outlives_a_restart() {
    let pki = Pki::new();
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    let cp = start(&pki, crl(&pki)).await;
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(cp.channel(&pki, Some(&pki.path("claim-1"))).await.unwrap());
    }
    let tries = channels.into_iter().map(|ch| {
        let csr_pem = car_csr(&KeyPair::generate().unwrap());
        tokio::spawn(enrol_on(ch, csr_pem))
    });
    let results = futures::future::join_all(tries).await;
    let won = results
        .iter()
        .filter(|r| r.as_ref().unwrap().is_ok())
        .count();
    assert_eq!(won, 1, "{results:?}");
    for r in results {
        if let Err(e) = r.unwrap() {
            assert_denied(&e, Code::PermissionDenied, &["revoke it first"]);
        }
    }

    // Another control plane on the same CA directory still knows.
    drop(cp);
    let cp = start(&pki, crl(&pki)).await;
    let e = enrol(&cp, &pki, "claim-1", car_csr(&KeyPair::generate().unwrap()))
        .await
        .expect_err("refused after a restart");
    assert_denied(&e, Code::PermissionDenied, &["revoke it first"]);

    // Once the recorded certificate has expired, the claim enrols again.
    let path = pki.path("ca/enrolled/car-1.json");
    let mut rec = record(&pki, "car-1");
    let expired = time::OffsetDateTime::now_utc().unix_timestamp() - 1;
    rec["certificates"][0]["not_after"] = expired.into();
    std::fs::write(&path, rec.to_string()).unwrap();
    enrol(&cp, &pki, "claim-1", car_csr(&KeyPair::generate().unwrap()))
        .await
        .expect("the recorded certificate expired");
    let certs = record(&pki, "car-1")["certificates"].clone();
    assert_eq!(
        certs.as_array().unwrap().len(),
        1,
        "the expired one dropped: {certs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_claims_and_vehicles_enrol_and_bad_csrs_are_invalid_arguments() {
    let pki = Pki::new();
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    pki.issue("maps", Subject::Cloud("maps".into()));
    let cp = start(&pki, crl(&pki)).await;
    let key = KeyPair::generate().unwrap();

    let e = enrol(&cp, &pki, "maps", car_csr(&key))
        .await
        .expect_err("a cloud identity enrols nothing");
    assert_denied(
        &e,
        Code::PermissionDenied,
        &["spiffe://misaki.local/cloud/maps"],
    );
    assert_eq!(counted(&cp, "other", "denied").await, 1);

    // Another's public key, signed by the requester's own: no proof of possession.
    let forged = forge(&KeyPair::generate().unwrap(), &key);
    let oversized = format!("{}{}", car_csr(&key), "\n".repeat(16 * 1024));
    for (bad, says) in [
        (forged, "does not verify"),
        ("not a CSR".to_string(), "no PEM"),
        (oversized, "at most 16384"),
    ] {
        let e = enrol(&cp, &pki, "claim-1", bad).await.expect_err(says);
        assert_denied(&e, Code::InvalidArgument, &[says]);
    }
    assert_eq!(counted(&cp, "claim", "bad_request").await, 3);
    assert!(!pki.path("ca/enrolled/car-1.json").exists());
    enrol(&cp, &pki, "claim-1", car_csr(&key))
        .await
        .expect("bad requests spend nothing");
}

/// `thief`'s CSR with `victim`'s public key in place of its own: a request for a key
/// the requester does not hold (its signature is by another key).
fn forge(thief: &KeyPair, victim: &KeyPair) -> String {
    let der = CertificateSigningRequestDer::from_pem_slice(car_csr(thief).as_bytes()).unwrap();
    let (own, theirs) = (
        thief.subject_public_key_info(),
        victim.subject_public_key_info(),
    );
    assert_eq!(own.len(), theirs.len(), "P-256 keys encode to one length");
    let at = der
        .windows(own.len())
        .position(|w| w == own.as_slice())
        .expect("the CSR carries its key");
    let mut bytes = der.to_vec();
    bytes[at..at + own.len()].copy_from_slice(&theirs);
    let lines: Vec<String> = base64(&bytes)
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolment_is_off_without_tls_a_ca_or_a_crl() {
    let pki = Pki::new();
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    let key = KeyPair::generate().unwrap();
    let no_ca = TlsArgs {
        ca: None,
        ..pki.tls_args(crl(&pki))
    };
    for (tls, says) in [(no_ca, "--ca DIR"), (pki.tls_args(None), "--crl")] {
        let cp = start_with(&pki, tls).await;
        let e = enrol(&cp, &pki, "claim-1", car_csr(&key))
            .await
            .expect_err("enrolment is off");
        assert_denied(&e, Code::FailedPrecondition, &[says]);
        assert_eq!(counted(&cp, "claim", "unavailable").await, 1);
    }
    let plain = start_with(&pki, TlsArgs::default()).await;
    let channel = Channel::from_shared(format!("http://{}", plain.xds))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = enrol_on(channel, car_csr(&key)).await.expect_err("no TLS");
    assert_denied(&e, Code::FailedPrecondition, &["mutual TLS", "--ca DIR"]);
    assert_eq!(counted(&plain, "other", "unavailable").await, 1);
}
