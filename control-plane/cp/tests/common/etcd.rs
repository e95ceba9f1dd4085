//! A real etcd for the shared-mode tests: Debian's `etcd` (scripts/setup.sh installs
//! it) on free loopback ports with a temporary data directory, killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_addr;

pub struct Etcd {
    pub client: SocketAddr,
    peer: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Start etcd and wait until `/health` says it is healthy.
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_addr(), free_addr());
        let child = spawn(dir.path(), client, peer);
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
        self.child = spawn(self.dir.path(), self.client, self.peer);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("etcd exited ({status}):\n{}", self.log());
            }
            if health(self.client).is_some_and(|b| b.contains(r#""health":"true""#)) {
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
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// A client of the etcd API itself.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([format!("http://{}", self.client)], None)
            .await
            .unwrap()
    }
}

/// etcd in `dir` on these ports, its output appended to `dir/etcd.log`. A missing
/// `etcd` binary is a failure (never a skip): the tests need it.
fn spawn(dir: &std::path::Path, client: SocketAddr, peer: SocketAddr) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .unwrap();
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
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}): run scripts/setup.sh (Debian etcd-server)")
        })
}

fn health(addr: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
