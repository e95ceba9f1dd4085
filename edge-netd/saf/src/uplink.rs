//! What the forwarder needs to know about uplinks: which one (if any) a class may use
//! right now. The daemon's uplink selector implements [`UplinkView`]; [`StaticUplinks`]
//! is a hand-driven implementation for tests, benchmarks and the stand-in daemon.
//!
//! Invariant: the forwarder sends a message of class `c` only over the uplink
//! `usable(c)` returned at the moment it picked the message, bound to its interface.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
};

use misaki_policy::{Policy, UplinkKind};
use tokio::sync::watch;

/// The uplink a class may use now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UplinkChoice {
    /// Uplink name as in the policy (`wifi`, `lte`, ...).
    pub name: String,
    /// Network interface to bind to (`SO_BINDTODEVICE`); `None` = let routing decide
    /// (loopback tests, or a host with a single uplink).
    pub interface: Option<String>,
    #[serde(serialize_with = "kind_str")]
    pub kind: UplinkKind,
    /// Billed by volume: compress harder.
    pub metered: bool,
    /// Estimated bandwidth in bytes/s, if measured.
    pub bandwidth_bytes_per_sec: Option<u64>,
}

fn kind_str<S: serde::Serializer>(k: &UplinkKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

/// The daemon's current uplink selection, as the forwarder sees it.
pub trait UplinkView: Send + Sync {
    /// The uplink class `class` may use right now: allowed by the class's policy and up.
    /// `None` holds the class's messages in the queue.
    fn usable(&self, class: &str) -> Option<UplinkChoice>;
    /// Bumped on every change of the selection, so the forwarder wakes at once when an
    /// uplink comes back instead of polling.
    fn changed(&self) -> watch::Receiver<u64>;
}

/// zstd level for a body about to leave over `uplink`.
///
/// | uplink                  | level | why                                            |
/// |-------------------------|-------|------------------------------------------------|
/// | wifi, dsrc              | 3     | fast and free: CPU is the bottleneck           |
/// | 5g                      | 6     | fast but usually metered                       |
/// | lte                     | 9     | metered, a few Mbit/s: bytes cost more than CPU |
/// | 3g                      | 12    | slow and metered                               |
/// | lpwa                    | 15    | tens of kbit/s: every byte counts              |
///
/// Adjustments: a metered uplink gets at least 9; a measured bandwidth under 256 KiB/s
/// (~2 Mbit/s) at least 12. Levels above 15 cost ~10x the CPU of 12 for a few percent, too
/// much for a vehicle computer.
pub fn zstd_level(uplink: &UplinkChoice) -> i32 {
    let mut level = match uplink.kind {
        UplinkKind::Wifi | UplinkKind::Dsrc => 3,
        UplinkKind::FiveG => 6,
        UplinkKind::Lte => 9,
        UplinkKind::ThreeG => 12,
        UplinkKind::Lpwa => 15,
    };
    if uplink.metered {
        level = level.max(9);
    }
    if uplink
        .bandwidth_bytes_per_sec
        .is_some_and(|b| b < 256 << 10)
    {
        level = level.max(12);
    }
    level
}

/// An [`UplinkView`] driven by hand: each class may use the first of its policy uplinks
/// that is marked up. For tests, benchmarks and the stand-in daemon; edge-netd feeds its
/// real selector instead.
#[derive(Debug)]
pub struct StaticUplinks {
    inner: Mutex<StaticInner>,
    tx: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct StaticInner {
    /// Class → uplink names, most preferred first.
    classes: BTreeMap<String, Vec<String>>,
    uplinks: BTreeMap<String, UplinkChoice>,
    up: BTreeSet<String>,
}

impl StaticUplinks {
    /// Every uplink of the policy, down, without interface binding; classes as in the policy.
    pub fn from_policy(policy: &Policy) -> Arc<Self> {
        let classes = policy
            .classes
            .values()
            .map(|c| (c.name.clone(), c.uplinks.clone()))
            .collect();
        let uplinks = policy
            .uplinks
            .values()
            .map(|u| {
                let choice = UplinkChoice {
                    name: u.name.clone(),
                    interface: None,
                    kind: u.kind,
                    metered: u.metered,
                    bandwidth_bytes_per_sec: None,
                };
                (u.name.clone(), choice)
            })
            .collect();
        Arc::new(Self {
            inner: Mutex::new(StaticInner {
                classes,
                uplinks,
                up: BTreeSet::new(),
            }),
            tx: watch::channel(0).0,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut StaticInner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Mark an uplink up or down; returns false if the policy has no such uplink.
    pub fn set_up(&self, name: &str, up: bool) -> bool {
        let known = self.with(|i| {
            if !i.uplinks.contains_key(name) {
                return false;
            }
            if up {
                i.up.insert(name.to_string());
            } else {
                i.up.remove(name);
            }
            true
        });
        if known {
            self.tx.send_modify(|v| *v += 1);
        }
        known
    }

    /// Bind an uplink to a network interface (`SO_BINDTODEVICE`).
    pub fn set_interface(&self, name: &str, interface: Option<String>) {
        self.with(|i| {
            if let Some(u) = i.uplinks.get_mut(name) {
                u.interface = interface;
            }
        });
        self.tx.send_modify(|v| *v += 1);
    }

    /// Every uplink up.
    pub fn set_all_up(&self) {
        self.with(|i| i.up = i.uplinks.keys().cloned().collect());
        self.tx.send_modify(|v| *v += 1);
    }
}

impl UplinkView for StaticUplinks {
    fn usable(&self, class: &str) -> Option<UplinkChoice> {
        self.with(|i| {
            i.classes
                .get(class)?
                .iter()
                .find(|u| i.up.contains(*u))
                .and_then(|u| i.uplinks.get(u).cloned())
        })
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(kind: UplinkKind, metered: bool, bw: Option<u64>) -> UplinkChoice {
        UplinkChoice {
            name: "x".into(),
            interface: None,
            kind,
            metered,
            bandwidth_bytes_per_sec: bw,
        }
    }

    #[test]
    fn zstd_level_is_stronger_on_slow_and_metered_uplinks() {
        assert_eq!(zstd_level(&choice(UplinkKind::Wifi, false, None)), 3);
        assert_eq!(zstd_level(&choice(UplinkKind::Lte, true, None)), 9);
        assert_eq!(zstd_level(&choice(UplinkKind::ThreeG, true, None)), 12);
        assert_eq!(zstd_level(&choice(UplinkKind::Lpwa, true, None)), 15);
        assert_eq!(zstd_level(&choice(UplinkKind::Wifi, true, None)), 9);
        assert_eq!(
            zstd_level(&choice(UplinkKind::Wifi, false, Some(100_000))),
            12
        );
    }
}
