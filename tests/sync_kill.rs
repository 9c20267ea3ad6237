//! SIGKILL in the middle of a sync (issue 4, Safety): every file on the
//! remote is either exactly its old content or exactly its new content, and
//! after the killed agent restarts the next sync finishes the job (rsync
//! `-aHc -n -i --delete` prints nothing, no temp file is left).
//!
//! The kill moment is random; set `FLEETSYNC_KILL_SEED` to replay a run.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, UNIX_EPOCH};

use support::{kill_seed, rsync_diff, write_with_mtime as write, Rng, Token};

/// Files on the master.
const FILES: usize = 200;
/// Size of every master file.
const SIZE: usize = 256 * 1024;
/// The first `REPLACED` names also exist on the remote, with other content.
const REPLACED: usize = 40;
const OLD_MTIME: u64 = 1_500_000_000;
const NEW_MTIME: u64 = 1_600_000_000;
const ITERATIONS: usize = 4;
const TEMP_PREFIX: &str = ".fleetsync.tmp.";

fn rel(i: usize) -> String {
    format!("d{}/f{i:03}.bin", i % 4)
}

/// Content of file `i` in `version` 0 (remote, old) or 1 (master, new):
/// a readable header, then pseudo-random bytes, so a torn or mixed file
/// matches neither.
fn content(i: usize, version: u64) -> Vec<u8> {
    let len = if version == 0 && i % 2 == 1 {
        100 * 1024
    } else {
        SIZE
    };
    let mut out = format!("file {i} version {version}\n").into_bytes();
    let mut rng = Rng((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (version + 1));
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn make_master(root: &Path) {
    for i in 0..FILES {
        write(&root.join(rel(i)), &content(i, 1), NEW_MTIME + i as u64);
    }
}

fn make_old_remote(root: &Path) {
    fs::create_dir_all(root).unwrap();
    for i in 0..REPLACED {
        write(&root.join(rel(i)), &content(i, 0), OLD_MTIME);
    }
    write(&root.join("extra.bin"), b"only on the remote", OLD_MTIME);
}

/// Every entry under `root`, relative, '/'-separated (directories included).
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        for e in fs::read_dir(root.join(&dir)).unwrap() {
            let e = e.unwrap();
            let r = dir.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                todo.push(r.clone());
            }
            out.push(r.to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

fn temp_files(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|p| p.rsplit('/').next().unwrap().starts_with(TEMP_PREFIX))
        .collect()
}

/// The safety property. Returns how many files already had their new content.
fn assert_each_file_old_or_new(root: &Path) -> usize {
    let mut expected: BTreeMap<String, (Option<Vec<u8>>, Vec<u8>)> = BTreeMap::new();
    for i in 0..FILES {
        let old = (i < REPLACED).then(|| content(i, 0));
        expected.insert(rel(i), (old, content(i, 1)));
    }
    let mut new = 0;
    for (path, (old, fresh)) in &expected {
        match fs::read(root.join(path)) {
            Ok(data) if &data == fresh => new += 1,
            Ok(data) if old.as_ref() == Some(&data) => {}
            Ok(data) => panic!(
                "{path}: torn or mixed file ({} bytes, starts {:?})",
                data.len(),
                String::from_utf8_lossy(&data[..data.len().min(24)])
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(old.is_none(), "{path}: the old file vanished")
            }
            Err(e) => panic!("{path}: {e}"),
        }
    }
    if let Ok(data) = fs::read(root.join("extra.bin")) {
        assert_eq!(data, b"only on the remote", "extra.bin changed");
    }
    for p in walk(root) {
        let name = p.rsplit('/').next().unwrap();
        let known = expected.contains_key(&p)
            || p == "extra.bin"
            || ["d0", "d1", "d2", "d3"].contains(&p.as_str())
            || name.starts_with(TEMP_PREFIX);
        assert!(known, "unexpected entry {p:?} on the remote");
    }
    new
}

/// How many files already arrived: new mtime and size (cheap, no reads).
fn arrived(root: &Path) -> usize {
    (0..FILES)
        .filter(|&i| {
            fs::metadata(root.join(rel(i))).is_ok_and(|m| {
                m.len() == SIZE as u64
                    && m.modified().ok()
                        == Some(UNIX_EPOCH + Duration::from_secs(NEW_MTIME + i as u64))
            })
        })
        .count()
}

#[test]
fn sigkill_mid_transfer_leaves_old_or_new_files_and_the_next_sync_finishes() {
    let started = Instant::now();
    let mut rng = Rng(kill_seed());

    let tmp = tempfile::tempdir().unwrap();
    let master_root = tmp.path().join("master");
    make_master(&master_root);
    let token = Token::new();
    let (_server, server) = token.server();
    let (mut master, mut master_addr) = token.agent(&master_root);
    let mut notes = Vec::new();

    for it in 0..ITERATIONS {
        let remote_root = tmp.path().join(format!("remote{it}"));
        make_old_remote(&remote_root);
        let (mut remote, mut remote_addr) = token.agent(&remote_root);
        let kill_master = it % 3 == 2;
        // Kill after 0..(3/4 of the files) have arrived, plus a little jitter.
        let after = rng.below(FILES as u64 * 3 / 4) as usize;
        let jitter = Duration::from_millis(rng.below(30));

        let mut sync = token
            .sync_command(&server, &master_addr, &[&remote_addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while arrived(&remote_root) < after
            && sync.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(jitter);
        if kill_master {
            master.kill_now();
        } else {
            remote.kill_now();
        }

        // The sync must notice and end by itself.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = sync.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = sync.kill();
                panic!("iteration {it}: the sync hung after the agent was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let temps = temp_files(&remote_root);
        let new = assert_each_file_old_or_new(&remote_root);
        eprintln!(
            "iteration {it}: killed the {} agent after {after}+ files; sync {status}; \
             {new}/{FILES} new, {} temp file(s) left",
            if kill_master { "master" } else { "remote" },
            temps.len()
        );

        if kill_master {
            // The remote agent lived: it must drop (or finish) what was in flight.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !temp_files(&remote_root).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let left = temp_files(&remote_root);
            if !left.is_empty() {
                notes.push(format!(
                    "iteration {it}: the live remote agent kept {} temp file(s) 5 s after \
                     its master died: {:?}",
                    left.len(),
                    &left[..left.len().min(3)]
                ));
            }
        }

        // Restart whoever was killed; a restarted agent should clean up.
        if kill_master {
            (master, master_addr) = token.agent(&master_root);
        } else {
            (remote, remote_addr) = token.agent(&remote_root);
            let left = temp_files(&remote_root);
            if !left.is_empty() {
                notes.push(format!(
                    "iteration {it}: a restarted agent left {} temp file(s) until a sync: {:?}",
                    left.len(),
                    &left[..left.len().min(3)]
                ));
            }
        }

        let out = token.sync(&server, &master_addr, &[&remote_addr]);
        drop(remote);
        assert_eq!(
            out.status.code(),
            Some(0),
            "iteration {it}: the next sync failed"
        );
        assert_each_file_old_or_new(&remote_root);
        assert_eq!(
            temp_files(&remote_root),
            Vec::<String>::new(),
            "temp files left"
        );
        let diff = rsync_diff(&master_root, &remote_root);
        assert!(diff.is_empty(), "iteration {it}: remote differs:\n{diff}");
        fs::remove_dir_all(&remote_root).unwrap();
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    eprintln!("{ITERATIONS} iterations in {:?}", started.elapsed());
}
