//! The daemon's API: JSON over HTTP/1.1 on a unix socket, described in
//! `api/openapi.json`.
//!
//! The main socket (mode 0600 by default) serves operators and the CSI shim.
//! A volume socket, made on request for one volume and handed into that
//! volume's pod, serves only that volume: any request naming another volume,
//! or touching the cache as a whole, is refused with `permission-denied`.
//!
//! Errors carry a [`crate::error::ErrorKind`] and map to distinct HTTP
//! statuses ([`status_of`]); the body is `{"error": {"kind", "message"}}`.

pub mod server;
pub mod sockets;

pub use modelcache_api::client;
pub use modelcache_api::protocol::*;
