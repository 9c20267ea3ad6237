//! SIGKILL of the remote agent in the middle of a stream of many small files (issue 12,
//! item 5): the agent commits them in groups (one flush for the group, then the renames), so
//! a kill lands inside a group's flush, between its renames or between groups. Whatever the
//! moment, no file shows under its real name with bytes other than its old or its new
//! content, and after a restart the next sync finishes the job (rsync `-aHc -n -i --delete`
//! prints nothing, no temp file is left).
//!
//! The kill moments are random; set `FLEETSYNC_KILL_SEED` to replay a run.

mod support;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{kill_seed, rsync_diff, write_with_mtime as write, Rng, Token};

/// Files on the master, in `DIRS` directories.
const FILES: usize = 2000;
const DIRS: usize = 30;
/// The first `REPLACED` names also exist on the remote, with other content (and mtime).
const REPLACED: usize = 400;
const ITERATIONS: usize = 3;
const TEMP_PREFIX: &str = ".fleetsync.tmp.";

fn rel(i: usize) -> String {
    format!("d{:02}/f{i:05}", i % DIRS)
}

/// Content of file `i` in `version` 0 (old, remote) or 1 (new, master): 1..=49 bytes that
/// name the file and version, so that a file with another's bytes, a torn one or an empty
/// one matches neither.
fn content(i: usize, version: u64) -> Vec<u8> {
    let mut out = format!("{i}:{version}:").into_bytes();
    let mut rng = Rng((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (version + 7));
    let len = out.len() + rng.below(49 - out.len() as u64) as usize;
    while out.len() < len {
        out.push(b'a' + rng.below(26) as u8);
    }
    out
}

/// Every file is old, new or (never replaced) absent; nothing else but temps is there.
/// Returns how many are new.
fn assert_each_file_old_or_new(root: &Path) -> usize {
    let mut new = 0;
    for i in 0..FILES {
        let p = rel(i);
        match fs::read(root.join(&p)) {
            Ok(d) if d == content(i, 1) => new += 1,
            Ok(d) if i < REPLACED && d == content(i, 0) => {}
            Ok(d) => panic!("{p}: neither its old nor its new content: {d:?}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(i >= REPLACED, "{p}: the old file vanished")
            }
            Err(e) => panic!("{p}: {e}"),
        }
    }
    for d in 0..DIRS {
        let Ok(entries) = fs::read_dir(root.join(format!("d{d:02}"))) else {
            continue;
        };
        for e in entries {
            let n = e.unwrap().file_name().into_string().unwrap();
            let known = n.starts_with(TEMP_PREFIX)
                || n.strip_prefix('f')
                    .and_then(|k| k.parse::<usize>().ok())
                    .is_some_and(|k| k < FILES && k % DIRS == d);
            assert!(known, "unexpected entry d{d:02}/{n} on the remote");
        }
    }
    new
}

fn temp_files(root: &Path) -> usize {
    (0..DIRS)
        .filter_map(|d| fs::read_dir(root.join(format!("d{d:02}"))).ok())
        .flatten()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(TEMP_PREFIX)
        })
        .count()
}

/// How many new names are there already (cheap: directory listings only).
fn arrived(root: &Path) -> usize {
    (0..DIRS)
        .filter_map(|d| fs::read_dir(root.join(format!("d{d:02}"))).ok())
        .flatten()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.strip_prefix('f')
                .and_then(|k| k.parse::<usize>().ok())
                .is_some_and(|k| k >= REPLACED)
        })
        .count()
}

#[test]
fn sigkill_of_the_remote_agent_mid_group_leaves_no_file_with_wrong_bytes() {
    let mut rng = Rng(kill_seed());
    let tmp = tempfile::tempdir().unwrap();
    let master_root = tmp.path().join("master");
    for i in 0..FILES {
        write(&master_root.join(rel(i)), &content(i, 1), 1_600_000_000);
    }
    let token = Token::new();
    let (_server, server) = token.server();
    let (_master, master_addr) = token.agent(&master_root);
    let mut killed_mid_stream = 0;
    for it in 0..ITERATIONS {
        let remote_root = tmp.path().join(format!("remote{it}"));
        for i in 0..REPLACED {
            write(&remote_root.join(rel(i)), &content(i, 0), 1_500_000_000);
        }
        let (mut remote, remote_addr) = token.agent(&remote_root);
        let after = rng.below((FILES - REPLACED) as u64 * 3 / 4) as usize;
        let mut sync = token
            .sync_command(&server, &master_addr, &[&remote_addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrived(&remote_root) < after
            && sync.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.below(3000)));
        let finished_before = sync.try_wait().unwrap().is_some();
        remote.kill_now();
        let deadline = Instant::now() + Duration::from_secs(30);
        while sync.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "iteration {it}: the sync hung after the remote agent was killed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let new = assert_each_file_old_or_new(&remote_root);
        if !finished_before && new < FILES {
            killed_mid_stream += 1;
        }
        eprintln!(
            "iteration {it}: killed after {after}+ arrivals: {new}/{FILES} new, {} temp file(s)",
            temp_files(&remote_root)
        );

        let (remote, remote_addr) = token.agent(&remote_root);
        let out = token.sync(&server, &master_addr, &[&remote_addr]);
        drop(remote);
        assert_eq!(
            out.status.code(),
            Some(0),
            "iteration {it}: next sync failed"
        );
        assert_eq!(assert_each_file_old_or_new(&remote_root), FILES);
        assert_eq!(temp_files(&remote_root), 0, "temp files left");
        let diff = rsync_diff(&master_root, &remote_root);
        assert!(diff.is_empty(), "iteration {it}: remote differs:\n{diff}");
        fs::remove_dir_all(&remote_root).unwrap();
    }
    assert!(
        killed_mid_stream > 0,
        "no kill landed in the middle of the stream: the test checked nothing"
    );
}
