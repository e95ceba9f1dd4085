//! The ADS gRPC service (the loop that hosts it is `serve`).
//!
//! Invariants:
//! - one [`XdsServer`] per process; its clones share the snapshot source, the stream
//!   registry, the metrics and the drain signal;
//! - [`XdsServer::drain`] ends every ADS stream (with `UNAVAILABLE`, so clients
//!   reconnect); [`crate::serve()`] drains when its `shutdown` future completes;
//! - an ADS stream holds no response buffer of its own: requests decode with tonic
//!   ([`Streaming`], at most [`MAX_REQUEST_BYTES`]), and each reply goes out chunk by
//!   chunk as the connection takes it ([`crate::wire`]: its own fields in short runs,
//!   big resources as their shared bytes), so memory per idle stream does not grow
//!   with the largest reply it ever sent; a reply over [`MAX_RESPONSE_BYTES`] ends
//!   its stream with `OUT_OF_RANGE`;
//! - the stream's end is always a `grpc-status` trailer: 0 when the stream task is
//!   done, else the status it ended with (`UNAVAILABLE` on drain, `PERMISSION_DENIED`,
//!   `INVALID_ARGUMENT`).
//!
//! Other gRPC services share the ADS port through [`tonic::service::Routes`]:
//!
//! ```text
//! let routes = tonic::service::Routes::new(FleetServiceServer::new(fleet));
//! misaki_xds::serve(listener, &xds, routes, &ServeConfig::default(), shutdown).await;
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::ready;

use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::SERVICE_NAME;
use http_body::Frame;
use misaki_identity::TlsPeer;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tonic::codec::BufferSettings;
use tonic::codegen::{Body, Context, Poll, Service, StdError};
use tonic::metadata::{GRPC_CONTENT_TYPE, MetadataValue};
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::{Status, Streaming};
use tonic_prost::ProstDecoder;
use tracing::warn;

use crate::SnapshotSource;
use crate::delta::Delta;
use crate::metrics::Metrics;
use crate::sotw::Sotw;
use crate::status::StreamRegistry;
use crate::stream::{self, Protocol, ResponseStream, Shared};
use crate::wire::{Framed, WireMessage};

/// Largest request accepted. Requests are small, except EDS subscriptions of nodes
/// with many clusters and NACKs quoting long errors.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Largest response sent. A node's snapshot is tens of KiB; a reply this big means a
/// compiler bug, and failing that stream loudly beats an OOM.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug)]
struct Inner {
    shared: Shared,
    drain: watch::Sender<bool>,
}

/// misaki's ADS server (SotW and delta). Cheap to clone.
#[derive(Debug, Clone)]
pub struct XdsServer {
    inner: Arc<Inner>,
}

impl XdsServer {
    /// A server that serves each node what `source` says, listing its streams in
    /// `streams` (the admin API reads the same registry).
    pub fn new(source: Arc<dyn SnapshotSource>, streams: StreamRegistry) -> Self {
        let (drain, drain_rx) = watch::channel(false);
        XdsServer {
            inner: Arc::new(Inner {
                shared: Shared {
                    source,
                    registry: streams,
                    metrics: Metrics::default(),
                    drain: drain_rx,
                },
                drain,
            }),
        }
    }

    /// The registry of live streams (for `/nodes`).
    pub fn streams(&self) -> &StreamRegistry {
        &self.inner.shared.registry
    }

    /// Register the `misaki_xds_*` metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.shared.metrics.register(registry);
    }

    /// The ADS service, with misaki's message size limits and buffers, for a tonic
    /// router.
    pub fn service(&self) -> AdsService {
        AdsService {
            server: self.clone(),
        }
    }

    /// Routes holding only the ADS service; add more with `Routes::add_service`.
    pub fn routes(&self) -> Routes {
        Routes::new(self.service())
    }

    /// End every ADS stream, now and as soon as any new one starts. Idempotent.
    pub fn drain(&self) {
        self.inner.drain.send_replace(true);
    }

    fn shared(&self) -> Shared {
        self.inner.shared.clone()
    }
}

/// Initial size of a stream's decode buffer. Requests are small (a few names, an
/// ACK), so tonic's 8 KiB default would mostly sit empty on every stream; the buffer
/// still grows for the rare big request.
const DECODE_BUFFER: usize = 1024;

