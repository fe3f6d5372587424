//! Shared helpers of the integration tests: the real `modelcache` binary,
//! the real compiled plugins, and skips that say why.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The crates under `plugins/` and `tests/` built as components for the tests.
const PLUGIN_CRATES: &[&str] = &["exclude-patterns", "quota-watermark", "gc-lru-watermark", "hostile-policy"];

/// Skips the calling test with a printed reason, unless
/// `MODELCACHE_TEST_STRICT=1` (set by CI) turns the skip into a failure.
#[macro_export]
macro_rules! skip_unless {
    ($condition:expr, $($reason:tt)+) => {
        if !$condition {
            let reason = format!($($reason)+);
            if std::env::var_os("MODELCACHE_TEST_STRICT").is_some_and(|value| value == "1") {
                panic!("cannot skip under MODELCACHE_TEST_STRICT=1: {reason}");
            }
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
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

/// The `modelcache` binary under test.
pub fn modelcache() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_modelcache"));
    command.env("MODELCACHE_LOG", "info").env_remove("MODELCACHE_LOG_FORMAT");
    command
}

/// Compiled components shared by all tests, so each plugin compiles once.
pub fn component_cache() -> PathBuf {
    target_dir().join("modelcache-test-components")
}

/// The compiled `.wasm` of one of [`PLUGIN_CRATES`], built on first use.
pub fn plugin_wasm(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        command.args(["build", "--profile", "plugin", "--target", "wasm32-wasip2"]);
        for name in PLUGIN_CRATES {
            command.args(["-p", name]);
        }
        command.env("CARGO_TARGET_DIR", target_dir()).current_dir(env!("CARGO_MANIFEST_DIR"));
        let status = command.status().expect("running cargo to build the plugins");
        assert!(
            status.success(),
            "building the policy components failed; is the target installed? (`rustup target add wasm32-wasip2`)"
        );
    });
    let path = target_dir()
        .join("wasm32-wasip2/plugin")
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A plugin directory in a temporary dir.
pub struct PluginDir {
    dir: tempfile::TempDir,
}

impl PluginDir {
    pub fn new() -> PluginDir {
        PluginDir { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// A directory holding the three reference plugins.
    pub fn reference() -> PluginDir {
        let dir = PluginDir::new();
        for name in ["exclude-patterns", "quota-watermark", "gc-lru-watermark"] {
            dir.add(name, name);
        }
        dir
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies the component of `crate_name` in as `NAME.wasm`.
    pub fn add(&self, crate_name: &str, name: &str) -> PathBuf {
        let target = self.dir.path().join(format!("{name}.wasm"));
        std::fs::copy(plugin_wasm(crate_name), &target).expect("copying a plugin");
        target
    }

    /// Writes `NAME.toml`.
    pub fn configure(&self, name: &str, toml: &str) {
        std::fs::write(self.dir.path().join(format!("{name}.toml")), toml).expect("writing a plugin config");
    }

    /// Writes `NAME.wasm` from WAT text.
    pub fn add_wat(&self, name: &str, wat: &str) -> PathBuf {
        let target = self.dir.path().join(format!("{name}.wasm"));
        std::fs::write(&target, wat::parse_str(wat).expect("valid WAT")).expect("writing a plugin");
        target
    }
}
