//! Store-and-forward to an `https://` destination over mutual TLS: real rustls on both
//! sides, real sockets on 127.0.0.1, certificates from test CAs made here with rcgen
//! (the fleet's SAN rules: one URI SAN, `spiffe://misaki.local/{vehicle,cloud}/NAME`).
//! Uplinks carry no interface, as in forwarding.rs: binding to `lo` needs CAP_NET_RAW.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Harness, Options, eventually};
use http::StatusCode;
use misaki_saf::{ClientIdentity, HttpVersion};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(20);
const TD: &str = "misaki.local";

/// A test CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
    der: Vec<u8>,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A fleet identity certificate (clientAuth and serverAuth, as `misaki-cp ca issue`
/// makes them), valid until `not_after` (default: far off).
fn leaf(ca: &Ca, uri: &str, not_after: Option<OffsetDateTime>) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, uri);
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if let Some(t) = not_after {
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = t;
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn identity(ca: &Ca, vehicle: &Leaf) -> Option<Arc<ClientIdentity>> {
    Some(Arc::new(ClientIdentity {
        cert_chain_pem: vehicle.cert.clone(),
        key_pem: vehicle.key.clone(),
        ca_pem: ca.pem.clone(),
        trust_domain: TD.into(),
    }))
}

/// The cloud sidecar's listener: `server` served, client certificates of `client_ca`.
fn server(server: &Leaf, client_ca: &Ca) -> Arc<rustls::ServerConfig> {
    misaki_saf::testkit::server_tls_config(&server.cert, &server.key, &client_ca.pem).unwrap()
}

fn cloud(ca: &Ca) -> Leaf {
    leaf(ca, "spiffe://misaki.local/cloud/ingest", None)
}

fn car1(ca: &Ca) -> Leaf {
    leaf(ca, "spiffe://misaki.local/vehicle/car-1", None)
}

async fn start(ca: &Ca, served: &Leaf, version: HttpVersion) -> Harness {
    Harness::start(Options {
        version,
        tls: Some(server(served, ca)),
        ..Options::default()
    })
    .await
}

fn class_error(h: &Harness) -> String {
    h.saf.status_json()["classes"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn retried(h: &Harness) -> u64 {
    h.saf.status_json()["totals"]["retried"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_is_delivered_over_mutual_tls_presenting_the_vehicle_certificate() {
    let ca = new_ca("fleet CA");
    let vehicle = car1(&ca);
    for (version, wire) in [
        (HttpVersion::Http2, "HTTP/2.0"),
        (HttpVersion::Http1, "HTTP/1.1"),
    ] {
        let h = start(&ca, &cloud(&ca), version).await;
        h.saf.set_identity(identity(&ca, &vehicle)).unwrap();
        let body = common::telemetry_json(4 << 10, 1);
        let (s, key, _) = h.post("/telemetry/up", &[], body.clone()).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        eventually(WAIT, "delivery over TLS", || {
            h.receiver.deliveries().len() == 1
        })
        .await;
        let d = &h.receiver.deliveries()[0];
        assert_eq!(
            d.peer_uri.as_deref(),
            Some("spiffe://misaki.local/vehicle/car-1")
        );
        assert_eq!(d.peer_cert.as_deref(), Some(&vehicle.der[..]));
        assert_eq!((d.version.as_str(), &d.body), (wire, &body), "{version:?}");
        assert_eq!(Some(&d.key), key.as_ref());
        eventually(WAIT, "the ack", || {
            h.saf.status_json()["queue"]["messages"] == 0
        })
        .await;
        let st = h.saf.status_json();
        assert_eq!(
            st["tls_identity"]["id"], "spiffe://misaki.local/vehicle/car-1",
            "{st}"
        );
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_another_ca_or_with_a_vehicle_identity_is_refused_and_the_message_waits() {
    let ca = new_ca("fleet CA");
    let other = new_ca("another CA");
    // Another CA's certificate for a cloud identity: the chain fails.
    let h = start(&ca, &cloud(&other), HttpVersion::Http2).await;
    h.saf.set_identity(identity(&ca, &car1(&ca))).unwrap();
    let (s, key, _) = h.post("/telemetry/up", &[], b"{\"v\":1}".to_vec()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    eventually(WAIT, "refused handshakes", || {
        h.receiver.tls_handshake_failures() >= 2 && retried(&h) >= 2
    })
    .await;
    let err = class_error(&h);
    assert!(err.contains("UnknownIssuer"), "{err}");
    // The fleet CA's certificate, but a vehicle's (it carries serverAuth too).
    let impostor = leaf(&ca, "spiffe://misaki.local/vehicle/car-9", None);
    h.receiver.set_tls_config(server(&impostor, &ca));
    let before = h.receiver.tls_handshake_failures();
    eventually(WAIT, "the impostor refused", || {
        h.receiver.tls_handshake_failures() >= before + 2
            && class_error(&h).contains("not a cloud identity")
    })
    .await;
    let err = class_error(&h);
    assert!(
        err.contains("spiffe://misaki.local/vehicle/car-9"),
        "names what it saw: {err}"
    );
    let st = h.saf.status_json();
    assert!(h.receiver.deliveries().is_empty());
    assert_eq!(st["queue"]["messages"], 1, "{st}");
    assert_eq!(st["totals"]["dead_lettered"], 0, "{st}");
    // Fixed: the message goes.
    h.receiver.set_tls_config(server(&cloud(&ca), &ca));
    eventually(WAIT, "delivery once the server is fixed", || {
        h.receiver.ok_keys().contains_key(key.as_ref().unwrap())
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_identity_nothing_is_attempted_and_it_goes_once_one_is_set() {
    let ca = new_ca("fleet CA");
    let h = start(&ca, &cloud(&ca), HttpVersion::Http2).await;
    let (s, key, _) = h.post("/telemetry/up", &[], b"{\"v\":1}".to_vec()).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    eventually(WAIT, "deliveries put off", || retried(&h) >= 2).await;
    let err = class_error(&h);
    assert!(err.contains("no vehicle certificate"), "{err}");
    assert_eq!(
        h.receiver.tls_handshake_failures(),
        0,
        "no connection tried"
    );
    assert!(h.receiver.deliveries().is_empty());
    let st = h.saf.status_json();
    assert_eq!(st["queue"]["messages"], 1, "{st}");
    assert_eq!(st["totals"]["dead_lettered"], 0, "{st}");
    assert!(st["tls_identity"].is_null(), "{st}");
    h.saf.set_identity(identity(&ca, &car1(&ca))).unwrap();
    eventually(WAIT, "delivery after the identity arrived", || {
        h.receiver.ok_keys().contains_key(key.as_ref().unwrap())
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_presented_by_the_next_connection_and_old_ones_close() {
    let ca = new_ca("fleet CA");
    let h = start(&ca, &cloud(&ca), HttpVersion::Http2).await;
    let (old, new) = (car1(&ca), car1(&ca));
    let (tx, rx) = tokio::sync::watch::channel(identity(&ca, &old));
    tokio::spawn({
        let saf = h.saf.clone();
        async move { saf.follow_identity(rx).await }
    });
    h.post("/telemetry/a", &[], b"a".to_vec()).await;
    eventually(WAIT, "the first delivery", || {
        h.receiver.deliveries().len() == 1
    })
    .await;
    assert_eq!(
        h.receiver.deliveries()[0].peer_cert.as_deref(),
        Some(&old.der[..])
    );
    assert_eq!(h.receiver.open_tls_connections(), vec![old.der.clone()]);
    tx.send(identity(&ca, &new)).unwrap();
    eventually(WAIT, "the old certificate's connection closed", || {
        !h.receiver.open_tls_connections().contains(&old.der)
    })
    .await;
    h.post("/telemetry/b", &[], b"b".to_vec()).await;
    eventually(WAIT, "the second delivery", || {
        h.receiver.deliveries().len() == 2
    })
    .await;
    let d = &h.receiver.deliveries()[1];
    assert_eq!(d.peer_cert.as_deref(), Some(&new.der[..]));
    assert_eq!(
        d.peer_uri.as_deref(),
        Some("spiffe://misaki.local/vehicle/car-1")
    );
    // A bad value is refused and the renewed certificate stays in use.
    tx.send(Some(Arc::new(ClientIdentity {
        key_pem: old.key.clone(),
        ..(*identity(&ca, &new).unwrap()).clone()
    })))
    .unwrap();
    h.post("/telemetry/c", &[], b"c".to_vec()).await;
    eventually(WAIT, "the third delivery", || {
        h.receiver.deliveries().len() == 3
    })
    .await;
    assert_eq!(
        h.receiver.deliveries()[2].peer_cert.as_deref(),
        Some(&new.der[..])
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_not_used_and_its_connections_close() {
    let ca = new_ca("fleet CA");
    let h = start(&ca, &cloud(&ca), HttpVersion::Http2).await;
    // Long enough to deliver once on a busy machine, short enough for a test.
    let soon = OffsetDateTime::now_utc() + time::Duration::seconds(5);
    let short = leaf(&ca, "spiffe://misaki.local/vehicle/car-1", Some(soon));
    h.saf.set_identity(identity(&ca, &short)).unwrap();
    h.post("/telemetry/a", &[], b"a".to_vec()).await;
    eventually(WAIT, "delivery before expiry", || {
        h.receiver.deliveries().len() == 1
    })
    .await;
    assert_eq!(h.receiver.open_tls_connections().len(), 1);
    eventually(WAIT, "its connection closed at expiry", || {
        h.receiver.open_tls_connections().is_empty()
    })
    .await;
    assert!(OffsetDateTime::now_utc() >= soon - time::Duration::seconds(1));
    let (_, key, _) = h.post("/telemetry/b", &[], b"b".to_vec()).await;
    eventually(WAIT, "deliveries put off", || {
        class_error(&h).contains("expired")
    })
    .await;
    assert_eq!(h.receiver.deliveries().len(), 1);
    assert_eq!(
        h.receiver.tls_handshake_failures(),
        0,
        "no connection tried"
    );
    h.saf.set_identity(identity(&ca, &car1(&ca))).unwrap();
    eventually(WAIT, "delivery with the renewed certificate", || {
        h.receiver.ok_keys().contains_key(key.as_ref().unwrap())
    })
    .await;
    h.shutdown().await;
}
