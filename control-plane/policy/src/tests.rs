//! Tests of the whole crate through its public API: the quickstart, one test per
//! error kind (exact line, column and path), directory merging, and properties.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use crate::*;

const QUICKSTART: &str = include_str!("../../../examples/quickstart/mesh.yaml");

/// A small valid policy; tests break one line of it. Line numbers:
/// 1 version, 3 uplink name, 4 kind, 6 class name, 7 class uplinks,
/// 9 service name, 10 location, 11 port, 12 endpoints, 13 routes, 14 class.
const MINI: &str = "\
version: 1
uplinks:
  - name: wifi
    kind: wifi
classes:
  - name: std
    uplinks: [wifi]
services:
  - name: app
    location: cloud
    port: 80
    endpoints: [\"10.0.0.1:80\"]
    routes: [\"/app\"]
    class: std
";

/// MINI with `from` replaced by `to` (which must occur).
fn mini_with(from: &str, to: &str) -> String {
    assert!(MINI.contains(from), "test bug: `{from}` not in MINI");
    MINI.replacen(from, to, 1)
}

fn errors_of(text: &str) -> Vec<PolicyError> {
    match parse("p.yaml", text) {
        Ok(p) => panic!("expected errors, got a policy: {p:?}"),
        Err(e) => e.0,
    }
}

/// Asserts exactly one error, at `line:column` with `path` and `kind`; returns
/// its message for further checks.
#[track_caller]
fn the_error(text: &str, line: usize, column: usize, path: &str, kind: ErrorKind) -> String {
    let errs = errors_of(text);
    assert_eq!(
        errs.len(),
        1,
        "expected one error, got:\n{}",
        PolicyErrors(errs.clone())
    );
    let e = &errs[0];
    assert_eq!(
        (e.line, e.column, e.path.as_str(), e.kind),
        (line, column, path, kind),
        "error was: {e}"
    );
    assert_eq!(e.file, "p.yaml");
    e.message.clone()
}

// ---- valid policies ---------------------------------------------------------

#[test]
fn quickstart_policy_parses_with_every_field_as_written() {
    let p = parse("examples/quickstart/mesh.yaml", QUICKSTART).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.mesh, MeshSettings::default());
    assert_eq!(p.uplinks.len(), 3);
    assert_eq!(
        p.uplinks["lte"],
        Uplink {
            name: "lte".into(),
            kind: UplinkKind::Lte,
            metered: true,
            cost: 10
        }
    );
    assert_eq!(p.uplinks["dsrc"].cost, 0);
    assert!(!p.uplinks["wifi"].metered);

    let critical = &p.classes["critical"];
    assert_eq!(critical.priority, RoutePriority::High);
    assert_eq!(critical.timeout, Duration::from_secs(2));
    assert_eq!(critical.retries, 3);
    assert_eq!(critical.uplinks, ["dsrc", "lte", "wifi"]);
    assert_eq!(critical.dscp, 46);
    assert_eq!(critical.max_rtt, Some(Duration::from_millis(300)));
    assert!(!critical.deferrable);

    let standard = &p.classes["standard"];
    assert_eq!(standard.priority, RoutePriority::Default);
    assert_eq!(
        (standard.timeout, standard.retries),
        (Duration::from_secs(10), 2)
    );
    assert_eq!(standard.uplinks, ["wifi", "lte"]);

    let bulk = &p.classes["bulk"];
    assert!(bulk.deferrable);
    assert_eq!(
        (bulk.dscp, bulk.ttl),
        (8, Some(Duration::from_secs(24 * 3600)))
    );
    assert_eq!(bulk.max_loss_percent, None);

    assert_eq!(p.services.len(), 4);
    let telemetry = &p.services["telemetry"];
    assert_eq!(telemetry.location, Location::Cloud);
    assert_eq!(
        telemetry.endpoints,
        [Endpoint {
            host: "127.0.0.1".into(),
            port: 18081
        }]
    );
    assert_eq!(p.class_of(telemetry).name, "bulk");
    assert_eq!(p.services["hazard-alerts"].location, Location::Edge);
    let diag = &p.services["diagnostics"];
    assert_eq!((diag.location, diag.port), (Location::Vehicle, 18090));
    assert!(
        diag.endpoints.is_empty(),
        "vehicle service without endpoints stays empty"
    );
    assert_eq!(diag.routes, ["/diagnostics"]);
}

#[test]
fn optional_fields_take_their_documented_defaults() {
    let p = parse("p.yaml", MINI).unwrap_or_else(|e| panic!("{e}"));
    let u = &p.uplinks["wifi"];
    assert_eq!((u.metered, u.cost), (false, 0));
    let c = &p.classes["std"];
    assert_eq!(c.priority, RoutePriority::Default);
    assert_eq!(c.timeout, DEFAULT_TIMEOUT);
    assert_eq!((c.retries, c.deferrable, c.dscp), (0, false, 0));
    assert_eq!((c.max_rtt, c.max_loss_percent, c.ttl), (None, None, None));
    assert_eq!(p.services["app"].protocol, Protocol::Http);
}

#[test]
fn services_section_may_be_absent_or_null() {
    let cut = &MINI[..MINI.find("services:").unwrap_or(MINI.len())];
    assert!(
        parse("p.yaml", cut)
            .unwrap_or_else(|e| panic!("{e}"))
            .services
            .is_empty()
    );
    let null = format!("{cut}services:\n");
    assert!(parse("p.yaml", &null).is_ok());
}

#[test]
fn endpoints_accept_ipv4_bracketed_ipv6_and_dns_names() {
    let text = mini_with(
        "[\"10.0.0.1:80\"]",
        "[\"10.0.0.1:80\", \"[2001:db8::1]:443\", \"maps.internal.example:8080\"]",
    );
    let p = parse("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let hosts: Vec<(&str, u16)> = p.services["app"]
        .endpoints
        .iter()
        .map(|e| (e.host.as_str(), e.port))
        .collect();
    assert_eq!(
        hosts,
        [
            ("10.0.0.1", 80),
            ("2001:db8::1", 443),
            ("maps.internal.example", 8080)
        ]
    );
}

#[test]
fn grpc_protocol_and_explicit_mesh_ports_are_read() {
    let text = format!(
        "{}mesh:\n  vehicle_outbound_port: 20001\n  vehicle_inbound_port: 20006\n  cloud_inbound_port: 20443\n",
        mini_with("    port: 80\n", "    port: 80\n    protocol: grpc\n")
    );
    let p = parse("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.services["app"].protocol, Protocol::Grpc);
    assert_eq!(
        p.mesh,
        MeshSettings {
            vehicle_outbound_port: 20001,
            vehicle_inbound_port: 20006,
            cloud_inbound_port: 20443,
            ..MeshSettings::default()
        }
    );
}

#[test]
fn the_mtls_example_parses_as_strict() {
    let text = include_str!("../../../examples/mtls/mesh.yaml");
    let p = parse("examples/mtls/mesh.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.mesh.mtls, MtlsMode::Strict);
    assert_eq!(p.mesh.trust_domain, TrustDomain::default());
}

#[test]
fn the_vehicle_gateway_example_is_valid() {
    let text = include_str!("../../../examples/vehicle-gateway/mesh.yaml");
    let p = parse("examples/vehicle-gateway/mesh.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.mesh.vehicle_gateways, ["gateway.cloud.example.net"]);
    assert_eq!(p.mesh.vehicle_tunnel_class.as_deref(), Some("standard"));
    assert_eq!(
        (p.mesh.vehicle_gateway_port, p.mesh.vehicle_tunnel_port),
        (15444, 15445)
    );
    let diag = &p.services["diag"];
    assert_eq!(diag.on_low_power, LowPowerAction::Cloud);
    assert_eq!(diag.cloud_replica.len(), 1);
    assert!(p.services["cam"].cloud_replica.is_empty());
}

#[test]
fn mtls_is_off_in_misaki_local_by_default_and_both_are_read() {
    let p = parse("p.yaml", MINI).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.mesh.mtls, MtlsMode::Off);
    assert_eq!(p.mesh.trust_domain.as_str(), "misaki.local");
    for (mode, want) in MtlsMode::ALL {
        let text = format!("{MINI}mesh:\n  mtls: {mode}\n  trust_domain: fleet-7.example\n");
        let p = parse("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.mesh.mtls, want, "{mode}");
        assert_eq!(p.mesh.mtls.as_str(), mode);
        assert_eq!(p.mesh.trust_domain.as_str(), "fleet-7.example");
    }
}

#[test]
fn an_unknown_mtls_mode_is_located_with_a_suggestion() {
    let text = format!("{MINI}mesh:\n  mtls: strcit\n");
    let msg = the_error(&text, 16, 9, "mesh.mtls", ErrorKind::InvalidValue);
    assert_eq!(
        msg,
        "unknown mtls mode `strcit`; expected one of: off, permissive, strict; did you mean `strict`?"
    );
    // A YAML 1.2 boolean is not a mode: `true` is not `strict`.
    let text = format!("{MINI}mesh:\n  mtls: true\n");
    let msg = the_error(&text, 16, 9, "mesh.mtls", ErrorKind::WrongType);
    assert!(msg.contains("found boolean"), "{msg}");
}

#[test]
fn a_trust_domain_follows_the_fleet_ca_rules() {
    for bad in ["Misaki.Local", "misaki/local", "\"\""] {
        let text = format!("{MINI}mesh:\n  trust_domain: {bad}\n");
        let msg = the_error(&text, 16, 17, "mesh.trust_domain", ErrorKind::InvalidValue);
        assert!(msg.starts_with("invalid trust domain"), "{msg}");
        assert!(msg.contains("e.g. `misaki.local`"), "{msg}");
    }
    let text = format!("{MINI}mesh:\n  trust_domain: 7\n");
    the_error(&text, 16, 17, "mesh.trust_domain", ErrorKind::WrongType);
    let long = "a".repeat(256);
    let text = format!("{MINI}mesh:\n  trust_domain: {long}\n");
    the_error(&text, 16, 17, "mesh.trust_domain", ErrorKind::InvalidValue);
}

#[test]
fn a_misspelt_mesh_field_lists_the_mtls_fields() {
    let text = format!("{MINI}mesh:\n  mtsl: strict\n");
    let msg = the_error(&text, 16, 3, "mesh.mtsl", ErrorKind::UnknownField);
    assert!(msg.contains("did you mean `mtls`?"), "{msg}");
    assert!(msg.contains("mtls, trust_domain"), "{msg}");
}

// ---- one test per error kind -------------------------------------------------

#[test]
fn yaml_syntax_error_is_reported_at_its_position() {
    let text = mini_with("    kind: wifi\n", "    kind: [wifi\n");
    let msg = the_error(&text, 5, 8, "", ErrorKind::Syntax);
    assert!(msg.starts_with("invalid YAML: "), "{msg}");
}

#[test]
fn duplicate_key_in_one_mapping_is_reported_at_the_second_key() {
    let text = mini_with("    kind: wifi\n", "    kind: wifi\n    kind: lte\n");
    let msg = the_error(&text, 5, 5, "", ErrorKind::Syntax);
    assert!(msg.contains("duplicated key"), "{msg}");
}

#[test]
fn empty_file_is_an_error() {
    let msg = the_error("", 1, 1, "", ErrorKind::Structure);
    assert!(msg.contains("empty"), "{msg}");
    the_error("# only a comment\n", 1, 1, "", ErrorKind::Structure);
    the_error("---\n", 1, 1, "", ErrorKind::Structure);
}

#[test]
fn top_level_that_is_not_a_mapping_is_an_error() {
    let msg = the_error("- version: 1\n", 1, 1, "", ErrorKind::Structure);
    assert!(msg.contains("found a list"), "{msg}");
    the_error("just text\n", 1, 1, "", ErrorKind::Structure);
}

#[test]
fn second_yaml_document_in_one_file_is_an_error() {
    let text = format!("{MINI}---\nversion: 1\n");
    let msg = the_error(&text, 16, 1, "", ErrorKind::Structure);
    assert!(msg.contains("second"), "{msg}");
}

#[test]
fn unknown_field_is_named_with_a_suggestion_and_the_allowed_fields() {
    let text = mini_with("    port: 80\n", "    port: 80\n    protocl: http\n");
    let msg = the_error(&text, 12, 5, "services[0].protocl", ErrorKind::UnknownField);
    assert_eq!(
        msg,
        "unknown field `protocl`; did you mean `protocol`?; allowed fields here: \
         name, location, protocol, port, endpoints, routes, class, consumes, cloud_replica, on_low_power"
    );
}

#[test]
fn unknown_top_level_section_is_reported() {
    let text = format!("{MINI}routes: []\n");
    let msg = the_error(&text, 15, 1, "routes", ErrorKind::UnknownField);
    assert!(
        msg.contains("version, mesh, uplinks, classes, services"),
        "{msg}"
    );
}

#[test]
fn wrong_type_says_what_was_expected_and_found() {
    let text = mini_with("    uplinks: [wifi]\n", "    uplinks: wifi\n");
    let msg = the_error(&text, 7, 14, "classes[0].uplinks", ErrorKind::WrongType);
    assert_eq!(msg, "expected a list of uplink names, found string `wifi`");
}

#[test]
fn quoted_number_is_a_string_not_a_port() {
    let text = mini_with("    port: 80\n", "    port: \"80\"\n");
    let msg = the_error(&text, 11, 11, "services[0].port", ErrorKind::WrongType);
    assert_eq!(
        msg,
        "expected an integer from 1 to 65535, found string `80`"
    );
}

#[test]
fn yes_is_not_a_boolean_in_yaml_1_2() {
    let text = mini_with("    kind: wifi\n", "    kind: wifi\n    metered: yes\n");
    let msg = the_error(&text, 5, 14, "uplinks[0].metered", ErrorKind::WrongType);
    assert_eq!(msg, "expected true or false, found string `yes`");
}

#[test]
fn missing_required_field_is_reported_at_the_item_that_lacks_it() {
    let text = mini_with("    kind: wifi\n", "");
    let msg = the_error(&text, 3, 5, "uplinks[0].kind", ErrorKind::MissingField);
    assert_eq!(
        msg,
        "missing required field `kind` (one of: lte, 5g, 3g, wifi, dsrc, lpwa)"
    );
}

#[test]
fn required_field_without_a_value_is_reported_at_the_field() {
    let text = mini_with("    class: std\n", "    class:\n");
    let msg = the_error(&text, 14, 10, "services[0].class", ErrorKind::MissingField);
    assert!(msg.starts_with("`class` has no value"), "{msg}");
}

#[test]
fn missing_version_and_sections_are_reported_at_the_top_of_the_file() {
    let errs = errors_of("services: []\n");
    let got: Vec<(usize, usize, &str, ErrorKind)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        got,
        [
            (1, 1, "version", ErrorKind::MissingField),
            (1, 1, "uplinks", ErrorKind::MissingField),
            (1, 1, "classes", ErrorKind::MissingField),
        ]
    );
}

#[test]
fn empty_uplinks_section_is_reported_at_the_list() {
    let text = "version: 1\nuplinks: []\nclasses:\n  - name: c\n    uplinks: [x]\n";
    let errs = errors_of(text);
    assert_eq!(
        (errs[0].line, errs[0].column, errs[0].path.as_str()),
        (2, 10, "uplinks")
    );
    assert_eq!(errs[0].kind, ErrorKind::InvalidValue);
    // And the class's reference cannot resolve.
    assert_eq!(errs[1].kind, ErrorKind::UnknownReference);
    assert_eq!(
        errs[1].message,
        "unknown uplink `x`; no uplinks are defined"
    );
}

#[test]
fn unsupported_version_is_rejected() {
    let text = mini_with("version: 1\n", "version: 2\n");
    let msg = the_error(&text, 1, 10, "version", ErrorKind::UnsupportedVersion);
    assert!(msg.contains("reads version 1"), "{msg}");
}

#[test]
fn bad_enum_value_lists_the_allowed_values_and_suggests_the_closest() {
    let text = mini_with("    kind: wifi\n", "    kind: wfi\n");
    let msg = the_error(&text, 4, 11, "uplinks[0].kind", ErrorKind::InvalidValue);
    assert_eq!(
        msg,
        "unknown uplink kind `wfi`; expected one of: lte, 5g, 3g, wifi, dsrc, lpwa; did you mean `wifi`?"
    );
    let text = mini_with("    location: cloud\n", "    location: mars\n");
    let msg = the_error(
        &text,
        10,
        15,
        "services[0].location",
        ErrorKind::InvalidValue,
    );
    assert_eq!(
        msg,
        "unknown location `mars`; expected one of: vehicle, edge, cloud"
    );
}

#[test]
fn bad_duration_says_which_units_exist() {
    let text = mini_with(
        "    uplinks: [wifi]\n",
        "    uplinks: [wifi]\n    timeout: 2 seconds\n",
    );
    let msg = the_error(&text, 8, 14, "classes[0].timeout", ErrorKind::InvalidValue);
    assert_eq!(
        msg,
        "`2 seconds`: unknown unit ` seconds`; expected one of ms, s, m, h"
    );

    let text = mini_with(
        "    uplinks: [wifi]\n",
        "    uplinks: [wifi]\n    max_rtt: 300\n",
    );
    let msg = the_error(&text, 8, 14, "classes[0].max_rtt", ErrorKind::WrongType);
    assert!(msg.contains("`300s` or `300ms`"), "{msg}");

    let text = mini_with(
        "    uplinks: [wifi]\n",
        "    uplinks: [wifi]\n    ttl: 1.5h\n",
    );
    let msg = the_error(&text, 8, 10, "classes[0].ttl", ErrorKind::InvalidValue);
    assert!(msg.contains("fractions are not supported"), "{msg}");
}

#[test]
fn zero_timeout_is_out_of_range() {
    let text = mini_with(
        "    uplinks: [wifi]\n",
        "    uplinks: [wifi]\n    timeout: 0s\n",
    );
    let msg = the_error(&text, 8, 14, "classes[0].timeout", ErrorKind::OutOfRange);
    assert_eq!(msg, "duration `0s` must be greater than zero");
}

#[test]
fn out_of_range_numbers_state_the_allowed_range() {
    let cases = [
        ("    dscp: 64\n", 8, 11, "classes[0].dscp", "from 0 to 63"),
        (
            "    retries: 11\n",
            8,
            14,
            "classes[0].retries",
            "from 0 to 10",
        ),
        (
            "    max_loss_percent: 101\n",
            8,
            23,
            "classes[0].max_loss_percent",
            "from 0 to 100",
        ),
        ("    dscp: -1\n", 8, 11, "classes[0].dscp", "from 0 to 63"),
    ];
    for (line, l, c, path, range) in cases {
        let text = mini_with(
            "    uplinks: [wifi]\n",
            &format!("    uplinks: [wifi]\n{line}"),
        );
        let msg = the_error(&text, l, c, path, ErrorKind::OutOfRange);
        assert!(msg.contains(range), "{msg}");
    }
    let text = mini_with("    port: 80\n", "    port: 70000\n");
    the_error(&text, 11, 11, "services[0].port", ErrorKind::OutOfRange);
    let text = mini_with("    port: 80\n", "    port: 0\n");
    the_error(&text, 11, 11, "services[0].port", ErrorKind::OutOfRange);
    let text = mini_with("    kind: wifi\n", "    kind: wifi\n    cost: 4294967296\n");
    the_error(&text, 5, 11, "uplinks[0].cost", ErrorKind::OutOfRange);
}

#[test]
fn names_must_be_lowercase_dns_labels() {
    let text = mini_with("  - name: app\n", "  - name: My_App\n");
    let msg = the_error(&text, 9, 11, "services[0].name", ErrorKind::InvalidValue);
    assert!(
        msg.contains("invalid name `My_App`") && msg.contains("`my-app`"),
        "{msg}"
    );

    let long = "a".repeat(64);
    let text = mini_with("  - name: app\n", &format!("  - name: {long}\n"));
    let msg = the_error(&text, 9, 11, "services[0].name", ErrorKind::InvalidValue);
    assert!(msg.contains("at most 63"), "{msg}");
    let ok = "a".repeat(63);
    assert!(
        parse(
            "p.yaml",
            &mini_with("  - name: app\n", &format!("  - name: {ok}\n"))
        )
        .is_ok()
    );
}

#[test]
fn duplicate_names_point_at_the_second_and_mention_the_first() {
    let text = mini_with("classes:\n", "  - name: wifi\n    kind: lte\nclasses:\n");
    let msg = the_error(&text, 5, 11, "uplinks[1].name", ErrorKind::Duplicate);
    assert_eq!(msg, "duplicate uplink name `wifi`; first defined at line 3");

    let text = format!(
        "{MINI}  - name: app\n    location: vehicle\n    port: 81\n    routes: [/b]\n    class: std\n"
    );
    let msg = the_error(&text, 15, 11, "services[1].name", ErrorKind::Duplicate);
    assert_eq!(msg, "duplicate service name `app`; first defined at line 9");
}

#[test]
fn uplink_listed_twice_in_one_class_is_a_duplicate() {
    let text = mini_with("[wifi]", "[wifi, wifi]");
    let msg = the_error(&text, 7, 21, "classes[0].uplinks[1]", ErrorKind::Duplicate);
    assert_eq!(
        msg,
        "`wifi` is listed twice; first as classes[0].uplinks[0]"
    );
}

#[test]
fn class_naming_an_unknown_uplink_suggests_the_closest_name() {
    let text = mini_with("[wifi]", "[wifi, wfii]");
    let msg = the_error(
        &text,
        7,
        21,
        "classes[0].uplinks[1]",
        ErrorKind::UnknownReference,
    );
    assert_eq!(
        msg,
        "unknown uplink `wfii`; did you mean `wifi`?; defined uplinks: wifi"
    );
}

#[test]
fn service_naming_an_unknown_class_is_reported_at_the_reference() {
    let text = mini_with("    class: std\n", "    class: critical\n");
    let msg = the_error(
        &text,
        14,
        12,
        "services[0].class",
        ErrorKind::UnknownReference,
    );
    assert_eq!(msg, "unknown class `critical`; defined classes: std");
}

#[test]
fn route_prefix_used_by_two_services_is_a_conflict() {
    let text = format!(
        "{MINI}  - name: other\n    location: edge\n    port: 81\n    endpoints: [\"e:81\"]\n    routes: [/x, /app]\n    class: std\n"
    );
    let msg = the_error(&text, 19, 18, "services[1].routes[1]", ErrorKind::Conflict);
    assert!(
        msg.starts_with("route prefix `/app` is already used by service `app` at line 13"),
        "{msg}"
    );
}

#[test]
fn route_must_start_with_a_slash() {
    let text = mini_with("[\"/app\"]", "[\"app\"]");
    let msg = the_error(
        &text,
        13,
        14,
        "services[0].routes[0]",
        ErrorKind::InvalidValue,
    );
    assert_eq!(msg, "route `app` must start with `/` (e.g. `/app`)");
}

#[test]
fn two_vehicle_services_on_one_port_conflict() {
    let vehicle = mini_with("    location: cloud\n", "    location: vehicle\n");
    let text = format!(
        "{vehicle}  - name: b\n    location: vehicle\n    port: 80\n    routes: [/b]\n    class: std\n"
    );
    let msg = the_error(&text, 17, 11, "services[1].port", ErrorKind::Conflict);
    assert!(
        msg.starts_with("port 80 is already used by vehicle service `app` at line 11"),
        "{msg}"
    );
    // Cloud services may share a port: they run on different hosts.
    let text = format!(
        "{MINI}  - name: b\n    location: cloud\n    port: 80\n    endpoints: [\"b:80\"]\n    routes: [/b]\n    class: std\n"
    );
    assert!(parse("p.yaml", &text).is_ok());
}

#[test]
fn vehicle_service_on_a_mesh_port_conflicts() {
    let text = mini_with(
        "    location: cloud\n    port: 80\n",
        "    location: vehicle\n    port: 15006\n",
    );
    let msg = the_error(&text, 11, 11, "services[0].port", ErrorKind::Conflict);
    assert_eq!(
        msg,
        "port 15006 is the mesh's `vehicle_inbound_port`; a vehicle service must not use a sidecar port"
    );
}

#[test]
fn mesh_ports_must_differ_from_each_other() {
    let text = format!("{MINI}mesh:\n  cloud_inbound_port: 15001\n");
    let msg = the_error(
        &text,
        16,
        23,
        "mesh.cloud_inbound_port",
        ErrorKind::Conflict,
    );
    assert_eq!(
        msg,
        "port 15001 is also `vehicle_outbound_port`; the mesh ports must all differ"
    );
}

#[test]
fn edge_and_cloud_services_need_endpoints() {
    let text = mini_with("    endpoints: [\"10.0.0.1:80\"]\n", "");
    let msg = the_error(
        &text,
        9,
        5,
        "services[0].endpoints",
        ErrorKind::MissingField,
    );
    assert!(msg.contains("edge and cloud services"), "{msg}");
    let text = mini_with("[\"10.0.0.1:80\"]", "[]");
    the_error(
        &text,
        12,
        16,
        "services[0].endpoints",
        ErrorKind::InvalidValue,
    );
}

#[test]
fn malformed_endpoints_are_explained() {
    let cases = [
        ("\"::1:80\"", "IPv6 addresses must be in brackets"),
        ("\"10.0.0.256:80\"", "is not an IPv4 address"),
        ("\"10.0.0.1\"", "has no port"),
        ("\"10.0.0.1:0\"", "not a number from 1 to 65535"),
        ("\"[zz]:80\"", "is not an IPv6 address"),
        ("\"bad_host:80\"", "neither an IP address nor a DNS name"),
    ];
    for (endpoint, expected) in cases {
        let text = mini_with("\"10.0.0.1:80\"", endpoint);
        let msg = the_error(
            &text,
            12,
            17,
            "services[0].endpoints[0]",
            ErrorKind::InvalidValue,
        );
        assert!(msg.contains(expected), "{endpoint}: {msg}");
    }
}

#[test]
fn custom_yaml_tags_are_rejected_as_wrong_type() {
    let text = mini_with("    kind: wifi\n", "    kind: !radio wifi\n");
    let msg = the_error(&text, 4, 11, "uplinks[0].kind", ErrorKind::WrongType);
    assert!(msg.contains("custom tags are not supported"), "{msg}");
}

#[test]
fn anchors_and_aliases_can_share_values() {
    let text = mini_with(
        "    endpoints: [\"10.0.0.1:80\"]\n",
        "    endpoints: &eps [\"10.0.0.1:80\"]\n",
    );
    let text = format!(
        "{text}  - name: b\n    location: cloud\n    port: 80\n    endpoints: *eps\n    routes: [/b]\n    class: std\n"
    );
    let p = parse("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.services["b"].endpoints, p.services["app"].endpoints);
}

#[test]
fn deeply_nested_input_is_an_error_not_a_crash() {
    let depth = 5_000;
    let text = format!("version: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    // saphyr bounds its own recursion, so this is a syntax error on line 1.
    let errs = errors_of(&text);
    assert_eq!(
        (errs.len(), errs[0].line, errs[0].kind),
        (1, 1, ErrorKind::Syntax)
    );
    assert!(
        errs[0].message.contains("recursion limit"),
        "{}",
        errs[0].message
    );
}

// ---- many errors at once ------------------------------------------------------

const BROKEN: &str = "\
version: 1
mesh:
  vehicle_outbound_port: 15006
uplinks:
  - name: wifi
    kind: wlan
  - name: LTE
    kind: lte
    metered: yes
classes:
  - name: critical
    timeout: 2
    uplinks: [dsrc, wifi]
    dscp: 64
  - name: critical
    uplinks: []
services:
  - name: maps
    location: cloud
    port: 8080
    routes: [/maps]
    class: standrd
  - name: diag
    location: vehicle
    port: 15443
    routes: [maps]
    clas: critical
";

#[test]
fn document_with_many_mistakes_reports_every_one_in_file_order() {
    let errs = errors_of(BROKEN);
    let got: Vec<String> = errs
        .iter()
        .map(|e| format!("{}:{} {} {:?}", e.line, e.column, e.path, e.kind))
        .collect();
    assert_eq!(
        got,
        [
            "3:26 mesh.vehicle_outbound_port Conflict",
            "6:11 uplinks[0].kind InvalidValue",
            "7:11 uplinks[1].name InvalidValue",
            "9:14 uplinks[1].metered WrongType",
            "12:14 classes[0].timeout WrongType",
            "13:15 classes[0].uplinks[0] UnknownReference",
            "14:11 classes[0].dscp OutOfRange",
            "15:11 classes[1].name Duplicate",
            "16:14 classes[1].uplinks InvalidValue",
            "18:5 services[0].endpoints MissingField",
            "22:12 services[0].class UnknownReference",
            "23:5 services[1].class MissingField",
            "25:11 services[1].port Conflict",
            "26:14 services[1].routes[0] InvalidValue",
            "27:5 services[1].clas UnknownField",
        ]
    );
}

#[test]
fn errors_display_one_per_line_as_file_line_column_path_message() {
    let err = parse("mesh.yaml", BROKEN)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 15);
    assert_eq!(
        lines[1],
        "mesh.yaml:6:11: uplinks[0].kind: unknown uplink kind `wlan`; expected one of: lte, 5g, 3g, wifi, dsrc, lpwa"
    );
    assert_eq!(
        lines[10],
        "mesh.yaml:22:12: services[0].class: unknown class `standrd`; defined classes: critical"
    );
}

// ---- files and directories ---------------------------------------------------

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
}

const UPLINKS_YAML: &str =
    "version: 1\nuplinks:\n  - name: wifi\n    kind: wifi\n  - name: lte\n    kind: lte\n";
const CLASSES_YAML: &str = "classes:\n  - name: std\n    uplinks: [wifi, lte]\n";
const SERVICES_YAML: &str = "services:\n  - name: app\n    location: vehicle\n    port: 9000\n    routes: [/app]\n    class: std\n";

#[test]
fn directory_files_are_merged_in_name_order_ignoring_editor_leftovers() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), "10-uplinks.yaml", UPLINKS_YAML);
    write(dir.path(), "20-classes.yml", CLASSES_YAML);
    write(dir.path(), "30-services.yaml", SERVICES_YAML);
    // None of these may be read: each would break the policy.
    for junk in [
        ".#30-services.yaml",
        "30-services.yaml~",
        ".30-services.yaml.swp",
        "#x.yaml#",
        ".hidden.yaml",
        "notes.txt",
    ] {
        write(dir.path(), junk, "garbage: [");
    }
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let p = load_path(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.uplinks.keys().collect::<Vec<_>>(), ["lte", "wifi"]);
    assert_eq!(p.classes["std"].uplinks, ["wifi", "lte"]);
    assert_eq!(p.services["app"].port, 9000);
}

#[test]
fn duplicate_name_across_files_names_both_places() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(
        dir.path(),
        "a.yaml",
        &format!("{UPLINKS_YAML}{CLASSES_YAML}"),
    );
    write(
        dir.path(),
        "b.yaml",
        "uplinks:\n  - name: lte\n    kind: 5g\n",
    );
    let errs = load_path(dir.path()).err().map(|e| e.0).unwrap_or_default();
    assert_eq!(errs.len(), 1, "{errs:?}");
    let a = dir.path().join("a.yaml").display().to_string();
    let b = dir.path().join("b.yaml").display().to_string();
    assert_eq!(
        (errs[0].file.as_str(), errs[0].line, errs[0].column),
        (b.as_str(), 2, 11)
    );
    assert_eq!(
        errs[0].message,
        format!("duplicate uplink name `lte`; first defined at {a}:5:11")
    );
}

