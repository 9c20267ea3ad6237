//! The directories of embedded `sync` and `verify` (issue 13, "Never lose the master" and
//! "What users trip on today"): trees that overlap — the same directory (by name, through a
//! symlink or a bind mount) or one inside another — are refused with exit 2, an error naming
//! both, and nothing touched; a missing remote directory is created as rsync creates its
//! destination (not with -n, not by verify); and verify takes the sync flags that make no
//! difference to it, so that `sync` can be swapped for `verify` in a command line.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{fleetsync, logged, rsync_diff, scratch_home, BIN};

/// Everything observable about a tree: per path, bytes / link target, mode, mtime, inode.
type Snapshot = BTreeMap<PathBuf, (Vec<u8>, u32, i64, i64, u64)>;

fn snapshot(root: &Path) -> Snapshot {
    fn walk(dir: &Path, out: &mut Snapshot) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let data = if md.file_type().is_symlink() {
                fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if md.is_file() {
                fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            out.insert(
                p.clone(),
                (data, md.mode(), md.mtime(), md.mtime_nsec(), md.ino()),
            );
            if md.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    let md = fs::metadata(root).unwrap();
    out.insert(
        root.to_owned(),
        (Vec::new(), md.mode(), md.mtime(), md.mtime_nsec(), md.ino()),
    );
    walk(root, &mut out);
    out
}

/// A master with files, a subdirectory, a symlink and a hard link.
fn populate(m: &Path) {
    fs::create_dir_all(m.join("d/e")).unwrap();
    fs::write(m.join("a.txt"), b"alpha\n").unwrap();
    fs::write(m.join("d/data.bin"), vec![7u8; 50_000]).unwrap();
    fs::write(m.join("d/e/conf"), b"key = value\n").unwrap();
    fs::hard_link(m.join("a.txt"), m.join("d/a-link")).unwrap();
    symlink("../a.txt", m.join("d/ln")).unwrap();
    fs::set_permissions(m.join("d/e/conf"), fs::Permissions::from_mode(0o600)).unwrap();
}

fn run(cmd: &str, args: &[&Path], flags: &[&str]) -> Output {
    let out = fleetsync(scratch_home())
        .arg(cmd)
        .args(flags)
        .args(args)
        .output()
        .unwrap();
    logged(cmd, out)
}

fn sync(args: &[&Path], flags: &[&str]) -> Output {
    run("sync", args, flags)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `cmd` over `args` is refused with exit 2 and an error containing `says`, and the tree
/// under `top` (holding every directory of the test) is unchanged afterwards.
fn assert_refused(cmd: &str, top: &Path, args: &[&Path], flags: &[&str], says: &str) {
    let before = snapshot(top);
    let out = run(cmd, args, flags);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains(says), "expected {says:?} in: {err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(snapshot(top), before, "{cmd} {args:?} changed the trees");
}

#[test]
fn remote_inside_the_master_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("nest/m");
    populate(&m);
    // Missing: it would be created inside the master (and nested r/r on every run).
    let r = m.join("r");
    let says = format!(
        "the remote {} is inside the master {}",
        r.display(),
        m.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &r], &[], &says);
    assert!(!r.exists());
    // Existing, several levels down, with --delete.
    let r = m.join("d/e");
    let says = format!(
        "the remote {} is inside the master {}",
        r.display(),
        m.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &r], &["--delete"], &says);
}

#[test]
fn master_inside_the_remote_is_refused_and_the_master_survives_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("nest/r");
    let m = r.join("m");
    populate(&m);
    fs::write(r.join("other"), b"x").unwrap();
    let says = format!(
        "the master {} is inside the remote {}",
        m.display(),
        r.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &r], &["--delete"], &says);
    assert_eq!(fs::read(m.join("a.txt")).unwrap(), b"alpha\n");
}

#[test]
fn remote_that_is_the_master_through_a_symlink_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let link = tmp.path().join("link");
    symlink("m", &link).unwrap();
    let says = format!(
        "the master {} and the remote {} are the same directory",
        m.display(),
        link.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &link], &["--delete"], &says);
    // A symlink to a directory inside the master.
    let inner = tmp.path().join("inner");
    symlink("m/d", &inner).unwrap();
    let says = format!(
        "the remote {} is inside the master {}",
        inner.display(),
        m.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &inner], &[], &says);
}

