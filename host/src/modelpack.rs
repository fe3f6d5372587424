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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::SystemTime;

use serde::Deserialize;

use crate::digest::Digest;
pub use modelcache_api::entry::SelectionKey;

pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
pub const LEGACY_ARTIFACT_TYPE: &str = "application/vnd.cnai.model.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const FILEPATH_ANNOTATION: &str = "org.cncf.model.filepath";
pub const LEGACY_FILEPATH_ANNOTATION: &str = "org.cnai.model.filepath";
pub const METADATA_ANNOTATION: &str = "org.cncf.model.file.metadata+json";
pub const LEGACY_METADATA_ANNOTATION: &str = "org.cnai.model.file.metadata+json";

const MAX_NAME: usize = 255;
const MAX_PATH: usize = 4096;
/// Names in one path: deeper trees cost a directory handle per level to
/// build and walk, and no model needs them.
pub const MAX_DEPTH: usize = 128;

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

/// What is wrong with a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    #[error("is empty or names the model's root")]
    Empty,
    #[error("is absolute")]
    Absolute,
    #[error("climbs out with `..`")]
    ParentComponent,
    #[error("contains a NUL byte")]
    Nul,
    /// Newlines and the like: paths are joined by newlines where a
    /// selection is named, and read by people in lists.
    #[error("contains a control character")]
    Control,
    #[error("is nested more than {MAX_DEPTH} directories deep")]
    TooDeep,
    #[error("has a name longer than 255 bytes")]
    NameTooLong,
    #[error("is longer than 4096 bytes")]
    TooLong,
}

/// A validated, normalised relative path inside a model: `a/b/c`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelPath(String);

impl ModelPath {
    /// Validates and normalises `text` (drops `./` and empty names).
    ///
    /// # Errors
    /// The [`PathProblem`].
    pub fn parse(text: &str) -> Result<ModelPath, PathProblem> {
        if text.contains('\0') {
            return Err(PathProblem::Nul);
        }
        if text.chars().any(char::is_control) {
            return Err(PathProblem::Control);
        }
        if text.starts_with('/') {
            return Err(PathProblem::Absolute);
        }
        if text.len() > MAX_PATH {
            return Err(PathProblem::TooLong);
        }
        let mut parts = Vec::new();
        for part in text.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(PathProblem::ParentComponent),
                name if name.len() > MAX_NAME => return Err(PathProblem::NameTooLong),
                name => parts.push(name),
            }
        }
        if parts.is_empty() {
            return Err(PathProblem::Empty);
        }
        if parts.len() > MAX_DEPTH {
            return Err(PathProblem::TooDeep);
        }
        Ok(ModelPath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The names, root first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether `self` is `other` or lies under it.
    pub fn is_within(&self, other: &ModelPath) -> bool {
        self.0 == other.0 || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The proper ancestors, nearest to the root first: `a`, `a/b` of `a/b/c`.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(index, _)| &self.0[..index])
    }
}

impl fmt::Display for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: RawDescriptor,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct FileMetadata {
    mode: Option<u32>,
    mtime: Option<String>,
}

impl Model {
    /// Parses the manifest `bytes` (already verified to hash to `digest`).
    ///
    /// # Errors
    /// A [`ModelError`] naming the layer and path at fault.
    pub fn parse(digest: &Digest, bytes: &[u8]) -> Result<Model, ModelError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|source| ModelError::Json { digest: digest.clone(), source })?;
        let manifest_error = |reason: String| ModelError::Manifest { digest: digest.clone(), reason };
        if raw.schema_version != 2 {
            return Err(manifest_error(format!("schemaVersion {} is not 2", raw.schema_version)));
        }
        if let Some(media_type) = &raw.media_type
            && media_type != MANIFEST_MEDIA_TYPE
        {
            return Err(manifest_error(format!("mediaType `{media_type}` is not `{MANIFEST_MEDIA_TYPE}`")));
        }
        // Some packers mark the model only through the config's media type.
        let artifact_type = raw.artifact_type.clone().unwrap_or_default();
        let is_model = artifact_type == ARTIFACT_TYPE
            || artifact_type == LEGACY_ARTIFACT_TYPE
            || (raw.artifact_type.is_none() && is_model_config(&raw.config.media_type));
        if !is_model {
            let artifact_type = raw.artifact_type.unwrap_or_else(|| format!("(none; config `{}`)", raw.config.media_type));
            return Err(ModelError::NotAModel { digest: digest.clone(), artifact_type });
        }
        let config = Descriptor {
            digest: raw.config.digest.parse().map_err(|error| manifest_error(format!("config: {error}")))?,
            size: raw.config.size,
            media_type: raw.config.media_type,
        };
        if raw.layers.is_empty() {
            return Err(manifest_error("has no layers".to_owned()));
        }
        let layers = raw
            .layers
            .into_iter()
            .enumerate()
            .map(|(index, layer)| parse_layer(digest, index, layer))
            .collect::<Result<Vec<_>, _>>()?;
        check_layout(digest, &layers)?;
        Ok(Model { digest: digest.clone(), artifact_type, config, annotations: raw.annotations, layers })
    }

    /// Bytes of all layers.
    pub fn total_bytes(&self) -> u64 {
        self.layers.iter().map(|layer| layer.blob.size).sum()
    }

    /// The selection that keeps every layer whose path is not in `skipped`.
    pub fn select<'a>(&self, skipped: impl IntoIterator<Item = &'a str>) -> Selection {
        let skipped: HashSet<&str> = skipped.into_iter().collect();
        let kept: Vec<usize> =
            self.layers.iter().filter(|layer| !skipped.contains(layer.path.as_str())).map(|layer| layer.index).collect();
        Selection::new(self, kept)
    }
}

