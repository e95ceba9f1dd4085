//! Incremental (delta) ADS: the per-stream protocol state machine's own rules. What it
//! shares with SotW (nonces, ACK/NACK bookkeeping, the push loop in push order,
//! warming) is written once in `machine.rs`, which lists those rules.
//!
//! Invariants (Envoy's `xds_protocol.rst` is the reference):
//! - the server tracks, per type, what the client holds (`name → version`): seeded from
//!   `initial_resource_versions` on the stream's first request of the type, then
//!   updated by every response. A resource is sent only when the client does not hold
//!   its current version, or the client (re)subscribed to it explicitly;
//! - a name the client holds that no longer exists goes out in `removed_resources`;
//!   so does an explicitly subscribed name that does not exist (the delta protocol's
//!   "does not exist" answer), once;
//! - subscription changes are honoured whatever the nonce (the protocol says stale
//!   nonces must not reject delta requests); the nonce only pairs ACK/NACK with a
//!   response;
//! - a NACK is recorded, and since the client is still marked as holding the rejected
//!   versions they are not resent until the resource changes;
//! - wildcard: `*`, or (legacy) an empty first subscription for CDS/LDS/SRDS; it stays
//!   until `*` is unsubscribed, whatever names later requests add (Envoy's on-demand
//!   CDS only adds names); explicitly unsubscribing a name that the wildcard also
//!   covers is answered with the resource or its removal, as the protocol requires;
//! - on demand: a wildcard covers only the eager resources; an on-demand resource is
//!   sent only to a stream that subscribes to its name (next to `*` or alone), updates
//!   go only there, and its removal too. A resource that leaves a stream's
//!   subscription because the snapshot made it on demand goes out as removed; one the
//!   client unsubscribed is just forgotten;
//! - the stream's first request of a type is always answered, if only with an empty
//!   response;
//! - pushes go SDS → CDS → EDS → LDS → SRDS → RDS (secrets before the clusters and
//!   listeners whose TLS names them); removed clusters go out last, in their own CDS
//!   response (and their assignments' removals in their own EDS response), when other
//!   types change in the same push (make-before-break);
//! - warming: added or changed clusters are followed by their EDS assignments, added
//!   or changed listeners by the subscribed scopes and routes, and added or changed
//!   scopes by the routes they name, even if unchanged.
//!
//! Names and versions the state keeps are [`SharedStr`]s taken from the snapshot's
//! resources whenever the snapshot has them, so 10,000 streams tracking the same
//! resources share one copy of each name and version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::route::v3::ScopedRouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
#[cfg(test)]
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, Resource as WireResource,
};
use misaki_compiler::snapshot::{Resource, ResourceType, Resources, SharedStr, Snapshot};
use prost::Message;

use crate::machine::{Force, Machine, Plans, State};
use crate::status::StreamKind;
use crate::stream::StreamCtx;
use crate::wire::{
    Part, WireBuf, WireMessage, field_len, put_field, put_header, put_shared_field, put_str,
    str_len,
};

/// A delta response decided on but not yet encoded (see [`crate::sotw::SotwReply`]).
#[derive(Debug)]
pub(crate) struct DeltaReply {
    t: ResourceType,
    system_version: SharedStr,
    nonce: String,
    items: Vec<Arc<Resource>>,
    removed: Vec<SharedStr>,
}

/// `DeltaDiscoveryResponse` field numbers misaki sets.
const SYSTEM_VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;
const REMOVED_RESOURCES: u32 = 6;
/// `Resource` (the per-resource wrapper) field numbers misaki sets.
const RESOURCE_VERSION: u32 = 1;
const RESOURCE_BODY: u32 = 2;
const RESOURCE_NAME: u32 = 3;

/// Length of one resource's `Resource` wrapper (without its own key and length).
fn wrapper_len(r: &Resource) -> usize {
    str_len(RESOURCE_VERSION, &r.version)
        + field_len(RESOURCE_BODY, r.wire().len())
        + str_len(RESOURCE_NAME, &r.name)
}

