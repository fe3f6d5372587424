//! What garbage collection must leave alone: entries held by link steps,
//! entries and blobs held by pulls, staging directories being filled. The
//! counts live in the store's state, under the lock eviction and sweeps
//! take, so a holder either holds first or finds the thing gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Digest;

use super::{EntryKey, State, Store};

/// Marks a staging directory in `tmp/` as in use until dropped. The stale
/// sweep judges a temporary by its own mtime, and a staging directory's own
/// mtime stops changing once its first entry exists (the rest happens
/// below): the mark keeps an unpack or build that outlasts the GC grace
/// from being deleted under its feet.
pub(super) struct Live<'a> {
    store: &'a Store,
    path: PathBuf,
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.store.state().live.remove(&self.path);
    }
}

impl Store {
    pub(super) fn live(&self, path: &Path) -> Live<'_> {
        self.state().live.insert(path.to_owned());
        Live { store: self, path: path.to_owned() }
    }

    /// Holds `key` against garbage collection while the lease lives. `None`
    /// when the entry is not (or no longer) complete: build it again.
    pub fn lease_entry(self: &Arc<Self>, key: &EntryKey) -> Option<EntryLease> {
        let mut state = self.state();
        // Checked under the lock GC takes to evict, so an entry is either
        // leased before GC looks or found gone after.
        if !self.has_entry(key) {
            return None;
        }
        *state.entry_leases.entry(key.clone()).or_default() += 1;
        Some(EntryLease { store: self.clone(), key: key.clone() })
    }

    /// Holds an entry that may not exist yet (being selected or built) and
    /// the blobs a pull needs, against garbage collection.
    pub fn hold(self: &Arc<Self>, key: Option<&EntryKey>, blobs: &[Digest]) -> Hold {
        let mut state = self.state();
        if let Some(key) = key {
            *state.entry_leases.entry(key.clone()).or_default() += 1;
        }
        for digest in blobs {
            *state.blob_leases.entry(digest.clone()).or_default() += 1;
        }
        Hold { store: self.clone(), key: key.cloned(), blobs: blobs.to_vec() }
    }

    /// Whether an entry is leased or held now.
    pub fn is_entry_leased(&self, key: &EntryKey) -> bool {
        self.state().entry_leases.contains_key(key)
    }
}

/// An entry held against eviction.
#[derive(Debug)]
pub struct EntryLease {
    store: Arc<Store>,
    key: EntryKey,
}

impl EntryLease {
    pub fn key(&self) -> &EntryKey {
        &self.key
    }

    pub fn tree(&self) -> PathBuf {
        self.store.layout.tree(&self.key)
    }
}

impl Drop for EntryLease {
    fn drop(&mut self) {
        release(&mut self.store.state(), Some(&self.key), &[]);
    }
}

/// An entry (maybe not built yet) and blobs held against eviction.
#[derive(Debug)]
pub struct Hold {
    store: Arc<Store>,
    key: Option<EntryKey>,
    blobs: Vec<Digest>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        release(&mut self.store.state(), self.key.as_ref(), &self.blobs);
    }
}

fn release(state: &mut State, key: Option<&EntryKey>, blobs: &[Digest]) {
    if let Some(count) = key.and_then(|key| state.entry_leases.get_mut(key)) {
        *count -= 1;
        if *count == 0 {
            state.entry_leases.remove(key.expect("counted a key"));
        }
    }
    for digest in blobs {
        if let Some(count) = state.blob_leases.get_mut(digest) {
            *count -= 1;
            if *count == 0 {
                state.blob_leases.remove(digest);
            }
        }
    }
}
