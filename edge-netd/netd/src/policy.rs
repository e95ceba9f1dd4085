//! The vehicle's view of the mesh policy (traffic classes and uplink costs) and its
//! on-disk copy, so a rebooted vehicle selects uplinks without the cloud.
//!
//! Invariants:
//! - A [`VehiclePolicy`] is valid: unique, non-empty class names; loss limits ≤ 100.
//!   It is only built from the wire through `TryFrom<pb::PolicyUpdate>`.
//! - There is always a class `default`: all of this vehicle's uplinks in config
//!   order, unless the policy defines its own `default`. The reporter's own
//!   connection follows it, and it is the whole policy before any was received.
//! - The stored file is replaced atomically (temp file, fsync, rename, fsync dir):
//!   after a crash it holds either the old or the new policy, never a torn one.
//!
//! On-disk format: `<state_dir>/policy.pb`, the `misaki.fleet.v1.PolicyUpdate`
//! protobuf encoding, exactly as received.

use crate::config::UplinkConfig;
use misaki_proto::fleet_v1 as pb;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the always-present class.
pub const DEFAULT_CLASS: &str = "default";
const POLICY_FILE: &str = "policy.pb";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("classes[{0}].name is empty")]
    EmptyClassName(usize),
    #[error("classes[{index}].name {name:?} is used twice")]
    DuplicateClass { index: usize, name: String },
    #[error("classes[{index}] ({name}): max_loss_percent {value} is over 100")]
    LossOver100 {
        index: usize,
        name: String,
        value: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PolicyUpdate: {source}")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: PolicyError },
}

/// One traffic class, as the selector needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    pub name: String,
    /// Allowed uplinks, most preferred first. Empty: any uplink, cheapest first.
    pub uplinks: Vec<String>,
    pub max_rtt: Option<Duration>,
    pub max_loss_percent: Option<u8>,
    pub deferrable: bool,
}

/// The policy as the vehicle applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct VehiclePolicy {
    /// `""` before any policy was received.
    pub version: String,
    pub classes: Vec<ClassSpec>,
    /// Cost per uplink name from the policy (overrides the config's cost).
    pub costs: Vec<(String, u32)>,
    /// The wire form, kept to persist it unchanged.
    pub wire: Option<pb::PolicyUpdate>,
}

impl TryFrom<pb::PolicyUpdate> for VehiclePolicy {
    type Error = PolicyError;

    fn try_from(p: pb::PolicyUpdate) -> Result<Self, PolicyError> {
        let mut classes: Vec<ClassSpec> = Vec::with_capacity(p.classes.len());
        for (index, c) in p.classes.iter().enumerate() {
            if c.name.is_empty() {
                return Err(PolicyError::EmptyClassName(index));
            }
            if classes.iter().any(|x| x.name == c.name) {
                return Err(PolicyError::DuplicateClass {
                    index,
                    name: c.name.clone(),
                });
            }
            let max_loss_percent = match c.max_loss_percent {
                None => None,
                Some(v @ 0..=100) => Some(v as u8),
                Some(value) => {
                    return Err(PolicyError::LossOver100 {
                        index,
                        name: c.name.clone(),
                        value,
                    });
                }
            };
            classes.push(ClassSpec {
                name: c.name.clone(),
                uplinks: c.uplinks.clone(),
                max_rtt: c.max_rtt_ms.map(|ms| Duration::from_millis(u64::from(ms))),
                max_loss_percent,
                deferrable: c.deferrable,
            });
        }
        Ok(VehiclePolicy {
            version: p.version.clone(),
            classes,
            costs: p.uplinks.iter().map(|u| (u.name.clone(), u.cost)).collect(),
            wire: Some(p),
        })
    }
}

impl VehiclePolicy {
    /// The policy before anything was received: only the `default` class.
    pub fn empty() -> Self {
        VehiclePolicy {
            version: String::new(),
            classes: Vec::new(),
            costs: Vec::new(),
            wire: None,
        }
    }

