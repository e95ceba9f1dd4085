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
//! - Only 198.18.0.0/15 addresses (198.19.0.0/30 is the NAT's link), only inside the
//!   namespaces created here.
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
//! Behind a carrier NAT ([`VehicleLab::behind_nat`]) a router `mr-<tag>-<pid>-<n>`
//! holds the uplink peers instead of the cloud:
//! ```text
//!  vehicle ── 3 uplinks as above ── router (cwlan0/cwwan0/cdsrc0, ip_forward=1)
//!  router rcloud0 198.19.0.1/30  ── veth ──  crouter0 198.19.0.2/30 cloud
//!  router: route 198.18.0.1 via 198.19.0.2; nft masquerade out of rcloud0;
//!          forward from rcloud0 only ct established,related (the rest dropped)
//!  cloud: no route to 198.18.{1,2,3}.0/30; sees the vehicle as 198.19.0.1
//! ```
//!
//! Carrier loss = the cloud-side peer set down (the vehicle side keeps its routes and
//! sees NO-CARRIER, like a radio losing its network). Silent blackhole = an nftables
//! drop rule on the cloud-side peer (link and carrier stay up). Behind the NAT both act
//! on the router, which holds the peers.
//!
//! The vehicle loop (tests/tests/vehicle_loop.rs) adds, all optional: a cloud service
//! ([`EchoServer`] on [`CLOUD_ADDR`]:[`CLOUD_SERVICE_PORT`]) whose answer names the
//! client address, hence the uplink ([`uplink_of_ip`]); the vehicle's Envoy
//! (`envoy-configs/vehicle-sidecar-edge.yaml`, fed by edge-netd's local xDS on
//! [`VEHICLE_XDS_PORT`]), optionally as an unprivileged user; apps' requests to it on
//! [`VEHICLE_OUTBOUND_PORT`] ([`VehicleLab::app_get`]).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::http::{Reply, find};
use crate::process::{EDGE_XDS_PORT, Process, envoy_native_bin, repo_root, target_bin};

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
/// edge-netd's vehicle-local xDS (its default `xds: 127.0.0.1:15010`).
pub const VEHICLE_XDS_PORT: u16 = EDGE_XDS_PORT;
/// The vehicle Envoy's `vehicle_outbound` listener: apps send mesh requests here.
pub const VEHICLE_OUTBOUND_PORT: u16 = 15001;
/// The vehicle Envoy's admin (`envoy-configs/vehicle-sidecar-edge.yaml`).
pub const VEHICLE_ENVOY_ADMIN_PORT: u16 = 19904;

/// Which uplink a connection came over, from the vehicle-side address the cloud sees:
/// `198.18.1.1` → `wifi` (wlan0), `198.18.2.1` → `lte` (wwan0), `198.18.3.1` → `dsrc`
/// (dsrc0).
pub fn uplink_of_ip(ip: &str) -> Option<&'static str> {
    UPLINKS
        .iter()
        .find(|u| ip == format!("198.18.{}.1", u.3))
        .map(|u| u.0)
}

