//! The receiving side of an agent-to-agent file stream (on the remote): each file is written
//! to a temporary file (or a block's staging directory), verified (size and checksum), then
//! committed (fsync, attributes, rename) on a pool of threads and recorded in the write log.

use std::collections::BTreeSet;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::thread;

use fleetsync_engine::Algorithm;
use fleetsync_proto::fleetsync_capnp::message::Which as W;
use fleetsync_proto::{
    fleetsync_capnp, frame, Attrs, Done, FileEntry, ItemResult, Msg, Outcome, ProtoError,
};
use tracing::{debug, warn};

use crate::backend::TempFile;
use crate::error::show;
use crate::lock::{lock_beneath, LockKind};
use crate::records::ConsistState;
use crate::session::{failed, flush, send, send_flush, Shared, SharedWriter, OWNER_NOTE};
use crate::{path, AgentError};

/// The file being received.
struct Incoming {
    entry: FileEntry,
    temp: Option<Box<dyn TempFile>>,
    state: Option<Box<dyn Algorithm>>,
    received: u64,
    error: Option<String>,
    /// `--lock`: exclusive-lock the destination while replacing it.
    lock_timeout_ms: Option<u32>,
    /// Algorithm of the digest (for the write log).
    algorithm: String,
    /// Block transaction the file is staged in (empty: put in place at once).
    stage: String,
}

/// Remote side: receives files from a master agent until `streamEnd`.
pub(crate) fn receive(
    reader: &mut BufReader<TcpStream>,
    w: &SharedWriter,
    shared: &Shared,
) -> Result<(), AgentError> {
    let backend = &shared.backend;
    let mut cur: Option<Incoming> = None;
    let mut committer = Committer::new(w.clone(), COMMIT_THREADS, shared.consist.clone());
    let mut fb = frame::FrameBuf::new();
    loop {
        if !fb.read(reader, frame::MAX_FRAME)? {
            // Cut off: whatever was in flight is dropped (its temp file removed).
            return Err(AgentError::Proto(ProtoError::Truncated));
        }
        let msg = fb.parse()?;
        let root: fleetsync_capnp::message::Reader<'_> =
            msg.get_root().map_err(ProtoError::from)?;
        if let W::FileChunk(c) = root.which().map_err(ProtoError::from)? {
            let data = c.and_then(|c| c.get_data()).map_err(ProtoError::from)?;
            let Some(inc) = cur.as_mut() else {
                return Err(AgentError::Proto(ProtoError::Decode(
                    "fileChunk outside a file".into(),
                )));
            };
            inc.take_chunk(data);
            continue;
        }
        match Msg::from_reader(root)? {
            Msg::FileStart {
                request_id,
                entry,
                algorithm,
                lock_timeout_ms,
                stage,
            } => {
                if cur.is_some() {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "fileStart inside a file".into(),
                    )));
                }
                committer.state.lock().expect("poisoned").done.request_id = request_id;
                cur = Some(Incoming::start(
                    shared,
                    entry,
                    algorithm,
                    lock_timeout_ms,
                    stage,
                ));
            }
            Msg::FileEnd {
                size,
                digest,
                aborted,
                error,
            } => {
                let Some(inc) = cur.take() else {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "fileEnd outside a file".into(),
                    )));
                };
                match inc.into_job(shared, size, digest, aborted, error) {
                    Ok(job) => committer.submit(job)?,
                    Err((p, why)) => {
                        debug!("receive {}: {why}", show(&p));
                        committer.report_failure(w, &p, why)?;
                        if reader.buffer().is_empty() {
                            flush(w)?;
                        }
                    }
                }
            }
            Msg::StreamEnd => {
                let (done, dirs) = committer.finish();
                for d in &dirs {
                    if let Err(e) = backend.sync_dir(d) {
                        warn!("{e}");
                    }
                }
                shared.consist.sync_log();
                send_flush(w, &Msg::Done(done))?;
                return Ok(());
            }
            other => {
                return Err(AgentError::Proto(ProtoError::Unexpected {
                    expected: "a file stream message",
                    got: other.kind_name(),
                }))
            }
        }
    }
}

