//! The cloud → vehicle lab on loopback (issue 13): the real `misaki-cp`, the real
//! `edge-netd` (uplink `lo`, a power file polled every [`POWER_INTERVAL`]), the
//! vehicle's Envoy fed by edge-netd (`vehicle-sidecar-edge.yaml`) and a cloud sidecar
//! Envoy fed by misaki-cp (`cloud-sidecar.yaml`), for one vehicle, [`VEHICLE`].
//!
//! The policy has two vehicle services: `diag` (routes `/diag`, a cloud replica,
//! `on_low_power: cloud`) and `cam` (routes `/cam`, no replica); tunnels to this host.
//! A cloud caller reaches them through the cloud sidecar's `vehicle_gateway` port with
//! [`TARGET_HEADER`]: the vehicle's name; the upstreams answer with their name first
//! (`vehicle-diag`, `vehicle-cam`, `replica-diag`), as [`Upstream`] does.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use misaki_harness::http::{self, Reply};

use crate::process::{
    ControlPlane, Envoy, Process, Upstream, free_port, netd_config_on_lo, target_bin, wait_for,
};

/// The header naming the vehicle a gateway call is for.
pub const TARGET_HEADER: &str = "x-misaki-target-vehicle";
/// The vehicle of the lab (edge-netd's `vehicle_id`).
pub const VEHICLE: &str = "car-1";
/// edge-netd's `power.interval`: how often it reads the power file.
pub const POWER_INTERVAL: &str = "100ms";

const LONG: Duration = Duration::from_secs(60);

/// The mesh ports of the policy: the vehicle sidecar's outbound and inbound, the cloud
/// sidecar's inbound, its vehicle gateway, and the tunnel port the vehicle dials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub cloud: u16,
    pub gateway: u16,
    pub tunnel: u16,
}

impl GatewayPorts {
    /// Five fresh ephemeral ports.
    pub fn fresh() -> GatewayPorts {
        GatewayPorts {
            outbound: free_port(),
            inbound: free_port(),
            cloud: free_port(),
            gateway: free_port(),
            tunnel: free_port(),
        }
    }
}

