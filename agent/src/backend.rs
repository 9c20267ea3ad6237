//! Storage plug-ins: the [`Backend`] trait and the POSIX implementation.
#![allow(clippy::unnecessary_cast)] // `struct stat` field types differ between targets

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fleetsync_engine::AlgorithmInfo;
use fleetsync_proto::{Attrs, FileEntry, FileKind};
use fleetsync_select::Decision;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use crate::path::{self, name, Root};
use crate::sumcache::{FileKey, SumCache};
use crate::AgentError;

/// Prefix of the temporary files the agent writes before renaming. A file's
/// temp is `.fleetsync.tmp.<16 random hex digits>.<destination name>` (a name
/// too long for that as `#<hash of the name>`, as in [`partial_name`]), so that
/// one left by a killed agent can still be told to be the in-flight content of
/// that destination; see [`LEFTOVER_PARTIAL_MIN`].
pub const TEMP_PREFIX: &[u8] = b".fleetsync.tmp.";

/// Prefix of a partial file: what a transfer cut mid-file had written, kept
/// beside its destination as `.fleetsync.partial.<name>` (for a name of more
/// than 223 bytes, `.fleetsync.partial.#<hash of the name>`, as in its temp
/// file's name, see [`TEMP_PREFIX`]), so that the next sync
/// can resume it or use it as a delta basis. Never listed; see
/// [`TempFile::keep_as_partial`].
pub const PARTIAL_PREFIX: &[u8] = b".fleetsync.partial.";

/// A partial file older than this (by its mtime, the time it was last written)
/// is removed by the next listing of its directory.
pub const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The longest file name (`NAME_MAX` on Linux).
const NAME_MAX: usize = 255;

/// Hex digits of the random part of a temp file's name.
const TEMP_RANDOM_HEX: usize = 16;

/// The longest destination name carried as is in its temp and partial file
/// names (longer ones are carried as `#<hash>`): what fits after
/// `.fleetsync.tmp.<random>.` within [`NAME_MAX`].
const KEY_MAX: usize = NAME_MAX - TEMP_PREFIX.len() - TEMP_RANDOM_HEX - 1;

/// A temp file left by an agent killed mid-file with at least this many bytes
/// becomes its destination's partial file at the next listing (smaller ones
/// are removed): the same threshold a cut stream keeps a partial from.
pub const LEFTOVER_PARTIAL_MIN: u64 = 1 << 20;

/// How destination name `n` is carried in its temp and partial file names:
/// as is when it fits ([`KEY_MAX`]), else `#` and 32 hex digits of its SHA-256
/// (deterministic: the same across restarts and agent versions).
fn name_key(n: &[u8]) -> Vec<u8> {
    if n.len() <= KEY_MAX {
        return n.to_vec();
    }
    let info = fleetsync_engine::Registry::with_builtins()
        .info("sha256")
        .expect("sha256 is built in");
    let mut h = info.instantiate();
    h.update(n);
    let mut k = vec![b'#'];
    for b in &h.finish().as_bytes()[..16] {
        k.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    k
}

/// The partial file's name for destination name `n` (deterministic: the same
/// across restarts and agent versions).
pub fn partial_name(n: &[u8]) -> Vec<u8> {
    let mut p = PARTIAL_PREFIX.to_vec();
    p.extend_from_slice(&name_key(n));
    p
}

/// The destination key ([`name_key`]) a file temp's name carries:
/// `.fleetsync.tmp.<16 hex digits>.<key>`. `None` for any other name (the
/// temps of symlinks and hard links, which carry none, and those of older
/// agents).
fn temp_key(n: &[u8]) -> Option<&[u8]> {
    let rest = n.strip_prefix(TEMP_PREFIX)?;
    if rest.len() <= TEMP_RANDOM_HEX + 1 || rest[TEMP_RANDOM_HEX] != b'.' {
        return None;
    }
    let (random, key) = rest.split_at(TEMP_RANDOM_HEX);
    random
        .iter()
        .all(u8::is_ascii_hexdigit)
        .then_some(&key[1..])
}

/// Decides, for a relative path and whether it is a directory, if it is listed.
pub type Decider<'a> = &'a (dyn Fn(&[u8], bool) -> Decision + Sync);

/// Where an agent's tree lives. [`PosixBackend`] is the default; other stores
/// plug in by implementing this trait. Every path is relative to the root and
/// has been checked with [`crate::path::check`]; implementations must still
/// refuse to follow symlinks.
pub trait Backend: Send + Sync {
    /// Walks the tree: the root first (path `b""`), a directory before its
    /// contents, symlinks never followed, pruned where `decide` says
    /// [`Decision::ExcludePrune`]. Each included entry goes to `sink`.
    /// Temp and partial files are never listed; on the way, the POSIX backend
    /// keeps a temp left by a killed agent as its destination's partial file
    /// (see [`LEFTOVER_PARTIAL_MIN`]) and removes stale ones.
    fn list(
        &self,
        decide: Decider<'_>,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError>;

    /// [`Backend::list`], and each regular file carries the digest in `algorithm` that the
    /// backend's checksum cache holds for it as just listed (`FileEntry::digest`), under the
    /// rules [`Backend::checksum`] answers from the cache by, so that a server can judge an
    /// unchanged file without asking for its checksum. The default lists without digests.
    fn list_with_digests(
        &self,
        decide: Decider<'_>,
        algorithm: &str,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let _ = algorithm;
        self.list(decide, sink)
    }

    /// Opens a regular file for reading, with its metadata at open time.
    fn open_read(&self, path: &[u8]) -> Result<(Box<dyn Read + Send>, FileEntry), AgentError>;

    /// Checksum of a regular file: (digest bytes, bytes hashed). `fresh`: read the data even
    /// if a cached digest exists (`fleetsync verify`).
    fn checksum(
        &self,
        path: &[u8],
        alg: &AlgorithmInfo,
        fresh: bool,
    ) -> Result<(Vec<u8>, u64), AgentError>;

    /// Starts writing new content for `path` into a temporary file beside it.
    /// Dropping the result without [`TempFile::commit`] removes the temporary file;
    /// [`TempFile::keep_as_partial`] keeps it as the partial of `path` instead.
    fn create_temp(&self, path: &[u8]) -> Result<Box<dyn TempFile>, AgentError>;

    /// Resumes the partial of `path` (see [`PARTIAL_PREFIX`]): it becomes the
    /// temporary file being written, positioned at its end, so that the rest is
    /// appended and [`TempFile::commit`] renames the whole over `path`. Returns
    /// the temp with the bytes it already holds, or `None` when `path` has no
    /// partial (a partial that is not a regular file is removed and counts as
    /// none). Until the commit nothing shows under `path`; dropped, the temp is
    /// removed (a partial that proved bad is gone); cut again, it can be kept as
    /// the partial once more. To read the prefix (to hash it, say), open it with
    /// [`Backend::open_partial`] first: the temp is the same file. Default: `None`.
    fn create_temp_from_partial(&self, _path: &[u8]) -> Result<Option<Resumed>, AgentError> {
        Ok(None)
    }

    /// The partial files the listings found since the last call (the POSIX backend records
    /// them; default: none).
    fn take_listed_partials(&self) -> Vec<ListedPartial> {
        Vec::new()
    }

    /// Removes those of `partials` that nothing used since they were listed (same inode,
    /// size and mtime): at the end of a sync that did not send their paths, they are of no
    /// more use (their path may be gone from the master). Returns how many. Default: none.
    fn sweep_partials(&self, _partials: &[ListedPartial]) -> usize {
        0
    }

    /// The partial of `path`, opened read-only, with its size; `None` if there
    /// is none (or it is not a regular file). Paths are checked as for
    /// [`Backend::open_read`]. Default: `None`.
    fn open_partial(&self, _path: &[u8]) -> Result<Option<(File, u64)>, AgentError> {
        Ok(None)
    }

    /// Removes the partial of `path`, if any (fine if absent, or if its
    /// directory is). The sync calls this once `path` is synced by other means
    /// than a commit of a temp of `path` (which removes it itself), so that no
    /// stale partial is left; [`Backend::delete`] removes it too, and the
    /// listing removes partials older than [`PARTIAL_MAX_AGE`]. Default: nothing.
    fn remove_partial(&self, _path: &[u8]) -> Result<(), AgentError> {
        Ok(())
    }

    /// Opens the existing regular file `path` read-only, beneath the root with
    /// the same checks as [`Backend::open_read`], to use as a delta basis
    /// (positioned reads, `mmap`). Default: unsupported.
    fn open_basis(&self, path: &[u8]) -> Result<File, AgentError> {
        Err(AgentError::io(
            "open basis",
            path,
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this backend gives no delta basis",
            ),
        ))
    }

    /// Creates a directory (fine if it exists; a non-directory in the way is
    /// replaced) and applies `attrs` except the mtime.
    fn mkdir(&self, path: &[u8], attrs: &Attrs) -> Result<Applied, AgentError>;

    /// Removes a file, symlink or directory (`recursive`: with its contents);
    /// fine if absent.
    fn delete(&self, path: &[u8], recursive: bool) -> Result<(), AgentError>;

    /// Applies attributes (mode is ignored for symlinks).
    fn set_attrs(&self, path: &[u8], attrs: &Attrs) -> Result<Applied, AgentError>;

    /// Creates or atomically repoints a symlink.
    fn symlink(&self, path: &[u8], target: &[u8], attrs: &Attrs) -> Result<Applied, AgentError>;

    /// Makes `path` a hard link to `existing`, atomically replacing what is there.
    fn hard_link(&self, path: &[u8], existing: &[u8]) -> Result<(), AgentError>;

    /// The kind of `path` (`None` if absent), without following symlinks.
    fn kind(&self, path: &[u8]) -> Result<Option<FileKind>, AgentError>;

    /// Makes renames in directory `dir` durable.
    fn sync_dir(&self, dir: &[u8]) -> Result<(), AgentError>;

    /// Makes the bytes of every file of `files` durable, together (see
    /// [`TempFile::finish`]): the POSIX backend issues one `syncfs(2)` on the tree's file
    /// system (falling back to one `fdatasync` per file). Default: each file's
    /// [`FinishedTemp::sync_data`].
    fn make_durable(&self, files: &[Box<dyn FinishedTemp>]) -> Result<(), AgentError> {
        files.iter().try_for_each(|f| f.sync_data())
    }

    /// Something other than this backend may have replaced directories of the tree (a
    /// block's commit): forget the directories kept open. Default: nothing.
    fn dirs_changed(&self) {}

    /// Whether owner and group can be applied.
    fn can_chown(&self) -> bool;

    /// Called after each checksum request (e.g. to persist a cache now and then).
    fn checksums_done(&self) {}

    /// Called when a connection ends: persist whatever should survive.
    fn persist(&self) {}
}

/// A partial being resumed ([`Backend::create_temp_from_partial`]): the temp,
/// positioned at its end, and the bytes it already holds.
pub type Resumed = (Box<dyn TempFile>, u64);

/// What an attribute change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Owner/group were asked for but not applied (not root).
    pub owner_skipped: bool,
}

