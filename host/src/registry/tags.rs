//! What tags named when last asked, for a node that asks once per TTL and
//! mounts what it knows through a registry outage.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::ModelRef;
use crate::digest::Digest;

/// What tags named when last asked.
///
/// A mount by tag asks the registry what the tag names now, unless it was
/// asked less than `ttl` ago: a node starting pods of one deployment then
/// asks once, not once a pod (docker-registry takes longer to answer that
/// question for a 1,000-file model than a warm mount takes to link it).
/// And when the registry cannot be reached, the last answer is used, so a
/// cached model still mounts during a registry outage, with a warning. Once
/// the registry says a tag is gone or refused, it is forgotten.
///
/// The price is that a tag moved within `ttl` of the last question is seen
/// late on this node; references by digest, or a zero `ttl`, avoid it.
#[derive(Debug)]
pub struct TagMemory {
    ttl: Duration,
    known: Mutex<HashMap<String, Recalled>>,
}

#[derive(Debug)]
struct Recalled {
    digest: Digest,
    /// When the registry said so; `None` when learned from a volume record
    /// at start-up, good only while the registry cannot be reached.
    at: Option<std::time::Instant>,
}

impl TagMemory {
    /// Distinct tags remembered.
    const KEPT: usize = 1024;

    pub fn new(ttl: Duration) -> TagMemory {
        TagMemory { ttl, known: Mutex::default() }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Recalled>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `tag` named when the registry said so less than `ttl` ago.
    pub fn fresh(&self, tag: &ModelRef) -> Option<Digest> {
        let known = self.known();
        let recalled = known.get(tag.as_str())?;
        recalled.at.filter(|at| at.elapsed() < self.ttl).map(|_| recalled.digest.clone())
    }

    /// What `tag` named when last heard of, however long ago, for when the
    /// registry cannot be reached; trusted from now for another `ttl`, so
    /// the mounts that follow during an outage do not each wait out the
    /// retries.
    pub fn fall_back(&self, tag: &ModelRef) -> Option<Digest> {
        let mut known = self.known();
        let recalled = known.get_mut(tag.as_str())?;
        recalled.at = Some(std::time::Instant::now());
        Some(recalled.digest.clone())
    }

    /// The registry's answer, just given.
    pub fn remember(&self, tag: &ModelRef, digest: &Digest) {
        self.insert(tag.as_str(), Recalled { digest: digest.clone(), at: Some(std::time::Instant::now()) });
    }

    /// The registry says `tag` is gone, or refused: nothing is served
    /// from memory for it any more.
    pub fn forget(&self, tag: &ModelRef) {
        self.known().remove(tag.as_str());
    }

    /// What a volume record says `tag` named once: used only when the
    /// registry cannot be reached, and never over an answer of this run.
    pub fn recall(&self, tag: &str, digest: &Digest) {
        if !self.known().contains_key(tag) {
            self.insert(tag, Recalled { digest: digest.clone(), at: None });
        }
    }

    fn insert(&self, tag: &str, recalled: Recalled) {
        crate::memo::insert_bounded(&mut self.known(), Self::KEPT, tag.to_owned(), recalled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer is fresh for the TTL and a fallback after; what a record
    /// says is only a fallback (which then is fresh for a TTL) and never
    /// overrides an answer; a forgotten tag has no fallback.
    #[test]
    fn tag_memory() {
        let tag = ModelRef::parse("registry.local/models/a:v1").unwrap();
        let (one, two) = (Digest::of(b"one"), Digest::of(b"two"));
        let trusting = TagMemory::new(Duration::from_secs(3600));
        trusting.recall(tag.as_str(), &one);
        assert_eq!(trusting.fresh(&tag), None);
        assert_eq!((trusting.fall_back(&tag), trusting.fresh(&tag)), (Some(one.clone()), Some(one.clone())));
        trusting.remember(&tag, &two);
        trusting.recall(tag.as_str(), &one);
        assert_eq!(trusting.fresh(&tag), Some(two.clone()));
        let asking = TagMemory::new(Duration::ZERO);
        asking.remember(&tag, &two);
        assert_eq!((asking.fresh(&tag), asking.fall_back(&tag)), (None, Some(two)));
        asking.forget(&tag);
        assert_eq!(asking.fall_back(&tag), None);
    }
}
