//! edge-netd on real interfaces: a vehicle namespace with three uplinks (wlan0,
//! wwan0, dsrc0) to a cloud namespace running misaki-cp (fleet gRPC + registry) and a
//! second misaki-cp answering probes (so killing the first does not silence probes).
//!
//! Needs root: without it every test fails saying so. Assertions are on behaviour
//! (edge-netd's `/links`, the fleet registry), with generous timeouts, never on how
//! fast something happened — benchmarks measure that (bench/edge_links.sh).

use std::time::{Duration, Instant};

use misaki_e2e::netns::{NetdOptions, VehicleLab};
use misaki_e2e::process::wait_for;

const LONG: Duration = Duration::from_secs(20);

fn lab(tag: &str, opts: &NetdOptions) -> VehicleLab {
    let mut lab = VehicleLab::new(tag);
    lab.start_fleet();
    lab.start_netd(opts);
    lab
}

fn wait_selected(lab: &VehicleLab, class: &str, uplink: &str) {
    let ok = wait_for(LONG, || {
        (lab.selected(class)? == Some(uplink.to_string())).then_some(())
    });
    assert!(
        ok.is_some(),
        "class {class} never selected {uplink}; /links = {:?}",
        lab.links()
    );
}

/// Waits until the registry shows `uplink` for `class` (and returns the vehicle doc).
fn wait_registry(lab: &VehicleLab, class: &str, uplink: &str) -> serde_json::Value {
    wait_for(LONG, || {
        let v = lab.fleet_vehicle()?;
        (v["selections"][class]["uplink"] == uplink).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "registry never showed {class} on {uplink}: {:?}",
            lab.fleet_vehicle()
        )
    })
}

fn link<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["links"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or_else(|| panic!("no link {name} in {doc}"))
}

fn switches(lab: &VehicleLab, class: &str) -> u64 {
    lab.links().expect("/links")["selections"][class]["switches"]
        .as_u64()
        .expect("switches")
}

#[test]
fn carrier_loss_moves_the_selection_and_the_registry_sees_it() {
    let lab = lab("carrier", &NetdOptions::default());
    wait_selected(&lab, "critical", "wifi");
    let v = wait_registry(&lab, "critical", "wifi");
    assert_eq!(v["online"], true);
    assert_eq!(link(&v, "wifi")["carrier"], true);

    lab.set_carrier("wlan0", false);
    wait_selected(&lab, "critical", "lte");
    // The kernel's linkwatch may hold back a carrier notification for up to a second
    // after a recent link event (here: the lab's own setup); the probes, which die
    // with the carrier, may then notice first. Either way the link must not be used.
    let links = lab.links().unwrap();
    let reason = links["selections"]["critical"]["reason"].clone();
    assert!(
        reason == "carrier_lost" || reason == "blackhole",
        "reason {reason}"
    );
    let links = wait_for(LONG, || {
        let l = lab.links()?;
        (link(&l, "wifi")["carrier"] == false).then_some(l)
    })
    .expect("edge-netd never saw wlan0 lose carrier");
    // bulk may only use wifi: nothing is eligible now.
    assert_eq!(
        links["selections"]["bulk"]["uplink"],
        serde_json::Value::Null
    );

    let v = wait_registry(&lab, "critical", "lte");
    let seen = wait_for(LONG, || {
        let v = lab.fleet_vehicle()?;
        (link(&v, "wifi")["carrier"] == false).then_some(v)
    });
    assert!(seen.is_some(), "registry never saw wifi lose carrier: {v}");
}

#[test]
fn silent_blackhole_moves_the_selection_after_lost_probes() {
    let lab = lab("blackhole", &NetdOptions::default());
    wait_selected(&lab, "critical", "wifi");
    lab.set_blackhole("wlan0", true);
    wait_selected(&lab, "critical", "lte");
    let links = lab.links().unwrap();
    assert_eq!(links["selections"]["critical"]["reason"], "blackhole");
    let wifi = link(&links, "wifi");
    assert_eq!(wifi["carrier"], true, "a blackhole keeps carrier");
    assert_eq!(wifi["reachable"], false);
    // The report stream follows the default class onto lte, so the registry sees it.
    let v = wait_registry(&lab, "critical", "lte");
    assert_eq!(v["online"], true);
}

