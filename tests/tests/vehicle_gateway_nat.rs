//! Cloud → vehicle through reverse tunnels with the vehicle behind a carrier NAT
//! ([`VehicleLab::behind_nat`]), real processes in network namespaces:
//!
//! ```text
//!  vehicle ns: edge-netd, vehicle Envoy (tunnels out over the tunnel class's uplink),
//!              `diag` echo on 127.0.0.1
//!     │ wlan0 / wwan0 / dsrc0
//!  router ns: masquerade toward the cloud, drops what the cloud starts
//!     │
//!  cloud ns:  misaki-cp (fleet), cloud sidecar Envoy (`vehicle_tunnel`, `vehicle_gateway`)
//! ```
//!
//! The cloud cannot dial the vehicle, yet a call to the cloud sidecar's gateway with
//! `x-misaki-target-vehicle: <vehicle>` reaches the vehicle's `diag` service through the
//! tunnels the vehicle's Envoy dialled (seen by the cloud from the router's address);
//! the tunnels follow edge-netd's uplink selection when the selected uplink loses its
//! carrier; with edge-netd gone the registry marks the vehicle offline and the gateway
//! answers `503 vehicle-offline` (diag has no replica), and reaches it again once
//! edge-netd is back.
//!
//! Needs root (network namespaces) and Envoy. Timing is asserted only as generous
//! deadlines.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use misaki_e2e::free_port;
use misaki_e2e::http::Reply;
use misaki_e2e::netns::{
    CLOUD_ADDR, NetdOptions, ROUTER_ADDR, UPLINKS, VehicleLab, lab_policy_with,
};
use misaki_e2e::process::wait_for;

const LONG: Duration = Duration::from_secs(60);
const TARGET: &str = "x-misaki-target-vehicle";
/// The tunnel class: the lab's `critical`, over wifi, lte, dsrc in that order.
const TUNNEL_CLASS: &str = "critical";

struct Ports {
    gateway: u16,
    tunnel: u16,
    inbound: u16,
    diag: u16,
}

/// The lab policy with the vehicle gateway on [`CLOUD_ADDR`] and the vehicle service
/// `diag` (no cloud replica) on `127.0.0.1:<diag>` in the vehicle.
fn policy(p: &Ports) -> String {
    let mesh = [
        format!("vehicle_inbound_port: {}", p.inbound),
        format!("vehicle_gateway_port: {}", p.gateway),
        format!("vehicle_tunnel_port: {}", p.tunnel),
        format!("vehicle_gateways: [{CLOUD_ADDR}]"),
        format!("vehicle_tunnel_class: {TUNNEL_CLASS}"),
    ];
    let mesh: Vec<&str> = mesh.iter().map(String::as_str).collect();
    let services = format!(
        "  - {{ name: diag, location: vehicle, port: {}, routes: [/diag], class: {TUNNEL_CLASS} }}\n",
        p.diag
    );
    lab_policy_with(&mesh, &services)
}

fn gateway_call(lab: &VehicleLab, ports: &Ports, path: &str) -> std::io::Result<Reply> {
    let addr = SocketAddr::new(CLOUD_ADDR.parse().expect("literal"), ports.gateway);
    lab.cloud
        .http_request(addr, "GET", path, &[(TARGET, &lab.vehicle_id)], b"")
}

fn diagnostics(lab: &VehicleLab) -> String {
    format!(
        "---- cloud Envoy ----\n{}\n---- vehicle Envoy ----\n{}\n---- edge-netd ----\n{}\n\
         ---- misaki-cp ----\n{}",
        lab.cloud_envoy_log(),
        lab.envoy_log(),
        lab.netd_log(),
        lab.fleet_log()
    )
}

/// Wait until a gateway call to `path` is answered 200 by the vehicle's `diag` (and
/// the service recorded it).
fn gateway_reaches_vehicle(lab: &VehicleLab, ports: &Ports, path: &str) -> Reply {
    let mut last = None;
    let got = wait_for(LONG, || {
        let r = gateway_call(lab, ports, path);
        let ok =
            matches!(&r, Ok(r) if r.status == 200 && r.body.contains(&format!("path={path} ")));
        last = Some(r);
        ok.then(|| last.as_ref().and_then(|r| r.as_ref().ok()).cloned())
            .flatten()
    });
    let r = got.unwrap_or_else(|| {
        panic!(
            "{path} via the gateway never reached the vehicle; last: {last:?}\n{}",
            diagnostics(lab)
        )
    });
    let seen = lab.vehicle_services[0].requests();
    assert!(
        seen.iter().any(|q| q.path == path),
        "the vehicle's diag did not record {path}: {seen:?}"
    );
    r
}

/// TCP connections in `ns` in state established matching the `ss` filter `filter`:
/// (local, peer) addresses.
fn established(ns: &str, filter: &str) -> Vec<(String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .arg(filter)
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
            let cols: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer (state filtered, so no state column).
            // A socket bound to a device shows as `ADDR%DEV:PORT`.
            let ip = |a: &str| {
                let (ip, _) = a.rsplit_once(':')?;
                Some(ip.split('%').next().unwrap_or(ip).to_string())
            };
            Some((ip(cols.get(2)?)?, ip(cols.get(3)?)?))
        })
        .collect()
}

