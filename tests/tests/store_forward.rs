//! Store-and-forward in the real `edge-netd`: apps → ingest (202 after fsync) → durable
//! queue → forwarder over the uplink the engine selected → cloud.
//!
//! Setup: everything on loopback. edge-netd gets one uplink, `wifi` on `lo`, probed
//! against misaki-cp's UDP probe echo on 127.0.0.1; misaki-cp also serves the fleet
//! stream, so edge-netd receives the policy (with its services) the way a vehicle does.
//! The forwarder binds its connections to `lo` (SO_BINDTODEVICE) like it would bind to
//! `wlan0`. Loopback rather than network namespaces for those two: the properties under
//! test (durability across `kill -9`, delivery through a real Envoy) do not depend on the
//! interface, and the Envoy harness runs on loopback.
//!
//! The third test needs root: the `VehicleLab` namespaces (wlan0/wwan0/dsrc0 veths to a
//! cloud namespace) show that a class leaves only over an uplink it allows, on a
//! connection bound to that uplink's interface even when the routing table points at
//! another one.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use misaki_e2e::http;
use misaki_e2e::netns::{
    CLOUD_ADDR, CLOUD_SERVICE_PORT, NETD_INGEST_PORT, NetdOptions, VehicleLab,
};
use misaki_e2e::policy::{CloudService, MeshPorts, policy_doc};
use misaki_e2e::process::wait_for;
use misaki_e2e::{ControlPlane, Envoy, Process, Upstream, free_port, target_bin};

const ROUNDS: usize = 5;
const CLIENTS: usize = 6;
const LONG: Duration = Duration::from_secs(30);

/// Mesh policy: one uplink, `bulk` (deferrable, wifi only) for telemetry, `standard`
/// (not deferrable) for maps.
fn policy(cloud_port: u16, telemetry_upstream: u16) -> String {
    let ports = MeshPorts {
        outbound: free_port(),
        inbound: free_port(),
        cloud: cloud_port,
    };
    let head = "uplinks:
  - { name: wifi, kind: wifi, cost: 1 }
  - { name: lte, kind: lte, metered: true, cost: 10 }
classes:
  - { name: standard, timeout: 5s, retries: 1, uplinks: [wifi, lte] }
  - { name: bulk, timeout: 30s, uplinks: [wifi], deferrable: true, dscp: 8, ttl: 1h }
";
    let service = |name, route, class| CloudService {
        name,
        upstream: telemetry_upstream,
        route,
        class,
    };
    policy_doc(
        &ports,
        head,
        &[
            service("telemetry", "/telemetry", "bulk"),
            service("maps", "/maps", "standard"),
        ],
    )
}

/// misaki-cp (fleet stream + probe echo) and edge-netd with store-and-forward, on
/// loopback.
struct Vehicle {
    // Field order is drop order: edge-netd dies before the control plane.
    netd: Option<Process>,
    cp: ControlPlane,
    dir: PathBuf,
    config: PathBuf,
    id: String,
    api: u16,
    ingest: u16,
    starts: u32,
}

impl Vehicle {
    fn new(dir: &Path, tag: &str, cloud_url: &str, cloud_port: u16, upstream: u16) -> Vehicle {
        let policy_path = dir.join("mesh.yaml");
        std::fs::write(&policy_path, policy(cloud_port, upstream)).expect("write policy");
        let probe = free_port();
        let probe_addr = format!("127.0.0.1:{probe}");
        let cp = ControlPlane::start_with(
            &policy_path,
            dir,
            free_port(),
            free_port(),
            &["--probe-addr", &probe_addr],
        );
        let id = format!("car-{tag}-{}", std::process::id());
        let (api, ingest) = (free_port(), free_port());
        let config = dir.join("edge-netd.yaml");
        std::fs::write(
            &config,
            netd_config(&id, cp.xds_port, api, ingest, &probe_addr, dir, cloud_url),
        )
        .expect("write edge-netd config");
        Vehicle {
            netd: None,
            cp,
            dir: dir.to_path_buf(),
            config,
            id,
            api,
            ingest,
            starts: 0,
        }
    }

