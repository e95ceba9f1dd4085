//! Wiring: [`StoreForward::start`] spawns the forwarder; [`StoreForward::serve`] runs the
//! ingest endpoint on a listener; [`StoreForward::admin_response`] answers the local API
//! paths (`/status`, `/deadletters`) for whatever server mounts them;
//! [`StoreForward::set_identity`] gives the forwarder the vehicle's certificate for
//! `https://` destinations.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use misaki_policy::Policy;
use misaki_queue::Queue;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    config::{ConfigError, SafConfig},
    forward,
    ingest::{self, json_response},
    metrics::Metrics,
    state::{Inner, TlsState},
    tls::{ClientIdentity, ClientIdentityError, TlsIdentity},
    uplink::UplinkView,
};

/// One class's line of [`StoreForward::class_report`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassReport {
    pub class: String,
    /// Ready + in flight.
    pub messages: u64,
    pub bytes: u64,
    /// Dropped since the queue was opened: expired, evicted, dead-lettered.
    pub expired: u64,
    pub evicted: u64,
    pub dead_lettered: u64,
}

/// A running store-and-forward: cheap to clone, one per daemon.
#[derive(Clone)]
pub struct StoreForward {
    inner: Arc<Inner>,
    forwarder: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for StoreForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreForward")
            .field("queue", &self.inner.queue)
            .finish_non_exhaustive()
    }
}

