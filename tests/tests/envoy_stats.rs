//! The stats inclusion list of `envoy-configs/*.yaml` (docs/envoy-stats.md), with the
//! real Envoy 1.40 and misaki-cp: after routed requests, the per-cluster stats the list
//! keeps are there and count them; the ones it drops are absent although the same
//! Envoy has them for its xDS cluster (kept whole), so a wrong name cannot pass; the
//! families that do not grow with the mesh (server, xDS, listeners, HTTP connection
//! managers) are all there.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use misaki_e2e::policy::{CloudService, MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::wait_for;
use misaki_e2e::{ControlPlane, Envoy, Upstream, http};

/// What the list keeps of every service cluster (the documented list).
const KEPT: &[&str] = &[
    "upstream_rq_total",
    "upstream_rq_active",
    "upstream_rq_1xx",
    "upstream_rq_2xx",
    "upstream_rq_3xx",
    "upstream_rq_4xx",
    "upstream_rq_5xx",
    "upstream_rq_time",
    "upstream_rq_timeout",
    "upstream_rq_per_try_timeout",
    "upstream_rq_retry",
    "upstream_rq_retry_success",
    "upstream_rq_retry_overflow",
    "upstream_rq_retry_limit_exceeded",
    "upstream_rq_pending_overflow",
    "upstream_rq_pending_failure_eject",
    "upstream_cx_total",
    "upstream_cx_active",
    "upstream_cx_connect_fail",
    "upstream_cx_connect_timeout",
    "upstream_cx_destroy_with_active_rq",
    "upstream_cx_none_healthy",
    "membership_healthy",
    "membership_total",
    "outlier_detection.ejections_active",
    "outlier_detection.ejections_enforced_total",
];

/// Stats Envoy makes for every cluster that the list drops: byte counters, load
/// balancer internals, connection-time histograms, per-code and internal/external
/// duplicates of the kept response classes, EDS update counters.
const DROPPED: &[&str] = &[
    "upstream_cx_rx_bytes_total",
    "upstream_cx_tx_bytes_total",
    "lb_healthy_panic",
    "upstream_cx_connect_ms",
    "upstream_cx_length_ms",
    "upstream_rq_200",
    "upstream_rq_completed",
    "external.upstream_rq_2xx",
    "circuit_breakers.default.rq_open",
    "update_success",
];

/// A sidecar under test: its bootstrap, the cluster misaki compiles for service `svc`,
/// the bootstrap's own xDS cluster, and the listener port apps use.
struct Case {
    bootstrap: &'static str,
    cluster: fn(&str) -> String,
    xds_cluster: &'static str,
    hcm: &'static str,
    port: fn(&MeshPorts) -> u16,
    /// Whether the service clusters have outlier detection (not on the cloud side,
    /// where the service is local).
    outlier: bool,
}

/// Two cloud services: `maps` on a live upstream, `down` on a port nobody listens on
/// (connection refused), both with one retry on connect failure.
fn policy(p: &MeshPorts, maps_upstream: u16) -> String {
    let service = |name, upstream, route| CloudService {
        name,
        upstream,
        route,
        class: "standard",
    };
    policy_doc(
        p,
        WIFI_STANDARD,
        &[
            service("maps", maps_upstream, "/maps"),
            service("down", 1, "/down"),
        ],
    )
}

