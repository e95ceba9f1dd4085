//! `edge-netd --config /etc/misaki/edge-netd.yaml`
//!
//! Exit codes: 0 on SIGTERM/SIGINT, 64 (EX_USAGE) on a bad command line or config,
//! 1 on a start-up failure (e.g. the API port is taken).

use std::process::ExitCode;

const EX_USAGE: u8 = 64;

fn usage() -> ExitCode {
    eprintln!("usage: edge-netd --config <file.yaml> [--check]");
    ExitCode::from(EX_USAGE)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (path, check_only) = match args.as_slice() {
        [flag, path] if flag == "--config" => (path.clone(), false),
        [flag, path, check] | [check, flag, path] if flag == "--config" && check == "--check" => {
            (path.clone(), true)
        }
        _ => return usage(),
    };
    // Parse before binding anything: a bad config must not half-start the daemon.
    let config = match edge_netd::Config::load(std::path::Path::new(&path)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-netd: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if check_only {
        println!("{path}: ok");
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
    let result = rt.block_on(edge_netd::run(config, async {
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
    }));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-netd: {e}");
            ExitCode::FAILURE
        }
    }
}
