//! Shared mode against a real etcd (started here on loopback ports): `misaki-cp policy
//! apply|history|rollback` as the binary, replicas (`serve --store`) in this process.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::etcd::Etcd;
use common::{Cp, serve_args, spawn_serve, wait_until};
use misaki_cp::cli::{ServeArgs, StoreTls};
use misaki_cp::run::QUICKSTART;
use misaki_cp::store::{Applied, CURRENT, KEEP, PolicyFile, Record, Store};
use misaki_harness::EtcdTls;

/// The quickstart with one vehicle service port changed: a different version.
fn edited(port: u16) -> String {
    let text = QUICKSTART.replace("port: 18090", &format!("port: {port}"));
    assert_ne!(
        text, QUICKSTART,
        "quickstart changed shape; update this test"
    );
    text
}

/// Two errors at known places.
fn broken() -> String {
    let text = QUICKSTART
        .replace("cost: 10", "cost: ten")
        .replace("timeout: 2s", "timeout: 2 parsecs");
    assert_ne!(text.matches("ten").count(), 0);
    text
}

fn version_of(text: &str) -> String {
    misaki_cp::policy_state::policy_version(&misaki_policy::parse("x.yaml", text).unwrap())
}

fn cp(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_misaki-cp"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// `misaki-cp policy apply PATH --store URL`, which must succeed; its stdout.
fn apply(path: &str, url: &str) -> String {
    ok(&cp(&["policy", "apply", path, "--store", url]))
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "misaki-cp failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Revision rows of `policy history` (header skipped): (revision, version).
fn history(etcd: &Etcd) -> Vec<(u64, String)> {
    let out = ok(&cp(&["policy", "history", "--store", &etcd.url()]));
    out.lines()
        .skip(1)
        .filter(|l| !l.starts_with('('))
        .map(|l| {
            let mut f = l.split_whitespace();
            (
                f.next().unwrap().parse().unwrap(),
                f.next().unwrap().to_string(),
            )
        })
        .collect()
}

fn replica(etcd: &Etcd, policy: Option<PathBuf>) -> Cp {
    spawn_serve(ServeArgs {
        policy,
        store: Some(etcd.url().parse().unwrap()),
        ..serve_args()
    })
}

/// Wait until every replica serves `version` (and is ready).
async fn all_serve(replicas: &[&Cp], version: &str) {
    for (i, r) in replicas.iter().enumerate() {
        wait_until(&format!("replica {i} serves {version}"), || async {
            let ready = r.get("/readyz").await.is_some();
            let policy = r.get("/policy").await.unwrap_or_default();
            ready && policy.contains(&format!(r#""version": "{version}""#))
        })
        .await;
    }
}

#[test]
fn apply_is_validated_idempotent_and_recorded() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "mesh.yaml", QUICKSTART);
    let version = version_of(QUICKSTART);
    let url = etcd.url();

    let out = apply(good.to_str().unwrap(), &url);
    assert!(
        out.contains(&format!("applied: revision 1, version {version}")),
        "{out}"
    );
    assert_eq!(history(&etcd), [(1, version.clone())]);

    let out = apply(good.to_str().unwrap(), &url);
    assert!(out.starts_with("unchanged: revision 1"), "{out}");
    assert_eq!(history(&etcd).len(), 1);

    // A bad file: exit 64, every error located as `validate` locates it, nothing written.
    let bad = write(dir.path(), "bad.yaml", &broken());
    let out = cp(&["policy", "apply", bad.to_str().unwrap(), "--store", &url]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let validate = cp(&["validate", bad.to_str().unwrap()]);
    let expected = String::from_utf8_lossy(&validate.stderr);
    let located: Vec<&str> = expected
        .lines()
        .filter(|l| l.starts_with(&format!("{}:", bad.display())))
        .collect();
    assert_eq!(located.len(), 2, "{expected}");
    for line in &located {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert_eq!(history(&etcd), [(1, version)]);

    // A directory: one policy over several files, stored and parsed as one.
    let split = tempfile::tempdir().unwrap();
    let (head, tail) = QUICKSTART.split_at(QUICKSTART.find("\nclasses:").unwrap());
    write(split.path(), "a.yaml", head);
    write(split.path(), "b.yaml", tail);
    write(split.path(), ".hidden.yaml", "not: [policy");
    let out = apply(split.path().to_str().unwrap(), &url);
    assert!(out.starts_with("unchanged: revision 1"), "{out}");

    // Usage errors.
    let out = cp(&["policy", "rollback", "7", "--store", &url]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_eq!(
        cp(&["policy", "history", "--store", "x:1"]).status.code(),
        Some(64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_follow_applies_rollbacks_and_keep_serving_past_bad_values() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(&etcd, None), replica(&etcd, None));

    // No policy in etcd: not ready, and saying why.
    wait_until("replica a answers", || async {
        a.get("/healthz").await.is_some()
    })
    .await;
    let (status, body) = a.get_any("/readyz").await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("no policy from etcd yet"), "{body}");
    assert!(a.json("/policy").await["version"].is_null());

    let v1 = version_of(QUICKSTART);
    let p1 = write(dir.path(), "mesh.yaml", QUICKSTART);
    apply(p1.to_str().unwrap(), &url);
    all_serve(&[&a, &b], &v1).await;

    // A second apply reaches both, live.
    let text2 = edited(18091);
    let v2 = version_of(&text2);
    let p2 = write(dir.path(), "mesh.yaml", &text2);
    let out = apply(p2.to_str().unwrap(), &url);
    assert!(out.contains(&format!("revision 2, version {v2}")), "{out}");
    all_serve(&[&a, &b], &v2).await;
    assert!(
        a.json("/policy").await["source"]
            .as_str()
            .unwrap()
            .contains("revision 2")
    );

    // Rollback to revision 1: a new revision with revision 1's text.
    let out = ok(&cp(&["policy", "rollback", "1", "--store", &url]));
    assert!(
        out.contains(&format!("applied: revision 3, version {v1}")),
        "{out}"
    );
    all_serve(&[&a, &b], &v1).await;
    let h = history(&etcd);
    assert_eq!(h, [(3, v1.clone()), (2, v2.clone()), (1, v1.clone())]);

    // A value that does not parse, written behind misaki's back: rejected, with its
    // located errors on /policy; the last good policy keeps serving.
    let mut client = common::etcd::client(&etcd).await;
    let bad = Record {
        revision: 99,
        version: "whatever".into(),
        applied_at_unix: 0,
        source: "by hand".into(),
        files: vec![PolicyFile {
            name: "mesh.yaml".into(),
            text: broken(),
        }],
    };
    client
        .put(CURRENT, serde_json::to_vec(&bad).unwrap(), None)
        .await
        .unwrap();
    for r in [&a, &b] {
        wait_until("the bad value is rejected", || async {
            let p = r.json("/policy").await;
            let errors = p["last_error"]["errors"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            errors.len() == 2
                && errors.iter().all(|e| {
                    e.as_str()
                        .unwrap()
                        .starts_with("etcd:/misaki/policy/current@99/mesh.yaml:")
                })
        })
        .await;
        assert_eq!(r.json("/policy").await["version"], v1.as_str());
        assert!(
            r.get("/metrics")
                .await
                .unwrap()
                .contains("misaki_policy_valid 0")
        );
    }
    client.put(CURRENT, "not json", None).await.unwrap();
    wait_until("garbage is rejected", || async {
        let p = a.json("/policy").await;
        p["last_error"]
            .to_string()
            .contains("not a misaki policy record")
    })
    .await;
    all_serve(&[&a, &b], &v1).await;

    // The next apply numbers after the kept revisions and heals both.
    let out = apply(p2.to_str().unwrap(), &url);
    assert!(
        out.contains(&format!("applied: revision 4, version {v2}")),
        "{out}"
    );
    all_serve(&[&a, &b], &v2).await;
    assert!(a.json("/policy").await["last_error"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_with_policy_file_applies_its_edits_to_etcd() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "mesh.yaml", QUICKSTART);
    let a = replica(&etcd, Some(file.clone()));
    let b = replica(&etcd, None);
    all_serve(&[&a, &b], &version_of(QUICKSTART)).await;
    assert_eq!(history(&etcd).len(), 1);

    // An edit (saved by rename, as editors do) goes to etcd; the other replica follows.
    let text2 = edited(18092);
    let v2 = version_of(&text2);
    let tmp = write(dir.path(), ".mesh.yaml.tmp", &text2);
    std::fs::rename(&tmp, &file).unwrap();
    all_serve(&[&a, &b], &v2).await;
    assert_eq!(history(&etcd)[0], (2, v2.clone()));

    // A bad edit: shown as rejected on the replica that watches the file, not written.
    std::fs::write(&file, broken()).unwrap();
    wait_until("the bad edit is rejected", || async {
        let p = a.json("/policy").await;
        p["last_error"]["errors"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(history(&etcd).len(), 2);
    all_serve(&[&a, &b], &v2).await;

    // A second replica with the same file (every replica mounting one ConfigMap):
    // its apply at startup is "unchanged".
    std::fs::write(&file, &text2).unwrap();
    let c = replica(&etcd, Some(file.clone()));
    all_serve(&[&a, &b, &c], &v2).await;
    assert_eq!(history(&etcd).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_applies_all_land_and_old_revisions_are_trimmed() {
    let etcd = Etcd::start();
    let url: misaki_cp::cli::StoreUrl = etcd.url().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Eight applies at once, each different: none lost, numbered 1..=8.
    let mut tasks = Vec::new();
    for i in 0..8u16 {
        let path = write(dir.path(), &format!("p{i}.yaml"), &edited(18100 + i));
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let store = Store::connect(&url, &StoreTls::default()).await.unwrap();
            store.apply_path(&path).await
        }));
    }
    let mut revisions = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Applied::New { revision, .. } => revisions.push(revision),
            other => panic!("expected a new revision, got {other:?}"),
        }
    }
    revisions.sort_unstable();
    assert_eq!(revisions, (1..=8).collect::<Vec<_>>());

    // Past KEEP revisions, the oldest are deleted by the apply that adds one.
    let store = Store::connect(&url, &StoreTls::default()).await.unwrap();
    let total = KEEP + 5;
    for i in 8..total {
        let port = 18100 + u16::try_from(i).unwrap();
        let path = write(dir.path(), "next.yaml", &edited(port));
        store.apply_path(&path).await.unwrap();
    }
    let history = store.history().await.unwrap();
    assert_eq!(history.len() as u64, KEEP);
    assert_eq!(history[0].revision, total);
    assert_eq!(history.last().unwrap().revision, total - KEEP + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_ride_out_an_etcd_restart() {
    let mut etcd = Etcd::start();
    let url = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(&etcd, None), replica(&etcd, None));
    let p1 = write(dir.path(), "mesh.yaml", QUICKSTART);
    apply(p1.to_str().unwrap(), &url);
    let v1 = version_of(QUICKSTART);
    all_serve(&[&a, &b], &v1).await;

    // etcd gone: both keep serving what they have, and stay ready.
    etcd.kill();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    all_serve(&[&a, &b], &v1).await;

    // Back on the same ports and data: they re-watch and follow the next apply.
    etcd.restart();
    let text2 = edited(18093);
    let p2 = write(dir.path(), "mesh.yaml", &text2);
    let out = apply(p2.to_str().unwrap(), &url);
    assert!(out.contains("applied: revision 2"), "{out}");
    all_serve(&[&a, &b], &version_of(&text2)).await;
}

/// Whether any resource of `r` mentions `name` (cluster names are plain bytes in it).
fn mentions(
    r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    name: &str,
) -> bool {
    r.resources
        .iter()
        .any(|a| a.value.windows(name.len()).any(|w| w == name.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_apply_reaches_open_xds_streams_on_every_replica() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(&etcd, None), replica(&etcd, None));
    let p1 = write(dir.path(), "mesh.yaml", QUICKSTART);
    apply(p1.to_str().unwrap(), &url);
    all_serve(&[&a, &b], &version_of(QUICKSTART)).await;

    let mut streams = Vec::new();
    for (i, r) in [&a, &b].into_iter().enumerate() {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", r.xds))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let id = format!("car-{i}");
        let mut ads = common::Ads::open(channel, common::node(&id, "vehicle", Some(&id)))
            .await
            .unwrap();
        let first = ads.next().await.unwrap();
        assert!(!first.resources.is_empty());
        assert!(!mentions(&first, "weather"));
        streams.push(ads);
    }

    // A new cloud service, applied once: every replica pushes it on its open streams.
    let text2 = QUICKSTART.replace(
        "  - name: telemetry",
        "  - name: weather\n    location: cloud\n    protocol: http\n    port: 8080\n    endpoints: [\"127.0.0.1:18081\"]\n    routes: [\"/weather\"]\n    class: standard\n\n  - name: telemetry",
    );
    let p2 = write(dir.path(), "mesh.yaml", &text2);
    apply(p2.to_str().unwrap(), &url);
    for ads in &mut streams {
        let next = ads.next().await.unwrap();
        assert!(mentions(&next, "weather"), "{next:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_and_follow_over_mutual_tls_to_etcd() {
    // A CA, etcd's server certificate for 127.0.0.1 and a client certificate, all
    // made by misaki-cp's own CA commands.
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    ok(&cp(&["ca", "init", &path("ca")]));
    ok(&cp(&[
        "ca",
        "issue",
        &path("ca"),
        "--server",
        "127.0.0.1",
        "--out",
        &path("etcd"),
    ]));
    ok(&cp(&[
        "ca",
        "issue",
        &path("ca"),
        "--cloud",
        "misaki-cp",
        "--out",
        &path("client"),
    ]));
    let etcd = Etcd::start_with(Some(EtcdTls {
        cert: path("etcd/cert.pem").into(),
        key: path("etcd/key.pem").into(),
        client_ca: path("ca/ca.pem").into(),
    }));
    let url = etcd.url();
    let policy = write(dir.path(), "mesh.yaml", QUICKSTART);
    let policy = policy.to_str().unwrap();
    let tls = [
        "--store-ca",
        &path("ca/ca.pem"),
        "--store-cert",
        &path("client/cert.pem"),
        "--store-key",
        &path("client/key.pem"),
    ];

    let apply_with = |extra: &[&str]| {
        let mut args = vec!["policy", "apply", policy, "--store", &url];
        args.extend(extra);
        cp(&args)
    };
    // Plaintext, or TLS without a client certificate: etcd refuses, nothing written.
    assert!(!apply_with(&[]).status.success());
    assert!(!apply_with(&tls[..2]).status.success());
    // A missing file is a usage error.
    let missing = apply_with(&["--store-ca", &path("nope.pem")]);
    assert_eq!(missing.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.pem"));

    let out = ok(&apply_with(&tls));
    assert!(out.contains("applied: revision 1"), "{out}");

    // A replica over mutual TLS follows it.
    let store_tls = StoreTls {
        store_ca: Some(path("ca/ca.pem").into()),
        store_cert: Some(path("client/cert.pem").into()),
        store_key: Some(path("client/key.pem").into()),
    };
    let r = spawn_serve(ServeArgs {
        store: Some(url.parse().unwrap()),
        store_tls,
        ..serve_args()
    });
    all_serve(&[&r], &version_of(QUICKSTART)).await;
    assert_eq!(r.json("/fleet").await["total"], 0);
}
