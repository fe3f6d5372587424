//! [`ModelPath`]: a path inside a model, validated once and carried as
//! its type, and the [`PathProblem`]s that refuse one.

use std::fmt;

const MAX_NAME: usize = 255;
const MAX_PATH: usize = 4096;
/// Names in one path: deeper trees cost a directory handle per level to
/// build and walk, and no model needs them.
pub const MAX_DEPTH: usize = 128;

/// What is wrong with a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("is empty or names the model's root")]
    Empty,
    #[error("is absolute")]
    Absolute,
    #[error("climbs out with `..`")]
    ParentComponent,
    #[error("contains a NUL byte")]
    Nul,
    /// Newlines and the like: paths are joined by newlines where a
    /// selection is named, and read by people in lists.
    #[error("contains a control character")]
    Control,
    #[error("is nested more than {MAX_DEPTH} directories deep")]
    TooDeep,
    #[error("has a name longer than 255 bytes")]
    NameTooLong,
    #[error("is longer than 4096 bytes")]
    TooLong,
}

/// A validated, normalised relative path inside a model: `a/b/c`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelPath(String);

impl ModelPath {
    /// Validates and normalises `text` (drops `./` and empty names).
    ///
    /// # Errors
    /// The [`PathProblem`].
    pub fn parse(text: &str) -> Result<ModelPath, PathProblem> {
        if text.contains('\0') {
            return Err(PathProblem::Nul);
        }
        if text.chars().any(char::is_control) {
            return Err(PathProblem::Control);
        }
        if text.starts_with('/') {
            return Err(PathProblem::Absolute);
        }
        if text.len() > MAX_PATH {
            return Err(PathProblem::TooLong);
        }
        let mut parts = Vec::new();
        for part in text.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(PathProblem::ParentComponent),
                name if name.len() > MAX_NAME => return Err(PathProblem::NameTooLong),
                name => parts.push(name),
            }
        }
        if parts.is_empty() {
            return Err(PathProblem::Empty);
        }
        if parts.len() > MAX_DEPTH {
            return Err(PathProblem::TooDeep);
        }
        Ok(ModelPath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path as its text, without a copy.
    pub(super) fn into_string(self) -> String {
        self.0
    }

    /// The names, root first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether `self` is `other` or lies under it.
    pub fn is_within(&self, other: &ModelPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The proper ancestors, nearest to the root first: `a`, `a/b` of `a/b/c`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(index, _)| &self.0[..index])
    }
}

impl fmt::Display for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
