//! Cloud → vehicle through reverse tunnels with data-plane mutual TLS (`mesh.mtls:
//! strict`), on loopback with real processes:
//!
//! ```text
//!  cloud call ─▶ cloud Envoy vehicle_gateway ─(car-1's tunnel, TLS)─▶ vehicle Envoy ─▶ diag
//!                 ▲ ADS over mTLS (cloud cert)     ▲ tunnels dialled out by the vehicle
//!  misaki-cp (--ca: enrolment, fleet registry) ◀── edge-netd car-1 (claim → certificate,
//!                                              │   feeds its Envoy on a Unix socket)
//!                                              ◀── edge-netd car-2 (claim; no Envoy)
//!  impostor Envoy (static, car-1's certificate, declares car-2) ──▶ vehicle_tunnel: 403
//!  plaintext Envoy (no certificate, declares car-2)            ──▶ vehicle_tunnel: TLS fails
//! ```
//!
//! car-1, enrolled with its claim, is reached through its mTLS tunnel. An attacker
//! holding car-1's certificate and key, with a hand-written Envoy whose `rc://` listener
//! declares car-2, is refused at the tunnel handshake (the cloud Envoy's validation of
//! the declared id against the certificate's): car-2's calls answer `503 no-tunnel`,
//! never the attacker's service. A tunnel without TLS is refused at TLS.
//!
//! Needs Envoy and the built binaries; everything on fresh ephemeral ports in a temp dir,
//! every process under a guard. Timing is asserted only as generous deadlines.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use misaki_e2e::mtls_lab::HeaderEcho;
use misaki_e2e::process::wait_for;
use misaki_e2e::tls::{FleetCa, TLS_DIR_IN_CONFIGS, install_sds};
use misaki_e2e::{ControlPlane, Envoy, Process, Upstream, free_port, http, repo_root, target_bin};

const LONG: Duration = Duration::from_secs(60);
const TARGET: &str = "x-misaki-target-vehicle";
const REASON: &str = "x-misaki-reason";
/// The cloud Envoy's counter of tunnel handshakes refused by the `reverse_tunnel`
/// filter's validation (the declared id is not the certificate's).
const VALIDATION_FAILED: &str = "reverse_tunnel.handshake.validation_failed";

struct Ports {
    outbound: u16,
    inbound: u16,
    cloud: u16,
    gateway: u16,
    tunnel: u16,
}

