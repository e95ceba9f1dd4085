//! Hand-written protobuf encoding of ADS responses around pre-encoded resources.
//!
//! Invariants:
//! - a resource's wire form (its encoded `google.protobuf.Any`, [`Resource::wire`]) is
//!   computed once per resource and shared by every stream; a response only encodes
//!   its few per-stream fields and puts the shared bytes after a field key and length
//!   prefix, so a fleet-wide change never re-encodes (or copies into a new `Any`) the
//!   same resource once per stream;
//! - the bytes are exactly what prost writes for the equivalent `DiscoveryResponse` /
//!   `DeltaDiscoveryResponse` (fields in tag order, proto3 defaults omitted, repeated
//!   elements always written), whatever the [`WireBuf`]: the unit tests in `sotw` and
//!   `delta` check this against the structs the reference `From` conversions build,
//!   for the `Vec` encoding and for the concatenated chunks of [`Framed`];
//! - a gRPC message ([`Framed`]) goes out as chunks: runs of the reply's own fields
//!   (fresh, short-lived allocations, never a per-stream buffer that keeps the capacity
//!   of the largest reply), and every resource of at least [`SHARE_MIN`] bytes as a
//!   refcount clone of its shared bytes; nothing outlives the chunks once sent.
//!
//! [`Resource::wire`]: misaki_compiler::snapshot::Resource::wire

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

/// Where a [`WireMessage`] writes: small fields into [`WireBuf::run`], resources'
/// shared bytes through [`WireBuf::put_shared`], which may keep them as their own chunk.
pub(crate) trait WireBuf {
    type Run: BufMut;
    /// The buffer for the reply's own fields (keys, lengths, names, versions).
    fn run(&mut self) -> &mut Self::Run;
    /// Append a resource's shared pre-encoded bytes.
    fn put_shared(&mut self, bytes: &Bytes);
}

/// A contiguous encoding (tests, tools): the shared bytes are copied.
impl WireBuf for Vec<u8> {
    type Run = Vec<u8>;

    fn run(&mut self) -> &mut Vec<u8> {
        self
    }

    fn put_shared(&mut self, bytes: &Bytes) {
        self.extend_from_slice(bytes);
    }
}

/// A response that writes its own protobuf encoding, one part at a time so that a
/// [`Framed`] reply is encoded only as fast as the connection takes it.
pub(crate) trait WireMessage {
    /// Exact length of the encoding (all parts).
    fn encoded_len(&self) -> usize;
    /// How many parts [`WireMessage::put_part`] writes, in order.
    fn parts(&self) -> usize;
    fn put_part(&self, part: usize, buf: &mut impl WireBuf);

    /// The whole encoding, part after part ([`Framed`] takes the parts one by one).
    #[cfg(test)]
    fn encode_raw(&self, buf: &mut impl WireBuf) {
        for part in 0..self.parts() {
            self.put_part(part, buf);
        }
    }

    /// The encoding as a `Vec` (tests and tools).
    #[cfg(test)]
    fn encode_to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.encoded_len());
        self.encode_raw(&mut v);
        debug_assert_eq!(v.len(), self.encoded_len());
        v
    }
}

/// What part `part` of a reply with `items` resources is: the fields before the
/// resources, one resource, or the fields after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Head,
    Item(usize),
    Tail,
}

