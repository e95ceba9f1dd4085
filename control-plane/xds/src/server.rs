//! The ADS gRPC service and the server loop that hosts it.
//!
//! Invariants:
//! - one [`XdsServer`] per process; its clones share the snapshot source, the stream
//!   registry, the metrics and the drain signal;
//! - [`XdsServer::drain`] ends every ADS stream (with `UNAVAILABLE`, so clients
//!   reconnect); [`serve`] drains when its `shutdown` future completes, then gives
//!   other services' connections [`ServeConfig::drain_grace`] before it returns;
//! - the transport is tuned for vehicles on cellular links: HTTP/2 pings find dead
//!   peers that TCP alone would hold open for many minutes.
//!
//! Other gRPC services share the ADS port through [`tonic::service::Routes`]:
//!
//! ```text
//! let routes = tonic::service::Routes::new(FleetServiceServer::new(fleet));
//! misaki_xds::serve(listener, &xds, routes, &ServeConfig::default(), shutdown).await?;
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;
use std::marker::PhantomData;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::SERVICE_NAME;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use misaki_identity::TlsPeer;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_stream::Stream;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstDecoder;
use tracing::{info, warn};

use crate::SnapshotSource;
use crate::delta::{Delta, DeltaReply};
use crate::metrics::Metrics;
use crate::sotw::{Sotw, SotwReply};
use crate::status::StreamRegistry;
use crate::stream::{self, ResponseStream, Shared};
use crate::wire::{WireEncoder, WireMessage};

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

    /// The ADS service, with misaki's message size limits and codec buffers, for a
    /// tonic router.
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
/// Initial size and growth step of a stream's encode buffer (tonic's default). The
/// buffer keeps the capacity of the largest response it has encoded whatever it
/// starts at, and a typical push (RDS, ~7.4 KB) fits in 8 KiB without growing: a
/// 4 KiB start measured ~3 KiB/stream worse after a few fleet-wide changes.
const ENCODE_BUFFER: usize = 8 * 1024;

/// misaki's per-stream buffer sizes; requests decode with prost, responses are
/// hand-encoded around each resource's shared pre-encoded bytes ([`WireMessage`]).
struct AdsCodec<T, U>(PhantomData<fn(T) -> U>);

impl<T, U> Codec for AdsCodec<T, U>
where
    T: WireMessage + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder::new(BufferSettings::new(ENCODE_BUFFER, 32 * 1024))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(DECODE_BUFFER, 32 * 1024))
    }
}

/// The ADS gRPC service (`envoy.service.discovery.v3.AggregatedDiscoveryService`).
///
/// Written out instead of envoy-types' generated server, which hard-codes tonic's
/// default codec buffers (8 KiB each way per stream) and prost-encodes every response
/// whole: this one writes each response's own fields and appends the resources'
/// pre-encoded bytes, shared by every stream. Same paths, same message size limits,
/// no compression (as before).
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

struct SotwMethod(XdsServer);

impl StreamingService<DiscoveryRequest> for SotwMethod {
    type Response = SotwReply;
    type ResponseStream = ResponseStream<SotwReply>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let peer = request.extensions().get::<TlsPeer>().cloned();
        std::future::ready(Ok(Response::new(stream::spawn_replies::<Sotw>(
            self.0.shared(),
            peer,
            request.into_inner(),
        ))))
    }
}

struct DeltaMethod(XdsServer);

impl StreamingService<DeltaDiscoveryRequest> for DeltaMethod {
    type Response = DeltaReply;
    type ResponseStream = ResponseStream<DeltaReply>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let peer = request.extensions().get::<TlsPeer>().cloned();
        std::future::ready(Ok(Response::new(stream::spawn_replies::<Delta>(
            self.0.shared(),
            peer,
            request.into_inner(),
        ))))
    }
}

fn grpc<T, U>() -> Grpc<AdsCodec<T, U>>
where
    T: WireMessage + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    Grpc::new(AdsCodec(PhantomData))
        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), Some(MAX_RESPONSE_BYTES))
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match req.uri().path() {
            SOTW_PATH => {
                let method = SotwMethod(self.server.clone());
                Box::pin(async move { Ok(grpc().streaming(method, req).await) })
            }
            DELTA_PATH => {
                let method = DeltaMethod(self.server.clone());
                Box::pin(async move { Ok(grpc().streaming(method, req).await) })
            }
            _ => Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            }),
        }
    }
}

/// Transport settings for [`serve`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// HTTP/2 PING interval: finds a vehicle that dropped off the network without a
    /// FIN (tunnels, dead zones) in well under a minute, yet costs a metered link
    /// only a few bytes.
    pub http2_keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub http2_keepalive_timeout: Duration,
    /// TCP keepalive: idle time before the first probe, probe interval, probe count.
    pub tcp_keepalive: Duration,
    pub tcp_keepalive_interval: Duration,
    pub tcp_keepalive_retries: u32,
    /// Flow-control windows: large enough that a full snapshot crosses a link with a
    /// long RTT in one round trip instead of waiting for WINDOW_UPDATEs.
    pub initial_stream_window: u32,
    pub initial_connection_window: u32,
    /// After shutdown, how long other services' connections may take to finish.
    pub drain_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(60),
            tcp_keepalive_interval: Duration::from_secs(15),
            tcp_keepalive_retries: 4,
            initial_stream_window: 1024 * 1024,
            initial_connection_window: 4 * 1024 * 1024,
            drain_grace: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serve ADS plus every service in `routes` on `listener` until `shutdown` completes.
///
/// On shutdown the server stops accepting, drains every ADS stream, and returns once
/// all connections have closed or [`ServeConfig::drain_grace`] has passed.
pub async fn serve(
    listener: TcpListener,
    xds: &XdsServer,
    routes: Routes,
    config: &ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().ok();
    info!(?addr, "xDS server listening");
    let incoming = tcp_incoming(listener, config);
    serve_incoming(incoming, xds, routes, config, shutdown).await
}

/// The connections accepted on `listener`, with [`ServeConfig`]'s TCP options (no
/// Nagle delay, keepalive). A TLS acceptor takes its connections from here.
pub fn tcp_incoming(listener: TcpListener, config: &ServeConfig) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(config.tcp_keepalive))
        .with_keepalive_interval(Some(config.tcp_keepalive_interval))
        .with_keepalive_retries(Some(config.tcp_keepalive_retries))
}

/// [`serve`] over connections from `incoming` (e.g. TLS streams whose connect info is
/// a [`misaki_identity::TlsPeer`]: every request on a connection then carries it, and
/// each ADS stream must match it).
pub async fn serve_incoming<I, IO, IE>(
    incoming: I,
    xds: &XdsServer,
    routes: Routes,
    config: &ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<StdError>,
{
    let routes = routes.add_service(xds.service());

    let (fired_tx, fired_rx) = oneshot::channel::<()>();
    let drainer = xds.clone();
    let signal = async move {
        shutdown.await;
        info!("shutdown: draining xDS streams");
        drainer.drain();
        let _ = fired_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(config.http2_keepalive_timeout))
        .initial_stream_window_size(config.initial_stream_window)
        .initial_connection_window_size(config.initial_connection_window)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, signal);

    let grace = config.drain_grace;
    let deadline = async move {
        match fired_rx.await {
            Ok(()) => tokio::time::sleep(grace).await,
            // The server ended without a shutdown signal: the other branch has it.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = server => r?,
        () = deadline => warn!(?grace, "drain grace elapsed; closing remaining connections"),
    }
    Ok(())
}
