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
//!   then it runs `--up` and waits for traffic to come back over `--from-ip`. With
//!   `--long-interval-ms`, a second app (same kind, its own schedule) sends with a
//!   `--long-timeout-ms` deadline, longer than the class timeout: its requests sent from
//!   `--long-lead-ms` before the event to that first 200 are the "caught" ones, and the
//!   event is held until every one of them has finished, so none is rescued by the
//!   restore.
//! - `boot`: offline boot. Per trial: wipe edge-netd's state dir, spawn edge-netd, then at
//!   once Envoy, and time Envoy's spawn → the end of the first 200 from the vehicle-local
//!   service through Envoy (a new connection every `--interval-ms`); kill both.
//!
//! Results are Markdown table rows on stdout (`| measurement | n | median | p95 | max |
//! aim | met |`), lines starting `note:` for the notes under the table, `failover` also
//! `cmp<TAB>mode<TAB>measurement<TAB>n<TAB>median<TAB>p95<TAB>max` lines (every failover
//! figure, for a table comparing modes), and every sample on stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use misaki_bench::stats::{Summary, summarize, summarize_f64};
use misaki_harness::Process;
use misaki_harness::http::Headers;

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
    Failover(FailoverArgs),
    /// Offline boot: edge-netd + Envoy started together → first 200 from a vehicle service.
    Boot(Boot),
}

