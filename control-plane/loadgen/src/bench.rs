//! The fleet-scale benchmark: for each (streams, connections, mode) a fresh misaki-cp,
//! N simulated vehicles, and the figures the issue asks for, as one Markdown table.
//!
//! Phases per row, with misaki-cp's CPU (utime+stime) read around each:
//! 1. idle: misaki-cp started on the benchmark policy, RSS read;
//! 2. connect: N streams opened at once (a fleet reconnecting after a control-plane
//!    restart), until every stream has answered every type it subscribes to
//!    (CDS/EDS/LDS/RDS, and SRDS for scoped routes); RSS read again after a short
//!    pause, so the per-stream figure is the steady state;
//! 3. fleet change: `edits` policy edits (the `standard` timeout: every vehicle's RDS),
//!    each timed from just before the file is saved to the last response every stream
//!    gets for it;
//! 4. single vehicle: a new vehicle connecting and receiving its full config while the
//!    fleet stays connected, `trials` times. (A change aimed at one vehicle cannot be
//!    expressed yet: the compiler's input has no per-vehicle state — see the report.)
//!
//! Bytes pushed per vehicle (connect, and per fleet change) come from misaki-cp's
//! `misaki_xds_push_bytes_total` (resource bytes, all types) read around the phase.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{ClientConfig, Mode, Target};
use crate::fleet::{Fleet, join_one};
use crate::policy::PolicySpec;
use crate::stats::{Summary, ms};
use misaki_harness::procfs;

use crate::sys;

/// Everything one row needs.
#[derive(Debug, Clone)]
pub struct RowSpec {
    pub mode: Mode,
    pub streams: usize,
    /// 0: one connection per stream.
    pub conns: usize,
    pub edits: usize,
    pub trials: usize,
    pub extra_services: usize,
    pub nack_every: u64,
    pub nack_version: Option<String>,
}

/// One row of the table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub mode: &'static str,
    pub streams: usize,
    pub conns: usize,
    pub connect: Duration,
    pub cpu_connect: f64,
    pub rss_idle: u64,
    pub rss_connected: u64,
    pub rss_after: u64,
    pub hwm: u64,
    pub fleet: Summary,
    pub cpu_per_edit: f64,
    /// This process's CPU per fleet change: the client competes for the same cores.
    pub loadgen_cpu_per_edit: f64,
    pub join: Summary,
    pub cpu_per_join: f64,
    pub loadgen_rss: u64,
    pub nacks: u64,
    /// misaki-cp's push bytes per stream: connecting, and per fleet change.
    pub bytes_connect: f64,
    pub bytes_per_edit: f64,
    /// Stream retries (Envoy-like reconnects) while connecting, and afterwards.
    pub retries_connect: u64,
    pub retries_after: u64,
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / (1024.0 * 1024.0))
}

/// misaki-cp's `misaki_xds_push_bytes_total`, summed over resource types.
pub async fn push_bytes(admin: u16) -> Result<u64> {
    let (status, body) = tokio::task::spawn_blocking(move || sys::http_get(admin, "/metrics"))
        .await?
        .context("GET /metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    let mut sum = 0;
    for line in body.lines() {
        if let Some(v) = line
            .strip_prefix("misaki_xds_push_bytes_total{")
            .and_then(|l| l.split_whitespace().last())
        {
            sum += v
                .parse::<u64>()
                .with_context(|| format!("metric line {line:?}"))?;
        }
    }
    Ok(sum)
}

/// Bytes of memory still available (`MemAvailable`).
fn mem_available() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .context("no MemAvailable")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("MemAvailable value")?
        .parse()?;
    Ok(kib * 1024)
}

/// Refuse a row the machine cannot hold. The budget is generous (client and server
/// together, measured well under 200 KiB per stream) and leaves 4 GiB for the other
/// engineers building on this machine.
pub fn check_memory(streams: usize) -> Result<()> {
    let need = streams as u64 * 200 * 1024 + 4 * 1024 * 1024 * 1024;
    let have = mem_available()?;
    if have < need {
        bail!(
            "{streams} streams need ~{} MiB but only {} MiB is available",
            mib(need),
            mib(have)
        );
    }
    Ok(())
}

