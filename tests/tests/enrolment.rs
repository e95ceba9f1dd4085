//! Vehicle enrolment end to end: the real `edge-netd` and the real `misaki-cp` serving
//! mutual TLS with enrolment (`--ca`, `--crl`) and 20-second certificates, so renewal
//! happens during the test.
//!
//! A vehicle holding only its claim credential and the fleet CA makes its key, enrols
//! over `EnrollmentService.Enroll`, reports over mutual TLS as
//! `spiffe://misaki.local/vehicle/car-1`, renews at 40-60 % of the lifetime presenting
//! its certificate (reconnecting the fleet stream with it) and keeps reporting; the
//! files are a matching pair, the key 0600 and nowhere on the control plane's side.
//! Parked past its certificate's expiry, it enrols again with the claim. A vehicle with
//! neither a certificate nor a claim reports nothing, and `/readyz` says why.
//!
//! Everything on loopback: the uplink is `lo` (probed against misaki-cp's UDP echo), no
//! network namespace. Timing is asserted only as generous bounds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use misaki_e2e::http;
use misaki_e2e::policy::{CloudService, MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::wait_for;
use misaki_e2e::tls::FleetCa;
use misaki_e2e::{ControlPlane, Process, free_port, target_bin};

/// `--enrol-valid-for`: renewal is due 8-12 s after each certificate arrives.
const VALID_FOR_S: u64 = 20;
const LONG: Duration = Duration::from_secs(60);
const CAR1: &str = "spiffe://misaki.local/vehicle/car-1";

/// The CA, misaki-cp's certificate for 127.0.0.1 and localhost, a claim for car-1, and
/// misaki-cp serving mutual TLS with enrolment.
struct Fleet {
    dir: tempfile::TempDir,
    ca: FleetCa,
    cp: ControlPlane,
    probe: String,
}

fn fleet() -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let server = dir.path().join("server");
    ca.issue(&["--server", "localhost", "127.0.0.1"], &server);
    // Not the claim's default (87600h, the CA's own lifetime): issued a moment after
    // the CA, it would outlive it, which `ca issue` refuses.
    let claim = ["--claim", "car-1", "--valid-for", "8760h"];
    ca.issue(&claim, &dir.path().join("claim"));
    let upstream = free_port();
    let service = CloudService {
        name: "maps",
        upstream,
        route: "/maps",
        class: "standard",
    };
    let policy = dir.path().join("mesh.yaml");
    let doc = policy_doc(&MeshPorts::fresh(), WIFI_STANDARD, &[service]);
    fs::write(&policy, doc).expect("write policy");
    let probe = format!("127.0.0.1:{}", free_port());
    let mut args = ca.serve_args(&server);
    let valid_for = format!("{VALID_FOR_S}s");
    args.extend([
        "--enrol-valid-for".into(),
        valid_for,
        "--probe-addr".into(),
        probe.clone(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &args);
    Fleet { dir, ca, cp, probe }
}

/// One vehicle's edge-netd and its files.
struct Vehicle {
    proc: Option<Process>,
    config: PathBuf,
    tls: PathBuf,
    api: u16,
    starts: u32,
    dir: PathBuf,
}

impl Fleet {
    /// edge-netd for `id`, dialling misaki-cp at `host`, with the claim in `claim/`
    /// when `claim` (else no claim credential at all).
    fn vehicle(&self, id: &str, host: &str, claim: bool) -> Vehicle {
        let dir = self.dir.path().join(id);
        let tls = dir.join("tls");
        fs::create_dir_all(&tls).expect("vehicle dir");
        let api = free_port();
        let claim_dir = self.dir.path().join("claim");
        let claim_lines = if claim {
            format!(
                "  claim_cert: {c}/cert.pem\n  claim_key: {c}/key.pem\n",
                c = claim_dir.display()
            )
        } else {
            String::new()
        };
        let tls_lines = format!(
            "tls:\n\
             \x20 ca: {ca}\n\
             \x20 cert: {tls}/cert.pem\n\
             \x20 key: {tls}/key.pem\n\
             {claim_lines}",
            // The fleet CA as the factory put it next to the claim.
            ca = claim_dir.join("ca.pem").display(),
            tls = tls.display(),
        );
        let text = misaki_e2e::process::netd_config_on_lo(
            id,
            &format!("https://{host}:{}", self.cp.xds_port),
            api,
            &dir.join("state"),
            &self.probe,
            &tls_lines,
        );
        let config = dir.join("edge-netd.yaml");
        fs::write(&config, text).expect("write edge-netd config");
        Vehicle {
            proc: None,
            config,
            tls,
            api,
            starts: 0,
            dir,
        }
    }

    /// misaki-cp's `/fleet/{id}` while it knows the vehicle.
    fn fleet_vehicle(&self, id: &str) -> Option<serde_json::Value> {
        let r = http::get(self.cp.admin_port, &format!("/fleet/{id}")).ok()?;
        (r.status == 200).then(|| serde_json::from_str(&r.body).ok())?
    }

    /// A counter of misaki-cp's `/metrics` (0 when absent).
    fn cp_metric(&self, line_prefix: &str) -> u64 {
        metric(&self.cp.admin("/metrics").body, line_prefix)
    }
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

impl Vehicle {
    fn start(&mut self) {
        self.starts += 1;
        let log = self.dir.join(format!("edge-netd-{}.log", self.starts));
        let mut cmd = Command::new(target_bin("edge-netd"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info");
        self.proc = Some(Process::spawn("edge-netd", &mut cmd, log));
    }

    fn stop(&mut self) {
        self.proc.take();
    }

    fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default()
    }

    fn files(&self) -> Option<(String, String)> {
        let cert = fs::read_to_string(self.tls.join("cert.pem")).ok()?;
        let key = fs::read_to_string(self.tls.join("key.pem")).ok()?;
        Some((cert, key))
    }

    fn readyz(&self) -> Option<http::Reply> {
        http::get(self.api, "/readyz").ok()
    }

    fn metric(&self, line_prefix: &str) -> u64 {
        let body = http::get(self.api, "/metrics")
            .map(|r| r.body)
            .unwrap_or_default();
        metric(&body, line_prefix)
    }
}

/// A certificate's subject public key bits and its expiry.
fn cert_key_and_expiry(pem: &str) -> (Vec<u8>, SystemTime) {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = block.parse_x509().expect("X.509");
    let not_after = cert.validity().not_after.timestamp();
    (
        cert.public_key().subject_public_key.data.to_vec(),
        UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).expect("after 1970")),
    )
}

fn key_public(pem: &str) -> Vec<u8> {
    rcgen::KeyPair::from_pem(pem)
        .expect("PKCS#8 key")
        .public_key_raw()
        .to_vec()
}

/// The files are a pair and the key is 0600.
fn assert_pair(v: &Vehicle, cert: &str, key: &str) {
    assert_eq!(
        cert_key_and_expiry(cert).0,
        key_public(key),
        "cert.pem is key.pem's"
    );
    let mode = fs::metadata(v.tls.join("key.pem"))
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// No file on the control plane's side holds the vehicle's private key.
fn assert_key_stayed(fleet: &Fleet, key: &str) {
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let mut stack = vec![fleet.ca.dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read CA dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let flat: String = text.lines().collect();
                assert!(
                    !flat.contains(&body),
                    "{} holds the vehicle's key",
                    path.display()
                );
            }
        }
    }
}

/// Waits until misaki-cp shows the vehicle online with `identity`, reporting anew
/// after `since` (unix ms).
fn wait_reporting(fleet: &Fleet, v: &Vehicle, id: &str, identity: &str, since: u64) {
    let ok = wait_for(LONG, || {
        let j = fleet.fleet_vehicle(id)?;
        let fresh = j["last_observed_unix_ms"].as_u64()? > since;
        (j["online"] == true && j["identity"] == identity && fresh).then_some(())
    });
    assert!(
        ok.is_some(),
        "{id} not reporting as {identity}: {:?}\n{}",
        fleet.fleet_vehicle(id),
        v.log()
    );
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[test]
fn a_claimed_vehicle_enrols_reports_renews_and_enrols_again_after_expiry() {
    let fleet = fleet();
    let mut v = fleet.vehicle("car-1", "127.0.0.1", true);
    v.start();

    // Enrolment with the claim: the pair appears, then /readyz, then the reports.
    let first =
        wait_for(LONG, || v.files()).unwrap_or_else(|| panic!("no enrolment:\n{}", v.log()));
    let enrolled_at = Instant::now();
    let ready = wait_for(LONG, || (v.readyz()?.status == 200).then_some(()));
    assert!(
        ready.is_some(),
        "not ready: {:?}\n{}",
        v.readyz().map(|r| r.body),
        v.log()
    );
    wait_reporting(&fleet, &v, "car-1", CAR1, 0);
    assert_pair(&v, &first.0, &first.1);
    assert_key_stayed(&fleet, &first.1);
    assert_eq!(
        v.metric("edge_netd_enrolments_total{how=\"claim\",result=\"ok\"} "),
        1
    );
    let (_, first_expiry) = cert_key_and_expiry(&first.0);
    let shown = v.metric("edge_netd_cert_not_after_seconds ");
    assert_eq!(
        shown,
        first_expiry.duration_since(UNIX_EPOCH).unwrap().as_secs()
    );

    // Renewal: a new pair at 40-60 % of 20 s (bounds widened for a busy machine),
    // before the first expires; the stream reconnects with it and keeps reporting.
    let renewed = wait_for(LONG, || {
        v.files().filter(|f| f.0 != first.0 && f.1 != first.1)
    })
    .unwrap_or_else(|| panic!("no renewal:\n{}", v.log()));
    let after = enrolled_at.elapsed();
    assert!(
        after >= Duration::from_secs(5) && after <= Duration::from_secs(15),
        "renewed {after:?} after enrolment"
    );
    assert!(SystemTime::now() < first_expiry, "renewed before expiry");
    assert_pair(&v, &renewed.0, &renewed.1);
    assert_key_stayed(&fleet, &renewed.1);
    let ok = wait_for(LONG, || {
        (v.metric("edge_netd_reporter_connects_total{result=\"ok\"} ") >= 2).then_some(())
    });
    assert!(
        ok.is_some(),
        "the stream did not reconnect with the new certificate:\n{}",
        v.log()
    );
    wait_reporting(&fleet, &v, "car-1", CAR1, unix_ms());
    assert_eq!(
        v.metric("edge_netd_enrolments_total{how=\"renew\",result=\"ok\"} "),
        1
    );
    assert!(fleet.cp_metric("misaki_enrolments_total{caller=\"vehicle\",result=\"issued\"} ") >= 1);

    // Parked past not_after: at the next start the certificate has expired, and the
    // claim enrols again (misaki-cp allows it: nothing it issued is live).
    v.stop();
    let (cert, _) = v.files().expect("files");
    let (_, expiry) = cert_key_and_expiry(&cert);
    let parked = expiry.duration_since(SystemTime::now()).unwrap_or_default();
    std::thread::sleep(parked + Duration::from_secs(1));
    let stopped_at = unix_ms();
    v.config = {
        // This time dial misaki-cp by name: its certificate's DNS SAN is checked.
        let text = fs::read_to_string(&v.config).expect("config");
        let text = text.replace("https://127.0.0.1:", "https://localhost:");
        fs::write(&v.config, text).expect("config");
        v.config.clone()
    };
    v.start();
    let again = wait_for(LONG, || v.files().filter(|f| f.0 != cert))
        .unwrap_or_else(|| panic!("no second enrolment:\n{}", v.log()));
    wait_reporting(&fleet, &v, "car-1", CAR1, stopped_at);
    assert_pair(&v, &again.0, &again.1);
    assert!(cert_key_and_expiry(&again.0).1 > SystemTime::now());
    assert_eq!(
        v.metric("edge_netd_enrolments_total{how=\"claim\",result=\"ok\"} "),
        1
    );
    assert_eq!(
        fleet.cp_metric("misaki_enrolments_total{caller=\"claim\",result=\"issued\"} "),
        2
    );
    assert!(v.log().contains("expired"), "{}", v.log());
}

#[test]
fn a_vehicle_without_certificate_or_claim_reports_nothing_and_says_why() {
    let fleet = fleet();
    let mut v = fleet.vehicle("car-2", "127.0.0.1", false);
    v.start();
    let why = wait_for(LONG, || {
        let r = v.readyz()?;
        (r.status == 503 && r.body.contains("no claim credential")).then_some(r.body)
    });
    assert!(
        why.is_some(),
        "{:?}\n{}",
        v.readyz().map(|r| r.body),
        v.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(fleet.fleet_vehicle("car-2").is_none(), "nothing reported");
    assert!(v.files().is_none());
    assert_eq!(v.metric("edge_netd_cert_not_after_seconds "), 0);
    assert!(Path::new(&v.config).exists());
}
