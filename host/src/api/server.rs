//! The API's handlers, served by axum on unix sockets.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use tokio::net::UnixListener;

use super::{
    ApiError, ErrorBody, GcBody, Health, InspectBody, MountBody, PinBody, PrefetchBody, PrefetchStatus, VolumeSocket,
    VolumeSocketBody, status_of,
};
use crate::engine::{Engine, EngineError, MountRequest};
use crate::error::ErrorKind;
use crate::gc::Trigger;
use crate::plugins::exclude::ExcludeOptions;
use crate::registry::ModelRef;
use crate::volumes::{MountId, VolumeId, VolumeState};
use modelcache_api::tenancy::Requester;

/// What a socket may touch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything: the main socket.
    Admin,
    /// One volume's mounts, and health: a socket handed into a pod. Its
    /// mounts are the requester's it was made for, and claim no other.
    Volume(VolumeId, Requester),
}

/// The longest a request may ask to wait.
const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    scope: Scope,
    sockets: Arc<VolumeSockets>,
    started: Instant,
}

/// A request refused: the error a handler answers with.
struct Refusal(ApiError);

fn refusal(kind: ErrorKind, message: String) -> Refusal {
    Refusal(ApiError { kind, message })
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (status_of(self.0.kind), Json(ErrorBody { error: self.0 })).into_response()
    }
}

impl From<EngineError> for Refusal {
    fn from(error: EngineError) -> Refusal {
        refusal(error.kind(), crate::plugins::error_chain(&error))
    }
}

impl From<crate::volumes::VolumeError> for Refusal {
    fn from(error: crate::volumes::VolumeError) -> Refusal {
        refusal(error.kind(), crate::plugins::error_chain(&error))
    }
}

impl From<crate::volumes::IdError> for Refusal {
    fn from(error: crate::volumes::IdError) -> Refusal {
        refusal(error.kind(), error.to_string())
    }
}

fn denied(what: &str) -> Refusal {
    refusal(ErrorKind::PermissionDenied, format!("this socket is bound to one volume and may not {what}"))
}

impl AppState {
    fn admin(&self, what: &str) -> Result<(), Refusal> {
        match &self.scope {
            Scope::Admin => Ok(()),
            Scope::Volume(..) => Err(denied(what)),
        }
    }

    /// Who a mount on this socket is for: as stated on the admin socket; the
    /// socket's own requester on a volume socket, which may not claim another.
    fn requester(&self, stated: Option<Requester>) -> Result<Requester, Refusal> {
        match (&self.scope, stated) {
            (Scope::Admin, stated) => Ok(stated.unwrap_or_default()),
            (Scope::Volume(_, bound), None) => Ok(bound.clone()),
            (Scope::Volume(_, bound), Some(stated)) => {
                // The volume is the daemon's to set; the rest must match.
                let same = Requester { volume: None, ..stated } == Requester { volume: None, ..bound.clone() };
                if same { Ok(bound.clone()) } else { Err(denied("speak for another requester")) }
            }
        }
    }

    /// The volume a path names. On a volume socket `_` names the socket's
    /// own volume: a pod cannot know the id kubelet gave its inline volume.
    fn volume(&self, volume: &str) -> Result<VolumeId, Refusal> {
        if let (Scope::Volume(bound, _), OWN_VOLUME) = (&self.scope, volume) {
            return Ok(bound.clone());
        }
        let volume = VolumeId::new(volume)?;
        match &self.scope {
            Scope::Volume(bound, _) if *bound != volume => Err(denied(&format!("touch volume {volume}"))),
            _ => Ok(volume),
        }
    }
}

fn wait_for(seconds: f64) -> Duration {
    // Clamped before converting: `from_secs_f64` panics past u64 seconds.
    if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds.min(MAX_WAIT.as_secs_f64()))
    } else {
        Duration::ZERO
    }
}

/// Sockets bound to single volumes, made on request. Each is
/// `DIR/<volume>/api.sock`, in a directory of its own beside `socket.json`
/// (whom it speaks for): the CSI shim bind-mounts that directory into the
/// pod, so a socket made again after a daemon restart reaches the pod where
/// the old one was, and a restarted daemon opens again every socket whose
/// `socket.json` it finds. While a socket is open its volume is held (see
/// [`Engine::hold`]). `DIR` is 0700: a pod reaches its own socket through
/// its bind mount only.
#[derive(Default)]
pub struct VolumeSockets {
    dir: PathBuf,
    served: Mutex<HashMap<VolumeId, (VolumeSocket, tokio::task::AbortHandle, Requester)>>,
}

