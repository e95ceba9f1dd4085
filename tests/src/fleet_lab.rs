//! Many vehicles behind one cloud gateway (issue 13), each vehicle in a network
//! namespace of its own: on one host several vehicles cannot share loopback (each
//! vehicle's service listens on the same policy port, and their Envoys would share
//! listener ports through SO_REUSEPORT).
//!
//! Topology (cloud `mfc-<pid>-<n>`, vehicle k (1-based) `mfv-<pid>-<n>-<k>`):
//! ```text
//!  cloud (lo: 198.18.0.1/32 = misaki-cp, the cloud sidecar Envoy, the gateway)
//!   cveh<k> 198.18.(10+k).2/30 ── veth ── wlan0 198.18.(10+k).1/30  vehicle k
//!                                         route 198.18.0.1 via 198.18.(10+k).2
//! ```
//! In the cloud namespace: `misaki-cp serve` (xDS and fleet gRPC on
//! [`CLOUD_ADDR`]:[`CP_XDS_PORT`], admin on [`CP_ADMIN_PORT`], link-probe echo on
//! [`CP_PROBE_PORT`]) and one cloud sidecar Envoy (`envoy-configs/cloud-sidecar.yaml`,
//! fed by that misaki-cp, `--concurrency 1`). In each vehicle namespace: the vehicle's
//! `diag` service ([`VehicleService`] on 127.0.0.1:[`DIAG_PORT`], answering
//! `vehicle=<id> path=<path>`), edge-netd (its vehicle id, one uplink `wifi` on
//! `wlan0`, probing misaki-cp's echo) and the vehicle Envoy
//! (`envoy-configs/vehicle-sidecar-edge.yaml`) fed by that edge-netd, which dials its
//! reverse tunnels to the cloud over `wlan0`.
//!
//! Every port is fixed: each namespace is fresh, so nothing else binds there, and the
//! policy's ports must be the same on every vehicle anyway. Only 198.18.0.0/15
//! addresses, only inside the namespaces created here.
//!
//! Dropping the lab (also while unwinding from a failed assertion) kills the processes
//! first (Envoys before the daemons feeding them), stops the services, then deletes the
//! namespaces (which deletes the veth pairs).

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::http::{Headers, Reply};
use crate::netns::{Netns, require_root, run};
use crate::process::{Process, envoy_native_bin, repo_root, target_bin, wait_for};

/// The cloud's address (on its `lo`): misaki-cp, the cloud Envoy, `mesh.vehicle_gateways`.
pub const CLOUD_ADDR: &str = "198.18.0.1";
/// misaki-cp's xDS and fleet gRPC in the cloud namespace.
pub const CP_XDS_PORT: u16 = 50051;
/// misaki-cp's admin (`/fleet`) in the cloud namespace.
pub const CP_ADMIN_PORT: u16 = 8080;
/// misaki-cp's UDP echo for edge-netd's link probes.
pub const CP_PROBE_PORT: u16 = 7007;
/// The cloud sidecar's `vehicle_gateway` listener (the policy's `vehicle_gateway_port`).
pub const GATEWAY_PORT: u16 = 15444;
/// The cloud sidecar's tunnel listener the vehicles dial (`vehicle_tunnel_port`).
pub const TUNNEL_PORT: u16 = 15445;
pub const VEHICLE_OUTBOUND_PORT: u16 = 15001;
pub const VEHICLE_INBOUND_PORT: u16 = 15006;
pub const CLOUD_INBOUND_PORT: u16 = 15008;
/// The vehicle service `diag` on every vehicle (127.0.0.1 in its namespace).
pub const DIAG_PORT: u16 = 7070;
/// The cloud sidecar Envoy's admin (`cloud-sidecar.yaml`), 127.0.0.1 of the cloud.
pub const CLOUD_ENVOY_ADMIN_PORT: u16 = 19902;
/// The vehicle Envoy's admin (`vehicle-sidecar-edge.yaml`), 127.0.0.1 of its vehicle.
pub const VEHICLE_ENVOY_ADMIN_PORT: u16 = 19904;
/// edge-netd's local API in each vehicle namespace.
pub const NETD_API_PORT: u16 = 9470;
/// The header naming the vehicle a gateway call is for.
pub const TARGET_HEADER: &str = "x-misaki-target-vehicle";
/// The vehicle's uplink interface (in every vehicle namespace).
pub const UPLINK_IFACE: &str = "wlan0";
/// The class the tunnels use: `standard`, over the one uplink `wifi`.
pub const TUNNEL_CLASS: &str = "standard";

