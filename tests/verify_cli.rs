//! `fleetsync verify` (issue 5, consistency loop): reports drift of every remote from the master
//! without changing anything — exit 0 in sync, 1 on drift, 2 when something cannot be reached —
//! and reads the data (no checksum cache) on both sides.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use support::{fleetsync, listening, logged, rsync_diff, Proc, Token, BIN};

/// `fleetsync agent` on `root` with its checksum cache under `cache` (not the user's).
fn agent(token: &Token, root: &Path, cache: &Path) -> (Proc, String) {
    listening(
        token
            .agent_command(root)
            .env("XDG_CACHE_HOME", cache)
            .stderr(Stdio::inherit()),
    )
}

fn verify(token: &Token, server: &str, master: &str, remotes: &[&str]) -> Output {
    let out = Command::new(BIN)
        .arg("verify")
        .args(["--server", server, "--master", master, "--token-file"])
        .arg(&token.file)
        .args(remotes)
        .output()
        .unwrap();
    logged("verify", out)
}

/// Everything observable about a tree: per path, kind, bytes / link target, mode, mtime, inode.
fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, i64, i64, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32, i64, i64, u64)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
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
            let t = (data, md.mode(), md.mtime(), md.mtime_nsec(), md.ino());
            out.insert(rel, t);
            if md.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn make_master(m: &Path) {
    fs::create_dir_all(m.join("d/e")).unwrap();
    fs::write(m.join("a.txt"), b"alpha\n").unwrap();
    fs::write(m.join("d/data.bin"), vec![7u8; 100_000]).unwrap();
    fs::write(m.join("d/e/conf"), b"key = value\n").unwrap();
    fs::hard_link(m.join("a.txt"), m.join("d/a-link")).unwrap();
    std::os::unix::fs::symlink("../a.txt", m.join("d/ln")).unwrap();
    fs::set_permissions(m.join("d/e/conf"), fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn verify_reports_drift_reads_the_data_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r, cache) = (
        tmp.path().join("m"),
        tmp.path().join("r"),
        tmp.path().join("cache"),
    );
    make_master(&m);
    fs::create_dir_all(&r).unwrap();
    let token = Token::new();
    let (_s, server) = token.server();
    let (_ma, master) = agent(&token, &m, &cache);
    let (_ra, remote) = agent(&token, &r, &cache);

    assert!(token.sync(&server, &master, &[&remote]).status.success());
    // Past the checksum cache's 2 s racy window, so this sync caches both sides' digests.
    std::thread::sleep(Duration::from_millis(2200));
    assert!(token.sync(&server, &master, &[&remote]).status.success());

    // Identical: exit 0, nothing listed, and rsync agrees.
    let out = verify(&token, &server, &master, &[&remote]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert_eq!(rsync_diff(&m, &r), "");

    // Same size, same mtime, different content, after the cache was warmed.
    let f = r.join("d/data.bin");
    let mtime = fs::metadata(&f).unwrap().modified().unwrap();
    let mut data = fs::read(&f).unwrap();
    data[50_000] = 8;
    fs::write(&f, &data).unwrap();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(fs::metadata(&f).unwrap().modified().unwrap(), mtime);
    let before = snapshot(&r);
    let out = verify(&token, &server, &master, &[&remote]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("content d/data.bin"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert_eq!(snapshot(&r), before, "verify changed the remote tree");

    // An extra remote file is drift too (and is not deleted).
    fs::write(r.join("d/extra"), b"x").unwrap();
    let before = snapshot(&r);
    let out = verify(&token, &server, &master, &[&remote]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("extra d/extra"), "{stdout}");
    assert!(stdout.contains("content d/data.bin"), "{stdout}");
    assert_eq!(snapshot(&r), before, "verify changed the remote tree");

    // A sync repairs both; verify agrees, and so does rsync.
    assert!(token.sync(&server, &master, &[&remote]).status.success());
    let out = verify(&token, &server, &master, &[&remote]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    assert_eq!(rsync_diff(&m, &r), "");
}

#[test]
fn embedded_verify_names_each_kind_of_drift() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("m"), tmp.path().join("r"));
    make_master(&m);
    fs::create_dir_all(&r).unwrap();
    let run = |args: &[&Path]| {
        let out = fleetsync(&tmp.path().join("home"))
            .arg("verify")
            .args(args)
            .output()
            .unwrap();
        eprintln!("{out:?}");
        out
    };
    let out = run(&[&m, &r]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("missing a.txt"), "{stdout}");
    assert!(stdout.contains("missing d/ln"), "{stdout}");
    assert_eq!(snapshot(&r).len(), 0, "verify wrote into the remote");

    let sync = fleetsync(&tmp.path().join("home"))
        .arg("sync")
        .arg(&m)
        .arg(&r)
        .output()
        .unwrap();
    assert!(sync.status.success(), "{sync:?}");
    let out = run(&[&m, &r]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(rsync_diff(&m, &r), "");

    // mode, mtime, symlink target, hard-link grouping.
    fs::set_permissions(r.join("d/e/conf"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::File::options()
        .write(true)
        .open(r.join("a.txt"))
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    fs::remove_file(r.join("d/ln")).unwrap();
    std::os::unix::fs::symlink("elsewhere", r.join("d/ln")).unwrap();
    fs::remove_file(r.join("d/a-link")).unwrap();
    fs::copy(r.join("a.txt"), r.join("d/a-link")).unwrap();
    let before = snapshot(&r);
    let out = run(&[&m, &r]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("attrs d/e/conf (mode"), "{stdout}");
    assert!(stdout.contains("a.txt (mtime"), "{stdout}");
    assert!(stdout.contains("symlink d/ln"), "{stdout}");
    assert!(stdout.contains("d/a-link"), "{stdout}");
    assert_eq!(snapshot(&r), before, "verify changed the remote tree");

    // The same drift as one JSON document.
    let out = fleetsync(&tmp.path().join("home"))
        .args(["verify", "--json"])
        .arg(&m)
        .arg(&r)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    let remotes = doc["remotes"].as_array().unwrap();
    assert_eq!(remotes.len(), 1);
    assert_eq!(remotes[0]["remote"], r.to_str().unwrap());
    assert_eq!(remotes[0]["verified"], true);
    assert!(remotes[0]["error"].is_null());
    let drift: Vec<(String, String)> = remotes[0]["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [("attrs", "d/e/conf"), ("symlink", "d/ln")] {
        assert!(
            drift.iter().any(|(k, p)| (k.as_str(), p.as_str()) == want),
            "{want:?} not in {drift:?}"
        );
    }
    assert!(drift.iter().any(|(_, p)| p == "a.txt"), "{drift:?}");
    assert!(drift.iter().any(|(_, p)| p == "d/a-link"), "{drift:?}");
    assert_eq!(
        snapshot(&r),
        before,
        "verify --json changed the remote tree"
    );

    // In sync: ok, no drift.
    let r2 = tmp.path().join("r2");
    fs::create_dir_all(&r2).unwrap();
    let sync = fleetsync(&tmp.path().join("home"))
        .arg("sync")
        .arg(&m)
        .arg(&r2)
        .output()
        .unwrap();
    assert!(sync.status.success(), "{sync:?}");
    let out = fleetsync(&tmp.path().join("home"))
        .args(["verify", "--json"])
        .arg(&m)
        .arg(&r2)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["remotes"][0]["drift"].as_array().unwrap().len(), 0);
}

#[test]
fn unreachable_or_bad_usage_is_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let token = Token::new();
    // Nothing listens on port 1.
    let out = verify(&token, "127.0.0.1:1", "127.0.0.1:1", &["127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .arg("verify")
        .arg(tmp.path())
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = Command::new(BIN).arg("verify").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn verify_honours_the_classification() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("m"), tmp.path().join("r"));
    fs::create_dir_all(&m).unwrap();
    fs::write(m.join("a.txt"), b"a").unwrap();
    let run = |extra: &[&str]| {
        let sync = fleetsync(&tmp.path().join("home"))
            .arg("sync")
            .arg(&m)
            .arg(&r)
            .output()
            .unwrap();
        assert!(sync.status.success(), "{sync:?}");
        let out = fleetsync(&tmp.path().join("home"))
            .arg("verify")
            .args(extra)
            .arg(&m)
            .arg(&r)
            .output()
            .unwrap();
        eprintln!("{out:?}");
        out
    };
    fs::create_dir_all(&r).unwrap();
    fs::write(r.join("x.log"), b"local").unwrap();
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("extra x.log"));
    let out = run(&["--exclude", "*.log"]);
    assert_eq!(out.status.code(), Some(0), "excluded entries are not drift");
    assert_eq!(fs::read(r.join("x.log")).unwrap(), b"local");

    // Rules apply in the order given, first match wins (rsync): an --include before the
    // --exclude keeps x.log in (drift), after it x.log stays excluded.
    let out = run(&["--include", "x.log", "--exclude", "*.log"]);
    assert_eq!(out.status.code(), Some(1), "x.log is included first");
    assert!(String::from_utf8_lossy(&out.stdout).contains("extra x.log"));
    let out = run(&["--exclude", "*.log", "--include", "x.log"]);
    assert_eq!(out.status.code(), Some(0), "x.log is excluded first");
}
