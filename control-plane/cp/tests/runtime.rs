//! The control-plane runtime without Envoy: snapshot sharing, live reload through the
//! real file watcher, and the admin routes over real HTTP.

use std::sync::Arc;
use std::time::Duration;

use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::ResourceType;
use misaki_cp::cache::SnapshotCache;
use misaki_cp::policy_state::PolicyState;
use misaki_cp::run::QUICKSTART;
use misaki_xds::SnapshotSource;

fn vehicle(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        role: Role::Vehicle,
        vehicle_id: Some(id.into()),
        proxyless: false,
        delta: false,
        tls_dir: None,
    }
}

fn cloud() -> NodeInfo {
    NodeInfo {
        id: "c".into(),
        role: Role::Cloud,
        vehicle_id: None,
        proxyless: false,
        delta: false,
        tls_dir: None,
    }
}

fn quickstart() -> misaki_policy::Policy {
    misaki_policy::parse("q.yaml", QUICKSTART).expect("quickstart valid")
}

#[test]
fn identical_vehicles_share_one_snapshot_allocation() {
    let cache = SnapshotCache::new(Arc::new(quickstart()), "t-");
    let a = cache.watch(&vehicle("a"));
    let b = cache.watch(&vehicle("b"));
    assert!(Arc::ptr_eq(&a.borrow(), &b.borrow()));
    let c = cache.watch(&cloud());
    assert!(!Arc::ptr_eq(&a.borrow(), &c.borrow()));
}

#[test]
fn an_edit_that_only_touches_vehicle_services_does_not_wake_cloud_streams() {
    let cache = SnapshotCache::new(Arc::new(quickstart()), "t-");
    let mut v = cache.watch(&vehicle("a"));
    let mut c = cache.watch(&cloud());
    v.mark_unchanged();
    c.mark_unchanged();
    // diagnostics is a vehicle service: the cloud sidecar does not carry it.
    let edited = QUICKSTART.replace("port: 18090", "port: 18091");
    assert_ne!(
        edited, QUICKSTART,
        "quickstart changed shape; update this test"
    );
    let changed = cache.set_policy(Arc::new(misaki_policy::parse("q.yaml", &edited).unwrap()));
    assert_eq!(changed, 1);
    assert!(v.has_changed().unwrap());
    assert!(!c.has_changed().unwrap());
}

#[test]
fn the_same_policy_again_wakes_nobody() {
    let cache = SnapshotCache::new(Arc::new(quickstart()), "t-");
    let mut v = cache.watch(&vehicle("a"));
    v.mark_unchanged();
    assert_eq!(cache.set_policy(Arc::new(quickstart())), 0);
    assert!(!v.has_changed().unwrap());
}

#[tokio::test]
async fn watcher_applies_rename_saves_and_keeps_serving_after_a_bad_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, QUICKSTART).unwrap();
    let cache = SnapshotCache::new(Arc::new(quickstart()), "t-");
    let state = PolicyState::new(cache.clone(), path.display().to_string());
    let mut rx = cache.watch(&vehicle("a"));
    let first = rx
        .borrow_and_update()
        .get(ResourceType::Route)
        .version
        .clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(misaki_cp::watcher::run(
        path.clone(),
        state.clone(),
        async {
            let _ = stop_rx.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Save by rename, as editors do.
    let tmp = dir.path().join(".mesh.yaml.swp");
    std::fs::write(&tmp, QUICKSTART.replace("timeout: 2s", "timeout: 3s")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("edit applied")
        .unwrap();
    let second = rx
        .borrow_and_update()
        .get(ResourceType::Route)
        .version
        .clone();
    assert_ne!(first, second);
    let good = state.to_json()["version"].clone();

    // A bad edit: rejected, recorded, nothing pushed.
    std::fs::write(&path, "version: 1\nuplinks: nope\n").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state.to_json()["last_error"].is_null() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad edit not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = state.to_json();
    assert_eq!(j["version"], good);
    let errors = j["last_error"]["errors"].to_string();
    assert!(
        errors.contains("mesh.yaml:2:10: uplinks: expected a list"),
        "{j}"
    );
    assert!(!rx.has_changed().unwrap());

    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}
