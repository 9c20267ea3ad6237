//! A block transaction being assembled, prepared and committed ([`BlockTxn`]).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::apply::{apply_all, finish};
use super::at::{
    apply_attrs_at, apply_attrs_fd, apply_changed_attrs_fd, ensure_dir_at, fsync_fd, open_dir_at,
    remove_tree_at, slot_name, write_mark,
};
use super::crash_hook::CrashHook;
use super::record::{encode_journal, SlotOp};
use super::recovery::remove_staging_if_empty;
use super::*;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

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

pub(super) fn new_txn_name() -> String {
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
