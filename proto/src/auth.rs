//! Challenge-response authentication with a shared token.
//!
//! 1. The listener sends `hello { nonce: N1 }`.
//! 2. The connector answers `auth { role, mac: HMAC-SHA256(token, N1 ‖ role), nonce: N2 }`.
//! 3. The listener checks the mac (constant time); on failure it answers
//!    `error { request_id: 0, message: "authentication failed" }` (nothing more: not
//!    which check failed) and closes the connection, so that the connector can say
//!    that the tokens differ rather than "connection closed". Otherwise it answers
//!    `welcome { mac: HMAC-SHA256(token, N2 ‖ "listener") }`, which the connector checks.
//!
//! The token never travels. The pure functions ([`nonce`], [`mac`], [`verify`])
//! serve event loops; [`accept`] and [`connect`] run the whole exchange on a
//! blocking stream.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::{encode_frame, read_frame_limited, MAX_HANDSHAKE_FRAME};
use crate::{Msg, ProtoError, Role, TreeIdentity};

/// Protocol version sent in `hello` and `auth`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The whole message of the listener's `error` frame when the connector fails
/// authentication (the same for every reason, so that it tells a prober nothing).
pub const AUTH_FAILED_MESSAGE: &str = "authentication failed";

/// Length of a nonce in bytes.
pub const NONCE_LEN: usize = 32;

/// A fresh random nonce from the OS.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut n).expect("the OS random number generator failed");
    n
}

/// HMAC-SHA256(token, nonce ‖ role name).
pub fn mac(token: &[u8], nonce: &[u8], role: Role) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(nonce);
    m.update(role.name().as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Checks `tag` against HMAC-SHA256(token, nonce ‖ role name) in constant time.
pub fn verify(token: &[u8], nonce: &[u8], role: Role, tag: &[u8]) -> bool {
    let mut m = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(nonce);
    m.update(role.name().as_bytes());
    m.verify_slice(tag).is_ok()
}

/// What the listener learned about an authenticated connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The role the connector claimed (and proved with the token).
    pub role: Role,
    /// Both sides take `zstd` frames on this connection (the connector asked, the listener
    /// agreed): see [`crate::frame::FrameCompressor`].
    pub frame_compression: bool,
}

/// Runs the listener side on a blocking stream. `token = None` accepts any
/// connector (insecure mode). On `Err` the caller must just close the stream.
///
/// `can_chown` is told to the connector in `welcome`.
pub fn accept<S: Read + Write>(
    stream: &mut S,
    token: Option<&[u8]>,
    can_chown: bool,
) -> Result<Peer, ProtoError> {
    accept_as(stream, token, can_chown, &TreeIdentity::default(), false)
}

/// [`accept`] by an agent, which tells the connector where its tree is (`tree`), and
/// agrees to `zstd` frames if the connector asks and `frame_compression` allows.
pub fn accept_as<S: Read + Write>(
    stream: &mut S,
    token: Option<&[u8]>,
    can_chown: bool,
    tree: &TreeIdentity,
    frame_compression: bool,
) -> Result<Peer, ProtoError> {
    let n1 = nonce();
    let speaks_tls =
        ProtoError::AuthFailed("the connector speaks TLS, and this listener has no --tls");
    let hello = send(
        stream,
        &Msg::Hello {
            protocol: PROTOCOL_VERSION,
            nonce: n1.to_vec(),
        },
    );
    let first = read_frame_limited(stream, MAX_HANDSHAKE_FRAME);
    if let Err(e) = hello {
        // A TLS connector closes as soon as it has our plaintext hello, maybe before all of
        // it was written: what it sent first still tells why.
        return Err(match first {
            Err(ProtoError::FrameTooLarge { len, .. }) if looks_like_tls(len) => speaks_tls,
            _ => e,
        });
    }
    let body = match first {
        Ok(Some(body)) => body,
        Ok(None) => return Err(ProtoError::Truncated),
        Err(ProtoError::FrameTooLarge { len, .. }) if looks_like_tls(len) => {
            return Err(speaks_tls)
        }
        Err(e) => return Err(e),
    };
    let (role, tag, n2, asked) = match Msg::decode(&body)? {
        Msg::Auth {
            role,
            mac,
            nonce,
            frame_compression,
            ..
        } => (role, mac, nonce, frame_compression),
        other => {
            return Err(ProtoError::Unexpected {
                expected: "auth",
                got: other.kind_name(),
            })
        }
    };
    let answer = match check_auth(token, &n1, role, &tag, &n2) {
        Ok(answer) => answer,
        Err(e) => {
            // Best effort: the connector may be gone already; the caller closes anyway.
            let _ = send(
                stream,
                &Msg::Error {
                    request_id: 0,
                    message: AUTH_FAILED_MESSAGE.into(),
                },
            );
            return Err(e);
        }
    };
    send(
        stream,
        &Msg::Welcome {
            mac: answer,
            can_chown,
            frame_compression: asked && frame_compression,
            tree: tree.clone(),
        },
    )?;
    Ok(Peer {
        role,
        frame_compression: asked && frame_compression,
    })
}

