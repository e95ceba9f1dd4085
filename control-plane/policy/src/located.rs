//! Located YAML: misaki's one reader of YAML files, for the mesh policy (this crate)
//! and edge-netd's config. A file is loaded as a tree with a position on every node
//! and read with typed getters; each problem becomes an [`Issue`] with file, line,
//! column and field path, shown as `file:line:column: field.path: message`.
//!
//! Invariant: every getter either returns a value or records exactly one [`Issue`] at
//! the node it was given — it never panics and never stops the walk, so one pass
//! reports every problem in a file.
//!
//! A [`Dialect`] says how scalars are typed and how problems are worded, so that each
//! format keeps the spellings and messages its users know:
//! - [`Dialect::Core`] (mesh policies): YAML 1.2's core schema as saphyr resolves it
//!   while loading. `yes` is a string (not a boolean), `"8080"` is a string (not a
//!   port): being strict about types keeps one meaning per spelling.
//! - [`Dialect::AsWritten`] (edge-netd's config): scalars are loaded as written (saphyr
//!   with early parsing off) and typed by the getter that reads them. Any scalar is text
//!   where text is wanted (`vehicle_id: 0001` is `0001`, not 1), an integer may be
//!   quoted (`"64"`), a boolean is `true`/`false` or YAML 1.1's
//!   `yes`/`no`/`on`/`off`/`y`/`n` (any case).
//!
//! Use: [`Reader::new`], [`Reader::load`], [`Reader::map`] on the document with the
//! fields it may have, the typed getters on what [`Fields`] holds, and
//! [`Reader::into_issues`] for everything found, in file order.

use std::fmt;
use std::ops::RangeInclusive;
use std::rc::Rc;
use std::time::Duration;

use saphyr::{MarkedYaml, Scalar, ScalarStyle, YamlData, YamlLoader};

use crate::duration::parse_duration;

/// A node of a loaded file, with where it starts.
pub type Node<'y> = MarkedYaml<'y>;

/// What kind of problem an [`Issue`] is, so callers and tests can match on it without
/// parsing the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file or directory could not be read.
    Io,
    /// The text is not valid YAML (also: duplicate keys, alias bombs).
    Syntax,
    /// The document's overall shape is wrong: empty, several documents, not a
    /// mapping at top level, no policy files in a directory.
    Structure,
    /// `version` is not one this build understands.
    UnsupportedVersion,
    /// A field this format does not have (usually a typo).
    UnknownField,
    /// A required field or section is absent (or explicitly null).
    MissingField,
    /// The YAML node has the wrong type (a list where a string was expected, ...).
    WrongType,
    /// The value has the right type but is not acceptable: a bad enum value,
    /// duration, name, endpoint, route, or an empty list where one is required.
    InvalidValue,
    /// A number (or duration) outside its allowed range.
    OutOfRange,
    /// A name (or list entry, or the `mesh` section) given twice.
    Duplicate,
    /// A reference to an uplink or class that does not exist.
    UnknownReference,
    /// Two things that must differ do not: ports, or route prefixes across services.
    Conflict,
}

/// One problem in a file, displayed as `file:line:column: path: message`; the position
/// is left out when `line` is 0 and the path when it is empty.
// Display is hand-written (not `#[error]`) because the position and path are
// left out when absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The file (or directory) as the caller named it.
    pub file: String,
    /// 1-based line of the offending node; 0 when the issue concerns a whole file.
    pub line: usize,
    /// 1-based column (in characters) of the offending node; 0 with `line` 0.
    pub column: usize,
    /// Field path such as `classes[0].timeout`; empty for file-level problems.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
    /// The category of the problem.
    pub kind: ErrorKind,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for Issue {}

/// How a [`Reader`] types scalars and words its problems (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The mesh policy's: YAML 1.2 core schema types, resolved while loading; a wrong
    /// value is described by its type ("found string \`8080\`"); "did you mean" for a
    /// misspelt field or word; `field:` with no value is reported there ("has no value").
    Core,
    /// edge-netd's: scalars as written, typed by the getter; a wrong value is quoted
    /// as written ("found \`8080\`"); `field:` with no value is a missing field.
    AsWritten,
}

