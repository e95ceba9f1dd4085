//! The engine: owns link state, probe windows, the policy and the [`Selector`];
//! turns monitor/probe/policy inputs into selections and publishes an [`EngineView`].
//!
//! Invariants:
//! - Single owner: only the engine task mutates link state and selections; everyone
//!   else reads [`EngineView`]s from a `watch` channel.
//! - No selection before the link monitor's initial dump (`Synced`), so the first
//!   selection — and with it readiness — reflects real carrier state.
//! - Carrier loss clears the link's probe window: samples from before the outage say
//!   nothing about the link after it.
//! - A received policy is validated, then persisted, then applied; an invalid one is
//!   logged and counted, and the previous policy stays. Applying it also publishes its
//!   mesh form ([`Engine::mesh_policy`]) for store-and-forward; the stored policy is
//!   published at construction, so the receiver never waits for the cloud.
//! - A delta is applied only to the policy it was made against
//!   ([`VehiclePolicy::updated`]). A rejected delta is published as
//!   [`EngineView::policy_resync`] (a new `seq` each time), which the reporter sends to
//!   the control plane so it answers with the policy from the version held here; a
//!   rejected whole policy is not (resending it would not help).

use crate::config::{Config, UplinkConfig};
use crate::monitor::{LinkStatus, MonitorEvent};
use crate::policy::{self, UpdateError, VehiclePolicy};
use crate::power::{PowerMetrics, PowerTracker, PowerUpdate, PowerView};
use crate::probe::{Outcome, ProbeResult, ProbeWindow};
use crate::selector::{LinkHealth, Selector, Switch};
use misaki_proto::fleet_v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Re-evaluation period without inputs (dwell timers expire between probes too).
const TICK: Duration = Duration::from_millis(100);

/// A loss rate over fewer probes than this is noise (1 lost of 2 is "50 %"), so
/// `max_loss_percent` applies only from this many samples (or a full smaller window).
const MIN_LOSS_SAMPLES: usize = 10;

/// Inputs of the engine.
#[derive(Debug)]
pub enum Input {
    Monitor(MonitorEvent),
    Probe(ProbeResult),
    /// Boxed: an update is far larger than the other inputs.
    Policy(Box<pb::PolicyUpdate>),
    /// The power manager's news (`power.file`, `PUT /power`).
    Power(PowerUpdate),
}

impl From<PowerUpdate> for Input {
    fn from(u: PowerUpdate) -> Self {
        Input::Power(u)
    }
}

impl From<MonitorEvent> for Input {
    fn from(e: MonitorEvent) -> Self {
        Input::Monitor(e)
    }
}

impl From<ProbeResult> for Input {
    fn from(r: ProbeResult) -> Self {
        Input::Probe(r)
    }
}

/// One uplink as published.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkView {
    pub name: String,
    pub interface: String,
    pub kind: misaki_policy::UplinkKind,
    pub exists: bool,
    pub up: bool,
    pub carrier: bool,
    pub reachable: bool,
    pub rtt: Option<Duration>,
    pub jitter: Duration,
    pub loss_percent: f64,
    pub samples: usize,
    pub consecutive_lost: u32,
    pub metered: bool,
    pub cost: u32,
}

/// One class's selection as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectionView {
    pub class: String,
    pub uplink: Option<String>,
    pub reason: &'static str,
    pub since_unix_ms: u64,
    pub switches: u64,
}

/// The last policy delta the engine rejected, kept as long as the policy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyResync {
    /// Counts rejections, so two alike are still two requests.
    pub seq: u64,
    /// The rejected update's version.
    pub rejected_version: String,
    /// The delta's base was the held policy, yet its result failed: only the whole
    /// policy can help.
    pub want_full: bool,
    pub reason: String,
}

