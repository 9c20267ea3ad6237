//! Recovery on agent start: finish or undo every transaction a crash left.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use super::apply::{apply_all, finish};
use super::at::{exists_at, fsync_fd, open_dir_at, remove_tree_at};
use super::crash_hook::CrashHook;
use super::record::decode_journal;
use super::*;
use rustix::fs::{AtFlags, FlockOperation, Mode, OFlags};
use rustix::io::Errno;

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
pub(super) fn remove_staging_if_empty(root: BorrowedFd<'_>) {
    let _ = rustix::fs::unlinkat(root, STAGING_DIR, AtFlags::REMOVEDIR);
}

pub(super) fn read_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<Vec<u8>> {
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
