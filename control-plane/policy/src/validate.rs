//! Whole-policy checks over the drafts of one or more files, then assembly.
//!
//! Invariant: a [`Policy`] is built only when no error at all was recorded — in any
//! file, by any phase — so every placeholder in a draft stays unseen and every
//! `Policy` upholds the model's invariant (references resolve, names unique,
//! ports distinct).
//!
//! Checks here relate items to each other: `version` and `mesh` across files,
//! unique names, references, route prefixes and ports. Duplicates are reported at
//! the later occurrence (files sorted by name, then top to bottom), pointing back
//! at the first.

use std::collections::BTreeMap;

use crate::error::{ErrorKind, Errors, Loc};
use crate::located::did_you_mean;
use crate::model::{Location, MeshSettings, Policy};
use crate::schema::{FileDraft, MESH_PORTS, MeshDraft, Named, Section, mesh_ports};

/// The only format version this build reads.
pub const FORMAT_VERSION: i64 = 1;

/// Checks the drafts together and, if nothing at all is wrong, builds the policy.
/// `whole` is where to report what is missing from the policy as a whole (a
/// file's top, or a directory).
pub(crate) fn merge(files: Vec<FileDraft>, whole: &Loc, errors: &mut Errors) -> Option<Policy> {
    if files.iter().any(|f| !f.complete) {
        // A file we could not read at all would make every cross-file check
        // (missing sections, unknown references) report noise.
        return None;
    }
    check_version(&files, whole, errors);
    let mesh = merge_mesh(&files, errors);
    let mesh_value = mesh.map(|m| m.value.clone()).unwrap_or_default();

    let uplinks = unique_names(
        files.iter().flat_map(|f| &f.uplinks.items).map(|u| &u.name),
        "uplink",
        errors,
    );
    let classes = unique_names(
        files.iter().flat_map(|f| &f.classes.items).map(|c| &c.name),
        "class",
        errors,
    );
    let services = unique_names(
        files
            .iter()
            .flat_map(|f| &f.services.items)
            .map(|s| &s.name),
        "service",
        errors,
    );
    require_section(&files, whole, "uplinks", |f| &f.uplinks, errors);
    require_section(&files, whole, "classes", |f| &f.classes, errors);

    for class in files.iter().flat_map(|f| &f.classes.items) {
        for uplink in &class.uplinks {
            check_reference(uplink, &uplinks, ("uplink", "uplinks"), errors);
        }
    }
    if let Some(tunnel_class) = mesh.and_then(|m| m.tunnel_class.as_ref()) {
        check_reference(tunnel_class, &classes, ("class", "classes"), errors);
    }
    check_services(&files, &classes, &mesh_value, errors);
    for consumed in files
        .iter()
        .flat_map(|f| &f.services.items)
        .flat_map(|s| &s.consumes)
    {
        check_reference(consumed, &services, ("service", "services"), errors);
    }

    if !errors.is_empty() {
        return None;
    }
    let mut policy = Policy {
        mesh: mesh_value,
        uplinks: BTreeMap::new(),
        classes: BTreeMap::new(),
        services: BTreeMap::new(),
    };
    for f in files {
        for u in f.uplinks.items {
            policy.uplinks.insert(u.value.name.clone(), u.value);
        }
        for c in f.classes.items {
            policy.classes.insert(c.value.name.clone(), c.value);
        }
        for s in f.services.items {
            policy.services.insert(s.value.name.clone(), s.value);
        }
    }
    Some(policy)
}

/// `version` must be given at least once, and every file that gives it must say 1
/// (so they agree).
fn check_version(files: &[FileDraft], whole: &Loc, errors: &mut Errors) {
    let mut seen = false;
    for (v, loc, path) in files.iter().filter_map(|f| f.version.as_ref()) {
        seen = true;
        if *v != FORMAT_VERSION {
            errors.push(
                loc,
                path,
                ErrorKind::UnsupportedVersion,
                format!(
                    "unsupported policy format version {v}; this build of misaki reads version {FORMAT_VERSION}"
                ),
            );
        }
    }
    if !seen {
        errors.push(
            whole,
            "version",
            ErrorKind::MissingField,
            format!("missing required field `version` (write `version: {FORMAT_VERSION}`)"),
        );
    }
}

/// `mesh` may be set by one file only; its ports must differ.
fn merge_mesh<'a>(files: &'a [FileDraft], errors: &mut Errors) -> Option<&'a MeshDraft> {
    let mut first: Option<&MeshDraft> = None;
    for mesh in files.iter().filter_map(|f| f.mesh.as_ref()) {
        match first {
            None => first = Some(mesh),
            Some(f) => errors.push(
                &mesh.loc,
                "mesh",
                ErrorKind::Duplicate,
                format!(
                    "`mesh` is already set at {}; it may appear in only one file",
                    f.loc.describe_from(&mesh.loc)
                ),
            ),
        }
    }
    let mesh = first?;
    let ports = mesh.ports();
    for j in 0..ports.len() {
        for i in 0..j {
            if ports[i] != ports[j] {
                continue;
            }
            // Report at an explicitly set port (defaults never clash with each
            // other), preferring the later field.
            let Some((loc, path)) = mesh.explicit[j].as_ref().or(mesh.explicit[i].as_ref()) else {
                continue;
            };
            let other = if mesh.explicit[j].is_some() { i } else { j };
            errors.push(
                loc,
                path,
                ErrorKind::Conflict,
                format!(
                    "port {} is also `{}`; the mesh ports must all differ",
                    ports[i], MESH_PORTS[other]
                ),
            );
        }
    }
    Some(mesh)
}

