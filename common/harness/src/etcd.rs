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
    child: Child,
    dir: PathBuf,
}

impl Etcd {
    /// Start etcd and wait until `/health` says it is healthy. A missing `etcd` binary
    /// is a failure (never a skip): the tests need it.
    pub fn start() -> Etcd {
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let (client, peer) = (port(free_port()), port(free_port()));
        let dir = std::env::temp_dir().join(format!(
            "misaki-etcd-{}-{}",
            std::process::id(),
            client.port()
        ));
        std::fs::create_dir_all(&dir).expect("etcd test directory");
        let child = spawn(&dir, client, peer);
        let mut etcd = Etcd {
            client,
            peer,
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
        self.child = spawn(&self.dir, self.client, self.peer);
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
            if health(self.client).is_ok_and(|b| b.contains(r#""health":"true""#)) {
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

/// etcd in `dir` on these ports, its output appended to `dir/etcd.log`.
fn spawn(dir: &Path, client: SocketAddr, peer: SocketAddr) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .expect("etcd log file");
    Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--name", "default"])
        .args(["--listen-client-urls", &format!("http://{client}")])
        .args(["--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &format!("http://{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
        .args(["--initial-cluster", &format!("default=http://{peer}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("etcd log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}): run scripts/setup.sh (Debian etcd-server)")
        })
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