const SOCKET_NAME: &str = "api.sock";
const SOCKET_OWNER: &str = "socket.json";
/// The volume path segment that names a volume socket's own volume.
const OWN_VOLUME: &str = "_";

impl VolumeSockets {
    pub fn new(dir: PathBuf) -> VolumeSockets {
        VolumeSockets { dir, served: Mutex::new(HashMap::new()) }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeId, (VolumeSocket, tokio::task::AbortHandle, Requester)>> {
        self.served.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Serves a socket for `volume` speaking for `requester` (the one
    /// already served, if made for the same requester). All of it under
    /// the lock of the served set: two opens of a volume never both bind.
    /// A failure leaves nothing: no hold, no files.
    fn open(&self, state: &AppState, volume: VolumeId, requester: Requester) -> Result<VolumeSocket, Refusal> {
        let mut served = self.served();
        if let Some((socket, _, bound)) = served.get(&volume) {
            if *bound != requester {
                return Err(refusal(
                    ErrorKind::Conflict,
                    format!("volume {volume} already has a socket, made for {bound}; close it first"),
                ));
            }
            return Ok(socket.clone());
        }
        let dir = self.dir.join(volume.as_str());
        let opened = (|| {
            let internal = |what: String| move |error: std::io::Error| refusal(ErrorKind::Internal, format!("{what}: {error}"));
            std::fs::create_dir_all(&self.dir).map_err(internal(format!("cannot make {}", self.dir.display())))?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(internal(format!("cannot set the mode of {}", self.dir.display())))?;
            std::fs::create_dir_all(&dir).map_err(internal(format!("cannot make {}", dir.display())))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .map_err(internal(format!("cannot set the mode of {}", dir.display())))?;
            let trees = state.engine.hold(&volume)?;
            let path = dir.join(SOCKET_NAME);
            // A pod's user is unknown: whoever can reach the file (it is
            // mounted into one pod) may use it, and it can only ever touch
            // this volume.
            let listener = bind(&path, 0o666).map_err(internal(format!("cannot bind {}", path.display())))?;
            // Written once the socket is bound: a `socket.json` is the
            // promise to open the socket again at the next start.
            crate::durable::write_json(&dir.join(SOCKET_OWNER), &requester).map_err(EngineError::from)?;
            Ok::<_, Refusal>((listener, VolumeSocket { volume: volume.to_string(), path, trees }))
        })();
        let (listener, socket) = match opened {
            Ok(opened) => opened,
            Err(refused) => {
                self.remove_files(&state.engine, &volume);
                return Err(refused);
            }
        };
        let scoped = AppState { scope: Scope::Volume(volume.clone(), requester.clone()), ..state.clone() };
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router(scoped)).await {
                tracing::error!("volume socket stopped: {error}");
            }
        });
        served.insert(volume.clone(), (socket.clone(), task.abort_handle(), requester));
        tracing::info!(volume = %volume, path = %socket.path.display(), "volume socket open");
        Ok(socket)
    }

    /// A socket's files and its volume's hold, gone.
    fn remove_files(&self, engine: &Engine, volume: &VolumeId) {
        let dir = self.dir.join(volume.as_str());
        for file in [SOCKET_NAME, SOCKET_OWNER] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        let _ = std::fs::remove_dir(&dir);
        engine.unhold(volume);
    }

    /// Closes `volume`'s socket for good: its files go, and its volume may
    /// be pruned again. What a socket not served now left behind (a failed
    /// start, say) goes too; `None` when no socket was served.
    fn close(&self, engine: &Engine, volume: &VolumeId) -> Option<VolumeSocket> {
        let closed = self.served().remove(volume);
        if let Some((_, task, _)) = &closed {
            task.abort();
        }
        self.remove_files(engine, volume);
        closed.map(|(socket, _, _)| socket)
    }

