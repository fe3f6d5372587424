//! One plugin: its component compiled (or taken from the cache) and
//! checked ([`CompiledPlugin`]), then configured, its settings validated,
//! and called ([`Plugin`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, InstancePre};

use super::bindings::{admission, exclude, gc, quota, settings, v0_1, verify};
use super::runtime::CallState;
use super::{
    CompiledCache, Decision, FailMode, FailureCause, LEGACY_POLICY_VERSION, POLICY_PACKAGE, POLICY_VERSION, PluginConfig,
    PluginError, PluginFailure, Runtime, cache,
};

/// An export of a plugin built against the current WIT, or against 0.1.
pub(super) enum Versioned<Current, Legacy> {
    Current(Current),
    Legacy(Legacy),
}

/// Which WIT package a component was built against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Package {
    Current,
    Legacy,
}

impl Package {
    /// The package of a version found in a component's export names:
    /// component-model semver, so the same major, or for 0.x the same minor.
    fn of(found: &str) -> Option<Package> {
        let found = semver::Version::parse(found).ok()?;
        let same = |version: &str| {
            let known = semver::Version::parse(version).expect("the policy versions are semver");
            found.major == known.major && (known.major > 0 || found.minor == known.minor)
        };
        if same(POLICY_VERSION) {
            Some(Package::Current)
        } else if same(LEGACY_POLICY_VERSION) {
            Some(Package::Legacy)
        } else {
            None
        }
    }

    /// The export lookup of one interface, in this package.
    fn lookup<C, L>(
        self,
        current: impl FnOnce() -> wasmtime::Result<C>,
        legacy: impl FnOnce() -> wasmtime::Result<L>,
    ) -> wasmtime::Result<Versioned<C, L>> {
        Ok(match self {
            Package::Current => Versioned::Current(current()?),
            Package::Legacy => Versioned::Legacy(legacy()?),
        })
    }
}

/// The export lookups of the decisions a plugin serves.
pub(super) struct Exports {
    settings: Versioned<settings::GuestIndices, v0_1::settings::GuestIndices>,
    /// 0.1 has neither admission nor verify.
    pub(super) admission: Option<admission::GuestIndices>,
    pub(super) verify: Option<verify::GuestIndices>,
    pub(super) exclude: Option<Versioned<exclude::GuestIndices, v0_1::exclude::GuestIndices>>,
    pub(super) quota: Option<Versioned<quota::GuestIndices, v0_1::quota::GuestIndices>>,
    pub(super) gc: Option<Versioned<gc::GuestIndices, v0_1::gc::GuestIndices>>,
}

/// A loaded plugin, ready to be called.
pub struct Plugin {
    pub(super) name: String,
    pub(super) path: PathBuf,
    pub(super) sha256: String,
    pub(super) policy_version: String,
    pub(super) config: PluginConfig,
    runtime: Arc<Runtime>,
    pre: InstancePre<CallState>,
    pub(super) exports: Exports,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("sha256", &self.sha256).finish_non_exhaustive()
    }
}

/// A plugin's component, compiled (or taken from the cache) and checked as
/// far as the `.wasm` file alone decides: what it imports, the policy version
/// it was built against and the decisions it exports. Not yet configured.
#[derive(Clone)]
pub struct CompiledPlugin {
    pub name: String,
    pub path: PathBuf,
    /// The sha256 of the `.wasm` file.
    pub sha256: String,
    component: Component,
    /// The `modelcache:policy` version the component was built against.
    pub policy_version: String,
    /// The decisions the component exports.
    pub exported: Vec<Decision>,
    /// Whether the compiled form came from the cache.
    pub cache: Option<cache::CacheOutcome>,
    /// How long reading and compiling (or deserializing) took.
    pub elapsed: std::time::Duration,
}

