//! Data-plane mutual TLS (policy `mesh.mtls`): vehicle sidecars call cloud and edge
//! sidecars over TLS with the vehicle's certificate; cloud sidecars verify it and tell
//! the service which vehicle called (`x-misaki-vehicle`, XFCC).
//!
//! Invariants:
//! - misaki-cp never holds a private key: [`crate::compile`] names certificates only
//!   through file-based SDS on the node's own disk (`<tls_dir>/sds-*.yaml`, see
//!   docs/node-identity.md); Secret resources come only from
//!   [`crate::compile_vehicle`] with the vehicle's own [`VehicleCredential`]
//!   (edge-netd's local tier, on the vehicle's loopback);
//! - a vehicle sidecar completes a handshake only with a peer whose certificate chains
//!   to the fleet CA and names a cloud identity of the policy's trust domain
//!   (`spiffe://<td>/cloud/...`): a cloud or edge sidecar, never another vehicle;
//! - a cloud sidecar accepts only vehicle and cloud identities of the trust domain (the
//!   fleet CA also issues claim credentials: those fail the handshake), and a service
//!   sees `x-misaki-vehicle` only as the bare id of a verified peer's
//!   `spiffe://<td>/vehicle/<id>`: whatever the client sent is removed first, on every
//!   filter chain, and XFCC is set (TLS) or removed (plaintext) by Envoy itself;
//! - a TLS connection into a cloud sidecar lasts at most [`MAX_TLS_CONNECTION_AGE`]:
//!   Envoy checks a certificate only in the handshake, so without it a vehicle's
//!   connection would keep its first certificate past renewals, past its expiry, and
//!   past a revocation (found by tests/tests/edge_mtls.rs).

use std::fmt;

use envoy_types::pb::envoy::config::core::v3::{
    ApiVersion, ConfigSource, DataSource, HttpProtocolOptions, PathConfigSource, TransportSocket,
    config_source, data_source, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateProviderPluginInstance, CertificateValidationContext, CommonTlsContext,
    DownstreamTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher, TlsCertificate,
    TlsParameters, UpstreamTlsContext, common_tls_context, secret, subject_alt_name_matcher,
    tls_parameters,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use misaki_policy::{MtlsMode, TrustDomain};

use crate::envoy::{ads, any, hcm, hcm_chain, socket};

/// The certificate-provider instance a proxyless gRPC client's bootstrap must define
/// (`certificate_providers`, plugin `file_watcher`: its certificate, key and the fleet CA).
pub const GRPC_CERT_PROVIDER: &str = "misaki";

/// SDS name of the vehicle's certificate and key (envoy-configs/sds/sds-vehicle-cert.yaml).
pub const VEHICLE_CERT: &str = "misaki_vehicle_cert";
/// SDS name of a cloud or edge sidecar's certificate and key (sds-cloud-cert.yaml).
pub const CLOUD_CERT: &str = "misaki_cloud_cert";
/// SDS name of the fleet CA, which every peer's certificate must chain to (sds-fleet-ca.yaml).
pub const FLEET_CA: &str = "misaki_fleet_ca";
/// Request header naming the calling vehicle, set by the cloud sidecar from the verified
/// client certificate only.
pub const VEHICLE_HEADER: &str = "x-misaki-vehicle";

const VEHICLE_CERT_FILE: &str = "sds-vehicle-cert.yaml";
const CLOUD_CERT_FILE: &str = "sds-cloud-cert.yaml";
const FLEET_CA_FILE: &str = "sds-fleet-ca.yaml";

/// A vehicle's credential (its certificate from the fleet CA, the key, and the fleet
/// CA), which edge-netd's local tier serves to the vehicle's Envoy by SDS. Its `Debug`
/// never shows the key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VehicleCredential {
    /// The certificate chain, PEM, leaf first.
    pub cert_chain_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
    /// The fleet CA certificates peers must chain to, PEM (both CAs during a rotation).
    pub ca_pem: String,
}

