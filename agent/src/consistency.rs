//! The consistency check a remote runs on itself after a sync: did every file it received stay
//! as it was written? Checks are plug-ins ([`ConsistencyCheck`]); the built-in
//! [`RecordedStateCheck`] compares each file with what was recorded when it was applied and
//! with the agent's own [`WriteLog`], and recomputes its checksum.
//!
//! ```no_run
//! use fleetsync_agent::consistency::{
//!     record_applied, ConsistencyCheck, RecordedStateCheck, WriteLog,
//! };
//! use fleetsync_agent::journal::RelPath;
//! use std::path::Path;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = Path::new("/srv/tree");
//! let mut log = WriteLog::open(Path::new("/var/lib/fleetsync/write.log"))?;
//! // Right after the block with etc/app.conf was committed:
//! let rec = record_applied(root, &RelPath::new("etc/app.conf")?, "crc32", "1c291ca3")?;
//! log.append(&rec)?;
//! // Later, when the server asks:
//! let check = RecordedStateCheck::new(Some("/var/lib/fleetsync/write.log".into()));
//! for bad in check.check(root, &[rec]) {
//!     println!("{bad}"); // reported back; the server syncs these files again
//! }
//! # Ok(()) }
//! ```
//!
//! # The write log
//!
//! An append-only text file, one line per file the agent put in place:
//! `v1 PATH ALGORITHM CHECKSUM SIZE MTIME_SECS.NANOS INODE`, with the path escaped as in the
//! journal (`%XX` for spaces, newlines, `%` and non-printable bytes). Each line is written
//! with a single `write(2)` on an `O_APPEND` descriptor, so concurrent appenders do not
//! interleave; a torn last line (a crash mid-append) is ignored when reading; the last line
//! for a path wins. The log is what the agent itself believes it wrote: a file that differs
//! from its last log entry was changed by someone else.
//!
//! # In the agent
//!
//! A serving agent ([`crate::Agent`]) records every file it commits from a sync stream
//! (after the rename, with the digest the master sent and the agent verified) in its log
//! ([`crate::Agent::with_write_log`]; `fleetsync agent --write-log FILE`, by default
//! [`default_write_log`], outside the tree) and in memory. After a remote's transfers the
//! server sends a `consistencyRequest` naming the files with the master's digest and size;
//! the agent runs its checks — [`RecordedStateCheck`] unless replaced, plus any added with
//! [`crate::Agent::with_check`] — and answers with the inconsistent files. The server
//! synchronizes those again and asks again, up to `--max-rounds`.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::journal::{self, JournalError, Mtime, RelPath};

/// A file received during a sync, with its state recorded right after it was put in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedFile {
    /// Path relative to the root.
    pub path: RelPath,
    /// Engine algorithm name of `checksum` (e.g. `"crc32"`).
    pub algorithm: String,
    /// Lowercase hex checksum of the content.
    pub checksum: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: Mtime,
    /// Inode number.
    pub inode: u64,
}

/// What is wrong with a file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The file is gone.
    Missing,
    /// It is no longer a regular file (e.g. replaced by a symlink or directory).
    NotRegularFile,
    /// Size differs from the record.
    SizeChanged {
        /// Recorded.
        recorded: u64,
        /// Now.
        found: u64,
    },
    /// Inode differs: the file was replaced.
    InodeChanged {
        /// Recorded.
        recorded: u64,
        /// Now.
        found: u64,
    },
    /// Modification time differs: the file was written.
    MtimeChanged {
        /// Recorded.
        recorded: Mtime,
        /// Now.
        found: Mtime,
    },
    /// Content checksum differs.
    ChecksumMismatch {
        /// Recorded (hex).
        recorded: String,
        /// Recomputed (hex).
        found: String,
    },
    /// The agent's write log has no entry for the file.
    NotInWriteLog,
    /// The agent's last write-log entry for the file differs from the record (a later or
    /// different write).
    WriteLogDiffers,
    /// The check itself could not be done (unknown algorithm, read error...).
    CheckFailed(String),
    /// A finding of a deployment's own check, in its words.
    Other(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "missing"),
            Self::NotRegularFile => write!(f, "no longer a regular file"),
            Self::SizeChanged { recorded, found } => {
                write!(f, "size changed from {recorded} to {found}")
            }
            Self::InodeChanged { recorded, found } => {
                write!(f, "replaced (inode {recorded} is now {found})")
            }
            Self::MtimeChanged { recorded, found } => write!(
                f,
                "modified (mtime {}.{:09} is now {}.{:09})",
                recorded.secs, recorded.nanos, found.secs, found.nanos
            ),
            Self::ChecksumMismatch { recorded, found } => {
                write!(f, "content changed (checksum {recorded} is now {found})")
            }
            Self::NotInWriteLog => write!(f, "not in the agent's write log"),
            Self::WriteLogDiffers => write!(f, "differs from the agent's last write"),
            Self::CheckFailed(why) => write!(f, "could not be checked: {why}"),
            Self::Other(why) => f.write_str(why),
        }
    }
}

