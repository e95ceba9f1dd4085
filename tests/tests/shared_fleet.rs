//! Shared mode with real vehicles (issue 11): three `misaki-cp` replicas on one etcd
//! (all started by the test on loopback ports), two real edge-netd processes whose
//! `control_plane:` lists the replicas in different orders. Every replica lists both
//! vehicles with their owners; a replica killed with SIGKILL loses its vehicle to the
//! next replica on that vehicle's list, and no survivor keeps anything the dead
//! replica owned.
//!
//! `policy apply` with one vehicle Envoy on each replica: the applied policy reaches
//! every Envoy (its route configuration, and a real request); a bad apply is refused
//! and no replica's version changes.

use std::fs;
use std::process::Command;
use std::time::Duration;

use misaki_e2e::http;
use misaki_e2e::policy::{CloudService, MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::{netd_config_on_lo, wait_for};
use misaki_e2e::{ControlPlane, Envoy, Process, Upstream, free_port, target_bin};
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

/// Envoy's dynamic route configurations (`/config_dump`) as text.
fn routes_of(envoy: &Envoy) -> String {
    http::get(
        envoy.admin_port,
        "/config_dump?resource=dynamic_route_configs",
    )
    .map(|r| r.body)
    .unwrap_or_default()
}

fn policy_version(cp: &ControlPlane) -> Value {
    cp.admin_json("/policy")["version"].clone()
}

#[test]
fn policy_apply_reaches_real_envoys_on_every_replica() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let p = MeshPorts::fresh();
    let doc = |upstream: u16, route: &str| {
        let maps = CloudService {
            name: "maps",
            upstream,
            route,
            class: "standard",
        };
        policy_doc(&p, WIFI_STANDARD, &[maps])
    };
    let first = dir.path().join("mesh.yaml");
    fs::write(&first, doc(a.port, "/maps")).expect("policy");
    let shared = ["--store", &etcd.url()];
    let cps: Vec<ControlPlane> = (0..3)
        .map(|_| ControlPlane::start_with(&first, dir.path(), free_port(), free_port(), &shared))
        .collect();
    // One vehicle Envoy per replica. They share the policy's outbound port (SO_REUSEPORT),
    // so each one's own configuration is read from its admin port.
    let envoys: Vec<Envoy> = cps
        .iter()
        .enumerate()
        .map(|(i, cp)| {
            Envoy::start(
                "vehicle-sidecar.yaml",
                &format!("car-{i}"),
                cp.xds_port,
                dir.path(),
            )
        })
        .collect();
    for (i, e) in envoys.iter().enumerate() {
        let got = wait_for(LONG, || routes_of(e).contains("\"/maps\"").then_some(()));
        assert!(
            got.is_some(),
            "Envoy {i}: no first config\n{}",
            e.proc.log_text()
        );
    }

    // `misaki-cp policy apply` of another file (the replicas' own --policy is unchanged).
    let next = dir.path().join("next.yaml");
    fs::write(&next, doc(b.port, "/maps/v2")).expect("policy");
    let apply = |file: &std::path::Path| {
        Command::new(target_bin("misaki-cp"))
            .args(["policy", "apply"])
            .arg(file)
            .args(["--store", &etcd.url()])
            .output()
            .expect("run misaki-cp policy apply")
    };
    let out = apply(&next);
    assert!(out.status.success(), "{out:?}");
    for (i, e) in envoys.iter().enumerate() {
        let got = wait_for(LONG, || routes_of(e).contains("/maps/v2").then_some(()));
        assert!(
            got.is_some(),
            "Envoy on replica {i} never got the applied policy"
        );
    }
    let version = policy_version(&cps[0]);
    assert!(version.is_string(), "{version}");
    for cp in &cps {
        assert_eq!(policy_version(cp), version);
    }
    // A real request through the outbound port takes the applied route.
    let body = wait_for(LONG, || {
        http::get(p.outbound, "/maps/v2/x")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body)
    });
    assert_eq!(
        body.as_deref().map(str::trim),
        Some("B /maps/v2/x class=standard")
    );

    // A bad apply: refused with its errors (exit 64); every replica keeps the version.
    let bad = dir.path().join("bad.yaml");
    fs::write(
        &bad,
        doc(b.port, "/maps/v3").replace("class: standard", "class: nosuch"),
    )
    .expect("policy");
    let out = apply(&bad);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nosuch"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    for (cp, e) in cps.iter().zip(&envoys) {
        assert_eq!(policy_version(cp), version);
        assert!(!routes_of(e).contains("/maps/v3"));
    }
}
