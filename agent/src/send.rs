//! The sending side of an agent-to-agent file stream (on the master, on a server's
//! `sendOrder`): connects to the remote agent, streams the files, relays the remote's per-file
//! results to the server, then reports `done`.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fleetsync_engine::{Algorithm, AlgorithmInfo, AlignedBuf};
use fleetsync_proto::{
    auth, encode_file_chunk, frame, Done, FileEntry, ItemResult, Msg, Outcome, Progress,
    ProtoError, Role,
};
use tracing::warn;

use crate::lock::{lock_beneath, FileLock, LockKind};
use crate::session::{failed, flush, send, send_flush, ResultBatch, Shared, SharedWriter};
use crate::{path, AgentError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a send order reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A server's order to stream files to another agent (the `sendOrder` message).
pub(crate) struct SendOrder {
    pub(crate) request_id: u64,
    /// The remote agent, `host:port`.
    pub(crate) target: String,
    /// Checksum algorithm the remote verifies each file with.
    pub(crate) algorithm: String,
    /// The files to send, in order.
    pub(crate) paths: Vec<Vec<u8>>,
    /// `--lock`: lock the master copy (and the remote its destination) with this timeout.
    pub(crate) lock_timeout_ms: Option<u32>,
    /// Block transaction the files are staged in on the remote (empty: none).
    pub(crate) stage: String,
}

impl SendOrder {
    /// Carries the order out: connects to the target, streams every path, relays the
    /// remote's results; every path gets a result and the order ends with `done`.
    pub(crate) fn run(&self, server: &SharedWriter, shared: &Shared) -> Result<(), AgentError> {
        let info = match shared.registry.info(&self.algorithm) {
            Ok(i) => i,
            Err(e) => return self.fail_all(server, e.to_string()),
        };
        let remote = match connect(&self.target, shared.token.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("cannot reach remote agent {}: {e}", self.target);
                return self.fail_all(server, why);
            }
        };
        let relay = Relay::start(&remote, server)?;
        let mut stream = FileStream {
            out: BufWriter::with_capacity(1 << 20, try_clone(&remote)?),
            info,
            buf: AlignedBuf::new(frame::MAX_CHUNK),
            order: self,
        };
        let mut local = LocalFailures::default();
        let mut stream_error = self.stream_all(server, shared, &mut stream, &mut local)?;
        if stream_error.is_none() {
            stream_error = stream.end().err();
        }
        if stream_error.is_some() {
            let _ = remote.shutdown(Shutdown::Both);
        }
        drop(stream);
        let relayed = relay.join();
        let _ = remote.shutdown(Shutdown::Both);
        self.report(server, local, relayed, stream_error)
    }

    /// Answers every path failed with `why` (nothing could be sent).
    fn fail_all(&self, server: &SharedWriter, why: String) -> Result<(), AgentError> {
        warn!("send order {} to {}: {why}", self.request_id, self.target);
        let mut results = ResultBatch::new(server, self.request_id);
        for p in &self.paths {
            results.push(failed(p, why.clone()))?;
        }
        results.finish(Done {
            request_id: self.request_id,
            failed: self.paths.len() as u64,
            ..Done::default()
        })
    }

    /// Streams every path that can be opened; those that cannot go to `local`. Returns why
    /// the connection to the remote broke, if it did.
    fn stream_all(
        &self,
        server: &SharedWriter,
        shared: &Shared,
        stream: &mut FileStream<'_>,
        local: &mut LocalFailures,
    ) -> Result<Option<String>, AgentError> {
        let mut progress = ProgressReport {
            server,
            request_id: self.request_id,
            total_items: self.paths.len() as u64,
            items: 0,
            bytes: 0,
            last: Instant::now(),
        };
        for p in &self.paths {
            let mut source = match self.open_source(shared, p) {
                Ok(x) => x,
                Err(why) => {
                    local.fail(p, why);
                    continue;
                }
            };
            // Progress also within a big file, so that the server sees bytes flowing (its
            // idle timeout) and the progress bar moves.
            let mut in_file = |sent_in_file: u64| {
                if progress.due() {
                    progress.send(sent_in_file)?;
                }
                Ok(())
            };
            match stream.send_file(&mut *source.reader, &source.entry, &mut in_file) {
                Ok(n) => progress.bytes += n,
                Err(StreamError::Server(e)) => return Err(e),
                Err(StreamError::Net(e)) => return Ok(Some(e)),
            }
            drop(source);
            progress.items += 1;
            if progress.due() {
                local.send_pending(server, self.request_id)?;
                progress.send(0)?;
            }
        }
        Ok(None)
    }

    /// Opens the master copy of `p` for reading; with `--lock`, shared-locked first (the lock
    /// is held until the file is sent). The error is the item's failure message.
    fn open_source(&self, shared: &Shared, p: &[u8]) -> Result<Source, String> {
        let lock = match self.lock_timeout_ms {
            Some(ms) => lock_beneath(&shared.root, p, LockKind::Shared, ms)?,
            None => None,
        };
        let (reader, entry) = path::check(p)
            .and_then(|()| shared.backend.open_read(p))
            .map_err(|e| e.to_string())?;
        if let Some(l) = &lock {
            // The file read must be the one locked (not a replacement renamed in between).
            let same = l.file().metadata().is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino() == entry.inode && m.dev() == entry.dev
            });
            if !same {
                return Err("replaced on the master while being locked; sync again".to_owned());
            }
        }
        Ok(Source {
            reader,
            entry,
            _lock: lock,
        })
    }

    /// The order's last word: the master's own failures, a failure for every path the remote
    /// never answered for (the connection broke), then `done` with the totals.
    fn report(
        &self,
        server: &SharedWriter,
        local: LocalFailures,
        (relayed, relay_result): (RelayState, Result<(), String>),
        stream_error: Option<String>,
    ) -> Result<(), AgentError> {
        let why = stream_error
            .or_else(|| relay_result.err())
            .or_else(|| (!relayed.done).then(|| "remote agent closed the connection".to_owned()))
            .unwrap_or_else(|| "no result from the remote agent".into());
        let mut done = Done {
            request_id: self.request_id,
            ok: relayed.ok,
            failed: relayed.failed + local.paths.len() as u64,
            skipped: relayed.skipped,
        };
        let mut results = ResultBatch::new(server, self.request_id);
        for r in local.results {
            results.push(r)?;
        }
        for p in &self.paths {
            if !relayed.reported.contains(p) && !local.paths.contains(p) {
                results.push(failed(p, why.clone()))?;
                done.failed += 1;
            }
        }
        results.finish(done)
    }
}

