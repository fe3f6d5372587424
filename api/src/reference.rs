//! Model references: `registry/repository:tag` or `registry/repository@sha256:…`,
//! parsed once where a request arrives.

use oci_spec::distribution::{ParseError, Reference};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// A string that is not a model reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{reference}` is not a valid model reference: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

/// A model reference as the user wrote it, parsed.
#[derive(Clone, Debug)]
pub struct ModelRef {
    text: String,
    reference: Reference,
}

impl ModelRef {
    /// Parses `registry/repository:tag` or `registry/repository@sha256:…`.
    ///
    /// # Errors
    /// [`ReferenceError`] naming the reference and what is wrong with it.
    pub fn parse(text: &str) -> Result<ModelRef, ReferenceError> {
        let invalid = |reason: String| ReferenceError { reference: text.to_owned(), reason };
        let parse_name = |name: &str| name.parse::<Reference>().map_err(|error: ParseError| invalid(error.to_string()));
        // The digest is split off and checked here, the name alone given to
        // oci-client's reference regex: matched against a whole
        // `…@sha256:<64 hex>`, that regex builds its lazy DFA afresh on
        // each thread, a cost a mount by digest would pay twice (figures in
        // docs/benchmarks.md).
        // A tag beside a digest (`repo:tag@sha256:…`) is ignored, as
        // registries do: the digest names the manifest.
        let reference = match text.trim().split_once('@') {
            Some((name, digest)) => {
                let digest = digest.parse::<Digest>().map_err(|error| invalid(error.to_string()))?;
                let name = parse_name(name)?;
                Reference::with_digest(name.registry().to_owned(), name.repository().to_owned(), digest.to_string())
            }
            None => parse_name(text.trim())?,
        };
        Ok(ModelRef { text: text.trim().to_owned(), reference })
    }

    /// The reference as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed form, as OCI clients take it.
    pub fn as_reference(&self) -> &Reference {
        &self.reference
    }

    /// The registry host (`host[:port]`).
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    /// The digest the reference pins, if it pins one.
    pub fn digest(&self) -> Option<Digest> {
        self.reference.digest().and_then(|digest| digest.parse().ok())
    }

    /// The same repository at `host` (a mirror), by the same tag or digest.
    pub fn on(&self, host: &str) -> Reference {
        match (self.reference.digest(), self.reference.tag()) {
            (Some(digest), _) => Reference::with_digest(host.to_owned(), self.repository().to_owned(), digest.to_owned()),
            (None, tag) => Reference::with_tag(host.to_owned(), self.repository().to_owned(), tag.unwrap_or("latest").to_owned()),
        }
    }

    /// The same repository, at `digest`, on `host`.
    pub fn at(&self, host: &str, digest: &Digest) -> Reference {
        Reference::with_digest(host.to_owned(), self.repository().to_owned(), digest.to_string())
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Two references are equal when written alike (as requests compare them).
impl PartialEq for ModelRef {
    fn eq(&self, other: &ModelRef) -> bool {
        self.text == other.text
    }
}

impl Eq for ModelRef {}

impl Serialize for ModelRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for ModelRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<ModelRef, D::Error> {
        ModelRef::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// References parse with their registry, repository and pinned digest.
    #[test]
    fn references() {
        let pinned = format!("registry.local:5000/models/llama@sha256:{}", "a".repeat(64));
        let reference = ModelRef::parse(&pinned).unwrap();
        assert_eq!(reference.registry(), "registry.local:5000");
        assert_eq!(reference.repository(), "models/llama");
        assert_eq!(reference.digest().unwrap().hex(), "a".repeat(64));
        let tagged = ModelRef::parse("registry.local/models/llama:v1").unwrap();
        assert_eq!(tagged.digest(), None);
        assert!(matches!(ModelRef::parse("Not A Reference"), Err(ReferenceError { .. })));
        assert!(ModelRef::parse("registry.local/m@sha256:abc").is_err());
        assert!(ModelRef::parse(&format!("registry.local/Upper@sha256:{}", "a".repeat(64))).is_err());
        // With a tag beside it, the digest names the manifest.
        let both = ModelRef::parse(&format!("registry.local/models/llama:v1@sha256:{}", "b".repeat(64))).unwrap();
        assert_eq!((both.repository(), both.digest().unwrap().hex()), ("models/llama", "b".repeat(64).as_str()));
        assert_eq!(both.on("mirror.local").to_string(), format!("mirror.local/models/llama@sha256:{}", "b".repeat(64)));
    }
}
