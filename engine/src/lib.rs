//! Selectable checksum algorithms with SIMD kernels, parallel hashing of big
//! files and of whole trees, and io_uring reads with a portable fallback.
//!
//! ```
//! use fleetsync_engine::Registry;
//!
//! let registry = Registry::with_builtins();
//! let mut crc = registry.get("crc32").unwrap();
//! crc.update(b"123456789");
//! assert_eq!(crc.finish().to_hex(), "cbf43926");
//! ```
#![deny(missing_docs)]

mod algorithm;
mod builtin;
mod error;
mod registry;

pub use algorithm::{Algorithm, Digest};
pub use error::Error;
pub use registry::{AlgorithmInfo, Registry};
