//! Where everything lives under the root.

use std::path::{Path, PathBuf};

use crate::digest::Digest;

use super::EntryKey;

/// Every path under the root: nothing else joins a name onto it.
///
/// ```text
/// ROOT/lock                                  one process per root (flock); the holder's pid
/// ROOT/blobs/sha256/<hex>                    verified blobs: raw layers, manifests, configs (0444)
/// ROOT/unpacked/sha256/<hex>/…               tar layers, unpacked (files 0444)
/// ROOT/models/sha256/<hex>/<selection>/      one entry: a model tree for one selection
///     tree/…                                 hardlinks into blobs/ and unpacked/
///     entry.json                             what the tree holds (written before publishing)
///     usage.json                             last use, use count, references seen
/// ROOT/tmp/                                  everything being written; emptied at start-up
///     ingest-*, blob-*                       blobs being written
///     unpack-*/, entry-*/                    layers being unpacked, trees being built
///     trash-*                                what eviction and sweeps moved out, being removed
/// ROOT/records/<volume>/<mount-id>.json      volume records (`volumes`; `.tmp-*` beside them
///                                            while written, `*.broken` when unreadable)
/// ROOT/volumes/<volume>/<mount-id>/          volume trees, unless configured elsewhere
///                                            (`volumes`; `.tmp-*` while linked)
/// ROOT/pins/<hex>.json                       manifests an operator pinned (`gc`)
/// ROOT/components/                           compiled plugins (`plugins`)
/// ```
///
/// The store owns `lock`, `blobs/`, `unpacked/`, `models/` and `tmp/`; the
/// modules named beside the others name the files inside their directories.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs().join(digest.hex())
    }

    pub fn unpacked_dir(&self) -> PathBuf {
        self.root.join("unpacked/sha256")
    }

    pub fn unpacked(&self, digest: &Digest) -> PathBuf {
        self.unpacked_dir().join(digest.hex())
    }

    pub fn models(&self) -> PathBuf {
        self.root.join("models/sha256")
    }

    /// The directory of a manifest's entries, one per selection.
    pub fn manifest_dir(&self, digest: &Digest) -> PathBuf {
        self.models().join(digest.hex())
    }

    pub fn entry(&self, key: &EntryKey) -> PathBuf {
        self.manifest_dir(&key.manifest).join(key.selection.as_str())
    }

    pub fn tree(&self, key: &EntryKey) -> PathBuf {
        self.entry(key).join("tree")
    }

    /// What the entry holds ([`EntryInfo`](super::EntryInfo)).
    pub fn entry_info(&self, key: &EntryKey) -> PathBuf {
        self.entry(key).join("entry.json")
    }

    /// How the entry has been used ([`EntryUsage`](super::EntryUsage)).
    pub fn entry_usage(&self, key: &EntryKey) -> PathBuf {
        self.entry(key).join("usage.json")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where an evicted entry goes until it is removed.
    pub(super) fn entry_trash(&self, key: &EntryKey) -> PathBuf {
        self.tmp().join(format!("trash-{}-{}", key.manifest.hex(), key.selection))
    }

    /// Where a swept blob (`kind` "blob") or unpacked layer ("unpacked")
    /// goes until it is removed.
    pub(super) fn swept_trash(&self, kind: &str, digest: &Digest) -> PathBuf {
        self.tmp().join(format!("trash-{kind}-{}", digest.hex()))
    }

    pub fn records(&self) -> PathBuf {
        self.root.join("records")
    }

    pub fn components(&self) -> PathBuf {
        self.root.join("components")
    }

    pub fn default_volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub fn pins(&self) -> PathBuf {
        self.root.join("pins")
    }

    pub(super) fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
}
