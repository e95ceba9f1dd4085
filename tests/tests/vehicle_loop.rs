//! The vehicle loop, end to end: an app's request → the vehicle's real Envoy (1.40),
//! configured over ADS by the vehicle's own edge-netd (vehicle-local xDS tier,
//! `envoy-configs/vehicle-sidecar-edge.yaml`) → the uplink edge-netd selected for the
//! request's class → the cloud service.
//!
//! Topology (`misaki_e2e::netns`): a vehicle namespace with three real uplinks (wlan0 =
//! wifi, wwan0 = lte, dsrc0 = dsrc; veth pairs) to a cloud namespace.
//! ```text
//!  vehicle namespace                                   cloud namespace
//!  app ─▶ Envoy 127.0.0.1:15001 ─ out|maps|wifi ─ wlan0 ──▶ 198.18.0.1:18080 echo service
//!          ▲   (vehicle_outbound) ─ out|maps|lte ── wwan0 ──▶  (answers from=<client ip>)
//!          │ ADS (delta), 127.0.0.1:15010        ─ dsrc0 ──▶ 198.18.0.1:7007 probe echo
//!  edge-netd ── probes over each uplink ────────────────────▶ 198.18.0.1:50051 misaki-cp
//!     │ store-and-forward ingest 127.0.0.1:15080                (fleet gRPC, policy)
//!  127.0.0.1:18090 vehicle-hosted service (offline test)
//! ```
//! The cloud service answers `from=<client ip> path=<path> class=<x-misaki-class>`; the
//! client IP is the vehicle end of the uplink that carried the request (198.18.1.1 wifi,
//! 198.18.2.1 lte, 198.18.3.1 dsrc), so each test sees which uplink a request used.
//! Carrier loss takes the cloud-side peer down; a silent blackhole drops everything on
//! it with nftables. The lab policy: `maps` is class `standard` [wifi, lte], `telemetry`
//! is `bulk` (deferrable) [wifi], `critical` may use all three.
//!
//! Needs root (namespaces, veths) and the real Envoy (`process::envoy_bin()`); without
//! either every test fails saying so, never skips. Assertions are on behaviour (which
//! uplink answered, status codes and headers, what the cloud service received), with
//! generous timeouts; how fast failover and pushes happen is benchmarked elsewhere
//! (bench/vehicle_loop.sh), never here. The one bound on time (a request without a usable
//! uplink is answered at once, not after the class timeout) is a behaviour: < 3 s against
//! a 5 s class timeout.

use std::time::{Duration, Instant};

use misaki_e2e::http::Reply;
use misaki_e2e::netns::{
    CLOUD_ADDR, CLOUD_SERVICE_PORT, FLEET_ADMIN_PORT, LAB_POLICY, NETD_INGEST_PORT, NetdOptions,
    VehicleLab, ensure_user, uplink_of_ip,
};
use misaki_e2e::process::wait_for;

/// Waits for edge-netd's own state (selections, policy).
const LONG: Duration = Duration::from_secs(20);
/// Waits that send requests through Envoy: a request caught on a just-dead uplink may
/// itself take the class timeout (5 s, one retry) before the next attempt.
const TRAFFIC: Duration = Duration::from_secs(30);
/// The unprivileged user the vehicle Envoy runs as in
/// [`envoy_as_an_unprivileged_user_binds_its_clusters_to_uplinks`].
const ENVOY_USER: &str = "misaki-test";
/// A vehicle-hosted service of the factory policy.
const DIAGNOSTICS_PORT: u16 = 18090;

/// A lab with the fleet (misaki-cp + probe echo), the cloud service, edge-netd and the
/// vehicle Envoy (as `user` if given).
fn vehicle(tag: &str, opts: &NetdOptions, user: Option<&str>) -> VehicleLab {
    let mut lab = VehicleLab::new(tag);
    lab.start_fleet();
    lab.start_echo_upstream();
    lab.start_netd(opts);
    wait_policy(&lab);
    lab.start_envoy(user);
    lab
}

