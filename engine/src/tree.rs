//! Hashing a whole tree: a parallel walk that never follows symlinks, then
//! every regular file hashed in parallel on the current rayon pool.

use std::fs::{self, File, FileType, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::hash::{hash_opened_as, NotRegular};
use crate::{AlgorithmInfo, Error, FileHash, HashOptions};

/// One regular file of a tree and its digests (or why it could not be hashed).
#[derive(Debug)]
pub struct TreeEntry {
    /// `root.join(relative path)`, as `find ROOT` prints it.
    pub path: PathBuf,
    /// The digests, or the error (which names the path).
    pub result: Result<FileHash, Error>,
}

/// Something in the tree that is not hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `root.join(relative path)`.
    pub path: PathBuf,
    /// Why: `"symlink"`, `"FIFO"`, `"socket"`, `"device"`.
    pub reason: String,
}

/// Every regular file under a root, hashed.
#[derive(Debug)]
pub struct TreeHash {
    /// Regular files (and unreadable directories, with their error), sorted
    /// by path bytes.
    pub entries: Vec<TreeEntry>,
    /// What was not hashed, sorted by path bytes.
    pub skipped: Vec<Skipped>,
}

/// Hashes every regular file under `root` with every algorithm in `algs`.
///
/// Symlinks inside the tree are never followed (they are [`Skipped`] with
/// reason `"symlink"`), nor are FIFOs, sockets and devices read. `root`
/// itself is followed if it is a symlink, like `find -H`; a root that is a
/// regular file gives a one-entry tree. A directory that cannot be read
/// becomes an entry whose `result` is the error. Only a missing or
/// unreadable `root` fails the whole call.
pub fn hash_tree(
    root: &Path,
    algs: &[AlgorithmInfo],
    opts: &HashOptions,
) -> Result<TreeHash, Error> {
    let meta = fs::metadata(root).map_err(|e| Error::io(root, e))?;
    let walk = Walk::default();
    if meta.is_dir() {
        // Read the root here so that an unreadable root fails the call.
        let entries = fs::read_dir(root).map_err(|e| Error::io(root, e))?;
        rayon::scope(|s| walk.dir_entries(s, root, entries));
    } else {
        walk.classify(root, meta.file_type());
    }
    let Walk {
        files,
        errors,
        skipped,
    } = walk;
    let mut files = files.into_inner().expect("walk lock");
    let mut skipped = skipped.into_inner().expect("walk lock");
    files.sort_unstable_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    skipped.sort_unstable_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    let mut entries: Vec<TreeEntry> = if batch::enabled(opts.io) {
        files
            .par_chunks(batch::FILES)
            .map(|chunk| batch::hash(chunk, algs, opts))
            .collect::<Vec<Vec<TreeEntry>>>()
            .into_iter()
            .flatten()
            .collect()
    } else {
        files
            .into_par_iter()
            .map(|path| hash_one(path, algs, opts))
            .collect()
    };
    let errors = errors.into_inner().expect("walk lock");
    if !errors.is_empty() {
        entries.extend(errors);
        entries.sort_by(|a, b| {
            a.path
                .as_os_str()
                .as_bytes()
                .cmp(b.path.as_os_str().as_bytes())
        });
    }
    Ok(TreeHash { entries, skipped })
}

/// Hashes one file found by the walk on its own.
fn hash_one(path: PathBuf, algs: &[AlgorithmInfo], opts: &HashOptions) -> TreeEntry {
    let result = open_no_follow(&path).and_then(|f| {
        // One `fstat` both checks that it is still a regular file and sizes it.
        hash_opened_as(&f, algs, opts, NotRegular::Refuse, |e| Error::io(&path, e))
    });
    TreeEntry { path, result }
}

/// Small files read through io_uring in batches: open, read and close of
/// [`batch::FILES`] files chained in the kernel, one system call per batch.
#[cfg(all(feature = "uring", target_os = "linux"))]
mod batch {
    use std::cell::RefCell;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    use super::{hash_one, TreeEntry};
    use crate::hash::hash_bytes;
    use crate::io::uring;
    use crate::{AlgorithmInfo, Error, HashOptions, IoMode, IoUsed};

    pub(super) const FILES: usize = uring::BATCH_FILES;
    /// Files up to this size go in batches; bigger ones are hashed alone.
    const MAX_SIZE: u64 = 64 << 10;

