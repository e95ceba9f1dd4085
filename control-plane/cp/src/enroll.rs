//! Certificate enrolment over gRPC: `misaki.fleet.v1.EnrollmentService` on misaki-cp's
//! gRPC port, next to ADS and the fleet API (contract: fleet.proto; operator's view:
//! docs/security.md, "Enrolment").
//!
//! A vehicle makes its key pair and sends a PKCS#10 CSR; misaki-cp signs a certificate
//! for `spiffe://TD/vehicle/ID` with the CA of `serve --ca DIR`:
//!
//! | caller (its TLS client certificate) | may | certificate for |
//! |---|---|---|
//! | claim `spiffe://TD/claim/ID` | enrol, while vehicle ID holds no live certificate recorded here | vehicle ID |
//! | vehicle `spiffe://TD/vehicle/ID` | renew, at any time | vehicle ID |
//! | anyone else | nothing: PERMISSION_DENIED naming the caller | |
//!
//! Invariants:
//! - the caller is the connection's verified [`TlsPeer`], never anything in the request.
//!   Of the CSR only the public key is used, after the CSR's signature verified with
//!   that key (proof of possession); subject, SAN, key usages and validity are set here,
//!   by the code `ca issue --vehicle` uses ([`Ca::sign_csr`]);
//! - a claim never mints a second live identity: every certificate issued here is
//!   recorded in `DIR/enrolled/<ID>.json` (written whole, synced, renamed into place)
//!   *before* it is answered, and a claim is refused while a recorded certificate is
//!   neither expired nor listed in `DIR/revoked`. The one exception hands out nothing
//!   new: a claim whose CSR carries the key of a live recorded certificate gets that
//!   same certificate again (the first answer was lost on the way);
//! - enrolments of one vehicle run one at a time (one lock per vehicle, from a fixed
//!   set of [`LOCK_STRIPES`]; held until the record is written, even if the client has
//!   gone), so two concurrent claims cannot both win; the record makes that hold across
//!   restarts;
//! - enrolment is on only with mutual TLS, `--ca` and `--crl`: the handshake is what
//!   refuses a revoked claim or vehicle certificate (the TLS peer carries no serial to
//!   look up here), so without CRLs a revoked one could still enrol. Otherwise every
//!   call is FAILED_PRECONDITION naming what is missing.
//!
//! Errors map to statuses in [`EnrollError::status`]: off → FAILED_PRECONDITION;
//! caller not allowed, or a claim while a certificate is live → PERMISSION_DENIED (the
//! claim is spent, not the server misconfigured: the message names the live serial and
//! expiry); bad CSR → INVALID_ARGUMENT; a CA or record file that cannot be read or
//! written → UNAVAILABLE (nothing was answered, so retrying is safe).
//!
//! Metric: `misaki_enrolments_total{caller="claim|vehicle|other",
//! result="issued|denied|bad_request|unavailable"}`.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use misaki_identity::{Kind, SpiffeId, TlsPeer};
use misaki_proto::fleet_v1 as pb;
use pb::enrollment_service_server::{EnrollmentService, EnrollmentServiceServer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rcgen::PublicKeyData;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::ca::{self, Ca, CaError, Leaf};

/// Largest CSR accepted, PEM. An ECDSA P-256 CSR is under 1 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Largest request gRPC decodes for this service (a CSR, with room to answer an
/// oversized one with INVALID_ARGUMENT rather than a transport error).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Locks enrolments are serialised on; a vehicle always takes the same one.
pub const LOCK_STRIPES: usize = 64;
/// Live certificates kept per vehicle record (the newest). Renewals add one each; the
/// newest is the longest-lived, so dropping old ones never lets a claim through early.
pub const MAX_RECORDED: usize = 16;

/// Who is calling, from the TLS peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Claim(SpiffeId),
    Vehicle(SpiffeId),
    /// Anyone else, as messages name them.
    Other(String),
}

