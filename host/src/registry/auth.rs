//! Credentials from a docker `config.json`: `auths`, else the credential
//! helper it names (`credHelpers`, `credsStore`), else anonymous.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::{ModelRef, RegistryError};

/// Credentials from a docker `config.json`.
#[derive(Clone, Debug, Default)]
pub(super) struct Credentials {
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
    pub(super) fn file(dir: Option<PathBuf>) -> Option<PathBuf> {
        dir.or_else(|| std::env::var_os("DOCKER_CONFIG").map(PathBuf::from))
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))
            .map(|dir| dir.join("config.json"))
    }

    /// What `file` holds; none (anonymous) when there is no such file.
    pub(super) fn read(file: Option<&Path>) -> Result<Credentials, RegistryError> {
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

    /// The credentials a pull secret's `.dockerconfigjson` holds: its
    /// `auths` only. A secret that names credential helpers is refused: they
    /// run as root on the node, and would answer with the node's own
    /// credentials (a cloud instance's role, say), which admission policy
    /// rations.
    pub(super) fn parse_pull_secret(text: &str) -> Result<Credentials, &'static str> {
        let config: DockerConfig = serde_json::from_str(text).map_err(|_| "`.dockerconfigjson` is not a docker config.json")?;
        if !config.cred_helpers.is_empty() || config.creds_store.is_some() {
            return Err("it names credential helpers (`credHelpers`, `credsStore`), which only the node's own config may");
        }
        Ok(Credentials { path: None, config })
    }

    /// A user name and password for `host` alone.
    pub(super) fn basic(host: &str, username: &str, password: &str) -> Credentials {
        let auth = DockerAuth { auth: None, username: Some(username.to_owned()), password: Some(password.to_owned()) };
        Credentials { path: None, config: DockerConfig { auths: [(host.to_owned(), auth)].into(), ..DockerConfig::default() } }
    }

    pub(super) fn error(&self, reference: &ModelRef, reason: String) -> RegistryError {
        RegistryError::Credentials { reference: reference.to_string(), path: self.path.clone().unwrap_or_default(), reason }
    }

    /// What the file says for `host`: credentials, or the helper to ask.
    pub(super) fn lookup(&self, reference: &ModelRef, host: &str) -> Result<Lookup, RegistryError> {
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
            // A name, never a path: `docker-credential-NAME` is looked up on
            // the PATH.
            Some(helper) if !helper.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte)) => {
                return Err(error(format!("the credential helper `{helper}` is not a plain name")));
            }
            Some(helper) => Lookup::Helper(helper.clone()),
            None => Lookup::Known(RegistryAuth::Anonymous),
        })
    }
}

/// Where a host's credentials are.
#[derive(Debug)]
pub(super) enum Lookup {
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

pub(super) async fn run_helper(helper: &str, host: &str) -> Result<RegistryAuth, String> {
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
}