    fn start_netd(&mut self) {
        self.starts += 1;
        let log = self.dir.join(format!("edge-netd-{}.log", self.starts));
        let mut cmd = Command::new(target_bin("edge-netd"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info");
        self.netd = Some(Process::spawn("edge-netd", &mut cmd, log));
        let ready = wait_for(LONG, || {
            (http::get(self.api, "/readyz").ok()?.status == 200).then_some(())
        });
        assert!(
            ready.is_some(),
            "edge-netd never became ready:\n{}",
            self.netd_log()
        );
    }

    fn kill_netd(&mut self) {
        if let Some(mut p) = self.netd.take() {
            p.kill(); // SIGKILL
        }
    }

    fn netd_log(&self) -> String {
        self.netd.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    fn api_json(&self, path: &str) -> Option<serde_json::Value> {
        let r = http::get(self.api, path).ok()?;
        (r.status == 200)
            .then(|| serde_json::from_str(&r.body).ok())
            .flatten()
    }

    /// Waits until edge-netd applies a policy from the control plane (with services).
    fn wait_policy(&self) {
        let ok = wait_for(LONG, || {
            let v = self.api_json("/links")?;
            (!v["policy_version"].as_str()?.is_empty()).then_some(())
        });
        assert!(ok.is_some(), "no policy received:\n{}", self.netd_log());
    }

    fn fleet_vehicle(&self) -> Option<serde_json::Value> {
        let r = http::get(self.cp.admin_port, &format!("/fleet/{}", self.id)).ok()?;
        (r.status == 200)
            .then(|| serde_json::from_str(&r.body).ok())
            .flatten()
    }
}

fn netd_config(
    id: &str,
    xds: u16,
    api: u16,
    ingest: u16,
    probe: &str,
    dir: &Path,
    cloud_url: &str,
) -> String {
    let extra = format!(
        "selection:\n\
         \x20 dwell: 1s\n\
         store_forward:\n\
         \x20 listen: 127.0.0.1:{ingest}\n\
         \x20 budget: 256MiB\n\
         \x20 max_body: 1MiB\n\
         \x20 cloud_url: {cloud_url}\n"
    );
    // Probes every 100 ms (edge-netd's default); several edge-netd run on this host's
    // loopback, and the helper gives each its own local xDS port.
    misaki_e2e::process::netd_config_on_lo(
        id,
        &format!("http://127.0.0.1:{xds}"),
        api,
        &dir.join("state"),
        probe,
        &extra,
    )
}

/// One keep-alive HTTP/1.1 request on `s`: (status, idempotency-key header).
fn post(
    s: &mut BufReader<TcpStream>,
    path: &str,
    host: &str,
    key: &str,
    body: &[u8],
) -> std::io::Result<(u16, Option<String>)> {
    post_with(s, path, host, key, "", body)
}

/// [`post`] with extra header lines (`name: value\r\n` each).
fn post_with(
    s: &mut BufReader<TcpStream>,
    path: &str,
    host: &str,
    key: &str,
    extra: &str,
    body: &[u8],
) -> std::io::Result<(u16, Option<String>)> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\nidempotency-key: {key}\r\n{extra}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let w = s.get_mut();
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    let mut line = String::new();
    if s.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let mut len = 0usize;
    let mut got_key = None;
    loop {
        let mut h = String::new();
        if s.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "idempotency-key" => got_key = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut rest = vec![0; len];
    s.read_exact(&mut rest)?;
    Ok((status, got_key))
}

/// A client sending back to back on keep-alive connections, reconnecting after the
/// daemon dies, until `stop`.
fn client(
    id: usize,
    round: usize,
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    sent: Arc<Mutex<HashSet<String>>>,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
            thread::sleep(Duration::from_millis(5));
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_nodelay(true);
        let mut s = BufReader::new(stream);
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let key = format!("r{round}-c{id}-{seq}");
            sent.lock().unwrap().insert(key.clone());
            let body = misaki_saf::testkit::telemetry_json(1024, seq);
            match post(&mut s, "/telemetry/crash", "telemetry", &key, &body) {
                Ok((202, _)) => accepted.lock().unwrap().push(key),
                Ok(_) => {}
                Err(_) => break, // daemon gone: reconnect
            }
        }
    }
}

fn pseudo_random_ms(lo: u64, hi: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    lo + nanos % (hi - lo)
}

#[test]
fn every_202_survives_kill_9_of_edge_netd_and_is_delivered_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let receiver = rt
        .block_on(misaki_saf::testkit::Receiver::start(
            "127.0.0.1:0".parse().unwrap(),
            false,
        ))
        .expect("receiver");
    let cloud = format!("http://{}", receiver.addr());
    let mut v = Vehicle::new(dir.path(), "crash", &cloud, free_port(), 1);
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(HashSet::new()));
    for round in 0..ROUNDS {
        v.start_netd();
        if round == 0 {
            // Later boots start from the stored policy.
            v.wait_policy();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let (stop, accepted, sent) = (stop.clone(), accepted.clone(), sent.clone());
                let port = v.ingest;
                thread::spawn(move || client(id, round, port, stop, accepted, sent))
            })
            .collect();
        let before = accepted.lock().unwrap().len();
        let ms = pseudo_random_ms(300, 900);
        thread::sleep(Duration::from_millis(ms));
        v.kill_netd();
        // Clients hammer the dead port briefly (connection refused), then stop.
        thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().expect("client thread");
        }
        let got = accepted.lock().unwrap().len() - before;
        eprintln!("round {round}: killed after {ms} ms, {got} requests got 202");
        assert!(got > 0, "round {round}: no 202 before the kill");
    }
    // Restart with the receiver up: everything accepted must arrive.
    v.start_netd();
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    let start = Instant::now();
    loop {
        let ok: HashMap<String, u32> = receiver.ok_keys();
        let missing: Vec<&String> = accepted.iter().filter(|k| !ok.contains_key(*k)).collect();
        if missing.is_empty() {
            let dups: u32 = ok.values().map(|n| n - 1).sum();
            let sent = sent.lock().unwrap();
            let unknown = ok.keys().filter(|k| !sent.contains(*k)).count();
            assert_eq!(unknown, 0, "the receiver only sees keys that were sent");
            eprintln!(
                "{} accepted over {ROUNDS} kill -9 rounds of edge-netd: 0 lost, {dups} duplicate \
                 deliveries, {} delivered without a 202 (accepted as the daemon died)",
                accepted.len(),
                ok.len() - accepted.len()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} of {} accepted messages never delivered, e.g. {:?}\n/saf/status: {:?}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(5)],
            v.api_json("/saf/status")
        );
        thread::sleep(Duration::from_millis(100));
    }

    // A second edge-netd on the same queue directory refuses to start, saying why.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let text = std::fs::read_to_string(&v.config)
        .unwrap()
        .replace(
            &format!("127.0.0.1:{}", v.api),
            &format!("127.0.0.1:{}", free_port()),
        )
        .replace(
            &format!("127.0.0.1:{}\n  budget", v.ingest),
            &format!(
                "127.0.0.1:{}\n  queue_dir: {}\n  budget",
                free_port(),
                dir.path().join("state/queue").display()
            ),
        )
        .replace(
            &format!("state_dir: {}", dir.path().join("state").display()),
            &format!("state_dir: {}", other.join("state").display()),
        );
    let cfg2 = other.join("edge-netd.yaml");
    std::fs::write(&cfg2, text).unwrap();
    let mut second = Process::spawn(
        "second edge-netd",
        Command::new(target_bin("edge-netd"))
            .arg("--config")
            .arg(&cfg2),
        other.join("second.log"),
    );
    let status = wait_for(LONG, || second.try_wait()).expect("second edge-netd exits");
    let log = second.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("locked by another process"), "{log}");
}