/// Waits until edge-netd applied a policy; returns its version.
fn wait_policy(lab: &VehicleLab) -> String {
    wait_for(LONG, || {
        let v = lab.links()?["policy_version"].as_str()?.to_string();
        (!v.is_empty()).then_some(v)
    })
    .unwrap_or_else(|| panic!("edge-netd applied no policy:\n{}", lab.netd_log()))
}

/// misaki-cp's policy version (`/policy`): one string for a policy on misaki-cp, the
/// fleet and edge-netd.
fn fleet_policy_version(lab: &VehicleLab) -> Option<String> {
    lab.fleet_json("/policy")?["version"]
        .as_str()
        .map(str::to_string)
}

/// Waits until edge-netd (`/links`, connected to the fleet) and then the fleet registry
/// (`/fleet/{vehicle}`) show policy `version`.
fn wait_version_everywhere(lab: &VehicleLab, version: &str) {
    let taken = wait_for(LONG, || {
        let l = lab.links()?;
        (l["policy_version"] == version && l["control_plane_connected"] == true).then_some(())
    });
    assert!(
        taken.is_some(),
        "edge-netd never took the fleet's policy {version}: {:?}\n{}",
        lab.links(),
        lab.netd_log()
    );
    let reported = wait_for(LONG, || {
        (lab.fleet_vehicle()?["policy_version"] == version).then_some(())
    });
    assert!(
        reported.is_some(),
        "edge-netd runs policy {version}, but the fleet registry never showed it: {:?}",
        lab.fleet_vehicle()
    );
}

fn wait_selected(lab: &VehicleLab, class: &str, uplink: Option<&str>) {
    let ok = wait_for(LONG, || {
        (lab.selected(class)?.as_deref() == uplink).then_some(())
    });
    assert!(
        ok.is_some(),
        "class {class} never selected {uplink:?}; /links = {:?}",
        lab.links()
    );
}

/// The uplink that carried an app's request to the cloud service, from its answer.
fn uplink_of(r: &Reply) -> Option<&'static str> {
    if r.status != 200 {
        return None;
    }
    let from = r
        .body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("from="))?;
    uplink_of_ip(from)
}

/// Sends `GET path` through the vehicle Envoy until the cloud service answers it over
/// `uplink`; fails with the last answer and edge-netd's view otherwise.
fn wait_via(lab: &VehicleLab, path: &str, uplink: &str) -> Reply {
    let mut last = None;
    let got = wait_for(TRAFFIC, || {
        let r = lab.app_get(path);
        let ok = r
            .as_ref()
            .ok()
            .filter(|r| uplink_of(r) == Some(uplink))
            .cloned();
        last = Some(r);
        ok
    });
    got.unwrap_or_else(|| {
        panic!(
            "GET {path} through the vehicle Envoy never went over {uplink}; last answer: \
             {last:?}\n/links = {:?}",
            lab.links()
        )
    })
}

/// Waits until `GET path` is answered 503 `x-misaki-reason: no-uplink` (Envoy got the
/// route change from edge-netd).
fn wait_no_uplink(lab: &VehicleLab, path: &str) {
    let mut last = None;
    let got = wait_for(TRAFFIC, || {
        let r = lab.app_get(path);
        let ok = r
            .as_ref()
            .is_ok_and(|r| r.status == 503 && r.header("x-misaki-reason") == Some("no-uplink"));
        last = Some(r);
        ok.then_some(())
    });
    assert!(
        got.is_some(),
        "GET {path} never answered 503 x-misaki-reason: no-uplink; last answer: {last:?}\n\
         /links = {:?}",
        lab.links()
    );
}

