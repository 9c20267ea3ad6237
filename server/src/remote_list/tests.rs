//! A remote list compacted against the master's (and compacted as it streams in) plans
//! exactly what the whole list would.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::plan::{describe, PairPlan, PlanOptions, Step, StepKind};

/// One entry of a generated tree.
#[derive(Clone, Debug)]
struct Ent {
    meta: Meta,
    target: Vec<u8>,
}

use crate::list::test_file as file;

fn dir() -> Meta {
    Meta {
        kind: Some(Kind::Dir),
        mode: 0o755,
        size: 4096,
        mtime_sec: 100,
        nlink: 2,
        ..Meta::default()
    }
}

/// Names whose byte order differs from the order of a walk (`a-b` sorts before `a/x`).
const NAMES: [&str; 5] = ["a", "a-b", "b", "c.txt", "lib.so"];

fn arb_ent() -> impl Strategy<Value = Ent> {
    (
        0..10u8,
        0..4u64,
        0..2i64,
        0..2u32,
        0..2u32,
        0..4u64,
        0..2usize,
    )
        .prop_map(|(kind, size, mtime, mode, uid, link, target)| {
            let mut meta = match kind {
                0..=5 => file(size * 3),
                6..=7 => dir(),
                8 => Meta {
                    kind: Some(Kind::Symlink),
                    mode: 0o777,
                    nlink: 1,
                    ..Meta::default()
                },
                _ => Meta {
                    kind: Some(Kind::Special),
                    mode: 0o600,
                    nlink: 1,
                    ..Meta::default()
                },
            };
            meta.mtime_sec += mtime;
            meta.mode ^= mode * 0o22;
            meta.uid = uid;
            meta.gid = uid;
            // A few hard-link groups (inodes 1 to 3).
            if meta.kind == Some(Kind::File) && link > 0 {
                meta.nlink = 2;
                meta.dev = 1;
                meta.inode = link;
            }
            if meta.kind == Some(Kind::Dir) {
                // No plan looks at a directory's size.
                meta.size = 4096 * (1 + size % 2);
            }
            let target = if meta.kind == Some(Kind::Symlink) {
                [&b"x"[..], b"../y"][target].to_vec()
            } else {
                Vec::new()
            };
            Ent { meta, target }
        })
}

fn arb_path() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0..NAMES.len(), 1..4).prop_map(|names| {
        let names: Vec<&str> = names.iter().map(|&n| NAMES[n]).collect();
        names.join("/").into_bytes()
    })
}

fn parent(p: &[u8]) -> &[u8] {
    p.iter()
        .rposition(|&c| c == b'/')
        .map_or(&b""[..], |k| &p[..k])
}

/// A tree as an agent lists it: the root, every parent a directory (a child of a
/// non-directory is dropped).
fn sane(mut t: BTreeMap<Vec<u8>, Ent>) -> BTreeMap<Vec<u8>, Ent> {
    t.insert(
        Vec::new(),
        Ent {
            meta: dir(),
            target: Vec::new(),
        },
    );
    let paths: Vec<Vec<u8>> = t.keys().cloned().collect();
    // Shortest first: parents are settled before their children.
    let mut by_depth = paths.clone();
    by_depth.sort_by_key(|p| p.iter().filter(|&&c| c == b'/').count());
    for p in by_depth {
        if p.is_empty() || !t.contains_key(&p) {
            continue;
        }
        let up = parent(&p).to_vec();
        match t.get(&up) {
            Some(e) if e.meta.kind == Some(Kind::Dir) => {}
            Some(_) => {
                t.remove(&p);
            }
            None => {
                // Its parent is a directory: add it (and its own parents, later ones).
                let mut up = up;
                loop {
                    t.entry(up.clone()).or_insert(Ent {
                        meta: dir(),
                        target: Vec::new(),
                    });
                    if up.is_empty() {
                        break;
                    }
                    up = parent(&up).to_vec();
                }
                // The chain may have met a non-directory: drop the child then.
                let ok = {
                    let mut q = parent(&p);
                    loop {
                        if t.get(q).map(|e| e.meta.kind) != Some(Some(Kind::Dir)) {
                            break false;
                        }
                        if q.is_empty() {
                            break true;
                        }
                        q = parent(q);
                    }
                };
                if !ok {
                    t.remove(&p);
                }
            }
        }
    }
    t
}

/// What a remote may hold of a master entry.
#[derive(Clone, Debug)]
enum Change {
    Same,
    Gone,
    Other(Ent),
}