#[test]
fn deferred_request_goes_through_edge_netd_and_the_real_cloud_envoy_to_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Upstream::start("telemetry");
    let cloud_port = free_port();
    let mut v = Vehicle::new(
        dir.path(),
        "envoy",
        &format!("http://127.0.0.1:{cloud_port}"),
        cloud_port,
        upstream.port,
    );
    v.start_netd();
    v.wait_policy();

    // Accepted while the cloud sidecar is not up yet: it waits in the queue, and the
    // fleet registry shows it.
    let plain = br#"{"vehicle":"car-1","speed_kmh":87.5,"battery":0.71}"#.repeat(20);
    let stream = TcpStream::connect(("127.0.0.1", v.ingest)).expect("connect ingest");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = BufReader::new(stream);
    let (status, key) =
        post(&mut s, "/v1/batch", "telemetry", "e2e-key-1", &plain).expect("POST to ingest");
    assert_eq!(status, 202, "{}", v.netd_log());
    assert_eq!(key.as_deref(), Some("e2e-key-1"));
    // Not deferrable: refused, pointing at the vehicle sidecar.
    let (status, _) = post(&mut s, "/maps/tile", "maps", "e2e-key-2", b"{}").expect("POST");
    assert_eq!(status, 409);
    drop(s);

    let queued = wait_for(LONG, || {
        let f = v.fleet_vehicle()?;
        (f["queues"]["bulk"]["depth_messages"] == 1).then_some(f)
    });
    assert!(
        queued.is_some(),
        "registry never showed the queued message: {:?}",
        v.fleet_vehicle()
    );
    let st = v.api_json("/saf/status").expect("/saf/status");
    assert_eq!(st["queue"]["messages"], 1, "{st}");
    assert_eq!(st["classes"][0]["uplink"]["name"], "wifi", "{st}");
    assert_eq!(st["classes"][0]["uplink"]["interface"], "lo", "{st}");
    assert!(v.api_json("/saf/deadletters").is_some());
    let metrics = http::get(v.api, "/metrics").expect("/metrics").body;
    for line in [
        "misaki_saf_queue_depth_messages{class=\"bulk\"} 1",
        "misaki_saf_queue_dropped_total{class=\"bulk\",reason=\"expired\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} not in /metrics:\n{metrics}");
    }

    // The cloud sidecar comes up: the message is delivered through Envoy's zstd
    // decompressor, plain, with its key; the queue drains and the registry sees it.
    let _envoy = Envoy::start(
        "cloud-sidecar.yaml",
        "cloud-saf-1",
        v.cp.xds_port,
        dir.path(),
    );
    let expected = format!(
        "telemetry /telemetry/v1/batch class=bulk key=e2e-key-1 body={}",
        String::from_utf8_lossy(&plain)
    );
    let seen = wait_for(Duration::from_secs(60), || {
        upstream
            .seen()
            .into_iter()
            .find(|l| l.contains("e2e-key-1"))
    });
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "the service never saw the message; /saf/status: {:?}",
            v.api_json("/saf/status")
        )
    });
    assert_eq!(
        seen, expected,
        "the service sees the plain body (no content-encoding) and the key"
    );
    // The service may answer before edge-netd has counted the delivery: wait for it.
    let st = wait_for(LONG, || {
        let st = v.api_json("/saf/status")?;
        (st["totals"]["delivered"].as_u64()? >= 1).then_some(st)
    })
    .unwrap_or_else(|| panic!("delivery never counted: {:?}", v.api_json("/saf/status")));
    assert!(
        st["totals"]["wire_bytes"].as_u64().unwrap() < st["totals"]["body_bytes"].as_u64().unwrap(),
        "sent compressed: {st}"
    );
    let drained = wait_for(LONG, || {
        let f = v.fleet_vehicle()?;
        (f["queues"]["bulk"]["depth_messages"] == 0).then_some(())
    });
    assert!(
        drained.is_some(),
        "registry never showed the queue drained: {:?}",
        v.fleet_vehicle()
    );
    assert_eq!(
        upstream
            .seen()
            .iter()
            .filter(|l| l.contains("e2e-key-1"))
            .count(),
        1
    );
}

