//! Many vehicles behind one cloud gateway, each reached individually (issue 13): a call
//! for one vehicle never lands on another.
//!
//! [`FleetLab`]: one cloud namespace (misaki-cp, one cloud sidecar Envoy) and one
//! namespace per vehicle (its `diag` service, edge-netd reporting to misaki-cp, the
//! vehicle Envoy fed by edge-netd, dialling its reverse tunnels to the cloud over its own
//! veth). Every vehicle's `diag` listens on the same port and answers with its own
//! vehicle id, so an answer says which vehicle served the call. The ids include ones that
//! are prefixes of others (`car-7` / `car-70`), so a prefix match would show up as a
//! misroute.
//!
//! Asserted: every vehicle becomes reachable, its tunnels arriving in the cloud from its
//! own uplink address; 400 calls in a shuffled order (each
//! vehicle equally often, each call with a path of its own) are all answered 200 by
//! exactly the vehicle named, and each vehicle's service saw exactly the calls made for
//! it; misaki-cp's `/fleet` lists every vehicle online; an unknown vehicle is answered
//! `503 vehicle-unknown`. Then one vehicle's edge-netd is killed: calls for it answer
//! `503 vehicle-offline` (and never reach it or anyone else, though its Envoy still holds
//! its tunnels) while the other vehicles still answer their own calls, and `/fleet`
//! shows just that one offline.
//!
//! Needs root (network namespaces) and Envoy. No timing is asserted, only generous
//! deadlines.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use misaki_e2e::fleet_lab::FleetLab;
use misaki_e2e::http::Reply;
use misaki_e2e::process::wait_for;

const LONG: Duration = Duration::from_secs(60);
/// `car-7` is a prefix of `car-70`, `car-8` of `car-80`.
const VEHICLES: [&str; 4] = ["car-7", "car-8", "car-70", "car-80"];
const CALLS: usize = 400;

/// The answer `vehicle`'s `diag` gives to `path`.
fn answer_of(vehicle: &str, path: &str) -> String {
    format!("vehicle={vehicle} path={path}")
}

/// Which vehicle served a 200 answer (from its body), if any.
fn served_by(r: &Reply) -> Option<&str> {
    r.body.strip_prefix("vehicle=")?.split_whitespace().next()
}

/// A small xorshift generator: the test needs a shuffle, not a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Fisher–Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = usize::try_from(self.next() % (i as u64 + 1)).expect("fits");
            items.swap(i, j);
        }
    }
}

/// `per_vehicle` calls for each of `vehicles`, shuffled.
fn shuffled_calls(
    rng: &mut Rng,
    vehicles: &[&'static str],
    per_vehicle: usize,
) -> Vec<&'static str> {
    let mut order: Vec<&'static str> = vehicles
        .iter()
        .flat_map(|v| std::iter::repeat_n(*v, per_vehicle))
        .collect();
    rng.shuffle(&mut order);
    order
}

/// Wait until a gateway call for `vehicle` is answered by it; an answer from another
/// vehicle on the way fails at once.
fn wait_reachable(lab: &FleetLab, vehicle: &str) {
    let mut last = None;
    let mut n = 0;
    let got = wait_for(LONG, || {
        n += 1;
        let path = format!("/diag/hello/{vehicle}/{n}");
        let r = lab.gateway_get(&path, Some(vehicle));
        if let Ok(r) = &r
            && r.status == 200
        {
            assert_eq!(
                r.body,
                answer_of(vehicle, &path),
                "a call for {vehicle} was answered by {:?}: {r:?}",
                served_by(r)
            );
            return Some(());
        }
        last = Some(r);
        None
    });
    assert!(
        got.is_some(),
        "{vehicle} never became reachable through the gateway; last: {last:?}\n{}",
        lab.diagnostics()
    );
}

/// What one round of calls found.
#[derive(Debug, Default)]
struct Tally {
    /// Answered 200 by the vehicle named.
    correct: usize,
    /// Answered 200 by another vehicle: (for, served by, path).
    misrouted: Vec<(String, String, String)>,
    /// Anything else: (for, path, answer).
    failed: Vec<(String, String, String)>,
    /// Offline vehicles' calls answered 503 vehicle-offline.
    offline_refused: usize,
}

