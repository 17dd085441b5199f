//! An entry's tags (surrogate keys): the route's `tags`, templated from the request, plus
//! the tags the upstream sends in `Surrogate-Key` (space-separated, Fastly's convention) and
//! `Cache-Tag` (comma-separated, Cloudflare's). Purges by tag (`POST /admin/purge`) match
//! them. Tags are stored in clear text with the entry (inside its sealed envelope in
//! Redis) and appear in purge requests and logs of purges: no personal data in tags.

use http::HeaderMap;

use cachegate_core::purge::PATH_TAG_PREFIX;

use crate::policy::Route;
use crate::uri::QueryParam;

/// Tags kept per entry at most; further ones are dropped.
pub const MAX_TAGS: usize = 64;
/// Bytes per tag at most; a longer tag is dropped.
pub const MAX_TAG_BYTES: usize = 256;

/// The tags an entry stored for a request gets besides the upstream's: its route's (see
/// [`route_tags`]), `route:{name}` for purges by route, and `path:{normalized path}` for
/// purges by path pattern ([`cachegate_core::purge::PATH_TAG_PREFIX`]). The path is stored
/// with the entry (sealed in Redis) and matched by patterns, never sent anywhere.
pub fn entry_tags(route: Option<&Route>, path: &str, query: &[QueryParam<'_>]) -> Vec<String> {
    let mut tags = route.map_or_else(Vec::new, |r| route_tags(&r.tags, path, query));
    if let Some(route) = route {
        tags.push(route_tag(&route.name));
    }
    tags.push(format!("{PATH_TAG_PREFIX}{path}"));
    tags
}

/// Checks a purge's path pattern (`*` matching any run of characters): it starts with
/// `/` or `*`, holds no query and no `.` or `..` segment
/// ([`crate::uri::normalize_pattern`]), as the paths it is matched with.
///
/// Errors: what is wrong with it, naming it.
pub fn check_path_pattern(pattern: &str) -> Result<(), String> {
    if !pattern.starts_with(['/', '*']) {
        return Err(format!(
            "{pattern:?}: a path pattern starts with '/' (or '*')"
        ));
    }
    if pattern.contains('?') {
        return Err(format!("{pattern:?}: a path pattern holds no query ('?')"));
    }
    crate::uri::normalize_pattern(pattern)
        .map(drop)
        .map_err(|e| format!("{pattern:?}: {e}"))
}

/// The implicit tag of the entries a route stores: `route:{name}`.
pub fn route_tag(name: &str) -> String {
    format!("route:{name}")
}

/// What a purge of the whole namespace (`all`), of `tags`, of the entries of `routes`
/// (their implicit tag, [`route_tag`]) and of `paths` (globs) covers, as the engine's
/// scopes: `[All]` when `all`, else a tags scope and a paths scope when non-empty.
pub fn purge_scopes(
    all: bool,
    tags: &[String],
    routes: &[String],
    paths: &[String],
) -> Vec<cachegate_core::invalidation::PurgeScope> {
    use cachegate_core::invalidation::PurgeScope;
    if all {
        return vec![PurgeScope::All];
    }
    let mut scopes = Vec::new();
    let mut tags = tags.to_vec();
    tags.extend(routes.iter().map(|r| route_tag(r)));
    if !tags.is_empty() {
        scopes.push(PurgeScope::Tags(tags));
    }
    if !paths.is_empty() {
        // Entries are tagged with their normalized path: patterns spelled the same way.
        // (One that cannot be normalized, refused by `check_path_pattern`, matches no
        // normalized path as it is.)
        let paths = paths
            .iter()
            .map(|p| crate::uri::normalize_pattern(p).unwrap_or_else(|_| p.clone()));
        scopes.push(PurgeScope::Paths(paths.collect()));
    }
    scopes
}

/// The route's tags for one request: `{query.NAME}` becomes the first value of query
/// parameter `NAME` (as normalized for the key), `{path.N}` the `N`th segment of the
/// normalized path (1-based). A tag whose placeholder has no value in this request is left
/// out (so that `kpi:{query.region}` never becomes a catch-all `kpi:`).
///
/// ```
/// use cachegate::tags::route_tags;
/// use cachegate::uri::parse_query;
/// let q = parse_query("region=eu&x=1");
/// let tags = route_tags(&["kpi".into(), "kpi:{query.region}".into(), "{path.2}".into(), "{query.none}".into()], "/kpi/leads", &q);
/// assert_eq!(tags, ["kpi", "kpi:eu", "leads"]);
/// ```
pub fn route_tags(templates: &[String], path: &str, query: &[QueryParam<'_>]) -> Vec<String> {
    templates
        .iter()
        .filter_map(|t| expand(t, path, query))
        .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_BYTES)
        .take(MAX_TAGS)
        .collect()
}

/// Checks a route tag template: every `{` closed by a `}` around `query.NAME` (a
/// non-empty name) or `path.N` (N from 1).
///
/// Errors: what is wrong, for the config error.
pub fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}').map(|i| i + open) else {
            return Err(format!("{template:?}: a `{{` without its `}}`"));
        };
        let name = &rest[open + 1..close];
        if Placeholder::parse(name).is_none() {
            return Err(format!(
                "{template:?}: `{{{name}}}` is neither {{query.NAME}} nor {{path.N}} (N from 1)"
            ));
        }
        rest = &rest[close + 1..];
    }
    Ok(())
}

