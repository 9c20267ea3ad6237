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

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{
    AtFlags, FileType, FlockOperation, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT,
};
use rustix::io::Errno;

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

/// The fault-injection counter (see the module docs).
struct CrashHook {
    at: Option<u64>,
    count: u64,
}

impl CrashHook {
    fn from_env() -> Self {
        let at = std::env::var(CRASH_AT_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        Self { at, count: 0 }
    }

    fn step(&mut self) {
        self.count += 1;
        if self.at == Some(self.count) {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            std::process::abort();
        }
    }
}

/// An operation with the staging slot that holds its prepared object and its backup.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotOp {
    slot: u32,
    op: JournalOp,
}

/// A block being assembled; see the module docs. Dropping it without [`commit`](Self::commit)
/// removes the staging directory.
pub struct BlockTxn {
    root: PathBuf,
    root_fd: OwnedFd,
    staging_fd: OwnedFd,
    txn_name: String,
    txn_fd: OwnedFd,
    new_fd: OwnedFd,
    block: String,
    ops: Vec<SlotOp>,
    staged: HashMap<RelPath, u32>,
    next_slot: u32,
    finished: bool,
}

impl fmt::Debug for BlockTxn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockTxn")
            .field("root", &self.root)
            .field("txn", &self.txn_name)
            .field("block", &self.block)
            .field("ops", &self.ops.len())
            .finish()
    }
}

pub(crate) fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open root", root, e))
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens (creating if needed) a private directory `name` under `dir`, refusing symlinks.
fn ensure_dir_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(io_err("create directory", shown, e)),
    }
    open_dir_at(dir, OsStr::new(name)).map_err(|e| io_err("open directory", shown, e))
}

/// Opens the parent directory of `path` beneath `root` without following any symlink.
/// Returns the parent's fd and the last component.
pub(crate) fn open_parent<'p>(
    root: BorrowedFd<'_>,
    path: &'p RelPath,
) -> Result<(OwnedFd, &'p OsStr)> {
    let (parent, name) = path.split_last();
    let mut cur = rustix::io::dup(root).map_err(|e| io_err("dup root fd", path.as_path(), e))?;
    if let Some(parent) = parent {
        let mut walked = 0usize;
        for comp in parent.split(|&b| b == b'/') {
            walked += comp.len() + usize::from(walked > 0);
            cur = open_dir_at(cur.as_fd(), OsStr::from_bytes(comp)).map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => JournalError::UnsafePath {
                    path: path.as_path().to_owned(),
                    component: PathBuf::from(OsStr::from_bytes(&parent[..walked])),
                },
                Errno::NOENT => JournalError::MissingParent {
                    path: path.as_path().to_owned(),
                },
                e => io_err("open parent of", path.as_path(), e),
            })?;
        }
    }
    Ok((cur, name))
}

fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<rustix::fs::Stat>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_dir(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode as _) == FileType::Directory
}

fn timestamps(m: Mtime) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: m.secs,
            tv_nsec: m.nanos as _,
        },
    }
}

fn uid_gid(a: &JournalAttrs) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        a.uid.map(rustix::fs::Uid::from_raw),
        a.gid.map(rustix::fs::Gid::from_raw),
    )
}

/// Applies attributes through an open fd (owner first: chown may clear set-id bits).
fn apply_attrs_fd(
    fd: BorrowedFd<'_>,
    a: &JournalAttrs,
    mode: Option<u32>,
    shown: &Path,
) -> Result<()> {
    let (uid, gid) = uid_gid(a);
    if uid.is_some() || gid.is_some() {
        rustix::fs::fchown(fd, uid, gid).map_err(|e| io_err("chown", shown, e))?;
    }
    if let Some(mode) = mode {
        rustix::fs::fchmod(fd, Mode::from_raw_mode((mode & 0o7777) as _))
            .map_err(|e| io_err("chmod", shown, e))?;
    }
    if let Some(m) = a.mtime {
        rustix::fs::futimens(fd, &timestamps(m)).map_err(|e| io_err("set mtime", shown, e))?;
    }
    Ok(())
}

