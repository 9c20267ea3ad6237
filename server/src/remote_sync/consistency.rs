//! The consistency loop of one remote, after its transfers (issue 5).
//!
//! `After → Checking → (Resyncing → Checking)* → done | failed`:
//!
//! 1. **Checking**: the remote agent is sent a `consistencyRequest` with every file it
//!    received in this job (the master's digest and size, from its commit results); it runs
//!    its checks and answers with the inconsistent files.
//! 2. None: the remote is finished. Some, and `maxRounds` checks were done: the remote
//!    fails, naming each file and why. Otherwise **Resyncing**: fresh checksums of those
//!    files on both sides (caches bypassed); files that differ are sent again (locked with
//!    `lockResync`), files whose content matches get the master's attributes again; then
//!    they are checked again (round + 1).
//!
//! Each remote runs its own loop on its own connections: one remote's rounds never stall
//! another's.

use std::collections::{BTreeMap, HashMap};

use fleetsync_proto::{
    ChecksumResult, ExpectedFile, Failure, InconsistentFile, ItemResult, Msg, Op, OpKind, Outcome,
};
use tracing::{debug, info, warn};

use super::{JobShared, PairState, Peer, RemoteSync, SendItems, CHUNK, MAX_FAILURES, WINDOW};
use crate::list::{FileList, Kind};
use crate::ops::master_attrs;

/// Inconsistent files named in a remote's error message (all are in `inconsistent`).
const NAMED_IN_ERROR: usize = 10;

/// Files to check: master index, size, digest (`None`: unknown) — column-wise, so that a
/// million received files cost 17 bytes each with crc32.
#[derive(Default)]
pub(super) struct CheckSet {
    index: Vec<u32>,
    size: Vec<u64>,
    /// `width` bytes per file (zeros when unknown), from the first digest on.
    digest: Vec<u8>,
    width: usize,
    has_digest: Vec<bool>,
}

impl CheckSet {
    /// Adds a file; all digests given have the job's width (checked by the caller).
    fn push(&mut self, index: u32, size: u64, digest: Option<&[u8]>) {
        if let (Some(d), 0) = (digest, self.width) {
            // The first digest: the files before it get zeros of its width.
            self.width = d.len();
            self.digest = vec![0; self.index.len() * self.width];
        }
        self.index.push(index);
        self.size.push(size);
        self.has_digest.push(digest.is_some());
        match digest {
            Some(d) => self.digest.extend_from_slice(d),
            None => self.digest.extend(std::iter::repeat_n(0, self.width)),
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn expected(&self, k: usize, master: &FileList) -> ExpectedFile {
        let width = self.width;
        ExpectedFile {
            path: master.path(self.index[k]).to_vec(),
            digest: if self.has_digest[k] {
                self.digest[k * width..(k + 1) * width].to_vec()
            } else {
                Vec::new()
            },
            size: self.size[k],
        }
    }
}

/// What a consistency round waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum RoundStep {
    #[default]
    Idle,
    /// Waiting for the consistency replies.
    Check,
    /// Waiting for the fresh checksums of the inconsistent files.
    Sums,
    /// Waiting for the re-sends and attribute fixes.
    Fix,
}

/// The consistency loop's state of one remote.
#[derive(Default)]
pub(super) struct Rounds {
    /// Files received in the current stage: all the job's transfers for round 1, the files
    /// synchronized again for the next rounds.
    received: CheckSet,
    /// What the current round checks (taken from `received`), and the next to request.
    checking: CheckSet,
    cur: usize,
    step: RoundStep,
    /// Requests in flight.
    pending: usize,
    /// Inconsistent files of the current round: master index → why.
    found: BTreeMap<u32, String>,
    /// Fresh checksums while re-synchronizing: master side (digest, size), remote side.
    msum: HashMap<u32, Result<(Vec<u8>, u64), String>>,
    rsum: HashMap<u32, Result<Vec<u8>, String>>,
    /// After files were sent again: the master's attributes of their parent directories
    /// (a rename into a directory changes its mtime), applied once the sends are done.
    dir_fix: Vec<Op>,
}

impl Rounds {
    /// Notes a file the remote committed (a send order's ok result).
    pub(super) fn note_received(&mut self, shared: &mut JobShared, res: &ItemResult) {
        if let Some(m) = shared.master.find(&res.path) {
            let digest = shared.width.accepts(&res.digest).then_some(&res.digest[..]);
            self.received.push(m, res.bytes, digest);
        }
    }