/// One inconsistent file, as reported back to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inconsistency {
    /// The file, relative to the root.
    pub path: PathBuf,
    /// Name of the check that found it.
    pub check: String,
    /// What is wrong.
    pub problem: Problem,
}

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} [{}]",
            self.path.display(),
            self.problem,
            self.check
        )
    }
}

/// A self-check a remote runs over the files it received. Implementations must not modify
/// the tree; they report, and the server synchronizes the reported files again.
pub trait ConsistencyCheck: Send + Sync {
    /// A short name, shown with each finding.
    fn name(&self) -> &str;

    /// Checks `files` (all under `root`) and returns what is inconsistent; empty means
    /// consistent.
    fn check(&self, root: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency>;
}

/// Runs several checks and concatenates their findings.
pub fn run_checks(
    checks: &[Box<dyn ConsistencyCheck>],
    root: &Path,
    files: &[ReceivedFile],
) -> Vec<Inconsistency> {
    checks.iter().flat_map(|c| c.check(root, files)).collect()
}

/// Errors of the write log and of recording.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConsistencyError {
    /// A file could not be opened, read, written or stat-ed.
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A path could not be resolved safely beneath the root.
    Path(JournalError),
    /// A line of the write log is malformed (other than a torn last line).
    BadLogLine {
        /// The log.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for ConsistencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                action,
                path,
                source,
            } => write!(f, "{action} {}: {source}", path.display()),
            Self::Path(e) => e.fmt(f),
            Self::BadLogLine { path, line, reason } => {
                write!(f, "write log {} line {line}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for ConsistencyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Path(e) => Some(e),
            Self::BadLogLine { .. } => None,
        }
    }
}

/// Opens a regular file beneath `root` for reading, without following symlinks anywhere.
fn open_beneath(root: &Path, path: &RelPath) -> Result<File, OpenError> {
    let root_fd = journal::open_root(root).map_err(OpenError::Other)?;
    let (dir, name) = journal::open_parent(root_fd.as_fd(), path).map_err(|e| match e {
        JournalError::MissingParent { .. } => OpenError::Missing,
        JournalError::UnsafePath { .. } => OpenError::NotRegular,
        e => OpenError::Other(e),
    })?;
    match rustix::fs::openat(
        dir.as_fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::NOENT) => Err(OpenError::Missing),
        Err(Errno::LOOP) => Err(OpenError::NotRegular),
        Err(e) => Err(OpenError::Other(JournalError::Io {
            action: "open",
            path: path.as_path().to_owned(),
            source: e.into(),
        })),
    }
}

enum OpenError {
    Missing,
    NotRegular,
    Other(JournalError),
}

fn mtime_of(md: &std::fs::Metadata) -> Mtime {
    Mtime {
        secs: md.mtime(),
        nanos: md.mtime_nsec() as u32,
    }
}

/// Computes the checksum of an open file with the engine algorithm `algorithm`, through the
/// engine's reader ([`fleetsync_engine::hash_open_file`]: from the file's start, whatever its
/// offset).
pub fn checksum_file(file: &mut File, algorithm: &str) -> Result<String, String> {
    // One registry for every file (building it allocates).
    static REGISTRY: std::sync::OnceLock<fleetsync_engine::Registry> = std::sync::OnceLock::new();
    let info = REGISTRY
        .get_or_init(fleetsync_engine::Registry::with_builtins)
        .info(algorithm)
        .map_err(|e| e.to_string())?;
    let hashed = fleetsync_engine::hash_open_file(
        file,
        std::slice::from_ref(&info),
        &fleetsync_engine::HashOptions::default(),
    )
    .map_err(|e| format!("read: {e}"))?;
    let digest = hashed.digests.first().ok_or("no digest")?;
    Ok(digest.to_hex())
}