impl Incoming {
    /// Prepares to receive `entry`: its temporary file (or staged file, in block transaction
    /// `stage`) and checksum state. What fails here is kept and reported at the file's end.
    fn start(
        shared: &Shared,
        entry: FileEntry,
        algorithm: String,
        lock_timeout_ms: Option<u32>,
        stage: String,
    ) -> Incoming {
        let p = entry.path.clone();
        let prepared = path::check(&p)
            .and_then(|()| {
                shared
                    .registry
                    .info(&algorithm)
                    .map_err(|e| AgentError::Engine(e.to_string()))
            })
            .and_then(|info| {
                let temp = if stage.is_empty() {
                    shared.backend.create_temp(&p)?
                } else {
                    let can_chown = shared.backend.can_chown();
                    shared.stages.stage_file(&stage, &p, can_chown)?
                };
                Ok((info, temp))
            });
        let mut inc = Incoming {
            entry,
            temp: None,
            state: None,
            received: 0,
            error: None,
            // A staged file replaces nothing until its block commits.
            lock_timeout_ms: lock_timeout_ms.filter(|_| stage.is_empty()),
            algorithm,
            stage,
        };
        match prepared {
            Ok((info, temp)) => {
                inc.state = Some(info.instantiate());
                inc.temp = Some(temp);
            }
            Err(e) => inc.error = Some(e.to_string()),
        }
        inc
    }

    /// Takes the next chunk of the file's data.
    fn take_chunk(&mut self, data: &[u8]) {
        if self.error.is_none() {
            if let Some(t) = self.temp.as_mut() {
                if let Err(e) = t.write_all(data) {
                    self.error = Some(format!("write: {e}"));
                    self.temp = None;
                }
            }
            if let Some(s) = self.state.as_mut() {
                s.update(data);
            }
        }
        self.received += data.len() as u64;
    }

    /// The file ended (`fileEnd` with `size`, `digest`, `aborted`, `error`): checked, it is
    /// ready to commit; otherwise its path and why it failed.
    fn into_job(
        self,
        shared: &Shared,
        size: u64,
        digest: Vec<u8>,
        aborted: bool,
        error: String,
    ) -> Result<CommitJob, (Vec<u8>, String)> {
        let path = self.entry.path.clone();
        let lock = self.lock_timeout_ms.map(|ms| (shared.root.clone(), ms));
        let (algorithm, stage) = (self.algorithm.clone(), self.stage.clone());
        match self.verify(size, &digest, aborted, error) {
            Ok((temp, attrs)) => Ok(CommitJob {
                temp,
                attrs,
                path,
                size,
                lock,
                algorithm,
                digest,
                stage,
            }),
            Err(why) => Err((path, why)),
        }
    }

    /// Checks the completely received file; returns it with its attributes.
    fn verify(
        self,
        size: u64,
        digest: &[u8],
        aborted: bool,
        error: String,
    ) -> Result<(Box<dyn TempFile>, Attrs), String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if aborted {
            return Err(if error.is_empty() {
                "aborted by the sender".into()
            } else {
                error
            });
        }
        if self.received != size {
            return Err(format!(
                "received {} bytes, sender sent {size}",
                self.received
            ));
        }
        let got = self
            .state
            .as_ref()
            .map(|s| s.finish())
            .ok_or("no checksum state")?;
        if got.as_bytes() != digest {
            return Err("checksum mismatch: the file changed or was corrupted in transit".into());
        }
        let e = &self.entry;
        let attrs = Attrs {
            mode: Some(e.mode),
            owner: Some((e.uid, e.gid)),
            mtime: Some((e.mtime_sec, e.mtime_nsec)),
        };
        let temp = self.temp.ok_or("no temporary file")?;
        Ok((temp, attrs))
    }
}

/// Threads committing verified files (fsync, attributes, rename) so that the
/// disk flushes of many files overlap while the stream keeps flowing.
const COMMIT_THREADS: usize = 8;

struct CommitJob {
    temp: Box<dyn TempFile>,
    attrs: Attrs,
    path: Vec<u8>,
    size: u64,
    /// `--lock`: the tree root and the lock timeout.
    lock: Option<(std::path::PathBuf, u32)>,
    /// The verified digest, recorded in the write log once committed.
    algorithm: String,
    digest: Vec<u8>,
    /// Block transaction of a staged file (empty: none): its record waits for the block's
    /// commit, when the file is actually in place.
    stage: String,
}

