//! Giving disk back: an entry evicted whole, blobs and unpacked layers
//! outside the keep-set swept, stale temporaries removed. What to keep is
//! decided above the store (GC marks from its roots); the store only checks
//! its own leases and moves things out under its lock.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::durable::remove_any;

use super::{EntryKey, Store, StoreError, io_error, tree_bytes};

/// What one entry uses, as a sweep reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryLayers {
    pub key: EntryKey,
    /// Blobs its raw layers are.
    pub blobs: Vec<Digest>,
    /// Tar layers it needs unpacked (not their archives).
    pub unpacked: Vec<Digest>,
}

/// What a sweep keeps, besides what pulls hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// Blobs in `blobs/`: raw layers, manifests, configs.
    pub blobs: HashSet<Digest>,
    /// Layers in `unpacked/`.
    pub unpacked: HashSet<Digest>,
}

impl Store {
    /// Evicts an entry whole, unless it is leased or `protected` says so.
    /// The check and the rename out of `models/` happen under the lock that
    /// leases take, so a link step either holds the entry first or finds it
    /// gone and builds it again; it never sees a half-deleted tree.
    /// `observe` runs at the moment of eviction, still under that lock;
    /// neither closure may call back into the store.
    ///
    /// # Errors
    /// On I/O failure (the entry then stays or is already whole in `tmp/`).
    pub fn evict_entry(
        &self,
        key: &EntryKey,
        protected: impl Fn(&EntryKey) -> bool,
        observe: impl Fn(&EntryKey),
    ) -> Result<bool, StoreError> {
        let trash = {
            let state = self.state();
            if state.entry_leases.contains_key(key) || protected(key) || !self.has_entry(key) {
                return Ok(false);
            }
            let trash = self.layout.entry_trash(key);
            remove_any(&trash)?;
            let entry = self.layout.entry(key);
            fs::rename(&entry, &trash).map_err(io_error("evict", &entry))?;
            observe(key);
            // The manifest's directory goes with its last entry, under the
            // lock a build creates it with.
            let _ = fs::remove_dir(self.layout.manifest_dir(&key.manifest));
            trash
        };
        remove_any(&trash)?;
        Ok(true)
    }

    /// Blobs and unpacked layers outside the keep-set that no pull holds:
    /// removed (or, for a dry run, only listed) with their sizes.
    ///
    /// `keep` gets what every entry uses and returns what to keep (GC adds
    /// its pins). The entries are read, and `keep` runs, under the lock
    /// entries are published with, so an entry published meanwhile keeps its
    /// blobs; `keep` must not call back into the store.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn sweep(&self, keep: impl FnOnce(&[EntryLayers]) -> Keep, dry_run: bool) -> Result<Vec<(Digest, u64)>, StoreError> {
        let mut trash = Vec::new();
        let mut swept = Vec::new();
        {
            let mut state = self.state();
            let mut used = Vec::new();
            for key in self.entries()? {
                let info = self.entry_info(&key)?;
                // A tar layer's entry needs it unpacked, not its archive; a
                // raw layer's needs the blob.
                let (archives, files): (Vec<_>, Vec<_>) = info.layers.into_iter().partition(|layer| layer.unpacked);
                used.push(EntryLayers {
                    key,
                    blobs: files.into_iter().map(|layer| layer.digest).collect(),
                    unpacked: archives.into_iter().map(|layer| layer.digest).collect(),
                });
            }
            let keep = keep(&used);
            for (dir, kind, needed) in
                [(self.layout.blobs(), "blob", &keep.blobs), (self.layout.unpacked_dir(), "unpacked", &keep.unpacked)]
            {
                for item in fs::read_dir(&dir).map_err(io_error("read", &dir))?.flatten() {
                    let Ok(digest) = format!("sha256:{}", item.file_name().to_string_lossy()).parse::<Digest>() else {
                        continue;
                    };
                    if needed.contains(&digest) || state.blob_leases.contains_key(&digest) {
                        continue;
                    }
                    let path = item.path();
                    let bytes =
                        if kind == "unpacked" { tree_bytes(&path) } else { item.metadata().map(|m| m.len()).unwrap_or(0) };
                    swept.push((digest.clone(), bytes));
                    if dry_run {
                        continue;
                    }
                    // Out of its place under the lock; removed after it.
                    let target = self.layout.swept_trash(kind, &digest);
                    remove_any(&target)?;
                    fs::rename(&path, &target).map_err(io_error("evict", &path))?;
                    state.cache_bytes = state.cache_bytes.saturating_sub(bytes);
                    trash.push(target);
                }
            }
        }
        for path in trash {
            remove_any(&path)?;
        }
        Ok(swept)
    }

    /// Removes what has sat in `tmp/` unchanged for longer than `grace`:
    /// what a crashed or cancelled step left, never what is being written.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn remove_stale_temporaries(&self, grace: std::time::Duration) -> Result<Vec<PathBuf>, StoreError> {
        let tmp = self.layout.tmp();
        let mut removed = Vec::new();
        for item in fs::read_dir(&tmp).map_err(io_error("read", &tmp))?.flatten() {
            let stale = item
                .metadata()
                .and_then(|metadata| metadata.modified())
                .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age > grace))
                && !self.state().live.contains(&item.path());
            if stale {
                remove_any(&item.path())?;
                removed.push(item.path());
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::time::SystemTime;

    use super::*;
    use crate::store::tests::tmp_is_empty;

    /// The stale sweep leaves a staging directory that work is filling,
    /// however old its own mtime, and takes it once the work let go.
    #[test]
    fn live_staging_is_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let staging = tempfile::Builder::new().prefix("unpack-").tempdir_in(store.layout.tmp()).unwrap().keep();
        let two_hours_ago = SystemTime::now() - std::time::Duration::from_secs(7200);
        File::open(&staging).unwrap().set_modified(two_hours_ago).unwrap();
        let hour = std::time::Duration::from_secs(3600);
        let live = store.live(&staging);
        assert!(store.remove_stale_temporaries(hour).unwrap().is_empty());
        assert!(staging.is_dir());
        drop(live);
        assert_eq!(store.remove_stale_temporaries(hour).unwrap(), std::slice::from_ref(&staging));
        assert!(!staging.exists());
    }

    /// A sweep keeps what the keep-set names and what a pull holds, and
    /// removes the rest; a dry run only lists it.
    #[test]
    fn sweep_keeps_the_keep_set_and_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let [kept, held, loose] = [&b"kept"[..], b"held", b"loose"].map(|bytes| {
            let digest = Digest::of(bytes);
            store.put_blob(&digest, bytes).unwrap();
            digest
        });
        let _hold = store.hold(None, std::slice::from_ref(&held));
        let keep = || Keep { blobs: HashSet::from([kept.clone()]), ..Keep::default() };
        let listed = store
            .sweep(
                |entries| {
                    assert!(entries.is_empty());
                    keep()
                },
                true,
            )
            .unwrap();
        assert_eq!(listed, [(loose.clone(), 5)]);
        assert!(store.has_blob(&loose));
        assert_eq!(store.sweep(|_| keep(), false).unwrap(), [(loose.clone(), 5)]);
        assert!(store.has_blob(&kept) && store.has_blob(&held) && !store.has_blob(&loose));
        assert_eq!(store.cache_bytes(), 8);
        assert!(tmp_is_empty(&store));
    }
}
