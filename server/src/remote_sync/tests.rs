//! The pair state machine without sockets: replies are fed in, the messages it queues are
//! checked.

use fleetsync_proto::{BlockDef, Done, InconsistentFile};

use super::*;
use crate::sync_job::SyncJob;

use crate::list::test_file as file;

fn request(remotes: usize, max_rounds: u32, blocks: Vec<BlockDef>) -> SyncRequest {
    SyncRequest {
        master: "master:1".into(),
        remotes: (0..remotes).map(|i| format!("remote:{i}")).collect(),
        algorithm: "crc32".into(),
        max_rounds,
        blocks,
        ..SyncRequest::default()
    }
}

/// A job whose master holds `master` and whose remotes are listed with `remote` (files
/// and sizes): the pairs are planned and have asked for their checksums.
fn listed_job(master: &[(&str, u64)], remote: &[(&str, u64)], req: SyncRequest) -> SyncJob {
    let blocks = SyncJob::check(&req).unwrap();
    let n = req.remotes.len();
    let mut job = SyncJob::new(7, req, blocks);
    let mut list = FileList::new();
    for &(p, size) in master {
        list.push(p.as_bytes(), &file(size), b"").unwrap();
    }
    list.finish().unwrap();
    job.shared.set_master(list).unwrap();
    for i in 0..n {
        let pair = &mut job.pairs[i];
        pair.on_remote_ready(true, &job.shared);
        assert!(matches!(
            &pair.drain_outbox()[..],
            [(Peer::Remote, Msg::ListRequest { .. })]
        ));
        assert_eq!(pair.state(), PairState::Listing);
        for &(p, size) in remote {
            pair.push_meta(p.as_bytes(), &file(size), b"", &job.shared)
                .unwrap();
        }
        pair.on_listed(&mut job.shared).unwrap();
    }
    job
}

/// Feeds a reply to pair `i` and gives what it queued.
fn feed(job: &mut SyncJob, i: usize, from: Peer, msg: Msg) -> Vec<(Peer, Msg)> {
    job.on_reply(i, from, msg).unwrap();
    job.pairs[i].drain_outbox()
}

fn sums(paths: &[&str], digest: &[u8]) -> Msg {
    Msg::ChecksumReply {
        request_id: 1,
        results: paths
            .iter()
            .map(|p| ChecksumResult {
                path: p.as_bytes().to_vec(),
                size: 3,
                digest: Ok(digest.to_vec()),
            })
            .collect(),
        last: true,
    }
}

fn item(path: &str, outcome: Outcome, digest: &[u8]) -> Msg {
    Msg::ItemResults {
        request_id: 1,
        results: vec![ItemResult {
            path: path.as_bytes().to_vec(),
            outcome,
            message: if outcome == Outcome::Failed {
                "no such file".into()
            } else {
                String::new()
            },
            bytes: 3,
            digest: digest.to_vec(),
            wire_bytes: 2,
            coding: "zstd".into(),
        }],
    }
}

fn done() -> Msg {
    Msg::Done(Done::default())
}

/// What each message is, with where it goes: `"master:sendOrder"` and so on.
fn kinds(out: &[(Peer, Msg)]) -> Vec<String> {
    out.iter()
        .map(|(to, m)| format!("{}:{}", format!("{to:?}").to_lowercase(), m.kind_name()))
        .collect()
}

fn the_result(out: &[(Peer, Msg)]) -> &RemoteResult {
    out.iter()
        .find_map(|(to, m)| match m {
            Msg::RemoteResult(r) if *to == Peer::Control => Some(r),
            _ => None,
        })
        .expect("a remoteResult")
}

/// Itemizes the whole plan of pair `i`, as the event loop does when the client keeps up.
fn itemize(job: &mut SyncJob, i: usize) -> Vec<(Peer, Msg)> {
    let mut items = 0;
    while let Some(m) = job.pairs[i].next_plan_items(&job.shared) {
        assert!(matches!(m, Msg::PlanItems(_)));
        items += 1;
    }
    assert!(items > 0 || !job.pairs[i].has_plan_items());
    job.pairs[i].finish_if_deferred(&job.shared);
    job.pairs[i].drain_outbox()
}

