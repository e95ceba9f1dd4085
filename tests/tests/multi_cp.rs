//! Vehicles move between misaki-cp replicas (issue 11, item 4): two `misaki-cp`
//! processes (embedded mode, both watching the same policy file) on loopback.
//!
//! (a) A real Envoy whose bootstrap lists both in its `misaki_xds` cluster gets its
//!     config; the replica it is connected to (seen on that replica's `/nodes`) is
//!     killed with SIGKILL; a policy edit then reaches Envoy from the survivor (a real
//!     request takes the new route).
//! (b) A real edge-netd whose `control_plane:` lists both shows online on the first
//!     one's `/fleet`; that one is killed; it shows online on the second's.
//!
//! (c) Balance (item 5), Envoy: with only the first replica up, Envoy connects there; a second
//!     replica is started; the first's `--max-connection-age` sends Envoy through its
//!     cluster's load balancer again, and it ends up on the second, keeping its config
//!     all the while. edge-netd: cut by its replica's connection age, it reconnects
//!     to the next replica of its list.
//!
//! Timing is asserted only as generous bounds; how long the move took is printed.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use misaki_e2e::http;
use misaki_e2e::policy::{CloudService, MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::{wait_for, with_control_planes};
use misaki_e2e::{ControlPlane, Envoy, Process, Upstream, free_port, target_bin};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

/// Write `text` the way editors do: to a temp file, then rename over the original.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp~");
    fs::write(&tmp, text).expect("write temp policy");
    fs::rename(&tmp, path).expect("rename policy into place");
}

fn policy(p: &MeshPorts, upstream: u16, route: &str) -> String {
    policy_doc(
        p,
        WIFI_STANDARD,
        &[CloudService {
            name: "maps",
            upstream,
            route,
            class: "standard",
        }],
    )
}

fn get_body(port: u16, path: &str) -> Option<String> {
    http::get(port, path)
        .ok()
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}

