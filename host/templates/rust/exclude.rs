//! {{name}}: a modelcache exclude policy. Skips documentation: every file
//! whose path ends in `.md`, at any depth.

wit_bindgen::generate!({ world: "exclude-policy", path: "wit" });

use exports::modelcache::policy::exclude::{self, Request, Skip};
use exports::modelcache::policy::settings;

struct Policy;

impl exclude::Guest for Policy {
    fn decide(request: Request) -> Result<Vec<Skip>, String> {
        Ok(request
            .files
            .into_iter()
            .filter(|file| file.path.ends_with(".md"))
            .map(|file| Skip { path: file.path, reason: "documentation".to_owned() })
            .collect())
    }
}
