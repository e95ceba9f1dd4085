//! The forwarder: drains the queue over the uplinks each class may use.
//!
//! Invariants:
//! - A message of class `c` is picked only while `UplinkView::usable(c)` is `Some`, and is
//!   sent on a connection bound (`SO_BINDTODEVICE`) to that uplink's interface. Connection
//!   pools are per (interface, HTTP version), so a connection opened over one uplink never
//!   carries a message picked for another.
//! - `https://` destinations get pools of their own per (interface, HTTP version), made
//!   with the current vehicle certificate and dropped whole when it changes or expires:
//!   new connections present the newest certificate, and none outlives its certificate.
//! - Every picked message ends in exactly one of ack (2xx), nack (408, 429, 5xx, connect
//!   or TLS error, timeout, no usable vehicle certificate for an https destination) or
//!   dead-letter (any other status): nothing is retried in a hot loop,
//!   nothing permanent is retried at all. Until one of those, the message stays in flight
//!   in the queue; a crash before the ack resends it (at-least-once; receivers dedupe by
//!   `Idempotency-Key`).
//! - At most `max_in_flight` deliveries run at once (a semaphore; one permit per message).
//! - Backoff is per class (the queue is FIFO per class and a nack'd message returns to the
//!   head, so the class is blocked anyway): after a failure the class waits
//!   `min(max, base·2^(n-1))` with equal jitter (half fixed, half random), or the
//!   destination's `Retry-After` if longer (capped at `backoff_max`); then one probe message
//!   goes alone, and only its success reopens the class to full concurrency. A change of
//!   the uplink selection or of the vehicle certificate ends every wait at once (the next
//!   attempt is that single probe).
//! - No lock is held across the two of them: the class table is copied before the queue's
//!   `next_batch` (which calls back under the queue lock), and released before ack/nack.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::{
    client::legacy::{
        Client, ResponseFuture,
        connect::{Connect, HttpConnector},
    },
    rt::TokioExecutor,
};
use misaki_queue::Message;
use rand::Rng;
use tokio::{sync::Semaphore, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{
    compress,
    config::{HttpVersion, Target},
    state::{ClassState, HttpClient, HttpsClient, Inner},
    tls::TlsConnector,
    uplink::{UplinkChoice, zstd_level},
};

/// Bodies above this are compressed on the blocking pool, not on a runtime worker.
const BLOCKING_COMPRESS_BYTES: usize = 64 << 10;
/// Most of a response body read (to keep the connection reusable) before giving up on it.
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// How one delivery ended.
#[derive(Debug)]
enum Outcome {
    Delivered {
        wire: usize,
    },
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Dead {
        status: Option<u16>,
        reason: String,
    },
}

impl Inner {
    /// TCP connector bound to `interface`, with the configured connect timeout.
    fn tcp_connector(&self, interface: Option<&str>) -> HttpConnector {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(self.config.connect_timeout));
        if let Some(i) = interface {
            // SO_BINDTODEVICE: the packets leave over this uplink whatever the
            // routing table says (needs CAP_NET_RAW, which edge-netd has).
            conn.set_interface(i);
        }
        conn
    }

    fn build_client<C: Connect + Clone>(
        &self,
        conn: C,
        version: HttpVersion,
    ) -> Client<C, Full<Bytes>> {
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(self.config.max_in_flight);
        if version == HttpVersion::Http2 {
            b.http2_only(true);
        }
        b.build(conn)
    }

    fn client(&self, interface: Option<&str>, version: HttpVersion) -> HttpClient {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (interface.map(str::to_string), version);
        clients
            .entry(key)
            .or_insert_with(|| self.build_client(self.tcp_connector(interface), version))
            .clone()
    }

    /// The pool for an `https://` destination, presenting the current vehicle
    /// certificate; `Err(reason)` while there is none that may be used.
    fn https_client(
        &self,
        interface: Option<&str>,
        version: HttpVersion,
    ) -> Result<HttpsClient, String> {
        let mut tls = self.tls();
        let Some(identity) = tls.identity.clone() else {
            return Err(
                "not attempted: no vehicle certificate yet for https:// destinations".into(),
            );
        };
        if identity.expired(SystemTime::now()) {
            tls.clients.clear();
            return Err(format!(
                "not attempted: the vehicle certificate ({}) has expired; waiting for a renewed one",
                identity.id()
            ));
        }
        let key = (interface.map(str::to_string), version);
        let client = tls.clients.entry(key).or_insert_with(|| {
            let tcp = self.tcp_connector(interface);
            // The handshake gets the connect timeout again: both are one round trip or two.
            let conn = TlsConnector::new(tcp, &identity, version, self.config.connect_timeout);
            self.build_client(conn, version)
        });
        Ok(client.clone())
    }

    /// Once the vehicle certificate has expired, drop its pools, so none of its
    /// connections outlives it by more than the forwarder's 1 s tick (plus a request
    /// already under way).
    fn drop_expired_pools(&self) {
        let mut tls = self.tls();
        if !tls.clients.is_empty()
            && let Some(id) = tls
                .identity
                .as_ref()
                .filter(|i| i.expired(SystemTime::now()))
        {
            warn!(identity = %id.id(), "vehicle certificate expired; https connections closed, https deliveries wait for a renewed one");
            tls.clients.clear();
        }
    }
}

