//! The API's handlers, served by axum on unix sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use tokio::net::UnixListener;

use super::sockets::VolumeSockets;
use super::{
    ApiError, ErrorBody, GcBody, Health, InspectBody, MountBody, PinBody, PrefetchBody, PrefetchStatus, VolumeSocketBody,
    status_of,
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

/// The volume path segment that names a volume socket's own volume.
const OWN_VOLUME: &str = "_";

/// The longest a request may ask to wait.
const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub(super) struct AppState {
    pub(super) engine: Arc<Engine>,
    pub(super) scope: Scope,
    pub(super) sockets: Arc<VolumeSockets>,
    pub(super) started: Instant,
}

/// A request refused: the error a handler answers with.
pub(super) struct Refusal(pub(super) ApiError);

pub(super) fn refusal(kind: ErrorKind, message: String) -> Refusal {
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

/// The router for one socket.
pub(super) fn router(state: AppState) -> Router {
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
