//! The host's parsers, compiled as they are for the fuzz targets.

#[path = "../../host/src/archive.rs"]
pub mod archive;
#[path = "../../host/src/modelpack/mod.rs"]
pub mod modelpack;

pub use modelcache_api::{digest, error};
