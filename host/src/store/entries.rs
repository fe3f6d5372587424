//! Entries: one model tree per manifest and selection, built from stored
//! layers, published whole, and what each holds and how it was used.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::durable::{publish_dir, read_json, sync_dir, sync_tree, write_json, write_json_volatile};
use crate::link::{Entry, LinkError, TreeBuilder};
use crate::modelpack::{LayerFormat, Model, ModelPath, Node, Selection, SelectionKey, check_tree};

use super::{Store, StoreError, io_error};

pub use modelcache_api::entry::EntryKey;

/// The version of the rules an entry's tree was built and checked under
/// (`EntryInfo::rules`). Raised when the rules grow stricter: trees built
/// before are removed at start-up, so none is served unchecked.
pub const TREE_RULES: u32 = 1;

/// What an entry holds, written once when it is built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryInfo {
    pub key: EntryKey,
    /// The [`TREE_RULES`] the tree was checked under; 0 before they existed.
    #[serde(default)]
    pub rules: u32,
    pub layers: Vec<EntryLayer>,
    /// Bytes of the selected layers as the manifest states them.
    pub bytes: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// One layer of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryLayer {
    pub digest: Digest,
    pub path: String,
    pub size: u64,
    /// Whether the layer is an unpacked archive (else the blob is the file).
    pub unpacked: bool,
}

/// How an entry has been used, rewritten on every use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryUsage {
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_used_at: Option<time::OffsetDateTime>,
    pub use_count: u64,
    /// References that resolved to this entry's manifest, most recent last.
    pub references: Vec<String>,
}

impl Store {
    pub fn has_entry(&self, key: &EntryKey) -> bool {
        self.layout.entry_info(key).is_file()
    }

