//! Who may mount what: the admission decision, the credentials a mount may
//! use, and the proof that its requester may read the manifest it gets.
//!
//! The cache is not a side door. Every mount proves, before it is served
//! anything (a cached tree, a pull under way, a manifest in the store), that
//! the registry would give its requester that manifest: a public manifest
//! (served without credentials) needs no more; otherwise one HEAD request
//! by digest with the requester's credentials, remembered per credential
//! and digest for the access TTL, as Kubernetes' "ensure secret pulled
//! images" (KEP-2535) does for images. A refusal says the same whatever the
//! cache holds.
//!
//! While the registry cannot be reached, a proof older than the TTL still
//! counts (a node keeps serving what it served, as tags do); at start the
//! public and node proofs are learned from the volume records. Pull-secret
//! proofs live in memory only: they are kept by fingerprint, which means
//! nothing outside this process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Engine, EngineError};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::plugins::admission::{AdmissionInput, AdmissionVerdict, Grant};
use crate::plugins::exclude::ExcludeOptions;
use crate::registry::{Credential, Fingerprint, ModelRef};
use modelcache_api::record::Proof;
use modelcache_api::tenancy::{RegistryCredentials, Requester};

/// What tells accesses apart: the pull secret's fingerprint, and whether the
/// node's credentials may be used.
pub(super) type AccessKey = (Option<Fingerprint>, bool);

/// What one mount may use to reach registries, and for whom.
#[derive(Clone, Debug)]
pub struct Access {
    pub requester: Requester,
    /// The mount's pull secret, tried first.
    pull_secret: Option<Credential>,
    /// Whether the node's own credentials may be tried after it.
    node: bool,
    /// The tenant the mount counts under.
    pub tenant: Option<String>,
}

impl Access {
    /// The node operator's: the node's credentials, nobody in particular.
    pub fn operator() -> Access {
        Access { requester: Requester::default(), pull_secret: None, node: true, tenant: None }
    }

    /// The credentials to try, in order: the pull secret, then the node's;
    /// none at all when neither is allowed.
    pub(super) fn credentials(&self) -> Vec<Credential> {
        let mut credentials: Vec<Credential> = self.pull_secret.iter().cloned().collect();
        if self.node {
            credentials.push(Credential::Node);
        }
        if credentials.is_empty() {
            credentials.push(Credential::Anonymous);
        }
        credentials
    }

    /// What tells this access apart in flights of tag resolutions.
    pub(super) fn key(&self) -> AccessKey {
        (self.pull_secret.as_ref().and_then(fingerprint), self.node)
    }
}

fn fingerprint(credential: &Credential) -> Option<Fingerprint> {
    match credential {
        Credential::Given(given) => Some(given.fingerprint()),
        _ => None,
    }
}

/// Who was shown to be able to read a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Holder {
    Anyone,
    Node,
    Secret(Fingerprint),
}

impl Holder {
    fn of(credential: &Credential) -> Holder {
        match credential {
            Credential::Anonymous => Holder::Anyone,
            Credential::Node => Holder::Node,
            Credential::Given(given) => Holder::Secret(given.fingerprint()),
        }
    }
}

/// Where a manifest was asked about: `registry/repository`. A proof is
/// only ever for one repository: a registry answers for its own.
pub(super) type Repository = String;

pub(super) fn repository_of(reference: &ModelRef) -> Repository {
    format!("{}/{}", reference.registry(), reference.repository())
}

/// Proofs of access, by holder, repository and manifest: when each was last
/// shown, and for anonymous access also when it was last refused (so a
/// private model is not asked about anonymously on every mount). Also the
/// repositories each stored manifest was fetched from by its bytes: only
/// those may prove access by a HEAD request (see [`Engine::authorize`]).
#[derive(Debug)]
pub(super) struct AccessMemory {
    ttl: Duration,
    shown: Mutex<HashMap<(Holder, Repository, Digest), Instant>>,
    not_public: Mutex<HashMap<(Repository, Digest), Instant>>,
    origins: Mutex<std::collections::HashSet<(Repository, Digest)>>,
}

