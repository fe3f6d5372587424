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

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::{Component, HasData, Instance, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::config::{Limits, MAX_MEMORY_BYTES};
use super::deadline::{DeadlineIo, DeadlinePassed, HasDeadlineIo};
use super::error::{BoxError, FailureCause};

/// How often the epoch advances; deadlines are rounded up to whole ticks.
const TICK: Duration = Duration::from_millis(5);
/// Output kept per stream per call; the rest is dropped (and said so).
const OUTPUT_CAP: usize = 64 << 10;
/// The most random bytes one WASI call may ask for: the host makes them
/// outside the memory cap and the epoch deadline (wasmtime's default is 64 MiB).
const RANDOM_CAP: u64 = 1 << 20;

/// The WASI interfaces a policy may import, by name without version.
const GRANTED_IMPORTS: &[&str] = &[
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    // Types only; nothing to link.
    "modelcache:policy/types",
];

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

    /// Runs `body` against a fresh instance of `pre`, within `limits`. Output
    /// the guest wrote is logged under `plugin`, whatever the outcome.
    pub(super) fn call<R>(
        &self,
        plugin: &str,
        limits: Limits,
        pre: &InstancePre<CallState>,
        body: impl FnOnce(&mut Store<CallState>, &Instance) -> wasmtime::Result<R>,
    ) -> Result<R, FailureCause> {
        let stdout = LogPipe::default();
        let stderr = LogPipe::default();
        let wasi = WasiCtxBuilder::new().stdout(stdout.clone()).stderr(stderr.clone()).max_random_size(RANDOM_CAP).build();
        let state = CallState {
            wasi,
            table: ResourceTable::new(),
            deadline: Instant::now() + limits.timeout,
            limiter: MemoryLimiter { cap: limits.memory_bytes as usize, total: 0, exceeded: false },
        };
        let _ticking = self.ticker.busy();
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(limits.timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64);
        store.epoch_deadline_trap();

        let outcome = pre.instantiate(&mut store).and_then(|instance| body(&mut store, &instance));
        stdout.log(plugin, "stdout");
        stderr.log(plugin, "stderr");
        outcome.map_err(|error| classify(&error, &store.data().limiter, limits))
    }
}

fn classify(error: &wasmtime::Error, limiter: &MemoryLimiter, limits: Limits) -> FailureCause {
    if error.downcast_ref::<DeadlinePassed>().is_some() {
        return FailureCause::Timeout(limits.timeout);
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => FailureCause::Timeout(limits.timeout),
        _ if limiter.exceeded => FailureCause::OutOfMemory(limits.memory_bytes),
        Some(trap) => {
            // The guest's own words when it left any; wasmtime repeats the trap otherwise.
            let root = root_message(error);
            FailureCause::Trap(if root == trap.to_string() { root } else { format!("{trap}: {root}") })
        }
        None => FailureCause::Instantiate(format!("{error:#}")),
    }
}

/// The innermost message of an error chain (the guest's own words, when it
/// left any), without wasmtime's backtrace lines.
fn root_message(error: &wasmtime::Error) -> String {
    let mut message = error.to_string();
    let mut source = (**error).source();
    while let Some(next) = source {
        message = next.to_string();
        source = next.source();
    }
    message.lines().next().unwrap_or_default().to_owned()
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

/// Advances the epoch every [`TICK`] while calls run, and sleeps otherwise:
/// an idle daemon on every node should not wake 200 times a second.
struct Ticker {
    /// Calls under way.
    calls: Mutex<usize>,
    wake: Condvar,
}

/// One call under way; the ticker runs while any is alive.
struct Busy<'a>(&'a Ticker);

impl Ticker {
    /// Starts the ticker's thread; it ends once `tick` returns false (the
    /// engine is gone), noticed within a second even when idle.
    fn start(tick: impl Fn() -> bool + Send + 'static) -> Arc<Ticker> {
        let ticker = Arc::new(Ticker { calls: Mutex::new(0), wake: Condvar::new() });
        let shared = ticker.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                // A dedicated OS thread: a guest that never yields must not be
                // able to starve the clock that interrupts it.
                loop {
                    let calls = shared.lock();
                    let (calls, idle) = shared
                        .wake
                        .wait_timeout_while(calls, Duration::from_secs(1), |calls| *calls == 0)
                        .unwrap_or_else(|poison| poison.into_inner());
                    drop(calls);
                    if !tick() {
                        return;
                    }
                    if !idle.timed_out() {
                        std::thread::sleep(TICK);
                    }
                }
            })
            .expect("spawning the epoch thread");
        ticker
    }

    fn lock(&self) -> MutexGuard<'_, usize> {
        self.calls.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn busy(&self) -> Busy<'_> {
        *self.lock() += 1;
        self.wake.notify_one();
        Busy(self)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
    }
}

