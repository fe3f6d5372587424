//! The reverse of [`modelpack`](crate::modelpack): a directory packed as a
//! ModelPack artifact and pushed, one raw layer per file.
//!
//! Each file's layer type follows its kind: weights (`.safetensors`,
//! `.bin`, `.gguf`, …), weight configs (`.json`, tokenizer files, …), code
//! (`.py`, `.sh`, …), datasets (`.parquet`, `.csv`, …) and docs (the rest).
//! Every layer carries the `org.cncf.model.filepath` and
//! `org.cncf.model.file.metadata+json` annotations. Hidden files and
//! directories (`.git`, `.cache`, …) are left out; symlinks are refused.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use crate::digest::Digest;
use crate::modelpack::{
    ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, FILEPATH_ANNOTATION, MANIFEST_MEDIA_TYPE, METADATA_ANNOTATION, ModelPath,
};
use crate::registry::{ModelRef, Registry, RegistryError};

/// One file to push.
#[derive(Clone, Debug)]
pub struct PackedFile {
    pub path: ModelPath,
    pub source: PathBuf,
    pub digest: Digest,
    pub size: u64,
    pub media_type: &'static str,
    pub mode: u32,
    pub mtime: SystemTime,
}

/// A directory, packed.
#[derive(Clone, Debug)]
pub struct Packed {
    pub files: Vec<PackedFile>,
    pub config: Bytes,
    pub manifest: Bytes,
}

/// What can go wrong packing or pushing.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The blocking task that reads the directory panicked or was cancelled.
    #[error("reading the directory did not finish")]
    Join(#[source] tokio::task::JoinError),
}

/// The ModelPack layer type of a file, by its name.
pub fn media_type_for(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    let extension = name.rsplit_once('.').map(|(_, extension)| extension).unwrap_or("");
    const WEIGHTS: &[&str] = &["safetensors", "bin", "gguf", "pt", "pth", "onnx", "ckpt", "h5", "msgpack", "tflite", "pb"];
    const CONFIGS: &[&str] = &["json", "yaml", "yml", "toml", "model", "tiktoken"];
    const CODE: &[&str] = &["py", "sh", "ipynb", "js", "ts", "rs", "go", "c", "cc", "cpp", "h", "java", "jinja", "lua"];
    const DATA: &[&str] = &["parquet", "csv", "jsonl", "arrow", "tsv"];
    if WEIGHTS.contains(&extension) {
        "application/vnd.cncf.model.weight.v1.raw"
    } else if CONFIGS.contains(&extension) || name == "vocab.txt" || name == "merges.txt" {
        "application/vnd.cncf.model.weight.config.v1.raw"
    } else if CODE.contains(&extension) || name == "dockerfile" || name == "makefile" {
        "application/vnd.cncf.model.code.v1.raw"
    } else if DATA.contains(&extension) {
        "application/vnd.cncf.model.dataset.v1.raw"
    } else {
        "application/vnd.cncf.model.doc.v1.raw"
    }
}

/// Walks `dir`, hashes every file and builds the config and manifest.
///
/// # Errors
/// Unreadable files, symlinks, names that are not valid model paths, or an
/// empty directory.
pub fn pack_dir(dir: &Path) -> Result<Packed, PackError> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    if files.is_empty() {
        return Err(PackError::Refused { path: dir.to_owned(), reason: "holds no files to pack".into() });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let name = dir.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let config = Bytes::from(
        serde_json::to_vec(&json!({
            "descriptor": { "name": name, "createdAt": now },
            "modelfs": { "type": "layers", "diffIds": files.iter().map(|file| file.digest.to_string()).collect::<Vec<_>>() },
            "config": {},
        }))
        .expect("JSON values serialize"),
    );
    let layers: Vec<serde_json::Value> = files.iter().map(layer_json).collect();
    let manifest = manifest_json(&config, layers);
    Ok(Packed { files, config, manifest })
}

/// A ModelPack manifest around `config` and `layers` (descriptor JSON).
pub fn manifest_json(config: &[u8], layers: Vec<serde_json::Value>) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": Digest::of(config).to_string(), "size": config.len() },
            "layers": layers,
        }))
        .expect("JSON values serialize"),
    )
}