/// The policy: the vehicle services `diag` on port `diag` (replica on `replica`, moves
/// on low power) and `cam` on port `cam` (no replica), one class `standard` over
/// `wifi`, tunnels to 127.0.0.1.
pub fn gateway_policy(p: &GatewayPorts, diag: u16, cam: u16, replica: u16) -> String {
    format!(
        "version: 1
mesh:
  vehicle_outbound_port: {}
  vehicle_inbound_port: {}
  cloud_inbound_port: {}
  vehicle_gateway_port: {}
  vehicle_tunnel_port: {}
  vehicle_gateways: [127.0.0.1]
  vehicle_tunnel_class: standard
uplinks:
  - {{ name: wifi, kind: wifi, cost: 1 }}
classes:
  - {{ name: standard, timeout: 5s, retries: 1, uplinks: [wifi] }}
services:
  - name: diag
    location: vehicle
    port: {diag}
    routes: [\"/diag\"]
    class: standard
    cloud_replica: [\"127.0.0.1:{replica}\"]
    on_low_power: cloud
  - name: cam
    location: vehicle
    port: {cam}
    routes: [\"/cam\"]
    class: standard
",
        p.outbound, p.inbound, p.cloud, p.gateway, p.tunnel
    )
}

/// The running lab; every process is killed when it drops.
#[derive(Debug)]
pub struct GatewayLab {
    pub ports: GatewayPorts,
    // Drop order: Envoys before the daemons feeding them.
    pub cloud: Envoy,
    pub vehicle: Envoy,
    pub netd: Option<Process>,
    pub cp: ControlPlane,
    pub power_file: PathBuf,
    pub netd_config: PathBuf,
    /// The vehicle's own `diag`, its `cam`, and `diag`'s cloud replica.
    pub diag: Upstream,
    pub cam: Upstream,
    pub replica: Upstream,
    /// Configs, logs and edge-netd's state dir; removed last.
    pub dir: tempfile::TempDir,
}

/// Start edge-netd on `config`, logging to `dir/edge-netd.log` (each start truncates it).
pub fn spawn_netd(config: &Path, dir: &Path) -> Process {
    let mut cmd = Command::new(target_bin("edge-netd"));
    cmd.arg("--config").arg(config).env("RUST_LOG", "info");
    Process::spawn("edge-netd", &mut cmd, dir.join("edge-netd.log"))
}

impl GatewayLab {
    /// Start everything (power `on`) and wait for both Envoys to be LIVE; not for the
    /// tunnel ([`GatewayLab::gateway_reaches`] waits for that).
    pub fn start() -> GatewayLab {
        let dir = tempfile::tempdir().expect("tempdir");
        let (diag, cam, replica) = (
            Upstream::start("vehicle-diag"),
            Upstream::start("vehicle-cam"),
            Upstream::start("replica-diag"),
        );
        let ports = GatewayPorts::fresh();
        let policy_path = dir.path().join("mesh.yaml");
        fs::write(
            &policy_path,
            gateway_policy(&ports, diag.port, cam.port, replica.port),
        )
        .expect("policy");
        let probe = format!("127.0.0.1:{}", free_port());
        let args = ["--probe-addr", probe.as_str()];
        let cp =
            ControlPlane::start_with(&policy_path, dir.path(), free_port(), free_port(), &args);

        let power_file = dir.path().join("power_state");
        fs::write(&power_file, "on\n").expect("power file");
        let extra = format!(
            "power:\n\x20 file: {}\n\x20 interval: {POWER_INTERVAL}\n",
            power_file.display()
        );
        let text = netd_config_on_lo(
            VEHICLE,
            &format!("http://127.0.0.1:{}", cp.xds_port),
            free_port(),
            &dir.path().join("state"),
            &probe,
            &extra,
        );
        let local_xds: u16 = text
            .lines()
            .find_map(|l| l.strip_prefix("xds: 127.0.0.1:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("the config names its local xDS port");
        let netd_config = dir.path().join("edge-netd.yaml");
        fs::write(&netd_config, text).expect("edge-netd config");
        let netd = spawn_netd(&netd_config, dir.path());

        let cloud = Envoy::start("cloud-sidecar.yaml", "cloud-gw-1", cp.xds_port, dir.path());
        let vehicle = Envoy::start(
            "vehicle-sidecar-edge.yaml",
            &format!("{VEHICLE}-sidecar"),
            local_xds,
            dir.path(),
        );
        GatewayLab {
            ports,
            cloud,
            vehicle,
            netd: Some(netd),
            cp,
            power_file,
            netd_config,
            diag,
            cam,
            replica,
            dir,
        }
    }

    /// (Re)start edge-netd on its config; a running one is killed first.
    pub fn start_netd(&mut self) {
        drop(self.netd.take());
        self.netd = Some(spawn_netd(&self.netd_config, self.dir.path()));
    }

    /// `GET path` through the cloud gateway, for `vehicle` (`None`: no header); a new
    /// connection.
    pub fn try_via_gateway(&self, path: &str, vehicle: Option<&str>) -> io::Result<Reply> {
        let headers: Vec<(&str, &str)> = vehicle.map(|v| (TARGET_HEADER, v)).into_iter().collect();
        http::request(self.ports.gateway, "GET", path, &headers, b"")
    }

    /// [`GatewayLab::try_via_gateway`], panicking on a transport error.
    pub fn via_gateway(&self, path: &str, vehicle: Option<&str>) -> Reply {
        self.try_via_gateway(path, vehicle)
            .unwrap_or_else(|e| panic!("gateway request {path}: {e}"))
    }

    /// `GET path` through the vehicle Envoy's outbound listener (a caller on the
    /// vehicle), panicking on a transport error.
    pub fn call_on_vehicle(&self, path: &str) -> Reply {
        http::get(self.ports.outbound, path)
            .unwrap_or_else(|e| panic!("vehicle request {path}: {e}"))
    }

    /// Wait until a gateway call for the vehicle to `path` is answered by `who`.
    pub fn gateway_reaches(&self, path: &str, who: &str) -> Reply {
        let got = wait_for(LONG, || {
            let r = self.try_via_gateway(path, Some(VEHICLE)).ok()?;
            (r.status == 200 && r.body.starts_with(who)).then_some(r)
        });
        got.unwrap_or_else(|| {
            panic!(
                "{path} via the gateway never reached {who}; last: {:?}\ncloud Envoy:\n{}\nvehicle Envoy:\n{}",
                self.try_via_gateway(path, Some(VEHICLE)),
                self.cloud.proc.log_text(),
                self.vehicle.proc.log_text()
            )
        })
    }

    /// Wait until a call on the vehicle to `path` is answered by `who`.
    pub fn vehicle_reaches(&self, path: &str, who: &str) {
        let got = wait_for(LONG, || {
            let r = http::get(self.ports.outbound, path).ok()?;
            (r.status == 200 && r.body.starts_with(who)).then_some(())
        });
        assert!(
            got.is_some(),
            "{path} from the vehicle never reached {who}; last: {:?}",
            http::get(self.ports.outbound, path)
        );
    }

    /// Write `word` (`on`, `low`, ...) to the power file, atomically (write + rename).
    pub fn set_power(&self, word: &str) {
        let tmp = self.power_file.with_extension("tmp");
        fs::write(&tmp, format!("{word}\n")).expect("write power file");
        fs::rename(&tmp, &self.power_file).expect("rename power file");
    }

    /// misaki-cp's `/fleet/<vehicle>` (`online`, `power`, ...); `None` on any error
    /// (not known yet, misaki-cp busy).
    pub fn fleet_record(&self) -> Option<serde_json::Value> {
        let r = http::get_timeout(
            self.cp.admin_port,
            &format!("/fleet/{VEHICLE}"),
            Duration::from_secs(2),
        )
        .ok()?;
        if r.status != 200 {
            return None;
        }
        serde_json::from_str(&r.body).ok()
    }
}
