//! File locks for `fleetsync sync --lock`: a shared lock on the master copy while it is read,
//! an exclusive lock on the remote copy while it is replaced, with a timeout, and — when a lock
//! cannot be had — the processes that hold it, as far as the OS says.
//!
//! ```no_run
//! use fleetsync_agent::lock::{FileLock, LockKind, LockOptions};
//! use std::time::Duration;
//! let opts = LockOptions { timeout: Duration::from_secs(5), ..LockOptions::default() };
//! match FileLock::open("/srv/tree/etc/app.conf".as_ref(), LockKind::Shared, &opts) {
//!     Ok(lock) => { /* read lock.file() */ }
//!     Err(e) => eprintln!("{e}"), // "... held by pid 4242 (OFD write lock) ..."
//! }
//! ```
//!
//! # Which locks
//!
//! Linux has three advisory lock families on a file: classic POSIX record locks
//! (`F_SETLK`, owned by a process), open-file-description locks (`F_OFD_SETLK`, owned by an
//! open file) and `flock(2)` locks. POSIX and OFD locks conflict with each other; `flock`
//! locks conflict with neither. So that an application using any of the three is honoured,
//! [`FileLock`] takes **both** a whole-file OFD lock (`F_RDLCK`/`F_WRLCK`, `l_len = 0`) and a
//! `flock` lock (`LOCK_SH`/`LOCK_EX`) on the same open file. Both are tried without blocking;
//! if either is refused, both are released and retried with exponential backoff (1 ms doubling
//! to 50 ms) until the deadline — never holding one while waiting for the other, so an
//! application taking them in the other order cannot deadlock with us. Cooperating
//! applications must use one of these (e.g. `fcntl(F_OFD_SETLKW)`, `lockf`, `flock`); a
//! process that does not lock is not stopped (the locks are advisory).
//!
//! A file that may not be opened for writing (say mode 0444, the agent not root) cannot carry
//! an OFD write lock; its exclusive lock is weaker there (see [`FileLock::acquire`]).
//!
//! On NFS `flock` is emulated with byte-range locks, so the two would conflict with each
//! other: set [`LockOptions::flock`] to `false` there.
//!
//! The locks belong to the open file: they are released when the [`FileLock`] (and every
//! duplicate of its descriptor) is dropped. A lock is on an inode: a file replaced by rename
//! is a new inode, unlocked.
//!
//! # Who holds it
//!
//! `F_OFD_GETLK` reports a conflicting lock but with `l_pid = -1` for OFD locks, so on
//! timeout the holders are read from `/proc/locks` (lines whose `MAJOR:MINOR:INODE` is the
//! file's, skipping blocked waiters `->`), which gives the pid for POSIX and `flock` locks and,
//! on current kernels, for OFD locks too. Where it shows `-1`, every `/proc/PID/fdinfo/FD` is
//! searched for a `lock:` line on the same inode, which names the processes that have the
//! locked open file. Our own process is left out. `/proc/locks` is handed out a page at a time
//! and can skip a line when other locks come and go meanwhile, so it is read again when it
//! shows no conflicting lock, and then fdinfo is searched for any (see [`holders_of`]).
//!
//! # Readers that open by path
//!
//! The remote copy is replaced by renaming a complete new file over it while the old one is
//! exclusively locked. A reader that opened the old file and waits for its shared lock gets it
//! after the rename, on the old (now unlinked) file: it reads the old version whole, never a
//! torn or mixed one, but the path already names the new file. A reader that wants "the file at
//! this path, not replaced while I read it" checks after locking that the path still names the
//! file it locked (`fstat` against `stat`: same device and inode) and opens again if not; while
//! it holds the lock on the current file, a `sync --lock` does not replace it.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::journal::{self, RelPath};

/// Shared (readers) or exclusive (a writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Shared: others may read-lock too; writers wait. For the master copy.
    Shared,
    /// Exclusive: nobody else may lock. For the remote copy being replaced.
    Exclusive,
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shared => "shared",
            Self::Exclusive => "exclusive",
        })
    }
}

/// How to lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockOptions {
    /// How long to keep trying (`--lock-timeout`). Zero means one attempt.
    pub timeout: Duration,
    /// Also take a `flock` lock (see the module docs). Default `true`.
    pub flock: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            flock: true,
        }
    }
}

