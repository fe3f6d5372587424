//! Blobs: streamed in from the network, hashed and written on a blocking
//! thread, checked and published read-only; and the small ones read back.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::digest::Digest;
use crate::durable::{seal_file, sync_dir};
use crate::modelpack::Descriptor;

use super::{Store, StoreError, io_error};

/// Bytes buffered by a blob writer before each `write(2)`.
const WRITE_BUFFER: usize = 1 << 20;
/// Chunks in flight between the network task and a blob writer: enough to
/// keep both busy. Each chunk may pin a whole read buffer of the HTTP client,
/// so more of them cost memory, not speed (docs/benchmarks.md, B6).
const CHANNEL_CHUNKS: usize = 8;

impl Store {
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.layout.blob(digest).is_file()
    }

    /// Reads a stored blob (manifests and configs: small).
    ///
    /// # Errors
    /// When it is not stored or unreadable.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.layout.blob(digest);
        fs::read(&path).map_err(io_error("read", &path))
    }

    /// Stores `bytes` (already verified to hash to `digest`) as a blob.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if Digest::of(bytes) != *digest {
            return Err(StoreError::DigestMismatch { digest: digest.clone(), actual: Digest::of(bytes) });
        }
        if self.has_blob(digest) {
            return Ok(());
        }
        let mut file = self.temp_file("blob")?;
        file.write_all(bytes).map_err(io_error("write", file.path()))?;
        self.publish_blob(file, digest, bytes.len() as u64, None, None)
    }

    fn temp_file(&self, purpose: &str) -> Result<tempfile::NamedTempFile, StoreError> {
        let tmp = self.layout.tmp();
        tempfile::Builder::new().prefix(&format!("{purpose}-")).tempfile_in(&tmp).map_err(io_error("create a temporary in", &tmp))
    }

    /// fsync, read-only, mtime, rename into `blobs/`, fsync the directory.
    fn publish_blob(
        &self,
        file: tempfile::NamedTempFile,
        digest: &Digest,
        size: u64,
        mode: Option<u32>,
        mtime: Option<SystemTime>,
    ) -> Result<(), StoreError> {
        let target = self.layout.blob(digest);
        seal_file(file.as_file(), file.path(), mode, mtime)?;
        {
            // The blob may be there already: a flight aborted while its
            // blocking step ran on (nothing stops one) and the flight that
            // retried can both get here. Same digest, same bytes: the second
            // drops its copy and does not count the bytes again.
            let mut state = self.state();
            if target.exists() {
                return Ok(());
            }
            file.persist(&target).map_err(|error| StoreError::Io {
                action: "publish",
                path: target.clone(),
                source: error.error,
            })?;
            state.cache_bytes += size;
        }
        Ok(sync_dir(&self.layout.blobs())?)
    }

    /// Starts writing the blob `blob`; the bytes are hashed and written on a
    /// blocking thread, away from the network task that feeds them.
    ///
    /// # Errors
    /// When the temporary cannot be created.
    pub fn ingest(self: &Arc<Self>, blob: &Descriptor) -> Result<Ingest, StoreError> {
        let temp = self.temp_file("ingest")?;
        let file = temp.reopen().map_err(io_error("open", temp.path()))?;
        let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
        let limit = blob.size;
        let writer = tokio::task::spawn_blocking(move || run_writer(file, limit, receiver));
        Ok(Ingest { store: self.clone(), blob: blob.clone(), temp: Some(temp), sender: Some(sender), writer: Some(writer) })
    }
}

/// A write that failed: kept by the writer and reported at every later
/// `position` and at `commit`, so a blob with a hole is never published.
type Failure = Arc<io::Error>;

/// A blob being written. Dropped before [`Ingest::commit`], it leaves nothing.
#[derive(Debug)]
pub struct Ingest {
    store: Arc<Store>,
    blob: Descriptor,
    temp: Option<tempfile::NamedTempFile>,
    sender: Option<mpsc::Sender<Command>>,
    writer: Option<tokio::task::JoinHandle<Result<Written, Failure>>>,
}

#[derive(Debug)]
enum Command {
    Data(Bytes),
    Position(oneshot::Sender<Result<u64, Failure>>),
    Restart(oneshot::Sender<io::Result<()>>),
}