/// Records the state of a file just put in place (by the journal): its size, mtime and inode,
/// with the checksum the sync computed for its content. Append the result to the [`WriteLog`].
pub fn record_applied(
    root: &Path,
    path: &RelPath,
    algorithm: &str,
    checksum: &str,
) -> Result<ReceivedFile, ConsistencyError> {
    let file = match open_beneath(root, path) {
        Ok(f) => f,
        Err(OpenError::Other(e)) => return Err(ConsistencyError::Path(e)),
        Err(OpenError::Missing) => {
            return Err(ConsistencyError::Io {
                action: "record",
                path: path.as_path().to_owned(),
                source: io::ErrorKind::NotFound.into(),
            })
        }
        Err(OpenError::NotRegular) => {
            return Err(ConsistencyError::Io {
                action: "record",
                path: path.as_path().to_owned(),
                source: io::Error::other("not a regular file"),
            })
        }
    };
    let md = file.metadata().map_err(|source| ConsistencyError::Io {
        action: "stat",
        path: path.as_path().to_owned(),
        source,
    })?;
    Ok(ReceivedFile {
        path: path.clone(),
        algorithm: algorithm.to_owned(),
        checksum: checksum.to_ascii_lowercase(),
        size: md.size(),
        mtime: mtime_of(&md),
        inode: md.ino(),
    })
}

/// The agent's append-only log of the files it wrote (see the module docs).
#[derive(Debug)]
pub struct WriteLog {
    file: File,
    path: PathBuf,
    /// Bytes in the log (where the next entry goes).
    len: u64,
}