#[test]
fn a_vehicle_behind_nat_is_reached_through_its_tunnel_across_an_uplink_switch_and_offline() {
    let mut lab = VehicleLab::behind_nat("vgn");
    let ports = Ports {
        gateway: free_port(),
        tunnel: free_port(),
        inbound: free_port(),
        diag: free_port(),
    };
    lab.start_fleet_with(&policy(&ports));
    lab.start_vehicle_service(ports.diag);
    let opts = NetdOptions::default();
    lab.start_netd(&opts);
    lab.start_envoy(None);
    lab.start_cloud_envoy("cloud-gw-1");

    // (a) The cloud reaches the vehicle's service through the gateway...
    let r = gateway_reaches_vehicle(&lab, &ports, "/diag/first");
    assert!(r.body.starts_with("from=127.0.0.1 "), "{}", r.body);
    assert!(
        r.body.contains(&format!("class={TUNNEL_CLASS}")),
        "{}",
        r.body
    );
    // ... though it cannot open a connection to the vehicle itself (its inbound port on
    // any uplink address).
    for &(_, iface, _, octet, _) in &UPLINKS {
        let addr: SocketAddr = format!("198.18.{octet}.1:{}", ports.inbound)
            .parse()
            .expect("literal");
        let dialled = lab
            .cloud
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)));
        assert!(
            dialled.is_err(),
            "the cloud opened a connection to the vehicle's {iface} ({addr})"
        );
    }
    // The tunnels arrive from the router (masqueraded), over the selected uplink.
    assert_eq!(
        lab.selected(TUNNEL_CLASS),
        Some(Some("wifi".to_string())),
        "{:?}",
        lab.links()
    );
    let sport = format!("( sport = :{} )", ports.tunnel);
    let peers = established(&lab.cloud.name, &sport);
    assert!(!peers.is_empty(), "no tunnel connection in the cloud");
    assert!(
        peers.iter().all(|(_, peer)| peer == ROUTER_ADDR),
        "tunnels not from the router {ROUTER_ADDR}: {peers:?}"
    );
    let dport = format!("( dport = :{} )", ports.tunnel);
    let vehicle_side = established(&lab.vehicle.name, &dport);
    assert!(
        vehicle_side.iter().any(|(local, _)| local == "198.18.1.1"),
        "no tunnel out of wlan0: {vehicle_side:?}"
    );

    // (b) The selected uplink loses its carrier: edge-netd selects the next, the tunnels
    // follow it, and calls get through again.
    lab.set_carrier("wlan0", false);
    let moved = wait_for(LONG, || {
        let s = lab.selected(TUNNEL_CLASS)?;
        (s.as_deref() != Some("wifi")).then_some(s)
    });
    assert_eq!(
        moved,
        Some(Some("lte".to_string())),
        "edge-netd did not move {TUNNEL_CLASS} to lte: {:?}",
        lab.links()
    );
    gateway_reaches_vehicle(&lab, &ports, "/diag/after-switch");
    let over_lte = wait_for(LONG, || {
        let v = established(&lab.vehicle.name, &dport);
        v.iter()
            .any(|(local, _)| local == "198.18.2.1")
            .then_some(v)
    });
    assert!(
        over_lte.is_some(),
        "no tunnel out of wwan0: {:?}\n{}",
        established(&lab.vehicle.name, &dport),
        diagnostics(&lab)
    );
    let peers = established(&lab.cloud.name, &sport);
    assert!(
        !peers.is_empty() && peers.iter().all(|(_, peer)| peer == ROUTER_ADDR),
        "tunnels after the switch not from the router {ROUTER_ADDR}: {peers:?}"
    );

    // (c) edge-netd gone: the registry marks the vehicle offline, and the gateway says
    // so at once (diag has no replica).
    lab.kill_netd();
    // On the way other answers may come (the tunnel still up before the registry
    // notices); each distinct one is kept for the failure message.
    let mut seen: Vec<String> = Vec::new();
    let offline = wait_for(LONG, || {
        let r = gateway_call(&lab, &ports, "/diag/offline");
        let what = match &r {
            Ok(r) => format!("{} {:?}", r.status, r.header("x-misaki-reason")),
            Err(e) => format!("error {e}"),
        };
        if !seen.contains(&what) {
            eprintln!(
                "after edge-netd died: {what} (fleet: {:?})",
                lab.fleet_vehicle().map(|v| v["online"].clone())
            );
            seen.push(what);
        }
        r.ok()
            .filter(|r| r.status == 503 && r.header("x-misaki-reason") == Some("vehicle-offline"))
    })
    .unwrap_or_else(|| {
        panic!(
            "the gateway never answered 503 vehicle-offline for the offline vehicle; answers \
             seen: {seen:?}; fleet: {:?}\n{}",
            lab.fleet_vehicle(),
            diagnostics(&lab)
        )
    });
    assert!(offline.body.contains("offline"), "{offline:?}");
    assert_eq!(
        lab.fleet_vehicle().map(|v| v["online"].clone()),
        Some(serde_json::Value::Bool(false))
    );
    // Now at once, and without reaching the vehicle (whose tunnels are still up).
    let r = gateway_call(&lab, &ports, "/diag/while-offline").expect("gateway call");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.header("x-misaki-reason"),
        Some("vehicle-offline"),
        "{r:?}"
    );
    assert!(
        !lab.vehicle_services[0]
            .requests()
            .iter()
            .any(|q| q.path == "/diag/while-offline"),
        "a call for an offline vehicle reached it"
    );

    // Back: reachable through the tunnel again.
    lab.start_netd(&opts);
    gateway_reaches_vehicle(&lab, &ports, "/diag/back");
}