/// The lab's mesh policy: uplinks wifi/lte/dsrc, classes critical [wifi, lte, dsrc],
/// standard [wifi, lte], bulk [wifi] (deferrable); services `telemetry` (bulk) and
/// `maps` (standard) in the cloud at [`CLOUD_ADDR`]:[`CLOUD_SERVICE_PORT`]. A test may
/// append services (one `  - {...}` line each) and write it with
/// [`VehicleLab::write_fleet_policy`] or use it as edge-netd's `factory_policy:`.
pub const LAB_POLICY: &str = "version: 1\n\
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
     \x20 - { name: maps, location: cloud, port: 18080, endpoints: [\"198.18.0.1:18080\"], routes: [/maps], class: standard }\n";

/// [`LAB_POLICY`] with a `mesh:` section (`mesh`: its entries, one `key: value` per
/// line, without indentation) and more services (`services`: one `  - {...}` line
/// each, newline-terminated).
pub fn lab_policy_with(mesh: &[&str], services: &str) -> String {
    let mut section = String::from("mesh:\n");
    for line in mesh {
        section.push_str(&format!("  {line}\n"));
    }
    let head = "version: 1\n";
    assert!(
        LAB_POLICY.starts_with(head),
        "LAB_POLICY starts with {head:?}"
    );
    format!("{head}{section}{}{services}", &LAB_POLICY[head.len()..])
}

/// The cloud sidecar Envoy's admin in the cloud namespace
/// (`envoy-configs/cloud-sidecar.yaml`, [`VehicleLab::start_cloud_envoy`]).
pub const CLOUD_ENVOY_ADMIN_PORT: u16 = 19902;

/// Behind the NAT ([`VehicleLab::behind_nat`]): the router's address toward the cloud,
/// the source of every vehicle connection the cloud sees.
pub const ROUTER_ADDR: &str = "198.19.0.1";
/// Behind the NAT: the cloud's address on its link to the router.
pub const CLOUD_LINK_ADDR: &str = "198.19.0.2";
/// Behind the NAT: the router's interface toward the cloud.
pub const ROUTER_IFACE: &str = "rcloud0";
/// Behind the NAT: the cloud's interface toward the router.
pub const CLOUD_ROUTER_IFACE: &str = "crouter0";

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

    /// One HTTP/1.1 request (`connection: close`) from inside the namespace: status,
    /// headers (names lowercased) and body (de-chunked). The read timeout (20 s) is
    /// longer than any class timeout of the lab policy with its retries, so a slow
    /// answer comes back as the proxy's answer, not as a client error.
    pub fn http_request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("host: {addr}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("connection: close\r\n\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        self.enter(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(&request)?;
            let mut raw = Vec::new();
            let mut chunk = [0u8; 16 * 1024];
            loop {
                if response_complete(&raw) {
                    break;
                }
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&chunk[..n]);
            }
            crate::http::parse(&raw)
        })
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
    /// `xds: 127.0.0.1:PORT` (edge-netd's vehicle-local xDS); None: edge-netd's default
    /// [`VEHICLE_XDS_PORT`], which is free in the lab's own vehicle namespace.
    pub xds_port: Option<u16>,
    /// `factory_policy: PATH`: the policy shipped in the vehicle image, used when none is
    /// stored.
    pub factory_policy: Option<PathBuf>,
    /// Raw YAML appended to the config (top-level keys, newline-terminated).
    pub extra: String,
    /// Wait for `/readyz` 200 (default). `false` only waits for the local API to answer
    /// `/healthz`: an offline boot without a policy may stay not ready.
    pub wait_ready: bool,
}

