//! Server-planned fan-out relays (`--fanout K`): the remotes of a job that need the same
//! bytes get them through a distribution tree instead of one stream each from the master.
//!
//! When a pair reaches its send phase, its send order is held here rather than sent. Once no
//! other pair of the job may still produce an order (every pair that is not through has
//! one held, or is past its send phase, or has nothing more to send; or [`HOLD_LIMIT`] has
//! passed), the held orders are grouped into **cohorts** of identical orders: the same
//! paths, sizes and delta bases, the bases with the same size and mtime on each remote (so
//! that a patch or rsync delta made against one remote's basis applies on the others; the
//! receivers verify every file, so a basis that differs anyway costs a resend, never a
//! wrong file). Each cohort of two or more becomes a tree with `K` children per node, the
//! master at its root, in the request's order, except the remotes found slow in an earlier
//! tree, which go last and so to the leaves. A remote is found slow when its throughput in
//! a tree (the file bytes it confirmed over the time until its last result) was under half
//! its parent's (for a child of the master: under half the best of the tree): a remote
//! below a slow relay is only as fast as its relay, and is not blamed for it.
//! The master gets one send order per child of the root, carrying that child's subtree
//! ([`RelayNode`]) and sent on the job's relay link (one more connection to the master);
//! every remote of the tree has its own request id, under which its results come back.
//!
//! Files a remote did not get through the tree (its relay died or dropped it, or its data
//! did not verify) come back failed with coding `relay`: when its share of the tree is
//! done, the pair's master link sends them again directly, resuming partial files.
//!
//! Staged files (`--blocks`) and the consistency loop's resends are never relayed: each
//! remote commits a block only when it has the whole block, which a direct stream gives
//! simply.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use fleetsync_proto::{ItemResult, Msg, Outcome, RelayNode};
use tracing::{debug, info};

/// How long an order waits for the other pairs of its job to reach their send phase.
pub(crate) const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// The coding a master gives a file one remote did not get through the tree.
pub(crate) const RELAY: &str = "relay";

/// What makes two orders the same bytes: paths, delta bases, sizes, and each basis's
/// (size, mtime) on the remote.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct CohortKey {
    pub(crate) paths: Vec<Vec<u8>>,
    pub(crate) bases: Vec<Vec<u8>>,
    pub(crate) sizes: Vec<u64>,
    pub(crate) basis_meta: Vec<(u64, i64, u32)>,
}

/// A send order waiting for its cohort.
struct Held {
    pair: usize,
    key: CohortKey,
    order: Msg,
}

/// One remote's share of a relayed send in flight.
struct Member {
    pair: usize,
    /// Its own send order (for a direct resend of what the tree did not deliver).
    order: Msg,
    /// Files that did not come through the tree.
    resend: HashSet<Vec<u8>>,
    started: Instant,
    /// Bytes it confirmed, and when its last result came.
    bytes: u64,
    last: Instant,
    /// Its tree, and its parent's request id there (`None`: the master).
    tree: u64,
    parent: Option<u64>,
    addr: String,
}

/// The throughputs of one tree's remotes, judged when the last is done.
#[derive(Default)]
struct TreeRates {
    left: usize,
    /// Request id, parent's request id, address, bytes per second (if measured).
    rates: Vec<(u64, Option<u64>, String, Option<f64>)>,
}

/// A remote's place for the planner: its pair, address and measured speed.
pub(crate) struct Candidate {
    pub(crate) pair: usize,
    pub(crate) addr: String,
}

/// The relays of one job.
pub(crate) struct Relays {
    fanout: usize,
    held: Vec<Held>,
    first_held: Option<Instant>,
    members: HashMap<u64, Member>,
    /// Remotes (by address) found slow in a tree of this job or an earlier one.
    pub(crate) slow: HashSet<String>,
    trees: HashMap<u64, TreeRates>,
    next_tree: u64,
    /// Orders the relays produced for the pairs' own master links (resends).
    pub(crate) outbox: Vec<(usize, Msg)>,
    /// Names to report sources by instead of agent addresses (the embedded sync's
    /// directories).
    pub(crate) labels: HashMap<String, String>,
}

