//! The vehicle-local xDS tier: edge-netd serves ADS (SotW and delta) to the vehicle's
//! Envoy sidecars and proxyless gRPC clients on loopback, compiled by the same
//! `misaki-compiler` and served by the same `misaki-xds` server as misaki-cp.
//!
//! Invariants:
//! - One compiler, two hosts: the snapshot is `compile_vehicle(policy, node, state)`
//!   with the policy edge-netd holds (received, stored, or shipped) and the state only
//!   the vehicle knows (its interfaces, the engine's selection, the ingest address).
//! - Every node is served as this vehicle: role `vehicle`, this daemon's vehicle id,
//!   whatever its bootstrap says (a shipped bootstrap cannot know each car's id).
//! - Recompiles only when the policy or the [`VehicleState`] changed (probe RTTs move
//!   every 100 ms and must not cost a compile), and wakes streams only when versions
//!   changed. A selection change therefore reaches Envoy as an RDS-only push.
//! - Serves without the cloud: the stored or shipped policy is there from the start.
//! - The vehicle's credential (certificate and key, SDS) is compiled only into the
//!   snapshots of a source made with [`LocalSource::serving_credential`], which serves
//!   the Unix socket (`xds_socket`); a loopback TCP client gets the same snapshot
//!   without the secrets.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::Snapshot;
use misaki_compiler::{VehicleCredential, VehicleState, compile_vehicle};
use misaki_policy::Policy;
use misaki_xds::SnapshotSource;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::EngineView;
use crate::identity::{Credential, CredentialRx};

#[derive(Debug)]
struct Inner {
    policy: Arc<Policy>,
    state: VehicleState,
    /// One compiled snapshot per kind of client, keyed by [`ClientKind`].
    entries: HashMap<ClientKind, watch::Sender<Arc<Snapshot>>>,
}

/// What a local client's snapshot depends on besides policy and state: proxyless gRPC
/// or Envoy, delta or SotW xDS, and whether its listener may serve the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ClientKind {
    proxyless: bool,
    delta: bool,
    credential: bool,
}

/// The snapshots the local tier serves. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LocalSource {
    vehicle_id: Arc<str>,
    prefix: Arc<str>,
    inner: Arc<Mutex<Inner>>,
    /// This source's clients get the vehicle's credential (the Unix socket's only).
    serve_credential: bool,
}

/// The vehicle state of an engine view under `config`.
pub fn vehicle_state(config: &Config, view: &EngineView) -> VehicleState {
    let mut state = VehicleState {
        interfaces: config
            .uplinks
            .iter()
            .map(|u| (u.name.clone(), u.interface.clone()))
            .collect(),
        selected: Default::default(),
        defer_to: config.store_forward.as_ref().map(|sf| sf.listen),
        cross_uplink_retry: config.cross_uplink_retry,
        credential: None,
        low_power: false,
    };
    set_selected(&mut state, view);
    state
}

/// Take the engine's current selection and power into `state`.
fn set_selected(state: &mut VehicleState, view: &EngineView) {
    state.selected = view
        .selections
        .iter()
        .map(|s| (s.class.clone(), s.uplink.clone()))
        .collect();
    state.low_power = view.power.state.is_low();
}

impl LocalSource {
    pub fn new(
        vehicle_id: &str,
        policy: Arc<Policy>,
        state: VehicleState,
        prefix: impl Into<Arc<str>>,
    ) -> Self {
        LocalSource {
            vehicle_id: vehicle_id.into(),
            prefix: prefix.into(),
            inner: Arc::new(Mutex::new(Inner {
                policy,
                state,
                entries: HashMap::new(),
            })),
            serve_credential: false,
        }
    }

    /// The same snapshots, with the vehicle's credential in them: for the Unix
    /// socket's server only.
    pub fn serving_credential(&self) -> LocalSource {
        LocalSource {
            serve_credential: true,
            ..self.clone()
        }
    }

    fn kind(&self, node: &NodeInfo) -> ClientKind {
        ClientKind {
            proxyless: node.proxyless,
            delta: node.delta,
            credential: self.serve_credential,
        }
    }

    fn compile(&self, policy: &Policy, state: &VehicleState, kind: ClientKind) -> Snapshot {
        let state = if kind.credential || state.credential.is_none() {
            Cow::Borrowed(state)
        } else {
            Cow::Owned(VehicleState {
                credential: None,
                ..state.clone()
            })
        };
        compile_vehicle(policy, &self.node(kind), &state, &self.prefix)
    }

