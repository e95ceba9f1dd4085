//! Shared mode with real vehicles (issue 11): three `misaki-cp` replicas on one etcd
//! (all started by the test on loopback ports), two real edge-netd processes whose
//! `control_plane:` lists the replicas in different orders. Every replica lists both
//! vehicles with their owners; a replica killed with SIGKILL loses its vehicle to the
//! next replica on that vehicle's list, and no survivor keeps anything the dead
//! replica owned.

use std::fs;
use std::process::Command;
use std::time::Duration;

use misaki_e2e::http;
use misaki_e2e::policy::{MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::{netd_config_on_lo, wait_for};
use misaki_e2e::{ControlPlane, Process, free_port, target_bin};
use misaki_harness::Etcd;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

fn fleet(cp: &ControlPlane) -> Value {
    http::get(cp.admin_port, "/fleet")
        .ok()
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or(Value::Null)
}

/// `(online, owner)` of `vehicle` on `cp`'s `/fleet`.
fn seen(cp: &ControlPlane, vehicle: &str) -> Option<(bool, String)> {
    let f = fleet(cp);
    let v = f["vehicles"]
        .as_array()?
        .iter()
        .find(|v| v["vehicle_id"] == vehicle)?
        .clone();
    Some((
        v["online"] == true,
        v["owner"].as_str().unwrap_or("").to_string(),
    ))
}

#[test]
fn real_vehicles_move_between_replicas_and_every_replica_sees_them() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("mesh.yaml");
    fs::write(&policy, policy_doc(&MeshPorts::fresh(), WIFI_STANDARD, &[])).expect("policy");
    let probe = format!("127.0.0.1:{}", free_port());
    let shared = ["--store", &etcd.url(), "--lease-ttl", "2s"];
    let start = |extra: &[&str]| {
        let args: Vec<&str> = shared.iter().chain(extra).copied().collect();
        ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &args)
    };
    // The third replica answers the vehicles' link probes, so their uplink stays up.
    let mut cps = vec![start(&[]), start(&[]), start(&["--probe-addr", &probe])];
    let names: Vec<String> = cps
        .iter()
        .map(|c| fleet(c)["replica"].as_str().expect("replica").to_string())
        .collect();

    // car-1 prefers replica 0, car-2 replica 1.
    let mut netds: Vec<Process> = Vec::new();
    for (car, order) in [("car-1", [0, 1, 2]), ("car-2", [1, 2, 0])] {
        let urls: Vec<String> = order
            .iter()
            .map(|&i| format!("http://127.0.0.1:{}", cps[i].xds_port))
            .collect();
        let state = dir.path().join(format!("state-{car}"));
        let text = netd_config_on_lo(
            car,
            &format!("[{}]", urls.join(", ")),
            free_port(),
            &state,
            &probe,
            "",
        );
        let config = dir.path().join(format!("{car}.yaml"));
        fs::write(&config, text).expect("write edge-netd config");
        let mut cmd = Command::new(target_bin("edge-netd"));
        cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
        netds.push(Process::spawn(
            car,
            &mut cmd,
            dir.path().join(format!("{car}.log")),
        ));
    }

    for cp in &cps {
        let both = wait_for(LONG, || {
            (seen(cp, "car-1") == Some((true, names[0].clone()))
                && seen(cp, "car-2") == Some((true, names[1].clone())))
            .then_some(())
        });
        assert!(
            both.is_some(),
            "both vehicles online with their owners: {}\ncar-1:\n{}",
            fleet(cp),
            netds[0].log_tail(20)
        );
    }

    cps[0].proc.kill();
    for cp in &cps[1..] {
        let moved = wait_for(LONG, || {
            (seen(cp, "car-1") == Some((true, names[1].clone()))
                && seen(cp, "car-2") == Some((true, names[1].clone())))
            .then_some(())
        });
        assert!(
            moved.is_some(),
            "car-1 on replica 1, car-2 untouched: {}\ncar-1:\n{}",
            fleet(cp),
            netds[0].log_tail(20)
        );
        // Nothing stale: no vehicle is still shown as the dead replica's.
        let f = fleet(cp);
        let stale: Vec<&Value> = f["vehicles"]
            .as_array()
            .expect("vehicles")
            .iter()
            .filter(|v| v["owner"] == names[0].as_str())
            .collect();
        assert!(stale.is_empty(), "{stale:?}");
        assert_eq!(
            (f["online"].clone(), f["total"].clone()),
            (2.into(), 2.into()),
            "{f}"
        );
    }
}
