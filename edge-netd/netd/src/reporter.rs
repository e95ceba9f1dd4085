//! Reporter: the long-lived `FleetService/Report` stream to the control plane.
//!
//! Invariants:
//! - Per connection: `Hello`, then a full `LinkState`, then `LinkChange` deltas and a
//!   `Heartbeat` every heartbeat interval (a measurement refresh, sent as a
//!   `LinkChange`, replaces that tick's heartbeat).
//! - State changes (existence, admin, carrier, reachability, a selection) are sent at
//!   once; measurement drift (RTT/loss/jitter) at most once per heartbeat interval.
//! - The connection is bound to the interface of the `default` class's selected
//!   uplink (so a silently blackholed default route cannot hide the vehicle), or
//!   unbound when none is selected. When that selection moves, the reporter
//!   reconnects over the new uplink.
//! - `control_plane` may list several addresses (misaki-cp replicas): a stream goes to
//!   one; when it fails (connect, the stream ends or errors, the heartbeat gives up)
//!   the next attempt goes to the next address, round robin from the first, after the
//!   same backoff. A move to a new uplink or credential keeps the address.
//! - Reconnects back off exponentially with jitter (200 ms doubling to 5 s, each
//!   delay drawn from [d/2, d]); a stream whose Hello was acknowledged resets it.
//! - Over mutual TLS (`https://` control plane), a stream is opened only with a usable
//!   credential from `identity`, and reopened once (no backoff) when a new one is
//!   published: misaki-cp checks the client certificate per connection, so a renewed
//!   certificate counts only on a new one, and the old connection would be closed when
//!   the old certificate expires anyway.
//! - Received policies (whole or delta) go to the engine, which validates, persists
//!   and applies them. `Hello.policy_deltas` is set: a delta the engine rejects comes
//!   back as `EngineView::policy_resync` and is sent once, as `LinkChange.policy_resync`
//!   with the version held, so the control plane resends from that version.
//! - The power state (`EngineView::power`) is in the full `LinkState`, and a change of
//!   it is sent at once as `LinkChange.power`.
//! - With store-and-forward, the full `LinkState` carries the queue depth per class, and
//!   changed queue stats ride along at most once per heartbeat interval (like
//!   measurement drift; a drained class is sent once with depth 0).
//! - With the local xDS tier, the full `LinkState` carries its clients (the vehicle's
//!   sidecars: node, ACKed/sent version and last NACK per type). The tier's registry
//!   has no change notification, so it is polled whenever the engine view changes
//!   and on every heartbeat tick; a changed list (a stream opened or closed, a push, an
//!   ACK, a NACK) is sent whole as a `LinkChange` with `sidecars_changed`
//!   ([`sidecars_update`]).
//!
//! Layers: [`run_reporter`] (reconnects, backoff) → `one_stream` (connects, bound to
//! the interface, `crate::channel`) → `Session` (one stream's protocol, over channels)
//! → `Reported` (what the control plane was told; deciding what to send is a pure diff
//! against it).

use crate::channel;
use crate::config::Config;
use crate::engine::{AddressLabel, EngineView, Input, LinkView, Metrics, ResultLabel};
use crate::identity::{Credential, CredentialRx};
use crate::policy::DEFAULT_CLASS;
use misaki_compiler::snapshot::ResourceType;
use misaki_proto::fleet_v1 as pb;
use pb::fleet_service_client::FleetServiceClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("control plane closed the stream")]
    Closed,
    #[error("the default class moved to {0}; reconnecting over it")]
    UplinkMoved(String),
    #[error("the vehicle's certificate changed (renewed or expired); reconnecting")]
    Renewed,
}