/// Orders ready to go: relayed ones for the job's relay link, and the rest (cohorts of
/// one) for their pairs' master links.
#[derive(Default)]
pub(crate) struct Release {
    pub(crate) relayed: Vec<Msg>,
    pub(crate) direct: Vec<(usize, Msg)>,
    /// Each released remote's source (the address of its relay; empty: the master).
    pub(crate) sources: Vec<(usize, String)>,
}

impl Relays {
    /// Relays with `fanout` children per node (0: none).
    pub(crate) fn new(fanout: u32) -> Relays {
        Relays {
            fanout: fanout as usize,
            held: Vec::new(),
            first_held: None,
            members: HashMap::new(),
            slow: HashSet::new(),
            trees: HashMap::new(),
            next_tree: 0,
            outbox: Vec::new(),
            labels: HashMap::new(),
        }
    }

    /// Whether orders of a job of `remotes` remotes are held for trees.
    pub(crate) fn active(&self, remotes: usize) -> bool {
        self.fanout > 0 && remotes > 1
    }

    /// Holds pair `pair`'s send `order` (with its cohort key) until [`Relays::release`].
    pub(crate) fn hold(&mut self, pair: usize, key: CohortKey, order: Msg) {
        self.first_held.get_or_insert_with(Instant::now);
        self.held.push(Held { pair, key, order });
    }

    /// Whether pair `pair` has an order held.
    pub(crate) fn holds(&self, pair: usize) -> bool {
        self.held.iter().any(|h| h.pair == pair)
    }

    /// Whether relayed sends are in flight for pair `pair`.
    pub(crate) fn in_flight(&self, pair: usize) -> bool {
        self.members.values().any(|m| m.pair == pair)
    }

    /// Whether an order has been held past [`HOLD_LIMIT`].
    pub(crate) fn overdue(&self) -> bool {
        self.first_held.is_some_and(|t| t.elapsed() > HOLD_LIMIT)
    }

    /// Whether orders are held.
    pub(crate) fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Drops what pair `pair` holds (it failed).
    pub(crate) fn forget(&mut self, pair: usize) {
        self.held.retain(|h| h.pair != pair);
        let trees = &mut self.trees;
        self.members.retain(|_, m| {
            if m.pair == pair {
                if let Some(t) = trees.get_mut(&m.tree) {
                    t.left -= 1;
                }
            }
            m.pair != pair
        });
        if self.held.is_empty() {
            self.first_held = None;
        }
    }