impl fmt::Debug for VehicleCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VehicleCredential")
            .field(
                "cert_chain_pem",
                &format_args!("{} bytes", self.cert_chain_pem.len()),
            )
            .field("key_pem", &format_args!("<redacted>"))
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .finish()
    }
}

/// Where a node's Envoy gets its certificate and the fleet CA from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SecretSource<'a> {
    /// File-based SDS in this directory of the node's own disk (nodes misaki-cp feeds).
    Files(&'a str),
    /// SDS over the ADS stream (edge-netd's local tier, which holds the vehicle's key).
    Ads,
}

impl SecretSource<'_> {
    fn sds(self, name: &str, file: &str) -> SdsSecretConfig {
        let source = match self {
            SecretSource::Ads => ads(),
            SecretSource::Files(dir) => ConfigSource {
                config_source_specifier: Some(
                    config_source::ConfigSourceSpecifier::PathConfigSource(PathConfigSource {
                        path: format!("{}/{file}", dir.trim_end_matches('/')),
                        ..Default::default()
                    }),
                ),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            },
        };
        SdsSecretConfig {
            name: name.to_string(),
            sds_config: Some(source),
        }
    }
}

/// `spiffe://<td>/<kind>/`, the prefix of every identity of that kind.
fn identity_prefix(td: &TrustDomain, kind: &str) -> String {
    format!("spiffe://{td}/{kind}/")
}

fn uri_san_prefix(prefix: String) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Prefix(prefix)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Present `cert` (SDS name, file), trust the fleet CA, and accept only peers whose
/// URI SAN starts with one of `peers`.
fn common_tls(
    secrets: SecretSource<'_>,
    cert: (&str, &str),
    peers: Vec<String>,
    alpn: &[&str],
) -> CommonTlsContext {
    let validation = common_tls_context::CombinedCertificateValidationContext {
        default_validation_context: Some(CertificateValidationContext {
            match_typed_subject_alt_names: peers.into_iter().map(uri_san_prefix).collect(),
            ..Default::default()
        }),
        validation_context_sds_secret_config: Some(secrets.sds(FLEET_CA, FLEET_CA_FILE)),
        ..Default::default()
    };
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![secrets.sds(cert.0, cert.1)],
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(validation),
        ),
        ..Default::default()
    }
}

fn tls_socket(config: envoy_types::pb::google::protobuf::Any) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(config)),
    }
}

/// The TLS of a vehicle cluster whose endpoints are cloud or edge sidecars: the
/// vehicle's certificate, HTTP/2 by ALPN, a server of a cloud identity only. Up to TLS
/// 1.3, which Envoy's client side does not offer by default: in TLS 1.2 the client
/// certificate, and so the vehicle's id, crosses the uplink in the clear.
pub(crate) fn vehicle_upstream(td: &TrustDomain, secrets: SecretSource<'_>) -> TransportSocket {
    let mut common = common_tls(
        secrets,
        (VEHICLE_CERT, VEHICLE_CERT_FILE),
        vec![identity_prefix(td, "cloud")],
        &["h2"],
    );
    common.tls_params = Some(TlsParameters {
        tls_maximum_protocol_version: tls_parameters::TlsProtocol::TlSv13 as i32,
        ..Default::default()
    });
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(common),
        ..Default::default()
    };
    tls_socket(any(&ctx))
}

/// [`vehicle_upstream`] for a proxyless gRPC client, which takes no SDS and no TLS
/// parameters: its certificate and CA come from the certificate-provider instance
/// [`GRPC_CERT_PROVIDER`] of its own bootstrap (gRFC A29); the server check is the same.
pub(crate) fn proxyless_upstream(td: &TrustDomain) -> TransportSocket {
    let provider = || CertificateProviderPluginInstance {
        instance_name: GRPC_CERT_PROVIDER.to_string(),
        certificate_name: String::new(),
    };
    let validation = CertificateValidationContext {
        ca_certificate_provider_instance: Some(provider()),
        match_typed_subject_alt_names: vec![uri_san_prefix(identity_prefix(td, "cloud"))],
        ..Default::default()
    };
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_provider_instance: Some(provider()),
            alpn_protocols: vec!["h2".to_string()],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContext(validation),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    tls_socket(any(&ctx))
}