/// One call per entry of `order`, each with a path of its own (`/diag/<round>/<i>`); a
/// vehicle in `offline` must be answered `503 vehicle-offline`, any other by itself.
/// Returns the tally and the paths sent per vehicle.
fn run_calls(
    lab: &FleetLab,
    round: &str,
    order: &[&str],
    offline: &[&str],
) -> (Tally, BTreeMap<String, Vec<String>>) {
    let mut tally = Tally::default();
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, vehicle) in order.iter().enumerate() {
        let path = format!("/diag/{round}/{i}");
        sent.entry(vehicle.to_string())
            .or_default()
            .push(path.clone());
        let r = lab.gateway_get(&path, Some(vehicle));
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                tally
                    .failed
                    .push((vehicle.to_string(), path, format!("transport error: {e}")));
                continue;
            }
        };
        if offline.contains(vehicle) {
            if r.status == 503 && r.header("x-misaki-reason") == Some("vehicle-offline") {
                tally.offline_refused += 1;
            } else if r.status == 200 {
                let by = served_by(&r).unwrap_or("?").to_string();
                tally.misrouted.push((vehicle.to_string(), by, path));
            } else {
                tally
                    .failed
                    .push((vehicle.to_string(), path, format!("{r:?}")));
            }
            continue;
        }
        if r.status == 200 && r.body == answer_of(vehicle, &path) {
            tally.correct += 1;
        } else if r.status == 200 && served_by(&r).is_some_and(|by| by != *vehicle) {
            let by = served_by(&r).unwrap_or("?").to_string();
            tally.misrouted.push((vehicle.to_string(), by, path));
        } else {
            tally
                .failed
                .push((vehicle.to_string(), path, format!("{r:?}")));
        }
    }
    (tally, sent)
}

/// Each vehicle's service saw, of the paths of `round`, exactly those sent for it (in
/// order): none sent for another vehicle. Offline vehicles' lists must be empty.
fn assert_services_saw_their_own(
    lab: &FleetLab,
    round: &str,
    sent: &BTreeMap<String, Vec<String>>,
    offline: &[&str],
) {
    let prefix = format!("/diag/{round}/");
    for v in &lab.vehicles {
        let seen: Vec<String> = v
            .service
            .seen()
            .into_iter()
            .filter(|p| p.starts_with(&prefix))
            .collect();
        let expected = if offline.contains(&v.id.as_str()) {
            Vec::new()
        } else {
            sent.get(&v.id).cloned().unwrap_or_default()
        };
        let foreign: Vec<&String> = seen.iter().filter(|p| !expected.contains(p)).collect();
        assert!(
            foreign.is_empty(),
            "{}'s service received calls not meant for it in round {round}: {foreign:?}",
            v.id
        );
        assert_eq!(
            seen, expected,
            "{}'s service did not see exactly its own calls of round {round}",
            v.id
        );
    }
}

fn assert_clean(lab: &FleetLab, round: &str, tally: &Tally) {
    assert!(
        tally.misrouted.is_empty(),
        "round {round}: {} call(s) answered by the wrong vehicle (for, served by, path): {:?}",
        tally.misrouted.len(),
        tally.misrouted
    );
    assert!(
        tally.failed.is_empty(),
        "round {round}: {} call(s) failed (for, path, answer), first ones: {:?}\n{}",
        tally.failed.len(),
        &tally.failed[..tally.failed.len().min(10)],
        lab.diagnostics()
    );
}

