//! File operations relative to directory descriptors, never following a symlink: what every
//! step of a transaction is made of.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, UTIME_OMIT};
use rustix::io::Errno;

pub(crate) fn open_root(root: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open root", root, e))
}

pub(super) fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens (creating if needed) a private directory `name` under `dir`, refusing symlinks.
pub(super) fn ensure_dir_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<OwnedFd> {
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

pub(super) fn lstat_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
) -> Result<Option<rustix::fs::Stat>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn is_dir(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode as _) == FileType::Directory
}

pub(super) fn timestamps(m: Mtime) -> Timestamps {
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

pub(super) fn uid_gid(a: &JournalAttrs) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        a.uid.map(rustix::fs::Uid::from_raw),
        a.gid.map(rustix::fs::Gid::from_raw),
    )
}

/// Applies attributes through an open fd (owner first: chown may clear set-id bits).
pub(super) fn apply_attrs_fd(
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
pub(super) fn apply_changed_attrs_fd(
    fd: BorrowedFd<'_>,
    a: &JournalAttrs,
    shown: &Path,
) -> Result<()> {
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
pub(super) fn apply_attrs_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    a: &JournalAttrs,
    shown: &Path,
) -> Result<()> {
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

pub(super) fn fsync_fd(fd: BorrowedFd<'_>, shown: &Path) -> Result<()> {
    rustix::fs::fsync(fd).map_err(|e| io_err("fsync", shown, e))
}

pub(super) fn slot_name(slot: u32) -> String {
    slot.to_string()
}

/// Creates an empty marker file, fsyncs it and its directory.
pub(super) fn write_mark(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<()> {
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

pub(super) fn exists_at(dir: BorrowedFd<'_>, name: &str, shown: &Path) -> Result<bool> {
    lstat_at(dir, OsStr::new(name))
        .map(|s| s.is_some())
        .map_err(|e| io_err("lstat", shown.join(name), e))
}

/// Removes `name` under `dir` and everything below it, never following symlinks.
pub(super) fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path) -> Result<()> {
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
