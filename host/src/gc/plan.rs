//! What a GC run decides, as functions of plain inputs: which entries are
//! candidates, which of the plugins' choices are honoured, which blobs stay.
//! Nothing here reads the disk; the [`collector`](super::collector) gathers
//! the inputs and carries the plan out (the store checks its own leases
//! again, under its lock, at the moment of each eviction).

use std::collections::{HashMap, HashSet};

use crate::digest::Digest;
use crate::plugins::gc::GcChoice;
use crate::store::{EntryKey, EntryLayers, Keep};

/// What GC never evicts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roots {
    /// Entries `pulling` and `ready` volume records hold.
    pub held: HashSet<EntryKey>,
    /// Entries a pull or a link step has leased.
    pub leased: HashSet<EntryKey>,
    /// Manifests an operator pinned: every entry of each is protected.
    pub pinned: HashSet<Digest>,
}

impl Roots {
    /// Whether `key` is a root: held, leased or of a pinned manifest.
    pub fn protects(&self, key: &EntryKey) -> bool {
        self.held.contains(key) || self.leased.contains(key) || self.pinned.contains(&key.manifest)
    }
}

/// The candidates among `entries`, in their order: those no root protects.
pub fn candidates<'a>(entries: &'a [EntryKey], roots: &Roots) -> Vec<&'a EntryKey> {
    entries.iter().filter(|key| !roots.protects(key)).collect()
}

/// An eviction the plugins chose and the plan honours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub key: EntryKey,
    /// The plugin that chose it.
    pub plugin: String,
}

/// The plugins' choices honoured: only keys offered as `candidates`, each
/// once (its first choice), in the order chosen. A key that names no
/// candidate (a root, an unknown entry, a typo) is ignored.
pub fn evictions(candidates: &[&EntryKey], choices: impl IntoIterator<Item = GcChoice>) -> Vec<Planned> {
    let mut offered: HashMap<String, &EntryKey> = candidates.iter().map(|key| (key.to_string(), *key)).collect();
    choices
        .into_iter()
        .filter_map(|choice| {
            let key = offered.remove(&choice.key)?;
            Some(Planned { key: key.clone(), plugin: choice.plugin })
        })
        .collect()
}

/// The blobs the remaining entries need: their layers and manifests, and
/// every pinned manifest.
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

/// What a sweep keeps: every blob and unpacked layer the remaining entries
/// use, and the pinned manifests.
pub fn keep(entries: &[EntryLayers], pinned: &HashSet<Digest>) -> Keep {
    Keep {
        blobs: needed_blobs(entries.iter().map(|entry| (&entry.key, &entry.blobs[..])), pinned),
        unpacked: needed_blobs(entries.iter().map(|entry| (&entry.key, &entry.unpacked[..])), pinned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modelpack::SelectionKey;

    fn key(n: u8) -> EntryKey {
        EntryKey::new(Digest::of(&[n]), SelectionKey::parse("full").unwrap())
    }

    fn choice(key: &EntryKey, plugin: &str) -> GcChoice {
        GcChoice { key: key.to_string(), plugin: plugin.to_owned() }
    }

    /// Held, leased and pinned entries are never candidates; the rest are,
    /// in the store's order.
    #[test]
    fn candidates_leave_protected_entries() {
        let entries: Vec<EntryKey> = (1..=5).map(key).collect();
        let roots = Roots { held: [key(2)].into(), leased: [key(3)].into(), pinned: [key(4).manifest].into() };
        assert_eq!(candidates(&entries, &roots), [&key(1), &key(5)]);
        assert_eq!(candidates(&entries, &Roots::default()).len(), 5);
    }

    /// A pin protects every entry of its manifest, whatever the selection.
    #[test]
    fn a_pin_protects_every_selection() {
        let manifest = Digest::of(b"model");
        let full = EntryKey::new(manifest.clone(), SelectionKey::parse("full").unwrap());
        let other = EntryKey::new(manifest.clone(), SelectionKey::parse("part-0123456789abcdef").unwrap());
        let roots = Roots { pinned: [manifest].into(), ..Roots::default() };
        assert!(candidates(&[full, other], &roots).is_empty());
    }

    /// The plugins' choices are honoured in their order, among candidates
    /// only, each once: choosing a held, leased, pinned or unknown entry
    /// evicts nothing.
    #[test]
    fn only_candidates_are_evicted() {
        let entries: Vec<EntryKey> = (1..=5).map(key).collect();
        let roots = Roots { held: [key(2)].into(), leased: [key(3)].into(), pinned: [key(4).manifest].into() };
        let offered = candidates(&entries, &roots);
        let choices = vec![
            choice(&key(5), "lru"),
            choice(&key(2), "lru"),
            choice(&key(3), "lru"),
            choice(&key(4), "lru"),
            choice(&key(9), "lru"),
            GcChoice { key: "not a key".into(), plugin: "lru".into() },
            choice(&key(5), "watermark"),
            choice(&key(1), "watermark"),
        ];
        let planned = evictions(&offered, choices);
        assert_eq!(planned, [Planned { key: key(5), plugin: "lru".into() }, Planned { key: key(1), plugin: "watermark".into() }]);
        assert!(planned.iter().all(|planned| !roots.protects(&planned.key)));
    }

    /// No choice, no eviction.
    #[test]
    fn nothing_chosen_nothing_evicted() {
        let entries = vec![key(1)];
        assert!(evictions(&candidates(&entries, &Roots::default()), Vec::new()).is_empty());
    }

    /// The remaining entries' layers and manifests, and pinned manifests,
    /// are needed; nothing else.
    #[test]
    fn needed_blobs_of_remaining_entries() {
        let layers = [Digest::of(b"l1"), Digest::of(b"l2")];
        let pinned: HashSet<Digest> = [Digest::of(b"pinned")].into();
        let needed = needed_blobs([(&key(1), &layers[..])], &pinned);
        let expected: HashSet<Digest> = [key(1).manifest, Digest::of(b"l1"), Digest::of(b"l2"), Digest::of(b"pinned")].into();
        assert_eq!(needed, expected);
    }
}
