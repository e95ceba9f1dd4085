//! The credential on disk: `tls.cert` and `tls.key`, replaced together, crash-safe.
//!
//! Invariant: edge-netd never leaves a certificate and a key that are not a pair where it
//! would use them, whatever instant it dies at. Writing a new pair:
//!
//! 1. `key.new` (mode 0600) and `cert.new` are written and fsync'd;
//! 2. `key.new` is renamed over `key`, then `cert.new` over `cert`;
//! 3. the directories are fsync'd (the renames are durable).
//!
//! A crash leaves one of these states, which [`recover`] settles before anything is
//! read:
//!
//! | on disk | meaning | recovery |
//! |---|---|---|
//! | `key.new`, `cert.new` a pair | died before or between the renames' start | roll forward: rename both |
//! | `cert.new` only, the pair of `key` | died between the two renames | roll forward: rename `cert.new` |
//! | staged files that are not a pair (torn, or `key.new` alone) | died while writing | delete them: the old pair is intact |
//!
//! And [`super::cert::check`] refuses any pair that still does not match, so even a
//! state nobody foresaw is never used (it is re-enrolled from, if a claim is held).
//!
//! `key.pending` (0600) holds the key of a claim enrolment in progress, written before
//! its CSR is sent and reused until a certificate is installed: misaki-cp answers a
//! claim only while the vehicle holds no live certificate, except a retry with the key
//! of the one it issued (the answer was lost), which gets that certificate again. A new
//! key per attempt would lock the vehicle out until the lost certificate expires.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::cert::is_pair;

/// Where the credential lives (`tls.cert`, `tls.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Paths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `path` + `suffix`.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `path` + `.new`: where a file is staged before it replaces `path`.
pub(crate) fn staged(path: &Path) -> PathBuf {
    suffixed(path, ".new")
}

/// `key` + `.pending`: the key of a claim enrolment in progress.
pub(crate) fn pending(paths: &Paths) -> PathBuf {
    suffixed(&paths.key, ".pending")
}

/// The key of a claim enrolment in progress, if one was saved.
pub(crate) fn read_pending_key(paths: &Paths) -> io::Result<Option<String>> {
    read_opt(&pending(paths))
}

/// Save the key of a claim enrolment before its CSR is sent (0600, fsync'd).
pub(crate) fn save_pending_key(paths: &Paths, key_pem: &str) -> io::Result<()> {
    make_dirs(paths)?;
    let path = pending(paths);
    let tmp = suffixed(&path, ".tmp");
    write_synced(&tmp, key_pem.as_bytes(), 0o600)?;
    fs::rename(&tmp, &path)?;
    sync_dirs(paths)
}

/// Forget the pending key (its certificate is installed).
pub(crate) fn clear_pending_key(paths: &Paths) -> io::Result<()> {
    remove_opt(&pending(paths))
}

fn make_dirs(paths: &Paths) -> io::Result<()> {
    for p in [&paths.cert, &paths.key] {
        if let Some(dir) = parent(p) {
            fs::DirBuilder::new().recursive(true).create(dir)?;
        }
    }
    Ok(())
}

/// The credential files as read (after [`recover`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OnDisk {
    pub cert_pem: String,
    pub key_pem: String,
    /// When the certificate file was last written: about when it was issued (renewal
    /// is scheduled from it, see `schedule::start`).
    pub written: Option<SystemTime>,
}