    /// Whether trees use batches: io_uring asked for, or `Auto` where it
    /// works. Measured (`examples/tree_probe.rs`, 5000 files of 0-8 KiB,
    /// crc32, 2 busy cores): batches 142-148k files/s against 65-131k for
    /// per-file pread, and the same CPU per file (~130-145k files per
    /// CPU-second both); path lookup in the kernel dominates either way.
    pub(super) fn enabled(mode: IoMode) -> bool {
        matches!(mode, IoMode::Uring | IoMode::Auto) && crate::io::uring_available().is_ok()
    }

    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn hash(
        chunk: &[PathBuf],
        algs: &[AlgorithmInfo],
        opts: &HashOptions,
    ) -> Vec<TreeEntry> {
        let mut out: Vec<Option<TreeEntry>> = (0..chunk.len()).map(|_| None).collect();
        let mut small: Vec<(usize, CString, u64)> = Vec::new();
        for (i, path) in chunk.iter().enumerate() {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_file() && m.len() <= MAX_SIZE => {
                    let c = CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL");
                    small.push((i, c, m.len()));
                }
                _ => out[i] = Some(hash_one(path.clone(), algs, opts)),
            }
        }
        if !small.is_empty() {
            let mut buf = BUF.with(|b| b.take());
            let list: Vec<(&std::ffi::CStr, u64)> =
                small.iter().map(|(_, c, n)| (c.as_c_str(), *n)).collect();
            match uring::read_batch(&list, &mut buf) {
                Ok(results) => {
                    let mut offset = 0usize;
                    for ((i, _, size), result) in small.iter().zip(results) {
                        let data = &buf[offset..offset + *size as usize];
                        offset += *size as usize;
                        let path = chunk[*i].clone();
                        let result = result
                            .map(|()| hash_bytes(algs, data, IoUsed::Uring))
                            .map_err(|e| Error::io(&path, e));
                        out[*i] = Some(TreeEntry { path, result });
                    }
                }
                // The ring failed as a whole: hash these files one by one.
                Err(_) => {
                    for (i, _, _) in &small {
                        out[*i] = Some(hash_one(chunk[*i].clone(), algs, opts));
                    }
                }
            }
            BUF.with(|b| *b.borrow_mut() = buf);
        }
        out.into_iter()
            .map(|e| e.expect("every file handled"))
            .collect()
    }
}

#[cfg(not(all(feature = "uring", target_os = "linux")))]
mod batch {
    use std::path::PathBuf;

    use super::TreeEntry;
    use crate::{AlgorithmInfo, HashOptions, IoMode};

    pub(super) const FILES: usize = 32;
    pub(super) fn enabled(_mode: IoMode) -> bool {
        false
    }
    pub(super) fn hash(_: &[PathBuf], _: &[AlgorithmInfo], _: &HashOptions) -> Vec<TreeEntry> {
        unreachable!("batches need io_uring")
    }
}

/// Opens a file found by the walk without following a symlink that may have
/// replaced it since, and without blocking on a FIFO that may have (the
/// caller refuses anything that is not a regular file).
fn open_no_follow(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// What the walk collects, from several threads.
#[derive(Default)]
struct Walk {
    files: Mutex<Vec<PathBuf>>,
    errors: Mutex<Vec<TreeEntry>>,
    skipped: Mutex<Vec<Skipped>>,
}

impl Walk {
    fn dir_entries<'s>(&'s self, s: &rayon::Scope<'s>, dir: &Path, entries: fs::ReadDir) {
        let mut files = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.error(dir, e);
                    continue;
                }
            };
            let path = entry.path();
            // `DirEntry::file_type` does not follow symlinks.
            match entry.file_type() {
                Ok(t) if t.is_dir() => {
                    s.spawn(move |s| match fs::read_dir(&path) {
                        Ok(entries) => self.dir_entries(s, &path, entries),
                        Err(e) => self.error(&path, e),
                    });
                }
                Ok(t) if t.is_file() => files.push(path),
                Ok(t) => self.classify(&path, t),
                Err(e) => self.error(&path, e),
            }
        }
        self.files.lock().expect("walk lock").extend(files);
    }

    /// Records a non-directory.
    fn classify(&self, path: &Path, t: FileType) {
        let reason = if t.is_file() {
            self.files.lock().expect("walk lock").push(path.to_owned());
            return;
        } else if t.is_symlink() {
            "symlink"
        } else if t.is_fifo() {
            "FIFO"
        } else if t.is_socket() {
            "socket"
        } else if t.is_block_device() || t.is_char_device() {
            "device"
        } else {
            "unknown file type"
        };
        self.skipped.lock().expect("walk lock").push(Skipped {
            path: path.to_owned(),
            reason: reason.to_owned(),
        });
    }

    fn error(&self, path: &Path, e: std::io::Error) {
        self.errors.lock().expect("walk lock").push(TreeEntry {
            path: path.to_owned(),
            result: Err(Error::io(path, e)),
        });
    }
}
