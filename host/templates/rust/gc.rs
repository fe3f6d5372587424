//! {{name}}: a modelcache gc policy. Evicts every entry unused for more than
//! a week, longest idle first.

wit_bindgen::generate!({ world: "gc-policy", path: "wit" });

use exports::modelcache::policy::gc::{self, Request};
use exports::modelcache::policy::settings;

const WEEK: u64 = 7 * 24 * 60 * 60;

struct Policy;

impl gc::Guest for Policy {
    fn decide(request: Request) -> Result<Vec<String>, String> {
        let mut idle: Vec<_> = request
            .candidates
            .into_iter()
            .filter(|candidate| request.now.saturating_sub(candidate.last_used_at) > WEEK)
            .collect();
        idle.sort_by_key(|candidate| candidate.last_used_at);
        Ok(idle.into_iter().map(|candidate| candidate.key).collect())
    }
}
