//! A relay of a server-planned distribution tree: the remote agent that receives a stream
//! starting with `forward` passes every file frame on to its children (each of which may
//! relay further) **while** receiving it, chunk by chunk, and writes and verifies its own
//! copy as any receiver does ([`crate::receive`]).
//!
//! Each child has its own connection (authenticated as the master authenticates), a writer
//! thread fed through a queue bounded in bytes ([`QUEUE_BYTES`]) and a reader thread that
//! passes the child's item results (its own and its subtree's, each under the request id the
//! server gave that remote) up the stream. A child that falls behind by more than its queue,
//! or whose connection fails, is dropped: the rest of the tree goes on, and the master reports
//! whatever the child's subtree did not confirm as failed with coding [`RELAY`] — the server
//! sends those files again, directly.
//!
//! The children's `done`s stop here: the master sends one per remote of the tree when its
//! stream is over (after the failures it fills in), so that the server sees every result of
//! a remote before its `done`.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use fleetsync_proto::tls::Stream;
use fleetsync_proto::{frame, Msg, RelayNode};
use tracing::{debug, warn};

use crate::session::{flush, send, Shared, SharedWriter};

/// The coding of a failed result that did not come through the relay tree (the relay or
/// the link to it failed, or the child fell behind): the server sends the file again
/// directly from the master.
pub(crate) const RELAY: &str = "relay";

/// File frames a relay holds for one child at most: a child further behind is dropped
/// rather than stall its parent (and its parent's other children).
pub(crate) const QUEUE_BYTES: usize = 64 << 20;

/// How long a child may stay silent once the stream is over (committing its last files)
/// before its relay gives up on it.
const CHILD_SILENCE: Duration = Duration::from_secs(300);

/// The frames waiting for one child.
#[derive(Default)]
struct QueueState {
    frames: VecDeque<Arc<Vec<u8>>>,
    bytes: usize,
    /// No more frames will come (`streamEnd` queued).
    closed: bool,
    /// The child is dropped: nothing more is queued or written.
    dropped: Option<String>,
}

#[derive(Default)]
struct Queue {
    st: Mutex<QueueState>,
    cv: Condvar,
}

impl Queue {
    /// Queues a frame; false if the child is (now) dropped.
    fn push(&self, f: &Arc<Vec<u8>>) -> bool {
        let mut st = self.st.lock().expect("poisoned");
        if st.dropped.is_some() {
            return false;
        }
        if st.bytes + f.len() > QUEUE_BYTES {
            st.dropped = Some(format!(
                "fell more than {} MiB behind its relay",
                QUEUE_BYTES >> 20
            ));
            st.frames.clear();
            st.bytes = 0;
            self.cv.notify_all();
            return false;
        }
        st.bytes += f.len();
        st.frames.push_back(f.clone());
        self.cv.notify_all();
        true
    }

    fn close(&self) {
        self.st.lock().expect("poisoned").closed = true;
        self.cv.notify_all();
    }

    fn drop_child(&self, why: String) {
        let mut st = self.st.lock().expect("poisoned");
        if st.dropped.is_none() {
            st.dropped = Some(why);
        }
        st.frames.clear();
        st.bytes = 0;
        self.cv.notify_all();
    }

    /// The next frame to write, `None` at the end (closed and drained, or dropped); with
    /// `idle` set when the queue is empty at the moment (time to flush).
    fn pop(&self, idle: &mut bool) -> Option<Arc<Vec<u8>>> {
        let mut st = self.st.lock().expect("poisoned");
        loop {
            if st.dropped.is_some() {
                return None;
            }
            if let Some(f) = st.frames.pop_front() {
                st.bytes -= f.len();
                *idle = st.frames.is_empty();
                return Some(f);
            }
            if st.closed {
                return None;
            }
            *idle = true;
            st = self.cv.wait(st).expect("poisoned");
        }
    }

    fn dropped(&self) -> Option<String> {
        self.st.lock().expect("poisoned").dropped.clone()
    }
}

/// One child of this relay.
struct Link {
    target: String,
    queue: Arc<Queue>,
    socket: Option<Stream>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    /// Its connection is broken already.
    is_cut: std::cell::Cell<bool>,
}

/// The children of a relay, fed with the frames of the stream it receives.
pub(crate) struct Forwarder {
    links: Vec<Link>,
    /// The stream ended cleanly ([`Forwarder::finish`]): the children are done, not broken.
    finished: bool,
}

impl Forwarder {
    /// Connects to every child of `children` (authenticating as the master does: TLS with
    /// `--tls`, the token), sends each its
    /// own subtree, and starts passing their results up on `up`. A child that cannot be
    /// reached is left out (the master reports its subtree's files as failed [`RELAY`]).
    pub(crate) fn start(children: &[RelayNode], shared: &Shared, up: &SharedWriter) -> Self {
        let links = children
            .iter()
            .map(|node| Link::start(node, shared, up))
            .collect();
        Forwarder {
            links,
            finished: false,
        }
    }

    /// Queues one raw frame (`body`, without its length prefix) for every child still
    /// following.
    pub(crate) fn frame(&self, body: &[u8]) {
        if self.links.is_empty() {
            return;
        }
        let mut f = Vec::with_capacity(body.len() + 4);
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(body);
        let f = Arc::new(f);
        for l in &self.links {
            if !l.queue.push(&f) {
                l.cut();
            }
        }
    }

