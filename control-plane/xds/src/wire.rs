//! Hand-written protobuf encoding of ADS responses around pre-encoded resources.
//!
//! Invariants:
//! - a resource's wire form (its encoded `google.protobuf.Any`, [`Resource::wire`]) is
//!   computed once per resource and shared by every stream; a response only encodes
//!   its few per-stream fields and appends the shared bytes with a field key and
//!   length prefix, so a fleet-wide change never re-encodes (or copies into a new
//!   `Any`) the same resource once per stream;
//! - the bytes are exactly what prost writes for the equivalent `DiscoveryResponse` /
//!   `DeltaDiscoveryResponse` (fields in tag order, proto3 defaults omitted, repeated
//!   elements always written); the unit tests in `sotw` and `delta` check this against
//!   the structs the reference `From` conversions build.
//!
//! [`Resource::wire`]: misaki_compiler::snapshot::Resource::wire

use std::marker::PhantomData;

use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tonic::Status;
use tonic::codec::{BufferSettings, EncodeBuf, Encoder};

/// A response that writes its own protobuf encoding.
pub(crate) trait WireMessage {
    /// Exact length of [`WireMessage::encode_raw`]'s output.
    fn encoded_len(&self) -> usize;
    fn encode_raw(&self, buf: &mut impl BufMut);

    /// The encoding as a `Vec` (tests and tools).
    #[cfg(test)]
    fn encode_to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_raw(&mut v);
        debug_assert_eq!(v.len(), self.encoded_len());
        v
    }
}

/// Length of a length-delimited field (`tag`, `len` bytes of payload), always written.
pub(crate) fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Write a length-delimited field header: key, then the payload length.
pub(crate) fn put_header(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

/// Write a length-delimited field (an embedded message's bytes, a repeated string
/// element): always written, even when empty.
pub(crate) fn put_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    put_header(tag, bytes.len(), buf);
    buf.put_slice(bytes);
}

/// Length of a singular proto3 `string` field: nothing when empty (the default).
pub(crate) fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        field_len(tag, s.len())
    }
}

/// Write a singular proto3 `string` field, omitted when empty.
pub(crate) fn put_str(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        put_field(tag, s.as_bytes(), buf);
    }
}

/// tonic encoder for [`WireMessage`]s, with explicit buffer settings.
#[derive(Debug)]
pub(crate) struct WireEncoder<T> {
    buffer_settings: BufferSettings,
    _pd: PhantomData<fn(T)>,
}

impl<T> WireEncoder<T> {
    pub(crate) fn new(buffer_settings: BufferSettings) -> Self {
        WireEncoder {
            buffer_settings,
            _pd: PhantomData,
        }
    }
}

impl<T: WireMessage> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}
