//! Authority per order (`--tls`): a remote agent takes file data only from a sender the
//! server authorised for that stream, those paths and that remote.
//!
//! For each `sendOrder` the server makes a [`Ticket`]: the SHA-256 of the master agent's
//! certificate (the sender: the peer of the server's link to it), of the remote agent's
//! certificate (the peer of the server's connection to it), the paths of the order, a
//! random nonce and an expiry; it signs it with its own TLS key ([`sign`]). The master
//! presents it as the first frame (`streamTicket`) of its stream to the remote, which
//! ([`verify`]) checks the signature against the certificate of a server it has a
//! control-plane connection from, the expiry, that the remote named is itself and the
//! sender is the peer of this stream, and that the nonce was never used before
//! ([`ReplayGuard`]); then it accepts `fileStart` only for the ticket's paths. So a
//! compromised agent (which has a valid agent certificate) cannot push into its peers.
//!
//! Wire form (hand-written: a handful of fixed fields and a list; no schema evolution is
//! wanted for a signed blob): `u32 LE body length ‖ body ‖ u16 LE signature scheme ‖
//! signature`, body = `"fleetsync-ticket-v1\n" ‖ u64 expiry (Unix s) ‖ nonce[16] ‖
//! sender[32] ‖ remote[32] ‖ u32 count ‖ (u32 length ‖ path)*`, all integers LE.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"fleetsync-ticket-v1\n";

/// How long a ticket may be presented after the server made it. Only the start of a stream
/// is checked: a long transfer outlives it.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(600);

/// The schemes a ticket may be signed with (those of the keys `fleetsync cert` makes and
/// of usual RSA keys).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// SHA-256 of a certificate (DER): how a ticket names an agent.
pub fn cert_digest(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a ticket authorises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Unix time after which it is refused.
    pub expires: u64,
    /// Random, used once.
    pub nonce: [u8; 16],
    /// SHA-256 of the sender's (master agent's) certificate.
    pub sender: [u8; 32],
    /// SHA-256 of the remote agent's certificate.
    pub remote: [u8; 32],
    /// The paths the sender may write.
    pub paths: Vec<Vec<u8>>,
}

impl Ticket {
    /// A fresh ticket for `paths` from the agent holding `sender_cert` to the one holding
    /// `remote_cert`, valid for [`TICKET_LIFETIME`].
    pub fn new(sender_cert: &[u8], remote_cert: &[u8], paths: Vec<Vec<u8>>) -> Ticket {
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&crate::auth::nonce()[..16]);
        Ticket {
            expires: now_secs() + TICKET_LIFETIME.as_secs(),
            nonce,
            sender: cert_digest(sender_cert),
            remote: cert_digest(remote_cert),
            paths,
        }
    }

    fn body(&self) -> Vec<u8> {
        let len: usize = self.paths.iter().map(|p| 4 + p.len()).sum();
        let mut b = Vec::with_capacity(MAGIC.len() + 8 + 16 + 64 + 4 + len);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.expires.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.sender);
        b.extend_from_slice(&self.remote);
        b.extend_from_slice(&(self.paths.len() as u32).to_le_bytes());
        for p in &self.paths {
            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
            b.extend_from_slice(p);
        }
        b
    }

    fn parse_body(b: &[u8]) -> Result<Ticket, String> {
        let bad = || "malformed ticket".to_string();
        let body = b.strip_prefix(MAGIC).ok_or_else(bad)?;
        let mut pos = 0;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let end = pos + n;
            let h = body.get(pos..end).ok_or_else(bad)?;
            pos = end;
            Ok(h)
        };
        let expires = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad())?);
        let nonce = take(16)?.try_into().map_err(|_| bad())?;
        let sender = take(32)?.try_into().map_err(|_| bad())?;
        let remote = take(32)?.try_into().map_err(|_| bad())?;
        let n = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
        let mut paths = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad())?) as usize;
            paths.push(take(len)?.to_vec());
        }
        let rest = body.len() - pos;
        if rest != 0 {
            return Err(bad());
        }
        Ok(Ticket {
            expires,
            nonce,
            sender,
            remote,
            paths,
        })
    }
}