impl WireMessage for DeltaReply {
    fn encoded_len(&self) -> usize {
        str_len(SYSTEM_VERSION_INFO, &self.system_version)
            + self
                .items
                .iter()
                .map(|i| field_len(RESOURCES, wrapper_len(i)))
                .sum::<usize>()
            + str_len(TYPE_URL, self.t.type_url())
            + str_len(NONCE, &self.nonce)
            + self
                .removed
                .iter()
                .map(|n| field_len(REMOVED_RESOURCES, n.len()))
                .sum::<usize>()
    }

    fn parts(&self) -> usize {
        self.items.len() + 2
    }

    fn put_part(&self, part: usize, buf: &mut impl WireBuf) {
        match Part::of(part, self.items.len()) {
            Part::Head => put_str(SYSTEM_VERSION_INFO, &self.system_version, buf.run()),
            Part::Item(i) => {
                let i = &self.items[i];
                put_header(RESOURCES, wrapper_len(i), buf.run());
                put_str(RESOURCE_VERSION, &i.version, buf.run());
                put_shared_field(RESOURCE_BODY, i.wire(), buf);
                put_str(RESOURCE_NAME, &i.name, buf.run());
            }
            Part::Tail => {
                let run = buf.run();
                put_str(TYPE_URL, self.t.type_url(), run);
                put_str(NONCE, &self.nonce, run);
                for n in &self.removed {
                    put_field(REMOVED_RESOURCES, n.as_bytes(), run);
                }
            }
        }
    }
}

/// The message [`DeltaReply`]'s encoding stands for: the reference the hand encoding is
/// tested against.
#[cfg(test)]
impl From<DeltaReply> for DeltaDiscoveryResponse {
    fn from(r: DeltaReply) -> Self {
        DeltaDiscoveryResponse {
            system_version_info: r.system_version.into(),
            resources: r
                .items
                .iter()
                .map(|i| WireResource {
                    name: i.name.to_string(),
                    version: i.version.to_string(),
                    resource: Some(i.body.clone()),
                    ..Default::default()
                })
                .collect(),
            type_url: r.t.type_url().to_string(),
            removed_resources: r.removed.into_iter().map(String::from).collect(),
            nonce: r.nonce,
            ..Default::default()
        }
    }
}

/// Delta's own per-type state (the rest is [`State`]'s).
#[derive(Debug, Default)]
pub(crate) struct TypeState {
    wildcard: bool,
    names: BTreeSet<SharedStr>,
    /// What the client holds: name → version.
    has: HashMap<SharedStr, SharedStr>,
    /// The version of this type's resources the client holds all of (everything the
    /// subscription covers, at that version): set when a complete plan is committed,
    /// cleared by subscription changes. An ACK of it then costs no O(resources) pass.
    synced: Option<SharedStr>,
}

/// Whether a subscription (`names`, `wildcard`) covers `name` of `res`'s type: by
/// name (or as a companion of a name), or by the wildcard unless it is on demand.
fn covers(names: &BTreeSet<SharedStr>, wildcard: bool, res: &Resources, name: &str) -> bool {
    res.covers(wildcard, |n| names.contains(n), name)
}

impl TypeState {
    fn subscribed(&self, res: &Resources, name: &str) -> bool {
        covers(&self.names, self.wildcard, res, name)
    }

