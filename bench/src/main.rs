//! `edit-latency`: policy edit → new route live through one real Envoy, for misaki and
//! its peers; prints one Markdown table. Run it through `bench/edit_latency.sh`.
//! `edit-latency vehicle-gateway`: cloud → vehicle through the reverse tunnel
//! (`bench/vehicle_gateway.sh`, [`vehicle_gateway`]).

mod vehicle_gateway;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use misaki_bench::measure::{Plan, Sample};
use misaki_bench::misaki::{self, Flavour};
use misaki_bench::rss::fmt_kib;
use misaki_bench::stats::{fmt_duration, summarize};
use misaki_bench::{envoy_files, sovereign};
use misaki_e2e::process::envoy_bin;
use misaki_harness::procfs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Setup {
    MisakiSotw,
    MisakiDelta,
    EnvoyFiles,
    Sovereign,
}

#[derive(Debug, Parser)]
#[command(about = "policy edit -> new route live through one real Envoy")]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Measured edits per setup.
    #[arg(long, default_value_t = 20)]
    edits: usize,
    /// Unmeasured edits first (first upstream connections, lazy initialisation).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Interval between probe requests, in microseconds.
    #[arg(long, default_value_t = 500)]
    poll_us: u64,
    /// Pause before each edit: this many ms, plus a uniform random 0..=gap-jitter-ms.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    #[arg(long, default_value_t = 1000)]
    gap_jitter_ms: u64,
    /// Give up on one edit after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Idle time before reading a control plane's RSS.
    #[arg(long, default_value_t = 5)]
    idle_s: u64,
    /// Setups to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Setup>,
    /// The misaki-cp binary (default: beside this executable, i.e. the same profile).
    #[arg(long)]
    cp_bin: Option<PathBuf>,
    /// sovereign's entry point (default: bench/.venv-sovereign/bin/sovereign).
    #[arg(long)]
    sovereign_bin: Option<PathBuf>,
    /// sovereign's `source_config.refresh_rate` in seconds (its default is 30).
    #[arg(long, default_value_t = 1)]
    sovereign_source_refresh_s: u32,
    /// Envoy's REST `refresh_delay` towards sovereign, in ms.
    #[arg(long, default_value_t = 1000)]
    sovereign_envoy_refresh_ms: u64,
    /// Print every sample (wall-clock save time, latency, polls) to stderr.
    #[arg(long)]
    samples: bool,
    /// Keep each setup's directory (configs and process logs) and print its path.
    #[arg(long)]
    keep_logs: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Cloud -> vehicle through the reverse tunnel: latency vs direct, offline, low power.
    VehicleGateway(vehicle_gateway::Args),
}

/// One table row.
struct Row {
    setup: String,
    transport: String,
    result: Result<Vec<Sample>, String>,
    rss: String,
}

