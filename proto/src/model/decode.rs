//! Cap'n Proto -> model: reads each message into its [`Msg`]. Never panics on
//! bad input: every malformed field is a [`ProtoError`].

use super::classification::ClassificationSpec;
use super::entry::FileEntry;
use super::msg::Msg;
use super::types::{
    Action, Attrs, BasisFound, BasisItem, BlockDef, ChecksumResult, Coding, Done, ExpectedFile,
    Failure, InconsistentFile, ItemResult, Op, OpKind, Outcome, PlanItem, Progress, RelayNode,
    RemoteResult, Role, SyncProgress, SyncRequest, TransferOptions, TreeIdentity, Version,
};
use super::wire::{data_list, read_list, text, texts};
use crate::fleetsync_capnp as schema;
use crate::fleetsync_capnp::message::Which as W;
use crate::frame;
use crate::ProtoError;

impl Attrs {
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

impl Op {
    fn read_from(o: schema::op::Reader<'_>) -> Result<Self, ProtoError> {
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
    }
}

impl ChecksumResult {
    fn read_from(r: schema::checksum_result::Reader<'_>) -> Result<Self, ProtoError> {
        use schema::checksum_result::Which as C;
        Ok(ChecksumResult {
            path: r.get_path()?.to_vec(),
            size: r.get_size(),
            digest: match r.which()? {
                C::Digest(d) => Ok(d?.to_vec()),
                C::Error(e) => Err(text(e)?),
            },
        })
    }
}

impl ItemResult {
    fn read_from(r: schema::item_result::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(ItemResult {
            path: r.get_path()?.to_vec(),
            outcome: Outcome::from_schema(r.get_outcome()?),
            message: text(r.get_message())?,
            bytes: r.get_bytes(),
            digest: r.get_digest()?.to_vec(),
            wire_bytes: r.get_wire_bytes(),
            coding: text(r.get_coding())?,
        })
    }
}

impl TransferOptions {
    fn read_from(r: schema::transfer_options::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(TransferOptions {
            compress: text(r.get_compress())?,
            bwlimit: r.get_bwlimit(),
            master_bwlimit: r.get_master_bwlimit(),
            no_delta: r.get_no_delta(),
        })
    }
}

impl Version {
    fn read_from(r: schema::version::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Version {
            size: r.get_size(),
            digest: r.get_digest()?.to_vec(),
        })
    }
}

impl RelayNode {
    fn read_from(r: schema::relay_node::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(RelayNode {
            target: text(r.get_target())?,
            request_id: r.get_request_id(),
            children: read_list(r.get_children()?, RelayNode::read_from)?,
            ticket: r.get_ticket()?.to_vec(),
        })
    }
}

impl BasisItem {
    fn read_from(r: schema::basis_item::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(BasisItem {
            path: r.get_path()?.to_vec(),
            basis: r.get_basis()?.to_vec(),
            known: read_list(r.get_known()?, Version::read_from)?,
            signature: r.get_signature(),
        })
    }
}

impl BasisFound {
    fn read_from(r: schema::basis_found::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(BasisFound {
            index: r.get_index(),
            basis_size: r.get_basis_size(),
            basis_digest: r.get_basis_digest()?.to_vec(),
            signature: r.get_signature()?.to_vec(),
            partial_size: r.get_partial_size(),
            partial_digest: r.get_partial_digest()?.to_vec(),
        })
    }
}

impl BlockDef {
    fn read_from(d: schema::block_def::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(BlockDef {
            name: text(d.get_name())?,
            select: text(d.get_select())?,
            after: texts(d.get_after()?)?,
        })
    }
}

impl PlanItem {
    fn read_from(it: schema::plan_item::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(PlanItem {
            remote: it.get_remote(),
            path: it.get_path()?.to_vec(),
            action: Action::from_schema(it.get_action()?),
            size: it.get_size(),
            detail: text(it.get_detail())?,
        })
    }
}

impl Failure {
    fn read_from(f: schema::failure::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(Failure {
            path: f.get_path()?.to_vec(),
            message: text(f.get_message())?,
        })
    }
}

impl ExpectedFile {
    fn read_from(f: schema::expected_file::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(ExpectedFile {
            path: f.get_path()?.to_vec(),
            digest: f.get_digest()?.to_vec(),
            size: f.get_size(),
        })
    }
}

impl InconsistentFile {
    fn read_from(f: schema::inconsistency::Reader<'_>) -> Result<Self, ProtoError> {
        Ok(InconsistentFile {
            path: f.get_path()?.to_vec(),
            check: text(f.get_check())?,
            message: text(f.get_message())?,
        })
    }
}

impl Msg {
    /// Decodes one frame body (as returned by [`frame::read_frame`] or
    /// [`frame::FrameDecoder::next_frame`]). Never panics on bad input.
    /// A `zstd` frame is refused (see [`Msg::decode_inflating`]).
    pub fn decode(body: &[u8]) -> Result<Msg, ProtoError> {
        let reader = frame::parse(body)?;
        Msg::from_reader(reader.get_root()?)
    }

