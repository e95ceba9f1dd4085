//! Network namespaces for link tests: a vehicle with three real uplinks to a cloud.
//!
//! Invariants:
//! - Needs root (CAP_NET_ADMIN): [`require_root`] fails the test with the reason; it
//!   never skips.
//! - Every namespace name includes the test's pid and a per-process counter, so
//!   parallel tests and concurrent runs never share one.
//! - [`VehicleLab`] owns its namespaces and child processes: dropping it (also while
//!   unwinding from a failed assertion) kills the processes first, then deletes the
//!   namespaces, which deletes the veth pairs and nft tables inside them.
//! - Only 198.18.0.0/15 addresses, only inside the namespaces created here.
//!
//! Topology (vehicle `mv-<tag>-<pid>-<n>`, cloud `mc-<tag>-<pid>-<n>`):
//! ```text
//!  vehicle                                   cloud (lo: 198.18.0.1/32 = services)
//!  wlan0 198.18.1.1/30  ── veth ──  cwlan0 198.18.1.2/30   tbf 50 mbit
//!  wwan0 198.18.2.1/30  ── veth ──  cwwan0 198.18.2.2/30   tbf 10 mbit
//!  dsrc0 198.18.3.1/30  ── veth ──  cdsrc0 198.18.3.2/30   tbf  2 mbit
//!  routes to 198.18.0.1: via wlan0 metric 10, wwan0 metric 20, dsrc0 metric 30
//!  ignore_routes_with_linkdown=1: a link without carrier carries no traffic
//! ```
//! Carrier loss = the cloud-side peer set down (the vehicle side keeps its routes and
//! sees NO-CARRIER, like a radio losing its network). Silent blackhole = an nftables
//! drop rule on the cloud-side peer (link and carrier stay up).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::{Process, target_bin};

/// The cloud's service address (probe echo, fleet gRPC, fleet admin).
pub const CLOUD_ADDR: &str = "198.18.0.1";
pub const FLEET_GRPC_PORT: u16 = 50051;
pub const PROBE_PORT: u16 = 7007;
pub const FLEET_ADMIN_PORT: u16 = 8080;
pub const NETD_API_PORT: u16 = 9470;
/// Port of the lab policy's cloud services (a test's receiver listens there).
pub const CLOUD_SERVICE_PORT: u16 = 18080;
/// edge-netd's store-and-forward ingest in the vehicle namespace.
pub const NETD_INGEST_PORT: u16 = 15080;

/// The three uplinks: (policy name, vehicle interface, cloud peer, subnet octet, tbf rate).
pub const UPLINKS: [(&str, &str, &str, u8, &str); 3] = [
    ("wifi", "wlan0", "cwlan0", 1, "50mbit"),
    ("lte", "wwan0", "cwwan0", 2, "10mbit"),
    ("dsrc", "dsrc0", "cdsrc0", 3, "2mbit"),
];

/// Fail (never skip) unless we are root.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    assert_eq!(
        uid, "0",
        "network-namespace tests need root (CAP_NET_ADMIN) to create namespaces and veth pairs; \
         run them as root (CI does)"
    );
    for tool in ["ip", "tc", "nft"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        assert!(
            found,
            "`{tool}` is missing: apt-get install iproute2 nftables"
        );
    }
}

/// Run a command; panic with its stderr if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Netns {
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Run a command inside the namespace; panic if it fails.
    pub fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full);
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// A command to start a process inside the namespace (`ip netns exec` execs it,
    /// so the child's pid is the process's own and killing it kills the process).
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run `f` on a thread that has entered this namespace (sockets it creates live here).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns(2) on a valid fd; it changes only this thread's namespace
            // (network namespaces are per thread), and this thread ends after `f`.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// `GET path` from `addr` inside the namespace: (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        let path = path.to_string();
        self.enter(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
            )?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            let status = raw
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = raw
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
            Ok((status, body))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Settings of the edge-netd under test.
