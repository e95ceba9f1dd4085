//! `misaki-cp serve`: wire policy, cache, xDS server, watcher and admin together, with
//! mutual TLS on the gRPC port when `--client-ca` is given, and certificate enrolment
//! on it (`crate::enroll`) when `--ca` and `--crl` are given too. With `--store` the
//! policy comes from etcd (`crate::store`) and `--policy` is pushed there.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use misaki_fleet::FleetRegistry;
use misaki_identity::TrustDomain;
use misaki_policy::{Policy, PolicyErrors};
use misaki_xds::{ServeConfig, StreamRegistry, XdsServer};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Admin, JsonFn, LookupFn};
use crate::ca::{Ca, CaError};
use crate::cache::SnapshotCache;
use crate::cli::{ServeArgs, TlsArgs};
use crate::enroll::{self, Enrollment};
use crate::policy_state::PolicyState;
use crate::presence::{FleetView, Publisher};
use crate::store::{Store, StoreError};
use crate::tls::{Limits, TlsError, TlsFiles, TlsServer};
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
    #[error(
        "--peer-addr {0} is every address: give --peer-advertise HOST:PORT, the one other \
         replicas reach"
    )]
    PeerAdvertise(std::net::SocketAddr),
    #[error(transparent)]
    Watch(#[from] watcher::WatchError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("--ca: {0}")]
    Ca(#[from] CaError),
    #[error("--ca {dir}: {why}")]
    CaUnusable { dir: PathBuf, why: String },
    #[error("--store: {0}")]
    Store(#[from] StoreError),
}

impl RunError {
    /// A problem with what the operator passed (exit 64), not a failure at run time.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RunError::Policy(_)
                | RunError::Tls(_)
                | RunError::Ca(_)
                | RunError::CaUnusable { .. }
                | RunError::PeerAdvertise(_)
        ) || matches!(self, RunError::Store(e) if e.is_usage())
    }
}

/// The gRPC port's mutual TLS, and the CA of `--ca` that enrolment signs with.
#[derive(Debug)]
pub struct GrpcTls {
    pub server: TlsServer,
    pub ca: Option<Ca>,
}

/// Load and check the TLS files and `--ca` (nothing binds before this). `None`: TLS off.
pub fn load_tls(args: &TlsArgs) -> Result<Option<GrpcTls>, RunError> {
    let Some(files) = TlsFiles::from_args(args) else {
        return Ok(None);
    };
    let ca = match &args.ca {
        Some(dir) => Some((dir, Ca::load(dir)?)),
        None => None,
    };
    let unusable = |dir: &PathBuf, why: String| RunError::CaUnusable {
        dir: dir.clone(),
        why,
    };
    let trust_domain = match (&args.trust_domain, &ca) {
        (Some(td), Some((dir, ca))) if td != ca.trust_domain() => {
            let why = format!(
                "its trust domain is {}, --trust-domain says {td}",
                ca.trust_domain()
            );
            return Err(unusable(dir, why));
        }
        (Some(td), _) => td.clone(),
        (None, Some((_, ca))) => ca.trust_domain().clone(),
        (None, None) => TrustDomain::default(),
    };
    let limits = Limits {
        handshake_timeout: args.handshake_timeout,
        max_handshakes: usize::try_from(args.max_handshakes).unwrap_or(usize::MAX),
    };
    let server = TlsServer::load(files, trust_domain.clone(), limits)?;
    if let Some((dir, ca)) = &ca {
        if ca.not_after() < time::OffsetDateTime::now_utc() {
            return Err(unusable(
                dir,
                format!("the CA expired at {}", crate::ca::utc(ca.not_after())),
            ));
        }
        // What it signs must be accepted here, or enrolled vehicles could not connect.
        if !server.trusts(ca.cert_der()) {
            return Err(unusable(dir, "its ca.pem is not in --client-ca".into()));
        }
    }
    tracing::info!(%trust_domain, enrolment_ca = ca.is_some(), "mutual TLS on the gRPC port");
    Ok(Some(GrpcTls {
        server,
        ca: ca.map(|(_, ca)| ca),
    }))
}

/// The gRPC port's TLS, and the enrolment service for what `serve` was given: on with
/// TLS, `--ca` and `--crl`.
fn enrolment(args: &TlsArgs, tls: Option<GrpcTls>) -> (Option<TlsServer>, Enrollment) {
    let (server, ca) = match tls {
        Some(t) => (Some(t.server), t.ca),
        None => (None, None),
    };
    let enrollment = Enrollment::new(enroll::Config {
        tls: server.is_some(),
        crl: args.crl.is_some(),
        ca,
        valid_for: args.enrol_valid_for,
    });
    if enrollment.is_on() {
        tracing::info!(valid_for = ?args.enrol_valid_for, "certificate enrolment on the gRPC port");
    } else if args.ca.is_some() {
        tracing::warn!(
            "--ca is given but enrolment is off: it needs --crl too (the CA's crl.pem), so a revoked certificate cannot enrol"
        );
    }
    (server, enrollment)
}

