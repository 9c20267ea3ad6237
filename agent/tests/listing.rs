//! The file list reports what `lstat` says, for every kind of entry.

mod common;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use fleetsync_proto::{FileKind, Role};

fn names(dir: &Path) {
    std::fs::write(dir.join("file"), b"hello").unwrap();
    std::fs::create_dir(dir.join("dir")).unwrap();
    std::fs::write(dir.join("dir/inner with space\nnewline"), b"x").unwrap();
    std::os::unix::fs::symlink("dir/nowhere", dir.join("dangling")).unwrap();
    std::os::unix::fs::symlink("dir", dir.join("dirlink")).unwrap();
    std::fs::hard_link(dir.join("file"), dir.join("hard")).unwrap();
    std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"bad\xffname")), b"").unwrap();
    let fifo = std::ffi::CString::new(dir.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
}

#[test]
fn listing_reports_attrs_for_file_dir_symlink_hardlink() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    names(root);
    let agent = start_agent(root);
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    let list = c.list();
    assert_eq!(list[0].path, b"", "the root comes first");
    let by_path: HashMap<Vec<u8>, _> = list.iter().map(|e| (e.path.clone(), e.clone())).collect();
    assert_eq!(by_path.len(), list.len(), "no duplicates");
    let expected: &[&[u8]] = &[
        b"",
        b"file",
        b"dir",
        b"dir/inner with space\nnewline",
        b"dangling",
        b"dirlink",
        b"hard",
        b"bad\xffname",
        b"fifo",
    ];
    assert_eq!(list.len(), expected.len(), "{list:#?}");
    for p in expected {
        let e = &by_path[*p];
        let full = if p.is_empty() {
            root.to_path_buf()
        } else {
            root.join(std::ffi::OsStr::from_bytes(p))
        };
        let m = std::fs::symlink_metadata(&full).unwrap();
        assert_eq!(e.mode, m.mode() & 0o7777, "{full:?}");
        assert_eq!((e.uid, e.gid), (m.uid(), m.gid()));
        assert_eq!((e.inode, e.dev, e.nlink), (m.ino(), m.dev(), m.nlink()));
        assert_eq!(e.size, m.size());
        assert_eq!(
            (e.mtime_sec, e.mtime_nsec as i64),
            (m.mtime(), m.mtime_nsec())
        );
        let kind = if m.file_type().is_symlink() {
            FileKind::Symlink
        } else if m.is_dir() {
            FileKind::Dir
        } else if m.is_file() {
            FileKind::File
        } else {
            FileKind::Fifo
        };
        assert_eq!(e.kind, kind, "{full:?}");
        if kind == FileKind::Symlink {
            let t = std::fs::read_link(&full).unwrap();
            assert_eq!(e.link_target.as_deref(), Some(t.as_os_str().as_bytes()));
        } else {
            assert_eq!(e.link_target, None);
        }
    }
    assert_eq!(by_path[&b"file"[..]].inode, by_path[&b"hard"[..]].inode);
    assert_eq!(by_path[&b"file"[..]].nlink, 2);
    // Symlinks are not followed: nothing listed beneath "dirlink".
    assert!(!list.iter().any(|e| e.path.starts_with(b"dirlink/")));
    agent.stop();
}

#[test]
fn checksums_match_the_engine_and_report_errors_per_path() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("nine"), b"123456789").unwrap();
    let agent = start_agent(tmp.path());
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    let r = c.checksums(&[b"nine", b"missing"]);
    let nine = r.iter().find(|x| x.path == b"nine").unwrap();
    assert_eq!(nine.digest.as_ref().unwrap(), &vec![0xcb, 0xf4, 0x39, 0x26]);
    assert_eq!(nine.size, 9);
    assert!(r
        .iter()
        .find(|x| x.path == b"missing")
        .unwrap()
        .digest
        .is_err());
}

