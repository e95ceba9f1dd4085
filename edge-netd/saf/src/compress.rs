//! When and how a body is zstd-compressed before it leaves.
//!
//! Invariant: a body is sent compressed only with `Content-Encoding: zstd` and only when
//! it got smaller; the receiver (Envoy's zstd decompressor) restores the exact bytes.

/// Content types that are already compressed: zstd would spend CPU for nothing.
const COMPRESSED_TYPES: &[&str] = &[
    "image/",
    "video/",
    "audio/",
    "application/zip",
    "application/gzip",
    "application/x-gzip",
    "application/zstd",
    "application/x-xz",
    "application/x-bzip2",
    "application/x-7z-compressed",
    "application/vnd.apache.parquet",
];

/// Whether to try compressing a body with these replayed headers.
pub(crate) fn should_compress(headers: &[(String, String)], len: usize, min: usize) -> bool {
    if len < min {
        return false;
    }
    let mut ok = true;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-encoding") {
            // Already encoded by the app (gzip, br, ...): zstd over it gains nothing, and a
            // second encoding would need a second decompressor in the cloud.
            ok = false;
        } else if name.eq_ignore_ascii_case("content-type") {
            let v = value.trim().to_ascii_lowercase();
            // SVG is text under an image/ type.
            if !v.starts_with("image/svg") && COMPRESSED_TYPES.iter().any(|t| v.starts_with(t)) {
                ok = false;
            }
        }
    }
    ok
}

/// Compress; `None` when the result is not at least 5% smaller (then the raw body is sent
/// and the receiver saves the decode).
pub(crate) fn compress(body: &[u8], level: i32) -> Option<Vec<u8>> {
    let out = zstd::bulk::compress(body, level).ok()?;
    (out.len() < body.len() - body.len() / 20).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: &str, v: &str) -> Vec<(String, String)> {
        vec![(n.to_string(), v.to_string())]
    }

    #[test]
    fn tiny_encoded_and_precompressed_bodies_are_not_compressed() {
        assert!(!should_compress(&[], 100, 256));
        assert!(should_compress(
            &h("content-type", "application/json"),
            1000,
            256
        ));
        assert!(!should_compress(
            &h("Content-Type", "image/jpeg"),
            1000,
            256
        ));
        assert!(should_compress(
            &h("content-type", "image/svg+xml"),
            1000,
            256
        ));
        assert!(!should_compress(&h("content-encoding", "gzip"), 1000, 256));
    }

    #[test]
    fn incompressible_bodies_stay_raw_and_text_round_trips() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                // xorshift64: statistically random enough that zstd finds nothing.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress(&noise, 3).is_none());
        let text = br#"{"speed":12.5,"rpm":2100}"#.repeat(50);
        let z = compress(&text, 9).unwrap();
        assert_eq!(zstd::decode_all(&z[..]).unwrap(), text);
    }
}