#[test]
fn equal_digests_send_nothing_and_the_pair_finishes_ok() {
    let mut job = listed_job(&[("a", 3)], &[("a", 3)], request(1, 2, Vec::new()));
    let out = job.pairs[0].drain_outbox();
    assert_eq!(
        kinds(&out),
        ["remote:checksumRequest", "master:checksumRequest"]
    );
    assert_eq!(job.pairs[0].state(), PairState::Checksums);
    assert!(feed(&mut job, 0, Peer::Master, sums(&["a"], &[1, 2, 3, 4])).is_empty());
    let out = feed(&mut job, 0, Peer::Remote, sums(&["a"], &[1, 2, 3, 4]));
    // The ownership note, then the result: nothing to do, nothing to check.
    assert_eq!(kinds(&out), ["control:remoteResult"]);
    let r = the_result(&out);
    assert!(r.ok && r.error.is_empty(), "{r:?}");
    assert_eq!(r.transferred, 0);
    assert!(job.pairs[0].is_done());
}

#[test]
fn a_changed_file_is_sent_checked_and_the_pair_finishes_ok() {
    let mut job = listed_job(&[("a", 3)], &[("a", 3)], request(1, 2, Vec::new()));
    job.pairs[0].drain_outbox();
    feed(&mut job, 0, Peer::Master, sums(&["a"], &[1, 2, 3, 4]));
    let out = feed(&mut job, 0, Peer::Remote, sums(&["a"], &[9, 9, 9, 9]));
    assert_eq!(kinds(&out), ["master:sendOrder"]);
    assert_eq!(job.pairs[0].state(), PairState::Sending);
    let out = itemize(&mut job, 0);
    assert!(out.is_empty());
    let out = feed(
        &mut job,
        0,
        Peer::Master,
        item("a", Outcome::Ok, &[1, 2, 3, 4]),
    );
    assert_eq!(kinds(&out), ["control:syncProgress"]);
    let out = feed(&mut job, 0, Peer::Master, done());
    assert_eq!(kinds(&out), ["remote:consistencyRequest"]);
    let Msg::ConsistencyRequest { files, .. } = &out[0].1 else {
        unreachable!()
    };
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].digest, [1, 2, 3, 4]);
    assert_eq!(job.pairs[0].state(), PairState::Checking);
    let out = feed(
        &mut job,
        0,
        Peer::Remote,
        Msg::ConsistencyReply {
            request_id: 1,
            inconsistent: Vec::new(),
            checked: 1,
            last: true,
        },
    );
    let r = the_result(&out);
    assert!(r.ok, "{r:?}");
    assert_eq!((r.transferred, r.rounds), (1, 1));
}

#[test]
fn an_agent_error_while_listing_fails_only_that_remote() {
    let req = request(2, 0, Vec::new());
    let mut job = SyncJob::new(7, req, None);
    for i in 0..2 {
        job.pairs[i].on_remote_ready(true, &job.shared);
        job.pairs[i].drain_outbox();
    }
    let err = job
        .on_reply(
            1,
            Peer::Remote,
            Msg::Error {
                request_id: 1,
                message: "cannot read /srv: permission denied".into(),
            },
        )
        .unwrap_err();
    assert!(err.contains("agent error: cannot read /srv"), "{err}");
    // The event loop closes the connection with that reason, which fails the pair.
    job.fail_pair(1, err);
    let out = job.pairs[1].drain_outbox();
    let r = the_result(&out);
    assert!(!r.ok && r.error.contains("permission denied"), "{r:?}");
    assert_eq!(r.remote, 1);
    assert!(job.pairs[1].is_done());
    assert_eq!(job.pairs[0].state(), PairState::Listing);
    assert!(!job.all_done());
}

#[test]
fn a_send_failure_fails_the_pair_once_and_later_replies_are_ignored() {
    let mut job = listed_job(&[("a", 3)], &[("a", 5)], request(1, 2, Vec::new()));
    let out = job.pairs[0].drain_outbox();
    assert_eq!(kinds(&out), ["master:sendOrder"]);
    job.fail_pair(0, "write error: Broken pipe".into());
    let out = job.pairs[0].drain_outbox();
    assert_eq!(kinds(&out), ["control:remoteResult"]);
    assert_eq!(the_result(&out).error, "write error: Broken pipe");
    job.fail_pair(0, "again".into());
    assert!(feed(&mut job, 0, Peer::Master, done()).is_empty());
    assert!(job.all_done());
}

#[test]
fn master_checksums_lost_with_one_pair_are_asked_for_again_by_the_other() {
    let mut job = listed_job(&[("a", 3)], &[("a", 3)], request(2, 0, Vec::new()));
    assert_eq!(
        kinds(&job.pairs[0].drain_outbox()),
        ["remote:checksumRequest", "master:checksumRequest"]
    );
    // The master was asked once, through pair 0's link.
    assert_eq!(
        kinds(&job.pairs[1].drain_outbox()),
        ["remote:checksumRequest"]
    );
    job.fail_pair(0, "master agent: connection reset".into());
    job.pairs[0].drain_outbox();
    let out = job.pairs[1].drain_outbox();
    assert_eq!(kinds(&out), ["master:checksumRequest"]);
    feed(&mut job, 1, Peer::Remote, sums(&["a"], &[1, 2, 3, 4]));
    let out = feed(&mut job, 1, Peer::Master, sums(&["a"], &[1, 2, 3, 4]));
    assert!(the_result(&out).ok);
}

