//! On-demand outbound routes for vehicle Envoys on delta xDS (scoped routes, SRDS).
//!
//! A vehicle Envoy that holds every route of a large mesh pays for all of it in
//! memory, and one service's edit resends the whole route table. With scopes, the
//! outbound routes are split into *buckets*, one RouteConfiguration each, and the
//! buckets holding only services the vehicle does not declare are `on_demand`: Envoy
//! fetches their route table on first use (the `on_demand` filter), and clusters by
//! name (ODCDS over ADS). An edit then reaches only Envoys that loaded the bucket.
//!
//! A small Lua filter (Envoy's key builder reads one header, it cannot branch)
//! computes the request's *key* into [`KEY_HEADER`]:
//! - `host/<name>` when the `Host` (lowercased, without `:port` and a `.mesh` suffix)
//!   is a bare name other than `localhost`: the service of that name;
//! - else `path/<first segment>` of the path (`/maps/tiles?x=1` → `path/maps`): the
//!   routes whose prefixes start with that segment, longest first;
//!
//! and the key's bucket, djb2(key) mod [`BUCKETS`], into [`BUCKET_HEADER`], which
//! selects the scope. In a bucket's table every route also matches [`KEY_HEADER`]
//! exactly, so keys sharing a bucket never catch each other's requests. Buckets, not a
//! scope per key: a 3,000-service mesh has 6,000 keys, and every scope costs Envoy
//! memory and every vehicle a share of the initial scope list, used or not.
//!
//! A bucket without a scope, or a key no route of its bucket matches, gets Envoy's 404
//! at once. Every scope the snapshot lists has its route table in the same snapshot,
//! so an on-demand fetch never hangs (Envoy would hold the request: it ignores RDS
//! removals). Differences from the single table: a prefix matches within its first
//! segment (`/ma` does not catch `/maps`), and a bare-name `Host` that is no service
//! is not routed by path.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteConfiguration, RouteMatch, ScopedRouteConfiguration, VirtualHost,
    header_matcher, route_match, scoped_route_configuration,
};
use envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua;
use envoy_types::pb::envoy::extensions::filters::http::on_demand::v3::{OnDemand, OnDemandCds};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, ScopedRds, ScopedRoutes, http_filter, scoped_routes,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use crate::envoy::{ads, any};

/// Request header carrying the request's key (set by the Lua filter, removed upstream).
pub const KEY_HEADER: &str = "x-misaki-scope";

/// Request header carrying the key's bucket: the scope key (removed upstream).
pub const BUCKET_HEADER: &str = "x-misaki-bucket";

/// Number of buckets. Fixed: it is part of the Lua code, and changing it changes every
/// scope, so every vehicle would reload. 1,024 keeps a bucket of a 3,000-service mesh
/// at ~6 keys, so one service's edit resends a table of a few services.
pub const BUCKETS: u32 = 1024;

/// The key and bucket computation, in Lua (see the module doc; [`path_key`],
/// [`host_key`] and [`bucket`] are its twins). djb2 stays exact in LuaJIT's doubles:
/// h < 2^32, so h * 33 + 255 < 2^53.
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
  local b = 5381
  for i = 1, #key do
    b = (b * 33 + string.byte(key, i)) % 4294967296
  end
  hd:replace("x-misaki-scope", key)
  hd:replace("x-misaki-bucket", tostring(b % 1024))
end
"#;

/// The bucket of a key: djb2 mod [`BUCKETS`], as the Lua filter computes it.
pub fn bucket(key: &str) -> u32 {
    let h = key
        .bytes()
        .fold(5381u64, |h, b| (h * 33 + u64::from(b)) % (1 << 32));
    (h % u64::from(BUCKETS)) as u32
}

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

/// One bucket being assembled: its routes, and whether any of them is eager.
#[derive(Default)]
struct Scope {
    routes: Vec<Route>,
    eager: bool,
}

/// The outbound routes of a vehicle, grouped into buckets.
#[derive(Default)]
pub(crate) struct Scopes {
    by_bucket: BTreeMap<u32, Scope>,
}

/// What [`Scopes::finish`] produces.
pub(crate) struct ScopedOutput {
    pub scopes: Vec<ScopedRouteConfiguration>,
    /// Route tables, with whether each is on demand.
    pub routes: Vec<(RouteConfiguration, bool)>,
}

