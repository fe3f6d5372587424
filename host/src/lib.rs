//! modelcache: a node-local cache engine for ModelPack OCI model artifacts.
//!
//! The modules are the architecture (see `docs/architecture.md`), listed
//! from the bottom up; each uses only modules above it in this list.
//! - [`digest`], [`error`]: the small types everything shares, from the
//!   `modelcache-api` crate with the API's request and record types;
//! - [`durable`]: atomic, durable writes (JSON, fsync, publish by rename);
//! - `memo`, [`flight`], [`metrics`]: bounded memory of answers, one piece of
//!   shared work per key, counters for Prometheus;
//! - [`modelpack`]: manifests to file lists, and the path and tree rules;
//! - [`archive`]: tar layers read with every allocation bounded;
//! - [`link`]: hardlink, reflink or copy trees, never through a symlink;
//! - [`store`]: the content-addressed store and its on-disk layout;
//! - [`registry`]: resolve references, fetch manifests and blobs by digest
//!   into any sink;
//! - [`plugins`]: WebAssembly policy plugins and the decisions they make;
//! - [`volumes`]: per-volume records and the link step of a volume's tree;
//! - [`gc`]: the pure plan of what to evict, the collector that carries it
//!   out, `du` and pins;
//! - [`engine`]: the mount flow that ties them together;
//! - [`pack`]: a directory packed and pushed as a model;
//! - [`api`], [`daemon`]: the long-lived daemon and its API on unix sockets.

pub mod api;
pub mod archive;
pub mod daemon;
pub mod durable;
pub mod engine;
pub mod flight;
pub mod gc;
pub mod link;
mod memo;
pub mod metrics;
pub mod modelpack;
pub mod pack;
pub mod plugins;
pub mod registry;
pub mod store;
pub mod volumes;

pub use modelcache_api::{digest, error};
