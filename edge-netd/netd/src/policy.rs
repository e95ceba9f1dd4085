//! The vehicle's view of the mesh policy (traffic classes, uplink costs, services) and
//! its on-disk copy, so a rebooted vehicle selects uplinks, serves its Envoy and accepts
//! deferred traffic without the cloud.
//!
//! Invariants:
//! - A [`VehiclePolicy`] is valid: it is only built from the wire through
//!   `TryFrom<pb::PolicyUpdate>`, which validates with the policy crate's own checks
//!   (`misaki_policy_wire::from_wire`), or from a policy file ([`load_factory`]).
//! - A delta update ([`VehiclePolicy::updated`]) is applied at the wire level to the
//!   held policy's wire form, only if its base is the held version and the result's
//!   content version is the update's; the whole update it gives then goes through the
//!   same `TryFrom` as a received whole one, and is what gets stored.
//!   [`VehiclePolicy::mesh`] is that validated `misaki_policy::Policy`: the one the local
//!   xDS tier compiles from and store-and-forward reads.
//! - A stored policy from before services (or mesh ports) were sent still loads: it has
//!   no services (default ports), and store-and-forward answers 404 until the next update.
//! - There is always a class `default`: all of this vehicle's uplinks in config
//!   order, unless the policy defines its own `default`. The reporter's own
//!   connection follows it, and it is the whole policy before any was received.
//! - The stored file is replaced atomically (temp file, fsync, rename, fsync dir):
//!   after a crash it holds either the old or the new policy, never a torn one.
//!
//! On-disk format: `<state_dir>/policy.pb`, the `misaki.fleet.v1.PolicyUpdate`
//! protobuf encoding of the whole policy: as received, or as a received delta made it.

use crate::config::UplinkConfig;
use misaki_policy as mp;
use misaki_proto::fleet_v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Name of the always-present class.
pub const DEFAULT_CLASS: &str = "default";
const POLICY_FILE: &str = "policy.pb";

/// Why a received or shipped policy was rejected: every error, located in the policy
/// document (`policy update <version>` for a received one).
pub type PolicyError = mp::PolicyErrors;

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

/// Why a received update was not applied (the held policy stays).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A delta that does not fit the held policy.
    #[error("policy delta {version} not applied: {source}")]
    Delta {
        version: String,
        source: misaki_policy_wire::DeltaError,
    },
    /// The whole policy (received, or made by a delta) fails the policy checks.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
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
    /// The wire form, kept to persist it unchanged.
    pub wire: Option<pb::PolicyUpdate>,
    /// The same policy as the mesh's domain model: what the local xDS tier compiles
    /// and store-and-forward reads.
    pub mesh: Arc<mp::Policy>,
}

impl TryFrom<pb::PolicyUpdate> for VehiclePolicy {
    type Error = PolicyError;

    fn try_from(p: pb::PolicyUpdate) -> Result<Self, PolicyError> {
        let mesh = misaki_policy_wire::from_wire(&p)?;
        Ok(VehiclePolicy::of(mesh, p))
    }
}

impl VehiclePolicy {
    /// The vehicle's view of a validated policy whose wire form is `wire`.
    fn of(mesh: mp::Policy, wire: pb::PolicyUpdate) -> Self {
        let classes = mesh
            .classes
            .values()
            .map(|c| ClassSpec {
                name: c.name.clone(),
                uplinks: c.uplinks.clone(),
                max_rtt: c.max_rtt,
                max_loss_percent: c.max_loss_percent,
                deferrable: c.deferrable,
            })
            .collect();
        VehiclePolicy {
            version: wire.version.clone(),
            classes,
            wire: Some(wire),
            mesh: Arc::new(mesh),
        }
    }

    /// The policy `update` makes of this one: a whole update as it is, a delta applied
    /// to this policy's wire form first. Either way the whole update is validated by
    /// the same checks, and kept as the new policy's wire form.
    pub fn updated(&self, update: pb::PolicyUpdate) -> Result<VehiclePolicy, UpdateError> {
        let whole = if misaki_policy_wire::is_delta(&update) {
            // Nothing held: an empty, unversioned base, which no delta names.
            let none = pb::PolicyUpdate::default();
            let held = self.wire.as_ref().unwrap_or(&none);
            misaki_policy_wire::apply(held, &update).map_err(|source| UpdateError::Delta {
                version: update.version.clone(),
                source,
            })?
        } else {
            update
        };
        Ok(VehiclePolicy::try_from(whole)?)
    }

