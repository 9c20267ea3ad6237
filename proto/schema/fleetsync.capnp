@0xb089593ea34c09d6;
# fleetsync wire protocol. Every frame on every connection is one `Message`,
# prefixed by its length (u32 little-endian, at most 16 MiB). See PROTOCOL.md
# for who sends what, and in which order.
#
# Paths are always `Data` (raw bytes, relative to the agent's root, '/'-separated,
# never absolute, never containing "..", empty components or NUL): file names
# need not be UTF-8. Names that are always UTF-8 (addresses, algorithm names,
# error messages) are `Text`.

struct Message {
  union {
    # --- handshake (every connection) ---
    hello @0 :Hello;            # listener -> connector, first frame
    auth @1 :Auth;              # connector -> listener
    welcome @2 :Welcome;        # listener -> connector: authenticated

    # --- server -> agent requests, agent -> server replies ---
    listRequest @3 :ListRequest;
    listBatch @4 :ListBatch;
    checksumRequest @5 :ChecksumRequest;
    checksumReply @6 :ChecksumReply;
    sendOrder @7 :SendOrder;     # to the master agent
    applyRequest @8 :ApplyRequest; # to a remote agent
    itemResults @9 :ItemResults;  # per-item outcome (send and apply)
    progress @10 :Progress;
    done @11 :Done;              # a request finished (all its items reported)

    # --- agent -> agent file stream (master connects to the remote) ---
    fileStart @12 :FileStart;
    fileChunk @13 :FileChunk;
    fileEnd @14 :FileEnd;
    streamEnd @15 :Void;         # master has no more files on this connection

    # --- control client <-> server ---
    syncRequest @16 :SyncRequest;
    planItems @17 :PlanItems;
    remoteResult @18 :RemoteResult;
    syncDone @19 :SyncDone;
    syncProgress @21 :SyncProgress;

    # --- consistency loop (server -> remote agent, after its transfers) ---
    consistencyRequest @22 :ConsistencyRequest;
    consistencyReply @23 :ConsistencyReply;

    # --- dependency blocks (server -> remote agent) ---
    blockBegin @24 :BlockBegin;   # open a staging transaction; answered by `done`
    blockCommit @25 :BlockCommit; # commit (or abort) it; answered by `itemResults`* + `done`

    # --- agent -> agent stream: delta bases (master asks, remote answers, in query order) ---
    basisQuery @26 :BasisQuery;
    basisReply @27 :BasisReply;

    # --- agent -> agent stream with --tls: the server's authority for it, first frame ---
    streamTicket @28 :StreamTicket;

    # --- agent -> agent stream: relays (first frame of a relayed stream) ---
    forward @29 :Forward;

    # --- any direction ---
    error @20 :ErrorMsg;          # fatal for the request (or the connection when requestId = 0)
    zstd @30 :Data;               # another frame's body (one message in the stream encoding),
                                  # as one zstd frame with its content size: the receiver takes
                                  # it as that message. Only between peers that both said
                                  # `frameCompression` in the handshake; never nested.
  }
}

# ---------------------------------------------------------------- handshake

enum Role {
  server @0;   # the comparison server
  agent @1;    # an agent (a master agent connecting to a remote agent)
  control @2;  # a control client (fleetsync sync)
  listener @3; # the listener's answer to the connector's challenge
}

struct Hello {
  protocol @0 :UInt32;  # protocol version (1)
  nonce @1 :Data;       # 32 random bytes
}

struct Auth {
  protocol @0 :UInt32;
  role @1 :Role;
  # HMAC-SHA256(token, hello.nonce ‖ roleName) where roleName is the
  # ASCII name of `role` ("server", "agent", "control").
  mac @2 :Data;
  nonce @3 :Data;       # 32 random bytes: the connector's challenge to the listener
  frameCompression @4 :Bool; # the connector takes `zstd` frames, and would send some
}

struct Welcome {
  # HMAC-SHA256(token, auth.nonce ‖ "listener"): the listener proves it knows
  # the token too. Empty when both sides run without authentication.
  mac @0 :Data;
  canChown @1 :Bool;    # an agent running as root: owner/group will be applied
  # An agent's tree, so that the server can refuse overlapping trees (empty: not told):
  host @2 :Text;               # the machine (its /etc/machine-id, else the boot id)
  rootChain @3 :List(UInt64);  # device, inode of the root, then of each parent up to /
  frameCompression @4 :Bool;   # the connector asked for `zstd` frames and the listener takes
                               # them too: from now on either side may send big frames so
}