/// New content being written; see [`Backend::create_temp`].
pub trait TempFile: Write + Send {
    /// Makes the content durable, applies `attrs` and renames it over the
    /// destination (removing the destination's partial, if any).
    fn commit(self: Box<Self>, attrs: &Attrs) -> Result<Applied, AgentError>;

    /// The first half of a batched commit: the content is complete; applies `attrs` and
    /// closes the file, which stays under its temporary name. The caller makes a group of
    /// finished files durable at once ([`Backend::make_durable`]), then
    /// [`FinishedTemp::publish`]es each: so a file never shows under its real name before
    /// its bytes are durable, at the cost of one flush per group instead of one per file.
    /// Dropping the result unpublished removes the temporary file. Default: the whole
    /// [`TempFile::commit`] now (a finished file with nothing left to do).
    fn finish(
        self: Box<Self>,
        attrs: &Attrs,
    ) -> Result<(Box<dyn FinishedTemp>, Applied), AgentError> {
        let applied = self.commit(attrs)?;
        Ok((Box::new(Committed), applied))
    }

    /// The stream was cut mid-file: keeps what was written as the partial of the
    /// destination (made durable, renamed to its [`partial_name`], replacing an
    /// older partial) instead of removing it, so that the next sync can resume
    /// from it ([`Backend::create_temp_from_partial`]) or use it as a delta basis
    /// ([`Backend::open_partial`]). The destination itself is untouched. Returns
    /// whether a partial was kept (nothing is kept for an empty temp). Default:
    /// the temp is removed, nothing kept.
    fn keep_as_partial(self: Box<Self>) -> Result<bool, AgentError> {
        Ok(false)
    }

    /// The open file behind the temp, when it is one: a receiver may put the content in
    /// through a mapping of it rather than through [`Write`] (a patch is decoded straight
    /// into its file), then commits as usual. Default: none, everything goes through
    /// [`Write`].
    fn file(&self) -> Option<&std::fs::File> {
        None
    }
}

/// A received file whose content and attributes are complete ([`TempFile::finish`]), not
/// yet known durable nor in place.
pub trait FinishedTemp: Send {
    /// Makes its bytes durable on its own (when the group's flush could not).
    fn sync_data(&self) -> Result<(), AgentError>;

    /// Puts it in place: renames it over its destination (removing the destination's
    /// partial, if any). Call only once its bytes are durable ([`Backend::make_durable`]).
    fn publish(self: Box<Self>) -> Result<(), AgentError>;

    /// What the file is once in place, as `fstat` saw it when finished: inode, size and
    /// modification time (seconds, nanoseconds); a rename changes none of them. `None`
    /// when unknown.
    fn stat(&self) -> Option<FinishedStat> {
        None
    }
}

/// Inode, size and modification time of a finished file; see [`FinishedTemp::stat`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinishedStat {
    /// Inode number.
    pub inode: u64,
    /// Bytes.
    pub size: u64,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, u32),
}

/// A file committed whole by [`TempFile::finish`]'s default: nothing left to do.
struct Committed;

impl FinishedTemp for Committed {
    fn sync_data(&self) -> Result<(), AgentError> {
        Ok(())
    }
    fn publish(self: Box<Self>) -> Result<(), AgentError> {
        Ok(())
    }
}

/// The directory the last temp file was created in (or the last checksummed file was
/// in), kept open: received files and checksum requests come directory by directory, so
/// most need no path resolution of their parent. Forgotten whenever the backend deletes
/// or replaces anything that may be a directory, and on [`Backend::dirs_changed`].
#[derive(Default)]
struct LastDir {
    /// The generation of the tree's directories it was opened in, its path and descriptor.
    slot: Mutex<Option<OpenDir>>,
    generation: std::sync::atomic::AtomicU64,
}

