//! A simulated fleet: N streams over `conns` HTTP/2 connections, and the measurements
//! taken on it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::client::{self, ClientConfig, Shared, StreamRec, Target};

/// Live simulated streams; aborted (the server sees them reset) when dropped.
pub struct Fleet {
    pub shared: Arc<Shared>,
    pub recs: Vec<Arc<StreamRec>>,
    tasks: Vec<JoinHandle<()>>,
    /// Kept so shared connections outlive the tasks' clones (dropped last).
    _channels: Vec<Channel>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fleet {
    /// Open `n` streams named `{prefix}{i}`. `conns == 0` or `conns >= n` gives every
    /// stream its own connection, as Envoy does; otherwise streams are spread
    /// round-robin over `conns` shared connections (plaintext only: over mutual TLS
    /// a connection is one vehicle's).
    pub async fn connect(
        target: &Arc<Target>,
        cfg: Arc<ClientConfig>,
        n: usize,
        conns: usize,
        prefix: &str,
    ) -> Result<Fleet> {
        Fleet::connect_range(target, cfg, (prefix, 0..n), conns, Duration::ZERO).await
    }

    /// [`connect`](Self::connect) for streams `{prefix}{i}`, `i` in `ids`, each started
    /// after a delay drawn uniformly from `[0, spread)` (Envoys reconnecting after
    /// their control plane died: Envoy's first retry is jittered over 500 ms).
    pub async fn connect_range(
        target: &Arc<Target>,
        cfg: Arc<ClientConfig>,
        (prefix, ids): (&str, std::ops::Range<usize>),
        conns: usize,
        spread: Duration,
    ) -> Result<Fleet> {
        let n = ids.len();
        let shared = Arc::new(Shared::default());
        let per_stream = conns == 0 || conns >= n;
        if !per_stream && target.tls.is_some() {
            bail!("over mutual TLS every vehicle needs its own connection (conns 0)");
        }
        let mut channels = Vec::new();
        if !per_stream {
            for _ in 0..conns {
                channels.push(target.connect("").await?);
            }
        }
        let mut recs = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for (k, i) in ids.enumerate() {
            let rec = Arc::new(StreamRec::default());
            recs.push(rec.clone());
            let (cfg, shared, target) = (cfg.clone(), shared.clone(), target.clone());
            let node_id = format!("{prefix}{i}");
            let channel = (!per_stream).then(|| channels[k % channels.len()].clone());
            let delay = spread.mul_f64(unit(&node_id));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                client::run_with_retries(target, channel, cfg, node_id, rec, shared).await
            }));
        }
        Ok(Fleet {
            shared,
            recs,
            tasks,
            _channels: channels,
        })
    }

    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Wait until every stream is ready; fail on the first stream error, or when
    /// `alive` says the server died, or after `timeout`.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_failed()?;
            if self.shared.ready.load(Ordering::Acquire) >= self.len() {
                return Ok(());
            }
            alive()?;
            if Instant::now() > deadline {
                bail!(
                    "only {}/{} streams ready after {timeout:?}",
                    self.shared.ready.load(Ordering::Acquire),
                    self.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn check_failed(&self) -> Result<()> {
        let failed = self.shared.failed.load(Ordering::Acquire);
        if failed > 0 {
            let e = self.shared.last_error.lock().expect("last_error").clone();
            bail!(
                "{failed} stream(s) failed; last error: {}",
                e.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// After a change made at `t0_ns`: wait until every stream has received a response
    /// of type `must` (the type the change surely touches), then until no stream has
    /// received anything for `quiet`. Returns, per stream, the time from the change to
    /// the last response that arrived after it (every changed type has arrived).
    pub async fn settle_after(
        &self,
        t0_ns: u64,
        must: usize,
        quiet: Duration,
        timeout: Duration,
    ) -> Result<Vec<Duration>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_failed()?;
            let missing = self.recs.iter().filter(|r| r.last_ns(must) < t0_ns).count();
            if missing == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{missing}/{} streams never received the change ({}) within {timeout:?}",
                    self.len(),
                    client::SHORT[must]
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut seen = self.shared.responses.load(Ordering::Acquire);
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.shared.responses.load(Ordering::Acquire);
            if now == seen {
                break;
            }
            seen = now;
        }
        Ok(self
            .recs
            .iter()
            .map(|r| {
                let last = (0..client::N)
                    .map(|t| r.last_ns(t))
                    .filter(|ns| *ns >= t0_ns)
                    .max()
                    .unwrap_or(t0_ns);
                Duration::from_nanos(last - t0_ns)
            })
            .collect())
    }
}

/// A number in `[0, 1)` fixed by `key`, spread evenly over many keys.
fn unit(key: &str) -> f64 {
    (client::hash_str(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// One new vehicle joining while the fleet is connected: a new connection, a new
/// stream, until it has answered every type it subscribes to. Returns the time taken.
pub async fn join_one(
    target: &Target,
    cfg: Arc<ClientConfig>,
    node_id: String,
) -> Result<Duration> {
    let start = Instant::now();
    let channel = target.connect(&node_id).await?;
    let shared = Arc::new(Shared::default());
    let rec = Arc::new(StreamRec::default());
    let (rec2, shared2) = (rec.clone(), shared.clone());
    // No retries: a new vehicle's first attempt is what is being timed.
    let task = tokio::spawn(async move {
        if let Err(e) = client::run_stream(channel, &cfg, &node_id, &rec2, &shared2).await {
            client::record_failure(&shared2, &node_id, &e);
        }
    });
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !rec.ready.load(Ordering::Acquire) {
            if task.is_finished() {
                break;
            }
            // notify_one stores a permit, so a wakeup between the check and the
            // await is not lost; the timeout bounds the is_finished case.
            let _ =
                tokio::time::timeout(Duration::from_millis(50), rec.ready_notify.notified()).await;
        }
    })
    .await;
    let took = start.elapsed();
    task.abort();
    waited.context("new vehicle did not get its config within 30 s")?;
    if !rec.ready.load(Ordering::Acquire) {
        let e = shared.last_error.lock().expect("last_error").clone();
        bail!("new vehicle stream failed: {}", e.unwrap_or_default());
    }
    Ok(took)
}
