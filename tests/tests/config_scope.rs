//! A vehicle Envoy holds only what its vehicle uses, with real Envoy 1.40 and a
//! 3,000-service mesh from misaki-cp: declared `consumes` give exactly those clusters
//! (and a 404 naming the reason for the rest); with nothing declared, a delta Envoy
//! fetches a service's routes and clusters on first use, and an edit of that service
//! reaches only Envoys that loaded it.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::time::Duration;

use misaki_e2e::http;
use misaki_e2e::process::wait_for;
use misaki_e2e::{ControlPlane, Envoy, Upstream, free_port};

const SERVICES: usize = 3000;

/// 3,000 cloud services `svc-<i>` (routes `/svc-<i>`), all at `upstream` except
/// `svc-7` at `svc7`, and one vehicle service `app` consuming `consumes` if given.
fn policy(ports: [u16; 4], upstream: u16, svc7: u16, consumes: Option<&str>) -> String {
    let [outbound, inbound, cloud, app] = ports;
    let mut p = format!(
        "version: 1\nmesh: {{ vehicle_outbound_port: {outbound}, vehicle_inbound_port: {inbound}, cloud_inbound_port: {cloud} }}\n\
         uplinks: [{{ name: wifi, kind: wifi }}]\n\
         classes: [{{ name: standard, timeout: 5s, uplinks: [wifi] }}]\nservices:\n"
    );
    for i in 0..SERVICES {
        let port = if i == 7 { svc7 } else { upstream };
        p.push_str(&format!(
            "  - {{ name: svc-{i}, location: cloud, port: 8080, endpoints: [\"127.0.0.1:{port}\"], routes: [\"/svc-{i}\"], class: standard }}\n"
        ));
    }
    let decl = consumes.map_or(String::new(), |c| format!(", consumes: {c}"));
    p.push_str(&format!(
        "  - {{ name: app, location: vehicle, port: {app}, routes: [\"/app\"], class: standard{decl} }}\n"
    ));
    p
}

/// Outbound, inbound, cloud inbound and `app`'s port.
fn ports() -> [u16; 4] {
    [free_port(), free_port(), free_port(), free_port()]
}

fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    fs::write(&tmp, text).expect("write policy");
    fs::rename(&tmp, path).expect("rename policy");
}

/// The clusters an Envoy holds (admin `/clusters`).
fn clusters(envoy: &Envoy) -> BTreeSet<String> {
    let r = http::get(envoy.admin_port, "/clusters").expect("/clusters");
    r.body
        .lines()
        .filter_map(|l| l.split_once("::").map(|(c, _)| c.to_string()))
        .collect()
}

fn mesh_clusters(envoy: &Envoy) -> BTreeSet<String> {
    clusters(envoy)
        .into_iter()
        .filter(|c| c.starts_with("out|") || c.starts_with("in|"))
        .collect()
}