#[test]
fn mesh_in_two_files_is_an_error_and_versions_must_be_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(
        dir.path(),
        "a.yaml",
        &format!("{UPLINKS_YAML}{CLASSES_YAML}mesh: {{}}\n"),
    );
    write(
        dir.path(),
        "b.yaml",
        "version: 2\nmesh:\n  cloud_inbound_port: 16443\n",
    );
    let errs = load_path(dir.path()).err().map(|e| e.0).unwrap_or_default();
    let got: Vec<(usize, ErrorKind)> = errs.iter().map(|e| (e.line, e.kind)).collect();
    assert_eq!(
        got,
        [
            (1, ErrorKind::UnsupportedVersion),
            (3, ErrorKind::Duplicate)
        ]
    );
    assert!(
        errs[1].message.contains("a.yaml:10:7"),
        "{}",
        errs[1].message
    );
}

#[test]
fn references_resolve_across_files_and_version_may_be_in_one_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Services first: references are checked after everything is merged.
    write(dir.path(), "a-services.yaml", SERVICES_YAML);
    write(dir.path(), "b-classes.yaml", CLASSES_YAML);
    write(dir.path(), "c-uplinks.yaml", UPLINKS_YAML);
    assert!(load_path(dir.path()).is_ok());
}

#[test]
fn directory_missing_a_section_reports_it_against_the_directory() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), "a.yaml", UPLINKS_YAML);
    let errs = load_path(dir.path()).err().map(|e| e.0).unwrap_or_default();
    assert_eq!(errs.len(), 1);
    assert_eq!(
        errs[0].to_string(),
        format!(
            "{}: classes: missing required section `classes` (a non-empty list)",
            dir.path().display()
        )
    );
}