#[derive(Default)]
struct CommitState {
    done: Done,
    dirs: BTreeSet<Vec<u8>>,
    owner_noted: bool,
}

struct Committer {
    tx: Option<std::sync::mpsc::SyncSender<CommitJob>>,
    workers: Vec<thread::JoinHandle<()>>,
    state: Arc<Mutex<CommitState>>,
}

impl Committer {
    fn new(w: SharedWriter, threads: usize, consist: Arc<ConsistState>) -> Committer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<CommitJob>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        let state = Arc::new(Mutex::new(CommitState::default()));
        let workers = (0..threads)
            .filter_map(|_| {
                let (rx, state, w) = (rx.clone(), state.clone(), w.clone());
                let consist = consist.clone();
                thread::Builder::new()
                    .name("agent-commit".into())
                    .spawn(move || loop {
                        let job = rx.lock().expect("poisoned").recv();
                        let Ok(job) = job else { return };
                        commit_one(job, &state, &w, &consist);
                    })
                    .ok()
            })
            .collect();
        Committer {
            tx: Some(tx),
            workers,
            state,
        }
    }

    fn request_id(&self) -> u64 {
        self.state.lock().expect("poisoned").done.request_id
    }

    /// Counts and reports (unflushed) a file that failed before its commit.
    fn report_failure(&self, w: &SharedWriter, path: &[u8], why: String) -> Result<(), AgentError> {
        self.state.lock().expect("poisoned").done.failed += 1;
        send(
            w,
            &Msg::ItemResults {
                request_id: self.request_id(),
                results: vec![failed(path, why)],
            },
        )
    }

    fn submit(&self, job: CommitJob) -> Result<(), AgentError> {
        if self.workers.is_empty() {
            // No thread could be started.
            return Err(AgentError::Proto(ProtoError::Io(std::io::Error::other(
                "no commit threads",
            ))));
        }
        self.tx
            .as_ref()
            .expect("open until finish")
            .send(job)
            .map_err(|_| {
                AgentError::Proto(ProtoError::Io(std::io::Error::other("commit threads gone")))
            })
    }

    /// Waits for every commit; returns the totals and the directories written to.
    fn finish(&mut self) -> (Done, BTreeSet<Vec<u8>>) {
        self.tx = None;
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        let mut st = self.state.lock().expect("poisoned");
        (st.done, std::mem::take(&mut st.dirs))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Files already verified are still committed when the stream breaks.
        self.finish();
    }
}

fn commit_one(
    job: CommitJob,
    state: &Mutex<CommitState>,
    w: &SharedWriter,
    consist: &ConsistState,
) {
    // With --lock: an exclusive lock on the existing destination (cooperating readers hold
    // shared locks on it) while the new file is renamed over it.
    let guard = match &job.lock {
        Some((root, ms)) => lock_beneath(root, &job.path, LockKind::Exclusive, *ms).map(Some),
        None => Ok(None),
    };
    let r = guard.and_then(|guard| {
        let r = job.temp.commit(&job.attrs).map_err(|e| e.to_string());
        if r.is_ok() {
            if job.stage.is_empty() {
                consist.record(&job.path, &job.algorithm, &job.digest);
            } else {
                consist.record_staged(&job.stage, &job.path, &job.algorithm, &job.digest);
            }
        }
        drop(guard);
        r
    });
    let (result, request_id) = {
        let mut st = state.lock().expect("poisoned");
        let result = match r {
            Ok(applied) => {
                st.done.ok += 1;
                st.dirs.insert(path::split(&job.path).0.to_vec());
                let message = if applied.owner_skipped && !st.owner_noted {
                    st.owner_noted = true;
                    OWNER_NOTE.to_owned()
                } else {
                    String::new()
                };
                ItemResult {
                    path: job.path,
                    outcome: Outcome::Ok,
                    message,
                    bytes: job.size,
                    digest: job.digest,
                }
            }
            Err(e) => {
                st.done.failed += 1;
                failed(&job.path, e)
            }
        };
        (result, st.done.request_id)
    };
    let _ = send_flush(
        w,
        &Msg::ItemResults {
            request_id,
            results: vec![result],
        },
    );
}
