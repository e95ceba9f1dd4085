//! Placeholder: replaced by the policy parser.
use crate::Policy;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {path}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} error(s)", .0.len())]
pub struct PolicyErrors(pub Vec<PolicyError>);

pub fn parse(_file: &str, _text: &str) -> Result<Policy, PolicyErrors> {
    todo!()
}

pub fn load_path(_path: &Path) -> Result<Policy, PolicyErrors> {
    todo!()
}
