//! Wiring: what [`run`] starts, in which order, and how it stops.
//!
//! Start-up order: the local API's port (a second daemon fails here first), the stored
//! or factory policy, the engine, store-and-forward (before the xDS tier, so a second
//! daemon on the same queue reports the queue lock), the credential manager (with
//! `tls:`; store-and-forward and the xDS socket follow its credential), the local xDS
//! tier, then the link monitor, one prober per uplink and (with `power:`) the power
//! file's reader (all feeding the engine's one input queue), the reporter, the local
//! API (`PUT /power` feeds it too) and systemd notification.
//!
//! Shutdown: every task gets the same stop signal; the engine, reporter and API get
//! 5 s to end, then store-and-forward its grace period to finish in-flight deliveries
//! and flush its acks.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::{self, Config};
use crate::engine::{self, Engine, EngineView, Input};
use crate::{
    api, identity, local_xds, monitor, policy, power, probe, reporter, store_forward, xds_socket,
};

/// Room for a burst of inputs (a netlink dump, every prober answering at once, a
/// policy) without blocking their senders; the engine drains a burst per evaluation.
const INPUT_QUEUE: usize = 1024;
/// What the engine, reporter and local API get to end after the stop signal.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
    #[error("local xDS socket: {0}")]
    XdsSocket(#[from] crate::xds_socket::SocketError),
}

/// Run the daemon until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    let api_listener = TcpListener::bind(config.api)
        .await
        .map_err(|source| RunError::ApiBind {
            addr: config.api,
            source,
        })?;

    let metrics = engine::Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let (engine, views) = Engine::new(config.clone(), initial_policy(&config), metrics.clone());
    let (inputs, input_rx) = mpsc::channel::<Input>(INPUT_QUEUE);
    let (stop_tx, stop) = Stop::new();

    let saf = match &config.store_forward {
        None => None,
        Some(sf) => {
            Some(start_store_forward(sf, &engine, &views, &mut registry, stop.wait()).await?)
        }
    };
    let identity = config.tls.is_some().then(|| {
        let metrics = identity::IdentityMetrics::default();
        metrics.register(&mut registry);
        identity::start(config.clone(), views.clone(), metrics, stop.wait())
    });
    if let (Some(saf), Some(identity)) = (&saf, &identity) {
        tokio::spawn(follow_identity(saf.clone(), identity.credential.clone()));
    }
    // After the queue, so a second daemon on the same queue reports the lock first.
    let credential = identity.as_ref().map(|i| i.credential.clone());
    let xds_streams =
        start_local_xds(&config, &engine, &views, credential, &mut registry, &stop).await?;

    spawn_link_monitor(&config, inputs.clone());
    spawn_probers(&config, &inputs);
    if let Some(p) = &config.power {
        let errors = metrics.power.file_errors.clone();
        let reader = power::run_file_reader(p.clone(), inputs.clone(), errors, stop.wait());
        tokio::spawn(reader);
    }
    let api_inputs = inputs.clone();
    let connected = Arc::new(AtomicBool::new(false));
    let reporter = tokio::spawn(reporter::run_reporter(
        config.clone(),
        views.clone(),
        inputs,
        metrics,
        connected.clone(),
        saf.clone(),
        xds_streams.clone(),
        identity.as_ref().map(|i| i.credential.clone()),
        stop.wait(),
    ));
    let api = tokio::spawn(api::serve(
        api_listener,
        api::ApiState {
            vehicle_id: config.vehicle_id.clone(),
            views: views.clone(),
            metrics: Arc::new(registry),
            connected,
            saf: saf.clone(),
            xds: xds_streams,
            identity,
            inputs: api_inputs,
        },
        stop.wait(),
    ));
    tokio::spawn(notify_systemd(views));
    let engine = tokio::spawn(engine.run(input_rx, stop.wait()));

    shutdown.await;
    tracing::info!("shutting down");
    stop_tx.send_replace(true);
    let _ = tokio::time::timeout(STOP_GRACE, async {
        let _ = reporter.await;
        let _ = api.await;
        let _ = engine.await;
    })
    .await;
    if let Some(saf) = saf {
        stop_store_forward(&config, saf).await;
    }
    Ok(())
}

/// The one stop signal every task ends on.
#[derive(Clone, Debug)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    /// Resolves once the stop is sent (or its sender is gone).
    fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// The link monitor, restarted (re-dumping) if netlink fails; its events go straight
