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
//!
//! # Algorithms
//!
//! `crc32` (default), `crc32c`, `cksum`, `adler32`, `bsd` (`sum -r`), `sysv`
//! (`sum -s`), `crc16` (CRC-16/ARC) and every CRC-16 of the reveng catalogue
//! as `crc16/<name>` ([`Registry::catalog_names`]), `md2`, `md5`, `sha1`,
//! `sha224`, `sha256`, `sha384`, `sha512`, `blake3`, `xxh3`, `xxh128`.
//! Numeric checksums carry their number ([`Digest::value`]) for decimal
//! printing, and [`Algorithm::len`] gives the byte count `cksum`/`sum` print.
//! Other crates add algorithms with [`Registry::register`].
//!
//! # Files, trees and threads
//!
//! [`hash_file`] reads each buffer once and feeds it to every requested
//! algorithm. A file bigger than [`HashOptions::parallel_threshold`] whose
//! algorithms all combine (every CRC, `adler32`, `sysv`) is split into
//! [`HashOptions::chunk_size`] chunks hashed in parallel and combined in
//! order; otherwise it is streamed, with big buffers fed to several
//! algorithms in parallel and `blake3` using all threads on its own. Memory
//! stays constant: at most a few 256 KiB–1 MiB buffers per thread.
//! [`hash_open_file`] does the same for a file the caller opened itself
//! (beneath a directory descriptor, say), with no path resolved again.
//! Reads go into page-aligned buffers that each thread reuses, so hashing
//! many small files allocates nothing per file.
//! [`hash_tree`] walks a tree in parallel without following symlinks.
//!
//! All parallel work runs on the *current* rayon pool: cap the threads with
//! `rayon::ThreadPool::install`. The engine never builds a global pool.
//!
//! # Reading
//!
//! [`IoMode`] picks the backend and [`IoUsed`] reports the one that read
//! each file: `pread`; `mmap` (explicit only); io_uring with registered
//! buffers and several reads in flight per thread (Cargo feature `uring`,
//! on by default), probed once per process, with `Auto` falling back to
//! `pread` where io_uring is unavailable (old kernel, seccomp, disabled).
#![deny(missing_docs)]

#[macro_use]
mod algorithm;
mod builtin;
mod crc;
mod error;
mod hash;
mod io;
mod md5_block;
mod registry;
mod sums;
mod tree;

pub use algorithm::{Algorithm, Digest};
pub use error::Error;
pub use hash::{hash_file, hash_open_file, hash_reader, FileHash, HashOptions};
pub use io::{AlignedBuf, IoMode, IoUsed};
pub use registry::{AlgorithmInfo, Registry};
pub use tree::{hash_tree, Skipped, TreeEntry, TreeHash};
