//! Who asks for a mount, and the registry credentials they bring.
//!
//! The requester travels with a mount to the policies and into its record;
//! it names Kubernetes objects and is never a secret. The credentials are a
//! pull secret (CSI `nodePublishSecretRef`): they travel over the daemon's
//! socket only, are never written to a file, a record, a log line or a
//! metric, and print as `<redacted>`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who asks for a mount. Through the CSI driver, the pod as kubelet names it
/// (`csi.storage.k8s.io/pod.*`, present with `podInfoOnMount`); on the
/// admin socket, whatever the caller states (often nothing: the operator).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Requester {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The volume the mount is for: set by the daemon from the request's
    /// path, whatever the body says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// Why a requester is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("requester {field} `{value}` is not a Kubernetes name (at most 253 of a-z 0-9 . - :)")]
pub struct RequesterError {
    pub field: &'static str,
    pub value: String,
}

impl Requester {
    /// Whether nothing is known of who asks.
    pub fn is_empty(&self) -> bool {
        self.namespace.is_none() && self.pod.is_none() && self.pod_uid.is_none() && self.service_account.is_none()
    }

    /// Checks every field is a plausible Kubernetes name, so what reaches
    /// policies, records and logs is a name and not arbitrary text.
    ///
    /// # Errors
    /// The first field that is not.
    pub fn validate(&self) -> Result<(), RequesterError> {
        let fields = [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("pod-uid", &self.pod_uid),
            ("service-account", &self.service_account),
        ];
        for (field, value) in fields {
            if let Some(value) = value {
                let valid = !value.is_empty()
                    && value.len() <= 253
                    && value.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b".-:".contains(&byte));
                if !valid {
                    return Err(RequesterError { field, value: value.chars().take(80).collect() });
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.namespace, &self.pod) {
            (Some(namespace), Some(pod)) => write!(f, "pod {namespace}/{pod}"),
            (Some(namespace), None) => write!(f, "namespace {namespace}"),
            _ => f.write_str("the operator"),
        }
    }
}

/// A value that must not be shown: `Debug` prints `<redacted>`, and only
/// [`Secret::expose`] gives the text.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret's text, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Registry credentials a mount brings, as a pull secret holds them: a
/// `kubernetes.io/dockerconfigjson` secret's `.dockerconfigjson` (a docker
/// `config.json`, `auths` by registry host), or a
/// `kubernetes.io/basic-auth` secret's `username` and `password` (for the
/// mounted reference's registry). Used before the node's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RegistryCredentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_config_json: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
}

impl RegistryCredentials {
    /// The credentials in a CSI secrets map (`nodePublishSecretRef`'s
    /// data): `.dockerconfigjson`, or `username` and `password`. Other keys
    /// are ignored; none of these gives `None`.
    pub fn from_secret_map<'a>(secrets: impl IntoIterator<Item = (&'a String, &'a String)>) -> Option<RegistryCredentials> {
        let mut credentials = RegistryCredentials::default();
        for (key, value) in secrets {
            match key.as_str() {
                ".dockerconfigjson" => credentials.docker_config_json = Some(Secret::new(value.clone())),
                "username" => credentials.username = Some(Secret::new(value.clone())),
                "password" => credentials.password = Some(Secret::new(value.clone())),
                _ => {}
            }
        }
        (credentials != RegistryCredentials::default()).then_some(credentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets never print, whatever holds them.
    #[test]
    fn secrets_are_redacted() {
        let secrets = [("username".to_owned(), "alice".to_owned()), ("password".to_owned(), "hunter2".to_owned())];
        let credentials = RegistryCredentials::from_secret_map(secrets.iter().map(|(key, value)| (key, value))).unwrap();
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("alice") && shown.contains("<redacted>"), "{shown}");
        assert_eq!(credentials.password.unwrap().expose(), "hunter2");
        assert_eq!(RegistryCredentials::from_secret_map(std::iter::empty()), None);
    }

    /// Requesters hold Kubernetes names only.
    #[test]
    fn requesters_are_names() {
        let mut requester =
            Requester { namespace: Some("research".into()), pod: Some("trainer-0".into()), ..Requester::default() };
        assert!(requester.validate().is_ok());
        assert_eq!(requester.to_string(), "pod research/trainer-0");
        requester.service_account = Some("a b\nc".into());
        let error = requester.validate().unwrap_err();
        assert_eq!(error.field, "service-account");
        assert!(Requester::default().is_empty() && Requester::default().validate().is_ok());
    }
}
