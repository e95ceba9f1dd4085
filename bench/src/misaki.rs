//! misaki: `misaki-cp serve` on a policy file, pushing over ADS (SotW or delta) to a
//! real Envoy started from `envoy-configs/vehicle-sidecar*.yaml`.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use misaki_e2e::policy::{CloudService, MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::{repo_root, wait_for};
use misaki_e2e::{ControlPlane, Envoy, Upstream, free_port};

use crate::measure::{self, Plan, Sample, Sides};
use crate::{logtime, rss};

/// ADS flavour, i.e. which bootstrap the Envoy starts from.
#[derive(Debug, Clone, Copy)]
pub enum Flavour {
    Sotw,
    Delta,
}

impl Flavour {
    pub fn bootstrap(self) -> &'static str {
        match self {
            Flavour::Sotw => "vehicle-sidecar.yaml",
            Flavour::Delta => "vehicle-sidecar-delta.yaml",
        }
    }
}

/// `misaki-cp serve` (the binary at `bin`) on fresh ephemeral ports.
pub fn start_cp(bin: &Path, policy: &Path, dir: &Path) -> anyhow::Result<ControlPlane> {
    ControlPlane::try_start_bin(bin, policy, dir, free_port(), free_port(), &[])
        .map_err(anyhow::Error::msg)
}

/// The smallest policy with one cloud service, `maps`, on one upstream. The mesh
/// ports are fresh ephemeral ones (the vehicle sidecar binds them).
fn policy(ports: &MeshPorts, upstream: u16) -> String {
    policy_doc(
        ports,
        WIFI_STANDARD,
        &[CloudService {
            name: "maps",
            upstream,
            route: "/maps",
            class: "standard",
        }],
    )
}

/// Edit latency: every edit moves `maps` to the other upstream.
pub fn edit_latency(
    cp_bin: &Path,
    flavour: Flavour,
    plan: &Plan,
    dir: &Path,
) -> anyhow::Result<Vec<Sample>> {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let ports = MeshPorts::fresh();
    let policy_path = dir.join("mesh.yaml");
    measure::save(&policy_path, &policy(&ports, a.port))?;
    let cp = start_cp(cp_bin, &policy_path, dir)?;
    let _envoy = Envoy::start(flavour.bootstrap(), "bench-car", cp.xds_port, dir);
    let mut samples = measure::run(
        plan,
        ports.outbound,
        "/maps/tile",
        Sides {
            a: a.port,
            b: b.port,
        },
        |port| measure::save(&policy_path, &policy(&ports, port)).context("save policy"),
    )?;
    // Split each latency at the moment misaki-cp logged the new policy in force.
    let applied = logtime::policy_in_force(&cp.proc.log_text());
    let saves: Vec<_> = samples.iter().map(|s| s.saved_at).collect();
    for (s, t) in samples
        .iter_mut()
        .zip(logtime::time_to_next(&saves, &applied))
    {
        s.cp_applied = t;
    }
    drop(cp);
    Ok(samples)
}

/// The quickstart policy with its fixed mesh ports (15001, 15006, 15443) moved to
/// fresh ephemeral ones, so this Envoy cannot share a port with anyone's.
fn quickstart_on_fresh_ports() -> anyhow::Result<String> {
    let path: PathBuf = repo_root().join("examples/quickstart/mesh.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut out = text.clone();
    for key in [
        "vehicle_outbound_port: 15001",
        "vehicle_inbound_port: 15006",
        "cloud_inbound_port: 15443",
    ] {
        anyhow::ensure!(out.contains(key), "quickstart has no `{key}`");
        let (name, _) = key.split_once(':').expect("key: value");
        out = out.replace(key, &format!("{name}: {}", free_port()));
    }
    Ok(out)
}

/// RSS of misaki-cp serving the quickstart policy to one Envoy, after `idle` with
/// nothing changing.
pub fn idle_rss_kib(
    cp_bin: &Path,
    flavour: Flavour,
    idle: Duration,
    dir: &Path,
) -> anyhow::Result<u64> {
    fs::create_dir_all(dir)?;
    let policy_path = dir.join("quickstart.yaml");
    fs::write(&policy_path, quickstart_on_fresh_ports()?)?;
    let cp = start_cp(cp_bin, &policy_path, dir)?;
    let envoy = Envoy::start(flavour.bootstrap(), "idle-car", cp.xds_port, dir);
    // LIVE means Envoy has its config; also make sure the stream is the one counted.
    let connected = wait_for(Duration::from_secs(10), || {
        (envoy.stat("control_plane.connected_state") == Some(1)).then_some(())
    });
    anyhow::ensure!(connected.is_some(), "Envoy never connected to misaki-cp");
    thread::sleep(idle);
    rss::vm_rss_kib(cp.proc.pid()).context("read misaki-cp VmRSS")
}