/// `mesh.mtls: strict`, tunnels to 127.0.0.1 over class `standard` (uplink `wifi` on
/// `lo`), and one vehicle service `diag` (no replica) on `127.0.0.1:<diag>`.
fn policy(p: &Ports, diag: u16) -> String {
    format!(
        "version: 1
mesh:
  vehicle_outbound_port: {}
  vehicle_inbound_port: {}
  cloud_inbound_port: {}
  vehicle_gateway_port: {}
  vehicle_tunnel_port: {}
  vehicle_gateways: [127.0.0.1]
  vehicle_tunnel_class: standard
  mtls: strict
uplinks:
  - {{ name: wifi, kind: wifi, cost: 1 }}
classes:
  - {{ name: standard, timeout: 5s, retries: 1, uplinks: [wifi] }}
services:
  - {{ name: diag, location: vehicle, port: {diag}, routes: [\"/diag\"], class: standard }}
",
        p.outbound, p.inbound, p.cloud, p.gateway, p.tunnel
    )
}

/// One vehicle's edge-netd: enrols with its claim over mTLS, serves xDS (with the
/// certificate by SDS) on a Unix socket only.
struct Car {
    proc: Process,
    socket: PathBuf,
    /// Where edge-netd writes the enrolled certificate and key.
    tls: PathBuf,
}

fn start_car(
    dir: &Path,
    ca: &FleetCa,
    id: &str,
    cp: &ControlPlane,
    probe: &str,
    policy: &Path,
) -> Car {
    let car = dir.join(id);
    let claim = car.join("claim");
    ca.issue(&["--claim", id, "--valid-for", "8760h"], &claim);
    let tls = car.join("tls");
    fs::create_dir_all(&tls).expect("vehicle tls dir");
    let socket = car.join("xds.sock");
    let config = format!(
        "vehicle_id: {id}\n\
         control_plane: https://127.0.0.1:{cp_port}\n\
         api: 127.0.0.1:{api}\n\
         xds: {{ socket: {socket} }}\n\
         state_dir: {state}\n\
         factory_policy: {policy}\n\
         heartbeat_interval: 200ms\n\
         uplinks:\n\
         \x20 - {{ name: wifi, interface: lo, kind: wifi, cost: 1 }}\n\
         probe:\n\
         \x20 targets: [\"{probe}\"]\n\
         tls:\n\
         \x20 ca: {claim}/ca.pem\n\
         \x20 cert: {tls}/cert.pem\n\
         \x20 key: {tls}/key.pem\n\
         \x20 claim_cert: {claim}/cert.pem\n\
         \x20 claim_key: {claim}/key.pem\n",
        cp_port = cp.xds_port,
        api = free_port(),
        socket = socket.display(),
        state = car.join("state").display(),
        policy = policy.display(),
        claim = claim.display(),
        tls = tls.display(),
    );
    let config_path = car.join("edge-netd.yaml");
    fs::write(&config_path, config).expect("write edge-netd config");
    let proc = Process::spawn(
        "edge-netd",
        Command::new(target_bin("edge-netd"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
        car.join("edge-netd.log"),
    );
    Car { proc, socket, tls }
}

/// `envoy-configs/vehicle-sidecar-edge-socket.yaml` on `socket` with a fresh admin
/// port, waiting until LIVE.
fn vehicle_envoy(dir: &Path, socket: &Path) -> Envoy {
    let template_path = repo_root().join("envoy-configs/vehicle-sidecar-edge-socket.yaml");
    let template = fs::read_to_string(&template_path).expect("read the socket bootstrap");
    let admin_port = free_port();
    let (pipe, admin) = ("path: /run/misaki/xds.sock", "port_value: 19904");
    assert!(
        template.contains(pipe) && template.contains(admin),
        "{} has no `{pipe}` or `{admin}` to rewrite",
        template_path.display()
    );
    let cfg = template
        .replace(pipe, &format!("path: {}", socket.display()))
        .replace(admin, &format!("port_value: {admin_port}"));
    Envoy::try_start_config("vehicle-car-1", &cfg, admin_port, dir)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `envoy-configs/cloud-sidecar-mtls.yaml`: ADS over mTLS to `cp` with a cloud
/// certificate (file-based SDS in `tls`, also its `tls_dir` for the data plane).
fn cloud_envoy(dir: &Path, ca: &FleetCa, cp: &ControlPlane) -> Envoy {
    let tls = dir.join("cloud-tls");
    ca.issue(&["--cloud", "gateway"], &tls);
    install_sds(&tls);
    let text = fs::read_to_string(repo_root().join("envoy-configs/cloud-sidecar-mtls.yaml"))
        .expect("read cloud-sidecar-mtls.yaml");
    let admin = free_port();
    for from in ["port_value: 18000", "port_value: 19906", TLS_DIR_IN_CONFIGS] {
        assert!(
            text.contains(from),
            "cloud-sidecar-mtls.yaml has no `{from}`"
        );
    }
    let cfg = text
        .replace("port_value: 18000", &format!("port_value: {}", cp.xds_port))
        .replace("port_value: 19906", &format!("port_value: {admin}"))
        .replace(TLS_DIR_IN_CONFIGS, &tls.display().to_string());
    Envoy::try_start_config("cloud-gw", &cfg, admin, dir).unwrap_or_else(|e| panic!("{e}"))
}

/// A hand-written static Envoy (what an attacker can run without misaki's config): a
/// reverse tunnel declaring node and cluster `declared` to `127.0.0.1:tunnel_port`,
/// over TLS with the certificate and key in `cert_dir` (trusting `ca`) or, without
/// `cert_dir`, in plaintext; requests arriving through it go to `127.0.0.1:service`.
/// The text and its admin port.
fn attacker_bootstrap(
    declared: &str,
    tunnel_port: u16,
    cert_dir: Option<&Path>,
    ca: &Path,
    service: u16,
) -> (String, u16) {
    let admin = free_port();
    let tls = match cert_dir {
        None => String::new(),
        Some(d) => format!(
            r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            tls_certificates:
              - certificate_chain: {{ filename: {d}/cert.pem }}
                private_key: {{ filename: {d}/key.pem }}
            validation_context:
              trusted_ca: {{ filename: {ca} }}"#,
            d = d.display(),
            ca = ca.display()
        ),
    };
    let cfg = format!(
        r#"node: {{ id: {declared}, cluster: {declared} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
bootstrap_extensions:
  - name: envoy.bootstrap.reverse_tunnel.downstream_socket_interface
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.bootstrap.reverse_tunnel.downstream_socket_interface.v3.DownstreamReverseConnectionSocketInterface
      stat_prefix: reverse_tunnel
      maintain_interval: 1s
static_resources:
  clusters:
    - name: cloud
      type: STATIC
      connect_timeout: 2s
      load_assignment:
        cluster_name: cloud
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tunnel_port} }} }} }}{tls}
    - name: stolen_service
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: stolen_service
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {service} }} }} }}
  listeners:
    - name: tunnel
      address:
        socket_address:
          address: "rc://{declared}:{declared}:misaki@cloud:1"
          port_value: 0
          resolver_name: envoy.resolvers.reverse_connection
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: tunnel
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: stolen_service }} }}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    );
    (cfg, admin)
}