    /// [`Msg::decode`] on a connection whose peers agreed on `frameCompression`: a `zstd`
    /// frame is decompressed ([`frame::inflate`]) and decoded as the message it holds.
    pub fn decode_inflating(body: &[u8]) -> Result<Msg, ProtoError> {
        let reader = frame::parse(body)?;
        match frame::inflate(&reader)? {
            Some(inner) => Msg::decode(&inner),
            None => Msg::from_reader(reader.get_root()?),
        }
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
                    frame_compression: b.get_frame_compression(),
                }
            }
            W::Welcome(b) => {
                let b = b?;
                let flat: Vec<u64> = b.get_root_chain()?.iter().collect();
                if !flat.len().is_multiple_of(2) {
                    return Err(ProtoError::Decode("welcome: odd rootChain length".into()));
                }
                Msg::Welcome {
                    mac: b.get_mac()?.to_vec(),
                    can_chown: b.get_can_chown(),
                    frame_compression: b.get_frame_compression(),
                    tree: TreeIdentity {
                        host: text(b.get_host())?,
                        chain: flat.chunks(2).map(|p| (p[0], p[1])).collect(),
                    },
                }
            }
            W::ListRequest(b) => {
                let b = b?;
                Msg::ListRequest {
                    request_id: b.get_request_id(),
                    classification: ClassificationSpec::read_optional(
                        b.has_classification(),
                        || b.get_classification(),
                    )?,
                    batch_size: b.get_batch_size(),
                    sweep_partials: b.get_sweep_partials(),
                    cached_digests: text(b.get_cached_digests())?,
                }
            }
            W::ListBatch(b) => {
                let b = b?;
                Msg::ListBatch {
                    request_id: b.get_request_id(),
                    entries: read_list(b.get_entries()?, FileEntry::read_from)?,
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
                Msg::ChecksumReply {
                    request_id: b.get_request_id(),
                    results: read_list(b.get_results()?, ChecksumResult::read_from)?,
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
                    transfer: TransferOptions::read_from(b.get_transfer()?)?,
                    bases: data_list(b.get_bases()?)?,
                    sizes: b.get_sizes()?.iter().collect(),
                    ticket: b.get_ticket()?.to_vec(),
                    relays: read_list(b.get_relays()?, RelayNode::read_from)?,
                }
            }
            W::ApplyRequest(b) => {
                let b = b?;
                Msg::ApplyRequest {
                    request_id: b.get_request_id(),
                    ops: read_list(b.get_ops()?, Op::read_from)?,
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
                    ops: read_list(b.get_ops()?, Op::read_from)?,
                    abort: b.get_abort(),
                }
            }
            W::ItemResults(b) => {
                let b = b?;
                Msg::ItemResults {
                    request_id: b.get_request_id(),
                    results: read_list(b.get_results()?, ItemResult::read_from)?,
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
                    coding: Coding::from_schema(b.get_coding()?),
                    basis: b.get_basis()?.to_vec(),
                    basis_size: b.get_basis_size(),
                }
            }
            W::FileChunk(b) => {
                let b = b?;
                Msg::FileChunk {
                    data: b.get_data()?.to_vec(),
                    zstd: b.get_zstd(),
                }
            }
            W::BasisQuery(b) => {
                let b = b?;
                Msg::BasisQuery {
                    request_id: b.get_request_id(),
                    algorithm: text(b.get_algorithm())?,
                    items: read_list(b.get_items()?, BasisItem::read_from)?,
                }
            }
            W::BasisReply(b) => {
                let b = b?;
                Msg::BasisReply {
                    request_id: b.get_request_id(),
                    items: read_list(b.get_items()?, BasisFound::read_from)?,
                }
            }
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
            W::StreamTicket(b) => Msg::StreamTicket {
                ticket: b?.get_ticket()?.to_vec(),
            },
            W::Forward(b) => {
                let b = b?;
                Msg::Forward {
                    request_id: b.get_request_id(),
                    children: read_list(b.get_children()?, RelayNode::read_from)?,
                }
            }
            W::SyncRequest(b) => {
                let b = b?;
                Msg::SyncRequest(SyncRequest {
                    master: text(b.get_master())?,
                    remotes: texts(b.get_remotes()?)?,
                    algorithm: text(b.get_algorithm())?,
                    delete: b.get_delete(),
                    dry_run: b.get_dry_run(),
                    verify: b.get_verify(),
                    classification: ClassificationSpec::read_optional(
                        b.has_classification(),
                        || b.get_classification(),
                    )?,
                    lock_timeout_ms: b.get_lock().then(|| b.get_lock_timeout_ms()),
                    max_rounds: b.get_max_rounds(),
                    lock_resync_ms: b.get_lock_resync().then(|| b.get_lock_timeout_ms()),
                    blocks: read_list(b.get_blocks()?, BlockDef::read_from)?,
                    transfer: TransferOptions::read_from(b.get_transfer()?)?,
                    fanout: b.get_fanout(),
                })
            }
            W::PlanItems(b) => Msg::PlanItems(read_list(b?.get_items()?, PlanItem::read_from)?),
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
                    failures: read_list(b.get_failures()?, Failure::read_from)?,
                    rounds: b.get_rounds(),
                    resynced: b.get_resynced(),
                    inconsistent: read_list(b.get_inconsistent()?, Failure::read_from)?,
                    wire_bytes: b.get_wire_bytes(),
                    source: text(b.get_source())?,
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
                    files: read_list(b.get_files()?, ExpectedFile::read_from)?,
                }
            }
            W::ConsistencyReply(b) => {
                let b = b?;
                Msg::ConsistencyReply {
                    request_id: b.get_request_id(),
                    inconsistent: read_list(b.get_inconsistent()?, InconsistentFile::read_from)?,
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
            W::Zstd(_) => {
                return Err(ProtoError::Decode(
                    "a zstd frame where none may be (not agreed on, or nested)".into(),
                ))
            }
        })
    }
}