    /// Groups the held orders into cohorts and plans their trees. `addr` gives a pair's
    /// remote address, `next_id` a fresh request id.
    pub(crate) fn release(
        &mut self,
        addr: &dyn Fn(usize) -> String,
        next_id: &mut dyn FnMut() -> u64,
    ) -> Release {
        let mut out = Release::default();
        self.first_held = None;
        let mut cohorts: HashMap<CohortKey, Vec<(usize, Msg)>> = HashMap::new();
        let mut order_of_keys = Vec::new();
        for h in std::mem::take(&mut self.held) {
            let e = cohorts.entry(h.key.clone()).or_default();
            if e.is_empty() {
                order_of_keys.push(h.key);
            }
            e.push((h.pair, h.order));
        }
        for key in order_of_keys {
            let mut members = cohorts.remove(&key).expect("listed key");
            // The request's order (not the order the pairs got here), then by speed.
            members.sort_by_key(|m| m.0);
            if members.len() < 2 {
                for (pair, order) in members {
                    out.sources.push((pair, String::new()));
                    out.direct.push((pair, order));
                }
                continue;
            }
            let cands: Vec<Candidate> = members
                .iter()
                .map(|(pair, _)| Candidate {
                    pair: *pair,
                    addr: addr(*pair),
                })
                .collect();
            let ranked = rank(&cands, &self.slow);
            // The orders in tree order, each with its own request id.
            let mut by_pair: HashMap<usize, Msg> = members.drain(..).collect();
            let mut nodes: Vec<(usize, u64, Msg)> = ranked
                .iter()
                .map(|&k| {
                    let pair = cands[k].pair;
                    (pair, next_id(), by_pair.remove(&pair).expect("member"))
                })
                .collect();
            let addrs: Vec<String> = nodes.iter().map(|(p, _, _)| addr(*p)).collect();
            let ids: Vec<u64> = nodes.iter().map(|n| n.1).collect();
            let shape = Shape::new(nodes.len(), self.fanout);
            for (k, (pair, _, _)) in nodes.iter().enumerate() {
                let source = shape
                    .parent(k)
                    .map(|p| {
                        let a = &addrs[p];
                        self.labels.get(a).unwrap_or(a).clone()
                    })
                    .unwrap_or_default();
                out.sources.push((*pair, source));
            }
            info!(
                remotes = nodes.len(),
                fanout = self.fanout,
                "relay tree: {}",
                shape.describe(&addrs)
            );
            for root_child in shape.children(None) {
                let mut msg = nodes[root_child].2.clone();
                if let Msg::SendOrder {
                    request_id, relays, ..
                } = &mut msg
                {
                    *request_id = ids[root_child];
                    *relays = shape.subtree(root_child, &addrs, &ids);
                }
                out.relayed.push(msg);
            }
            let now = Instant::now();
            let tree = self.next_tree;
            self.next_tree += 1;
            self.trees.insert(
                tree,
                TreeRates {
                    left: nodes.len(),
                    rates: Vec::new(),
                },
            );
            for (k, (pair, id, order)) in nodes.drain(..).enumerate() {
                self.members.insert(
                    id,
                    Member {
                        pair,
                        order,
                        resend: HashSet::new(),
                        started: now,
                        bytes: 0,
                        last: now,
                        tree,
                        parent: shape.parent(k).map(|p| ids[p]),
                        addr: addrs[k].clone(),
                    },
                );
            }
        }
        out
    }

    /// The pair a relayed request id is for.
    pub(crate) fn pair_of(&self, request_id: u64) -> Option<usize> {
        self.members.get(&request_id).map(|m| m.pair)
    }

    /// Whether relayed sends are in flight.
    pub(crate) fn any_in_flight(&self) -> bool {
        !self.members.is_empty()
    }

    /// Results of a relayed request: those the tree did not deliver are kept for the
    /// resend; the rest go to the pair.
    pub(crate) fn results(&mut self, request_id: u64, results: &mut Vec<ItemResult>) {
        let Some(m) = self.members.get_mut(&request_id) else {
            return;
        };
        m.last = Instant::now();
        results.retain(|r| {
            if r.outcome == Outcome::Failed && r.coding == RELAY {
                debug!("{}: {}", String::from_utf8_lossy(&r.path), r.message);
                m.resend.insert(r.path.clone());
                return false;
            }
            m.bytes += r.bytes;
            true
        });
    }