impl Caller {
    pub fn of(peer: Option<&TlsPeer>) -> Caller {
        let Some(peer) = peer else {
            return Caller::Other("a plaintext client (no TLS certificate)".into());
        };
        match &peer.identity {
            Ok(id) if id.kind() == Kind::Claim => Caller::Claim(id.clone()),
            Ok(id) if id.kind() == Kind::Vehicle => Caller::Vehicle(id.clone()),
            Ok(id) => Caller::Other(id.to_string()),
            Err(e) => Caller::Other(format!("a certificate with no usable identity ({e})")),
        }
    }

    /// The vehicle a certificate would be for.
    pub fn vehicle(&self) -> Option<&str> {
        match self {
            Caller::Claim(id) | Caller::Vehicle(id) => Some(id.name()),
            Caller::Other(_) => None,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Caller::Claim(_) => "claim",
            Caller::Vehicle(_) => "vehicle",
            Caller::Other(_) => "other",
        }
    }

    fn describe(&self) -> String {
        match self {
            Caller::Claim(id) | Caller::Vehicle(id) => id.to_string(),
            Caller::Other(who) => who.clone(),
        }
    }
}

/// How a recorded certificate came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    Claim,
    Renew,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Claim => "claim",
            How::Renew => "renew",
        }
    }
}

/// `DIR/enrolled/<vehicle>.json`: the live certificates enrolment issued to a vehicle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub vehicle: String,
    pub certificates: Vec<Recorded>,
}

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Lower-case hex, as `ca issue` prints it and `DIR/revoked` lists it.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub how: How,
    /// The SPIFFE ID of the certificate that asked.
    pub caller: String,
    /// Its SubjectPublicKeyInfo, DER in hex: a claim retrying with this key gets this
    /// certificate again.
    pub public_key: String,
    /// The certificate, PEM.
    pub certificate: String,
}

impl Record {
    /// This record with `entry` added and expired certificates dropped, at most
    /// [`MAX_RECORDED`] kept (the newest).
    fn with(mut self, entry: Recorded, now: i64) -> Record {
        self.certificates.retain(|c| c.not_after > now);
        self.certificates.push(entry);
        let excess = self.certificates.len().saturating_sub(MAX_RECORDED);
        self.certificates.drain(..excess);
        self
    }
}

/// What to do with an allowed enrolment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Issue(How),
    /// Answer with the recorded certificate at this index again.
    Resend(usize),
}

/// Who may enrol what: the whole rule, without I/O. `record` is the vehicle's record,
/// `revoked` the CA's revoked serials, `public_key` the CSR's (hex SPKI), `now` unix
/// seconds.
pub fn decide(
    caller: &Caller,
    record: Option<&Record>,
    revoked: &HashSet<String>,
    public_key: &str,
    now: i64,
) -> Result<Decision, EnrollError> {
    let id = match caller {
        Caller::Vehicle(_) => return Ok(Decision::Issue(How::Renew)),
        Caller::Other(who) => return Err(EnrollError::NotAllowed(who.clone())),
        Caller::Claim(id) => id,
    };
    let live: Vec<(usize, &Recorded)> = record
        .map(|r| r.certificates.iter().enumerate())
        .into_iter()
        .flatten()
        .filter(|(_, c)| c.not_after > now && !revoked.contains(&c.serial))
        .collect();
    if live.is_empty() {
        return Ok(Decision::Issue(How::Claim));
    }
    if let Some((i, _)) = live.iter().rev().find(|(_, c)| c.public_key == public_key) {
        return Ok(Decision::Resend(*i));
    }
    Err(EnrollError::Live {
        vehicle: id.name().to_string(),
        live: live
            .iter()
            .map(|(_, c)| (c.serial.clone(), c.not_after))
            .collect(),
    })
}

/// Why an enrolment was refused or failed. The message is what the caller reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("enrolment is off on this control plane: {0}")]
    Off(String),
    #[error(
        "{0} may not enrol: only a claim credential (spiffe://TD/claim/ID) enrols its vehicle, and a vehicle (spiffe://TD/vehicle/ID) renews"
    )]
    NotAllowed(String),
    #[error("{}", live_message(vehicle, live))]
    Live {
        vehicle: String,
        /// Serials (hex) and expiries (unix seconds) of the live certificates.
        live: Vec<(String, i64)>,
    },
    #[error("bad CSR: {0}")]
    BadCsr(String),
    #[error("enrolment failed, nothing was issued: {0}")]
    Failed(String),
}

