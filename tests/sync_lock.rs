//! `fleetsync sync --lock` (issue 5): a file whose master copy is write-locked by another
//! process, or whose remote copy is read-locked, is not synchronized within `--lock-timeout`
//! and is reported failed naming the holder's pid; the other files sync; once the holders are
//! gone the sync completes and rsync sees no difference; a read-only file is still replaced by
//! an agent that is not root. (Concurrent writers and readers: `sync_lock_concurrent.rs`.)

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use support::{fleetsync, rsync_diff, Proc};

/// `flock --no-fork MODE FILE sh` holding the lock until killed; returns once the lock is held.
fn hold_lock(mode: &str, file: &Path) -> Proc {
    // --no-fork: the lock holder is the process we spawn (and kill), not a child of it.
    let mut child = Command::new("flock")
        .arg("--no-fork")
        .arg(mode)
        .arg(file)
        .args(["sh", "-c", "echo locked; exec sleep 30"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock (util-linux) must be installed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    Proc(child)
}

/// Embedded `fleetsync sync EXTRA MASTER REMOTE`, its per-user state in `home`.
fn sync(master: &Path, remote: &Path, home: &Path, extra: &[&str]) -> (Output, String) {
    let out = fleetsync(home)
        .arg("sync")
        .args(extra)
        .arg(master)
        .arg(remote)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("sync {extra:?}: {:?}\n{text}", out.status);
    (out, text)
}

/// Master `m` with the "new" tree and remote `r` with the "old" one under `dir`, plus a home.
fn old_remote_new_master(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (master, remote) = (dir.join("m"), dir.join("r"));
    tree(&master, "new");
    tree(&remote, "old");
    (master, remote, dir.join("home"))
}

fn tree(dir: &Path, version: &str) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    for name in ["a.conf", "b.bin", "sub/c.txt", "sub/d.txt", "e"] {
        fs::write(dir.join(name), format!("{name} {version}\n").repeat(100)).unwrap();
    }
}

#[test]
fn a_write_locked_master_file_fails_naming_the_holder_and_the_others_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote, home) = (
        tmp.path().join("m"),
        tmp.path().join("r"),
        tmp.path().join("home"),
    );
    tree(&master, "new");
    fs::create_dir_all(&remote).unwrap();
    let mut writer = hold_lock("-x", &master.join("b.bin"));
    let pid = writer.0.id();

    let (out, text) = sync(&master, &remote, &home, &["--lock", "--lock-timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let line = text
        .lines()
        .find(|l| l.contains("b.bin") && l.contains("lock"))
        .unwrap_or_else(|| panic!("no lock failure for b.bin in:\n{text}"));
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    assert!(!remote.join("b.bin").exists());
    for name in ["a.conf", "sub/c.txt", "sub/d.txt", "e"] {
        assert_eq!(
            fs::read(master.join(name)).unwrap(),
            fs::read(remote.join(name)).unwrap(),
            "{name}"
        );
    }

    writer.kill_now();
    let (out, _) = sync(&master, &remote, &home, &["--lock", "--lock-timeout", "1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(rsync_diff(&master, &remote), "");
}

#[test]
fn a_read_locked_remote_file_is_not_replaced_under_its_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote, home) = old_remote_new_master(tmp.path());
    let mut reader = hold_lock("-s", &remote.join("sub/c.txt"));
    let pid = reader.0.id();

    let (out, text) = sync(&master, &remote, &home, &["--lock", "--lock-timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let line = text
        .lines()
        .find(|l| l.contains("c.txt") && l.contains("lock"))
        .unwrap_or_else(|| panic!("no lock failure for sub/c.txt in:\n{text}"));
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    // The reader's file is untouched, the others are new.
    assert_eq!(
        fs::read_to_string(remote.join("sub/c.txt")).unwrap(),
        "sub/c.txt old\n".repeat(100)
    );
    assert_eq!(
        fs::read(master.join("a.conf")).unwrap(),
        fs::read(remote.join("a.conf")).unwrap()
    );

    reader.kill_now();
    let (out, _) = sync(&master, &remote, &home, &["--lock", "--lock-timeout", "1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(rsync_diff(&master, &remote), "");
}

#[test]
fn without_holders_a_locked_sync_completes_and_replaces_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote, home) = old_remote_new_master(tmp.path());
    fs::write(remote.join("extra"), b"x").unwrap();
    // A symlink where the master has a file: nothing to lock, it is simply replaced.
    fs::remove_file(remote.join("e")).unwrap();
    std::os::unix::fs::symlink("a.conf", remote.join("e")).unwrap();
    let (out, _) = sync(&master, &remote, &home, &["--delete", "--lock"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(rsync_diff(&master, &remote), "");
}

/// `fleetsync sync EXTRA MASTER REMOTE` as a user that is not root: as `nobody` under
/// `setpriv` when the tests run as root (root may open any file for writing), else as is.
fn sync_not_root(master: &Path, remote: &Path, home: &Path, extra: &[&str]) -> Output {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            support::BIN,
        ]);
        support::isolate(&mut c, home);
        c
    } else {
        fleetsync(home)
    };
    let out = cmd
        .arg("sync")
        .args(extra)
        .arg(master)
        .arg(remote)
        .output()
        .expect("setpriv (util-linux) must be installed");
    eprintln!("sync as not root {extra:?}: {out:?}");
    out
}

/// A file read-only on the master (0444) is read-only on the remote after a sync; an agent
/// that is not root cannot open it for writing to lock it, but may still replace it (a rename
/// needs only the directory writable), so `--lock` must still replace it.
#[test]
fn regression_a_read_only_remote_file_is_replaced_under_lock_by_an_agent_that_is_not_root() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote, home) = (
        tmp.path().join("m"),
        tmp.path().join("r"),
        tmp.path().join("home"),
    );
    let write_read_only = |text: &str| {
        let f = master.join("app.conf");
        if f.exists() {
            fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        }
        fs::write(&f, text).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o444)).unwrap();
    };
    for d in [&master, &remote, &home] {
        fs::create_dir_all(d).unwrap();
    }
    write_read_only("port = 80\n");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        for p in [&master, &remote, &home, &master.join("app.conf")] {
            std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        }
    }
    let out = sync_not_root(&master, &remote, &home, &["--lock"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        fs::metadata(remote.join("app.conf"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o444
    );

    write_read_only("port = 81\n");
    let out = sync_not_root(&master, &remote, &home, &["--lock", "--lock-timeout", "1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        fs::read_to_string(remote.join("app.conf")).unwrap(),
        "port = 81\n"
    );
    assert_eq!(rsync_diff(&master, &remote), "");
}
