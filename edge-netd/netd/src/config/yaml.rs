//! Reading the config's YAML: a tree with a position on every node, walked once.
//!
//! Invariant: every getter returns a value or records exactly one [`ConfigIssue`] at
//! the node it was given (file, line, column, field path); none stops the walk, so
//! one pass reports every problem in the file.
//!
//! Scalars are loaded as written (saphyr with early parsing off) and typed here, with
//! the spellings edge-netd has always accepted: any scalar is text where text is wanted
//! (`vehicle_id: 0001` is `0001`, not 1), an integer may be quoted (`"64"`), a boolean
//! is `true`/`false` or YAML 1.1's `yes`/`no`/`on`/`off`/`y`/`n` (any case).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use saphyr::{MarkedYaml, ScalarStyle, YamlData, YamlLoader};

use super::{ConfigIssue, parse_size};

pub(super) type Node<'y> = MarkedYaml<'y>;

/// Walks one file, collecting its issues.
pub(super) struct Reader {
    file: String,
    issues: Vec<ConfigIssue>,
}

impl Reader {
    pub fn new(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            issues: Vec::new(),
        }
    }

    /// The issues found, in the order they appear in the file.
    pub fn into_issues(mut self) -> Vec<ConfigIssue> {
        self.issues.sort_by_key(|i| (i.line, i.column));
        self.issues
    }

    pub fn is_clean(&self) -> bool {
        self.issues.is_empty()
    }

    fn push(&mut self, line: usize, column: usize, path: &str, message: String) {
        self.issues.push(ConfigIssue {
            file: self.file.clone(),
            line,
            column,
            path: path.to_owned(),
            message,
        });
    }

    pub fn error(&mut self, node: &Node<'_>, path: &str, message: impl Into<String>) {
        // saphyr's columns are 0-based; editors and compilers count from 1.
        let (line, column) = (node.span.start.line(), node.span.start.col() + 1);
        self.push(line, column, path, message.into());
    }

    /// The one document of `text`; `None` (with an issue) if it is not YAML, empty, or
    /// more than one document.
    pub fn load<'y>(&mut self, text: &'y str) -> Option<Node<'y>> {
        let mut loader: YamlLoader<'y, Node<'y>> = YamlLoader::default();
        loader.early_parse(false);
        let mut parser = saphyr_parser::Parser::new_from_str(text);
        // The loader keeps its own first error (e.g. a duplicated key) apart from the
        // parser's.
        let scanned = parser.load(&mut loader, true);
        if let Some(e) = scanned.err().or_else(|| loader.error().cloned()) {
            let (line, column) = (e.marker().line(), e.marker().col() + 1);
            self.push(line, column, "", format!("invalid YAML: {}", e.info()));
            return None;
        }
        let mut docs = loader.into_documents().into_iter();
        let Some(doc) = docs.next().filter(|d| !is_null(d)) else {
            self.push(0, 0, "", "the file is empty; expected a mapping".into());
            return None;
        };
        if let Some(extra) = docs.next() {
            self.error(
                &extra,
                "",
                "a config file holds one YAML document; remove the `---`",
            );
        }
        Some(doc)
    }

    /// Text: any scalar, as written.
    pub fn text<'n>(&mut self, node: &'n Node<'_>, path: &str, expected: &str) -> Option<&'n str> {
        match &node.data {
            YamlData::Representation(text, _, _) if !is_null(node) => Some(text.as_ref()),
            _ => {
                self.wrong_type(node, path, expected);
                None
            }
        }
    }

    /// Non-empty text.
    pub fn nonempty<'n>(&mut self, node: &'n Node<'_>, path: &str) -> Option<&'n str> {
        let text = self.text(node, path, "a non-empty string")?;
        if text.is_empty() {
            self.error(node, path, "must not be empty");
            return None;
        }
        Some(text)
    }

    /// A decimal integer in `range` (also `0x..`, `0o..`, `0b..`, as YAML allows).
    pub fn int(&mut self, node: &Node<'_>, path: &str, range: RangeInclusive<u64>) -> Option<u64> {
        let expected = format!("an integer from {} to {}", range.start(), range.end());
        let text = self.text(node, path, &expected)?;
        match parse_uint(text) {
            Some(n) if range.contains(&n) => Some(n),
            Some(n) => {
                self.error(
                    node,
                    path,
                    format!("{n} is not in {}..={}", range.start(), range.end()),
                );
                None
            }
            None => {
                self.error(node, path, format!("expected {expected}, found `{text}`"));
                None
            }
        }
    }

    pub fn boolean(&mut self, node: &Node<'_>, path: &str) -> Option<bool> {
        let text = self.text(node, path, "true or false")?;
        let is = |words: [&str; 4]| words.iter().any(|w| text.eq_ignore_ascii_case(w));
        if is(["true", "yes", "on", "y"]) {
            Some(true)
        } else if is(["false", "no", "off", "n"]) {
            Some(false)
        } else {
            self.error(
                node,
                path,
                format!("expected true or false, found `{text}`"),
            );
            None
        }
    }

    /// A duration > 0, spelled as in policy files (`150ms`, `5s`, `2m`, `1h`).
    pub fn duration(&mut self, node: &Node<'_>, path: &str) -> Option<Duration> {
        let text = self.text(node, path, "a duration such as `250ms` or `5s`")?;
        match misaki_policy::parse_duration(text) {
            Ok(d) if d.is_zero() => self.error(node, path, "must be greater than 0"),
            Ok(d) => return Some(d),
            Err(e) => self.error(node, path, e.to_string()),
        }
        None
    }

    /// A size > 0 (`65536`, `64KiB`, `500MB`).
    pub fn size(&mut self, node: &Node<'_>, path: &str) -> Option<u64> {
        let text = self.text(node, path, "a size such as `64KiB` or `8MiB`")?;
        match parse_size(text) {
            Ok(0) => self.error(node, path, "must be greater than 0"),
            Ok(n) => return Some(n),
            Err(m) => self.error(node, path, m),
        }
        None
    }

    /// `IP:port`; no names, so nothing here depends on a resolver.
    pub fn addr(&mut self, node: &Node<'_>, path: &str) -> Option<SocketAddr> {
        let text = self.text(node, path, "an IP:port")?;
        let parsed = text.parse::<SocketAddr>();
        if parsed.is_err() {
            self.error(
                node,
                path,
                format!("{text:?} is not an IP:port (DNS names are not allowed: probes must not depend on a resolver)"),
            );
        }
        parsed.ok()
    }

    /// One of a fixed set of words, spelled exactly.
    pub fn choice<T: Copy>(
        &mut self,
        node: &Node<'_>,
        path: &str,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.text(node, path, what)?;
        let found = options.iter().find(|(s, _)| *s == text).map(|(_, v)| *v);
        if found.is_none() {
            let allowed: Vec<&str> = options.iter().map(|(s, _)| *s).collect();
            let allowed = allowed.join(", ");
            self.error(
                node,
                path,
                format!("unknown {what} {text:?}; expected one of: {allowed}"),
            );
        }
        found
    }

    pub fn seq<'n, 'y>(&mut self, node: &'n Node<'y>, path: &str) -> Option<&'n [Node<'y>]> {
        match &node.data {
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.wrong_type(node, path, "a list");
                None
            }
        }
    }

    /// A mapping's entries by key, whatever the keys.
    pub fn entries<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
    ) -> Option<Vec<(&'n str, &'n Node<'y>)>> {
        let YamlData::Mapping(mapping) = &node.data else {
            self.wrong_type(node, path, "a mapping");
            return None;
        };
        let mut out = Vec::with_capacity(mapping.len());
        for (key, value) in mapping.iter() {
            if let Some(name) = self.text(key, path, "a field name") {
                out.push((name, value));
            }
        }
        Some(out)
    }

    /// A mapping whose keys must all be in `allowed`: each unknown key is reported (a
    /// typo must not fall back to a default), the others are kept for typed reading.
    pub fn map<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        allowed: &'static [&'static str],
    ) -> Option<Fields<'n, 'y>> {
        let entries = self.entries(node, path)?;
        let mut fields = Fields {
            at: node,
            path: path.to_owned(),
            entries: Vec::with_capacity(entries.len()),
        };
        for (name, value) in entries {
            if allowed.contains(&name) {
                fields.entries.push((name, value));
            } else {
                let key = mapping_key(node, name).unwrap_or(value);
                let message = format!(
                    "unknown field `{name}`; allowed fields here: {}",
                    allowed.join(", ")
                );
                self.error(key, &fields.path(name), message);
            }
        }
        Some(fields)
    }

    fn wrong_type(&mut self, node: &Node<'_>, path: &str, expected: &str) {
        let found = match &node.data {
            YamlData::Sequence(_) => "a list".to_owned(),
            YamlData::Mapping(_) => "a mapping".to_owned(),
            _ if is_null(node) => "nothing".to_owned(),
            YamlData::Representation(text, _, _) => format!("`{text}`"),
            _ => "an invalid value".to_owned(),
        };
        self.error(node, path, format!("expected {expected}, found {found}"));
    }
}

