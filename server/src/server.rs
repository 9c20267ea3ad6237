//! The comparison server: one `mio` event loop, no hidden threads.
//!
//! [`Server`] owns every connection in a `HashMap<Token, Conn>`. A connection
//! reads until `WouldBlock`, decodes whole frames with a [`FrameDecoder`] and
//! queues its replies; writes are flushed at the end of each loop turn and
//! writable interest is registered only while output is pending. A peer that
//! sends a malformed, truncated or oversize frame is closed and logged; the
//! loop never panics on peer input.
//!
//! Control clients connect to the server's listener and send one
//! `syncRequest`. For each request the server connects to the master agent
//! (once for the file list, and once more per remote so that the transfers
//! to different remotes run concurrently) and to every remote agent, and
//! drives one state machine per remote:
//!
//! `connect → list → checksums → before (deletes, mkdirs) → sends → after
//! (links, attributes) → consistency rounds (see `consistency.rs`) → done | failed`.
//!
//! A remote that fails (connection refused, reset, protocol error) is
//! reported in its `remoteResult`; the others go on.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetsync_proto::frame::{self, FrameDecoder, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use fleetsync_proto::{
    auth, Action, Attrs, ChecksumResult, FileKind, Op, OpKind, Outcome, PlanItem, RemoteResult,
    Role, SyncProgress, SyncRequest,
};
use fleetsync_proto::{EntryRef, Failure, Msg};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, info, warn};

use crate::jobs::{JobId, JobStatus, JobStore, RemoteCounts};
use crate::list::{FileList, Kind, Meta};
use crate::plan::{describe, PairPlan, Plan, PlanOptions, Step, StepKind};

mod blocksync;
mod consistency;

const LISTENER: Token = Token(0);
/// Paths per checksum request / send order / apply request (frames ≤ 16 MiB).
const CHUNK: usize = 20_000;
/// Plan items per `planItems` frame.
const ITEMS_PER_FRAME: usize = 2_000;
/// Itemized plan output waiting for the control client beyond which the
/// server stops producing more.
const EMIT_HIGH: usize = 4 << 20;
/// Per-item failures kept per remote (the rest are only counted).
const MAX_FAILURES: usize = 1_000;
/// Requests in flight per connection and purpose: the rest is built only
/// when an answer comes, so memory does not grow with the tree.
const WINDOW: usize = 2;

/// Configuration of a [`Server`].
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// Shared token; `None` runs without authentication (tests, loopback).
    pub token: Option<Vec<u8>>,
    /// Fail an agent connection that has a request outstanding and stays
    /// silent this long (`None`: wait forever).
    pub idle_timeout: Option<Duration>,
    /// Job history database (see [`crate::jobs`]); `None` records nothing.
    pub jobs_db: Option<std::path::PathBuf>,
    /// Names to record in the job history instead of agent addresses (the embedded
    /// `fleetsync sync` maps its in-process agents to their directories).
    pub job_labels: HashMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentRole {
    /// The master agent's connection used for its file list.
    MasterList,
    /// A connection to the master agent dedicated to one remote (checksums, sends).
    MasterLink(usize),
    /// A remote agent.
    Remote(usize),
}

#[derive(Debug)]
enum Peer {
    Control { job: Option<u64> },
    Agent { job: u64, role: AgentRole },
}

#[derive(Debug)]
enum Hs {
    /// We listen: sent hello with this nonce, waiting for auth.
    AwaitAuth([u8; 32]),
    /// We connect: waiting for hello.
    AwaitHello,
    /// We connect: sent auth with this nonce, waiting for welcome.
    AwaitWelcome([u8; 32]),
    Ready,
}

