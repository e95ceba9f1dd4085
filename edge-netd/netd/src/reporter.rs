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
//! - Reconnects back off exponentially with jitter (200 ms doubling to 5 s, each
//!   delay drawn from [d/2, d]); a stream whose Hello was acknowledged resets it.
//! - Received policies go to the engine, which validates, persists and applies them.
//! - With store-and-forward, the full `LinkState` carries the queue depth per class, and
//!   changed queue stats ride along at most once per heartbeat interval (like
//!   measurement drift; a drained class is sent once with depth 0).

use crate::config::{Config, UplinkKind};
use crate::engine::{Input, LinkView, Metrics, ResultLabel, Snapshot};
use crate::policy::DEFAULT_CLASS;
use misaki_proto::fleet_v1 as pb;
use pb::fleet_service_client::FleetServiceClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kind(k: UplinkKind) -> pb::UplinkKind {
    match k {
        UplinkKind::Lte => pb::UplinkKind::Lte,
        UplinkKind::FiveG => pb::UplinkKind::FiveG,
        UplinkKind::ThreeG => pb::UplinkKind::ThreeG,
        UplinkKind::Wifi => pb::UplinkKind::Wifi,
        UplinkKind::Dsrc => pb::UplinkKind::Dsrc,
        UplinkKind::Lpwa => pb::UplinkKind::Lpwa,
    }
}

