use std::sync::Arc;

use super::*;

#[derive(Clone)]
struct E {
    path: &'static [u8],
    kind: Kind,
    mode: u32,
    size: u64,
    mtime: i64,
    uid: u32,
    link: Option<u64>,
    target: &'static [u8],
}

fn f(path: &'static str, size: u64) -> E {
    E {
        path: path.as_bytes(),
        kind: Kind::File,
        mode: 0o644,
        size,
        mtime: 100,
        uid: 0,
        link: None,
        target: b"",
    }
}
fn d(path: &'static str) -> E {
    E {
        kind: Kind::Dir,
        mode: 0o755,
        size: 4096,
        ..f(path, 0)
    }
}
fn l(path: &'static str, target: &'static str) -> E {
    E {
        kind: Kind::Symlink,
        mode: 0o777,
        target: target.as_bytes(),
        ..f(path, 0)
    }
}
fn linked(mut e: E, inode: u64) -> E {
    e.link = Some(inode);
    e
}

fn list(entries: &[E]) -> FileList {
    let mut fl = FileList::new();
    for e in entries {
        let meta = Meta {
            kind: Some(e.kind),
            mode: e.mode,
            uid: e.uid,
            gid: 0,
            size: e.size,
            mtime_sec: e.mtime,
            mtime_nsec: 0,
            dev: 1,
            inode: e.link.unwrap_or(0),
            nlink: if e.link.is_some() { 2 } else { 1 },
        };
        fl.push(e.path, &meta, e.target).unwrap();
    }
    fl.finish().unwrap();
    fl
}

/// The master list and the remote's compacted against it.
fn lists(m: &[E], r: &[E]) -> (Arc<FileList>, RemoteList) {
    let ml = Arc::new(list(m));
    let rl = RemoteList::compact(ml.clone(), &list(r)).unwrap();
    (ml, rl)
}

/// Plans with the given checksum answers; returns "kind why path" lines
/// in execution order, sections separated by "|". The remote list held
/// whole plans the same.
fn plan(m: &[E], r: &[E], opts: PlanOptions, same: impl Fn(&[u8]) -> bool) -> Vec<String> {
    let (ml, rl) = lists(m, r);
    let got = plan_lines(&ml, &rl, opts, &same);
    let whole = RemoteList::plain(ml.clone(), list(r)).unwrap();
    assert_eq!(
        got,
        plan_lines(&ml, &whole, opts, &same),
        "compacted vs whole"
    );
    got
}

fn plan_lines(
    ml: &FileList,
    rl: &RemoteList,
    opts: PlanOptions,
    same: &impl Fn(&[u8]) -> bool,
) -> Vec<String> {
    let pair = PairPlan::new(ml, rl, opts);
    let plan = pair.resolve(ml, rl, |m| same(ml.path(m)));
    let show = |s: &Step| {
        let path = match s.kind {
            StepKind::Delete | StepKind::DeleteTree => rl.path(s.index),
            _ => ml.path(s.index),
        };
        let mut line = format!("{:?} {:?} {}", s.kind, s.why, String::from_utf8_lossy(path));
        // A basis other than the same path is shown as "<- basis".
        if let Some(b) = s.basis() {
            if rl.path(b) != path {
                line += &format!(" <- {}", String::from_utf8_lossy(rl.path(b)));
            }
        }
        line
    };
    let mut out: Vec<String> = plan.before().iter().map(show).collect();
    out.push("|".into());
    out.extend(plan.sends().iter().map(show));
    out.push("|".into());
    out.extend(plan.after().iter().map(show));
    for &s in &plan.skipped {
        out.push(format!("skip {}", String::from_utf8_lossy(ml.path(s))));
    }
    out
}

fn opts() -> PlanOptions {
    PlanOptions {
        delete: true,
        owner: true,
    }
}

#[test]
fn empty_remote_gets_everything_dirs_first_attrs_last() {
    let m = [
        d(""),
        d("a"),
        f("a/x", 3),
        l("a/s", "x"),
        d("a/b"),
        f("z", 0),
    ];
    let got = plan(&m, &[], opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Mkdir New ", // root missing entirely: created (agent: ok if exists)
            "Mkdir New a",
            "Mkdir New a/b",
            "|",
            "Send New a/x",
            "Send New z",
            "|",
            "Symlink New a/s",
            "SetAttrs New a/b",
            "SetAttrs New a",
            "SetAttrs New ",
        ]
    );
}

