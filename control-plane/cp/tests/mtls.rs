//! misaki-cp with mutual TLS on its gRPC port, in process, against real gRPC clients
//! (tonic over rustls, with client certificates). Every certificate comes from
//! misaki-cp's own CA code (`misaki_cp::ca`, what `misaki-cp ca` runs).
//!
//! Timing: waits have generous timeouts (the machine is shared); the only deliberate
//! delays are the 1 s handshake timeout and the file watcher.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Ads, CDS, PATIENCE, Pki, car, fetch, node, start, wait_until};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use misaki_cp::ca::{Ca, Subject};
use misaki_identity::TrustDomain;
use misaki_proto::fleet_v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// The report sender (the stream ends when it is dropped) and the control stream.
type Report = (
    mpsc::Sender<pb::VehicleReport>,
    Streaming<pb::ControlMessage>,
);

/// Open a fleet report stream that says Hello as `vehicle`.
async fn report_as(channel: Channel, vehicle: &str) -> Result<Report, Status> {
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        vehicle_id: vehicle.into(),
        heartbeat_interval_ms: 1000,
        ..Default::default()
    };
    tx.send(pb::VehicleReport {
        seq: 1,
        observed_unix_ms: 1,
        report: Some(pb::vehicle_report::Report::Hello(hello)),
    })
    .await
    .unwrap();
    let stream = pb::fleet_service_client::FleetServiceClient::new(channel)
        .report(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vehicle_gets_its_config_and_is_listed_with_its_certificate_identity() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let cp = start(&pki, None).await;
    // node.id is free per sidecar; the effective vehicle id is what must match.
    let sidecar = node("car-1-sidecar", "vehicle", Some("car-1"));
    let _ads = fetch(&cp, &pki, Some(&pki.path("car-1")), sidecar)
        .await
        .expect("car-1 gets its clusters");
    let nodes = cp.json("/nodes").await;
    assert_eq!(nodes["streams"][0]["node_id"], "car-1-sidecar");
    assert_eq!(
        nodes["streams"][0]["identity"],
        "spiffe://misaki.local/vehicle/car-1"
    );

    let channel = cp.channel(&pki, Some(&pki.path("car-1"))).await.unwrap();
    let (_tx, mut control) = report_as(channel, "car-1")
        .await
        .expect("reports as itself");
    control.message().await.unwrap().expect("an ack");
    let fleet = cp.json("/fleet/car-1").await;
    assert_eq!(fleet["identity"], "spiffe://misaki.local/vehicle/car-1");
    assert_eq!(
        cp.metric("misaki_tls_handshakes_total{result=\"ok\"}")
            .await,
        2
    );

    // A cloud identity gets the cloud sidecar's config.
    pki.issue("maps", Subject::Cloud("maps".into()));
    fetch(
        &cp,
        &pki,
        Some(&pki.path("maps")),
        node("maps-1", "cloud", None),
    )
    .await
    .expect("a cloud sidecar gets its config");
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_other_cas_expired_and_revoked_certificates_are_refused_in_the_handshake() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let revoked = pki
        .ca
        .issue(&Subject::Vehicle("car-r".into()), Duration::from_secs(3600))
        .unwrap();
    revoked.write(&pki.path("car-r")).unwrap();
    let crl = pki.ca.revoke(&revoked.serial_hex).unwrap();
    let now = time::OffsetDateTime::now_utc();
    pki.ca
        .issue_between(
            &Subject::Vehicle("car-old".into()),
            now - time::Duration::hours(2),
            now - time::Duration::minutes(1),
        )
        .unwrap()
        .write(&pki.path("car-old"))
        .unwrap();
    let other = Ca::init(
        &pki.path("other-ca"),
        TrustDomain::default(),
        Duration::from_secs(7200),
    )
    .unwrap();
    other
        .issue(&Subject::Vehicle("car-1".into()), Duration::from_secs(600))
        .unwrap()
        .write(&pki.path("car-1-other"))
        .unwrap();
    let cp = start(&pki, Some(crl)).await;

    // Plaintext gRPC on the TLS port.
    let plain = Channel::from_shared(format!("http://{}", cp.xds))
        .unwrap()
        .connect()
        .await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => Ads::open(ch, node("car-1", "vehicle", None)).await.is_err(),
    };
    assert!(refused, "plaintext was served");
    for (dir, id, label) in [
        ("car-1-other", "car-1", "unknown_ca"),
        ("car-old", "car-old", "expired"),
        ("car-r", "car-r", "revoked"),
    ] {
        let e = car(&cp, &pki, dir, id)
            .await
            .err()
            .unwrap_or_else(|| panic!("{dir} was served"));
        // The client may see the alert before the server has counted it.
        let series = format!("misaki_tls_handshakes_total{{result=\"{label}\"}}");
        wait_until(&format!("{dir} refused as {label}: {e}"), || async {
            cp.metric(&series).await >= 1
        })
        .await;
    }
    // No client certificate at all.
    assert!(
        fetch(&cp, &pki, None, node("car-1", "vehicle", None))
            .await
            .is_err()
    );
    wait_until("refused as no_certificate", || async {
        cp.metric("misaki_tls_handshakes_total{result=\"no_certificate\"}")
            .await
            >= 1
    })
    .await;
    assert!(
        cp.metric("misaki_tls_handshakes_total{result=\"protocol\"}")
            .await
            >= 1
    );
    // The good certificate still works.
    let _ads = car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("car-1 served");
    assert_eq!(
        cp.json("/nodes").await["streams"].as_array().unwrap().len(),
        1
    );
}

