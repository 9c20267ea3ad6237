//! The agent's network side: accept, authenticate, serve requests; one thread
//! per connection.

use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use fleetsync_engine::Registry;
use fleetsync_proto::{
    auth, frame, Attrs, Done, FileKind, ItemResult, Msg, Op, OpKind, Outcome, Role,
};
use fleetsync_select::{Classification, Decision};
use rayon::prelude::*;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::error::show;
use crate::{path, AgentError, PosixBackend};

/// Entries per `listBatch` unless the server asks otherwise.
pub const DEFAULT_BATCH: usize = 4096;

/// How long a peer may take to authenticate.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

pub(crate) type SharedWriter = Arc<Mutex<BufWriter<TcpStream>>>;

pub(crate) struct Shared {
    pub(crate) token: Option<Vec<u8>>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) registry: Registry,
    /// The tree root (locks are taken on paths beneath it).
    pub(crate) root: PathBuf,
    /// Write log and consistency checks.
    pub(crate) consist: Arc<crate::checkserve::ConsistState>,
    /// Open block staging transactions (`--blocks`).
    pub(crate) stages: crate::blockserve::Stages,
}

/// An agent serving one tree; see [`Agent::serve`].
pub struct Agent {
    shared: Arc<Shared>,
    root: PathBuf,
}

impl Agent {
    /// An agent for the tree at `root`. `token = None` disables authentication
    /// (only for `--insecure-no-auth`). `backend = None` uses [`PosixBackend`]
    /// on `root`.
    pub fn new(
        root: impl AsRef<Path>,
        token: Option<Vec<u8>>,
        backend: Option<Arc<dyn Backend>>,
    ) -> Result<Agent, AgentError> {
        let root = root.as_ref().to_path_buf();
        recover_blocks(&root)?;
        let backend = match backend {
            Some(b) => b,
            None => Arc::new(PosixBackend::new(&root)?),
        };
        Ok(Agent {
            shared: Arc::new(Shared {
                token,
                backend,
                registry: Registry::with_builtins(),
                root: root.clone(),
                consist: Arc::new(crate::checkserve::ConsistState::new(&root)),
                stages: Default::default(),
            }),
            root,
        })
    }

    fn consist_mut(&mut self) -> &mut crate::checkserve::ConsistState {
        // Only `serve` shares these, and it consumes the agent.
        Arc::get_mut(
            &mut Arc::get_mut(&mut self.shared)
                .expect("not serving yet")
                .consist,
        )
        .expect("not serving yet")
    }

    /// Records every file received from a sync stream in the write log `file` (see
    /// [`crate::consistency`]), which must be outside the tree; `None` (the default) keeps
    /// the records in memory only.
    pub fn with_write_log(mut self, file: Option<&Path>) -> Result<Agent, AgentError> {
        self.set_write_log(file)?;
        Ok(self)
    }

    /// As [`Agent::with_write_log`], in place; on error the agent keeps its previous log.
    pub fn set_write_log(&mut self, file: Option<&Path>) -> Result<(), AgentError> {
        self.consist_mut().set_log(file)
    }

    /// Adds a consistency check, run after the built-in
    /// [`RecordedStateCheck`](crate::consistency::RecordedStateCheck) on the files of each
    /// `consistencyRequest`.
    pub fn with_check(mut self, check: Box<dyn crate::consistency::ConsistencyCheck>) -> Agent {
        self.consist_mut().add_check(check);
        self
    }

    /// Replaces every consistency check, the built-in one included, by `checks` (in order).
    pub fn with_checks(
        mut self,
        checks: Vec<Box<dyn crate::consistency::ConsistencyCheck>>,
    ) -> Agent {
        self.consist_mut().set_checks(checks);
        self
    }

