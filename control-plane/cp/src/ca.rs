//! The fleet CA behind `misaki-cp ca init | issue | revoke` (docs/security.md).
//!
//! Invariants:
//! - a private key file is created with mode 0600 and never exists with wider bits:
//!   every file is written to a temporary file in the same directory (created with
//!   its final mode), synced, and renamed into place, so a reader (`serve` re-reading
//!   its certificates) never sees half a file;
//! - `ca init` never overwrites a CA; a certificate never outlives the CA that
//!   signed it;
//! - the SAN of an identity is [`misaki_identity::SpiffeId`]'s spelling, so what is
//!   issued here is exactly what the control plane reads back;
//! - one place builds a leaf certificate (`Ca::sign_leaf`): `ca issue` and enrolment's
//!   [`Ca::sign_csr`] differ only in where the public key comes from;
//! - keys are ECDSA P-256 (fast handshakes on vehicle CPUs, small certificates); a
//!   brought CA may use any key rcgen can sign with.
//!
//! On disk:
//!
//! ```text
//! DIR/ca.pem          CA certificate (self-signed, path length 0): clients' and `serve --client-ca`'s trust anchor
//! DIR/ca-key.pem      CA private key, PKCS#8 PEM, 0600
//! DIR/trust-domain    the SPIFFE trust domain, one line
//! DIR/revoked         one line per revoked certificate: `<serial hex> <unix seconds>`
//! DIR/crl.pem         CRL of those serials, signed by the CA (`serve --crl`); empty after `init`
//! DIR/enrolled/ID.json the live certificates enrolment issued to vehicle ID (`crate::enroll`)
//! OUTDIR/cert.pem     an issued certificate; OUTDIR/key.pem (0600) its key; OUTDIR/ca.pem the CA
//! ```
//!
//! Certificates are backdated by [`CLOCK_SKEW`]: a vehicle whose clock lags must not
//! reject a certificate issued a moment ago.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use misaki_identity::{Kind, SpiffeId, TrustDomain};
use rcgen::PublicKeyData;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::cli::{CaCommand, IssueArgs};