/// A fresh request without a usable uplink is refused by Envoy itself, at once.
fn assert_refused_at_once(lab: &VehicleLab, path: &str) {
    let start = Instant::now();
    let r = lab.app_get(path).expect("request to the vehicle Envoy");
    let took = start.elapsed();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-misaki-reason"), Some("no-uplink"), "{r:?}");
    assert!(
        took < Duration::from_secs(3),
        "answered after {took:?}: a request without a usable uplink must be refused at \
         once, not after the class timeout (5 s)"
    );
}

/// The vehicle Envoy's `/clusters` text.
fn envoy_clusters(lab: &VehicleLab) -> String {
    let (status, body) = lab.envoy_get("/clusters").expect("Envoy admin /clusters");
    assert_eq!(status, 200, "{body}");
    body
}

#[test]
fn traffic_follows_the_selected_uplink_on_carrier_loss() {
    let lab = vehicle("vcarrier", &NetdOptions::default(), None);
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/tile/1", "wifi");
    // Envoy sets the class; an app cannot pick its own.
    let r = lab
        .app_request(
            "GET",
            "/maps/tile/0",
            &[("x-misaki-class", "critical")],
            b"",
        )
        .expect("request to the vehicle Envoy");
    assert_eq!(
        r.body, "from=198.18.1.1 path=/maps/tile/0 class=standard",
        "{r:?}"
    );
    // One cluster per uplink the class allows, none for the others. Nothing is
    // declared, so the Envoy loads a service's clusters on its first request.
    let _ = lab.app_get("/telemetry/first");
    let clusters = envoy_clusters(&lab);
    for name in ["out|maps|wifi::", "out|maps|lte::", "out|telemetry|wifi::"] {
        assert!(
            clusters.contains(name),
            "no {name} in /clusters:\n{clusters}"
        );
    }
    for name in ["out|maps|dsrc::", "out|telemetry|lte::"] {
        assert!(
            !clusters.contains(name),
            "{name}: a cluster over an uplink the class does not allow:\n{clusters}"
        );
    }

    lab.set_carrier("wlan0", false);
    wait_selected(&lab, "standard", Some("lte"));
    wait_via(&lab, "/maps/tile/2", "lte");

    lab.set_carrier("wlan0", true);
    // Back after the dwell time (2 s).
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/tile/3", "wifi");
}

#[test]
fn traffic_follows_the_selected_uplink_on_a_silent_blackhole() {
    // Without cross-uplink retry: the route change alone moves the traffic.
    let opts = NetdOptions {
        extra: "cross_uplink_retry: false\n".into(),
        ..Default::default()
    };
    let lab = vehicle("vblackhole", &opts, None);
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/tile/1", "wifi");
    let clusters = envoy_clusters(&lab);
    assert!(!clusters.contains("agg|maps|"), "{clusters}");

    // Carrier stays up and the kernel keeps routing the cloud over wlan0 (metric 10):
    // only edge-netd's probes notice, and Envoy's clusters are bound to their uplinks.
    lab.set_blackhole("wlan0", true);
    wait_selected(&lab, "standard", Some("lte"));
    wait_via(&lab, "/maps/tile/2", "lte");

    lab.set_blackhole("wlan0", false);
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/tile/3", "wifi");
}

#[test]
fn no_usable_uplink_answers_503_no_uplink_at_once() {
    let lab = vehicle("vnouplink", &NetdOptions::default(), None);
    wait_via(&lab, "/maps/tile/1", "wifi");

    // maps may use wifi and lte only; dsrc stays up (critical may use it).
    lab.set_carrier("wlan0", false);
    lab.set_carrier("wwan0", false);
    wait_selected(&lab, "standard", None);
    wait_selected(&lab, "critical", Some("dsrc"));
    wait_no_uplink(&lab, "/maps/tile/2");
    assert_refused_at_once(&lab, "/maps/tile/3");
    let leaked: Vec<_> = lab
        .upstream_requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/maps") && uplink_of_ip(&r.from) == Some("dsrc"))
        .collect();
    assert!(
        leaked.is_empty(),
        "maps left over dsrc, an uplink its class does not allow: {leaked:?}"
    );
}

