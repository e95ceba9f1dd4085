//! Live policy: watch the policy file or directory and apply every edit.
//!
//! The parent directory (for a file) or the directory itself is watched, not the file:
//! editors that save by writing a temp file and renaming it over the original replace
//! the inode, and a watch on the old inode would go quiet. Events are coalesced over a
//! short quiet window so one save (truncate + write + rename) is one reload.
//!
//! [`follow`] is that loop for any set of files; the TLS files use it too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::policy_state::PolicyState;

/// Events closer together than this are one edit.
const QUIET: Duration = Duration::from_millis(5);
/// A steady stream of events still reloads at least this often.
const MAX_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Notify {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// How soon an event lets us reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// The file is complete (renamed into place, or closed after writing).
    Now,
    /// The file may still be being written.
    AfterQuiet,
}

fn urgency(kind: &EventKind) -> Option<Urgency> {
    match kind {
        // A created file is usually still empty; its writer's close follows.
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        | EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Urgency::Now),
        EventKind::Access(_) => None,
        _ => Some(Urgency::AfterQuiet),
    }
}

pub(crate) fn relevant(policy: &Path, is_dir: bool, event: &notify::Event) -> bool {
    event.paths.iter().any(|p| {
        if is_dir {
            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        } else {
            p.file_name() == policy.file_name()
        }
    })
}

/// Watch `path` and apply edits to `state` until `shutdown` resolves.
pub async fn run(
    path: PathBuf,
    state: PolicyState,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WatchError> {
    let is_dir = path.is_dir();
    let watched = if is_dir {
        path.clone()
    } else {
        parent(&path).to_path_buf()
    };
    let filter_path = path.clone();
    tracing::info!(path = %path.display(), "watching policy");
    let reload = || {
        let p = path.clone();
        let state = state.clone();
        async move {
            let loaded = tokio::task::spawn_blocking(move || misaki_policy::load_path(&p))
                .await
                .expect("policy load task panicked");
            state.apply(loaded);
        }
    };
    follow(
        &[watched],
        move |ev| relevant(&filter_path, is_dir, ev),
        reload,
        shutdown,
    )
    .await
}

/// The directory holding `file` (`.` for a bare file name).
pub(crate) fn parent(file: &Path) -> &Path {
    file.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Watch `dirs` (not recursively) and call `reload` once per save: for each burst of
/// events `relevant` keeps, coalesced as described at the top of this module. Returns
/// when `shutdown` resolves.
pub(crate) async fn follow<R, F>(
    dirs: &[PathBuf],
    relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
    reload: R,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WatchError>
where
    R: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    follow_inner(dirs, relevant, reload, shutdown, false).await
}

/// [`follow`], with one `reload` as soon as the watch is in place (so no edit made
/// during that first reload is missed).
pub(crate) async fn follow_from_now<R, F>(
    dirs: &[PathBuf],
    relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
    reload: R,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WatchError>
where
    R: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    follow_inner(dirs, relevant, reload, shutdown, true).await
}

async fn follow_inner<R, F>(
    dirs: &[PathBuf],
    relevant: impl Fn(&notify::Event) -> bool + Send + 'static,
    mut reload: R,
    shutdown: impl std::future::Future<Output = ()>,
    reload_first: bool,
) -> Result<(), WatchError>
where
    R: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    let (tx, mut rx) = mpsc::unbounded_channel();
    let notify_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WatchError::Notify { path, source }
    };
    let first = dirs.first().map_or(Path::new("."), PathBuf::as_path);
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if let Some(u) = urgency(&ev.kind).filter(|_| relevant(&ev)) {
                    let _ = tx.send(u);
                }
            }
            Err(error) => tracing::warn!(%error, "file watch error"),
        })
        .map_err(notify_err(first))?;
    for dir in dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(notify_err(dir))?;
    }

    tokio::pin!(shutdown);
    if reload_first {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            () = reload() => {}
        }
    }
    loop {
        let mut urgency = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            ev = rx.recv() => match ev {
                Some(u) => u,
                None => return Ok(()),
            },
        };
        // An in-place write: wait until the writer has gone quiet (or says it is done).
        let deadline = tokio::time::Instant::now() + MAX_DELAY;
        while urgency == Urgency::AfterQuiet {
            let quiet = deadline.min(tokio::time::Instant::now() + QUIET);
            match tokio::time::timeout_at(quiet, rx.recv()).await {
                Ok(Some(u)) => urgency = u,
                Ok(None) | Err(_) => break,
            }
        }
        // Whatever else is queued is part of this save.
        while rx.try_recv().is_ok() {}
        reload().await;
    }
}