fn live_message(vehicle: &str, live: &[(String, i64)]) -> String {
    let certs: Vec<String> = live
        .iter()
        .map(|(serial, not_after)| format!("serial {serial}, valid until {}", unix_utc(*not_after)))
        .collect();
    let what = if certs.len() == 1 {
        "renew with it, or revoke it first"
    } else {
        "renew with one of them, or revoke them all first"
    };
    format!(
        "vehicle {vehicle} holds a live certificate from this CA ({}): a claim cannot enrol it again; {what}",
        certs.join("; ")
    )
}

impl EnrollError {
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            EnrollError::Off(_) => Status::failed_precondition(message),
            EnrollError::NotAllowed(_) | EnrollError::Live { .. } => {
                Status::permission_denied(message)
            }
            EnrollError::BadCsr(_) => Status::invalid_argument(message),
            EnrollError::Failed(_) => Status::unavailable(message),
        }
    }

    /// The `result` label of `misaki_enrolments_total`.
    fn label(&self) -> &'static str {
        match self {
            EnrollError::Off(_) | EnrollError::Failed(_) => "unavailable",
            EnrollError::NotAllowed(_) | EnrollError::Live { .. } => "denied",
            EnrollError::BadCsr(_) => "bad_request",
        }
    }
}

fn failed(e: impl std::fmt::Display) -> EnrollError {
    EnrollError::Failed(e.to_string())
}

/// The public key of a CSR whose signature verified with it.
#[derive(Debug, Clone)]
pub struct CsrKey {
    key: rcgen::SubjectPublicKeyInfo,
    /// The SubjectPublicKeyInfo, DER in hex (as recorded).
    hex: String,
}

impl CsrKey {
    /// Read a PEM CSR: at most [`MAX_CSR_BYTES`], its signature made with its own key,
    /// that key ECDSA P-256 (what edge-netd makes), P-384 or Ed25519.
    pub fn from_pem(pem: &str) -> Result<CsrKey, EnrollError> {
        let bad = |why: String| EnrollError::BadCsr(why);
        if pem.len() > MAX_CSR_BYTES {
            let why = format!("{} bytes; at most {MAX_CSR_BYTES}", pem.len());
            return Err(bad(why));
        }
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| bad(format!("no PEM \"CERTIFICATE REQUEST\" in it ({e})")))?;
        let csr = match X509CertificationRequest::from_der(&der) {
            Ok(([], csr)) => csr,
            Ok(_) => return Err(bad("trailing bytes after the PKCS#10 request".into())),
            Err(e) => return Err(bad(format!("not a PKCS#10 request: {e}"))),
        };
        csr.verify_signature().map_err(|e| {
            bad(format!(
                "its signature does not verify with its own public key, so it proves no possession of that key ({e})"
            ))
        })?;
        let spki = csr.certification_request_info.subject_pki.raw;
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| bad(format!("unusable public key: {e}")))?;
        let accepted = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ];
        // Re-encoded byte for byte: the certificate carries exactly the key the CSR's
        // signature was checked with.
        if !accepted.contains(&key.algorithm()) || key.subject_public_key_info() != spki {
            let why = "the key must be ECDSA P-256, ECDSA P-384 or Ed25519";
            return Err(bad(why.into()));
        }
        Ok(CsrKey {
            key,
            hex: ca::hex(spki),
        })
    }
}

/// A certificate handed out.
#[derive(Debug, Clone)]
struct Enrolled {
    vehicle: SpiffeId,
    how: How,
    /// The recorded certificate again (a claim retrying with the same key).
    resent: bool,
    cert_pem: String,
    serial: String,
    not_before: i64,
    not_after: i64,
}

impl Enrolled {
    fn resend(vehicle: SpiffeId, c: &Recorded) -> Enrolled {
        Enrolled {
            vehicle,
            how: c.how,
            resent: true,
            cert_pem: c.certificate.clone(),
            serial: c.serial.clone(),
            not_before: c.not_before,
            not_after: c.not_after,
        }
    }