    /// Stops serving every volume socket (the daemon is stopping); each
    /// `socket.json` stays, for the next start to open it again.
    pub fn close_all(&self) {
        for (_, (socket, task, _)) in self.served().drain() {
            task.abort();
            let _ = std::fs::remove_file(socket.path);
        }
    }

    /// Opens again the sockets a previous run served, checked as the API
    /// checks a new one.
    fn reopen(&self, state: &AppState) {
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let owner = entry.path().join(SOCKET_OWNER);
            let Ok(volume) = VolumeId::new(&entry.file_name().to_string_lossy()) else { continue };
            let requester = match std::fs::read(&owner) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => Err(error.to_string()),
                Ok(bytes) => {
                    serde_json::from_slice::<Requester>(&bytes).map_err(|error| error.to_string()).and_then(|requester| {
                        requester.validate().map_err(|error| error.to_string())?;
                        requester.namespace.is_some().then_some(requester).ok_or_else(|| "no namespace".to_owned())
                    })
                }
            };
            let opened = requester
                .and_then(|requester| self.open(state, volume.clone(), requester).map_err(|Refusal(error)| error.message));
            if let Err(error) = opened {
                tracing::warn!(volume = %volume, path = %owner.display(), "not opening a volume socket again: {error}");
            }
        }
    }
}

/// The router for one socket.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{volume}/{mount_id}", get(volume_status).put(mount).delete(release))
        .route("/v1/prefetch", post(prefetch))
        .route("/v1/inspect", post(inspect))
        .route("/v1/gc", post(collect))
        .route("/v1/du", get(disk_usage))
        .route("/v1/pins", get(list_pins).post(pin).delete(unpin))
        .route("/v1/plugins", get(plugins))
        .route("/v1/plugins/reload", post(reload_plugins))
        .route("/v1/volume-sockets", post(open_volume_socket))
        .route("/v1/volume-sockets/{volume}", delete(close_volume_socket))
        .with_state(state)
}

/// Binds a unix socket at `path` with `mode`, replacing a stale socket file.
///
/// The socket never exists at `path` with any other mode: it is bound in a
/// fresh staging directory beside `path` (mode 0700 whatever the umask, so
/// only root reaches what is inside), given its mode there and renamed into
/// place, which also replaces a stale file in one step. Narrowing the umask
/// around `bind` instead would race every other thread creating files (the
/// umask is per process), and a unix socket cannot be `fchmod`ed before
/// `bind` gives it a file.
///
/// # Errors
/// When the socket cannot be bound (another daemon serves it, or the
/// directory is not writable).
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let parent = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by another process", path.display()),
        ));
    }
    // Short names: a socket path has room for 107 bytes only.
    let staging = tempfile::Builder::new().prefix(".").rand_bytes(4).tempdir_in(parent)?;
    let staged = staging.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// Serves the main (admin) API on `listener` until `shutdown` resolves.
///
/// # Errors
/// When serving fails.
pub async fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    sockets: Arc<VolumeSockets>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState { engine, scope: Scope::Admin, sockets, started: Instant::now() };
    state.sockets.reopen(&state);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

async fn health(State(state): State<AppState>) -> Json<Health> {
    let set = state.engine.plugins().current();
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        active_mounts: state.engine.active_mounts(),
        plugins_loaded: set.plugins().len(),
        plugins_refused: set.statuses().iter().filter(|status| !status.loaded).count(),
        uptime_seconds: state.started.elapsed().as_secs(),
    })
}

async fn list_volumes(State(state): State<AppState>) -> Response {
    let mut records = state.engine.list();
    if let Scope::Volume(bound, _) = &state.scope {
        records.retain(|record| record.volume == *bound);
    }
    Json(records).into_response()
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(rename = "wait-seconds", default)]
    wait_seconds: f64,
}

async fn volume_status(
    State(state): State<AppState>,
    UrlPath((volume, mount_id)): UrlPath<(String, String)>,
    Query(query): Query<WaitQuery>,
) -> Result<Response, Refusal> {
    let volume = state.volume(&volume)?;
    let mount_id = MountId::new(&mount_id)?;
    // A watcher's long poll: answered the moment the mount ends. Its outcome
    // is in the record either way.
    if let Some(mut running) = state.engine.running(&volume, &mount_id) {
        let _ = tokio::time::timeout(wait_for(query.wait_seconds), running.wait()).await;
    }
    let record = state.engine.status(&volume, &mount_id)?;
    Ok(Json(record).into_response())
}