#[test]
fn remote_equal_to_the_master_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let says = format!(
        "the master {0} and the remote {0} are the same directory",
        m.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &m], &["--delete"], &says);
    // Spelled differently.
    let dotted = tmp.path().join("m/./d/..");
    let says = format!(
        "the master {} and the remote {} are the same directory",
        m.display(),
        dotted.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &dotted], &[], &says);
}

#[test]
fn two_nested_remotes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let (r1, r2) = (tmp.path().join("r1"), tmp.path().join("r1/sub"));
    fs::create_dir_all(&r2).unwrap();
    let says = format!(
        "the remote {} is inside the remote {}",
        r2.display(),
        r1.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &r1, &r2], &["--delete"], &says);
    // In the other order, and the same remote twice.
    assert_refused("sync", tmp.path(), &[&m, &r2, &r1], &[], &says);
    let says = format!(
        "the remote {0} and the remote {0} are the same directory",
        r1.display()
    );
    assert_refused("sync", tmp.path(), &[&m, &r1, &r1], &[], &says);
}

/// Runs `fleetsync ARGS` in a mount namespace of its own where `bind` is a bind mount of
/// `dir` (a path-only comparison sees no overlap there: only device and inode tell).
fn in_bind_mount(dir: &Path, bind: &Path, args: &[&Path]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--map-root-user", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && shift 2 && exec "$@""#)
        .arg("sh")
        .arg(dir)
        .arg(bind)
        .arg(BIN)
        .arg("sync")
        .arg("--delete")
        .args(args);
    support::isolate(&mut cmd, scratch_home());
    logged(
        "unshare sync",
        cmd.output()
            .expect("unshare (util-linux) must be installed"),
    )
}

#[test]
fn trees_overlapping_through_a_bind_mount_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let bind = tmp.path().join("bind");
    fs::create_dir(&bind).unwrap();
    let before = snapshot(tmp.path());
    // The same directory.
    let out = in_bind_mount(&m, &bind, &[&m, &bind]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    let says = format!(
        "the master {} and the remote {} are the same directory (same device and inode",
        m.display(),
        bind.display()
    );
    assert!(err.contains(&says), "{err}");
    // A remote inside the master, reached through the mount.
    let inner = bind.join("d");
    let out = in_bind_mount(&m, &bind, &[&m, &inner]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let says = format!(
        "the remote {} is inside the master {} (same device and inode",
        inner.display(),
        m.display()
    );
    assert!(stderr(&out).contains(&says), "{out:?}");
    assert_eq!(snapshot(tmp.path()), before);
}

#[test]
fn verify_refuses_overlapping_trees_too() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let r = m.join("d");
    let says = format!(
        "the remote {} is inside the master {}",
        r.display(),
        m.display()
    );
    assert_refused("verify", tmp.path(), &[&m, &r], &[], &says);
}

