//! The handshake: right token in, wrong token out, token never on the wire.

use std::net::{TcpListener, TcpStream};
use std::thread;

use fleetsync_proto::auth;
use fleetsync_proto::{ProtoError, Role};

fn run(
    server_token: Option<&'static [u8]>,
    client_token: Option<&'static [u8]>,
) -> (
    Result<auth::Peer, ProtoError>,
    Result<auth::Welcomed, ProtoError>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        auth::accept(&mut s, server_token, true)
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let r = auth::connect(&mut c, client_token, Role::Server);
    (h.join().unwrap(), r)
}

#[test]
fn same_token_authenticates_both_ways() {
    let (s, c) = run(Some(b"secret"), Some(b"secret"));
    assert_eq!(s.unwrap().role, Role::Server);
    assert!(c.unwrap().can_chown);
}

#[test]
fn wrong_token_is_refused_and_gets_nothing() {
    let (s, c) = run(Some(b"secret"), Some(b"guess"));
    assert!(matches!(s, Err(ProtoError::AuthFailed(_))));
    // The listener says "failed" (and nothing more); the connector names the cause.
    match c {
        Err(e @ ProtoError::AuthFailed(_)) => {
            assert!(e.to_string().contains("token differs"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let (_, c) = run(Some(b"secret"), None);
    match c {
        Err(e @ ProtoError::AuthFailed(_)) => {
            assert!(e.to_string().contains("requires a token"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn insecure_listener_accepts_anyone_but_a_token_holder_notices() {
    let (s, c) = run(None, None);
    assert!(s.is_ok() && c.is_ok());
    let (_, c) = run(None, Some(b"secret"));
    assert!(matches!(c, Err(ProtoError::AuthFailed(_))));
}

#[test]
fn mac_binds_the_role() {
    let n = auth::nonce();
    let m = auth::mac(b"t", &n, Role::Agent);
    assert!(auth::verify(b"t", &n, Role::Agent, &m));
    assert!(!auth::verify(b"t", &n, Role::Server, &m));
    assert!(!auth::verify(b"u", &n, Role::Agent, &m));
    assert!(!auth::verify(b"t", &n, Role::Agent, &m[..31]));
}