#[test]
fn deferrable_request_without_uplink_gets_202_and_is_delivered_later() {
    let opts = NetdOptions {
        // The cloud service speaks HTTP/1.1 only.
        store_forward: Some(format!(
            "  listen: 127.0.0.1:{NETD_INGEST_PORT}\n  \
             cloud_url: http://{CLOUD_ADDR}:{CLOUD_SERVICE_PORT}\n  \
             http_version: http1\n"
        )),
        ..Default::default()
    };
    let lab = vehicle("vdefer", &opts, None);
    wait_selected(&lab, "bulk", Some("wifi"));
    // With wifi up, telemetry goes straight to the cloud.
    let direct = wait_for(TRAFFIC, || {
        let r = lab.app_post("/telemetry/live", &[], b"{\"n\":0}").ok()?;
        (uplink_of(&r) == Some("wifi")).then_some(r)
    });
    assert!(
        direct.is_some(),
        "POST /telemetry never reached the cloud over wifi: {:?}",
        lab.app_post("/telemetry/live", &[], b"{\"n\":0}")
    );

    // bulk may only use wifi.
    lab.set_carrier("wlan0", false);
    wait_selected(&lab, "bulk", None);
    let body = format!(
        "{{\"vehicle\":\"{}\",\"samples\":[{}]}}",
        lab.vehicle_id,
        (0..100)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let headers = [("content-type", "application/json")];
    let mut last = None;
    let accepted = wait_for(TRAFFIC, || {
        let r = lab.app_post("/telemetry/batch", &headers, body.as_bytes());
        let ok = r.as_ref().ok().filter(|r| r.status == 202).cloned();
        last = Some(r);
        ok
    })
    .unwrap_or_else(|| {
        panic!(
            "POST /telemetry without an uplink never got 202; last answer: {last:?}\n\
             /links = {:?}\n/saf/status = {:?}",
            lab.links(),
            lab.netd_get("/saf/status")
        )
    });
    let key = accepted
        .header("idempotency-key")
        .unwrap_or_else(|| panic!("202 without an Idempotency-Key: {accepted:?}"))
        .to_string();
    assert!(!key.is_empty(), "{accepted:?}");
    let delivered = |key: &str| {
        lab.upstream_requests()
            .into_iter()
            .find(|r| r.idempotency_key.as_deref() == Some(key))
    };
    assert_eq!(
        delivered(&key),
        None,
        "delivered although no uplink is usable"
    );

    lab.set_carrier("wlan0", true);
    let got = wait_for(TRAFFIC, || delivered(&key)).unwrap_or_else(|| {
        panic!(
            "the cloud service never received the deferred request {key}; /saf/status = \
             {:?}\n/links = {:?}",
            lab.netd_get("/saf/status"),
            lab.links()
        )
    });
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/telemetry/batch");
    assert_eq!(got.class, "bulk");
    assert_eq!(String::from_utf8_lossy(&got.body), body, "{got:?}");
    assert_eq!(
        uplink_of_ip(&got.from),
        Some("wifi"),
        "bulk left over an uplink it does not allow: {got:?}"
    );
}

#[test]
fn offline_boot_serves_vehicle_local_services_and_fails_cloud_requests_fast() {
    // Nothing in the cloud: no fleet, no probe echo, no service.
    let mut lab = VehicleLab::new("voffline");
    let factory = lab.dir.path().join("factory-policy.yaml");
    std::fs::write(
        &factory,
        format!(
            "{LAB_POLICY}  - {{ name: diagnostics, location: vehicle, port: {DIAGNOSTICS_PORT}, \
             routes: [/diagnostics], class: standard }}\n"
        ),
    )
    .expect("write factory policy");
    lab.start_vehicle_service(DIAGNOSTICS_PORT);
    lab.start_netd_nowait(&NetdOptions {
        factory_policy: Some(factory),
        ..Default::default()
    });
    let factory_version = wait_policy(&lab);
    assert_eq!(
        lab.links().expect("/links")["control_plane_connected"],
        false
    );
    lab.start_envoy(None);

    // The vehicle's own service works without any cloud.
    let mut last = None;
    let local = wait_for(TRAFFIC, || {
        let r = lab.app_get("/diagnostics/dtc");
        let ok = r.as_ref().ok().filter(|r| r.status == 200).cloned();
        last = Some(r);
        ok
    })
    .unwrap_or_else(|| panic!("GET /diagnostics never answered 200: {last:?}"));
    assert!(
        local
            .body
            .starts_with("from=127.0.0.1 path=/diagnostics/dtc"),
        "{local:?}"
    );

    // Probes go unanswered: every uplink turns into a blackhole, and cloud requests are
    // refused at once.
    wait_selected(&lab, "standard", None);
    wait_no_uplink(&lab, "/maps/tile/1");
    assert_refused_at_once(&lab, "/maps/tile/2");

    // The fleet appears: edge-netd takes its policy, without a restart of edge-netd or
    // of Envoy, and cloud traffic flows.
    let netd_pid = lab.netd.as_ref().expect("edge-netd").pid();
    let envoy_pid = lab.envoy.as_ref().expect("Envoy").pid();
    lab.start_fleet();
    lab.start_echo_upstream();
    let fleet_version = fleet_policy_version(&lab).expect("misaki-cp /policy version");
    assert_ne!(
        fleet_version, factory_version,
        "the test needs policies that differ"
    );
    wait_version_everywhere(&lab, &fleet_version);
    wait_via(&lab, "/maps/tile/3", "wifi");
    let netd = lab.netd.as_mut().expect("edge-netd");
    assert_eq!(netd.pid(), netd_pid);
    assert!(netd.try_wait().is_none(), "edge-netd exited");
    let envoy = lab.envoy.as_mut().expect("Envoy");
    assert_eq!(envoy.pid(), envoy_pid);
    assert!(envoy.try_wait().is_none(), "Envoy exited");
}

/// What misaki-cp counted as sent to vehicles: PolicyUpdate bytes, whole updates,
/// delta updates (`/metrics`; the lab's fleet serves one vehicle).
#[derive(Debug, Clone, Copy)]
struct PolicySent {
    bytes: u64,
    full: u64,
    delta: u64,
}

fn fleet_policy_sent(lab: &VehicleLab) -> PolicySent {
    let addr = std::net::SocketAddr::new(CLOUD_ADDR.parse().expect("literal"), FLEET_ADMIN_PORT);
    let (status, text) = lab
        .cloud
        .http_get(addr, "/metrics")
        .expect("misaki-cp /metrics");
    assert_eq!(status, 200, "{text}");
    let value = |series: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    };
    PolicySent {
        bytes: value("misaki_fleet_policy_bytes_total "),
        full: value("misaki_fleet_policy_updates_total{kind=\"full\"} "),
        delta: value("misaki_fleet_policy_updates_total{kind=\"delta\"} "),
    }
}

