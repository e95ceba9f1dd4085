//! `deploy/kubernetes/`, checked offline: every manifest against the Kubernetes 1.30
//! schemas (PyPI `kubernetes-validate`, strict, installed into `.venv` by
//! scripts/setup.sh; its schemas ship in the package), the ConfigMap's policy with
//! `misaki-cp validate`, every `--flag` of the Deployment against `misaki-cp serve
//! --help` (a manifest cannot promise a flag this build does not have), and the probes,
//! ports and mounts against what misaki-cp answers and reads.
//!
//! The YAML is read by PyYAML from the same `.venv` (the validator's own reader) and
//! handed over as JSON: no YAML crate in this crate.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use misaki_e2e::{repo_root, target_bin};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30.0";
/// Files in the directory that are not Kubernetes objects.
const NOT_OBJECTS: &[&str] = &["kustomization.yaml"];
/// Manifests deliberately left out of kustomization.yaml (empty Secret templates).
const NOT_APPLIED: &[&str] = &["secrets-template.yaml"];

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy/kubernetes")
}

fn venv_bin(name: &str) -> PathBuf {
    let path = repo_root().join(".venv/bin").join(name);
    assert!(
        path.exists(),
        "{} not found: run scripts/setup.sh (installs PyPI kubernetes-validate into .venv)",
        path.display()
    );
    path
}

/// The Kubernetes manifests: every `*.yaml` of deploy/kubernetes but kustomization.yaml.
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| {
            !NOT_OBJECTS
                .iter()
                .any(|n| p.file_name() == Some(n.as_ref()))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 4, "too few manifests: {files:?}");
    files
}

/// Every document of a YAML file, as JSON (null documents dropped).
fn yaml_docs(path: &Path) -> Vec<Value> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        with open(sys.argv[1]) as f:\n    \
            print(json.dumps([d for d in yaml.safe_load_all(f) if d is not None]))";
    let out = Command::new(venv_bin("python"))
        .args(["-c", TO_JSON])
        .arg(path)
        .output()
        .expect("run .venv/bin/python");
    assert!(
        out.status.success(),
        "{} is not YAML PyYAML reads:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("PyYAML's JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn all_objects() -> Vec<Value> {
    manifests().iter().flat_map(|p| yaml_docs(p)).collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

/// The misaki-cp container of the Deployment.
fn cp_container(objects: &[Value]) -> &Value {
    let containers =
        &object(objects, "Deployment", "misaki-cp")["spec"]["template"]["spec"]["containers"];
    containers
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "misaki-cp"))
        .expect("the Deployment has a container misaki-cp")
}

/// The container's args as strings.
fn cp_args(objects: &[Value]) -> Vec<String> {
    cp_container(objects)["args"]
        .as_array()
        .expect("misaki-cp has args")
        .iter()
        .map(|a| str_of(a, "an arg").to_string())
        .collect()
}

/// The value given to `flag` (`--flag VALUE` or `--flag=VALUE`).
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_string)
        }
    })
}

#[test]
fn every_manifest_validates_strictly_against_kubernetes_schemas() {
    let files = manifests();
    let out = Command::new(venv_bin("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown kind or apiVersion is only a warning (exit 0) to the validator: a
    // failure here, so a misspelt one cannot pass unchecked.
    assert!(
        out.status.success() && !text.contains("ERROR") && !text.contains("WARN"),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION} failed:\n{text}"
    );
    for file in &files {
        for doc in yaml_docs(file) {
            let kind = str_of(&doc["kind"], "kind").to_ascii_lowercase();
            let name = str_of(&doc["metadata"]["name"], "metadata.name");
            let passed = format!("passed for resource {kind}/{name} ");
            assert!(
                text.contains(&passed),
                "{}: {kind}/{name} was not reported as validated:\n{text}",
                file.display()
            );
        }
    }
}

#[test]
fn kustomization_applies_every_manifest_but_the_secret_templates() {
    let docs = yaml_docs(&deploy_dir().join("kustomization.yaml"));
    let k = &docs[0];
    assert_eq!(k["kind"], "Kustomization");
    assert_eq!(k["namespace"], "misaki");
    let listed: BTreeSet<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| str_of(r, "a resource"))
        .collect();
    let present: BTreeSet<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for r in &listed {
        assert!(present.contains(*r), "kustomization.yaml lists missing {r}");
    }
    for p in &present {
        let is_listed = listed.contains(p.as_str());
        let is_template = NOT_APPLIED.contains(&p.as_str());
        assert!(
            is_listed != is_template,
            "{p}: listed in kustomization.yaml: {is_listed}, a template: {is_template}"
        );
    }
    for o in all_objects() {
        if o["kind"] != "Namespace" {
            assert_eq!(o["metadata"]["namespace"], "misaki", "{}", o["metadata"]);
        }
    }
}