/// Applies to a staged file only the attributes it does not have yet: a file whose writer
/// already gave it its final attributes (and flushed it) then costs no metadata write, and
/// its fsync at commit finds nothing to do.
fn apply_changed_attrs_fd(fd: BorrowedFd<'_>, a: &JournalAttrs, shown: &Path) -> Result<()> {
    let st = rustix::fs::fstat(fd).map_err(|e| io_err("fstat", shown, e))?;
    let owner_differs =
        a.uid.is_some_and(|u| u != st.st_uid) || a.gid.is_some_and(|g| g != st.st_gid);
    let mode_differs = a
        .mode
        .is_some_and(|m| m & 0o7777 != st.st_mode as u32 & 0o7777);
    let mtime_differs = a.mtime.is_some_and(|m| {
        m.secs != st.st_mtime as i64 || i64::from(m.nanos) != st.st_mtime_nsec as i64
    });
    let changed = JournalAttrs {
        mode: None,
        mtime: a.mtime.filter(|_| mtime_differs),
        uid: a.uid.filter(|_| owner_differs),
        gid: a.gid.filter(|_| owner_differs),
    };
    // chown may clear set-id bits: then the mode is applied again.
    apply_attrs_fd(
        fd,
        &changed,
        a.mode.filter(|_| mode_differs || owner_differs),
        shown,
    )
}

/// Applies attributes by name, without following a symlink at `name`.
fn apply_attrs_at(dir: BorrowedFd<'_>, name: &OsStr, a: &JournalAttrs, shown: &Path) -> Result<()> {
    let st = lstat_at(dir, name)
        .map_err(|e| io_err("lstat", shown, e))?
        .ok_or_else(|| io_err("set attributes of", shown, Errno::NOENT))?;
    let symlink = FileType::from_raw_mode(st.st_mode as _) == FileType::Symlink;
    let (uid, gid) = uid_gid(a);
    if uid.is_some() || gid.is_some() {
        rustix::fs::chownat(dir, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("chown", shown, e))?;
    }
    if let (Some(mode), false) = (a.mode, symlink) {
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode((mode & 0o7777) as _),
            AtFlags::empty(),
        )
        .map_err(|e| io_err("chmod", shown, e))?;
    }
    if let Some(m) = a.mtime {
        rustix::fs::utimensat(dir, name, &timestamps(m), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("set mtime", shown, e))?;
    }
    Ok(())
}

fn fsync_fd(fd: BorrowedFd<'_>, shown: &Path) -> Result<()> {
    rustix::fs::fsync(fd).map_err(|e| io_err("fsync", shown, e))
}

fn slot_name(slot: u32) -> String {
    slot.to_string()
}

/// Creates an empty marker file, fsyncs it and its directory.
fn write_mark(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| io_err("create mark", shown.join(name), e))?;
    fsync_fd(fd.as_fd(), &shown.join(name))?;
    fsync_fd(dir, shown)
}

fn exists_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<bool> {
    lstat_at(dir, OsStr::new(name))
        .map(|s| s.is_some())
        .map_err(|e| io_err("lstat", shown.join(name), e))
}

/// Removes `name` under `dir` and everything below it, never following symlinks.
fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<()> {
    let Some(st) = lstat_at(dir, name).map_err(|e| io_err("lstat", shown, e))? else {
        return Ok(());
    };
    if is_dir(&st) {
        let sub = open_dir_at(dir, name).map_err(|e| io_err("open", shown, e))?;
        let mut names = Vec::new();
        let mut entries =
            rustix::fs::Dir::read_from(sub.as_fd()).map_err(|e| io_err("read dir", shown, e))?;
        while let Some(entry) = entries.read() {
            let entry = entry.map_err(|e| io_err("read dir", shown, e))?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsString::from_vec(n.to_vec()));
            }
        }
        for n in names {
            remove_tree_at(sub.as_fd(), &n, &shown.join(&n))?;
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err("remove directory", shown, e)),
        }
    } else {
        match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err("remove", shown, e)),
        }
    }
}

