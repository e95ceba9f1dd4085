//! edge-netd: the per-vehicle network daemon. It measures every uplink, picks one
//! per traffic class, reports link state to the control plane, and (with a
//! `store_forward:` section) queues deferrable requests durably and forwards them over
//! the uplink their class may use (crate `misaki-saf`).
//!
//! Invariants:
//! - The selector is pure (`selector`): no I/O and no clock; everything with side
//!   effects lives around it (`monitor`, `probe`, `reporter`, `api`).
//! - One engine task owns all mutable link/selection state (`engine`); the others
//!   read published snapshots or send it inputs.
//! - The daemon works without the cloud: it starts from the stored policy (or the
//!   built-in `default` class) and keeps selecting — and accepting and forwarding
//!   deferred traffic — while the control plane is away.
//! - Store-and-forward sends a class only over the uplink the engine selected for it,
//!   bound to that uplink's interface (`store_forward`). A queue directory that cannot
//!   be opened (e.g. locked by another edge-netd) stops the start-up.
//!
//! Code map: `config` (YAML) → `monitor` (netlink carrier events) + `probe` (UDP
//! probes per interface) → `engine` (+ `selector`) → `reporter` (gRPC to the control
//! plane) and `api` (local HTTP). `policy` converts and persists the received policy.
//! `store_forward` adapts the engine's selection for `misaki-saf` (ingest endpoint,
//! durable queue, forwarder), which `run` starts when configured.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod api;
pub mod config;
pub mod engine;
pub mod local_xds;
pub mod monitor;
pub mod policy;
pub mod probe;
pub mod reporter;
pub mod selector;
pub mod store_forward;

