//! `vehicle-loop`: the measuring client of `bench/vehicle_loop.sh`. Run it through that
//! script: it needs root and the namespace lab the script builds.
//!
//! - `echo`: a tiny HTTP/1.1 server (thread per connection, keep-alive) answering every
//!   request 200 `from=<client ip> path=<path>`: the cloud service in the cloud
//!   namespace, whose client IP names the uplink that carried the request, and the
//!   vehicle-hosted `diagnostics` service.
//! - `failover`: an app in the vehicle namespace sends `GET <path>` to the vehicle Envoy
//!   every `--interval-ms`, open loop (each request on a thread of its own, never waiting
//!   for an earlier one), each on a new connection with `connection: close` and a
//!   `--timeout-ms` deadline. Per trial it runs the `--down` command, timing from just
//!   before spawning it (in this process, `Instant` = CLOCK_MONOTONIC) to the end of the
//!   first 200 answered from `--to-ip`, and counts the requests that failed in between;
//!   then it runs `--up` and waits for traffic to come back over `--from-ip`.
//! - `boot`: offline boot. Per trial: wipe edge-netd's state dir, spawn edge-netd, then at
//!   once Envoy, and time Envoy's spawn → the end of the first 200 from the vehicle-local
//!   service through Envoy (a new connection every `--interval-ms`); kill both.
//!
//! Results are Markdown table rows on stdout (`| measurement | n | median | p95 | max |
//! aim | met |`), lines starting `note:` for the notes under the table, and every sample
//! on stderr.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use misaki_bench::http::Headers;
use misaki_bench::stats::{summarize, summarize_f64};

#[derive(Debug, Parser)]
#[command(about = "measuring client of bench/vehicle_loop.sh")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// HTTP/1.1 server answering `from=<client ip> path=<path>`.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Failover through the vehicle Envoy: `--down`, wait for the new uplink, `--up`.
    Failover {
        /// Row label, e.g. "carrier loss".
        #[arg(long)]
        label: String,
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// The vehicle Envoy's outbound listener.
        #[arg(long, default_value = "127.0.0.1:15001")]
        target: SocketAddr,
        #[arg(long, default_value = "/maps")]
        path: String,
        /// A new request every this many ms.
        #[arg(long, default_value_t = 2)]
        interval_ms: u64,
        /// Each request's deadline (connect + send + answer).
        #[arg(long, default_value_t = 250)]
        timeout_ms: u64,
        /// Client IP the cloud sees over the uplink that fails (wifi).
        #[arg(long)]
        from_ip: IpAddr,
        /// Client IP the cloud sees over the uplink traffic must move to (lte).
        #[arg(long)]
        to_ip: IpAddr,
        /// The event, whitespace-separated argv (no shell).
        #[arg(long)]
        down: String,
        /// Undoes the event.
        #[arg(long)]
        up: String,
        /// Pause after traffic is back on `from_ip`, before the next event.
        #[arg(long, default_value_t = 1500)]
        settle_ms: u64,
        /// A trial without a 200 over `to_ip` this long after the event counts as failed.
        #[arg(long, default_value_t = 10)]
        give_up_s: u64,
        /// Aim for the median and the max, in ms (for the table's last columns).
        #[arg(long)]
        aim_median_ms: f64,
        #[arg(long)]
        aim_max_ms: f64,
    },
    /// Offline boot: edge-netd + Envoy started together → first 200 from a vehicle service.
    Boot(Boot),
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Echo { listen } => echo(listen),
        Cmd::Failover {
            label,
            trials,
            target,
            path,
            interval_ms,
            timeout_ms,
            from_ip,
            to_ip,
            down,
            up,
            settle_ms,
            give_up_s,
            aim_median_ms,
            aim_max_ms,
        } => {
            let f = Failover {
                label,
                target,
                request: get_request(&target, &path),
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(timeout_ms),
                from_ip,
                to_ip,
                down: argv(&down)?,
                up: argv(&up)?,
                settle: Duration::from_millis(settle_ms),
                give_up: Duration::from_secs(give_up_s),
            };
            failover(&f, trials, (aim_median_ms, aim_max_ms))
        }
        Cmd::Boot(b) => boot(&b),
    }
}

fn argv(s: &str) -> anyhow::Result<Vec<String>> {
    let v: Vec<String> = s.split_whitespace().map(str::to_string).collect();
    if v.is_empty() {
        bail!("empty command");
    }
    Ok(v)
}

fn get_request(target: &SocketAddr, path: &str) -> Arc<[u8]> {
    format!(
        "GET {path} HTTP/1.1\r\nhost: {target}\r\nuser-agent: misaki-bench\r\nconnection: close\r\n\r\n"
    )
    .into_bytes()
    .into()
}

