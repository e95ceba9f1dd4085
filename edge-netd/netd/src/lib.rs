//! edge-netd library.
