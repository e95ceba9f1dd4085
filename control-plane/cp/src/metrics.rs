//! Metric naming rule (after Vector's instrumentation spec): `misaki_<component>_<name>`
//! with a unit suffix where there is one (`_seconds`, `_bytes`) and `_total` on
//! counters (prometheus-client appends it); labels are low-cardinality (type, result,
//! kind) — never node or vehicle ids, which belong on `/nodes` and `/fleet`.

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Render a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}