    fn node(&self, kind: ClientKind) -> NodeInfo {
        NodeInfo {
            id: String::new(),
            role: Role::Vehicle,
            vehicle_id: Some(self.vehicle_id.to_string()),
            proxyless: kind.proxyless,
            delta: kind.delta,
            tls_dir: None,
        }
    }

    /// Put a policy and state in force; returns how many client kinds got a changed
    /// snapshot. Does nothing (no compile) when neither changed.
    pub fn update(&self, policy: Arc<Policy>, state: &VehicleState) -> usize {
        let mut inner = self.inner.lock().expect("local xDS lock");
        if Arc::ptr_eq(&inner.policy, &policy) && inner.state == *state {
            return 0;
        }
        inner.policy = policy;
        inner.state = state.clone();
        inner.entries.retain(|_, tx| tx.receiver_count() > 0);
        let mut changed = 0;
        for (kind, tx) in &inner.entries {
            let snap = self.compile(&inner.policy, &inner.state, *kind);
            changed +=
                usize::from(tx.send_if_modified(|cur| Snapshot::replace_if_changed(cur, snap)));
        }
        changed
    }
}

impl SnapshotSource for LocalSource {
    fn watch(&self, node: &NodeInfo) -> watch::Receiver<Arc<Snapshot>> {
        if node.role != Role::Vehicle
            || node.vehicle_id.as_deref() != Some(self.vehicle_id.as_ref())
        {
            tracing::debug!(node = %node.id, role = node.role.as_str(), vehicle = ?node.vehicle_id,
                "serving a local xDS client as this vehicle");
        }
        let mut inner = self.inner.lock().expect("local xDS lock");
        let kind = self.kind(node);
        if let Some(tx) = inner.entries.get(&kind) {
            return tx.subscribe();
        }
        let snap = self.compile(&inner.policy, &inner.state, kind);
        let (tx, rx) = watch::channel(Arc::new(snap));
        inner.entries.insert(kind, tx);
        rx
    }
}

/// What the vehicle's Envoy is served by SDS: its certificate, key and the fleet CA.
fn vehicle_credential(c: &Credential) -> Arc<VehicleCredential> {
    Arc::new(VehicleCredential {
        cert_chain_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.clone(),
        ca_pem: c.ca_pem.clone(),
    })
}