    fn issued(vehicle: SpiffeId, how: How, leaf: Leaf) -> Enrolled {
        Enrolled {
            vehicle,
            how,
            resent: false,
            cert_pem: leaf.cert_pem,
            serial: leaf.serial_hex,
            not_before: leaf.not_before.unix_timestamp(),
            not_after: leaf.not_after.unix_timestamp(),
        }
    }
}

/// The CA, the records and the per-vehicle locks.
#[derive(Debug)]
struct Signer {
    ca: Ca,
    records: PathBuf,
    valid_for: Duration,
    locks: Vec<Arc<Mutex<()>>>,
}

fn read_record(path: &Path) -> Result<Option<Record>, EnrollError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(format!("cannot read {}: {e}", path.display()))),
    };
    // A record that does not read fails closed: it may list a live certificate.
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| failed(format!("{}: not an enrolment record: {e}", path.display())))
}

impl Signer {
    fn lock(&self, vehicle: &str) -> Arc<Mutex<()>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        vehicle.hash(&mut h);
        let i = usize::try_from(h.finish() % LOCK_STRIPES as u64).unwrap_or(0);
        self.locks[i].clone()
    }

    /// Decide, sign, record: blocking file I/O, run under the vehicle's lock.
    fn enrol(&self, caller: &Caller, key: &CsrKey) -> Result<Enrolled, EnrollError> {
        let Some(name) = caller.vehicle() else {
            return Err(EnrollError::NotAllowed(caller.describe()));
        };
        let vehicle =
            SpiffeId::new(self.ca.trust_domain().clone(), Kind::Vehicle, name).map_err(failed)?;
        let path = self.records.join(format!("{name}.json"));
        let record = read_record(&path)?;
        let revoked = self.ca.revoked_serials().map_err(failed)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let how = match decide(caller, record.as_ref(), &revoked, &key.hex, now)? {
            Decision::Resend(i) => {
                let recorded = record.as_ref().map(|r| &r.certificates[i]);
                return Ok(Enrolled::resend(vehicle, recorded.expect("decided on it")));
            }
            Decision::Issue(how) => how,
        };
        let leaf = self
            .ca
            .sign_csr(name, &key.key, self.valid_for)
            .map_err(failed)?;
        let entry = Recorded {
            serial: leaf.serial_hex.clone(),
            not_before: leaf.not_before.unix_timestamp(),
            not_after: leaf.not_after.unix_timestamp(),
            how,
            caller: caller.describe(),
            public_key: key.hex.clone(),
            certificate: leaf.cert_pem.clone(),
        };
        let record = record.unwrap_or_else(|| Record {
            vehicle: name.to_string(),
            certificates: Vec::new(),
        });
        self.write(&path, &record.with(entry, now))?;
        Ok(Enrolled::issued(vehicle, how, leaf))
    }

    fn write(&self, path: &Path, record: &Record) -> Result<(), EnrollError> {
        ca::create_dir(&self.records, 0o755).map_err(failed)?;
        let json = serde_json::to_vec_pretty(record).map_err(failed)?;
        ca::write_atomic(path, &json, 0o644).map_err(|e: CaError| failed(e))
    }
}

/// What enrolment is served with (from `serve`'s flags).
#[derive(Debug)]
pub struct Config {
    /// Mutual TLS is on.
    pub tls: bool,
    /// `--crl` is given.
    pub crl: bool,
    /// `--ca`, loaded.
    pub ca: Option<Ca>,
    /// `--enrol-valid-for`.
    pub valid_for: Duration,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    enrolments: Family<[(&'static str, &'static str); 2], Counter>,
}

/// The `EnrollmentService`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The signer, or why enrolment is off.
    signer: Result<Arc<Signer>, String>,
    metrics: Metrics,
}

impl Enrollment {
    pub fn new(config: Config) -> Enrollment {
        let signer = match config {
            Config { tls: false, .. } => Err(
                "it needs mutual TLS on the gRPC port (serve --tls-cert, --tls-key, --client-ca) and --ca DIR".into(),
            ),
            Config { ca: None, .. } => {
                Err("it needs --ca DIR, the CA that signs vehicle certificates".into())
            }
            Config { crl: false, .. } => Err(
                "it needs --crl (the CA's crl.pem): without CRLs a revoked claim or vehicle certificate could still enrol".into(),
            ),
            Config { ca: Some(ca), .. } => Ok(Arc::new(Signer {
                records: ca.dir().join(ca::ENROLLED),
                ca,
                valid_for: config.valid_for,
                locks: (0..LOCK_STRIPES).map(|_| Arc::default()).collect(),
            })),
        };
        Enrollment {
            signer,
            metrics: Metrics::default(),
        }
    }