    /// Accepts connections on `listener` on a background thread (one more
    /// thread per connection) until [`AgentHandle::stop`].
    pub fn serve(self, listener: TcpListener) -> std::io::Result<AgentHandle> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let shared = self.shared;
        info!(root = %self.root.display(), %addr, "agent listening");
        let thread = thread::Builder::new()
            .name(format!("agent-accept-{addr}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(conn) => {
                            let shared = shared.clone();
                            let _ = thread::Builder::new()
                                .name("agent-conn".into())
                                .spawn(move || handle_connection(conn, shared));
                        }
                        Err(e) => {
                            warn!("accept failed: {e}");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })?;
        Ok(AgentHandle {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

/// Finishes or undoes the dependency blocks a killed agent left in the journal
/// ([`crate::journal::recover`]), before anything else touches the tree.
fn recover_blocks(root: &Path) -> Result<(), AgentError> {
    if !root.is_dir() {
        return Ok(()); // the backend reports a missing root
    }
    let report = crate::journal::recover(root).map_err(|e| AgentError::Io {
        op: "recover the block journal in",
        path: root.as_os_str().as_encoded_bytes().to_vec(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // An interrupted block is worth seeing without -v.
    for t in &report.rolled_back {
        warn!(txn = %t, "block journal: uncommitted block rolled back (the tree keeps the old version)");
    }
    for t in &report.rolled_forward {
        warn!(txn = %t, "block journal: committed block completed (the tree has the new version)");
    }
    for t in &report.cleaned {
        info!(txn = %t, "block journal: finished block's staging directory removed");
    }
    for t in &report.in_use {
        warn!(txn = %t, "block journal: transaction in use by another process, left alone");
    }
    Ok(())
}

/// A running agent.
pub struct AgentHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AgentHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections (connections in progress finish on their own).
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Blocks until the agent stops (forever, unless stopped elsewhere).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn handle_connection(mut conn: TcpStream, shared: Arc<Shared>) {
    let peer_addr = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let peer = match auth::accept(
        &mut conn,
        shared.token.as_deref(),
        shared.backend.can_chown(),
    ) {
        Ok(p) => p,
        Err(e) => {
            warn!(peer = %peer_addr, "closing unauthenticated connection: {e}");
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
    };
    let _ = conn.set_read_timeout(None);
    debug!(peer = %peer_addr, role = peer.role.name(), "authenticated");
    let result = (|| -> Result<(), AgentError> {
        let read_half = conn.try_clone().map_err(|e| AgentError::Proto(e.into()))?;
        let mut reader = BufReader::with_capacity(1 << 20, read_half);
        let writer: SharedWriter = Arc::new(Mutex::new(BufWriter::with_capacity(1 << 20, conn)));
        match peer.role {
            Role::Agent => crate::transfer::receive(&mut reader, &writer, &shared),
            _ => serve_requests(&mut reader, &writer, &shared),
        }
    })();
    if let Err(e) = result {
        warn!(peer = %peer_addr, "connection closed: {e}");
    }
}

pub(crate) fn send(w: &SharedWriter, msg: &Msg) -> Result<(), AgentError> {
    let mut w = w.lock().expect("writer poisoned");
    frame::write_frame(&mut *w, &msg.encode())?;
    Ok(())
}

pub(crate) fn send_flush(w: &SharedWriter, msg: &Msg) -> Result<(), AgentError> {
    let mut w = w.lock().expect("writer poisoned");
    frame::write_frame(&mut *w, &msg.encode())?;
    w.flush().map_err(|e| AgentError::Proto(e.into()))?;
    Ok(())
}

pub(crate) fn flush(w: &SharedWriter) -> Result<(), AgentError> {
    w.lock()
        .expect("writer poisoned")
        .flush()
        .map_err(|e| AgentError::Proto(e.into()))
}

fn serve_requests(
    reader: &mut BufReader<TcpStream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
) -> Result<(), AgentError> {
    let mut senders: Vec<JoinHandle<()>> = Vec::new();
    let owner = shared.stages.new_owner();
    let r = serve_loop(reader, w, shared, &mut senders, owner);
    for t in senders {
        let _ = t.join();
    }
    shared.stages.drop_owner(owner);
    shared.backend.persist();
    r
}

fn serve_loop(
    reader: &mut BufReader<TcpStream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
    senders: &mut Vec<JoinHandle<()>>,
    owner: u64,
) -> Result<(), AgentError> {
    let mut owner_noted = false;
    while let Some(body) = frame::read_frame(reader)? {
        let msg = Msg::decode(&body)?;
        match msg {
            Msg::ListRequest {
                request_id,
                classification,
                batch_size,
            } => {
                let batch = if batch_size == 0 {
                    DEFAULT_BATCH
                } else {
                    (batch_size as usize).min(65536)
                };
                if let Err(e) = list(w, shared, request_id, &classification, batch) {
                    if matches!(e, AgentError::Proto(_)) {
                        return Err(e);
                    }
                    send(
                        w,
                        &Msg::Error {
                            request_id,
                            message: e.to_string(),
                        },
                    )?;
                }
                flush(w)?;
            }
            Msg::ChecksumRequest {
                request_id,
                algorithm,
                paths,
                fresh,
            } => checksums(w, shared, request_id, &algorithm, &paths, fresh)?,
            Msg::SendOrder {
                request_id,
                target,
                algorithm,
                paths,
                lock_timeout_ms,
                stage,
            } => {
                // In the background: one stream per remote, all at once.
                senders.retain(|t| !t.is_finished());
                let (w, shared) = (w.clone(), shared.clone());
                let t = thread::Builder::new()
                    .name("agent-send".into())
                    .spawn(move || {
                        if let Err(e) = crate::transfer::send_files(
                            &w,
                            &shared,
                            request_id,
                            &target,
                            &algorithm,
                            &paths,
                            lock_timeout_ms,
                            &stage,
                        ) {
                            warn!("send order {request_id}: {e}");
                        }
                    })
                    .map_err(|e| AgentError::Proto(e.into()))?;
                senders.push(t);
            }
            Msg::ApplyRequest { request_id, ops } => {
                apply(w, shared, request_id, &ops, &mut owner_noted)?
            }
            Msg::ConsistencyRequest {
                request_id,
                algorithm,
                files,
            } => crate::checkserve::serve(w, shared, request_id, &algorithm, &files)?,
            Msg::BlockBegin {
                request_id,
                stage,
                block,
            } => crate::blockserve::begin(w, shared, owner, request_id, &stage, &block)?,
            Msg::BlockCommit {
                request_id,
                stage,
                ops,
                abort,
            } => crate::blockserve::commit(w, shared, request_id, &stage, &ops, abort)?,
            other => {
                let message = format!("unexpected message '{}' from the server", other.kind_name());
                let _ = send_flush(
                    w,
                    &Msg::Error {
                        request_id: 0,
                        message: message.clone(),
                    },
                );
                return Err(AgentError::Proto(fleetsync_proto::ProtoError::Remote(
                    message,
                )));
            }
        }
    }
    Ok(())
}

fn list(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    spec: &fleetsync_proto::ClassificationSpec,
    batch: usize,
) -> Result<(), AgentError> {
    let class = Classification::from(spec);
    let matcher = class
        .compile()
        .map_err(|e| AgentError::Engine(format!("bad classification: {e}")))?;
    let everything = class.is_everything();
    let decide = move |p: &[u8], is_dir: bool| {
        if everything {
            Decision::Include
        } else {
            matcher.decide(p, is_dir)
        }
    };
    let mut entries = Vec::with_capacity(batch);
    shared.backend.list(&decide, &mut |e| {
        entries.push(e);
        if entries.len() >= batch {
            send(
                w,
                &Msg::ListBatch {
                    request_id,
                    entries: std::mem::take(&mut entries),
                    last: false,
                },
            )?;
        }
        Ok(())
    })?;
    send(
        w,
        &Msg::ListBatch {
            request_id,
            entries,
            last: true,
        },
    )
}

fn checksums(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    algorithm: &str,
    paths: &[Vec<u8>],
    fresh: bool,
) -> Result<(), AgentError> {
    let info = match shared.registry.info(algorithm) {
        Ok(i) => i,
        Err(e) => {
            return send_flush(
                w,
                &Msg::Error {
                    request_id,
                    message: e.to_string(),
                },
            )
        }
    };
    const CHUNK: usize = 4096;
    let chunks: Vec<&[Vec<u8>]> = paths.chunks(CHUNK).collect();
    if chunks.is_empty() {
        return send_flush(
            w,
            &Msg::ChecksumReply {
                request_id,
                results: Vec::new(),
                last: true,
            },
        );
    }
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let results = chunk
            .par_iter()
            .map(|p| {
                let r = path::check(p).and_then(|()| shared.backend.checksum(p, &info, fresh));
                match r {
                    Ok((digest, size)) => fleetsync_proto::ChecksumResult {
                        path: p.clone(),
                        size,
                        digest: Ok(digest),
                    },
                    Err(e) => fleetsync_proto::ChecksumResult {
                        path: p.clone(),
                        size: 0,
                        digest: Err(e.to_string()),
                    },
                }
            })
            .collect();
        send_flush(
            w,
            &Msg::ChecksumReply {
                request_id,
                results,
                last: i + 1 == n,
            },
        )?;
    }
    shared.backend.checksums_done();
    Ok(())
}

const OWNER_NOTE: &str = "owner/group not applied: the agent is not running as root";

fn apply(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    ops: &[Op],
    owner_noted: &mut bool,
) -> Result<(), AgentError> {
    let backend = &shared.backend;
    let mut done = Done {
        request_id,
        ..Done::default()
    };
    let mut results = Vec::new();
    // Directory mtimes change whenever something inside changes: apply them last.
    let mut dir_mtimes: Vec<(Vec<u8>, (i64, u32))> = Vec::new();
    let mut note = |applied: crate::backend::Applied| -> String {
        if applied.owner_skipped && !*owner_noted {
            *owner_noted = true;
            OWNER_NOTE.to_owned()
        } else {
            String::new()
        }
    };
    for op in ops {
        let p = &op.path;
        let r: Result<String, AgentError> = path::check(p).and_then(|()| match &op.kind {
            OpKind::Mkdir(attrs) => {
                let a = backend.mkdir(p, attrs)?;
                if let Some(t) = attrs.mtime {
                    dir_mtimes.push((p.clone(), t));
                }
                Ok(note(a))
            }
            OpKind::Delete { recursive } => backend.delete(p, *recursive).map(|()| String::new()),
            OpKind::SetAttrs(attrs) => {
                let mut attrs = *attrs;
                if attrs.mtime.is_some() && backend.kind(p)? == Some(FileKind::Dir) {
                    dir_mtimes.push((p.clone(), attrs.mtime.take().expect("checked")));
                }
                Ok(note(backend.set_attrs(p, &attrs)?))
            }
            OpKind::Symlink { target, attrs } => Ok(note(backend.symlink(p, target, attrs)?)),
            OpKind::HardLink { existing } => {
                path::check(existing)?;
                backend.hard_link(p, existing).map(|()| String::new())
            }
            OpKind::Put { .. } => Err(AgentError::Verify {
                path: p.clone(),
                why: "a put is only valid in a block commit".into(),
            }),
        });
        let (outcome, message) = match r {
            Ok(m) => {
                done.ok += 1;
                (Outcome::Ok, m)
            }
            Err(e) => {
                done.failed += 1;
                debug!("apply {}: {e}", show(p));
                (Outcome::Failed, e.to_string())
            }
        };
        results.push(ItemResult {
            path: p.clone(),
            outcome,
            message,
            bytes: 0,
            digest: Vec::new(),
        });
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
    // Deepest first, so that setting a child's mtime cannot disturb a parent's.
    dir_mtimes.sort_by_key(|(p, _)| {
        std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count() + usize::from(!p.is_empty()))
    });
    for (p, t) in dir_mtimes {
        let attrs = Attrs {
            mtime: Some(t),
            ..Attrs::default()
        };
        if let Err(e) = backend.set_attrs(&p, &attrs) {
            // The op was already reported ok; report the late failure as its own item.
            done.failed += 1;
            results.push(ItemResult {
                path: p,
                outcome: Outcome::Failed,
                message: e.to_string(),
                bytes: 0,
                digest: Vec::new(),
            });
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
