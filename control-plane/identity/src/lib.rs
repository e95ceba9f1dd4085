//! Fleet identities: who a peer is, read from its certificate, and what it may act as.
//!
//! An identity is a SPIFFE ID in the certificate's one URI SAN (the X.509-SVID rule):
//!
//! | kind | URI SAN | may (checked by [`authorize`]) |
//! |---|---|---|
//! | vehicle | `spiffe://TD/vehicle/ID` | fetch the xDS config of vehicle `ID` (any `node.id`), report as vehicle `ID` |
//! | cloud | `spiffe://TD/cloud/NAME` | fetch cloud-sidecar config (any `node.id`) |
//! | claim | `spiffe://TD/claim/ID` | nothing here: a factory credential that can only enrol vehicle `ID` |
//!
//! Server certificates (`misaki-cp ca issue --server`) carry DNS/IP SANs and no SPIFFE
//! ID: they name a host to the clients that dial it, never a client.
//!
//! Invariants:
//! - [`SpiffeId`]'s `Display` and [`SpiffeId::parse`] are inverse, and parse accepts
//!   only that canonical spelling: names are 1..=128 bytes of `[A-Za-z0-9._-]` (not `.`
//!   or `..`), trust domains `[a-z0-9._-]`, so nothing is escaped and no two strings
//!   name one identity (property-tested);
//! - reading a certificate never panics, whatever its bytes (property-tested): a
//!   malformed certificate is an [`IdentityError`], which authorizes nothing;
//! - a claim identity authorizes nothing in [`authorize`]: only the vehicle and cloud
//!   kinds are operational, so a claim credential can never pass as one.
//!
//! The crate is pure (no TLS, no I/O): misaki-cp's acceptor reads the identity once per
//! connection and attaches a [`TlsPeer`] to every request on it (a tonic request
//! extension); the xDS and fleet services call [`authorize`] with what the client says.

use std::fmt;
use std::net::SocketAddr;

/// The trust domain when none is given: a name under `.local` cannot collide with a
/// public domain another fleet's CA could issue for.
pub const DEFAULT_TRUST_DOMAIN: &str = "misaki.local";
/// Longest vehicle id, cloud name or claim id (the fleet registry's vehicle id limit).
pub const MAX_NAME_LEN: usize = 128;
/// Longest trust domain (the SPIFFE limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// What kind of principal an identity names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Vehicle,
    Cloud,
    /// A claim credential: enrolment only, never an operational identity.
    Claim,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Vehicle, Kind::Cloud, Kind::Claim];

    /// The SPIFFE path segment.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Vehicle => "vehicle",
            Kind::Cloud => "cloud",
            Kind::Claim => "claim",
        }
    }
}

/// Why no identity could be read, or a name is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("not a readable X.509 certificate: {0}")]
    BadCertificate(String),
    #[error(
        "certificate has no URI SAN (a misaki identity is spiffe://TD/vehicle/ID or spiffe://TD/cloud/NAME)"
    )]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an identity certificate has exactly one")]
    SeveralUris(usize),
    #[error("{uri:?} is not a misaki SPIFFE ID: {why}")]
    BadUri { uri: String, why: &'static str },
    #[error("trust domain {0:?} is not valid: 1..=255 characters of a-z 0-9 . - _")]
    BadTrustDomain(String),
    #[error("identity {uri} is from trust domain {got:?}; this control plane trusts {want:?}")]
    WrongTrustDomain {
        uri: String,
        got: String,
        want: String,
    },
    #[error("name {0:?} is not valid: 1..=128 characters of A-Z a-z 0-9 . - _ (not . or ..)")]
    BadName(String),
}

/// A SPIFFE trust domain (`misaki.local`), validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_TRUST_DOMAIN_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(TrustDomain(name.to_string()))
        } else {
            Err(IdentityError::BadTrustDomain(name.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        TrustDomain(DEFAULT_TRUST_DOMAIN.to_string())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

/// Whether `name` may be a vehicle id, cloud name or claim id: SPIFFE path characters
/// only, so it needs no escaping in a URI and reads back unchanged.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// One fleet identity: `spiffe://<trust domain>/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    kind: Kind,
    name: String,
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, kind: Kind, name: &str) -> Result<Self, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::BadName(name.to_string()));
        }
        Ok(SpiffeId {
            trust_domain,
            kind,
            name: name.to_string(),
        })
    }

    /// Read the canonical spelling written by `Display`; anything else is an error.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let bad = |why| IdentityError::BadUri {
            uri: uri.to_string(),
            why,
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("expected the scheme spiffe://"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected spiffe://TD/KIND/NAME"));
        };
        let trust_domain = TrustDomain::new(td)?;
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| bad("the kind must be vehicle, cloud or claim"))?;
        SpiffeId::new(trust_domain, kind, name)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}/{}",
            self.trust_domain,
            self.kind.as_str(),
            self.name
        )
    }
}