    /// Whether the loop is running (its frames are handled here).
    pub(super) fn active(&self) -> bool {
        self.step != RoundStep::Idle
    }
}

impl RemoteSync {
    /// The remote's transfers are done: check it, or finish it when there is nothing to check.
    pub(super) fn start_rounds(&mut self, shared: &mut JobShared) {
        if shared.req.max_rounds == 0 || self.rounds.received.len() == 0 {
            self.finish(shared);
            return;
        }
        self.check_round(shared);
    }

    fn check_round(&mut self, shared: &mut JobShared) {
        if self.rounds.received.len() == 0 {
            // Nothing could be synchronized again (failures are already recorded).
            self.rounds.step = RoundStep::Idle;
            self.finish(shared);
            return;
        }
        self.state = PairState::Checking;
        self.result.rounds += 1;
        let rd = &mut self.rounds;
        rd.checking = std::mem::take(&mut rd.received);
        rd.cur = 0;
        rd.pending = 0;
        rd.step = RoundStep::Check;
        rd.found.clear();
        debug!(job = shared.id, remote = %self.addr, round = self.result.rounds, files = rd.checking.len(), "consistency check");
        self.pump_checks(shared);
    }

    /// Sends the next consistency requests ([`WINDOW`] in flight).
    fn pump_checks(&mut self, shared: &mut JobShared) {
        loop {
            let rd = &mut self.rounds;
            if rd.cur >= rd.checking.len() {
                if rd.pending == 0 {
                    self.round_checked(shared);
                }
                return;
            }
            if rd.pending >= WINDOW {
                return;
            }
            let end = (rd.cur + CHUNK).min(rd.checking.len());
            let files = (rd.cur..end)
                .map(|k| rd.checking.expected(k, &shared.master))
                .collect();
            rd.cur = end;
            rd.pending += 1;
            self.send(
                Peer::Remote,
                Msg::ConsistencyRequest {
                    request_id: 0,
                    algorithm: shared.req.algorithm.clone(),
                    files,
                },
            );
        }
    }

    /// Handles a reply while the loop runs.
    pub(super) fn on_round_reply(
        &mut self,
        from: Peer,
        msg: Msg,
        shared: &mut JobShared,
    ) -> Result<(), String> {
        match msg {
            Msg::ConsistencyReply {
                inconsistent, last, ..
            } if from == Peer::Remote => self.on_inconsistent(&inconsistent, last, shared),
            Msg::ChecksumReply { results, last, .. } => {
                self.on_fresh_sums(from, &results, last, shared)?
            }
            Msg::ItemResults { results, .. } => self.on_fix_results(from, &results, shared),
            Msg::Done(_) => self.on_fix_done(shared),
            // Progress of a re-send: not shown.
            Msg::Progress(_) => {}
            Msg::Error { message, .. } => return Err(format!("agent error: {message}")),
            other => return Err(format!("unexpected {} from an agent", other.kind_name())),
        }
        Ok(())
    }

    fn on_inconsistent(&mut self, found: &[InconsistentFile], last: bool, shared: &mut JobShared) {
        if self.rounds.step != RoundStep::Check {
            return;
        }
        for f in found {
            let why = format!("{} [{}]", f.message, f.check);
            let Some(m) = shared.master.find(&f.path) else {
                // Not a file of this job: cannot be synchronized again; say so.
                self.record_failure(
                    f.path.clone(),
                    format!("inconsistent, not on the master: {why}"),
                );
                continue;
            };
            self.rounds
                .found
                .entry(m)
                .and_modify(|w| {
                    w.push_str("; ");
                    w.push_str(&why);
                })
                .or_insert(why);
        }
        if last {
            self.rounds.pending = self.rounds.pending.saturating_sub(1);
            self.pump_checks(shared);
        }
    }