/// `n` cloud services of class standard, one policy line each.
fn filler_services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "  - {{ name: filler-{i}, location: cloud, port: {CLOUD_SERVICE_PORT}, \
                 endpoints: [\"{CLOUD_ADDR}:{CLOUD_SERVICE_PORT}\"], routes: [/filler-{i}], class: standard }}\n"
            )
        })
        .collect()
}

/// Bound on the PolicyUpdate of a one-service edit: a delta is a few hundred bytes.
const ONE_EDIT_BYTES: u64 = 4096;

#[test]
fn a_policy_edit_reaches_the_vehicle_envoy_through_edge_netd() {
    let lab = vehicle("vedit", &NetdOptions::default(), None);
    let before = wait_policy(&lab);
    wait_via(&lab, "/maps/tile/1", "wifi");
    let r = lab
        .app_get("/weather/now")
        .expect("request to the vehicle Envoy");
    assert_ne!(r.status, 200, "/weather is routed before it exists: {r:?}");

    // A mesh whose whole policy is well over the bound below, so only a delta passes.
    let mesh = format!("{LAB_POLICY}{}", filler_services(100));
    lab.write_fleet_policy(&mesh);
    let grown = wait_for(LONG, || fleet_policy_version(&lab).filter(|v| *v != before))
        .expect("misaki-cp never took the grown policy");
    wait_version_everywhere(&lab, &grown);
    let sent = fleet_policy_sent(&lab);

    lab.write_fleet_policy(&format!(
        "{mesh}  - {{ name: weather, location: cloud, port: {CLOUD_SERVICE_PORT}, \
         endpoints: [\"{CLOUD_ADDR}:{CLOUD_SERVICE_PORT}\"], routes: [/weather], class: standard }}\n"
    ));
    let r = wait_via(&lab, "/weather/now", "wifi");
    assert!(r.body.contains("path=/weather/now"), "{r:?}");
    let edited = fleet_policy_version(&lab).expect("misaki-cp /policy version");
    assert_ne!(edited, grown, "misaki-cp still serves the old policy");
    // edge-netd's /links, misaki-cp's /policy and /fleet/{vehicle}: one version string.
    wait_version_everywhere(&lab, &edited);

    // The edit crossed as one small delta; the vehicle stored the whole policy.
    let now = fleet_policy_sent(&lab);
    let whole = std::fs::metadata(lab.dir.path().join("state/policy.pb"))
        .expect("edge-netd's stored policy")
        .len();
    assert!(
        whole > ONE_EDIT_BYTES,
        "the whole policy is only {whole} bytes"
    );
    assert_eq!(
        (now.full - sent.full, now.delta - sent.delta),
        (0, 1),
        "one delta expected: before {sent:?}, after {now:?}"
    );
    let bytes = now.bytes - sent.bytes;
    assert!(
        bytes < ONE_EDIT_BYTES,
        "the edit cost {bytes} bytes (whole policy: {whole})"
    );
}

