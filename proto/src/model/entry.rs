//! File list entries: [`FileKind`], the owned [`FileEntry`] and the borrowed
//! [`EntryRef`] that [`list_batch_entries`] yields straight from a frame.

use crate::fleetsync_capnp as schema;
use crate::fleetsync_capnp::message::Which as W;
use crate::ProtoError;

/// The type of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (never followed).
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
}

impl FileKind {
    /// FIFOs, sockets and devices: listed, but not synced.
    pub fn is_special(self) -> bool {
        !matches!(self, FileKind::File | FileKind::Dir | FileKind::Symlink)
    }
    /// Short lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "char device",
            FileKind::BlockDevice => "block device",
        }
    }
}

schema_enum_conversions!(FileKind <-> schema::FileKind {
    File, Dir, Symlink, Fifo, Socket, CharDevice, BlockDevice,
});

/// One entry of a file list. `path` is relative to the root (`b""` is the root).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileEntry {
    /// Relative path, '/'-separated raw bytes.
    pub path: Vec<u8>,
    /// Type.
    pub kind: FileKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Inode number.
    pub inode: u64,
    /// Device of the file system.
    pub dev: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Symlink target (symlinks only).
    pub link_target: Option<Vec<u8>>,
    /// Device number (devices only).
    pub rdev: u64,
    /// Listings only: the agent's cached digest of a regular file, in the algorithm the
    /// `listRequest` named (`cached_digests`), when its checksum cache holds one.
    pub digest: Option<Vec<u8>>,
}

/// A borrowed view of a file entry inside a received frame (no copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// Relative path.
    pub path: &'a [u8],
    /// Type.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Inode number.
    pub inode: u64,
    /// Device of the file system.
    pub dev: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Symlink target.
    pub link_target: Option<&'a [u8]>,
    /// Device number.
    pub rdev: u64,
    /// The cached digest (listings only).
    pub digest: Option<&'a [u8]>,
}

impl EntryRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> FileEntry {
        FileEntry {
            path: self.path.to_vec(),
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            inode: self.inode,
            dev: self.dev,
            nlink: self.nlink,
            size: self.size,
            mtime_sec: self.mtime_sec,
            mtime_nsec: self.mtime_nsec,
            link_target: self.link_target.map(<[u8]>::to_vec),
            rdev: self.rdev,
            digest: self.digest.map(<[u8]>::to_vec),
        }
    }
}

impl FileEntry {
    /// A borrowed view.
    pub fn as_ref(&self) -> EntryRef<'_> {
        EntryRef {
            path: &self.path,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            inode: self.inode,
            dev: self.dev,
            nlink: self.nlink,
            size: self.size,
            mtime_sec: self.mtime_sec,
            mtime_nsec: self.mtime_nsec,
            link_target: self.link_target.as_deref(),
            rdev: self.rdev,
            digest: self.digest.as_deref(),
        }
    }

    /// Fills a capnp builder.
    pub fn write_to(&self, mut b: schema::file_entry::Builder<'_>) {
        b.set_path(&self.path);
        b.set_kind(self.kind.to_schema());
        b.set_mode(self.mode);
        b.set_uid(self.uid);
        b.set_gid(self.gid);
        b.set_inode(self.inode);
        b.set_dev(self.dev);
        b.set_nlink(self.nlink);
        b.set_size(self.size);
        b.set_mtime_sec(self.mtime_sec);
        b.set_mtime_nsec(self.mtime_nsec);
        b.set_rdev(self.rdev);
        if let Some(t) = &self.link_target {
            b.set_link_target(t);
        }
        if let Some(d) = &self.digest {
            b.set_digest(d);
        }
    }

    /// Reads an owned entry.
    pub fn read_from(r: schema::file_entry::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(EntryRef::read_from(r)?.to_owned())
    }
}

impl<'a> EntryRef<'a> {
    /// Reads a borrowed entry.
    pub fn read_from(r: schema::file_entry::Reader<'a>) -> Result<Self, ProtoError> {
        Ok(EntryRef {
            path: r.get_path()?,
            kind: FileKind::from_schema(r.get_kind()?),
            mode: r.get_mode(),
            uid: r.get_uid(),
            gid: r.get_gid(),
            inode: r.get_inode(),
            dev: r.get_dev(),
            nlink: r.get_nlink(),
            size: r.get_size(),
            mtime_sec: r.get_mtime_sec(),
            mtime_nsec: r.get_mtime_nsec(),
            link_target: if r.has_link_target() {
                Some(r.get_link_target()?)
            } else {
                None
            },
            rdev: r.get_rdev(),
            digest: if r.has_digest() {
                Some(r.get_digest()?)
            } else {
                None
            },
        })
    }
}

/// The entries of a `listBatch` message without copying them, plus its
/// request id and `last` flag. Returns `Ok(None)` if `msg` is not a list batch.
///
/// ```no_run
/// # fn f(body: &[u8]) -> Result<(), fleetsync_proto::ProtoError> {
/// let reader = fleetsync_proto::frame::parse(body)?;
/// if let Some((id, last, entries)) = fleetsync_proto::list_batch_entries(&reader)? {
///     for e in entries {
///         let e = e?;
///         println!("{id} {last} {:?}", e.path);
///     }
/// }
/// # Ok(()) }
/// ```
#[allow(clippy::type_complexity)]
pub fn list_batch_entries<'a, S: capnp::message::ReaderSegments>(
    msg: &'a capnp::message::Reader<S>,
) -> Result<
    Option<(
        u64,
        bool,
        impl Iterator<Item = Result<EntryRef<'a>, ProtoError>> + 'a,
    )>,
    ProtoError,
> {
    let root: schema::message::Reader<'a> = msg.get_root()?;
    match root.which()? {
        W::ListBatch(b) => {
            let b = b?;
            let entries = b.get_entries()?;
            Ok(Some((
                b.get_request_id(),
                b.get_last(),
                entries.iter().map(EntryRef::read_from),
            )))
        }
        _ => Ok(None),
    }
}
