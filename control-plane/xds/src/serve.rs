//! The gRPC server loop: accepts connections, serves ADS and the other services on
//! each over HTTP/2, ages connections out, and drains on shutdown.
//!
//! Invariants:
//! - every request carries its connection's connect info as an extension (a tonic
//!   `TcpConnectInfo`, or the [`misaki_identity::TlsPeer`] of a TLS acceptor), as
//!   tonic's own server does, so `Request::remote_addr` and the peer checks work;
//! - with [`ServeConfig::max_connection_age`] set, each connection draws its own age
//!   (the base ± 10 %), then gets a GOAWAY; what is still open
//!   [`ServeConfig::max_connection_age_grace`] later is cut. ADS and fleet-report
//!   streams never end by themselves, so the cut is what makes clients reconnect
//!   (through the load balancer, perhaps to a replica added since); the jitter keeps
//!   the connections made in one burst from all leaving in one burst again;
//! - on shutdown: stop accepting, end every ADS stream ([`XdsServer::drain`]), GOAWAY
//!   every connection, and return once all have closed or
//!   [`ServeConfig::drain_grace`] has passed (then the rest are cut).
//!
//! The loop is ours rather than `tonic::transport::Server` because tonic gives every
//! connection the same age: connections made in one burst (a replica's restart, a
//! scale-up) would all be cut in one burst again, every `max_connection_age`.

use std::future::{Future, pending};
use std::pin::pin;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::{Service, StdError};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};
use tracing::{debug, info, warn};

use crate::server::XdsServer;

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
    /// A connection older than this (± 10 %, drawn per connection) gets a GOAWAY, so
    /// its clients come back through the load balancer. `None`: no limit (one
    /// server, nowhere else to go: edge-netd's local tier).
    pub max_connection_age: Option<Duration>,
    /// How long streams may stay open after the age's GOAWAY before the connection
    /// is cut.
    pub max_connection_age_grace: Duration,
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
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(10),
        }
    }
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
) {
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
/// each ADS stream must match it). Ends when `shutdown` completes or `incoming` ends.
pub async fn serve_incoming<I, IO, IE>(
    incoming: I,
    xds: &XdsServer,
    routes: Routes,
    config: &ServeConfig,
    shutdown: impl Future<Output = ()>,
) where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<StdError>,
{
    let routes = routes.add_service(xds.service()).prepare();
    let http = http2(config);
    let (closing_tx, closing) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    // `incoming` is dropped when accepting stops: the listening socket closes at once
    // rather than taking connections it will never serve during the drain.
    let mut incoming = Box::pin(incoming);
    loop {
        let io = tokio::select! {
            () = &mut shutdown => break,
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                Some(Err(e)) => {
                    // Per-connection failures (a reset before accept, a failed TLS
                    // handshake) and transient ones (EMFILE): the listener goes on.
                    let e: StdError = e.into();
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let age = config.max_connection_age.map(jittered);
        conns.spawn(serve_connection(
            io,
            http.clone(),
            routes.clone(),
            age,
            config.max_connection_age_grace,
            closing.clone(),
        ));
    }
    drop(incoming);

    info!("shutdown: draining xDS streams");
    xds.drain();
    closing_tx.send_replace(true);
    let grace = config.drain_grace;
    let all_closed = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_closed).await.is_err() {
        warn!(
            ?grace,
            remaining = conns.len(),
            "drain grace elapsed; closing remaining connections"
        );
        conns.shutdown().await;
    }
}

type Http2 = hyper::server::conn::http2::Builder<TokioExecutor>;

fn http2(config: &ServeConfig) -> Http2 {
    let mut http = Http2::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .keep_alive_interval(Some(config.http2_keepalive_interval))
        .keep_alive_timeout(config.http2_keepalive_timeout)
        .initial_stream_window_size(config.initial_stream_window)
        .initial_connection_window_size(config.initial_connection_window)
        // A load generator multiplexes thousands of streams on one connection;
        // hyper's default of 200 would refuse them (tonic's default is no limit too).
        .max_concurrent_streams(None);
    http
}

/// The base age ± 10 %, uniformly.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::random_range(0.9..=1.1))
}

/// Serve one connection until its peer closes it, its age is reached (GOAWAY, then
/// `grace`), or the server closes (GOAWAY; the caller cuts it after the drain grace).
async fn serve_connection<IO>(
    io: IO,
    http: Http2,
    routes: Routes,
    age: Option<Duration>,
    grace: Duration,
    mut closing: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    let info = io.connect_info();
    let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let mut routes = routes.clone();
        async move {
            std::future::poll_fn(|cx| {
                Service::<http::Request<Incoming>>::poll_ready(&mut routes, cx)
            })
            .await?;
            routes.call(req).await
        }
    });
    let mut conn = pin!(http.serve_connection(TokioIo::new(io), service));
    let aged = async {
        match age {
            Some(age) => tokio::time::sleep(age).await,
            None => pending().await,
        }
    };
    let grace = tokio::select! {
        r = conn.as_mut() => return ended(r),
        () = aged => {
            debug!(?age, "maximum connection age reached: GOAWAY");
            Some(grace)
        }
        _ = closing.wait_for(|closing| *closing) => None,
    };
    conn.as_mut().graceful_shutdown();
    match grace {
        Some(grace) => match tokio::time::timeout(grace, conn).await {
            Ok(r) => ended(r),
            Err(_) => debug!(
                ?grace,
                "connection age grace elapsed; closing the connection"
            ),
        },
        None => ended(conn.await),
    }
}

fn ended(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        // Peers that vanish are routine on vehicle links.
        debug!(error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_spread_over_ten_percent_either_side() {
        let base = Duration::from_secs(1800);
        let ages: Vec<Duration> = (0..1000).map(|_| jittered(base)).collect();
        let (lo, hi) = (base.mul_f64(0.9), base.mul_f64(1.1));
        assert!(ages.iter().all(|a| (lo..=hi).contains(a)), "{ages:?}");
        // Spread, not bunched: some in each outer fifth of the range.
        let near = |f: f64| {
            ages.iter()
                .filter(move |a| a.abs_diff(base.mul_f64(f)) < base / 50)
        };
        assert!(near(0.91).count() > 0 && near(1.09).count() > 0);
    }
}