    /// The stream is over (its `streamEnd` was queued): waits until every child has
    /// written its last frame and answered with its `done` (or is dropped).
    pub(crate) fn finish(&mut self) {
        for l in &self.links {
            l.queue.close();
        }
        for l in &mut self.links {
            l.join();
        }
        self.finished = true;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The stream broke: the children's streams break too (their files in flight stay
        // partial files, never torn ones).
        if self.finished {
            return;
        }
        for l in &mut self.links {
            l.queue.drop_child("its relay's stream broke".into());
            l.cut();
            l.join();
        }
    }
}

impl Link {
    fn start(node: &RelayNode, shared: &Shared, up: &SharedWriter) -> Link {
        let queue = Arc::new(Queue::default());
        let mut link = Link {
            target: node.target.clone(),
            queue: queue.clone(),
            socket: None,
            writer: None,
            reader: None,
            is_cut: Default::default(),
        };
        let socket = match crate::send::connect(&node.target, shared) {
            Ok(s) => s,
            Err(e) => {
                warn!("relay: cannot reach {}: {e}", node.target);
                queue.drop_child(format!("cannot reach {}: {e}", node.target));
                return link;
            }
        };
        let (Ok(w), Ok(r)) = (socket.try_clone(), socket.try_clone()) else {
            queue.drop_child("cannot clone the socket".into());
            return link;
        };
        // With --tls the child's first frame is the server's authority for this edge of the
        // tree (this agent to the child, those paths).
        if !node.ticket.is_empty() {
            let ticket = Msg::StreamTicket {
                ticket: node.ticket.clone(),
            };
            match frame::encode_frame(&ticket.encode()) {
                Ok(f) => {
                    queue.push(&Arc::new(f));
                }
                Err(e) => {
                    queue.drop_child(e.to_string());
                    return link;
                }
            }
        }
        // Then what it forwards, and whose results it reports.
        let forward = Msg::Forward {
            request_id: node.request_id,
            children: node.children.clone(),
        };
        let first = match frame::encode_frame(&forward.encode()) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                queue.drop_child(e.to_string());
                return link;
            }
        };
        queue.push(&first);
        let target = node.target.clone();
        let q = queue.clone();
        link.writer = thread::Builder::new()
            .name("agent-forward".into())
            .spawn(move || write_child(w, &q, &target))
            .ok();
        let (q, up, target) = (queue.clone(), up.clone(), node.target.clone());
        link.reader = thread::Builder::new()
            .name("agent-forward-results".into())
            .spawn(move || {
                if let Err(why) = pass_results(r, &up) {
                    debug!("relay: results of {target}: {why}");
                    q.drop_child(why);
                }
            })
            .ok();
        link.socket = Some(socket);
        link
    }

    /// Breaks the child's connection (once it is dropped).
    fn cut(&self) {
        if self.is_cut.replace(true) {
            return;
        }
        if let Some(s) = &self.socket {
            if let Some(why) = self.queue.dropped() {
                debug!("relay: dropping {}: {why}", self.target);
            }
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn join(&mut self) {
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
        if self.queue.dropped().is_some() {
            self.cut();
        }
        if let Some(s) = &self.socket {
            // The child answers with its results, then `done`; a child silent this long
            // after the stream ended is given up.
            let _ = s.set_read_timeout(Some(CHILD_SILENCE));
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread of one child: the queue's frames onto its connection, flushed
/// whenever the queue runs empty.
fn write_child(socket: Stream, queue: &Queue, target: &str) {
    let mut out = BufWriter::with_capacity(1 << 20, socket);
    let mut idle = false;
    while let Some(f) = queue.pop(&mut idle) {
        let r = out
            .write_all(&f)
            .and_then(|()| if idle { out.flush() } else { Ok(()) });
        if let Err(e) = r {
            queue.drop_child(format!("writing to {target}: {e}"));
            let _ = out.get_ref().shutdown(Shutdown::Both);
            return;
        }
    }
    if queue.dropped().is_none() {
        if let Err(e) = out.flush() {
            queue.drop_child(format!("writing to {target}: {e}"));
        }
    } else {
        let _ = out.get_ref().shutdown(Shutdown::Both);
    }
}

/// The reader thread of one child: its item results (already under the request id of the
/// remote they are about) go up the stream as they come; its `done` ends it.
fn pass_results(socket: Stream, up: &SharedWriter) -> Result<(), String> {
    let mut r = BufReader::with_capacity(256 * 1024, socket);
    loop {
        let body = match frame::read_frame(&mut r) {
            Ok(Some(b)) => b,
            Ok(None) => return Err("the child closed its connection".into()),
            Err(e) => return Err(e.to_string()),
        };
        match Msg::decode(&body).map_err(|e| e.to_string())? {
            m @ Msg::ItemResults { .. } => {
                send(up, &m).map_err(|e| e.to_string())?;
                if r.buffer().is_empty() {
                    flush(up).map_err(|e| e.to_string())?;
                }
            }
            Msg::Done(_) => return Ok(()),
            // Only the master's direct child answers basis queries.
            Msg::BasisReply { .. } => {}
            Msg::Error { message, .. } => return Err(format!("child agent: {message}")),
            other => return Err(format!("unexpected '{}' from a child", other.kind_name())),
        }
    }
}
