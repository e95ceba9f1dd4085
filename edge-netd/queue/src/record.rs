//! Byte layout of everything the queue writes: segment frames, message payloads, ack-log
//! entries and dead-letter entries. Pure functions, no I/O, so the format can be tested alone.

use crate::message::{Destination, Message};

/// First bytes of every segment file; a file without them is not ours (or was torn at birth).
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"MSKQSEG1";
/// First bytes of every frame; lets recovery find the next record after a corrupt one.
pub(crate) const FRAME_MAGIC: [u8; 4] = *b"MQR1";
/// magic(4) + payload length(4) + crc(4).
pub(crate) const FRAME_HEADER: usize = 12;
/// Sanity bound for a length field read back from disk (a larger value is corruption).
pub(crate) const MAX_PAYLOAD: usize = 512 << 20;

/// Payload kind byte of a message record.
const KIND_MESSAGE: u8 = 1;
/// Offset of the message id inside a frame (after the header and the kind byte); the id is
/// patched in under the queue lock so ids are allocated in file order.
pub(crate) const FRAME_ID_OFFSET: usize = FRAME_HEADER + 1;

/// Size of one ack-log entry: crc(4) + kind(1) + id(8).
pub(crate) const ACK_ENTRY: usize = 13;

/// Why a message left the queue; stored in the ack log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AckKind {
    /// Not an ack: "ids below this were used"; keeps ids monotonic across compactions.
    HighWater = 0,
    Delivered = 1,
    Expired = 2,
    Evicted = 3,
    DeadLettered = 4,
    /// The record could not be read back (bit rot after recovery); dropped and counted.
    Unreadable = 5,
}

impl AckKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::HighWater,
            1 => Self::Delivered,
            2 => Self::Expired,
            3 => Self::Evicted,
            4 => Self::DeadLettered,
            5 => Self::Unreadable,
            _ => return None,
        })
    }
}

/// CRC32C over the length field and the payload, so a corrupted length is caught too.
pub(crate) fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload)
}

/// Fill in the checksum of a frame built by [`encode_message`] (done by the writer thread,
/// after the id was patched in, so the CPU cost stays off the request path's lock).
pub(crate) fn seal(frame: &mut [u8]) {
    let len_bytes: [u8; 4] = frame[4..8].try_into().expect("frame header");
    let crc = frame_crc(len_bytes, &frame[FRAME_HEADER..]);
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
}

pub(crate) fn set_frame_id(frame: &mut [u8], id: u64) {
    frame[FRAME_ID_OFFSET..FRAME_ID_OFFSET + 8].copy_from_slice(&id.to_le_bytes());
}

/// Wrap an already encoded payload into a sealed frame.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    seal(&mut out);
    out
}

/// The fields of a message record, borrowed for encoding.
pub(crate) struct MessageFields<'a> {
    pub(crate) enqueued_at_ms: u64,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) rank: u8,
    pub(crate) class: &'a str,
    pub(crate) key: &'a str,
    pub(crate) destination: &'a Destination,
    pub(crate) body: &'a [u8],
}

/// Exact frame size of a message, computed before encoding (for the budget check).
pub(crate) fn message_frame_len(f: &MessageFields<'_>) -> usize {
    let d = f.destination;
    FRAME_HEADER
        + 1
        + 8
        + 8
        + 8
        + 1
        + (1 + f.class.len())
        + (2 + f.key.len())
        + (2 + d.service.len())
        + (2 + d.method.len())
        + (2 + d.path.len())
        + 2
        + d.headers
            .iter()
            .map(|(n, v)| 4 + n.len() + v.len())
            .sum::<usize>()
        + 4
        + f.body.len()
}

