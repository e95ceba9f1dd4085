//! Shared mode's fleet presence against a real etcd: misaki-cp replicas as processes
//! (so one can be killed with SIGKILL), vehicles simulated over the real FleetService.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::etcd::Etcd;
use envoy_types::pb::envoy::config::route::v3::ScopedRouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use misaki_compiler::gateway::{self, Reach};
use misaki_compiler::snapshot::ResourceType;
use misaki_cp::run::QUICKSTART;
use misaki_harness::{CpLaunch, Process, free_port, http};
use misaki_proto::fleet_v1 as pb;
use pb::vehicle_report::Report;
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const PATIENCE: Duration = Duration::from_secs(20);

struct Replica {
    proc: Process,
    xds: u16,
    admin: u16,
}

impl Replica {
    /// `misaki-cp serve --store URL --lease-ttl TTL --policy FILE` (the file applied to
    /// etcd, idempotently by every replica), waited for until ready.
    fn start(etcd: &Etcd, dir: &Path, name: &str, ttl: &str) -> Replica {
        Self::start_with(etcd, dir, name, ttl, &[])
    }

    /// [`Replica::start`] with further `serve` arguments.
    fn start_with(etcd: &Etcd, dir: &Path, name: &str, ttl: &str, extra: &[&str]) -> Replica {
        let policy = dir.join("mesh.yaml");
        if !policy.exists() {
            std::fs::write(&policy, QUICKSTART).unwrap();
        }
        let (xds, admin) = (free_port(), free_port());
        let mut launch = CpLaunch::new(
            env!("CARGO_BIN_EXE_misaki-cp"),
            &policy,
            xds,
            admin,
            dir.join(format!("{name}.log")),
        );
        launch.extra = ["--store", &etcd.url(), "--lease-ttl", ttl]
            .iter()
            .chain(extra)
            .map(Into::into)
            .collect();
        let proc = launch.start().unwrap_or_else(|e| panic!("{name}: {e}"));
        Replica { proc, xds, admin }
    }

    fn json(&self, path: &str) -> Value {
        let reply = http::get(self.admin, path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.proc.log_tail(30)));
        serde_json::from_str(&reply.body).unwrap_or(Value::Null)
    }

    /// This replica's name in etcd (`/fleet`'s `replica`).
    fn id(&self) -> String {
        self.json("/fleet")["replica"].as_str().unwrap().to_string()
    }

    fn vehicle(&self, id: &str) -> Value {
        self.json(&format!("/fleet/{id}"))
    }
}

/// One simulated vehicle's report stream.
struct Car {
    tx: mpsc::Sender<pb::VehicleReport>,
    control: Streaming<pb::ControlMessage>,
    seq: u64,
}

fn selection(uplink: &str) -> Vec<pb::ClassSelection> {
    vec![pb::ClassSelection {
        class: "standard".into(),
        uplink: uplink.into(),
        reason: "preferred_stable".into(),
    }]
}

impl Car {
    /// Hello and a LinkState selecting `uplink` for `standard`.
    async fn connect(xds: u16, id: &str, uplink: &str) -> Result<Car, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{xds}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(8);
        let report = |seq, r| pb::VehicleReport {
            seq,
            observed_unix_ms: 1,
            report: Some(r),
        };
        // Queued before the call: the server answers the call once it has the Hello.
        let hello = Report::Hello(pb::Hello {
            vehicle_id: id.into(),
            // Silent for minutes without being offline: the tests send no heartbeats.
            heartbeat_interval_ms: 60_000,
            ..Default::default()
        });
        let state = Report::LinkState(pb::LinkState {
            selections: selection(uplink),
            power: pb::PowerState::On.into(),
            ..Default::default()
        });
        tx.send(report(1, hello)).await.unwrap();
        tx.send(report(2, state)).await.unwrap();
        let mut car = Car {
            tx,
            control: pb::fleet_service_client::FleetServiceClient::new(channel)
                .report(ReceiverStream::new(rx))
                .await?
                .into_inner(),
            seq: 2,
        };
        // The first answer (an ack, or the refusal as an error).
        car.control.message().await?;
        Ok(car)
    }

    async fn send(&mut self, r: Report) {
        self.seq += 1;
        let report = pb::VehicleReport {
            seq: self.seq,
            observed_unix_ms: 1,
            report: Some(r),
        };
        // A closed stream shows in `control`; the tests read it there.
        let _ = self.tx.send(report).await;
    }

    async fn select(&mut self, uplink: &str) {
        self.send(Report::LinkChange(pb::LinkChange {
            selections: selection(uplink),
            ..Default::default()
        }))
        .await;
    }

    /// Read until the control plane ends the stream; its status.
    async fn ended(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(PATIENCE, self.control.message()).await {
                Err(_) => panic!("the stream did not end within {PATIENCE:?}"),
                Ok(Err(status)) => return status,
                Ok(Ok(None)) => return tonic::Status::ok("closed"),
                Ok(Ok(Some(_))) => {}
            }
        }
    }
}

