//! One sync request: the master's list and the [`RemoteSync`] of each remote, and what
//! passes between the pairs (master checksums serve every pair).

use std::sync::Arc;

use fleetsync_proto::{EntryRef, Msg, SyncRequest};
use tracing::info;

use crate::list::FileList;
use crate::remote_sync::{push_entry, BlockSet, JobShared, Peer, RemoteSync};

/// The pairs of one job and what they share.
pub(crate) struct SyncJob {
    pub(crate) shared: JobShared,
    /// The master's list while it arrives.
    master_building: FileList,
    pub(crate) pairs: Vec<RemoteSync>,
}

impl SyncJob {
    /// Checks a request before anything is connected: its classification compiles, it
    /// names remotes, its blocks are valid. Gives the job's compiled blocks.
    pub(crate) fn check(req: &SyncRequest) -> Result<Option<Arc<BlockSet>>, String> {
        fleetsync_select::Classification::from(&req.classification)
            .compile()
            .map_err(|e| e.to_string())?;
        if req.remotes.is_empty() {
            return Err("no remotes given".to_owned());
        }
        BlockSet::from_request(&req.blocks)
    }

    /// A job checked by [`SyncJob::check`].
    pub(crate) fn new(id: u64, req: SyncRequest, blocks: Option<Arc<BlockSet>>) -> Self {
        let pairs = req
            .remotes
            .iter()
            .enumerate()
            .map(|(i, a)| RemoteSync::new(i, a.clone()))
            .collect();
        SyncJob {
            shared: JobShared::new(id, req, blocks),
            master_building: FileList::new(),
            pairs,
        }
    }

    /// The request for the master's list.
    pub(crate) fn master_list_request(&self) -> Msg {
        Msg::ListRequest {
            request_id: 0,
            classification: self.shared.req.classification.clone(),
            batch_size: 0,
            sweep_partials: false,
        }
    }

    /// One entry of the master's list.
    pub(crate) fn push_master_entry(&mut self, e: &EntryRef<'_>) -> Result<(), String> {
        push_entry(&mut self.master_building, e)
    }

    /// The master's list is complete: plan every pair whose remote is listed.
    pub(crate) fn on_master_listed(&mut self) -> Result<(), String> {
        let mut list = std::mem::take(&mut self.master_building);
        list.finish().map_err(|e| e.to_string())?;
        info!(job = self.shared.id, entries = list.len(), "master listed");
        self.shared.set_master(list);
        for pair in &mut self.pairs {
            pair.try_plan(&mut self.shared);
        }
        Ok(())
    }

    /// A reply for pair `i`; an error is the connection's (the caller closes it).
    pub(crate) fn on_reply(&mut self, i: usize, from: Peer, msg: Msg) -> Result<(), String> {
        let master_sums = from == Peer::Master && matches!(msg, Msg::ChecksumReply { .. });
        self.pairs[i].on_reply(from, msg, &mut self.shared)?;
        if master_sums {
            // Master checksums may complete any remote's set.
            for pair in &mut self.pairs {
                pair.check_sums_ready(&mut self.shared);
            }
        }
        Ok(())
    }

    /// Pair `i` fails; if master checksums are lost with its connection, the others ask
    /// for them again.
    pub(crate) fn fail_pair(&mut self, i: usize, why: String) {
        if self.pairs[i].fail(why, &self.shared) {
            self.shared.master_sums.forget_pending();
            for pair in &mut self.pairs {
                pair.restart_master_sums(&mut self.shared);
            }
        }
    }

    /// Whether every pair is through.
    pub(crate) fn all_done(&self) -> bool {
        self.pairs.iter().all(RemoteSync::is_done)
    }
}