/// The identity in a DER certificate, which must belong to `trust_domain`.
///
/// The certificate's chain, validity and revocation are the TLS layer's business; this
/// reads only its URI SAN. Never panics.
pub fn from_certificate(der: &[u8], trust_domain: &TrustDomain) -> Result<SpiffeId, IdentityError> {
    let bad = |e: &dyn fmt::Display| IdentityError::BadCertificate(e.to_string());
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(&e))?;
    if !rest.is_empty() {
        return Err(bad(&"trailing bytes after the certificate"));
    }
    let sans = cert.subject_alternative_name().map_err(|e| bad(&e))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(IdentityError::NoSpiffeId),
        [one] => *one,
        many => return Err(IdentityError::SeveralUris(many.len())),
    };
    let id = SpiffeId::parse(uri)?;
    if id.trust_domain != *trust_domain {
        return Err(IdentityError::WrongTrustDomain {
            uri: uri.to_string(),
            got: id.trust_domain.0,
            want: trust_domain.0.clone(),
        });
    }
    Ok(id)
}

/// What a client says it is: an Envoy node's role and effective vehicle id, or the
/// vehicle a fleet `Hello` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed<'a> {
    Vehicle(&'a str),
    Cloud,
}

impl fmt::Display for Claimed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claimed::Vehicle(id) => write!(f, "role vehicle, vehicle id {id:?}"),
            Claimed::Cloud => f.write_str("role cloud"),
        }
    }
}

/// Why a peer may not act as what it claims. The message names both sides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "the client certificate carries no usable identity ({error}); it cannot act as {claimed}"
    )]
    NoIdentity {
        error: IdentityError,
        claimed: String,
    },
    #[error(
        "certificate identity {id} is a claim credential: it can only enrol, never act as {claimed}"
    )]
    Claim { id: String, claimed: String },
    #[error("certificate identity {id} does not match the client's claim: {claimed}")]
    Mismatch { id: String, claimed: String },
}

/// Whether a peer with `identity` may act as `claimed`: a vehicle identity only as
/// that vehicle, a cloud identity only as the cloud role, a claim never.
pub fn authorize(
    identity: &Result<SpiffeId, IdentityError>,
    claimed: Claimed<'_>,
) -> Result<(), Denied> {
    let id = match identity {
        Ok(id) => id,
        Err(error) => {
            return Err(Denied::NoIdentity {
                error: error.clone(),
                claimed: claimed.to_string(),
            });
        }
    };
    let allowed = match (id.kind, claimed) {
        (Kind::Vehicle, Claimed::Vehicle(v)) => id.name == v,
        (Kind::Cloud, Claimed::Cloud) => true,
        (Kind::Claim, _) => {
            return Err(Denied::Claim {
                id: id.to_string(),
                claimed: claimed.to_string(),
            });
        }
        (Kind::Vehicle, Claimed::Cloud) | (Kind::Cloud, Claimed::Vehicle(_)) => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Denied::Mismatch {
            id: id.to_string(),
            claimed: claimed.to_string(),
        })
    }
}

/// The verified peer of a mutual-TLS connection: misaki-cp's acceptor attaches one to
/// every request on the connection (a tonic request extension). Its chain, validity
/// and revocation were checked in the handshake; `identity` is what its certificate
/// says. A request without one came over plaintext (TLS not configured).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub remote_addr: Option<SocketAddr>,
    pub identity: Result<SpiffeId, IdentityError>,
}

impl TlsPeer {
    /// The identity as shown on `/nodes` and `/fleet`, if the certificate has one.
    pub fn identity_uri(&self) -> Option<String> {
        self.identity.as_ref().ok().map(SpiffeId::to_string)
    }
}

#[cfg(test)]
mod tests;
