//! The manifest bytes parsed into a [`Model`]: the manifest's own fields,
//! each layer's path, format and file metadata, and the layout rules across
//! layers (no two at one path, none inside another).

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Deserialize;

use super::{
    ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, Descriptor, FILEPATH_ANNOTATION, LEGACY_ARTIFACT_TYPE, LEGACY_FILEPATH_ANNOTATION,
    LEGACY_METADATA_ANNOTATION, Layer, LayerFormat, MANIFEST_MEDIA_TYPE, METADATA_ANNOTATION, Model, ModelError, ModelPath,
};
use crate::digest::Digest;

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
        annotations: raw.annotations,
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

#[cfg(test)]
pub(super) mod tests {
    use super::super::{Compression, MAX_DEPTH, PathProblem};
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    /// A manifest whose layers have the given paths and media types.
    pub(in crate::modelpack) fn manifest(layers: &[(&str, &str)]) -> Vec<u8> {
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

    pub(in crate::modelpack) fn parse(bytes: &[u8]) -> Result<Model, ModelError> {
        Model::parse(&Digest::of(bytes), bytes)
    }

    pub(in crate::modelpack) const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";

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
}
