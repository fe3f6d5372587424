//! The modelcache daemon's API as its clients see it: the request and
//! record types, error kinds, ids, and a client for the unix socket.
//!
//! The CLI and the CSI shim depend on this crate alone; the engine (and its
//! WebAssembly runtime) stays in the `modelcache` crate.
//! - [`protocol`]: routes, request bodies, answers and how errors travel;
//! - [`client`]: one request at a time over the daemon's socket;
//! - [`record`]: a volume's record, its state and how its tree was linked;
//! - [`reference`](mod@reference), [`ids`], [`entry`], [`digest`]: names validated once;
//! - [`options`]: what a request leaves out;
//! - [`tenancy`]: who asks for a mount, and the registry credentials they bring;
//! - [`error`]: the kinds callers branch on.

#[cfg(feature = "client")]
pub mod client;
pub mod digest;
pub mod entry;
pub mod error;
pub mod ids;
pub mod options;
pub mod protocol;
pub mod record;
pub mod reference;
pub mod tenancy;

/// Where the daemon's main socket is unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/modelcache/modelcache.sock";