/// A directory kept open: generation, tree-relative path, descriptor.
type OpenDir = (u64, Vec<u8>, Arc<OwnedFd>);

impl LastDir {
    fn forget(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *self.slot.lock().expect("poisoned") = None;
    }

    /// The parent directory of `path` (as [`Root::parent`] resolves it), with the final name.
    fn parent<'p>(
        &self,
        root: &Root,
        path: &'p [u8],
    ) -> Result<(Arc<OwnedFd>, &'p [u8]), AgentError> {
        path::check(path)?;
        let (dir, n) = path::split(path);
        let gen = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        if let Some((g, d, fd)) = &*self.slot.lock().expect("poisoned") {
            if *g == gen && d == dir && !path.is_empty() {
                return Ok((fd.clone(), n));
            }
        }
        let (fd, n) = root.parent(path)?;
        let fd = Arc::new(fd);
        *self.slot.lock().expect("poisoned") = Some((gen, dir.to_vec(), fd.clone()));
        Ok((fd, n))
    }
}

/// Files on a POSIX file system, beneath one root directory.
pub struct PosixBackend {
    root: Root,
    can_chown: bool,
    fsync: bool,
    live_temps: Arc<Mutex<HashSet<Vec<u8>>>>,
    sums: Option<SumCache>,
    partial_max_age: std::time::Duration,
    /// Partial files the listings found, until taken ([`Backend::take_listed_partials`]).
    listed_partials: Mutex<Vec<ListedPartial>>,
    last_dir: LastDir,
    partials: Arc<PartialWatch>,
}

/// Whether the tree may hold a partial file, so that a received file's rename removes its
/// stale partial only then: that removal looks up a name that is nearly never there, one
/// directory lookup in four of a small file's commit (6% of a receiving agent's CPU copying
/// 200,000 small files). Every event that may leave a partial moves `made` on; a listing
/// that excluded nothing and found none, with no such event meanwhile, records the count it
/// started at in `none_since`. At start (an earlier agent may have left some) the two differ.
#[derive(Debug)]
struct PartialWatch {
    made: std::sync::atomic::AtomicU64,
    none_since: std::sync::atomic::AtomicU64,
}

impl Default for PartialWatch {
    fn default() -> Self {
        PartialWatch {
            made: 1.into(),
            none_since: 0.into(),
        }
    }
}

impl PartialWatch {
    fn made_one(&self) {
        self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn may_exist(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.made.load(SeqCst) != self.none_since.load(SeqCst)
    }
}

/// The state of one listing's walk.
struct Walk<'a> {
    /// Attach the cached digests in this algorithm.
    cached: Option<&'a str>,
    /// Nothing was excluded and no partial file seen (so far).
    saw_all_and_no_partial: std::cell::Cell<bool>,
}

/// A partial file as a listing found it: its own path in the tree (`.fleetsync.partial.*`)
/// and what tells whether anything used it since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedPartial {
    /// Tree-relative path of the partial file itself.
    pub path: Vec<u8>,
    /// Inode, size and mtime when listed.
    pub ino: u64,
    /// Bytes.
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
}

fn listed(path: &[u8], st: &Stat) -> ListedPartial {
    ListedPartial {
        path: path.to_vec(),
        ino: st.st_ino as u64,
        size: st.st_size as u64,
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
    }
}

impl PosixBackend {
    /// Serves the tree at `root`.
    pub fn new(root: &Path) -> Result<Self, AgentError> {
        Ok(PosixBackend {
            root: Root::open(root)?,
            can_chown: rustix::process::geteuid().is_root(),
            fsync: true,
            live_temps: Arc::default(),
            sums: Some(match crate::sumcache::default_file(root) {
                Some(f) => SumCache::open(f),
                None => SumCache::in_memory(),
            }),
            partial_max_age: PARTIAL_MAX_AGE,
            listed_partials: Mutex::default(),
            last_dir: LastDir::default(),
            partials: Arc::default(),
        })
    }

    /// How old a partial file may grow before a listing removes it (default
    /// [`PARTIAL_MAX_AGE`]).
    pub fn with_partial_max_age(mut self, age: std::time::Duration) -> Self {
        self.partial_max_age = age;
        self
    }

    /// Whether checksums are cached (default: yes, in `~/.cache/fleetsync`;
    /// see [`crate::sumcache`]). Without the cache every request reads every file.
    pub fn with_checksum_cache(mut self, cache: bool) -> Self {
        if !cache {
            self.sums = None;
        }
        self
    }

    /// Keeps the checksum cache in `file` instead of the default place.
    pub fn with_checksum_cache_file(mut self, file: PathBuf) -> Self {
        self.sums = Some(SumCache::open(file));
        self
    }

    /// Whether received files are fsynced before the rename (default: yes).
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// [`Backend::list`]; `cached`: attach the cached digests in this algorithm.
    fn list_from_root(
        &self,
        decide: Decider<'_>,
        cached: Option<&str>,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let st = rustix::fs::fstat(self.root.fd()).map_err(|e| AgentError::io("stat", b"", e))?;
        let started = self.partials.made.load(std::sync::atomic::Ordering::SeqCst);
        sink(entry_of(b"", &st, None))?;
        let mut prefix = Vec::new();
        let walk = Walk {
            cached,
            saw_all_and_no_partial: true.into(),
        };
        self.walk(self.root.fd(), &mut prefix, decide, &walk, sink)?;
        // Only if no partial was made meanwhile; one made after this check moves `made`
        // past `started` again.
        if walk.saw_all_and_no_partial.get()
            && self.partials.made.load(std::sync::atomic::Ordering::SeqCst) == started
        {
            self.partials
                .none_since
                .store(started, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn walk(
        &self,
        dir: BorrowedFd<'_>,
        prefix: &mut Vec<u8>,
        decide: Decider<'_>,
        walk: &Walk<'_>,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        {
            let mut d = rustix::fs::Dir::read_from(dir)
                .map_err(|e| AgentError::io("read directory", prefix, e))?;
            while let Some(ent) = d.read() {
                let ent = ent.map_err(|e| AgentError::io("read directory", prefix, e))?;
                let n = ent.file_name().to_bytes();
                if n == b"." || n == b".." {
                    continue;
                }
                names.push(n.to_vec());
            }
        }
        names.sort_unstable();
        for n in names {
            let base = prefix.len();
            if base > 0 {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(&n);
            let r = self.walk_one(dir, &n, prefix, decide, walk, sink);
            prefix.truncate(base);
            r?;
        }
        Ok(())
    }

    fn walk_one(
        &self,
        dir: BorrowedFd<'_>,
        n: &[u8],
        rel: &mut Vec<u8>,
        decide: Decider<'_>,
        walk: &Walk<'_>,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        if rel.as_slice() == crate::journal::STAGING_DIR.as_bytes() {
            // The block journal's staging area: never listed, so never synced or deleted.
            return Ok(());
        }
        if n.starts_with(TEMP_PREFIX) {
            // Ours: in flight (skip) or left by a killed agent (kept as the
            // destination's partial, or removed).
            let live = self
                .live_temps
                .lock()
                .expect("poisoned")
                .contains(rel.as_slice());
            if !live {
                // It may become a partial file.
                walk.saw_all_and_no_partial.set(false);
                self.leftover_temp(dir, n, rel);
            }
            return Ok(());
        }
        if n.starts_with(PARTIAL_PREFIX) {
            // Kept for the next sync of its path; removed once stale (or if it is
            // not a regular file: not one of ours).
            match rustix::fs::statat(dir, name(n), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if kind_of(&st) != FileKind::File || self.is_stale(&st) => {
                    let _ = rustix::fs::unlinkat(dir, name(n), AtFlags::empty());
                }
                Ok(st) => {
                    walk.saw_all_and_no_partial.set(false);
                    self.listed_partials
                        .lock()
                        .expect("poisoned")
                        .push(listed(rel, &st))
                }
                Err(_) => {}
            }
            return Ok(());
        }
        let st = match rustix::fs::statat(dir, name(n), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()), // vanished meanwhile
            Err(e) => return Err(AgentError::io("stat", rel, e)),
        };
        let kind = kind_of(&st);
        let is_dir = kind == FileKind::Dir;
        match decide(rel, is_dir) {
            Decision::Include => {}
            Decision::Exclude | Decision::ExcludePrune => {
                walk.saw_all_and_no_partial.set(false);
                return Ok(());
            }
        }
        let link_target = if kind == FileKind::Symlink {
            Some(
                rustix::fs::readlinkat(dir, name(n), Vec::new())
                    .map_err(|e| AgentError::io("readlink", rel, e))?
                    .into_bytes(),
            )
        } else {
            None
        };
        let mut entry = entry_of(rel, &st, link_target);
        if let (Some(alg), Some(c), FileKind::File) = (walk.cached, &self.sums, kind) {
            // The same key a checksum request answered from the cache would stat for.
            entry.digest = c.get(alg, &file_key(&st));
        }
        sink(entry)?;
        if is_dir {
            let sub = match open_subdir(dir, n) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(AgentError::io("open directory", rel, e)),
            };
            self.walk(sub.as_fd(), rel, decide, walk, sink)?;
        }
        Ok(())
    }

