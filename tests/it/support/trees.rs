//! Model trees and artifacts: files written and read back, deterministic
//! content, models pushed with the real binary, and hostile layers and tar
//! archives built by hand.

use std::path::Path;

use super::modelcache;
use super::registry::Registry;

/// Pushes `files` as the model `name` (`repository:tag`); its reference, and
/// the directory it was packed from (kept alive for comparisons).
pub fn publish(registry: &Registry, name: &str, files: &[(&str, Vec<u8>)]) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), files);
    let reference = registry.reference(name);
    push(registry, dir.path(), &reference);
    (reference, dir)
}

/// Writes `files` (relative path, bytes) under `dir`.
pub fn write_tree(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (path, bytes) in files {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }
}

/// Deterministic pseudo-random bytes (so content differs per seed).
pub fn bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(length + 8);
    while out.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(length);
    out
}

/// `sha256:<hex>` of bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    modelcache::digest::Digest::of(bytes).to_string()
}

/// Pushes the directory `dir` as `reference` with the real binary.
pub fn push(registry: &Registry, dir: &Path, reference: &str) -> String {
    push_as(registry, dir, reference, None)
}

/// [`push`] with the credentials of the docker config in `docker_config`.
pub fn push_as(registry: &Registry, dir: &Path, reference: &str, docker_config: Option<&Path>) -> String {
    let mut command = modelcache();
    command.arg("push").arg(dir).arg(reference).args(["--insecure-registry", &registry.host()]);
    if let Some(docker_config) = docker_config {
        command.arg("--docker-config").arg(docker_config);
    }
    let output = command.output().expect("running modelcache push");
    assert!(output.status.success(), "push failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Every file under `dir` with its bytes, by relative path.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                let content = if kind.is_symlink() {
                    format!("-> {}", std::fs::read_link(&path).unwrap().display()).into_bytes()
                } else {
                    std::fs::read(&path).unwrap()
                };
                files.insert(relative, content);
            }
        }
    }
    files
}

/// One layer of a hand-built artifact: `(path annotation, media type, bytes)`.
pub type RawLayer<'a> = (&'a str, &'a str, Vec<u8>);

/// Pushes a manifest built by hand from `layers` (not packed by `modelcache
/// push`, so hostile layouts survive) as `name`; its reference.
pub fn push_layers(registry: &Registry, name: &str, layers: &[RawLayer<'_>]) -> String {
    use modelcache::digest::Digest;
    use modelcache::registry::{ModelRef, Registry as Client, RegistryConfig};
    let reference = registry.reference(name);
    let model_ref = ModelRef::parse(&reference).unwrap();
    let client = Client::new(RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() }).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut descriptors = Vec::new();
        let config = b"{}".to_vec();
        let blobs = layers.iter().map(|(_, _, content)| content.clone()).chain([config.clone()]);
        for content in blobs {
            let digest = Digest::of(&content);
            let size = content.len() as u64;
            let chunk = bytes::Bytes::from(content);
            client.push_blob(&model_ref, &digest, size, futures_util::stream::once(async { Ok(chunk) })).await.unwrap();
        }
        for (path, media_type, content) in layers {
            descriptors.push(serde_json::json!({
                "mediaType": media_type,
                "digest": Digest::of(content).to_string(),
                "size": content.len(),
                "annotations": { "org.cncf.model.filepath": path },
            }));
        }
        client.push_manifest(&model_ref, modelcache::pack::manifest_json(&config, descriptors)).await.unwrap();
    });
    reference
}

/// A tar archive built entry by entry, names written raw (GNU headers, no
/// normalisation) so hostile ones survive: `(name, type, link target, data)`.
pub fn tar_archive(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link, content) in entries {
        let mut header = tar::Header::new_gnu();
        let raw = header.as_gnu_mut().unwrap();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(content.len() as u64);
        header.set_mode(if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
        header.set_cksum();
        builder.append(&header, *content).unwrap();
    }
    builder.into_inner().unwrap()
}
