//! The wasm engine every plugin runs on, and one call's sandbox.
//!
//! One `wasmtime::Engine` for the process, with the pooling allocator where
//! the address space can be reserved (instantiation then costs microseconds)
//! and on-demand allocation otherwise. Each call gets a fresh store and
//! instance from the plugin's pre-instantiated component, a wall-clock
//! deadline and a memory cap. The deadline holds for any guest code: epoch
//! interruption stops running wasm, and every WASI call that can wait
//! (`wasi:io/poll`, the blocking stream calls) gives up at the deadline, so a
//! guest asleep in the host is stopped as surely as one spinning in wasm.
//!
//! WASI is deny-all: the linker holds only clocks, random, `wasi:io` and
//! `wasi:cli` stdio/environment/exit/terminal interfaces. The context grants
//! no preopened directories, no environment variables, no arguments and an
//! empty stdin; stdout and stderr are captured and logged under the plugin's
//! name. A component importing anything else (filesystem, sockets, http) is
//! refused at load, before it could be linked.
//!
//! | module | concern |
//! |---|---|
//! | `call` | one call: its store, deadline, memory cap, and how a failure is classified |
//! | `wasi` | the deny-all WASI: what a policy may import, and the linking of exactly that |
//! | `ticker` | the epoch ticker, running only while calls run |
//! | `output` | a guest's stdout and stderr, capped and logged |
//!
//! This file holds the [`Runtime`]: the engine, its configuration and the
//! checks of a component against what the runtime grants.

mod call;
mod output;
mod ticker;
mod wasi;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub(in crate::plugins) use self::call::CallState;
use self::ticker::Ticker;
use self::wasi::{GRANTED_IMPORTS, add_granted_wasi};
use super::config::MAX_MEMORY_BYTES;
use super::error::BoxError;

/// How often the epoch advances; deadlines are rounded up to whole ticks.
const TICK: Duration = Duration::from_millis(5);

/// Which instance allocator the engine ended up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allocation {
    Pooling,
    OnDemand,
}

/// How to build the runtime.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeOptions {
    /// Try the pooling allocator first (falls back when it cannot reserve).
    pub pooling: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions { pooling: true }
    }
}

/// The engine, the deny-all linker and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    allocation: Allocation,
    ticker: Arc<Ticker>,
}

impl Runtime {
    /// Builds the engine (pooling when asked and possible) and starts the
    /// ticker thread, which ends when the engine is dropped.
    ///
    /// # Errors
    /// When no engine can be built at all.
    pub fn new(options: RuntimeOptions) -> Result<Arc<Runtime>, BoxError> {
        let (engine, allocation) = if options.pooling {
            match Engine::new(&engine_config(Some(pooling_config()))) {
                Ok(engine) => (engine, Allocation::Pooling),
                Err(error) => {
                    tracing::warn!("pooling allocator unavailable ({error}); using on-demand allocation");
                    (Engine::new(&engine_config(None))?, Allocation::OnDemand)
                }
            }
        } else {
            (Engine::new(&engine_config(None))?, Allocation::OnDemand)
        };
        tracing::info!(allocation = ?allocation, "plugin runtime ready");
        let mut linker = Linker::new(&engine);
        add_granted_wasi(&mut linker)?;
        let weak = engine.weak();
        let ticker = Ticker::start(move || weak.upgrade().map(|engine| engine.increment_epoch()).is_some());
        Ok(Arc::new(Runtime { engine, linker, allocation, ticker }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn allocation(&self) -> Allocation {
        self.allocation
    }

    /// The first import of `component` that the runtime does not grant.
    pub fn forbidden_import(&self, component: &Component) -> Option<String> {
        component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name)
            .find(|name| {
                let unversioned = name.split('@').next().unwrap_or(name);
                !GRANTED_IMPORTS.contains(&unversioned)
            })
            .map(str::to_owned)
    }

    /// The names the component exports.
    pub fn export_names(&self, component: &Component) -> Vec<String> {
        component.component_type().exports(&self.engine).map(|(name, _)| name.to_owned()).collect()
    }

    pub(super) fn instantiate_pre(&self, component: &Component) -> wasmtime::Result<InstancePre<CallState>> {
        self.linker.instantiate_pre(component)
    }
}

fn engine_config(pooling: Option<PoolingAllocationConfig>) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // For profiling policies with `perf`: names the JIT code in /tmp/perf-PID.map.
    if std::env::var_os("MODELCACHE_WASM_PERFMAP").is_some_and(|value| value == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if let Some(pooling) = pooling {
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    }
    config
}

/// Sized for a few dozen concurrent calls of components as large as a
/// componentize-py one (CPython in wasm has several core instances, memories
/// and a large function table).
fn pooling_config() -> PoolingAllocationConfig {
    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_component_instances(64)
        .total_core_instances(640)
        .total_memories(128)
        .total_tables(256)
        .total_stacks(64)
        .max_core_instances_per_component(64)
        .max_memories_per_component(4)
        .max_tables_per_component(8)
        .max_memory_size(MAX_MEMORY_BYTES as usize)
        .table_elements(50_000)
        .max_core_instance_size(1 << 20)
        .max_component_instance_size(1 << 20)
        // A fresh instance per call: reset a small policy's memory with
        // memset instead of madvise, so calls neither fault pages back in
        // nor shoot down TLBs; batch what still needs decommitting.
        .linear_memory_keep_resident(4 << 20)
        .table_keep_resident(256 << 10)
        .decommit_batch_size(32)
        .pagemap_scan(wasmtime::Enabled::Auto);
    pooling
}
