//! `edge-netd --config /etc/misaki/edge-netd.yaml [--check]`; see `edge-netd --help`.
//!
//! Exit codes: 0 on SIGTERM/SIGINT (and for `--help`, `--version`, a good `--check`),
//! 64 (EX_USAGE) on a bad command line or config, 1 on a start-up failure (e.g. the API
//! port is taken).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

const EX_USAGE: u8 = 64;

/// misaki's per-vehicle network daemon: picks an uplink per traffic class, serves the
/// vehicle's Envoy its configuration, queues deferrable requests durably and reports
/// link state to the control plane.
#[derive(Debug, Parser)]
#[command(name = "edge-netd", version, about)]
struct Cli {
    /// The YAML configuration (docs/edge-netd.md).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration, print every problem in it, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` are "errors" printed to stdout: not a usage error.
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Parse before binding anything: a bad config must not half-start the daemon.
    let config = match edge_netd::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-netd: invalid configuration:\n{e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if cli.check {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-netd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(edge_netd::run(config, terminated())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-netd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT (never, if the handlers cannot be installed).
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