/// `(real, effective, saved, fs)` uids and the effective capabilities of a process.
fn proc_identity(pid: u32) -> (Vec<u32>, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    let uids = field("Uid:")
        .split_whitespace()
        .map(|u| u.parse().expect("uid"))
        .collect();
    (uids, field("CapEff:"))
}

#[test]
fn envoy_as_an_unprivileged_user_binds_its_clusters_to_uplinks() {
    let (uid, _) = ensure_user(ENVOY_USER);
    let lab = vehicle("vuser", &NetdOptions::default(), Some(ENVOY_USER));
    let pid = lab.envoy.as_ref().expect("Envoy").pid();
    let (uids, caps) = proc_identity(pid);
    assert_eq!(uids, vec![uid; 4], "Envoy does not run as {ENVOY_USER}");
    assert_eq!(
        caps, "0000000000000000",
        "Envoy kept capabilities (CapEff {caps})"
    );

    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/tile/1", "wifi");
    lab.set_carrier("wlan0", false);
    wait_selected(&lab, "standard", Some("lte"));
    wait_via(&lab, "/maps/tile/2", "lte");
}

/// The operator sees on misaki-cp what the vehicle's sidecar runs: edge-netd reports
/// each client of its local xDS tier (node id, ACKed version per type) in its fleet
/// stream, and `/fleet/{vehicle}` shows the versions edge-netd's `/xds` shows.
#[test]
fn the_fleet_registry_shows_what_the_vehicle_sidecar_acked() {
    let lab = vehicle("vsidecar", &NetdOptions::default(), None);
    // Nothing is declared: route tables load on a service's first request.
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/tile/1", "wifi");
    let local = wait_for(LONG, || {
        let (status, body) = lab.netd_get("/xds").ok()?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        let rds = doc["streams"][0]["types"]["rds"]["last_acked_version"].as_str()?;
        (status == 200).then(|| rds.to_string())
    })
    .unwrap_or_else(|| panic!("no ACKed RDS on edge-netd's /xds:\n{}", lab.netd_log()));
    let seen = wait_for(LONG, || {
        let v = lab.fleet_vehicle()?;
        let s = &v["sidecars"][0];
        (s["node_id"] == "vehicle-sidecar"
            && s["kind"] == "delta"
            && s["types"]["rds"]["acked_version"] == local.as_str()
            && s["types"]["cds"]["acked_version"].is_string())
        .then_some(v)
    });
    assert!(
        seen.is_some(),
        "the registry never showed the sidecar's ACKed RDS {local}: {:?}",
        lab.fleet_vehicle()
    );
}