/// Everything the API and the reporter need, immutable once published.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineView {
    /// At least one selection has been made.
    pub ready: bool,
    pub policy_version: String,
    pub links: Vec<LinkView>,
    pub selections: Vec<SelectionView>,
    /// The last rejected delta (the policy held is `policy_version`).
    pub policy_resync: Option<PolicyResync>,
    /// The vehicle's power state, its source and the power file's last reading/error.
    pub power: PowerView,
}

impl EngineView {
    pub fn selection(&self, class: &str) -> Option<&SelectionView> {
        self.selections.iter().find(|s| s.class == class)
    }

    pub fn link(&self, name: &str) -> Option<&LinkView> {
        self.links.iter().find(|l| l.name == name)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SwitchLabels {
    class: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProbeLabels {
    uplink: String,
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UplinkLabel {
    uplink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AddressLabel {
    pub(crate) address: String,
}

/// The daemon's metrics (names follow `edge_netd_<name>_<unit>[_total]`).
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub(crate) switches: Family<SwitchLabels, Counter>,
    pub(crate) probes: Family<ProbeLabels, Counter>,
    pub(crate) carrier: Family<UplinkLabel, Gauge>,
    pub(crate) rtt_us: Family<UplinkLabel, Gauge>,
    pub(crate) loss_permille: Family<UplinkLabel, Gauge>,
    pub(crate) policy_updates: Family<ResultLabel, Counter>,
    pub(crate) reporter_connected: Gauge,
    pub(crate) reporter_connects: Family<ResultLabel, Counter>,
    pub(crate) reporter_control_plane: Family<AddressLabel, Gauge>,
    pub(crate) power: PowerMetrics,
}

impl Metrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        crate::register_metrics!(r;
            "edge_netd_selection_switches", "Uplink switches, by class and reason" => self.switches;
            "edge_netd_probes", "Link probes, by uplink and result" => self.probes;
            "edge_netd_link_carrier", "1 when the uplink has carrier" => self.carrier;
            "edge_netd_link_rtt_microseconds", "Mean probe RTT over the window" => self.rtt_us;
            "edge_netd_link_loss_permille", "Probe loss over the window" => self.loss_permille;
            "edge_netd_policy_updates", "Policy updates received, by result (applied, invalid, base_mismatch, version_mismatch)" => self.policy_updates;
            "edge_netd_reporter_connected", "1 while the report stream is open" => self.reporter_connected;
            "edge_netd_reporter_connects", "Report stream connection attempts, by result" => self.reporter_connects;
            "edge_netd_reporter_control_plane", "1 for the control-plane address the report stream uses (or tries), 0 for the others" => self.reporter_control_plane;
        );
        self.power.register(r);
    }
}

#[derive(Debug)]
struct LinkRuntime {
    cfg: UplinkConfig,
    status: LinkStatus,
    window: ProbeWindow,
}

/// The engine state. Drive it with [`Engine::run`].
#[derive(Debug)]
pub struct Engine {
    config: Arc<Config>,
    links: Vec<LinkRuntime>,
    policy: VehiclePolicy,
    selector: Selector,
    synced: bool,
    ready: bool,
    view: watch::Sender<Arc<EngineView>>,
    mesh: watch::Sender<Arc<misaki_policy::Policy>>,
    metrics: Metrics,
    resync: Option<PolicyResync>,
    power: PowerTracker,
}

fn unix_ms_of(at: Instant) -> u64 {
    let ago = Instant::now().saturating_duration_since(at);
    SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Engine {
    /// A new engine starting from `policy` (the stored one, or empty).
    pub fn new(
        config: Arc<Config>,
        policy: VehiclePolicy,
        metrics: Metrics,
    ) -> (Self, watch::Receiver<Arc<EngineView>>) {
        let links = config
            .uplinks
            .iter()
            .map(|u| LinkRuntime {
                cfg: u.clone(),
                status: LinkStatus {
                    interface: u.interface.clone(),
                    exists: false,
                    up: false,
                    carrier: false,
                },
                window: ProbeWindow::new(config.probe.window),
            })
            .collect();
        let mut selector = Selector::new(config.selection.dwell);
        selector.set_classes(policy.classes_with_default(&config.uplinks));
        let (view, rx) = watch::channel(Arc::new(EngineView::default()));
        let mesh = watch::Sender::new(policy.mesh.clone());
        let power = PowerTracker::new(config.power.as_ref());
        metrics.power.set_state(power.view().state);
        let mut e = Engine {
            config,
            links,
            policy,
            selector,
            synced: false,
            ready: false,
            view,
            mesh,
            metrics,
            resync: None,
            power,
        };
        e.publish();
        (e, rx)
    }

    /// The mesh policy in force (services, classes, uplinks), replaced whenever a new
    /// policy is applied; starts with the one the engine was built with.
    pub fn mesh_policy(&self) -> watch::Receiver<Arc<misaki_policy::Policy>> {
        self.mesh.subscribe()
    }

    fn health(&self) -> BTreeMap<String, LinkHealth> {
        let k = self.config.selection.blackhole_after;
        let min_samples = self.config.probe.window.min(MIN_LOSS_SAMPLES);
        self.links
            .iter()
            .map(|l| {
                let s = l.window.stats();
                let h = LinkHealth {
                    cost: self.policy.cost(&l.cfg),
                    carrier: l.status.carrier,
                    reachable: l.window.consecutive_lost() < k,
                    rtt: s.rtt,
                    loss_percent: (s.samples >= min_samples).then_some(s.loss_percent),
                };
                (l.cfg.name.clone(), h)
            })
            .collect()
    }

    /// Apply one input (no evaluation).
    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Monitor(MonitorEvent::Synced) => self.synced = true,
            Input::Monitor(MonitorEvent::Link(status)) => {
                if let Some(l) = self
                    .links
                    .iter_mut()
                    .find(|l| l.cfg.interface == status.interface)
                {
                    if l.status != status {
                        tracing::info!(uplink = %l.cfg.name, interface = %status.interface, exists = status.exists, up = status.up, carrier = status.carrier, "link state");
                    }
                    if l.status.carrier && !status.carrier {
                        l.window.clear();
                    }
                    self.metrics
                        .carrier
                        .get_or_create(&UplinkLabel {
                            uplink: l.cfg.name.clone(),
                        })
                        .set(i64::from(status.carrier));
                    l.status = status;
                }
            }
            Input::Probe(p) => {
                let Some(l) = self.links.get_mut(p.uplink) else {
                    return;
                };
                let result = match p.outcome {
                    Outcome::Answered(_) => "answered",
                    Outcome::Lost => "lost",
                };
                self.metrics
                    .probes
                    .get_or_create(&ProbeLabels {
                        uplink: l.cfg.name.clone(),
                        result,
                    })
                    .inc();
                // While there is no carrier, probes fail for a known reason; keep the
                // window empty so the link starts fresh when carrier returns.
                if l.status.carrier {
                    l.window.push(p.outcome);
                }
                let s = l.window.stats();
                let label = UplinkLabel {
                    uplink: l.cfg.name.clone(),
                };
                self.metrics.rtt_us.get_or_create(&label).set(
                    s.rtt
                        .map_or(-1, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
                );
                self.metrics
                    .loss_permille
                    .get_or_create(&label)
                    .set((s.loss_percent * 10.0).round() as i64);
            }
            Input::Policy(wire) => self.apply_policy(*wire),
            Input::Power(u) => self.apply_power(u),
        }
    }

    fn apply_power(&mut self, u: PowerUpdate) {
        if let Some(before) = self.power.apply(u) {
            let now = self.power.view();
            tracing::info!(
                from = before.as_str(),
                to = now.state.as_str(),
                source = now.source.as_str(),
                "power state"
            );
            self.metrics.power.set_state(now.state);
        }
    }

    fn count_policy(&self, result: &'static str) {
        self.metrics
            .policy_updates
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Ask the control plane for the policy again, from the one held.
    fn request_resync(&mut self, rejected_version: String, want_full: bool, reason: String) {
        let seq = self.resync.as_ref().map_or(1, |r| r.seq + 1);
        self.resync = Some(PolicyResync {
            seq,
            rejected_version,
            want_full,
            reason,
        });
    }

    fn apply_policy(&mut self, wire: pb::PolicyUpdate) {
        // Held already (e.g. a delta resent after a resync crossed it): nothing to do.
        if wire.version == self.policy.version {
            return;
        }
        let version = wire.version.clone();
        let delta = misaki_policy_wire::is_delta(&wire);
        match self.policy.updated(wire) {
            Err(e) => {
                let (result, want_full) = match &e {
                    UpdateError::Delta {
                        source: misaki_policy_wire::DeltaError::BaseMismatch { .. },
                        ..
                    } => ("base_mismatch", false),
                    UpdateError::Delta { .. } => ("version_mismatch", true),
                    UpdateError::Invalid(_) => ("invalid", true),
                };
                self.count_policy(result);
                tracing::warn!(%version, delta, error = %e, "rejected policy update; keeping the current policy");
                if delta {
                    self.request_resync(version, want_full, e.to_string());
                }
            }
            Ok(p) => {
                if let Some(wire) = &p.wire
                    && let Err(e) = policy::store(&self.config.state_dir, wire)
                {
                    // Still apply it: it is valid; only the reboot copy is stale.
                    tracing::error!(error = %e, "could not persist the policy");
                }
                self.count_policy("applied");
                tracing::info!(%version, delta, classes = p.classes.len(), "applied policy");
                self.selector
                    .set_classes(p.classes_with_default(&self.config.uplinks));
                self.mesh.send_replace(p.mesh.clone());
                self.policy = p;
            }
        }
    }

    /// Evaluate at `now` (after sync) and publish if anything changed.
    pub fn evaluate(&mut self, now: Instant) -> Vec<Switch> {
        let switches = if self.synced {
            let health = self.health();
            let sw = self.selector.evaluate(now.into_std(), &health);
            self.ready = true;
            for s in &sw {
                self.metrics
                    .switches
                    .get_or_create(&SwitchLabels {
                        class: s.class.clone(),
                        reason: s.reason.as_str(),
                    })
                    .inc();
                tracing::info!(
                    class = %s.class,
                    from = s.from.as_deref().unwrap_or("-"),
                    to = s.to.as_deref().unwrap_or("-"),
                    reason = s.reason.as_str(),
                    "uplink selection switched"
                );
            }
            sw
        } else {
            Vec::new()
        };
        self.publish();
        switches
    }

    fn publish(&mut self) {
        let k = self.config.selection.blackhole_after;
        let links = self
            .links
            .iter()
            .map(|l| {
                let s = l.window.stats();
                LinkView {
                    name: l.cfg.name.clone(),
                    interface: l.cfg.interface.clone(),
                    kind: l.cfg.kind,
                    exists: l.status.exists,
                    up: l.status.up,
                    carrier: l.status.carrier,
                    reachable: l.status.carrier && l.window.consecutive_lost() < k,
                    rtt: s.rtt,
                    jitter: s.jitter,
                    loss_percent: s.loss_percent,
                    samples: s.samples,
                    consecutive_lost: l.window.consecutive_lost(),
                    metered: l.cfg.metered,
                    cost: self.policy.cost(&l.cfg),
                }
            })
            .collect();
        let selections = self
            .selector
            .selections()
            .filter_map(|(class, sel)| {
                let sel = sel?;
                Some(SelectionView {
                    class: class.to_string(),
                    uplink: sel.uplink.clone(),
                    reason: sel.reason.as_str(),
                    since_unix_ms: unix_ms_of(Instant::from_std(sel.since)),
                    switches: sel.switches,
                })
            })
            .collect();
        let snap = EngineView {
            ready: self.ready,
            policy_version: self.policy.version.clone(),
            links,
            selections,
            policy_resync: self.resync.clone(),
            power: self.power.view().clone(),
        };
        self.view.send_if_modified(|cur| {
            if **cur == snap {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
    }

    /// Run until `inputs` closes or `shutdown` completes.
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                input = inputs.recv() => {
                    let Some(input) = input else { return };
                    self.handle(input);
                    // Drain what is already queued so a burst costs one evaluation.
                    while let Ok(more) = inputs.try_recv() {
                        self.handle(more);
                    }
                    self.evaluate(Instant::now());
                }
                _ = tick.tick() => { self.evaluate(Instant::now()); }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICKSTART: &str = include_str!("../../../examples/quickstart/mesh.yaml");

    fn engine(
        state_dir: &std::path::Path,
        policy: VehiclePolicy,
    ) -> (Engine, watch::Receiver<Arc<EngineView>>) {
        let text = format!(
            "vehicle_id: car-1\ncontrol_plane: http://198.18.0.1:18000\napi: 127.0.0.1:9470\n\
             state_dir: {}\nuplinks:\n  - {{ name: wifi, interface: wlan0, kind: wifi }}\n\
             probe:\n  targets: [\"198.18.0.1:7\"]\n",
            state_dir.display()
        );
        let config = Config::parse("t.yaml", &text).expect("test config");
        Engine::new(Arc::new(config), policy, Metrics::default())
    }

    #[test]
    fn power_reports_are_published_and_the_gauge_follows_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let (mut e, rx) = engine(dir.path(), VehiclePolicy::empty());
        assert_eq!(rx.borrow().power.state, crate::power::Power::On);
        let gauge = |e: &Engine, state: &'static str| {
            let label = crate::power::StateLabel { state };
            e.metrics.power.state.get_or_create(&label).get()
        };
        assert_eq!((gauge(&e, "on"), gauge(&e, "low")), (1, 0));
        let file = PowerUpdate::File(crate::power::Reading::Percent(10));
        e.handle(file.into());
        e.evaluate(Instant::now());
        let v = rx.borrow().power.clone();
        assert_eq!(
            (v.state, v.source),
            (crate::power::Power::Low, crate::power::Source::File)
        );
        assert_eq!((gauge(&e, "on"), gauge(&e, "low")), (0, 1));
        e.handle(Input::Power(PowerUpdate::Api(
            crate::power::Power::Accessory,
        )));
        e.evaluate(Instant::now());
        assert_eq!(rx.borrow().power.state, crate::power::Power::Accessory);
        assert_eq!((gauge(&e, "low"), gauge(&e, "accessory")), (0, 1));
    }

    /// Feed one update; the published view afterwards.
    fn feed(
        e: &mut Engine,
        rx: &watch::Receiver<Arc<EngineView>>,
        u: pb::PolicyUpdate,
    ) -> Arc<EngineView> {
        e.handle(Input::Policy(Box::new(u)));
        e.evaluate(Instant::now());
        Arc::clone(&rx.borrow())
    }

    #[tokio::test]
    async fn a_rejected_delta_asks_for_a_resync_and_an_applied_one_is_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let policy = misaki_policy::parse("quickstart", QUICKSTART).unwrap();
        let base = misaki_policy_wire::to_wire(&policy);
        let mut edited = policy.clone();
        edited.mesh.cloud_inbound_port = 16443;
        let target = misaki_policy_wire::to_wire(&edited);
        let delta = misaki_policy_wire::diff(&base, &target).unwrap();
        let (mut e, rx) = engine(dir.path(), VehiclePolicy::try_from(base.clone()).unwrap());

        // Made against another policy: kept ours, asks for the policy from ours.
        let mut elsewhere = delta.clone();
        elsewhere.base_version = "0123456789abcdef".into();
        let snap = feed(&mut e, &rx, elsewhere.clone());
        assert_eq!(snap.policy_version, base.version);
        let r = snap.policy_resync.clone().expect("a resync request");
        assert_eq!((r.seq, r.want_full), (1, false));
        assert_eq!(r.rejected_version, target.version);
        // The same rejection again is a new request.
        let snap = feed(&mut e, &rx, elsewhere);
        assert_eq!(snap.policy_resync.as_ref().map(|r| r.seq), Some(2));

        // The right base but a result that is not its version: only whole helps.
        let mut wrong = delta.clone();
        wrong.mesh.as_mut().unwrap().cloud_inbound_port = 16444;
        let snap = feed(&mut e, &rx, wrong);
        let r = snap.policy_resync.clone().unwrap();
        assert_eq!(
            (r.seq, r.want_full, snap.policy_version.as_str()),
            (3, true, base.version.as_str())
        );

        // The right delta: applied, and the whole policy stored.
        let snap = feed(&mut e, &rx, delta);
        assert_eq!(snap.policy_version, target.version);
        assert_eq!(e.mesh_policy().borrow().mesh.cloud_inbound_port, 16443);
        let stored = policy::load(dir.path()).unwrap().unwrap();
        assert_eq!(stored.wire, Some(target.clone()));

        // A bad whole policy is rejected without a resync: resending it would not help.
        let mut bad = target;
        bad.version = "bad".into();
        bad.uplinks.clear();
        let snap = feed(&mut e, &rx, bad);
        assert_eq!(snap.policy_resync.as_ref().map(|r| r.seq), Some(3));
        assert_ne!(snap.policy_version, "bad");
    }

    /// Two uplinks, `wifi` preferred (the `default` class ranks them in config order).
    fn two_uplinks(state_dir: &std::path::Path) -> (Engine, watch::Receiver<Arc<EngineView>>) {
        let text = format!(
            "vehicle_id: car-1\ncontrol_plane: http://198.18.0.1:18000\napi: 127.0.0.1:9470\n\
             state_dir: {}\nuplinks:\n  - {{ name: wifi, interface: wlan0, kind: wifi }}\n\
             \x20 - {{ name: lte, interface: wwan0, kind: lte }}\n\
             probe:\n  targets: [\"198.18.0.1:7\"]\n\
             selection:\n  dwell: 3s\n  blackhole_after: 3\n",
            state_dir.display()
        );
        let config = Config::parse("t.yaml", &text).expect("test config");
        Engine::new(Arc::new(config), VehiclePolicy::empty(), Metrics::default())
    }

    fn link(interface: &str, carrier: bool) -> Input {
        Input::from(MonitorEvent::Link(LinkStatus {
            interface: interface.into(),
            exists: true,
            up: true,
            carrier,
        }))
    }

    /// The `default` class's uplink and why, as last published.
    fn default_class(
        rx: &watch::Receiver<Arc<EngineView>>,
    ) -> Option<(Option<String>, &'static str)> {
        rx.borrow()
            .selection(crate::policy::DEFAULT_CLASS)
            .map(|s| (s.uplink.clone(), s.reason))
    }

    /// Waits (in paused time) until the published view satisfies `f`.
    async fn until(rx: &mut watch::Receiver<Arc<EngineView>>, f: impl Fn(&EngineView) -> bool) {
        tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| f(s)))
            .await
            .expect("the engine publishes it within a minute")
            .expect("the engine is running");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_selected_before_the_link_dump_and_carrier_loss_fails_over_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, mut rx) = two_uplinks(dir.path());
        let (tx, inputs) = mpsc::channel(16);
        let task = tokio::spawn(engine.run(inputs, std::future::pending()));

        tx.send(link("wlan0", true)).await.unwrap();
        tx.send(link("wwan0", true)).await.unwrap();
        // Ticks pass, but without the dump's end nothing is selected (nor ready).
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!rx.borrow().ready);
        assert_eq!(default_class(&rx), None);
        assert!(rx.borrow().link("wifi").unwrap().carrier);