    /// A relayed request is done: its pair, and the direct resend of what did not come
    /// through the tree, if anything did not (then the pair's `done` waits for the
    /// resend's).
    pub(crate) fn done(&mut self, request_id: u64) -> Option<(usize, Option<Msg>)> {
        let m = self.members.remove(&request_id)?;
        let secs = m.last.duration_since(m.started).as_secs_f64();
        // Too little to time, or not all through the tree: no verdict.
        let rate = (m.bytes >= MEASURED_BYTES && secs > 0.0 && m.resend.is_empty())
            .then(|| m.bytes as f64 / secs);
        if let Some(t) = self.trees.get_mut(&m.tree) {
            t.rates.push((request_id, m.parent, m.addr.clone(), rate));
            t.left -= 1;
            if t.left == 0 {
                let t = self.trees.remove(&m.tree).expect("present");
                judge(&t, &mut self.slow);
            }
        }
        if m.resend.is_empty() {
            return Some((m.pair, None));
        }
        let Msg::SendOrder {
            request_id: _,
            target,
            algorithm,
            paths,
            lock_timeout_ms,
            stage,
            transfer,
            bases,
            sizes,
            relays: _,
            ticket: _,
        } = m.order
        else {
            return Some((m.pair, None));
        };
        info!(
            remote = %target,
            files = m.resend.len(),
            "sending again directly what the relay tree did not deliver"
        );
        let (mut p2, mut b2, mut s2) = (Vec::new(), Vec::new(), Vec::new());
        for (i, p) in paths.into_iter().enumerate() {
            if m.resend.contains(&p) {
                if let Some(b) = bases.get(i) {
                    b2.push(b.clone());
                }
                if let Some(s) = sizes.get(i) {
                    s2.push(*s);
                }
                p2.push(p);
            }
        }
        let resend = Msg::SendOrder {
            request_id: 0,
            target,
            algorithm,
            paths: p2,
            lock_timeout_ms,
            stage,
            transfer,
            bases: b2,
            sizes: s2,
            relays: Vec::new(),
            // Signed when it is sent (with --tls).
            ticket: Vec::new(),
        };
        Some((m.pair, Some(resend)))
    }
}

/// A remote must confirm this many bytes in a tree for its throughput to be judged.
const MEASURED_BYTES: u64 = 1 << 20;

/// Judges the remotes of a finished tree: slow if under half its parent's throughput (a
/// child of the master: under half the best of the tree); fast (no longer slow) otherwise.
fn judge(t: &TreeRates, slow: &mut HashSet<String>) {
    let best = t.rates.iter().filter_map(|r| r.3).fold(0.0f64, f64::max);
    let rate_of = |id: u64| t.rates.iter().find(|r| r.0 == id).and_then(|r| r.3);
    for (_, parent, addr, rate) in &t.rates {
        let Some(rate) = rate else { continue };
        let reference = match parent {
            None => Some(best),
            Some(p) => rate_of(*p),
        };
        let Some(reference) = reference else { continue };
        if *rate < reference / 2.0 {
            info!(remote = %addr, "slow in its relay tree: {:.1} MB/s against {:.1} MB/s; a leaf from now on", rate / 1e6, reference / 1e6);
            slow.insert(addr.clone());
        } else {
            slow.remove(addr);
        }
    }
}

/// The members of a cohort in tree order (indices into `cands`): the request's order, those
/// found slow last.
fn rank(cands: &[Candidate], slow: &HashSet<String>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    // Stable: the request's order within each group.
    order.sort_by_key(|&k| slow.contains(&cands[k].addr));
    order
}

/// A complete `k`-ary tree over `n` nodes in breadth-first order, under the master: the
/// master's children are nodes `0..k`, node `j`'s are `k(j+1)..k(j+2)`.
pub(crate) struct Shape {
    n: usize,
    k: usize,
}

impl Shape {
    pub(crate) fn new(n: usize, k: usize) -> Shape {
        Shape { n, k: k.max(1) }
    }

    /// The children of node `j` (`None`: the master).
    pub(crate) fn children(&self, j: Option<usize>) -> std::ops::Range<usize> {
        let first = match j {
            None => 0,
            Some(j) => self.k * (j + 1),
        };
        first.min(self.n)..(first + self.k).min(self.n)
    }

    /// The parent of node `j` (`None`: the master).
    pub(crate) fn parent(&self, j: usize) -> Option<usize> {
        (j >= self.k).then(|| j / self.k - 1)
    }