fn new_txn_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos:x}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl BlockTxn {
    /// Starts a transaction for block `block_name` in the tree at `root`, creating
    /// `ROOT/.fleetsync-staging/<txn-id>/`.
    pub fn begin(root: &Path, block_name: &str) -> Result<Self> {
        let root_fd = open_root(root)?;
        let staging_shown = root.join(STAGING_DIR);
        let txn_name = new_txn_name();
        let txn_shown = staging_shown.join(&txn_name);
        let mut attempts = 0;
        let staging_fd = loop {
            let staging_fd = ensure_dir_at(root_fd.as_fd(), STAGING_DIR, &staging_shown)?;
            match rustix::fs::mkdirat(staging_fd.as_fd(), &*txn_name, Mode::from_raw_mode(0o700)) {
                Ok(()) => break staging_fd,
                // The staging directory was removed as empty by another transaction between
                // our open and our mkdir: make it again.
                Err(Errno::NOENT) if attempts < 100 => attempts += 1,
                Err(e) => return Err(io_err("create transaction directory", &txn_shown, e)),
            }
        };
        let txn_fd = open_dir_at(staging_fd.as_fd(), OsStr::new(&txn_name))
            .map_err(|e| io_err("open", &txn_shown, e))?;
        // Held for the life of the transaction (and released by the kernel if we die), so
        // that `recover` in another process leaves a live transaction alone.
        rustix::fs::flock(txn_fd.as_fd(), FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| io_err("lock", &txn_shown, e))?;
        let new_fd = ensure_dir_at(txn_fd.as_fd(), NEW_DIR, &txn_shown.join(NEW_DIR))?;
        ensure_dir_at(txn_fd.as_fd(), BACKUP_DIR, &txn_shown.join(BACKUP_DIR))?;
        Ok(Self {
            root: root.to_owned(),
            root_fd,
            staging_fd,
            txn_name,
            txn_fd,
            new_fd,
            block: block_name.to_owned(),
            ops: Vec::new(),
            staged: HashMap::new(),
            next_slot: 0,
            finished: false,
        })
    }

    /// The transaction id (its directory name under [`STAGING_DIR`]).
    pub fn id(&self) -> &str {
        &self.txn_name
    }

    /// The block name given to [`begin`](Self::begin).
    pub fn block_name(&self) -> &str {
        &self.block
    }

    fn txn_shown(&self) -> PathBuf {
        self.root.join(STAGING_DIR).join(&self.txn_name)
    }

    fn alloc_slot(&mut self) -> u32 {
        self.next_slot += 1;
        self.next_slot
    }

    /// Creates the staging file for the future content of `path` and returns it for writing.
    /// The data is fsynced at commit; add a [`JournalOp::Put`] for `path` to put it in place.
    pub fn stage_file(&mut self, path: &RelPath) -> Result<File> {
        if self.staged.contains_key(path) {
            return Err(JournalError::StagedFile {
                path: path.as_path().to_owned(),
                reason: "staged twice",
            });
        }
        let slot = self.alloc_slot();
        let fd = rustix::fs::openat(
            self.new_fd.as_fd(),
            slot_name(slot),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create staging file for", path.as_path(), e))?;
        self.staged.insert(path.clone(), slot);
        Ok(File::from(fd))
    }

    /// Appends an operation. Checks the one-content-operation-per-path rule.
    pub fn add_op(&mut self, op: JournalOp) -> Result<()> {
        let dup = || JournalError::DuplicatePath {
            path: op.path().as_path().to_owned(),
        };
        let content = !matches!(op, JournalOp::SetAttrs { .. });
        // A content op may not follow anything on the same path (replay would apply an
        // earlier op to the later object); SetAttrs may follow anything.
        if content && self.ops.iter().any(|prev| prev.op.path() == op.path()) {
            return Err(dup());
        }
        // Nothing may happen beneath a path the block replaces or deletes (the parent would
        // vanish under a replayed operation).
        let replaces =
            |o: &JournalOp| !matches!(o, JournalOp::SetAttrs { .. } | JournalOp::Mkdir { .. });
        for prev in &self.ops {
            let (a, b) = (prev.op.path(), op.path());
            if (replaces(&prev.op) && a.is_ancestor_of(b)) || (replaces(&op) && b.is_ancestor_of(a))
            {
                return Err(JournalError::ConflictingOps {
                    path: b.as_path().to_owned(),
                    other: a.as_path().to_owned(),
                });
            }
        }
        let slot = match &op {
            JournalOp::Put { path, .. } => {
                *self
                    .staged
                    .get(path)
                    .ok_or_else(|| JournalError::StagedFile {
                        path: path.as_path().to_owned(),
                        reason: "no file was staged for this put",
                    })?
            }
            _ => self.alloc_slot(),
        };
        self.ops.push(SlotOp { slot, op });
        Ok(())
    }

    /// The operations added so far.
    pub fn ops(&self) -> impl Iterator<Item = &JournalOp> {
        self.ops.iter().map(|s| &s.op)
    }

    /// Prepares, journals and applies the block (see the module docs). On an error before the
    /// commit point the transaction is removed and the tree is untouched; after it, the error
    /// is [`JournalError::InDoubt`] and [`recover`] finishes the job.
    pub fn commit(mut self) -> Result<()> {
        let mut hook = CrashHook::from_env();
        let shown = self.txn_shown();
        if let Err(e) = self.prepare(&mut hook) {
            let _ = self.abort_inner();
            return Err(e);
        }
        // Commit point.
        hook.step();
        write_mark(self.txn_fd.as_fd(), COMMITTING_MARK, &shown)?;
        self.finished = true;
        let result = apply_all(
            self.root_fd.as_fd(),
            self.txn_fd.as_fd(),
            &self.ops,
            &mut hook,
        )
        .and_then(|()| {
            finish(
                self.staging_fd.as_fd(),
                self.txn_fd.as_fd(),
                &self.txn_name,
                &shown,
                &mut hook,
            )
        });
        if result.is_ok() {
            remove_staging_if_empty(self.root_fd.as_fd());
        }
        result.map_err(|e| JournalError::InDoubt {
            txn: shown,
            source: Box::new(e),
        })
    }

    /// Abandons the transaction: removes its staging directory. The tree was never touched.
    pub fn abort(mut self) -> Result<()> {
        self.abort_inner()
    }

    fn abort_inner(&mut self) -> Result<()> {
        self.finished = true;
        remove_tree_at(
            self.staging_fd.as_fd(),
            OsStr::new(&self.txn_name),
            &self.txn_shown(),
        )?;
        remove_staging_if_empty(self.root_fd.as_fd());
        Ok(())
    }

    fn prepare(&mut self, hook: &mut CrashHook) -> Result<()> {
        let shown = self.txn_shown();
        let mut put_slots: HashMap<&RelPath, u32> = HashMap::new();
        let mut made_dirs: HashSet<&RelPath> = HashSet::new();
        let mut used_slots = HashSet::new();
        for SlotOp { slot, op } in &self.ops {
            let path = op.path();
            let p = path.as_path();
            // The parent must be a real directory now, or be created earlier in the block.
            match open_parent(self.root_fd.as_fd(), path) {
                Ok(_) => {}
                Err(JournalError::MissingParent { .. })
                    if path.parent().is_some_and(|par| made_dirs.contains(&par)) => {}
                // Nothing to delete beneath a missing parent or a non-directory (a symlink
                // among the parents is never followed, so the path names nothing in the tree).
                Err(JournalError::MissingParent { .. } | JournalError::UnsafePath { .. })
                    if matches!(op, JournalOp::Delete { .. }) => {}
                Err(e) => return Err(e),
            }
            let name = slot_name(*slot);
            hook.step();
            match op {
                JournalOp::Put { attrs, .. } => {
                    used_slots.insert(*slot);
                    let fd = rustix::fs::openat(
                        self.new_fd.as_fd(),
                        &*name,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| io_err("open staged file for", p, e))?;
                    apply_changed_attrs_fd(fd.as_fd(), attrs, p)?;
                    fsync_fd(fd.as_fd(), p)?;
                    put_slots.insert(path, *slot);
                }
                JournalOp::Symlink { target, attrs, .. } => {
                    rustix::fs::symlinkat(target.as_os_str(), self.new_fd.as_fd(), &*name)
                        .map_err(|e| io_err("create staged symlink for", p, e))?;
                    let a = JournalAttrs {
                        mode: None,
                        ..*attrs
                    };
                    apply_attrs_at(self.new_fd.as_fd(), OsStr::new(&name), &a, p)?;
                    put_slots.insert(path, *slot);
                }
                JournalOp::HardLink { target, .. } => {
                    let missing = || JournalError::MissingLinkTarget {
                        path: p.to_owned(),
                        target: target.as_path().to_owned(),
                    };
                    if let Some(tslot) = put_slots.get(target) {
                        rustix::fs::linkat(
                            self.new_fd.as_fd(),
                            slot_name(*tslot),
                            self.new_fd.as_fd(),
                            &*name,
                            AtFlags::empty(),
                        )
                        .map_err(|e| io_err("link staged file for", p, e))?;
                    } else {
                        let (tdir, tname) = match open_parent(self.root_fd.as_fd(), target) {
                            Ok(x) => x,
                            Err(JournalError::MissingParent { .. }) => return Err(missing()),
                            Err(e) => return Err(e),
                        };
                        match rustix::fs::linkat(
                            tdir.as_fd(),
                            tname,
                            self.new_fd.as_fd(),
                            &*name,
                            AtFlags::empty(),
                        ) {
                            Ok(()) => {}
                            Err(Errno::NOENT) => return Err(missing()),
                            Err(e) => return Err(io_err("link existing file for", p, e)),
                        }
                    }
                    put_slots.insert(path, *slot);
                }
                JournalOp::Mkdir { attrs, .. } => {
                    rustix::fs::mkdirat(self.new_fd.as_fd(), &*name, Mode::from_raw_mode(0o700))
                        .map_err(|e| io_err("create staged directory for", p, e))?;
                    let fd = open_dir_at(self.new_fd.as_fd(), OsStr::new(&name))
                        .map_err(|e| io_err("open staged directory for", p, e))?;
                    apply_attrs_fd(fd.as_fd(), attrs, Some(attrs.mode.unwrap_or(0o755)), p)?;
                    made_dirs.insert(path);
                }
                JournalOp::Delete { .. } | JournalOp::SetAttrs { .. } => {}
            }
        }
        if let Some((path, _)) = self.staged.iter().find(|(_, s)| !used_slots.contains(s)) {
            return Err(JournalError::StagedFile {
                path: path.as_path().to_owned(),
                reason: "staged but no put was added",
            });
        }
        hook.step();
        fsync_fd(self.new_fd.as_fd(), &shown.join(NEW_DIR))?;

        // The journal: written aside, fsynced, renamed into place.
        let text = encode_journal(&self.block, &self.ops);
        hook.step();
        let fd = rustix::fs::openat(
            self.txn_fd.as_fd(),
            JOURNAL_TMP,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("create", shown.join(JOURNAL_TMP), e))?;
        let mut file = File::from(fd);
        file.write_all(text.as_bytes())
            .map_err(|e| io_err("write", shown.join(JOURNAL_TMP), e))?;
        hook.step();
        file.sync_all()
            .map_err(|e| io_err("fsync", shown.join(JOURNAL_TMP), e))?;
        hook.step();
        rustix::fs::renameat(
            self.txn_fd.as_fd(),
            JOURNAL_TMP,
            self.txn_fd.as_fd(),
            JOURNAL_FILE,
        )
        .map_err(|e| io_err("rename journal in", &shown, e))?;
        hook.step();
        fsync_fd(self.txn_fd.as_fd(), &shown)
    }
}

impl Drop for BlockTxn {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.abort_inner();
        }
    }
}