/// The versions misaki-cp last sent each type on `node`'s stream.
fn sent_versions(cp: &ControlPlane, node: &str) -> String {
    let nodes = cp.admin_json("/nodes");
    let stream = nodes["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|s| s["node_id"] == node)
        .unwrap_or_else(|| panic!("no stream of {node}: {nodes}"))
        .clone();
    let types = &stream["types"];
    ["cds", "eds", "lds", "srds", "rds"]
        .map(|t| types[t]["last_sent_version"].to_string())
        .join(" ")
}

fn push_bytes(cp: &ControlPlane) -> u64 {
    cp.admin("/metrics")
        .body
        .lines()
        .filter(|l| l.starts_with("misaki_xds_push_bytes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn declared_consumes_give_a_vehicle_exactly_those_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start("A");
    let ports = ports();
    let outbound = ports[0];
    let path = dir.path().join("mesh.yaml");
    let consumes = "[svc-0, svc-1, svc-2, svc-3, svc-7]";
    save(&path, &policy(ports, up.port, up.port, Some(consumes)));
    let cp = ControlPlane::start(&path, dir.path());
    for bootstrap in ["vehicle-sidecar.yaml", "vehicle-sidecar-delta.yaml"] {
        let envoy = Envoy::start(bootstrap, "car-1", cp.xds_port, dir.path());
        let want: BTreeSet<String> = [
            "in|app",
            "out|svc-0",
            "out|svc-1",
            "out|svc-2",
            "out|svc-3",
            "out|svc-7",
        ]
        .map(String::from)
        .into();
        let got = wait_for(Duration::from_secs(10), || {
            let c = mesh_clusters(&envoy);
            (c == want).then_some(c)
        });
        assert_eq!(got, Some(want), "{bootstrap}: {:?}", mesh_clusters(&envoy));
        let r = wait_for(Duration::from_secs(10), || {
            http::get(outbound, "/svc-3/x")
                .ok()
                .filter(|r| r.status == 200)
        })
        .expect("a declared service is routed");
        assert_eq!(r.body.trim(), "A /svc-3/x class=standard");
        // Not `/svc-100`: the declared `/svc-1` is a prefix of it.
        let r = http::get(outbound, "/svc-999/x").expect("request");
        assert_eq!(r.status, 404, "{bootstrap}");
        assert_eq!(
            r.header("x-misaki-reason"),
            Some("not-in-scope"),
            "{bootstrap}"
        );
        drop(envoy);
    }
}

#[test]
fn undeclared_services_come_on_demand_and_their_edits_reach_only_envoys_holding_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Upstream::start("A");
    let b = Upstream::start("B");
    let ports = ports();
    let outbound = ports[0];
    let path = dir.path().join("mesh.yaml");
    let base = policy(ports, a.port, a.port, None);
    save(&path, &base);
    let cp = ControlPlane::start(&path, dir.path());
    // car-1 and car-2 share the outbound port (SO_REUSEPORT): car-2 is only watched.
    let car1 = Envoy::start(
        "vehicle-sidecar-delta.yaml",
        "car-1",
        cp.xds_port,
        dir.path(),
    );
    let car2 = Envoy::start(
        "vehicle-sidecar-delta.yaml",
        "car-2",
        cp.xds_port,
        dir.path(),
    );
    let held = mesh_clusters(&car1);
    assert_eq!(
        held,
        ["in|app".to_string()].into(),
        "only the vehicle's own service is held before use"
    );

    // First use: the scope's routes and the cluster arrive on demand. Both Envoys
    // listen on the policy's outbound port (SO_REUSEPORT: the kernel picks one per
    // connection), so whichever answered is the holder and the other one is not.
    let r = http::request(outbound, "GET", "/svc-7/first", &[], b"").expect("request");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body.trim(), "A /svc-7/first class=standard");
    let (holder, other, other_id) = match (
        clusters(&car1).contains("out|svc-7"),
        clusters(&car2).contains("out|svc-7"),
    ) {
        (true, false) => (&car1, &car2, "car-2"),
        (false, true) => (&car2, &car1, "car-1"),
        held => panic!("one request, one Envoy should load svc-7: {held:?}"),
    };
    assert!(
        !clusters(holder).contains("out|svc-8"),
        "unused services stay out"
    );
    assert!(
        mesh_clusters(holder).len() <= 2,
        "{:?}",
        mesh_clusters(holder)
    );
    assert!(!clusters(other).contains("out|svc-7"));
    // By Host (`svc`, `svc:port`, `svc.mesh`) as well as by path.
    for host in ["svc-9", "svc-9:8080", "svc-9.mesh"] {
        let r = http::request(outbound, "GET", "/any", &[("host", host)], b"").expect("by host");
        assert_eq!(r.status, 200, "{host}: {}", r.body);
        assert_eq!(r.body.trim(), "A /any class=standard");
    }

    // One service's edit (svc-7 moves to upstream B): a small push, only to its holder.
    let before_bytes = push_bytes(&cp);
    let other_before = sent_versions(&cp, other_id);
    save(&path, &policy(ports, a.port, b.port, None));
    let at_b = format!("out|svc-7::127.0.0.1:{}::", b.port);
    let moved = wait_for(Duration::from_secs(10), || {
        let r = http::get(holder.admin_port, "/clusters").ok()?;
        r.body.contains(&at_b).then_some(())
    });
    assert!(moved.is_some(), "the edit reached the Envoy holding svc-7");
    // Let every push settle before reading the counters.
    std::thread::sleep(Duration::from_millis(500));
    let sent = push_bytes(&cp) - before_bytes;
    assert!(sent < 4096, "one endpoint edit pushed {sent} bytes");
    assert_eq!(
        sent_versions(&cp, other_id),
        other_before,
        "an Envoy that never used svc-7 got nothing"
    );
    // The documented differences from one big table (docs/policy.md): a prefix matches
    // within its first path segment, and a bare-name Host that is no service is not
    // routed by path. Both are Envoy's 404 at once.
    // (Last: they may load other buckets into either Envoy.)
    let r = http::request(outbound, "GET", "/svc-7extra/x", &[], b"").expect("request");
    assert_eq!(
        r.status, 404,
        "/svc-7 must not catch /svc-7extra: {}",
        r.body
    );
    let r =
        http::request(outbound, "GET", "/svc-7/x", &[("host", "nosuch")], b"").expect("request");
    assert_eq!(
        r.status, 404,
        "a bare-name Host that is no service: {}",
        r.body
    );
}
