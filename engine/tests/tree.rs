//! `hash_tree`: what a user relies on when checksumming a whole directory.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fleetsync_engine::{hash_file, hash_tree, AlgorithmInfo, HashOptions, Registry};

fn algs() -> Vec<AlgorithmInfo> {
    let r = Registry::with_builtins();
    vec![r.info("crc32").unwrap(), r.info("sha256").unwrap()]
}

fn write(root: &Path, rel: &str, data: &[u8]) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, data).unwrap();
    p
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

#[test]
fn entries_are_sorted_by_path_bytes_and_hashed_like_single_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for rel in ["b/z", "a.txt", "a/b", "a/a/deep", "B", "b/y", "a-b"] {
        write(root, rel, rel.as_bytes());
    }
    write(root, "big", &vec![7u8; 300_000]);
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    let opts = HashOptions::default();
    let tree = hash_tree(root, &algs(), &opts).unwrap();
    let paths: Vec<&[u8]> = tree
        .entries
        .iter()
        .map(|e| e.path.as_os_str().as_bytes())
        .collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    assert_eq!(tree.entries.len(), 8);
    assert!(tree.skipped.is_empty());
    for e in &tree.entries {
        assert!(e.path.starts_with(root), "{}", e.path.display());
        let got = e.result.as_ref().unwrap();
        let want = hash_file(&e.path, &algs(), &opts).unwrap();
        assert_eq!(got.digests, want.digests, "{}", e.path.display());
        assert_eq!(got.size, std::fs::metadata(&e.path).unwrap().len());
    }
}

#[test]
fn regression_symlinks_are_skipped_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    write(&outside, "secret", b"do not read");
    write(&root, "real", b"x");
    std::os::unix::fs::symlink(outside.join("secret"), root.join("to-file")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("to-dir")).unwrap();
    // A loop would hang a walk that followed links.
    std::os::unix::fs::symlink(&root, root.join("loop")).unwrap();
    let tree = hash_tree(&root, &algs(), &HashOptions::default()).unwrap();
    let files: Vec<PathBuf> = tree.entries.iter().map(|e| e.path.clone()).collect();
    assert_eq!(files, vec![root.join("real")]);
    let skipped: Vec<(PathBuf, &str)> = tree
        .skipped
        .iter()
        .map(|s| (s.path.clone(), s.reason.as_str()))
        .collect();
    assert_eq!(
        skipped,
        vec![
            (root.join("loop"), "symlink"),
            (root.join("to-dir"), "symlink"),
            (root.join("to-file"), "symlink"),
        ]
    );
}

#[test]
fn fifos_and_sockets_are_skipped_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "file", b"data");
    mkfifo(&root.join("fifo"));
    let _listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    let tree = hash_tree(root, &algs(), &HashOptions::default()).unwrap();
    assert_eq!(tree.entries.len(), 1);
    let reasons: Vec<(&Path, &str)> = tree
        .skipped
        .iter()
        .map(|s| (s.path.as_path(), s.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (root.join("fifo").as_path(), "FIFO"),
            (root.join("sock").as_path(), "socket")
        ]
    );
}

#[test]
fn an_unreadable_file_is_an_error_entry_naming_it_and_the_rest_is_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "ok", b"fine");
    let locked = write(root, "locked", b"secret");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root (CAP_DAC_OVERRIDE) reads it anyway; then there is no error to see.
    let can_read_anyway = std::fs::File::open(&locked).is_ok();
    let tree = hash_tree(root, &algs(), &HashOptions::default()).unwrap();
    assert_eq!(tree.entries.len(), 2);
    let locked_entry = tree.entries.iter().find(|e| e.path == locked).unwrap();
    if can_read_anyway {
        assert!(locked_entry.result.is_ok());
    } else {
        let err = locked_entry.result.as_ref().unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
    }
    let ok_entry = tree
        .entries
        .iter()
        .find(|e| e.path == root.join("ok"))
        .unwrap();
    assert!(ok_entry.result.is_ok());
}

