//! The write path's system calls, behind a trait so tests can inject ENOSPC/EIO.
//!
//! Only the calls whose failure the queue must survive go through here: creating a file,
//! appending, `fdatasync`, syncing a directory, truncating. Reads and recovery use std
//! directly: a read failure is handled as corruption, not as a write fault.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::Path,
};

/// File-system operations used by the writer thread.
pub trait Storage: Send + Sync + 'static {
    /// Create a new file for appending (fails if it exists).
    fn create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        file.write_all(buf)
    }
    /// `fdatasync`: data and the size needed to read it back.
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
    /// Make a created, renamed or removed directory entry durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdStorage;

impl Storage for StdStorage {}
