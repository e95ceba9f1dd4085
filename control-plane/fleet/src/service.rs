//! The `FleetService` gRPC server: one task per vehicle stream.
//!
//! Invariants:
//! - The first message must be `Hello` (else FAILED_PRECONDITION); a later `Hello`
//!   on the same stream is a protocol error (INVALID_ARGUMENT).
//! - A stream silent for [`crate::OFFLINE_AFTER_HEARTBEATS`] heartbeat intervals is
//!   ended (DEADLINE_EXCEEDED) and its vehicle marked offline.
//! - A vehicle is sent the current policy when the version it holds (its
//!   `Hello.policy_version`, then the last sent on that stream) differs, so a no-op
//!   policy reload pushes nothing. It is a delta from that version when the vehicle
//!   said it takes deltas (`Hello.policy_deltas`) and the history has one
//!   ([`crate::policy`]), else the whole policy.
//! - A `LinkChange.policy_resync` (the vehicle rejected a delta) is answered with the
//!   current policy from the version it names; with the whole policy when it asks for
//!   it or after [`MAX_DELTA_RESYNCS`] resyncs, and from then on for the rest of the
//!   stream. A whole policy never causes a resync, so there is no loop.
//! - Each policy change is converted, and its deltas built, once for all streams
//!   ([`wire_policy`]).
//! - Over mutual TLS (the request carries a [`TlsPeer`]) a stream reports only as the
//!   vehicle its certificate names: a `Hello` for another vehicle, or from a claim or
//!   cloud certificate, ends the stream with PERMISSION_DENIED before the registry
//!   sees it. Without TLS the `Hello` is taken at its word.

use crate::policy::{PolicyHistory, PolicyVersioned};
use crate::registry::FleetRegistry;
use misaki_identity::{Claimed, TlsPeer};
use misaki_policy::Policy;
use misaki_proto::fleet_v1 as pb;
use pb::fleet_service_server::{FleetService, FleetServiceServer};
use pb::vehicle_report::Report;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// A vehicle must say Hello within this long after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbound messages buffered per stream; a vehicle that does not read blocks only
/// its own task.
const OUTBOUND_BUFFER: usize = 16;
/// Largest report accepted (a LinkState of a few dozen links is a few KiB).
const MAX_REPORT_BYTES: usize = 1 << 20;
/// Resyncs answered with a delta on one stream; later ones get the whole policy, so a
/// vehicle whose base keeps moving cannot make the stream ping-pong.
pub const MAX_DELTA_RESYNCS: u32 = 3;

/// The `FleetService` implementation. Build it with [`service`].
#[derive(Debug, Clone)]
pub struct FleetApi {
    registry: FleetRegistry,
    /// The policy in its wire form with its deltas, built once per policy change (not
    /// once per vehicle stream: a 3,000-service policy is ~180 KB to build).
    policy: watch::Receiver<Arc<PolicyVersioned>>,
}

