//! The vehicle's view of the mesh policy (traffic classes, uplink costs, services) and
//! its on-disk copy, so a rebooted vehicle selects uplinks and accepts deferred traffic
//! without the cloud.
//!
//! Invariants:
//! - A [`VehiclePolicy`] is valid: unique, non-empty class, uplink and service names;
//!   loss limits ≤ 100, DSCP ≤ 63; every class's uplinks and every service's class are
//!   defined; ports in 1..=65535; routes start with `/` and are unique. It is only built
//!   from the wire through `TryFrom<pb::PolicyUpdate>`, which also builds
//!   [`VehiclePolicy::mesh`] (the `misaki_policy::Policy` store-and-forward reads), so
//!   that value keeps the policy crate's "always valid" promise.
//! - A stored policy from before services were sent (no `services`) still loads: it just
//!   has none, and store-and-forward answers 404 until the next update.
//! - There is always a class `default`: all of this vehicle's uplinks in config
//!   order, unless the policy defines its own `default`. The reporter's own
//!   connection follows it, and it is the whole policy before any was received.
//! - The stored file is replaced atomically (temp file, fsync, rename, fsync dir):
//!   after a crash it holds either the old or the new policy, never a torn one.
//!
//! On-disk format: `<state_dir>/policy.pb`, the `misaki.fleet.v1.PolicyUpdate`
//! protobuf encoding, exactly as received.

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
    #[error("classes[{index}] ({name}): dscp {value} is over 63")]
    DscpOver63 {
        index: usize,
        name: String,
        value: u32,
    },
    #[error("classes[{index}] ({name}): unknown priority {value}")]
    UnknownPriority {
        index: usize,
        name: String,
        value: i32,
    },
    #[error("classes[{index}] ({name}): uplink {uplink:?} is not in the policy's uplinks")]
    UnknownUplink {
        index: usize,
        name: String,
        uplink: String,
    },
    #[error("uplinks[{index}]: {message}")]
    BadUplink { index: usize, message: String },
    #[error("services[{index}] ({name}): {message}")]
    BadService {
        index: usize,
        name: String,
        message: String,
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
    /// The same policy as the mesh's domain model (uplinks, classes, services), for
    /// store-and-forward. The `mesh:` ports are not sent to vehicles and stay default.
    pub mesh: Arc<mp::Policy>,
}

fn uplink_kind(v: i32) -> Option<mp::UplinkKind> {
    Some(match pb::UplinkKind::try_from(v).ok()? {
        pb::UplinkKind::Unspecified => return None,
        pb::UplinkKind::Lte => mp::UplinkKind::Lte,
        pb::UplinkKind::FiveG => mp::UplinkKind::FiveG,
        pb::UplinkKind::ThreeG => mp::UplinkKind::ThreeG,
        pb::UplinkKind::Wifi => mp::UplinkKind::Wifi,
        pb::UplinkKind::Dsrc => mp::UplinkKind::Dsrc,
        pb::UplinkKind::Lpwa => mp::UplinkKind::Lpwa,
    })
}