#[test]
fn many_vehicles_each_reached_individually_and_an_offline_one_alone_refused() {
    let mut lab = FleetLab::start(&VEHICLES);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("shuffle seed: {seed}");
    let mut rng = Rng(seed);

    // Every vehicle reachable through its own tunnels.
    for v in VEHICLES {
        wait_reachable(&lab, v);
    }

    // The registry knows all of them, online.
    let fleet = lab.fleet().expect("misaki-cp /fleet");
    assert_eq!(fleet["total"], VEHICLES.len(), "{fleet:#}");
    assert_eq!(fleet["online"], VEHICLES.len(), "{fleet:#}");
    for v in VEHICLES {
        assert_eq!(lab.fleet_online(v), Some(true), "{v} in {fleet:#}");
    }

    // Each vehicle's tunnels arrive from its own uplink address.
    let peers = lab.tunnel_peers();
    for v in &lab.vehicles {
        let n = peers.iter().filter(|p| **p == v.addr).count();
        eprintln!("{}: {n} tunnel connection(s) from {}", v.id, v.addr);
        assert!(n > 0, "no tunnel from {} ({}): {peers:?}", v.id, v.addr);
    }

    // 400 calls in a shuffled order: every one answered by exactly the vehicle named.
    let order = shuffled_calls(&mut rng, &VEHICLES, CALLS / VEHICLES.len());
    assert_eq!(order.len(), CALLS);
    let (tally, sent) = run_calls(&lab, "all-online", &order, &[]);
    eprintln!(
        "all online: {} correct, {} misrouted, {} failed of {CALLS}",
        tally.correct,
        tally.misrouted.len(),
        tally.failed.len()
    );
    assert_clean(&lab, "all-online", &tally);
    assert_eq!(tally.correct, CALLS);
    assert_services_saw_their_own(&lab, "all-online", &sent, &[]);

    // A vehicle the registry never saw.
    let r = lab
        .gateway_get("/diag/nobody", Some("car-9"))
        .expect("gateway call");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.header("x-misaki-reason"),
        Some("vehicle-unknown"),
        "{r:?}"
    );

    // One vehicle offline (its edge-netd gone; its Envoy and tunnels stay up): its
    // calls are refused, the others' still reach them.
    let gone = VEHICLES[0];
    lab.vehicle_mut(gone).kill_netd();
    let mut seen_answers: Vec<String> = Vec::new();
    let mut n = 0;
    let refused = wait_for(LONG, || {
        n += 1;
        let r = lab.gateway_get(&format!("/diag/going/{n}"), Some(gone));
        let what = match &r {
            Ok(r) => format!("{} {:?}", r.status, r.header("x-misaki-reason")),
            Err(e) => format!("error {e}"),
        };
        if !seen_answers.contains(&what) {
            seen_answers.push(what);
        }
        let r = r.ok()?;
        if r.status == 200 {
            // Before the registry notices, the tunnel still answers: from the vehicle.
            assert_eq!(
                served_by(&r),
                Some(gone),
                "a call for {gone} was answered by another vehicle: {r:?}"
            );
        }
        (r.status == 503 && r.header("x-misaki-reason") == Some("vehicle-offline")).then_some(r)
    });
    assert!(
        refused.is_some(),
        "the gateway never answered 503 vehicle-offline for {gone}; answers seen: \
         {seen_answers:?}; fleet: {:?}\n{}",
        lab.fleet(),
        lab.diagnostics()
    );
    assert_eq!(lab.fleet_online(gone), Some(false), "{:?}", lab.fleet());
    for v in &VEHICLES[1..] {
        assert_eq!(lab.fleet_online(v), Some(true), "{v}: {:?}", lab.fleet());
    }
    let fleet = lab.fleet().expect("misaki-cp /fleet");
    assert_eq!(fleet["total"], VEHICLES.len(), "{fleet:#}");
    assert_eq!(fleet["online"], VEHICLES.len() - 1, "{fleet:#}");

    let order = shuffled_calls(&mut rng, &VEHICLES, CALLS / VEHICLES.len());
    let (tally, sent) = run_calls(&lab, "one-offline", &order, &[gone]);
    eprintln!(
        "{gone} offline: {} correct, {} refused vehicle-offline, {} misrouted, {} failed of {CALLS}",
        tally.correct,
        tally.offline_refused,
        tally.misrouted.len(),
        tally.failed.len()
    );
    assert_clean(&lab, "one-offline", &tally);
    let per_vehicle = CALLS / VEHICLES.len();
    assert_eq!(tally.offline_refused, per_vehicle);
    assert_eq!(tally.correct, CALLS - per_vehicle);
    assert_services_saw_their_own(&lab, "one-offline", &sent, &[gone]);
    // Refused by the registry's word, not for want of a tunnel: the offline vehicle's
    // Envoy still holds its tunnels.
    let gone_addr = lab.vehicle(gone).addr.clone();
    assert!(
        lab.tunnel_peers().contains(&gone_addr),
        "{gone}'s tunnels ({gone_addr}) are gone: {:?}",
        lab.tunnel_peers()
    );
}
