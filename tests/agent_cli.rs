//! `fleetsync agent` as a real process.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fleetsync_proto::{auth, frame, FileEntry, FileKind, Msg, Role};

mod support;

const TOKEN: &str = "cli-test-token-0123456789";

fn spawn_agent(root: &Path, token_file: &Path) -> (Child, String) {
    let mut child = support::fleetsync(support::scratch_home())
        .args(["agent", "--listen", "127.0.0.1:0", "--root"])
        .arg(root)
        .arg("--token-file")
        .arg(token_file)
        .env_remove("FLEETSYNC_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_owned();
    (child, addr)
}

fn connect(addr: &str, role: Role) -> (BufReader<TcpStream>, BufWriter<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    auth::connect(&mut s, Some(TOKEN.as_bytes()), role).unwrap();
    (BufReader::new(s.try_clone().unwrap()), BufWriter::new(s))
}

fn send(w: &mut BufWriter<TcpStream>, m: &Msg) {
    frame::write_frame(w, &m.encode()).unwrap();
    w.flush().unwrap();
}

fn list(addr: &str) -> Vec<FileEntry> {
    let (mut r, mut w) = connect(addr, Role::Server);
    send(
        &mut w,
        &Msg::ListRequest {
            request_id: 1,
            classification: Default::default(),
            batch_size: 0,
            sweep_partials: false,
            cached_digests: String::new(),
        },
    );
    let mut all = Vec::new();
    loop {
        match Msg::decode(&frame::read_frame(&mut r).unwrap().unwrap()).unwrap() {
            Msg::ListBatch { entries, last, .. } => {
                all.extend(entries);
                if last {
                    return all;
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn agent_refuses_to_start_without_a_token() {
    let tmp = tempfile::tempdir().unwrap();
    let out = support::fleetsync(support::scratch_home())
        .args(["agent", "--listen", "127.0.0.1:0", "--root"])
        .arg(tmp.path())
        .env_remove("FLEETSYNC_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
}

#[test]
fn agent_prints_its_address_first_and_serves_the_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("f"), b"x").unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let (mut child, addr) = spawn_agent(&root, &token);
    let l = list(&addr);
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[1].path.as_slice(), l[1].kind),
        (&b"f"[..], FileKind::File)
    );
    child.kill().unwrap();
    let _ = child.wait();
}

#[test]
fn regression_sigkill_mid_transfer_keeps_the_old_file_and_the_next_run_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("f"), b"old content").unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let (mut child, addr) = spawn_agent(&root, &token);

    let (_r, mut w) = connect(&addr, Role::Agent);
    let entry = FileEntry {
        path: b"f".to_vec(),
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        inode: 0,
        dev: 0,
        nlink: 1,
        size: 4 << 20,
        mtime_sec: 0,
        mtime_nsec: 0,
        link_target: None,
        rdev: 0,
        digest: None,
    };
    send(
        &mut w,
        &Msg::FileStart {
            request_id: 1,
            entry,
            algorithm: "crc32".into(),
            lock_timeout_ms: None,
            stage: String::new(),
            coding: Default::default(),
            basis: Vec::new(),
            basis_size: 0,
        },
    );
    // Less than a leftover is kept from (1 MiB: it would become the file's partial
    // file, see agent/tests/resume.rs), so the next run removes it.
    send(
        &mut w,
        &Msg::FileChunk {
            data: vec![b'n'; 512 << 10],
            zstd: false,
        },
    );
    // Wait until the temp file holds data, then kill the agent mid-file.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let temp_has_data = std::fs::read_dir(&root).unwrap().any(|e| {
            let e = e.unwrap();
            e.file_name()
                .to_string_lossy()
                .starts_with(".fleetsync.tmp.")
                && e.metadata().unwrap().len() > 0
        });
        if temp_has_data {
            break;
        }
        assert!(Instant::now() < deadline, "no temp file appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"old content");

    // The next agent on the same tree lists only real files and removes the leftover.
    let (mut child, addr) = spawn_agent(&root, &token);
    let l = list(&addr);
    let paths: Vec<_> = l.iter().map(|e| e.path.clone()).collect();
    assert_eq!(paths, vec![b"".to_vec(), b"f".to_vec()]);
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    child.kill().unwrap();
    let _ = child.wait();
}
