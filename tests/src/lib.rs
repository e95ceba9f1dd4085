//! Test harness shared by the end-to-end tests: real binaries, real Envoy, real
//! network namespaces.

pub mod netns;
