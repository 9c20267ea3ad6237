//! Plain Rust model types and their conversions to and from Cap'n Proto.
//!
//! [`Msg`] is every message, owned. Hot paths that must not copy (the server
//! reading a million file entries) can instead parse a frame with
//! [`crate::frame::parse`] and walk a batch with [`list_batch_entries`],
//! which yields borrowed [`EntryRef`]s.

use capnp::message::{Builder, HeapAllocator};

use crate::fleetsync_capnp as schema;
use crate::fleetsync_capnp::message::Which as W;
use crate::frame;
use crate::ProtoError;

/// Who is connecting (and, for `Listener`, the listener's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The comparison server.
    Server,
    /// An agent (a master agent connecting to a remote agent).
    Agent,
    /// A control client.
    Control,
    /// The listener proving it knows the token.
    Listener,
}

impl Role {
    /// The ASCII name that goes into the mac.
    pub fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
            Role::Control => "control",
            Role::Listener => "listener",
        }
    }
    fn to_schema(self) -> schema::Role {
        match self {
            Role::Server => schema::Role::Server,
            Role::Agent => schema::Role::Agent,
            Role::Control => schema::Role::Control,
            Role::Listener => schema::Role::Listener,
        }
    }
    fn from_schema(r: schema::Role) -> Self {
        match r {
            schema::Role::Server => Role::Server,
            schema::Role::Agent => Role::Agent,
            schema::Role::Control => Role::Control,
            schema::Role::Listener => Role::Listener,
        }
    }
}

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
    fn to_schema(self) -> schema::FileKind {
        match self {
            FileKind::File => schema::FileKind::File,
            FileKind::Dir => schema::FileKind::Dir,
            FileKind::Symlink => schema::FileKind::Symlink,
            FileKind::Fifo => schema::FileKind::Fifo,
            FileKind::Socket => schema::FileKind::Socket,
            FileKind::CharDevice => schema::FileKind::CharDevice,
            FileKind::BlockDevice => schema::FileKind::BlockDevice,
        }
    }
    fn from_schema(k: schema::FileKind) -> Self {
        match k {
            schema::FileKind::File => FileKind::File,
            schema::FileKind::Dir => FileKind::Dir,
            schema::FileKind::Symlink => FileKind::Symlink,
            schema::FileKind::Fifo => FileKind::Fifo,
            schema::FileKind::Socket => FileKind::Socket,
            schema::FileKind::CharDevice => FileKind::CharDevice,
            schema::FileKind::BlockDevice => FileKind::BlockDevice,
        }
    }
}

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

/// One node of a `--select` expression tree (the wire form; parsing and
/// evaluation live in `select`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Matches everything.
    All,
    /// Glob on the last path component.
    Name(String),
    /// Glob on the whole relative path.
    Path(String),
    /// Extension, without the dot.
    Ext(String),
    /// All must match.
    And(Vec<Selector>),
    /// Any must match.
    Or(Vec<Selector>),
    /// Must not match.
    Not(Box<Selector>),
}

impl Selector {
    fn write_to(&self, mut b: schema::selector::Builder<'_>) {
        match self {
            Selector::All => b.set_all(()),
            Selector::Name(s) => b.set_name(s.as_str()),
            Selector::Path(s) => b.set_path(s.as_str()),
            Selector::Ext(s) => b.set_ext(s.as_str()),
            Selector::And(v) => {
                let mut l = b.init_and(v.len() as u32);
                for (i, s) in v.iter().enumerate() {
                    s.write_to(l.reborrow().get(i as u32));
                }
            }
            Selector::Or(v) => {
                let mut l = b.init_or(v.len() as u32);
                for (i, s) in v.iter().enumerate() {
                    s.write_to(l.reborrow().get(i as u32));
                }
            }
            Selector::Not(s) => s.write_to(b.init_not()),
        }
    }

    fn read_from(r: schema::selector::Reader<'_>) -> Result<Self, ProtoError> {
        use schema::selector::Which as S;
        Ok(match r.which()? {
            S::All(()) => Selector::All,
            S::Name(t) => Selector::Name(t?.to_str()?.to_owned()),
            S::Path(t) => Selector::Path(t?.to_str()?.to_owned()),
            S::Ext(t) => Selector::Ext(t?.to_str()?.to_owned()),
            S::And(l) => Selector::And(
                l?.iter()
                    .map(Selector::read_from)
                    .collect::<Result<_, _>>()?,
            ),
            S::Or(l) => Selector::Or(
                l?.iter()
                    .map(Selector::read_from)
                    .collect::<Result<_, _>>()?,
            ),
            S::Not(s) => Selector::Not(Box::new(Selector::read_from(s?)?)),
        })
    }
}

/// One `--include`/`--exclude` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterRule {
    /// `--exclude` (true) or `--include` (false).
    pub exclude: bool,
    /// The glob.
    pub pattern: String,
}

/// Which files take part, as sent on the wire: rules (first match wins),
/// then the selector (`None` = everything).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClassificationSpec {
    /// Include/exclude rules in command-line order.
    pub rules: Vec<FilterRule>,
    /// The `--select` expression.
    pub select: Option<Selector>,
}

impl ClassificationSpec {
    /// Fills a capnp builder.
    pub fn write_to(&self, mut b: schema::classification::Builder<'_>) {
        let mut rules = b.reborrow().init_rules(self.rules.len() as u32);
        for (i, r) in self.rules.iter().enumerate() {
            let mut rb = rules.reborrow().get(i as u32);
            rb.set_exclude(r.exclude);
            rb.set_pattern(r.pattern.as_str());
        }
        if let Some(s) = &self.select {
            s.write_to(b.init_select());
        }
    }

    /// Reads from a capnp reader.
    pub fn read_from(r: schema::classification::Reader<'_>) -> Result<Self, ProtoError> {
        let rules = r
            .get_rules()?
            .iter()
            .map(|rr| {
                Ok(FilterRule {
                    exclude: rr.get_exclude(),
                    pattern: rr.get_pattern()?.to_str()?.to_owned(),
                })
            })
            .collect::<Result<_, ProtoError>>()?;
        let select = if r.has_select() {
            Some(Selector::read_from(r.get_select()?)?)
        } else {
            None
        };
        Ok(ClassificationSpec { rules, select })
    }
}

