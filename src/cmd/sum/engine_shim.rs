//! TEMP until engine lands: the agreed `fleetsync-engine` hashing API, implemented
//! naively (one serial read loop) so that `sum` and `bench` compile and run today.
//! Delete this file and import from `fleetsync_engine` once the engine commits it.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use fleetsync_engine::{AlgorithmInfo, Digest, Error};

/// How files are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// Let the engine pick.
    #[default]
    Auto,
    /// io_uring.
    Uring,
    /// pread.
    Pread,
    /// mmap.
    Mmap,
}

impl FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "pread" => Ok(IoMode::Pread),
            "mmap" => Ok(IoMode::Mmap),
            _ => Err(format!("unknown I/O mode '{s}'")),
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

/// The I/O backend actually used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoUsed {
    /// io_uring.
    Uring,
    /// pread.
    Pread,
    /// mmap.
    Mmap,
    /// A plain reader.
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

/// Hashing options.
#[derive(Clone, Debug)]
pub struct HashOptions {
    /// I/O backend.
    pub io: IoMode,
    /// Read size.
    pub chunk_size: usize,
    /// Files at least this big are hashed by several threads.
    pub parallel_threshold: u64,
}

impl Default for HashOptions {
    fn default() -> Self {
        HashOptions {
            io: IoMode::Auto,
            chunk_size: 1 << 20,
            parallel_threshold: 64 << 20,
        }
    }
}

/// The digests of one file.
#[derive(Clone, Debug)]
pub struct FileHash {
    /// Bytes read.
    pub size: u64,
    /// One digest per algorithm, in the order asked.
    pub digests: Vec<Digest>,
    /// The backend used.
    pub io: IoUsed,
}

/// Hashes one file.
pub fn hash_file(
    path: &Path,
    algs: &[AlgorithmInfo],
    _opts: &HashOptions,
) -> Result<FileHash, Error> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = hash_reader(file, algs).map_err(|e| match e {
        Error::Io { source, .. } => Error::io(path, source),
        other => other,
    })?;
    h.io = IoUsed::Pread;
    Ok(h)
}

/// Hashes everything `reader` yields.
pub fn hash_reader<R: Read>(mut reader: R, algs: &[AlgorithmInfo]) -> Result<FileHash, Error> {
    let mut states: Vec<_> = algs.iter().map(|a| a.instantiate()).collect();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Io {
                    path: None,
                    source: e,
                })
            }
        };
        size += n as u64;
        for s in &mut states {
            s.update(&buf[..n]);
        }
    }
    Ok(FileHash {
        size,
        digests: states.iter().map(|s| s.finish()).collect(),
        io: IoUsed::Stream,
    })
}

/// One file of a tree.
#[derive(Debug)]
pub struct TreeEntry {
    /// Path (root joined with the relative path).
    pub path: PathBuf,
    /// Its hash or why it failed.
    pub result: Result<FileHash, Error>,
}

/// Something in the tree that is not hashed.
#[derive(Debug)]
pub struct Skipped {
    /// Its path.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Every regular file of a tree.
#[derive(Debug)]
pub struct TreeHash {
    /// Sorted by path.
    pub entries: Vec<TreeEntry>,
    /// Specials skipped.
    pub skipped: Vec<Skipped>,
}

/// Hashes every regular file under `root`.
pub fn hash_tree(
    root: &Path,
    algs: &[AlgorithmInfo],
    opts: &HashOptions,
) -> Result<TreeHash, Error> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    walk(root, &mut files, &mut skipped)?;
    files.sort();
    skipped.sort_by(|a: &Skipped, b| a.path.cmp(&b.path));
    let entries = files
        .into_iter()
        .map(|p| {
            let result = hash_file(&p, algs, opts);
            TreeEntry { path: p, result }
        })
        .collect();
    Ok(TreeHash { entries, skipped })
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, skipped: &mut Vec<Skipped>) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        let path = entry.path();
        if ft.is_dir() {
            walk(&path, files, skipped)?;
        } else if ft.is_file() {
            files.push(path);
        } else {
            let reason = if ft.is_fifo() {
                "FIFO"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_socket() {
                "socket"
            } else {
                "device"
            };
            skipped.push(Skipped {
                path,
                reason: reason.into(),
            });
        }
    }
    Ok(())
}
