//! The credential manager on paused time against a stand-in for misaki-cp's
//! enrolment (the rules of `control-plane/cp/src/enroll.rs`: a claim only while no live
//! certificate is recorded, unless it retries with that certificate's key; a vehicle
//! renews; 5-minute backdating).

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use misaki_identity::Kind;

use super::testkit::{TestCa, secs};
use super::*;

const VALID_FOR: Duration = Duration::from_secs(20);
const BACKDATE: Duration = Duration::from_secs(300);
const CAR1: &str = "spiffe://misaki.local/vehicle/car-1";

/// A wall clock that follows tokio's (paused) time, from a whole second.
fn paused_clock() -> Clock {
    let base = secs(SystemTime::now());
    let start = tokio::time::Instant::now();
    Arc::new(move || base + start.elapsed())
}

/// One call as the stand-in saw it.
#[derive(Debug, Clone)]
struct Call {
    caller: String,
    public_key: Vec<u8>,
    ok: bool,
}

/// misaki-cp's enrolment, in memory.
struct FakeCp {
    ca: TestCa,
    clock: Clock,
    up: AtomicBool,
    lose_next_answer: AtomicBool,
    /// Issued: public key, certificate, expiry.
    issued: Mutex<Vec<(Vec<u8>, String, SystemTime)>>,
    calls: Mutex<Vec<Call>>,
}

