//! The plain parts of messages: roles, checksum results, attributes and ops,
//! outcomes and progress, the sync request and its plan and results.
//! Their wire conversions are in `encode` and `decode`.

use super::classification::ClassificationSpec;
use crate::fleetsync_capnp as schema;

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
}

schema_enum_conversions!(Role <-> schema::Role { Server, Agent, Control, Listener });

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

schema_enum_conversions!(Outcome <-> schema::Outcome { Ok, Failed, Skipped });

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
    /// Send orders: bytes of file data on the wire (after compression and deltas).
    pub wire_bytes: u64,
    /// Send orders: how the data travelled (`whole`, `zstd`, `patch`, `delta`, `resume`,
    /// `copy`); empty otherwise.
    pub coding: String,
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
    /// How file data travels.
    pub transfer: TransferOptions,
    /// `--fanout`: relay children per node of a distribution tree (0: the master sends to
    /// each remote itself).
    pub fanout: u32,
}

/// How file data travels between agents (`--compress`, `--bwlimit`, `--master-bwlimit`,
/// `--no-delta`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransferOptions {
    /// `auto` (also when empty), `off`, `zstd` or `zstd:LEVEL`.
    pub compress: String,
    /// Bytes per second per remote stream; 0: unlimited.
    pub bwlimit: u64,
    /// Bytes per second for all streams of the master agent together; 0: unlimited.
    pub master_bwlimit: u64,
    /// Send whole files (compressed), never deltas.
    pub no_delta: bool,
}

/// How a file's data is coded on an agent-to-agent stream (`fileStart.coding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Coding {
    /// The chunks are the file's bytes.
    #[default]
    Whole,
    /// The chunks are one zstd frame with the basis as reference prefix.
    Patch,
    /// The chunks are rsync copy/literal instructions against the basis.
    Delta,
    /// The chunks continue the partial file of an interrupted transfer.
    Append,
    /// No chunks: the content is the basis's.
    CopyBasis,
}

impl Coding {
    pub(crate) fn to_schema(self) -> schema::Coding {
        match self {
            Coding::Whole => schema::Coding::Whole,
            Coding::Patch => schema::Coding::Patch,
            Coding::Delta => schema::Coding::Delta,
            Coding::Append => schema::Coding::Append,
            Coding::CopyBasis => schema::Coding::CopyBasis,
        }
    }

    pub(crate) fn from_schema(c: schema::Coding) -> Self {
        match c {
            schema::Coding::Whole => Coding::Whole,
            schema::Coding::Patch => Coding::Patch,
            schema::Coding::Delta => Coding::Delta,
            schema::Coding::Append => Coding::Append,
            schema::Coding::CopyBasis => Coding::CopyBasis,
        }
    }
}

/// Where an agent's tree is (told in `welcome`): the server refuses a sync whose trees
/// overlap. Empty: not told (an older agent, or not an agent).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TreeIdentity {
    /// The machine: its `/etc/machine-id`, else the kernel boot id.
    pub host: String,
    /// (device, inode) of the root, then of each parent directory up to `/`.
    pub chain: Vec<(u64, u64)>,
}

impl TreeIdentity {
    /// Whether the two trees overlap: on one machine, and one's root is the other's root or
    /// one of its parents. Unknown identities overlap nothing.
    pub fn overlaps(&self, other: &TreeIdentity) -> bool {
        let (Some(a), Some(b)) = (self.chain.first(), other.chain.first()) else {
            return false;
        };
        !self.host.is_empty()
            && self.host == other.host
            && (other.chain.contains(a) || self.chain.contains(b))
    }
}

/// A content version: size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Version {
    /// Bytes.
    pub size: u64,
    /// Digest (the query's algorithm).
    pub digest: Vec<u8>,
}

/// One file of a [`Msg::BasisQuery`](crate::Msg::BasisQuery).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasisItem {
    /// The file to be written (its partial file is looked for).
    pub path: Vec<u8>,
    /// The remote file to use as basis; empty: none.
    pub basis: Vec<u8>,
    /// Versions the master holds: no signature is needed when the basis is one of them.
    pub known: Vec<Version>,
    /// Compute a block signature of the basis unless it is a known version.
    pub signature: bool,
}

/// The remote's answer for one [`BasisItem`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasisFound {
    /// Index into the query's items.
    pub index: u32,
    /// Size of the basis.
    pub basis_size: u64,
    /// Digest of the basis; empty: no usable basis.
    pub basis_digest: Vec<u8>,
    /// rsync block signature of the basis (empty unless asked and not a known version).
    pub signature: Vec<u8>,
    /// Size of the partial file of an interrupted transfer.
    pub partial_size: u64,
    /// Its digest; empty: no partial file.
    pub partial_digest: Vec<u8>,
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

schema_enum_conversions!(Action <-> schema::Action {
    Transfer, Delete, Mkdir, SetAttrs, Symlink, HardLink, Skip,
});

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
    /// Bytes of file data on the wire (after compression and deltas).
    pub wire_bytes: u64,
    /// Who sent this remote its files: empty for the master, else the relay's address.
    pub source: String,
}

/// One remote of a relay tree (see [`Msg::Forward`](crate::Msg::Forward)): the agent that
/// receives a stream forwards it to `target`, which forwards it to its `children`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RelayNode {
    /// host:port of the remote agent.
    pub target: String,
    /// The request id the server gave this remote's share of the order: its results
    /// travel back up the tree under it.
    pub request_id: u64,
    /// The remotes it forwards to.
    pub children: Vec<RelayNode>,
    /// With `--tls`: the server's signed authority for the stream from this node's parent
    /// to `target` ([`crate::ticket`]), which the parent presents first; empty without TLS.
    pub ticket: Vec<u8>,
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