struct Conn {
    stream: TcpStream,
    dec: FrameDecoder,
    out: Vec<u8>,
    out_pos: usize,
    hs: Hs,
    peer: Peer,
    want_write: bool,
    /// Requests sent and not yet finished (agent connections).
    outstanding: usize,
    last_activity: Instant,
    /// Requests queued before the handshake finished.
    held: Vec<Msg>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RState {
    Connecting,
    Listing,
    Listed,
    Checksums,
    Before,
    Sending,
    /// The dependency blocks, one at a time ([`blocksync`]).
    Blocks,
    After,
    /// Consistency loop (see [`consistency`]): waiting for the remote's check.
    Checking,
    /// Consistency loop: synchronizing the inconsistent files again.
    Resyncing,
    Done,
}

struct Remote {
    addr: String,
    conn: Option<Token>,
    link: Option<Token>,
    can_chown: bool,
    list: FileList,
    state: RState,
    pair: Option<PairPlan>,
    /// Checksum of each candidate on the remote: state per candidate, digests.
    rstate: Vec<u8>,
    rdig: Vec<u8>,
    /// Checksum requests: next candidate and requests in flight, remote side
    /// and master side (on this remote's master link).
    rcur: usize,
    r_out: usize,
    mcur: usize,
    m_out: usize,
    /// Next step of the current phase to send.
    pcur: usize,
    plan: Option<Plan>,
    pending: usize,
    result: RemoteResult,
    failed_count: u64,
    done_bytes: u64,
    done_files: u64,
    total_bytes: u64,
    /// Bytes of the send orders finished before the current one (progress
    /// within the current order is added to it).
    progress_base: u64,
    /// Next plan step to itemize to the control client.
    emit_cur: usize,
    /// The remote is finished but its plan is still being itemized.
    finish_deferred: bool,
    /// The consistency loop after the transfers.
    rounds: consistency::Rounds,
    /// `--blocks`: the plan split into unblocked phases and blocks.
    blocks: Option<blocksync::BlockRun>,
}

const SUM_NONE: u8 = 0;
const SUM_PENDING: u8 = 1;
const SUM_DONE: u8 = 2;
const SUM_FAILED: u8 = 3;

struct Job {
    control: Token,
    req: SyncRequest,
    master_conn: Option<Token>,
    master: Arc<FileList>,
    master_building: FileList,
    master_done: bool,
    /// Master checksums: state and digest per master index.
    mstate: Vec<u8>,
    mdig: Vec<u8>,
    /// Digest width of the job's algorithm.
    width: usize,
    remotes: Vec<Remote>,
    next_req: u64,
    finished: bool,
    /// This job in the history database.
    record: Option<JobId>,
    /// `--blocks`: the checked blocks of the request.
    blocks: Option<Arc<blocksync::BlockSet>>,
}

/// Stores a digest in its fixed-width slot (the algorithm's digest width:
/// 4 bytes per file for crc32). Returns false if the digest has another width.
fn store_digest(arena: &mut Vec<u8>, width: usize, slot: usize, digest: &[u8]) -> bool {
    if digest.len() != width {
        return false;
    }
    let need = (slot + 1) * width;
    if arena.len() < need {
        arena.resize(need, 0);
    }
    arena[slot * width..need].copy_from_slice(digest);
    true
}

fn load_digest(arena: &[u8], width: usize, slot: usize) -> &[u8] {
    arena.get(slot * width..(slot + 1) * width).unwrap_or(b"")
}

fn kind_of(k: FileKind) -> Kind {
    match k {
        FileKind::File => Kind::File,
        FileKind::Dir => Kind::Dir,
        FileKind::Symlink => Kind::Symlink,
        _ => Kind::Special,
    }
}

fn push_entry(list: &mut FileList, e: &EntryRef<'_>) -> Result<(), String> {
    let meta = Meta {
        kind: Some(kind_of(e.kind)),
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
        dev: e.dev,
        inode: e.inode,
        nlink: e.nlink,
    };
    list.push(e.path, &meta, e.link_target.unwrap_or(b""))
        .map_err(|err| err.to_string())
}

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
    /// Job history (quick SQLite writes at job start/end, never per file).
    history: Option<JobStore>,
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
            history,
        })
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
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(200)))
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
            self.check_timeouts();
            self.pump_all_emits();
            self.flush_and_close();
        }
        Ok(())
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
                    let mut conn = Conn {
                        stream,
                        dec: FrameDecoder::with_max(MAX_HANDSHAKE_FRAME),
                        out: Vec::new(),
                        out_pos: 0,
                        hs: Hs::AwaitAuth(n1),
                        peer: Peer::Control { job: None },
                        want_write: false,
                        outstanding: 0,
                        last_activity: Instant::now(),
                        held: Vec::new(),
                    };
                    let hello = Msg::Hello {
                        protocol: auth::PROTOCOL_VERSION,
                        nonce: n1.to_vec(),
                    };
                    queue_on(&mut conn, &hello);
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
        self.conns.insert(
            token,
            Conn {
                stream,
                dec: FrameDecoder::with_max(MAX_HANDSHAKE_FRAME),
                out: Vec::new(),
                out_pos: 0,
                hs: Hs::AwaitHello,
                peer: Peer::Agent { job, role },
                want_write: true,
                outstanding: 1,
                last_activity: Instant::now(),
                held: Vec::new(),
            },
        );
        Ok(token)
    }

    /// Reads until `WouldBlock` (mio is edge-triggered), handling the whole
    /// frames after every MiB read so that a fast peer cannot make us buffer
    /// more than that.
    fn read_conn(&mut self, token: Token) {
        const BUDGET: usize = 1 << 20;
        loop {
            let mut frames = Vec::new();
            let mut close: Option<String> = None;
            let mut drained = false;
            {
                let Some(conn) = self.conns.get_mut(&token) else {
                    return;
                };
                let mut read = 0;
                while read < BUDGET {
                    match conn.dec.read_from(&mut conn.stream) {
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

    fn queue(&mut self, token: Token, msg: &Msg) {
        if let Some(conn) = self.conns.get_mut(&token) {
            queue_on(conn, msg);
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
                    if let Err(e) = flush(conn) {
                        err = Some(format!("write error: {e}"));
                    } else {
                        let pending = conn.out_pos < conn.out.len();
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
        let Some(limit) = self.config.idle_timeout else {
            return;
        };
        let now = Instant::now();
        let stale: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.peer, Peer::Agent { .. })
                    && c.outstanding > 0
                    && now.duration_since(c.last_activity) > limit
            })
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            self.close(t, format!("no answer for {} s", limit.as_secs()));
        }
    }

    /// Closes a connection and tells its job.
    fn close(&mut self, token: Token, why: String) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = flush(&mut conn);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.dirty.remove(&token);
        // Failing before the handshake completed: the agent could not be reached.
        let why = if matches!(conn.hs, Hs::AwaitHello | Hs::AwaitWelcome(_))
            && matches!(conn.peer, Peer::Agent { .. })
        {
            format!("cannot reach the agent: {why}")
        } else {
            why
        };
        match conn.peer {
            Peer::Control { job } => {
                if why != "connection closed by peer" {
                    warn!(?token, "control connection closed: {why}");
                } else {
                    debug!(?token, "control connection closed");
                }
                if let Some(job) = job {
                    self.abort_job(job);
                }
            }
            Peer::Agent { job, role } => {
                let expected = self.jobs.get(&job).is_none_or(|j| match role {
                    AgentRole::MasterList => j.master_done,
                    AgentRole::MasterLink(i) | AgentRole::Remote(i) => {
                        j.remotes[i].state == RState::Done
                    }
                });
                if expected {
                    debug!(?token, ?role, "agent connection closed: {why}");
                    return;
                }
                warn!(?token, ?role, "agent connection failed: {why}");
                match role {
                    AgentRole::MasterList => {
                        let n = self.jobs.get(&job).map_or(0, |j| j.remotes.len());
                        for i in 0..n {
                            self.fail_remote(job, i, format!("master agent: {why}"));
                        }
                    }
                    AgentRole::MasterLink(i) => {
                        self.fail_remote(job, i, format!("master agent: {why}"))
                    }
                    AgentRole::Remote(i) => self.fail_remote(job, i, why),
                }
            }
        }
    }

    fn on_frame(&mut self, token: Token, body: &[u8]) -> Result<(), String> {
        let conn = self.conns.get_mut(&token).ok_or("gone")?;
        match std::mem::replace(&mut conn.hs, Hs::Ready) {
            Hs::Ready => {}
            Hs::AwaitAuth(n1) => {
                let msg = Msg::decode(body).map_err(|e| e.to_string())?;
                let Msg::Auth {
                    role, mac, nonce, ..
                } = msg
                else {
                    return Err(format!("expected auth, got {}", msg.kind_name()));
                };
                if role != Role::Control {
                    return Err(format!(
                        "{} tried to connect as a control client",
                        role.name()
                    ));
                }
                let answer = match &self.config.token {
                    Some(t) => {
                        if !auth::verify(t, &n1, role, &mac) || nonce.len() != auth::NONCE_LEN {
                            return Err("authentication failed".into());
                        }
                        auth::mac(t, &nonce, Role::Listener)
                    }
                    None => Vec::new(),
                };
                conn.dec.set_max(MAX_FRAME);
                self.queue(
                    token,
                    &Msg::Welcome {
                        mac: answer,
                        can_chown: false,
                    },
                );
                return Ok(());
            }
            Hs::AwaitHello => {
                let msg = Msg::decode(body).map_err(|e| e.to_string())?;
                let Msg::Hello { nonce: n1, .. } = msg else {
                    return Err(format!("expected hello, got {}", msg.kind_name()));
                };
                let n2 = auth::nonce();
                conn.hs = Hs::AwaitWelcome(n2);
                let m = auth::auth_message(self.config.token.as_deref(), &n1, Role::Server, &n2);
                self.queue(token, &m);
                return Ok(());
            }
            Hs::AwaitWelcome(n2) => {
                let msg = Msg::decode(body).map_err(|e| e.to_string())?;
                let (mac, can_chown) = match msg {
                    Msg::Welcome { mac, can_chown } => (mac, can_chown),
                    Msg::Error { message, .. } => return Err(format!("agent: {message}")),
                    other => return Err(format!("expected welcome, got {}", other.kind_name())),
                };
                auth::check_welcome(self.config.token.as_deref(), &n2, &mac)
                    .map_err(|e| e.to_string())?;
                conn.dec.set_max(MAX_FRAME);
                conn.outstanding = conn.held.len();
                for m in std::mem::take(&mut conn.held) {
                    queue_on(conn, &m);
                }
                self.dirty.insert(token);
                if let Peer::Agent { job, role } = conn.peer {
                    self.on_agent_ready(job, role, token, can_chown);
                }
                return Ok(());
            }
        }
        match conn.peer {
            Peer::Control { job } => {
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
            Peer::Agent { job, role } => self.on_agent_frame(job, role, token, body),
        }
    }

    // ------------------------------------------------------------------ jobs

    fn start_job(&mut self, control: Token, req: SyncRequest) {
        let id = self.next_job;
        self.next_job += 1;
        info!(job = id, master = %req.master, remotes = ?req.remotes, "sync request");
        if let Some(Peer::Control { job }) = self.conns.get_mut(&control).map(|c| &mut c.peer) {
            *job = Some(id);
        }
        let mut width = 0;
        let check = fleetsync_engine::Registry::with_builtins()
            .get(&req.algorithm)
            .map(|alg| width = alg.finish().as_bytes().len())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                fleetsync_select::Classification::from(&req.classification)
                    .compile()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .and_then(|()| {
                if req.remotes.is_empty() {
                    Err("no remotes given".to_owned())
                } else {
                    Ok(())
                }
            });
        let mut blocks = None;
        let check = check.and_then(|()| {
            blocks = blocksync::BlockSet::from_request(&req.blocks)?;
            Ok(())
        });
        let labels = &self.config.job_labels;
        let record = self.history.as_mut().and_then(|h| {
            let label = |a: &str| labels.get(a).cloned().unwrap_or_else(|| a.to_owned());
            let remotes: Vec<String> = req.remotes.iter().map(|a| label(a)).collect();
            let remotes: Vec<&str> = remotes.iter().map(String::as_str).collect();
            let class = describe_classification(&req);
            h.start_job(&label(&req.master), &remotes, &class, &req.algorithm)
                .map_err(|e| warn!(job = id, "job history: {e}"))
                .ok()
        });
        if let Err(e) = check {
            self.record_finish(record, JobStatus::Failed, Some(&e));
            self.queue(
                control,
                &Msg::SyncDone {
                    ok: false,
                    message: e,
                },
            );
            return;
        }
        let remotes = req
            .remotes
            .iter()
            .enumerate()
            .map(|(i, a)| Remote {
                addr: a.clone(),
                conn: None,
                link: None,
                can_chown: false,
                list: FileList::new(),
                state: RState::Connecting,
                pair: None,
                rstate: Vec::new(),
                rdig: Vec::new(),
                rcur: 0,
                r_out: 0,
                mcur: 0,
                m_out: 0,
                pcur: 0,
                plan: None,
                pending: 0,
                result: RemoteResult {
                    remote: i as u32,
                    ..RemoteResult::default()
                },
                failed_count: 0,
                done_bytes: 0,
                done_files: 0,
                total_bytes: 0,
                progress_base: 0,
                emit_cur: 0,
                finish_deferred: false,
                rounds: consistency::Rounds::default(),
                blocks: None,
            })
            .collect();
        let master_addr = req.master.clone();
        self.jobs.insert(
            id,
            Job {
                control,
                req,
                master_conn: None,
                master: Arc::new(FileList::new()),
                master_building: FileList::new(),
                master_done: false,
                mstate: Vec::new(),
                mdig: Vec::new(),
                width,
                remotes,
                next_req: 1,
                finished: false,
                record,
                blocks,
            },
        );
        match self.connect_agent(&master_addr, id, AgentRole::MasterList) {
            Ok(t) => self.jobs.get_mut(&id).unwrap().master_conn = Some(t),
            Err(e) => {
                let n = self.jobs[&id].remotes.len();
                for i in 0..n {
                    self.fail_remote(id, i, format!("master agent: {e}"));
                }
                return;
            }
        }
        let n = self.jobs[&id].remotes.len();
        for i in 0..n {
            let addr = self.jobs[&id].remotes[i].addr.clone();
            match self.connect_agent(&addr, id, AgentRole::Remote(i)) {
                Ok(t) => self.jobs.get_mut(&id).unwrap().remotes[i].conn = Some(t),
                Err(e) => {
                    self.fail_remote(id, i, e);
                    continue;
                }
            }
            match self.connect_agent(&master_addr, id, AgentRole::MasterLink(i)) {
                Ok(t) => self.jobs.get_mut(&id).unwrap().remotes[i].link = Some(t),
                Err(e) => self.fail_remote(id, i, format!("master agent: {e}")),
            }
        }
    }

    fn abort_job(&mut self, id: u64) {
        if let Some(job) = self.jobs.remove(&id) {
            info!(job = id, "control client gone: abandoning the sync");
            self.record_finish(job.record, JobStatus::Failed, Some("control client gone"));
            let mut tokens: Vec<Token> = job.master_conn.into_iter().collect();
            for r in &job.remotes {
                tokens.extend(r.conn);
                tokens.extend(r.link);
            }
            for t in tokens {
                if let Some(mut c) = self.conns.remove(&t) {
                    let _ = self.poll.registry().deregister(&mut c.stream);
                }
            }
        }
    }

    fn next_req(&mut self, job: u64) -> u64 {
        let Some(j) = self.jobs.get_mut(&job) else {
            return u64::MAX;
        };
        let id = j.next_req;
        j.next_req += 1;
        id
    }

    fn send_request(&mut self, token: Token, msg: &Msg) {
        if let Some(c) = self.conns.get_mut(&token) {
            c.outstanding += 1;
            c.last_activity = Instant::now();
            if !matches!(c.hs, Hs::Ready) {
                c.held.push(msg.clone());
                return;
            }
        }
        self.queue(token, msg);
    }

    fn on_agent_ready(&mut self, job: u64, role: AgentRole, token: Token, can_chown: bool) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        debug!(job, ?role, "agent authenticated");
        let classification = j.req.classification.clone();
        match role {
            AgentRole::MasterList => {
                let rid = self.next_req(job);
                self.send_request(
                    token,
                    &Msg::ListRequest {
                        request_id: rid,
                        classification,
                        batch_size: 0,
                    },
                );
            }
            AgentRole::Remote(i) => {
                j.remotes[i].can_chown = can_chown;
                j.remotes[i].state = RState::Listing;
                let rid = self.next_req(job);
                self.send_request(
                    token,
                    &Msg::ListRequest {
                        request_id: rid,
                        classification,
                        batch_size: 0,
                    },
                );
            }
            AgentRole::MasterLink(_) => {}
        }
    }

    fn on_agent_frame(
        &mut self,
        job: u64,
        role: AgentRole,
        token: Token,
        body: &[u8],
    ) -> Result<(), String> {
        if !self.jobs.contains_key(&job) {
            return Err("job gone".into());
        }
        let reader = frame::parse(body).map_err(|e| e.to_string())?;
        // File lists are the big messages: read them without copying.
        if let Some((_, last, entries)) =
            fleetsync_proto::list_batch_entries(&reader).map_err(|e| e.to_string())?
        {
            let j = self.jobs.get_mut(&job).unwrap();
            let list = match role {
                AgentRole::MasterList => &mut j.master_building,
                AgentRole::Remote(i) => &mut j.remotes[i].list,
                AgentRole::MasterLink(_) => return Err("unexpected listBatch".into()),
            };
            for e in entries {
                let e = e.map_err(|e| e.to_string())?;
                push_entry(list, &e)?;
            }
            if last {
                list.finish().map_err(|e| e.to_string())?;
                if let Some(c) = self.conns.get_mut(&token) {
                    c.outstanding = c.outstanding.saturating_sub(1);
                }
                match role {
                    AgentRole::MasterList => self.on_master_listed(job, token),
                    AgentRole::Remote(i) => {
                        let j = self.jobs.get_mut(&job).unwrap();
                        j.remotes[i].state = RState::Listed;
                        info!(job, remote = %j.remotes[i].addr, entries = j.remotes[i].list.len(), "remote listed");
                        self.try_plan(job, i);
                    }
                    AgentRole::MasterLink(_) => {}
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
        }
        if let AgentRole::MasterLink(i) | AgentRole::Remote(i) = role {
            if self.on_round_frame(job, i, role, token, &msg)? {
                return Ok(());
            }
        }
        match msg {
            Msg::ChecksumReply { results, last, .. } => {
                if last {
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.outstanding = c.outstanding.saturating_sub(1);
                    }
                }
                self.on_checksums(job, role, results, last);
                Ok(())
            }
            Msg::ItemResults { results, .. } => {
                let i = match role {
                    AgentRole::MasterLink(i) | AgentRole::Remote(i) => i,
                    AgentRole::MasterList => return Err("unexpected itemResults".into()),
                };
                self.on_item_results(job, i, role, results);
                Ok(())
            }
            Msg::Progress(p) => {
                if let AgentRole::MasterLink(i) = role {
                    self.on_send_progress(job, i, p.bytes);
                }
                Ok(())
            }
            Msg::Done(_) => {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.outstanding = c.outstanding.saturating_sub(1);
                }
                match role {
                    AgentRole::MasterLink(i) | AgentRole::Remote(i) => self.on_done(job, i),
                    AgentRole::MasterList => {}
                }
                Ok(())
            }
            Msg::Error { message, .. } => Err(format!("agent error: {message}")),
            other => Err(format!("unexpected {} from an agent", other.kind_name())),
        }
    }

    fn on_master_listed(&mut self, job: u64, token: Token) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let list = std::mem::take(&mut j.master_building);
        info!(job, entries = list.len(), "master listed");
        j.mstate = vec![SUM_NONE; list.len()];
        j.master = Arc::new(list);
        j.master_done = true;
        j.master_conn = None;
        self.to_close.push((token, "master list complete".into()));
        let n = j.remotes.len();
        for i in 0..n {
            self.try_plan(job, i);
        }
    }

    fn try_plan(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if !j.master_done || j.remotes[i].state != RState::Listed {
            return;
        }
        let r = &mut j.remotes[i];
        let opts = PlanOptions {
            delete: j.req.delete,
            owner: r.can_chown,
        };
        let pair = PairPlan::new(&j.master, &r.list, opts);
        r.rstate = vec![SUM_NONE; pair.checksum_candidates().len()];
        r.pair = Some(pair);
        r.state = RState::Checksums;
        self.pump_sums(job, i);
        self.check_sums_ready(job, i);
    }

    /// Sends the next checksum requests of remote `i` (both sides), keeping
    /// at most [`WINDOW`] in flight on each connection.
    fn pump_sums(&mut self, job: u64, i: usize) {
        loop {
            let Some(j) = self.jobs.get_mut(&job) else {
                return;
            };
            let r = &mut j.remotes[i];
            if r.state != RState::Checksums {
                return;
            }
            let Some(pair) = &r.pair else { return };
            let cands = pair.checksum_candidates();
            let mut msgs: Vec<(Token, Vec<Vec<u8>>)> = Vec::new();
            if r.r_out < WINDOW && r.rcur < cands.len() {
                let end = (r.rcur + CHUNK).min(cands.len());
                let paths = cands[r.rcur..end]
                    .iter()
                    .map(|&(_, ri)| r.list.path(ri).to_vec())
                    .collect();
                r.rcur = end;
                if let Some(t) = r.conn {
                    r.r_out += 1;
                    msgs.push((t, paths));
                }
            }
            if r.m_out < WINDOW && r.mcur < cands.len() {
                // Only what no other remote has asked the master for.
                let mut paths = Vec::new();
                while r.mcur < cands.len() && paths.len() < CHUNK {
                    let m = cands[r.mcur].0;
                    if j.mstate[m as usize] == SUM_NONE {
                        j.mstate[m as usize] = SUM_PENDING;
                        paths.push(j.master.path(m).to_vec());
                    }
                    r.mcur += 1;
                }
                if let (false, Some(t)) = (paths.is_empty(), r.link) {
                    r.m_out += 1;
                    msgs.push((t, paths));
                }
            }
            if msgs.is_empty() {
                return;
            }
            let algorithm = j.req.algorithm.clone();
            let fresh = j.req.verify;
            for (t, paths) in msgs {
                let rid = self.next_req(job);
                self.send_request(
                    t,
                    &Msg::ChecksumRequest {
                        request_id: rid,
                        algorithm: algorithm.clone(),
                        paths,
                        fresh,
                    },
                );
            }
        }
    }

    fn on_checksums(
        &mut self,
        job: u64,
        role: AgentRole,
        results: Vec<ChecksumResult>,
        last: bool,
    ) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        match role {
            AgentRole::MasterLink(li) => {
                if last {
                    let r = &mut j.remotes[li];
                    r.m_out = r.m_out.saturating_sub(1);
                }
                for res in results {
                    let Some(m) = j.master.find(&res.path) else {
                        continue;
                    };
                    match res.digest {
                        Ok(d) => {
                            if j.mdig.is_empty() {
                                j.mdig = vec![0; j.master.len() * j.width];
                            }
                            j.mstate[m as usize] =
                                if store_digest(&mut j.mdig, j.width, m as usize, &d) {
                                    SUM_DONE
                                } else {
                                    SUM_FAILED
                                };
                        }
                        Err(e) => {
                            debug!(
                                "master checksum of {:?} failed: {e}",
                                String::from_utf8_lossy(&res.path)
                            );
                            j.mstate[m as usize] = SUM_FAILED;
                        }
                    }
                }
                self.pump_sums(job, li);
                // Master checksums may complete any remote's set.
                let n = self.jobs.get(&job).map_or(0, |j| j.remotes.len());
                for i in 0..n {
                    self.check_sums_ready(job, i);
                }
            }
            AgentRole::Remote(i) => {
                let r = &mut j.remotes[i];
                let Some(pair) = &r.pair else { return };
                let cands = pair.checksum_candidates();
                for res in results {
                    let Some(ri) = r.list.find(&res.path) else {
                        continue;
                    };
                    let Ok(k) = cands.binary_search_by_key(&ri, |c| c.1) else {
                        continue;
                    };
                    match res.digest {
                        Ok(d) => {
                            if r.rdig.is_empty() {
                                r.rdig = vec![0; cands.len() * j.width];
                            }
                            r.rstate[k] = if store_digest(&mut r.rdig, j.width, k, &d) {
                                SUM_DONE
                            } else {
                                SUM_FAILED
                            };
                        }
                        Err(_) => r.rstate[k] = SUM_FAILED,
                    }
                }
                if last {
                    r.r_out = r.r_out.saturating_sub(1);
                }
                self.pump_sums(job, i);
                self.check_sums_ready(job, i);
            }
            AgentRole::MasterList => {}
        }
    }

    fn check_sums_ready(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.state != RState::Checksums || r.r_out > 0 {
            return;
        }
        let Some(pair) = &r.pair else { return };
        let cands = pair.checksum_candidates();
        if r.rcur < cands.len() || r.mcur < cands.len() {
            return;
        }
        if cands.iter().any(|&(m, _)| j.mstate[m as usize] < SUM_DONE) {
            return;
        }
        let same: Vec<bool> = cands
            .iter()
            .enumerate()
            .map(|(k, &(m, _))| {
                r.rstate[k] == SUM_DONE
                    && j.mstate[m as usize] == SUM_DONE
                    && load_digest(&j.mdig, j.width, m as usize) == load_digest(&r.rdig, j.width, k)
            })
            .collect();
        let pair = r.pair.take().unwrap();
        r.rstate = Vec::new();
        r.rdig = Vec::new();
        let plan = pair.resolve(&j.master, &r.list, &same);
        r.total_bytes = plan.send_bytes(&j.master);
        r.plan = Some(plan);
        self.partition_blocks(job, i);
        self.emit_plan(job, i);
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.req.dry_run || j.req.verify {
            let r = &mut j.remotes[i];
            let plan = r.plan.as_ref().unwrap();
            r.result.transferred = plan.sends().len() as u64;
            r.result.bytes = r.total_bytes;
            self.finish_remote(job, i);
            return;
        }
        self.start_phase(job, i, RState::Before);
    }

    /// Starts itemizing remote `i`'s plan to the control client: the notes
    /// now, the steps by [`Server::pump_emit`] as the client reads them.
    fn emit_plan(&mut self, job: u64, i: usize) {
        let Server {
            jobs, conns, dirty, ..
        } = self;
        let Some(j) = jobs.get_mut(&job) else {
            return;
        };
        let control = j.control;
        let r = &mut j.remotes[i];
        let Some(plan) = r.plan.as_ref() else {
            return;
        };
        let master = &j.master;
        let mut items = Vec::new();
        if !r.can_chown {
            items.push(PlanItem {
                remote: i as u32,
                path: Vec::new(),
                action: Action::Skip,
                size: 0,
                detail: "owner/group not applied: the remote agent does not run as root".into(),
            });
        }
        for &m in &plan.skipped {
            items.push(PlanItem {
                remote: i as u32,
                path: master.path(m).to_vec(),
                action: Action::Skip,
                size: 0,
                detail: "special file (fifo, socket or device) skipped".into(),
            });
        }
        let deleted = plan
            .before()
            .iter()
            .filter(|s| matches!(s.kind, StepKind::Delete | StepKind::DeleteTree))
            .count() as u64;
        r.result.deleted = deleted;
        r.result.changed = (plan.steps().len() - plan.sends().len()) as u64 - deleted;
        r.emit_cur = 0;
        if let Some(c) = conns.get_mut(&control) {
            for chunk in items.chunks(ITEMS_PER_FRAME) {
                queue_on(c, &Msg::PlanItems(chunk.to_vec()));
            }
            dirty.insert(control);
        }
        self.pump_emit(job, i);
    }

    /// Itemizes more of remote `i`'s plan while the control connection has
    /// less than [`EMIT_HIGH`] bytes waiting, so a million-step plan is never
    /// all in memory as messages. Finishes a remote whose end was deferred.
    fn pump_emit(&mut self, job: u64, i: usize) {
        let finish = {
            let Server {
                jobs, conns, dirty, ..
            } = self;
            let Some(j) = jobs.get_mut(&job) else {
                return;
            };
            let control = j.control;
            let r = &mut j.remotes[i];
            let Some(plan) = r.plan.as_ref() else {
                return;
            };
            let steps = plan.steps();
            let (master, remote) = (&j.master, &r.list);
            let blocks = r.blocks.as_ref();
            match conns.get_mut(&control) {
                Some(c) => {
                    while r.emit_cur < steps.len() && c.out.len() - c.out_pos < EMIT_HIGH {
                        let end = (r.emit_cur + ITEMS_PER_FRAME).min(steps.len());
                        let items: Vec<PlanItem> = steps[r.emit_cur..end]
                            .iter()
                            .enumerate()
                            .map(|(k, s)| {
                                let (path, action, size) = match s.kind {
                                    StepKind::Delete | StepKind::DeleteTree => {
                                        (remote.path(s.index), Action::Delete, 0)
                                    }
                                    StepKind::Send => (
                                        master.path(s.index),
                                        Action::Transfer,
                                        master.size(s.index),
                                    ),
                                    StepKind::Mkdir => (master.path(s.index), Action::Mkdir, 0),
                                    StepKind::Symlink => (master.path(s.index), Action::Symlink, 0),
                                    StepKind::HardLink => {
                                        (master.path(s.index), Action::HardLink, 0)
                                    }
                                    StepKind::Skip => (master.path(s.index), Action::Skip, 0),
                                    StepKind::SetAttrs => {
                                        (master.path(s.index), Action::SetAttrs, 0)
                                    }
                                };
                                let mut detail = describe(s, master, remote, r.can_chown);
                                if let Some(b) =
                                    blocks.and_then(|b| b.block_of_step(r.emit_cur + k))
                                {
                                    detail = format!("block {b}: {detail}");
                                }
                                PlanItem {
                                    remote: i as u32,
                                    path: path.to_vec(),
                                    action,
                                    size,
                                    detail,
                                }
                            })
                            .collect();
                        queue_on(c, &Msg::PlanItems(items));
                        dirty.insert(control);
                        r.emit_cur = end;
                    }
                }
                // No client to tell: nothing more to emit.
                None => r.emit_cur = steps.len(),
            }
            r.emit_cur >= steps.len() && r.finish_deferred
        };
        if finish {
            self.finish_remote(job, i);
        }
    }

    /// Calls [`Server::pump_emit`] for every remote still itemizing.
    fn pump_all_emits(&mut self) {
        let pending: Vec<(u64, usize)> = self
            .jobs
            .iter()
            .flat_map(|(&id, j)| {
                j.remotes.iter().enumerate().filter_map(move |(i, r)| {
                    let plan = r.plan.as_ref()?;
                    (r.state != RState::Done && r.emit_cur < plan.steps().len()).then_some((id, i))
                })
            })
            .collect();
        for (job, i) in pending {
            self.pump_emit(job, i);
        }
    }

    fn ops_for(&self, job: u64, i: usize, steps: &[Step]) -> Vec<Op> {
        let j = &self.jobs[&job];
        let r = &j.remotes[i];
        let (master, remote) = (&j.master, &r.list);
        let owner = r.can_chown;
        let attrs_of = |m: u32, with_mode: bool| {
            let meta = master.meta(m);
            Attrs {
                mode: with_mode.then_some(meta.mode),
                owner: owner.then_some((meta.uid, meta.gid)),
                mtime: Some((meta.mtime_sec, meta.mtime_nsec)),
            }
        };
        steps
            .iter()
            .filter_map(|s| {
                let kind = match s.kind {
                    StepKind::Delete | StepKind::DeleteTree => {
                        return Some(Op {
                            path: remote.path(s.index).to_vec(),
                            kind: OpKind::Delete {
                                recursive: s.kind == StepKind::DeleteTree,
                            },
                        })
                    }
                    StepKind::Mkdir => {
                        let mut a = attrs_of(s.index, true);
                        a.mtime = None;
                        OpKind::Mkdir(a)
                    }
                    StepKind::Symlink => OpKind::Symlink {
                        target: master.link_target(s.index).to_vec(),
                        attrs: attrs_of(s.index, false),
                    },
                    StepKind::HardLink => OpKind::HardLink {
                        existing: master.path(s.other).to_vec(),
                    },
                    StepKind::SetAttrs => {
                        let is_link = master.kind(s.index) == Kind::Symlink;
                        OpKind::SetAttrs(attrs_of(s.index, !is_link))
                    }
                    StepKind::Send | StepKind::Skip => return None,
                };
                Some(Op {
                    path: master.path(s.index).to_vec(),
                    kind,
                })
            })
            .collect()
    }

    fn start_phase(&mut self, job: u64, i: usize, phase: RState) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        r.state = phase;
        r.pcur = 0;
        r.pending = 0;
        debug!(job, remote = i, ?phase, "phase");
        self.pump_phase(job, i);
    }

    /// Sends the next requests of the current phase ([`WINDOW`] in flight);
    /// moves to the next phase when all are answered.
    fn pump_phase(&mut self, job: u64, i: usize) {
        loop {
            let Some(j) = self.jobs.get(&job) else {
                return;
            };
            let r = &j.remotes[i];
            let Some(plan) = r.plan.as_ref() else { return };
            let phase = r.state;
            let steps = match (phase, r.blocks.as_ref()) {
                (RState::Before | RState::Sending | RState::After, Some(b)) => b.phase_steps(phase),
                (RState::Before, None) => plan.before(),
                (RState::Sending, None) => plan.sends(),
                (RState::After, None) => plan.after(),
                _ => return,
            };
            if r.pcur >= steps.len() {
                if r.pending == 0 {
                    self.advance(job, i);
                }
                return;
            }
            if r.pending >= WINDOW {
                return;
            }
            let end = (r.pcur + CHUNK).min(steps.len());
            let chunk = &steps[r.pcur..end];
            let (target, msg): (Option<Token>, Box<dyn FnOnce(u64) -> Msg>) =
                if phase == RState::Sending {
                    let paths: Vec<Vec<u8>> = chunk
                        .iter()
                        .map(|s| j.master.path(s.index).to_vec())
                        .collect();
                    let target = r.addr.clone();
                    let algorithm = j.req.algorithm.clone();
                    let lock_timeout_ms = j.req.lock_timeout_ms;
                    (
                        r.link,
                        Box::new(move |request_id| Msg::SendOrder {
                            request_id,
                            target,
                            algorithm,
                            paths,
                            lock_timeout_ms,
                            stage: String::new(),
                        }),
                    )
                } else {
                    let ops = self.ops_for(job, i, chunk);
                    (
                        r.conn,
                        Box::new(move |request_id| Msg::ApplyRequest { request_id, ops }),
                    )
                };
            let Some(t) = target else {
                self.fail_remote(job, i, "connection lost".into());
                return;
            };
            {
                let r = &mut self.jobs.get_mut(&job).unwrap().remotes[i];
                r.pcur = end;
                r.pending += 1;
            }
            let rid = self.next_req(job);
            self.send_request(t, &msg(rid));
        }
    }

    fn advance(&mut self, job: u64, i: usize) {
        let Some(state) = self.jobs.get(&job).map(|j| j.remotes[i].state) else {
            return;
        };
        match state {
            RState::Before => self.start_phase(job, i, RState::Sending),
            RState::Sending => self.start_blocks(job, i),
            RState::After => self.start_rounds(job, i),
            _ => {}
        }
    }

    fn on_item_results(
        &mut self,
        job: u64,
        i: usize,
        role: AgentRole,
        results: Vec<fleetsync_proto::ItemResult>,
    ) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.state == RState::Blocks {
            self.block_item_results(job, i, results);
            return;
        }
        let sending = matches!(role, AgentRole::MasterLink(_)) && r.state == RState::Sending;
        for res in results {
            match res.outcome {
                Outcome::Failed => {
                    r.failed_count += 1;
                    if r.failed_count <= 10 {
                        warn!(remote = %r.addr, path = %String::from_utf8_lossy(&res.path), "failed: {}", res.message);
                    } else {
                        debug!(remote = %r.addr, path = %String::from_utf8_lossy(&res.path), "failed: {}", res.message);
                    }
                    if r.result.failures.len() < MAX_FAILURES {
                        r.result.failures.push(Failure {
                            path: res.path,
                            message: res.message,
                        });
                    }
                }
                Outcome::Ok | Outcome::Skipped => {
                    if sending {
                        r.result.transferred += 1;
                        r.result.bytes += res.bytes;
                        r.rounds.note_received(&j.master, j.width, &res);
                    }
                }
            }
            if sending {
                r.done_files += 1;
                r.done_bytes += res.bytes;
            }
        }
        if sending {
            let p = SyncProgress {
                remote: i as u32,
                done_files: r.done_files,
                total_files: r.plan.as_ref().map_or(0, |p| p.sends().len() as u64),
                done_bytes: r.done_bytes,
                total_bytes: r.total_bytes,
            };
            let control = j.control;
            self.queue(control, &Msg::SyncProgress(p));
        }
    }

    fn on_done(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.state == RState::Blocks {
            self.block_done(job, i);
            return;
        }
        if !matches!(r.state, RState::Before | RState::Sending | RState::After) {
            return;
        }
        r.pending = r.pending.saturating_sub(1);
        if r.state == RState::Sending {
            r.progress_base = r.done_bytes;
        }
        self.pump_phase(job, i);
    }

    /// The master's progress within a send order (also within a big file).
    fn on_send_progress(&mut self, job: u64, i: usize, order_bytes: u64) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.state != RState::Sending {
            return;
        }
        let p = SyncProgress {
            remote: i as u32,
            done_files: r.done_files,
            total_files: r.plan.as_ref().map_or(0, |p| p.sends().len() as u64),
            done_bytes: (r.progress_base + order_bytes).max(r.done_bytes),
            total_bytes: r.total_bytes,
        };
        let control = j.control;
        self.queue(control, &Msg::SyncProgress(p));
    }

    fn fail_remote(&mut self, job: u64, i: usize, why: String) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.state == RState::Done {
            return;
        }
        warn!(job, remote = %r.addr, "remote failed: {why}");
        r.result.error = why;
        let lost_master_sums = r.state == RState::Checksums && r.m_out > 0;
        self.finish_remote(job, i);
        if lost_master_sums {
            // Master checksums this remote's link was computing will never
            // arrive: ask again through the others.
            let Some(j) = self.jobs.get_mut(&job) else {
                return;
            };
            for st in j.mstate.iter_mut() {
                if *st == SUM_PENDING {
                    *st = SUM_NONE;
                }
            }
            let n = j.remotes.len();
            for k in 0..n {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                let r = &mut j.remotes[k];
                if r.state == RState::Checksums {
                    r.mcur = 0;
                    self.pump_sums(job, k);
                }
            }
        }
    }

    fn finish_remote(&mut self, job: u64, i: usize) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        let r = &mut j.remotes[i];
        if r.state == RState::Done {
            return;
        }
        if r.result.error.is_empty()
            && r.plan
                .as_ref()
                .is_some_and(|p| r.emit_cur < p.steps().len())
        {
            // The client has not been told the whole plan yet: the result
            // must come after it (see pump_emit).
            r.finish_deferred = true;
            return;
        }
        r.state = RState::Done;
        r.result.ok = r.result.error.is_empty() && r.failed_count == 0;
        if r.failed_count as usize > r.result.failures.len() {
            let more = r.failed_count as usize - r.result.failures.len();
            r.result.failures.push(Failure {
                path: Vec::new(),
                message: format!("... and {more} more failures"),
            });
        }
        info!(job, remote = %r.addr, ok = r.result.ok, transferred = r.result.transferred, "remote finished");
        let result = r.result.clone();
        // Free the big structures now: the other remotes may run for long.
        r.list = FileList::new();
        r.plan = None;
        r.pair = None;
        r.blocks = None;
        let tokens: Vec<Token> = r.conn.take().into_iter().chain(r.link.take()).collect();
        let control = j.control;
        if let (Some(h), Some(record)) = (self.history.as_mut(), j.record) {
            let counts = RemoteCounts {
                sent: result.transferred,
                deleted: result.deleted,
                fixed: result.changed,
                bytes: result.bytes,
                rounds: result.rounds,
            };
            let error = if !result.error.is_empty() {
                Some(result.error.clone())
            } else if !result.ok {
                Some(format!("{} item(s) failed", r.failed_count))
            } else {
                None
            };
            let name = self.config.job_labels.get(&r.addr).unwrap_or(&r.addr);
            if let Err(e) = h.record_remote(record, name, &counts, error.as_deref()) {
                warn!(job, "job history: {e}");
            }
        }
        self.queue(control, &Msg::RemoteResult(result));
        for t in tokens {
            self.to_close.push((t, "remote finished".into()));
        }
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if !j.finished && j.remotes.iter().all(|r| r.state == RState::Done) {
            j.finished = true;
            let ok = j.remotes.iter().all(|r| r.result.ok);
            let failed = j.remotes.iter().filter(|r| !r.result.ok).count();
            let message = if ok {
                format!("{} remote(s) in sync", j.remotes.len())
            } else {
                format!("{failed} of {} remote(s) failed", j.remotes.len())
            };
            let master = j.master_conn.take();
            let record = j.record;
            let status = if ok {
                JobStatus::Succeeded
            } else {
                JobStatus::Failed
            };
            self.record_finish(record, status, (!ok).then_some(message.as_str()));
            self.queue(control, &Msg::SyncDone { ok, message });
            if let Some(t) = master {
                self.to_close.push((t, "job finished".into()));
            }
            if let Some(Peer::Control { job: jj }) =
                self.conns.get_mut(&control).map(|c| &mut c.peer)
            {
                *jj = None;
            }
            self.jobs.remove(&job);
        }
    }
}

impl Server {
    /// Records the end of a job in the history (errors are logged only).
    fn record_finish(&mut self, record: Option<JobId>, status: JobStatus, error: Option<&str>) {
        if let (Some(h), Some(record)) = (self.history.as_mut(), record) {
            if let Err(e) = h.finish_job(record, status, error) {
                warn!(job = %record, "job history: {e}");
            }
        }
    }
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

fn queue_on(conn: &mut Conn, msg: &Msg) {
    match msg.to_frame() {
        Ok(bytes) => {
            if conn.out_pos == conn.out.len() {
                conn.out.clear();
                conn.out_pos = 0;
            } else if conn.out_pos >= conn.out.len() / 2 {
                // Reclaim what was written (a busy connection may never drain).
                conn.out.drain(..conn.out_pos);
                conn.out_pos = 0;
            }
            conn.out.extend_from_slice(&bytes);
        }
        Err(e) => warn!("cannot encode {}: {e}", msg.kind_name()),
    }
}

fn flush(conn: &mut Conn) -> io::Result<()> {
    while conn.out_pos < conn.out.len() {
        match conn.stream.write(&conn.out[conn.out_pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => conn.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    conn.out.clear();
    conn.out_pos = 0;
    Ok(())
}