#[test]
fn identical_trees_need_nothing_but_checksums() {
    let m = [d(""), d("a"), f("a/x", 3), l("a/s", "x")];
    let (ml, rl) = lists(&m, &m);
    assert_eq!(rl.others().len(), 0);
    let pair = PairPlan::new(&ml, &rl, opts());
    assert_eq!(pair.candidate_count(), 1);
    let plan = pair.resolve(&ml, &rl, |_| true);
    assert!(plan.is_empty(), "{:?}", plan.steps());
}

#[test]
fn same_size_different_content_is_sent_after_checksum() {
    let m = [d(""), f("x", 3), f("y", 3)];
    let got = plan(&m, &m, opts(), |p| p != b"x");
    assert_eq!(
        got,
        vec!["|", "Send ChecksumDiffers x", "|", "SetAttrs DirTouched "]
    );
}

#[test]
fn different_size_is_sent_without_checksum() {
    let (ml, rl) = lists(&[f("x", 3)], &[f("x", 4)]);
    let pair = PairPlan::new(&ml, &rl, opts());
    assert_eq!(pair.candidate_count(), 0);
    let plan = pair.resolve(&ml, &rl, |_| unreachable!());
    assert_eq!(plan.sends()[0].why, Why::SizeDiffers);
}

#[test]
fn extra_remote_entries_deleted_deepest_first_only_with_delete() {
    let m = [d("")];
    let r = [
        d(""),
        d("e"),
        f("e/1", 1),
        d("e/sub"),
        f("e/sub/2", 1),
        f("z", 1),
    ];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Delete Extra z",
            "Delete Extra e/sub/2",
            "Delete Extra e/sub",
            "Delete Extra e/1",
            "Delete Extra e",
            "|",
            "|",
            "SetAttrs DirTouched ",
        ]
    );
    let got = plan(
        &m,
        &r,
        PlanOptions {
            delete: false,
            owner: true,
        },
        |_| true,
    );
    assert_eq!(got, vec!["|", "|"]);
}

#[test]
fn mode_only_change_is_an_attribute_fix() {
    let mut x = f("x", 3);
    let m = [x.clone()];
    x.mode = 0o600;
    let got = plan(&m, &[x], opts(), |_| true);
    assert_eq!(got, vec!["|", "|", "SetAttrs AttrsDiffer x"]);
}

#[test]
fn mtime_only_change_is_an_attribute_fix_and_owner_only_when_root() {
    let mut x = f("x", 3);
    let m = [x.clone()];
    x.uid = 1000;
    let got = plan(&m, &[x.clone()], opts(), |_| true);
    assert_eq!(got, vec!["|", "|", "SetAttrs AttrsDiffer x"]);
    let no_owner = PlanOptions {
        delete: true,
        owner: false,
    };
    assert_eq!(plan(&m, &[x.clone()], no_owner, |_| true), vec!["|", "|"]);
    x.mtime = 5;
    assert_eq!(
        plan(&m, &[x], no_owner, |_| true),
        vec!["|", "|", "SetAttrs AttrsDiffer x"]
    );
}

#[test]
fn file_to_dir_and_dir_to_file_delete_then_create() {
    let m = [d(""), f("a", 1), d("b"), f("b/in", 1)];
    let r = [d(""), d("a"), f("a/old", 1), f("b", 1)];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Delete KindChanged b",
            "Delete Extra a/old",
            "DeleteTree KindChanged a",
            "Mkdir New b",
            "|",
            "Send KindChanged a",
            "Send New b/in",
            "|",
            "SetAttrs New b",
            "SetAttrs DirTouched ",
        ]
    );
}

#[test]
fn dir_to_file_without_delete_removes_whole_tree() {
    let m = [f("a", 1)];
    let r = [d("a"), f("a/old", 1)];
    let got = plan(
        &m,
        &r,
        PlanOptions {
            delete: false,
            owner: true,
        },
        |_| true,
    );
    assert_eq!(
        got,
        vec!["DeleteTree KindChanged a", "|", "Send KindChanged a", "|"]
    );
}