/// Checksum of one file, or why it could not be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChecksumResult {
    /// Relative path.
    pub path: Vec<u8>,
    /// Bytes hashed.
    pub size: u64,
    /// Digest bytes, or an error message.
    pub digest: Result<Vec<u8>, String>,
}

/// Attributes to apply; `None` fields are left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner and group (applied only by an agent running as root).
    pub owner: Option<(u32, u32)>,
    /// Modification time (seconds, nanoseconds).
    pub mtime: Option<(i64, u32)>,
}

impl Attrs {
    fn write_to(&self, mut b: schema::attrs::Builder<'_>) {
        if let Some(m) = self.mode {
            b.set_set_mode(true);
            b.set_mode(m);
        }
        if let Some((u, g)) = self.owner {
            b.set_set_owner(true);
            b.set_uid(u);
            b.set_gid(g);
        }
        if let Some((s, n)) = self.mtime {
            b.set_set_mtime(true);
            b.set_mtime_sec(s);
            b.set_mtime_nsec(n);
        }
    }
    fn read_from(r: schema::attrs::Reader<'_>) -> Self {
        Attrs {
            mode: r.get_set_mode().then(|| r.get_mode()),
            owner: r.get_set_owner().then(|| (r.get_uid(), r.get_gid())),
            mtime: r
                .get_set_mtime()
                .then(|| (r.get_mtime_sec(), r.get_mtime_nsec())),
        }
    }
}

/// What to do at one path of a remote tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Create a directory (fine if it exists), then apply attributes.
    Mkdir(Attrs),
    /// Remove a file or symlink, or a directory (`recursive`: with its contents).
    Delete {
        /// Remove a non-empty directory tree.
        recursive: bool,
    },
    /// Apply attributes.
    SetAttrs(Attrs),
    /// Create or atomically repoint a symlink.
    Symlink {
        /// Link target.
        target: Vec<u8>,
        /// Owner and mtime of the link itself.
        attrs: Attrs,
    },
    /// Make the path a hard link to `existing` (relative path), replacing it atomically.
    HardLink {
        /// The path to link to.
        existing: Vec<u8>,
    },
    /// `blockCommit` only: put the file staged for the path in place.
    Put {
        /// Attributes of the new file.
        attrs: Attrs,
        /// The staged file must have exactly this size.
        size: u64,
    },
}

/// One order to a remote agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Relative path.
    pub path: Vec<u8>,
    /// What to do.
    pub kind: OpKind,
}

/// How one item went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Failed (see the message).
    Failed,
    /// Not done, not an error (see the note).
    Skipped,
}

/// The outcome for one path of a send order or apply request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    /// Relative path.
    pub path: Vec<u8>,
    /// Outcome.
    pub outcome: Outcome,
    /// Error or note (may be empty).
    pub message: String,
    /// Bytes transferred.
    pub bytes: u64,
    /// Send orders, ok: the digest of the content the remote committed (empty otherwise).
    pub digest: Vec<u8>,
}

/// Progress of a long request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Request.
    pub request_id: u64,
    /// Items done.
    pub items: u64,
    /// Bytes done.
    pub bytes: u64,
    /// Items in all.
    pub total_items: u64,
    /// Bytes in all.
    pub total_bytes: u64,
}

/// A request is finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Done {
    /// Request.
    pub request_id: u64,
    /// Items that succeeded.
    pub ok: u64,
    /// Items that failed.
    pub failed: u64,
    /// Items skipped.
    pub skipped: u64,
}

/// What a control client asks the server to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncRequest {
    /// host:port of the master agent.
    pub master: String,
    /// host:port of each remote agent.
    pub remotes: Vec<String>,
    /// Checksum algorithm.
    pub algorithm: String,
    /// Delete extra files on remotes.
    pub delete: bool,
    /// Only report what would change.
    pub dry_run: bool,
    /// Which files take part.
    pub classification: ClassificationSpec,
    /// `fleetsync verify`: a dry run whose checksums bypass the agents' caches.
    pub verify: bool,
    /// `--lock`: lock each file while it is synchronized, waiting at most this many
    /// milliseconds (`--lock-timeout`); `None`: no locking.
    pub lock_timeout_ms: Option<u32>,
    /// Consistency rounds per remote after its transfers (0: no check; 1: check once).
    pub max_rounds: u32,
    /// Lock the files the consistency loop synchronizes again (as `--lock` does, also
    /// without it), waiting at most this many milliseconds; `None`: as the rest of the sync.
    pub lock_resync_ms: Option<u32>,
    /// `--blocks`: dependency blocks in file order (empty: none).
    pub blocks: Vec<BlockDef>,
}

/// One block of a `--blocks` file, as carried in a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockDef {
    /// Block name.
    pub name: String,
    /// A `--select` expression, as text.
    pub select: String,
    /// Blocks that must be committed before this one.
    pub after: Vec<String>,
}

/// Kind of a planned change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send file content.
    Transfer,
    /// Remove.
    Delete,
    /// Create a directory.
    Mkdir,
    /// Change attributes.
    SetAttrs,
    /// Create or repoint a symlink.
    Symlink,
    /// Create a hard link.
    HardLink,
    /// Not synced (special file, ...).
    Skip,
}

impl Action {
    fn to_schema(self) -> schema::Action {
        match self {
            Action::Transfer => schema::Action::Transfer,
            Action::Delete => schema::Action::Delete,
            Action::Mkdir => schema::Action::Mkdir,
            Action::SetAttrs => schema::Action::SetAttrs,
            Action::Symlink => schema::Action::Symlink,
            Action::HardLink => schema::Action::HardLink,
            Action::Skip => schema::Action::Skip,
        }
    }
    fn from_schema(a: schema::Action) -> Self {
        match a {
            schema::Action::Transfer => Action::Transfer,
            schema::Action::Delete => Action::Delete,
            schema::Action::Mkdir => Action::Mkdir,
            schema::Action::SetAttrs => Action::SetAttrs,
            schema::Action::Symlink => Action::Symlink,
            schema::Action::HardLink => Action::HardLink,
            schema::Action::Skip => Action::Skip,
        }
    }
}