// The arguments of `failover`.
#[derive(Debug, clap::Args)]
struct FailoverArgs {
    /// Row label, e.g. "carrier loss".
    #[arg(long)]
    label: String,
    /// The setup measured (e.g. edge-netd's failover mode), named in rows and notes.
    #[arg(long, default_value = "")]
    mode: String,
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
    /// The long-deadline app: a new request every this many ms (0: no such app).
    #[arg(long, default_value_t = 0)]
    long_interval_ms: u64,
    /// The long-deadline app's deadline.
    #[arg(long, default_value_t = 7000)]
    long_timeout_ms: u64,
    /// Its requests sent from this long before the event are caught ones.
    #[arg(long, default_value_t = 100)]
    long_lead_ms: u64,
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
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Echo { listen } => echo(listen),
        Cmd::Failover(a) => {
            let long = (a.long_interval_ms > 0).then(|| LongApp {
                interval: Duration::from_millis(a.long_interval_ms),
                timeout: Duration::from_millis(a.long_timeout_ms),
                lead: Duration::from_millis(a.long_lead_ms),
            });
            let f = Failover {
                label: a.label,
                mode: a.mode,
                target: a.target,
                request: get_request(&a.target, &a.path),
                interval: Duration::from_millis(a.interval_ms),
                timeout: Duration::from_millis(a.timeout_ms),
                long,
                from_ip: a.from_ip,
                to_ip: a.to_ip,
                down: argv(&a.down)?,
                up: argv(&a.up)?,
                settle: Duration::from_millis(a.settle_ms),
                give_up: Duration::from_secs(a.give_up_s),
            };
            failover(&f, a.trials, (a.aim_median_ms, a.aim_max_ms))
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
    /// Any other answer; `x-misaki-reason` if present, else what the body says (Envoy's
    /// local replies: `upstream request timeout`, `reset reason: connection timeout`).
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
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        return Some(Outcome::Status(
            status,
            reason.or_else(|| body_reason(&text)),
        ));
    }
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

/// The gist of an error body: Envoy's `upstream connect error or disconnect/reset before
/// headers. reset reason: connection timeout` → `reset reason: connection timeout`; else
/// its first line, at most 60 characters.
fn body_reason(text: &str) -> Option<String> {
    let gist = match text.find("reset reason: ") {
        Some(i) => &text[i..],
        None => text.lines().next().unwrap_or(""),
    };
    let gist: String = gist.trim().chars().take(60).collect();
    (!gist.is_empty()).then_some(gist)
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
    mode: String,
    target: SocketAddr,
    request: Arc<[u8]>,
    interval: Duration,
    timeout: Duration,
    long: Option<LongApp>,
    from_ip: IpAddr,
    to_ip: IpAddr,
    down: Vec<String>,
    up: Vec<String>,
    settle: Duration,
    give_up: Duration,
}

/// The second app: a deadline longer than the class timeout, so it sees how the requests
/// caught by the event end when nobody gives up on them early.
#[derive(Debug, Clone, Copy)]
struct LongApp {
    interval: Duration,
    timeout: Duration,
    /// Its requests sent from this long before the event count as caught.
    lead: Duration,
}

impl Failover {
    /// The label with the mode: "silent blackhole, mode retry".
    fn name(&self) -> String {
        if self.mode.is_empty() {
            self.label.clone()
        } else {
            format!("{}, mode {}", self.label, self.mode)
        }
    }
}

/// One finished request; appended in completion order.
#[derive(Debug, Clone)]
struct Rec {
    sent: Instant,
    done: Instant,
    outcome: Outcome,
}

/// An app's requests: the finished ones, in completion order, and the ones still running
/// (sequence number → sent).
#[derive(Debug, Default)]
struct Requests {
    done: Mutex<Vec<Rec>>,
    running: Mutex<BTreeMap<u64, Instant>>,
}

type Log = Arc<Requests>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Requests {
    /// Whether every request sent at or before `t` has finished.
    fn finished_up_to(&self, t: Instant) -> bool {
        lock(&self.running)
            .first_key_value()
            .is_none_or(|(_, sent)| *sent > t)
    }
}

/// At most this many requests of one app run at once (a thread each); a request due
/// while as many run is not sent and is recorded as an error.
const MAX_RUNNING: usize = 1000;

/// An app: starts a request every `interval` (from a schedule, not from the last answer)
/// until `stop`. Each runs on a thread of its own, so a request stuck on a dead uplink
/// never delays the next one.
fn generator(
    target: SocketAddr,
    req: Arc<[u8]>,
    interval: Duration,
    timeout: Duration,
    log: Log,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut next = Instant::now();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let sent = Instant::now();
            seq += 1;
            let id = seq;
            {
                let mut running = lock(&log.running);
                if running.len() >= MAX_RUNNING {
                    drop(running);
                    lock(&log.done).push(Rec {
                        sent,
                        done: sent,
                        outcome: Outcome::Error(format!(
                            "not sent: {MAX_RUNNING} requests of this app running"
                        )),
                    });
                    next += interval;
                    continue;
                }
                running.insert(id, sent);
            }
            let (log2, req2) = (log.clone(), req.clone());
            let spawned = thread::Builder::new().stack_size(64 << 10).spawn(move || {
                let outcome = request(target, &req2, timeout);
                let done = Instant::now();
                // Recorded before it stops running: whoever sees it finished finds it.
                lock(&log2.done).push(Rec {
                    sent,
                    done,
                    outcome,
                });
                lock(&log2.running).remove(&id);
            });
            if let Err(e) = spawned {
                lock(&log.done).push(Rec {
                    sent,
                    done: Instant::now(),
                    outcome: Outcome::Error(format!("client could not spawn a thread: {e}")),
                });
                lock(&log.running).remove(&id);
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
            let recs = lock(&log.done);
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
    by_kind: BTreeMap<String, Vec<Duration>>,
    /// Time the `down` command took (spawn → exit).
    cmd: Duration,
    /// Restore → first 200 over the old uplink again.
    back: Option<Duration>,
    /// Event → restore.
    held: Duration,
    /// The long-deadline app's requests caught by the event.
    caught: Caught,
}

/// The long-deadline app's requests sent in [event − lead, first 200 over the new
/// uplink], by how they ended; each with how long it took (sent → answer or deadline).
#[derive(Debug, Default)]
struct Caught {
    /// Answered 200, by the client IP the cloud saw (the uplink that carried it).
    ok: BTreeMap<String, Vec<Duration>>,
    /// Anything else, by outcome.
    failed: BTreeMap<String, Vec<Duration>>,
    /// Still running when the hold gave up (in neither of the above).
    unfinished: usize,
}

impl Caught {
    fn n_ok(&self) -> usize {
        self.ok.values().map(Vec::len).sum()
    }
    fn n_failed(&self) -> usize {
        self.failed.values().map(Vec::len).sum::<usize>() + self.unfinished
    }
}

/// Every duration in a by-outcome map.
fn all(m: &BTreeMap<String, Vec<Duration>>) -> impl Iterator<Item = Duration> + '_ {
    m.values().flatten().copied()
}

/// Merges per-trial by-outcome maps.
fn merged<'a>(
    maps: impl Iterator<Item = &'a BTreeMap<String, Vec<Duration>>>,
) -> BTreeMap<String, Vec<Duration>> {
    let mut out = BTreeMap::<String, Vec<Duration>>::new();
    for m in maps {
        for (k, v) in m {
            out.entry(k.clone()).or_default().extend(v);
        }
    }
    out
}

