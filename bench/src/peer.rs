//! What the peer setups share: an Envoy started from a bootstrap written here, and
//! the one listener and one cluster they serve (the same shape misaki gives `maps`:
//! a listener routing every path to one cluster with one static endpoint).

use std::path::Path;

use misaki_e2e::{Envoy, free_port};

/// The cluster both peers flip between upstream A and B.
pub const CLUSTER: &str = "svc";

/// Start the real Envoy on `bootstrap` (which must use `admin_port`), with the same
/// flags the harness uses for misaki's Envoys, and wait until it is LIVE.
pub fn start_envoy(
    name: &str,
    bootstrap: &str,
    admin_port: u16,
    dir: &Path,
) -> anyhow::Result<Envoy> {
    Envoy::try_start_config(name, bootstrap, admin_port, dir).map_err(anyhow::Error::msg)
}

/// A fresh admin port for a peer's Envoy.
pub fn admin_port() -> u16 {
    free_port()
}

/// The listener, as a YAML list item (indented by `indent` spaces), routing every
/// path to [`CLUSTER`].
pub fn listener_yaml(port: u16, indent: usize) -> String {
    let text = format!(
        r#"- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: bench_listener
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {port} }}
  filter_chains:
    - filters:
        - name: envoy.filters.network.http_connection_manager
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
            stat_prefix: bench
            route_config:
              name: bench_routes
              virtual_hosts:
                - name: all
                  domains: ["*"]
                  routes:
                    - match: {{ prefix: "/" }}
                      route: {{ cluster: {CLUSTER} }}
            http_filters:
              - name: envoy.filters.http.router
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    );
    indent_lines(&text, indent)
}

/// The cluster with its one endpoint, as a YAML list item. `endpoint_port` is written
/// verbatim, so it may be a template expression.
pub fn cluster_yaml(endpoint_port: &str, indent: usize) -> String {
    let text = format!(
        r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {CLUSTER}
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: {CLUSTER}
    endpoints:
      - lb_endpoints:
          - endpoint:
              address:
                socket_address: {{ address: 127.0.0.1, port_value: {endpoint_port} }}
"#
    );
    indent_lines(&text, indent)
}

fn indent_lines(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// The admin block and node of a peer's bootstrap.
pub fn bootstrap_head(node: &str, admin_port: u16) -> String {
    format!(
        r#"node:
  id: {node}
  cluster: bench
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
"#
    )
}
