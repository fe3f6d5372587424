//! {{name}}: a modelcache quota policy. Admits a pull only while it takes at
//! most half of the bytes still free (after the pulls already admitted).

wit_bindgen::generate!({ world: "quota-policy", path: "wit" });

use exports::modelcache::policy::quota::{self, Request, Verdict};
use exports::modelcache::policy::settings;

struct Policy;

impl quota::Guest for Policy {
    fn decide(request: Request) -> Result<Verdict, String> {
        let free = request.filesystem.free_bytes.saturating_sub(request.reserved_bytes);
        if request.incoming_bytes <= free / 2 {
            return Ok(Verdict::Admit);
        }
        Ok(Verdict::Deny(format!(
            "{} would take {} of the {} bytes free; this node admits at most half",
            request.reference, request.incoming_bytes, free
        )))
    }
}
