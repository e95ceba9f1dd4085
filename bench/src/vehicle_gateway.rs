//! `edit-latency vehicle-gateway`: the cloud → vehicle figures of issue 13, in one run,
//! against the loopback lab of `misaki_e2e::gateway` (the real misaki-cp, edge-netd on
//! `lo` with a power file, the vehicle's Envoy fed by edge-netd, a cloud sidecar Envoy
//! fed by misaki-cp with a `vehicle_gateway` listener). Run it through
//! `bench/vehicle_gateway.sh`.
//!
//! 1. Latency: sequential `GET /diag/status` on one kept-alive HTTP/1.1 connection each
//!    way, interleaved: (a) to the vehicle's `diag` upstream directly, (b) to the cloud
//!    gateway with `x-misaki-target-vehicle: car-1` (cloud Envoy → the reverse tunnel
//!    the vehicle Envoy dialled → vehicle Envoy → `diag`).
//! 2. Offline: SIGKILL edge-netd at T0 (its fleet stream ends with its socket), or
//!    SIGSTOP it (silent: the registry waits 3 heartbeats), then poll (each poller a
//!    thread, a new connection per poll, every `--poll-ms`) misaki-cp's `/fleet/car-1`
//!    until `online` is false (T1) and the gateway's `GET /cam/frame` until `503` with
//!    `x-misaki-reason: vehicle-offline` (T2); then restart (SIGCONT) edge-netd and
//!    time it back.
//! 3. Power: write `low` (then `on`) to the power file at T0 and poll the registry's
//!    `power`, a call on the vehicle (its Envoy's outbound port, `/diag/x`) and a gateway
//!    call (`/diag/status`) until both calls reach the replica (back: the vehicle).
//!
//! Prints Markdown on stdout, progress and every sample on stderr. Every process is
//! owned by the lab's guards, killed when it drops (also on an error or a panic).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use misaki_e2e::gateway::{GatewayLab, POWER_INTERVAL, TARGET_HEADER, VEHICLE};
use misaki_harness::http::Headers;
use misaki_harness::procfs;
use rand::Rng;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measured requests per path (direct, through the gateway).
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Unmeasured requests per path first.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Trials per transition (offline and back; power low and back).
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Interval of the transition pollers, in ms (paced from each poll's start).
    #[arg(long, default_value_t = 5)]
    pub poll_ms: u64,
    /// Give up on one transition after this many seconds.
    #[arg(long, default_value_t = 20)]
    pub give_up_s: u64,
    /// Keep the lab's directory (configs, process logs) and print its path.
    #[arg(long)]
    pub keep_logs: bool,
}

const DIAG: &str = "/diag/status";
const VEHICLE_DIAG: &str = "/diag/x";
const CAM: &str = "/cam/frame";
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What one HTTP answer said: status, `x-misaki-reason`, and who answered (the first
/// word of the body: the upstream's name).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    reason: String,
    who: String,
}

impl Answer {
    fn from(who: &str) -> impl Fn(&Answer) -> bool + '_ {
        move |a| a.status == 200 && a.who == who
    }
}

fn first_word(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// One kept-alive HTTP/1.1 connection sending the same GET; reconnects (and counts it)
/// if the peer closes.
struct KeepAlive {
    port: u16,
    request: Vec<u8>,
    conn: Option<BufReader<TcpStream>>,
    connects: u32,
}

impl KeepAlive {
    fn new(port: u16, path: &str, headers: &[(&str, &str)]) -> KeepAlive {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nuser-agent: misaki-bench\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        KeepAlive {
            port,
            request: req.into_bytes(),
            conn: None,
            connects: 0,
        }
    }

    fn get(&mut self) -> anyhow::Result<Answer> {
        let r = self.try_get();
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self) -> anyhow::Result<Answer> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(READ_TIMEOUT))?;
            self.conn = Some(BufReader::new(s));
            self.connects += 1;
        }
        let r = self.conn.as_mut().expect("connected above");
        r.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let headers = Headers::read(r)?.context("connection closed in the headers")?;
        let len: usize = headers
            .get("content-length")
            .context("no content-length")?
            .parse()?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        if headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.conn = None;
        }
        Ok(Answer {
            status,
            reason: headers.get("x-misaki-reason").unwrap_or_default().into(),
            who: first_word(&body),
        })
    }
}