/// Proofs kept at most; past it the oldest half goes.
const KEPT: usize = 100_000;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl AccessMemory {
    pub(super) fn new(ttl: Duration) -> AccessMemory {
        AccessMemory { ttl, shown: Mutex::default(), not_public: Mutex::default(), origins: Mutex::default() }
    }

    /// Learns what a ready volume record states: its repository served the
    /// manifest, and the proof it names, as old as the TTL (good for an
    /// outage, asked again otherwise).
    pub(super) fn recall(&self, reference: &ModelRef, proof: Option<Proof>, digest: &Digest) {
        let repository = repository_of(reference);
        self.fetched_from(repository.clone(), digest);
        let holder = match proof {
            Some(Proof::Public) => Holder::Anyone,
            Some(Proof::Node) => Holder::Node,
            Some(Proof::PullSecret) | None => return,
        };
        let long_ago = Instant::now().checked_sub(self.ttl).unwrap_or_else(Instant::now);
        lock(&self.shown).entry((holder, repository, digest.clone())).or_insert(long_ago);
    }

    /// Notes that `repository` served the manifest's bytes.
    pub(super) fn fetched_from(&self, repository: Repository, digest: &Digest) {
        let mut origins = lock(&self.origins);
        if origins.len() >= KEPT {
            origins.clear();
        }
        origins.insert((repository, digest.clone()));
    }

    fn is_origin(&self, repository: &str, digest: &Digest) -> bool {
        lock(&self.origins).contains(&(repository.to_owned(), digest.clone()))
    }

    fn shown(&self, holder: Holder, repository: &str, digest: &Digest) -> Option<Instant> {
        lock(&self.shown).get(&(holder, repository.to_owned(), digest.clone())).copied()
    }

    fn fresh(&self, holder: Holder, repository: &str, digest: &Digest) -> bool {
        self.shown(holder, repository, digest).is_some_and(|at| at.elapsed() < self.ttl)
    }

    fn remember(&self, holder: Holder, repository: &str, digest: &Digest) {
        let mut shown = lock(&self.shown);
        if shown.len() >= KEPT {
            let mut ages: Vec<Instant> = shown.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            shown.retain(|_, at| *at > cut);
        }
        shown.insert((holder, repository.to_owned(), digest.clone()), Instant::now());
    }

    fn known_private(&self, repository: &str, digest: &Digest) -> bool {
        let refused = lock(&self.not_public).get(&(repository.to_owned(), digest.clone())).copied();
        refused.is_some_and(|at| at.elapsed() < self.ttl)
    }

    fn refused_anonymously(&self, repository: &str, digest: &Digest) {
        let mut refused = lock(&self.not_public);
        if refused.len() >= KEPT {
            refused.clear();
        }
        refused.insert((repository.to_owned(), digest.clone()), Instant::now());
    }
}

/// How a mount's requester was shown able to read its manifest, and the
/// credential its downloads then use.
pub(super) struct Authorized {
    pub(super) proof: Proof,
    pub(super) credential: Credential,
}

impl Engine {
    /// The admission decision for `requester` mounting `reference`, and the
    /// access it grants. Asked before any registry request.
    ///
    /// # Errors
    /// [`EngineError::Refused`] when a policy refuses; an unusable pull
    /// secret.
    pub(super) async fn admit_requester(
        &self,
        requester: &Requester,
        reference: &ModelRef,
        options: &ExcludeOptions,
        secret: Option<&RegistryCredentials>,
    ) -> Result<Access, EngineError> {
        let input = AdmissionInput { requester: requester.clone(), reference: reference.clone(), options: options.clone() };
        let plugins = self.plugins.current();
        let decision = tokio::task::spawn_blocking(move || plugins.admission(&input))
            .await
            .map_err(EngineError::join("ask the admission decision"))?;
        let Grant { node_credentials, tenant } = match decision.verdict {
            AdmissionVerdict::Admit(grant) => grant,
            AdmissionVerdict::Deny { reason, .. } => {
                crate::metrics::metrics().admissions.inc([&self.tenant_label(None), "refused"]);
                return Err(EngineError::Refused { requester: requester.to_string(), reference: reference.to_string(), reason });
            }
        };
        crate::metrics::metrics().admissions.inc([&self.tenant_label(tenant.as_deref()), "admitted"]);
        let pull_secret = secret.map(|secret| self.registry.pull_secret(reference, secret)).transpose()?;
        Ok(Access { requester: requester.clone(), pull_secret, node: node_credentials, tenant })
    }

