//! What `/proc` says about a process (Linux): memory, CPU time, open files, and the
//! machine's load.

use std::fs;
use std::io;
use std::process::Command;
use std::sync::OnceLock;

fn invalid(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m)
}

/// The value of a `Name:   123 kB` line of a `/proc` file's `text` (`status`,
/// `smaps_rollup`), in KiB.
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A `Vm*` line of `/proc/PID/status` (`VmRSS`, `VmHWM`, …), in KiB.
pub fn vm_kib(pid: u32, field: &str) -> io::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    kib_field(&s, field).ok_or_else(|| invalid(format!("no {field} in /proc/{pid}/status")))
}

/// [`vm_kib`] in bytes.
pub fn vm_bytes(pid: u32, field: &str) -> io::Result<u64> {
    Ok(vm_kib(pid, field)? * 1024)
}

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds a process has used (`/proc/PID/stat` utime + stime).
pub fn cpu_secs(pid: u32) -> io::Result<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let rest = s
        .rsplit_once(')')
        .ok_or_else(|| invalid(format!("malformed /proc/{pid}/stat")))?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let field = |i: usize, name: &str| -> io::Result<f64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| invalid(format!("no {name} in /proc/{pid}/stat")))
    };
    Ok((field(11, "utime")? + field(12, "stime")?) / clk_tck())
}

/// Open file descriptors of a process (its sockets, for the most part).
pub fn fds(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The three load averages of `/proc/loadavg` as written (`"0.52 0.61 0.70"`), empty
/// if unreadable: what else the shared machine ran.
pub fn loadavg_text() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The 1-minute load average; NaN if unreadable.
pub fn loadavg() -> f64 {
    loadavg_text()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_proc_entries() {
        let pid = std::process::id();
        assert!(vm_kib(pid, "VmRSS").unwrap() > 0);
        assert_eq!(vm_bytes(pid, "VmHWM").unwrap() % 1024, 0);
        assert!(cpu_secs(pid).unwrap() >= 0.0);
        assert!(fds(pid).unwrap() > 0);
        assert!(loadavg() >= 0.0);
        assert!(vm_kib(pid, "NoSuchField").is_err());
    }

    #[test]
    fn kib_fields_need_the_whole_name() {
        let text = "VmRSSX:\t 1 kB\nVmRSS:\t  2048 kB\nPss:  7 kB\n";
        assert_eq!(kib_field(text, "VmRSS"), Some(2048));
        assert_eq!(kib_field(text, "Pss"), Some(7));
        assert_eq!(kib_field(text, "Vm"), None);
    }
}
