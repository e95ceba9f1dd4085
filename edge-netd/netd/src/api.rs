//! Local HTTP API on loopback: `GET /links`, `/metrics`, `/readyz`, `/healthz`,
//! `/xds` (the local xDS tier's clients: node, sent/ACKed versions, last NACK), and
//! with store-and-forward configured `GET /saf/status` (counters, queue depth per class,
//! uplink and retry state per class) and `GET /saf/deadletters`. `GET /power` shows the
//! vehicle's power state, its source and the power file's last reading and error;
//! `PUT /power` (body: one word, `on`, `accessory`, `low` or `shutting_down`) is a
//! power manager's report ([`put_power`]).
//!
//! Invariants: read-only but for `PUT /power`, which only queues the report for the
//! engine (400 for anything but one of the words); answers from the latest published
//! [`EngineView`], never blocking the engine. `/readyz` is 200 only once the first selection was made, a
//! policy is in force (received, stored or shipped) and, with `tls:`, a usable
//! certificate is held; otherwise 503 says which is missing.

use crate::engine::{EngineView, Input};
use crate::power::{Power, PowerUpdate, PowerView, Reading};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// The largest `PUT /power` body read (one word and a newline fit many times).
const MAX_POWER_BODY: usize = 64;

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
    /// The engine's inputs (`PUT /power`).
    pub inputs: mpsc::Sender<Input>,
}

/// The `/power` document.
pub fn power_json(p: &PowerView) -> Value {
    json!({
        "state": p.state.as_str(),
        "source": p.source.as_str(),
        "file": p.file.as_ref().map(|f| f.display().to_string()),
        "file_reading": p.reading.map(Reading::to_json),
        "file_error": p.file_error,
    })
}

/// `PUT /power` with `body`: one power word goes to the engine (the newest report
/// wins); anything else is a 400 that says what is accepted.
pub fn put_power(inputs: &mpsc::Sender<Input>, body: &[u8]) -> (StatusCode, String) {
    let Ok(word) = std::str::from_utf8(body) else {
        let message = "the body is not UTF-8 text; send one word: on, accessory, low or \
                       shutting_down\n";
        return (StatusCode::BAD_REQUEST, message.into());
    };
    let power = match Power::parse(word) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match inputs.try_send(Input::Power(PowerUpdate::Api(power))) {
        Ok(()) => (StatusCode::OK, format!("{}\n", power.as_str())),
        Err(mpsc::error::TrySendError::Full(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine's input queue is full; retry\n".into(),
        ),
        Err(mpsc::error::TrySendError::Closed(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "edge-netd is shutting down\n".into(),
        ),
    }
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

/// One request: `/power` here (`PUT` reads its body), everything else is [`route`]d.
async fn handle(state: ApiState, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/power" {
        return route(&state, req.method(), req.uri().path());
    }
    if req.method() == Method::GET {
        let doc = power_json(&state.views.borrow().power);
        return text(StatusCode::OK, "application/json", doc.to_string());
    }
    if req.method() != Method::PUT {
        let message = "GET or PUT only\n".to_string();
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", message);
    }
    let (status, body) = match Limited::new(req.into_body(), MAX_POWER_BODY)
        .collect()
        .await
    {
        Ok(body) => put_power(&state.inputs, &body.to_bytes()),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!(
                "cannot read the body ({e}); send one word of at most {MAX_POWER_BODY} bytes\n"
            ),
        ),
    };
    text(status, "text/plain", body)
}

/// Serve the API (HTTP/1.1) on `listener` until `shutdown` completes. A failed accept is
/// retried after 50 ms; open connections are left to finish
/// ([`misaki_http::Drain::Detach`]).
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = move |req: Request<hyper::body::Incoming>| handle(state.clone(), req);
    misaki_http::Server::new("api", misaki_http::Protocol::Http1)
        .accept_backoff(std::time::Duration::from_millis(50))
        .serve(listener, handler, shutdown)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::{PowerTracker, Source};

    #[test]
    fn put_power_takes_one_word_and_refuses_anything_else() {
        let (tx, mut rx) = mpsc::channel(1);
        let (status, body) = put_power(&tx, b"low\n");
        assert_eq!((status, body.as_str()), (StatusCode::OK, "low\n"));
        assert!(matches!(
            rx.try_recv(),
            Ok(Input::Power(PowerUpdate::Api(Power::Low)))
        ));
        for bad in [&b"LOW"[..], b"", b"42", b"on off", b"\xff"] {
            let (status, body) = put_power(&tx, bad);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(body.contains("shutting_down"), "{body}");
        }
        assert!(rx.try_recv().is_err(), "nothing bad reached the engine");
        // A full queue and a stopped engine are not the client's fault.
        put_power(&tx, b"on");
        assert_eq!(put_power(&tx, b"on").0, StatusCode::SERVICE_UNAVAILABLE);
        drop(rx);
        assert_eq!(put_power(&tx, b"on").0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn get_power_shows_the_state_its_source_and_the_files_error() {
        let config = crate::config::PowerConfig {
            file: "/run/power".into(),
            interval: std::time::Duration::from_secs(1),
            low_below: 20,
            recover_above: 30,
        };
        let mut t = PowerTracker::new(Some(&config));
        assert_eq!(
            power_json(t.view()),
            json!({"state": "on", "source": "default", "file": "/run/power",
                   "file_reading": null, "file_error": null})
        );
        t.apply(PowerUpdate::File(Reading::Percent(15)));
        t.apply(PowerUpdate::FileError(Some("garbled".into())));
        assert_eq!(t.view().source, Source::File);
        assert_eq!(
            power_json(t.view()),
            json!({"state": "low", "source": "file", "file": "/run/power",
                   "file_reading": 15, "file_error": "garbled"})
        );
        assert_eq!(power_json(&PowerView::default())["file"], Value::Null);
    }
}