fn arb_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => Just(Change::Same),
        1 => Just(Change::Gone),
        3 => arb_ent().prop_map(Change::Other),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    master: BTreeMap<Vec<u8>, Ent>,
    remote: BTreeMap<Vec<u8>, Ent>,
    /// Paths whose checksums differ.
    differs: Vec<Vec<u8>>,
    /// Where the remote's entries come in the master's listing (see `streamed`).
    interleave: Vec<usize>,
    /// Both lists come in walk order (as agents list them), else reversed.
    walked: bool,
}

fn arb_case() -> impl Strategy<Value = Case> {
    let master = prop::collection::btree_map(arb_path(), arb_ent(), 0..24).prop_map(sane);
    master
        .prop_flat_map(|master| {
            let n = master.len();
            (
                Just(master),
                prop::collection::vec(arb_change(), n),
                prop::collection::btree_map(arb_path(), arb_ent(), 0..8),
                prop::collection::vec(arb_path(), 0..6),
                prop::collection::vec(0..n + 2, 0..40),
                any::<bool>(),
            )
        })
        .prop_map(|(master, changes, extra, differs, interleave, walked)| {
            let mut remote = extra;
            for ((p, e), c) in master.iter().zip(changes) {
                match c {
                    Change::Same => {
                        remote.insert(p.clone(), e.clone());
                    }
                    Change::Gone => {
                        remote.remove(p);
                    }
                    Change::Other(o) => {
                        remote.insert(p.clone(), o);
                    }
                }
            }
            Case {
                master,
                remote: sane(remote),
                differs,
                interleave,
                walked,
            }
        })
}

fn to_list(t: &BTreeMap<Vec<u8>, Ent>) -> FileList {
    let mut l = FileList::new();
    // Pushed in reverse: the list sorts.
    for (p, e) in t.iter().rev() {
        l.push(p, &e.meta, &e.target).unwrap();
    }
    l.finish().unwrap();
    l
}

/// The plan as lines that name paths, not indexes (indexes differ between the
/// representations of a remote list), with the description of each step.
fn plan_lines(
    ml: &FileList,
    rl: &RemoteList,
    opts: PlanOptions,
    differs: &[Vec<u8>],
) -> Vec<String> {
    let pair = PairPlan::new(ml, rl, opts);
    let cands: Vec<(u32, u32)> = pair.candidates_from(ml, rl, 0).collect();
    assert_eq!(cands.len(), pair.candidate_count());
    // Candidates: the same path on both sides, numbered by master index, in order.
    for w in cands.windows(2) {
        assert!(w[0].0 < w[1].0);
    }
    let mut out: Vec<String> = cands
        .iter()
        .map(|&(m, r)| {
            assert_eq!(ml.path(m), rl.path(r));
            assert_eq!(pair.candidate(ml, rl, m), Some(r));
            format!("candidate {}", String::from_utf8_lossy(ml.path(m)))
        })
        .collect();
    let plan = pair.resolve(ml, rl, |m| !differs.iter().any(|d| d == ml.path(m)));
    let name = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let show = |s: &Step| {
        let path = match s.kind {
            StepKind::Delete | StepKind::DeleteTree => rl.path(s.index),
            _ => ml.path(s.index),
        };
        let other = match s.kind {
            _ if s.other == crate::plan::NO_INDEX => "-".to_owned(),
            StepKind::HardLink => name(ml.path(s.other)),
            _ => name(rl.path(s.other)),
        };
        format!(
            "{:?} {:?} {} {other} ({})",
            s.kind,
            s.why,
            name(path),
            describe(s, ml, rl, opts.owner)
        )
    };
    out.extend(plan.before().iter().map(show));
    out.push("|".into());
    out.extend(plan.sends().iter().map(show));
    out.push("|".into());
    out.extend(plan.after().iter().map(show));
    out.extend(
        plan.skipped
            .iter()
            .map(|&m| format!("skip {}", name(ml.path(m)))),
    );
    out
}

/// A tree's entries in the order an agent lists them (`walked`), else reversed.
fn listed(t: &BTreeMap<Vec<u8>, Ent>, walked: bool) -> Vec<(&Vec<u8>, &Ent)> {
    let mut v: Vec<_> = t.iter().collect();
    if walked {
        v.sort_by(|a, b| walk_order(a.0, b.0));
    } else {
        v.reverse();
    }
    v
}

