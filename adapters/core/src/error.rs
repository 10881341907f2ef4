//! The one error type every adapter reports, with a kind and a temporary flag.
//!
//! A watch stream never ends because of an error: adapters yield the error as an item (so the
//! consumer can report staleness), back off, keep the last good snapshot, and try again. The
//! consumer never empties its view of a service because of an error.

use std::fmt;

/// What went wrong, coarsely: enough for a caller to decide how to report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The registry could not be reached or did not answer in time.
    Unavailable,
    /// The registry refused our credentials (ACL token, AWS keys, RBAC).
    Unauthorized,
    /// The registry answered something we cannot use (bad JSON, missing fields, bad file content).
    InvalidData,
    /// The adapter's own configuration is wrong (bad address, missing namespace).
    Config,
    /// Anything else.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unavailable => "unavailable",
            Self::Unauthorized => "unauthorized",
            Self::InvalidData => "invalid data",
            Self::Config => "configuration",
            Self::Other => "error",
        })
    }
}

/// An adapter failure. `temporary` says whether retrying may help; adapters retry either way (with
/// a longer backoff for permanent errors), but callers report the two differently.
#[derive(Debug, thiserror::Error)]
#[error("{source_id}: {kind}: {message}")]
pub struct DiscoveryError {
    pub kind: ErrorKind,
    pub temporary: bool,
    /// Which adapter instance failed (see [`crate::SourceId`]).
    pub source_id: crate::SourceId,
    /// What was wrong and where (URL, file:line, service), for a person to read.
    pub message: String,
    #[source]
    pub cause: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl DiscoveryError {
    pub fn new(
        kind: ErrorKind,
        temporary: bool,
        source_id: crate::SourceId,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            temporary,
            source_id,
            message: message.into(),
            cause: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_cause(mut self, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.cause = Some(Box::new(cause));
        self
    }
}
