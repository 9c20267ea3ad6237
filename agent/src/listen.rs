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
use fleetsync_proto::tls::{Identity, Stream, TlsError};
use fleetsync_proto::{auth, frame, Msg, Role, TreeIdentity};
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::records::ConsistState;
use crate::send::SendOrder;
use crate::session::{
    flush, send, send_error, send_flush, AgentTls, FrameWriter, Shared, SharedWriter,
};
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
                tls: None,
                backend,
                registry: Registry::with_builtins(),
                root: root.clone(),
                consist: Arc::new(ConsistState::new(&root)),
                stages: Default::default(),
                versions: None,
                read_only: false,
                deltas: Default::default(),
                master_limits: Default::default(),
                tree: tree_identity(&root),
                metrics: Default::default(),
                live: Default::default(),
            }),
            root,
        })
    }

    /// The state shared by the agent's connections.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The agent's counters (for `--metrics-listen`).
    pub fn metrics(&self) -> Arc<crate::metrics::AgentMetrics> {
        self.shared.metrics.clone()
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

    /// Speaks TLS 1.3 on every connection (`--tls`): accepts the server (certificate role
    /// `server`) and other agents (role `agent`), and dials remote agents requiring role
    /// `agent`; `identity` must be an agent's.
    pub fn with_tls(mut self, identity: &Identity) -> Result<Agent, TlsError> {
        if identity.role() != Role::Agent {
            return Err(TlsError::Config(format!(
                "the certificate in {} is a {} certificate, not an agent's",
                identity.dir().display(),
                identity.role().name()
            )));
        }
        let tls = AgentTls {
            listen: identity.server_config(&[Role::Server, Role::Agent])?,
            dial: identity.client_config(&[Role::Agent])?,
            me: identity.cert().clone(),
            servers: Default::default(),
            next_conn: Default::default(),
            replay: Default::default(),
        };
        Arc::get_mut(&mut self.shared).expect("not serving yet").tls = Some(tls);
        Ok(self)
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
        let shared_handle = shared.clone();
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
                            let _ =
                                thread::Builder::new()
                                    .name("agent-conn".into())
                                    .spawn(move || {
                                        let _live = shared.live.add(&conn, true);
                                        handle_connection(conn, shared.clone())
                                    });
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
            shared: shared_handle,
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
    shared: Arc<Shared>,
}

/// How a clean stop ([`AgentHandle::stop_gracefully`]) went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StopReport {
    /// Connections that were open when the stop began.
    pub open: usize,
    /// Every connection's handler ended within the time given (else some are still
    /// finishing a commit or a disk write).
    pub all_ended: bool,
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

    /// Stops cleanly (SIGTERM): stops accepting, closes every connection, and waits (at most
    /// `limit`) for their handlers to end as they do when a peer goes away: the file being
    /// received is kept as its partial file (or its temp file removed), files already
    /// verified are committed, open block transactions are aborted (the tree keeps the old
    /// version), sends stop; then the checksum cache and the write log are written out. No
    /// file is ever left torn under its real name.
    pub fn stop_gracefully(mut self, limit: Duration) -> StopReport {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let open = self.shared.live.open_count();
        self.shared.live.close_all();
        let all_ended = self.shared.live.wait_accepted(limit);
        self.shared.backend.persist();
        self.shared.consist.sync_log();
        info!(open, all_ended, "agent stopped");
        StopReport { open, all_ended }
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

/// Where the tree at `root` is: the machine, and the (device, inode) of the root and of each
/// parent up to `/` (unknown parts are left out: the server then checks less, never more).
fn tree_identity(root: &Path) -> TreeIdentity {
    use std::os::unix::fs::MetadataExt;
    let host = ["/etc/machine-id", "/proc/sys/kernel/random/boot_id"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let chain = match std::fs::canonicalize(root) {
        Ok(real) => real
            .ancestors()
            .map_while(|d| std::fs::metadata(d).ok().map(|m| (m.dev(), m.ino())))
            .collect(),
        Err(_) => Vec::new(),
    };
    TreeIdentity { host, chain }
}

/// Why a read-only agent refuses a write.
const READ_ONLY: &str = "this agent is read-only (--read-only): it refuses every write";

fn handle_connection(conn: TcpStream, shared: Arc<Shared>) {
    let peer_addr = conn
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = conn.set_nodelay(true);
    // The TLS handshake (with its timeout) runs here, on the connection's own thread: a
    // peer that stalls it holds up nobody else.
    let mut conn = match &shared.tls {
        Some(tls) => match Stream::accept(conn, &tls.listen, HANDSHAKE_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                warn!(peer = %peer_addr, "refused a connection: {e}");
                return;
            }
        },
        None => Stream::plain(conn),
    };
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let peer = match auth::accept_as(
        &mut conn,
        shared.token.as_deref(),
        shared.backend.can_chown(),
        &shared.tree,
        true,
    ) {
        Ok(p) => p,
        Err(e) => {
            warn!(peer = %peer_addr, "closing unauthenticated connection: {e}");
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
    };
    if let Some(cert) = conn.peer_role() {
        if cert != peer.role {
            warn!(
                peer = %peer_addr,
                "refused a connection: it claimed role {} with a {} certificate",
                peer.role.name(),
                cert.name()
            );
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = conn.set_read_timeout(None);
    debug!(peer = %peer_addr, role = peer.role.name(), tls = conn.is_tls(), "authenticated");
    let _open = shared.metrics.connection();
    // A server's certificate vouches for the tickets of the streams it orders while it is
    // connected.
    let _server = match (&shared.tls, conn.peer_cert()) {
        (Some(tls), Some(cert)) if peer.role == Role::Server => Some(ServerSeen::new(tls, cert)),
        _ => None,
    };
    let result = (|| -> Result<(), AgentError> {
        let read_half = conn.try_clone().map_err(|e| AgentError::Proto(e.into()))?;
        let mut reader = BufReader::with_capacity(1 << 20, read_half);
        let allowed = match (&shared.tls, conn.peer_cert()) {
            (Some(tls), Some(sender)) if peer.role == Role::Agent => {
                match ticket_paths(&mut reader, tls, &sender) {
                    Ok(paths) => Some(paths),
                    Err(why) => {
                        warn!(peer = %peer_addr, "refused a file stream: {why}");
                        let writer = Mutex::new(BufWriter::new(conn));
                        let mut w = writer.lock().expect("fresh");
                        let _ = frame::write_frame(
                            &mut *w,
                            &Msg::Error {
                                request_id: 0,
                                message: format!("refused the file stream: {why}"),
                            }
                            .encode(),
                        );
                        let _ = std::io::Write::flush(&mut *w);
                        return Ok(());
                    }
                }
            }
            _ => None,
        };
        let writer: SharedWriter = Arc::new(Mutex::new(FrameWriter::new(
            BufWriter::with_capacity(1 << 20, conn),
            peer.frame_compression,
        )));
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
            Role::Agent => receive::receive(&mut reader, &writer, &shared, allowed.as_deref()),
            _ => serve_requests(&mut reader, &writer, &shared, peer.frame_compression),
        }
    })();
    if let Err(e) = result {
        warn!(peer = %peer_addr, "connection closed: {e}");
    }
}

/// A server connected now, whose certificate signs tickets (forgotten when dropped).
struct ServerSeen<'a> {
    tls: &'a AgentTls,
    id: u64,
}

impl<'a> ServerSeen<'a> {
    fn new(
        tls: &'a AgentTls,
        cert: fleetsync_proto::tls::rustls::pki_types::CertificateDer<'static>,
    ) -> Self {
        let id = tls.next_conn.fetch_add(1, Ordering::Relaxed);
        tls.servers.lock().expect("poisoned").insert(id, cert);
        ServerSeen { tls, id }
    }
}

impl Drop for ServerSeen<'_> {
    fn drop(&mut self) {
        self.tls.servers.lock().expect("poisoned").remove(&self.id);
    }
}

/// Reads a TLS stream's first frame, its `streamTicket`, and checks it (see
/// `fleetsync_proto::ticket`): the paths it lets `sender` write here.
fn ticket_paths(
    reader: &mut BufReader<Stream>,
    tls: &AgentTls,
    sender: &[u8],
) -> Result<Arc<std::collections::HashSet<Vec<u8>>>, String> {
    let body = frame::read_frame(reader)
        .map_err(|e| e.to_string())?
        .ok_or("the stream ended before its ticket")?;
    let ticket = match Msg::decode(&body).map_err(|e| e.to_string())? {
        Msg::StreamTicket { ticket } => ticket,
        other => {
            return Err(format!(
                "no ticket from the server (first frame {}): with --tls a stream needs the \
                 server's authority",
                other.kind_name()
            ))
        }
    };
    let signers: Vec<_> = tls
        .servers
        .lock()
        .expect("poisoned")
        .values()
        .cloned()
        .collect();
    let t = fleetsync_proto::ticket::verify(&ticket, &signers, &tls.me, sender)?;
    tls.replay.admit(&t)?;
    Ok(fleetsync_proto::ticket::allowed_paths(t))
}

fn serve_requests(
    reader: &mut BufReader<Stream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
    inflate: bool,
) -> Result<(), AgentError> {
    let mut senders: Vec<JoinHandle<()>> = Vec::new();
    let owner = shared.stages.new_owner();
    let mut sweep = Vec::new();
    let r = serve_loop(reader, w, shared, &mut senders, owner, &mut sweep, inflate);
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
    reader: &mut BufReader<Stream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
    senders: &mut Vec<JoinHandle<()>>,
    owner: u64,
    sweep: &mut Vec<crate::backend::ListedPartial>,
    inflate: bool,
) -> Result<(), AgentError> {
    let mut owner_noted = false;
    while let Some(body) = frame::read_frame(reader)? {
        let msg = if inflate {
            Msg::decode_inflating(&body)?
        } else {
            Msg::decode(&body)?
        };
        match msg {
            Msg::ListRequest {
                request_id,
                classification,
                batch_size,
                sweep_partials,
                cached_digests,
            } => {
                let batch = list::batch_size(batch_size);
                // Only this listing's finds count (another connection's listing may have
                // left some).
                drop(shared.backend.take_listed_partials());
                let r = list::list(
                    w,
                    shared,
                    request_id,
                    &classification,
                    batch,
                    &cached_digests,
                );
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
                ticket,
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
                    ticket,
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