fn main() {
    let args = Args::parse();
    if let Some(Cmd::VehicleGateway(a)) = &args.cmd {
        if let Err(e) = vehicle_gateway::run(a, &envoy_version()) {
            eprintln!("vehicle-gateway: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let all = [
        Setup::MisakiSotw,
        Setup::MisakiDelta,
        Setup::EnvoyFiles,
        Setup::Sovereign,
    ];
    let setups: Vec<Setup> = if args.only.is_empty() {
        all.to_vec()
    } else {
        all.into_iter().filter(|s| args.only.contains(s)).collect()
    };
    let plan = Plan {
        edits: args.edits,
        warmup: args.warmup,
        poll_interval: Duration::from_micros(args.poll_us),
        gap_min: Duration::from_millis(args.gap_ms),
        gap_jitter: Duration::from_millis(args.gap_jitter_ms),
        timeout: Duration::from_secs(args.timeout_s),
    };
    let idle = Duration::from_secs(args.idle_s);
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let cp_bin = args
        .cp_bin
        .clone()
        .unwrap_or_else(|| exe_dir.join("misaki-cp"));
    let sov = sovereign::Config {
        bin: args.sovereign_bin.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-sovereign/bin/sovereign")
        }),
        source_refresh_s: args.sovereign_source_refresh_s,
        envoy_refresh: Duration::from_millis(args.sovereign_envoy_refresh_ms),
        idle,
    };
    let load_before = procfs::loadavg_text();

    let mut rows = Vec::new();
    for setup in setups {
        eprintln!("== {setup:?}");
        let dir = tempfile::Builder::new()
            .prefix(&format!("misaki-bench-{setup:?}-"))
            .tempdir()
            .expect("temp dir");
        let row = guarded(|| run_setup(setup, &plan, &cp_bin, &sov, idle, dir.path()));
        let row = match row {
            Ok(r) => r,
            Err(reason) => Row {
                setup: format!("{}: not measured — {reason}", name(setup)),
                transport: transport(setup, &sov),
                result: Err(reason),
                rss: "—".into(),
            },
        };
        if let Ok(samples) = &row.result
            && args.samples
        {
            for s in samples {
                let wall = s.saved_at.duration_since(UNIX_EPOCH).unwrap_or_default();
                eprintln!(
                    "  saved {}.{:06} latency {} polls {}{}",
                    wall.as_secs(),
                    wall.subsec_micros(),
                    fmt_duration(s.latency),
                    s.polls,
                    s.cp_applied
                        .map(|d| format!(" (policy in force after {})", fmt_duration(d)))
                        .unwrap_or_default()
                );
            }
        }
        if args.keep_logs {
            eprintln!("  logs kept in {}", dir.keep().display());
        }
        rows.push(row);
    }
    print_table(&args, &plan, &sov, &rows, &load_before);
}

/// Run `f`, turning an error or a panic (the e2e harness asserts) into a one-line
/// reason. Guards inside `f` are dropped either way, so its processes are gone.
fn guarded(f: impl FnOnce() -> anyhow::Result<Row>) -> Result<Row, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(row)) => Ok(row),
        Ok(Err(e)) => {
            eprintln!("setup failed: {e:#}");
            Err(one_line(&format!("{e}")))
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into());
            Err(one_line(&msg))
        }
    }
}

fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or_default().replace('|', "/");
    if first.chars().count() > 160 {
        format!("{}…", first.chars().take(160).collect::<String>())
    } else {
        first
    }
}

fn name(setup: Setup) -> &'static str {
    match setup {
        Setup::MisakiSotw => "**misaki** SotW",
        Setup::MisakiDelta => "**misaki** delta",
        Setup::EnvoyFiles => "Envoy watched files (floor)",
        Setup::Sovereign => "sovereign 0.32",
    }
}

fn transport(setup: Setup, sov: &sovereign::Config) -> String {
    match setup {
        Setup::MisakiSotw => "policy file → misaki-cp → ADS gRPC push (SotW)".into(),
        Setup::MisakiDelta => "policy file → misaki-cp → ADS gRPC push (delta)".into(),
        Setup::EnvoyFiles => "CDS/LDS files, `path_config_source` + `watched_directory`".into(),
        Setup::Sovereign => format!(
            "file source (re-read every {} s) → REST poll (`refresh_delay` {})",
            sov.source_refresh_s,
            fmt_duration(sov.envoy_refresh)
        ),
    }
}

fn run_setup(
    setup: Setup,
    plan: &Plan,
    cp_bin: &Path,
    sov: &sovereign::Config,
    idle: Duration,
    dir: &Path,
) -> anyhow::Result<Row> {
    let (result, rss) = match setup {
        Setup::MisakiSotw | Setup::MisakiDelta => {
            let flavour = if setup == Setup::MisakiSotw {
                Flavour::Sotw
            } else {
                Flavour::Delta
            };
            anyhow::ensure!(
                cp_bin.exists(),
                "{} is not built (cargo build --release -p misaki-control-plane)",
                cp_bin.display()
            );
            let samples = misaki::edit_latency(cp_bin, flavour, plan, dir)?;
            let rss = misaki::idle_rss_kib(cp_bin, flavour, idle, &dir.join("idle"))
                .map(|k| format!("{} (quickstart policy)", fmt_kib(k)))
                .unwrap_or_else(|e| format!("not measured — {}", one_line(&e.to_string())));
            (samples, rss)
        }
        Setup::EnvoyFiles => (
            envoy_files::edit_latency(plan, dir)?,
            "— (no control plane)".into(),
        ),
        Setup::Sovereign => {
            let out = sovereign::edit_latency(sov, plan, dir)?;
            let rss = match (out.idle_rss_kib, out.idle_pss_kib) {
                (Some(r), Some(p)) => format!(
                    "{} (gunicorn master + 1 worker; PSS {})",
                    fmt_kib(r),
                    fmt_kib(p)
                ),
                (Some(r), None) => format!("{} (gunicorn master + 1 worker)", fmt_kib(r)),
                _ => "not measured".into(),
            };
            (out.samples, rss)
        }
    };
    Ok(Row {
        setup: name(setup).into(),
        transport: transport(setup, sov),
        result: Ok(result),
        rss,
    })
}

