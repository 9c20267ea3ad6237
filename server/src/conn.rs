//! One TCP connection of the event loop: its frame decoder, its output buffer and where
//! its handshake is.

use std::io::{self, Write};
use std::time::Instant;

use fleetsync_proto::frame::{FrameDecoder, MAX_HANDSHAKE_FRAME};
use fleetsync_proto::Msg;
use mio::net::TcpStream;
use tracing::warn;

/// Who is at the other end.
#[derive(Debug)]
pub(crate) enum ConnPeer {
    /// A control client, with the job it asked for.
    Control { job: Option<u64> },
    /// An agent working for a job.
    Agent { job: u64, role: AgentRole },
}

/// What an agent connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentRole {
    /// The master agent's connection used for its file list.
    MasterList,
    /// A connection to the master agent dedicated to one remote (checksums, sends).
    MasterLink(usize),
    /// A remote agent.
    Remote(usize),
}

/// Where the handshake is.
#[derive(Debug)]
pub(crate) enum Hs {
    /// We listen: sent hello with this nonce, waiting for auth.
    AwaitAuth([u8; 32]),
    /// We connect: waiting for hello.
    AwaitHello,
    /// We connect: sent auth with this nonce, waiting for welcome.
    AwaitWelcome([u8; 32]),
    Ready,
}

pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) dec: FrameDecoder,
    pub(crate) out: Vec<u8>,
    pub(crate) out_pos: usize,
    pub(crate) hs: Hs,
    pub(crate) peer: ConnPeer,
    pub(crate) want_write: bool,
    /// Requests sent and not yet finished (agent connections).
    pub(crate) outstanding: usize,
    pub(crate) last_activity: Instant,
    /// Requests queued before the handshake finished.
    pub(crate) held: Vec<Msg>,
}

impl Conn {
    /// A fresh connection, before its handshake.
    pub(crate) fn new(stream: TcpStream, hs: Hs, peer: ConnPeer, outstanding: usize) -> Conn {
        Conn {
            stream,
            dec: FrameDecoder::with_max(MAX_HANDSHAKE_FRAME),
            out: Vec::new(),
            out_pos: 0,
            want_write: matches!(hs, Hs::AwaitHello),
            hs,
            peer,
            outstanding,
            last_activity: Instant::now(),
            held: Vec::new(),
        }
    }

    /// Output not written yet, in bytes.
    pub(crate) fn backlog(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Encodes a message at the end of the output.
    pub(crate) fn queue(&mut self, msg: &Msg) {
        match msg.to_frame() {
            Ok(bytes) => {
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                } else if self.out_pos >= self.out.len() / 2 {
                    // Reclaim what was written (a busy connection may never drain).
                    self.out.drain(..self.out_pos);
                    self.out_pos = 0;
                }
                self.out.extend_from_slice(&bytes);
            }
            Err(e) => warn!("cannot encode {}: {e}", msg.kind_name()),
        }
    }

    /// Writes what the socket takes now.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }
}

/// Gives a request the id the connection's job numbers it with.
pub(crate) fn set_request_id(msg: &mut Msg, id: u64) {
    match msg {
        Msg::ListRequest { request_id, .. }
        | Msg::ChecksumRequest { request_id, .. }
        | Msg::SendOrder { request_id, .. }
        | Msg::ApplyRequest { request_id, .. }
        | Msg::ConsistencyRequest { request_id, .. }
        | Msg::BlockBegin { request_id, .. }
        | Msg::BlockCommit { request_id, .. } => *request_id = id,
        _ => {}
    }
}
