//! misaki-cp and its admin endpoint as the load generator uses them: thin `anyhow`
//! wrappers over `misaki_harness`, which holds the process guards (killed on drop,
//! pids in the `--pidfile` for the wrapper script's trap), the `/proc` readers and the
//! HTTP client.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use misaki_harness::{CpLaunch, Process, http, try_free_port};

/// `GET path` from the admin server on `127.0.0.1:port`: (status, body). A minute's
/// read timeout: `/nodes` and `/metrics` of a large fleet take a while.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let r = http::get_timeout(port, path, Duration::from_secs(60))?;
    Ok((r.status, r.body))
}

/// `misaki-cp serve` on loopback ports, logs in `dir`.
pub fn start_cp(bin: &Path, policy: &Path, dir: &Path, tag: &str) -> Result<(Process, u16, u16)> {
    start_cp_with(bin, policy, dir, tag, &[])
}

/// [`start_cp`] with more `serve` arguments (the TLS files). `RUST_LOG` is
/// `$MISAKI_CP_LOG`, else `info`.
pub fn start_cp_with(
    bin: &Path,
    policy: &Path,
    dir: &Path,
    tag: &str,
    extra: &[OsString],
) -> Result<(Process, u16, u16)> {
    let (xds, admin) = (try_free_port()?, try_free_port()?);
    let mut launch = CpLaunch::new(
        bin,
        policy,
        xds,
        admin,
        dir.join(format!("misaki-cp-{tag}.log")),
    );
    launch.extra = extra.to_vec();
    launch.rust_log = std::env::var("MISAKI_CP_LOG").unwrap_or_else(|_| "info".into());
    launch.ready_within = Duration::from_secs(30);
    Ok((launch.start()?, xds, admin))
}
