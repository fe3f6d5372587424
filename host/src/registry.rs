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
//! the bytes already written, and is hashed as a whole by the store whatever
//! happened.
//!
//! A registry is not trusted to send at any pace or to stop: a blob read with
//! no byte for `stall_timeout`, or slower than `min_rate` over a window, is an
//! interrupted attempt (resumed, within `attempts`), and a read that goes past
//! the size the manifest declared stops at once. The node's download slot is
//! held only while bytes are read, never through a backoff.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use modelcache_policy::size::HumanBytes;
use oci_client::client::{BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::flight::Progress;
use crate::modelpack::{Descriptor, MANIFEST_MEDIA_TYPE};
use crate::store::{Ingest, StoreError};
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

/// What tags named when last asked.
///
/// A mount by tag asks the registry what the tag names now, unless it was
/// asked less than `ttl` ago: a node starting pods of one deployment then
/// asks once, not once a pod (docker-registry takes longer to answer that
/// question for a 1,000-file model than a warm mount takes to link it).
/// And when the registry cannot be reached, the last answer is used, so a
/// cached model still mounts during a registry outage, with a warning. Once
/// the registry says a tag is gone or refused, it is forgotten.
///
/// The price is that a tag moved within `ttl` of the last question is seen
/// late on this node; references by digest, or a zero `ttl`, avoid it.
#[derive(Debug)]
pub struct TagMemory {
    ttl: Duration,
    known: Mutex<HashMap<String, Recalled>>,
}

#[derive(Debug)]
struct Recalled {
    digest: Digest,
    /// When the registry said so; `None` when learned from a volume record
    /// at start-up, good only while the registry cannot be reached.
    at: Option<std::time::Instant>,
}

impl TagMemory {
    /// Distinct tags remembered.
    const KEPT: usize = 1024;

    pub fn new(ttl: Duration) -> TagMemory {
        TagMemory { ttl, known: Mutex::default() }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Recalled>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What `tag` named when the registry said so less than `ttl` ago.
    pub fn fresh(&self, tag: &ModelRef) -> Option<Digest> {
        let known = self.known();
        let recalled = known.get(tag.as_str())?;
        recalled.at.filter(|at| at.elapsed() < self.ttl).map(|_| recalled.digest.clone())
    }

    /// What `tag` named when last heard of, however long ago, for when the
    /// registry cannot be reached; trusted from now for another `ttl`, so
    /// the mounts that follow during an outage do not each wait out the
    /// retries.
    pub fn fall_back(&self, tag: &ModelRef) -> Option<Digest> {
        let mut known = self.known();
        let recalled = known.get_mut(tag.as_str())?;
        recalled.at = Some(std::time::Instant::now());
        Some(recalled.digest.clone())
    }

    /// The registry's answer, just given.
    pub fn remember(&self, tag: &ModelRef, digest: &Digest) {
        self.insert(tag.as_str(), Recalled { digest: digest.clone(), at: Some(std::time::Instant::now()) });
    }

    /// The registry says `tag` is gone, or refused: nothing is served
    /// from memory for it any more.
    pub fn forget(&self, tag: &ModelRef) {
        self.known().remove(tag.as_str());
    }

    /// What a volume record says `tag` named once: used only when the
    /// registry cannot be reached, and never over an answer of this run.
    pub fn recall(&self, tag: &str, digest: &Digest) {
        if !self.known().contains_key(tag) {
            self.insert(tag, Recalled { digest: digest.clone(), at: None });
        }
    }

    fn insert(&self, tag: &str, recalled: Recalled) {
        crate::memo::insert_bounded(&mut self.known(), Self::KEPT, tag.to_owned(), recalled);
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
    #[error("the CA certificates {}: {reason}", path.display())]
    Certificates { path: PathBuf, reason: String },
    #[error("cannot set up the registry client: {reason}")]
    Setup { reason: String },
    #[error("{reference}: the registry's TLS certificate is not accepted: {reason}")]
    Untrusted { reference: String, reason: String },
    #[error(
        "{reference}: blob {digest} from {host} runs to {received} bytes or more, past the size of {expected} bytes the \
         manifest states; reading stopped"
    )]
    Oversized { reference: String, digest: Digest, host: String, expected: u64, received: u64 },
    #[error("{reference}: no download slot (the engine is stopping)")]
    Stopped { reference: String },
    #[error("storing a blob of {reference}")]
    Store {
        reference: String,
        #[source]
        source: StoreError,
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
            RegistryError::Credentials { .. } | RegistryError::Certificates { .. } => ErrorKind::InvalidArgument,
            RegistryError::Setup { .. } => ErrorKind::Internal,
            // Not retried (it cannot get better by itself), but a tag still
            // mounts what it last named, as in any other outage.
            RegistryError::Untrusted { .. } => ErrorKind::Unavailable,
            RegistryError::Store { source, .. } => source.kind(),
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
}

/// The session requests use, and the credentials file as last read.
struct Current {
    session: Arc<Session>,
    read: Option<FileStamp>,
}

/// An HTTP client and the credentials it is given. The client keeps the
/// first credentials it sees per host, and the tokens they earn, for its
/// whole life: new credentials need a new session.
struct Session {
    client: Client,
    credentials: Credentials,
    /// Each host's credentials as first worked out: a credential helper runs
    /// once per session and host, not once per blob nor once per caller.
    auths: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<HostAuth>>>>,
}

#[derive(Clone, Debug)]
struct HostAuth {
    auth: RegistryAuth,
    /// Given by a credential helper, whose answers expire.
    helped: bool,
}

impl Session {
    fn new(config: &RegistryConfig, authorities: &[Certificate], credentials: Credentials) -> Result<Session, String> {
        let mut plain_http = config.insecure.clone();
        plain_http.extend(config.mirrors.values().flatten().filter(|mirror| mirror.plain_http).map(|mirror| mirror.host.clone()));
        let protocol = if plain_http.is_empty() { ClientProtocol::Https } else { ClientProtocol::HttpsExcept(plain_http) };
        // `try_from`, not `Client::new`, which on an error quietly makes a
        // client with the default configuration instead.
        let client = Client::try_from(ClientConfig {
            protocol,
            connect_timeout: Some(Duration::from_secs(10)),
            // A blob read has its own, tighter, stall limit (`fetch_blob`);
            // this one bounds every other request.
            read_timeout: Some(config.stall_timeout.max(Duration::from_secs(60))),
            extra_root_certificates: authorities.to_vec(),
            ..ClientConfig::default()
        })
        .map_err(|error| crate::plugins::error_chain(&error))?;
        Ok(Session { client, credentials, auths: Mutex::default() })
    }

    /// The credentials for `host`, worked out once per session: a helper's
    /// answer (even "none") is kept until a refusal renews the session; a
    /// helper that cannot be run, or answers nonsense, is asked again.
    async fn auth(&self, reference: &ModelRef, host: &str) -> Result<RegistryAuth, RegistryError> {
        Ok(self.host_auth(reference, host).await?.auth)
    }

    async fn host_auth(&self, reference: &ModelRef, host: &str) -> Result<HostAuth, RegistryError> {
        let cell = self.auths.lock().unwrap_or_else(PoisonError::into_inner).entry(host.to_owned()).or_default().clone();
        let found = cell
            .get_or_try_init(|| async {
                Ok::<_, RegistryError>(match self.credentials.lookup(reference, host)? {
                    Lookup::Known(auth) => HostAuth { auth, helped: false },
                    Lookup::Helper(helper) => HostAuth {
                        auth: run_helper(&helper, host).await.map_err(|reason| self.credentials.error(reference, reason))?,
                        helped: true,
                    },
                })
            })
            .await?;
        Ok(found.clone())
    }

    /// Whether asking again could give `host` other credentials: only a
    /// helper's can change while the file stays the same (a changed file
    /// makes a new session anyway).
    async fn renewable(&self, reference: &ModelRef, host: &str) -> bool {
        self.host_auth(reference, host).await.is_ok_and(|found| found.helped)
    }
}

/// One version of a file: rewriting it, or swapping the symlink to it as
/// Kubernetes does for a mounted secret, makes another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    bytes: u64,
    // The change time, which unlike the modification time no tool sets back.
    changed: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            bytes: metadata.len(),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
        })
    }
}

