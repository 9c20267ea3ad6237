//! The sync of one master/remote pair, as a state machine without sockets.
//!
//! `connect → list → checksums → before (deletes, mkdirs) → sends → blocks (see
//! [`block_run`]) → after (links, attributes) → consistency rounds (see [`consistency`]) →
//! done | failed`.
//!
//! A [`RemoteSync`] is fed the agents' replies and queues what it wants sent in its outbox,
//! as `(Peer, Msg)`: the event loop takes them out ([`RemoteSync::drain_outbox`]), gives the
//! requests their ids and writes them to the pair's connections. What the pairs of one job
//! share (the master list, the master checksums) is a [`JobShared`].

use std::sync::Arc;

use fleetsync_proto::{
    Action, ChecksumResult, EntryRef, Failure, FileKind, ItemResult, Msg, Outcome, PlanItem,
    RemoteResult, SyncProgress, SyncRequest,
};
use tracing::{debug, info, warn};

use crate::checksums::{DigestWidth, SumState, SumTable, Verdict, Verdicts};
use crate::list::{FileList, Kind, Meta};
use crate::ops::apply_ops;
use crate::plan::{describe, PairPlan, Plan, PlanOptions, Step, StepKind};
use crate::remote_list::{walk_order, MasterRef, RemoteBuilder, RemoteList};

mod block_run;
mod consistency;
#[cfg(test)]
mod tests;

use block_run::BlockRun;
pub(crate) use block_run::BlockSet;
use consistency::Rounds;

/// Paths per checksum request / send order / apply request (frames ≤ 16 MiB).
const CHUNK: usize = 20_000;
/// Plan items per `planItems` frame.
const ITEMS_PER_FRAME: usize = 2_000;
/// Per-item failures kept per remote (the rest are only counted).
const MAX_FAILURES: usize = 1_000;
/// Requests in flight per connection and purpose: the rest is built only
/// when an answer comes, so memory does not grow with the tree.
const WINDOW: usize = 2;

/// Where a message of a pair goes, or where a reply came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    /// The control client of the job.
    Control,
    /// The pair's own connection to the master agent (checksums, sends).
    Master,
    /// The remote agent.
    Remote,
}

/// Where a pair is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairState {
    Connecting,
    Listing,
    Listed,
    Checksums,
    Before,
    Sending,
    /// The dependency blocks, one at a time ([`block_run`]).
    Blocks,
    After,
    /// Consistency loop (see [`consistency`]): waiting for the remote's check.
    Checking,
    /// Consistency loop: synchronizing the inconsistent files again.
    Resyncing,
    Done,
}

/// What the pairs of one job share.
pub(crate) struct JobShared {
    /// The job's number (logs, stage names).
    pub(crate) id: u64,
    pub(crate) req: SyncRequest,
    /// The master's list (empty until `master_listed`).
    pub(crate) master: Arc<FileList>,
    pub(crate) master_listed: bool,
    /// The master's list while it arrives (in the order listed).
    master_building: FileList,
    /// Whether `master_building` came in walk order (see [`MasterRef::walk_sorted`]).
    master_walk_sorted: bool,
    /// Master checksums, per master index (shared: one checksum serves every remote).
    pub(crate) master_sums: SumTable,
    /// Regular files of the master listed without a digest (0: no pair asks the master
    /// for a checksum, nor looks for one missing).
    pub(crate) master_unlisted_sums: usize,
    pub(crate) width: DigestWidth,
    /// `--blocks`: the checked blocks of the request.
    pub(crate) blocks: Option<Arc<BlockSet>>,
}

impl JobShared {
    /// A job whose master is not listed yet.
    pub(crate) fn new(id: u64, req: SyncRequest, blocks: Option<Arc<BlockSet>>) -> Self {
        JobShared {
            id,
            req,
            master: Arc::new(FileList::new()),
            master_listed: false,
            master_building: FileList::new(),
            master_walk_sorted: true,
            master_sums: SumTable::default(),
            master_unlisted_sums: 0,
            width: DigestWidth::default(),
            blocks,
        }
    }

    /// One entry of the master's list.
    pub(crate) fn push_master(&mut self, e: &EntryRef<'_>) -> Result<(), String> {
        let list = &mut self.master_building;
        if self.master_walk_sorted && !list.is_empty() {
            let last = list.path(list.len() as u32 - 1);
            self.master_walk_sorted = walk_order(last, e.path).is_lt();
        }
        list.push(e.path, &entry_meta(e), e.link_target.unwrap_or(b""))
            .map_err(|err| err.to_string())?;
        match listed_digest(e) {
            Some(d) => list.set_last_digest(d).map_err(|err| err.to_string()),
            None => Ok(()),
        }
    }

