//! What callers branch on: the kind of an error, never its text.

use serde::{Deserialize, Serialize};

/// The kind of a failure, shared by every module's error type and mapped to
/// API status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is malformed (a bad reference, volume id or option).
    InvalidArgument,
    /// The thing asked for does not exist.
    NotFound,
    /// The request contradicts the state (a volume holding another model).
    Conflict,
    /// A quota decision refused the pull.
    QuotaDenied,
    /// The registry or the filesystem refused access.
    PermissionDenied,
    /// Something needed is unreachable for now; retrying may help.
    Unavailable,
    /// Content did not match its digest, or a model breaks the format's rules.
    DataLoss,
    /// A policy plugin failed and its fail mode stopped the request.
    PolicyFailed,
    /// The request was given up (its caller left, or the engine shut down).
    Cancelled,
    /// A local failure: I/O, a bug.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::QuotaDenied => "quota-denied",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DataLoss => "data-loss",
            ErrorKind::PolicyFailed => "policy-failed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error and its causes, outermost first, joined by `: ` (how an error
/// reads in an answer or a log line, where no reporter walks the chain).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