    /// Builds the tree of `key` from stored layers and publishes it whole.
    /// Every selected layer must be stored.
    ///
    /// The tree is built under a directory handle without following any
    /// symlink (see [`TreeBuilder`]); an unpacked layer may be reused from
    /// another manifest, so its names are checked against the path *this*
    /// manifest gives the layer; and the finished tree is checked whole
    /// ([`check_tree`]): no symlink resolves outside it, through any other.
    ///
    /// # Errors
    /// A layer or tree breaking the rules, a link or I/O failure; nothing
    /// is published then.
    pub fn build_entry(&self, key: &EntryKey, model: &Model, selection: &Selection) -> Result<EntryInfo, StoreError> {
        let staging = tempfile::Builder::new()
            .prefix("entry-")
            .tempdir_in(self.layout.tmp())
            .map_err(io_error("create a temporary in", &self.layout.tmp()))?;
        let _live = self.live(staging.path());
        let tree = staging.path().join("tree");
        fs::create_dir(&tree).map_err(io_error("create", &tree))?;
        let mut builder = TreeBuilder::new(&tree)?;
        let mut nodes = HashMap::new();
        let mut layers = Vec::new();
        for layer in selection.layers(model) {
            match layer.format {
                LayerFormat::Raw => {
                    builder.link_file(&self.layout.blob(&layer.blob.digest), layer.path.as_str())?;
                    nodes.insert(layer.path.to_string(), Node::File);
                }
                LayerFormat::Tar(_) => {
                    let mut visit = |name: &Path, entry: Entry<'_>| {
                        let name = name.to_string_lossy();
                        let within = ModelPath::parse(&name).is_ok_and(|path| path.is_within(&layer.path));
                        let on_the_way = entry == Entry::Directory && layer.path.ancestors().any(|ancestor| ancestor == name);
                        if !within && !on_the_way {
                            let reason = "lies outside the path this manifest gives the layer".to_owned();
                            return Err(LinkError::Refused { path: name.into_owned(), reason });
                        }
                        let node = match entry {
                            Entry::Directory => Node::Directory,
                            Entry::File => Node::File,
                            Entry::Symlink(target) => Node::Symlink(target.to_string_lossy().into_owned()),
                        };
                        nodes.insert(name.into_owned(), node);
                        Ok(())
                    };
                    match builder.link_tree(&self.layout.unpacked(&layer.blob.digest), &mut visit) {
                        Err(LinkError::Refused { path, reason }) => {
                            return Err(StoreError::Unpack {
                                index: layer.index,
                                digest: layer.blob.digest.clone(),
                                path: layer.path.to_string(),
                                reason: format!("the unpacked layer holds `{path}`, which {reason}"),
                            });
                        }
                        linked => linked?,
                    }
                }
            }
            layers.push(EntryLayer {
                digest: layer.blob.digest.clone(),
                path: layer.path.to_string(),
                size: layer.blob.size,
                unpacked: layer.format != LayerFormat::Raw,
            });
        }
        check_tree(&nodes).map_err(|source| StoreError::Tree { key: key.clone(), source })?;
        let info = EntryInfo {
            key: key.clone(),
            rules: TREE_RULES,
            bytes: layers.iter().map(|layer| layer.size).sum(),
            layers,
            created_at: time::OffsetDateTime::now_utc(),
        };
        write_json(&staging.path().join("entry.json"), &info)?;
        sync_tree(staging.path())?;
        let target = self.layout.entry(key);
        let parent = target.parent().expect("entries live in a manifest directory");
        // Under the lock a sweep reads entries with: it sees this entry's
        // blobs as needed, or still held by the pull building it. And under
        // the one eviction removes an emptied manifest directory with.
        let published = {
            let _state = self.state();
            fs::create_dir_all(parent).map_err(io_error("create", parent))?;
            publish_dir(staging.keep(), &target)?
        };
        if !published {
            return self.entry_info(key);
        }
        sync_dir(parent)?;
        Ok(info)
    }

    /// What the entry holds.
    ///
    /// # Errors
    /// When the entry is absent or its `entry.json` unreadable.
    pub fn entry_info(&self, key: &EntryKey) -> Result<EntryInfo, StoreError> {
        Ok(read_json(&self.layout.entry_info(key))?)
    }

    /// How the entry has been used; defaults when never used.
    pub fn entry_usage(&self, key: &EntryKey) -> EntryUsage {
        read_json(&self.layout.entry_usage(key)).unwrap_or_default()
    }

    /// Records one use of the entry by a volume of `reference`.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn record_use(&self, key: &EntryKey, reference: &str) -> Result<EntryUsage, StoreError> {
        let _serial = self.usage.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut usage = self.entry_usage(key);
        usage.last_used_at = Some(time::OffsetDateTime::now_utc());
        usage.use_count += 1;
        usage.references.retain(|seen| seen != reference);
        usage.references.push(reference.to_owned());
        // Keep the list short: the most recent references are what matter.
        let excess = usage.references.len().saturating_sub(16);
        usage.references.drain(..excess);
        // Not waited for: a crash loses at most a use, which only ages the
        // entry a little for GC's least-recently-used order.
        write_json_volatile(&self.layout.entry_usage(key), &usage)?;
        Ok(usage)
    }

    /// Every complete entry.
    ///
    /// # Errors
    /// When `models/` cannot be read.
    pub fn entries(&self) -> Result<Vec<EntryKey>, StoreError> {
        let mut keys = Vec::new();
        let models = self.layout.models();
        for manifest in fs::read_dir(&models).map_err(io_error("read", &models))?.flatten() {
            let Ok(digest) = format!("sha256:{}", manifest.file_name().to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            for selection in fs::read_dir(manifest.path()).into_iter().flatten().flatten() {
                if let Some(selection) = SelectionKey::parse(&selection.file_name().to_string_lossy()) {
                    let key = EntryKey::new(digest.clone(), selection);
                    if self.has_entry(&key) {
                        keys.push(key);
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Volumes that finish together each count: no use is lost to a race
    /// between their read-modify-writes.
    #[test]
    fn concurrent_uses_all_count() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let key = EntryKey::new(Digest::of(b"m"), SelectionKey::parse("full").unwrap());
        fs::create_dir_all(store.layout.entry(&key)).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (store, key) = (&store, &key);
                scope.spawn(move || {
                    for _ in 0..10 {
                        store.record_use(key, &format!("r/m:{thread}")).unwrap();
                    }
                });
            }
        });
        let usage = store.entry_usage(&key);
        assert_eq!(usage.use_count, 80);
        assert_eq!(usage.references.len(), 8);
    }

    /// Entry keys print and parse back; junk does not parse.
    #[test]
    fn entry_keys_round_trip() {
        let key = EntryKey::new(Digest::of(b"m"), SelectionKey::parse("part-0123456789abcdef").unwrap());
        assert_eq!(EntryKey::parse(&key.to_string()), Some(key));
        assert_eq!(EntryKey::parse("sha256:00/full"), None);
        assert_eq!(EntryKey::parse("nothing"), None);
    }
}