// ---------------------------------------------------------------------------------------
// One request

/// What one request saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// 200 with `from=<ip> path=<path>`.
    Ok {
        from: String,
        path: String,
    },
    /// Any other answer; `x-misaki-reason` if present.
    Status(u16, Option<String>),
    /// No complete answer before the deadline.
    Timeout,
    Refused,
    /// Reset, EOF before a complete answer, unparsable answer.
    Error(String),
}

impl Outcome {
    fn short(&self) -> String {
        match self {
            Outcome::Ok { from, .. } => format!("200 from {from}"),
            Outcome::Status(s, Some(r)) => format!("{s} {r}"),
            Outcome::Status(s, None) => s.to_string(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Refused => "refused".into(),
            Outcome::Error(e) => e.clone(),
        }
    }
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => Outcome::Timeout,
        ConnectionRefused => Outcome::Refused,
        k => Outcome::Error(format!("{k:?}")),
    }
}

/// One request on a new connection; everything (connect, send, answer) within `timeout`.
fn request(target: SocketAddr, req: &[u8], timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut s = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let _ = s.set_nodelay(true);
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Outcome::Timeout;
    }
    if let Err(e) = s
        .set_write_timeout(Some(left))
        .and_then(|()| s.write_all(req))
    {
        return classify(&e);
    }
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(o) = parse_response(&buf, false) {
            return o;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Outcome::Timeout;
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return classify(&e);
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return parse_response(&buf, true)
                    .unwrap_or_else(|| Outcome::Error("eof before a complete answer".into()));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return classify(&e),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The outcome once `buf` holds a whole answer (`eof`: the peer closed, so a body
/// without content-length ends here).
fn parse_response(buf: &[u8], eof: bool) -> Option<Outcome> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = match lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
    {
        Some(s) => s,
        None => return Some(Outcome::Error("bad status line".into())),
    };
    let mut len = None;
    let mut reason = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("x-misaki-reason") {
                reason = Some(v.to_string());
            }
        }
    }
    let body = &buf[end + 4..];
    let body = match len {
        Some(n) if body.len() >= n => &body[..n],
        Some(_) => return None,
        None if eof => body,
        None => return None,
    };
    if status != 200 {
        return Some(Outcome::Status(status, reason));
    }
    let text = String::from_utf8_lossy(body);
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    Some(match (field("from="), field("path=")) {
        (Some(from), Some(path)) => Outcome::Ok { from, path },
        _ => Outcome::Status(200, Some("no from= in the body".into())),
    })
}

// ---------------------------------------------------------------------------------------
// echo

fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    eprintln!("echo listening on {listen}");
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || serve(conn));
    }
    Ok(())
}

