//! Read backends, one small file each: `pread` (portable), `mmap` (explicit
//! only) and `uring` (io_uring with registered buffers, Linux, feature
//! `uring`). Each fills [`Block`]s that the hashing side consumes.

use std::fmt;
use std::str::FromStr;

pub(crate) mod buf;
pub use buf::AlignedBuf;
pub(crate) mod mmap;
pub(crate) mod pread;
#[cfg(all(feature = "uring", target_os = "linux"))]
pub(crate) mod uring;

use crate::Error;

/// How [`crate::hash_file`] should read files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IoMode {
    /// `pread` for single files (it measured faster than io_uring for cached
    /// data); io_uring batches for the small files of a tree when the kernel
    /// allows it (see [`IoUsed`] for what read each file).
    #[default]
    Auto,
    /// io_uring only; an error if it is unavailable.
    Uring,
    /// Plain positioned reads (`pread`).
    Pread,
    /// Map the whole file into memory. A file that shrinks meanwhile is an
    /// error, as with `pread`, not a `SIGBUS`: the pages past its new end
    /// read as zeros and the hash is refused.
    Mmap,
}

impl FromStr for IoMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "pread" => Ok(IoMode::Pread),
            "mmap" => Ok(IoMode::Mmap),
            _ => Err(Error::InvalidIoMode {
                given: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for IoMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::Uring => "uring",
            IoMode::Pread => "pread",
            IoMode::Mmap => "mmap",
        })
    }
}

/// Which backend actually read a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoUsed {
    /// io_uring.
    Uring,
    /// `pread`.
    Pread,
    /// A memory map.
    Mmap,
    /// Sequential `read` of a stream (stdin, a pipe, a device).
    Stream,
}

impl fmt::Display for IoUsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoUsed::Uring => "uring",
            IoUsed::Pread => "pread",
            IoUsed::Mmap => "mmap",
            IoUsed::Stream => "stream",
        })
    }
}

/// One filled read buffer on its way from a reader thread to the hasher,
/// and back.
pub(crate) struct Block {
    /// File offset of `data[0]`.
    pub(crate) offset: u64,
    /// The buffer (page-aligned, for fast kernel copies).
    pub(crate) data: buf::AlignedBuf,
    /// How many bytes of `data` were read.
    pub(crate) len: usize,
}

impl Block {
    /// The bytes read.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// Whether io_uring works here (probed once per process), with the reason
/// when it does not.
pub(crate) fn uring_available() -> Result<(), String> {
    #[cfg(all(feature = "uring", target_os = "linux"))]
    {
        uring::probe()
    }
    #[cfg(not(all(feature = "uring", target_os = "linux")))]
    {
        Err("built without the `uring` feature".to_owned())
    }
}
