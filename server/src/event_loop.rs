//! The comparison server's event loop: one `mio` poll, no hidden threads.
//!
//! [`Server`] owns every connection in a `HashMap<Token, Conn>`. A connection
//! reads until `WouldBlock`, decodes whole frames with a
//! [`FrameDecoder`](fleetsync_proto::frame::FrameDecoder) and queues its replies;
//! writes are flushed at the end of each loop turn and writable interest is
//! registered only while output is pending. A peer that sends a malformed,
//! truncated or oversize frame is closed and logged; the loop never panics on
//! peer input.
//!
//! Control clients connect to the server's listener and send one
//! `syncRequest`. For each request the server connects to the master agent
//! (once for the file list, and once more per remote so that the transfers
//! to different remotes run concurrently) and to every remote agent. The sync
//! itself is a [`SyncJob`] of one [`RemoteSync`](crate::remote_sync::RemoteSync)
//! per remote; the loop hands them the agents' replies and writes out what they
//! queue.
//!
//! A remote that fails (connection refused, reset, protocol error) is
//! reported in its `remoteResult`; the others go on.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetsync_proto::frame;
use fleetsync_proto::ticket;
use fleetsync_proto::tls::{self, rustls, Identity, TlsError};
use fleetsync_proto::{auth, Msg, Role, SyncRequest, TreeIdentity};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, info, warn};

use crate::conn::{set_request_id, AgentRole, Conn, ConnPeer, Handshake, Hs};
use crate::jobs::{JobId, JobStatus, JobStore, RemoteCounts};
use crate::metrics::ServerMetrics;
use crate::remote_sync::Peer;
use crate::sync_job::SyncJob;

const LISTENER: Token = Token(0);
/// Itemized plan output waiting for the control client beyond which the
/// server stops producing more.
const EMIT_HIGH: usize = 4 << 20;
/// How long a peer may take to authenticate (TLS and token handshakes together).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// The TLS configurations of a server (`--tls`): its listener accepts control clients
/// (certificate role `control`), and it dials agents requiring role `agent`.
#[derive(Clone, Debug)]
pub struct ServerTls {
    listen: Arc<rustls::ServerConfig>,
    dial: Arc<rustls::ClientConfig>,
    /// Signs the tickets of send orders.
    signer: Arc<dyn rustls::sign::SigningKey>,
}

impl ServerTls {
    /// The configurations of a server holding `identity`, which must be a server's.
    pub fn new(identity: &Identity) -> Result<ServerTls, TlsError> {
        if identity.role() != Role::Server {
            return Err(TlsError::Config(format!(
                "the certificate in {} is a {} certificate, not a server's",
                identity.dir().display(),
                identity.role().name()
            )));
        }
        Ok(ServerTls {
            listen: identity.server_config(&[Role::Control])?,
            dial: identity.client_config(&[Role::Agent])?,
            signer: identity.signing_key()?,
        })
    }
}

/// Configuration of a [`Server`].
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Shared token; `None` runs without authentication (tests, loopback), or with
    /// certificates only when `tls` is set.
    pub token: Option<Vec<u8>>,
    /// TLS on every connection (`--tls`); `None`: plaintext.
    pub tls: Option<ServerTls>,
    /// Fail an agent connection that has a request outstanding and stays
    /// silent this long (`None`: wait forever).
    pub idle_timeout: Option<Duration>,
    /// Job history database (see [`crate::jobs`]); `None` records nothing.
    pub jobs_db: Option<std::path::PathBuf>,
    /// Names to record in the job history instead of agent addresses (the embedded
    /// `fleetsync sync` maps its in-process agents to their directories).
    pub job_labels: HashMap<String, String>,
    /// Never ask agents for compressed frames (`fleetsync server --no-frame-compression`).
    /// Otherwise every agent reached over a network (not loopback) is asked, and those that
    /// agree exchange big frames zstd-compressed with the server.
    pub plain_frames: bool,
}

/// The connections of one pair.
#[derive(Default)]
struct PairConns {
    /// The remote agent.
    remote: Option<Token>,
    /// The pair's own connection to the master agent.
    master: Option<Token>,
    /// The pair's result is recorded and its connections closed.
    closed: bool,
}

/// A job in the table: its sync and its connections.
struct Job {
    control: Token,
    master_conn: Option<Token>,
    /// The connection to the master agent that carries the relayed sends (`--fanout`).
    relay_link: Option<Token>,
    conns: Vec<PairConns>,
    next_req: u64,
    /// This job in the history database.
    record: Option<JobId>,
    /// When the running pairs' counts were last written to the history.
    recorded: Instant,
    /// Per pair, its counts as last added to the metrics.
    counted: Vec<RemoteCounts>,
    /// Until every agent connection of the job has authenticated (or failed): nothing is
    /// asked of the agents, so that overlapping trees are refused before anything is done.
    gate: Option<Gate>,
    sync: SyncJob,
}

/// The agents of a job that authenticated while others had not yet.
#[derive(Default)]
struct Gate {
    /// Connections still in their handshake.
    waiting: usize,
    /// Those through it, in order: role, connection, can chown, tree.
    ready: Vec<(AgentRole, Token, bool, TreeIdentity)>,
}

/// How often a running job's per-remote counts are written to the history, so that a job
/// interrupted by a crash still shows what had landed (to within this interval).
const PROGRESS_RECORD_EVERY: Duration = Duration::from_secs(2);

