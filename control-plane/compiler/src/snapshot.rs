//! xDS snapshots: the complete set of resources one node should have, per type.
//!
//! Invariants:
//! - a resource's version is a hash of its encoded bytes, prefixed by the server
//!   instance's prefix, so equal content ⇒ equal version within one server run, and a
//!   restarted server (new prefix) never reuses a version;
//! - resources are `Arc`-shared: nodes that compile to identical resources hold the
//!   same allocation (fleet-scale memory, issue 5);
//! - a type's SotW `version` is a hash over its resources' (name, version, on demand)
//!   triples, so it changes when a resource moves between eager and on demand;
//! - an on-demand resource is part of no wildcard subscription: a client gets it only
//!   by subscribing to its name (Envoy's on-demand scopes and clusters);
//! - names and versions are [`SharedStr`]s: an xDS stream that remembers what it
//!   sent or what its client holds shares them with the snapshot instead of copying.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use xxhash_rust::xxh3::Xxh3;

/// The resource types misaki serves, in push order (SDS → CDS → EDS → LDS → SRDS →
/// RDS): secrets before the clusters and listeners whose TLS uses them, as Envoy's own
/// ADS orders its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    Secret,
    Cluster,
    Endpoint,
    Listener,
    ScopedRoute,
    Route,
}

impl ResourceType {
    /// How many types there are: the length of every per-type array.
    pub const COUNT: usize = 6;

    /// All types, in the order pushes must go out.
    pub const PUSH_ORDER: [ResourceType; Self::COUNT] = [
        ResourceType::Secret,
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::ScopedRoute,
        ResourceType::Route,
    ];

    pub const fn type_url(self) -> &'static str {
        match self {
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::ScopedRoute => {
                "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
            }
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::PUSH_ORDER.into_iter().find(|t| t.type_url() == url)
    }

    /// Short name for logs, metrics and the admin API.
    pub const fn short(self) -> &'static str {
        match self {
            ResourceType::Secret => "sds",
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
            ResourceType::Listener => "lds",
            ResourceType::ScopedRoute => "srds",
            ResourceType::Route => "rds",
        }
    }

    /// CDS, LDS and SRDS are "full state" in SotW: every reply carries all resources,
    /// and a resource missing from a reply is deleted by the client (Envoy's
    /// `ScopedRdsConfigSubscription` removes scopes absent from a SotW update). SDS is
    /// not: Envoy asks for each secret by name, like EDS and RDS.
    pub const fn is_full_state(self) -> bool {
        matches!(
            self,
            ResourceType::Cluster | ResourceType::Listener | ResourceType::ScopedRoute
        )
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
///
/// Its `Debug` shows the body's type and size, never its bytes: a Secret's body holds
/// a private key (edge-netd's tier serves the vehicle's own by SDS).
#[derive(Clone, PartialEq)]
pub struct Resource {
    pub name: SharedStr,
    pub version: SharedStr,
    pub body: Any,
    /// `body` encoded; always equal to `body.encode_to_vec()`.
    wire: Bytes,
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("type_url", &self.body.type_url)
            .field("body_bytes", &self.body.value.len())
            .finish_non_exhaustive()
    }
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
    /// SotW `version_info` for this type: derived from the resources' versions and
    /// which of them are on demand.
    pub version: SharedStr,
    /// Every resource, eager and on demand, by name.
    pub items: BTreeMap<String, Arc<Resource>>,
    /// Names of the resources sent only to clients that subscribe to them by name.
    on_demand: BTreeSet<String>,
    /// On-demand resources that go to a client along with another it names (an
    /// aggregate cluster's members: Envoy fetches the cluster a route names, never
    /// the aggregate's members). Name → its companions.
    companions: BTreeMap<String, Vec<String>>,
    /// The reverse of `companions`: companion → the names that bring it.
    brought_by: BTreeMap<String, Vec<String>>,
}

impl Resources {
    /// Resources that every wildcard subscription gets.
    pub fn from_items(prefix: &str, items: impl IntoIterator<Item = Arc<Resource>>) -> Self {
        Self::with_on_demand(prefix, items, [])
    }

