//! The epoch ticker: wasmtime's epoch advanced every [`TICK`] while
//! calls run, so the deadline interrupts running wasm.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::TICK;

/// Advances the epoch every [`TICK`] while calls run, and sleeps otherwise:
/// an idle daemon on every node should not wake 200 times a second.
pub(super) struct Ticker {
    /// Calls under way.
    calls: Mutex<usize>,
    wake: Condvar,
}

/// One call under way; the ticker runs while any is alive.
pub(super) struct Busy<'a>(&'a Ticker);

impl Ticker {
    /// Starts the ticker's thread; it ends once `tick` returns false (the
    /// engine is gone), noticed within a second even when idle.
    pub(super) fn start(tick: impl Fn() -> bool + Send + 'static) -> Arc<Ticker> {
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

    pub(super) fn busy(&self) -> Busy<'_> {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

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
