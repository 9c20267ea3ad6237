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
mod crc;
mod error;
mod hash;
mod io;
mod registry;
mod sums;
mod tree;

pub use algorithm::{Algorithm, Digest};
pub use error::Error;
pub use hash::{hash_file, hash_reader, FileHash, HashOptions};
pub use io::{IoMode, IoUsed};
pub use registry::{AlgorithmInfo, Registry};
pub use tree::{hash_tree, Skipped, TreeEntry, TreeHash};
