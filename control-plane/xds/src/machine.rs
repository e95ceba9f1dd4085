//! What the SotW and delta state machines share: one stream's [`State`] (the snapshot,
//! nonces, and per type whether it was requested and the latest response), and the
//! one request and push logic ([`Protocol`] for every [`Machine`]) that runs each
//! variant's own rules (`sotw.rs`, `delta.rs`).
//!
//! Invariants (Envoy's `xds_protocol.rst` is the reference; the rules that differ
//! between the variants are listed at the top of each variant's module):
//! - a request for a type misaki does not serve is logged and changes nothing;
//! - every response gets a nonce new on its stream (a counter); a request answers the
//!   latest response of its type when its `response_nonce` is that response's nonce
//!   (before the first response of the type, when it is empty);
//! - a NACK (`error_detail`) is recorded: with the rejected version when it answers the
//!   latest response, else without one (the response it rejects has been superseded);
//!   an ACK of the latest response is counted with that response's version (SotW: the
//!   version the client names). What a NACK stops being resent is the variant's rule;
//! - a request is answered for its own type, then, if that reply adds or changes
//!   resources, for the types warming waits for;
//! - a push plans each type in [`ResourceType::PUSH_ORDER`], SDS → CDS → EDS → LDS →
//!   SRDS → RDS (secrets before the clusters and listeners whose TLS names them,
//!   Envoy's own order), a type only if its snapshot version changed or warming forces
//!   it, and its replies go out in that order; then the cluster (and, in delta,
//!   assignment) removals make-before-break held back, when other types change too;
//! - warming ([`warmed_by`]): an added or changed cluster is followed by EDS, an added
//!   or changed listener by SRDS and RDS, an added or changed scope by RDS, even if
//!   these did not change (Envoy keeps the parent warming until it gets them); a
//!   parent always comes before what it warms in push order. What is resent is the
//!   variant's rule ([`Machine::warming`]).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use misaki_compiler::snapshot::{Resource, ResourceType, SharedStr, Snapshot};
use tracing::debug;

use crate::status::StreamKind;
use crate::stream::{Protocol, StreamCtx};
use crate::wire::WireMessage;

/// The types a client must be sent after an added or changed resource of type `t`,
/// even if unchanged, because Envoy keeps the parent warming until it gets them: a
/// cluster waits for EDS, a listener for its scopes and routes, a scope for its routes.
pub(crate) const fn warmed_by(t: ResourceType) -> &'static [ResourceType] {
    match t {
        ResourceType::Cluster => &[ResourceType::Endpoint],
        ResourceType::Listener => &[ResourceType::ScopedRoute, ResourceType::Route],
        ResourceType::ScopedRoute => &[ResourceType::Route],
        // Envoy shares one SDS subscription per secret among the clusters and listeners
        // that use it: a changed cluster finds the secret it names already there.
        ResourceType::Secret | ResourceType::Endpoint | ResourceType::Route => &[],
    }
}

/// The fields of an ADS request that both variants read alike.
pub(crate) trait Request: prost::Message + Default + Send + 'static {
    fn node(&self) -> Option<&Node>;
    fn type_url(&self) -> &str;
    /// The nonce of the response this request answers; empty for none.
    fn response_nonce(&self) -> &str;
    /// Set when the request rejects that response (a NACK).
    fn error_detail(&self) -> Option<&RpcStatus>;
}

macro_rules! impl_request {
    ($($req:ty),*) => {$(
        impl Request for $req {
            fn node(&self) -> Option<&Node> {
                self.node.as_ref()
            }
            fn type_url(&self) -> &str {
                &self.type_url
            }
            fn response_nonce(&self) -> &str {
                &self.response_nonce
            }
            fn error_detail(&self) -> Option<&RpcStatus> {
                self.error_detail.as_ref()
            }
        }
    )*};
}
impl_request!(DiscoveryRequest, DeltaDiscoveryRequest);

/// What both variants keep per type about its responses.
#[derive(Debug, Default)]
struct Exchange {
    /// The client has sent at least one request for this type.
    requested: bool,
    /// Latest nonce and version sent for this type.
    nonce: Option<String>,
    version: Option<SharedStr>,
}

