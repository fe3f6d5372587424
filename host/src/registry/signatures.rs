//! Signature material a registry holds for a manifest, found without the
//! model's blobs: cosign's keyed signatures (the `sha256-<hex>.sig` tag)
//! and the manifest's OCI referrers (the referrers API, else the
//! `sha256-<hex>` tag's index). Nothing here judges a signature: the verify
//! policy does.
//!
//! A registry is not trusted to keep it small: at most [`MAX_SIGNATURES`]
//! signatures of at most [`MAX_PAYLOAD`] bytes each (cut off past the size
//! declared), and [`MAX_REFERRERS`] referrers; each payload is checked
//! against its digest. The signature manifest and the referrers index are
//! read by the client whole (the engine bounds the whole gathering in time).

use std::collections::BTreeMap;

use oci_client::Reference;
use oci_client::manifest::OciDescriptor;
use serde::Deserialize;

use super::credential::Credential;
use super::retry::{Failure, classify};
use super::{ModelRef, Registry, RegistryError};
use crate::digest::Digest;

/// Cosign signatures read per manifest at most.
pub const MAX_SIGNATURES: usize = 16;
/// Bytes of one cosign payload at most (a simple-signing payload is ~250).
pub const MAX_PAYLOAD: u64 = 64 << 10;
/// Referrers listed per manifest at most.
pub const MAX_REFERRERS: usize = 64;

const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// A cosign signature as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundCosign {
    pub payload: Vec<u8>,
    pub signature: String,
    pub annotations: BTreeMap<String, String>,
}

/// A referrer as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundReferrer {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct SignatureManifest {
    #[serde(default)]
    layers: Vec<SignatureLayer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignatureLayer {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Bytes kept in memory, refusing to grow past the size a manifest
/// declared: a registry that sends more is cut off mid-read.
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
}

impl tokio::io::AsyncWrite for Bounded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.bytes.len() + buf.len() > self.limit {
            return std::task::Poll::Ready(Err(std::io::Error::other("the blob runs past the size its manifest states")));
        }
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// `sha256:<hex>` as a tag: `sha256-<hex>`.
fn digest_tag(digest: &Digest) -> String {
    digest.to_string().replace(':', "-")
}

impl Registry {
    /// The cosign signatures of the manifest `digest` in `reference`'s
    /// repository; none when the `.sig` tag does not exist.
    ///
    /// # Errors
    /// Denied, unavailable, or a signature manifest or payload that is not
    /// what it claims.
    pub async fn cosign_signatures(
        &self,
        reference: &ModelRef,
        digest: &Digest,
        credential: &Credential,
    ) -> Result<Vec<FoundCosign>, RegistryError> {
        let tag = format!("{}.sig", digest_tag(digest));
        let accept = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];
        let fetched = self
            .across_hosts(reference, credential, "reading cosign signatures", false, |client, image, auth| {
                let tag = tag.clone();
                async move {
                    let at = Reference::with_tag(image.registry().to_owned(), image.repository().to_owned(), tag);
                    let (bytes, _) =
                        client.pull_manifest_raw(&at, &auth, &accept).await.map_err(|error| classify(reference, error))?;
                    let manifest: SignatureManifest = serde_json::from_slice(&bytes).map_err(|error| {
                        Failure::Permanent(RegistryError::Protocol {
                            reference: reference.to_string(),
                            reason: format!("the cosign signature manifest does not parse: {error}"),
                        })
                    })?;
                    let mut found = Vec::new();
                    for layer in
                        manifest.layers.into_iter().filter(|layer| layer.media_type == SIMPLE_SIGNING).take(MAX_SIGNATURES)
                    {
                        let Some(signature) = layer.annotations.get(SIGNATURE_ANNOTATION).cloned() else { continue };
                        let protocol = |reason: String| {
                            Failure::Permanent(RegistryError::Protocol { reference: reference.to_string(), reason })
                        };
                        if layer.size > MAX_PAYLOAD {
                            return Err(protocol(format!("a cosign payload of {} bytes (at most {MAX_PAYLOAD})", layer.size)));
                        }
                        let expected: Digest =
                            layer.digest.parse().map_err(|error| protocol(format!("a cosign payload's digest {error}")))?;
                        let descriptor = OciDescriptor {
                            media_type: layer.media_type.clone(),
                            digest: layer.digest.clone(),
                            size: layer.size as i64,
                            ..OciDescriptor::default()
                        };
                        let mut payload = Bounded { bytes: Vec::new(), limit: layer.size as usize };
                        client.pull_blob(&image, &descriptor, &mut payload).await.map_err(|error| classify(reference, error))?;
                        let payload = payload.bytes;
                        if Digest::of(&payload) != expected {
                            return Err(protocol(format!("the cosign payload {} does not match its digest", layer.digest)));
                        }
                        found.push(FoundCosign { payload, signature, annotations: layer.annotations });
                    }
                    Ok(found)
                }
            })
            .await;
        match fetched {
            Err(RegistryError::NotFound { .. }) => Ok(Vec::new()),
            other => other,
        }
    }

    /// The referrers of the manifest `digest`: the registry's referrers API,
    /// else the `sha256-<hex>` tag's index (as the distribution spec says).
    ///
    /// # Errors
    /// Denied or unavailable.
    pub async fn referrers(
        &self,
        reference: &ModelRef,
        digest: &Digest,
        credential: &Credential,
    ) -> Result<Vec<FoundReferrer>, RegistryError> {
        let index = self
            .across_hosts(reference, credential, "listing referrers", false, |client, image, auth| async move {
                let at = reference.at(image.registry(), digest);
                client.store_auth_if_needed(at.resolve_registry(), &auth).await;
                client.pull_referrers(&at, None).await.map_err(|error| classify(reference, error))
            })
            .await;
        let index = match index {
            Err(RegistryError::NotFound { .. }) => return Ok(Vec::new()),
            other => other?,
        };
        Ok(index
            .manifests
            .into_iter()
            .take(MAX_REFERRERS)
            .map(|entry| FoundReferrer {
                digest: entry.digest,
                artifact_type: entry.artifact_type.unwrap_or_default(),
                media_type: entry.media_type,
                size: u64::try_from(entry.size).unwrap_or(0),
                annotations: entry.annotations.unwrap_or_default(),
            })
            .collect())
    }
}