#[derive(Debug, Clone)]
pub struct NetdOptions {
    pub dwell: Duration,
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub heartbeat: Duration,
    /// YAML of a `store_forward:` section (without the key), indented by two spaces.
    pub store_forward: Option<String>,
}

impl Default for NetdOptions {
    fn default() -> Self {
        NetdOptions {
            dwell: Duration::from_secs(2),
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(200),
            heartbeat: Duration::from_millis(500),
            store_forward: None,
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A vehicle namespace with three uplinks to a cloud namespace, plus the processes
/// running in them.
#[derive(Debug)]
pub struct VehicleLab {
    // Field order is drop order: processes die before their namespaces go.
    pub fleet: Option<Process>,
    /// The probe echo runs apart from the control plane, so killing the control
    /// plane does not blackhole every uplink.
    pub echo: Option<Process>,
    pub netd: Option<Process>,
    pub vehicle: Netns,
    pub cloud: Netns,
    pub dir: tempfile::TempDir,
    pub vehicle_id: String,
}

impl VehicleLab {
    /// Build the topology (no processes yet).
    pub fn new(tag: &str) -> VehicleLab {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let vehicle = Netns::create(format!("mv-{tag}-{pid}-{n}"));
        let cloud = Netns::create(format!("mc-{tag}-{pid}-{n}"));
        cloud.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{CLOUD_ADDR}/32"),
            "dev",
            "lo",
        ]);
        for key in ["all", "default"] {
            vehicle.sysctl(
                &format!("net.ipv4.conf.{key}.ignore_routes_with_linkdown"),
                "1",
            );
            vehicle.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
        }
        for (i, (_, iface, peer, octet, rate)) in UPLINKS.iter().enumerate() {
            run(&[
                "ip",
                "link",
                "add",
                iface,
                "netns",
                &vehicle.name,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                &cloud.name,
            ]);
            vehicle.exec(&[
                "ip",
                "addr",
                "add",
                &format!("198.18.{octet}.1/30"),
                "dev",
                iface,
            ]);
            cloud.exec(&[
                "ip",
                "addr",
                "add",
                &format!("198.18.{octet}.2/30"),
                "dev",
                peer,
            ]);
            vehicle.sysctl(
                &format!("net.ipv4.conf.{iface}.ignore_routes_with_linkdown"),
                "1",
            );
            vehicle.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0");
            vehicle.exec(&["ip", "link", "set", iface, "up"]);
            cloud.exec(&["ip", "link", "set", peer, "up"]);
            vehicle.exec(&[
                "tc", "qdisc", "add", "dev", iface, "root", "tbf", "rate", rate, "burst", "32kbit",
                "latency", "50ms",
            ]);
            let metric = ((i + 1) * 10).to_string();
            vehicle.exec(&[
                "ip",
                "route",
                "add",
                &format!("{CLOUD_ADDR}/32"),
                "via",
                &format!("198.18.{octet}.2"),
                "dev",
                iface,
                "metric",
                &metric,
            ]);
        }
        VehicleLab {
            fleet: None,
            echo: None,
            netd: None,
            vehicle,
            cloud,
            dir: tempfile::tempdir().expect("temp dir"),
            vehicle_id: format!("car-{tag}-{pid}-{n}"),
        }
    }

    fn peer_of(iface: &str) -> &'static str {
        UPLINKS
            .iter()
            .find(|u| u.1 == iface)
            .map(|u| u.2)
            .unwrap_or_else(|| panic!("unknown uplink interface {iface}"))
    }

    /// Cut (`false`) or restore (`true`) the carrier of a vehicle interface by taking
    /// its cloud-side peer down/up.
    pub fn set_carrier(&self, iface: &str, on: bool) {
        let state = if on { "up" } else { "down" };
        self.cloud
            .exec(&["ip", "link", "set", Self::peer_of(iface), state]);
    }