    /// Node `j`'s children as relay nodes, recursively.
    fn subtree(&self, j: usize, addrs: &[String], ids: &[u64]) -> Vec<RelayNode> {
        self.children(Some(j))
            .map(|c| RelayNode {
                target: addrs[c].clone(),
                request_id: ids[c],
                children: self.subtree(c, addrs, ids),
                // Signed when the order is sent (with --tls).
                ticket: Vec::new(),
            })
            .collect()
    }

    /// `master -> a, b; a -> c, d; ...` for the log.
    fn describe(&self, addrs: &[String]) -> String {
        let mut parts = Vec::new();
        let names = |r: std::ops::Range<usize>| -> String {
            r.map(|c| addrs[c].as_str()).collect::<Vec<_>>().join(", ")
        };
        parts.push(format!("master -> {}", names(self.children(None))));
        for (j, a) in addrs.iter().enumerate().take(self.n) {
            let c = self.children(Some(j));
            if !c.is_empty() {
                parts.push(format!("{a} -> {}", names(c)));
            }
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_a_breadth_first_k_ary_tree_under_the_master() {
        let s = Shape::new(7, 2);
        assert_eq!(s.children(None), 0..2);
        assert_eq!(s.children(Some(0)), 2..4);
        assert_eq!(s.children(Some(1)), 4..6);
        assert_eq!(s.children(Some(2)), 6..7);
        assert_eq!(s.children(Some(3)), 7..7);
        for j in 0..7 {
            match s.parent(j) {
                None => assert!(s.children(None).contains(&j)),
                Some(p) => assert!(s.children(Some(p)).contains(&j), "{j} under {p}"),
            }
        }
        // A chain.
        let c = Shape::new(3, 1);
        assert_eq!(c.children(None), 0..1);
        assert_eq!(c.children(Some(0)), 1..2);
        assert_eq!(c.parent(2), Some(1));
    }

    #[test]
    fn every_node_is_in_exactly_one_subtree() {
        for (n, k) in [(1, 1), (5, 1), (8, 2), (16, 3), (64, 4)] {
            let s = Shape::new(n, k);
            let addrs: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
            let ids: Vec<u64> = (0..n as u64).collect();
            let mut seen = vec![0; n];
            fn walk(nodes: &[RelayNode], seen: &mut [u32]) {
                for node in nodes {
                    seen[node.request_id as usize] += 1;
                    walk(&node.children, seen);
                }
            }
            for r in s.children(None) {
                seen[r] += 1;
                walk(&s.subtree(r, &addrs, &ids), &mut seen);
            }
            assert!(seen.iter().all(|&c| c == 1), "n={n} k={k}: {seen:?}");
        }
    }

    #[test]
    fn remotes_measured_slow_go_last_and_so_to_the_leaves() {
        let cands: Vec<Candidate> = (0..8)
            .map(|i| Candidate {
                pair: i,
                addr: format!("r{i}"),
            })
            .collect();
        let slow: HashSet<String> = ["r1".to_owned()].into();
        let order = rank(&cands, &slow);
        assert_eq!(order, vec![0, 2, 3, 4, 5, 6, 7, 1]);
        let s = Shape::new(8, 2);
        assert!(s.children(Some(7)).is_empty());
        // Nothing measured: the request's order.
        assert_eq!(rank(&cands, &HashSet::new()), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn only_the_slow_remote_is_blamed_not_those_below_it() {
        // master -> a (slow), b; a -> c; b -> d: c is as slow as a, only because of a.
        let t = TreeRates {
            left: 0,
            rates: vec![
                (1, None, "a".into(), Some(1.0e6)),
                (2, None, "b".into(), Some(1.0e7)),
                (3, Some(1), "c".into(), Some(0.9e6)),
                (4, Some(2), "d".into(), Some(0.95e7)),
            ],
        };
        let mut slow: HashSet<String> = ["d".to_owned()].into();
        judge(&t, &mut slow);
        assert_eq!(slow, ["a".to_owned()].into());
    }
}
