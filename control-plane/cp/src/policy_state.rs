//! The policy in force, and what happened to the last edit.
//!
//! Invariant: `current` only ever changes to a policy that validated; a rejected edit
//! is recorded in `last_error` (admin `/policy`, metric `misaki_policy_valid` = 0) and
//! the previous policy keeps serving. In shared mode (`--store`) a replica starts
//! [`PolicyState::awaiting`] its first policy from etcd: its cache holds a placeholder
//! that is never served (the gRPC port is served only once [`PolicyState::loaded`]).

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use misaki_policy::{Policy, PolicyErrors};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;

use crate::cache::SnapshotCache;

/// A short, stable identifier of a policy's content (shown on `/policy`, sent to vehicles).
/// The same string vehicles receive with the policy and show on `/links`.
pub fn policy_version(p: &Policy) -> String {
    misaki_policy_wire::version(p)
}

#[derive(Debug)]
struct Status {
    version: String,
    source: String,
    loaded_at: SystemTime,
    /// Why there is no policy in force yet (shared mode before the first one).
    waiting: Option<String>,
    last_error: Option<(SystemTime, PolicyErrors)>,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    reloads: Family<[(&'static str, &'static str); 1], Counter>,
    valid: Gauge,
}

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct PolicyState {
    cache: SnapshotCache,
    status: Arc<Mutex<Status>>,
    /// Followers of the policy in force (the fleet service sends it to vehicles).
    tx: watch::Sender<Arc<Policy>>,
    /// True once a policy is in force (always, outside of shared mode).
    loaded: watch::Sender<bool>,
    metrics: Metrics,
}

impl PolicyState {
    pub fn new(cache: SnapshotCache, source: impl Into<String>) -> Self {
        Self::with(cache, source.into(), None)
    }

    /// No policy in force yet: `cache` holds a placeholder, `/policy` shows no version
    /// and `why`, until the first valid [`PolicyState::apply`].
    pub fn awaiting(
        cache: SnapshotCache,
        source: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Self::with(cache, source.into(), Some(why.into()))
    }

    fn with(cache: SnapshotCache, source: String, waiting: Option<String>) -> Self {
        let policy = cache.policy();
        let metrics = Metrics::default();
        metrics.valid.set(1);
        PolicyState {
            status: Arc::new(Mutex::new(Status {
                version: policy_version(&policy),
                source,
                loaded_at: SystemTime::now(),
                waiting: waiting.clone(),
                last_error: None,
            })),
            tx: watch::channel(policy).0,
            loaded: watch::channel(waiting.is_none()).0,
            cache,
            metrics,
        }
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "misaki_policy_reloads",
            "Policy reloads by result (ok, error, unchanged)",
            self.metrics.reloads.clone(),
        );
        registry.register(
            "misaki_policy_valid",
            "1 if the last policy edit was valid, 0 if it was rejected (the previous policy keeps serving)",
            self.metrics.valid.clone(),
        );
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Policy> {
        self.cache.policy()
    }

    /// The cache this state feeds.
    pub fn cache(&self) -> &SnapshotCache {
        &self.cache
    }

    /// Why no policy is in force yet; `None` once one is.
    pub fn waiting_for(&self) -> Option<String> {
        self.status.lock().expect("status lock").waiting.clone()
    }

    /// Resolves once a policy is in force.
    pub async fn loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Apply the result of loading an edit. Returns the number of compile keys whose
    /// snapshot changed (0 for a rejected or no-op edit).
    pub fn apply(&self, loaded: Result<Policy, PolicyErrors>) -> usize {
        self.apply_from(loaded, None)
    }

    /// [`PolicyState::apply`], naming where a valid policy came from (`/policy`'s
    /// `source`; unchanged when `None`).
    pub fn apply_from(
        &self,
        loaded: Result<Policy, PolicyErrors>,
        source: Option<String>,
    ) -> usize {
        match loaded {
            Ok(policy) => {
                let version = policy_version(&policy);
                let mut st = self.status.lock().expect("status lock");
                st.last_error = None;
                self.metrics.valid.set(1);
                if let Some(source) = source {
                    st.source = source;
                }
                let first = st.waiting.take().is_some();
                if first {
                    self.loaded.send_replace(true);
                }
                if version == st.version && !first {
                    self.metrics
                        .reloads
                        .get_or_create(&[("result", "unchanged")])
                        .inc();
                    return 0;
                }
                st.version = version.clone();
                st.loaded_at = SystemTime::now();
                drop(st);
                let policy = Arc::new(policy);
                let changed = self.cache.set_policy(policy.clone());
                self.tx.send_replace(policy);
                self.metrics
                    .reloads
                    .get_or_create(&[("result", "ok")])
                    .inc();
                tracing::info!(%version, changed_keys = changed, "policy in force");
                changed
            }
            Err(errors) => {
                tracing::warn!(
                    errors = errors.0.len(),
                    "policy edit rejected; the previous policy keeps serving:\n{errors}"
                );
                self.metrics.valid.set(0);
                self.metrics
                    .reloads
                    .get_or_create(&[("result", "error")])
                    .inc();
                self.status.lock().expect("status lock").last_error =
                    Some((SystemTime::now(), errors));
                0
            }
        }
    }

    /// JSON for the admin `/policy` route.
    pub fn to_json(&self) -> serde_json::Value {
        let st = self.status.lock().expect("status lock");
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        };
        let policy = self.cache.policy();
        json!({
            "version": st.waiting.is_none().then_some(&st.version),
            "waiting_for": st.waiting,
            "source": st.source,
            "loaded_at_unix": secs(st.loaded_at),
            "services": policy.services.len(),
            "classes": policy.classes.keys().collect::<Vec<_>>(),
            "uplinks": policy.uplinks.keys().collect::<Vec<_>>(),
            "last_error": st.last_error.as_ref().map(|(at, errs)| json!({
                "at_unix": secs(*at),
                "errors": errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            })),
        })
    }
}