fn serve(conn: TcpStream) -> std::io::Result<()> {
    let peer = conn.peer_addr()?.ip();
    let _ = conn.set_nodelay(true);
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let http10 = line.trim_end().ends_with("HTTP/1.0");
        let Some(headers) = Headers::read(&mut r)? else {
            return Ok(());
        };
        let len: usize = headers
            .get("content-length")
            .map_or(0, |v| v.parse().unwrap_or(0));
        let close = headers
            .get("connection")
            .map_or(http10, |v| v.eq_ignore_ascii_case("close"));
        std::io::copy(&mut (&mut r).take(len as u64), &mut std::io::sink())?;
        let body = format!("from={peer} path={path}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        w.write_all(resp.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------
// failover

#[derive(Debug)]
struct Failover {
    label: String,
    target: SocketAddr,
    request: Arc<[u8]>,
    interval: Duration,
    timeout: Duration,
    from_ip: IpAddr,
    to_ip: IpAddr,
    down: Vec<String>,
    up: Vec<String>,
    settle: Duration,
    give_up: Duration,
}

/// One finished request; appended in completion order.
#[derive(Debug, Clone)]
struct Rec {
    sent: Instant,
    done: Instant,
    outcome: Outcome,
}

type Log = Arc<Mutex<Vec<Rec>>>;

fn lock(log: &Log) -> std::sync::MutexGuard<'_, Vec<Rec>> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts a request every `interval` (from a schedule, not from the last answer) until
/// `stop`. Each runs on a thread of its own, so a request stuck on a dead uplink never
/// delays the next one.
fn generator(f: &Failover, log: Log, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let (target, req, interval, timeout) = (f.target, f.request.clone(), f.interval, f.timeout);
    thread::spawn(move || {
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let sent = Instant::now();
            let (log2, req2) = (log.clone(), req.clone());
            let spawned = thread::Builder::new().stack_size(64 << 10).spawn(move || {
                let outcome = request(target, &req2, timeout);
                let done = Instant::now();
                lock(&log2).push(Rec {
                    sent,
                    done,
                    outcome,
                });
            });
            if let Err(e) = spawned {
                lock(&log).push(Rec {
                    sent,
                    done: Instant::now(),
                    outcome: Outcome::Error(format!("client could not spawn a thread: {e}")),
                });
            }
            next += interval;
            // After a stall, carry on from now rather than bursting to catch up.
            if Instant::now() > next + interval {
                next = Instant::now();
            }
        }
    })
}

fn run(cmd: &[String]) -> anyhow::Result<()> {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn is_ok_from(o: &Outcome, ip: IpAddr) -> bool {
    matches!(o, Outcome::Ok { from, .. } if from.parse::<IpAddr>().ok() == Some(ip))
}

/// Waits until the last 25 answers (50 ms at 2 ms) that completed after `since` all came
/// over `ip`; returns when that run began. Fails after `limit` with the last answers.
fn wait_home(log: &Log, since: Instant, ip: IpAddr, limit: Duration) -> anyhow::Result<Instant> {
    const RUN: usize = 25;
    let start = Instant::now();
    loop {
        {
            let recs = lock(log);
            let tail: Vec<&Rec> = recs.iter().rev().take_while(|r| r.done >= since).collect();
            let run: Vec<&&Rec> = tail
                .iter()
                .take_while(|r| is_ok_from(&r.outcome, ip))
                .collect();
            if run.len() >= RUN {
                return Ok(run.last().map(|r| r.done).unwrap_or(since));
            }
            if start.elapsed() > limit {
                let last: Vec<String> = tail.iter().take(8).map(|r| r.outcome.short()).collect();
                bail!(
                    "traffic did not come back over {ip} within {limit:?}; last answers \
                     (newest first): {last:?}"
                );
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Debug, Default)]
struct Trial {
    /// Event → end of the first 200 over the new uplink.
    latency: Option<Duration>,
    /// Requests that failed (sent before that 200 arrived, finished after the event).
    failed: usize,
    /// Failed requests by outcome: how long each took (sent → done).
    by_kind: std::collections::BTreeMap<String, Vec<Duration>>,
    /// Time the `down` command took (spawn → exit).
    cmd: Duration,
    /// Restore → first 200 over the old uplink again.
    back: Option<Duration>,
}

fn failover(f: &Failover, trials: usize, aim: (f64, f64)) -> anyhow::Result<()> {
    let log: Log = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
    let stop = Arc::new(AtomicBool::new(false));
    let gen_thread = generator(f, log.clone(), stop.clone());
    let result = failover_trials(f, trials, &log);
    stop.store(true, Ordering::Relaxed);
    let _ = gen_thread.join();
    let done = result?;
    let sent: usize = lock(&log).len();

    let lat: Vec<Duration> = done.iter().filter_map(|t| t.latency).collect();
    let missed = done.len() - lat.len();
    let label = &f.label;
    match summarize(&lat) {
        Some(s) => {
            let (med, p95, max) = (ms(s.median), ms(s.p95), ms(s.max));
            let met = med <= aim.0 && max <= aim.1 && missed == 0;
            println!(
                "| {label}: event → first 200 over the new uplink | {} | {med:.1} ms | {p95:.1} ms | {max:.1} ms | ≤ {} ms median, ≤ {} ms max | {} |",
                s.n,
                aim.0,
                aim.1,
                if met { "yes" } else { "**no**" }
            );
        }
        None => println!(
            "| {label}: event → first 200 over the new uplink | 0 | — | — | — | ≤ {} ms median, ≤ {} ms max | **no** (never failed over) |",
            aim.0, aim.1
        ),
    }
    let failed: Vec<f64> = done.iter().map(|t| t.failed as f64).collect();
    if let Some(s) = summarize_f64(&failed) {
        println!(
            "| {label}: requests failed in between | {} | {} | {} | {} | — | — |",
            s.n, s.median, s.p95, s.max
        );
    }
    if missed > 0 {
        println!(
            "note: {label}: {missed} of {} trials got no 200 over {} within {:?} of the event.",
            done.len(),
            f.to_ip,
            f.give_up
        );
    }
    let mut kinds = std::collections::BTreeMap::<String, Vec<Duration>>::new();
    for t in &done {
        for (k, took) in &t.by_kind {
            kinds.entry(k.clone()).or_default().extend(took);
        }
    }
    let cmd: Vec<f64> = done.iter().map(|t| ms(t.cmd)).collect();
    let back: Vec<Duration> = done.iter().filter_map(|t| t.back).collect();
    let back = summarize(&back)
        .map(|s| format!("median {:.0} ms, max {:.0} ms", ms(s.median), ms(s.max)))
        .unwrap_or_else(|| "—".into());
    println!(
        "note: {label}: failed requests by kind over all trials: {}; the triggering command \
         itself took median {:.1} ms (included); after the restore, traffic was back over {} \
         after {back} (dwell included); {sent} requests in all.",
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds
                .iter()
                .map(|(k, took)| {
                    let s = summarize(took).expect("a kind has requests");
                    format!(
                        "{k} × {} (answered/abandoned {:.0}–{:.0} ms after sending, median {:.0} ms)",
                        s.n,
                        ms(took.iter().min().copied().unwrap_or_default()),
                        ms(s.max),
                        ms(s.median)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        summarize_f64(&cmd).map(|s| s.median).unwrap_or(0.0),
        f.from_ip,
    );
    Ok(())
}

fn failover_trials(f: &Failover, trials: usize, log: &Log) -> anyhow::Result<Vec<Trial>> {
    let mut out = Vec::new();
    // Start each trial idle: traffic over the old uplink, then the settle pause.
    wait_home(log, Instant::now(), f.from_ip, Duration::from_secs(30))
        .context("before the first trial")?;
    for i in 1..=trials {
        thread::sleep(f.settle);
        let base = lock(log).len();
        let t0 = Instant::now();
        run(&f.down)?;
        let cmd = t0.elapsed();
        // The first 200 over the new uplink that finished after the event.
        let mut first: Option<Instant> = None;
        while first.is_none() && t0.elapsed() < f.give_up {
            thread::sleep(Duration::from_millis(2));
            let recs = lock(log);
            first = recs[base..]
                .iter()
                .filter(|r| r.done >= t0 && is_ok_from(&r.outcome, f.to_ip))
                .map(|r| r.done)
                .min();
        }
        // Let every request sent before it finish (answer or deadline).
        thread::sleep(f.timeout + Duration::from_millis(50));
        let mut t = Trial {
            cmd,
            ..Trial::default()
        };
        let end = first.unwrap_or_else(Instant::now);
        {
            let recs = lock(log);
            for r in recs[base..]
                .iter()
                .filter(|r| r.done >= t0 && r.sent <= end)
            {
                if !matches!(r.outcome, Outcome::Ok { .. }) {
                    t.failed += 1;
                    t.by_kind
                        .entry(r.outcome.short())
                        .or_default()
                        .push(r.done - r.sent);
                }
            }
        }
        t.latency = first.map(|d| d - t0);
        let restore = Instant::now();
        run(&f.up)?;
        let back = wait_home(log, restore, f.from_ip, Duration::from_secs(30))
            .with_context(|| format!("{}: after trial {i}", f.label))?;
        t.back = Some(back.saturating_duration_since(restore));
        eprintln!(
            "  {} trial {i}: {} ; {} failed {:?}; command {:.1} ms; back over {} after {:.0} ms",
            f.label,
            t.latency
                .map(|d| format!("{:.1} ms", ms(d)))
                .unwrap_or_else(|| "NO FAILOVER".into()),
            t.failed,
            t.by_kind
                .iter()
                .map(|(k, v)| format!("{k} × {}", v.len()))
                .collect::<Vec<_>>(),
            ms(t.cmd),
            f.from_ip,
            ms(t.back.unwrap_or_default()),
        );
        out.push(t);
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------
// boot

// The arguments of `boot`.
#[derive(Debug, clap::Args)]
struct Boot {
    #[arg(long, default_value_t = 20)]
    trials: usize,
    #[arg(long, default_value = "127.0.0.1:15001")]
    target: SocketAddr,
    #[arg(long, default_value = "/diagnostics")]
    path: String,
    /// The vehicle service answers from this client IP (Envoy on loopback).
    #[arg(long, default_value = "127.0.0.1")]
    expect_from: IpAddr,
    #[arg(long, default_value_t = 2)]
    interval_ms: u64,
    #[arg(long, default_value_t = 200)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 10)]
    give_up_s: u64,
    #[arg(long)]
    netd: PathBuf,
    #[arg(long)]
    netd_config: PathBuf,
    /// edge-netd's `state_dir`, wiped before every trial.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    envoy: PathBuf,
    #[arg(long)]
    envoy_config: PathBuf,
    /// Per-trial logs of edge-netd and Envoy go here.
    #[arg(long)]
    log_dir: PathBuf,
    #[arg(long, default_value_t = 1000.0)]
    aim_median_ms: f64,
    #[arg(long, default_value_t = 1000.0)]
    aim_max_ms: f64,
}

/// Kills the child on drop (SIGKILL) and reaps it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_logged(cmd: &mut Command, log: PathBuf) -> anyhow::Result<Guard> {
    let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    Ok(Guard(child))
}

fn tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn boot(b: &Boot) -> anyhow::Result<()> {
    let (trials, aim) = (b.trials, (b.aim_median_ms, b.aim_max_ms));
    let req = get_request(&b.target, &b.path);
    let interval = Duration::from_millis(b.interval_ms);
    let timeout = Duration::from_millis(b.timeout_ms);
    let give_up = Duration::from_secs(b.give_up_s);
    std::fs::create_dir_all(&b.log_dir)?;
    let mut from_envoy = Vec::new();
    let mut from_netd = Vec::new();
    let mut failures = Vec::new();
    for i in 1..=trials {
        match std::fs::remove_dir_all(&b.state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("wipe the state dir"),
        }
        std::fs::create_dir_all(&b.state_dir)?;
        let netd_log = b.log_dir.join(format!("boot-{i}-edge-netd.log"));
        let envoy_log = b.log_dir.join(format!("boot-{i}-envoy.log"));
        let t_netd = Instant::now();
        let mut netd = spawn_logged(
            Command::new(&b.netd)
                .arg("--config")
                .arg(&b.netd_config)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
            netd_log.clone(),
        )?;
        let t_envoy = Instant::now();
        let mut envoy = spawn_logged(
            Command::new(&b.envoy).arg("-c").arg(&b.envoy_config).args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "info",
            ]),
            envoy_log.clone(),
        )?;
        let mut polls = 0u32;
        let mut last = Outcome::Refused;
        let ok = loop {
            let sent = Instant::now();
            let o = request(b.target, &req, timeout);
            polls += 1;
            if matches!(&o, Outcome::Ok { from, path }
                if from.parse::<IpAddr>().ok() == Some(b.expect_from) && path.starts_with(&b.path))
            {
                break Some(Instant::now());
            }
            last = o;
            if t_envoy.elapsed() > give_up {
                break None;
            }
            for (what, g) in [("edge-netd", &mut netd), ("Envoy", &mut envoy)] {
                if let Ok(Some(status)) = g.0.try_wait() {
                    bail!(
                        "offline boot trial {i}: {what} exited ({status}); edge-netd log:\n{}\n\
                         Envoy log:\n{}",
                        tail(&netd_log, 20),
                        tail(&envoy_log, 20)
                    );
                }
            }
            if let Some(rest) = (sent + interval).checked_duration_since(Instant::now()) {
                thread::sleep(rest);
            }
        };
        // Envoy first, so its xDS connection is closed from its side.
        drop(envoy);
        drop(netd);
        match ok {
            Some(at) => {
                eprintln!(
                    "  offline boot trial {i}: Envoy start → 200 {:.1} ms (edge-netd start → \
                     200 {:.1} ms), {polls} polls",
                    ms(at - t_envoy),
                    ms(at - t_netd)
                );
                from_envoy.push(at - t_envoy);
                from_netd.push(at - t_netd);
            }
            None => {
                eprintln!(
                    "  offline boot trial {i}: no 200 within {:?}; last answer {}; logs in {}",
                    give_up,
                    last.short(),
                    b.log_dir.display()
                );
                failures.push(format!("trial {i}: last answer {}", last.short()));
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let row = |label: &str, xs: &[Duration], aimed: bool| match summarize(xs) {
        Some(s) => {
            let (med, p95, max) = (ms(s.median), ms(s.p95), ms(s.max));
            let (aim_txt, met) = if aimed {
                let met = med <= aim.0 && max <= aim.1 && failures.is_empty();
                (
                    format!("≤ {} ms", aim.1),
                    if met { "yes" } else { "**no**" }.to_string(),
                )
            } else {
                ("—".into(), "—".into())
            };
            println!(
                "| {label} | {} | {med:.1} ms | {p95:.1} ms | {max:.1} ms | {aim_txt} | {met} |",
                s.n
            );
        }
        None => println!("| {label} | 0 | — | — | — | — | **no** (never answered) |"),
    };
    row(
        &format!("offline boot: Envoy start → first 200 `GET {}`", b.path),
        &from_envoy,
        true,
    );
    row(
        &format!("offline boot: edge-netd start → first 200 `GET {}`", b.path),
        &from_netd,
        false,
    );
    if !failures.is_empty() {
        println!(
            "note: offline boot: {} of {trials} trials never answered within {:?}: {}",
            failures.len(),
            give_up,
            failures.join("; ")
        );
    }
    Ok(())
}
