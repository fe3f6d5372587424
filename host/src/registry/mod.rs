//! OCI registries: resolve a reference to its manifest digest once, then fetch
//! the manifest and every blob by digest, so a tag that moves mid-pull
//! cannot mix two models.
//!
//! Plain HTTP is used only for registries configured insecure; everything
//! else is HTTPS. Credentials come from a docker `config.json` (`auths`,
//! `credHelpers`, `credsStore`), anonymous otherwise. Without a restart, the
//! file is read again when it changes (a rotated Kubernetes secret), and a
//! helper is asked again when the registry refuses what it gave (a token
//! that expired). Transient failures (connection errors, timeouts, 429 and
//! 5xx; not a TLS certificate that is not accepted) are retried with
//! exponential backoff; an interrupted blob resumes with a Range request from
//! the bytes already written, and is hashed as a whole by the sink it is
//! written into (the store's ingest), whatever happened.
//!
//! A registry is not trusted to send at any pace or to stop: a blob read with
//! no byte for `stall_timeout`, or slower than `min_rate` over a window, is an
//! interrupted attempt (resumed, within `attempts`), and a read that goes past
//! the size the manifest declared stops at once. The node's download slot is
//! held only while bytes are read, never through a backoff.
//!
//! The module is split by concern:
//! - [`ModelRef`] (from the API crate): a reference as the user wrote it, parsed;
//! - `tags`: [`TagMemory`], what tags named when last asked;
//! - `credential`: whose credentials a request carries (none, the node's,
//!   a mount's pull secret) and the session of each;
//! - `session`: the HTTP client and the credentials it is given, renewed
//!   when the credentials file changes or a helper's answer is refused;
//! - `auth`: credentials from a docker `config.json` and its helpers;
//! - `tls`: trusted authorities, and a refused certificate told apart;
//! - `retry`: what retrying can fix, mirrors before the origin, backoff;
//! - `signatures`: cosign signatures and referrers of a manifest, found
//!   without its blobs;
//! - `blob`: a blob streamed into a [`BlobSink`] within a [`DownloadSlot`],
//!   resumed, and cut when it stalls, trickles or runs past its size.

mod auth;
mod blob;
mod credential;
mod retry;
mod session;
mod signatures;
mod tags;
mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::Certificate;
use oci_client::errors::OciDistributionError;

use self::auth::Credentials;
pub use self::blob::{BlobSink, DownloadSlot, Slow};
pub use self::credential::{Credential, Fingerprint};
use self::retry::{Failure, classify};
use self::session::{Current, FileStamp, Session};
pub use self::signatures::{FoundCosign, FoundReferrer};
pub use self::tags::TagMemory;
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::modelpack::MANIFEST_MEDIA_TYPE;
pub use modelcache_api::reference::{ModelRef, ReferenceError};

/// How to reach registries.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// The directory holding a docker `config.json`; default `$DOCKER_CONFIG`,
    /// then `~/.docker`.
    pub docker_config: Option<PathBuf>,
    /// PEM files of certificate authorities trusted for registries' TLS
    /// certificates, besides the system's (a private registry's own CA).
    pub ca_certificates: Vec<PathBuf>,
    /// Attempts per request, the first included (default 5).
    pub attempts: u32,
    /// The first backoff; it doubles per attempt up to 10 s (default 200 ms).
    pub backoff: Duration,
    /// Per registry host, mirrors tried in order before it (a pull-through
    /// cache, a peer-to-peer proxy): each gets one try per request, and any
    /// failure falls through to the next and finally to the origin.
    pub mirrors: BTreeMap<String, Vec<Mirror>>,
    /// How long what a tag named is trusted without asking the registry
    /// again (default 30 s; zero asks every time). See [`TagMemory`].
    pub tag_ttl: Duration,
    /// How long a blob request may go without a byte (the response's headers
    /// included) before the attempt counts as interrupted (default 30 s).
    /// Also the window `min_rate` is measured over.
    pub stall_timeout: Duration,
    /// Bytes per second a blob read must average over each `stall_timeout`
    /// window, else the attempt counts as interrupted (default 16 KiB/s; zero
    /// turns the floor off). Low on purpose: it is there to cut a registry
    /// that trickles to hold a download slot, not to judge slow links.
    pub min_rate: u64,
}

/// One mirror of a registry; it serves the same repositories at the same paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`.
    pub host: String,
    /// Reached over plain HTTP (an `http://` endpoint).
    pub plain_http: bool,
    /// Also asked to resolve tags (else only blobs and manifests by digest).
    pub resolve: bool,
}