    /// Silently drop everything arriving at the cloud over `iface` (or stop doing so).
    pub fn set_blackhole(&self, iface: &str, on: bool) {
        let table = format!("bh_{iface}");
        if on {
            self.cloud.exec(&["nft", "add", "table", "inet", &table]);
            self.cloud.exec(&[
                "nft",
                "add",
                "chain",
                "inet",
                &table,
                "input",
                "{ type filter hook input priority 0; policy accept; }",
            ]);
            self.cloud.exec(&[
                "nft",
                "add",
                "rule",
                "inet",
                &table,
                "input",
                "iifname",
                Self::peer_of(iface),
                "drop",
            ]);
        } else {
            self.cloud.exec(&["nft", "delete", "table", "inet", &table]);
        }
    }

    /// The fleet's mesh policy: uplinks wifi/lte/dsrc, classes critical, standard, bulk;
    /// services `telemetry` (bulk) and `maps` (standard) in the cloud at
    /// [`CLOUD_ADDR`]:[`CLOUD_SERVICE_PORT`].
    fn write_policy(&self) -> PathBuf {
        let path = self.dir.path().join("mesh.yaml");
        std::fs::write(
            &path,
            "version: 1\n\
             uplinks:\n\
             \x20 - { name: wifi, kind: wifi, cost: 1 }\n\
             \x20 - { name: lte, kind: lte, metered: true, cost: 5 }\n\
             \x20 - { name: dsrc, kind: dsrc, cost: 2 }\n\
             classes:\n\
             \x20 - { name: critical, timeout: 5s, retries: 1, uplinks: [wifi, lte, dsrc], max_loss_percent: 50 }\n\
             \x20 - { name: standard, timeout: 5s, retries: 1, uplinks: [wifi, lte], max_loss_percent: 50 }\n\
             \x20 - { name: bulk, timeout: 5s, retries: 1, uplinks: [wifi], deferrable: true, max_loss_percent: 50 }\n\
             services:\n\
             \x20 - { name: telemetry, location: cloud, port: 18080, endpoints: [\"198.18.0.1:18080\"], routes: [/telemetry], class: bulk }\n\
             \x20 - { name: maps, location: cloud, port: 18080, endpoints: [\"198.18.0.1:18080\"], routes: [/maps], class: standard }\n",
        )
        .expect("write fleet policy");
        path
    }

    /// Start the probe echo in the cloud namespace (once; it outlives fleet restarts).
    fn start_echo(&mut self) {
        if self.echo.is_some() {
            return;
        }
        // A misaki-cp of its own (xDS/admin on the cloud namespace's loopback): killing
        // the control plane under test must not look like every uplink went dark.
        let policy = self.write_policy();
        let mut cmd = self.cloud.command(&crate::target_bin("misaki-cp"));
        cmd.arg("serve")
            .arg("--policy")
            .arg(&policy)
            .args(["--probe-addr", &format!("{CLOUD_ADDR}:{PROBE_PORT}")]);
        let log = self.dir.path().join("echo.log");
        self.echo = Some(Process::spawn("probe echo", &mut cmd, log));
    }