/// POST from inside the vehicle namespace to edge-netd's ingest: the status.
fn lab_post(
    lab: &VehicleLab,
    host: &'static str,
    path: &'static str,
    key: &'static str,
    extra: &'static str,
) -> u16 {
    lab.vehicle.enter(move || {
        let stream = TcpStream::connect(("127.0.0.1", NETD_INGEST_PORT)).expect("connect ingest");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let body = misaki_saf::testkit::telemetry_json(2048, 7);
        post_with(&mut BufReader::new(stream), path, host, key, extra, &body)
            .expect("POST to ingest")
            .0
    })
}

#[test]
fn a_class_leaves_only_over_an_uplink_it_allows_bound_to_that_interface() {
    let mut lab = VehicleLab::new("saf");
    lab.start_fleet();
    // The cloud service: a recording receiver inside the cloud namespace (its runtime's
    // threads are spawned from a thread that entered it, so they live there too).
    let (_rt, receiver) = lab.cloud.enter(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = format!("{CLOUD_ADDR}:{CLOUD_SERVICE_PORT}")
            .parse()
            .unwrap();
        let r = rt
            .block_on(misaki_saf::testkit::Receiver::start(addr, true))
            .expect("receiver in the cloud namespace");
        (rt, r)
    });
    lab.start_netd(&NetdOptions {
        store_forward: Some(format!(
            "  listen: 127.0.0.1:{NETD_INGEST_PORT}\n  \
             cloud_url: http://{CLOUD_ADDR}:{CLOUD_SERVICE_PORT}\n"
        )),
        ..Default::default()
    });
    let ok = wait_for(LONG, || {
        (lab.selected("bulk")? == Some("wifi".into())
            && !lab.links()?["policy_version"].as_str()?.is_empty())
        .then_some(())
    });
    assert!(ok.is_some(), "no policy or selection: {:?}", lab.links());

    // wifi goes silently dark: carrier stays, so the kernel keeps routing the cloud over
    // wlan0 (metric 10). bulk may use only wifi; standard moves to lte.
    lab.set_blackhole("wlan0", true);
    let moved = wait_for(LONG, || {
        (lab.selected("standard")? == Some("lte".into()) && lab.selected("bulk")?.is_none())
            .then_some(())
    });
    assert!(moved.is_some(), "selection did not move: {:?}", lab.links());
    assert_eq!(
        lab_post(&lab, "telemetry", "/telemetry/up", "bulk-1", ""),
        202
    );
    assert_eq!(
        lab_post(
            &lab,
            "maps",
            "/maps/trace",
            "std-1",
            "x-misaki-defer: 1\r\n"
        ),
        202
    );
    // standard arrives although the route points at the dead wlan0: its connection is
    // bound to wwan0, the uplink selected for it.
    let got = wait_for(LONG, || {
        receiver.ok_keys().contains_key("std-1").then_some(())
    });
    assert!(
        got.is_some(),
        "standard never delivered over lte; /saf/status: {:?}",
        lab.netd_get("/saf/status")
    );
    let d = receiver
        .deliveries()
        .into_iter()
        .find(|d| d.key == "std-1")
        .expect("delivery recorded");
    assert_eq!(d.class.as_deref(), Some("standard"));
    assert_eq!(d.path, "/maps/trace");
    // bulk waits: no uplink it allows is usable.
    thread::sleep(Duration::from_secs(1));
    assert!(
        !receiver.ok_keys().contains_key("bulk-1"),
        "bulk left over an uplink it does not allow"
    );
    let (_, status) = lab.netd_get("/saf/status").expect("/saf/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    let bulk = status["classes"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["class"] == "bulk"))
        .unwrap_or_else(|| panic!("no bulk in {status}"));
    assert_eq!(bulk["uplink"], serde_json::Value::Null, "{status}");
    assert_eq!(bulk["ready"], 1, "{status}");

    // wifi is back (after the dwell): bulk goes, over wlan0.
    lab.set_blackhole("wlan0", false);
    let got = wait_for(LONG, || {
        receiver.ok_keys().contains_key("bulk-1").then_some(())
    });
    assert!(
        got.is_some(),
        "bulk never delivered after wifi came back: {:?}",
        lab.netd_get("/saf/status")
    );
}