    /// `eager` resources plus `on_demand` ones, which no wildcard subscription covers.
    /// A name in both sets is on demand.
    pub fn with_on_demand(
        prefix: &str,
        eager: impl IntoIterator<Item = Arc<Resource>>,
        on_demand: impl IntoIterator<Item = Arc<Resource>>,
    ) -> Self {
        let mut items: BTreeMap<String, Arc<Resource>> =
            eager.into_iter().map(|r| (r.name.to_string(), r)).collect();
        let mut lazy = BTreeSet::new();
        for r in on_demand {
            lazy.insert(r.name.to_string());
            items.insert(r.name.to_string(), r);
        }
        let mut h = Xxh3::new();
        for (name, r) in &items {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(r.version.as_bytes());
            // The marker keeps the version of an all-eager type what it always was.
            h.update(if lazy.contains(name) { &[1] } else { &[0] });
        }
        Resources {
            version: format!("{prefix}{:016x}", h.digest()).into(),
            items,
            on_demand: lazy,
            companions: BTreeMap::new(),
            brought_by: BTreeMap::new(),
        }
    }

    /// Declare, per name, the on-demand resources that go along with it (see
    /// `companions`). Changes the type version when it changes what a client gets.
    pub fn with_companions(
        mut self,
        prefix: &str,
        pairs: impl IntoIterator<Item = (String, Vec<String>)>,
    ) -> Self {
        for (name, with) in pairs {
            for c in &with {
                self.brought_by
                    .entry(c.clone())
                    .or_default()
                    .push(name.clone());
            }
            self.companions.insert(name, with);
        }
        if !self.companions.is_empty() {
            let mut h = Xxh3::new();
            h.update(self.version.as_bytes());
            for (name, with) in &self.companions {
                h.update(name.as_bytes());
                for c in with {
                    h.update(&[0]);
                    h.update(c.as_bytes());
                }
                h.update(&[1]);
            }
            self.version = format!("{prefix}{:016x}", h.digest()).into();
        }
        self
    }

    /// The resources that go along with `name` to a client that names it.
    pub fn companions<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Arc<Resource>> + 'a {
        self.companions
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|c| self.items.get(c))
    }

    /// Whether a subscription covers `name`: named by it (`named`), brought along by a
    /// name it names, or eager under a wildcard.
    pub fn covers(&self, wildcard: bool, named: impl Fn(&str) -> bool, name: &str) -> bool {
        named(name)
            || (wildcard && !self.is_on_demand(name))
            || self
                .brought_by
                .get(name)
                .is_some_and(|by| by.iter().any(|n| named(n)))
    }

    /// Whether `name` is an on-demand resource of this type (false if it does not exist).
    pub fn is_on_demand(&self, name: &str) -> bool {
        self.on_demand.contains(name)
    }

    /// Whether any resource of this type is on demand.
    pub fn has_on_demand(&self) -> bool {
        !self.on_demand.is_empty()
    }

    /// The resources a wildcard subscription covers, sorted by name.
    pub fn eager(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.items
            .iter()
            .filter(|(n, _)| !self.on_demand.contains(n.as_str()))
            .map(|(_, r)| r)
    }

    /// How many resources a wildcard subscription covers.
    pub fn eager_len(&self) -> usize {
        self.items.len() - self.on_demand.len()
    }
}

/// Everything one node should have.
///
/// Each type's resources are behind their own `Arc`, so a snapshot that differs from
/// another in one type (a vehicle's own tunnel listeners over its compile key's shared
/// snapshot) shares the other types whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    by_type: [Arc<Resources>; ResourceType::COUNT],
}

impl Snapshot {
    pub fn new(
        clusters: Resources,
        endpoints: Resources,
        listeners: Resources,
        routes: Resources,
    ) -> Self {
        Snapshot::default()
            .with(ResourceType::Cluster, clusters)
            .with(ResourceType::Endpoint, endpoints)
            .with(ResourceType::Listener, listeners)
            .with(ResourceType::Route, routes)
    }

