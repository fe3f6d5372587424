//! Policy plugins: WebAssembly components that make the per-deployment
//! decisions (which files to skip, whether a pull fits, what GC may evict).
//!
//! A plugin directory holds `NAME.wasm` and an optional `NAME.toml` (see
//! [`config`]). Loading a plugin compiles it (through the on-disk
//! [`cache`]), checks that it speaks a compatible `modelcache:policy`
//! version, exports at least one decision, imports only what the
//! [`runtime`] grants, and that its settings validate. A plugin that fails
//! any of this is refused with the reason; the others load.
//!
//! [`PluginHost`] owns the current [`PluginSet`] and swaps it whole on
//! [`PluginHost::reload`]. Each decision module ([`exclude`], [`quota`],
//! [`gc`]) holds the decision's input and output types, the composition of
//! several plugins and the built-in default used when no plugin serves it.

pub mod bindings;
pub mod cache;
pub mod cases;
pub mod config;
mod deadline;
pub mod error;
pub mod exclude;
pub mod gc;
pub mod quota;
pub mod runtime;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, InstancePre};

use self::bindings::{exclude as exclude_wit, gc as gc_wit, quota as quota_wit, settings as settings_wit};
pub use self::cache::CompiledCache;
pub use self::config::{FailMode, Limits, PluginConfig};
pub use self::error::{FailureCause, PluginError, PluginFailure};
use self::runtime::CallState;
pub use self::runtime::{Allocation, Runtime, RuntimeOptions};

/// The version of the WIT package this host speaks.
pub const POLICY_VERSION: &str = "0.1.0";
const POLICY_PACKAGE: &str = "modelcache:policy";

/// The decisions a plugin can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Exclude,
    Quota,
    Gc,
}

impl Decision {
    pub const ALL: [Decision; 3] = [Decision::Exclude, Decision::Quota, Decision::Gc];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Exclude => "exclude",
            Decision::Quota => "quota",
            Decision::Gc => "gc",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Decision {
    type Err = String;

    fn from_str(text: &str) -> Result<Decision, String> {
        Decision::ALL
            .into_iter()
            .find(|decision| decision.as_str() == text)
            .ok_or_else(|| format!("unknown decision `{text}` (expected exclude, quota or gc)"))
    }
}

/// The export lookups of the decisions a plugin serves.
struct Exports {
    settings: settings_wit::GuestIndices,
    exclude: Option<exclude_wit::GuestIndices>,
    quota: Option<quota_wit::GuestIndices>,
    gc: Option<gc_wit::GuestIndices>,
}

/// A loaded plugin, ready to be called.
pub struct Plugin {
    name: String,
    path: PathBuf,
    sha256: String,
    policy_version: String,
    config: PluginConfig,
    runtime: Arc<Runtime>,
    pre: InstancePre<CallState>,
    exports: Exports,
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

        let mismatch = |interface: &str, error: wasmtime::Error| PluginError::Mismatch {
            plugin: name.clone(),
            interface: format!("{POLICY_PACKAGE}/{interface}"),
            source: error.into(),
        };
        let pre = runtime.instantiate_pre(&component).map_err(|error| mismatch("imports", error))?;
        let settings = settings_wit::GuestIndices::new(&pre).map_err(|error| mismatch("settings", error))?;
        let serves = |decision| served.contains(&decision);
        let exports = Exports {
            settings,
            exclude: serves(Decision::Exclude)
                .then(|| exclude_wit::GuestIndices::new(&pre))
                .transpose()
                .map_err(|error| mismatch("exclude", error))?,
            quota: serves(Decision::Quota)
                .then(|| quota_wit::GuestIndices::new(&pre))
                .transpose()
                .map_err(|error| mismatch("quota", error))?,
            gc: serves(Decision::Gc)
                .then(|| gc_wit::GuestIndices::new(&pre))
                .transpose()
                .map_err(|error| mismatch("gc", error))?,
        };
        let plugin = Plugin { name, path, sha256, policy_version, config, runtime: runtime.clone(), pre, exports };
        plugin.validate_settings()?;
        Ok(plugin)
    }

