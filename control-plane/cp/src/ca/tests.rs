use super::*;
use std::os::unix::fs::PermissionsExt;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn new_ca(dir: &Path) -> Ca {
    Ca::init(dir, TrustDomain::default(), Duration::from_secs(3600 * 24)).unwrap()
}

#[test]
fn init_writes_a_private_key_nobody_else_can_read_and_never_overwrites_a_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let ca = new_ca(&dir);
    assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(ca.trust_domain().as_str(), "misaki.local");
    assert_eq!(
        fs::read_to_string(dir.join(TRUST_DOMAIN_FILE)).unwrap(),
        "misaki.local\n"
    );
    let again = Ca::init(&dir, TrustDomain::default(), Duration::from_secs(60)).unwrap_err();
    assert!(matches!(again, CaError::Exists(_)), "{again}");
    assert!(again.is_usage());
}

#[test]
fn issued_identities_read_back_and_keys_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    for (subject, uri) in [
        (
            Subject::Vehicle("car-1".into()),
            "spiffe://misaki.local/vehicle/car-1",
        ),
        (
            Subject::Cloud("maps".into()),
            "spiffe://misaki.local/cloud/maps",
        ),
        (
            Subject::Claim("car-1".into()),
            "spiffe://misaki.local/claim/car-1",
        ),
    ] {
        let out = tmp
            .path()
            .join(uri.rsplit('/').take(2).collect::<Vec<_>>().join("-"));
        let issued = ca.issue(&subject, Duration::from_secs(3600)).unwrap();
        issued.write(&out).unwrap();
        assert_eq!(mode(&out.join("key.pem")), 0o600);
        let der = CertificateDer::from_pem_file(out.join("cert.pem")).unwrap();
        let id = misaki_identity::from_certificate(&der, ca.trust_domain()).unwrap();
        assert_eq!(id.to_string(), uri);
        assert_eq!(fs::read_to_string(out.join("ca.pem")).unwrap(), ca.cert_pem);
        assert_eq!(serial_of(&out.join("cert.pem")).unwrap(), issued.serial_hex);
    }
}

#[test]
fn server_certificates_carry_dns_and_ip_names_and_no_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    let subject = Subject::Server(vec!["cp.fleet.example".into(), "127.0.0.1".into()]);
    let issued = ca.issue(&subject, Duration::from_secs(3600)).unwrap();
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = x509.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        ["DNSName(cp.fleet.example)", "IPAddress(7f:00:00:01)"]
    );
    assert_eq!(
        misaki_identity::from_certificate(&der, ca.trust_domain()),
        Err(misaki_identity::IdentityError::NoSpiffeId)
    );
    assert_eq!(
        subject.describe(ca.trust_domain()),
        "server cp.fleet.example, 127.0.0.1"
    );
}

#[test]
fn a_certificate_never_outlives_its_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = new_ca(&tmp.path().join("ca"));
    let e = ca
        .issue(
            &Subject::Vehicle("car-1".into()),
            Duration::from_secs(3600 * 48),
        )
        .unwrap_err();
    assert!(matches!(e, CaError::OutlivesCa { .. }), "{e}");
}

#[test]
fn load_refuses_a_key_that_is_not_the_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    new_ca(&a);
    new_ca(&b);
    fs::copy(b.join(CA_KEY), a.join(CA_KEY)).unwrap();
    let e = Ca::load(&a).unwrap_err();
    assert!(e.to_string().contains("does not belong"), "{e}");
    fs::remove_file(b.join(TRUST_DOMAIN_FILE)).unwrap();
    assert!(
        Ca::load(&b)
            .unwrap_err()
            .to_string()
            .contains("trust-domain")
    );
}

#[test]
fn revoking_lists_each_serial_once_in_a_signed_crl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let ca = new_ca(&dir);
    let one = ca
        .issue(&Subject::Vehicle("car-1".into()), Duration::from_secs(60))
        .unwrap();
    let two = ca
        .issue(&Subject::Vehicle("car-2".into()), Duration::from_secs(60))
        .unwrap();
    ca.revoke(&one.serial_hex).unwrap();
    ca.revoke(&one.serial_hex).unwrap();
    let crl_path = ca.revoke(&two.serial_hex.to_uppercase()).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join(REVOKED))
            .unwrap()
            .lines()
            .count(),
        2
    );
    let der = CertificateRevocationListDer::from_pem_file(&crl_path).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    let serials: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex(r.raw_serial()))
        .collect();
    assert_eq!(serials, [one.serial_hex, two.serial_hex]);
    assert!(ca.revoke("xyz").unwrap_err().is_usage());
}

use rustls_pki_types::CertificateRevocationListDer;

/// `ca init` and `ca issue --claim` with their default lifetimes (both ten years): the
/// claim is cut at the CA's end instead of being refused for outliving it.
#[test]
fn a_default_claim_right_after_a_default_ca_is_issued_within_the_ca() {
    use clap::Parser;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = tmp.path().join("claim");
    let run = |args: &str| {
        let cli = crate::cli::Cli::try_parse_from(args.split_whitespace()).unwrap();
        let crate::cli::Command::Ca(command) = cli.command else {
            panic!("not a ca command: {args}");
        };
        run_command(&command)
    };
    run(&format!("misaki-cp ca init {}", dir.display())).unwrap();
    let said = run(&format!(
        "misaki-cp ca issue {} --claim car-1 --out {}",
        dir.display(),
        out.display()
    ))
    .unwrap();
    let ca = Ca::load(&dir).unwrap();
    assert!(said.contains(&utc(ca.not_after())), "{said}");
    assert!(!serial_of(&out.join("cert.pem")).unwrap().is_empty());
}