/// The ADS gRPC service (`envoy.service.discovery.v3.AggregatedDiscoveryService`).
///
/// Written out instead of envoy-types' generated server, and without tonic's response
/// encoder: that encoder copies every response into a per-stream buffer that keeps the
/// capacity of the largest response the stream ever sent (~0.9 MB per vehicle with a
/// 3,000-service policy). Requests decode with tonic and prost; each response goes out
/// as [`Framed`] chunks around the resources' shared pre-encoded bytes ([`ReplyBody`]),
/// and the stream's status as trailers. Same paths, same message size limits, no
/// compression (as before).
#[derive(Debug, Clone)]
pub struct AdsService {
    server: XdsServer,
}

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

impl AdsService {
    /// Start protocol `P`'s stream task on `req` and answer with its replies.
    fn stream<P, B>(&self, req: http::Request<B>) -> http::Response<tonic::body::Body>
    where
        P: Protocol,
        P::Out: Unpin,
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        if let Err(status) = uncompressed(req.headers()) {
            return status.into_http();
        }
        // Over mutual TLS the connection's verified peer is in every request's
        // extensions (tonic puts the connect info there).
        let peer = req.extensions().get::<TlsPeer>().cloned();
        let decoder = ProstDecoder::new(BufferSettings::new(DECODE_BUFFER, 32 * 1024));
        let requests =
            Streaming::new_request(decoder, req.into_body(), None, Some(MAX_REQUEST_BYTES));
        let replies = stream::spawn_replies::<P>(self.server.shared(), peer, requests);
        let body = ReplyBody {
            replies: Some(replies),
            current: None,
        };
        let mut response = http::Response::new(tonic::body::Body::new(body));
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, GRPC_CONTENT_TYPE);
        response
    }
}

/// Requests must be uncompressed: the service offers no compression (what tonic
/// answered before, with the same status).
fn uncompressed(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get(GRPC_ENCODING) {
        None => Ok(()),
        Some(v) if v == "identity" => Ok(()),
        Some(v) => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(v.as_bytes())
            ));
            status
                .metadata_mut()
                .insert(GRPC_ACCEPT_ENCODING, MetadataValue::from_static("identity"));
            Err(status)
        }
    }
}

const GRPC_ENCODING: &str = "grpc-encoding";
const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";

impl<B> Service<http::Request<B>> for AdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(match req.uri().path() {
            SOTW_PATH => self.stream::<Sotw, B>(req),
            DELTA_PATH => self.stream::<Delta, B>(req),
            _ => Status::unimplemented("").into_http(),
        }))
    }
}

/// The response body of one ADS stream: each reply the stream task decided on, as a
/// gRPC message taken chunk by chunk while the connection has room for it, then the
/// status the stream ended with as trailers. Between replies it holds no buffer.
struct ReplyBody<T> {
    /// `None` once the trailers are out (dropping it tells the stream task).
    replies: Option<ResponseStream<T>>,
    /// The reply being sent.
    current: Option<Framed<T>>,
}

impl<T: WireMessage + Unpin> http_body::Body for ReplyBody<T> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        loop {
            if let Some(framed) = &mut this.current {
                if let Some(chunk) = framed.next_chunk() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                this.current = None;
            }
            let Some(replies) = &mut this.replies else {
                return Poll::Ready(None);
            };
            let status = match ready!(replies.as_mut().poll_next(cx)) {
                Some(Ok(reply)) => match Framed::new(reply, MAX_RESPONSE_BYTES) {
                    Ok(framed) => {
                        this.current = Some(framed);
                        continue;
                    }
                    Err(len) => too_large(len),
                },
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            this.replies = None;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.replies.is_none() && self.current.is_none()
    }
}

/// A reply over [`MAX_RESPONSE_BYTES`] ends its stream (tonic's status for it).
fn too_large(len: usize) -> Status {
    warn!(
        len,
        limit = MAX_RESPONSE_BYTES,
        "xDS response too large; ending the stream"
    );
    Status::out_of_range(format!(
        "Error, encoded message length too large: found {len} bytes, the limit is: \
         {MAX_RESPONSE_BYTES} bytes"
    ))
}

/// `grpc-status`, and `grpc-message` etc. when the status has them.
fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Metadata that is no valid header value: the code still goes out.
        map.clear();
        map.insert(Status::GRPC_STATUS, (status.code() as i32).into());
    }
    map
}