/// The number of xDS streams `cp` serves now (0 when it does not answer).
fn streams(cp: &ControlPlane) -> usize {
    http::get(cp.admin_port, "/nodes")
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .and_then(|v| v["streams"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn rendering_lists_every_control_plane_in_the_xds_cluster() {
    let template =
        fs::read_to_string(misaki_e2e::repo_root().join("envoy-configs/vehicle-sidecar.yaml"))
            .expect("read bootstrap");
    let two = with_control_planes(&template, &[41001, 41002]);
    assert!(!two.contains("port_value: 18000"), "{two}");
    let endpoints = two
        .lines()
        .filter(|l| l.trim_start().starts_with("- endpoint:"))
        .count();
    assert_eq!(endpoints, 2, "{two}");
    let (a, b) = (two.find("41001").unwrap(), two.find("41002").unwrap());
    assert!(a < b);
    let one = with_control_planes(&template, &[18000]);
    assert_eq!(one, template.trim_end().to_string() + "\n");
}

#[test]
fn envoy_moves_to_the_surviving_control_plane_and_takes_its_edits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("A");
    let b = Upstream::start("B");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    save(&policy_path, &policy(&p, a.port, "/maps"));
    let mut cps = [
        Some(ControlPlane::start(&policy_path, dir.path())),
        Some(ControlPlane::start(&policy_path, dir.path())),
    ];
    let ports: Vec<u16> = cps.iter().flatten().map(|c| c.xds_port).collect();
    let envoy = Envoy::start_multi("vehicle-sidecar.yaml", "car-1", &ports, dir.path());
    let body = wait_for(LONG, || get_body(p.outbound, "/maps/1")).expect("first config");
    assert_eq!(body.trim(), "A /maps/1 class=standard");

    // The replica Envoy is connected to, then SIGKILL it.
    let connected = wait_for(LONG, || {
        (0..2).find(|&i| cps[i].as_ref().is_some_and(|c| streams(c) > 0))
    })
    .expect("one replica serves Envoy");
    let survivor = 1 - connected;
    let mut dead = cps[connected].take().expect("connected replica");
    dead.proc.kill();
    let killed = Instant::now();
    let live = cps[survivor].as_ref().expect("survivor");
    let moved = wait_for(LONG, || (streams(live) > 0).then_some(()));
    assert!(
        moved.is_some(),
        "Envoy never reconnected to the survivor:\n{}",
        envoy.proc.log_text()
    );
    let reconnect = killed.elapsed();

    // An edit now comes from the survivor only.
    save(&policy_path, &policy(&p, b.port, "/maps/v2"));
    let routed = wait_for(LONG, || {
        get_body(p.outbound, "/maps/v2/x").filter(|b| b.starts_with("B "))
    });
    assert_eq!(
        routed.as_deref().map(str::trim),
        Some("B /maps/v2/x class=standard"),
        "{}",
        envoy.proc.log_text()
    );
    eprintln!(
        "Envoy: replica {connected} killed; on replica {survivor} after {reconnect:?}, \
         new routes after {:?}",
        killed.elapsed()
    );
    assert_eq!(envoy.stat("control_plane.connected_state"), Some(1));
}

/// Whether `cp` shows `car-1` online on `/fleet/car-1`.
fn online(cp: &ControlPlane) -> bool {
    http::get(cp.admin_port, "/fleet/car-1")
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .is_some_and(|j| j["online"] == true)
}

/// A real edge-netd listing `first` then `second` (its uplink probed at `probe`), and
/// its local API port.
fn netd_on(first: &ControlPlane, second: &ControlPlane, probe: &str, dir: &Path) -> (Process, u16) {
    let api = free_port();
    let text = misaki_e2e::process::netd_config_on_lo(
        "car-1",
        &format!(
            "[http://127.0.0.1:{}, http://127.0.0.1:{}]",
            first.xds_port, second.xds_port
        ),
        api,
        &dir.join("state"),
        probe,
        "",
    );
    let config = dir.join("edge-netd.yaml");
    fs::write(&config, text).expect("write edge-netd config");
    let mut cmd = Command::new(target_bin("edge-netd"));
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    let netd = Process::spawn("edge-netd", &mut cmd, dir.join("edge-netd.log"));
    (netd, api)
}

#[test]
fn edge_netd_moves_to_the_next_control_plane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("mesh.yaml");
    fs::write(&policy, policy_doc(&MeshPorts::fresh(), WIFI_STANDARD, &[])).expect("policy");
    let probe = format!("127.0.0.1:{}", free_port());
    let mut first = ControlPlane::start(&policy, dir.path());
    // The uplink's probes go to the survivor, so the link stays up throughout.
    let args = ["--probe-addr", probe.as_str()];
    let second = ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &args);
    let (netd, api) = netd_on(&first, &second, &probe, dir.path());
    let on_first = wait_for(LONG, || online(&first).then_some(()));
    assert!(
        on_first.is_some(),
        "never online on the first:\n{}",
        netd.log_text()
    );
    assert!(!online(&second), "online on both");
    first.proc.kill();
    let killed = Instant::now();
    let on_second = wait_for(LONG, || online(&second).then_some(()));
    assert!(
        on_second.is_some(),
        "never online on the second:\n{}",
        netd.log_text()
    );
    let metrics = http::get(api, "/metrics").expect("edge-netd /metrics").body;
    let in_use = format!(
        "edge_netd_reporter_control_plane{{address=\"http://127.0.0.1:{}/\"}} 1",
        second.xds_port
    );
    assert!(metrics.contains(&in_use), "{in_use} in:\n{metrics}");
    eprintln!(
        "edge-netd: online on the second {:?} after the kill",
        killed.elapsed()
    );
    let log = netd.log_text();
    assert!(
        log.contains(&format!("127.0.0.1:{}", second.xds_port)),
        "the log names the address in use:\n{log}"
    );
}