impl Mirror {
    /// Parses an endpoint: `http://host:port`, `https://host` or `host`.
    ///
    /// # Errors
    /// An endpoint with a path or another scheme.
    pub fn parse(endpoint: &str, resolve: bool) -> Result<Mirror, String> {
        let (plain_http, rest) = match endpoint.split_once("://") {
            Some(("http", rest)) => (true, rest),
            Some(("https", rest)) => (false, rest),
            Some((scheme, _)) => return Err(format!("`{endpoint}`: scheme `{scheme}` is neither http nor https")),
            None => (false, endpoint),
        };
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            return Err(format!("`{endpoint}` must be a host[:port], without a path"));
        }
        Ok(Mirror { host: host.to_owned(), plain_http, resolve })
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: Vec::new(),
            docker_config: None,
            ca_certificates: Vec::new(),
            attempts: 5,
            backoff: Duration::from_millis(200),
            mirrors: BTreeMap::new(),
            tag_ttl: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            // A 1 Mbit/s link shared by the node's 4 download slots gives each
            // about 30 KiB/s, twice this; below it a 1 GiB layer takes 18 h.
            min_rate: 16 << 10,
        }
    }
}

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    InvalidReference(#[from] ReferenceError),
    #[error("{reference}: not found in the registry")]
    NotFound { reference: String },
    #[error("{reference}: the registry refused access ({reason})")]
    Denied { reference: String, reason: String },
    #[error("{reference}: registry unavailable after {attempts} attempts")]
    Unavailable {
        reference: String,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{reference}: the registry answered wrongly: {reason}")]
    Protocol { reference: String, reason: String },
    #[error("{reference}: the manifest's bytes hash to {actual}, not {expected}")]
    ManifestMismatch { reference: String, expected: Digest, actual: Digest },
    #[error("{reference}: the docker config {}: {reason}", path.display())]
    Credentials { reference: String, path: PathBuf, reason: String },
    /// A mount's pull secret that cannot be used; `problem` never quotes it.
    #[error("{reference}: the pull secret given cannot be used: {problem}")]
    PullSecret { reference: String, problem: &'static str },
    #[error("the CA certificates {}: {reason}", path.display())]
    Certificates { path: PathBuf, reason: String },
    #[error("cannot set up the registry client")]
    Setup {
        #[source]
        source: Box<OciDistributionError>,
    },
    #[error("{reference}: the registry's TLS certificate is not accepted: {reason}")]
    Untrusted { reference: String, reason: String },
    #[error(
        "{reference}: blob {digest} from {host} runs to {received} bytes or more, past the size of {expected} bytes the \
         manifest states; reading stopped"
    )]
    Oversized { reference: String, digest: Digest, host: String, expected: u64, received: u64 },
    #[error("{reference}: no download slot (the engine is stopping)")]
    Stopped { reference: String },
    /// The [`BlobSink`] a blob was written into failed; `kind` is what the
    /// sink says that failure is.
    #[error("storing a blob of {reference}")]
    Sink {
        reference: String,
        kind: ErrorKind,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::InvalidReference(_) => ErrorKind::InvalidArgument,
            RegistryError::NotFound { .. } => ErrorKind::NotFound,
            RegistryError::Denied { .. } => ErrorKind::PermissionDenied,
            RegistryError::Unavailable { .. } => ErrorKind::Unavailable,
            RegistryError::Protocol { .. } | RegistryError::ManifestMismatch { .. } | RegistryError::Oversized { .. } => {
                ErrorKind::DataLoss
            }
            RegistryError::Stopped { .. } => ErrorKind::Cancelled,
            RegistryError::Credentials { .. } | RegistryError::Certificates { .. } | RegistryError::PullSecret { .. } => {
                ErrorKind::InvalidArgument
            }
            RegistryError::Setup { .. } => ErrorKind::Internal,
            // Not retried (it cannot get better by itself), but a tag still
            // mounts what it last named, as in any other outage.
            RegistryError::Untrusted { .. } => ErrorKind::Unavailable,
            RegistryError::Sink { kind, .. } => *kind,
        }
    }
}

/// A client for OCI registries.
pub struct Registry {
    config: RegistryConfig,
    /// The trusted CAs of `config.ca_certificates`, read at start.
    authorities: Vec<Certificate>,
    /// The docker `config.json` credentials come from, when a directory for
    /// it is known (the file itself may come later).
    credentials_file: Option<PathBuf>,
    current: Mutex<Current>,
    /// The sessions of pull secrets, and the anonymous one.
    sessions: credential::Sessions,
}

impl Registry {
    /// A client with `config`.
    ///
    /// # Errors
    /// An unreadable docker config.
    pub fn new(config: RegistryConfig) -> Result<Registry, RegistryError> {
        // rustls needs a process-wide crypto provider; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let authorities =
            config.ca_certificates.iter().map(|path| tls::read_authorities(path)).collect::<Result<Vec<_>, _>>()?.concat();
        let credentials_file = Credentials::file(config.docker_config.clone());
        let read = credentials_file.as_deref().and_then(FileStamp::of);
        let credentials = Credentials::read(credentials_file.as_deref())?;
        let session = Session::new(&config, &authorities, credentials)
            .map_err(|source| RegistryError::Setup { source: Box::new(source) })?;
        Ok(Registry {
            config,
            authorities,
            credentials_file,
            current: Mutex::new(Current { session: Arc::new(session), read }),
            sessions: credential::Sessions::default(),
        })
    }