fn denied(e: &str, code: Code) -> bool {
    e.contains(&format!("{code:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_for_one_vehicle_can_neither_fetch_nor_report_for_another() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    pki.issue("claim-1", Subject::Claim("car-1".into()));
    pki.issue("maps", Subject::Cloud("maps".into()));
    let cp = start(&pki, None).await;

    // node.metadata.vehicle_id says car-2.
    let e = fetch(
        &cp,
        &pki,
        Some(&pki.path("car-1")),
        node("car-1", "vehicle", Some("car-2")),
    )
    .await
    .err()
    .expect("spoofed vehicle refused");
    assert!(denied(&e, Code::PermissionDenied), "{e}");
    assert!(
        e.contains("spiffe://misaki.local/vehicle/car-1") && e.contains("\\\"car-2\\\""),
        "the message names both: {e}"
    );
    // node.id says car-2 (no metadata), a cloud role, a claim credential.
    for (dir, n) in [
        ("car-1", node("car-2", "vehicle", None)),
        ("car-1", node("car-1", "cloud", None)),
        ("maps", node("car-1", "vehicle", None)),
        ("claim-1", node("car-1", "vehicle", None)),
    ] {
        let e = fetch(&cp, &pki, Some(&pki.path(dir)), n)
            .await
            .err()
            .expect("refused");
        assert!(denied(&e, Code::PermissionDenied), "{dir}: {e}");
    }

    // Delta xDS is held to the same rule.
    let channel = cp.channel(&pki, Some(&pki.path("car-1"))).await.unwrap();
    let (tx, requests) = mpsc::channel(1);
    let first = DeltaDiscoveryRequest {
        node: Some(node("car-2", "vehicle", None)),
        type_url: CDS.into(),
        ..Default::default()
    };
    tx.send(first).await.unwrap();
    let mut delta = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(requests))
        .await
        .expect("stream opened")
        .into_inner();
    let status = delta.message().await.expect_err("delta refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A fleet report as car-2 with car-1's certificate, or as car-1 with its claim.
    for (dir, vehicle) in [("car-1", "car-2"), ("claim-1", "car-1")] {
        let channel = cp.channel(&pki, Some(&pki.path(dir))).await.unwrap();
        let status = report_as(channel, vehicle)
            .await
            .expect_err("report refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{dir}: {status:?}");
        assert!(status.message().contains(vehicle), "{status:?}");
    }
    // Every refused ADS stream is counted (six above; fleet reports are not ADS).
    assert_eq!(cp.metric("misaki_xds_identity_denied_total").await, 6);
    let fleet = cp.json("/fleet").await;
    assert_eq!(fleet["total"], 0, "nothing reached the registry: {fleet}");
    assert!(
        cp.json("/nodes").await["streams"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Append a cloud service to the policy: a new cluster for every vehicle.
fn add_service(policy: &Path, name: &str) {
    let mut text = std::fs::read_to_string(policy).unwrap();
    text.push_str(&format!(
        "  - {{ name: {name}, location: cloud, port: 8080, endpoints: [\"127.0.0.1:18081\"], routes: [\"/{name}\"], class: standard }}\n"
    ));
    let tmp = policy.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, policy).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_on_disk_keeps_valid_streams_and_a_new_crl_cuts_revoked_ones() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let car2 = pki
        .ca
        .issue(&Subject::Vehicle("car-2".into()), Duration::from_secs(3600))
        .unwrap();
    car2.write(&pki.path("car-2")).unwrap();
    // The CRL file serve reads: one CRL per trusted CA (`ca init` writes an empty one).
    let crls = pki.path("crls.pem");
    let bundle = |files: &[&str]| {
        let text = files
            .iter()
            .map(|f| std::fs::read_to_string(pki.path(f)).unwrap());
        text.collect::<String>()
    };
    std::fs::write(&crls, bundle(&["ca/crl.pem"])).unwrap();
    let cp = start(&pki, Some(crls.clone())).await;
    let mut one = car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("car-1 connects");
    let mut two = car(&cp, &pki, "car-2", "car-2")
        .await
        .expect("car-2 connects");

    // New server certificate and key, and a client CA bundle that adds a second CA.
    pki.issue("server", Subject::Server(vec!["localhost".into()]));
    let next = Ca::init(
        &pki.path("next-ca"),
        TrustDomain::default(),
        Duration::from_secs(7200),
    )
    .unwrap();
    next.issue(&Subject::Vehicle("car-3".into()), Duration::from_secs(600))
        .unwrap()
        .write(&pki.path("car-3"))
        .unwrap();
    let both_crls = bundle(&["ca/crl.pem", "next-ca/crl.pem"]);
    misaki_cp::ca::write_atomic(&crls, both_crls.as_bytes(), 0o644).unwrap();
    let both_cas = bundle(&["ca/ca.pem", "next-ca/ca.pem"]);
    misaki_cp::ca::write_atomic(&pki.path("clients-ca.pem"), both_cas.as_bytes(), 0o644).unwrap();
    wait_until("the TLS files reloaded", || async {
        cp.metric("misaki_tls_reloads_total{result=\"ok\"}").await >= 1
            && car(&cp, &pki, "car-3", "car-3").await.is_ok()
    })
    .await;
    // The established streams are still served: a policy edit reaches them.
    add_service(&cp.policy, "weather");
    for ads in [&mut one, &mut two] {
        let pushed = ads.next().await.expect("still connected after rotation");
        assert!(pushed.resources.len() > 1, "{pushed:?}");
    }
    assert_eq!(
        cp.metric("misaki_tls_connections_closed_total{reason=\"revoked\"}")
            .await,
        0
    );

    // Revoking car-2 closes its stream, and only its.
    pki.ca.revoke(&car2.serial_hex).unwrap();
    let both_crls = bundle(&["ca/crl.pem", "next-ca/crl.pem"]);
    misaki_cp::ca::write_atomic(&crls, both_crls.as_bytes(), 0o644).unwrap();
    let cut = tokio::time::timeout(PATIENCE, async {
        loop {
            if two.next().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "car-2's stream outlived its revocation");
    assert_eq!(
        cp.metric("misaki_tls_connections_closed_total{reason=\"revoked\"}")
            .await,
        1
    );
    add_service(&cp.policy, "radar");
    one.next().await.expect("car-1 keeps being served");
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_and_garbage_time_out_without_blocking_other_clients() {
    let pki = Pki::new();
    pki.issue("car-1", Subject::Vehicle("car-1".into()));
    let cp = start(&pki, None).await;
    // Both handshake permits taken by clients that never speak.
    let stalled = [
        tokio::net::TcpStream::connect(cp.xds).await.unwrap(),
        tokio::net::TcpStream::connect(cp.xds).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cp.metric("misaki_tls_handshakes_in_flight").await, 2);
    let started = std::time::Instant::now();
    car(&cp, &pki, "car-1", "car-1")
        .await
        .expect("served once a permit frees up");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        cp.metric("misaki_tls_handshakes_total{result=\"timeout\"}")
            .await,
        2
    );
    drop(stalled);

    let mut garbage = tokio::net::TcpStream::connect(cp.xds).await.unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .await
        .unwrap();
    garbage.write_all(&[0u8; 64]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, garbage.read_to_end(&mut buf)).await;
    wait_until("garbage counted", || async {
        cp.metric("misaki_tls_handshakes_total{result=\"protocol\"}")
            .await
            + cp.metric("misaki_tls_handshakes_total{result=\"timeout\"}")
                .await
            >= 3
    })
    .await;
}