fn envoy_version() -> String {
    Command::new(envoy_bin())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            let (_, v) = text.split_once("version: ")?;
            v.split('/').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

fn print_table(args: &Args, plan: &Plan, sov: &sovereign::Config, rows: &[Row], load: &str) {
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let date = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    println!();
    println!(
        "### Policy edit → new route live through one real Envoy ({} edits each)",
        plan.edits
    );
    println!();
    println!(
        "| setup | how the edit reaches Envoy | edits | median | p95 | max | control-plane RSS, idle, 1 Envoy |"
    );
    println!("|---|---|---:|---:|---:|---:|---|");
    for r in rows {
        match &r.result {
            Ok(samples) => {
                let lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
                let s = summarize(&lat).expect("at least one edit");
                println!(
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.setup,
                    r.transport,
                    s.n,
                    fmt_duration(s.median),
                    fmt_duration(s.p95),
                    fmt_duration(s.max),
                    r.rss
                );
            }
            Err(_) => println!(
                "| {} | {} | 0 | — | — | — | {} |",
                r.setup, r.transport, r.rss
            ),
        }
    }
    println!();
    println!(
        "Latency: from just before the `rename(2)` that saves the edit to the end of the first \
         response through the Envoy listener that came from the newly configured upstream. \
         Each edit moves one service between two local upstreams (A ↔ B). Probe: one kept-alive \
         HTTP/1.1 connection to the listener, a request every {} µs (paced from send time); \
         {} unmeasured warm-up edit(s); {} ms + U(0, {} ms) pause before each edit. Envoy {} \
         (`--concurrency 1`, `-l info`), started per setup; RSS is `VmRSS` after {} s idle \
         (Envoy not counted). sovereign: `source_config.refresh_rate` {} s (its default is 30 s), \
         1 gunicorn worker. Machine: {} cores, load average {} at start; finished at unix time {}.",
        plan.poll_interval.as_micros(),
        plan.warmup,
        plan.gap_min.as_millis(),
        plan.gap_jitter.as_millis(),
        envoy_version(),
        args.idle_s,
        sov.source_refresh_s,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        load,
        date,
    );
    for r in rows {
        let Ok(samples) = &r.result else { continue };
        let split: Vec<(Duration, Duration)> = samples
            .iter()
            .filter_map(|s| s.cp_applied.map(|c| (c, s.latency.saturating_sub(c))))
            .collect();
        if split.len() != samples.len() || split.is_empty() {
            continue;
        }
        let cp: Vec<Duration> = split.iter().map(|p| p.0).collect();
        let rest: Vec<Duration> = split.iter().map(|p| p.1).collect();
        let (cp, rest) = (
            summarize(&cp).expect("non-empty"),
            summarize(&rest).expect("non-empty"),
        );
        println!();
        println!(
            "Where the time goes, {}: save → misaki-cp logs `policy in force` (inotify, the \
             reload on rename, load + validate + compile): median {}, max {}; then → \
             first request on the new upstream (snapshot push over ADS, Envoy applies it, probe \
             resolution): median {}, max {}.",
            r.setup,
            fmt_duration(cp.median),
            fmt_duration(cp.max),
            fmt_duration(rest.median),
            fmt_duration(rest.max),
        );
    }
    println!();
    println!(
        "Reproduce: `bench/edit_latency.sh{}{}`",
        if cmd.is_empty() { "" } else { " " },
        cmd.join(" ")
    );
}
