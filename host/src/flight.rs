//! Coalescing: concurrent requests for the same key share one piece of work.
//!
//! The work runs as its own task and belongs to no caller: a caller that
//! goes away (cancelled, timed out) only stops waiting, and the work goes on
//! for the others. When the last caller is gone the work is aborted (its
//! temporaries clean up as they drop). Every waiter gets the result, error
//! included; the next request after a finished flight starts a new one.
//!
//! Only the shared part runs here (download, unpack, build the entry). Each
//! caller does its own per-volume work (link step, record) after `wait`
//! returns, so a follower can never see "success" for a volume nobody made.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio::sync::watch;

/// The shared work panicked. Every waiter gets this as the work's error, and
/// the next caller starts afresh: a bug in one pull must not wedge its key.
#[derive(Debug, thiserror::Error)]
#[error("the shared work panicked: {0}")]
pub struct Panicked(pub String);

impl Panicked {
    fn from_payload(payload: &(dyn std::any::Any + Send)) -> Panicked {
        let message = payload
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned());
        Panicked(message)
    }
}

/// Runs `future`, turning a panic into an error.
pub async fn catch_panic<T, E: From<Panicked>>(future: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .unwrap_or_else(|payload| Err(E::from(Panicked::from_payload(payload.as_ref()))))
}

const UNKNOWN: u64 = u64::MAX;

/// Bytes done of a flight's work, readable by every waiter. A progress can
/// forward what it counts to others: a blob shared by two pulls reports
/// into both.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    forward: Mutex<Vec<Arc<Progress>>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress { done: AtomicU64::new(0), total: AtomicU64::new(UNKNOWN), forward: Mutex::new(Vec::new()) }
    }
}

impl Progress {
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The bytes the work has to fetch, once it knows.
    pub fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|total| *total != UNKNOWN)
    }

    pub fn set_total(&self, total: u64) {
        self.total.store(total.min(UNKNOWN - 1), Ordering::Relaxed);
    }

    pub fn add(&self, bytes: u64) {
        // Under the lock, so `forward_to` never counts a chunk twice.
        let forward = self.forward.lock().unwrap_or_else(|poison| poison.into_inner());
        self.done.fetch_add(bytes, Ordering::Relaxed);
        for other in forward.iter() {
            other.add(bytes);
        }
    }

    /// Takes back bytes that have to be fetched again.
    pub fn take_back(&self, bytes: u64) {
        let forward = self.forward.lock().unwrap_or_else(|poison| poison.into_inner());
        let _ = self.done.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |done| Some(done.saturating_sub(bytes)));
        for other in forward.iter() {
            other.take_back(bytes);
        }
    }

    /// Counts what this progress has done, and will do, into `other` too.
    pub fn forward_to(&self, other: &Arc<Progress>) {
        let mut forward = self.forward.lock().unwrap_or_else(|poison| poison.into_inner());
        other.add(self.done());
        forward.push(other.clone());
    }
}

type Outcome<T, E> = Option<Result<T, Arc<E>>>;

struct Flight<T, E> {
    id: u64,
    waiters: usize,
    result: watch::Receiver<Outcome<T, E>>,
    progress: Arc<Progress>,
    abort: tokio::task::AbortHandle,
}

/// The flights in progress, by key.
pub struct Flights<K, T, E> {
    inner: Arc<Mutex<Inner<K, T, E>>>,
}

struct Inner<K, T, E> {
    next_id: u64,
    flights: HashMap<K, Flight<T, E>>,
}

impl<K, T, E> Default for Flights<K, T, E> {
    fn default() -> Self {
        Flights { inner: Arc::new(Mutex::new(Inner { next_id: 0, flights: HashMap::new() })) }
    }
}

impl<K, T, E> fmt::Debug for Flights<K, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

fn lock<K, T, E>(inner: &Mutex<Inner<K, T, E>>) -> std::sync::MutexGuard<'_, Inner<K, T, E>> {
    inner.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl<K, T, E> Flights<K, T, E>