# ---------------------------------------------------------------- classification

# One node of a `--select` expression tree.
struct Selector {
  union {
    all @0 :Void;               # matches everything
    name @1 :Text;              # glob on the last path component
    path @2 :Text;              # glob on the whole relative path
    ext @3 :Text;               # file extension, without the dot
    and @4 :List(Selector);
    or @5 :List(Selector);
    not @6 :Selector;
  }
}

struct FilterRule {
  exclude @0 :Bool;  # false: --include, true: --exclude
  pattern @1 :Text;  # glob
}

# Which files take part in a sync: the rules (first match wins, rsync style)
# and then the selector. An excluded directory is not descended into.
struct Classification {
  rules @0 :List(FilterRule);
  select @1 :Selector;       # null = everything
}

# ---------------------------------------------------------------- file lists

enum FileKind {
  file @0;
  dir @1;
  symlink @2;
  fifo @3;
  socket @4;
  charDevice @5;
  blockDevice @6;
}

struct FileEntry {
  path @0 :Data;
  kind @1 :FileKind;
  mode @2 :UInt32;        # permission bits (st_mode & 0o7777)
  uid @3 :UInt32;
  gid @4 :UInt32;
  inode @5 :UInt64;
  dev @6 :UInt64;
  nlink @7 :UInt64;
  size @8 :UInt64;
  mtimeSec @9 :Int64;
  mtimeNsec @10 :UInt32;
  linkTarget @11 :Data;   # symlinks only (null otherwise)
  rdev @12 :UInt64;       # devices only
  digest @13 :Data;       # listings only: the agent's cached checksum of a regular file in
                          # the algorithm `listRequest.cachedDigests` names, when its checksum
                          # cache holds one for the file as just listed (null otherwise)
}

struct ListRequest {
  requestId @0 :UInt64;
  classification @1 :Classification;
  batchSize @2 :UInt32;   # 0 = agent default (4096)
  sweepPartials @3 :Bool; # a remote of a real sync (not a dry run): when this connection
                          # closes, remove the partial files this listing found that the
                          # sync did not use (their paths were not sent)
  cachedDigests @4 :Text; # an algorithm name: attach to each regular file the digest the
                          # agent's checksum cache holds for it as listed (same rules as a
                          # checksumRequest answered from the cache); empty = none
}

# Entries in walk order (a directory before its contents). The agent sends
# batches until one has `last = true` (possibly empty).
struct ListBatch {
  requestId @0 :UInt64;
  entries @1 :List(FileEntry);
  last @2 :Bool;
}

# ---------------------------------------------------------------- checksums

struct ChecksumRequest {
  requestId @0 :UInt64;
  algorithm @1 :Text;     # a fleetsync-engine registry name, e.g. "crc32"
  paths @2 :List(Data);
  fresh @3 :Bool;         # ignore any checksum cache: read the data (fleetsync verify)
}

struct ChecksumResult {
  path @0 :Data;
  size @1 :UInt64;        # bytes hashed
  union {
    digest @2 :Data;
    error @3 :Text;
  }
}

# Results in any order, in one or more replies; the last has `last = true`.
struct ChecksumReply {
  requestId @0 :UInt64;
  results @1 :List(ChecksumResult);
  last @2 :Bool;
}

# ---------------------------------------------------------------- orders

# Server -> master agent: connect to `target` (host:port of the remote agent),
# authenticate with role `agent`, and stream these files to it.
struct SendOrder {
  requestId @0 :UInt64;
  target @1 :Text;
  algorithm @2 :Text;     # checksum sent with each file and verified by the receiver
  paths @3 :List(Data);
  lock @4 :Bool;          # shared-lock each master file while it is sent (--lock)
  lockTimeoutMs @5 :UInt32;
  stage @6 :Text;         # non-empty: stage the files in this block transaction of the remote
  transfer @7 :TransferOptions;
  bases @8 :List(Data);   # parallel to paths (or empty): the remote file to delta against
                          # (often the same path); empty = none known
  sizes @9 :List(UInt64); # parallel to paths (or empty): size of each file in the master's list
  ticket @10 :Data;       # with --tls: the server's signed authority for this stream
                          # (fleetsync_proto::ticket), presented to the remote in streamTicket
  relays @11 :List(RelayNode); # fan-out: the target forwards the stream to these (empty: none)
}