/// One line of the itemized plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    /// Index into the request's remotes.
    pub remote: u32,
    /// Relative path.
    pub path: Vec<u8>,
    /// What will change.
    pub action: Action,
    /// Bytes to transfer.
    pub size: u64,
    /// Why.
    pub detail: String,
}

/// A per-item failure in a remote's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Relative path.
    pub path: Vec<u8>,
    /// What went wrong.
    pub message: String,
}

/// The outcome of one remote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemoteResult {
    /// Index into the request's remotes.
    pub remote: u32,
    /// Everything succeeded.
    pub ok: bool,
    /// Why the whole remote failed (empty otherwise).
    pub error: String,
    /// Files sent.
    pub transferred: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Paths deleted.
    pub deleted: u64,
    /// Other changes.
    pub changed: u64,
    /// Per-item failures.
    pub failures: Vec<Failure>,
    /// Consistency checks run (0: none).
    pub rounds: u32,
    /// Files synchronized again by the consistency loop.
    pub resynced: u64,
    /// Files still inconsistent after the last round (`message` says why).
    pub inconsistent: Vec<Failure>,
}

/// A file a remote received, as the master sent it (in a consistency request).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExpectedFile {
    /// Relative path.
    pub path: Vec<u8>,
    /// Digest in the request's algorithm; empty: whatever the agent recorded.
    pub digest: Vec<u8>,
    /// Size in bytes.
    pub size: u64,
}

/// A file a remote's consistency check found inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InconsistentFile {
    /// Relative path.
    pub path: Vec<u8>,
    /// Name of the check that found it.
    pub check: String,
    /// What is wrong.
    pub message: String,
}

/// Progress of one remote, for the control client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncProgress {
    /// Index into the request's remotes.
    pub remote: u32,
    /// Files done.
    pub done_files: u64,
    /// Files in all.
    pub total_files: u64,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all.
    pub total_bytes: u64,
}

/// Every message of the protocol, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Msg {
    /// Listener -> connector: the challenge.
    Hello {
        /// Protocol version.
        protocol: u32,
        /// Random challenge.
        nonce: Vec<u8>,
    },
    /// Connector -> listener: the answer and our own challenge.
    Auth {
        /// Protocol version.
        protocol: u32,
        /// The connector's role.
        role: Role,
        /// HMAC-SHA256(token, hello.nonce ‖ role name).
        mac: Vec<u8>,
        /// Challenge for the listener.
        nonce: Vec<u8>,
    },
    /// Listener -> connector: authenticated.
    Welcome {
        /// HMAC-SHA256(token, auth.nonce ‖ "listener").
        mac: Vec<u8>,
        /// The agent applies owner/group.
        can_chown: bool,
    },
    /// Server -> agent: list the tree.
    ListRequest {
        /// Request id (echoed in replies).
        request_id: u64,
        /// Which files.
        classification: ClassificationSpec,
        /// Entries per batch (0 = default).
        batch_size: u32,
    },
    /// Agent -> server: entries.
    ListBatch {
        /// Request id.
        request_id: u64,
        /// Entries.
        entries: Vec<FileEntry>,
        /// Last batch.
        last: bool,
    },
    /// Server -> agent: checksums of these files.
    ChecksumRequest {
        /// Request id.
        request_id: u64,
        /// Engine algorithm name.
        algorithm: String,
        /// Relative paths.
        paths: Vec<Vec<u8>>,
        /// Ignore any checksum cache and read the data (`fleetsync verify`).
        fresh: bool,
    },
    /// Agent -> server: checksums.
    ChecksumReply {
        /// Request id.
        request_id: u64,
        /// Results, any order.
        results: Vec<ChecksumResult>,
        /// Last reply of the request.
        last: bool,
    },
    /// Server -> master agent: send these files to `target`.
    SendOrder {
        /// Request id.
        request_id: u64,
        /// host:port of the remote agent.
        target: String,
        /// Checksum algorithm for verification.
        algorithm: String,
        /// Relative paths.
        paths: Vec<Vec<u8>>,
        /// Shared-lock each master file while it is sent, waiting at most this many
        /// milliseconds for the lock (`--lock`); `None`: no locking.
        lock_timeout_ms: Option<u32>,
        /// Non-empty: stage the files in this block transaction of the remote.
        stage: String,
    },
    /// Server -> remote agent: apply these ops in order.
    ApplyRequest {
        /// Request id.
        request_id: u64,
        /// Ops.
        ops: Vec<Op>,
    },
    /// Per-item outcomes.
    ItemResults {
        /// Request id.
        request_id: u64,
        /// Outcomes.
        results: Vec<ItemResult>,
    },
    /// Progress of a request.
    Progress(Progress),
    /// A request is finished.
    Done(Done),
    /// Master -> remote agent: a file follows.
    FileStart {
        /// The send order's request id.
        request_id: u64,
        /// Path and metadata of the new content.
        entry: FileEntry,
        /// Algorithm of the digest in `fileEnd`.
        algorithm: String,
        /// Exclusive-lock the existing destination while it is replaced, waiting at most this many
        /// milliseconds for the lock (`--lock`); `None`: no locking.
        lock_timeout_ms: Option<u32>,
        /// Non-empty: stage into this block transaction instead of putting in place.
        stage: String,
    },
    /// Master -> remote agent: file bytes (at most 1 MiB).
    FileChunk {
        /// The bytes.
        data: Vec<u8>,
    },
    /// Master -> remote agent: the file is complete (or aborted).
    FileEnd {
        /// Bytes sent.
        size: u64,
        /// Digest of the bytes sent.
        digest: Vec<u8>,
        /// The sender failed: discard the file.
        aborted: bool,
        /// Why it was aborted.
        error: String,
    },
    /// Master -> remote agent: no more files.
    StreamEnd,
    /// Control client -> server.
    SyncRequest(SyncRequest),
    /// Server -> control client: planned changes.
    PlanItems(Vec<PlanItem>),
    /// Server -> control client: a remote is finished.
    RemoteResult(RemoteResult),
    /// Server -> control client: progress of a remote.
    SyncProgress(SyncProgress),
    /// Server -> remote agent: check that these received files are unchanged.
    ConsistencyRequest {
        /// Request id.
        request_id: u64,
        /// Algorithm of the digests.
        algorithm: String,
        /// The files.
        files: Vec<ExpectedFile>,
    },
    /// Remote agent -> server: the inconsistent files (of one or more replies).
    ConsistencyReply {
        /// Request id.
        request_id: u64,
        /// Inconsistent files only.
        inconsistent: Vec<InconsistentFile>,
        /// Files checked in this reply.
        checked: u64,
        /// Last reply of the request.
        last: bool,
    },
    /// Server -> remote agent: open block staging transaction `stage` for `block`.
    BlockBegin {
        /// Request id.
        request_id: u64,
        /// Server-chosen transaction name.
        stage: String,
        /// Block name.
        block: String,
    },
    /// Server -> remote agent: commit (or abort) block transaction `stage`.
    BlockCommit {
        /// Request id.
        request_id: u64,
        /// The transaction.
        stage: String,
        /// The block's whole op list, in order.
        ops: Vec<Op>,
        /// Drop the transaction instead.
        abort: bool,
    },
    /// Server -> control client: all remotes finished.
    SyncDone {
        /// Everything succeeded.
        ok: bool,
        /// Summary.
        message: String,
    },
    /// An error: fatal for the request (the connection when `request_id` is 0).
    Error {
        /// Request id, 0 for the connection.
        request_id: u64,
        /// What went wrong.
        message: String,
    },
}

