//! `misaki-loadgen shared-fleet`: misaki-cp replicas in shared mode on one etcd (issue
//! 11's figures). Simulated vehicles report over the real FleetService, spread evenly
//! over the replicas; measured:
//! - absorbing the fleet: until every replica's `/fleet` lists every vehicle online;
//! - fleet-view convergence: one vehicle's link change (a new uplink for `standard`)
//!   sent to its replica → every other replica's `/fleet/{vehicle}` shows it, per trial
//!   (distinct vehicles, so the 1 s write coalescing never applies);
//! - a steady load of one link change per vehicle per minute: etcd's puts per second
//!   and database size, and each replica's CPU;
//! - a replica killed (SIGKILL): its vehicles' report streams reconnect to the others,
//!   and so do their ADS streams (each vehicle also holds one, as its Envoy would),
//!   each after a delay drawn over 500 ms (Envoy's first retry is jittered over
//!   500 ms); per vehicle, the time from the kill until its new ADS stream has every
//!   subscribed type answered (back on config).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use misaki_harness::{Etcd, Process, http, procfs};
use misaki_proto::fleet_v1 as pb;
use pb::vehicle_report::Report;
use serde_json::Value;

use crate::client::{ClientConfig, Mode, Target};
use crate::fleet::Fleet;
use crate::stats::{Summary, ms};
use crate::sys;
use crate::vehicle_state::{Reporters, policy_yaml};

#[derive(Debug, Clone)]
pub struct Spec {
    pub vehicles: usize,
    pub replicas: usize,
    pub trials: usize,
    pub conns: usize,
    pub heartbeat: Duration,
    pub lease_ttl: String,
    /// How long the steady one-change-per-vehicle-per-minute load runs.
    pub steady: Duration,
    /// The vehicles' ADS streams.
    pub mode: Mode,
}

/// Envoy's first reconnect is jittered over its 500 ms backoff base.
const ENVOY_RETRY_SPREAD: Duration = Duration::from_millis(500);

fn ads_config(mode: Mode) -> Arc<ClientConfig> {
    Arc::new(ClientConfig {
        mode,
        nack_every: 0,
        nack_version: None,
        cluster: "vehicle",
    })
}

struct Replica {
    proc: Process,
    xds: u16,
    admin: u16,
    reporters: Reporters,
    /// Its vehicles' ADS streams (opened once every replica lists the fleet).
    ads: Option<Fleet>,
    /// Its vehicles are `car-{first}` … `car-{first + n - 1}`.
    first: usize,
    n: usize,
}

fn fleet_total_online(admin: u16) -> Option<(u64, u64)> {
    let r = http::get(admin, "/fleet").ok()?;
    let v: Value = serde_json::from_str(&r.body).ok()?;
    Some((v["total"].as_u64()?, v["online"].as_u64()?))
}

/// Standard's uplink of `vehicle` as `admin`'s replica shows it (the owner's full
/// record or another replica's compact one).
fn uplink(admin: u16, vehicle: &str) -> Option<String> {
    let r = http::get(admin, &format!("/fleet/{vehicle}")).ok()?;
    let v: Value = serde_json::from_str(&r.body).ok()?;
    let u = match &v["uplinks"] {
        Value::Object(u) => u.get("standard").cloned(),
        _ => Some(v["selections"]["standard"]["uplink"].clone()),
    }?;
    u.as_str().map(str::to_string)
}

fn change(uplink: &str) -> Report {
    Report::LinkChange(pb::LinkChange {
        selections: vec![pb::ClassSelection {
            class: "standard".into(),
            uplink: uplink.into(),
            reason: "preferred_stable".into(),
        }],
        ..Default::default()
    })
}

/// A Prometheus sample's value from `text` (the first series of `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// etcd's puts so far and database size (etcd 3.4 names, with 3.5's as fallback).
fn etcd_counts(etcd: &Etcd) -> Result<(f64, f64)> {
    let text = http::get(etcd.metrics_port(), "/metrics")?.body;
    let puts = metric(&text, "etcd_mvcc_put_total")
        .or_else(|| metric(&text, "etcd_debugging_mvcc_put_total"))
        .context("etcd put counter")?;
    let size = metric(&text, "etcd_mvcc_db_total_size_in_bytes")
        .or_else(|| metric(&text, "etcd_debugging_mvcc_db_total_size_in_bytes"))
        .context("etcd db size")?;
    Ok((puts, size))
}

