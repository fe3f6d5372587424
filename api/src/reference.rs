//! Model references: `registry/repository:tag` or `registry/repository@sha256:…`,
//! parsed once where a request arrives.

use oci_spec::distribution::Reference;
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

/// The longest repository path (distribution's limit), `library/` included.
const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// The longest tag.
const TAG_LENGTH_MAX: usize = 128;

impl ModelRef {
    /// Parses `registry/repository:tag` or `registry/repository@sha256:…`.
    ///
    /// The grammar is distribution's (`reference/regexp.go`), normalized as
    /// docker does (no registry: `docker.io`; one path component there:
    /// `library/…`; no tag: `latest`), read by hand rather than by
    /// oci-spec's regex. That regex costs every process ~65 ms to compile
    /// on first use (its `\w` is Unicode), which a CLI mount paid each time
    /// (docs/benchmarks.md, B4). A unit test checks this parser against
    /// oci-spec's on generated references. Tags are ASCII, as distribution's
    /// Go `\w` is; oci-spec's Unicode `\w` also takes letters no registry
    /// accepts.
    /// A tag beside a digest (`repo:tag@sha256:…`) is ignored, as registries
    /// do: the digest names the manifest.
    ///
    /// # Errors
    /// [`ReferenceError`] naming the reference and what is wrong with it.
    pub fn parse(text: &str) -> Result<ModelRef, ReferenceError> {
        let invalid = |reason: &str| ReferenceError { reference: text.to_owned(), reason: reason.to_owned() };
        let trimmed = text.trim();
        let (named, digest) = match trimmed.split_once('@') {
            Some((named, digest)) => (named, Some(digest.parse::<Digest>().map_err(|error| invalid(&error.to_string()))?)),
            None => (trimmed, None),
        };
        // A tag is what follows the last `:` after the last `/`; a `:`
        // before a `/` is the registry's port.
        let (name, tag) = match named.rfind(':') {
            Some(colon) if !named[colon..].contains('/') => (&named[..colon], Some(&named[colon + 1..])),
            _ => (named, None),
        };
        if name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if let Some(tag) = tag
            && !is_tag(tag)
        {
            return Err(invalid("a tag is 1 to 128 letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"));
        }
        let (registry, repository) = split_domain(name).ok_or_else(|| invalid("invalid reference format"))?;
        if repository.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(invalid("repository name must not be more than 255 characters"));
        }
        let reference = match (digest, tag) {
            (Some(digest), _) => Reference::with_digest(registry, repository, digest.to_string()),
            (None, tag) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").to_owned()),
        };
        Ok(ModelRef { text: trimmed.to_owned(), reference })
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

/// `[\w][\w.-]{0,127}`, `\w` being ASCII letters, digits and `_`.
fn is_tag(tag: &str) -> bool {
    let word = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= TAG_LENGTH_MAX
        && word(bytes[0])
        && bytes.iter().all(|&byte| word(byte) || byte == b'.' || byte == b'-')
}

/// A path component: lowercase letters and digits in runs joined by one
/// separator (`.`, `_`, `__` or any number of `-`).
fn is_path_component(component: &str) -> bool {
    let run = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    component.starts_with(run)
        && component.ends_with(run)
        && component
            .split(run)
            .all(|separator| matches!(separator, "." | "_" | "__") || separator.bytes().all(|byte| byte == b'-'))
}

/// A registry host: DNS-like labels of letters, digits and inner `-`,
/// joined by `.`, and an optional numeric port.
fn is_domain(domain: &str) -> bool {
    let (host, port) = match domain.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let label = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && bytes.iter().all(|&byte| byte.is_ascii_alphanumeric() || byte == b'-')
    };
    host.split('.').all(label) && port.is_none_or(|port| !port.is_empty() && port.bytes().all(|byte| byte.is_ascii_digit()))
}