/// A master copy open for sending.
struct Source {
    reader: Box<dyn Read + Send>,
    entry: FileEntry,
    /// With `--lock`: the shared lock on it, held until it is sent.
    _lock: Option<FileLock>,
}

/// Paths the master itself could not send, with their results not yet sent to the server.
#[derive(Default)]
struct LocalFailures {
    results: Vec<ItemResult>,
    paths: HashSet<Vec<u8>>,
}

impl LocalFailures {
    fn fail(&mut self, p: &[u8], why: String) {
        self.results.push(failed(p, why));
        self.paths.insert(p.to_vec());
    }

    /// Sends the results gathered so far (the paths stay known as failed).
    fn send_pending(&mut self, server: &SharedWriter, request_id: u64) -> Result<(), AgentError> {
        if self.results.is_empty() {
            return Ok(());
        }
        send(
            server,
            &Msg::ItemResults {
                request_id,
                results: std::mem::take(&mut self.results),
            },
        )
    }
}

/// A send order's progress, reported to the server every [`PROGRESS_EVERY`].
struct ProgressReport<'w> {
    server: &'w SharedWriter,
    request_id: u64,
    total_items: u64,
    /// Files sent so far.
    items: u64,
    /// Bytes of the files sent so far.
    bytes: u64,
    last: Instant,
}

impl ProgressReport<'_> {
    /// True (and the clock restarted) if a report is due.
    fn due(&mut self) -> bool {
        if self.last.elapsed() > PROGRESS_EVERY {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }

    /// Reports, counting `in_file` bytes of the file being sent.
    fn send(&self, in_file: u64) -> Result<(), AgentError> {
        send_flush(
            self.server,
            &Msg::Progress(Progress {
                request_id: self.request_id,
                items: self.items,
                bytes: self.bytes + in_file,
                total_items: self.total_items,
                total_bytes: 0,
            }),
        )
    }
}

enum StreamError {
    /// The connection to the remote agent failed.
    Net(String),
    /// The connection to the server failed.
    Server(AgentError),
}

/// The file stream to the remote agent.
struct FileStream<'o> {
    out: BufWriter<TcpStream>,
    info: AlgorithmInfo,
    /// One chunk's worth, reused for every file; page-aligned, since the
    /// kernel copies page-cache data into an unaligned buffer several times
    /// slower (see the engine's `AlignedBuf`).
    buf: AlignedBuf,
    order: &'o SendOrder,
}

