//! Syntax of the string values the format constrains: names, endpoints, hosts, routes.
//!
//! Invariant: these checks are pure functions of one string; everything that
//! relates two values (uniqueness, references, conflicts) lives in `validate`.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::model::Endpoint;

/// Longest allowed name: a DNS label, since names end up in Envoy cluster names
/// and may end up in hostnames.
pub(crate) const MAX_NAME_LEN: usize = 63;

/// Names: `[a-z0-9][a-z0-9-]*`, at most 63 characters.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name is empty; expected lowercase letters, digits and `-`".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name `{name}` is {} characters long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.starts_with('-') || !name.chars().all(ok_char) {
        return Err(format!(
            "invalid name `{name}`; expected lowercase letters, digits and `-`, not starting with `-` (e.g. `{}`)",
            sanitize_name(name)
        ));
    }
    Ok(())
}

/// A valid name close to `name`, for the example in the error message.
fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(MAX_NAME_LEN)
        .collect();
    let s = s.trim_start_matches('-');
    if s.is_empty() {
        "my-name".to_owned()
    } else {
        s.to_owned()
    }
}

/// `host:port` where host is IPv4, `[IPv6]`, or a DNS name.
pub(crate) fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    const EXPECTED: &str =
        "expected `host:port` (e.g. `10.0.0.5:8080`, `[2001:db8::1]:8080`, `maps.internal:8080`)";
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once("]:") else {
            return Err(format!("invalid endpoint `{text}`; {EXPECTED}"));
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "invalid endpoint `{text}`: `{ip}` is not an IPv6 address"
            ));
        }
        (ip, port)
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("endpoint `{text}` has no port; {EXPECTED}"));
        };
        if host.contains(':') {
            return Err(format!(
                "invalid endpoint `{text}`: IPv6 addresses must be in brackets, as in `[::1]:8080`"
            ));
        }
        check_host(text, host)?;
        (host, port)
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => {
            return Err(format!(
                "invalid endpoint `{text}`: port `{port}` is not a number from 1 to 65535"
            ));
        }
    };
    Ok(Endpoint {
        host: host.to_owned(),
        port,
    })
}

/// Why `host` (not empty, no `:`) is neither an IPv4 address nor a DNS name.
fn host_problem(host: &str) -> Option<String> {
    // All digits and dots: the operator meant an IPv4 address, so hold it to that
    // (`10.0.0.256` is a typo, not a DNS name).
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<Ipv4Addr>() {
            Ok(_) => None,
            Err(_) => Some(format!("`{host}` is not an IPv4 address")),
        };
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Some(format!("`{host}` is neither an IP address nor a DNS name"));
    }
    None
}

fn check_host(text: &str, host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err(format!(
            "endpoint `{text}` has no host; expected `host:port`"
        ));
    }
    match host_problem(host) {
        Some(problem) => Err(format!("invalid endpoint `{text}`: {problem}")),
        None => Ok(()),
    }
}

/// A host without a port: IPv4, IPv6 (without brackets) or a DNS name, as the host
/// of an endpoint.
pub(crate) fn check_bare_host(host: &str) -> Result<(), String> {
    const EXPECTED: &str = "expected an IP address or a DNS name without a port (e.g. `198.18.0.1`, `2001:db8::1`, `gw.example.net`)";
    if host.is_empty() {
        return Err(format!("host is empty; {EXPECTED}"));
    }
    if host.contains(':') || host.starts_with('[') {
        if host.parse::<Ipv6Addr>().is_ok() {
            return Ok(());
        }
        return Err(format!("invalid host `{host}`; {EXPECTED}"));
    }
    match host_problem(host) {
        Some(problem) => Err(format!("invalid host: {problem}; {EXPECTED}")),
        None => Ok(()),
    }
}

/// Route prefixes: start with `/`, no whitespace or control characters (Envoy
/// matches them byte for byte, so invisible characters would never match).
pub(crate) fn check_route(route: &str) -> Result<(), String> {
    if !route.starts_with('/') {
        return Err(format!(
            "route `{route}` must start with `/` (e.g. `/{}`)",
            route.trim_start_matches('/')
        ));
    }
    if route.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "route `{}` contains whitespace or control characters",
            route.escape_debug()
        ));
    }
    Ok(())
}
