use std::{
    fs::File,
    io,
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use super::*;
use crate::{QueueError, Storage};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

/// Real file system, except that the next N calls of a kind fail with a chosen errno.
#[derive(Default)]
struct Faulty {
    writes: AtomicU32,
    syncs: AtomicU32,
    creates: AtomicU32,
    errno: AtomicU32,
}

impl Faulty {
    fn fail(counter: &AtomicU32, errno: &AtomicU32) -> io::Result<()> {
        if counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::from_raw_os_error(
                errno.load(Ordering::SeqCst) as i32
            ));
        }
        Ok(())
    }
    fn arm(&self, counter: &AtomicU32, n: u32, errno: i32) {
        self.errno.store(errno as u32, Ordering::SeqCst);
        counter.store(n, Ordering::SeqCst);
    }
}

impl Storage for Faulty {
    fn create(&self, path: &Path) -> io::Result<File> {
        Self::fail(&self.creates, &self.errno)?;
        StdStorage.create(path)
    }
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        if self.writes.load(Ordering::SeqCst) > 0 {
            // A short write first, as a filling disk does, then the error.
            StdStorage.write_all(file, &buf[..buf.len() / 2])?;
        }
        Self::fail(&self.writes, &self.errno)?;
        StdStorage.write_all(file, buf)
    }
    fn sync_data(&self, file: &File) -> io::Result<()> {
        Self::fail(&self.syncs, &self.errno)?;
        StdStorage.sync_data(file)
    }
}

fn setup() -> (tempfile::TempDir, Arc<ManualClock>, Arc<Faulty>, Queue) {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let faulty = Arc::new(Faulty::default());
    let q = open_with(QueueConfig::new(dir.path()), &clock, faulty.clone());
    (dir, clock, faulty, q)
}

#[tokio::test]
async fn enospc_on_write_fails_the_enqueue_with_507_and_the_queue_keeps_working() {
    let (dir, clock, faulty, q) = setup();
    let before = q.enqueue(msg("bulk", 2, b"before")).await.unwrap().id;
    faulty.arm(&faulty.writes, 1, ENOSPC);
    let err = q.enqueue(msg("bulk", 2, b"refused")).await.unwrap_err();
    assert!(matches!(err, QueueError::DiskFull(_)), "{err}");
    assert_eq!(err.http_status(), 507);
    let after = q.enqueue(msg("bulk", 2, b"after")).await.unwrap().id;
    assert_eq!(q.stats().write_errors, 1);
    assert_eq!(ids(&drain(&q)), vec![before, after]);
    drop(q);
    // The half-written record was cut off: nothing corrupt, nothing extra after restart.
    let q = open(dir.path(), &clock);
    assert_eq!(ids(&drain(&q)), vec![before, after]);
    assert_eq!(q.stats().corrupt_skipped, 0);
}

#[tokio::test]
async fn eio_on_fsync_fails_the_enqueue_and_later_enqueues_succeed() {
    let (dir, clock, faulty, q) = setup();
    let before = q.enqueue(msg("bulk", 2, b"before")).await.unwrap().id;
    faulty.arm(&faulty.syncs, 1, EIO);
    let err = q.enqueue(msg("bulk", 2, b"maybe")).await.unwrap_err();
    assert!(matches!(err, QueueError::Io(_)), "{err}");
    assert_eq!(err.http_status(), 503);
    let after = q.enqueue(msg("bulk", 2, b"after")).await.unwrap().id;
    drop(q);
    let q = open(dir.path(), &clock);
    let got = ids(&drain(&q));
    assert!(got.contains(&before) && got.contains(&after), "{got:?}");
}

#[tokio::test]
async fn enospc_when_creating_a_segment_is_an_error_and_a_retry_succeeds() {
    let (_dir, _clock, faulty, q) = setup();
    faulty.arm(&faulty.creates, 2, ENOSPC);
    for _ in 0..2 {
        assert!(matches!(
            q.enqueue(msg("bulk", 2, b"x")).await,
            Err(QueueError::DiskFull(_))
        ));
    }
    q.enqueue(msg("bulk", 2, b"x")).await.unwrap();
    assert_eq!(drain(&q).len(), 1);
}

#[tokio::test]
async fn reads_and_acks_keep_working_while_every_write_fails() {
    let (dir, clock, faulty, q) = setup();
    for i in 0..4u8 {
        q.enqueue(msg("bulk", 2, &[i])).await.unwrap();
    }
    faulty.arm(&faulty.writes, u32::MAX, EIO);
    assert!(q.enqueue(msg("bulk", 2, b"x")).await.is_err());
    let got = drain(&q);
    assert_eq!(got.len(), 4);
    assert!(q.ack(got[0].id));
    // The ack could not be written: flush says so, and the queue still answers.
    assert!(q.flush().await.is_err());
    assert_eq!(q.stats().delivered, 1);
    faulty.arm(&faulty.writes, 0, EIO);
    assert!(q.ack(got[1].id));
    // Once the disk is back, the lost ack is rewritten from memory.
    q.flush().await.unwrap();
    drop(q);
    let q = open(dir.path(), &clock);
    assert_eq!(ids(&drain(&q)), ids(&got[2..]));
}
