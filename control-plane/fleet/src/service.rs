//! The `FleetService` gRPC server: one task per vehicle stream.
//!
//! Invariants:
//! - The first message must be `Hello` (else FAILED_PRECONDITION); a later `Hello`
//!   on the same stream is a protocol error (INVALID_ARGUMENT).
//! - A stream silent for [`crate::OFFLINE_AFTER_HEARTBEATS`] heartbeat intervals is
//!   ended (DEADLINE_EXCEEDED) and its vehicle marked offline.
//! - A vehicle is sent the current `PolicyUpdate` when its `Hello.policy_version`
//!   differs, and again on every policy change whose version differs from the last
//!   sent on that stream (so a no-op policy reload pushes nothing).

use crate::policy::{PolicyVersioned, policy_update};
use crate::registry::Registry;
use misaki_policy::Policy;
use misaki_proto::fleet_v1 as pb;
use pb::fleet_service_server::{FleetService, FleetServiceServer};
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

/// The `FleetService` implementation. Build it with [`service`].
#[derive(Debug, Clone)]
pub struct FleetApi {
    registry: Registry,
    /// The policy in its wire form, converted once per policy change (not once per
    /// vehicle stream: a 3,000-service policy is ~180 KB to build).
    policy: watch::Receiver<Arc<PolicyVersioned>>,
}