fn read_opt(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn remove_opt(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Settle what a crash during [`save`] left (table above). Returns whether a staged
/// pair was rolled forward.
pub(crate) fn recover(paths: &Paths) -> io::Result<bool> {
    let (key_new, cert_new) = (staged(&paths.key), staged(&paths.cert));
    let staged_key = read_opt(&key_new)?;
    let staged_cert = read_opt(&cert_new)?;
    let rolled = match (&staged_key, &staged_cert) {
        (Some(k), Some(c)) if is_pair(c, k) => {
            fs::rename(&key_new, &paths.key)?;
            fs::rename(&cert_new, &paths.cert)?;
            true
        }
        (None, Some(c)) if read_opt(&paths.key)?.is_some_and(|k| is_pair(c, &k)) => {
            fs::rename(&cert_new, &paths.cert)?;
            true
        }
        _ => false,
    };
    if rolled {
        sync_dirs(paths)?;
    }
    // What was not rolled forward is a torn write: the installed pair stands.
    remove_opt(&key_new)?;
    remove_opt(&cert_new)?;
    Ok(rolled)
}

/// The installed pair, if both files exist.
pub(crate) fn read(paths: &Paths) -> io::Result<Option<OnDisk>> {
    let (Some(cert_pem), Some(key_pem)) = (read_opt(&paths.cert)?, read_opt(&paths.key)?) else {
        return Ok(None);
    };
    let written = fs::metadata(&paths.cert)?.modified().ok();
    Ok(Some(OnDisk {
        cert_pem,
        key_pem,
        written,
    }))
}

/// Write a new pair (steps 1-3 above). The key is 0600 from its first byte on.
pub(crate) fn save(paths: &Paths, cert_pem: &str, key_pem: &str) -> io::Result<()> {
    make_dirs(paths)?;
    let (key_new, cert_new) = (staged(&paths.key), staged(&paths.cert));
    write_synced(&key_new, key_pem.as_bytes(), 0o600)?;
    write_synced(&cert_new, cert_pem.as_bytes(), 0o644)?;
    fs::rename(&key_new, &paths.key)?;
    fs::rename(&cert_new, &paths.cert)?;
    sync_dirs(paths)
}

/// `path` with `bytes`, mode `mode` (also when it existed with another), fsync'd.
fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // A leftover file keeps its old mode through `open`: set it before any byte lands.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn parent(p: &Path) -> Option<&Path> {
    p.parent().filter(|d| !d.as_os_str().is_empty())
}

/// fsync the directories of both files, so the renames survive a power cut.
fn sync_dirs(paths: &Paths) -> io::Result<()> {
    let key_dir = parent(&paths.key).unwrap_or(Path::new("."));
    let cert_dir = parent(&paths.cert).unwrap_or(Path::new("."));
    fs::File::open(key_dir)?.sync_all()?;
    if cert_dir != key_dir {
        fs::File::open(cert_dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Each crash window of [`save`], built on disk directly, then [`recover`] + [`read`]:
    //! the pair read is always a pair, and the newest complete one.
    use super::super::testkit::TestCa;
    use super::*;
    use std::time::Duration;

    const CAR1: &str = "spiffe://misaki.local/vehicle/car-1";

    struct Disk {
        _dir: tempfile::TempDir,
        paths: Paths,
        old: (String, String),
        new: (String, String),
    }

    /// The old pair installed; a new pair at hand.
    fn disk() -> Disk {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            cert: dir.path().join("tls/cert.pem"),
            key: dir.path().join("tls/key.pem"),
        };
        let ca = TestCa::new();
        let day = Duration::from_secs(86_400);
        let (old, new) = (ca.issue_now(CAR1, day), ca.issue_now(CAR1, day));
        save(&paths, &old.0, &old.1).unwrap();
        Disk {
            _dir: dir,
            paths,
            old,
            new,
        }
    }

    impl Disk {
        fn put(&self, path: &Path, text: &str) {
            fs::write(path, text).unwrap();
        }

        /// After recovery: the installed pair, and no staged file left.
        fn settled(&self) -> (String, String) {
            recover(&self.paths).unwrap();
            for p in [staged(&self.paths.cert), staged(&self.paths.key)] {
                assert!(!p.exists(), "{} left behind", p.display());
            }
            let d = read(&self.paths).unwrap().expect("a pair");
            (d.cert_pem, d.key_pem)
        }
    }

    #[test]
    fn save_installs_a_pair_with_the_key_0600_and_leaves_nothing_staged() {
        let d = disk();
        // A leftover staged key with a loose mode must not lend it to the new key.
        d.put(&staged(&d.paths.key), "junk");
        fs::set_permissions(staged(&d.paths.key), fs::Permissions::from_mode(0o644)).unwrap();
        save(&d.paths, &d.new.0, &d.new.1).unwrap();
        let mode = fs::metadata(&d.paths.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(d.settled(), d.new);
        assert!(is_pair(&d.new.0, &d.new.1));
        let on = read(&d.paths).unwrap().unwrap();
        assert!(on.written.is_some());
    }

    #[test]
    fn died_after_staging_both_rolls_forward() {
        let d = disk();
        d.put(&staged(&d.paths.key), &d.new.1);
        d.put(&staged(&d.paths.cert), &d.new.0);
        assert!(recover(&d.paths).unwrap(), "rolled forward");
        assert_eq!(d.settled(), d.new);
    }

    #[test]
    fn died_between_the_two_renames_rolls_the_certificate_forward() {
        let d = disk();
        // key.new already renamed over key: key and cert are NOT a pair on disk now.
        d.put(&d.paths.key, &d.new.1);
        d.put(&staged(&d.paths.cert), &d.new.0);
        assert!(!is_pair(&d.old.0, &d.new.1));
        assert_eq!(d.settled(), d.new);
    }

    #[test]
    fn died_while_staging_keeps_the_old_pair() {
        // Only the key staged.
        let d = disk();
        d.put(&staged(&d.paths.key), &d.new.1);
        assert_eq!(d.settled(), d.old);
        // Both staged, the certificate torn.
        let d = disk();
        d.put(&staged(&d.paths.key), &d.new.1);
        d.put(&staged(&d.paths.cert), &d.new.0[..d.new.0.len() / 2]);
        assert_eq!(d.settled(), d.old);
        // Both staged, the key torn.
        let d = disk();
        d.put(&staged(&d.paths.key), &d.new.1[..40]);
        d.put(&staged(&d.paths.cert), &d.new.0);
        assert_eq!(d.settled(), d.old);
    }

    #[test]
    fn a_mismatched_pair_nobody_can_roll_forward_is_read_but_never_a_credential() {
        // key renamed, cert.new lost (a disk that dropped it): recovery cannot help,
        // and the pair is refused by the check every credential passes.
        let d = disk();
        d.put(&d.paths.key, &d.new.1);
        let (cert, key) = d.settled();
        assert_eq!((&cert, &key), (&d.old.0, &d.new.1));
        let e = super::super::cert::check(&cert, &key, "", "car-1", std::time::SystemTime::now());
        assert_eq!(e.unwrap_err(), super::super::cert::Unusable::KeyMismatch);
    }

    #[test]
    fn nothing_on_disk_is_none_and_a_pending_key_comes_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        assert!(!recover(&paths).unwrap());
        assert_eq!(read(&paths).unwrap(), None);
        assert_eq!(read_pending_key(&paths).unwrap(), None);
        save_pending_key(&paths, "KEY").unwrap();
        let mode = fs::metadata(pending(&paths)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_pending_key(&paths).unwrap().as_deref(), Some("KEY"));
        clear_pending_key(&paths).unwrap();
        clear_pending_key(&paths).unwrap();
        assert_eq!(read_pending_key(&paths).unwrap(), None);
    }
}
