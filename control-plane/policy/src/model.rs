//! The validated mesh policy: the domain model every other module works from.
//!
//! Invariant: a `Policy` value is always valid — every reference resolves, names are
//! unique, ports do not clash. The only way to build one from YAML is
//! [`crate::parse`], which checks all of it once, at the boundary.

use std::collections::BTreeMap;
use std::time::Duration;

pub use misaki_identity::TrustDomain;

/// An enum whose values are spelled in policy files: the enum, `ALL` (every value with
/// its spelling, in declaration order: error messages list them so) and `as_str`.
macro_rules! spelled_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $spelling:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value with its spelling in policy files.
            pub const ALL: [(&'static str, $name); [$($spelling),+].len()] =
                [$(($spelling, $name::$variant)),+];

            /// The spelling in policy files.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $spelling,)+
                }
            }
        }
    };
}

/// A whole mesh policy (format version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Listener ports of the sidecars, data-plane mTLS.
    pub mesh: MeshSettings,
    /// Uplinks known to the fleet, by name.
    pub uplinks: BTreeMap<String, Uplink>,
    /// Traffic classes, by name.
    pub classes: BTreeMap<String, TrafficClass>,
    /// Services, by name.
    pub services: BTreeMap<String, Service>,
}

/// Ports the compiled sidecar listeners bind (on the sidecar's own host), and how
/// vehicle and cloud sidecars authenticate each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// Vehicle apps send requests for mesh services here (vehicle sidecar).
    pub vehicle_outbound_port: u16,
    /// Requests for services hosted on the vehicle arrive here (vehicle sidecar).
    pub vehicle_inbound_port: u16,
    /// Requests for cloud/edge services arrive here (cloud sidecar).
    pub cloud_inbound_port: u16,
    /// Mutual TLS between vehicle sidecars and cloud/edge sidecars (docs/security.md).
    pub mtls: MtlsMode,
    /// The SPIFFE trust domain of the fleet's identities: vehicle sidecars accept only
    /// `spiffe://<td>/cloud/...` servers, cloud sidecars name vehicles of this domain.
    pub trust_domain: TrustDomain,
    /// Cloud services call a vehicle-hosted service here (cloud sidecar's
    /// `vehicle_gateway` listener, request header `x-misaki-target-vehicle`).
    pub vehicle_gateway_port: u16,
    /// Vehicles' reverse tunnels arrive here (cloud sidecar).
    pub vehicle_tunnel_port: u16,
    /// Hosts (IP or DNS name, no port) of the cloud sidecars every vehicle keeps reverse
    /// tunnels to, at `vehicle_tunnel_port`. Empty: no tunnels, no gateway.
    pub vehicle_gateways: Vec<String>,
    /// The class whose uplinks carry the tunnels (its selected uplink, on a vehicle
    /// running edge-netd). Set whenever `vehicle_gateways` is non-empty.
    pub vehicle_tunnel_class: Option<String>,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            vehicle_outbound_port: 15001,
            vehicle_inbound_port: 15006,
            cloud_inbound_port: 15443,
            mtls: MtlsMode::Off,
            trust_domain: TrustDomain::default(),
            vehicle_gateway_port: 15444,
            vehicle_tunnel_port: 15445,
            vehicle_gateways: Vec::new(),
            vehicle_tunnel_class: None,
        }
    }
}

spelled_enum! {
    /// Mutual TLS on the data plane, vehicle sidecar ↔ cloud/edge sidecar.
    pub enum MtlsMode {
        /// Plaintext, as before mTLS existed.
        Off = "off",
        /// Vehicles connect with mTLS; cloud sidecars accept mTLS and plaintext (a
        /// migration step: plaintext requests never carry a verified vehicle id).
        Permissive = "permissive",
        /// Vehicles connect with mTLS; cloud sidecars accept nothing else.
        Strict = "strict",
    }
}

spelled_enum! {
    /// The radio technology of an uplink.
    pub enum UplinkKind {
        Lte = "lte",
        FiveG = "5g",
        ThreeG = "3g",
        Wifi = "wifi",
        Dsrc = "dsrc",
        Lpwa = "lpwa",
    }
}

