//! Policy plugins: WebAssembly components that make the per-deployment
//! decisions (who may mount what, whose signatures a model needs, which
//! files to skip, whether a pull fits, what GC may evict).
//!
//! A plugin directory holds `NAME.wasm` and an optional `NAME.toml` (see
//! [`config`]). Loading a plugin compiles it (through the on-disk
//! [`cache`]), checks that it speaks a compatible `modelcache:policy`
//! version, exports at least one decision, imports only what the
//! [`runtime`] grants, and that its settings validate. A plugin that fails
//! any of this is refused with the reason; the others load.
//!
//! [`PluginHost`] owns the current [`PluginSet`] and swaps it whole on
//! [`PluginHost::reload`]. Each decision module ([`admission`], [`verify`],
//! [`exclude`], [`quota`], [`gc`]) holds the decision's input and output types, the composition of
//! several plugins and the built-in default used when no plugin serves it.
//!
//! | module | concern |
//! |---|---|
//! | `plugin` | one [`Plugin`]: compiled ([`CompiledPlugin`]), checked, configured and called |
//! | `set` | the plugins of a directory found and loaded into a [`PluginSet`], with their [`PluginStatus`] |
//! | `host` | the [`PluginHost`]: the set serving now, swapped whole on reload |
//! | `runtime` | the wasm engine and one call's sandbox |
//! | `bindings` | the `bindgen!` of the `modelcache:policy` WIT, current and 0.1 |
//! | `legacy` | 0.1 plugins served: each decision's input lowered to 0.1 |
//! | `config`, `cache`, `error` | a plugin's `NAME.toml`, the compiled-component cache, the errors |
//! | `admission`, `verify`, `exclude`, `quota`, `gc` | one decision each |
//! | `cases` | a plugin's test cases, run by `modelcache plugins test` |
//!
//! This file holds the [`Decision`]s and what the decision modules share.

pub mod admission;
pub mod bindings;
pub mod cache;
pub mod cases;
pub mod config;
mod deadline;
pub mod error;
pub mod exclude;
pub mod gc;
mod host;
mod legacy;
mod plugin;
pub mod quota;
pub mod runtime;
mod set;
pub mod verify;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use self::cache::CompiledCache;
pub use self::config::{FailMode, Limits, PluginConfig};
pub use self::error::{FailureCause, PluginError, PluginFailure};
pub use self::host::PluginHost;
pub use self::plugin::{CompiledPlugin, Plugin};
pub use self::runtime::{Allocation, Runtime, RuntimeOptions};
pub use self::set::{PluginSet, PluginStatus};

/// The version of the WIT package this host speaks.
pub const POLICY_VERSION: &str = "0.2.0";
/// The older version it still serves, unchanged (the `legacy` module).
pub const LEGACY_POLICY_VERSION: &str = "0.1.0";
const POLICY_PACKAGE: &str = "modelcache:policy";

/// The decisions a plugin can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Admission,
    Verify,
    Exclude,
    Quota,
    Gc,
}

impl Decision {
    /// In the order a mount asks them (gc last: it runs for the node).
    pub const ALL: [Decision; 5] = [Decision::Admission, Decision::Verify, Decision::Exclude, Decision::Quota, Decision::Gc];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Admission => "admission",
            Decision::Verify => "verify",
            Decision::Exclude => "exclude",
            Decision::Quota => "quota",
            Decision::Gc => "gc",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Decision {
    type Err = String;

    fn from_str(text: &str) -> Result<Decision, String> {
        Decision::ALL
            .into_iter()
            .find(|decision| decision.as_str() == text)
            .ok_or_else(|| format!("unknown decision `{text}` (expected admission, verify, exclude, quota or gc)"))
    }
}

/// The names an answer may mention (file paths, entry keys), kept as 64-bit
/// hashes: cheap to build and probe even for 100,000 long keys, and free of
/// borrows on the request. A forged name that collides is still only a name
/// the caller then fails to find.
pub(crate) struct KnownNames(std::collections::HashSet<u64>);

impl KnownNames {
    fn hash(name: &str) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6d63).hash_one(name)
    }

    pub(crate) fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> KnownNames {
        KnownNames(names.into_iter().map(KnownNames::hash).collect())
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.0.contains(&KnownNames::hash(name))
    }
}

pub use modelcache_api::tenancy::Requester;

/// The requester as every decision's input carries it.
pub(crate) fn lower_requester(requester: &Requester) -> bindings::types::Requester<'_> {
    bindings::types::Requester {
        namespace: requester.namespace.as_deref(),
        pod: requester.pod.as_deref(),
        pod_uid: requester.pod_uid.as_deref(),
        service_account: requester.service_account.as_deref(),
        volume: requester.volume.as_deref(),
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    crate::error::chain(error)
}
