//! What every request handler of a connection shares: the agent's state ([`Shared`]), the
//! connection's writer ([`SharedWriter`]) and the helpers that put frames on it. A leaf:
//! it knows none of the handlers.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fleetsync_engine::Registry;
use fleetsync_proto::tls::rustls::pki_types::CertificateDer;
use fleetsync_proto::tls::Stream;
use fleetsync_proto::{frame, Done, ItemResult, Msg, Outcome};

use crate::backend::Backend;
use crate::outgoing::DeltaCache;
use crate::ratelimit::RateLimiter;
use crate::records::ConsistState;
use crate::stages::Stages;
use crate::versions::VersionStore;
use crate::AgentError;

/// The writing half of a connection, shared by the threads answering on it.
pub(crate) type SharedWriter = Arc<Mutex<FrameWriter>>;

/// The writing half of a connection: frames, compressed ones when the peer agreed to
/// `frameCompression` in the handshake (the server over a network).
pub(crate) struct FrameWriter {
    out: BufWriter<Stream>,
    zstd: Option<frame::FrameCompressor>,
}

impl FrameWriter {
    /// A writer on `out`; `compress`: big frames go as `zstd` frames.
    pub(crate) fn new(out: BufWriter<Stream>, compress: bool) -> Self {
        // Out of memory for a zstd context: plain frames, which the peer takes too.
        let zstd = compress
            .then(frame::FrameCompressor::new)
            .and_then(Result::ok);
        FrameWriter { out, zstd }
    }

