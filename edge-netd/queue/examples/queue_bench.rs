//! Enqueue throughput and latency with fsync'd group commit.
//!
//! ```text
//! cargo run --release -p misaki-queue --example queue_bench -- --seconds 5 --concurrency 64 --size 1024
//! ```
//!
//! `concurrency` tasks each enqueue in a loop (each waits for its own fsync, like an app
//! waiting for its 202); prints one line per figure. `--dir` picks the file system (default:
//! a temporary directory, removed afterwards).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use misaki_queue::{Destination, NewMessage, Queue, QueueConfig};

struct Args {
    seconds: f64,
    concurrency: usize,
    size: usize,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: 5.0,
        concurrency: 64,
        size: 1024,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => a.seconds = val()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--concurrency" => {
                a.concurrency = val()?.parse().map_err(|e| format!("--concurrency: {e}"))?
            }
            "--size" => a.size = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--dir" => a.dir = Some(PathBuf::from(val()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// The peer design: one `write` + `fdatasync` per message, no grouping. Runs `secs`
/// seconds on the same file system; returns (msgs/s, p50 sync latency).
fn per_message_fsync_baseline(dir: &std::path::Path, size: usize, secs: f64) -> (f64, Duration) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("baseline.log")).expect("baseline file");
    let body = vec![b'x'; size];
    let mut lat = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < secs {
        let t0 = Instant::now();
        f.write_all(&body).expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(t0.elapsed());
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let _ = std::fs::remove_file(dir.join("baseline.log"));
    (rate, percentile(&lat, 0.5))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("queue_bench: {e}");
            std::process::exit(64);
        }
    };
    let tmp = tempfile::tempdir_in(args.dir.clone().unwrap_or_else(std::env::temp_dir))
        .expect("temporary directory");
    let mut config = QueueConfig::new(tmp.path().join("queue"));
    config.budget_bytes = 64 << 30;
    config.segment_bytes = 64 << 20;
    let queue = Arc::new(Queue::open(config).expect("open queue"));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut latencies: Vec<Duration> = rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..args.concurrency {
            let queue = queue.clone();
            let body = vec![b'x'; args.size];
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let msg = NewMessage {
                        idempotency_key: Some(format!("bench-{t}-{n}")),
                        class: "bulk".into(),
                        rank: 2,
                        ttl: None,
                        destination: Destination {
                            service: "telemetry".into(),
                            method: "POST".into(),
                            path: "/v1/upload".into(),
                            headers: vec![(
                                "content-type".into(),
                                "application/octet-stream".into(),
                            )],
                        },
                        body: body.clone(),
                    };
                    let t0 = Instant::now();
                    queue.enqueue(msg).await.expect("enqueue");
                    lat.push(t0.elapsed());
                    n += 1;
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        all
    });
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let stats = queue.stats();
    let n = latencies.len() as f64;
    println!("accepted_msgs_per_sec {:.0}", n / elapsed.as_secs_f64());
    println!(
        "accepted_mib_per_sec {:.1}",
        n * args.size as f64 / elapsed.as_secs_f64() / (1 << 20) as f64
    );
    println!(
        "enqueue_p50_us {}",
        percentile(&latencies, 0.50).as_micros()
    );
    println!(
        "enqueue_p99_us {}",
        percentile(&latencies, 0.99).as_micros()
    );
    println!(
        "enqueue_max_us {}",
        latencies.last().copied().unwrap_or_default().as_micros()
    );
    println!("accepted_total {}", latencies.len());
    println!("group_commits {}", stats.group_commits);
    println!(
        "msgs_per_fsync {:.1}",
        n / stats.group_commits.max(1) as f64
    );
    println!("disk_bytes {}", stats.disk_bytes);
    drop(queue);
    let (rate, p50) = per_message_fsync_baseline(tmp.path(), args.size, 1.0);
    println!("baseline_fsync_per_message_msgs_per_sec {rate:.0}");
    println!("baseline_fdatasync_p50_us {}", p50.as_micros());
}
