//! Garbage collection: give disk back without touching what a volume uses or
//! a pull is writing.
//!
//! Roots are the entries held by `pulling` and `ready` volume records (an
//! in-memory index of the records, updated before a record write returns),
//! the entries and blobs held by pulls and link steps (store holds), and the
//! manifests operators pinned. Everything else is a candidate; the `gc`
//! plugins choose which candidates go. An entry goes whole, checked and
//! moved out of `models/` under the lock holds are taken with; then every
//! blob and unpacked layer no remaining entry needs and no pull holds goes
//! too, and temporaries older than a grace period.
//!
//! The accounting is pure: [`account`] turns a census of inodes (size, link
//! count, who links them) into each entry's bytes on disk and exclusive bytes
//! — what deleting it actually frees, each inode counted once, shared blobs
//! and files a volume still links not counted — and into `du` totals that
//! reconcile with a `du -sb` of the root.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::durable::{read_json, write_json};
use crate::store::{EntryKey, Layout, StoreError};

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
            if let (Some(manifest), Some(selection), true) = (manifest, selection, in_tree) {
                if let Some(key) = EntryKey::parse(&format!("sha256:{manifest}/{selection}")) {
                    return Owner::Entry(key);
                }
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

/// The candidates among `entries`: those no record, hold or pin protects.
pub fn candidates<'a>(entries: &'a [EntryKey], protected: impl Fn(&EntryKey) -> bool) -> Vec<&'a EntryKey> {
    entries.iter().filter(|key| !protected(key)).collect()
}

/// The blobs the remaining entries need: their layers and manifests.
pub fn needed_blobs<'a>(
    entries: impl IntoIterator<Item = (&'a EntryKey, &'a [Digest])>,
    pinned: &HashSet<Digest>,
) -> HashSet<Digest> {
    let mut needed: HashSet<Digest> = pinned.clone();
    for (key, layers) in entries {
        needed.insert(key.manifest.clone());
        needed.extend(layers.iter().cloned());
    }
    needed
}

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

/// Why a GC run happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Periodic,
    QuotaDenied,
    OnDemand,
}

/// One entry a run evicted (or would).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Eviction {
    pub key: EntryKey,
    /// The plugin that chose it.
    pub plugin: String,
    pub bytes_on_disk: u64,
    pub exclusive_bytes: u64,
    pub references: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<time::OffsetDateTime>,
}

/// What a run did (or, dry, would do).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    pub trigger: Trigger,
    pub dry_run: bool,
    pub candidates: usize,
    pub evicted: Vec<Eviction>,
    /// Blobs and unpacked layers nothing needs any more, with their bytes.
    pub blobs: Vec<(Digest, u64)>,
    pub temporaries: Vec<PathBuf>,
    /// Released volume records and empty volume directories pruned (see
    /// `Volumes::prune_volume`); a dry run prunes nothing.
    #[serde(default)]
    pub records: Vec<PathBuf>,
    /// Bytes the cache shrank by (for a dry run: would shrink by, at least).
    pub freed_bytes: u64,
    pub failures: Vec<crate::plugins::PluginFailure>,
}

/// One line of `modelcache du`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DuEntry {
    pub key: EntryKey,
    pub bytes_on_disk: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    /// `volume/mount-id` of every record holding it.
    pub referenced_by: Vec<String>,
    pub pinned: bool,
    pub references: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<time::OffsetDateTime>,
    pub use_count: u64,
}

/// `modelcache du`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DuReport {
    pub entries: Vec<DuEntry>,
    pub totals: Totals,
}

/// Keeps a sorted, stable map for reports.
pub fn by_key<T>(map: HashMap<EntryKey, T>) -> BTreeMap<EntryKey, T> {
    map.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// Protected entries are never candidates.
    #[test]
    fn candidates_leave_protected_entries() {
        let entries = vec![key(1), key(2), key(3)];
        let chosen = candidates(&entries, |entry| *entry == key(2));
        assert_eq!(chosen, [&key(1), &key(3)]);
    }

    /// The remaining entries' layers and manifests, and pinned manifests,
    /// are needed; nothing else.
    #[test]
    fn needed_blobs_of_remaining_entries() {
        let layers = vec![Digest::of(b"l1"), Digest::of(b"l2")];
        let pinned: HashSet<Digest> = [Digest::of(b"pinned")].into();
        let needed = needed_blobs([(&key(1), &layers[..])], &pinned);
        let expected: HashSet<Digest> = [key(1).manifest, Digest::of(b"l1"), Digest::of(b"l2"), Digest::of(b"pinned")].into();
        assert_eq!(needed, expected);
    }

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
