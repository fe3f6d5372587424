//! [`Selection`]: the layers of a model a volume gets, and the
//! [`SelectionKey`] that names that choice.

use std::collections::HashSet;

use super::{Layer, Model, SelectionKey};
use crate::digest::Digest;

impl Model {
    /// The selection that keeps every layer whose path is not in `skipped`.
    pub fn select<'a>(&self, skipped: impl IntoIterator<Item = &'a str>) -> Selection {
        let skipped: HashSet<&str> = skipped.into_iter().collect();
        let kept: Vec<usize> =
            self.layers.iter().filter(|layer| !skipped.contains(layer.path.as_str())).map(|layer| layer.index).collect();
        Selection::new(self, kept)
    }
}

/// The layers a volume gets, and the key that names that choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    kept: Vec<usize>,
    key: SelectionKey,
}

impl Selection {
    fn new(model: &Model, mut kept: Vec<usize>) -> Selection {
        kept.sort_unstable();
        kept.dedup();
        let key = if kept.len() == model.layers.len() {
            SelectionKey::full()
        } else {
            let mut paths: Vec<&str> = kept.iter().map(|&index| model.layers[index].path.as_str()).collect();
            paths.sort_unstable();
            let digest = Digest::of(paths.join("\n").as_bytes());
            SelectionKey::part(&digest)
        };
        Selection { kept, key }
    }

    pub fn key(&self) -> &SelectionKey {
        &self.key
    }

    /// The kept layers of `model`, in manifest order.
    pub fn layers<'m>(&'m self, model: &'m Model) -> impl Iterator<Item = &'m Layer> {
        self.kept.iter().map(|&index| &model.layers[index])
    }

    pub fn is_full(&self) -> bool {
        self.key.as_str() == SelectionKey::FULL
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::tests::{RAW, manifest, parse};
    use super::*;

    /// Selections: `full` when nothing is skipped, a stable `part-` key
    /// otherwise, equal for equal kept sets whatever the skip order.
    #[test]
    fn selection_keys() {
        let model = parse(&manifest(&[("a", RAW), ("b", RAW), ("c", RAW)])).unwrap();
        assert_eq!(model.select([]).key().as_str(), "full");
        assert!(model.select(["nonexistent"]).is_full());
        let without_b = model.select(["b"]);
        assert!(without_b.key().as_str().starts_with("part-"));
        assert_eq!(without_b.layers(&model).map(|layer| layer.path.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(model.select(["b"]).key(), without_b.key());
        assert_ne!(model.select(["a"]).key(), without_b.key());
        assert_eq!(SelectionKey::parse(without_b.key().as_str()).as_ref(), Some(without_b.key()));
        assert_eq!(SelectionKey::parse("part-../x"), None);
    }
}
