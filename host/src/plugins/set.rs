//! The plugins of a directory: found, loaded (a refused new version
//! leaving its previous one serving) and kept in call order as one
//! [`PluginSet`], with a [`PluginStatus`] for each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::plugin::plugin_name;
use super::{CompiledCache, Decision, Plugin, PluginConfig, PluginError, Runtime, error_chain};

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
#[derive(Debug)]
pub struct PluginSet {
    /// Which set this is: see [`PluginSet::generation`].
    generation: u64,
    plugins: Vec<Arc<Plugin>>,
    statuses: Vec<PluginStatus>,
}

/// The generation the last set made got: each new set (each load of a
/// directory) takes the next.
static LAST_GENERATION: AtomicU64 = AtomicU64::new(0);

impl Default for PluginSet {
    fn default() -> Self {
        PluginSet::new(Vec::new())
    }
}

impl PluginSet {
    /// A set of the given plugins (sorted into call order), with a
    /// generation of its own.
    pub fn new(mut plugins: Vec<Arc<Plugin>>) -> PluginSet {
        plugins.sort_by(|a, b| (a.config.order, &a.name).cmp(&(b.config.order, &b.name)));
        let statuses = plugins.iter().map(|plugin| PluginStatus::loaded(plugin, None)).collect();
        let generation = LAST_GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
        PluginSet { generation, plugins, statuses }
    }

    /// The set's generation: no two sets of the process share one, and a
    /// later load has a higher one. What a set decided is remembered, and
    /// a decision in progress joined, by it: after a reload, answers of the
    /// previous set are never taken for the new one's.
    pub fn generation(&self) -> u64 {
        self.generation
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every set made, empty or loaded, has a generation of its own, and a
    /// later one a higher one.
    #[test]
    fn each_set_has_its_own_generation() {
        let first = PluginSet::default();
        let second = PluginSet::new(Vec::new());
        assert!(second.generation() > first.generation());
        assert_ne!(PluginSet::default().generation(), second.generation());
    }
}