/// Follow `policy`, converting each new value once. The returned receiver's sender
/// lives as long as `policy`'s, so its end still means "shutting down".
fn wire_policy(mut policy: watch::Receiver<Arc<Policy>>) -> watch::Receiver<Arc<PolicyVersioned>> {
    let first = Arc::new(policy_update(&policy.borrow_and_update()));
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while policy.changed().await.is_ok() {
            let latest = Arc::clone(&policy.borrow_and_update());
            let update = policy_update(&latest);
            tx.send_if_modified(|cur| {
                let changed = cur.version != update.version;
                if changed {
                    *cur = Arc::new(update);
                }
                changed
            });
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
/// connected vehicles (as [`policy_update`]), which apply and persist it.
pub fn service(
    registry: Registry,
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
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??
            .ok_or_else(|| Status::cancelled("stream closed before Hello"))?;
        let Some(pb::vehicle_report::Report::Hello(hello)) = &first.report else {
            return Err(Status::failed_precondition(
                crate::RegistryError::HelloFirst.to_string(),
            ));
        };
        let (vehicle, stream) = self
            .registry
            .hello(hello)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let mut policy = self.policy.clone();
        let current = Arc::clone(&policy.borrow_and_update());
        let ack = ControlMessage {
            message: Some(pb::control_message::Message::Ack(pb::Ack {
                seq: first.seq,
            })),
        };
        // Fresh channel with capacity > 2: these cannot fail.
        let _ = tx.try_send(Ok(ack));
        let mut sent_version = hello.policy_version.clone();
        if current.version != sent_version {
            let _ = tx.try_send(Ok(policy_msg(&self.registry, &current)));
            sent_version = current.version.clone();
        }
        tracing::info!(vehicle = %vehicle, ?peer, daemon = %hello.daemon_version, "vehicle connected");
        let span = tracing::info_span!("fleet_stream", vehicle = %vehicle, stream);
        let registry = self.registry.clone();
        let mut closing = registry.closing();
        tokio::spawn(
            async move {
                let end = loop {
                    let silent_for = registry.offline_after(&vehicle);
                    tokio::select! {
                        msg = tokio::time::timeout(silent_for, inbound.message()) => match msg {
                            Err(_) => break Some(Status::deadline_exceeded("no report within 3 heartbeat intervals")),
                            Ok(Err(status)) => {
                                tracing::info!(%status, "stream error");
                                break None;
                            }
                            Ok(Ok(None)) => break None,
                            Ok(Ok(Some(report))) => {
                                let ack_seq = matches!(report.report, Some(pb::vehicle_report::Report::LinkState(_))).then_some(report.seq);
                                if !registry.apply(&vehicle, &report) {
                                    break Some(Status::invalid_argument("Hello sent twice on one stream"));
                                }
                                if let Some(seq) = ack_seq {
                                    let ack = ControlMessage { message: Some(pb::control_message::Message::Ack(pb::Ack { seq })) };
                                    if tx.send(Ok(ack)).await.is_err() { break None; }
                                }
                            }
                        },
                        changed = policy.changed() => {
                            if changed.is_err() {
                                // The policy source is gone: the control plane is shutting down.
                                break Some(Status::unavailable("control plane shutting down"));
                            }
                            // Clone the Arc so the watch guard is dropped before any await.
                            let update = Arc::clone(&policy.borrow_and_update());
                            if update.version != sent_version {
                                tracing::info!(version = %update.version, "pushing policy");
                                sent_version = update.version.clone();
                                if tx.send(Ok(policy_msg(&registry, &update))).await.is_err() { break None; }
                            }
                        }
                        // wait_for's guard is not Send: drop it inside the branch future.
                        _ = async { let _ = closing.wait_for(|c| *c).await; } => break Some(Status::unavailable("control plane shutting down")),
                        _ = tx.closed() => break None,
                    }
                };
                registry.disconnected(&vehicle, stream);
                tracing::info!(reason = ?end.as_ref().map(|s| s.message()), "vehicle stream ended");
                if let Some(status) = end {
                    let _ = tx.send(Err(status)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The message carrying `p`, counted as sent.
fn policy_msg(registry: &Registry, p: &PolicyVersioned) -> ControlMessage {
    registry.sent_policy(prost::Message::encoded_len(&p.update));
    ControlMessage {
        message: Some(pb::control_message::Message::Policy(p.update.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FleetEventKind;
    use pb::fleet_service_client::FleetServiceClient;
    use pb::vehicle_report::Report;

    async fn start(
        policy: watch::Receiver<Arc<Policy>>,
    ) -> (Registry, String, tokio::task::JoinHandle<()>) {
        let registry = Registry::new();
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

    #[tokio::test]
    async fn registry_tracks_snapshot_deltas_policy_and_disconnect() {
        let (ptx, prx) = watch::channel(Arc::new(crate::policy::tests::demo_policy(Some(100))));
        let (registry, url, _server) = start(prx).await;
        let mut events = registry.subscribe();
        let mut client = FleetServiceClient::connect(url)
            .await
            .unwrap()
            .send_compressed(pb::COMPRESSION)
            .accept_compressed(pb::COMPRESSION);
        let (tx, rx) = mpsc::channel(8);
        tx.send(report(
            1,
            Report::Hello(pb::Hello {
                vehicle_id: "car-1".into(),
                daemon_version: "0.1.0".into(),
                policy_version: String::new(),
                heartbeat_interval_ms: 1000,
            }),
        ))
        .await
        .unwrap();
        let mut control = client
            .report(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let ack = control.message().await.unwrap().unwrap();
        assert!(matches!(
            ack.message,
            Some(pb::control_message::Message::Ack(pb::Ack { seq: 1 }))
        ));
        let Some(pb::control_message::Message::Policy(p)) =
            control.message().await.unwrap().unwrap().message
        else {
            panic!("expected the policy right after the ack");
        };
        assert_eq!(p.classes[0].name, "critical");
        // What crossed to the vehicle is counted.
        let mut metrics = prometheus_client::registry::Registry::default();
        registry.register_metrics(&mut metrics);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
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
            Some(pb::control_message::Message::Ack(pb::Ack { seq: 2 }))
        ));
        assert_eq!(events.recv().await.unwrap().kind, FleetEventKind::State);
        let v = registry.vehicle_json("car-1").unwrap();
        assert_eq!(v["selections"]["critical"]["uplink"], "lte");
        assert_eq!(v["links"][1]["name"], "wifi");
        assert_eq!(v["links"][1]["carrier"], false);
        assert_eq!(v["link_changes"], 1);
        assert_eq!(registry.to_json()["online"], 1);

        // A policy change is pushed; an equal one is not.
        ptx.send_replace(Arc::new(crate::policy::tests::demo_policy(Some(300))));
        let Some(pb::control_message::Message::Policy(p2)) =
            control.message().await.unwrap().unwrap().message
        else {
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
        let (_ptx, prx) = watch::channel(Arc::new(crate::policy::tests::demo_policy(None)));
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
        let (_ptx, prx) = watch::channel(Arc::new(crate::policy::tests::demo_policy(None)));
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
}