    /// Start the fleet server (gRPC, admin) and the probe echo in the cloud namespace.
    pub fn start_fleet(&mut self) {
        self.start_echo();
        let policy = self.write_policy();
        let mut cmd = self.cloud.command(&crate::target_bin("misaki-cp"));
        cmd.arg("serve").arg("--policy").arg(&policy).args([
            "--xds-addr",
            &format!("{CLOUD_ADDR}:{FLEET_GRPC_PORT}"),
            "--admin-addr",
            &format!("{CLOUD_ADDR}:{FLEET_ADMIN_PORT}"),
        ]);
        let log = self.dir.path().join(format!(
            "fleet-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        self.fleet = Some(Process::spawn("misaki-cp", &mut cmd, log));
        let up = crate::process::wait_for(Duration::from_secs(20), || self.fleet_json("/fleet"));
        assert!(
            up.is_some(),
            "fleet server did not come up:\n{}",
            self.fleet_log()
        );
    }

    pub fn kill_fleet(&mut self) {
        if let Some(mut p) = self.fleet.take() {
            p.kill();
        }
    }

    pub fn fleet_log(&self) -> String {
        self.fleet
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    pub fn netd_log(&self) -> String {
        self.netd.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    /// Write the edge-netd config and start it in the vehicle namespace.
    pub fn start_netd(&mut self, opts: &NetdOptions) {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut uplinks = String::new();
        for (i, (name, iface, _, _, _)) in UPLINKS.iter().enumerate() {
            let kind = match *name {
                "wifi" => "wifi",
                "lte" => "lte",
                _ => "dsrc",
            };
            uplinks.push_str(&format!(
                "  - {{ name: {name}, interface: {iface}, kind: {kind}, cost: {}, metered: {} }}\n",
                i + 1,
                *name == "lte"
            ));
        }
        let config = format!(
            "vehicle_id: {id}\n\
             control_plane: http://{CLOUD_ADDR}:{FLEET_GRPC_PORT}\n\
             api: 127.0.0.1:{NETD_API_PORT}\n\
             state_dir: {state}\n\
             heartbeat_interval: {hb}\n\
             uplinks:\n{uplinks}\
             probe:\n  targets: [\"{CLOUD_ADDR}:{PROBE_PORT}\"]\n  interval: {pi}\n  timeout: {pt}\n\
             selection:\n  blackhole_after: 3\n  dwell: {dwell}\n{saf}",
            id = self.vehicle_id,
            state = self.dir.path().join("state").display(),
            hb = ms(opts.heartbeat),
            pi = ms(opts.probe_interval),
            pt = ms(opts.probe_timeout),
            dwell = ms(opts.dwell),
            saf = opts
                .store_forward
                .as_ref()
                .map(|s| format!("store_forward:\n{s}"))
                .unwrap_or_default(),
        );
        let path = self.dir.path().join("edge-netd.yaml");
        std::fs::write(&path, config).expect("write config");
        let mut cmd = self.vehicle.command(&target_bin("edge-netd"));
        cmd.arg("--config").arg(&path).env("RUST_LOG", "info");
        let log = self.dir.path().join(format!(
            "netd-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        self.netd = Some(Process::spawn("edge-netd", &mut cmd, log));
        let ready = crate::process::wait_for(Duration::from_secs(20), || {
            let (status, _) = self.netd_get("/readyz").ok()?;
            (status == 200).then_some(())
        });
        assert!(
            ready.is_some(),
            "edge-netd never became ready:\n{}",
            self.netd_log()
        );
    }

    pub fn kill_netd(&mut self) {
        if let Some(mut p) = self.netd.take() {
            p.kill();
        }
    }

    /// GET from edge-netd's local API (inside the vehicle namespace).
    pub fn netd_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], NETD_API_PORT));
        self.vehicle.http_get(addr, path)
    }

    /// edge-netd's `/links` document.
    pub fn links(&self) -> Option<serde_json::Value> {
        let (status, body) = self.netd_get("/links").ok()?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// The uplink edge-netd selected for `class` (`Some(None)`: none eligible).
    pub fn selected(&self, class: &str) -> Option<Option<String>> {
        let l = self.links()?;
        let s = l.get("selections")?.get(class)?;
        Some(s.get("uplink")?.as_str().map(str::to_string))
    }

    /// GET JSON from the fleet server's admin API (inside the cloud namespace).
    pub fn fleet_json(&self, path: &str) -> Option<serde_json::Value> {
        let addr: SocketAddr = format!("{CLOUD_ADDR}:{FLEET_ADMIN_PORT}")
            .parse()
            .expect("literal");
        let (status, body) = self.cloud.http_get(addr, path).ok()?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// This vehicle in the fleet registry.
    pub fn fleet_vehicle(&self) -> Option<serde_json::Value> {
        self.fleet_json(&format!("/fleet/{}", self.vehicle_id))
    }
}

impl Drop for VehicleLab {
    fn drop(&mut self) {
        // Process's own Drop prints its log tail when the test is failing.
        self.kill_netd();
        self.kill_fleet();
        if let Some(mut p) = self.echo.take() {
            p.kill();
        }
        // Namespaces are deleted by their own Drop, after this.
    }
}
