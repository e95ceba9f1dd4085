//! `kill -9` of the daemon (ingest + queue + forwarder) while clients send at full speed:
//! every request that got a 202 must reach the receiver after a restart.

mod common;

use std::{
    collections::HashSet,
    path::Path,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use misaki_saf::testkit::Receiver;
use rand::Rng;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const ROUNDS: usize = 5;
const CLIENTS: usize = 6;

async fn start_daemon(dir: &Path, cloud: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_saf-daemon"))
        .args(["--queue-dir", dir.join("queue").to_str().unwrap()])
        .args(["--policy", dir.join("mesh.yaml").to_str().unwrap()])
        .args(["--cloud-url", cloud])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("saf-daemon starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("saf-daemon prints its addresses")
        .unwrap()
        .expect("saf-daemon stdout open");
    let ingest = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ingest="))
        .expect("ingest=<addr>")
        .to_string();
    (child, ingest)
}

/// One client: a keep-alive HTTP/1.1 connection, requests back to back, reconnecting
/// after the daemon dies, until `stop`.
async fn client(
    id: usize,
    round: usize,
    addr: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<String>>>,
    sent: Arc<Mutex<HashSet<String>>>,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(&addr).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let key = format!("r{round}-c{id}-{seq}");
            sent.lock().unwrap().insert(key.clone());
            let body = common::telemetry_json(1024, seq);
            let req = http::Request::post("/telemetry/crash")
                .header("host", "127.0.0.1")
                .header("idempotency-key", &key)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            if tx.ready().await.is_err() {
                break; // daemon gone: reconnect
            }
            let Ok(resp) = tx.send_request(req).await else {
                break;
            };
            let status = resp.status();
            if resp.into_body().collect().await.is_err() {
                break;
            }
            if status == http::StatusCode::ACCEPTED {
                accepted.lock().unwrap().push(key);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_202_survives_kill_9_of_the_daemon_and_is_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), common::POLICY).unwrap();
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let cloud = format!("http://{}", receiver.addr());
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let sent = Arc::new(Mutex::new(HashSet::new()));
    for round in 0..ROUNDS {
        let (mut child, ingest) = start_daemon(dir.path(), &cloud).await;
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                tokio::spawn(client(
                    id,
                    round,
                    ingest.clone(),
                    stop.clone(),
                    accepted.clone(),
                    sent.clone(),
                ))
            })
            .collect();
        let before = accepted.lock().unwrap().len();
        let ms = rand::rng().random_range(300..900);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.start_kill().expect("SIGKILL"); // std/tokio kill() is SIGKILL on Unix
        child.wait().await.unwrap();
        // Clients keep hammering the dead port briefly (connection refused), then stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.unwrap();
        }
        let got = accepted.lock().unwrap().len() - before;
        eprintln!("round {round}: killed after {ms} ms, {got} requests got 202");
        assert!(got > 0, "round {round}: clients got 202s before the kill");
    }
    // Restart with the receiver up: everything accepted must arrive.
    let (mut child, _) = start_daemon(dir.path(), &cloud).await;
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    let start = Instant::now();
    loop {
        let ok = receiver.ok_keys();
        let missing: Vec<&String> = accepted.iter().filter(|k| !ok.contains_key(*k)).collect();
        if missing.is_empty() {
            let dups: u32 = ok.values().map(|n| n - 1).sum();
            let sent = sent.lock().unwrap();
            let unknown = ok.keys().filter(|k| !sent.contains(*k)).count();
            assert_eq!(unknown, 0, "the receiver only sees keys that were sent");
            let extra = ok.len() - accepted.len();
            eprintln!(
                "{} accepted over {ROUNDS} kill -9 rounds: 0 lost, {dups} duplicate deliveries, \
                 {extra} delivered without a 202 (accepted as the daemon died)",
                accepted.len()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} of {} accepted messages never delivered, e.g. {:?}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}