/// How far back a certificate's `notBefore` is set.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of operational and server certificates (90 days). Short enough
/// that a leaked key ages out; renewal is automatic once vehicles enrol (issue 10).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default lifetime of a claim credential: it is installed at the factory and must
/// outlast a vehicle standing in a yard (ten years).
pub const DEFAULT_CLAIM_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a CRL written by `ca revoke` says it is current.
pub const CRL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const TRUST_DOMAIN_FILE: &str = "trust-domain";
pub const REVOKED: &str = "revoked";
pub const CRL: &str = "crl.pem";
/// Directory of enrolment records, one JSON file per vehicle (`crate::enroll`).
pub const ENROLLED: &str = "enrolled";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}: a CA exists there already; `ca init` never overwrites one")]
    Exists(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("cannot sign: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("the certificate would expire at {}, after the CA ({}); shorten --valid-for", utc(*cert), utc(*ca))]
    OutlivesCa {
        cert: OffsetDateTime,
        ca: OffsetDateTime,
    },
    #[error("{0}")]
    Identity(#[from] misaki_identity::IdentityError),
    #[error("the CA expired at {}; it can sign nothing more", utc(*.0))]
    Expired(OffsetDateTime),
}

impl CaError {
    /// A problem with what the operator named (a missing or wrong CA, a bad value), as
    /// opposed to a failure to write or sign: the CLI exits 64 for these.
    pub fn is_usage(&self) -> bool {
        !matches!(self, CaError::Io { .. } | CaError::Sign(_))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, why: impl std::fmt::Display) -> CaError {
    CaError::Invalid {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Write `bytes` to `path` atomically, the file having `mode` from its creation.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `2036-11-28T04:40:25Z`: what operators compare with `date -u`.
pub fn utc(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

pub(crate) fn create_dir(dir: &Path, mode: u32) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err(dir))
}

fn std_to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// A random positive 128-bit serial: unique without a counter on disk, which two
/// operators issuing at once could race on.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Vehicle(String),
    Cloud(String),
    /// Claim credential for one vehicle: enrolment only.
    Claim(String),
    /// misaki-cp's own name(s): DNS names and IP literals.
    Server(Vec<String>),
}

impl Subject {
    pub fn default_validity(&self) -> Duration {
        match self {
            Subject::Claim(_) => DEFAULT_CLAIM_VALIDITY,
            _ => DEFAULT_VALIDITY,
        }
    }

    /// What the certificate names: a fleet identity, or (a server) hosts.
    fn names(&self, td: &TrustDomain) -> Result<Names<'_>, CaError> {
        let (kind, name) = match self {
            Subject::Vehicle(n) => (Kind::Vehicle, n),
            Subject::Cloud(n) => (Kind::Cloud, n),
            Subject::Claim(n) => (Kind::Claim, n),
            Subject::Server(hosts) => return Ok(Names::Hosts(hosts)),
        };
        Ok(Names::Spiffe(SpiffeId::new(td.clone(), kind, name)?))
    }

    /// SANs, common name and extended key usages. A claim is a client certificate
    /// only; server certificates only serve; fleet identities do both (a cloud sidecar
    /// serves vehicles and calls the control plane).
    fn params(&self, td: &TrustDomain) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        let cn = match self.names(td)? {
            Names::Hosts(hosts) => {
                for h in hosts {
                    params.subject_alt_names.push(match h.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(h.as_str().try_into()?),
                    });
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                hosts.first().cloned().unwrap_or_default()
            }
            Names::Spiffe(id) => {
                params
                    .subject_alt_names
                    .push(SanType::URI(id.to_string().try_into()?));
                params.extended_key_usages = match id.kind() {
                    Kind::Claim => vec![ExtendedKeyUsagePurpose::ClientAuth],
                    Kind::Vehicle | Kind::Cloud => vec![
                        ExtendedKeyUsagePurpose::ClientAuth,
                        ExtendedKeyUsagePurpose::ServerAuth,
                    ],
                };
                format!("{} {}", id.kind().as_str(), id.name())
            }
        };
        params.distinguished_name = distinguished_name(&cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// The names in a certificate.
enum Names<'a> {
    Spiffe(SpiffeId),
    Hosts(&'a [String]),
}

fn distinguished_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "misaki");
    dn.push(DnType::CommonName, cn);
    dn
}

/// A certificate signed by the CA, PEM, without a key: enrolment's key never leaves the
/// vehicle.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// A certificate and its key, PEM, with the CA that signed it.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

impl Issued {
    /// Write `cert.pem`, `key.pem` (0600) and `ca.pem` into `out` (created if missing).
    /// The key goes first: a watcher that sees the new certificate finds its key.
    pub fn write(&self, out: &Path) -> Result<(), CaError> {
        create_dir(out, 0o755)?;
        write_atomic(&out.join("key.pem"), self.key_pem.as_bytes(), 0o600)?;
        write_atomic(&out.join("cert.pem"), self.cert_pem.as_bytes(), 0o644)?;
        write_atomic(&out.join("ca.pem"), self.ca_pem.as_bytes(), 0o644)
    }
}

/// A loaded CA: certificate, key and trust domain.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    trust_domain: TrustDomain,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Create a CA in `dir` (mode 0700), valid for `valid_for`.
    pub fn init(dir: &Path, trust_domain: TrustDomain, valid_for: Duration) -> Result<Ca, CaError> {
        if dir.join(CA_KEY).exists() || dir.join(CA_CERT).exists() {
            return Err(CaError::Exists(dir.to_path_buf()));
        }
        create_dir(dir, 0o700)?;
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let serial = random_serial();
        // Names differ between CAs of one trust domain: during a CA rotation clients
        // trust both, and a verifier finds a certificate's issuer by name.
        let cn = format!(
            "misaki fleet CA {trust_domain} {}",
            &hex(serial.as_ref())[..8]
        );
        params.distinguished_name = distinguished_name(&cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - std_to_time(CLOCK_SKEW);
        params.not_after = now + std_to_time(valid_for);
        params.serial_number = Some(serial);
        let cert = params.self_signed(&key)?;
        write_atomic(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        let td_line = format!("{trust_domain}\n");
        write_atomic(&dir.join(TRUST_DOMAIN_FILE), td_line.as_bytes(), 0o644)?;
        let ca = Ca::load(dir)?;
        // An empty CRL from day one: a control plane given CRLs refuses certificates
        // whose CA has none, so every CA made here can join a CRL bundle at once.
        write_atomic(&dir.join(CRL), ca.crl("", now)?.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Load the CA in `dir` (made by `init`, or brought: ca.pem, ca-key.pem and
    /// trust-domain). Checks that the key belongs to the certificate and that the
    /// certificate is a CA allowed to sign certificates and CRLs.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let td_path = dir.join(TRUST_DOMAIN_FILE);
        let cert_pem = read(&cert_path)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(&cert_path, format!("no PEM certificate: {e}")))?;
        let key = KeyPair::from_pem(&read(&key_path)?)
            .map_err(|e| invalid(&key_path, format!("unusable private key: {e}")))?;
        let trust_domain =
            TrustDomain::new(read(&td_path)?.trim()).map_err(|e| invalid(&td_path, e))?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| invalid(&cert_path, e))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(&key_path, "this key does not belong to ca.pem"));
        }
        if !x509.is_ca() {
            return Err(invalid(
                &cert_path,
                "not a CA certificate (basicConstraints CA:FALSE)",
            ));
        }
        let usage_ok = x509
            .key_usage()
            .ok()
            .flatten()
            .is_none_or(|ku| ku.value.key_cert_sign() && ku.value.crl_sign());
        if !usage_ok {
            return Err(invalid(
                &cert_path,
                "its key usage does not allow signing certificates and CRLs",
            ));
        }
        let not_after = x509.validity().not_after.to_datetime();
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem,
            cert_der,
            key,
            trust_domain,
            not_after,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM (what clients trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issue a certificate for `subject`, valid from now (less [`CLOCK_SKEW`]) for
    /// `valid_for`.
    pub fn issue(&self, subject: &Subject, valid_for: Duration) -> Result<Issued, CaError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(
            subject,
            now - std_to_time(CLOCK_SKEW),
            now + std_to_time(valid_for),
        )
    }

    /// Issue a certificate valid between two instants (tests make expired ones).
    pub fn issue_between(
        &self,
        subject: &Subject,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate()?;
        let leaf = self.sign_leaf(subject, &key, not_before, not_after)?;
        Ok(Issued {
            cert_pem: leaf.cert_pem,
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
            serial_hex: leaf.serial_hex,
            not_after,
        })
    }

    /// Sign a certificate for vehicle `vehicle` over `public_key` (from a CSR whose
    /// signature the caller has verified), valid from now (less [`CLOCK_SKEW`]) for
    /// `valid_for`, cut short at the CA's own expiry: a CA near its end still renews the
    /// fleet for as long as it can, and never signs past itself.
    pub fn sign_csr(
        &self,
        vehicle: &str,
        public_key: &impl PublicKeyData,
        valid_for: Duration,
    ) -> Result<Leaf, CaError> {
        let now = OffsetDateTime::now_utc();
        let not_after = (now + std_to_time(valid_for)).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Expired(self.not_after));
        }
        let subject = Subject::Vehicle(vehicle.to_string());
        self.sign_leaf(
            &subject,
            public_key,
            now - std_to_time(CLOCK_SKEW),
            not_after,
        )
    }

    /// The one place a leaf certificate is made: names and key usages from `subject`,
    /// a fresh random serial, the given validity, `public_key`.
    fn sign_leaf(
        &self,
        subject: &Subject,
        public_key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Leaf, CaError> {
        if not_after > self.not_after {
            return Err(CaError::OutlivesCa {
                cert: not_after,
                ca: self.not_after,
            });
        }
        let mut params = subject.params(&self.trust_domain)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(public_key, &self.issuer()?)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            serial_hex: hex(serial.as_ref()),
            not_before,
            not_after,
        })
    }

    /// The serials in `DIR/revoked` (lower-case hex, as [`Leaf::serial_hex`]); none
    /// when the file does not exist yet.
    pub fn revoked_serials(&self) -> Result<std::collections::HashSet<String>, CaError> {
        let list = self.revoked_list()?;
        Ok(list
            .lines()
            .filter_map(|l| parse_hex(l.split(' ').next()?))
            .map(|s| hex(&s))
            .collect())
    }

    /// The `revoked` file's text ("" before the first revocation).
    fn revoked_list(&self) -> Result<String, CaError> {
        let path = self.dir.join(REVOKED);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(CaError::Read { path, source: e }),
        }
    }

    /// Revoke the certificate with serial `serial_hex`: record it in `DIR/revoked` and
    /// rewrite `DIR/crl.pem` with every serial recorded there. Returns the CRL's path.
    pub fn revoke(&self, serial_hex: &str) -> Result<PathBuf, CaError> {
        let serial = parse_hex(serial_hex)
            .ok_or_else(|| invalid(Path::new(serial_hex), "not a hex serial number"))?;
        let list_path = self.dir.join(REVOKED);
        let mut list = self.revoked_list()?;
        let now = OffsetDateTime::now_utc();
        let canonical = hex(&serial);
        if !list
            .lines()
            .any(|l| l.split(' ').next() == Some(canonical.as_str()))
        {
            list.push_str(&format!("{canonical} {}\n", now.unix_timestamp()));
            write_atomic(&list_path, list.as_bytes(), 0o644)?;
        }
        let crl_path = self.dir.join(CRL);
        let pem = self.crl(&list, now)?;
        write_atomic(&crl_path, pem.as_bytes(), 0o644)?;
        Ok(crl_path)
    }

    /// The CRL listing every serial in `list` (the `revoked` file's text).
    fn crl(&self, list: &str, now: OffsetDateTime) -> Result<String, CaError> {
        let revoked_certs = list
            .lines()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                let serial = parse_hex(parts.next()?)?;
                let at = parts.next().and_then(|t| t.parse::<i64>().ok());
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: at
                        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
                        .unwrap_or(now),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        // CRL numbers must increase; milliseconds since the epoch do, without state.
        let number = (now.unix_timestamp_nanos() / 1_000_000).to_be_bytes();
        let params = CertificateRevocationListParams {
            this_update: now - std_to_time(CLOCK_SKEW),
            next_update: now + std_to_time(CRL_VALIDITY),
            crl_number: SerialNumber::from_slice(&number[8..]),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer()?)?.pem()?)
    }
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_start_matches("0x").replace(':', "");
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 40 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Subject {
    /// The identity `misaki-cp ca issue` was asked for (clap allows exactly one).
    pub fn from_args(args: &IssueArgs) -> Subject {
        match (&args.vehicle, &args.cloud, &args.claim) {
            (Some(v), _, _) => Subject::Vehicle(v.clone()),
            (_, Some(c), _) => Subject::Cloud(c.clone()),
            (_, _, Some(c)) => Subject::Claim(c.clone()),
            _ => Subject::Server(args.server.clone()),
        }
    }

    /// The identity as the operator reads it: a SPIFFE ID, or the server names.
    pub fn describe(&self, td: &TrustDomain) -> String {
        match self.names(td) {
            Ok(Names::Spiffe(id)) => id.to_string(),
            Ok(Names::Hosts(hosts)) => format!("server {}", hosts.join(", ")),
            Err(_) => format!("{self:?}"),
        }
    }
}