impl FakeCp {
    fn new(clock: Clock) -> Arc<FakeCp> {
        Arc::new(FakeCp {
            ca: TestCa::new(),
            clock,
            up: AtomicBool::new(true),
            lose_next_answer: AtomicBool::new(false),
            issued: Mutex::default(),
            calls: Mutex::default(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn answer(&self, csr_pem: &str, client: ClientTls<'_>) -> Result<String, String> {
        if !self.up.load(Ordering::SeqCst) {
            return Err("Unavailable: connection refused".into());
        }
        assert!(
            cert::is_pair(client.cert_pem, client.key_pem),
            "a TLS client proves its key"
        );
        assert_eq!(
            client.ca_pem,
            self.ca.pem(),
            "verifies the server with tls.ca"
        );
        let caller = cert::cert_info(client.cert_pem).unwrap().id;
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let public_key = rcgen::PublicKeyData::der_bytes(&csr.public_key).to_vec();
        let now = (self.clock)();
        let mut issued = self.issued.lock().unwrap();
        let live = issued.iter().find(|(_, _, until)| *until > now);
        let answer = match (caller.kind(), live) {
            (Kind::Claim, Some((k, c, _))) if *k == public_key => Ok(c.clone()),
            (Kind::Claim, Some(_)) => Err("PermissionDenied: a live certificate".into()),
            (Kind::Claim | Kind::Vehicle, _) => {
                let id = format!("spiffe://misaki.local/vehicle/{}", caller.name());
                let until = secs(now) + VALID_FOR;
                let c = self
                    .ca
                    .sign(&id, &csr.public_key, secs(now) - BACKDATE, until);
                issued.push((public_key.clone(), c.clone(), until));
                Ok(c)
            }
            (Kind::Cloud, _) => Err("PermissionDenied".into()),
        };
        let answer = match answer {
            Ok(_) if self.lose_next_answer.swap(false, Ordering::SeqCst) => {
                Err("connection reset".into())
            }
            a => a,
        };
        let ok = answer.is_ok();
        self.calls.lock().unwrap().push(Call {
            caller: caller.to_string(),
            public_key,
            ok,
        });
        answer
    }
}

impl Enroller for Arc<FakeCp> {
    fn enroll<'a>(
        &'a self,
        csr_pem: String,
        client: ClientTls<'a>,
    ) -> impl Future<Output = Result<String, String>> + Send + 'a {
        let answer = self.answer(&csr_pem, client);
        async move { answer }
    }
}

/// A vehicle's files in a temporary directory and the stand-in control plane.
struct Rig {
    dir: tempfile::TempDir,
    tls: TlsConfig,
    cp: Arc<FakeCp>,
    clock: Clock,
}

fn rig(with_claim: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let clock = paused_clock();
    let cp = FakeCp::new(clock.clone());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cp.ca.pem()).unwrap();
    let claim = with_claim.then(|| {
        let (cert, key) = cp
            .ca
            .issue_now("spiffe://misaki.local/claim/car-1", VALID_FOR * 1000);
        let c = crate::config::ClaimConfig {
            cert: dir.path().join("claim/cert.pem"),
            key: dir.path().join("claim/key.pem"),
        };
        std::fs::create_dir_all(dir.path().join("claim")).unwrap();
        std::fs::write(&c.cert, cert).unwrap();
        std::fs::write(&c.key, key).unwrap();
        c
    });
    let tls = TlsConfig {
        cert: dir.path().join("tls/cert.pem"),
        key: dir.path().join("tls/key.pem"),
        ca,
        claim,
    };
    Rig {
        dir,
        tls,
        cp,
        clock,
    }
}

impl Rig {
    fn start(&self) -> (IdentityHandle, IdentityMetrics) {
        let metrics = IdentityMetrics::default();
        let (manager, handle) = Manager::new(
            "car-1",
            self.tls.clone(),
            self.cp.clone(),
            self.clock.clone(),
            metrics.clone(),
        );
        tokio::spawn(manager.run(std::future::pending()));
        (handle, metrics)
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    fn on_disk(&self) -> (String, String) {
        let read = |p| std::fs::read_to_string(p).unwrap();
        (read(&self.tls.cert), read(&self.tls.key))
    }

    fn install(&self, cert: &str, key: &str) {
        let paths = store::Paths {
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        };
        store::save(&paths, cert, key).unwrap();
    }
}

/// The next credential published (`None` included).
async fn next(h: &mut IdentityHandle) -> Option<Arc<Credential>> {
    h.credential.changed().await.unwrap();
    h.credential.borrow_and_update().clone()
}

fn count(m: &IdentityMetrics, how: &'static str, result: &'static str) -> u64 {
    m.enrolments
        .get_or_create(&EnrolLabels { how, result })
        .get()
}

#[tokio::test(start_paused = true)]
async fn a_claim_enrols_a_0600_pair_made_here_then_renewal_comes_at_40_to_60_percent() {
    let rig = rig(true);
    let (mut h, metrics) = rig.start();
    let first = next(&mut h).await.expect("enrolled");
    let enrolled_at = rig.now();
    assert_eq!(first.spiffe_id, CAR1);
    assert_eq!(h.problem(), None);
    let (cert, key) = rig.on_disk();
    assert_eq!((&cert, &key), (&first.cert_pem, &first.key_pem));
    let mode = std::fs::metadata(&rig.tls.key)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        !store::pending(&store::Paths {
            cert: rig.tls.cert.clone(),
            key: rig.tls.key.clone()
        })
        .exists()
    );
    let calls = rig.cp.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].caller, "spiffe://misaki.local/claim/car-1");
    // What the server saw is the public half of the key kept here.
    assert_eq!(calls[0].public_key, cert::key_public(&key).unwrap());
    assert_eq!(
        metrics.not_after.get(),
        cert::unix_secs(first.not_after) as i64
    );

    let renewed = next(&mut h).await.expect("renewed");
    let after = rig.now().duration_since(enrolled_at).unwrap();
    // 40-60 % of the 20 s lifetime (less up to 1 s: X.509 keeps whole seconds).
    assert!(
        after >= Duration::from_millis(7_600) && after <= Duration::from_secs(12),
        "{after:?}"
    );
    let calls = rig.cp.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1].caller, CAR1,
        "renewal presents the vehicle certificate"
    );
    assert_ne!(
        calls[1].public_key, calls[0].public_key,
        "a new key per renewal"
    );
    assert_eq!(
        rig.on_disk(),
        (renewed.cert_pem.clone(), renewed.key_pem.clone())
    );
    assert!(renewed.not_after > first.not_after);
    assert_eq!(count(&metrics, "claim", "ok"), 1);
    assert_eq!(count(&metrics, "renew", "ok"), 1);
    assert_eq!(
        metrics.not_after.get(),
        cert::unix_secs(renewed.not_after) as i64
    );
}