/// `(registry, repository)` of a valid name, normalized as docker does;
/// `None` for a name outside the grammar.
fn split_domain(name: &str) -> Option<(String, String)> {
    let (first, rest) = match name.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    // The grammar: path components, or a host and then path components.
    let all_path = name.split('/').all(is_path_component);
    let host_then_path = rest.is_some_and(|rest| is_domain(first) && rest.split('/').all(is_path_component));
    if !(all_path || host_then_path) {
        return None;
    }
    // The first component is the registry when it looks like a host (a `.`
    // or `:`, or `localhost`); else the name is all path, on docker.io.
    let named_registry = rest.is_some() && (first.contains('.') || first.contains(':') || first == "localhost");
    let (registry, repository) = match rest {
        Some(rest) if named_registry => (first, rest.to_owned()),
        _ => ("docker.io", name.to_owned()),
    };
    let registry = if registry == "index.docker.io" { "docker.io" } else { registry };
    let repository =
        if registry == "docker.io" && !repository.contains('/') { format!("library/{repository}") } else { repository };
    Some((registry.to_owned(), repository))
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

    /// What oci-spec's regex parser makes of `text` (ASCII tags only, as
    /// distribution's grammar has them): `(registry, repository, tag)`.
    fn by_oci_spec(text: &str) -> Option<(String, String, Option<String>)> {
        let reference = text.parse::<Reference>().ok()?;
        Some((reference.registry().to_owned(), reference.repository().to_owned(), reference.tag().map(str::to_owned)))
    }

    fn by_us(text: &str) -> Option<(String, String, Option<String>)> {
        let parsed = ModelRef::parse(text).ok()?;
        let reference = parsed.as_reference();
        Some((reference.registry().to_owned(), reference.repository().to_owned(), reference.tag().map(str::to_owned)))
    }

    /// The hand-written grammar agrees with oci-spec's regex on names and
    /// tags, the tricky ones written out.
    #[test]
    fn agrees_with_oci_spec_on_written_cases() {
        let cases = [
            "busybox",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "localhost",
            "localhost/x",
            "localhost:5000/a/b:v1",
            "Foo/bar",
            "a_b.c/d",
            "index.docker.io/x",
            "docker.io/x/y",
            "a..b/c",
            "a__b",
            "a___b",
            "a--b",
            "a-_b",
            "-a",
            "a-",
            "a.",
            "a/",
            "/a",
            "a//b",
            "a:b:c",
            "repo:",
            "repo:.v1",
            "repo:v1.0-rc_1",
            "Upper",
            "host:port/x",
            "host:/x",
            "-host.com/x",
            "host-.com/x",
            "h.com:5000",
            "a:b/c:d",
            "127.0.0.1:5000/models/llama:v1",
            "r.local/models/llama",
            "x/y/z/w:latest",
        ];
        for case in cases {
            assert_eq!(by_us(case), by_oci_spec(case), "{case}");
        }
        let long = format!("r.local/{}", "a".repeat(256));
        assert!(by_us(&long).is_none() && by_oci_spec(&long).is_none());
        let long_tag = format!("r.local/a:{}", "t".repeat(129));
        assert!(by_us(&long_tag).is_none() && by_oci_spec(&long_tag).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// ... and on generated strings over the characters that matter, and
        /// on generated near-references (hosts, ports, separators, tags).
        #[test]
        fn agrees_with_oci_spec_on_generated_references(
            text in "[a-cA-C0-9._:/-]{1,24}",
            shaped in "([a-cA0-9-]{1,3}[.]){0,2}[a-c0-9-]{1,3}(:[0-9]{0,3})?(/([a-c0-9]{1,2}[._-]{0,3}){1,3}){1,3}(:[a-zA-Z0-9_.-]{0,4})?",
        ) {
            proptest::prop_assert_eq!(by_us(&text), by_oci_spec(&text), "{}", text);
            proptest::prop_assert_eq!(by_us(&shaped), by_oci_spec(&shaped), "{}", shaped);
        }
    }

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