impl Default for NetdOptions {
    fn default() -> Self {
        NetdOptions {
            dwell: Duration::from_secs(2),
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(200),
            heartbeat: Duration::from_millis(500),
            store_forward: None,
            xds_port: None,
            factory_policy: None,
            extra: String::new(),
            wait_ready: true,
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A vehicle namespace with three uplinks to a cloud namespace, plus the processes
/// running in them.
#[derive(Debug)]
pub struct VehicleLab {
    // Field order is drop order: processes die before their namespaces go, and the
    // vehicle Envoy before the edge-netd feeding it, the cloud Envoy before the fleet.
    pub envoy: Option<Process>,
    /// The cloud sidecar Envoy ([`VehicleLab::start_cloud_envoy`]).
    pub cloud_envoy: Option<Process>,
    /// The cloud service ([`VehicleLab::start_echo_upstream`]).
    pub upstream: Option<EchoServer>,
    /// Services hosted on the vehicle ([`VehicleLab::start_vehicle_service`]).
    pub vehicle_services: Vec<EchoServer>,
    pub fleet: Option<Process>,
    /// The probe echo runs apart from the control plane, so killing the control
    /// plane does not blackhole every uplink.
    pub echo: Option<Process>,
    pub netd: Option<Process>,
    pub vehicle: Netns,
    pub cloud: Netns,
    /// The carrier NAT between the uplinks and the cloud ([`VehicleLab::behind_nat`]);
    /// `None`: the uplink peers are in the cloud ([`VehicleLab::new`]).
    pub router: Option<Netns>,
    pub dir: tempfile::TempDir,
    pub vehicle_id: String,
    /// Where the last started edge-netd serves xDS (the vehicle Envoy's bootstrap is
    /// rewritten to it).
    pub xds_port: u16,
}

impl VehicleLab {
    /// Build the topology (no processes yet): the uplink peers in the cloud namespace,
    /// which can dial the vehicle directly.
    pub fn new(tag: &str) -> VehicleLab {
        Self::build(tag, false)
    }

    /// Build the topology behind a carrier NAT (no processes yet): the uplink peers in a
    /// router namespace (`mr-<tag>-<pid>-<n>`) that forwards to the cloud over
    /// [`ROUTER_IFACE`]/[`CLOUD_ROUTER_IFACE`] and masquerades everything leaving toward
    /// it as [`ROUTER_ADDR`]. The vehicle reaches [`CLOUD_ADDR`] over each uplink as
    /// before; the cloud cannot open a connection to the vehicle (no route, and the
    /// router drops new connections coming from the cloud). The cloud sees every
    /// vehicle connection from [`ROUTER_ADDR`], so [`uplink_of_ip`] does not apply.
    pub fn behind_nat(tag: &str) -> VehicleLab {
        Self::build(tag, true)
    }

    fn build(tag: &str, nat: bool) -> VehicleLab {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let vehicle = Netns::create(format!("mv-{tag}-{pid}-{n}"));
        let cloud = Netns::create(format!("mc-{tag}-{pid}-{n}"));
        let router = nat.then(|| Netns::create(format!("mr-{tag}-{pid}-{n}")));
        // The namespace holding the uplink peers.
        let peers = router.as_ref().unwrap_or(&cloud);
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
                &peers.name,
            ]);
            vehicle.exec(&[
                "ip",
                "addr",
                "add",
                &format!("198.18.{octet}.1/30"),
                "dev",
                iface,
            ]);
            peers.exec(&[
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
            peers.exec(&["ip", "link", "set", peer, "up"]);
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
        if let Some(router) = &router {
            Self::connect_router(router, &cloud);
        }
        VehicleLab {
            envoy: None,
            cloud_envoy: None,
            upstream: None,
            vehicle_services: Vec::new(),
            fleet: None,
            echo: None,
            netd: None,
            vehicle,
            cloud,
            router,
            dir: tempfile::tempdir().expect("temp dir"),
            vehicle_id: format!("car-{tag}-{pid}-{n}"),
            xds_port: VEHICLE_XDS_PORT,
        }
    }

    /// Wire the router to the cloud (see [`VehicleLab::behind_nat`]): one veth pair, the
    /// router forwarding and masquerading toward the cloud, dropping connections the
    /// cloud opens, and the cloud routing back only to [`ROUTER_ADDR`] (connected).
    fn connect_router(router: &Netns, cloud: &Netns) {
        run(&[
            "ip",
            "link",
            "add",
            ROUTER_IFACE,
            "netns",
            &router.name,
            "type",
            "veth",
            "peer",
            "name",
            CLOUD_ROUTER_IFACE,
            "netns",
            &cloud.name,
        ]);
        router.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_ADDR}/30"),
            "dev",
            ROUTER_IFACE,
        ]);
        cloud.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{CLOUD_LINK_ADDR}/30"),
            "dev",
            CLOUD_ROUTER_IFACE,
        ]);
        router.exec(&["ip", "link", "set", ROUTER_IFACE, "up"]);
        cloud.exec(&["ip", "link", "set", CLOUD_ROUTER_IFACE, "up"]);
        router.exec(&[
            "ip",
            "route",
            "add",
            &format!("{CLOUD_ADDR}/32"),
            "via",
            CLOUD_LINK_ADDR,
            "dev",
            ROUTER_IFACE,
        ]);
        router.sysctl("net.ipv4.ip_forward", "1");
        router.exec(&["nft", "add", "table", "ip", "carrier_nat"]);
        router.exec(&[
            "nft",
            "add",
            "chain",
            "ip",
            "carrier_nat",
            "postrouting",
            "{ type nat hook postrouting priority srcnat; policy accept; }",
        ]);
        router.exec(&[
            "nft",
            "add",
            "rule",
            "ip",
            "carrier_nat",
            "postrouting",
            "oifname",
            ROUTER_IFACE,
            "masquerade",
        ]);
        // Like a carrier's NAT: nothing the cloud starts gets through, even with a route.
        router.exec(&[
            "nft",
            "add",
            "chain",
            "ip",
            "carrier_nat",
            "forward",
            "{ type filter hook forward priority filter; policy accept; }",
        ]);
        router.exec(&[
            "nft",
            "add",
            "rule",
            "ip",
            "carrier_nat",
            "forward",
            "iifname",
            ROUTER_IFACE,
            "ct",
            "state",
            "established,related",
            "accept",
        ]);
        router.exec(&[
            "nft",
            "add",
            "rule",
            "ip",
            "carrier_nat",
            "forward",
            "iifname",
            ROUTER_IFACE,
            "drop",
        ]);
    }

    /// The namespace holding the uplink peers: the router behind a NAT, else the cloud.
    pub fn peers(&self) -> &Netns {
        self.router.as_ref().unwrap_or(&self.cloud)
    }

    fn peer_of(iface: &str) -> &'static str {
        UPLINKS
            .iter()
            .find(|u| u.1 == iface)
            .map(|u| u.2)
            .unwrap_or_else(|| panic!("unknown uplink interface {iface}"))
    }

    /// Cut (`false`) or restore (`true`) the carrier of a vehicle interface by taking
    /// its peer ([`VehicleLab::peers`]) down/up.
    pub fn set_carrier(&self, iface: &str, on: bool) {
        let state = if on { "up" } else { "down" };
        self.peers()
            .exec(&["ip", "link", "set", Self::peer_of(iface), state]);
    }

    /// Silently drop everything arriving at the cloud over `iface` (or stop doing so):
    /// a drop rule on its peer ([`VehicleLab::peers`]); behind the NAT it drops what the
    /// router would forward too.
    pub fn set_blackhole(&self, iface: &str, on: bool) {
        let table = format!("bh_{iface}");
        let (ns, hook) = match &self.router {
            Some(router) => (router, "prerouting"),
            None => (&self.cloud, "input"),
        };
        if on {
            ns.exec(&["nft", "add", "table", "inet", &table]);
            ns.exec(&[
                "nft",
                "add",
                "chain",
                "inet",
                &table,
                hook,
                &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
            ]);
            ns.exec(&[
                "nft",
                "add",
                "rule",
                "inet",
                &table,
                hook,
                "iifname",
                Self::peer_of(iface),
                "drop",
            ]);
        } else {
            ns.exec(&["nft", "delete", "table", "inet", &table]);
        }
    }

    /// Write [`LAB_POLICY`] as the fleet's mesh policy (`mesh.yaml` in the lab dir).
    fn write_policy(&self) -> PathBuf {
        self.write_policy_text(LAB_POLICY)
    }

    /// Write `text` as the fleet's mesh policy (`mesh.yaml` in the lab dir).
    fn write_policy_text(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("mesh.yaml");
        std::fs::write(&path, text).expect("write fleet policy");
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
        self.start_fleet_with(LAB_POLICY);
    }

    /// [`VehicleLab::start_fleet`] serving the mesh policy `policy` instead of
    /// [`LAB_POLICY`] (e.g. one derived from it with [`lab_policy_with`]).
    pub fn start_fleet_with(&mut self, policy: &str) {
        self.start_echo();
        let policy = self.write_policy_text(policy);
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
        kill_slot(&mut self.fleet);
    }

    pub fn fleet_log(&self) -> String {
        log_of(self.fleet.as_ref())
    }

    pub fn netd_log(&self) -> String {
        log_of(self.netd.as_ref())
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
             selection:\n  blackhole_after: 3\n  dwell: {dwell}\n{saf}{xds}{factory}{extra}",
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
            xds = opts
                .xds_port
                .map(|p| format!("xds: 127.0.0.1:{p}\n"))
                .unwrap_or_default(),
            factory = opts
                .factory_policy
                .as_ref()
                .map(|p| format!("factory_policy: {}\n", p.display()))
                .unwrap_or_default(),
            extra = opts.extra,
        );
        self.xds_port = opts.xds_port.unwrap_or(VEHICLE_XDS_PORT);
        let path = self.dir.path().join("edge-netd.yaml");
        std::fs::write(&path, config).expect("write config");
        let mut cmd = self.vehicle.command(&target_bin("edge-netd"));
        cmd.arg("--config").arg(&path).env("RUST_LOG", "info");
        let log = self.dir.path().join(format!(
            "netd-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        self.netd = Some(Process::spawn("edge-netd", &mut cmd, log));
        let probe = if opts.wait_ready {
            "/readyz"
        } else {
            "/healthz"
        };
        let ready = crate::process::wait_for(Duration::from_secs(20), || {
            let (status, _) = self.netd_get(probe).ok()?;
            (status == 200).then_some(())
        });
        assert!(
            ready.is_some(),
            "edge-netd never answered {probe} with 200:\n{}",
            self.netd_log()
        );
    }

    /// [`VehicleLab::start_netd`] without waiting for `/readyz` (only for the local API).
    pub fn start_netd_nowait(&mut self, opts: &NetdOptions) {
        self.start_netd(&NetdOptions {
            wait_ready: false,
            ..opts.clone()
        });
    }

    pub fn kill_netd(&mut self) {
        kill_slot(&mut self.netd);
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
        self.kill_envoy();
        kill_slot(&mut self.cloud_envoy);
        self.upstream = None;
        self.vehicle_services.clear();
        self.kill_netd();
        self.kill_fleet();
        kill_slot(&mut self.echo);
        // Namespaces are deleted by their own Drop, after this.
    }
}

