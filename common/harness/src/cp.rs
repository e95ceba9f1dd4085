//! `misaki-cp serve` as a child process, waited for until ready.

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{Process, http, poll};

/// How to start `misaki-cp serve` on loopback ports: `BIN serve --policy POLICY
/// --xds-addr 127.0.0.1:XDS --admin-addr 127.0.0.1:ADMIN EXTRA…` with `RUST_LOG` set,
/// its output in `log`.
#[derive(Debug, Clone)]
pub struct CpLaunch {
    pub bin: PathBuf,
    pub policy: PathBuf,
    pub xds_port: u16,
    pub admin_port: u16,
    /// More `serve` arguments (TLS files, `--probe-addr`, …).
    pub extra: Vec<OsString>,
    pub log: PathBuf,
    /// `RUST_LOG` for misaki-cp (`info` unless set).
    pub rust_log: String,
    /// How long to wait for `/readyz` (20 s unless set).
    pub ready_within: Duration,
}

impl CpLaunch {
    pub fn new(
        bin: impl Into<PathBuf>,
        policy: impl Into<PathBuf>,
        xds_port: u16,
        admin_port: u16,
        log: impl Into<PathBuf>,
    ) -> CpLaunch {
        CpLaunch {
            bin: bin.into(),
            policy: policy.into(),
            xds_port,
            admin_port,
            extra: Vec::new(),
            log: log.into(),
            rust_log: "info".into(),
            ready_within: Duration::from_secs(20),
        }
    }

    /// Start it and wait until its admin port answers `/readyz` with 200. The error
    /// quotes misaki-cp's log: its last lines if it exited, all of it if it never
    /// became ready.
    pub fn start(&self) -> io::Result<Process> {
        let mut proc = Process::try_spawn(
            "misaki-cp",
            Command::new(&self.bin)
                .arg("serve")
                .arg("--policy")
                .arg(&self.policy)
                .arg("--xds-addr")
                .arg(format!("127.0.0.1:{}", self.xds_port))
                .arg("--admin-addr")
                .arg(format!("127.0.0.1:{}", self.admin_port))
                .args(&self.extra)
                .env("RUST_LOG", &self.rust_log),
            &self.log,
        )?;
        let admin = self.admin_port;
        let ready = poll(self.ready_within, Duration::from_millis(20), || {
            proc.check_alive()?;
            io::Result::Ok(http::get(admin, "/readyz").ok().filter(|r| r.status == 200))
        })?;
        match ready {
            Some(_) => Ok(proc),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "misaki-cp did not become ready within {:?}:\n{}",
                    self.ready_within,
                    proc.log_text()
                ),
            )),
        }
    }
}
