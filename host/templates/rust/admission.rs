//! {{name}}: a modelcache admission policy. Admits mounts from every
//! namespace but `kube-system`, without the node's registry credentials and
//! under no tenant; refuses `kube-system`.

wit_bindgen::generate!({ world: "admission-policy", path: "wit" });

use exports::modelcache::policy::admission::{self, Grant, Request, Verdict};
use exports::modelcache::policy::settings;

struct Policy;

impl admission::Guest for Policy {
    fn decide(request: Request) -> Result<Verdict, String> {
        if request.requester.namespace.as_deref() == Some("kube-system") {
            return Ok(Verdict::Deny(format!(
                "namespace `kube-system` may not mount {}: system pods get no models",
                request.reference.text
            )));
        }
        Ok(Verdict::Admit(Grant { node_credentials: false, tenant: None }))
    }
}