/// The UDP probe echo's socket, if `--probe-addr` is given.
async fn bind_probe(
    addr: Option<std::net::SocketAddr>,
) -> Result<Option<tokio::net::UdpSocket>, RunError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let socket = tokio::net::UdpSocket::bind(addr).await;
    let err = |source| RunError::Bind {
        what: "probe echo",
        addr,
        source,
    };
    socket.map(Some).map_err(err)
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

/// Shared mode's fleet: the view of etcd's records, this replica's name, and the etcd
/// client that finds other replicas' peer ports.
struct Shared {
    view: FleetView,
    replica: String,
    client: etcd_client::Client,
}

/// What the admin routes read: readiness, metrics, policy, streams and fleet.
/// In shared mode `/fleet` is the whole fleet, else this process's registry.
fn admin_routes(
    ready: Arc<AtomicBool>,
    metrics: MetricsRegistry,
    policy: &PolicyState,
    streams: &StreamRegistry,
    fleet: &FleetRegistry,
    shared: Option<Shared>,
) -> Admin {
    let streams = streams.clone();
    let (fleet_fn, vehicle_fn): (Arc<JsonFn>, Arc<LookupFn>) = match shared {
        Some(Shared {
            view,
            replica,
            client,
        }) => {
            let (f, v, r) = (fleet.clone(), view.clone(), replica.clone());
            (
                Arc::new(move || view.fleet_json(&f, &replica)),
                Arc::new({
                    let f = fleet.clone();
                    move |id| {
                        let (v, f, r, c) = (v.clone(), f.clone(), r.clone(), client.clone());
                        Box::pin(
                            async move { crate::peer::vehicle_json(&v, &f, &r, &c, &id).await },
                        )
                    }
                }),
            )
        }
        None => {
            let (f, v) = (fleet.clone(), fleet.clone());
            (
                Arc::new(move || f.to_json()),
                Arc::new(move |id| Box::pin(std::future::ready(v.vehicle_json(&id)))),
            )
        }
    };
    Admin {
        ready,
        metrics: Arc::new(metrics),
        policy: policy.clone(),
        nodes: Arc::new(move || streams.to_json()),
        fleet: fleet_fn,
        vehicle: vehicle_fn,
    }
}

