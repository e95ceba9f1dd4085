//! `misaki-cp serve`: wire policy, cache, xDS server, watcher and admin together.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use misaki_policy::{Policy, PolicyErrors};
use misaki_xds::{ServeConfig, StreamRegistry, XdsServer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Admin};
use crate::cache::SnapshotCache;
use crate::cli::ServeArgs;
use crate::policy_state::PolicyState;
use crate::watcher;

/// The quickstart policy served when `--policy` is not given.
pub const QUICKSTART: &str = include_str!("../../../examples/quickstart/mesh.yaml");

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid policy:\n{0}")]
    Policy(PolicyErrors),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] watcher::WatchError),
    #[error(transparent)]
    Xds(#[from] misaki_xds::ServeError),
}

/// Load the policy named on the command line, or the embedded quickstart.
pub fn initial_policy(path: Option<&PathBuf>) -> Result<(Policy, String), PolicyErrors> {
    match path {
        Some(p) => Ok((misaki_policy::load_path(p)?, p.display().to_string())),
        None => Ok((
            misaki_policy::parse("<embedded quickstart>", QUICKSTART)?,
            "embedded quickstart (examples/quickstart/mesh.yaml)".to_string(),
        )),
    }
}

/// Accept-queue length. A fleet reconnecting after a control-plane restart arrives all
/// at once; with the kernel's default (128 in tokio) thousands of SYNs overflow and
/// wait out a 1 s retransmit.
const LISTEN_BACKLOG: i32 = 4096;

async fn bind(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, RunError> {
    let err = |source| RunError::Bind { what, addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Run until `shutdown` resolves, then drain.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Parse everything before binding anything.
    let (policy, source) = initial_policy(args.policy.as_ref()).map_err(RunError::Policy)?;
    let cache = SnapshotCache::new(Arc::new(policy), misaki_xds::version_prefix());
    let policy_state = PolicyState::new(cache.clone(), source);

    let fleet = misaki_fleet::Registry::new();
    let streams = StreamRegistry::new();
    let xds = XdsServer::new(Arc::new(cache.clone()), streams.clone());
    let mut registry = Registry::default();
    xds.register_metrics(&mut registry);
    policy_state.register_metrics(&mut registry);
    fleet.register_metrics(&mut registry);

    let xds_listener = bind("xDS", args.xds_addr).await?;
    let admin_listener = bind("admin", args.admin_addr).await?;
    let probe_socket = match args.probe_addr {
        Some(addr) => {
            Some(
                tokio::net::UdpSocket::bind(addr)
                    .await
                    .map_err(|source| RunError::Bind {
                        what: "probe echo",
                        addr,
                        source,
                    })?,
            )
        }
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let ready = Arc::new(AtomicBool::new(false));
    let streams_json = streams.clone();
    let admin = Admin {
        ready: ready.clone(),
        registry: Arc::new(registry),
        policy: policy_state.clone(),
        nodes: Arc::new(move || streams_json.to_json()),
        fleet: Arc::new({
            let fleet = fleet.clone();
            move || fleet.to_json()
        }),
        vehicle: Arc::new({
            let fleet = fleet.clone();
            move |id| fleet.vehicle_json(id)
        }),
    };
    tracing::info!(addr = %args.admin_addr, "admin listening");
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, stopped()));

    let watch_task = args
        .policy
        .clone()
        .map(|path| tokio::spawn(watcher::run(path, policy_state.clone(), stopped())));

    if let Some(socket) = probe_socket {
        tracing::info!(addr = ?socket.local_addr().ok(), "probe echo listening");
        tokio::spawn(misaki_fleet::run_probe_echo(socket, stopped()));
    }

    let closing = fleet.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        // Vehicle report streams end with UNAVAILABLE so they reconnect elsewhere.
        closing.close_streams();
        let _ = stop_tx.send(true);
    });

    ready.store(true, Ordering::Release);
    let result = misaki_xds::serve(
        xds_listener,
        &xds,
        tonic::service::Routes::new(misaki_fleet::service(
            fleet.clone(),
            policy_state.subscribe(),
        )),
        &ServeConfig::default(),
        stopped(),
    )
    .await;
    let _ = admin_task.await;
    if let Some(t) = watch_task {
        t.await.expect("watcher task panicked")?;
    }
    result.map_err(RunError::from)
}