/// Applies every operation (idempotently), then fsyncs the touched directories.
fn apply_all(
    root: BorrowedFd<'_>,
    txn: BorrowedFd<'_>,
    ops: &[SlotOp],
    hook: &mut CrashHook,
) -> Result<()> {
    let new_dir = open_dir_at(txn, OsStr::new(NEW_DIR)).map_err(|e| io_err("open", NEW_DIR, e))?;
    let backup_dir =
        open_dir_at(txn, OsStr::new(BACKUP_DIR)).map_err(|e| io_err("open", BACKUP_DIR, e))?;
    let (new_dir, backup_dir) = (new_dir.as_fd(), backup_dir.as_fd());
    let mut touched: Vec<Option<RelPath>> = Vec::new();
    for SlotOp { slot, op } in ops {
        let path = op.path();
        let p = path.as_path();
        touched.push(path.parent());
        let slot = slot_name(*slot);
        let slot_os = OsStr::new(&slot);
        // Done already? Decided from the staging directory alone, before resolving the path.
        let done = match op {
            // Still in new/ means not yet renamed into place.
            JournalOp::Put { .. }
            | JournalOp::Symlink { .. }
            | JournalOp::HardLink { .. }
            | JournalOp::Mkdir { .. } => !exists_at(new_dir, &slot, Path::new(NEW_DIR))?,
            // In backup/ means deleted.
            JournalOp::Delete { .. } => exists_at(backup_dir, &slot, Path::new(BACKUP_DIR))?,
            JournalOp::SetAttrs { .. } => false,
        };
        if done {
            continue;
        }
        let (dir, name) = match open_parent(root, path) {
            Ok(x) => x,
            // Nothing to delete where there is no parent (or it is not a directory).
            Err(JournalError::MissingParent { .. } | JournalError::UnsafePath { .. })
                if matches!(op, JournalOp::Delete { .. }) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        let dir = dir.as_fd();
        match op {
            JournalOp::Put { .. }
            | JournalOp::Symlink { .. }
            | JournalOp::HardLink { .. }
            | JournalOp::Mkdir { .. } => {
                let new_is_dir = matches!(op, JournalOp::Mkdir { .. });
                let old = lstat_at(dir, name).map_err(|e| io_err("lstat", p, e))?;
                let backed_up = exists_at(backup_dir, &slot, Path::new(BACKUP_DIR))?;
                match old {
                    Some(st) if is_dir(&st) && new_is_dir => {
                        // mkdir on an existing directory: give it the attributes, drop ours.
                        if let JournalOp::Mkdir { attrs, .. } = op {
                            let a = JournalAttrs {
                                mode: Some(attrs.mode.unwrap_or(0o755)),
                                ..*attrs
                            };
                            hook.step();
                            apply_attrs_at(dir, name, &a, p)?;
                        }
                        hook.step();
                        match rustix::fs::unlinkat(new_dir, slot_os, AtFlags::REMOVEDIR) {
                            Ok(()) | Err(Errno::NOENT) => {}
                            Err(e) => return Err(io_err("remove staged directory for", p, e)),
                        }
                        continue;
                    }
                    Some(st) if (is_dir(&st) || new_is_dir) && !backed_up => {
                        // A directory replaced by a non-directory or vice versa: move the old
                        // object aside (rename cannot replace across kinds).
                        hook.step();
                        rustix::fs::renameat(dir, name, backup_dir, slot_os)
                            .map_err(|e| io_err("move aside", p, e))?;
                    }
                    Some(st) if !is_dir(&st) && !new_is_dir && !backed_up => {
                        hook.step();
                        match rustix::fs::linkat(dir, name, backup_dir, slot_os, AtFlags::empty()) {
                            // Backups are a convenience; a file system without hard links
                            // must still commit.
                            Ok(()) | Err(Errno::EXIST) | Err(Errno::PERM) => {}
                            Err(e) => return Err(io_err("back up", p, e)),
                        }
                    }
                    _ => {}
                }
                hook.step();
                rustix::fs::renameat(new_dir, slot_os, dir, name)
                    .map_err(|e| io_err("rename into place", p, e))?;
                // Renaming a name onto another link of the same inode is a no-op that leaves
                // the source: drop it so the slot reads as done.
                if exists_at(new_dir, &slot, Path::new(NEW_DIR))? {
                    let _ = rustix::fs::unlinkat(new_dir, slot_os, AtFlags::empty());
                }
            }
            JournalOp::Delete { .. } => {
                if lstat_at(dir, name)
                    .map_err(|e| io_err("lstat", p, e))?
                    .is_some()
                {
                    hook.step();
                    rustix::fs::renameat(dir, name, backup_dir, slot_os)
                        .map_err(|e| io_err("delete", p, e))?;
                }
            }
            JournalOp::SetAttrs { attrs, .. } => {
                hook.step();
                apply_attrs_at(dir, name, attrs, p)?;
            }
        }
    }
    // Make the renames durable before the transaction is declared done.
    touched.sort();
    touched.dedup();
    for parent in touched {
        let fd = match &parent {
            None => rustix::io::dup(root).map_err(|e| io_err("dup", ".", e))?,
            Some(par) => {
                // A parent that is gone (deleted by the block) needs no fsync.
                let (d, n) = match open_parent(root, par) {
                    Ok(x) => x,
                    Err(JournalError::MissingParent { .. }) => continue,
                    Err(e) => return Err(e),
                };
                match open_dir_at(d.as_fd(), n) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(io_err("open", par.as_path(), e)),
                }
            }
        };
        hook.step();
        let shown = parent.as_ref().map_or(Path::new("."), |p| p.as_path());
        fsync_fd(fd.as_fd(), shown)?;
    }
    Ok(())
}

