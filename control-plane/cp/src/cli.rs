//! Command line of `misaki-cp`. Parsed before anything binds a port; bad flags exit 64
//! (EX_USAGE) with a usage message. Every value is checked here (durations, trust
//! domains, identity names, server names), so a bad one is a usage error too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};
use misaki_identity::TrustDomain;

/// misaki control plane: serves Envoy sidecars over xDS, compiled from mesh policy YAML.
#[derive(Debug, Parser)]
#[command(name = "misaki-cp", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve xDS (ADS, SotW and delta), the fleet API and the admin HTTP API.
    Serve(Box<ServeArgs>),
    /// Check a policy file or directory; print every error. Exit 0 if valid, 1 if not.
    Validate {
        /// A policy YAML file, or a directory of them.
        path: PathBuf,
    },
    /// The fleet's certificate authority: create it, issue identities, revoke them.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The policy in etcd (shared mode): apply a file, list revisions, roll back.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file or directory (every error, exit 64, nothing written),
    /// then make it the current policy in etcd as a new revision; "unchanged" if it
    /// already is.
    Apply {
        /// A policy YAML file, or a directory of them.
        path: PathBuf,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the kept revisions, newest first.
    History {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Make revision REV's policy current again, as a new revision.
    Rollback {
        revision: u64,
        #[command(flatten)]
        store: StoreArg,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArg {
    /// The etcd cluster holding the policy.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]", value_parser = store_url)]
    pub store: StoreUrl,
    #[command(flatten)]
    pub tls: StoreTls,
}

/// TLS to etcd (its client port with `--cert-file`, and `--client-cert-auth`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreTls {
    /// CA certificates (PEM) etcd's server certificate must chain to; turns on TLS to
    /// etcd (the endpoints of `--store` are then dialled with https).
    #[arg(long, value_name = "FILE")]
    pub store_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd, for its `--client-cert-auth`.
    #[arg(long, value_name = "FILE", requires_all = ["store_ca", "store_key"])]
    pub store_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["store_ca", "store_cert"])]
    pub store_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CaCommand {
    /// Create a CA in DIR: ca.pem, ca-key.pem (mode 0600), trust-domain.
    Init {
        dir: PathBuf,
        /// SPIFFE trust domain of every identity this CA issues.
        #[arg(long, default_value = misaki_identity::DEFAULT_TRUST_DOMAIN, value_parser = trust_domain)]
        trust_domain: TrustDomain,
        /// Lifetime of the CA certificate (`87600h` is ten years).
        #[arg(long, default_value = "87600h", value_parser = duration)]
        valid_for: Duration,
    },
    /// Issue a certificate and key into OUTDIR: cert.pem, key.pem (mode 0600), ca.pem.
    Issue(IssueArgs),
    /// Revoke a certificate: add it to DIR/revoked and rewrite DIR/crl.pem.
    #[command(group(ArgGroup::new("which").required(true).args(["cert", "serial"])))]
    Revoke {
        dir: PathBuf,
        /// The certificate to revoke (PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Its serial number in hex, as `ca issue` printed it.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
#[command(group(ArgGroup::new("identity").required(true).args(["vehicle", "cloud", "server", "claim"])))]
pub struct IssueArgs {
    /// The CA directory (`ca init`).
    pub dir: PathBuf,
    /// A vehicle identity: URI SAN spiffe://TD/vehicle/ID.
    #[arg(long, value_name = "ID", value_parser = name)]
    pub vehicle: Option<String>,
    /// A cloud sidecar identity: URI SAN spiffe://TD/cloud/NAME.
    #[arg(long, value_name = "NAME", value_parser = name)]
    pub cloud: Option<String>,
    /// A server certificate for misaki-cp: DNS SANs, IP SANs for IP literals.
    #[arg(long, value_name = "NAME", num_args = 1.., value_parser = server_name)]
    pub server: Vec<String>,
    /// A claim credential bound to vehicle ID (URI SAN spiffe://TD/claim/ID): it can
    /// only enrol that vehicle, never fetch configuration or report.
    #[arg(long, value_name = "ID", value_parser = name)]
    pub claim: Option<String>,
    /// Lifetime (default: 2160h = 90 days; a claim credential 87600h = ten years).
    #[arg(long, value_parser = duration)]
    pub valid_for: Option<Duration>,
    /// Where to write cert.pem, key.pem and ca.pem (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Policy YAML file or directory, watched for edits. Without it the embedded
    /// quickstart policy (examples/quickstart/mesh.yaml) is served. With `--store`,
    /// its valid edits are applied to etcd (`policy apply`) instead.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Shared mode: the policy comes from etcd and is followed live; not ready (and no
    /// xDS served) until etcd has one.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]", value_parser = store_url)]
    pub store: Option<StoreUrl>,
    /// Shared mode: TTL of this replica's etcd lease, under which it writes its
    /// vehicles' presence. When it dies its vehicles show offline on the others within
    /// this; cut off from etcd this long, it stops taking vehicles (whole seconds).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = lease_ttl, requires = "store")]
    pub lease_ttl: Duration,
    #[command(flatten)]
    pub store_tls: StoreTls,
    /// Shared mode: the internal peer port, where other replicas fetch the full record
    /// (RTT, loss, queues) of vehicles reporting here for their `/fleet/{vehicle}`.
    /// Plain HTTP: keep it on the cluster network. Off when not given.
    #[arg(long, value_name = "HOST:PORT", requires = "store")]
    pub peer_addr: Option<SocketAddr>,
    /// The address other replicas reach the peer port at (default: `--peer-addr`;
    /// needed when that is 0.0.0.0, e.g. the pod's IP on Kubernetes).
    #[arg(long, value_name = "HOST:PORT", requires = "peer_addr")]
    pub peer_advertise: Option<String>,
    /// gRPC address for xDS (ADS) and the fleet API.
    #[arg(long, default_value = "127.0.0.1:18000")]
    pub xds_addr: SocketAddr,
    /// Admin HTTP address (/healthz /readyz /metrics /policy /nodes /fleet).
    #[arg(long, default_value = "127.0.0.1:19000")]
    pub admin_addr: SocketAddr,
    /// Each gRPC connection gets a GOAWAY at this age (± 10 %, drawn per connection),
    /// so Envoys and edge-netd reconnect through the load balancer and spread over
    /// replicas added since. `0s`: connections live as long as their peer.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = connection_age)]
    pub max_connection_age: Duration,
    /// How long streams may stay open after that GOAWAY before the connection is
    /// cut (ADS streams do not end by themselves; the cut makes the client move).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub max_connection_age_grace: Duration,
    /// UDP echo address answering edge-netd's link probes (off when not given).
    #[arg(long)]
    pub probe_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Mutual TLS on the gRPC port (docs/security.md). All three of `--tls-cert`,
/// `--tls-key`, `--client-ca` turn it on; the files are re-read when they change.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Server certificate chain (PEM) presented on the gRPC port.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "client_ca"])]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation list(s) (PEM); a client whose issuer has no CRL here is
    /// refused once a CRL is given.
    #[arg(long, value_name = "FILE", requires = "client_ca")]
    pub crl: Option<PathBuf>,
    /// A CA directory (`misaki-cp ca init`) for signing enrolment CSRs; its trust
    /// domain is the default for `--trust-domain`.
    #[arg(long, value_name = "DIR", requires = "client_ca")]
    pub ca: Option<PathBuf>,
    /// Lifetime of certificates issued by enrolment (a claim's or a renewal; `168h` is
    /// 7 days), cut short at the CA's own expiry.
    #[arg(long, value_name = "DURATION", default_value = "168h", value_parser = duration, requires = "ca")]
    pub enrol_valid_for: Duration,
    /// Trust domain of client identities (default: the `--ca` directory's, else
    /// misaki.local).
    #[arg(long, value_parser = trust_domain, requires = "client_ca")]
    pub trust_domain: Option<TrustDomain>,
    /// Longest a TLS handshake may take before the connection is dropped.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Most TLS handshakes in progress at once; further connections wait in the
    /// accept queue.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_handshakes: u32,
}

impl TlsArgs {
    /// Whether mutual TLS is on.
    pub fn enabled(&self) -> bool {
        self.client_ca.is_some()
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    match misaki_policy::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than 0s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn connection_age(s: &str) -> Result<Duration, String> {
    misaki_policy::parse_duration(s).map_err(|e| e.to_string())
}

fn lease_ttl(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < Duration::from_secs(2) || d.subsec_nanos() != 0 {
        return Err(format!(
            "{s}: an etcd lease TTL is whole seconds, at least 2s"
        ));
    }
    Ok(d)
}

fn store_url(s: &str) -> Result<StoreUrl, String> {
    s.parse()
}

/// `--store`: the etcd endpoints, as `http://HOST:PORT` URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl(pub Vec<String>);

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{url:?}: {why} (expected etcd://HOST:PORT[,HOST:PORT...])");
        let hosts = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("it must start with etcd://"))?;
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| bad("each endpoint needs a port"))?;
            if name.is_empty() || name.contains('/') || port.parse::<u16>().is_err() {
                return Err(bad("each endpoint must be HOST:PORT"));
            }
            endpoints.push(format!("http://{host}"));
        }
        Ok(StoreUrl(endpoints))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self
            .0
            .iter()
            .map(|e| e.strip_prefix("http://").unwrap_or(e))
            .collect();
        write!(f, "etcd://{}", hosts.join(","))
    }
}

fn trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

fn name(s: &str) -> Result<String, String> {
    if misaki_identity::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(misaki_identity::IdentityError::BadName(s.to_string()).to_string())
    }
}