    /// Apply one request's subscription changes to this type (`first`: the stream's
    /// first request of it). Returns the names to answer even if the client seems to
    /// hold them.
    fn apply(
        &mut self,
        res: &Resources,
        t: ResourceType,
        first: bool,
        req: DeltaDiscoveryRequest,
    ) -> BTreeSet<SharedStr> {
        let items = &res.items;
        if first
            || !req.resource_names_subscribe.is_empty()
            || !req.resource_names_unsubscribe.is_empty()
        {
            self.synced = None;
        } else {
            // A plain ACK/NACK changes no subscription: nothing to retain or force.
            return BTreeSet::new();
        }
        if first {
            self.has = req
                .initial_resource_versions
                .into_iter()
                .map(|(n, v)| match items.get(&n) {
                    Some(r) if r.version == v => (r.name.clone(), r.version.clone()),
                    Some(r) => (r.name.clone(), v.into()),
                    None => (n.into(), v.into()),
                })
                .collect();
            // Legacy wildcard: a first request that subscribes to nothing.
            self.wildcard = req.resource_names_subscribe.is_empty() && t.is_full_state();
        }
        let mut force = BTreeSet::new();
        for n in req.resource_names_subscribe {
            if n == "*" {
                self.wildcard = true;
            } else {
                // Explicit subscriptions are answered even if the client seems to hold
                // the resource (it may have forgotten it) — except on the first request,
                // where `initial_resource_versions` says exactly what it holds.
                let n = intern(items, n);
                if !(first && self.has.contains_key(&n)) {
                    force.insert(n.clone());
                }
                self.names.insert(n);
            }
        }
        for n in req.resource_names_unsubscribe {
            if n == "*" {
                self.wildcard = false;
            } else {
                self.names.remove(n.as_str());
                if self.subscribed(res, &n) {
                    // Still covered by the wildcard: the client cannot tell whether to
                    // keep it, so say (resource or removal).
                    force.insert(intern(items, n));
                }
            }
        }
        // Unsubscribed resources need no removal message; just stop tracking them.
        let (wildcard, names) = (self.wildcard, &self.names);
        self.has.retain(|n, _| covers(names, wildcard, res, n));
        force
    }
}

/// What one response for one type would carry.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    items: Vec<Arc<Resource>>,
    removed: Vec<SharedStr>,
    /// Everything the client lacks of the type (not one half of a split plan).
    complete: bool,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.removed.is_empty()
    }

    /// `(additions and changes, removals)` as two plans, `None` where empty.
    fn split_removals(self) -> (Option<Plan>, Option<Plan>) {
        let items = Plan {
            items: self.items,
            ..Plan::default()
        };
        let removals = Plan {
            removed: self.removed,
            ..Plan::default()
        };
        let some = |p: Plan| (!p.is_empty()).then_some(p);
        (some(items), some(removals))
    }
}

/// What a delta reply must carry even if the client seems to hold it.
#[derive(Debug, Default)]
pub(crate) struct Forced {
    /// Sent (or reported missing) whatever the client holds.
    names: BTreeSet<SharedStr>,
    /// Reply even if there is nothing to send (a first request is always answered).
    always: bool,
}

impl Force for Forced {
    fn any(&self) -> bool {
        self.always || !self.names.is_empty()
    }

    fn add(&mut self, other: Forced) {
        self.names.extend(other.names);
        self.always |= other.always;
    }
}

/// One delta ADS stream's protocol state.
pub(crate) type Delta = State<TypeState>;

/// The EDS name a cluster asks for: its `eds_cluster_config.service_name`, else its
/// own name. Decoded only for clusters that just changed.
fn eds_name(cluster: &Resource) -> SharedStr {
    Cluster::decode(cluster.body.value.as_slice())
        .ok()
        .and_then(|c| c.eds_cluster_config)
        .map(|e| e.service_name)
        .filter(|s| !s.is_empty())
        .map_or_else(|| cluster.name.clone(), SharedStr::from)
}

/// The route configuration a scope names. Decoded only for scopes that just changed.
fn scope_route(scope: &Resource) -> Option<SharedStr> {
    ScopedRouteConfiguration::decode(scope.body.value.as_slice())
        .ok()
        .map(|s| s.route_configuration_name)
        .filter(|s| !s.is_empty())
        .map(SharedStr::from)
}

/// `name` as a [`SharedStr`], shared with the snapshot's resource of that name if
/// there is one.
fn intern(items: &BTreeMap<String, Arc<Resource>>, name: String) -> SharedStr {
    match items.get(&name) {
        Some(r) => r.name.clone(),
        None => name.into(),
    }
}