/// Marks a transaction done and removes its directory.
fn finish(
    staging: BorrowedFd<'_>,
    txn: BorrowedFd<'_>,
    txn_name: &str,
    shown: &Path,
    hook: &mut CrashHook,
) -> Result<()> {
    hook.step();
    write_mark(txn, DONE_MARK, shown)?;
    hook.step();
    match rustix::fs::unlinkat(txn, COMMITTING_MARK, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => {}
        Err(e) => return Err(io_err("remove mark in", shown, e)),
    }
    hook.step();
    remove_tree_at(staging, OsStr::new(txn_name), shown)?;
    hook.step();
    fsync_fd(staging, shown.parent().unwrap_or(shown))
}

/// Finishes or undoes every transaction left in `ROOT/.fleetsync-staging` (see the module
/// docs). Run it on agent start, before anything else writes to the tree.
pub fn recover(root: &Path) -> Result<RecoveryReport> {
    let mut report = RecoveryReport::default();
    let mut hook = CrashHook::from_env();
    let root_fd = open_root(root)?;
    let staging_shown = root.join(STAGING_DIR);
    let staging = match open_dir_at(root_fd.as_fd(), OsStr::new(STAGING_DIR)) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(report),
        Err(Errno::LOOP | Errno::NOTDIR) => {
            return Err(JournalError::UnsafePath {
                path: PathBuf::from(STAGING_DIR),
                component: PathBuf::from(STAGING_DIR),
            })
        }
        Err(e) => return Err(io_err("open", &staging_shown, e)),
    };
    let mut names = Vec::new();
    let mut entries = rustix::fs::Dir::read_from(staging.as_fd())
        .map_err(|e| io_err("read dir", &staging_shown, e))?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(|e| io_err("read dir", &staging_shown, e))?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(String::from_utf8_lossy(n).into_owned());
        }
    }
    names.sort();
    for name in names {
        let shown = staging_shown.join(&name);
        let txn = match open_dir_at(staging.as_fd(), OsStr::new(&name)) {
            Ok(fd) => fd,
            Err(Errno::NOTDIR | Errno::LOOP) => {
                // Not ours (a stray file): remove it.
                remove_tree_at(staging.as_fd(), OsStr::new(&name), &shown)?;
                continue;
            }
            Err(e) => return Err(io_err("open", &shown, e)),
        };
        match rustix::fs::flock(txn.as_fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                report.in_use.push(name);
                continue;
            }
            Err(e) => return Err(io_err("lock", &shown, e)),
        }
        let committing = exists_at(txn.as_fd(), COMMITTING_MARK, &shown)?;
        let done = exists_at(txn.as_fd(), DONE_MARK, &shown)?;
        if committing && !done {
            let text = read_at(txn.as_fd(), JOURNAL_FILE, &shown)?;
            let (_block, ops) =
                decode_journal(&text).map_err(|reason| JournalError::CorruptJournal {
                    txn: shown.clone(),
                    reason,
                })?;
            apply_all(root_fd.as_fd(), txn.as_fd(), &ops, &mut hook)?;
            finish(staging.as_fd(), txn.as_fd(), &name, &shown, &mut hook)?;
            report.rolled_forward.push(name);
        } else {
            hook.step();
            remove_tree_at(staging.as_fd(), OsStr::new(&name), &shown)?;
            if done {
                report.cleaned.push(name);
            } else {
                report.rolled_back.push(name);
            }
        }
    }
    fsync_fd(staging.as_fd(), &staging_shown)?;
    remove_staging_if_empty(root_fd.as_fd());
    Ok(report)
}