/// The remote list compacted as it streams in (as `JobShared` and `RemoteSync` do it):
/// the remote's entries interleaved with the master's listing at the `interleave`
/// positions (past the end: after the master).
fn streamed(c: &Case) -> Result<(Arc<FileList>, RemoteList), ListError> {
    let mut master = FileList::new();
    let mut walk_sorted = true;
    let mut b = RemoteBuilder::default();
    let mut remote = listed(&c.remote, c.walked).into_iter();
    let mut push_remote = |b: &mut RemoteBuilder, m: &MasterRef<'_>| -> Result<(), ListError> {
        if let Some((p, e)) = remote.next() {
            b.push(p, &e.meta, &e.target, None, m)?;
        }
        Ok(())
    };
    let mut at = c.interleave.clone();
    at.sort_unstable();
    let mut at = at.into_iter().peekable();
    for (k, (p, e)) in listed(&c.master, c.walked).into_iter().enumerate() {
        while at.next_if(|&a| a <= k).is_some() {
            let m = MasterRef {
                list: &master,
                complete: false,
                walk_sorted,
            };
            push_remote(&mut b, &m)?;
        }
        if !master.is_empty() {
            walk_sorted &= walk_order(master.path(master.len() as u32 - 1), p).is_lt();
        }
        master.push(p, &e.meta, &e.target)?;
    }
    assert_eq!(walk_sorted, c.walked || c.master.len() < 2);
    let moved = master.finish_mapped()?;
    let m = MasterRef {
        list: &master,
        complete: true,
        walk_sorted,
    };
    b.master_sorted(&moved, &m)?;
    for _ in 0..c.remote.len() {
        push_remote(&mut b, &m)?;
    }
    let master = Arc::new(master);
    let list = b.finish(master.clone())?;
    Ok((master, list))
}

