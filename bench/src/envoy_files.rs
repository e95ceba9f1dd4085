//! Peer: Envoy's own file-based dynamic configuration, no control plane at all.
//!
//! `lds_config` and `cds_config` are `path_config_source`s with a `watched_directory`:
//! Envoy re-reads the file when a file is moved into that directory, which is its
//! documented way to update (write the new file elsewhere, `mv` it over the old one).
//! This is the floor: the time Envoy itself needs from rename to serving.

use std::path::Path;

use anyhow::Context;
use misaki_e2e::{Upstream, free_port};

use crate::measure::{self, Plan, Sample, Sides};
use crate::peer;

fn cds(version: u64, upstream: u16) -> String {
    format!(
        "version_info: \"{version}\"\nresources:\n{}",
        peer::cluster_yaml(&upstream.to_string(), 0)
    )
}

fn lds(port: u16) -> String {
    format!(
        "version_info: \"1\"\nresources:\n{}",
        peer::listener_yaml(port, 0)
    )
}

fn bootstrap(admin_port: u16, dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"{head}dynamic_resources:
  cds_config:
    resource_api_version: V3
    path_config_source:
      path: {d}/cds.yaml
      watched_directory: {{ path: {d} }}
  lds_config:
    resource_api_version: V3
    path_config_source:
      path: {d}/lds.yaml
      watched_directory: {{ path: {d} }}
"#,
        head = peer::bootstrap_head("bench-files", admin_port)
    )
}

pub fn edit_latency(plan: &Plan, dir: &Path) -> anyhow::Result<Vec<Sample>> {
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let listen = free_port();
    // Only the two xDS files live in the watched directory; the bootstrap and logs
    // stay outside it, so nothing else moving there triggers a reload.
    let watched = dir.join("xds");
    std::fs::create_dir_all(&watched)?;
    measure::save(&watched.join("lds.yaml"), &lds(listen))?;
    measure::save(&watched.join("cds.yaml"), &cds(1, a.port))?;
    let admin = peer::admin_port();
    let _envoy = peer::start_envoy("files", &bootstrap(admin, &watched), admin, dir)?;
    let mut version = 1;
    let samples = measure::run(
        plan,
        listen,
        "/maps/tile",
        Sides {
            a: a.port,
            b: b.port,
        },
        |port| {
            version += 1;
            measure::save(&watched.join("cds.yaml"), &cds(version, port)).context("save cds.yaml")
        },
    )?;
    // The upstreams must outlive the last poll.
    drop((a, b));
    Ok(samples)
}
