//! State-of-the-world ADS: the per-stream protocol state machine's own rules. What it
//! shares with delta (nonces, ACK/NACK bookkeeping, the push loop in push order,
//! warming) is written once in `machine.rs`, which lists those rules.
//!
//! Invariants (Envoy's `xds_protocol.rst` is the reference):
//! - a request whose `response_nonce` is not the latest nonce this stream sent for its
//!   type is stale and changes nothing; before the first response of a type, only an
//!   empty nonce is current;
//! - a request with `error_detail` is a NACK of the latest response of its type: it is
//!   recorded and that exact `version_info` is never sent again for that type on this
//!   stream; the stream waits for new content;
//! - a reply carries every subscribed resource that exists, each name once (content is
//!   built from a `BTreeMap`, so names are unique and sorted); for CDS/LDS/SRDS this is
//!   the required full state (Envoy drops scopes missing from a SotW SRDS reply), for
//!   EDS/RDS it is simply the simplest correct choice;
//! - wildcard: `*`, or (legacy) an empty `resource_names` for CDS/LDS/SRDS until a name
//!   is requested (Envoy always subscribes SRDS that way). A wildcard covers the eager
//!   resources only; an on-demand resource goes out only to a stream that names it
//!   (next to `*` or alone), and leaves its replies when the name is dropped;
//! - a type is sent only when its content for this stream's subscription changed, or
//!   the request subscribed to something new (newly requested names are answered even
//!   if unchanged), or warming needs it (below); names that do not exist yet stay
//!   subscribed and go out when they appear;
//! - pushes go SDS → CDS → EDS → LDS → SRDS → RDS (secrets before the clusters and
//!   listeners whose TLS names them, Envoy's own order); clusters that disappear while
//!   other types change are removed last (make-before-break): SDS, CDS(old ∪ new), EDS,
//!   LDS, SRDS, RDS, CDS(new). CDS is decided after the other types, since whether they
//!   change decides what its first reply carries;
//! - warming: a CDS reply that adds or changes a cluster is followed by an EDS reply
//!   even if the assignments did not change (Envoy keeps an updated cluster warming
//!   until it gets one); likewise LDS → SRDS and RDS, and SRDS → RDS; the warmed type
//!   is resent whole;
//! - `version_info` is the snapshot's type version when the reply is exactly the
//!   type's eager resources (what a wildcard covers; the type version also covers
//!   which resources are on demand), else that version plus a hash of the reply's
//!   (name, version) pairs, so a version always identifies exactly one content and
//!   stays unique per server run.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
#[cfg(test)]
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use misaki_compiler::snapshot::{Resource, ResourceType, Resources, SharedStr, Snapshot};
use tracing::debug;

use crate::machine::{Machine, Plans, State};
use crate::status::StreamKind;
use crate::stream::StreamCtx;
use crate::wire::{Part, WireBuf, WireMessage, field_len, put_shared_field, put_str, str_len};

/// A response decided on but not yet encoded. The server writes it with
/// [`WireMessage`]: its own fields, plus each resource's shared pre-encoded bytes.
#[derive(Debug)]
pub(crate) struct SotwReply {
    t: ResourceType,
    version: SharedStr,
    nonce: String,
    items: Vec<Arc<Resource>>,
}

/// `DiscoveryResponse` field numbers misaki sets.
const VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;

impl WireMessage for SotwReply {
    fn encoded_len(&self) -> usize {
        str_len(VERSION_INFO, &self.version)
            + self
                .items
                .iter()
                .map(|i| field_len(RESOURCES, i.wire().len()))
                .sum::<usize>()
            + str_len(TYPE_URL, self.t.type_url())
            + str_len(NONCE, &self.nonce)
    }

    fn parts(&self) -> usize {
        self.items.len() + 2
    }

    fn put_part(&self, part: usize, buf: &mut impl WireBuf) {
        match Part::of(part, self.items.len()) {
            Part::Head => put_str(VERSION_INFO, &self.version, buf.run()),
            Part::Item(i) => put_shared_field(RESOURCES, self.items[i].wire(), buf),
            Part::Tail => {
                put_str(TYPE_URL, self.t.type_url(), buf.run());
                put_str(NONCE, &self.nonce, buf.run());
            }
        }
    }
}

