//! A real etcd for shared-mode tests and benchmarks: Debian's `etcd` (scripts/setup.sh
//! installs it) on free loopback ports with its own data directory under the system
//! temporary directory, killed and removed on drop.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

#[derive(Debug)]
pub struct Etcd {
    pub client: SocketAddr,
    peer: SocketAddr,
    /// Plain HTTP `/health` (and metrics), also when clients must use TLS.
    metrics: SocketAddr,
    tls: Option<EtcdTls>,
    child: Child,
    dir: PathBuf,
}

/// Client TLS for etcd: its certificate and key, and the CA its clients' certificates
/// must chain to (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl Etcd {
    /// Start etcd and wait until `/health` says it is healthy. A missing `etcd` binary
    /// is a failure (never a skip): the tests need it.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// [`start`](Self::start), its client port over TLS when `tls` is given.
    pub fn start_with(tls: Option<EtcdTls>) -> Etcd {
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let (client, peer, metrics) = (port(free_port()), port(free_port()), port(free_port()));
        let dir = std::env::temp_dir().join(format!(
            "misaki-etcd-{}-{}",
            std::process::id(),
            client.port()
        ));
        std::fs::create_dir_all(&dir).expect("etcd test directory");
        let child = spawn(&dir, [client, peer, metrics], tls.as_ref());
        let mut etcd = Etcd {
            client,
            peer,
            metrics,
            tls,
            child,
            dir,
        };
        etcd.wait_healthy();
        etcd
    }

    /// Kill it (SIGKILL); its data stays.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same ports and data, and wait until healthy.
    pub fn restart(&mut self) {
        self.kill();
        let ports = [self.client, self.peer, self.metrics];
        self.child = spawn(&self.dir, ports, self.tls.as_ref());
        self.wait_healthy();
    }

    /// Stop it (SIGSTOP): its ports stay open and answer nothing, like a partition.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Resume it after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("etcd status") {
                panic!("etcd exited ({status}):\n{}", self.log());
            }
            if health(self.metrics).is_ok_and(|b| b.contains(r#""health":"true""#)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within 20s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its plain-HTTP `/health` and `/metrics` port.
    pub fn metrics_port(&self) -> u16 {
        self.metrics.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `--store` for it.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.client)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// etcd in `dir` on its client, peer and metrics ports, its output appended to
/// `dir/etcd.log`.
fn spawn(dir: &Path, [client, peer, metrics]: [SocketAddr; 3], tls: Option<&EtcdTls>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .expect("etcd log file");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut cmd = Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--name", "default"])
        .args(["--listen-client-urls", &format!("{scheme}://{client}")])
        .args(["--advertise-client-urls", &format!("{scheme}://{client}")])
        .args(["--listen-peer-urls", &format!("http://{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
        .args(["--initial-cluster", &format!("default=http://{peer}")])
        .args(["--listen-metrics-urls", &format!("http://{metrics}")]);
    if let Some(tls) = tls {
        cmd.arg("--cert-file")
            .arg(&tls.cert)
            .arg("--key-file")
            .arg(&tls.key)
            .arg("--trusted-ca-file")
            .arg(&tls.client_ca)
            .arg("--client-cert-auth");
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("etcd log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}): run scripts/setup.sh (Debian etcd-server)")
        });
    crate::process::record_pid(child.id());
    child
}

fn health(addr: SocketAddr) -> io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A frozen etcd ignores SIGKILL only until resumed; resume first.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