    /// Whether enrolment is served (`Config` had TLS, a CA and CRLs).
    pub fn is_on(&self) -> bool {
        self.signer.is_ok()
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "misaki_enrolments",
            "Certificate enrolments on the gRPC port, by caller (claim, vehicle, other) and result (issued, denied, bad_request, unavailable)",
            self.metrics.enrolments.clone(),
        );
    }

    /// The gRPC service, for the gRPC port's routes.
    pub fn service(&self) -> EnrollmentServiceServer<Enrollment> {
        EnrollmentServiceServer::new(self.clone())
            .accept_compressed(pb::COMPRESSION)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn enrol(&self, caller: &Caller, csr_pem: &str) -> Result<Enrolled, EnrollError> {
        let signer = self.signer.clone().map_err(EnrollError::Off)?;
        // Strangers are refused before their CSR is parsed.
        let Some(vehicle) = caller.vehicle() else {
            return Err(EnrollError::NotAllowed(caller.describe()));
        };
        let key = CsrKey::from_pem(csr_pem)?;
        // Owned and moved into the task: the lock is held until the record is written,
        // even if this request is cancelled meanwhile.
        let held = signer.lock(vehicle).lock_owned().await;
        let caller = caller.clone();
        tokio::task::spawn_blocking(move || {
            let _held = held;
            signer.enrol(&caller, &key)
        })
        .await
        .map_err(failed)?
    }
}

#[tonic::async_trait]
impl EnrollmentService for Enrollment {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let peer = request.extensions().get::<TlsPeer>().cloned();
        let caller = Caller::of(peer.as_ref());
        let result = self.enrol(&caller, &request.get_ref().csr_pem).await;
        let label = result
            .as_ref()
            .map_or_else(EnrollError::label, |_| "issued");
        self.metrics
            .enrolments
            .get_or_create(&[("caller", caller.label()), ("result", label)])
            .inc();
        let remote = peer.and_then(|p| p.remote_addr);
        match result {
            Ok(e) => {
                tracing::info!(vehicle = %e.vehicle, serial = %e.serial, not_after = %unix_utc(e.not_after), how = e.how.as_str(), resent = e.resent, ?remote, caller = %caller.describe(), "enrolment: certificate issued");
                Ok(Response::new(self.response(e)))
            }
            Err(e) => {
                tracing::warn!(?remote, caller = %caller.describe(), error = %e, "enrolment refused");
                Err(e.status())
            }
        }
    }
}

impl Enrollment {
    fn response(&self, e: Enrolled) -> pb::EnrollResponse {
        let ca_pem = self
            .signer
            .as_ref()
            .map(|s| s.ca.cert_pem().to_string())
            .unwrap_or_default();
        pb::EnrollResponse {
            certificate_pem: e.cert_pem,
            ca_pem,
            not_before_unix: e.not_before,
            not_after_unix: e.not_after,
            spiffe_id: e.vehicle.to_string(),
        }
    }
}

