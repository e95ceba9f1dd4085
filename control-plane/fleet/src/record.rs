//! What the registry keeps of a vehicle: its own domain types, converted from the fleet
//! wire types once, at the boundary ([`From`]), and serialised with serde as the admin
//! routes show them (`/fleet`, `/fleet/{vehicle}`).
//!
//! Invariants:
//! - The JSON field names here are an interface (operators' scripts, the e2e tests):
//!   renaming a field is a breaking change.
//! - Wire enums are mapped here only (`kind`, [`Power`]); a value a newer vehicle
//!   sends that this build does not know reads `unspecified`, never an error.

use std::collections::BTreeMap;

use misaki_proto::fleet_v1 as pb;
use serde::{Deserialize, Serialize};

/// One uplink as the vehicle last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkRecord {
    pub name: String,
    pub interface: String,
    /// `lte`, `5g`, `3g`, `wifi`, `dsrc`, `lpwa` or `unspecified`.
    pub kind: &'static str,
    pub up: bool,
    pub carrier: bool,
    pub reachable: bool,
    pub rtt_us: Option<u32>,
    pub loss_permille: u32,
    pub jitter_us: u32,
    pub throughput_bps: u64,
    pub metered: bool,
    pub cost: u32,
}

impl From<&pb::Link> for LinkRecord {
    fn from(l: &pb::Link) -> Self {
        LinkRecord {
            name: l.name.clone(),
            interface: l.interface.clone(),
            kind: uplink_kind(l.kind),
            up: l.up,
            carrier: l.carrier,
            reachable: l.reachable,
            rtt_us: l.rtt_us,
            loss_permille: l.loss_permille,
            jitter_us: l.jitter_us,
            throughput_bps: l.throughput_bps,
            metered: l.metered,
            cost: l.cost,
        }
    }
}

/// The uplink chosen for one class; `uplink` is `None` when none is eligible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SelectionRecord {
    pub uplink: Option<String>,
    pub reason: String,
}

impl From<&pb::ClassSelection> for SelectionRecord {
    fn from(s: &pb::ClassSelection) -> Self {
        SelectionRecord {
            uplink: (!s.uplink.is_empty()).then(|| s.uplink.clone()),
            reason: s.reason.clone(),
        }
    }
}

/// One store-and-forward class queue's totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueRecord {
    pub depth_messages: u64,
    pub depth_bytes: u64,
    pub dropped_total: u64,
    pub expired_total: u64,
}

impl From<&pb::QueueStats> for QueueRecord {
    fn from(q: &pb::QueueStats) -> Self {
        QueueRecord {
            depth_messages: q.depth_messages,
            depth_bytes: q.depth_bytes,
            dropped_total: q.dropped_total,
            expired_total: q.expired_total,
        }
    }
}

/// A client of the vehicle's local xDS tier and where its config stands per type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SidecarRecord {
    pub node_id: String,
    pub kind: String,
    pub proxyless: bool,
    pub connected_since_unix_ms: u64,
    /// By xDS type (`cds`, `lds`, ...).
    pub types: BTreeMap<String, XdsTypeRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XdsTypeRecord {
    pub sent_version: Option<String>,
    pub acked_version: Option<String>,
    pub last_nack: Option<NackRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NackRecord {
    pub version: Option<String>,
    pub message: String,
    pub at_unix_ms: u64,
}

impl From<&pb::Sidecar> for SidecarRecord {
    fn from(s: &pb::Sidecar) -> Self {
        let types = s
            .types
            .iter()
            .map(|t| {
                let nack = t.last_nack.as_ref().map(|n| NackRecord {
                    version: n.version.clone(),
                    message: n.message.clone(),
                    at_unix_ms: n.at_unix_ms,
                });
                let record = XdsTypeRecord {
                    sent_version: t.sent_version.clone(),
                    acked_version: t.acked_version.clone(),
                    last_nack: nack,
                };
                (t.xds_type.clone(), record)
            })
            .collect();
        SidecarRecord {
            node_id: s.node_id.clone(),
            kind: s.kind.clone(),
            proxyless: s.proxyless,
            connected_since_unix_ms: s.connected_since_unix_ms,
            types,
        }
    }
}

/// What a vehicle reported and what its streams proved, as `/fleet/{vehicle}` shows it.
/// The registry adds the fields that depend on its clock (`last_seen_ms_ago`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VehicleState {
    /// The identity the newest stream's client certificate proved (None: plaintext).
    pub identity: Option<String>,
    pub online: bool,
    pub daemon_version: String,
    pub policy_version: String,
    pub last_observed_unix_ms: u64,
    pub power: Power,
    /// By uplink name; shown as a list sorted by name.
    #[serde(serialize_with = "values")]
    pub links: BTreeMap<String, LinkRecord>,
    pub selections: BTreeMap<String, SelectionRecord>,
    pub queues: BTreeMap<String, QueueRecord>,
    /// The clients of the vehicle's local xDS tier, as last reported (whole list).
    pub sidecars: Vec<SidecarRecord>,
    pub link_changes: u64,
}

fn values<S: serde::Serializer, V: Serialize>(
    map: &BTreeMap<String, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values())
}

fn uplink_kind(k: i32) -> &'static str {
    match pb::UplinkKind::try_from(k).unwrap_or(pb::UplinkKind::Unspecified) {
        pb::UplinkKind::Unspecified => "unspecified",
        pb::UplinkKind::Lte => "lte",
        pb::UplinkKind::FiveG => "5g",
        pb::UplinkKind::ThreeG => "3g",
        pb::UplinkKind::Wifi => "wifi",
        pb::UplinkKind::Dsrc => "dsrc",
        pb::UplinkKind::Lpwa => "lpwa",
    }
}

/// The vehicle's power state as it last reported it (read back from shared mode's
/// presence records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    On,
    Accessory,
    Low,
    ShuttingDown,
    /// Not reported (or a state this build does not know; last, for `serde(other)`).
    #[default]
    #[serde(other)]
    Unspecified,
}

impl Power {
    /// Whether services that move on low power (`on_low_power: cloud`) move now.
    pub fn is_low(self) -> bool {
        matches!(self, Power::Low | Power::ShuttingDown)
    }
}

impl From<pb::PowerState> for Power {
    fn from(p: pb::PowerState) -> Self {
        match p {
            pb::PowerState::Unspecified => Power::Unspecified,
            pb::PowerState::On => Power::On,
            pb::PowerState::Accessory => Power::Accessory,
            pb::PowerState::Low => Power::Low,
            pb::PowerState::ShuttingDown => Power::ShuttingDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_uplink_kind_reads_unspecified() {
        let l = pb::Link {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(LinkRecord::from(&l).kind, "unspecified");
    }

    #[test]
    fn an_empty_selection_is_no_uplink() {
        let s = pb::ClassSelection {
            class: "bulk".into(),
            uplink: String::new(),
            reason: "no eligible uplink".into(),
        };
        let json = serde_json::to_value(SelectionRecord::from(&s)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"uplink": null, "reason": "no eligible uplink"})
        );
    }
}