/// A flapping Wi-Fi does not flap the vehicle's Envoy: the hysteresis of the selection
/// bounds the route pushes (at most away and back), and traffic ends on Wi-Fi.
#[test]
fn a_flapping_link_causes_a_bounded_number_of_route_pushes() {
    let opts = NetdOptions {
        dwell: Duration::from_secs(5),
        ..Default::default()
    };
    let lab = vehicle("vflap", &opts, None);
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/flap/0", "wifi");
    // The route table of `/maps`' scope (nothing declared: scoped, loaded on use).
    let rds = format!(
        "http.vehicle_outbound.rds.vehicle_outbound/{}.update_success",
        misaki_compiler::scope_bucket("path/maps")
    );
    let rds = rds.as_str();
    let before = lab.envoy_stat(rds).expect("Envoy RDS update counter");
    // ~6 flaps per second for 3 seconds, within the dwell.
    for _ in 0..9 {
        lab.set_carrier("wlan0", false);
        std::thread::sleep(Duration::from_millis(80));
        lab.set_carrier("wlan0", true);
        std::thread::sleep(Duration::from_millis(80));
    }
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/flap/1", "wifi");
    let pushes = lab.envoy_stat(rds).expect("Envoy RDS update counter") - before;
    // Away and back for each class that can leave wifi (standard, critical, and bulk
    // losing and regaining its only uplink) may each be a push: far fewer than the 18
    // carrier changes. (Zero is possible: the kernel may batch the flaps away.)
    assert!(
        pushes <= 6,
        "{pushes} route pushes while wlan0 flapped 9 times"
    );
}

/// With `cross_uplink_retry` (the default), a request caught on an uplink that dies under it (sent
/// before edge-netd has noticed the blackhole) is retried inside Envoy over the class's
/// next uplink and succeeds, instead of waiting out the class timeout.
#[test]
fn cross_uplink_retry_rescues_a_request_caught_on_a_dying_uplink() {
    let lab = vehicle("vretry", &NetdOptions::default(), None);
    wait_selected(&lab, "standard", Some("wifi"));
    wait_via(&lab, "/maps/retry/0", "wifi");
    assert!(envoy_clusters(&lab).contains("agg|maps|wifi::"));
    // Probes need ~0.5 s to call a silent blackhole; this request goes out at once.
    lab.set_blackhole("wlan0", true);
    let r = lab
        .app_get("/maps/retry/1")
        .expect("request to the vehicle Envoy");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(uplink_of(&r), Some("lte"), "{r:?}");
    let timed_out = lab
        .envoy_stat("cluster.out|maps|wifi.upstream_rq_per_try_timeout")
        .unwrap_or(0);
    let retried = lab
        .envoy_stat("cluster.agg|maps|wifi.upstream_rq_retry")
        .unwrap_or(0);
    assert!(
        timed_out + retried >= 1,
        "the request was not caught on wifi (it went to lte by a route change), so this \
         proves nothing: per-try timeouts {timed_out}, retries {retried}"
    );
}