#[test]
fn file_to_symlink_is_replaced_atomically_without_delete() {
    let m = [l("a", "t"), f("b", 1)];
    let r = [f("a", 1), l("b", "t")];
    let got = plan(&m, &r, opts(), |_| true);
    // The remote file "a" stays until the symlink replaces it in *after*: it
    // is a basis for "b" (the same size).
    assert_eq!(
        got,
        vec!["|", "Send KindChanged b <- a", "|", "Symlink KindChanged a"]
    );
}

#[test]
fn symlinks_new_repointed_dangling_and_attrs() {
    let mut same_target = l("c", "t");
    let m = [
        l("a", "new"),
        l("b", "missing/dangling"),
        same_target.clone(),
    ];
    same_target.mtime = 1;
    let r = [l("b", "old"), same_target];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "|",
            "|",
            "Symlink New a",
            "Symlink TargetDiffers b",
            "SetAttrs AttrsDiffer c"
        ]
    );
}

#[test]
fn symlink_mode_is_never_compared() {
    let mut s = l("a", "t");
    let m = [s.clone()];
    s.mode = 0o755;
    assert_eq!(plan(&m, &[s], opts(), |_| true), vec!["|", "|"]);
}

#[test]
fn new_hard_link_group_sends_one_links_the_rest() {
    let m = [
        linked(f("a", 5), 1),
        linked(f("b", 5), 1),
        linked(f("c", 5), 1),
        f("d", 5),
    ];
    let got = plan(&m, &[], opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "|",
            "Send New a",
            "Send New d",
            "|",
            "HardLink Relink b",
            "HardLink Relink c"
        ]
    );
}

#[test]
fn intact_hard_link_group_needs_only_leader_checksum() {
    let m = [linked(f("a", 5), 1), linked(f("b", 5), 1)];
    let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
    let (ml, rl) = lists(&m, &r);
    let pair = PairPlan::new(&ml, &rl, opts());
    let cands: Vec<(u32, u32)> = pair.candidates_from(&ml, &rl, 0).collect();
    assert_eq!(cands, [(0, rl.other_index(0))]);
    assert!(pair.resolve(&ml, &rl, |_| true).is_empty());
}

#[test]
fn hard_link_member_missing_on_remote_is_linked() {
    let m = [linked(f("a", 5), 1), linked(f("b", 5), 1)];
    let r = [f("a", 5), f("b", 5)];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(got, vec!["|", "|", "HardLink Relink b"]);
}

#[test]
fn changed_leader_relinks_all_members() {
    let m = [linked(f("a", 5), 1), linked(f("b", 5), 1)];
    let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
    let got = plan(&m, &r, opts(), |_| false);
    assert_eq!(
        got,
        vec!["|", "Send ChecksumDiffers a", "|", "HardLink Relink b"]
    );
}

#[test]
fn remote_link_that_must_be_broken_gets_a_fresh_copy() {
    // Master: a and b are separate files with the same content; remote: linked.
    let m = [f("a", 5), f("b", 5)];
    let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(got, vec!["|", "Send BreakLink a", "Send BreakLink b", "|"]);
}

#[test]
fn remote_link_to_outsider_breaks_the_group_leader() {
    let m = [linked(f("a", 5), 1), linked(f("b", 5), 1), f("z", 5)];
    let r = [
        linked(f("a", 5), 7),
        linked(f("b", 5), 7),
        linked(f("z", 5), 7),
    ];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "|",
            "Send BreakLink a",
            "Send BreakLink z",
            "|",
            "HardLink Relink b"
        ]
    );
}

#[test]
fn special_files_are_skipped_with_a_note() {
    let fifo = E {
        kind: Kind::Special,
        ..f("p", 0)
    };
    let got = plan(
        std::slice::from_ref(&fifo),
        std::slice::from_ref(&fifo),
        opts(),
        |_| true,
    );
    assert_eq!(got, vec!["|", "|", "skip p"]);
}

