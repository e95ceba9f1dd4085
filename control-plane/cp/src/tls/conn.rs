//! One established TLS connection, and the set of live ones.
//!
//! Invariants:
//! - every [`TlsConn`] is listed in [`LiveConns`] from its handshake until it is
//!   dropped (the [`Listed`] guard removes it), with its client certificate chain and
//!   the time that certificate expires;
//! - closing a connection is a flag plus a wake-up: the connection's next read or write
//!   fails, hyper ends the HTTP/2 connection and every stream on it ends with it. The
//!   TLS stream itself is never touched from another task;
//! - the re-checks run outside the list's lock, on a copy of the list, so a reload
//!   never stalls new connections behind thousands of signature checks.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use misaki_identity::{TlsPeer, TrustDomain};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;
use tracing::info;

use super::Metrics;

/// What the live-connection list knows of one connection.
#[derive(Debug)]
struct Live {
    chain: Vec<CertificateDer<'static>>,
    /// The client certificate's notAfter, seconds since the epoch.
    not_after: i64,
    remote: Option<SocketAddr>,
    identity: Option<String>,
    closed: AtomicBool,
    waker: AtomicWaker,
}

impl Live {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Register for a wake-up and say whether the connection has been closed.
    fn poll_closed(&self, cx: &Context<'_>) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        self.closed.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Live>>>,
}

/// Every established TLS connection. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct LiveConns {
    inner: Arc<Inner>,
    metrics: Metrics,
}

/// Removes its connection from the list when dropped.
#[derive(Debug)]
struct Listed {
    id: u64,
    live: Arc<Live>,
    conns: LiveConns,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
        self.conns.metrics.connections.dec();
    }
}

fn now_secs() -> i64 {
    UnixTime::now().as_secs().try_into().unwrap_or(i64::MAX)
}

impl LiveConns {
    pub fn new(metrics: Metrics) -> Self {
        LiveConns {
            inner: Arc::default(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, live: Live) -> Listed {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(live);
        self.lock().insert(id, live.clone());
        self.metrics.connections.inc();
        Listed {
            id,
            live,
            conns: self.clone(),
        }
    }

    fn all(&self) -> Vec<Arc<Live>> {
        self.lock().values().cloned().collect()
    }

    fn close(&self, live: &Live, reason: &'static str, why: &dyn std::fmt::Display) {
        if !live.closed.swap(true, Ordering::AcqRel) {
            info!(remote = ?live.remote, identity = ?live.identity, reason, %why, "closing TLS connection");
            self.metrics.closed(reason);
            live.close();
        }
    }

    /// Close every connection whose client certificate no longer verifies with
    /// `verifier` (a new CA or CRL). Returns how many were closed. CPU-bound: one
    /// signature check per connection.
    pub fn recheck(&self, verifier: &dyn ClientCertVerifier) -> usize {
        let now = UnixTime::now();
        let mut closed = 0;
        for live in self.all() {
            let Some((leaf, intermediates)) = live.chain.split_first() else {
                continue;
            };
            if let Err(error) = verifier.verify_client_cert(leaf, intermediates, now) {
                let reason = match error {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                        "revoked"
                    }
                    _ => "untrusted",
                };
                self.close(&live, reason, &error);
                closed += 1;
            }
        }
        closed
    }

    /// Close every connection whose client certificate has expired.
    pub fn expire(&self) -> usize {
        let now = now_secs();
        let mut closed = 0;
        for live in self.all() {
            if live.not_after < now && !live.closed.load(Ordering::Acquire) {
                self.close(&live, "expired", &"the client certificate expired");
                closed += 1;
            }
        }
        closed
    }
}

/// An established TLS connection on the gRPC port. Its connect info, and so an
/// extension of every request on it, is the [`TlsPeer`].
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: TlsPeer,
    listed: Listed,
}

impl TlsConn {
    pub(super) fn new(
        stream: TlsStream<TcpStream>,
        remote: Option<SocketAddr>,
        trust_domain: &TrustDomain,
        live: &LiveConns,
    ) -> TlsConn {
        let chain: Vec<CertificateDer<'static>> = stream
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        let identity = match chain.first() {
            Some(leaf) => misaki_identity::from_certificate(leaf, trust_domain),
            // The verifier requires a certificate; this cannot happen, and if it did
            // the connection would authorize nothing.
            None => Err(misaki_identity::IdentityError::NoSpiffeId),
        };
        let peer = TlsPeer {
            remote_addr: remote,
            identity,
        };
        let not_after = chain
            .first()
            .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
            .map_or(i64::MIN, |(_, c)| c.validity().not_after.timestamp());
        let listed = live.add(Live {
            chain,
            not_after,
            remote,
            identity: peer.identity_uri(),
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        TlsConn {
            stream,
            peer,
            listed,
        }
    }

    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        if self.listed.live.poll_closed(cx) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate no longer valid",
            ));
        }
        Ok(())
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Subject;
    use crate::tls::tests::fixture;
    use crate::tls::{TlsFiles, load};
    use rustls_pki_types::pem::PemObject;
    use std::time::Duration;

    fn listed(conns: &LiveConns, cert_pem: &str, not_after: i64) -> Listed {
        conns.add(Live {
            chain: vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            not_after,
            remote: None,
            identity: None,
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        })
    }

    #[test]
    fn a_new_crl_closes_exactly_the_revoked_connections() {
        let f = fixture();
        let metrics = Metrics::default();
        let conns = LiveConns::new(metrics.clone());
        let car = |id: &str| {
            f.ca.issue(&Subject::Vehicle(id.into()), Duration::from_secs(600))
                .unwrap()
        };
        let (one, two) = (car("car-1"), car("car-2"));
        let a = listed(&conns, &one.cert_pem, i64::MAX);
        let b = listed(&conns, &two.cert_pem, i64::MAX);
        assert_eq!(metrics.connections.get(), 2);

        let verifier = load(&f.files).unwrap().verifier;
        assert_eq!(conns.recheck(verifier.as_ref()), 0);
        let crl = f.ca.revoke(&one.serial_hex).unwrap();
        let with_crl = TlsFiles {
            crl: Some(crl),
            ..f.files.clone()
        };
        let verifier = load(&with_crl).unwrap().verifier;
        assert_eq!(conns.recheck(verifier.as_ref()), 1);
        assert!(a.live.closed.load(Ordering::Acquire));
        assert!(!b.live.closed.load(Ordering::Acquire));
        let revoked = metrics.closed.get_or_create(&[("reason", "revoked")]).get();
        assert_eq!(revoked, 1);
        drop((a, b));
        assert_eq!(metrics.connections.get(), 0);
        assert!(conns.all().is_empty());
    }

    #[test]
    fn expired_connections_are_closed_once() {
        let f = fixture();
        let conns = LiveConns::new(Metrics::default());
        let pem =
            f.ca.issue(&Subject::Vehicle("car-1".into()), Duration::from_secs(600))
                .unwrap()
                .cert_pem;
        let old = listed(&conns, &pem, now_secs() - 1);
        let fresh = listed(&conns, &pem, now_secs() + 600);
        assert_eq!(conns.expire(), 1);
        assert_eq!(conns.expire(), 0);
        assert!(old.live.closed.load(Ordering::Acquire));
        assert!(!fresh.live.closed.load(Ordering::Acquire));
    }
}
