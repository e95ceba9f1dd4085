use super::*;
use proptest::prelude::*;

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn id(kind: Kind, name: &str) -> SpiffeId {
    SpiffeId::new(TrustDomain::default(), kind, name).unwrap()
}

/// A DER certificate with these SANs (URIs and DNS names), self-signed.
fn cert_with(uris: &[&str], dns: &[&str]) -> Vec<u8> {
    let mut params =
        rcgen::CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>())
            .unwrap();
    for u in uris {
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(*u).unwrap(),
        ));
    }
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn a_vehicle_certificate_names_its_vehicle() {
    let der = cert_with(&["spiffe://misaki.local/vehicle/car-1"], &[]);
    let got = from_certificate(&der, &TrustDomain::default()).unwrap();
    assert_eq!(got, id(Kind::Vehicle, "car-1"));
    assert_eq!(got.to_string(), "spiffe://misaki.local/vehicle/car-1");
}

#[test]
fn certificates_without_exactly_one_identity_of_our_trust_domain_have_none() {
    let ours = TrustDomain::default();
    let dns_only = cert_with(&[], &["cp.example"]);
    assert_eq!(
        from_certificate(&dns_only, &ours),
        Err(IdentityError::NoSpiffeId)
    );
    let two = cert_with(
        &[
            "spiffe://misaki.local/vehicle/car-1",
            "spiffe://misaki.local/vehicle/car-2",
        ],
        &[],
    );
    assert_eq!(
        from_certificate(&two, &ours),
        Err(IdentityError::SeveralUris(2))
    );
    let other = cert_with(&["spiffe://other.fleet/vehicle/car-1"], &[]);
    assert!(matches!(
        from_certificate(&other, &ours),
        Err(IdentityError::WrongTrustDomain { .. })
    ));
    let web = cert_with(&["https://misaki.local/vehicle/car-1"], &[]);
    assert!(matches!(
        from_certificate(&web, &ours),
        Err(IdentityError::BadUri { .. })
    ));
    assert!(matches!(
        from_certificate(b"garbage", &ours),
        Err(IdentityError::BadCertificate(_))
    ));
}

#[test]
fn only_canonical_spellings_parse() {
    for bad in [
        "spiffe://misaki.local/vehicle/car-1/",
        "spiffe://misaki.local/vehicle/",
        "spiffe://misaki.local/vehicle",
        "spiffe://misaki.local//vehicle/car-1",
        "SPIFFE://misaki.local/vehicle/car-1",
        "spiffe://Misaki.local/vehicle/car-1",
        "spiffe://misaki.local:443/vehicle/car-1",
        "spiffe://misaki.local/vehicle/car%2D1",
        "spiffe://misaki.local/vehicle/..",
        "spiffe://misaki.local/vehicle/car-1?x=1",
        "spiffe://misaki.local/server/cp",
        "spiffe:///vehicle/car-1",
    ] {
        assert!(SpiffeId::parse(bad).is_err(), "{bad} parsed");
    }
}

#[test]
fn denials_name_the_certificate_and_the_claim() {
    let e = authorize(&Ok(id(Kind::Vehicle, "car-1")), Claimed::Vehicle("car-2")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("spiffe://misaki.local/vehicle/car-1") && msg.contains("\"car-2\""),
        "{msg}"
    );
    let e = authorize(&Ok(id(Kind::Claim, "car-1")), Claimed::Vehicle("car-1")).unwrap_err();
    assert!(matches!(e, Denied::Claim { .. }), "{e}");
    let e = authorize(&Err(IdentityError::NoSpiffeId), Claimed::Cloud).unwrap_err();
    assert!(e.to_string().contains("role cloud"), "{e}");
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,128}".prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn trust_domain() -> impl Strategy<Value = TrustDomain> {
    "[a-z0-9._-]{1,40}".prop_map(|s| td(&s))
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

fn spiffe_id() -> impl Strategy<Value = SpiffeId> {
    (trust_domain(), kind(), name()).prop_map(|(t, k, n)| SpiffeId::new(t, k, &n).unwrap())
}

fn claimed() -> impl Strategy<Value = (bool, String)> {
    (any::<bool>(), name())
}

proptest! {
    #[test]
    fn display_and_parse_are_inverse(id in spiffe_id()) {
        prop_assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id));
    }

    /// Whatever string parses is the canonical spelling of what it parsed to.
    #[test]
    fn parse_never_panics_and_accepts_only_canonical_text(
        s in "(spiffe://)?[a-zA-Z0-9./%:_?#@-]{0,60}"
    ) {
        if let Ok(id) = SpiffeId::parse(&s) {
            prop_assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn reading_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = from_certificate(&bytes, &TrustDomain::default());
    }

    /// A real certificate with bytes flipped or cut short: an error or an identity,
    /// never a panic; and never an identity the original did not carry.
    #[test]
    fn corrupted_certificates_never_panic_nor_change_identity(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut der = CERT.clone();
        for (at, byte) in flips {
            let i = at.index(der.len());
            der[i] = byte;
        }
        if truncate {
            der.truncate(cut.index(der.len()));
        }
        if let Ok(got) = from_certificate(&der, &TrustDomain::default()) {
            // A flipped byte inside the URI could rename it to another valid name;
            // it is still one identity of the right kind and trust domain.
            prop_assert_eq!(got.trust_domain(), &TrustDomain::default());
        }
    }

    /// The whole authorization rule, stated independently.
    #[test]
    fn a_peer_acts_only_as_itself(id in spiffe_id(), (vehicle, v) in claimed()) {
        let claim = if vehicle { Claimed::Vehicle(&v) } else { Claimed::Cloud };
        let expect = match (id.kind(), claim) {
            (Kind::Vehicle, Claimed::Vehicle(c)) => id.name() == c,
            (Kind::Cloud, Claimed::Cloud) => true,
            _ => false,
        };
        prop_assert_eq!(authorize(&Ok(id.clone()), claim).is_ok(), expect);
        // The same name as a claim credential never passes.
        let as_claim = SpiffeId::new(id.trust_domain().clone(), Kind::Claim, id.name()).unwrap();
        prop_assert!(authorize(&Ok(as_claim), claim).is_err());
    }
}

static CERT: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| cert_with(&["spiffe://misaki.local/vehicle/car-1"], &["a.b"]));