#[test]
fn directory_attributes_fixed_last_deepest_first() {
    let mut a = d("a");
    let mut ab = d("a/b");
    let m = [d(""), a.clone(), ab.clone()];
    a.mtime = 1;
    ab.mode = 0o700;
    let got = plan(&m, &[d(""), a, ab], opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "|",
            "|",
            "SetAttrs AttrsDiffer a/b",
            "SetAttrs AttrsDiffer a"
        ]
    );
}

#[test]
fn names_with_newlines_and_non_utf8() {
    let m = [E {
        path: b"we ird\n\xff",
        ..f("", 1)
    }];
    let got = plan(&m, &[], opts(), |_| true);
    assert_eq!(got.len(), 3);
    assert!(got[1].starts_with("Send New we ird\n"));
}

#[test]
fn describe_names_what_differs() {
    let mut x = f("x", 3);
    let m = [x.clone()];
    x.mode = 0o600;
    x.mtime = 1;
    let (ml, rl) = lists(&m, &[x]);
    let plan = PairPlan::new(&ml, &rl, opts()).resolve(&ml, &rl, |_| true);
    assert_eq!(
        describe(&plan.after()[0], &ml, &rl, true),
        "mode 0600->0644, mtime"
    );
}

#[test]
fn changed_files_get_their_old_version_as_basis() {
    let m = [f("a", 3), f("b", 4), f("c", 5), f("n", 9)];
    let r = [f("a", 3), f("b", 3), f("c", 5)];
    let (ml, rl) = lists(&m, &r);
    let pair = PairPlan::new(&ml, &rl, opts());
    let plan = pair.resolve(&ml, &rl, |m| ml.path(m) != b"a");
    let name = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let got: Vec<String> = plan
        .sends()
        .iter()
        .map(|s| {
            let basis = s.basis().map(|b| name(rl.path(b)));
            format!("{} {:?} {basis:?}", name(ml.path(s.index)), s.why)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            r#"a ChecksumDiffers Some("a")"#,
            r#"b SizeDiffers Some("b")"#,
            "n New None",
        ]
    );
    // Only sends have a basis.
    assert!(plan
        .steps()
        .iter()
        .all(|s| s.kind == StepKind::Send || s.basis().is_none()));
}

#[test]
fn broken_hard_link_keeps_its_path_as_basis() {
    let m = [f("a", 5), f("b", 5)];
    let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
    let (ml, rl) = lists(&m, &r);
    let plan = PairPlan::new(&ml, &rl, opts()).resolve(&ml, &rl, |_| unreachable!());
    let bases: Vec<Option<&[u8]>> = plan
        .sends()
        .iter()
        .map(|s| s.basis().map(|b| rl.path(b)))
        .collect();
    assert_eq!(bases, vec![Some(&b"a"[..]), Some(&b"b"[..])]);
}

#[test]
fn renamed_library_is_deltaed_against_its_predecessor_deleted_after_the_sends() {
    let m = [
        d(""),
        d("lib"),
        f("lib/lib-abc123.3.27.so", 1000),
        f("lib/z", 1),
    ];
    let r = [
        d(""),
        d("lib"),
        f("lib/lib-def456.3.26.so", 900),
        f("lib/old.txt", 7),
        f("lib/z", 1),
    ];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Delete Extra lib/old.txt",
            "|",
            "Send New lib/lib-abc123.3.27.so <- lib/lib-def456.3.26.so",
            "|",
            "Delete Extra lib/lib-def456.3.26.so",
            "SetAttrs DirTouched lib",
        ]
    );
}

#[test]
fn versioned_directory_basis_defers_the_old_directory_deletion_too() {
    let m = [
        d(""),
        d("numpy-2.0.0.dist-info"),
        f("numpy-2.0.0.dist-info/RECORD", 1100),
    ];
    let r = [
        d(""),
        d("numpy-1.26.4.dist-info"),
        f("numpy-1.26.4.dist-info/METADATA", 50),
        f("numpy-1.26.4.dist-info/RECORD", 1000),
    ];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Delete Extra numpy-1.26.4.dist-info/METADATA",
            "Mkdir New numpy-2.0.0.dist-info",
            "|",
            "Send New numpy-2.0.0.dist-info/RECORD <- numpy-1.26.4.dist-info/RECORD",
            "|",
            "Delete Extra numpy-1.26.4.dist-info/RECORD",
            "Delete Extra numpy-1.26.4.dist-info",
            "SetAttrs New numpy-2.0.0.dist-info",
            "SetAttrs DirTouched ",
        ]
    );
}