/// Every line of `/stats` as name → value text (a number, or a histogram's summary).
fn stats(envoy: &Envoy) -> BTreeMap<String, String> {
    let r = http::get(envoy.admin_port, "/stats").expect("Envoy admin /stats");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn counter(all: &BTreeMap<String, String>, name: &str) -> Option<u64> {
    all.get(name).and_then(|v| v.trim().parse().ok())
}

fn requests_are_counted_and_unread_cluster_stats_are_gone(case: &Case) {
    let dir = tempfile::tempdir().expect("tempdir");
    let maps = Upstream::start("maps");
    let p = MeshPorts::fresh();
    let policy_path = dir.path().join("mesh.yaml");
    fs::write(&policy_path, policy(&p, maps.port)).expect("write policy");
    let cp = ControlPlane::start(&policy_path, dir.path());
    let envoy = Envoy::start(case.bootstrap, "car-stats", cp.xds_port, dir.path());
    let port = (case.port)(&p);

    // Three requests answered 200 by the service.
    let first = wait_for(Duration::from_secs(10), || {
        http::get(port, "/maps/0").ok().filter(|r| r.status == 200)
    });
    assert!(
        first.is_some(),
        "no route to maps through {}",
        case.bootstrap
    );
    for i in 1..3 {
        let r = http::get(port, &format!("/maps/{i}")).expect("request through Envoy");
        assert_eq!(r.status, 200, "{r:?}");
    }
    // One request to a service whose endpoint refuses connections: tried twice, 503.
    let r = http::get(port, "/down/0").expect("request through Envoy");
    assert_eq!(r.status, 503, "{r:?}");

    let maps_cluster = (case.cluster)("maps");
    let down_cluster = (case.cluster)("down");
    let stat = |c: &str, s: &str| format!("cluster.{c}.{s}");
    let all = wait_for(Duration::from_secs(5), || {
        let all = stats(&envoy);
        (counter(&all, &stat(&maps_cluster, "upstream_rq_2xx")) == Some(3)
            && counter(&all, &stat(&down_cluster, "upstream_rq_5xx")) == Some(1))
        .then_some(all)
    })
    .unwrap_or_else(|| {
        let all = stats(&envoy);
        let ours: Vec<_> = all
            .iter()
            .filter(|(k, _)| k.starts_with("cluster.") && !k.contains(case.xds_cluster))
            .collect();
        panic!("maps 2xx != 3 or down 5xx != 1 in /stats: {ours:#?}")
    });

    // Kept, and counting what happened.
    let got = |c: &str, s: &str| counter(&all, &stat(c, s));
    assert_eq!(got(&maps_cluster, "upstream_rq_total"), Some(3));
    assert_eq!(got(&maps_cluster, "membership_healthy"), Some(1));
    assert_eq!(got(&maps_cluster, "upstream_cx_connect_fail"), Some(0));
    assert!(
        all.contains_key(&stat(&maps_cluster, "upstream_rq_time")),
        "no latency histogram for maps"
    );
    assert_eq!(got(&down_cluster, "upstream_cx_connect_fail"), Some(2));
    assert_eq!(got(&down_cluster, "upstream_rq_retry"), Some(1));
    assert_eq!(
        got(&down_cluster, "upstream_rq_retry_limit_exceeded"),
        Some(1)
    );
    // Every kept stat that Envoy makes with the cluster is there (the response classes
    // and the latency histogram come with the first such response).
    for s in KEPT {
        let dynamic =
            s.starts_with("upstream_rq_") && s.ends_with("xx") || *s == "upstream_rq_time";
        let outlier = s.starts_with("outlier_detection.");
        if !dynamic && (case.outlier || !outlier) {
            assert!(
                all.contains_key(&stat(&maps_cluster, s)),
                "{} missing",
                stat(&maps_cluster, s)
            );
        }
    }

    // Dropped. The names are real: the xDS cluster, kept whole, has each of those that
    // every cluster gets (the response-code ones come with an HTTP/1 answer, which the
    // xDS cluster never gets; without the list Envoy makes them for maps here).
    for s in DROPPED {
        assert!(
            !all.contains_key(&stat(&maps_cluster, s)),
            "{} is still instantiated",
            stat(&maps_cluster, s)
        );
    }
    for s in [
        "upstream_cx_rx_bytes_total",
        "upstream_cx_tx_bytes_total",
        "lb_healthy_panic",
        "upstream_cx_connect_ms",
        "upstream_cx_length_ms",
        "circuit_breakers.default.rq_open",
        "update_success",
    ] {
        assert!(
            all.contains_key(&stat(case.xds_cluster, s)),
            "{} missing: the xDS cluster's stats are kept whole",
            stat(case.xds_cluster, s)
        );
    }
    assert!(
        counter(&all, &stat(case.xds_cluster, "upstream_cx_rx_bytes_total")).unwrap_or(0) > 0,
        "the xDS stream received bytes"
    );

    // Nothing of a service cluster beyond the documented list.
    for c in [&maps_cluster, &down_cluster] {
        let prefix = format!("cluster.{c}.");
        let extra: Vec<&str> = all
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|s| !KEPT.contains(s))
            .collect();
        assert!(extra.is_empty(), "{c}: stats outside the list: {extra:?}");
    }

    // The bounded families are all there.
    assert_eq!(counter(&all, "control_plane.connected_state"), Some(1));
    assert_eq!(counter(&all, "cluster_manager.warming_clusters"), Some(0));
    assert!(counter(&all, "cluster_manager.active_clusters") >= Some(3));
    assert!(counter(&all, "listener_manager.total_listeners_active") >= Some(1));
    assert!(counter(&all, "server.memory_allocated").unwrap_or(0) > 0);
    let hcm = |s: &str| counter(&all, &format!("http.{}.{s}", case.hcm));
    assert_eq!(hcm("downstream_rq_2xx"), Some(3));
    assert_eq!(hcm("downstream_rq_5xx"), Some(1));
    // Its route discovery (RDS, or scoped RDS with on-demand routes) took an update.
    let routes = format!("http.{}.", case.hcm);
    assert!(
        all.iter().any(|(k, v)| k.starts_with(&routes)
            && k.contains("rds.")
            && k.ends_with(".update_success")
            && v.trim().parse::<u64>().unwrap_or(0) >= 1),
        "no route discovery stats under {routes}"
    );
    assert!(
        all.keys()
            .any(|k| k.starts_with("listener.") && k.ends_with(".downstream_cx_total")),
        "no listener stats"
    );
    drop(cp);
}