/// What one call's store holds.
pub(super) struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// When the call must have ended; WASI waits give up then.
    deadline: Instant,
    limiter: MemoryLimiter,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Caps the instance's memories together (a component may have several),
/// and remembers that it refused, so the failure is reported as out of memory.
struct MemoryLimiter {
    cap: usize,
    total: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.total - current.min(self.total) + desired;
        if total > self.cap {
            self.exceeded = true;
            return Ok(false);
        }
        self.total = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

struct HasTable;

impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

impl CallState {
    fn io(&mut self) -> DeadlineIo<'_> {
        DeadlineIo { table: &mut self.table, deadline: self.deadline }
    }
}

/// Links exactly the granted interfaces (see [`GRANTED_IMPORTS`]).
fn add_granted_wasi(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::p2::bindings::sync::io as sync_io;
    use wasmtime_wasi::p2::bindings::{cli, clocks, random};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

    wasmtime_wasi::p2::bindings::io::error::add_to_linker::<CallState, HasTable>(linker, |state| &mut state.table)?;
    sync_io::poll::add_to_linker::<CallState, HasDeadlineIo>(linker, CallState::io)?;
    sync_io::streams::add_to_linker::<CallState, HasDeadlineIo>(linker, CallState::io)?;
    clocks::wall_clock::add_to_linker::<CallState, WasiClocks>(linker, CallState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<CallState, WasiClocks>(linker, CallState::clocks)?;
    random::random::add_to_linker::<CallState, WasiRandom>(linker, CallState::random)?;
    random::insecure::add_to_linker::<CallState, WasiRandom>(linker, CallState::random)?;
    random::insecure_seed::add_to_linker::<CallState, WasiRandom>(linker, CallState::random)?;
    cli::exit::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::environment::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::stdin::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::stdout::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::stderr::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_input::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_output::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_stdin::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_stdout::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    cli::terminal_stderr::add_to_linker::<CallState, WasiCli>(linker, CallState::cli)?;
    Ok(())
}

/// A guest's stdout or stderr: kept in memory during the call (up to
/// [`OUTPUT_CAP`]), then logged line by line under the plugin's name. Writes
/// past the cap are dropped, never refused, so a chatty policy cannot fail
/// because of its logging.
#[derive(Clone, Default)]
struct LogPipe {
    buffer: Arc<Mutex<LogBuffer>>,
}

#[derive(Default)]
struct LogBuffer {
    bytes: Vec<u8>,
    dropped: usize,
}

impl LogPipe {
    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|poison| poison.into_inner());
        let room = OUTPUT_CAP.saturating_sub(buffer.bytes.len());
        let kept = bytes.len().min(room);
        buffer.bytes.extend_from_slice(&bytes[..kept]);
        buffer.dropped += bytes.len() - kept;
    }

    fn log(&self, plugin: &str, stream: &str) {
        let buffer = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|poison| poison.into_inner()));
        for line in String::from_utf8_lossy(&buffer.bytes).lines().filter(|line| !line.trim().is_empty()) {
            tracing::info!(target: "modelcache::plugin", plugin = %plugin, stream = %stream, "{line}");
        }
        if buffer.dropped > 0 {
            tracing::warn!(target: "modelcache::plugin", plugin = %plugin, stream = %stream, dropped = buffer.dropped, "output past {OUTPUT_CAP} bytes dropped");
        }
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(OUTPUT_CAP)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use wasmtime_wasi::p2::StreamError;

    /// A pollable that is never ready, and an output stream that never has room.
    struct Stuck;

    /// A pollable that is always ready.
    struct Ready;

    #[wasmtime_wasi::async_trait]
    impl Pollable for Ready {
        async fn ready(&mut self) {}
    }

    #[wasmtime_wasi::async_trait]
    impl Pollable for Stuck {
        async fn ready(&mut self) {
            std::future::pending::<()>().await
        }
    }

    impl OutputStream for Stuck {
        fn write(&mut self, _bytes: Bytes) -> StreamResult<()> {
            Err(StreamError::Trap(wasmtime::format_err!("no room was offered")))
        }

        fn flush(&mut self) -> StreamResult<()> {
            Ok(())
        }

        fn check_write(&mut self) -> StreamResult<usize> {
            Ok(0)
        }
    }

    /// Every WASI wait gives up at the call's deadline with an error that
    /// is reported as the call's timeout, whatever it waits on; a wait that
    /// is ready at once still succeeds.
    #[test]
    fn wasi_waits_give_up_at_the_deadline() {
        use wasmtime::component::Resource;
        use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};

        let limits = Limits { timeout: Duration::from_millis(100), memory_bytes: 1 << 20 };
        let limiter = MemoryLimiter { cap: 1 << 20, total: 0, exceeded: false };
        let mut table = ResourceTable::new();
        let stuck = table.push(Stuck).unwrap();
        let never = wasmtime_wasi::p2::subscribe(&mut table, stuck).unwrap();
        let output: Resource<Box<dyn OutputStream>> = table.push(Box::new(Stuck) as Box<dyn OutputStream>).unwrap();
        fn borrow<T: 'static>(resource: &Resource<T>) -> Resource<T> {
            Resource::new_borrow(resource.rep())
        }

        let started = Instant::now();
        let mut io = DeadlineIo { table: &mut table, deadline: started + limits.timeout };
        let blocked = poll::HostPollable::block(&mut io, borrow(&never)).unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed >= limits.timeout && elapsed < Duration::from_secs(1), "block gave up after {elapsed:?}");
        assert_eq!(classify(&blocked, &limiter, limits), FailureCause::Timeout(limits.timeout));

        let mut io = DeadlineIo { table: &mut table, deadline: Instant::now() + limits.timeout };
        let polled = poll::Host::poll(&mut io, vec![borrow(&never), borrow(&never)]).unwrap_err();
        assert_eq!(classify(&polled, &limiter, limits), FailureCause::Timeout(limits.timeout));

        let mut io = DeadlineIo { table: &mut table, deadline: Instant::now() + limits.timeout };
        let Err(StreamError::Trap(written)) =
            streams::HostOutputStream::blocking_write_and_flush(&mut io, borrow(&output), vec![1])
        else {
            panic!("a blocking write to a stream without room must give up at the deadline")
        };
        assert_eq!(classify(&written, &limiter, limits), FailureCause::Timeout(limits.timeout));

        // Past the deadline, a pollable that is ready at once is still reported ready.
        let past = table.push(Ready).unwrap();
        let past = wasmtime_wasi::p2::subscribe(&mut table, past).unwrap();
        let mut io = DeadlineIo { table: &mut table, deadline: Instant::now() - Duration::from_millis(1) };
        assert_eq!(poll::Host::poll(&mut io, vec![borrow(&never), borrow(&past)]).unwrap(), [1]);
    }

    /// The epoch moves while a call runs and stands still between calls, and
    /// the thread ends with the engine.
    #[test]
    fn the_ticker_ticks_only_while_calls_run() {
        let ticks = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let ticker = {
            let (ticks, alive) = (ticks.clone(), alive.clone());
            Ticker::start(move || {
                ticks.fetch_add(1, Ordering::SeqCst);
                alive.load(Ordering::SeqCst)
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ticks.load(Ordering::SeqCst), 0, "ticked while idle");

        let busy = ticker.busy();
        std::thread::sleep(Duration::from_millis(100));
        drop(busy);
        let during = ticks.load(Ordering::SeqCst);
        assert!(during >= 5, "only {during} ticks in 100 ms of a call");

        std::thread::sleep(Duration::from_millis(20));
        let settled = ticks.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ticks.load(Ordering::SeqCst), settled, "kept ticking after the call");

        alive.store(false, Ordering::SeqCst);
        let _busy = ticker.busy();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while Arc::strong_count(&ticker) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(Arc::strong_count(&ticker), 1, "the thread outlived its engine");
    }
}