/// Follow the engine's selection, the policy in force and (with `tls:`) the vehicle's
/// credential until `shutdown`.
pub async fn follow(
    config: Arc<Config>,
    source: LocalSource,
    mut views: watch::Receiver<Arc<EngineView>>,
    mut policy: watch::Receiver<Arc<Policy>>,
    mut credential: Option<CredentialRx>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // Only the selection, the power and the credential move; the config's part is
    // built once.
    // The engine publishes every probe's RTT, so this loop runs often and must stay
    // cheap.
    let mut state = vehicle_state(&config, &views.borrow_and_update());
    loop {
        if let Some(rx) = credential.as_mut() {
            state.credential = rx.borrow_and_update().as_deref().map(vehicle_credential);
        }
        let current = policy.borrow_and_update().clone();
        let changed = source.update(current, &state);
        if changed > 0 {
            tracing::debug!(changed, "local xDS snapshot changed");
        }
        let credential_changed = async {
            match credential.as_mut() {
                Some(rx) => rx.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            r = views.changed() => if r.is_err() { return },
            r = policy.changed() => if r.is_err() { return },
            r = credential_changed => if r.is_err() { credential = None },
        }
        set_selected(&mut state, &views.borrow_and_update());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use misaki_compiler::snapshot::ResourceType;

    fn policy() -> Arc<Policy> {
        Arc::new(
            misaki_policy::parse("q", include_str!("../../../examples/quickstart/mesh.yaml"))
                .unwrap(),
        )
    }

    fn state(standard: Option<&str>) -> VehicleState {
        let mut s = VehicleState::default();
        s.interfaces.insert("wifi".into(), "wlan0".into());
        s.interfaces.insert("lte".into(), "wwan0".into());
        s.selected
            .insert("standard".into(), standard.map(str::to_string));
        s
    }

    fn node(vehicle: &str, role: Role) -> NodeInfo {
        NodeInfo {
            id: "sidecar".into(),
            role,
            vehicle_id: Some(vehicle.into()),
            proxyless: false,
            delta: false,
            tls_dir: None,
        }
    }

    #[test]
    fn every_node_is_served_as_this_vehicle() {
        let p = policy();
        let src = LocalSource::new("car-7", p.clone(), state(Some("wifi")), "x-");
        let a = src.watch(&node("whatever", Role::Vehicle)).borrow().clone();
        let b = src.watch(&node("car-7", Role::Cloud)).borrow().clone();
        assert!(Arc::ptr_eq(&a, &b), "one snapshot for every Envoy");
        let direct = compile_vehicle(
            &p,
            &src.node(ClientKind {
                proxyless: false,
                delta: false,
                credential: false,
            }),
            &state(Some("wifi")),
            "x-",
        );
        assert_eq!(*a, direct);
    }

    #[test]
    fn only_a_real_change_recompiles_and_a_selection_change_moves_routes_only() {
        let p = policy();
        let src = LocalSource::new("car-7", p.clone(), state(Some("wifi")), "x-");
        let mut rx = src.watch(&node("car-7", Role::Vehicle));
        let before = rx.borrow_and_update().clone();
        assert_eq!(src.update(p.clone(), &state(Some("wifi"))), 0);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(src.update(p.clone(), &state(Some("lte"))), 1);
        let after = rx.borrow_and_update().clone();
        for t in [
            ResourceType::Cluster,
            ResourceType::Endpoint,
            ResourceType::Listener,
        ] {
            assert_eq!(before.get(t).version, after.get(t).version);
        }
        assert_ne!(
            before.get(ResourceType::Route).version,
            after.get(ResourceType::Route).version
        );
    }

    /// The key is in the socket's snapshots only: a loopback TCP client of the same
    /// tier gets the same configuration without the secrets.
    #[test]
    fn only_the_socket_source_serves_the_credential() {
        let p = Arc::new(
            misaki_policy::parse("m", include_str!("../../../examples/mtls/mesh.yaml")).unwrap(),
        );
        let mut with = state(Some("wifi"));
        with.credential = Some(Arc::new(VehicleCredential {
            cert_chain_pem: "CERT".into(),
            key_pem: "KEY".into(),
            ca_pem: "CA".into(),
        }));
        let tcp = LocalSource::new("car-7", p, with.clone(), "x-");
        let socket = tcp.serving_credential();
        let n = node("car-7", Role::Vehicle);
        let on_socket = socket.watch(&n).borrow().clone();
        let on_tcp = tcp.watch(&n).borrow().clone();
        assert_eq!(on_socket.get(ResourceType::Secret).items.len(), 2);
        assert!(on_tcp.get(ResourceType::Secret).items.is_empty());
        assert_eq!(
            on_socket.get(ResourceType::Cluster).version,
            on_tcp.get(ResourceType::Cluster).version,
            "the same clusters, which name the secrets"
        );
        // A renewal reaches the socket's clients only.
        with.credential = Some(Arc::new(VehicleCredential {
            cert_chain_pem: "CERT2".into(),
            key_pem: "KEY2".into(),
            ca_pem: "CA".into(),
        }));
        let mut rx_socket = socket.watch(&n);
        let mut rx_tcp = tcp.watch(&n);
        rx_socket.borrow_and_update();
        rx_tcp.borrow_and_update();
        let policy = tcp.inner.lock().unwrap().policy.clone();
        assert_eq!(tcp.update(policy, &with), 1);
        assert!(rx_socket.has_changed().unwrap());
        assert!(!rx_tcp.has_changed().unwrap());
    }

    /// One compiler, two hosts: what edge-netd compiles from the policy it received
    /// (encoded, decoded, validated, as on the fleet stream) is byte for byte what
    /// misaki-cp's compiler makes of the operator's policy for the same node and state.
    #[test]
    fn the_vehicle_compiles_what_the_cloud_would_from_the_received_policy() {
        use prost::Message;
        let original = policy();
        let bytes = misaki_policy_wire::to_wire(&original).encode_to_vec();
        let received = misaki_proto::fleet_v1::PolicyUpdate::decode(bytes.as_slice()).unwrap();
        let vp = crate::policy::VehiclePolicy::try_from(received).unwrap();
        for standard in [Some("wifi"), Some("lte"), None] {
            let src = LocalSource::new("car-7", vp.mesh.clone(), state(standard), "x-");
            for proxyless in [false, true] {
                let mut n = node("car-7", Role::Vehicle);
                n.proxyless = proxyless;
                let on_vehicle = src.watch(&n).borrow().clone();
                let in_cloud = compile_vehicle(&original, &n, &state(standard), "x-");
                for t in ResourceType::PUSH_ORDER {
                    let (a, b) = (on_vehicle.get(t), in_cloud.get(t));
                    assert_eq!(a.items.len(), b.items.len(), "{t:?}");
                    for (name, r) in &a.items {
                        assert_eq!(r.body, b.items[name].body, "{t:?} {name}");
                    }
                }
            }
        }
    }
}
