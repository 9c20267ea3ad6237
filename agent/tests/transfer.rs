//! Files move master -> remote intact and atomically; orders apply as asked.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use fleetsync_proto::{Attrs, FileEntry, FileKind, Msg, Op, OpKind, Outcome, Role};

fn meta(p: &Path) -> std::fs::Metadata {
    std::fs::symlink_metadata(p).unwrap()
}

#[test]
fn send_order_copies_content_mode_and_mtime() {
    let m = tempfile::tempdir().unwrap();
    let r = tempfile::tempdir().unwrap();
    std::fs::create_dir(m.path().join("d")).unwrap();
    std::fs::create_dir(r.path().join("d")).unwrap();
    let big: Vec<u8> = (0..3_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(m.path().join("d/big"), &big).unwrap();
    std::fs::write(m.path().join("empty"), b"").unwrap();
    std::fs::write(m.path().join("changed"), b"new!").unwrap();
    std::fs::write(r.path().join("changed"), b"old!").unwrap();
    std::fs::set_permissions(
        m.path().join("changed"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    let master = start_agent(m.path());
    let remote = start_agent(r.path());
    let mut c = Client::connect(master.local_addr(), Role::Server);
    let res = c.send_order(
        remote.local_addr(),
        &[b"d/big", b"empty", b"changed", b"missing"],
    );
    assert_eq!(res.len(), 4, "{res:?}");
    for x in &res {
        let want = if x.path == b"missing" {
            Outcome::Failed
        } else {
            Outcome::Ok
        };
        assert_eq!(x.outcome, want, "{x:?}");
    }
    assert_eq!(std::fs::read(r.path().join("d/big")).unwrap(), big);
    assert_eq!(std::fs::read(r.path().join("empty")).unwrap(), b"");
    assert_eq!(std::fs::read(r.path().join("changed")).unwrap(), b"new!");
    for p in ["d/big", "empty", "changed"] {
        let (a, b) = (meta(&m.path().join(p)), meta(&r.path().join(p)));
        assert_eq!(a.mode(), b.mode(), "{p}");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "{p}"
        );
    }
    // No temp files left behind.
    let leftovers: Vec<_> = walk(r.path())
        .into_iter()
        .filter(|p| p.contains(".fleetsync.tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.path().display().to_string());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

fn entry(path: &[u8], size: u64) -> FileEntry {
    FileEntry {
        path: path.to_vec(),
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        inode: 0,
        dev: 0,
        nlink: 1,
        size,
        mtime_sec: 1_000_000,
        mtime_nsec: 0,
        link_target: None,
        rdev: 0,
        digest: None,
    }
}

#[test]
fn atomic_write_leaves_old_content_when_the_stream_is_cut_mid_file() {
    let r = tempfile::tempdir().unwrap();
    std::fs::write(r.path().join("f"), b"old content").unwrap();
    let remote = start_agent(r.path());
    {
        let mut c = Client::connect(remote.local_addr(), Role::Agent);
        c.send(&Msg::FileStart {
            request_id: 1,
            entry: entry(b"f", 2_000_000),
            algorithm: "crc32".into(),
            lock_timeout_ms: None,
            stage: String::new(),
            coding: Default::default(),
            basis: Vec::new(),
            basis_size: 0,
        });
        c.send(&Msg::FileChunk {
            data: vec![b'x'; 1_000_000],
            zstd: false,
        });
        // Connection dropped here, mid-file.
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read(r.path().join("f")).unwrap(), b"old content");
    let names: Vec<_> = walk(r.path());
    assert_eq!(names.len(), 1, "temp file left: {names:?}");
}

#[test]
fn checksum_or_size_mismatch_never_replaces_the_old_file() {
    let r = tempfile::tempdir().unwrap();
    std::fs::write(r.path().join("f"), b"old").unwrap();
    let remote = start_agent(r.path());
    let mut c = Client::connect(remote.local_addr(), Role::Agent);
    for (size, digest, aborted) in [
        (3u64, vec![0, 0, 0, 0], false),
        (4, vec![], false),
        (3, vec![], true),
    ] {
        c.send(&Msg::FileStart {
            request_id: 1,
            entry: entry(b"f", 3),
            algorithm: "crc32".into(),
            lock_timeout_ms: None,
            stage: String::new(),
            coding: Default::default(),
            basis: Vec::new(),
            basis_size: 0,
        });
        c.send(&Msg::FileChunk {
            data: b"new".to_vec(),
            zstd: false,
        });
        c.send(&Msg::FileEnd {
            size,
            digest,
            aborted,
            error: String::new(),
        });
        let Some(Msg::ItemResults { results, .. }) = c.recv() else {
            panic!()
        };
        assert_eq!(results[0].outcome, Outcome::Failed);
    }
    c.send(&Msg::StreamEnd);
    assert!(matches!(c.recv(), Some(Msg::Done(d)) if d.failed == 3));
    assert_eq!(std::fs::read(r.path().join("f")).unwrap(), b"old");
    assert_eq!(walk(r.path()).len(), 1);
}

#[test]
fn apply_orders_mkdir_symlink_hardlink_delete_attrs() {
    let r = tempfile::tempdir().unwrap();
    let root = r.path();
    std::fs::create_dir_all(root.join("gone/deep")).unwrap();
    std::fs::write(root.join("gone/deep/f"), b"x").unwrap();
    std::fs::write(root.join("a"), b"A").unwrap();
    std::fs::write(root.join("b"), b"B").unwrap(); // must become a link to a
    std::fs::write(root.join("c"), b"C").unwrap();
    std::fs::hard_link(root.join("c"), root.join("c2")).unwrap(); // wrong link to break
    std::os::unix::fs::symlink("old-target", root.join("s")).unwrap();
    std::fs::create_dir(root.join("was-dir")).unwrap();
    std::fs::write(root.join("was-dir/x"), b"").unwrap();
    let remote = start_agent(root);
    let mut c = Client::connect(remote.local_addr(), Role::Server);
    let dir_attrs = Attrs {
        mode: Some(0o750),
        owner: None,
        mtime: Some((1_500_000_000, 123)),
    };
    let res = c.apply(vec![
        Op {
            path: b"gone".to_vec(),
            kind: OpKind::Delete { recursive: true },
        },
        Op {
            path: b"new".to_vec(),
            kind: OpKind::Mkdir(dir_attrs),
        },
        Op {
            path: b"new/sub".to_vec(),
            kind: OpKind::Mkdir(Attrs::default()),
        },
        Op {
            path: b"s".to_vec(),
            kind: OpKind::Symlink {
                target: b"new target".to_vec(),
                attrs: Attrs::default(),
            },
        },
        Op {
            path: b"new/link".to_vec(),
            kind: OpKind::Symlink {
                target: b"../a".to_vec(),
                attrs: Attrs::default(),
            },
        },
        Op {
            path: b"was-dir".to_vec(),
            kind: OpKind::Symlink {
                target: b"a".to_vec(),
                attrs: Attrs::default(),
            },
        },
        Op {
            path: b"b".to_vec(),
            kind: OpKind::HardLink {
                existing: b"a".to_vec(),
            },
        },
        Op {
            path: b"c2".to_vec(),
            kind: OpKind::HardLink {
                existing: b"a".to_vec(),
            },
        },
        Op {
            path: b"a".to_vec(),
            kind: OpKind::HardLink {
                existing: b"b".to_vec(),
            },
        },
        Op {
            path: b"c".to_vec(),
            kind: OpKind::SetAttrs(Attrs {
                mode: Some(0o600),
                owner: None,
                mtime: Some((1_234_567_890, 5)),
            }),
        },
        Op {
            path: b"missing".to_vec(),
            kind: OpKind::Delete { recursive: false },
        },
    ]);
    assert!(res.iter().all(|x| x.outcome == Outcome::Ok), "{res:#?}");
    assert!(!root.join("gone").exists());
    let n = meta(&root.join("new"));
    assert!(n.is_dir());
    assert_eq!(n.mode() & 0o7777, 0o750);
    // Set last, after new/sub and new/link were created inside it.
    assert_eq!((n.mtime(), n.mtime_nsec()), (1_500_000_000, 123));
    assert_eq!(
        std::fs::read_link(root.join("s")).unwrap(),
        Path::new("new target")
    );
    assert_eq!(
        std::fs::read_link(root.join("new/link")).unwrap(),
        Path::new("../a")
    );
    assert!(meta(&root.join("was-dir")).file_type().is_symlink());
    let (a, b, c2, cc) = (
        meta(&root.join("a")),
        meta(&root.join("b")),
        meta(&root.join("c2")),
        meta(&root.join("c")),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.ino(), c2.ino());
    assert_ne!(cc.ino(), a.ino());
    assert_eq!(std::fs::read(root.join("c2")).unwrap(), b"A");
    assert_eq!(std::fs::read(root.join("c")).unwrap(), b"C");
    assert_eq!(cc.mode() & 0o7777, 0o600);
    assert_eq!((cc.mtime(), cc.mtime_nsec()), (1_234_567_890, 5));
    let temps: Vec<_> = walk(root)
        .into_iter()
        .filter(|p| p.contains(".fleetsync.tmp."))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
}

#[test]
fn send_order_to_an_unreachable_remote_fails_every_path() {
    let m = tempfile::tempdir().unwrap();
    std::fs::write(m.path().join("f"), b"x").unwrap();
    let master = start_agent(m.path());
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let mut c = Client::connect(master.local_addr(), Role::Server);
    let res = c.send_order(addr, &[b"f", b"g"]);
    assert_eq!(res.len(), 2);
    assert!(res.iter().all(|r| r.outcome == Outcome::Failed));
}

#[test]
fn stale_temp_files_from_a_killed_agent_are_cleaned_when_listing() {
    let r = tempfile::tempdir().unwrap();
    std::fs::write(r.path().join(".fleetsync.tmp.deadbeef"), b"torn").unwrap();
    std::fs::write(r.path().join("keep"), b"k").unwrap();
    let remote = start_agent(r.path());
    let mut c = Client::connect(remote.local_addr(), Role::Server);
    let list = c.list();
    assert!(list.iter().all(|e| !e.path.starts_with(b".fleetsync.tmp.")));
    assert!(!r.path().join(".fleetsync.tmp.deadbeef").exists());
}

#[test]
fn two_send_orders_on_one_connection_run_at_once() {
    let m = tempfile::tempdir().unwrap();
    let r1 = tempfile::tempdir().unwrap();
    let r2 = tempfile::tempdir().unwrap();
    for i in 0..50 {
        std::fs::write(m.path().join(format!("f{i}")), vec![i as u8; 10_000 * i]).unwrap();
    }
    let master = start_agent(m.path());
    let (a1, a2) = (start_agent(r1.path()), start_agent(r2.path()));
    let mut c = Client::connect(master.local_addr(), Role::Server);
    let paths: Vec<Vec<u8>> = (0..50).map(|i| format!("f{i}").into_bytes()).collect();
    for (id, a) in [(101u64, &a1), (102, &a2)] {
        c.send(&Msg::SendOrder {
            request_id: id,
            target: a.local_addr().to_string(),
            algorithm: "crc32".into(),
            paths: paths.clone(),
            lock_timeout_ms: None,
            stage: String::new(),
            transfer: Default::default(),
            bases: Vec::new(),
            sizes: Vec::new(),
            ticket: Vec::new(),
            relays: Vec::new(),
        });
    }
    let mut done = std::collections::HashMap::new();
    let mut ok = std::collections::HashMap::<u64, usize>::new();
    while done.len() < 2 {
        match c.recv().unwrap() {
            Msg::ItemResults {
                request_id,
                results,
            } => {
                assert!(results.iter().all(|r| r.outcome == Outcome::Ok));
                *ok.entry(request_id).or_default() += results.len();
            }
            Msg::Done(d) => {
                done.insert(d.request_id, d);
            }
            Msg::Progress(_) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok[&101], 50);
    assert_eq!(ok[&102], 50);
    assert!(done.values().all(|d| d.ok == 50 && d.failed == 0));
    for r in [&r1, &r2] {
        for i in 0..50 {
            assert_eq!(
                std::fs::read(r.path().join(format!("f{i}"))).unwrap(),
                vec![i as u8; 10_000 * i]
            );
        }
    }
}
