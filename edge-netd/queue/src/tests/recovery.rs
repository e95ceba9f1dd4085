use std::{fs, io::Write};

use super::*;
use crate::{OpenError, QueueConfig};

#[tokio::test]
async fn recovery_truncates_torn_tail_and_keeps_every_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    for i in 0..3u8 {
        q.enqueue(msg("bulk", 2, &[i; 100])).await.unwrap();
    }
    drop(q);
    let seg = segment_files(dir.path()).pop().unwrap();
    let good_len = fs::metadata(&seg).unwrap().len();
    // Half a record: what a crash in the middle of a write leaves behind.
    let whole = fs::read(&seg).unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&whole[8..60]).unwrap();
    drop(f);

    let q = open(dir.path(), &clock);
    assert_eq!(fs::metadata(&seg).unwrap().len(), good_len);
    let got = drain(&q);
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].body, vec![2u8; 100]);
    let s = q.stats();
    assert_eq!(s.torn_tail_bytes, 52);
    assert_eq!(s.corrupt_skipped, 0);
}

#[tokio::test]
async fn recovery_skips_a_corrupt_middle_record_counts_it_and_sets_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    let mut accepted = Vec::new();
    for b in [b'a', b'b', b'c'] {
        accepted.push(q.enqueue(msg("bulk", 2, &[b; 64])).await.unwrap().id);
    }
    drop(q);
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut data = fs::read(&seg).unwrap();
    let at = data.windows(64).position(|w| w == [b'b'; 64]).unwrap();
    data[at + 10] ^= 0xff;
    fs::write(&seg, &data).unwrap();

    let q = open(dir.path(), &clock);
    let got = drain(&q);
    assert_eq!(ids(&got), vec![accepted[0], accepted[2]]);
    let s = q.stats();
    assert_eq!(s.corrupt_skipped, 1);
    assert!(s.corrupt_bytes > 64);
    let aside: Vec<_> = fs::read_dir(dir.path().join("corrupt")).unwrap().collect();
    assert_eq!(aside.len(), 1);
    let kept = fs::read(aside[0].as_ref().unwrap().path()).unwrap();
    assert!(kept.windows(50).any(|w| w == [b'b'; 50]));
    // Still writable, and new ids are past the damaged one.
    let next = q.enqueue(msg("bulk", 2, b"d")).await.unwrap();
    assert!(next.id > accepted[2]);
}

#[tokio::test]
async fn acks_nacks_and_dead_letters_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    let mut all_ids = Vec::new();
    for i in 0..6u8 {
        all_ids.push(q.enqueue(msg("bulk", 2, &[i])).await.unwrap().id);
    }
    let batch = q.next_batch(&all, 4);
    assert_eq!(ids(&batch), all_ids[..4]);
    assert!(q.ack(batch[0].id));
    assert!(q.dead_letter(batch[1].id, Some(400), "rejected by receiver"));
    assert!(q.nack(batch[2].id));
    // batch[3] stays in flight across the restart: at-least-once hands it out again.
    assert!(
        !q.ack(batch[0].id),
        "a second ack of the same id is refused"
    );
    drop(q);

    let q = open(dir.path(), &clock);
    let got = drain(&q);
    assert_eq!(ids(&got), all_ids[2..]);
    let dl = q.dead_letters();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].id, all_ids[1]);
    assert_eq!(dl[0].status, Some(400));
    assert_eq!(dl[0].service, "telemetry");
    assert_eq!(dl[0].reason, "rejected by receiver");
    assert!(dl[0].idempotency_key.starts_with("mq-"));
}

#[tokio::test]
async fn segment_files_are_deleted_once_all_their_records_are_acked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut config = QueueConfig::new(dir.path());
    config.segment_bytes = 4096;
    let q = open_with(config.clone(), &clock, Arc::new(StdStorage));
    for _ in 0..20 {
        q.enqueue(msg("bulk", 2, &[7; 1000])).await.unwrap();
    }
    let segs = segment_files(dir.path()).len();
    assert!(segs >= 5, "{segs} segments");
    let got = drain(&q);
    // Ack all but the last record: every segment but the active one goes.
    for m in &got[..19] {
        assert!(q.ack(m.id));
    }
    q.flush().await.unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(q.stats().segments, 1);
    assert!(q.ack(got[19].id));
    drop(q);
    // The last one goes at the next open, and nothing comes back.
    let q = open_with(config, &clock, Arc::new(StdStorage));
    assert!(segment_files(dir.path()).is_empty());
    assert!(drain(&q).is_empty());
}

#[tokio::test]
async fn ids_stay_monotonic_after_every_segment_was_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    let first = q.enqueue(msg("bulk", 2, b"x")).await.unwrap().id;
    let m = drain(&q);
    assert!(q.ack(m[0].id));
    drop(q);
    let q = open(dir.path(), &clock);
    assert!(segment_files(dir.path()).is_empty());
    drop(q);
    let q = open(dir.path(), &clock);
    let second = q.enqueue(msg("bulk", 2, b"y")).await.unwrap().id;
    assert!(second > first);
}

#[test]
fn a_second_open_of_a_locked_directory_fails_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let _q = open(dir.path(), &clock);
    let err = Queue::open(QueueConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn a_segment_with_a_garbage_header_is_set_aside_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    q.enqueue(msg("bulk", 2, b"keep")).await.unwrap();
    drop(q);
    fs::write(
        dir.path().join("seg-00000000000000000000.log"),
        b"not a segment at all",
    )
    .unwrap();
    let q = open(dir.path(), &clock);
    assert_eq!(drain(&q).len(), 1);
    assert_eq!(q.stats().corrupt_skipped, 1);
    assert!(
        dir.path()
            .join("corrupt")
            .read_dir()
            .unwrap()
            .next()
            .is_some()
    );
}
