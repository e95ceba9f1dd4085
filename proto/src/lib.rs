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

/// The codec of every generated service and client (`build.rs`): prost, with small
/// initial buffers.
///
/// tonic's default allocates each stream 8 KiB to decode into and 8 KiB to encode into
/// (16 KiB with compression) up front. A control plane holds one report stream per
/// vehicle, and fleet messages are a few hundred bytes, so at 10,000 vehicles that
/// was over 200 MiB of buffers sitting mostly empty. They still grow for a big
/// message (a whole policy).
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Initial size of a stream's encode and decode buffers.
    pub const INITIAL_BUFFER: usize = 1024;
    /// tonic's default: how much an encoder buffers before it yields.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    fn settings() -> BufferSettings {
        BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
    }

    /// `tonic_prost::ProstCodec` with [`INITIAL_BUFFER`].
    #[derive(Debug)]
    pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBuffers<T, U> {
        fn default() -> Self {
            SmallBuffers(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBuffers<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(settings())
        }
    }
}