pub async fn run(cp_bin: &Path, dir: &Path, spec: &Spec) -> Result<()> {
    if spec.replicas < 2 || spec.vehicles < spec.replicas {
        bail!("need at least 2 replicas and a vehicle per replica");
    }
    let tag = format!("shared-fleet-{}x{}", spec.replicas, spec.vehicles);
    let etcd = tokio::task::spawn_blocking(Etcd::start).await?;
    let policy = dir.join("mesh.yaml");
    std::fs::write(&policy, policy_yaml(0))?;
    let url = etcd.url();
    let per = spec.vehicles.div_ceil(spec.replicas);
    let mut replicas = Vec::new();
    let start = Instant::now();
    for r in 0..spec.replicas {
        let extra = ["--store", &url, "--lease-ttl", &spec.lease_ttl].map(Into::into);
        let (proc, xds, admin) =
            sys::start_cp_with(cp_bin, &policy, dir, &format!("{tag}-{r}"), &extra)?;
        let first = r * per;
        let n = per.min(spec.vehicles - first);
        let target = Target::plain(format!("127.0.0.1:{xds}"));
        let reporters = Reporters::connect_from(&target, first, n, spec.conns, spec.heartbeat)
            .await
            .with_context(|| format!("replica {r}'s vehicles"))?;
        replicas.push(Replica {
            proc,
            xds,
            admin,
            reporters,
            ads: None,
            first,
            n,
        });
    }
    let acked = start.elapsed();
    let total = spec.vehicles as u64;
    for r in &replicas {
        let admin = r.admin;
        let deadline = Instant::now() + Duration::from_secs(300);
        while fleet_total_online(admin) != Some((total, total)) {
            if Instant::now() > deadline {
                bail!(
                    "replica's /fleet never showed {total} online: {:?}",
                    fleet_total_online(admin)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let absorbed = start.elapsed();
    eprintln!(
        "[{tag}] {} vehicles acknowledged in {:.1} s; every replica lists all online after {:.1} s",
        spec.vehicles,
        acked.as_secs_f64(),
        absorbed.as_secs_f64()
    );
    let ads_start = Instant::now();
    for r in &mut replicas {
        let target = Target::plain(format!("127.0.0.1:{}", r.xds));
        let range = ("car-", r.first..r.first + r.n);
        let cfg = ads_config(spec.mode);
        let fleet = Fleet::connect_range(&target, cfg, range, spec.conns, Duration::ZERO).await?;
        fleet
            .wait_ready(Duration::from_secs(300), || Ok(()))
            .await?;
        r.ads = Some(fleet);
    }
    eprintln!(
        "[{tag}] {} ADS streams ({}) on config after {:.1} s",
        spec.vehicles,
        spec.mode.as_str(),
        ads_start.elapsed().as_secs_f64()
    );

    // Past the write coalescing window of the vehicles' first records.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Convergence: distinct vehicles, round robin over the replicas.
    let mut seen = Vec::new();
    for t in 0..spec.trials {
        let owner = t % replicas.len();
        let r = &replicas[owner];
        let slot = (t / replicas.len() * 7919) % r.n;
        let vehicle = format!("car-{}", r.first + slot);
        // Every vehicle starts on wifi and each trial's vehicle is another one.
        let want = "lte";
        let sent = Instant::now();
        r.reporters.send(slot, change(want))?;
        for (i, other) in replicas.iter().enumerate() {
            if i == owner {
                continue;
            }
            let admin = other.admin;
            let deadline = sent + Duration::from_secs(30);
            loop {
                if uplink(admin, &vehicle).as_deref() == Some(want) {
                    seen.push(sent.elapsed());
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{vehicle}'s change never reached replica {i}");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        }
    }
    let conv = Summary::of(&seen);

    // Steady load: one change per vehicle per minute, spread evenly, for `steady`.
    let cpus0: Vec<f64> = replicas
        .iter()
        .map(|r| procfs::cpu_secs(r.proc.pid()))
        .collect::<std::io::Result<_>>()?;
    let (puts0, _) = etcd_counts(&etcd)?;
    let per_sec = spec.vehicles as f64 / 60.0;
    let t0 = Instant::now();
    let mut sent = 0usize;
    while t0.elapsed() < spec.steady {
        let due = (t0.elapsed().as_secs_f64() * per_sec) as usize;
        while sent < due {
            let v = sent % spec.vehicles;
            let r = &replicas[v / per];
            // A new uplink name each round: every report is a real change.
            let want = format!("uplink-{}", sent / spec.vehicles);
            r.reporters.send(v - r.first, change(&want))?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the last coalesced writes land.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (puts1, size) = etcd_counts(&etcd)?;
    let cpus: Vec<String> = replicas
        .iter()
        .zip(&cpus0)
        .map(|(r, c0)| {
            Ok(format!(
                "{:.0}",
                (procfs::cpu_secs(r.proc.pid())? - c0) / wall * 1000.0
            ))
        })
        .collect::<Result<_>>()?;
    let rss: Vec<String> = replicas
        .iter()
        .map(|r| {
            Ok(format!(
                "{:.0}",
                procfs::vm_bytes(r.proc.pid(), "VmRSS")? as f64 / 1048576.0
            ))
        })
        .collect::<Result<_>>()?;
    for r in &replicas {
        r.reporters.check_failed()?;
    }
    let (reconnected, back, on_config) = kill_one(&mut replicas, spec, total).await?;
    let on_config = Summary::of(&on_config);

    println!(
        "| replicas | vehicles | all acknowledged / listed online on every replica (s) | link change → every other replica shows it, p50 / p99 / max (ms), n | steady load: changes/s sent | etcd puts/s | etcd db size (MiB) | replica CPU (ms/s each) | replica RSS (MiB each) | kill -9 of replica 0: its vehicles' report streams acknowledged on the others / every survivor lists all online, none owned by the dead one (s) | its vehicles back on config (ADS {}, every type answered) after the kill, p50 / p99 / max (ms) |",
        spec.mode.as_str()
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|");
    println!(
        "| {} | {} | {:.1} / {:.1} | {} / {} / {}, {} | {:.0} | {:.0} | {:.1} | {} | {} | {:.1} / {:.1} | {} / {} / {} |",
        spec.replicas,
        spec.vehicles,
        acked.as_secs_f64(),
        absorbed.as_secs_f64(),
        ms(conv.p50),
        ms(conv.p99),
        ms(conv.max),
        seen.len(),
        sent as f64 / wall,
        (puts1 - puts0) / wall,
        size / 1048576.0,
        cpus.join(" / "),
        rss.join(" / "),
        reconnected.as_secs_f64(),
        back.as_secs_f64(),
        ms(on_config.p50),
        ms(on_config.p99),
        ms(on_config.max),
    );
    drop(replicas);
    drop(etcd);
    Ok(())
}

/// Kill replica 0 (SIGKILL). Its vehicles reconnect to the others, split evenly (as
/// vehicles with the next address on their list would): ADS streams each after a
/// delay over [`ENVOY_RETRY_SPREAD`], report streams at once. Returns how long until
/// the report streams were all acknowledged, until every survivor listed all `total`
/// vehicles online with none owned by the dead replica, and per vehicle until its ADS
/// stream was back on config.
async fn kill_one(
    replicas: &mut Vec<Replica>,
    spec: &Spec,
    total: u64,
) -> Result<(Duration, Duration, Vec<Duration>)> {
    let mut dead = replicas.remove(0);
    let dead_name = http::get(dead.admin, "/fleet")
        .ok()
        .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
        .and_then(|v| v["replica"].as_str().map(str::to_string))
        .context("the replica's name")?;
    let killed = Instant::now();
    dead.proc.kill();
    drop(dead.reporters);
    drop(dead.ads);
    let chunk = dead.n.div_ceil(replicas.len());
    let shares: Vec<(usize, usize, Arc<Target>)> = replicas
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let first = dead.first + k * chunk;
            let n = chunk.min(dead.n.saturating_sub(k * chunk));
            (first, n, Target::plain(format!("127.0.0.1:{}", r.xds)))
        })
        .filter(|(_, n, _)| *n > 0)
        .collect();
    let mut ads = Vec::new();
    for (first, n, target) in &shares {
        let range = ("car-", *first..first + n);
        let cfg = ads_config(spec.mode);
        ads.push(Fleet::connect_range(target, cfg, range, spec.conns, ENVOY_RETRY_SPREAD).await?);
    }
    let mut moved = Vec::new();
    for (first, n, target) in &shares {
        moved.push(Reporters::connect_from(target, *first, *n, spec.conns, spec.heartbeat).await?);
    }
    let reconnected = killed.elapsed();
    let mut on_config = Vec::new();
    for fleet in &ads {
        fleet
            .wait_ready(Duration::from_secs(300), || Ok(()))
            .await?;
        let since_kill = fleet.shared.epoch.duration_since(killed);
        on_config.extend(fleet.recs.iter().map(|r| {
            since_kill + Duration::from_nanos(r.ready_ns.load(std::sync::atomic::Ordering::Acquire))
        }));
    }
    let stale = |v: &Value| {
        v["vehicles"]
            .as_array()
            .is_none_or(|vs| vs.iter().any(|x| x["owner"] == dead_name.as_str()))
    };
    for r in replicas.iter() {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let f = http::get(r.admin, "/fleet")
                .ok()
                .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
                .unwrap_or(Value::Null);
            if f["total"] == total && f["online"] == total && !stale(&f) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "a survivor never listed all {total} online: {} online",
                    f["online"]
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for m in &moved {
        m.check_failed()?;
    }
    Ok((reconnected, killed.elapsed(), on_config))
}