/// The comparison server.
pub struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: HashMap<Token, Conn>,
    jobs: HashMap<u64, Job>,
    next_token: usize,
    next_job: u64,
    config: ServerConfig,
    dirty: HashSet<Token>,
    to_close: Vec<(Token, String)>,
    /// Remote agents' connections not read for now: their lists ran ahead of the master's
    /// (see [`crate::remote_list`]); read again once it caught up.
    paused: HashSet<Token>,
    /// Job history (quick SQLite writes at job start/end, never per file).
    history: Option<JobStore>,
    /// What `--metrics-listen` shows.
    metrics: Arc<ServerMetrics>,
    /// Remotes (by address) found slow in relayed sends: the planner of later jobs puts
    /// them at the leaves of their trees.
    slow: HashSet<String>,
}

impl Server {
    /// Binds the control listener.
    pub fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let history = match &config.jobs_db {
            Some(path) => Some(JobStore::open(path).map_err(io::Error::other)?),
            None => None,
        };
        Ok(Server {
            poll,
            listener,
            conns: HashMap::new(),
            jobs: HashMap::new(),
            next_token: 1,
            next_job: 1,
            config,
            dirty: HashSet::new(),
            to_close: Vec::new(),
            paused: HashSet::new(),
            history,
            metrics: Default::default(),
            slow: HashSet::new(),
        })
    }

    /// The server's counters (for `--metrics-listen`).
    pub fn metrics(&self) -> Arc<ServerMetrics> {
        self.metrics.clone()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs the event loop forever.
    pub fn run(&mut self) -> io::Result<()> {
        self.run_until(&AtomicBool::new(false))
    }

    /// Runs the event loop until `stop` is set (checked at least every 200 ms).
    pub fn run_until(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !stop.load(Ordering::Relaxed) {
            let wait = if self.paused.is_empty() { 200 } else { 10 };
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(wait)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                let token = ev.token();
                if token == LISTENER {
                    self.accept_all();
                    continue;
                }
                if ev.is_writable() {
                    self.dirty.insert(token);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read_conn(token);
                }
            }
            self.resume_paused();
            self.check_timeouts();
            let ids: Vec<u64> = self.jobs.keys().copied().collect();
            for id in ids {
                self.settle(id);
            }
            self.flush_and_close();
        }
        Ok(())
    }

    /// Stops cleanly (SIGTERM), after [`Server::run_until`] returned: accepts no more
    /// connections, fails every running job's remaining pairs with `why` (recorded in the
    /// job history: each such remote with `why`, the job `failed`), tells each control
    /// client (`syncDone`, not ok), and gives their connections at most `limit` to take
    /// the last messages before every connection is closed. The agents see their
    /// connections close, as when any server goes away.
    pub fn shutdown(&mut self, why: &str, limit: Duration) {
        let _ = self.poll.registry().deregister(&mut self.listener);
        let ids: Vec<u64> = self.jobs.keys().copied().collect();
        if !ids.is_empty() {
            warn!(
                jobs = ids.len(),
                "stopping: failing the running jobs ({why})"
            );
        }
        for id in ids {
            if let Some(j) = self.jobs.get_mut(&id) {
                for i in 0..j.sync.pairs.len() {
                    j.sync.fail_pair(i, why.to_owned());
                }
            }
            self.settle(id);
        }
        self.flush_and_close();
        // The control clients' last messages: written while they take them.
        let deadline = Instant::now() + limit;
        let mut events = Events::with_capacity(64);
        while Instant::now() < deadline {
            let pending = self.conns.iter().any(|(_, c)| {
                matches!(c.peer, ConnPeer::Control { .. }) && c.out_pos < c.out.len()
            });
            if !pending {
                break;
            }
            let _ = self.poll.poll(&mut events, Some(Duration::from_millis(50)));
            let dirty: Vec<Token> = self.conns.keys().copied().collect();
            self.dirty.extend(dirty);
            self.flush_and_close();
        }
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            if let Some(mut c) = self.conns.remove(&t) {
                let _ = self.poll.registry().deregister(&mut c.stream);
            }
        }
        info!("server stopped");
    }

    fn new_token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        t
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, addr)) => {
                    let token = self.new_token();
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut stream, token, Interest::READABLE)
                    {
                        warn!(%addr, "cannot register connection: {e}");
                        continue;
                    }
                    debug!(%addr, ?token, "control connection");
                    let _ = stream.set_nodelay(true);
                    let n1 = auth::nonce();
                    let peer = ConnPeer::Control { job: None };
                    let mut conn = Conn::new(stream, Hs::AwaitAuth(n1), peer, 0);
                    if let Some(t) = &self.config.tls {
                        match rustls::ServerConnection::new(t.listen.clone()) {
                            Ok(s) => conn = conn.with_tls(rustls::Connection::Server(s)),
                            Err(e) => {
                                warn!(%addr, "TLS: {e}");
                                continue;
                            }
                        }
                    }
                    conn.queue(&Msg::Hello {
                        protocol: auth::PROTOCOL_VERSION,
                        nonce: n1.to_vec(),
                    });
                    self.conns.insert(token, conn);
                    self.dirty.insert(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn connect_agent(&mut self, addr: &str, job: u64, role: AgentRole) -> Result<Token, String> {
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot reach the agent {addr}: cannot resolve: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot reach the agent {addr}: cannot resolve"))?;
        let mut stream =
            TcpStream::connect(sa).map_err(|e| format!("cannot reach the agent {addr}: {e}"))?;
        let token = self.new_token();
        self.poll
            .registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| format!("cannot register {addr}: {e}"))?;
        let peer = ConnPeer::Agent { job, role };
        let mut conn = Conn::new(stream, Hs::AwaitHello, peer, 1);
        // Over a network the requests and answers (file lists above all: every remote's
        // comes to this one server) are worth compressing; over loopback they are not.
        conn.ask_compression = !self.config.plain_frames && !sa.ip().is_loopback();
        if let Some(t) = &self.config.tls {
            let name = tls::server_name(addr).map_err(|e| format!("agent {addr}: {e}"))?;
            let client = rustls::ClientConnection::new(t.dial.clone(), name)
                .map_err(|e| format!("agent {addr}: TLS: {e}"))?;
            conn = conn.with_tls(rustls::Connection::Client(client));
        }
        self.conns.insert(token, conn);
        self.metrics.agent_connected();
        Ok(token)
    }

    /// Reads until `WouldBlock` (mio is edge-triggered), handling the whole
    /// frames after every MiB read so that a fast peer cannot make us buffer
    /// more than that.
    fn read_conn(&mut self, token: Token) {
        const BUDGET: usize = 1 << 20;
        loop {
            if self.input_paused(token) {
                // Edge-triggered: what the socket holds is read on resuming.
                self.paused.insert(token);
                return;
            }
            let mut frames = Vec::new();
            let mut close: Option<String> = None;
            let mut drained = false;
            {
                let Some(conn) = self.conns.get_mut(&token) else {
                    return;
                };
                if conn.tls.is_some() {
                    // Reading may make TLS records to send (handshake, alerts).
                    self.dirty.insert(token);
                }
                let mut read = 0;
                while read < BUDGET {
                    match conn.read_some() {
                        Ok(0) => {
                            close = Some("connection closed by peer".into());
                            break;
                        }
                        Ok(n) => {
                            read += n;
                            conn.last_activity = Instant::now();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            drained = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            close = Some(format!("read error: {e}"));
                            break;
                        }
                    }
                }
                loop {
                    match conn.dec.next_frame() {
                        Ok(Some(body)) => frames.push(body),
                        Ok(None) => break,
                        Err(e) => {
                            close = Some(format!("bad frame: {e}"));
                            break;
                        }
                    }
                }
                if close.is_some() && conn.dec.buffered() > 0 && frames.is_empty() {
                    close = Some(format!(
                        "connection closed in the middle of a frame ({} bytes buffered)",
                        conn.dec.buffered()
                    ));
                }
            }
            for body in frames {
                if let Err(e) = self.on_frame(token, &body) {
                    close = Some(e);
                    break;
                }
                if !self.conns.contains_key(&token) {
                    return;
                }
            }
            if let Some(why) = close {
                self.close(token, why);
                return;
            }
            if drained {
                return;
            }
        }
    }

    /// Whether `token` is a remote agent's connection whose list waits for the master's.
    fn input_paused(&self, token: Token) -> bool {
        let Some(ConnPeer::Agent {
            job,
            role: AgentRole::Remote(i),
        }) = self.conns.get(&token).map(|c| &c.peer)
        else {
            return false;
        };
        self.jobs
            .get(job)
            .is_some_and(|j| !j.sync.remote_wants_input(*i))
    }

    /// Reads the paused connections that may go on.
    fn resume_paused(&mut self) {
        if self.paused.is_empty() {
            return;
        }
        let ready: Vec<Token> = self
            .paused
            .iter()
            .copied()
            .filter(|&t| !self.input_paused(t))
            .collect();
        for t in ready {
            self.paused.remove(&t);
            if let Some(c) = self.conns.get_mut(&t) {
                // Waiting for the master was no silence of the agent's.
                c.last_activity = Instant::now();
                self.read_conn(t);
            }
        }
    }

    fn queue(&mut self, token: Token, msg: &Msg) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.queue(msg);
            self.dirty.insert(token);
        }
    }

    fn flush_and_close(&mut self) {
        // Closing may queue messages (results to the control client); loop.
        loop {
            let dirty: Vec<Token> = self.dirty.drain().collect();
            for token in dirty {
                let mut err = None;
                if let Some(conn) = self.conns.get_mut(&token) {
                    if let Err(e) = conn.flush() {
                        err = Some(format!("write error: {e}"));
                    } else {
                        let pending = conn.pending_output();
                        if pending != conn.want_write {
                            conn.want_write = pending;
                            let interest = if pending {
                                Interest::READABLE | Interest::WRITABLE
                            } else {
                                Interest::READABLE
                            };
                            let _ =
                                self.poll
                                    .registry()
                                    .reregister(&mut conn.stream, token, interest);
                        }
                    }
                }
                if let Some(e) = err {
                    self.to_close.push((token, e));
                }
            }
            if self.to_close.is_empty() {
                break;
            }
            let closing: Vec<(Token, String)> = self.to_close.drain(..).collect();
            for (t, why) in closing {
                self.close(t, why);
            }
        }
    }

    fn check_timeouts(&mut self) {
        self.check_handshakes();
        let Some(limit) = self.config.idle_timeout else {
            return;
        };
        let now = Instant::now();
        let stale: Vec<Token> = self
            .conns
            .iter()
            .filter(|(t, c)| {
                matches!(c.peer, ConnPeer::Agent { .. })
                    && c.outstanding > 0
                    && !self.paused.contains(*t)
                    && now.duration_since(c.last_activity) > limit
            })
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            self.close(t, format!("no answer for {} s", limit.as_secs()));
        }
    }

    /// Closes the connections whose handshake takes too long (a peer that stalls it holds
    /// up nobody: the loop never waits for it), and answers a TLS listener's client that
    /// sends nothing (a plaintext client waiting for `hello`) that TLS is required.
    fn check_handshakes(&mut self) {
        let now = Instant::now();
        let mut late = Vec::new();
        for (t, c) in &mut self.conns {
            let age = now.duration_since(c.opened);
            if c.probing && age > tls::PLAINTEXT_PROBE {
                let msg = Msg::Error {
                    request_id: 0,
                    message: tls::TLS_REQUIRED_MESSAGE.into(),
                };
                if let Ok(bytes) = msg.to_frame() {
                    // Plaintext, past TLS: this client speaks none.
                    use std::io::Write;
                    let _ = c.stream.write(&bytes);
                }
                c.tls = None;
                c.out.clear();
                c.out_pos = 0;
                late.push((
                    *t,
                    "a plaintext client (it sent nothing, waiting for hello): told it that TLS \
                     is required"
                        .to_string(),
                ));
            } else if (!c.tls_ready() || !matches!(c.hs, Hs::Ready)) && age > HANDSHAKE_TIMEOUT {
                late.push((
                    *t,
                    format!(
                        "the peer did not finish the handshake in {} s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
        for (t, why) in late {
            self.close(t, why);
        }
    }

    /// Closes a connection and tells its job.
    fn close(&mut self, token: Token, why: String) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        if let Some(t) = &mut conn.tls {
            t.send_close_notify();
        }
        let _ = conn.flush();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        if matches!(conn.peer, ConnPeer::Agent { .. }) {
            self.metrics.agent_disconnected();
        }
        self.dirty.remove(&token);
        self.paused.remove(&token);
        // Failing before the handshake completed: the agent could not be reached.
        let in_handshake = matches!(conn.hs, Hs::AwaitHello | Hs::AwaitWelcome(_))
            && matches!(conn.peer, ConnPeer::Agent { .. });
        let why = if in_handshake {
            format!("cannot reach the agent: {why}")
        } else {
            why
        };
        // The job's gate waits for this connection no more (it opens after the pair failed).
        let mut open_gate = None;
        if let (true, ConnPeer::Agent { job, .. }) = (in_handshake, &conn.peer) {
            if let Some(g) = self.jobs.get_mut(job).and_then(|j| j.gate.as_mut()) {
                g.waiting = g.waiting.saturating_sub(1);
                if g.waiting == 0 {
                    open_gate = Some(*job);
                }
            }
        }
        match conn.peer {
            ConnPeer::Control { job } => {
                if why != "connection closed by peer" {
                    warn!(?token, "control connection closed: {why}");
                } else {
                    debug!(?token, "control connection closed");
                }
                if let Some(job) = job {
                    self.abort_job(job);
                }
            }
            ConnPeer::Agent { job, role } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    debug!(?token, ?role, "agent connection closed: {why}");
                    return;
                };
                let expected = match role {
                    AgentRole::MasterRelay => !j.sync.relays.any_in_flight(),
                    AgentRole::MasterList => j.sync.shared.master_listed,
                    AgentRole::MasterLink(i) | AgentRole::Remote(i) => j.sync.pairs[i].is_done(),
                };
                if expected {
                    debug!(?token, ?role, "agent connection closed: {why}");
                    if let Some(job) = open_gate {
                        self.open_gate(job);
                    }
                    return;
                }
                warn!(?token, ?role, "agent connection failed: {why}");
                match role {
                    AgentRole::MasterList => {
                        for i in 0..j.sync.pairs.len() {
                            j.sync.fail_pair(i, format!("master agent: {why}"));
                        }
                    }
                    AgentRole::MasterRelay => {
                        j.relay_link = None;
                        for i in 0..j.sync.pairs.len() {
                            if j.sync.relays.in_flight(i) {
                                j.sync.fail_pair(i, format!("master agent (relays): {why}"));
                            }
                        }
                    }
                    AgentRole::MasterLink(i) => j.sync.fail_pair(i, format!("master agent: {why}")),
                    AgentRole::Remote(i) => j.sync.fail_pair(i, why),
                }
                match open_gate {
                    Some(job) => self.open_gate(job),
                    None => self.settle(job),
                }
            }
        }
    }

    fn on_frame(&mut self, token: Token, body: &[u8]) -> Result<(), String> {
        let conn = self.conns.get_mut(&token).ok_or("gone")?;
        match conn.handshake(body, self.config.token.as_deref())? {
            Handshake::Over => {}
            Handshake::Going => {
                self.dirty.insert(token);
                return Ok(());
            }
            Handshake::Done {
                can_chown,
                tree,
                held,
            } => {
                for mut m in held {
                    self.fill_ticket(token, &mut m);
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.queue(&m);
                    }
                }
                let Some(conn) = self.conns.get_mut(&token) else {
                    return Ok(());
                };
                self.dirty.insert(token);
                if let ConnPeer::Agent { job, role } = conn.peer {
                    self.agent_ready(job, role, token, can_chown, tree);
                }
                return Ok(());
            }
        }
        match conn.peer {
            ConnPeer::Control { job } => {
                let msg = Msg::decode(body).map_err(|e| e.to_string())?;
                match (msg, job) {
                    (Msg::SyncRequest(req), None) => {
                        self.start_job(token, req);
                        Ok(())
                    }
                    (other, _) => Err(format!(
                        "unexpected {} from the control client",
                        other.kind_name()
                    )),
                }
            }
            ConnPeer::Agent { job, role } => {
                let result = self.feed_agent_frame(job, role, token, body);
                self.settle(job);
                result
            }
        }
    }

    // ------------------------------------------------------------------ jobs

    fn start_job(&mut self, control: Token, req: SyncRequest) {
        let check = SyncJob::check(&req);
        let labels = &self.config.job_labels;
        let record = self.history.as_mut().and_then(|h| {
            let label = |a: &str| labels.get(a).cloned().unwrap_or_else(|| a.to_owned());
            let remotes: Vec<String> = req.remotes.iter().map(|a| label(a)).collect();
            let remotes: Vec<&str> = remotes.iter().map(String::as_str).collect();
            let class = describe_classification(&req);
            h.start_job(&label(&req.master), &remotes, &class, &req.algorithm)
                .map_err(|e| warn!(master = %req.master, "job history: {e}"))
                .ok()
        });
        // With a history, a job is known by its id there (the one `fleetsync jobs` shows), in
        // the log too; without one (or if recording failed), by a counter of this process.
        let id = match record {
            Some(JobId(r)) if r > 0 && !self.jobs.contains_key(&(r as u64)) => r as u64,
            _ => {
                while self.jobs.contains_key(&self.next_job) {
                    self.next_job += 1;
                }
                self.next_job
            }
        };
        self.next_job = self.next_job.max(id + 1);
        info!(job = id, master = %req.master, remotes = ?req.remotes, "sync request");
        self.metrics.job_started();
        if let Some(ConnPeer::Control { job }) = self.conns.get_mut(&control).map(|c| &mut c.peer) {
            *job = Some(id);
        }
        let blocks = match check {
            Ok(blocks) => blocks,
            Err(e) => {
                self.record_finish(record, JobStatus::Failed, Some(&e));
                self.metrics.job_finished(false);
                self.queue(
                    control,
                    &Msg::SyncDone {
                        ok: false,
                        message: e,
                    },
                );
                return;
            }
        };
        let master_addr = req.master.clone();
        let remotes = req.remotes.clone();
        let mut sync = SyncJob::new(id, req, blocks);
        sync.relays.slow = self.slow.clone();
        sync.relays.labels = self.config.job_labels.clone();
        self.jobs.insert(
            id,
            Job {
                control,
                master_conn: None,
                relay_link: None,
                conns: remotes.iter().map(|_| PairConns::default()).collect(),
                next_req: 1,
                record,
                recorded: Instant::now(),
                counted: vec![RemoteCounts::default(); remotes.len()],
                gate: Some(Gate::default()),
                sync,
            },
        );
        match self.connect_agent(&master_addr, id, AgentRole::MasterList) {
            Ok(t) => self.job(id).master_conn = Some(t),
            Err(e) => {
                let sync = &mut self.job(id).sync;
                for i in 0..remotes.len() {
                    sync.fail_pair(i, format!("master agent: {e}"));
                }
                self.settle(id);
                return;
            }
        }
        for (i, addr) in remotes.iter().enumerate() {
            match self.connect_agent(addr, id, AgentRole::Remote(i)) {
                Ok(t) => self.job(id).conns[i].remote = Some(t),
                Err(e) => {
                    self.job(id).sync.fail_pair(i, e);
                    continue;
                }
            }
            match self.connect_agent(&master_addr, id, AgentRole::MasterLink(i)) {
                Ok(t) => self.job(id).conns[i].master = Some(t),
                Err(e) => self.job(id).sync.fail_pair(i, format!("master agent: {e}")),
            }
        }
        let j = self.job(id);
        let open = j.master_conn.iter().count()
            + j.conns
                .iter()
                .map(|c| c.remote.iter().count() + c.master.iter().count())
                .sum::<usize>();
        j.gate.as_mut().expect("new job").waiting = open;
        if open == 0 {
            self.open_gate(id);
        }
        self.settle(id);
    }

    /// An agent connection of job `id` is through its handshake: acted on at once, or when
    /// the job's last one is (see [`Gate`]).
    fn agent_ready(&mut self, id: u64, role: AgentRole, t: Token, chown: bool, tree: TreeIdentity) {
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        match &mut j.gate {
            None => self.on_agent_ready(id, role, t, chown),
            Some(g) => {
                g.ready.push((role, t, chown, tree));
                g.waiting = g.waiting.saturating_sub(1);
                if g.waiting == 0 {
                    self.open_gate(id);
                }
            }
        }
    }

    /// Every agent of job `id` has answered: refuses the pairs whose trees overlap (the same
    /// tree, or one inside another, on one machine: a sync would write into the master or
    /// into another remote), then lets the others go.
    fn open_gate(&mut self, id: u64) {
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(gate) = j.gate.take() else {
            return;
        };
        let n = j.sync.pairs.len();
        let mut master = None;
        let mut remotes = vec![None; n];
        for (role, _, _, tree) in &gate.ready {
            match *role {
                AgentRole::MasterList | AgentRole::MasterLink(_) | AgentRole::MasterRelay => {
                    master = Some(tree.clone())
                }
                AgentRole::Remote(i) => remotes[i] = Some(tree.clone()),
            }
        }
        let master_addr = j.sync.shared.req.master.clone();
        let addrs: Vec<String> = j.sync.pairs.iter().map(|p| p.addr().to_owned()).collect();
        let mut refusals: Vec<(usize, String)> = Vec::new();
        for i in 0..n {
            let Some(r) = &remotes[i] else { continue };
            if master.as_ref().is_some_and(|m| m.overlaps(r)) {
                refusals.push((
                    i,
                    format!(
                        "refusing to sync: the remote tree of agent {} and the master tree of \
                         agent {master_addr} overlap (the same directory, or one inside the \
                         other, on one machine)",
                        addrs[i]
                    ),
                ));
            }
            for k in 0..n {
                let Some(other) = &remotes[k] else { continue };
                if k != i && other.overlaps(r) {
                    refusals.push((
                        i,
                        format!(
                            "refusing to sync: the remote trees of agents {} and {} overlap \
                             (the same directory, or one inside the other, on one machine)",
                            addrs[i.min(k)],
                            addrs[i.max(k)]
                        ),
                    ));
                    break;
                }
            }
        }
        for (i, why) in refusals {
            warn!(job = id, remote = %addrs[i], "{why}");
            j.sync.fail_pair(i, why);
        }
        for (role, t, chown, _) in gate.ready {
            let j = &self.jobs[&id];
            let live = match role {
                AgentRole::MasterList | AgentRole::MasterRelay => {
                    j.sync.pairs.iter().any(|p| !p.is_done())
                }
                AgentRole::MasterLink(i) | AgentRole::Remote(i) => !j.sync.pairs[i].is_done(),
            };
            if live && self.conns.contains_key(&t) {
                self.on_agent_ready(id, role, t, chown);
            }
        }
        self.settle(id);
    }

    /// A job known to be in the table.
    fn job(&mut self, id: u64) -> &mut Job {
        self.jobs.get_mut(&id).expect("job in the table")
    }

    fn abort_job(&mut self, id: u64) {
        if let Some(job) = self.jobs.remove(&id) {
            info!(job = id, "control client gone: abandoning the sync");
            self.metrics.job_finished(false);
            self.record_finish(job.record, JobStatus::Failed, Some("control client gone"));
            let mut tokens: Vec<Token> =
                job.master_conn.into_iter().chain(job.relay_link).collect();
            for c in &job.conns {
                tokens.extend(c.remote);
                tokens.extend(c.master);
            }
            for t in tokens {
                if let Some(mut c) = self.conns.remove(&t) {
                    let _ = self.poll.registry().deregister(&mut c.stream);
                }
            }
        }
    }

    /// Sends a request on an agent connection (held until its handshake is done).
    fn send_request(&mut self, job: u64, token: Token, mut msg: Msg) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        set_request_id(&mut msg, j.next_req);
        j.next_req += 1;
        if let Some(c) = self.conns.get_mut(&token) {
            c.outstanding += 1;
            c.last_activity = Instant::now();
            if !matches!(c.hs, Hs::Ready) {
                c.held.push(msg);
                return;
            }
        }
        self.fill_ticket(token, &mut msg);
        self.queue(token, &msg);
    }

    /// With `--tls`, gives a send order (to a master link `token`) its tickets: the
    /// server's signed authority for the master agent to write those paths into that
    /// remote agent (`fleetsync_proto::ticket`), and for relayed orders one per edge of the
    /// tree, for each relay to write them into each of its children. The certificates come
    /// from the TLS connections; without one of them the order goes without a ticket and
    /// the remote refuses the stream (the pair fails saying so).
    fn fill_ticket(&self, token: Token, msg: &mut Msg) {
        let Some(t) = &self.config.tls else {
            return;
        };
        let Msg::SendOrder {
            paths,
            ticket,
            relays,
            request_id,
            ..
        } = msg
        else {
            return;
        };
        let Some(c) = self.conns.get(&token) else {
            return;
        };
        let ConnPeer::Agent { job, role } = c.peer else {
            return;
        };
        let Some(j) = self.jobs.get(&job) else {
            return;
        };
        let pair = match role {
            AgentRole::MasterLink(i) => Some(i),
            AgentRole::MasterRelay => j.sync.relays.pair_of(*request_id),
            _ => None,
        };
        let cert = |c: &Conn| c.tls.as_ref().and_then(|t| tls::peer_cert(t));
        let remote_cert = |pair: Option<usize>| {
            pair.and_then(|i| j.conns.get(i))
                .and_then(|p| p.remote)
                .and_then(|r| self.conns.get(&r))
                .and_then(cert)
        };
        type Cert = Option<rustls::pki_types::CertificateDer<'static>>;
        let sign = |sender: &Cert, remote: &Cert| -> Vec<u8> {
            let (Some(sender), Some(remote)) = (sender, remote) else {
                warn!(
                    job,
                    "send order without a ticket: an agent's certificate is unknown"
                );
                return Vec::new();
            };
            let order = ticket::Ticket::new(sender, remote, paths.clone());
            ticket::sign(&order, &*t.signer).unwrap_or_else(|e| {
                warn!(job, "send order without a ticket: {e}");
                Vec::new()
            })
        };
        let target = remote_cert(pair);
        *ticket = sign(&cert(c), &target);
        fn edges(
            nodes: &mut [fleetsync_proto::RelayNode],
            parent: &Cert,
            cert_of: &dyn Fn(u64) -> Cert,
            sign: &dyn Fn(&Cert, &Cert) -> Vec<u8>,
        ) {
            for n in nodes {
                let me = cert_of(n.request_id);
                n.ticket = sign(parent, &me);
                edges(&mut n.children, &me, cert_of, sign);
            }
        }
        let cert_of = |id: u64| remote_cert(j.sync.relays.pair_of(id));
        edges(relays, &target, &cert_of, &sign);
    }

    /// Sends relay trees' orders (numbered already) on the job's relay link, connected
    /// on first use.
    fn send_relayed(&mut self, job: u64, orders: Vec<Msg>) {
        if orders.is_empty() {
            return;
        }
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let token = match j.relay_link {
            Some(t) => Ok(t),
            None => {
                let master = j.sync.shared.req.master.clone();
                self.connect_agent(&master, job, AgentRole::MasterRelay)
            }
        };
        let j = self.jobs.get_mut(&job).expect("job in the table");
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                for i in 0..j.sync.pairs.len() {
                    if j.sync.relays.in_flight(i) {
                        j.sync.fail_pair(i, format!("master agent (relays): {e}"));
                    }
                }
                return;
            }
        };
        j.relay_link = Some(token);
        for mut msg in orders {
            // One `done` comes for every remote of the tree.
            let remotes = match &msg {
                Msg::SendOrder { relays, .. } => 1 + count_nodes(relays),
                _ => 1,
            };
            if let Some(c) = self.conns.get_mut(&token) {
                c.outstanding += remotes;
                c.last_activity = Instant::now();
                if !matches!(c.hs, Hs::Ready) {
                    // The handshake counts what is held as outstanding once done.
                    c.outstanding -= 1;
                    c.held.push(msg);
                    continue;
                }
            }
            self.fill_ticket(token, &mut msg);
            self.queue(token, &msg);
        }
    }

    fn on_agent_ready(&mut self, job: u64, role: AgentRole, token: Token, can_chown: bool) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        debug!(job, ?role, "agent authenticated");
        match role {
            AgentRole::MasterList => {
                let msg = j.sync.master_list_request();
                self.send_request(job, token, msg);
            }
            AgentRole::Remote(i) => {
                j.sync.pairs[i].on_remote_ready(can_chown, &j.sync.shared);
                self.settle(job);
            }
            AgentRole::MasterLink(_) | AgentRole::MasterRelay => {}
        }
    }

    /// Hands an agent's frame to its job (the caller settles the job).
    fn feed_agent_frame(
        &mut self,
        job: u64,
        role: AgentRole,
        token: Token,
        body: &[u8],
    ) -> Result<(), String> {
        let Some(j) = self.jobs.get_mut(&job) else {
            return Err("job gone".into());
        };
        let sync = &mut j.sync;
        let mut reader = frame::parse(body).map_err(|e| e.to_string())?;
        let inflated;
        if self.conns.get(&token).is_some_and(|c| c.inflate) {
            if let Some(inner) = frame::inflate(&reader).map_err(|e| e.to_string())? {
                inflated = inner;
                reader = frame::parse(&inflated).map_err(|e| e.to_string())?;
            }
        }
        // File lists are the big messages: read them without copying.
        if let Some((_, last, entries)) =
            fleetsync_proto::list_batch_entries(&reader).map_err(|e| e.to_string())?
        {
            for e in entries {
                let e = e.map_err(|e| e.to_string())?;
                match role {
                    AgentRole::MasterList => sync.push_master_entry(&e)?,
                    AgentRole::Remote(i) => sync.push_remote_entry(i, &e)?,
                    AgentRole::MasterLink(_) | AgentRole::MasterRelay => {
                        return Err("unexpected listBatch".into())
                    }
                }
            }
            if last {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.outstanding = c.outstanding.saturating_sub(1);
                }
                match role {
                    AgentRole::MasterList => {
                        sync.on_master_listed()?;
                        j.master_conn = None;
                        self.to_close.push((token, "master list complete".into()));
                    }
                    AgentRole::Remote(i) => sync.on_remote_listed(i)?,
                    AgentRole::MasterLink(_) | AgentRole::MasterRelay => {}
                }
            }
            return Ok(());
        }
        let root = reader
            .get_root::<fleetsync_proto::fleetsync_capnp::message::Reader>()
            .map_err(|e| e.to_string())?;
        let msg = Msg::from_reader(root).map_err(|e| e.to_string())?;
        if let Some(c) = self.conns.get_mut(&token) {
            c.last_activity = Instant::now();
            let finished = match &msg {
                Msg::ChecksumReply { last, .. } | Msg::ConsistencyReply { last, .. } => *last,
                Msg::Done(_) => true,
                _ => false,
            };
            if finished {
                c.outstanding = c.outstanding.saturating_sub(1);
            }
        }
        let (i, from) = match role {
            AgentRole::MasterRelay => {
                sync.on_relay_reply(msg);
                return Ok(());
            }
            AgentRole::MasterLink(i) => (i, Peer::Master),
            AgentRole::Remote(i) => (i, Peer::Remote),
            AgentRole::MasterList => {
                return match msg {
                    Msg::ChecksumReply { .. } | Msg::Progress(_) | Msg::Done(_) => Ok(()),
                    Msg::ItemResults { .. } => Err("unexpected itemResults".into()),
                    Msg::Error { message, .. } => Err(format!("agent error: {message}")),
                    other => Err(format!("unexpected {} from an agent", other.kind_name())),
                };
            }
        };
        sync.on_reply(i, from, msg)
    }

    /// Writes out what the job's pairs queued, itemizes their plans as far as the control
    /// client keeps up, records the pairs that are through and ends the job when all are.
    fn settle(&mut self, id: u64) {
        loop {
            let Some(j) = self.jobs.get_mut(&id) else {
                return;
            };
            let mut sends = Vec::new();
            for (i, pair) in j.sync.pairs.iter_mut().enumerate() {
                sends.extend(pair.drain_outbox().into_iter().map(|(to, m)| (i, to, m)));
            }
            // --fanout: send orders wait for their cohort, then go as relay trees.
            let mut sends = j.sync.route(sends);
            sends.extend(
                j.sync
                    .relays
                    .outbox
                    .drain(..)
                    .map(|(i, m)| (i, Peer::Master, m)),
            );
            let next_req = &mut j.next_req;
            let release = j.sync.release(&mut || {
                let id = *next_req;
                *next_req += 1;
                id
            });
            if let Some(r) = release {
                sends.extend(r.direct.into_iter().map(|(i, m)| (i, Peer::Master, m)));
                self.send_relayed(id, r.relayed);
            }
            let Some(j) = self.jobs.get_mut(&id) else {
                return;
            };
            let control = j.control;
            let mut lost = Vec::new();
            for (i, to, msg) in sends {
                let token = match to {
                    Peer::Control => {
                        self.queue(control, &msg);
                        continue;
                    }
                    Peer::Master => self.jobs[&id].conns[i].master,
                    Peer::Remote => self.jobs[&id].conns[i].remote,
                };
                match token {
                    Some(t) => self.send_request(id, t, msg),
                    None => lost.push(i),
                }
            }
            let j = self.jobs.get_mut(&id).expect("settled job");
            for i in lost {
                j.sync.fail_pair(i, "connection lost".into());
            }
            // Itemize the plans while the control client keeps up.
            let mut control_conn = self.conns.get_mut(&control);
            let mut queued = false;
            for pair in &mut j.sync.pairs {
                match control_conn.as_deref_mut() {
                    Some(c) => {
                        while pair.has_plan_items() && c.backlog() < EMIT_HIGH {
                            if let Some(msg) = pair.next_plan_items(&j.sync.shared) {
                                c.queue(&msg);
                                queued = true;
                            }
                        }
                    }
                    None => pair.drop_plan_items(),
                }
                pair.finish_if_deferred(&j.sync.shared);
            }
            if queued {
                self.dirty.insert(control);
            }
            let j = &self.jobs[&id];
            if !j.sync.pairs.iter().any(|p| p.has_outbox()) {
                break;
            }
        }
        self.record_finished_pairs(id);
    }

    /// Records the pairs that just finished, closes their connections, and ends the job
    /// when every pair is through.
    fn record_finished_pairs(&mut self, id: u64) {
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        if j.recorded.elapsed() >= PROGRESS_RECORD_EVERY {
            j.recorded = Instant::now();
            for (pair, counted) in j.sync.pairs.iter().zip(&mut j.counted) {
                if pair.is_done() {
                    continue;
                }
                let counts = RemoteCounts::of(pair.result());
                let name = label_of(&self.config.job_labels, pair.addr());
                self.metrics.progress(name, counted, &counts);
                *counted = counts;
                if let (Some(h), Some(record)) = (self.history.as_mut(), j.record) {
                    if let Err(e) = h.record_remote(record, name, &counts, None) {
                        warn!(job = id, "job history: {e}");
                    }
                }
            }
        }
        for ((pair, conns), counted) in j.sync.pairs.iter().zip(&mut j.conns).zip(&mut j.counted) {
            if !pair.is_done() || conns.closed {
                continue;
            }
            conns.closed = true;
            let result = pair.result();
            let name = label_of(&self.config.job_labels, pair.addr());
            let counts = RemoteCounts::of(result);
            self.metrics.progress(name, counted, &counts);
            *counted = counts;
            if !result.ok {
                self.metrics.remote_failed(name);
            }
            if let (Some(h), Some(record)) = (self.history.as_mut(), j.record) {
                let counts = RemoteCounts::of(result);
                let error = if !result.error.is_empty() {
                    Some(result.error.clone())
                } else if !result.ok {
                    Some(format!("{} item(s) failed", pair.failed_count()))
                } else {
                    None
                };
                let name = label_of(&self.config.job_labels, pair.addr());
                if let Err(e) = h.record_remote(record, name, &counts, error.as_deref()) {
                    warn!(job = id, "job history: {e}");
                }
                if !result.source.is_empty() {
                    if let Err(e) = h.record_source(record, name, &result.source) {
                        warn!(job = id, "job history: {e}");
                    }
                }
            }
            for t in conns.remote.take().into_iter().chain(conns.master.take()) {
                self.to_close.push((t, "remote finished".into()));
            }
        }
        if !j.sync.all_done() {
            return;
        }
        let j = self.jobs.remove(&id).expect("checked above");
        let pairs = &j.sync.pairs;
        let ok = pairs.iter().all(|p| p.result().ok);
        let failed = pairs.iter().filter(|p| !p.result().ok).count();
        let message = if ok {
            format!("{} remote(s) in sync", pairs.len())
        } else {
            format!("{failed} of {} remote(s) failed", pairs.len())
        };
        let status = if ok {
            JobStatus::Succeeded
        } else {
            JobStatus::Failed
        };
        self.record_finish(j.record, status, (!ok).then_some(message.as_str()));
        self.metrics.job_finished(ok);
        self.queue(j.control, &Msg::SyncDone { ok, message });
        if let Some(t) = j.master_conn {
            self.to_close.push((t, "job finished".into()));
        }
        if let Some(t) = j.relay_link {
            self.to_close.push((t, "job finished".into()));
        }
        self.slow = j.sync.relays.slow;
        if let Some(ConnPeer::Control { job }) = self.conns.get_mut(&j.control).map(|c| &mut c.peer)
        {
            *job = None;
        }
    }

    /// Records the end of a job in the history (errors are logged only).
    fn record_finish(&mut self, record: Option<JobId>, status: JobStatus, error: Option<&str>) {
        if let (Some(h), Some(record)) = (self.history.as_mut(), record) {
            if let Err(e) = h.finish_job(record, status, error) {
                warn!(job = %record, "job history: {e}");
            }
        }
    }
}

/// The name an agent address is recorded under in the history (`--job-label`).
fn label_of<'a>(labels: &'a HashMap<String, String>, addr: &'a str) -> &'a str {
    labels.get(addr).map_or(addr, String::as_str)
}

/// The remotes of a relay tree.
fn count_nodes(nodes: &[fleetsync_proto::RelayNode]) -> usize {
    nodes.iter().map(|n| 1 + count_nodes(&n.children)).sum()
}

/// The classification of a request as the user would write it (for the job history).
fn describe_classification(req: &SyncRequest) -> String {
    let c = fleetsync_select::Classification::from(&req.classification);
    let mut parts: Vec<String> = c.rules.iter().map(ToString::to_string).collect();
    if let Some(e) = &c.select {
        parts.push(format!("--select {e}"));
    }
    parts.join(" ")
}