/// A loaded file: its first document, unless it has none or that is null (an empty
/// file, `---` alone), and the second document if any, where a format that wants one
/// document per file reports the extra one.
#[derive(Debug)]
pub struct Loaded<'y> {
    pub document: Option<Node<'y>>,
    pub second: Option<Node<'y>>,
}

/// One entry of a mapping: its key as text, the key, the value.
type Entry<'n, 'y> = (&'n str, &'n Node<'y>, &'n Node<'y>);

/// Reads one file, collecting its issues.
#[derive(Debug)]
pub struct Reader {
    file: Rc<str>,
    dialect: Dialect,
    issues: Vec<Issue>,
}

impl Reader {
    /// A reader of `file` (used only in issues).
    pub fn new(file: impl Into<Rc<str>>, dialect: Dialect) -> Self {
        Self {
            file: file.into(),
            dialect,
            issues: Vec::new(),
        }
    }

    /// The file, shared with what remembers where it was read.
    pub fn file(&self) -> &Rc<str> {
        &self.file
    }

    /// No issue recorded so far.
    pub fn is_clean(&self) -> bool {
        self.issues.is_empty()
    }

    /// The issues found, in file order (by line and column; those at one place in the
    /// order they were found).
    pub fn into_issues(mut self) -> Vec<Issue> {
        self.issues.sort_by_key(|i| (i.line, i.column));
        self.issues
    }

    /// Records an issue at `node`.
    pub fn error(
        &mut self,
        node: &Node<'_>,
        path: &str,
        kind: ErrorKind,
        message: impl Into<String>,
    ) {
        let (line, column) = position(node);
        self.error_at(line, column, path, kind, message);
    }

    /// Records an issue at a 1-based `line` and `column` (both 0: the whole file).
    pub fn error_at(
        &mut self,
        line: usize,
        column: usize,
        path: &str,
        kind: ErrorKind,
        message: impl Into<String>,
    ) {
        self.issues.push(Issue {
            file: self.file.to_string(),
            line,
            column,
            path: path.to_owned(),
            message: message.into(),
            kind,
        });
    }

    /// The documents of `text`; `None`, with a [`ErrorKind::Syntax`] issue where saphyr
    /// stopped, when it is not YAML (also: a duplicated key, an alias bomb).
    pub fn load<'y>(&mut self, text: &'y str) -> Option<Loaded<'y>> {
        let mut loader: YamlLoader<'y, Node<'y>> = YamlLoader::default();
        loader.early_parse(self.dialect == Dialect::Core);
        let mut parser = saphyr_parser::Parser::new_from_str(text);
        // The loader keeps its own first error (e.g. a duplicated key) apart from the
        // parser's.
        let scanned = parser.load(&mut loader, true);
        if let Some(e) = scanned.err().or_else(|| loader.error().cloned()) {
            let (line, column) = (e.marker().line(), e.marker().col() + 1);
            let message = format!("invalid YAML: {}", e.info());
            self.error_at(line, column, "", ErrorKind::Syntax, message);
            return None;
        }
        let mut docs = loader.into_documents().into_iter();
        Some(Loaded {
            document: docs.next().filter(|d| !is_null(d)),
            second: docs.next(),
        })
    }

    /// Text: a string (`Core`); any scalar, as written (`AsWritten`).
    pub fn text<'n>(&mut self, node: &'n Node<'_>, path: &str, expected: &str) -> Option<&'n str> {
        let text = scalar_text(node);
        if text.is_none() {
            self.wrong_type(node, path, expected);
        }
        text
    }

    /// Non-empty text.
    pub fn nonempty<'n>(&mut self, node: &'n Node<'_>, path: &str) -> Option<&'n str> {
        let text = self.text(node, path, "a non-empty string")?;
        if text.is_empty() {
            self.error(node, path, ErrorKind::InvalidValue, "must not be empty");
            return None;
        }
        Some(text)
    }

    /// An integer in `range`. `AsWritten`: decimal without a leading zero, or `0x..`,
    /// `0o..`, `0b..`, as YAML allows, quoted or not; never negative.
    pub fn int(&mut self, node: &Node<'_>, path: &str, range: RangeInclusive<i64>) -> Option<i64> {
        let (min, max) = (*range.start(), *range.end());
        let value = match &node.data {
            YamlData::Value(Scalar::Integer(i)) => Some(i128::from(*i)),
            YamlData::Representation(..) => scalar_text(node).and_then(parse_uint).map(i128::from),
            _ => None,
        };
        let Some(n) = value else {
            self.wrong_type(node, path, &format!("an integer from {min} to {max}"));
            return None;
        };
        if let Some(i) = i64::try_from(n).ok().filter(|i| range.contains(i)) {
            return Some(i);
        }
        let message = match self.dialect {
            Dialect::Core => {
                format!("{n} is out of range; expected an integer from {min} to {max}")
            }
            Dialect::AsWritten => format!("{n} is not in {min}..={max}"),
        };
        self.error(node, path, ErrorKind::OutOfRange, message);
        None
    }

    /// `true` or `false` (`AsWritten`: also `yes`/`no`/`on`/`off`/`y`/`n`, any case).
    pub fn boolean(&mut self, node: &Node<'_>, path: &str) -> Option<bool> {
        let value = match &node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            YamlData::Representation(..) => scalar_text(node).and_then(yaml11_bool),
            _ => None,
        };
        if value.is_none() {
            self.wrong_type(node, path, "true or false");
        }
        value
    }

    /// A positive duration such as `250ms`, `2s`, `1m`, `1h` ([`parse_duration`]).
    pub fn duration(&mut self, node: &Node<'_>, path: &str) -> Option<Duration> {
        let Some(text) = scalar_text(node) else {
            if let YamlData::Value(Scalar::Integer(i)) = &node.data {
                // The likeliest slip: a bare number. Say which units exist.
                let message = format!(
                    "expected a duration with a unit (ms, s, m, h) such as `{i}s` or `{i}ms`, found integer {i}"
                );
                self.error(node, path, ErrorKind::WrongType, message);
                return None;
            }
            let expected = match self.dialect {
                Dialect::Core => "a duration such as `250ms`, `2s`, `1m` or `1h`",
                Dialect::AsWritten => "a duration such as `250ms` or `5s`",
            };
            self.wrong_type(node, path, expected);
            return None;
        };
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                let message = match self.dialect {
                    Dialect::Core => format!("duration `{text}` must be greater than zero"),
                    Dialect::AsWritten => "must be greater than 0".to_owned(),
                };
                self.error(node, path, ErrorKind::OutOfRange, message);
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.error(node, path, ErrorKind::InvalidValue, e.to_string());
                None
            }
        }
    }

    /// One of a fixed set of words, spelled exactly; `what` names them (`uplink kind`).
    pub fn choice<T: Copy>(
        &mut self,
        node: &Node<'_>,
        path: &str,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let allowed = names.join(", ");
        let Some(text) = scalar_text(node) else {
            let expected = match self.dialect {
                Dialect::Core => format!("a {what} (one of: {allowed})"),
                Dialect::AsWritten => what.to_owned(),
            };
            self.wrong_type(node, path, &expected);
            return None;
        };
        if let Some((_, v)) = options.iter().find(|(n, _)| *n == text) {
            return Some(*v);
        }
        let message = match self.dialect {
            Dialect::Core => {
                let hint = did_you_mean(text, names.iter().copied());
                format!("unknown {what} `{text}`; expected one of: {allowed}{hint}")
            }
            Dialect::AsWritten => format!("unknown {what} {text:?}; expected one of: {allowed}"),
        };
        self.error(node, path, ErrorKind::InvalidValue, message);
        None
    }

    /// A list; `expected` says of what (`a list of uplinks`).
    pub fn seq<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        expected: &str,
    ) -> Option<&'n [Node<'y>]> {
        match &node.data {
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.wrong_type(node, path, expected);
                None
            }
        }
    }

    /// A mapping's entries by key, whatever the keys (a key that is not text is
    /// reported and skipped); `expected` says what the mapping is (`a mapping`).
    pub fn entries<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        expected: &str,
    ) -> Option<Vec<(&'n str, &'n Node<'y>)>> {
        let keyed = self.keyed(node, path, expected)?;
        Some(keyed.into_iter().map(|(name, _, v)| (name, v)).collect())
    }

    /// A mapping whose keys must all be in `allowed`: each unknown key is reported at
    /// the key (a typo must not fall back to a default), the others are kept for typed
    /// reading.
    pub fn map<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        expected: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n, 'y>> {
        let keyed = self.keyed(node, path, expected)?;
        let mut fields = Fields {
            mapping: node,
            path: path.to_owned(),
            entries: Vec::with_capacity(keyed.len()),
        };
        for (name, key, value) in keyed {
            if allowed.contains(&name) {
                fields.entries.push((name, value));
                continue;
            }
            let hint = match self.dialect {
                Dialect::Core => did_you_mean(name, allowed.iter().copied()),
                Dialect::AsWritten => String::new(),
            };
            let message = format!(
                "unknown field `{name}`{hint}; allowed fields here: {}",
                allowed.join(", ")
            );
            self.error(key, &fields.path(name), ErrorKind::UnknownField, message);
        }
        Some(fields)
    }

    /// The entries whose key is text (the others are reported).
    fn keyed<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        expected: &str,
    ) -> Option<Vec<Entry<'n, 'y>>> {
        let YamlData::Mapping(mapping) = &node.data else {
            self.wrong_type(node, path, expected);
            return None;
        };
        let mut out = Vec::with_capacity(mapping.len());
        for (key, value) in mapping.iter() {
            if let Some(name) = self.text(key, path, "a field name") {
                out.push((name, key, value));
            }
        }
        Some(out)
    }

    fn wrong_type(&mut self, node: &Node<'_>, path: &str, expected: &str) {
        let found = self.describe(node);
        let message = format!("expected {expected}, found {found}");
        self.error(node, path, ErrorKind::WrongType, message);
    }

    /// How a node looks, for "found ..." in messages.
    pub fn describe(&self, node: &Node<'_>) -> String {
        match &node.data {
            YamlData::Value(Scalar::Null) => "null (no value)".to_owned(),
            YamlData::Value(Scalar::Boolean(b)) => format!("boolean {b}"),
            YamlData::Value(Scalar::Integer(i)) => format!("integer {i}"),
            YamlData::Value(Scalar::FloatingPoint(f)) => format!("number {f}"),
            YamlData::Value(Scalar::String(s)) => format!("string `{}`", shorten(s)),
            YamlData::Representation(..) if is_null(node) => "nothing".to_owned(),
            YamlData::Representation(text, _, _) => format!("`{text}`"),
            YamlData::Sequence(_) => "a list".to_owned(),
            YamlData::Mapping(_) => "a mapping".to_owned(),
            YamlData::Tagged(tag, _) if self.dialect == Dialect::Core => {
                format!("a value tagged `{tag}` (custom tags are not supported)")
            }
            _ => "an invalid value".to_owned(),
        }
    }
}