/// Encode a message frame with id 0 and no checksum yet ([`set_frame_id`], [`seal`] follow).
/// String lengths must already be validated against their length prefixes.
pub(crate) fn encode_message(f: &MessageFields<'_>) -> Vec<u8> {
    let len = message_frame_len(f);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&((len - FRAME_HEADER) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&f.enqueued_at_ms.to_le_bytes());
    out.extend_from_slice(&f.expires_at_ms.unwrap_or(0).to_le_bytes());
    out.push(f.rank);
    put_str8(&mut out, f.class);
    put_str16(&mut out, f.key);
    let d = f.destination;
    put_str16(&mut out, &d.service);
    put_str16(&mut out, &d.method);
    put_str16(&mut out, &d.path);
    out.extend_from_slice(&(d.headers.len() as u16).to_le_bytes());
    for (n, v) in &d.headers {
        put_str16(&mut out, n);
        put_str16(&mut out, v);
    }
    out.extend_from_slice(&(f.body.len() as u32).to_le_bytes());
    out.extend_from_slice(f.body);
    debug_assert_eq!(out.len(), len);
    out
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A payload whose checksum matched but whose content does not parse: a bug or a newer
/// format. Treated like corruption by recovery.
#[derive(Debug, thiserror::Error)]
#[error("record payload does not parse: {0}")]
pub(crate) struct DecodeError(&'static str);

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError("truncated field"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, len: usize) -> Result<String, DecodeError> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
    }
    fn str8(&mut self) -> Result<String, DecodeError> {
        let n = self.u8()? as usize;
        self.string(n)
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        self.string(n)
    }
}

/// Decode a message payload (the bytes after the frame header).
pub(crate) fn decode_message(payload: &[u8]) -> Result<Message, DecodeError> {
    let mut c = Cursor { buf: payload };
    if c.u8()? != KIND_MESSAGE {
        return Err(DecodeError("unknown record kind"));
    }
    let id = c.u64()?;
    let enqueued_at_ms = c.u64()?;
    let expires = c.u64()?;
    let rank = c.u8()?;
    let class = c.str8()?;
    let idempotency_key = c.str16()?;
    let service = c.str16()?;
    let method = c.str16()?;
    let path = c.str16()?;
    let n_headers = c.u16()?;
    let mut headers = Vec::with_capacity(n_headers as usize);
    for _ in 0..n_headers {
        headers.push((c.str16()?, c.str16()?));
    }
    let body_len = c.u32()? as usize;
    let body = c.take(body_len)?.to_vec();
    if !c.buf.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(Message {
        id,
        idempotency_key,
        class,
        rank,
        enqueued_at_ms,
        expires_at_ms: (expires != 0).then_some(expires),
        destination: Destination {
            service,
            method,
            path,
            headers,
        },
        body,
        attempt: 0,
    })
}

/// Result of looking for a frame at a position of a segment image.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FrameAt {
    /// A valid frame of this total length.
    Valid(usize),
    /// Header is plausible but the frame runs past the end of the data (a torn write).
    Incomplete,
    /// Anything else: bad magic, absurd length, checksum mismatch.
    Invalid,
}

/// Check whether `data[pos..]` starts with a complete frame whose checksum matches.
pub(crate) fn frame_at(data: &[u8], pos: usize) -> FrameAt {
    let rest = &data[pos.min(data.len())..];
    if rest.len() < FRAME_HEADER {
        // A header cut short by the end of the file is a torn write if what is there agrees
        // with the magic.
        let n = rest.len().min(4);
        return if rest[..n] == FRAME_MAGIC[..n] {
            FrameAt::Incomplete
        } else {
            FrameAt::Invalid
        };
    }
    if rest[..4] != FRAME_MAGIC {
        return FrameAt::Invalid;
    }
    let len_bytes: [u8; 4] = rest[4..8].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_PAYLOAD {
        return FrameAt::Invalid;
    }
    if rest.len() < FRAME_HEADER + len {
        return FrameAt::Incomplete;
    }
    let crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
    if frame_crc(len_bytes, &rest[FRAME_HEADER..FRAME_HEADER + len]) != crc {
        return FrameAt::Invalid;
    }
    FrameAt::Valid(FRAME_HEADER + len)
}

/// Find the next position after `from` at which a valid frame starts.
pub(crate) fn resync(data: &[u8], from: usize) -> Option<usize> {
    let mut pos = from;
    while pos + FRAME_HEADER <= data.len() {
        let idx = data[pos..].windows(4).position(|w| w == FRAME_MAGIC)?;
        let candidate = pos + idx;
        if let FrameAt::Valid(_) = frame_at(data, candidate) {
            return Some(candidate);
        }
        pos = candidate + 1;
    }
    None
}

