//! What mutual TLS costs misaki-cp (issue 10), against plaintext in the same run with
//! the same load generator.
//!
//! Per ADS mode, one row per transport (plaintext first), each on a fresh misaki-cp;
//! over mTLS it runs as docs/security.md sets a fleet up (`--tls-cert --tls-key
//! --client-ca --crl --ca`, a fresh CA). Every simulated vehicle `car-{i}` has its own
//! connection, as an Envoy does, and over mTLS its own certificate (issued before
//! anything is timed; resumption off, so each connection is a full handshake):
//!
//! 1. idle: RSS and open descriptors;
//! 2. connect: all N vehicles dial at once a misaki-cp that has just started (a fleet
//!    after a control-plane restart) until every vehicle has its config: wall time,
//!    misaki-cp CPU (utime+stime from /proc, so per 1,000 vehicles), loadgen CPU
//!    (it competes for the same cores), retries;
//! 3. RSS after a 2 s settle, per vehicle over idle;
//! 4. reconnect: every vehicle drops its connection; once misaki-cp has closed all of
//!    them (descriptors back to idle), all N dial again at once (a fleet back after a
//!    network outage; misaki-cp warm): the same figures, and RSS again.
//!
//! The 1-minute load average is read around each phase: the machine is shared.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{ClientConfig, Mode, Target};
use crate::fleet::Fleet;
use crate::policy::PolicySpec;
use misaki_harness::{Process, procfs};

use crate::sys;
use crate::tls::{FleetTls, Pki, ServerFiles};

/// Plaintext or mutual TLS on misaki-cp's gRPC port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Plain,
    Mtls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Plain => "plaintext",
            Transport::Mtls => "mTLS",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // clap's spelling, for `default_values_t`.
        f.write_str(match self {
            Transport::Plain => "plain",
            Transport::Mtls => "mtls",
        })
    }
}

/// All N vehicles dialling at once until all have their config.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub wall: Duration,
    pub cp_cpu: f64,
    pub loadgen_cpu: f64,
    pub retries: u64,
    /// misaki_tls_handshakes_total during the phase, by result (`ok`, or why not).
    pub handshakes: BTreeMap<String, u64>,
    /// misaki_xds_push_bytes_total during the phase (resource bytes, all types).
    pub pushed: u64,
    /// 1-minute load average before and after.
    pub load: (f64, f64),
}

#[derive(Debug, Clone)]
pub struct Row {
    pub mode: Mode,
    pub transport: Transport,
    pub vehicles: usize,
    pub rss_idle: u64,
    pub rss_connected: u64,
    pub hwm: u64,
    pub loadgen_rss: u64,
    pub connect: Phase,
    /// Each reconnect of the whole fleet, and misaki-cp's RSS after it.
    pub reconnects: Vec<(Phase, u64)>,
}

/// What one run needs besides the rows' own settings.
#[derive(Debug)]
pub struct Setup<'a> {
    pub cp_bin: &'a Path,
    pub dir: &'a Path,
    pub vehicles: usize,
    pub extra_services: usize,
    /// How many times the connected fleet drops and redials at once.
    pub reconnects: usize,
    /// Set when any row is mTLS.
    pub tls: Option<(ServerFiles, Arc<FleetTls>)>,
}

/// The vehicles' names: node id = vehicle id = the certificate's vehicle.
pub fn vehicle_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("car-{i}")).collect()
}

/// Issue the fleet's certificates (before anything is timed).
pub fn issue(dir: &Path, n: usize) -> Result<(ServerFiles, Arc<FleetTls>)> {
    let start = Instant::now();
    let (pki, files) = Pki::create(&dir.join("pki"))?;
    let fleet = pki.vehicles(&vehicle_ids(n))?;
    eprintln!(
        "[mtls] issued {n} vehicle certificates (ECDSA P-256) in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok((files, Arc::new(fleet)))
}

/// misaki-cp's Prometheus text.
async fn scrape(admin: u16) -> Result<String> {
    let (status, body) = tokio::task::spawn_blocking(move || sys::http_get(admin, "/metrics"))
        .await?
        .context("GET /metrics")?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body)
}

