//! Errors of the engine.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the engine; each variant names what failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No algorithm of that name is registered.
    UnknownAlgorithm {
        /// The name asked for.
        name: String,
    },
    /// The algorithm cannot combine states of adjacent chunks.
    CombineUnsupported {
        /// The algorithm's name.
        algorithm: String,
    },
    /// Two states of different algorithms were combined.
    CombineMismatch {
        /// The left state's algorithm.
        left: String,
        /// The right state's algorithm.
        right: String,
    },
    /// An I/O mode name that is not `auto`, `uring`, `pread` or `mmap`.
    InvalidIoMode {
        /// The name given.
        given: String,
    },
    /// io_uring was asked for explicitly but cannot be used here.
    UringUnavailable {
        /// Why (the failing call and the OS error).
        reason: String,
    },
    /// Reading or opening a file failed.
    Io {
        /// The file, when there is one.
        path: Option<PathBuf>,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: Some(path.into()),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownAlgorithm { name } => {
                write!(f, "unknown checksum algorithm '{name}' (see --list)")
            }
            Error::CombineUnsupported { algorithm } => {
                write!(f, "algorithm '{algorithm}' cannot combine chunk states")
            }
            Error::CombineMismatch { left, right } => {
                write!(f, "cannot combine a '{left}' state with a '{right}' state")
            }
            Error::InvalidIoMode { given } => {
                write!(f, "unknown I/O mode '{given}' (auto, uring, pread, mmap)")
            }
            Error::UringUnavailable { reason } => {
                write!(f, "io_uring is unavailable: {reason}")
            }
            Error::Io {
                path: Some(path),
                source,
            } => write!(f, "{}: {source}", path.display()),
            Error::Io { path: None, source } => write!(f, "{source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
