//! What retrying can fix: client errors sorted into transient and
//! permanent, mirrors tried once each before the origin, and the origin
//! retried with exponential backoff.

use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::credential::Credential;
use super::session::Session;
use super::tls::certificate_refusal;
use super::{ModelRef, Registry, RegistryError};

/// Why an attempt failed, sorted by whether another attempt could succeed.
pub(super) enum Failure {
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
    /// Tries `operation` at each mirror of the reference's registry, once
    /// each, then at the origin with retries. Any failure at a mirror falls
    /// through to the next host, as containerd's hosts.toml mirrors do. When
    /// the origin refuses what a credential helper gave, all of it runs once
    /// more with a renewed session.
    pub(super) async fn across_hosts<T, F, Fut>(
        &self,
        reference: &ModelRef,
        credential: &Credential,
        what: &str,
        resolving: bool,
        mut operation: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Client, Reference, RegistryAuth) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let session = self.session_for(credential)?;
        match self.across_hosts_with(&session, reference, what, resolving, &mut operation).await {
            Err(RegistryError::Denied { reason, .. })
                if matches!(credential, Credential::Node) && session.renewable(reference, reference.registry()).await =>
            {
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

    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        reference: &ModelRef,
        what: &str,
        mut operation: F,
    ) -> Result<T, RegistryError>
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

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        (self.config.backoff * 2u32.saturating_pow(attempt.saturating_sub(1))).min(Duration::from_secs(10))
    }
}

/// Sorts a client error into what retrying can and cannot fix.
pub(super) fn classify(reference: &ModelRef, error: OciDistributionError) -> Failure {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RegistryConfig;

    /// Backoff doubles and is capped.
    #[test]
    fn backoff_doubles() {
        let registry = Registry::new(RegistryConfig::default()).unwrap();
        assert_eq!(registry.backoff(1), Duration::from_millis(200));
        assert_eq!(registry.backoff(3), Duration::from_millis(800));
        assert_eq!(registry.backoff(30), Duration::from_secs(10));
    }
}
