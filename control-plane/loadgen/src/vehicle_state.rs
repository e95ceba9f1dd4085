//! `vehicle-state`: one vehicle's state change at fleet scale (issue 13's figure: at
//! 10,000 streams, one vehicle's change → its dependants have the new config, p99,
//! and misaki-cp's CPU for it).
//!
//! Per row (mode × streams) a fresh misaki-cp on a policy with a vehicle gateway
//! (`vehicle_gateways: [127.0.0.1]`, a tunnel class) and a vehicle service with a
//! `cloud_replica` and `on_low_power: cloud`, plus the benchmark's cloud services:
//! 1. every vehicle `car-0` … reports over the real FleetService (one stream each, over
//!    shared HTTP/2 connections, zstd as edge-netd): `Hello` (holding the current
//!    policy, so nothing is pushed), a full `LinkState` (power on), then a `Heartbeat`
//!    every `--heartbeat-ms`, staggered over the fleet;
//! 2. the same vehicles' ADS streams (simulated Envoys, [`crate::client`]), and a few
//!    cloud sidecars (`node.cluster: cloud`), which subscribe to SRDS because their
//!    `vehicle_gateway` listener uses scoped routes over SRDS;
//! 3. trials, one vehicle at a time, in four batches: power low (a `LinkChange` with
//!    `power: LOW`), power on (the same vehicles back), offline (the vehicle's report
//!    stream closed by the client), online (a new report stream for it). Each is timed
//!    from just before the report is sent (or the stream closed) until every cloud
//!    stream has received, and ACKed, an SRDS response of another version and, for the
//!    power changes, until the vehicle's own ADS stream has ACKed an RDS response. Then
//!    until nothing has arrived anywhere for `--quiet-ms`, and every other stream's
//!    responses over the whole trial are counted: they must be 0.
//!
//! misaki-cp's CPU is read around each batch; the fleet's heartbeats cost it CPU too,
//! so the idle rate (measured before the trials) times the batch's wall time is
//! subtracted ("net"; the raw figure is shown too).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use misaki_harness::procfs;
use misaki_proto::fleet_v1 as pb;
use pb::control_message::Message as Control;
use pb::fleet_service_client::FleetServiceClient;
use pb::vehicle_report::Report;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::bench::{check_memory, push_bytes};
use crate::client::{self, ClientConfig, Mode, Target};
use crate::fleet::Fleet;
use crate::policy::PolicySpec;
use crate::stats::{Summary, ms};
use crate::sys;

/// Everything one row needs.
#[derive(Debug, Clone)]
pub struct Spec {
    pub streams: usize,
    pub clouds: usize,
    /// HTTP/2 connections the vehicles' ADS streams share (0: one per stream).
    pub conns: usize,
    /// HTTP/2 connections the vehicles' report streams share.
    pub fleet_conns: usize,
    pub trials: usize,
    pub extra_services: usize,
    pub heartbeat: Duration,
    pub quiet: Duration,
}

/// What a trial changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PowerLow,
    PowerOn,
    Offline,
    Online,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::PowerLow, Kind::PowerOn, Kind::Offline, Kind::Online];

    fn as_str(self) -> &'static str {
        match self {
            Kind::PowerLow => "power low",
            Kind::PowerOn => "power on again",
            Kind::Offline => "offline (report stream closed)",
            Kind::Online => "online again (new report stream)",
        }
    }

    /// Whether the vehicle's own snapshot changes (`on_low_power: cloud`).
    fn own_changes(self) -> bool {
        matches!(self, Kind::PowerLow | Kind::PowerOn)
    }
}

/// One line of the trials table.
#[derive(Debug, Clone)]
pub struct KindRow {
    pub mode: &'static str,
    pub streams: usize,
    pub clouds: usize,
    pub kind: Kind,
    pub trials: usize,
    /// Until every cloud stream has received / ACKed the new SRDS.
    pub cloud_recv: Summary,
    pub cloud_acked: Summary,
    /// Until the vehicle's own stream has ACKed its new RDS.
    pub own: Option<Summary>,
    pub cpu_raw: f64,
    pub cpu_net: f64,
    pub loadgen_cpu: f64,
    pub bytes: f64,
    /// Per change: responses on the cloud streams (all of them), on the vehicle's own.
    pub cloud_responses: String,
    pub own_responses: String,
    /// Responses on every other vehicle stream, over all trials of the kind.
    pub others: u64,
}