#[test]
fn a_flapping_link_causes_a_bounded_number_of_switches() {
    let lab = lab(
        "flap",
        &NetdOptions {
            dwell: Duration::from_secs(5),
            ..Default::default()
        },
    );
    wait_selected(&lab, "critical", "wifi");
    let before = switches(&lab, "critical");
    // ~6 flaps per second for 3 seconds.
    for _ in 0..9 {
        lab.set_carrier("wlan0", false);
        std::thread::sleep(Duration::from_millis(80));
        lab.set_carrier("wlan0", true);
        std::thread::sleep(Duration::from_millis(80));
    }
    // Let every event be processed, but stay within the dwell time.
    std::thread::sleep(Duration::from_millis(300));
    let during = switches(&lab, "critical") - before;
    assert!(
        during <= 2,
        "{during} switches while wlan0 flapped 9 times (expected at most away and back)"
    );
    // Stable again: it returns to wifi (after the dwell) and then stays there.
    wait_selected(&lab, "critical", "wifi");
    let total = switches(&lab, "critical") - before;
    assert!(total <= 2, "{total} switches in all");
}

#[test]
fn a_better_link_is_taken_back_only_after_the_dwell_time() {
    let dwell = Duration::from_secs(3);
    let lab = lab(
        "dwell",
        &NetdOptions {
            dwell,
            ..Default::default()
        },
    );
    wait_selected(&lab, "critical", "wifi");
    lab.set_carrier("wlan0", false);
    wait_selected(&lab, "critical", "lte");

    let restored = Instant::now();
    lab.set_carrier("wlan0", true);
    // Whenever we see wifi selected again, at least the dwell time has passed since
    // carrier came back (we restored it before starting the clock's counterpart).
    let back = wait_for(LONG, || {
        let sel = lab.selected("critical")?;
        (sel.as_deref() == Some("wifi")).then(|| restored.elapsed())
    })
    .expect("never moved back to wifi");
    assert!(
        back >= dwell,
        "moved back after {back:?}, before the dwell time {dwell:?}"
    );
    assert_eq!(
        lab.links().unwrap()["selections"]["critical"]["reason"],
        "preferred_stable"
    );
    wait_registry(&lab, "critical", "wifi");
}

#[test]
fn edge_netd_keeps_selecting_without_the_control_plane_and_reconnects() {
    let mut lab = lab("cpdown", &NetdOptions::default());
    wait_selected(&lab, "critical", "wifi");
    wait_registry(&lab, "critical", "wifi");
    // The policy was received and stored for the next boot.
    let stored = lab.dir.path().join("state/policy.pb");
    assert!(
        wait_for(LONG, || stored.exists().then_some(())).is_some(),
        "policy not persisted"
    );

    lab.kill_fleet();
    assert!(
        wait_for(LONG, || (lab.links()?["control_plane_connected"] == false)
            .then_some(()))
        .is_some(),
        "edge-netd did not notice the control plane went away"
    );
    lab.set_carrier("wlan0", false);
    wait_selected(&lab, "critical", "lte");

    lab.start_fleet();
    let v = wait_registry(&lab, "critical", "lte");
    assert_eq!(v["online"], true);
    assert_eq!(link(&v, "wifi")["carrier"], false);
    assert!(
        wait_for(LONG, || (lab.links()?["control_plane_connected"] == true)
            .then_some(()))
        .is_some(),
        "edge-netd did not reconnect"
    );
}

#[test]
fn a_rebooted_vehicle_applies_its_stored_policy_without_the_cloud() {
    let mut lab = lab("reboot", &NetdOptions::default());
    wait_selected(&lab, "critical", "wifi");
    let version = lab.links().unwrap()["policy_version"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!version.is_empty(), "no policy received");
    lab.kill_netd();
    lab.kill_fleet();
    lab.start_netd(&NetdOptions::default());
    let links = lab.links().unwrap();
    assert_eq!(links["policy_version"], version.as_str());
    assert_eq!(links["selections"]["critical"]["uplink"], "wifi", "{links}");
    assert_eq!(links["control_plane_connected"], false);
}
