//! Reading typed values out of a position-marked YAML tree (`saphyr::MarkedYaml`).
//!
//! Invariant: every getter either returns a value or records exactly one error at
//! the node it was given — it never panics and never stops the walk, so one pass
//! reports every problem in a file.
//!
//! Scalars follow the YAML 1.2 core schema as saphyr resolves them: `yes` is a
//! string (not a boolean), `"8080"` is a string (not a port). Being strict about
//! types keeps one meaning per spelling.

use std::rc::Rc;
use std::time::Duration;

use saphyr::{MarkedYaml, Scalar, YamlData};

use crate::duration::parse_duration;
use crate::error::{ErrorKind, Errors, Loc};

pub(crate) type Node<'y> = MarkedYaml<'y>;

/// Walks one file's tree, recording errors against that file.
pub(crate) struct Reader<'e> {
    pub file: Rc<str>,
    pub errors: &'e mut Errors,
}

impl Reader<'_> {
    /// Where `node` starts, as 1-based line and column.
    pub fn loc(&self, node: &Node<'_>) -> Loc {
        Loc {
            file: Rc::clone(&self.file),
            line: node.span.start.line(),
            // saphyr's columns are 0-based; editors and compilers count from 1.
            column: node.span.start.col() + 1,
        }
    }

    pub fn error(&mut self, node: &Node<'_>, path: &str, kind: ErrorKind, msg: impl Into<String>) {
        let loc = self.loc(node);
        self.errors.push(&loc, path, kind, msg);
    }

    /// A string scalar.
    pub fn string<'n>(
        &mut self,
        node: &'n Node<'_>,
        path: &str,
        expected: &str,
    ) -> Option<&'n str> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => Some(s.as_ref()),
            _ => {
                let found = describe(node);
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!("expected {expected}, found {found}"),
                );
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn int(&mut self, node: &Node<'_>, path: &str, min: i64, max: i64) -> Option<i64> {
        match &node.data {
            YamlData::Value(Scalar::Integer(i)) if (min..=max).contains(i) => Some(*i),
            YamlData::Value(Scalar::Integer(i)) => {
                self.error(
                    node,
                    path,
                    ErrorKind::OutOfRange,
                    format!("{i} is out of range; expected an integer from {min} to {max}"),
                );
                None
            }
            _ => {
                let found = describe(node);
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!("expected an integer from {min} to {max}, found {found}"),
                );
                None
            }
        }
    }

    pub fn boolean(&mut self, node: &Node<'_>, path: &str) -> Option<bool> {
        match &node.data {
            YamlData::Value(Scalar::Boolean(b)) => Some(*b),
            _ => {
                let found = describe(node);
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!("expected true or false, found {found}"),
                );
                None
            }
        }
    }

    /// A positive duration such as `250ms`, `2s`, `1m`, `1h`.
    pub fn duration(&mut self, node: &Node<'_>, path: &str) -> Option<Duration> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => match parse_duration(s) {
                Ok(d) if d.is_zero() => {
                    self.error(
                        node,
                        path,
                        ErrorKind::OutOfRange,
                        format!("duration `{s}` must be greater than zero"),
                    );
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    self.error(node, path, ErrorKind::InvalidValue, e.to_string());
                    None
                }
            },
            YamlData::Value(Scalar::Integer(i)) => {
                // The likeliest slip: a bare number. Say which units exist.
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!(
                        "expected a duration with a unit (ms, s, m, h) such as `{i}s` or `{i}ms`, found integer {i}"
                    ),
                );
                None
            }
            _ => {
                let found = describe(node);
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!(
                        "expected a duration such as `250ms`, `2s`, `1m` or `1h`, found {found}"
                    ),
                );
                None
            }
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(
        &mut self,
        node: &Node<'_>,
        path: &str,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let allowed = names.join(", ");
        match &node.data {
            YamlData::Value(Scalar::String(s)) => {
                if let Some((_, v)) = options.iter().find(|(n, _)| *n == s.as_ref()) {
                    return Some(*v);
                }
                let hint = did_you_mean(s, names.iter().copied());
                self.error(
                    node,
                    path,
                    ErrorKind::InvalidValue,
                    format!("unknown {what} `{s}`; expected one of: {allowed}{hint}"),
                );
                None
            }
            _ => {
                let found = describe(node);
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!("expected a {what} (one of: {allowed}), found {found}"),
                );
                None
            }
        }
    }

    /// A list.
    pub fn seq<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        expected: &str,
    ) -> Option<&'n [Node<'y>]> {
        match &node.data {
            YamlData::Sequence(items) => Some(items),
            _ => {
                let found = describe(node);
                self.error(
                    node,
                    path,
                    ErrorKind::WrongType,
                    format!("expected a list of {expected}, found {found}"),
                );
                None
            }
        }
    }

    /// A mapping whose keys must all be in `allowed`; unknown keys are reported
    /// (at the key) and skipped, the rest are returned for typed reading.
    pub fn map<'n, 'y>(
        &mut self,
        node: &'n Node<'y>,
        path: &str,
        expected: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n, 'y>> {
        let YamlData::Mapping(mapping) = &node.data else {
            let found = describe(node);
            self.error(
                node,
                path,
                ErrorKind::WrongType,
                format!("expected {expected} (a mapping), found {found}"),
            );
            return None;
        };
        let mut fields = Fields {
            loc: self.loc(node),
            path: path.to_owned(),
            entries: Vec::with_capacity(mapping.len()),
        };
        for (key, value) in mapping.iter() {
            let YamlData::Value(Scalar::String(name)) = &key.data else {
                let found = describe(key);
                self.error(
                    key,
                    path,
                    ErrorKind::WrongType,
                    format!("expected a field name, found {found}"),
                );
                continue;
            };
            if allowed.contains(&name.as_ref()) {
                fields.entries.push((name.as_ref(), value));
            } else {
                let hint = did_you_mean(name, allowed.iter().copied());
                self.error(
                    key,
                    &fields.path(name),
                    ErrorKind::UnknownField,
                    format!(
                        "unknown field `{name}`{hint}; allowed fields here: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        Some(fields)
    }
}

/// The known fields of one mapping.
pub(crate) struct Fields<'n, 'y> {
    /// Where the mapping starts: missing fields are reported here.
    pub loc: Loc,
    pub path: String,
    entries: Vec<(&'n str, &'n Node<'y>)>,
}

impl<'n, 'y> Fields<'n, 'y> {
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

    /// An optional field. An explicit `null` (`field:` with nothing after it)
    /// counts as absent, as in most YAML-configured tools.
    pub fn get(&self, field: &str) -> Option<&'n Node<'y>> {
        self.raw(field).filter(|n| !is_null(n))
    }

    /// A required field; records `MissingField` when absent or null. `hint` says
    /// what a value looks like.
    pub fn required(&self, r: &mut Reader<'_>, field: &str, hint: &str) -> Option<&'n Node<'y>> {
        match self.raw(field) {
            None => {
                r.errors.push(
                    &self.loc,
                    &self.path(field),
                    ErrorKind::MissingField,
                    format!("missing required field `{field}` ({hint})"),
                );
                None
            }
            Some(n) if is_null(n) => {
                r.error(
                    n,
                    &self.path(field),
                    ErrorKind::MissingField,
                    format!("`{field}` has no value; expected {hint}"),
                );
                None
            }
            Some(n) => Some(n),
        }
    }
}

pub(crate) fn is_null(node: &Node<'_>) -> bool {
    matches!(node.data, YamlData::Value(Scalar::Null))
}

/// How a node looks, for "found ..." in messages.
pub(crate) fn describe(node: &Node<'_>) -> String {
    match &node.data {
        YamlData::Value(Scalar::Null) => "null (no value)".to_owned(),
        YamlData::Value(Scalar::Boolean(b)) => format!("boolean {b}"),
        YamlData::Value(Scalar::Integer(i)) => format!("integer {i}"),
        YamlData::Value(Scalar::FloatingPoint(f)) => format!("number {f}"),
        YamlData::Value(Scalar::String(s)) => format!("string `{}`", shorten(s)),
        YamlData::Sequence(_) => "a list".to_owned(),
        YamlData::Mapping(_) => "a mapping".to_owned(),
        YamlData::Tagged(tag, _) => {
            format!("a value tagged `{tag}` (custom tags are not supported)")
        }
        YamlData::Representation(..) | YamlData::Alias(_) | YamlData::BadValue => {
            "an invalid value".to_owned()
        }
    }
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
