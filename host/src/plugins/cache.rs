//! Compiled components on disk, so the second start of a large plugin (a
//! Python or JavaScript one takes seconds to compile) is fast.
//!
//! A file is `<sha256 of the .wasm>-<engine compatibility hash>.cwasm` and
//! holds a magic tag, the sha256 of the serialized body, then the body. Any
//! file that is missing, truncated, corrupt or from another wasmtime build is
//! a miss: the component is compiled again and the file rewritten.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 8] = b"mccwasm1";

/// Where compiled components are kept.
#[derive(Clone, Debug)]
pub struct CompiledCache {
    dir: PathBuf,
}

/// Where a component came from, for logs and start-up measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CompiledCache {
    pub fn new(dir: impl Into<PathBuf>) -> CompiledCache {
        CompiledCache { dir: dir.into() }
    }

    /// The component for `wasm` (whose sha256 hex is `wasm_sha256`): from the
    /// cache when a valid file is there, compiled (and cached) otherwise.
    ///
    /// # Errors
    /// Only when compiling fails; cache trouble is logged and treated as a miss.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        wasm_sha256: &str,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.path_for(engine, wasm_sha256);
        match read_verified(&path) {
            Ok(body) => {
                // SAFETY: the body is exactly what `Component::serialize` wrote
                // into this cache (checked against the digest stored with it),
                // and the file name carries the engine's compatibility hash;
                // wasmtime checks its own version header on top.
                match unsafe { Component::deserialize(engine, &body) } {
                    Ok(component) => return Ok((component, CacheOutcome::Hit)),
                    Err(error) => tracing::debug!(path = %path.display(), "compiled cache miss: {error}"),
                }
            }
            Err(reason) => tracing::debug!(path = %path.display(), "compiled cache miss: {reason}"),
        }
        let component = Component::new(engine, wasm)?;
        if let Err(error) = self.write(&path, &component) {
            tracing::warn!(path = %path.display(), "cannot cache compiled component: {error}");
        }
        Ok((component, CacheOutcome::Miss))
    }

    fn path_for(&self, engine: &Engine, wasm_sha256: &str) -> PathBuf {
        // The hasher is only required to be stable within one build of the
        // binary, which is all the hash has to tell apart.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.dir.join(format!("{wasm_sha256}-{:016x}.cwasm", hasher.finish()))
    }

    fn write(&self, path: &Path, component: &Component) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let body = component.serialize()?;
        std::fs::create_dir_all(&self.dir)?;
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        file.write_all(MAGIC)?;
        file.write_all(&Sha256::digest(&body))?;
        file.write_all(&body)?;
        file.as_file().sync_all()?;
        file.persist(path)?;
        Ok(())
    }
}

fn read_verified(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = std::fs::read(path).map_err(|error| error.to_string())?;
    if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a compiled-component file".into());
    }
    let (header, body) = bytes.split_at(MAGIC.len() + 32);
    if Sha256::digest(body).as_slice() != &header[MAGIC.len()..] {
        return Err("checksum mismatch".into());
    }
    Ok(bytes.split_off(MAGIC.len() + 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPONENT: &str = "(component (core module (func (export \"f\"))))";

    fn engine() -> Engine {
        Engine::default()
    }

    /// The second load is a hit; a corrupted or truncated file is a miss that
    /// repairs itself, never an error.
    #[test]
    fn hits_and_repairs() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::new(dir.path());
        let wasm = wat::parse_str(COMPONENT).unwrap();
        let engine = engine();
        assert_eq!(cache.load_or_compile(&engine, &wasm, "aa").unwrap().1, CacheOutcome::Miss);
        assert_eq!(cache.load_or_compile(&engine, &wasm, "aa").unwrap().1, CacheOutcome::Hit);

        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(cache.load_or_compile(&engine, &wasm, "aa").unwrap().1, CacheOutcome::Miss);
        assert_eq!(cache.load_or_compile(&engine, &wasm, "aa").unwrap().1, CacheOutcome::Hit);

        std::fs::write(&file, b"mccwasm1").unwrap();
        assert_eq!(cache.load_or_compile(&engine, &wasm, "aa").unwrap().1, CacheOutcome::Miss);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporaries left");
    }

    /// A body that passes the checksum but was not made by this wasmtime is a miss.
    #[test]
    fn foreign_body_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::new(dir.path());
        let engine = engine();
        let path = cache.path_for(&engine, "bb");
        let body = b"\0asm not a serialized component".to_vec();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&Sha256::digest(&body));
        bytes.extend_from_slice(&body);
        std::fs::write(&path, bytes).unwrap();
        let wasm = wat::parse_str(COMPONENT).unwrap();
        assert_eq!(cache.load_or_compile(&engine, &wasm, "bb").unwrap().1, CacheOutcome::Miss);
    }
}
