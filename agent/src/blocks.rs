//! Dependency blocks on a remote agent (`fleetsync sync --blocks`).
//!
//! The server opens one staging transaction per block and remote (`blockBegin`), the master
//! streams the block's files into it (`fileStart.stage`: the receiver writes each file into
//! the journal's staging directory instead of beside its destination, and checks its size and
//! digest as usual), then the server sends the block's whole op list (`blockCommit`). The
//! commit checks that every `put` has a staged file that arrived complete, verified and of the
//! expected size, and hands everything to [`BlockTxn::commit`]: whatever happens from then on,
//! the block is all-old or all-new once [`crate::journal::recover`] has run (on agent start).
//!
//! A transaction belongs to the server connection that opened it: when that connection ends,
//! the transactions it left open are aborted (their staging directories removed).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use fleetsync_proto::{Attrs, Done, Msg, Op, OpKind};
use tracing::{info, warn};

use crate::journal::{BlockTxn, JournalAttrs, JournalError, JournalOp, Mtime};
use crate::session::{failed, send, send_flush, succeeded, ResultBatch, Shared, SharedWriter};
use crate::stages::{rel, Arrival, Staged};
use crate::AgentError;

/// Checks a server-chosen transaction name: 1–64 of `A-Z a-z 0-9 _ -`.
fn check_stage(stage: &str) -> Result<(), String> {
    let ok = !stage.is_empty()
        && stage.len() <= 64
        && stage
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid block transaction name {stage:?}"))
    }
}

/// `blockBegin`: opens transaction `stage` for `block`. Answers `done` (ok 1), or one failed
/// item (path `b""`) and `done` (failed 1).
pub(crate) fn begin(
    w: &SharedWriter,
    shared: &Shared,
    owner: u64,
    request_id: u64,
    stage: &str,
    block: &str,
) -> Result<(), AgentError> {
    let r = check_stage(stage)
        .and_then(|()| check_stage(block).map_err(|_| format!("invalid block name {block:?}")))
        .and_then(|()| {
            if shared.stages.get(stage).is_some() {
                return Err(format!("block transaction {stage:?} is already open"));
            }
            BlockTxn::begin(&shared.root, block).map_err(|e| e.to_string())
        });
    let mut done = Done {
        request_id,
        ..Done::default()
    };
    match r {
        Ok(txn) => {
            info!(stage, block, txn = txn.id(), "block transaction opened");
            shared.stages.insert(stage, owner, txn);
            done.ok = 1;
        }
        Err(e) => {
            warn!(stage, block, "cannot open a block transaction: {e}");
            done.failed = 1;
            send(
                w,
                &Msg::ItemResults {
                    request_id,
                    results: vec![failed(b"", format!("block {block}: {e}"))],
                },
            )?;
        }
    }
    send_flush(w, &Msg::Done(done))
}

fn journal_attrs(a: &Attrs, can_chown: bool) -> JournalAttrs {
    let (uid, gid) = match (a.owner, can_chown) {
        (Some((u, g)), true) => (Some(u), Some(g)),
        _ => (None, None),
    };
    JournalAttrs {
        mode: a.mode,
        mtime: a.mtime.map(|(secs, nanos)| Mtime { secs, nanos }),
        uid,
        gid,
    }
}

/// Turns the commit's ops into the transaction's, checking every staged file.
fn add_ops(txn: &mut BlockTxn, st: &Staged, ops: &[Op], can_chown: bool) -> Result<(), String> {
    for op in ops {
        let shown = String::from_utf8_lossy(&op.path);
        let path = rel(&op.path).map_err(|e| e.to_string())?;
        let jop = match &op.kind {
            OpKind::Put { attrs, size } => {
                match st.files.get(&op.path) {
                    Some(Arrival::Arrived { size: got }) if got == size => {}
                    Some(Arrival::Arrived { size: got }) => {
                        return Err(format!(
                            "{shown}: {got} bytes arrived, {size} expected (changed on the \
                             master while being sent? sync again)"
                        ))
                    }
                    Some(Arrival::Receiving) => {
                        return Err(format!("{shown}: did not arrive complete and verified"))
                    }
                    None => return Err(format!("{shown}: was not sent")),
                }
                JournalOp::Put {
                    path,
                    attrs: journal_attrs(attrs, can_chown),
                }
            }
            OpKind::Delete { .. } => JournalOp::Delete { path },
            OpKind::Mkdir(a) => JournalOp::Mkdir {
                path,
                attrs: journal_attrs(a, can_chown),
            },
            OpKind::SetAttrs(a) => JournalOp::SetAttrs {
                path,
                attrs: journal_attrs(a, can_chown),
            },
            OpKind::Symlink { target, attrs } => JournalOp::Symlink {
                path,
                target: PathBuf::from(OsStr::from_bytes(target)),
                attrs: journal_attrs(attrs, can_chown),
            },
            OpKind::HardLink { existing } => JournalOp::HardLink {
                path,
                target: rel(existing).map_err(|e| e.to_string())?,
            },
        };
        txn.add_op(jop).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `blockCommit`: commits (or, with `abort`, drops) transaction `stage`. Answers every op ok,
/// or every op failed with the reason, then `done`.
pub(crate) fn commit(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    stage: &str,
    ops: &[Op],
    abort: bool,
) -> Result<(), AgentError> {
    let staged = shared.stages.remove(stage);
    let mut done = Done {
        request_id,
        ..Done::default()
    };
    let outcome: Result<(), String> = match staged {
        None => Err(format!("no open block transaction {stage:?}")),
        Some(staged) => {
            let mut st = staged.lock().expect("poisoned");
            match st.txn.take() {
                None => Err("the block transaction is closed".into()),
                Some(txn) if abort => {
                    info!(stage, block = txn.block_name(), "block transaction aborted");
                    if let Err(e) = txn.abort() {
                        warn!(stage, "cannot remove the staging directory: {e}");
                    }
                    shared.consist.block_ended(stage, false);
                    return send_flush(w, &Msg::Done(done));
                }
                Some(mut txn) => {
                    let block = txn.block_name().to_owned();
                    let r = add_ops(&mut txn, &st, ops, shared.backend.can_chown());
                    let r = match r {
                        Ok(()) => txn.commit().map_err(|e| match e {
                            JournalError::InDoubt { .. } => format!(
                                "{e} (the block is committed: it is completed when the agent \
                                 restarts)"
                            ),
                            e => e.to_string(),
                        }),
                        Err(e) => {
                            let _ = txn.abort();
                            Err(e)
                        }
                    };
                    // The block may have replaced directories the backend keeps open.
                    shared.backend.dirs_changed();
                    match &r {
                        Ok(()) => info!(stage, block, ops = ops.len(), "block committed"),
                        Err(e) => warn!(stage, block, "block not committed: {e}"),
                    }
                    r.map_err(|e| format!("block {block} not applied: {e}"))
                }
            }
        }
    };
    // The write log records the block's files only now that they are in place.
    shared.consist.block_ended(stage, outcome.is_ok());
    let mut results = ResultBatch::new(w, request_id);
    for op in ops {
        let item = match &outcome {
            Ok(()) => {
                done.ok += 1;
                succeeded(&op.path, String::new())
            }
            Err(e) => {
                done.failed += 1;
                failed(&op.path, e.clone())
            }
        };
        results.push(item)?;
    }
    results.finish(done)
}
