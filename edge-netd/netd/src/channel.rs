//! The connection to the control plane, shared by the reporter and enrolment.
//!
//! TCP bound to the interface of the uplink selected for class `default` (so a silently
//! blackholed default route cannot cut the vehicle off), HTTP/2 keepalive, and for an
//! `https://` control plane mutual TLS (rustls, ring): the vehicle presents the
//! credential it is given and verifies misaki-cp against the fleet CA alone (no system
//! roots) and the URL's host (a DNS name, or an IP address against the IP SANs).

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::Config;
use crate::engine::EngineView;
use crate::policy::DEFAULT_CLASS;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A handshake that takes longer (a server that accepted but never answers) fails, so
/// the caller backs off instead of hanging.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a TLS connection presents and trusts, PEM.
#[derive(Clone, Copy)]
pub struct ClientTls<'a> {
    /// The client certificate (chain, leaf first).
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
    /// The CA(s) misaki-cp's certificate must chain to.
    pub ca_pem: &'a str,
}

impl std::fmt::Debug for ClientTls<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

/// Open a channel to `uri`, bound to `interface` when given; TLS with `tls` for
/// `https://` (an `https://` URI without `tls` fails to connect: never plaintext).
pub async fn connect(
    uri: &http::Uri,
    interface: Option<&str>,
    tls: Option<ClientTls<'_>>,
) -> Result<Channel, tonic::transport::Error> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    // The TCP layer under tonic's TLS: it must accept https:// URIs too.
    connector.enforce_http(false);
    if let Some(i) = interface {
        connector.set_interface(i);
    }
    let mut endpoint = Endpoint::from(uri.clone())
        // Detect a dead path within a few seconds even when nothing is sent.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    if let Some(t) = tls {
        // Only the fleet CA: no system roots, so no public CA can stand in for
        // misaki-cp. The server name is the URI's host (tonic strips IPv6 brackets).
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(t.ca_pem))
            .identity(Identity::from_pem(t.cert_pem, t.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        endpoint = endpoint.tls_config(config)?;
    }
    endpoint.connect_with_connector(connector).await
}

/// The interface of the uplink selected for class `default`, if any.
pub fn default_interface(config: &Config, view: &EngineView) -> Option<String> {
    let uplink = view.selection(DEFAULT_CLASS)?.uplink.as_ref()?;
    config
        .uplinks
        .iter()
        .find(|c| c.name == *uplink)
        .map(|c| c.interface.clone())
}

/// An error with its sources, `outer: inner: ...` (tonic's transport errors say only
/// "transport error" at the top; the cause, e.g. a refused certificate, is below).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
