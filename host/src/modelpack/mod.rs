//! ModelPack manifests: from the manifest bytes to the model's file list, and
//! the rules that keep every path a model creates inside its tree.
//!
//! A model is an OCI image manifest whose `artifactType` is
//! `application/vnd.cncf.model.manifest.v1+json` (or the legacy
//! `application/vnd.cnai.model.manifest.v1+json`). Each layer is one file or
//! one tar archive; its path comes from the `org.cncf.model.filepath`
//! annotation (legacy `org.cnai.model.filepath`), its mode and mtime from
//! `org.cncf.model.file.metadata+json` when present.
//!
//! Layout rules, checked before anything is fetched:
//! - a path is relative, has no `..`, no NUL or other control character,
//!   no empty name, at most 255 bytes per name, 4096 in all and 128 names
//!   deep; `./` prefixes and `//` are normalised;
//! - no two layers share a path, and no layer's path lies inside another's
//!   (a file cannot also be a directory);
//! - a tar layer unpacks at the model's root, and every entry must lie at or
//!   under the layer's own path, so the exclude decision's unit (the layer)
//!   is exactly what it creates. It holds regular files, directories and
//!   symlinks whose targets stay inside the model; nothing may be created
//!   through a symlink. Hardlinks, devices and the like are refused.
//!   A tar layer is therefore kept or skipped whole.
//!
//! | module | concern |
//! |---|---|
//! | `manifest` | the manifest bytes parsed into a [`Model`], the layout rules across layers |
//! | `path` | [`ModelPath`]: one validated relative path, and its [`PathProblem`]s |
//! | `selection` | [`Selection`]: the layers a volume gets, and its [`SelectionKey`] |
//! | `tar` | [`TarRules`]: what each entry of a tar layer may create |
//! | `tree` | [`check_tree`]: a built tree's symlinks resolved within it ([`TreeProblem`]) |
//! | `properties` | (tests) generated hostile inputs, the kernel as the oracle for symlinks |
//!
//! This file holds the model's types and its [`ModelError`].

mod manifest;
mod path;
#[cfg(test)]
mod properties;
mod selection;
mod tar;
mod tree;

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::digest::Digest;
pub use modelcache_api::entry::SelectionKey;

pub use self::path::{MAX_DEPTH, ModelPath, PathProblem};
pub use self::selection::Selection;
pub use self::tar::{TarAction, TarKind, TarRules};
pub use self::tree::{MAX_SYMLINK_HOPS, Node, TreeProblem, check_tree};

pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
pub const LEGACY_ARTIFACT_TYPE: &str = "application/vnd.cnai.model.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const FILEPATH_ANNOTATION: &str = "org.cncf.model.filepath";
pub const LEGACY_FILEPATH_ANNOTATION: &str = "org.cnai.model.filepath";
pub const METADATA_ANNOTATION: &str = "org.cncf.model.file.metadata+json";
pub const LEGACY_METADATA_ANNOTATION: &str = "org.cnai.model.file.metadata+json";
/// A model: the parsed manifest.
#[derive(Clone, Debug)]
pub struct Model {
    pub digest: Digest,
    pub artifact_type: String,
    pub config: Descriptor,
    pub annotations: BTreeMap<String, String>,
    pub layers: Vec<Layer>,
}

/// A blob the manifest points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// One layer: one file, or one archive unpacked at its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Position in the manifest, for messages.
    pub index: usize,
    pub blob: Descriptor,
    pub path: ModelPath,
    pub format: LayerFormat,
    /// Permission bits from the file metadata annotation.
    pub mode: Option<u32>,
    /// Modification time from the file metadata annotation.
    pub mtime: Option<SystemTime>,
    /// The layer's annotations as the manifest states them.
    pub annotations: BTreeMap<String, String>,
}

/// How a layer's blob becomes files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerFormat {
    /// The blob is the file.
    Raw,
    /// The blob is a tar archive, maybe compressed.
    Tar(Compression),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl LayerFormat {
    /// The format a media type announces. ModelPack types end in `.raw`,
    /// `.tar`, `.tar+gzip` or `.tar+zstd`; other tar types (OCI image layers)
    /// are archives too; anything else is taken as a raw file.
    pub fn of_media_type(media_type: &str) -> LayerFormat {
        if media_type.ends_with("tar") {
            LayerFormat::Tar(Compression::None)
        } else if media_type.ends_with("tar+gzip") {
            LayerFormat::Tar(Compression::Gzip)
        } else if media_type.ends_with("tar+zstd") {
            LayerFormat::Tar(Compression::Zstd)
        } else {
            LayerFormat::Raw
        }
    }
}

/// Why a manifest is not a model this cache can serve.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("manifest {digest} is not valid JSON for an OCI image manifest")]
    Json {
        digest: Digest,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "manifest {digest} is not a ModelPack model: its artifactType is `{artifact_type}` \
         (expected `{ARTIFACT_TYPE}`)"
    )]
    NotAModel { digest: Digest, artifact_type: String },
    #[error("manifest {digest}: {reason}")]
    Manifest { digest: Digest, reason: String },
    #[error("manifest {digest}, layer {index} ({layer}): {reason}")]
    Layer { digest: Digest, index: usize, layer: String, reason: String },
    #[error("manifest {digest}, layer {index} ({layer}): path `{path}` {problem}")]
    Path { digest: Digest, index: usize, layer: String, path: String, problem: PathProblem },
    #[error("manifest {digest}: layers {first} and {second} both claim `{path}`")]
    Duplicate { digest: Digest, path: String, first: usize, second: usize },
    #[error("manifest {digest}: layer {inner} (`{inner_path}`) lies inside layer {outer} (`{outer_path}`)")]
    Nested { digest: Digest, outer: usize, outer_path: String, inner: usize, inner_path: String },
}

impl ModelError {
    /// Every way a manifest breaks the rules makes it unservable as asked.
    pub fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::InvalidArgument
    }
}
