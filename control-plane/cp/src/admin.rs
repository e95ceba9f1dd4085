//! Admin HTTP (loopback by default): health, readiness, metrics, policy, nodes, fleet.
//!
//! | route              | what                                                          |
//! |--------------------|---------------------------------------------------------------|
//! | `/healthz`         | 200 while the process serves                                  |
//! | `/readyz`          | 200 once the policy is loaded and the xDS port is bound, else 503 (with why) |
//! | `/metrics`         | Prometheus text                                               |
//! | `/policy`          | the policy version in force, its source, the last rejected edit |
//! | `/nodes`           | connected xDS streams: kind, per-type sent/ACKed versions, last NACK |
//! | `/fleet`           | every vehicle's latest reported state (digital twin); in shared mode the whole fleet's, with owners |
//! | `/fleet/{vehicle}` | one vehicle; 404 if unknown. In shared mode, one online on another replica in full from that replica's peer port (`peer.rs`) |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;

use crate::policy_state::PolicyState;

pub type JsonFn = dyn Fn() -> serde_json::Value + Send + Sync;
/// `/fleet/{vehicle}`: async, since in shared mode it may ask the vehicle's owner.
pub type LookupFn =
    dyn Fn(String) -> futures::future::BoxFuture<'static, Option<serde_json::Value>> + Send + Sync;

/// Everything the admin routes read. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<MetricsRegistry>,
    pub policy: PolicyState,
    pub nodes: Arc<JsonFn>,
    pub fleet: Arc<JsonFn>,
    pub vehicle: Arc<LookupFn>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

impl Admin {
    pub async fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" if self.ready.load(Ordering::Acquire) => {
                respond(StatusCode::OK, "text/plain", "ready\n")
            }
            "/readyz" => {
                let body = match self.policy.waiting_for() {
                    Some(why) => format!("not ready: {why}\n"),
                    None => "not ready\n".to_string(),
                };
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
            }
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                crate::metrics::render(&self.metrics),
            ),
            "/policy" => json(StatusCode::OK, &self.policy.to_json()),
            "/nodes" => json(StatusCode::OK, &(self.nodes)()),
            "/fleet" | "/fleet/" => json(StatusCode::OK, &(self.fleet)()),
            _ => match path.strip_prefix("/fleet/") {
                Some(id) => match (self.vehicle)(id.to_string()).await {
                    Some(v) => json(StatusCode::OK, &v),
                    None => json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": format!("unknown vehicle {id:?}")}),
                    ),
                },
                None => respond(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "routes: /healthz /readyz /metrics /policy /nodes /fleet /fleet/{vehicle}\n",
                ),
            },
        }
    }
}

/// Serve admin HTTP/1.1 on `listener` until `shutdown` resolves. A failed accept (e.g.
/// out of file descriptors while a fleet reconnects) pauses 50 ms rather than spinning;
/// open connections are left to finish ([`misaki_http::Drain::Detach`]).
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = move |req: Request<Incoming>| {
        let admin = admin.clone();
        async move { admin.handle(&req).await }
    };
    misaki_http::Server::new("admin", misaki_http::Protocol::Http1)
        .accept_backoff(std::time::Duration::from_millis(50))
        .serve(listener, handler, shutdown)
        .await;
}
