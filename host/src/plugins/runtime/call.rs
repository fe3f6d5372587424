//! One call's sandbox: a fresh store and instance, a wall-clock deadline,
//! a memory cap, the guest's output logged; and what a failed call is
//! reported as ([`FailureCause`]).

use std::time::Instant;

use wasmtime::component::{Instance, InstancePre, ResourceTable};
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::output::LogPipe;
use super::{Runtime, TICK};
use crate::plugins::config::Limits;
use crate::plugins::deadline::{DeadlineIo, DeadlinePassed};
use crate::plugins::error::FailureCause;

/// The most random bytes one WASI call may ask for: the host makes them
/// outside the memory cap and the epoch deadline (wasmtime's default is 64 MiB).
const RANDOM_CAP: u64 = 1 << 20;

impl Runtime {
    /// Runs `body` against a fresh instance of `pre`, within `limits`. Output
    /// the guest wrote is logged under `plugin`, whatever the outcome.
    pub(in crate::plugins) fn call<R>(
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

/// What one call's store holds.
pub(in crate::plugins) struct CallState {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
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

impl CallState {
    pub(super) fn io(&mut self) -> DeadlineIo<'_> {
        DeadlineIo { table: &mut self.table, deadline: self.deadline }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

    use super::*;

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
}
