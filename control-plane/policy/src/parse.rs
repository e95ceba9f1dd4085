//! The public entry points: parse one text, or load a file or a directory.
//!
//! Invariant: these return either a fully valid [`Policy`] or every error found,
//! sorted by (file, line, column) — never the first error only, never a policy
//! with a known problem.
//!
//! A directory is one policy split over its `*.yaml`/`*.yml` files (sorted by
//! name, not recursive; hidden files and editor leftovers ignored). Each file may
//! hold any top-level section; lists are concatenated in file order; `mesh` may
//! appear in one file only. Symlinked files are followed, so a Kubernetes
//! ConfigMap mount (files are symlinks into a hidden `..data` directory) works.

use std::fs;
use std::io;
use std::path::Path;
use std::rc::Rc;

use crate::Policy;
use crate::error::{ErrorKind, Errors, Loc};
pub use crate::error::{PolicyError, PolicyErrors};
use crate::schema::{FileDraft, read_file};
use crate::validate::merge;

/// Parses and validates one policy document. `file` is used only in messages.
pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyErrors> {
    let mut errors = Errors::default();
    let draft = read_file(Rc::from(file), text, &mut errors);
    let whole = draft.root.clone();
    let policy = merge(vec![draft], &whole, &mut errors);
    finish(policy, errors, &whole)
}

/// Loads a policy from a single file, or from a directory of `*.yaml`/`*.yml`
/// files that together form one policy.
pub fn load_path(path: &Path) -> Result<Policy, PolicyErrors> {
    let shown: Rc<str> = Rc::from(path.display().to_string());
    let meta = fs::metadata(path).map_err(|e| io_error(&shown, "cannot read the policy", &e))?;
    if !meta.is_dir() {
        let text = read_text(path, &shown)?;
        return parse(&shown, &text);
    }

    let whole = Loc::whole(Rc::clone(&shown));
    let mut errors = Errors::default();
    let files =
        policy_files(path).map_err(|e| io_error(&shown, "cannot list the directory", &e))?;
    if files.is_empty() {
        errors.push(
            &whole,
            "",
            ErrorKind::Structure,
            "no policy files (*.yaml, *.yml) in this directory",
        );
        return Err(PolicyErrors::sorted(errors.0));
    }
    let mut drafts: Vec<FileDraft> = Vec::with_capacity(files.len());
    let mut unreadable = false;
    for file in &files {
        let file_shown: Rc<str> = Rc::from(file.display().to_string());
        match read_text(file, &file_shown) {
            Ok(text) => drafts.push(read_file(file_shown, &text, &mut errors)),
            Err(e) => {
                errors.0.extend(e.0);
                unreadable = true;
            }
        }
    }
    // With a file missing, cross-file checks would report its contents as absent.
    let policy = if unreadable {
        None
    } else {
        merge(drafts, &whole, &mut errors)
    };
    finish(policy, errors, &whole)
}

fn finish(policy: Option<Policy>, mut errors: Errors, whole: &Loc) -> Result<Policy, PolicyErrors> {
    match policy {
        Some(p) if errors.is_empty() => Ok(p),
        _ => {
            if errors.is_empty() {
                // Unreachable by construction (no policy means an error was
                // recorded); still, never report failure without a reason.
                errors.push(whole, "", ErrorKind::Structure, "the policy is incomplete");
            }
            Err(PolicyErrors::sorted(errors.0))
        }
    }
}

/// The policy files of a directory, sorted by file name.
fn policy_files(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !is_policy_file_name(&name) {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks; a dangling one is an error worth seeing,
        // so it stays in the list and fails when read.
        if fs::metadata(&path).map_or(true, |m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// `*.yaml` / `*.yml`, but not hidden files (`.x.yaml`, Emacs `.#x.yaml`, Vim
/// `.x.yaml.swp`), backups (`x.yaml~`) or Emacs autosaves (`#x.yaml#`): editors
/// write those next to the file being edited, and the watcher must not load them.
pub(crate) fn is_policy_file_name(name: &str) -> bool {
    if name.starts_with('.') || name.starts_with('#') || name.ends_with('~') {
        return false;
    }
    let lower = name.to_ascii_lowercase();
    (lower.ends_with(".yaml") && lower.len() > ".yaml".len())
        || (lower.ends_with(".yml") && lower.len() > ".yml".len())
}

fn read_text(path: &Path, shown: &Rc<str>) -> Result<String, PolicyErrors> {
    fs::read_to_string(path).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidData {
            let loc = Loc::whole(Rc::clone(shown));
            let mut errors = Errors::default();
            errors.push(&loc, "", ErrorKind::Io, "the file is not valid UTF-8 text");
            PolicyErrors(errors.0)
        } else {
            io_error(shown, "cannot read the file", &e)
        }
    })
}

fn io_error(shown: &Rc<str>, what: &str, e: &io::Error) -> PolicyErrors {
    let mut errors = Errors::default();
    errors.push(
        &Loc::whole(Rc::clone(shown)),
        "",
        ErrorKind::Io,
        format!("{what}: {e}"),
    );
    PolicyErrors(errors.0)
}