/// One ADS stream's protocol state: what both variants keep (the snapshot it follows,
/// the nonce counter, per type whether the client asked for it and the latest
/// response), and the variant's own state per type, `S`.
#[derive(Debug)]
pub(crate) struct State<S> {
    pub snapshot: Arc<Snapshot>,
    /// The variant's own state of each type, by [`ResourceType::index`].
    pub types: [S; ResourceType::COUNT],
    exchanges: [Exchange; ResourceType::COUNT],
    last_nonce: u64,
}

impl<S: Default> State<S> {
    fn new(snapshot: Arc<Snapshot>) -> Self {
        State {
            snapshot,
            types: Default::default(),
            exchanges: Default::default(),
            last_nonce: 0,
        }
    }
}

impl<S> State<S> {
    /// Whether the client has asked for `t`.
    pub fn requested(&self, t: ResourceType) -> bool {
        self.exchanges[t.index()].requested
    }

    /// The version of the latest response of type `t`.
    pub fn version(&self, t: ResourceType) -> Option<&SharedStr> {
        self.exchanges[t.index()].version.as_ref()
    }

    /// Whether `t` has the same version in `old` as in the current snapshot.
    pub fn unchanged(&self, old: &Snapshot, t: ResourceType) -> bool {
        old.get(t).version == self.snapshot.get(t).version
    }

    /// Record the ACK or NACK `req` (of type `t`) carries; whether it answers the latest
    /// response of `t` (see the module invariants). `acked` is the version an ACK names,
    /// where the protocol has one (SotW); else an ACK is of the version last sent.
    pub fn record_answer(
        &self,
        t: ResourceType,
        req: &impl Request,
        acked: Option<&str>,
        ctx: &StreamCtx,
    ) -> bool {
        let ex = &self.exchanges[t.index()];
        let nonce = req.response_nonce();
        let latest = match &ex.nonce {
            None => nonce.is_empty(),
            Some(sent) => sent == nonce,
        };
        if let Some(err) = req.error_detail() {
            // A NACK of an older response is still worth recording (it is data), but
            // its version is no longer known.
            let version = if latest { ex.version.as_deref() } else { None };
            ctx.nacked(t, version, nonce, err);
        } else if latest && ex.nonce.is_some() {
            // The ACK names the latest version sent: share it.
            let version = match (acked, &ex.version) {
                (Some(v), Some(sent)) if *sent == *v => sent.clone(),
                (Some(v), _) => SharedStr::from(v),
                (None, Some(sent)) => sent.clone(),
                (None, None) => return latest,
            };
            ctx.acked(t, &version);
        }
        latest
    }

    /// Mark `t` requested; whether this is the client's first request of it.
    fn request(&mut self, t: ResourceType) -> bool {
        !std::mem::replace(&mut self.exchanges[t.index()].requested, true)
    }

    /// Record (and count) a response of type `t` at `version` carrying `items`; returns
    /// its nonce.
    pub fn sent(
        &mut self,
        t: ResourceType,
        version: &SharedStr,
        items: &[Arc<Resource>],
        ctx: &StreamCtx,
    ) -> String {
        self.last_nonce += 1;
        let nonce = self.last_nonce.to_string();
        let bytes: usize = items.iter().map(|r| r.wire().len()).sum();
        ctx.pushed(t, version, bytes);
        let ex = &mut self.exchanges[t.index()];
        ex.nonce = Some(nonce.clone());
        ex.version = Some(version.clone());
        nonce
    }
}

/// What a reply must carry even if the client seems to hold it: SotW, the whole type
/// (`bool`); delta, names.
pub(crate) trait Force: Default {
    /// Whether it forces anything.
    fn any(&self) -> bool;
    /// Add what `other` forces.
    fn add(&mut self, other: Self);
}

impl Force for bool {
    fn any(&self) -> bool {
        *self
    }

    fn add(&mut self, other: bool) {
        *self |= other;
    }
}

/// One push's plans, by [`ResourceType::index`].
pub(crate) type Plans<P> = [Option<P>; ResourceType::COUNT];