    /// Shows that `access` may read the manifest `digest` of `reference`'s
    /// repository (see the module docs), or refuses.
    ///
    /// A HEAD request proves access only at a repository that served the
    /// manifest's bytes before (an origin): any other registry could answer
    /// a HEAD for a digest it does not have. Elsewhere the manifest is
    /// fetched by digest and its bytes checked, which makes that repository
    /// an origin.
    ///
    /// # Errors
    /// [`EngineError::AccessDenied`] (the same whatever the cache holds), not
    /// found, or unavailable with no earlier proof to fall back on (for a
    /// tenant, [`EngineError::AccessUnavailable`], which names no URL).
    pub(super) async fn authorize(
        &self,
        reference: &ModelRef,
        digest: &Digest,
        access: &Access,
    ) -> Result<Authorized, EngineError> {
        let memory = &self.access;
        let repository = repository_of(reference);
        let authorized = |proof, credential| Ok(Authorized { proof, credential });
        if memory.fresh(Holder::Anyone, &repository, digest) {
            return authorized(Proof::Public, Credential::Anonymous);
        }
        let credentials = access.credentials();
        for credential in &credentials {
            if memory.fresh(Holder::of(credential), &repository, digest) {
                return authorized(proof_of(credential), credential.clone());
            }
        }
        // Public first: one anonymous request per manifest and TTL spares
        // every later requester its own. Its answer is never the requester's.
        let probe = !memory.known_private(&repository, digest) && !matches!(credentials[..], [Credential::Anonymous]);
        let to_ask = probe.then_some(Credential::Anonymous).into_iter().chain(credentials.iter().cloned());
        let mut unavailable = None;
        let mut not_found = None;
        for (index, credential) in to_ask.enumerate() {
            let probing = probe && index == 0;
            let checked = if memory.is_origin(&repository, digest) {
                self.registry.check_manifest(reference, digest, &credential).await
            } else {
                self.registry.fetch_manifest(reference, digest, &credential).await.map(drop)
            };
            match checked {
                Ok(()) => {
                    memory.fetched_from(repository.clone(), digest);
                    memory.remember(Holder::of(&credential), &repository, digest);
                    return authorized(proof_of(&credential), credential);
                }
                Err(error) => {
                    tracing::debug!(%reference, credential = ?credential, "access check: {}", crate::plugins::error_chain(&error));
                    if probing {
                        if error.kind() != ErrorKind::Unavailable {
                            memory.refused_anonymously(&repository, digest);
                        }
                        continue;
                    }
                    match error.kind() {
                        ErrorKind::Unavailable => unavailable = Some(error),
                        ErrorKind::NotFound => not_found = Some(error),
                        ErrorKind::PermissionDenied => {}
                        _ => return Err(error.into()),
                    }
                }
            }
        }
        if let Some(error) = unavailable {
            // An outage: an earlier proof of any age still counts.
            let earlier = std::iter::once(Credential::Anonymous)
                .chain(credentials)
                .find(|credential| memory.shown(Holder::of(credential), &repository, digest).is_some());
            return match earlier {
                Some(credential) => {
                    tracing::warn!(%reference, %digest, "registry unreachable: access shown earlier still counts: {}", crate::plugins::error_chain(&error));
                    authorized(proof_of(&credential), credential)
                }
                None => Err(self.unavailable(reference, access, error)),
            };
        }
        match not_found {
            Some(error) => Err(error.into()),
            None => Err(self.access_denied(reference, &access.requester)),
        }
    }

    /// A registry that cannot be reached, as a tenant may learn of it: the
    /// same text whatever the cache holds, with no URL (the daemon logs the
    /// cause). The operator gets the cause itself.
    pub(super) fn unavailable(
        &self,
        reference: &ModelRef,
        access: &Access,
        error: crate::registry::RegistryError,
    ) -> EngineError {
        if access.requester.is_empty() {
            return error.into();
        }
        tracing::warn!(%reference, requester = %access.requester, "registry unreachable: {}", crate::plugins::error_chain(&error));
        EngineError::AccessUnavailable { reference: reference.to_string() }
    }

    /// The refusal of a requester whose credentials do not reach a model:
    /// one text whatever the cache holds and whatever the registry said.
    pub(super) fn access_denied(&self, reference: &ModelRef, requester: &Requester) -> EngineError {
        tracing::info!(%reference, %requester, "access denied by the registry");
        EngineError::AccessDenied { reference: reference.to_string() }
    }

    fn tenant_label(&self, tenant: Option<&str>) -> String {
        tenant_label(&mut self.tenants.lock().unwrap_or_else(|poison| poison.into_inner()), tenant)
    }
}

/// The metrics label of a tenant: the name policy gave, `other` for none or
/// past the first [`TENANT_LABELS`] names (a label set must stay bounded,
/// whatever names a plugin gives).
fn tenant_label(seen: &mut std::collections::HashSet<String>, tenant: Option<&str>) -> String {
    match tenant {
        Some(tenant) if seen.contains(tenant) || (seen.len() < TENANT_LABELS && seen.insert(tenant.to_owned())) => {
            tenant.to_owned()
        }
        _ => "other".to_owned(),
    }
}

/// Distinct tenant labels metrics carry at most.
pub const TENANT_LABELS: usize = 64;

fn proof_of(credential: &Credential) -> Proof {
    match credential {
        Credential::Anonymous => Proof::Public,
        Credential::Node => Proof::Node,
        Credential::Given(_) => Proof::PullSecret,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tenant labels stay bounded: past the cap every new name is `other`,
    /// and names seen before keep theirs.
    #[test]
    fn tenant_labels_are_bounded() {
        let mut seen = std::collections::HashSet::new();
        assert_eq!(tenant_label(&mut seen, None), "other");
        for index in 0..TENANT_LABELS {
            assert_eq!(tenant_label(&mut seen, Some(&format!("t{index}"))), format!("t{index}"));
        }
        assert_eq!(tenant_label(&mut seen, Some("one-too-many")), "other");
        assert_eq!(tenant_label(&mut seen, Some("t0")), "t0");
        assert_eq!(seen.len(), TENANT_LABELS);
    }

    /// A mount's credentials in order: its secret, then the node's if
    /// granted; none at all is anonymous.
    #[test]
    fn credentials_in_order() {
        let names = |access: &Access| access.credentials().iter().map(|c| format!("{c:?}")).collect::<Vec<_>>();
        assert_eq!(names(&Access::operator()), ["node"]);
        let nothing = Access { node: false, ..Access::operator() };
        assert_eq!(names(&nothing), ["anonymous"]);
    }
}
