//! Real Envoys as the check on the simulated clients.
//!
//! For each mode: a fresh misaki-cp, K real Envoy sidecars (bootstrap
//! envoy-configs/vehicle-sidecar.yaml rewritten as tests/src/process.rs does: xDS
//! port, admin port, node id; `DELTA_GRPC` for delta), then `edits` policy edits each
//! timed to "every stream's `types.rds.last_acked_version` on misaki-cp's `/nodes` is
//! the new version". Then the same with K simulated streams (one connection each, like
//! Envoy) measured the same way, plus the simulated clients' own arrival times, so the
//! two clients are compared by one yardstick.
//!
//! The policy has no vehicle-hosted service here, so the only listener a vehicle
//! Envoy binds is 127.0.0.1:25001 (all K share it via SO_REUSEPORT; no traffic is sent).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::client::{ClientConfig, Mode, Target};
use crate::fleet::Fleet;
use crate::policy::PolicySpec;
use crate::stats::{Summary, ms};
use misaki_harness::{Process, procfs, try_free_port};

use crate::sys;

#[derive(Debug, Clone)]
pub struct EnvoySpec {
    pub envoy: PathBuf,
    pub bootstrap: PathBuf,
    pub count: usize,
    pub edits: usize,
    pub extra_services: usize,
}

#[derive(Debug, Clone)]
pub struct EnvoyRow {
    pub client: &'static str,
    pub mode: &'static str,
    pub streams: usize,
    /// Edit → every stream ACKed (per edit), from polling `/nodes`.
    pub all_acked: Summary,
    /// Edit → each stream's ACK seen on `/nodes` (all streams, all edits).
    pub per_stream_acked: Summary,
    /// Simulated only: edit → response arrival at the client (all streams, all edits).
    pub arrival: Option<Summary>,
    pub cp_rss_connected: u64,
}

fn rewrite_bootstrap(template: &str, xds: u16, admin: u16, node_id: &str, mode: Mode) -> String {
    let mut cfg = String::new();
    for line in template.lines() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let t = line.trim_start();
        let l = if line.contains("port_value: 18000") {
            line.replace("18000", &xds.to_string())
        } else if line.contains("port_value: 1990") {
            let (head, _) = line.split_once("port_value:").expect("port line");
            format!("{head}port_value: {admin} }}")
        } else if t.starts_with("id: ") {
            format!("{indent}id: {node_id}")
        } else if t.starts_with("vehicle_id: ") {
            format!("{indent}vehicle_id: {node_id}")
        } else if t.starts_with("api_type: GRPC") && mode == Mode::Delta {
            format!("{indent}api_type: DELTA_GRPC")
        } else {
            line.to_string()
        };
        cfg.push_str(&l);
        cfg.push('\n');
    }
    cfg
}

fn start_envoy(
    spec: &EnvoySpec,
    dir: &Path,
    xds: u16,
    node_id: &str,
    mode: Mode,
) -> Result<(Process, u16)> {
    let template = fs::read_to_string(&spec.bootstrap)
        .with_context(|| format!("reading {}", spec.bootstrap.display()))?;
    let admin = try_free_port()?;
    let path = dir.join(format!("{node_id}.yaml"));
    fs::write(
        &path,
        rewrite_bootstrap(&template, xds, admin, node_id, mode),
    )?;
    let g = Process::try_spawn(
        "envoy",
        Command::new(&spec.envoy).arg("-c").arg(&path).args([
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            "warn",
        ]),
        dir.join(format!("envoy-{node_id}.log")),
    )?;
    Ok((g, admin))
}