/// Every stat of `envoy` whose name ends with `suffix` and contains `part`: (name, value).
fn stats_matching(envoy: &Envoy, part: &str, suffix: &str) -> Vec<(String, u64)> {
    let body = http::get(envoy.admin_port, "/stats")
        .map(|r| r.body)
        .unwrap_or_default();
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.contains(part) && k.ends_with(suffix))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

fn stat_sum(envoy: &Envoy, part: &str, suffix: &str) -> u64 {
    stats_matching(envoy, part, suffix)
        .iter()
        .map(|(_, v)| v)
        .sum()
}

fn gateway_call(ports: &Ports, vehicle: &str, path: &str) -> http::Reply {
    http::request(ports.gateway, "GET", path, &[(TARGET, vehicle)], b"")
        .unwrap_or_else(|e| panic!("gateway request {path} for {vehicle}: {e}"))
}

fn logs(cloud: &Envoy, vehicle: Option<&Envoy>, cp: &ControlPlane) -> String {
    format!(
        "---- cloud Envoy ----\n{}\n---- vehicle Envoy ----\n{}\n---- misaki-cp ----\n{}",
        cloud.proc.log_text(),
        vehicle.map(|v| v.proc.log_text()).unwrap_or_default(),
        misaki_harness::strip_ansi(&cp.proc.log_text())
    )
}

