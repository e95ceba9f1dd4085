//! The vehicle's credential for mutual TLS to the control plane: loaded, enrolled,
//! renewed, persisted, and published to whoever connects (the reporter; later the local
//! xDS tier).
//!
//! Invariants:
//! - The private key is made here (ECDSA P-256) and never sent: enrolment and renewal
//!   send a CSR (`EnrollmentService.Enroll`); misaki-cp takes only its public key.
//! - A credential is published only if its key is its certificate's, it names
//!   `spiffe://TD/vehicle/<vehicle_id>` and it has not expired ([`cert::check`]); an
//!   expired one is withdrawn (`None`) at its `not_after`.
//! - At start, a usable certificate on disk is used; else the claim credential enrols
//!   (first boot, or parked past `not_after`); without a claim the files are read again
//!   with backoff, and `/readyz` says why nothing is reported.
//! - Renewal is due at 40-60 % of the lifetime ([`schedule`]) and presents the current
//!   certificate; failures retry with capped exponential backoff while the current one
//!   stays in use, so the cloud being away changes nothing until expiry.
//! - Each renewal makes a new key: a key that leaked dies with its certificate.
//! - The files are replaced crash-safely, never leaving a mismatched pair in use
//!   ([`store`]); `tls.ca` is only read.
//!
//! Layers: [`start`] spawns the `Manager` loop (I/O, clock, metrics) around the pure
//! [`schedule::next_step`]; `cert` reads and makes certificates and keys; `store` owns
//! the files; `enrol` is the RPC behind the `Enroller` trait.

mod cert;
mod enrol;
mod schedule;
mod store;

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::channel::ClientTls;
use crate::config::{Config, TlsConfig};
use crate::engine::EngineView;
use enrol::{Enroller, GrpcEnroller};
use schedule::{Backoff, Due, Step};

/// The vehicle's current credential, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// The certificate (chain, leaf first).
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// The fleet CA (`tls.ca`): what misaki-cp must chain to.
    pub ca_pem: String,
    /// `spiffe://TD/vehicle/<vehicle_id>`.
    pub spiffe_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Credential {
    /// What a TLS connection presents and trusts with this credential.
    pub fn client_tls(&self) -> ClientTls<'_> {
        ClientTls {
            cert_pem: &self.cert_pem,
            key_pem: &self.key_pem,
            ca_pem: &self.ca_pem,
        }
    }
}

/// The key stays out of logs.
impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_before", &cert::unix_secs(self.not_before))
            .field("not_after", &cert::unix_secs(self.not_after))
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The newest credential; `None` while there is no usable one.
pub type CredentialRx = watch::Receiver<Option<Arc<Credential>>>;

/// What the rest of edge-netd holds of the credential manager.
#[derive(Debug, Clone)]
pub struct IdentityHandle {
    pub credential: CredentialRx,
    problem: Arc<Mutex<String>>,
}

