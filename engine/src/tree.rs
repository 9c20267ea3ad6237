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
    use std::cell::{Cell, RefCell};
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    use super::{hash_one, TreeEntry};
    use crate::hash::hash_bytes;
    use crate::io::buf::AlignedBuf;
    use crate::io::pread::shrank;
    use crate::io::uring;
    use crate::{AlgorithmInfo, Error, HashOptions, IoMode, IoUsed};

    pub(super) const FILES: usize = uring::BATCH_FILES;
    /// Files up to this size go in batches; bigger ones are hashed alone.
    const MAX_SIZE: u64 = 64 << 10;
    /// What a batch asks for when it does not know a file's size: one byte
    /// more than [`MAX_SIZE`], so that a read that fills the request means
    /// "too big for a batch" and a shorter one is the whole file (a read of
    /// a regular file returns less than asked only at its end).
    const PROBE: u64 = MAX_SIZE + 1;
    /// The batch buffer: every file at its most, each padded to 64 bytes.
    const BUF_LEN: usize = FILES * (PROBE as usize).next_multiple_of(64);

    /// Whether trees use batches: io_uring asked for, or `Auto` where it
    /// works. Measured (`examples/tree_probe.rs`, 5000 files of 0-8 KiB,
    /// crc32, 2 busy cores): batches 142-148k files/s against 65-131k for
    /// per-file pread, and the same CPU per file (~130-145k files per
    /// CPU-second both); path lookup in the kernel dominates either way.
    pub(super) fn enabled(mode: IoMode) -> bool {
        matches!(mode, IoMode::Uring | IoMode::Auto) && crate::io::uring_available().is_ok()
    }

    thread_local! {
        /// This thread's batch buffer (page-aligned, zeroed once), taken
        /// out while in use.
        static BUF: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
        /// Files this thread batched lately, and how many of them were
        /// bigger than `MAX_SIZE` (halved now and then, so it follows the
        /// tree).
        static SEEN: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
    }

    /// Whether to `stat` files before batching them: only where many files
    /// turned out too big. A `stat` per file (the path looked up once more)
    /// measured 21-23% of the CPU time of `fleetsync sum -r` over 20,000
    /// files of 4 KiB; without it, a file too big for a batch costs a wasted
    /// read of [`PROBE`] bytes before it is hashed alone, which is the worse
    /// deal once more than about one file in four is big.
    fn stat_first() -> bool {
        let (seen, big) = SEEN.get();
        seen >= 64 && big * 4 > seen
    }

    fn record(files: u32, big: u32) {
        let (mut seen, mut b) = SEEN.get();
        seen += files;
        b += big;
        if seen >= 1024 {
            seen /= 2;
            b /= 2;
        }
        SEEN.set((seen, b));
    }

    /// A file of a batch: its index in the chunk, its path, and the size
    /// a `stat` gave (`None`: not asked, read [`PROBE`] bytes).
    struct Small {
        index: usize,
        path: CString,
        size: Option<u64>,
    }

    pub(super) fn hash(
        chunk: &[PathBuf],
        algs: &[AlgorithmInfo],
        opts: &HashOptions,
    ) -> Vec<TreeEntry> {
        let mut out: Vec<Option<TreeEntry>> = (0..chunk.len()).map(|_| None).collect();
        let mut small: Vec<Small> = Vec::new();
        let stat = stat_first();
        let mut big = 0u32;
        for (index, path) in chunk.iter().enumerate() {
            let size = if stat {
                match std::fs::symlink_metadata(path) {
                    Ok(m) if m.is_file() && m.len() <= MAX_SIZE => Some(m.len()),
                    _ => {
                        big += 1;
                        out[index] = Some(hash_one(path.clone(), algs, opts));
                        continue;
                    }
                }
            } else {
                None
            };
            let path = CString::new(path.as_os_str().as_bytes()).expect("paths have no NUL");
            small.push(Small { index, path, size });
        }
        if !small.is_empty() {
            let mut buf = BUF
                .with(|b| b.take())
                .filter(|b| b.len() >= BUF_LEN)
                .unwrap_or_else(|| AlignedBuf::new(BUF_LEN));
            let list: Vec<(&std::ffi::CStr, u64)> = small
                .iter()
                .map(|f| (f.path.as_c_str(), f.size.unwrap_or(PROBE)))
                .collect();
            let (offsets, _) = uring::batch_layout(list.iter().map(|f| f.1));
            match uring::read_batch(&list, &mut buf) {
                Ok(results) => {
                    for ((f, result), offset) in small.iter().zip(results).zip(offsets) {
                        let path = chunk[f.index].clone();
                        let entry = match result {
                            Err(e) => TreeEntry {
                                result: Err(Error::io(&path, e)),
                                path,
                            },
                            Ok(n) if n as u64 > MAX_SIZE => {
                                big += 1;
                                hash_one(path, algs, opts)
                            }
                            Ok(n) if f.size.is_some_and(|s| (n as u64) < s) => TreeEntry {
                                result: Err(Error::io(&path, shrank())),
                                path,
                            },
                            Ok(n) => TreeEntry {
                                result: Ok(hash_bytes(
                                    algs,
                                    &buf[offset..offset + n],
                                    IoUsed::Uring,
                                )),
                                path,
                            },
                        };
                        out[f.index] = Some(entry);
                    }
                }
                // The ring failed as a whole: hash these files one by one.
                Err(_) => {
                    for f in &small {
                        out[f.index] = Some(hash_one(chunk[f.index].clone(), algs, opts));
                    }
                }
            }
            BUF.with(|b| *b.borrow_mut() = Some(buf));
        }
        record(chunk.len() as u32, big);
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