    /// A temp file `n` no transfer of this agent owns: left by an agent killed
    /// mid-file. A regular file of [`LEFTOVER_PARTIAL_MIN`] bytes or more, with a
    /// destination key in its name ([`temp_key`]), becomes that destination's
    /// partial file unless the destination has a newer partial; anything else
    /// is removed. Its bytes are a prefix of what the master was sending (the
    /// stream is written in order) or, after a crash of the machine, possibly
    /// not even that: the master hashes its own prefix and appends only when
    /// the partial's digest matches, so a bad one costs a check, not a bad file.
    fn leftover_temp(&self, dir: BorrowedFd<'_>, n: &[u8], rel: &[u8]) {
        let remove = || {
            let _ = rustix::fs::unlinkat(dir, name(n), AtFlags::empty());
        };
        let Some(key) = temp_key(n) else {
            return remove();
        };
        let st = match rustix::fs::statat(dir, name(n), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(_) => return remove(),
        };
        // One link only: a hard link's temp (it carries no key anyway) or a file
        // linked elsewhere must never be appended to.
        let worth = kind_of(&st) == FileKind::File
            && st.st_nlink == 1
            && st.st_size as u64 >= LEFTOVER_PARTIAL_MIN
            && !self.is_stale(&st);
        if !worth {
            return remove();
        }
        let mut part = PARTIAL_PREFIX.to_vec();
        part.extend_from_slice(key);
        if let Ok(old) = rustix::fs::statat(dir, name(&part), AtFlags::SYMLINK_NOFOLLOW) {
            let newer = kind_of(&old) == FileKind::File
                && (old.st_mtime as i64, old.st_mtime_nsec as i64)
                    > (st.st_mtime as i64, st.st_mtime_nsec as i64);
            if newer {
                return remove();
            }
        }
        self.partials.made_one();
        match rustix::fs::renameat(dir, name(n), dir, name(&part)) {
            Ok(()) => tracing::debug!(
                "{}: kept the {} bytes a killed transfer left as the partial file",
                crate::error::show(rel),
                st.st_size,
            ),
            Err(_) => remove(),
        }
    }

    /// Whether a partial with this `stat` is older than the limit.
    fn is_stale(&self, st: &Stat) -> bool {
        let mtime = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::new(
                (st.st_mtime as i64).max(0) as u64,
                st.st_mtime_nsec as u32,
            ))
            .unwrap_or(std::time::UNIX_EPOCH);
        mtime.elapsed().is_ok_and(|age| age > self.partial_max_age)
    }

    /// Opens the regular file `n` in `dir` (a partial) for `flags`, never following a
    /// symlink nor opening a device or FIFO: `None` if absent or not a regular file.
    fn open_partial_at(
        &self,
        dir: BorrowedFd<'_>,
        n: &[u8],
        rel: &[u8],
        flags: OFlags,
    ) -> Result<Option<(File, u64)>, AgentError> {
        match self.stat_at(dir, n, rel)? {
            None => return Ok(None),
            Some(st) if kind_of(&st) != FileKind::File => return Ok(None),
            Some(_) => {}
        }
        let fd = match rustix::fs::openat(
            dir,
            name(n),
            flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // Gone, or swapped for a symlink or a FIFO since the stat.
            Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::NXIO) => return Ok(None),
            Err(e) => return Err(AgentError::io("open", rel, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| AgentError::io("stat", rel, e))?;
        if kind_of(&st) != FileKind::File {
            return Ok(None);
        }
        Ok(Some((File::from(fd), st.st_size as u64)))
    }

    /// Opens the regular file `path` for reading, with its `fstat`; anything else is an
    /// error.
    fn open_regular(&self, path: &[u8]) -> Result<(OwnedFd, Stat), AgentError> {
        let fd = self.root.open_beneath(path, OFlags::RDONLY)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| AgentError::io("stat", path, e))?;
        if kind_of(&st) != FileKind::File {
            return Err(AgentError::io(
                "read",
                path,
                std::io::Error::other(format!("not a regular file ({})", kind_of(&st).name())),
            ));
        }
        Ok((fd, st))
    }

    fn stat_at(
        &self,
        dir: BorrowedFd<'_>,
        n: &[u8],
        rel: &[u8],
    ) -> Result<Option<Stat>, AgentError> {
        match rustix::fs::statat(dir, name(n), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(AgentError::io("stat", rel, e)),
        }
    }

    fn apply_attrs_at(
        &self,
        dir: BorrowedFd<'_>,
        n: &[u8],
        rel: &[u8],
        attrs: &Attrs,
        kind: FileKind,
    ) -> Result<Applied, AgentError> {
        let mut applied = Applied::default();
        if let Some((uid, gid)) = attrs.owner {
            if self.can_chown {
                let (uid, gid) = owner_ids(uid, gid);
                rustix::fs::chownat(dir, name(n), uid, gid, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| AgentError::io("chown", rel, e))?;
            } else {
                applied.owner_skipped = true;
            }
        }
        if let (Some(mode), false) = (attrs.mode, kind == FileKind::Symlink) {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            // chmod through a descriptor opened with O_NOFOLLOW, so that a file
            // swapped for a symlink meanwhile is never followed out of the root.
            let opened = if kind.is_special() {
                // Never open devices or FIFOs (opening can have side effects).
                Err(Errno::PERM)
            } else {
                rustix::fs::openat(
                    dir,
                    name(n),
                    OFlags::RDONLY
                        | OFlags::NOFOLLOW
                        | OFlags::NONBLOCK
                        | OFlags::CLOEXEC
                        | OFlags::NOCTTY,
                    Mode::empty(),
                )
            };
            match opened {
                Ok(fd) => rustix::fs::fchmod(&fd, mode),
                // Unreadable (not root): fall back to the path, just checked not to be a symlink.
                Err(Errno::ACCESS) | Err(Errno::PERM) => {
                    rustix::fs::chmodat(dir, name(n), mode, AtFlags::empty())
                }
                Err(e) => Err(e),
            }
            .map_err(|e| AgentError::io("chmod", rel, e))?;
        }
        if let Some((sec, nsec)) = attrs.mtime {
            rustix::fs::utimensat(dir, name(n), &times(sec, nsec), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| AgentError::io("set mtime", rel, e))?;
        }
        Ok(applied)
    }

    fn apply_attrs_fd(
        &self,
        fd: BorrowedFd<'_>,
        rel: &[u8],
        attrs: &Attrs,
    ) -> Result<Applied, AgentError> {
        let mut applied = Applied::default();
        if let Some((uid, gid)) = attrs.owner {
            if self.can_chown {
                let (uid, gid) = owner_ids(uid, gid);
                rustix::fs::fchown(fd, uid, gid).map_err(|e| AgentError::io("chown", rel, e))?;
            } else {
                applied.owner_skipped = true;
            }
        }
        if let Some(mode) = attrs.mode {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|e| AgentError::io("chmod", rel, e))?;
        }
        if let Some((sec, nsec)) = attrs.mtime {
            rustix::fs::futimens(fd, &times(sec, nsec))
                .map_err(|e| AgentError::io("set mtime", rel, e))?;
        }
        Ok(applied)
    }

    /// A fresh temp name in directory `parent` (name, relative path): for a
    /// file's content, carrying its destination `dest` ([`TEMP_PREFIX`]).
    fn temp_name(&self, parent: &[u8], dest: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
        let mut r = [0u8; TEMP_RANDOM_HEX / 2];
        getrandom::getrandom(&mut r).expect("OS random number generator failed");
        let mut n = TEMP_PREFIX.to_vec();
        for b in r {
            n.extend_from_slice(format!("{b:02x}").as_bytes());
        }
        if let Some(d) = dest {
            n.push(b'.');
            n.extend_from_slice(&name_key(d));
        }
        let mut rel = parent.to_vec();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&n);
        (n, rel)
    }

    /// Removes what is at `n` in `dir` if it is a directory (so a rename can replace it).
    fn clear_dir_in_the_way(
        &self,
        dir: BorrowedFd<'_>,
        n: &[u8],
        rel: &[u8],
    ) -> Result<(), AgentError> {
        if let Some(st) = self.stat_at(dir, n, rel)? {
            if kind_of(&st) == FileKind::Dir {
                self.last_dir.forget();
                remove_tree(dir, n, rel)?;
            }
        }
        Ok(())
    }
}