fn is_model_config(media_type: &str) -> bool {
    media_type == CONFIG_MEDIA_TYPE || media_type == "application/vnd.cnai.model.config.v1+json"
}

fn parse_layer(digest: &Digest, index: usize, raw: RawDescriptor) -> Result<Layer, ModelError> {
    let layer_error = |reason: String| ModelError::Layer { digest: digest.clone(), index, layer: raw.digest.clone(), reason };
    let blob_digest: Digest = raw.digest.parse().map_err(|error: crate::digest::DigestError| layer_error(error.to_string()))?;
    let Some(path_text) = raw.annotations.get(FILEPATH_ANNOTATION).or_else(|| raw.annotations.get(LEGACY_FILEPATH_ANNOTATION))
    else {
        return Err(layer_error(format!("has no `{FILEPATH_ANNOTATION}` annotation")));
    };
    let path = ModelPath::parse(path_text).map_err(|problem| ModelError::Path {
        digest: digest.clone(),
        index,
        layer: raw.digest.clone(),
        path: path_text.clone(),
        problem,
    })?;
    let metadata =
        raw.annotations.get(METADATA_ANNOTATION).or_else(|| raw.annotations.get(LEGACY_METADATA_ANNOTATION)).and_then(|json| {
            match serde_json::from_str::<FileMetadata>(json) {
                Ok(metadata) => Some(metadata),
                Err(error) => {
                    // Optional metadata: a model is still served without it.
                    tracing::warn!(layer = %raw.digest, "ignoring unreadable file metadata annotation: {error}");
                    None
                }
            }
        });
    let (mode, mtime) = match metadata {
        Some(metadata) => (
            metadata.mode.map(|mode| mode & 0o7777),
            metadata.mtime.as_deref().and_then(|text| {
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok().map(SystemTime::from)
            }),
        ),
        None => (None, None),
    };
    Ok(Layer {
        index,
        format: LayerFormat::of_media_type(&raw.media_type),
        blob: Descriptor { digest: blob_digest, size: raw.size, media_type: raw.media_type },
        path,
        mode,
        mtime,
    })
}

/// No two layers at one path, none inside another.
fn check_layout(digest: &Digest, layers: &[Layer]) -> Result<(), ModelError> {
    let mut by_path: BTreeMap<&str, usize> = BTreeMap::new();
    for layer in layers {
        if let Some(&first) = by_path.get(layer.path.as_str()) {
            return Err(ModelError::Duplicate {
                digest: digest.clone(),
                path: layer.path.to_string(),
                first,
                second: layer.index,
            });
        }
        by_path.insert(layer.path.as_str(), layer.index);
    }
    for layer in layers {
        for ancestor in layer.path.ancestors() {
            if let Some(&outer) = by_path.get(ancestor) {
                return Err(ModelError::Nested {
                    digest: digest.clone(),
                    outer,
                    outer_path: ancestor.to_owned(),
                    inner: layer.index,
                    inner_path: layer.path.to_string(),
                });
            }
        }
    }
    Ok(())
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

/// What one tar entry may do, decided before anything touches the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarAction {
    /// The archive's own root (`./`): nothing to create.
    Skip,
    Directory(ModelPath),
    File(ModelPath),
    /// A symlink at the path, with its (relative, in-tree) target as written.
    Symlink(ModelPath, String),
}

/// The kinds of tar entries, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarKind {
    File,
    Directory,
    Symlink,
    Hardlink,
    Other,
}