/// The known fields of one mapping, from [`Reader::map`].
#[derive(Debug)]
pub struct Fields<'n, 'y> {
    /// The mapping: a missing field is reported where it starts.
    mapping: &'n Node<'y>,
    path: String,
    entries: Vec<(&'n str, &'n Node<'y>)>,
}

impl<'n, 'y> Fields<'n, 'y> {
    /// The mapping itself.
    pub fn mapping(&self) -> &'n Node<'y> {
        self.mapping
    }

    /// The path of one of its fields (`probe.interval`).
    pub fn path(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    fn raw(&self, field: &str) -> Option<&'n Node<'y>> {
        self.entries
            .iter()
            .find(|(name, _)| *name == field)
            .map(|(_, v)| *v)
    }

    /// An optional field. `field:` with no value (or `~`, `null`) counts as absent, as
    /// in most YAML-configured tools.
    pub fn get(&self, field: &str) -> Option<&'n Node<'y>> {
        self.raw(field).filter(|n| !is_null(n))
    }

    /// A required field; an [`ErrorKind::MissingField`] issue when absent (at the
    /// mapping) or null (`Core`: at the null, `AsWritten`: as absent). `hint` says
    /// what a value looks like.
    pub fn required(&self, r: &mut Reader, field: &str, hint: &str) -> Option<&'n Node<'y>> {
        let path = self.path(field);
        match self.raw(field) {
            Some(n) if !is_null(n) => Some(n),
            Some(n) if r.dialect == Dialect::Core => {
                let message = format!("`{field}` has no value; expected {hint}");
                r.error(n, &path, ErrorKind::MissingField, message);
                None
            }
            _ => {
                let message = format!("missing required field `{field}` ({hint})");
                r.error(self.mapping, &path, ErrorKind::MissingField, message);
                None
            }
        }
    }

    /// The field's value node, or the mapping's when it is absent: where to report a
    /// problem with the field.
    pub fn at(&self, field: &str) -> &'n Node<'y> {
        self.get(field).unwrap_or(self.mapping)
    }

    /// Read an optional field with `read`, or take `default` when it is absent (or
    /// wrong: the issue is recorded, and the default keeps later checks meaningful).
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

/// Where `node` starts, as 1-based line and column.
pub fn position(node: &Node<'_>) -> (usize, usize) {
    // saphyr's columns are 0-based; editors and compilers count from 1.
    (node.span.start.line(), node.span.start.col() + 1)
}

/// YAML's null: `~`, `null` or nothing at all, written plainly.
pub fn is_null(node: &Node<'_>) -> bool {
    match &node.data {
        YamlData::Value(Scalar::Null) => true,
        YamlData::Representation(text, ScalarStyle::Plain, None) => {
            matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL")
        }
        _ => false,
    }
}

/// Whether `node` is a mapping (for a field that takes a scalar or a mapping).
pub fn is_mapping(node: &Node<'_>) -> bool {
    matches!(node.data, YamlData::Mapping(_))
}

/// The text of a scalar read as text: a string, or any non-null scalar as written.
fn scalar_text<'n>(node: &'n Node<'_>) -> Option<&'n str> {
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Some(s.as_ref()),
        YamlData::Representation(text, _, _) if !is_null(node) => Some(text.as_ref()),
        _ => None,
    }
}

/// YAML 1.1's booleans, any case.
fn yaml11_bool(text: &str) -> Option<bool> {
    let is = |words: [&str; 4]| words.iter().any(|w| text.eq_ignore_ascii_case(w));
    if is(["true", "yes", "on", "y"]) {
        Some(true)
    } else if is(["false", "no", "off", "n"]) {
        Some(false)
    } else {
        None
    }
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

/// Long values would drown the message; 40 characters identify them.
fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}…")
    }
}