#[derive(Debug)]
struct Written {
    bytes: u64,
    digest: Digest,
}

impl Ingest {
    fn sender(&self) -> Result<&mpsc::Sender<Command>, StoreError> {
        self.sender.as_ref().ok_or(StoreError::WriterGone)
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// When the writer has stopped (its error surfaces at `position` or `commit`).
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        self.sender()?.send(Command::Data(bytes)).await.map_err(|_| StoreError::WriterGone)
    }

    /// Bytes written and hashed so far (waits for the writer to catch up).
    ///
    /// # Errors
    /// The writer's I/O error, or more bytes than the manifest states.
    pub async fn position(&mut self) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.send(Command::Position(reply)).await.map_err(|_| StoreError::WriterGone)?;
        let path = self.temp_path();
        answer.await.map_err(|_| StoreError::WriterGone)?.map_err(|source| StoreError::Write { path, source })
    }

    /// Starts over from byte 0.
    ///
    /// # Errors
    /// The writer's I/O error.
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.send(Command::Restart(reply)).await.map_err(|_| StoreError::WriterGone)?;
        let path = self.temp_path();
        answer.await.map_err(|_| StoreError::WriterGone)?.map_err(io_error("truncate", &path))
    }

    fn temp_path(&self) -> PathBuf {
        self.temp.as_ref().map(|temp| temp.path().to_owned()).unwrap_or_default()
    }

    /// Checks size and digest and publishes the blob with the layer's mode
    /// and mtime. On any failure nothing is published and the temporary goes.
    ///
    /// # Errors
    /// [`StoreError::SizeMismatch`], [`StoreError::DigestMismatch`] or I/O.
    pub async fn commit(mut self, mode: Option<u32>, mtime: Option<SystemTime>) -> Result<(), StoreError> {
        self.sender.take();
        let writer = self.writer.take().ok_or(StoreError::WriterGone)?;
        let path = self.temp_path();
        let written = writer
            .await
            .map_err(|source| StoreError::Blocking { source })?
            .map_err(|source| StoreError::Write { path, source })?;
        let digest = self.blob.digest.clone();
        if written.bytes != self.blob.size {
            return Err(StoreError::SizeMismatch { digest, expected: self.blob.size, actual: written.bytes });
        }
        if written.digest != digest {
            return Err(StoreError::DigestMismatch { digest, actual: written.digest });
        }
        let temp = self.temp.take().ok_or(StoreError::WriterGone)?;
        let store = self.store.clone();
        let size = self.blob.size;
        tokio::task::spawn_blocking(move || store.publish_blob(temp, &digest, size, mode, mtime))
            .await
            .map_err(|source| StoreError::Blocking { source })?
    }
}

