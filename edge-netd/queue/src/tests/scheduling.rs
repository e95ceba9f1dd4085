use super::*;
use crate::QueueConfig;

#[tokio::test]
async fn bulk_gets_its_guaranteed_share_while_critical_is_never_empty() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    for _ in 0..300 {
        q.enqueue(msg("critical", 0, b"c")).await.unwrap();
    }
    for _ in 0..50 {
        q.enqueue(msg("standard", 1, b"s")).await.unwrap();
        q.enqueue(msg("bulk", 2, b"b")).await.unwrap();
    }
    let mut picked = Vec::new();
    while picked.len() < 200 {
        let batch = q.next_batch(&all, 7);
        for m in &batch {
            assert!(q.ack(m.id));
        }
        picked.extend(batch.into_iter().map(|m| m.class));
    }
    let count = |c: &str| picked.iter().filter(|p| *p == c).count();
    // min_share_percent = 10: each lower class gets at least 10% of picks, critical the rest.
    assert!(count("bulk") >= 20, "bulk got {}", count("bulk"));
    assert!(
        count("standard") >= 20,
        "standard got {}",
        count("standard")
    );
    assert!(
        count("critical") >= 150,
        "critical got {}",
        count("critical")
    );
    // Lower classes never get more than one pick each in a row while critical waits.
    assert!(picked.windows(3).all(|w| w.iter().any(|c| c == "critical")));
}

#[tokio::test]
async fn with_a_zero_share_priority_is_strict() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut config = QueueConfig::new(dir.path());
    config.min_share_percent = 0;
    let q = open_with(config, &clock, Arc::new(StdStorage));
    for _ in 0..5 {
        q.enqueue(msg("bulk", 2, b"b")).await.unwrap();
        q.enqueue(msg("critical", 0, b"c")).await.unwrap();
    }
    let classes: Vec<String> = drain(&q).into_iter().map(|m| m.class).collect();
    assert_eq!(classes[..5], ["critical"; 5]);
    assert_eq!(classes[5..], ["bulk"; 5]);
}

#[tokio::test]
async fn classes_whose_uplink_is_not_allowed_are_not_drained() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    q.enqueue(msg("critical", 0, b"c")).await.unwrap();
    let bulk = q.enqueue(msg("bulk", 2, b"b")).await.unwrap().id;
    // Only Wi-Fi would carry critical here and it is down; bulk's metered link is fine.
    let got = q.next_batch(&|c| c == "bulk", 10);
    assert_eq!(ids(&got), vec![bulk]);
    assert!(q.next_batch(&|c| c == "bulk", 10).is_empty());
    assert_eq!(q.next_batch(&all, 10).len(), 1);
}

#[tokio::test]
async fn nack_puts_a_message_back_at_the_head_with_a_higher_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let q = open(dir.path(), &clock);
    let a = q.enqueue(msg("bulk", 2, b"a")).await.unwrap().id;
    let b = q.enqueue(msg("bulk", 2, b"b")).await.unwrap().id;
    let first = q.next_batch(&all, 1);
    assert_eq!((first[0].id, first[0].attempt), (a, 1));
    assert!(q.nack(a));
    let again = drain(&q);
    assert_eq!(ids(&again), vec![a, b]);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(q.stats().nacked, 1);
}