/// A blob read that stopped making progress fast enough. Transient: the
/// next attempt resumes from what was written.
#[derive(Debug, thiserror::Error)]
pub enum Slow {
    #[error("blob {digest} from {host}: stalled: no {awaited} for {}", Seconds(*.waited))]
    Stalled { digest: Digest, host: String, awaited: &'static str, waited: Duration },
    #[error("blob {digest} from {host}: too slow: {}/s over the last {}, below the floor of {}/s (min-rate)",
        HumanBytes(*.measured), Seconds(*.window), HumanBytes(*.floor))]
    TooSlow { digest: Digest, host: String, measured: u64, window: Duration, floor: u64 },
}

/// A duration for messages: `30 s`, `1.5 s`.
struct Seconds(Duration);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.subsec_millis() {
            0 => write!(f, "{} s", self.0.as_secs()),
            _ => write!(f, "{:.1} s", self.0.as_secs_f64()),
        }
    }
}

/// One of the node's download slots, for one blob. It is held while the
/// blob's bytes are read and given back between attempts, so a registry that
/// stalls or trickles keeps it only until its attempt fails, never through
/// the backoff and the retries.
pub struct DownloadSlot<'a> {
    slots: &'a Semaphore,
    held: Option<SemaphorePermit<'a>>,
}

