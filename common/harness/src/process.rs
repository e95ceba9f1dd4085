//! Child processes under guard, and loopback ports for them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

static PIDFILE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Append the pid of every child [`Process`] started from now on to `p` (for a wrapper
/// script's cleanup trap, should this process itself be SIGKILLed). Only the first
/// call counts.
pub fn set_pidfile(p: Option<PathBuf>) {
    let _ = PIDFILE.set(p);
}

/// Append `pid` to the pid file, if one is set (see [`set_pidfile`]).
pub(crate) fn record_pid(pid: u32) {
    if let Some(Some(p)) = PIDFILE.get()
        && let Ok(mut f) = OpenOptions::new().create(true).append(true).open(p)
    {
        let _ = writeln!(f, "{pid}");
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, also when the caller
/// panics or returns an error; stdout and stderr go to a log file, whose last lines
/// are printed if the thread is panicking (a failing test).
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Start `cmd` (stdin from /dev/null) with stdout and stderr written to `log`.
    pub fn try_spawn(
        name: &str,
        cmd: &mut Command,
        log: impl Into<PathBuf>,
    ) -> io::Result<Process> {
        let log = log.into();
        let out = File::create(&log)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", log.display())))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        record_pid(child.id());
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// [`Process::try_spawn`], panicking if the process cannot be started (tests).
    pub fn spawn(name: &str, cmd: &mut Command, log: impl Into<PathBuf>) -> Process {
        Self::try_spawn(name, cmd, log).unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far (empty if unreadable).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_text(), n)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it exited already (and with what).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// An error if the process has exited (or was killed), quoting the end of its log.
    pub fn check_alive(&mut self) -> io::Result<()> {
        let status = match self.child.as_mut() {
            Some(c) => c.try_wait()?.map(|s| s.to_string()),
            None => Some("killed".to_string()),
        };
        match status {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                self.log_tail(20)
            ))),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `text` without ANSI colour sequences (CSI: ESC `[` parameters, then a letter), as
/// tracing's fmt colours a log's fields.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Ports handed out: below Linux's default ephemeral range (32768–60999), so the local
/// end of some outgoing connection (etcd clients, Envoy upstreams, ...) cannot take one
/// between the check and its use, which made Envoy fail with "Address already in use".
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free right now for TCP and UDP, outside the ephemeral range. Each
/// call in this process tries the next port of a sequence that starts at a place of its
/// own per process, so parallel tests never get the same one.
pub fn try_free_port() -> io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let span = u32::from(PORTS.end - PORTS.start);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (std::process::id().wrapping_mul(7919) ^ nanos) % span
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PORTS.start + u16::try_from((start + n) % span).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free loopback port in {PORTS:?}"),
    ))
}

/// [`try_free_port`], panicking if no port can be bound (tests).
pub fn free_port() -> u16 {
    try_free_port().expect("bind an ephemeral port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn a_dead_child_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("misaki-harness-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut p = Process::try_spawn(
            "sh",
            Command::new("sh").args(["-c", "echo bye; exit 3"]),
            dir.join("sh.log"),
        )
        .unwrap();
        let status = crate::wait_for(std::time::Duration::from_secs(10), || p.try_wait());
        assert!(status.is_some());
        let e = p.check_alive().unwrap_err().to_string();
        assert!(e.starts_with("sh exited (") && e.ends_with("bye"), "{e}");
        drop(p);
        let _ = fs::remove_dir_all(dir);
    }
}
