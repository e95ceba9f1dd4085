//! Active probes: one UDP socket per uplink, bound to its interface
//! (`SO_BINDTODEVICE`), sending a small datagram every `interval` to an echo server.
//!
//! Invariants:
//! - A probe's outcome is reported exactly once: answered (with its RTT) or lost
//!   (not answered within `timeout`, or the send failed). Late answers are dropped.
//! - [`ProbeWindow`] (pure) keeps the last N outcomes; loss, mean RTT and jitter are
//!   computed over it; `consecutive_lost` counts losses since the last answer.
//!
//! Wire format (24 bytes, echoed unchanged):
//! ```text
//! 0..4   magic  b"MSKP"
//! 4..12  seq    u64 big-endian, per uplink
//! 12..20 nonce  u64 big-endian, random per daemon start (ignores foreign echoes)
//! 20..24 zero
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

const MAGIC: &[u8; 4] = b"MSKP";
const PROBE_LEN: usize = 24;

/// Outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered(Duration),
    Lost,
}

/// Sliding window of probe outcomes.
#[derive(Debug, Clone)]
pub struct ProbeWindow {
    cap: usize,
    outcomes: VecDeque<Outcome>,
    consecutive_lost: u32,
}

/// Statistics over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeStats {
    pub rtt: Option<Duration>,
    pub jitter: Duration,
    pub loss_percent: f64,
    pub samples: usize,
}

impl ProbeWindow {
    pub fn new(cap: usize) -> Self {
        ProbeWindow {
            cap: cap.max(1),
            outcomes: VecDeque::with_capacity(cap.max(1)),
            consecutive_lost: 0,
        }
    }

    pub fn push(&mut self, o: Outcome) {
        if self.outcomes.len() == self.cap {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(o);
        self.consecutive_lost = match o {
            Outcome::Answered(_) => 0,
            Outcome::Lost => self.consecutive_lost.saturating_add(1),
        };
    }

    /// Forget everything (e.g. after carrier loss: old samples describe another link state).
    pub fn clear(&mut self) {
        self.outcomes.clear();
        self.consecutive_lost = 0;
    }

    pub fn consecutive_lost(&self) -> u32 {
        self.consecutive_lost
    }

    pub fn stats(&self) -> ProbeStats {
        let rtts: Vec<Duration> = self
            .outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Answered(d) => Some(*d),
                Outcome::Lost => None,
            })
            .collect();
        let n = self.outcomes.len();
        let lost = n - rtts.len();
        let rtt = (!rtts.is_empty())
            .then(|| rtts.iter().sum::<Duration>() / u32::try_from(rtts.len()).unwrap_or(u32::MAX));
        let jitter = if rtts.len() < 2 {
            Duration::ZERO
        } else {
            let total: Duration = rtts.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
            total / u32::try_from(rtts.len() - 1).unwrap_or(u32::MAX)
        };
        ProbeStats {
            rtt,
            jitter,
            loss_percent: if n == 0 {
                0.0
            } else {
                lost as f64 * 100.0 / n as f64
            },
            samples: n,
        }
    }
}

/// One probe result, tagged with the uplink's index in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    pub uplink: usize,
    pub outcome: Outcome,
}

/// Settings of one uplink's prober.
#[derive(Debug, Clone)]
pub struct ProberSpec {
    pub uplink: usize,
    pub interface: String,
    pub targets: Vec<SocketAddr>,
    pub interval: Duration,
    pub timeout: Duration,
}

fn bound_socket(interface: &str, target: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    // SO_BINDTODEVICE: the kernel routes the probe out of this interface only, so
    // the measurement is of this uplink and not of whatever the default route is.
    s.bind_device(Some(interface.as_bytes()))?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    s.bind(&any.into())?;
    UdpSocket::from_std(s.into())
}

