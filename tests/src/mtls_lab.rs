//! Pieces of the data-plane mutual-TLS labs (`mesh.mtls`): a service that echoes the
//! request headers it got (so a test sees what the service saw: `x-misaki-vehicle`,
//! `x-forwarded-client-cert`), certificates with their file-based SDS files, and a cloud
//! sidecar fed by misaki-cp.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crate::policy::MeshPorts;
use crate::tls::{FleetCa, install_sds, sidecar_bootstrap};
use crate::{ControlPlane, Envoy};

/// One request as [`HeaderEcho`] received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoedRequest {
    pub method: String,
    pub path: String,
    /// Each header line in order, the name lowercased, the value trimmed.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl EchoedRequest {
    /// Every value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An HTTP/1.1 service that answers every request with its request headers, one
/// `name: value` line each (names lowercased), so a test sees what the service saw, and
/// keeps every request ([`HeaderEcho::requests`]). Bodies may be sized or chunked
/// (Envoy's decompressor forwards chunked).
#[derive(Debug)]
pub struct HeaderEcho {
    pub port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<EchoedRequest>>>,
}

impl HeaderEcho {
    pub fn start() -> HeaderEcho {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stopped, record) = (stop.clone(), seen.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(conn) = conn {
                    let record = record.clone();
                    thread::spawn(move || echo_headers(conn, &record));
                }
            }
        });
        HeaderEcho { port, stop, seen }
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<EchoedRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for HeaderEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serve requests on one (keep-alive) connection until it closes.
fn echo_headers(mut conn: TcpStream, seen: &Mutex<Vec<EchoedRequest>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(clone) = conn.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or("?").to_string();
        let path = words.next().unwrap_or("?").to_string();
        let Ok(Some(head)) = crate::http::Headers::read(&mut reader) else {
            return;
        };
        let headers: Vec<(String, String)> = head
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect();
        let text: String = headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        let Some(body) = head.read_body(&mut reader) else {
            return;
        };
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(EchoedRequest {
                method,
                path,
                headers,
                body,
            });
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if conn.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// The values of header `name` in a [`HeaderEcho`] answer's body.
pub fn echoed(body: &str, name: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .collect()
}

/// The `key=value` field `key` of the one XFCC element in `xfcc` (`By`, `Hash`, `URI`...).
pub fn xfcc_field<'a>(xfcc: &'a str, key: &str) -> Option<&'a str> {
    xfcc.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

/// A policy with `mesh.mtls: <mtls>` and one cloud service `maps` (`protocol`, instance
/// at `127.0.0.1:<upstream>`, routed by `route`) over uplink `lte`.
pub fn single_service_policy(
    ports: &MeshPorts,
    mtls: &str,
    protocol: &str,
    upstream: u16,
    route: &str,
) -> String {
    format!(
        r#"version: 1
mesh: {{ vehicle_outbound_port: {}, vehicle_inbound_port: {}, cloud_inbound_port: {}, mtls: {mtls} }}
uplinks:
  - {{ name: lte, kind: lte }}
classes:
  - {{ name: standard, timeout: 5s, uplinks: [lte] }}
services:
  - {{ name: maps, location: cloud, protocol: {protocol}, port: 8080, endpoints: ["127.0.0.1:{upstream}"], routes: ["{route}"], class: standard }}
"#,
        ports.outbound, ports.inbound, ports.cloud
    )
}

/// `ca issue IDENTITY --out dir/name` with the SDS files installed next to it; the
/// directory.
pub fn issue_with_sds(dir: &Path, ca: &FleetCa, name: &str, identity: &[&str]) -> PathBuf {
    let tls = dir.join(name);
    ca.issue(identity, &tls);
    install_sds(&tls);
    tls
}

/// A cloud sidecar (`envoy-configs/cloud-sidecar.yaml`, node `cloud-1`) fed by `cp`,
/// with a `--cloud maps` certificate by file-based SDS from `dir/cloud-tls` (its
/// `tls_dir`, which also holds the fleet CA as `ca.pem`); that directory and the Envoy.
pub fn cloud_sidecar(dir: &Path, ca: &FleetCa, cp: &ControlPlane) -> (PathBuf, Envoy) {
    let tls = issue_with_sds(dir, ca, "cloud-tls", &["--cloud", "maps"]);
    let (cfg, admin) = sidecar_bootstrap("cloud-sidecar.yaml", "cloud-1", cp.xds_port, &tls);
    let envoy =
        Envoy::try_start_config("cloud-1", &cfg, admin, dir).unwrap_or_else(|e| panic!("{e}"));
    (tls, envoy)
}