/// Removes the staging directory when no transaction is left in it, so that a tree at rest
/// holds nothing of ours (another transaction's directory keeps it: `ENOTEMPTY`).
/// [`BlockTxn::begin`] copes with it vanishing between its `mkdir` and its own.
fn remove_staging_if_empty(root: BorrowedFd<'_>) {
    let _ = rustix::fs::unlinkat(root, STAGING_DIR, AtFlags::REMOVEDIR);
}

fn read_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", shown.join(name), e))?;
    let mut buf = Vec::new();
    File::from(fd)
        .read_to_end(&mut buf)
        .map_err(|e| io_err("read", shown.join(name), e))?;
    Ok(buf)
}

// ---- journal encoding -------------------------------------------------------------------
//
// Text, one operation per line, fields separated by single spaces, every byte string escaped
// so that it holds no space, newline or `%` (`%XX`):
//
//   fleetsync-journal 1
//   block <name>
//   <kind> <slot> <path> <target or => <mode> <mtime> <uid> <gid>
//   end <count>
//
// kind is put|symlink|hardlink|delete|attrs|mkdir; the target field is `=` followed by the
// escaped target (or just `=` for none); attributes are octal / `secs.nanos` / decimal, `-`
// for none. The trailing `end` line makes a torn journal detectable.