    /// The policy before anything was received: only the `default` class.
    pub fn empty() -> Self {
        VehiclePolicy {
            version: String::new(),
            classes: Vec::new(),
            wire: None,
            mesh: Arc::new(empty_mesh()),
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
        self.mesh
            .uplinks
            .get(&uplink.name)
            .map_or(uplink.cost, |u| u.cost)
    }
}

/// A mesh policy with nothing in it (before any policy was received).
pub fn empty_mesh() -> mp::Policy {
    mp::Policy {
        mesh: mp::MeshSettings::default(),
        uplinks: BTreeMap::new(),
        classes: BTreeMap::new(),
        services: BTreeMap::new(),
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

/// The policy shipped in the vehicle's image (`factory_policy:`), for a vehicle that
/// has never received one. Its version is the one misaki-cp gives the same policy.
pub fn load_factory(path: &Path) -> Result<VehiclePolicy, PolicyError> {
    let mesh = mp::load_path(path)?;
    let wire = misaki_policy_wire::to_wire(&mesh);
    Ok(VehiclePolicy::of(mesh, wire))
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
            uplinks: vec![
                pb::Uplink {
                    name: "lte".into(),
                    kind: 1,
                    metered: true,
                    cost: 9,
                },
                pb::Uplink {
                    name: "wifi".into(),
                    kind: pb::UplinkKind::Wifi as i32,
                    metered: false,
                    cost: 1,
                },
            ],
            classes: vec![
                pb::TrafficClass {
                    name: "critical".into(),
                    uplinks: vec!["wifi".into(), "lte".into()],
                    max_rtt_ms: Some(150),
                    max_loss_percent: Some(10),
                    priority: pb::RoutePriority::High as i32,
                    ..Default::default()
                },
                pb::TrafficClass {
                    name: "bulk".into(),
                    uplinks: vec!["wifi".into()],
                    deferrable: true,
                    ttl_ms: Some(3_600_000),
                    ..Default::default()
                },
            ],
            services: vec![pb::Service {
                name: "telemetry".into(),
                location: pb::Location::Cloud as i32,
                protocol: pb::Protocol::Http as i32,
                port: 8080,
                endpoints: vec![pb::Endpoint {
                    host: "198.18.0.1".into(),
                    port: 8080,
                }],
                routes: vec!["/telemetry".into()],
                class: "bulk".into(),
                consumes: None,
                ..Default::default()
            }],
            mesh: None,
            ..Default::default()
        }
    }

    fn uplink(name: &str, cost: u32) -> UplinkConfig {
        UplinkConfig {
            name: name.into(),
            interface: format!("{name}0"),
            kind: misaki_policy::UplinkKind::Wifi,
            metered: false,
            cost,
            probe_targets: vec![],
        }
    }

    #[test]
    fn wire_policy_converts_and_gains_a_default_class() {
        let p = VehiclePolicy::try_from(wire("v1")).unwrap();
        assert_eq!(p.classes[1].name, "critical");
        assert_eq!(p.classes[1].max_rtt, Some(Duration::from_millis(150)));
        let ups = [uplink("wifi", 1), uplink("lte", 2)];
        let classes = p.classes_with_default(&ups);
        assert_eq!(classes.len(), 3);
        assert_eq!(classes[2].name, DEFAULT_CLASS);
        assert_eq!(classes[2].uplinks, vec!["wifi", "lte"]);
        assert_eq!(p.cost(&ups[1]), 9, "policy cost overrides config");
        assert_eq!(p.cost(&ups[0]), 1);
    }

    #[test]
    fn the_mesh_policy_has_the_services_and_their_classes() {
        let p = VehiclePolicy::try_from(wire("v1")).unwrap();
        let m = &p.mesh;
        let svc = &m.services["telemetry"];
        assert_eq!(svc.routes, vec!["/telemetry"]);
        assert_eq!(svc.location, mp::Location::Cloud);
        let class = m.class_of(svc);
        assert!(class.deferrable);
        assert_eq!(class.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(m.classes["critical"].priority, mp::RoutePriority::High);
        assert_eq!(
            m.classes["critical"].max_rtt,
            Some(Duration::from_millis(150))
        );
        assert_eq!(m.uplinks["lte"].kind, mp::UplinkKind::Lte);
        assert!(m.uplinks["lte"].metered);
    }

    #[test]
    fn a_policy_without_services_still_converts() {
        let mut w = wire("old");
        w.services.clear();
        let p = VehiclePolicy::try_from(w).unwrap();
        assert!(p.mesh.services.is_empty());
        assert_eq!(p.mesh.classes.len(), 2);
    }

    #[test]
    fn invalid_policies_are_rejected_by_the_policy_checks() {
        let mut w = wire("v");
        w.services[0].class = "nope".into();
        let e = VehiclePolicy::try_from(w).unwrap_err().to_string();
        assert!(e.contains("policy update v"), "{e}");
        assert!(e.contains("unknown class `nope`"), "{e}");
        let mut w = wire("v");
        w.classes.push(w.classes[0].clone());
        let e = VehiclePolicy::try_from(w).unwrap_err().to_string();
        assert!(e.contains("duplicate class name"), "{e}");
    }

    #[test]
    fn a_factory_policy_file_loads_with_the_control_planes_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        let text = include_str!("../../../examples/quickstart/mesh.yaml");
        std::fs::write(&path, text).unwrap();
        let p = load_factory(&path).unwrap();
        let cp = mp::parse("x", text).unwrap();
        assert_eq!(p.version, misaki_policy_wire::version(&cp));
        assert_eq!(*p.mesh, cp);
        std::fs::write(&path, "version: 1\nuplinks: []\n").unwrap();
        let e = load_factory(&path).unwrap_err().to_string();
        assert!(e.contains("mesh.yaml"), "{e}");
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
    fn a_stored_policy_from_before_services_still_loads() {
        // Encoded by the old schema: fields 1-3 only.
        let dir = tempfile::tempdir().unwrap();
        let mut w = wire("old");
        w.services.clear();
        for c in &mut w.classes {
            c.priority = 0;
        }
        std::fs::write(dir.path().join(POLICY_FILE), w.encode_to_vec()).unwrap();
        let p = load(dir.path()).unwrap().unwrap();
        assert_eq!(p.version, "old");
        assert!(p.mesh.services.is_empty());
    }

    #[test]
    fn a_corrupt_stored_policy_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(POLICY_FILE), b"\xff\xff\xff").unwrap();
        assert!(matches!(load(dir.path()), Err(StoreError::Decode { .. })));
    }