async fn mount(
    State(state): State<AppState>,
    UrlPath((volume, mount_id)): UrlPath<(String, String)>,
    Json(body): Json<MountBody>,
) -> Result<Response, Refusal> {
    let volume = state.volume(&volume)?;
    let mount_id = MountId::new(&mount_id)?;
    let request = MountRequest {
        volume: volume.clone(),
        mount_id: mount_id.clone(),
        reference: ModelRef::parse(&body.reference).map_err(EngineError::from)?,
        options: ExcludeOptions { exclude_weights: body.exclude_weights, patterns: body.patterns },
        requester: state.requester(body.requester)?,
        credentials: body.credentials,
    };
    let mut handle = state.engine.start_mount(request).await?;
    match tokio::time::timeout(wait_for(body.wait_seconds), handle.wait()).await {
        Ok(outcome) => Ok(Json(outcome?).into_response()),
        Err(_) => {
            // Still pulling: the mount goes on; ask again, or poll the status.
            let record = state.engine.status(&volume, &mount_id)?;
            let status = if record.state() == VolumeState::Pulling { StatusCode::ACCEPTED } else { StatusCode::OK };
            Ok((status, Json(record)).into_response())
        }
    }
}

async fn release(
    State(state): State<AppState>,
    UrlPath((volume, mount_id)): UrlPath<(String, String)>,
) -> Result<Response, Refusal> {
    let volume = state.volume(&volume)?;
    let record = state.engine.unmount(&volume, &MountId::new(&mount_id)?).await?;
    Ok(Json(record).into_response())
}

async fn prefetch(State(state): State<AppState>, Json(body): Json<PrefetchBody>) -> Result<Response, Refusal> {
    state.admin("prefetch")?;
    let engine = state.engine.clone();
    let (reference, pin) = (body.reference.clone(), body.pin);
    let options = ExcludeOptions { exclude_weights: body.exclude_weights, patterns: body.patterns };
    // The pull belongs to no caller: it goes on if this request stops waiting.
    let task = tokio::spawn(async move { engine.prefetch(&reference, &options, pin).await });
    let pulling = || PrefetchStatus {
        state: "pulling".into(),
        reference: body.reference.clone(),
        key: None,
        bytes: None,
        source: None,
        pinned: body.pin,
    };
    match tokio::time::timeout(wait_for(body.wait_seconds), task).await {
        Ok(Ok(Ok(done))) => Ok(Json(PrefetchStatus {
            state: "ready".into(),
            reference: body.reference.clone(),
            key: Some(done.key.to_string()),
            bytes: Some(done.bytes),
            source: serde_json::to_value(done.source).ok().and_then(|value| value.as_str().map(str::to_owned)),
            pinned: done.pinned,
        })
        .into_response()),
        Ok(Ok(Err(error))) => Err(error.into()),
        Ok(Err(join)) => Err(refusal(ErrorKind::Internal, format!("the prefetch task failed: {join}"))),
        Err(_) => Ok((StatusCode::ACCEPTED, Json(pulling())).into_response()),
    }
}

async fn inspect(State(state): State<AppState>, Json(body): Json<InspectBody>) -> Result<Response, Refusal> {
    state.admin("inspect models")?;
    Ok(Json(state.engine.inspect(&body.reference).await?).into_response())
}

async fn collect(State(state): State<AppState>, Json(body): Json<GcBody>) -> Result<Response, Refusal> {
    state.admin("collect garbage")?;
    Ok(Json(state.engine.gc(body.dry_run, Trigger::OnDemand).await?).into_response())
}

async fn disk_usage(State(state): State<AppState>) -> Result<Response, Refusal> {
    state.admin("read disk usage")?;
    let engine = state.engine.clone();
    let report = tokio::task::spawn_blocking(move || engine.du())
        .await
        .map_err(|join| refusal(ErrorKind::Internal, join.to_string()))??;
    Ok(Json(report).into_response())
}

async fn list_pins(State(state): State<AppState>) -> Result<Response, Refusal> {
    state.admin("read pins")?;
    Ok(Json(state.engine.pins()).into_response())
}