fn write_ops(mut l: capnp::struct_list::Builder<'_, schema::op::Owned>, ops: &[Op]) {
    for (i, op) in ops.iter().enumerate() {
        let mut ob = l.reborrow().get(i as u32);
        ob.set_path(&op.path);
        match &op.kind {
            OpKind::Mkdir(a) => a.write_to(ob.init_mkdir()),
            OpKind::Delete { recursive } => {
                ob.init_delete().set_recursive(*recursive);
            }
            OpKind::SetAttrs(a) => a.write_to(ob.init_set_attrs()),
            OpKind::Symlink { target, attrs } => {
                let mut s = ob.init_symlink();
                s.set_target(target);
                attrs.write_to(s.init_attrs());
            }
            OpKind::HardLink { existing } => ob.set_hard_link(existing),
            OpKind::Put { attrs, size } => {
                let mut p = ob.init_put();
                p.set_size(*size);
                attrs.write_to(p.init_attrs());
            }
        }
    }
}

fn read_ops(l: capnp::struct_list::Reader<'_, schema::op::Owned>) -> Result<Vec<Op>, ProtoError> {
    l.iter()
        .map(|o| {
            use schema::op::Which as O;
            let kind = match o.which()? {
                O::Mkdir(a) => OpKind::Mkdir(Attrs::read_from(a?)),
                O::Delete(d) => OpKind::Delete {
                    recursive: d?.get_recursive(),
                },
                O::SetAttrs(a) => OpKind::SetAttrs(Attrs::read_from(a?)),
                O::Symlink(s) => {
                    let s = s?;
                    OpKind::Symlink {
                        target: s.get_target()?.to_vec(),
                        attrs: Attrs::read_from(s.get_attrs()?),
                    }
                }
                O::HardLink(e) => OpKind::HardLink {
                    existing: e?.to_vec(),
                },
                O::Put(p) => {
                    let p = p?;
                    OpKind::Put {
                        attrs: Attrs::read_from(p.get_attrs()?),
                        size: p.get_size(),
                    }
                }
            };
            Ok(Op {
                path: o.get_path()?.to_vec(),
                kind,
            })
        })
        .collect()
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, ProtoError> {
    Ok(r?.to_str()?.to_owned())
}

fn data_list(r: capnp::data_list::Reader<'_>) -> Result<Vec<Vec<u8>>, ProtoError> {
    r.iter().map(|d| Ok(d?.to_vec())).collect()
}

/// Encodes a `fileChunk` message straight from a slice (no intermediate `Msg`).
pub fn encode_file_chunk(data: &[u8]) -> Builder<HeapAllocator> {
    let mut b = frame::builder_with_capacity(data.len());
    b.init_root::<schema::message::Builder>()
        .init_file_chunk()
        .set_data(data);
    b
}

impl Msg {
    /// The message's name in the schema, for errors and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Auth { .. } => "auth",
            Msg::Welcome { .. } => "welcome",
            Msg::ListRequest { .. } => "listRequest",
            Msg::ListBatch { .. } => "listBatch",
            Msg::ChecksumRequest { .. } => "checksumRequest",
            Msg::ChecksumReply { .. } => "checksumReply",
            Msg::SendOrder { .. } => "sendOrder",
            Msg::ApplyRequest { .. } => "applyRequest",
            Msg::ItemResults { .. } => "itemResults",
            Msg::Progress(_) => "progress",
            Msg::Done(_) => "done",
            Msg::FileStart { .. } => "fileStart",
            Msg::BlockBegin { .. } => "blockBegin",
            Msg::BlockCommit { .. } => "blockCommit",
            Msg::FileChunk { .. } => "fileChunk",
            Msg::FileEnd { .. } => "fileEnd",
            Msg::StreamEnd => "streamEnd",
            Msg::SyncRequest(_) => "syncRequest",
            Msg::PlanItems(_) => "planItems",
            Msg::RemoteResult(_) => "remoteResult",
            Msg::SyncProgress(_) => "syncProgress",
            Msg::SyncDone { .. } => "syncDone",
            Msg::ConsistencyRequest { .. } => "consistencyRequest",
            Msg::ConsistencyReply { .. } => "consistencyReply",
            Msg::Error { .. } => "error",
        }
    }

    /// Builds the Cap'n Proto message (pass it to [`frame::write_frame`] or
    /// [`frame::encode_frame`]).
    pub fn encode(&self) -> Builder<HeapAllocator> {
        let mut msg = match self {
            Msg::FileChunk { data } => frame::builder_with_capacity(data.len()),
            _ => Builder::new_default(),
        };
        let root = msg.init_root::<schema::message::Builder>();
        self.write_to(root);
        msg
    }

    /// Encodes as one whole frame, length prefix included.
    pub fn to_frame(&self) -> Result<Vec<u8>, ProtoError> {
        frame::encode_frame(&self.encode())
    }

    fn write_to(&self, root: schema::message::Builder<'_>) {
        match self {
            Msg::Hello { protocol, nonce } => {
                let mut b = root.init_hello();
                b.set_protocol(*protocol);
                b.set_nonce(nonce);
            }
            Msg::Auth {
                protocol,
                role,
                mac,
                nonce,
            } => {
                let mut b = root.init_auth();
                b.set_protocol(*protocol);
                b.set_role(role.to_schema());
                b.set_mac(mac);
                b.set_nonce(nonce);
            }
            Msg::Welcome { mac, can_chown } => {
                let mut b = root.init_welcome();
                b.set_mac(mac);
                b.set_can_chown(*can_chown);
            }
            Msg::ListRequest {
                request_id,
                classification,
                batch_size,
            } => {
                let mut b = root.init_list_request();
                b.set_request_id(*request_id);
                b.set_batch_size(*batch_size);
                classification.write_to(b.init_classification());
            }
            Msg::ListBatch {
                request_id,
                entries,
                last,
            } => {
                let mut b = root.init_list_batch();
                b.set_request_id(*request_id);
                b.set_last(*last);
                let mut l = b.init_entries(entries.len() as u32);
                for (i, e) in entries.iter().enumerate() {
                    e.write_to(l.reborrow().get(i as u32));
                }
            }
            Msg::ChecksumRequest {
                request_id,
                algorithm,
                paths,
                fresh,
            } => {
                let mut b = root.init_checksum_request();
                b.set_request_id(*request_id);
                b.set_fresh(*fresh);
                b.set_algorithm(algorithm.as_str());
                let mut l = b.init_paths(paths.len() as u32);
                for (i, p) in paths.iter().enumerate() {
                    l.set(i as u32, p);
                }
            }
            Msg::ChecksumReply {
                request_id,
                results,
                last,
            } => {
                let mut b = root.init_checksum_reply();
                b.set_request_id(*request_id);
                b.set_last(*last);
                let mut l = b.init_results(results.len() as u32);
                for (i, r) in results.iter().enumerate() {
                    let mut rb = l.reborrow().get(i as u32);
                    rb.set_path(&r.path);
                    rb.set_size(r.size);
                    match &r.digest {
                        Ok(d) => rb.set_digest(d),
                        Err(e) => rb.set_error(e.as_str()),
                    }
                }
            }
            Msg::SendOrder {
                request_id,
                target,
                algorithm,
                paths,
                lock_timeout_ms,
                stage,
            } => {
                let mut b = root.init_send_order();
                b.set_stage(stage.as_str());
                b.set_request_id(*request_id);
                b.set_lock(lock_timeout_ms.is_some());
                b.set_lock_timeout_ms(lock_timeout_ms.unwrap_or(0));
                b.set_target(target.as_str());
                b.set_algorithm(algorithm.as_str());
                let mut l = b.init_paths(paths.len() as u32);
                for (i, p) in paths.iter().enumerate() {
                    l.set(i as u32, p);
                }
            }
            Msg::ApplyRequest { request_id, ops } => {
                let mut b = root.init_apply_request();
                b.set_request_id(*request_id);
                write_ops(b.init_ops(ops.len() as u32), ops);
            }
            Msg::BlockBegin {
                request_id,
                stage,
                block,
            } => {
                let mut b = root.init_block_begin();
                b.set_request_id(*request_id);
                b.set_stage(stage.as_str());
                b.set_block(block.as_str());
            }
            Msg::BlockCommit {
                request_id,
                stage,
                ops,
                abort,
            } => {
                let mut b = root.init_block_commit();
                b.set_request_id(*request_id);
                b.set_stage(stage.as_str());
                b.set_abort(*abort);
                write_ops(b.init_ops(ops.len() as u32), ops);
            }
            Msg::ItemResults {
                request_id,
                results,
            } => {
                let mut b = root.init_item_results();
                b.set_request_id(*request_id);
                let mut l = b.init_results(results.len() as u32);
                for (i, r) in results.iter().enumerate() {
                    let mut rb = l.reborrow().get(i as u32);
                    rb.set_path(&r.path);
                    rb.set_outcome(match r.outcome {
                        Outcome::Ok => schema::Outcome::Ok,
                        Outcome::Failed => schema::Outcome::Failed,
                        Outcome::Skipped => schema::Outcome::Skipped,
                    });
                    rb.set_message(r.message.as_str());
                    rb.set_bytes(r.bytes);
                    rb.set_digest(&r.digest);
                }
            }
            Msg::Progress(p) => {
                let mut b = root.init_progress();
                b.set_request_id(p.request_id);
                b.set_items(p.items);
                b.set_bytes(p.bytes);
                b.set_total_items(p.total_items);
                b.set_total_bytes(p.total_bytes);
            }
            Msg::Done(d) => {
                let mut b = root.init_done();
                b.set_request_id(d.request_id);
                b.set_ok(d.ok);
                b.set_failed(d.failed);
                b.set_skipped(d.skipped);
            }
            Msg::FileStart {
                request_id,
                entry,
                algorithm,
                lock_timeout_ms,
                stage,
            } => {
                let mut b = root.init_file_start();
                b.set_stage(stage.as_str());
                b.set_request_id(*request_id);
                b.set_lock(lock_timeout_ms.is_some());
                b.set_lock_timeout_ms(lock_timeout_ms.unwrap_or(0));
                b.set_algorithm(algorithm.as_str());
                entry.write_to(b.init_entry());
            }
            Msg::FileChunk { data } => root.init_file_chunk().set_data(data),
            Msg::FileEnd {
                size,
                digest,
                aborted,
                error,
            } => {
                let mut b = root.init_file_end();
                b.set_size(*size);
                b.set_digest(digest);
                b.set_aborted(*aborted);
                b.set_error(error.as_str());
            }
            Msg::StreamEnd => {
                let mut root = root;
                root.set_stream_end(());
            }
            Msg::SyncRequest(r) => {
                let mut b = root.init_sync_request();
                b.set_master(r.master.as_str());
                b.set_algorithm(r.algorithm.as_str());
                b.set_delete(r.delete);
                b.set_dry_run(r.dry_run);
                b.set_verify(r.verify);
                b.set_lock(r.lock_timeout_ms.is_some());
                // One timeout on the wire: --lock and --lock-resync share --lock-timeout.
                b.set_lock_timeout_ms(r.lock_timeout_ms.or(r.lock_resync_ms).unwrap_or(0));
                b.set_max_rounds(r.max_rounds);
                b.set_lock_resync(r.lock_resync_ms.is_some());
                let mut l = b.reborrow().init_remotes(r.remotes.len() as u32);
                for (i, s) in r.remotes.iter().enumerate() {
                    l.set(i as u32, s.as_str());
                }
                let mut l = b.reborrow().init_blocks(r.blocks.len() as u32);
                for (i, d) in r.blocks.iter().enumerate() {
                    let mut db = l.reborrow().get(i as u32);
                    db.set_name(d.name.as_str());
                    db.set_select(d.select.as_str());
                    let mut al = db.init_after(d.after.len() as u32);
                    for (k, a) in d.after.iter().enumerate() {
                        al.set(k as u32, a.as_str());
                    }
                }
                r.classification.write_to(b.init_classification());
            }
            Msg::PlanItems(items) => {
                let mut l = root.init_plan_items().init_items(items.len() as u32);
                for (i, it) in items.iter().enumerate() {
                    let mut b = l.reborrow().get(i as u32);
                    b.set_remote(it.remote);
                    b.set_path(&it.path);
                    b.set_action(it.action.to_schema());
                    b.set_size(it.size);
                    b.set_detail(it.detail.as_str());
                }
            }
            Msg::RemoteResult(r) => {
                let mut b = root.init_remote_result();
                b.set_remote(r.remote);
                b.set_ok(r.ok);
                b.set_error(r.error.as_str());
                b.set_transferred(r.transferred);
                b.set_bytes(r.bytes);
                b.set_deleted(r.deleted);
                b.set_changed(r.changed);
                b.set_rounds(r.rounds);
                b.set_resynced(r.resynced);
                let mut l = b.reborrow().init_failures(r.failures.len() as u32);
                for (i, f) in r.failures.iter().enumerate() {
                    let mut fb = l.reborrow().get(i as u32);
                    fb.set_path(&f.path);
                    fb.set_message(f.message.as_str());
                }
                let mut l = b.init_inconsistent(r.inconsistent.len() as u32);
                for (i, f) in r.inconsistent.iter().enumerate() {
                    let mut fb = l.reborrow().get(i as u32);
                    fb.set_path(&f.path);
                    fb.set_message(f.message.as_str());
                }
            }
            Msg::SyncProgress(p) => {
                let mut b = root.init_sync_progress();
                b.set_remote(p.remote);
                b.set_done_files(p.done_files);
                b.set_total_files(p.total_files);
                b.set_done_bytes(p.done_bytes);
                b.set_total_bytes(p.total_bytes);
            }
            Msg::ConsistencyRequest {
                request_id,
                algorithm,
                files,
            } => {
                let mut b = root.init_consistency_request();
                b.set_request_id(*request_id);
                b.set_algorithm(algorithm.as_str());
                let mut l = b.init_files(files.len() as u32);
                for (i, f) in files.iter().enumerate() {
                    let mut fb = l.reborrow().get(i as u32);
                    fb.set_path(&f.path);
                    fb.set_digest(&f.digest);
                    fb.set_size(f.size);
                }
            }
            Msg::ConsistencyReply {
                request_id,
                inconsistent,
                checked,
                last,
            } => {
                let mut b = root.init_consistency_reply();
                b.set_request_id(*request_id);
                b.set_checked(*checked);
                b.set_last(*last);
                let mut l = b.init_inconsistent(inconsistent.len() as u32);
                for (i, f) in inconsistent.iter().enumerate() {
                    let mut fb = l.reborrow().get(i as u32);
                    fb.set_path(&f.path);
                    fb.set_check(f.check.as_str());
                    fb.set_message(f.message.as_str());
                }
            }
            Msg::SyncDone { ok, message } => {
                let mut b = root.init_sync_done();
                b.set_ok(*ok);
                b.set_message(message.as_str());
            }
            Msg::Error {
                request_id,
                message,
            } => {
                let mut b = root.init_error();
                b.set_request_id(*request_id);
                b.set_message(message.as_str());
            }
        }
    }

    /// Decodes one frame body (as returned by [`frame::read_frame`] or
    /// [`frame::FrameDecoder::next_frame`]). Never panics on bad input.
    pub fn decode(body: &[u8]) -> Result<Msg, ProtoError> {
        let reader = frame::parse(body)?;
        Msg::from_reader(reader.get_root()?)
    }

    /// Converts a parsed message.
    pub fn from_reader(root: schema::message::Reader<'_>) -> Result<Msg, ProtoError> {
        Ok(match root.which()? {
            W::Hello(b) => {
                let b = b?;
                Msg::Hello {
                    protocol: b.get_protocol(),
                    nonce: b.get_nonce()?.to_vec(),
                }
            }
            W::Auth(b) => {
                let b = b?;
                Msg::Auth {
                    protocol: b.get_protocol(),
                    role: Role::from_schema(b.get_role()?),
                    mac: b.get_mac()?.to_vec(),
                    nonce: b.get_nonce()?.to_vec(),
                }
            }
            W::Welcome(b) => {
                let b = b?;
                Msg::Welcome {
                    mac: b.get_mac()?.to_vec(),
                    can_chown: b.get_can_chown(),
                }
            }
            W::ListRequest(b) => {
                let b = b?;
                Msg::ListRequest {
                    request_id: b.get_request_id(),
                    classification: if b.has_classification() {
                        ClassificationSpec::read_from(b.get_classification()?)?
                    } else {
                        ClassificationSpec::default()
                    },
                    batch_size: b.get_batch_size(),
                }
            }
            W::ListBatch(b) => {
                let b = b?;
                Msg::ListBatch {
                    request_id: b.get_request_id(),
                    entries: b
                        .get_entries()?
                        .iter()
                        .map(FileEntry::read_from)
                        .collect::<Result<_, _>>()?,
                    last: b.get_last(),
                }
            }
            W::ChecksumRequest(b) => {
                let b = b?;
                Msg::ChecksumRequest {
                    request_id: b.get_request_id(),
                    algorithm: text(b.get_algorithm())?,
                    paths: data_list(b.get_paths()?)?,
                    fresh: b.get_fresh(),
                }
            }
            W::ChecksumReply(b) => {
                let b = b?;
                let results = b
                    .get_results()?
                    .iter()
                    .map(|r| {
                        use schema::checksum_result::Which as C;
                        Ok(ChecksumResult {
                            path: r.get_path()?.to_vec(),
                            size: r.get_size(),
                            digest: match r.which()? {
                                C::Digest(d) => Ok(d?.to_vec()),
                                C::Error(e) => Err(text(e)?),
                            },
                        })
                    })
                    .collect::<Result<_, ProtoError>>()?;
                Msg::ChecksumReply {
                    request_id: b.get_request_id(),
                    results,
                    last: b.get_last(),
                }
            }
            W::SendOrder(b) => {
                let b = b?;
                Msg::SendOrder {
                    request_id: b.get_request_id(),
                    target: text(b.get_target())?,
                    algorithm: text(b.get_algorithm())?,
                    paths: data_list(b.get_paths()?)?,
                    lock_timeout_ms: b.get_lock().then(|| b.get_lock_timeout_ms()),
                    stage: text(b.get_stage())?,
                }
            }
            W::ApplyRequest(b) => {
                let b = b?;
                Msg::ApplyRequest {
                    request_id: b.get_request_id(),
                    ops: read_ops(b.get_ops()?)?,
                }
            }
            W::BlockBegin(b) => {
                let b = b?;
                Msg::BlockBegin {
                    request_id: b.get_request_id(),
                    stage: text(b.get_stage())?,
                    block: text(b.get_block())?,
                }
            }
            W::BlockCommit(b) => {
                let b = b?;
                Msg::BlockCommit {
                    request_id: b.get_request_id(),
                    stage: text(b.get_stage())?,
                    ops: read_ops(b.get_ops()?)?,
                    abort: b.get_abort(),
                }
            }
            W::ItemResults(b) => {
                let b = b?;
                let results = b
                    .get_results()?
                    .iter()
                    .map(|r| {
                        Ok(ItemResult {
                            path: r.get_path()?.to_vec(),
                            outcome: match r.get_outcome()? {
                                schema::Outcome::Ok => Outcome::Ok,
                                schema::Outcome::Failed => Outcome::Failed,
                                schema::Outcome::Skipped => Outcome::Skipped,
                            },
                            message: text(r.get_message())?,
                            bytes: r.get_bytes(),
                            digest: r.get_digest()?.to_vec(),
                        })
                    })
                    .collect::<Result<_, ProtoError>>()?;
                Msg::ItemResults {
                    request_id: b.get_request_id(),
                    results,
                }
            }
            W::Progress(b) => {
                let b = b?;
                Msg::Progress(Progress {
                    request_id: b.get_request_id(),
                    items: b.get_items(),
                    bytes: b.get_bytes(),
                    total_items: b.get_total_items(),
                    total_bytes: b.get_total_bytes(),
                })
            }
            W::Done(b) => {
                let b = b?;
                Msg::Done(Done {
                    request_id: b.get_request_id(),
                    ok: b.get_ok(),
                    failed: b.get_failed(),
                    skipped: b.get_skipped(),
                })
            }
            W::FileStart(b) => {
                let b = b?;
                Msg::FileStart {
                    request_id: b.get_request_id(),
                    entry: FileEntry::read_from(b.get_entry()?)?,
                    algorithm: text(b.get_algorithm())?,
                    lock_timeout_ms: b.get_lock().then(|| b.get_lock_timeout_ms()),
                    stage: text(b.get_stage())?,
                }
            }
            W::FileChunk(b) => Msg::FileChunk {
                data: b?.get_data()?.to_vec(),
            },
            W::FileEnd(b) => {
                let b = b?;
                Msg::FileEnd {
                    size: b.get_size(),
                    digest: b.get_digest()?.to_vec(),
                    aborted: b.get_aborted(),
                    error: text(b.get_error())?,
                }
            }
            W::StreamEnd(()) => Msg::StreamEnd,
            W::SyncRequest(b) => {
                let b = b?;
                Msg::SyncRequest(SyncRequest {
                    master: text(b.get_master())?,
                    remotes: b
                        .get_remotes()?
                        .iter()
                        .map(text)
                        .collect::<Result<_, _>>()?,
                    algorithm: text(b.get_algorithm())?,
                    delete: b.get_delete(),
                    dry_run: b.get_dry_run(),
                    verify: b.get_verify(),
                    classification: if b.has_classification() {
                        ClassificationSpec::read_from(b.get_classification()?)?
                    } else {
                        ClassificationSpec::default()
                    },
                    lock_timeout_ms: b.get_lock().then(|| b.get_lock_timeout_ms()),
                    max_rounds: b.get_max_rounds(),
                    lock_resync_ms: b.get_lock_resync().then(|| b.get_lock_timeout_ms()),
                    blocks: b
                        .get_blocks()?
                        .iter()
                        .map(|d| {
                            Ok(BlockDef {
                                name: text(d.get_name())?,
                                select: text(d.get_select())?,
                                after: d.get_after()?.iter().map(text).collect::<Result<_, _>>()?,
                            })
                        })
                        .collect::<Result<_, ProtoError>>()?,
                })
            }
            W::PlanItems(b) => Msg::PlanItems(
                b?.get_items()?
                    .iter()
                    .map(|it| {
                        Ok(PlanItem {
                            remote: it.get_remote(),
                            path: it.get_path()?.to_vec(),
                            action: Action::from_schema(it.get_action()?),
                            size: it.get_size(),
                            detail: text(it.get_detail())?,
                        })
                    })
                    .collect::<Result<_, ProtoError>>()?,
            ),
            W::RemoteResult(b) => {
                let b = b?;
                Msg::RemoteResult(RemoteResult {
                    remote: b.get_remote(),
                    ok: b.get_ok(),
                    error: text(b.get_error())?,
                    transferred: b.get_transferred(),
                    bytes: b.get_bytes(),
                    deleted: b.get_deleted(),
                    changed: b.get_changed(),
                    failures: b
                        .get_failures()?
                        .iter()
                        .map(|f| {
                            Ok(Failure {
                                path: f.get_path()?.to_vec(),
                                message: text(f.get_message())?,
                            })
                        })
                        .collect::<Result<_, ProtoError>>()?,
                    rounds: b.get_rounds(),
                    resynced: b.get_resynced(),
                    inconsistent: b
                        .get_inconsistent()?
                        .iter()
                        .map(|f| {
                            Ok(Failure {
                                path: f.get_path()?.to_vec(),
                                message: text(f.get_message())?,
                            })
                        })
                        .collect::<Result<_, ProtoError>>()?,
                })
            }
            W::SyncProgress(b) => {
                let b = b?;
                Msg::SyncProgress(SyncProgress {
                    remote: b.get_remote(),
                    done_files: b.get_done_files(),
                    total_files: b.get_total_files(),
                    done_bytes: b.get_done_bytes(),
                    total_bytes: b.get_total_bytes(),
                })
            }
            W::SyncDone(b) => {
                let b = b?;
                Msg::SyncDone {
                    ok: b.get_ok(),
                    message: text(b.get_message())?,
                }
            }
            W::ConsistencyRequest(b) => {
                let b = b?;
                Msg::ConsistencyRequest {
                    request_id: b.get_request_id(),
                    algorithm: text(b.get_algorithm())?,
                    files: b
                        .get_files()?
                        .iter()
                        .map(|f| {
                            Ok(ExpectedFile {
                                path: f.get_path()?.to_vec(),
                                digest: f.get_digest()?.to_vec(),
                                size: f.get_size(),
                            })
                        })
                        .collect::<Result<_, ProtoError>>()?,
                }
            }
            W::ConsistencyReply(b) => {
                let b = b?;
                Msg::ConsistencyReply {
                    request_id: b.get_request_id(),
                    inconsistent: b
                        .get_inconsistent()?
                        .iter()
                        .map(|f| {
                            Ok(InconsistentFile {
                                path: f.get_path()?.to_vec(),
                                check: text(f.get_check())?,
                                message: text(f.get_message())?,
                            })
                        })
                        .collect::<Result<_, ProtoError>>()?,
                    checked: b.get_checked(),
                    last: b.get_last(),
                }
            }
            W::Error(b) => {
                let b = b?;
                Msg::Error {
                    request_id: b.get_request_id(),
                    message: text(b.get_message())?,
                }
            }
        })
    }
}

