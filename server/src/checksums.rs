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
}