/// The vehicle loop: the cloud service, vehicle-hosted services, the vehicle's Envoy fed
/// by edge-netd, and apps' requests to it.
impl VehicleLab {
    /// Start the cloud service on [`CLOUD_ADDR`]:[`CLOUD_SERVICE_PORT`] in the cloud
    /// namespace (once): every request is answered 200 with
    /// `from=<client ip> path=<path> class=<x-misaki-class>`, and recorded
    /// ([`VehicleLab::upstream_requests`]). The client IP names the uplink
    /// ([`uplink_of_ip`]).
    pub fn start_echo_upstream(&mut self) {
        if self.upstream.is_some() {
            return;
        }
        let addr = SocketAddr::new(CLOUD_ADDR.parse().expect("literal"), CLOUD_SERVICE_PORT);
        self.upstream = Some(EchoServer::start_in(&self.cloud, addr));
    }

    /// Every request the cloud service answered so far.
    pub fn upstream_requests(&self) -> Vec<EchoRequest> {
        self.upstream
            .as_ref()
            .map(EchoServer::requests)
            .unwrap_or_default()
    }

    /// A service hosted on the vehicle: an [`EchoServer`] on `127.0.0.1:port` in the
    /// vehicle namespace (answers `from=127.0.0.1 path=...`); it lives as long as the lab.
    pub fn start_vehicle_service(&mut self, port: u16) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let server = EchoServer::start_in(&self.vehicle, addr);
        self.vehicle_services.push(server);
    }

    /// Write the fleet's policy (`mesh.yaml`, which the fleet's misaki-cp watches) by
    /// write-then-rename, so the watcher never reads half a file. Note that
    /// [`VehicleLab::start_fleet`] writes [`LAB_POLICY`] again.
    pub fn write_fleet_policy(&self, text: &str) {
        let path = self.dir.path().join("mesh.yaml");
        let tmp = self.dir.path().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, text).expect("write fleet policy");
        std::fs::rename(&tmp, &path).expect("rename fleet policy into place");
    }

    /// Start the real Envoy in the vehicle namespace from
    /// `envoy-configs/vehicle-sidecar-edge.yaml` (its xDS port rewritten to
    /// [`VehicleLab::xds_port`], admin on [`VEHICLE_ENVOY_ADMIN_PORT`]), as root or, with
    /// `user`, as that unprivileged user (no capabilities), and wait until its admin
    /// `/ready` answers 200 (initial CDS and LDS from edge-netd arrived). Fails with
    /// Envoy's log otherwise.
    pub fn start_envoy(&mut self, user: Option<&str>) {
        self.kill_envoy();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let template_path = repo_root().join("envoy-configs/vehicle-sidecar-edge.yaml");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
        let from = format!("port_value: {EDGE_XDS_PORT}");
        assert!(
            template.contains(&from),
            "{} has no `{from}` to rewrite",
            template_path.display()
        );
        let cfg = template.replace(&from, &format!("port_value: {}", self.xds_port));
        // The lab dir is root's 0700 temp dir: let others traverse it (not list it) and
        // read the bootstrap in a directory of its own.
        let dir = self.dir.path().join(format!("envoy-{n}"));
        std::fs::create_dir_all(&dir).expect("create Envoy dir");
        let path = dir.join("vehicle-sidecar-edge.yaml");
        std::fs::write(&path, cfg).expect("write Envoy bootstrap");
        let envoy = envoy_native_bin();
        let mut cmd = match user {
            None => self.vehicle.command(&envoy),
            Some(user) => {
                set_mode(self.dir.path(), 0o711);
                set_mode(&dir, 0o755);
                set_mode(&path, 0o644);
                let (uid, gid) = user_ids(user)
                    .unwrap_or_else(|| panic!("no user {user}: call netns::ensure_user first"));
                let drop_privs = [
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--init-groups".to_string(),
                    "--inh-caps=-all".to_string(),
                ];
                // What the user cannot reach, said before Envoy fails less clearly.
                for (what, test, p) in [
                    ("read the bootstrap", "-r", &path),
                    ("execute Envoy", "-x", &envoy),
                ] {
                    let ok = Command::new("setpriv")
                        .args(&drop_privs)
                        .args(["test", test])
                        .arg(p)
                        .status()
                        .unwrap_or_else(|e| panic!("cannot run setpriv (util-linux): {e}"));
                    assert!(
                        ok.success(),
                        "user {user} cannot {what}: {} (check the modes of it and its parents)",
                        p.display()
                    );
                }
                let mut c = self.vehicle.command(Path::new("setpriv"));
                c.args(&drop_privs).arg(&envoy);
                c
            }
        };
        cmd.arg("-c").arg(&path).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "info",
        ]);
        let log = self.dir.path().join(format!("envoy-{n}.log"));
        self.envoy = Some(Process::spawn("vehicle Envoy", &mut cmd, log));
        let live = crate::process::wait_for(Duration::from_secs(30), || {
            if self.envoy.as_mut()?.try_wait().is_some() {
                return Some(false);
            }
            let (status, _) = self.envoy_get("/ready").ok()?;
            (status == 200).then_some(true)
        });
        assert!(
            live == Some(true),
            "the vehicle Envoy did not go LIVE (from edge-netd's xDS on 127.0.0.1:{}):\n{}\n\
             ---- edge-netd ----\n{}",
            self.xds_port,
            self.envoy_log(),
            self.netd_log()
        );
    }

    pub fn kill_envoy(&mut self) {
        kill_slot(&mut self.envoy);
    }

    /// Start a cloud sidecar Envoy in the cloud namespace from
    /// `envoy-configs/cloud-sidecar.yaml` (rewritten like [`crate::Envoy::start`] does:
    /// node id `node_id`, xDS from the lab's fleet server at
    /// [`CLOUD_ADDR`]:[`FLEET_GRPC_PORT`]; admin on 127.0.0.1:[`CLOUD_ENVOY_ADMIN_PORT`]
    /// of the cloud namespace), and wait until its admin `/ready` answers 200. Fails with
    /// Envoy's log otherwise. Start the fleet first ([`VehicleLab::start_fleet_with`]).
    pub fn start_cloud_envoy(&mut self, node_id: &str) {
        kill_slot(&mut self.cloud_envoy);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let template_path = repo_root().join("envoy-configs/cloud-sidecar.yaml");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
        let xds = "address: 127.0.0.1, port_value: 18000";
        let admin = format!("port_value: {CLOUD_ENVOY_ADMIN_PORT}");
        let id = "  id: cloud-sidecar-1\n";
        for from in [xds, admin.as_str(), id] {
            assert!(
                template.contains(from),
                "{} has no `{from}` to rewrite",
                template_path.display()
            );
        }
        let cfg = template
            .replace(
                xds,
                &format!("address: {CLOUD_ADDR}, port_value: {FLEET_GRPC_PORT}"),
            )
            .replace(id, &format!("  id: {node_id}\n"));
        let path = self.dir.path().join(format!("cloud-envoy-{n}.yaml"));
        std::fs::write(&path, cfg).expect("write cloud Envoy bootstrap");
        let mut cmd = self.cloud.command(&envoy_native_bin());
        cmd.arg("-c").arg(&path).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "info",
        ]);
        let log = self.dir.path().join(format!("cloud-envoy-{n}.log"));
        self.cloud_envoy = Some(Process::spawn("cloud Envoy", &mut cmd, log));
        let live = crate::process::wait_for(Duration::from_secs(30), || {
            if self.cloud_envoy.as_mut()?.try_wait().is_some() {
                return Some(false);
            }
            let (status, _) = self.cloud_envoy_get("/ready").ok()?;
            (status == 200).then_some(true)
        });
        assert!(
            live == Some(true),
            "the cloud Envoy did not go LIVE (from the fleet's xDS on {CLOUD_ADDR}:{FLEET_GRPC_PORT}):\n{}\n\
             ---- misaki-cp ----\n{}",
            self.cloud_envoy_log(),
            self.fleet_log()
        );
    }

    pub fn kill_cloud_envoy(&mut self) {
        kill_slot(&mut self.cloud_envoy);
    }

    pub fn cloud_envoy_log(&self) -> String {
        log_of(self.cloud_envoy.as_ref())
    }

    /// GET from the cloud Envoy's admin (inside the cloud namespace).
    pub fn cloud_envoy_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], CLOUD_ENVOY_ADMIN_PORT));
        self.cloud.http_get(addr, path)
    }

    pub fn envoy_log(&self) -> String {
        log_of(self.envoy.as_ref())
    }

    /// GET from the vehicle Envoy's admin (inside the vehicle namespace).
    pub fn envoy_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], VEHICLE_ENVOY_ADMIN_PORT));
        self.vehicle.http_get(addr, path)
    }

    /// A counter or gauge of the vehicle Envoy (`/stats`, exact name; cluster names such
    /// as `out|maps|wifi` need no escaping).
    pub fn envoy_stat(&self, name: &str) -> Option<u64> {
        let (status, body) = self.envoy_get("/stats").ok()?;
        if status != 200 {
            return None;
        }
        let prefix = format!("{name}: ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// An app's `GET path` to the vehicle Envoy's `vehicle_outbound` (127.0.0.1:15001 in
    /// the vehicle namespace).
    pub fn app_get(&self, path: &str) -> std::io::Result<Reply> {
        self.app_request("GET", path, &[], b"")
    }

    /// An app's `POST path` with `body` to the vehicle Envoy.
    pub fn app_post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        self.app_request("POST", path, headers, body)
    }

    /// Any request of an app to the vehicle Envoy.
    pub fn app_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        let addr = SocketAddr::from(([127, 0, 0, 1], VEHICLE_OUTBOUND_PORT));
        self.vehicle.http_request(addr, method, path, headers, body)
    }
}

