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
    Attrs, ChecksumResult, ExpectedFile, Failure, InconsistentFile, ItemResult, Msg, Op, OpKind,
    Outcome,
};
use mio::Token;
use tracing::{debug, info, warn};

use super::{AgentRole, RState, Server, CHUNK, MAX_FAILURES, WINDOW};
use crate::list::{FileList, Kind};

/// Inconsistent files named in a remote's error message (all are in `inconsistent`).
const NAMED_IN_ERROR: usize = 10;

/// Files to check: master index, size, digest (empty: unknown) — column-wise, so that a
/// million received files cost 17 bytes each.
#[derive(Default)]
pub(super) struct CheckSet {
    index: Vec<u32>,
    size: Vec<u64>,
    digest: Vec<u8>,
    has_digest: Vec<bool>,
}

impl CheckSet {
    fn push(&mut self, index: u32, size: u64, digest: &[u8], width: usize) {
        self.index.push(index);
        self.size.push(size);
        let ok = digest.len() == width;
        self.has_digest.push(ok);
        if ok {
            self.digest.extend_from_slice(digest);
        } else {
            self.digest.extend(std::iter::repeat_n(0, width));
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn expected(&self, k: usize, width: usize, master: &FileList) -> ExpectedFile {
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Step {
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
    step: Step,
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
    pub(super) fn note_received(&mut self, master: &FileList, width: usize, res: &ItemResult) {
        if let Some(m) = master.find(&res.path) {
            self.received.push(m, res.bytes, &res.digest, width);
        }
    }

    /// Whether the loop is running (its frames are handled here).
    pub(super) fn active(&self) -> bool {
        self.step != Step::Idle
    }
}

impl Server {
    /// The remote's transfers are done: check it, or finish it when there is nothing to check.
    pub(super) fn start_rounds(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if j.req.max_rounds == 0 || r.rounds.received.len() == 0 {
            self.finish_remote(job, i);
            return;
        }
        self.check_round(job, i);
    }

    fn check_round(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.rounds.received.len() == 0 {
            // Nothing could be synchronized again (failures are already recorded).
            r.rounds.step = Step::Idle;
            self.finish_remote(job, i);
            return;
        }
        r.state = RState::Checking;
        r.result.rounds += 1;
        let rd = &mut r.rounds;
        rd.checking = std::mem::take(&mut rd.received);
        rd.cur = 0;
        rd.pending = 0;
        rd.step = Step::Check;
        rd.found.clear();
        debug!(job, remote = %r.addr, round = r.result.rounds, files = rd.checking.len(), "consistency check");
        self.pump_checks(job, i);
    }

    /// Sends the next consistency requests ([`WINDOW`] in flight).
    fn pump_checks(&mut self, job: u64, i: usize) {
        loop {
            let Some(j) = self.jobs.get_mut(&job) else {
                return;
            };
            let width = j.width;
            let algorithm = j.req.algorithm.clone();
            let r = &mut j.remotes[i];
            let rd = &mut r.rounds;
            if rd.cur >= rd.checking.len() {
                if rd.pending == 0 {
                    self.round_checked(job, i);
                }
                return;
            }
            if rd.pending >= WINDOW {
                return;
            }
            let end = (rd.cur + CHUNK).min(rd.checking.len());
            let files = (rd.cur..end)
                .map(|k| rd.checking.expected(k, width, &j.master))
                .collect();
            rd.cur = end;
            rd.pending += 1;
            let Some(t) = r.conn else {
                self.fail_remote(job, i, "connection lost".into());
                return;
            };
            let rid = self.next_req(job);
            self.send_request(
                t,
                &Msg::ConsistencyRequest {
                    request_id: rid,
                    algorithm,
                    files,
                },
            );
        }
    }

    /// Handles a frame of remote `i` while its loop runs. Returns false if the frame is not
    /// the loop's (the caller handles it as usual).
    pub(super) fn on_round_frame(
        &mut self,
        job: u64,
        i: usize,
        role: AgentRole,
        token: Token,
        msg: &Msg,
    ) -> Result<bool, String> {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Ok(false);
        };
        if !j.remotes[i].rounds.active() {
            return Ok(false);
        }
        let finished = match msg {
            Msg::ConsistencyReply { last, .. } | Msg::ChecksumReply { last, .. } => *last,
            Msg::Done(_) => true,
            _ => false,
        };
        if finished {
            if let Some(c) = self.conns.get_mut(&token) {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
        }
        match msg {
            Msg::ConsistencyReply {
                inconsistent, last, ..
            } if role == AgentRole::Remote(i) => self.on_inconsistent(job, i, inconsistent, *last),
            Msg::ChecksumReply { results, last, .. } => {
                self.on_fresh_sums(job, i, role, results, *last)
            }
            Msg::ItemResults { results, .. } => self.on_fix_results(job, i, role, results),
            Msg::Done(_) => self.on_fix_done(job, i),
            // Progress of a re-send: not shown.
            Msg::Progress(_) => {}
            Msg::Error { message, .. } => return Err(format!("agent error: {message}")),
            other => return Err(format!("unexpected {} from an agent", other.kind_name())),
        }
        Ok(true)
    }

    fn on_inconsistent(&mut self, job: u64, i: usize, found: &[InconsistentFile], last: bool) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.rounds.step != Step::Check {
            return;
        }
        for f in found {
            let why = format!("{} [{}]", f.message, f.check);
            let Some(m) = j.master.find(&f.path) else {
                // Not a file of this job: cannot be synchronized again; say so.
                r.failed_count += 1;
                if r.result.failures.len() < MAX_FAILURES {
                    r.result.failures.push(Failure {
                        path: f.path.clone(),
                        message: format!("inconsistent, not on the master: {why}"),
                    });
                }
                continue;
            };
            r.rounds
                .found
                .entry(m)
                .and_modify(|w| {
                    w.push_str("; ");
                    w.push_str(&why);
                })
                .or_insert(why);
        }
        if last {
            r.rounds.pending = r.rounds.pending.saturating_sub(1);
            self.pump_checks(job, i);
        }
    }

    /// Every reply of the round is in: done, failed, or synchronize again.
    fn round_checked(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let max = j.req.max_rounds;
        let r = &mut j.remotes[i];
        let round = r.result.rounds;
        let found = std::mem::take(&mut r.rounds.found);
        r.rounds.checking = CheckSet::default();
        if found.is_empty() {
            r.rounds.step = Step::Idle;
            info!(job, remote = %r.addr, round, "consistent");
            self.finish_remote(job, i);
            return;
        }
        info!(job, remote = %r.addr, round, inconsistent = found.len(), "inconsistent files");
        if round >= max {
            r.rounds.step = Step::Idle;
            let named: Vec<String> = found
                .iter()
                .take(NAMED_IN_ERROR)
                .map(|(&m, why)| format!("{}: {why}", String::from_utf8_lossy(j.master.path(m))))
                .collect();
            let more = found.len().saturating_sub(NAMED_IN_ERROR);
            r.result.error = format!(
                "{} file(s) still inconsistent after {round} consistency round(s): {}{}",
                found.len(),
                named.join("; "),
                if more > 0 {
                    format!("; and {more} more")
                } else {
                    String::new()
                }
            );
            r.result.inconsistent = found
                .iter()
                .take(MAX_FAILURES)
                .map(|(&m, why)| Failure {
                    path: j.master.path(m).to_vec(),
                    message: why.clone(),
                })
                .collect();
            warn!(job, remote = %r.addr, "{}", r.result.error);
            self.finish_remote(job, i);
            return;
        }
        // Synchronize them again: fresh checksums on both sides first.
        r.state = RState::Resyncing;
        let rd = &mut r.rounds;
        rd.step = Step::Sums;
        rd.msum.clear();
        rd.rsum.clear();
        let paths: Vec<Vec<u8>> = found.keys().map(|&m| j.master.path(m).to_vec()).collect();
        // Until the sums arrive, `found` lives on as the keys of `msum`/`rsum`.
        rd.found = found;
        let (link, conn) = (r.link, r.conn);
        let algorithm = j.req.algorithm.clone();
        let (Some(link), Some(conn)) = (link, conn) else {
            self.fail_remote(job, i, "connection lost".into());
            return;
        };
        for chunk in paths.chunks(CHUNK) {
            for t in [link, conn] {
                let rid = self.next_req(job);
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.remotes[i].rounds.pending += 1;
                }
                self.send_request(
                    t,
                    &Msg::ChecksumRequest {
                        request_id: rid,
                        algorithm: algorithm.clone(),
                        paths: chunk.to_vec(),
                        fresh: true,
                    },
                );
            }
        }
    }

    fn on_fresh_sums(
        &mut self,
        job: u64,
        i: usize,
        role: AgentRole,
        results: &[ChecksumResult],
        last: bool,
    ) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.rounds.step != Step::Sums {
            return;
        }
        for res in results {
            let Some(m) = j.master.find(&res.path) else {
                continue;
            };
            match role {
                AgentRole::MasterLink(_) => {
                    let v = res.digest.clone().map(|d| (d, res.size));
                    r.rounds.msum.insert(m, v);
                }
                _ => {
                    r.rounds.rsum.insert(m, res.digest.clone());
                }
            }
        }
        if last {
            r.rounds.pending = r.rounds.pending.saturating_sub(1);
            if r.rounds.pending == 0 {
                self.resync(job, i);
            }
        }
    }

    /// Sends the files whose fresh checksums differ, re-applies the attributes of the others.
    fn resync(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let width = j.width;
        let owner = j.remotes[i].can_chown;
        let lock_timeout_ms = j.req.lock_resync_ms.or(j.req.lock_timeout_ms);
        let target = j.remotes[i].addr.clone();
        let algorithm = j.req.algorithm.clone();
        let r = &mut j.remotes[i];
        let rd = &mut r.rounds;
        let found = std::mem::take(&mut rd.found);
        let mut send = Vec::new();
        let mut ops = Vec::new();
        for &m in found.keys() {
            let path = j.master.path(m).to_vec();
            match rd.msum.get(&m) {
                Some(Ok((md, size))) => {
                    let same = matches!(rd.rsum.get(&m), Some(Ok(rdg)) if rdg == md);
                    if same {
                        // Same content: put the master's attributes back, check again.
                        let meta = j.master.meta(m);
                        ops.push(Op {
                            path,
                            kind: OpKind::SetAttrs(Attrs {
                                mode: Some(meta.mode),
                                owner: owner.then_some((meta.uid, meta.gid)),
                                mtime: Some((meta.mtime_sec, meta.mtime_nsec)),
                            }),
                        });
                        rd.received.push(m, *size, md, width);
                        r.result.resynced += 1;
                    } else {
                        send.push(path);
                    }
                }
                other => {
                    let why = match other {
                        Some(Err(e)) => e.clone(),
                        _ => "no checksum".to_owned(),
                    };
                    r.failed_count += 1;
                    if r.result.failures.len() < MAX_FAILURES {
                        r.result.failures.push(Failure {
                            path,
                            message: format!(
                                "inconsistent, and cannot be synchronized again: master: {why}"
                            ),
                        });
                    }
                }
            }
        }
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
            .filter_map(|d| j.master.find(d).map(|m| (d, j.master.meta(m))))
            .filter(|(_, meta)| meta.kind == Some(Kind::Dir))
            .map(|(d, meta)| Op {
                path: d.to_vec(),
                kind: OpKind::SetAttrs(Attrs {
                    mode: Some(meta.mode),
                    owner: owner.then_some((meta.uid, meta.gid)),
                    mtime: Some((meta.mtime_sec, meta.mtime_nsec)),
                }),
            })
            .collect();
        rd.step = Step::Fix;
        rd.pending = 0;
        debug!(job, remote = %r.addr, resend = send.len(), attrs = ops.len(), "synchronizing again");
        let (link, conn) = (r.link, r.conn);
        let (Some(link), Some(conn)) = (link, conn) else {
            self.fail_remote(job, i, "connection lost".into());
            return;
        };
        let mut msgs: Vec<(Token, Msg)> = Vec::new();
        for chunk in send.chunks(CHUNK) {
            msgs.push((
                link,
                Msg::SendOrder {
                    request_id: 0,
                    target: target.clone(),
                    algorithm: algorithm.clone(),
                    paths: chunk.to_vec(),
                    lock_timeout_ms,
                    stage: String::new(),
                },
            ));
        }
        for chunk in ops.chunks(CHUNK) {
            msgs.push((
                conn,
                Msg::ApplyRequest {
                    request_id: 0,
                    ops: chunk.to_vec(),
                },
            ));
        }
        if msgs.is_empty() {
            self.check_round(job, i);
            return;
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            j.remotes[i].rounds.pending = msgs.len();
        }
        for (t, mut msg) in msgs {
            let rid = self.next_req(job);
            match &mut msg {
                Msg::SendOrder { request_id, .. } | Msg::ApplyRequest { request_id, .. } => {
                    *request_id = rid
                }
                _ => {}
            }
            self.send_request(t, &msg);
        }
    }

    fn on_fix_results(&mut self, job: u64, i: usize, role: AgentRole, results: &[ItemResult]) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let width = j.width;
        let r = &mut j.remotes[i];
        if r.rounds.step != Step::Fix {
            return;
        }
        for res in results {
            match res.outcome {
                Outcome::Failed => {
                    r.failed_count += 1;
                    if r.result.failures.len() < MAX_FAILURES {
                        r.result.failures.push(Failure {
                            path: res.path.clone(),
                            message: format!(
                                "synchronizing the inconsistent file again: {}",
                                res.message
                            ),
                        });
                    }
                }
                Outcome::Ok | Outcome::Skipped => {
                    if matches!(role, AgentRole::MasterLink(_)) {
                        r.rounds.note_received(&j.master, width, res);
                        r.result.resynced += 1;
                    }
                }
            }
        }
    }

    fn on_fix_done(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let rd = &mut j.remotes[i].rounds;
        if rd.step != Step::Fix {
            return;
        }
        rd.pending = rd.pending.saturating_sub(1);
        if rd.pending > 0 {
            return;
        }
        let dirs = std::mem::take(&mut rd.dir_fix);
        if dirs.is_empty() {
            self.check_round(job, i);
            return;
        }
        let Some(conn) = j.remotes[i].conn else {
            self.fail_remote(job, i, "connection lost".into());
            return;
        };
        j.remotes[i].rounds.pending = 1;
        let rid = self.next_req(job);
        self.send_request(
            conn,
            &Msg::ApplyRequest {
                request_id: rid,
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
        set.push(bc, 12, &[1, 2, 3, 4], 4);
        // A digest of the wrong width (an old agent sends none) is "unknown", as is an
        // all-zero one only when it was not given: crc32 of an empty file is 00000000.
        set.push(a, 0, &[0, 0, 0, 0], 4);
        set.push(d, 5, &[], 4);
        assert_eq!(set.len(), 3);
        let got: Vec<ExpectedFile> = (0..3).map(|k| set.expected(k, 4, &master)).collect();
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
