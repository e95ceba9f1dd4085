//! Re-reading the TLS files, and closing connections that stopped being valid.
//!
//! The directories holding the files are watched (rename-safe, like the policy: tools
//! replace certificates by renaming, Kubernetes by swapping a `..data` symlink). After
//! a change the whole set is loaded again; a set that loads replaces the one in force
//! for new handshakes, and every live connection's client certificate is verified
//! again under it. Connections are also checked for expiry every [`EXPIRY_SWEEP`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::conn::LiveConns;
use super::{Loaded, Metrics, TlsFiles, load};
use crate::watcher::{self, WatchError};

/// How often live connections are checked for an expired client certificate.
const EXPIRY_SWEEP: Duration = Duration::from_secs(15);
/// A rotation writes several files (key, certificate, CA) one after another; waiting
/// this long after the first lets one reload see them all.
const SETTLE: Duration = Duration::from_millis(100);

/// Follow the files until `shutdown`.
pub(super) async fn run(
    files: TlsFiles,
    current: watch::Sender<Arc<Loaded>>,
    live: LiveConns,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WatchError> {
    let mut dirs: Vec<PathBuf> = files
        .all()
        .map(|p| watcher::parent(p).to_path_buf())
        .collect();
    dirs.sort();
    dirs.dedup();
    let names: Vec<OsString> = files
        .all()
        .filter_map(|p| p.file_name().map(OsString::from))
        .collect();
    let relevant = move |ev: &notify::Event| {
        ev.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                names.iter().any(|w| w == n) || n.to_string_lossy().starts_with("..")
            })
        })
    };
    let sweeper = tokio::spawn(sweep_expired(live.clone(), current.subscribe()));
    let on_change = || reload(&files, &current, &live, &metrics);
    info!(files = ?files.all().collect::<Vec<_>>(), "watching TLS files");
    let result = watcher::follow(&dirs, relevant, on_change, shutdown).await;
    sweeper.abort();
    result
}

async fn reload(
    files: &TlsFiles,
    current: &watch::Sender<Arc<Loaded>>,
    live: &LiveConns,
    metrics: &Metrics,
) {
    tokio::time::sleep(SETTLE).await;
    let f = files.clone();
    let loaded = tokio::task::spawn_blocking(move || load(&f))
        .await
        .expect("TLS load task panicked");
    let loaded = match loaded {
        Ok(l) => l,
        Err(error) => {
            metrics.reload("error");
            warn!(%error, "TLS files not reloaded; the previous certificates stay in force");
            return;
        }
    };
    let (same, same_trust) = {
        let old = current.borrow();
        (
            loaded.fingerprint == old.fingerprint,
            loaded.trust_fingerprint == old.trust_fingerprint,
        )
    };
    if same {
        return;
    }
    let verifier = loaded.verifier.clone();
    current.send_replace(Arc::new(loaded));
    metrics.reload("ok");
    info!("TLS files reloaded; new handshakes use them");
    if same_trust {
        return;
    }
    let live = live.clone();
    let closed = tokio::task::spawn_blocking(move || live.recheck(verifier.as_ref()))
        .await
        .expect("TLS recheck task panicked");
    if closed > 0 {
        info!(
            closed,
            "closed connections whose certificates the new CA/CRL refuses"
        );
    }
}

/// Close connections whose certificate expired, every [`EXPIRY_SWEEP`], until the
/// configuration's sender is dropped.
async fn sweep_expired(live: LiveConns, mut current: watch::Receiver<Arc<Loaded>>) {
    let mut tick = tokio::time::interval(EXPIRY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = current.changed() => if changed.is_err() { return },
        }
        let closed = live.expire();
        if closed > 0 {
            info!(
                closed,
                "closed connections whose client certificate expired"
            );
        }
    }
}
