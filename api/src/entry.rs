//! Names of model trees in the store: a manifest and a selection of its files.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Names a selection within one manifest: `full` when every layer is kept,
/// otherwise `part-` and 16 hex digits of the sha256 of the kept paths. Two
/// requests whose exclusions keep the same files share a tree; a partial
/// tree is never served for a request that wants more.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SelectionKey(String);

impl SelectionKey {
    pub const FULL: &'static str = "full";

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key of a selection that keeps every layer.
    pub fn full() -> SelectionKey {
        SelectionKey(SelectionKey::FULL.to_owned())
    }

    /// The key of a partial selection whose sorted kept paths, one per
    /// line, hash to `kept_paths`.
    pub fn part(kept_paths: &Digest) -> SelectionKey {
        SelectionKey(format!("part-{}", &kept_paths.hex()[..16]))
    }

    /// Parses a key as stored on disk.
    pub fn parse(text: &str) -> Option<SelectionKey> {
        let valid = text == SelectionKey::FULL
            || text.strip_prefix("part-").is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        valid.then(|| SelectionKey(text.to_owned()))
    }
}

impl fmt::Display for SelectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names one model tree: a manifest and the selection of its files.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub manifest: Digest,
    pub selection: SelectionKey,
}

impl EntryKey {
    pub fn new(manifest: Digest, selection: SelectionKey) -> EntryKey {
        EntryKey { manifest, selection }
    }

    /// Parses `sha256:<hex>/<selection>`.
    pub fn parse(text: &str) -> Option<EntryKey> {
        let (manifest, selection) = text.rsplit_once('/')?;
        Some(EntryKey { manifest: manifest.parse().ok()?, selection: SelectionKey::parse(selection)? })
    }
}

impl std::fmt::Display for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.manifest, self.selection)
    }
}

impl Serialize for EntryKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EntryKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<EntryKey, D::Error> {
        let text = String::deserialize(deserializer)?;
        EntryKey::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not an entry key")))
    }
}
