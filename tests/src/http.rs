//! The harness's minimal blocking HTTP/1.1 client (`misaki_harness::http`), where the
//! tests have always found it: send a request through a sidecar and read status,
//! headers and body, with no client-side magic in the way.

pub use misaki_harness::http::{Headers, Reply, find, get, parse, request};
