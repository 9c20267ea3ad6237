//! `--server` mode refuses overlapping trees too (issue 13, "Never lose the master"): the
//! agents tell the server where their trees are (machine, device and inode of the root and of
//! its parents), and the server refuses every pair whose trees are the same or nested, before
//! anything is listed or written, naming both agents.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use support::{rsync_diff, Proc, Token};

fn files(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk(root, root);
    out.sort();
    out
}

fn walk(top: &Path, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.strip_prefix(top).unwrap().display().to_string());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(top, &p));
        }
    }
    out
}

/// Agents on `master` and `remotes`, a `--server` sync with `--delete`: returns its stderr
/// (the sync must fail) and the agents' addresses.
fn refused(master: &Path, remotes: &[&Path]) -> (String, String, Vec<String>) {
    let token = Token::new();
    let (_m, maddr) = token.agent(master);
    let agents: Vec<(Proc, String)> = remotes.iter().map(|r| token.agent(r)).collect();
    let raddrs: Vec<String> = agents.iter().map(|(_, a)| a.clone()).collect();
    let (mut srv, saddr) = token.server();
    let refs: Vec<&str> = raddrs.iter().map(String::as_str).collect();
    let out = token.sync(&saddr, &maddr, &refs);
    assert!(!out.status.success(), "an overlapping sync succeeded");
    assert!(srv.alive(), "the server must keep running");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        maddr,
        raddrs,
    )
}

fn populate(m: &Path) {
    fs::create_dir_all(m.join("d")).unwrap();
    fs::write(m.join("a.txt"), b"alpha\n").unwrap();
    fs::write(m.join("d/b.bin"), vec![3u8; 10_000]).unwrap();
}

#[test]
fn a_remote_inside_the_master_is_refused_naming_both_agents() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let r = m.join("r");
    fs::create_dir(&r).unwrap();
    let before = files(&m);
    let (err, maddr, raddrs) = refused(&m, &[&r]);
    assert!(err.contains("overlap"), "{err}");
    assert!(err.contains(&maddr) && err.contains(&raddrs[0]), "{err}");
    assert_eq!(files(&m), before, "nothing may be written");
}

#[test]
fn the_master_inside_the_remote_survives_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("r");
    let m = r.join("nest/m");
    populate(&m);
    fs::write(r.join("only-on-remote"), b"x").unwrap();
    let before = files(&r);
    let (err, _, _) = refused(&m, &[&r]);
    assert!(err.contains("overlap"), "{err}");
    assert_eq!(
        files(&r),
        before,
        "the master (inside the remote) was touched"
    );
}

#[test]
fn the_master_through_a_symlink_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let r = tmp.path().join("link-to-m");
    symlink(&m, &r).unwrap();
    let before = files(&m);
    let (err, _, _) = refused(&m, &[&r]);
    assert!(err.contains("overlap"), "{err}");
    assert_eq!(files(&m), before);
}

#[test]
fn nested_remotes_are_refused_and_a_separate_one_still_syncs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let (r1, r2, r3) = (
        tmp.path().join("r1"),
        tmp.path().join("r1/inner"),
        tmp.path().join("r3"),
    );
    for r in [&r1, &r2, &r3] {
        fs::create_dir_all(r).unwrap();
    }
    let (err, _, raddrs) = refused(&m, &[&r1, &r2, &r3]);
    assert!(err.contains("remote trees of agents"), "{err}");
    assert!(
        err.contains(&raddrs[0]) && err.contains(&raddrs[1]),
        "{err}"
    );
    assert_eq!(files(&r1), vec!["inner".to_owned()], "r1 was written");
    assert!(files(&r2).is_empty(), "r2 was written");
    // The remote that overlaps nothing is synced.
    assert_eq!(rsync_diff(&m, &r3), "");
}

#[test]
fn sibling_trees_sharing_a_parent_are_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    populate(&m);
    let (r1, r2) = (tmp.path().join("m-copy"), tmp.path().join("r2"));
    fs::create_dir(&r1).unwrap();
    fs::create_dir(&r2).unwrap();
    let token = Token::new();
    let (_m, maddr) = token.agent(&m);
    let (_a1, a1) = token.agent(&r1);
    let (_a2, a2) = token.agent(&r2);
    let (_s, saddr) = token.server();
    let out = token.sync(&saddr, &maddr, &[&a1, &a2]);
    assert!(out.status.success());
    assert_eq!(rsync_diff(&m, &r1), "");
    assert_eq!(rsync_diff(&m, &r2), "");
}
