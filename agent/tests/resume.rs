//! Resume after a remote agent is killed (SIGKILL) mid-file: a remote agent runs as a
//! child process of the test, receives half a file by hand-written frames and is killed;
//! restarted, its next listing keeps what was written as the file's partial file, a
//! basis query answers its size and digest, and the master can send only the rest.
//! Nothing partial ever shows under the real name, and a small leftover is removed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fleetsync_proto::{BasisItem, Coding, FileEntry, FileKind, Msg, Outcome, Role};

const CHILD_ROOT_ENV: &str = "FLEETSYNC_TEST_RESUME_ROOT";
const CHILD_ADDR_ENV: &str = "FLEETSYNC_TEST_RESUME_ADDR";
const MIB: usize = 1 << 20;

/// Child mode: when run by the tests below, serve the tree as a remote agent until killed.
#[test]
fn child_agent() {
    let (Some(root), Some(addr_file)) = (
        std::env::var_os(CHILD_ROOT_ENV),
        std::env::var_os(CHILD_ADDR_ENV),
    ) else {
        return;
    };
    let agent = start_agent(Path::new(&root));
    // Written whole, then renamed: the parent never reads half an address.
    let tmp = PathBuf::from(&addr_file).with_extension("tmp");
    std::fs::write(&tmp, agent.local_addr().to_string()).unwrap();
    std::fs::rename(&tmp, &addr_file).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A remote agent in a child process (this test binary in child mode).
struct RemoteAgent {
    child: Child,
    addr: SocketAddr,
}

impl RemoteAgent {
    fn start(root: &Path, scratch: &Path) -> RemoteAgent {
        let addr_file = scratch.join(format!("addr-{}", rand_suffix()));
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_agent", "--test-threads=1", "--quiet"])
            .env(CHILD_ROOT_ENV, root)
            .env(CHILD_ADDR_ENV, &addr_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = RemoteAgent {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let addr = wait_for(Duration::from_secs(30), "the child agent's address", || {
            std::fs::read_to_string(&addr_file).ok()
        });
        agent.addr = addr.parse().unwrap();
        agent
    }

    /// SIGKILL, and wait until it is gone.
    fn kill(mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().unwrap(); // SIGKILL
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
}

impl Drop for RemoteAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Polls `f` until it gives something, for at most `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(x) = f() {
            return x;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// SHA-256 by the `sha256sum` tool (an implementation independent of ours).
fn sha256sum(bytes: &[u8], scratch: &Path) -> Vec<u8> {
    let f = scratch.join(format!("hashed-{}", rand_suffix()));
    std::fs::write(&f, bytes).unwrap();
    let out = Command::new("sha256sum").arg(&f).output().unwrap();
    assert!(out.status.success(), "sha256sum failed");
    std::fs::remove_file(&f).unwrap();
    let hex = std::str::from_utf8(&out.stdout).unwrap()[..64].to_owned();
    (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn entry(path: &[u8], size: u64) -> FileEntry {
    FileEntry {
        path: path.to_vec(),
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        inode: 0,
        dev: 0,
        nlink: 1,
        size,
        mtime_sec: 1_600_000_000,
        mtime_nsec: 0,
        link_target: None,
        rdev: 0,
        digest: None,
    }
}

fn file_start(path: &[u8], size: u64, coding: Coding, basis_size: u64) -> Msg {
    Msg::FileStart {
        request_id: 1,
        entry: entry(path, size),
        algorithm: "sha256".into(),
        lock_timeout_ms: None,
        stage: String::new(),
        coding,
        basis: Vec::new(),
        basis_size,
    }
}

/// Streams `bytes` as the first part of `path` (of `size` bytes) and leaves the file open.
fn start_file(addr: SocketAddr, path: &[u8], size: usize, bytes: &[u8]) -> Client {
    let mut c = Client::connect(addr, Role::Agent);
    c.send(&file_start(path, size as u64, Coding::Whole, 0));
    for chunk in bytes.chunks(MIB) {
        c.send(&Msg::FileChunk {
            data: chunk.to_vec(),
            zstd: false,
        });
    }
    c
}

/// Names in `dir` starting with `prefix`, with their sizes.
fn names_with(dir: &Path, prefix: &str) -> Vec<(String, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            n.starts_with(prefix).then_some((n, len))
        })
        .collect();
    v.sort();
    v
}

/// Waits until the temp of destination `name` holds `len` bytes (written by the agent).
fn wait_for_temp(dir: &Path, name: &str, len: usize) {
    wait_for(Duration::from_secs(30), "the temp file", || {
        names_with(dir, ".fleetsync.tmp.")
            .into_iter()
            .any(|(n, l)| n.ends_with(&format!(".{name}")) && l == len as u64)
            .then_some(())
    });
}

#[test]
fn a_remote_agent_killed_mid_file_answers_its_partial_and_takes_the_rest() {
    let tree = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/big"), b"old version").unwrap();
    let all = data(4 * MIB);
    let half = 2 * MIB + 12_345;

    let agent = RemoteAgent::start(root, scratch.path());
    let _c = start_file(agent.addr, b"d/big", all.len(), &all[..half]);
    wait_for_temp(&root.join("d"), "big", half);
    agent.kill();
    assert_eq!(std::fs::read(root.join("d/big")).unwrap(), b"old version");

    let agent = RemoteAgent::start(root, scratch.path());
    // The next sync lists the remote first: that keeps the leftover as the partial file.
    let mut server = Client::connect(agent.addr, Role::Server);
    let listed: Vec<_> = server
        .list()
        .into_iter()
        .map(|e| (e.path, e.size))
        .collect();
    assert_eq!(
        listed,
        [
            (b"".to_vec(), listed[0].1),
            (b"d".to_vec(), listed[1].1),
            (b"d/big".to_vec(), 11)
        ]
    );
    assert!(names_with(&root.join("d"), ".fleetsync.tmp.").is_empty());

    let mut c = Client::connect(agent.addr, Role::Agent);
    c.send(&Msg::BasisQuery {
        request_id: 1,
        algorithm: "sha256".into(),
        items: vec![BasisItem {
            path: b"d/big".to_vec(),
            ..BasisItem::default()
        }],
    });
    let Some(Msg::BasisReply { items, .. }) = c.recv() else {
        panic!("no basis reply");
    };
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].partial_size, half as u64);
    assert_eq!(
        items[0].partial_digest,
        sha256sum(&all[..half], scratch.path())
    );

    // The master appends only the rest; the whole is checked and put in place.
    c.send(&file_start(
        b"d/big",
        all.len() as u64,
        Coding::Append,
        half as u64,
    ));
    for chunk in all[half..].chunks(MIB) {
        c.send(&Msg::FileChunk {
            data: chunk.to_vec(),
            zstd: false,
        });
    }
    c.send(&Msg::FileEnd {
        size: all.len() as u64,
        digest: sha256sum(&all, scratch.path()),
        aborted: false,
        error: String::new(),
    });
    let Some(Msg::ItemResults { results, .. }) = c.recv() else {
        panic!("no item result");
    };
    assert_eq!(results[0].outcome, Outcome::Ok, "{results:?}");
    c.send(&Msg::StreamEnd);
    assert!(matches!(c.recv(), Some(Msg::Done(d)) if d.failed == 0));
    assert_eq!(std::fs::read(root.join("d/big")).unwrap(), all);
    assert!(names_with(&root.join("d"), ".fleetsync.").is_empty());
    agent.kill();
}

#[test]
fn a_killed_remote_agent_shows_nothing_partial_and_its_small_leftover_goes() {
    let tree = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let root = tree.path();
    let big = data(3 * MIB);
    let small = data(MIB - 1);

    let agent = RemoteAgent::start(root, scratch.path());
    // Two files in flight at once, on two streams: one new, one small.
    let _a = start_file(agent.addr, b"new", big.len(), &big[..3 * MIB / 2]);
    let _b = start_file(agent.addr, b"small", 2 * MIB, &small);
    wait_for_temp(root, "new", 3 * MIB / 2);
    wait_for_temp(root, "small", small.len());
    agent.kill();
    assert!(!root.join("new").exists() && !root.join("small").exists());
    assert_eq!(names_with(root, ".fleetsync.tmp.").len(), 2);

    let agent = RemoteAgent::start(root, scratch.path());
    let mut server = Client::connect(agent.addr, Role::Server);
    let listed: Vec<_> = server.list().into_iter().map(|e| e.path).collect();
    assert_eq!(listed, [b"".to_vec()], "nothing listed but the root");
    // Not under the real names; the big one kept as a partial, the small one gone.
    assert!(!root.join("new").exists() && !root.join("small").exists());
    assert_eq!(
        names_with(root, ".fleetsync."),
        [(".fleetsync.partial.new".to_owned(), 3 * MIB as u64 / 2)]
    );
    assert_eq!(
        std::fs::read(root.join(".fleetsync.partial.new")).unwrap(),
        &big[..3 * MIB / 2]
    );
    // A second listing changes nothing more.
    assert_eq!(server.list().len(), 1);
    assert_eq!(names_with(root, ".fleetsync.").len(), 1);
    agent.kill();
}