#[test]
fn classification_prunes_excluded_directories() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("skip")).unwrap();
    std::fs::write(tmp.path().join("skip/a.rs"), b"").unwrap();
    std::fs::write(tmp.path().join("b.rs"), b"").unwrap();
    std::fs::write(tmp.path().join("c.txt"), b"").unwrap();
    let agent = start_agent(tmp.path());
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    c.send(&fleetsync_proto::Msg::ListRequest {
        request_id: 5,
        classification: fleetsync_proto::ClassificationSpec {
            rules: vec![fleetsync_proto::FilterRule {
                exclude: true,
                pattern: "skip/".into(),
            }],
            select: Some(fleetsync_proto::Selector::Ext("rs".into())),
        },
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    });
    let Some(fleetsync_proto::Msg::ListBatch { entries, last, .. }) = c.recv() else {
        panic!()
    };
    assert!(last);
    let paths: Vec<_> = entries.iter().map(|e| e.path.clone()).collect();
    assert_eq!(paths, vec![b"".to_vec(), b"b.rs".to_vec()]);
}

#[test]
fn checksums_of_files_of_every_size_agree_with_a_plain_engine_state() {
    let tmp = tempfile::tempdir().unwrap();
    let sizes = [
        0usize,
        1,
        4095,
        256 * 1024 - 1,
        256 * 1024,
        5 * 1024 * 1024 + 3,
    ];
    for s in sizes {
        let data: Vec<u8> = (0..s).map(|i| (i % 253) as u8).collect();
        std::fs::write(tmp.path().join(format!("f{s}")), &data).unwrap();
    }
    let agent = start_agent(tmp.path());
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    let names: Vec<String> = sizes.iter().map(|s| format!("f{s}")).collect();
    let paths: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
    let results = c.checksums(&paths);
    let registry = fleetsync_engine::Registry::with_builtins();
    for (s, n) in sizes.iter().zip(&names) {
        let data = std::fs::read(tmp.path().join(n)).unwrap();
        let mut crc = registry.get("crc32").unwrap();
        crc.update(&data);
        let r = results.iter().find(|r| r.path == n.as_bytes()).unwrap();
        assert_eq!(r.digest.as_ref().unwrap(), crc.finish().as_bytes(), "{n}");
        assert_eq!(r.size, *s as u64);
    }
}

#[test]
fn regression_cached_checksum_still_sees_new_content_with_same_size_and_mtime() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let f = root.join("f");
    std::fs::write(&f, b"old content").unwrap();
    let old_mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
    // Past the "racy" window, so that the first digest is cached.
    std::thread::sleep(std::time::Duration::from_millis(2300));
    let backend = fleetsync_agent::PosixBackend::new(&root)
        .unwrap()
        .with_checksum_cache_file(tmp.path().join("sums"));
    let agent = fleetsync_agent::Agent::new(
        &root,
        Some(TOKEN.to_vec()),
        Some(std::sync::Arc::new(backend)),
    )
    .unwrap()
    .serve(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    .unwrap();
    let mut c = Client::connect(agent.local_addr(), Role::Server);
    let digest_listed = |c: &mut Client, alg: &str| {
        let list = c.list_with_digests(alg);
        assert!(list.iter().all(|e| e.path == b"f" || e.digest.is_none()));
        list.into_iter().find(|e| e.path == b"f").unwrap().digest
    };
    assert_eq!(digest_listed(&mut c, "crc32"), None, "nothing cached yet");
    let first = c.checksums(&[b"f"]);
    let again = c.checksums(&[b"f"]);
    assert_eq!(first, again);
    // The listing carries the cached digest, in the algorithm asked for only.
    assert_eq!(
        digest_listed(&mut c, "crc32").as_ref(),
        first[0].digest.as_ref().ok()
    );
    assert_eq!(digest_listed(&mut c, "sha256"), None);
    assert_eq!(digest_listed(&mut c, ""), None);
    // Same size, same mtime, new content: the ctime changed, the cache must miss.
    std::fs::write(&f, b"new content").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    assert_eq!(
        digest_listed(&mut c, "crc32"),
        None,
        "a stale digest was listed"
    );
    let after = c.checksums(&[b"f"]);
    assert_ne!(first[0].digest, after[0].digest);
    // Changed just now: "racy", not cached, so not listed either.
    assert_eq!(digest_listed(&mut c, "crc32"), None);
    drop(c);
    agent.stop();
    // The cache was persisted outside the tree.
    assert!(tmp.path().join("sums").exists());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
}