where
    K: Clone + Eq + Hash + Send + 'static,
    T: Clone + Send + Sync + 'static,
    E: From<Panicked> + Send + Sync + 'static,
{
    /// Joins the flight for `key`, starting it with `work` if there is none.
    /// Must be called within a tokio runtime.
    pub fn join<F, Fut>(&self, key: K, work: F) -> Ticket<K, T, E>
    where
        F: FnOnce(Arc<Progress>) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let mut inner = lock(&self.inner);
        if let Some(flight) = inner.flights.get_mut(&key) {
            flight.waiters += 1;
            return Ticket {
                flights: self.inner.clone(),
                key: Some(key),
                id: flight.id,
                result: flight.result.clone(),
                progress: flight.progress.clone(),
                coalesced: true,
            };
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let (sender, receiver) = watch::channel(None);
        let progress = Arc::new(Progress::default());
        let future = work(progress.clone());
        let registry = self.inner.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            let outcome = catch_panic(future).await.map_err(Arc::new);
            // Leave the map first, so a request arriving after the result
            // starts afresh instead of joining a finished flight.
            {
                let mut inner = lock(&registry);
                if inner.flights.get(&task_key).is_some_and(|flight| flight.id == id) {
                    inner.flights.remove(&task_key);
                }
            }
            let _ = sender.send(Some(outcome));
        });
        inner.flights.insert(
            key.clone(),
            Flight { id, waiters: 1, result: receiver.clone(), progress: progress.clone(), abort: task.abort_handle() },
        );
        Ticket { flights: self.inner.clone(), key: Some(key), id, result: receiver, progress, coalesced: false }
    }

    /// How many flights are in progress.
    pub fn len(&self) -> usize {
        lock(&self.inner).flights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One caller's place in a flight.
pub struct Ticket<K: Eq + Hash, T, E> {
    flights: Arc<Mutex<Inner<K, T, E>>>,
    key: Option<K>,
    id: u64,
    result: watch::Receiver<Outcome<T, E>>,
    progress: Arc<Progress>,
    coalesced: bool,
}

impl<K: Eq + Hash, T: Clone, E> Ticket<K, T, E> {
    /// Whether this caller joined work another caller started.
    pub fn coalesced(&self) -> bool {
        self.coalesced
    }

    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Waits for the shared result.
    ///
    /// # Errors
    /// The work's error, shared with every waiter.
    pub async fn wait(&mut self) -> Result<T, Arc<E>> {
        let outcome = self.result.wait_for(Option::is_some).await;
        match outcome {
            Ok(outcome) => outcome.clone().expect("waited for a result"),
            // The work was aborted: only when no caller was left, which
            // cannot be this one while it waits.
            Err(_) => unreachable!("a flight ended without a result while a caller waited"),
        }
    }
}

impl<K: Eq + Hash, T, E> Drop for Ticket<K, T, E> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut inner = lock(&self.flights);
        let Some(flight) = inner.flights.get_mut(&key) else { return };
        if flight.id != self.id {
            return;
        }
        flight.waiters -= 1;
        if flight.waiters == 0 {
            flight.abort.abort();
            inner.flights.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    type Shared = Flights<&'static str, u32, String>;

    impl From<Panicked> for String {
        fn from(panicked: Panicked) -> String {
            panicked.to_string()
        }
    }

    /// Work that panics fails every waiter with the panic's message, and
    /// leaves no dead flight behind for the next caller to join.
    #[tokio::test]
    async fn a_panic_fails_the_waiters_and_is_not_sticky() {
        let flights = Shared::default();
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let mut first = flights.join("k", move |_| async move {
            gate.await.unwrap();
            panic!("layer 3 is odd");
        });
        let mut second = flights.join("k", |_| async { Ok(2) });
        release.send(()).unwrap();
        for ticket in [&mut first, &mut second] {
            let error = ticket.wait().await.unwrap_err();
            assert_eq!(*error, "the shared work panicked: layer 3 is odd");
        }
        assert!(flights.is_empty());
        let mut again = flights.join("k", |_| async { Ok(3) });
        assert!(!again.coalesced());
        assert_eq!(again.wait().await, Ok(3));
    }

    /// Concurrent joiners share one run; each gets the result.
    #[tokio::test]
    async fn joiners_share_one_run() {
        let flights = Shared::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tickets = Vec::new();
        for _ in 0..8 {
            let runs = runs.clone();
            tickets.push(flights.join("k", move |_| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(7)
            }));
        }
        assert!(!tickets[0].coalesced() && tickets[1..].iter().all(Ticket::coalesced));
        for ticket in &mut tickets {
            assert_eq!(ticket.wait().await, Ok(7));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    /// The first caller leaving does not stop the work for the others.
    #[tokio::test]
    async fn the_starter_may_leave() {
        let flights = Shared::default();
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let first = flights.join("k", move |_| async move {
            gate.await.unwrap();
            Ok(1)
        });
        let mut second = flights.join("k", |_| async { Ok(2) });
        drop(first);
        release.send(()).unwrap();
        assert_eq!(second.wait().await, Ok(1));
    }

    /// When every caller leaves the work is aborted, and the next caller
    /// starts afresh.
    #[tokio::test]
    async fn the_last_to_leave_aborts() {
        let flights = Shared::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let guard = Guard(dropped.clone());
        let ticket = flights.join("k", move |_| async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(1)
        });
        tokio::task::yield_now().await;
        drop(ticket);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the work's state was dropped");
        assert!(flights.is_empty());
        let mut next = flights.join("k", |_| async { Ok(3) });
        assert!(!next.coalesced());
        assert_eq!(next.wait().await, Ok(3));
    }

    /// An error reaches every waiter; the next request tries again.
    #[tokio::test]
    async fn errors_wake_everyone_and_are_not_sticky() {
        let flights = Shared::default();
        let mut a = flights.join("k", |_| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Err("registry down".to_owned())
        });
        let mut b = flights.join("k", |_| async { Ok(0) });
        assert_eq!(a.wait().await.unwrap_err().as_str(), "registry down");
        assert_eq!(b.wait().await.unwrap_err().as_str(), "registry down");
        assert_eq!(flights.join("k", |_| async { Ok(5) }).wait().await, Ok(5));
    }

    /// A forwarded progress counts what was done before and after joining.
    #[test]
    fn progress_forwards() {
        let blob = Progress::default();
        blob.add(3);
        let pull = Arc::new(Progress::default());
        blob.forward_to(&pull);
        blob.add(4);
        blob.take_back(2);
        assert_eq!((blob.done(), pull.done()), (5, 5));
    }

    /// Progress is shared between the work and every waiter.
    #[tokio::test]
    async fn progress_is_shared() {
        let flights = Shared::default();
        let mut ticket = flights.join("k", |progress| async move {
            progress.set_total(10);
            progress.add(4);
            Ok(0)
        });
        ticket.wait().await.unwrap();
        assert_eq!((ticket.progress().done(), ticket.progress().total()), (4, Some(10)));
    }
}