    /// Every reply of the round is in: done, failed, or synchronize again.
    fn round_checked(&mut self, shared: &mut JobShared) {
        let max = shared.req.max_rounds;
        let round = self.result.rounds;
        let found = std::mem::take(&mut self.rounds.found);
        self.rounds.checking = CheckSet::default();
        let master = &shared.master;
        if found.is_empty() {
            self.rounds.step = RoundStep::Idle;
            info!(job = shared.id, remote = %self.addr, round, "consistent");
            self.finish(shared);
            return;
        }
        info!(job = shared.id, remote = %self.addr, round, inconsistent = found.len(), "inconsistent files");
        if round >= max {
            self.rounds.step = RoundStep::Idle;
            let named: Vec<String> = found
                .iter()
                .take(NAMED_IN_ERROR)
                .map(|(&m, why)| format!("{}: {why}", String::from_utf8_lossy(master.path(m))))
                .collect();
            let more = found.len().saturating_sub(NAMED_IN_ERROR);
            self.result.error = format!(
                "{} file(s) still inconsistent after {round} consistency round(s): {}{}",
                found.len(),
                named.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            );
            self.result.inconsistent = found
                .iter()
                .take(MAX_FAILURES)
                .map(|(&m, why)| Failure {
                    path: master.path(m).to_vec(),
                    message: why.clone(),
                })
                .collect();
            warn!(job = shared.id, remote = %self.addr, "{}", self.result.error);
            self.finish(shared);
            return;
        }
        // Synchronize them again: fresh checksums on both sides first.
        self.state = PairState::Resyncing;
        let rd = &mut self.rounds;
        rd.step = RoundStep::Sums;
        rd.msum.clear();
        rd.rsum.clear();
        let paths: Vec<Vec<u8>> = found.keys().map(|&m| master.path(m).to_vec()).collect();
        // Until the sums arrive, `found` lives on as the keys of `msum`/`rsum`.
        rd.found = found;
        for chunk in paths.chunks(CHUNK) {
            for to in [Peer::Master, Peer::Remote] {
                self.rounds.pending += 1;
                self.send(
                    to,
                    Msg::ChecksumRequest {
                        request_id: 0,
                        algorithm: shared.req.algorithm.clone(),
                        paths: chunk.to_vec(),
                        fresh: true,
                    },
                );
            }
        }
    }

    fn on_fresh_sums(
        &mut self,
        from: Peer,
        results: &[ChecksumResult],
        last: bool,
        shared: &mut JobShared,
    ) -> Result<(), String> {
        if self.rounds.step != RoundStep::Sums {
            return Ok(());
        }
        for res in results {
            let Some(m) = shared.master.find(&res.path) else {
                continue;
            };
            if let Ok(d) = &res.digest {
                shared.width.check(d)?;
            }
            match from {
                Peer::Master => {
                    let v = res.digest.clone().map(|d| (d, res.size));
                    self.rounds.msum.insert(m, v);
                }
                _ => {
                    self.rounds.rsum.insert(m, res.digest.clone());
                }
            }
        }
        if last {
            self.rounds.pending = self.rounds.pending.saturating_sub(1);
            if self.rounds.pending == 0 {
                self.resync(shared);
            }
        }
        Ok(())
    }

    /// Sends the files whose fresh checksums differ, re-applies the attributes of the others.
    fn resync(&mut self, shared: &mut JobShared) {
        let owner = self.can_chown;
        let master = &shared.master;
        let found = std::mem::take(&mut self.rounds.found);
        let mut send = Vec::new();
        let mut ops = Vec::new();
        let mut failed = Vec::new();
        let rd = &mut self.rounds;
        for &m in found.keys() {
            let path = master.path(m).to_vec();
            match rd.msum.get(&m) {
                Some(Ok((md, size))) => {
                    let same = matches!(rd.rsum.get(&m), Some(Ok(rdg)) if rdg == md);
                    if same {
                        // Same content: put the master's attributes back, check again.
                        ops.push(Op {
                            path,
                            kind: OpKind::SetAttrs(master_attrs(&master.meta(m), owner, true)),
                        });
                        rd.received.push(m, *size, Some(md));
                        self.result.resynced += 1;
                    } else {
                        send.push(path);
                    }
                }
                other => {
                    let why = match other {
                        Some(Err(e)) => e.clone(),
                        _ => "no checksum".to_owned(),
                    };
                    failed.push((
                        path,
                        format!("inconsistent, and cannot be synchronized again: master: {why}"),
                    ));
                }
            }
        }
        for (path, message) in failed {
            self.record_failure(path, message);
        }
        let rd = &mut self.rounds;
        rd.msum.clear();
        rd.rsum.clear();
        // Parent directories of the files sent again: their mtimes go back to the master's
        // once the sends are done (see `on_fix_done`).
        let parents: std::collections::BTreeSet<&[u8]> = send
            .iter()
            .map(|p| {
                p.iter()
                    .rposition(|&b| b == b'/')
                    .map_or(&b""[..], |k| &p[..k])
            })
            .collect();
        rd.dir_fix = parents
            .into_iter()
            .filter_map(|d| master.find(d).map(|m| (d, master.meta(m))))
            .filter(|(_, meta)| meta.kind == Some(Kind::Dir))
            .map(|(d, meta)| Op {
                path: d.to_vec(),
                kind: OpKind::SetAttrs(master_attrs(&meta, owner, true)),
            })
            .collect();
        rd.step = RoundStep::Fix;
        rd.pending = 0;
        debug!(job = shared.id, remote = %self.addr, resend = send.len(), attrs = ops.len(), "synchronizing again");
        let lock_timeout_ms = shared.req.lock_resync_ms.or(shared.req.lock_timeout_ms);
        let mut msgs: Vec<(Peer, Msg)> = Vec::new();
        for chunk in send.chunks(CHUNK) {
            // The remote holds the files (changed): each is its own delta basis.
            let items = SendItems {
                paths: chunk.to_vec(),
                bases: chunk.to_vec(),
                sizes: chunk
                    .iter()
                    .map(|p| shared.master.find(p).map_or(0, |m| shared.master.size(m)))
                    .collect(),
            };
            let mut order = self.send_order(items, String::new(), shared);
            if let Msg::SendOrder {
                lock_timeout_ms: lock,
                ..
            } = &mut order
            {
                *lock = lock_timeout_ms;
            }
            msgs.push((Peer::Master, order));
        }
        for chunk in ops.chunks(CHUNK) {
            msgs.push((
                Peer::Remote,
                Msg::ApplyRequest {
                    request_id: 0,
                    ops: chunk.to_vec(),
                },
            ));
        }
        if msgs.is_empty() {
            self.check_round(shared);
            return;
        }
        self.rounds.pending = msgs.len();
        self.outbox.extend(msgs);
    }