    /// Classes to select for: the policy's, plus `default` (all configured uplinks
    /// in config order) unless the policy has its own.
    pub fn classes_with_default(&self, uplinks: &[UplinkConfig]) -> Vec<ClassSpec> {
        let mut classes = self.classes.clone();
        if !classes.iter().any(|c| c.name == DEFAULT_CLASS) {
            classes.push(ClassSpec {
                name: DEFAULT_CLASS.into(),
                uplinks: uplinks.iter().map(|u| u.name.clone()).collect(),
                max_rtt: None,
                max_loss_percent: None,
                deferrable: false,
            });
        }
        classes
    }

    /// Cost of an uplink: the policy's if it names it, else the config's.
    pub fn cost(&self, uplink: &UplinkConfig) -> u32 {
        self.costs
            .iter()
            .find(|(n, _)| *n == uplink.name)
            .map(|(_, c)| *c)
            .unwrap_or(uplink.cost)
    }
}

/// Load the stored policy; `Ok(None)` when there is none yet.
pub fn load(state_dir: &Path) -> Result<Option<VehiclePolicy>, StoreError> {
    let path = state_dir.join(POLICY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    let wire = pb::PolicyUpdate::decode(bytes.as_slice()).map_err(|source| StoreError::Decode {
        path: path.clone(),
        source,
    })?;
    VehiclePolicy::try_from(wire)
        .map(Some)
        .map_err(|source| StoreError::Invalid { path, source })
}

/// Store `wire` atomically as the policy to load at next boot.
pub fn store(state_dir: &Path, wire: &pb::PolicyUpdate) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let path = state_dir.join(POLICY_FILE);
    let tmp = state_dir.join(format!(".{POLICY_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&wire.encode_to_vec()).map_err(io(&tmp))?;
        // Data must be on disk before the rename makes it visible.
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The rename itself is durable only once the directory is synced.
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(state_dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn wire(version: &str) -> pb::PolicyUpdate {
        pb::PolicyUpdate {
            version: version.into(),
            uplinks: vec![pb::Uplink {
                name: "lte".into(),
                kind: 1,
                metered: true,
                cost: 9,
            }],
            classes: vec![pb::TrafficClass {
                name: "critical".into(),
                uplinks: vec!["wifi".into(), "lte".into()],
                max_rtt_ms: Some(150),
                max_loss_percent: Some(10),
                ..Default::default()
            }],
        }
    }

    fn uplink(name: &str, cost: u32) -> UplinkConfig {
        UplinkConfig {
            name: name.into(),
            interface: format!("{name}0"),
            kind: crate::config::UplinkKind::Wifi,
            metered: false,
            cost,
            probe_targets: vec![],
        }
    }

    #[test]
    fn wire_policy_converts_and_gains_a_default_class() {
        let p = VehiclePolicy::try_from(wire("v1")).unwrap();
        assert_eq!(p.classes[0].max_rtt, Some(Duration::from_millis(150)));
        let ups = [uplink("wifi", 1), uplink("lte", 2)];
        let classes = p.classes_with_default(&ups);
        assert_eq!(classes.len(), 2);
        assert_eq!(classes[1].name, DEFAULT_CLASS);
        assert_eq!(classes[1].uplinks, vec!["wifi", "lte"]);
        assert_eq!(p.cost(&ups[1]), 9, "policy cost overrides config");
        assert_eq!(p.cost(&ups[0]), 1);
    }

    #[test]
    fn invalid_wire_policies_are_rejected() {
        let mut w = wire("v");
        w.classes.push(w.classes[0].clone());
        assert!(matches!(
            VehiclePolicy::try_from(w),
            Err(PolicyError::DuplicateClass { index: 1, .. })
        ));
        let mut w = wire("v");
        w.classes[0].max_loss_percent = Some(101);
        assert!(matches!(
            VehiclePolicy::try_from(w),
            Err(PolicyError::LossOver100 { .. })
        ));
    }

    #[test]
    fn stored_policy_survives_a_restart_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        store(dir.path(), &wire("v1")).unwrap();
        store(dir.path(), &wire("v2")).unwrap();
        let p = load(dir.path()).unwrap().unwrap();
        assert_eq!(p.version, "v2");
        assert!(!dir.path().join(".policy.pb.tmp").exists());
    }

    #[test]
    fn a_corrupt_stored_policy_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(POLICY_FILE), b"\xff\xff\xff").unwrap();
        assert!(matches!(load(dir.path()), Err(StoreError::Decode { .. })));
    }
}