#[test]
fn secret_templates_carry_no_data() {
    for o in all_objects().iter().filter(|o| o["kind"] == "Secret") {
        assert!(
            o.get("data").is_none(),
            "{}: use stringData",
            o["metadata"]["name"]
        );
        let data = o["stringData"].as_object().expect("stringData");
        assert!(!data.is_empty());
        for (key, value) in data {
            assert_eq!(
                value, "",
                "Secret {} key {key}: a template must stay empty",
                o["metadata"]["name"]
            );
        }
    }
}

#[test]
fn configmap_policy_is_valid_and_is_what_policy_names() {
    let objects = all_objects();
    let cm = object(&objects, "ConfigMap", "misaki-cp-policy");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = cm["data"].as_object().expect("ConfigMap data");
    assert!(files.keys().any(|k| k.ends_with(".yaml")), "no *.yaml key");
    for (name, text) in files {
        fs::write(dir.path().join(name), str_of(text, name)).expect("write policy file");
    }
    let out = Command::new(target_bin("misaki-cp"))
        .arg("validate")
        .arg(dir.path())
        .output()
        .expect("run misaki-cp validate");
    assert!(
        out.status.success(),
        "misaki-cp validate rejects the ConfigMap's policy:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // `--policy` is the directory the ConfigMap is mounted at (a directory, so the
    // kubelet's `..data` swap is seen), and `--store` is set: shared mode.
    let args = cp_args(&objects);
    let policy = flag_value(&args, "--policy").expect("--policy");
    let store = flag_value(&args, "--store").expect("--store");
    assert!(store.starts_with("etcd://"), "{store}");
    let pod = &object(&objects, "Deployment", "misaki-cp")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .find(|v| v["configMap"]["name"] == "misaki-cp-policy")
        })
        .expect("a volume of the policy ConfigMap");
    let mount = cp_container(&objects)["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == volume["name"]))
        .expect("the policy volume is mounted");
    assert_eq!(mount["mountPath"], policy.as_str());
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never updates"
    );
}

/// The long flags `misaki-cp serve --help` lists.
fn serve_flags() -> BTreeSet<String> {
    let out = Command::new(target_bin("misaki-cp"))
        .args(["serve", "--help"])
        .output()
        .expect("run misaki-cp serve --help");
    assert!(out.status.success(), "misaki-cp serve --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',', '=']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    assert!(
        flags.contains("--store") && flags.contains("--admin-addr"),
        "unexpected help text:\n{help}"
    );
    flags
}

#[test]
fn deployment_uses_only_flags_misaki_cp_serve_has() {
    let objects = all_objects();
    let container = cp_container(&objects);
    let args = cp_args(&objects);
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    assert_eq!(container["command"], serde_json::json!(["misaki-cp"]));
    let known = serve_flags();
    let unknown: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("--"))
        .filter(|a| !known.contains(a.split('=').next().unwrap_or(a)))
        .collect();
    assert!(
        unknown.is_empty(),
        "the Deployment passes flags `misaki-cp serve --help` does not list: {unknown:?} (it lists {known:?})"
    );
}

/// The port `name` of the misaki-cp container.
fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port {name}"))
}

