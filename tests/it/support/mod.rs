//! Shared helpers of the integration tests: the real `modelcache` binary,
//! the real compiled plugins, and skips that say why. One module per fixture;
//! everything is re-exported here, so tests name `support::Registry`.
// The integration tests, the CSI tests and the policy bench each use their own
// subset of these helpers and of the re-exports below.
#![allow(dead_code, unused_imports)]

mod daemon;
mod plugins;
mod proxy;
mod registry;
mod tier;
mod tls;
mod tmpfs;
mod trees;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub use daemon::{Daemon, free_port};
pub use plugins::{PluginDir, component_cache, plugin_wasm};
pub use proxy::{BlobAnswer, FlakyProxy, HostileBlobProxy};
pub use registry::{Registry, basic_auth, htpasswd, registry_binary, start_registry, unassigned_port, write_docker_config};
pub use tier::CacheTier;
pub use tls::TestAuthority;
pub use tmpfs::{Unmount, mount_tmpfs};
pub use trees::{RawLayer, bytes, digest_of, publish, push, push_as, push_layers, read_tree, tar_archive, write_tree};

/// Skips the calling test with a printed reason, unless
/// `MODELCACHE_TEST_STRICT=1` (set by CI) turns the skip into a failure.
#[macro_export]
macro_rules! skip_unless {
    ($condition:expr, $($reason:tt)+) => {
        if !$condition {
            $crate::support::skipping(&format!($($reason)+));
            return;
        }
    };
}

/// Says why a test skips, or fails it under `MODELCACHE_TEST_STRICT=1`.
pub fn skipping(reason: &str) {
    if std::env::var_os("MODELCACHE_TEST_STRICT").is_some_and(|value| value == "1") {
        panic!("cannot skip under MODELCACHE_TEST_STRICT=1: {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

/// Whether the tests run as root (bind mounts, tmpfs).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The cargo target directory this test binary was built into.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors().nth(3).expect("target dir above the test binary").to_owned()
}

/// The `modelcache` binary under test: this package's, or (for the CSI
/// shim's tests) built beside them.
pub fn modelcache_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| binary("MODELCACHE_TEST_BINARY", option_env!("CARGO_BIN_EXE_modelcache"), "modelcache", "modelcache"))
        .clone()
}

/// The `modelcache-csi` binary (the shim's package, built on demand).
pub fn csi_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| binary("MODELCACHE_CSI_TEST_BINARY", None, "modelcache-csi", "modelcache-csi")).clone()
}

/// A binary of the workspace: the one `variable` names (set when several
/// checkouts build into one target directory, where the last build's binary
/// would otherwise be the one tested), cargo's own, or one built now.
fn binary(variable: &str, from_cargo: Option<&str>, package: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    if let Some(path) = from_cargo {
        return PathBuf::from(path);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", package, "--bin", name])
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap_or_else(|error| panic!("running cargo to build {name}: {error}"));
    assert!(status.success(), "building {name} failed");
    let profile_dir = std::env::current_exe().unwrap().ancestors().nth(2).unwrap().to_owned();
    profile_dir.join(name)
}

/// The `modelcache` binary under test.
pub fn modelcache() -> Command {
    let mut command = Command::new(modelcache_binary());
    command.env("MODELCACHE_LOG", "info").env_remove("MODELCACHE_LOG_FORMAT");
    command
}
