//! Incremental policy updates: the delta between two whole `PolicyUpdate`s, and a
//! delta applied to a whole one. Pure functions, at the wire level, so the vehicle
//! validates the policy a delta produces exactly as a whole update ([`crate::from_wire`]).
//!
//! Invariants:
//! - `apply(a, diff(a, b)) == b` for whole updates `a`, `b` made by [`crate::to_wire`]
//!   (property-tested), and the result's version is `b`'s.
//! - Items are identified by name and replaced whole (no field-level merge): a delta
//!   lists each added or changed item, and the names of removed ones.
//! - [`apply`] checks the base (the held policy's version must be the delta's
//!   `base_version`) and the result (its content version must be the delta's
//!   `version`), so a vehicle never holds a policy under a version that is not its own.

use std::collections::{BTreeMap, BTreeSet};

use misaki_proto::fleet_v1 as pb;

use crate::content_version;

/// Why a delta could not be applied. The holder keeps its policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The update has no `base_version`: it is a whole policy.
    #[error("not a delta (no base_version)")]
    NotADelta,
    /// The delta was made against another policy than the one held.
    #[error("delta against {base:?}, but the held policy is {held:?}")]
    BaseMismatch { base: String, held: String },
    /// The base matched, yet the result is not the promised policy (a newer schema's
    /// fields lost in decoding, or a bug): only a whole update can help.
    #[error("delta result has content version {computed}, not {version}")]
    VersionMismatch { version: String, computed: String },
}

/// A named item of a policy section.
trait Named: Clone + PartialEq {
    fn name(&self) -> &str;
}

impl Named for pb::Uplink {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for pb::TrafficClass {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for pb::Service {
    fn name(&self) -> &str {
        &self.name
    }
}

/// `target`'s items that are new or differ from `base`'s (in `target`'s order), and
/// the names of `base`'s items that `target` lacks (sorted).
fn diff_items<T: Named>(base: &[T], target: &[T]) -> (Vec<T>, Vec<String>) {
    let old: BTreeMap<&str, &T> = base.iter().map(|i| (i.name(), i)).collect();
    let new: BTreeSet<&str> = target.iter().map(Named::name).collect();
    let changed = target
        .iter()
        .filter(|t| old.get(t.name()).is_none_or(|o| *o != *t))
        .cloned()
        .collect();
    let removed = old
        .keys()
        .filter(|n| !new.contains(*n))
        .map(|n| n.to_string())
        .collect();
    (changed, removed)
}

/// `base`'s items without `removed`, with `changed` replacing or adding by name,
/// sorted by name (the order of a whole update).
fn apply_items<T: Named>(base: &[T], changed: &[T], removed: &[String]) -> Vec<T> {
    let mut items: BTreeMap<&str, &T> = base.iter().map(|i| (i.name(), i)).collect();
    for name in removed {
        items.remove(name.as_str());
    }
    for c in changed {
        items.insert(c.name(), c);
    }
    items.into_values().cloned().collect()
}

/// Whether `update` is a delta (else it is a whole policy).
pub fn is_delta(update: &pb::PolicyUpdate) -> bool {
    !update.base_version.is_empty()
}

/// The delta that turns the whole update `base` into the whole update `target`, or
/// `None` when a delta cannot say it: either is a delta or unversioned, or `target`
/// lacks `mesh` where `base` has it (a delta's absent `mesh` means "unchanged").
pub fn diff(base: &pb::PolicyUpdate, target: &pb::PolicyUpdate) -> Option<pb::PolicyUpdate> {
    if is_delta(base) || is_delta(target) || base.version.is_empty() {
        return None;
    }
    if target.mesh.is_none() && base.mesh.is_some() {
        return None;
    }
    let (uplinks, removed_uplinks) = diff_items(&base.uplinks, &target.uplinks);
    let (classes, removed_classes) = diff_items(&base.classes, &target.classes);
    let (services, removed_services) = diff_items(&base.services, &target.services);
    Some(pb::PolicyUpdate {
        version: target.version.clone(),
        uplinks,
        classes,
        services,
        mesh: target
            .mesh
            .clone()
            .filter(|m| base.mesh.as_ref() != Some(m)),
        base_version: base.version.clone(),
        removed_uplinks,
        removed_classes,
        removed_services,
    })
}

/// The whole update `delta` makes of `base` (the held whole policy). Rejected when
/// `delta` is not one, was made against another version, or its result's content
/// version is not `delta.version`. The result still has to pass
/// [`crate::from_wire`], like any whole update.
pub fn apply(
    base: &pb::PolicyUpdate,
    delta: &pb::PolicyUpdate,
) -> Result<pb::PolicyUpdate, DeltaError> {
    if !is_delta(delta) {
        return Err(DeltaError::NotADelta);
    }
    if base.version != delta.base_version {
        return Err(DeltaError::BaseMismatch {
            base: delta.base_version.clone(),
            held: base.version.clone(),
        });
    }
    let mut whole = pb::PolicyUpdate {
        version: String::new(),
        uplinks: apply_items(&base.uplinks, &delta.uplinks, &delta.removed_uplinks),
        classes: apply_items(&base.classes, &delta.classes, &delta.removed_classes),
        services: apply_items(&base.services, &delta.services, &delta.removed_services),
        mesh: delta.mesh.clone().or_else(|| base.mesh.clone()),
        ..Default::default()
    };
    let computed = content_version(&whole);
    if computed != delta.version {
        return Err(DeltaError::VersionMismatch {
            version: delta.version.clone(),
            computed,
        });
    }
    whole.version = computed;
    Ok(whole)
}