fn outbound(svc: &str) -> String {
    format!("out|{svc}")
}

fn inbound(svc: &str) -> String {
    format!("in|{svc}")
}

fn vehicle(bootstrap: &'static str, xds_cluster: &'static str) -> Case {
    Case {
        bootstrap,
        cluster: outbound,
        xds_cluster,
        hcm: "vehicle_outbound",
        port: |p| p.outbound,
        outlier: true,
    }
}

#[test]
fn sotw_vehicle_sidecar_keeps_the_listed_cluster_stats_only() {
    requests_are_counted_and_unread_cluster_stats_are_gone(&vehicle(
        "vehicle-sidecar.yaml",
        "misaki_xds",
    ));
}

#[test]
fn delta_vehicle_sidecar_keeps_the_listed_cluster_stats_only() {
    requests_are_counted_and_unread_cluster_stats_are_gone(&vehicle(
        "vehicle-sidecar-delta.yaml",
        "misaki_xds",
    ));
}

/// The bootstrap edge-netd's Envoy ships with, here fed by misaki-cp (same protocol:
/// delta ADS); the namespace tests (vehicle_loop.rs) run it behind edge-netd.
#[test]
fn edge_vehicle_sidecar_keeps_the_listed_cluster_stats_only() {
    requests_are_counted_and_unread_cluster_stats_are_gone(&vehicle(
        "vehicle-sidecar-edge.yaml",
        "edge_netd_xds",
    ));
}

#[test]
fn cloud_sidecar_keeps_the_listed_cluster_stats_only() {
    requests_are_counted_and_unread_cluster_stats_are_gone(&Case {
        bootstrap: "cloud-sidecar.yaml",
        cluster: inbound,
        xds_cluster: "misaki_xds",
        hcm: "cloud_inbound",
        port: |p| p.cloud,
        outlier: false,
    });
}

/// Every bootstrap in envoy-configs/ (a new one too) carries the list with the same
/// per-cluster pattern (one edit, one place to look: docs/envoy-stats.md), and keeps its
/// own xDS cluster whole.
#[test]
fn every_shipped_bootstrap_has_the_list_and_keeps_its_xds_cluster() {
    let dir = misaki_e2e::repo_root().join("envoy-configs");
    let mut patterns = BTreeMap::new();
    for entry in fs::read_dir(&dir).expect("envoy-configs") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let file = name_of(&path);
        let text = fs::read_to_string(&path).expect("read bootstrap");
        assert!(
            text.contains("\nstats_config:\n  stats_matcher:\n    inclusion_list:\n"),
            "{file}: no stats inclusion list"
        );
        // The static xDS cluster: the first `- name:` under static_resources.
        let xds = text
            .split_once("static_resources:")
            .and_then(|(_, rest)| rest.lines().find_map(|l| l.trim().strip_prefix("- name: ")))
            .unwrap_or_else(|| panic!("{file}: no static cluster"));
        assert!(
            text.contains(&format!("- prefix: \"cluster.{xds}.\"")),
            "{file}: the stats of its xDS cluster {xds} are not kept"
        );
        let regex = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("regex: "))
            .unwrap_or_else(|| panic!("{file}: no per-cluster pattern"));
        patterns.insert(file, regex.to_string());
    }
    for file in [
        "vehicle-sidecar.yaml",
        "vehicle-sidecar-delta.yaml",
        "vehicle-sidecar-edge.yaml",
        "cloud-sidecar.yaml",
    ] {
        assert!(patterns.contains_key(file), "{file} not checked");
    }
    let first = patterns.values().next().cloned().unwrap_or_default();
    for (file, regex) in &patterns {
        assert_eq!(
            regex, &first,
            "{file}: a per-cluster pattern unlike the others"
        );
    }
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
