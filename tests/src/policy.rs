//! Mesh policy documents for tests and benchmarks: the mesh ports, the uplinks and
//! classes a test chooses, and cloud services, written as the policy YAML v1 that
//! `misaki-cp serve --policy` reads.

use crate::process::free_port;

/// The three mesh ports of a policy (`mesh:`), each one the sidecar under test binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshPorts {
    pub outbound: u16,
    pub inbound: u16,
    pub cloud: u16,
}

impl MeshPorts {
    /// Three fresh ephemeral ports.
    pub fn fresh() -> MeshPorts {
        MeshPorts {
            outbound: free_port(),
            inbound: free_port(),
            cloud: free_port(),
        }
    }
}

/// One uplink `wifi` and one class `standard` over it (timeout 5 s, one retry).
pub const WIFI_STANDARD: &str = "uplinks:
  - { name: wifi, kind: wifi, cost: 1 }
classes:
  - { name: standard, timeout: 5s, retries: 1, uplinks: [wifi] }
";

/// A cloud service of a policy: one endpoint on 127.0.0.1, one route prefix, a class.
#[derive(Debug, Clone, Copy)]
pub struct CloudService<'a> {
    pub name: &'a str,
    pub upstream: u16,
    pub route: &'a str,
    pub class: &'a str,
}

/// A whole policy document: `version: 1`, the mesh `ports`, then `head` (its `uplinks:`
/// and `classes:` sections, as YAML), then `services:` with `services` in order. The
/// document ends inside `services:`, so a test may append more service entries.
pub fn policy_doc(ports: &MeshPorts, head: &str, services: &[CloudService<'_>]) -> String {
    let mut doc = format!(
        "version: 1\nmesh:\n  vehicle_outbound_port: {}\n  vehicle_inbound_port: {}\n  cloud_inbound_port: {}\n",
        ports.outbound, ports.inbound, ports.cloud
    );
    doc.push_str(head);
    doc.push_str("services:\n");
    for s in services {
        doc.push_str(&format!(
            "  - name: {}\n    location: cloud\n    port: 8080\n    endpoints: [\"127.0.0.1:{}\"]\n    routes: [\"{}\"]\n    class: {}\n",
            s.name, s.upstream, s.route, s.class
        ));
    }
    doc
}