/// One ADS variant's rules, implemented on the [`State`] with its per-type state. The
/// stream task drives it as a [`Protocol`], whose request and push logic is written
/// once, below.
pub(crate) trait Machine: Sized + Send + 'static {
    type Req: Request;
    type Out: WireMessage + Send + 'static;
    /// A reply decided on for one type, before its nonce.
    type Plan;
    type Force: Force;
    const KIND: StreamKind;
    /// CDS is planned after the other types of a push, by
    /// [`Machine::make_before_break`], rather than in push order (SotW: what its first
    /// CDS reply carries depends on whether the other types change).
    const CLUSTERS_LAST: bool;

    /// Record the ACK or NACK of `req` ([`State::record_answer`]); whether to go on
    /// with it.
    fn answer(&mut self, t: ResourceType, req: &Self::Req, ctx: &StreamCtx) -> bool;
    /// Apply `req`'s subscription to `t` (`first`: the stream's first request of `t`);
    /// what the reply must carry even if the client seems to hold it.
    fn subscribe(&mut self, t: ResourceType, first: bool, req: Self::Req) -> Self::Force;
    /// The reply `t` needs now, if any; what `force` names goes out regardless.
    fn plan(&mut self, t: ResourceType, force: &Self::Force) -> Option<Self::Plan>;
    /// What warming forces into `child` once `plan` goes out for its parent `parent`.
    fn warming(&self, parent: ResourceType, child: ResourceType, plan: &Self::Plan) -> Self::Force;
    /// Make-before-break: hold back, from a push's `plans`, the removal of clusters
    /// that went away while other types change, until those have moved on; returns
    /// the replies to send after all others.
    fn make_before_break(
        &mut self,
        old: &Snapshot,
        plans: &mut Plans<Self::Plan>,
    ) -> Vec<(ResourceType, Self::Plan)>;
    /// Assign `plan` its nonce ([`State::sent`]) and record what the client now has.
    fn commit(&mut self, t: ResourceType, plan: Self::Plan, ctx: &StreamCtx) -> Self::Out;
}

impl<S> Protocol for State<S>
where
    S: Default + Send + 'static,
    State<S>: Machine,
{
    type Req = <Self as Machine>::Req;
    type Out = <Self as Machine>::Out;
    const KIND: StreamKind = <Self as Machine>::KIND;

    fn node(req: &Self::Req) -> Option<&Node> {
        req.node()
    }

    fn new(snapshot: Arc<Snapshot>) -> Self {
        State::new(snapshot)
    }

    fn on_request(&mut self, req: Self::Req, ctx: &StreamCtx) -> Vec<Self::Out> {
        let Some(t) = ResourceType::from_type_url(req.type_url()) else {
            debug!(type_url = %req.type_url(), "request for a type misaki does not serve");
            return Vec::new();
        };
        if !self.answer(t, &req, ctx) {
            return Vec::new();
        }
        let first = self.request(t);
        let force = self.subscribe(t, first, req);
        let mut out = Vec::new();
        let Some(plan) = self.plan(t, &force) else {
            return out;
        };
        let warmed: Vec<(ResourceType, <Self as Machine>::Force)> = warmed_by(t)
            .iter()
            .map(|&child| (child, self.warming(t, child, &plan)))
            .collect();
        out.push(self.commit(t, plan, ctx));
        for (child, force) in warmed {
            if force.any()
                && let Some(p) = self.plan(child, &force)
            {
                out.push(self.commit(child, p, ctx));
            }
        }
        out
    }

    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, ctx: &StreamCtx) -> Vec<Self::Out> {
        let old = std::mem::replace(&mut self.snapshot, snapshot);
        let mut plans = self.plan_push(&old);
        let last = self.make_before_break(&old, &mut plans);
        let mut out = Vec::new();
        for t in ResourceType::PUSH_ORDER {
            if let Some(p) = plans[t.index()].take() {
                out.push(self.commit(t, p, ctx));
            }
        }
        for (t, p) in last {
            out.push(self.commit(t, p, ctx));
        }
        out
    }
}

