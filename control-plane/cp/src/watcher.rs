//! Live policy: watch the policy file or directory and apply every edit.
//!
//! The parent directory (for a file) or the directory itself is watched, not the file:
//! editors that save by writing a temp file and renaming it over the original replace
//! the inode, and a watch on the old inode would go quiet. Events are coalesced over a
//! short quiet window so one save (truncate + write + rename) is one reload.

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

fn relevant(policy: &Path, is_dir: bool, event: &notify::Event) -> bool {
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
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let filter_path = path.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(ev) => {
                if let Some(u) = urgency(&ev.kind).filter(|_| relevant(&filter_path, is_dir, &ev)) {
                    let _ = tx.send(u);
                }
            }
            Err(error) => tracing::warn!(%error, "policy watch error"),
        })
        .map_err(|source| WatchError::Notify {
            path: watched.clone(),
            source,
        })?;
    watcher
        .watch(&watched, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: watched.clone(),
            source,
        })?;
    tracing::info!(path = %path.display(), "watching policy");

    tokio::pin!(shutdown);
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
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || misaki_policy::load_path(&p))
            .await
            .expect("policy load task panicked");
        state.apply(loaded);
    }
}
