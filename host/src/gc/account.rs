//! Disk accounting: a census of every inode under the root, and the pure
//! step that turns it into each entry's bytes on disk and exclusive bytes
//! (what deleting it frees, each inode counted once) and `du` totals that
//! reconcile with a `du -sb` of the root.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::store::{EntryKey, Layout};

/// Who holds one link to an inode.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// A file in an entry's tree.
    Entry(EntryKey),
    /// `blobs/` or `unpacked/`.
    Store,
    /// A volume's tree.
    Volume,
    /// Records, entry metadata, directories, compiled plugins, the lock.
    Metadata,
}

/// One inode as the census saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub size: u64,
    /// The link count the filesystem reports.
    pub links: u64,
    /// One owner per link the census found.
    pub owners: Vec<Owner>,
}

/// An entry's bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryBytes {
    /// Every inode its tree links, once.
    pub on_disk: u64,
    /// What deleting it frees.
    pub exclusive: u64,
}

impl EntryBytes {
    pub fn shared(&self) -> u64 {
        self.on_disk - self.exclusive
    }
}

/// Where every byte under the root is, each inode counted once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Totals {
    /// Files some entry's tree links.
    pub entries: u64,
    /// Blobs and unpacked layers no entry links (manifests, leftovers).
    pub unreferenced: u64,
    /// Files only volume trees hold (copies across filesystems).
    pub volume_copies: u64,
    /// Directories, records, metadata, compiled plugins.
    pub metadata: u64,
    /// All of the above: equals `du -sb ROOT`.
    pub total: u64,
}

/// Per-entry bytes and the totals, from a census.
pub fn account(inodes: &[Inode]) -> (HashMap<EntryKey, EntryBytes>, Totals) {
    let mut entries: HashMap<EntryKey, EntryBytes> = HashMap::new();
    let mut totals = Totals::default();
    for inode in inodes {
        totals.total += inode.size;
        let mut linked_by: Vec<&EntryKey> = inode
            .owners
            .iter()
            .filter_map(|owner| match owner {
                Owner::Entry(key) => Some(key),
                _ => None,
            })
            .collect();
        linked_by.sort();
        linked_by.dedup();
        if linked_by.is_empty() {
            if inode.owners.contains(&Owner::Store) {
                totals.unreferenced += inode.size;
            } else if inode.owners.contains(&Owner::Volume) {
                totals.volume_copies += inode.size;
            } else {
                totals.metadata += inode.size;
            }
            continue;
        }
        totals.entries += inode.size;
        // Freed by deleting the entry only if nothing else links it: no other
        // entry, no volume, no link the census did not find.
        let only_store_besides = inode.owners.iter().all(|owner| matches!(owner, Owner::Entry(_) | Owner::Store));
        let all_links_seen = inode.owners.len() as u64 >= inode.links;
        let exclusive = linked_by.len() == 1 && only_store_besides && all_links_seen;
        for key in linked_by {
            let bytes = entries.entry(key.clone()).or_default();
            bytes.on_disk += inode.size;
            if exclusive {
                bytes.exclusive += inode.size;
            }
        }
    }
    (entries, totals)
}

/// Walks the root (and the volumes directory when it lies outside) and lists
/// every inode once with the owners of the links found.
pub fn census(layout: &Layout, volumes: &Path) -> Vec<Inode> {
    let mut inodes: HashMap<(u64, u64), Inode> = HashMap::new();
    let root = layout.root();
    let mut walk_roots = vec![root.to_owned()];
    if !volumes.starts_with(root) {
        walk_roots.push(volumes.to_owned());
    }
    let classify = |path: &Path| -> Owner {
        if path.starts_with(volumes) && path != volumes {
            return Owner::Volume;
        }
        if path.starts_with(layout.blobs()) || path.starts_with(layout.unpacked_dir()) {
            return Owner::Store;
        }
        if let Ok(rest) = path.strip_prefix(layout.models()) {
            let mut parts = rest.components();
            let manifest = parts.next().map(|part| part.as_os_str().to_string_lossy().into_owned());
            let selection = parts.next().map(|part| part.as_os_str().to_string_lossy().into_owned());
            let in_tree = parts.next().is_some_and(|part| part.as_os_str() == "tree");
            if let (Some(manifest), Some(selection), true) = (manifest, selection, in_tree)
                && let Some(key) = EntryKey::parse(&format!("sha256:{manifest}/{selection}"))
            {
                return Owner::Entry(key);
            }
        }
        Owner::Metadata
    };
    // Each directory counts once, when it is walked, as `du` counts it.
    let mut stack = walk_roots;
    while let Some(dir) = stack.pop() {
        if let Ok(metadata) = fs::symlink_metadata(&dir) {
            add(&mut inodes, &metadata, Owner::Metadata);
        }
        for item in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = item.path();
            let Ok(metadata) = fs::symlink_metadata(&path) else { continue };
            if metadata.is_dir() {
                stack.push(path);
            } else {
                add(&mut inodes, &metadata, classify(&path));
            }
        }
    }
    inodes.into_values().collect()
}

fn add(inodes: &mut HashMap<(u64, u64), Inode>, metadata: &fs::Metadata, owner: Owner) {
    let inode = inodes.entry((metadata.dev(), metadata.ino())).or_insert_with(|| Inode {
        size: metadata.len(),
        links: metadata.nlink(),
        owners: Vec::new(),
    });
    inode.owners.push(owner);
}

/// Keeps a sorted, stable map for reports.
pub fn by_key<T>(map: HashMap<EntryKey, T>) -> BTreeMap<EntryKey, T> {
    map.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::modelpack::SelectionKey;

    fn key(n: u8) -> EntryKey {
        EntryKey::new(Digest::of(&[n]), SelectionKey::parse("full").unwrap())
    }

    fn inode(size: u64, links: u64, owners: Vec<Owner>) -> Inode {
        Inode { size, links, owners }
    }

    /// A blob only one entry links is exclusive; one two entries link, or a
    /// volume still links, is shared; every inode is counted once.
    #[test]
    fn exclusive_bytes_count_each_inode_once() {
        let (a, b) = (key(1), key(2));
        let inodes = vec![
            inode(100, 2, vec![Owner::Store, Owner::Entry(a.clone())]),
            inode(10, 3, vec![Owner::Store, Owner::Entry(a.clone()), Owner::Entry(b.clone())]),
            inode(7, 3, vec![Owner::Store, Owner::Entry(b.clone()), Owner::Volume]),
            inode(5, 3, vec![Owner::Store, Owner::Entry(b.clone())]), // a link outside the root
            inode(3, 3, vec![Owner::Store, Owner::Entry(b.clone()), Owner::Entry(b.clone())]),
            inode(50, 1, vec![Owner::Store]),
            inode(20, 1, vec![Owner::Volume]),
            inode(4096, 2, vec![Owner::Metadata]),
        ];
        let (entries, totals) = account(&inodes);
        assert_eq!(entries[&a], EntryBytes { on_disk: 110, exclusive: 100 });
        assert_eq!(entries[&b], EntryBytes { on_disk: 25, exclusive: 3 });
        assert_eq!(entries[&b].shared(), 22);
        assert_eq!(
            totals,
            Totals { entries: 125, unreferenced: 50, volume_copies: 20, metadata: 4096, total: 125 + 50 + 20 + 4096 }
        );
    }
}
