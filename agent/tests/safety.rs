//! No path from a message escapes the root; bad tokens and bad frames get nothing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use fleetsync_proto::{auth, frame, Attrs, Msg, Op, OpKind, Outcome, Role};

/// A root with a symlink `link -> ../outside`, and `outside/secret`.
fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"secret").unwrap();
    std::fs::write(root.join("inside"), b"inside").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("link")).unwrap();
    (tmp, root, outside)
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let data = if m.is_file() {
                std::fs::read(e.path()).unwrap()
            } else {
                vec![]
            };
            (e.file_name().to_string_lossy().into_owned(), data, m.mode())
        })
        .collect();
    v.sort();
    v
}

const ESCAPES: &[&[u8]] = &[
    b"../outside/secret",
    b"/etc/passwd",
    b"link/secret",
    b"link/../inside",
    b"a//b",
    b"inside\0x",
    b"./inside",
];

#[test]
fn path_escape_attempts_are_rejected_and_nothing_outside_is_touched() {
    let (tmp, root, outside) = setup();
    let before = snapshot(&outside);
    let agent = start_agent(&root);
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    let attrs = Attrs {
        mode: Some(0o777),
        owner: None,
        mtime: Some((1, 0)),
    };
    let mut ops = Vec::new();
    for p in ESCAPES {
        ops.push(Op {
            path: p.to_vec(),
            kind: OpKind::Delete { recursive: true },
        });
        ops.push(Op {
            path: p.to_vec(),
            kind: OpKind::SetAttrs(attrs),
        });
        ops.push(Op {
            path: p.to_vec(),
            kind: OpKind::Symlink {
                target: b"/etc".to_vec(),
                attrs: Attrs::default(),
            },
        });
        ops.push(Op {
            path: [&b"link/new"[..]].concat(),
            kind: OpKind::HardLink {
                existing: p.to_vec(),
            },
        });
    }
    ops.push(Op {
        path: b"link/newdir".to_vec(),
        kind: OpKind::Mkdir(attrs),
    });
    let results = c.apply(ops);
    for r in &results {
        assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    }
    let sums = c.checksums(ESCAPES);
    assert!(sums.iter().all(|s| s.digest.is_err()), "{sums:?}");

    // A send order cannot read outside either (the target is this same agent).
    let mut paths: Vec<&[u8]> = ESCAPES.to_vec();
    paths.push(b"link");
    let sent = c.send_order(agent.local_addr(), &paths);
    assert_eq!(sent.len(), paths.len());
    assert!(
        sent.iter().all(|r| r.outcome == Outcome::Failed),
        "{sent:?}"
    );

    assert_eq!(snapshot(&outside), before, "outside the root changed");
    assert_eq!(std::fs::read(root.join("inside")).unwrap(), b"inside");
    assert!(std::fs::symlink_metadata(root.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    drop(tmp);
}

#[test]
fn received_file_under_a_symlinked_directory_is_refused() {
    let (_tmp, root, outside) = setup();
    let before = snapshot(&outside);
    let agent = start_agent(&root);
    let mut c = Client::connect(agent.local_addr(), Role::Agent);
    let data = b"evil";
    let mut entry = fleetsync_proto::FileEntry {
        path: b"link/secret".to_vec(),
        kind: fleetsync_proto::FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        inode: 0,
        dev: 0,
        nlink: 1,
        size: 4,
        mtime_sec: 0,
        mtime_nsec: 0,
        link_target: None,
        rdev: 0,
        digest: None,
    };
    let mut crc = fleetsync_engine::Registry::with_builtins()
        .get("crc32")
        .unwrap();
    crc.update(data);
    for p in ESCAPES.iter().chain([&&b"link/secret"[..]]) {
        entry.path = p.to_vec();
        c.send(&Msg::FileStart {
            request_id: 1,
            entry: entry.clone(),
            algorithm: "crc32".into(),
            lock_timeout_ms: None,
            stage: String::new(),
            coding: Default::default(),
            basis: Vec::new(),
            basis_size: 0,
        });
        c.send(&Msg::FileChunk {
            data: data.to_vec(),
            zstd: false,
        });
        c.send(&Msg::FileEnd {
            size: 4,
            digest: crc.finish().as_bytes().to_vec(),
            aborted: false,
            error: String::new(),
        });
        match c.recv() {
            Some(Msg::ItemResults { results, .. }) => {
                assert_eq!(results[0].outcome, Outcome::Failed, "{p:?}")
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(snapshot(&outside), before);
}

#[test]
fn bad_token_gets_the_connection_closed_and_nothing_else() {
    let (_tmp, root, _) = setup();
    let agent = start_agent(&root);
    let mut s = TcpStream::connect(agent.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let err = auth::connect(&mut s, Some(b"wrong"), Role::Server).unwrap_err();
    assert!(
        matches!(err, fleetsync_proto::ProtoError::AuthFailed(_)),
        "{err}"
    );
    // Whatever we send now, nothing comes back: the socket is closed.
    let _ = frame::write_frame(
        &mut s,
        &Msg::ListRequest {
            request_id: 1,
            classification: Default::default(),
            batch_size: 0,
            sweep_partials: false,
            cached_digests: String::new(),
        }
        .encode(),
    );
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty(), "leaked {} bytes", buf.len());
}

#[test]
fn skipping_the_handshake_gets_nothing() {
    let (_tmp, root, _) = setup();
    let agent = start_agent(&root);
    let mut s = TcpStream::connect(agent.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Read the hello, then send a request instead of auth.
    let hello = frame::read_frame(&mut s).unwrap().unwrap();
    assert!(matches!(Msg::decode(&hello).unwrap(), Msg::Hello { .. }));
    let _ = frame::write_frame(
        &mut s,
        &Msg::ListRequest {
            request_id: 1,
            classification: Default::default(),
            batch_size: 0,
            sweep_partials: false,
            cached_digests: String::new(),
        }
        .encode(),
    );
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
}

#[test]
fn malformed_and_oversize_frames_close_only_that_connection() {
    let (_tmp, root, _) = setup();
    let agent = start_agent(&root);
    for garbage in [
        vec![8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        (frame::MAX_FRAME as u32 + 1).to_le_bytes().to_vec(),
        vec![0xff; 64],
    ] {
        let mut c = Client::connect(agent.local_addr(), Role::Server);
        c.w.write_all(&garbage).unwrap();
        c.w.flush().unwrap();
        let mut rest = Vec::new();
        let _ = c.r.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    // The agent goes on.
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    assert!(!c.list().is_empty());
}
