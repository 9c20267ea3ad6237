//! Dependency blocks (`fleetsync sync --blocks`) in the server's per-remote state machine.
//!
//! Once a remote's plan is resolved, [`RemoteSync::partition_blocks`] takes out of it the steps
//! whose path belongs to a block (the first block, in file order, whose `select` matches
//! it). What is left runs as without blocks (`before`, `sends`), then the blocks run one at a
//! time in [`BlocksFile::order`](crate::blocks::BlocksFile::order), then the rest (`after`:
//! links, attributes, directory attributes). Each block:
//!
//! 1. `blockBegin` to the remote agent: a staging transaction (server-chosen name);
//! 2. if it has files to send, `sendOrder` with `stage` to the master agent: the files are
//!    streamed into the transaction's staging area (each verified by size and digest);
//! 3. `blockCommit` with the block's whole op list (puts, deletes, symlinks, hard links,
//!    attribute fixes) — or with `abort` if a file failed to arrive. The agent commits through
//!    its journal: all or nothing, also across a crash.
//!
//! A block that fails is reported with its items and leaves the remote with the block's old
//! version; the blocks that come after it (`after`, directly or not) are reported and not
//! applied. Different remotes progress independently.
//!
//! What goes in a block: regular files sent, symlinks, hard links (a member whose group
//! leader is sent in a block goes with the leader's block, so that it never links to the old
//! content), deletions of files and symlinks, attribute fixes of files and symlinks.
//! Directories never belong to a block: new directories are created before the blocks run,
//! and directory attributes are restored after them; an extra directory (`--delete`) is
//! removed after the blocks, when the blocks have removed what they own inside it.

use std::collections::HashSet;
use std::sync::Arc;

use fleetsync_proto::{auth, BlockDef, ItemResult, Msg, Op, OpKind, Outcome};
use tracing::{debug, info, warn};

use super::{JobShared, PairState, Peer, RemoteSync, CHUNK};
use crate::blocks::{BlockSpec, BlocksFile};
use crate::list::{FileList, Kind};
use crate::ops::block_ops;
use crate::plan::{Plan, Step, StepKind, Why};
use crate::remote_list::RemoteList;

/// No block: the step runs as without `--blocks`.
pub(super) const NO_BLOCK: u16 = u16::MAX;

/// Most blocks in one request (block indexes are `u16`).
const MAX_BLOCKS: usize = 4096;

/// The blocks of a job, checked and compiled (once per job, shared by its pairs).
pub(crate) struct BlockSet {
    file: BlocksFile,
}

impl BlockSet {
    /// Checks the blocks of a sync request (names, `select` expressions, `after` names and
    /// cycles); `Ok(None)` without blocks.
    pub(crate) fn from_request(defs: &[BlockDef]) -> Result<Option<Arc<BlockSet>>, String> {
        if defs.is_empty() {
            return Ok(None);
        }
        if defs.len() > MAX_BLOCKS {
            return Err(format!(
                "too many blocks ({}, at most {MAX_BLOCKS})",
                defs.len()
            ));
        }
        let specs = defs
            .iter()
            .map(|d| BlockSpec {
                name: d.name.clone(),
                select: d.select.clone(),
                after: d.after.clone(),
            })
            .collect();
        let file = BlocksFile::new(specs).map_err(|e| e.to_string())?;
        Ok(Some(Arc::new(BlockSet { file })))
    }

    fn assign(&self, path: &[u8]) -> u16 {
        self.file
            .matchers()
            .iter()
            .position(|m| m.is_included(path, false))
            .map_or(NO_BLOCK, |b| b as u16)
    }