    /// The manifest digest `reference` names now: the pinned digest, or one
    /// HEAD request for a tag (at a mirror that may resolve, else the origin).
    ///
    /// # Errors
    /// Not found, denied or unavailable.
    pub async fn resolve(&self, reference: &ModelRef, credential: &Credential) -> Result<Digest, RegistryError> {
        if let Some(digest) = reference.digest() {
            return Ok(digest);
        }
        let digest = self
            .across_hosts(reference, credential, "resolving the tag", true, |client, image, auth| async move {
                client.fetch_manifest_digest(&image, &auth).await.map_err(|error| classify(reference, error))
            })
            .await?;
        digest.parse().map_err(|error: crate::digest::DigestError| RegistryError::Protocol {
            reference: reference.to_string(),
            reason: format!("the registry gave the digest {error}"),
        })
    }

    /// Whether `credential` may read the manifest `digest` of `reference`'s
    /// repository: one HEAD request by digest, where the manifest is
    /// fetched from (mirrors, then the origin).
    ///
    /// # Errors
    /// Not found, denied or unavailable.
    pub async fn check_manifest(
        &self,
        reference: &ModelRef,
        digest: &Digest,
        credential: &Credential,
    ) -> Result<(), RegistryError> {
        self.across_hosts(reference, credential, "checking access to the manifest", false, |client, image, auth| async move {
            let by_digest = reference.at(image.registry(), digest);
            client.fetch_manifest_digest(&by_digest, &auth).await.map(drop).map_err(|error| classify(reference, error))
        })
        .await
    }

    /// The manifest with `digest`, fetched by digest and verified.
    ///
    /// # Errors
    /// Not found, denied, unavailable, or bytes that do not hash to `digest`.
    pub async fn fetch_manifest(
        &self,
        reference: &ModelRef,
        digest: &Digest,
        credential: &Credential,
    ) -> Result<Bytes, RegistryError> {
        let accept = [MANIFEST_MEDIA_TYPE, "application/vnd.oci.image.index.v1+json"];
        let (bytes, _) = self
            .across_hosts(reference, credential, "fetching the manifest", false, |client, image, auth| async move {
                let by_digest = reference.at(image.registry(), digest);
                client.pull_manifest_raw(&by_digest, &auth, &accept).await.map_err(|error| classify(reference, error))
            })
            .await?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(RegistryError::ManifestMismatch { reference: reference.to_string(), expected: digest.clone(), actual });
        }
        Ok(bytes)
    }

    /// Uploads a blob unless the registry has it; `chunks` yields its bytes.
    ///
    /// # Errors
    /// Denied or unavailable.
    pub async fn push_blob<S>(&self, reference: &ModelRef, digest: &Digest, size: u64, chunks: S) -> Result<(), RegistryError>
    where
        S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let session = self.session();
        let client = &session.client;
        let auth = session.auth(reference, reference.registry()).await?;
        client.store_auth_if_needed(reference.as_reference().resolve_registry(), &auth).await;
        let image = reference.as_reference();
        let exists = client.blob_exists(image, &digest.to_string()).await.unwrap_or(false);
        if exists {
            return Ok(());
        }
        let stream = chunks.map(|chunk| chunk.map_err(OciDistributionError::from));
        client.push_blob_stream(image, stream, &digest.to_string(), Some(size)).await.map(drop).map_err(|error| {
            match classify(reference, error) {
                Failure::Permanent(error) => error,
                Failure::Transient(source) => {
                    RegistryError::Unavailable { reference: reference.to_string(), attempts: 1, source }
                }
            }
        })
    }

    /// Uploads a manifest under the reference's tag.
    ///
    /// # Errors
    /// Denied or unavailable.
    pub async fn push_manifest(&self, reference: &ModelRef, manifest: Bytes) -> Result<Digest, RegistryError> {
        let session = self.session();
        let client = &session.client;
        let auth = session.auth(reference, reference.registry()).await?;
        client.store_auth_if_needed(reference.as_reference().resolve_registry(), &auth).await;
        let digest = Digest::of(&manifest);
        let content_type = reqwest_header(MANIFEST_MEDIA_TYPE);
        self.with_retries(reference, "pushing the manifest", || async {
            client
                .push_manifest_raw(reference.as_reference(), manifest.clone(), content_type.clone())
                .await
                .map_err(|error| classify(reference, error))
        })
        .await?;
        Ok(digest)
    }
}

fn reqwest_header(value: &'static str) -> http::HeaderValue {
    http::HeaderValue::from_static(value)
}