pub(crate) fn escape(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"._-/+~,:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

pub(crate) fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn encode_journal(block: &str, ops: &[SlotOp]) -> String {
    let mut s = String::new();
    s.push_str(JOURNAL_MAGIC);
    s.push_str("\nblock ");
    escape(&mut s, block.as_bytes());
    s.push('\n');
    let none = JournalAttrs::default();
    for SlotOp { slot, op } in ops {
        let (kind, target, attrs): (&str, Option<&[u8]>, &JournalAttrs) = match op {
            JournalOp::Put { attrs, .. } => ("put", None, attrs),
            JournalOp::Symlink { target, attrs, .. } => {
                ("symlink", Some(target.as_os_str().as_bytes()), attrs)
            }
            JournalOp::HardLink { target, .. } => ("hardlink", Some(&target.0), &none),
            JournalOp::Delete { .. } => ("delete", None, &none),
            JournalOp::SetAttrs { attrs, .. } => ("attrs", None, attrs),
            JournalOp::Mkdir { attrs, .. } => ("mkdir", None, attrs),
        };
        s.push_str(&format!("{kind} {slot} "));
        escape(&mut s, &op.path().0);
        s.push_str(" =");
        if let Some(t) = target {
            escape(&mut s, t);
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            " {} {} {} {}\n",
            opt(attrs.mode.map(|m| format!("{m:o}"))),
            opt(attrs.mtime.map(|m| format!("{}.{}", m.secs, m.nanos))),
            opt(attrs.uid.map(|u| u.to_string())),
            opt(attrs.gid.map(|g| g.to_string())),
        ));
    }
    s.push_str(&format!("end {}\n", ops.len()));
    s
}