        tx.send(MonitorEvent::Synced.into()).await.unwrap();
        until(&mut rx, |s| s.ready).await;
        assert_eq!(default_class(&rx), Some((Some("wifi".into()), "initial")));

        // Carrier loss is an input: the switch needs no tick.
        let before = tokio::time::Instant::now();
        tx.send(link("wlan0", false)).await.unwrap();
        until(&mut rx, |s| !s.link("wifi").unwrap().carrier).await;
        assert_eq!(tokio::time::Instant::now(), before, "no time passed");
        assert_eq!(
            default_class(&rx),
            Some((Some("lte".into()), "carrier_lost"))
        );

        // Losing the last uplink leaves the class without one.
        tx.send(link("wwan0", false)).await.unwrap();
        until(&mut rx, |s| !s.link("lte").unwrap().carrier).await;
        assert_eq!(default_class(&rx), Some((None, "carrier_lost")));
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_preferred_uplink_comes_back_only_after_dwell_and_a_blackhole_needs_k_losses() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, mut rx) = two_uplinks(dir.path());
        let (tx, inputs) = mpsc::channel(16);
        tokio::spawn(engine.run(inputs, std::future::pending()));
        for input in [
            link("wlan0", false),
            link("wwan0", true),
            MonitorEvent::Synced.into(),
        ] {
            tx.send(input).await.unwrap();
        }
        until(&mut rx, |s| s.ready).await;
        assert_eq!(default_class(&rx), Some((Some("lte".into()), "initial")));

        // wifi gets carrier: eligible, but not yet for `dwell` (3 s).
        tx.send(link("wlan0", true)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2_800)).await;
        assert_eq!(default_class(&rx).unwrap().0.as_deref(), Some("lte"));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            default_class(&rx),
            Some((Some("wifi".into()), "preferred_stable"))
        );

        // Two lost probes are not a blackhole; the third (blackhole_after: 3) is.
        let lost = || {
            Input::from(ProbeResult {
                uplink: 0,
                outcome: Outcome::Lost,
            })
        };
        for _ in 0..2 {
            tx.send(lost()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(default_class(&rx).unwrap().0.as_deref(), Some("wifi"));
        assert_eq!(rx.borrow().link("wifi").unwrap().consecutive_lost, 2);
        tx.send(lost()).await.unwrap();
        until(&mut rx, |s| !s.link("wifi").unwrap().reachable).await;
        assert_eq!(default_class(&rx), Some((Some("lte".into()), "blackhole")));

        // An answer makes it reachable again, and after dwell it is preferred again.
        let answered = ProbeResult {
            uplink: 0,
            outcome: Outcome::Answered(Duration::from_millis(20)),
        };
        tx.send(answered.into()).await.unwrap();
        until(&mut rx, |s| s.link("wifi").unwrap().reachable).await;
        assert_eq!(
            rx.borrow().link("wifi").unwrap().rtt,
            Some(Duration::from_millis(20))
        );
        until(&mut rx, |s| {
            s.selection(crate::policy::DEFAULT_CLASS)
                .is_some_and(|c| c.uplink.as_deref() == Some("wifi"))
        })
        .await;
        assert_eq!(default_class(&rx).unwrap().1, "preferred_stable");
    }

    #[tokio::test(start_paused = true)]
    async fn the_engine_stops_on_shutdown_and_when_its_inputs_close() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _rx) = two_uplinks(dir.path());
        let (_tx, inputs) = mpsc::channel::<Input>(1);
        let stop = tokio::time::sleep(Duration::from_secs(10));
        let start = tokio::time::Instant::now();
        engine.run(inputs, stop).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        let (engine, _rx) = two_uplinks(dir.path());
        let (tx, inputs) = mpsc::channel::<Input>(1);
        drop(tx);
        engine.run(inputs, std::future::pending()).await;
    }
}
