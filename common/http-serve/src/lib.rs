//! The one accept-and-serve loop of misaki's small HTTP servers: misaki-cp's admin port,
//! edge-netd's local API, store-and-forward's ingest endpoint and admin, and the
//! `saf-daemon` stand-in's admin port.
//!
//! [`Server::serve`] accepts on a bound [`TcpListener`] and serves each connection on its
//! own task with hyper, answering every request with the handler, until its `stop` future
//! resolves. What differs between servers is a [`Server`] option, and each option is off
//! unless a server asks for it (hyper's own behaviour then):
//!
//! | option | off | on |
//! |---|---|---|
//! | [`Protocol`] | — | HTTP/1.1 only, or HTTP/1.1 and h2c (prior knowledge) on one port |
//! | [`Server::header_read_timeout`] | no limit | an HTTP/1.1 client that has not sent its whole header in time is disconnected |
//! | [`Server::accept_backoff`] | accept again at once | pause after a failed accept (EMFILE and friends) |
//! | [`Server::tcp_nodelay`] | Nagle on | `TCP_NODELAY` on every accepted socket |
//! | [`Drain`] | [`Drain::Detach`] | [`Drain::Graceful`] |
//!
//! HTTP/1.1 keep-alive is on for every server (hyper's default).
//!
//! Invariants:
//! - once `stop` has resolved, nothing more is accepted: `serve` returns and drops the
//!   listener, so new connections are refused. A `stop` that is ready from the start
//!   wins over a pending accept (nothing is accepted at all).
//! - `serve` returns as soon as `stop` resolves; it does not wait for open connections.
//!   What happens to them is the server's [`Drain`]: left to finish on their own
//!   ([`Drain::Detach`]), or told to finish ([`Drain::Graceful`]): requests in flight
//!   complete and their responses are sent, no new request starts (HTTP/1.1 closes after
//!   the current response, HTTP/2 sends GOAWAY), and the connection is dropped once the
//!   grace has passed whatever it is doing. Dropping the `serve` future drains the same way.
//! - an accept error never ends the server: it is logged (warn) and accepting goes on,
//!   after [`Server::accept_backoff`] if set.
//! - a connection's error (reset, malformed request, header timeout) ends that connection
//!   alone; it is logged at debug, never reaches the handler, and never stops the server.
//! - the handler cannot fail: every request gets the response it returns.
//!
//! ```no_run
//! # async fn example(listener: tokio::net::TcpListener) {
//! use misaki_http::{Protocol, Server};
//! let handler = |_req: hyper::Request<hyper::body::Incoming>| {
//!     std::future::ready(hyper::Response::new(String::from("ok\n")))
//! };
//! let stop = async {
//!     let _ = tokio::signal::ctrl_c().await;
//! };
//! Server::new("admin", Protocol::Http1).serve(listener, handler, stop).await;
//! # }
//! ```

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

/// What a server speaks on its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on one port, told apart by the
    /// HTTP/2 preface.
    Http1AndH2c,
}

/// What happens to the open connections when `stop` resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Nothing: they go on serving (keep-alive included) until the client closes them or
    /// the runtime ends.
    Detach,
    /// Told to finish: requests in flight complete, no new request starts, and the
    /// connection is dropped after this long at the most.
    Graceful(Duration),
}

/// How one server serves; see the module documentation. Cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct Server {
    name: &'static str,
    protocol: Protocol,
    header_read_timeout: Option<Duration>,
    accept_backoff: Option<Duration>,
    tcp_nodelay: bool,
    drain: Drain,
}

impl Server {
    /// A server speaking `protocol`, every option off. `name` is the `server` field of
    /// its log lines.
    pub fn new(name: &'static str, protocol: Protocol) -> Self {
        Self {
            name,
            protocol,
            header_read_timeout: None,
            accept_backoff: None,
            tcp_nodelay: false,
            drain: Drain::Detach,
        }
    }

    /// Disconnect an HTTP/1.1 client that has not sent a request's whole header within
    /// `timeout` (slow clients cannot hold a task); the timer restarts for each request.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = Some(timeout);
        self
    }

    /// Pause this long after a failed accept instead of accepting again at once (out of
    /// file descriptors, the error repeats until a connection closes).
    pub fn accept_backoff(mut self, pause: Duration) -> Self {
        self.accept_backoff = Some(pause);
        self
    }

    /// Set `TCP_NODELAY` on every accepted socket.
    pub fn tcp_nodelay(mut self) -> Self {
        self.tcp_nodelay = true;
        self
    }

    /// What happens to open connections at stop ([`Drain::Detach`] unless set).
    pub fn drain(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }

    /// Accept on `listener` and answer every request with `handler` until `stop`
    /// resolves; then stop accepting, drop the listener, and return (open connections
    /// are drained in the background as [`Drain`] says).
    pub async fn serve<H, Fut, B>(
        self,
        listener: TcpListener,
        handler: H,
        stop: impl Future<Output = ()>,
    ) where
        H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        // `true` once stop has resolved; a dropped sender (this future dropped) reads the
        // same to the connections.
        let (stopping, _) = watch::channel(false);
        tokio::pin!(stop);
        loop {
            let stream = tokio::select! {
                biased;
                () = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        warn!(server = self.name, %error, "accept failed");
                        if let Some(pause) = self.accept_backoff {
                            tokio::time::sleep(pause).await;
                        }
                        continue;
                    }
                },
            };
            if self.tcp_nodelay {
                let _ = stream.set_nodelay(true);
            }
            tokio::spawn(self.connection(stream, handler.clone(), stopping.subscribe()));
        }
        stopping.send_replace(true);
    }

    /// Serve one accepted connection to its end.
    async fn connection<H, Fut, B>(
        self,
        stream: TcpStream,
        handler: H,
        stopping: watch::Receiver<bool>,
    ) where
        H: Fn(Request<Incoming>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let io = TokioIo::new(stream);
        let service = service_fn(move |req| {
            let response = handler(req);
            async move { Ok::<_, Infallible>(response.await) }
        });
        match self.protocol {
            Protocol::Http1 => {
                let mut builder = http1::Builder::new();
                if let Some(timeout) = self.header_read_timeout {
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout);
                }
                self.run(builder.serve_connection(io, service), stopping)
                    .await;
            }
            Protocol::Http1AndH2c => {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if let Some(timeout) = self.header_read_timeout {
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout);
                }
                self.run(builder.serve_connection(io, service), stopping)
                    .await;
            }
        }
    }

    /// Drive `conn` until it ends, or as [`Drain`] says once stop is signalled.
    async fn run<C>(self, conn: C, mut stopping: watch::Receiver<bool>)
    where
        C: GracefulConnection,
        C::Error: Display,
    {
        tokio::pin!(conn);
        let ended = match self.drain {
            Drain::Detach => conn.await,
            Drain::Graceful(grace) => tokio::select! {
                ended = conn.as_mut() => ended,
                () = stopped(&mut stopping) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(grace, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            },
        };
        if let Err(error) = ended {
            debug!(server = self.name, %error, "connection ended with an error");
        }
    }
}

/// Resolves once stop is signalled or its sender is gone. Returns nothing, so no watch
/// guard is held across later awaits (the connection future must stay `Send`).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests;