/// A tag template's placeholder: `{query.NAME}` or `{path.N}`.
enum Placeholder<'a> {
    /// The first value of query parameter `NAME` (not empty, no `{`).
    Query(&'a str),
    /// The `N`th segment of the path (from 1).
    Path(usize),
}

impl<'a> Placeholder<'a> {
    /// The placeholder between `{` and `}`; `None` for anything else.
    fn parse(name: &'a str) -> Option<Self> {
        if let Some(param) = name.strip_prefix("query.") {
            return (!param.is_empty() && !param.contains('{'))
                .then_some(Placeholder::Query(param));
        }
        let n: usize = name.strip_prefix("path.")?.parse().ok()?;
        (n >= 1).then_some(Placeholder::Path(n))
    }
}

fn expand(template: &str, path: &str, query: &[QueryParam<'_>]) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}')? + open;
        let name = &rest[open + 1..close];
        let value = match Placeholder::parse(name)? {
            Placeholder::Query(param) => query
                .iter()
                .find(|p| p.name == param)
                .and_then(|p| p.value.as_deref())
                .map(str::to_string)?,
            Placeholder::Path(n) => path
                .split('/')
                .filter(|s| !s.is_empty())
                .nth(n - 1)?
                .to_string(),
        };
        if value.is_empty() {
            return None;
        }
        out.push_str(&value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The tags an upstream response carries in `Surrogate-Key` (space-separated) and
/// `Cache-Tag` (comma-separated), removed from `headers` unless `expose`. Invalid UTF-8,
/// empty and over-long tags are dropped; at most [`MAX_TAGS`].
pub fn take_response_tags(
    headers: &mut HeaderMap,
    names: &TagHeaders,
    expose: bool,
) -> Vec<String> {
    let mut tags = Vec::new();
    for (name, separator) in [(&names.surrogate_key, ' '), (&names.cache_tag, ',')] {
        for value in headers.get_all(name.as_str()) {
            let Ok(value) = value.to_str() else { continue };
            tags.extend(
                value
                    .split(separator)
                    .map(str::trim)
                    .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_BYTES)
                    .map(str::to_string),
            );
        }
        if !expose {
            headers.remove(name.as_str());
        }
    }
    tags.truncate(MAX_TAGS);
    tags
}

/// The response headers tags are read from.
#[derive(Debug, Clone)]
pub struct TagHeaders {
    /// Space-separated tags; default `surrogate-key`.
    pub surrogate_key: String,
    /// Comma-separated tags; default `cache-tag`.
    pub cache_tag: String,
}

impl Default for TagHeaders {
    fn default() -> Self {
        TagHeaders {
            surrogate_key: "surrogate-key".into(),
            cache_tag: "cache-tag".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::header_map;

    #[test]
    fn response_tags_are_read_and_removed_unless_exposed() {
        let names = TagHeaders::default();
        let mut h = header_map(&[
            ("surrogate-key", "kpi  leads"),
            ("cache-tag", "region:eu, overview,"),
            ("content-type", "application/json"),
        ]);
        let tags = take_response_tags(&mut h, &names, false);
        assert_eq!(tags, ["kpi", "leads", "region:eu", "overview"]);
        assert_eq!(h.len(), 1);
        let mut h = header_map(&[("cache-tag", "a")]);
        assert_eq!(take_response_tags(&mut h, &names, true), ["a"]);
        assert!(h.contains_key("cache-tag"));
    }

    #[test]
    fn templates_without_a_value_are_left_out() {
        let q = crate::uri::parse_query("region=&flag");
        let t = |s: &str| route_tags(&[s.to_string()], "/a/b", &q);
        assert!(t("kpi:{query.region}").is_empty(), "empty value");
        assert!(t("kpi:{query.flag}").is_empty(), "no value");
        assert!(t("{path.3}").is_empty());
        assert!(t("{path.0}").is_empty());
        assert!(t("{unknown}").is_empty());
        assert!(t("{query.region").is_empty(), "unclosed");
        assert_eq!(t("{path.1}-{path.2}"), ["a-b"]);
    }
}