#[tokio::test(start_paused = true)]
async fn while_the_cloud_is_away_the_certificate_stays_until_expiry_then_the_claim_enrols_again() {
    let rig = rig(true);
    let (mut h, metrics) = rig.start();
    let first = next(&mut h).await.expect("enrolled");
    rig.cp.up.store(false, Ordering::SeqCst);
    // Renewal fails from 40-60 %, retried with backoff; the certificate stays in use.
    let gone = next(&mut h).await;
    assert_eq!(gone, None, "withdrawn, not replaced");
    assert!(rig.now() >= first.not_after, "not before its expiry");
    assert!(rig.now() <= first.not_after + Duration::from_secs(1));
    let failed = count(&metrics, "renew", "error");
    assert!(
        (2..=7).contains(&failed),
        "backoff 1, 2, 4, 8 s in 8-12 s: {failed}"
    );
    let why = h.problem().expect("a reason");
    assert!(why.contains("expired") && why.contains("claim"), "{why}");
    assert_eq!(metrics.not_after.get(), 0);
    // Back: the claim enrols (nothing live is recorded any more).
    tokio::time::sleep(Duration::from_secs(30)).await;
    rig.cp.up.store(true, Ordering::SeqCst);
    let back = next(&mut h).await.expect("enrolled again");
    let last = rig.cp.calls().pop().unwrap();
    assert_eq!(
        (last.caller.as_str(), last.ok),
        ("spiffe://misaki.local/claim/car-1", true)
    );
    assert!(back.not_after > rig.now());
    assert!(count(&metrics, "claim", "error") >= 1);
    assert_eq!(count(&metrics, "claim", "ok"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lost_claim_answer_is_retried_with_the_same_key_and_gets_its_certificate() {
    let rig = rig(true);
    rig.cp.lose_next_answer.store(true, Ordering::SeqCst);
    let (mut h, _) = rig.start();
    let cred = next(&mut h).await.expect("enrolled on the retry");
    let calls = rig.cp.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(!calls[0].ok && calls[1].ok);
    assert_eq!(calls[0].public_key, calls[1].public_key);
    assert_eq!(
        rig.cp.issued.lock().unwrap().len(),
        1,
        "one identity minted"
    );
    assert_eq!(
        calls[1].public_key,
        cert::key_public(&cred.key_pem).unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_certificate_on_disk_is_replaced_by_enrolling_with_the_claim() {
    let rig = rig(true);
    let now = rig.now();
    let (cert, key) = rig.cp.ca.issue(
        CAR1,
        now - Duration::from_secs(100),
        now - Duration::from_secs(1),
    );
    rig.install(&cert, &key);
    let (mut h, _) = rig.start();
    let cred = next(&mut h).await.expect("enrolled");
    assert_ne!(cred.cert_pem, cert);
    let calls = rig.cp.calls();
    assert_eq!(calls[0].caller, "spiffe://misaki.local/claim/car-1");
    assert_ne!(
        calls[0].public_key,
        cert::key_public(&key).unwrap(),
        "a new key"
    );
}

#[tokio::test(start_paused = true)]
async fn a_usable_certificate_on_disk_is_used_and_renewed_from_when_it_was_written() {
    let rig = rig(false);
    let now = rig.now();
    // Backdated like misaki's: a schedule from not_before would renew at once.
    let (cert, key) = rig.cp.ca.issue(CAR1, now - BACKDATE, now + VALID_FOR);
    rig.install(&cert, &key);
    let (mut h, _) = rig.start();
    let cred = next(&mut h).await.expect("loaded");
    assert_eq!(cred.cert_pem, cert);
    assert!(rig.cp.calls().is_empty(), "nothing asked");
    let renewed = next(&mut h).await.expect("renewed");
    let after = rig.now().duration_since(now).unwrap();
    assert!(
        after >= Duration::from_secs(7) && after <= Duration::from_secs(13),
        "{after:?}"
    );
    assert_eq!(rig.cp.calls()[0].caller, CAR1);
    assert_ne!(renewed.key_pem, key);
}

#[tokio::test(start_paused = true)]
async fn without_a_certificate_or_a_claim_nothing_is_published_and_readiness_says_why() {
    let rig = rig(false);
    let (mut h, _) = rig.start();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(h.credential.borrow().is_none());
    let why = h.problem().expect("a reason");
    assert!(
        why.contains("no claim credential") && why.contains("none yet"),
        "{why}"
    );
    // An operator installs one: picked up on a retry.
    let (cert, key) = rig.cp.ca.issue_now(CAR1, VALID_FOR * 100);
    rig.install(&cert, &key);
    let cred = next(&mut h).await.expect("loaded");
    assert_eq!(cred.cert_pem, cert);
    assert!(rig.cp.calls().is_empty());
    drop(rig.dir);
}