/// The family of a lock seen in `/proc/locks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockFamily {
    /// Open-file-description lock (`F_OFD_SETLK`).
    Ofd,
    /// Classic POSIX record lock (`F_SETLK`, `lockf`).
    Posix,
    /// `flock(2)` lock.
    Flock,
    /// Another kind (lease, delegation...), as the kernel spells it.
    Other,
}

/// A process holding a lock on the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// The lock family.
    pub family: LockFamily,
    /// True for a write (exclusive) lock, false for a read (shared) one.
    pub write: bool,
    /// The process's command name (`/proc/PID/comm`), if readable.
    pub command: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = match self.family {
            LockFamily::Ofd => "OFD",
            LockFamily::Posix => "POSIX",
            LockFamily::Flock => "flock",
            LockFamily::Other => "other",
        };
        let access = if self.write { "write" } else { "read" };
        write!(f, "pid {}", self.pid)?;
        if let Some(c) = &self.command {
            write!(f, " ({c})")?;
        }
        write!(f, " with a {family} {access} lock")
    }
}

/// Errors of locking, naming the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum LockError {
    /// The lock was not granted before the timeout.
    Timeout {
        /// The file.
        path: PathBuf,
        /// The lock wanted.
        kind: LockKind,
        /// How long we tried: the timeout asked for.
        waited: Duration,
        /// Who holds conflicting locks, as far as the OS says (may be empty).
        holders: Vec<Holder>,
    },
    /// Opening, stat-ing or locking failed for another reason.
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout {
                path,
                kind,
                waited,
                holders,
            } => {
                write!(
                    f,
                    "could not take a {kind} lock on {} within {waited:?}",
                    path.display()
                )?;
                if holders.is_empty() {
                    write!(f, " (holder unknown)")
                } else {
                    write!(f, ": held by ")?;
                    for (i, h) in holders.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{h}")?;
                    }
                    Ok(())
                }
            }
            Self::Io {
                action,
                path,
                source,
            } => write!(f, "{action} {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Timeout { .. } => None,
        }
    }
}

/// A file with a lock held on it; dropping it releases the lock.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
    kind: LockKind,
}

/// Outcome of one non-blocking attempt.
enum Attempt {
    Granted,
    Busy,
}

