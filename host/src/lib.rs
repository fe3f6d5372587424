//! modelcache: a node-local cache engine for ModelPack OCI model artifacts.
//!
//! The modules are the architecture (see `docs/architecture.md`):
//! - [`registry`]: resolve references, fetch manifests and blobs by digest;
//! - [`modelpack`]: manifests to file lists, and the path rules;
//! - [`store`]: the content-addressed store and its on-disk layout;
//! - [`durable`]: atomic, durable writes (JSON, sync, publish) below the store, volumes and gc;
//! - [`archive`]: tar layers read with every allocation bounded;
//! - [`flight`]: one download per key, however many ask;
//! - `memo`: answers kept in memory, bounded;
//! - [`link`]: hardlink, reflink or copy trees out of the store;
//! - [`volumes`]: per-volume records;
//! - [`gc`]: garbage collection, pins and disk accounting;
//! - [`plugins`]: WebAssembly policy plugins and the decisions they make;
//! - [`engine`]: the mount flow that ties them together (`ingest_sink`: the
//!   store's writer as the registry's blob sink);
//! - [`api`], [`daemon`]: the long-lived daemon and its API on a unix socket;
//! - [`pack`]: a directory packed and pushed as a model;
//! - [`metrics`]: counters for Prometheus;
//! - [`digest`], [`error`]: the small types everything shares, from the
//!   `modelcache-api` crate with the API's request and record types.

pub mod api;
pub mod archive;
pub mod daemon;
pub mod durable;
pub mod engine;
pub mod flight;
pub mod gc;
mod ingest_sink;
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
