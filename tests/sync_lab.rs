//! End-to-end over a real (namespaced) network: the master's agent, the server and two
//! remotes' agents each run in their own lab host, links capped at 200 Mbit/s, and the control
//! client runs in the server's host, as an operator would deploy `--server` mode. After every
//! sync the rsync referee (`rsync -aHc -n -i --delete MASTER/ REMOTE/`) must print nothing,
//! and the bytes the master's link sent must be sane for the data that had to move.
//!
//! Needs root and iproute2 (see `support/lab.rs`); without them the test fails saying so.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod support;
use support::lab::{Dir, Lab};
use support::{fleetsync, random, rsync_diff, scratch_home, write, Rng, Token};

const REMOTES: [&str; 2] = ["r1", "r2"];
/// What a sync may cost on top of the data: handshakes, lists, checksums, headers.
const OVERHEAD: u64 = 256 << 10;
const MIB: usize = 1 << 20;

/// Agents in `master`, `r1`, `r2` and the server in `srv`, each on its lab address.
struct Fleet {
    lab: Lab,
    token: Token,
    server: String,
    master: String,
    remotes: Vec<String>,
}

impl Fleet {
    fn start(lab: Lab, master: &Path, remotes: &[PathBuf]) -> Fleet {
        let token = Token::new();
        let agent = |host: &str, root: &Path| {
            let mut cmd = fleetsync(scratch_home());
            cmd.arg("agent")
                .arg("--root")
                .arg(root)
                .arg("--listen")
                .arg(format!("{}:0", lab.addr(host)))
                .arg("--token-file")
                .arg(&token.file)
                .arg("--no-fsync");
            lab.spawn_listening(host, &cmd)
        };
        let master = agent("master", master);
        let remotes = REMOTES
            .iter()
            .zip(remotes)
            .map(|(h, r)| agent(h, r))
            .collect();
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("server")
            .arg("--listen")
            .arg(format!("{}:0", lab.addr("srv")))
            .arg("--token-file")
            .arg(&token.file);
        let server = lab.spawn_listening("srv", &cmd);
        Fleet {
            lab,
            token,
            server,
            master,
            remotes,
        }
    }

    /// `fleetsync sync --server ... --delete` run in `srv`; returns the bytes the master's
    /// link sent and each remote's link received during it.
    fn sync(&self) -> (u64, Vec<u64>) {
        self.sync_via(&self.server)
    }

    /// [`Fleet::sync`] through the server at `server` (in `srv` too).
    fn sync_via(&self, server: &str) -> (u64, Vec<u64>) {
        let tx = self.lab.bytes("master", Dir::Tx);
        let rx: Vec<u64> = REMOTES.iter().map(|h| self.lab.bytes(h, Dir::Rx)).collect();
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("sync")
            .arg("--server")
            .arg(server)
            .arg("--master")
            .arg(&self.master)
            .arg("--token-file")
            .arg(&self.token.file)
            .arg("--delete")
            .args(&self.remotes);
        let out = self.lab.run("srv", &cmd, Duration::from_secs(120));
        let log = format!(
            "sync: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{log}");
        let sent = self.lab.bytes("master", Dir::Tx) - tx;
        let got = REMOTES
            .iter()
            .zip(rx)
            .map(|(h, before)| self.lab.bytes(h, Dir::Rx) - before)
            .collect();
        (sent, got)
    }
}

fn assert_in_sync(master: &Path, remotes: &[PathBuf]) {
    for r in remotes {
        let d = rsync_diff(master, r);
        assert!(d.is_empty(), "{} differs from master:\n{d}", r.display());
    }
}

/// Checks the bytes of one sync: the master sent at most 1.2x the bytes of the files that
/// differ, per remote (today's whole-file sends, which compression and deltas only lower),
/// plus a fixed overhead; each remote received at least 95% of the random bytes it had no
/// copy of (they cannot be compressed or found elsewhere), which also proves the counters
/// see the traffic.
fn assert_bytes(what: &str, sent: u64, got: &[u64], differing: usize, fresh: usize) {
    let n = got.len() as u64;
    let limit = (differing as u64 * n * 12 / 10) + OVERHEAD;
    eprintln!(
        "{what}: master sent {sent} bytes (limit {limit}); remotes received {got:?} \
         (files that differ: {differing} bytes, new random bytes: {fresh})"
    );
    assert!(
        sent <= limit,
        "{what}: the master sent {sent} bytes, over {limit} for {differing} bytes of files \
         that differ on each of {n} remotes"
    );
    for (r, &g) in REMOTES.iter().zip(got) {
        assert!(
            g >= fresh as u64 * 95 / 100,
            "{what}: {r} received {g} bytes, less than the {fresh} new random bytes it lacked: \
             the lab's counters do not see the sync's traffic"
        );
    }
}

