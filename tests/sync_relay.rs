//! Fan-out relays (`--fanout K`) on 127.0.0.1, agents and server as real processes: the
//! remotes that need the same files get them through a tree planned by the server, each relay
//! forwarding the stream to its children while it receives it. rsync is the referee on every
//! remote after every sync; `--json` names each remote's source, which must form a tree of at
//! most K children per node.
//!
//! The relay kill test SIGKILLs a relay at a random moment (`FLEETSYNC_KILL_SEED` replays a
//! run): the sync ends by itself, only the killed remote fails, every other remote is in sync
//! (those below the dead relay get what they lacked directly from the master), nothing on
//! the killed remote is torn, and the next sync finishes it.

mod support;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{kill_seed, random, rsync_diff, write, write_with_mtime, Proc, Rng, Token};

const MIB: usize = 1 << 20;

/// One remote of a `--json` reply.
#[derive(Debug)]
struct Remote {
    ok: bool,
    source: String,
    transferred: u64,
}

/// Runs `fleetsync sync --json` with `extra` flags; returns its exit code and each remote's
/// result by address.
fn sync_json(
    token: &Token,
    server: &str,
    master: &str,
    remotes: &[&str],
    extra: &[&str],
) -> (i32, HashMap<String, Remote>) {
    let out = token
        .sync_command(server, master, remotes)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "sync --json: {e}: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut by = HashMap::new();
    for r in doc["remotes"].as_array().unwrap() {
        by.insert(
            r["remote"].as_str().unwrap().to_owned(),
            Remote {
                ok: r["ok"].as_bool().unwrap(),
                source: r["source"].as_str().unwrap().to_owned(),
                transferred: r["transferred"].as_u64().unwrap(),
            },
        );
    }
    (out.status.code().unwrap_or(-1), by)
}

/// The sources must form a tree under the master with at most `k` children per relay and
/// `master_max` for the master (`k` per cohort: one tree each), each remote reached (no
/// cycles, no unknown source). Returns the remotes that relayed.
fn assert_tree(result: &HashMap<String, Remote>, k: usize, master_max: usize) -> Vec<String> {
    let mut children: HashMap<&str, usize> = HashMap::new();
    for (addr, r) in result {
        assert!(
            r.source == "master" || result.contains_key(&r.source),
            "{addr}: source {:?} is neither the master nor a remote",
            r.source
        );
        assert_ne!(&r.source, addr, "{addr} is its own source");
        *children.entry(r.source.as_str()).or_default() += 1;
    }
    for (node, n) in &children {
        let max = if *node == "master" { master_max } else { k };
        assert!(
            *n <= max,
            "{node} sent to {n} remotes, more than {max}: {result:?}"
        );
    }
    for addr in result.keys() {
        let mut at = addr.as_str();
        let mut hops = 0;
        while at != "master" {
            at = result[at].source.as_str();
            hops += 1;
            assert!(hops <= result.len(), "{addr}: its sources loop");
        }
    }
    let mut relays: Vec<String> = children
        .keys()
        .filter(|n| **n != "master")
        .map(|n| n.to_string())
        .collect();
    relays.sort();
    relays
}