/// Run until `shutdown` resolves, then drain.
pub async fn serve(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    // Parse everything before binding anything.
    let advertise = match (args.peer_addr, &args.peer_advertise) {
        (Some(_), Some(a)) => Some(a.clone()),
        (Some(addr), None) if addr.ip().is_unspecified() => {
            return Err(RunError::PeerAdvertise(addr));
        }
        (Some(addr), None) => Some(addr.to_string()),
        (None, _) => None,
    };
    let (policy, source) = initial_policy(args.policy.as_ref()).map_err(RunError::Policy)?;
    let (tls, enrollment) = enrolment(&args.tls, load_tls(&args.tls)?);
    let store = match &args.store {
        Some(url) => Some(Store::connect(url, &args.store_tls).await?),
        None => None,
    };
    let policy_state = match &args.store {
        // A placeholder until etcd's policy arrives; never served (see below).
        Some(url) => PolicyState::awaiting(
            SnapshotCache::new(Arc::new(policy), misaki_xds::version_prefix()),
            format!("{url}{}", crate::store::CURRENT),
            format!(
                "no policy from etcd yet (misaki-cp policy apply FILE --store {url}, or serve --policy FILE --store {url})"
            ),
        ),
        None => PolicyState::new(
            SnapshotCache::new(Arc::new(policy), misaki_xds::version_prefix()),
            source,
        ),
    };
    let cache = policy_state.cache().clone();

    let fleet = FleetRegistry::new();
    let streams = StreamRegistry::new();
    let xds = XdsServer::new(Arc::new(cache.clone()), streams.clone());
    let mut metrics = MetricsRegistry::default();
    xds.register_metrics(&mut metrics);
    policy_state.register_metrics(&mut metrics);
    fleet.register_metrics(&mut metrics);
    enrollment.register_metrics(&mut metrics);
    if let Some(tls) = &tls {
        tls.register_metrics(&mut metrics);
        if !args.admin_addr.ip().is_loopback() {
            tracing::warn!(addr = %args.admin_addr, "the admin port is plain HTTP and not on loopback: /nodes and /fleet are readable by anyone who reaches it");
        }
    }

    let xds_listener = bind("xDS", args.xds_addr).await?;
    let admin_listener = bind("admin", args.admin_addr).await?;
    let peer = match (args.peer_addr, advertise) {
        (Some(addr), Some(advertise)) => Some((bind("peer", addr).await?, advertise)),
        _ => None,
    };
    let probe_socket = bind_probe(args.probe_addr).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Shared mode: this replica's vehicles into etcd, everyone's out of it.
    let shared = store.as_ref().map(|store| {
        let (client, url) = store.client();
        let replica = crate::presence::replica_id();
        let view = FleetView::default();
        tokio::spawn(view.clone().follow(client.clone(), url.clone(), stopped()));
        let publisher = Publisher {
            client: client.clone(),
            url,
            tls: args.store_tls.clone(),
            replica: replica.clone(),
            ttl: args.lease_ttl,
            fleet: fleet.clone(),
            peer: peer.as_ref().map(|(_, advertise)| advertise.clone()),
        };
        tokio::spawn(publisher.run(stopped()));
        Shared {
            view,
            replica,
            client,
        }
    });
    if let Some((listener, _)) = peer {
        tokio::spawn(crate::peer::serve(listener, fleet.clone(), stopped()));
    }
    let view = shared.as_ref().map(|s| s.view.clone());

    let ready = Arc::new(AtomicBool::new(false));
    let admin = admin_routes(
        ready.clone(),
        metrics,
        &policy_state,
        &streams,
        &fleet,
        shared,
    );
    tracing::info!(addr = %args.admin_addr, "admin listening");
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin, stopped()));

    let watch_task = match &store {
        // Shared mode: follow etcd; push the file's valid edits there.
        Some(store) => {
            tokio::spawn(store.clone().follow(policy_state.clone(), stopped()));
            args.policy.clone().map(|path| {
                let push = store
                    .clone()
                    .push_file(path, policy_state.clone(), stopped());
                tokio::spawn(push)
            })
        }
        None => args
            .policy
            .clone()
            .map(|path| tokio::spawn(watcher::run(path, policy_state.clone(), stopped()))),
    };

    if let Some(socket) = probe_socket {
        tracing::info!(addr = ?socket.local_addr().ok(), "probe echo listening");
        tokio::spawn(misaki_fleet::run_probe_echo(socket, stopped()));
    }

    tokio::spawn(crate::fleet_state::follow(
        fleet.clone(),
        view.clone(),
        cache.clone(),
    ));

    let closing = fleet.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        // Vehicle report streams end with UNAVAILABLE so they reconnect elsewhere.
        closing.close_streams();
        let _ = stop_tx.send(true);
    });

    // Shared mode: nothing is served before etcd's policy is in force and the fleet
    // view has read etcd's records.
    let has_policy = tokio::select! {
        () = async {
            policy_state.loaded().await;
            if let Some(view) = &view {
                view.synced().await;
            }
        } => true,
        () = stopped() => false,
    };
    if !has_policy {
        let _ = admin_task.await;
        return Ok(());
    }
    ready.store(true, Ordering::Release);
    let routes = tonic::service::Routes::new(misaki_fleet::service(
        fleet.clone(),
        policy_state.subscribe(),
    ))
    .add_service(enrollment.service());
    let config = ServeConfig {
        max_connection_age: (!args.max_connection_age.is_zero()).then_some(args.max_connection_age),
        max_connection_age_grace: args.max_connection_age_grace,
        ..ServeConfig::default()
    };
    let result = serve_grpc(xds_listener, &xds, routes, &config, tls.as_ref(), stopped).await;
    let _ = admin_task.await;
    if let Some(t) = watch_task {
        t.await.expect("watcher task panicked")?;
    }
    result
}

/// Serve the gRPC port (ADS and `routes`), over mutual TLS if `tls` is set, until
/// `stopped()` resolves.
async fn serve_grpc<S, F>(
    listener: TcpListener,
    xds: &XdsServer,
    routes: tonic::service::Routes,
    config: &ServeConfig,
    tls: Option<&TlsServer>,
    stopped: S,
) -> Result<(), RunError>
where
    S: Fn() -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(tls) = tls else {
        misaki_xds::serve(listener, xds, routes, config, stopped()).await;
        return Ok(());
    };
    tracing::info!(addr = ?listener.local_addr().ok(), "xDS server listening (mutual TLS)");
    let tcp = misaki_xds::tcp_incoming(listener, config);
    let (incoming, reload) = tls.incoming(tcp, stopped());
    misaki_xds::serve_incoming(incoming, xds, routes, config, stopped()).await;
    reload.await.expect("TLS reload task panicked")?;
    Ok(())
}
