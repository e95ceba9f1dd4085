//! On-demand outbound routes for vehicle Envoys on delta xDS (scoped routes, SRDS).
//!
//! A vehicle Envoy that holds every route of a large mesh pays for all of it in
//! memory, and one service's edit resends the whole route table. With scopes, the
//! outbound routes are split by *scope key*, one RouteConfiguration per key, and the
//! scopes of services the vehicle does not declare are `on_demand`: Envoy fetches
//! their route table on first use (the `on_demand` filter), and their clusters by
//! name (ODCDS over ADS). An edit then reaches only Envoys that loaded the scope.
//!
//! The scope key of a request, computed by a small Lua filter (Envoy's own key
//! builder can only take one header):
//! - `host/<name>` when the `Host` (lowercased, without `:port` and a `.mesh` suffix)
//!   is a bare name other than `localhost`: the service of that name;
//! - else `path/<first segment>` of the path (`/maps/tiles?x=1` → `path/maps`),
//!   holding the routes whose prefixes start with that segment, longest first.
//!
//! A key no scope has gets Envoy's 404 at once (no fetch). Every scope the snapshot
//! lists has its route table in the same snapshot, so an on-demand fetch never hangs.
//! Difference from the single table: a prefix matches within its first segment only
//! (`/ma` does not catch `/maps`), and a bare-name `Host` that is no service is not
//! routed by path.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteConfiguration, RouteMatch, ScopedRouteConfiguration, VirtualHost, route_match,
    scoped_route_configuration,
};
use envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua;
use envoy_types::pb::envoy::extensions::filters::http::on_demand::v3::{OnDemand, OnDemandCds};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, ScopedRds, ScopedRoutes, http_filter, scoped_routes,
};

use crate::compile::{ads, any};

/// Request header carrying the scope key (set by the Lua filter, removed upstream).
pub const SCOPE_HEADER: &str = "x-misaki-scope";

/// The scope key computation, in Lua (see the module doc; [`path_key`] is its twin).
const SCOPE_LUA: &str = r#"function envoy_on_request(h)
  local hd = h:headers()
  local host = string.lower(hd:get(":authority") or "")
  host = string.gsub(host, ":%d+$", "")
  host = string.gsub(host, "%.mesh$", "")
  local key
  if host ~= "" and host ~= "localhost" and not string.find(host, "[.:%[]") then
    key = "host/" .. host
  else
    local path = hd:get(":path") or "/"
    key = "path/" .. (string.match(path, "^/([^/?#]*)") or "")
  end
  hd:replace("x-misaki-scope", key)
end
"#;

/// The scope key of a route prefix.
pub(crate) fn path_key(prefix: &str) -> String {
    let rest = prefix.strip_prefix('/').unwrap_or(prefix);
    let segment = rest.split(['/', '?', '#']).next().unwrap_or("");
    format!("path/{segment}")
}

/// The scope key of a service addressed by `Host`.
pub(crate) fn host_key(service: &str) -> String {
    format!("host/{service}")
}

/// One scope being assembled: its routes, and whether any of them is eager.
#[derive(Default)]
struct Scope {
    routes: Vec<Route>,
    eager: bool,
}

/// The outbound routes of a vehicle, grouped into scopes.
#[derive(Default)]
pub(crate) struct Scopes {
    by_key: BTreeMap<String, Scope>,
}

/// What [`Scopes::finish`] produces.
pub(crate) struct ScopedOutput {
    pub scopes: Vec<ScopedRouteConfiguration>,
    /// Route tables, with whether each is on demand.
    pub routes: Vec<(RouteConfiguration, bool)>,
}

