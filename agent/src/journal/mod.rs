//! The block commit journal: apply a set of tree operations so that, after a crash or kill at
//! any point, the block is either entirely old or entirely new once [`recover`] has run.
//!
//! ```no_run
//! use fleetsync_agent::journal::{recover, BlockTxn, JournalAttrs, JournalOp, RelPath};
//! use std::io::Write;
//! # fn main() -> Result<(), fleetsync_agent::journal::JournalError> {
//! let root = std::path::Path::new("/srv/tree");
//! recover(root)?; // on agent start: finish or undo what a crash interrupted
//! let mut txn = BlockTxn::begin(root, "config")?;
//! let path = RelPath::new("etc/app.conf")?;
//! txn.stage_file(&path)?.write_all(b"threads = 4\n").expect("write");
//! let attrs = JournalAttrs { mode: Some(0o644), ..JournalAttrs::default() };
//! txn.add_op(JournalOp::Put { path, attrs })?;
//! txn.add_op(JournalOp::Symlink {
//!     path: RelPath::new("etc/current")?,
//!     target: "app.conf".into(),
//!     attrs: JournalAttrs::default(),
//! })?;
//! txn.add_op(JournalOp::Delete { path: RelPath::new("etc/old.conf")? })?;
//! txn.commit()?;
//! # Ok(()) }
//! ```
//!
//! # Protocol
//!
//! Everything lives on the tree's own filesystem, in `ROOT/.fleetsync-staging/<txn-id>/`
//! ([`STAGING_DIR`]), so that every step that touches the tree is a `rename(2)`:
//!
//! 1. *Prepare* (the tree is not touched): staged files are fsynced and get their final mode,
//!    owner and mtime; symlinks, hard links and new directories are created inside `new/`;
//!    every parent directory is checked. The operation list is written to `journal.tmp`,
//!    fsynced and renamed to `journal`.
//! 2. *Commit point*: an empty `COMMITTING` file is created and fsynced, with its directory.
//! 3. *Apply*: each operation in order. An object about to be replaced is first hard-linked
//!    (files, symlinks) or moved (directories) to `backup/<slot>`; the staged object is then
//!    renamed over the path. A deletion is a rename of the path into `backup/<slot>` (a whole
//!    directory subtree goes at once). Attribute changes on untouched files are applied in place.
//!    The parents of every touched path are fsynced.
//! 4. `DONE` is created and fsynced, `COMMITTING` is unlinked, the transaction directory is
//!    removed.
//!
//! A live transaction holds an exclusive `flock` on its directory; [`recover`] (run on agent
//! start, before anything else writes to the tree) skips locked directories and looks at every
//! other transaction directory: without `COMMITTING` (or with `DONE`) it is removed — nothing had been
//! touched, or everything is already in place; with `COMMITTING` the journal is replayed.
//! Replay is idempotent: each step is guarded by what is still in the staging directory (a
//! staged object still in `new/` has not been renamed yet; a `backup/<slot>` that exists means
//! that backup or deletion was done), so a crash during recovery is recovered the same way.
//! Once `COMMITTING` is durable a transaction only moves forward: if applying fails with an I/O
//! error, [`BlockTxn::commit`] returns [`JournalError::InDoubt`] and leaves the journal for the
//! next [`recover`]. The backups are kept until the transaction is done, so an operator can
//! restore by hand even then.
//!
//! # Rules for a block
//!
//! - Each path is the subject of at most one content operation (`Put`, `Symlink`, `HardLink`,
//!   `Delete`, `Mkdir`); a `SetAttrs` on a path must come after its content operation, if any.
//!   No operation may be beneath a path that the block puts, links or deletes (in either
//!   order). [`BlockTxn::add_op`] enforces both; they are what makes replay idempotent.
//! - Operations are applied in the order given: a `Mkdir` must come before the operations on
//!   paths inside it. A `HardLink` may point to a path put earlier in the same block (the two
//!   names then share the staged inode) or to an existing file in the tree.
//! - Directory mtimes are not preserved (renaming children into a directory changes it).
//!
//! # Path safety
//!
//! Paths are [`RelPath`]s: relative, no `..` / `.` / empty components, no NUL, and no component
//! named [`STAGING_DIR`]. They are resolved with `openat(2)` one component at a time from a
//! file descriptor of the root, each parent opened with `O_DIRECTORY | O_NOFOLLOW`, so a symlink
//! (or a non-directory) anywhere among the parents is refused by the kernel without a
//! check-then-use race. The last component is never followed: renames, links and `unlinkat`
//! act on the name itself; `SetAttrs` checks with `lstat` whether it is a symlink (then only
//! owner and mtime are set, with `AT_SYMLINK_NOFOLLOW`) — a swap between that check and the
//! `chmod` is the one remaining window, and only the agent writes the tree.
//!
//! # Fault injection
//!
//! If the environment variable [`CRASH_AT_ENV`] holds a number N, the process sends itself
//! `SIGKILL` just before the N-th step (counting from 1) of [`BlockTxn::commit`] or [`recover`].
//! This is how the crash tests cover every step; it costs one `getenv` per commit.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

