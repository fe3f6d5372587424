//! The plugin fixture: the crates under `plugins/` and `tests/` built as
//! components on first use, and plugin directories holding them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::target_dir;

/// The crates under `plugins/` and `tests/` built as components for the tests.
const PLUGIN_CRATES: &[&str] = &[
    "exclude-patterns",
    "quota-watermark",
    "gc-lru-watermark",
    "max-pull",
    "namespace-allowlist",
    "hostile-policy",
    "legacy-policy",
    "verify-signatures",
];

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
    let path = target_dir().join("wasm32-wasip2/plugin").join(format!("{}.wasm", crate_name.replace('-', "_")));
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
