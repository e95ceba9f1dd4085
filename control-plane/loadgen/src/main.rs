//! `misaki-loadgen`: the control plane at fleet scale.
//!
//! - `bench`: for each (streams × connections × mode) start a fresh misaki-cp, connect
//!   that many simulated vehicle sidecars (ADS, SotW or delta, behaving like Envoy),
//!   and print one Markdown table: memory per stream, fleet-wide change latency, a new
//!   vehicle's time to full config, CPU per phase.
//! - `envoys`: the same edit-to-ACK measurement with real Envoy sidecars and with the
//!   same number of simulated ones, to check the simulation against the real client.
//! - `connect`: hold N simulated streams against a misaki-cp started by hand (for
//!   profiling it under perf/heaptrack), plaintext or over mutual TLS.
//! - `mtls`: what mutual TLS costs misaki-cp against plaintext, same run: CPU per
//!   1,000 vehicles connecting, a whole fleet reconnecting at once, RSS per vehicle,
//!   every vehicle on its own connection with its own client certificate.
//!
//! - `vehicle-state`: one vehicle's state change (power low/on, report stream closed /
//!   opened) with N vehicles reporting over FleetService and connected over ADS, and a
//!   few cloud sidecars on SRDS: latency until every cloud stream and the vehicle's own
//!   stream have the new config, CPU per change, pushes to anyone else.
//!
//! Everything it starts is killed when it exits, on error and on SIGINT/SIGTERM too.
//! `bench/fleet_scale.sh` builds it and misaki-cp in release and runs both tables;
//! `bench/mtls.sh` runs `mtls`.

mod bench;
mod client;
mod envoys;
mod fleet;
mod mtls;
mod policy;
mod probe;
mod shared_fleet;
mod stats;
mod sys;
mod tls;
mod vehicle_state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::client::{ClientConfig, Mode, Target};
use crate::mtls::Transport;

