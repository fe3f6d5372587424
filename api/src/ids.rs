//! Ids of volumes and their mounts: names used as file names, validated once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;

/// A string that is not a valid id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{id}` is not a valid {kind}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with `.`)")]
pub struct IdError {
    pub kind: &'static str,
    pub id: String,
}

impl IdError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidArgument
    }
}

const MAX_ID: usize = 128;

/// A name used as a file name: 1–128 of `[A-Za-z0-9._-]`, not starting with `.`.
fn check_id(kind: &'static str, text: &str) -> Result<(), IdError> {
    let valid = !text.is_empty()
        && text.len() <= MAX_ID
        && !text.starts_with('.')
        && text.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid { Ok(()) } else { Err(IdError { kind, id: text.to_owned() }) }
}

/// A volume's id (the CSI volume id).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

/// Tells mounts of one volume apart (default `default`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MountId(String);

macro_rules! id_type {
    ($type:ident, $kind:literal) => {
        impl $type {
            /// Validates an id.
            ///
            /// # Errors
            /// [`IdError`] naming the id.
            pub fn new(text: &str) -> Result<$type, IdError> {
                check_id($kind, text)?;
                Ok($type(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $type {
            type Error = IdError;

            fn try_from(text: String) -> Result<$type, IdError> {
                $type::new(&text)
            }
        }

        impl From<$type> for String {
            fn from(id: $type) -> String {
                id.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(VolumeId, "volume id");
id_type!(MountId, "mount id");

impl Default for MountId {
    fn default() -> Self {
        MountId("default".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids are file-name safe, and say what is wrong when they are not.
    #[test]
    fn ids_are_validated() {
        assert!(VolumeId::new("csi-0123abcd_x.y").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "x y", &"v".repeat(129)] {
            let error = VolumeId::new(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidArgument);
            assert!(error.to_string().contains("volume id"), "{error}");
        }
        assert!(serde_json::from_str::<MountId>("\"../x\"").is_err());
    }
}
