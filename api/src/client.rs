//! A client for the daemon's API, used by the CLI and the CSI shim.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::error::ErrorKind;
use crate::protocol::{ApiError, ErrorBody, Health};

/// What can go wrong reaching the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach modelcache at {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("modelcache answered {status}: {error}")]
    Api { status: StatusCode, error: ApiError },
    /// The request could not be encoded.
    #[error("cannot encode the request to {path}")]
    Encode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot build the request to {path}")]
    Request {
        path: String,
        #[source]
        source: http::Error,
    },
    /// The daemon answered something that is not the expected JSON.
    #[error("unexpected answer to {path}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The daemon went away mid-request (a restart, a crash): worth asking
    /// again, unlike a malformed exchange.
    #[error("the connection to modelcache ended mid-request")]
    Dropped(#[source] hyper::Error),
}

impl ClientError {
    /// The error's kind as the daemon reported it; unreachable is `unavailable`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Api { error, .. } => error.kind,
            ClientError::Connect { .. } | ClientError::Dropped(_) => ErrorKind::Unavailable,
            ClientError::Encode { .. } | ClientError::Request { .. } | ClientError::Decode { .. } => ErrorKind::Internal,
        }
    }
}

/// A client of the API on one socket. Each request uses its own connection.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

/// An answer: the status (200, or 202 while a pull goes on) and the body.
#[derive(Debug)]
pub struct Answer<T> {
    pub status: StatusCode,
    pub body: T,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the daemon answers a health request (a connection alone is
    /// accepted by the kernel even when the daemon is stuck).
    pub async fn healthy(&self) -> bool {
        self.get::<Health>("/v1/health").await.is_ok()
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Ok(self.send::<(), T>(Method::GET, path, None).await?.body)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<Answer<T>, ClientError> {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<Answer<T>, ClientError> {
        self.send(Method::PUT, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Ok(self.send::<(), T>(Method::DELETE, path, None).await?.body)
    }

    /// One request and its JSON answer.
    ///
    /// # Errors
    /// The daemon is unreachable, answered with an error, or answered
    /// something that is not the expected JSON.
    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Answer<T>, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(ClientError::Dropped)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let payload = match body {
            Some(body) => {
                Bytes::from(serde_json::to_vec(body).map_err(|source| ClientError::Encode { path: path.to_owned(), source })?)
            }
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "modelcache")
            .header("content-type", "application/json")
            .body(Full::new(payload))
            .map_err(|source| ClientError::Request { path: path.to_owned(), source })?;
        let response = sender.send_request(request).await.map_err(ClientError::Dropped)?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(ClientError::Dropped)?.to_bytes();
        if !status.is_success() {
            let error = serde_json::from_slice::<ErrorBody>(&bytes).map(|body| body.error).unwrap_or_else(|_| ApiError {
                kind: ErrorKind::Internal,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
            return Err(ClientError::Api { status, error });
        }
        let body = serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { path: path.to_owned(), source })?;
        Ok(Answer { status, body })
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