    /// The master's list is complete: sorts it. Gives where each entry went (see
    /// [`FileList::finish_mapped`]).
    pub(crate) fn finish_master(&mut self) -> Result<Vec<u32>, String> {
        let mut list = std::mem::take(&mut self.master_building);
        let moved = list.finish_mapped().map_err(|e| e.to_string())?;
        self.set_master(list)?;
        Ok(moved)
    }

    /// The master's list is complete (sorted); the digests it was listed with become master
    /// checksums (not asked for again). The list keeps them too: remote entries matched
    /// from now on are compared with them as they arrive.
    pub(crate) fn set_master(&mut self, list: FileList) -> Result<(), String> {
        self.master_sums = SumTable::new(list.len());
        let mut near = 0;
        self.master_unlisted_sums = 0;
        for m in 0..list.len() as u32 {
            if let Some(d) = list.digest_near(m, &mut near) {
                let width = self.width.check(d)?;
                self.master_sums.store(m as usize, width, d);
            } else if list.is_file(m) {
                self.master_unlisted_sums += 1;
            }
        }
        self.master = Arc::new(list);
        self.master_listed = true;
        Ok(())
    }

    /// What the agents are asked to attach to their listings: the digests their checksum
    /// caches hold in the job's algorithm, except when the job wants fresh checksums.
    pub(crate) fn cached_digests(&self) -> String {
        if self.req.verify {
            String::new()
        } else {
            self.req.algorithm.clone()
        }
    }

    /// The master's list as remote entries are matched against it.
    pub(crate) fn master_ref(&self) -> MasterRef<'_> {
        MasterRef {
            list: if self.master_listed {
                &self.master
            } else {
                &self.master_building
            },
            complete: self.master_listed,
            walk_sorted: self.master_walk_sorted,
        }
    }
}

/// The digest a `listBatch` entry was listed with (regular files only).
pub(crate) fn listed_digest<'a>(e: &EntryRef<'a>) -> Option<&'a [u8]> {
    e.digest.filter(|_| e.kind == FileKind::File)
}

/// The metadata of one entry of a `listBatch`.
pub(crate) fn entry_meta(e: &EntryRef<'_>) -> Meta {
    let kind = match e.kind {
        FileKind::File => Kind::File,
        FileKind::Dir => Kind::Dir,
        FileKind::Symlink => Kind::Symlink,
        _ => Kind::Special,
    };
    Meta {
        kind: Some(kind),
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
        dev: e.dev,
        inode: e.inode,
        nlink: e.nlink,
    }
}

/// Checksum requests of a pair: where the next candidate is (a master index: candidates
/// are named by theirs) and requests in flight, on each side.
#[derive(Default)]
struct SumRequests {
    remote_next: u32,
    remote_out: usize,
    master_next: u32,
    master_out: usize,
    /// After the last remote answer (answers come in the order asked).
    remote_hint: u32,
    /// Every candidate before this master index has its master checksum (a digest, or
    /// failed: never asked again).
    master_ready: u32,
}

/// The sync of one master/remote pair.
pub(crate) struct RemoteSync {
    /// The remote's position in the request.
    index: usize,
    addr: String,
    can_chown: bool,
    /// The remote's list while it arrives, compacted against the master's.
    building: RemoteBuilder,
    /// The remote's list once it and the master's are complete.
    list: RemoteList,
    state: PairState,
    pair: Option<PairPlan>,
    /// Remote checksum verdict of each candidate of `pair`, by master index.
    sums: Verdicts,
    requests: SumRequests,
    /// Next step of the current phase to send, and requests in flight.
    pcur: usize,
    pending: usize,
    plan: Option<Plan>,
    result: RemoteResult,
    failed_count: u64,
    done_bytes: u64,
    done_files: u64,
    total_bytes: u64,
    /// Bytes of the send orders finished before the current one (progress
    /// within the current order is added to it).
    progress_base: u64,
    /// Next plan step to itemize to the control client.
    emit_cur: usize,
    /// The remote is finished but its plan is still being itemized.
    finish_deferred: bool,
    /// The consistency loop after the transfers.
    rounds: Rounds,
    /// `--blocks`: the plan split into unblocked phases and blocks.
    blocks: Option<BlockRun>,
    outbox: Vec<(Peer, Msg)>,
}

