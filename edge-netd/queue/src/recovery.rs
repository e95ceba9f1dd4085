//! Opening a queue directory: read the ack log, scan every segment, truncate a torn tail,
//! set corrupt bytes aside, delete fully acked segments, rewrite the ack log compactly.
//!
//! Recovery never fails because of what is *in* the files: anything unreadable is counted
//! and copied to `corrupt/`. It fails only when the directory itself cannot be used.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{
    io::Storage,
    record::{
        self, ACK_ENTRY, AckKind, DeadLetter, FRAME_HEADER, FrameAt, SEGMENT_MAGIC,
        decode_dead_letter, decode_message,
    },
    state::{Entry, SegMeta},
};

pub(crate) const ACK_LOG: &str = "acks.log";
pub(crate) const DEAD_LETTER_LOG: &str = "deadletter.log";
pub(crate) const LOCK_FILE: &str = "lock";
pub(crate) const CORRUPT_DIR: &str = "corrupt";

pub(crate) fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("seg-{no:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A live message found on disk.
pub(crate) struct RecoveredEntry {
    pub(crate) rank: u8,
    pub(crate) class: String,
    pub(crate) entry: Entry,
}

pub(crate) struct Recovered {
    pub(crate) entries: Vec<RecoveredEntry>,
    pub(crate) segments: BTreeMap<u64, SegMeta>,
    pub(crate) next_id: u64,
    pub(crate) next_seg: u64,
    pub(crate) corrupt_skipped: u64,
    pub(crate) corrupt_bytes: u64,
    pub(crate) torn_tail_bytes: u64,
    pub(crate) ack_file: File,
    pub(crate) ack_len: u64,
    pub(crate) dead_letters: VecDeque<DeadLetter>,
    pub(crate) dl_file: File,
    pub(crate) dl_len: u64,
}

/// What a segment scan found.
#[derive(Default)]
struct Scan {
    /// (offset, frame length, payload decoded)
    messages: Vec<(u64, u32, crate::message::Message)>,
    /// Byte ranges that are not records, to be set aside.
    corrupt: Vec<(usize, usize)>,
    /// Offset to truncate the file to (a torn tail), if any.
    truncate_at: Option<usize>,
}

/// Walk one segment image. A bad region followed by a valid frame is corruption (skipped,
/// set aside); a bad region running to the end of the *last* segment is a torn tail from an
/// interrupted write (truncated: no waiter was ever told it was durable).
fn scan_segment(data: &[u8], is_last: bool) -> Scan {
    let mut scan = Scan::default();
    let mut pos = SEGMENT_MAGIC.len();
    while pos < data.len() {
        match record::frame_at(data, pos) {
            FrameAt::Valid(len) => {
                match decode_message(&data[pos + FRAME_HEADER..pos + len]) {
                    Ok(m) => scan.messages.push((pos as u64, len as u32, m)),
                    // Checksum fine but content unparseable: same treatment as corruption.
                    Err(_) => scan.corrupt.push((pos, pos + len)),
                }
                pos += len;
            }
            FrameAt::Incomplete | FrameAt::Invalid => match record::resync(data, pos + 1) {
                Some(next) => {
                    scan.corrupt.push((pos, next));
                    pos = next;
                }
                None => {
                    if is_last {
                        scan.truncate_at = Some(pos);
                    } else {
                        scan.corrupt.push((pos, data.len()));
                    }
                    break;
                }
            },
        }
    }
    scan
}

/// Copy bad bytes into `corrupt/`; the name is deterministic so a re-open does not multiply
/// copies of the same region.
fn set_aside(dir: &Path, seg: u64, offset: usize, bytes: &[u8]) {
    let cdir = dir.join(CORRUPT_DIR);
    let path = cdir.join(format!("seg-{seg:020}-at-{offset}.bin"));
    let res = fs::create_dir_all(&cdir).and_then(|_| fs::write(&path, bytes));
    match res {
        Ok(()) => {
            warn!(segment = seg, offset, len = bytes.len(), path = %path.display(), "corrupt queue bytes skipped and set aside")
        }
        Err(error) => {
            warn!(segment = seg, offset, %error, "corrupt queue bytes skipped; could not set them aside")
        }
    }
}

/// Write a fresh ack log (high-water mark + one entry per acked id still on disk) via a
/// temporary file and an atomic rename, then open it for appending.
pub(crate) fn rewrite_ack_log(
    dir: &Path,
    storage: &dyn Storage,
    high_water: u64,
    acked: impl Iterator<Item = u64>,
) -> io::Result<(File, u64)> {
    let tmp = dir.join(format!("{ACK_LOG}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut buf = Vec::new();
    buf.extend_from_slice(&record::encode_ack(AckKind::HighWater, high_water));
    for id in acked {
        buf.extend_from_slice(&record::encode_ack(AckKind::Delivered, id));
    }
    let mut f = storage.create(&tmp)?;
    storage.write_all(&mut f, &buf)?;
    storage.sync_data(&f)?;
    drop(f);
    fs::rename(&tmp, dir.join(ACK_LOG))?;
    storage.sync_dir(dir)?;
    let f = OpenOptions::new().append(true).open(dir.join(ACK_LOG))?;
    Ok((f, buf.len() as u64))
}

/// Read the ack log: the set of finished ids and the id high-water mark. Bad entries are
/// skipped (the only cost of a lost ack is a resend), a partial last entry is ignored.
fn read_ack_log(dir: &Path) -> io::Result<(HashSet<u64>, u64)> {
    let data = match fs::read(dir.join(ACK_LOG)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut acked = HashSet::new();
    let mut high_water = 0;
    let mut bad = 0;
    for entry in data.chunks_exact(ACK_ENTRY) {
        match record::decode_ack(entry) {
            Some((AckKind::HighWater, id)) => high_water = high_water.max(id),
            Some((_, id)) => {
                acked.insert(id);
            }
            None => bad += 1,
        }
    }
    if bad > 0 {
        warn!(
            bad,
            "ack log entries failed their checksum; those messages may be resent"
        );
    }
    Ok((acked, high_water))
}

fn read_dead_letters(dir: &Path, keep: usize) -> io::Result<(VecDeque<DeadLetter>, usize)> {
    let data = match fs::read(dir.join(DEAD_LETTER_LOG)) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut out = VecDeque::new();
    let mut total = 0;
    let mut pos = 0;
    while pos < data.len() {
        match record::frame_at(&data, pos) {
            FrameAt::Valid(len) => {
                if let Ok(d) = decode_dead_letter(&data[pos + FRAME_HEADER..pos + len]) {
                    total += 1;
                    if out.len() == keep {
                        out.pop_front();
                    }
                    out.push_back(d);
                }
                pos += len;
            }
            _ => match record::resync(&data, pos + 1) {
                Some(next) => pos = next,
                None => break,
            },
        }
    }
    Ok((out, total))
}

pub(crate) fn recover(
    dir: &Path,
    storage: &dyn Storage,
    dead_letter_keep: usize,
) -> io::Result<Recovered> {
    let (acked, high_water) = read_ack_log(dir)?;

    let mut seg_nos: Vec<u64> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(no) = entry.file_name().to_str().and_then(parse_segment_name) {
            seg_nos.push(no);
        }
    }
    seg_nos.sort_unstable();
    let last = seg_nos.last().copied();

    let mut out_entries = Vec::new();
    let mut segments = BTreeMap::new();
    let mut max_id = 0;
    let (mut corrupt_skipped, mut corrupt_bytes, mut torn_tail_bytes) = (0u64, 0u64, 0u64);
    let mut removed_any = false;

    for &no in &seg_nos {
        let path = segment_path(dir, no);
        let data = fs::read(&path)?;
        let is_last = Some(no) == last;
        if data.len() < SEGMENT_MAGIC.len() || &data[..SEGMENT_MAGIC.len()] != SEGMENT_MAGIC {
            if is_last && SEGMENT_MAGIC.starts_with(&data) {
                // Created but its header never reached the disk: a torn birth.
                torn_tail_bytes += data.len() as u64;
            } else {
                corrupt_skipped += 1;
                corrupt_bytes += data.len() as u64;
                set_aside(dir, no, 0, &data);
            }
            fs::remove_file(&path)?;
            removed_any = true;
            continue;
        }
        let scan = scan_segment(&data, is_last);
        for &(from, to) in &scan.corrupt {
            corrupt_skipped += 1;
            corrupt_bytes += (to - from) as u64;
            set_aside(dir, no, from, &data[from..to]);
        }
        let mut len = data.len() as u64;
        if let Some(at) = scan.truncate_at {
            torn_tail_bytes += (data.len() - at) as u64;
            info!(
                segment = no,
                offset = at,
                bytes = data.len() - at,
                "truncating torn tail of the queue log"
            );
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(at as u64)?;
            f.sync_all()?;
            len = at as u64;
        }
        let mut meta = SegMeta {
            bytes: len,
            ..SegMeta::default()
        };
        // Liveness is counted when the entries are indexed; here only to find empty files.
        let mut live = 0u64;
        for (offset, frame_len, m) in scan.messages {
            max_id = max_id.max(m.id);
            if acked.contains(&m.id) {
                meta.acked.push(m.id);
                continue;
            }
            live += 1;
            out_entries.push(RecoveredEntry {
                rank: m.rank,
                class: m.class,
                entry: Entry {
                    id: m.id,
                    seg: no,
                    offset,
                    len: frame_len,
                    expires_at: m.expires_at_ms,
                    attempts: 0,
                },
            });
        }
        if live == 0 {
            fs::remove_file(&path)?;
            removed_any = true;
        } else {
            segments.insert(no, meta);
        }
    }
    if removed_any {
        storage.sync_dir(dir)?;
    }

    let max_acked = acked.iter().copied().max().unwrap_or(0);
    let next_id = high_water.max(max_id + 1).max(max_acked + 1).max(1);
    let (ack_file, ack_len) = rewrite_ack_log(
        dir,
        storage,
        next_id,
        segments.values().flat_map(|s| s.acked.iter().copied()),
    )?;

    let (dead_letters, dl_total) = read_dead_letters(dir, dead_letter_keep)?;
    let dl_path = dir.join(DEAD_LETTER_LOG);
    if dl_total > dead_letter_keep.saturating_mul(2) {
        // Bound the file: keep only what is listed.
        let tmp = dir.join(format!("{DEAD_LETTER_LOG}.tmp"));
        let mut f = File::create(&tmp)?;
        for d in &dead_letters {
            f.write_all(&record::encode_dead_letter(d))?;
        }
        f.sync_data()?;
        fs::rename(&tmp, &dl_path)?;
        storage.sync_dir(dir)?;
    }
    let dl_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&dl_path)?;
    let dl_len = dl_file.metadata()?.len();

    Ok(Recovered {
        entries: out_entries,
        segments,
        next_id,
        next_seg: last.map_or(1, |l| l + 1),
        corrupt_skipped,
        corrupt_bytes,
        torn_tail_bytes,
        ack_file,
        ack_len,
        dead_letters,
        dl_file,
        dl_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_parse_only_when_well_formed() {
        assert_eq!(parse_segment_name("seg-00000000000000000042.log"), Some(42));
        assert_eq!(parse_segment_name("seg-42.log"), None);
        assert_eq!(parse_segment_name("acks.log"), None);
    }

    #[test]
    fn scan_treats_garbage_at_the_end_of_the_last_segment_as_a_torn_tail() {
        let mut data = SEGMENT_MAGIC.to_vec();
        data.extend_from_slice(&record::frame(b"\x09not a message"));
        let good_end = data.len();
        data.extend_from_slice(&[0u8; 100]);
        let scan = scan_segment(&data, true);
        assert_eq!(scan.truncate_at, Some(good_end));
        // The frame's payload is not a message: corruption, not a torn tail.
        assert_eq!(scan.corrupt, vec![(8, good_end)]);
        let scan = scan_segment(&data, false);
        assert_eq!(scan.truncate_at, None);
        assert_eq!(scan.corrupt.len(), 2);
    }
}