#[test]
fn same_size_remote_only_file_is_chosen_whatever_its_name() {
    let m = [f("b.bin", 5000)];
    let r = [f("a.dat", 5000), f("c.txt", 10)];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Delete Extra c.txt",
            "|",
            "Send New b.bin <- a.dat",
            "|",
            "Delete Extra a.dat"
        ]
    );
    // Without --delete the remote-only file stays and is still a basis.
    let keep = PlanOptions {
        delete: false,
        owner: true,
    };
    assert_eq!(
        plan(&m, &r, keep, |_| true),
        vec!["|", "Send New b.bin <- a.dat", "|"]
    );
}

#[test]
fn unrelated_names_get_no_basis() {
    let m = [f("alpha.txt", 100), f("libfoo-1.2.so", 1000)];
    let r = [f("beta.log", 300), f("libbar-1.1.so", 990), f("empty", 0)];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "Delete Extra libbar-1.1.so",
            "Delete Extra empty",
            "Delete Extra beta.log",
            "|",
            "Send New alpha.txt",
            "Send New libfoo-1.2.so",
            "|",
        ]
    );
}

#[test]
fn no_basis_beneath_a_directory_deleted_as_a_tree() {
    // "a" becomes a file, "s" a symlink: both remote trees go before the sends.
    let r = [
        d(""),
        d("a"),
        f("a/lib-1.so", 1000),
        d("s"),
        f("s/lib-1.so", 1000),
    ];
    let m = [d(""), f("a", 10), f("lib-2.so", 1000), l("s", "a")];
    for delete in [true, false] {
        let o = PlanOptions {
            delete,
            owner: true,
        };
        let got = plan(&m, &r, o, |_| true);
        assert!(
            got.iter().all(|l| !l.contains("<-")),
            "delete={delete}: {got:?}"
        );
        let before = got.iter().take_while(|l| *l != "|").cloned();
        let trees: Vec<String> = before.filter(|l| l.starts_with("DeleteTree")).collect();
        assert_eq!(
            trees,
            vec!["DeleteTree KindChanged s", "DeleteTree KindChanged a"]
        );
    }
    // The same remote with "a" kept as a directory: its file is the basis.
    let m = [d(""), d("a"), f("lib-2.so", 1000)];
    let got = plan(&m, &r[..3], opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "|",
            "Send New lib-2.so <- a/lib-1.so",
            "|",
            "Delete Extra a/lib-1.so",
            "SetAttrs DirTouched a",
            "SetAttrs DirTouched ",
        ]
    );
}

#[test]
fn file_replaced_by_a_symlink_is_a_basis_until_after() {
    let m = [l("lib-1.so", "lib-2.so"), f("lib-2.so", 1000)];
    let r = [f("lib-1.so", 950)];
    let got = plan(&m, &r, opts(), |_| true);
    assert_eq!(
        got,
        vec![
            "|",
            "Send New lib-2.so <- lib-1.so",
            "|",
            "Symlink KindChanged lib-1.so"
        ]
    );
}