    pub(super) fn name(&self, b: u16) -> &str {
        &self.file.blocks()[b as usize].name
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BState {
    Pending,
    Beginning,
    Sending,
    Committing,
    Committed,
    Failed,
}

/// One block on one remote.
struct BlockWork {
    steps: Vec<Step>,
    state: BState,
    stage: String,
    /// A file did not arrive or the transaction could not be opened: abort.
    broken: bool,
    /// The agent reported the commit failed.
    commit_failed: bool,
    /// Next send of `steps` to order.
    send_cur: usize,
    staged: u64,
    staged_bytes: u64,
    /// Their bytes on the wire.
    staged_wire: u64,
    /// Results of the staged files (with their verified digests): they enter the
    /// consistency loop once the block is committed.
    staged_results: Vec<ItemResult>,
}

/// The block part of one remote's run.
pub(super) struct BlockRun {
    set: Arc<BlockSet>,
    /// The steps outside every block, by phase.
    before: Vec<Step>,
    sends: Vec<Step>,
    after: Vec<Step>,
    /// Block of each step of the full plan (for the itemized output).
    step_block: Vec<u16>,
    work: Vec<BlockWork>,
    /// Position in the block order.
    next: usize,
    /// The block being run.
    cur: Option<usize>,
}

impl BlockRun {
    /// The unblocked steps of a phase.
    pub(super) fn phase_steps(&self, phase: PairState) -> &[Step] {
        match phase {
            PairState::Before => &self.before,
            PairState::Sending => &self.sends,
            PairState::After => &self.after,
            _ => &[],
        }
    }

    /// The block name of plan step `k`, if it is in one.
    pub(super) fn block_of_step(&self, k: usize) -> Option<&str> {
        match self.step_block.get(k) {
            Some(&b) if b != NO_BLOCK => Some(self.set.name(b)),
            _ => None,
        }
    }

    /// Whether any block has work on this remote.
    pub(super) fn has_work(&self) -> bool {
        self.work.iter().any(|w| !w.steps.is_empty())
    }
}

/// Splits a plan into the unblocked phases and the blocks' steps (see the module docs).
pub(super) fn partition(
    set: &Arc<BlockSet>,
    plan: &Plan,
    master: &FileList,
    remote: &RemoteList,
) -> BlockRun {
    let steps = plan.steps();
    let nb = set.file.blocks().len();
    // Where each sent master file goes (hard-link members follow their leader).
    let mut sent_block: std::collections::HashMap<u32, u16> = std::collections::HashMap::new();
    for s in plan.sends() {
        sent_block.insert(s.index, set.assign(master.path(s.index)));
    }
    let mut step_block = Vec::with_capacity(steps.len());
    for s in steps {
        let b = match s.kind {
            StepKind::Send => sent_block.get(&s.index).copied().unwrap_or(NO_BLOCK),
            StepKind::Symlink => set.assign(master.path(s.index)),
            StepKind::HardLink => match sent_block.get(&s.other) {
                Some(&b) if b != NO_BLOCK => b,
                _ => set.assign(master.path(s.index)),
            },
            StepKind::SetAttrs if master.kind(s.index) != Kind::Dir => {
                set.assign(master.path(s.index))
            }
            StepKind::Delete | StepKind::DeleteTree => {
                let path = remote.path(s.index);
                match master.find(path) {
                    // A type change to a directory: the deletion must precede the mkdir.
                    Some(m) if master.kind(m) == Kind::Dir => NO_BLOCK,
                    // A type change to a file or symlink: replaced inside the block.
                    Some(_) => set.assign(path),
                    None if remote.kind(s.index) == Kind::Dir => NO_BLOCK,
                    None => set.assign(path),
                }
            }
            _ => NO_BLOCK,
        };
        step_block.push(b);
    }
    let mut work: Vec<BlockWork> = (0..nb)
        .map(|_| BlockWork {
            steps: Vec::new(),
            state: BState::Pending,
            stage: String::new(),
            broken: false,
            commit_failed: false,
            send_cur: 0,
            staged: 0,
            staged_bytes: 0,
            staged_wire: 0,
            staged_results: Vec::new(),
        })
        .collect();
    let any_block = step_block.iter().any(|&b| b != NO_BLOCK);
    let (mut before, mut sends, mut after) = (Vec::new(), Vec::new(), Vec::new());
    // Extra directories are removed after the blocks (they may hold block files).
    let mut late_rmdirs = Vec::new();
    let (nbefore, nsends) = (plan.before().len(), plan.sends().len());
    for (k, (s, &b)) in steps.iter().zip(&step_block).enumerate() {
        if b != NO_BLOCK {
            work[b as usize].steps.push(*s);
        } else if k < nbefore {
            let extra_dir = matches!(s.kind, StepKind::Delete | StepKind::DeleteTree)
                && remote.kind(s.index) == Kind::Dir
                && master.find(remote.path(s.index)).is_none();
            if any_block && extra_dir {
                late_rmdirs.push(*s);
            } else {
                before.push(*s);
            }
        } else if k < nbefore + nsends {
            sends.push(*s);
        } else {
            after.push(*s);
        }
    }
    // An extra directory beneath a path that a block replaces (a directory that becomes a
    // file or symlink) goes with it: the block moves the whole old directory aside.
    let replaced: HashSet<&[u8]> = steps
        .iter()
        .zip(&step_block)
        .filter(|(_, &b)| b != NO_BLOCK)
        .filter_map(|(s, _)| match s.kind {
            StepKind::Delete | StepKind::DeleteTree => Some(remote.path(s.index)),
            StepKind::Send | StepKind::Symlink | StepKind::HardLink => Some(master.path(s.index)),
            _ => None,
        })
        .collect();
    late_rmdirs.retain(|s| {
        let p = remote.path(s.index);
        !p.iter()
            .enumerate()
            .any(|(k, &c)| c == b'/' && replaced.contains(&p[..k]))
    });
    late_rmdirs.append(&mut after);
    // The agent's staging directory comes and goes in the root: restore the root's mtime.
    if work.iter().any(|w| !w.steps.is_empty()) {
        if let (Some(m), Some(r)) = (master.find(b""), remote.find(b"")) {
            let has = late_rmdirs
                .iter()
                .any(|s| s.kind == StepKind::SetAttrs && s.index == m);
            if !has && master.kind(m) == Kind::Dir {
                late_rmdirs.push(Step {
                    kind: StepKind::SetAttrs,
                    why: Why::DirTouched,
                    index: m,
                    other: r,
                });
            }
        }
    }
    BlockRun {
        set: set.clone(),
        before,
        sends,
        after: late_rmdirs,
        step_block,
        work,
        next: 0,
        cur: None,
    }
}

/// Drops ops that the block makes redundant (see the journal's rules: one content op per
/// path, nothing beneath a path the block replaces or deletes): a deletion of a path the
/// block puts anew (the put replaces it, also a directory), and anything beneath a path the
/// block puts, links or deletes.
fn tidy_ops(ops: Vec<Op>) -> Vec<Op> {
    let content = |k: &OpKind| {
        matches!(
            k,
            OpKind::Put { .. } | OpKind::Symlink { .. } | OpKind::HardLink { .. }
        )
    };
    let created: HashSet<Vec<u8>> = ops
        .iter()
        .filter(|o| content(&o.kind))
        .map(|o| o.path.clone())
        .collect();
    let ops: Vec<Op> = ops
        .into_iter()
        .filter(|o| !(matches!(o.kind, OpKind::Delete { .. }) && created.contains(&o.path)))
        .collect();
    let replaced: HashSet<&[u8]> = ops
        .iter()
        .filter(|o| content(&o.kind) || matches!(o.kind, OpKind::Delete { .. }))
        .map(|o| o.path.as_slice())
        .collect();
    let beneath = |p: &[u8]| {
        p.iter()
            .enumerate()
            .any(|(i, &c)| c == b'/' && replaced.contains(&p[..i]))
    };
    let keep: Vec<bool> = ops.iter().map(|o| !beneath(&o.path)).collect();
    ops.into_iter()
        .zip(keep)
        .filter_map(|(o, k)| k.then_some(o))
        .collect()
}

impl RemoteSync {
    /// Takes the block steps out of the fresh plan (a no-op without `--blocks`).
    pub(super) fn partition_blocks(&mut self, shared: &JobShared) {
        let Some(set) = shared.blocks.clone() else {
            return;
        };
        let Some(plan) = self.plan.as_ref() else {
            return;
        };
        let run = partition(&set, plan, &shared.master, &self.list);
        for (b, w) in run.work.iter().enumerate() {
            if !w.steps.is_empty() {
                debug!(job = shared.id, remote = %self.addr, block = set.name(b as u16), steps = w.steps.len(), "block");
            }
        }
        self.blocks = Some(run);
    }

    /// The unblocked sends are done: run the blocks, then the `after` phase.
    pub(super) fn start_blocks(&mut self, shared: &mut JobShared) {
        if !self.blocks.as_ref().is_some_and(BlockRun::has_work) {
            self.start_phase(PairState::After, shared);
            return;
        }
        self.state = PairState::Blocks;
        self.next_block(shared);
    }

    /// Starts the next block in order whose predecessors are committed; fails those whose
    /// predecessors failed; moves to the `after` phase when all are through.
    fn next_block(&mut self, shared: &mut JobShared) {
        loop {
            let Some(run) = self.blocks.as_mut() else {
                return;
            };
            let order = run.set.file.order_indexes();
            if run.next >= order.len() {
                run.cur = None;
                self.start_phase(PairState::After, shared);
                return;
            }
            let b = order[run.next];
            run.next += 1;
            if run.work[b].steps.is_empty() {
                // Nothing to change on this remote: in place already.
                run.work[b].state = BState::Committed;
                continue;
            }
            let failed_dep = run
                .set
                .file
                .after_indexes(b)
                .into_iter()
                .find(|&d| run.work[d].state == BState::Failed);
            if let Some(d) = failed_dep {
                run.work[b].state = BState::Failed;
                let message = format!(
                    "block {} not applied: it comes after block {}, which failed",
                    run.set.name(b as u16),
                    run.set.name(d as u16)
                );
                warn!(job = shared.id, remote = %self.addr, "{message}");
                self.record_failure(Vec::new(), message);
                continue;
            }
            let nonce = auth::nonce();
            let stage = format!(
                "j{}-r{}-b{b}-{}",
                shared.id,
                self.index,
                nonce[..6]
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            );
            let block = run.set.name(b as u16).to_owned();
            run.work[b].stage = stage.clone();
            run.work[b].state = BState::Beginning;
            run.cur = Some(b);
            info!(job = shared.id, remote = %self.addr, block, "block starts");
            self.send(
                Peer::Remote,
                Msg::BlockBegin {
                    request_id: 0,
                    stage,
                    block,
                },
            );
            return;
        }
    }

    /// Per-item results while the blocks run (staged files, the begin, the commit).
    pub(super) fn block_item_results(&mut self, results: Vec<ItemResult>) {
        let Some(run) = self.blocks.as_mut() else {
            return;
        };
        let Some(b) = run.cur else { return };
        let w = &mut run.work[b];
        let staging = w.state == BState::Sending;
        let mut failed = Vec::new();
        for res in results {
            if staging {
                self.done_files += 1;
                self.done_bytes += res.bytes;
            }
            match res.outcome {
                Outcome::Failed => {
                    if matches!(w.state, BState::Beginning | BState::Sending) {
                        w.broken = true;
                    } else {
                        w.commit_failed = true;
                    }
                    failed.push(res);
                }
                Outcome::Ok | Outcome::Skipped => {
                    if staging {
                        w.staged += 1;
                        w.staged_bytes += res.bytes;
                        w.staged_wire += res.wire_bytes;
                        w.staged_results.push(res);
                    }
                }
            }
        }
        for res in failed {
            if self.failed_count < 10 {
                warn!(remote = %self.addr, path = %String::from_utf8_lossy(&res.path), "failed: {}", res.message);
            }
            self.record_failure(res.path, res.message);
        }
        if staging {
            let msg = self.progress(self.done_bytes);
            self.send(Peer::Control, msg);
        }
    }

    /// A request of the current block finished.
    pub(super) fn block_done(&mut self, shared: &mut JobShared) {
        let Some(run) = self.blocks.as_mut() else {
            return;
        };
        let Some(b) = run.cur else { return };
        let name = run.set.name(b as u16).to_owned();
        let w = &mut run.work[b];
        match w.state {
            BState::Beginning if w.broken => {
                // No transaction was opened: nothing to abort.
                w.state = BState::Failed;
                run.cur = None;
                self.next_block(shared);
            }
            BState::Beginning | BState::Sending => {
                w.state = BState::Sending;
                let sends: Vec<&Step> = w
                    .steps
                    .iter()
                    .filter(|s| s.kind == StepKind::Send)
                    .collect();
                if !w.broken && w.send_cur < sends.len() {
                    let end = (w.send_cur + CHUNK).min(sends.len());
                    let items = super::send_items(
                        &self.list,
                        sends[w.send_cur..end].iter().copied(),
                        shared,
                    );
                    w.send_cur = end;
                    let stage = w.stage.clone();
                    let msg = self.send_order(items, stage, shared);
                    self.send(Peer::Master, msg);
                    return;
                }
                // Everything staged (or something failed): commit or abort.
                w.state = BState::Committing;
                let abort = w.broken;
                let stage = w.stage.clone();
                let ops = if abort {
                    warn!(job = shared.id, remote = %self.addr, block = %name, "block aborted: a file did not arrive");
                    Vec::new()
                } else {
                    tidy_ops(block_ops(
                        &w.steps,
                        &shared.master,
                        &self.list,
                        self.can_chown,
                    ))
                };
                self.send(
                    Peer::Remote,
                    Msg::BlockCommit {
                        request_id: 0,
                        stage,
                        ops,
                        abort,
                    },
                );
            }
            BState::Committing => {
                run.cur = None;
                // The commit's results arrive before its `done`.
                if w.broken || w.commit_failed {
                    w.state = BState::Failed;
                    if w.broken {
                        self.record_failure(
                            Vec::new(),
                            format!(
                                "block {name} not applied: not every file arrived (the \
                                 remote keeps the block's old version)"
                            ),
                        );
                    }
                } else {
                    w.state = BState::Committed;
                    self.result.transferred += w.staged;
                    self.result.bytes += w.staged_bytes;
                    self.result.wire_bytes += w.staged_wire;
                    for res in std::mem::take(&mut w.staged_results) {
                        self.rounds.note_received(shared, &res);
                    }
                    info!(job = shared.id, remote = %self.addr, block = %name, "block committed");
                }
                self.next_block(shared);
            }
            BState::Pending | BState::Committed | BState::Failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(path: &str, kind: OpKind) -> Op {
        Op {
            path: path.as_bytes().to_vec(),
            kind,
        }
    }

    #[test]
    fn tidy_ops_keeps_one_content_op_per_path_and_nothing_beneath_a_replaced_path() {
        let put = || OpKind::Put {
            attrs: fleetsync_proto::Attrs::default(),
            size: 1,
        };
        let del = || OpKind::Delete { recursive: true };
        let ops = vec![
            op("a/was_dir/sub/x", del()),
            op("a/was_dir", del()),
            op("a/gone", del()),
            op("a/was_dir", put()),
            op("a/other", put()),
            op(
                "a/gone/inner",
                OpKind::SetAttrs(fleetsync_proto::Attrs::default()),
            ),
        ];
        let kept: Vec<(String, bool)> = tidy_ops(ops)
            .into_iter()
            .map(|o| {
                (
                    String::from_utf8(o.path).unwrap(),
                    matches!(o.kind, OpKind::Delete { .. }),
                )
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("a/gone".to_owned(), true),
                ("a/was_dir".to_owned(), false),
                ("a/other".to_owned(), false),
            ]
        );
    }

    #[test]
    fn block_requests_are_checked_like_blocks_files() {
        let def = |name: &str, select: &str, after: &[&str]| BlockDef {
            name: name.into(),
            select: select.into(),
            after: after.iter().map(|a| a.to_string()).collect(),
        };
        assert!(BlockSet::from_request(&[]).unwrap().is_none());
        let set = BlockSet::from_request(&[def("c", "ext:conf", &["b"]), def("b", "name:*", &[])])
            .unwrap()
            .unwrap();
        assert_eq!(set.assign(b"etc/x.conf"), 0);
        assert_eq!(set.assign(b"etc/x.txt"), 1);
        let err = BlockSet::from_request(&[def("a", "name:a", &["a"])])
            .err()
            .unwrap();
        assert!(err.contains("cycle"), "{err}");
        let err = BlockSet::from_request(&[def("a", "ext:rs and", &[])])
            .err()
            .unwrap();
        assert!(err.contains("bad select"), "{err}");
    }
}