#[test]
fn six_remotes_through_a_fanout_2_tree_match_rsync_on_a_copy_an_update_and_a_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("master");
    let roots: Vec<PathBuf> = (0..6).map(|i| tmp.path().join(format!("r{i}"))).collect();
    for d in std::iter::once(&m).chain(&roots) {
        fs::create_dir(d).unwrap();
    }
    let mut rng = Rng(0x5eed_0f7e_1a2b);
    let tool = random(&mut rng, 3 * MIB);
    write(&m.join("bin/tool"), &tool);
    fs::set_permissions(m.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    write(&m.join("lib/libfoo-1.2.so"), &random(&mut rng, 2 * MIB));
    symlink("libfoo-1.2.so", m.join("lib/libfoo.so")).unwrap();
    write(&m.join("share/data.bin"), &random(&mut rng, 700 * 1024));
    fs::hard_link(m.join("share/data.bin"), m.join("share/data-link.bin")).unwrap();
    for i in 0..30 {
        write(
            &m.join(format!("doc/p{i:02}.txt")),
            format!("page {i}\n").repeat(20 + i).as_bytes(),
        );
    }
    fs::create_dir_all(m.join("empty/dir")).unwrap();
    // One remote holds an older copy already: it needs other files, so it is not in the
    // others' cohort (a cohort gets the same bytes).
    write(&roots[5].join("doc/p00.txt"), b"stale\n");

    let token = Token::new();
    let db = tmp.path().join("jobs.sqlite");
    let (_server, server) = token.server_recording(&db);
    let (_m, master) = token.agent(&m);
    let agents: Vec<(Proc, String)> = roots.iter().map(|r| token.agent(r)).collect();
    let addrs: Vec<&str> = agents.iter().map(|a| a.1.as_str()).collect();
    let check = |what: &str| {
        for r in &roots {
            let d = rsync_diff(&m, r);
            assert!(d.is_empty(), "{what}: {} differs:\n{d}", r.display());
        }
    };

    let (code, res) = sync_json(&token, &server, &master, &addrs, &["--fanout", "2"]);
    assert_eq!(code, 0, "{res:?}");
    check("initial copy");
    // Two cohorts: r0..r4 (a tree), and r5 alone (it holds a file already), sent directly.
    let relays = assert_tree(&res, 2, 3);
    assert_eq!(res[addrs[5]].source, "master");
    eprintln!("initial copy: {res:?}");
    assert!(!relays.is_empty(), "nobody relayed: {res:?}");
    assert!(res.values().all(|r| r.ok && r.transferred > 0));
    // The job history names each relayed remote's source too.
    let out = support::fleetsync(support::scratch_home())
        .args(["jobs", "show", "1", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("jobs --json");
    for r in doc["results"].as_array().unwrap() {
        let want = &res[r["remote"].as_str().unwrap()].source;
        let got = r["source"].as_str().unwrap_or("master");
        assert_eq!(got, want, "job history: {r}");
    }

    // The update: a patched binary (a delta against each remote's identical old copy), a
    // renamed library, a new file, deletions, a mode change.
    let mut tool2 = tool.clone();
    tool2[MIB..MIB + 4096].copy_from_slice(&random(&mut rng, 4096));
    write(&m.join("bin/tool"), &tool2);
    fs::rename(m.join("lib/libfoo-1.2.so"), m.join("lib/libfoo-1.3.so")).unwrap();
    fs::remove_file(m.join("lib/libfoo.so")).unwrap();
    symlink("libfoo-1.3.so", m.join("lib/libfoo.so")).unwrap();
    write(&m.join("lib/libbar.so"), &random(&mut rng, MIB));
    for i in 10..30 {
        fs::remove_file(m.join(format!("doc/p{i:02}.txt"))).unwrap();
    }
    fs::remove_dir_all(m.join("empty")).unwrap();
    fs::set_permissions(m.join("doc/p01.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let (code, res) = sync_json(&token, &server, &master, &addrs, &["--fanout", "2"]);
    assert_eq!(code, 0, "{res:?}");
    check("update");
    // One cohort of six.
    let relays = assert_tree(&res, 2, 2);
    assert!(!relays.is_empty(), "nobody relayed the update: {res:?}");
    eprintln!("update: {res:?}");

    // Nothing changed: nothing is sent, by anyone.
    let (code, res) = sync_json(&token, &server, &master, &addrs, &["--fanout", "2"]);
    assert_eq!(code, 0);
    check("no-change re-sync");
    assert!(res.values().all(|r| r.transferred == 0), "{res:?}");

    // --fanout 0: the master sends to each remote itself.
    write(&m.join("lib/libbaz.so"), &random(&mut rng, MIB));
    let (code, res) = sync_json(&token, &server, &master, &addrs, &["--fanout", "0"]);
    assert_eq!(code, 0);
    check("direct sends");
    assert!(res.values().all(|r| r.source == "master"), "{res:?}");
}

/// Master files for the kill test: all new to the (empty) remotes.
const KILL_FILES: usize = 48;
const KILL_SIZE: usize = 256 * 1024;

fn kill_content(i: usize) -> Vec<u8> {
    let mut out = format!("file {i}\n").into_bytes();
    out.extend(random(&mut Rng(i as u64 * 7919 + 1), KILL_SIZE - out.len()));
    out
}

fn kill_rel(i: usize) -> String {
    format!("d{}/f{i:02}.bin", i % 3)
}

/// Files of the master that have fully arrived on `root` (size only: cheap).
fn arrived(root: &Path) -> usize {
    (0..KILL_FILES)
        .filter(|&i| {
            fs::metadata(root.join(kill_rel(i))).is_ok_and(|m| m.len() == KILL_SIZE as u64)
        })
        .count()
}

/// Every file under `root` is absent or exactly the master's (a temp file may stay).
fn assert_not_torn(root: &Path, what: &str) {
    for i in 0..KILL_FILES {
        match fs::read(root.join(kill_rel(i))) {
            Ok(d) => assert!(d == kill_content(i), "{what}: {} is torn", kill_rel(i)),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{what}: {e}"),
        }
    }
}

#[test]
fn sigkill_of_a_relay_fails_only_it_and_every_other_remote_finishes() {
    let started = Instant::now();
    let mut rng = Rng(kill_seed());
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("master");
    for i in 0..KILL_FILES {
        write_with_mtime(&m.join(kill_rel(i)), &kill_content(i), 1_600_000_000);
    }
    let token = Token::new();
    let (_m, master) = token.agent(&m);
    const REMOTES: usize = 4;
    for it in 0..3 {
        // A fresh server: no remote is known slow, so the chain is in the request's order
        // (r0 -> r1 -> r2 -> r3) and r0..r2 relay.
        let (_server, server) = token.server();
        let roots: Vec<PathBuf> = (0..REMOTES)
            .map(|i| tmp.path().join(format!("it{it}-r{i}")))
            .collect();
        let mut agents: Vec<(Proc, String)> = roots
            .iter()
            .map(|r| {
                fs::create_dir(r).unwrap();
                token.agent(r)
            })
            .collect();
        let victim = rng.below(REMOTES as u64 - 1) as usize;
        let after = rng.below(KILL_FILES as u64 * 3 / 4) as usize;
        let jitter = Duration::from_millis(rng.below(40));
        let addrs: Vec<String> = agents.iter().map(|a| a.1.clone()).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        // 12 MiB at 8 MiB/s: the kill lands mid-stream.
        let mut sync = token
            .sync_command(&server, &master, &refs)
            .args(["--fanout", "1", "--bwlimit", "8MiB/s", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while arrived(&roots[victim]) < after
            && sync.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(jitter);
        agents[victim].0.kill_now();
        let deadline = Instant::now() + Duration::from_secs(60);
        while sync.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = sync.kill();
                panic!("iteration {it}: the sync hung after relay r{victim} was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = sync.wait_with_output().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!(
            "iteration {it}: killed relay r{victim} after {after}+ files: exit {:?}, {}",
            out.status.code(),
            doc["message"]
        );
        assert_not_torn(&roots[victim], &format!("iteration {it}: killed r{victim}"));
        for r in doc["remotes"].as_array().unwrap() {
            let addr = r["remote"].as_str().unwrap();
            let i = addrs.iter().position(|a| a == addr).unwrap();
            if i == victim {
                continue;
            }
            assert!(
                r["ok"].as_bool().unwrap(),
                "iteration {it}: r{i} failed though only r{victim} was killed: {r}"
            );
            let d = rsync_diff(&m, &roots[i]);
            assert!(d.is_empty(), "iteration {it}: r{i} differs:\n{d}");
        }
        // Unless the kill came after the victim had everything, it is reported failed.
        if arrived(&roots[victim]) < KILL_FILES {
            let v = doc["remotes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["remote"] == addrs[victim].as_str())
                .unwrap();
            assert!(!v["ok"].as_bool().unwrap(), "iteration {it}: {v}");
            assert_eq!(out.status.code(), Some(1));
        }
        // Restarted, the next sync finishes it.
        agents[victim] = token.agent(&roots[victim]);
        let addrs: Vec<String> = agents.iter().map(|a| a.1.clone()).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let out = token.sync(&server, &master, &refs);
        assert_eq!(out.status.code(), Some(0), "iteration {it}: the next sync");
        for (i, r) in roots.iter().enumerate() {
            let d = rsync_diff(&m, r);
            assert!(
                d.is_empty(),
                "iteration {it}: after the next sync r{i} differs:\n{d}"
            );
        }
    }
    eprintln!("3 iterations in {:?}", started.elapsed());
}