pub async fn run_row(cp_bin: &Path, dir: &Path, spec: &RowSpec) -> Result<Row> {
    check_memory(spec.streams)?;
    let tag = format!(
        "{}-{}-c{}",
        spec.mode.as_str(),
        spec.streams,
        if spec.conns == 0 {
            "per-stream".to_string()
        } else {
            spec.conns.to_string()
        }
    );
    let row_dir = dir.join(&tag);
    std::fs::create_dir_all(&row_dir)?;
    let policy_path = row_dir.join("mesh.yaml");
    let mut policy = PolicySpec {
        extra: spec.extra_services,
        vehicle_service: true,
        standard_timeout_s: 10,
    };
    policy.save(&policy_path)?;
    let (mut cp, xds_port, admin) = sys::start_cp(cp_bin, &policy_path, &row_dir, &tag)?;
    let pid = cp.pid();
    let target = Target::plain(format!("127.0.0.1:{xds_port}"));
    let cfg = Arc::new(ClientConfig {
        mode: spec.mode,
        nack_every: spec.nack_every,
        nack_version: spec.nack_version.clone(),
        cluster: "vehicle",
    });
    let mut row = Row {
        mode: spec.mode.as_str(),
        streams: spec.streams,
        conns: if spec.conns == 0 || spec.conns >= spec.streams {
            spec.streams
        } else {
            spec.conns
        },
        ..Row::default()
    };

    // 1. idle
    tokio::time::sleep(Duration::from_millis(500)).await;
    row.rss_idle = procfs::vm_bytes(pid, "VmRSS")?;

    // 2. connect
    eprintln!("[{tag}] connecting {} streams", spec.streams);
    let cpu0 = procfs::cpu_secs(pid)?;
    let bytes0 = push_bytes(admin).await?;
    let start = Instant::now();
    let fleet = Fleet::connect(&target, cfg.clone(), spec.streams, spec.conns, "veh-").await?;
    fleet
        .wait_ready(Duration::from_secs(300), || Ok(cp.check_alive()?))
        .await?;
    row.connect = start.elapsed();
    let retries = || {
        fleet
            .shared
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    row.retries_connect = retries();
    row.cpu_connect = procfs::cpu_secs(pid)? - cpu0;
    let per_stream = |b: u64| b as f64 / spec.streams.max(1) as f64;
    // Let the allocator and the last ACKs settle before reading the steady state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    row.rss_connected = procfs::vm_bytes(pid, "VmRSS")?;
    let bytes1 = push_bytes(admin).await?;
    row.bytes_connect = per_stream(bytes1 - bytes0);
    eprintln!(
        "[{tag}] {} streams ready in {:.2}s; cp RSS {} MiB",
        spec.streams,
        row.connect.as_secs_f64(),
        mib(row.rss_connected)
    );

    // 3. fleet-wide changes
    let mut all = Vec::new();
    let mut cpu_edits = 0.0;
    let mut lg_cpu_edits = 0.0;
    let me = std::process::id();
    for e in 0..spec.edits {
        policy.standard_timeout_s += 1;
        let cpu_a = procfs::cpu_secs(pid)?;
        let lg_a = procfs::cpu_secs(me)?;
        // Wall clock too, to line the edit up with misaki-cp's log timestamps.
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t0 = fleet.shared.now_ns();
        policy.save(&policy_path)?;
        let lat = fleet
            .settle_after(
                t0,
                crate::client::R,
                Duration::from_millis(300),
                Duration::from_secs(120),
            )
            .await
            .with_context(|| format!("fleet change {}", e + 1))?;
        cpu_edits += procfs::cpu_secs(pid)? - cpu_a;
        lg_cpu_edits += procfs::cpu_secs(me)? - lg_a;
        let s = Summary::of(&lat);
        eprintln!(
            "[{tag}] fleet change {} (saved at unix {:.6}): p50 {} p99 {} max {} ms",
            e + 1,
            wall.as_secs_f64(),
            ms(s.p50),
            ms(s.p99),
            ms(s.max)
        );
        all.extend(lat);
        cp.check_alive()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    row.fleet = Summary::of(&all);
    row.cpu_per_edit = cpu_edits / spec.edits.max(1) as f64;
    row.loadgen_cpu_per_edit = lg_cpu_edits / spec.edits.max(1) as f64;
    row.bytes_per_edit = per_stream(push_bytes(admin).await? - bytes1) / spec.edits.max(1) as f64;
    row.rss_after = procfs::vm_bytes(pid, "VmRSS")?;

    // 4. one new vehicle at a time
    let mut joins = Vec::new();
    let cpu_a = procfs::cpu_secs(pid)?;
    for k in 0..spec.trials {
        joins.push(join_one(&target, cfg.clone(), format!("veh-new-{k}")).await?);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    row.cpu_per_join = (procfs::cpu_secs(pid)? - cpu_a) / spec.trials.max(1) as f64;
    row.join = Summary::of(&joins);
    row.hwm = procfs::vm_bytes(pid, "VmHWM")?;
    row.loadgen_rss = procfs::vm_bytes(std::process::id(), "VmRSS")?;
    row.nacks = fleet
        .recs
        .iter()
        .map(|r| r.nacks.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    row.retries_after = retries() - row.retries_connect;
    fleet.check_failed()?;
    cp.check_alive()?;
    drop(fleet);
    drop(cp);
    Ok(row)
}

pub fn print_table(rows: &[Row], edits: usize, trials: usize) {
    println!(
        "| mode | streams | conns | connect all (s) | cp CPU connect (s) | cp RSS idle → connected (MiB) | cp RSS / stream (KiB) | fleet change p50 / p99 / max (ms) | cp / loadgen CPU per fleet change (s) | new vehicle full config p50 / p99 (ms) | cp CPU / new vehicle (ms) | cp RSS after edits / peak (MiB) | loadgen RSS (MiB) | stream retries connect / later | pushed / vehicle: connect / fleet change (KiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let per_stream =
            (r.rss_connected as f64 - r.rss_idle as f64) / r.streams.max(1) as f64 / 1024.0;
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {} → {} | {:.1} | {} / {} / {} | {:.2} / {:.2} | {} / {} | {:.1} | {} / {} | {} | {} / {} | {:.1} / {:.2} |",
            r.mode,
            r.streams,
            r.conns,
            r.connect.as_secs_f64(),
            r.cpu_connect,
            mib(r.rss_idle),
            mib(r.rss_connected),
            per_stream,
            ms(r.fleet.p50),
            ms(r.fleet.p99),
            ms(r.fleet.max),
            r.cpu_per_edit,
            r.loadgen_cpu_per_edit,
            ms(r.join.p50),
            ms(r.join.p99),
            r.cpu_per_join * 1000.0,
            mib(r.rss_after),
            mib(r.hwm),
            mib(r.loadgen_rss),
            r.retries_connect,
            r.retries_after,
            r.bytes_connect / 1024.0,
            r.bytes_per_edit / 1024.0,
        );
    }
    let nacks: u64 = rows.iter().map(|r| r.nacks).sum();
    println!();
    println!(
        "Fleet change: {edits} edits per row (the `standard` class timeout → every vehicle's RDS), latency pooled over all streams and edits, from just before the policy file is renamed into place to the last response each stream got for it. New vehicle: {trials} trials, new connection + stream until every type it subscribes to (CDS/EDS/LDS/RDS, SRDS for scoped routes) is answered. Pushed: misaki-cp's `misaki_xds_push_bytes_total` (resource bytes, all types) per stream, while connecting and per fleet change. Stream retries: a failed connection or stream is retried as Envoy does (jittered exponential backoff).{}",
        if nacks > 0 {
            format!(" NACKs sent: {nacks}.")
        } else {
            String::new()
        }
    );
}

/// The default misaki-cp: the one beside this binary (same target profile).
pub fn default_cp() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("misaki-cp")))
        .unwrap_or_else(|| PathBuf::from("misaki-cp"))
}