impl Scopes {
    /// Add a service's routes: `by_host` serves its `host/` key, `by_path` the `path/`
    /// key of each prefix's first segment; each in its key's bucket.
    pub(crate) fn add(
        &mut self,
        service: &str,
        by_host: &VirtualHost,
        by_path: Vec<Route>,
        eager: bool,
    ) {
        for r in &by_host.routes {
            self.put(host_key(service), r.clone(), eager);
        }
        for r in by_path {
            if let Some(key) = prefix_of(&r).map(path_key) {
                self.put(key, r, eager);
            }
        }
    }

    /// `route`, restricted to requests of `key`, into `key`'s bucket.
    fn put(&mut self, key: String, mut route: Route, eager: bool) {
        let scope = self.by_bucket.entry(bucket(&key)).or_default();
        if let Some(m) = route.r#match.as_mut() {
            m.headers.push(HeaderMatcher {
                name: KEY_HEADER.to_string(),
                header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                    StringMatcher {
                        match_pattern: Some(string_matcher::MatchPattern::Exact(key)),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            });
        }
        scope.routes.push(route);
        scope.eager |= eager;
    }

    /// One scope and one route table per bucket; names are `{listener}/{bucket}`.
    pub(crate) fn finish(self, listener: &str) -> ScopedOutput {
        let mut out = ScopedOutput {
            scopes: Vec::with_capacity(self.by_bucket.len()),
            routes: Vec::with_capacity(self.by_bucket.len()),
        };
        for (bucket, mut scope) in self.by_bucket {
            let key = bucket.to_string();
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
                    request_headers_to_remove: vec![
                        KEY_HEADER.to_string(),
                        BUCKET_HEADER.to_string(),
                    ],
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

fn prefix_of(r: &Route) -> Option<&str> {
    match &r.r#match {
        Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(p)),
            ..
        }) => Some(p),
        _ => None,
    }
}

fn prefix_len(r: &Route) -> usize {
    prefix_of(r).map_or(0, str::len)
}

/// The HCM route specifier of a scoped listener: scopes over SRDS, route tables
/// over RDS, both on ADS, keyed by [`BUCKET_HEADER`].
pub(crate) fn scoped_routes(listener: &str) -> ScopedRoutes {
    scoped_routes_by(listener, BUCKET_HEADER)
}

/// Scoped routes over ADS whose scope key is the first value of request header `key`.
pub(crate) fn scoped_routes_by(listener: &str, key: &str) -> ScopedRoutes {
    use scoped_routes::scope_key_builder::{FragmentBuilder, fragment_builder};
    ScopedRoutes {
        name: listener.to_string(),
        scope_key_builder: Some(scoped_routes::ScopeKeyBuilder {
            fragments: vec![FragmentBuilder {
                r#type: Some(fragment_builder::Type::HeaderValueExtractor(
                    fragment_builder::HeaderValueExtractor {
                        name: key.to_string(),
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
    fn buckets_are_djb2_mod_1024_as_in_the_lua_code() {
        // djb2("") = 5381, and 5381 % 1024 = 261.
        assert_eq!(bucket(""), 261);
        // (5381 * 33 + 'a') % 2^32 = 177670, and 177670 % 1024 = 518.
        assert_eq!(bucket("a"), 518);
        assert!(SCOPE_LUA.contains(&format!("b % {BUCKETS}")));
        // A 3,000-service mesh: a host and a path key per service.
        let used: std::collections::BTreeSet<u32> = (0..3000)
            .flat_map(|i| [format!("path/svc-{i}"), format!("host/svc-{i}")])
            .map(|k| bucket(&k))
            .collect();
        assert!(
            used.len() > 900,
            "6,000 keys fill most buckets: {}",
            used.len()
        );
    }

    #[test]
    fn path_keys_take_the_first_segment() {
        assert_eq!(path_key("/maps"), "path/maps");
        assert_eq!(path_key("/maps/tiles"), "path/maps");
        assert_eq!(path_key("/hazards.v1.Hazards/"), "path/hazards.v1.Hazards");
        assert_eq!(path_key("/"), "path/");
    }
}