/// RDS (last sent, last ACKed) per stream whose node id starts with `prefix`.
async fn rds_status(admin: u16, prefix: &str) -> Result<HashMap<String, (String, String)>> {
    let (status, body) = tokio::task::spawn_blocking(move || sys::http_get(admin, "/nodes"))
        .await?
        .context("GET /nodes")?;
    if status != 200 {
        bail!("/nodes answered {status}");
    }
    let v: Value = serde_json::from_str(&body).context("/nodes JSON")?;
    let mut out = HashMap::new();
    for s in v["streams"]
        .as_array()
        .context("/nodes: no streams array")?
    {
        let id = s["node_id"].as_str().unwrap_or_default();
        if !id.starts_with(prefix) {
            continue;
        }
        let rds = &s["types"]["rds"];
        let get = |k: &str| rds[k].as_str().unwrap_or_default().to_string();
        out.insert(
            id.to_string(),
            (get("last_sent_version"), get("last_acked_version")),
        );
    }
    Ok(out)
}

/// Wait until `count` streams have ACKed the RDS version they were last sent.
async fn wait_all_acked(admin: u16, prefix: &str, count: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = rds_status(admin, prefix).await?;
        let done = st
            .values()
            .filter(|(sent, acked)| !acked.is_empty() && sent == acked)
            .count();
        if st.len() == count && done == count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {timeout:?}: {} streams listed, {done} with RDS ACKed (want {count})",
                st.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One edit timed by `/nodes`: (edit → all ACKed, edit → each stream's ACK, t0).
async fn timed_edit(
    admin: u16,
    prefix: &str,
    policy: &mut PolicySpec,
    policy_path: &Path,
    before_save: impl FnOnce() -> u64,
) -> Result<(Duration, Vec<Duration>, u64)> {
    let base = rds_status(admin, prefix).await?;
    policy.standard_timeout_s += 1;
    let t0_ns = before_save();
    let t0 = Instant::now();
    policy.save(policy_path)?;
    let mut acked_at: HashMap<String, Duration> = HashMap::new();
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let st = rds_status(admin, prefix).await?;
        let now = t0.elapsed();
        for (id, (_, acked)) in &st {
            let old = base.get(id).map(|b| b.1.as_str()).unwrap_or_default();
            if !acked.is_empty() && acked != old {
                acked_at.entry(id.clone()).or_insert(now);
            }
        }
        if acked_at.len() >= base.len() {
            // Every stream ACKed a new version; they must all be the same one.
            let versions: std::collections::BTreeSet<&String> = st.values().map(|v| &v.1).collect();
            if versions.len() != 1 {
                bail!("streams ACKed different RDS versions: {versions:?}");
            }
            return Ok((now, acked_at.into_values().collect(), t0_ns));
        }
        if Instant::now() > deadline {
            bail!(
                "only {}/{} streams ACKed the edit within 60 s",
                acked_at.len(),
                base.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn run(
    cp_bin: &Path,
    dir: &Path,
    spec: &EnvoySpec,
    modes: &[Mode],
) -> Result<Vec<EnvoyRow>> {
    let mut rows = Vec::new();
    for &mode in modes {
        for client in ["envoy", "simulated"] {
            let tag = format!("{client}-{}", mode.as_str());
            let row_dir = dir.join(&tag);
            fs::create_dir_all(&row_dir)?;
            let policy_path = row_dir.join("mesh.yaml");
            let mut policy = PolicySpec {
                extra: spec.extra_services,
                vehicle_service: false,
                standard_timeout_s: 10,
            };
            policy.save(&policy_path)?;
            let (mut cp, xds, admin) = sys::start_cp(cp_bin, &policy_path, &row_dir, &tag)?;
            let prefix = "veh-";
            let mut envoys = Vec::new();
            let mut fleet = None;
            eprintln!("[{tag}] starting {} {client} clients", spec.count);
            if client == "envoy" {
                for i in 0..spec.count {
                    envoys.push(start_envoy(
                        spec,
                        &row_dir,
                        xds,
                        &format!("veh-envoy-{i}"),
                        mode,
                    )?);
                }
            } else {
                let cfg = Arc::new(ClientConfig {
                    mode,
                    nack_every: 0,
                    nack_version: None,
                    cluster: "vehicle",
                });
                let f = Fleet::connect(
                    &Target::plain(format!("127.0.0.1:{xds}")),
                    cfg,
                    spec.count,
                    0,
                    "veh-sim-",
                )
                .await?;
                f.wait_ready(Duration::from_secs(60), || Ok(cp.check_alive()?))
                    .await?;
                fleet = Some(f);
            }
            let ready = wait_all_acked(admin, prefix, spec.count, Duration::from_secs(120)).await;
            if let Err(e) = ready {
                let mut msg = format!("{e:#}");
                for (g, _) in envoys.iter_mut() {
                    if let Err(dead) = g.check_alive() {
                        msg.push_str(&format!("\n{dead:#}"));
                        break;
                    }
                }
                bail!("[{tag}] clients never all ACKed: {msg}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let cp_rss_connected = procfs::vm_bytes(cp.pid(), "VmRSS")?;
            let (mut all, mut per, mut arrivals) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..spec.edits {
                let f = fleet.as_ref();
                let (took, each, t0_ns) =
                    timed_edit(admin, prefix, &mut policy, &policy_path, || {
                        f.map(|f| f.shared.now_ns()).unwrap_or(0)
                    })
                    .await?;
                all.push(took);
                per.extend(each);
                if let Some(f) = &fleet {
                    arrivals.extend(
                        f.settle_after(
                            t0_ns,
                            3,
                            Duration::from_millis(200),
                            Duration::from_secs(30),
                        )
                        .await?,
                    );
                }
                for (g, _) in envoys.iter_mut() {
                    g.check_alive()?;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            eprintln!(
                "[{tag}] edit → all ACKed: {:?}",
                all.iter().map(|d| ms(Some(*d))).collect::<Vec<_>>()
            );
            rows.push(EnvoyRow {
                client: if client == "envoy" {
                    "real Envoy 1.40"
                } else {
                    "misaki-loadgen"
                },
                mode: mode.as_str(),
                streams: spec.count,
                all_acked: Summary::of(&all),
                per_stream_acked: Summary::of(&per),
                arrival: fleet.as_ref().map(|_| Summary::of(&arrivals)),
                cp_rss_connected,
            });
            drop(fleet);
            drop(envoys);
            drop(cp);
        }
    }
    Ok(rows)
}

pub fn print_table(rows: &[EnvoyRow], edits: usize) {
    println!(
        "| client | mode | streams | edit → all ACKed on /nodes p50 / max (ms) | edit → stream's ACK on /nodes p50 / p99 (ms) | edit → response at client p50 / p99 (ms) | cp RSS connected (MiB) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} / {} | {} / {} | {} | {:.0} |",
            r.client,
            r.mode,
            r.streams,
            ms(r.all_acked.p50),
            ms(r.all_acked.max),
            ms(r.per_stream_acked.p50),
            ms(r.per_stream_acked.p99),
            r.arrival
                .map(|a| format!("{} / {}", ms(a.p50), ms(a.p99)))
                .unwrap_or_else(|| "— (not observable)".into()),
            r.cp_rss_connected as f64 / (1024.0 * 1024.0),
        );
    }
    println!();
    println!(
        "{edits} edits per row; /nodes polled every ~2 ms (one GET + JSON parse per poll, so ACK times carry a few ms of polling granularity)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_rewrite_sets_ports_node_and_delta() {
        let t = "node:\n  id: vehicle-demo-1\n  metadata:\n    vehicle_id: demo-1\nadmin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 19901 }\n  ads_config:\n    api_type: GRPC\n        socket_address: { address: 127.0.0.1, port_value: 18000 }\n";
        let out = rewrite_bootstrap(t, 40000, 40001, "veh-envoy-3", Mode::Delta);
        assert!(out.contains("  id: veh-envoy-3\n"));
        assert!(out.contains("    vehicle_id: veh-envoy-3\n"));
        assert!(out.contains("port_value: 40001 }"));
        assert!(out.contains("port_value: 40000 }"));
        assert!(out.contains("    api_type: DELTA_GRPC\n"));
        let sotw = rewrite_bootstrap(t, 1, 2, "x", Mode::Sotw);
        assert!(sotw.contains("api_type: GRPC\n") && !sotw.contains("DELTA"));
    }
}
