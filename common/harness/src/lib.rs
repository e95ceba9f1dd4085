//! The process harness shared by the end-to-end tests (`misaki-e2e`), the load
//! generator (`misaki-loadgen`) and the benchmarks (`misaki-bench`): what it takes to
//! run real misaki binaries and Envoys as child processes and look at them from
//! outside. For test and benchmark processes only, never for production code: it
//! blocks, polls, and reads `/proc` by hand.
//!
//! - [`Process`]: a child killed (SIGKILL) and reaped on drop, its output in a log
//!   file, its pid optionally appended to a pid file ([`set_pidfile`]) for a wrapper
//!   script's cleanup trap.
//! - [`free_port`]: a loopback port the kernel just handed out.
//! - [`procfs`]: RSS / `VmHWM`, CPU seconds, open fds, load average.
//! - [`wait_for`] / [`poll`]: poll a condition until a deadline.
//! - [`http`]: a minimal blocking HTTP/1.1 client (chunked decoding) for admin
//!   endpoints and requests through a sidecar.
//! - [`CpLaunch`]: `misaki-cp serve` with given arguments, waited for until `/readyz`.
//!
//! Dependencies: std only. Errors are `std::io::Error`; callers wrap them in their own
//! (anyhow in the load generator and benchmarks, panics in the tests).

pub mod cp;
pub mod etcd;
pub mod http;
pub mod process;
pub mod procfs;
pub mod wait;

pub use cp::CpLaunch;
pub use etcd::{Etcd, EtcdTls};
pub use process::{Process, free_port, set_pidfile, strip_ansi, tail, try_free_port};
pub use wait::{poll, wait_for};
