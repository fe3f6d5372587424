//! Whose credentials a request carries: none, the node's (its docker
//! `config.json`), or a pull secret a mount brought.
//!
//! Each pull secret gets its own session (HTTP client), so the tokens a
//! registry grants one tenant are never sent for another. Sessions are
//! kept by a fingerprint of the secret, keyed with a random per-process
//! key: the fingerprint tells secrets apart in memory and means nothing
//! outside this process. Nothing here is written anywhere.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use modelcache_api::tenancy::RegistryCredentials;
use sha2::{Digest as _, Sha256};

use super::auth::Credentials;
use super::session::Session;
use super::{ModelRef, Registry, RegistryError};

/// The credentials one request carries.
#[derive(Clone)]
pub enum Credential {
    /// None: what the registry serves to anyone.
    Anonymous,
    /// The node's own, from its docker `config.json` (read again when it
    /// changes; helpers asked again when refused).
    Node,
    /// A pull secret a mount brought.
    Given(Arc<GivenCredentials>),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credential::Anonymous => "anonymous",
            Credential::Node => "node",
            Credential::Given(_) => "pull-secret",
        })
    }
}

/// A pull secret, parsed, with its fingerprint.
pub struct GivenCredentials {
    credentials: Credentials,
    fingerprint: Fingerprint,
}

/// A pull secret told apart from others without holding its text.
pub type Fingerprint = [u8; 32];

impl GivenCredentials {
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

/// The per-process key of fingerprints, from the kernel's random source.
fn fingerprint_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        use std::io::Read;
        let mut key = [0; 32];
        std::fs::File::open("/dev/urandom").and_then(|mut random| random.read_exact(&mut key)).expect("reading /dev/urandom");
        key
    })
}

/// Pull-secret sessions kept at most: more tenants than one node serves at
/// once. When full, the one used longest ago goes (its tokens are earned
/// again if it comes back).
const GIVEN_SESSIONS: usize = 256;

/// The sessions of pull secrets and the anonymous one.
#[derive(Default)]
pub(super) struct Sessions {
    given: Mutex<GivenSessions>,
    anonymous: OnceLock<Arc<Session>>,
}

/// Pull-secret sessions by fingerprint, each with when it was last used
/// (by `clock`, a use counter).
#[derive(Default)]
struct GivenSessions {
    sessions: HashMap<Fingerprint, (Arc<Session>, u64)>,
    clock: u64,
}

impl Registry {
    /// `secret` parsed for a mount of `reference`: a docker `config.json`
    /// (its `auths`), or a user name and password for the reference's
    /// registry.
    ///
    /// # Errors
    /// [`RegistryError::PullSecret`] naming what is wrong, never the
    /// secret's text.
    pub fn pull_secret(&self, reference: &ModelRef, secret: &RegistryCredentials) -> Result<Credential, RegistryError> {
        let invalid = |problem: &'static str| RegistryError::PullSecret { reference: reference.to_string(), problem };
        let credentials = match (&secret.docker_config_json, &secret.username, &secret.password) {
            (Some(config), None, None) => Credentials::parse_pull_secret(config.expose()).map_err(invalid)?,
            (None, Some(username), Some(password)) => {
                Credentials::basic(reference.registry(), username.expose(), password.expose())
            }
            (None, Some(_), None) | (None, None, Some(_)) => return Err(invalid("it has a username or a password but not both")),
            (None, None, None) => return Err(invalid("it has neither `.dockerconfigjson` nor `username` and `password`")),
            (Some(_), _, _) => return Err(invalid("it has both `.dockerconfigjson` and `username`/`password`")),
        };
        // A keyed hash: the key is fixed-length and secret, the input follows it.
        let mut hasher = Sha256::new();
        hasher.update(fingerprint_key());
        hasher.update(serde_json::to_vec(secret).expect("credentials serialize"));
        let fingerprint = hasher.finalize().into();
        Ok(Credential::Given(Arc::new(GivenCredentials { credentials, fingerprint })))
    }

    /// The session a request with `credential` uses.
    ///
    /// # Errors
    /// [`RegistryError::Setup`] when a client for a pull secret (or for no
    /// credentials) cannot be made: never the node's session in its place.
    pub(super) fn session_for(&self, credential: &Credential) -> Result<Arc<Session>, RegistryError> {
        match credential {
            Credential::Node => Ok(self.session()),
            Credential::Anonymous => {
                if let Some(session) = self.sessions.anonymous.get() {
                    return Ok(session.clone());
                }
                let session = self.new_session(Credentials::default())?;
                Ok(self.sessions.anonymous.get_or_init(|| session).clone())
            }
            Credential::Given(given) => {
                let mut guard = self.sessions.given.lock().unwrap_or_else(PoisonError::into_inner);
                let GivenSessions { sessions, clock } = &mut *guard;
                *clock += 1;
                if let Some((session, used)) = sessions.get_mut(&given.fingerprint) {
                    *used = *clock;
                    return Ok(session.clone());
                }
                if sessions.len() >= GIVEN_SESSIONS
                    && let Some(oldest) = sessions.iter().min_by_key(|(_, (_, used))| *used).map(|(key, _)| *key)
                {
                    sessions.remove(&oldest);
                }
                let session = self.new_session(given.credentials.clone())?;
                sessions.insert(given.fingerprint, (session.clone(), *clock));
                Ok(session)
            }
        }
    }

    fn new_session(&self, credentials: Credentials) -> Result<Arc<Session>, RegistryError> {
        Session::new(&self.config, &self.authorities, credentials)
            .map(Arc::new)
            .map_err(|source| RegistryError::Setup { source: Box::new(source) })
    }
}