    /// [`wire`] as misaki-cp would send it: its version is its content's.
    fn sent(edit: impl FnOnce(&mut pb::PolicyUpdate)) -> pb::PolicyUpdate {
        let mut w = wire("");
        edit(&mut w);
        misaki_policy_wire::to_wire(&misaki_policy_wire::from_wire(&w).unwrap())
    }

    fn route_edit(w: &mut pb::PolicyUpdate) {
        w.services[0].routes = vec!["/telemetry-v2".into()];
    }

    #[test]
    fn a_delta_applies_to_the_held_policy_and_yields_the_whole_one() {
        let (base, target) = (sent(|_| {}), sent(route_edit));
        let held = VehiclePolicy::try_from(base.clone()).unwrap();
        let delta = misaki_policy_wire::diff(&base, &target).unwrap();
        assert!(delta.uplinks.is_empty() && delta.classes.is_empty());
        let p = held.updated(delta).unwrap();
        assert_eq!(p.version, target.version);
        // The wire form kept (and stored) is the whole policy, not the delta.
        assert_eq!(p.wire.as_ref(), Some(&target));
        assert_eq!(p.mesh.services["telemetry"].routes, ["/telemetry-v2"]);
        // A whole update replaces whatever is held.
        let other = sent(|w| w.classes[0].dscp = 10);
        let q = p.updated(other.clone()).unwrap();
        assert_eq!(q.wire, Some(other));
        assert_eq!(q.mesh.classes["critical"].dscp, 10);
    }

    #[test]
    fn a_delta_against_another_base_or_with_a_wrong_result_is_rejected() {
        let (base, target) = (sent(|_| {}), sent(route_edit));
        let delta = misaki_policy_wire::diff(&base, &target).unwrap();
        let elsewhere = VehiclePolicy::try_from(sent(|w| w.uplinks[0].cost = 3)).unwrap();
        let base_mismatch = |r: Result<VehiclePolicy, UpdateError>| {
            matches!(
                r,
                Err(UpdateError::Delta {
                    source: misaki_policy_wire::DeltaError::BaseMismatch { .. },
                    ..
                })
            )
        };
        assert!(base_mismatch(elsewhere.updated(delta.clone())));
        assert!(base_mismatch(VehiclePolicy::empty().updated(delta.clone())));
        // The right base, but the result is not what the version promises.
        let mut wrong = delta;
        wrong.services[0].port = 9090;
        let held = VehiclePolicy::try_from(base).unwrap();
        let e = held.updated(wrong).unwrap_err();
        assert!(
            matches!(
                &e,
                UpdateError::Delta {
                    source: misaki_policy_wire::DeltaError::VersionMismatch { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&target.version), "{e}");
    }
}