impl RemoteSync {
    /// The pair of remote number `index`, at `addr`, before its agent answered.
    pub(crate) fn new(index: usize, addr: String) -> Self {
        RemoteSync {
            index,
            addr,
            can_chown: false,
            building: RemoteBuilder::default(),
            list: RemoteList::default(),
            state: PairState::Connecting,
            pair: None,
            sums: Verdicts::default(),
            requests: SumRequests::default(),
            pcur: 0,
            pending: 0,
            plan: None,
            result: RemoteResult {
                remote: index as u32,
                ..RemoteResult::default()
            },
            failed_count: 0,
            done_bytes: 0,
            done_files: 0,
            total_bytes: 0,
            progress_base: 0,
            emit_cur: 0,
            finish_deferred: false,
            rounds: Rounds::default(),
            blocks: None,
            outbox: Vec::new(),
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the pair is in its send phase (outside every block).
    pub(crate) fn sending(&self) -> bool {
        self.state == PairState::Sending
    }

    /// Whether the pair may still produce a send order of its send phase: it has not
    /// reached it yet, or has files of it left to order.
    pub(crate) fn may_order_sends(&self) -> bool {
        match self.state {
            PairState::Connecting
            | PairState::Listing
            | PairState::Listed
            | PairState::Checksums
            | PairState::Before => true,
            PairState::Sending => self.pcur < self.phase_steps().len(),
            _ => false,
        }
    }

    /// What makes this pair's send `order` the same bytes as another pair's (see
    /// [`crate::relay`]): its files, their bases and each basis's size and mtime here.
    pub(crate) fn cohort_key(&self, order: &Msg) -> Option<crate::relay::CohortKey> {
        let Msg::SendOrder {
            paths,
            bases,
            sizes,
            ..
        } = order
        else {
            return None;
        };
        let basis_meta = bases
            .iter()
            .map(|b| {
                if b.is_empty() {
                    return (0, 0, 0);
                }
                match self.list.find(b) {
                    Some(i) => {
                        let m = self.list.meta(i);
                        (m.size, m.mtime_sec, m.mtime_nsec)
                    }
                    None => (u64::MAX, 0, 0),
                }
            })
            .collect();
        Some(crate::relay::CohortKey {
            paths: paths.clone(),
            bases: bases.clone(),
            sizes: sizes.clone(),
            basis_meta,
        })
    }

    /// Who sends this remote its files (a relay's address; empty: the master).
    pub(crate) fn set_source(&mut self, source: String) {
        if self.result.source.is_empty() {
            self.result.source = source;
        }
    }

    /// Where the pair is (the event loop only needs [`RemoteSync::is_done`]).
    #[cfg(test)]
    pub(crate) fn state(&self) -> PairState {
        self.state
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == PairState::Done
    }

    /// The outcome (final once [`RemoteSync::is_done`]).
    pub(crate) fn result(&self) -> &RemoteResult {
        &self.result
    }

    /// Items that failed (more than `result().failures` holds).
    pub(crate) fn failed_count(&self) -> u64 {
        self.failed_count
    }

    /// The messages queued since the last call, in order. Requests carry `request_id` 0:
    /// the sender numbers them.
    pub(crate) fn drain_outbox(&mut self) -> Vec<(Peer, Msg)> {
        std::mem::take(&mut self.outbox)
    }

    /// Whether messages wait in the outbox.
    pub(crate) fn has_outbox(&self) -> bool {
        !self.outbox.is_empty()
    }

    fn send(&mut self, to: Peer, msg: Msg) {
        self.outbox.push((to, msg));
    }

    /// Counts a failed item, keeping its message while there are few.
    fn record_failure(&mut self, path: Vec<u8>, message: String) {
        self.failed_count += 1;
        if self.result.failures.len() < MAX_FAILURES {
            self.result.failures.push(Failure { path, message });
        }
    }

    fn progress(&self, done_bytes: u64) -> Msg {
        Msg::SyncProgress(SyncProgress {
            remote: self.index as u32,
            done_files: self.done_files,
            total_files: self.plan.as_ref().map_or(0, |p| p.sends().len() as u64),
            done_bytes,
            total_bytes: self.total_bytes,
        })
    }

    // ------------------------------------------------------------ listing

    /// The remote agent authenticated: ask for its list.
    pub(crate) fn on_remote_ready(&mut self, can_chown: bool, shared: &JobShared) {
        self.can_chown = can_chown;
        self.state = PairState::Listing;
        self.send(
            Peer::Remote,
            Msg::ListRequest {
                request_id: 0,
                classification: shared.req.classification.clone(),
                batch_size: 0,
                sweep_partials: !shared.req.dry_run && !shared.req.verify,
                cached_digests: shared.cached_digests(),
            },
        );
    }

    /// One entry of the remote's list.
    pub(crate) fn push_listed(
        &mut self,
        e: &EntryRef<'_>,
        shared: &JobShared,
    ) -> Result<(), String> {
        self.building
            .push(
                e.path,
                &entry_meta(e),
                e.link_target.unwrap_or(b""),
                listed_digest(e),
                &shared.master_ref(),
            )
            .map_err(|e| e.to_string())
    }

    /// One entry of the remote's list, matched against the master's (unit tests).
    #[cfg(test)]
    pub(crate) fn push_meta(
        &mut self,
        path: &[u8],
        meta: &Meta,
        link_target: &[u8],
        shared: &JobShared,
    ) -> Result<(), String> {
        self.building
            .push(path, meta, link_target, None, &shared.master_ref())
            .map_err(|e| e.to_string())
    }

    /// Whether more of the remote's list may come: not while too much of it waits for the
    /// master's (the event loop stops reading the remote until the master caught up).
    pub(crate) fn wants_input(&self, shared: &JobShared) -> bool {
        self.building.wants_input(shared.master_ref().list.len())
    }

    /// The remote's list is complete.
    pub(crate) fn on_listed(&mut self, shared: &mut JobShared) -> Result<(), String> {
        self.state = PairState::Listed;
        info!(
            job = shared.id,
            remote = %self.addr,
            entries = self.building.len(),
            waiting = self.building.pending_len(),
            "remote listed"
        );
        self.try_plan(shared)
    }

    /// The master's list is complete and sorted (`moved`: where each entry went): what
    /// the remote's list matched so far follows it.
    pub(crate) fn on_master_sorted(
        &mut self,
        moved: &[u32],
        shared: &JobShared,
    ) -> Result<(), String> {
        if !matches!(
            self.state,
            PairState::Connecting | PairState::Listing | PairState::Listed
        ) {
            return Ok(());
        }
        self.building
            .master_sorted(moved, &shared.master_ref())
            .map_err(|e| e.to_string())
    }

    /// Plans the pair once both lists are in, and asks for the checksums it needs. An
    /// error is the remote list's (a path listed twice).
    pub(crate) fn try_plan(&mut self, shared: &mut JobShared) -> Result<(), String> {
        if !shared.master_listed || self.state != PairState::Listed {
            return Ok(());
        }
        let building = std::mem::take(&mut self.building);
        self.list = building
            .finish(shared.master.clone())
            .map_err(|e| e.to_string())?;
        debug!(job = shared.id, remote = %self.addr, same = self.list.same_count(), others = self.list.others().len(), "remote list compacted");
        let opts = PlanOptions {
            delete: shared.req.delete,
            owner: self.can_chown,
        };
        let pair = PairPlan::new(&shared.master, &self.list, opts);
        // By master index: a candidate's number is known as soon as its entry matched.
        self.sums = Verdicts::new(shared.master.len());
        // The candidates both sides listed a digest for need no checksum request.
        let listed = self.list.take_listed_digests();
        for m in listed.equal() {
            self.sums.same(m as usize);
        }
        for (m, d) in listed.held() {
            shared.width.check(d)?;
            self.sums
                .record(m as usize, d, &shared.master_sums, m as usize);
        }
        let mut known = listed.len();
        let others = self.list.others();
        // (No pass over the candidates when none of the others came with a digest.)
        let candidates = others
            .has_digests()
            .then(|| pair.candidates_from(&shared.master, &self.list, 0));
        for (m, r) in candidates.into_iter().flatten() {
            if let Some(d) = self.list.other_of(r).and_then(|j| others.digest(j)) {
                shared.width.check(d)?;
                self.sums
                    .record(m as usize, d, &shared.master_sums, m as usize);
                known += 1;
            }
        }
        // Every candidate's remote digest listed (a warm re-sync): nothing to ask the
        // remote, no pass over the candidates to find out.
        if known >= pair.candidate_count() {
            self.requests.remote_next = shared.master.len() as u32;
        }
        if shared.master_unlisted_sums == 0 {
            self.requests.master_next = shared.master.len() as u32;
        }
        self.pair = Some(pair);
        self.state = PairState::Checksums;
        self.pump_sums(shared);
        self.check_sums_ready(shared);
        Ok(())
    }

    // ---------------------------------------------------------- checksums

    /// Sends the next checksum requests (both sides), keeping at most [`WINDOW`] in flight
    /// on each connection.
    fn pump_sums(&mut self, shared: &mut JobShared) {
        loop {
            if self.state != PairState::Checksums {
                return;
            }
            let Some(pair) = &self.pair else { return };
            let master = &shared.master;
            let nm = master.len() as u32;
            let q = &mut self.requests;
            let mut msgs: Vec<(Peer, Vec<Vec<u8>>)> = Vec::new();
            if q.remote_out < WINDOW && q.remote_next < nm {
                // A candidate has the same path on both sides; only those the remote
                // listed no digest for are asked.
                let mut paths = Vec::new();
                let from = q.remote_next;
                q.remote_next = nm;
                for (m, _) in pair.candidates_from(master, &self.list, from) {
                    if self.sums.get(m as usize) != Verdict::Unknown {
                        continue;
                    }
                    paths.push(master.path(m).to_vec());
                    if paths.len() == CHUNK {
                        q.remote_next = m + 1;
                        break;
                    }
                }
                if !paths.is_empty() {
                    q.remote_out += 1;
                    msgs.push((Peer::Remote, paths));
                }
            }
            if q.master_out < WINDOW && q.master_next < nm {
                // Only what no other remote has asked the master for.
                let mut paths = Vec::new();
                let from = q.master_next;
                q.master_next = nm;
                for (m, _) in pair.candidates_from(master, &self.list, from) {
                    if shared.master_sums.state(m as usize) == SumState::None {
                        shared.master_sums.set_state(m as usize, SumState::Pending);
                        paths.push(master.path(m).to_vec());
                        if paths.len() == CHUNK {
                            q.master_next = m + 1;
                            break;
                        }
                    }
                }
                if !paths.is_empty() {
                    q.master_out += 1;
                    msgs.push((Peer::Master, paths));
                }
            }
            if msgs.is_empty() {
                return;
            }
            for (to, paths) in msgs {
                let msg = Msg::ChecksumRequest {
                    request_id: 0,
                    algorithm: shared.req.algorithm.clone(),
                    paths,
                    fresh: shared.req.verify,
                };
                self.send(to, msg);
            }
        }
    }

    /// Checksums of the master (for every pair: the caller then checks every pair with
    /// [`RemoteSync::check_sums_ready`]) or of the remote.
    fn on_checksums(
        &mut self,
        from: Peer,
        results: Vec<ChecksumResult>,
        last: bool,
        shared: &mut JobShared,
    ) -> Result<(), String> {
        if from == Peer::Master {
            if last {
                self.requests.master_out = self.requests.master_out.saturating_sub(1);
            }
            // Answers come in the order asked: try the entry after the last one first
            // (saves two binary searches over a million paths per answer).
            let mut hint = 0u32;
            for res in results {
                let m = if (hint as usize) < shared.master.len()
                    && shared.master.path(hint) == res.path
                {
                    hint
                } else {
                    let Some(m) = shared.master.find(&res.path) else {
                        continue;
                    };
                    m
                };
                hint = m + 1;
                match res.digest {
                    Ok(d) => {
                        let width = shared.width.check(&d)?;
                        shared.master_sums.store(m as usize, width, &d);
                    }
                    Err(e) => {
                        debug!(
                            "master checksum of {:?} failed: {e}",
                            String::from_utf8_lossy(&res.path)
                        );
                        shared.master_sums.set_state(m as usize, SumState::Failed);
                    }
                }
            }
            self.pump_sums(shared);
            return Ok(());
        }
        let Some(pair) = &self.pair else {
            return Ok(());
        };
        let master = &shared.master;
        let mut hint = self.requests.remote_hint;
        for res in results {
            // The candidate after the last answer first (a candidate's path is the
            // master's): saves a binary search over a million paths per answer.
            let next = pair
                .candidates_from(master, &self.list, hint)
                .find(|&(m, _)| self.sums.get(m as usize) == Verdict::Unknown);
            let m = match next {
                Some((m, _)) if master.path(m) == res.path => m,
                _ => {
                    let Some(m) = master.find(&res.path) else {
                        continue;
                    };
                    if pair.candidate(master, &self.list, m).is_none() {
                        continue;
                    }
                    m
                }
            };
            hint = m + 1;
            match res.digest {
                Ok(d) => {
                    shared.width.check(&d)?;
                    self.sums
                        .record(m as usize, &d, &shared.master_sums, m as usize);
                }
                Err(_) => self.sums.fail(m as usize),
            }
        }
        self.requests.remote_hint = hint;
        if last {
            self.requests.remote_out = self.requests.remote_out.saturating_sub(1);
        }
        self.pump_sums(shared);
        self.check_sums_ready(shared);
        Ok(())
    }

    /// Resolves the plan once every checksum it needs is in.
    pub(crate) fn check_sums_ready(&mut self, shared: &mut JobShared) {
        if self.state != PairState::Checksums || self.requests.remote_out > 0 {
            return;
        }
        let Some(pair) = &self.pair else { return };
        let master = &shared.master;
        let nm = master.len() as u32;
        let q = &self.requests;
        if q.remote_next < nm || q.master_next < nm {
            return;
        }
        let msums = &shared.master_sums;
        let from = self.requests.master_ready;
        // (No pass when the master listed every file's digest.)
        let missing = (shared.master_unlisted_sums > 0)
            .then(|| {
                pair.candidates_from(master, &self.list, from)
                    .find(|&(m, _)| msums.state(m as usize) < SumState::Done)
            })
            .flatten();
        if let Some((m, _)) = missing {
            self.requests.master_ready = m;
            return;
        }
        self.requests.master_ready = nm;
        let width = shared.width.get().unwrap_or(0);
        self.sums.settle(width, msums, |slot| slot);
        let pair = self.pair.take().expect("checked above");
        let sums = std::mem::take(&mut self.sums);
        let plan = pair.resolve(&shared.master, &self.list, |m| {
            sums.get(m as usize) == Verdict::Same
        });
        self.total_bytes = plan.send_bytes(&shared.master);
        self.plan = Some(plan);
        self.partition_blocks(shared);
        self.emit_plan(&shared.master);
        if shared.req.dry_run || shared.req.verify {
            let sends = self.plan.as_ref().map_or(0, |p| p.sends().len());
            self.result.transferred = sends as u64;
            self.result.bytes = self.total_bytes;
            self.finish(shared);
            return;
        }
        self.start_phase(PairState::Before, shared);
    }

    /// Whether this pair waits for master checksums on its own master connection.
    fn awaits_master_sums(&self) -> bool {
        self.state == PairState::Checksums && self.requests.master_out > 0
    }

    /// Master checksums another pair had asked for are lost: ask again for what is missing.
    pub(crate) fn restart_master_sums(&mut self, shared: &mut JobShared) {
        if self.state == PairState::Checksums {
            self.requests.master_next = 0;
            self.pump_sums(shared);
        }
    }

    // ------------------------------------------------------ plan itemizing

    /// Starts itemizing the plan to the control client: the notes now, the steps by
    /// [`RemoteSync::next_plan_items`] as the client reads them.
    fn emit_plan(&mut self, master: &FileList) {
        let Some(plan) = self.plan.as_ref() else {
            return;
        };
        let remote = self.index as u32;
        let mut items = Vec::new();
        if !self.can_chown {
            items.push(PlanItem {
                remote,
                path: Vec::new(),
                action: Action::Skip,
                size: 0,
                detail: "owner/group not applied: the remote agent does not run as root".into(),
            });
        }
        for &m in &plan.skipped {
            items.push(PlanItem {
                remote,
                path: master.path(m).to_vec(),
                action: Action::Skip,
                size: 0,
                detail: "special file (fifo, socket or device) skipped".into(),
            });
        }
        // Deletions of delta bases come after the sends: count them all.
        let deleted = plan
            .steps()
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Delete | StepKind::DeleteTree))
            .count() as u64;
        self.result.deleted = deleted;
        self.result.changed = (plan.steps().len() - plan.sends().len()) as u64 - deleted;
        self.emit_cur = 0;
        for chunk in items.chunks(ITEMS_PER_FRAME) {
            self.send(Peer::Control, Msg::PlanItems(chunk.to_vec()));
        }
    }