impl IdentityHandle {
    /// Why there is no usable credential (`None` while there is one).
    pub fn problem(&self) -> Option<String> {
        if self.credential.borrow().is_some() {
            return None;
        }
        let p = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        Some(if p.is_empty() {
            "no certificate loaded yet".to_owned()
        } else {
            p.clone()
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnrolLabels {
    /// `claim` (enrolment with the claim credential) or `renew`.
    how: &'static str,
    result: &'static str,
}

/// `edge_netd_cert_not_after_seconds`, `edge_netd_enrolments_total{how,result}`.
#[derive(Debug, Default, Clone)]
pub struct IdentityMetrics {
    not_after: Gauge,
    enrolments: Family<EnrolLabels, Counter>,
}

impl IdentityMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        crate::register_metrics!(r;
            "edge_netd_cert_not_after_seconds", "Expiry of the vehicle's certificate in use (unix seconds); 0 while none" => self.not_after;
            "edge_netd_enrolments", "Certificate requests, by how (claim: enrolment with the claim credential; renew) and result" => self.enrolments;
        );
    }

    fn count(&self, how: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.enrolments
            .get_or_create(&EnrolLabels { how, result })
            .inc();
    }
}

/// The wall clock (tests drive one from tokio's paused time).
type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Start the credential manager for `config.tls` (which must be set), following the
/// engine's selection for the uplink its connections are bound to.
pub fn start(
    config: Arc<Config>,
    views: watch::Receiver<Arc<EngineView>>,
    metrics: IdentityMetrics,
    stop: impl Future<Output = ()> + Send + 'static,
) -> IdentityHandle {
    let tls = config.tls.clone().expect("identity::start needs tls:");
    let enroller = GrpcEnroller::new(config.clone(), views);
    let (manager, handle) = Manager::new(
        &config.vehicle_id,
        tls,
        enroller,
        Arc::new(SystemTime::now),
        metrics,
    );
    tokio::spawn(manager.run(stop));
    handle
}

/// A credential in use and when it is due.
#[derive(Debug, Clone)]
struct Held {
    cred: Arc<Credential>,
    due: Due,
}

/// The loop that keeps a usable credential published.
struct Manager<E> {
    vehicle_id: String,
    tls: TlsConfig,
    paths: store::Paths,
    enroller: E,
    clock: Clock,
    tx: watch::Sender<Option<Arc<Credential>>>,
    problem: Arc<Mutex<String>>,
    metrics: IdentityMetrics,
}

impl<E: Enroller> Manager<E> {
    fn new(
        vehicle_id: &str,
        tls: TlsConfig,
        enroller: E,
        clock: Clock,
        metrics: IdentityMetrics,
    ) -> (Self, IdentityHandle) {
        let (tx, credential) = watch::channel(None);
        let problem = Arc::new(Mutex::new(String::new()));
        let manager = Manager {
            vehicle_id: vehicle_id.to_owned(),
            paths: store::Paths {
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            },
            tls,
            enroller,
            clock,
            tx,
            problem: problem.clone(),
            metrics,
        };
        (
            manager,
            IdentityHandle {
                credential,
                problem,
            },
        )
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Until `stop`: keep a usable credential published (module invariants).
    async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        // Why no certificate is usable, while none is (for /readyz and the log).
        let mut why = String::new();
        let mut held = match self.load() {
            Ok(h) => {
                tracing::info!(identity = %h.cred.spiffe_id, not_after = cert::unix_secs(h.cred.not_after), "certificate loaded");
                Some(h)
            }
            Err(e) => {
                why = e;
                let problem = format!("no usable certificate ({why}); {}", self.fallback());
                tracing::info!("{problem}");
                self.set_problem(problem);
                None
            }
        };
        let mut backoff = Backoff::default();
        loop {
            self.publish(held.as_ref());
            let has_claim = self.tls.claim.is_some();
            let step = schedule::next_step(held.as_ref().map(|h| h.due), self.now(), has_claim);
            let wait = match step {
                Step::Wait(d) => d,
                Step::Expired => {
                    let at = held.take().map_or(0, |h| cert::unix_secs(h.cred.not_after));
                    why = format!(
                        "the certificate expired at {at} (unix), the vehicle was away past it"
                    );
                    let problem = format!("no usable certificate ({why}); {}", self.fallback());
                    tracing::warn!("{problem}");
                    self.set_problem(problem);
                    Duration::ZERO
                }
                Step::Renew => {
                    let current = held.clone().expect("renewal needs a certificate");
                    match self.renew(&current).await {
                        Ok(h) => {
                            backoff.reset();
                            held = Some(h);
                            Duration::ZERO
                        }
                        Err(e) => {
                            let delay = backoff.next_delay(rand::random());
                            let delay =
                                schedule::retry_after(delay, self.now(), current.due.not_after);
                            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "renewal failed; the current certificate stays in use");
                            delay
                        }
                    }
                }
                Step::Enrol | Step::Reload => match self.obtain(step, &mut why).await {
                    Ok(h) => {
                        backoff.reset();
                        held = Some(h);
                        Duration::ZERO
                    }
                    Err(e) => {
                        let delay = backoff.next_delay(rand::random());
                        let problem = format!("no usable certificate ({why}); {e}");
                        tracing::warn!(
                            retry_in_ms = delay.as_millis() as u64,
                            "{problem}; nothing is reported"
                        );
                        self.set_problem(problem);
                        delay
                    }
                },
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait.min(schedule::RECHECK)) => {}
            }
        }
    }