/// Checks the entries of one tar layer in order: paths inside the layer's
/// path, no duplicates, nothing through a symlink, symlinks pointing inside
/// the model, and only files, directories and symlinks.
#[derive(Debug)]
pub struct TarRules<'a> {
    layer: &'a ModelPath,
    seen: HashSet<String>,
    symlinks: HashSet<String>,
    files: HashSet<String>,
}

impl<'a> TarRules<'a> {
    pub fn new(layer: &'a ModelPath) -> TarRules<'a> {
        TarRules { layer, seen: HashSet::new(), symlinks: HashSet::new(), files: HashSet::new() }
    }

    /// Judges the next entry.
    ///
    /// # Errors
    /// Why the entry (and so the layer) is refused, naming the entry.
    pub fn check(&mut self, name: &str, kind: TarKind, link_target: Option<&str>) -> Result<TarAction, String> {
        let path = match ModelPath::parse(name) {
            Ok(path) => path,
            Err(PathProblem::Empty) if kind == TarKind::Directory => return Ok(TarAction::Skip),
            Err(problem) => return Err(format!("entry `{name}` {problem}")),
        };
        if !path.is_within(self.layer) {
            return Err(format!("entry `{name}` lies outside the layer's path `{}`", self.layer));
        }
        if let Some(through) =
            path.ancestors().find(|ancestor| self.symlinks.contains(*ancestor) || self.files.contains(*ancestor))
        {
            return Err(format!("entry `{name}` would be created through `{through}`, which is not a directory"));
        }
        let repeated = self.seen.contains(path.as_str());
        let action = match kind {
            TarKind::Directory => {
                if repeated && !self.is_directory(&path) {
                    return Err(format!("entry `{name}` appears twice"));
                }
                TarAction::Directory(path.clone())
            }
            TarKind::File => {
                if repeated {
                    return Err(format!("entry `{name}` appears twice"));
                }
                self.files.insert(path.to_string());
                TarAction::File(path.clone())
            }
            TarKind::Symlink => {
                if repeated {
                    return Err(format!("entry `{name}` appears twice"));
                }
                let target = link_target.unwrap_or_default();
                check_symlink_target(&path, target).map_err(|reason| format!("symlink `{name}` -> `{target}` {reason}"))?;
                self.symlinks.insert(path.to_string());
                TarAction::Symlink(path.clone(), target.to_owned())
            }
            TarKind::Hardlink => return Err(format!("entry `{name}` is a hardlink, which model layers may not hold")),
            TarKind::Other => return Err(format!("entry `{name}` is not a regular file, directory or symlink")),
        };
        self.seen.insert(path.0);
        Ok(action)
    }

    fn is_directory(&self, path: &ModelPath) -> bool {
        !self.files.contains(path.as_str()) && !self.symlinks.contains(path.as_str())
    }
}

/// A symlink target must be relative and, resolved from the link's
/// directory, stay inside the model.
fn check_symlink_target(link: &ModelPath, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("has an empty target");
    }
    if target.starts_with('/') {
        return Err("points to an absolute path");
    }
    if target.contains('\0') {
        return Err("has a NUL byte in its target");
    }
    let mut depth = link.components().count() - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or("points outside the model")?,
            _ => depth += 1,
        }
    }
    Ok(())
}

/// What a built tree holds at a path, as far as the symlink rules care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Directory,
    File,
    /// A symlink, with its target as written.
    Symlink(String),
}

/// Symlinks followed in one resolution before it counts as a loop, as the
/// kernel's own limit.
pub const MAX_SYMLINK_HOPS: usize = 40;
/// Names walked in one resolution (targets included) before giving up: a
/// chain of long targets must not cost unbounded work.
const MAX_RESOLUTION_STEPS: usize = 4096;

/// Why a built tree is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TreeProblem {
    #[error("symlink `{link}` -> `{target}` resolves outside the model")]
    Escapes { link: String, target: String },
    #[error("symlink `{link}` -> `{target}` does not resolve within {MAX_SYMLINK_HOPS} links (a loop?)")]
    TooManyLinks { link: String, target: String },
    #[error("symlink `{link}` -> `{target}` takes more than {MAX_RESOLUTION_STEPS} names to resolve")]
    TooLong { link: String, target: String },
    #[error("`{path}` lies under `{through}`, which is not a directory")]
    Through { path: String, through: String },
}