    fn validate_settings(&self) -> Result<(), PluginError> {
        let answer = self.call("validate-settings", |store, instance| {
            let guest = self.exports.settings.load(&mut *store, instance)?;
            guest.call_validate_settings(&mut *store, &self.config.settings_json)
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
            Decision::Exclude => self.exports.exclude.is_some(),
            Decision::Quota => self.exports.quota.is_some(),
            Decision::Gc => self.exports.gc.is_some(),
        }
    }

    fn fail_mode(&self, decision: Decision) -> FailMode {
        self.config.fail_modes.get(decision)
    }

    /// One call, counted and timed under `label` (the decision, or
    /// `validate-settings`).
    fn call<R>(
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

    fn failure(&self, decision: Decision, cause: FailureCause) -> PluginFailure {
        let failure = PluginFailure { plugin: self.name.clone(), decision, cause };
        tracing::warn!(plugin = %self.name, %decision, cause = failure.cause.label(), fail_mode = ?self.fail_mode(decision), "{failure}");
        failure
    }
}

/// The plugin name of `dir/NAME.wasm`.
fn plugin_name(path: &Path) -> String {
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
/// names (`modelcache:policy/exclude@0.1.0`, …). Other exports are tolerated:
/// some toolchains add their own (componentize-py adds `init`).
fn exported_decisions(plugin: &str, exports: &[String]) -> Result<(String, Vec<Decision>), PluginError> {
    let host = semver::Version::parse(POLICY_VERSION).expect("POLICY_VERSION is semver");
    let mut version = None;
    let mut decisions = Vec::new();
    let mut has_settings = false;
    for export in exports {
        let Some(rest) = export.strip_prefix(POLICY_PACKAGE).and_then(|rest| rest.strip_prefix('/')) else {
            continue;
        };
        let (interface, found) = rest.split_once('@').unwrap_or((rest, ""));
        // Component-model semver: the same major, or for 0.x the same minor;
        // wasmtime then resolves our `@0.1.0` lookups to the plugin's version.
        let compatible = semver::Version::parse(found)
            .is_ok_and(|found| found.major == host.major && (host.major > 0 || found.minor == host.minor));
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

/// The names an answer may mention (file paths, entry keys), kept as 64-bit
/// hashes: cheap to build and probe even for 100,000 long keys, and free of
/// borrows on the request. A forged name that collides is still only a name
/// the caller then fails to find.
pub(crate) struct KnownNames(std::collections::HashSet<u64>);

impl KnownNames {
    fn hash(name: &str) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6d63).hash_one(name)
    }

    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> KnownNames {
        KnownNames(names.into_iter().map(KnownNames::hash).collect())
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains(&KnownNames::hash(name))
    }
}

/// How one plugin of a directory stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PluginStatus {
    pub name: String,
    pub path: PathBuf,
    /// Whether a version of the plugin is serving.
    pub loaded: bool,
    /// The decisions the serving version serves.
    pub decisions: Vec<Decision>,
    /// The sha256 of the serving `.wasm`.
    pub sha256: Option<String>,
    /// The `modelcache:policy` version the serving version was built against.
    pub policy_version: Option<String>,
    pub order: Option<i32>,
    /// Why the plugin (or its newest version) was refused.
    pub error: Option<String>,
}

impl PluginStatus {
    fn loaded(plugin: &Plugin, error: Option<String>) -> PluginStatus {
        PluginStatus {
            name: plugin.name.clone(),
            path: plugin.path.clone(),
            loaded: true,
            decisions: plugin.decisions(),
            sha256: Some(plugin.sha256.clone()),
            policy_version: Some(plugin.policy_version.clone()),
            order: Some(plugin.config.order),
            error,
        }
    }

    fn refused(name: String, path: PathBuf, error: String) -> PluginStatus {
        PluginStatus {
            name,
            path,
            loaded: false,
            decisions: Vec::new(),
            sha256: None,
            policy_version: None,
            order: None,
            error: Some(error),
        }
    }
}

/// The plugins serving at one moment, in call order (by `order`, then name).
#[derive(Debug, Default)]
pub struct PluginSet {
    plugins: Vec<Arc<Plugin>>,
    statuses: Vec<PluginStatus>,
}

impl PluginSet {
    /// A set of the given plugins (sorted into call order).
    pub fn new(mut plugins: Vec<Arc<Plugin>>) -> PluginSet {
        plugins.sort_by(|a, b| (a.config.order, &a.name).cmp(&(b.config.order, &b.name)));
        let statuses = plugins.iter().map(|plugin| PluginStatus::loaded(plugin, None)).collect();
        PluginSet { plugins, statuses }
    }

    /// Loads every `NAME.wasm` of `dir`. `previous` is the set serving so far:
    /// a plugin whose new version is refused keeps its previous version
    /// serving, and its status carries the new version's error.
    pub fn load_dir(runtime: &Arc<Runtime>, cache: Option<&CompiledCache>, dir: &Path, previous: &PluginSet) -> PluginSet {
        let mut plugins = Vec::new();
        let mut statuses = Vec::new();
        for (name, wasm_path) in plugin_files(dir, &mut statuses) {
            let config_path = wasm_path.with_extension("toml");
            let loaded = PluginConfig::load(&config_path)
                .map_err(|reason| PluginError::Config { plugin: name.clone(), path: config_path.clone(), reason })
                .and_then(|config| Plugin::load(runtime, cache, &wasm_path, config));
            match loaded {
                Ok(plugin) => {
                    tracing::info!(plugin = %name, sha256 = %plugin.sha256, decisions = ?plugin.decisions(), "plugin loaded");
                    statuses.push(PluginStatus::loaded(&plugin, None));
                    plugins.push(Arc::new(plugin));
                }
                Err(error) => {
                    let message = error_chain(&error);
                    match previous.plugins.iter().find(|plugin| plugin.name == name) {
                        Some(serving) => {
                            tracing::error!(plugin = %name, "new version refused, previous version keeps serving: {message}");
                            statuses.push(PluginStatus::loaded(serving, Some(message)));
                            plugins.push(serving.clone());
                        }
                        None => {
                            tracing::error!(plugin = %name, "plugin refused: {message}");
                            statuses.push(PluginStatus::refused(name, wasm_path, message));
                        }
                    }
                }
            }
        }
        let mut set = PluginSet::new(plugins);
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        set.statuses = statuses;
        set
    }

    /// Every plugin of the directory, loaded or refused, by name.
    pub fn statuses(&self) -> &[PluginStatus] {
        &self.statuses
    }

    /// The loaded plugins in call order.
    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    /// The plugins serving `decision`, in call order.
    pub fn serving(&self, decision: Decision) -> impl Iterator<Item = &Plugin> {
        self.plugins.iter().map(Arc::as_ref).filter(move |plugin| plugin.serves(decision))
    }
}

/// The `NAME.wasm` files of `dir`, by name; unreadable dirs and stray
/// `NAME.toml` files become statuses.
fn plugin_files(dir: &Path, statuses: &mut Vec<PluginStatus>) -> Vec<(String, PathBuf)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::error!(dir = %dir.display(), "cannot read the plugin directory: {error}");
            statuses.push(PluginStatus::refused(
                dir.display().to_string(),
                dir.to_owned(),
                format!("cannot read the plugin directory {}: {error}", dir.display()),
            ));
            return Vec::new();
        }
    };
    let mut wasm = BTreeMap::new();
    let mut configs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match path.extension().and_then(|ext| ext.to_str()) {
            Some("wasm") => {
                wasm.insert(plugin_name(&path), path);
            }
            Some("toml") => configs.push(path),
            _ => {}
        }
    }
    for config in configs {
        let name = plugin_name(&config);
        if !wasm.contains_key(&name) {
            statuses.push(PluginStatus::refused(
                name.clone(),
                config.clone(),
                format!("{} has no {name}.wasm beside it", config.display()),
            ));
        }
    }
    wasm.into_iter().collect()
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    crate::error::chain(error)
}

