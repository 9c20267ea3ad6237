//! Locking against real concurrent processes: a lock held by another process makes ours time
//! out with an error naming the file and the holder's pid; compatible locks coexist.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetsync_agent::lock::{FileLock, LockError, LockFamily, LockKind, LockOptions};

const CHILD_FILE_ENV: &str = "FLEETSYNC_TEST_LOCK_FILE";
const CHILD_KIND_ENV: &str = "FLEETSYNC_TEST_LOCK_KIND";

/// Kills the child on drop, so that a failing test does not leave it behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Child mode: take an OFD lock (no flock) on the file, announce it, and hold it until killed.
#[test]
fn child_mode() {
    let Some(path) = std::env::var_os(CHILD_FILE_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let kind = match std::env::var(CHILD_KIND_ENV).as_deref() {
        Ok("shared") => LockKind::Shared,
        _ => LockKind::Exclusive,
    };
    let opts = LockOptions {
        timeout: Duration::from_secs(10),
        flock: false,
    };
    let _lock = FileLock::open(&path, kind, &opts).unwrap();
    std::fs::write(path.with_extension("ready"), "").unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn ofd_holder(path: &Path, kind: &str) -> KillOnDrop {
    let child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_mode", "--test-threads=1"])
            .env(CHILD_FILE_ENV, path)
            .env(CHILD_KIND_ENV, kind)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(|| path.with_extension("ready").exists());
    child
}

fn wait_for(mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "holder did not take its lock");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn quick() -> LockOptions {
    LockOptions {
        timeout: Duration::from_millis(200),
        flock: true,
    }
}

fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.conf");
    std::fs::write(&path, "threads = 4\n").unwrap();
    (dir, path)
}

#[test]
fn an_ofd_writer_blocks_our_shared_lock_and_is_named() {
    let (_dir, path) = fixture();
    let holder = ofd_holder(&path, "exclusive");
    let start = Instant::now();
    let err = FileLock::open(&path, LockKind::Shared, &quick()).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(200));
    let LockError::Timeout { holders, .. } = &err else {
        panic!("{err}");
    };
    let me = holders
        .iter()
        .find(|h| h.pid == holder.0.id())
        .unwrap_or_else(|| panic!("holder pid {} not in {err}", holder.0.id()));
    assert_eq!(me.family, LockFamily::Ofd);
    assert!(me.write);
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("pid {}", holder.0.id())), "{msg}");
    drop(holder);
    // Once the holder is gone the lock is ours.
    FileLock::open(&path, LockKind::Shared, &quick()).unwrap();
}

#[test]
fn readers_share_and_a_writer_waits_for_them() {
    let (_dir, path) = fixture();
    let reader = ofd_holder(&path, "shared");
    let ours = FileLock::open(&path, LockKind::Shared, &quick()).unwrap();
    let err = FileLock::open(&path, LockKind::Exclusive, &quick()).unwrap_err();
    // Our own shared lock is not reported; the other reader is.
    let LockError::Timeout { holders, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        holders.iter().map(|h| h.pid).collect::<Vec<_>>(),
        [reader.0.id()]
    );
    drop(ours);
}

#[test]
fn a_flock_holder_is_honoured_and_named() {
    let (_dir, path) = fixture();
    // util-linux flock(1) holds an exclusive flock while its command runs.
    let holder = match Command::new("flock")
        .arg("-x")
        .arg(&path)
        .args(["sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => KillOnDrop(c),
        Err(e) => panic!("flock(1) is needed (util-linux; `bash .ci/setup` installs it): {e}"),
    };
    let probe = LockOptions {
        timeout: Duration::ZERO,
        flock: true,
    };
    wait_for(|| FileLock::open(&path, LockKind::Shared, &probe).is_err());
    let err = FileLock::open(&path, LockKind::Shared, &quick()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("pid {}", holder.0.id())), "{msg}");
    assert!(msg.contains("flock write lock"), "{msg}");
    // Without the flock half, the flock(1) holder is invisible to us (documented).
    let ofd_only = LockOptions {
        flock: false,
        ..quick()
    };
    FileLock::open(&path, LockKind::Exclusive, &ofd_only).unwrap();
}

#[test]
fn a_missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    let err = FileLock::open(&path, LockKind::Shared, &quick()).unwrap_err();
    assert!(matches!(err, LockError::Io { .. }));
    assert!(err.to_string().contains("nope"));
}