/// Checks a whole tree as built: nothing lies under a symlink or a file,
/// and every symlink, resolved the way the kernel resolves it (through the
/// other symlinks of the tree, `..` taken after them), stays inside the
/// tree. A target that names nothing (a file of a layer left out) is fine:
/// it resolves nowhere. `nodes` maps `/`-separated relative paths to what
/// stands there; directories that only hold other nodes may be left out.
///
/// # Errors
/// The first [`TreeProblem`], naming the symlink or path.
pub fn check_tree(nodes: &HashMap<String, Node>) -> Result<(), TreeProblem> {
    let mut directories = HashSet::new();
    for path in nodes.keys() {
        let mut ancestor = path.as_str();
        while let Some((parent, _)) = ancestor.rsplit_once('/') {
            if matches!(nodes.get(parent), Some(Node::File | Node::Symlink(_))) {
                return Err(TreeProblem::Through { path: path.clone(), through: parent.to_owned() });
            }
            if !directories.insert(parent) {
                break;
            }
            ancestor = parent;
        }
    }
    // Names walked over the whole tree: a few per link in any real model;
    // many links into one long chain must not cost a link × chain walk.
    let mut budget = 64 * nodes.len() + MAX_RESOLUTION_STEPS;
    for (link, node) in nodes {
        if let Node::Symlink(target) = node {
            resolve_within(nodes, &directories, link, target, &mut budget)?;
        }
    }
    Ok(())
}

