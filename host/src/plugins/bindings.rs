//! Host bindings generated from the `modelcache:policy` WIT packages: the
//! current version (`wit/policy.wit`, 0.2) at the top, and 0.1
//! (`wit/v0.1`) in [`v0_1`], which the `legacy` module adapts to.
//!
//! Generated against `full-policy`, the world that exports every decision, so
//! each decision interface gets one set of Rust types. A plugin that serves
//! fewer decisions is driven through the per-interface `GuestIndices`, which
//! look up only the exports a plugin has.
//!
//! The inputs borrow (`&str`, slices): a request is lowered straight from the
//! engine's own data, so no string of a 100,000-candidate gc input is copied
//! on the host before the canonical ABI copies it into the guest.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "modelcache:policy/full-policy",
    ownership: Borrowing { duplicate_if_necessary: false },
});

pub use self::exports::modelcache::policy::{admission, exclude, gc, quota, settings, verify};
pub use self::modelcache::policy::types;

/// The 0.1 package, for plugins built against it.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1",
        world: "modelcache:policy/full-policy",
        ownership: Borrowing { duplicate_if_necessary: false },
    });

    pub use self::exports::modelcache::policy::{exclude, gc, quota, settings};
    pub use self::modelcache::policy::types;
}