async fn pin(State(state): State<AppState>, Json(body): Json<PinBody>) -> Result<Response, Refusal> {
    state.admin("pin")?;
    Ok(Json(state.engine.pin(&body.target).await?).into_response())
}

#[derive(Deserialize)]
struct TargetQuery {
    target: String,
}

async fn unpin(State(state): State<AppState>, Query(query): Query<TargetQuery>) -> Result<Response, Refusal> {
    state.admin("unpin")?;
    let removed = state.engine.unpin(&query.target).await?;
    Ok(Json(serde_json::json!({ "target": query.target, "removed": removed })).into_response())
}

async fn plugins(State(state): State<AppState>) -> Result<Response, Refusal> {
    state.admin("read plugins")?;
    Ok(Json(state.engine.plugins().current().statuses().to_vec()).into_response())
}

async fn reload_plugins(State(state): State<AppState>) -> Result<Response, Refusal> {
    state.admin("reload plugins")?;
    let engine = state.engine.clone();
    let set = tokio::task::spawn_blocking(move || engine.plugins().reload())
        .await
        .map_err(|join| refusal(ErrorKind::Internal, join.to_string()))?;
    Ok(Json(set.statuses().to_vec()).into_response())
}

async fn open_volume_socket(State(state): State<AppState>, Json(body): Json<VolumeSocketBody>) -> Result<Response, Refusal> {
    state.admin("make volume sockets")?;
    let volume = VolumeId::new(&body.volume)?;
    // A socket handed into a pod speaks for that pod: without a namespace
    // its mounts would pass for the operator's.
    let requester = body.requester.filter(|requester| requester.namespace.is_some()).ok_or_else(|| {
        refusal(ErrorKind::InvalidArgument, "a volume socket speaks for a pod: its `requester` needs the pod's namespace".into())
    })?;
    requester.validate().map_err(EngineError::from)?;
    let socket = state.sockets.clone().open(&state, volume, requester)?;
    Ok(Json(socket).into_response())
}

async fn close_volume_socket(State(state): State<AppState>, UrlPath(volume): UrlPath<String>) -> Result<Response, Refusal> {
    state.admin("close volume sockets")?;
    let volume = VolumeId::new(&volume)?;
    match state.sockets.close(&state.engine, &volume) {
        Some(socket) => Ok(Json(socket).into_response()),
        None => Err(refusal(ErrorKind::NotFound, format!("no socket is bound to volume {volume}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket appears at its path with the mode asked for and its mode
    /// never changes there afterwards, whatever the umask: the directory's
    /// inotify events show it arrive by a rename, with no change of
    /// attributes after. A stale socket file is replaced.
    #[tokio::test]
    async fn sockets_appear_with_their_mode() {
        use rustix::fs::inotify;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
        let flags = inotify::WatchFlags::CREATE | inotify::WatchFlags::ATTRIB | inotify::WatchFlags::MOVED_TO;
        inotify::add_watch(&watch, dir.path(), flags).unwrap();

        let _listener = bind(&path, 0o600).unwrap();

        let metadata = std::fs::metadata(&path).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()));
        assert_eq!(metadata.permissions().mode() & 0o7777, 0o600);
        std::os::unix::net::UnixStream::connect(&path).expect("the renamed socket serves");
        let mut buffer = [std::mem::MaybeUninit::uninit(); 4096];
        let mut events = inotify::Reader::new(&watch, &mut buffer);
        let mut seen = Vec::new();
        loop {
            match events.next() {
                Ok(event) if event.file_name().is_some_and(|name| name.to_bytes() == b"api.sock") => seen.push(event.events()),
                Ok(_) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(error) => panic!("reading inotify events: {error}"),
            }
        }
        assert_eq!(seen, [inotify::ReadFlags::MOVED_TO], "the socket must arrive whole, by a rename");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(leftovers, ["api.sock"], "no staging directory is left");
    }

    /// Whatever wait a client sends is clamped to a sane one, never a panic.
    #[test]
    fn waits_are_clamped() {
        assert_eq!(wait_for(1e20), MAX_WAIT);
        assert_eq!(wait_for(0.5), Duration::from_millis(500));
        for nonsense in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
            assert_eq!(wait_for(nonsense), Duration::ZERO);
        }
    }
}
