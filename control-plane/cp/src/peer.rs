//! Shared mode, the peer port (`serve --peer-addr`): a vehicle's detail (per-link RTT,
//! loss, jitter; queues; sidecars) stays with the replica holding its report stream,
//! and another replica's `/fleet/{vehicle}` fetches it from there on demand.
//!
//! - The owner's address is the `peer` field of its replica key
//!   (`/misaki/fleet/replicas/{replica}`, under its lease: gone when it dies).
//! - The port answers one route, `GET /fleet/{vehicle}`, for vehicles online here
//!   (404 otherwise); nothing else of the admin port (metrics, policy, nodes) is on it.
//!
//! Invariants:
//! - a fetch never holds `/fleet/{vehicle}` up for long: lookup and fetch together get
//!   [`FETCH_TIMEOUT`]; on any failure the owner's compact record from etcd is served,
//!   with `detail` saying why the rest is missing;
//! - plain HTTP/1.1, read-only: it belongs on the cluster network only (the Kubernetes
//!   manifests admit only misaki-cp pods to it).

use std::time::Duration;

use bytes::Bytes;
use etcd_client::Client;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use misaki_fleet::FleetRegistry;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::presence::{FleetView, REPLICAS};

/// Lookup of the owner's address plus the fetch from it.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// A vehicle's detail is a few KiB; anything near this is not one.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("replica {0} has no peer address in etcd (it runs without --peer-addr, or it is gone)")]
    NoAddress(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("peer {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("peer {addr} answered {status}")]
    Status { addr: String, status: StatusCode },
    #[error("peer {addr}: a body that is not a vehicle record: {why}")]
    Body { addr: String, why: String },
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
}

/// Serve the peer port on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    fleet: FleetRegistry,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tracing::info!(addr = ?listener.local_addr().ok(), "peer port listening");
    let handler = move |req: Request<Incoming>| std::future::ready(handle(&fleet, &req));
    misaki_http::Server::new("peer", misaki_http::Protocol::Http1)
        .accept_backoff(Duration::from_millis(50))
        .serve(listener, handler, shutdown)
        .await;
}

fn handle(fleet: &FleetRegistry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let found = (req.method() == Method::GET)
        .then(|| req.uri().path().strip_prefix("/fleet/"))
        .flatten()
        .and_then(|id| fleet.vehicle_json(id))
        .filter(|v| v["online"] == true);
    let (status, body) = match found {
        Some(v) => (StatusCode::OK, v),
        None => (
            StatusCode::NOT_FOUND,
            json!({"error": "no such vehicle online here; routes: GET /fleet/{vehicle}"}),
        ),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

/// `/fleet/{vehicle}` in shared mode: as [`FleetView::vehicle_json`], but for a vehicle
/// online on another replica, that replica's full record over its peer port.
pub async fn vehicle_json(
    view: &FleetView,
    fleet: &FleetRegistry,
    replica: &str,
    client: &Client,
    id: &str,
) -> Option<Value> {
    let mut v = view.vehicle_json(fleet, replica, id)?;
    let owner = match v["owner"].as_str() {
        Some(owner) if owner != replica && v["online"] == true => owner.to_string(),
        _ => return Some(v),
    };
    match fetch(client, &owner, id).await {
        Ok(mut detail) => {
            detail["owner"] = owner.into();
            Some(detail)
        }
        Err(e) => {
            v["detail"] = format!("unavailable: {e}").into();
            Some(v)
        }
    }
}

/// `owner`'s record of `vehicle`: its peer address from etcd, then its peer port.
async fn fetch(client: &Client, owner: &str, vehicle: &str) -> Result<Value, PeerError> {
    let work = async {
        let addr = address(client, owner).await?;
        get_json(&addr, &format!("/fleet/{vehicle}")).await
    };
    tokio::time::timeout(FETCH_TIMEOUT, work)
        .await
        .map_err(|_| PeerError::Timeout)?
}

async fn address(client: &Client, owner: &str) -> Result<String, PeerError> {
    let resp = client
        .clone()
        .get(format!("{REPLICAS}{owner}"), None)
        .await?;
    resp.kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<Value>(kv.value()).ok())
        .and_then(|v| v["peer"].as_str().map(str::to_string))
        .ok_or_else(|| PeerError::NoAddress(owner.to_string()))
}

async fn get_json(addr: &str, path: &str) -> Result<Value, PeerError> {
    let connect = |source| PeerError::Connect {
        addr: addr.to_string(),
        source,
    };
    let http = |source| PeerError::Http {
        addr: addr.to_string(),
        source,
    };
    let stream = TcpStream::connect(addr).await.map_err(connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection task ends when `sender` is dropped after this one request.
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| PeerError::Body {
            addr: addr.to_string(),
            why: e.to_string(),
        })?;
    let resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != StatusCode::OK {
        return Err(PeerError::Status {
            addr: addr.to_string(),
            status: resp.status(),
        });
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| PeerError::Body {
            addr: addr.to_string(),
            why: e.to_string(),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| PeerError::Body {
        addr: addr.to_string(),
        why: e.to_string(),
    })
}