/// The pool a delivery goes through.
enum Pool {
    Plain(HttpClient),
    Tls(HttpsClient),
}

impl Pool {
    fn request(&self, req: Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            Pool::Plain(c) => c.request(req),
            Pool::Tls(c) => c.request(req),
        }
    }
}

/// Run until `stop` flips, then give in-flight deliveries `shutdown_grace` and make every
/// ack durable.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut stop = inner.stop.clone();
    let mut uplinks_changed = inner.uplinks.changed();
    let permits = Arc::new(Semaphore::new(inner.config.max_in_flight));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut next_expire = Instant::now() + inner.config.expire_interval;
    let mut known: Vec<String> = Vec::new();
    let mut next_refresh = Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        inner.drop_expired_pools();
        let now = Instant::now();
        if now >= next_expire {
            let n = inner.queue.expire();
            if n > 0 {
                info!(expired = n, "dropped expired messages");
            }
            next_expire = now + inner.config.expire_interval;
        }
        if now >= next_refresh {
            // `stats()` walks the whole queue state: not on every wake-up.
            known = inner
                .queue
                .stats()
                .depth
                .into_iter()
                .map(|d| d.class)
                .collect();
            next_refresh = now + Duration::from_secs(1);
        }
        let started = dispatch(&inner, &known, &permits, &mut tasks, now);
        if started > 0 {
            // More may be ready: go round again, but let the runtime breathe.
            tokio::task::yield_now().await;
            continue;
        }
        let wake_at = inner
            .classes()
            .values()
            .filter_map(|c| c.retry_at)
            .filter(|t| *t > now)
            .min()
            .unwrap_or(now + Duration::from_secs(1))
            .min(now + Duration::from_secs(1))
            .min(next_expire);
        tokio::select! {
            _ = inner.wake.notified() => {}
            r = uplinks_changed.changed() => {
                if r.is_ok() {
                    // A new or returning uplink: probe at once instead of sitting out a
                    // backoff earned on the old one (failures stay, so one probe goes first).
                    for st in inner.classes().values_mut() {
                        st.retry_at = None;
                    }
                } else {
                    // The view's sender is gone: poll on the 1 s tick from now on.
                    uplinks_changed = tokio::sync::watch::channel(0).1;
                }
            }
            _ = stop.changed() => {}
            _ = tokio::time::sleep_until(wake_at.into()) => {}
        }
    }
    let grace = inner.config.shutdown_grace;
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        // Their messages were never acked: the queue hands them out again after restart.
        warn!(
            left = tasks.len(),
            "deliveries still running at shutdown; they will be resent"
        );
        tasks.abort_all();
    }
    if let Err(error) = inner.queue.flush().await {
        warn!(%error, "flushing acks at shutdown failed; some messages may be resent");
    }
}