fn layer_json(file: &PackedFile) -> serde_json::Value {
    let mtime = time::OffsetDateTime::from(file.mtime).format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let metadata = json!({
        "name": file.path.as_str().rsplit('/').next().unwrap_or_default(),
        "mode": file.mode,
        "uid": 0,
        "gid": 0,
        "size": file.size,
        "mtime": mtime,
        "typeflag": 48,
    });
    json!({
        "mediaType": file.media_type,
        "digest": file.digest.to_string(),
        "size": file.size,
        "annotations": {
            FILEPATH_ANNOTATION: file.path.as_str(),
            METADATA_ANNOTATION: metadata.to_string(),
        },
    })
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<PackedFile>) -> Result<(), PackError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PackError::Io { path, source }
    };
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let metadata = fs::symlink_metadata(&path).map_err(io(&path))?;
        if metadata.is_dir() {
            walk(root, &path, files)?;
            continue;
        }
        if !metadata.is_file() {
            return Err(PackError::Refused { path, reason: "is not a regular file (symlinks are not packed)".into() });
        }
        let relative = path.strip_prefix(root).expect("walked below the root").to_string_lossy().into_owned();
        let model_path = ModelPath::parse(&relative)
            .map_err(|problem| PackError::Refused { path: path.clone(), reason: format!("path {problem}") })?;
        let digest = hash_file(&path).map_err(io(&path))?;
        files.push(PackedFile {
            media_type: media_type_for(model_path.as_str()),
            path: model_path,
            digest,
            size: metadata.len(),
            mode: metadata.mode() & 0o7777,
            mtime: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            source: path,
        });
    }
    Ok(())
}

fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = std::io::Read::read(&mut file, &mut buffer)?;
        if read == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buffer[..read]);
    }
}

/// A file's bytes as a stream of 1 MiB chunks.
pub fn file_chunks(path: PathBuf) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(None::<tokio::fs::File>, move |file| {
        let path = path.clone();
        async move {
            let mut file = match file {
                Some(file) => file,
                None => tokio::fs::File::open(&path).await?,
            };
            let mut buffer = vec![0u8; 1 << 20];
            let read = file.read(&mut buffer).await?;
            if read == 0 {
                return Ok(None);
            }
            buffer.truncate(read);
            Ok(Some((Bytes::from(buffer), Some(file))))
        }
    })
}

/// Packs `dir` and pushes it as `reference`; returns the manifest digest.
///
/// # Errors
/// Packing or registry errors.
pub async fn push_dir(registry: &Registry, reference: &ModelRef, dir: &Path) -> Result<Digest, PackError> {
    let dir = dir.to_owned();
    let packed = tokio::task::spawn_blocking(move || pack_dir(&dir)).await.map_err(PackError::Join)??;
    futures_util::stream::iter(packed.files.iter())
        .map(|file| registry.push_blob(reference, &file.digest, file.size, file_chunks(file.source.clone())))
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    let config = packed.config.clone();
    registry
        .push_blob(reference, &Digest::of(&config), config.len() as u64, futures_util::stream::once(async move { Ok(config) }))
        .await?;
    Ok(registry.push_manifest(reference, packed.manifest).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modelpack::Model;

    /// Files get layer types by kind.
    #[test]
    fn media_types_by_kind() {
        assert_eq!(media_type_for("model-00001.safetensors"), "application/vnd.cncf.model.weight.v1.raw");
        assert_eq!(media_type_for("config.json"), "application/vnd.cncf.model.weight.config.v1.raw");
        assert_eq!(media_type_for("tokenizer/vocab.txt"), "application/vnd.cncf.model.weight.config.v1.raw");
        assert_eq!(media_type_for("src/train.py"), "application/vnd.cncf.model.code.v1.raw");
        assert_eq!(media_type_for("data/train.parquet"), "application/vnd.cncf.model.dataset.v1.raw");
        assert_eq!(media_type_for("README.md"), "application/vnd.cncf.model.doc.v1.raw");
        assert_eq!(media_type_for("LICENSE"), "application/vnd.cncf.model.doc.v1.raw");
    }

    /// A packed directory parses back as the model it describes.
    #[test]
    fn packed_directories_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("sub")).unwrap();
        fs::create_dir_all(dir.path().join(".git")).unwrap();
        fs::write(dir.path().join("sub/w.bin"), b"weights").unwrap();
        fs::write(dir.path().join("README.md"), b"read me").unwrap();
        fs::write(dir.path().join(".git/HEAD"), b"ref").unwrap();
        let packed = pack_dir(dir.path()).unwrap();
        let model = Model::parse(&Digest::of(&packed.manifest), &packed.manifest).unwrap();
        let layers: Vec<(&str, u64)> = model.layers.iter().map(|layer| (layer.path.as_str(), layer.blob.size)).collect();
        assert_eq!(layers, [("README.md", 7), ("sub/w.bin", 7)]);
        assert_eq!(model.layers[1].blob.digest, Digest::of(b"weights"));
        assert_eq!(model.config.digest, Digest::of(&packed.config));
        assert!(model.layers[0].mode.is_some() && model.layers[0].mtime.is_some());
    }

    /// Symlinks and empty directories are refused.
    #[test]
    fn refuses_symlinks_and_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(pack_dir(dir.path()).unwrap_err().to_string().contains("no files"));
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        assert!(pack_dir(dir.path()).unwrap_err().to_string().contains("symlinks"));
    }
}
