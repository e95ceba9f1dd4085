//! The accept loop and the handshakes of the TLS port.
//!
//! The loop takes a handshake permit *before* it accepts, so at most
//! `--max-handshakes` handshakes exist at once and further connections wait in the
//! kernel's accept queue (bounded by the listen backlog), where they cost the server
//! nothing. Each handshake is its own task with its own deadline: a stalled or
//! endless handshake holds one permit for at most `--handshake-timeout`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use misaki_identity::TrustDomain;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tracing::{debug, info};

use super::conn::{LiveConns, TlsConn};
use super::{Limits, Loaded, Metrics};

/// Finished connections waiting for tonic to take them; tonic takes each at once.
const READY_QUEUE: usize = 64;

pub(super) struct Acceptor {
    pub config: watch::Receiver<Arc<Loaded>>,
    pub trust_domain: TrustDomain,
    pub limits: Limits,
    pub live: LiveConns,
    pub metrics: Metrics,
}

/// The TLS connections of the gRPC port, for `misaki_xds::serve_incoming`. Dropping
/// it stops the accept loop and closes the listening socket.
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::Receiver<TlsConn>,
}

impl Stream for Incoming {
    type Item = io::Result<TlsConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Acceptor {
    pub fn incoming(self, tcp: TcpIncoming) -> Incoming {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(Arc::new(self).accept_loop(tcp, tx));
        Incoming { rx }
    }

    async fn accept_loop(self: Arc<Self>, tcp: TcpIncoming, tx: mpsc::Sender<TlsConn>) {
        let permits = Arc::new(Semaphore::new(self.limits.max_handshakes));
        tokio::pin!(tcp);
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = tx.closed() => return,
            };
            let accepted = tokio::select! {
                s = tcp.next() => s,
                _ = tx.closed() => return,
            };
            match accepted {
                Some(Ok(stream)) => {
                    tokio::spawn(self.clone().handshake(stream, permit, tx.clone()));
                }
                // Out of file descriptors, a connection reset before accept: the
                // listener itself is fine.
                Some(Err(error)) => debug!(%error, "accept failed"),
                None => return,
            }
        }
    }

    async fn handshake(
        self: Arc<Self>,
        tcp: TcpStream,
        permit: OwnedSemaphorePermit,
        tx: mpsc::Sender<TlsConn>,
    ) {
        let remote = tcp.peer_addr().ok();
        let config = self.config.borrow().config.clone();
        self.metrics.in_flight.inc();
        let result = tokio::time::timeout(
            self.limits.handshake_timeout,
            TlsAcceptor::from(config).accept(tcp),
        )
        .await;
        self.metrics.in_flight.dec();
        drop(permit);
        let stream = match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                let why = classify(&error);
                self.metrics.handshake(why);
                if why == "io" || why == "protocol" {
                    debug!(?remote, %error, "TLS handshake failed");
                } else {
                    info!(?remote, reason = why, %error, "TLS handshake refused");
                }
                return;
            }
            Err(_) => {
                self.metrics.handshake("timeout");
                debug!(?remote, "TLS handshake timed out");
                return;
            }
        };
        self.metrics.handshake("ok");
        let conn = TlsConn::new(stream, remote, &self.trust_domain, &self.live);
        // Only fails when the server stopped accepting: the connection just closes.
        let _ = tx.send(conn).await;
    }
}

/// The `result` label of a failed handshake: what the client did wrong, or that the
/// connection broke.
pub(super) fn classify(error: &io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::Revoked => "revoked",
            // --crl is given but has no CRL from this certificate's issuer.
            C::UnknownRevocationStatus => "no_crl",
            C::UnknownIssuer => "unknown_ca",
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::AlertReceived(_) => "peer_alert",
        _ => "protocol",
    }
}
