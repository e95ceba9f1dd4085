//! misaki's own gRPC API. Generated at build time by `protox` (a pure-Rust protobuf
//! compiler) + `tonic-prost-build`, so a fresh machine needs no `protoc`.