/// The sum of metric `name` over its label sets, restricted to lines containing
/// `filter` (e.g. `result="ok"`).
fn metric_sum(body: &str, name: &str, filter: &str) -> u64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                && l.contains(filter)
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A metric's value per value of its one label `label` (`name{label="v"} n`).
fn by_label(body: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let open = format!("{name}{{{label}=\"");
    body.lines()
        .filter_map(|l| {
            let (v, rest) = l.strip_prefix(&open)?.split_once('"')?;
            let n = rest.split_whitespace().last()?.parse::<f64>().ok()?;
            Some((v.to_string(), n as u64))
        })
        .collect()
}

/// Handshakes so far, by result.
async fn handshakes(admin: u16) -> Result<BTreeMap<String, u64>> {
    let body = scrape(admin).await?;
    Ok(by_label(&body, "misaki_tls_handshakes_total", "result"))
}

/// `after - before`, per key, leaving out what did not move.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// "ok / failed (why: n, …)".
fn handshake_cell(h: &BTreeMap<String, u64>) -> String {
    let ok = h.get("ok").copied().unwrap_or(0);
    let failed: Vec<String> = h
        .iter()
        .filter(|(k, _)| *k != "ok")
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if failed.is_empty() {
        format!("{ok} / 0")
    } else {
        let n: u64 = h.iter().filter(|(k, _)| *k != "ok").map(|(_, v)| v).sum();
        format!("{ok} / {n} ({})", failed.join(", "))
    }
}

/// Dial all vehicles at once and wait until every one has its config.
async fn dial_all(
    cp: &mut Process,
    admin: u16,
    target: &Arc<Target>,
    cfg: &Arc<ClientConfig>,
    n: usize,
) -> Result<(Fleet, Phase)> {
    let pid = cp.pid();
    let me = std::process::id();
    let load0 = procfs::loadavg();
    let hs0 = handshakes(admin).await?;
    let pushed0 = crate::bench::push_bytes(admin).await?;
    let (cpu0, lg0) = (procfs::cpu_secs(pid)?, procfs::cpu_secs(me)?);
    let start = Instant::now();
    let fleet = Fleet::connect(target, cfg.clone(), n, 0, "car-").await?;
    fleet
        .wait_ready(Duration::from_secs(300), || Ok(cp.check_alive()?))
        .await?;
    let wall = start.elapsed();
    let (cpu1, lg1) = (procfs::cpu_secs(pid)?, procfs::cpu_secs(me)?);
    let hs1 = handshakes(admin).await?;
    let pushed = crate::bench::push_bytes(admin).await? - pushed0;
    let phase = Phase {
        wall,
        cp_cpu: cpu1 - cpu0,
        loadgen_cpu: lg1 - lg0,
        retries: fleet.shared.reconnects.load(Ordering::Relaxed),
        handshakes: delta(&hs0, &hs1),
        pushed,
        load: (load0, procfs::loadavg()),
    };
    Ok((fleet, phase))
}

