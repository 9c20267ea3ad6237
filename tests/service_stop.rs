//! Running as a service (issue 13): SIGTERM stops `agent` and `server` cleanly, with exit
//! status 0. A remote agent stopped in the middle of a large file leaves it old or absent
//! (never torn, no temp file), and the next sync completes (rsync `-aHc -n -i --delete`
//! prints nothing); a server stopped mid-job records the job as failed, with the reason.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use support::{rsync_diff, write_with_mtime, Rng, Token};

/// The file sent while the remote is stopped: big enough to be in flight for seconds
/// under `--bwlimit`.
const BIG: usize = 24 << 20;
const RATE: &str = "4MiB";
const TEMP_PREFIX: &str = ".fleetsync.tmp.";
const PARTIAL_PREFIX: &str = ".fleetsync.partial.";

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits (at most 60 s: a hang fails the test) for `child` to exit.
fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names under `root` (recursively) starting with `prefix`, with their sizes.
fn with_prefix(root: &Path, prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push((e.path().display().to_string(), m.len()));
            }
        }
    }
    out
}

#[test]
fn sigterm_of_the_remote_agent_mid_file_exits_0_leaves_nothing_torn_and_the_next_sync_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (master_root, remote_root) = (tmp.path().join("master"), tmp.path().join("remote"));
    let big_new = bytes(1, BIG);
    let old = bytes(2, 3 << 20);
    let replaced_new = bytes(3, 3 << 20);
    write_with_mtime(&master_root.join("d/big.bin"), &big_new, 1_600_000_000);
    write_with_mtime(&master_root.join("old.bin"), &replaced_new, 1_600_000_000);
    for i in 0..20 {
        let data = format!("small file {i}\n");
        write_with_mtime(
            &master_root.join(format!("s/{i}.txt")),
            data.as_bytes(),
            1_600_000_000,
        );
    }
    write_with_mtime(&remote_root.join("old.bin"), &old, 1_500_000_000);

    let token = Token::new();
    let (_server, server) = token.server();
    let (_master, master) = token.agent(&master_root);
    let (remote, remote_addr) = token.agent(&remote_root);
    let mut remote = remote;
    let mut sync = token
        .sync_command(&server, &master, &[&remote_addr])
        .args(["--bwlimit", RATE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stop the remote once the big file is well under way (its temp file, which carries its
    // name, holds > 2 MiB).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let temps = with_prefix(&remote_root, TEMP_PREFIX);
        if temps
            .iter()
            .any(|(p, len)| p.ends_with(".big.bin") && *len > 2 << 20)
        {
            break;
        }
        assert!(
            sync.try_wait().unwrap().is_none(),
            "the sync ended before the stop"
        );
        assert!(Instant::now() < deadline, "the big file never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&remote.0);
    let status = wait_exit(&mut remote.0, "the remote agent");
    assert_eq!(status.code(), Some(0), "remote agent: {status}");
    let sync_status = wait_exit(&mut sync, "the sync");
    assert!(!sync_status.success(), "the sync cannot have succeeded");

    // Nothing torn: each file is its old content or absent, or complete.
    match fs::read(remote_root.join("d/big.bin")) {
        Ok(data) => assert!(data == big_new, "big.bin is torn ({} bytes)", data.len()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
    let data = fs::read(remote_root.join("old.bin")).unwrap();
    assert!(data == old || data == replaced_new, "old.bin is torn");
    let temps = with_prefix(&remote_root, TEMP_PREFIX);
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    // What arrived of the big file is kept to resume from (it was over 1 MiB).
    let partials = with_prefix(&remote_root, PARTIAL_PREFIX);
    eprintln!("partial files after the stop: {partials:?}");
    assert!(
        partials.iter().any(|(p, _)| p.ends_with("big.bin")),
        "no resumable partial of big.bin: {partials:?}"
    );

    let kept: u64 = partials
        .iter()
        .filter(|(p, _)| p.ends_with("big.bin"))
        .map(|(_, n)| n)
        .sum();

    // The next sync (a new agent on the same tree) completes, resuming the big file.
    let (_remote2, remote_addr2) = token.agent(&remote_root);
    let out = token
        .sync_command(&server, &master, &[&remote_addr2])
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "second sync failed: {out:?}");
    let diff = rsync_diff(&master_root, &remote_root);
    assert!(diff.is_empty(), "rsync sees differences:\n{diff}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let wire = summary["remotes"][0]["wire_bytes"].as_u64().unwrap();
    let all_new = (BIG + replaced_new.len() + 20 * 16) as u64;
    eprintln!("second sync: {wire} bytes on the wire, {kept} bytes of big.bin were kept");
    assert!(
        wire <= all_new - kept,
        "the kept {kept} bytes were sent again ({wire} bytes on the wire)"
    );
}

#[test]
fn sigterm_of_the_server_mid_job_exits_0_and_records_the_job_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let (master_root, remote_root) = (tmp.path().join("master"), tmp.path().join("remote"));
    write_with_mtime(
        &master_root.join("big.bin"),
        &bytes(4, 16 << 20),
        1_600_000_000,
    );
    fs::create_dir_all(&remote_root).unwrap();
    let db = tmp.path().join("jobs.sqlite");
    let token = Token::new();
    let (mut server, server_addr) = token.server_recording(&db);
    let (_master, master) = token.agent(&master_root);
    let (_remote, remote_addr) = token.agent(&remote_root);
    let mut sync = token
        .sync_command(&server_addr, &master, &[&remote_addr])
        .args(["--bwlimit", RATE])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while with_prefix(&remote_root, TEMP_PREFIX).is_empty() {
        assert!(Instant::now() < deadline, "the transfer never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&server.0);
    let status = wait_exit(&mut server.0, "the server");
    assert_eq!(status.code(), Some(0), "server: {status}");
    let sync_status = wait_exit(&mut sync, "the sync");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut sync.stderr.take().unwrap(), &mut err).unwrap();
    eprintln!("sync {sync_status}: {err}");
    assert!(!sync_status.success());
    assert!(
        err.contains("stopped (SIGTERM)"),
        "the client is not told why: {err}"
    );

    let out = support::fleetsync(tmp.path())
        .args(["jobs", "--json", "--db"])
        .arg(&db)
        .args(["show", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "failed", "{job}");
    let remote_error = job["results"][0]["error"].as_str().unwrap_or_default();
    assert!(
        remote_error.contains("server was stopped (SIGTERM)"),
        "{job}"
    );
    assert!(job["finished_ms"].is_i64(), "{job}");
}

#[test]
fn sigterm_of_the_remote_agent_mid_block_leaves_the_block_all_old_and_the_next_sync_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (master_root, remote_root) = (tmp.path().join("master"), tmp.path().join("remote"));
    // One block of four 4 MiB files, all replaced: staged, then moved in together.
    let files: Vec<String> = (0..4).map(|i| format!("app/f{i}.bin")).collect();
    for (i, f) in files.iter().enumerate() {
        write_with_mtime(
            &master_root.join(f),
            &bytes(10 + i as u64, 4 << 20),
            1_600_000_000,
        );
        write_with_mtime(
            &remote_root.join(f),
            &bytes(20 + i as u64, 1 << 20),
            1_500_000_000,
        );
    }
    let blocks = tmp.path().join("blocks.toml");
    fs::write(&blocks, "[block.app]\nselect = \"path:app/**\"\n").unwrap();
    let token = Token::new();
    let (_server, server) = token.server();
    let (_master, master) = token.agent(&master_root);
    let (mut remote, remote_addr) = token.agent(&remote_root);
    let mut sync = token
        .sync_command(&server, &master, &[&remote_addr])
        .args(["--bwlimit", RATE, "--blocks"])
        .arg(&blocks)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stop once more than one file is staged (the block is under way, not committed).
    let staging = remote_root.join(".fleetsync-staging");
    let staged = || -> u64 {
        if !staging.exists() {
            return 0;
        }
        with_prefix(&staging, "").iter().map(|(_, n)| n).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while staged() < 6 << 20 {
        assert!(
            sync.try_wait().unwrap().is_none(),
            "the sync ended before the stop"
        );
        assert!(Instant::now() < deadline, "the block never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&remote.0);
    let status = wait_exit(&mut remote.0, "the remote agent");
    assert_eq!(status.code(), Some(0), "remote agent: {status}");
    wait_exit(&mut sync, "the sync");

    // All old: the block was rolled back, its staging removed.
    for (i, f) in files.iter().enumerate() {
        let data = fs::read(remote_root.join(f)).unwrap();
        assert!(
            data == bytes(20 + i as u64, 1 << 20),
            "{f} is not its old version"
        );
    }
    let left = if staging.exists() {
        with_prefix(&staging, "")
    } else {
        Vec::new()
    };
    assert!(left.is_empty(), "staged files left: {left:?}");
    assert!(with_prefix(&remote_root, TEMP_PREFIX).is_empty());

    let (_remote2, remote_addr2) = token.agent(&remote_root);
    let out = token
        .sync_command(&server, &master, &[&remote_addr2])
        .arg("--blocks")
        .arg(&blocks)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rsync_diff(&master_root, &remote_root), "");
}

#[test]
fn sigterm_of_the_master_agent_mid_send_exits_0_and_the_next_sync_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (master_root, remote_root) = (tmp.path().join("master"), tmp.path().join("remote"));
    let big = bytes(5, 16 << 20);
    write_with_mtime(&master_root.join("big.bin"), &big, 1_600_000_000);
    fs::create_dir_all(&remote_root).unwrap();
    let token = Token::new();
    let (_server, server) = token.server();
    let (mut master, master_addr) = token.agent(&master_root);
    let (_remote, remote_addr) = token.agent(&remote_root);
    let mut sync = token
        .sync_command(&server, &master_addr, &[&remote_addr])
        .args(["--bwlimit", RATE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !with_prefix(&remote_root, TEMP_PREFIX)
        .iter()
        .any(|(_, n)| *n > 2 << 20)
    {
        assert!(
            sync.try_wait().unwrap().is_none(),
            "the sync ended before the stop"
        );
        assert!(Instant::now() < deadline, "the big file never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    sigterm(&master.0);
    let status = wait_exit(&mut master.0, "the master agent");
    assert_eq!(status.code(), Some(0), "master agent: {status}");
    assert!(!wait_exit(&mut sync, "the sync").success());
    // The remote saw its stream cut: the file absent, what arrived kept to resume from.
    assert!(
        !remote_root.join("big.bin").exists(),
        "big.bin appeared torn"
    );
    // (the remote's handler ends on its own once it sees the cut; give it a moment)
    let deadline = Instant::now() + Duration::from_secs(30);
    while !with_prefix(&remote_root, TEMP_PREFIX).is_empty() {
        assert!(Instant::now() < deadline, "the remote kept its temp file");
        std::thread::sleep(Duration::from_millis(10));
    }

    let (_master2, master_addr2) = token.agent(&master_root);
    let out = token.sync(&server, &master_addr2, &[&remote_addr]);
    assert!(out.status.success());
    assert_eq!(rsync_diff(&master_root, &remote_root), "");
}