impl WriteLog {
    /// Opens (creating) the log for appending.
    pub fn open(path: &Path) -> Result<Self, ConsistencyError> {
        // Readable too: records are read back by offset (read_at).
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| ConsistencyError::Io {
                action: "open write log",
                path: path.to_owned(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| ConsistencyError::Io {
                action: "stat write log",
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(Self {
            file,
            path: path.to_owned(),
            len,
        })
    }

    /// Appends one entry with a single write, and fsyncs.
    pub fn append(&mut self, entry: &ReceivedFile) -> Result<(), ConsistencyError> {
        self.append_unsynced(entry)?;
        self.sync()
    }

    /// Makes every entry appended so far durable (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), ConsistencyError> {
        self.file
            .sync_data()
            .map_err(|source| ConsistencyError::Io {
                action: "fsync write log",
                path: self.path.clone(),
                source,
            })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry with a single write, without fsync: call [`WriteLog::sync`] after a
    /// batch (the agent does at the end of each sync stream). Returns the entry's offset in
    /// the log (for [`WriteLog::read_at`]).
    pub fn append_unsynced(&mut self, entry: &ReceivedFile) -> Result<u64, ConsistencyError> {
        let mut line = String::from("v1 ");
        journal::escape(
            &mut line,
            entry.path.as_path().as_os_str().as_encoded_bytes(),
        );
        line.push(' ');
        journal::escape(&mut line, entry.algorithm.as_bytes());
        line.push_str(&format!(
            " {} {} {}.{} {}\n",
            entry.checksum, entry.size, entry.mtime.secs, entry.mtime.nanos, entry.inode
        ));
        let io = |action| {
            let path = self.path.clone();
            move |source| ConsistencyError::Io {
                action,
                path,
                source,
            }
        };
        self.file
            .write_all(line.as_bytes())
            .map_err(io("append to write log"))?;
        let at = self.len;
        self.len += line.len() as u64;
        Ok(at)
    }

    /// The entry at `offset` (as [`WriteLog::append_unsynced`] returned it), read from the
    /// log's file (written, if not yet durable: the page cache has it).
    pub fn read_at(&self, offset: u64) -> Result<ReceivedFile, ConsistencyError> {
        use std::os::unix::fs::FileExt;
        let bad = |reason: String| ConsistencyError::BadLogLine {
            path: self.path.clone(),
            line: 0,
            reason,
        };
        let mut buf = vec![0u8; 512];
        let mut got = 0;
        loop {
            let n = loop {
                match self.file.read_at(&mut buf[got..], offset + got as u64) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
            .map_err(|source| ConsistencyError::Io {
                action: "read write log",
                path: self.path.clone(),
                source,
            })?;
            if n == 0 {
                return Err(bad(format!("no whole entry at offset {offset}")));
            }
            if let Some(end) = buf[got..got + n].iter().position(|&b| b == b'\n') {
                return parse_log_line(&buf[..got + end]).map_err(bad);
            }
            got += n;
            if got == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
        }
    }

    /// Rewrites the log at `path` with only the last entry of each path (atomically: a
    /// temporary file beside it, fsynced, renamed over it) when it holds more than twice as
    /// many lines as paths. Returns whether it was rewritten. Not safe against another
    /// process appending meanwhile: run it before serving.
    pub fn compact(path: &Path) -> Result<bool, ConsistencyError> {
        // Streamed, twice: the first pass keeps, per path, a 64-bit hash of it and the
        // number of its last line (about 32 bytes per path, not the entries themselves);
        // the second copies those lines. Two paths of one hash (odds about n^2 / 2^65)
        // would lose the older one's entry: its file is then reported "not in the write
        // log" and synchronized again, nothing worse.
        let io_err = |action: &'static str| {
            move |source| ConsistencyError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let mut last: HashMap<u64, usize> = HashMap::new();
        let mut lines = 0;
        match File::open(path) {
            Ok(f) => for_each_line(f, path, |i, line| {
                parse_log_line(line)?;
                last.insert(path_hash(line), i);
                lines = i + 1;
                Ok(())
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("read write log")(e)),
        }
        if lines <= 2 * last.len() {
            return Ok(false);
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".compact");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        {
            let out = File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io_err("write compacted write log"))?;
            let mut w = io::BufWriter::new(out);
            let f = File::open(path).map_err(io_err("read write log"))?;
            for_each_line(f, path, |i, line| {
                if last.get(&path_hash(line)) == Some(&i) {
                    w.write_all(line)
                        .and_then(|()| w.write_all(b"\n"))
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            })?;
            let out = w
                .into_inner()
                .map_err(|e| io_err("write compacted write log")(e.into_error()))?;
            out.sync_data()
                .map_err(io_err("fsync compacted write log"))?;
        }
        std::fs::rename(&tmp, path).map_err(io_err("replace write log"))?;
        Ok(true)
    }

    /// Reads the last entry of each path of a log for which `wanted` holds, streaming it (the
    /// others cost no memory). A missing log is empty.
    pub fn read_wanted(
        path: &Path,
        mut wanted: impl FnMut(&RelPath) -> bool,
    ) -> Result<HashMap<RelPath, ReceivedFile>, ConsistencyError> {
        let mut map = HashMap::new();
        match File::open(path) {
            Ok(f) => for_each_line(f, path, |_, line| {
                let e = parse_log_line(line)?;
                if wanted(&e.path) {
                    map.insert(e.path.clone(), e);
                }
                Ok(())
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ConsistencyError::Io {
                    action: "read write log",
                    path: path.to_owned(),
                    source,
                })
            }
        }
        Ok(map)
    }

    /// Reads a log: the last entry of each path. A missing log is empty.
    pub fn read(path: &Path) -> Result<HashMap<RelPath, ReceivedFile>, ConsistencyError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(source) => {
                return Err(ConsistencyError::Io {
                    action: "read write log",
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
        // After the final '\n' comes an empty piece, or the torn last line: skip either.
        let whole = &lines[..lines.len() - 1];
        let mut map = HashMap::new();
        for (i, line) in whole.iter().enumerate() {
            let entry = parse_log_line(line).map_err(|reason| ConsistencyError::BadLogLine {
                path: path.to_owned(),
                line: i + 1,
                reason,
            })?;
            map.insert(entry.path.clone(), entry);
        }
        Ok(map)
    }
}

/// Calls `each` with the number and bytes (without the `\n`) of every whole line of the log
/// `file` (at `path`); a torn last line is skipped, as [`WriteLog::read`] does. An error of
/// `each` is the line's.
fn for_each_line(
    file: File,
    path: &Path,
    mut each: impl FnMut(usize, &[u8]) -> Result<(), String>,
) -> Result<(), ConsistencyError> {
    use std::io::BufRead;
    let mut r = io::BufReader::with_capacity(1 << 16, file);
    let mut line = Vec::new();
    let mut i = 0;
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|source| ConsistencyError::Io {
                action: "read write log",
                path: path.to_owned(),
                source,
            })?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(());
        }
        line.pop();
        each(i, &line).map_err(|reason| ConsistencyError::BadLogLine {
            path: path.to_owned(),
            line: i + 1,
            reason,
        })?;
        i += 1;
    }
}

/// A 64-bit hash of the (escaped) path field of a log line.
fn path_hash(line: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let field = line.split(|&b| b == b' ').nth(1).unwrap_or(b"");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    field.hash(&mut h);
    h.finish()
}

fn parse_log_line(line: &[u8]) -> Result<ReceivedFile, String> {
    let line = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let f: Vec<&str> = line.split(' ').collect();
    let ["v1", path, alg, sum, size, mtime, inode] = f[..] else {
        return Err(format!("malformed entry {line:?}"));
    };
    let path = RelPath::new(std::ffi::OsString::from_vec(journal::unescape(path)?))
        .map_err(|e| e.to_string())?;
    let algorithm = String::from_utf8(journal::unescape(alg)?).map_err(|e| e.to_string())?;
    let (secs, nanos) = mtime.split_once('.').ok_or("bad mtime")?;
    Ok(ReceivedFile {
        path,
        algorithm,
        checksum: sum.to_owned(),
        size: size.parse().map_err(|_| "bad size")?,
        mtime: Mtime {
            secs: secs.parse().map_err(|_| "bad mtime")?,
            nanos: nanos.parse().map_err(|_| "bad mtime")?,
        },
        inode: inode.parse().map_err(|_| "bad inode")?,
    })
}

/// The built-in check: each received file must still be a regular file with the recorded
/// size, inode and mtime, its recomputed checksum must match, and it must match the agent's
/// last write-log entry for it. One finding per file (the first that fails, in that order;
/// the checksum is only recomputed when the cheap checks pass).
#[derive(Clone, Debug, Default)]
pub struct RecordedStateCheck {
    write_log: Option<PathBuf>,
}

impl RecordedStateCheck {
    /// A check consulting the write log at `write_log` (or none).
    pub fn new(write_log: Option<PathBuf>) -> Self {
        Self { write_log }
    }

    fn check_one(
        &self,
        root: &Path,
        rec: &ReceivedFile,
        log: Option<&HashMap<RelPath, ReceivedFile>>,
    ) -> Option<Problem> {
        let mut file = match open_beneath(root, &rec.path) {
            Ok(f) => f,
            Err(OpenError::Missing) => return Some(Problem::Missing),
            Err(OpenError::NotRegular) => return Some(Problem::NotRegularFile),
            Err(OpenError::Other(e)) => return Some(Problem::CheckFailed(e.to_string())),
        };
        let md = match file.metadata() {
            Ok(md) => md,
            Err(e) => return Some(Problem::CheckFailed(format!("stat: {e}"))),
        };
        if !md.is_file() {
            return Some(Problem::NotRegularFile);
        }
        if md.size() != rec.size {
            return Some(Problem::SizeChanged {
                recorded: rec.size,
                found: md.size(),
            });
        }
        if md.ino() != rec.inode {
            return Some(Problem::InodeChanged {
                recorded: rec.inode,
                found: md.ino(),
            });
        }
        if mtime_of(&md) != rec.mtime {
            return Some(Problem::MtimeChanged {
                recorded: rec.mtime,
                found: mtime_of(&md),
            });
        }
        match checksum_file(&mut file, &rec.algorithm) {
            Ok(sum) if sum.eq_ignore_ascii_case(&rec.checksum) => {}
            Ok(sum) => {
                return Some(Problem::ChecksumMismatch {
                    recorded: rec.checksum.clone(),
                    found: sum,
                })
            }
            Err(e) => return Some(Problem::CheckFailed(e)),
        }
        if let Some(log) = log {
            match log.get(&rec.path) {
                None => return Some(Problem::NotInWriteLog),
                Some(logged) if logged != rec => return Some(Problem::WriteLogDiffers),
                Some(_) => {}
            }
        }
        None
    }
}

impl ConsistencyCheck for RecordedStateCheck {
    fn name(&self) -> &str {
        "recorded-state"
    }

    fn check(&self, root: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency> {
        let log = match &self.write_log {
            None => None,
            Some(p) => match WriteLog::read(p) {
                Ok(log) => Some(log),
                Err(e) => {
                    // Without its log the agent cannot vouch for any file.
                    return files
                        .iter()
                        .map(|f| Inconsistency {
                            path: f.path.as_path().to_owned(),
                            check: self.name().to_owned(),
                            problem: Problem::CheckFailed(e.to_string()),
                        })
                        .collect();
                }
            },
        };
        // In parallel: the checksums are recomputed here.
        files
            .par_iter()
            .filter_map(|f| {
                self.check_one(root, f, log.as_ref())
                    .map(|problem| Inconsistency {
                        path: f.path.as_path().to_owned(),
                        check: self.name().to_owned(),
                        problem,
                    })
            })
            .collect()
    }
}

/// The default write log of the tree at `root`, beside the checksum cache and outside the
/// tree: `$XDG_CACHE_HOME/fleetsync/writes-HASH` (else `~/.cache/fleetsync/...`), one file
/// per canonical root path. `None` without a home or when `root` cannot be resolved.
pub fn default_write_log(root: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let canon = std::fs::canonicalize(root).ok()?;
    // FNV-1a of the root's path (as for the checksum cache).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    Some(base.join("fleetsync").join(format!("writes-{h:016x}")))
}
