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