/// Probe one uplink until `results` is closed. Generic over what the channel carries,
/// as [`crate::monitor::run_link_monitor`] is: results go straight to the engine.
pub async fn run_prober<E: From<ProbeResult>>(spec: ProberSpec, results: mpsc::Sender<E>) {
    let nonce: u64 = rand::random();
    let mut seq: u64 = 0;
    let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut socket: Option<UdpSocket> = None;
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 64];
    let report = |outcome| {
        results.send(
            ProbeResult {
                uplink: spec.uplink,
                outcome,
            }
            .into(),
        )
    };
    loop {
        let deadline = pending.front().map(|(_, sent)| *sent + spec.timeout);
        tokio::select! {
            _ = tick.tick() => {
                if socket.is_none() {
                    let target = spec.targets[0];
                    match bound_socket(&spec.interface, target) {
                        Ok(s) => socket = Some(s),
                        // e.g. ENODEV while the interface does not exist: a lost probe.
                        Err(e) => tracing::trace!(interface = %spec.interface, error = %e, "probe socket"),
                    }
                }
                seq += 1;
                let target = spec.targets[(seq as usize) % spec.targets.len()];
                let mut pkt = [0u8; PROBE_LEN];
                pkt[..4].copy_from_slice(MAGIC);
                pkt[4..12].copy_from_slice(&seq.to_be_bytes());
                pkt[12..20].copy_from_slice(&nonce.to_be_bytes());
                // UDP sends complete at once unless the qdisc is full; awaiting (not
                // try_send) also primes tokio's write readiness.
                let sent = match &socket {
                    Some(s) => match s.send_to(&pkt, target).await {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::trace!(interface = %spec.interface, error = %e, "probe send");
                            // Rebind next time: the interface may have been re-created
                            // with a new index.
                            if e.raw_os_error() == Some(19 /* ENODEV */) {
                                socket = None;
                            }
                            false
                        }
                    },
                    None => false,
                };
                if sent {
                    pending.push_back((seq, Instant::now()));
                } else if report(Outcome::Lost).await.is_err() {
                    return;
                }
            }
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                let now = Instant::now();
                while pending.front().is_some_and(|(_, sent)| now >= *sent + spec.timeout) {
                    pending.pop_front();
                    if report(Outcome::Lost).await.is_err() {
                        return;
                    }
                }
            }
            r = async { socket.as_ref().expect("guarded").recv_from(&mut buf).await }, if socket.is_some() => {
                let now = Instant::now();
                let Ok((n, _from)) = r else { continue };
                if n != PROBE_LEN || &buf[..4] != MAGIC || buf[12..20] != nonce.to_be_bytes() {
                    continue;
                }
                let got = u64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
                if let Some(pos) = pending.iter().position(|(s, _)| *s == got) {
                    let (_, sent) = pending.remove(pos).expect("position is valid");
                    // Anything older than this answer was overtaken; it still gets its
                    // own timeout (reordering is not loss).
                    if report(Outcome::Answered(now - sent)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Outcome {
        Outcome::Answered(Duration::from_millis(n))
    }

    #[test]
    fn window_computes_rtt_loss_and_jitter_over_the_last_n_probes() {
        let mut w = ProbeWindow::new(4);
        assert_eq!(w.stats().rtt, None);
        for o in [ms(100), ms(10), Outcome::Lost, ms(20), ms(30)] {
            w.push(o);
        }
        // Window: 10, lost, 20, 30.
        let s = w.stats();
        assert_eq!(s.samples, 4);
        assert_eq!(s.rtt, Some(Duration::from_millis(20)));
        assert_eq!(s.jitter, Duration::from_millis(10));
        assert!((s.loss_percent - 25.0).abs() < 1e-9);
    }

    #[test]
    fn consecutive_losses_reset_on_an_answer_and_on_clear() {
        let mut w = ProbeWindow::new(20);
        for _ in 0..3 {
            w.push(Outcome::Lost);
        }
        assert_eq!(w.consecutive_lost(), 3);
        w.push(ms(5));
        assert_eq!(w.consecutive_lost(), 0);
        w.push(Outcome::Lost);
        w.clear();
        assert_eq!((w.consecutive_lost(), w.stats().samples), (0, 0));
    }

    #[tokio::test]
    async fn unanswered_probes_are_reported_lost_and_answered_ones_measured() {
        // An echo on loopback; the prober binds to "lo".
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<ProbeResult>(16);
        let spec = ProberSpec {
            uplink: 7,
            interface: "lo".into(),
            targets: vec![target],
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(60),
        };
        let task = tokio::spawn(run_prober(spec, tx));
        // Nothing answers yet (unconnected UDP sockets get no ICMP errors): losses.
        let first = rx.recv().await.unwrap();
        assert_eq!(
            first,
            ProbeResult {
                uplink: 7,
                outcome: Outcome::Lost
            }
        );
        // Now echo: answers arrive.
        let echo_task = tokio::spawn(async move {
            let mut b = [0u8; 64];
            loop {
                let (n, from) = echo.recv_from(&mut b).await.unwrap();
                echo.send_to(&b[..n], from).await.unwrap();
            }
        });
        loop {
            let r = rx.recv().await.unwrap();
            if let Outcome::Answered(rtt) = r.outcome {
                assert!(rtt < Duration::from_millis(60));
                break;
            }
        }
        task.abort();
        echo_task.abort();
    }
}
