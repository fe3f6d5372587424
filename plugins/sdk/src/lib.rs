//! The guest SDK for modelcache policy plugins.
//!
//! A policy is a `cdylib` crate built for `wasm32-wasip2`:
//!
//! ```no_run
//! modelcache_policy::generate!("quota-policy");
//! use exports::modelcache::policy::{quota, settings};
//!
//! struct Policy;
//! impl settings::Guest for Policy {
//!     fn validate_settings(settings: String) -> Result<(), String> {
//!         modelcache_policy::parse_settings::<serde_json::Value>(&settings).map(drop)
//!     }
//! }
//! impl quota::Guest for Policy {
//!     fn decide(request: quota::Request) -> Result<quota::Verdict, String> {
//!         Ok(quota::Verdict::Admit)
//!     }
//! }
//! // Only the wasm build exports: native builds (unit tests) then link
//! // without the component's `ns:pkg/iface#func` symbol names.
//! #[cfg(target_arch = "wasm32")]
//! export!(Policy);
//! # fn main() {}
//! ```
//!
//! Besides the bindings it carries what policies keep needing: settings
//! parsing with useful errors ([`parse_settings`]), sizes and shares of a disk
//! ([`size`]), and gitignore-syntax patterns over whole paths ([`pattern`]).

pub mod pattern;
pub mod size;

#[doc(hidden)]
pub use wit_bindgen;

include!(concat!(env!("OUT_DIR"), "/generate.rs"));

/// Parses a plugin's settings (the JSON the host passes) into `T`.
///
/// An empty object gives `T::default()` for every `#[serde(default)]` field;
/// put `#[serde(deny_unknown_fields)]` on `T` so a misspelt key is refused at
/// load time instead of silently ignored.
///
/// # Errors
/// A message naming the offending key or value, fit to show an operator.
pub fn parse_settings<T: serde::de::DeserializeOwned>(settings: &str) -> Result<T, String> {
    let settings = if settings.trim().is_empty() { "{}" } else { settings };
    serde_json::from_str(settings).map_err(|error| format!("invalid settings: {error}"))
}
