//! A session: one HTTP client and the credentials it is given. A changed
//! credentials file, or a refused answer of a credential helper, makes a new
//! one; requests in flight finish with theirs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use oci_client::Client;
use oci_client::client::{Certificate, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;

use super::auth::{Credentials, Lookup, run_helper};
use super::{ModelRef, Registry, RegistryConfig, RegistryError};

/// The session requests use, and the credentials file as last read.
pub(super) struct Current {
    pub(super) session: Arc<Session>,
    pub(super) read: Option<FileStamp>,
}

/// An HTTP client and the credentials it is given. The client keeps the
/// first credentials it sees per host, and the tokens they earn, for its
/// whole life: new credentials need a new session.
pub(super) struct Session {
    pub(super) client: Client,
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
    pub(super) fn new(
        config: &RegistryConfig,
        authorities: &[Certificate],
        credentials: Credentials,
    ) -> Result<Session, OciDistributionError> {
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
        })?;
        Ok(Session { client, credentials, auths: Mutex::default() })
    }

    /// The credentials for `host`, worked out once per session: a helper's
    /// answer (even "none") is kept until a refusal renews the session; a
    /// helper that cannot be run, or answers nonsense, is asked again.
    pub(super) async fn auth(&self, reference: &ModelRef, host: &str) -> Result<RegistryAuth, RegistryError> {
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
    pub(super) async fn renewable(&self, reference: &ModelRef, host: &str) -> bool {
        self.host_auth(reference, host).await.is_ok_and(|found| found.helped)
    }
}

/// One version of a file: rewriting it, or swapping the symlink to it as
/// Kubernetes does for a mounted secret, makes another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileStamp {
    device: u64,
    inode: u64,
    bytes: u64,
    // The change time, which unlike the modification time no tool sets back.
    changed: (i64, i64),
}

impl FileStamp {
    pub(super) fn of(path: &Path) -> Option<FileStamp> {
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

impl Registry {
    /// A session with `credentials`, or (a client that cannot be made, which
    /// the start-up checks rule out) the current one, with a warning.
    fn session_with(&self, credentials: Credentials, current: &Arc<Session>) -> Arc<Session> {
        match Session::new(&self.config, &self.authorities, credentials) {
            Ok(session) => Arc::new(session),
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot set up a new registry client; the current one stays in use"
                );
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
    pub(super) fn session(&self) -> Arc<Session> {
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
    pub(super) fn renew(&self, stale: &Arc<Session>) -> Arc<Session> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