impl<S> State<S>
where
    State<S>: Machine,
{
    /// A push's plans, in push order: each type that changed or that warming forces
    /// (what its parents' plans force into it); CDS too unless the variant decides it
    /// last ([`Machine::CLUSTERS_LAST`]).
    fn plan_push(&mut self, old: &Snapshot) -> Plans<<Self as Machine>::Plan> {
        let mut plans: Plans<<Self as Machine>::Plan> = Default::default();
        for (i, t) in ResourceType::PUSH_ORDER.into_iter().enumerate() {
            if t == ResourceType::Cluster && <Self as Machine>::CLUSTERS_LAST {
                continue;
            }
            let mut force = <Self as Machine>::Force::default();
            for parent in &ResourceType::PUSH_ORDER[..i] {
                if let Some(p) = &plans[parent.index()]
                    && warmed_by(*parent).contains(&t)
                {
                    force.add(self.warming(*parent, t, p));
                }
            }
            plans[t.index()] = if self.unchanged(old, t) && !force.any() {
                None
            } else {
                self.plan(t, &force)
            };
        }
        plans
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{StreamRegistry, TypeStatus};
    use ResourceType::{Cluster, Endpoint, Listener, Route, ScopedRoute, Secret};
    use misaki_compiler::snapshot::Resources;

    fn status(reg: &StreamRegistry, t: ResourceType) -> TypeStatus {
        reg.snapshot()[0].types[t.index()].clone()
    }

    fn answer(nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            response_nonce: nonce.into(),
            error_detail: nack.then(RpcStatus::default),
            ..Default::default()
        }
    }

    #[test]
    fn a_type_comes_after_every_type_it_waits_for() {
        let pos = |t: ResourceType| ResourceType::PUSH_ORDER.iter().position(|x| *x == t);
        for parent in ResourceType::PUSH_ORDER {
            for child in warmed_by(parent) {
                assert!(pos(parent) < pos(*child), "{parent:?} warms {child:?}");
            }
        }
    }

    #[test]
    fn acks_and_nacks_pair_with_the_latest_response_of_their_type() {
        let reg = StreamRegistry::new();
        let ctx = StreamCtx::for_test_in(StreamKind::Sotw, &reg);
        let mut state = State::<()>::new(Arc::default());
        // Before the first response only an empty nonce is current, and it acks nothing.
        assert!(state.record_answer(Cluster, &answer("", false), None, &ctx));
        assert!(!state.record_answer(Cluster, &answer("1", false), None, &ctx));
        assert_eq!(status(&reg, Cluster).last_acked, None);
        // Every response gets a new nonce, whatever its type.
        assert_eq!(state.sent(Cluster, &"c1".into(), &[], &ctx), "1");
        assert_eq!(state.sent(Endpoint, &"e1".into(), &[], &ctx), "2");
        assert_eq!(state.sent(Cluster, &"c2".into(), &[], &ctx), "3");
        for stale in ["1", "2", ""] {
            assert!(!state.record_answer(Cluster, &answer(stale, false), None, &ctx));
        }
        assert_eq!(status(&reg, Cluster).last_acked, None);
        assert!(state.record_answer(Cluster, &answer("3", false), None, &ctx));
        assert_eq!(status(&reg, Cluster).last_acked.as_deref(), Some("c2"));
        // SotW: the version the client names.
        assert!(state.record_answer(Cluster, &answer("3", false), Some("c0"), &ctx));
        assert_eq!(status(&reg, Cluster).last_acked.as_deref(), Some("c0"));
        // A NACK of the latest response names its version; of an older one, none.
        assert!(state.record_answer(Cluster, &answer("3", true), Some("c2"), &ctx));
        let nack = status(&reg, Cluster).last_nack.unwrap();
        assert_eq!(
            (nack.version.as_deref(), nack.nonce.as_str()),
            (Some("c2"), "3")
        );
        assert!(!state.record_answer(Cluster, &answer("1", true), None, &ctx));
        assert_eq!(status(&reg, Cluster).last_nack.unwrap().version, None);
        let m = ctx.metrics.of(Cluster);
        assert_eq!((m.acks.get(), m.nacks.get(), m.pushes.get()), (2, 2, 2));
    }

    /// A reply of the toy machine: its type and whether warming forced it.
    #[derive(Debug, PartialEq)]
    struct Toy(ResourceType, bool);

    impl WireMessage for Toy {
        fn encoded_len(&self) -> usize {
            0
        }
        fn parts(&self) -> usize {
            0
        }
        fn put_part(&self, _: usize, _: &mut impl crate::wire::WireBuf) {}
    }

    /// The toy machine's per-type state: none.
    #[derive(Debug, Default)]
    struct Untyped<const CLUSTERS_LAST: bool>;

    /// Plans every type it is asked for (the plan says whether it was forced), every
    /// reply touches what it warms; CDS goes last when `CLUSTERS_LAST`.
    type ToyMachine<const CLUSTERS_LAST: bool> = State<Untyped<CLUSTERS_LAST>>;

    impl<const CLUSTERS_LAST: bool> Machine for ToyMachine<CLUSTERS_LAST> {
        type Req = DiscoveryRequest;
        type Out = Toy;
        type Plan = bool;
        type Force = bool;
        const KIND: StreamKind = StreamKind::Sotw;
        const CLUSTERS_LAST: bool = CLUSTERS_LAST;

        fn answer(&mut self, _: ResourceType, _: &DiscoveryRequest, _: &StreamCtx) -> bool {
            true
        }
        fn subscribe(&mut self, _: ResourceType, _: bool, _: DiscoveryRequest) -> bool {
            false
        }
        fn plan(&mut self, _: ResourceType, force: &bool) -> Option<bool> {
            Some(*force)
        }
        fn warming(&self, _: ResourceType, _: ResourceType, _: &bool) -> bool {
            true
        }
        fn make_before_break(
            &mut self,
            _: &Snapshot,
            plans: &mut Plans<bool>,
        ) -> Vec<(ResourceType, bool)> {
            // Stands for SotW deciding CDS last: after the others, and once more at the end.
            if CLUSTERS_LAST {
                assert!(
                    plans[Cluster.index()].is_none(),
                    "left to make-before-break"
                );
                plans[Cluster.index()] = Some(false);
                vec![(Cluster, false)]
            } else {
                Vec::new()
            }
        }
        fn commit(&mut self, t: ResourceType, forced: bool, _: &StreamCtx) -> Toy {
            Toy(t, forced)
        }
    }

    /// A snapshot where each type's version is its tag in `tags`.
    fn tagged(tags: [&str; ResourceType::COUNT]) -> Arc<Snapshot> {
        let mut s = Snapshot::default();
        for t in ResourceType::PUSH_ORDER {
            let r = Resource::from_any("r", tags[t.index()], Default::default());
            s = s.with(t, Resources::from_items("v-", [Arc::new(r)]));
        }
        Arc::new(s)
    }

    #[test]
    fn a_push_goes_in_push_order_with_what_changed_and_what_it_warms() {
        let reg = StreamRegistry::new();
        let ctx = StreamCtx::for_test_in(StreamKind::Sotw, &reg);
        let mut m = <ToyMachine<false> as Protocol>::new(tagged(["1"; 6]));
        assert!(m.on_snapshot(tagged(["1"; 6]), &ctx).is_empty());
        let out = m.on_snapshot(tagged(["1", "1", "1", "2", "1", "1"]), &ctx);
        let lds = [
            Toy(Listener, false),
            Toy(ScopedRoute, true),
            Toy(Route, true),
        ];
        assert_eq!(out, lds);
        let out = m.on_snapshot(tagged(["2", "2", "1", "3", "2", "1"]), &ctx);
        let all = [
            Toy(Secret, false),
            Toy(Cluster, false),
            Toy(Endpoint, true),
            Toy(Listener, false),
            Toy(ScopedRoute, true),
            Toy(Route, true),
        ];
        assert_eq!(out, all);
        // CDS decided last still goes out in push order, then its trailing reply.
        let mut m = <ToyMachine<true> as Protocol>::new(tagged(["1"; 6]));
        let out = m.on_snapshot(tagged(["1", "1", "1", "1", "2", "1"]), &ctx);
        let srds = [
            Toy(Cluster, false),
            Toy(ScopedRoute, false),
            Toy(Route, true),
            Toy(Cluster, false),
        ];
        assert_eq!(out, srds);
    }
}