#[test]
fn a_digest_of_another_width_is_a_protocol_error() {
    let mut job = listed_job(&[("a", 3)], &[("a", 3)], request(1, 0, Vec::new()));
    job.pairs[0].drain_outbox();
    feed(&mut job, 0, Peer::Master, sums(&["a"], &[1, 2, 3, 4]));
    let err = job
        .on_reply(0, Peer::Remote, sums(&["a"], &[1, 2]))
        .unwrap_err();
    assert!(
        err.contains("protocol error") && err.contains("2 bytes"),
        "{err}"
    );
}

#[test]
fn a_block_whose_file_does_not_arrive_is_aborted() {
    let blocks = vec![BlockDef {
        name: "conf".into(),
        select: "name:*".into(),
        after: Vec::new(),
    }];
    let mut job = listed_job(&[("a", 3)], &[], request(1, 2, blocks));
    let out = job.pairs[0].drain_outbox();
    assert_eq!(kinds(&out), ["remote:blockBegin"]);
    assert_eq!(job.pairs[0].state(), PairState::Blocks);
    itemize(&mut job, 0);
    let out = feed(&mut job, 0, Peer::Remote, done());
    assert_eq!(kinds(&out), ["master:sendOrder"]);
    let Msg::SendOrder { stage, .. } = &out[0].1 else {
        unreachable!()
    };
    assert!(stage.starts_with("j7-r0-b0-"), "{stage}");
    let out = feed(&mut job, 0, Peer::Master, item("a", Outcome::Failed, &[]));
    assert_eq!(kinds(&out), ["control:syncProgress"]);
    let out = feed(&mut job, 0, Peer::Master, done());
    assert_eq!(kinds(&out), ["remote:blockCommit"]);
    let Msg::BlockCommit { abort, ops, .. } = &out[0].1 else {
        unreachable!()
    };
    assert!(*abort && ops.is_empty());
    let out = feed(&mut job, 0, Peer::Remote, done());
    let r = the_result(&out);
    assert!(!r.ok);
    assert!(
        r.failures.iter().any(|f| f
            .message
            .contains("block conf not applied: not every file arrived")),
        "{r:?}"
    );
    assert_eq!(r.transferred, 0);
}

#[test]
fn a_committed_block_counts_its_files() {
    let blocks = vec![BlockDef {
        name: "conf".into(),
        select: "name:*".into(),
        after: Vec::new(),
    }];
    let mut job = listed_job(&[("a", 3)], &[], request(1, 0, blocks));
    job.pairs[0].drain_outbox();
    itemize(&mut job, 0);
    feed(&mut job, 0, Peer::Remote, done());
    feed(
        &mut job,
        0,
        Peer::Master,
        item("a", Outcome::Ok, &[1, 2, 3, 4]),
    );
    let out = feed(&mut job, 0, Peer::Master, done());
    let Msg::BlockCommit { abort, ops, .. } = &out[0].1 else {
        unreachable!()
    };
    assert!(!*abort && ops.len() == 1);
    let out = feed(&mut job, 0, Peer::Remote, done());
    let r = the_result(&out);
    assert!(r.ok && r.transferred == 1, "{r:?}");
}

