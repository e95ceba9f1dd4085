//! HTTP/1.1 message heads read off a buffered stream, for the benchmarks' own minimal
//! clients and servers.

use std::io::{self, BufRead};

/// The header lines of one message (after its start line), in order: the name as
/// written, the value trimmed.
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
                headers.push((k.to_string(), v.trim().to_string()));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_blank_line_and_the_last_value_wins() {
        let mut r: &[u8] =
            b"Content-Length: 3\r\nbogus\r\nconnection:  close \r\ncontent-length: 5\r\n\r\nbody";
        let h = Headers::read(&mut r).unwrap().unwrap();
        assert_eq!(h.get("content-length"), Some("5"));
        assert_eq!(h.get("Connection"), Some("close"));
        assert_eq!(h.get("bogus"), None);
        assert_eq!(r, b"body");
    }

    #[test]
    fn eof_before_the_blank_line_is_none() {
        let mut r: &[u8] = b"content-length: 3\r\n";
        assert!(Headers::read(&mut r).unwrap().is_none());
    }
}
