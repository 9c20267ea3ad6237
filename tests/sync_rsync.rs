//! End-to-end: agents and the server run as real processes on 127.0.0.1, and
//! rsync is the referee: after `fleetsync sync`, `rsync -aHc -n -i --delete
//! MASTER/ REMOTE/` must print nothing for every remote.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod support;
use support::{fleetsync, scratch_home, spawn_listening, unhex, Proc};

fn spawn_agent(root: &Path, token_file: &Path) -> (Proc, String) {
    spawn_listening(&[
        "agent".as_ref(),
        "--root".as_ref(),
        root.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--token-file".as_ref(),
        token_file.as_os_str(),
        "--no-fsync".as_ref(),
    ])
}

/// A server and one agent per tree, all real processes.
struct Cluster {
    _dir: tempfile::TempDir,
    token_file: PathBuf,
    server: String,
    master: String,
    remotes: Vec<String>,
    procs: Vec<Proc>,
}

impl Cluster {
    fn new(master: &Path, remotes: &[&Path]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        fs::write(&token_file, "test-token-0123456789\n").unwrap();
        let mut procs = Vec::new();
        let mut agent = |root: &Path| {
            let (p, addr) = spawn_listening(&[
                "agent".as_ref(),
                "--root".as_ref(),
                root.as_os_str(),
                "--listen".as_ref(),
                "127.0.0.1:0".as_ref(),
                "--token-file".as_ref(),
                token_file.as_os_str(),
                "--no-fsync".as_ref(),
            ]);
            procs.push(p);
            addr
        };
        let master_addr = agent(master);
        let remote_addrs: Vec<String> = remotes.iter().map(|r| agent(r)).collect();
        let (p, server) = spawn_listening(&[
            "server".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--token-file".as_ref(),
            token_file.as_os_str(),
        ]);
        procs.push(p);
        Cluster {
            _dir: dir,
            token_file,
            server,
            master: master_addr,
            remotes: remote_addrs,
            procs,
        }
    }