# One remote of a server-planned relay tree: the agent that receives the stream
# forwards it to `target`, which forwards it to its own `children`. Results of
# `target` travel back up the tree under `requestId` (the order the server
# planned for that remote).
struct RelayNode {
  target @0 :Text;
  requestId @1 :UInt64;
  children @2 :List(RelayNode);
  ticket @3 :Data;        # with --tls: the server's authority for the stream parent -> target
}

# Master (or relay) -> relay agent, the first frame of a relayed stream: forward
# every file frame of this stream to these children while receiving it.
struct Forward {
  children @0 :List(RelayNode);
  requestId @1 :UInt64;   # the receiver reports its own results under this id
}

# How file data travels (sync --compress, --bwlimit, --master-bwlimit, --no-delta).
struct TransferOptions {
  compress @0 :Text;      # "auto" (default when empty), "off", "zstd", "zstd:LEVEL"
  bwlimit @1 :UInt64;     # bytes/s per remote stream; 0 = unlimited
  masterBwlimit @2 :UInt64; # bytes/s for all streams of the master agent together; 0 = unlimited
  noDelta @3 :Bool;       # send whole files (compressed), never deltas
}

# Attributes to apply; each `set*` flag says whether the field is meaningful.
struct Attrs {
  setMode @0 :Bool;
  mode @1 :UInt32;
  setOwner @2 :Bool;      # applied only when the agent runs as root
  uid @3 :UInt32;
  gid @4 :UInt32;
  setMtime @5 :Bool;
  mtimeSec @6 :Int64;
  mtimeNsec @7 :UInt32;
}

struct Op {
  path @0 :Data;
  union {
    mkdir @1 :Attrs;          # create the directory (ok if it exists), then apply attrs (mtime deferred)
    delete @2 :DeleteOp;      # remove a file or symlink, or a directory; ok if absent
    setAttrs @3 :Attrs;       # directory mtimes are deferred to the end of the request
    symlink @4 :SymlinkOp;    # create or atomically repoint
    hardLink @5 :Data;        # make `path` a hard link to this existing path (atomic replace)
    put @6 :PutOp;            # blockCommit only: put the file staged for `path` in place
  }
}

struct PutOp {
  attrs @0 :Attrs;            # of the new file
  size @1 :UInt64;            # the staged file must have exactly this size
}

struct DeleteOp {
  recursive @0 :Bool;         # a directory with contents: remove the whole tree (else rmdir)
}

struct SymlinkOp {
  target @0 :Data;
  attrs @1 :Attrs;            # owner and mtime of the link itself
}

# Server -> remote agent. Ops run in list order; then deferred directory
# mtimes are applied, deepest first. The agent answers with `itemResults`
# and then `done`.
struct ApplyRequest {
  requestId @0 :UInt64;
  ops @1 :List(Op);
}

enum Outcome {
  ok @0;
  failed @1;
  skipped @2;   # not an error: e.g. owner not applied because not root
}

struct ItemResult {
  path @0 :Data;
  outcome @1 :Outcome;
  message @2 :Text;       # error or note
  bytes @3 :UInt64;       # bytes transferred (send orders)
  digest @4 :Data;        # send orders, ok: digest (the order's algorithm) of the content
                          # the remote committed; empty otherwise
  wireBytes @5 :UInt64;   # send orders: bytes of file data on the wire (after compression/delta)
  coding @6 :Text;        # send orders: how it travelled ("whole", "zstd", "patch", "delta",
                          # "resume", "copy")
}

struct ItemResults {
  requestId @0 :UInt64;
  results @1 :List(ItemResult);
}

struct Progress {
  requestId @0 :UInt64;
  items @1 :UInt64;
  bytes @2 :UInt64;
  totalItems @3 :UInt64;
  totalBytes @4 :UInt64;
}

