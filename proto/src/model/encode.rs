//! Model -> Cap'n Proto: fills the builder of each message from its [`Msg`].

use super::entry::FileEntry;
use super::msg::Msg;
use super::types::{
    Attrs, BasisFound, BasisItem, BlockDef, ChecksumResult, ExpectedFile, Failure,
    InconsistentFile, ItemResult, Op, OpKind, PlanItem, RelayNode, TransferOptions, Version,
};
use super::wire::{write_data, write_list, write_texts};
use crate::fleetsync_capnp as schema;

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
}

impl Op {
    fn write_to(&self, mut ob: schema::op::Builder<'_>) {
        ob.set_path(&self.path);
        match &self.kind {
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

impl ChecksumResult {
    fn write_to(&self, mut b: schema::checksum_result::Builder<'_>) {
        b.set_path(&self.path);
        b.set_size(self.size);
        match &self.digest {
            Ok(d) => b.set_digest(d),
            Err(e) => b.set_error(e.as_str()),
        }
    }
}

impl ItemResult {
    fn write_to(&self, mut b: schema::item_result::Builder<'_>) {
        b.set_path(&self.path);
        b.set_outcome(self.outcome.to_schema());
        b.set_message(self.message.as_str());
        b.set_bytes(self.bytes);
        b.set_digest(&self.digest);
        b.set_wire_bytes(self.wire_bytes);
        b.set_coding(self.coding.as_str());
    }
}

impl TransferOptions {
    fn write_to(&self, mut b: schema::transfer_options::Builder<'_>) {
        b.set_compress(self.compress.as_str());
        b.set_bwlimit(self.bwlimit);
        b.set_master_bwlimit(self.master_bwlimit);
        b.set_no_delta(self.no_delta);
    }
}

impl Version {
    fn write_to(&self, mut b: schema::version::Builder<'_>) {
        b.set_size(self.size);
        b.set_digest(&self.digest);
    }
}

impl RelayNode {
    fn write_to(&self, mut b: schema::relay_node::Builder<'_>) {
        b.set_target(self.target.as_str());
        b.set_request_id(self.request_id);
        b.set_ticket(&self.ticket);
        let l = b.init_children(self.children.len() as u32);
        write_list(l, &self.children, RelayNode::write_to);
    }
}

impl BasisItem {
    fn write_to(&self, mut b: schema::basis_item::Builder<'_>) {
        b.set_path(&self.path);
        b.set_basis(&self.basis);
        b.set_signature(self.signature);
        write_list(
            b.init_known(self.known.len() as u32),
            &self.known,
            Version::write_to,
        );
    }
}

impl BasisFound {
    fn write_to(&self, mut b: schema::basis_found::Builder<'_>) {
        b.set_index(self.index);
        b.set_basis_size(self.basis_size);
        b.set_basis_digest(&self.basis_digest);
        b.set_signature(&self.signature);
        b.set_partial_size(self.partial_size);
        b.set_partial_digest(&self.partial_digest);
    }
}

impl BlockDef {
    fn write_to(&self, mut b: schema::block_def::Builder<'_>) {
        b.set_name(self.name.as_str());
        b.set_select(self.select.as_str());
        write_texts(b.init_after(self.after.len() as u32), &self.after);
    }
}

impl PlanItem {
    fn write_to(&self, mut b: schema::plan_item::Builder<'_>) {
        b.set_remote(self.remote);
        b.set_path(&self.path);
        b.set_action(self.action.to_schema());
        b.set_size(self.size);
        b.set_detail(self.detail.as_str());
    }
}

impl Failure {
    fn write_to(&self, mut b: schema::failure::Builder<'_>) {
        b.set_path(&self.path);
        b.set_message(self.message.as_str());
    }
}

impl ExpectedFile {
    fn write_to(&self, mut b: schema::expected_file::Builder<'_>) {
        b.set_path(&self.path);
        b.set_digest(&self.digest);
        b.set_size(self.size);
    }
}

impl InconsistentFile {
    fn write_to(&self, mut b: schema::inconsistency::Builder<'_>) {
        b.set_path(&self.path);
        b.set_check(self.check.as_str());
        b.set_message(self.message.as_str());
    }
}

impl Msg {
    pub(super) fn write_to(&self, root: schema::message::Builder<'_>) {
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
                frame_compression,
            } => {
                let mut b = root.init_auth();
                b.set_protocol(*protocol);
                b.set_role(role.to_schema());
                b.set_mac(mac);
                b.set_nonce(nonce);
                b.set_frame_compression(*frame_compression);
            }
            Msg::Welcome {
                mac,
                can_chown,
                frame_compression,
                tree,
            } => {
                let mut b = root.init_welcome();
                b.set_mac(mac);
                b.set_can_chown(*can_chown);
                b.set_frame_compression(*frame_compression);
                b.set_host(tree.host.as_str());
                let mut chain = b.init_root_chain(2 * tree.chain.len() as u32);
                for (i, (dev, ino)) in tree.chain.iter().enumerate() {
                    chain.set(2 * i as u32, *dev);
                    chain.set(2 * i as u32 + 1, *ino);
                }
            }
            Msg::ListRequest {
                request_id,
                classification,
                batch_size,
                sweep_partials,
                cached_digests,
            } => {
                let mut b = root.init_list_request();
                b.set_sweep_partials(*sweep_partials);
                b.set_cached_digests(cached_digests.as_str());
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
                let l = b.init_entries(entries.len() as u32);
                write_list(l, entries, FileEntry::write_to);
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
                write_data(b.init_paths(paths.len() as u32), paths);
            }
            Msg::ChecksumReply {
                request_id,
                results,
                last,
            } => {
                let mut b = root.init_checksum_reply();
                b.set_request_id(*request_id);
                b.set_last(*last);
                let l = b.init_results(results.len() as u32);
                write_list(l, results, ChecksumResult::write_to);
            }
            Msg::SendOrder {
                request_id,
                target,
                algorithm,
                paths,
                lock_timeout_ms,
                stage,
                transfer,
                bases,
                sizes,
                ticket,
                relays,
            } => {
                let mut b = root.init_send_order();
                b.set_ticket(ticket);
                let l = b.reborrow().init_relays(relays.len() as u32);
                write_list(l, relays, RelayNode::write_to);
                transfer.write_to(b.reborrow().init_transfer());
                write_data(b.reborrow().init_bases(bases.len() as u32), bases);
                {
                    let mut l = b.reborrow().init_sizes(sizes.len() as u32);
                    for (i, s) in sizes.iter().enumerate() {
                        l.set(i as u32, *s);
                    }
                }
                b.set_stage(stage.as_str());
                b.set_request_id(*request_id);
                b.set_lock(lock_timeout_ms.is_some());
                b.set_lock_timeout_ms(lock_timeout_ms.unwrap_or(0));
                b.set_target(target.as_str());
                b.set_algorithm(algorithm.as_str());
                write_data(b.init_paths(paths.len() as u32), paths);
            }
            Msg::ApplyRequest { request_id, ops } => {
                let mut b = root.init_apply_request();
                b.set_request_id(*request_id);
                write_list(b.init_ops(ops.len() as u32), ops, Op::write_to);
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
                write_list(b.init_ops(ops.len() as u32), ops, Op::write_to);
            }
            Msg::ItemResults {
                request_id,
                results,
            } => {
                let mut b = root.init_item_results();
                b.set_request_id(*request_id);
                let l = b.init_results(results.len() as u32);
                write_list(l, results, ItemResult::write_to);
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
                coding,
                basis,
                basis_size,
            } => {
                let mut b = root.init_file_start();
                b.set_coding(coding.to_schema());
                b.set_basis(basis);
                b.set_basis_size(*basis_size);
                b.set_stage(stage.as_str());
                b.set_request_id(*request_id);
                b.set_lock(lock_timeout_ms.is_some());
                b.set_lock_timeout_ms(lock_timeout_ms.unwrap_or(0));
                b.set_algorithm(algorithm.as_str());
                entry.write_to(b.init_entry());
            }
            Msg::FileChunk { data, zstd } => {
                let mut b = root.init_file_chunk();
                b.set_data(data);
                b.set_zstd(*zstd);
            }
            Msg::BasisQuery {
                request_id,
                algorithm,
                items,
            } => {
                let mut b = root.init_basis_query();
                b.set_request_id(*request_id);
                b.set_algorithm(algorithm.as_str());
                write_list(b.init_items(items.len() as u32), items, BasisItem::write_to);
            }
            Msg::BasisReply { request_id, items } => {
                let mut b = root.init_basis_reply();
                b.set_request_id(*request_id);
                write_list(
                    b.init_items(items.len() as u32),
                    items,
                    BasisFound::write_to,
                );
            }
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
            Msg::StreamTicket { ticket } => {
                root.init_stream_ticket().set_ticket(ticket);
            }
            Msg::Forward {
                request_id,
                children,
            } => {
                let mut b = root.init_forward();
                b.set_request_id(*request_id);
                let l = b.init_children(children.len() as u32);
                write_list(l, children, RelayNode::write_to);
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
                b.set_fanout(r.fanout);
                write_texts(
                    b.reborrow().init_remotes(r.remotes.len() as u32),
                    &r.remotes,
                );
                let l = b.reborrow().init_blocks(r.blocks.len() as u32);
                write_list(l, &r.blocks, BlockDef::write_to);
                r.transfer.write_to(b.reborrow().init_transfer());
                r.classification.write_to(b.init_classification());
            }
            Msg::PlanItems(items) => {
                let l = root.init_plan_items().init_items(items.len() as u32);
                write_list(l, items, PlanItem::write_to);
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
                b.set_wire_bytes(r.wire_bytes);
                b.set_source(r.source.as_str());
                let l = b.reborrow().init_failures(r.failures.len() as u32);
                write_list(l, &r.failures, Failure::write_to);
                let l = b.init_inconsistent(r.inconsistent.len() as u32);
                write_list(l, &r.inconsistent, Failure::write_to);
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
                let l = b.init_files(files.len() as u32);
                write_list(l, files, ExpectedFile::write_to);
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
                let l = b.init_inconsistent(inconsistent.len() as u32);
                write_list(l, inconsistent, InconsistentFile::write_to);
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
}