#[test]
fn errors_in_several_files_are_all_reported_sorted_by_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), "b.yaml", "services: [\n");
    write(
        dir.path(),
        "a.yaml",
        "version: 1\nuplinks:\n  - name: wifi\n    kind: wlan\n",
    );
    let errs = load_path(dir.path()).err().map(|e| e.0).unwrap_or_default();
    let got: Vec<(String, ErrorKind)> = errs
        .iter()
        .map(|e| {
            (
                Path::new(&e.file)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                e.kind,
            )
        })
        .collect();
    // b.yaml cannot be read, so no cross-file noise (missing `classes`) follows.
    assert_eq!(
        got,
        [
            ("a.yaml".to_owned(), ErrorKind::InvalidValue),
            ("b.yaml".to_owned(), ErrorKind::Syntax)
        ]
    );
}

#[test]
fn single_file_and_io_errors_go_through_load_path() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), "mesh.yaml", QUICKSTART);
    assert!(load_path(&dir.path().join("mesh.yaml")).is_ok());

    let missing = dir.path().join("nope.yaml");
    let errs = load_path(&missing).err().map(|e| e.0).unwrap_or_default();
    assert_eq!(
        (errs.len(), errs[0].kind, errs[0].line),
        (1, ErrorKind::Io, 0)
    );
    assert!(
        errs[0]
            .to_string()
            .starts_with(&format!("{}: cannot read the policy: ", missing.display()))
    );

    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let errs = load_path(empty.path())
        .err()
        .map(|e| e.0)
        .unwrap_or_default();
    assert_eq!(errs[0].kind, ErrorKind::Structure);

    write(dir.path(), "bin.yaml", "");
    std::fs::write(dir.path().join("bin.yaml"), [0xff, 0xfe, 0x00])
        .unwrap_or_else(|e| panic!("{e}"));
    let errs = load_path(&dir.path().join("bin.yaml"))
        .err()
        .map(|e| e.0)
        .unwrap_or_default();
    assert_eq!(errs[0].message, "the file is not valid UTF-8 text");
}

