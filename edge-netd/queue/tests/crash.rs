//! The real proof of "202 means durable": a child process enqueues as fast as it can and
//! prints every accepted id; the parent `kill -9`s it at a random moment, several rounds in
//! a row on the same directory, then reopens the queue and checks every printed id is there
//! (unless the child also printed that it was acked).
//!
//! The child is this same test binary, re-executed with an environment variable set.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant, SystemTime},
};

use misaki_queue::{Destination, NewMessage, Queue, QueueConfig};

const CHILD_DIR: &str = "MISAKI_QUEUE_CRASH_CHILD_DIR";
const CHILD_ROUND: &str = "MISAKI_QUEUE_CRASH_CHILD_ROUND";
const ROUNDS: u32 = 6;

fn config(dir: &Path) -> QueueConfig {
    let mut c = QueueConfig::new(dir);
    // Small segments so kills also land around segment rolls and deletions.
    c.segment_bytes = 256 << 10;
    c.budget_bytes = 1 << 30;
    c
}

/// The body is a function of the key, so the parent can check content, not just presence.
fn body_for(key: &str) -> Vec<u8> {
    let len = 50 + key.bytes().map(usize::from).sum::<usize>() * 7 % 1500;
    key.bytes().cycle().take(len).collect()
}

#[test]
fn accepted_messages_survive_kill_9() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let round: u32 = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
        run_child(Path::new(&dir), round);
    }

    let dir = tempfile::tempdir().unwrap();
    let mut accepted: HashMap<u64, String> = HashMap::new();
    let mut acked: HashSet<u64> = HashSet::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "accepted_messages_survive_kill_9",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ROUND, round.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            // Only complete lines count: a line cut by the kill proves nothing.
            while r.read_line(&mut line).unwrap_or(0) > 0 {
                if line.ends_with('\n') {
                    if line.contains("ACCEPTED ") {
                        let _ = tx.send(());
                    }
                    lines.push(line.trim_end().to_string());
                }
                line.clear();
            }
            lines
        });
        // Let it get going (recovery of the previous round's wreck included), then kill it
        // at a moment that varies from round to round.
        let target = 200
            + (SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 800) as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < target {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => seen += 1,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            assert!(
                Instant::now() < deadline,
                "child accepted only {seen} messages in 60s"
            );
            if let Some(status) = child.try_wait().unwrap() {
                panic!("child exited early with {status} after {seen} accepted");
            }
        }
        child.kill().expect("SIGKILL child");
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = accepted.len();
        for l in lines {
            // libtest prints "test <name> ... " without a newline before the test body runs,
            // so the child's first line carries that prefix: parse from the marker on.
            let l = match (l.find("ACCEPTED "), l.find("ACKED ")) {
                (Some(i), _) | (None, Some(i)) => &l[i..],
                (None, None) => continue,
            };
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("ACCEPTED"), Some(id), Some(key)) => {
                    let prev = accepted.insert(id.parse().unwrap(), key.to_string());
                    assert!(prev.is_none(), "id {id} accepted twice");
                }
                (Some("ACKED"), Some(id), None) => {
                    acked.insert(id.parse().unwrap());
                }
                _ => {}
            }
        }
        assert!(
            accepted.len() - before >= target.min(seen),
            "round {round}: child output lost"
        );
    }

    let q = Queue::open(config(dir.path())).expect("reopen after kill -9");
    let mut present = HashMap::new();
    loop {
        let batch = q.next_batch(&|_| true, 1024);
        if batch.is_empty() {
            break;
        }
        for m in batch {
            assert_eq!(
                m.body,
                body_for(&m.idempotency_key),
                "body of {} damaged",
                m.id
            );
            present.insert(m.id, m.idempotency_key);
        }
    }
    let mut missing = Vec::new();
    for (id, key) in &accepted {
        if acked.contains(id) {
            continue;
        }
        match present.get(id) {
            Some(k) => assert_eq!(k, key, "id {id} carries another message"),
            None => missing.push(*id),
        }
    }
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "{:?} {} accepted messages lost: {:?}",
        q.stats(),
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(
        q.stats().corrupt_skipped,
        0,
        "a kill -9 must leave at most a torn tail"
    );
    assert!(accepted.len() >= 200 * ROUNDS as usize);
}

/// Enqueue from many tasks and drain from one, printing what was accepted and acked.
fn run_child(dir: &Path, round: u32) -> ! {
    let q = Arc::new(Queue::open(config(dir)).expect("child opens the queue"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        for t in 0..32 {
            let q = q.clone();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let key = format!("r{round}-t{t}-n{n}");
                    let msg = NewMessage {
                        idempotency_key: Some(key.clone()),
                        class: ["critical", "standard", "bulk"][t % 3].into(),
                        rank: (t % 3) as u8,
                        ttl: None,
                        destination: Destination {
                            service: "telemetry".into(),
                            method: "POST".into(),
                            path: format!("/upload/{t}"),
                            headers: vec![],
                        },
                        body: body_for(&key),
                    };
                    let a = q.enqueue(msg).await.expect("enqueue");
                    println!("ACCEPTED {} {key}", a.id);
                }
            });
        }
        // A forwarder that acks a third and nacks the rest, so kills also hit ack writes.
        loop {
            for m in q.next_batch(&|_| true, 16) {
                if m.id % 3 == 0 {
                    // Printed *before* the ack: once acked, it may legitimately be gone.
                    println!("ACKED {}", m.id);
                    q.ack(m.id);
                } else {
                    q.nack(m.id);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}