fn ofd_fcntl(fd: BorrowedFd<'_>, cmd: libc::c_int, l_type: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    // Length 0: to the end of the file, however it grows. l_pid must be 0 for OFD commands.
    fl.l_len = 0;
    fl.l_pid = 0;
    // SAFETY: `fd` is a valid open descriptor for the duration of the call, and the F_OFD_*
    // commands take a pointer to a `struct flock`, which `fl` is and which outlives the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// EAGAIN (= EWOULDBLOCK on Linux) or EACCES: someone else holds a conflicting lock.
fn is_busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

impl FileLock {
    /// Opens `path` (read-only for [`LockKind::Shared`], read-write for
    /// [`LockKind::Exclusive`]; never following a final symlink) and locks it.
    /// An exclusive lock on a file we may not open for writing is taken read-only (see
    /// [`FileLock::acquire`]).
    pub fn open(path: &Path, kind: LockKind, opts: &LockOptions) -> Result<Self, LockError> {
        let open = |write: bool| {
            File::options()
                .read(true)
                .write(write)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(path)
        };
        let file = match open(kind == LockKind::Exclusive) {
            Err(e) if kind == LockKind::Exclusive && e.raw_os_error() == Some(libc::EACCES) => {
                open(false)
            }
            other => other,
        }
        .map_err(|source| LockError::Io {
            action: "open for locking",
            path: path.to_owned(),
            source,
        })?;
        Self::acquire(file, path, kind, opts)
    }

    /// Opens `path` beneath `root` the way the journal resolves paths (no symlink anywhere,
    /// no escape from the root) and locks it. This is what an agent uses for paths that
    /// come from a message.
    pub fn open_beneath(
        root: &Path,
        path: &RelPath,
        kind: LockKind,
        opts: &LockOptions,
    ) -> Result<Self, LockError> {
        let shown = root.join(path.as_path());
        let io = |source: io::Error| LockError::Io {
            action: "open for locking",
            path: shown.clone(),
            source,
        };
        let root_fd = journal::open_root(root).map_err(|e| io(io::Error::other(e)))?;
        let (dir, name) =
            journal::open_parent(root_fd.as_fd(), path).map_err(|e| io(io::Error::other(e)))?;
        let open = |access: OFlags| {
            rustix::fs::openat(
                dir.as_fd(),
                name,
                access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        let fd = match kind {
            LockKind::Shared => open(OFlags::RDONLY),
            // A read-only file (mode 0444 as on the master) is still replaced by a rename;
            // lock it read-only then (see `acquire`).
            LockKind::Exclusive => match open(OFlags::RDWR) {
                Err(rustix::io::Errno::ACCESS) => open(OFlags::RDONLY),
                other => other,
            },
        }
        .map_err(|e| io(e.into()))?;
        Self::acquire(File::from(fd), &shown, kind, opts)
    }

    /// Locks an already open file (opened beneath the tree root by the caller); `path` is
    /// used in messages.
    ///
    /// An exclusive lock on a file open read-only (one we may not open for writing: the
    /// kernel refuses an OFD write lock on it) is a `flock` exclusive lock, which works on
    /// any open file, plus an OFD *read* lock taken only while `F_OFD_GETLK` finds no other
    /// OFD or POSIX lock on the file: writers are kept out, readers present are waited for,
    /// but an OFD or POSIX reader arriving after that is not stopped (it reads the old file
    /// whole; it may see the path replaced while it holds its lock). `flock` readers are
    /// kept out as for a writable file.
    pub fn acquire(
        file: File,
        path: &Path,
        kind: LockKind,
        opts: &LockOptions,
    ) -> Result<Self, LockError> {
        let start = Instant::now();
        let deadline = start + opts.timeout;
        let mut backoff = Duration::from_millis(1);
        let read_only = rustix::fs::fcntl_getfl(&file)
            .map(|f| (f & OFlags::ACCMODE) == OFlags::RDONLY)
            .map_err(|e| LockError::Io {
                action: "lock",
                path: path.to_owned(),
                source: e.into(),
            })?;
        loop {
            match try_lock(file.as_fd(), kind, read_only, opts.flock) {
                Ok(Attempt::Granted) => {
                    return Ok(Self {
                        file,
                        path: path.to_owned(),
                        kind,
                    })
                }
                Ok(Attempt::Busy) => {}
                Err(source) => {
                    return Err(LockError::Io {
                        action: "lock",
                        path: path.to_owned(),
                        source,
                    })
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let holders = holders_of(&file, kind).unwrap_or_default();
                return Err(LockError::Timeout {
                    path: path.to_owned(),
                    kind,
                    // The limit, not the measured wait: it overshoots by a scheduling
                    // tick, and a user reads "within 200ms" against the 0.2 s they set.
                    waited: opts.timeout,
                    holders,
                });
            }
            std::thread::sleep(backoff.min(deadline - now));
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path given when locking.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kind of lock held.
    pub fn kind(&self) -> LockKind {
        self.kind
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the descriptor releases both locks; unlocking first also releases them if
        // the caller duplicated the descriptor.
        let _ = ofd_fcntl(self.file.as_fd(), libc::F_OFD_SETLK, libc::F_UNLCK);
        let _ = rustix::fs::flock(self.file.as_fd(), FlockOperation::Unlock);
    }
}

/// One non-blocking attempt at both locks; on a refusal nothing stays held. `read_only`:
/// the file is open read-only (see [`FileLock::acquire`] for an exclusive lock then).
fn try_lock(
    fd: BorrowedFd<'_>,
    kind: LockKind,
    read_only: bool,
    flock: bool,
) -> io::Result<Attempt> {
    let l_type = match kind {
        LockKind::Exclusive if !read_only => libc::F_WRLCK,
        _ => libc::F_RDLCK,
    };
    match ofd_fcntl(fd, libc::F_OFD_SETLK, l_type) {
        Ok(_) => {}
        Err(e) if is_busy(&e) => return Ok(Attempt::Busy),
        Err(e) => return Err(e),
    }
    if kind == LockKind::Exclusive && read_only {
        // Would a write lock be granted? Our own read lock does not count (same owner).
        let probe = ofd_fcntl(fd, libc::F_OFD_GETLK, libc::F_WRLCK);
        if !matches!(&probe, Ok(fl) if fl.l_type == libc::F_UNLCK as libc::c_short) {
            let _ = ofd_fcntl(fd, libc::F_OFD_SETLK, libc::F_UNLCK);
            return probe.map(|_| Attempt::Busy);
        }
    }
    if flock {
        let op = match kind {
            LockKind::Shared => FlockOperation::NonBlockingLockShared,
            LockKind::Exclusive => FlockOperation::NonBlockingLockExclusive,
        };
        if let Err(e) = rustix::fs::flock(fd, op) {
            let e = io::Error::from(e);
            let _ = ofd_fcntl(fd, libc::F_OFD_SETLK, libc::F_UNLCK);
            return if is_busy(&e) {
                Ok(Attempt::Busy)
            } else {
                Err(e)
            };
        }
    }
    Ok(Attempt::Granted)
}

/// The kernel's `MAJOR:MINOR:INODE` key of a file as printed in `/proc/locks` (hex
/// major/minor, decimal inode).
fn proc_locks_key(file: &File) -> io::Result<String> {
    let md = file.metadata()?;
    let dev = md.dev();
    // glibc's gnu_dev_major / gnu_dev_minor encoding.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Ok(format!("{major:02x}:{minor:02x}:{}", md.ino()))
}

/// A parsed `/proc/locks` (or fdinfo `lock:`) line: family, write?, pid, key.
fn parse_lock_line(line: &str) -> Option<(LockFamily, bool, i64, &str)> {
    // "1: OFDLCK ADVISORY  WRITE -1 fe:00:1234 0 EOF"; blocked waiters have "->" after "N:".
    let mut fields = line.split_whitespace();
    let _id = fields.next()?;
    let family = fields.next()?;
    if family == "->" {
        return None;
    }
    let family = match family {
        "OFDLCK" => LockFamily::Ofd,
        "POSIX" => LockFamily::Posix,
        "FLOCK" => LockFamily::Flock,
        _ => LockFamily::Other,
    };
    let _mode = fields.next()?; // ADVISORY / MANDATORY
    let write = fields.next()? == "WRITE";
    let pid: i64 = fields.next()?.parse().ok()?;
    let key = fields.next()?;
    Some((family, write, pid, key))
}

fn command_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// How many times `/proc/locks` is read when it shows no conflicting lock on the file.
const PROC_LOCKS_READS: usize = 3;

/// Holders of locks on `file` that conflict with `kind`, from `/proc/locks`, falling back to
/// `/proc/*/fdinfo` for locks shown without a pid.
///
/// `/proc/locks` is not one snapshot: the kernel hands it out about a page (~65 locks) per
/// `read`, and when other locks are taken or released between two reads, a line can be skipped.
/// On a busy machine the holder's line can so be missing. It is therefore read again (up to
/// `PROC_LOCKS_READS` times) while it shows no conflicting lock on the file, and if it never
/// does, every `/proc/PID/fdinfo/FD` is searched (each of those is read whole, at once).
pub fn holders_of(file: &File, kind: LockKind) -> io::Result<Vec<Holder>> {
    let key = proc_locks_key(file)?;
    holders_from(
        &key,
        kind,
        std::process::id(),
        || std::fs::read_to_string("/proc/locks"),
        fdinfo_lockers,
    )
}

/// [`holders_of`] with its sources passed in: `proc_locks` reads `/proc/locks`, `fdinfo`
/// searches the open files of every process for locks on `key`; `me` is left out.
fn holders_from(
    key: &str,
    kind: LockKind,
    me: u32,
    mut proc_locks: impl FnMut() -> io::Result<String>,
    fdinfo: impl Fn(&str) -> Vec<(u32, LockFamily, bool)>,
) -> io::Result<Vec<Holder>> {
    let conflicts = |write: bool| kind == LockKind::Exclusive || write;
    let mut holders: Vec<Holder> = Vec::new();
    let mut anonymous = Vec::new();
    for _ in 0..PROC_LOCKS_READS {
        let locks = proc_locks()?;
        for line in locks.lines() {
            let Some((family, write, pid, k)) = parse_lock_line(line) else {
                continue;
            };
            if k != key || !conflicts(write) {
                continue;
            }
            if pid > 0 {
                if pid as u32 != me {
                    holders.push(Holder {
                        pid: pid as u32,
                        family,
                        write,
                        command: command_of(pid as u32),
                    });
                }
            } else {
                anonymous.push((family, write));
            }
        }
        if !holders.is_empty() || !anonymous.is_empty() {
            break;
        }
    }
    // Nothing seen in /proc/locks (a skipped line, or the lock is gone): any conflicting lock
    // in fdinfo counts. Locks shown without a pid: the fdinfo locks of that family and access.
    let missed = holders.is_empty() && anonymous.is_empty();
    if missed || !anonymous.is_empty() {
        for (pid, family, write) in fdinfo(key) {
            let wanted = if missed {
                conflicts(write)
            } else {
                anonymous.contains(&(family, write))
            };
            if pid != me && wanted {
                holders.push(Holder {
                    pid,
                    family,
                    write,
                    command: command_of(pid),
                });
            }
        }
    }
    holders.sort_by_key(|h| (h.pid, h.write));
    holders.dedup_by(|a, b| a.pid == b.pid && a.family == b.family && a.write == b.write);
    Ok(holders)
}

/// Processes with an open file that carries a lock on `key`, from `/proc/PID/fdinfo/FD`.
fn fdinfo_lockers(key: &str) -> Vec<(u32, LockFamily, bool)> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            for line in info.lines() {
                if let Some(rest) = line.strip_prefix("lock:") {
                    if let Some((family, write, _, k)) = parse_lock_line(rest.trim_start()) {
                        if k == key {
                            out.push((pid, family, write));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Locks `p` beneath `root` for a sync's `--lock`; `Ok(None)` if there is no such file or it is a
/// symlink (nothing a reader could have locked: readers lock what a link points to). The
/// error is the [`LockError`] text, which names the holders.
pub(crate) fn lock_beneath(
    root: &Path,
    p: &[u8],
    kind: LockKind,
    timeout_ms: u32,
) -> Result<Option<FileLock>, String> {
    let rel = RelPath::new(OsStr::from_bytes(p)).map_err(|e| e.to_string())?;
    let opts = LockOptions {
        timeout: Duration::from_millis(timeout_ms.into()),
        ..LockOptions::default()
    };
    match FileLock::open_beneath(root, &rel, kind, &opts) {
        Ok(l) => Ok(Some(l)),
        Err(LockError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ELOOP) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks_lines() {
        assert_eq!(
            parse_lock_line("1: OFDLCK ADVISORY  WRITE -1 fe:00:1234 0 EOF"),
            Some((LockFamily::Ofd, true, -1, "fe:00:1234"))
        );
        assert_eq!(
            parse_lock_line("2: FLOCK  ADVISORY  READ 77 08:01:9 0 EOF"),
            Some((LockFamily::Flock, false, 77, "08:01:9"))
        );
        assert_eq!(
            parse_lock_line("2: -> FLOCK  ADVISORY  WRITE 78 08:01:9 0 EOF"),
            None
        );
    }

    /// `/proc/locks` skips lines when locks churn between the pages of one read (seen on a
    /// busy machine: "holder unknown" with the holder's lock held).
    #[test]
    fn regression_a_holder_line_skipped_in_proc_locks_is_found_on_a_second_read() {
        let line = "7: FLOCK  ADVISORY  WRITE 4242 00:2d:99 0 EOF\n";
        let mut reads = vec![Ok(String::new()), Ok(line.to_owned())].into_iter();
        let holders = holders_from(
            "00:2d:99",
            LockKind::Shared,
            1,
            || reads.next().unwrap(),
            |_| panic!("fdinfo searched although /proc/locks showed the holder"),
        )
        .unwrap();
        assert_eq!(holders.len(), 1);
        assert_eq!(
            (holders[0].pid, holders[0].family, holders[0].write),
            (4242, LockFamily::Flock, true)
        );
    }

    #[test]
    fn regression_a_holder_never_seen_in_proc_locks_is_found_in_fdinfo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        let quick = LockOptions {
            timeout: Duration::ZERO,
            flock: true,
        };
        let held = FileLock::open(&path, LockKind::Shared, &quick).unwrap();
        let key = proc_locks_key(held.file()).unwrap();
        let mut reads = 0;
        // `me` = 0: this process is the holder, and must not be left out here.
        let holders = holders_from(
            &key,
            LockKind::Exclusive,
            0,
            || {
                reads += 1;
                Ok(String::new())
            },
            fdinfo_lockers,
        )
        .unwrap();
        assert_eq!(reads, PROC_LOCKS_READS);
        let mut mine: Vec<_> = holders
            .iter()
            .filter(|h| h.pid == std::process::id())
            .map(|h| (h.family == LockFamily::Flock, h.write))
            .collect();
        mine.sort();
        // Both of FileLock's locks (OFD, then flock), both shared.
        assert_eq!(mine, [(false, false), (true, false)]);
        // Read locks do not stand in the way of another shared lock.
        let none = holders_from(
            &key,
            LockKind::Shared,
            0,
            || Ok(String::new()),
            fdinfo_lockers,
        );
        assert!(none.unwrap().is_empty());
    }

    /// A directory holding one file `f`, and options that give up after 30 ms.
    fn one_file_quick_lock() -> (tempfile::TempDir, PathBuf, LockOptions) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        let quick = LockOptions {
            timeout: Duration::from_millis(30),
            flock: true,
        };
        (dir, path, quick)
    }

    /// A read-only remote file (mode 0444 like the master's) could not be replaced with
    /// `--lock` by an agent that is not root: opening it for writing to lock it failed.
    #[test]
    fn regression_an_exclusive_lock_on_a_read_only_open_file_waits_for_readers() {
        let (_dir, path, quick) = one_file_quick_lock();
        let read_only = || File::open(&path).unwrap();
        let busy = |r: Result<FileLock, LockError>| {
            assert!(matches!(r, Err(LockError::Timeout { .. })), "{r:?}");
        };
        // Free: granted. While held, a FileLock reader and an OFD writer are kept out.
        let ex = FileLock::acquire(read_only(), &path, LockKind::Exclusive, &quick).unwrap();
        busy(FileLock::open(&path, LockKind::Shared, &quick));
        let other = File::options().read(true).write(true).open(&path).unwrap();
        let e = ofd_fcntl(other.as_fd(), libc::F_OFD_SETLK, libc::F_WRLCK).unwrap_err();
        assert!(is_busy(&e), "{e}");
        drop(ex);
        // A reader holding only an OFD read lock, or only a flock shared lock, is waited for.
        let ofd_reader = read_only();
        ofd_fcntl(ofd_reader.as_fd(), libc::F_OFD_SETLK, libc::F_RDLCK).unwrap();
        busy(FileLock::acquire(
            read_only(),
            &path,
            LockKind::Exclusive,
            &quick,
        ));
        drop(ofd_reader);
        let flock_reader = read_only();
        rustix::fs::flock(&flock_reader, FlockOperation::NonBlockingLockShared).unwrap();
        busy(FileLock::acquire(
            read_only(),
            &path,
            LockKind::Exclusive,
            &quick,
        ));
        drop(flock_reader);
        FileLock::acquire(read_only(), &path, LockKind::Exclusive, &quick).unwrap();
    }

    #[test]
    fn two_open_files_in_one_process_conflict() {
        let (dir, path, quick) = one_file_quick_lock();
        let a = FileLock::open(&path, LockKind::Shared, &quick).unwrap();
        let b = FileLock::open(&path, LockKind::Shared, &quick).unwrap();
        let err = FileLock::open(&path, LockKind::Exclusive, &quick).unwrap_err();
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
        drop((a, b));
        let c = FileLock::open(&path, LockKind::Exclusive, &quick).unwrap();
        assert_eq!(c.kind(), LockKind::Exclusive);
        // Beneath the root: the same file conflicts; a symlinked parent is refused.
        let rel = RelPath::new("f").unwrap();
        assert!(FileLock::open_beneath(dir.path(), &rel, LockKind::Shared, &quick).is_err());
        drop(c);
        FileLock::open_beneath(dir.path(), &rel, LockKind::Shared, &quick).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("link")).unwrap();
        let through = RelPath::new("link/f").unwrap();
        let err =
            FileLock::open_beneath(dir.path(), &through, LockKind::Shared, &quick).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }
}
