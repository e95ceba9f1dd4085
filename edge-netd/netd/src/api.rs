//! Local HTTP API on loopback: `GET /links`, `/metrics`, `/readyz`, `/healthz`,
//! `/xds` (the local xDS tier's clients: node, sent/ACKed versions, last NACK), and
//! with store-and-forward configured `GET /saf/status` (counters, queue depth per class,
//! uplink and retry state per class) and `GET /saf/deadletters`.
//!
//! Invariants: read-only; answers from the latest published [`EngineView`], never
//! blocking the engine. `/readyz` is 200 only once the first selection was made, a
//! policy is in force (received, stored or shipped) and, with `tls:`, a usable
//! certificate is held; otherwise 503 says which is missing.

use crate::engine::EngineView;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the API reads.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub vehicle_id: String,
    pub views: watch::Receiver<Arc<EngineView>>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    pub connected: Arc<AtomicBool>,
    /// Store-and-forward, when configured (`/saf/...`).
    pub saf: Option<misaki_saf::StoreForward>,
    /// The local xDS tier's streams, when it runs (`/xds`).
    pub xds: Option<misaki_xds::StreamRegistry>,
    /// The credential manager, with `tls:` (`/readyz` says why nothing is reported).
    pub identity: Option<crate::identity::IdentityHandle>,
}

/// The `/links` document.
pub fn links_json(vehicle_id: &str, s: &EngineView, connected: bool) -> Value {
    let links: Vec<Value> = s
        .links
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "interface": l.interface,
                "kind": l.kind.as_str(),
                "exists": l.exists,
                "up": l.up,
                "carrier": l.carrier,
                "reachable": l.reachable,
                "rtt_us": l.rtt.map(|d| d.as_micros() as u64),
                "jitter_us": l.jitter.as_micros() as u64,
                "loss_percent": l.loss_percent,
                "samples": l.samples,
                "consecutive_lost": l.consecutive_lost,
                "metered": l.metered,
                "cost": l.cost,
            })
        })
        .collect();
    let selections: serde_json::Map<String, Value> = s
        .selections
        .iter()
        .map(|c| {
            (
                c.class.clone(),
                json!({
                    "uplink": c.uplink,
                    "reason": c.reason,
                    "since_unix_ms": c.since_unix_ms,
                    "switches": c.switches,
                }),
            )
        })
        .collect();
    json!({
        "vehicle_id": vehicle_id,
        "ready": s.ready,
        "policy_version": s.policy_version,
        "control_plane_connected": connected,
        "links": links,
        "selections": selections,
    })
}

fn route(state: &ApiState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if let Some(rest) = path.strip_prefix("/saf/") {
        let rest = format!("/{rest}");
        match &state.saf {
            Some(saf) => {
                if let Some(r) = saf.admin_response(method, &rest) {
                    return r;
                }
            }
            None if method == Method::GET => {
                return text(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "store_forward is not configured\n".into(),
                );
            }
            None => {}
        }
    }
    let (status, ctype, body) = match (method, path) {
        (&Method::GET, "/links") => {
            let snap = state.views.borrow().clone();
            let doc = links_json(
                &state.vehicle_id,
                &snap,
                state.connected.load(Ordering::Relaxed),
            );
            (StatusCode::OK, "application/json", doc.to_string())
        }
        (&Method::GET, "/metrics") => {
            let mut s = String::new();
            match prometheus_client::encoding::text::encode(&mut s, &state.metrics) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    s,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        (&Method::GET, "/readyz") => {
            let snap = state.views.borrow().clone();
            let identity = state.identity.as_ref().and_then(|i| i.problem());
            if let Some(why) = identity {
                let why = format!("{why}; nothing is reported to the control plane\n");
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            } else if !snap.ready {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no uplink selection yet\n".into(),
                )
            } else if snap.policy_version.is_empty() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no policy: none stored, no factory_policy configured, none received from \
                     the control plane yet; the vehicle's Envoy gets an empty configuration\n"
                        .into(),
                )
            } else {
                (StatusCode::OK, "text/plain", "ready\n".into())
            }
        }
        (&Method::GET, "/xds") => match &state.xds {
            Some(streams) => (
                StatusCode::OK,
                "application/json",
                streams.to_json().to_string(),
            ),
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "the local xDS tier is off (xds: off)\n".into(),
            ),
        },
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ),
    };
    text(status, ctype, body)
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, ctype)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Serve the API (HTTP/1.1) on `listener` until `shutdown` completes. A failed accept is
/// retried after 50 ms; open connections are left to finish
/// ([`misaki_http::Drain::Detach`]).
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = move |req: Request<hyper::body::Incoming>| {
        std::future::ready(route(&state, req.method(), req.uri().path()))
    };
    misaki_http::Server::new("api", misaki_http::Protocol::Http1)
        .accept_backoff(std::time::Duration::from_millis(50))
        .serve(listener, handler, shutdown)
        .await;
}