mod apply;
mod at;
mod crash_hook;
mod record;
mod recovery;
#[cfg(test)]
mod tests;
mod txn;

pub(crate) use at::{open_parent, open_root};
pub(crate) use record::{escape, unescape};
pub use recovery::recover;
pub use txn::BlockTxn;

/// Name of the hidden staging directory directly under the root. Listings must skip it.
pub const STAGING_DIR: &str = ".fleetsync-staging";

/// Environment variable of the fault-injection hook: `SIGKILL` before step N (see module docs).
pub const CRASH_AT_ENV: &str = "FLEETSYNC_JOURNAL_CRASH_AT";

const JOURNAL_MAGIC: &str = "fleetsync-journal 1";
const JOURNAL_FILE: &str = "journal";
const JOURNAL_TMP: &str = "journal.tmp";
const COMMITTING_MARK: &str = "COMMITTING";
const DONE_MARK: &str = "DONE";
const NEW_DIR: &str = "new";
const BACKUP_DIR: &str = "backup";

/// True if a directory entry name is the staging directory and must be left out of listings.
pub fn is_staging_name(name: &OsStr) -> bool {
    name.as_bytes() == STAGING_DIR.as_bytes()
}

/// Errors of the journal. Each names the path or transaction that failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum JournalError {
    /// A path is not an acceptable relative path.
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A parent component is a symlink or not a directory.
    UnsafePath {
        /// The full relative path.
        path: PathBuf,
        /// The offending parent component (relative to the root).
        component: PathBuf,
    },
    /// Two content operations in one block name the same path (or `SetAttrs` precedes one).
    DuplicatePath {
        /// The path.
        path: PathBuf,
    },
    /// An operation is beneath a path that another operation of the block replaces or
    /// deletes.
    ConflictingOps {
        /// The operation's path.
        path: PathBuf,
        /// The other operation's path.
        other: PathBuf,
    },
    /// A `Put` names a path for which no file was staged, or a file was staged twice.
    StagedFile {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// The parent directory of a path neither exists nor is created earlier in the block.
    MissingParent {
        /// The path.
        path: PathBuf,
    },
    /// A hard link points to a path that is neither in the tree nor put earlier in the block.
    MissingLinkTarget {
        /// The link's path.
        path: PathBuf,
        /// Its target.
        target: PathBuf,
    },
    /// A system call failed.
    Io {
        /// What was being done.
        action: &'static str,
        /// The path it was done to (relative paths are relative to the root).
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A journal that must be complete could not be read.
    CorruptJournal {
        /// The transaction directory.
        txn: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Applying a committed transaction failed; it stays committed and [`recover`] will retry.
    InDoubt {
        /// The transaction directory.
        txn: PathBuf,
        /// The failure.
        source: Box<JournalError>,
    },
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidPath { path, reason } => {
                write!(f, "invalid path {}: {reason}", path.display())
            }
            Self::UnsafePath { path, component } => write!(
                f,
                "refusing path {}: parent {} is a symlink or not a directory",
                path.display(),
                component.display()
            ),
            Self::DuplicatePath { path } => {
                write!(f, "path {} is changed twice in one block", path.display())
            }
            Self::ConflictingOps { path, other } => write!(
                f,
                "{} conflicts with {} in the same block: one is beneath the other, which is \
                 replaced or deleted",
                path.display(),
                other.display()
            ),
            Self::StagedFile { path, reason } => {
                write!(f, "staged file for {}: {reason}", path.display())
            }
            Self::MissingParent { path } => write!(
                f,
                "parent directory of {} does not exist and is not created by the block",
                path.display()
            ),
            Self::MissingLinkTarget { path, target } => write!(
                f,
                "hard link {} -> {}: target neither exists nor is put by the block",
                path.display(),
                target.display()
            ),
            Self::Io {
                action,
                path,
                source,
            } => write!(f, "{action} {}: {source}", path.display()),
            Self::CorruptJournal { txn, reason } => {
                write!(f, "corrupt journal in {}: {reason}", txn.display())
            }
            Self::InDoubt { txn, source } => write!(
                f,
                "committed block {} could not be applied (recover will retry): {source}",
                txn.display()
            ),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::InDoubt { source, .. } => Some(source),
            _ => None,
        }
    }
}

type Result<T, E = JournalError> = std::result::Result<T, E>;

fn io_err(action: &'static str, path: impl Into<PathBuf>, e: impl Into<io::Error>) -> JournalError {
    JournalError::Io {
        action,
        path: path.into(),
        source: e.into(),
    }
}

