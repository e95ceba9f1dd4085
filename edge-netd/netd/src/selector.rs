//! Uplink selection per traffic class. Pure: no I/O, no clock — `now` is passed in.
//!
//! Invariants:
//! - **Eligible** = allowed by the class, carrier up, probes answered (fewer than K
//!   consecutive losses), RTT ≤ `max_rtt` and loss ≤ `max_loss_percent` when the
//!   class sets them. An RTT not yet measured does not make a link ineligible.
//! - **Rank** = position in the class's preference list; a class with an empty list
//!   allows every uplink, ranked by cost, then name.
//! - The selected uplink of a class is always eligible or `None`; when it stops being
//!   eligible the class switches at the next evaluation (carrier loss: at once, since
//!   the link monitor triggers an evaluation; blackhole: after K lost probes).
//! - Failing over prefers uplinks that have been eligible for `dwell`; only if none
//!   has, the best-ranked eligible one is taken (some link beats none).
//! - Moving *back* to a better-ranked uplink happens only once it has been eligible
//!   without interruption for `dwell` (hysteresis): a flapping link never becomes
//!   stable, so it cannot flap the selection.
//! - Every switch is returned with its [`Reason`]; the caller logs it.

use crate::policy::ClassSpec;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the selector knows about one uplink at an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkHealth {
    pub cost: u32,
    /// Interface exists, is administratively up and has carrier.
    pub carrier: bool,
    /// Fewer than K consecutive probes lost.
    pub reachable: bool,
    /// Mean RTT over the probe window (None: nothing answered yet).
    pub rtt: Option<Duration>,
    /// Loss over the probe window, 0.0..=100.0; `None` while the window holds too
    /// few probes for a rate to mean anything (blackholes are caught by `reachable`).
    pub loss_percent: Option<f64>,
}

/// Why a class's selection changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// First selection for this class.
    Initial,
    /// The selected link lost carrier (or its interface vanished).
    CarrierLost,
    /// The selected link stopped answering probes (K consecutive losses).
    Blackhole,
    /// The selected link's RTT is over the class's `max_rtt`.
    RttExceeded,
    /// The selected link's loss is over the class's `max_loss_percent`.
    LossExceeded,
    /// The policy no longer allows the selected link for this class.
    NotAllowed,
    /// A better-ranked link has been eligible for the dwell time.
    PreferredStable,
    /// A class that had no eligible link has one again.
    Recovered,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::CarrierLost => "carrier_lost",
            Reason::Blackhole => "blackhole",
            Reason::RttExceeded => "rtt_exceeded",
            Reason::LossExceeded => "loss_exceeded",
            Reason::NotAllowed => "not_allowed",
            Reason::PreferredStable => "preferred_stable",
            Reason::Recovered => "recovered",
        }
    }
}

/// One change of one class's selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switch {
    pub class: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: Reason,
}

/// A class's current selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub uplink: Option<String>,
    pub reason: Reason,
    pub since: Instant,
    pub switches: u64,
}

#[derive(Debug, Clone)]
struct ClassState {
    spec: ClassSpec,
    selection: Option<Selection>,
    /// Since when each allowed link has been eligible without interruption.
    eligible_since: BTreeMap<String, Instant>,
}

/// The selector for all classes.
#[derive(Debug, Clone)]
pub struct Selector {
    dwell: Duration,
    classes: BTreeMap<String, ClassState>,
}

impl Selector {
    pub fn new(dwell: Duration) -> Self {
        Selector {
            dwell,
            classes: BTreeMap::new(),
        }
    }

    /// Replace the classes. Classes kept by name keep their selection and stability
    /// history; the next [`Self::evaluate`] re-checks them against the new spec.
    pub fn set_classes(&mut self, specs: Vec<ClassSpec>) {
        let mut old = std::mem::take(&mut self.classes);
        for spec in specs {
            let state = match old.remove(&spec.name) {
                Some(mut s) => {
                    s.spec = spec;
                    s
                }
                None => ClassState {
                    spec,
                    selection: None,
                    eligible_since: BTreeMap::new(),
                },
            };
            self.classes.insert(state.spec.name.clone(), state);
        }
    }