fn same_bits(l: &RemoteList) -> Vec<u32> {
    l.same_from(0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn compacted_remote_lists_plan_what_whole_ones_do(c in arb_case()) {
        let ml = Arc::new(to_list(&c.master));
        let compact = RemoteList::compact(ml.clone(), &to_list(&c.remote)).unwrap();
        let whole = RemoteList::plain(ml.clone(), to_list(&c.remote)).unwrap();
        prop_assert_eq!(compact.len(), c.remote.len());
        // Every remote entry reads the same in both.
        for (p, e) in &c.remote {
            let r = compact.find(p).unwrap();
            let w = whole.find(p).unwrap();
            prop_assert_eq!(compact.path(r), &p[..]);
            prop_assert_eq!(compact.kind(r), whole.kind(w));
            prop_assert_eq!(compact.link_target(r), whole.link_target(w));
            let (a, b) = (compact.meta(r), whole.meta(w));
            prop_assert_eq!((a.mode, a.uid, a.gid, a.mtime_sec), (b.mode, b.uid, b.gid, b.mtime_sec));
            if e.meta.kind != Some(Kind::Dir) {
                prop_assert_eq!(a.size, b.size);
            }
            prop_assert_eq!(compact.link_key(r), whole.link_key(w));
            prop_assert_eq!(compact.is_same(r), ml.find(p).is_some_and(|m| ml.same_entry(m, &e.meta, &e.target)));
        }
        for delete in [false, true] {
            for owner in [false, true] {
                let opts = PlanOptions { delete, owner };
                prop_assert_eq!(
                    plan_lines(&ml, &compact, opts, &c.differs),
                    plan_lines(&ml, &whole, opts, &c.differs)
                );
            }
        }
        // Compacting as the lists stream in gives the same list.
        let (sm, streamed) = streamed(&c).unwrap();
        prop_assert_eq!(same_bits(&streamed), same_bits(&compact));
        prop_assert_eq!(streamed.others().len(), compact.others().len());
        let opts = PlanOptions { delete: true, owner: true };
        prop_assert_eq!(
            plan_lines(&sm, &streamed, opts, &c.differs),
            plan_lines(&ml, &compact, opts, &c.differs)
        );
    }
}

/// `n` regular files, file `i` of `i` bytes at `name(i)`.
fn files(n: u64, name: impl Fn(u64) -> String) -> BTreeMap<Vec<u8>, Ent> {
    (0..n)
        .map(|i| {
            let e = Ent {
                meta: file(i),
                target: Vec::new(),
            };
            (name(i).into_bytes(), e)
        })
        .collect()
}

#[test]
fn identical_entries_cost_a_bit_each() {
    let t = files(1000, |i| format!("d/f{i:04}"));
    let t = sane(t);
    let ml = Arc::new(to_list(&t));
    let rl = RemoteList::compact(ml.clone(), &to_list(&t)).unwrap();
    assert_eq!((rl.same_count(), rl.others().len()), (1002, 0));
    assert!(rl.heap_bytes() <= 1002 / 8 + 64, "{}", rl.heap_bytes());
}

#[test]
fn a_path_listed_twice_is_refused() {
    let mut master = FileList::new();
    master.push(b"x", &file(1), b"").unwrap();
    master.finish().unwrap();
    let master = Arc::new(master);
    let m = MasterRef {
        list: &master,
        complete: true,
        walk_sorted: true,
    };
    // Twice the same as the master's.
    let mut b = RemoteBuilder::default();
    b.push(b"x", &file(1), b"", None, &m).unwrap();
    assert!(matches!(
        b.push(b"x", &file(1), b"", None, &m),
        Err(ListError::Duplicate { .. })
    ));
    // Once the same, once not.
    let mut b = RemoteBuilder::default();
    b.push(b"x", &file(2), b"", None, &m).unwrap();
    b.push(b"x", &file(1), b"", None, &m).unwrap();
    assert!(matches!(
        b.finish(master.clone()),
        Err(ListError::Duplicate { .. })
    ));
}

#[test]
fn remote_entries_before_the_masters_wait_and_match() {
    // The remote lists everything before the master has listed anything.
    let t = files(10_000, |i| format!("f{i:05}"));
    let c = Case {
        master: sane(t.clone()),
        remote: sane(t),
        differs: Vec::new(),
        interleave: vec![0; 10_001],
        walked: true,
    };
    let (_, l) = streamed(&c).unwrap();
    assert_eq!((l.same_count(), l.others().len()), (10_001, 0));
}

/// The cost of sorting a million master entries: `cargo test --release -p
/// fleetsync-server --lib -- --ignored --nocapture master_list_costs`.
#[test]
#[ignore = "timing figure, run in release"]
fn master_list_costs() {
    let mut l = FileList::new();
    let t = std::time::Instant::now();
    for a in 0..100u32 {
        for b in 0..100u32 {
            l.push(
                format!("srv/library/d{a:04}/d{b:04}").as_bytes(),
                &dir(),
                b"",
            )
            .unwrap();
            for c in 0..100u32 {
                let i = a * 10_000 + b * 100 + c;
                let p = format!("srv/library/d{a:04}/d{b:04}/component-{i:09}-release-v02.data");
                l.push(p.as_bytes(), &file(1024), b"").unwrap();
            }
        }
    }
    println!("push: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let moved = l.finish_mapped().unwrap();
    println!("finish_mapped: {:?} ({} entries)", t.elapsed(), moved.len());
}

#[test]
fn walk_order_is_the_agents_order() {
    // Names sorted per directory, a directory before its contents.
    let walked: [&[u8]; 7] = [b"", b"a", b"a/x", b"a/x/y", b"a-b", b"a.c", b"b"];
    let mut v = walked.to_vec();
    v.reverse();
    v.sort_by(|a, b| walk_order(a, b));
    assert_eq!(v, walked);
}

#[test]
fn identical_trees_listed_together_match_at_once() {
    let mut t = BTreeMap::new();
    for i in 0..3000u64 {
        let p = format!("d{}/{}f{i:04}", i % 7, ["", "a-", "a/"][i as usize % 3]);
        t.insert(
            p.into_bytes(),
            Ent {
                meta: file(i),
                target: Vec::new(),
            },
        );
    }
    let t = sane(t);
    let order = listed(&t, true);
    let (mut master, mut b) = (FileList::new(), RemoteBuilder::default());
    for (p, e) in &order {
        master.push(p, &e.meta, &e.target).unwrap();
        let m = MasterRef {
            list: &master,
            complete: false,
            walk_sorted: true,
        };
        b.push(p, &e.meta, &e.target, None, &m).unwrap();
        assert_eq!(b.pending_len(), 0, "{}", String::from_utf8_lossy(p));
    }
    // A remote without every fifth file: the guess misses after each gap, bisection
    // finds the entry.
    let (mut master, mut b) = (FileList::new(), RemoteBuilder::default());
    for (k, (p, e)) in order.iter().enumerate() {
        master.push(p, &e.meta, &e.target).unwrap();
        if k % 5 == 3 && e.meta.kind == Some(Kind::File) {
            continue;
        }
        let m = MasterRef {
            list: &master,
            complete: false,
            walk_sorted: true,
        };
        b.push(p, &e.meta, &e.target, None, &m).unwrap();
        assert_eq!(b.pending_len(), 0, "{}", String::from_utf8_lossy(p));
    }
    assert_eq!(b.others.len(), 0);
}