impl FileStream<'_> {
    /// Sends one file; a read error mid-file becomes an aborted `fileEnd` (the remote
    /// discards it). `progress` is told the bytes sent of it after each chunk. Returns the
    /// bytes sent.
    fn send_file(
        &mut self,
        reader: &mut dyn Read,
        entry: &FileEntry,
        progress: &mut dyn FnMut(u64) -> Result<(), AgentError>,
    ) -> Result<u64, StreamError> {
        let net = |e: ProtoError| StreamError::Net(e.to_string());
        let start = Msg::FileStart {
            request_id: self.order.request_id,
            entry: entry.clone(),
            algorithm: self.info.name.clone(),
            lock_timeout_ms: self.order.lock_timeout_ms,
            stage: self.order.stage.clone(),
        };
        frame::write_frame(&mut self.out, &start.encode()).map_err(net)?;
        let mut state: Box<dyn Algorithm> = self.info.instantiate();
        let mut sent = 0u64;
        let read_error = loop {
            let (filled, read_error) = fill(reader, &mut self.buf);
            if filled > 0 {
                let chunk = &self.buf[..filled];
                state.update(chunk);
                frame::write_frame(&mut self.out, &encode_file_chunk(chunk)).map_err(net)?;
                sent += filled as u64;
                progress(sent).map_err(StreamError::Server)?;
            }
            if filled < self.buf.len() || read_error.is_some() {
                break read_error;
            }
        };
        let end = match read_error {
            None => Msg::FileEnd {
                size: sent,
                digest: state.finish().as_bytes().to_vec(),
                aborted: false,
                error: String::new(),
            },
            Some(e) => Msg::FileEnd {
                size: sent,
                digest: Vec::new(),
                aborted: true,
                error: format!("read failed on the master: {e}"),
            },
        };
        frame::write_frame(&mut self.out, &end.encode()).map_err(net)?;
        Ok(sent)
    }

    /// Ends the stream (`streamEnd`) and flushes it.
    fn end(&mut self) -> Result<(), String> {
        frame::write_frame(&mut self.out, &Msg::StreamEnd.encode()).map_err(|e| e.to_string())?;
        self.out.flush().map_err(|e| e.to_string())
    }
}

/// Fills `buf` from `reader` as far as it goes (fewer, bigger frames): the bytes read, and the
/// read error that stopped it, if one did.
fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<String>) {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e.to_string())),
        }
    }
    (filled, None)
}

fn try_clone(s: &TcpStream) -> Result<TcpStream, AgentError> {
    s.try_clone().map_err(|e| AgentError::Proto(e.into()))
}

/// What the remote agent answered so far.
#[derive(Default)]
struct RelayState {
    reported: HashSet<Vec<u8>>,
    ok: u64,
    failed: u64,
    skipped: u64,
    bytes: u64,
    done: bool,
}

/// The thread relaying the remote agent's results to the server.
struct Relay {
    state: Arc<Mutex<RelayState>>,
    thread: JoinHandle<Result<(), String>>,
}

impl Relay {
    fn start(remote: &TcpStream, server: &SharedWriter) -> Result<Relay, AgentError> {
        let read_half = try_clone(remote)?;
        let state = Arc::new(Mutex::new(RelayState::default()));
        let thread = {
            let (state, server) = (state.clone(), server.clone());
            thread::Builder::new()
                .name("agent-relay".into())
                .spawn(move || relay_results(read_half, &server, &state))
                .map_err(|e| AgentError::Proto(e.into()))?
        };
        Ok(Relay { state, thread })
    }

    /// Waits for the remote's last answer: what it answered, and why it stopped early if it
    /// did.
    fn join(self) -> (RelayState, Result<(), String>) {
        let r = self
            .thread
            .join()
            .unwrap_or_else(|_| Err("relay thread panicked".into()));
        let state = std::mem::take(&mut *self.state.lock().expect("poisoned"));
        (state, r)
    }
}

fn connect(target: &str, token: Option<&[u8]>) -> Result<TcpStream, AgentError> {
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| AgentError::Proto(e.into()))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(CONNECT_TIMEOUT));
                auth::connect(&mut s, token, Role::Agent)?;
                let _ = s.set_read_timeout(None);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(AgentError::Proto(
        last.unwrap_or_else(|| std::io::Error::other("no address"))
            .into(),
    ))
}
fn relay_results(
    remote: TcpStream,
    server: &SharedWriter,
    state: &Mutex<RelayState>,
) -> Result<(), String> {
    let mut r = BufReader::with_capacity(256 * 1024, remote);
    loop {
        let body = match frame::read_frame(&mut r) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        match Msg::decode(&body).map_err(|e| e.to_string())? {
            Msg::ItemResults {
                request_id,
                results,
            } => {
                {
                    let mut st = state.lock().expect("poisoned");
                    for r in &results {
                        match r.outcome {
                            Outcome::Ok => st.ok += 1,
                            Outcome::Failed => st.failed += 1,
                            Outcome::Skipped => st.skipped += 1,
                        }
                        st.bytes += r.bytes;
                        st.reported.insert(r.path.clone());
                    }
                }
                send(
                    server,
                    &Msg::ItemResults {
                        request_id,
                        results,
                    },
                )
                .map_err(|e| e.to_string())?;
                if r.buffer().is_empty() {
                    flush(server).map_err(|e| e.to_string())?;
                }
            }
            Msg::Done(_) => {
                state.lock().expect("poisoned").done = true;
                return Ok(());
            }
            Msg::Error { message, .. } => return Err(format!("remote agent: {message}")),
            other => {
                return Err(format!(
                    "unexpected '{}' from the remote agent",
                    other.kind_name()
                ))
            }
        }
    }
}
