//! Fleet certificates for end-to-end tests, made by misaki-cp's own CA command line
//! (`misaki-cp ca init | issue | revoke`), never checked in; and the mutual-TLS Envoy
//! bootstrap (`envoy-configs/vehicle-sidecar-mtls.yaml` with its file-based SDS).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{free_port, repo_root, target_bin};

/// Where the shipped bootstrap and SDS files expect the vehicle's certificates.
pub const TLS_DIR_IN_CONFIGS: &str = "/etc/misaki/tls";

/// Run `misaki-cp ca ARGS`; its stdout. Panics with its output if it fails.
pub fn ca_cli(args: &[&str]) -> String {
    let out = Command::new(target_bin("misaki-cp"))
        .arg("ca")
        .args(args)
        .output()
        .expect("run misaki-cp ca");
    assert!(
        out.status.success(),
        "misaki-cp ca {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fleet CA in a directory, made by `misaki-cp ca init`.
#[derive(Debug)]
pub struct FleetCa {
    pub dir: PathBuf,
}

impl FleetCa {
    pub fn init(dir: &Path) -> FleetCa {
        ca_cli(&["init", &dir.display().to_string()]);
        FleetCa {
            dir: dir.to_path_buf(),
        }
    }

    /// `misaki-cp ca issue DIR IDENTITY... --out OUT` (e.g. `["--vehicle", "car-1"]`);
    /// what it printed (the identity, serial and expiry).
    pub fn issue(&self, identity: &[&str], out: &Path) -> String {
        let dir = self.dir.display().to_string();
        let out = out.display().to_string();
        let mut args = vec!["issue", dir.as_str()];
        args.extend_from_slice(identity);
        args.extend_from_slice(&["--out", out.as_str()]);
        ca_cli(&args)
    }

    /// `misaki-cp serve` flags for mutual TLS: the server certificate in `server` (from
    /// `issue --server`), this CA for clients, its CRL, and this CA for enrolment.
    pub fn serve_args(&self, server: &Path) -> Vec<String> {
        let f = |p: PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            f(server.join("cert.pem")),
            "--tls-key".into(),
            f(server.join("key.pem")),
            "--client-ca".into(),
            f(self.dir.join("ca.pem")),
            "--crl".into(),
            f(self.dir.join("crl.pem")),
            "--ca".into(),
            f(self.dir.clone()),
        ]
    }
}

/// Install `envoy-configs/sds/*.yaml` into `tls_dir` (which holds `cert.pem`, `key.pem`
/// and `ca.pem` from `ca issue --out`), pointing at the files there.
pub fn install_sds(tls_dir: &Path) {
    let sds = repo_root().join("envoy-configs/sds");
    for entry in fs::read_dir(&sds).expect("envoy-configs/sds") {
        let path = entry.expect("sds entry").path();
        let text = fs::read_to_string(&path).expect("read SDS template");
        let text = text.replace(TLS_DIR_IN_CONFIGS, &tls_dir.display().to_string());
        fs::write(tls_dir.join(path.file_name().expect("a file")), text).expect("write SDS");
    }
}

/// `envoy-configs/vehicle-sidecar-mtls.yaml` for one Envoy: misaki-cp's port, the node
/// (`node.id`, `metadata.vehicle_id`), a fresh admin port and the certificates (with
/// their SDS files, [`install_sds`]) in `tls_dir`. Returns the text and the admin port.
pub fn mtls_bootstrap(
    node_id: &str,
    vehicle_id: &str,
    xds_port: u16,
    tls_dir: &Path,
) -> (String, u16) {
    let template = fs::read_to_string(repo_root().join("envoy-configs/vehicle-sidecar-mtls.yaml"))
        .expect("read vehicle-sidecar-mtls.yaml");
    let admin_port = free_port();
    let cfg = template
        .replace("port_value: 18000", &format!("port_value: {xds_port}"))
        .replace("port_value: 19905", &format!("port_value: {admin_port}"))
        .replace("id: vehicle-demo-1", &format!("id: {node_id}"))
        .replace("vehicle_id: demo-1", &format!("vehicle_id: {vehicle_id}"))
        .replace(TLS_DIR_IN_CONFIGS, &tls_dir.display().to_string());
    (cfg, admin_port)
}

/// `envoy-configs/<template>` (a sidecar fed by misaki-cp: `vehicle-sidecar.yaml`,
/// `vehicle-sidecar-delta.yaml`, `cloud-sidecar.yaml`) for one Envoy with data-plane
/// mTLS: misaki-cp's port, the node id (and `metadata.vehicle_id`, if the template has
/// one), a fresh admin port, and `metadata.tls_dir` naming `tls_dir` (which holds the
/// certificates and their SDS files, [`install_sds`]). Returns the text and the admin port.
pub fn sidecar_bootstrap(
    template: &str,
    node_id: &str,
    xds_port: u16,
    tls_dir: &Path,
) -> (String, u16) {
    let text = fs::read_to_string(repo_root().join("envoy-configs").join(template))
        .unwrap_or_else(|e| panic!("read {template}: {e}"));
    let admin_port = free_port();
    let tls_line = format!("    tls_dir: {}", tls_dir.display());
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let indent = &line[..line.len() - line.trim_start().len()];
        let l = line.trim_start();
        if line.contains("port_value: 18000") {
            out.push(line.replace("18000", &xds_port.to_string()));
        } else if line.contains("port_value: 1990") {
            let (head, _) = line.split_once("port_value:").expect("port line");
            out.push(format!("{head}port_value: {admin_port} }}"));
        } else if indent == "  " && l.starts_with("id: ") {
            out.push(format!("  id: {node_id}"));
        } else if indent == "    " && l.starts_with("vehicle_id: ") {
            out.push(format!("    vehicle_id: {node_id}"));
        } else if indent == "  " && l.starts_with("cluster: ") {
            out.push(line.to_string());
            if lines.peek().is_some_and(|n| n.trim_end() == "  metadata:") {
                out.push(lines.next().expect("peeked").to_string());
            } else {
                out.push("  metadata:".to_string());
            }
            out.push(tls_line.clone());
        } else {
            out.push(line.to_string());
        }
    }
    let mut cfg = out.join("\n");
    cfg.push('\n');
    assert!(cfg.contains(&tls_line), "{template}: no node.cluster line");
    (cfg, admin_port)
}