    /// What happens without a certificate.
    fn fallback(&self) -> &'static str {
        if self.tls.claim.is_some() {
            "enrolling with the claim credential"
        } else {
            "no claim credential (tls.claim_cert) to enrol with: waiting for a certificate to be installed"
        }
    }

    /// Without a usable certificate: enrol with the claim, or read the files again
    /// (whose problem becomes `why`).
    async fn obtain(&self, step: Step, why: &mut String) -> Result<Held, String> {
        if step == Step::Reload {
            return self.load().map_err(|e| {
                *why = e;
                self.fallback().to_owned()
            });
        }
        let r = self.enrol_with_claim().await;
        self.metrics.count("claim", r.is_ok());
        if let Ok(h) = &r {
            tracing::info!(identity = %h.cred.spiffe_id, not_after = cert::unix_secs(h.cred.not_after), "enrolled with the claim credential");
        }
        r.map_err(|e| format!("enrolment with the claim credential failed: {e}"))
    }

    fn set_problem(&self, text: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }

    /// Publish `held` if it is not what is published already.
    fn publish(&self, held: Option<&Held>) {
        let next = held.map(|h| h.cred.clone());
        self.tx.send_if_modified(|cur| {
            let same = match (cur.as_ref(), next.as_ref()) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                *cur = next.clone();
            }
            !same
        });
        let not_after = held.map_or(0, |h| cert::unix_secs(h.cred.not_after));
        self.metrics
            .not_after
            .set(i64::try_from(not_after).unwrap_or(i64::MAX));
    }

    fn read_ca(&self) -> Result<String, String> {
        std::fs::read_to_string(&self.tls.ca)
            .map_err(|e| format!("cannot read tls.ca {}: {e}", self.tls.ca.display()))
    }

    /// The credential on disk (after crash recovery), if usable.
    fn load(&self) -> Result<Held, String> {
        let place = format!("{}", self.paths.cert.display());
        if store::recover(&self.paths).map_err(|e| format!("{place}: recovery: {e}"))? {
            tracing::info!(cert = %place, "completed a certificate replacement interrupted by a crash");
        }
        let ca = self.read_ca()?;
        let on_disk = store::read(&self.paths)
            .map_err(|e| format!("{place}: {e}"))?
            .ok_or_else(|| format!("{place}: none yet"))?;
        let now = self.now();
        let cred = cert::check(
            &on_disk.cert_pem,
            &on_disk.key_pem,
            &ca,
            &self.vehicle_id,
            now,
        )
        .map_err(|e| format!("{place}: {e}"))?;
        Ok(self.held(cred, on_disk.written))
    }

    /// Schedule `cred`'s renewal (`received`: when it arrived, see `schedule::start`).
    fn held(&self, cred: Credential, received: Option<SystemTime>) -> Held {
        let start = schedule::start(cred.not_before, received, self.now());
        let fraction = rand::random_range(schedule::RENEW_FRACTION);
        let due = Due {
            renew_at: schedule::renew_at(start, cred.not_after, fraction),
            not_after: cred.not_after,
        };
        Held {
            cred: Arc::new(cred),
            due,
        }
    }

    /// Enrol presenting the claim credential, with the pending key if there is one
    /// (`store`: a retry must ask with the key of a certificate whose answer was lost).
    async fn enrol_with_claim(&self) -> Result<Held, String> {
        let claim = self.tls.claim.as_ref().ok_or("no claim credential")?;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let (claim_cert, claim_key) = (read(&claim.cert)?, read(&claim.key)?);
        let ca = self.read_ca()?;
        let id = cert::cert_info(&claim_cert)
            .map_err(|e| format!("tls.claim_cert: {e}"))?
            .id;
        if id.kind() != misaki_identity::Kind::Claim || id.name() != self.vehicle_id {
            return Err(format!(
                "tls.claim_cert is {id}, not the claim of vehicle {:?}",
                self.vehicle_id
            ));
        }
        let key = self.pending_key()?;
        let client = ClientTls {
            cert_pem: &claim_cert,
            key_pem: &claim_key,
            ca_pem: &ca,
        };
        let held = self.request(&id, key, client, &ca).await?;
        if let Err(e) = store::clear_pending_key(&self.paths) {
            tracing::warn!(error = %e, "cannot remove the pending enrolment key");
        }
        Ok(held)
    }

    /// The key of the claim enrolment in progress: the saved one, else a new one, saved
    /// before its CSR leaves.
    fn pending_key(&self) -> Result<rcgen::KeyPair, String> {
        let saved = store::read_pending_key(&self.paths).ok().flatten();
        if let Some(key) = saved.and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok()) {
            return Ok(key);
        }
        let key = cert::new_key()?;
        store::save_pending_key(&self.paths, &key.serialize_pem())
            .map_err(|e| format!("cannot save the enrolment key next to tls.key: {e}"))?;
        Ok(key)
    }

    /// Renew presenting `current`.
    async fn renew(&self, current: &Held) -> Result<Held, String> {
        let id = cert::cert_info(&current.cred.cert_pem)?.id;
        // A CA bundle updated on disk (a CA rotation) counts from the next connection.
        let ca = self
            .read_ca()
            .unwrap_or_else(|_| current.cred.ca_pem.clone());
        // A new key per renewal: a key that leaked dies with its certificate.
        let key = cert::new_key()?;
        let r = self.request(&id, key, current.cred.client_tls(), &ca).await;
        self.metrics.count("renew", r.is_ok());
        if let Ok(h) = &r {
            tracing::info!(identity = %h.cred.spiffe_id, not_after = cert::unix_secs(h.cred.not_after), "certificate renewed");
        }
        r
    }

    /// A CSR for this vehicle in `like`'s trust domain with `key`, sent presenting
    /// `client`; the issued certificate checked, persisted and scheduled.
    async fn request(
        &self,
        like: &misaki_identity::SpiffeId,
        key: rcgen::KeyPair,
        client: ClientTls<'_>,
        ca: &str,
    ) -> Result<Held, String> {
        let csr = cert::csr(&key, &cert::vehicle_id_like(like, &self.vehicle_id)?)?;
        let cert_pem = self.enroller.enroll(csr, client).await?;
        let key_pem = key.serialize_pem();
        let now = self.now();
        let cred = cert::check(&cert_pem, &key_pem, ca, &self.vehicle_id, now)
            .map_err(|e| format!("the control plane's certificate is unusable: {e}"))?;
        if let Err(e) = store::save(&self.paths, &cred.cert_pem, &cred.key_pem) {
            // Still valid: use it, and enrol again after a restart if need be.
            tracing::error!(error = %e, cert = %self.paths.cert.display(), "cannot persist the new certificate; using it anyway");
        }
        Ok(self.held(cred, Some(now)))
    }
}

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