/// The checksum cache's key of a file with this `stat`.
fn file_key(st: &Stat) -> FileKey {
    FileKey {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        size: st.st_size as u64,
        mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime as i64, st.st_ctime_nsec as u32),
    }
}

fn times(sec: i64, nsec: u32) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: sec,
            tv_nsec: i64::from(nsec.min(999_999_999)) as _,
        },
    }
}

/// The kind of a `stat` result.
pub fn kind_of(st: &Stat) -> FileKind {
    match FileType::from_raw_mode(st.st_mode as _) {
        FileType::RegularFile => FileKind::File,
        FileType::Directory => FileKind::Dir,
        FileType::Symlink => FileKind::Symlink,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

/// A file entry from a `stat` result.
pub fn entry_of(rel: &[u8], st: &Stat, link_target: Option<Vec<u8>>) -> FileEntry {
    FileEntry {
        path: rel.to_vec(),
        kind: kind_of(st),
        mode: (st.st_mode as u32) & 0o7777,
        uid: st.st_uid as u32,
        gid: st.st_gid as u32,
        inode: st.st_ino as u64,
        dev: st.st_dev as u64,
        nlink: st.st_nlink as u64,
        size: (st.st_size as i64).max(0) as u64,
        mtime_sec: st.st_mtime as i64,
        mtime_nsec: st.st_mtime_nsec as u32,
        link_target,
        rdev: st.st_rdev as u64,
        digest: None,
    }
}

/// The owner and group to give a file, as `chown` takes them.
/// What of `attrs` the file of `st` does not have yet: a chown, chmod or utimensat to the
/// value a file already has is a syscall for nothing, and most attribute fixes of a release
/// update change nothing but the mtime (3 syscalls of 17 per fixed file). A chown that does
/// happen may clear the set-user/group-ID bits, so the mode is applied after one.
fn still_to_apply(attrs: &Attrs, st: &Stat) -> Attrs {
    let mut a = *attrs;
    if a.owner == Some((st.st_uid, st.st_gid)) {
        a.owner = None;
    }
    if a.owner.is_none() && a.mode.is_some_and(|m| m & 0o7777 == st.st_mode & 0o7777) {
        a.mode = None;
    }
    if a.mtime == Some((st.st_mtime as i64, st.st_mtime_nsec as u32)) {
        a.mtime = None;
    }
    a
}

pub(crate) fn owner_ids(uid: u32, gid: u32) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
}

/// Opens the directory `n` in `dir` for reading its entries; a symlink there is refused
/// (`ELOOP`), not followed.
fn open_subdir(dir: BorrowedFd<'_>, n: &[u8]) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name(n),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `n` in `dir` and everything beneath it, never following symlinks.
fn remove_tree(dir: BorrowedFd<'_>, n: &[u8], rel: &[u8]) -> Result<(), AgentError> {
    let sub = match open_subdir(dir, n) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
            return rustix::fs::unlinkat(dir, name(n), AtFlags::empty())
                .map_err(|e| AgentError::io("unlink", rel, e));
        }
        Err(e) => return Err(AgentError::io("open directory", rel, e)),
    };
    let mut names = Vec::new();
    {
        let mut d = rustix::fs::Dir::read_from(sub.as_fd())
            .map_err(|e| AgentError::io("read directory", rel, e))?;
        while let Some(ent) = d.read() {
            let ent = ent.map_err(|e| AgentError::io("read directory", rel, e))?;
            let c = ent.file_name().to_bytes();
            if c != b"." && c != b".." {
                names.push((c.to_vec(), ent.file_type()));
            }
        }
    }
    for (c, ft) in names {
        let mut child = rel.to_vec();
        child.push(b'/');
        child.extend_from_slice(&c);
        let is_dir = match ft {
            FileType::Directory => true,
            FileType::Unknown => {
                rustix::fs::statat(sub.as_fd(), name(&c), AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| kind_of(&st) == FileKind::Dir)
                    .unwrap_or(false)
            }
            _ => false,
        };
        if is_dir {
            remove_tree(sub.as_fd(), &c, &child)?;
        } else {
            match rustix::fs::unlinkat(sub.as_fd(), name(&c), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(AgentError::io("unlink", &child, e)),
            }
        }
    }
    match rustix::fs::unlinkat(dir, name(n), AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(AgentError::io("rmdir", rel, e)),
    }
}

