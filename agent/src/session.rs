//! What every request handler of a connection shares: the agent's state ([`Shared`]), the
//! connection's writer ([`SharedWriter`]) and the helpers that put frames on it. A leaf:
//! it knows none of the handlers.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
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
pub(crate) type SharedWriter = Arc<Mutex<BufWriter<Stream>>>;

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
}

/// Item results per `itemResults` frame.
const RESULTS_PER_FRAME: usize = 1024;

/// The note a request's first item gets when the owner could not be applied.
pub(crate) const OWNER_NOTE: &str = "owner/group not applied: the agent is not running as root";

/// Writes `msg` (buffered).
pub(crate) fn send(w: &SharedWriter, msg: &Msg) -> Result<(), AgentError> {
    let mut w = w.lock().expect("writer poisoned");
    frame::write_frame(&mut *w, &msg.encode())?;
    Ok(())
}

/// Writes `msg` and flushes the connection.
pub(crate) fn send_flush(w: &SharedWriter, msg: &Msg) -> Result<(), AgentError> {
    let mut w = w.lock().expect("writer poisoned");
    frame::write_frame(&mut *w, &msg.encode())?;
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
