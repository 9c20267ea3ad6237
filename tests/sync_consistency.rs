//! The consistency loop (issue 5): after its transfers every remote checks what it received;
//! inconsistent files are synchronized again and checked again, up to `--max-rounds`; files
//! still inconsistent then fail the remote, named with why. Real `fleetsync` server and
//! agent processes; where a remote must be interfered with at an exact moment it is an
//! in-process agent built with the library API and a test check plug-in. rsync is the
//! referee of the end state.

mod support;

use std::fs;
use std::io::{Read, Seek, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleetsync_agent::consistency::{
    ConsistencyCheck, Inconsistency, Problem, ReceivedFile, RecordedStateCheck,
};
use fleetsync_agent::journal::RelPath;
use fleetsync_agent::lock::{FileLock, LockKind, LockOptions};
use fleetsync_agent::{Agent, AgentHandle};
use serde_json::Value;
use support::{listening, logged, rsync_diff, Token, BIN, TOKEN};

const CONF: &str = "etc/app.conf";

/// A master tree: a few files, one of them `etc/app.conf`, with old fixed mtimes.
fn master_tree(root: &Path) {
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("www")).unwrap();
    fs::write(root.join(CONF), "port = 80\nthreads = 4\n").unwrap();
    fs::write(root.join("etc/db.conf"), "host = db1\n").unwrap();
    fs::write(root.join("www/index.html"), "<h1>hello</h1>\n".repeat(100)).unwrap();
    fs::write(root.join("empty"), "").unwrap();
    // Directory mtimes well in the past: a file renamed into a directory on the remote
    // (a re-sync) changes that directory's mtime, which must then be put back.
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    for d in ["etc", "www", ""] {
        fs::File::open(root.join(d))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
}

/// Runs `fleetsync sync --server ... EXTRA... REMOTES...`.
fn sync(token: &Token, saddr: &str, maddr: &str, remotes: &[&str], extra: &[&str]) -> Output {
    let mut cmd = token.sync_command(saddr, maddr, &[]);
    cmd.args(extra).args(remotes);
    logged(&format!("sync {extra:?}"), cmd.output().unwrap())
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// An in-process remote agent on 127.0.0.1 whose consistency checks are `checks`.
fn library_agent(
    root: &Path,
    write_log: &Path,
    checks: Vec<Box<dyn ConsistencyCheck>>,
) -> (AgentHandle, String) {
    let agent = Agent::new(root, Some(TOKEN.to_vec()), None)
        .unwrap()
        .with_write_log(Some(write_log))
        .unwrap()
        .with_checks(checks);
    let handle = agent
        .serve(TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let addr = handle.local_addr().to_string();
    (handle, addr)
}

/// Test plug-in standing for an application writing to the remote copy of `path` right
/// after the sync applied it and before the check: during its first `rounds` calls it
/// changes one byte in place and puts the mtime back (same size, inode and mtime: only the
/// recomputed checksum can see it). It reports nothing itself; the built-in check, run
/// after it, must. (A real check must never modify the tree.)
struct Interferer {
    path: PathBuf,
    rounds: u32,
    calls: AtomicU32,
    /// Keep a shared lock on the file after writing it (a cooperating reader of it).
    hold_lock: bool,
    held: Mutex<Vec<FileLock>>,
}

impl Interferer {
    fn new(path: &str, rounds: u32) -> Self {
        Interferer {
            path: PathBuf::from(path),
            rounds,
            calls: AtomicU32::new(0),
            hold_lock: false,
            held: Mutex::default(),
        }
    }
}

impl ConsistencyCheck for Interferer {
    fn name(&self) -> &str {
        "test-interferer"
    }

    fn check(&self, root: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.rounds && files.iter().any(|f| f.path.as_path() == self.path) {
            let p = root.join(&self.path);
            let mtime = fs::metadata(&p).unwrap().modified().unwrap();
            let mut f = fs::File::options().read(true).write(true).open(&p).unwrap();
            let mut first = [0u8];
            f.read_exact(&mut first).unwrap();
            f.rewind().unwrap();
            f.write_all(&[first[0] ^ 0x20]).unwrap();
            f.set_modified(mtime).unwrap();
            if self.hold_lock {
                let rel = RelPath::new(&self.path).unwrap();
                let lock =
                    FileLock::open_beneath(root, &rel, LockKind::Shared, &LockOptions::default())
                        .unwrap();
                self.held.lock().unwrap().push(lock);
            }
        }
        Vec::new()
    }
}

/// The second implementation of the plug-in trait: a deployment's own validator of its
/// configuration files. Every `.conf` must be `key = value` lines; and during its first
/// `busy_rounds` calls it rejects every `.conf` (as an application that has not yet
/// reloaded would). It also remembers the inode each file had when first checked.
struct ConfValidator {
    busy_rounds: u32,
    calls: AtomicU32,
    first_inode: AtomicU64,
}

impl ConfValidator {
    fn new(busy_rounds: u32) -> Self {
        ConfValidator {
            busy_rounds,
            calls: AtomicU32::new(0),
            first_inode: AtomicU64::new(0),
        }
    }
}

impl ConsistencyCheck for ConfValidator {
    fn name(&self) -> &str {
        "conf-validator"
    }

    fn check(&self, root: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::new();
        for f in files
            .iter()
            .filter(|f| f.path.as_path().extension().is_some_and(|e| e == "conf"))
        {
            if f.path.as_path() == Path::new(CONF) {
                let _ = self.first_inode.compare_exchange(
                    0,
                    f.inode,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            let text = fs::read_to_string(root.join(f.path.as_path())).unwrap_or_default();
            let bad_line = text
                .lines()
                .position(|l| !l.starts_with('#') && l.split_once(" = ").is_none());
            let why = if let Some(n) = bad_line {
                Some(format!("validator: line {} is not `key = value`", n + 1))
            } else if call < self.busy_rounds {
                Some("validator: service has not reloaded it yet".to_owned())
            } else {
                None
            };
            if let Some(why) = why {
                out.push(Inconsistency {
                    path: f.path.as_path().to_owned(),
                    check: self.name().to_owned(),
                    problem: Problem::Other(why),
                });
            }
        }
        out
    }
}

/// The fields of a write-log line: path, size, mtime, inode.
fn write_log_entries(log: &Path) -> Vec<(String, u64, String, u64)> {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 7, "{l:?}");
            assert_eq!(f[0], "v1");
            (
                f[1].to_owned(),
                f[4].parse().unwrap(),
                f[5].to_owned(),
                f[6].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_normal_sync_is_checked_once_and_matches_rsync() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    master_tree(&master);
    fs::create_dir_all(&remote).unwrap();
    let log = tmp.path().join("state/remote.writes");
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let (_r, raddr) = listening(
        token
            .agent_command(&remote)
            .arg("--write-log")
            .arg(&log)
            .stderr(Stdio::inherit()),
    );
    let (_s, saddr) = token.server_recording(&tmp.path().join("jobs.sqlite"));

    let out = sync(&token, &saddr, &maddr, &[&raddr], &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    let r = &v["remotes"][0];
    assert_eq!(r["ok"], true);
    assert_eq!(r["transferred"], 4);
    assert_eq!(r["rounds"], 1, "{r}");
    assert_eq!(r["resynced"], 0);
    assert_eq!(r["inconsistent"], serde_json::json!([]));
    assert_eq!(rsync_diff(&master, &remote), "");

    // The agent's write log names each received file as it is on disk now.
    let mut entries = write_log_entries(&log);
    entries.sort();
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        ["empty", "etc/app.conf", "etc/db.conf", "www/index.html"]
    );
    for (path, size, mtime, inode) in &entries {
        let md = fs::metadata(remote.join(path)).unwrap();
        assert_eq!(*size, md.size(), "{path}");
        assert_eq!(*inode, md.ino(), "{path}");
        assert_eq!(
            *mtime,
            format!("{}.{}", md.mtime(), md.mtime_nsec()),
            "{path}"
        );
    }

    // The summary line says it too.
    fs::write(master.join("www/new.html"), "new\n").unwrap();
    let out = sync(&token, &saddr, &maddr, &[&raddr], &[]);
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sent 1 files (4 bytes, 4 on the wire), 0 deleted, ")
            && stderr.contains(" other changes, 1 consistency round(s)"),
        "{stderr}"
    );

    // Nothing received, nothing to check; --max-rounds 0 turns the check off.
    let out = sync(&token, &saddr, &maddr, &[&raddr], &["--json"]);
    assert_eq!(json(&out)["remotes"][0]["rounds"], 0);
    fs::write(master.join("www/newer.html"), "newer\n").unwrap();
    let out = sync(
        &token,
        &saddr,
        &maddr,
        &[&raddr],
        &["--json", "--max-rounds", "0"],
    );
    let r = &json(&out)["remotes"][0];
    assert_eq!(
        (r["ok"].clone(), r["transferred"].clone()),
        (Value::Bool(true), 1.into())
    );
    assert_eq!(r["rounds"], 0);
    assert_eq!(rsync_diff(&master, &remote), "");
}

#[test]
fn a_write_log_inside_the_tree_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let token = Token::new();
    let out = Command::new(BIN)
        .arg("agent")
        .arg("--root")
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token.file)
        .arg("--write-log")
        .arg(tmp.path().join("sub/writes.log"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("writes.log") && stderr.contains("outside the served tree"),
        "{stderr}"
    );
    assert!(
        !tmp.path().join("sub").exists(),
        "nothing created in the tree"
    );
}

#[test]
fn a_file_changed_after_it_was_applied_is_sent_again_and_then_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    master_tree(&master);
    fs::create_dir_all(&remote).unwrap();
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let log = tmp.path().join("r.writes");
    let (_h, raddr) = library_agent(
        &remote,
        &log,
        vec![
            Box::new(Interferer::new(CONF, 1)),
            Box::new(RecordedStateCheck::new(Some(log.clone()))),
        ],
    );
    let (_s, saddr) = token.server_recording(&tmp.path().join("jobs.sqlite"));

    let out = sync(&token, &saddr, &maddr, &[&raddr], &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let r = &json(&out)["remotes"][0];
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["rounds"], 2, "{r}");
    assert_eq!(r["resynced"], 1, "{r}");
    assert_eq!(r["transferred"], 4);
    assert_eq!(rsync_diff(&master, &remote), "");
    assert_eq!(
        fs::read(remote.join(CONF)).unwrap(),
        fs::read(master.join(CONF)).unwrap()
    );
}

#[test]
fn a_file_that_keeps_changing_fails_its_remote_after_max_rounds_and_others_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, busy, calm) = (
        tmp.path().join("m"),
        tmp.path().join("busy"),
        tmp.path().join("calm"),
    );
    master_tree(&master);
    fs::create_dir_all(&busy).unwrap();
    fs::create_dir_all(&calm).unwrap();
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let (_c, caddr) = token.agent(&calm);
    let log = tmp.path().join("busy.writes");
    let (_h, baddr) = library_agent(
        &busy,
        &log,
        vec![
            Box::new(Interferer::new(CONF, u32::MAX)),
            Box::new(RecordedStateCheck::new(Some(log.clone()))),
        ],
    );
    let db = tmp.path().join("jobs.sqlite");
    let (_s, saddr) = token.server_recording(&db);

    let out = sync(
        &token,
        &saddr,
        &maddr,
        &[&baddr, &caddr],
        &["--max-rounds", "3"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{baddr}: FAILED: 1 file(s) still inconsistent after 3 consistency round(s): {CONF}: content changed"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("[recorded-state]"), "{stderr}");
    // The other remote is done after its single round, in sync.
    assert!(
        stderr.contains(&format!("{caddr}: sent 4 files"))
            && stderr.contains("1 consistency round(s)"),
        "{stderr}"
    );
    assert_eq!(rsync_diff(&master, &calm), "");

    // The job history has the rounds of each remote, and the error naming the file.
    let show = Command::new(BIN)
        .args(["jobs", "show", "1", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(show.status.success(), "{show:?}");
    let d: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(d["status"], "failed");
    let results = d["results"].as_array().unwrap();
    let busy_rec = results
        .iter()
        .find(|r| r["remote"] == baddr.as_str())
        .unwrap();
    let calm_rec = results
        .iter()
        .find(|r| r["remote"] == caddr.as_str())
        .unwrap();
    assert_eq!(busy_rec["counts"]["rounds"], 3);
    assert!(
        busy_rec["error"].as_str().unwrap().contains(CONF),
        "{busy_rec}"
    );
    assert_eq!(calm_rec["counts"]["rounds"], 1);
    assert!(calm_rec["error"].is_null());
    let human = Command::new(BIN)
        .args(["jobs", "show", "1", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("rounds 3") && human.contains("rounds 1"),
        "{human}"
    );

    // JSON: the inconsistent files and why, per remote.
    let out = sync(
        &token,
        &saddr,
        &maddr,
        &[&baddr],
        &["--json", "--max-rounds", "2"],
    );
    assert_eq!(out.status.code(), Some(1));
    let r = &json(&out)["remotes"][0];
    assert_eq!(r["rounds"], 2);
    assert_eq!(r["inconsistent"][0]["path"], CONF);
    assert!(
        r["inconsistent"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("content changed (checksum "),
        "{r}"
    );
}

#[test]
fn a_deployment_validator_is_consulted_and_a_passing_recheck_needs_no_resend() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    master_tree(&master);
    fs::create_dir_all(&remote).unwrap();
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let log = tmp.path().join("r.writes");
    let validator = Arc::new(ConfValidator::new(1));
    struct Shared(Arc<ConfValidator>);
    impl ConsistencyCheck for Shared {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn check(&self, root: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency> {
            self.0.check(root, files)
        }
    }
    let agent = Agent::new(&remote, Some(TOKEN.to_vec()), None)
        .unwrap()
        .with_write_log(Some(&log))
        .unwrap()
        .with_check(Box::new(Shared(validator.clone())));
    let handle = agent
        .serve(TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let raddr = handle.local_addr().to_string();
    let (_s, saddr) = token.server_recording(&tmp.path().join("jobs.sqlite"));

    // --max-rounds 1: checked once, nothing synchronized again, both .conf files named.
    let out = sync(
        &token,
        &saddr,
        &maddr,
        &[&raddr],
        &["--json", "--max-rounds", "1"],
    );
    assert_eq!(out.status.code(), Some(1));
    let r = &json(&out)["remotes"][0];
    assert_eq!(
        (r["rounds"].clone(), r["resynced"].clone()),
        (1.into(), 0.into())
    );
    let bad: Vec<&str> = r["inconsistent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(bad, ["etc/app.conf", "etc/db.conf"]);
    assert_eq!(
        r["inconsistent"][0]["message"],
        "validator: service has not reloaded it yet [conf-validator]"
    );

    // A busy first round clears on the second: same content on both sides, so nothing is
    // sent again (the file keeps the inode it was committed with).
    for e in fs::read_dir(&remote).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }
    validator.calls.store(0, Ordering::SeqCst);
    validator.first_inode.store(0, Ordering::SeqCst);
    let out = sync(&token, &saddr, &maddr, &[&raddr], &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let r = &json(&out)["remotes"][0];
    assert_eq!(
        (r["rounds"].clone(), r["resynced"].clone()),
        (2.into(), 2.into())
    );
    assert_eq!(
        fs::metadata(remote.join(CONF)).unwrap().ino(),
        validator.first_inode.load(Ordering::SeqCst)
    );
    assert_eq!(rsync_diff(&master, &remote), "");

    // A master file the validator always rejects: named after the last round, with why.
    fs::write(master.join("etc/db.conf"), "host db1\n").unwrap();
    let out = sync(&token, &saddr, &maddr, &[&raddr], &["--max-rounds", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "1 file(s) still inconsistent after 2 consistency round(s): etc/db.conf: \
             validator: line 1 is not `key = value` [conf-validator]"
        ),
        "{stderr}"
    );
    drop(handle);
}

#[test]
fn lock_resync_locks_the_files_synchronized_again() {
    for lock_resync in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
        master_tree(&master);
        fs::create_dir_all(&remote).unwrap();
        let token = Token::new();
        let (_m, maddr) = token.agent(&master);
        let log = tmp.path().join("r.writes");
        // The application writes the file and then keeps reading it under a shared lock.
        let mut app = Interferer::new(CONF, 1);
        app.hold_lock = true;
        let (_h, raddr) = library_agent(
            &remote,
            &log,
            vec![
                Box::new(app),
                Box::new(RecordedStateCheck::new(Some(log.clone()))),
            ],
        );
        let (_s, saddr) = token.server_recording(&tmp.path().join("jobs.sqlite"));
        let mut extra = vec!["--json", "--lock-timeout", "0.2"];
        if lock_resync {
            extra.push("--lock-resync");
        }
        let out = sync(&token, &saddr, &maddr, &[&raddr], &extra);
        let r = &json(&out)["remotes"][0];
        assert_eq!(r["rounds"], if lock_resync { 1 } else { 2 }, "{r}");
        if lock_resync {
            // The first transfers were not locked; the re-send waits for the reader's lock
            // and fails naming it.
            assert_eq!(out.status.code(), Some(1));
            let f = &r["failures"][0];
            assert_eq!(f["path"], CONF, "{r}");
            let msg = f["message"].as_str().unwrap();
            assert!(
                msg.starts_with("synchronizing the inconsistent file again: ")
                    && msg.contains("exclusive lock")
                    && msg.contains("within 200"),
                "{msg}"
            );
        } else {
            assert_eq!(out.status.code(), Some(0));
            assert_eq!(rsync_diff(&master, &remote), "");
        }
    }
}
