//! Malformed input closes that one connection and nothing else (issue 4,
//! Safety): raw garbage, oversize length prefixes, truncated frames and
//! undecodable bodies, sent to a real agent and a real server — before and
//! after the handshake, and by a peer agent the server or the master agent
//! connected to. Afterwards each process still serves a proper sync.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetsync_proto::{auth, frame, Msg, Role};
use support::{rsync_diff, Token, TOKEN};

fn populate(root: &Path) {
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(root.join("dir/big.bin"), vec![7u8; 3 << 20]).unwrap();
    for i in 0..20 {
        std::fs::write(root.join(format!("dir/f{i}")), format!("file {i}")).unwrap();
    }
}

/// Frames a misbehaving peer sends. `needs_eof`: the peer must hang up for
/// the listener to see the frame is truncated.
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, bool)> {
    let mut garbage_body = vec![16, 0, 0, 0];
    garbage_body.extend_from_slice(&[0xff; 16]);
    vec![
        ("raw text", b"GET / HTTP/1.0\r\n\r\n".to_vec(), false),
        (
            "oversize length prefix",
            vec![0xff, 0xff, 0xff, 0x7f, 1, 2, 3],
            false,
        ),
        // 16 MiB + 1: one byte over the maximum.
        (
            "length prefix of MAX_FRAME + 1",
            ((16u32 << 20) + 1).to_le_bytes().to_vec(),
            false,
        ),
        ("undecodable body", garbage_body, false),
        ("empty frame", vec![0, 0, 0, 0], false),
        (
            "segment table claiming 4 billion segments",
            vec![8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
            false,
        ),
        ("truncated frame", vec![64, 0, 0, 0, 1, 2, 3], true),
        ("truncated length prefix", vec![64, 0], true),
    ]
}

/// Reads until the listener closes; fails if it keeps the connection open.
fn assert_closed(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: the connection was not closed ({e})"),
    }
}

/// Connects, optionally authenticates as `role`, sends `bytes`, and checks
/// the listener hangs up.
fn abuse(addr: &str, role: Option<Role>, what: &str, bytes: &[u8], needs_eof: bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if let Some(role) = role {
        auth::connect(&mut s, Some(TOKEN), role).unwrap();
    }
    // The listener may hang up before reading everything.
    let _ = s.write_all(bytes);
    if needs_eof {
        let _ = s.shutdown(Shutdown::Write);
    }
    assert_closed(&mut s, &format!("{what} ({role:?})"));
}

fn send(s: &mut TcpStream, m: &Msg) {
    let f = m.to_frame().unwrap();
    s.write_all(&f).unwrap();
}

/// A frame that is fine before the handshake size limit applies and not
/// after: the handshake limit is 4 KiB.
fn over_handshake_limit() -> Vec<u8> {
    (8u32 << 10).to_le_bytes().to_vec()
}

#[test]
fn malformed_frames_close_one_connection_and_agent_and_server_keep_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("master"), tmp.path().join("remote"));
    populate(&m);
    std::fs::create_dir(&r).unwrap();
    let token = Token::new();
    let (mut master, master_addr) = token.agent(&m);
    let (mut remote, remote_addr) = token.agent(&r);
    let (mut server, server_addr) = token.server();

    // A peer that sent half a frame and went quiet must not hold anything up.
    let mut stalled = Vec::new();
    for (addr, role) in [
        (&remote_addr, Some(Role::Server)),
        (&remote_addr, Some(Role::Agent)),
        (&remote_addr, None),
        (&server_addr, Some(Role::Control)),
        (&server_addr, None),
    ] {
        let mut s = TcpStream::connect(addr).unwrap();
        if let Some(role) = role {
            auth::connect(&mut s, Some(TOKEN), role).unwrap();
        }
        s.write_all(&[100, 0, 0, 0, 1, 2]).unwrap();
        stalled.push(s);
    }

    for (what, bytes, needs_eof) in bad_inputs() {
        // Before the handshake.
        abuse(&remote_addr, None, what, &bytes, needs_eof);
        abuse(&server_addr, None, what, &bytes, needs_eof);
        // After it: the server's requests to an agent, a master agent's
        // file stream, a control client's requests.
        abuse(&remote_addr, Some(Role::Server), what, &bytes, needs_eof);
        abuse(&remote_addr, Some(Role::Agent), what, &bytes, needs_eof);
        abuse(&server_addr, Some(Role::Control), what, &bytes, needs_eof);
    }
    // The handshake has its own, smaller limit.
    abuse(
        &remote_addr,
        None,
        "frame over the handshake limit",
        &over_handshake_limit(),
        false,
    );
    abuse(
        &server_addr,
        None,
        "frame over the handshake limit",
        &over_handshake_limit(),
        false,
    );

    // Well-formed messages the peer has no business sending.
    let chunk = Msg::FileChunk {
        data: vec![1; 10],
        zstd: false,
    };
    let mut s = TcpStream::connect(&remote_addr).unwrap();
    auth::connect(&mut s, Some(TOKEN), Role::Agent).unwrap();
    send(&mut s, &chunk);
    assert_closed(&mut s, "fileChunk outside a file");
    let mut s = TcpStream::connect(&server_addr).unwrap();
    auth::connect(&mut s, Some(TOKEN), Role::Control).unwrap();
    send(&mut s, &chunk);
    assert_closed(&mut s, "fileChunk to the server");

    // Many at once.
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let addr = if i % 2 == 0 {
                remote_addr.clone()
            } else {
                server_addr.clone()
            };
            std::thread::spawn(move || {
                abuse(&addr, None, "parallel garbage", b"\xff\xff\xff\xff", false)
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }

    assert!(
        master.alive() && remote.alive() && server.alive(),
        "a process died"
    );
    let out = token.sync(&server_addr, &master_addr, &[&remote_addr]);
    assert_eq!(out.status.code(), Some(0));
    let diff = rsync_diff(&m, &r);
    assert!(diff.is_empty(), "remote differs:\n{diff}");
    drop(stalled);
}

