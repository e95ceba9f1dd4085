//! misaki's own gRPC API. Generated at build time by `protox` (a pure-Rust protobuf
//! compiler) + `tonic-prost-build`, so a fresh machine needs no `protoc`.
//!
//! Invariant: this crate holds wire types only; no domain logic. Domain types are
//! converted from these at the boundary (`TryFrom`) in the crates that use them.

/// `misaki.fleet.v1`: vehicle link-state reporting and policy distribution.
pub mod fleet {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
        tonic::include_proto!("misaki.fleet.v1");

        /// Compression used on both directions of the fleet stream.
        pub const COMPRESSION: tonic::codec::CompressionEncoding =
            tonic::codec::CompressionEncoding::Zstd;
    }
}

pub use fleet::v1 as fleet_v1;
