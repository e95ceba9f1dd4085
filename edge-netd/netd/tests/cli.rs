//! The `edge-netd` binary's command line, run as a process: what systemd and an operator
//! see (`ExecStartPre=edge-netd --config ... --check`; a bad config is exit 64, which
//! the unit does not restart on).

use std::path::Path;
use std::process::{Command, Output};

fn edge_netd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-netd"))
        .args(args)
        .output()
        .expect("run edge-netd")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn example() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/edge-netd.yaml")
        .display()
        .to_string()
}

#[test]
fn bad_flags_exit_64_with_a_usage_message() {
    for args in [
        &[][..],
        &["--config"],
        &["--bogus"],
        &["--config", "x.yaml", "--bogus"],
        &["--check"],
        &["serve"],
    ] {
        let out = edge_netd(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(err.contains("try '--help'"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    let out = edge_netd(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = text(&out.stdout);
    assert!(
        help.contains("--config <FILE>") && help.contains("--check"),
        "{help}"
    );
    let out = edge_netd(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        text(&out.stdout).trim(),
        format!("edge-netd {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_validates_the_config_either_side_of_the_flag() {
    let example = example();
    for args in [
        ["--config", &example, "--check"],
        ["--check", "--config", &example],
    ] {
        let out = edge_netd(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert_eq!(text(&out.stdout).trim(), format!("{example}: ok"));
    }
}

#[test]
fn a_bad_config_exits_64_with_every_problem_located() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    let good = std::fs::read_to_string(example()).unwrap();
    let bad = good
        .replace("kind: lte", "kind: lt")
        .replace("window: 20 ", "window: 0  ");
    assert_ne!(bad, good);
    std::fs::write(&path, bad).unwrap();
    let out = edge_netd(&["--config", path.to_str().unwrap(), "--check"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines[0], "edge-netd: invalid configuration:", "{err}");
    let file = path.display();
    assert!(
        lines[1].starts_with(&format!("{file}:19:11: uplinks[1].kind: ")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{file}:31:11: probe.window: ")),
        "{err}"
    );
    assert_eq!(lines.len(), 3, "{err}");

    let out = edge_netd(&["--config", "/nonexistent/edge-netd.yaml", "--check"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(text(&out.stderr).contains("cannot read"), "{out:?}");
}