/// Wait until misaki-cp has no xDS stream and no more descriptors than when idle:
/// every dropped connection is closed on its side too.
async fn wait_closed(cp: &mut Process, admin: u16, idle_fds: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        cp.check_alive()?;
        let streams = metric_sum(&scrape(admin).await?, "misaki_xds_streams", "");
        let fds = procfs::fds(cp.pid())?;
        if streams == 0 && fds <= idle_fds {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("misaki-cp still has {streams} streams and {fds} descriptors (idle: {idle_fds})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run_row(setup: &Setup<'_>, mode: Mode, transport: Transport) -> Result<Row> {
    let n = setup.vehicles;
    crate::bench::check_memory(n)?;
    let tag = format!("{}-{}-{n}", mode.as_str(), transport);
    let row_dir = setup.dir.join(&tag);
    std::fs::create_dir_all(&row_dir)?;
    let policy_path = row_dir.join("mesh.yaml");
    PolicySpec {
        extra: setup.extra_services,
        vehicle_service: true,
        standard_timeout_s: 10,
    }
    .save(&policy_path)?;
    let (tls_args, fleet_tls) = match (transport, &setup.tls) {
        (Transport::Plain, _) => (Vec::new(), None),
        (Transport::Mtls, Some((files, fleet))) => (files.args(), Some(fleet.clone())),
        (Transport::Mtls, None) => bail!("an mTLS row needs certificates issued first"),
    };
    let (mut cp, xds_port, admin) =
        sys::start_cp_with(setup.cp_bin, &policy_path, &row_dir, &tag, &tls_args)?;
    let pid = cp.pid();
    let target = Arc::new(Target {
        addr: format!("127.0.0.1:{xds_port}"),
        tls: fleet_tls,
    });
    let cfg = Arc::new(ClientConfig {
        mode,
        nack_every: 0,
        nack_version: None,
        cluster: "vehicle",
    });

    // 1. idle
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = procfs::vm_bytes(pid, "VmRSS")?;
    let idle_fds = procfs::fds(pid)?;

    // 2. connect, 3. steady state
    eprintln!("[{tag}] {n} vehicles connecting at once");
    let (fleet, connect) = dial_all(&mut cp, admin, &target, &cfg, n).await?;
    eprintln!(
        "[{tag}] all have their config in {:.2}s; misaki-cp CPU {:.2}s, loadgen CPU {:.2}s, {} retries",
        connect.wall.as_secs_f64(),
        connect.cp_cpu,
        connect.loadgen_cpu,
        connect.retries
    );
    // Let the allocator and the last ACKs settle before reading the steady state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.check_failed()?;
    let rss_connected = procfs::vm_bytes(pid, "VmRSS")?;
    let loadgen_rss = procfs::vm_bytes(std::process::id(), "VmRSS")?;

    // 4. reconnect
    let mut reconnects = Vec::new();
    let mut fleet = fleet;
    for k in 1..=setup.reconnects {
        drop(fleet);
        wait_closed(&mut cp, admin, idle_fds).await?;
        eprintln!("[{tag}] all connections closed; {n} vehicles reconnecting at once ({k})");
        let (f, phase) = dial_all(&mut cp, admin, &target, &cfg, n).await?;
        eprintln!(
            "[{tag}] all have their config again in {:.2}s; misaki-cp CPU {:.2}s, {} retries",
            phase.wall.as_secs_f64(),
            phase.cp_cpu,
            phase.retries
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        f.check_failed()?;
        reconnects.push((phase, procfs::vm_bytes(pid, "VmRSS")?));
        fleet = f;
    }
    drop(fleet);
    let hwm = procfs::vm_bytes(pid, "VmHWM")?;
    cp.check_alive()?;
    Ok(Row {
        mode,
        transport,
        vehicles: n,
        rss_idle,
        rss_connected,
        hwm,
        loadgen_rss,
        connect,
        reconnects,
    })
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

/// RSS over idle per vehicle, KiB.
fn kib_per(rss: u64, idle: u64, n: usize) -> f64 {
    (rss as f64 - idle as f64) / n.max(1) as f64 / 1024.0
}

/// RSS per vehicle once the fleet first connected.
fn per_vehicle_kib(r: &Row) -> f64 {
    kib_per(r.rss_connected, r.rss_idle, r.vehicles)
}

fn per_1000(r: &Row, p: &Phase) -> f64 {
    p.cp_cpu / r.vehicles.max(1) as f64 * 1000.0
}

pub fn print_tables(rows: &[Row]) {
    println!(
        "| ADS | transport | vehicles | phase | all have their config (s) | misaki-cp CPU (s) | misaki-cp CPU per 1,000 vehicles (s) | loadgen CPU (s) | stream retries | TLS handshakes ok / failed | load avg (1 min) before → after |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let phases = std::iter::once(("connect (fresh misaki-cp)".to_string(), &r.connect)).chain(
            r.reconnects
                .iter()
                .enumerate()
                .map(|(k, (p, _))| (format!("reconnect {} (warm)", k + 1), p)),
        );
        for (name, p) in phases {
            let hs = match r.transport {
                Transport::Plain => "—".to_string(),
                Transport::Mtls => handshake_cell(&p.handshakes),
            };
            println!(
                "| {} | {} | {} | {name} | {:.2} | {:.2} | {:.3} | {:.2} | {} | {hs} | {:.2} → {:.2} |",
                r.mode.as_str(),
                r.transport.as_str(),
                r.vehicles,
                p.wall.as_secs_f64(),
                p.cp_cpu,
                per_1000(r, p),
                p.loadgen_cpu,
                p.retries,
                p.load.0,
                p.load.1,
            );
        }
    }
    println!();
    println!(
        "| ADS | transport | vehicles | misaki-cp RSS idle → connected → after each reconnect (MiB) | RSS per vehicle (KiB): connected / after the last reconnect | misaki-cp peak RSS (MiB) | loadgen RSS (MiB) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} → {}{} | {:.1} / {} | {} | {} |",
            r.mode.as_str(),
            r.transport.as_str(),
            r.vehicles,
            mib(r.rss_idle),
            mib(r.rss_connected),
            r.reconnects
                .iter()
                .map(|(_, rss)| format!(" → {}", mib(*rss)))
                .collect::<String>(),
            per_vehicle_kib(r),
            r.reconnects
                .last()
                .map_or("—".to_string(), |(_, rss)| format!(
                    "{:.1}",
                    kib_per(*rss, r.rss_idle, r.vehicles)
                )),
            mib(r.hwm),
            mib(r.loadgen_rss),
        );
    }
    // mTLS against plaintext, per mode, when both were measured.
    let mut lines = Vec::new();
    for m in rows.iter().filter(|r| r.transport == Transport::Mtls) {
        let Some(p) = rows
            .iter()
            .find(|r| r.transport == Transport::Plain && r.mode == m.mode)
        else {
            continue;
        };
        lines.push(format!(
            "{}: mTLS costs misaki-cp {:.2}× the CPU of plaintext to connect the fleet ({:.3} vs {:.3} s per 1,000), and {:+.1} KiB per vehicle ({:.1} vs {:.1} KiB).",
            m.mode.as_str(),
            per_1000(m, &m.connect) / per_1000(p, &p.connect).max(1e-9),
            per_1000(m, &m.connect),
            per_1000(p, &p.connect),
            per_vehicle_kib(m) - per_vehicle_kib(p),
            per_vehicle_kib(m),
            per_vehicle_kib(p),
        ));
    }
    if !lines.is_empty() {
        println!();
        for l in lines {
            println!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_over_its_labels() {
        let body = "\
# HELP misaki_tls_handshakes_total TLS handshakes
misaki_tls_handshakes_total{result=\"ok\"} 9998
misaki_tls_handshakes_total{result=\"timeout\"} 2
misaki_tls_handshakes_in_flight 0
misaki_xds_streams{kind=\"sotw\"} 5
misaki_xds_streams{kind=\"delta\"} 0
";
        assert_eq!(metric_sum(body, "misaki_tls_handshakes_total", ""), 10000);
        assert_eq!(
            metric_sum(body, "misaki_tls_handshakes_total", "result=\"ok\""),
            9998
        );
        assert_eq!(metric_sum(body, "misaki_xds_streams", ""), 5);
        assert_eq!(metric_sum(body, "misaki_tls_handshakes", ""), 0);
        assert_eq!(metric_sum(body, "misaki_tls_handshakes_in_flight", ""), 0);
        let h = by_label(body, "misaki_tls_handshakes_total", "result");
        assert_eq!(h.len(), 2);
        assert_eq!(handshake_cell(&h), "9998 / 2 (timeout 2)");
        let before = BTreeMap::from([("ok".to_string(), 8)]);
        assert_eq!(handshake_cell(&delta(&before, &h)), "9990 / 2 (timeout 2)");
    }
}