/// A DNS name (labels of letters, digits and `-`, an optional leading `*.`) or an IP
/// literal.
fn server_name(s: &str) -> Result<String, String> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let host = s.strip_prefix("*.").unwrap_or(s);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.len() <= 253 && host.split('.').all(label_ok) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is neither a DNS name nor an IP address"))
    }
}

/// EX_USAGE from sysexits.h.
pub const EXIT_USAGE: i32 = 64;

impl Cli {
    /// Parse argv; on bad usage print the message and exit 64 (help/version exit 0).
    pub fn parse_or_exit() -> Cli {
        match Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) => {
                let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
                let _ = e.print();
                std::process::exit(code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("misaki-cp").chain(args.split_whitespace()))
    }

    #[test]
    fn issue_takes_exactly_one_identity() {
        assert!(parse("ca issue d --vehicle car-1 --out o").is_ok());
        let both = parse("ca issue d --vehicle car-1 --cloud c --out o").unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse("ca issue d --out o").is_err());
        let Command::Ca(CaCommand::Issue(a)) =
            parse("ca issue d --server cp.example 10.0.0.1 --out o")
                .unwrap()
                .command
        else {
            panic!("expected issue");
        };
        assert_eq!(a.server, ["cp.example", "10.0.0.1"]);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for bad in [
            "ca issue d --vehicle car/1 --out o",
            "ca issue d --vehicle .. --out o",
            "ca issue d --server bad_name! --out o",
            "ca issue d --vehicle car-1 --valid-for 1d --out o",
            "ca issue d --vehicle car-1 --valid-for 0s --out o",
            "ca init d --trust-domain Misaki.Local",
            "serve --tls-cert c --tls-key k",
            "serve --crl x",
            "serve --tls-cert c --tls-key k --client-ca a --max-handshakes 0",
            "serve --tls-cert c --tls-key k --client-ca a --enrol-valid-for 24h",
            "serve --tls-cert c --tls-key k --client-ca a --ca d --enrol-valid-for 7d",
            "serve --store http://127.0.0.1:2379",
            "policy apply p.yaml",
            "policy apply p.yaml --store etcd://x",
            "policy rollback x --store etcd://x:1",
        ] {
            let e = parse(bad).map(|_| ()).unwrap_err();
            assert!(e.use_stderr(), "{bad}: {e}");
        }
    }

    #[test]
    fn store_urls() {
        let u: StoreUrl = "etcd://127.0.0.1:2379,etcd-1:2379".parse().unwrap();
        assert_eq!(u.0, ["http://127.0.0.1:2379", "http://etcd-1:2379"]);
        assert_eq!(u.to_string(), "etcd://127.0.0.1:2379,etcd-1:2379");
        for bad in [
            "http://x:1",
            "etcd://x",
            "etcd://x:port",
            "etcd://:1",
            "etcd://a:1,",
        ] {
            assert!(bad.parse::<StoreUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_is_on_with_all_three_files() {
        let Command::Serve(a) = parse("serve --tls-cert c --tls-key k --client-ca a --crl r")
            .unwrap()
            .command
        else {
            panic!("expected serve");
        };
        assert!(a.tls.enabled());
        assert_eq!(a.tls.handshake_timeout, Duration::from_secs(10));
        assert_eq!(a.tls.enrol_valid_for, Duration::from_secs(7 * 24 * 3600));
        let Command::Serve(a) =
            parse("serve --tls-cert c --tls-key k --client-ca a --ca d --enrol-valid-for 36h")
                .unwrap()
                .command
        else {
            panic!("expected serve");
        };
        assert_eq!(a.tls.enrol_valid_for, Duration::from_secs(36 * 3600));
        let Command::Serve(a) = parse("serve").unwrap().command else {
            panic!("expected serve");
        };
        assert!(!a.tls.enabled());
    }
}