/// A network interface a vehicle can send through (`uplinks[]` in the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub kind: UplinkKind,
    /// Billed by volume (cellular plans): deferrable traffic avoids it when it can.
    pub metered: bool,
    /// Relative cost; lower is cheaper. Breaks ties between equally preferred uplinks.
    pub cost: u32,
}

/// Envoy's routing priority (`RoutingPriority`): HIGH uses the cluster's separate
/// high-priority connection pool and circuit breakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoutePriority {
    Default,
    High,
}

impl RoutePriority {
    /// Every priority with its spelling in policy files.
    pub const ALL: [(&'static str, RoutePriority); 2] = [
        ("high", RoutePriority::High),
        ("default", RoutePriority::Default),
    ];

    /// The spelling in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutePriority::Default => "default",
            RoutePriority::High => "high",
        }
    }
}

/// A traffic class (`classes[]`): how requests of services annotated with it are
/// routed, timed out, retried, marked and queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficClass {
    pub name: String,
    pub priority: RoutePriority,
    /// Whole-request timeout (Envoy route `timeout`).
    pub timeout: Duration,
    /// Retries on 5xx, reset, connect-failure (Envoy `retry_policy.num_retries`).
    pub retries: u32,
    /// Uplinks the class may use, most preferred first. Every name is in `Policy::uplinks`.
    pub uplinks: Vec<String>,
    /// May be stored and forwarded later by edge-netd.
    pub deferrable: bool,
    /// DSCP code point (0..=63) marked on this class's upstream packets.
    pub dscp: u8,
    /// An uplink is eligible for this class only while its measured RTT is at most this.
    pub max_rtt: Option<Duration>,
    /// An uplink is eligible for this class only while its measured loss is at most this.
    pub max_loss_percent: Option<u8>,
    /// Deferred messages of this class expire after this long in the queue.
    pub ttl: Option<Duration>,
}

spelled_enum! {
    /// Where a service's instances run.
    pub enum Location {
        Vehicle = "vehicle",
        Edge = "edge",
        Cloud = "cloud",
    }
}

spelled_enum! {
    /// The application protocol a service speaks.
    pub enum Protocol {
        Http = "http",
        Grpc = "grpc",
    }
}

/// One instance address of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// IP address or DNS name. IPv6 addresses are stored without brackets.
    pub host: String,
    pub port: u16,
}

/// A mesh service (`services[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub location: Location,
    pub protocol: Protocol,
    /// The port the service listens on. For vehicle services the endpoint is
    /// `127.0.0.1:port` on each vehicle unless `endpoints` says otherwise.
    pub port: u16,
    /// Where its instances are. Non-empty for edge/cloud services; may be empty for
    /// vehicle services (then `127.0.0.1:port` on the vehicle).
    pub endpoints: Vec<Endpoint>,
    /// Path prefixes routed to this service; unique across the policy.
    pub routes: Vec<String>,
    /// The traffic class (priority) its developers annotated it with; in `Policy::classes`.
    pub class: String,
    /// Vehicle services only: the services it calls (each in `Policy::services`).
    /// `None`: not declared. When every vehicle service declares it, a vehicle's
    /// sidecar holds only these and the vehicle's own services.
    pub consumes: Option<Vec<String>>,
    /// Vehicle services only: instances of the service in the cloud (`host:port`), which
    /// take the cloud's calls while the vehicle is offline, and every call on low power
    /// when `on_low_power` is `cloud`. Empty: none.
    pub cloud_replica: Vec<Endpoint>,
    /// Vehicle services only: where calls go while the vehicle reports low power.
    pub on_low_power: LowPowerAction,
}

spelled_enum! {
    /// What a vehicle service does while its vehicle is low on power.
    pub enum LowPowerAction {
        /// Keep serving on the vehicle.
        Stay = "stay",
        /// Callers on the vehicle and in the cloud go to the service's `cloud_replica`
        /// until power is back.
        Cloud = "cloud",
    }
}

impl Policy {
    /// The class of a service. Valid policies always have it.
    pub fn class_of(&self, svc: &Service) -> &TrafficClass {
        &self.classes[&svc.class]
    }
}
