//! The local ingest endpoint: an app's ordinary HTTP request → a durable queue message.
//!
//! Invariants:
//! - `202 Accepted` is sent only after `Queue::enqueue` resolved, i.e. after the message
//!   is fsync'd; it carries the message's `Idempotency-Key` (the app's, or a generated one).
//! - Every failure is an HTTP answer with a JSON `{"error": ...}` body, never a panic:
//!   unknown service 404, not deferrable 409, bad header 400, too large 413, queue or disk
//!   full 507, queue closed / I/O error 503.
//! - The policy is read once per request from the watch channel, so a policy edit applies
//!   to the next request and never half-way through one.
//!
//! Addressing: `Host: <service>` (any port ignored) names a service directly; otherwise the
//! longest `routes` prefix of the policy matching the path does. The cloud sidecar routes by
//! path prefix, so a request addressed by `Host` whose path matches none of the service's
//! prefixes gets its first prefix prepended (`Host: telemetry`, `/v1/up` → `/telemetry/v1/up`).
//!
//! Deferrable: the service's class has `deferrable: true`, or the request carries
//! `x-misaki-defer: 1`. Other requests are answered `409 Conflict` with a hint: interactive
//! traffic belongs on the vehicle sidecar (`127.0.0.1:15001`), whose failover, retries and
//! timeouts are the policy's; forwarding it from here would duplicate Envoy badly.
//!
//! Priority rank given to the queue (0 = served first): `priority: high` classes before
//! `default` ones, and within a priority non-deferrable classes (deferred by header)
//! before deferrable ones. TTL is the class's `ttl`.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use misaki_policy::{Policy, RoutePriority, Service, TrafficClass};
use misaki_queue::{Destination, NewMessage, QueueError};

use crate::state::Inner;

/// Headers not replayed to the destination: hop-by-hop ones, ones the forwarder sets
/// itself, and misaki's own controls.
const DROPPED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "http2-settings",
    "idempotency-key",
];

/// Why a request was not accepted; each maps to one status.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no mesh service for host {host:?} and path {path:?} in the policy")]
    UnknownService { host: String, path: String },
    #[error(
        "service {service} (class {class}) is not deferrable: send it to the vehicle sidecar, \
         or mark it with `x-misaki-defer: 1`"
    )]
    NotDeferrable { service: String, class: String },
    #[error("no destination configured for service {0}")]
    NoDestination(String),
    #[error("header {name}: {reason}")]
    BadHeader { name: String, reason: &'static str },
    #[error("request body is {size} bytes, the limit is {limit}")]
    TooLarge { size: u64, limit: usize },
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl IngestError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownService { .. } | Self::NoDestination(_) => StatusCode::NOT_FOUND,
            Self::NotDeferrable { .. } => StatusCode::CONFLICT,
            Self::BadHeader { .. } | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Queue(e) => {
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }
}

/// Priority rank of a class for the queue (crate doc of this module).
pub fn class_rank(class: &TrafficClass) -> u8 {
    let p = match class.priority {
        RoutePriority::High => 0,
        RoutePriority::Default => 2,
    };
    p + u8::from(class.deferrable)
}

/// Which service a request is for, and the path to forward.
pub(crate) fn resolve<'p>(
    policy: &'p Policy,
    host: Option<&str>,
    path: &str,
) -> Option<(&'p Service, String)> {
    if let Some(svc) = host.map(strip_port).and_then(|h| policy.services.get(h)) {
        let path = if svc.routes.is_empty() || svc.routes.iter().any(|r| path.starts_with(r)) {
            path.to_string()
        } else {
            let first = svc.routes[0].trim_end_matches('/');
            format!("{first}{path}")
        };
        return Some((svc, path));
    }
    policy
        .services
        .values()
        .flat_map(|s| s.routes.iter().map(move |r| (s, r)))
        .filter(|(_, r)| path.starts_with(r.as_str()))
        .max_by_key(|(_, r)| r.len())
        .map(|(s, _)| (s, path.to_string()))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host; // IPv6 literal: never a service name
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, IngestError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| IngestError::BadHeader {
                name: name.to_string(),
                reason: "not visible ASCII",
            })
        })
        .transpose()
}