#[test]
fn vehicle_tunnels_under_mtls_carry_only_the_certificate_holders_own_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = FleetCa::init(&dir.path().join("ca"));
    let server = dir.path().join("server");
    ca.issue(&["--server", "localhost", "127.0.0.1"], &server);

    let diag = HeaderEcho::start();
    let stolen = Upstream::start("impostor-service");
    let ports = Ports {
        outbound: free_port(),
        inbound: free_port(),
        cloud: free_port(),
        gateway: free_port(),
        tunnel: free_port(),
    };
    let policy_path = dir.path().join("mesh.yaml");
    fs::write(&policy_path, policy(&ports, diag.port)).expect("write policy");

    // misaki-cp over mutual TLS with enrolment (--ca), the fleet registry, the probe echo.
    let probe = format!("127.0.0.1:{}", free_port());
    let mut args = ca.serve_args(&server);
    args.extend(["--probe-addr".into(), probe.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = ControlPlane::start_with(&policy_path, dir.path(), free_port(), free_port(), &args);

    let car1 = start_car(dir.path(), &ca, "car-1", &cp, &probe, &policy_path);
    let car2 = start_car(dir.path(), &ca, "car-2", &cp, &probe, &policy_path);
    let bound = wait_for(LONG, || car1.socket.exists().then_some(()));
    assert!(
        bound.is_some(),
        "edge-netd car-1 never made its socket:\n{}",
        car1.proc.log_text()
    );
    let cloud = cloud_envoy(dir.path(), &ca, &cp);
    let vehicle = vehicle_envoy(dir.path(), &car1.socket);

    // (a) car-1 through its mTLS tunnel: the vehicle's own service answers.
    let mut last = None;
    let ok = wait_for(LONG, || {
        let r = gateway_call(&ports, "car-1", "/diag/first");
        let ok = r.status == 200;
        last = Some(r);
        ok.then_some(())
    });
    assert!(
        ok.is_some(),
        "car-1 never reached through the gateway; last: {last:?}\n{}\n---- edge-netd car-1 ----\n{}",
        logs(&cloud, Some(&vehicle), &cp),
        car1.proc.log_text()
    );
    let seen = diag.requests();
    assert!(
        seen.iter().any(|q| q.path == "/diag/first"),
        "the vehicle's diag did not see the call: {seen:?}"
    );
    let tunnel_listener = format!("listener.0.0.0.0_{}.", ports.tunnel);
    assert!(
        stat_sum(&cloud, &tunnel_listener, ".ssl.handshake") >= 1,
        "no TLS handshake on the tunnel listener: {:?}",
        stats_matching(&cloud, &tunnel_listener, "")
    );

    // car-2 is online (its edge-netd reports) but has no Envoy, so no tunnel.
    let online = wait_for(LONG, || {
        let r = cp.admin(&format!("/fleet/{}", "car-2"));
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        (v["online"] == serde_json::Value::Bool(true)).then_some(())
    });
    assert!(
        online.is_some(),
        "car-2 never online: {}\n---- edge-netd car-2 ----\n{}",
        cp.admin("/fleet/car-2").body,
        car2.proc.log_text()
    );
    let no_tunnel = wait_for(LONG, || {
        let r = gateway_call(&ports, "car-2", "/diag/before");
        (r.status == 503 && r.header(REASON) == Some("no-tunnel")).then_some(())
    });
    assert!(
        no_tunnel.is_some(),
        "car-2 without a tunnel: {:?}",
        gateway_call(&ports, "car-2", "/diag/before")
    );

    // (b) An impostor with car-1's certificate and key (as edge-netd enrolled it)
    // declaring car-2: refused at the tunnel handshake, and never given car-2's calls.
    let validation_before = stat_sum(&cloud, "", "validation_failed");
    let (cfg, admin) = attacker_bootstrap(
        "car-2",
        ports.tunnel,
        Some(&car1.tls),
        &ca.dir.join("ca.pem"),
        stolen.port,
    );
    let impostor = Envoy::try_start_config("impostor", &cfg, admin, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    // TLS with car-1's certificate succeeds; the tunnel handshake is refused, each try.
    let refusals = || {
        impostor
            .proc
            .log_text()
            .matches("HTTP handshake failed with status 403")
            .count()
    };
    let got_403 = wait_for(LONG, || (refusals() >= 2).then_some(()));
    assert!(
        got_403.is_some(),
        "the impostor's tunnel handshakes were not answered 403 (twice):\n{}\n{}",
        impostor.proc.log_text(),
        logs(&cloud, None, &cp)
    );
    // It keeps trying (every second); car-2's calls still find no tunnel.
    for i in 0..10 {
        let r = gateway_call(&ports, "car-2", &format!("/diag/impostor-{i}"));
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.header(REASON), Some("no-tunnel"), "{r:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        stolen.seen().is_empty(),
        "the impostor's service got calls: {:?}",
        stolen.seen()
    );
    // car-1 is unaffected.
    let r = gateway_call(&ports, "car-1", "/diag/still");
    assert_eq!(r.status, 200, "{r:?}");
    drop(impostor);

    // (c) A tunnel without TLS: refused at TLS, before any handshake.
    let tls_errors = stat_sum(&cloud, &tunnel_listener, ".ssl.connection_error");
    let (cfg, admin) = attacker_bootstrap(
        "car-2",
        ports.tunnel,
        None,
        &ca.dir.join("ca.pem"),
        stolen.port,
    );
    let plaintext = Envoy::try_start_config("plaintext", &cfg, admin, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = wait_for(LONG, || {
        (stat_sum(&cloud, &tunnel_listener, ".ssl.connection_error") > tls_errors).then_some(())
    });
    assert!(
        refused.is_some(),
        "no TLS error on the tunnel listener for a plaintext tunnel: {:?}\n---- plaintext ----\n{}",
        stats_matching(&cloud, &tunnel_listener, ""),
        plaintext.proc.log_text()
    );
    // Raw: a plaintext HTTP handshake gets no HTTP answer.
    let mut s =
        TcpStream::connect(("127.0.0.1", ports.tunnel)).expect("connect to the tunnel port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"POST /reverse_connections/request HTTP/1.1\r\nhost: cloud\r\nx-envoy-reverse-tunnel-node-id: car-2\r\nx-envoy-reverse-tunnel-cluster-id: car-2\r\ncontent-length: 0\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a plaintext handshake got an HTTP answer: {}",
        String::from_utf8_lossy(&answer)
    );
    let r = gateway_call(&ports, "car-2", "/diag/plaintext");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header(REASON), Some("no-tunnel"), "{r:?}");
    assert!(stolen.seen().is_empty(), "{:?}", stolen.seen());
    drop(plaintext);

    // The cloud counts the impostor's refusals (it retried every second). Last, so that
    // everything above is checked even where this stat is missing.
    let failed = stat_sum(&cloud, "", "validation_failed");
    assert!(
        failed >= validation_before + 2,
        "the cloud Envoy's /stats has no (or too small a) reverse-tunnel validation failure \
         counter: {VALIDATION_FAILED} = {failed} (before the impostor: {validation_before}); \
         stats with `reverse`: {:?}. (The stat exists once `reverse_tunnel.` is in the \
         bootstrap's stats_config inclusion list.)",
        stats_matching(&cloud, "reverse", "")
    );
    assert_eq!(
        stats_matching(&cloud, "", "validation_failed")
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        [VALIDATION_FAILED]
    );
    drop(vehicle);
    drop(cloud);
}