/// Resolves the symlink `link` -> `target` over `nodes`, failing when any
/// step climbs above the root; each name walked spends one of `budget`.
fn resolve_within(
    nodes: &HashMap<String, Node>,
    directories: &HashSet<&str>,
    link: &str,
    target: &str,
    budget: &mut usize,
) -> Result<(), TreeProblem> {
    let problem = |make: fn(String, String) -> TreeProblem| make(link.to_owned(), target.to_owned());
    if target.starts_with('/') {
        return Err(problem(|link, target| TreeProblem::Escapes { link, target }));
    }
    // Where the walk stands, as a path kept in step with its names.
    let mut here = link.rsplit_once('/').map_or(String::new(), |(parent, _)| parent.to_owned());
    let mut pending: std::collections::VecDeque<&str> = target.split('/').collect();
    let (mut hops, mut steps) = (0, 0);
    while let Some(name) = pending.pop_front() {
        steps += 1;
        if steps > MAX_RESOLUTION_STEPS || *budget == 0 {
            return Err(problem(|link, target| TreeProblem::TooLong { link, target }));
        }
        *budget -= 1;
        match name {
            "" | "." => {}
            ".." => {
                if here.is_empty() {
                    return Err(problem(|link, target| TreeProblem::Escapes { link, target }));
                }
                here.truncate(here.rfind('/').unwrap_or(0));
            }
            name => {
                let parent_length = here.len();
                if !here.is_empty() {
                    here.push('/');
                }
                here.push_str(name);
                match nodes.get(&here) {
                    Some(Node::Symlink(next)) => {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(problem(|link, target| TreeProblem::TooManyLinks { link, target }));
                        }
                        if next.starts_with('/') {
                            return Err(problem(|link, target| TreeProblem::Escapes { link, target }));
                        }
                        here.truncate(parent_length);
                        for part in next.split('/').rev() {
                            pending.push_front(part);
                        }
                    }
                    // A file with names after it, or a name nothing holds:
                    // the kernel stops there (ENOTDIR, ENOENT).
                    Some(Node::File) if pending.iter().any(|part| !part.is_empty() && *part != ".") => return Ok(()),
                    Some(_) => {}
                    None if directories.contains(here.as_str()) => {}
                    None => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn manifest(layers: &[(&str, &str)]) -> Vec<u8> {
        let layers: Vec<serde_json::Value> = layers
            .iter()
            .enumerate()
            .map(|(index, (path, media_type))| {
                serde_json::json!({
                    "mediaType": media_type,
                    "digest": digest(index as u8 + 1),
                    "size": 100 + index,
                    "annotations": { FILEPATH_ANNOTATION: path },
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": digest(0xee), "size": 2 },
            "layers": layers,
        }))
        .unwrap()
    }

    fn parse(bytes: &[u8]) -> Result<Model, ModelError> {
        Model::parse(&Digest::of(bytes), bytes)
    }

    const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";

    /// Layers become files with validated paths, formats from media types.
    #[test]
    fn parses_layers() {
        let model = parse(&manifest(&[
            ("./weights//model.safetensors", RAW),
            ("tokenizer", "application/vnd.cncf.model.weight.config.v1.tar+gzip"),
            ("src", "application/vnd.cnai.model.code.v1.tar+zstd"),
            ("notes.txt", "application/vnd.cncf.model.doc.v1.tar"),
        ]))
        .unwrap();
        let paths: Vec<&str> = model.layers.iter().map(|layer| layer.path.as_str()).collect();
        assert_eq!(paths, ["weights/model.safetensors", "tokenizer", "src", "notes.txt"]);
        let formats: Vec<LayerFormat> = model.layers.iter().map(|layer| layer.format).collect();
        assert_eq!(
            formats,
            [
                LayerFormat::Raw,
                LayerFormat::Tar(Compression::Gzip),
                LayerFormat::Tar(Compression::Zstd),
                LayerFormat::Tar(Compression::None)
            ]
        );
        assert_eq!(model.total_bytes(), 100 + 101 + 102 + 103);
    }

    /// Other artifacts are refused, naming their type.
    #[test]
    fn refuses_other_artifacts() {
        let mut value: serde_json::Value = serde_json::from_slice(&manifest(&[("a", RAW)])).unwrap();
        value["artifactType"] = "application/vnd.oci.image.config.v1+json".into();
        let error = parse(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(matches!(error, ModelError::NotAModel { .. }));
        assert!(error.to_string().contains("application/vnd.oci.image.config.v1+json"));

        value["artifactType"] = LEGACY_ARTIFACT_TYPE.into();
        assert!(parse(&serde_json::to_vec(&value).unwrap()).is_ok());
        value.as_object_mut().unwrap().remove("artifactType");
        assert!(parse(&serde_json::to_vec(&value).unwrap()).is_ok(), "a model config type marks a model too");
    }

    /// Hostile paths are refused with the layer and the path named.
    #[test]
    fn refuses_hostile_paths() {
        for (path, problem) in [
            ("../etc/passwd", PathProblem::ParentComponent),
            ("a/../../b", PathProblem::ParentComponent),
            ("/etc/passwd", PathProblem::Absolute),
            ("a\0b", PathProblem::Nul),
            ("a\nb", PathProblem::Control),
            ("weights\u{7f}", PathProblem::Control),
            (".", PathProblem::Empty),
            ("", PathProblem::Empty),
        ] {
            let error = parse(&manifest(&[("ok", RAW), (path, RAW)])).unwrap_err();
            match &error {
                ModelError::Path { index: 1, problem: found, .. } => assert_eq!(*found, problem, "{path}"),
                other => panic!("{path}: {other}"),
            }
            assert!(error.to_string().contains("layer 1"), "{error}");
        }
        let long_name = "x".repeat(256);
        assert!(matches!(
            parse(&manifest(&[(&long_name, RAW)])),
            Err(ModelError::Path { problem: PathProblem::NameTooLong, .. })
        ));
        assert!(matches!(
            parse(&manifest(&[(&"d/".repeat(MAX_DEPTH + 1), RAW)])),
            Err(ModelError::Path { problem: PathProblem::TooDeep, .. })
        ));
        assert!(parse(&manifest(&[(&"d/".repeat(MAX_DEPTH), RAW)])).is_ok());
        let long_path = "a/".repeat(2100);
        assert!(matches!(parse(&manifest(&[(&long_path, RAW)])), Err(ModelError::Path { problem: PathProblem::TooLong, .. })));
    }

    /// Duplicate paths (after normalisation) and nested layers are refused.
    #[test]
    fn refuses_duplicates_and_nesting() {
        let error = parse(&manifest(&[("a/b", RAW), ("./a//b", RAW)])).unwrap_err();
        assert!(matches!(error, ModelError::Duplicate { first: 0, second: 1, .. }), "{error}");
        let error = parse(&manifest(&[("dir", "application/vnd.cncf.model.code.v1.tar"), ("dir/file", RAW)])).unwrap_err();
        assert!(matches!(error, ModelError::Nested { outer: 0, inner: 1, .. }), "{error}");
    }

    /// A layer without a path, with a bad digest, or a manifest without
    /// layers is refused.
    #[test]
    fn refuses_incomplete_layers() {
        let mut value: serde_json::Value = serde_json::from_slice(&manifest(&[("a", RAW)])).unwrap();
        value["layers"][0]["annotations"] = serde_json::json!({});
        assert!(parse(&serde_json::to_vec(&value).unwrap()).unwrap_err().to_string().contains("no `org.cncf.model.filepath`"));
        value["layers"][0]["annotations"] = serde_json::json!({ LEGACY_FILEPATH_ANNOTATION: "legacy.bin" });
        assert_eq!(parse(&serde_json::to_vec(&value).unwrap()).unwrap().layers[0].path.as_str(), "legacy.bin");
        value["layers"][0]["digest"] = "md5:00".into();
        assert!(parse(&serde_json::to_vec(&value).unwrap()).unwrap_err().to_string().contains("md5:00"));
        value["layers"] = serde_json::json!([]);
        assert!(parse(&serde_json::to_vec(&value).unwrap()).unwrap_err().to_string().contains("no layers"));
    }

    /// Mode and mtime come from the metadata annotation; bad metadata is ignored.
    #[test]
    fn reads_file_metadata() {
        let mut value: serde_json::Value = serde_json::from_slice(&manifest(&[("run.sh", RAW), ("b", RAW)])).unwrap();
        value["layers"][0]["annotations"][METADATA_ANNOTATION] =
            r#"{"name":"run.sh","mode":33261,"uid":0,"gid":0,"size":100,"mtime":"2024-05-01T10:00:00.5+02:00","typeflag":48}"#
                .into();
        value["layers"][1]["annotations"][METADATA_ANNOTATION] = "{not json".into();
        let model = parse(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(model.layers[0].mode, Some(0o755));
        let mtime = model.layers[0].mtime.unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(mtime.as_millis(), 1_714_550_400_500);
        assert_eq!(model.layers[1].mode, None);
    }

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

    fn tree(entries: &[(&str, Option<&str>)]) -> HashMap<String, Node> {
        entries
            .iter()
            .map(|(path, target)| {
                let node = match target {
                    None => Node::File,
                    Some("/") => Node::Directory,
                    Some(target) => Node::Symlink((*target).to_owned()),
                };
                ((*path).to_owned(), node)
            })
            .collect()
    }

    /// Symlinks are resolved through each other, as the kernel does: a
    /// target that counts as inside by its text but climbs out through
    /// another link is refused; in-tree chains and dangling links pass.
    #[test]
    fn trees_resolve_symlinks_physically() {
        let escapes = |entries: &[(&str, Option<&str>)]| matches!(check_tree(&tree(entries)), Err(TreeProblem::Escapes { .. }));
        // `l1` is `pkg` itself, so `l1/../..` is the model's parent.
        assert!(escapes(&[("pkg/l1", Some(".")), ("pkg/l2", Some("l1/../.."))]));
        // Through a link in another layer: `shallow` is the root itself.
        assert!(escapes(&[("a/b/c/shallow", Some("../../..")), ("x/y/z/up", Some("../../../a/b/c/shallow/.."))]));
        assert!(escapes(&[("pkg/abs", Some("/etc/passwd"))]));
        assert!(escapes(&[("pkg/hop", Some("../other")), ("other", Some("../.."))]));
        assert!(escapes(&[("top", Some(".."))]));
        let fine = |entries: &[(&str, Option<&str>)]| check_tree(&tree(entries));
        assert_eq!(fine(&[("pkg/lib/a.py", None), ("pkg/current", Some("lib/a.py")), ("pkg/up", Some("../other/file"))]), Ok(()));
        assert_eq!(fine(&[("pkg/l1", Some(".")), ("pkg/l2", Some("l1/l1/l1/../x"))]), Ok(()));
        assert_eq!(fine(&[("pkg/dangling", Some("nothing/../../x"))]), Ok(()));
        assert_eq!(fine(&[("w.bin", None), ("pkg/via-file", Some("../w.bin/../../.."))]), Ok(()));
        assert!(matches!(
            fine(&[("pkg/a", Some("b")), ("pkg/b", Some("a"))]),
            Err(TreeProblem::TooManyLinks { .. }) | Err(TreeProblem::TooLong { .. })
        ));
        assert!(matches!(fine(&[("pkg/link", Some(".")), ("pkg/link/file", None)]), Err(TreeProblem::Through { .. })));
        assert!(matches!(fine(&[("w.bin", None), ("w.bin/inner", None)]), Err(TreeProblem::Through { .. })));
    }

    fn rules_check(entries: &[(&str, TarKind, Option<&str>)]) -> Result<Vec<TarAction>, String> {
        let layer = ModelPath::parse("pkg").unwrap();
        let mut rules = TarRules::new(&layer);
        entries.iter().map(|(name, kind, target)| rules.check(name, *kind, *target)).collect()
    }

    /// Tar entries stay within the layer's path; in-tree symlinks are fine.
    #[test]
    fn tar_rules_accept_a_tidy_archive() {
        let actions = rules_check(&[
            ("./", TarKind::Directory, None),
            ("pkg/", TarKind::Directory, None),
            ("pkg/lib/", TarKind::Directory, None),
            ("pkg/lib/a.py", TarKind::File, None),
            ("pkg/current", TarKind::Symlink, Some("lib/a.py")),
            ("pkg/up", TarKind::Symlink, Some("../other-layer/file")),
            ("pkg/lib/", TarKind::Directory, None),
        ])
        .unwrap();
        assert_eq!(actions[0], TarAction::Skip);
        assert_eq!(actions[3], TarAction::File(ModelPath::parse("pkg/lib/a.py").unwrap()));
    }

    /// Escapes, hardlinks, devices, duplicates and paths through symlinks
    /// are refused, each naming the entry.
    #[test]
    fn tar_rules_refuse_escapes() {
        let refused = |entries: &[(&str, TarKind, Option<&str>)], needle: &str| {
            let error = rules_check(entries).unwrap_err();
            assert!(error.contains(needle), "{error}");
        };
        refused(&[("../evil", TarKind::File, None)], "climbs out");
        refused(&[("/etc/passwd", TarKind::File, None)], "absolute");
        refused(&[("other/file", TarKind::File, None)], "outside the layer's path");
        refused(&[("pkg/link", TarKind::Symlink, Some("../../etc/passwd"))], "points outside the model");
        refused(&[("pkg/link", TarKind::Symlink, Some("/etc/passwd"))], "absolute");
        refused(&[("pkg/hard", TarKind::Hardlink, Some("/etc/passwd"))], "hardlink");
        refused(&[("pkg/dev", TarKind::Other, None)], "not a regular file");
        refused(&[("pkg/a", TarKind::File, None), ("pkg/a", TarKind::File, None)], "twice");
        refused(&[("pkg/link", TarKind::Symlink, Some(".")), ("pkg/link/file", TarKind::File, None)], "through `pkg/link`");
        refused(&[("pkg/f", TarKind::File, None), ("pkg/f/x", TarKind::File, None)], "through `pkg/f`");
    }
}

/// Generated hostile inputs: the kernel is the oracle for symlinks.
#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use super::*;
    use proptest::prelude::*;

    /// A tree of up to 12 names over a three-letter alphabet, 3 deep: each
    /// a directory, a file or a symlink whose target mixes names, `.` and `..`.
    fn trees() -> impl Strategy<Value = HashMap<String, Node>> {
        let name = prop::sample::select(vec!["a", "b", "c"]);
        let path = prop::collection::vec(name, 1..=3).prop_map(|parts| parts.join("/"));
        let token = prop::sample::select(vec!["a", "b", "c", ".", "..", ""]);
        let target = prop::collection::vec(token, 1..=7).prop_map(|parts| parts.join("/"));
        let node = prop_oneof![Just(Node::Directory), Just(Node::File), target.prop_map(Node::Symlink)];
        prop::collection::vec((path, node), 1..12).prop_map(|mut nodes| {
            // Shortest first; a name under a file or symlink is dropped, as
            // the tree rules would refuse it before any link is resolved.
            nodes.sort_by_key(|(path, _)| path.len());
            let mut tree: HashMap<String, Node> = HashMap::new();
            for (path, node) in nodes {
                let blocked =
                    path.match_indices('/').any(|(at, _)| matches!(tree.get(&path[..at]), Some(Node::File | Node::Symlink(_))));
                if !blocked && !tree.contains_key(&path) {
                    tree.insert(path, node);
                }
            }
            tree
        })
    }

    /// Writes `tree` under `root` with plain std calls.
    fn materialise(root: &std::path::Path, tree: &HashMap<String, Node>) {
        let mut paths: Vec<&String> = tree.keys().collect();
        paths.sort_by_key(|path| path.len());
        for path in paths {
            let at = root.join(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            match &tree[path] {
                Node::Directory => std::fs::create_dir_all(&at).unwrap(),
                Node::File => std::fs::write(&at, b"").unwrap(),
                Node::Symlink(target) => std::os::unix::fs::symlink(if target.is_empty() { "." } else { target }, &at).unwrap(),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Our resolution says a symlink escapes exactly when the kernel,
        /// asked to resolve it beneath the root (`RESOLVE_BENEATH`), refuses
        /// with EXDEV; and a link that resolves in-tree for us is never
        /// refused for escaping by the kernel.
        #[test]
        fn symlink_resolution_matches_the_kernel(tree in trees()) {
            let dir = tempfile::tempdir().unwrap();
            let tree: HashMap<String, Node> = tree
                .into_iter()
                .map(|(path, node)| match node {
                    Node::Symlink(target) if target.is_empty() => (path, Node::Symlink(".".into())),
                    other => (path, other),
                })
                .collect();
            materialise(dir.path(), &tree);
            let root = std::fs::File::open(dir.path()).unwrap();
            let mut directories = HashSet::new();
            for path in tree.keys() {
                let mut ancestor = path.as_str();
                while let Some((parent, _)) = ancestor.rsplit_once('/') {
                    directories.insert(parent);
                    ancestor = parent;
                }
            }
            for (link, node) in &tree {
                let Node::Symlink(target) = node else { continue };
                let mut budget = usize::MAX;
                let ours = resolve_within(&tree, &directories, link, target, &mut budget);
                let kernel = rustix::fs::openat2(
                    &root,
                    link.as_str(),
                    rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                    rustix::fs::ResolveFlags::BENEATH,
                );
                let kernel_escapes = matches!(kernel, Err(rustix::io::Errno::XDEV));
                let ours_escapes = matches!(ours, Err(TreeProblem::Escapes { .. }));
                if !matches!(ours, Err(TreeProblem::TooManyLinks { .. } | TreeProblem::TooLong { .. })) {
                    prop_assert_eq!(ours_escapes, kernel_escapes, "{} -> {}: ours {:?}, kernel {:?}", link, target, ours, kernel.map(drop));
                }
            }
        }

        /// Every path a validated model path can be is relative, normalised
        /// and free of `..`; parsing it again gives it back.
        #[test]
        fn model_paths_stay_relative(text in "[a-z./]{0,24}") {
            if let Ok(path) = ModelPath::parse(&text) {
                prop_assert!(!path.as_str().starts_with('/'));
                prop_assert!(path.components().all(|name| !name.is_empty() && name != "." && name != ".."));
                prop_assert_eq!(ModelPath::parse(path.as_str()), Ok(path.clone()));
            }
        }

        /// Whatever entries a tar layer lists, what the rules accept lies
        /// within the layer's path and never under an accepted symlink or file.
        #[test]
        fn tar_rules_keep_entries_in_the_layer(
            entries in prop::collection::vec(
                (
                    prop::collection::vec(prop::sample::select(vec!["pkg", "a", "..", ".", "", "/"]), 1..5),
                    prop::sample::select(vec![TarKind::File, TarKind::Directory, TarKind::Symlink, TarKind::Hardlink]),
                    prop::collection::vec(prop::sample::select(vec!["a", "..", ".", "/"]), 0..5),
                ),
                0..16,
            )
        ) {
            let layer = ModelPath::parse("pkg").unwrap();
            let mut rules = TarRules::new(&layer);
            let mut blockers: Vec<ModelPath> = Vec::new();
            for (parts, kind, target) in entries {
                let name = parts.concat();
                let target = target.join("/");
                let Ok(action) = rules.check(&name, kind, Some(&target)) else { continue };
                let path = match action {
                    TarAction::Skip => continue,
                    TarAction::Directory(path) => path,
                    TarAction::File(path) => { blockers.push(path.clone()); path }
                    TarAction::Symlink(path, _) => { blockers.push(path.clone()); path }
                };
                prop_assert!(path.is_within(&layer), "{}", path);
                prop_assert!(!blockers.iter().any(|blocker| path != *blocker && path.is_within(blocker)), "{} under a file or symlink", path);
            }
        }

        /// Manifests of any shape are parsed or refused, never a panic, and
        /// an accepted one's paths are valid, distinct and not nested.
        #[test]
        fn manifests_never_panic(
            paths in prop::collection::vec("[a-z./]{0,12}", 0..6),
            media in prop::collection::vec(prop::sample::select(vec!["application/vnd.cncf.model.weight.v1.raw", "x.tar", "x.tar+gzip", "junk"]), 6),
            size in any::<u64>(),
            garbage in any::<bool>(),
        ) {
            let layers: Vec<serde_json::Value> = paths.iter().zip(&media).enumerate().map(|(index, (path, media_type))| serde_json::json!({
                "mediaType": media_type,
                "digest": if garbage && index == 0 { "sha256:zz".to_owned() } else { format!("sha256:{}", format!("{index:02x}").repeat(32)) },
                "size": size,
                "annotations": { FILEPATH_ANNOTATION: path },
            })).collect();
            let bytes = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MANIFEST_MEDIA_TYPE,
                "artifactType": ARTIFACT_TYPE,
                "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": format!("sha256:{}", "e".repeat(64)), "size": 2 },
                "layers": layers,
            })).unwrap();
            if let Ok(model) = Model::parse(&Digest::of(&bytes), &bytes) {
                let mut seen = BTreeSet::new();
                for layer in &model.layers {
                    prop_assert_eq!(ModelPath::parse(layer.path.as_str()), Ok(layer.path.clone()));
                    prop_assert!(seen.insert(layer.path.clone()));
                }
                for layer in &model.layers {
                    prop_assert!(!model.layers.iter().any(|other| other.index != layer.index && layer.path.is_within(&other.path)));
                }
            }
        }
    }
}
