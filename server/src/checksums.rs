//! Checksum tables: the state and digest of each checksummed file, one byte of state per
//! slot and the digests side by side in one arena (a million candidates cost a few MiB).
//!
//! The server does not know the algorithms: the digest width is learned from the digests
//! the agents return ([`DigestWidth`]).

/// Where the checksum of one slot is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SumState {
    /// Not asked for yet.
    #[default]
    None,
    /// Asked for, no answer yet.
    Pending,
    /// Known: the digest is in the arena.
    Done,
    /// The agent could not compute it (the file counts as different).
    Failed,
}

/// The digest width of a job's algorithm, fixed by the first digest an agent returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DigestWidth(Option<usize>);

impl DigestWidth {
    /// The width, once known.
    pub(crate) fn get(self) -> Option<usize> {
        self.0
    }

    /// Checks a digest of a checksum reply: the first fixes the width, the next ones must
    /// have it (another length is a protocol error of the agent that sent it).
    pub(crate) fn check(&mut self, digest: &[u8]) -> Result<usize, String> {
        match self.0 {
            None => {
                self.0 = Some(digest.len());
                Ok(digest.len())
            }
            Some(w) if w == digest.len() => Ok(w),
            Some(w) => Err(format!(
                "protocol error: a digest of {} bytes where the algorithm's are {w}",
                digest.len()
            )),
        }
    }

    /// Whether a digest of a transfer result is usable: it has the width (learning it from
    /// the first non-empty one). An empty or odd one means "unknown", as from an old agent.
    pub(crate) fn accepts(&mut self, digest: &[u8]) -> bool {
        if digest.is_empty() {
            return false;
        }
        self.check(digest).is_ok()
    }
}

/// State and digest per slot (a master index, or a checksum candidate).
#[derive(Default)]
pub(crate) struct SumTable {
    state: Vec<SumState>,
    /// `width` bytes per slot, allocated with the first digest.
    digests: Vec<u8>,
}

impl SumTable {
    /// A table of `slots` slots, none asked for.
    pub(crate) fn new(slots: usize) -> Self {
        SumTable {
            state: vec![SumState::None; slots],
            digests: Vec::new(),
        }
    }

    pub(crate) fn state(&self, slot: usize) -> SumState {
        self.state[slot]
    }

    pub(crate) fn set_state(&mut self, slot: usize, state: SumState) {
        self.state[slot] = state;
    }

    /// Stores the digest of a slot (`width` checked by the caller).
    pub(crate) fn store(&mut self, slot: usize, width: usize, digest: &[u8]) {
        if self.digests.is_empty() {
            self.digests = vec![0; self.state.len() * width];
        }
        self.digests[slot * width..(slot + 1) * width].copy_from_slice(digest);
        self.state[slot] = SumState::Done;
    }

    /// The digest of a slot in state [`SumState::Done`].
    pub(crate) fn digest(&self, slot: usize, width: usize) -> &[u8] {
        self.digests
            .get(slot * width..(slot + 1) * width)
            .unwrap_or(b"")
    }

    /// Forgets the requests in flight (their answers will never come): asked again later.
    pub(crate) fn forget_pending(&mut self) {
        for st in self.state.iter_mut() {
            if *st == SumState::Pending {
                *st = SumState::None;
            }
        }
    }
}

/// What a pair knows of one checksum candidate on the remote side.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No remote answer yet.
    #[default]
    Unknown,
    /// The remote digest equals the master's.
    Same,
    /// Different digests, or one side could not compute its digest.
    Differs,
    /// The remote digest came before the master's: held until the pair resolves.
    Held,
}

/// The remote side of a pair's checksums: one byte per slot (the server numbers a
/// pair's candidates by their master index: known once a remote entry is matched with
/// the complete master list, before the plan). A remote digest is
/// compared with the master's as it arrives and only its verdict kept; the few that come
/// before the master's digest are held (slot and digest) until [`Verdicts::settle`].
/// With 16 remotes and 32-byte digests this saves about 32 bytes per file per remote
/// against keeping every remote digest.
#[derive(Default)]
pub(crate) struct Verdicts {
    state: Vec<Verdict>,
    held: Vec<u32>,
    held_digests: Vec<u8>,
}

