//! [`Msg`], every message of the protocol, owned, and its encoding entry
//! points. The per-message conversions are in `encode` and `decode`.

use capnp::message::{Builder, HeapAllocator};

use super::classification::ClassificationSpec;
use super::entry::FileEntry;
use super::types::{
    BasisFound, BasisItem, ChecksumResult, Coding, Done, ExpectedFile, InconsistentFile,
    ItemResult, Op, PlanItem, Progress, RelayNode, RemoteResult, Role, SyncProgress, SyncRequest,
    TransferOptions, TreeIdentity,
};
use crate::fleetsync_capnp as schema;
use crate::frame;
use crate::ProtoError;

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
        /// The connector takes `zstd` frames ([`frame::FrameCompressor`]) and would send some.
        frame_compression: bool,
    },
    /// Listener -> connector: authenticated.
    Welcome {
        /// HMAC-SHA256(token, auth.nonce ‖ "listener").
        mac: Vec<u8>,
        /// The agent applies owner/group.
        can_chown: bool,
        /// The connector asked for `zstd` frames and the listener takes them: from now on
        /// either side may send them.
        frame_compression: bool,
        /// Where the agent's tree is (empty from other listeners).
        tree: TreeIdentity,
    },
    /// Server -> agent: list the tree.
    ListRequest {
        /// Request id (echoed in replies).
        request_id: u64,
        /// Which files.
        classification: ClassificationSpec,
        /// Entries per batch (0 = default).
        batch_size: u32,
        /// A remote of a real sync: when the connection closes, remove the partial files
        /// this listing found that the sync did not use.
        sweep_partials: bool,
        /// An algorithm name: attach to each regular file the digest the agent's checksum
        /// cache holds for it as listed (empty: none).
        cached_digests: String,
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
        /// How the data travels.
        transfer: TransferOptions,
        /// Parallel to `paths` (or empty): the remote file to delta against; empty: none.
        bases: Vec<Vec<u8>>,
        /// Parallel to `paths` (or empty): each file's size in the master's list.
        sizes: Vec<u64>,
        /// With `--tls`: the server's signed authority for this stream
        /// ([`crate::ticket`]), presented to the remote in [`Msg::StreamTicket`]; empty
        /// without TLS.
        ticket: Vec<u8>,
        /// Fan-out: the remotes `target` forwards the stream to (empty: none).
        relays: Vec<RelayNode>,
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
        /// How the chunks code the content.
        coding: Coding,
        /// Patch, delta, copy: the remote file the data is relative to.
        basis: Vec<u8>,
        /// Append: bytes of the partial file to keep before the chunks.
        basis_size: u64,
    },
    /// Master -> remote agent: file bytes (at most 1 MiB before compression).
    FileChunk {
        /// The bytes.
        data: Vec<u8>,
        /// `data` is one zstd frame.
        zstd: bool,
    },
    /// Master -> remote agent, first on a stream: which bases does the remote hold?
    BasisQuery {
        /// The send order's request id.
        request_id: u64,
        /// Algorithm of the digests.
        algorithm: String,
        /// The files.
        items: Vec<BasisItem>,
    },
    /// Remote -> master agent: answers to a basis query, in query order.
    BasisReply {
        /// The send order's request id.
        request_id: u64,
        /// Answers.
        items: Vec<BasisFound>,
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
    /// Master -> remote agent, first frame of a stream between TLS agents: the send order's
    /// ticket.
    StreamTicket {
        /// The ticket (see [`crate::ticket`]).
        ticket: Vec<u8>,
    },
    /// Master (or relay) -> relay agent, first on a relayed stream: forward the file
    /// frames of this stream to these remotes while receiving them.
    Forward {
        /// The request id the receiver reports its own results under.
        request_id: u64,
        /// The remotes to forward to, each with its own subtree.
        children: Vec<RelayNode>,
    },
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

/// Encodes a `fileChunk` message straight from a slice (no intermediate `Msg`).
pub fn encode_file_chunk(data: &[u8], zstd: bool) -> Builder<HeapAllocator> {
    let mut b = frame::builder_with_capacity(data.len());
    let mut c = b.init_root::<schema::message::Builder>().init_file_chunk();
    c.set_data(data);
    c.set_zstd(zstd);
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
            Msg::BasisQuery { .. } => "basisQuery",
            Msg::BasisReply { .. } => "basisReply",
            Msg::FileEnd { .. } => "fileEnd",
            Msg::StreamEnd => "streamEnd",
            Msg::StreamTicket { .. } => "streamTicket",
            Msg::Forward { .. } => "forward",
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
            Msg::FileChunk { data, .. } => frame::builder_with_capacity(data.len()),
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
}
