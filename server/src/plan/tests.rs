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

/// Plans with the given checksum answers; returns "kind why path" lines
/// in execution order, sections separated by "|".
fn plan(m: &[E], r: &[E], opts: PlanOptions, same: impl Fn(&[u8]) -> bool) -> Vec<String> {
    let (ml, rl) = (list(m), list(r));
    let pair = PairPlan::new(&ml, &rl, opts);
    let answers: Vec<bool> = pair
        .checksum_candidates()
        .iter()
        .map(|&(mi, _)| same(ml.path(mi)))
        .collect();
    let plan = pair.resolve(&ml, &rl, &answers);
    let show = |s: &Step| {
        let path = match s.kind {
            StepKind::Delete | StepKind::DeleteTree => rl.path(s.index),
            _ => ml.path(s.index),
        };
        format!("{:?} {:?} {}", s.kind, s.why, String::from_utf8_lossy(path))
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
    let (ml, rl) = (list(&m), list(&m));
    let pair = PairPlan::new(&ml, &rl, opts());
    assert_eq!(pair.checksum_candidates().len(), 1);
    let plan = pair.resolve(&ml, &rl, &[true]);
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
    let (ml, rl) = (list(&[f("x", 3)]), list(&[f("x", 4)]));
    let pair = PairPlan::new(&ml, &rl, opts());
    assert!(pair.checksum_candidates().is_empty());
    let plan = pair.resolve(&ml, &rl, &[]);
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
    assert_eq!(
        got,
        vec!["|", "Send KindChanged b", "|", "Symlink KindChanged a"]
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
    let (ml, rl) = (list(&m), list(&r));
    let pair = PairPlan::new(&ml, &rl, opts());
    assert_eq!(pair.checksum_candidates(), &[(0, 0)]);
    assert!(pair.resolve(&ml, &rl, &[true]).is_empty());
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
    let ml = list(&[x.clone()]);
    x.mode = 0o600;
    x.mtime = 1;
    let rl = list(&[x]);
    let plan = PairPlan::new(&ml, &rl, opts()).resolve(&ml, &rl, &[true]);
    assert_eq!(
        describe(&plan.after()[0], &ml, &rl, true),
        "mode 0600->0644, mtime"
    );
}
