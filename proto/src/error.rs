//! Errors of the protocol crate.

use std::fmt;
use std::io;

/// Everything that can go wrong while framing, decoding or authenticating.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProtoError {
    /// Reading or writing the connection failed.
    Io(io::Error),
    /// A frame announced (or would need) more bytes than allowed.
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The maximum allowed here.
        max: u64,
    },
    /// The peer closed the connection in the middle of a frame.
    Truncated,
    /// The frame is not a valid Cap'n Proto message of our schema.
    Decode(String),
    /// A frame of a different kind was expected.
    Unexpected {
        /// What we were waiting for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer failed to authenticate (or the listener did not prove the token).
    AuthFailed(&'static str),
    /// The peer reported an error.
    Remote(String),
    /// The TLS layer refused the peer or failed (see [`crate::tls`]).
    Tls(String),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "connection: {e}"),
            ProtoError::FrameTooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {max}")
            }
            ProtoError::Truncated => write!(f, "connection closed in the middle of a frame"),
            ProtoError::Decode(m) => write!(f, "malformed message: {m}"),
            ProtoError::Unexpected { expected, got } => {
                write!(f, "protocol error: expected {expected}, got {got}")
            }
            ProtoError::AuthFailed(why) => write!(f, "authentication failed: {why}"),
            ProtoError::Remote(m) => write!(f, "peer error: {m}"),
            ProtoError::Tls(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtoError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}

impl From<capnp::Error> for ProtoError {
    fn from(e: capnp::Error) -> Self {
        ProtoError::Decode(e.to_string())
    }
}

impl From<capnp::NotInSchema> for ProtoError {
    fn from(e: capnp::NotInSchema) -> Self {
        ProtoError::Decode(format!("value not in schema: {}", e.0))
    }
}

impl From<std::str::Utf8Error> for ProtoError {
    fn from(e: std::str::Utf8Error) -> Self {
        ProtoError::Decode(format!("text is not UTF-8: {e}"))
    }
}

impl From<crate::tls::TlsError> for ProtoError {
    fn from(e: crate::tls::TlsError) -> Self {
        ProtoError::Tls(e.to_string())
    }
}