/// A link in wire form.
pub fn link_pb(l: &LinkView) -> pb::Link {
    pb::Link {
        name: l.name.clone(),
        interface: l.interface.clone(),
        kind: kind(l.kind) as i32,
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

fn selections_pb(s: &Snapshot) -> Vec<pb::ClassSelection> {
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

/// Run the reporter until `shutdown` completes.
pub async fn run_reporter(
    config: Arc<Config>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    engine: mpsc::Sender<Input>,
    metrics: Metrics,
    connected: Arc<AtomicBool>,
    saf: Option<misaki_saf::StoreForward>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = BACKOFF_MIN;
    loop {
        // Wait for the first selection so the stream can be bound to an uplink.
        let _ = snapshots.wait_for(|s| s.ready).await;
        let interface = snapshots
            .borrow()
            .selection(DEFAULT_CLASS)
            .and_then(|s| s.uplink.clone())
            .and_then(|u| {
                config
                    .uplinks
                    .iter()
                    .find(|c| c.name == u)
                    .map(|c| c.interface.clone())
            });
        let mut acked = false;
        let result = tokio::select! {
            _ = &mut shutdown => return,
            r = one_stream(
                StreamDeps { config: &config, engine: &engine, metrics: &metrics, connected: &connected, saf: saf.as_ref() },
                interface.as_deref(),
                &mut snapshots,
                &mut acked,
            ) => r,
        };
        connected.store(false, Ordering::Relaxed);
        metrics.reporter_connected.set(0);
        if acked {
            backoff = BACKOFF_MIN;
        }
        let err = result.err().unwrap_or(StreamError::Closed);
        let delay = backoff.mul_f64(rand::random_range(0.5..=1.0));
        match &err {
            StreamError::UplinkMoved(_) => tracing::info!(%err, "reconnecting"),
            _ => tracing::warn!(%err, retry_in_ms = delay.as_millis() as u64, "report stream down"),
        }
        if !matches!(err, StreamError::UplinkMoved(_)) {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// What one stream reads and updates besides the snapshots.
struct StreamDeps<'a> {
    config: &'a Config,
    engine: &'a mpsc::Sender<Input>,
    metrics: &'a Metrics,
    connected: &'a AtomicBool,
    saf: Option<&'a misaki_saf::StoreForward>,
}

async fn one_stream(
    deps: StreamDeps<'_>,
    interface: Option<&str>,
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    acked: &mut bool,
) -> Result<(), StreamError> {
    let StreamDeps {
        config,
        engine,
        metrics,
        connected,
        saf,
    } = deps;
    let queues = |previous: &[pb::QueueStats]| {
        saf.map(|s| crate::store_forward::queue_stats(s, previous))
            .unwrap_or_default()
    };
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    if let Some(i) = interface {
        connector.set_interface(i);
    }
    let channel = tonic::transport::Endpoint::from(config.control_plane.clone())
        // Detect a dead path within a few seconds even when nothing is sent.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .inspect_err(|_| {
            metrics
                .reporter_connects
                .get_or_create(&ResultLabel { result: "error" })
                .inc();
        })?;
    metrics
        .reporter_connects
        .get_or_create(&ResultLabel { result: "ok" })
        .inc();
    let mut client = FleetServiceClient::new(channel)
        .send_compressed(pb::COMPRESSION)
        .accept_compressed(pb::COMPRESSION);

    let (tx, rx) = mpsc::channel::<pb::VehicleReport>(32);
    let mut seq = 0u64;
    let mut msg = |r: pb::vehicle_report::Report| {
        seq += 1;
        pb::VehicleReport {
            seq,
            observed_unix_ms: now_ms(),
            report: Some(r),
        }
    };
    let snap = snapshots.borrow_and_update().clone();
    let hello = pb::Hello {
        vehicle_id: config.vehicle_id.clone(),
        daemon_version: env!("CARGO_PKG_VERSION").into(),
        policy_version: snap.policy_version.clone(),
        heartbeat_interval_ms: u32::try_from(config.heartbeat_interval.as_millis())
            .unwrap_or(u32::MAX),
    };
    let mut sent_queues = queues(&[]);
    let full = pb::LinkState {
        links: snap.links.iter().map(link_pb).collect(),
        selections: selections_pb(&snap),
        queues: sent_queues.clone(),
        power: pb::PowerState::On as i32,
        policy_version: snap.policy_version.clone(),
    };
    // Fresh channel of 32: cannot fail.
    let _ = tx.try_send(msg(pb::vehicle_report::Report::Hello(hello)));
    let _ = tx.try_send(msg(pb::vehicle_report::Report::LinkState(full)));
    let mut inbound = client.report(ReceiverStream::new(rx)).await?.into_inner();
    connected.store(true, Ordering::Relaxed);
    metrics.reporter_connected.set(1);
    tracing::info!(
        interface = interface.unwrap_or("(default route)"),
        "report stream open"
    );

    let mut sent = snap;
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            m = inbound.message() => match m? {
                None => return Err(StreamError::Closed),
                Some(pb::ControlMessage { message: Some(pb::control_message::Message::Policy(p)) }) => {
                    if engine.send(Input::Policy(p)).await.is_err() {
                        return Err(StreamError::Closed);
                    }
                }
                Some(pb::ControlMessage { message: Some(pb::control_message::Message::Ack(_)) }) => *acked = true,
                Some(_) => {}
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Err(StreamError::Closed);
                }
                let snap = snapshots.borrow_and_update().clone();
                let links: Vec<pb::Link> = snap.links.iter()
                    .filter(|l| sent.link(&l.name).is_none_or(|old| state_changed(old, l)))
                    .map(link_pb)
                    .collect();
                let selections: Vec<pb::ClassSelection> = selections_pb(&snap)
                    .into_iter()
                    .filter(|s| sent.selection(&s.class).is_none_or(|old| old.uplink.as_deref().unwrap_or("") != s.uplink))
                    .collect();
                if !links.is_empty() || !selections.is_empty() {
                    let change = pb::LinkChange { links, selections, ..Default::default() };
                    if tx.send(msg(pb::vehicle_report::Report::LinkChange(change))).await.is_err() {
                        return Err(StreamError::Closed);
                    }
                    // Keep measurements as last sent; only state fields advanced.
                    let mut next = (*snap).clone();
                    for l in &mut next.links {
                        if let Some(old) = sent.link(&l.name)
                            && !state_changed(old, l) {
                                *l = old.clone();
                            }
                    }
                    sent = Arc::new(next);
                }
                let now_iface = snap
                    .selection(DEFAULT_CLASS)
                    .and_then(|s| s.uplink.as_ref())
                    .and_then(|u| config.uplinks.iter().find(|c| c.name == *u));
                if let Some(up) = now_iface
                    && interface.is_some_and(|i| i != up.interface) {
                        return Err(StreamError::UplinkMoved(up.name.clone()));
                    }
            }
            _ = heartbeat.tick() => {
                let snap = snapshots.borrow().clone();
                let drifted: Vec<pb::Link> = snap.links.iter()
                    .filter(|l| sent.link(&l.name).is_some_and(|old| measurement_drifted(old, l)))
                    .map(link_pb)
                    .collect();
                let now_queues = queues(&sent_queues);
                let changed_queues: Vec<pb::QueueStats> = now_queues
                    .iter()
                    .filter(|q| !sent_queues.contains(q))
                    .cloned()
                    .collect();
                sent_queues = now_queues;
                let report = if drifted.is_empty() && changed_queues.is_empty() {
                    pb::vehicle_report::Report::Heartbeat(pb::Heartbeat {})
                } else {
                    let mut next = (*sent).clone();
                    for l in &mut next.links {
                        if let Some(new) = snap.link(&l.name)
                            && measurement_drifted(l, new) {
                                *l = new.clone();
                            }
                    }
                    sent = Arc::new(next);
                    pb::vehicle_report::Report::LinkChange(pb::LinkChange { links: drifted, queues: changed_queues, ..Default::default() })
                };
                if tx.send(msg(report)).await.is_err() {
                    return Err(StreamError::Closed);
                }
            }
        }
    }
}
