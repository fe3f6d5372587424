//! The integration tests, one binary: each module drives the real
//! `modelcache` binary (or the engine as a library) against a real loopback
//! registry, real compiled plugins and, as root, real mounts (`csi`: the
//! shim as kubelet sees it, over its gRPC socket). The fixtures
//! are in `support/`, one module each.
//!
//! `cargo test -p modelcache --test it` runs them all; a module's alone with
//! its name as the filter (`cargo test -p modelcache --test it pull::`).

#[macro_use]
mod support;

mod author;
mod csi;
mod daemon;
mod gc;
mod plugins;
mod pull;
mod security;