/// First definition of every name; later ones are reported.
fn unique_names<'a>(
    names: impl Iterator<Item = &'a Option<Named>>,
    what: &str,
    errors: &mut Errors,
) -> BTreeMap<&'a str, &'a Named> {
    let mut seen: BTreeMap<&str, &Named> = BTreeMap::new();
    for name in names.flatten() {
        if let Some(first) = seen.get(name.text.as_str()) {
            errors.push(
                &name.loc,
                &name.path,
                ErrorKind::Duplicate,
                format!(
                    "duplicate {what} name `{}`; first defined at {}",
                    name.text,
                    first.loc.describe_from(&name.loc)
                ),
            );
        } else {
            seen.insert(&name.text, name);
        }
    }
    seen
}

fn require_section<T>(
    files: &[FileDraft],
    whole: &Loc,
    field: &str,
    section: impl Fn(&FileDraft) -> &Section<T>,
    errors: &mut Errors,
) {
    if files.iter().map(|f| section(f).items_seen).sum::<usize>() > 0 {
        return;
    }
    match files.iter().find_map(|f| section(f).loc.as_ref()) {
        Some(loc) => errors.push(
            loc,
            field,
            ErrorKind::InvalidValue,
            format!("`{field}` is empty; at least one entry is required"),
        ),
        None => errors.push(
            whole,
            field,
            ErrorKind::MissingField,
            format!("missing required section `{field}` (a non-empty list)"),
        ),
    }
}

fn check_reference(
    reference: &Named,
    defined: &BTreeMap<&str, &Named>,
    (what, plural): (&str, &str),
    errors: &mut Errors,
) {
    if defined.contains_key(reference.text.as_str()) {
        return;
    }
    let message = if defined.is_empty() {
        format!(
            "unknown {what} `{}`; no {plural} are defined",
            reference.text
        )
    } else {
        let hint = did_you_mean(&reference.text, defined.keys().copied());
        let known: Vec<&str> = defined.keys().copied().collect();
        format!(
            "unknown {what} `{}`{hint}; defined {plural}: {}",
            reference.text,
            known.join(", ")
        )
    };
    errors.push(
        &reference.loc,
        &reference.path,
        ErrorKind::UnknownReference,
        message,
    );
}

/// Class references, route prefixes unique across services, and vehicle ports:
/// all vehicle services and the vehicle sidecar share the vehicle's loopback.
fn check_services(
    files: &[FileDraft],
    classes: &BTreeMap<&str, &Named>,
    mesh: &MeshSettings,
    errors: &mut Errors,
) {
    let sidecar_ports: Vec<(u16, &str)> = mesh_ports(mesh).into_iter().zip(MESH_PORTS).collect();
    let mut routes: BTreeMap<&str, (&str, &Loc)> = BTreeMap::new();
    let mut vehicle_ports: BTreeMap<u16, (&str, &Loc)> = BTreeMap::new();
    for svc in files.iter().flat_map(|f| &f.services.items) {
        let svc_name = svc.name.as_ref().map_or("?", |n| n.text.as_str());
        if let Some(class) = &svc.class {
            check_reference(class, classes, ("class", "classes"), errors);
        }
        for route in &svc.routes {
            match routes.get(route.text.as_str()) {
                Some((owner, loc)) => errors.push(
                    &route.loc,
                    &route.path,
                    ErrorKind::Conflict,
                    format!(
                        "route prefix `{}` is already used by service `{owner}` at {}; each prefix routes to one service",
                        route.text,
                        loc.describe_from(&route.loc)
                    ),
                ),
                None => {
                    routes.insert(&route.text, (svc_name, &route.loc));
                }
            }
        }
        let (Some(Location::Vehicle), Some((port, loc, path))) = (svc.location, &svc.port) else {
            continue;
        };
        if let Some((_, field)) = sidecar_ports.iter().find(|(p, _)| p == port) {
            errors.push(
                loc,
                path,
                ErrorKind::Conflict,
                format!(
                    "port {port} is the mesh's `{field}`; a vehicle service must not use a sidecar port"
                ),
            );
        } else if let Some((owner, first)) = vehicle_ports.get(port) {
            errors.push(
                loc,
                path,
                ErrorKind::Conflict,
                format!(
                    "port {port} is already used by vehicle service `{owner}` at {}; vehicle services share the vehicle's host",
                    first.describe_from(loc)
                ),
            );
        } else {
            vehicle_ports.insert(*port, (svc_name, loc));
        }
    }
}
