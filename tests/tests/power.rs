//! The vehicle's power state end to end: the real `edge-netd` reads its `power:` file
//! and takes `PUT /power`, and the real `misaki-cp` (plaintext) shows what it reports
//! on `/fleet/car-1`.
//!
//! A word in the file is the state; `PUT /power` overrides it (the newest report wins);
//! battery percentages go `low` below 20 % and back to `on` only above 30 %
//! (50 → 15 → 25 → 35 give on, low, low, on). A garbled file keeps the last state and
//! `GET /power` says why; a bad `PUT` is a 400.
//!
//! Everything on loopback: the uplink is `lo` (probed against misaki-cp's UDP echo), no
//! network namespace. Timing is asserted only as generous bounds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use misaki_e2e::http;
use misaki_e2e::policy::{MeshPorts, WIFI_STANDARD, policy_doc};
use misaki_e2e::process::wait_for;
use misaki_e2e::{ControlPlane, Process, free_port, target_bin};
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

struct Lab {
    _dir: tempfile::TempDir,
    cp: ControlPlane,
    netd: Process,
    api: u16,
    file: PathBuf,
}

fn start() -> Lab {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("mesh.yaml");
    fs::write(&policy, policy_doc(&MeshPorts::fresh(), WIFI_STANDARD, &[])).expect("policy");
    let probe = format!("127.0.0.1:{}", free_port());
    let args = ["--probe-addr", probe.as_str()];
    let cp = ControlPlane::start_with(&policy, dir.path(), free_port(), free_port(), &args);
    let api = free_port();
    let file = dir.path().join("power_state");
    let power = format!(
        "power:\n\
         \x20 file: {}\n\
         \x20 interval: 100ms\n",
        file.display()
    );
    let text = misaki_e2e::process::netd_config_on_lo(
        "car-1",
        &format!("http://127.0.0.1:{}", cp.xds_port),
        api,
        &dir.path().join("state"),
        &probe,
        &power,
    );
    let config = dir.path().join("edge-netd.yaml");
    fs::write(&config, text).expect("write edge-netd config");
    let mut cmd = Command::new(target_bin("edge-netd"));
    cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
    let netd = Process::spawn("edge-netd", &mut cmd, dir.path().join("edge-netd.log"));
    Lab {
        _dir: dir,
        cp,
        netd,
        api,
        file,
    }
}

/// Replace the file whole (write, then rename), as a power manager should: the reader
/// never sees half a value.
fn write_state(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    fs::write(&tmp, text).expect("write power file");
    fs::rename(&tmp, file).expect("rename power file");
}

impl Lab {
    /// What misaki-cp shows as the vehicle's power state, while it shows it online.
    fn cp_power(&self) -> Option<String> {
        let r = http::get(self.cp.admin_port, "/fleet/car-1").ok()?;
        let j: Value = serde_json::from_str(&r.body).ok()?;
        (j["online"] == true).then(|| j["power"].as_str().map(str::to_string))?
    }

    fn local_power(&self) -> Option<Value> {
        let r = http::get(self.api, "/power").ok()?;
        (r.status == 200).then(|| serde_json::from_str(&r.body).ok())?
    }

    fn put(&self, body: &str) -> http::Reply {
        http::request(self.api, "PUT", "/power", &[], body.as_bytes()).expect("PUT /power")
    }

    /// Waits until edge-netd has read `reading` from the file, then until misaki-cp
    /// shows `want`.
    fn expect(&self, reading: Value, want: &str) {
        let read = wait_for(LONG, || {
            let p = self.local_power()?;
            (p["file_reading"] == reading).then_some(p)
        });
        let Some(local) = read else {
            panic!(
                "edge-netd never read {reading}: {:?}\n{}",
                self.local_power(),
                self.netd.log_text()
            );
        };
        assert_eq!(local["state"], want, "{local}");
        self.expect_cp(want);
    }

    fn expect_cp(&self, want: &str) {
        let shown = wait_for(LONG, || (self.cp_power()? == want).then_some(()));
        assert!(
            shown.is_some(),
            "misaki-cp shows power {:?}, not {want:?}\n{}",
            self.cp_power(),
            self.netd.log_text()
        );
    }

    fn metric(&self, line_prefix: &str) -> Option<f64> {
        let body = http::get(self.api, "/metrics").ok()?.body;
        body.lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|v| v.trim().parse().ok())
    }
}

#[test]
fn the_power_file_and_put_power_reach_the_fleet_registry() {
    let lab = start();
    // No file yet: `on`, and /power says why the file is not used.
    lab.expect_cp("on");
    let p = lab.local_power().expect("/power");
    assert_eq!(
        (p["state"].as_str(), p["source"].as_str()),
        (Some("on"), Some("default"))
    );
    assert!(
        p["file_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read")),
        "{p}"
    );

    write_state(&lab.file, "low\n");
    lab.expect(Value::from("low"), "low");
    assert_eq!(
        lab.metric("edge_netd_power_state{state=\"low\"} "),
        Some(1.0)
    );

    // The API's report is newer than the (unchanged) file's.
    let r = lab.put("on\n");
    assert_eq!((r.status, r.body.as_str()), (200, "on\n"));
    lab.expect_cp("on");
    let p = lab.local_power().expect("/power");
    assert_eq!(
        (p["state"].as_str(), p["source"].as_str()),
        (Some("on"), Some("api"))
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.cp_power().as_deref(),
        Some("on"),
        "an unchanged file is no news"
    );

    // Percentages: low below 20 %, on again only above 30 %.
    for (percent, want) in [(50, "on"), (15, "low"), (25, "low"), (35, "on")] {
        write_state(&lab.file, &format!("{percent}\n"));
        lab.expect(Value::from(percent), want);
    }

    // A garbled file keeps the state; /power and the metric say so.
    write_state(&lab.file, "garbled\n");
    let error = wait_for(LONG, || {
        let p = lab.local_power()?;
        p["file_error"].as_str().map(str::to_string)
    })
    .expect("the file's error on /power");
    assert!(error.contains("\"garbled\""), "{error}");
    assert_eq!(lab.local_power().expect("/power")["state"], "on");
    assert!(
        lab.metric("edge_netd_power_file_errors_total ")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(lab.cp_power().as_deref(), Some("on"));

    // Bad input is refused and changes nothing.
    let r = lab.put("sleepy");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("shutting_down"), "{}", r.body);
    let r = http::request(lab.api, "POST", "/power", &[], b"low").expect("POST /power");
    assert_eq!(r.status, 405);
    assert_eq!(lab.local_power().expect("/power")["state"], "on");

    let r = lab.put("shutting_down");
    assert_eq!(r.status, 200, "{}", r.body);
    lab.expect_cp("shutting_down");
}