/// Accept one request: resolve, check, read the body (bounded), enqueue, await fsync.
pub(crate) async fn accept(
    inner: &Inner,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, IngestError> {
    let policy: Arc<Policy> = inner.policy.borrow().clone();
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let host = match parts.uri.host() {
        Some(h) => Some(h.to_string()),
        None => header_str(&parts.headers, "host")?.map(str::to_string),
    };
    let (svc, path) =
        resolve(&policy, host.as_deref(), &path).ok_or_else(|| IngestError::UnknownService {
            host: host.clone().unwrap_or_default(),
            path: path.clone(),
        })?;
    let class = policy.class_of(svc);
    let defer_header = header_str(&parts.headers, "x-misaki-defer")?;
    let deferred = class.deferrable || matches!(defer_header.map(str::trim), Some("1" | "true"));
    if !deferred {
        return Err(IngestError::NotDeferrable {
            service: svc.name.clone(),
            class: class.name.clone(),
        });
    }
    if inner.config.target(&svc.name).is_none() {
        return Err(IngestError::NoDestination(svc.name.clone()));
    }
    let key = match header_str(&parts.headers, "idempotency-key")? {
        Some(k)
            if k.is_empty() || k.len() > 255 || k.bytes().any(|b| !(0x21..0x7f).contains(&b)) =>
        {
            return Err(IngestError::BadHeader {
                name: "idempotency-key".into(),
                reason: "must be 1..=255 visible ASCII characters without spaces",
            });
        }
        k => k.map(str::to_string),
    };
    let limit = inner.config.max_body_bytes;
    if let Some(len) =
        header_str(&parts.headers, "content-length")?.and_then(|v| v.trim().parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(IngestError::TooLarge { size: len, limit });
    }
    let mut headers = Vec::new();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if DROPPED_HEADERS.contains(&n) || n.starts_with("x-misaki-") {
            continue;
        }
        let v = value.to_str().map_err(|_| IngestError::BadHeader {
            name: n.to_string(),
            reason: "not visible ASCII (cannot be stored)",
        })?;
        headers.push((n.to_string(), v.to_string()));
    }
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                IngestError::TooLarge {
                    size: limit as u64 + 1,
                    limit,
                }
            } else {
                IngestError::Body(e.to_string())
            }
        })?
        .to_bytes();
    let msg = NewMessage {
        idempotency_key: key,
        class: class.name.clone(),
        rank: class_rank(class),
        ttl: class.ttl,
        destination: Destination {
            service: svc.name.clone(),
            method: parts.method.as_str().to_string(),
            path,
            headers,
        },
        body: body.into(),
    };
    let service = svc.name.clone();
    let class_name = class.name.clone();
    drop(policy);
    let accepted = inner.queue.enqueue(msg).await?;
    inner.wake.notify_one();
    let doc = serde_json::json!({
        "id": accepted.id,
        "idempotency_key": accepted.idempotency_key,
        "service": service,
        "class": class_name,
    });
    Ok(Response::builder()
        .status(StatusCode::ACCEPTED)
        .header("idempotency-key", &accepted.idempotency_key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(doc.to_string())))
        .expect("key was validated as a header value"))
}

pub(crate) fn json_response(status: StatusCode, doc: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(doc.to_string())))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
version: 1
uplinks:
  - {name: wifi, kind: wifi}
  - {name: lte, kind: lte, metered: true}
classes:
  - {name: standard, uplinks: [wifi, lte]}
  - {name: bulk, uplinks: [wifi], deferrable: true, ttl: 1h}
services:
  - {name: telemetry, location: cloud, protocol: http, port: 8080, endpoints: ["127.0.0.1:1"], routes: ["/telemetry"], class: bulk}
  - {name: telemetry-raw, location: cloud, protocol: http, port: 8080, endpoints: ["127.0.0.1:1"], routes: ["/telemetry/raw"], class: bulk}
  - {name: maps, location: cloud, protocol: http, port: 8080, endpoints: ["127.0.0.1:1"], routes: ["/maps"], class: standard}
"#;

    #[test]
    fn host_names_a_service_and_gets_its_prefix_else_longest_path_prefix_wins() {
        let p = misaki_policy::parse("p.yaml", POLICY).unwrap();
        let (s, path) = resolve(&p, Some("telemetry:80"), "/v1/up").unwrap();
        assert_eq!(
            (s.name.as_str(), path.as_str()),
            ("telemetry", "/telemetry/v1/up")
        );
        let (s, path) = resolve(&p, Some("telemetry"), "/telemetry/x").unwrap();
        assert_eq!(
            (s.name.as_str(), path.as_str()),
            ("telemetry", "/telemetry/x")
        );
        let (s, _) = resolve(&p, Some("127.0.0.1:9471"), "/telemetry/raw/1").unwrap();
        assert_eq!(s.name, "telemetry-raw");
        let (s, _) = resolve(&p, None, "/telemetry/x").unwrap();
        assert_eq!(s.name, "telemetry");
        assert!(resolve(&p, Some("localhost"), "/nothing").is_none());
    }

    #[test]
    fn ranks_put_high_priority_first_and_deferrable_after_interactive() {
        let p = misaki_policy::parse("p.yaml", POLICY).unwrap();
        assert_eq!(class_rank(&p.classes["standard"]), 2);
        assert_eq!(class_rank(&p.classes["bulk"]), 3);
    }
}
