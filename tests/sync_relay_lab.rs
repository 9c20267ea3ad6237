//! Fan-out relays over a real (namespaced) network: the master's agent, the server and each
//! remote's agent run in their own lab host, every link at 100 Mbit/s, and the control client
//! in the server's host. After every sync the rsync referee must print nothing on every
//! remote, the `--json` sources must form a tree with at most K children per node, and the
//! master's link must have carried about K copies of the data, not one per remote.
//!
//! One remote's link is capped at a tenth of the others': its first tree finds it slow, and
//! the next sync makes it a leaf (nobody's source), so that it delays only itself.
//!
//! Needs root and iproute2 (see `support/lab.rs`); without them the test fails saying so.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod support;
use support::lab::{Dir, Lab};
use support::{fleetsync, random, rsync_diff, scratch_home, write, Rng, Token};

const MIB: usize = 1 << 20;
/// What a sync may cost on top of the data: handshakes, lists, checksums, headers.
const OVERHEAD: u64 = 512 << 10;

/// Agents in `master` and each remote host, the server in `srv`.
struct Fleet {
    lab: Lab,
    token: Token,
    server: String,
    master: String,
    hosts: Vec<String>,
    remotes: Vec<String>,
}

impl Fleet {
    fn start(lab: Lab, master: &Path, hosts: &[String], roots: &[PathBuf]) -> Fleet {
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
        let remotes = hosts.iter().zip(roots).map(|(h, r)| agent(h, r)).collect();
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
            hosts: hosts.to_vec(),
            remotes,
        }
    }

    /// `fleetsync sync --server ... --delete --json --fanout K` run in `srv`; returns the
    /// bytes the master's link sent and each remote's source by host name.
    fn sync(&self, fanout: u32) -> (u64, HashMap<String, String>) {
        let tx = self.lab.bytes("master", Dir::Tx);
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("sync")
            .arg("--server")
            .arg(&self.server)
            .arg("--master")
            .arg(&self.master)
            .arg("--token-file")
            .arg(&self.token.file)
            .args(["--delete", "--json", "--fanout", &fanout.to_string()])
            .args(&self.remotes);
        let start = Instant::now();
        let out = self.lab.run("srv", &cmd, Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let log = format!(
            "sync: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{log}");
        let sent = self.lab.bytes("master", Dir::Tx) - tx;
        let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        let host_of = |addr: &str| -> String {
            match self.remotes.iter().position(|a| a == addr) {
                Some(i) => self.hosts[i].clone(),
                None => addr.to_owned(),
            }
        };
        let sources = doc["remotes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    host_of(r["remote"].as_str().unwrap()),
                    host_of(r["source"].as_str().unwrap()),
                )
            })
            .collect();
        eprintln!(
            "sync --fanout {fanout}: {:.2} s, master sent {sent} bytes; sources {sources:?}",
            start.elapsed().as_secs_f64()
        );
        (sent, sources)
    }
}

fn assert_in_sync(master: &Path, roots: &[PathBuf]) {
    for r in roots {
        let d = rsync_diff(master, r);
        assert!(d.is_empty(), "{} differs from master:\n{d}", r.display());
    }
}

/// The sources form a tree: every source is the master or another remote, nobody has more
/// than `k` children, and every remote leads up to the master.
fn assert_tree(sources: &HashMap<String, String>, k: usize) {
    let mut children: HashMap<&str, usize> = HashMap::new();
    for (r, s) in sources {
        assert!(
            s == "master" || sources.contains_key(s),
            "{r}: unknown source {s}"
        );
        *children.entry(s).or_default() += 1;
    }
    for (n, c) in children {
        assert!(
            c <= k,
            "{n} sent to {c} remotes (--fanout {k}): {sources:?}"
        );
    }
    for r in sources.keys() {
        let (mut at, mut hops) = (r.as_str(), 0);
        while at != "master" {
            at = &sources[at];
            hops += 1;
            assert!(hops <= sources.len(), "{r}: its sources loop");
        }
    }
}