/// `timeout × 19 (254–288 ms after sending, median 268 ms), …`.
fn kinds_text(kinds: &BTreeMap<String, Vec<Duration>>, prefix: &str) -> String {
    if kinds.is_empty() {
        return "none".into();
    }
    kinds
        .iter()
        .map(|(k, took)| {
            let s = summarize(took).expect("a kind has requests");
            format!(
                "{prefix}{k} × {} ({}–{} after sending, median {})",
                s.n,
                dur(took.iter().min().copied().unwrap_or_default()),
                dur(s.max),
                dur(s.median)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `5.0 ms` below a second, `2.53 s` above.
fn dur(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", ms(d))
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// A deadline for a label: `250 ms`, `7 s`.
fn deadline(d: Duration) -> String {
    if d.subsec_millis() == 0 && d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A `cmp` line (see the module doc): durations.
fn cmp_durations(mode: &str, what: &str, xs: &[Duration]) {
    match summarize(xs) {
        Some(s) => println!(
            "cmp\t{mode}\t{what}\t{}\t{}\t{}\t{}",
            s.n,
            dur(s.median),
            dur(s.p95),
            dur(s.max)
        ),
        None => println!("cmp\t{mode}\t{what}\t0\t—\t—\t—"),
    }
}

/// A `cmp` line: counts.
fn cmp_counts(mode: &str, what: &str, xs: &[f64]) {
    match summarize_f64(xs) {
        Some(Summary {
            n,
            median,
            p95,
            max,
        }) => println!("cmp\t{mode}\t{what}\t{n}\t{median}\t{p95}\t{max}"),
        None => println!("cmp\t{mode}\t{what}\t0\t—\t—\t—"),
    }
}

/// One app: its requests, and the flag that stops its schedule.
struct App {
    log: Log,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl App {
    fn start(f: &Failover, interval: Duration, timeout: Duration) -> App {
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = generator(
            f.target,
            f.request.clone(),
            interval,
            timeout,
            log.clone(),
            stop.clone(),
        );
        App { log, stop, thread }
    }

    /// Stops starting requests (those running are left to finish or be dropped at exit).
    fn stop(self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.log
    }
}

fn failover(f: &Failover, trials: usize, aim: (f64, f64)) -> anyhow::Result<()> {
    let app = App::start(f, f.interval, f.timeout);
    let long_app = f.long.map(|l| App::start(f, l.interval, l.timeout));
    let result = failover_trials(f, trials, &app.log, long_app.as_ref().map(|a| &a.log));
    let log = app.stop();
    let long_log = long_app.map(App::stop);
    let done = result?;
    let sent: usize = lock(&log.done).len();

    let (label, name, mode) = (&f.label, f.name(), f.mode.as_str());
    let lat: Vec<Duration> = done.iter().filter_map(|t| t.latency).collect();
    let missed = done.len() - lat.len();
    match summarize(&lat) {
        Some(s) => {
            let (med, p95, max) = (ms(s.median), ms(s.p95), ms(s.max));
            let met = med <= aim.0 && max <= aim.1 && missed == 0;
            println!(
                "| {name}: event → first 200 over the new uplink | {} | {med:.1} ms | {p95:.1} ms | {max:.1} ms | ≤ {} ms median, ≤ {} ms max | {} |",
                s.n,
                aim.0,
                aim.1,
                if met { "yes" } else { "**no**" }
            );
        }
        None => println!(
            "| {name}: event → first 200 over the new uplink | 0 | — | — | — | ≤ {} ms median, ≤ {} ms max | **no** (never failed over) |",
            aim.0, aim.1
        ),
    }
    cmp_durations(
        mode,
        &format!("{label}: event → first 200 over the new uplink"),
        &lat,
    );
    let failed: Vec<f64> = done.iter().map(|t| t.failed as f64).collect();
    cmp_counts(
        mode,
        &format!(
            "{label}: requests failed in between, {} deadline (per trial)",
            deadline(f.timeout)
        ),
        &failed,
    );
    if missed > 0 {
        println!(
            "note: {name}: {missed} of {} trials got no 200 over {} within {:?} of the event.",
            done.len(),
            f.to_ip,
            f.give_up
        );
    }
    let cmd: Vec<f64> = done.iter().map(|t| ms(t.cmd)).collect();
    let back: Vec<Duration> = done.iter().filter_map(|t| t.back).collect();
    let back = summarize(&back)
        .map(|s| format!("median {:.0} ms, max {:.0} ms", ms(s.median), ms(s.max)))
        .unwrap_or_else(|| "—".into());
    println!(
        "note: {name}: failed requests ({} deadline) by kind over all trials: {}; the \
         triggering command itself took median {:.1} ms (included); after the restore, \
         traffic was back over {} after {back} (dwell included); {sent} requests in all.",
        deadline(f.timeout),
        kinds_text(&merged(done.iter().map(|t| &t.by_kind)), ""),
        summarize_f64(&cmd).map(|s| s.median).unwrap_or(0.0),
        f.from_ip,
    );

    if let (Some(l), Some(long_log)) = (f.long, long_log) {
        let dl = deadline(l.timeout);
        let per_trial = |k: &dyn Fn(&Caught) -> usize| -> Vec<f64> {
            done.iter().map(|t| k(&t.caught) as f64).collect()
        };
        let what = |w: &str| format!("{label}, {dl} deadline: {w}");
        cmp_counts(
            mode,
            &what("caught (per trial)"),
            &per_trial(&|c| c.n_ok() + c.n_failed()),
        );
        cmp_counts(
            mode,
            &what("caught, answered 200 (per trial)"),
            &per_trial(&Caught::n_ok),
        );
        let to = f.to_ip.to_string();
        cmp_counts(
            mode,
            &what("caught, answered 200 over the new uplink (per trial)"),
            &per_trial(&|c| c.ok.get(&to).map_or(0, Vec::len)),
        );
        cmp_counts(
            mode,
            &what("caught, failed (per trial)"),
            &per_trial(&Caught::n_failed),
        );
        let ok = merged(done.iter().map(|t| &t.caught.ok));
        let bad = merged(done.iter().map(|t| &t.caught.failed));
        let every: Vec<Duration> = all(&ok).chain(all(&bad)).collect();
        cmp_durations(mode, &what("latency of the caught (all trials)"), &every);
        cmp_durations(
            mode,
            &what("latency of the caught answered 200 over the new uplink (all trials)"),
            ok.get(&to).map_or(&[][..], Vec::as_slice),
        );
        cmp_durations(
            mode,
            &what("latency of the caught that failed (all trials)"),
            &all(&bad).collect::<Vec<_>>(),
        );
        let unfinished: usize = done.iter().map(|t| t.caught.unfinished).sum();
        let held: Vec<Duration> = done.iter().map(|t| t.held).collect();
        let held = summarize(&held)
            .map(|s| format!("median {}, max {}", dur(s.median), dur(s.max)))
            .unwrap_or_else(|| "—".into());
        println!(
            "note: {name}: the {dl}-deadline app (a new request every {} ms): caught requests \
             answered 200 {}; failed {}{}; the event was held {held} (until every caught \
             request had finished); {} requests in all.",
            l.interval.as_millis(),
            kinds_text(&ok, "from "),
            kinds_text(&bad, ""),
            if unfinished > 0 {
                format!(", and {unfinished} still unanswered when the hold gave up")
            } else {
                String::new()
            },
            lock(&long_log.done).len(),
        );
    }
    Ok(())
}

fn failover_trials(
    f: &Failover,
    trials: usize,
    log: &Log,
    long: Option<&Log>,
) -> anyhow::Result<Vec<Trial>> {
    let mut out = Vec::new();
    // Start each trial idle: traffic over the old uplink, then the settle pause.
    wait_home(log, Instant::now(), f.from_ip, Duration::from_secs(30))
        .context("before the first trial")?;
    for i in 1..=trials {
        // Taken before the pause: a caught request sent before the event may have
        // finished before it, too.
        let long_base = long.map_or(0, |l| lock(&l.done).len());
        thread::sleep(f.settle);
        let base = lock(&log.done).len();
        let t0 = Instant::now();
        run(&f.down)?;
        let cmd = t0.elapsed();
        // The first 200 over the new uplink that finished after the event.
        let mut first: Option<Instant> = None;
        while first.is_none() && t0.elapsed() < f.give_up {
            thread::sleep(Duration::from_millis(2));
            let recs = lock(&log.done);
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
            let recs = lock(&log.done);
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
        if let (Some(l), Some(long)) = (f.long, long) {
            // Hold the event until every caught request has finished: restored earlier,
            // the dead uplink could still carry a request hanging on it (a SYN or a
            // segment retransmitted after the restore), which no real outage would do.
            let limit = end + l.timeout + Duration::from_secs(1);
            while !long.finished_up_to(end) && Instant::now() < limit {
                thread::sleep(Duration::from_millis(5));
            }
            let from = t0.checked_sub(l.lead).unwrap_or(t0);
            let caught = |sent: Instant| sent >= from && sent <= end;
            for r in lock(&long.done)[long_base..]
                .iter()
                .filter(|r| caught(r.sent))
            {
                let took = r.done - r.sent;
                match &r.outcome {
                    Outcome::Ok { from, .. } => t.caught.ok.entry(from.clone()),
                    o => t.caught.failed.entry(o.short()),
                }
                .or_default()
                .push(took);
            }
            t.caught.unfinished = lock(&long.running).values().filter(|s| caught(**s)).count();
        }
        t.latency = first.map(|d| d - t0);
        let restore = Instant::now();
        t.held = restore - t0;
        run(&f.up)?;
        let back = wait_home(log, restore, f.from_ip, Duration::from_secs(30))
            .with_context(|| format!("{}: after trial {i}", f.name()))?;
        t.back = Some(back.saturating_duration_since(restore));
        eprintln!(
            "  {} trial {i}: {} ; {} failed {:?}; {}command {:.1} ms; held {:.0} ms; back over \
             {} after {:.0} ms",
            f.name(),
            t.latency
                .map(|d| format!("{:.1} ms", ms(d)))
                .unwrap_or_else(|| "NO FAILOVER".into()),
            t.failed,
            t.by_kind
                .iter()
                .map(|(k, v)| format!("{k} × {}", v.len()))
                .collect::<Vec<_>>(),
            match f.long {
                Some(l) => format!(
                    "{} deadline: {} caught, {} ok {:?}, {} failed {:?}; ",
                    deadline(l.timeout),
                    t.caught.n_ok() + t.caught.n_failed(),
                    t.caught.n_ok(),
                    t.caught
                        .ok
                        .iter()
                        .map(|(k, v)| format!(
                            "{k} × {} (max {:.0} ms)",
                            v.len(),
                            ms(*v.iter().max().expect("non-empty"))
                        ))
                        .collect::<Vec<_>>(),
                    t.caught.n_failed(),
                    t.caught
                        .failed
                        .iter()
                        .map(|(k, v)| format!("{k} × {}", v.len()))
                        .collect::<Vec<_>>(),
                ),
                None => String::new(),
            },
            ms(t.cmd),
            ms(t.held),
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
        let mut netd = Process::try_spawn(
            "edge-netd",
            Command::new(&b.netd)
                .arg("--config")
                .arg(&b.netd_config)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
            netd_log.clone(),
        )?;
        let t_envoy = Instant::now();
        let mut envoy = Process::try_spawn(
            "Envoy",
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
            let exited = [("edge-netd", &mut netd), ("Envoy", &mut envoy)]
                .into_iter()
                .find_map(|(what, g)| Some((what, g.try_wait()?)));
            if let Some((what, status)) = exited {
                bail!(
                    "offline boot trial {i}: {what} exited ({status}); edge-netd log:\n{}\n\
                     Envoy log:\n{}",
                    netd.log_tail(20),
                    envoy.log_tail(20)
                );
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