/// The blocking side of an [`Ingest`]: hash, buffer, write.
fn run_writer(mut file: File, limit: u64, mut receiver: mpsc::Receiver<Command>) -> Result<Written, Failure> {
    let mut hasher = Sha256::new();
    let mut buffer = Vec::with_capacity(WRITE_BUFFER);
    let mut bytes = 0u64;
    let mut failure: Option<Failure> = None;
    while let Some(command) = receiver.blocking_recv() {
        match command {
            Command::Data(chunk) => {
                if failure.is_some() {
                    continue;
                }
                bytes += chunk.len() as u64;
                if bytes > limit {
                    // Counted, not kept: the commit reports the size mismatch.
                    continue;
                }
                hasher.update(&chunk);
                // A large chunk (the HTTP client hands over whole reads, often
                // hundreds of KiB) goes to the file as it is, not through the
                // buffer: a copy there would cost CPU and save no write(2).
                let written = if chunk.len() >= WRITE_BUFFER / 4 {
                    file.write_all(&buffer).and_then(|()| file.write_all(&chunk))
                } else {
                    buffer.extend_from_slice(&chunk);
                    if buffer.len() < WRITE_BUFFER {
                        continue;
                    }
                    file.write_all(&buffer)
                };
                buffer.clear();
                if let Err(error) = written {
                    failure = Some(Arc::new(error));
                }
            }
            Command::Position(reply) => {
                let answer = if let Some(error) = &failure {
                    Err(error.clone())
                } else {
                    match file.write_all(&buffer) {
                        Ok(()) => Ok(bytes),
                        Err(error) => {
                            let error = Arc::new(error);
                            failure = Some(error.clone());
                            Err(error)
                        }
                    }
                };
                buffer.clear();
                let _ = reply.send(answer);
            }
            Command::Restart(reply) => {
                buffer.clear();
                bytes = 0;
                hasher = Sha256::new();
                failure = None;
                let _ = reply.send(file.set_len(0).and_then(|()| {
                    use std::io::Seek;
                    file.seek(io::SeekFrom::Start(0)).map(drop)
                }));
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    file.write_all(&buffer)?;
    Ok(Written { bytes, digest: Digest::from_hasher(hasher) })
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // The temporary file goes with `temp`; the writer ends when the
        // channel closes and writes only into the unlinked file.
        self.sender.take();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::error::ErrorKind;
    use crate::store::tests::{descriptor, tmp_is_empty};

    /// A blob streamed in chunks is hashed, checked and published read-only.
    #[tokio::test(flavor = "multi_thread")]
    async fn ingest_publishes_verified_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let content: Vec<u8> = (0..3 * WRITE_BUFFER + 5).map(|index| (index * 31 % 251) as u8).collect();
        let blob = descriptor(&content);
        let mut ingest = store.ingest(&blob).unwrap();
        // Small chunks are buffered, large ones written as they come: in order.
        let (mut rest, mut sizes) = (&content[..], [100_000, 300_000, 7, WRITE_BUFFER].into_iter().cycle());
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(sizes.next().unwrap().min(rest.len()));
            ingest.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            rest = after;
        }
        assert_eq!(ingest.position().await.unwrap(), content.len() as u64);
        ingest.commit(None, None).await.unwrap();
        let path = store.layout.blob(&blob.digest);
        assert!(fs::read(&path).unwrap() == content, "the published bytes differ from those streamed");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(store.cache_bytes(), content.len() as u64);
        assert!(tmp_is_empty(&store));
    }

    /// Wrong bytes, too many bytes or too few publish nothing and leave no
    /// temporary behind.
    #[tokio::test(flavor = "multi_thread")]
    async fn mismatches_publish_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let blob = descriptor(b"expected");
        for sent in [&b"EXPECTED"[..], b"expected and more", b"exp"] {
            let mut ingest = store.ingest(&blob).unwrap();
            ingest.write(Bytes::copy_from_slice(sent)).await.unwrap();
            let error = ingest.commit(None, None).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::DataLoss, "{error}");
            assert!(!store.has_blob(&blob.digest));
            assert!(tmp_is_empty(&store));
        }
    }

    /// A restart forgets what was written; a dropped ingest leaves nothing.
    #[tokio::test(flavor = "multi_thread")]
    async fn restart_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let blob = descriptor(b"abcdef");
        let mut ingest = store.ingest(&blob).unwrap();
        ingest.write(Bytes::from_static(b"zzz")).await.unwrap();
        ingest.restart().await.unwrap();
        assert_eq!(ingest.position().await.unwrap(), 0);
        ingest.write(Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(ingest.position().await.unwrap(), 3);
        ingest.write(Bytes::from_static(b"def")).await.unwrap();
        ingest.commit(Some(0o755), None).await.unwrap();
        assert_eq!(fs::metadata(store.layout.blob(&blob.digest)).unwrap().permissions().mode() & 0o777, 0o555);

        let other = descriptor(b"never finished");
        let mut ingest = store.ingest(&other).unwrap();
        ingest.write(Bytes::from_static(b"never")).await.unwrap();
        drop(ingest);
        assert!(tmp_is_empty(&store));
    }

    /// A blob published twice (a retry beside a step of an aborted flight
    /// that ran on) is stored and counted once, with no temporary left.
    #[test]
    fn a_blob_published_twice_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let bytes = b"weights";
        let digest = Digest::of(bytes);
        for _ in 0..2 {
            let mut file = store.temp_file("blob").unwrap();
            file.write_all(bytes).unwrap();
            store.publish_blob(file, &digest, bytes.len() as u64, None, None).unwrap();
        }
        assert_eq!(store.cache_bytes(), bytes.len() as u64);
        assert_eq!(store.read_blob(&digest).unwrap(), bytes);
        assert!(tmp_is_empty(&store));
    }
}
