//! One sync request: the master's list and the [`RemoteSync`] of each remote, and what
//! passes between the pairs (master checksums serve every pair).

use std::sync::Arc;

use fleetsync_proto::{EntryRef, Msg, SyncRequest};
use tracing::info;

use crate::relay::{Relays, Release};
use crate::remote_sync::{BlockSet, JobShared, Peer, RemoteSync};

/// The pairs of one job and what they share.
pub(crate) struct SyncJob {
    pub(crate) shared: JobShared,
    pub(crate) pairs: Vec<RemoteSync>,
    /// `--fanout`: the relay trees of the job's sends.
    pub(crate) relays: Relays,
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
            relays: Relays::new(req.fanout),
            shared: JobShared::new(id, req, blocks),
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
            cached_digests: self.shared.cached_digests(),
        }
    }

    /// One entry of the master's list.
    pub(crate) fn push_master_entry(&mut self, e: &EntryRef<'_>) -> Result<(), String> {
        self.shared.push_master(e)
    }

    /// One entry of remote `i`'s list.
    pub(crate) fn push_remote_entry(&mut self, i: usize, e: &EntryRef<'_>) -> Result<(), String> {
        self.pairs[i].push_listed(e, &self.shared)
    }

    /// Whether remote `i`'s list may come on (see [`RemoteSync::wants_input`]).
    pub(crate) fn remote_wants_input(&self, i: usize) -> bool {
        self.pairs[i].wants_input(&self.shared)
    }

    /// Remote `i`'s list is complete.
    pub(crate) fn on_remote_listed(&mut self, i: usize) -> Result<(), String> {
        self.pairs[i].on_listed(&mut self.shared)
    }

    /// The master's list is complete: plan every pair whose remote is listed.
    pub(crate) fn on_master_listed(&mut self) -> Result<(), String> {
        let moved = self.shared.finish_master()?;
        info!(
            job = self.shared.id,
            entries = self.shared.master.len(),
            "master listed"
        );
        for i in 0..self.pairs.len() {
            let pair = &mut self.pairs[i];
            if let Err(e) = pair
                .on_master_sorted(&moved, &self.shared)
                .and_then(|()| pair.try_plan(&mut self.shared))
            {
                self.fail_pair(i, format!("remote list: {e}"));
            }
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
        self.relays.forget(i);
        if self.pairs[i].fail(why, &self.shared) {
            self.shared.master_sums.forget_pending();
            for pair in &mut self.pairs {
                pair.restart_master_sums(&mut self.shared);
            }
        }
    }

    /// Holds the send orders among `sends` that may go through a relay tree (see
    /// [`crate::relay`]); gives back the rest, in order.
    pub(crate) fn route(&mut self, sends: Vec<(usize, Peer, Msg)>) -> Vec<(usize, Peer, Msg)> {
        if !self.relays.active(self.pairs.len()) {
            return sends;
        }
        let mut out = Vec::with_capacity(sends.len());
        for (i, to, msg) in sends {
            let plain = matches!(&msg, Msg::SendOrder { stage, .. } if stage.is_empty());
            if to == Peer::Master && plain && self.pairs[i].sending() {
                if let Some(key) = self.pairs[i].cohort_key(&msg) {
                    self.relays.hold(i, key, msg);
                    continue;
                }
            }
            out.push((i, to, msg));
        }
        out
    }

    /// The held send orders, grouped and planned into trees, once no other pair may
    /// still join their cohorts (or they have waited long enough).
    pub(crate) fn release(&mut self, next_id: &mut dyn FnMut() -> u64) -> Option<Release> {
        if !self.relays.has_held() {
            return None;
        }
        let ready = self.relays.overdue()
            || self.pairs.iter().enumerate().all(|(i, p)| {
                p.is_done()
                    || self.relays.holds(i)
                    || (!p.may_order_sends() && !self.relays.in_flight(i))
            });
        if !ready {
            return None;
        }
        let addrs: Vec<String> = self.pairs.iter().map(|p| p.addr().to_owned()).collect();
        let release = self.relays.release(&|i| addrs[i].clone(), next_id);
        for (i, source) in &release.sources {
            self.pairs[*i].set_source(source.clone());
        }
        Some(release)
    }

    /// A reply on the relay link, for the remote its request id names.
    pub(crate) fn on_relay_reply(&mut self, msg: Msg) {
        let request_id = match &msg {
            Msg::ItemResults { request_id, .. } | Msg::Error { request_id, .. } => *request_id,
            Msg::Progress(p) => p.request_id,
            Msg::Done(d) => d.request_id,
            _ => return,
        };
        let Some(i) = self.relays.pair_of(request_id) else {
            // A remote that failed meanwhile.
            return;
        };
        let msg = match msg {
            Msg::ItemResults {
                request_id,
                mut results,
            } => {
                self.relays.results(request_id, &mut results);
                if results.is_empty() {
                    return;
                }
                Msg::ItemResults {
                    request_id,
                    results,
                }
            }
            Msg::Done(d) => {
                match self.relays.done(request_id) {
                    Some((_, Some(resend))) => {
                        // The pair's `done` is the resend's.
                        self.relays.outbox.push((i, resend));
                        return;
                    }
                    _ => Msg::Done(d),
                }
            }
            other => other,
        };
        if let Err(e) = self.pairs[i].on_reply(Peer::Master, msg, &mut self.shared) {
            self.fail_pair(i, e);
        }
    }

    /// Whether every pair is through.
    pub(crate) fn all_done(&self) -> bool {
        self.pairs.iter().all(RemoteSync::is_done)
    }
}
