//! Counters of the endpoint and the forwarder.
//!
//! Naming rule: `misaki_saf_<what>[_<unit>]_total` for counters (prometheus-client adds
//! `_total`), `misaki_saf_<what>[_<unit>]` for gauges; labels are low-cardinality only
//! (`class` from the policy, `status` as an HTTP status code). Bytes "in" are message
//! bodies as the apps sent them, bytes "out" what went on the wire after zstd.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) accepted: Counter,
    pub(crate) rejected: Family<Labels, Counter>,
    pub(crate) delivered: Family<Labels, Counter>,
    pub(crate) retried: Family<Labels, Counter>,
    pub(crate) dead_lettered: Family<Labels, Counter>,
    pub(crate) body_bytes: Counter,
    pub(crate) wire_bytes: Counter,
    pub(crate) compression_ratio: Gauge<f64, AtomicU64>,
    pub(crate) in_flight: Gauge,
    /// Plain totals for the JSON status (families cannot be summed cheaply).
    pub(crate) totals: Totals,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Totals {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub body_bytes: AtomicU64,
    pub wire_bytes: AtomicU64,
}

fn class(c: &str) -> Labels {
    vec![("class".to_string(), c.to_string())]
}

impl Metrics {
    /// Messages of `c` dead-lettered since start.
    pub(crate) fn dead_lettered_of(&self, c: &str) -> u64 {
        self.dead_lettered.get_or_create(&class(c)).get()
    }

    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "misaki_saf_accepted",
            "Requests answered 202 (durably queued)",
            self.accepted.clone(),
        );
        registry.register(
            "misaki_saf_rejected",
            "Ingest requests refused, by HTTP status",
            self.rejected.clone(),
        );
        registry.register(
            "misaki_saf_delivered",
            "Messages delivered (2xx) and acked, by class",
            self.delivered.clone(),
        );
        registry.register(
            "misaki_saf_retried",
            "Deliveries that failed and will be retried (nack), by class",
            self.retried.clone(),
        );
        registry.register(
            "misaki_saf_dead_lettered",
            "Messages refused for good by the destination, by class",
            self.dead_lettered.clone(),
        );
        registry.register(
            "misaki_saf_body_bytes",
            "Body bytes of delivered messages as the apps sent them",
            self.body_bytes.clone(),
        );
        registry.register(
            "misaki_saf_wire_bytes",
            "Body bytes of delivered messages as sent on the wire (after zstd)",
            self.wire_bytes.clone(),
        );
        registry.register(
            "misaki_saf_compression_ratio",
            "Body bytes / wire bytes over all deliveries so far",
            self.compression_ratio.clone(),
        );
        registry.register(
            "misaki_saf_in_flight",
            "Deliveries in flight",
            self.in_flight.clone(),
        );
    }

    pub(crate) fn on_accepted(&self) {
        self.accepted.inc();
        self.totals.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn on_rejected(&self, status: u16) {
        self.rejected
            .get_or_create(&vec![("status".to_string(), status.to_string())])
            .inc();
        self.totals.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn on_delivered(&self, c: &str, body: usize, wire: usize) {
        self.delivered.get_or_create(&class(c)).inc();
        self.body_bytes.inc_by(body as u64);
        self.wire_bytes.inc_by(wire as u64);
        let t = &self.totals;
        t.delivered.fetch_add(1, Ordering::Relaxed);
        let b = t.body_bytes.fetch_add(body as u64, Ordering::Relaxed) + body as u64;
        let w = t.wire_bytes.fetch_add(wire as u64, Ordering::Relaxed) + wire as u64;
        if w > 0 {
            self.compression_ratio.set(b as f64 / w as f64);
        }
    }

    pub(crate) fn on_retried(&self, c: &str) {
        self.retried.get_or_create(&class(c)).inc();
        self.totals.retried.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn on_dead_lettered(&self, c: &str) {
        self.dead_lettered.get_or_create(&class(c)).inc();
        self.totals.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
}

/// The queue's own counters and gauges, read from `Queue::stats` at each scrape so they
/// can never drift from the queue: depth and bytes per class, and every drop (expiry,
/// eviction, dead letter) per class.
#[derive(Debug)]
pub(crate) struct QueueCollector(pub(crate) std::sync::Arc<misaki_queue::Queue>);

impl prometheus_client::collector::Collector for QueueCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let stats = self.0.stats();
        let gauge = |n: u64| ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));

        let g = gauge(0);
        let mut fam = encoder.encode_descriptor(
            "misaki_saf_queue_depth_messages",
            "Messages queued (ready + in flight) by class",
            None,
            g.metric_type(),
        )?;
        for d in &stats.depth {
            gauge(d.ready + d.in_flight).encode(fam.encode_family(&class(&d.class))?)?;
        }
        let mut fam = encoder.encode_descriptor(
            "misaki_saf_queue_depth_bytes",
            "Bytes queued on disk by class",
            None,
            g.metric_type(),
        )?;
        for d in &stats.depth {
            gauge(d.bytes).encode(fam.encode_family(&class(&d.class))?)?;
        }
        let c = ConstCounter::new(0u64);
        let mut fam = encoder.encode_descriptor(
            "misaki_saf_queue_dropped",
            "Messages dropped from the queue by class and reason (expired, evicted, dead_lettered)",
            None,
            c.metric_type(),
        )?;
        for d in &stats.depth {
            for (reason, n) in [
                ("expired", d.expired),
                ("evicted", d.evicted),
                ("dead_lettered", d.dead_lettered),
            ] {
                let mut labels = class(&d.class);
                labels.push(("reason".to_string(), reason.to_string()));
                ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
