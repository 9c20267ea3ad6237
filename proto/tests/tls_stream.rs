//! `tls::Stream` over real sockets: split into a reader and a writer on two threads, two
//! peers writing big data at each other at once (a design holding one lock across a
//! blocking read and a blocking write deadlocks here), every byte arriving intact; and the
//! role checks of the verifiers.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use fleetsync_proto::tls::{server_name, Identity, Stream};
use fleetsync_proto::Role;

/// Writes a CA and one certificate of `role` for 127.0.0.1 into `dir`.
fn identity(dir: &Path, ca: &(rcgen::Certificate, rcgen::KeyPair), role: &str) -> Identity {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![
        rcgen::SanType::URI(format!("fleetsync:role:{role}").try_into().unwrap()),
        rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.0.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    let mut o = std::fs::OpenOptions::new();
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.write(true)
        .create_new(true)
        .open(dir.join("key.pem"))
        .unwrap()
        .write_all(key.serialize_pem().as_bytes())
        .unwrap();
    Identity::load(dir).unwrap()
}

fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    (p.self_signed(&key).unwrap(), key)
}

/// A connected pair: (listener side, connector side).
fn pair(listen: &Identity, accept: &[Role], dial: &Identity, expect: &[Role]) -> (Stream, Stream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let sc = listen.server_config(accept).unwrap();
    let t = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Stream::accept(s, &sc, Duration::from_secs(30))
    });
    let cc = dial.client_config(expect).unwrap();
    let c = Stream::connect(
        TcpStream::connect(&addr).unwrap(),
        &cc,
        server_name(&addr).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    (t.join().unwrap().unwrap(), c)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// One side: a thread writes `out` in 1 MiB writes while this one reads `expect_len`
/// bytes; returns what was read.
fn both_ways(s: Stream, out: Vec<u8>, expect_len: usize) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for c in out.chunks(1 << 20) {
            w.write_all(c).unwrap();
        }
        w.flush().unwrap();
    });
    let mut r = s;
    let mut got = vec![0u8; expect_len];
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    got
}

#[test]
fn two_peers_writing_big_data_at_each_other_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let agent_a = identity(&dir.path().join("a"), &ca, "agent");
    let agent_b = identity(&dir.path().join("b"), &ca, "agent");
    let (ls, cs) = pair(&agent_a, &[Role::Agent], &agent_b, &[Role::Agent]);
    assert_eq!(ls.peer_role(), Some(Role::Agent));
    assert_eq!(cs.peer_role(), Some(Role::Agent));
    // Far more than both sockets' buffers: each writer blocks until the other side reads.
    const N: usize = 48 << 20;
    let (a_out, b_out) = (pattern(1, N), pattern(2, N));
    let (a_exp, b_exp) = (b_out.clone(), a_out.clone());
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    thread::spawn(move || tx.send(("listener", both_ways(ls, a_out, N))).unwrap());
    thread::spawn(move || tx2.send(("connector", both_ways(cs, b_out, N))).unwrap());
    for _ in 0..2 {
        // A generous bound: a deadlock never ends, a working pair takes a few seconds.
        let (who, got) = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("deadlock: both peers stuck writing");
        let expected = if who == "listener" { &a_exp } else { &b_exp };
        assert!(got == *expected, "{who} read other bytes than were sent");
    }
}

#[test]
fn a_clean_close_reads_as_end_of_stream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let server = identity(&dir.path().join("s"), &ca, "server");
    let agent = identity(&dir.path().join("a"), &ca, "agent");
    let (mut ls, cs) = pair(&agent, &[Role::Server], &server, &[Role::Agent]);
    let mut w = cs.try_clone().unwrap();
    w.write_all(b"last words").unwrap();
    drop(w);
    cs.shutdown(std::net::Shutdown::Both).unwrap();
    drop(cs);
    let mut got = Vec::new();
    ls.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
}

#[test]
fn roles_are_checked_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let control = identity(&dir.path().join("c"), &ca, "control");
    let agent = identity(&dir.path().join("a"), &ca, "agent");
    // An agent listener that accepts only servers and agents, dialled with a control cert.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let sc = agent.server_config(&[Role::Server, Role::Agent]).unwrap();
    let t = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Stream::accept(s, &sc, Duration::from_secs(30)).map(|_| ())
    });
    let cc = control.client_config(&[Role::Agent]).unwrap();
    let mut c = Stream::connect(
        TcpStream::connect(&addr).unwrap(),
        &cc,
        server_name(&addr).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    let listener_err = t.join().unwrap().unwrap_err().to_string();
    assert!(
        listener_err.contains("role control, expected server or agent"),
        "{listener_err}"
    );
    // TLS 1.3: the connector learns of the refusal on its first read.
    let mut b = [0u8; 1];
    let e = c.read(&mut b).unwrap_err().to_string();
    assert!(e.contains("refused our certificate"), "{e}");
    // A connector expecting a server refuses an agent.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let sc = agent.server_config(&[Role::Control]).unwrap();
    let t = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        Stream::accept(s, &sc, Duration::from_secs(30)).map(|_| ())
    });
    let cc = control.client_config(&[Role::Server]).unwrap();
    let e = Stream::connect(
        TcpStream::connect(&addr).unwrap(),
        &cc,
        server_name(&addr).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has role agent, expected server"), "{e}");
    assert!(t.join().unwrap().is_err());
}
