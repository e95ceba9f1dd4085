//! A stand-alone fleet server for tests and benchmarks until misaki-cp serves the
//! fleet API: gRPC `FleetService` (zstd), the UDP probe echo, and an admin HTTP server
//! with `GET /fleet`, `GET /fleet/{vehicle}` and `GET /metrics`.
//!
//! The policy is a built-in demo (uplinks wifi/lte/dsrc; classes critical, standard,
//! bulk) so this does not depend on the policy parser.
//!
//! ```text
//! cargo run -p misaki-fleet --example fleet_server -- \
//!     --grpc 127.0.0.1:18000 --probe 127.0.0.1:18001 --admin 127.0.0.1:18002
//! ```

use clap::Parser;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use misaki_policy::{MeshSettings, Policy, RoutePriority, TrafficClass, Uplink, UplinkKind};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
struct Args {
    /// gRPC (FleetService) listen address; omit to run only the probe echo.
    #[arg(long, requires = "admin")]
    grpc: Option<SocketAddr>,
    /// UDP probe echo listen address; omit to run it elsewhere.
    #[arg(long)]
    probe: Option<SocketAddr>,
    /// Admin HTTP listen address (/fleet, /fleet/{vehicle}, /metrics).
    #[arg(long)]
    admin: Option<SocketAddr>,
}

fn demo_policy() -> Policy {
    let uplinks: BTreeMap<String, Uplink> = [
        ("wifi", UplinkKind::Wifi, false, 1),
        ("lte", UplinkKind::Lte, true, 5),
        ("dsrc", UplinkKind::Dsrc, false, 2),
    ]
    .into_iter()
    .map(|(n, kind, metered, cost)| {
        (
            n.to_string(),
            Uplink {
                name: n.into(),
                kind,
                metered,
                cost,
            },
        )
    })
    .collect();
    let class = |name: &str, uplinks: &[&str], deferrable: bool| TrafficClass {
        name: name.into(),
        priority: RoutePriority::Default,
        timeout: Duration::from_secs(5),
        retries: 1,
        uplinks: uplinks.iter().map(|s| s.to_string()).collect(),
        deferrable,
        dscp: 0,
        max_rtt: None,
        max_loss_percent: Some(50),
        ttl: None,
    };
    let classes = [
        class("critical", &["wifi", "lte", "dsrc"], false),
        class("standard", &["wifi", "lte"], false),
        class("bulk", &["wifi"], true),
    ]
    .into_iter()
    .map(|c| (c.name.clone(), c))
    .collect();
    Policy {
        mesh: MeshSettings::default(),
        uplinks,
        classes,
        services: BTreeMap::new(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let registry = misaki_fleet::Registry::new();
    let mut metrics = prometheus_client::registry::Registry::default();
    registry.register_metrics(&mut metrics);
    let metrics = Arc::new(metrics);
    let (_policy_tx, policy_rx) = tokio::sync::watch::channel(Arc::new(demo_policy()));

    let probe = match args.probe {
        Some(addr) => Some(tokio::net::UdpSocket::bind(addr).await?),
        None => None,
    };
    let (Some(grpc_addr), Some(admin_addr)) = (args.grpc, args.admin) else {
        let probe = probe.ok_or_else(|| anyhow::anyhow!("give --probe, or --grpc and --admin"))?;
        tracing::info!(probe = ?args.probe, "probe echo up");
        misaki_fleet::run_probe_echo(probe, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        return Ok(());
    };
    if let Some(probe) = probe {
        tokio::spawn(misaki_fleet::run_probe_echo(probe, std::future::pending()));
    }

    let admin = tokio::net::TcpListener::bind(admin_addr).await?;
    let reg = registry.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = admin.accept().await else {
                continue;
            };
            let reg = reg.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let reg = reg.clone();
                    let metrics = metrics.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(admin_route(
                            &reg,
                            &metrics,
                            req.uri().path(),
                        ))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });

    let grpc = tokio::net::TcpListener::bind(grpc_addr).await?;
    tracing::info!(grpc = %grpc_addr, probe = ?args.probe, admin = %admin_addr, "fleet server up");
    let reg = registry.clone();
    tonic::transport::Server::builder()
        .add_service(misaki_fleet::service(registry, policy_rx))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc),
            async move {
                let _ = tokio::signal::ctrl_c().await;
                reg.close_streams();
            },
        )
        .await?;
    Ok(())
}

fn admin_route(
    reg: &misaki_fleet::Registry,
    metrics: &prometheus_client::registry::Registry,
    path: &str,
) -> Response<Full<Bytes>> {
    let (status, body, ctype) = if path == "/fleet" {
        (
            StatusCode::OK,
            reg.to_json().to_string(),
            "application/json",
        )
    } else if let Some(id) = path.strip_prefix("/fleet/") {
        match reg.vehicle_json(id) {
            Some(v) => (StatusCode::OK, v.to_string(), "application/json"),
            None => (StatusCode::NOT_FOUND, "{}".into(), "application/json"),
        }
    } else if path == "/metrics" {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, metrics);
        (StatusCode::OK, s, "text/plain; version=0.0.4")
    } else {
        (StatusCode::NOT_FOUND, String::new(), "text/plain")
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