impl From<&fleetsync_select::Classification> for ClassificationSpec {
    fn from(c: &fleetsync_select::Classification) -> Self {
        use fleetsync_select::{Expr, RuleKind};
        /// The operands of a chain of one operator, flattened: the wire
        /// limits nesting, and `a or b or c ...` must not nest at all.
        fn operands(e: &Expr, and: bool) -> Vec<Selector> {
            let mut out = Vec::new();
            let mut todo = vec![e];
            while let Some(e) = todo.pop() {
                match (e, and) {
                    (Expr::And(a, b), true) | (Expr::Or(a, b), false) => {
                        todo.push(b);
                        todo.push(a);
                    }
                    _ => out.push(conv(e)),
                }
            }
            out
        }
        fn conv(e: &Expr) -> Selector {
            match e {
                Expr::Name(s) => Selector::Name(s.clone()),
                Expr::Path(s) => Selector::Path(s.clone()),
                Expr::Ext(s) => Selector::Ext(s.clone()),
                Expr::And(..) => Selector::And(operands(e, true)),
                Expr::Or(..) => Selector::Or(operands(e, false)),
                Expr::Not(a) => Selector::Not(Box::new(conv(a))),
            }
        }
        ClassificationSpec {
            rules: c
                .rules
                .iter()
                .map(|r| FilterRule {
                    exclude: r.kind == RuleKind::Exclude,
                    pattern: r.pattern.clone(),
                })
                .collect(),
            select: c.select.as_ref().map(conv),
        }
    }
}