/// A release update of `n` files in directories of 1,000: 90% unchanged, 5%
/// changed in place, 5% renamed (`lib{i}-{hash}.1.{v}.so`, version bumped),
/// plus 1% remote-only files of other names. Returns (plan time, new files, bases
/// found for them) after checking every renamed file got its predecessor.
fn release_update(n: u32, renamed_every: u32) -> (std::time::Duration, usize, usize) {
    let file = crate::list::test_file;
    let dir = Meta {
        kind: Some(Kind::Dir),
        mode: 0o755,
        mtime_sec: 100,
        nlink: 1,
        ..Meta::default()
    };
    let (mut ml, mut rl) = (FileList::new(), FileList::new());
    for a in 0..n.div_ceil(1000) {
        let p = format!("d{a:04}");
        ml.push(p.as_bytes(), &dir, b"").unwrap();
        rl.push(p.as_bytes(), &dir, b"").unwrap();
    }
    for i in 0..n {
        let d = i / 1000;
        // Sizes are unique (an equal size would be preferred to a similar name).
        let size = 10_000 + 2 * u64::from(i);
        if i % renamed_every == 0 {
            let old = format!("d{d:04}/lib{i}-{:08x}.1.{}.so", i * 7 + 1, i % 9);
            let new = format!("d{d:04}/lib{i}-{:08x}.1.{}.so", i * 13 + 5, i % 9 + 1);
            rl.push(old.as_bytes(), &file(size), b"").unwrap();
            ml.push(new.as_bytes(), &file(size + 1), b"").unwrap();
        } else {
            let p = format!("d{d:04}/file{i}.dat");
            let changed = i % 20 == 1;
            rl.push(p.as_bytes(), &file(size), b"").unwrap();
            ml.push(p.as_bytes(), &file(size + 2 * u64::from(changed)), b"")
                .unwrap();
        }
        if i % 100 == 3 {
            let p = format!("d{d:04}/extra{i}.tmp");
            rl.push(p.as_bytes(), &file(7), b"").unwrap();
        }
    }
    ml.finish().unwrap();
    rl.finish().unwrap();
    let ml = Arc::new(ml);
    let rl = RemoteList::compact(ml.clone(), &rl).unwrap();
    let t = std::time::Instant::now();
    let pair = PairPlan::new(&ml, &rl, opts());
    let plan = pair.resolve(&ml, &rl, |_| true);
    let took = t.elapsed();
    let mut new = 0;
    let mut based = 0;
    for s in plan.sends() {
        if s.why != Why::New {
            assert_eq!(s.basis().map(|b| rl.path(b)), Some(ml.path(s.index)));
            continue;
        }
        new += 1;
        let path = String::from_utf8(ml.path(s.index).to_vec()).unwrap();
        let i: u32 = path[9..].split('-').next().unwrap().parse().unwrap();
        let b = s.basis().expect("a renamed file has a basis");
        let want = format!("d{:04}/lib{i}-{:08x}.1.{}.so", i / 1000, i * 7 + 1, i % 9);
        assert_eq!(rl.path(b), want.as_bytes());
        based += 1;
    }
    // Every basis is deleted after the sends, no earlier.
    let late: Vec<u32> = plan
        .after()
        .iter()
        .filter(|s| s.kind == StepKind::Delete)
        .map(|s| s.index)
        .collect();
    assert_eq!(late.len(), based);
    (took, new, based)
}

#[test]
fn release_update_plan_finds_every_predecessor() {
    let (_, new, based) = release_update(20_000, 20);
    assert_eq!((new, based), (1000, 1000));
}

/// The figure for a million paths: `cargo test --release -p fleetsync-server
/// --lib -- --ignored --nocapture million`.
#[test]
#[ignore = "timing figure, run in release"]
fn million_path_plan_with_bases_timing() {
    for every in [20, 1] {
        let runs: Vec<_> = (0..3).map(|_| release_update(1_000_000, every)).collect();
        let (new, based) = (runs[0].1, runs[0].2);
        let best = runs.iter().map(|r| r.0).min().unwrap();
        println!("1,000,000 paths, {new} new, {based} with a basis: plan in {best:?} (best of 3)");
    }
}

#[test]
fn subtree_is_the_range_beneath_a_directory_only() {
    let r = list(&[
        d(""),
        d("a"),
        d("a-b"),
        f("a-b/x", 1),
        d("a/b"),
        f("a/b/c", 1),
        f("a/z", 1),
        f("a0", 1),
        d("b"),
    ]);
    let names = |range: std::ops::Range<u32>| -> Vec<String> {
        range
            .map(|i| String::from_utf8_lossy(r.path(i)).into_owned())
            .collect()
    };
    let a = r.find(b"a").unwrap();
    assert_eq!(names(subtree(&r, a)), vec!["a/b", "a/b/c", "a/z"]);
    assert_eq!(names(subtree(&r, r.find(b"a/b").unwrap())), vec!["a/b/c"]);
    assert_eq!(names(subtree(&r, r.find(b"a-b").unwrap())), vec!["a-b/x"]);
    assert!(subtree(&r, r.find(b"b").unwrap()).is_empty());
}