#[test]
fn an_unreadable_directory_is_reported_and_does_not_stop_the_walk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "a/file", b"1");
    write(root, "shut/inside", b"2");
    std::fs::set_permissions(root.join("shut"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let can_read_anyway = std::fs::read_dir(root.join("shut")).is_ok();
    let tree = hash_tree(root, &algs(), &HashOptions::default()).unwrap();
    std::fs::set_permissions(root.join("shut"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(tree.entries.iter().any(|e| e.path == root.join("a/file")));
    if !can_read_anyway {
        let e = tree
            .entries
            .iter()
            .find(|e| e.path == root.join("shut"))
            .unwrap();
        assert!(e.result.is_err());
    }
}

#[test]
fn a_missing_root_fails_and_a_file_root_is_a_one_entry_tree() {
    let dir = tempfile::tempdir().unwrap();
    assert!(hash_tree(&dir.path().join("nope"), &algs(), &HashOptions::default()).is_err());
    let f = write(dir.path(), "single", b"abc");
    let tree = hash_tree(&f, &algs(), &HashOptions::default()).unwrap();
    assert_eq!(tree.entries.len(), 1);
    assert_eq!(tree.entries[0].path, f);
}

#[test]
fn a_tree_hashes_inside_a_one_thread_pool() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..50 {
        write(
            dir.path(),
            &format!("d{}/f{i}", i % 5),
            &vec![i as u8; i * 1000],
        );
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let tree = pool
        .install(|| hash_tree(dir.path(), &algs(), &HashOptions::default()))
        .unwrap();
    assert_eq!(tree.entries.len(), 50);
    assert!(tree.entries.iter().all(|e| e.result.is_ok()));
}

#[test]
fn every_io_mode_gives_the_same_tree_and_says_what_read_each_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Small files (batched under io_uring), one empty, one just over the
    // batch limit, one big enough for the parallel path.
    for i in 0..70usize {
        write(root, &format!("s/{i:03}"), &vec![(i * 7) as u8; i * 97]);
    }
    write(root, "empty", b"");
    write(root, "edge", &vec![3u8; 64 << 10]);
    write(root, "over", &vec![4u8; (64 << 10) + 1]);
    write(root, "big", &vec![5u8; 3 << 20]);
    let base = HashOptions {
        chunk_size: 1 << 20,
        parallel_threshold: 2 << 20,
        ..HashOptions::default()
    };
    let reference = hash_tree(
        root,
        &algs(),
        &HashOptions {
            io: fleetsync_engine::IoMode::Pread,
            ..base.clone()
        },
    )
    .unwrap();
    for e in &reference.entries {
        assert_eq!(
            e.result.as_ref().unwrap().io,
            fleetsync_engine::IoUsed::Pread
        );
    }
    for mode in [
        fleetsync_engine::IoMode::Auto,
        fleetsync_engine::IoMode::Uring,
        fleetsync_engine::IoMode::Mmap,
    ] {
        let opts = HashOptions {
            io: mode,
            ..base.clone()
        };
        let tree = match hash_tree(root, &algs(), &opts) {
            Ok(t) => t,
            Err(e) => panic!("{mode}: {e}"),
        };
        assert_eq!(tree.entries.len(), reference.entries.len());
        for (a, b) in tree.entries.iter().zip(&reference.entries) {
            assert_eq!(a.path, b.path);
            let (ha, hb) = (a.result.as_ref(), b.result.as_ref().unwrap());
            match ha {
                Ok(h) => {
                    assert_eq!(h.digests, hb.digests, "{mode} {}", a.path.display());
                    assert_eq!(h.size, hb.size);
                    if mode == fleetsync_engine::IoMode::Mmap {
                        assert_eq!(h.io, fleetsync_engine::IoUsed::Mmap);
                    }
                    if mode == fleetsync_engine::IoMode::Uring {
                        assert_eq!(h.io, fleetsync_engine::IoUsed::Uring);
                    }
                }
                Err(fleetsync_engine::Error::UringUnavailable { .. })
                    if mode == fleetsync_engine::IoMode::Uring => {}
                Err(e) => panic!("{mode} {}: {e}", a.path.display()),
            }
        }
    }
}

/// Batches read small files without a `stat` and switch to a `stat` per
/// file where many files are too big for a batch: a tree whose files are
/// first all small, then mostly big (around and far over the 64 KiB batch
/// limit), hashed on one thread so both ways run, matches crc32fast over
/// each file's bytes.
#[test]
fn small_then_big_files_match_an_independent_crc32_in_every_batch_mode() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut x = 0x2545_f491u32;
    let mut noise = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    for i in 0..100usize {
        write(root, &format!("a/{i:03}"), &noise((i * 655) % (64 << 10)));
    }
    let limit = 64usize << 10;
    for (i, len) in [limit - 1, limit, limit + 1, limit + 64, 3 * limit, 200_000]
        .into_iter()
        .cycle()
        .take(150)
        .enumerate()
    {
        write(root, &format!("b/{i:03}"), &noise(len));
    }
    for i in 0..40usize {
        write(root, &format!("c/{i:03}"), &noise(i * 31));
    }
    let crc32 = Registry::with_builtins().info("crc32").unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let tree = pool
        .install(|| hash_tree(root, &[crc32], &HashOptions::default()))
        .unwrap();
    assert_eq!(tree.entries.len(), 290);
    for e in &tree.entries {
        let data = std::fs::read(&e.path).unwrap();
        let h = e.result.as_ref().unwrap();
        assert_eq!(h.size, data.len() as u64, "{}", e.path.display());
        assert_eq!(
            h.digests[0].value(),
            Some(u64::from(crc32fast::hash(&data))),
            "{}",
            e.path.display()
        );
    }
}