pub use config::{Config, ConfigError};
pub use engine::{Engine, Input, Snapshot};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Errors that stop the daemon at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on the local API address {addr}: {source}")]
    ApiBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on the store-and-forward address {addr}: {source}")]
    SafBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store-and-forward queue: {0}")]
    Queue(#[from] misaki_queue::OpenError),
    #[error("store-and-forward: {0}")]
    Saf(#[from] misaki_saf::ConfigError),
    #[error("cannot listen on the local xDS address {addr}: {source}")]
    XdsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The policy to start from: the stored one, else the one shipped in the image
/// (`factory_policy:`), else none (only the `default` class; Envoy gets an empty
/// configuration and `/readyz` says why).
fn initial_policy(config: &Config) -> policy::VehiclePolicy {
    match policy::load(&config.state_dir) {
        Ok(Some(p)) => {
            tracing::info!(version = %p.version, "loaded stored policy");
            return p;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring the stored policy"),
    }
    let Some(path) = &config.factory_policy else {
        tracing::warn!("no stored policy and no factory_policy: waiting for the control plane");
        return policy::VehiclePolicy::empty();
    };
    match policy::load_factory(path) {
        Ok(p) => {
            tracing::info!(version = %p.version, path = %path.display(), "loaded the factory policy");
            p
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "invalid factory policy; waiting for the control plane");
            policy::VehiclePolicy::empty()
        }
    }
}

/// Start the vehicle-local xDS tier on `listener`, following the engine.
fn start_local_xds(
    config: &Arc<Config>,
    listener: tokio::net::TcpListener,
    engine: &Engine,
    snapshots: &watch::Receiver<Arc<Snapshot>>,
    registry: &mut prometheus_client::registry::Registry,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
    follow_stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> misaki_xds::XdsServer {
    let mesh = engine.mesh_policy();
    let source = local_xds::LocalSource::new(
        &config.vehicle_id,
        mesh.borrow().clone(),
        local_xds::vehicle_state(config, &snapshots.borrow()),
        misaki_xds::version_prefix(),
    );
    let xds =
        misaki_xds::XdsServer::new(Arc::new(source.clone()), misaki_xds::StreamRegistry::new());
    xds.register_metrics(registry);
    tokio::spawn(local_xds::follow(
        config.clone(),
        source,
        snapshots.clone(),
        mesh,
        follow_stopped,
    ));
    let server = xds.clone();
    tokio::spawn(async move {
        let config = misaki_xds::ServeConfig::default();
        if let Err(e) = misaki_xds::serve(
            listener,
            &server,
            tonic::service::Routes::default(),
            &config,
            stopped,
        )
        .await
        {
            tracing::error!(error = %e, "local xDS server failed");
        }
    });
    xds
}

/// Store-and-forward: ingest listener, queue (blocking open: lock + recovery), and the
/// forwarder following the engine's selection and policy.
async fn start_store_forward(
    sf: &config::StoreForwardConfig,
    engine: &Engine,
    snapshots: &watch::Receiver<Arc<Snapshot>>,
    registry: &mut prometheus_client::registry::Registry,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<misaki_saf::StoreForward, RunError> {
    let ingest = tokio::net::TcpListener::bind(sf.listen)
        .await
        .map_err(|source| RunError::SafBind {
            addr: sf.listen,
            source,
        })?;
    let qcfg = sf.queue_config();
    let queue = tokio::task::spawn_blocking(move || misaki_queue::Queue::open(qcfg))
        .await
        .map_err(|e| {
            RunError::Queue(misaki_queue::OpenError::Io {
                path: sf.queue_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        })??;
    tracing::info!(dir = %sf.queue_dir.display(), messages = queue.len(), "store-and-forward queue open");
    let uplinks = store_forward::SelectionUplinks::new(snapshots.clone());
    let saf = misaki_saf::StoreForward::start(
        sf.saf_config(),
        Arc::new(queue),
        engine.mesh_policy(),
        uplinks,
        stopped,
    )?;
    saf.register_metrics(registry);
    tokio::spawn({
        let saf = saf.clone();
        async move { saf.serve(ingest).await }
    });
    tracing::info!(listen = %sf.listen, "store-and-forward ingest listening");
    Ok(saf)
}

/// Run the daemon until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .map_err(|source| RunError::ApiBind {
            addr: config.api,
            source,
        })?;

    let stored = initial_policy(&config);
    let metrics = engine::Metrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let (engine, snapshots) = Engine::new(config.clone(), stored, metrics.clone());
    let (input_tx, input_rx) = mpsc::channel::<Input>(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Store-and-forward: queue (blocking open: lock + recovery), ingest listener,
    // forwarder following the engine's selection and policy.
    let saf = match &config.store_forward {
        None => None,
        Some(sf) => {
            Some(start_store_forward(sf, &engine, &snapshots, &mut registry, stopped()).await?)
        }
    };

    // After the queue, so a second daemon on the same queue reports the lock first.
    let xds = match config.xds {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::XdsBind { addr, source })?;
            tracing::info!(%addr, "local xDS tier listening");
            Some(start_local_xds(
                &config,
                listener,
                &engine,
                &snapshots,
                &mut registry,
                stopped(),
                stopped(),
            ))
        }
    };

    // Link monitor, restarted (re-dumping) if netlink fails.
    let interfaces: Vec<String> = config.uplinks.iter().map(|u| u.interface.clone()).collect();
    let (mon_tx, mut mon_rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            if let Err(e) = monitor::run_link_monitor(&interfaces, &mon_tx).await {
                if matches!(e, monitor::MonitorError::Closed) {
                    return;
                }
                tracing::error!(error = %e, "link monitor failed; restarting");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let tx = input_tx.clone();
    tokio::spawn(async move {
        while let Some(ev) = mon_rx.recv().await {
            if tx.send(Input::Monitor(ev)).await.is_err() {
                return;
            }
        }
    });

    // One prober per uplink.
    let (probe_tx, mut probe_rx) = mpsc::channel(256);
    for (i, u) in config.uplinks.iter().enumerate() {
        let spec = probe::ProberSpec {
            uplink: i,
            interface: u.interface.clone(),
            targets: u.probe_targets.clone(),
            interval: config.probe.interval,
            timeout: config.probe.timeout,
        };
        tokio::spawn(probe::run_prober(spec, probe_tx.clone()));
    }
    drop(probe_tx);
    let tx = input_tx.clone();
    tokio::spawn(async move {
        while let Some(r) = probe_rx.recv().await {
            if tx.send(Input::Probe(r)).await.is_err() {
                return;
            }
        }
    });

    let connected = Arc::new(AtomicBool::new(false));
    let reporter = tokio::spawn(reporter::run_reporter(
        config.clone(),
        snapshots.clone(),
        input_tx.clone(),
        metrics,
        connected.clone(),
        saf.clone(),
        xds.as_ref().map(|x| x.streams().clone()),
        stopped(),
    ));
    let api = tokio::spawn(api::serve(
        listener,
        api::ApiState {
            vehicle_id: config.vehicle_id.clone(),
            snapshots: snapshots.clone(),
            metrics: Arc::new(registry),
            connected,
            saf: saf.clone(),
            xds: xds.as_ref().map(|x| x.streams().clone()),
        },
        stopped(),
    ));
    tokio::spawn(notify_systemd(snapshots));
    let engine = tokio::spawn(engine.run(input_rx, stopped()));
    drop(input_tx);

    shutdown.await;
    tracing::info!("shutting down");
    stop_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = reporter.await;
        let _ = api.await;
        let _ = engine.await;
    })
    .await;
    if let Some(saf) = saf {
        // In-flight deliveries get their grace period, then the acks are flushed.
        let grace = config
            .store_forward
            .as_ref()
            .map_or(Duration::ZERO, |sf| sf.saf_config().shutdown_grace);
        if tokio::time::timeout(grace + Duration::from_secs(5), saf.stopped())
            .await
            .is_err()
        {
            tracing::warn!(
                "store-and-forward did not stop in time; unacked messages will be resent"
            );
        }
    }
    Ok(())
}

/// READY=1 after the first selection; WATCHDOG=1 while the engine keeps publishing
/// (its tick publishes at least whenever anything changes; a stuck engine stops it).
async fn notify_systemd(mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    if snapshots.wait_for(|s| s.ready).await.is_err() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "sd_notify READY");
    }
    tracing::info!("first uplink selection made; ready");
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        if snapshots.has_changed().is_err() {
            return;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
}