impl StoreForward {
    /// Validate `config` and start the forwarder on the current tokio runtime. It runs until
    /// `shutdown` completes, then lets in-flight deliveries finish (up to
    /// `config.shutdown_grace`) and flushes the acks; [`StoreForward::serve`] stops
    /// accepting at the same moment.
    pub fn start(
        config: SafConfig,
        queue: Arc<Queue>,
        policy: watch::Receiver<Arc<Policy>>,
        uplinks: Arc<dyn UplinkView>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            queue,
            policy,
            uplinks,
            metrics: Metrics::default(),
            wake: Notify::new(),
            classes: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            tls: Mutex::new(TlsState::default()),
            stop: stop_rx,
        });
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            // Keep the sender alive so receivers see `true`, not a closed channel.
            stop_tx.closed().await;
        });
        let forwarder = tokio::spawn(forward::run(inner.clone()));
        Ok(Self {
            inner,
            forwarder: Arc::new(Mutex::new(Some(forwarder))),
        })
    }

    /// Use `identity` for every `https://` destination from now on (`None`: none, https
    /// deliveries wait). Call it at start and again whenever the vehicle's certificate is
    /// renewed; cheap, and no delivery is interrupted:
    ///
    /// - new connections present the new certificate; pooled connections made with the
    ///   old one finish the requests they carry and are closed (their pools are dropped);
    /// - until an identity is set, and once its certificate has expired, https deliveries
    ///   are not attempted: their messages stay queued (counted as retried, never dead
    ///   lettered), and the waits end as soon as an identity is set;
    /// - an identity that cannot be used (unreadable PEM, key not the certificate's, not a
    ///   `spiffe://<trust_domain>/vehicle/<id>` certificate) is refused with the reason and
    ///   the previous one stays in use.
    pub fn set_identity(
        &self,
        identity: Option<Arc<ClientIdentity>>,
    ) -> Result<(), ClientIdentityError> {
        let loaded = identity
            .as_deref()
            .map(TlsIdentity::load)
            .transpose()?
            .map(Arc::new);
        if let Some(id) = &loaded {
            info!(identity = %id.id(), not_after_unix = id.not_after_unix(),
                  "vehicle certificate for https destinations set");
        }
        let previous = {
            let mut tls = self.inner.tls();
            tls.clients.clear();
            std::mem::replace(&mut tls.identity, loaded)
        };
        if previous.is_some() && identity.is_none() {
            info!("vehicle certificate for https destinations removed");
        }
        for st in self.inner.classes().values_mut() {
            st.retry_at = None;
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// [`StoreForward::set_identity`] with every value `identity` holds, until its sender
    /// is dropped or shutdown; a value that cannot be used is logged and the previous one
    /// kept. Spawn it: `tokio::spawn(async move { saf.follow_identity(rx).await })`.
    pub async fn follow_identity(
        &self,
        mut identity: watch::Receiver<Option<Arc<ClientIdentity>>>,
    ) {
        let mut stop = self.inner.stop.clone();
        loop {
            let current = identity.borrow_and_update().clone();
            if let Err(error) = self.set_identity(current) {
                warn!(%error, "vehicle certificate refused; keeping the previous one");
            }
            tokio::select! {
                r = identity.changed() => if r.is_err() { return },
                _ = stopped(&mut stop) => return,
            }
        }
    }

    /// Resolves once the forwarder finished after shutdown (acks flushed).
    pub async fn stopped(&self) {
        let handle = self
            .forwarder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(h) = handle
            && let Err(e) = h.await
        {
            warn!(error = %e, "forwarder task failed");
        }
    }

    /// Register the endpoint's and forwarder's metrics (crate `metrics` naming rule).
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.inner.metrics.register(registry);
        registry.register_collector(Box::new(crate::metrics::QueueCollector(
            self.inner.queue.clone(),
        )));
    }

    /// Answer one ingest request (for embedding in another server).
    pub async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        handle(&self.inner, req).await
    }

    /// Serve the ingest endpoint (HTTP/1.1 and h2c on the same port) on `listener` until
    /// shutdown; open connections are then closed gracefully.
    pub async fn serve(&self, listener: TcpListener) {
        let handler = {
            let inner = self.inner.clone();
            move |req| {
                let inner = inner.clone();
                async move { handle(&inner, req).await }
            }
        };
        serve_loop("ingest", listener, self.inner.stop.clone(), handler).await;
    }

    /// Serve `admin_response` (plus `/metrics` from this crate's metrics alone) on
    /// `listener`; for the stand-in daemon and tests: edge-netd mounts `admin_response` in
    /// its own local API instead.
    pub async fn serve_admin(&self, listener: TcpListener) {
        let mut registry = Registry::default();
        self.register_metrics(&mut registry);
        let registry = Arc::new(registry);
        let this = self.clone();
        let handler = move |req: Request<hyper::body::Incoming>| {
            let this = this.clone();
            let registry = registry.clone();
            async move {
                if req.uri().path() == "/metrics" {
                    let mut text = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                    Response::builder()
                        .header(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(text)))
                        .expect("static response parts are valid")
                } else {
                    this.admin_response(req.method(), req.uri().path())
                        .unwrap_or_else(|| {
                            json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"}))
                        })
                }
            }
        };
        serve_loop("saf admin", listener, self.inner.stop.clone(), handler).await;
    }

    /// `GET /status` and `GET /deadletters` as JSON; `None` for any other path.
    pub fn admin_response(&self, method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
        if method != Method::GET {
            return None;
        }
        match path {
            "/status" => Some(json_response(StatusCode::OK, &self.status_json())),
            "/deadletters" => Some(json_response(StatusCode::OK, &self.dead_letters_json())),
            _ => None,
        }
    }

    /// Per class with messages queued (ready or in flight): depth and what was dropped
    /// since start. `dead_lettered` is per class; the queue counts expiry and eviction only
    /// in total, so those are in [`StoreForward::dropped_totals`].
    pub fn class_report(&self) -> Vec<ClassReport> {
        self.inner
            .queue
            .stats()
            .depth
            .into_iter()
            .map(|d| ClassReport {
                class: d.class,
                messages: d.ready + d.in_flight,
                bytes: d.bytes,
                expired: d.expired,
                evicted: d.evicted,
                dead_lettered: d.dead_lettered,
            })
            .collect()
    }

    /// Messages of `class` dead-lettered since start (for classes no longer queued).
    pub fn dead_lettered_of(&self, class: &str) -> u64 {
        self.inner.metrics.dead_lettered_of(class)
    }

    /// Whole-queue drop counters since the queue directory was opened: (expired, evicted).
    pub fn dropped_totals(&self) -> (u64, u64) {
        let q = self.inner.queue.stats();
        (q.expired, q.evicted)
    }

    /// The dead-letter list, oldest first.
    pub fn dead_letters_json(&self) -> Value {
        let list: Vec<Value> = self
            .inner
            .queue
            .dead_letters()
            .into_iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "idempotency_key": d.idempotency_key,
                    "class": d.class,
                    "service": d.service,
                    "method": d.method,
                    "path": d.path,
                    "status": d.status,
                    "reason": d.reason,
                    "at_unix_ms": d.at_ms,
                })
            })
            .collect();
        json!({ "dead_letters": list })
    }

    /// Counters, queue depth per class, and per class the uplink in use and retry state.
    pub fn status_json(&self) -> Value {
        let inner = &self.inner;
        let q = inner.queue.stats();
        let now = Instant::now();
        let classes = inner.classes().clone();
        let depth: Vec<Value> = q
            .depth
            .iter()
            .map(|d| {
                let st = classes.get(&d.class).cloned().unwrap_or_default();
                json!({
                    "class": d.class,
                    "rank": d.rank,
                    "ready": d.ready,
                    "in_flight": d.in_flight,
                    "bytes": d.bytes,
                    "uplink": inner.uplinks.usable(&d.class),
                    "failures": st.failures,
                    "retry_in_ms": st.retry_at.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    "last_error": st.last_error,
                })
            })
            .collect();
        let t = &inner.metrics.totals;
        let body = t.body_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let wire = t.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let identity = inner.tls().identity.clone().map(|id| {
            json!({
                "id": id.id().to_string(),
                "not_after_unix": id.not_after_unix(),
                "expired": id.expired(std::time::SystemTime::now()),
            })
        });
        json!({
            "totals": t,
            "tls_identity": identity,
            "compression_ratio": if wire > 0 { body as f64 / wire as f64 } else { 1.0 },
            "in_flight": inner.metrics.in_flight.get(),
            "queue": {
                "messages": inner.queue.len(),
                "accepted": q.accepted,
                "delivered": q.delivered,
                "expired": q.expired,
                "evicted": q.evicted,
                "dead_lettered": q.dead_lettered,
                "nacked": q.nacked,
                "corrupt_skipped": q.corrupt_skipped,
                "torn_tail_bytes": q.torn_tail_bytes,
                "write_errors": q.write_errors,
                "live_bytes": q.live_bytes,
                "budget_bytes": q.budget_bytes,
                "disk_bytes": q.disk_bytes,
            },
            "classes": depth,
        })
    }
}