/// Pick what may go now and start it; returns how many deliveries were started.
fn dispatch(
    inner: &Arc<Inner>,
    known: &[String],
    permits: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    now: Instant,
) -> usize {
    let free = permits.available_permits();
    if free == 0 {
        return 0;
    }
    // Uplink per class, asked before taking the queue lock (the view may take locks of its
    // own). Classes are the policy's plus those found in the queue (`known`, refreshed by
    // the caller), so messages of a class since removed from the policy still drain.
    let mut choices: HashMap<String, UplinkChoice> = HashMap::new();
    let policy = inner.policy.borrow().clone();
    for class in policy.classes.keys().chain(known.iter()) {
        if !choices.contains_key(class)
            && let Some(u) = inner.uplinks.usable(class)
        {
            choices.insert(class.clone(), u);
        }
    }
    if choices.is_empty() {
        return 0;
    }
    let states = inner.classes().clone();
    let waiting = |c: &str| {
        states
            .get(c)
            .is_some_and(|s| s.probe_in_flight || s.retry_at.is_some_and(|t| t > now))
    };
    let probing: Vec<String> = choices
        .keys()
        .filter(|c| states.get(*c).is_some_and(|s| s.failures > 0) && !waiting(c))
        .cloned()
        .collect();
    let mut batch = Vec::new();
    for class in &probing {
        if batch.len() < free {
            let picked = inner.queue.next_batch(&|c| c == class, 1);
            if !picked.is_empty() {
                inner
                    .classes()
                    .entry(class.clone())
                    .or_default()
                    .probe_in_flight = true;
            }
            batch.extend(picked);
        }
    }
    if batch.len() < free {
        let healthy = |c: &str| {
            choices.contains_key(c) && !waiting(c) && states.get(c).is_none_or(|s| s.failures == 0)
        };
        batch.extend(inner.queue.next_batch(&healthy, free - batch.len()));
    }
    let n = batch.len();
    for msg in batch {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Cannot happen (only this task takes permits); never lose the message over it.
            inner.queue.nack(msg.id);
            continue;
        };
        let Some(uplink) = choices.get(&msg.class).cloned() else {
            inner.queue.nack(msg.id);
            continue;
        };
        let inner = inner.clone();
        tasks.spawn(async move {
            inner.metrics.in_flight.inc();
            let outcome = deliver(&inner, &msg, &uplink).await;
            settle(&inner, &msg, &uplink, outcome);
            inner.metrics.in_flight.dec();
            drop(permit);
            inner.wake.notify_one();
        });
    }
    n
}

/// Record the outcome in the queue, the class's retry state and the counters.
fn settle(inner: &Inner, msg: &Message, uplink: &UplinkChoice, outcome: Outcome) {
    match outcome {
        Outcome::Delivered { wire } => {
            inner.queue.ack(msg.id);
            inner.metrics.on_delivered(&msg.class, msg.body.len(), wire);
            succeed(inner, &msg.class);
        }
        Outcome::Dead { status, reason } => {
            warn!(id = msg.id, key = %msg.idempotency_key, service = %msg.destination.service,
                  ?status, %reason, "dead-lettered");
            inner.queue.dead_letter(msg.id, status, &reason);
            inner.metrics.on_dead_lettered(&msg.class);
            // The destination answered: the path works, so the class is healthy.
            succeed(inner, &msg.class);
        }
        Outcome::Retry {
            reason,
            retry_after,
        } => {
            inner.queue.nack(msg.id);
            inner.metrics.on_retried(&msg.class);
            let cfg = &inner.config;
            let mut classes = inner.classes();
            let st = classes.entry(msg.class.clone()).or_default();
            st.probe_in_flight = false;
            // Logged once per change of reason (a refused certificate, an outage), not
            // on every attempt of every message.
            if st.last_error.as_deref() == Some(reason.as_str()) {
                debug!(id = msg.id, uplink = %uplink.name, %reason, "delivery failed; will retry");
            } else {
                warn!(class = %msg.class, uplink = %uplink.name, %reason,
                      "delivery failed; will retry (logged again when the reason changes)");
            }
            st.last_error = Some(reason);
            if st.retry_at.is_some_and(|t| t > Instant::now()) {
                // Another delivery of the class already failed and set the wait: the
                // concurrent failures of one outage count once, or 64 in flight would jump
                // straight to the cap.
                return;
            }
            st.failures = st.failures.saturating_add(1);
            let exp = cfg
                .backoff_base
                .saturating_mul(1u32 << (st.failures - 1).min(20))
                .min(cfg.backoff_max);
            let half = exp / 2;
            let jitter = Duration::from_micros(
                rand::rng().random_range(0..=half.as_micros().min(u64::MAX as u128) as u64),
            );
            let delay = (half + jitter).max(retry_after.unwrap_or_default().min(cfg.backoff_max));
            st.retry_at = Some(Instant::now() + delay);
        }
    }
}

fn succeed(inner: &Inner, class: &str) {
    let mut classes = inner.classes();
    if let Some(st) = classes.get_mut(class) {
        if st.failures > 0 {
            info!(
                class,
                after_failures = st.failures,
                "destination reachable again"
            );
        }
        *st = ClassState::default();
    }
}