/// How a [`SabotageProxy`] misbehaves once authenticated.
#[derive(Clone, Copy, Debug)]
enum Sabotage {
    /// Connections from the server: answer the first request with `bytes`.
    TowardServer,
    /// Connections from the master agent: answer the file stream with `bytes`.
    TowardMaster,
}

/// An "agent" in front of a real one: it authenticates its peers itself,
/// relays the connections it leaves alone to the real agent, and answers
/// the sabotaged ones with malformed bytes.
struct SabotageProxy {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl SabotageProxy {
    fn start(real: String, how: Sabotage, bytes: Vec<u8>, hang_up: bool) -> SabotageProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                let (real, bytes) = (real.clone(), bytes.clone());
                std::thread::spawn(move || {
                    let Ok(peer) = auth::accept(&mut s, Some(TOKEN), false) else {
                        return;
                    };
                    let sabotaged = matches!(
                        (how, peer.role),
                        (Sabotage::TowardServer, Role::Server)
                            | (Sabotage::TowardMaster, Role::Agent)
                    );
                    if sabotaged {
                        // Wait for the peer's first frame, then answer garbage.
                        let _ = frame::read_frame(&mut s);
                        let _ = s.write_all(&bytes);
                        if hang_up {
                            let _ = s.shutdown(Shutdown::Both);
                        } else {
                            // Keep reading so the peer is not stopped by a full buffer.
                            let _ = std::io::copy(&mut s, &mut std::io::sink());
                        }
                        return;
                    }
                    let mut up = TcpStream::connect(&real).unwrap();
                    auth::connect(&mut up, Some(TOKEN), peer.role).unwrap();
                    let (mut s2, mut up2) = (s.try_clone().unwrap(), up.try_clone().unwrap());
                    let t = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut up2, &mut s2);
                        let _ = s2.shutdown(Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut s, &mut up);
                    let _ = up.shutdown(Shutdown::Write);
                    let _ = t.join();
                });
            }
        });
        SabotageProxy { addr, stop }
    }
}

impl Drop for SabotageProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// A remote agent (or something posing as one) that answers with malformed
/// frames fails its own pair only; the server and the master agent go on, and
/// the other remote of the same sync is synced.
#[test]
fn malformed_frames_from_an_agent_fail_only_that_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("master");
    populate(&m);
    let token = Token::new();
    let (mut master, master_addr) = token.agent(&m);
    let (mut server, server_addr) = token.server();
    let mut cases = Vec::new();
    for how in [Sabotage::TowardServer, Sabotage::TowardMaster] {
        for (what, bytes, needs_eof) in bad_inputs() {
            cases.push((how, what, bytes, needs_eof));
        }
    }
    for (k, (how, what, bytes, hang_up)) in cases.into_iter().enumerate() {
        let good = tmp.path().join(format!("good{k}"));
        let bad = tmp.path().join(format!("bad{k}"));
        std::fs::create_dir(&good).unwrap();
        std::fs::create_dir(&bad).unwrap();
        let (_g, good_addr) = token.agent(&good);
        let (mut b, bad_addr) = token.agent(&bad);
        let proxy = SabotageProxy::start(bad_addr.clone(), how, bytes, hang_up);
        eprintln!("case {k}: {how:?}, {what}");
        let mut cmd = token.sync_command(&server_addr, &master_addr, &[&good_addr, &proxy.addr]);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{how:?}, {what}: the sync hung"));
        assert_eq!(out.status.code(), Some(1), "{how:?}, {what}: {out:?}");
        let diff = rsync_diff(&m, &good);
        assert!(
            diff.is_empty(),
            "{how:?}, {what}: the good remote differs:\n{diff}"
        );
        assert!(
            master.alive() && server.alive() && b.alive(),
            "{how:?}, {what}: a process died"
        );
        // Without the saboteur, the same remote syncs.
        drop(proxy);
        let out = token.sync(&server_addr, &master_addr, &[&bad_addr]);
        assert_eq!(out.status.code(), Some(0), "{how:?}, {what}");
        assert!(rsync_diff(&m, &bad).is_empty());
    }
}

/// Runs `cmd`, killing it after `limit`; `None` if it had to be killed.
fn run_with_timeout(
    cmd: &mut std::process::Command,
    limit: Duration,
) -> Option<std::process::Output> {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            eprintln!(
                "killed hung sync; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
