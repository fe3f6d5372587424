//! Pins: manifests an operator pinned, one file each
//! (`ROOT/pins/<hex>.json`). A pinned manifest's entries are never offered
//! to GC, and its blob is always kept.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::durable::{read_json, write_json};
use crate::store::{Layout, StoreError};

/// Manifests an operator pinned: their entries are never offered to GC.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
}

/// One pin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Pin {
    pub digest: Digest,
    /// What the operator named when pinning.
    pub reference: String,
    #[serde(with = "time::serde::rfc3339")]
    pub pinned_at: time::OffsetDateTime,
}

impl Pins {
    /// The pins of a root (`ROOT/pins/<hex>.json`).
    pub fn new(layout: &Layout) -> Pins {
        Pins { dir: layout.pins() }
    }

    /// # Errors
    /// On I/O failure.
    pub fn pin(&self, digest: &Digest, reference: &str) -> Result<Pin, StoreError> {
        fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io { action: "create", path: self.dir.clone(), source })?;
        let pin = Pin { digest: digest.clone(), reference: reference.to_owned(), pinned_at: time::OffsetDateTime::now_utc() };
        write_json(&self.path(digest), &pin)?;
        Ok(pin)
    }

    /// Whether there was a pin to remove.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn unpin(&self, digest: &Digest) -> Result<bool, StoreError> {
        match fs::remove_file(self.path(digest)) {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io { action: "unpin", path: self.path(digest), source }),
        }
    }

    pub fn list(&self) -> Vec<Pin> {
        let mut pins: Vec<Pin> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|item| item.path().extension().is_some_and(|ext| ext == "json"))
            .filter_map(|item| read_json(&item.path()).ok())
            .collect();
        pins.sort_by(|a, b| a.digest.cmp(&b.digest));
        pins
    }

    pub fn digests(&self) -> HashSet<Digest> {
        self.list().into_iter().map(|pin| pin.digest).collect()
    }

    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", digest.hex()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins persist, list and go.
    #[test]
    fn pins_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(&Layout::new(dir.path()));
        let digest = Digest::of(b"model");
        assert!(!pins.is_pinned(&digest));
        pins.pin(&digest, "registry.local/m:1").unwrap();
        assert!(pins.is_pinned(&digest));
        assert_eq!(pins.list()[0].reference, "registry.local/m:1");
        assert!(pins.unpin(&digest).unwrap());
        assert!(!pins.unpin(&digest).unwrap());
        assert!(pins.list().is_empty());
    }
}