#[test]
fn a_file_still_inconsistent_after_max_rounds_fails_the_pair() {
    let mut job = listed_job(&[("a", 3)], &[("a", 5)], request(1, 2, Vec::new()));
    job.pairs[0].drain_outbox();
    itemize(&mut job, 0);
    feed(
        &mut job,
        0,
        Peer::Master,
        item("a", Outcome::Ok, &[1, 2, 3, 4]),
    );
    let out = feed(&mut job, 0, Peer::Master, done());
    assert_eq!(kinds(&out), ["remote:consistencyRequest"]);
    let inconsistent = || Msg::ConsistencyReply {
        request_id: 1,
        inconsistent: vec![InconsistentFile {
            path: b"a".to_vec(),
            check: "digest".into(),
            message: "content changed".into(),
        }],
        checked: 1,
        last: true,
    };
    // Round 1: inconsistent; fresh checksums on both sides.
    let out = feed(&mut job, 0, Peer::Remote, inconsistent());
    assert_eq!(
        kinds(&out),
        ["master:checksumRequest", "remote:checksumRequest"]
    );
    assert_eq!(job.pairs[0].state(), PairState::Resyncing);
    assert!(feed(&mut job, 0, Peer::Master, sums(&["a"], &[5, 5, 5, 5])).is_empty());
    let out = feed(&mut job, 0, Peer::Remote, sums(&["a"], &[6, 6, 6, 6]));
    assert_eq!(kinds(&out), ["master:sendOrder"]);
    assert!(feed(
        &mut job,
        0,
        Peer::Master,
        item("a", Outcome::Ok, &[5, 5, 5, 5])
    )
    .is_empty());
    let out = feed(&mut job, 0, Peer::Master, done());
    assert_eq!(kinds(&out), ["remote:consistencyRequest"]);
    // Round 2 is the last.
    let out = feed(&mut job, 0, Peer::Remote, inconsistent());
    let r = the_result(&out);
    assert!(!r.ok);
    assert_eq!(r.rounds, 2);
    assert!(
        r.error
            .starts_with("1 file(s) still inconsistent after 2 consistency round(s): a: content changed [digest]"),
        "{}",
        r.error
    );
    assert_eq!(r.inconsistent.len(), 1);
    assert_eq!(r.resynced, 1);
}

/// A listing entry of a regular file of `size` bytes, with the digest it was listed with.
fn listed(path: &str, size: u64, digest: Option<&[u8]>) -> fleetsync_proto::FileEntry {
    fleetsync_proto::FileEntry {
        path: path.as_bytes().to_vec(),
        kind: FileKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        inode: 0,
        dev: 0,
        nlink: 1,
        size,
        mtime_sec: 100,
        mtime_nsec: 0,
        link_target: None,
        rdev: 0,
        digest: digest.map(<[u8]>::to_vec),
    }
}

#[test]
fn listed_digests_settle_what_they_can_and_only_the_rest_is_asked_for() {
    let req = request(1, 0, Vec::new());
    let blocks = SyncJob::check(&req).unwrap();
    let mut job = SyncJob::new(7, req, blocks);
    let (a, b, c, d) = (
        &[1u8, 1, 1, 1][..],
        &[2u8, 2, 2, 2][..],
        &[3u8; 4][..],
        &[4u8; 4][..],
    );
    let dir = fleetsync_proto::FileEntry {
        kind: FileKind::Dir,
        mode: 0o755,
        ..listed("p", 0, None)
    };
    // The master listed digests for a, b and d, not c; in walk order ("p/" before "p-"),
    // which is not the sorted order: what matched before the master's list was sorted
    // moves with it.
    for e in [
        dir.clone(),
        listed("p/a", 3, Some(a)),
        listed("p/b", 3, Some(b)),
        listed("p/c", 3, None),
        listed("p/d", 3, Some(d)),
        listed("p-e", 3, Some(d)),
    ] {
        job.shared.push_master(&e.as_ref()).unwrap();
    }
    let pair = &mut job.pairs[0];
    pair.on_remote_ready(true, &job.shared);
    pair.drain_outbox();
    // The remote: a as the master's (same digest), b with another digest, c with one the
    // master has not computed yet, d without (its cache had none).
    for e in [
        dir,
        listed("p/a", 3, Some(a)),
        listed("p/b", 3, Some(&[9, 9, 9, 9])),
        listed("p/c", 3, Some(c)),
        listed("p/d", 3, None),
        listed("p-e", 3, Some(d)),
    ] {
        pair.push_listed(&e.as_ref(), &job.shared).unwrap();
    }
    pair.on_listed(&mut job.shared).unwrap();
    job.on_master_listed().unwrap();
    let out = job.pairs[0].drain_outbox();
    let asked = |to: Peer| -> Vec<Vec<u8>> {
        out.iter()
            .filter(|(p, _)| *p == to)
            .flat_map(|(_, m)| match m {
                Msg::ChecksumRequest { paths, .. } => paths.clone(),
                _ => Vec::new(),
            })
            .collect()
    };
    assert_eq!(asked(Peer::Remote), [b"p/d".to_vec()]);
    assert_eq!(asked(Peer::Master), [b"p/c".to_vec()]);
    feed(&mut job, 0, Peer::Master, sums(&["p/c"], c));
    let out = feed(&mut job, 0, Peer::Remote, sums(&["p/d"], d));
    // Only b differs.
    let sent: Vec<Vec<u8>> = out
        .iter()
        .flat_map(|(_, m)| match m {
            Msg::SendOrder { paths, .. } => paths.clone(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(sent, [b"p/b".to_vec()]);
}