/// The TLS of a cloud sidecar's inbound: its own certificate, a client certificate
/// required, of a vehicle or cloud identity.
fn cloud_downstream(td: &TrustDomain, tls_dir: &str) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(common_tls(
            SecretSource::Files(tls_dir),
            (CLOUD_CERT, CLOUD_CERT_FILE),
            vec![identity_prefix(td, "vehicle"), identity_prefix(td, "cloud")],
            &["h2", "http/1.1"],
        )),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    tls_socket(any(&ctx))
}

/// The TLS of a cloud sidecar's tunnel listener: its own certificate, a vehicle
/// certificate of the fleet required (a cloud identity has no tunnel to offer).
pub(crate) fn tunnel_downstream(td: &TrustDomain, tls_dir: &str) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(common_tls(
            SecretSource::Files(tls_dir),
            (CLOUD_CERT, CLOUD_CERT_FILE),
            vec![identity_prefix(td, "vehicle")],
            &["h2", "http/1.1"],
        )),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    tls_socket(any(&ctx))
}

/// Sets `x-misaki-vehicle` from the verified peer certificate, after removing whatever
/// the client sent. Lua because Envoy's header formatters cannot cut the id out of the
/// URI, nor check its trust domain and kind; and it runs before the router, whose
/// `request_headers_to_remove` would come after it and remove the value it sets.
const VEHICLE_ID_LUA: &str = r#"-- misaki: x-misaki-vehicle is the verified peer's vehicle id, or absent.
local prefix = "@PREFIX@"
function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove("x-misaki-vehicle")
  local ssl = handle:streamInfo():downstreamSslConnection()
  if ssl == nil or not ssl:peerCertificateValidated() then
    return
  end
  -- An identity certificate has exactly one URI SAN (the X.509-SVID rule).
  local uris = ssl:uriSanPeerCertificate()
  if #uris ~= 1 or string.sub(uris[1], 1, #prefix) ~= prefix then
    return
  end
  local id = string.sub(uris[1], #prefix + 1)
  if #id <= 128 and id ~= "." and id ~= ".." and string.find(id, "^[A-Za-z0-9._-]+$") then
    headers:add("x-misaki-vehicle", id)
  end
end
"#;

fn vehicle_id_filter(td: &TrustDomain) -> HttpFilter {
    // A trust domain is `[a-z0-9._-]`: nothing in it needs escaping in a Lua string.
    let code = VEHICLE_ID_LUA.replace("@PREFIX@", &identity_prefix(td, "vehicle"));
    let lua = Lua {
        default_source_code: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(code)),
            ..Default::default()
        }),
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.lua".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&lua))),
        ..Default::default()
    }
}

/// How long a cloud sidecar keeps one TLS connection (then drains it: in-flight requests
/// finish, the vehicle reconnects with the certificate it holds now). An hour bounds how
/// long an expired or superseded certificate keeps working, against one handshake per
/// vehicle per hour (~0.7 ms of a core each, bench/results-mtls.md).
pub const MAX_TLS_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The cloud sidecar's HTTP connection manager `name` on one filter chain: the vehicle
/// id filter first, then `filters`; XFCC set from the peer (`tls`) or removed.
fn cloud_hcm(
    name: &str,
    td: &TrustDomain,
    tls: bool,
    filters: &[HttpFilter],
) -> HttpConnectionManager {
    let mut all = vec![vehicle_id_filter(td)];
    all.extend_from_slice(filters);
    let mut h = hcm(name, all);
    use http_connection_manager::ForwardClientCertDetails as Fcc;
    if tls {
        h.forward_client_cert_details = Fcc::SanitizeSet as i32;
        h.set_current_client_cert_details =
            Some(http_connection_manager::SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            });
        h.common_http_protocol_options = Some(HttpProtocolOptions {
            max_connection_duration: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: MAX_TLS_CONNECTION_AGE.as_secs() as i64,
                nanos: 0,
            }),
            ..Default::default()
        });
    } else {
        h.forward_client_cert_details = Fcc::Sanitize as i32;
    }
    h
}

