//! A minimal blocking HTTP/1.1 client: enough to ask an admin endpoint, or send a
//! request through a sidecar and read status, headers and body, with no client-side
//! magic in the way. One connection per request (`connection: close`). And the
//! pieces the tests' and benchmarks' own small servers and clients read a message
//! with off a buffered stream: [`Headers`], [`read_chunked`].

use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long [`request`] and [`get`] wait for a read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `method path` to `127.0.0.1:port` with optional extra headers (a `host` among them
/// replaces the default `127.0.0.1:port`) and a body.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Reply> {
    request_timeout(port, method, path, headers, body, READ_TIMEOUT)
}

/// [`request`] with a read timeout of its own (a large `/metrics` or `/nodes`).
pub fn request_timeout(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<Reply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n",
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| format!("127.0.0.1:{port}")),
        body.len()
    );
    for (k, v) in headers {
        if !k.eq_ignore_ascii_case("host") {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse(&raw)
}

/// `GET path` from `127.0.0.1:port`.
pub fn get(port: u16, path: &str) -> io::Result<Reply> {
    request(port, "GET", path, &[], b"")
}

/// [`get`] with a read timeout of its own.
pub fn get_timeout(port: u16, path: &str, timeout: Duration) -> io::Result<Reply> {
    request_timeout(port, "GET", path, &[], b"", timeout)
}

/// A whole response as read off the wire: status, headers (names lowercased, values
/// trimmed) and body (de-chunked, or cut at `content-length`).
pub fn parse(raw: &[u8]) -> io::Result<Reply> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| {
        bad(format!(
            "no end of headers in {:?}",
            String::from_utf8_lossy(raw)
        ))
    })?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("no status line in {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body);
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(n);
    }
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A chunked body already read whole, decoded (stops at the last chunk, or where the
/// input ends).
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(b, b"\r\n") {
        let size = String::from_utf8_lossy(&b[..eol]);
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// A chunked body read off a stream (a server's side), up to and including the empty
/// line after the last chunk's trailers; `None` if the stream ends or lies first.
pub fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).ok()?;
        let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            let mut end = String::new();
            reader.read_line(&mut end).ok()?;
            return Some(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// The header lines of one message (after its start line), in order: the name as
/// written (trimmed), the value trimmed.
#[derive(Debug, Clone, Default)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// Reads header lines up to and including the blank line that ends them; a line
    /// without a colon is skipped. `None` if the stream ends first.
    pub fn read(r: &mut impl BufRead) -> io::Result<Option<Headers>> {
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(None);
            }
            let h = h.trim_end();
            if h.is_empty() {
                return Ok(Some(Headers(headers)));
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }

    /// The value of the last header called `name` (ASCII case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The body these headers announce, read off `r`: chunked, else `content-length`
    /// bytes (none without one). `None` if the stream ends first.
    pub fn read_body(&self, r: &mut impl BufRead) -> Option<Vec<u8>> {
        if self
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            return read_chunked(r);
        }
        let len = self
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        Some(body)
    }
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"),
            b"hello world"
        );
        let mut r: &[u8] = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nnext";
        assert_eq!(read_chunked(&mut r).as_deref(), Some(&b"hello world"[..]));
        assert_eq!(r, b"next");
    }

    #[test]
    fn reads_up_to_the_blank_line_and_the_last_value_wins() {
        let mut r: &[u8] =
            b"Content-Length: 3\r\nbogus\r\nconnection:  close \r\ncontent-length: 5\r\n\r\nbody!";
        let h = Headers::read(&mut r).unwrap().unwrap();
        assert_eq!(h.get("content-length"), Some("5"));
        assert_eq!(h.get("Connection"), Some("close"));
        assert_eq!(h.get("bogus"), None);
        assert_eq!(h.iter().count(), 3);
        assert_eq!(r, b"body!");
        assert_eq!(h.read_body(&mut r).as_deref(), Some(&b"body!"[..]));
    }

    #[test]
    fn eof_before_the_blank_line_is_none() {
        let mut r: &[u8] = b"content-length: 3\r\n";
        assert!(Headers::read(&mut r).unwrap().is_none());
        let h = Headers::read(&mut &b"transfer-encoding: chunked\r\n\r\n"[..])
            .unwrap()
            .unwrap();
        assert_eq!(h.read_body(&mut &b"2\r\nok\r\n"[..]), None);
    }

    #[test]
    fn parses_a_response() {
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        let r = parse(b"HTTP/1.1 503 x\r\ncontent-length: 2\r\n\r\nnoextra").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "no"));
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
