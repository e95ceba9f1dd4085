//! Store-and-forward settings, validated once at [`SafConfig::validate`] (called by
//! [`crate::StoreForward::start`]) so the runtime never meets a bad URL.

use std::{collections::BTreeMap, time::Duration};

use http::Uri;

/// Which HTTP version the forwarder speaks to a destination (the cloud Envoy speaks both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// HTTP/1.1 with keep-alive; one request per connection at a time (ALPN `http/1.1`
    /// over TLS).
    Http1,
    /// HTTP/2, many requests per connection: cleartext with prior knowledge (h2c) to
    /// `http://`, ALPN `h2` to `https://`.
    #[default]
    Http2,
}

/// Where the messages of one mesh service go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationConfig {
    /// Base URL, `http://host:port` or `https://host:port` (e.g. the cloud sidecar's
    /// `cloud_inbound` listener, which routes by path prefix). A path in it is prepended
    /// to the message path. `https://` is mutual TLS with the vehicle's certificate
    /// ([`crate::ClientIdentity`], given by [`crate::StoreForward::set_identity`]); the
    /// server must be a cloud identity of the fleet, whatever the host name.
    pub url: String,
    pub version: HttpVersion,
}

impl DestinationConfig {
    pub fn new(url: impl Into<String>, version: HttpVersion) -> Self {
        Self {
            url: url.into(),
            version,
        }
    }
}

/// Tuning of the ingest endpoint and the forwarder.
#[derive(Clone, Debug)]
pub struct SafConfig {
    /// Destination per service name; services not listed use `default_destination`.
    pub destinations: BTreeMap<String, DestinationConfig>,
    /// Destination of every other service (normally the cloud sidecar, `cloud_url`).
    pub default_destination: Option<DestinationConfig>,
    /// Largest request body the endpoint accepts (413 above). Keep it at or below the
    /// queue's `max_body_bytes`.
    pub max_body_bytes: usize,
    /// Deliveries in flight at once, over all classes and uplinks.
    pub max_in_flight: usize,
    /// Whole-request timeout of one delivery (connect + send + response head).
    pub request_timeout: Duration,
    /// TCP connect timeout of the forwarder's connections.
    pub connect_timeout: Duration,
    /// First retry delay of a class after a failed delivery; doubles per failure.
    pub backoff_base: Duration,
    /// Upper bound of the retry delay (also of a destination's `Retry-After`).
    pub backoff_max: Duration,
    /// Bodies smaller than this are sent uncompressed (zstd's frame overhead eats the gain).
    pub compress_min_bytes: usize,
    /// How often expired messages are dropped from the queue.
    pub expire_interval: Duration,
    /// On shutdown, how long deliveries already in flight may take to finish (those that
    /// don't are simply resent after the restart: at-least-once).
    pub shutdown_grace: Duration,
}

impl Default for SafConfig {
    fn default() -> Self {
        Self {
            destinations: BTreeMap::new(),
            default_destination: None,
            max_body_bytes: 8 << 20,
            max_in_flight: 64,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            compress_min_bytes: 256,
            expire_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A setting that cannot work; named by field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "destination {name}: url {url:?} is not an http:// or https:// URL with a host ({reason})"
    )]
    BadUrl {
        name: String,
        url: String,
        reason: String,
    },
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("backoff_base ({base:?}) must not exceed backoff_max ({max:?})")]
    Backoff { base: Duration, max: Duration },
}

/// A destination with its URL parsed.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) scheme_authority: String,
    pub(crate) base_path: String,
    pub(crate) version: HttpVersion,
    /// `https://`: mutual TLS with the vehicle's certificate.
    pub(crate) tls: bool,
}

impl SafConfig {
    /// Check every field; the runtime relies on these holding.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(ConfigError::Zero("max_body_bytes"));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::Zero("max_in_flight"));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero("request_timeout"));
        }
        if self.backoff_base.is_zero() {
            return Err(ConfigError::Zero("backoff_base"));
        }
        if self.backoff_base > self.backoff_max {
            return Err(ConfigError::Backoff {
                base: self.backoff_base,
                max: self.backoff_max,
            });
        }
        for (name, d) in self
            .destinations
            .iter()
            .map(|(n, d)| (n.as_str(), d))
            .chain(self.default_destination.iter().map(|d| ("default", d)))
        {
            Target::parse(name, d)?;
        }
        Ok(())
    }

    pub(crate) fn target(&self, service: &str) -> Option<Target> {
        let d = self
            .destinations
            .get(service)
            .or(self.default_destination.as_ref())?;
        // Validated at start, so this only fails if the config was changed since.
        Target::parse(service, d).ok()
    }
}

impl Target {
    fn parse(name: &str, d: &DestinationConfig) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::BadUrl {
            name: name.to_string(),
            url: d.url.clone(),
            reason: reason.to_string(),
        };
        let uri: Uri = d
            .url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let scheme = uri.scheme_str().unwrap_or_default();
        if scheme != "http" && scheme != "https" {
            return Err(bad("only http:// and https:// are supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if uri.query().is_some() {
            return Err(bad("a query is not allowed in a base URL"));
        }
        Ok(Self {
            scheme_authority: format!("{scheme}://{authority}"),
            base_path: uri.path().trim_end_matches('/').to_string(),
            version: d.version,
            tls: scheme == "https",
        })
    }

    /// The full URI of a message path (which starts with `/`).
    pub(crate) fn uri(&self, path: &str) -> Result<Uri, http::uri::InvalidUri> {
        format!("{}{}{}", self.scheme_authority, self.base_path, path).parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_other_schemes_and_garbage_urls_naming_the_destination() {
        let mut c = SafConfig {
            default_destination: Some(DestinationConfig::new("ftp://x:1", HttpVersion::Http2)),
            ..SafConfig::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::BadUrl { name, .. }) if name == "default"));
        c.default_destination = Some(DestinationConfig::new("https://", HttpVersion::Http1));
        assert!(c.validate().is_err());
        c.default_destination = Some(DestinationConfig::new("not a url", HttpVersion::Http1));
        assert!(c.validate().is_err());
        c.default_destination = Some(DestinationConfig::new(
            "http://198.18.0.1:15443/base/",
            HttpVersion::Http1,
        ));
        c.validate().unwrap();
        let t = c.target("telemetry").unwrap();
        assert_eq!(
            t.uri("/telemetry/up?x=1").unwrap().to_string(),
            "http://198.18.0.1:15443/base/telemetry/up?x=1"
        );
        assert!(!t.tls);
        c.destinations.insert(
            "maps".into(),
            DestinationConfig::new("https://cloud.example:15443", HttpVersion::Http2),
        );
        c.validate().unwrap();
        let t = c.target("maps").unwrap();
        assert!(t.tls);
        assert_eq!(
            t.uri("/maps/x").unwrap().to_string(),
            "https://cloud.example:15443/maps/x"
        );
    }
}
