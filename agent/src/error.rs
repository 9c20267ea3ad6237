//! Errors of the agent.

use std::fmt;
use std::io;

use fleetsync_proto::ProtoError;

/// Shows a raw path readably (invalid UTF-8 escaped).
pub(crate) fn show(path: &[u8]) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    String::from_utf8_lossy(path).into_owned()
}

/// Everything that can go wrong in the agent; each variant names the path.
#[derive(Debug)]
#[non_exhaustive]
pub enum AgentError {
    /// A path from a message is not a clean relative path beneath the root.
    UnsafePath {
        /// The path as received.
        path: Vec<u8>,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file system operation failed.
    Io {
        /// What was being done (`open`, `rename`, ...).
        op: &'static str,
        /// The relative path.
        path: Vec<u8>,
        /// The OS error.
        source: io::Error,
    },
    /// A received file did not match what the sender announced.
    Verify {
        /// The relative path.
        path: Vec<u8>,
        /// What did not match.
        why: String,
    },
    /// The checksum engine refused (unknown algorithm, ...).
    Engine(String),
    /// The connection or a message failed.
    Proto(ProtoError),
}

impl AgentError {
    pub(crate) fn io(op: &'static str, path: &[u8], source: impl Into<io::Error>) -> Self {
        AgentError::Io {
            op,
            path: path.to_vec(),
            source: source.into(),
        }
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::UnsafePath { path, reason } => {
                write!(f, "refused path '{}': {reason}", show(path))
            }
            AgentError::Io { op, path, source } => write!(f, "{op} '{}': {source}", show(path)),
            AgentError::Verify { path, why } => write!(f, "'{}': {why}", show(path)),
            AgentError::Engine(m) => write!(f, "{m}"),
            AgentError::Proto(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AgentError::Io { source, .. } => Some(source),
            AgentError::Proto(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ProtoError> for AgentError {
    fn from(e: ProtoError) -> Self {
        AgentError::Proto(e)
    }
}

impl From<fleetsync_proto::tls::TlsError> for AgentError {
    fn from(e: fleetsync_proto::tls::TlsError) -> Self {
        AgentError::Proto(e.into())
    }
}