/// Follow `policy`, converting each new value once and building its deltas from the
/// recent ones. The returned receiver's sender lives as long as `policy`'s, so its end
/// still means "shutting down".
fn wire_policy(mut policy: watch::Receiver<Arc<Policy>>) -> watch::Receiver<Arc<PolicyVersioned>> {
    let mut history = PolicyHistory::default();
    let first = misaki_policy_wire::to_wire(&policy.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(history.push(first)));
    tokio::spawn(async move {
        while policy.changed().await.is_ok() {
            let latest = Arc::clone(&policy.borrow_and_update());
            let whole = misaki_policy_wire::to_wire(&latest);
            let changed = whole.version != tx.borrow().version;
            if changed {
                tx.send_replace(Arc::new(history.push(whole)));
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// The gRPC service to add to the control plane's tonic server, zstd both ways.
///
/// `policy` is the current validated policy; every change to it is pushed to all
/// connected vehicles (whole or as a delta), which apply and persist it.
pub fn service(
    registry: FleetRegistry,
    policy: watch::Receiver<Arc<Policy>>,
) -> FleetServiceServer<FleetApi> {
    let policy = wire_policy(policy);
    FleetServiceServer::new(FleetApi { registry, policy })
        .send_compressed(pb::COMPRESSION)
        .accept_compressed(pb::COMPRESSION)
        .max_decoding_message_size(MAX_REPORT_BYTES)
}

type ControlStream = Pin<Box<dyn futures::Stream<Item = Result<ControlMessage, Status>> + Send>>;
use pb::ControlMessage;

#[tonic::async_trait]
impl FleetService for FleetApi {
    type ReportStream = ControlStream;

    async fn report(
        &self,
        request: Request<Streaming<pb::VehicleReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let tls = request.extensions().get::<TlsPeer>().cloned();
        let peer = request
            .remote_addr()
            .or_else(|| tls.as_ref().and_then(|t| t.remote_addr));
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??
            .ok_or_else(|| Status::cancelled("stream closed before Hello"))?;
        let Some(Report::Hello(hello)) = &first.report else {
            return Err(Status::failed_precondition(
                crate::RegistryError::HelloFirst.to_string(),
            ));
        };
        let identity = authorize(tls.as_ref(), hello)?;
        if *self.registry.closing().borrow() {
            return Err(Status::unavailable(CLOSED));
        }
        let (vehicle, stream) = self
            .registry
            .hello(hello, identity)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let mut policy = self.policy.clone();
        let current = Arc::clone(&policy.borrow_and_update());
        let mut push = PolicyPush::new(hello);
        // Fresh channel with capacity > 2: these cannot fail.
        let _ = tx.try_send(Ok(ack(first.seq)));
        if let Some(m) = push.send(&self.registry, &current) {
            let _ = tx.try_send(Ok(m));
        }
        tracing::info!(vehicle = %vehicle, ?peer, daemon = %hello.daemon_version, deltas = hello.policy_deltas, "vehicle connected");
        let span = tracing::info_span!("fleet_stream", vehicle = %vehicle, stream);
        let task = StreamTask {
            registry: self.registry.clone(),
            vehicle,
            stream,
            inbound,
            policy,
            push,
            tx,
        };
        tokio::spawn(task.run().instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Whether the verified peer (if the stream came over mutual TLS) may report as the
/// vehicle `hello` names; its identity (a SPIFFE ID) for `/fleet` if so.
fn authorize(tls: Option<&TlsPeer>, hello: &pb::Hello) -> Result<Option<String>, Status> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    match misaki_identity::authorize(&tls.identity, Claimed::Vehicle(&hello.vehicle_id)) {
        Ok(()) => Ok(tls.identity_uri()),
        Err(denied) => {
            tracing::warn!(peer = ?tls.remote_addr, %denied, "refused vehicle report stream: identity");
            Err(Status::permission_denied(denied.to_string()))
        }
    }
}

fn ack(seq: u64) -> ControlMessage {
    ControlMessage {
        message: Some(pb::control_message::Message::Ack(pb::Ack { seq })),
    }
}

/// Which policy one stream's vehicle holds, as far as the control plane knows, and how
/// to bring it to the current one (stream contract 4, 4a, 4b in fleet.proto).
#[derive(Debug)]
struct PolicyPush {
    /// The vehicle applies deltas: it said so, and has not asked for whole policies.
    deltas: bool,
    /// Its `Hello.policy_version`, then each version sent, or the one a resync names.
    held: String,
    resyncs: u32,
}

impl PolicyPush {
    fn new(hello: &pb::Hello) -> Self {
        PolicyPush {
            deltas: hello.policy_deltas,
            held: hello.policy_version.clone(),
            resyncs: 0,
        }
    }

    /// The message bringing the vehicle to `current`, counted as sent, unless it holds
    /// it already. Afterwards the vehicle is taken to hold `current`.
    fn send(
        &mut self,
        registry: &FleetRegistry,
        current: &PolicyVersioned,
    ) -> Option<ControlMessage> {
        if current.version == self.held {
            return None;
        }
        let (kind, update) = current.update_for(&self.held, self.deltas);
        registry.sent_policy(kind, prost::Message::encoded_len(&**update));
        self.held = current.version.clone();
        Some(ControlMessage {
            message: Some(pb::control_message::Message::Policy((**update).clone())),
        })
    }

    /// The vehicle rejected a delta and holds `r.held_version`: what to send now.
    fn resync(
        &mut self,
        registry: &FleetRegistry,
        r: &pb::PolicyResync,
        current: &PolicyVersioned,
    ) -> Option<ControlMessage> {
        self.resyncs += 1;
        if r.want_full || self.resyncs > MAX_DELTA_RESYNCS {
            self.deltas = false;
        }
        self.held = r.held_version.clone();
        self.send(registry, current)
    }
}

/// One vehicle stream after its Hello.
struct StreamTask {
    registry: FleetRegistry,
    vehicle: Arc<str>,
    stream: u64,
    inbound: Streaming<pb::VehicleReport>,
    policy: watch::Receiver<Arc<PolicyVersioned>>,
    push: PolicyPush,
    tx: mpsc::Sender<Result<ControlMessage, Status>>,
}

/// Why report streams end (and new ones are refused) when the registry closes them:
/// the vehicle should report to another replica.
const CLOSED: &str =
    "control plane not taking vehicles (shutting down, or its lease in the store expired)";

/// Why a stream ends: `Some` status to send the vehicle, `None` when it is gone.
type End = Option<Status>;

impl StreamTask {
    async fn run(mut self) {
        let mut closing = self.registry.closing();
        let end = loop {
            let silent_for = self.registry.offline_after(&self.vehicle);
            tokio::select! {
                msg = tokio::time::timeout(silent_for, self.inbound.message()) => match msg {
                    Err(_) => break Some(Status::deadline_exceeded("no report within 3 heartbeat intervals")),
                    Ok(Err(status)) => {
                        tracing::info!(%status, "stream error");
                        break None;
                    }
                    Ok(Ok(None)) => break None,
                    Ok(Ok(Some(report))) => if let Err(end) = self.on_report(report).await {
                        break end;
                    },
                },
                changed = self.policy.changed() => {
                    if changed.is_err() {
                        // The policy source is gone: the control plane is shutting down.
                        break Some(Status::unavailable("control plane shutting down"));
                    }
                    // Clone the Arc so the watch guard is dropped before any await.
                    let update = Arc::clone(&self.policy.borrow_and_update());
                    if let Some(m) = self.push.send(&self.registry, &update) {
                        tracing::info!(version = %update.version, "pushing policy");
                        if let Err(end) = self.send(m).await {
                            break end;
                        }
                    }
                }
                // wait_for's guard is not Send: drop it inside the branch future.
                _ = async { let _ = closing.wait_for(|c| *c).await; } => break Some(Status::unavailable(CLOSED)),
                _ = self.tx.closed() => break None,
            }
        };
        self.registry.disconnected(&self.vehicle, self.stream);
        tracing::info!(reason = ?end.as_ref().map(|s| s.message()), "vehicle stream ended");
        if let Some(status) = end {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn send(&self, m: ControlMessage) -> Result<(), End> {
        self.tx.send(Ok(m)).await.map_err(|_| None)
    }

    /// Record one report; ack a LinkState, answer a policy resync.
    async fn on_report(&mut self, report: pb::VehicleReport) -> Result<(), End> {
        let ack_seq = matches!(report.report, Some(Report::LinkState(_))).then_some(report.seq);
        let resync = match &report.report {
            Some(Report::LinkChange(c)) => c.policy_resync.clone(),
            _ => None,
        };
        if !self.registry.apply(&self.vehicle, &report) {
            return Err(Some(Status::invalid_argument(
                "Hello sent twice on one stream",
            )));
        }
        if let Some(seq) = ack_seq {
            self.send(ack(seq)).await?;
        }
        if let Some(r) = resync {
            tracing::info!(held = %r.held_version, rejected = %r.rejected_version, want_full = r.want_full, reason = %r.reason, "vehicle rejected a policy delta");
            let current = Arc::clone(&self.policy.borrow());
            if let Some(m) = self.push.resync(&self.registry, &r, &current) {
                self.send(m).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FleetEventKind;
    use crate::policy::tests::demo_policy;
    use pb::control_message::Message;
    use pb::fleet_service_client::FleetServiceClient;

    async fn start(
        policy: watch::Receiver<Arc<Policy>>,
    ) -> (FleetRegistry, String, tokio::task::JoinHandle<()>) {
        let registry = FleetRegistry::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = service(registry.clone(), policy);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        (registry, format!("http://{addr}"), task)
    }

    fn report(seq: u64, r: Report) -> pb::VehicleReport {
        pb::VehicleReport {
            seq,
            observed_unix_ms: 1,
            report: Some(r),
        }
    }

    fn link(name: &str, carrier: bool) -> pb::Link {
        pb::Link {
            name: name.into(),
            interface: format!("{name}0"),
            kind: pb::UplinkKind::Wifi as i32,
            up: true,
            carrier,
            reachable: carrier,
            rtt_us: carrier.then_some(1500),
            ..Default::default()
        }
    }

    fn hello(vehicle_id: &str, policy_version: &str, policy_deltas: bool) -> pb::Hello {
        pb::Hello {
            vehicle_id: vehicle_id.into(),
            daemon_version: "0.1.0".into(),
            policy_version: policy_version.into(),
            heartbeat_interval_ms: 1000,
            policy_deltas,
        }
    }

    /// Open a report stream (zstd, like edge-netd) that starts with `hello`.
    async fn connect(
        url: &str,
        hello: pb::Hello,
    ) -> (
        mpsc::Sender<pb::VehicleReport>,
        Streaming<pb::ControlMessage>,
    ) {
        let mut client = FleetServiceClient::connect(url.to_string())
            .await
            .unwrap()
            .send_compressed(pb::COMPRESSION)
            .accept_compressed(pb::COMPRESSION);
        let (tx, rx) = mpsc::channel(8);
        tx.send(report(1, Report::Hello(hello))).await.unwrap();
        let control = client
            .report(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, control)
    }

    /// The next policy update on `control`, skipping acks.
    async fn next_policy(control: &mut Streaming<pb::ControlMessage>) -> pb::PolicyUpdate {
        loop {
            match control.message().await.unwrap().unwrap().message {
                Some(Message::Policy(p)) => return p,
                Some(Message::Ack(_)) => continue,
                None => panic!("empty control message"),
            }
        }
    }

    fn metrics_text(registry: &FleetRegistry) -> String {
        let mut metrics = prometheus_client::registry::Registry::default();
        registry.register_metrics(&mut metrics);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
        text
    }

    #[tokio::test]
    async fn registry_tracks_snapshot_deltas_policy_and_disconnect() {
        let (ptx, prx) = watch::channel(Arc::new(demo_policy(Some(100))));
        let (registry, url, _server) = start(prx).await;
        let mut events = registry.subscribe();
        let (tx, mut control) = connect(&url, hello("car-1", "", false)).await;
        let ack = control.message().await.unwrap().unwrap();
        assert!(matches!(
            ack.message,
            Some(Message::Ack(pb::Ack { seq: 1 }))
        ));
        let Some(Message::Policy(p)) = control.message().await.unwrap().unwrap().message else {
            panic!("expected the policy right after the ack");
        };
        assert_eq!(p.classes[0].name, "critical");
        // What crossed to the vehicle is counted.
        let text = metrics_text(&registry);
        let want = format!(
            "misaki_fleet_policy_bytes_total {}",
            prost::Message::encoded_len(&p)
        );
        assert!(text.contains(&want), "{want} not in:\n{text}");
        assert_eq!(events.recv().await.unwrap().kind, FleetEventKind::Online);
        assert_eq!(registry.is_online("car-1"), Some(true));

        tx.send(report(
            2,
            Report::LinkState(pb::LinkState {
                links: vec![link("wifi", true), link("lte", true)],
                selections: vec![pb::ClassSelection {
                    class: "critical".into(),
                    uplink: "wifi".into(),
                    reason: "initial".into(),
                }],
                ..Default::default()
            }),
        ))
        .await
        .unwrap();
        let ev = events.recv().await.unwrap();
        assert_eq!((&*ev.vehicle_id, ev.kind), ("car-1", FleetEventKind::State));
        assert_eq!(
            registry.selection("car-1", "critical").as_deref(),
            Some("wifi")
        );

        tx.send(report(
            3,
            Report::LinkChange(pb::LinkChange {
                links: vec![link("wifi", false)],
                selections: vec![pb::ClassSelection {
                    class: "critical".into(),
                    uplink: "lte".into(),
                    reason: "carrier_lost".into(),
                }],
                ..Default::default()
            }),
        ))
        .await
        .unwrap();
        // The LinkState ack arrives first.
        assert!(matches!(
            control.message().await.unwrap().unwrap().message,
            Some(Message::Ack(pb::Ack { seq: 2 }))
        ));
        assert_eq!(events.recv().await.unwrap().kind, FleetEventKind::State);
        let v = registry.vehicle_json("car-1").unwrap();
        assert_eq!(v["selections"]["critical"]["uplink"], "lte");
        assert_eq!(v["links"][1]["name"], "wifi");
        assert_eq!(v["links"][1]["carrier"], false);
        assert_eq!(v["link_changes"], 1);
        assert_eq!(registry.to_json()["online"], 1);

        // A policy change is pushed; an equal one is not.
        ptx.send_replace(Arc::new(demo_policy(Some(300))));
        let Some(Message::Policy(p2)) = control.message().await.unwrap().unwrap().message else {
            panic!("expected a policy push");
        };
        assert_ne!(p2.version, p.version);
        assert_eq!(p2.classes[0].max_rtt_ms, Some(300));

        drop(tx);
        assert_eq!(events.recv().await.unwrap().kind, FleetEventKind::Offline);
        assert_eq!(registry.is_online("car-1"), Some(false));
        assert_eq!(registry.to_json()["online"], 0);
        assert!(registry.vehicle_json("nope").is_none());
    }

    #[tokio::test]
    async fn first_message_must_be_hello() {
        let (_ptx, prx) = watch::channel(Arc::new(demo_policy(None)));
        let (_registry, url, _server) = start(prx).await;
        let mut client = FleetServiceClient::connect(url).await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        tx.send(report(1, Report::Heartbeat(pb::Heartbeat {})))
            .await
            .unwrap();
        let err = client.report(ReceiverStream::new(rx)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn silent_vehicle_goes_offline_after_three_heartbeats() {
        let (_ptx, prx) = watch::channel(Arc::new(demo_policy(None)));
        let (registry, url, _server) = start(prx).await;
        let mut events = registry.subscribe();
        let mut client = FleetServiceClient::connect(url).await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        tx.send(report(
            1,
            Report::Hello(pb::Hello {
                vehicle_id: "quiet".into(),
                heartbeat_interval_ms: 100,
                ..Default::default()
            }),
        ))
        .await
        .unwrap();
        let mut control = client
            .report(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(events.recv().await.unwrap().kind, FleetEventKind::Online);
        let started = std::time::Instant::now();
        assert_eq!(events.recv().await.unwrap().kind, FleetEventKind::Offline);
        assert!(started.elapsed() >= Duration::from_millis(250));
        // The server ends the stream with DEADLINE_EXCEEDED.
        loop {
            match control.message().await {
                Ok(Some(_)) => continue,
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
                    break;
                }
                Ok(None) => panic!("expected a status"),
            }
        }
        drop(tx);
    }

    /// Versions of three successive policies, and the whole wire form of each.
    fn three_policies() -> [(Arc<Policy>, pb::PolicyUpdate); 3] {
        [100, 200, 300].map(|rtt| {
            let p = demo_policy(Some(rtt));
            let w = misaki_policy_wire::to_wire(&p);
            (Arc::new(p), w)
        })
    }

    /// A LinkState, answered by an ack: proof that nothing was queued before it.
    async fn assert_nothing_pending(
        tx: &mpsc::Sender<pb::VehicleReport>,
        control: &mut Streaming<pb::ControlMessage>,
        seq: u64,
    ) {
        tx.send(report(seq, Report::LinkState(pb::LinkState::default())))
            .await
            .unwrap();
        loop {
            match control.message().await.unwrap().unwrap().message {
                Some(Message::Ack(pb::Ack { seq: s })) if s == seq => return,
                Some(Message::Ack(_)) => continue,
                other => panic!("expected only acks, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_vehicle_at_a_recent_version_gets_a_delta_others_the_whole_policy() {
        let [(p1, w1), (p2, w2), _] = three_policies();
        let (ptx, prx) = watch::channel(p1);
        let (registry, url, _server) = start(prx).await;
        // A connected vehicle takes the edit as a delta.
        let (_tx, mut live) = connect(&url, hello("live", "", true)).await;
        assert_eq!(next_policy(&mut live).await, w1, "no policy held: whole");
        ptx.send_replace(p2);
        let d = next_policy(&mut live).await;
        assert_eq!(d.base_version, w1.version);
        assert_eq!(misaki_policy_wire::apply(&w1, &d), Ok(w2.clone()));

        // Vehicles connecting now, each holding something else.
        let (_tx, mut at_v1) = connect(&url, hello("at-v1", &w1.version, true)).await;
        let d = next_policy(&mut at_v1).await;
        assert_eq!(
            (d.base_version.as_str(), d.version.as_str()),
            (w1.version.as_str(), w2.version.as_str())
        );
        assert_eq!(misaki_policy_wire::apply(&w1, &d), Ok(w2.clone()));
        let (_tx, mut unknown) = connect(&url, hello("unknown", "0123456789abcdef", true)).await;
        assert_eq!(next_policy(&mut unknown).await, w2, "unknown base: whole");
        let (_tx, mut old) = connect(&url, hello("old", &w1.version, false)).await;
        assert_eq!(
            next_policy(&mut old).await,
            w2,
            "no delta capability: whole"
        );
        let (tx, mut current) = connect(&url, hello("current", &w2.version, true)).await;
        assert_nothing_pending(&tx, &mut current, 2).await;

        let text = metrics_text(&registry);
        for want in [
            "misaki_fleet_policy_updates_total{kind=\"full\"} 3",
            "misaki_fleet_policy_updates_total{kind=\"delta\"} 2",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
    }

    fn resync(seq: u64, held: &str, rejected: &str, want_full: bool) -> pb::VehicleReport {
        report(
            seq,
            Report::LinkChange(pb::LinkChange {
                policy_resync: Some(pb::PolicyResync {
                    held_version: held.into(),
                    rejected_version: rejected.into(),
                    want_full,
                    reason: "test".into(),
                }),
                ..Default::default()
            }),
        )
    }

    #[tokio::test]
    async fn a_resync_gets_the_policy_from_the_held_version_and_never_loops() {
        let [(p1, w1), (p2, w2), (p3, w3)] = three_policies();
        let (ptx, prx) = watch::channel(p1);
        let (registry, url, _server) = start(prx).await;
        let (tx, mut control) = connect(&url, hello("car", "", true)).await;
        assert_eq!(next_policy(&mut control).await, w1);
        ptx.send_replace(p2);
        let d = next_policy(&mut control).await;
        assert_eq!(d.base_version, w1.version);

        // "I still hold v1": the delta from v1 again, up to the cap; then the whole.
        for seq in 2..2 + u64::from(MAX_DELTA_RESYNCS) {
            tx.send(resync(seq, &w1.version, &w2.version, false))
                .await
                .unwrap();
            let again = next_policy(&mut control).await;
            assert_eq!(again.base_version, w1.version, "resync {seq}");
        }
        let seq = 2 + u64::from(MAX_DELTA_RESYNCS);
        tx.send(resync(seq, &w1.version, &w2.version, false))
            .await
            .unwrap();
        assert_eq!(next_policy(&mut control).await, w2, "past the cap: whole");
        assert_eq!(
            registry.vehicle_json("car").unwrap()["policy_version"],
            w1.version
        );
        // From then on this stream gets whole policies.
        ptx.send_replace(p3);
        assert_eq!(next_policy(&mut control).await, w3);
        // A resync naming the current version needs nothing.
        tx.send(resync(seq + 1, &w3.version, &w3.version, false))
            .await
            .unwrap();
        assert_nothing_pending(&tx, &mut control, seq + 2).await;

        // A vehicle whose delta result did not check out gets the whole policy at once.
        let (tx, mut other) = connect(&url, hello("other", &w2.version, true)).await;
        let d = next_policy(&mut other).await;
        assert_eq!(d.base_version, w2.version);
        tx.send(resync(2, &w2.version, &w3.version, true))
            .await
            .unwrap();
        assert_eq!(next_policy(&mut other).await, w3);
        let text = metrics_text(&registry);
        let want = format!(
            "misaki_fleet_policy_resyncs_total {}",
            MAX_DELTA_RESYNCS + 3
        );
        assert!(text.contains(&want), "{want} not in:\n{text}");
    }
}
