//! Paths from messages: validation and resolution beneath the root without
//! following symlinks.
//!
//! Every path received is checked by [`check`] (relative, no `..`/`.`, no empty
//! component, no NUL). Its parent directory is then opened with `openat2`
//! and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (or, on kernels without
//! `openat2`, one `openat(O_NOFOLLOW)` per component), and the final component
//! is handled with `*at` system calls relative to that directory descriptor.
//! A symlink anywhere on the way is an error.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::AgentError;

fn unsafe_path(path: &[u8], reason: &'static str) -> AgentError {
    AgentError::UnsafePath {
        path: path.to_vec(),
        reason,
    }
}

/// Checks that `path` is a clean relative path: `b""` (the root itself) or
/// '/'-separated non-empty components, none of them `.` or `..`, no NUL.
pub fn check(path: &[u8]) -> Result<(), AgentError> {
    if path.is_empty() {
        return Ok(());
    }
    if path[0] == b'/' {
        return Err(unsafe_path(path, "absolute path"));
    }
    if path.contains(&0) {
        return Err(unsafe_path(path, "NUL byte in path"));
    }
    if path.split(|&b| b == b'/').next() == Some(crate::journal::STAGING_DIR.as_bytes()) {
        return Err(unsafe_path(path, "the block journal's staging directory"));
    }
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" => return Err(unsafe_path(path, "empty path component")),
            b"." => return Err(unsafe_path(path, "'.' component")),
            b".." => return Err(unsafe_path(path, "'..' component")),
            _ => {}
        }
    }
    Ok(())
}

/// Splits a checked non-root path into (parent, name).
pub(crate) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

/// The agent's root directory, held open.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    path: PathBuf,
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(b)
}

impl Root {
    /// Opens `path` as the root.
    pub fn open(path: &Path) -> Result<Root, AgentError> {
        use std::os::unix::ffi::OsStrExt;
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| AgentError::io("open root", path.as_os_str().as_bytes(), e))?;
        Ok(Root {
            dir,
            path: path.to_path_buf(),
        })
    }

    /// The root's path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root directory descriptor.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// Opens the directory `dir` (a checked relative path, `b""` = root)
    /// beneath the root, refusing symlinks on the way.
    pub fn open_dir(&self, dir: &[u8]) -> Result<OwnedFd, AgentError> {
        self.open_beneath(dir, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// Opens `path` beneath the root with `flags` (plus `CLOEXEC | NOFOLLOW`);
    /// no component, the last included, may be a symlink.
    pub fn open_beneath(&self, path: &[u8], flags: OFlags) -> Result<OwnedFd, AgentError> {
        check(path)?;
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        let target: &[u8] = if path.is_empty() { b"." } else { path };
        match rustix::fs::openat2(
            self.dir.as_fd(),
            os(target),
            flags,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => Ok(fd),
            Err(Errno::NOSYS) | Err(Errno::PERM) => self.open_walk(path, flags),
            Err(e) => Err(map_resolve_error(path, e)),
        }
    }

    /// Fallback for kernels without `openat2`: one component at a time.
    fn open_walk(&self, path: &[u8], flags: OFlags) -> Result<OwnedFd, AgentError> {
        if path.is_empty() {
            return rustix::fs::openat(self.dir.as_fd(), ".", flags, Mode::empty())
                .map_err(|e| AgentError::io("open", path, e));
        }
        let (parent, name) = split(path);
        let mut dir = rustix::fs::openat(
            self.dir.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| AgentError::io("open", b"", e))?;
        if !parent.is_empty() {
            for comp in parent.split(|&b| b == b'/') {
                dir = rustix::fs::openat(
                    dir.as_fd(),
                    os(comp),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| map_resolve_error(path, e))?;
            }
        }
        rustix::fs::openat(dir.as_fd(), os(name), flags, Mode::empty())
            .map_err(|e| map_resolve_error(path, e))
    }

    /// Opens the parent directory of the non-root path `path`; returns it
    /// with the final component's name.
    pub fn parent<'p>(&self, path: &'p [u8]) -> Result<(OwnedFd, &'p [u8]), AgentError> {
        check(path)?;
        if path.is_empty() {
            return Err(unsafe_path(path, "the root itself"));
        }
        let (parent, name) = split(path);
        Ok((self.open_dir(parent)?, name))
    }
}

fn map_resolve_error(path: &[u8], e: Errno) -> AgentError {
    match e {
        Errno::LOOP => unsafe_path(path, "a symlink on the way"),
        Errno::XDEV => unsafe_path(path, "escapes the root"),
        Errno::NOTDIR => unsafe_path(path, "a non-directory on the way (or a symlink)"),
        e => AgentError::io("open", path, e),
    }
}

/// The `OsStr` of a raw name, for `*at` calls.
pub(crate) fn name(b: &[u8]) -> &std::ffi::OsStr {
    os(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(p: &[u8]) -> &'static str {
        match check(p) {
            Err(AgentError::UnsafePath { reason, .. }) => reason,
            other => panic!("{p:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn rejects_dotdot() {
        assert_eq!(reason(b".."), "'..' component");
        assert_eq!(reason(b"a/../b"), "'..' component");
        assert_eq!(reason(b"a/.."), "'..' component");
    }

    #[test]
    fn rejects_absolute() {
        assert_eq!(reason(b"/etc/passwd"), "absolute path");
    }

    #[test]
    fn rejects_empty_components() {
        assert_eq!(reason(b"a//b"), "empty path component");
        assert_eq!(reason(b"a/"), "empty path component");
    }

    #[test]
    fn rejects_dot() {
        assert_eq!(reason(b"./a"), "'.' component");
    }

    #[test]
    fn rejects_nul() {
        assert_eq!(reason(b"a\0b"), "NUL byte in path");
    }

    #[test]
    fn accepts_odd_but_clean_names() {
        for p in [
            &b""[..],
            b"a",
            b"a b/c\nd",
            b"\xff\xfe/x",
            b"...",
            b"..a",
            b".hidden",
        ] {
            check(p).unwrap();
        }
    }

    #[test]
    fn split_parent_and_name() {
        assert_eq!(split(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split(b"c"), (&b""[..], &b"c"[..]));
    }
}