impl Part {
    /// Replies with `items` resources have `items + 2` parts.
    pub(crate) fn of(part: usize, items: usize) -> Part {
        match part {
            0 => Part::Head,
            p if p <= items => Part::Item(p - 1),
            _ => Part::Tail,
        }
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

/// Write a length-delimited field (a repeated string element): always written, even
/// when empty.
pub(crate) fn put_field(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    put_header(tag, bytes.len(), buf);
    buf.put_slice(bytes);
}

/// Write a length-delimited field whose payload is a resource's shared bytes.
pub(crate) fn put_shared_field(tag: u32, bytes: &Bytes, buf: &mut impl WireBuf) {
    put_header(tag, bytes.len(), buf.run());
    buf.put_shared(bytes);
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

/// Shared bytes shorter than this are copied into the current run instead of going out
/// as their own chunk. Every chunk becomes its own HTTP/2 DATA frame (9 bytes on the
/// wire, a slot in h2's per-connection send queue, a slab that never shrinks), and
/// clients police small frames: h2 (tonic, the loadgen) sends GOAWAY
/// `ENHANCE_YOUR_CALM` "too_many_data_frames" once DATA frames under 256 bytes
/// outweigh bigger ones, which a chunk per resource did (measured: a SotW CDS reply of
/// ~150-byte clusters). With this minimum, a short run is always followed by a shared
/// chunk of at least this size or ends the reply; a big resource (a route table) is
/// never copied.
pub(crate) const SHARE_MIN: usize = 4 * 1024;
/// A run is cut into a chunk once it is this long (h2's default DATA frame size), so a
/// reply of many small resources is copied only as fast as the connection takes it.
pub(crate) const RUN_MAX: usize = 16 * 1024;
/// gRPC's message prefix: a compression flag and the message length (u32, big-endian).
const PREFIX_LEN: usize = 5;

/// The chunks of one gRPC message, written part by part as they are taken.
#[derive(Debug)]
pub(crate) struct Chunks {
    run: BytesMut,
    ready: VecDeque<Bytes>,
}

impl Chunks {
    /// Move the run (if any) to the ready chunks. Later runs of this reply keep using
    /// the rest of the allocation; it is freed once every chunk cut from it is sent.
    fn cut(&mut self) {
        if !self.run.is_empty() {
            self.ready.push_back(self.run.split().freeze());
        }
    }
}

impl WireBuf for Chunks {
    type Run = BytesMut;

    fn run(&mut self) -> &mut BytesMut {
        &mut self.run
    }

    fn put_shared(&mut self, bytes: &Bytes) {
        if bytes.len() < SHARE_MIN {
            self.run.put_slice(bytes);
        } else {
            self.cut();
            self.ready.push_back(bytes.clone());
        }
    }
}

/// One reply as a length-prefixed gRPC message, taken chunk by chunk
/// ([`Framed::next_chunk`]); the concatenated chunks are the prefix and
/// [`WireMessage::encode_raw`]'s bytes.
#[derive(Debug)]
pub(crate) struct Framed<T> {
    reply: T,
    next_part: usize,
    chunks: Chunks,
}

impl<T: WireMessage> Framed<T> {
    /// The message for `reply`, or the reply's length if it is over `max` bytes.
    pub(crate) fn new(reply: T, max: usize) -> Result<Self, usize> {
        let len = reply.encoded_len();
        if len > max || u32::try_from(len).is_err() {
            return Err(len);
        }
        // Sized for the whole message when it is small (one allocation, no growth);
        // a bigger one reuses or replaces the allocation run by run.
        let mut run = BytesMut::with_capacity((PREFIX_LEN + len).min(RUN_MAX));
        run.put_u8(0);
        run.put_u32(len as u32);
        Ok(Framed {
            reply,
            next_part: 0,
            chunks: Chunks {
                run,
                ready: VecDeque::new(),
            },
        })
    }

    /// The next chunk, encoding parts until one is ready; `None` once all are taken.
    pub(crate) fn next_chunk(&mut self) -> Option<Bytes> {
        let parts = self.reply.parts();
        while self.chunks.ready.is_empty() && self.next_part < parts {
            self.reply.put_part(self.next_part, &mut self.chunks);
            self.next_part += 1;
            if self.chunks.run.len() >= RUN_MAX || self.next_part == parts {
                self.chunks.cut();
            }
        }
        self.chunks.ready.pop_front()
    }

    /// All chunks (tests).
    #[cfg(test)]
    pub(crate) fn into_chunks(mut self) -> Vec<Bytes> {
        std::iter::from_fn(|| self.next_chunk()).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A reply that borrows another's parts, so a test can frame it and keep it.
    struct ByRef<'a, T>(&'a T);

    impl<T: WireMessage> WireMessage for ByRef<'_, T> {
        fn encoded_len(&self) -> usize {
            self.0.encoded_len()
        }
        fn parts(&self) -> usize {
            self.0.parts()
        }
        fn put_part(&self, part: usize, buf: &mut impl WireBuf) {
            self.0.put_part(part, buf);
        }
    }

    /// `reply`'s chunks are the gRPC prefix and `encoded` (its `Vec` encoding), every
    /// body of at least [`SHARE_MIN`] bytes among `bodies` goes out as the shared bytes
    /// themselves, not a copy.
    pub(crate) fn check_framed<'a>(
        reply: &impl WireMessage,
        encoded: &[u8],
        bodies: impl Iterator<Item = &'a Bytes>,
    ) {
        let chunks = Framed::new(ByRef(reply), usize::MAX).unwrap().into_chunks();
        let mut expected = vec![0];
        expected.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        expected.extend_from_slice(encoded);
        assert_eq!(chunks.concat(), expected);
        assert!(chunks.iter().all(|c| !c.is_empty()));
        for body in bodies.filter(|b| b.len() >= SHARE_MIN) {
            assert!(
                chunks
                    .iter()
                    .any(|c| c.as_ptr() == body.as_ptr() && c.len() == body.len()),
                "a {}-byte body was copied",
                body.len()
            );
        }
    }

    struct Runs(usize);

    impl WireMessage for Runs {
        fn encoded_len(&self) -> usize {
            self.0 * 100
        }
        fn parts(&self) -> usize {
            self.0
        }
        fn put_part(&self, _part: usize, buf: &mut impl WireBuf) {
            buf.run().put_slice(&[1; 100]);
        }
    }

    #[test]
    fn small_parts_are_cut_into_runs_of_about_run_max() {
        let chunks = Framed::new(Runs(1000), usize::MAX).unwrap().into_chunks();
        assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), 5 + 100_000);
        assert!(chunks.len() >= 100_000 / (RUN_MAX + 100));
        assert!(chunks.iter().all(|c| c.len() < RUN_MAX + 100));
    }

    #[test]
    fn a_reply_over_the_limit_is_refused_with_its_length() {
        assert_eq!(Framed::new(Runs(11), 1000).err(), Some(1100));
        assert!(Framed::new(Runs(10), 1000).is_ok());
    }
}
