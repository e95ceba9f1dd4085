//! Shared mode (`--store etcd://HOST:PORT[,HOST:PORT...]`): the policy kept in etcd,
//! applied like `kubectl apply` (`misaki-cp policy apply|history|rollback`) and watched
//! by every replica (`serve --store`).
//!
//! Key layout, all under `/misaki/policy/`:
//!
//! | key                                   | value                                        |
//! |---------------------------------------|----------------------------------------------|
//! | `/misaki/policy/current`              | the policy in force: a JSON [`Record`]       |
//! | `/misaki/policy/revisions/NNNNNNNN`   | every applied revision, the same record; the number zero-padded to 8 digits so keys sort by it |
//!
//! A [`Record`] is `{"revision", "version", "applied_at_unix", "source", "files":
//! [{"name", "text"}]}`: misaki's own revision number (1, 2, …; not etcd's), the
//! content hash of the parsed policy (`policy_state::policy_version`, what `/policy`
//! and vehicles show), when and from where it was applied, and the YAML text of each
//! file (one for a file, several for a directory; parsed as `load_path` parses a
//! directory). Revisions live in their own keys, so etcd compaction never loses them;
//! the newest [`KEEP`] are kept.
//!
//! Invariants:
//! - Nothing is written unless the policy validates (`apply` checks with the same
//!   parser and the same located errors as `validate`).
//! - One apply is one etcd transaction: `current`, the new revision's key and the
//!   deletion of revisions older than the newest [`KEEP`]. It commits only if
//!   `current` has not changed since it was read (its `mod_revision`) and the new
//!   revision's key does not exist yet; otherwise it re-reads and retries, so two
//!   concurrent applies both land, one after the other, or one fails with
//!   [`StoreError::Contended`]. Nothing is lost.
//! - Applying the policy already current (same content hash) writes nothing.
//! - A replica treats a value of `current` that does not decode or parse like a bad
//!   file edit: rejected with its errors on `/policy`, the last good policy serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, WatchOptions,
};
use misaki_policy::{ErrorKind, Policy, PolicyError, PolicyErrors};
use serde::{Deserialize, Serialize};

use crate::cli::{StoreTls, StoreUrl};
use crate::policy_state::{PolicyState, policy_version};

/// The policy in force.
pub const CURRENT: &str = "/misaki/policy/current";
/// Prefix of the numbered revisions.
pub const REVISIONS: &str = "/misaki/policy/revisions/";
/// Revisions kept (older ones are deleted by the apply that makes a newer one).
pub const KEEP: u64 = 50;
/// Applies that lost the race for `current` are retried this many times in all.
const ATTEMPTS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("invalid policy, nothing written:\n{0}")]
    Invalid(PolicyErrors),
    #[error("{key}: not a misaki policy record: {why}")]
    BadRecord { key: String, why: String },
    #[error("revision {0} is not in the history (see `misaki-cp policy history`)")]
    NoSuchRevision(u64),
    #[error("{CURRENT} kept changing under this apply; gave up after {ATTEMPTS} attempts")]
    Contended,
    #[error("{}: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the watch on {CURRENT} ended: {0}")]
    WatchEnded(String),
}

impl StoreError {
    /// A problem with what the operator passed (exit 64), not a failure of etcd.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            StoreError::Invalid(_) | StoreError::NoSuchRevision(_) | StoreError::TlsFile { .. }
        )
    }
}

/// One policy file as stored: its name (no directory) and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyFile {
    pub name: String,
    pub text: String,
}

/// The value of `current` and of each revision key (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub revision: u64,
    pub version: String,
    pub applied_at_unix: u64,
    pub source: String,
    pub files: Vec<PolicyFile>,
}

impl Record {
    /// Bytes of policy text.
    pub fn size(&self) -> usize {
        self.files.iter().map(|f| f.text.len()).sum()
    }

    /// Parse the stored files, errors named `etcd:KEY@REVISION/FILE:line:col`.
    pub fn parse(&self, key: &str) -> Result<Policy, PolicyErrors> {
        parse_files(&format!("etcd:{key}@{}", self.revision), false, &self.files)
    }
}

