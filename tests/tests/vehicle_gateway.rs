//! Cloud → vehicle through reverse tunnels, and the fleet state driving it, on loopback:
//! the real `misaki-cp`, the real `edge-netd` (uplink `lo`, a power file), the vehicle's
//! Envoy fed by edge-netd, and a cloud sidecar Envoy fed by misaki-cp.
//!
//! A cloud caller reaches the vehicle's `diag` service by sending to the cloud sidecar's
//! `vehicle_gateway` with `x-misaki-target-vehicle: car-1`; the sidecar has no route to
//! the vehicle except the tunnels the vehicle's Envoy dialled. Low power moves callers
//! on both sides to `diag`'s cloud replica and back; an offline vehicle's calls go to
//! the replica, or answer `503 vehicle-offline` at once for `cam`, which has none; the
//! gateway says why for a missing header, an unknown vehicle, an unknown path.
//! (tests/tests/vehicle_gateway_nat.rs puts the vehicle behind NAT in namespaces.)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use misaki_e2e::http::{self, Reply};
use misaki_e2e::process::{Upstream, wait_for};
use misaki_e2e::{ControlPlane, Envoy, Process, free_port, target_bin};

const LONG: Duration = Duration::from_secs(60);
const TARGET: &str = "x-misaki-target-vehicle";

struct Ports {
    outbound: u16,
    inbound: u16,
    cloud: u16,
    gateway: u16,
    tunnel: u16,
}

