//! Processes the benchmark starts, and what `/proc` says about them.
//!
//! Every child is held by a [`Guard`] that kills it on drop, so an error, a panic or
//! a signal (main turns SIGINT/SIGTERM into an error) never leaves a misaki-cp or an
//! Envoy behind. The pids also go to a pid file, for the wrapper script's trap should
//! this process itself be SIGKILLed.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

static PIDFILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Where to append the pid of every child started (for the script's cleanup trap).
pub fn set_pidfile(p: Option<PathBuf>) {
    let _ = PIDFILE.set(p);
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Guard {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Guard {
    /// Start `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Guard> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        if let Some(Some(p)) = PIDFILE.get()
            && let Ok(mut f) = OpenOptions::new().create(true).append(true).open(p)
        {
            let _ = writeln!(f, "{}", child.id());
        }
        Ok(Guard {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fail if the process has exited, quoting the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a file.
pub fn tail(p: &Path, n: usize) -> String {
    let s = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A loopback port the kernel considers free right now (ephemeral range).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `VmRSS` (or any `Vm*` line) of a process, in bytes.
pub fn vm(pid: u32, field: &str) -> Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib: u64 = v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("parsing {field} {v:?}"))?;
            return Ok(kib * 1024);
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds a process has used (`/proc/PID/stat` utime + stime).
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = s.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / clk_tck())
}

/// Open file descriptors of a process (its sockets, for the most part).
pub fn fds(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The 1-minute load average (`/proc/loadavg`): what else the shared machine ran.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `GET path` from the admin server on `127.0.0.1:port`: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Poll `f` every `every` until it returns `Some`, or fail after `timeout`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// `misaki-cp serve` on loopback ports, logs in `dir`.
pub fn start_cp(bin: &Path, policy: &Path, dir: &Path, tag: &str) -> Result<(Guard, u16, u16)> {
    start_cp_with(bin, policy, dir, tag, &[])
}

/// [`start_cp`] with more `serve` arguments (the TLS files).
pub fn start_cp_with(
    bin: &Path,
    policy: &Path,
    dir: &Path,
    tag: &str,
    extra: &[OsString],
) -> Result<(Guard, u16, u16)> {
    let xds = free_port()?;
    let admin = free_port()?;
    let mut g = Guard::spawn(
        "misaki-cp",
        Command::new(bin)
            .arg("serve")
            .arg("--policy")
            .arg(policy)
            .arg("--xds-addr")
            .arg(format!("127.0.0.1:{xds}"))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin}"))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("MISAKI_CP_LOG").unwrap_or_else(|_| "info".into()),
            ),
        &dir.join(format!("misaki-cp-{tag}.log")),
    )?;
    wait_until(
        "misaki-cp /readyz",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            g.check_alive()?;
            Ok(http_get(admin, "/readyz").ok().filter(|r| r.0 == 200))
        },
    )?;
    Ok((g, xds, admin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_entries() {
        let pid = std::process::id();
        assert!(vm(pid, "VmRSS").unwrap() > 0);
        assert!(cpu_secs(pid).unwrap() >= 0.0);
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