impl Scopes {
    /// Add a service's routes: `by_host` serves its `host/` scope, `by_path` go to the
    /// `path/` scope of each prefix's first segment.
    pub(crate) fn add(
        &mut self,
        service: &str,
        by_host: &VirtualHost,
        by_path: Vec<Route>,
        eager: bool,
    ) {
        let host = self.by_key.entry(host_key(service)).or_default();
        host.routes.extend(by_host.routes.iter().cloned());
        host.eager |= eager;
        for r in by_path {
            let key = match &r.r#match {
                Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(p)),
                    ..
                }) => path_key(p),
                _ => continue,
            };
            let scope = self.by_key.entry(key).or_default();
            scope.routes.push(r);
            scope.eager |= eager;
        }
    }

    /// One scope and one route table per key; names are `{listener}/{key}`.
    pub(crate) fn finish(self, listener: &str) -> ScopedOutput {
        let mut out = ScopedOutput {
            scopes: Vec::with_capacity(self.by_key.len()),
            routes: Vec::with_capacity(self.by_key.len()),
        };
        for (key, mut scope) in self.by_key {
            let name = format!("{listener}/{key}");
            // Longest prefix first, as in the single table.
            scope
                .routes
                .sort_by_key(|r| std::cmp::Reverse(prefix_len(r)));
            out.scopes.push(ScopedRouteConfiguration {
                on_demand: !scope.eager,
                name: name.clone(),
                route_configuration_name: name.clone(),
                key: Some(scoped_route_configuration::Key {
                    fragments: vec![scoped_route_configuration::key::Fragment {
                        r#type: Some(scoped_route_configuration::key::fragment::Type::StringKey(
                            key,
                        )),
                    }],
                }),
                ..Default::default()
            });
            out.routes.push((
                RouteConfiguration {
                    name,
                    virtual_hosts: vec![VirtualHost {
                        name: "scope".to_string(),
                        domains: vec!["*".to_string()],
                        routes: scope.routes,
                        ..Default::default()
                    }],
                    request_headers_to_remove: vec![SCOPE_HEADER.to_string()],
                    // Clusters of on-demand services arrive on first use (ODCDS).
                    validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue {
                        value: false,
                    }),
                    ..Default::default()
                },
                !scope.eager,
            ));
        }
        out
    }
}

fn prefix_len(r: &Route) -> usize {
    match &r.r#match {
        Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(p)),
            ..
        }) => p.len(),
        _ => 0,
    }
}

/// The HCM route specifier of a scoped listener: scopes over SRDS, route tables
/// over RDS, both on ADS, keyed by [`SCOPE_HEADER`].
pub(crate) fn scoped_routes(listener: &str) -> ScopedRoutes {
    use scoped_routes::scope_key_builder::{FragmentBuilder, fragment_builder};
    ScopedRoutes {
        name: listener.to_string(),
        scope_key_builder: Some(scoped_routes::ScopeKeyBuilder {
            fragments: vec![FragmentBuilder {
                r#type: Some(fragment_builder::Type::HeaderValueExtractor(
                    fragment_builder::HeaderValueExtractor {
                        name: SCOPE_HEADER.to_string(),
                        element_separator: String::new(),
                        extract_type: Some(
                            fragment_builder::header_value_extractor::ExtractType::Index(0),
                        ),
                    },
                )),
            }],
        }),
        rds_config_source: Some(ads()),
        config_specifier: Some(scoped_routes::ConfigSpecifier::ScopedRds(ScopedRds {
            scoped_rds_config_source: Some(ads()),
            ..Default::default()
        })),
    }
}

/// The filters before the router on a scoped listener: the key, then on-demand
/// fetching of scopes' route tables and of clusters.
pub(crate) fn filters() -> Vec<HttpFilter> {
    let lua = Lua {
        default_source_code: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(SCOPE_LUA.to_string())),
            ..Default::default()
        }),
        ..Default::default()
    };
    let on_demand = OnDemand {
        odcds: Some(OnDemandCds {
            source: Some(ads()),
            ..Default::default()
        }),
    };
    vec![
        HttpFilter {
            name: "envoy.filters.http.lua".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(&lua))),
            ..Default::default()
        },
        HttpFilter {
            name: "envoy.filters.http.on_demand".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(&on_demand))),
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_keys_take_the_first_segment() {
        assert_eq!(path_key("/maps"), "path/maps");
        assert_eq!(path_key("/maps/tiles"), "path/maps");
        assert_eq!(path_key("/hazards.v1.Hazards/"), "path/hazards.v1.Hazards");
        assert_eq!(path_key("/"), "path/");
    }
}