/// `"; did you mean `x`?"` when exactly one candidate is close to `word`, else `""`.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    // Up to a third of the word may differ, but at least one edit, at most three:
    // catches typos and case slips without suggesting unrelated names.
    let budget = (word.chars().count() / 3).clamp(1, 3);
    let mut best: Option<(usize, &str)> = None;
    let mut tie = false;
    for c in candidates {
        let d = edit_distance(&word.to_ascii_lowercase(), c);
        if d > budget {
            continue;
        }
        match best {
            Some((bd, _)) if d > bd => {}
            Some((bd, _)) if d == bd => tie = true,
            _ => {
                best = Some((d, c));
                tie = false;
            }
        }
    }
    match best {
        Some((_, c)) if !tie => format!("; did you mean `{c}`?"),
        _ => String::new(),
    }
}

/// Edit distance over chars where swapping two neighbours counts as one edit
/// (optimal string alignment): `wfii` is one slip away from `wifi`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 0..a.len() {
        cur[0] = i + 1;
        for j in 0..b.len() {
            let subst = prev[j] + usize::from(a[i] != b[j]);
            let mut d = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
            if i > 0 && j > 0 && a[i] == b[j - 1] && a[i - 1] == b[j] {
                d = d.min(before[j - 1] + 1);
            }
            cur[j + 1] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
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
