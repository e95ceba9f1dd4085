//! Resident memory of a process (and of its children, for multi-process servers).

use std::fs;

use misaki_harness::procfs;

/// `VmRSS` of one process, in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    procfs::vm_kib(pid, "VmRSS").ok()
}

/// `pid` and every descendant (gunicorn forks its workers from a master).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(children(parent));
        i += 1;
    }
    all
}

fn children(pid: u32) -> Vec<u32> {
    // /proc/PID/task/TID/children lists each thread's children; a Python master forks
    // from its main thread, but read every task to be sure.
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Sum of `VmRSS` over `pid` and its descendants, in KiB. Shared pages (a forked
/// worker shares the master's) are counted once per process, as `ps` would.
pub fn tree_rss_kib(pid: u32) -> Option<u64> {
    let pids = tree(pid);
    let total: u64 = pids.iter().filter_map(|&p| vm_rss_kib(p)).sum();
    (total > 0).then_some(total)
}

/// Sum of `Pss` (proportional set size: each shared page split between the processes
/// sharing it) over `pid` and its descendants, in KiB: the fair total for a forked
/// master and workers.
pub fn tree_pss_kib(pid: u32) -> Option<u64> {
    let total: u64 = tree(pid)
        .iter()
        .filter_map(|p| {
            let s = fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok()?;
            procfs::kib_field(&s, "Pss")
        })
        .sum();
    (total > 0).then_some(total)
}

pub fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