/// One HTTP exchange; never panics, every failure is an [`Outcome`].
async fn deliver(inner: &Inner, msg: &Message, uplink: &UplinkChoice) -> Outcome {
    let dest = &msg.destination;
    let Some(target) = inner.config.target(&dest.service) else {
        return Outcome::Retry {
            reason: format!("no destination configured for service {}", dest.service),
            retry_after: None,
        };
    };
    let interface = uplink.interface.as_deref();
    let pool = if target.tls {
        match inner.https_client(interface, target.version) {
            Ok(c) => Pool::Tls(c),
            // No vehicle certificate (yet, or any more): not attempted, no connection is
            // made. Handled as an unreachable destination: the message goes back to the
            // queue (nack, counted in `retried`) and the class backs off; never a dead
            // letter, which only an answer of the destination earns. `set_identity` ends
            // the wait at once.
            Err(reason) => return retry(reason, None),
        }
    } else {
        Pool::Plain(inner.client(interface, target.version))
    };
    let (req, wire) = match request(inner, msg, uplink, &target).await {
        Ok(r) => r,
        Err(outcome) => return outcome,
    };
    let timeout = inner.config.request_timeout;
    let resp = match tokio::time::timeout(timeout, pool.request(req)).await {
        Err(_) => return retry(format!("no response within {timeout:?}"), None),
        Ok(Err(e)) => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            return retry(s, None);
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // Read (a bounded part of) the answer so the connection can be reused; its content
    // only matters for the dead-letter reason.
    let text = tokio::time::timeout(
        timeout,
        Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|b| {
        String::from_utf8_lossy(&b.to_bytes()[..])
            .chars()
            .take(200)
            .collect::<String>()
    })
    .unwrap_or_default();
    classify(status, retry_after, wire, text)
}

/// The request for `msg`, body compressed for `uplink`, and its body's size on the wire.
async fn request(
    inner: &Inner,
    msg: &Message,
    uplink: &UplinkChoice,
    target: &Target,
) -> Result<(Request<Full<Bytes>>, usize), Outcome> {
    let dest = &msg.destination;
    let Ok(method) = Method::from_bytes(dest.method.as_bytes()) else {
        return Err(dead(None, format!("invalid method {:?}", dest.method)));
    };
    let uri = match target.uri(&dest.path) {
        Ok(u) => u,
        Err(e) => return Err(dead(None, format!("invalid path {:?}: {e}", dest.path))),
    };
    let mut compressed = None;
    if compress::should_compress(
        &dest.headers,
        msg.body.len(),
        inner.config.compress_min_bytes,
    ) {
        let level = zstd_level(uplink);
        compressed = if msg.body.len() > BLOCKING_COMPRESS_BYTES {
            let body = msg.body.clone();
            tokio::task::spawn_blocking(move || compress::compress(&body, level))
                .await
                .ok()
                .flatten()
        } else {
            compress::compress(&msg.body, level)
        };
    }
    let mut req = Request::builder().method(method).uri(uri);
    let headers = req.headers_mut().expect("builder has no error yet");
    for (n, v) in &dest.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(n.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            headers.append(n, v);
        }
    }
    let set = |h: &mut http::HeaderMap, n: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::try_from(v) {
            h.insert(n, v);
        }
    };
    set(headers, "idempotency-key", &msg.idempotency_key);
    set(headers, "x-misaki-class", &msg.class);
    set(headers, "x-misaki-uplink", &uplink.name);
    set(headers, "x-misaki-attempt", &msg.attempt.to_string());
    let body = match compressed {
        Some(z) => {
            set(headers, "content-encoding", "zstd");
            Bytes::from(z)
        }
        None => Bytes::copy_from_slice(&msg.body),
    };
    let wire = body.len();
    match req.body(Full::new(body)) {
        Ok(r) => Ok((r, wire)),
        Err(e) => Err(dead(None, format!("cannot build request: {e}"))),
    }
}

fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    wire: usize,
    text: String,
) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Delivered { wire }
    } else if code == 408 || code == 429 || status.is_server_error() {
        retry(format!("HTTP {code} {}", text.trim()), retry_after)
    } else {
        dead(Some(code), format!("HTTP {code} {}", text.trim()))
    }
}

fn retry(reason: String, retry_after: Option<Duration>) -> Outcome {
    Outcome::Retry {
        reason,
        retry_after,
    }
}

fn dead(status: Option<u16>, reason: String) -> Outcome {
    Outcome::Dead { status, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_split_into_ack_retry_and_dead_letter() {
        let c = |s: u16| classify(StatusCode::from_u16(s).unwrap(), None, 1, String::new());
        assert!(matches!(c(200), Outcome::Delivered { .. }));
        assert!(matches!(c(204), Outcome::Delivered { .. }));
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(c(s), Outcome::Retry { .. }), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 409, 413, 422] {
            assert!(
                matches!(c(s), Outcome::Dead { status: Some(x), .. } if x == s),
                "{s}"
            );
        }
    }
}