/// Whether `node` is a mapping (for a field that takes a scalar or a mapping).
pub(super) fn is_mapping(node: &Node<'_>) -> bool {
    matches!(node.data, YamlData::Mapping(_))
}

/// The known fields of one mapping.
pub(super) struct Fields<'n, 'y> {
    /// The mapping: a missing field is reported where it starts.
    at: &'n Node<'y>,
    path: String,
    entries: Vec<(&'n str, &'n Node<'y>)>,
}

impl<'n, 'y> Fields<'n, 'y> {
    /// The path of one of its fields (`probe.interval`).
    pub fn path(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    /// An optional field; `field:` with no value (or `~`, `null`) counts as absent.
    pub fn get(&self, field: &str) -> Option<&'n Node<'y>> {
        self.entries
            .iter()
            .find(|(name, _)| *name == field)
            .map(|(_, v)| *v)
            .filter(|n| !is_null(n))
    }

    /// A required field; reported (at the mapping) when absent. `hint` says what a
    /// value looks like.
    pub fn required(&self, r: &mut Reader, field: &str, hint: &str) -> Option<&'n Node<'y>> {
        let found = self.get(field);
        if found.is_none() {
            let message = format!("missing required field `{field}` ({hint})");
            r.error(self.at, &self.path(field), message);
        }
        found
    }

    /// The field's value node, or the mapping's when it is absent: where to report a
    /// problem with the field.
    pub fn at(&self, field: &str) -> &'n Node<'y> {
        self.get(field).unwrap_or(self.at)
    }

    /// Read an optional field with `read`, or take `default` when it is absent (or
    /// wrong: the error is recorded, and the default keeps later checks meaningful).
    pub fn or<T>(
        &self,
        r: &mut Reader,
        field: &str,
        default: T,
        read: impl FnOnce(&mut Reader, &'n Node<'y>, &str) -> Option<T>,
    ) -> T {
        self.get(field)
            .and_then(|n| read(r, n, &self.path(field)))
            .unwrap_or(default)
    }
}

/// `""`, `~` and `null` written plainly: YAML's null.
fn is_null(node: &Node<'_>) -> bool {
    matches!(&node.data, YamlData::Representation(t, ScalarStyle::Plain, None)
        if matches!(t.as_ref(), "" | "~" | "null" | "Null" | "NULL"))
}

/// The key node of `name` in `mapping`, to point an unknown-field error at the key.
fn mapping_key<'n, 'y>(mapping: &'n Node<'y>, name: &str) -> Option<&'n Node<'y>> {
    let YamlData::Mapping(m) = &mapping.data else {
        return None;
    };
    m.keys()
        .find(|k| matches!(&k.data, YamlData::Representation(t, _, _) if t == name))
}

/// `42`, `+42`, `0x2a`, `0o52`, `0b101010`; a decimal with a leading zero is not a
/// number (it reads like octal).
fn parse_uint(text: &str) -> Option<u64> {
    let t = text.trim().strip_prefix('+').unwrap_or(text.trim());
    let radix = [
        ("0x", 16),
        ("0X", 16),
        ("0o", 8),
        ("0O", 8),
        ("0b", 2),
        ("0B", 2),
    ];
    if let Some((digits, radix)) = radix
        .iter()
        .find_map(|(p, r)| t.strip_prefix(p).map(|d| (d, *r)))
    {
        return u64::from_str_radix(digits, radix).ok();
    }
    if t.len() > 1 && t.starts_with('0') || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_take_the_spellings_yaml_has() {
        assert_eq!(parse_uint("42"), Some(42));
        assert_eq!(parse_uint("+42"), Some(42));
        assert_eq!(parse_uint("0"), Some(0));
        assert_eq!(parse_uint("0x2a"), Some(42));
        assert_eq!(parse_uint("0o52"), Some(42));
        assert_eq!(parse_uint("0b101010"), Some(42));
        for bad in ["", "-1", "042", "4.2", "4e2", "forty", "1_000"] {
            assert_eq!(parse_uint(bad), None, "{bad}");
        }
    }
}