/// The parent directory of `path` (checked and resolved as [`Root::parent`] does) with the
/// final name; `None` if a directory on the way does not exist.
fn parent_if_exists<'p>(
    root: &Root,
    path: &'p [u8],
) -> Result<Option<(OwnedFd, &'p [u8])>, AgentError> {
    match root.parent(path) {
        Ok(x) => Ok(Some(x)),
        Err(AgentError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Marks a temporary name as in use while it exists, so that a listing
/// running meanwhile does not take it for a leftover and remove it.
struct LiveTemp<'a> {
    set: &'a Mutex<HashSet<Vec<u8>>>,
    rel: Vec<u8>,
}

impl<'a> LiveTemp<'a> {
    fn new(set: &'a Mutex<HashSet<Vec<u8>>>, rel: &[u8]) -> Self {
        set.lock().expect("poisoned").insert(rel.to_vec());
        LiveTemp {
            set,
            rel: rel.to_vec(),
        }
    }
}

impl Drop for LiveTemp<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("poisoned").remove(&self.rel);
    }
}

struct PosixTemp {
    file: Option<File>,
    parent: Arc<OwnedFd>,
    tmp: Vec<u8>,
    tmp_rel: Vec<u8>,
    dest: Vec<u8>,
    dest_rel: Vec<u8>,
    fsync: bool,
    can_chown: bool,
    live: Arc<Mutex<HashSet<Vec<u8>>>>,
    partials: Arc<PartialWatch>,
}

impl Write for PosixTemp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("open until commit").write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file
            .as_mut()
            .expect("open until commit")
            .write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PosixTemp {
    /// Applies `attrs` to the open temp file.
    fn apply_attrs(&self, file: &File, attrs: &Attrs) -> Result<Applied, AgentError> {
        let rel = &self.dest_rel;
        let mut applied = Applied::default();
        if let Some((uid, gid)) = attrs.owner {
            if self.can_chown {
                rustix::fs::fchown(
                    file,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(|e| AgentError::io("chown", rel, e))?;
            } else {
                applied.owner_skipped = true;
            }
        }
        if let Some(mode) = attrs.mode {
            rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777))
                .map_err(|e| AgentError::io("chmod", rel, e))?;
        }
        if let Some((sec, nsec)) = attrs.mtime {
            rustix::fs::futimens(file, &times(sec, nsec))
                .map_err(|e| AgentError::io("set mtime", rel, e))?;
        }
        Ok(applied)
    }

    /// Renames the (closed) temp file over its destination and removes the destination's
    /// partial.
    fn rename_into_place(&mut self) -> Result<(), AgentError> {
        let r = rustix::fs::renameat(
            &self.parent,
            name(&self.tmp),
            &self.parent,
            name(&self.dest),
        );
        if let Err(e) = r {
            return Err(AgentError::io("rename", &self.dest_rel, e)); // Drop removes the temp file
        }
        self.live.lock().expect("poisoned").remove(&self.tmp_rel);
        self.tmp.clear();
        // Whatever partial the destination had is stale now.
        if self.partials.may_exist() {
            let _ = rustix::fs::unlinkat(
                &self.parent,
                name(&partial_name(&self.dest)),
                AtFlags::empty(),
            );
        }
        Ok(())
    }
}

impl TempFile for PosixTemp {
    fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    fn commit(mut self: Box<Self>, attrs: &Attrs) -> Result<Applied, AgentError> {
        let file = self.file.take().expect("open until commit");
        if self.fsync {
            file.sync_data()
                .map_err(|e| AgentError::io("fsync", &self.dest_rel, e))?;
        }
        let applied = self.apply_attrs(&file, attrs)?;
        drop(file);
        self.rename_into_place()?;
        Ok(applied)
    }

    fn finish(
        mut self: Box<Self>,
        attrs: &Attrs,
    ) -> Result<(Box<dyn FinishedTemp>, Applied), AgentError> {
        let file = self.file.take().expect("open until commit");
        let applied = self.apply_attrs(&file, attrs)?;
        let st = rustix::fs::fstat(&file).map_err(|e| AgentError::io("stat", &self.dest_rel, e))?;
        // Closed now: a group of thousands of finished files holds no descriptor each
        // (their directory's is shared).
        drop(file);
        let stat = FinishedStat {
            inode: st.st_ino as u64,
            size: (st.st_size as i64).max(0) as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
        };
        Ok((Box::new(PosixFinished { temp: *self, stat }), applied))
    }

    fn keep_as_partial(mut self: Box<Self>) -> Result<bool, AgentError> {
        let file = self.file.take().expect("open until commit");
        let len = file
            .metadata()
            .map_err(|e| AgentError::io("stat", &self.tmp_rel, e))?
            .len();
        if len == 0 {
            return Ok(false); // Drop removes the temp file
        }
        if self.fsync {
            file.sync_data()
                .map_err(|e| AgentError::io("fsync", &self.tmp_rel, e))?;
        }
        drop(file);
        let part = partial_name(&self.dest);
        self.partials.made_one();
        rustix::fs::renameat(&self.parent, name(&self.tmp), &self.parent, name(&part))
            .map_err(|e| AgentError::io("rename", &self.dest_rel, e))?;
        self.live.lock().expect("poisoned").remove(&self.tmp_rel);
        self.tmp.clear();
        if self.fsync {
            rustix::fs::fsync(&self.parent)
                .map_err(|e| AgentError::io("fsync", &self.dest_rel, e))?;
        }
        Ok(true)
    }
}

/// A finished [`PosixTemp`]: closed, still under its temporary name.
struct PosixFinished {
    temp: PosixTemp,
    stat: FinishedStat,
}

impl FinishedTemp for PosixFinished {
    fn sync_data(&self) -> Result<(), AgentError> {
        let t = &self.temp;
        if !t.fsync {
            return Ok(());
        }
        // Reopened by name in its directory (never following a symlink): the descriptor
        // was closed at finish.
        let fd = rustix::fs::openat(
            &t.parent,
            name(&t.tmp),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| AgentError::io("open", &t.tmp_rel, e))?;
        rustix::fs::fdatasync(&fd).map_err(|e| AgentError::io("fsync", &t.dest_rel, e))
    }

    fn publish(mut self: Box<Self>) -> Result<(), AgentError> {
        self.temp.rename_into_place()
    }

    fn stat(&self) -> Option<FinishedStat> {
        Some(self.stat)
    }
}

impl Drop for PosixTemp {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            self.file.take();
            let _ = rustix::fs::unlinkat(&self.parent, name(&self.tmp), AtFlags::empty());
            self.live.lock().expect("poisoned").remove(&self.tmp_rel);
        }
    }
}

impl PosixBackend {
    /// Hashes an opened regular file (`st` is its `fstat`).
    fn hash_fd(
        &self,
        fd: OwnedFd,
        // The engine takes the size from its own `fstat` of `fd`.
        _st: &Stat,
        path: &[u8],
        alg: &AlgorithmInfo,
    ) -> Result<(Vec<u8>, u64), AgentError> {
        // Hash the descriptor resolved safely beneath the root: no new path
        // resolution. The engine hashes up to the size it finds now (a file
        // that shrinks meanwhile is an error) and splits big files into
        // parallel chunks.
        let file = File::from(fd);
        let h = fleetsync_engine::hash_open_file(
            &file,
            std::slice::from_ref(alg),
            &fleetsync_engine::HashOptions::default(),
        )
        .map_err(|e| match e {
            fleetsync_engine::Error::Io { source, .. } => AgentError::io("read", path, source),
            e => AgentError::io("read", path, std::io::Error::other(e.to_string())),
        })?;
        let digest = h
            .digests
            .first()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default();
        Ok((digest, h.size))
    }
}

impl Backend for PosixBackend {
    fn list(
        &self,
        decide: Decider<'_>,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        self.list_from_root(decide, None, sink)
    }