    /// Current selection per class (`None` before the first evaluation).
    pub fn selections(&self) -> impl Iterator<Item = (&str, Option<&Selection>)> {
        self.classes
            .iter()
            .map(|(n, s)| (n.as_str(), s.selection.as_ref()))
    }

    pub fn selection(&self, class: &str) -> Option<&Selection> {
        self.classes.get(class)?.selection.as_ref()
    }

    /// Re-evaluate every class at `now`; returns the switches made.
    pub fn evaluate(&mut self, now: Instant, links: &BTreeMap<String, LinkHealth>) -> Vec<Switch> {
        let dwell = self.dwell;
        let mut switches = Vec::new();
        for state in self.classes.values_mut() {
            if let Some(sw) = evaluate_class(state, now, dwell, links) {
                switches.push(sw);
            }
        }
        switches
    }
}

/// Why `link` is not eligible for `spec`, or `None` if it is.
fn ineligible(spec: &ClassSpec, allowed: bool, h: Option<&LinkHealth>) -> Option<Reason> {
    let Some(h) = h else {
        return Some(Reason::NotAllowed);
    };
    if !allowed {
        return Some(Reason::NotAllowed);
    }
    if !h.carrier {
        return Some(Reason::CarrierLost);
    }
    if !h.reachable {
        return Some(Reason::Blackhole);
    }
    if let (Some(max), Some(rtt)) = (spec.max_rtt, h.rtt)
        && rtt > max
    {
        return Some(Reason::RttExceeded);
    }
    if let (Some(max), Some(loss)) = (spec.max_loss_percent, h.loss_percent)
        && loss > f64::from(max)
    {
        return Some(Reason::LossExceeded);
    }
    None
}

/// The class's allowed links, best first.
fn ranked<'a>(spec: &'a ClassSpec, links: &'a BTreeMap<String, LinkHealth>) -> Vec<&'a str> {
    if spec.uplinks.is_empty() {
        let mut all: Vec<(&str, u32)> = links.iter().map(|(n, h)| (n.as_str(), h.cost)).collect();
        all.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
        all.into_iter().map(|(n, _)| n).collect()
    } else {
        spec.uplinks
            .iter()
            .filter(|n| links.contains_key(n.as_str()))
            .map(String::as_str)
            .collect()
    }
}