/// One `GET path` to `port` on a new connection, as a new caller sees the listener:
/// read the answer (by its `content-length`), then close. `None` on a transport error.
///
/// Not `misaki_harness::http::request`: it asks `connection: close` and reads to EOF,
/// and after one of its own replies (the gateway's `503 vehicle-offline`, `400`, ...)
/// Envoy waits for the client to close first, up to its `delayed_close_timeout`
/// (1 s): such a poll took ~1.00 s (a proxied answer ~2 ms).
fn call(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<Answer> {
    KeepAlive::new(port, path, headers).get().ok()
}

fn via_gateway(lab: &GatewayLab, path: &str) -> Option<Answer> {
    call(lab.ports.gateway, path, &[(TARGET_HEADER, VEHICLE)])
}

fn on_vehicle(lab: &GatewayLab, path: &str) -> Option<Answer> {
    call(lab.ports.outbound, path, &[])
}

/// `/fleet/car-1`'s field `key` as text (`"true"`, `"low"`), if misaki-cp answers.
fn fleet(lab: &GatewayLab, key: &str) -> Option<String> {
    let v = lab.fleet_record()?;
    let f = &v[key];
    Some(
        f.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| f.to_string()),
    )
}

/// A condition a poller waits for.
type Check<'a> = Box<dyn Fn() -> bool + Send + Sync + 'a>;

/// An answer a transition poller expects: 200 from an upstream (by name), or Envoy's own
/// status with an `x-misaki-reason`.
#[derive(Debug, Clone, Copy)]
enum Is<'a> {
    From(&'a str),
    Reason(u16, &'a str),
}

impl Is<'_> {
    fn matches(self, a: &Answer) -> bool {
        match self {
            Is::From(who) => a.status == 200 && a.who == who,
            Is::Reason(status, reason) => a.status == status && a.reason == reason,
        }
    }
}

/// Answers a transition's pollers saw that were neither the state before nor the one
/// after (a failed call, a local reply), by kind.
type Odd = Mutex<BTreeMap<String, usize>>;

/// A check on `call` (labelled `label`) that holds once it answers `to`; an answer that
/// is neither `from` nor `to` is counted in `odd`.
fn moves<'a>(
    odd: &'a Odd,
    label: &'a str,
    call: impl Fn() -> Option<Answer> + Send + Sync + 'a,
    from: Is<'a>,
    to: Is<'a>,
) -> Check<'a> {
    Box::new(move || {
        let got = call();
        match &got {
            Some(a) if to.matches(a) => return true,
            Some(a) if from.matches(a) => return false,
            _ => {}
        }
        let kind = match got {
            Some(a) => format!("{label}: {} {} {}", a.status, a.reason, a.who),
            None => format!("{label}: no answer"),
        };
        *odd.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(kind.trim_end().to_string())
            .or_default() += 1;
        false
    })
}