    fn on_fix_results(&mut self, from: Peer, results: &[ItemResult], shared: &mut JobShared) {
        if self.rounds.step != RoundStep::Fix {
            return;
        }
        for res in results {
            match res.outcome {
                Outcome::Failed => self.record_failure(
                    res.path.clone(),
                    format!("synchronizing the inconsistent file again: {}", res.message),
                ),
                Outcome::Ok | Outcome::Skipped => {
                    if from == Peer::Master {
                        self.rounds.note_received(shared, res);
                        self.result.resynced += 1;
                    }
                }
            }
        }
    }

    fn on_fix_done(&mut self, shared: &mut JobShared) {
        let rd = &mut self.rounds;
        if rd.step != RoundStep::Fix {
            return;
        }
        rd.pending = rd.pending.saturating_sub(1);
        if rd.pending > 0 {
            return;
        }
        let dirs = std::mem::take(&mut rd.dir_fix);
        if dirs.is_empty() {
            self.check_round(shared);
            return;
        }
        rd.pending = 1;
        self.send(
            Peer::Remote,
            Msg::ApplyRequest {
                request_id: 0,
                ops: dirs,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::list::Meta;

    #[test]
    fn a_check_set_gives_back_each_file_with_its_digest_or_none() {
        let mut master = FileList::new();
        let file = Meta {
            kind: Some(Kind::File),
            ..Meta::default()
        };
        for p in [&b"a"[..], b"b/c", b"d"] {
            master.push(p, &file, b"").unwrap();
        }
        master.finish().unwrap();
        let (a, bc, d) = (
            master.find(b"a").unwrap(),
            master.find(b"b/c").unwrap(),
            master.find(b"d").unwrap(),
        );
        let mut set = CheckSet::default();
        set.push(bc, 12, Some(&[1, 2, 3, 4]));
        // A digest of the wrong width (an old agent sends none) is "unknown", as is an
        // all-zero one only when it was not given: crc32 of an empty file is 00000000.
        set.push(a, 0, Some(&[0, 0, 0, 0]));
        set.push(d, 5, None);
        assert_eq!(set.len(), 3);
        let got: Vec<ExpectedFile> = (0..3).map(|k| set.expected(k, &master)).collect();
        assert_eq!(
            got,
            [
                ExpectedFile {
                    path: b"b/c".to_vec(),
                    digest: vec![1, 2, 3, 4],
                    size: 12
                },
                ExpectedFile {
                    path: b"a".to_vec(),
                    digest: vec![0, 0, 0, 0],
                    size: 0
                },
                ExpectedFile {
                    path: b"d".to_vec(),
                    digest: Vec::new(),
                    size: 5
                },
            ]
        );
    }
}
