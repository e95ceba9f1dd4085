//! Policy errors: every problem found in a policy, each pinned to a place in a file.
//!
//! Invariant: an error always names the file, and — unless it concerns a whole
//! file or directory (I/O, no files found) — the 1-based line and column of the
//! offending YAML node, plus the field path (`services[2].class`). Line `0` means
//! "no position"; `Display` then leaves the position out.

use std::fmt;
use std::rc::Rc;

pub(crate) use crate::located::ErrorKind;
use crate::located::{Issue, Node, Reader, position};

/// One problem in a policy, displayed as `file:line:column: path: message`: the
/// located [`Issue`] every YAML reader of misaki reports. `file` is the file (or
/// directory) as given to [`crate::parse`] / [`crate::load_path`].
pub type PolicyError = Issue;

/// All problems found in a policy, sorted by (file, line, column).
///
/// Displays every error, one per line, so an operator fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no errors (never the case for an `Err` from this crate).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors, in (file, line, column) order.
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    /// Sorts by (file, line, column); stable, so errors at one node keep their order.
    pub(crate) fn sorted(mut errors: Vec<PolicyError>) -> Self {
        errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        Self(errors)
    }
}

impl std::error::Error for PolicyErrors {}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<PolicyError> for PolicyErrors {
    fn from(e: PolicyError) -> Self {
        Self(vec![e])
    }
}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A position in a policy file. `line` 0 means "the whole file/directory".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Shared because every node of a file carries it.
    pub file: Rc<str>,
    pub line: usize,
    pub column: usize,
}

impl Loc {
    /// Where `node` starts in the file `r` reads.
    pub fn at(r: &Reader, node: &Node<'_>) -> Self {
        let (line, column) = position(node);
        Self {
            file: Rc::clone(r.file()),
            line,
            column,
        }
    }

    pub fn whole(file: Rc<str>) -> Self {
        Self {
            file,
            line: 0,
            column: 0,
        }
    }

    /// "line 3" within the same file, "other.yaml:3:5" across files: used when a
    /// message points back at an earlier definition.
    pub fn describe_from(&self, here: &Loc) -> String {
        if self.file == here.file {
            format!("line {}", self.line)
        } else if self.line == 0 {
            self.file.to_string()
        } else {
            format!("{}:{}:{}", self.file, self.line, self.column)
        }
    }
}

/// Collects errors while walking; never stops at the first one.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub Vec<PolicyError>);

impl Errors {
    pub fn push(&mut self, loc: &Loc, path: &str, kind: ErrorKind, message: impl Into<String>) {
        self.0.push(PolicyError {
            file: loc.file.to_string(),
            line: loc.line,
            column: loc.column,
            path: path.to_owned(),
            message: message.into(),
            kind,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