/// Poll `f` until it holds; on timeout, fail with `what` and the last value seen.
async fn eventually(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match f() {
            Ok(()) => return,
            Err(last) if tokio::time::Instant::now() > deadline => {
                panic!("timed out: {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `(online, owner, standard's uplink)` of `vehicle` as `r` shows it.
fn seen(r: &Replica, vehicle: &str) -> (bool, Value, Value) {
    let v = r.vehicle(vehicle);
    let uplink = match &v["uplinks"] {
        // A record from etcd: class → uplink.
        Value::Object(u) => u.get("standard").cloned().unwrap_or(Value::Null),
        // The owner's own full record: class → {uplink, reason}.
        _ => v["selections"]["standard"]["uplink"].clone(),
    };
    (v["online"] == true, v["owner"].clone(), uplink)
}

fn expect(r: &Replica, vehicle: &str, want: (bool, Value, &str)) -> Result<(), String> {
    let got = seen(r, vehicle);
    if (got.0, &got.1, got.2.as_str().unwrap_or("")) == (want.0, &want.1, want.2) {
        Ok(())
    } else {
        Err(format!("{vehicle}: {got:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_replica_sees_the_whole_fleet_and_a_dead_replicas_vehicles_go_offline() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(&etcd, dir.path(), &format!("cp{i}"), "2s"))
        .collect();
    let ids: Vec<Value> = replicas.iter().map(|r| r.id().into()).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");

    // car-i reports to replica i % 3.
    let mut cars = Vec::new();
    for i in 0..6 {
        let car = Car::connect(replicas[i % 3].xds, &format!("car-{i}"), "wifi")
            .await
            .unwrap();
        cars.push(car);
    }
    for r in &replicas {
        eventually(
            "every replica lists every car online with its owner",
            || {
                for i in 0..6 {
                    expect(r, &format!("car-{i}"), (true, ids[i % 3].clone(), "wifi"))?;
                }
                let fleet = r.json("/fleet");
                (fleet["online"] == 6 && fleet["total"] == 6)
                    .then_some(())
                    .ok_or(format!("{} online of {}", fleet["online"], fleet["total"]))
            },
        )
        .await;
    }

    // A link change on replica 1 shows on replica 0 (from etcd).
    cars[1].select("lte").await;
    eventually("car-1's new uplink on replica 0", || {
        expect(&replicas[0], "car-1", (true, ids[1].clone(), "lte"))
    })
    .await;

    // A vehicle moves: it reports to replica 1 first, then its stream on replica 0
    // ends. The replica it left does not mark it offline over its new owner.
    let moved = Car::connect(replicas[1].xds, "car-0", "wifi")
        .await
        .unwrap();
    // (Replica 0 shows its own record while the old stream is still open there.)
    for r in &replicas[1..] {
        eventually("car-0 owned by replica 1", || {
            expect(r, "car-0", (true, ids[1].clone(), "wifi"))
        })
        .await;
    }
    drop(cars.remove(0));
    eventually("replica 0 shows car-0 owned by replica 1", || {
        expect(&replicas[0], "car-0", (true, ids[1].clone(), "wifi"))
    })
    .await;
    // Past the coalescing window: no offline write from replica 0 landed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for r in &replicas {
        expect(r, "car-0", (true, ids[1].clone(), "wifi")).unwrap();
    }

    // kill -9 replica 2: within the lease TTL (2 s) its cars show offline, owner
    // unknown, on the others; still listed.
    replicas[2].proc.kill();
    for r in &replicas[..2] {
        eventually("replica 2's cars offline, owner unknown", || {
            expect(r, "car-2", (false, Value::Null, "wifi"))?;
            expect(r, "car-5", (false, Value::Null, "wifi"))?;
            let fleet = r.json("/fleet");
            (fleet["total"] == 6 && fleet["online"] == 4)
                .then_some(())
                .ok_or(format!("{} online of {}", fleet["online"], fleet["total"]))
        })
        .await;
    }
    // car-2 reconnects to replica 0: online again everywhere, owned by it.
    let _back = Car::connect(replicas[0].xds, "car-2", "lte").await.unwrap();
    for r in &replicas[..2] {
        eventually("car-2 back on replica 0", || {
            expect(r, "car-2", (true, ids[0].clone(), "lte"))
        })
        .await;
    }
    drop(moved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_from_etcd_fences_itself_and_takes_vehicles_again_after() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Replica::start(&etcd, dir.path(), "a", "2s"),
        Replica::start(&etcd, dir.path(), "b", "2s"),
    );
    let a_id: Value = a.id().into();
    let mut car = Car::connect(a.xds, "car-1", "wifi").await.unwrap();
    eventually("car-1 on b's view", || {
        expect(&b, "car-1", (true, a_id.clone(), "wifi"))
    })
    .await;

    // etcd stops answering (SIGSTOP: connections stay open, silent). After the TTL
    // `a` can no longer show it holds a lease: it ends car-1's stream and refuses new
    // ones, so the vehicle goes elsewhere. Its admin and xDS keep serving.
    etcd.freeze();
    let status = car.ended().await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("lease"), "{status:?}");
    let refused = Car::connect(a.xds, "car-2", "wifi").await.err();
    assert_eq!(
        refused.map(|s| s.code()),
        Some(tonic::Code::Unavailable),
        "a fenced replica refuses new vehicles"
    );
    assert_eq!(http::get(a.admin, "/readyz").unwrap().status, 200);
    assert!(
        a.proc.log_text().contains("fenced"),
        "{}",
        a.proc.log_tail(20)
    );

    // etcd back: `a` holds a lease again and takes vehicles; b sees them.
    etcd.thaw();
    let mut again = None;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while again.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never took car-1 back"
        );
        again = Car::connect(a.xds, "car-1", "lte").await.ok();
        if again.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eventually("car-1 back on a, seen by b", || {
        expect(&b, "car-1", (true, a_id.clone(), "lte"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_etcd_restart_keeps_the_fleet_connected_and_replicas_register_again() {
    let mut etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Replica::start(&etcd, dir.path(), "a", "5s"),
        Replica::start(&etcd, dir.path(), "b", "5s"),
    );
    let (a_id, b_id): (Value, Value) = (a.id().into(), b.id().into());
    let mut on_a = Car::connect(a.xds, "car-a", "wifi").await.unwrap();
    let _on_b = Car::connect(b.xds, "car-b", "wifi").await.unwrap();
    eventually("both cars on both", || {
        expect(&a, "car-b", (true, b_id.clone(), "wifi"))?;
        expect(&b, "car-a", (true, a_id.clone(), "wifi"))
    })
    .await;

    etcd.restart();
    // Changes after the restart reach the other replica: both registered again.
    on_a.select("lte").await;
    eventually("car-a's change seen by b after the restart", || {
        expect(&b, "car-a", (true, a_id.clone(), "lte"))
    })
    .await;
    expect(&a, "car-b", (true, b_id.clone(), "wifi")).unwrap();
    // Nobody was fenced: car-a's stream is still open.
    on_a.select("wifi").await;
    eventually("car-a still reporting to a", || {
        expect(&b, "car-a", (true, a_id.clone(), "wifi"))
    })
    .await;
    assert!(
        !a.proc.log_text().contains("fenced"),
        "{}",
        a.proc.log_tail(30)
    );
}

/// The route table each vehicle's gateway scope names in a SotW SRDS response.
fn scopes(r: &DiscoveryResponse) -> BTreeMap<String, String> {
    r.resources
        .iter()
        .filter_map(|a| ScopedRouteConfiguration::decode(a.value.as_slice()).ok())
        .map(|s| (s.name, s.route_configuration_name))
        .collect()
}

/// Read SRDS responses (ACKing each) until car `vehicle`'s scope names `reach`'s table.
async fn until_scope(
    tx: &mpsc::Sender<DiscoveryRequest>,
    rx: &mut Streaming<DiscoveryResponse>,
    vehicle: &str,
    reach: Reach,
) {
    let (name, want) = (gateway::scope_name(vehicle), reach.route_table());
    let mut last = None;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let r = match tokio::time::timeout(left, rx.message()).await {
            Ok(r) => r.unwrap().expect("stream open"),
            Err(_) => panic!("{name} never named {want}; last: {last:?}"),
        };
        let ack = DiscoveryRequest {
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            type_url: r.type_url.clone(),
            ..Default::default()
        };
        tx.send(ack).await.unwrap();
        let table = scopes(&r).remove(&name);
        if table.as_deref() == Some(want.as_str()) {
            return;
        }
        last = table;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cloud_sidecar_on_one_replica_follows_vehicles_reporting_to_another() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let gateway_policy = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/vehicle-gateway/mesh.yaml"
    );
    std::fs::copy(gateway_policy, dir.path().join("mesh.yaml")).unwrap();
    let (a, b) = (
        Replica::start(&etcd, dir.path(), "a", "2s"),
        Replica::start(&etcd, dir.path(), "b", "2s"),
    );
    // A cloud sidecar on b, subscribed to the gateway's scopes (SotW, wildcard).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", b.xds))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, requests) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        node: Some(common::node("cloud-1", "cloud", None)),
        type_url: ResourceType::ScopedRoute.type_url().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();

    // car-7 reports to a: b's cloud sidecar gets its scope online; offline when its
    // stream ends; online again when it comes back (to b itself, this time).
    let car = Car::connect(a.xds, "car-7", "wifi").await.unwrap();
    until_scope(&tx, &mut rx, "car-7", Reach::Online).await;
    drop(car);
    until_scope(&tx, &mut rx, "car-7", Reach::Offline).await;
    let _car = Car::connect(b.xds, "car-7", "wifi").await.unwrap();
    until_scope(&tx, &mut rx, "car-7", Reach::Online).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vehicle_reporting_to_another_replica_shows_in_full_from_its_peer_port() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let peer_ports = [free_port(), free_port()];
    let peers = peer_ports.map(|p| format!("127.0.0.1:{p}"));
    let with_peer = |i: usize| {
        let name = format!("cp{i}");
        let args = ["--peer-addr", peers[i].as_str()];
        Replica::start_with(&etcd, dir.path(), &name, "2s", &args)
    };
    let (r0, r1) = (with_peer(0), with_peer(1));
    let bare = Replica::start(&etcd, dir.path(), "cp2", "2s");
    let owner = Value::from(r0.id());

    // car-p reports RTT and loss to replica 0; replica 1 shows them, fetched from 0.
    let mut car = Car::connect(r0.xds, "car-p", "wifi").await.unwrap();
    car.send(Report::LinkChange(pb::LinkChange {
        links: vec![pb::Link {
            name: "wifi".into(),
            up: true,
            carrier: true,
            reachable: true,
            rtt_us: Some(4200),
            loss_permille: 7,
            ..Default::default()
        }],
        ..Default::default()
    }))
    .await;
    eventually("replica 1 shows car-p's link detail from its owner", || {
        let v = r1.vehicle("car-p");
        let links = v["links"].as_array().cloned().unwrap_or_default();
        let wifi = links.iter().find(|l| l["name"] == "wifi");
        let detail = wifi.is_some_and(|l| l["rtt_us"] == 4200 && l["loss_permille"] == 7);
        (v["owner"] == owner && detail)
            .then_some(())
            .ok_or(v.to_string())
    })
    .await;

    // car-q reports to the replica without a peer port: its compact record, and why.
    let _other = Car::connect(bare.xds, "car-q", "lte").await.unwrap();
    eventually(
        "replica 0 shows car-q's record and why the detail is missing",
        || {
            let v = r0.vehicle("car-q");
            let why = v["detail"].as_str().unwrap_or_default();
            (v["online"] == true && why.contains("no peer address"))
                .then_some(())
                .ok_or(v.to_string())
        },
    )
    .await;

    // The peer port serves only vehicles online there: nothing of the admin port.
    for path in ["/metrics", "/fleet/car-q", "/policy"] {
        let reply = http::get(peer_ports[0], path).unwrap();
        assert_eq!(
            reply.status, 404,
            "GET {path} on the peer port: {}",
            reply.body
        );
    }
    assert_eq!(
        http::get(peer_ports[0], "/fleet/car-p").unwrap().status,
        200
    );
}
