//! xDS snapshots: the complete set of resources one node should have, per type.
//!
//! Invariants:
//! - a resource's version is a hash of its encoded bytes, prefixed by the server
//!   instance's prefix, so equal content ⇒ equal version within one server run, and a
//!   restarted server (new prefix) never reuses a version;
//! - resources are `Arc`-shared: nodes that compile to identical resources hold the
//!   same allocation (fleet-scale memory, issue 5);
//! - a type's SotW `version` is a hash over its resources' (name, version) pairs;
//! - names and versions are [`SharedStr`]s: an xDS stream that remembers what it
//!   sent or what its client holds shares them with the snapshot instead of copying.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use xxhash_rust::xxh3::Xxh3;

/// The four resource types misaki serves, in push order (CDS → EDS → LDS → RDS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl ResourceType {
    /// All types, in the order pushes must go out.
    pub const PUSH_ORDER: [ResourceType; 4] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    pub const fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::PUSH_ORDER.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for logs, metrics and the admin API.
    pub const fn short(self) -> &'static str {
        match self {
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
        }
    }

    /// LDS and CDS are "full state" in SotW: every reply carries all resources, and a
    /// resource missing from a reply is deleted by the client.
    pub const fn is_full_state(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    pub const fn index(self) -> usize {
        self as usize
    }
}

/// An immutable string that clones by reference count (an `Arc<str>`).
///
/// Reads like a `&str` (it derefs to one) and compares with `str` and `String` both
/// ways, so code written against `String` fields mostly compiles unchanged.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedStr(Arc<str>);

impl SharedStr {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SharedStr {
    fn default() -> Self {
        SharedStr(Arc::from(""))
    }
}

impl Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl From<&str> for SharedStr {
    fn from(s: &str) -> Self {
        SharedStr(s.into())
    }
}

impl From<&String> for SharedStr {
    fn from(s: &String) -> Self {
        SharedStr(s.as_str().into())
    }
}

impl From<String> for SharedStr {
    fn from(s: String) -> Self {
        SharedStr(s.into())
    }
}

impl From<Arc<str>> for SharedStr {
    fn from(s: Arc<str>) -> Self {
        SharedStr(s)
    }
}

impl From<SharedStr> for String {
    fn from(s: SharedStr) -> Self {
        s.0.as_ref().to_owned()
    }
}

impl From<SharedStr> for Arc<str> {
    fn from(s: SharedStr) -> Self {
        s.0
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        *self == *other.0
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        **self == *other.0
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        **self == *other.0
    }
}

/// One named, versioned, encoded resource.
///
/// Besides the decoded-form `body`, a resource keeps its wire form: the encoded
/// `google.protobuf.Any`, exactly what goes into a `DiscoveryResponse.resources` element
/// or a delta `Resource.resource`. It is computed once, here, and shared (`Bytes`) by
/// every stream that sends the resource, so a fleet-wide change encodes each resource
/// once instead of once per stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: SharedStr,
    pub version: SharedStr,
    pub body: Any,
    /// `body` encoded; always equal to `body.encode_to_vec()`.
    wire: Bytes,
}

impl Resource {
    /// Build a resource; its version is `{prefix}{content hash}`.
    pub fn new<M: Message + prost::Name>(
        prefix: &str,
        name: impl Into<SharedStr>,
        msg: &M,
    ) -> Self {
        let bytes = msg.encode_to_vec();
        let version = format!("{prefix}{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
        Self::from_any(
            name,
            version,
            Any {
                type_url: M::type_url(),
                value: bytes,
            },
        )
    }

    /// A resource with an explicit version and an already-encoded body.
    pub fn from_any(name: impl Into<SharedStr>, version: impl Into<SharedStr>, body: Any) -> Self {
        let wire = Bytes::from(body.encode_to_vec());
        Resource {
            name: name.into(),
            version: version.into(),
            body,
            wire,
        }
    }

    /// The encoded `google.protobuf.Any` (type URL and value), shared by reference count.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }
}

/// The resources of one type for one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// SotW `version_info` for this type: derived from the resources' versions.
    pub version: SharedStr,
    pub items: BTreeMap<String, Arc<Resource>>,
}

impl Resources {
    pub fn from_items(prefix: &str, items: impl IntoIterator<Item = Arc<Resource>>) -> Self {
        let items: BTreeMap<String, Arc<Resource>> =
            items.into_iter().map(|r| (r.name.to_string(), r)).collect();
        let mut h = Xxh3::new();
        for (name, r) in &items {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
            h.update(&[0]);
        }
        Resources {
            version: format!("{prefix}{:016x}", h.digest()).into(),
            items,
        }
    }
}

/// Everything one node should have.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    by_type: [Resources; 4],
}

impl Snapshot {
    pub fn new(
        clusters: Resources,
        endpoints: Resources,
        listeners: Resources,
        routes: Resources,
    ) -> Self {
        Snapshot {
            by_type: [clusters, endpoints, listeners, routes],
        }
    }

    pub fn get(&self, t: ResourceType) -> &Resources {
        &self.by_type[t.index()]
    }

    /// Every type has the same version in both: nothing to push.
    pub fn same_versions(&self, other: &Snapshot) -> bool {
        ResourceType::PUSH_ORDER
            .iter()
            .all(|t| self.get(*t).version == other.get(*t).version)
    }

    /// Replace `current` with `next` unless it has the same versions; whether it did
    /// (for a `watch::Sender::send_if_modified` closure: wake followers only on change).
    pub fn replace_if_changed(current: &mut std::sync::Arc<Snapshot>, next: Snapshot) -> bool {
        if current.same_versions(&next) {
            false
        } else {
            *current = std::sync::Arc::new(next);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    #[test]
    fn equal_content_gets_equal_version_and_prefix_separates_server_runs() {
        let c = Cluster {
            name: "a".into(),
            ..Default::default()
        };
        let r1 = Resource::new("x1-", "a", &c);
        let r2 = Resource::new("x1-", "a", &c);
        let r3 = Resource::new("x2-", "a", &c);
        assert_eq!(r1.version, r2.version);
        assert_ne!(r1.version, r3.version);
        assert_eq!(r1.body.type_url, ResourceType::Cluster.type_url());
        assert_eq!(r1.wire().as_ref(), r1.body.encode_to_vec().as_slice());
    }

    #[test]
    fn shared_str_reads_and_compares_like_a_string() {
        let s = SharedStr::from("abc");
        let t = s.clone();
        assert!(
            std::ptr::eq(s.as_str(), t.as_str()),
            "clones share the text"
        );
        assert_eq!(s, "abc");
        assert_eq!(s, "abc".to_string());
        assert_eq!("abc".to_string(), s);
        assert_eq!(format!("{s} {s:?}"), "abc \"abc\"");
        assert!(s.starts_with("ab"));
        assert_eq!(String::from(s), "abc");
    }

    #[test]
    fn type_urls_round_trip() {
        for t in ResourceType::PUSH_ORDER {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
        }
    }
}
