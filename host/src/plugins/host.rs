//! The [`PluginHost`]: the plugin set serving now, reloaded from its
//! directory and swapped in whole.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{CompiledCache, PluginSet, Runtime};

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