impl Verdicts {
    /// `slots` candidates, none answered.
    pub(crate) fn new(slots: usize) -> Self {
        Verdicts {
            state: vec![Verdict::Unknown; slots],
            ..Verdicts::default()
        }
    }

    /// The verdict of a slot.
    pub(crate) fn get(&self, slot: usize) -> Verdict {
        self.state[slot]
    }

    /// The remote's digest of `slot`, with the master's state and (if done) digest there:
    /// the one place a remote digest is judged (a checksum reply today; a digest listed
    /// with the entry could be judged here as well).
    pub(crate) fn record(&mut self, slot: usize, digest: &[u8], master: &SumTable, m: usize) {
        self.state[slot] = match master.state(m) {
            SumState::Done if master.digest(m, digest.len()) == digest => Verdict::Same,
            SumState::Done | SumState::Failed => Verdict::Differs,
            SumState::None | SumState::Pending => {
                self.held.push(slot as u32);
                self.held_digests.extend_from_slice(digest);
                Verdict::Held
            }
        };
    }

    /// The remote listed the master's own digest for `slot`.
    pub(crate) fn same(&mut self, slot: usize) {
        self.state[slot] = Verdict::Same;
    }

    /// The remote could not compute the digest of `slot`.
    pub(crate) fn fail(&mut self, slot: usize) {
        self.state[slot] = Verdict::Differs;
    }

    /// Compares the held digests with the master's (every master digest is in):
    /// `master_of(slot)` is the master index of a candidate.
    pub(crate) fn settle(
        &mut self,
        width: usize,
        master: &SumTable,
        master_of: impl Fn(usize) -> usize,
    ) {
        for (i, &slot) in self.held.iter().enumerate() {
            let m = master_of(slot as usize);
            let d = &self.held_digests[i * width..][..width];
            self.state[slot as usize] =
                if master.state(m) == SumState::Done && master.digest(m, width) == d {
                    Verdict::Same
                } else {
                    Verdict::Differs
                };
        }
        self.held = Vec::new();
        self.held_digests = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_digest_fixes_the_width() {
        let mut w = DigestWidth::default();
        assert_eq!(w.get(), None);
        assert!(!w.accepts(b""));
        assert_eq!(w.check(&[1, 2, 3, 4]), Ok(4));
        assert!(w.check(&[1, 2]).unwrap_err().contains("2 bytes"));
        assert!(!w.accepts(&[1, 2]));
        assert!(w.accepts(&[5, 6, 7, 8]));
        assert_eq!(w.get(), Some(4));
    }

    #[test]
    fn a_table_keeps_one_digest_per_slot() {
        let mut t = SumTable::new(3);
        t.set_state(0, SumState::Pending);
        t.store(2, 2, &[9, 8]);
        assert_eq!(t.digest(2, 2), [9, 8]);
        assert_eq!(t.state(2), SumState::Done);
        t.forget_pending();
        assert_eq!(t.state(0), SumState::None);
        assert_eq!(std::mem::size_of::<SumState>(), 1);
    }

    #[test]
    fn verdicts_compare_on_arrival_or_when_settled() {
        let mut master = SumTable::new(4);
        master.store(0, 2, &[1, 1]);
        master.set_state(1, SumState::Failed);
        let mut v = Verdicts::new(4);
        v.record(0, &[1, 1], &master, 0);
        v.record(1, &[1, 1], &master, 1);
        // Candidates 2 and 3 answer before the master.
        v.record(2, &[2, 2], &master, 2);
        v.record(3, &[3, 3], &master, 3);
        assert_eq!(v.get(0), Verdict::Same);
        assert_eq!(v.get(1), Verdict::Differs);
        assert_eq!(v.get(2), Verdict::Held);
        master.store(2, 2, &[2, 2]);
        master.store(3, 2, &[3, 4]);
        v.settle(2, &master, |slot| slot);
        assert_eq!(v.get(2), Verdict::Same);
        assert_eq!(v.get(3), Verdict::Differs);
        assert_eq!(std::mem::size_of::<Verdict>(), 1);
    }
}