#[test]
fn eight_remotes_through_fanout_2_trees_and_the_slow_one_becomes_a_leaf() {
    let hosts: Vec<String> = (1..=8).map(|i| format!("r{i}")).collect();
    let mut all: Vec<&str> = vec!["master", "srv"];
    all.extend(hosts.iter().map(String::as_str));
    // r2 is the second in the request: a child of the master in the first tree.
    let lab = Lab::up_with("rl", &all, "100mbit", &[("r2", "10mbit")]);
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("master");
    let roots: Vec<PathBuf> = hosts.iter().map(|h| tmp.path().join(h)).collect();
    for d in std::iter::once(&m).chain(&roots) {
        fs::create_dir(d).unwrap();
    }
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    let mut data = 0;
    for i in 0..4 {
        let f = random(&mut rng, MIB);
        data += f.len();
        write(&m.join(format!("pkg/v1/part{i}.bin")), &f);
    }
    write(&m.join("etc/release"), b"1\n");
    let fleet = Fleet::start(lab, &m, &hosts, &roots);

    let (sent, sources) = fleet.sync(2);
    assert_in_sync(&m, &roots);
    assert_tree(&sources, 2);
    assert!(
        sources.values().any(|s| s.starts_with('r')),
        "nobody relayed: {sources:?}"
    );
    // Two copies leave the master (its two children), not eight.
    let limit = 2 * data as u64 * 12 / 10 + OVERHEAD;
    assert!(
        sent <= limit,
        "the master sent {sent} bytes for {data} bytes to 8 remotes with --fanout 2 (limit {limit})"
    );
    assert_eq!(
        sources["r2"], "master",
        "the first tree is in the request's order"
    );

    // The update: r2 was found slow in the first tree; now it is a leaf.
    let mut update = 0;
    for i in 0..3 {
        let f = random(&mut rng, MIB);
        update += f.len();
        write(&m.join(format!("pkg/v2/part{i}.bin")), &f);
    }
    fs::remove_dir_all(m.join("pkg/v1")).unwrap();
    write(&m.join("etc/release"), b"2\n");
    let (sent, sources) = fleet.sync(2);
    assert_in_sync(&m, &roots);
    assert_tree(&sources, 2);
    assert!(
        sources.values().all(|s| s != "r2"),
        "the slow r2 still relays to others: {sources:?}"
    );
    let limit = 2 * update as u64 * 12 / 10 + OVERHEAD;
    assert!(
        sent <= limit,
        "update: the master sent {sent} bytes (limit {limit})"
    );
}

#[test]
fn sixty_four_remotes_at_once_are_in_sync_through_one_tree() {
    let started = Instant::now();
    let hosts: Vec<String> = (1..=64).map(|i| format!("h{i}")).collect();
    let mut all: Vec<&str> = vec!["master", "srv"];
    all.extend(hosts.iter().map(String::as_str));
    let lab = Lab::up("r64", &all, "100mbit");
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("master");
    let roots: Vec<PathBuf> = hosts.iter().map(|h| tmp.path().join(h)).collect();
    for d in std::iter::once(&m).chain(&roots) {
        fs::create_dir(d).unwrap();
    }
    let mut rng = Rng(0x6464_6464_0bad_cafe);
    let big = random(&mut rng, 2 * MIB);
    write(&m.join("pkg/app.bin"), &big);
    for i in 0..20 {
        write(
            &m.join(format!("pkg/conf/c{i}.txt")),
            format!("setting {i}\n").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("app.bin", m.join("pkg/app")).unwrap();
    let fleet = Fleet::start(lab, &m, &hosts, &roots);
    eprintln!(
        "lab of 66 hosts up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (sent, sources) = fleet.sync(4);
    assert_in_sync(&m, &roots);
    assert_tree(&sources, 4);
    // Four copies leave the master, not 64.
    let limit = 4 * big.len() as u64 * 12 / 10 + OVERHEAD;
    assert!(
        sent <= limit,
        "the master sent {sent} bytes (limit {limit})"
    );
    eprintln!(
        "64 remotes in {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