impl From<&ClassificationSpec> for fleetsync_select::Classification {
    fn from(c: &ClassificationSpec) -> Self {
        use fleetsync_select::{Expr, Rule};
        fn everything() -> Expr {
            Expr::Path("**".into())
        }
        /// Joins the operands into a balanced tree: a list of thousands of
        /// operands must not become thousands of levels of recursion.
        fn fold(v: &[Selector], and: bool) -> Expr {
            match v {
                [] if and => everything(),
                [] => Expr::Not(Box::new(everything())),
                [one] => conv(one),
                _ => {
                    let (l, r) = v.split_at(v.len().div_ceil(2));
                    let (l, r) = (Box::new(fold(l, and)), Box::new(fold(r, and)));
                    if and {
                        Expr::And(l, r)
                    } else {
                        Expr::Or(l, r)
                    }
                }
            }
        }
        fn conv(s: &Selector) -> Expr {
            match s {
                Selector::All => everything(),
                Selector::Name(g) => Expr::Name(g.clone()),
                Selector::Path(g) => Expr::Path(g.clone()),
                Selector::Ext(g) => Expr::Ext(g.clone()),
                Selector::And(v) => fold(v, true),
                Selector::Or(v) => fold(v, false),
                Selector::Not(a) => Expr::Not(Box::new(conv(a))),
            }
        }
        fleetsync_select::Classification {
            rules: c
                .rules
                .iter()
                .map(|r| {
                    if r.exclude {
                        Rule::exclude(r.pattern.clone())
                    } else {
                        Rule::include(r.pattern.clone())
                    }
                })
                .collect(),
            select: match &c.select {
                None | Some(Selector::All) => None,
                Some(s) => Some(conv(s)),
            },
        }
    }
}