impl CompiledPlugin {
    /// Reads and compiles `NAME.wasm`, through `cache` when there is one.
    ///
    /// # Errors
    /// The file cannot be read, is not a component this host can compile,
    /// imports what the runtime does not grant, or does not speak a
    /// compatible `modelcache:policy`.
    pub fn load(runtime: &Runtime, cache: Option<&CompiledCache>, wasm_path: &Path) -> Result<CompiledPlugin, PluginError> {
        let name = plugin_name(wasm_path);
        let started = Instant::now();
        let wasm = std::fs::read(wasm_path).map_err(|source| PluginError::Read {
            plugin: name.clone(),
            path: wasm_path.to_owned(),
            source,
        })?;
        let sha256 = hex::encode(Sha256::digest(&wasm));
        let compiled = match cache {
            Some(cache) => {
                cache.load_or_compile(runtime.engine(), &wasm, &sha256).map(|(component, outcome)| (component, Some(outcome)))
            }
            None => Component::new(runtime.engine(), &wasm).map(|component| (component, None)),
        };
        let (component, outcome) =
            compiled.map_err(|error| PluginError::Compile { plugin: name.clone(), source: error.into() })?;
        let elapsed = started.elapsed();
        tracing::debug!(plugin = %name, elapsed_ms = elapsed.as_millis() as u64, cache = ?outcome, "component ready");
        if let Some(import) = runtime.forbidden_import(&component) {
            return Err(PluginError::ForbiddenImport { plugin: name, hint: import_hint(&import), import });
        }
        let (policy_version, exported) = exported_decisions(&name, &runtime.export_names(&component))?;
        Ok(CompiledPlugin {
            name,
            path: wasm_path.to_owned(),
            sha256,
            component,
            policy_version,
            exported,
            cache: outcome,
            elapsed,
        })
    }
}

impl Plugin {
    /// Loads `NAME.wasm` with the configuration `config`.
    ///
    /// # Errors
    /// A [`PluginError`] naming the plugin and why it was refused.
    pub fn load(
        runtime: &Arc<Runtime>,
        cache: Option<&CompiledCache>,
        wasm_path: &Path,
        config: PluginConfig,
    ) -> Result<Plugin, PluginError> {
        Plugin::new(runtime, &CompiledPlugin::load(runtime, cache, wasm_path)?, config)
    }

    /// The plugin `compiled` under `config`: its imports, version and exports
    /// checked, its settings validated.
    ///
    /// # Errors
    /// A [`PluginError`] naming the plugin and why it was refused.
    pub fn new(runtime: &Arc<Runtime>, compiled: &CompiledPlugin, config: PluginConfig) -> Result<Plugin, PluginError> {
        let CompiledPlugin { name, path, sha256, component, policy_version, exported, .. } = compiled.clone();
        let served = match &config.decisions {
            Some(wanted) => {
                if let Some(&missing) = wanted.iter().find(|decision| !exported.contains(decision)) {
                    return Err(PluginError::DecisionNotExported { plugin: name, decision: missing });
                }
                wanted.clone()
            }
            None => exported,
        };

        let package = Package::of(&policy_version).expect("a loaded component's version is served");
        let mismatch = |interface: &str, error: wasmtime::Error| PluginError::Mismatch {
            plugin: name.clone(),
            interface: format!("{POLICY_PACKAGE}/{interface}@{policy_version}"),
            source: error.into(),
        };
        let pre = runtime.instantiate_pre(&component).map_err(|error| mismatch("imports", error))?;
        let settings = package
            .lookup(|| settings::GuestIndices::new(&pre), || v0_1::settings::GuestIndices::new(&pre))
            .map_err(|error| mismatch("settings", error))?;
        let serves = |decision| served.contains(&decision);
        let exports = Exports {
            settings,
            admission: serves(Decision::Admission)
                .then(|| admission::GuestIndices::new(&pre))
                .transpose()
                .map_err(|error| mismatch("admission", error))?,
            verify: serves(Decision::Verify)
                .then(|| verify::GuestIndices::new(&pre))
                .transpose()
                .map_err(|error| mismatch("verify", error))?,
            exclude: serves(Decision::Exclude)
                .then(|| package.lookup(|| exclude::GuestIndices::new(&pre), || v0_1::exclude::GuestIndices::new(&pre)))
                .transpose()
                .map_err(|error| mismatch("exclude", error))?,
            quota: serves(Decision::Quota)
                .then(|| package.lookup(|| quota::GuestIndices::new(&pre), || v0_1::quota::GuestIndices::new(&pre)))
                .transpose()
                .map_err(|error| mismatch("quota", error))?,
            gc: serves(Decision::Gc)
                .then(|| package.lookup(|| gc::GuestIndices::new(&pre), || v0_1::gc::GuestIndices::new(&pre)))
                .transpose()
                .map_err(|error| mismatch("gc", error))?,
        };
        let plugin = Plugin { name, path, sha256, policy_version, config, runtime: runtime.clone(), pre, exports };
        plugin.validate_settings()?;
        Ok(plugin)
    }

