//! Test harness shared by the end-to-end tests: real binaries, real Envoy, real
//! network namespaces.
//!
//! Invariants: every process a test starts is killed when its guard drops (also when
//! the test panics); every port is an ephemeral port the kernel just gave us, so two
//! tests never share one (Envoy binds with SO_REUSEPORT: a clash would not fail, it
//! would silently split traffic); a missing prerequisite (Envoy, a binary, root) is a
//! test failure that says what is missing, never a skip.

pub mod fleet_lab;
pub mod gateway;
pub mod http;
pub mod mtls_lab;
pub mod netns;
pub mod policy;
pub mod process;
pub mod tls;

pub use process::{ControlPlane, Envoy, Process, Upstream, free_port, repo_root, target_bin};
