//! Host bindings generated from the `modelcache:policy` WIT package.
//!
//! Generated against `full-policy`, the world that exports every decision, so
//! each decision interface gets one set of Rust types. A plugin that serves
//! fewer decisions is driven through the per-interface `GuestIndices`, which
//! look up only the exports a plugin has.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "modelcache:policy/full-policy",
});

pub use self::exports::modelcache::policy::{exclude, gc, quota, settings};
pub use self::modelcache::policy::types;
