//! Validates a policy file or directory and prints every error.
//!
//! `cargo run -p misaki-policy --example check -- examples/quickstart/mesh.yaml`
//! Exits 0 when valid, 64 (EX_USAGE, a bad configuration) when not.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: check <policy.yaml | policy-dir>");
        return ExitCode::from(64);
    };
    match misaki_policy::load_path(Path::new(&path)) {
        Ok(p) => {
            println!(
                "ok: {} uplinks, {} classes, {} services",
                p.uplinks.len(),
                p.classes.len(),
                p.services.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.len());
            ExitCode::from(64)
        }
    }
}