impl<'a> DownloadSlot<'a> {
    /// Waits for a free slot of `slots`.
    ///
    /// # Errors
    /// `slots` is closed.
    pub async fn acquire(slots: &'a Semaphore) -> Result<DownloadSlot<'a>, AcquireError> {
        let mut slot = DownloadSlot { slots, held: None };
        slot.hold().await?;
        Ok(slot)
    }

    async fn hold(&mut self) -> Result<(), AcquireError> {
        if self.held.is_none() {
            self.held = Some(self.slots.acquire().await?);
        }
        Ok(())
    }

    fn release(&mut self) {
        self.held = None;
    }
}

enum Failure {
    Transient(Box<dyn std::error::Error + Send + Sync>),
    Permanent(RegistryError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transient(source) => write!(f, "{source}"),
            Failure::Permanent(error) => write!(f, "{error}"),
        }
    }
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
            config.ca_certificates.iter().map(|path| read_authorities(path)).collect::<Result<Vec<_>, _>>()?.concat();
        let credentials_file = Credentials::file(config.docker_config.clone());
        let read = credentials_file.as_deref().and_then(FileStamp::of);
        let credentials = Credentials::read(credentials_file.as_deref())?;
        let session = Session::new(&config, &authorities, credentials).map_err(|reason| RegistryError::Setup { reason })?;
        Ok(Registry { config, authorities, credentials_file, current: Mutex::new(Current { session: Arc::new(session), read }) })
    }

    /// A session with `credentials`, or (a client that cannot be made, which
    /// the start-up checks rule out) the current one, with a warning.
    fn session_with(&self, credentials: Credentials, current: &Arc<Session>) -> Arc<Session> {
        match Session::new(&self.config, &self.authorities, credentials) {
            Ok(session) => Arc::new(session),
            Err(reason) => {
                tracing::warn!("cannot set up a new registry client ({reason}); the current one stays in use");
                current.clone()
            }
        }
    }

    /// The session for a request: a new one when the credentials file changed
    /// since it was last read. A file that no longer reads keeps the last
    /// good credentials in use, with a warning (once per version); a file
    /// that is gone means anonymous, also with a warning. (Checked under the
    /// lock, so one change makes one session; a change is rare, and building
    /// a client costs a few milliseconds.)
    fn session(&self) -> Arc<Session> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = self.credentials_file.as_deref().and_then(FileStamp::of);
        if stamp != current.read {
            current.read = stamp;
            match Credentials::read(self.credentials_file.as_deref()) {
                Ok(credentials) => {
                    if stamp.is_none() {
                        tracing::warn!(file = ?self.credentials_file, "registry credentials removed: pulling anonymously");
                    } else {
                        tracing::info!(file = ?self.credentials_file, "registry credentials changed: read again");
                    }
                    current.session = self.session_with(credentials, &current.session);
                }
                Err(error) => tracing::warn!("{error}; the credentials read before stay in use"),
            }
        }
        current.session.clone()
    }

    /// A session with credentials worked out again (helpers asked again) and
    /// no tokens, after a registry refused what a helper gave `stale`: unless
    /// a concurrent request already renewed it, which is then shared.
    fn renew(&self, stale: &Arc<Session>) -> Arc<Session> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if Arc::ptr_eq(&current.session, stale) {
            current.read = self.credentials_file.as_deref().and_then(FileStamp::of);
            let credentials = Credentials::read(self.credentials_file.as_deref()).unwrap_or_else(|error| {
                tracing::warn!("{error}; the credentials read before stay in use");
                stale.credentials.clone()
            });
            current.session = self.session_with(credentials, stale);
        }
        current.session.clone()
    }

    /// The manifest digest `reference` names now: the pinned digest, or one
    /// HEAD request for a tag (at a mirror that may resolve, else the origin).
    ///
    /// # Errors
    /// Not found, denied or unavailable.
    pub async fn resolve(&self, reference: &ModelRef) -> Result<Digest, RegistryError> {
        if let Some(digest) = reference.digest() {
            return Ok(digest);
        }
        let digest = self
            .across_hosts(reference, "resolving the tag", true, |client, image, auth| async move {
                client.fetch_manifest_digest(&image, &auth).await.map_err(|error| classify(reference, error))
            })
            .await?;
        digest.parse().map_err(|error: crate::digest::DigestError| RegistryError::Protocol {
            reference: reference.to_string(),
            reason: format!("the registry gave the digest {error}"),
        })
    }

    /// The manifest with `digest`, fetched by digest and verified.
    ///
    /// # Errors
    /// Not found, denied, unavailable, or bytes that do not hash to `digest`.
    pub async fn fetch_manifest(&self, reference: &ModelRef, digest: &Digest) -> Result<Bytes, RegistryError> {
        let accept = [MANIFEST_MEDIA_TYPE, "application/vnd.oci.image.index.v1+json"];
        let (bytes, _) = self
            .across_hosts(reference, "fetching the manifest", false, |client, image, auth| async move {
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

    /// Tries `operation` at each mirror of the reference's registry, once
    /// each, then at the origin with retries. Any failure at a mirror falls
    /// through to the next host, as containerd's hosts.toml mirrors do. When
    /// the origin refuses what a credential helper gave, all of it runs once
    /// more with a renewed session.
    async fn across_hosts<T, F, Fut>(
        &self,
        reference: &ModelRef,
        what: &str,
        resolving: bool,
        mut operation: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Client, Reference, RegistryAuth) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let session = self.session();
        match self.across_hosts_with(&session, reference, what, resolving, &mut operation).await {
            Err(RegistryError::Denied { reason, .. }) if session.renewable(reference, reference.registry()).await => {
                tracing::info!(reference = %reference, "refused {what} ({reason}): asking the credential helper again");
                self.across_hosts_with(&self.renew(&session), reference, what, resolving, &mut operation).await
            }
            other => other,
        }
    }

    async fn across_hosts_with<T, F, Fut>(
        &self,
        session: &Session,
        reference: &ModelRef,
        what: &str,
        resolving: bool,
        operation: &mut F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Client, Reference, RegistryAuth) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        for mirror in self.config.mirrors.get(reference.registry()).into_iter().flatten() {
            if resolving && !mirror.resolve {
                continue;
            }
            let failure = match session.auth(reference, &mirror.host).await {
                Ok(auth) => match operation(session.client.clone(), reference.on(&mirror.host), auth).await {
                    Ok(value) => return Ok(value),
                    // Not a passing fault: the mirror will not serve until
                    // someone acts, so say so where it is seen.
                    Err(Failure::Permanent(error @ RegistryError::Untrusted { .. })) => {
                        tracing::warn!(mirror = %mirror.host, "mirror skipped {what}: {error}");
                        continue;
                    }
                    Err(failure) => failure.to_string(),
                },
                Err(error) => error.to_string(),
            };
            tracing::debug!(mirror = %mirror.host, reference = %reference, "mirror failed {what}: {failure}");
        }
        let auth = session.auth(reference, reference.registry()).await?;
        self.with_retries(reference, what, || operation(session.client.clone(), reference.as_reference().clone(), auth.clone()))
            .await
    }

    /// Streams the blob `blob` into `ingest`, from the first mirror that has
    /// it, else the origin, resuming after interruptions with Range requests
    /// from what `ingest` holds (a mirror's partial bytes are kept and the
    /// next host continues from there). `slot` is held while bytes are read
    /// and let go during each backoff.
    ///
    /// Every request asks for a range, even from byte 0: a 206 answer is not
    /// hashed by the client library, so the bytes are hashed once, by the
    /// store, off the network task. A registry that answers 200 instead is
    /// followed from the start.
    ///
    /// An attempt is interrupted (and resumed, up to `attempts`) when no byte
    /// comes for `stall_timeout`, headers included, or when a
    /// `stall_timeout` window brings less than `min_rate`. A registry that
    /// sends more than `blob.size` bytes is not read further.
    ///
    /// # Errors
    /// Not found, denied, unavailable (a stall or a trickle among the
    /// causes), [`RegistryError::Oversized`], or a store error.
    pub async fn fetch_blob(
        &self,
        reference: &ModelRef,
        blob: &Descriptor,
        ingest: &mut Ingest,
        progress: &Progress,
        slot: &mut DownloadSlot<'_>,
    ) -> Result<(), RegistryError> {
        if blob.size == 0 {
            return Ok(());
        }
        let session = self.session();
        for mirror in self.config.mirrors.get(reference.registry()).into_iter().flatten() {
            match self.fetch_blob_at(&session, reference, &mirror.host, blob, ingest, progress, slot, 1).await {
                Ok(()) => return Ok(()),
                Err(error @ (RegistryError::Store { .. } | RegistryError::Stopped { .. })) => return Err(error),
                Err(error) => tracing::debug!(mirror = %mirror.host, blob = %blob.digest.short(), "mirror failed: {error}"),
            }
        }
        let origin = reference.registry();
        match self.fetch_blob_at(&session, reference, origin, blob, ingest, progress, slot, self.config.attempts).await {
            // What is already written stays: the renewed session resumes it.
            Err(RegistryError::Denied { .. }) if session.renewable(reference, origin).await => {
                let session = self.renew(&session);
                self.fetch_blob_at(&session, reference, origin, blob, ingest, progress, slot, self.config.attempts).await
            }
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob_at(
        &self,
        session: &Session,
        reference: &ModelRef,
        host: &str,
        blob: &Descriptor,
        ingest: &mut Ingest,
        progress: &Progress,
        slot: &mut DownloadSlot<'_>,
        attempts: u32,
    ) -> Result<(), RegistryError> {
        let store_error = |source| RegistryError::Store { reference: reference.to_string(), source };
        let image = reference.on(host);
        // Under the name the client looks credentials up by (docker.io's is
        // index.docker.io), or a blob fetched first would go unauthenticated.
        session.client.store_auth_if_needed(image.resolve_registry(), &session.auth(reference, host).await?).await;
        let descriptor = OciDescriptor {
            media_type: blob.media_type.clone(),
            digest: blob.digest.to_string(),
            size: blob.size as i64,
            ..OciDescriptor::default()
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let offset = ingest.position().await.map_err(store_error)?;
            if offset >= blob.size {
                return Ok(());
            }
            slot.hold().await.map_err(|_| RegistryError::Stopped { reference: reference.to_string() })?;
            let read = self.read_blob(session, reference, &image, &descriptor, host, blob, offset, ingest, progress);
            let failure = match read.await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            match failure {
                Failure::Permanent(error) => return Err(error),
                Failure::Transient(source) if attempt >= attempts => {
                    return Err(RegistryError::Unavailable { reference: reference.to_string(), attempts: attempt, source });
                }
                Failure::Transient(source) => {
                    tracing::warn!(reference = %reference, host, blob = %blob.digest.short(), attempt, "blob download interrupted, resuming: {source}");
                    slot.release();
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
        }
    }

    /// One attempt at the rest of `blob` from `host`, from `offset`: every
    /// wait for the registry is bounded by `stall_timeout`, each window of it
    /// must bring `min_rate`, and no byte past `blob.size` is read.
    #[allow(clippy::too_many_arguments)]
    async fn read_blob(
        &self,
        session: &Session,
        reference: &ModelRef,
        image: &Reference,
        descriptor: &OciDescriptor,
        host: &str,
        blob: &Descriptor,
        offset: u64,
        ingest: &mut Ingest,
        progress: &Progress,
    ) -> Result<(), Failure> {
        let store_error = |source| Failure::Permanent(RegistryError::Store { reference: reference.to_string(), source });
        let stall = self.config.stall_timeout;
        let stalled = |awaited, waited| {
            Failure::Transient(Box::new(Slow::Stalled { digest: blob.digest.clone(), host: host.to_owned(), awaited, waited }))
        };
        let oversized = |received| {
            Failure::Permanent(RegistryError::Oversized {
                reference: reference.to_string(),
                digest: blob.digest.clone(),
                host: host.to_owned(),
                expected: blob.size,
                received,
            })
        };
        let response = tokio::time::timeout(stall, session.client.pull_blob_stream_partial(image, descriptor, offset, None))
            .await
            .map_err(|_| stalled("response", stall))?
            .map_err(|error| classify(reference, error))?;
        let (stream, mut received) = match response {
            BlobResponse::Partial(stream) => (stream, offset),
            BlobResponse::Full(stream) => {
                if offset > 0 {
                    ingest.restart().await.map_err(store_error)?;
                    progress.take_back(offset);
                }
                (stream, 0)
            }
        };
        if let Some(length) = stream.content_length
            && received.saturating_add(length) > blob.size
        {
            return Err(oversized(received.saturating_add(length)));
        }
        let mut stream = stream.stream;
        let mut last_byte = Instant::now();
        let (mut window_start, mut window_bytes) = (last_byte, 0u64);
        loop {
            let stall_at = last_byte + stall;
            let window_end = window_start + stall;
            let deadline = if self.config.min_rate > 0 { stall_at.min(window_end) } else { stall_at };
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(bytes))) => {
                    let length = bytes.len() as u64;
                    if received + length > blob.size {
                        return Err(oversized(received + length));
                    }
                    received += length;
                    ingest.write(bytes).await.map_err(store_error)?;
                    progress.add(length);
                    crate::metrics::metrics().downloaded_bytes.add(length);
                    if length > 0 {
                        last_byte = Instant::now();
                        window_bytes += length;
                    }
                }
                Ok(Some(Err(error))) => return Err(Failure::Transient(Box::new(error))),
                Ok(None) if received >= blob.size => return Ok(()),
                Ok(None) => return Err(Failure::Transient("the blob stream ended early".into())),
                Err(_) if Instant::now() >= stall_at => return Err(stalled("bytes", stall)),
                Err(_) => {}
            }
            let now = Instant::now();
            if self.config.min_rate > 0 && now >= window_end {
                let window = now - window_start;
                let measured = (u128::from(window_bytes) * 1000 / window.as_millis().max(1)) as u64;
                if measured < self.config.min_rate {
                    return Err(Failure::Transient(Box::new(Slow::TooSlow {
                        digest: blob.digest.clone(),
                        host: host.to_owned(),
                        measured,
                        window,
                        floor: self.config.min_rate,
                    })));
                }
                (window_start, window_bytes) = (now, 0);
            }
        }
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

    async fn with_retries<T, F, Fut>(&self, reference: &ModelRef, what: &str, mut operation: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match operation().await {
                Ok(value) => return Ok(value),
                Err(Failure::Permanent(error)) => return Err(error),
                Err(Failure::Transient(source)) if attempt >= self.config.attempts => {
                    return Err(RegistryError::Unavailable { reference: reference.to_string(), attempts: attempt, source });
                }
                Err(Failure::Transient(source)) => {
                    tracing::warn!(reference = %reference, attempt, "{what} failed, retrying: {source}");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        (self.config.backoff * 2u32.saturating_pow(attempt.saturating_sub(1))).min(Duration::from_secs(10))
    }
}

fn reqwest_header(value: &'static str) -> http::HeaderValue {
    http::HeaderValue::from_static(value)
}

/// Sorts a client error into what retrying can and cannot fix.
fn classify(reference: &ModelRef, error: OciDistributionError) -> Failure {
    let permanent = |error| Failure::Permanent(error);
    let text = reference.to_string();
    if let Some(reason) = certificate_refusal(&error) {
        return permanent(RegistryError::Untrusted { reference: text, reason });
    }
    match error {
        OciDistributionError::RequestError(ref inner) if inner.is_status() => {
            let status = inner.status().map(|status| status.as_u16()).unwrap_or(0);
            status_failure(&text, status, error)
        }
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => Failure::Transient(Box::new(error)),
        OciDistributionError::ServerError { code, .. } => status_failure(&text, code, error),
        OciDistributionError::ImageManifestNotFoundError(_) => permanent(RegistryError::NotFound { reference: text }),
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            permanent(RegistryError::Denied { reference: text, reason: error.to_string() })
        }
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|error| &error.code).collect();
            if codes.iter().any(|code| matches!(code, OciErrorCode::Toomanyrequests)) {
                Failure::Transient(Box::new(error))
            } else if codes.iter().any(|code| {
                matches!(
                    code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                permanent(RegistryError::NotFound { reference: text })
            } else if codes.iter().any(|code| matches!(code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                permanent(RegistryError::Denied { reference: text, reason: error.to_string() })
            } else {
                permanent(RegistryError::Protocol { reference: text, reason: error.to_string() })
            }
        }
        other => permanent(RegistryError::Protocol { reference: text, reason: other.to_string() }),
    }
}

fn status_failure(reference: &str, status: u16, error: OciDistributionError) -> Failure {
    match status {
        404 => Failure::Permanent(RegistryError::NotFound { reference: reference.to_owned() }),
        401 | 403 => Failure::Permanent(RegistryError::Denied { reference: reference.to_owned(), reason: error.to_string() }),
        408 | 429 | 500..=599 => Failure::Transient(Box::new(error)),
        _ => Failure::Permanent(RegistryError::Protocol { reference: reference.to_owned(), reason: error.to_string() }),
    }
}

/// Why TLS refused the registry's certificate, if that is what `error`
/// comes down to: no retry can change it.
fn certificate_refusal(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut pending = vec![error];
    while let Some(current) = pending.pop() {
        match current.downcast_ref::<rustls::Error>() {
            Some(tls @ rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                return Some(format!(
                    "{tls}; if a private CA signed it, add that CA to [registries] ca-certificates (--ca-certificate)"
                ));
            }
            Some(tls @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)) => {
                return Some(tls.to_string());
            }
            _ => {}
        }
        // An io::Error's `source` skips the error it wraps (here, an io::Error
        // wrapping the TLS error): follow both.
        if let Some(wrapped) = current.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            pending.push(wrapped);
        }
        pending.extend(current.source());
    }
    None
}

/// The certificates in the PEM file `path`: at least one, all well formed.
fn read_authorities(path: &Path) -> Result<Vec<Certificate>, RegistryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let refuse = |reason: String| RegistryError::Certificates { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|error| refuse(error.to_string()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .map(|certificate| {
            let der = certificate.map_err(|error| refuse(format!("not a PEM certificate: {error}")))?;
            // What the client will do with it, so a bad one is named here.
            rustls::RootCertStore::empty()
                .add(der.clone())
                .map_err(|error| refuse(format!("a certificate in it cannot be used: {error}")))?;
            Ok(Certificate { encoding: CertificateEncoding::Der, data: der.to_vec() })
        })
        .collect::<Result<Vec<_>, RegistryError>>()?;
    if certificates.is_empty() {
        return Err(refuse("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

/// Credentials from a docker `config.json`.
#[derive(Clone, Debug, Default)]
struct Credentials {
    path: Option<PathBuf>,
    config: DockerConfig,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    creds_store: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

impl Credentials {
    /// The `config.json` in `dir`, else in `$DOCKER_CONFIG`, else in `~/.docker`.
    fn file(dir: Option<PathBuf>) -> Option<PathBuf> {
        dir.or_else(|| std::env::var_os("DOCKER_CONFIG").map(PathBuf::from))
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))
            .map(|dir| dir.join("config.json"))
    }

    /// What `file` holds; none (anonymous) when there is no such file.
    fn read(file: Option<&Path>) -> Result<Credentials, RegistryError> {
        let Some(path) = file.map(Path::to_owned) else {
            return Ok(Credentials::default());
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::default()),
            Err(error) => {
                return Err(RegistryError::Credentials {
                    reference: "registry credentials".into(),
                    path,
                    reason: error.to_string(),
                });
            }
        };
        let config = serde_json::from_str(&text).map_err(|error| RegistryError::Credentials {
            reference: "registry credentials".into(),
            path: path.clone(),
            reason: error.to_string(),
        })?;
        Ok(Credentials { path: Some(path), config })
    }

    fn error(&self, reference: &ModelRef, reason: String) -> RegistryError {
        RegistryError::Credentials { reference: reference.to_string(), path: self.path.clone().unwrap_or_default(), reason }
    }

    /// What the file says for `host`: credentials, or the helper to ask.
    fn lookup(&self, reference: &ModelRef, host: &str) -> Result<Lookup, RegistryError> {
        let error = |reason: String| self.error(reference, reason);
        let helper = self.config.cred_helpers.get(host).or(self.config.creds_store.as_ref());
        if let Some(entry) = self.config.auths.iter().find(|(key, _)| auth_key_host(key) == host).map(|(_, entry)| entry) {
            if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
                return Ok(Lookup::Known(RegistryAuth::Basic(username.clone(), password.clone())));
            }
            if let Some(encoded) = &entry.auth {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| error(format!("auths.{host}.auth is not base64")))?;
                let decoded = String::from_utf8(decoded).map_err(|_| error(format!("auths.{host}.auth is not UTF-8")))?;
                let (username, password) =
                    decoded.split_once(':').ok_or_else(|| error(format!("auths.{host}.auth is not `user:password`")))?;
                return Ok(Lookup::Known(RegistryAuth::Basic(username.to_owned(), password.to_owned())));
            }
        }
        Ok(match helper {
            Some(helper) => Lookup::Helper(helper.clone()),
            None => Lookup::Known(RegistryAuth::Anonymous),
        })
    }
}

/// Where a host's credentials are.
#[derive(Debug)]
enum Lookup {
    Known(RegistryAuth),
    /// The name of the `docker-credential-NAME` helper to run.
    Helper(String),
}

/// `https://host/v1/` and `host` both name `host`.
fn auth_key_host(key: &str) -> &str {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

/// How long a credential helper may take: some ask a cloud API.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

async fn run_helper(helper: &str, host: &str) -> Result<RegistryAuth, String> {
    use tokio::io::AsyncWriteExt;
    let program = format!("docker-credential-{helper}");
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(host.as_bytes()).await;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not answer within {} s", HELPER_TIMEOUT.as_secs()))?
        .map_err(|error| format!("{program}: {error}"))?;
    if !output.status.success() {
        // Helpers answer "credentials not found" with a failure: anonymous then.
        return Ok(RegistryAuth::Anonymous);
    }
    let answer: HelperAnswer = serde_json::from_slice(&output.stdout).map_err(|error| format!("{program} answered: {error}"))?;
    Ok(RegistryAuth::Basic(answer.username, answer.secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer is fresh for the TTL and a fallback after; what a record
    /// says is only a fallback (which then is fresh for a TTL) and never
    /// overrides an answer; a forgotten tag has no fallback.
    #[test]
    fn tag_memory() {
        let tag = ModelRef::parse("registry.local/models/a:v1").unwrap();
        let (one, two) = (Digest::of(b"one"), Digest::of(b"two"));
        let trusting = TagMemory::new(Duration::from_secs(3600));
        trusting.recall(tag.as_str(), &one);
        assert_eq!(trusting.fresh(&tag), None);
        assert_eq!((trusting.fall_back(&tag), trusting.fresh(&tag)), (Some(one.clone()), Some(one.clone())));
        trusting.remember(&tag, &two);
        trusting.recall(tag.as_str(), &one);
        assert_eq!(trusting.fresh(&tag), Some(two.clone()));
        let asking = TagMemory::new(Duration::ZERO);
        asking.remember(&tag, &two);
        assert_eq!((asking.fresh(&tag), asking.fall_back(&tag)), (None, Some(two)));
        asking.forget(&tag);
        assert_eq!(asking.fall_back(&tag), None);
    }

    /// Credentials come from `auths` (either form), keyed by host.
    #[test]
    fn docker_config_auths() {
        let dir = tempfile::tempdir().unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            dir.path().join("config.json"),
            format!(r#"{{"auths": {{"https://one.local/v1/": {{"auth": "{encoded}"}}, "two.local:5000": {{"username": "bob", "password": "pw"}}}}}}"#),
        )
        .unwrap();
        let credentials = Credentials::read(Some(&dir.path().join("config.json"))).unwrap();
        let auth = |text: &str| {
            let reference = ModelRef::parse(text).unwrap();
            match credentials.lookup(&reference, reference.registry()).unwrap() {
                Lookup::Known(auth) => auth,
                helper => panic!("{helper:?}"),
            }
        };
        assert!(matches!(auth("one.local/m:1"), RegistryAuth::Basic(user, password) if user == "alice" && password == "s3cret"));
        assert!(matches!(auth("two.local:5000/m:1"), RegistryAuth::Basic(user, _) if user == "bob"));
        assert!(matches!(auth("three.local/m:1"), RegistryAuth::Anonymous));
        std::fs::write(dir.path().join("config.json"), "{nope").unwrap();
        assert!(matches!(Credentials::read(Some(&dir.path().join("config.json"))), Err(RegistryError::Credentials { .. })));
    }

    /// A changed credentials file makes a new session with what it now says;
    /// one that no longer parses keeps the last; a renewal asked for by many
    /// holders of one refused session happens once.
    #[tokio::test]
    async fn sessions_follow_the_credentials_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        let write = |text: String| {
            std::fs::write(dir.path().join("next.json"), text).unwrap();
            std::fs::rename(dir.path().join("next.json"), &file).unwrap();
        };
        let basic = |user: &str| format!(r#"{{"auths": {{"one.local": {{"username": "{user}", "password": "pw"}}}}}}"#);
        let reference = ModelRef::parse("one.local/m:1").unwrap();
        let auth = async |session: &Session| session.auth(&reference, "one.local").await.unwrap();
        let user = async |session: &Session| match auth(session).await {
            RegistryAuth::Basic(user, _) => user,
            other => panic!("{other:?}"),
        };
        write(basic("alice"));
        let registry =
            Registry::new(RegistryConfig { docker_config: Some(dir.path().to_owned()), ..RegistryConfig::default() }).unwrap();
        let first = registry.session();
        assert!(Arc::ptr_eq(&first, &registry.session()));
        assert_eq!(user(&first).await, "alice");

        write(basic("bob"));
        let second = registry.session();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!((user(&second).await, user(&first).await), ("bob".to_owned(), "alice".to_owned()));

        write("{ half-written".into());
        assert!(Arc::ptr_eq(&second, &registry.session()));

        let renewed = registry.renew(&second);
        assert!(!Arc::ptr_eq(&second, &renewed));
        assert!(Arc::ptr_eq(&renewed, &registry.renew(&second)));
        assert_eq!(user(&renewed).await, "bob");

        std::fs::remove_file(&file).unwrap();
        let anonymous = registry.session();
        assert!(matches!(auth(&anonymous).await, RegistryAuth::Anonymous));
    }

    /// A TLS refusal is found however deep it is wrapped, io::Errors
    /// included (whose `source` skips what they wrap), and only an unknown
    /// issuer gets the hint about private CAs.
    #[test]
    fn certificate_refusals_are_found_in_error_chains() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Connect(#[source] std::io::Error);
        let wrapped =
            |error: rustls::Error| Connect(std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, error)));
        let unknown = wrapped(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert!(certificate_refusal(&unknown).is_some_and(|reason| reason.contains("ca-certificates")));
        let expired = wrapped(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired));
        assert!(certificate_refusal(&expired).is_some_and(|reason| !reason.contains("ca-certificates")));
        assert_eq!(certificate_refusal(&Connect(std::io::Error::other("connection refused"))), None);
    }

    /// Backoff doubles and is capped.
    #[test]
    fn backoff_doubles() {
        let registry = Registry::new(RegistryConfig::default()).unwrap();
        assert_eq!(registry.backoff(1), Duration::from_millis(200));
        assert_eq!(registry.backoff(3), Duration::from_millis(800));
        assert_eq!(registry.backoff(30), Duration::from_secs(10));
    }
}
