//! Crash consistency of the block journal: a child process applying a multi-file block is
//! killed at every step (and at random moments); after `recover` the tree is exactly the old
//! or exactly the new version of the block, never a mix, and applying the block again works.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use fleetsync_agent::journal::{
    recover, BlockTxn, JournalAttrs, JournalError, JournalOp, Mtime, RelPath, CRASH_AT_ENV,
    STAGING_DIR,
};

const CHILD_ROOT_ENV: &str = "FLEETSYNC_TEST_CHILD_ROOT";
const CHILD_MODE_ENV: &str = "FLEETSYNC_TEST_CHILD_MODE";
const FILES: usize = 20;

/// A scratch tree. A SIGKILL leaves the page cache intact, so these tests do not depend on
/// fsync; they run on tmpfs (`/dev/shm`), where fsync is free, to stay fast on a loaded
/// machine. `FLEETSYNC_TEST_DISK=1` runs them on the default temp dir (a real disk) instead.
fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if std::env::var_os("FLEETSYNC_TEST_DISK").is_none() && shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().unwrap()
}

/// One entry of a tree snapshot: everything a user could observe.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    File {
        content: Vec<u8>,
        mode: u32,
        mtime: i64,
        nlink: u64,
        owner: (u32, u32),
    },
    Symlink(PathBuf),
    Dir {
        mode: u32,
    },
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if dir == root && e.file_name() == STAGING_DIR {
                continue;
            }
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            let md = fs::symlink_metadata(&path).unwrap();
            let entry = if md.file_type().is_symlink() {
                Entry::Symlink(fs::read_link(&path).unwrap())
            } else if md.is_dir() {
                walk(root, &path, out);
                Entry::Dir {
                    mode: md.mode() & 0o7777,
                }
            } else {
                Entry::File {
                    content: fs::read(&path).unwrap(),
                    mode: md.mode() & 0o7777,
                    mtime: md.mtime(),
                    nlink: md.nlink(),
                    owner: (md.uid(), md.gid()),
                }
            };
            out.insert(rel, entry);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn make_old_tree(root: &Path) {
    fs::create_dir_all(root.join("olddir/sub")).unwrap();
    fs::write(root.join("olddir/sub/inner"), "inner").unwrap();
    for i in 0..FILES {
        fs::write(root.join(format!("f{i:02}")), format!("old {i}")).unwrap();
    }
    fs::write(root.join("victim"), "to be deleted").unwrap();
    fs::write(root.join("exec.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("exec.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink("f00", root.join("link")).unwrap();
    // Fixed mtimes, so that trees made at different moments compare equal.
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    for f in ["olddir/sub/inner", "victim", "exec.sh"]
        .into_iter()
        .map(String::from)
        .chain((0..FILES).map(|i| format!("f{i:02}")))
    {
        let file = fs::File::options().write(true).open(root.join(f)).unwrap();
        file.set_modified(t).unwrap();
    }
}

fn rel(p: &str) -> RelPath {
    RelPath::new(p).unwrap()
}

/// The block under test: 20 replaced files, a new directory with a file, a repointed and a
/// new dangling symlink, a hard link to a file of the block, two deletions and a chmod.
fn apply_new_block(root: &Path) -> Result<(), JournalError> {
    let mut txn = BlockTxn::begin(root, "crash-test")?;
    let attrs = JournalAttrs {
        mode: Some(0o640),
        mtime: Some(Mtime {
            secs: 1_700_000_000,
            nanos: 0,
        }),
        ..JournalAttrs::default()
    };
    // As root, one file also changes owner (fchown on the staged inode).
    let root_user = fs::metadata(root).map(|m| m.uid() == 0).unwrap_or(false);
    for i in 0..FILES {
        let path = rel(&format!("f{i:02}"));
        let mut f = txn.stage_file(&path)?;
        f.write_all(format!("new {i} {}", "x".repeat(i * 100)).as_bytes())
            .unwrap();
        let attrs = if i == 3 && root_user {
            JournalAttrs {
                uid: Some(1234),
                gid: Some(4321),
                mode: Some(0o4750),
                ..attrs
            }
        } else {
            attrs
        };
        txn.add_op(JournalOp::Put { path, attrs })?;
    }
    txn.add_op(JournalOp::Mkdir {
        path: rel("newdir"),
        attrs: JournalAttrs {
            mode: Some(0o750),
            ..JournalAttrs::default()
        },
    })?;
    let inside = rel("newdir/inside");
    txn.stage_file(&inside)?.write_all(b"inside").unwrap();
    txn.add_op(JournalOp::Put {
        path: inside,
        attrs,
    })?;
    txn.add_op(JournalOp::Symlink {
        path: rel("link"),
        target: "f01".into(),
        attrs: JournalAttrs::default(),
    })?;
    txn.add_op(JournalOp::Symlink {
        path: rel("newdir/dangling"),
        target: "../nowhere".into(),
        attrs: JournalAttrs::default(),
    })?;
    txn.add_op(JournalOp::HardLink {
        path: rel("hl"),
        target: rel("f02"),
    })?;
    txn.add_op(JournalOp::Delete {
        path: rel("victim"),
    })?;
    txn.add_op(JournalOp::Delete {
        path: rel("olddir"),
    })?;
    txn.add_op(JournalOp::SetAttrs {
        path: rel("exec.sh"),
        attrs: JournalAttrs {
            mode: Some(0o755),
            mtime: Some(Mtime {
                secs: 1_650_000_000,
                nanos: 5,
            }),
            ..JournalAttrs::default()
        },
    })?;
    txn.commit()
}

/// Child mode: when run by the parent tests, apply the block (or recover) and exit.
#[test]
fn child_mode() {
    let Some(root) = std::env::var_os(CHILD_ROOT_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    match std::env::var(CHILD_MODE_ENV).as_deref() {
        Ok("recover") => {
            recover(&root).unwrap();
        }
        _ => apply_new_block(&root).unwrap(),
    }
}

fn child(root: &Path, mode: &str, crash_at: Option<u64>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_mode", "--test-threads=1", "--quiet"])
        .env(CHILD_ROOT_ENV, root)
        .env(CHILD_MODE_ENV, mode)
        .env_remove(CRASH_AT_ENV)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(n) = crash_at {
        cmd.env(CRASH_AT_ENV, n.to_string());
    }
    cmd
}

fn run_child(root: &Path, mode: &str, crash_at: Option<u64>) -> ExitStatus {
    child(root, mode, crash_at).status().unwrap()
}

fn killed(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    const SIGKILL: i32 = 9;
    status.signal() == Some(SIGKILL)
}

struct Expected {
    old: BTreeMap<PathBuf, Entry>,
    new: BTreeMap<PathBuf, Entry>,
}

fn expected() -> Expected {
    let dir = scratch_dir();
    make_old_tree(dir.path());
    let old = snapshot(dir.path());
    apply_new_block(dir.path()).unwrap();
    let new = snapshot(dir.path());
    assert_ne!(old, new);
    if fs::metadata(dir.path()).unwrap().uid() == 0 {
        // Owner applied before mode, so the set-uid bit survives the chown.
        let Entry::File { mode, owner, .. } = &new[Path::new("f03")] else {
            panic!("f03 is not a file");
        };
        assert_eq!((*mode, *owner), (0o4750, (1234, 4321)));
    }
    Expected { old, new }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum State {
    Old,
    New,
}

/// Recovers `root` and checks it is exactly old or exactly new, with no staging left.
fn recover_and_classify(root: &Path, exp: &Expected, what: &str) -> State {
    recover(root).unwrap_or_else(|e| panic!("{what}: recover failed: {e}"));
    let staging = root.join(STAGING_DIR);
    if staging.exists() {
        assert_eq!(
            fs::read_dir(&staging).unwrap().count(),
            0,
            "{what}: staging left over"
        );
    }
    let snap = snapshot(root);
    if snap == exp.old {
        State::Old
    } else if snap == exp.new {
        State::New
    } else {
        let diff: Vec<_> = exp
            .new
            .iter()
            .filter(|(k, v)| snap.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        panic!("{what}: tree is neither all-old nor all-new; differs from new at {diff:?}");
    }
}

/// Re-applying the block after recovery ("the next sync") completes and gives the new tree.
fn next_sync_completes(root: &Path, exp: &Expected) {
    apply_new_block(root).unwrap();
    assert_eq!(snapshot(root), exp.new);
}

#[test]
fn kill_at_every_step_leaves_block_all_old_or_all_new() {
    let start = Instant::now();
    let exp = expected();
    let mut states = Vec::new();
    for n in 1.. {
        let dir = scratch_dir();
        make_old_tree(dir.path());
        let status = run_child(dir.path(), "apply", Some(n));
        let state = recover_and_classify(dir.path(), &exp, &format!("crash at step {n}"));
        if status.success() {
            assert_eq!(state, State::New, "uncrashed run must give the new tree");
            break;
        }
        assert!(killed(status), "step {n}: child failed: {status}");
        states.push(state);
        next_sync_completes(dir.path(), &exp);
        assert!(n < 10_000, "crash hook never stopped firing");
    }
    // Before the commit point every crash rolls back, after it every crash rolls forward.
    let first_new = states.iter().position(|s| *s == State::New).unwrap();
    assert!(first_new > 0, "no crash left the old tree");
    assert!(states[first_new..].iter().all(|s| *s == State::New));
    eprintln!(
        "journal crash test: {} steps killed ({} rolled back, {} rolled forward) in {:?}",
        states.len(),
        first_new,
        states.len() - first_new,
        start.elapsed()
    );
}

#[test]
fn kill_during_recovery_is_recovered_again() {
    let exp = expected();
    // Find the steps of the apply phase: those whose crash rolls forward.
    let total = (1..)
        .find(|&n| {
            let dir = scratch_dir();
            make_old_tree(dir.path());
            run_child(dir.path(), "apply", Some(n)).success()
        })
        .unwrap();
    let mut iterations = 0;
    // Crash the apply at a few points past the commit point, then crash the recovery itself
    // at every one of its steps.
    for n in [total - 3, total - 10, total - 20, total - 30, total - 45] {
        for m in 1.. {
            let dir = scratch_dir();
            make_old_tree(dir.path());
            assert!(killed(run_child(dir.path(), "apply", Some(n))));
            let status = run_child(dir.path(), "recover", Some(m));
            let what = format!("apply crash at {n}, recovery crash at {m}");
            let state = recover_and_classify(dir.path(), &exp, &what);
            iterations += 1;
            if status.success() {
                break;
            }
            assert!(killed(status), "{what}: {status}");
            assert_eq!(state, State::New, "{what}");
        }
    }
    eprintln!("recovery crash test: {iterations} iterations");
}

#[test]
fn sigkill_at_random_moments_leaves_block_all_old_or_all_new() {
    let exp = expected();
    // Time undisturbed child runs (the fastest of three) to choose kill delays within one.
    let full = (0..3)
        .map(|_| {
            let dir = scratch_dir();
            make_old_tree(dir.path());
            let t = Instant::now();
            assert!(run_child(dir.path(), "apply", None).success());
            t.elapsed()
        })
        .min()
        .unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut counts = [0usize; 3];
    for i in 0..150 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_nanos(seed % (full.as_nanos() as u64 + 1));
        let dir = scratch_dir();
        make_old_tree(dir.path());
        let mut proc = child(dir.path(), "apply", None).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = proc.kill();
        let status = proc.wait().unwrap();
        let state = recover_and_classify(
            dir.path(),
            &exp,
            &format!("random kill {i} after {delay:?}"),
        );
        counts[match (status.success(), state) {
            (true, _) => 2,
            (false, State::Old) => 0,
            (false, State::New) => 1,
        }] += 1;
        next_sync_completes(dir.path(), &exp);
    }
    eprintln!(
        "random kills (child run {full:?}): {} old, {} new, {} finished before the kill",
        counts[0], counts[1], counts[2]
    );
}

#[test]
fn paths_cannot_escape_the_root() {
    let dir = scratch_dir();
    let outside = scratch_dir();
    fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("sneaky")).unwrap();
    let mut txn = BlockTxn::begin(dir.path(), "escape").unwrap();
    let p = rel("sneaky/passwd");
    txn.stage_file(&p).unwrap().write_all(b"evil").unwrap();
    txn.add_op(JournalOp::Put {
        path: p,
        attrs: JournalAttrs::default(),
    })
    .unwrap();
    let err = txn.commit().unwrap_err();
    assert!(
        matches!(err, JournalError::UnsafePath { ref component, .. } if component == Path::new("sneaky")),
        "{err}"
    );
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    // Nothing was left in the staging directory either.
    // The staging directory goes when its last transaction does.
    assert!(!dir.path().join(STAGING_DIR).exists());
    let mut txn = BlockTxn::begin(dir.path(), "escape").unwrap();
    let err = txn
        .add_op(JournalOp::Delete {
            path: rel("real/x"),
        })
        .and_then(|()| {
            txn.add_op(JournalOp::Delete {
                path: rel("real/x"),
            })
        })
        .unwrap_err();
    assert!(matches!(err, JournalError::DuplicatePath { .. }), "{err}");
    assert!(RelPath::new("../etc").is_err());
}

#[test]
fn a_dropped_transaction_leaves_nothing() {
    let dir = scratch_dir();
    make_old_tree(dir.path());
    let before = snapshot(dir.path());
    {
        let mut txn = BlockTxn::begin(dir.path(), "dropped").unwrap();
        let p = rel("f00");
        txn.stage_file(&p).unwrap().write_all(b"never").unwrap();
        txn.add_op(JournalOp::Put {
            path: p,
            attrs: JournalAttrs::default(),
        })
        .unwrap();
    }
    assert_eq!(snapshot(dir.path()), before);
    // The staging directory goes when its last transaction does.
    assert!(!dir.path().join(STAGING_DIR).exists());
}

#[test]
fn replacing_a_directory_by_a_file_and_a_file_by_a_directory() {
    let dir = scratch_dir();
    fs::create_dir_all(dir.path().join("was_dir/x")).unwrap();
    fs::write(dir.path().join("was_file"), "f").unwrap();
    fs::create_dir(dir.path().join("stays_dir")).unwrap();
    let mut txn = BlockTxn::begin(dir.path(), "kinds").unwrap();
    let p = rel("was_dir");
    txn.stage_file(&p)
        .unwrap()
        .write_all(b"now a file")
        .unwrap();
    txn.add_op(JournalOp::Put {
        path: p,
        attrs: JournalAttrs::default(),
    })
    .unwrap();
    txn.add_op(JournalOp::Mkdir {
        path: rel("was_file"),
        attrs: JournalAttrs::default(),
    })
    .unwrap();
    txn.add_op(JournalOp::Mkdir {
        path: rel("stays_dir"),
        attrs: JournalAttrs {
            mode: Some(0o700),
            ..JournalAttrs::default()
        },
    })
    .unwrap();
    txn.commit().unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("was_dir")).unwrap(),
        "now a file"
    );
    assert!(dir.path().join("was_file").is_dir());
    let mode = fs::metadata(dir.path().join("stays_dir")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o700);
}

#[test]
fn recover_leaves_a_live_transaction_alone() {
    let dir = scratch_dir();
    make_old_tree(dir.path());
    let mut txn = BlockTxn::begin(dir.path(), "live").unwrap();
    let p = rel("f00");
    txn.stage_file(&p).unwrap().write_all(b"live").unwrap();
    txn.add_op(JournalOp::Put {
        path: p,
        attrs: JournalAttrs::default(),
    })
    .unwrap();
    let report = recover(dir.path()).unwrap();
    assert_eq!(report.in_use, [txn.id().to_owned()]);
    txn.commit().unwrap();
    assert_eq!(fs::read(dir.path().join("f00")).unwrap(), b"live");
}

#[test]
fn operations_beneath_a_replaced_or_deleted_path_are_refused() {
    let dir = scratch_dir();
    make_old_tree(dir.path());
    let mut txn = BlockTxn::begin(dir.path(), "conflict").unwrap();
    txn.add_op(JournalOp::Delete {
        path: rel("olddir"),
    })
    .unwrap();
    let err = txn
        .add_op(JournalOp::SetAttrs {
            path: rel("olddir/sub/inner"),
            attrs: JournalAttrs::default(),
        })
        .unwrap_err();
    assert!(matches!(err, JournalError::ConflictingOps { .. }), "{err}");
    // The other way round too: a deletion of an ancestor after an operation beneath it.
    let mut txn = BlockTxn::begin(dir.path(), "conflict").unwrap();
    txn.add_op(JournalOp::Mkdir {
        path: rel("olddir/new"),
        attrs: JournalAttrs::default(),
    })
    .unwrap();
    assert!(txn
        .add_op(JournalOp::Delete {
            path: rel("olddir"),
        })
        .is_err());
    // But a directory that is only (re)created may receive files.
    txn.add_op(JournalOp::Mkdir {
        path: rel("olddir/new/deeper"),
        attrs: JournalAttrs::default(),
    })
    .unwrap();
    txn.commit().unwrap();
    assert!(dir.path().join("olddir/new/deeper").is_dir());
}