const STARTUP: Duration = Duration::from_secs(30);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The fleet's policy: the gateway on [`CLOUD_ADDR`], tunnels over class `standard`
/// (uplink `wifi`), one vehicle service `diag` on [`DIAG_PORT`] with no cloud replica.
pub fn fleet_policy() -> String {
    format!(
        "version: 1
mesh:
  vehicle_outbound_port: {VEHICLE_OUTBOUND_PORT}
  vehicle_inbound_port: {VEHICLE_INBOUND_PORT}
  cloud_inbound_port: {CLOUD_INBOUND_PORT}
  vehicle_gateway_port: {GATEWAY_PORT}
  vehicle_tunnel_port: {TUNNEL_PORT}
  vehicle_gateways: [{CLOUD_ADDR}]
  vehicle_tunnel_class: {TUNNEL_CLASS}
uplinks:
  - {{ name: wifi, kind: wifi, cost: 1 }}
classes:
  - {{ name: {TUNNEL_CLASS}, timeout: 5s, retries: 1, uplinks: [wifi] }}
services:
  - name: diag
    location: vehicle
    port: {DIAG_PORT}
    routes: [\"/diag\"]
    class: {TUNNEL_CLASS}
"
    )
}

/// A vehicle-hosted service: HTTP/1.1 (keep-alive) on `127.0.0.1:port` in a vehicle
/// namespace, answering every request 200 with `vehicle=<id> path=<path>` and recording
/// the path. Its accept loop stops when it drops; connections end with their client
/// (the vehicle Envoy, killed before it).
#[derive(Debug)]
pub struct VehicleService {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl VehicleService {
    pub fn start_in(ns: &Netns, vehicle: &str, port: u16) -> VehicleService {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let id = vehicle.to_string();
        // Bound on a thread that entered the namespace, so the socket lives there.
        let bound = ns.enter(move || -> std::io::Result<()> {
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            listener.set_nonblocking(true)?;
            thread::Builder::new()
                .name(format!("{id} diag"))
                .spawn(move || {
                    while !stop2.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                let (id, seen) = (id.clone(), seen2.clone());
                                let _ = thread::Builder::new()
                                    .name(format!("{id} diag conn"))
                                    .spawn(move || serve(conn, &id, &seen));
                            }
                            Err(_) => thread::sleep(Duration::from_millis(50)),
                        }
                    }
                })?;
            Ok(())
        });
        if let Err(e) = bound {
            panic!(
                "{vehicle}'s service on 127.0.0.1:{port} in {}: {e}",
                ns.name
            );
        }
        VehicleService { stop, seen }
    }

    /// The paths of every request answered so far, in order.
    pub fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for VehicleService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, id: &str, seen: &Mutex<Vec<String>>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("?").to_string();
        let Ok(Some(headers)) = Headers::read(&mut reader) else {
            return;
        };
        if headers.read_body(&mut reader).is_none() {
            return;
        }
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(path.clone());
        let text = format!("vehicle={id} path={path}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if conn.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// One vehicle of the lab. Field order is drop order.
#[derive(Debug)]
pub struct FleetVehicle {
    pub envoy: Option<Process>,
    pub netd: Option<Process>,
    pub service: VehicleService,
    pub ns: Netns,
    pub id: String,
    /// Its address on its uplink (`198.18.(10+k).1`).
    pub addr: String,
    netd_config: PathBuf,
    dir: PathBuf,
}

impl FleetVehicle {
    /// (Re)start edge-netd in the vehicle namespace (a running one is killed first),
    /// without waiting.
    pub fn spawn_netd(&mut self) {
        self.netd = None;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut cmd = self.ns.command(&target_bin("edge-netd"));
        cmd.arg("--config")
            .arg(&self.netd_config)
            .env("RUST_LOG", "info");
        let log = self.dir.join(format!("edge-netd-{n}.log"));
        self.netd = Some(Process::spawn(
            &format!("edge-netd {}", self.id),
            &mut cmd,
            log,
        ));
    }

    /// Kill edge-netd (the vehicle Envoy keeps running, on the config it has).
    pub fn kill_netd(&mut self) {
        if let Some(mut p) = self.netd.take() {
            p.kill();
        }
    }

    /// Wait until edge-netd's `/readyz` answers 200.
    pub fn wait_netd_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], NETD_API_PORT));
        let ready = wait_for(STARTUP, || {
            if self.netd.as_mut()?.try_wait().is_some() {
                return Some(false);
            }
            let (status, _) = self.ns.http_get(addr, "/readyz").ok()?;
            (status == 200).then_some(true)
        });
        assert!(
            ready == Some(true),
            "edge-netd of {} never answered /readyz 200:\n{}",
            self.id,
            log_of(self.netd.as_ref())
        );
    }

    /// Start the vehicle Envoy (fed by edge-netd's default local xDS, 127.0.0.1:15010
    /// in this namespace, as the template says), without waiting.
    pub fn spawn_envoy(&mut self) {
        self.envoy = None;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let template_path = repo_root().join("envoy-configs/vehicle-sidecar-edge.yaml");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
        let id = "  id: vehicle-sidecar\n";
        assert!(
            template.contains(id),
            "{} has no `{id}` to rewrite",
            template_path.display()
        );
        let cfg = template.replace(id, &format!("  id: {}-sidecar\n", self.id));
        let path = self.dir.join(format!("vehicle-envoy-{n}.yaml"));
        std::fs::write(&path, cfg).expect("write vehicle Envoy bootstrap");
        let mut cmd = self.ns.command(&envoy_native_bin());
        cmd.arg("-c").arg(&path).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "info",
        ]);
        let log = self.dir.join(format!("vehicle-envoy-{n}.log"));
        self.envoy = Some(Process::spawn(
            &format!("vehicle Envoy {}", self.id),
            &mut cmd,
            log,
        ));
    }

    /// Wait until the vehicle Envoy's admin `/ready` answers 200.
    pub fn wait_envoy_live(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], VEHICLE_ENVOY_ADMIN_PORT));
        let live = wait_for(STARTUP, || {
            if self.envoy.as_mut()?.try_wait().is_some() {
                return Some(false);
            }
            let (status, _) = self.ns.http_get(addr, "/ready").ok()?;
            (status == 200).then_some(true)
        });
        assert!(
            live == Some(true),
            "the vehicle Envoy of {} did not go LIVE:\n{}\n---- edge-netd ----\n{}",
            self.id,
            log_of(self.envoy.as_ref()),
            log_of(self.netd.as_ref())
        );
    }

    pub fn netd_log(&self) -> String {
        log_of(self.netd.as_ref())
    }

    pub fn envoy_log(&self) -> String {
        log_of(self.envoy.as_ref())
    }
}

