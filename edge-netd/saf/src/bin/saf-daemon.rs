//! `saf-daemon`: the store-and-forward alone (ingest + queue + forwarder) with hand-driven
//! uplinks, for the benchmark (bench/store_forward.sh): it can accept without forwarding
//! and switch uplinks on request, which the real daemon cannot. edge-netd embeds the same
//! [`StoreForward`] with its real uplink selector; the kill -9 test runs edge-netd
//! (tests/tests/store_forward.rs).
//!
//! Prints `saf-daemon ingest=<addr> admin=<addr>` on stdout once both listeners are bound.
//! Admin: `GET /status`, `GET /deadletters`, `GET /metrics`, and (stand-in only)
//! `POST /uplinks/<name>/up|down`. Exit code 64 on bad arguments or config.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use misaki_queue::{Queue, QueueConfig};
use misaki_saf::{DestinationConfig, HttpVersion, SafConfig, StaticUplinks, StoreForward};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(about = "misaki store-and-forward stand-in daemon")]
struct Args {
    /// Queue directory.
    #[arg(long)]
    queue_dir: PathBuf,
    /// Mesh policy (YAML file or directory).
    #[arg(long)]
    policy: PathBuf,
    /// Base URL every service is forwarded to (the cloud sidecar).
    #[arg(long)]
    cloud_url: String,
    /// Speak HTTP/1.1 to the cloud (default: h2c).
    #[arg(long)]
    http1: bool,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:0")]
    admin: SocketAddr,
    /// Uplinks that start down (comma-separated); all others start up.
    #[arg(long, value_delimiter = ',')]
    down: Vec<String>,
    /// Bind an uplink to an interface: `name=ifname` (repeatable).
    #[arg(long = "bind")]
    binds: Vec<String>,
    #[arg(long, default_value_t = 512 << 20)]
    budget_bytes: u64,
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Accept only; never forward (benchmarks of the ingest path alone).
    #[arg(long)]
    no_forward: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let policy = match misaki_policy::load_path(&args.policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("saf-daemon: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(args, policy)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saf-daemon: {e}");
            ExitCode::from(64)
        }
    }
}

async fn run(args: Args, policy: misaki_policy::Policy) -> Result<(), String> {
    let uplinks = StaticUplinks::from_policy(&policy);
    uplinks.set_all_up();
    for d in &args.down {
        if !uplinks.set_up(d, false) {
            return Err(format!("--down {d}: no such uplink in the policy"));
        }
    }
    for b in &args.binds {
        let (name, ifname) = b
            .split_once('=')
            .ok_or_else(|| format!("--bind {b}: expected name=ifname"))?;
        uplinks.set_interface(name, Some(ifname.to_string()));
    }
    let config = SafConfig {
        default_destination: Some(DestinationConfig::new(
            &args.cloud_url,
            if args.http1 {
                HttpVersion::Http1
            } else {
                HttpVersion::Http2
            },
        )),
        max_body_bytes: args.max_body_bytes,
        max_in_flight: args.max_in_flight,
        ..SafConfig::default()
    };
    let mut qcfg = QueueConfig::new(&args.queue_dir);
    qcfg.budget_bytes = args.budget_bytes;
    qcfg.max_body_bytes = args.max_body_bytes;
    let queue = tokio::task::spawn_blocking(move || Queue::open(qcfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let ingest = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", args.listen))?;
    let admin = TcpListener::bind(args.admin)
        .await
        .map_err(|e| format!("bind {}: {e}", args.admin))?;
    let (_policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(policy));
    let view: Arc<dyn misaki_saf::UplinkView> = if args.no_forward {
        // Nothing is ever usable: messages stay queued.
        StaticUplinks::from_policy(&policy_rx.borrow())
    } else {
        uplinks.clone()
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let saf = StoreForward::start(config, Arc::new(queue), policy_rx, view, shutdown)
        .map_err(|e| e.to_string())?;
    println!(
        "saf-daemon ingest={} admin={}",
        ingest.local_addr().map_err(|e| e.to_string())?,
        admin.local_addr().map_err(|e| e.to_string())?
    );
    tokio::spawn({
        let saf = saf.clone();
        async move { saf.serve(ingest).await }
    });
    tokio::spawn(serve_admin(admin, saf.clone(), uplinks));
    saf.stopped().await;
    Ok(())
}

/// Serves until the process exits: HTTP/1.1 and h2c, accept errors retried at once, no
/// drain (the stand-in has no stop of its own).
async fn serve_admin(listener: TcpListener, saf: StoreForward, uplinks: Arc<StaticUplinks>) {
    let mut registry = prometheus_client::registry::Registry::default();
    saf.register_metrics(&mut registry);
    let registry = Arc::new(registry);
    let handler = move |req: Request<hyper::body::Incoming>| {
        std::future::ready(admin(&saf, &uplinks, &registry, &req))
    };
    misaki_http::Server::new("saf-daemon admin", misaki_http::Protocol::Http1AndH2c)
        .serve(listener, handler, std::future::pending())
        .await;
}

fn admin(
    saf: &StoreForward,
    uplinks: &StaticUplinks,
    registry: &prometheus_client::registry::Registry,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if let Some(r) = saf.admin_response(req.method(), path) {
        return r;
    }
    if req.method() == Method::GET && path == "/metrics" {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, registry);
        return reply(StatusCode::OK, text);
    }
    if req.method() == Method::POST
        && let Some(rest) = path.strip_prefix("/uplinks/")
        && let Some((name, state)) = rest.split_once('/')
        && (state == "up" || state == "down")
    {
        return if uplinks.set_up(name, state == "up") {
            reply(StatusCode::OK, format!("{name} {state}\n"))
        } else {
            reply(StatusCode::NOT_FOUND, format!("no uplink {name}\n"))
        };
    }
    reply(StatusCode::NOT_FOUND, "not found\n".into())
}