/// Kill (SIGKILL and reap) the process in `slot`, if any, and empty the slot.
fn kill_slot(slot: &mut Option<Process>) {
    if let Some(mut p) = slot.take() {
        p.kill();
    }
}

/// The log so far of a lab process ("" if it was never started).
fn log_of(p: Option<&Process>) -> String {
    p.map(Process::log_text).unwrap_or_default()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// (uid, primary gid) of `user`, if it exists.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Make sure the system user `name` exists (a system account: no home, no login shell,
/// a group of its own); create it if absent. Fails the test, saying why, if it cannot.
/// Returns (uid, gid).
pub fn ensure_user(name: &str) -> (u32, u32) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(ids) = user_ids(name) {
        return ids;
    }
    let group_exists = Command::new("getent")
        .args(["group", name])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut cmd = Command::new("useradd");
    cmd.args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
    ]);
    if group_exists {
        cmd.args(["--gid", name]);
    } else {
        cmd.arg("--user-group");
    }
    let out = cmd.arg(name).output().unwrap_or_else(|e| {
        panic!("cannot run useradd to create the test user {name}: {e} (apt-get install passwd)")
    });
    // Another test process may have created it meanwhile: only its absence is a failure.
    user_ids(name).unwrap_or_else(|| {
        panic!(
            "cannot create the unprivileged test user {name}: useradd {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One request an [`EchoServer`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRequest {
    /// The client's address (in the cloud: which uplink, see [`uplink_of_ip`]).
    pub from: String,
    pub method: String,
    pub path: String,
    /// `x-misaki-class`, empty if absent.
    pub class: String,
    pub idempotency_key: Option<String>,
    pub content_encoding: Option<String>,
    /// The body, with `content-encoding: zstd` undone.
    pub body: Vec<u8>,
}

/// A tiny HTTP/1.1 server inside a namespace (keep-alive, Content-Length or chunked
/// request bodies): answers every request 200 with
/// `from=<client ip> path=<path> class=<x-misaki-class>` and records it. Its threads
/// stop when it is dropped (they poll a stop flag every 50 ms while idle).
#[derive(Debug)]
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<EchoRequest>>>,
}

impl EchoServer {
    /// Bind `addr` inside `ns` and serve on threads of their own.
    pub fn start_in(ns: &Netns, addr: SocketAddr) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        // The listener is created on a thread that entered the namespace, so it lives
        // there; connections it accepts belong to it wherever they are served.
        let bound = ns.enter(move || -> std::io::Result<()> {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            thread::Builder::new()
                .name(format!("echo {addr}"))
                .spawn(move || accept_loop(&listener, &stop2, &seen2))?;
            Ok(())
        });
        if let Err(e) = bound {
            panic!("echo server on {addr} in namespace {}: {e}", ns.name);
        }
        EchoServer { addr, stop, seen }
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<EchoRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

const IDLE_POLL: Duration = Duration::from_millis(50);

fn accept_loop(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    seen: &Arc<Mutex<Vec<EchoRequest>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                let (stop, seen) = (stop.clone(), seen.clone());
                let _ = thread::Builder::new()
                    .name("echo conn".into())
                    .spawn(move || serve_echo(conn, peer.ip(), &stop, &seen));
            }
            Err(_) => thread::sleep(IDLE_POLL),
        }
    }
}