/// The replica Envoy is connected to stops answering (SIGSTOP: its sockets stay open,
/// nothing is refused): Envoy moves to the other one, found by the bootstrap's HTTP/2
/// keepalive (30 s + 10 s, and its reconnect: this test takes over a minute). Prints how
/// long it took.
#[test]
fn envoy_leaves_a_silent_control_plane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("A");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    save(&policy_path, &policy(&p, a.port, "/maps"));
    let cps = [
        ControlPlane::start(&policy_path, dir.path()),
        ControlPlane::start(&policy_path, dir.path()),
    ];
    let ports: Vec<u16> = cps.iter().map(|c| c.xds_port).collect();
    let envoy = Envoy::start_multi("vehicle-sidecar.yaml", "car-1", &ports, dir.path());
    wait_for(LONG, || get_body(p.outbound, "/maps/1")).expect("first config");
    let connected = wait_for(LONG, || (0..2).find(|&i| streams(&cps[i]) > 0)).expect("one");
    let pid = cps[connected].proc.pid().to_string();
    let signal = |s: &str| {
        let ok = Command::new("kill").args([s, pid.as_str()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill {s}");
    };
    signal("-STOP");
    let stopped = Instant::now();
    let moved = wait_for(Duration::from_secs(180), || {
        (streams(&cps[1 - connected]) > 0).then_some(())
    });
    let took = stopped.elapsed();
    signal("-CONT");
    eprintln!("Envoy: replica {connected} stopped; on the other after {took:?} ({moved:?})");
    assert!(moved.is_some(), "{}", envoy.proc.log_text());
}

#[test]
fn an_aged_connection_lets_envoy_reach_a_replica_added_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("A");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    save(&policy_path, &policy(&p, a.port, "/maps"));
    let aged = [
        "--max-connection-age",
        "2s",
        "--max-connection-age-grace",
        "1s",
    ];
    let ports = [free_port(), free_port()];
    let first = ControlPlane::start_with(&policy_path, dir.path(), ports[0], free_port(), &aged);
    let envoy = Envoy::start_multi("vehicle-sidecar.yaml", "car-1", &ports, dir.path());
    let body = wait_for(LONG, || get_body(p.outbound, "/maps/1")).expect("first config");
    assert_eq!(body.trim(), "A /maps/1 class=standard");

    let second = ControlPlane::start_with(&policy_path, dir.path(), ports[1], free_port(), &aged);
    let added = Instant::now();
    let moved = wait_for(LONG, || (streams(&second) > 0).then_some(()));
    assert!(
        moved.is_some(),
        "Envoy never reached the added replica:\n{}",
        envoy.proc.log_text()
    );
    eprintln!(
        "Envoy: on the added replica {:?} after it started",
        added.elapsed()
    );
    // Reconnecting cost nothing it had: the route still answers, nothing rejected.
    assert_eq!(
        get_body(p.outbound, "/maps/2").as_deref().map(str::trim),
        Some("A /maps/2 class=standard")
    );
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected"), Some(0));
    assert_eq!(envoy.stat("listener_manager.lds.update_rejected"), Some(0));
    drop(first);
}

/// Both replicas age connections out after about 2 s: edge-netd, cut off by its
/// replica's maximum connection age (no failure anywhere), reconnects to the next
/// replica of its list and keeps reporting.
#[test]
fn edge_netd_moves_on_when_its_connection_is_aged_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("mesh.yaml");
    fs::write(&policy, policy_doc(&MeshPorts::fresh(), WIFI_STANDARD, &[])).expect("policy");
    let probe = format!("127.0.0.1:{}", free_port());
    let aged = [
        "--max-connection-age",
        "2s",
        "--max-connection-age-grace",
        "1s",
    ];
    let first = ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &aged);
    let with_probe = [&aged[..], &["--probe-addr", probe.as_str()]].concat();
    let second =
        ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &with_probe);
    let (mut netd, _api) = netd_on(&first, &second, &probe, dir.path());
    let on_first = wait_for(LONG, || online(&first).then_some(()));
    assert!(
        on_first.is_some(),
        "never online on the first:\n{}",
        netd.log_text()
    );
    let moved = wait_for(LONG, || online(&second).then_some(()));
    assert!(moved.is_some(), "never moved on:\n{}", netd.log_text());
    let exited = netd.try_wait();
    assert!(
        exited.is_none(),
        "edge-netd exited ({exited:?}):\n{}",
        netd.log_text()
    );
}
