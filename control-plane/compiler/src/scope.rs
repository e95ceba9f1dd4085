//! Which services a vehicle's sidecar holds (its scope).
//!
//! Vehicle services may declare the services they call (`consumes`). The services a
//! vehicle holds eagerly are its own services and everything they declare. When every
//! vehicle service declares, the scope is *closed*: nothing else is routed from the
//! vehicle (a request for another service gets a 404 saying so). Otherwise the rest is
//! *open*: held in full by clients that cannot fetch on demand (SotW, proxyless gRPC),
//! fetched on first use by vehicle Envoys on delta xDS.

use std::collections::BTreeSet;

use misaki_policy::{Location, Policy, Service};

/// The scope of a vehicle sidecar under one policy.
#[derive(Debug)]
pub(crate) struct Scope<'p> {
    /// Vehicle services and what they declare they consume.
    eager: BTreeSet<&'p str>,
    /// Every vehicle service declared `consumes`: nothing outside `eager` is routed.
    closed: bool,
}

/// How a service appears in a vehicle sidecar's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// Sent with the rest of the configuration.
    Eager,
    /// In the snapshot, but only sent to a client that asks for it by name.
    OnDemand,
    /// Not routed from this vehicle.
    Absent,
}

impl<'p> Scope<'p> {
    pub(crate) fn of(policy: &'p Policy) -> Self {
        let mut eager = BTreeSet::new();
        let mut closed = true;
        for svc in policy.services.values() {
            if svc.location != Location::Vehicle {
                continue;
            }
            eager.insert(svc.name.as_str());
            match &svc.consumes {
                Some(names) => eager.extend(names.iter().map(String::as_str)),
                None => closed = false,
            }
        }
        // A vehicle with no services of its own declares nothing: keep everything.
        closed &= !eager.is_empty();
        Scope { eager, closed }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// `svc`'s presence for a client that can (`on_demand`) or cannot fetch on demand.
    pub(crate) fn presence(&self, svc: &Service, on_demand: bool) -> Presence {
        if self.eager.contains(svc.name.as_str()) {
            Presence::Eager
        } else if self.closed {
            Presence::Absent
        } else if on_demand {
            Presence::OnDemand
        } else {
            Presence::Eager
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(consumes: &[Option<&[&str]>]) -> Policy {
        let mut text = String::from(
            "version: 1\nuplinks: [{name: wifi, kind: wifi}]\nclasses: [{name: std, uplinks: [wifi]}]\nservices:\n",
        );
        for svc in ["maps", "music", "news"] {
            text.push_str(&format!(
                "  - {{name: {svc}, location: cloud, port: 80, endpoints: [\"198.18.0.1:80\"], routes: [\"/{svc}\"], class: std}}\n"
            ));
        }
        for (i, c) in consumes.iter().enumerate() {
            let decl = c.map_or(String::new(), |c| format!(", consumes: [{}]", c.join(", ")));
            text.push_str(&format!(
                "  - {{name: app{i}, location: vehicle, port: {}, routes: [\"/app{i}\"], class: std{decl}}}\n",
                9000 + i
            ));
        }
        misaki_policy::parse("p.yaml", &text).unwrap()
    }

    fn presences(p: &Policy, on_demand: bool) -> Vec<(&str, Presence)> {
        let scope = Scope::of(p);
        p.services
            .values()
            .map(|s| (s.name.as_str(), scope.presence(s, on_demand)))
            .collect()
    }

    #[test]
    fn every_vehicle_service_declaring_closes_the_scope() {
        let p = policy(&[Some(&["maps"]), Some(&[])]);
        assert!(Scope::of(&p).is_closed());
        use Presence::*;
        let want = vec![
            ("app0", Eager),
            ("app1", Eager),
            ("maps", Eager),
            ("music", Absent),
            ("news", Absent),
        ];
        assert_eq!(presences(&p, true), want);
        assert_eq!(presences(&p, false), want);
    }

    #[test]
    fn one_undeclared_vehicle_service_leaves_the_rest_on_demand_or_eager() {
        let p = policy(&[Some(&["maps"]), None]);
        assert!(!Scope::of(&p).is_closed());
        use Presence::*;
        assert_eq!(
            presences(&p, true),
            vec![
                ("app0", Eager),
                ("app1", Eager),
                ("maps", Eager),
                ("music", OnDemand),
                ("news", OnDemand),
            ]
        );
        assert!(presences(&p, false).iter().all(|(_, pr)| *pr == Eager));
    }

    #[test]
    fn no_vehicle_services_means_nothing_declared() {
        let p = policy(&[]);
        assert!(!Scope::of(&p).is_closed());
        assert!(
            presences(&p, true)
                .iter()
                .all(|(_, pr)| *pr == Presence::OnDemand)
        );
    }
}
