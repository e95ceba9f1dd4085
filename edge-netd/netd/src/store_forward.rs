//! Store-and-forward inside edge-netd: the [`UplinkView`] the forwarder asks before it
//! sends a class's messages, backed by the engine's published selection, and the queue
//! part of the fleet report.
//!
//! Invariants:
//! - `usable(class)` is the engine's current selection for `class` and only while that
//!   link is up and reachable (carrier and probes answered); the choice carries the
//!   link's interface, so the forwarder binds its connection to it (`SO_BINDTODEVICE`).
//!   The selector only ever picks uplinks the class allows, so neither does the
//!   forwarder.
//! - `changed()` is bumped when what `usable` would answer for some class changed, not on
//!   every new view: views change with every probe's RTT, and each bump ends the
//!   forwarder's backoff waits, so bumping on measurement drift would turn backoff into
//!   a 100 ms retry loop.

use crate::engine::EngineView;
use misaki_proto::fleet_v1 as pb;
use misaki_saf::{StoreForward, UplinkChoice, UplinkView};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// What the forwarder may use for `class` in `snap`.
pub fn usable_in(snap: &EngineView, class: &str) -> Option<UplinkChoice> {
    let name = snap.selection(class)?.uplink.as_deref()?;
    let link = snap.link(name)?;
    if !(link.exists && link.up && link.carrier && link.reachable) {
        return None;
    }
    Some(UplinkChoice {
        name: link.name.clone(),
        interface: Some(link.interface.clone()),
        kind: link.kind,
        metered: link.metered,
        bandwidth_bytes_per_sec: None,
    })
}

fn usable_all(snap: &EngineView) -> BTreeMap<String, Option<UplinkChoice>> {
    snap.selections
        .iter()
        .map(|s| (s.class.clone(), usable_in(snap, &s.class)))
        .collect()
}

/// The engine's selection as an [`UplinkView`].
#[derive(Debug)]
pub struct SelectionUplinks {
    views: watch::Receiver<Arc<EngineView>>,
    changed: watch::Sender<u64>,
}

impl SelectionUplinks {
    /// Follow `views` (spawns a task on the current runtime that ends with the
    /// engine's sender).
    pub fn new(views: watch::Receiver<Arc<EngineView>>) -> Arc<Self> {
        let this = Arc::new(SelectionUplinks {
            views: views.clone(),
            changed: watch::Sender::new(0),
        });
        let tx = this.changed.clone();
        let mut rx = views;
        tokio::spawn(async move {
            let mut last = usable_all(&rx.borrow_and_update());
            while rx.changed().await.is_ok() {
                let now = usable_all(&rx.borrow_and_update());
                if now != last {
                    last = now;
                    tx.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
        });
        this
    }
}

impl UplinkView for SelectionUplinks {
    fn usable(&self, class: &str) -> Option<UplinkChoice> {
        usable_in(&self.views.borrow(), class)
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The queue part of a report: one entry per class queued now, and a zero entry for each
/// class in `previous` that is no longer queued (a `LinkChange` replaces per class, so a
/// drained class must be reported as empty, not left out). `dropped_total` counts every
/// drop of the class (expired, evicted, dead-lettered); `expired_total` the expiries.
pub fn queue_stats(saf: &StoreForward, previous: &[pb::QueueStats]) -> Vec<pb::QueueStats> {
    let mut out: BTreeMap<String, pb::QueueStats> = BTreeMap::new();
    for p in previous {
        out.insert(
            p.class.clone(),
            pb::QueueStats {
                class: p.class.clone(),
                dropped_total: saf.dead_lettered_of(&p.class),
                ..Default::default()
            },
        );
    }
    for c in saf.class_report() {
        out.insert(
            c.class.clone(),
            pb::QueueStats {
                class: c.class,
                depth_messages: c.messages,
                depth_bytes: c.bytes,
                dropped_total: c.expired + c.evicted + c.dead_lettered,
                expired_total: c.expired,
            },
        );
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{LinkView, SelectionView};
    use misaki_policy as mp;
    use std::time::Duration;

    fn link(name: &str, reachable: bool) -> LinkView {
        LinkView {
            name: name.into(),
            interface: format!("{name}0"),
            kind: mp::UplinkKind::Lte,
            exists: true,
            up: true,
            carrier: reachable,
            reachable,
            rtt: Some(Duration::from_millis(5)),
            jitter: Duration::ZERO,
            loss_percent: 0.0,
            samples: 10,
            consecutive_lost: 0,
            metered: true,
            cost: 5,
        }
    }

    fn sel(class: &str, uplink: Option<&str>) -> SelectionView {
        SelectionView {
            class: class.into(),
            uplink: uplink.map(str::to_string),
            reason: "initial",
            since_unix_ms: 0,
            switches: 0,
        }
    }

    #[test]
    fn usable_is_the_selection_while_its_link_is_up_and_reachable() {
        let mut snap = EngineView {
            ready: true,
            policy_version: "v".into(),
            links: vec![link("lte", true), link("wifi", false)],
            selections: vec![sel("bulk", None), sel("critical", Some("lte"))],
            policy_resync: None,
            power: Default::default(),
        };
        let c = usable_in(&snap, "critical").unwrap();
        assert_eq!(c.name, "lte");
        assert_eq!(c.interface.as_deref(), Some("lte0"));
        assert_eq!(c.kind, mp::UplinkKind::Lte);
        assert!(c.metered);
        assert_eq!(usable_in(&snap, "bulk"), None, "no selection");
        assert_eq!(usable_in(&snap, "nope"), None, "unknown class");
        snap.selections[1].uplink = Some("wifi".into());
        assert_eq!(
            usable_in(&snap, "critical"),
            None,
            "selected but unreachable"
        );
    }

    #[tokio::test]
    async fn changed_bumps_on_usable_changes_only() {
        let snap = EngineView {
            ready: true,
            policy_version: "v".into(),
            links: vec![link("lte", true)],
            selections: vec![sel("critical", Some("lte"))],
            policy_resync: None,
            power: Default::default(),
        };
        let (tx, rx) = watch::channel(Arc::new(snap.clone()));
        let view = SelectionUplinks::new(rx);
        let mut changed = view.changed();
        tokio::task::yield_now().await;
        // RTT drift only: no bump.
        let mut drift = snap.clone();
        drift.links[0].rtt = Some(Duration::from_millis(9));
        tx.send_replace(Arc::new(drift.clone()));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), changed.changed())
                .await
                .is_err()
        );
        // The link became unreachable: bump.
        let mut down = drift;
        down.links[0].reachable = false;
        tx.send_replace(Arc::new(down));
        tokio::time::timeout(Duration::from_secs(1), changed.changed())
            .await
            .expect("bumped")
            .unwrap();
        assert_eq!(view.usable("critical"), None);
    }
}
