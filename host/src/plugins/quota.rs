//! The quota decision: whether a pull may add its bytes to the cache.
//!
//! Every quota plugin must admit; the first deny decides. A failing plugin
//! with fail mode `closed` (the default) denies, the reason naming the plugin
//! and the cause; with `open` it is passed over. With no quota plugin the
//! built-in rule admits when the filesystem keeps at least 5% of its size
//! free after this pull and the other admitted pulls.

use serde::{Deserialize, Serialize};

use super::bindings::{quota as wit, types};
use super::exclude::not_served;
use super::plugin::Versioned;
use super::{Decision, FailMode, FailureCause, Plugin, PluginFailure, PluginSet, Requester, legacy, lower_requester};
use modelcache_policy::size::HumanBytes;

/// The share of the filesystem the built-in rule keeps free, in percent.
pub const BUILTIN_FREE_PERCENT: u64 = 5;

pub use crate::durable::Filesystem;

impl From<Filesystem> for types::Filesystem {
    fn from(filesystem: Filesystem) -> Self {
        types::Filesystem { total_bytes: filesystem.total_bytes, free_bytes: filesystem.free_bytes }
    }
}

/// The input of a quota decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct QuotaInput {
    /// Whose mount started the pull (absent in case files written for 0.1).
    #[serde(default)]
    pub requester: Requester,
    pub reference: String,
    pub manifest_digest: String,
    pub incoming_bytes: u64,
    pub cache_bytes: u64,
    pub reserved_bytes: u64,
    pub filesystem: Filesystem,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum QuotaVerdict {
    Admit,
    Deny {
        reason: String,
        /// The plugin that denied; none for the built-in rule.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
    },
}

/// The composed answer and the plugins that failed open on the way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QuotaDecision {
    #[serde(flatten)]
    pub verdict: QuotaVerdict,
    pub failures: Vec<PluginFailure>,
}

fn to_wit<'a>(input: &'a QuotaInput, settings: &'a str) -> wit::Request<'a> {
    wit::Request {
        requester: lower_requester(&input.requester),
        reference: &input.reference,
        manifest_digest: &input.manifest_digest,
        incoming_bytes: input.incoming_bytes,
        cache_bytes: input.cache_bytes,
        reserved_bytes: input.reserved_bytes,
        filesystem: input.filesystem.into(),
        settings,
    }
}

impl Plugin {
    /// Calls this plugin's quota decision on `input`.
    ///
    /// # Errors
    /// Why the call failed; the caller applies the fail mode.
    pub fn quota(&self, input: &QuotaInput) -> Result<QuotaVerdict, FailureCause> {
        let indices = self.exports.quota.as_ref().ok_or_else(|| not_served(self, Decision::Quota))?;
        let request = to_wit(input, &self.config.settings_json);
        let answer = match indices {
            Versioned::Current(indices) => {
                self.call("quota", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, request))?
            }
            Versioned::Legacy(indices) => legacy::quota(self, indices, &request)?,
        };
        Ok(match answer.map_err(FailureCause::PluginError)? {
            wit::Verdict::Admit => QuotaVerdict::Admit,
            wit::Verdict::Deny(reason) => QuotaVerdict::Deny { reason, plugin: Some(self.name.clone()) },
        })
    }
}

/// The rule used when no plugin serves quota.
pub fn builtin(input: &QuotaInput) -> QuotaVerdict {
    let keep = input.filesystem.total_bytes / 100 * BUILTIN_FREE_PERCENT;
    let free_after = input.filesystem.free_bytes.saturating_sub(input.reserved_bytes).saturating_sub(input.incoming_bytes);
    if free_after >= keep && input.filesystem.free_bytes >= input.reserved_bytes + input.incoming_bytes {
        QuotaVerdict::Admit
    } else {
        QuotaVerdict::Deny {
            reason: format!(
                "pulling {} needs {} but would leave {} free (after {} reserved by other pulls), \
                 under the {BUILTIN_FREE_PERCENT}% ({}) kept free",
                input.reference,
                HumanBytes(input.incoming_bytes),
                HumanBytes(free_after),
                HumanBytes(input.reserved_bytes),
                HumanBytes(keep),
            ),
            plugin: None,
        }
    }
}

impl PluginSet {
    /// Asks every quota plugin in order; all must admit.
    pub fn quota(&self, input: &QuotaInput) -> QuotaDecision {
        let mut plugins = self.serving(Decision::Quota).peekable();
        if plugins.peek().is_none() {
            return QuotaDecision { verdict: builtin(input), failures: Vec::new() };
        }
        let mut failures = Vec::new();
        for plugin in plugins {
            match plugin.quota(input) {
                Ok(QuotaVerdict::Admit) => {}
                Ok(deny) => return QuotaDecision { verdict: deny, failures },
                Err(cause) => {
                    let failure = plugin.failure(Decision::Quota, cause);
                    if plugin.fail_mode(Decision::Quota) == FailMode::Closed {
                        let verdict = QuotaVerdict::Deny {
                            reason: format!("{failure}; its fail mode for quota is closed"),
                            plugin: Some(plugin.name.clone()),
                        };
                        failures.push(failure);
                        return QuotaDecision { verdict, failures };
                    }
                    failures.push(failure);
                }
            }
        }
        QuotaDecision { verdict: QuotaVerdict::Admit, failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(free: u64, reserved: u64, incoming: u64) -> QuotaInput {
        QuotaInput {
            requester: Requester::default(),
            reference: "r/m:1".into(),
            manifest_digest: "sha256:00".into(),
            incoming_bytes: incoming,
            cache_bytes: 0,
            reserved_bytes: reserved,
            filesystem: Filesystem { total_bytes: 1000, free_bytes: free },
        }
    }

    /// The built-in rule keeps 5% free, counting other admitted pulls.
    #[test]
    fn builtin_keeps_five_percent_free() {
        assert_eq!(builtin(&input(500, 0, 450)), QuotaVerdict::Admit);
        assert!(matches!(builtin(&input(500, 0, 451)), QuotaVerdict::Deny { .. }));
        assert!(matches!(builtin(&input(500, 300, 200)), QuotaVerdict::Deny { .. }));
        assert!(matches!(builtin(&input(10, 0, 20)), QuotaVerdict::Deny { .. }));
        let QuotaVerdict::Deny { reason, plugin } = builtin(&input(500, 0, 600)) else { panic!() };
        assert!(reason.contains("r/m:1") && reason.contains("5%"), "{reason}");
        assert_eq!(plugin, None);
    }

    /// With no quota plugin, a set answers with the built-in rule.
    #[test]
    fn empty_set_uses_the_builtin() {
        let set = PluginSet::default();
        assert_eq!(set.quota(&input(500, 0, 10)).verdict, QuotaVerdict::Admit);
        assert!(matches!(set.quota(&input(500, 0, 499)).verdict, QuotaVerdict::Deny { .. }));
    }
}
