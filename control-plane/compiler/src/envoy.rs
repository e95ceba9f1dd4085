//! Small Envoy proto helpers shared by the compiler's modules.

use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address,
    config_source, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, filter};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

/// The config source "over the same ADS stream".
pub(crate) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// `m` packed as a `google.protobuf.Any`.
pub(crate) fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// An HTTP connection manager taking route configuration `name` over RDS; `filters`
/// run before the router.
pub(crate) fn hcm(name: &str, filters: Vec<HttpFilter>) -> HttpConnectionManager {
    let rds = http_connection_manager::RouteSpecifier::Rds(Rds {
        config_source: Some(ads()),
        route_config_name: name.to_string(),
    });
    hcm_routed(name, rds, filters)
}

/// An HTTP connection manager named `name` whose routes come from `routes`; `filters`
/// run before the router.
pub(crate) fn hcm_routed(
    name: &str,
    routes: http_connection_manager::RouteSpecifier,
    mut filters: Vec<HttpFilter>,
) -> HttpConnectionManager {
    filters.push(HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    });
    HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(routes),
        http_filters: filters,
        ..Default::default()
    }
}

/// A filter chain running `hcm`.
pub(crate) fn hcm_chain(hcm: &HttpConnectionManager) -> FilterChain {
    FilterChain {
        filters: vec![Filter {
            name: "envoy.filters.network.http_connection_manager".to_string(),
            config_type: Some(filter::ConfigType::TypedConfig(any(hcm))),
        }],
        ..Default::default()
    }
}

/// A socket address, IP or DNS name.
pub(crate) fn socket(host: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}