/// One row's setup figures.
#[derive(Debug, Clone, Default)]
pub struct RowInfo {
    pub mode: &'static str,
    pub streams: usize,
    pub reports_connect: Duration,
    /// After the report streams were acknowledged: until misaki-cp went idle (its
    /// cache taking in every vehicle's first state).
    pub reports_settle: Duration,
    /// misaki-cp's CPU from the first report stream until it went idle.
    pub reports_cpu: f64,
    pub ads_connect: Duration,
    pub ads_settle: Duration,
    pub cpu_connect: f64,
    pub idle_cpu_per_s: f64,
    pub rss_connected: u64,
    pub rss_after: u64,
    pub hwm: u64,
    pub loadgen_rss: u64,
    pub cloud_srds_kib: f64,
    pub retries: u64,
}

/// The benchmark policy with a vehicle gateway and a vehicle service that moves to its
/// cloud replica on low power (and one that has no replica).
pub fn policy_yaml(extra: usize) -> String {
    let base = PolicySpec {
        extra,
        vehicle_service: false,
        standard_timeout_s: 10,
    }
    .yaml();
    let mesh = "  cloud_inbound_port: 25443\n";
    assert!(base.contains(mesh), "policy template changed");
    let mut y = base.replace(
        mesh,
        &format!(
            "{mesh}  vehicle_gateway_port: 25444\n  vehicle_tunnel_port: 25445\n  vehicle_gateways: [127.0.0.1]\n  vehicle_tunnel_class: standard\n"
        ),
    );
    y.push_str("  - { name: diag, location: vehicle, protocol: http, port: 18090, routes: [\"/diag\"], class: standard, cloud_replica: [\"127.0.0.1:18091\"], on_low_power: cloud }\n");
    y.push_str("  - { name: cam, location: vehicle, protocol: http, port: 18092, routes: [\"/cam\"], class: standard }\n");
    y
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn report(seq: u64, r: Report) -> pb::VehicleReport {
    pb::VehicleReport {
        seq,
        observed_unix_ms: unix_ms(),
        report: Some(r),
    }
}

fn link(name: &str, kind: pb::UplinkKind) -> pb::Link {
    pb::Link {
        name: name.into(),
        interface: format!("{name}0"),
        kind: kind as i32,
        up: true,
        carrier: true,
        reachable: true,
        rtt_us: Some(20_000),
        metered: kind == pb::UplinkKind::Lte,
        cost: if kind == pb::UplinkKind::Lte { 10 } else { 1 },
        ..Default::default()
    }
}

/// What edge-netd sends on a new stream: its full state (power on).
fn link_state(policy_version: &str) -> pb::LinkState {
    pb::LinkState {
        links: vec![
            link("wifi", pb::UplinkKind::Wifi),
            link("lte", pb::UplinkKind::Lte),
        ],
        selections: ["critical", "standard", "bulk"]
            .into_iter()
            .map(|c| pb::ClassSelection {
                class: c.into(),
                uplink: "wifi".into(),
                reason: "preferred_stable".into(),
            })
            .collect(),
        power: pb::PowerState::On as i32,
        policy_version: policy_version.into(),
        ..Default::default()
    }
}

/// One vehicle's open report stream, as the driver and the heartbeat task share it.
struct Slot {
    tx: mpsc::Sender<pb::VehicleReport>,
    seq: u64,
}

impl Slot {
    fn send(&mut self, r: Report) -> Result<()> {
        self.seq += 1;
        self.tx
            .try_send(report(self.seq, r))
            .map_err(|e| anyhow::anyhow!("report stream full or closed: {e}"))
    }
}

#[derive(Default)]
struct ReportShared {
    /// Vehicles whose `LinkState` the server has acknowledged.
    ready: AtomicUsize,
    /// Control messages received (acks, policy updates).
    received: AtomicU64,
    policies: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
    policy_version: OnceLock<String>,
}

/// The fleet's report streams (FleetService), kept open, with heartbeats.
pub struct Reporters {
    slots: Arc<Vec<Mutex<Option<Slot>>>>,
    readers: Vec<Option<JoinHandle<()>>>,
    channels: Vec<Channel>,
    shared: Arc<ReportShared>,
    heartbeat: Option<JoinHandle<()>>,
    hb_ms: u32,
    /// Slot `i` is vehicle `car-{first + i}`.
    first: usize,
}

impl Drop for Reporters {
    fn drop(&mut self) {
        for r in self.readers.iter().flatten() {
            r.abort();
        }
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

impl Reporters {
    /// Open one report stream per vehicle `car-0` … `car-{n-1}` over `conns` shared
    /// connections; wait until every `LinkState` is acknowledged.
    pub async fn connect(
        target: &Target,
        n: usize,
        conns: usize,
        heartbeat: Duration,
    ) -> Result<Reporters> {
        Reporters::connect_from(target, 0, n, conns, heartbeat).await
    }

    /// [`connect`](Self::connect) for vehicles `car-{first}` … `car-{first + n - 1}`.
    pub async fn connect_from(
        target: &Target,
        first: usize,
        n: usize,
        conns: usize,
        heartbeat: Duration,
    ) -> Result<Reporters> {
        let mut channels = Vec::new();
        for _ in 0..conns.clamp(1, n.max(1)) {
            channels.push(target.connect("").await?);
        }
        let mut r = Reporters {
            slots: Arc::new((0..n).map(|_| Mutex::new(None)).collect()),
            readers: (0..n).map(|_| None).collect(),
            channels,
            shared: Arc::new(ReportShared::default()),
            heartbeat: None,
            hb_ms: heartbeat.as_millis().clamp(100, 60_000) as u32,
            first,
        };
        // car-0 first, holding no policy: its PolicyUpdate names the current version,
        // which the others then say they hold (as a running fleet would).
        r.open(0, "").await?;
        r.wait(1, Duration::from_secs(30)).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.shared.policy_version.get().is_none() {
            if Instant::now() > deadline {
                bail!("car-0 got no PolicyUpdate");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let version = r.policy_version();
        for i in 1..n {
            r.open(i, &version).await?;
        }
        r.wait(n, Duration::from_secs(120)).await?;
        r.heartbeat = Some(tokio::spawn(heartbeats(r.slots.clone(), heartbeat)));
        Ok(r)
    }

    fn policy_version(&self) -> String {
        self.shared
            .policy_version
            .get()
            .cloned()
            .unwrap_or_default()
    }

    async fn wait(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.shared.ready.load(Ordering::Acquire) < n {
            self.check_failed()?;
            if Instant::now() > deadline {
                bail!(
                    "only {}/{n} report streams acknowledged within {timeout:?}",
                    self.shared.ready.load(Ordering::Acquire)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub fn check_failed(&self) -> Result<()> {
        let failed = self.shared.failed.load(Ordering::Acquire);
        if failed > 0 {
            let e = self.shared.last_error.lock().expect("last_error").clone();
            bail!(
                "{failed} report stream(s) failed; last error: {}",
                e.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A new report stream for vehicle `i`: Hello, LinkState; its reader counts what the
    /// control plane sends. Returns once the stream is open (the LinkState's ack comes
    /// later).
    async fn open(&mut self, i: usize, policy_version: &str) -> Result<()> {
        if let Some(old) = self.readers[i].take() {
            old.abort();
        }
        let (tx, rx) = mpsc::channel(16);
        let mut slot = Slot { tx, seq: 0 };
        let id = self.first + i;
        slot.send(Report::Hello(pb::Hello {
            vehicle_id: format!("car-{id}"),
            daemon_version: "0.1.0-loadgen".into(),
            policy_version: policy_version.into(),
            heartbeat_interval_ms: self.hb_ms,
            policy_deltas: true,
        }))?;
        slot.send(Report::LinkState(link_state(policy_version)))?;
        *self.slots[i].lock().expect("slot") = Some(slot);
        let mut client = FleetServiceClient::new(self.channels[i % self.channels.len()].clone())
            .send_compressed(pb::COMPRESSION)
            .accept_compressed(pb::COMPRESSION);
        let shared = self.shared.clone();
        self.readers[i] = Some(tokio::spawn(async move {
            let r = async {
                let mut control = client
                    .report(ReceiverStream::new(rx))
                    .await
                    .context("opening report stream")?
                    .into_inner();
                while let Some(m) = control.message().await.context("report stream")? {
                    shared.received.fetch_add(1, Ordering::Relaxed);
                    match m.message {
                        Some(Control::Ack(a)) if a.seq == 2 => {
                            shared.ready.fetch_add(1, Ordering::AcqRel);
                        }
                        Some(Control::Policy(p)) => {
                            shared.policies.fetch_add(1, Ordering::Relaxed);
                            let _ = shared.policy_version.set(p.version);
                        }
                        _ => {}
                    }
                }
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = r {
                shared.failed.fetch_add(1, Ordering::AcqRel);
                *shared.last_error.lock().expect("last_error") = Some(format!("car-{id}: {e:#}"));
            }
        }));
        Ok(())
    }

    /// Send vehicle `i` (slot `i`) a report.
    pub(crate) fn send(&self, i: usize, r: Report) -> Result<()> {
        match self.slots[i].lock().expect("slot").as_mut() {
            Some(s) => s.send(r),
            None => bail!("car-{i} has no report stream"),
        }
    }

    /// End vehicle `i`'s report stream from the client side (END_STREAM): the server
    /// sees it at once and marks the vehicle offline.
    fn close(&self, i: usize) {
        self.slots[i].lock().expect("slot").take();
    }
}

/// A heartbeat to every vehicle with an open stream once per `interval`, spread evenly.
async fn heartbeats(slots: Arc<Vec<Mutex<Option<Slot>>>>, interval: Duration) {
    const TICK: Duration = Duration::from_millis(50);
    let n = slots.len();
    let per_tick = ((n as f64 * TICK.as_secs_f64() / interval.as_secs_f64()).ceil() as usize)
        .clamp(1, n.max(1));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pos = 0;
    loop {
        tick.tick().await;
        for _ in 0..per_tick {
            if let Some(s) = slots[pos].lock().expect("slot").as_mut() {
                // A full buffer (the server is slow) skips one heartbeat: harmless.
                let _ = s.send(Report::Heartbeat(pb::Heartbeat {}));
            }
            pos = (pos + 1) % n;
        }
    }
}

/// Wait until misaki-cp is idle (under 100 ms CPU per second, over half a second) and
/// no stream of `fleets` received anything meanwhile; how long that took.
async fn settle(cp: &mut misaki_harness::Process, fleets: &[&Fleet]) -> Result<Duration> {
    const WINDOW: Duration = Duration::from_millis(500);
    let start = Instant::now();
    let pid = cp.pid();
    let total = || -> u64 {
        fleets
            .iter()
            .map(|f| f.shared.responses.load(Ordering::Acquire))
            .sum()
    };
    loop {
        let (c, r) = (procfs::cpu_secs(pid)?, total());
        tokio::time::sleep(WINDOW).await;
        cp.check_alive()?;
        let rate = (procfs::cpu_secs(pid)? - c) / WINDOW.as_secs_f64();
        if rate < 0.1 && total() == r {
            return Ok(start.elapsed() - WINDOW);
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "misaki-cp still busy ({:.0} ms/s) after 300 s",
                rate * 1000.0
            );
        }
    }
}

/// ns since `epoch` of `t` (as [`client::Shared::now_ns`] counts).
fn ns_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_nanos() as u64 + 1
}

/// Responses received by all streams of `f`, per type.
fn type_counts(f: &Fleet) -> [u64; client::N] {
    let mut c = [0; client::N];
    for r in &f.recs {
        for (t, c) in c.iter_mut().enumerate() {
            *c += r.count[t].load(Ordering::Acquire);
        }
    }
    c
}

/// Per-type counts divided by `per`, as `srds 4.00, rds 1.00` (`0`: none).
fn per_type(counts: &[u64; client::N], per: f64) -> String {
    let s = (0..client::N)
        .filter(|i| counts[*i] > 0)
        .map(|i| format!("{} {:.2}", client::SHORT[i], counts[i] as f64 / per))
        .collect::<Vec<_>>()
        .join(", ");
    if s.is_empty() { "0".into() } else { s }
}

/// What one batch of trials of `kind` measured.
struct Batch {
    cloud_recv: Vec<Duration>,
    cloud_acked: Vec<Duration>,
    own: Vec<Duration>,
    cloud_counts: [u64; client::N],
    own_counts: [u64; client::N],
    others: u64,
}

/// The vehicle of trial `i` of a batch on `set` (0 or 1): distinct within a set, and
/// the two sets apart.
fn trial_vehicle(i: usize, set: usize, n: usize) -> usize {
    (i * 7919 + set * (n / 2)) % n
}

#[allow(clippy::too_many_arguments)]
async fn run_batch(
    kind: Kind,
    trials: usize,
    quiet: Duration,
    vehicles: &Fleet,
    clouds: &Fleet,
    reporters: &mut Reporters,
    tag: &str,
) -> Result<Batch> {
    let n = vehicles.len();
    let set = usize::from(matches!(kind, Kind::Offline | Kind::Online));
    let mut b = Batch {
        cloud_recv: Vec::new(),
        cloud_acked: Vec::new(),
        own: Vec::new(),
        cloud_counts: [0; client::N],
        own_counts: [0; client::N],
        others: 0,
    };
    let total = |f: &Fleet| f.shared.responses.load(Ordering::Acquire);
    for i in 0..trials {
        let k = trial_vehicle(i, set, n);
        let before: Vec<u64> = vehicles.recs.iter().map(|r| r.responses()).collect();
        let own_before: Vec<u64> = (0..client::N)
            .map(|t| vehicles.recs[k].count[t].load(Ordering::Acquire))
            .collect();
        let cloud_versions: Vec<u64> = clouds
            .recs
            .iter()
            .map(|r| r.version_hash(client::S))
            .collect();
        let cloud_before = type_counts(clouds);
        let version = reporters.policy_version();
        let t0 = Instant::now();
        match kind {
            Kind::PowerLow | Kind::PowerOn => {
                let power = if kind == Kind::PowerLow {
                    pb::PowerState::Low
                } else {
                    pb::PowerState::On
                };
                reporters.send(
                    k,
                    Report::LinkChange(pb::LinkChange {
                        power: Some(power as i32),
                        ..Default::default()
                    }),
                )?;
            }
            Kind::Offline => reporters.close(k),
            Kind::Online => reporters.open(k, &version).await?,
        }
        let (t0v, t0c) = (
            ns_since(vehicles.shared.epoch, t0),
            ns_since(clouds.shared.epoch, t0),
        );
        let deadline = t0 + Duration::from_secs(20);
        loop {
            let clouds_done = clouds
                .recs
                .iter()
                .zip(&cloud_versions)
                .all(|(r, v)| r.acked_ns(client::S) > t0c && r.version_hash(client::S) != *v);
            let own_done = !kind.own_changes() || vehicles.recs[k].acked_ns(client::R) > t0v;
            if clouds_done && own_done {
                break;
            }
            vehicles.check_failed()?;
            clouds.check_failed()?;
            reporters.check_failed()?;
            if Instant::now() > deadline {
                bail!(
                    "[{tag}] {} trial {i} (car-{k}): clouds done {clouds_done}, own done {own_done} after 20 s",
                    kind.as_str()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let lat = |ns: u64, t0: u64| Duration::from_nanos(ns.saturating_sub(t0));
        b.cloud_recv.push(
            clouds
                .recs
                .iter()
                .map(|r| lat(r.last_ns(client::S), t0c))
                .max()
                .unwrap_or_default(),
        );
        b.cloud_acked.push(
            clouds
                .recs
                .iter()
                .map(|r| lat(r.acked_ns(client::S), t0c))
                .max()
                .unwrap_or_default(),
        );
        if kind.own_changes() {
            b.own.push(lat(vehicles.recs[k].acked_ns(client::R), t0v));
        }
        // Until nothing arrives anywhere for `quiet`: stray pushes are counted too.
        let mut seen = (
            total(vehicles),
            total(clouds),
            reporters.shared.received.load(Ordering::Acquire),
        );
        loop {
            tokio::time::sleep(quiet).await;
            let now = (
                total(vehicles),
                total(clouds),
                reporters.shared.received.load(Ordering::Acquire),
            );
            if now == seen {
                break;
            }
            seen = now;
        }
        if kind == Kind::Online {
            // The new stream's LinkState is acknowledged (counted in `ready`).
            reporters.wait(n + i + 1, Duration::from_secs(10)).await?;
        }
        b.others += vehicles
            .recs
            .iter()
            .zip(&before)
            .enumerate()
            .filter(|(j, _)| *j != k)
            .map(|(_, (r, b))| r.responses() - b)
            .sum::<u64>();
        for (t, c) in own_before.iter().enumerate() {
            b.own_counts[t] += vehicles.recs[k].count[t].load(Ordering::Acquire) - c;
        }
        for (t, (now, was)) in type_counts(clouds).iter().zip(cloud_before).enumerate() {
            b.cloud_counts[t] += now - was;
        }
    }
    Ok(b)
}

/// One fleet size: a fresh misaki-cp, every vehicle reporting, then per mode the ADS
/// streams and the four batches (the modes one after the other on the same misaki-cp
/// and the same report streams: the fleet's first reports take misaki-cp most of a
/// minute to absorb at 10,000 vehicles, see the report).
pub async fn run_streams(
    cp_bin: &Path,
    dir: &Path,
    spec: &Spec,
    modes: &[Mode],
    infos: &mut Vec<RowInfo>,
    rows: &mut Vec<KindRow>,
) -> Result<()> {
    check_memory(spec.streams * 2)?;
    if spec.trials > spec.streams / 2 {
        bail!("--trials must be at most half the streams (distinct vehicles per batch)");
    }
    let tag = format!("vehicle-state-{}", spec.streams);
    let row_dir = dir.join(&tag);
    std::fs::create_dir_all(&row_dir)?;
    let policy_path = row_dir.join("mesh.yaml");
    std::fs::write(&policy_path, policy_yaml(spec.extra_services))?;
    let (mut cp, xds_port, admin) = sys::start_cp(cp_bin, &policy_path, &row_dir, &tag)?;
    let pid = cp.pid();
    let target = Target::plain(format!("127.0.0.1:{xds_port}"));

    eprintln!("[{tag}] {} report streams", spec.streams);
    let cpu0 = procfs::cpu_secs(pid)?;
    let start = Instant::now();
    let mut reporters =
        Reporters::connect(&target, spec.streams, spec.fleet_conns, spec.heartbeat).await?;
    let reports_connect = start.elapsed();
    let reports_settle = settle(&mut cp, &[]).await?;
    let reports_cpu = procfs::cpu_secs(pid)? - cpu0;
    eprintln!(
        "[{tag}] reports acknowledged in {:.2}s, misaki-cp idle {:.2}s later ({:.1} s CPU)",
        reports_connect.as_secs_f64(),
        reports_settle.as_secs_f64(),
        reports_cpu
    );
    for &mode in modes {
        let mut info = RowInfo {
            mode: mode.as_str(),
            streams: spec.streams,
            reports_connect,
            reports_settle,
            reports_cpu,
            ..RowInfo::default()
        };
        let tag = format!("{tag}-{}", mode.as_str());
        run_mode(
            &mut cp,
            admin,
            &target,
            spec,
            mode,
            &mut reporters,
            &mut info,
            rows,
            &tag,
        )
        .await?;
        infos.push(info);
    }
    reporters.check_failed()?;
    if reporters.shared.policies.load(Ordering::Relaxed) != 1 {
        eprintln!(
            "[{tag}] note: {} policy updates on report streams (expected 1, car-0's)",
            reporters.shared.policies.load(Ordering::Relaxed)
        );
    }
    drop(reporters);
    drop(cp);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_mode(
    cp: &mut misaki_harness::Process,
    admin: u16,
    target: &Arc<Target>,
    spec: &Spec,
    mode: Mode,
    reporters: &mut Reporters,
    info: &mut RowInfo,
    rows: &mut Vec<KindRow>,
    tag: &str,
) -> Result<()> {
    let pid = cp.pid();
    eprintln!(
        "[{tag}] {} vehicle + {} cloud ADS streams",
        spec.streams, spec.clouds
    );
    let cfg = |cluster| {
        Arc::new(ClientConfig {
            mode,
            nack_every: 0,
            nack_version: None,
            cluster,
        })
    };
    let cpu0 = procfs::cpu_secs(pid)?;
    let start = Instant::now();
    let vehicles = Fleet::connect(target, cfg("vehicle"), spec.streams, spec.conns, "car-").await?;
    let clouds = Fleet::connect(target, cfg("cloud"), spec.clouds, 0, "cloud-gw-").await?;
    vehicles
        .wait_ready(Duration::from_secs(300), || Ok(cp.check_alive()?))
        .await?;
    clouds
        .wait_ready(Duration::from_secs(60), || Ok(cp.check_alive()?))
        .await?;
    info.ads_connect = start.elapsed();
    for c in &clouds.recs {
        if c.count[client::S].load(Ordering::Acquire) == 0 {
            bail!("a cloud stream got no SRDS: the cloud snapshot has no vehicle gateway scopes");
        }
    }
    info.ads_settle = settle(cp, &[&vehicles, &clouds]).await?;
    info.cpu_connect = procfs::cpu_secs(pid)? - cpu0;
    // Settle, then the idle rate (heartbeats) for the net CPU figures.
    tokio::time::sleep(Duration::from_secs(1)).await;
    info.rss_connected = procfs::vm_bytes(pid, "VmRSS")?;
    let (c_a, t_a) = (procfs::cpu_secs(pid)?, Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    info.idle_cpu_per_s = (procfs::cpu_secs(pid)? - c_a) / t_a.elapsed().as_secs_f64();
    eprintln!(
        "[{tag}] ready in {:.2}s, misaki-cp idle {:.2}s later; cp RSS {} MiB, idle CPU {:.1} ms/s",
        info.ads_connect.as_secs_f64(),
        info.ads_settle.as_secs_f64(),
        info.rss_connected / (1024 * 1024),
        info.idle_cpu_per_s * 1000.0
    );

    let me = std::process::id();
    for kind in Kind::ALL {
        let bytes_a = push_bytes(admin).await?;
        let (cpu_a, lg_a, t_a) = (
            procfs::cpu_secs(pid)?,
            procfs::cpu_secs(me)?,
            Instant::now(),
        );
        let b = run_batch(
            kind,
            spec.trials,
            spec.quiet,
            &vehicles,
            &clouds,
            reporters,
            tag,
        )
        .await?;
        let wall = t_a.elapsed().as_secs_f64();
        let cpu_raw = procfs::cpu_secs(pid)? - cpu_a;
        let lg = procfs::cpu_secs(me)? - lg_a;
        let bytes = push_bytes(admin).await? - bytes_a;
        let t = spec.trials.max(1) as f64;
        let row = KindRow {
            mode: mode.as_str(),
            streams: spec.streams,
            clouds: spec.clouds,
            kind,
            trials: spec.trials,
            cloud_recv: Summary::of(&b.cloud_recv),
            cloud_acked: Summary::of(&b.cloud_acked),
            own: kind.own_changes().then(|| Summary::of(&b.own)),
            cpu_raw: cpu_raw / t,
            cpu_net: (cpu_raw - info.idle_cpu_per_s * wall).max(0.0) / t,
            loadgen_cpu: lg / t,
            bytes: bytes as f64 / t,
            cloud_responses: per_type(&b.cloud_counts, t),
            own_responses: per_type(&b.own_counts, t),
            others: b.others,
        };
        eprintln!(
            "[{tag}] {}: clouds ACKed p50 {} p99 {} max {} ms; own p99 {} ms; cp CPU {:.2} ms/change; others {}",
            kind.as_str(),
            ms(row.cloud_acked.p50),
            ms(row.cloud_acked.p99),
            ms(row.cloud_acked.max),
            ms(row.own.and_then(|s| s.p99)),
            row.cpu_net * 1000.0,
            row.others
        );
        if kind == Kind::PowerLow {
            // The size of a cloud stream's SRDS, for the record: misaki-cp's own count.
            info.cloud_srds_kib = row.bytes / spec.clouds.max(1) as f64 / 1024.0;
        }
        rows.push(row);
        cp.check_alive()?;
    }
    info.rss_after = procfs::vm_bytes(pid, "VmRSS")?;
    info.hwm = procfs::vm_bytes(pid, "VmHWM")?;
    info.loadgen_rss = procfs::vm_bytes(me, "VmRSS")?;
    info.retries = vehicles.shared.reconnects.load(Ordering::Relaxed)
        + clouds.shared.reconnects.load(Ordering::Relaxed);
    vehicles.check_failed()?;
    clouds.check_failed()?;
    reporters.check_failed()?;
    drop(clouds);
    drop(vehicles);
    // Let misaki-cp see the streams go before the next mode connects.
    settle(cp, &[]).await?;
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / (1024.0 * 1024.0))
}

fn summary(s: &Summary) -> String {
    format!("{} / {} / {}", ms(s.p50), ms(s.p99), ms(s.max))
}

pub fn print_tables(infos: &[RowInfo], rows: &[KindRow], quiet: Duration) {
    let clouds = rows.first().map_or(0, |r| r.clouds);
    println!(
        "| mode | streams | change | trials | all {clouds} cloud streams received new SRDS p50 / p99 / max (ms) | … and ACKed p50 / p99 / max (ms) | the vehicle's own stream ACKed new RDS p50 / p99 / max (ms) | cp CPU / change, net (raw) (ms) | loadgen CPU / change (ms) | cp pushed / change (KiB) | responses / change: cloud streams / the vehicle's | other vehicle streams' responses (all trials) |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} ({:.2}) | {:.2} | {:.1} | {} / {} | {} |",
            r.mode,
            r.streams,
            r.kind.as_str(),
            r.trials,
            summary(&r.cloud_recv),
            summary(&r.cloud_acked),
            r.own.as_ref().map_or("— (unchanged)".into(), summary),
            r.cpu_net * 1000.0,
            r.cpu_raw * 1000.0,
            r.loadgen_cpu * 1000.0,
            r.bytes / 1024.0,
            r.cloud_responses,
            r.own_responses,
            r.others,
        );
    }
    println!();
    println!(
        "| mode | streams | report streams acked / cp idle after (s) / cp CPU (s) | ADS streams ready / cp idle after (s) | cp CPU ADS connect (s) | cp idle CPU, heartbeats (ms/s) | cp RSS connected / after trials / peak (MiB) | one cloud stream's SRDS (KiB) | loadgen RSS (MiB) | stream retries |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for i in infos {
        println!(
            "| {} | {} | {:.2} / {:.2} / {:.1} | {:.2} / {:.2} | {:.2} | {:.1} | {} / {} / {} | {:.1} | {} | {} |",
            i.mode,
            i.streams,
            i.reports_connect.as_secs_f64(),
            i.reports_settle.as_secs_f64(),
            i.reports_cpu,
            i.ads_connect.as_secs_f64(),
            i.ads_settle.as_secs_f64(),
            i.cpu_connect,
            i.idle_cpu_per_s * 1000.0,
            mib(i.rss_connected),
            mib(i.rss_after),
            mib(i.hwm),
            i.cloud_srds_kib,
            mib(i.loadgen_rss),
            i.retries,
        );
    }
    println!();
    println!(
        "Each trial: one vehicle's report (power LOW / ON as a `LinkChange`), or its report stream closed / opened again, timed from just before it is sent to the moment every cloud stream has received (ACKed: and queued its ACK) an SRDS response of a new version, and, for power changes, the vehicle's own ADS stream its new RDS (`on_low_power: cloud`). Then until nothing arrived anywhere for {} ms; other vehicle streams' responses are counted over the whole trial. cp CPU: utime+stime around each batch, net of the idle rate (the fleet's heartbeats) over the batch's wall time. Pushed: `misaki_xds_push_bytes_total` (resource bytes, all types). One cloud stream's SRDS: pushed bytes of a power-low change / cloud streams.",
        quiet.as_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_has_a_gateway_and_a_low_power_replica() {
        let y = policy_yaml(2);
        assert!(y.contains("  vehicle_gateways: [127.0.0.1]\n"));
        assert!(y.contains("vehicle_tunnel_class: standard"));
        assert!(y.contains("on_low_power: cloud"));
        assert_eq!(y.matches("name: svc-").count(), 2);
    }

    #[test]
    fn trial_vehicles_are_distinct_within_a_set_and_apart_across() {
        for n in [1000, 10_000] {
            let a: std::collections::BTreeSet<_> =
                (0..100).map(|i| trial_vehicle(i, 0, n)).collect();
            let b: std::collections::BTreeSet<_> =
                (0..100).map(|i| trial_vehicle(i, 1, n)).collect();
            assert_eq!(a.len(), 100);
            assert_eq!(b.len(), 100);
            assert!(a.is_disjoint(&b));
        }
    }
}
