//! A blob streamed from a registry into a [`BlobSink`]: from the mirrors,
//! then the origin, resumed where the sink stands, within a download slot.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use modelcache_policy::size::HumanBytes;
use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::manifest::OciDescriptor;
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::credential::Credential;
use super::retry::{Failure, classify};
use super::session::Session;
use super::{ModelRef, Registry, RegistryError};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::flight::Progress;
use crate::modelpack::Descriptor;

/// Where a blob's bytes go as they arrive: something that appends them,
/// says how many it holds (where a resumed download starts), and can start
/// over. The sink, not the registry, checks what it was given (size and
/// digest) once the download is done.
pub trait BlobSink {
    /// What goes wrong writing.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Appends `bytes`.
    fn write(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Bytes held so far, every write before it included.
    fn position(&mut self) -> impl Future<Output = Result<u64, Self::Error>> + Send;

    /// Drops what it holds, to be written again from byte 0.
    fn restart(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// What kind of failure `error` is: [`RegistryError::Sink`] reports it
    /// as its own.
    fn error_kind(error: &Self::Error) -> ErrorKind;
}

/// The registry's error for a failure of `sink`, the sink's error its source.
fn sink_failed<S: BlobSink>(reference: &ModelRef, error: S::Error) -> RegistryError {
    RegistryError::Sink { reference: reference.to_string(), kind: S::error_kind(&error), source: Box::new(error) }
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

impl Registry {
    /// Streams the blob `blob` into `sink`, from the first mirror that has
    /// it, else the origin, resuming after interruptions with Range requests
    /// from what `sink` holds (a mirror's partial bytes are kept and the
    /// next host continues from there). `slot` is held while bytes are read
    /// and let go during each backoff.
    ///
    /// Every request asks for a range, even from byte 0: a 206 answer is not
    /// hashed by the client library, so the bytes are hashed once, by the
    /// sink (the store's ingest, off the network task). A registry that
    /// answers 200 instead is followed from the start.
    ///
    /// An attempt is interrupted (and resumed, up to `attempts`) when no byte
    /// comes for `stall_timeout`, headers included, or when a
    /// `stall_timeout` window brings less than `min_rate`. A registry that
    /// sends more than `blob.size` bytes is not read further.
    ///
    /// # Errors
    /// Not found, denied, unavailable (a stall or a trickle among the
    /// causes), [`RegistryError::Oversized`], or [`RegistryError::Sink`].
    pub async fn fetch_blob<S: BlobSink>(
        &self,
        reference: &ModelRef,
        blob: &Descriptor,
        sink: &mut S,
        progress: &Progress,
        slot: &mut DownloadSlot<'_>,
        credential: &Credential,
    ) -> Result<(), RegistryError> {
        if blob.size == 0 {
            return Ok(());
        }
        let session = self.session_for(credential)?;
        for mirror in self.config.mirrors.get(reference.registry()).into_iter().flatten() {
            match self.fetch_blob_at(&session, reference, &mirror.host, blob, sink, progress, slot, 1).await {
                Ok(()) => return Ok(()),
                Err(error @ (RegistryError::Sink { .. } | RegistryError::Stopped { .. })) => return Err(error),
                Err(error) => tracing::debug!(mirror = %mirror.host, blob = %blob.digest.short(), "mirror failed: {error}"),
            }
        }
        let origin = reference.registry();
        match self.fetch_blob_at(&session, reference, origin, blob, sink, progress, slot, self.config.attempts).await {
            // What is already written stays: the renewed session resumes it.
            Err(RegistryError::Denied { .. })
                if matches!(credential, Credential::Node) && session.renewable(reference, origin).await =>
            {
                let session = self.renew(&session);
                self.fetch_blob_at(&session, reference, origin, blob, sink, progress, slot, self.config.attempts).await
            }
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob_at<S: BlobSink>(
        &self,
        session: &Session,
        reference: &ModelRef,
        host: &str,
        blob: &Descriptor,
        sink: &mut S,
        progress: &Progress,
        slot: &mut DownloadSlot<'_>,
        attempts: u32,
    ) -> Result<(), RegistryError> {
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
            let offset = sink.position().await.map_err(|error| sink_failed::<S>(reference, error))?;
            if offset >= blob.size {
                return Ok(());
            }
            slot.hold().await.map_err(|_| RegistryError::Stopped { reference: reference.to_string() })?;
            let read = self.read_blob(session, reference, &image, &descriptor, host, blob, offset, sink, progress);
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
    async fn read_blob<S: BlobSink>(
        &self,
        session: &Session,
        reference: &ModelRef,
        image: &Reference,
        descriptor: &OciDescriptor,
        host: &str,
        blob: &Descriptor,
        offset: u64,
        sink: &mut S,
        progress: &Progress,
    ) -> Result<(), Failure> {
        let sink_failure = |error| Failure::Permanent(sink_failed::<S>(reference, error));
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
                    sink.restart().await.map_err(sink_failure)?;
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
                    sink.write(bytes).await.map_err(sink_failure)?;
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
}