/// One mTLS client of [`mtls_client_bootstrap`]: plain HTTP/1.1 in on `listen`, out over
/// TLS and HTTP/2 to the server with the certificate and key in `cert_dir` (`cert.pem`,
/// `key.pem`), forwarding whatever `x-forwarded-client-cert` the request carries.
#[derive(Debug, Clone)]
pub struct MtlsClient {
    pub name: String,
    pub listen: u16,
    pub cert_dir: PathBuf,
}

/// A static Envoy (no control plane) whose listeners are `clients`, each calling
/// `127.0.0.1:server_port` over mutual TLS with its own certificate, and trusting the
/// server's certificate if it chains to `server_ca` (PEM file). Returns the text and the
/// admin port. For testing what a TLS server accepts from whom.
pub fn mtls_client_bootstrap(
    clients: &[MtlsClient],
    server_port: u16,
    server_ca: &Path,
) -> (String, u16) {
    let admin_port = free_port();
    let mut listeners = String::new();
    let mut clusters = String::new();
    for c in clients {
        let (name, dir) = (&c.name, c.cert_dir.display());
        listeners.push_str(&format!(
            r#"    - name: {name}
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: {name}
                forward_client_cert_details: ALWAYS_FORWARD_ONLY
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: {name} }} }}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#,
            listen = c.listen
        ));
        clusters.push_str(&format!(
            r#"    - name: {name}
      type: STATIC
      connect_timeout: 2s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2"]
            tls_certificates:
              - certificate_chain: {{ filename: {dir}/cert.pem }}
                private_key: {{ filename: {dir}/key.pem }}
            validation_context:
              trusted_ca: {{ filename: {ca} }}
      load_assignment:
        cluster_name: {name}
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {server_port} }} }} }}
"#,
            ca = server_ca.display()
        ));
    }
    let cfg = format!(
        "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}\nstatic_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}"
    );
    (cfg, admin_port)
}