    fn list_with_digests(
        &self,
        decide: Decider<'_>,
        algorithm: &str,
        sink: &mut dyn FnMut(FileEntry) -> Result<(), AgentError>,
    ) -> Result<(), AgentError> {
        let cached = (!algorithm.is_empty()).then_some(algorithm);
        self.list_from_root(decide, cached, sink)
    }

    fn open_read(&self, path: &[u8]) -> Result<(Box<dyn Read + Send>, FileEntry), AgentError> {
        let (fd, st) = self.open_regular(path)?;
        Ok((Box::new(File::from(fd)), entry_of(path, &st, None)))
    }

    fn checksum(
        &self,
        path: &[u8],
        alg: &AlgorithmInfo,
        fresh: bool,
    ) -> Result<(Vec<u8>, u64), AgentError> {
        if let (false, Some(c)) = (fresh, &self.sums) {
            // The cache's key from a stat of the name in its directory (kept open from the
            // previous file): a hit opens and reads nothing (one syscall instead of the
            // open, fstat and close below).
            if let Ok((dir, n)) = self.last_dir.parent(&self.root, path) {
                if let Ok(st) = rustix::fs::statat(&*dir, name(n), AtFlags::SYMLINK_NOFOLLOW) {
                    if kind_of(&st) == FileKind::File {
                        let key = file_key(&st);
                        if let Some(d) = c.get(&alg.name, &key) {
                            return Ok((d, key.size));
                        }
                    }
                }
            }
        }
        let (fd, st) = self.open_regular(path)?;
        let key = FileKey {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as u32),
        };
        if let Some(d) = (!fresh)
            .then_some(self.sums.as_ref())
            .flatten()
            .and_then(|c| c.get(&alg.name, &key))
        {
            return Ok((d, key.size));
        }
        let hashed_at = std::time::SystemTime::now();
        let (digest, size) = self.hash_fd(fd, &st, path, alg)?;
        if let Some(c) = &self.sums {
            if size == key.size {
                c.put(&alg.name, key, &digest, hashed_at);
            }
        }
        Ok((digest, size))
    }

    fn checksums_done(&self) {
        if let Some(c) = &self.sums {
            if let Err(e) = c.save_if_due(std::time::Duration::from_secs(5)) {
                tracing::warn!("saving the checksum cache: {e}");
            }
        }
    }

    fn persist(&self) {
        if let Some(c) = &self.sums {
            if let Err(e) = c.save() {
                tracing::warn!("saving the checksum cache: {e}");
            }
        }
    }

    fn create_temp(&self, path: &[u8]) -> Result<Box<dyn TempFile>, AgentError> {
        let (parent, n) = self.last_dir.parent(&self.root, path)?;
        let (parent_rel, _) = path::split(path);
        let (tmp, tmp_rel) = self.temp_name(parent_rel, Some(n));
        // Live before it exists, so that a listing meanwhile leaves it alone.
        self.live_temps
            .lock()
            .expect("poisoned")
            .insert(tmp_rel.clone());
        // Read and write: a shared writable mapping of it (a patch decoded in place, see
        // `TempFile::file`) needs both.
        let fd = rustix::fs::openat(
            &parent,
            name(&tmp),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| {
            self.live_temps.lock().expect("poisoned").remove(&tmp_rel);
            AgentError::io("create", &tmp_rel, e)
        })?;
        Ok(Box::new(PosixTemp {
            file: Some(File::from(fd)),
            parent,
            tmp,
            tmp_rel,
            dest: n.to_vec(),
            dest_rel: path.to_vec(),
            fsync: self.fsync,
            can_chown: self.can_chown,
            live: self.live_temps.clone(),
            partials: self.partials.clone(),
        }))
    }

    fn create_temp_from_partial(&self, path: &[u8]) -> Result<Option<Resumed>, AgentError> {
        let Some((parent, n)) = parent_if_exists(&self.root, path)? else {
            return Ok(None);
        };
        let part = partial_name(n);
        match self.stat_at(parent.as_fd(), &part, path)? {
            None => return Ok(None),
            Some(st) if kind_of(&st) != FileKind::File => {
                let _ = rustix::fs::unlinkat(&parent, name(&part), AtFlags::empty());
                return Ok(None);
            }
            Some(_) => {}
        }
        let (parent_rel, _) = path::split(path);
        let (tmp, tmp_rel) = self.temp_name(parent_rel, Some(n));
        // Live before it has the temp name, so that a listing leaves it alone.
        self.live_temps
            .lock()
            .expect("poisoned")
            .insert(tmp_rel.clone());
        let mut temp = PosixTemp {
            file: None,
            parent: Arc::new(parent),
            tmp,
            tmp_rel,
            dest: n.to_vec(),
            dest_rel: path.to_vec(),
            fsync: self.fsync,
            can_chown: self.can_chown,
            live: self.live_temps.clone(),
            partials: self.partials.clone(),
        };
        match rustix::fs::renameat(&temp.parent, name(&part), &temp.parent, name(&temp.tmp)) {
            Ok(()) => {}
            Err(Errno::NOENT) => {
                temp.tmp.clear(); // nothing to remove
                self.live_temps
                    .lock()
                    .expect("poisoned")
                    .remove(&temp.tmp_rel);
                return Ok(None);
            }
            Err(e) => {
                temp.tmp.clear();
                self.live_temps
                    .lock()
                    .expect("poisoned")
                    .remove(&temp.tmp_rel);
                return Err(AgentError::io("rename", path, e));
            }
        }
        // Dropping `temp` from here on removes the file under its temp name.
        let opened = self.open_partial_at(
            temp.parent.as_fd(),
            &temp.tmp.clone(),
            &temp.tmp_rel.clone(),
            OFlags::WRONLY,
        )?;
        let Some((mut file, len)) = opened else {
            return Ok(None); // swapped for something else meanwhile: dropped
        };
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| AgentError::io("seek", path, e))?;
        temp.file = Some(file);
        Ok(Some((Box::new(temp), len)))
    }

    fn open_partial(&self, path: &[u8]) -> Result<Option<(File, u64)>, AgentError> {
        let Some((parent, n)) = parent_if_exists(&self.root, path)? else {
            return Ok(None);
        };
        self.open_partial_at(parent.as_fd(), &partial_name(n), path, OFlags::RDONLY)
    }

    fn remove_partial(&self, path: &[u8]) -> Result<(), AgentError> {
        let Some((parent, n)) = parent_if_exists(&self.root, path)? else {
            return Ok(());
        };
        match rustix::fs::unlinkat(&parent, name(&partial_name(n)), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(AgentError::io("unlink", path, e)),
        }
    }

    fn open_basis(&self, path: &[u8]) -> Result<File, AgentError> {
        Ok(File::from(self.open_regular(path)?.0))
    }

    fn take_listed_partials(&self) -> Vec<ListedPartial> {
        std::mem::take(&mut *self.listed_partials.lock().expect("poisoned"))
    }

    fn sweep_partials(&self, partials: &[ListedPartial]) -> usize {
        let mut n = 0;
        for p in partials {
            let Ok((parent, name_)) = self.root.parent(&p.path) else {
                continue;
            };
            let unchanged = rustix::fs::statat(&parent, name(name_), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| kind_of(&st) == FileKind::File && listed(&p.path, &st) == *p);
            if !unchanged {
                continue;
            }
            // The sweep runs when the sync is over, after its directory times were set:
            // removing our own file must not change its directory's modification time.
            let dir_mtime = rustix::fs::fstat(&parent).ok();
            if rustix::fs::unlinkat(&parent, name(name_), AtFlags::empty()).is_ok() {
                n += 1;
                if let Some(st) = dir_mtime {
                    let _ = rustix::fs::futimens(
                        &parent,
                        &times(st.st_mtime as i64, st.st_mtime_nsec as u32),
                    );
                }
            }
        }
        n
    }

    fn mkdir(&self, path: &[u8], attrs: &Attrs) -> Result<Applied, AgentError> {
        let attrs = Attrs {
            mtime: None,
            ..*attrs
        };
        if path.is_empty() {
            let fd = self.root.open_dir(b"")?;
            return self.apply_attrs_fd(fd.as_fd(), path, &attrs);
        }
        let (parent, n) = self.root.parent(path)?;
        let mode = Mode::from_raw_mode(attrs.mode.unwrap_or(0o755) & 0o7777);
        match rustix::fs::mkdirat(&parent, name(n), mode) {
            Ok(()) => {}
            Err(Errno::EXIST) => {
                let st = self.stat_at(parent.as_fd(), n, path)?;
                if st.map(|s| kind_of(&s)) != Some(FileKind::Dir) {
                    rustix::fs::unlinkat(&parent, name(n), AtFlags::empty())
                        .map_err(|e| AgentError::io("unlink", path, e))?;
                    rustix::fs::mkdirat(&parent, name(n), mode)
                        .map_err(|e| AgentError::io("mkdir", path, e))?;
                }
            }
            Err(e) => return Err(AgentError::io("mkdir", path, e)),
        }
        self.apply_attrs_at(parent.as_fd(), n, path, &attrs, FileKind::Dir)
    }

    fn delete(&self, path: &[u8], recursive: bool) -> Result<(), AgentError> {
        self.last_dir.forget();
        let (parent, n) = self.root.parent(path)?;
        // A partial of a deleted path is stale.
        let _ = rustix::fs::unlinkat(&parent, name(&partial_name(n)), AtFlags::empty());
        let Some(st) = self.stat_at(parent.as_fd(), n, path)? else {
            return Ok(());
        };
        if kind_of(&st) == FileKind::Dir {
            if recursive {
                remove_tree(parent.as_fd(), n, path)
            } else {
                rustix::fs::unlinkat(&parent, name(n), AtFlags::REMOVEDIR)
                    .map_err(|e| AgentError::io("rmdir", path, e))
            }
        } else {
            match rustix::fs::unlinkat(&parent, name(n), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(AgentError::io("unlink", path, e)),
            }
        }
    }

    fn set_attrs(&self, path: &[u8], attrs: &Attrs) -> Result<Applied, AgentError> {
        if path.is_empty() {
            let fd = self.root.open_dir(b"")?;
            return self.apply_attrs_fd(fd.as_fd(), path, attrs);
        }
        let (parent, n) = self.last_dir.parent(&self.root, path)?;
        let st = self
            .stat_at(parent.as_fd(), n, path)?
            .ok_or_else(|| AgentError::io("stat", path, Errno::NOENT))?;
        let attrs = still_to_apply(attrs, &st);
        self.apply_attrs_at(parent.as_fd(), n, path, &attrs, kind_of(&st))
    }

    fn symlink(&self, path: &[u8], target: &[u8], attrs: &Attrs) -> Result<Applied, AgentError> {
        if target.is_empty() || target.contains(&0) {
            return Err(AgentError::UnsafePath {
                path: path.to_vec(),
                reason: "empty symlink target or NUL in it",
            });
        }
        let (parent, n) = self.root.parent(path)?;
        let (parent_rel, _) = path::split(path);
        let (tmp, tmp_rel) = self.temp_name(parent_rel, None);
        let _live = LiveTemp::new(&self.live_temps, &tmp_rel);
        rustix::fs::symlinkat(name(target), &parent, name(&tmp))
            .map_err(|e| AgentError::io("symlink", &tmp_rel, e))?;
        let result = (|| {
            let applied = self.apply_attrs_at(
                parent.as_fd(),
                &tmp,
                path,
                &Attrs {
                    mode: None,
                    ..*attrs
                },
                FileKind::Symlink,
            )?;
            self.clear_dir_in_the_way(parent.as_fd(), n, path)?;
            rustix::fs::renameat(&parent, name(&tmp), &parent, name(n))
                .map_err(|e| AgentError::io("rename", path, e))?;
            Ok(applied)
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&parent, name(&tmp), AtFlags::empty());
        }
        result
    }

    fn hard_link(&self, path: &[u8], existing: &[u8]) -> Result<(), AgentError> {
        let (eparent, en) = self.root.parent(existing)?;
        let est = self
            .stat_at(eparent.as_fd(), en, existing)?
            .ok_or_else(|| AgentError::io("link", existing, Errno::NOENT))?;
        if kind_of(&est) == FileKind::Dir {
            return Err(AgentError::io("link", existing, Errno::ISDIR));
        }
        let (parent, n) = self.root.parent(path)?;
        if let Some(st) = self.stat_at(parent.as_fd(), n, path)? {
            if st.st_ino == est.st_ino && st.st_dev == est.st_dev {
                return Ok(()); // already that link
            }
        }
        let (parent_rel, _) = path::split(path);
        let (tmp, tmp_rel) = self.temp_name(parent_rel, None);
        let _live = LiveTemp::new(&self.live_temps, &tmp_rel);
        rustix::fs::linkat(&eparent, name(en), &parent, name(&tmp), AtFlags::empty())
            .map_err(|e| AgentError::io("link", &tmp_rel, e))?;
        let result = (|| {
            self.clear_dir_in_the_way(parent.as_fd(), n, path)?;
            rustix::fs::renameat(&parent, name(&tmp), &parent, name(n))
                .map_err(|e| AgentError::io("rename", path, e))
        })();
        // rename() between two links of one inode does nothing: remove the temp name.
        let _ = rustix::fs::unlinkat(&parent, name(&tmp), AtFlags::empty());
        result
    }

    fn kind(&self, path: &[u8]) -> Result<Option<FileKind>, AgentError> {
        if path.is_empty() {
            return Ok(Some(FileKind::Dir));
        }
        let (parent, n) = self.last_dir.parent(&self.root, path)?;
        Ok(self.stat_at(parent.as_fd(), n, path)?.map(|s| kind_of(&s)))
    }

    fn sync_dir(&self, dir: &[u8]) -> Result<(), AgentError> {
        if !self.fsync {
            return Ok(());
        }
        let fd = self.root.open_dir(dir)?;
        rustix::fs::fsync(&fd).map_err(|e| AgentError::io("fsync", dir, e))
    }

    fn make_durable(&self, files: &[Box<dyn FinishedTemp>]) -> Result<(), AgentError> {
        if !self.fsync || files.is_empty() {
            return Ok(());
        }
        // One syncfs(2) for the group: measured on ext4 (benches/small_files.sh, 200,000
        // files of 0..49 bytes) it beats one fdatasync per file, issued in sequence or from
        // 8 threads, and sync_file_range + one fsync (which is no durability guarantee).
        match rustix::fs::syncfs(self.root.fd()) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!("syncfs: {e}; one fdatasync per file instead");
                files.iter().try_for_each(|f| f.sync_data())
            }
        }
    }

    fn dirs_changed(&self) {
        self.last_dir.forget();
    }

    fn can_chown(&self) -> bool {
        self.can_chown
    }
}

#[cfg(test)]
mod tests;
