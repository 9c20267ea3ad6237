//! Memory-mapped reads, safe against files that shrink under the map.
//!
//! Reading a mapped page past the end of a file that was truncated after it
//! was mapped raises `SIGBUS`, which kills the process: fine for a one-shot
//! tool, not for an agent that hashes live trees. Every map made here is
//! registered with a `SIGBUS` handler (installed once, chaining to whatever
//! handler was there before). A fault inside a registered map replaces the
//! rest of that map with zero pages and marks it; the read then goes on over
//! zeros, and [`GuardedMap::shrank`] turns the mark into the same error a
//! short `pread` gives. Faults anywhere else go to the previous handler.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Maps that can be registered at once; a map asked for while all are in
/// use is refused (the caller reads with `pread` instead).
const SLOTS: usize = 256;

/// One registered map: `start == 0` means free.
struct Slot {
    /// Claimed by a map (set before `start`, cleared after it).
    busy: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Set by the handler: the file ended inside this map.
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to build `MAPS`
const FREE: Slot = Slot {
    busy: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    hit: AtomicBool::new(false),
};

static MAPS: [Slot; SLOTS] = [FREE; SLOTS];

/// The `SIGBUS` action before ours, and the page size; set once by [`install`].
struct Installed {
    previous: libc::sigaction,
    page: usize,
}

// SAFETY: `sigaction` is plain data (handler addresses, flags, a signal
// mask); it is written once before the handler can run and only read after.
unsafe impl Sync for Installed {}
// SAFETY: as above: plain data, no thread affinity.
unsafe impl Send for Installed {}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

/// Installs the handler once; `false` if the kernel refused it.
fn install() -> bool {
    let installed = INSTALLED.get_or_init(|| {
        // SAFETY: `sigaction` is plain data; all-zero is a valid value for
        // the query to overwrite.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only queries; `previous` is writable.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
            return None;
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Some(Installed {
            previous,
            page: usize::try_from(page).ok().filter(|p| p.is_power_of_two())?,
        })
    });
    // The handler goes in only once `INSTALLED` holds the previous one.
    installed.is_some() && HANDLER_SET.get_or_init(set_handler).is_ok()
}

static HANDLER_SET: OnceLock<Result<(), ()>> = OnceLock::new();

/// Makes `on_sigbus` the `SIGBUS` handler (after `INSTALLED` holds the old one).
fn set_handler() -> Result<(), ()> {
    // SAFETY: as in `install`: a zeroed action filled in before use.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    ours.sa_sigaction = on_sigbus as *const () as usize;
    ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: valid sigset pointer; valid action pointer, null for the old one.
    let rc = unsafe {
        libc::sigemptyset(&mut ours.sa_mask);
        libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// The `SIGBUS` handler: zero pages over the rest of a registered map that
/// faulted, else the previous handler. Only atomics, `mmap` and `sigaction`
/// (system calls) run here.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let installed = INSTALLED.get().and_then(Option::as_ref);
    if let Some(inst) = installed {
        for slot in &MAPS {
            let start = slot.start.load(Ordering::Acquire);
            let len = slot.len.load(Ordering::Acquire);
            if start == 0 || addr < start || addr >= start + len {
                continue;
            }
            let from = addr & !(inst.page - 1);
            // SAFETY: [from, start + len) lies inside a live map this module
            // registered and that nothing else is reading as file data any
            // more (the file ends before it); replacing it with anonymous
            // zero pages keeps every address valid until the map's owner
            // unmaps the whole range.
            let r = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    start + len - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.hit.store(true, Ordering::Release);
                return;
            }
            break;
        }
    }
    // Not one of ours: hand it on.
    let previous = installed.map(|i| i.previous);
    match previous {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed as an
                // SA_SIGINFO handler with this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the previous handler was installed as a plain one.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Default action: restore it and return; the faulting access
            // runs again and the kernel delivers SIGBUS with it.
            // SAFETY: a zeroed action is SIG_DFL with an empty mask.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: valid action pointer, null for the old one.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        }
    }
}

/// A read-only map of a whole file, registered with the `SIGBUS` handler.
pub(crate) struct GuardedMap {
    slot: &'static Slot,
    // Dropped after `Drop::drop` has unregistered the slot.
    map: memmap2::Mmap,
}

impl GuardedMap {
    /// The mapped bytes; past the point where the file shrank, zeros.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Whether the file ended inside the map while it was read.
    pub(crate) fn shrank(&self) -> bool {
        self.slot.hit.load(Ordering::Acquire)
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        self.slot.start.store(0, Ordering::Release);
        self.slot.len.store(0, Ordering::Release);
        self.slot.busy.store(false, Ordering::Release);
    }
}

/// A guarded read-only map of the first `size` bytes of `file`. `None` when
/// the file is empty (zero-length maps are invalid), when the handler could
/// not be installed, or when every slot is in use: the caller then reads
/// with `pread`.
pub(crate) fn map(file: &File, size: u64) -> io::Result<Option<GuardedMap>> {
    if size == 0 || !install() {
        return Ok(None);
    }
    let len = usize::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too big to map"))?;
    let Some(slot) = MAPS.iter().find(|s| {
        s.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }) else {
        return Ok(None);
    };
    // SAFETY: the map is read-only and private to this call. If the file
    // shrinks meanwhile, reads past its new end raise SIGBUS, which the
    // handler above turns into zero pages and a `shrank` mark once the map
    // is registered (below, before any byte of it is read).
    let map = match unsafe { memmap2::MmapOptions::new().len(len).map(file) } {
        Ok(map) => map,
        Err(e) => {
            slot.busy.store(false, Ordering::Release);
            return Err(e);
        }
    };
    let _ = map.advise(memmap2::Advice::Sequential);
    slot.hit.store(false, Ordering::Relaxed);
    slot.len.store(len, Ordering::Release);
    slot.start.store(map.as_ptr() as usize, Ordering::Release);
    Ok(Some(GuardedMap { slot, map }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_truncated_under_the_map_reads_zeros_and_is_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let page = 4096 * 4;
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![7u8; 4 * page])
            .unwrap();
        let file = File::open(&path).unwrap();
        let map = map(&file, 4 * page as u64).unwrap().unwrap();
        assert_eq!(map.bytes()[0], 7);
        assert!(!map.shrank());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        // Past the new end: zeros instead of a SIGBUS, and the mark.
        let sum: u64 = map.bytes()[page..].iter().map(|&b| b as u64).sum();
        assert_eq!(sum, 0);
        assert!(map.shrank());
        assert_eq!(map.bytes()[0], 7);
    }

    #[test]
    fn slots_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g");
        std::fs::write(&path, b"abc").unwrap();
        let file = File::open(&path).unwrap();
        for _ in 0..3 * SLOTS {
            let m = map(&file, 3).unwrap().unwrap();
            assert_eq!(m.bytes(), b"abc");
        }
    }
}