/// Read more bytes into `buf`; false on EOF, error, or stop.
fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>, stop: &AtomicBool) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match conn.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
}

/// Take one CRLF-terminated line off the front of `buf` (reading as needed).
fn take_line(conn: &mut TcpStream, buf: &mut Vec<u8>, stop: &AtomicBool) -> Option<String> {
    loop {
        if let Some(eol) = find(buf, b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
            buf.drain(..eol + 2);
            return Some(line);
        }
        if !fill(conn, buf, stop) {
            return None;
        }
    }
}

fn take_bytes(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    n: usize,
    stop: &AtomicBool,
) -> Option<Vec<u8>> {
    while buf.len() < n {
        if !fill(conn, buf, stop) {
            return None;
        }
    }
    Some(buf.drain(..n).collect())
}

fn take_chunked(conn: &mut TcpStream, buf: &mut Vec<u8>, stop: &AtomicBool) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size = take_line(conn, buf, stop)?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            while !take_line(conn, buf, stop)?.is_empty() {}
            return Some(body);
        }
        body.extend(take_bytes(conn, buf, size, stop)?);
        take_bytes(conn, buf, 2, stop)?;
    }
}

fn serve_echo(
    mut conn: TcpStream,
    peer: IpAddr,
    stop: &AtomicBool,
    seen: &Mutex<Vec<EchoRequest>>,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(IDLE_POLL));
    let mut buf = Vec::new();
    loop {
        let Some(request_line) = take_line(&mut conn, &mut buf, stop) else {
            return;
        };
        if request_line.is_empty() {
            continue; // stray CRLF between requests
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("?").to_string();
        let path = parts.next().unwrap_or("?").to_string();
        let http10 = parts.next() == Some("HTTP/1.0");
        let (mut class, mut key, mut encoding) = (String::new(), None, None);
        let (mut len, mut chunked, mut close, mut expect) = (0usize, false, http10, false);
        loop {
            let Some(h) = take_line(&mut conn, &mut buf, stop) else {
                return;
            };
            if h.is_empty() {
                break;
            }
            let Some((k, v)) = h.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "x-misaki-class" => class = v.to_string(),
                "idempotency-key" => key = Some(v.to_string()),
                "content-encoding" => encoding = Some(v.to_string()),
                "content-length" => len = v.parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                "connection" => {
                    close = v.eq_ignore_ascii_case("close")
                        || (http10 && !v.eq_ignore_ascii_case("keep-alive"));
                }
                "expect" => expect = v.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        if expect && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return;
        }
        let raw = if chunked {
            take_chunked(&mut conn, &mut buf, stop)
        } else {
            take_bytes(&mut conn, &mut buf, len, stop)
        };
        let Some(raw) = raw else { return };
        let body = match encoding.as_deref() {
            Some(e) if e.eq_ignore_ascii_case("zstd") => {
                zstd::decode_all(raw.as_slice()).unwrap_or(raw)
            }
            _ => raw,
        };
        let text = format!("from={peer} path={path} class={class}");
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(EchoRequest {
                from: peer.to_string(),
                method,
                path,
                class,
                idempotency_key: key,
                content_encoding: encoding,
                body,
            });
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if conn.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Whether `raw` holds a whole response: headers plus a body of `content-length`
/// bytes, or a chunked body up to its last chunk. Without either the body ends at EOF.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    for line in head.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "content-length" => {
                return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
            }
            "transfer-encoding" if v.trim() == "chunked" => {
                return body.starts_with(b"0\r\n\r\n") || find(body, b"\r\n0\r\n\r\n").is_some();
            }
            _ => {}
        }
    }
    false
}
