//! Reference quota policy: admit a pull iff the cache, the bytes reserved by
//! pulls in flight and this pull's new bytes together stay within a limit.
//!
//! Settings: `limit`, a size (`"500GiB"`) or a share of the cache's
//! filesystem (`"80%"`); default `"80%"`.

modelcache_policy::generate!("quota-policy");

use exports::modelcache::policy::quota::{self, Request, Verdict};
use exports::modelcache::policy::settings;
use modelcache_policy::size::{HumanBytes, Limit};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    limit: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { limit: "80%".to_owned() }
    }
}

fn parse_limit(json: &str) -> Result<Limit, String> {
    let settings: Settings = modelcache_policy::parse_settings(json)?;
    Limit::parse(&settings.limit).map_err(|error| format!("settings.limit: {error}"))
}

/// The decision as a plain function, so it is tested natively.
///
/// # Errors
/// Invalid settings.
pub fn decide(request: &Request) -> Result<Verdict, String> {
    let limit = parse_limit(&request.settings)?;
    let limit_bytes = limit.bytes_of(request.filesystem.total_bytes);
    let total = request.cache_bytes.saturating_add(request.reserved_bytes).saturating_add(request.incoming_bytes);
    if total <= limit_bytes {
        return Ok(Verdict::Admit);
    }
    let limit_text = match limit {
        Limit::Bytes(_) => HumanBytes(limit_bytes).to_string(),
        Limit::Percent(_) => format!("{} ({limit} of {})", HumanBytes(limit_bytes), HumanBytes(request.filesystem.total_bytes)),
    };
    Ok(Verdict::Deny(format!(
        "{} needs {}: cache {} + reserved {} + incoming {} = {} exceeds the limit of {limit_text}",
        request.reference,
        HumanBytes(request.incoming_bytes),
        HumanBytes(request.cache_bytes),
        HumanBytes(request.reserved_bytes),
        HumanBytes(request.incoming_bytes),
        HumanBytes(total),
    )))
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        parse_limit(&settings).map(drop)
    }
}

impl quota::Guest for Policy {
    fn decide(request: Request) -> Result<Verdict, String> {
        decide(&request)
    }
}

// Exporting only on wasm keeps native builds (unit tests) free of the
// component's `ns:pkg/iface#func` symbol names, which native linkers reject.
#[cfg(target_arch = "wasm32")]
export!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache::policy::types::{Filesystem, Requester};

    const GIB: u64 = 1 << 30;

    fn request(cache: u64, reserved: u64, incoming: u64, settings: &str) -> Request {
        Request {
            requester: Requester { namespace: None, pod: None, pod_uid: None, service_account: None, volume: None },
            reference: "registry.local/m:1".into(),
            manifest_digest: "sha256:00".into(),
            incoming_bytes: incoming,
            cache_bytes: cache,
            reserved_bytes: reserved,
            filesystem: Filesystem { total_bytes: 100 * GIB, free_bytes: 50 * GIB },
            settings: settings.into(),
        }
    }

    /// Admits up to the limit inclusive, counting reserved bytes.
    #[test]
    fn admits_within_the_limit() {
        let settings = r#"{"limit": "10GiB"}"#;
        assert_eq!(decide(&request(4 * GIB, 3 * GIB, 3 * GIB, settings)), Ok(Verdict::Admit));
        assert!(matches!(decide(&request(4 * GIB, 3 * GIB, 3 * GIB + 1, settings)), Ok(Verdict::Deny(_))));
    }

    /// A share resolves against the filesystem size; the default is 80%.
    #[test]
    fn shares_of_the_filesystem() {
        assert_eq!(decide(&request(70 * GIB, 0, 10 * GIB, "{}")), Ok(Verdict::Admit));
        assert!(matches!(decide(&request(70 * GIB, 0, 11 * GIB, "{}")), Ok(Verdict::Deny(_))));
        assert_eq!(decide(&request(0, 0, 50 * GIB, r#"{"limit": "50%"}"#)), Ok(Verdict::Admit));
    }

    /// The deny reason shows every number in human units.
    #[test]
    fn deny_reason_in_human_units() {
        let Ok(Verdict::Deny(reason)) = decide(&request(70 * GIB, 5 * GIB, 10 * GIB, r#"{"limit": "80%"}"#)) else {
            panic!("expected a deny")
        };
        assert_eq!(
            reason,
            "registry.local/m:1 needs 10.0 GiB: cache 70.0 GiB + reserved 5.0 GiB + incoming 10.0 GiB \
             = 85.0 GiB exceeds the limit of 80.0 GiB (80% of 100.0 GiB)"
        );
    }

    /// Bad limits are refused at load.
    #[test]
    fn invalid_settings() {
        assert!(<Policy as settings::Guest>::validate_settings(r#"{"limit": "lots"}"#.into()).is_err());
        assert!(<Policy as settings::Guest>::validate_settings(r#"{"limit": "180%"}"#.into()).is_err());
        assert!(<Policy as settings::Guest>::validate_settings(r#"{"limits": "1GB"}"#.into()).is_err());
        assert!(<Policy as settings::Guest>::validate_settings(r#"{"limit": "1GB"}"#.into()).is_ok());
    }
}