    fn validate_settings(&self) -> Result<(), PluginError> {
        let settings = &self.config.settings_json;
        let answer = self.call("validate-settings", |store, instance| match &self.exports.settings {
            Versioned::Current(indices) => indices.load(&mut *store, instance)?.call_validate_settings(&mut *store, settings),
            Versioned::Legacy(indices) => indices.load(&mut *store, instance)?.call_validate_settings(&mut *store, settings),
        });
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(PluginError::SettingsRejected { plugin: self.name.clone(), reason }),
            Err(cause) => Err(PluginError::SettingsFailed { plugin: self.name.clone(), cause }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sha256 of the `.wasm` this plugin was loaded from.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn config(&self) -> &PluginConfig {
        &self.config
    }

    /// The `modelcache:policy` version the component was built against.
    pub fn policy_version(&self) -> &str {
        &self.policy_version
    }

    /// The decisions this plugin serves, in [`Decision::ALL`] order.
    pub fn decisions(&self) -> Vec<Decision> {
        Decision::ALL.into_iter().filter(|decision| self.serves(*decision)).collect()
    }

    pub fn serves(&self, decision: Decision) -> bool {
        match decision {
            Decision::Admission => self.exports.admission.is_some(),
            Decision::Verify => self.exports.verify.is_some(),
            Decision::Exclude => self.exports.exclude.is_some(),
            Decision::Quota => self.exports.quota.is_some(),
            Decision::Gc => self.exports.gc.is_some(),
        }
    }

    pub(super) fn fail_mode(&self, decision: Decision) -> FailMode {
        self.config.fail_modes.get(decision)
    }

    /// One call, counted and timed under `label` (the decision, or
    /// `validate-settings`).
    pub(super) fn call<R>(
        &self,
        label: &'static str,
        body: impl FnOnce(&mut wasmtime::Store<CallState>, &wasmtime::component::Instance) -> wasmtime::Result<R>,
    ) -> Result<R, FailureCause> {
        let started = Instant::now();
        let outcome = self.runtime.call(&self.name, self.config.limits, &self.pre, body);
        let metrics = crate::metrics::metrics();
        metrics.plugin_calls.inc([&self.name, label]);
        metrics.plugin_seconds.observe([&self.name, label], started.elapsed());
        if let Err(cause) = &outcome {
            metrics.plugin_failures.inc([&self.name, label, cause.label()]);
        }
        outcome
    }

    pub(super) fn failure(&self, decision: Decision, cause: FailureCause) -> PluginFailure {
        let failure = PluginFailure { plugin: self.name.clone(), decision, cause };
        tracing::warn!(plugin = %self.name, %decision, cause = failure.cause.label(), fail_mode = ?self.fail_mode(decision), "{failure}");
        failure
    }
}

/// The plugin name of `dir/NAME.wasm`.
pub(super) fn plugin_name(path: &Path) -> String {
    path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// What to tell an author whose component imports `import`.
fn import_hint(import: &str) -> &'static str {
    if import.starts_with("wasi:") {
        "build without those WASI imports: Python `componentize-py ... componentize --stub-wasi`, \
         JavaScript `jco componentize ... --disable all`, Rust: do not touch files, sockets or HTTP"
    } else {
        "a policy may import only WASI clocks, random and stdio"
    }
}

/// The policy version and the decisions a component exports, from its export
/// names (`modelcache:policy/exclude@0.2.0`, …). Other exports are tolerated:
/// some toolchains add their own (componentize-py adds `init`).
fn exported_decisions(plugin: &str, exports: &[String]) -> Result<(String, Vec<Decision>), PluginError> {
    let mut version: Option<String> = None;
    let mut decisions = Vec::new();
    let mut has_settings = false;
    for export in exports {
        let Some(rest) = export.strip_prefix(POLICY_PACKAGE).and_then(|rest| rest.strip_prefix('/')) else {
            continue;
        };
        let (interface, found) = rest.split_once('@').unwrap_or((rest, ""));
        // Wasmtime resolves our lookups (`@0.2.0`, `@0.1.0`) to the plugin's
        // compatible version; one component speaks one package.
        let compatible =
            Package::of(found).is_some() && version.as_deref().is_none_or(|seen| Package::of(seen) == Package::of(found));
        if !compatible {
            return Err(PluginError::IncompatibleVersion {
                plugin: plugin.to_owned(),
                found: if found.is_empty() { "(unversioned)".to_owned() } else { found.to_owned() },
            });
        }
        version = Some(found.to_owned());
        match interface {
            "settings" => has_settings = true,
            other => decisions.extend(other.parse::<Decision>()),
        }
    }
    if decisions.is_empty() {
        return Err(PluginError::NoDecision { plugin: plugin.to_owned() });
    }
    if !has_settings {
        return Err(PluginError::NoSettings { plugin: plugin.to_owned() });
    }
    decisions.sort();
    Ok((version.unwrap_or_default(), decisions))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(exports: &[&str]) -> Vec<String> {
        exports.iter().map(|name| name.to_string()).collect()
    }

    /// Decisions and version come from the export names; extra exports such
    /// as componentize-py's `init` are tolerated.
    #[test]
    fn exported_decisions_are_read_from_export_names() {
        let (version, decisions) = exported_decisions(
            "p",
            &names(&["modelcache:policy/settings@0.1.0", "modelcache:policy/gc@0.1.0", "exports", "init"]),
        )
        .unwrap();
        assert_eq!(version, "0.1.0");
        assert_eq!(decisions, [Decision::Gc]);
        let (_, decisions) = exported_decisions(
            "p",
            &names(&["modelcache:policy/quota@0.1.3", "modelcache:policy/settings@0.1.3", "modelcache:policy/exclude@0.1.3"]),
        )
        .unwrap();
        assert_eq!(decisions, [Decision::Exclude, Decision::Quota]);
    }

    /// Another major (or 0.x minor) version is refused naming the versions
    /// the host serves; 0.1 and 0.2 are both served, but not mixed in one
    /// component.
    #[test]
    fn incompatible_versions_are_named() {
        for found in ["1.0.0", "0.3.0", "9.0.0", "0.0.1"] {
            let error = exported_decisions("odd", &names(&[&format!("modelcache:policy/exclude@{found}")])).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(found) && message.contains(POLICY_VERSION) && message.contains(LEGACY_POLICY_VERSION),
                "{message}"
            );
        }
        for served in ["0.1.0", "0.2.0", "0.2.7"] {
            let exports = [format!("modelcache:policy/settings@{served}"), format!("modelcache:policy/quota@{served}")];
            assert_eq!(exported_decisions("p", &exports).unwrap().0, served);
        }
        let mixed = names(&["modelcache:policy/settings@0.1.0", "modelcache:policy/quota@0.2.0"]);
        assert!(matches!(exported_decisions("p", &mixed), Err(PluginError::IncompatibleVersion { .. })));
    }

    /// A component without any decision, or without settings, is refused.
    #[test]
    fn decisions_and_settings_are_required() {
        assert!(matches!(
            exported_decisions("p", &names(&["modelcache:policy/settings@0.1.0"])),
            Err(PluginError::NoDecision { .. })
        ));
        assert!(matches!(
            exported_decisions("p", &names(&["modelcache:policy/quota@0.1.0"])),
            Err(PluginError::NoSettings { .. })
        ));
    }
}
