//! # misaki-saf: edge-netd's store-and-forward
//!
//! Apps on the vehicle hand deferrable requests (telemetry, logs, clips) to a local HTTP
//! endpoint; each is written to the durable [`misaki_queue::Queue`] and answered `202
//! Accepted` once fsync'd; a forwarder later sends it to the cloud over an uplink its traffic
//! class allows, zstd-compressed, with its `Idempotency-Key`.
//!
//! ```text
//!  app ──HTTP/1.1|h2c──▶ ingest (ingest.rs) ──enqueue, fsync──▶ Queue ──next_batch──▶
//!        ◀── 202 + Idempotency-Key ──┘                           forwarder (forward.rs)
//!                                      UplinkView::usable(class) ──▶ SO_BINDTODEVICE conn
//!                                      ──zstd, HTTP/2|1.1, [mTLS]──▶ cloud sidecar (cloud_inbound)
//! ```
//!
//! ## Invariants
//!
//! - **202 means durable.** The endpoint answers 202 only after `enqueue` resolved, and the
//!   202 carries the message's `Idempotency-Key`. A message that got 202 is delivered at
//!   least once, whatever crashes in between (`kill -9`, power loss): the queue keeps it
//!   until an ack, and the forwarder acks only on a 2xx.
//! - **Every failure is an HTTP answer** (404 unknown service, 409 not deferrable, 413 too
//!   large, 507 queue/disk full, 400 bad header, 503 closed), never a panic.
//! - **A class only leaves over an uplink its policy allows and that is up**, as the
//!   [`UplinkView`] says at pick time; the connection is bound to that uplink's interface.
//! - **No hot retry loops.** 2xx → ack; 408/429/5xx/connect error/timeout → nack and
//!   per-class exponential backoff with jitter (capped), then a single probe; any other
//!   status → dead letter (`GET /deadletters`), never retried.
//! - **Bounded.** At most `max_in_flight` deliveries; bodies above `max_body_bytes` are
//!   refused before they are read whole.
//!
//! ## Wiring (edge-netd)
//!
//! ```text
//! let queue = Arc::new(tokio::task::spawn_blocking(move || Queue::open(qcfg)).await??);
//! let saf = misaki_saf::StoreForward::start(cfg, queue, policy_rx, uplinks, shutdown)?;
//! saf.set_identity(Some(Arc::new(identity)))?; // https:// destinations; again on renewal
//! saf.register_metrics(&mut registry);
//! tokio::spawn({ let saf = saf.clone(); async move { saf.serve(listener).await } });
//! // local API: if let Some(resp) = saf.admin_response(req.method(), req.uri().path()) { .. }
//! saf.stopped().await; // after shutdown: in-flight deliveries finished, acks flushed
//! ```
//!
//! Module map: `config` (settings, validated once) → `ingest` (request → message) →
//! `forward` (scheduler, delivery, backoff) → `runtime` (wiring, servers, status); `state`
//! (what they share: the queue, the policy, per-class retry state, connection pools);
//! `uplink` (the [`UplinkView`] seam and the zstd level table); `tls` (the vehicle's
//! certificate, the cloud server check, the TLS connector); `compress`; `metrics`;
//! [`testkit`] (a recording receiver for tests and benchmarks).

mod compress;
mod config;
mod forward;
mod ingest;
mod metrics;
mod runtime;
mod state;
pub mod testkit;
mod tls;
mod uplink;

pub use crate::{
    config::{ConfigError, DestinationConfig, HttpVersion, SafConfig},
    ingest::{IngestError, class_rank},
    metrics::Totals,
    runtime::{ClassReport, StoreForward},
    tls::{ClientIdentity, ClientIdentityError},
    uplink::{StaticUplinks, UplinkChoice, UplinkView, zstd_level},
};
