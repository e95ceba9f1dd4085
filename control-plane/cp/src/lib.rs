//! misaki control plane runtime: policy watcher, snapshot cache, admin HTTP, and the
//! glue that feeds compiled snapshots to the xDS server; the fleet CA (`ca`), mutual
//! TLS on the gRPC port (`tls`), certificate enrolment over it (`enroll`), and the
//! policy in etcd for replicas in shared mode (`store`), their fleet presence there
//! (`presence`) and the peer port between them (`peer`).

pub mod admin;
pub mod ca;
pub mod cache;
pub mod cli;
pub mod enroll;
pub mod fleet_state;
pub mod metrics;
pub mod peer;
pub mod policy_state;
pub mod presence;
pub mod run;
pub mod store;
pub mod tls;
pub mod watcher;