fn decode_journal(bytes: &[u8]) -> Result<(String, Vec<SlotOp>), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 (escaping broken)")?;
    let mut lines = text.lines();
    if lines.next() != Some(JOURNAL_MAGIC) {
        return Err("missing header".into());
    }
    let block = lines
        .next()
        .and_then(|l| l.strip_prefix("block "))
        .ok_or("missing block line")?;
    let block = String::from_utf8_lossy(&unescape(block)?).into_owned();
    let mut ops = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        if f.first() == Some(&"end") {
            let n: usize = f
                .get(1)
                .and_then(|n| n.parse().ok())
                .ok_or("bad end line")?;
            if n != ops.len() {
                return Err(format!("end line says {n} operations, found {}", ops.len()));
            }
            return Ok((block, ops));
        }
        let [kind, slot, path, target, mode, mtime, uid, gid] = f[..] else {
            return Err(format!("malformed line {line:?}"));
        };
        let slot: u32 = slot.parse().map_err(|_| format!("bad slot {slot:?}"))?;
        let path = rel_from_bytes(unescape(path)?)?;
        let target = match target.strip_prefix('=') {
            Some("") => None,
            Some(t) => Some(unescape(t)?),
            None => return Err(format!("bad target field {target:?}")),
        };
        let num = |v: &str, radix| -> Result<Option<u32>, String> {
            if v == "-" {
                Ok(None)
            } else {
                u32::from_str_radix(v, radix)
                    .map(Some)
                    .map_err(|_| format!("bad number {v:?}"))
            }
        };
        let mtime = if mtime == "-" {
            None
        } else {
            let (s, n) = mtime.split_once('.').ok_or("bad mtime")?;
            Some(Mtime {
                secs: s.parse().map_err(|_| "bad mtime seconds")?,
                nanos: n.parse().map_err(|_| "bad mtime nanoseconds")?,
            })
        };
        let attrs = JournalAttrs {
            mode: num(mode, 8)?,
            mtime,
            uid: num(uid, 10)?,
            gid: num(gid, 10)?,
        };
        let need_target = || {
            target
                .clone()
                .ok_or_else(|| format!("{kind} without target"))
        };
        let op = match kind {
            "put" => JournalOp::Put { path, attrs },
            "symlink" => JournalOp::Symlink {
                path,
                target: PathBuf::from(OsString::from_vec(need_target()?)),
                attrs,
            },
            "hardlink" => JournalOp::HardLink {
                path,
                target: rel_from_bytes(need_target()?)?,
            },
            "delete" => JournalOp::Delete { path },
            "attrs" => JournalOp::SetAttrs { path, attrs },
            "mkdir" => JournalOp::Mkdir { path, attrs },
            other => return Err(format!("unknown operation {other:?}")),
        };
        ops.push(SlotOp { slot, op });
    }
    Err("missing end line (torn journal)".into())
}

fn rel_from_bytes(b: Vec<u8>) -> Result<RelPath, String> {
    RelPath::new(OsString::from_vec(b)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relpath_rejects_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            ".fleetsync-staging/x",
            "a/\0b",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::new("a/b c/..d").is_ok());
    }

    #[test]
    fn journal_round_trips_odd_names() {
        let odd = OsString::from_vec(b"dir/na me\n%\xff".to_vec());
        let ops = vec![
            SlotOp {
                slot: 1,
                op: JournalOp::Put {
                    path: RelPath::new(&odd).unwrap(),
                    attrs: JournalAttrs {
                        mode: Some(0o4755),
                        mtime: Some(Mtime { secs: -5, nanos: 7 }),
                        uid: Some(0),
                        gid: None,
                    },
                },
            },
            SlotOp {
                slot: 2,
                op: JournalOp::Symlink {
                    path: RelPath::new("l").unwrap(),
                    target: PathBuf::from(" ../x y"),
                    attrs: JournalAttrs::default(),
                },
            },
            SlotOp {
                slot: 3,
                op: JournalOp::HardLink {
                    path: RelPath::new("h").unwrap(),
                    target: RelPath::new(&odd).unwrap(),
                },
            },
            SlotOp {
                slot: 4,
                op: JournalOp::Delete {
                    path: RelPath::new("-").unwrap(),
                },
            },
        ];
        let text = encode_journal("blk one", &ops);
        let (block, back) = decode_journal(text.as_bytes()).unwrap();
        assert_eq!(block, "blk one");
        assert_eq!(back, ops);
        // A torn journal is detected.
        let torn = &text[..text.len() - 6];
        assert!(decode_journal(torn.as_bytes()).is_err());
    }
}
