//! Fleet registry.