/// The message [`SotwReply`]'s encoding stands for: the reference the hand encoding is
/// tested against.
#[cfg(test)]
impl From<SotwReply> for DiscoveryResponse {
    fn from(r: SotwReply) -> Self {
        DiscoveryResponse {
            version_info: r.version.into(),
            resources: r.items.iter().map(|i| i.body.clone()).collect(),
            type_url: r.t.type_url().to_string(),
            nonce: r.nonce,
            ..Default::default()
        }
    }
}

/// SotW's own per-type state (the rest is [`State`]'s).
#[derive(Debug, Default)]
pub(crate) struct TypeState {
    wildcard: bool,
    /// The client has sent a non-empty `resource_names` at least once; from then on an
    /// empty list means "nothing", not the legacy wildcard.
    named_ever: bool,
    names: BTreeSet<String>,
    /// What the client was last sent (sorted by name, unique). For EDS/RDS it is pruned
    /// to the current content when resources go away, since the client needs no reply
    /// for that.
    sent: Vec<Arc<Resource>>,
    /// The version the client rejected; never sent again on this stream.
    nacked: Option<SharedStr>,
}

impl TypeState {
    /// Apply a SotW `resource_names` list; returns whether it subscribed to anything
    /// new (which must be answered even if unchanged).
    fn subscribe(&mut self, t: ResourceType, names: Vec<String>) -> bool {
        let legacy_wildcard = names.is_empty() && !self.named_ever && t.is_full_state();
        self.named_ever |= !names.is_empty();
        let star = names.iter().any(|n| n == "*");
        let names: BTreeSet<String> = names.into_iter().filter(|n| n != "*").collect();
        let wildcard = star || legacy_wildcard;
        let grew = (wildcard && !self.wildcard) || names.iter().any(|n| !self.names.contains(n));
        self.wildcard = wildcard;
        self.names = names;
        grew
    }
}

/// A reply to send for one type, before nonce assignment.
#[derive(Debug)]
pub(crate) struct Plan {
    items: Vec<Arc<Resource>>,
    version: SharedStr,
    /// Adds or changes a resource relative to what the client was last sent.
    touched: bool,
}

/// One SotW ADS stream's protocol state.
pub(crate) type Sotw = State<TypeState>;