# A request is finished: every item has been reported.
struct Done {
  requestId @0 :UInt64;
  ok @1 :UInt64;
  failed @2 :UInt64;
  skipped @3 :UInt64;
}

# ---------------------------------------------------------------- agent -> agent stream

# A file follows: FileStart, then FileChunk* (each at most 1 MiB), then FileEnd.
# The receiver writes to a temp file and renames only when size and digest match.
# The receiver answers each file with `itemResults` (requestId = the send order's id)
# without the sender waiting for it; after `streamEnd` it answers `done`.
struct FileStart {
  requestId @0 :UInt64;
  entry @1 :FileEntry;     # path, mode, uid, gid, mtime, size of the new content
  algorithm @2 :Text;
  lock @3 :Bool;           # exclusive-lock the existing destination while replacing it
  lockTimeoutMs @4 :UInt32;
  stage @5 :Text;          # non-empty: stage into this block transaction, do not put in place
  coding @6 :Coding;
  basis @7 :Data;          # patch, delta, copyBasis: the remote file the data is relative to
  basisSize @8 :UInt64;    # append: bytes of the partial file to keep before the chunks
}

enum Coding {
  whole @0;      # chunks are the file's bytes
  patch @1;      # chunks are one zstd frame with `basis` as reference prefix (--patch-from)
  delta @2;      # chunks are copy/literal instructions against `basis` (rsync)
  append @3;     # chunks continue the partial file left by an interrupted transfer
  copyBasis @4;  # no chunks: the content is `basis`'s
}

struct FileChunk {
  data @0 :Data;
  zstd @1 :Bool;           # `data` is one zstd frame of the chunk
}

# Master -> remote agent, first on a stream: for these files, what basis does the remote hold?
struct BasisQuery {
  requestId @0 :UInt64;
  algorithm @1 :Text;
  items @2 :List(BasisItem);
}
struct BasisItem {
  path @0 :Data;           # the file to be written (its partial file is looked for)
  basis @1 :Data;          # the remote file to use as basis; empty: none
  known @2 :List(Version); # versions the master holds: no signature needed for those
  signature @3 :Bool;      # compute a block signature of the basis unless it is a known version
}
struct Version {
  size @0 :UInt64;
  digest @1 :Data;
}
# Remote -> master: answers to a basisQuery, in query order (several replies).
struct BasisReply {
  requestId @0 :UInt64;
  items @1 :List(BasisFound);
}
struct BasisFound {
  index @0 :UInt32;        # into the query's items
  basisSize @1 :UInt64;
  basisDigest @2 :Data;    # empty: no usable basis
  signature @3 :Data;      # rsync block signature of the basis (empty unless asked and unknown)
  partialSize @4 :UInt64;  # a partial file of an interrupted transfer: its size
  partialDigest @5 :Data;  # and digest (empty: none)
}

struct FileEnd {
  size @0 :UInt64;
  digest @1 :Data;         # of the bytes sent; empty with `aborted`
  aborted @2 :Bool;        # the sender failed mid-file: discard it
  error @3 :Text;
}

# ---------------------------------------------------------------- dependency blocks

# Server -> remote agent: open a staging transaction `stage` (server-chosen,
# 1-64 of A-Z a-z 0-9 _ -) for block `block`, owned by this connection (aborted
# if it closes). The agent answers `done` (or `error` with the request id).
struct BlockBegin {
  requestId @0 :UInt64;
  stage @1 :Text;
  block @2 :Text;
}

# Server -> remote agent: the block's whole op list. Every `put` needs a file
# staged (and verified) under `stage` with the given size, and every staged
# file needs a `put`. The agent commits through its journal (all or nothing)
# and answers `itemResults` (every op ok, or every op failed with the reason)
# then `done`. With `abort`, the transaction is dropped and nothing changes.
struct BlockCommit {
  requestId @0 :UInt64;
  stage @1 :Text;
  ops @2 :List(Op);
  abort @3 :Bool;
}

# ---------------------------------------------------------------- control