/// Port `port` of Service `name`: its number, target and appProtocol.
fn service_port(objects: &[Value], name: &str, port: &str) -> (u64, Value, Value) {
    let svc = object(objects, "Service", name);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/name"], "misaki-cp",
        "Service {name}"
    );
    let p = svc["spec"]["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == port))
        .unwrap_or_else(|| panic!("Service {name} has no port {port}"));
    (
        p["port"].as_u64().expect("port number"),
        p["targetPort"].clone(),
        p["appProtocol"].clone(),
    )
}

#[test]
fn probes_ports_and_services_match_misaki_cp() {
    let objects = all_objects();
    let container = cp_container(&objects);
    let args = cp_args(&objects);

    // The admin port off loopback (the kubelet probes it), on the admin container port.
    let admin_addr = flag_value(&args, "--admin-addr").expect("--admin-addr");
    let admin: std::net::SocketAddr = admin_addr.parse().expect("--admin-addr is IP:port");
    assert!(
        !admin.ip().is_loopback(),
        "the kubelet cannot probe {admin}"
    );
    assert_eq!(u64::from(admin.port()), container_port(container, "admin"));
    let xds: std::net::SocketAddr = flag_value(&args, "--xds-addr")
        .expect("--xds-addr")
        .parse()
        .expect("--xds-addr is IP:port");
    assert!(!xds.ip().is_loopback());
    assert_eq!(u64::from(xds.port()), container_port(container, "grpc"));
    assert_eq!(xds.port(), 18000);
    assert_eq!(admin.port(), 19000);

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "admin", "{probe}");
    }

    assert_eq!(
        service_port(&objects, "misaki-cp", "grpc"),
        (18000, "grpc".into(), "grpc".into())
    );
    assert_eq!(
        service_port(&objects, "misaki-cp-admin", "admin"),
        (19000, "admin".into(), "http".into())
    );
    let headless = object(&objects, "Service", "misaki-cp-headless");
    assert_eq!(headless["spec"]["clusterIP"], "None");

    let deploy = object(&objects, "Deployment", "misaki-cp");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert!(pod["topologySpreadConstraints"].is_array());
    for r in ["requests", "limits"] {
        for what in ["cpu", "memory"] {
            assert!(
                container["resources"][r][what].is_string(),
                "resources.{r}.{what}"
            );
        }
    }

    // The peer port: bound on every address, advertised as the pod's IP (Downward
    // API), and reachable from misaki-cp pods only.
    let peer: std::net::SocketAddr = flag_value(&args, "--peer-addr")
        .expect("--peer-addr")
        .parse()
        .expect("--peer-addr is IP:port");
    assert_eq!(u64::from(peer.port()), container_port(container, "peer"));
    assert_eq!(
        flag_value(&args, "--peer-advertise").as_deref(),
        Some(format!("$(POD_IP):{}", peer.port()).as_str())
    );
    let pod_ip = container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == "POD_IP"))
        .expect("env POD_IP");
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let np = object(&objects, "NetworkPolicy", "misaki-cp-peer");
    let selects = &np["spec"]["podSelector"]["matchLabels"];
    assert_eq!(selects, &deploy["spec"]["selector"]["matchLabels"]);
    for rule in np["spec"]["ingress"].as_array().expect("ingress rules") {
        let ports: Vec<&Value> = rule["ports"].as_array().expect("ports").iter().collect();
        if ports.iter().any(|p| p["port"] == "peer") {
            assert_eq!(ports.len(), 1, "the peer port shares a rule: {rule}");
            let from = rule["from"]
                .as_array()
                .expect("the peer rule names its sources");
            assert_eq!(from.len(), 1, "{rule}");
            assert_eq!(&from[0]["podSelector"]["matchLabels"], selects, "{rule}");
        }
    }
    for port in ["grpc", "admin"] {
        let open = np["spec"]["ingress"].as_array().unwrap().iter().any(|r| {
            r.get("from").is_none()
                && r["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["port"] == port))
        });
        assert!(open, "the NetworkPolicy closes the {port} port");
    }

    let pdb = object(&objects, "PodDisruptionBudget", "misaki-cp");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );
}