pub(crate) fn encode_ack(kind: AckKind, id: u64) -> [u8; ACK_ENTRY] {
    let mut out = [0u8; ACK_ENTRY];
    out[4] = kind as u8;
    out[5..13].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decode one ack-log entry; `None` when its checksum or kind is bad.
pub(crate) fn decode_ack(entry: &[u8]) -> Option<(AckKind, u64)> {
    let crc = u32::from_le_bytes(entry[..4].try_into().ok()?);
    if crc32c::crc32c(&entry[4..ACK_ENTRY]) != crc {
        return None;
    }
    let kind = AckKind::from_u8(entry[4])?;
    Some((kind, u64::from_le_bytes(entry[5..13].try_into().ok()?)))
}

/// A permanently failed message, as kept in the dead-letter list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub idempotency_key: String,
    pub class: String,
    pub service: String,
    pub method: String,
    pub path: String,
    /// The last HTTP status the destination answered, if it answered at all.
    pub status: Option<u16>,
    pub reason: String,
    /// When it was dead-lettered (unix ms).
    pub at_ms: u64,
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Dead-letter entries use the segment frame (magic, length, CRC32C) around this payload.
pub(crate) fn encode_dead_letter(d: &DeadLetter) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + d.reason.len() + d.path.len());
    p.extend_from_slice(&d.id.to_le_bytes());
    p.extend_from_slice(&d.at_ms.to_le_bytes());
    p.extend_from_slice(&d.status.unwrap_or(0).to_le_bytes());
    put_str8(&mut p, clip(&d.class, 255));
    for s in [
        &d.idempotency_key,
        &d.service,
        &d.method,
        &d.path,
        &d.reason,
    ] {
        put_str16(&mut p, clip(s, u16::MAX as usize));
    }
    frame(&p)
}

pub(crate) fn decode_dead_letter(payload: &[u8]) -> Result<DeadLetter, DecodeError> {
    let mut c = Cursor { buf: payload };
    let id = c.u64()?;
    let at_ms = c.u64()?;
    let status = c.u16()?;
    let class = c.str8()?;
    Ok(DeadLetter {
        id,
        at_ms,
        status: (status != 0).then_some(status),
        class,
        idempotency_key: c.str16()?,
        service: c.str16()?,
        method: c.str16()?,
        path: c.str16()?,
        reason: c.str16()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Destination, Vec<u8>) {
        (
            Destination {
                service: "telemetry".into(),
                method: "POST".into(),
                path: "/v1/upload".into(),
                headers: vec![("content-type".into(), "application/json".into())],
            },
            b"{\"speed\":42}".to_vec(),
        )
    }

    #[test]
    fn message_frame_round_trips_and_detects_a_flipped_bit() {
        let (dest, body) = sample();
        let f = MessageFields {
            enqueued_at_ms: 1_700_000_000_000,
            expires_at_ms: Some(1_700_000_060_000),
            rank: 2,
            class: "bulk",
            key: "k-1",
            destination: &dest,
            body: &body,
        };
        let mut frame = encode_message(&f);
        assert_eq!(frame.len(), message_frame_len(&f));
        set_frame_id(&mut frame, 77);
        seal(&mut frame);
        assert_eq!(frame_at(&frame, 0), FrameAt::Valid(frame.len()));
        let m = decode_message(&frame[FRAME_HEADER..]).unwrap();
        assert_eq!(m.id, 77);
        assert_eq!(m.class, "bulk");
        assert_eq!(m.destination, dest);
        assert_eq!(m.body, body);
        assert_eq!(m.expires_at_ms, Some(1_700_000_060_000));

        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert_eq!(frame_at(&frame, 0), FrameAt::Invalid);
        assert_eq!(frame_at(&frame[..20], 0), FrameAt::Incomplete);
    }

    #[test]
    fn resync_finds_the_next_valid_frame_after_garbage() {
        let a = frame(b"first");
        let b = frame(b"second");
        let mut data = a.clone();
        data.extend_from_slice(b"garbage with MQR1 inside");
        let at = data.len();
        data.extend_from_slice(&b);
        assert_eq!(resync(&data, 1), Some(at));
    }

    #[test]
    fn ack_entry_round_trips_and_rejects_corruption() {
        let mut e = encode_ack(AckKind::Evicted, 9);
        assert_eq!(decode_ack(&e), Some((AckKind::Evicted, 9)));
        e[7] ^= 0x10;
        assert_eq!(decode_ack(&e), None);
    }
}