struct SyncRequest {
  master @0 :Text;             # host:port of the master agent
  remotes @1 :List(Text);      # host:port of each remote agent
  algorithm @2 :Text;
  delete @3 :Bool;
  dryRun @4 :Bool;
  classification @5 :Classification;
  lock @6 :Bool;               # --lock: lock each file while it is synchronized
  lockTimeoutMs @7 :UInt32;    # --lock-timeout
  verify @8 :Bool;             # fleetsync verify: dry run with fresh checksums (no cache)
  maxRounds @9 :UInt32;        # consistency rounds per remote after its transfers (0 = no check)
  lockResync @10 :Bool;        # lock the files the consistency loop synchronizes again
                               # (waiting lockTimeoutMs; also without `lock`)
  blocks @11 :List(BlockDef);  # --blocks: dependency blocks, in file order (empty: none)
  transfer @12 :TransferOptions;
  fanout @13 :UInt32;          # --fanout: relay children per node (0 = the master sends to each remote)
}

# One block of a `--blocks` file: its files are staged on each remote and put in
# place together, under the remote agent's journal.
struct BlockDef {
  name @0 :Text;               # 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit
  select @1 :Text;             # a `--select` expression (text; the server parses it)
  after @2 :List(Text);        # blocks that must be committed on a remote before this one
}

enum Action {
  transfer @0;
  delete @1;
  mkdir @2;
  setAttrs @3;
  symlink @4;
  hardLink @5;
  skip @6;
}

struct PlanItem {
  remote @0 :UInt32;           # index into syncRequest.remotes
  path @1 :Data;
  action @2 :Action;
  size @3 :UInt64;
  detail @4 :Text;             # why (e.g. "checksum differs", "mode 644->755", "fifo skipped")
}

struct PlanItems {
  items @0 :List(PlanItem);
}

struct Failure {
  path @0 :Data;
  message @1 :Text;
}

# Sent once per remote when it is finished (or has failed).
struct RemoteResult {
  remote @0 :UInt32;           # index into syncRequest.remotes
  ok @1 :Bool;
  error @2 :Text;              # why the whole remote failed (connection, auth, ...)
  transferred @3 :UInt64;      # files sent
  bytes @4 :UInt64;
  deleted @5 :UInt64;
  changed @6 :UInt64;          # other changes (attrs, links, mkdir)
  failures @7 :List(Failure);  # per-item failures
  rounds @8 :UInt32;           # consistency checks run (0: none)
  resynced @9 :UInt64;         # files synchronized again by the consistency loop
  inconsistent @10 :List(Failure); # files still inconsistent after the last round, with why
  wireBytes @11 :UInt64;       # bytes of file data on the wire (after compression and deltas)
  source @12 :Text;            # who sent this remote its files: "" = the master, else a relay's address
}

struct SyncProgress {
  remote @0 :UInt32;
  doneFiles @1 :UInt64;
  totalFiles @2 :UInt64;
  doneBytes @3 :UInt64;
  totalBytes @4 :UInt64;
}

# ---------------------------------------------------------------- consistency

# A file the remote received in this job, as the master sent it.
struct ExpectedFile {
  path @0 :Data;
  digest @1 :Data;         # in the request's algorithm; empty: whatever the agent recorded
  size @2 :UInt64;
}

# Server -> remote agent, after the transfers: check that each file is still
# what was received (the agent's configured checks). Answered by one or more
# `consistencyReply`, the last with `last = true`.
struct ConsistencyRequest {
  requestId @0 :UInt64;
  algorithm @1 :Text;
  files @2 :List(ExpectedFile);
}

struct Inconsistency {
  path @0 :Data;
  check @1 :Text;          # name of the check that found it
  message @2 :Text;        # what is wrong
}

# Only the inconsistent files are listed; `checked` counts the files checked.
struct ConsistencyReply {
  requestId @0 :UInt64;
  inconsistent @1 :List(Inconsistency);
  checked @2 :UInt64;
  last @3 :Bool;
}

struct SyncDone {
  ok @0 :Bool;
  message @1 :Text;
}

struct ErrorMsg {
  requestId @0 :UInt64;
  message @1 :Text;
}

# Master -> remote, first frame of a file stream between TLS agents: the ticket of the
# send order (see fleetsync_proto::ticket and PROTOCOL.md).
struct StreamTicket {
  ticket @0 :Data;
}
