//! Prometheus metrics of the xDS server.
//!
//! Naming rule: `misaki_xds_<name>[_<unit>]`, counters get `_total` from the
//! exposition format. Labels are low-cardinality only: `kind` (`sotw`/`delta`) and
//! `type` (`cds`/`eds`/`lds`/`srds`/`rds`). Node ids never become labels: a fleet of 10,000
//! vehicles would make 10,000 series; per-node detail lives in the `/nodes` JSON.
//!
//! Handles for every label value are created up front, so the hot path increments an
//! atomic and never hashes a label set or takes the family's lock.

use misaki_compiler::snapshot::ResourceType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::status::StreamKind;

type Labels = [(&'static str, &'static str); 1];

#[derive(Debug, Clone)]
pub(crate) struct PerType {
    pub pushes: Counter,
    pub push_bytes: Counter,
    pub acks: Counter,
    pub nacks: Counter,
    pub stale: Counter,
}

/// The server's metric families. Cheap to clone (every metric is an `Arc` inside).
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    streams: Family<Labels, Gauge>,
    pushes: Family<Labels, Counter>,
    push_bytes: Family<Labels, Counter>,
    acks: Family<Labels, Counter>,
    nacks: Family<Labels, Counter>,
    stale: Family<Labels, Counter>,
    node_errors: Counter,
    identity_denied: Counter,
    by_type: [PerType; ResourceType::COUNT],
    sotw_streams: Gauge,
    delta_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let streams = Family::<Labels, Gauge>::default();
        let pushes = Family::<Labels, Counter>::default();
        let push_bytes = Family::<Labels, Counter>::default();
        let acks = Family::<Labels, Counter>::default();
        let nacks = Family::<Labels, Counter>::default();
        let stale = Family::<Labels, Counter>::default();
        let by_type = ResourceType::PUSH_ORDER.map(|t| {
            let l = [("type", t.short())];
            PerType {
                pushes: pushes.get_or_create_owned(&l),
                push_bytes: push_bytes.get_or_create_owned(&l),
                acks: acks.get_or_create_owned(&l),
                nacks: nacks.get_or_create_owned(&l),
                stale: stale.get_or_create_owned(&l),
            }
        });
        let sotw_streams = streams.get_or_create_owned(&[("kind", StreamKind::Sotw.as_str())]);
        let delta_streams = streams.get_or_create_owned(&[("kind", StreamKind::Delta.as_str())]);
        Metrics {
            streams,
            pushes,
            push_bytes,
            acks,
            nacks,
            stale,
            node_errors: Counter::default(),
            identity_denied: Counter::default(),
            by_type,
            sotw_streams,
            delta_streams,
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("misaki_xds");
        r.register(
            "streams",
            "Live ADS streams, by protocol variant",
            self.streams.clone(),
        );
        r.register(
            "pushes",
            "xDS responses sent, by resource type",
            self.pushes.clone(),
        );
        r.register_with_unit(
            "push",
            "Encoded size of the resources in xDS responses sent, by resource type (the response envelope, delta wrappers and removed names not counted)",
            Unit::Bytes,
            self.push_bytes.clone(),
        );
        r.register(
            "acks",
            "Responses the client accepted, by resource type",
            self.acks.clone(),
        );
        r.register(
            "nacks",
            "Responses the client rejected (requests with error_detail), by resource type",
            self.nacks.clone(),
        );
        r.register(
            "stale_requests",
            "SotW requests ignored because their nonce was not the latest, by resource type",
            self.stale.clone(),
        );
        r.register(
            "node_errors",
            "Streams refused because the first request carried no usable node",
            self.node_errors.clone(),
        );
        r.register(
            "identity_denied",
            "Streams refused with PERMISSION_DENIED: the node's role or vehicle id is not the peer certificate's",
            self.identity_denied.clone(),
        );
    }

    pub fn of(&self, t: ResourceType) -> &PerType {
        &self.by_type[t.index()]
    }

    pub fn streams(&self, kind: StreamKind) -> &Gauge {
        match kind {
            StreamKind::Sotw => &self.sotw_streams,
            StreamKind::Delta => &self.delta_streams,
        }
    }

    pub fn node_error(&self) {
        self.node_errors.inc();
    }

    pub fn identity_denied(&self) {
        self.identity_denied.inc();
    }
}