    fn sync_to(&self, remotes: &[String], extra: &[&str]) -> Output {
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("sync")
            .arg("--server")
            .arg(&self.server)
            .arg("--master")
            .arg(&self.master)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(extra)
            .args(remotes);
        let out = cmd.output().unwrap();
        eprintln!(
            "sync {extra:?}: status {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn sync(&self, extra: &[&str]) -> Output {
        self.sync_to(&self.remotes, extra)
    }
}

/// Runs the referee; returns its itemized output (empty = identical).
fn rsync_diff(master: &Path, remote: &Path) -> String {
    let out = Command::new("rsync")
        .arg("-aHc")
        .arg("-n")
        .arg("-i")
        .arg("--delete")
        .arg(format!("{}/", master.display()))
        .arg(format!("{}/", remote.display()))
        .output()
        .expect("rsync must be installed (`bash .ci/setup` installs it)");
    assert!(out.status.success(), "rsync failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_in_sync(master: &Path, remotes: &[&Path]) {
    for r in remotes {
        let d = rsync_diff(master, r);
        assert!(d.is_empty(), "{} differs from master:\n{d}", r.display());
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn transferred(v: &serde_json::Value) -> Vec<u64> {
    v["remotes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["transferred"].as_u64().unwrap())
        .collect()
}

struct Trees {
    _tmp: tempfile::TempDir,
    master: PathBuf,
    remotes: Vec<PathBuf>,
}

impl Trees {
    fn new(n: usize) -> Trees {
        let tmp = tempfile::tempdir().unwrap();
        let master = tmp.path().join("master");
        fs::create_dir(&master).unwrap();
        let remotes = (0..n)
            .map(|i| {
                let r = tmp.path().join(format!("remote{i}"));
                fs::create_dir(&r).unwrap();
                r
            })
            .collect();
        Trees {
            _tmp: tmp,
            master,
            remotes,
        }
    }
    fn remote_refs(&self) -> Vec<&Path> {
        self.remotes.iter().map(PathBuf::as_path).collect()
    }
    fn cluster(&self) -> Cluster {
        Cluster::new(&self.master, &self.remote_refs())
    }
}

fn write(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, data).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_mtime(path: &Path, secs: i64) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs as u64))
        .unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// A small tree with a bit of everything.
fn populate(m: &Path) {
    write(&m.join("a.txt"), b"alpha\n");
    write(&m.join("dir/b.bin"), &[7u8; 5000]);
    write(&m.join("dir/sub/c"), b"c");
    write(&m.join("empty-file"), b"");
    fs::create_dir_all(m.join("empty-dir")).unwrap();
    symlink("a.txt", m.join("link")).unwrap();
    chmod(&m.join("dir/b.bin"), 0o600);
    if is_root() {
        lchown(&m.join("a.txt"), 1234, 5678);
        lchown(&m.join("dir"), 4321, 8765);
        lchown(&m.join("link"), 42, 43);
    }
}

#[test]
fn empty_remotes_receive_everything() {
    let t = Trees::new(2);
    populate(&t.master);
    let c = t.cluster();
    let out = c.sync(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn changed_content_with_same_size_and_mtime_is_found_by_checksum() {
    let t = Trees::new(1);
    populate(&t.master);
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    let (m, r) = (t.master.join("a.txt"), t.remotes[0].join("a.txt"));
    let mtime = fs::metadata(&m).unwrap().modified().unwrap();
    fs::write(&r, b"ALPHA\n").unwrap();
    fs::File::options()
        .write(true)
        .open(&r)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(!rsync_diff(&t.master, &t.remotes[0]).is_empty());
    let out = c.sync(&["--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(transferred(&json(&out)), vec![1]);
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn extra_files_and_directories_are_deleted_with_delete_only() {
    let t = Trees::new(1);
    populate(&t.master);
    let r = &t.remotes[0];
    write(&r.join("extra.txt"), b"x");
    write(&r.join("extra-dir/deep/file"), b"y");
    symlink("nowhere", r.join("dir-extra-link")).unwrap();
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert!(r.join("extra.txt").exists(), "no --delete: extras stay");
    assert_eq!(c.sync(&["--delete"]).status.code(), Some(0));
    assert!(!r.join("extra-dir").exists());
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn mode_only_changes_are_fixed_without_transfer() {
    let t = Trees::new(1);
    populate(&t.master);
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    chmod(&t.master.join("a.txt"), 0o751);
    chmod(&t.master.join("dir/sub"), 0o700);
    set_mtime(&t.master.join("dir/b.bin"), 1_000_000_000);
    let out = c.sync(&["--json"]);
    assert_eq!(transferred(&json(&out)), vec![0]);
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn symlinks_new_changed_and_dangling() {
    let t = Trees::new(1);
    populate(&t.master);
    let (m, r) = (&t.master, &t.remotes[0]);
    symlink("dir/b.bin", m.join("changed")).unwrap();
    symlink("does/not/exist", m.join("dangling")).unwrap();
    symlink("old-target", r.join("changed")).unwrap();
    write(&r.join("was-file"), b"file");
    symlink("a.txt", m.join("was-file")).unwrap();
    fs::create_dir_all(r.join("was-dir/x")).unwrap();
    symlink("dir", m.join("was-dir")).unwrap();
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert_eq!(
        fs::read_link(r.join("changed")).unwrap(),
        Path::new("dir/b.bin")
    );
    assert_in_sync(m, &t.remote_refs());
}

#[test]
fn type_changes_file_dir_symlink() {
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    write(&m.join("f2d/inner"), b"now a dir");
    write(&r.join("f2d"), b"was a file");
    write(&m.join("d2f"), b"now a file");
    write(&r.join("d2f/inner/deeper"), b"was a dir");
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert_in_sync(m, &t.remote_refs());
}

#[test]
fn hard_link_groups_new_and_a_remote_link_that_must_be_broken() {
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    write(&m.join("g/one"), b"group content");
    fs::hard_link(m.join("g/one"), m.join("g/two")).unwrap();
    fs::hard_link(m.join("g/one"), m.join("three")).unwrap();
    write(&m.join("solo-a"), b"same bytes");
    write(&m.join("solo-b"), b"same bytes");
    // On the remote, solo-a and solo-b are one inode: must be broken apart.
    write(&r.join("solo-a"), b"same bytes");
    fs::hard_link(r.join("solo-a"), r.join("solo-b")).unwrap();
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert_in_sync(m, &t.remote_refs());
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&r.join("g/one")), ino(&r.join("three")));
    assert_ne!(ino(&r.join("solo-a")), ino(&r.join("solo-b")));
    // Changing the group's content relinks everything.
    fs::write(m.join("g/one"), b"group content v2").unwrap();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert_in_sync(m, &t.remote_refs());
}

#[test]
fn names_with_spaces_newlines_and_non_utf8_bytes() {
    let t = Trees::new(1);
    let m = &t.master;
    let names: [&[u8]; 4] = [
        b"with space",
        b"new\nline",
        b"latin1-\xe9\xff",
        b"tab\there",
    ];
    for n in names {
        write(&m.join(OsStr::from_bytes(n)), n);
    }
    fs::create_dir(m.join(OsStr::from_bytes(b"dir \xfe\n"))).unwrap();
    write(&m.join(OsStr::from_bytes(b"dir \xfe\n/inner \x01")), b"x");
    let c = t.cluster();
    let out = c.sync(&["-n"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("new\\#012line"));
    // --json: "path_hex" holds the exact bytes of the names that are not UTF-8, and only those.
    let out = c.sync(&["-n", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    let mut planned: Vec<Vec<u8>> = Vec::new();
    for p in v["remotes"][0]["plan"].as_array().unwrap() {
        let text = p["path"].as_str().unwrap();
        match p.get("path_hex") {
            Some(hex) => {
                let bytes = unhex(hex.as_str().unwrap());
                assert!(std::str::from_utf8(&bytes).is_err(), "{p}");
                assert_eq!(text, String::from_utf8_lossy(&bytes), "{p}");
                planned.push(bytes);
            }
            None => planned.push(text.as_bytes().to_vec()),
        }
    }
    for n in names
        .iter()
        .copied()
        .chain([&b"dir \xfe\n"[..], b"dir \xfe\n/inner \x01"])
    {
        assert!(
            planned.iter().any(|p| p == n),
            "{:?} not in the JSON plan: {v}",
            String::from_utf8_lossy(n)
        );
    }
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert_in_sync(m, &t.remote_refs());
}

#[test]
fn empty_files_and_empty_directories() {
    let t = Trees::new(1);
    let m = &t.master;
    write(&m.join("e1"), b"");
    write(&m.join("d/e2"), b"");
    fs::create_dir_all(m.join("x/y/z")).unwrap();
    chmod(&m.join("x/y"), 0o750);
    let c = t.cluster();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    assert_in_sync(m, &t.remote_refs());
}

#[test]
fn three_remotes_at_once_and_second_sync_transfers_nothing() {
    let t = Trees::new(3);
    populate(&t.master);
    for i in 0..50 {
        write(
            &t.master.join(format!("many/f{i}")),
            format!("{i}").as_bytes(),
        );
    }
    // Remotes start in different states.
    write(&t.remotes[1].join("a.txt"), b"other\n");
    write(&t.remotes[2].join("junk/x"), b"junk");
    let c = t.cluster();
    let out = c.sync(&["--delete", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_in_sync(&t.master, &t.remote_refs());
    let out = c.sync(&["--delete", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    assert_eq!(transferred(&v), vec![0, 0, 0]);
    for r in v["remotes"].as_array().unwrap() {
        let plan = r["plan"].as_array().unwrap();
        assert!(
            plan.iter().all(|p| p["action"] == "skip"),
            "second sync plans changes: {plan:?}"
        );
    }
}

#[test]
fn dry_run_lists_changes_and_touches_nothing() {
    let t = Trees::new(2);
    populate(&t.master);
    write(&t.remotes[0].join("extra"), b"e");
    let c = t.cluster();
    let out = c.sync(&["-n", "--delete"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": send     a.txt"), "{text}");
    assert!(text.contains("delete   extra"), "{text}");
    assert!(text.contains("symlink  link"), "{text}");
    assert!(t.remotes[0].join("extra").exists());
    assert!(!t.remotes[0].join("a.txt").exists());
}

#[test]
fn classification_excludes_and_protects_from_delete() {
    let t = Trees::new(1);
    populate(&t.master);
    write(&t.master.join("skip.o"), b"object");
    write(&t.master.join("target/big"), b"build output");
    write(&t.remotes[0].join("keep.o"), b"remote-only but excluded");
    let c = t.cluster();
    let out = c.sync(&["--delete", "--exclude", "*.o", "--exclude", "target/"]);
    assert_eq!(out.status.code(), Some(0));
    let r = &t.remotes[0];
    assert!(!r.join("skip.o").exists());
    assert!(!r.join("target").exists());
    assert!(r.join("keep.o").exists(), "excluded entries are protected");
    assert!(r.join("a.txt").exists());
    let out = c.sync(&["--select", "ext:txt or name:c", "-n", "--json"]);
    let v = json(&out);
    assert_eq!(v["ok"], true);
}

#[test]
fn select_parse_error_is_a_usage_error() {
    let out = fleetsync(scratch_home())
        .args(["sync", "--select", "ext:rs and", "a", "b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("column 11"), "{err}");
}

#[test]
fn explain_says_why() {
    let out = fleetsync(scratch_home())
        .args([
            "sync",
            "--exclude",
            "*.o",
            "--explain",
            "src/x.o",
            "--explain",
            "src/x.c",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("src/x.o: excluded by --exclude '*.o'"),
        "{text}"
    );
    assert!(text.contains("src/x.c: included"), "{text}");
}

#[test]
fn embedded_mode_syncs_two_remotes() {
    let t = Trees::new(2);
    populate(&t.master);
    let out = fleetsync(scratch_home())
        .arg("sync")
        .arg("--delete")
        .arg(&t.master)
        .args(&t.remotes)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_in_sync(&t.master, &t.remote_refs());
    let out = fleetsync(scratch_home())
        .arg("sync")
        .arg("--json")
        .arg(&t.master)
        .args(&t.remotes)
        .output()
        .unwrap();
    assert_eq!(transferred(&json(&out)), vec![0, 0]);
}

#[test]
fn regression_malformed_frame_does_not_stop_the_server() {
    let t = Trees::new(1);
    populate(&t.master);
    let c = t.cluster();
    // Garbage, an oversize length prefix, and a truncated frame.
    for garbage in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3][..],
        &[16, 0, 0, 0, 1, 2][..],
    ] {
        let mut s = std::net::TcpStream::connect(&c.server).unwrap();
        let _ = s.write_all(garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_end(&mut sink);
    }
    let out = c.sync(&[]);
    assert_eq!(out.status.code(), Some(0));
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn dead_remote_is_reported_while_the_others_finish() {
    let t = Trees::new(2);
    populate(&t.master);
    let c = t.cluster();
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let remotes = vec![c.remotes[0].clone(), dead.clone(), c.remotes[1].clone()];
    let out = c.sync_to(&remotes, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    let rs = v["remotes"].as_array().unwrap();
    assert_eq!(rs[0]["ok"], true);
    assert_eq!(rs[1]["ok"], false);
    assert_eq!(rs[1]["remote"], dead.as_str());
    assert!(rs[1]["error"].as_str().unwrap().contains("connect") || !rs[1]["error"].is_null());
    assert_eq!(rs[2]["ok"], true);
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn killed_remote_agent_is_reported() {
    let t = Trees::new(2);
    populate(&t.master);
    let mut c = t.cluster();
    // procs: [master, remote0, remote1, server]; kill remote1's agent.
    let victim = c.procs.remove(2);
    drop(victim);
    let out = c.sync(&["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["remotes"][0]["ok"], true);
    assert_eq!(v["remotes"][1]["ok"], false);
    assert_in_sync(&t.master, &[&t.remotes[0]]);
}

#[test]
fn two_gib_file() {
    let t = Trees::new(1);
    let p = t.master.join("big");
    {
        let mut f = fs::File::create(&p).unwrap();
        f.set_len(2 << 30).unwrap();
        use std::io::{Seek, SeekFrom};
        for k in 0..8u64 {
            f.seek(SeekFrom::Start(k * (256 << 20) + 12345)).unwrap();
            f.write_all(format!("block {k}").as_bytes()).unwrap();
        }
    }
    let c = t.cluster();
    let start = std::time::Instant::now();
    assert_eq!(c.sync(&[]).status.code(), Some(0));
    eprintln!("2 GiB sync took {:?}", start.elapsed());
    assert_eq!(
        fs::metadata(t.remotes[0].join("big")).unwrap().len(),
        2 << 30
    );
    assert_in_sync(&t.master, &t.remote_refs());
}

#[test]
fn special_files_are_skipped_with_a_note() {
    let t = Trees::new(1);
    populate(&t.master);
    let fifo = t.master.join("pipe");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    let c = t.cluster();
    let out = c.sync(&[]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pipe:") && err.contains("skipped"), "{err}");
    assert!(!t.remotes[0].join("pipe").exists());
    assert!(t.remotes[0].join("a.txt").exists());
}

#[test]
fn unreachable_master_is_a_connection_error() {
    let t = Trees::new(1);
    let mut c = t.cluster();
    drop(c.procs.remove(0)); // the master agent
    let out = c.sync(&[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn killed_remote_agent_mid_transfer_leaves_old_or_new_files_and_next_sync_finishes() {
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    let n = 200;
    let size = 1 << 20;
    for i in 0..n {
        write(&m.join(format!("f{i:03}")), &vec![b'N'; size]);
        write(&r.join(format!("f{i:03}")), &vec![b'o'; size]);
    }
    let mut c = t.cluster();
    let sync = {
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("sync")
            .arg("--server")
            .arg(&c.server)
            .arg("--master")
            .arg(&c.master)
            .arg("--token-file")
            .arg(&c.token_file)
            .args(&c.remotes)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Proc(cmd.spawn().unwrap())
    };
    // Wait for the first new file on the remote, then SIGKILL its agent.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let started = (0..n).any(|i| {
            fs::read(r.join(format!("f{i:03}")))
                .map(|d| d.first() == Some(&b'N'))
                .unwrap_or(false)
        });
        if started || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(c.procs.remove(1));
    drop(sync);
    let mut new = 0;
    for i in 0..n {
        let d = fs::read(r.join(format!("f{i:03}"))).unwrap();
        assert_eq!(d.len(), size, "f{i:03} torn");
        assert!(
            d.iter().all(|&b| b == b'N') || d.iter().all(|&b| b == b'o'),
            "f{i:03} mixes old and new content"
        );
        new += usize::from(d[0] == b'N');
    }
    eprintln!("{new} of {n} files were replaced before the kill");
    // A new agent on the same tree; the next sync finishes the job.
    let (p, addr) = spawn_agent(r, &c.token_file);
    c.procs.push(p);
    let out = c.sync_to(&[addr], &["--delete"]);
    assert_eq!(out.status.code(), Some(0));
    assert_in_sync(m, &t.remote_refs());
}