#[derive(Debug, Parser)]
#[command(name = "misaki-loadgen", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Append the pid of every process started here to this file (for a wrapper
    /// script's cleanup trap).
    #[arg(long, global = true)]
    pidfile: Option<PathBuf>,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, global = true, default_value_t = 3600)]
    deadline_secs: u64,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// misaki-cp binary (default: the one beside this binary).
    #[arg(long)]
    cp: Option<PathBuf>,
    /// Where policies and logs go (default: a temp dir, removed at exit).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Cloud services added to the quickstart policy, for a realistic snapshot size.
    #[arg(long, default_value_t = 20)]
    extra_services: usize,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Fleet-scale benchmark with simulated vehicles; prints a Markdown table.
    Bench {
        #[command(flatten)]
        common: Common,
        /// Stream counts, one row each.
        #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
        streams: Vec<usize>,
        /// ADS variants.
        #[arg(long, value_delimiter = ',', default_values_t = [Mode::Sotw, Mode::Delta])]
        modes: Vec<Mode>,
        /// HTTP/2 connections the streams share; 0 = one per stream (as Envoy).
        #[arg(long, value_delimiter = ',', default_values_t = [64])]
        conns: Vec<usize>,
        /// Fleet-wide policy edits per row.
        #[arg(long, default_value_t = 3)]
        edits: usize,
        /// New-vehicle trials per row.
        #[arg(long, default_value_t = 50)]
        trials: usize,
        /// Each simulated stream NACKs every K-th response it receives (0: never).
        #[arg(long, default_value_t = 0)]
        nack_every: u64,
        /// Simulated streams NACK every response whose version contains this.
        #[arg(long)]
        nack_version: Option<String>,
    },
    /// Real Envoys vs. simulated clients: policy edit → all ACKed on /nodes.
    Envoys {
        #[command(flatten)]
        common: Common,
        /// Envoy binary (default: $MISAKI_ENVOY, else .venv/bin/envoy).
        #[arg(long)]
        envoy: Option<PathBuf>,
        /// Vehicle bootstrap template.
        #[arg(long, default_value = "envoy-configs/vehicle-sidecar.yaml")]
        bootstrap: PathBuf,
        /// Envoys (and simulated streams) per row.
        #[arg(long, default_value_t = 16)]
        count: usize,
        #[arg(long, value_delimiter = ',', default_values_t = [Mode::Sotw, Mode::Delta])]
        modes: Vec<Mode>,
        #[arg(long, default_value_t = 10)]
        edits: usize,
    },
    /// misaki-cp's cost of mutual TLS against plaintext (same run): N vehicles, each
    /// on its own connection (over mTLS with its own certificate), connecting to a
    /// fresh misaki-cp, then reconnecting at once; prints two Markdown tables.
    Mtls {
        #[command(flatten)]
        common: Common,
        /// Vehicles (`car-0` …), one connection each.
        #[arg(long, default_value_t = 10000)]
        vehicles: usize,
        /// ADS variants; a plaintext and an mTLS row each.
        #[arg(long, value_delimiter = ',', default_values_t = [Mode::Sotw])]
        modes: Vec<Mode>,
        #[arg(long, value_delimiter = ',', default_values_t = [Transport::Plain, Transport::Mtls])]
        transports: Vec<Transport>,
        /// Times the connected fleet drops and redials at once (0: none).
        #[arg(long, default_value_t = 1)]
        reconnects: usize,
        /// Then the same number of connections to a bare server (no misaki-cp, no
        /// HTTP/2), plaintext and rustls with misaki-cp's configuration: what TLS
        /// alone costs per connection.
        #[arg(long)]
        probe: bool,
    },
    /// The bare server of `mtls --probe` (started by it).
    #[command(hide = true)]
    ProbeServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        reply_bytes: usize,
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        #[arg(long)]
        tls_key: Option<PathBuf>,
        #[arg(long)]
        client_ca: Option<PathBuf>,
        #[arg(long)]
        crl: Option<PathBuf>,
    },
    /// One vehicle's state change at fleet scale: N vehicles (fleet reports + ADS), a
    /// few cloud sidecars (SRDS); prints two Markdown tables.
    VehicleState {
        #[command(flatten)]
        common: Common,
        /// Vehicle counts, one row each (per mode).
        #[arg(long, value_delimiter = ',', default_values_t = [1000, 10000])]
        streams: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_values_t = [Mode::Sotw, Mode::Delta])]
        modes: Vec<Mode>,
        /// Cloud sidecar streams (`node.cluster: cloud`).
        #[arg(long, default_value_t = 4)]
        clouds: usize,
        /// HTTP/2 connections the vehicles' ADS streams share; 0 = one per stream.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// HTTP/2 connections the vehicles' report streams share.
        #[arg(long, default_value_t = 64)]
        fleet_conns: usize,
        /// Trials per kind of change (power low, power on, offline, online).
        #[arg(long, default_value_t = 100)]
        trials: usize,
        /// Vehicles' heartbeat interval (the registry's offline timeout is 3×).
        #[arg(long, default_value_t = 20_000)]
        heartbeat_ms: u64,
        /// After a trial's change has arrived: wait until nothing arrives for this long.
        #[arg(long, default_value_t = 50)]
        quiet_ms: u64,
    },
    /// misaki-cp replicas in shared mode on one etcd (started here): simulated
    /// vehicles' report streams spread over them; fleet-view convergence after a link
    /// change, and etcd's load at one change per vehicle per minute. One Markdown row.
    SharedFleet {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 30_000)]
        vehicles: usize,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Link changes timed to every other replica.
        #[arg(long, default_value_t = 100)]
        trials: usize,
        /// HTTP/2 connections each replica's vehicles share.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        #[arg(long, default_value_t = 20_000)]
        heartbeat_ms: u64,
        /// Each replica's `--lease-ttl`.
        #[arg(long, default_value = "5s")]
        lease_ttl: String,
        /// Seconds of steady load (one link change per vehicle per minute).
        #[arg(long, default_value_t = 60)]
        steady_secs: u64,
        /// The vehicles' ADS streams (one per vehicle, over the same `conns`).
        #[arg(long, value_enum, default_value_t = Mode::Delta)]
        mode: Mode,
    },
    /// Hold N simulated streams against a running misaki-cp (for profiling it).
    Connect {
        /// misaki-cp's xDS address.
        #[arg(long)]
        xds_addr: String,
        /// Dial over mutual TLS, each stream with its own vehicle certificate issued
        /// from the CA in this directory (`misaki-cp ca init DIR`; its `ca.pem` also
        /// verifies misaki-cp, whose certificate must name the host of --xds-addr).
        /// Needs --conns 0.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Node ids (= vehicle ids) are `{prefix}{i}`.
        #[arg(long, default_value = "veh-")]
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        #[arg(long, value_enum, default_value_t = Mode::Sotw)]
        mode: Mode,
        /// 0 = one connection per stream.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Seconds to hold the streams once all are ready (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        #[arg(long, default_value_t = 0)]
        nack_every: u64,
        #[arg(long)]
        nack_version: Option<String>,
    },
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A directory for policies and logs: the one asked for (kept), or a temp dir.
fn work_dir(out: Option<PathBuf>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match out {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            Ok((d, None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("misaki-loadgen-")
                .tempdir()?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

fn cp_bin(c: &Common) -> Result<PathBuf> {
    let p = c.cp.clone().unwrap_or_else(bench::default_cp);
    if !p.is_file() {
        bail!(
            "misaki-cp not found at {} (build it: cargo build --release -p misaki-control-plane, or pass --cp)",
            p.display()
        );
    }
    Ok(p)
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Bench {
            common,
            streams,
            modes,
            conns,
            edits,
            trials,
            nack_every,
            nack_version,
        } => {
            let cp = cp_bin(&common)?;
            let (dir, _tmp) = work_dir(common.out_dir.clone())?;
            let mut rows = Vec::new();
            for &n in &streams {
                for &c in &conns {
                    for &mode in &modes {
                        let spec = bench::RowSpec {
                            mode,
                            streams: n,
                            conns: c,
                            edits,
                            trials,
                            extra_services: common.extra_services,
                            nack_every,
                            nack_version: nack_version.clone(),
                        };
                        match bench::run_row(&cp, &dir, &spec).await {
                            Ok(r) => rows.push(r),
                            Err(e) => {
                                // Print what was measured so far before failing.
                                bench::print_table(&rows, edits, trials);
                                return Err(e.context(format!(
                                    "row {} streams={n} conns={c}",
                                    mode.as_str()
                                )));
                            }
                        }
                    }
                }
            }
            bench::print_table(&rows, edits, trials);
            Ok(())
        }
        Cmd::Envoys {
            common,
            envoy,
            bootstrap,
            count,
            modes,
            edits,
        } => {
            let cp = cp_bin(&common)?;
            let envoy = envoy
                .or_else(|| std::env::var_os("MISAKI_ENVOY").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(".venv/bin/envoy"));
            if !envoy.is_file() {
                bail!(
                    "Envoy not found at {} (scripts/setup.sh installs it; or set MISAKI_ENVOY)",
                    envoy.display()
                );
            }
            let (dir, _tmp) = work_dir(common.out_dir.clone())?;
            let spec = envoys::EnvoySpec {
                envoy,
                bootstrap,
                count,
                edits,
                extra_services: common.extra_services,
            };
            let rows = envoys::run(&cp, &dir, &spec, &modes).await?;
            envoys::print_table(&rows, edits);
            Ok(())
        }
        Cmd::Mtls {
            common,
            vehicles,
            modes,
            transports,
            reconnects,
            probe,
        } => {
            let cp = cp_bin(&common)?;
            let (dir, _tmp) = work_dir(common.out_dir.clone())?;
            let tls = if transports.contains(&Transport::Mtls) {
                Some(mtls::issue(&dir, vehicles)?)
            } else {
                None
            };
            let setup = mtls::Setup {
                cp_bin: &cp,
                dir: &dir,
                vehicles,
                extra_services: common.extra_services,
                reconnects,
                tls,
            };
            let mut rows = Vec::new();
            for &mode in &modes {
                for &t in &transports {
                    match mtls::run_row(&setup, mode, t).await {
                        Ok(r) => rows.push(r),
                        Err(e) => {
                            // Print what was measured so far before failing.
                            mtls::print_tables(&rows);
                            return Err(e.context(format!("row {mode} {t}")));
                        }
                    }
                }
            }
            mtls::print_tables(&rows);
            if probe {
                // The reply: what misaki-cp sent a vehicle while it connected.
                let reply = rows.first().map_or(16 * 1024, |r| {
                    (r.connect.pushed / r.vehicles.max(1) as u64) as usize
                });
                let mut probes = Vec::new();
                for &t in &transports {
                    probes.push(probe::run(&dir, t, vehicles, reply, setup.tls.as_ref()).await?);
                }
                println!();
                probe::print_table(&probes, reply);
            }
            Ok(())
        }
        Cmd::VehicleState {
            common,
            streams,
            modes,
            clouds,
            conns,
            fleet_conns,
            trials,
            heartbeat_ms,
            quiet_ms,
        } => {
            let cp = cp_bin(&common)?;
            let (dir, _tmp) = work_dir(common.out_dir.clone())?;
            let quiet = Duration::from_millis(quiet_ms);
            let (mut infos, mut rows) = (Vec::new(), Vec::new());
            for &n in &streams {
                let spec = vehicle_state::Spec {
                    streams: n,
                    clouds,
                    conns,
                    fleet_conns,
                    trials,
                    extra_services: common.extra_services,
                    heartbeat: Duration::from_millis(heartbeat_ms),
                    quiet,
                };
                let r = vehicle_state::run_streams(&cp, &dir, &spec, &modes, &mut infos, &mut rows)
                    .await;
                if let Err(e) = r {
                    // Print what was measured so far before failing.
                    vehicle_state::print_tables(&infos, &rows, quiet);
                    return Err(e.context(format!("streams={n}")));
                }
            }
            vehicle_state::print_tables(&infos, &rows, quiet);
            Ok(())
        }
        Cmd::SharedFleet {
            common,
            vehicles,
            replicas,
            trials,
            conns,
            heartbeat_ms,
            lease_ttl,
            steady_secs,
            mode,
        } => {
            let cp = cp_bin(&common)?;
            let (dir, _tmp) = work_dir(common.out_dir.clone())?;
            let spec = shared_fleet::Spec {
                vehicles,
                replicas,
                trials,
                conns,
                heartbeat: Duration::from_millis(heartbeat_ms),
                lease_ttl,
                steady: Duration::from_secs(steady_secs),
                mode,
            };
            shared_fleet::run(&cp, &dir, &spec).await
        }
        Cmd::ProbeServer {
            port,
            reply_bytes,
            tls_cert,
            tls_key,
            client_ca,
            crl,
        } => {
            let tls = probe::files(tls_cert, tls_key, client_ca, crl)?;
            probe::server(port, tls, reply_bytes).await
        }
        Cmd::Connect {
            xds_addr,
            ca,
            prefix,
            streams,
            mode,
            conns,
            hold_secs,
            nack_every,
            nack_version,
        } => {
            let cfg = Arc::new(ClientConfig {
                mode,
                nack_every,
                nack_version,
                cluster: "vehicle",
            });
            let tls = match &ca {
                Some(dir) => {
                    let ids: Vec<String> = (0..streams).map(|i| format!("{prefix}{i}")).collect();
                    Some(Arc::new(tls::Pki::load(dir)?.vehicles(&ids)?))
                }
                None => None,
            };
            let target = Arc::new(Target {
                addr: xds_addr,
                tls,
            });
            let start = Instant::now();
            let f = fleet::Fleet::connect(&target, cfg, streams, conns, &prefix).await?;
            f.wait_ready(Duration::from_secs(600), || Ok(())).await?;
            eprintln!(
                "{streams} {mode} streams ready in {:.2}s",
                start.elapsed().as_secs_f64()
            );
            if hold_secs == 0 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(hold_secs)).await;
            f.check_failed()
        }
    }
}

async fn signalled() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn main() {
    let cli = Cli::parse();
    misaki_harness::set_pidfile(cli.pidfile.clone());
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let deadline = Duration::from_secs(cli.deadline_secs);
    // Dropping `run` (signal or deadline) drops every process guard it holds.
    let result = rt.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(deadline, run(cli.command)) => {
                r.with_context(|| format!("deadline of {deadline:?} reached"))?
            }
            s = signalled() => bail!("interrupted by {s}"),
        }
    });
    // Stream tasks still hold connections; don't wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
    if let Err(e) = result {
        eprintln!("misaki-loadgen: {e:#}");
        std::process::exit(1);
    }
}
