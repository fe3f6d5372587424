//! Reference gc policy: when the filesystem is fuller than a high watermark,
//! evict least-recently-used entries until it would be under a low one;
//! entries idle longer than a TTL go regardless; entries younger than a grace
//! period never go.
//!
//! Settings (all optional):
//! - `high` (default `"85%"`) and `low` (default `"75%"`): filesystem usage,
//!   as a share of the filesystem or as a size of used bytes;
//! - `ttl`: evict entries unused for this long (`"7d"`); default: none;
//! - `grace` (default `"10m"`): never evict entries younger than this.

modelcache_policy::generate!("gc-policy");

use exports::modelcache::policy::gc::{self, Request};
use exports::modelcache::policy::settings;
use modelcache_policy::size::{Limit, parse_duration};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSettings {
    high: String,
    low: String,
    ttl: Option<String>,
    grace: String,
}

impl Default for RawSettings {
    fn default() -> Self {
        RawSettings { high: "85%".into(), low: "75%".into(), ttl: None, grace: "10m".into() }
    }
}

struct Settings {
    high: Limit,
    low: Limit,
    ttl: Option<u64>,
    grace: u64,
}

impl Settings {
    fn parse(json: &str) -> Result<Settings, String> {
        let raw: RawSettings = modelcache_policy::parse_settings(json)?;
        let settings = Settings {
            high: Limit::parse(&raw.high).map_err(|error| format!("settings.high: {error}"))?,
            low: Limit::parse(&raw.low).map_err(|error| format!("settings.low: {error}"))?,
            ttl: raw.ttl.as_deref().map(parse_duration).transpose().map_err(|error| format!("settings.ttl: {error}"))?,
            grace: parse_duration(&raw.grace).map_err(|error| format!("settings.grace: {error}"))?,
        };
        // Comparable only when both are the same kind; a size against a
        // share depends on the disk and is checked per decision.
        let inverted = match (settings.low, settings.high) {
            (Limit::Percent(low), Limit::Percent(high)) => low > high,
            (Limit::Bytes(low), Limit::Bytes(high)) => low > high,
            _ => false,
        };
        if inverted {
            return Err(format!("settings.low ({}) lies above settings.high ({})", raw.low, raw.high));
        }
        Ok(settings)
    }
}

/// The decision as a plain function, so it is tested natively. It takes the
/// request by value so the chosen keys move out instead of being copied:
/// with 100,000 candidates that is most of the cost.
///
/// # Errors
/// Invalid settings.
pub fn decide(mut request: Request) -> Result<Vec<String>, String> {
    let settings = Settings::parse(&request.settings)?;
    let total = request.filesystem.total_bytes;
    let mut used = total.saturating_sub(request.filesystem.free_bytes);
    let over_high = used > settings.high.bytes_of(total);
    if !over_high && settings.ttl.is_none() {
        return Ok(Vec::new());
    }
    let low = settings.low.bytes_of(total).min(settings.high.bytes_of(total));

    // Least recently used first; ties by key, so the answer is stable.
    let now = request.now;
    let mut order: Vec<(u64, u32)> = request
        .candidates
        .iter()
        .enumerate()
        .filter(|(_, candidate)| now.saturating_sub(candidate.created_at) >= settings.grace)
        .map(|(index, candidate)| (candidate.last_used_at, index as u32))
        .collect();
    let candidates = &mut request.candidates;
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| candidates[a.1 as usize].key.cmp(&candidates[b.1 as usize].key)));

    let mut evict = Vec::new();
    for (last_used_at, index) in order {
        let idle = now.saturating_sub(last_used_at);
        let expired = settings.ttl.is_some_and(|ttl| idle > ttl);
        if !(expired || (over_high && used > low)) {
            // Sorted by last use, so no later entry is expired either, and
            // usage only falls: nothing further qualifies.
            break;
        }
        let candidate = &mut candidates[index as usize];
        used = used.saturating_sub(candidate.exclusive_bytes);
        evict.push(std::mem::take(&mut candidate.key));
    }
    Ok(evict)
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        Settings::parse(&settings).map(drop)
    }
}

impl gc::Guest for Policy {
    fn decide(request: Request) -> Result<Vec<String>, String> {
        decide(request)
    }
}

// Exporting only on wasm keeps native builds (unit tests) free of the
// component's `ns:pkg/iface#func` symbol names, which native linkers reject.
#[cfg(target_arch = "wasm32")]
export!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use exports::modelcache::policy::gc::Candidate;
    use modelcache::policy::types::Filesystem;

    const NOW: u64 = 10_000_000;
    const HOUR: u64 = 3_600;

    fn candidate(key: &str, bytes: u64, created_hours_ago: u64, used_hours_ago: u64) -> Candidate {
        Candidate {
            key: key.into(),
            manifest_digest: format!("sha256:{key}"),
            references: vec![],
            bytes_on_disk: bytes,
            exclusive_bytes: bytes,
            created_at: NOW - created_hours_ago * HOUR,
            last_used_at: NOW - used_hours_ago * HOUR,
            use_count: 1,
        }
    }

    fn request(used: u64, candidates: Vec<Candidate>, settings: &str) -> Request {
        Request {
            filesystem: Filesystem { total_bytes: 100, free_bytes: 100 - used },
            cache_bytes: used,
            now: NOW,
            candidates,
            settings: settings.into(),
        }
    }

    /// Above the high watermark, the least recently used go first, until the
    /// usage would be under the low watermark.
    #[test]
    fn evicts_lru_down_to_low_watermark() {
        let candidates = vec![candidate("newest", 6, 50, 1), candidate("oldest", 6, 50, 40), candidate("middle", 6, 50, 20)];
        assert_eq!(decide(request(90, candidates.clone(), "{}")).unwrap(), ["oldest", "middle", "newest"]);
        assert_eq!(decide(request(86, candidates.clone(), "{}")).unwrap(), ["oldest", "middle"]);
        assert!(decide(request(85, candidates, "{}")).unwrap().is_empty());
    }

    /// Young entries are never offered up; idle ones past the TTL always are.
    #[test]
    fn grace_and_ttl() {
        let candidates = vec![candidate("young", 50, 0, 0), candidate("idle", 1, 500, 300), candidate("used", 1, 500, 2)];
        assert!(decide(request(99, vec![candidate("young", 50, 0, 0)], "{}")).unwrap().is_empty());
        assert_eq!(decide(request(10, candidates.clone(), r#"{"ttl": "7d"}"#)).unwrap(), ["idle"]);
        assert_eq!(decide(request(99, candidates, r#"{"ttl": "7d", "grace": "0s"}"#)).unwrap(), ["idle", "used", "young"]);
    }

    /// Watermarks can be sizes of used bytes; inverted ones are refused.
    #[test]
    fn sizes_and_invalid_settings() {
        let candidates = vec![candidate("a", 30, 50, 3), candidate("b", 30, 50, 2)];
        assert_eq!(decide(request(60, candidates, r#"{"high": "50B", "low": "40B"}"#)).unwrap(), ["a"]);
        for bad in [r#"{"high": "70%", "low": "80%"}"#, r#"{"ttl": "forever"}"#, r#"{"grace": 5}"#, r#"{"hihg": "1%"}"#] {
            assert!(<Policy as settings::Guest>::validate_settings(bad.into()).is_err(), "{bad}");
        }
    }
}
