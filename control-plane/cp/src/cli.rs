//! Command line of `misaki-cp`. Parsed before anything binds a port; bad flags exit 64
//! (EX_USAGE) with a usage message.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    Serve(ServeArgs),
    /// Check a policy file or directory; print every error. Exit 0 if valid, 1 if not.
    Validate {
        /// A policy YAML file, or a directory of them.
        path: PathBuf,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Policy YAML file or directory, watched for edits. Without it the embedded
    /// quickstart policy (examples/quickstart/mesh.yaml) is served.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// gRPC address for xDS (ADS) and the fleet API.
    #[arg(long, default_value = "127.0.0.1:18000")]
    pub xds_addr: SocketAddr,
    /// Admin HTTP address (/healthz /readyz /metrics /policy /nodes /fleet).
    #[arg(long, default_value = "127.0.0.1:19000")]
    pub admin_addr: SocketAddr,
    /// UDP echo address answering edge-netd's link probes (off when not given).
    #[arg(long)]
    pub probe_addr: Option<SocketAddr>,
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
