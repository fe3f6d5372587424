//! Answers kept in memory: parsed manifests, what tags named, exclude
//! decisions. Each holds what one node uses, a few dozen entries; the bound
//! only stops callers that name endless keys from growing it without end.

use std::collections::HashMap;
use std::hash::Hash;

/// Inserts into `map`, first dropping an arbitrary other entry when it
/// already holds `bound` of them.
pub(crate) fn insert_bounded<K: Eq + Hash + Clone, V>(map: &mut HashMap<K, V>, bound: usize, key: K, value: V) {
    if map.len() >= bound
        && !map.contains_key(&key)
        && let Some(dropped) = map.keys().next().cloned()
    {
        map.remove(&dropped);
    }
    map.insert(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full map makes room for a new key, and replacing a key drops nothing.
    #[test]
    fn stays_within_its_bound() {
        let mut map = HashMap::new();
        for key in 0..10 {
            insert_bounded(&mut map, 4, key, key);
        }
        assert_eq!(map.len(), 4);
        assert_eq!(map.get(&9), Some(&9));
        let kept: Vec<i32> = map.keys().copied().collect();
        insert_bounded(&mut map, 4, kept[0], -1);
        assert_eq!(map.len(), 4);
        assert!(kept.iter().all(|key| map.contains_key(key)));
    }
}
