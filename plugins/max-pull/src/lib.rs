//! Example quota policy, the same in Rust, Python (`python/`) and JavaScript
//! (`js/`), all three passing the cases in `cases/`: deny any single pull
//! that would add more than `max-bytes` to the cache.
//!
//! Settings: `{"max-bytes": N}`, N a whole number of bytes, required.

modelcache_policy::generate!("quota-policy");

use exports::modelcache::policy::quota::{self, Request, Verdict};
use exports::modelcache::policy::settings;

/// The `max-bytes` setting; the messages are the ones the other languages give.
pub fn max_bytes(settings: &str) -> Result<u64, String> {
    let settings: serde_json::Value =
        serde_json::from_str(settings).map_err(|error| format!("settings are not JSON: {error}"))?;
    let object = settings.as_object().ok_or("settings must be a JSON object")?;
    if let Some(key) = object.keys().find(|key| *key != "max-bytes") {
        return Err(format!("unknown setting `{key}` (the only one is `max-bytes`)"));
    }
    match object.get("max-bytes") {
        None => Err("`max-bytes` is required: the most bytes one pull may add".to_owned()),
        Some(value) => value.as_u64().ok_or_else(|| format!("`max-bytes` must be a whole number of bytes, not {value}")),
    }
}

pub fn decide(request: &Request) -> Result<Verdict, String> {
    let max = max_bytes(&request.settings)?;
    if request.incoming_bytes <= max {
        return Ok(Verdict::Admit);
    }
    Ok(Verdict::Deny(format!(
        "{} would add {} bytes; this node allows at most {max} bytes per pull",
        request.reference, request.incoming_bytes
    )))
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        max_bytes(&settings).map(drop)
    }
}

impl quota::Guest for Policy {
    fn decide(request: Request) -> Result<Verdict, String> {
        decide(&request)
    }
}

#[cfg(target_arch = "wasm32")]
export!(Policy);