/// into the engine's input queue.
fn spawn_link_monitor(config: &Config, inputs: mpsc::Sender<Input>) {
    let interfaces: Vec<String> = config.uplinks.iter().map(|u| u.interface.clone()).collect();
    tokio::spawn(async move {
        loop {
            if let Err(e) = monitor::run_link_monitor(&interfaces, &inputs).await {
                if matches!(e, monitor::MonitorError::Closed) {
                    return;
                }
                tracing::error!(error = %e, "link monitor failed; restarting");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// One prober per uplink, each sending its results straight to the engine.
fn spawn_probers(config: &Config, inputs: &mpsc::Sender<Input>) {
    for (i, u) in config.uplinks.iter().enumerate() {
        let spec = probe::ProberSpec {
            uplink: i,
            interface: u.interface.clone(),
            targets: u.probe_targets.clone(),
            interval: config.probe.interval,
            timeout: config.probe.timeout,
        };
        tokio::spawn(probe::run_prober(spec, inputs.clone()));
    }
}

/// In-flight deliveries get their grace period, then the acks are flushed.
async fn stop_store_forward(config: &Config, saf: misaki_saf::StoreForward) {
    let grace = config
        .store_forward
        .as_ref()
        .map_or(Duration::ZERO, |sf| sf.saf_config().shutdown_grace);
    if tokio::time::timeout(grace + STOP_GRACE, saf.stopped())
        .await
        .is_err()
    {
        tracing::warn!("store-and-forward did not stop in time; unacked messages will be resent");
    }
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

/// Start the vehicle-local xDS tier on its listeners (`xds:`), following the engine,
/// the policy and the credential; `None` when it has none. Both listeners list their
/// streams in one registry (the reporter's and `/xds`'s view of the sidecars).
async fn start_local_xds(
    config: &Arc<Config>,
    engine: &Engine,
    views: &watch::Receiver<Arc<EngineView>>,
    credential: Option<identity::CredentialRx>,
    registry: &mut Registry,
    stop: &Stop,
) -> Result<Option<misaki_xds::StreamRegistry>, RunError> {
    let xds = &config.xds;
    if xds.listen.is_none() && xds.socket.is_none() {
        return Ok(None);
    }
    let mesh = engine.mesh_policy();
    let source = local_xds::LocalSource::new(
        &config.vehicle_id,
        mesh.borrow().clone(),
        local_xds::vehicle_state(config, &views.borrow()),
        misaki_xds::version_prefix(),
    );
    let streams = misaki_xds::StreamRegistry::new();
    if let Some(addr) = xds.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::XdsBind { addr, source })?;
        tracing::info!(%addr, "local xDS tier listening");
        let server = misaki_xds::XdsServer::new(Arc::new(source.clone()), streams.clone());
        server.register_metrics(registry);
        let incoming = misaki_xds::tcp_incoming(listener, &misaki_xds::ServeConfig::default());
        tokio::spawn(serve_local_xds(server, incoming, stop.wait()));
    }
    if let Some(socket) = &xds.socket {
        let listener = xds_socket::bind(socket)?;
        tracing::info!(path = %socket.path.display(), group = ?socket.group,
            "local xDS tier listening on its socket (serves the vehicle's credential)");
        let server =
            misaki_xds::XdsServer::new(Arc::new(source.serving_credential()), streams.clone());
        server.register_metrics(
            registry.sub_registry_with_label(("listener".into(), "socket".into())),
        );
        tokio::spawn(serve_local_xds(
            server,
            xds_socket::incoming(listener),
            stop.wait(),
        ));
    }
    tokio::spawn(local_xds::follow(
        config.clone(),
        source,
        views.clone(),
        mesh,
        credential,
        stop.wait(),
    ));
    Ok(Some(streams))
}

async fn serve_local_xds<I, IO>(
    server: misaki_xds::XdsServer,
    incoming: I,
    stopped: impl Future<Output = ()>,
) where
    I: futures::Stream<Item = std::io::Result<IO>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    let config = misaki_xds::ServeConfig::default();
    let routes = tonic::service::Routes::default();
    misaki_xds::serve_incoming(incoming, &server, routes, &config, stopped).await;
}

/// Hand each new credential to store-and-forward, as the identity its https
/// deliveries present (`misaki_saf::ClientIdentity`).
async fn follow_identity(saf: misaki_saf::StoreForward, mut credential: identity::CredentialRx) {
    let (tx, rx) = watch::channel(None);
    let forward = saf.clone();
    tokio::spawn(async move { forward.follow_identity(rx).await });
    loop {
        let identity = credential
            .borrow_and_update()
            .as_deref()
            .and_then(client_identity);
        tx.send_replace(identity);
        if credential.changed().await.is_err() {
            return;
        }
    }
}

fn client_identity(c: &identity::Credential) -> Option<Arc<misaki_saf::ClientIdentity>> {
    let id = misaki_identity::SpiffeId::parse(&c.spiffe_id).ok()?;
    Some(Arc::new(misaki_saf::ClientIdentity {
        cert_chain_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.clone(),
        ca_pem: c.ca_pem.clone(),
        trust_domain: id.trust_domain().as_str().to_owned(),
    }))
}

/// Store-and-forward: ingest listener, queue (blocking open: lock + recovery), and the
/// forwarder following the engine's selection and policy.
async fn start_store_forward(
    sf: &config::StoreForwardConfig,
    engine: &Engine,
    views: &watch::Receiver<Arc<EngineView>>,
    registry: &mut Registry,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<misaki_saf::StoreForward, RunError> {
    let ingest = TcpListener::bind(sf.listen)
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
    let uplinks = store_forward::SelectionUplinks::new(views.clone());
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

/// READY=1 after the first selection; WATCHDOG=1 while the engine keeps publishing
/// (its tick publishes at least whenever anything changes; a stuck engine stops it).
async fn notify_systemd(mut views: watch::Receiver<Arc<EngineView>>) {
    if views.wait_for(|s| s.ready).await.is_err() {
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
        if views.has_changed().is_err() {
            return;
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }
}