/// The domain model of a wire policy; `classes` were checked by the caller.
fn mesh_policy(p: &pb::PolicyUpdate, classes: &[ClassSpec]) -> Result<mp::Policy, PolicyError> {
    let mut uplinks = BTreeMap::new();
    for (index, u) in p.uplinks.iter().enumerate() {
        let bad = |message: String| PolicyError::BadUplink { index, message };
        if u.name.is_empty() {
            return Err(bad("name is empty".into()));
        }
        let kind = uplink_kind(u.kind)
            .ok_or_else(|| bad(format!("{}: unknown kind {}", u.name, u.kind)))?;
        let up = mp::Uplink {
            name: u.name.clone(),
            kind,
            metered: u.metered,
            cost: u.cost,
        };
        if uplinks.insert(u.name.clone(), up).is_some() {
            return Err(bad(format!("name {:?} is used twice", u.name)));
        }
    }
    let mut mesh_classes = BTreeMap::new();
    for (index, (c, spec)) in p.classes.iter().zip(classes).enumerate() {
        if let Some(u) = c.uplinks.iter().find(|u| !uplinks.contains_key(*u)) {
            return Err(PolicyError::UnknownUplink {
                index,
                name: c.name.clone(),
                uplink: u.clone(),
            });
        }
        let dscp = u8::try_from(c.dscp)
            .ok()
            .filter(|d| *d <= 63)
            .ok_or_else(|| PolicyError::DscpOver63 {
                index,
                name: c.name.clone(),
                value: c.dscp,
            })?;
        let priority = match pb::RoutePriority::try_from(c.priority) {
            Ok(pb::RoutePriority::Default) => mp::RoutePriority::Default,
            Ok(pb::RoutePriority::High) => mp::RoutePriority::High,
            Err(_) => {
                return Err(PolicyError::UnknownPriority {
                    index,
                    name: c.name.clone(),
                    value: c.priority,
                });
            }
        };
        mesh_classes.insert(
            c.name.clone(),
            mp::TrafficClass {
                name: c.name.clone(),
                priority,
                timeout: c
                    .timeout_ms
                    .map_or(mp::DEFAULT_TIMEOUT, Duration::from_millis),
                retries: c.retries,
                uplinks: c.uplinks.clone(),
                deferrable: c.deferrable,
                dscp,
                max_rtt: spec.max_rtt,
                max_loss_percent: spec.max_loss_percent,
                ttl: c.ttl_ms.map(Duration::from_millis),
            },
        );
    }
    let mut services = BTreeMap::new();
    let mut routes: BTreeMap<&str, &str> = BTreeMap::new();
    for (index, s) in p.services.iter().enumerate() {
        let bad = |message: String| PolicyError::BadService {
            index,
            name: s.name.clone(),
            message,
        };
        if s.name.is_empty() {
            return Err(bad("name is empty".into()));
        }
        if services.contains_key(&s.name) {
            return Err(bad("name is used twice".into()));
        }
        if !mesh_classes.contains_key(&s.class) {
            return Err(bad(format!(
                "class {:?} is not in the policy's classes",
                s.class
            )));
        }
        let port = |field: &str, v: u32| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(format!("{field} {v} is not in 1..=65535")))
        };
        let location = match pb::Location::try_from(s.location) {
            Ok(pb::Location::Vehicle) => mp::Location::Vehicle,
            Ok(pb::Location::Edge) => mp::Location::Edge,
            Ok(pb::Location::Cloud) => mp::Location::Cloud,
            _ => return Err(bad(format!("unknown location {}", s.location))),
        };
        let protocol = match pb::Protocol::try_from(s.protocol) {
            Ok(pb::Protocol::Http) => mp::Protocol::Http,
            Ok(pb::Protocol::Grpc) => mp::Protocol::Grpc,
            _ => return Err(bad(format!("unknown protocol {}", s.protocol))),
        };
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for (j, e) in s.endpoints.iter().enumerate() {
            if e.host.is_empty() {
                return Err(bad(format!("endpoints[{j}].host is empty")));
            }
            endpoints.push(mp::Endpoint {
                host: e.host.clone(),
                port: port(&format!("endpoints[{j}].port"), e.port)?,
            });
        }
        for r in &s.routes {
            if !r.starts_with('/') {
                return Err(bad(format!("route {r:?} does not start with '/'")));
            }
            if let Some(other) = routes.insert(r, &s.name) {
                return Err(bad(format!("route {r:?} is also service {other}'s")));
            }
        }
        let svc = mp::Service {
            name: s.name.clone(),
            location,
            protocol,
            port: port("port", s.port)?,
            endpoints,
            routes: s.routes.clone(),
            class: s.class.clone(),
        };
        services.insert(s.name.clone(), svc);
    }
    Ok(mp::Policy {
        mesh: mp::MeshSettings::default(),
        uplinks,
        classes: mesh_classes,
        services,
    })
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
        let mesh = Arc::new(mesh_policy(&p, &classes)?);
        Ok(VehiclePolicy {
            version: p.version.clone(),
            classes,
            costs: p.uplinks.iter().map(|u| (u.name.clone(), u.cost)).collect(),
            wire: Some(p),
            mesh,
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
        self.costs
            .iter()
            .find(|(n, _)| *n == uplink.name)
            .map(|(_, c)| *c)
            .unwrap_or(uplink.cost)
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
    fn invalid_services_and_references_are_rejected() {
        type Edit = Box<dyn Fn(&mut pb::PolicyUpdate)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|w| w.services[0].class = "nope".into()),
                "class \"nope\"",
            ),
            (Box::new(|w| w.services[0].port = 70000), "port 70000"),
            (Box::new(|w| w.services[0].port = 0), "port 0"),
            (
                Box::new(|w| w.services[0].routes = vec!["telemetry".into()]),
                "start with '/'",
            ),
            (Box::new(|w| w.services[0].location = 0), "unknown location"),
            (Box::new(|w| w.services[0].protocol = 9), "unknown protocol"),
            (
                Box::new(|w| w.services[0].endpoints[0].host.clear()),
                "host is empty",
            ),
            (Box::new(|w| w.services[0].name.clear()), "name is empty"),
            (
                Box::new(|w| {
                    let mut s = w.services[0].clone();
                    s.name = "logs".into();
                    w.services.push(s);
                }),
                "also service telemetry's",
            ),
            (
                Box::new(|w| w.services.push(w.services[0].clone())),
                "used twice",
            ),
            (
                Box::new(|w| w.classes[1].uplinks = vec!["sat".into()]),
                "\"sat\" is not in",
            ),
            (Box::new(|w| w.classes[1].dscp = 64), "dscp 64"),
            (Box::new(|w| w.classes[1].priority = 7), "unknown priority"),
            (Box::new(|w| w.uplinks[0].kind = 0), "unknown kind"),
            (
                Box::new(|w| w.uplinks.push(w.uplinks[0].clone())),
                "used twice",
            ),
        ];
        for (edit, needle) in cases {
            let mut w = wire("v");
            edit(&mut w);
            let e = VehiclePolicy::try_from(w).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn invalid_wire_policies_are_rejected() {
        let mut w = wire("v");
        w.classes.push(w.classes[0].clone());
        assert!(matches!(
            VehiclePolicy::try_from(w),
            Err(PolicyError::DuplicateClass { index: 2, .. })
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
}
