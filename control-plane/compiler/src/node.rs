//! Who is asking: the role and vehicle id of an xDS client, from its Envoy `Node`.
//!
//! Convention (documented in docs/node-identity.md):
//! - role: `node.metadata.misaki_role` if set, else `node.cluster`; one of
//!   `vehicle`, `cloud` (`edge` is served as `cloud`: an edge sidecar fronts edge
//!   services the same way). Anything else is rejected.
//! - vehicle id (role `vehicle` only): `node.metadata.vehicle_id` if set, else `node.id`.
//!
//! - tls_dir: `node.metadata.tls_dir`, else [`DEFAULT_TLS_DIR`]: where the node keeps
//!   its certificate, key, the fleet CA and their file-based SDS files, for data-plane
//!   mTLS (`mesh.mtls`). misaki-cp only names the files; it never holds a key.
//!
//! - proxyless: `node.user_agent_name` starts with `gRPC` (gRPC's xDS clients say
//!   "gRPC Python", "gRPC Go", ...; Envoy says "envoy"). A proxyless client resolves
//!   `xds:///<service>` by asking for a Listener of that name, so it gets an
//!   `api_listener` per service on top of its role's resources.
//!
//! Metadata is a protobuf `Struct`; only string values are read.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;

/// Where a node's certificates and SDS files are when its metadata does not say.
pub const DEFAULT_TLS_DIR: &str = "/etc/misaki/tls";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Vehicle,
    Cloud,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Vehicle => "vehicle",
            Role::Cloud => "cloud",
        }
    }
}

/// The parts of an Envoy node the compiler needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub id: String,
    pub role: Role,
    /// Set for vehicle nodes.
    pub vehicle_id: Option<String>,
    /// A proxyless gRPC client rather than an Envoy.
    pub proxyless: bool,
    /// The client speaks incremental (delta) xDS, so it can take resources on demand.
    /// Not part of the `Node`: the xDS server sets it from the stream's protocol.
    pub delta: bool,
    /// `metadata.tls_dir` (no trailing `/`); `None`: [`DEFAULT_TLS_DIR`].
    pub tls_dir: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("request carries no node (the first request on a stream must)")]
    Missing,
    #[error("node has an empty id")]
    EmptyId,
    #[error(
        "node {id:?}: unknown role {role:?} (set node.cluster or metadata.misaki_role to \"vehicle\" or \"cloud\")"
    )]
    UnknownRole { id: String, role: String },
}

fn metadata_str<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    let v = node.metadata.as_ref()?.fields.get(key)?;
    match v.kind.as_ref()? {
        Kind::StringValue(s) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    }
}

impl NodeInfo {
    /// The directory of the node's certificates and file-based SDS files.
    pub fn tls_dir(&self) -> &str {
        self.tls_dir.as_deref().unwrap_or(DEFAULT_TLS_DIR)
    }

    pub fn from_node(node: Option<&Node>) -> Result<Self, NodeError> {
        let node = node.ok_or(NodeError::Missing)?;
        if node.id.is_empty() {
            return Err(NodeError::EmptyId);
        }
        let role_str = metadata_str(node, "misaki_role").unwrap_or(node.cluster.as_str());
        let role = match role_str {
            "vehicle" => Role::Vehicle,
            "cloud" | "edge" => Role::Cloud,
            other => {
                return Err(NodeError::UnknownRole {
                    id: node.id.clone(),
                    role: other.to_string(),
                });
            }
        };
        let vehicle_id = match role {
            Role::Vehicle => Some(
                metadata_str(node, "vehicle_id")
                    .unwrap_or(node.id.as_str())
                    .to_string(),
            ),
            Role::Cloud => None,
        };
        Ok(NodeInfo {
            id: node.id.clone(),
            role,
            vehicle_id,
            proxyless: node.user_agent_name.starts_with("gRPC"),
            delta: false,
            tls_dir: metadata_str(node, "tls_dir").map(|d| match d.trim_end_matches('/') {
                "" => "/".to_string(),
                d => d.to_string(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{Struct, Value};

    fn node(id: &str, cluster: &str, meta: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            cluster: cluster.into(),
            metadata: Some(Struct {
                fields: meta
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn vehicle_id_defaults_to_node_id_and_metadata_overrides_it() {
        let n = NodeInfo::from_node(Some(&node("car-7", "vehicle", &[]))).unwrap();
        assert_eq!(n.role, Role::Vehicle);
        assert_eq!(n.vehicle_id.as_deref(), Some("car-7"));
        let n = NodeInfo::from_node(Some(&node(
            "sidecar-1",
            "x",
            &[("misaki_role", "vehicle"), ("vehicle_id", "VIN123")],
        )))
        .unwrap();
        assert_eq!(n.vehicle_id.as_deref(), Some("VIN123"));
    }

    #[test]
    fn tls_dir_comes_from_metadata_without_a_trailing_slash() {
        let n = NodeInfo::from_node(Some(&node("c", "cloud", &[]))).unwrap();
        assert_eq!((n.tls_dir.as_deref(), n.tls_dir()), (None, DEFAULT_TLS_DIR));
        let n =
            NodeInfo::from_node(Some(&node("c", "cloud", &[("tls_dir", "/run/tls/")]))).unwrap();
        assert_eq!(n.tls_dir(), "/run/tls");
        let n = NodeInfo::from_node(Some(&node("c", "vehicle", &[("tls_dir", "/")]))).unwrap();
        assert_eq!(n.tls_dir(), "/");
    }

    #[test]
    fn grpc_user_agents_are_proxyless_and_envoy_is_not() {
        let mut n = node("car-7", "vehicle", &[]);
        n.user_agent_name = "gRPC Python".into();
        assert!(NodeInfo::from_node(Some(&n)).unwrap().proxyless);
        n.user_agent_name = "envoy".into();
        assert!(!NodeInfo::from_node(Some(&n)).unwrap().proxyless);
    }

    #[test]
    fn unknown_role_and_missing_node_are_errors() {
        assert_eq!(NodeInfo::from_node(None), Err(NodeError::Missing));
        assert!(matches!(
            NodeInfo::from_node(Some(&node("a", "spaceship", &[]))),
            Err(NodeError::UnknownRole { .. })
        ));
        assert_eq!(
            NodeInfo::from_node(Some(&node("c", "edge", &[])))
                .unwrap()
                .role,
            Role::Cloud
        );
    }
}