impl StreamError {
    /// Reconnect at once: nothing failed.
    fn is_move(&self) -> bool {
        matches!(self, StreamError::UplinkMoved(_) | StreamError::Renewed)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A link in wire form.
pub fn link_pb(l: &LinkView) -> pb::Link {
    pb::Link {
        name: l.name.clone(),
        interface: l.interface.clone(),
        kind: misaki_policy_wire::kind_to_wire(l.kind) as i32,
        up: l.up,
        carrier: l.carrier,
        reachable: l.reachable,
        rtt_us: l
            .rtt
            .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
        loss_permille: (l.loss_percent * 10.0).round() as u32,
        jitter_us: u32::try_from(l.jitter.as_micros()).unwrap_or(u32::MAX),
        throughput_bps: 0,
        metered: l.metered,
        cost: l.cost,
    }
}

fn selections_pb(s: &EngineView) -> Vec<pb::ClassSelection> {
    s.selections
        .iter()
        .map(|c| pb::ClassSelection {
            class: c.class.clone(),
            uplink: c.uplink.clone().unwrap_or_default(),
            reason: c.reason.into(),
        })
        .collect()
}

fn state_changed(a: &LinkView, b: &LinkView) -> bool {
    (a.exists, a.up, a.carrier, a.reachable, a.cost)
        != (b.exists, b.up, b.carrier, b.reachable, b.cost)
}

/// Significant drift: RTT by > 20 % or 2 ms, loss by ≥ 1 point, jitter by > 2 ms.
fn measurement_drifted(a: &LinkView, b: &LinkView) -> bool {
    let rtt = match (a.rtt, b.rtt) {
        (Some(x), Some(y)) => {
            let d = x.abs_diff(y);
            d > Duration::from_millis(2) && d.as_secs_f64() > 0.2 * x.as_secs_f64()
        }
        (None, None) => false,
        _ => true,
    };
    rtt || (a.loss_percent - b.loss_percent).abs() >= 1.0
        || a.jitter.abs_diff(b.jitter) > Duration::from_millis(2)
}

/// At most this many sidecars are reported (sorted by node id): a report must stay far
/// below the control plane's 1 MiB message limit whatever the local clients do.
pub const MAX_SIDECARS: usize = 64;
/// A NACK's message is cut to at most this many bytes (Envoy's can list every
/// rejected resource); the whole message stays on the local `/xds`.
pub const MAX_NACK_MESSAGE: usize = 1024;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncated(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The local xDS tier's streams in wire form: sorted by node id (then connection
/// time), at most [`MAX_SIDECARS`], every resource type in push order.
pub fn sidecars_pb(streams: &[misaki_xds::StreamStatus]) -> Vec<pb::Sidecar> {
    let mut out: Vec<pb::Sidecar> = streams
        .iter()
        .map(|s| pb::Sidecar {
            node_id: s.node.id.clone(),
            kind: s.kind.as_str().into(),
            proxyless: s.node.proxyless,
            connected_since_unix_ms: unix_ms(s.connected_since),
            types: ResourceType::PUSH_ORDER
                .iter()
                .map(|t| {
                    let ts = &s.types[t.index()];
                    pb::SidecarXdsType {
                        xds_type: t.short().into(),
                        sent_version: ts.last_sent.as_deref().map(str::to_string),
                        acked_version: ts.last_acked.as_deref().map(str::to_string),
                        last_nack: ts.last_nack.as_ref().map(|n| pb::XdsNack {
                            version: n.version.clone(),
                            message: truncated(&n.message, MAX_NACK_MESSAGE),
                            at_unix_ms: unix_ms(n.at),
                        }),
                    }
                })
                .collect(),
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.node_id, a.connected_since_unix_ms).cmp(&(&b.node_id, b.connected_since_unix_ms))
    });
    out.truncate(MAX_SIDECARS);
    out
}

/// The sidecar list to send, if it differs from the one last `sent`: a stream opened
/// or closed, a version was sent, ACKed or NACKed. The list goes whole (a
/// `LinkChange` with `sidecars_changed`), so an empty list is a real change too.
pub fn sidecars_update(
    sent: &[pb::Sidecar],
    streams: &[misaki_xds::StreamStatus],
) -> Option<Vec<pb::Sidecar>> {
    let now = sidecars_pb(streams);
    (now != sent).then_some(now)
}

/// Run the reporter until `shutdown` completes. `xds` is the local xDS tier's stream
/// registry, when the tier runs: its clients are reported as the vehicle's sidecars.
/// `identity` is the credential manager's output, over mutual TLS.
#[allow(clippy::too_many_arguments)]
pub async fn run_reporter(
    config: Arc<Config>,
    mut views: watch::Receiver<Arc<EngineView>>,
    engine: mpsc::Sender<Input>,
    metrics: Metrics,
    connected: Arc<AtomicBool>,
    saf: Option<misaki_saf::StoreForward>,
    xds: Option<misaki_xds::StreamRegistry>,
    mut identity: Option<CredentialRx>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_MIN;
    // Which of the control planes this attempt goes to; a failure moves to the next.
    let mut turn = 0usize;
    loop {
        let address = &config.control_planes[turn % config.control_planes.len()];
        show_address(&metrics, &config.control_planes, address);
        // Wait for the first selection so the stream can be bound to an uplink.
        let _ = views.wait_for(|s| s.ready).await;
        let interface = channel::default_interface(&config, &views.borrow());
        // Over TLS, nothing is reported without a usable credential (the credential
        // manager logs why, and /readyz says it).
        let credential = match identity.as_mut() {
            None => None,
            Some(rx) => tokio::select! {
                _ = &mut shutdown => return,
                c = usable_credential(rx) => Some(c),
            },
        };
        let mut acked = false;
        let result = tokio::select! {
            _ = &mut shutdown => return,
            r = one_stream(
                StreamDeps { config: &config, address, engine: &engine, metrics: &metrics, connected: &connected, saf: saf.as_ref(), xds: xds.as_ref() },
                interface.as_deref(),
                &mut views,
                &mut acked,
                credential.as_deref().zip(identity.as_mut()),
            ) => r,
        };
        connected.store(false, Ordering::Relaxed);
        metrics.reporter_connected.set(0);
        if acked {
            backoff = BACKOFF_MIN;
        }
        let err = result.err().unwrap_or(StreamError::Closed);
        let delay = backoff.mul_f64(rand::random_range(0.5..=1.0));
        if err.is_move() {
            tracing::info!(%err, "reconnecting");
        } else {
            let err = match &err {
                StreamError::Connect(e) => channel::error_chain(e),
                e => e.to_string(),
            };
            tracing::warn!(%err, retry_in_ms = delay.as_millis() as u64, "report stream down");
        }
        if !err.is_move() {
            if config.control_planes.len() > 1 {
                turn = turn.wrapping_add(1);
                let next = &config.control_planes[turn % config.control_planes.len()];
                tracing::info!(failed = %address, next = %next, "moving to the next control plane");
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// `edge_netd_reporter_control_plane`: 1 for `address`, 0 for the other addresses.
fn show_address(metrics: &Metrics, all: &[http::Uri], address: &http::Uri) {
    for a in all {
        let label = AddressLabel {
            address: a.to_string(),
        };
        let g = metrics.reporter_control_plane.get_or_create(&label);
        g.set(i64::from(a == address));
    }
}

/// What one stream reads and updates besides the views.
#[derive(Clone, Copy)]
struct StreamDeps<'a> {
    config: &'a Config,
    /// The control plane this stream goes to (one of `config.control_planes`).
    address: &'a http::Uri,
    engine: &'a mpsc::Sender<Input>,
    metrics: &'a Metrics,
    connected: &'a AtomicBool,
    saf: Option<&'a misaki_saf::StoreForward>,
    xds: Option<&'a misaki_xds::StreamRegistry>,
}

impl StreamDeps<'_> {
    /// Store-and-forward's queue stats (changed since `previous`), if it runs.
    fn queues(&self, previous: &[pb::QueueStats]) -> Vec<pb::QueueStats> {
        self.saf
            .map(|s| crate::store_forward::queue_stats(s, previous))
            .unwrap_or_default()
    }

    /// The local xDS tier's sidecars, if they differ from those `sent`.
    fn sidecars(&self, sent: &[pb::Sidecar]) -> Option<Vec<pb::Sidecar>> {
        let streams = self.xds.map(|x| x.snapshot()).unwrap_or_default();
        sidecars_update(sent, &streams)
    }
}

/// The credential in use, once there is one (marked seen: the next change is news).
async fn usable_credential(rx: &mut CredentialRx) -> Arc<Credential> {
    let found = rx
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|c| c.clone());
    match found {
        Some(c) => c,
        // The manager is gone (shutting down): nothing to connect with.
        None => std::future::pending().await,
    }
}

/// Resolves when the credential manager publishes another credential (or withdraws it).
async fn credential_replaced(rx: &mut CredentialRx) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Open the channel to the control plane, bound to `interface` when given, presenting
/// `credential` over TLS.
async fn connect(
    address: &http::Uri,
    interface: Option<&str>,
    metrics: &Metrics,
    credential: Option<&Credential>,
) -> Result<FleetServiceClient<tonic::transport::Channel>, StreamError> {
    let tls = credential.map(Credential::client_tls);
    let channel = channel::connect(address, interface, tls).await;
    let result = if channel.is_ok() { "ok" } else { "error" };
    metrics
        .reporter_connects
        .get_or_create(&ResultLabel { result })
        .inc();
    Ok(FleetServiceClient::new(channel?)
        .send_compressed(pb::COMPRESSION)
        .accept_compressed(pb::COMPRESSION))
}

fn hello(config: &Config, snap: &EngineView) -> pb::Hello {
    pb::Hello {
        vehicle_id: config.vehicle_id.clone(),
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        policy_version: snap.policy_version.clone(),
        heartbeat_interval_ms: u32::try_from(config.heartbeat_interval.as_millis())
            .unwrap_or(u32::MAX),
        // The engine applies deltas and reports the ones it rejects (policy_resync).
        policy_deltas: true,
    }
}

/// What the control plane was last told on this stream.
struct Reported {
    /// Link state fields, selections, policy version and resync as last sent; link
    /// measurements as last sent (they lag the engine's until they drift).
    snap: Arc<EngineView>,
    queues: Vec<pb::QueueStats>,
    sidecars: Vec<pb::Sidecar>,
}

impl Reported {
    /// The full `LinkState` of a new stream.
    fn link_state(&self) -> pb::LinkState {
        pb::LinkState {
            links: self.snap.links.iter().map(link_pb).collect(),
            selections: selections_pb(&self.snap),
            queues: self.queues.clone(),
            power: self.snap.power.state.to_pb() as i32,
            policy_version: self.snap.policy_version.clone(),
            sidecars: self.sidecars.clone(),
        }
    }

    /// The `LinkChange` for a new engine view, if there is news: link state (not
    /// measurement drift), selections, a policy applied or a delta rejected, the power
    /// state, and the sidecar list when `sidecars` has a new one.
    fn snapshot_change(
        &mut self,
        snap: &EngineView,
        sidecars: Option<Vec<pb::Sidecar>>,
    ) -> Option<pb::LinkChange> {
        let sent = &self.snap;
        let links: Vec<pb::Link> = snap
            .links
            .iter()
            .filter(|l| sent.link(&l.name).is_none_or(|old| state_changed(old, l)))
            .map(link_pb)
            .collect();
        let selections: Vec<pb::ClassSelection> = selections_pb(snap)
            .into_iter()
            .filter(|s| {
                sent.selection(&s.class)
                    .is_none_or(|old| old.uplink.as_deref().unwrap_or("") != s.uplink)
            })
            .collect();
        // A policy applied mid-stream (the one just received) must reach the
        // registry too, not only with the next reconnect's LinkState.
        let policy_version =
            (snap.policy_version != sent.policy_version).then(|| snap.policy_version.clone());
        let policy_resync = resync_pb(snap).filter(|_| snap.policy_resync != sent.policy_resync);
        let power = (snap.power.state != sent.power.state).then(|| snap.power.state.to_pb() as i32);
        let changed_state = !links.is_empty()
            || !selections.is_empty()
            || policy_version.is_some()
            || policy_resync.is_some()
            || power.is_some();
        if changed_state {
            // Keep measurements as last sent; only state fields advanced.
            let mut next = snap.clone();
            for l in &mut next.links {
                if let Some(old) = sent.link(&l.name)
                    && !state_changed(old, l)
                {
                    *l = old.clone();
                }
            }
            self.snap = Arc::new(next);
        }
        let sidecars_changed = sidecars.is_some();
        if let Some(s) = &sidecars {
            self.sidecars = s.clone();
        }
        (changed_state || sidecars_changed).then(|| pb::LinkChange {
            links,
            selections,
            sidecars_changed,
            sidecars: sidecars.unwrap_or_default(),
            policy_version,
            policy_resync,
            power,
            ..Default::default()
        })
    }

    /// The report of a heartbeat tick: measurement drift, changed queue stats (from
    /// `queues`, the current ones) and a new sidecar list, or a plain `Heartbeat`.
    fn tick(
        &mut self,
        snap: &EngineView,
        queues: Vec<pb::QueueStats>,
        sidecars: Option<Vec<pb::Sidecar>>,
    ) -> pb::vehicle_report::Report {
        let drifted: Vec<pb::Link> = snap
            .links
            .iter()
            .filter(|l| {
                self.snap
                    .link(&l.name)
                    .is_some_and(|old| measurement_drifted(old, l))
            })
            .map(link_pb)
            .collect();
        let changed_queues: Vec<pb::QueueStats> = queues
            .iter()
            .filter(|q| !self.queues.contains(q))
            .cloned()
            .collect();
        self.queues = queues;
        if drifted.is_empty() && changed_queues.is_empty() && sidecars.is_none() {
            return pb::vehicle_report::Report::Heartbeat(pb::Heartbeat {});
        }
        let mut next = (*self.snap).clone();
        for l in &mut next.links {
            if let Some(new) = snap.link(&l.name)
                && measurement_drifted(l, new)
            {
                *l = new.clone();
            }
        }
        self.snap = Arc::new(next);
        let sidecars_changed = sidecars.is_some();
        if let Some(s) = &sidecars {
            self.sidecars = s.clone();
        }
        pb::vehicle_report::Report::LinkChange(pb::LinkChange {
            links: drifted,
            queues: changed_queues,
            sidecars_changed,
            sidecars: sidecars.unwrap_or_default(),
            ..Default::default()
        })
    }
}

/// The engine's last rejected delta, as the control plane is told it.
fn resync_pb(snap: &EngineView) -> Option<pb::PolicyResync> {
    snap.policy_resync.as_ref().map(|r| pb::PolicyResync {
        held_version: snap.policy_version.clone(),
        rejected_version: r.rejected_version.clone(),
        want_full: r.want_full,
        reason: r.reason.clone(),
    })
}

/// The uplink the `default` class moved to, if the stream is bound elsewhere.
fn uplink_moved(config: &Config, interface: Option<&str>, snap: &EngineView) -> Option<String> {
    let up = snap
        .selection(DEFAULT_CLASS)
        .and_then(|s| s.uplink.as_ref())
        .and_then(|u| config.uplinks.iter().find(|c| c.name == *u))?;
    interface
        .is_some_and(|i| i != up.interface)
        .then(|| up.name.clone())
}

/// One connection: connect, queue `Hello` and the full `LinkState`, open the stream,
/// then run the [`Session`] until it fails, the uplink moves, or (over TLS: `tls` is
/// the credential presented and the manager's channel) another credential is published.
async fn one_stream(
    deps: StreamDeps<'_>,
    interface: Option<&str>,
    views: &mut watch::Receiver<Arc<EngineView>>,
    acked: &mut bool,
    tls: Option<(&Credential, &mut CredentialRx)>,
) -> Result<(), StreamError> {
    let (credential, renewed) = tls.unzip();
    tracing::info!(control_plane = %deps.address, ?interface, "connecting the report stream");
    let mut client = connect(deps.address, interface, deps.metrics, credential).await?;
    let (tx, rx) = mpsc::channel::<pb::VehicleReport>(32);
    let (mut session, opening) = Session::open(deps, interface, views);
    for report in opening {
        // Fresh channel of 32: cannot fail.
        let _ = tx.try_send(report);
    }
    let inbound = client.report(ReceiverStream::new(rx)).await?.into_inner();
    deps.connected.store(true, Ordering::Relaxed);
    deps.metrics.reporter_connected.set(1);
    tracing::info!(
        interface = interface.unwrap_or("(default route)"),
        identity = credential.map(|c| c.spiffe_id.as_str()),
        "report stream open"
    );
    let Some(renewed) = renewed else {
        return session.run(inbound, &tx, views, acked).await;
    };
    tokio::select! {
        r = session.run(inbound, &tx, views, acked) => r,
        _ = credential_replaced(renewed) => Err(StreamError::Renewed),
    }
}

/// The protocol of one open stream, over channels (no network: tests drive it with
/// paused time): what is sent when, and where received policies go.
struct Session<'a> {
    deps: StreamDeps<'a>,
    /// The interface the stream is bound to (`None`: the default route).
    interface: Option<&'a str>,
    reported: Reported,
    seq: u64,
}

impl<'a> Session<'a> {
    /// The session and its first two reports: `Hello`, then the full `LinkState`.
    fn open(
        deps: StreamDeps<'a>,
        interface: Option<&'a str>,
        views: &mut watch::Receiver<Arc<EngineView>>,
    ) -> (Self, [pb::VehicleReport; 2]) {
        let snap = views.borrow_and_update().clone();
        let reported = Reported {
            queues: deps.queues(&[]),
            sidecars: deps.sidecars(&[]).unwrap_or_default(),
            snap: Arc::clone(&snap),
        };
        let mut s = Session {
            deps,
            interface,
            reported,
            seq: 0,
        };
        let hello = s.report(pb::vehicle_report::Report::Hello(hello(deps.config, &snap)));
        let state = pb::vehicle_report::Report::LinkState(s.reported.link_state());
        let state = s.report(state);
        (s, [hello, state])
    }

    /// The next report on this stream (sequence numbers count from 1).
    fn report(&mut self, r: pb::vehicle_report::Report) -> pb::VehicleReport {
        self.seq += 1;
        pb::VehicleReport {
            seq: self.seq,
            observed_unix_ms: now_ms(),
            report: Some(r),
        }
    }

    /// Until the stream fails, the control plane closes it, or the `default` class
    /// moves to another uplink than the stream's (`UplinkMoved`). `acked` is set once
    /// the control plane acknowledged the Hello.
    async fn run(
        &mut self,
        mut inbound: impl Stream<Item = Result<pb::ControlMessage, tonic::Status>> + Unpin,
        out: &mpsc::Sender<pb::VehicleReport>,
        views: &mut watch::Receiver<Arc<EngineView>>,
        acked: &mut bool,
    ) -> Result<(), StreamError> {
        let config = self.deps.config;
        let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            let (report, moved) = tokio::select! {
                m = inbound.next() => {
                    match m.ok_or(StreamError::Closed)??.message {
                        Some(pb::control_message::Message::Policy(p)) => {
                            let to_engine = self.deps.engine.send(Input::Policy(Box::new(p)));
                            to_engine.await.map_err(|_| StreamError::Closed)?;
                        }
                        Some(pb::control_message::Message::Ack(_)) => *acked = true,
                        None => {}
                    }
                    (None, None)
                },
                changed = views.changed() => {
                    changed.map_err(|_| StreamError::Closed)?;
                    let snap = views.borrow_and_update().clone();
                    let sidecars = self.deps.sidecars(&self.reported.sidecars);
                    let change = self.reported.snapshot_change(&snap, sidecars);
                    let moved = uplink_moved(config, self.interface, &snap);
                    (change.map(pb::vehicle_report::Report::LinkChange), moved)
                }
                _ = heartbeat.tick() => {
                    let snap = views.borrow().clone();
                    let queues = self.deps.queues(&self.reported.queues);
                    let sidecars = self.deps.sidecars(&self.reported.sidecars);
                    (Some(self.reported.tick(&snap, queues, sidecars)), None)
                }
            };
            if let Some(r) = report {
                let report = self.report(r);
                out.send(report).await.map_err(|_| StreamError::Closed)?;
            }
            if let Some(up) = moved {
                return Err(StreamError::UplinkMoved(up));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::Power;
    use misaki_compiler::node::{NodeInfo, Role};
    use misaki_xds::{NackRecord, StreamKind, StreamStatus, TypeStatus};

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn stream(id: &str, kind: StreamKind, since_ms: u64) -> StreamStatus {
        StreamStatus {
            node: NodeInfo {
                id: id.into(),
                role: Role::Vehicle,
                vehicle_id: Some("car-1".into()),
                proxyless: false,
                delta: false,
                tls_dir: None,
            },
            kind,
            connected_since: at(since_ms),
            types: Default::default(),
        }
    }

    fn acked(s: &mut StreamStatus, t: ResourceType, v: &str) {
        let ts = &mut s.types[t.index()];
        ts.last_sent = Some(v.into());
        ts.last_acked = Some(v.into());
    }

    #[test]
    fn sidecars_carry_node_kind_and_every_type_in_push_order() {
        let mut s = stream("vehicle-sidecar", StreamKind::Delta, 1_000);
        acked(&mut s, ResourceType::Cluster, "p-c1");
        s.types[ResourceType::Listener.index()] = TypeStatus {
            last_sent: Some("p-l2".into()),
            last_acked: Some("p-l1".into()),
            last_nack: Some(NackRecord {
                version: Some("p-l2".into()),
                nonce: "7".into(),
                message: "bad listener".into(),
                at: at(2_000),
            }),
        };
        let out = sidecars_pb(&[s]);
        assert_eq!(out.len(), 1);
        let c = &out[0];
        assert_eq!(
            (c.node_id.as_str(), c.kind.as_str(), c.proxyless),
            ("vehicle-sidecar", "delta", false)
        );
        assert_eq!(c.connected_since_unix_ms, 1_000);
        let types: Vec<&str> = c.types.iter().map(|t| t.xds_type.as_str()).collect();
        assert_eq!(types, ["sds", "cds", "eds", "lds", "srds", "rds"]);
        let of = |t: ResourceType| &c.types[t.index()];
        assert_eq!(
            of(ResourceType::Cluster).acked_version.as_deref(),
            Some("p-c1")
        );
        assert_eq!(of(ResourceType::Cluster).last_nack, None);
        assert_eq!(
            *of(ResourceType::Endpoint),
            pb::SidecarXdsType {
                xds_type: "eds".into(),
                ..Default::default()
            }
        );
        let lds = of(ResourceType::Listener);
        assert_eq!(lds.sent_version.as_deref(), Some("p-l2"));
        assert_eq!(lds.acked_version.as_deref(), Some("p-l1"));
        assert_eq!(
            lds.last_nack,
            Some(pb::XdsNack {
                version: Some("p-l2".into()),
                message: "bad listener".into(),
                at_unix_ms: 2_000,
            })
        );
    }

    #[test]
    fn sidecars_are_sorted_capped_and_nack_messages_cut() {
        let mut streams: Vec<StreamStatus> = (0..MAX_SIDECARS + 5)
            .rev()
            .map(|i| stream(&format!("n{i:03}"), StreamKind::Sotw, 5))
            .collect();
        streams.push(stream("n000", StreamKind::Sotw, 1));
        streams[0].types[0].last_nack = Some(NackRecord {
            version: None,
            nonce: "1".into(),
            // Multi-byte characters: the cut must land on a character boundary.
            message: "é".repeat(MAX_NACK_MESSAGE),
            at: at(9),
        });
        let out = sidecars_pb(&streams);
        assert_eq!(out.len(), MAX_SIDECARS);
        assert_eq!(
            (out[0].node_id.as_str(), out[0].connected_since_unix_ms),
            ("n000", 1)
        );
        assert_eq!(
            (out[1].node_id.as_str(), out[1].connected_since_unix_ms),
            ("n000", 5)
        );
        assert!(out.windows(2).all(|w| w[0].node_id <= w[1].node_id));
        // streams[0] is the highest id: cut off by the cap.
        assert!(out.iter().all(|s| s.types[0].last_nack.is_none()));
        let few = sidecars_pb(&streams[..1]);
        let m = &few[0].types[0].last_nack.as_ref().unwrap().message;
        assert_eq!(m.len(), MAX_NACK_MESSAGE);
        assert!(m.chars().all(|c| c == 'é'));
        assert_eq!(truncated("abc", 2), "ab");
        assert_eq!(truncated("abc", 10), "abc");
        assert_eq!(truncated("aé", 2), "a");
    }

    #[test]
    fn a_sidecar_update_is_sent_only_when_something_changed() {
        // Nothing connected, nothing sent: nothing to say.
        assert_eq!(sidecars_update(&[], &[]), None);

        // A new stream.
        let mut s = stream("envoy", StreamKind::Sotw, 10);
        let sent = sidecars_update(&[], std::slice::from_ref(&s)).expect("new stream");
        assert_eq!(sent.len(), 1);
        assert_eq!(sidecars_update(&sent, std::slice::from_ref(&s)), None);

        // A push, then its ACK: each is a change.
        s.types[ResourceType::Cluster.index()].last_sent = Some("v1".into());
        let sent = sidecars_update(&sent, std::slice::from_ref(&s)).expect("push");
        let cds = ResourceType::Cluster.index();
        assert_eq!(sent[0].types[cds].acked_version, None);
        acked(&mut s, ResourceType::Cluster, "v1");
        let sent = sidecars_update(&sent, std::slice::from_ref(&s)).expect("ack");
        assert_eq!(sent[0].types[cds].acked_version.as_deref(), Some("v1"));
        assert_eq!(sidecars_update(&sent, std::slice::from_ref(&s)), None);

        // A NACK.
        s.types[ResourceType::Route.index()].last_nack = Some(NackRecord {
            version: Some("v2".into()),
            nonce: "3".into(),
            message: "route rejected".into(),
            at: at(20),
        });
        let sent = sidecars_update(&sent, std::slice::from_ref(&s)).expect("nack");
        let rds = sent[0].types.iter().find(|t| t.xds_type == "rds").unwrap();
        assert_eq!(
            rds.last_nack.as_ref().map(|n| n.message.as_str()),
            Some("route rejected")
        );

        // A second client connects, then both go: an empty list is a change too.
        let p = StreamStatus {
            node: NodeInfo {
                proxyless: true,
                delta: false,
                ..stream("app", StreamKind::Sotw, 30).node
            },
            ..stream("app", StreamKind::Sotw, 30)
        };
        let both = [s.clone(), p];
        let sent = sidecars_update(&sent, &both).expect("second stream");
        assert_eq!(
            sent.iter()
                .map(|c| (c.node_id.as_str(), c.proxyless))
                .collect::<Vec<_>>(),
            [("app", true), ("envoy", false)]
        );
        assert_eq!(sidecars_update(&sent, &[]), Some(vec![]));
    }

    #[test]
    fn link_kinds_go_out_through_the_policy_wire_mapping() {
        for (_, k) in misaki_policy::UplinkKind::ALL {
            let l = LinkView {
                name: "u".into(),
                interface: "u0".into(),
                kind: k,
                exists: true,
                up: true,
                carrier: true,
                reachable: true,
                rtt: None,
                jitter: Duration::ZERO,
                loss_percent: 0.0,
                samples: 0,
                consecutive_lost: 0,
                metered: false,
                cost: 0,
            };
            assert_eq!(link_pb(&l).kind, misaki_policy_wire::kind_to_wire(k) as i32);
            assert_ne!(link_pb(&l).kind, pb::UplinkKind::Unspecified as i32);
        }
    }

    #[test]
    fn a_rejected_delta_is_reported_once_with_the_version_held() {
        let base = EngineView {
            ready: true,
            policy_version: "v1".into(),
            ..Default::default()
        };
        let mut reported = Reported {
            snap: Arc::new(base.clone()),
            queues: vec![],
            sidecars: vec![],
        };
        assert_eq!(reported.snapshot_change(&base, None), None);
        let mut rejected = base.clone();
        rejected.policy_resync = Some(crate::engine::PolicyResync {
            seq: 1,
            rejected_version: "v3".into(),
            want_full: false,
            reason: "base v2 is not v1".into(),
        });
        let c = reported.snapshot_change(&rejected, None).expect("news");
        assert_eq!(
            c.policy_resync,
            Some(pb::PolicyResync {
                held_version: "v1".into(),
                rejected_version: "v3".into(),
                want_full: false,
                reason: "base v2 is not v1".into(),
            })
        );
        assert_eq!(c.policy_version, None, "the policy held did not change");
        assert_eq!(reported.snapshot_change(&rejected, None), None, "told once");
        // The answer applied: its version goes out, the old request does not.
        let mut applied = rejected.clone();
        applied.policy_version = "v3".into();
        let c = reported.snapshot_change(&applied, None).expect("news");
        assert_eq!(
            (c.policy_version.as_deref(), c.policy_resync),
            (Some("v3"), None)
        );
        // The next rejection is news again, even if alike.
        let mut again = applied.clone();
        again.policy_resync.as_mut().unwrap().seq = 2;
        let c = reported.snapshot_change(&again, None).expect("news");
        assert_eq!(
            c.policy_resync.map(|r| r.held_version).as_deref(),
            Some("v3")
        );
    }

    fn view(name: &str, interface: &str, rtt_ms: u64) -> LinkView {
        LinkView {
            name: name.into(),
            interface: interface.into(),
            kind: misaki_policy::UplinkKind::Wifi,
            exists: true,
            up: true,
            carrier: true,
            reachable: true,
            rtt: Some(Duration::from_millis(rtt_ms)),
            jitter: Duration::ZERO,
            loss_percent: 0.0,
            samples: 10,
            consecutive_lost: 0,
            metered: false,
            cost: 1,
        }
    }

    fn selected(class: &str, uplink: Option<&str>) -> crate::engine::SelectionView {
        crate::engine::SelectionView {
            class: class.into(),
            uplink: uplink.map(str::to_string),
            reason: "initial",
            since_unix_ms: 0,
            switches: 0,
        }
    }

    /// wifi (wlan0, selected for `default`) and lte (wwan0).
    fn engine_view() -> EngineView {
        EngineView {
            ready: true,
            policy_version: "v1".into(),
            links: vec![view("wifi", "wlan0", 20), view("lte", "wwan0", 60)],
            selections: vec![selected(DEFAULT_CLASS, Some("wifi"))],
            policy_resync: None,
            power: Default::default(),
        }
    }

    fn reported(snap: &EngineView) -> Reported {
        Reported {
            snap: Arc::new(snap.clone()),
            queues: vec![],
            sidecars: vec![],
        }
    }

    fn queue(class: &str, depth: u64) -> pb::QueueStats {
        pb::QueueStats {
            class: class.into(),
            depth_messages: depth,
            ..Default::default()
        }
    }

    #[test]
    fn state_changes_go_out_at_once_and_only_the_links_that_changed() {
        let snap = engine_view();
        let mut r = reported(&snap);
        assert_eq!(r.snapshot_change(&snap, None), None, "nothing new");

        let mut down = snap.clone();
        down.links[1].carrier = false;
        down.links[1].reachable = false;
        let c = r
            .snapshot_change(&down, None)
            .expect("carrier loss is news");
        assert_eq!(c.links, vec![link_pb(&down.links[1])]);
        assert!(c.selections.is_empty() && c.policy_version.is_none());
        assert_eq!(r.snapshot_change(&down, None), None, "told once");

        let mut moved = down.clone();
        moved.selections = vec![selected(DEFAULT_CLASS, Some("lte"))];
        moved.policy_version = "v2".into();
        let c = r
            .snapshot_change(&moved, None)
            .expect("selection and policy");
        assert!(c.links.is_empty());
        assert_eq!(c.selections[0].uplink, "lte");
        assert_eq!(c.policy_version.as_deref(), Some("v2"));
        // A whole new sidecar list rides along, even an empty one.
        let c = r.snapshot_change(&moved, Some(vec![])).expect("sidecars");
        assert!(c.sidecars_changed && c.links.is_empty());
    }

    #[test]
    fn a_power_change_goes_out_at_once_and_the_full_state_carries_it() {
        let snap = engine_view();
        let mut r = reported(&snap);
        assert_eq!(r.link_state().power, pb::PowerState::On as i32);
        let mut low = snap.clone();
        low.power.state = Power::Low;
        low.power.source = crate::power::Source::File;
        let c = r.snapshot_change(&low, None).expect("power is news");
        assert_eq!(c.power, Some(pb::PowerState::Low as i32));
        assert!(c.links.is_empty() && c.selections.is_empty() && c.policy_version.is_none());
        assert_eq!(r.link_state().power, pb::PowerState::Low as i32);
        // Its source or the file's error alone is not news for the control plane.
        let mut api = low.clone();
        api.power.source = crate::power::Source::Api;
        api.power.file_error = Some("garbled".into());
        assert_eq!(r.snapshot_change(&api, None), None);
        // Other news does not repeat the power state.
        let mut down = api.clone();
        down.links[1].carrier = false;
        assert_eq!(r.snapshot_change(&down, None).expect("carrier").power, None);
        let mut off = down.clone();
        off.power.state = Power::ShuttingDown;
        let c = r.snapshot_change(&off, None).expect("power is news");
        assert_eq!(c.power, Some(pb::PowerState::ShuttingDown as i32));
    }

    #[test]
    fn measurement_drift_waits_for_the_heartbeat_and_small_jitter_is_not_drift() {
        let snap = engine_view();
        let mut r = reported(&snap);
        let mut slower = snap.clone();
        slower.links[0].rtt = Some(Duration::from_millis(21)); // 1 ms: noise
        slower.links[1].rtt = Some(Duration::from_millis(90)); // +50 %: drift
        assert_eq!(r.snapshot_change(&slower, None), None, "drift is not state");
        // Measurements stay as last sent until the tick that reports them.
        assert_eq!(r.snap.links[1].rtt, Some(Duration::from_millis(60)));
        let pb::vehicle_report::Report::LinkChange(c) = r.tick(&slower, vec![], None) else {
            panic!("drift is reported on the tick");
        };
        assert_eq!(c.links, vec![link_pb(&slower.links[1])]);
        assert_eq!(r.snap.links[1].rtt, Some(Duration::from_millis(90)));
        assert_eq!(
            r.snap.links[0].rtt,
            Some(Duration::from_millis(20)),
            "noise kept"
        );
        // Nothing new: a plain heartbeat.
        assert_eq!(
            r.tick(&slower, vec![], None),
            pb::vehicle_report::Report::Heartbeat(pb::Heartbeat {})
        );
        // Lost probes are drift too; an unmeasured link against a measured one as well.
        let mut lossy = slower.clone();
        lossy.links[0].loss_percent = 5.0;
        lossy.links[1].rtt = None;
        let pb::vehicle_report::Report::LinkChange(c) = r.tick(&lossy, vec![], None) else {
            panic!("loss and a lost RTT are drift");
        };
        assert_eq!(c.links.len(), 2);
    }

    #[test]
    fn queue_stats_ride_on_the_tick_only_when_they_changed() {
        let snap = engine_view();
        let mut r = reported(&snap);
        let first = r.tick(&snap, vec![queue("bulk", 3)], None);
        let pb::vehicle_report::Report::LinkChange(c) = first else {
            panic!("new queue stats are news");
        };
        assert_eq!((c.queues, c.links.len()), (vec![queue("bulk", 3)], 0));
        assert_eq!(
            r.tick(&snap, vec![queue("bulk", 3)], None),
            pb::vehicle_report::Report::Heartbeat(pb::Heartbeat {})
        );
        let pb::vehicle_report::Report::LinkChange(c) =
            r.tick(&snap, vec![queue("bulk", 0), queue("logs", 1)], None)
        else {
            panic!("drained and new classes are news");
        };
        assert_eq!(c.queues, vec![queue("bulk", 0), queue("logs", 1)]);
        // The full LinkState of a later stream carries them as last sent.
        assert_eq!(r.link_state().queues, c.queues);
        assert_eq!(r.link_state().links.len(), 2);
    }

    #[test]
    fn a_stream_bound_elsewhere_than_the_default_class_moves() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let mut snap = engine_view();
        assert_eq!(uplink_moved(&config, Some("wlan0"), &snap), None);
        snap.selections = vec![selected(DEFAULT_CLASS, Some("lte"))];
        assert_eq!(
            uplink_moved(&config, Some("wlan0"), &snap).as_deref(),
            Some("lte")
        );
        // Unbound (default route): nothing to move from.
        assert_eq!(uplink_moved(&config, None, &snap), None);
        // No uplink selected: stay where we are.
        snap.selections = vec![selected(DEFAULT_CLASS, None)];
        assert_eq!(uplink_moved(&config, Some("wlan0"), &snap), None);
    }

    fn config(state_dir: &std::path::Path) -> Config {
        let text = format!(
            "vehicle_id: car-1\ncontrol_plane: http://198.18.0.1:18000\napi: 127.0.0.1:9470\n\
             state_dir: {}\nheartbeat_interval: 2s\nuplinks:\n\
             \x20 - {{ name: wifi, interface: wlan0, kind: wifi }}\n\
             \x20 - {{ name: lte, interface: wwan0, kind: lte }}\n\
             probe:\n  targets: [\"198.18.0.1:7\"]\n",
            state_dir.display()
        );
        Config::parse("t.yaml", &text).expect("test config")
    }

    /// A session over channels, as `one_stream` runs it after connecting.
    struct Harness {
        control: mpsc::Sender<Result<pb::ControlMessage, tonic::Status>>,
        reports: mpsc::Receiver<pb::VehicleReport>,
        engine: mpsc::Receiver<Input>,
        views: watch::Sender<Arc<EngineView>>,
        ended: tokio::task::JoinHandle<(Result<(), StreamError>, bool)>,
    }

    fn start(interface: Option<&'static str>) -> (Harness, [pb::VehicleReport; 2]) {
        let dir = tempfile::tempdir().unwrap();
        // Leaked: the session borrows these for as long as the test task runs.
        let config: &'static Config = Box::leak(Box::new(config(dir.path())));
        let metrics: &'static Metrics = Box::leak(Box::default());
        let connected: &'static AtomicBool = Box::leak(Box::default());
        let (engine_tx, engine) = mpsc::channel(4);
        let engine_tx: &'static mpsc::Sender<Input> = Box::leak(Box::new(engine_tx));
        let (views, mut snap_rx) = watch::channel(Arc::new(engine_view()));
        let (control, inbound) = mpsc::channel(4);
        let (out, reports) = mpsc::channel(8);
        let deps = StreamDeps {
            config,
            address: &config.control_plane,
            engine: engine_tx,
            metrics,
            connected,
            saf: None,
            xds: None,
        };
        let (mut session, opening) = Session::open(deps, interface, &mut snap_rx);
        let ended = tokio::spawn(async move {
            let mut acked = false;
            let inbound = ReceiverStream::new(inbound);
            let r = session.run(inbound, &out, &mut snap_rx, &mut acked).await;
            (r, acked)
        });
        let h = Harness {
            control,
            reports,
            engine,
            views,
            ended,
        };
        (h, opening)
    }

    fn kind(r: &pb::VehicleReport) -> &'static str {
        match r.report.as_ref().unwrap() {
            pb::vehicle_report::Report::Hello(_) => "hello",
            pb::vehicle_report::Report::LinkState(_) => "link_state",
            pb::vehicle_report::Report::LinkChange(_) => "link_change",
            pb::vehicle_report::Report::Heartbeat(_) => "heartbeat",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_says_hello_then_reports_changes_at_once_and_beats_every_interval() {
        let (mut h, opening) = start(Some("wlan0"));
        let [hello, state] = &opening;
        let Some(pb::vehicle_report::Report::Hello(hi)) = &hello.report else {
            panic!("hello first");
        };
        assert_eq!(
            (
                hi.vehicle_id.as_str(),
                hi.heartbeat_interval_ms,
                hi.policy_deltas
            ),
            ("car-1", 2_000, true)
        );
        assert_eq!((hello.seq, kind(state), state.seq), (1, "link_state", 2));

        // Nothing changes: one heartbeat per interval, no sooner.
        let start = tokio::time::Instant::now();
        let beat = h.reports.recv().await.unwrap();
        assert_eq!((kind(&beat), beat.seq), ("heartbeat", 3));
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        // A state change goes out without waiting for the tick.
        let at = tokio::time::Instant::now();
        h.views.send_modify(|s| {
            let s = Arc::make_mut(s);
            s.links[1].carrier = false;
        });
        let change = h.reports.recv().await.unwrap();
        assert_eq!((kind(&change), change.seq), ("link_change", 4));
        assert_eq!(at.elapsed(), Duration::ZERO);
        let beat = h.reports.recv().await.unwrap();
        assert_eq!(kind(&beat), "heartbeat");
        assert_eq!(start.elapsed(), Duration::from_secs(4));

        // The control plane's policy goes to the engine; its ack is remembered.
        let policy = pb::PolicyUpdate {
            version: "v2".into(),
            ..Default::default()
        };
        let msg = |m| Ok(pb::ControlMessage { message: Some(m) });
        h.control
            .send(msg(pb::control_message::Message::Policy(policy.clone())))
            .await
            .unwrap();
        let Some(Input::Policy(got)) = h.engine.recv().await else {
            panic!("the policy reaches the engine");
        };
        assert_eq!(*got, policy);
        h.control
            .send(msg(pb::control_message::Message::Ack(pb::Ack::default())))
            .await
            .unwrap();
        // The control plane hangs up: the session ends, having been acknowledged.
        drop(h.control);
        let (result, acked) = h.ended.await.unwrap();
        assert!(matches!(result, Err(StreamError::Closed)), "{result:?}");
        assert!(acked);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_when_the_default_class_moves_to_another_interface() {
        let (mut h, _) = start(Some("wlan0"));
        h.views.send_modify(|s| {
            Arc::make_mut(s).selections = vec![selected(DEFAULT_CLASS, Some("lte"))];
        });
        // The move itself is reported first, then the stream ends to rebind.
        let change = h.reports.recv().await.unwrap();
        assert_eq!(kind(&change), "link_change");
        let (result, acked) = h.ended.await.unwrap();
        assert!(
            matches!(result, Err(StreamError::UplinkMoved(ref u)) if u == "lte"),
            "{result:?}"
        );
        assert!(!acked);
        // A broken stream is an error too.
        let (h, _) = start(None);
        h.control
            .send(Err(tonic::Status::unavailable("gone")))
            .await
            .unwrap();
        let (result, _) = h.ended.await.unwrap();
        assert!(matches!(result, Err(StreamError::Status(_))), "{result:?}");
    }
}
