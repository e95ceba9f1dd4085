//! Policy errors: every problem found in a policy, each pinned to a place in a file.
//!
//! Invariant: an error always names the file, and — unless it concerns a whole
//! file or directory (I/O, no files found) — the 1-based line and column of the
//! offending YAML node, plus the field path (`services[2].class`). Line `0` means
//! "no position"; `Display` then leaves the position out.

use std::fmt;
use std::rc::Rc;

/// What kind of problem a [`PolicyError`] is, so callers and tests can match on it
/// without parsing the message.
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

/// One problem in a policy, displayed as `file:line:column: path: message`.
// Display is hand-written (not `#[error]`) because the position and path are
// left out when absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The file (or directory) as given to [`crate::parse`] / [`crate::load_path`].
    pub file: String,
    /// 1-based line of the offending node; 0 when the error concerns a whole file.
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

impl fmt::Display for PolicyError {
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

impl std::error::Error for PolicyError {}
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
