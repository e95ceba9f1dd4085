//! Real requests over real loopback sockets: HTTP/1.1 and h2c, both drains, the grace
//! limit, the header-read timeout, and refused connections after stop.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{Drain, Protocol, Server};

const LONG: Duration = Duration::from_secs(10);

/// A server under test: `/slow` reports on `entered` and answers once `release` is true;
/// any other path answers `ok` at once.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<()>,
    entered: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
}

async fn start(server: Server) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let (release, release_rx) = watch::channel(false);
    let handler = move |req: Request<Incoming>| {
        let (entered_tx, mut release_rx) = (entered_tx.clone(), release_rx.clone());
        async move {
            if req.uri().path() == "/slow" {
                let _ = entered_tx.send(());
                let _ = release_rx.wait_for(|r| *r).await;
                return Response::new(Full::new(Bytes::from_static(b"slow")));
            }
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    };
    let stop = async {
        let _ = stop_rx.await;
    };
    let served = tokio::spawn(server.serve(listener, handler, stop));
    Running {
        addr,
        stop: Some(stop_tx),
        served,
        entered,
        release,
    }
}

impl Running {
    /// Signal stop and wait for `serve` to return.
    async fn stop(&mut self) {
        let _ = self.stop.take().expect("stopped once").send(());
        tokio::time::timeout(LONG, &mut self.served)
            .await
            .expect("serve returns once stopped")
            .unwrap();
    }

    /// Once `/slow` is in flight: stop, and check new connections are refused.
    async fn stop_during_slow(&mut self) {
        self.entered.recv().await.unwrap();
        self.stop().await;
        assert_refused(self.addr).await;
    }

    /// Let `/slow` answer, and check the request in flight gets its response.
    async fn finish_slow(&self, in_flight: InFlight) {
        self.release.send_replace(true);
        assert_answers(in_flight.await.unwrap(), "slow").await;
    }
}

type InFlight = JoinHandle<hyper::Result<Response<Incoming>>>;

async fn assert_refused(addr: SocketAddr) {
    let err = TcpStream::connect(addr)
        .await
        .expect_err("no connection after stop");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

type Conn = JoinHandle<Result<(), hyper::Error>>;

async fn http1_client(addr: SocketAddr) -> (client1::SendRequest<Empty<Bytes>>, Conn) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = client1::handshake(io).await.unwrap();
    (send, tokio::spawn(conn))
}

async fn h2c_client(addr: SocketAddr) -> (client2::SendRequest<Empty<Bytes>>, Conn) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = client2::handshake(TokioExecutor::new(), io).await.unwrap();
    (send, tokio::spawn(conn))
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://test{path}"))
        .body(Empty::new())
        .unwrap()
}

async fn assert_answers(resp: hyper::Result<Response<Incoming>>, body: &'static str) {
    let resp = resp.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, Bytes::from_static(body.as_bytes()));
}

async fn ended(conn: Conn) {
    tokio::time::timeout(LONG, conn)
        .await
        .expect("the server closed the connection")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn graceful_http1_finishes_in_flight_then_closes_and_refuses() {
    let graceful = Drain::Graceful(Duration::from_secs(5));
    let mut server = start(Server::new("test", Protocol::Http1).drain(graceful)).await;
    let (mut idle, idle_conn) = http1_client(server.addr).await;
    assert_answers(idle.send_request(get("/")).await, "ok").await;
    let (mut busy, busy_conn) = http1_client(server.addr).await;
    let in_flight = tokio::spawn(busy.send_request(get("/slow")));

    server.stop_during_slow().await;
    // The idle keep-alive connection is closed at once; the busy one after its response.
    ended(idle_conn).await;
    assert!(!in_flight.is_finished());
    server.finish_slow(in_flight).await;
    ended(busy_conn).await;
}

#[tokio::test]
async fn graceful_h2c_and_http1_share_the_port_and_drain() {
    let mut server = start(
        Server::new("test", Protocol::Http1AndH2c)
            .tcp_nodelay()
            .header_read_timeout(Duration::from_secs(30))
            .accept_backoff(Duration::from_millis(50))
            .drain(Drain::Graceful(Duration::from_secs(5))),
    )
    .await;
    let (mut h1, _h1_conn) = http1_client(server.addr).await;
    assert_answers(h1.send_request(get("/")).await, "ok").await;
    let (mut h2, h2_conn) = h2c_client(server.addr).await;
    let resp = h2.send_request(get("/")).await;
    assert_eq!(resp.as_ref().unwrap().version(), hyper::Version::HTTP_2);
    assert_answers(resp, "ok").await;
    let in_flight = tokio::spawn(h2.send_request(get("/slow")));

    server.stop_during_slow().await;
    server.finish_slow(in_flight).await;
    ended(h2_conn).await;
}

#[tokio::test]
async fn detach_leaves_open_connections_serving() {
    let mut server = start(Server::new("test", Protocol::Http1)).await;
    let (mut idle, _idle_conn) = http1_client(server.addr).await;
    let (mut busy, _busy_conn) = http1_client(server.addr).await;
    let in_flight = tokio::spawn(busy.send_request(get("/slow")));

    server.stop_during_slow().await;
    server.finish_slow(in_flight).await;
    // Keep-alive connections opened before the stop still serve.
    assert_answers(idle.send_request(get("/")).await, "ok").await;
}

#[tokio::test]
async fn graceful_drops_a_connection_still_busy_after_the_grace() {
    let graceful = Drain::Graceful(Duration::from_millis(100));
    let mut server = start(Server::new("test", Protocol::Http1).drain(graceful)).await;
    let (mut busy, busy_conn) = http1_client(server.addr).await;
    let in_flight = tokio::spawn(busy.send_request(get("/slow")));

    server.stop_during_slow().await;
    // Never released: the server gives up after the grace and closes the connection.
    let result = tokio::time::timeout(LONG, in_flight).await.unwrap();
    assert!(
        result.unwrap().is_err(),
        "no response on a dropped connection"
    );
    let _ = tokio::time::timeout(LONG, busy_conn).await.unwrap();
}

#[tokio::test]
async fn a_stop_ready_at_start_accepts_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = |_req| std::future::ready(Response::new(Empty::<Bytes>::new()));
    let serve = Server::new("test", Protocol::Http1).serve(listener, handler, async {});
    tokio::time::timeout(LONG, serve)
        .await
        .expect("serve returns at once");
    assert_refused(addr).await;
}

/// Sends half a request header and reports whether the server closed the connection
/// within `wait`.
async fn closes_a_slow_header(server: Server, wait: Duration) -> bool {
    let mut server = start(server).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(wait, stream.read_to_end(&mut rest))
        .await
        .is_ok();
    server.stop().await;
    closed
}

#[tokio::test]
async fn header_read_timeout_only_when_asked() {
    for protocol in [Protocol::Http1, Protocol::Http1AndH2c] {
        let timed = Server::new("test", protocol).header_read_timeout(Duration::from_millis(100));
        assert!(closes_a_slow_header(timed, LONG).await, "{protocol:?}");
        let untimed = Server::new("test", protocol);
        assert!(
            !closes_a_slow_header(untimed, Duration::from_millis(500)).await,
            "{protocol:?}"
        );
    }
}