/// The master's and the remotes' trees in `dir`, empty.
fn empty_trees(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let m = dir.join("master");
    let remotes: Vec<PathBuf> = REMOTES.iter().map(|r| dir.join(r)).collect();
    for d in std::iter::once(&m).chain(&remotes) {
        fs::create_dir(d).unwrap();
    }
    (m, remotes)
}

#[test]
fn server_mode_across_lab_hosts_initial_copy_then_update_with_delete() {
    let lab = Lab::up("sl", &["master", "srv", "r1", "r2"], "200mbit");
    let tmp = tempfile::tempdir().unwrap();
    let (m, remotes) = empty_trees(tmp.path());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // The old release: binaries, a versioned library and its symlink, a hard-linked data
    // file, small text files, an empty directory.
    let tool = random(&mut rng, 3 * MIB);
    let libfoo = random(&mut rng, 2 * MIB);
    let data = random(&mut rng, MIB);
    write(&m.join("bin/tool"), &tool);
    fs::set_permissions(m.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&m.join("lib/libfoo-1.2.so"), &libfoo);
    symlink("libfoo-1.2.so", m.join("lib/libfoo.so")).unwrap();
    write(&m.join("share/data.bin"), &data);
    fs::hard_link(m.join("share/data.bin"), m.join("share/data-link.bin")).unwrap();
    write(&m.join("etc/conf.txt"), b"threads = 4\n");
    write(&m.join("etc/old.txt"), b"to be removed\n");
    let mut small = 0;
    for i in 0..20 {
        let text = format!("page {i}\n").repeat(50 + i);
        small += text.len();
        write(&m.join(format!("doc/p{i:02}.txt")), text.as_bytes());
    }
    fs::create_dir_all(m.join("empty/dir")).unwrap();

    let fleet = Fleet::start(lab, &m, &remotes);

    let (sent, got) = fleet.sync();
    assert_in_sync(&m, &remotes);
    let random_bytes = tool.len() + libfoo.len() + data.len();
    assert_bytes(
        "initial copy",
        sent,
        &got,
        random_bytes + small + 30,
        random_bytes,
    );

    // The update, as an installer makes it: a binary patched in the middle, a new library,
    // the versioned library renamed (and its symlink moved on), an edited config file, files
    // and directories the new release lacks removed, a new hard link.
    let mut tool2 = tool.clone();
    let patch = random(&mut rng, MIB / 2);
    tool2[MIB..MIB + patch.len()].copy_from_slice(&patch);
    write(&m.join("bin/tool"), &tool2);
    let libbar = random(&mut rng, MIB);
    write(&m.join("lib/libbar.so"), &libbar);
    fs::rename(m.join("lib/libfoo-1.2.so"), m.join("lib/libfoo-1.3.so")).unwrap();
    fs::remove_file(m.join("lib/libfoo.so")).unwrap();
    symlink("libfoo-1.3.so", m.join("lib/libfoo.so")).unwrap();
    write(&m.join("etc/conf.txt"), b"threads = 8\n");
    fs::remove_file(m.join("etc/old.txt")).unwrap();
    for i in 10..20 {
        fs::remove_file(m.join(format!("doc/p{i:02}.txt"))).unwrap();
    }
    fs::remove_dir_all(m.join("empty")).unwrap();
    fs::hard_link(m.join("bin/tool"), m.join("bin/tool-alias")).unwrap();

    let (sent, got) = fleet.sync();
    assert_in_sync(&m, &remotes);
    assert_bytes(
        "update",
        sent,
        &got,
        tool2.len() + libbar.len() + libfoo.len() + 12,
        patch.len() + libbar.len(),
    );

    // Nothing changed: only lists and checksums cross the links.
    let (sent, got) = fleet.sync();
    assert_in_sync(&m, &remotes);
    assert_bytes("no-change re-sync", sent, &got, 0, 0);
}

