//! The poll loop: HTTP/1.1 requests through an Envoy listener on one kept-alive
//! connection, telling which upstream (A or B) answered.
//!
//! A kept-alive connection keeps the client's own cost per poll at one write and one
//! read (no connect, no TIME_WAIT pile-up over thousands of polls), so polling every
//! 0.5 ms does not steal much CPU from Envoy and the control plane on a 2-core
//! machine. Every edit the benchmark makes changes a cluster's endpoint, never the
//! listener, so a kept-alive connection sees the new route as soon as Envoy has it
//! (a listener change would leave old connections on the draining listener). If Envoy
//! closes the connection anyway, the next poll reconnects.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use misaki_harness::http::Headers;

/// What one request through the listener saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hit {
    /// 200 from an upstream; its name (the first word of the body).
    Upstream(String),
    /// Envoy answered itself, e.g. 503 while the cluster has no healthy host.
    Status(u16),
    /// No answer: connection refused, reset or timed out.
    Error,
}

#[derive(Debug)]
pub struct Probe {
    port: u16,
    request: Vec<u8>,
    conn: Option<BufReader<TcpStream>>,
}

impl Probe {
    pub fn new(port: u16, path: &str) -> Probe {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nuser-agent: misaki-bench\r\n\r\n"
        )
        .into_bytes();
        Probe {
            port,
            request,
            conn: None,
        }
    }

    /// One request, reconnecting first if needed.
    pub fn get(&mut self) -> Hit {
        match self.try_get() {
            Ok((hit, keep)) => {
                if !keep {
                    self.conn = None;
                }
                hit
            }
            Err(_) => {
                self.conn = None;
                Hit::Error
            }
        }
    }

    fn try_get(&mut self) -> std::io::Result<(Hit, bool)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            self.conn = Some(BufReader::new(s));
        }
        let r = self.conn.as_mut().expect("connected above");
        r.get_mut().write_all(&self.request)?;
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let headers = Headers::read(r)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let len: usize = match headers.get("content-length") {
            Some(v) => v.parse().map_err(|_| std::io::ErrorKind::InvalidData)?,
            None => 0,
        };
        let keep = !headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        if status != 200 {
            return Ok((Hit::Status(status), keep));
        }
        let name = String::from_utf8_lossy(&body)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        Ok((Hit::Upstream(name), keep))
    }

    /// Poll every `interval` until upstream `want` answers; returns when its answer
    /// was read and how many requests it took.
    pub fn until(
        &mut self,
        want: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Result<(Instant, u32), Hit> {
        let deadline = Instant::now() + timeout;
        let mut polls = 0;
        loop {
            let sent = Instant::now();
            let hit = self.get();
            let done = Instant::now();
            polls += 1;
            if matches!(&hit, Hit::Upstream(n) if n == want) {
                return Ok((done, polls));
            }
            if done >= deadline {
                return Err(hit);
            }
            // Pace from the send time, so a slow answer does not add a full interval.
            if let Some(rest) = (sent + interval).checked_duration_since(Instant::now()) {
                thread::sleep(rest);
            }
        }
    }
}