/// A validated path relative to the tree root (see the module docs for the rules).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(Vec<u8>);

impl RelPath {
    /// Validates a relative path: not empty, not absolute, no NUL, no `.`/`..`/empty
    /// components, no trailing slash, no component named [`STAGING_DIR`].
    pub fn new(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = path.as_os_str().as_bytes();
        let bad = |reason| {
            Err(JournalError::InvalidPath {
                path: path.to_owned(),
                reason,
            })
        };
        if bytes.is_empty() {
            return bad("empty");
        }
        if bytes.contains(&0) {
            return bad("contains NUL");
        }
        if bytes[0] == b'/' {
            return bad("absolute");
        }
        if bytes.ends_with(b"/") {
            return bad("trailing slash");
        }
        for comp in bytes.split(|&b| b == b'/') {
            match comp {
                b"" => return bad("empty component"),
                b"." => return bad("`.` component"),
                b".." => return bad("`..` component"),
                c if c == STAGING_DIR.as_bytes() => return bad("names the staging directory"),
                _ => {}
            }
        }
        debug_assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
        Ok(Self(bytes.to_vec()))
    }

    /// The path as a [`Path`].
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// The parent path, or `None` for a top-level name.
    pub fn parent(&self) -> Option<RelPath> {
        let pos = self.0.iter().rposition(|&b| b == b'/')?;
        Some(Self(self.0[..pos].to_vec()))
    }

    /// True if `self` is a proper ancestor directory of `other`.
    pub fn is_ancestor_of(&self, other: &RelPath) -> bool {
        other.0.len() > self.0.len()
            && other.0.starts_with(&self.0)
            && other.0[self.0.len()] == b'/'
    }

    fn split_last(&self) -> (Option<&[u8]>, &OsStr) {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(pos) => (Some(&self.0[..pos]), OsStr::from_bytes(&self.0[pos + 1..])),
            None => (None, OsStr::from_bytes(&self.0)),
        }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_path(), f)
    }
}

/// A modification time: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mtime {
    /// Seconds since the epoch (negative before it).
    pub secs: i64,
    /// Nanoseconds, below 1e9.
    pub nanos: u32,
}

/// Attributes to give an object; `None` leaves that attribute as the system makes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalAttrs {
    /// Permission bits (`0o7777` mask). Ignored for symlinks.
    pub mode: Option<u32>,
    /// Modification time.
    pub mtime: Option<Mtime>,
    /// Owner uid.
    pub uid: Option<u32>,
    /// Group gid.
    pub gid: Option<u32>,
}

/// One operation of a block.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JournalOp {
    /// Put the file staged with [`BlockTxn::stage_file`] at `path`, replacing what is there.
    Put {
        /// Destination.
        path: RelPath,
        /// Attributes of the new file.
        attrs: JournalAttrs,
    },
    /// Create or repoint a symlink at `path`.
    Symlink {
        /// Where the symlink goes.
        path: RelPath,
        /// What it points to (stored verbatim, may dangle).
        target: PathBuf,
        /// Owner and mtime of the link itself (`mode` is ignored).
        attrs: JournalAttrs,
    },
    /// Make `path` a hard link to `target` (a path of the tree, or one put earlier in the block).
    HardLink {
        /// The new name.
        path: RelPath,
        /// The existing name.
        target: RelPath,
    },
    /// Delete `path` (a file, a symlink, or a directory with everything in it). Absent is fine.
    Delete {
        /// What to delete.
        path: RelPath,
    },
    /// Change attributes of an existing object in place.
    SetAttrs {
        /// The object.
        path: RelPath,
        /// The new attributes.
        attrs: JournalAttrs,
    },
    /// Create a directory (an existing directory just gets the attributes).
    Mkdir {
        /// The directory.
        path: RelPath,
        /// Its attributes; mode defaults to `0o755`.
        attrs: JournalAttrs,
    },
}

impl JournalOp {
    /// The path the operation changes.
    pub fn path(&self) -> &RelPath {
        match self {
            JournalOp::Put { path, .. }
            | JournalOp::Symlink { path, .. }
            | JournalOp::HardLink { path, .. }
            | JournalOp::Delete { path }
            | JournalOp::SetAttrs { path, .. }
            | JournalOp::Mkdir { path, .. } => path,
        }
    }
}

/// What [`recover`] did, by transaction directory name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Transactions that had not reached their commit point: removed, tree untouched.
    pub rolled_back: Vec<String>,
    /// Transactions that were committed but not finished: replayed to the end.
    pub rolled_forward: Vec<String>,
    /// Transactions already done, whose staging directory was only left over.
    pub cleaned: Vec<String>,
    /// Transactions of a live process (their directory is locked), left alone.
    pub in_use: Vec<String>,
}