/// `(adds or changes, removes)` of `new` against `old`; both sorted by name.
fn diff(new: &[Arc<Resource>], old: &[Arc<Resource>]) -> (bool, bool) {
    let (mut touched, mut removed) = (false, false);
    let (mut i, mut j) = (0, 0);
    while i < new.len() || j < old.len() {
        match (new.get(i), old.get(j)) {
            (Some(n), Some(o)) => match n.name.cmp(&o.name) {
                std::cmp::Ordering::Equal => {
                    touched |= !Arc::ptr_eq(n, o) && n.version != o.version;
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    touched = true;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    removed = true;
                    j += 1;
                }
            },
            (Some(_), None) => {
                touched = true;
                i += 1;
            }
            (None, Some(_)) => {
                removed = true;
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
        if touched && removed {
            break;
        }
    }
    (touched, removed)
}

/// Whether `items` (unique names, all from `res`) is exactly `res`'s eager resources:
/// the content whose `version_info` is the bare type version.
fn is_eager_set(res: &Resources, items: &[Arc<Resource>]) -> bool {
    items.len() == res.eager_len()
        && (!res.has_on_demand() || items.iter().all(|r| !res.is_on_demand(&r.name)))
}

/// The `version_info` for a reply (see the module invariants).
fn reply_version(res: &Resources, items: &[Arc<Resource>], whole_type: bool) -> SharedStr {
    if whole_type {
        return res.version.clone();
    }
    let mut h = DefaultHasher::new();
    for r in items {
        r.name.hash(&mut h);
        r.version.hash(&mut h);
    }
    format!("{}.{:016x}", res.version, h.finish()).into()
}

impl Sotw {
    /// Everything of type `t` this stream subscribes to and that exists, sorted.
    fn content(&self, t: ResourceType) -> Vec<Arc<Resource>> {
        let st = &self.types[t.index()];
        let res = self.snapshot.get(t);
        let named = |n: &str| st.names.contains(n);
        if st.wildcard {
            // The eager resources plus the on-demand ones this stream names.
            res.items
                .values()
                .filter(|r| res.covers(true, named, &r.name))
                .cloned()
                .collect()
        } else {
            // Sorted and unique, companions included.
            let mut out: BTreeMap<&str, Arc<Resource>> = BTreeMap::new();
            for n in &st.names {
                let r = res.items.get(n);
                for r in r.into_iter().chain(res.companions(n)) {
                    out.insert(&r.name, r.clone());
                }
            }
            out.into_values().collect()
        }
    }

    /// Decide whether `items` must go out for `t`. `whole_type` says `items` is exactly
    /// the snapshot's eager content of `t`.
    fn plan_items(
        &mut self,
        t: ResourceType,
        items: Vec<Arc<Resource>>,
        whole_type: bool,
        force: bool,
    ) -> Option<Plan> {
        if !self.requested(t) {
            return None;
        }
        let st = &mut self.types[t.index()];
        let (touched, removed) = diff(&items, &st.sent);
        let changed = touched || (removed && t.is_full_state());
        if !t.is_full_state() && (items.is_empty() || !(changed || force)) {
            // EDS/RDS: a reply without resources tells the client nothing, and removals
            // need no reply. Forget what went away so it is resent if it comes back.
            if !touched {
                st.sent = items;
            }
            return None;
        }
        if !changed && !force {
            return None;
        }
        let version = reply_version(self.snapshot.get(t), &items, whole_type);
        if st.nacked.as_deref() == Some(version.as_str()) {
            debug!(
                r#type = t.short(),
                version = version.as_str(),
                "not resending a version the client rejected"
            );
            return None;
        }
        Some(Plan {
            items,
            version,
            touched,
        })
    }

    /// Nothing to decide for CDS on a push when the client already holds exactly the
    /// current clusters: it subscribes to all of them and its last CDS reply was the
    /// whole type at this very version (`version_info` is the bare type version only
    /// for whole-type replies). Then nothing went away and nothing changed, so no CDS
    /// reply and no make-before-break; this skips building and diffing the content,
    /// which a fleet-wide change would otherwise do for every stream. A stream that
    /// never asked for CDS gets none either.
    fn clusters_settled(&self, old: &Snapshot) -> bool {
        let t = ResourceType::Cluster;
        !self.requested(t)
            || (self.types[t.index()].wildcard
                && self.unchanged(old, t)
                && self.version(t).map(|v| v.as_str())
                    == Some(self.snapshot.get(t).version.as_str()))
    }
}

impl Machine for Sotw {
    type Req = DiscoveryRequest;
    type Out = SotwReply;
    type Plan = Plan;
    /// Resend the whole type.
    type Force = bool;
    const KIND: StreamKind = StreamKind::Sotw;
    const CLUSTERS_LAST: bool = true;

    fn answer(&mut self, t: ResourceType, req: &DiscoveryRequest, ctx: &StreamCtx) -> bool {
        if !self.record_answer(t, req, Some(&req.version_info), ctx) {
            // The response it answers has been superseded: nothing changes.
            ctx.stale(t, &req.response_nonce);
            return false;
        }
        if req.error_detail.is_some() {
            self.types[t.index()].nacked = self.version(t).cloned();
        }
        true
    }

    fn subscribe(&mut self, t: ResourceType, first: bool, req: DiscoveryRequest) -> bool {
        self.types[t.index()].subscribe(t, req.resource_names) || first
    }

    fn plan(&mut self, t: ResourceType, force: &bool) -> Option<Plan> {
        let items = self.content(t);
        let whole = is_eager_set(self.snapshot.get(t), &items);
        self.plan_items(t, items, whole, *force)
    }

    fn warming(&self, _parent: ResourceType, _child: ResourceType, plan: &Plan) -> bool {
        plan.touched
    }

    /// CDS, decided once the other types are planned: removed clusters while other
    /// types change go out as CDS(old ∪ new) first and CDS(new) last.
    fn make_before_break(
        &mut self,
        old: &Snapshot,
        plans: &mut Plans<Plan>,
    ) -> Vec<(ResourceType, Plan)> {
        use ResourceType::{Cluster, Endpoint, Listener, Route, ScopedRoute};
        if self.clusters_settled(old) {
            return Vec::new();
        }
        let cds_items = self.content(Cluster);
        let removed: Vec<Arc<Resource>> = self.types[Cluster.index()]
            .sent
            .iter()
            .filter(|r| cds_items.binary_search_by(|c| c.name.cmp(&r.name)).is_err())
            .cloned()
            .collect();
        let removes = !removed.is_empty();
        let others = [Endpoint, Listener, ScopedRoute, Route];
        let make_before_break = removes && others.iter().any(|t| plans[t.index()].is_some());
        let whole = is_eager_set(self.snapshot.get(Cluster), &cds_items);

        let cds = if make_before_break {
            // Old ∪ new: the clusters listeners and routes still point at stay until
            // they have moved on.
            let mut keep = cds_items.clone();
            keep.extend(removed);
            keep.sort_by(|a, b| a.name.cmp(&b.name));
            self.plan_items(Cluster, keep, false, false)
        } else if self.unchanged(old, Cluster) && !removes {
            None
        } else {
            self.plan_items(Cluster, cds_items.clone(), whole, false)
        };
        // Warming (here, as the push loop left CDS to this step): a changed cluster
        // waits for EDS even if its endpoints did not change.
        if cds.as_ref().is_some_and(|p| p.touched) {
            plans[Endpoint.index()] = self.plan(Endpoint, &true);
        }
        plans[Cluster.index()] = cds;
        if !make_before_break {
            return Vec::new();
        }
        // Planned now, before CDS(old ∪ new) is committed: committing that changes
        // neither this reply's content and version nor that it goes out (it removes).
        let last = self.plan_items(Cluster, cds_items, whole, false);
        last.map(|p| (Cluster, p)).into_iter().collect()
    }

    fn commit(&mut self, t: ResourceType, plan: Plan, ctx: &StreamCtx) -> SotwReply {
        let nonce = self.sent(t, &plan.version, &plan.items, ctx);
        self.types[t.index()].sent = plan.items.clone();
        SotwReply {
            t,
            version: plan.version,
            nonce,
            items: plan.items,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stream::Protocol;

    use bytes::Bytes;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message;

    /// A route whose body is big enough that its length prefix takes two varint bytes
    /// (and that framing shares rather than copies).
    pub(crate) fn big_route() -> Arc<Resource> {
        Arc::new(Resource::from_any(
            "big",
            "v-big",
            Any {
                type_url: ResourceType::Route.type_url().into(),
                value: vec![7; 7400],
            },
        ))
    }

    /// The hand encoding of `reply` (resource bodies `bodies`) is byte-for-byte prost's
    /// encoding of the struct the reference conversion `M::from` builds, and decodes
    /// back to that struct. For the SotW and the delta reply alike.
    pub(crate) fn check_hand_encoding<R, M>(reply: R, bodies: &[Bytes])
    where
        R: WireMessage,
        M: Message + Default + PartialEq + std::fmt::Debug + From<R>,
    {
        let bytes = reply.encode_to_vec();
        assert_eq!(bytes.len(), reply.encoded_len());
        crate::wire::tests::check_framed(&reply, &bytes, bodies.iter());
        let expected = M::from(reply);
        assert_eq!(bytes, expected.encode_to_vec());
        assert_eq!(M::decode(bytes.as_slice()).unwrap(), expected);
    }

    fn r(name: &str, version: &str) -> Arc<Resource> {
        Arc::new(Resource::from_any(name, version, Default::default()))
    }

    fn cluster(name: &str) -> Arc<Resource> {
        let c = Cluster {
            name: name.into(),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        };
        Arc::new(Resource::new("v-", name, &c))
    }

    /// A secret (a CA certificate) whose PEM says `tag`.
    pub(crate) fn secret(name: &str, tag: &str) -> Arc<Resource> {
        use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, Secret, secret,
        };
        let s = Secret {
            name: name.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(DataSource {
                        specifier: Some(data_source::Specifier::InlineString(format!(
                            "-----BEGIN CERTIFICATE-----\n{tag}\n"
                        ))),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        };
        Arc::new(Resource::new("v-", name, &s))
    }

    fn check(reply: SotwReply) {
        let bodies: Vec<Bytes> = reply.items.iter().map(|i| i.wire().clone()).collect();
        check_hand_encoding::<_, DiscoveryResponse>(reply, &bodies);
    }

    #[test]
    fn hand_encoded_reply_is_the_discovery_response() {
        let big = big_route();
        for (t, version, nonce, items) in [
            (
                ResourceType::Cluster,
                "v-1",
                "1",
                vec![cluster("a"), cluster("b")],
            ),
            (ResourceType::Route, "v-2.00ff", "17", vec![big.clone()]),
            (
                ResourceType::Secret,
                "v-5",
                "9",
                vec![secret("misaki_fleet_ca", "1")],
            ),
            // Full-state type with nothing left: an empty reply.
            (ResourceType::Listener, "v-3", "2", vec![]),
            (ResourceType::Endpoint, "", "", vec![]),
            // A resource with an empty body still goes out as an (empty) element.
            (ResourceType::Endpoint, "v-4", "3", vec![r("e", "1"), big]),
        ] {
            check(SotwReply {
                t,
                version: version.into(),
                nonce: nonce.into(),
                items,
            });
        }
    }

    #[test]
    fn diff_tells_additions_and_changes_apart_from_removals() {
        let old = [r("a", "1"), r("b", "1")];
        assert_eq!(diff(&old, &old), (false, false));
        assert_eq!(diff(&[r("a", "1")], &old), (false, true));
        assert_eq!(diff(&[r("a", "2"), r("b", "1")], &old), (true, false));
        assert_eq!(diff(&[r("a", "1"), r("c", "1")], &old), (true, true));
        assert_eq!(diff(&[], &[]), (false, false));
    }

    #[test]
    fn legacy_wildcard_applies_only_until_a_name_is_requested() {
        let mut st = TypeState::default();
        assert!(st.subscribe(ResourceType::Cluster, vec![]));
        assert!(st.wildcard);
        assert!(st.subscribe(ResourceType::Cluster, vec!["a".into()]));
        assert!(!st.wildcard);
        assert!(!st.subscribe(ResourceType::Cluster, vec![]));
        assert!(!st.wildcard && st.names.is_empty());
        let mut eds = TypeState::default();
        assert!(!eds.subscribe(ResourceType::Endpoint, vec![]));
        assert!(!eds.wildcard);
        // Envoy subscribes SRDS with no names: a wildcard, like CDS/LDS.
        let mut srds = TypeState::default();
        assert!(srds.subscribe(ResourceType::ScopedRoute, vec![]));
        assert!(srds.wildcard);
    }

    fn request(t: ResourceType, names: &[&str], nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn reply_names(reply: &SotwReply) -> Vec<&str> {
        reply.items.iter().map(|r| r.name.as_str()).collect()
    }

    fn types(out: &[SotwReply]) -> Vec<ResourceType> {
        out.iter().map(|r| r.t).collect()
    }

    /// Listener "l" at version `l`, one scope "s" at version `scope`, route "r" at 1
    /// (empty bodies: only versions matter here).
    fn routing(l: &str, scope: &str) -> Arc<Snapshot> {
        let one = |n: &str, v: &str| Resources::from_items("v-", [r(n, v)]);
        let empty = Resources::default;
        Arc::new(
            Snapshot::new(empty(), empty(), one("l", l), one("r", "1"))
                .with_scoped_routes(one("s", scope)),
        )
    }

    #[test]
    fn on_demand_cluster_goes_only_to_a_stream_that_names_it() {
        let ctx = StreamCtx::for_test(StreamKind::Sotw);
        let cds = Resources::with_on_demand("v-", [cluster("a")], [cluster("od")]);
        let type_version = cds.version.clone();
        let empty = Resources::default;
        let mut s = Sotw::new(Arc::new(Snapshot::new(cds, empty(), empty(), empty())));
        let out = s.on_request(request(ResourceType::Cluster, &[], ""), &ctx);
        assert_eq!(reply_names(&out[0]), ["a"]);
        assert_eq!(
            out[0].version, type_version,
            "the eager set is the whole type"
        );
        let nonce = out[0].nonce.clone();
        let out = s.on_request(request(ResourceType::Cluster, &["*", "od"], &nonce), &ctx);
        assert_eq!(reply_names(&out[0]), ["a", "od"]);
        assert_ne!(out[0].version, type_version, "one version, one content");
        let nonce = out[0].nonce.clone();
        let out = s.on_request(request(ResourceType::Cluster, &["*"], &nonce), &ctx);
        assert_eq!(
            reply_names(&out[0]),
            ["a"],
            "full state: dropped by omission"
        );
        assert_eq!(out[0].version, type_version);
    }

    /// Secret "ca" and cluster "c", tagged.
    fn tls(ca: &str, c: &str) -> Arc<Snapshot> {
        let empty = Resources::default;
        let mut cluster = Cluster::decode(self::cluster("c").body.value.as_slice()).unwrap();
        cluster.alt_stat_name = c.into();
        let cds = Resources::from_items("v-", [Arc::new(Resource::new("v-", "c", &cluster))]);
        Arc::new(Snapshot::new(cds, empty(), empty(), empty()).with(
            ResourceType::Secret,
            Resources::from_items("v-", [secret("ca", ca)]),
        ))
    }

    #[test]
    fn secrets_go_by_name_and_before_clusters_on_a_push() {
        use ResourceType::{Cluster as C, Secret as S};
        let ctx = StreamCtx::for_test(StreamKind::Sotw);
        let mut s = Sotw::new(tls("1", "1"));
        assert_eq!(types(&s.on_request(request(C, &[], ""), &ctx)), [C]);
        // An empty SDS request is no wildcard, and a missing secret gets no reply (the
        // client waits for it).
        assert!(s.on_request(request(S, &[], ""), &ctx).is_empty());
        assert!(s.on_request(request(S, &["other"], ""), &ctx).is_empty());
        let out = s.on_request(request(S, &["other", "ca"], ""), &ctx);
        assert_eq!(reply_names(&out[0]), ["ca"]);
        // Both change: the secret first, so the cluster finds it.
        assert_eq!(types(&s.on_snapshot(tls("2", "2"), &ctx)), [S, C]);
        assert_eq!(types(&s.on_snapshot(tls("3", "2"), &ctx)), [S], "SDS only");
        assert!(s.on_snapshot(tls("3", "2"), &ctx).is_empty());
    }

    #[test]
    fn changed_listener_warms_scopes_then_routes_and_changed_scope_warms_routes() {
        use ResourceType::{Listener, Route, ScopedRoute};
        let ctx = StreamCtx::for_test(StreamKind::Sotw);
        let mut s = Sotw::new(routing("1", "1"));
        for (t, names) in [(Listener, &[][..]), (ScopedRoute, &[]), (Route, &["r"])] {
            assert_eq!(types(&s.on_request(request(t, names, ""), &ctx)), [t]);
        }
        let out = s.on_snapshot(routing("2", "1"), &ctx);
        assert_eq!(types(&out), [Listener, ScopedRoute, Route]);
        let out = s.on_snapshot(routing("2", "2"), &ctx);
        assert_eq!(
            types(&out),
            [ScopedRoute, Route],
            "a changed scope warms routes"
        );
        assert_eq!(reply_names(&out[1]), ["r"]);
        assert!(s.on_snapshot(routing("2", "2"), &ctx).is_empty());
    }
}
