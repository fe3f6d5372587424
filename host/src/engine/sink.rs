//! Glue the engine uses to pull a blob: the store's [`Ingest`] as the
//! registry's [`BlobSink`], so neither of the two knows the other.

use bytes::Bytes;

use crate::error::ErrorKind;
use crate::registry::BlobSink;
use crate::store::{Ingest, StoreError};

impl BlobSink for Ingest {
    type Error = StoreError;

    async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        Ingest::write(self, bytes).await
    }

    async fn position(&mut self) -> Result<u64, StoreError> {
        Ingest::position(self).await
    }

    async fn restart(&mut self) -> Result<(), StoreError> {
        Ingest::restart(self).await
    }

    fn error_kind(error: &StoreError) -> ErrorKind {
        error.kind()
    }
}