    fn write_msg(&mut self, msg: &Msg) -> Result<(), fleetsync_proto::ProtoError> {
        match &mut self.zstd {
            Some(z) => z.write_frame(&mut self.out, &msg.encode()),
            None => frame::write_frame(&mut self.out, &msg.encode()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The TLS configurations of an agent (`--tls`).
pub(crate) struct AgentTls {
    /// Our listener: accepts the server (role `server`) and other agents (role `agent`).
    pub(crate) listen: Arc<fleetsync_proto::tls::rustls::ServerConfig>,
    /// Our streams to remote agents: they must be of role `agent`.
    pub(crate) dial: Arc<fleetsync_proto::tls::rustls::ClientConfig>,
    /// Our certificate: a ticket must name it.
    pub(crate) me: CertificateDer<'static>,
    /// The certificates of the servers connected now (by connection): a stream's ticket
    /// must be signed by one of them.
    pub(crate) servers: Mutex<HashMap<u64, CertificateDer<'static>>>,
    /// Numbers the server connections.
    pub(crate) next_conn: std::sync::atomic::AtomicU64,
    /// Tickets already presented.
    pub(crate) replay: fleetsync_proto::ticket::ReplayGuard,
}

/// The agent's state, shared by every connection.
pub(crate) struct Shared {
    pub(crate) token: Option<Vec<u8>>,
    /// `--tls`: the configurations of our listener and of our streams to other agents.
    pub(crate) tls: Option<AgentTls>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) registry: Registry,
    /// The tree root (locks are taken on paths beneath it).
    pub(crate) root: PathBuf,
    /// Write log and consistency checks.
    pub(crate) consist: Arc<ConsistState>,
    /// Open block staging transactions (`--blocks`).
    pub(crate) stages: Stages,
    /// Versions of files this agent sent, kept to patch against (`--keep-versions`).
    pub(crate) versions: Option<Arc<VersionStore>>,
    /// `--read-only`: every write is refused.
    pub(crate) read_only: bool,
    /// Deltas made for one remote, kept for the others on the same old version.
    pub(crate) deltas: DeltaCache,
    /// `--master-bwlimit`: the limits of all streams this agent sends together, by rate
    /// (the send orders of one sync share one).
    pub(crate) master_limits: Mutex<HashMap<u64, Arc<RateLimiter>>>,
    /// Where the tree is (told to connectors, so that a server refuses overlapping trees).
    pub(crate) tree: fleetsync_proto::TreeIdentity,
    /// What `--metrics-listen` shows.
    pub(crate) metrics: Arc<crate::metrics::AgentMetrics>,
    /// The connections open now (a clean stop closes them).
    pub(crate) live: Live,
}

/// The agent's open connections (accepted and outgoing), so that a clean stop
/// ([`crate::AgentHandle::stop_gracefully`]) can close them: each handler then sees its
/// connection end at the next read, and ends as it does when a peer goes away (a file in
/// flight kept as its partial or removed, verified files committed, block transactions
/// aborted).
#[derive(Default)]
pub(crate) struct Live {
    st: Mutex<LiveState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct LiveState {
    next: u64,
    conns: HashMap<u64, (TcpStream, bool)>,
    stopping: bool,
}

/// A connection's place in [`Live`], given up when dropped.
pub(crate) struct LiveGuard<'a> {
    live: &'a Live,
    id: u64,
}

impl Live {
    /// Registers `conn` (`accepted`: a connection the agent accepted, which
    /// [`Live::wait_accepted`] waits for); if the agent is stopping it is closed at once.
    pub(crate) fn add(&self, conn: &TcpStream, accepted: bool) -> LiveGuard<'_> {
        let mut st = self.st.lock().expect("poisoned");
        let id = st.next;
        st.next += 1;
        if st.stopping {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        if let Ok(c) = conn.try_clone() {
            st.conns.insert(id, (c, accepted));
        }
        LiveGuard { live: self, id }
    }

    /// How many connections are open.
    pub(crate) fn open_count(&self) -> usize {
        self.st.lock().expect("poisoned").conns.len()
    }

    /// Closes every connection, and those registered from now on.
    pub(crate) fn close_all(&self) {
        let mut st = self.st.lock().expect("poisoned");
        st.stopping = true;
        for (c, _) in st.conns.values() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits (at most `limit`) until no accepted connection is left; whether none is.
    pub(crate) fn wait_accepted(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.st.lock().expect("poisoned");
        loop {
            if !st.conns.values().any(|(_, accepted)| *accepted) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.cv.wait_timeout(st, left).expect("poisoned").0;
        }
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.live
            .st
            .lock()
            .expect("poisoned")
            .conns
            .remove(&self.id);
        self.live.cv.notify_all();
    }
}

/// Item results per `itemResults` frame.
const RESULTS_PER_FRAME: usize = 1024;

/// The note a request's first item gets when the owner could not be applied.
pub(crate) const OWNER_NOTE: &str = "owner/group not applied: the agent is not running as root";

/// Writes `msg` (buffered).
pub(crate) fn send(w: &SharedWriter, msg: &Msg) -> Result<(), AgentError> {
    w.lock().expect("writer poisoned").write_msg(msg)?;
    Ok(())
}

/// Writes `msg` and flushes the connection.
pub(crate) fn send_flush(w: &SharedWriter, msg: &Msg) -> Result<(), AgentError> {
    let mut w = w.lock().expect("writer poisoned");
    w.write_msg(msg)?;
    w.flush().map_err(|e| AgentError::Proto(e.into()))?;
    Ok(())
}

/// Flushes what [`send`] buffered.
pub(crate) fn flush(w: &SharedWriter) -> Result<(), AgentError> {
    w.lock()
        .expect("writer poisoned")
        .flush()
        .map_err(|e| AgentError::Proto(e.into()))
}

/// An error answer to request `request_id`, flushed.
pub(crate) fn send_error(
    w: &SharedWriter,
    request_id: u64,
    message: String,
) -> Result<(), AgentError> {
    send_flush(
        w,
        &Msg::Error {
            request_id,
            message,
        },
    )
}

/// The result of an item that failed with `message`.
pub(crate) fn failed(path: &[u8], message: String) -> ItemResult {
    ItemResult {
        path: path.to_vec(),
        outcome: Outcome::Failed,
        message,
        bytes: 0,
        digest: Vec::new(),
        wire_bytes: 0,
        coding: String::new(),
    }
}

/// The result of an item done, with `message` (usually empty).
pub(crate) fn succeeded(path: &[u8], message: String) -> ItemResult {
    ItemResult {
        path: path.to_vec(),
        outcome: Outcome::Ok,
        message,
        bytes: 0,
        digest: Vec::new(),
        wire_bytes: 0,
        coding: String::new(),
    }
}

/// The item results of one request, sent in frames of [`RESULTS_PER_FRAME`] as they come,
/// then the rest and `done` by [`ResultBatch::finish`].
pub(crate) struct ResultBatch<'w> {
    w: &'w SharedWriter,
    request_id: u64,
    results: Vec<ItemResult>,
}

impl<'w> ResultBatch<'w> {
    pub(crate) fn new(w: &'w SharedWriter, request_id: u64) -> Self {
        ResultBatch {
            w,
            request_id,
            results: Vec::new(),
        }
    }

    /// Adds one result; a full frame is sent at once.
    pub(crate) fn push(&mut self, result: ItemResult) -> Result<(), AgentError> {
        self.results.push(result);
        if self.results.len() >= RESULTS_PER_FRAME {
            self.send_pending()?;
        }
        Ok(())
    }

    /// Sends the results gathered so far (nothing if there are none).
    pub(crate) fn send_pending(&mut self) -> Result<(), AgentError> {
        if self.results.is_empty() {
            return Ok(());
        }
        send(
            self.w,
            &Msg::ItemResults {
                request_id: self.request_id,
                results: std::mem::take(&mut self.results),
            },
        )
    }

    /// Sends the remaining results, then `done` (flushed).
    pub(crate) fn finish(mut self, done: Done) -> Result<(), AgentError> {
        self.send_pending()?;
        send_flush(self.w, &Msg::Done(done))
    }
}