fn evaluate_class(
    state: &mut ClassState,
    now: Instant,
    dwell: Duration,
    links: &BTreeMap<String, LinkHealth>,
) -> Option<Switch> {
    let order = ranked(&state.spec, links);
    // Track uninterrupted eligibility.
    let eligible: Vec<&str> = order
        .iter()
        .copied()
        .filter(|n| ineligible(&state.spec, true, links.get(*n)).is_none())
        .collect();
    state
        .eligible_since
        .retain(|n, _| eligible.contains(&n.as_str()));
    for n in &eligible {
        state.eligible_since.entry((*n).to_string()).or_insert(now);
    }
    let stable = |n: &str| {
        state
            .eligible_since
            .get(n)
            .is_some_and(|since| now.saturating_duration_since(*since) >= dwell)
    };

    let current = state.selection.as_ref().and_then(|s| s.uplink.clone());
    let (to, reason) = match &current {
        Some(cur) => {
            let allowed = order.contains(&cur.as_str());
            match ineligible(&state.spec, allowed, links.get(cur)) {
                None => {
                    // Current is fine; move only to a better-ranked, stable link.
                    let cur_rank = order.iter().position(|n| n == cur).unwrap_or(usize::MAX);
                    let better = eligible
                        .iter()
                        .copied()
                        .filter(|n| {
                            order.iter().position(|o| o == n).unwrap_or(usize::MAX) < cur_rank
                        })
                        .find(|n| stable(n))?;
                    (Some(better.to_string()), Reason::PreferredStable)
                }
                Some(why) => {
                    let next = eligible
                        .iter()
                        .copied()
                        .find(|n| stable(n))
                        .or(eligible.first().copied());
                    (next.map(str::to_string), why)
                }
            }
        }
        None => {
            let next = eligible
                .iter()
                .copied()
                .find(|n| stable(n))
                .or(eligible.first().copied());
            match &state.selection {
                // Nothing was ever selected: the first evaluation is a selection even
                // when no link is eligible (readiness depends on it).
                None => (next.map(str::to_string), Reason::Initial),
                Some(_) => (Some(next?.to_string()), Reason::Recovered),
            }
        }
    };
    if state.selection.is_some() && to == current {
        return None;
    }
    let switches = state.selection.as_ref().map_or(0, |s| s.switches + 1);
    state.selection = Some(Selection {
        uplink: to.clone(),
        reason,
        since: now,
        switches,
    });
    Some(Switch {
        class: state.spec.name.clone(),
        from: current,
        to,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DWELL: Duration = Duration::from_secs(5);

    fn class(name: &str, uplinks: &[&str]) -> ClassSpec {
        ClassSpec {
            name: name.into(),
            uplinks: uplinks.iter().map(|s| s.to_string()).collect(),
            max_rtt: None,
            max_loss_percent: None,
            deferrable: false,
        }
    }

    fn healthy(cost: u32) -> LinkHealth {
        LinkHealth {
            cost,
            carrier: true,
            reachable: true,
            rtt: Some(Duration::from_millis(20)),
            loss_percent: Some(0.0),
        }
    }

    /// wifi (cost 1), lte (cost 10), dsrc (cost 2), all healthy.
    fn links() -> BTreeMap<String, LinkHealth> {
        [("wifi", 1), ("lte", 10), ("dsrc", 2)]
            .into_iter()
            .map(|(n, c)| (n.to_string(), healthy(c)))
            .collect()
    }

    fn selector(classes: Vec<ClassSpec>) -> Selector {
        let mut s = Selector::new(DWELL);
        s.set_classes(classes);
        s
    }

    fn sel(s: &Selector, class: &str) -> Option<String> {
        s.selection(class).and_then(|x| x.uplink.clone())
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn first_evaluation_picks_the_most_preferred_link_without_waiting_for_dwell() {
        let mut s = selector(vec![
            class("critical", &["wifi", "lte"]),
            class("bulk", &["lte"]),
        ]);
        let t0 = Instant::now();
        let sw = s.evaluate(t0, &links());
        assert_eq!(sw.len(), 2);
        assert!(sw.iter().all(|x| x.reason == Reason::Initial));
        assert_eq!(sel(&s, "critical").as_deref(), Some("wifi"));
        assert_eq!(sel(&s, "bulk").as_deref(), Some("lte"));
        assert!(
            s.evaluate(ms(t0, 100), &links()).is_empty(),
            "no change, no switch"
        );
    }

    #[test]
    fn class_without_preferences_takes_the_cheapest_link() {
        let mut s = selector(vec![class("any", &[])]);
        s.evaluate(Instant::now(), &links());
        assert_eq!(sel(&s, "any").as_deref(), Some("wifi"));
        let mut l = links();
        l.get_mut("wifi").unwrap().carrier = false;
        s.evaluate(Instant::now(), &l);
        assert_eq!(
            sel(&s, "any").as_deref(),
            Some("dsrc"),
            "cost 2 beats cost 10"
        );
    }

    #[test]
    fn carrier_loss_switches_at_once_to_the_next_preferred_link() {
        let mut s = selector(vec![class("critical", &["wifi", "lte", "dsrc"])]);
        let t0 = Instant::now();
        s.evaluate(t0, &links());
        let mut l = links();
        l.get_mut("wifi").unwrap().carrier = false;
        let sw = s.evaluate(ms(t0, 10), &l);
        assert_eq!(
            sw,
            vec![Switch {
                class: "critical".into(),
                from: Some("wifi".into()),
                to: Some("lte".into()),
                reason: Reason::CarrierLost
            }]
        );
    }

    #[test]
    fn blackhole_and_quality_limits_make_a_link_ineligible_with_the_right_reason() {
        let mut c = class("critical", &["wifi", "lte", "dsrc"]);
        c.max_rtt = Some(Duration::from_millis(100));
        c.max_loss_percent = Some(10);
        let t0 = Instant::now();
        for (tweak, reason) in [
            (
                Box::new(|h: &mut LinkHealth| h.reachable = false) as Box<dyn Fn(&mut LinkHealth)>,
                Reason::Blackhole,
            ),
            (
                Box::new(|h: &mut LinkHealth| h.rtt = Some(Duration::from_millis(150))),
                Reason::RttExceeded,
            ),
            (
                Box::new(|h: &mut LinkHealth| h.loss_percent = Some(25.0)),
                Reason::LossExceeded,
            ),
        ] {
            let mut s = selector(vec![c.clone()]);
            s.evaluate(t0, &links());
            let mut l = links();
            tweak(l.get_mut("wifi").unwrap());
            let sw = s.evaluate(ms(t0, 10), &l);
            assert_eq!(sw.len(), 1);
            assert_eq!(sw[0].reason, reason);
            assert_eq!(sw[0].to.as_deref(), Some("lte"));
        }
    }

    #[test]
    fn unmeasured_rtt_does_not_make_a_link_ineligible() {
        let mut c = class("critical", &["wifi"]);
        c.max_rtt = Some(Duration::from_millis(1));
        let mut s = selector(vec![c]);
        let mut l = links();
        l.get_mut("wifi").unwrap().rtt = None;
        s.evaluate(Instant::now(), &l);
        assert_eq!(sel(&s, "critical").as_deref(), Some("wifi"));
    }

    #[test]
    fn returning_to_a_better_link_waits_for_the_dwell_time() {
        let mut s = selector(vec![class("critical", &["wifi", "lte"])]);
        let t0 = Instant::now();
        s.evaluate(t0, &links());
        let mut down = links();
        down.get_mut("wifi").unwrap().carrier = false;
        s.evaluate(ms(t0, 100), &down);
        assert_eq!(sel(&s, "critical").as_deref(), Some("lte"));
        // wifi back at t=1s: not yet.
        for t in [1_000, 2_000, 5_999] {
            assert!(s.evaluate(ms(t0, t), &links()).is_empty(), "t={t}");
        }
        let sw = s.evaluate(ms(t0, 6_000), &links());
        assert_eq!(sw.len(), 1);
        assert_eq!(sw[0].reason, Reason::PreferredStable);
        assert_eq!(sw[0].to.as_deref(), Some("wifi"));
    }

    #[test]
    fn a_flapping_link_causes_one_switch_not_one_per_flap() {
        let mut s = selector(vec![class("critical", &["wifi", "lte"])]);
        let t0 = Instant::now();
        s.evaluate(t0, &links());
        let mut down = links();
        down.get_mut("wifi").unwrap().carrier = false;
        let mut total = 0;
        // Flap every 150 ms for 20 s.
        for i in 1..=133u64 {
            let l = if i % 2 == 1 { down.clone() } else { links() };
            total += s.evaluate(ms(t0, i * 150), &l).len();
        }
        assert_eq!(total, 1, "only the first carrier loss switches");
        assert_eq!(sel(&s, "critical").as_deref(), Some("lte"));
        assert_eq!(s.selection("critical").unwrap().switches, 1);
    }

    #[test]
    fn failover_prefers_a_stable_link_over_a_better_ranked_one_that_just_came_up() {
        let mut s = selector(vec![class("critical", &["wifi", "lte", "dsrc"])]);
        let t0 = Instant::now();
        s.evaluate(t0, &links());
        let mut l = links();
        l.get_mut("wifi").unwrap().carrier = false;
        s.evaluate(ms(t0, 100), &l); // → lte
        // Long after: wifi just returned, lte dies; dsrc has been stable all along.
        l.get_mut("wifi").unwrap().carrier = true;
        s.evaluate(ms(t0, 20_000), &l);
        l.get_mut("lte").unwrap().carrier = false;
        let sw = s.evaluate(ms(t0, 20_100), &l);
        assert_eq!(sw[0].to.as_deref(), Some("dsrc"));
        // ...and if nothing is stable, the best eligible one still beats none.
        let mut s = selector(vec![class("critical", &["wifi", "lte"])]);
        s.evaluate(t0, &links());
        let mut l = links();
        l.get_mut("wifi").unwrap().carrier = false;
        assert_eq!(s.evaluate(ms(t0, 1), &l)[0].to.as_deref(), Some("lte"));
    }

    #[test]
    fn no_eligible_link_selects_none_and_recovers_when_one_returns() {
        let mut s = selector(vec![class("critical", &["wifi"])]);
        let t0 = Instant::now();
        s.evaluate(t0, &links());
        let mut l = links();
        l.get_mut("wifi").unwrap().reachable = false;
        let sw = s.evaluate(ms(t0, 10), &l);
        assert_eq!((sw[0].to.clone(), sw[0].reason), (None, Reason::Blackhole));
        let sw = s.evaluate(ms(t0, 20), &links());
        assert_eq!(
            (sw[0].to.as_deref(), sw[0].reason),
            (Some("wifi"), Reason::Recovered)
        );
    }

    #[test]
    fn first_evaluation_with_no_eligible_link_still_counts_as_a_selection() {
        let mut s = selector(vec![class("critical", &["wifi"])]);
        let mut l = links();
        l.get_mut("wifi").unwrap().carrier = false;
        let sw = s.evaluate(Instant::now(), &l);
        assert_eq!((sw[0].to.clone(), sw[0].reason), (None, Reason::Initial));
        assert!(s.selection("critical").is_some());
    }

    #[test]
    fn a_policy_change_that_disallows_the_current_link_moves_the_class() {
        let mut s = selector(vec![class("critical", &["wifi", "lte"])]);
        let t0 = Instant::now();
        s.evaluate(t0, &links());
        s.set_classes(vec![class("critical", &["lte", "dsrc"])]);
        let sw = s.evaluate(ms(t0, 1), &links());
        assert_eq!(
            (sw[0].to.as_deref(), sw[0].reason),
            (Some("lte"), Reason::NotAllowed)
        );
    }

    #[test]
    fn unknown_uplinks_in_a_class_are_ignored() {
        let mut s = selector(vec![class("critical", &["satellite", "lte"])]);
        s.evaluate(Instant::now(), &links());
        assert_eq!(sel(&s, "critical").as_deref(), Some("lte"));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the links do, after each evaluation the selection is an eligible
            /// link, or none exactly when no link is eligible.
            #[test]
            fn selection_is_never_an_ineligible_link(
                steps in proptest::collection::vec((0usize..3, any::<bool>(), any::<bool>(), 1u64..2_000), 1..200)
            ) {
                let names = ["wifi", "lte", "dsrc"];
                let mut s = selector(vec![class("c", &names)]);
                let mut l = links();
                let t0 = Instant::now();
                let mut t = 0;
                for (i, carrier, reachable, dt) in steps {
                    t += dt;
                    let h = l.get_mut(names[i]).unwrap();
                    h.carrier = carrier;
                    h.reachable = reachable;
                    s.evaluate(ms(t0, t), &l);
                    let any_eligible = l.values().any(|h| h.carrier && h.reachable);
                    match sel(&s, "c") {
                        Some(cur) => {
                            let h = &l[&cur];
                            prop_assert!(h.carrier && h.reachable);
                        }
                        None => prop_assert!(!any_eligible),
                    }
                }
            }

            /// Switches are bounded by link events: with a dwell longer than the test,
            /// every switch is a failover caused by the current link failing.
            #[test]
            fn without_dwell_expiry_every_switch_is_a_failover(
                steps in proptest::collection::vec((0usize..3, any::<bool>()), 1..200)
            ) {
                let names = ["wifi", "lte", "dsrc"];
                let mut s = selector(vec![class("c", &names)]);
                let mut l = links();
                let t0 = Instant::now();
                s.evaluate(t0, &l);
                for (k, (i, carrier)) in steps.into_iter().enumerate() {
                    l.get_mut(names[i]).unwrap().carrier = carrier;
                    for sw in s.evaluate(ms(t0, k as u64 + 1), &l) {
                        prop_assert_ne!(sw.reason, Reason::PreferredStable);
                    }
                }
            }
        }
    }
}