#[test]
fn policy_file_names_exclude_hidden_and_editor_files() {
    use crate::parse::is_policy_file_name as ok;
    for name in ["a.yaml", "a.yml", "10-x.YAML"] {
        assert!(ok(name), "{name}");
    }
    for name in [
        ".a.yaml",
        ".#a.yaml",
        "a.yaml~",
        "#a.yaml#",
        ".a.yaml.swp",
        "a.json",
        ".yaml",
        "a.yaml.bak",
    ] {
        assert!(!ok(name), "{name}");
    }
}

// ---- durations --------------------------------------------------------------

#[test]
fn durations_parse_in_each_unit() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
    assert_eq!(format_duration(Duration::from_millis(90_000)), "90s");
    assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    assert_eq!(format_duration(Duration::ZERO), "0s");
    for bad in [
        "",
        "s",
        "5",
        "1.5s",
        "-1s",
        "1 s",
        "1d",
        "99999999999999999999h",
        "1m30s",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
    }
}

proptest! {
    #[test]
    fn durations_round_trip_through_their_text_form(ms in 0u64..=u64::MAX / 3_600_000 * 1000) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }

    #[test]
    fn random_bytes_never_panic_the_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse("fuzz.yaml", &text);
    }

    #[test]
    fn yaml_like_strings_never_panic_the_parser(text in "[-a-z0-9:\\[\\]{}\"'&*!|>#,. \n]{0,300}") {
        let _ = parse("fuzz.yaml", &text);
    }

    #[test]
    fn edited_quickstart_never_panics_and_always_explains_itself(
        at in 0usize..QUICKSTART.len(),
        cut in 0usize..40,
        insert in "[-a-z0-9:\\[\\]{}\"'&*!|>#,. \n]{0,8}",
    ) {
        // Edit at char boundaries, like an operator in an editor would.
        let start = (0..=at).rev().find(|i| QUICKSTART.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + cut..=QUICKSTART.len()).find(|i| QUICKSTART.is_char_boundary(*i)).unwrap_or(QUICKSTART.len());
        let text = format!("{}{}{}", &QUICKSTART[..start], insert, &QUICKSTART[end..]);
        if let Err(errs) = parse("mesh.yaml", &text) {
            prop_assert!(!errs.is_empty());
            for e in &errs {
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}

/// MINI plus a vehicle service `car` (line 15) that consumes `list` (line 20).
fn with_consumer(list: &str) -> String {
    format!(
        "{MINI}  - name: car\n    location: vehicle\n    port: 8080\n    routes: [\"/car\"]\n    class: std\n    consumes: {list}\n"
    )
}

#[test]
fn consumes_names_services_and_is_kept() {
    let p = parse("p.yaml", &with_consumer("[app]")).unwrap();
    assert_eq!(p.services["car"].consumes, Some(vec!["app".to_string()]));
    assert_eq!(p.services["app"].consumes, None, "not declared");
    let p = parse("p.yaml", &with_consumer("[]")).unwrap();
    assert_eq!(
        p.services["car"].consumes,
        Some(vec![]),
        "declared: nothing"
    );
}

#[test]
fn consumes_of_an_unknown_service_is_located_with_a_suggestion() {
    let msg = the_error(
        &with_consumer("[app, apq]"),
        20,
        21,
        "services[1].consumes[1]",
        ErrorKind::UnknownReference,
    );
    assert!(
        msg.contains("unknown service `apq`; did you mean `app`?"),
        "{msg}"
    );
}

#[test]
fn consumes_twice_the_same_service_is_a_duplicate() {
    let msg = the_error(
        &with_consumer("[app, app]"),
        20,
        21,
        "services[1].consumes[1]",
        ErrorKind::Duplicate,
    );
    assert!(msg.contains("listed twice"), "{msg}");
}

#[test]
fn consumes_on_a_cloud_service_is_an_error() {
    let text = mini_with("    class: std\n", "    class: std\n    consumes: [app]\n");
    let msg = the_error(
        &text,
        15,
        15,
        "services[0].consumes",
        ErrorKind::InvalidValue,
    );
    assert!(msg.contains("for vehicle services"), "{msg}");
}

// ---- vehicle gateway, cloud replicas, low power ------------------------------

/// MINI plus a vehicle service `car` (lines 15–19) with `extra` lines from line 20.
fn with_vehicle(extra: &str) -> String {
    format!(
        "{MINI}  - name: car\n    location: vehicle\n    port: 8080\n    routes: [\"/car\"]\n    class: std\n{extra}"
    )
}

#[test]
fn gateway_and_low_power_fields_are_read() {
    let text = format!(
        "{}mesh:\n  vehicle_gateway_port: 16444\n  vehicle_tunnel_port: 16445\n  vehicle_gateways: [198.18.0.10, \"2001:db8::10\", gw.cloud.example]\n  vehicle_tunnel_class: std\n",
        with_vehicle(
            "    cloud_replica: [\"10.1.0.1:8080\", \"[2001:db8::2]:8080\", \"car.cloud.example:8080\"]\n    on_low_power: cloud\n"
        )
    );
    let p = parse("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.mesh,
        MeshSettings {
            vehicle_gateway_port: 16444,
            vehicle_tunnel_port: 16445,
            vehicle_gateways: vec![
                "198.18.0.10".into(),
                "2001:db8::10".into(),
                "gw.cloud.example".into()
            ],
            vehicle_tunnel_class: Some("std".into()),
            ..MeshSettings::default()
        }
    );
    let car = &p.services["car"];
    let endpoint = |host: &str, port| Endpoint {
        host: host.into(),
        port,
    };
    assert_eq!(
        car.cloud_replica,
        [
            endpoint("10.1.0.1", 8080),
            endpoint("2001:db8::2", 8080),
            endpoint("car.cloud.example", 8080)
        ]
    );
    assert_eq!(car.on_low_power, LowPowerAction::Cloud);
    assert!(car.endpoints.is_empty());
}

#[test]
fn gateway_and_low_power_fields_default_to_none_and_stay() {
    let p = parse("p.yaml", &with_vehicle("")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.mesh, MeshSettings::default());
    assert_eq!(
        (p.mesh.vehicle_gateway_port, p.mesh.vehicle_tunnel_port),
        (15444, 15445)
    );
    assert!(p.mesh.vehicle_gateways.is_empty());
    assert_eq!(p.mesh.vehicle_tunnel_class, None);
    for svc in p.services.values() {
        assert!(svc.cloud_replica.is_empty());
        assert_eq!(svc.on_low_power, LowPowerAction::Stay);
    }
    // `stay` may be written, and a replica without `cloud` is kept (it takes the
    // cloud's calls while the vehicle is offline).
    let p = parse(
        "p.yaml",
        &with_vehicle("    cloud_replica: [\"10.1.0.1:8080\"]\n    on_low_power: stay\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.services["car"].on_low_power, LowPowerAction::Stay);
    assert_eq!(p.services["car"].cloud_replica.len(), 1);
}

#[test]
fn gateway_and_tunnel_ports_must_differ_from_the_other_mesh_ports() {
    let text = format!("{MINI}mesh:\n  vehicle_gateway_port: 15443\n");
    let msg = the_error(
        &text,
        16,
        25,
        "mesh.vehicle_gateway_port",
        ErrorKind::Conflict,
    );
    assert_eq!(
        msg,
        "port 15443 is also `cloud_inbound_port`; the mesh ports must all differ"
    );
    let text = format!("{MINI}mesh:\n  vehicle_outbound_port: 15445\n");
    let msg = the_error(
        &text,
        16,
        26,
        "mesh.vehicle_outbound_port",
        ErrorKind::Conflict,
    );
    assert_eq!(
        msg,
        "port 15445 is also `vehicle_tunnel_port`; the mesh ports must all differ"
    );
    let text =
        format!("{MINI}mesh:\n  vehicle_gateway_port: 16000\n  vehicle_tunnel_port: 16000\n");
    let msg = the_error(
        &text,
        17,
        24,
        "mesh.vehicle_tunnel_port",
        ErrorKind::Conflict,
    );
    assert!(msg.contains("is also `vehicle_gateway_port`"), "{msg}");
    let text = format!("{MINI}mesh:\n  vehicle_tunnel_port: 0\n");
    the_error(
        &text,
        16,
        24,
        "mesh.vehicle_tunnel_port",
        ErrorKind::OutOfRange,
    );
}

#[test]
fn vehicle_service_on_the_gateway_or_tunnel_port_conflicts() {
    let text = mini_with(
        "    location: cloud\n    port: 80\n",
        "    location: vehicle\n    port: 15444\n",
    );
    let msg = the_error(&text, 11, 11, "services[0].port", ErrorKind::Conflict);
    assert_eq!(
        msg,
        "port 15444 is the mesh's `vehicle_gateway_port`; a vehicle service must not use a sidecar port"
    );
    let text = format!(
        "{}mesh:\n  vehicle_tunnel_port: 20000\n",
        mini_with(
            "    location: cloud\n    port: 80\n",
            "    location: vehicle\n    port: 20000\n",
        )
    );
    let msg = the_error(&text, 11, 11, "services[0].port", ErrorKind::Conflict);
    assert!(msg.contains("`vehicle_tunnel_port`"), "{msg}");
}

#[test]
fn vehicle_gateways_are_hosts_without_ports_each_once() {
    let text = format!(
        "{MINI}mesh:\n  vehicle_gateways: [gw.example, \"gw.example:443\", bad_host, 10.0.0.256, \"[::1]\", gw.example]\n  vehicle_tunnel_class: std\n"
    );
    let errs = errors_of(&text);
    let got: Vec<(usize, usize, &str, ErrorKind)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        got,
        [
            (16, 34, "mesh.vehicle_gateways[1]", ErrorKind::InvalidValue),
            (16, 52, "mesh.vehicle_gateways[2]", ErrorKind::InvalidValue),
            (16, 62, "mesh.vehicle_gateways[3]", ErrorKind::InvalidValue),
            (16, 74, "mesh.vehicle_gateways[4]", ErrorKind::InvalidValue),
            (16, 83, "mesh.vehicle_gateways[5]", ErrorKind::Duplicate),
        ],
        "{}",
        PolicyErrors(errs.clone())
    );
    assert!(errs[0].message.contains("without a port"), "{}", errs[0]);
    assert!(
        errs[1]
            .message
            .contains("neither an IP address nor a DNS name"),
        "{}",
        errs[1]
    );
    assert!(
        errs[2].message.contains("is not an IPv4 address"),
        "{}",
        errs[2]
    );
    assert!(
        errs[4]
            .message
            .contains("listed twice; first as mesh.vehicle_gateways[0]"),
        "{}",
        errs[4]
    );
    let text = format!("{MINI}mesh:\n  vehicle_gateways: gw.example\n");
    the_error(&text, 16, 21, "mesh.vehicle_gateways", ErrorKind::WrongType);
}

#[test]
fn vehicle_gateways_need_a_tunnel_class() {
    let text = format!("{MINI}mesh:\n  vehicle_gateways: [gw.example]\n");
    let msg = the_error(
        &text,
        16,
        21,
        "mesh.vehicle_gateways",
        ErrorKind::MissingField,
    );
    assert!(msg.contains("needs `vehicle_tunnel_class`"), "{msg}");
}

#[test]
fn a_tunnel_class_without_vehicle_gateways_is_an_error() {
    for gateways in ["", "  vehicle_gateways: []\n"] {
        let text = format!("{MINI}mesh:\n{gateways}  vehicle_tunnel_class: std\n");
        let line = if gateways.is_empty() { 16 } else { 17 };
        let msg = the_error(
            &text,
            line,
            25,
            "mesh.vehicle_tunnel_class",
            ErrorKind::InvalidValue,
        );
        assert!(
            msg.starts_with("`vehicle_tunnel_class` without `vehicle_gateways`"),
            "{msg}"
        );
    }
}

#[test]
fn the_tunnel_class_must_be_a_class() {
    let text =
        format!("{MINI}mesh:\n  vehicle_gateways: [gw.example]\n  vehicle_tunnel_class: sdt\n");
    let msg = the_error(
        &text,
        17,
        25,
        "mesh.vehicle_tunnel_class",
        ErrorKind::UnknownReference,
    );
    assert_eq!(
        msg,
        "unknown class `sdt`; did you mean `std`?; defined classes: std"
    );
}

#[test]
fn cloud_replica_and_on_low_power_are_for_vehicle_services() {
    let text = mini_with(
        "    class: std\n",
        "    class: std\n    cloud_replica: [\"10.0.0.2:80\"]\n    on_low_power: cloud\n",
    );
    let errs = errors_of(&text);
    let got: Vec<(usize, usize, &str, ErrorKind)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        got,
        [
            (15, 20, "services[0].cloud_replica", ErrorKind::InvalidValue),
            (16, 19, "services[0].on_low_power", ErrorKind::InvalidValue),
        ],
        "{}",
        PolicyErrors(errs.clone())
    );
    assert!(
        errs[0].message.contains("for vehicle services"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].message.contains("for vehicle services"),
        "{}",
        errs[1]
    );
}

#[test]
fn on_low_power_cloud_needs_a_cloud_replica() {
    for replica in ["", "    cloud_replica: []\n"] {
        let text = with_vehicle(&format!("{replica}    on_low_power: cloud\n"));
        let line = if replica.is_empty() { 20 } else { 21 };
        let msg = the_error(
            &text,
            line,
            19,
            "services[1].on_low_power",
            ErrorKind::InvalidValue,
        );
        assert!(msg.contains("add `cloud_replica`"), "{msg}");
    }
}

#[test]
fn on_low_power_is_stay_or_cloud() {
    let text = with_vehicle("    on_low_power: clod\n");
    let msg = the_error(
        &text,
        20,
        19,
        "services[1].on_low_power",
        ErrorKind::InvalidValue,
    );
    assert_eq!(
        msg,
        "unknown low-power action `clod`; expected one of: stay, cloud; did you mean `cloud`?"
    );
}

#[test]
fn cloud_replicas_are_endpoints_each_once() {
    let text = with_vehicle(
        "    cloud_replica: [\"10.1.0.1:8080\", \"10.1.0.1\", \"10.1.0.1:8080\"]\n    on_low_power: cloud\n",
    );
    let errs = errors_of(&text);
    let got: Vec<(usize, usize, &str, ErrorKind)> = errs
        .iter()
        .map(|e| (e.line, e.column, e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        got,
        [
            (
                20,
                38,
                "services[1].cloud_replica[1]",
                ErrorKind::InvalidValue
            ),
            (20, 50, "services[1].cloud_replica[2]", ErrorKind::Duplicate),
        ],
        "{}",
        PolicyErrors(errs.clone())
    );
    assert!(errs[0].message.contains("has no port"), "{}", errs[0]);
}
