//! misaki control plane runtime: policy watcher, snapshot cache, admin HTTP, and the
//! glue that feeds compiled snapshots to the xDS server; the fleet CA (`ca`), mutual
//! TLS on the gRPC port (`tls`) and certificate enrolment over it (`enroll`).

pub mod admin;
pub mod ca;
pub mod cache;
pub mod cli;
pub mod enroll;
pub mod fleet_state;
pub mod metrics;
pub mod policy_state;
pub mod run;
pub mod tls;
pub mod watcher;