impl Delta {
    /// What to send for `t`; `force` names are sent (or reported missing) even if the
    /// client already holds them. Reads state only.
    fn changes(&self, t: ResourceType, force: &BTreeSet<SharedStr>) -> Plan {
        let st = &self.types[t.index()];
        let mut plan = Plan::default();
        if !self.requested(t) {
            return plan;
        }
        let res = self.snapshot.get(t);
        let items = &res.items;
        let mut seen = BTreeSet::new();
        // How many of the resources looked at the client holds (at any version).
        let mut held = 0;
        let mut consider = |r: &Arc<Resource>| {
            let has = st.has.get(&r.name);
            held += usize::from(has.is_some());
            let changed = force.contains(&r.name) || has != Some(&r.version);
            if changed && seen.insert(r.name.clone()) {
                plan.items.push(r.clone());
            }
        };
        if st.wildcard {
            res.eager().for_each(&mut consider);
        }
        for n in &st.names {
            if let Some(r) = items
                .get(n.as_str())
                .filter(|_| !st.wildcard || res.is_on_demand(n))
            {
                consider(r);
            }
            res.companions(n).for_each(&mut consider);
        }
        // Held resources that are gone, or that the subscription no longer covers. A
        // plain wildcard over eager resources that saw every held name among them has
        // none: skip the lookup per held name (cloud sidecars hold a scope per vehicle).
        let plain_wildcard = st.wildcard && st.names.is_empty() && !res.has_on_demand();
        let mut removed: BTreeSet<&SharedStr> = if plain_wildcard && held == st.has.len() {
            BTreeSet::new()
        } else {
            st.has
                .keys()
                .filter(|n| !items.contains_key(n.as_str()) || !st.subscribed(res, n))
                .collect()
        };
        removed.extend(
            force
                .iter()
                .filter(|n| st.subscribed(res, n) && !items.contains_key(n.as_str())),
        );
        plan.removed = removed.into_iter().cloned().collect();
        plan.complete = true;
        plan
    }

    /// Names of `child` that warming requires after `parent_items` were sent.
    fn warming_names(
        &self,
        parent: ResourceType,
        child: ResourceType,
        parent_items: &[Arc<Resource>],
    ) -> BTreeSet<SharedStr> {
        if parent_items.is_empty() {
            return BTreeSet::new();
        }
        let res = self.snapshot.get(child);
        let names: BTreeSet<SharedStr> = match parent {
            ResourceType::Cluster => parent_items.iter().map(|c| eds_name(c)).collect(),
            ResourceType::ScopedRoute => {
                parent_items.iter().filter_map(|s| scope_route(s)).collect()
            }
            // Which scopes and routes a listener uses is inside its filter chains;
            // resending every subscribed one is simpler and they are few per node.
            _ => res.items.values().map(|r| r.name.clone()).collect(),
        };
        let st = &self.types[child.index()];
        names
            .into_iter()
            .filter(|n| st.subscribed(res, n) && res.items.contains_key(n.as_str()))
            .collect()
    }
}

impl Machine for Delta {
    type Req = DeltaDiscoveryRequest;
    type Out = DeltaReply;
    type Plan = Plan;
    type Force = Forced;
    const KIND: StreamKind = StreamKind::Delta;
    const CLUSTERS_LAST: bool = false;

    fn answer(&mut self, t: ResourceType, req: &DeltaDiscoveryRequest, ctx: &StreamCtx) -> bool {
        // Whatever the nonce, the request goes on: it may change subscriptions.
        if !req.response_nonce.is_empty() {
            self.record_answer(t, req, None, ctx);
        }
        true
    }

    fn subscribe(&mut self, t: ResourceType, first: bool, req: DeltaDiscoveryRequest) -> Forced {
        let names = self.types[t.index()].apply(self.snapshot.get(t), t, first, req);
        Forced {
            names,
            always: first,
        }
    }

    fn plan(&mut self, t: ResourceType, force: &Forced) -> Option<Plan> {
        let synced = self.types[t.index()].synced.as_ref();
        if force.names.is_empty() && synced == Some(&self.snapshot.get(t).version) {
            return force.always.then(Plan::default);
        }
        let plan = self.changes(t, &force.names);
        (force.always || !plan.is_empty()).then_some(plan)
    }

    fn warming(&self, parent: ResourceType, child: ResourceType, plan: &Plan) -> Forced {
        Forced {
            names: self.warming_names(parent, child, &plan.items),
            always: false,
        }
    }

