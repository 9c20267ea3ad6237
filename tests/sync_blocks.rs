//! Dependency blocks (`fleetsync sync --blocks FILE`, issue 5), end to end with real
//! processes: blocks run in their `after` order; symlinks, deletions and attribute changes
//! are part of a block; a failed block leaves its files old and fails the blocks after it;
//! SIGKILL of the remote agent at any moment leaves every block all-old or all-new once the
//! agent has restarted, and the next sync finishes. rsync `-aHc -n -i --delete` is the
//! referee after every completed sync.
//!
//! The kill moments are random; set `FLEETSYNC_KILL_SEED` to replay a run.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleetsync_proto::{auth, frame, BlockDef, Msg, Role, SyncRequest};
use support::{
    kill_seed, listening, logged, rsync_diff, write_with_mtime as write, Proc, Rng, Token, BIN,
};

const STAGING: &str = ".fleetsync-staging";

fn symlink(target: &str, path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// `fleetsync sync ARGS...` (embedded mode), logged.
fn sync(args: &[&str], dirs: &[&Path]) -> Output {
    let out = Command::new(BIN)
        .arg("sync")
        .args(args)
        .args(dirs)
        .output()
        .unwrap();
    logged(&format!("sync {args:?}"), out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const BLOCKS: &str = r#"
# Declared before the block it comes after: the order comes from `after`.
[block.config]
select = "path:etc/**"
after = "binaries"

[block.docs]
select = "path:docs/**"

[block.binaries]
select = "path:usr/**"
"#;

/// A master tree and an older remote that differ in every way a block covers.
fn blocks_trees(tmp: &Path) -> (PathBuf, PathBuf) {
    let (m, r) = (tmp.join("master"), tmp.join("remote"));
    write(&m.join("usr/bin/app"), b"app v2\n", 2_000);
    write(&m.join("usr/lib/libapp.so"), &vec![2u8; 300_000], 2_000);
    write(&m.join("etc/app/a.conf"), b"threads = 8\n", 2_000);
    write(&m.join("etc/app/b.conf"), b"same content\n", 2_000);
    chmod(&m.join("etc/app/b.conf"), 0o640);
    symlink("a.conf", &m.join("etc/app/current"));
    write(&m.join("docs/readme"), b"docs v2\n", 2_000);
    write(&m.join("plain.txt"), b"no block v2\n", 2_000);

    write(&r.join("usr/bin/app"), b"app v1\n", 1_000);
    write(&r.join("usr/lib/libapp.so"), &vec![1u8; 200_000], 1_000);
    write(&r.join("etc/app/a.conf"), b"threads = 4\n", 1_000);
    // Same content and mtime: only the mode differs (an attribute fix in the block).
    write(&r.join("etc/app/b.conf"), b"same content\n", 2_000);
    chmod(&r.join("etc/app/b.conf"), 0o600);
    symlink("b.conf", &r.join("etc/app/current"));
    write(&r.join("etc/app/old.conf"), b"gone in v2\n", 1_000);
    write(&r.join("docs/readme"), b"docs v1\n", 1_000);
    write(&r.join("plain.txt"), b"no block v1\n", 1_000);
    (m, r)
}

/// The blocks in the order the agent logged their commits (`-v`).
fn commit_order(stderr: &str) -> Vec<String> {
    // Drop ANSI colour sequences.
    let mut plain = String::new();
    let mut chars = stderr.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .lines()
        .filter(|l| l.contains("block committed stage="))
        .filter_map(|l| {
            let at = l.find(" block=\"")? + " block=\"".len();
            Some(l[at..].split('"').next()?.to_owned())
        })
        .collect()
}

#[test]
fn blocks_run_in_after_order_with_symlinks_deletions_and_attrs_and_a_second_sync_has_nothing_to_do()
{
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = blocks_trees(tmp.path());
    let blocks = tmp.path().join("blocks.toml");
    fs::write(&blocks, BLOCKS).unwrap();
    let blocks = blocks.to_str().unwrap();

    // Dry run: every block item names its block; nothing changes.
    let out = sync(&["-n", "--delete", "--blocks", blocks], &[&m, &r]);
    assert_eq!(out.status.code(), Some(0));
    let plan = text(&out.stdout);
    for line in [
        "send     usr/bin/app (block binaries: ",
        "send     etc/app/a.conf (block config: ",
        "attrs    etc/app/b.conf (block config: mode 0600->0640",
        "symlink  etc/app/current (block config: target differs -> a.conf",
        "delete   etc/app/old.conf (block config: not on master",
        "send     docs/readme (block docs: ",
        "send     plain.txt (checksum differs",
    ] {
        assert!(plan.contains(line), "missing {line:?} in\n{plan}");
    }
    assert_eq!(fs::read(r.join("usr/bin/app")).unwrap(), b"app v1\n");

    let out = sync(&["-v", "--delete", "--blocks", blocks], &[&m, &r]);
    assert_eq!(out.status.code(), Some(0));
    let order = commit_order(&text(&out.stderr));
    let pos = |b: &str| order.iter().position(|x| x == b);
    assert_eq!(order.len(), 3, "one commit per block: {order:?}");
    assert!(
        pos("binaries") < pos("config"),
        "config comes after binaries: {order:?}"
    );
    assert_eq!(rsync_diff(&m, &r), "", "remote differs after the sync");
    assert!(!r.join(STAGING).exists(), "staging directory left behind");

    // Nothing left to do: zero transfers, deletions or other changes.
    let out = sync(&["--json", "--delete", "--blocks", blocks], &[&m, &r]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let remote = &v["remotes"][0];
    for key in ["transferred", "deleted", "changed"] {
        assert_eq!(remote[key], 0, "{key} on the second sync: {remote}");
    }
    assert_eq!(rsync_diff(&m, &r), "");
}

#[test]
fn a_failed_block_stays_old_and_the_blocks_after_it_are_not_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = blocks_trees(tmp.path());
    // A file that the journal refuses to stage (a component named like its staging
    // directory): the whole `binaries` block fails, and `config` comes after it.
    write(&m.join("usr/bin/.fleetsync-staging"), b"x", 2_000);
    let blocks = tmp.path().join("blocks.toml");
    fs::write(&blocks, BLOCKS).unwrap();
    let blocks = blocks.to_str().unwrap();

    let out = sync(&["--delete", "--blocks", blocks], &[&m, &r]);
    assert_eq!(out.status.code(), Some(1), "a failed block is a failure");
    let err = text(&out.stderr);
    assert!(
        err.contains("block config not applied: it comes after block binaries, which failed"),
        "{err}"
    );
    // binaries: all old, although usr/bin/app itself arrived fine.
    assert_eq!(fs::read(r.join("usr/bin/app")).unwrap(), b"app v1\n");
    assert_eq!(
        fs::read(r.join("usr/lib/libapp.so")).unwrap(),
        vec![1u8; 200_000]
    );
    assert!(!r.join("usr/bin/.fleetsync-staging").exists());
    // config: all old (content, symlink, deletion, mode).
    assert_eq!(
        fs::read(r.join("etc/app/a.conf")).unwrap(),
        b"threads = 4\n"
    );
    assert_eq!(
        fs::read_link(r.join("etc/app/current")).unwrap(),
        Path::new("b.conf")
    );
    assert!(r.join("etc/app/old.conf").exists());
    let mode = fs::metadata(r.join("etc/app/b.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600);
    // An independent block and the unblocked files are applied.
    assert_eq!(fs::read(r.join("docs/readme")).unwrap(), b"docs v2\n");
    assert_eq!(fs::read(r.join("plain.txt")).unwrap(), b"no block v2\n");
    assert!(!r.join(STAGING).exists(), "staging directory left behind");

    // Fixed on the master: the next sync completes.
    fs::remove_file(m.join("usr/bin/.fleetsync-staging")).unwrap();
    let out = sync(&["--delete", "--blocks", blocks], &[&m, &r]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(rsync_diff(&m, &r), "");
}

/// An old remote for [`hard_links_type_changes_and_two_remotes_that_progress_independently`].
fn old_app_remote(r: &Path) {
    write(&r.join("app/lead"), b"v1\n", 1_000);
    write(&r.join("app/member"), b"v1\n", 1_000);
    write(&r.join("app/was_file"), b"a file\n", 1_000);
    write(&r.join("app/was_dir/sub/deep"), b"deep\n", 1_000);
    write(&r.join("app/extra/deeper/e.txt"), b"e\n", 1_000);
    write(&r.join("app/extra/e2"), b"e2\n", 1_000);
}

#[test]
fn hard_links_type_changes_and_two_remotes_that_progress_independently() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("master");
    write(&m.join("app/lead"), b"v2\n", 2_000);
    fs::hard_link(m.join("app/lead"), m.join("app/member")).unwrap();
    write(
        &m.join("app/was_file/inside.txt"),
        b"now a directory\n",
        2_000,
    );
    write(&m.join("app/was_dir"), b"now a file\n", 2_000);
    let (r1, r2) = (tmp.path().join("r1"), tmp.path().join("r2"));
    old_app_remote(&r1);
    old_app_remote(&r2);
    let blocks = tmp.path().join("blocks.toml");
    fs::write(&blocks, "[block.app]\nselect = \"path:app/**\"\n").unwrap();

    let token = Token::new();
    let (_server, server) = token.server();
    let (_master, master) = token.agent(&m);
    let (_a1, a1) = token.agent(&r1);
    // r2's agent dies at the first step of its block commit.
    let (mut p2, a2) = agent(&token, &r2, Some(1));
    let out = token
        .sync_command(&server, &master, &[&a1, &a2])
        .arg("--blocks")
        .arg(&blocks)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(rsync_diff(&m, &r1), "", "r1 completed on its own");
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    assert_eq!(ino(&r1.join("app/lead")), ino(&r1.join("app/member")));
    p2.kill_now();
    let (_p2, a2) = token.agent(&r2);
    // r2: the block is all old.
    assert_eq!(fs::read(r2.join("app/lead")).unwrap(), b"v1\n");
    assert_eq!(fs::read(r2.join("app/member")).unwrap(), b"v1\n");
    assert_eq!(
        fs::read(r2.join("app/was_dir/sub/deep")).unwrap(),
        b"deep\n"
    );
    assert!(!r2.join("app/was_dir").is_file());

    let out = token
        .sync_command(&server, &master, &[&a1, &a2])
        .arg("--blocks")
        .arg(&blocks)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for r in [&r1, &r2] {
        assert_eq!(rsync_diff(&m, r), "");
        assert_eq!(ino(&r.join("app/lead")), ino(&r.join("app/member")));
    }
}

#[test]
fn a_bad_blocks_file_is_a_usage_error_naming_the_file_line_and_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = blocks_trees(tmp.path());
    let cases = [
        (
            "cycle",
            "[block.a]\nselect = \"name:a\"\nafter = \"b\"\n\n[block.b]\nselect = \"name:b\"\nafter = \"a\"\n",
            ":1: blocks file: the `after` relations form a cycle: a -> b -> a",
        ),
        (
            "unknown",
            "[block.a]\nselect = \"name:a\"\n\n[block.b]\nselect = \"name:b\"\nafter = [\"ghost\"]\n",
            ":4: blocks file: block \"b\" comes after \"ghost\", which is not defined",
        ),
        (
            "select",
            "[block.a]\nselect = \"name:a\"\n\n\n[block.bad]\nselect = \"ext:rs and (\"\n",
            ":5: blocks file: block \"bad\" has a bad select: column 13, at end of expression",
        ),
        ("syntax", "[block.a]\nselect = \"name:a\n", "line 2"),
    ];
    for (name, content, expected) in cases {
        let file = tmp.path().join(format!("{name}.toml"));
        fs::write(&file, content).unwrap();
        let out = sync(&["--blocks", file.to_str().unwrap()], &[&m, &r]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = text(&out.stderr);
        assert!(err.contains(file.to_str().unwrap()), "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
    }
    let out = sync(&["--blocks", "/nonexistent/blocks.toml"], &[&m, &r]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read blocks file /nonexistent/blocks.toml"));
    assert_eq!(fs::read(r.join("usr/bin/app")).unwrap(), b"app v1\n");
}

/// Sends a sync request straight to the server; returns its `syncDone`.
fn raw_request(server: &str, req: SyncRequest) -> (bool, String) {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    auth::connect(&mut s, Some(support::TOKEN), Role::Control).unwrap();
    s.write_all(&Msg::SyncRequest(req).to_frame().unwrap())
        .unwrap();
    let mut r = BufReader::new(s);
    loop {
        let body = frame::read_frame(&mut r).unwrap().expect("syncDone");
        if let Msg::SyncDone { ok, message } = Msg::decode(&body).unwrap() {
            return (ok, message);
        }
    }
}

#[test]
fn the_server_refuses_bad_blocks_in_a_request_and_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = blocks_trees(tmp.path());
    let token = Token::new();
    let (mut server_proc, server) = token.server();
    let (_ma, master) = token.agent(&m);
    let (_ra, remote) = token.agent(&r);
    let def = |name: &str, select: &str, after: &[&str]| BlockDef {
        name: name.into(),
        select: select.into(),
        after: after.iter().map(|a| a.to_string()).collect(),
    };
    let request = |blocks| SyncRequest {
        master: master.clone(),
        remotes: vec![remote.clone()],
        algorithm: "crc32".into(),
        blocks,
        ..SyncRequest::default()
    };
    for (blocks, expected) in [
        (
            vec![def("a", "name:a", &["b"]), def("b", "name:b", &["a"])],
            "cycle",
        ),
        (vec![def("a", "name:a", &["nope"])], "not defined"),
        (vec![def("a", "ext:rs and", &[])], "bad select"),
        (vec![def("../x", "name:a", &[])], "invalid block name"),
        (
            vec![def("a", "name:a", &[]), def("a", "name:b", &[])],
            "defined twice",
        ),
    ] {
        let (ok, message) = raw_request(&server, request(blocks));
        assert!(!ok, "{message}");
        assert!(message.contains(expected), "{message}");
    }
    assert!(server_proc.alive(), "the server died");
    assert_eq!(fs::read(r.join("usr/bin/app")).unwrap(), b"app v1\n");
    // Still serving: a good request goes through.
    let (ok, message) = raw_request(&server, request(vec![def("all", "name:*", &[])]));
    assert!(ok, "{message}");
    assert_eq!(fs::read(r.join("usr/bin/app")).unwrap(), b"app v2\n");
}

/// A random tree: nested directories, files of three extensions (two blocks and no block),
/// symlinks, hard links, modes and mtimes. `salt` varies content, modes and what exists.
fn random_tree(root: &Path, seed: u64, salt: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut salted = Rng((seed ^ salt.wrapping_mul(0xdead_beef)) | 1);
    fs::create_dir_all(root).unwrap();
    for k in 0..40 {
        let dir = format!("d{}/e{}", rng.below(3), rng.below(2));
        let ext = ["a", "b", "c"][rng.below(3) as usize];
        let path = root.join(format!("{dir}/f{k}.{ext}"));
        // The same draws in every version, so that most paths exist on both sides.
        let (kind, len) = (rng.below(6), rng.below(5000) as usize);
        let roll = salted.below(10);
        if roll == 0 {
            continue; // absent in this version
        }
        if roll == 1 && salt > 0 {
            // A directory where the other version has a file.
            write(&path.join("inner.c"), b"inner", 1_000);
            continue;
        }
        match kind {
            0 => symlink(&format!("t{}", salted.below(3)), &path),
            _ => {
                let len = len + usize::from(salted.below(3) == 0);
                let byte = if salted.below(4) == 0 { salt as u8 } else { 7 };
                write(&path, &vec![byte; len], 1_000 + salted.below(2));
                chmod(&path, [0o644, 0o600, 0o755][salted.below(3) as usize]);
            }
        }
    }
    // Hard links: pairs across directories.
    for k in 0..4 {
        let a = root.join(format!("d{k}/h{k}.{}", ["a", "b", "c"][k % 3]));
        write(&a, format!("hard {k}").as_bytes(), 1_000);
        if salted.below(2) == 0 {
            let b = root.join(format!("d{}/h{k}-link.a", (k + 1) % 3));
            fs::create_dir_all(b.parent().unwrap()).unwrap();
            let _ = fs::remove_file(&b);
            fs::hard_link(&a, &b).unwrap();
        }
    }
}

#[test]
fn random_trees_with_two_blocks_are_rsync_clean_after_every_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let blocks = tmp.path().join("blocks.toml");
    fs::write(
        &blocks,
        "[block.b]\nselect = \"ext:b\"\nafter = \"a\"\n[block.a]\nselect = \"ext:a\"\n",
    )
    .unwrap();
    let blocks = blocks.to_str().unwrap();
    for seed in 1..=6u64 {
        let m = tmp.path().join(format!("m{seed}"));
        let r = tmp.path().join(format!("r{seed}"));
        random_tree(&m, seed, 0);
        random_tree(&r, seed, seed);
        let out = sync(&["--json", "--delete", "--blocks", blocks], &[&m, &r]);
        assert_eq!(out.status.code(), Some(0), "seed {seed}");
        assert_eq!(rsync_diff(&m, &r), "", "seed {seed}: remote differs");
        // The consistency loop checked what the blocks put in place (the remote's write log
        // records a staged file only once its block commits) and found nothing to redo.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let remote = &v["remotes"][0];
        assert_ne!(remote["transferred"], 0, "seed {seed}: nothing sent");
        assert_eq!(remote["rounds"], 1, "seed {seed}: {remote}");
        assert_eq!(remote["resynced"], 0, "seed {seed}: {remote}");
        assert_eq!(remote["inconsistent"], serde_json::json!([]), "seed {seed}");
        let out = sync(&["--json", "--delete", "--blocks", blocks], &[&m, &r]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for key in ["transferred", "deleted", "changed"] {
            assert_eq!(
                v["remotes"][0][key], 0,
                "seed {seed}: {key} on the second sync"
            );
        }
    }
}

/// A raw server connection to an agent.
struct RawServer {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl RawServer {
    fn connect(addr: &str) -> RawServer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        auth::connect(&mut s, Some(support::TOKEN), Role::Server).unwrap();
        RawServer {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// Sends a request; returns its item results and `done`.
    fn request(&mut self, m: Msg) -> (Vec<fleetsync_proto::ItemResult>, fleetsync_proto::Done) {
        self.w.write_all(&m.to_frame().unwrap()).unwrap();
        let mut items = Vec::new();
        loop {
            let body = frame::read_frame(&mut self.r).unwrap().expect("reply");
            match Msg::decode(&body).unwrap() {
                Msg::ItemResults { results, .. } => items.extend(results),
                Msg::Done(d) => return (items, d),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn the_agent_commits_only_what_arrived_and_drops_the_transactions_of_a_closed_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    write(&root.join("keep.txt"), b"old\n", 1_000);
    let token = Token::new();
    let (_agent, addr) = token.agent(&root);
    let put = |path: &str, size: u64| fleetsync_proto::Op {
        path: path.as_bytes().to_vec(),
        kind: fleetsync_proto::OpKind::Put {
            attrs: fleetsync_proto::Attrs::default(),
            size,
        },
    };
    let delete = |path: &str| fleetsync_proto::Op {
        path: path.as_bytes().to_vec(),
        kind: fleetsync_proto::OpKind::Delete { recursive: false },
    };

    let mut s = RawServer::connect(&addr);
    let begin = |stage: &str| Msg::BlockBegin {
        request_id: 1,
        stage: stage.into(),
        block: "b".into(),
    };
    let (items, done) = s.request(begin("t1"));
    assert_eq!((done.ok, done.failed), (1, 0), "{items:?}");
    assert!(root.join(STAGING).is_dir());
    // A put of a file that was never sent: the whole block fails, nothing changes.
    let (items, done) = s.request(Msg::BlockCommit {
        request_id: 2,
        stage: "t1".into(),
        ops: vec![delete("keep.txt"), put("new.txt", 3)],
        abort: false,
    });
    assert_eq!((done.ok, done.failed), (0, 2));
    assert!(
        items
            .iter()
            .all(|i| i.message.contains("new.txt: was not sent")),
        "{items:?}"
    );
    assert_eq!(fs::read(root.join("keep.txt")).unwrap(), b"old\n");
    assert!(!root.join(STAGING).exists());
    // A put outside a block commit is refused; a bad transaction name too.
    let (items, _) = s.request(Msg::ApplyRequest {
        request_id: 3,
        ops: vec![put("new.txt", 3)],
    });
    assert!(
        items[0].message.contains("only valid in a block commit"),
        "{items:?}"
    );
    let (items, done) = s.request(begin("../x"));
    assert_eq!(done.failed, 1, "{items:?}");
    // A transaction left open by a connection that closes is dropped.
    let (_, done) = s.request(begin("t2"));
    assert_eq!(done.ok, 1);
    assert!(root.join(STAGING).is_dir());
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while root.join(STAGING).exists() {
        assert!(
            Instant::now() < deadline,
            "staging of a closed connection left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read(root.join("keep.txt")).unwrap(), b"old\n");
}

// ------------------------------------------------------------------ kill test

/// Files of the killed block.
const BLOCK_FILES: usize = 30;
const OLD_MTIME: u64 = 1_500_000_000;
const NEW_MTIME: u64 = 1_600_000_000;
const ITERATIONS: usize = 12;

fn block_path(i: usize) -> String {
    format!("data/s{}/f{i:02}.bin", i % 3)
}

/// File `i` of the block in `version` 0 (old) or 1 (new): every fifth one is big, so that
/// kills land in the middle of the stream; old and new sizes differ for some.
fn block_content(i: usize, version: u64) -> Vec<u8> {
    let len = if i.is_multiple_of(5) {
        1_200_000 + i * 1000 + version as usize * 7
    } else {
        3_000 + i * 100 + (version as usize * (i % 2)) * 50
    };
    let mut out = format!("block file {i} version {version}\n").into_bytes();
    let mut rng = Rng((i as u64 + 7).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (version + 3));
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// What one version of the block looks like: path -> file content, or `@target` for a
/// symlink; absent paths are absent.
fn block_version(version: u64) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let files = if version == 0 {
        BLOCK_FILES - 2
    } else {
        BLOCK_FILES
    };
    for i in 0..files {
        v.insert(block_path(i), format!("#{i}"));
    }
    if version == 0 {
        v.insert("data/retired.bin".into(), "retired".into());
        v.insert("data/current".into(), "@s0/f00.bin".into());
    } else {
        v.insert("data/current".into(), "@s1/f01.bin".into());
    }
    v
}

fn make_version(root: &Path, version: u64) {
    let mtime = if version == 0 { OLD_MTIME } else { NEW_MTIME };
    for (path, what) in block_version(version) {
        let p = root.join(&path);
        if let Some(t) = what.strip_prefix('@') {
            symlink(t, &p);
        } else if let Some(i) = what.strip_prefix('#') {
            write(&p, &block_content(i.parse().unwrap(), version), mtime);
        } else {
            write(&p, what.as_bytes(), mtime);
        }
    }
    // Mode change inside the block, and files outside every block.
    let mode = if version == 0 { 0o600 } else { 0o644 };
    chmod(&root.join(block_path(3)), mode);
    for k in 0..4 {
        let data = format!("outside {k} version {version}\n").repeat(1000 * (k + 1));
        write(
            &root.join(format!("other/o{k}.txt")),
            data.as_bytes(),
            mtime,
        );
    }
}

/// Which version the block on `root` is entirely in; panics on a mix.
fn block_state(root: &Path) -> u64 {
    let mut verdicts = BTreeMap::new();
    let mut paths: Vec<String> = block_version(0).into_keys().collect();
    paths.extend(block_version(1).into_keys());
    paths.sort();
    paths.dedup();
    for path in &paths {
        let p = root.join(path);
        let actual = match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("{path}: {e}"),
            Ok(md) if md.file_type().is_symlink() => {
                Some(format!("@{}", fs::read_link(&p).unwrap().to_string_lossy()))
            }
            Ok(_) => Some(format!("{:x?}", fs::read(&p).unwrap())),
        };
        let expect = |version: u64| {
            block_version(version).get(path).map(|what| {
                if what.starts_with('@') {
                    what.clone()
                } else if let Some(i) = what.strip_prefix('#') {
                    format!("{:x?}", block_content(i.parse().unwrap(), version))
                } else {
                    format!("{:x?}", what.as_bytes())
                }
            })
        };
        let (old, new) = (expect(0), expect(1));
        let is_old = actual == old;
        let is_new = actual == new;
        assert!(
            is_old || is_new,
            "{path}: neither its old nor its new version (torn file?)"
        );
        verdicts.insert(path.clone(), (is_old, is_new));
    }
    let mode = fs::metadata(root.join(block_path(3)))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    let all_old = verdicts.values().all(|v| v.0) && mode == 0o600;
    let all_new = verdicts.values().all(|v| v.1) && mode == 0o644;
    assert!(
        all_old || all_new,
        "the block is mixed (mode {mode:o}): {:?}",
        verdicts
            .iter()
            .map(|(p, (o, n))| format!(
                "{p}: {}",
                if *o {
                    "old"
                } else if *n {
                    "new"
                } else {
                    "?"
                }
            ))
            .collect::<Vec<_>>()
    );
    u64::from(all_new && !all_old)
}

/// `fleetsync agent` for `root`, optionally with the journal's crash hook armed (in the
/// child's environment only: the tests of this file run in parallel).
fn agent(token: &Token, root: &Path, crash_at: Option<u64>) -> (Proc, String) {
    let Some(n) = crash_at else {
        return token.agent(root);
    };
    listening(
        token
            .agent_command(root)
            .env("FLEETSYNC_JOURNAL_CRASH_AT", n.to_string())
            .stderr(Stdio::null()),
    )
}

/// `fleetsync agent` for `root` with its log (stderr) in `log`.
fn agent_logging(token: &Token, root: &Path, log: &Path) -> (Proc, String) {
    listening(
        token
            .agent_command(root)
            .stderr(fs::File::create(log).unwrap()),
    )
}

const KILL_BLOCKS: &str = r#"
[block.data]
select = "path:data/**"
"#;

#[test]
fn sigkill_of_the_remote_agent_leaves_each_block_all_old_or_all_new_and_the_next_sync_finishes() {
    let started = Instant::now();
    let mut rng = Rng(kill_seed());

    let tmp = tempfile::tempdir().unwrap();
    let master_root = tmp.path().join("master");
    make_version(&master_root, 1);
    let blocks = tmp.path().join("blocks.toml");
    fs::write(&blocks, KILL_BLOCKS).unwrap();
    let token = Token::new();
    let (_server, server) = token.server();
    let (_master, master) = token.agent(&master_root);
    let run_sync = |remote: &str| {
        let mut cmd = token.sync_command(&server, &master, &[remote]);
        cmd.arg("--blocks").arg(&blocks);
        cmd
    };

    // Calibration: a whole sync, uninterrupted, for the range of kill moments.
    let remote_root = tmp.path().join("calibrate");
    make_version(&remote_root, 0);
    let (_remote, remote) = token.agent(&remote_root);
    let t0 = Instant::now();
    let out = run_sync(&remote).output().unwrap();
    let full = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(block_state(&remote_root), 1);
    assert_eq!(rsync_diff(&master_root, &remote_root), "");
    eprintln!("an uninterrupted sync takes {full:?}");

    let mut seen = [0usize; 2];
    for it in 0..ITERATIONS {
        let remote_root = tmp.path().join(format!("remote{it}"));
        make_version(&remote_root, 0);
        // Even iterations: SIGKILL at a random moment of the sync (stream, staging, commit).
        // Odd ones: the journal's own hook kills the agent just before a random step of the
        // commit, which a timer would rarely hit.
        let crash_at = (it % 2 == 1).then(|| 1 + rng.below(110));
        let (mut remote_proc, remote) = agent(&token, &remote_root, crash_at);
        let mut sync = run_sync(&remote)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let how = match crash_at {
            Some(n) => format!("crash hook at step {n}"),
            None => {
                let at = Duration::from_micros(rng.below(full.as_micros() as u64 + 1));
                std::thread::sleep(at);
                remote_proc.kill_now();
                format!("SIGKILL after {at:?}")
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = sync.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "iteration {it}: the sync hung after the agent was killed"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        remote_proc.kill_now();

        // Restart: recovery runs (and logs) before the agent listens.
        let log = tmp.path().join(format!("agent{it}.log"));
        let (_remote_proc, remote) = agent_logging(&token, &remote_root, &log);
        let state = block_state(&remote_root);
        let logged = fs::read_to_string(&log).unwrap();
        if logged.contains("committed block completed") {
            assert_eq!(state, 1, "iteration {it}: replayed, yet old: {logged}");
        }
        if logged.contains("uncommitted block rolled back") {
            assert_eq!(state, 0, "iteration {it}: rolled back, yet new: {logged}");
        }
        seen[state as usize] += 1;
        assert!(
            !remote_root.join(STAGING).exists(),
            "iteration {it}: staging left after recovery"
        );
        let recovery = if logged.contains("committed block completed") {
            "replayed"
        } else if logged.contains("uncommitted block rolled back") {
            "rolled back"
        } else {
            "nothing to recover"
        };
        eprintln!(
            "iteration {it}: {how}; sync {status}; {recovery}; block {} after restart",
            ["old", "new"][state as usize]
        );

        let out = run_sync(&remote).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "iteration {it}: the next sync failed: {}",
            text(&out.stderr)
        );
        assert_eq!(block_state(&remote_root), 1);
        let diff = rsync_diff(&master_root, &remote_root);
        assert!(diff.is_empty(), "iteration {it}: remote differs:\n{diff}");
        fs::remove_dir_all(&remote_root).unwrap();
    }
    eprintln!(
        "{ITERATIONS} iterations in {:?}: block old after the kill {} time(s), new {} time(s)",
        started.elapsed(),
        seen[0],
        seen[1]
    );
}
