//! The host's parsers, compiled as they are for the fuzz targets.

#[path = "../../host/src/archive.rs"]
pub mod archive;
#[path = "../../host/src/digest.rs"]
pub mod digest;
#[path = "../../host/src/error.rs"]
pub mod error;
#[path = "../../host/src/modelpack.rs"]
pub mod modelpack;