    /// This snapshot with `resources` as its content of type `t`.
    /// An `Arc` is shared as it is (the cloud's SRDS of every vehicle is not copied).
    pub fn with(mut self, t: ResourceType, resources: impl Into<Arc<Resources>>) -> Self {
        self.by_type[t.index()] = resources.into();
        self
    }

    /// This snapshot with `scoped_routes` as its SRDS content.
    pub fn with_scoped_routes(self, scoped_routes: impl Into<Arc<Resources>>) -> Self {
        self.with(ResourceType::ScopedRoute, scoped_routes)
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

    fn cluster(name: &str) -> Arc<Resource> {
        let c = Cluster {
            name: name.into(),
            ..Default::default()
        };
        Arc::new(Resource::new("x1-", name, &c))
    }

    #[test]
    fn on_demand_resources_are_kept_apart_and_change_the_version() {
        let all_eager = Resources::from_items("x1-", [cluster("a"), cluster("b")]);
        let lazy_b = Resources::with_on_demand("x1-", [cluster("a")], [cluster("b")]);
        assert_eq!(lazy_b.items.len(), 2, "named lookup sees both");
        assert!(lazy_b.is_on_demand("b") && !lazy_b.is_on_demand("a"));
        assert!(!lazy_b.is_on_demand("missing"));
        assert!(lazy_b.has_on_demand() && !all_eager.has_on_demand());
        let eager: Vec<&str> = lazy_b.eager().map(|r| r.name.as_str()).collect();
        assert_eq!(eager, ["a"]);
        assert_eq!(lazy_b.eager_len(), 1);
        assert_ne!(
            all_eager.version, lazy_b.version,
            "moving to on demand is a change"
        );
        assert_eq!(
            all_eager,
            Resources::with_on_demand("x1-", [cluster("a"), cluster("b")], []),
        );
    }

    #[test]
    fn scoped_routes_sit_between_listeners_and_routes() {
        let s = Snapshot::new(
            Resources::default(),
            Resources::default(),
            Resources::default(),
            Resources::from_items("x1-", [cluster("r")]),
        );
        assert!(s.get(ResourceType::ScopedRoute).items.is_empty());
        let srds = Resources::from_items("x1-", [cluster("scope")]);
        let s = s.with_scoped_routes(srds.clone());
        assert_eq!(s.get(ResourceType::ScopedRoute), &srds);
        assert!(s.get(ResourceType::Route).items.contains_key("r"));
        let order: Vec<&str> = ResourceType::PUSH_ORDER.map(|t| t.short()).to_vec();
        assert_eq!(order, ["sds", "cds", "eds", "lds", "srds", "rds"]);
        assert!(ResourceType::ScopedRoute.is_full_state());
    }

    #[test]
    fn secrets_go_first_are_asked_for_by_name_and_stay_out_of_debug_output() {
        use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            Secret, TlsCertificate, secret,
        };
        assert_eq!(ResourceType::PUSH_ORDER[0], ResourceType::Secret);
        assert_eq!(ResourceType::Secret.index(), 0);
        assert!(!ResourceType::Secret.is_full_state());
        let key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n";
        let s = Secret {
            name: "misaki_vehicle_cert".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                private_key: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineString(key.into())),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let r = Arc::new(Resource::new("x1-", "misaki_vehicle_cert", &s));
        assert_eq!(r.body.type_url, ResourceType::Secret.type_url());
        let snap =
            Snapshot::default().with(ResourceType::Secret, Resources::from_items("x1-", [r]));
        let shown = format!("{snap:?}");
        assert!(shown.contains("misaki_vehicle_cert"), "{shown}");
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("PRIVATE"),
            "{shown}"
        );
        // Not even as the bytes' decimal values.
        let bytes = format!("{:?}", key.as_bytes());
        assert!(!shown.contains(&bytes[1..30]), "{shown}");
    }

    #[test]
    fn type_urls_round_trip() {
        for t in ResourceType::PUSH_ORDER {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
        }
    }
}