/// The plugins of a directory, reloadable as a whole.
pub struct PluginHost {
    runtime: Arc<Runtime>,
    cache: Option<CompiledCache>,
    dir: Option<PathBuf>,
    current: ArcSwap<PluginSet>,
    reloading: Mutex<()>,
}

impl PluginHost {
    /// A host serving the plugins of `dir` (none when `dir` is `None`: every
    /// decision then uses its built-in default).
    pub fn open(runtime: Arc<Runtime>, cache: Option<CompiledCache>, dir: Option<PathBuf>) -> PluginHost {
        let host =
            PluginHost { runtime, cache, dir, current: ArcSwap::from_pointee(PluginSet::default()), reloading: Mutex::new(()) };
        host.reload();
        host
    }

    /// The set serving now. Hold the `Arc` for one decision; a reload does
    /// not disturb calls in progress.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Loads the directory again and swaps the new set in at once. Plugins
    /// whose new version is refused keep serving their last good version.
    pub fn reload(&self) -> Arc<PluginSet> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|poison| poison.into_inner());
        let Some(dir) = &self.dir else {
            return self.current();
        };
        let previous = self.current();
        let next = Arc::new(PluginSet::load_dir(&self.runtime, self.cache.as_ref(), dir, &previous));
        self.current.store(next.clone());
        next
    }
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

    /// Another major (or 0.x minor) version is refused naming both versions.
    #[test]
    fn incompatible_versions_are_named() {
        for found in ["1.0.0", "0.2.0"] {
            let error = exported_decisions("old", &names(&[&format!("modelcache:policy/exclude@{found}")])).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(found) && message.contains(POLICY_VERSION), "{message}");
        }
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