    /// Whether plan steps are still to be itemized.
    pub(crate) fn has_plan_items(&self) -> bool {
        self.state != PairState::Done
            && self
                .plan
                .as_ref()
                .is_some_and(|p| self.emit_cur < p.steps().len())
    }

    /// The next frame of itemized plan steps (the caller asks while the control client
    /// keeps up, so that a million-step plan is never all in memory as messages).
    pub(crate) fn next_plan_items(&mut self, shared: &JobShared) -> Option<Msg> {
        let plan = self.plan.as_ref()?;
        let steps = plan.steps();
        if self.emit_cur >= steps.len() {
            return None;
        }
        let (master, remote) = (&shared.master, &self.list);
        let end = (self.emit_cur + ITEMS_PER_FRAME).min(steps.len());
        let items = steps[self.emit_cur..end]
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let (path, action, size) = match s.kind {
                    StepKind::Delete | StepKind::DeleteTree => {
                        (remote.path(s.index), Action::Delete, 0)
                    }
                    StepKind::Send => {
                        (master.path(s.index), Action::Transfer, master.size(s.index))
                    }
                    StepKind::Mkdir => (master.path(s.index), Action::Mkdir, 0),
                    StepKind::Symlink => (master.path(s.index), Action::Symlink, 0),
                    StepKind::HardLink => (master.path(s.index), Action::HardLink, 0),
                    StepKind::Skip => (master.path(s.index), Action::Skip, 0),
                    StepKind::SetAttrs => (master.path(s.index), Action::SetAttrs, 0),
                };
                let mut detail = describe(s, master, remote, self.can_chown);
                let block = self.blocks.as_ref();
                if let Some(b) = block.and_then(|b| b.block_of_step(self.emit_cur + k)) {
                    detail = format!("block {b}: {detail}");
                }
                PlanItem {
                    remote: self.index as u32,
                    path: path.to_vec(),
                    action,
                    size,
                    detail,
                }
            })
            .collect();
        self.emit_cur = end;
        Some(Msg::PlanItems(items))
    }

    /// No client to tell: nothing more to itemize.
    pub(crate) fn drop_plan_items(&mut self) {
        if let Some(plan) = &self.plan {
            self.emit_cur = plan.steps().len();
        }
    }

    /// Finishes the pair if it was only waiting for its plan to be itemized.
    pub(crate) fn finish_if_deferred(&mut self, shared: &JobShared) {
        if self.finish_deferred && !self.has_plan_items() {
            self.finish(shared);
        }
    }

    // ------------------------------------------------------------- phases

    fn start_phase(&mut self, phase: PairState, shared: &mut JobShared) {
        self.state = phase;
        self.pcur = 0;
        self.pending = 0;
        debug!(job = shared.id, remote = self.index, ?phase, "phase");
        self.pump_phase(shared);
    }

    /// The steps of the current phase outside every block.
    fn phase_steps(&self) -> &[Step] {
        let Some(plan) = self.plan.as_ref() else {
            return &[];
        };
        match (self.state, self.blocks.as_ref()) {
            (PairState::Before | PairState::Sending | PairState::After, Some(b)) => {
                b.phase_steps(self.state)
            }
            (PairState::Before, None) => plan.before(),
            (PairState::Sending, None) => plan.sends(),
            (PairState::After, None) => plan.after(),
            _ => &[],
        }
    }

    /// Sends the next requests of the current phase ([`WINDOW`] in flight); moves to the
    /// next phase when all are answered.
    fn pump_phase(&mut self, shared: &mut JobShared) {
        loop {
            if self.plan.is_none()
                || !matches!(
                    self.state,
                    PairState::Before | PairState::Sending | PairState::After
                )
            {
                return;
            }
            let steps = self.phase_steps();
            if self.pcur >= steps.len() {
                if self.pending == 0 {
                    self.advance(shared);
                }
                return;
            }
            if self.pending >= WINDOW {
                return;
            }
            let end = (self.pcur + CHUNK).min(steps.len());
            let chunk = &steps[self.pcur..end];
            let (to, msg) = if self.state == PairState::Sending {
                let items = self.send_items(chunk.iter(), shared);
                (Peer::Master, self.send_order(items, String::new(), shared))
            } else {
                let ops = apply_ops(chunk, &shared.master, &self.list, self.can_chown);
                (Peer::Remote, Msg::ApplyRequest { request_id: 0, ops })
            };
            self.pcur = end;
            self.pending += 1;
            self.send(to, msg);
        }
    }

    /// The paths, delta bases (remote paths; empty: none) and sizes of the files of send
    /// `steps`, for a send order.
    pub(crate) fn send_items<'s>(
        &self,
        steps: impl Iterator<Item = &'s Step>,
        shared: &JobShared,
    ) -> SendItems {
        send_items(&self.list, steps, shared)
    }

    /// A send order of files to this remote (`stage`: into a block's staging area).
    pub(crate) fn send_order(&self, items: SendItems, stage: String, shared: &JobShared) -> Msg {
        Msg::SendOrder {
            request_id: 0,
            target: self.addr.clone(),
            algorithm: shared.req.algorithm.clone(),
            paths: items.paths,
            lock_timeout_ms: shared.req.lock_timeout_ms,
            stage,
            transfer: shared.req.transfer.clone(),
            bases: items.bases,
            sizes: items.sizes,
            ticket: Vec::new(),
            relays: Vec::new(),
        }
    }

    fn advance(&mut self, shared: &mut JobShared) {
        match self.state {
            PairState::Before => self.start_phase(PairState::Sending, shared),
            PairState::Sending => self.start_blocks(shared),
            PairState::After => self.start_rounds(shared),
            _ => {}
        }
    }

    // ------------------------------------------------------------ replies

    /// Handles an agent's reply (not a `listBatch`) from this pair's master connection or
    /// remote agent. An error is the connection's: the caller closes it, which fails the pair.
    pub(crate) fn on_reply(
        &mut self,
        from: Peer,
        msg: Msg,
        shared: &mut JobShared,
    ) -> Result<(), String> {
        if self.rounds.active() {
            return self.on_round_reply(from, msg, shared);
        }
        match msg {
            Msg::ChecksumReply { results, last, .. } => {
                self.on_checksums(from, results, last, shared)
            }
            Msg::ItemResults { results, .. } => {
                self.on_item_results(from, results, shared);
                Ok(())
            }
            Msg::Progress(p) => {
                if from == Peer::Master {
                    self.on_send_progress(p.bytes);
                }
                Ok(())
            }
            Msg::Done(_) => {
                self.on_done(shared);
                Ok(())
            }
            Msg::Error { message, .. } => Err(format!("agent error: {message}")),
            other => Err(format!("unexpected {} from an agent", other.kind_name())),
        }
    }

    fn on_item_results(&mut self, from: Peer, results: Vec<ItemResult>, shared: &mut JobShared) {
        if self.state == PairState::Blocks {
            self.block_item_results(results);
            return;
        }
        let sending = from == Peer::Master && self.state == PairState::Sending;
        for res in results {
            match res.outcome {
                Outcome::Failed => {
                    let path = String::from_utf8_lossy(&res.path).into_owned();
                    if self.failed_count < 10 {
                        warn!(remote = %self.addr, %path, "failed: {}", res.message);
                    } else {
                        debug!(remote = %self.addr, %path, "failed: {}", res.message);
                    }
                    self.record_failure(res.path.clone(), res.message.clone());
                }
                Outcome::Ok | Outcome::Skipped => {
                    if sending {
                        self.result.transferred += 1;
                        self.result.bytes += res.bytes;
                        self.result.wire_bytes += res.wire_bytes;
                        self.rounds.note_received(shared, &res);
                    }
                }
            }
            if sending {
                self.done_files += 1;
                self.done_bytes += res.bytes;
            }
        }
        if sending {
            let msg = self.progress(self.done_bytes);
            self.send(Peer::Control, msg);
        }
    }

    fn on_done(&mut self, shared: &mut JobShared) {
        if self.state == PairState::Blocks {
            self.block_done(shared);
            return;
        }
        if !matches!(
            self.state,
            PairState::Before | PairState::Sending | PairState::After
        ) {
            return;
        }
        self.pending = self.pending.saturating_sub(1);
        if self.state == PairState::Sending {
            self.progress_base = self.done_bytes;
        }
        self.pump_phase(shared);
    }

    /// The master's progress within a send order (also within a big file).
    fn on_send_progress(&mut self, order_bytes: u64) {
        if self.state != PairState::Sending {
            return;
        }
        let msg = self.progress((self.progress_base + order_bytes).max(self.done_bytes));
        self.send(Peer::Control, msg);
    }

    // ------------------------------------------------------------ the end

    /// The pair fails (connection lost, agent error, protocol error). Returns whether
    /// master checksums it had asked for are lost with it (the caller has the other pairs
    /// ask again: [`RemoteSync::restart_master_sums`]).
    pub(crate) fn fail(&mut self, why: String, shared: &JobShared) -> bool {
        if self.state == PairState::Done {
            return false;
        }
        warn!(job = shared.id, remote = %self.addr, "remote failed: {why}");
        self.result.error = why;
        let lost_master_sums = self.awaits_master_sums();
        self.finish(shared);
        lost_master_sums
    }

    /// The pair is through: its result goes to the control client (after the whole plan).
    fn finish(&mut self, shared: &JobShared) {
        if self.state == PairState::Done {
            return;
        }
        if self.result.error.is_empty() && self.has_plan_items() {
            // The client has not been told the whole plan yet: the result
            // must come after it (see finish_if_deferred).
            self.finish_deferred = true;
            return;
        }
        self.state = PairState::Done;
        self.result.ok = self.result.error.is_empty() && self.failed_count == 0;
        let kept = self.result.failures.len();
        if self.failed_count as usize > kept {
            let more = self.failed_count as usize - kept;
            self.result.failures.push(Failure {
                path: Vec::new(),
                message: format!("... and {more} more failures"),
            });
        }
        info!(job = shared.id, remote = %self.addr, ok = self.result.ok, transferred = self.result.transferred, "remote finished");
        // Free the big structures now: the other remotes may run for long.
        self.building = RemoteBuilder::default();
        self.list = RemoteList::default();
        self.plan = None;
        self.pair = None;
        self.sums = Verdicts::default();
        self.blocks = None;
        let result = self.result.clone();
        self.send(Peer::Control, Msg::RemoteResult(result));
    }
}

/// The paths, delta bases (paths in the `remote` list; empty: none) and sizes of the files
/// of send `steps`, for a send order.
pub(crate) fn send_items<'s>(
    remote: &RemoteList,
    steps: impl Iterator<Item = &'s Step>,
    shared: &JobShared,
) -> SendItems {
    let mut items = SendItems::default();
    for s in steps {
        let path = shared.master.path(s.index);
        // The plan's basis: the old version, or a similar file the remote holds.
        let basis = match s.basis() {
            Some(b) if remote.contains(b) => remote.path(b),
            _ => b"",
        };
        items.paths.push(path.to_vec());
        items.bases.push(basis.to_vec());
        items.sizes.push(shared.master.size(s.index));
    }
    items
}

/// The files of a send order: paths, delta bases on the remote (empty: none), sizes.
#[derive(Default)]
pub(crate) struct SendItems {
    pub(crate) paths: Vec<Vec<u8>>,
    pub(crate) bases: Vec<Vec<u8>>,
    pub(crate) sizes: Vec<u64>,
}
