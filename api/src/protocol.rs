//! The API's routes, request bodies and answers: JSON over HTTP/1.1 on a
//! unix socket, described in `api/openapi.json`.
//!
//! Errors carry an [`ErrorKind`] and map to distinct HTTP statuses
//! ([`status_of`]); the body is `{"error": {"kind", "message"}}`.

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::tenancy::{RegistryCredentials, Requester};

/// Every route the API serves, as `(method, path)`; the OpenAPI document
/// lists exactly these (a test keeps them in step).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/v1/volumes"),
    ("GET", "/v1/volumes/{volume}/{mount_id}"),
    ("PUT", "/v1/volumes/{volume}/{mount_id}"),
    ("DELETE", "/v1/volumes/{volume}/{mount_id}"),
    ("POST", "/v1/prefetch"),
    ("POST", "/v1/inspect"),
    ("POST", "/v1/gc"),
    ("GET", "/v1/du"),
    ("GET", "/v1/pins"),
    ("POST", "/v1/pins"),
    ("DELETE", "/v1/pins"),
    ("GET", "/v1/plugins"),
    ("POST", "/v1/plugins/reload"),
    ("POST", "/v1/volume-sockets"),
    ("DELETE", "/v1/volume-sockets/{volume}"),
];

/// `PUT /v1/volumes/{volume}/{mount_id}`: mount a model into a volume.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MountBody {
    pub reference: String,
    #[serde(default)]
    pub exclude_weights: bool,
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Wait up to this long for the volume to be ready (0: answer at once,
    /// `202` with the record while it pulls).
    #[serde(default)]
    pub wait_seconds: f64,
    /// Who asks. Only the admin socket may state it; a volume socket's
    /// requests carry the identity the socket was made with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<Requester>,
    /// Registry credentials for this mount, tried before the node's own.
    /// Never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
}

/// `POST /v1/prefetch`: pull a model into the cache with no volume.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrefetchBody {
    pub reference: String,
    #[serde(default)]
    pub exclude_weights: bool,
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Pin the model so GC never evicts it.
    #[serde(default)]
    pub pin: bool,
    #[serde(default)]
    pub wait_seconds: f64,
}

/// What a prefetch reports: `ready` with what it did, or `pulling`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PrefetchStatus {
    pub state: String,
    pub reference: String,
    pub key: Option<String>,
    pub bytes: Option<u64>,
    pub source: Option<String>,
    pub pinned: bool,
}

/// `POST /v1/inspect`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InspectBody {
    pub reference: String,
}

/// `POST /v1/gc`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GcBody {
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/pins` and `DELETE /v1/pins?target=…`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PinBody {
    /// A reference (resolved now) or a `sha256:` manifest digest.
    pub target: String,
}

/// `POST /v1/volume-sockets`: make a socket bound to one volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VolumeSocketBody {
    pub volume: String,
    /// Who the socket speaks for: every mount through it carries this
    /// requester, and may not claim another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requester: Option<Requester>,
}

/// Where a volume socket is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeSocket {
    pub volume: String,
    pub path: std::path::PathBuf,
    /// The volume's tree directory: each mount's tree appears in it as
    /// `<mount-id>/` once ready. It stays while the socket is open.
    #[serde(default)]
    pub trees: std::path::PathBuf,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
    pub active_mounts: usize,
    pub plugins_loaded: usize,
    pub plugins_refused: usize,
    pub uptime_seconds: u64,
}

/// An error as the API sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "kebab-case")]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The body of every error answer.
#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

/// The HTTP status of each error kind: the five a client most needs to
/// tell apart (invalid argument, not found, conflict, quota denied,
/// unavailable) all differ.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::QuotaDenied => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DataLoss => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::PolicyFailed => StatusCode::FAILED_DEPENDENCY,
        ErrorKind::Cancelled => StatusCode::GONE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind has its own status.
    #[test]
    fn kinds_map_to_distinct_statuses() {
        let kinds = [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::QuotaDenied,
            ErrorKind::PermissionDenied,
            ErrorKind::Unavailable,
            ErrorKind::DataLoss,
            ErrorKind::PolicyFailed,
            ErrorKind::Cancelled,
            ErrorKind::Internal,
        ];
        let statuses: std::collections::HashSet<StatusCode> = kinds.iter().map(|kind| status_of(*kind)).collect();
        assert_eq!(statuses.len(), kinds.len());
    }

    /// The OpenAPI document lists exactly the routes served.
    #[test]
    fn openapi_matches_the_routes() {
        let text = include_str!("../openapi.json");
        let spec: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
        assert_eq!(spec["openapi"].as_str().map(|version| version.starts_with("3.")), Some(true));
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, operations) in spec["paths"].as_object().expect("paths") {
            for method in operations.as_object().expect("operations").keys() {
                if ["get", "put", "post", "delete"].contains(&method.as_str()) {
                    documented.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> =
            ROUTES.iter().map(|(method, path)| (method.to_string(), path.to_string())).collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