async fn handle(inner: &Inner, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match ingest::accept(inner, req).await {
        Ok(r) => {
            inner.metrics.on_accepted();
            r
        }
        Err(e) => {
            let status = e.status();
            inner.metrics.on_rejected(status.as_u16());
            debug!(error = %e, status = status.as_u16(), "ingest request refused");
            json_response(
                status,
                &json!({"error": e.to_string(), "status": status.as_u16()}),
            )
        }
    }
}

/// How store-and-forward serves, ingest and admin alike: HTTP/1.1 and h2c (prior
/// knowledge) on one port, hyper's 30 s header-read timeout (slow clients can't hold a
/// task), `TCP_NODELAY`, a failed accept (EMFILE and friends) backed off 50 ms instead of
/// spinning, and at `stop` open connections closed gracefully (5 s at the most).
async fn serve_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    misaki_http::Server::new(name, misaki_http::Protocol::Http1AndH2c)
        .header_read_timeout(Duration::from_secs(30))
        .tcp_nodelay()
        .accept_backoff(Duration::from_millis(50))
        .drain(misaki_http::Drain::Graceful(Duration::from_secs(5)))
        .serve(listener, handler, async move { stopped(&mut stop).await })
        .await;
}

/// Resolves once `stop` is true (or its sender is gone). Returns nothing, so no watch guard
/// is held across later awaits.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
