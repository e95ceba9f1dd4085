use std::time::Duration;

use super::*;
use crate::{QueueConfig, QueueError};

/// A queue whose budget holds exactly `n` of the messages `msg(<4-letter class>, _, &[0; 100])`.
async fn queue_holding(dir: &Path, clock: &Arc<ManualClock>, n: u64) -> Queue {
    // Measure one frame, then size the budget to n of them.
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = open(probe_dir.path(), clock);
    probe.enqueue(msg("bulk", 2, &[0; 100])).await.unwrap();
    let frame = probe.stats().live_bytes;
    let mut config = QueueConfig::new(dir);
    config.budget_bytes = frame * n;
    open_with(config, clock, Arc::new(StdStorage))
}

#[tokio::test]
async fn eviction_takes_the_oldest_lowest_priority_first_and_never_higher_priority() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = queue_holding(dir.path(), &clock, 5).await;
    let body = [0u8; 100];
    let high = q.enqueue(msg("high", 0, &body)).await.unwrap().id;
    let norm1 = q.enqueue(msg("norm", 1, &body)).await.unwrap().id;
    let norm2 = q.enqueue(msg("norm", 1, &body)).await.unwrap().id;
    let bulk1 = q.enqueue(msg("bulk", 2, &body)).await.unwrap().id;
    let bulk2 = q.enqueue(msg("bulk", 2, &body)).await.unwrap().id;

    // Full. A bulk message finds nothing below it: refused, nothing evicted.
    let err = q.enqueue(msg("bulk", 2, &body)).await.unwrap_err();
    assert!(matches!(err, QueueError::Full { .. }), "{err}");
    assert_eq!(err.http_status(), 507);
    assert_eq!(q.stats().evicted, 0);

    // A norm message evicts the oldest bulk, then the next bulk.
    let norm3 = q.enqueue(msg("norm", 1, &body)).await.unwrap().id;
    let norm4 = q.enqueue(msg("norm", 1, &body)).await.unwrap().id;
    // No bulk left; norm never evicts norm or high.
    assert!(matches!(
        q.enqueue(msg("norm", 1, &body)).await,
        Err(QueueError::Full { .. })
    ));
    // A high message evicts the oldest norm.
    let high2 = q.enqueue(msg("high", 0, &body)).await.unwrap().id;

    assert_eq!(q.stats().evicted, 3);
    // Counted per class too (the fleet report shows drops by class).
    let evicted_of = |class: &str| {
        q.stats()
            .depth
            .iter()
            .find(|d| d.class == class)
            .map(|d| d.evicted)
    };
    assert_eq!(
        (evicted_of("bulk"), evicted_of("norm"), evicted_of("high")),
        (Some(2), Some(1), Some(0))
    );
    let left = ids(&drain(&q));
    assert_eq!(left, vec![high, high2, norm2, norm3, norm4]);
    assert!(!left.contains(&bulk1) && !left.contains(&bulk2) && !left.contains(&norm1));

    // Evictions are acks: they stay evicted after a restart.
    drop(q);
    let q = open(dir.path(), &clock);
    assert_eq!(ids(&drain(&q)), vec![high, high2, norm2, norm3, norm4]);
}

#[tokio::test]
async fn full_budget_with_too_little_evictable_evicts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = queue_holding(dir.path(), &clock, 3).await;
    q.enqueue(msg("high", 0, &[0; 100])).await.unwrap();
    q.enqueue(msg("bulk", 2, &[0; 100])).await.unwrap();
    q.enqueue(msg("high", 0, &[0; 100])).await.unwrap();
    // Needs room for three messages' worth; only one bulk could go.
    let err = q.enqueue(msg("high", 0, &[0; 300])).await.unwrap_err();
    assert!(matches!(err, QueueError::Full { .. }), "{err}");
    assert_eq!(q.stats().evicted, 0);
    assert_eq!(q.len(), 3);
}

#[tokio::test]
async fn in_flight_messages_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = queue_holding(dir.path(), &clock, 2).await;
    q.enqueue(msg("bulk", 2, &[0; 100])).await.unwrap();
    q.enqueue(msg("bulk", 2, &[0; 100])).await.unwrap();
    let taken = drain(&q);
    assert_eq!(taken.len(), 2);
    assert!(matches!(
        q.enqueue(msg("high", 0, &[0; 100])).await,
        Err(QueueError::Full { .. })
    ));
    assert!(q.ack(taken[0].id));
    q.enqueue(msg("high", 0, &[0; 100])).await.unwrap();
}

#[tokio::test]
async fn expired_messages_are_dropped_counted_and_stay_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut config = QueueConfig::new(dir.path());
    config
        .class_ttl
        .insert("logs".into(), Duration::from_secs(60));
    let q = open_with(config.clone(), &clock, Arc::new(StdStorage));
    let mut short = msg("bulk", 2, b"short-lived");
    short.ttl = Some(Duration::from_secs(1));
    let short = q.enqueue(short).await.unwrap().id;
    let forever = q.enqueue(msg("bulk", 2, b"no ttl")).await.unwrap().id;
    let logs = q
        .enqueue(msg("logs", 2, b"class default ttl"))
        .await
        .unwrap()
        .id;

    clock.advance(1_500);
    // The head of "bulk" has expired: dropped on the way, not handed out.
    let got = q.next_batch(&|c| c == "bulk", 10);
    assert_eq!(ids(&got), vec![forever]);
    assert_eq!(q.stats().expired, 1);

    clock.advance(60_000);
    assert_eq!(q.expire(), 1);
    assert_eq!(q.stats().expired, 2);
    assert!(q.ack(forever));
    drop(q);
    let q = open_with(config, &clock, Arc::new(StdStorage));
    assert!(
        drain(&q).is_empty(),
        "neither {short} nor {logs} comes back"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_as_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut config = QueueConfig::new(dir.path());
    config.max_body_bytes = 1000;
    let q = open_with(config, &clock, Arc::new(StdStorage));
    let err = q.enqueue(msg("bulk", 2, &[0; 1001])).await.unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::TooLarge {
                size: 1001,
                limit: 1000
            }
        ),
        "{err}"
    );
    assert_eq!(err.http_status(), 413);
    q.enqueue(msg("bulk", 2, &[0; 1000])).await.unwrap();
}
