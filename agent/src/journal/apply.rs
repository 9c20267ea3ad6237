//! Applying a committed journal to the tree, step by idempotent step (by [`BlockTxn::commit`]
//! and by [`recover`] alike).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use super::at::{
    apply_attrs_at, exists_at, fsync_fd, is_dir, lstat_at, open_dir_at, remove_tree_at, slot_name,
    write_mark,
};
use super::crash_hook::CrashHook;
use super::record::SlotOp;
use super::*;
use rustix::fs::AtFlags;
use rustix::io::Errno;

/// Applies every operation (idempotently), then fsyncs the touched directories.
pub(super) fn apply_all(
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
pub(super) fn finish(
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