/// The key of revision `n`.
pub fn revision_key(n: u64) -> String {
    format!("{REVISIONS}{n:08}")
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new revision is current.
    New { revision: u64, version: String },
    /// The policy was already current: nothing written.
    Unchanged { revision: u64, version: String },
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Applied::New { revision, version } => {
                write!(f, "applied: revision {revision}, version {version}")
            }
            Applied::Unchanged { revision, version } => write!(
                f,
                "unchanged: revision {revision} (version {version}) is already current"
            ),
        }
    }
}

/// `*.yaml` / `*.yml`, not hidden, not an editor leftover: the files `load_path` reads
/// from a directory.
fn is_policy_file_name(name: &str) -> bool {
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    let stem = |ext: &str| lower.strip_suffix(ext).is_some_and(|s| !s.is_empty());
    stem(".yaml") || stem(".yml")
}

fn whole_error(file: &str, message: impl Into<String>) -> PolicyErrors {
    PolicyErrors(vec![PolicyError {
        file: file.to_string(),
        line: 0,
        column: 0,
        path: String::new(),
        message: message.into(),
        kind: ErrorKind::Io,
    }])
}

/// Read a policy file, or a directory's policy files, as they will be stored.
pub fn read_files(path: &Path) -> Result<Vec<PolicyFile>, PolicyErrors> {
    let shown = path.display().to_string();
    let read = |p: &Path, name: String| {
        std::fs::read_to_string(p)
            .map(|text| PolicyFile { name, text })
            .map_err(|e| whole_error(&p.display().to_string(), format!("cannot read: {e}")))
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| whole_error(&shown, format!("cannot read the policy: {e}")))?;
    if !meta.is_dir() {
        let name = path
            .file_name()
            .map_or_else(|| shown.clone(), |n| n.to_string_lossy().into_owned());
        return Ok(vec![read(path, name)?]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| whole_error(&shown, format!("cannot list the directory: {e}")))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| whole_error(&shown, format!("cannot list: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let p = entry.path();
        if is_policy_file_name(&name) && std::fs::metadata(&p).map_or(true, |m| m.is_file()) {
            names.push(name);
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|name| read(&path.join(&name), name))
        .collect()
}

/// Parse stored files as one policy: one file as `parse` does (named `shown` when
/// `single_is_shown`, else `shown/NAME`); several as `load_path` loads a directory,
/// through a private temporary directory, errors renamed to `shown/NAME`.
pub fn parse_files(
    shown: &str,
    single_is_shown: bool,
    files: &[PolicyFile],
) -> Result<Policy, PolicyErrors> {
    if let Some(bad) = files
        .iter()
        .find(|f| !is_policy_file_name(&f.name) || f.name.contains('/'))
    {
        return Err(whole_error(
            shown,
            format!("{:?} is not a policy file name (NAME.yaml)", bad.name),
        ));
    }
    match files {
        [] => Err(whole_error(shown, "no policy files (*.yaml, *.yml)")),
        [one] if single_is_shown => misaki_policy::parse(shown, &one.text),
        [one] => misaki_policy::parse(&format!("{shown}/{}", one.name), &one.text),
        several => {
            static SEQ: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "misaki-cp-policy-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let tmp = dir.display().to_string();
            let written = std::fs::create_dir_all(&dir).and_then(|()| {
                several
                    .iter()
                    .try_for_each(|f| std::fs::write(dir.join(&f.name), &f.text))
            });
            let loaded = match written {
                Ok(()) => misaki_policy::load_path(&dir),
                Err(e) => Err(whole_error(shown, format!("cannot stage the files: {e}"))),
            };
            let _ = std::fs::remove_dir_all(&dir);
            loaded.map_err(|mut errors| {
                for e in &mut errors.0 {
                    if let Some(rest) = e.file.strip_prefix(&tmp) {
                        e.file = format!("{shown}{rest}");
                    }
                }
                errors
            })
        }
    }
}

/// A connection to etcd (cheap to clone).
#[derive(Clone)]
pub struct Store {
    client: Client,
    url: StoreUrl,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

impl Store {
    /// Connect (lazily: a down etcd fails the first request, not this); over TLS when
    /// `tls` names a CA. Unreadable TLS files fail here.
    pub async fn connect(url: &StoreUrl, tls: &StoreTls) -> Result<Store, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let mut endpoints = url.0.clone();
        if let Some(ca) = &tls.store_ca {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|source| StoreError::TlsFile {
                    path: path.clone(),
                    source,
                })
            };
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&tls.store_cert, &tls.store_key) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(config);
            endpoints = endpoints
                .iter()
                .map(|e| e.replacen("http://", "https://", 1))
                .collect();
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: url.to_string(),
                source,
            })?;
        Ok(Store {
            client,
            url: url.clone(),
        })
    }

    /// The etcd client (cheap to clone) and the URL it was made from.
    pub fn client(&self) -> (Client, StoreUrl) {
        (self.client.clone(), self.url.clone())
    }

    fn etcd(&self) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
        |source| StoreError::Etcd {
            endpoints: self.url.to_string(),
            source,
        }
    }

    /// The record at `key`; `None` if absent. Also its etcd `mod_revision` (0 if absent).
    async fn get(
        &self,
        key: &str,
    ) -> Result<(Option<Result<Record, StoreError>>, i64), StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(self.etcd())?;
        Ok(match resp.kvs().first() {
            Some(kv) => (Some(decode(key, kv.value())), kv.mod_revision()),
            None => (None, 0),
        })
    }

    /// The highest revision number with a key, 0 if none.
    async fn last_revision(&self) -> Result<u64, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let resp = self
            .client
            .kv_client()
            .get(REVISIONS, Some(options))
            .await
            .map_err(self.etcd())?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.key()).ok())
            .and_then(|k| k.strip_prefix(REVISIONS)?.parse().ok())
            .unwrap_or(0))
    }

    /// Validate the policy at `path` and make it current (see the module docs).
    pub async fn apply_path(&self, path: &Path) -> Result<Applied, StoreError> {
        let shown = path.display().to_string();
        let is_file = !path.is_dir();
        let (files, policy) = {
            let path = path.to_path_buf();
            let name = shown.clone();
            tokio::task::spawn_blocking(move || {
                let files = read_files(&path)?;
                let policy = parse_files(&name, is_file, &files)?;
                Ok((files, policy))
            })
            .await
            .unwrap_or_else(|e| Err(whole_error(&shown, format!("parser panicked: {e}"))))
            .map_err(StoreError::Invalid)?
        };
        let source = std::fs::canonicalize(path).map_or(shown, |p| p.display().to_string());
        self.commit(files, policy_version(&policy), source).await
    }

    /// Make revision `revision`'s text current again, as a new revision.
    pub async fn rollback(&self, revision: u64) -> Result<Applied, StoreError> {
        let key = revision_key(revision);
        let record = match self.get(&key).await? {
            (Some(r), _) => r?,
            (None, _) => return Err(StoreError::NoSuchRevision(revision)),
        };
        // Re-checked with this binary's parser: a rollback is an apply like any other.
        let policy = record.parse(&key).map_err(StoreError::Invalid)?;
        let source = format!("rollback to revision {revision} ({})", record.source);
        self.commit(record.files, policy_version(&policy), source)
            .await
    }

    /// Every kept revision, newest first.
    pub async fn history(&self) -> Result<Vec<Record>, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend);
        let resp = self
            .client
            .kv_client()
            .get(REVISIONS, Some(options))
            .await
            .map_err(self.etcd())?;
        resp.kvs()
            .iter()
            .map(|kv| decode(&String::from_utf8_lossy(kv.key()), kv.value()))
            .collect()
    }

    /// Write `files` (already validated, content hash `version`) as the next revision,
    /// unless that content is already current.
    async fn commit(
        &self,
        files: Vec<PolicyFile>,
        version: String,
        source: String,
    ) -> Result<Applied, StoreError> {
        for attempt in 1..=ATTEMPTS {
            let (current, mod_revision) = self.get(CURRENT).await?;
            let current = current.and_then(Result::ok);
            if let Some(c) = current.as_ref().filter(|c| c.version == version) {
                return Ok(Applied::Unchanged {
                    revision: c.revision,
                    version,
                });
            }
            let last = self.last_revision().await?;
            let revision = last.max(current.map_or(0, |c| c.revision)) + 1;
            let applied_at_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let record = Record {
                revision,
                version: version.clone(),
                applied_at_unix,
                source: source.clone(),
                files: files.clone(),
            };
            let value = serde_json::to_vec(&record).map_err(|e| StoreError::BadRecord {
                key: CURRENT.into(),
                why: e.to_string(),
            })?;
            let key = revision_key(revision);
            let mut ops = vec![
                TxnOp::put(CURRENT, value.clone(), None),
                TxnOp::put(key.clone(), value, None),
            ];
            if revision > KEEP {
                let end = revision_key(revision - KEEP + 1);
                ops.push(TxnOp::delete(
                    revision_key(0),
                    Some(DeleteOptions::new().with_range(end)),
                ));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(CURRENT, CompareOp::Equal, mod_revision),
                    Compare::create_revision(key, CompareOp::Equal, 0),
                ])
                .and_then(ops);
            let resp = self
                .client
                .kv_client()
                .txn(txn)
                .await
                .map_err(self.etcd())?;
            if resp.succeeded() {
                return Ok(Applied::New { revision, version });
            }
            tracing::info!(attempt, "another apply changed {CURRENT} first; retrying");
            let jitter = rand::random_range(5..50u64);
            tokio::time::sleep(Duration::from_millis(jitter * u64::from(attempt))).await;
        }
        Err(StoreError::Contended)
    }

    /// Follow `current` into `state` until `shutdown` resolves: read it, then watch it
    /// from the next etcd revision; after an error, start over (with backoff).
    pub async fn follow(self, state: PolicyState, shutdown: impl std::future::Future<Output = ()>) {
        let attempt = || self.follow_once(&state);
        retrying(shutdown, Duration::from_secs(5), attempt, |error, backoff| {
            let meanwhile = match state.waiting_for() {
                Some(_) => "not ready until it has a policy",
                None => "the current policy keeps serving",
            };
            tracing::warn!(%error, ?backoff, "following the policy in etcd; retrying ({meanwhile})");
        })
        .await;
    }

    async fn follow_once(
        &self,
        state: &PolicyState,
    ) -> Result<std::convert::Infallible, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(CURRENT, None)
            .await
            .map_err(self.etcd())?;
        let at = resp.header().map_or(0, |h| h.revision());
        match resp.kvs().first() {
            Some(kv) => load_into(state, kv.value().to_vec(), &self.url).await,
            None => tracing::info!(
                key = CURRENT,
                "no policy in etcd yet (misaki-cp policy apply FILE --store {})",
                self.url
            ),
        }
        let options = WatchOptions::new().with_start_revision(at + 1);
        let mut stream = self
            .client
            .watch_client()
            .watch(CURRENT, Some(options))
            .await
            .map_err(self.etcd())?;
        loop {
            let Some(resp) = stream.message().await.map_err(self.etcd())? else {
                return Err(StoreError::WatchEnded("etcd closed the stream".into()));
            };
            if resp.canceled() {
                return Err(StoreError::WatchEnded(resp.cancel_reason().to_string()));
            }
            for event in resp.events() {
                match (event.event_type(), event.kv()) {
                    (EventType::Put, Some(kv)) => {
                        load_into(state, kv.value().to_vec(), &self.url).await;
                    }
                    _ => tracing::warn!(
                        key = CURRENT,
                        "the policy key was deleted in etcd; the current policy keeps serving"
                    ),
                }
            }
        }
    }

    /// Keep etcd's policy in step with the file or directory `path` (`serve --store
    /// --policy`): apply it now (retrying while etcd is unreachable) and after every
    /// edit. A bad edit is recorded on `state` as rejected and not applied.
    pub async fn push_file(
        self,
        path: PathBuf,
        state: PolicyState,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), crate::watcher::WatchError> {
        let push = || {
            let (store, path, state) = (self.clone(), path.clone(), state.clone());
            async move {
                let mut backoff = Duration::from_millis(200);
                loop {
                    match store.apply_path(&path).await {
                        Ok(applied) => {
                            tracing::info!(path = %path.display(), "{applied}");
                            return;
                        }
                        Err(StoreError::Invalid(errors)) => {
                            state.apply(Err(errors));
                            return;
                        }
                        Err(error) => {
                            tracing::warn!(%error, ?backoff, path = %path.display(), "cannot apply the policy file to etcd; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            }
        };
        let is_dir = path.is_dir();
        let dirs = [if is_dir {
            path.clone()
        } else {
            crate::watcher::parent(&path).to_path_buf()
        }];
        let filter = path.clone();
        crate::watcher::follow_from_now(
            &dirs,
            move |ev| crate::watcher::relevant(&filter, is_dir, ev),
            push,
            shutdown,
        )
        .await
    }
}

fn decode(key: &str, value: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::BadRecord {
        key: key.to_string(),
        why: e.to_string(),
    })
}

/// Decode and parse a value of `current` and apply it to `state` (a bad one is
/// recorded as a rejected edit).
async fn load_into(state: &PolicyState, value: Vec<u8>, url: &StoreUrl) {
    let loaded = tokio::task::spawn_blocking(move || {
        let record = decode(CURRENT, &value)
            .map_err(|e| whole_error(&format!("etcd:{CURRENT}"), e.to_string()))?;
        let policy = record.parse(CURRENT)?;
        Ok((record, policy))
    })
    .await
    .unwrap_or_else(|e| Err(whole_error(CURRENT, format!("parser panicked: {e}"))));
    match loaded {
        Ok((record, policy)) => {
            let source = format!(
                "{url}{CURRENT} revision {} (from {})",
                record.revision, record.source
            );
            state.apply_from(Ok(policy), Some(source));
        }
        Err(errors) => {
            state.apply(Err(errors));
        }
    }
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .map_or_else(|| secs.to_string(), crate::ca::utc)
}

/// Run `attempt` (which only ends with an error) again and again until `shutdown`,
/// with `report` told of each error and a backoff from 200 ms doubling up to `max`.
pub(crate) async fn retrying<F, Fut>(
    shutdown: impl std::future::Future<Output = ()>,
    max: Duration,
    attempt: F,
    report: impl Fn(&StoreError, Duration),
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<std::convert::Infallible, StoreError>>,
{
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            result = attempt() => {
                let Err(error) = result;
                report(&error, backoff);
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// `misaki-cp policy …`: what to print on success.
pub async fn run_command(cmd: &crate::cli::PolicyCommand) -> Result<String, StoreError> {
    use crate::cli::PolicyCommand;
    match cmd {
        PolicyCommand::Apply { path, store } => {
            let store = Store::connect(&store.store, &store.tls).await?;
            Ok(store.apply_path(path).await?.to_string())
        }
        PolicyCommand::Rollback { revision, store } => {
            let store = Store::connect(&store.store, &store.tls).await?;
            Ok(store.rollback(*revision).await?.to_string())
        }
        PolicyCommand::History { store } => {
            let store = Store::connect(&store.store, &store.tls).await?;
            let history = store.history().await?;
            let mut out = format!(
                "{:>8}  {:<16}  {:<20}  {:>8}  SOURCE",
                "REVISION", "VERSION", "APPLIED (UTC)", "BYTES"
            );
            for r in &history {
                out.push_str(&format!(
                    "\n{:>8}  {:<16}  {:<20}  {:>8}  {}",
                    r.revision,
                    r.version,
                    utc(r.applied_at_unix),
                    r.size(),
                    r.source
                ));
            }
            if history.is_empty() {
                out.push_str("\n(no revisions: nothing applied yet)");
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_sort_by_number() {
        assert_eq!(revision_key(42), "/misaki/policy/revisions/00000042");
        assert!(revision_key(9) < revision_key(10));
    }

    #[test]
    fn stored_file_names_are_checked() {
        let files = [PolicyFile {
            name: "../x.yaml".into(),
            text: String::new(),
        }];
        let e = parse_files("etcd:k@1", false, &files).unwrap_err();
        assert!(e.to_string().contains("not a policy file name"), "{e}");
    }
}
