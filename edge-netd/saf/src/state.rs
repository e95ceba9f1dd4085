//! What the ingest endpoint, the forwarder, its delivery tasks and the status pages share.
//! Its own module so that each of them imports it from here and none imports another.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use misaki_policy::Policy;
use misaki_queue::Queue;
use tokio::sync::{Notify, watch};

use crate::{
    config::{HttpVersion, SafConfig},
    metrics::Metrics,
    tls::{TlsConnector, TlsIdentity},
    uplink::UplinkView,
};

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;
pub(crate) type HttpsClient = Client<TlsConnector, Full<Bytes>>;

/// Connection pool key: (interface, HTTP version).
pub(crate) type PoolKey = (Option<String>, HttpVersion);

/// Shared by the endpoint, the forwarder and the delivery tasks.
pub(crate) struct Inner {
    pub(crate) config: SafConfig,
    pub(crate) queue: Arc<Queue>,
    pub(crate) policy: watch::Receiver<Arc<Policy>>,
    pub(crate) uplinks: Arc<dyn UplinkView>,
    pub(crate) metrics: Metrics,
    /// Poked by every accepted message and finished delivery.
    pub(crate) wake: Notify,
    pub(crate) classes: Mutex<HashMap<String, ClassState>>,
    /// The forwarder's connection pools, one per (interface, HTTP version).
    pub(crate) clients: Mutex<HashMap<PoolKey, HttpClient>>,
    /// The vehicle's certificate and the https pools made with it.
    pub(crate) tls: Mutex<TlsState>,
    pub(crate) stop: watch::Receiver<bool>,
}

/// Retry state of one class.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClassState {
    pub(crate) failures: u32,
    pub(crate) retry_at: Option<Instant>,
    pub(crate) probe_in_flight: bool,
    pub(crate) last_error: Option<String>,
}

/// The identity `https://` deliveries present, and the pools that present it.
#[derive(Default)]
pub(crate) struct TlsState {
    /// `None` until edge-netd hands one over: https deliveries are not attempted.
    pub(crate) identity: Option<Arc<TlsIdentity>>,
    /// Pools of `identity` only: emptied whenever it changes or expires. A dropped pool
    /// closes its idle connections at once and its busy ones when their request ends.
    pub(crate) clients: HashMap<PoolKey, HttpsClient>,
}

impl Inner {
    pub(crate) fn tls(&self) -> MutexGuard<'_, TlsState> {
        self.tls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn classes(&self) -> MutexGuard<'_, HashMap<String, ClassState>> {
        self.classes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
