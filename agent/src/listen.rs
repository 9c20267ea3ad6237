//! The agent's network side: accept, authenticate, hand each request of a connection to its
//! handler; one thread per connection.

use std::io::{BufReader, BufWriter};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use fleetsync_engine::Registry;
use fleetsync_proto::{auth, frame, Msg, Role};
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::records::ConsistState;
use crate::send::SendOrder;
use crate::session::{flush, send, send_error, send_flush, Shared, SharedWriter};
use crate::versions::VersionStore;
use crate::{apply, blocks, check, checksum, list, receive, AgentError, PosixBackend};

/// How long a peer may take to authenticate.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

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
                consist: Arc::new(ConsistState::new(&root)),
                stages: Default::default(),
                versions: None,
                read_only: false,
                deltas: Default::default(),
                master_limits: Default::default(),
            }),
            root,
        })
    }

    /// Serves lists, checksums and sends, and refuses every write (received files, deletes,
    /// attributes, links, blocks) with an error naming the reason (`--read-only`: a master
    /// test system, say).
    pub fn with_read_only(mut self, read_only: bool) -> Agent {
        Arc::get_mut(&mut self.shared)
            .expect("not serving yet")
            .read_only = read_only;
        self
    }

    /// Keeps the versions of the files this agent sends in `store`, so that a later send to
    /// a remote still on one of them is a zstd patch against it (`--keep-versions`).
    pub fn with_versions(mut self, store: Arc<VersionStore>) -> Agent {
        Arc::get_mut(&mut self.shared)
            .expect("not serving yet")
            .versions = Some(store);
        self
    }

    fn consist_mut(&mut self) -> &mut ConsistState {
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

/// Why a read-only agent refuses a write.
const READ_ONLY: &str = "this agent is read-only (--read-only): it refuses every write";

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
            Role::Agent if shared.read_only => {
                warn!(peer = %peer_addr, "refused a file stream: {READ_ONLY}");
                send_flush(
                    &writer,
                    &Msg::Error {
                        request_id: 0,
                        message: READ_ONLY.to_owned(),
                    },
                )
            }
            Role::Agent => receive::receive(&mut reader, &writer, &shared),
            _ => serve_requests(&mut reader, &writer, &shared),
        }
    })();
    if let Err(e) = result {
        warn!(peer = %peer_addr, "connection closed: {e}");
    }
}

fn serve_requests(
    reader: &mut BufReader<TcpStream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
) -> Result<(), AgentError> {
    let mut senders: Vec<JoinHandle<()>> = Vec::new();
    let owner = shared.stages.new_owner();
    let mut sweep = Vec::new();
    let r = serve_loop(reader, w, shared, &mut senders, owner, &mut sweep);
    for t in senders {
        let _ = t.join();
    }
    // The sync is over: partial files it listed and did not use are of no more use.
    let n = if shared.read_only {
        0
    } else {
        shared.backend.sweep_partials(&sweep)
    };
    if n > 0 {
        debug!("removed {n} partial file(s) this sync did not use");
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
    sweep: &mut Vec<crate::backend::ListedPartial>,
) -> Result<(), AgentError> {
    let mut owner_noted = false;
    while let Some(body) = frame::read_frame(reader)? {
        let msg = Msg::decode(&body)?;
        match msg {
            Msg::ListRequest {
                request_id,
                classification,
                batch_size,
                sweep_partials,
            } => {
                let batch = list::batch_size(batch_size);
                // Only this listing's finds count (another connection's listing may have
                // left some).
                drop(shared.backend.take_listed_partials());
                let r = list::list(w, shared, request_id, &classification, batch);
                let found = shared.backend.take_listed_partials();
                if sweep_partials {
                    sweep.extend(found);
                }
                if let Err(e) = r {
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
            } => checksum::reply(w, shared, request_id, &algorithm, &paths, fresh)?,
            Msg::SendOrder {
                request_id,
                target,
                algorithm,
                paths,
                lock_timeout_ms,
                stage,
                transfer,
                bases,
                sizes,
                relays,
            } => {
                let order = SendOrder {
                    relays,
                    request_id,
                    target,
                    algorithm,
                    paths,
                    lock_timeout_ms,
                    stage,
                    transfer,
                    bases,
                    sizes,
                };
                // In the background: one stream per remote, all at once.
                senders.retain(|t| !t.is_finished());
                let (w, shared) = (w.clone(), shared.clone());
                let t = thread::Builder::new()
                    .name("agent-send".into())
                    .spawn(move || {
                        if let Err(e) = order.run(&w, &shared) {
                            warn!("send order {request_id}: {e}");
                        }
                    })
                    .map_err(|e| AgentError::Proto(e.into()))?;
                senders.push(t);
            }
            Msg::ApplyRequest { request_id, .. }
            | Msg::BlockBegin { request_id, .. }
            | Msg::BlockCommit { request_id, .. }
                if shared.read_only =>
            {
                send_error(w, request_id, READ_ONLY.to_owned())?
            }
            Msg::ApplyRequest { request_id, ops } => {
                apply::apply(w, shared, request_id, &ops, &mut owner_noted)?
            }
            Msg::ConsistencyRequest {
                request_id,
                algorithm,
                files,
            } => check::reply(w, shared, request_id, &algorithm, &files)?,
            Msg::BlockBegin {
                request_id,
                stage,
                block,
            } => blocks::begin(w, shared, owner, request_id, &stage, &block)?,
            Msg::BlockCommit {
                request_id,
                stage,
                ops,
                abort,
            } => blocks::commit(w, shared, request_id, &stage, &ops, abort)?,
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