/// The cloud sidecar's inbound listener `name` (routes of the same name) with mTLS on
/// (`mode` is not `off`): one TLS filter chain; `permissive` adds a plaintext one, told
/// apart by the TLS inspector.
pub(crate) fn cloud_inbound(
    name: &str,
    mode: MtlsMode,
    td: &TrustDomain,
    tls_dir: &str,
    port: u16,
    filters: &[HttpFilter],
) -> Listener {
    let mut tls = hcm_chain(&cloud_hcm(name, td, true, filters));
    tls.transport_socket = Some(cloud_downstream(td, tls_dir));
    let mut listener = Listener {
        name: name.to_string(),
        address: Some(socket("0.0.0.0", port)),
        ..Default::default()
    };
    if mode == MtlsMode::Permissive {
        let by_transport = |protocol: &str| FilterChainMatch {
            transport_protocol: protocol.to_string(),
            ..Default::default()
        };
        tls.filter_chain_match = Some(by_transport("tls"));
        let mut plain = hcm_chain(&cloud_hcm(name, td, false, filters));
        plain.filter_chain_match = Some(by_transport("raw_buffer"));
        listener.filter_chains = vec![tls, plain];
        listener.listener_filters = vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        }];
    } else {
        listener.filter_chains = vec![tls];
    }
    listener
}

fn inline(pem: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(pem.to_string())),
        ..Default::default()
    })
}

/// The vehicle's SDS secrets: its certificate and key, and the fleet CA.
pub(crate) fn vehicle_secrets(credential: &VehicleCredential) -> Vec<Secret> {
    vec![
        Secret {
            name: FLEET_CA.to_string(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&credential.ca_pem),
                    ..Default::default()
                },
            )),
        },
        Secret {
            name: VEHICLE_CERT.to_string(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&credential.cert_chain_pem),
                private_key: inline(&credential.key_pem),
                ..Default::default()
            })),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_debug_output_never_shows_the_key() {
        let c = VehicleCredential {
            cert_chain_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n".into(),
            ca_pem: "ca".into(),
        };
        let shown = format!("{c:?} {c:#?}");
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains("PRIVATE"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("cert_chain_pem: 33 bytes"), "{shown}");
    }

    #[test]
    fn file_sds_paths_join_the_directory_once() {
        let sds = SecretSource::Files("/run/tls/").sds(FLEET_CA, FLEET_CA_FILE);
        let Some(config_source::ConfigSourceSpecifier::PathConfigSource(p)) =
            sds.sds_config.and_then(|c| c.config_source_specifier)
        else {
            panic!("file-based SDS");
        };
        assert_eq!(p.path, "/run/tls/sds-fleet-ca.yaml");
        let root = SecretSource::Files("/").sds(FLEET_CA, FLEET_CA_FILE);
        let Some(config_source::ConfigSourceSpecifier::PathConfigSource(p)) =
            root.sds_config.and_then(|c| c.config_source_specifier)
        else {
            panic!("file-based SDS");
        };
        assert_eq!(p.path, "/sds-fleet-ca.yaml");
    }

    #[test]
    fn the_lua_names_the_policys_trust_domain_and_vehicle_kind() {
        let f = vehicle_id_filter(&TrustDomain::new("fleet-7.example").unwrap());
        let Some(http_filter::ConfigType::TypedConfig(a)) = f.config_type else {
            panic!("typed config");
        };
        let lua: Lua = prost::Message::decode(a.value.as_slice()).unwrap();
        let Some(data_source::Specifier::InlineString(code)) =
            lua.default_source_code.and_then(|d| d.specifier)
        else {
            panic!("inline code");
        };
        assert!(code.contains(r#"local prefix = "spiffe://fleet-7.example/vehicle/""#));
        assert!(!code.contains("@PREFIX@"));
        assert!(code.contains(&format!("headers:remove(\"{VEHICLE_HEADER}\")")));
    }
}
