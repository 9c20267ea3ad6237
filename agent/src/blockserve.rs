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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleetsync_proto::{Attrs, Done, ItemResult, Msg, Op, OpKind, Outcome};
use tracing::{info, warn};

use crate::backend::{Applied, TempFile};
use crate::journal::{self, BlockTxn, JournalError, Mtime, RelPath};
use crate::server::{send, send_flush, Shared, SharedWriter};
use crate::transfer::failed;
use crate::AgentError;

/// The open staging transactions of an agent, by their server-chosen name.
#[derive(Default)]
pub(crate) struct Stages {
    open: Mutex<HashMap<String, Arc<Mutex<Staged>>>>,
    next_owner: AtomicU64,
}

struct Staged {
    /// The server connection that opened it.
    owner: u64,
    txn: Option<BlockTxn>,
    files: HashMap<Vec<u8>, Arrival>,
}

enum Arrival {
    Receiving,
    Arrived { size: u64 },
}

impl Stages {
    /// A new owner id for a server connection.
    pub(crate) fn new_owner(&self) -> u64 {
        self.next_owner.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn get(&self, stage: &str) -> Option<Arc<Mutex<Staged>>> {
        self.open.lock().expect("poisoned").get(stage).cloned()
    }

    /// Aborts the transactions a closed server connection left open.
    pub(crate) fn drop_owner(&self, owner: u64) {
        let gone: Vec<(String, Arc<Mutex<Staged>>)> = {
            let mut open = self.open.lock().expect("poisoned");
            let names: Vec<String> = open
                .iter()
                .filter(|(_, s)| s.lock().expect("poisoned").owner == owner)
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| open.remove(&n).map(|s| (n, s)))
                .collect()
        };
        for (name, staged) in gone {
            if let Some(txn) = staged.lock().expect("poisoned").txn.take() {
                info!(stage = %name, block = txn.block_name(), "server connection gone: block transaction aborted");
                if let Err(e) = txn.abort() {
                    warn!(stage = %name, "cannot remove the staging directory: {e}");
                }
            }
        }
    }
}

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
            let staged = Staged {
                owner,
                txn: Some(txn),
                files: HashMap::new(),
            };
            shared
                .stages
                .open
                .lock()
                .expect("poisoned")
                .insert(stage.to_owned(), Arc::new(Mutex::new(staged)));
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

/// A file being received into a staging transaction (`fileStart.stage`).
struct StagedFile {
    file: File,
    staged: Arc<Mutex<Staged>>,
    path: Vec<u8>,
    written: u64,
    can_chown: bool,
}

impl Write for StagedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TempFile for StagedFile {
    /// The file arrived complete and verified: it is recorded as such; it is put in place
    /// (with the attributes of the commit's `put`) only when the whole block commits.
    fn commit(self: Box<Self>, attrs: &Attrs) -> Result<Applied, AgentError> {
        // The sender's attributes (normally those of the commit's `put`) and the flush, here
        // on the receiver's commit threads so that the disk writes of many files overlap; the
        // journal then applies only what differs and its fsync finds little to do.
        if let (Some((uid, gid)), true) = (attrs.owner, self.can_chown) {
            rustix::fs::fchown(
                &self.file,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(io_err("chown staged file for", &self.path))?;
        }
        if let Some(mode) = attrs.mode {
            rustix::fs::fchmod(&self.file, rustix::fs::Mode::from_raw_mode(mode & 0o7777))
                .map_err(io_err("chmod staged file for", &self.path))?;
        }
        if let Some((sec, nsec)) = attrs.mtime {
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec.into(),
                },
            };
            rustix::fs::futimens(&self.file, &t)
                .map_err(io_err("set mtime of staged file for", &self.path))?;
        }
        self.file
            .sync_all()
            .map_err(io_err("fsync staged file for", &self.path))?;
        let mut st = self.staged.lock().expect("poisoned");
        st.files
            .insert(self.path.clone(), Arrival::Arrived { size: self.written });
        Ok(Applied::default())
    }
}

fn io_err<'p, E: Into<std::io::Error>>(
    op: &'static str,
    path: &'p [u8],
) -> impl FnOnce(E) -> AgentError + 'p {
    move |e| AgentError::io(op, path, e)
}

fn rel(path: &[u8]) -> Result<RelPath, JournalError> {
    RelPath::new(OsStr::from_bytes(path))
}

/// Starts receiving `path` into transaction `stage`; the result goes where the receiver's
/// temporary file would.
pub(crate) fn stage_file(
    shared: &Shared,
    stage: &str,
    path: &[u8],
) -> Result<Box<dyn TempFile>, AgentError> {
    let refuse = |why: String| AgentError::Verify {
        path: path.to_vec(),
        why,
    };
    let staged = shared
        .stages
        .get(stage)
        .ok_or_else(|| refuse(format!("no open block transaction {stage:?}")))?;
    let rel = rel(path).map_err(|e| refuse(e.to_string()))?;
    let file = {
        let mut st = staged.lock().expect("poisoned");
        if st.files.contains_key(path) {
            return Err(refuse("sent twice in one block".into()));
        }
        let txn = st
            .txn
            .as_mut()
            .ok_or_else(|| refuse("the block transaction is closed".into()))?;
        let file = txn.stage_file(&rel).map_err(|e| refuse(e.to_string()))?;
        st.files.insert(path.to_vec(), Arrival::Receiving);
        file
    };
    Ok(Box::new(StagedFile {
        file,
        staged,
        path: path.to_vec(),
        written: 0,
        can_chown: shared.backend.can_chown(),
    }))
}

fn journal_attrs(a: &Attrs, can_chown: bool) -> journal::Attrs {
    let (uid, gid) = match (a.owner, can_chown) {
        (Some((u, g)), true) => (Some(u), Some(g)),
        _ => (None, None),
    };
    journal::Attrs {
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
                journal::Op::Put {
                    path,
                    attrs: journal_attrs(attrs, can_chown),
                }
            }
            OpKind::Delete { .. } => journal::Op::Delete { path },
            OpKind::Mkdir(a) => journal::Op::Mkdir {
                path,
                attrs: journal_attrs(a, can_chown),
            },
            OpKind::SetAttrs(a) => journal::Op::SetAttrs {
                path,
                attrs: journal_attrs(a, can_chown),
            },
            OpKind::Symlink { target, attrs } => journal::Op::Symlink {
                path,
                target: PathBuf::from(OsStr::from_bytes(target)),
                attrs: journal_attrs(attrs, can_chown),
            },
            OpKind::HardLink { existing } => journal::Op::HardLink {
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
    let staged = shared.stages.open.lock().expect("poisoned").remove(stage);
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
    let mut results = Vec::with_capacity(ops.len().min(1024));
    for op in ops {
        let item = match &outcome {
            Ok(()) => {
                done.ok += 1;
                ItemResult {
                    path: op.path.clone(),
                    outcome: Outcome::Ok,
                    message: String::new(),
                    bytes: 0,
                    digest: Vec::new(),
                }
            }
            Err(e) => {
                done.failed += 1;
                failed(&op.path, e.clone())
            }
        };
        results.push(item);
        if results.len() >= 1024 {
            send(
                w,
                &Msg::ItemResults {
                    request_id,
                    results: std::mem::take(&mut results),
                },
            )?;
        }
    }
    if !results.is_empty() {
        send(
            w,
            &Msg::ItemResults {
                request_id,
                results,
            },
        )?;
    }
    send_flush(w, &Msg::Done(done))
}