/// Carry out one `misaki-cp ca` command; returns what to print.
pub fn run_command(cmd: &CaCommand) -> Result<String, CaError> {
    match cmd {
        CaCommand::Init {
            dir,
            trust_domain,
            valid_for,
        } => {
            let ca = Ca::init(dir, trust_domain.clone(), *valid_for)?;
            Ok(format!(
                "{}: CA for trust domain {}, valid until {}; clients and `serve --client-ca` trust {}",
                dir.display(),
                ca.trust_domain,
                utc(ca.not_after),
                dir.join(CA_CERT).display()
            ))
        }
        CaCommand::Issue(args) => {
            let ca = Ca::load(&args.dir)?;
            let subject = Subject::from_args(args);
            let issued = match args.valid_for {
                Some(valid_for) => ca.issue(&subject, valid_for)?,
                // The default is a lifetime, not a promise: a claim's ten years would
                // otherwise outlive a ten-year CA made moments earlier, by those moments.
                None => {
                    let now = OffsetDateTime::now_utc();
                    let not_after =
                        (now + std_to_time(subject.default_validity())).min(ca.not_after);
                    ca.issue_between(&subject, now - std_to_time(CLOCK_SKEW), not_after)?
                }
            };
            issued.write(&args.out)?;
            Ok(format!(
                "{}: {}, serial {}, valid until {}",
                args.out.join("cert.pem").display(),
                subject.describe(&ca.trust_domain),
                issued.serial_hex,
                utc(issued.not_after)
            ))
        }
        CaCommand::Revoke { dir, cert, serial } => {
            let ca = Ca::load(dir)?;
            let serial = match (cert, serial) {
                (Some(path), _) => serial_of(path)?,
                (None, Some(s)) => s.clone(),
                (None, None) => unreachable!("clap requires --cert or --serial"),
            };
            let crl = ca.revoke(&serial)?;
            Ok(format!(
                "revoked serial {serial}; {} lists every revoked certificate (serve --crl re-reads it)",
                crl.display()
            ))
        }
    }
}

/// The serial number of the PEM certificate at `path`, in hex.
pub fn serial_of(path: &Path) -> Result<String, CaError> {
    let der = CertificateDer::from_pem_slice(read(path)?.as_bytes())
        .map_err(|e| invalid(path, format!("no PEM certificate: {e}")))?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(path, e))?;
    Ok(hex(x509.raw_serial()))
}

#[cfg(test)]
mod tests;