    /// Clusters (and their assignments) that went away are removed only after
    /// everything that may still point at them has moved, in their own responses.
    fn make_before_break(
        &mut self,
        _old: &Snapshot,
        plans: &mut Plans<Plan>,
    ) -> Vec<(ResourceType, Plan)> {
        use ResourceType::{Cluster, Endpoint, Listener, Route, ScopedRoute};
        let plan = |t: ResourceType| plans[t.index()].as_ref();
        let others_change = plan(Endpoint).is_some_and(|p| !p.items.is_empty())
            || [Listener, ScopedRoute, Route]
                .iter()
                .any(|t| plan(*t).is_some());
        if !(others_change && plan(Cluster).is_some_and(|p| !p.removed.is_empty())) {
            return Vec::new();
        }
        let mut last = Vec::new();
        for t in [Cluster, Endpoint] {
            if let Some(p) = plans[t.index()].take() {
                let (changes, removals) = p.split_removals();
                plans[t.index()] = changes;
                last.extend(removals.map(|p| (t, p)));
            }
        }
        last
    }

    fn commit(&mut self, t: ResourceType, plan: Plan, ctx: &StreamCtx) -> DeltaReply {
        let system_version = self.snapshot.get(t).version.clone();
        let nonce = self.sent(t, &system_version, &plan.items, ctx);
        let st = &mut self.types[t.index()];
        for r in &plan.items {
            st.has.insert(r.name.clone(), r.version.clone());
        }
        for n in &plan.removed {
            st.has.remove(n);
        }
        if plan.complete {
            st.synced = Some(system_version.clone());
        } else if !plan.items.is_empty() || !plan.removed.is_empty() {
            st.synced = None;
        }
        DeltaReply {
            t,
            system_version,
            nonce,
            items: plan.items,
            removed: plan.removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Protocol;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::google::protobuf::Any;

    fn route(name: &str) -> Arc<Resource> {
        let rc = RouteConfiguration {
            name: name.into(),
            ..Default::default()
        };
        Arc::new(Resource::new("v-", name, &rc))
    }

    fn check(reply: DeltaReply) {
        let bodies: Vec<_> = reply.items.iter().map(|i| i.wire().clone()).collect();
        crate::sotw::tests::check_hand_encoding::<_, DeltaDiscoveryResponse>(reply, &bodies);
    }

    #[test]
    fn hand_encoded_reply_is_the_delta_discovery_response() {
        let big = crate::sotw::tests::big_route();
        let empty = Arc::new(Resource::from_any("", "", Any::default()));
        for (t, version, nonce, items, removed) in [
            (
                ResourceType::Route,
                "v-1",
                "1",
                vec![route("a"), big],
                vec![],
            ),
            // Removals only, including an empty name (a repeated string keeps it).
            (
                ResourceType::Cluster,
                "v-2",
                "2",
                vec![],
                vec!["gone", "", "x"],
            ),
            (
                ResourceType::Listener,
                "v-3",
                "3",
                vec![route("l")],
                vec!["old"],
            ),
            (
                ResourceType::Secret,
                "v-5",
                "5",
                vec![crate::sotw::tests::secret("misaki_fleet_ca", "1")],
                vec!["misaki_vehicle_cert"],
            ),
            // Nothing at all (an `always` reply to a first request).
            (ResourceType::Endpoint, "v-4", "4", vec![], vec![]),
            (ResourceType::Endpoint, "", "", vec![empty], vec![]),
        ] {
            check(DeltaReply {
                t,
                system_version: version.into(),
                nonce: nonce.into(),
                items,
                removed: removed.into_iter().map(SharedStr::from).collect(),
            });
        }
    }

    fn cluster(name: &str, tag: &str) -> Arc<Resource> {
        let c = Cluster {
            name: name.into(),
            alt_stat_name: tag.into(),
            ..Default::default()
        };
        Arc::new(Resource::new("v-", name, &c))
    }

    fn scope(name: &str, route: &str, tag: u32) -> Arc<Resource> {
        let s = ScopedRouteConfiguration {
            name: name.into(),
            route_configuration_name: route.into(),
            on_demand: tag % 2 == 1,
            ..Default::default()
        };
        Arc::new(Resource::new("v-", name, &s))
    }

    fn request(t: ResourceType, subscribe: &[&str], unsubscribe: &[&str]) -> DeltaDiscoveryRequest {
        let strings = |v: &[&str]| v.iter().map(|n| n.to_string()).collect();
        DeltaDiscoveryRequest {
            type_url: t.type_url().into(),
            resource_names_subscribe: strings(subscribe),
            resource_names_unsubscribe: strings(unsubscribe),
            ..Default::default()
        }
    }

    fn clusters(cds: Resources) -> Arc<Snapshot> {
        let empty = Resources::default;
        Arc::new(Snapshot::new(cds, empty(), empty(), empty()))
    }

    /// `(type, names sent, names removed)` of each reply.
    fn summary(out: &[DeltaReply]) -> Vec<(ResourceType, Vec<&str>, Vec<&str>)> {
        out.iter()
            .map(|r| {
                let names = r.items.iter().map(|i| i.name.as_str()).collect();
                (r.t, names, r.removed.iter().map(|n| n.as_str()).collect())
            })
            .collect()
    }

    #[test]
    fn wildcard_swaps_and_acks_after_a_complete_plan() {
        use ResourceType::Cluster as C;
        let ctx = StreamCtx::for_test(StreamKind::Delta);
        let cds = |cs: &[(&str, &str)]| {
            clusters(Resources::from_items(
                "v-",
                cs.iter().map(|(n, tag)| cluster(n, tag)),
            ))
        };
        let ack = |out: &[DeltaReply]| DeltaDiscoveryRequest {
            response_nonce: out[0].nonce.to_string(),
            ..request(C, &[], &[])
        };
        let mut d = Delta::new(cds(&[("a", "1"), ("b", "1")]));
        let out = d.on_request(request(C, &["*"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["a", "b"], vec![])]);
        assert!(d.on_request(ack(&out), &ctx).is_empty());
        // As many resources as the client holds, but one of them another: both told.
        let out = d.on_snapshot(cds(&[("a", "1"), ("c", "1")]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["c"], vec!["b"])]);
        assert!(d.on_request(ack(&out), &ctx).is_empty());
        let out = d.on_snapshot(cds(&[("a", "2"), ("c", "1")]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["a"], vec![])]);
        // A NACK leaves the rejected version marked as held: nothing resent.
        let mut nack = ack(&out);
        nack.error_detail = Some(Default::default());
        assert!(d.on_request(nack, &ctx).is_empty());
        // Re-subscribing by name is answered even though the client holds it.
        let out = d.on_request(request(C, &["c"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["c"], vec![])]);
    }

