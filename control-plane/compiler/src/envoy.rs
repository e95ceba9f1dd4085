//! Small Envoy proto helpers shared by the compiler's modules (the compiler proper
//! and the gateway: neither imports the other's helpers).

use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address,
    config_source, socket_address,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, filter};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{CircuitBreakers, circuit_breakers};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue, HeaderValueOption, Http2ProtocolOptions, Locality, RoutingPriority,
    data_source,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::route::v3::{DirectResponseAction, route};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use misaki_policy::Location;
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

/// Response header saying why the mesh itself answered (e.g. `no-uplink`).
pub const REASON_HEADER: &str = "x-misaki-reason";

/// When an uplink dies, Envoy fails every request waiting for a connection on it at
/// once, and they all want their retry together: Envoy's default limit of 3 concurrent
/// retries per cluster fails the rest (measured: 811 of 814 caught requests), and a
/// retry budget does no better (it shrinks as those requests fail: 824 of 885). So the
/// limit is raised to what a vehicle's Envoy can carry; the class's `retries` still
/// bounds how often one request is retried.
pub(crate) fn failover_retry_limit() -> CircuitBreakers {
    const MAX_RETRIES: u32 = 1024;
    let threshold = |priority: RoutingPriority| circuit_breakers::Thresholds {
        priority: priority as i32,
        max_retries: Some(UInt32Value { value: MAX_RETRIES }),
        ..Default::default()
    };
    CircuitBreakers {
        thresholds: vec![
            threshold(RoutingPriority::Default),
            threshold(RoutingPriority::High),
        ],
        ..Default::default()
    }
}

/// Envoy answers itself, with `body`.
pub(crate) fn direct_response(status: u32, body: String) -> route::Action {
    route::Action::DirectResponse(DirectResponseAction {
        status,
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(body)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A header set on a request or response, replacing any value it had.
pub(crate) fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        append_action: 2, // OVERWRITE_IF_EXISTS_OR_ADD
        ..Default::default()
    }
}

pub(crate) fn load_assignment(
    cluster: &str,
    location: Location,
    endpoints: &[(String, u16)],
) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality {
                region: location.as_str().to_string(),
                ..Default::default()
            }),
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            lb_endpoints: endpoints
                .iter()
                .map(|(host, port)| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
                        address: Some(socket(host, *port)),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(crate) fn http2_upstream() -> HttpProtocolOptions {
    HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    }
}

pub(crate) fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