fn unix_utc(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t).map_or_else(|_| t.to_string(), ca::utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use misaki_identity::TrustDomain;

    const NOW: i64 = 1_800_000_000;

    fn id(kind: Kind, name: &str) -> SpiffeId {
        SpiffeId::new(TrustDomain::default(), kind, name).unwrap()
    }

    fn cert(serial: &str, not_after: i64, key: &str) -> Recorded {
        Recorded {
            serial: serial.into(),
            not_before: not_after - 3600,
            not_after,
            how: How::Claim,
            caller: "spiffe://misaki.local/claim/car-1".into(),
            public_key: key.into(),
            certificate: format!("PEM of {serial}"),
        }
    }

    fn record(certs: Vec<Recorded>) -> Record {
        Record {
            vehicle: "car-1".into(),
            certificates: certs,
        }
    }

    fn claim() -> Caller {
        Caller::Claim(id(Kind::Claim, "car-1"))
    }

    fn revoked(serials: &[&str]) -> HashSet<String> {
        serials.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_claim_enrols_only_while_its_vehicle_holds_no_live_certificate() {
        let none = revoked(&[]);
        let fresh = decide(&claim(), None, &none, "k1", NOW);
        assert_eq!(fresh, Ok(Decision::Issue(How::Claim)));
        let expired = record(vec![cert("aa", NOW, "k0"), cert("bb", NOW - 1, "k0")]);
        let again = decide(&claim(), Some(&expired), &none, "k1", NOW);
        assert_eq!(again, Ok(Decision::Issue(How::Claim)), "expired at now");
        let live = record(vec![cert("aa", NOW - 5, "k0"), cert("bb", NOW + 60, "k0")]);
        let Err(EnrollError::Live {
            vehicle,
            live: held,
        }) = decide(&claim(), Some(&live), &none, "k1", NOW)
        else {
            panic!("a live certificate must refuse the claim");
        };
        assert_eq!(
            (vehicle.as_str(), held),
            ("car-1", vec![("bb".into(), NOW + 60)])
        );
        let after_revoke = decide(&claim(), Some(&live), &revoked(&["bb"]), "k1", NOW);
        assert_eq!(after_revoke, Ok(Decision::Issue(How::Claim)));
    }

    #[test]
    fn a_claim_retrying_with_the_key_of_a_live_certificate_gets_that_certificate_again() {
        let live = record(vec![cert("aa", NOW + 60, "k0"), cert("bb", NOW + 90, "k1")]);
        let none = revoked(&[]);
        let resend = decide(&claim(), Some(&live), &none, "k1", NOW);
        assert_eq!(resend, Ok(Decision::Resend(1)));
        // A revoked certificate is never handed out again, whatever the key.
        let other = decide(&claim(), Some(&live), &revoked(&["bb"]), "k1", NOW);
        assert!(matches!(other, Err(EnrollError::Live { .. })), "{other:?}");
    }

    #[test]
    fn a_vehicle_always_renews_and_nobody_else_enrols() {
        let live = record(vec![cert("aa", NOW + 60, "k0")]);
        let vehicle = Caller::Vehicle(id(Kind::Vehicle, "car-1"));
        let none = revoked(&[]);
        let renew = decide(&vehicle, Some(&live), &none, "k9", NOW);
        assert_eq!(renew, Ok(Decision::Issue(How::Renew)));
        let cloud = Caller::Other(id(Kind::Cloud, "maps").to_string());
        let Err(e) = decide(&cloud, None, &none, "k9", NOW) else {
            panic!("a cloud identity enrolled");
        };
        assert_eq!(e.status().code(), tonic::Code::PermissionDenied);
        assert!(
            e.to_string().contains("spiffe://misaki.local/cloud/maps"),
            "{e}"
        );
        assert_eq!(Caller::of(None).label(), "other");
    }

    #[test]
    fn refusals_name_the_live_certificates_and_map_to_statuses() {
        let one = EnrollError::Live {
            vehicle: "car-1".into(),
            live: vec![("0abc".into(), NOW)],
        };
        let text = one.to_string();
        assert!(
            text.contains("serial 0abc, valid until 2027-01-15T08:00:00Z"),
            "{text}"
        );
        assert!(text.contains("renew with it, or revoke it first"), "{text}");
        let two = EnrollError::Live {
            vehicle: "car-1".into(),
            live: vec![("01".into(), NOW), ("02".into(), NOW)],
        };
        assert!(two.to_string().contains("revoke them all first"), "{two}");
        for (e, code, label) in [
            (one, tonic::Code::PermissionDenied, "denied"),
            (
                EnrollError::Off("x".into()),
                tonic::Code::FailedPrecondition,
                "unavailable",
            ),
            (
                EnrollError::BadCsr("x".into()),
                tonic::Code::InvalidArgument,
                "bad_request",
            ),
            (
                EnrollError::Failed("x".into()),
                tonic::Code::Unavailable,
                "unavailable",
            ),
        ] {
            assert_eq!((e.status().code(), e.label()), (code, label), "{e}");
        }
    }

    #[test]
    fn a_record_keeps_the_newest_live_certificates() {
        let mut r = record(vec![cert("old", NOW, "k")]);
        for i in 0..MAX_RECORDED + 3 {
            r = r.with(cert(&format!("{i:02x}"), NOW + 100, "k"), NOW);
        }
        assert_eq!(r.certificates.len(), MAX_RECORDED);
        assert_eq!(r.certificates[0].serial, "03", "the oldest went first");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"how\":\"claim\""), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), r);
    }

    fn csr(key: &rcgen::KeyPair) -> String {
        let params = rcgen::CertificateParams::new(vec!["car-2.example".into()]).unwrap();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_csr_is_read_only_with_a_signature_by_its_own_key() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let read = CsrKey::from_pem(&csr(&key)).unwrap();
            assert_eq!(read.hex, ca::hex(&key.subject_public_key_info()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let tampered = tamper(&csr(&key));
        let too_big = format!("{}{}", csr(&key), " ".repeat(MAX_CSR_BYTES));
        for (bad, why) in [
            (tampered.as_str(), "does not verify"),
            ("hello", "no PEM"),
            (too_big.as_str(), "at most 16384"),
        ] {
            let Err(EnrollError::BadCsr(e)) = CsrKey::from_pem(bad) else {
                panic!("{why}: accepted");
            };
            assert!(e.contains(why), "{e}");
        }
    }

    fn signer(ca_valid_for: Duration) -> (tempfile::TempDir, Signer) {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(&tmp.path().join("ca"), TrustDomain::default(), ca_valid_for).unwrap();
        let enrollment = Enrollment::new(Config {
            tls: true,
            crl: true,
            ca: Some(ca),
            valid_for: Duration::from_secs(7200),
        });
        let signer = Arc::try_unwrap(enrollment.signer.unwrap()).unwrap();
        (tmp, signer)
    }

    #[test]
    fn a_certificate_never_outlives_its_ca_and_an_unreadable_record_fails_closed() {
        let (_tmp, signer) = signer(Duration::from_secs(3600));
        let key = CsrKey::from_pem(&csr(&rcgen::KeyPair::generate().unwrap())).unwrap();
        let issued = signer.enrol(&claim(), &key).unwrap();
        assert_eq!(
            issued.not_after,
            signer.ca.not_after().unix_timestamp(),
            "cut short"
        );
        assert_eq!(
            issued.vehicle.to_string(),
            "spiffe://misaki.local/vehicle/car-1"
        );
        let path = signer.records.join("car-1.json");
        std::fs::write(&path, "{ not json").unwrap();
        let renew = Caller::Vehicle(id(Kind::Vehicle, "car-1"));
        let Err(EnrollError::Failed(why)) = signer.enrol(&renew, &key) else {
            panic!("a corrupt record was overwritten");
        };
        assert!(why.contains("car-1.json: not an enrolment record"), "{why}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
    }

    #[test]
    fn enrolment_is_off_without_tls_a_ca_or_crls() {
        let (_tmp, signer) = signer(Duration::from_secs(3600));
        let config = |tls, crl, ca| Config {
            tls,
            crl,
            ca,
            valid_for: Duration::from_secs(60),
        };
        for (c, says) in [
            (config(false, true, None), "mutual TLS"),
            (config(true, true, None), "--ca DIR"),
            (config(true, false, Some(signer.ca)), "--crl"),
        ] {
            let Err(why) = Enrollment::new(c).signer else {
                panic!("{says}: on");
            };
            assert!(why.contains(says), "{why}");
        }
    }

    /// The PEM with one base64 character of its last line changed: a byte near the end
    /// of the DER, inside the signature.
    fn tamper(pem: &str) -> String {
        let mut lines: Vec<String> = pem.lines().map(String::from).collect();
        let at = lines.len() - 2;
        let last = &mut lines[at];
        let swap = if last.starts_with('A') { "B" } else { "A" };
        last.replace_range(..1, swap);
        lines.join("\n")
    }
}
