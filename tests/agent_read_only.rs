//! `fleetsync agent --read-only` (issue 13): it serves lists, checksums and sends, and
//! refuses every write, with real processes on 127.0.0.1.

use std::fs;
use std::net::TcpStream;
use std::path::Path;

use fleetsync_proto::{auth, frame, Msg, Role};

mod support;

use support::{listening, rsync_diff, Token};

/// Every file under `root` with its bytes, sorted: what must not change.
fn snapshot(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            let data = if p.is_file() {
                fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.push((p.strip_prefix(root).unwrap().display().to_string(), data));
        }
    }
    out.sort();
    out
}

fn tree(root: &Path, tag: &str) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/app.conf"), format!("mode = {tag}\n")).unwrap();
    fs::write(root.join("payload.bin"), vec![tag.len() as u8; 300_000]).unwrap();
}

#[test]
fn a_read_only_remote_refuses_the_sync_and_stays_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = (dir.path().join("m"), dir.path().join("r"));
    tree(&m, "new");
    tree(&r, "old-old");
    fs::write(r.join("extra.txt"), "only here\n").unwrap();
    let before = snapshot(&r);
    let token = Token::new();
    let (_ma, maddr) = token.agent(&m);
    let (_ra, raddr) = listening(token.agent_command(&r).arg("--read-only"));
    let (_s, saddr) = token.server();

    let out = token.sync(&saddr, &maddr, &[&raddr]);
    assert_eq!(out.status.code(), Some(1), "the remote fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("read-only"),
        "the error names why: {stderr}"
    );
    assert_eq!(snapshot(&r), before, "a read-only agent changed its tree");

    // A file stream straight to it (as a master agent would open) is refused too.
    let mut s = TcpStream::connect(&raddr).unwrap();
    auth::connect(&mut s, Some(support::TOKEN), Role::Agent).unwrap();
    let reply = frame::read_frame(&mut s).unwrap().expect("an answer");
    match Msg::decode(&reply).unwrap() {
        Msg::Error { message, .. } => assert!(message.contains("read-only"), "{message}"),
        other => panic!("expected an error, got {}", other.kind_name()),
    }
    assert_eq!(snapshot(&r), before);
}

#[test]
fn a_read_only_master_serves_the_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r) = (dir.path().join("m"), dir.path().join("r"));
    tree(&m, "new");
    fs::create_dir_all(&r).unwrap();
    let before = snapshot(&m);
    let token = Token::new();
    let (_ma, maddr) = listening(token.agent_command(&m).arg("--read-only"));
    let (_ra, raddr) = token.agent(&r);
    let (_s, saddr) = token.server();
    let out = token.sync(&saddr, &maddr, &[&raddr]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        rsync_diff(&m, &r),
        "",
        "the remote is not the master's copy"
    );
    assert_eq!(snapshot(&m), before);
}