/// The harness itself, against rsync: a file pushed from one host to an rsync daemon in
/// another arrives, runs in the named hosts, and the counters of both links see its bytes.
#[test]
fn lab_hosts_reach_each_other_and_count_their_traffic() {
    let lab = Lab::up("slh", &["a", "b"], "200mbit");
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    fs::create_dir(&dst).unwrap();
    let payload = random(&mut Rng(7), 2 * MIB);
    write(&src.join("f"), &payload);
    let conf = tmp.path().join("rsyncd.conf");
    fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[t]\npath = {}\nread only = no\n",
            dst.display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("rsync");
    daemon
        .args(["--daemon", "--no-detach", "--port=8730", "--address"])
        .arg(lab.addr("b"))
        .arg(format!("--config={}", conf.display()));
    lab.spawn("b", &daemon);
    let (tx, rx) = (lab.bytes("a", Dir::Tx), lab.bytes("b", Dir::Rx));
    let url = format!("rsync://{}:8730/t/", lab.addr("b"));
    let mut push = Command::new("rsync");
    push.arg("-a").arg(format!("{}/", src.display())).arg(&url);
    let mut tries = 0;
    let out = loop {
        // The daemon may not listen yet.
        let out = lab.run("a", &push, Duration::from_secs(30));
        tries += 1;
        if out.status.success() || tries == 50 {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(out.status.success(), "rsync to {url} from a: {out:?}");
    assert_eq!(fs::read(dst.join("f")).unwrap(), payload);
    let (tx, rx) = (lab.bytes("a", Dir::Tx) - tx, lab.bytes("b", Dir::Rx) - rx);
    eprintln!("a sent {tx} bytes, b received {rx}");
    for (what, n) in [("a sent", tx), ("b received", rx)] {
        assert!(
            (payload.len() as u64..payload.len() as u64 * 12 / 10 + OVERHEAD).contains(&n),
            "{what} {n} bytes for a {}-byte file",
            payload.len()
        );
    }
}

/// The server's own link carries the file lists and every request and answer: between hosts
/// they go compressed, unless `fleetsync server --no-frame-compression` says not to.
#[test]
fn server_traffic_goes_compressed_between_hosts_unless_turned_off() {
    let lab = Lab::up("sz", &["master", "srv", "r1", "r2"], "200mbit");
    let tmp = tempfile::tempdir().unwrap();
    let (m, remotes) = empty_trees(tmp.path());
    for d in 0..40 {
        for f in 0..100 {
            let p = m.join(format!(
                "usr/lib/python3/site-packages/package_{d:02}/module_{f:03}.py"
            ));
            write(&p, format!("# {d} {f}\n").as_bytes());
        }
    }
    let fleet = Fleet::start(lab, &m, &remotes);
    let mut cmd = fleetsync(scratch_home());
    cmd.arg("server")
        .arg("--listen")
        .arg(format!("{}:0", fleet.lab.addr("srv")))
        .arg("--token-file")
        .arg(&fleet.token.file)
        .arg("--no-frame-compression");
    let plain_server = fleet.lab.spawn_listening("srv", &cmd);
    fleet.sync();
    assert_in_sync(&m, &remotes);
    // No-change re-syncs: three lists of 4,000 entries each way, checksum answers.
    let server_rx = |server: &str| {
        let before = fleet.lab.bytes("srv", Dir::Rx);
        fleet.sync_via(server);
        assert_in_sync(&m, &remotes);
        fleet.lab.bytes("srv", Dir::Rx) - before
    };
    let compressed = server_rx(&fleet.server);
    let plain = server_rx(&plain_server);
    eprintln!("into the server: {compressed} bytes compressed, {plain} plain");
    assert!(
        compressed * 3 < plain,
        "into the server: {compressed} bytes with compressed frames, {plain} without"
    );
    // Files change in the meantime too: the compressed path still syncs them.
    write(
        &m.join("usr/lib/python3/site-packages/package_07/module_042.py"),
        b"changed\n",
    );
    fleet.sync();
    assert_in_sync(&m, &remotes);
}