/// The cloud and its vehicles; see the module docs.
#[derive(Debug)]
pub struct FleetLab {
    // Field order is drop order: the cloud Envoy, then each vehicle (its Envoy, its
    // edge-netd, its service, its namespace), then misaki-cp, the cloud namespace, and
    // the directory of configs and logs.
    pub cloud_envoy: Option<Process>,
    pub vehicles: Vec<FleetVehicle>,
    pub cp: Option<Process>,
    pub cloud: Netns,
    pub dir: tempfile::TempDir,
}

impl FleetLab {
    /// Build the namespaces, start misaki-cp and the cloud Envoy, then every vehicle
    /// (service, edge-netd, Envoy), and wait for each to be up (edge-netd ready, Envoys
    /// LIVE); not for the tunnels.
    pub fn start(vehicle_ids: &[&str]) -> FleetLab {
        require_root();
        assert!(
            !vehicle_ids.is_empty() && vehicle_ids.len() <= 100,
            "1 to 100 vehicles"
        );
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = tempfile::tempdir().expect("temp dir");
        let cloud = Netns::create(format!("mfc-{pid}-{n}"));
        cloud.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{CLOUD_ADDR}/32"),
            "dev",
            "lo",
        ]);
        let mut lab = FleetLab {
            cloud_envoy: None,
            vehicles: Vec::new(),
            cp: None,
            cloud,
            dir,
        };
        lab.start_cp();
        lab.start_cloud_envoy();
        for (i, id) in vehicle_ids.iter().enumerate() {
            let v = lab.add_vehicle(&format!("mfv-{pid}-{n}-{}", i + 1), i + 1, id);
            lab.vehicles.push(v);
        }
        for v in &mut lab.vehicles {
            v.spawn_netd();
        }
        for v in &mut lab.vehicles {
            v.wait_netd_ready();
        }
        for v in &mut lab.vehicles {
            v.spawn_envoy();
        }
        for v in &mut lab.vehicles {
            v.wait_envoy_live();
        }
        lab
    }

    fn start_cp(&mut self) {
        let policy = self.dir.path().join("mesh.yaml");
        std::fs::write(&policy, fleet_policy()).expect("write fleet policy");
        let mut cmd = self.cloud.command(&target_bin("misaki-cp"));
        cmd.arg("serve")
            .arg("--policy")
            .arg(&policy)
            .args([
                "--xds-addr",
                &format!("{CLOUD_ADDR}:{CP_XDS_PORT}"),
                "--admin-addr",
                &format!("{CLOUD_ADDR}:{CP_ADMIN_PORT}"),
                "--probe-addr",
                &format!("{CLOUD_ADDR}:{CP_PROBE_PORT}"),
            ])
            .env("RUST_LOG", "info");
        let log = self.dir.path().join("misaki-cp.log");
        self.cp = Some(Process::spawn("misaki-cp", &mut cmd, log));
        let up = wait_for(STARTUP, || self.fleet());
        assert!(
            up.is_some(),
            "misaki-cp did not come up:\n{}",
            self.cp_log()
        );
    }

    /// The cloud sidecar Envoy from `envoy-configs/cloud-sidecar.yaml`, rewritten like
    /// [`crate::Envoy::start`] does (node id `cloud-gw-1`, xDS from the lab's misaki-cp),
    /// `--concurrency 1`; waits until it is LIVE.
    fn start_cloud_envoy(&mut self) {
        let template_path = repo_root().join("envoy-configs/cloud-sidecar.yaml");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("{}: {e}", template_path.display()));
        let xds = "address: 127.0.0.1, port_value: 18000";
        let id = "  id: cloud-sidecar-1\n";
        for from in [xds, id] {
            assert!(
                template.contains(from),
                "{} has no `{from}` to rewrite",
                template_path.display()
            );
        }
        let cfg = template
            .replace(
                xds,
                &format!("address: {CLOUD_ADDR}, port_value: {CP_XDS_PORT}"),
            )
            .replace(id, "  id: cloud-gw-1\n");
        let path = self.dir.path().join("cloud-envoy.yaml");
        std::fs::write(&path, cfg).expect("write cloud Envoy bootstrap");
        let mut cmd = self.cloud.command(&envoy_native_bin());
        cmd.arg("-c").arg(&path).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "info",
        ]);
        let log = self.dir.path().join("cloud-envoy.log");
        self.cloud_envoy = Some(Process::spawn("cloud Envoy", &mut cmd, log));
        let addr = SocketAddr::from(([127, 0, 0, 1], CLOUD_ENVOY_ADMIN_PORT));
        let live = wait_for(STARTUP, || {
            if self.cloud_envoy.as_mut()?.try_wait().is_some() {
                return Some(false);
            }
            let (status, _) = self.cloud.http_get(addr, "/ready").ok()?;
            (status == 200).then_some(true)
        });
        assert!(
            live == Some(true),
            "the cloud Envoy did not go LIVE:\n{}\n---- misaki-cp ----\n{}",
            self.cloud_envoy_log(),
            self.cp_log()
        );
    }

    /// Vehicle `k` (1-based): its namespace, its veth pair to the cloud, its service,
    /// its edge-netd config (no process yet).
    fn add_vehicle(&self, ns_name: &str, k: usize, id: &str) -> FleetVehicle {
        let ns = Netns::create(ns_name.to_string());
        let octet = 10 + k;
        let (addr, peer_addr) = (format!("198.18.{octet}.1"), format!("198.18.{octet}.2"));
        let peer = format!("cveh{k}");
        run(&[
            "ip",
            "link",
            "add",
            UPLINK_IFACE,
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.cloud.name,
        ]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            UPLINK_IFACE,
        ]);
        self.cloud.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{peer_addr}/30"),
            "dev",
            &peer,
        ]);
        for key in ["all", "default", UPLINK_IFACE] {
            ns.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
        }
        ns.exec(&["ip", "link", "set", UPLINK_IFACE, "up"]);
        self.cloud.exec(&["ip", "link", "set", &peer, "up"]);
        ns.exec(&[
            "ip",
            "route",
            "add",
            &format!("{CLOUD_ADDR}/32"),
            "via",
            &peer_addr,
            "dev",
            UPLINK_IFACE,
        ]);
        let service = VehicleService::start_in(&ns, id, DIAG_PORT);
        let dir = self.dir.path().join(id);
        std::fs::create_dir_all(&dir).expect("vehicle dir");
        let config = format!(
            "vehicle_id: {id}\n\
             control_plane: http://{CLOUD_ADDR}:{CP_XDS_PORT}\n\
             api: 127.0.0.1:{NETD_API_PORT}\n\
             state_dir: {state}\n\
             heartbeat_interval: 200ms\n\
             uplinks:\n\
             \x20 - {{ name: wifi, interface: {UPLINK_IFACE}, kind: wifi, cost: 1 }}\n\
             probe:\n\
             \x20 targets: [\"{CLOUD_ADDR}:{CP_PROBE_PORT}\"]\n\
             \x20 interval: 100ms\n\
             \x20 timeout: 200ms\n",
            state = dir.join("state").display(),
        );
        let netd_config = dir.join("edge-netd.yaml");
        std::fs::write(&netd_config, config).expect("write edge-netd config");
        FleetVehicle {
            envoy: None,
            netd: None,
            service,
            ns,
            id: id.to_string(),
            addr,
            netd_config,
            dir,
        }
    }

    /// The vehicle named `id`.
    pub fn vehicle(&self, id: &str) -> &FleetVehicle {
        self.vehicles
            .iter()
            .find(|v| v.id == id)
            .unwrap_or_else(|| panic!("no vehicle {id} in the lab"))
    }

    pub fn vehicle_mut(&mut self, id: &str) -> &mut FleetVehicle {
        self.vehicles
            .iter_mut()
            .find(|v| v.id == id)
            .unwrap_or_else(|| panic!("no vehicle {id} in the lab"))
    }

    /// A cloud caller's `GET path` to the gateway (from the cloud namespace, a new
    /// connection) for `vehicle` (`None`: without [`TARGET_HEADER`]).
    pub fn gateway_get(&self, path: &str, vehicle: Option<&str>) -> std::io::Result<Reply> {
        let addr = SocketAddr::new(CLOUD_ADDR.parse().expect("literal"), GATEWAY_PORT);
        let headers: Vec<(&str, &str)> = vehicle.map(|v| (TARGET_HEADER, v)).into_iter().collect();
        self.cloud.http_request(addr, "GET", path, &headers, b"")
    }

    /// misaki-cp's `/fleet` (`{"online", "total", "vehicles": [...]}`); `None` on any
    /// error.
    pub fn fleet(&self) -> Option<serde_json::Value> {
        let addr: SocketAddr = format!("{CLOUD_ADDR}:{CP_ADMIN_PORT}")
            .parse()
            .expect("literal");
        let (status, body) = self.cloud.http_get(addr, "/fleet").ok()?;
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// Whether misaki-cp's registry has `vehicle` online (`None`: not known, or no
    /// answer).
    pub fn fleet_online(&self, vehicle: &str) -> Option<bool> {
        let fleet = self.fleet()?;
        fleet["vehicles"]
            .as_array()?
            .iter()
            .find(|v| v["vehicle_id"] == vehicle)
            .and_then(|v| v["online"].as_bool())
    }

    /// The peer addresses of the tunnel connections the cloud holds now (established
    /// TCP connections to [`TUNNEL_PORT`] in the cloud namespace), one per connection.
    pub fn tunnel_peers(&self) -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.cloud.name, "ss", "-Htn", "state"])
            .args(["established", &format!("( sport = :{TUNNEL_PORT} )")])
            .output()
            .expect("run ss (iproute2)");
        assert!(
            out.status.success(),
            "ss failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                // Recv-Q Send-Q Local Peer (the state is filtered, so no state column).
                let peer = l.split_whitespace().nth(3)?;
                let (ip, _) = peer.rsplit_once(':')?;
                Some(ip.split('%').next().unwrap_or(ip).to_string())
            })
            .collect()
    }

    pub fn cp_log(&self) -> String {
        log_of(self.cp.as_ref())
    }

    pub fn cloud_envoy_log(&self) -> String {
        log_of(self.cloud_envoy.as_ref())
    }

    /// Every log of the lab, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "---- cloud Envoy ----\n{}\n---- misaki-cp ----\n{}",
            tail(&self.cloud_envoy_log(), 80),
            tail(&self.cp_log(), 80)
        );
        for v in &self.vehicles {
            out.push_str(&format!(
                "\n---- {} vehicle Envoy ----\n{}\n---- {} edge-netd ----\n{}",
                v.id,
                tail(&v.envoy_log(), 40),
                v.id,
                tail(&v.netd_log(), 40)
            ));
        }
        out
    }

    /// The lab's directory (configs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FleetLab {
    fn drop(&mut self) {
        // Process's own Drop prints its log tail when the test is failing; the fields'
        // order does the rest (see the struct).
        if let Some(mut p) = self.cloud_envoy.take() {
            p.kill();
        }
        for v in &mut self.vehicles {
            if let Some(mut p) = v.envoy.take() {
                p.kill();
            }
            v.kill_netd();
        }
    }
}

fn log_of(p: Option<&Process>) -> String {
    p.map(Process::log_text).unwrap_or_default()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