/// The listener's checks of the connector's `auth`; `Ok` holds the `welcome` mac.
fn check_auth(
    token: Option<&[u8]>,
    n1: &[u8],
    role: Role,
    tag: &[u8],
    n2: &[u8],
) -> Result<Vec<u8>, ProtoError> {
    if role == Role::Listener {
        return Err(ProtoError::AuthFailed(
            "connector claimed the listener role",
        ));
    }
    match token {
        Some(token) => {
            if !verify(token, n1, role, tag) {
                return Err(ProtoError::AuthFailed("wrong token"));
            }
            if n2.len() != NONCE_LEN {
                return Err(ProtoError::AuthFailed("bad nonce"));
            }
            Ok(mac(token, n2, Role::Listener))
        }
        None => Ok(Vec::new()),
    }
}

/// What the connector learned about the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    /// The listener (an agent) will apply owner and group.
    pub can_chown: bool,
    /// Where its tree is (empty: not told).
    pub tree: TreeIdentity,
    /// The listener agreed to `zstd` frames (only ever when the connector asked).
    pub frame_compression: bool,
}

/// Runs the connector side on a blocking stream. `token = None` only works
/// against an insecure listener.
pub fn connect<S: Read + Write>(
    stream: &mut S,
    token: Option<&[u8]>,
    role: Role,
) -> Result<Welcomed, ProtoError> {
    connect_with(stream, token, role, false)
}

/// [`connect`], asking for `zstd` frames when `frame_compression` is set.
pub fn connect_with<S: Read + Write>(
    stream: &mut S,
    token: Option<&[u8]>,
    role: Role,
    frame_compression: bool,
) -> Result<Welcomed, ProtoError> {
    let body = read_frame_limited(stream, MAX_HANDSHAKE_FRAME)?.ok_or(ProtoError::Truncated)?;
    let n1 = match Msg::decode(&body)? {
        Msg::Hello { nonce, .. } => nonce,
        // A TLS listener tells a plaintext connector so (`tls::TLS_REQUIRED_MESSAGE`).
        Msg::Error { message, .. } => return Err(ProtoError::Remote(message)),
        other => {
            return Err(ProtoError::Unexpected {
                expected: "hello",
                got: other.kind_name(),
            })
        }
    };
    let n2 = nonce();
    send(
        stream,
        &auth_message(token, &n1, role, &n2, frame_compression),
    )?;
    let body = read_frame_limited(stream, MAX_HANDSHAKE_FRAME)?.ok_or(ProtoError::AuthFailed(
        "the listener closed the connection (wrong token?)",
    ))?;
    match Msg::decode(&body)? {
        Msg::Welcome {
            mac: tag,
            can_chown,
            frame_compression: agreed,
            tree,
        } => {
            check_welcome(token, &n2, &tag)?;
            Ok(Welcomed {
                can_chown,
                tree,
                frame_compression: agreed && frame_compression,
            })
        }
        Msg::Error { message, .. } => Err(refusal(token, message)),
        other => Err(ProtoError::Unexpected {
            expected: "welcome",
            got: other.kind_name(),
        }),
    }
}

/// The connector's `auth` answer to the listener's nonce `n1`, carrying our
/// own challenge `n2` and whether we ask for `zstd` frames (pure: for event loops).
pub fn auth_message(
    token: Option<&[u8]>,
    n1: &[u8],
    role: Role,
    n2: &[u8],
    frame_compression: bool,
) -> Msg {
    Msg::Auth {
        protocol: PROTOCOL_VERSION,
        role,
        mac: token.map(|t| mac(t, n1, role)).unwrap_or_default(),
        nonce: n2.to_vec(),
        frame_compression,
    }
}

/// What the listener's `error` answer to our `auth` means (pure: for event loops): its
/// [`AUTH_FAILED_MESSAGE`] becomes [`ProtoError::AuthFailed`] saying that our token
/// (`token`; `None`: we sent none) is not the listener's; any other message is
/// [`ProtoError::Remote`].
pub fn refusal(token: Option<&[u8]>, message: String) -> ProtoError {
    if message != AUTH_FAILED_MESSAGE {
        return ProtoError::Remote(message);
    }
    ProtoError::AuthFailed(match token {
        Some(_) => "the listener refused our token (its token differs)",
        None => "the listener requires a token, and we have none",
    })
}

/// Checks the listener's `welcome` mac over our challenge `n2` (pure: for event loops).
pub fn check_welcome(token: Option<&[u8]>, n2: &[u8], tag: &[u8]) -> Result<(), ProtoError> {
    match token {
        Some(t) if !verify(t, n2, Role::Listener, tag) => Err(ProtoError::AuthFailed(
            "the listener does not know the token",
        )),
        _ => Ok(()),
    }
}

/// Whether a frame length prefix is the start of a TLS record (handshake content type
/// 0x16, version 0x0301 or 0x0303): a TLS ClientHello sent to a plaintext listener.
fn looks_like_tls(len: u64) -> bool {
    matches!(len & 0x00ff_ffff, 0x01_0316 | 0x03_0316)
}

/// One handshake frame, in one write: a peer that closes once it has read it then cannot
/// break our writing it midway.
fn send<W: Write>(w: &mut W, msg: &Msg) -> Result<(), ProtoError> {
    w.write_all(&encode_frame(&msg.encode())?)?;
    w.flush()?;
    Ok(())
}
