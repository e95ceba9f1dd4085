//! `misaki-cp`: the misaki control plane binary. See `misaki-cp --help`.

use misaki_cp::cli::{Cli, Command};
use misaki_cp::run;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse_or_exit();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let code = match cli.command {
        Command::Validate { path } => match misaki_policy::load_path(&path) {
            Ok(p) => {
                println!(
                    "{}: valid ({} uplinks, {} classes, {} services)",
                    path.display(),
                    p.uplinks.len(),
                    p.classes.len(),
                    p.services.len()
                );
                0
            }
            Err(errors) => {
                eprintln!("{errors}");
                1
            }
        },
        Command::Ca(cmd) => match misaki_cp::ca::run_command(&cmd) {
            Ok(done) => {
                println!("{done}");
                0
            }
            Err(e) => {
                eprintln!("misaki-cp ca: {e}");
                if e.is_usage() {
                    misaki_cp::cli::EXIT_USAGE
                } else {
                    1
                }
            }
        },
        Command::Policy(cmd) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(misaki_cp::store::run_command(&cmd)) {
                Ok(done) => {
                    println!("{done}");
                    0
                }
                Err(misaki_cp::store::StoreError::Invalid(errors)) => {
                    eprintln!("{errors}");
                    eprintln!("misaki-cp policy: invalid policy, nothing written");
                    misaki_cp::cli::EXIT_USAGE
                }
                Err(e) => {
                    eprintln!("misaki-cp policy: {e}");
                    if e.is_usage() {
                        misaki_cp::cli::EXIT_USAGE
                    } else {
                        1
                    }
                }
            }
        }
        Command::Serve(args) => {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(run::serve(*args, shutdown_signal())) {
                Ok(()) => 0,
                Err(e) if e.is_usage() => {
                    eprintln!("misaki-cp: {e}");
                    misaki_cp::cli::EXIT_USAGE
                }
                Err(e) => {
                    eprintln!("misaki-cp: {e}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
