//! The integration tests, one binary: each module drives the real
//! `modelcache` binary (or the engine as a library) against a real loopback
//! registry, real compiled plugins and, as root, real mounts. The CSI shim's
//! tests are the one other binary (`tests/csi.rs`), run apart so its
//! deadline-bound calls meet a quiet machine. The fixtures
//! are in `support/`, one module each.
//!
//! `cargo test -p modelcache --test it` runs them all; a module's alone with
//! its name as the filter (`cargo test -p modelcache --test it pull::`).

#[macro_use]
mod support;

mod author;
mod cluster;
mod daemon;
mod gc;
mod plugins;
mod pull;
mod security;
mod signatures;
mod tenants;
