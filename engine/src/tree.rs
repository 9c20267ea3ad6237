//! Hashing a whole tree: a parallel walk that never follows symlinks, then
//! every regular file hashed in parallel on the current rayon pool.

use std::fs::{self, File, FileType, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::hash::hash_opened;
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
    let mut entries: Vec<TreeEntry> = files
        .into_par_iter()
        .map(|path| {
            let result = open_no_follow(&path).and_then(|f| hash_opened(&path, &f, algs, opts));
            TreeEntry { path, result }
        })
        .collect();
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

/// Opens a file found by the walk without following a symlink that may have
/// replaced it since, and without blocking on a FIFO that may have.
fn open_no_follow(path: &Path) -> Result<File, Error> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::other("no longer a regular file"),
        ));
    }
    Ok(file)
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
