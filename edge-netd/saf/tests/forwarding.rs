//! The ingest endpoint and the forwarder against a real queue directory and a real
//! receiver on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Harness, Options, eventually, telemetry_json};
use http::StatusCode;
use misaki_saf::HttpVersion;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bodies_arrive_with_content_encoding_and_decode_to_the_original() {
    for version in [HttpVersion::Http2, HttpVersion::Http1] {
        let h = Harness::start(Options {
            version,
            ..Options::default()
        })
        .await;
        let body = telemetry_json(8 << 10, 7);
        let tiny = b"{\"ok\":1}".to_vec();
        let jpeg = telemetry_json(4 << 10, 9);
        let (s1, k1, _) = h
            .post(
                "/telemetry/v1",
                &[("content-type", "application/json")],
                body.clone(),
            )
            .await;
        let (s2, k2, _) = h.post("/telemetry/v1", &[], tiny.clone()).await;
        let (s3, k3, _) = h
            .post(
                "/telemetry/img",
                &[("content-type", "image/jpeg")],
                jpeg.clone(),
            )
            .await;
        assert_eq!(
            (s1, s2, s3),
            (
                StatusCode::ACCEPTED,
                StatusCode::ACCEPTED,
                StatusCode::ACCEPTED
            )
        );
        eventually(WAIT, "3 deliveries", || h.receiver.deliveries().len() >= 3).await;
        let d = h.receiver.deliveries();
        let by_key = |k: &Option<String>| d.iter().find(|x| Some(&x.key) == k.as_ref()).unwrap();
        let big = by_key(&k1);
        assert_eq!(big.content_encoding.as_deref(), Some("zstd"), "{version:?}");
        assert_eq!(big.body, body, "decoded body equals the original");
        assert!(
            big.wire_len * 3 < body.len(),
            "JSON compresses well: {} of {}",
            big.wire_len,
            body.len()
        );
        assert_eq!(big.class.as_deref(), Some("bulk"));
        assert_eq!(big.content_type.as_deref(), Some("application/json"));
        let small = by_key(&k2);
        assert_eq!(
            (small.content_encoding.as_deref(), &small.body),
            (None, &tiny),
            "tiny bodies go raw"
        );
        let img = by_key(&k3);
        assert_eq!(
            (img.content_encoding.as_deref(), &img.body),
            (None, &jpeg),
            "compressed types go raw"
        );
        // The receiver answers before the forwarder counts the ack.
        eventually(WAIT, "3 acks counted", || {
            h.saf.status_json()["totals"]["delivered"] == 3
        })
        .await;
        let st = h.saf.status_json();
        assert!(st["compression_ratio"].as_f64().unwrap() > 1.5, "{st}");
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_idempotency_key_is_kept_and_h2c_ingest_works() {
    let h = Harness::start(Options::default()).await;
    let (s, k, body) = h
        .post(
            "/telemetry/x",
            &[("idempotency-key", "app-key-1")],
            b"hello".to_vec(),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    assert_eq!(k.as_deref(), Some("app-key-1"));
    // Addressed by Host (the service name): the service's route prefix is prepended for
    // the path-routed cloud sidecar.
    let (s, _, body) = h
        .post("/v1/up", &[("host", "telemetry")], b"by host".to_vec())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    // h2c with prior knowledge on the same port.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = http::Request::post(format!("http://{}/telemetry/h2", h.ingest))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"via h2",
        )))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert!(resp.headers().contains_key("idempotency-key"));
    eventually(WAIT, "3 deliveries", || h.receiver.deliveries().len() >= 3).await;
    let d = h.receiver.deliveries();
    assert!(d.iter().any(|x| x.key == "app-key-1" && x.body == b"hello"));
    assert!(
        d.iter()
            .any(|x| x.path == "/telemetry/v1/up" && x.body == b"by host"),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.path == "/telemetry/h2" && x.body == b"via h2"),
        "{d:?}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_get_404_and_interactive_ones_409_unless_marked_deferrable() {
    let h = Harness::start(Options::default()).await;
    let (s, _, body) = h.post("/nowhere", &[], b"x".to_vec()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(body.contains("no mesh service"), "{body}");
    let (s, _, body) = h.post("/maps/tile", &[], b"x".to_vec()).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(body.contains("not deferrable"), "{body}");
    let (s, _, _) = h
        .post("/maps/tile", &[("x-misaki-defer", "1")], b"x".to_vec())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _, _) = h
        .post(
            "/telemetry/x",
            &[("idempotency-key", "has space")],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    eventually(WAIT, "the deferred maps request", || {
        h.receiver
            .deliveries()
            .iter()
            .any(|d| d.class.as_deref() == Some("standard"))
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fills_the_queue_and_it_drains_after_the_receiver_returns() {
    let h = Harness::start(Options::default()).await;
    h.receiver.set_status(503);
    let mut keys = Vec::new();
    for i in 0..200 {
        let (s, k, _) = h.post("/telemetry/t", &[], telemetry_json(1024, i)).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        keys.push(k.unwrap());
    }
    // Deliveries are tried, refused, and backed off: the queue holds everything.
    eventually(WAIT, "retries during the outage", || {
        h.saf.status_json()["totals"]["retried"].as_u64().unwrap() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = h.saf.status_json();
    assert_eq!(st["queue"]["messages"], 200, "{st}");
    assert_eq!(st["totals"]["delivered"], 0);
    let tries = h.receiver.deliveries().len();
    assert!(
        tries < 60,
        "backoff keeps retries few, not a hot loop: {tries}"
    );
    h.receiver.set_status(200);
    eventually(WAIT, "the queue to drain", || {
        h.saf.status_json()["queue"]["messages"] == 0
    })
    .await;
    let ok = h.receiver.ok_keys();
    for k in &keys {
        assert!(ok.contains_key(k), "key {k} delivered");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_gone_is_retried_until_it_listens_again() {
    let h = Harness::start(Options::default()).await;
    let addr = h.receiver.addr();
    h.receiver.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..20 {
        let (s, _, _) = h.post("/telemetry/t", &[], telemetry_json(512, i)).await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    eventually(WAIT, "connect errors counted as retries", || {
        h.saf.status_json()["totals"]["retried"].as_u64().unwrap() >= 1
    })
    .await;
    let back = misaki_saf::testkit::Receiver::start(addr, true)
        .await
        .unwrap();
    eventually(WAIT, "20 deliveries after the receiver came back", || {
        back.ok_keys().len() == 20
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_answers_507_and_an_oversized_body_413() {
    let h = Harness::start(Options {
        budget_bytes: 64 << 10,
        max_body_bytes: 16 << 10,
        all_up: false, // nothing drains: the budget fills
        ..Options::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(
            h.post("/telemetry/t", &[], telemetry_json(8 << 10, i))
                .await
                .0,
        );
    }
    assert_eq!(statuses[0], StatusCode::ACCEPTED);
    assert!(
        statuses.contains(&StatusCode::INSUFFICIENT_STORAGE),
        "{statuses:?}"
    );
    let first_full = statuses
        .iter()
        .position(|s| *s == StatusCode::INSUFFICIENT_STORAGE)
        .unwrap();
    assert!(
        statuses[first_full..]
            .iter()
            .all(|s| *s == StatusCode::INSUFFICIENT_STORAGE)
    );
    let (s, _, body) = h.post("/telemetry/t", &[], vec![b'x'; 17 << 10]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // Also without a content-length: a chunked body is cut off at the limit.
    let stream = futures_body(vec![b'y'; 40 << 10]);
    let req = http::Request::post(format!("http://{}/telemetry/c", h.ingest))
        .body(stream)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    h.shutdown().await;
}

/// A body of unknown length (chunked), so only the streaming limit can catch it.
fn futures_body(data: Vec<u8>) -> ChunkBody {
    ChunkBody(
        data.chunks(4096)
            .map(bytes::Bytes::copy_from_slice)
            .collect(),
    )
}

struct ChunkBody(std::collections::VecDeque<bytes::Bytes>);

impl hyper::body::Body for ChunkBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_400_is_dead_lettered_and_not_retried() {
    let h = Harness::start(Options::default()).await;
    h.receiver.set_path_status("/telemetry/bad", 400);
    let (s, bad_key, _) = h.post("/telemetry/bad", &[], b"{\"v\":1}".to_vec()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (_, good_key, _) = h.post("/telemetry/good", &[], b"{\"v\":2}".to_vec()).await;
    eventually(WAIT, "the good one delivered", || {
        h.receiver
            .ok_keys()
            .contains_key(good_key.as_ref().unwrap())
    })
    .await;
    eventually(WAIT, "a dead letter", || {
        h.saf.dead_letters_json()["dead_letters"]
            .as_array()
            .unwrap()
            .len()
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bad_tries = h
        .receiver
        .deliveries()
        .iter()
        .filter(|d| Some(&d.key) == bad_key.as_ref())
        .count();
    assert_eq!(bad_tries, 1, "a 400 is never retried");
    let dl = h.saf.dead_letters_json();
    let d = &dl["dead_letters"][0];
    assert_eq!(d["idempotency_key"].as_str(), bad_key.as_deref());
    assert_eq!(d["status"], 400);
    assert_eq!(d["path"], "/telemetry/bad");
    let resp = h
        .saf
        .admin_response(&http::Method::GET, "/deadletters")
        .expect("the local API answers /deadletters");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(h.saf.status_json()["queue"]["messages"], 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_waits_while_wifi_is_down_and_flows_when_it_comes_up() {
    let h = Harness::start(Options {
        all_up: false,
        ..Options::default()
    })
    .await;
    // LTE up, Wi-Fi down: `standard` may go (wifi, lte), `bulk` may not (wifi only).
    h.uplinks.set_up("lte", true);
    for i in 0..10 {
        assert_eq!(
            h.post("/telemetry/t", &[], telemetry_json(600, i)).await.0,
            StatusCode::ACCEPTED
        );
    }
    let (s, _, _) = h
        .post("/maps/t", &[("x-misaki-defer", "1")], b"m".to_vec())
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    eventually(WAIT, "the standard message over lte", || {
        h.receiver.deliveries().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = h.receiver.deliveries();
    assert_eq!(d.len(), 1, "no bulk while wifi is down: {d:?}");
    assert_eq!(d[0].class.as_deref(), Some("standard"));
    assert_eq!(h.saf.status_json()["queue"]["messages"], 10);
    h.uplinks.set_up("wifi", true);
    eventually(WAIT, "bulk drained over wifi", || {
        h.receiver.ok_keys().len() == 11
    })
    .await;
    h.shutdown().await;
}
