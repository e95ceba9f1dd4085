//! Peer: `sovereign` (PyPI), a Python xDS control plane that serves Envoy over REST
//! polling.
//!
//! Sovereign renders Jinja2 templates (one per resource type) with data from
//! "sources". The edited file is a `file` source listing the service's instance;
//! sovereign re-reads its sources every `source_config.refresh_rate` seconds (default
//! 30), and Envoy polls sovereign every `refresh_delay` (`api_type: REST`). So an
//! edit waits for both pollers; nothing is pushed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use misaki_e2e::process::wait_for;
use misaki_e2e::{Process, Upstream, free_port, http};

use crate::measure::{self, Plan, Sample, Sides};
use crate::{peer, rss};

/// How the peer is configured; printed with the table.
#[derive(Debug, Clone)]
pub struct Config {
    /// `bin/sovereign` in its venv.
    pub bin: PathBuf,
    /// Sovereign's `source_config.refresh_rate`, whole seconds.
    pub source_refresh_s: u32,
    /// Envoy's `api_config_source.refresh_delay` for the REST subscriptions.
    pub envoy_refresh: Duration,
    /// Let it idle this long before reading its RSS.
    pub idle: Duration,
}

/// Edit latencies and the idle memory (KiB, master and workers summed).
#[derive(Debug)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub idle_rss_kib: Option<u64>,
    pub idle_pss_kib: Option<u64>,
}

/// Gunicorn's master with its workers. Uvicorn workers do not notice their master
/// dying, so a plain SIGKILL of the master (what `Process` does) would orphan them:
/// stop the master gracefully, then kill whatever of the tree is left, by pid.
struct Server {
    proc: Process,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let master = self.proc.pid();
        let pids = rss::tree(master);
        signal("TERM", &[master]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut master_done = false;
        while Instant::now() < deadline {
            // Once reaped, the master's pid is free for reuse: never signal it again.
            master_done = master_done || self.proc.try_wait().is_some();
            if master_done && !pids[1..].iter().any(|p| alive(*p)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut left: Vec<u32> = pids[1..].iter().copied().filter(|p| alive(*p)).collect();
        if !master_done {
            left.push(master);
        }
        signal("KILL", &left);
        self.proc.kill();
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it holds no memory and no port.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .status();
}

fn sovereign_yaml(dir: &Path, source_refresh_s: u32) -> String {
    let d = dir.display();
    format!(
        r#"templates:
  default:
    - type: clusters
      spec: {{ protocol: file, serialization: jinja2, path: {d}/clusters.j2 }}
    - type: listeners
      spec: {{ protocol: file, serialization: jinja2, path: {d}/listeners.j2 }}
sources:
  - type: file
    scope: default
    config:
      path: file+yaml://{d}/instances.yaml
source_config:
  refresh_rate: {source_refresh_s}
# One Envoy, one set of instances: every node gets every instance.
matching:
  enabled: false
"#
    )
}

fn instances(upstream: u16) -> String {
    format!("- name: {}\n  port: {upstream}\n", peer::CLUSTER)
}

fn bootstrap(admin_port: u16, sovereign_port: u16, refresh: Duration) -> String {
    let rest = format!(
        r#"    resource_api_version: V3
    api_config_source:
      api_type: REST
      transport_api_version: V3
      cluster_names: [sovereign]
      refresh_delay: {}s
"#,
        refresh.as_secs_f64()
    );
    format!(
        r#"{head}dynamic_resources:
  cds_config:
{rest}  lds_config:
{rest}static_resources:
  clusters:
    - name: sovereign
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: sovereign
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {sovereign_port} }}
"#,
        head = peer::bootstrap_head("bench-sovereign", admin_port)
    )
}

fn start_server(cfg: &Config, dir: &Path) -> anyhow::Result<Server> {
    anyhow::ensure!(
        cfg.bin.exists(),
        "{} does not exist (bench/edit_latency.sh installs PyPI sovereign there)",
        cfg.bin.display()
    );
    let port = free_port();
    let proc = Process::spawn(
        "sovereign",
        Command::new(&cfg.bin)
            // Its settings also read `.env` from the working directory: use ours.
            .current_dir(dir)
            .env(
                "SOVEREIGN_CONFIG",
                format!("file+yaml://{}/sovereign.yaml", dir.display()),
            )
            .env("SOVEREIGN_HOST", "127.0.0.1")
            .env("SOVEREIGN_PORT", port.to_string())
            // Default is 2 × cores + 1 workers; one Envoy needs one, and one keeps
            // the RSS comparable to a single-process control plane.
            .env("SOVEREIGN_WORKERS", "1"),
        dir.join("sovereign.log"),
    );
    let mut server = Server { proc, port };
    let up = wait_for(Duration::from_secs(60), || {
        if server.proc.try_wait().is_some() {
            return Some(false);
        }
        http::get(port, "/healthcheck")
            .ok()
            .filter(|r| r.status == 200)
            .map(|_| true)
    });
    anyhow::ensure!(
        up == Some(true),
        "sovereign did not answer /healthcheck:\n{}",
        server.proc.log_tail(30)
    );
    Ok(server)
}

pub fn edit_latency(cfg: &Config, plan: &Plan, dir: &Path) -> anyhow::Result<Outcome> {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let listen = free_port();
    fs::write(
        dir.join("clusters.j2"),
        format!(
            "resources:\n{{% for instance in instances %}}\n{}{{% endfor %}}\n",
            peer::cluster_yaml("{{ instance.port }}", 2)
                .replace("name: svc", "name: {{ instance.name }}")
                .replace("cluster_name: svc", "cluster_name: {{ instance.name }}")
        ),
    )?;
    fs::write(
        dir.join("listeners.j2"),
        format!("resources:\n{}", peer::listener_yaml(listen, 2)),
    )?;
    let source = dir.join("instances.yaml");
    measure::save(&source, &instances(a.port))?;
    fs::write(
        dir.join("sovereign.yaml"),
        sovereign_yaml(dir, cfg.source_refresh_s),
    )?;
    let server = start_server(cfg, dir)?;
    let admin = peer::admin_port();
    let envoy = peer::start_envoy(
        "sovereign",
        &bootstrap(admin, server.port, cfg.envoy_refresh),
        admin,
        dir,
    )
    .with_context(|| format!("sovereign log:\n{}", server.proc.log_tail(30)))?;
    thread::sleep(cfg.idle);
    let idle_rss_kib = rss::tree_rss_kib(server.proc.pid());
    let idle_pss_kib = rss::tree_pss_kib(server.proc.pid());
    let samples = measure::run(
        plan,
        listen,
        "/maps/tile",
        Sides {
            a: a.port,
            b: b.port,
        },
        |port| measure::save(&source, &instances(port)).context("save instances.yaml"),
    )
    .with_context(|| format!("sovereign log:\n{}", server.proc.log_tail(30)))?;
    drop(envoy);
    drop(server);
    Ok(Outcome {
        samples,
        idle_rss_kib,
        idle_pss_kib,
    })
}