/// Signs `ticket` with the server's key: the wire form.
pub fn sign(ticket: &Ticket, key: &dyn SigningKey) -> Result<Vec<u8>, String> {
    let signer = key
        .choose_scheme(SCHEMES)
        .ok_or("the server's key cannot sign tickets (no supported scheme)")?;
    let body = ticket.body();
    let sig = signer
        .sign(&body)
        .map_err(|e| format!("signing a ticket: {e}"))?;
    let mut out = Vec::with_capacity(4 + body.len() + 2 + sig.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&u16::from(signer.scheme()).to_le_bytes());
    out.extend_from_slice(&sig);
    Ok(out)
}

/// Checks a ticket's signature against `signers` (the certificates of the servers the
/// agent has control-plane connections from), its expiry, and that it names `me` (our
/// certificate) as the remote and `sender` (the stream's peer certificate) as the sender.
/// Replays are [`ReplayGuard`]'s business.
pub fn verify(
    bytes: &[u8],
    signers: &[CertificateDer<'static>],
    me: &[u8],
    sender: &[u8],
) -> Result<Ticket, String> {
    if bytes.len() < 4 {
        return Err("malformed ticket".into());
    }
    let body_len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    if bytes.len() < 4 + body_len + 2 {
        return Err("malformed ticket".into());
    }
    let body = &bytes[4..4 + body_len];
    let scheme = SignatureScheme::from(u16::from_le_bytes(
        bytes[4 + body_len..4 + body_len + 2]
            .try_into()
            .expect("2 bytes"),
    ));
    let sig = &bytes[4 + body_len + 2..];
    if signers.is_empty() {
        return Err("no server is connected to vouch for the ticket".into());
    }
    let provider = rustls::crypto::ring::default_provider();
    let algs = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .ok_or_else(|| format!("ticket signed with an unsupported scheme {scheme:?}"))?;
    let signed = signers.iter().any(|cert| {
        webpki::EndEntityCert::try_from(cert).is_ok_and(|ee| {
            algs.iter()
                .any(|alg| ee.verify_signature(*alg, body, sig).is_ok())
        })
    });
    if !signed {
        return Err("the ticket's signature is not our server's (forged?)".into());
    }
    let t = Ticket::parse_body(body)?;
    if t.expires < now_secs() {
        return Err("the ticket has expired".into());
    }
    if t.remote != cert_digest(me) {
        return Err("the ticket is for another remote agent".into());
    }
    if t.sender != cert_digest(sender) {
        return Err("the ticket was issued to another sender".into());
    }
    Ok(t)
}

/// Nonces of the tickets already presented (until they expire): a ticket is good for one
/// stream.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<[u8; 16], u64>>,
}

impl ReplayGuard {
    /// Records `t`'s nonce; an error if it was seen already.
    pub fn admit(&self, t: &Ticket) -> Result<(), String> {
        let now = now_secs();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.retain(|_, exp| *exp >= now);
        if seen.insert(t.nonce, t.expires).is_some() {
            return Err("the ticket was used already (a replay)".into());
        }
        Ok(())
    }
}

/// The paths a verified ticket lets a stream write.
pub fn allowed_paths(t: Ticket) -> Arc<HashSet<Vec<u8>>> {
    Arc::new(t.paths.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_and_rejects_trailing_bytes() {
        let t = Ticket::new(b"a", b"b", vec![b"x/y".to_vec(), Vec::new()]);
        let b = t.body();
        assert_eq!(Ticket::parse_body(&b).unwrap(), t);
        let mut longer = b.clone();
        longer.push(0);
        assert!(Ticket::parse_body(&longer).is_err());
        assert!(Ticket::parse_body(&b[..b.len() - 1]).is_err());
    }
}
