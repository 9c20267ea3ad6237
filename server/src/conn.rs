//! One TCP connection of the event loop: its frame decoder, its output buffer, its TLS
//! state (`--tls`: a `rustls` connection driven non-blocking, as in rustls' mio examples)
//! and where its handshake is.

use std::io::{self, Read, Write};
use std::time::Instant;

use fleetsync_proto::tls::rustls;

use fleetsync_proto::frame::{FrameCompressor, FrameDecoder, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use fleetsync_proto::{auth, Msg, Role, TreeIdentity};
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
    /// The job's connection to the master agent for relayed sends (`--fanout`): its
    /// replies name the remote by request id.
    MasterRelay,
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
    /// TLS (`--tls`): `out` is plaintext that goes through it.
    pub(crate) tls: Option<rustls::Connection>,
    /// A TLS listener's connection whose first byte has not come yet (a plaintext client
    /// sends nothing: see `fleetsync_proto::tls::PLAINTEXT_PROBE`).
    pub(crate) probing: bool,
    /// When the connection was made (handshake timeout).
    pub(crate) opened: Instant,
    /// We connect to an agent over a network: ask it for `zstd` frames (frame compression).
    pub(crate) ask_compression: bool,
    /// The agent agreed to compressed frames: its frames may be `zstd` frames.
    pub(crate) inflate: bool,
    /// Compresses our frames to an agent that agreed (`None` without a zstd context).
    pub(crate) zstd: Option<FrameCompressor>,
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
            tls: None,
            probing: false,
            opened: Instant::now(),
            ask_compression: false,
            inflate: false,
            zstd: None,
        }
    }

    /// Puts the connection under TLS (before any byte is exchanged).
    pub(crate) fn with_tls(mut self, tls: rustls::Connection) -> Conn {
        self.probing = matches!(tls, rustls::Connection::Server(_));
        self.tls = Some(tls);
        self
    }

    /// Whether output waits for the socket (plaintext not yet written, or TLS records).
    pub(crate) fn pending_output(&self) -> bool {
        self.out_pos < self.out.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Whether the TLS handshake (if any) is over.
    pub(crate) fn tls_ready(&self) -> bool {
        !self.tls.as_ref().is_some_and(|t| t.is_handshaking())
    }

    /// Reads what the socket has (one read) into the frame decoder, through TLS if on:
    /// the number of bytes read from the socket, 0 at end of stream; `WouldBlock` is
    /// passed on. A TLS failure (a refused certificate, say) is an error whose alert is
    /// queued for the peer (`flush` sends it).
    pub(crate) fn read_some(&mut self) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.dec.read_from(&mut self.stream);
        };
        if self.probing {
            let mut first = [0u8; 1];
            if self.stream.peek(&mut first)? == 0 {
                return Ok(0);
            }
            if first[0] != 0x16 {
                return Err(io::Error::other(format!(
                    "the client does not speak TLS (first byte {:#04x})",
                    first[0]
                )));
            }
            self.probing = false;
        }
        let n = tls.read_tls(&mut self.stream)?;
        let state = tls.process_new_packets().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS: {}", fleetsync_proto::tls::explain(&e)),
            )
        })?;
        let avail = state.plaintext_bytes_to_read();
        if avail > 0 {
            let mut plain = vec![0u8; avail];
            tls.reader().read_exact(&mut plain)?;
            self.dec.push(&plain);
        }
        Ok(n)
    }

    /// Output not written yet, in bytes.
    pub(crate) fn backlog(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Encodes a message at the end of the output.
    pub(crate) fn queue(&mut self, msg: &Msg) {
        let frame = match &mut self.zstd {
            Some(z) => z.encode_frame(&msg.encode()),
            None => msg.to_frame(),
        };
        match frame {
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
        if self.tls.is_some() {
            return self.flush_tls();
        }
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

impl Conn {
    /// [`Conn::flush`] through TLS: plaintext goes into rustls as far as its buffer limit
    /// takes it (so `out` stays the backlog), records go to the socket.
    fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        loop {
            let mut took = 0;
            if self.out_pos < self.out.len() {
                took = tls.writer().write(&self.out[self.out_pos..])?;
                self.out_pos += took;
            }
            if !tls.wants_write() {
                if self.out_pos == self.out.len() {
                    self.out.clear();
                    self.out_pos = 0;
                    return Ok(());
                }
                if took == 0 {
                    // Held by rustls until its handshake is over.
                    return Ok(());
                }
                continue;
            }
            match tls.write_tls(&mut self.stream) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a frame meant for the handshake.
pub(crate) enum Handshake {
    /// The handshake was over already: the frame is a message.
    Over,
    /// A handshake frame; the answer is queued, more is to come.
    Going,
    /// We connected, and the agent welcomed us: the held requests are the caller's to
    /// queue.
    Done {
        /// The agent can apply owners (runs as root).
        can_chown: bool,
        /// Where the agent's tree is.
        tree: TreeIdentity,
        /// The requests queued before the handshake finished, in order.
        held: Vec<Msg>,
    },
}

impl Conn {
    /// Takes a frame through the handshake (`token`: the shared secret, if any). An error
    /// closes the connection.
    pub(crate) fn handshake(
        &mut self,
        body: &[u8],
        token: Option<&[u8]>,
    ) -> Result<Handshake, String> {
        match std::mem::replace(&mut self.hs, Hs::Ready) {
            Hs::Ready => Ok(Handshake::Over),
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
                let answer = match token {
                    Some(t) => {
                        if !auth::verify(t, &n1, role, &mac) || nonce.len() != auth::NONCE_LEN {
                            // Said before the close (which flushes), so that the client can
                            // tell a wrong token from a lost connection.
                            self.queue(&Msg::Error {
                                request_id: 0,
                                message: auth::AUTH_FAILED_MESSAGE.into(),
                            });
                            return Err(auth::AUTH_FAILED_MESSAGE.into());
                        }
                        auth::mac(t, &nonce, Role::Listener)
                    }
                    None => Vec::new(),
                };
                self.dec.set_max(MAX_FRAME);
                self.queue(&Msg::Welcome {
                    mac: answer,
                    can_chown: false,
                    frame_compression: false,
                    tree: TreeIdentity::default(),
                });
                Ok(Handshake::Going)
            }
            Hs::AwaitHello => {
                let msg = Msg::decode(body).map_err(|e| e.to_string())?;
                let Msg::Hello { nonce: n1, .. } = msg else {
                    return Err(format!("expected hello, got {}", msg.kind_name()));
                };
                let n2 = auth::nonce();
                self.hs = Hs::AwaitWelcome(n2);
                self.queue(&auth::auth_message(
                    token,
                    &n1,
                    Role::Server,
                    &n2,
                    self.ask_compression,
                ));
                Ok(Handshake::Going)
            }
            Hs::AwaitWelcome(n2) => {
                let msg = Msg::decode(body).map_err(|e| e.to_string())?;
                let (mac, can_chown, tree, agreed) = match msg {
                    Msg::Welcome {
                        mac,
                        can_chown,
                        frame_compression,
                        tree,
                    } => (mac, can_chown, tree, frame_compression),
                    Msg::Error { message, .. } => {
                        return Err(auth::refusal(token, message).to_string())
                    }
                    other => return Err(format!("expected welcome, got {}", other.kind_name())),
                };
                auth::check_welcome(token, &n2, &mac).map_err(|e| e.to_string())?;
                if agreed && self.ask_compression {
                    self.inflate = true;
                    // Out of memory for a zstd context: plain frames, which the agent takes.
                    self.zstd = FrameCompressor::new().ok();
                }
                self.dec.set_max(MAX_FRAME);
                self.outstanding = self.held.len();
                Ok(Handshake::Done {
                    can_chown,
                    tree,
                    held: std::mem::take(&mut self.held),
                })
            }
        }
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