#[test]
fn separate_trees_sharing_a_name_prefix_are_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    // "m2" starts with the bytes of "m" but is not inside it.
    let r = tmp.path().join("m2");
    fs::create_dir(&r).unwrap();
    let out = sync(&[&m, &r], &["--delete"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(rsync_diff(&m, &r), "");
}

#[test]
fn missing_remote_directory_is_created_and_said_by_itemize() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let new = tmp.path().join("new");
    let out = sync(&[&m, &new], &["-i"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!("mkdir    . (remote root {} created)", new.display())
    );
    assert!(stdout.contains("send     a.txt (new"), "{stdout}");
    assert_eq!(rsync_diff(&m, &new), "");
    // Now it exists: no mkdir line.
    let out = sync(&[&m, &new], &["-i"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("mkdir    . "),
        "{out:?}"
    );
}

#[test]
fn missing_remote_among_several_is_created_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let old = tmp.path().join("old");
    fs::create_dir(&old).unwrap();
    let new = tmp.path().join("new");
    let out = sync(&[&m, &old, &new], &["-i", "--delete"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = format!("{0}: mkdir    . (remote root {0} created)", new.display());
    assert!(stdout.lines().any(|l| l == line), "{stdout}");
    assert!(
        !stdout.contains(&format!("{}: mkdir    . ", old.display())),
        "{stdout}"
    );
    assert_eq!(rsync_diff(&m, &old), "");
    assert_eq!(rsync_diff(&m, &new), "");
}

#[test]
fn dry_run_plans_a_missing_remote_as_empty_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let new = tmp.path().join("new");
    let out = sync(&[&m, &new], &["-n"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!new.exists());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "mkdir    . (remote root {} does not exist; a sync creates it)\n",
            new.display()
        )),
        "{stdout}"
    );
    // Every master entry is planned, as for an empty remote.
    for p in ["a.txt", "d/data.bin", "d/e/conf"] {
        assert!(
            stdout.contains(&format!("send     {p} (new")),
            "{p}: {stdout}"
        );
    }
    // The plan of an empty existing directory, apart from the mkdir line.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let reference = sync(&[&m, &empty], &["-n"]);
    let planned: Vec<&str> = stdout.lines().skip(1).collect();
    let reference = String::from_utf8_lossy(&reference.stdout);
    assert_eq!(planned, reference.lines().collect::<Vec<_>>());
    // --json has it too.
    let out = sync(&[&m, &new], &["-n", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["remotes"][0]["plan"][0]["action"], "mkdir");
    assert_eq!(v["remotes"][0]["plan"][0]["path"], "");
    assert!(!new.exists());
}

#[test]
fn missing_parent_of_a_remote_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let parent = tmp.path().join("nope");
    let new = parent.join("new");
    let before = snapshot(tmp.path());
    let out = sync(&[&m, &new], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the remote {} does not exist and cannot be created: its parent {} does not exist",
            new.display(),
            parent.display()
        )),
        "{err}"
    );
    assert!(!parent.exists());
    assert_eq!(snapshot(tmp.path()), before);
    // A parent that is a file.
    let file = m.join("a.txt");
    let out = sync(&[&m, &file.join("new")], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("is not a directory"), "{out:?}");
    // A missing master is not created.
    let gone = tmp.path().join("gone");
    let out = sync(&[&gone, &tmp.path().join("r")], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains(&format!("the master {}", gone.display())));
    assert!(!gone.exists() && !tmp.path().join("r").exists());
}

/// The sync flags verify takes and ignores.
const SYNC_FLAGS: &[&str] = &[
    "--delete",
    "-n",
    "-i",
    "--lock",
    "--lock-timeout",
    "3",
    "--max-rounds",
    "2",
    "--lock-resync",
    "--no-fsync",
    "--no-checksum-cache",
    "--compress",
    "zstd:3",
    "--bwlimit",
    "10mbit",
    "--master-bwlimit",
    "20M",
    "--no-delta",
];

#[test]
fn verify_takes_the_sync_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let r = tmp.path().join("r");
    // The same flags minus -n, -i: a real sync.
    let sync_flags: Vec<&str> = SYNC_FLAGS
        .iter()
        .copied()
        .filter(|f| !["-n", "-i"].contains(f))
        .collect();
    let out = sync(&[&m, &r], &sync_flags);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(rsync_diff(&m, &r), "");
    let out = run("verify", &[&m, &r], SYNC_FLAGS);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // Drift is still reported (an extra file: counted with or without --delete).
    fs::write(r.join("extra"), b"x").unwrap();
    let before = snapshot(tmp.path());
    let out = run("verify", &[&m, &r], SYNC_FLAGS);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = format!("{}: extra extra (not on master)", r.display());
    assert!(stdout.lines().any(|l| l == line), "{stdout}");
    assert_eq!(snapshot(tmp.path()), before);
    // --help says they are accepted and ignored.
    let help = Command::new(BIN)
        .args(["verify", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("accepted and ignored"), "{help}");
    for flag in [
        "--delete",
        "--lock-timeout",
        "--max-rounds",
        "--bwlimit",
        "--no-delta",
    ] {
        assert!(help.contains(flag), "{flag} not in: {help}");
    }
}

#[test]
fn verify_of_a_missing_remote_reports_it_missing_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let new = tmp.path().join("new");
    let out = run("verify", &[&m, &new], &["--delete"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "{0}: missing . (remote root {0} does not exist)\n",
            new.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("missing a.txt"), "{stdout}");
    assert!(!new.exists());
}