    #[test]
    fn on_demand_cluster_is_sent_next_to_the_wildcard_only_when_named() {
        use ResourceType::Cluster as C;
        let ctx = StreamCtx::for_test(StreamKind::Delta);
        let cds =
            |od: &str| Resources::with_on_demand("v-", [cluster("a", "1")], [cluster("od", od)]);
        let mut d = Delta::new(clusters(cds("1")));
        let out = d.on_request(request(C, &["*"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["a"], vec![])]);
        // Envoy's on-demand CDS adds a name without repeating "*".
        let out = d.on_request(request(C, &["od"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["od"], vec![])]);
        assert!(d.types[C.index()].wildcard, "the wildcard stays");
        let out = d.on_request(request(C, &["missing"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec![], vec!["missing"])], "fails fast");
        let out = d.on_snapshot(clusters(cds("2")), &ctx);
        assert_eq!(summary(&out), [(C, vec!["od"], vec![])]);
        assert!(d.on_request(request(C, &[], &["od"]), &ctx).is_empty());
        assert!(!d.types[C.index()].has.contains_key("od"), "forgotten");
        assert!(d.on_snapshot(clusters(cds("3")), &ctx).is_empty());
    }

    #[test]
    fn an_on_demand_aggregate_brings_its_members_along_and_only_to_who_named_it() {
        use ResourceType::Cluster as C;
        let ctx = StreamCtx::for_test(StreamKind::Delta);
        let cds = |m: &str| {
            Resources::with_on_demand(
                "v-",
                [cluster("a", "1")],
                [cluster("agg", "1"), cluster("m1", m), cluster("m2", "1")],
            )
            .with_companions("v-", [("agg".to_string(), vec!["m1".into(), "m2".into()])])
        };
        let mut named = Delta::new(clusters(cds("1")));
        let mut other = Delta::new(clusters(cds("1")));
        for d in [&mut named, &mut other] {
            let out = d.on_request(request(C, &["*"], &[]), &ctx);
            assert_eq!(summary(&out), [(C, vec!["a"], vec![])]);
        }
        let out = named.on_request(request(C, &["agg"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["agg", "m1", "m2"], vec![])]);
        // A member's change reaches the stream that named its aggregate, only.
        let out = named.on_snapshot(clusters(cds("2")), &ctx);
        assert_eq!(summary(&out), [(C, vec!["m1"], vec![])]);
        assert!(other.on_snapshot(clusters(cds("2")), &ctx).is_empty());
        // Naming a member too sends it once.
        let out = named.on_request(request(C, &["m2"], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["m2"], vec![])]);
    }

    #[test]
    fn cluster_that_becomes_on_demand_leaves_the_wildcard_as_removed() {
        use ResourceType::Cluster as C;
        let ctx = StreamCtx::for_test(StreamKind::Delta);
        let (a, b) = (cluster("a", "1"), cluster("b", "1"));
        let mut d = Delta::new(clusters(Resources::from_items(
            "v-",
            [a.clone(), b.clone()],
        )));
        let out = d.on_request(request(C, &[], &[]), &ctx);
        assert_eq!(summary(&out), [(C, vec!["a", "b"], vec![])]);
        let out = d.on_snapshot(clusters(Resources::with_on_demand("v-", [a], [b])), &ctx);
        assert_eq!(summary(&out), [(C, vec![], vec!["b"])]);
    }

    #[test]
    fn secrets_go_by_name_and_first_in_a_push() {
        use crate::sotw::tests::secret;
        use ResourceType::{Cluster as C, Secret as S};
        let ctx = StreamCtx::for_test(StreamKind::Delta);
        let snap = |tag: &str| {
            let empty = Resources::default;
            let cds = Resources::from_items("v-", [cluster("c", tag)]);
            let sds = Resources::from_items("v-", [secret("ca", tag)]);
            Arc::new(Snapshot::new(cds, empty(), empty(), empty()).with(S, sds))
        };
        let mut d = Delta::new(snap("1"));
        assert_eq!(summary(&d.on_request(request(C, &[], &[]), &ctx))[0].0, C);
        // No wildcard for secrets: an empty first request gets an empty reply.
        assert_eq!(
            summary(&d.on_request(request(S, &[], &[]), &ctx)),
            [(S, vec![], vec![])]
        );
        let out = d.on_request(request(S, &["ca", "cert"], &[]), &ctx);
        // "cert" does not exist (a vehicle not enrolled yet): said so, once. Envoy
        // ignores the removal of a secret and lets its cluster finish warming.
        assert_eq!(summary(&out), [(S, vec!["ca"], vec!["cert"])]);
        let out = d.on_snapshot(snap("2"), &ctx);
        assert_eq!(
            summary(&out),
            [(S, vec!["ca"], vec![]), (C, vec!["c"], vec![])]
        );
    }

    #[test]
    fn changed_scope_is_followed_by_the_route_it_names() {
        use ResourceType::{Route as R, ScopedRoute as S};
        let ctx = StreamCtx::for_test(StreamKind::Delta);
        let snap = |tag: u32| {
            let empty = Resources::default;
            let routes = Resources::from_items("v-", [route("r1"), route("r2")]);
            let scopes =
                Resources::from_items("v-", [scope("s1", "r1", tag), scope("s2", "r2", 0)]);
            Arc::new(Snapshot::new(empty(), empty(), empty(), routes).with_scoped_routes(scopes))
        };
        let mut d = Delta::new(snap(0));
        let out = d.on_request(request(S, &[], &[]), &ctx);
        assert_eq!(summary(&out), [(S, vec!["s1", "s2"], vec![])]);
        let out = d.on_request(request(R, &["r1", "r2"], &[]), &ctx);
        assert_eq!(summary(&out), [(R, vec!["r1", "r2"], vec![])]);
        let out = d.on_snapshot(snap(1), &ctx);
        assert_eq!(
            summary(&out),
            [(S, vec!["s1"], vec![]), (R, vec!["r1"], vec![])]
        );
    }
}