/// The policy: the vehicle services `diag` (replica, moves on low power) and `cam` (no
/// replica), tunnels to this host.
fn policy(p: &Ports, diag: u16, cam: u16, replica: u16) -> String {
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

struct Lab {
    dir: tempfile::TempDir,
    ports: Ports,
    // Drop order: Envoys before the daemons feeding them.
    cloud: Envoy,
    vehicle: Envoy,
    netd: Option<Process>,
    cp: ControlPlane,
    power_file: PathBuf,
    netd_config: PathBuf,
    _services: [Upstream; 3],
}

fn start_netd(config: &Path, dir: &Path) -> Process {
    let mut cmd = Command::new(target_bin("edge-netd"));
    cmd.arg("--config").arg(config).env("RUST_LOG", "info");
    Process::spawn("edge-netd", &mut cmd, dir.join("edge-netd.log"))
}

fn start() -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let diag = Upstream::start("vehicle-diag");
    let cam = Upstream::start("vehicle-cam");
    let replica = Upstream::start("replica-diag");
    let ports = Ports {
        outbound: free_port(),
        inbound: free_port(),
        cloud: free_port(),
        gateway: free_port(),
        tunnel: free_port(),
    };
    let policy_path = dir.path().join("mesh.yaml");
    fs::write(
        &policy_path,
        policy(&ports, diag.port, cam.port, replica.port),
    )
    .expect("policy");
    let probe = format!("127.0.0.1:{}", free_port());
    let args = ["--probe-addr", probe.as_str()];
    let cp = ControlPlane::start_with(&policy_path, dir.path(), free_port(), free_port(), &args);

    let power_file = dir.path().join("power_state");
    fs::write(&power_file, "on\n").expect("power file");
    let extra = format!(
        "power:\n\x20 file: {}\n\x20 interval: 100ms\n",
        power_file.display()
    );
    let text = misaki_e2e::process::netd_config_on_lo(
        "car-1",
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
    let netd = start_netd(&netd_config, dir.path());

    let cloud = Envoy::start("cloud-sidecar.yaml", "cloud-gw-1", cp.xds_port, dir.path());
    let vehicle = Envoy::start(
        "vehicle-sidecar-edge.yaml",
        "car-1-sidecar",
        local_xds,
        dir.path(),
    );
    Lab {
        dir,
        ports,
        cloud,
        vehicle,
        netd: Some(netd),
        cp,
        power_file,
        netd_config,
        _services: [diag, cam, replica],
    }
}

impl Lab {
    fn via_gateway(&self, path: &str, vehicle: Option<&str>) -> Reply {
        let headers: Vec<(&str, &str)> = vehicle.map(|v| (TARGET, v)).into_iter().collect();
        http::request(self.ports.gateway, "GET", path, &headers, b"")
            .unwrap_or_else(|e| panic!("gateway request {path}: {e}"))
    }

    fn call_on_vehicle(&self, path: &str) -> Reply {
        http::get(self.ports.outbound, path)
            .unwrap_or_else(|e| panic!("vehicle request {path}: {e}"))
    }

    /// Wait until a gateway call for car-1 to `path` is answered by `who`.
    fn gateway_reaches(&self, path: &str, who: &str) -> Reply {
        let got = wait_for(LONG, || {
            let r = self.via_gateway(path, Some("car-1"));
            (r.status == 200 && r.body.starts_with(who)).then_some(r)
        });
        got.unwrap_or_else(|| {
            panic!(
                "{path} via the gateway never reached {who}; last: {:?}\ncloud Envoy:\n{}\nvehicle Envoy:\n{}",
                self.via_gateway(path, Some("car-1")),
                self.cloud.proc.log_text(),
                self.vehicle.proc.log_text()
            )
        })
    }

    fn vehicle_reaches(&self, path: &str, who: &str) {
        let got = wait_for(LONG, || {
            let r = self.call_on_vehicle(path);
            (r.status == 200 && r.body.starts_with(who)).then_some(())
        });
        assert!(
            got.is_some(),
            "{path} from the vehicle never reached {who}; last: {:?}",
            self.call_on_vehicle(path)
        );
    }

    fn set_power(&self, word: &str) {
        let tmp = self.power_file.with_extension("tmp");
        fs::write(&tmp, format!("{word}\n")).expect("write power file");
        fs::rename(&tmp, &self.power_file).expect("rename power file");
    }
}

#[test]
fn cloud_calls_a_vehicle_service_through_its_tunnel_and_fleet_state_moves_them() {
    let mut lab = start();

    // Through the tunnel: the vehicle's own instance answers, with its class.
    let r = lab.gateway_reaches("/diag/status", "vehicle-diag");
    assert!(r.body.contains("class=standard"), "{}", r.body);
    lab.gateway_reaches("/cam/frame", "vehicle-cam");
    // By `Host`, as on the vehicle.
    let r = http::request(
        lab.ports.gateway,
        "GET",
        "/frame",
        &[("host", "cam"), (TARGET, "car-1")],
        b"",
    )
    .expect("gateway request by host");
    assert!(r.body.starts_with("vehicle-cam /frame"), "{r:?}");

    // The gateway says why it answers itself.
    let r = lab.via_gateway("/diag/status", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("no-target-vehicle"));
    let r = lab.via_gateway("/diag/status", Some("car-9"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("vehicle-unknown"));
    let r = lab.via_gateway("/nowhere", Some("car-1"));
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("no-such-service"));

    // Low power: diag (on_low_power: cloud) moves to its replica for callers on both
    // sides; cam stays on the vehicle.
    lab.vehicle_reaches("/diag/x", "vehicle-diag");
    lab.set_power("low");
    lab.gateway_reaches("/diag/status", "replica-diag");
    lab.vehicle_reaches("/diag/x", "replica-diag");
    lab.gateway_reaches("/cam/frame", "vehicle-cam");
    lab.set_power("on");
    lab.gateway_reaches("/diag/status", "vehicle-diag");
    lab.vehicle_reaches("/diag/x", "vehicle-diag");

    // Offline (edge-netd gone, so the registry marks car-1 offline): diag to its
    // replica, cam answered at once.
    drop(lab.netd.take());
    lab.gateway_reaches("/diag/status", "replica-diag");
    let r = lab.via_gateway("/cam/frame", Some("car-1"));
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("vehicle-offline"));

    // Back online: through the tunnel again.
    lab.netd = Some(start_netd(&lab.netd_config, lab.dir.path()));
    lab.gateway_reaches("/diag/status", "vehicle-diag");
    lab.gateway_reaches("/cam/frame", "vehicle-cam");

    // Online but without a tunnel (its Envoy gone, edge-netd still reporting): Envoy's
    // own failure, named.
    lab.vehicle.proc.kill();
    let r = wait_for(LONG, || {
        let r = lab.via_gateway("/cam/frame", Some("car-1"));
        (r.status == 503).then_some(r)
    })
    .expect("calls fail once the vehicle's Envoy is gone");
    assert_eq!(r.header("x-misaki-reason"), Some("no-tunnel"), "{r:?}");
    assert_eq!(
        lab.cp.admin_json("/fleet/car-1")["online"],
        serde_json::Value::Bool(true)
    );
}