/// Run `act` at T0 (just before it; its result is returned), then poll every check on
/// a thread of its own, every `every` (paced from each poll's start), until it holds or
/// `give_up` has passed since T0. Returns, per check, the time from T0 to the end of the poll that saw it
/// hold (`None`: never, within `give_up`).
fn transition<R>(
    every: Duration,
    give_up: Duration,
    act: impl FnOnce() -> R,
    checks: &[Check<'_>],
) -> (R, Vec<Option<Duration>>) {
    let t0 = Instant::now();
    let acted = act();
    let times = thread::scope(|s| {
        let handles: Vec<_> = checks
            .iter()
            .map(|check| {
                s.spawn(move || {
                    loop {
                        let sent = Instant::now();
                        if check() {
                            return Some(Instant::now() - t0);
                        }
                        if sent - t0 >= give_up {
                            return None;
                        }
                        if let Some(rest) = (sent + every).checked_duration_since(Instant::now()) {
                            thread::sleep(rest);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poller panicked"))
            .collect()
    });
    (acted, times)
}

/// Wait (polling every 10 ms) until every check holds at once, or fail naming `what`.
fn settle(what: &str, give_up: Duration, checks: &[Check<'_>]) -> anyhow::Result<()> {
    let deadline = Instant::now() + give_up;
    while Instant::now() < deadline {
        if checks.iter().all(|c| c()) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(10));
    }
    bail!("{what}: not reached within {give_up:?}")
}

/// Nearest-rank percentile `p` (0..=100) of sorted samples.
fn pct<T: Copy>(sorted: &[T], p: usize) -> T {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_ms(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.2} ms")
    } else if v.abs() < 1000.0 {
        format!("{v:.1} ms")
    } else {
        format!("{:.2} s", v / 1e3)
    }
}

/// Samples of one measured interval (ms; a difference may be negative); `missing`
/// counts trials where an end never came.
#[derive(Default)]
struct Series {
    ms: Vec<f64>,
    missing: usize,
}

impl Series {
    fn push(&mut self, v: Option<f64>) {
        match v {
            Some(v) => self.ms.push(v),
            None => self.missing += 1,
        }
    }

    /// `| n | median | p90 | max |` cells, then the max for an aim check.
    fn cells(&self) -> (String, Option<f64>) {
        let mut s = self.ms.clone();
        s.sort_by(f64::total_cmp);
        let n = if self.missing > 0 {
            format!("{} (+{} never)", s.len(), self.missing)
        } else {
            s.len().to_string()
        };
        if s.is_empty() {
            return (format!("{n} | — | — | —"), None);
        }
        let median = if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        let max = s[s.len() - 1];
        (
            format!(
                "{n} | {} | {} | {}",
                fmt_ms(median),
                fmt_ms(pct(&s, 90)),
                fmt_ms(max)
            ),
            Some(max),
        )
    }

    /// A table row; `aim_ms`: met when every trial ended and the max is within it.
    fn row(&self, label: &str, aim_ms: Option<f64>) -> String {
        let (cells, max) = self.cells();
        let (aim, met) = match aim_ms {
            Some(a) => (
                format!("≤ {}", fmt_ms(a)),
                if self.missing == 0 && max.is_some_and(|m| m <= a) {
                    "yes"
                } else {
                    "**no**"
                },
            ),
            None => ("—".into(), "—"),
        };
        format!("| {label} | {cells} | {aim} | {met} |")
    }
}

/// A sentence on the odd answers of some transitions.
fn odd_line(what: &str, odd: &[&Odd]) -> String {
    let mut all: BTreeMap<String, usize> = BTreeMap::new();
    for o in odd {
        for (k, n) in o.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            *all.entry(k.clone()).or_default() += n;
        }
    }
    if all.is_empty() {
        return format!(
            "{what}: every poll answered either the state before or the state after (no failed call, no other reply)."
        );
    }
    let list: Vec<String> = all.iter().map(|(k, n)| format!("`{k}` × {n}")).collect();
    format!(
        "{what}: polls answered neither the state before nor after: {}.",
        list.join(", ")
    )
}

fn diff(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    Some(ms(a?) - ms(b?))
}

fn both(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    Some(a?.max(b?))
}

/// Figure 1: sorted latencies (µs) of (a) direct and (b) through the gateway, and each
/// side's errors and connections opened.
struct Latency {
    direct: Vec<Duration>,
    gateway: Vec<Duration>,
    errors: [usize; 2],
    connects: [u32; 2],
}

fn latency(lab: &GatewayLab, args: &Args) -> anyhow::Result<Latency> {
    let mut direct = KeepAlive::new(lab.diag.port, DIAG, &[]);
    let mut gateway = KeepAlive::new(lab.ports.gateway, DIAG, &[(TARGET_HEADER, VEHICLE)]);
    let ok = Answer::from("vehicle-diag");
    for _ in 0..args.warmup {
        let (a, b) = (direct.get()?, gateway.get()?);
        if !ok(&a) || !ok(&b) {
            bail!("warm-up: direct {a:?}, gateway {b:?}");
        }
    }
    let mut out = Latency {
        direct: Vec::with_capacity(args.requests),
        gateway: Vec::with_capacity(args.requests),
        errors: [0; 2],
        connects: [0; 2],
    };
    for _ in 0..args.requests {
        for (i, conn) in [&mut direct, &mut gateway].into_iter().enumerate() {
            let t = Instant::now();
            let got = conn.get();
            let d = t.elapsed();
            match got {
                Ok(a) if ok(&a) => {
                    if i == 0 {
                        out.direct.push(d)
                    } else {
                        out.gateway.push(d)
                    }
                }
                _ => out.errors[i] += 1,
            }
        }
    }
    out.connects = [direct.connects, gateway.connects];
    out.direct.sort();
    out.gateway.sort();
    Ok(out)
}

/// How figure 2 takes the vehicle away: SIGKILL edge-netd (its fleet stream ends with
/// its socket; back: start it again), or SIGSTOP it (the stream stays open and silent,
/// the registry waits 3 heartbeats; back: SIGCONT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    Killed,
    Frozen,
}

/// Figure 2, one way of going offline: per trial, take edge-netd away and time the
/// registry and the gateway; bring it back and time them back.
#[derive(Default)]
struct Offline {
    t1: Series,      // T0 → registry offline
    t2: Series,      // T0 → gateway cam 503 vehicle-offline
    t2_t1: Series,   // registry offline → gateway 503
    replica: Series, // T0 → gateway diag answered by the replica
    back_reg: Series,
    back_gw: Series,
    back_gw_reg: Series,
    odd: Odd,
}

/// `kill -<sig> <pid>` (SIGSTOP/SIGCONT for a process of the lab).
fn signal(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

fn offline(lab: &mut GatewayLab, args: &Args) -> anyhow::Result<[Offline; 2]> {
    let every = Duration::from_millis(args.poll_ms);
    let give_up = Duration::from_secs(args.give_up_s);
    let mut out = [Offline::default(), Offline::default()];
    let mut rng = rand::rng();
    for trial in 1..=args.trials {
        for (k, gone) in [Gone::Killed, Gone::Frozen].into_iter().enumerate() {
            settle(
                "online, the gateway reaching cam, before an offline trial",
                give_up,
                &[
                    Box::new(|| fleet(lab, "online").as_deref() == Some("true")),
                    Box::new(|| {
                        via_gateway(lab, CAM).is_some_and(|a| Answer::from("vehicle-cam")(&a))
                    }),
                ],
            )?;
            // Sample every phase of the 200 ms heartbeat.
            thread::sleep(Duration::from_millis(50 + rng.random_range(0..200)));
            let netd = lab.netd.take().context("edge-netd is not running")?;
            let pid = netd.pid();
            let (netd, t) = {
                let lab = &*lab;
                let odd = &out[k].odd;
                transition(
                    every,
                    give_up,
                    move || match gone {
                        Gone::Killed => {
                            drop(netd);
                            None
                        }
                        Gone::Frozen => {
                            signal("STOP", pid);
                            Some(netd)
                        }
                    },
                    &[
                        Box::new(|| fleet(lab, "online").as_deref() == Some("false")),
                        moves(
                            odd,
                            "gateway cam",
                            || via_gateway(lab, CAM),
                            Is::From("vehicle-cam"),
                            Is::Reason(503, "vehicle-offline"),
                        ),
                        moves(
                            odd,
                            "gateway diag",
                            || via_gateway(lab, DIAG),
                            Is::From("vehicle-diag"),
                            Is::From("replica-diag"),
                        ),
                    ],
                )
            };
            let m = &mut out[k];
            let f = |d: Option<Duration>| d.map(ms);
            m.t1.push(f(t[0]));
            m.t2.push(f(t[1]));
            m.t2_t1.push(diff(t[1], t[0]));
            m.replica.push(f(t[2]));
            eprintln!(
                "  {gone:?} {trial}: registry {:?}, gateway 503 {:?}, diag replica {:?}",
                t[0], t[1], t[2]
            );

            thread::sleep(Duration::from_millis(rng.random_range(0..200)));
            let (netd, t) = {
                let lab = &*lab;
                let odd = &out[k].odd;
                transition(
                    every,
                    give_up,
                    || match netd {
                        Some(p) => {
                            signal("CONT", pid);
                            p
                        }
                        None => misaki_e2e::gateway::spawn_netd(&lab.netd_config, lab.dir.path()),
                    },
                    &[
                        Box::new(|| fleet(lab, "online").as_deref() == Some("true")),
                        moves(
                            odd,
                            "gateway cam",
                            || via_gateway(lab, CAM),
                            Is::Reason(503, "vehicle-offline"),
                            Is::From("vehicle-cam"),
                        ),
                    ],
                )
            };
            lab.netd = Some(netd);
            let m = &mut out[k];
            m.back_reg.push(f(t[0]));
            m.back_gw.push(f(t[1]));
            m.back_gw_reg.push(diff(t[1], t[0]));
            eprintln!(
                "  back {trial}: registry {:?}, gateway cam {:?}",
                t[0], t[1]
            );
        }
    }
    Ok(out)
}

/// Figure 3, one direction: power word written → registry, vehicle call, gateway call.
#[derive(Default)]
struct PowerMove {
    known: Series,   // T0 → registry shows it
    vehicle: Series, // T0 → a call on the vehicle reaches the target
    gateway: Series, // T0 → a gateway call reaches the target
    both: Series,    // T0 → both (the later of the two)
    after: Series,   // registry shows it → both
    odd: Odd,
}

fn power(lab: &GatewayLab, args: &Args) -> anyhow::Result<[PowerMove; 2]> {
    let every = Duration::from_millis(args.poll_ms);
    let give_up = Duration::from_secs(args.give_up_s);
    let mut out = [PowerMove::default(), PowerMove::default()];
    let mut rng = rand::rng();
    for trial in 1..=args.trials {
        for (dir, (word, who)) in [("low", "replica-diag"), ("on", "vehicle-diag")]
            .into_iter()
            .enumerate()
        {
            let other = if dir == 0 { "on" } else { "low" };
            let was = if dir == 0 {
                "vehicle-diag"
            } else {
                "replica-diag"
            };
            settle(
                &format!("power {other} in force before writing {word}"),
                give_up,
                &[
                    Box::new(|| fleet(lab, "power").as_deref() == Some(other)),
                    Box::new(|| {
                        on_vehicle(lab, VEHICLE_DIAG).is_some_and(|a| Answer::from(was)(&a))
                    }),
                    Box::new(|| via_gateway(lab, DIAG).is_some_and(|a| Answer::from(was)(&a))),
                ],
            )?;
            // Sample every phase of edge-netd's power-file poll.
            thread::sleep(Duration::from_millis(50 + rng.random_range(0..100)));
            let odd = &out[dir].odd;
            let ((), t) = transition(
                every,
                give_up,
                || lab.set_power(word),
                &[
                    Box::new(|| fleet(lab, "power").as_deref() == Some(word)),
                    moves(
                        odd,
                        "vehicle diag",
                        || on_vehicle(lab, VEHICLE_DIAG),
                        Is::From(was),
                        Is::From(who),
                    ),
                    moves(
                        odd,
                        "gateway diag",
                        || via_gateway(lab, DIAG),
                        Is::From(was),
                        Is::From(who),
                    ),
                ],
            );
            let m = &mut out[dir];
            let f = |d: Option<Duration>| d.map(ms);
            m.known.push(f(t[0]));
            m.vehicle.push(f(t[1]));
            m.gateway.push(f(t[2]));
            let b = both(t[1], t[2]);
            m.both.push(f(b));
            m.after.push(diff(b, t[0]));
            eprintln!(
                "  power {word} {trial}: registry {:?}, vehicle {:?}, gateway {:?}",
                t[0], t[1], t[2]
            );
        }
    }
    Ok(out)
}

/// Run every figure and print the Markdown report.
pub fn run(args: &Args, envoy_version: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let load_start = procfs::loadavg_text();
    eprintln!("== starting the lab (misaki-cp, edge-netd, two Envoys)");
    let mut lab = GatewayLab::start();
    let result = measure(&mut lab, args);
    if args.keep_logs || result.is_err() {
        let dir = std::mem::replace(&mut lab.dir, tempfile::tempdir()?);
        eprintln!("  logs kept in {}", dir.keep().display());
    }
    let figures = result?;
    let (gateway_port, diag_port) = (lab.ports.gateway, lab.diag.port);
    drop(lab);
    let info = RunInfo {
        envoy_version,
        load_start,
        load_end: procfs::loadavg_text(),
        took: started.elapsed(),
        gateway_port,
        diag_port,
    };
    report(args, &info, &figures);
    Ok(())
}

struct Figures {
    lat: Latency,
    off: [Offline; 2],
    pow: [PowerMove; 2],
}

/// What the report says about the run itself.
struct RunInfo<'a> {
    envoy_version: &'a str,
    load_start: String,
    load_end: String,
    took: Duration,
    gateway_port: u16,
    diag_port: u16,
}

fn measure(lab: &mut GatewayLab, args: &Args) -> anyhow::Result<Figures> {
    let give_up = Duration::from_secs(args.give_up_s);
    settle(
        "the gateway reaching the vehicle through its tunnel",
        Duration::from_secs(60),
        &[
            Box::new(|| via_gateway(lab, DIAG).is_some_and(|a| Answer::from("vehicle-diag")(&a))),
            Box::new(|| {
                on_vehicle(lab, VEHICLE_DIAG).is_some_and(|a| Answer::from("vehicle-diag")(&a))
            }),
        ],
    )?;
    eprintln!(
        "== 1. latency: {} + {} warm-up requests each way",
        args.requests, args.warmup
    );
    let lat = latency(lab, args)?;
    eprintln!("== 2. offline and back: {} trials", args.trials);
    let off = offline(lab, args)?;
    settle(
        "the vehicle Envoy serving diag after the offline trials",
        give_up,
        &[Box::new(|| {
            on_vehicle(lab, VEHICLE_DIAG).is_some_and(|a| Answer::from("vehicle-diag")(&a))
        })],
    )?;
    eprintln!("== 3. power low and back: {} trials each way", args.trials);
    let pow = power(lab, args)?;
    Ok(Figures { lat, off, pow })
}

fn report(args: &Args, info: &RunInfo<'_>, figures: &Figures) {
    let Figures { lat, off, pow } = figures;
    let RunInfo {
        envoy_version,
        load_start,
        load_end,
        took,
        gateway_port,
        diag_port,
    } = info;
    let cmd: Vec<String> = std::env::args().collect();
    let script = std::env::var("MISAKI_BENCH_CMDLINE").ok();
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("## Cloud → vehicle through the reverse tunnel: latency, offline, low power");
    println!();
    if let Some(s) = &script {
        println!("Command: `{s}` (runs `{}`).", cmd.join(" "));
    } else {
        println!("Command: `{}`.", cmd.join(" "));
    }
    println!(
        "Load average (1/5/15 min) at start {load_start}, at end {load_end}; {cores} cores; \
         Envoy {envoy_version} (`--concurrency 1`, both); the whole run took {:.0} s.",
        took.as_secs_f64()
    );
    println!();
    println!(
        "### 1. Request latency: direct vs through the gateway ({} sequential GETs each, after {} warm-up)",
        args.requests, args.warmup
    );
    println!();
    println!("| path | n | p50 | p90 | p99 | max | errors | connections |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |label: &str, s: &[Duration], i: usize| {
        if s.is_empty() {
            println!(
                "| {label} | 0 | — | — | — | — | {} | {} |",
                lat.errors[i], lat.connects[i]
            );
            return;
        }
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            s.len(),
            fmt_ms(ms(pct(s, 50))),
            fmt_ms(ms(pct(s, 90))),
            fmt_ms(ms(pct(s, 99))),
            fmt_ms(ms(s[s.len() - 1])),
            lat.errors[i],
            lat.connects[i]
        );
    };
    row(
        &format!("(a) direct: the vehicle's `diag` upstream, 127.0.0.1:{diag_port}"),
        &lat.direct,
        0,
    );
    row(
        &format!(
            "(b) cloud gateway 127.0.0.1:{gateway_port} + `{TARGET_HEADER}: {VEHICLE}` → tunnel → vehicle Envoy → `diag`"
        ),
        &lat.gateway,
        1,
    );
    if !lat.direct.is_empty() && !lat.gateway.is_empty() {
        let add = |p| ms(pct(&lat.gateway, p)) - ms(pct(&lat.direct, p));
        println!(
            "| **added by the gateway path (b − a)** | | **{}** | {} | **{}** | | | |",
            fmt_ms(add(50)),
            fmt_ms(add(90)),
            fmt_ms(add(99))
        );
    }
    println!();
    println!(
        "`GET {DIAG}`, HTTP/1.1, one kept-alive connection each way (connections = how many \
         each side opened, warm-up included: 1 = one connection carried all), requests interleaved a, b, a, \
         b, … so both see the same machine; time from before the write to the end of the body. \
         Percentiles by nearest rank."
    );
    println!();
    println!(
        "### 2. Vehicle offline and back ({} trials each way of going offline)",
        args.trials
    );
    println!();
    println!("| measurement | n | median | p90 | max | aim | met |");
    println!("|---|---:|---:|---:|---:|---|---|");
    for (m, (how, back)) in off.iter().zip([
        ("edge-netd killed (SIGKILL)", "edge-netd started again"),
        ("edge-netd frozen (SIGSTOP)", "edge-netd resumed (SIGCONT)"),
    ]) {
        println!(
            "{}",
            m.t1.row(
                &format!("{how} (T0) → registry shows `online: false` (T1)"),
                None
            )
        );
        println!(
            "{}",
            m.t2_t1.row(
                "**registry offline (T1) → gateway answers `cam` 503 `vehicle-offline` (T2)**",
                Some(1000.0)
            )
        );
        println!(
            "{}",
            m.t2.row(
                "T0 → gateway answers `cam` 503 `vehicle-offline` (T2)",
                None
            )
        );
        println!(
            "{}",
            m.replica
                .row("T0 → gateway `diag` answered by the replica", None)
        );
        println!(
            "{}",
            m.back_reg
                .row(&format!("{back} → registry shows `online: true`"), None)
        );
        println!(
            "{}",
            m.back_gw.row(
                &format!("**{back} → gateway reaches `cam` on the vehicle**"),
                None
            )
        );
        println!(
            "{}",
            m.back_gw_reg.row(
                "registry online → gateway reaches `cam` on the vehicle",
                Some(1000.0)
            )
        );
    }
    println!();
    println!(
        "T0 is just before the signal; each poller (a thread, a new connection per poll, \
         every {} ms) stops at the end of the first poll that sees its condition. Before \
         each trial: online and the gateway reaching `cam`, then a pause of 50 + U(0, 200) ms \
         (heartbeat phase); U(0, 200) ms before bringing it back. edge-netd sends a heartbeat \
         every 200 ms; the registry marks a vehicle offline when its stream ends (a killed \
         process's socket closes at once) or after 3 heartbeat intervals of silence (600 ms \
         after the last report: the frozen case). A difference of two pollers' times \
         (T2 − T1) is good to about ± {} ms; a negative one means the gateway's poller \
         happened to see the change first.",
        args.poll_ms, args.poll_ms
    );
    println!();
    println!(
        "{}",
        odd_line(
            "Going offline and back (gateway pollers)",
            &[&off[0].odd, &off[1].odd]
        )
    );
    println!();
    println!(
        "### 3. Power low and back ({} trials each way; edge-netd's `power.interval: {POWER_INTERVAL}`)",
        args.trials
    );
    println!();
    println!("| measurement | n | median | p90 | max | aim | met |");
    println!("|---|---:|---:|---:|---:|---|---|");
    for (m, (word, target)) in pow.iter().zip([("low", "replica"), ("on", "vehicle")]) {
        println!(
            "{}",
            m.known.row(
                &format!("`{word}` written (T0) → registry shows power `{word}`"),
                None
            )
        );
        println!(
            "{}",
            m.vehicle.row(
                &format!("T0 → call on the vehicle (`GET {VEHICLE_DIAG}`) reaches the {target}"),
                None
            )
        );
        println!(
            "{}",
            m.gateway.row(
                &format!("T0 → gateway call (`GET {DIAG}`) reaches the {target}"),
                None
            )
        );
        println!(
            "{}",
            m.both
                .row(&format!("**T0 → both reach the {target} (T_both)**"), None)
        );
        println!(
            "{}",
            m.after.row(
                &format!("**registry shows `{word}` → both reach the {target}**"),
                Some(1000.0)
            )
        );
    }
    println!();
    println!(
        "T0 is just before the `rename(2)` that saves the power file; pollers as above (every \
         {} ms, new connection each). The power-file poll ({POWER_INTERVAL}) is part of T0 → \
         known: edge-netd sees the word 0–{POWER_INTERVAL} after it is written (50 + U(0, 100) ms \
         pause before each write, so every phase is sampled). \
         Differences of two pollers' times are good to about ± {} ms. The vehicle side moves on \
         edge-netd's own local xDS push, without the cloud; the gateway moves when misaki-cp \
         has the report and pushes the cloud Envoy's routes.",
        args.poll_ms, args.poll_ms
    );
    println!();
    println!(
        "{}",
        odd_line(
            "Power changes (vehicle and gateway pollers)",
            &[&pow[0].odd, &pow[1].odd]
        )
    );
}
