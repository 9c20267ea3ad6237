//! io_uring reads: each thread that reads keeps one ring with a few
//! registered buffers (`READ_FIXED`), and keeps several reads of the range
//! it is hashing in flight while it hashes the piece that arrived.
//!
//! Ownership rule: the buffers belong to the ring; Rust code only ever sees
//! a buffer (as a shared slice) after its read completed and before the
//! next read into it is queued, and every exit path reaps all reads first.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use io_uring::{opcode, squeue, types, IoUring};

use super::buf::AlignedBuf;
use super::pread::shrank;

/// Bytes per read (and per piece handed to the hashers).
pub(crate) const PIECE: usize = 256 << 10;
/// Reads in flight per thread.
const DEPTH: usize = 4;

/// Probes io_uring once per process: a ring must be created and a NOP must
/// complete (seccomp filters and `io_uring_disabled` fail one or the other).
pub(crate) fn probe() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let mut ring = IoUring::new(2).map_err(|e| format!("io_uring_setup: {e}"))?;
            let nop = opcode::Nop::new().build().user_data(7);
            // SAFETY: a NOP references no memory.
            unsafe { ring.submission().push(&nop) }.map_err(|e| e.to_string())?;
            wait(&ring, 1).map_err(|e| format!("io_uring_enter: {e}"))?;
            let res = ring.completion().next().map(|c| c.result());
            match res {
                Some(r) if r >= 0 => Ok(()),
                Some(r) => Err(format!("NOP failed: {}", io::Error::from_raw_os_error(-r))),
                None => Err("NOP did not complete".to_owned()),
            }
        })
        .clone()
}

/// `submit_and_wait`, retrying on interruption.
fn wait(ring: &IoUring, want: usize) -> io::Result<()> {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
    }
}

/// One thread's ring and its registered read buffers.
struct LocalRing {
    ring: IoUring,
    /// The buffers' memory; only reached through `ptrs` after registration.
    _bufs: Vec<AlignedBuf>,
    ptrs: Vec<*mut u8>,
    fixed: bool,
}

/// A read queued into one slot.
#[derive(Clone, Copy, Default)]
struct SlotRead {
    offset: u64,
    want: usize,
    filled: usize,
    in_flight: bool,
    complete: bool,
}

impl LocalRing {
    fn new() -> io::Result<Self> {
        let ring = IoUring::new((2 * DEPTH) as u32)?;
        let mut bufs: Vec<AlignedBuf> = (0..DEPTH).map(|_| AlignedBuf::new(PIECE)).collect();
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        let iovecs: Vec<libc::iovec> = ptrs
            .iter()
            .map(|&p| libc::iovec {
                iov_base: p.cast(),
                iov_len: PIECE,
            })
            .collect();
        // SAFETY: each iovec covers one live `PIECE`-byte buffer owned by
        // this `LocalRing`; their heap memory never moves nor is freed while the
        // ring (which holds the registration) lives, and they drop after it.
        let fixed = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        Ok(LocalRing {
            ring,
            _bufs: bufs,
            ptrs,
            fixed,
        })
    }

    /// Queues the rest of `slot`'s read.
    fn queue(&mut self, fd: types::Fd, slot: usize, r: &SlotRead, punt: bool) -> io::Result<()> {
        let len = (r.want - r.filled) as u32;
        // SAFETY: `filled < want <= PIECE`: the pointer stays in the buffer.
        let ptr = unsafe { self.ptrs[slot].add(r.filled) };
        let offset = r.offset + r.filled as u64;
        let entry = if self.fixed {
            opcode::ReadFixed::new(fd, ptr, len, slot as u16)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(offset).build()
        }
        .user_data(slot as u64);
        // Punting to io-wq makes cached reads complete on a kernel thread
        // instead of inline in `submit`, so the copy overlaps our hashing.
        let entry = if punt {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        loop {
            // SAFETY: the slot's buffer is not read by Rust code until this
            // read's completion is reaped (`complete` is set only then).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                break;
            }
            self.ring.submit()?;
        }
        self.ring.submit().map(|_| ())
    }

    /// Reaps at least one completion, re-queueing short reads.
    fn reap(
        &mut self,
        fd: types::Fd,
        slots: &mut [SlotRead],
        punt: bool,
        failure: &mut Option<io::Error>,
    ) -> io::Result<()> {
        wait(&self.ring, 1)?;
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in done {
            let slot = slot as usize;
            let r = &mut slots[slot];
            r.in_flight = false;
            if res < 0 {
                failure.get_or_insert(io::Error::from_raw_os_error(-res));
            } else if res == 0 {
                failure.get_or_insert(shrank());
            } else {
                r.filled += res as usize;
                if r.filled < r.want {
                    if failure.is_none() {
                        let again = *r;
                        slots[slot].in_flight = true;
                        self.queue(fd, slot, &again, punt)?;
                    }
                } else {
                    r.complete = true;
                }
            }
        }
        Ok(())
    }

    /// Reads `[start, end)` of `file` in order, `DEPTH` pieces in flight,
    /// calling `f` on each piece as it arrives.
    ///
    /// The outer error means the ring itself failed (reads may still be in
    /// flight, so the buffers must not be reused); the inner one is a read
    /// that failed, after every other read was reaped.
    fn read_range(
        &mut self,
        file: &File,
        start: u64,
        end: u64,
        punt: bool,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<io::Result<()>> {
        let fd = types::Fd(file.as_raw_fd());
        let n = (end - start).div_ceil(PIECE as u64);
        let mut slots = [SlotRead::default(); DEPTH];
        let mut failure: Option<io::Error> = None;
        let piece = |k: u64| SlotRead {
            offset: start + k * PIECE as u64,
            want: (PIECE as u64).min(end - start - k * PIECE as u64) as usize,
            filled: 0,
            in_flight: true,
            complete: false,
        };
        for k in 0..n.min(DEPTH as u64) {
            let slot = k as usize;
            slots[slot] = piece(k);
            self.queue(fd, slot, &slots[slot], punt)?;
        }
        for k in 0..n {
            let slot = (k % DEPTH as u64) as usize;
            while !slots[slot].complete && failure.is_none() {
                self.reap(fd, &mut slots, punt, &mut failure)?;
            }
            if failure.is_some() {
                break;
            }
            let want = slots[slot].want;
            // SAFETY: the read into this slot completed and no other is
            // queued into it until `f` returns.
            let data = unsafe { std::slice::from_raw_parts(self.ptrs[slot], want) };
            f(data);
            if k + (DEPTH as u64) < n {
                slots[slot] = piece(k + DEPTH as u64);
                self.queue(fd, slot, &slots[slot], punt)?;
            }
        }
        // Reap whatever is still in flight before the buffers can be reused.
        while slots.iter().any(|s| s.in_flight) {
            let mut stop = Some(io::Error::other("draining"));
            self.reap(fd, &mut slots, false, &mut stop)?;
        }
        Ok(match failure {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }
}

thread_local! {
    /// This thread's ring, taken out while in use (hashing may run other
    /// rayon work on this thread, which then makes its own ring).
    static LOCAL: RefCell<Option<LocalRing>> = const { RefCell::new(None) };
}

/// Reads `[start, end)` of `file` with io_uring on this thread, calling `f`
/// on each piece (at most [`PIECE`] bytes) in file order. `punt` asks the
/// kernel to do even cached reads on its own threads (overlap for one
/// sequential reader; pointless when every core is already hashing).
pub(crate) fn read_range(
    file: &File,
    start: u64,
    end: u64,
    punt: bool,
    f: &mut dyn FnMut(&[u8]),
) -> io::Result<()> {
    let taken = LOCAL.with(|c| c.borrow_mut().take());
    let mut local = match taken {
        Some(l) => l,
        None => LocalRing::new()?,
    };
    match local.read_range(file, start, end, punt, f) {
        Ok(result) => {
            LOCAL.with(|c| *c.borrow_mut() = Some(local));
            result
        }
        Err(e) => {
            // The ring failed with reads possibly still in flight: the kernel
            // may yet write into the buffers, so leak them rather than free.
            std::mem::forget(local);
            Err(e)
        }
    }
}

/// Files per batch of [`read_batch`] (three SQEs each).
pub(crate) const BATCH_FILES: usize = 32;

/// A ring with `BATCH_FILES` direct-descriptor slots, for batches of small
/// files: open, read and close chained in the kernel, one `io_uring_enter`
/// per batch.
struct BatchRing {
    ring: IoUring,
}

impl BatchRing {
    fn new() -> io::Result<Self> {
        let ring = IoUring::new((4 * BATCH_FILES) as u32)?;
        ring.submitter().register_files_sparse(BATCH_FILES as u32)?;
        Ok(BatchRing { ring })
    }
}

thread_local! {
    /// This thread's batch ring, taken out while in use.
    static BATCH: RefCell<Option<BatchRing>> = const { RefCell::new(None) };
}

/// Where each file of a batch lands in the buffer: one after the other,
/// each starting on a 64-byte boundary (the kernel's copy into a buffer
/// that is not cache-line aligned is ~4x slower on the EPYC machines we
/// measure on). Returns the offsets and the total length needed.
pub(crate) fn batch_layout(sizes: impl Iterator<Item = u64>) -> (Vec<usize>, usize) {
    let mut offsets = Vec::new();
    let mut end = 0usize;
    for size in sizes {
        offsets.push(end);
        end += (size as usize).next_multiple_of(64);
    }
    (offsets, end)
}

/// Reads small files in one batch: for each `(path, want)`, an `OPENAT`
/// into a direct descriptor linked to a `READ` of up to `want` bytes from
/// offset 0 into `buf`, hard-linked to a `CLOSE`. File `i`'s bytes land at
/// offset `batch_layout(wants).0[i]`; `buf` must be at least the total
/// length `batch_layout` gives. Returns, per file, the number of bytes read
/// (fewer than `want` only at the end of a regular file), or the open or
/// read error.
pub(crate) fn read_batch(
    files: &[(&std::ffi::CStr, u64)],
    buf: &mut AlignedBuf,
) -> io::Result<Vec<io::Result<usize>>> {
    assert!(files.len() <= BATCH_FILES);
    let (offsets, total) = batch_layout(files.iter().map(|f| f.1));
    assert!(buf.len() >= total, "batch buffer too small");
    let taken = BATCH.with(|c| c.borrow_mut().take());
    let mut batch = match taken {
        Some(b) => b,
        None => BatchRing::new()?,
    };
    let base = buf.as_mut_ptr();
    for (i, ((path, size), offset)) in files.iter().zip(&offsets).enumerate() {
        let slot = types::DestinationSlot::try_from_slot_target(i as u32)
            .map_err(|_| io::Error::other("bad direct descriptor slot"))?;
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            // No O_CLOEXEC: the kernel rejects it for direct descriptors,
            // which never appear in the fd table anyway.
            .flags(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .file_index(Some(slot))
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data((i * 4) as u64);
        // SAFETY: `offset + size <= total <= buf.len()` (`batch_layout`).
        let ptr = unsafe { base.add(*offset) };
        let read = opcode::Read::new(types::Fixed(i as u32), ptr, *size as u32)
            .offset(0)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data((i * 4 + 1) as u64);
        let close = opcode::Close::new(types::Fixed(i as u32))
            .build()
            .user_data((i * 4 + 2) as u64);
        // SAFETY: the path strings and `buf` outlive the batch: every
        // completion is reaped below before this function returns, and the
        // ring has room for all `3 * BATCH_FILES` entries (no partial push).
        unsafe {
            let mut sq = batch.ring.submission();
            sq.push(&open)
                .and_then(|()| sq.push(&read))
                .and_then(|()| sq.push(&close))
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
    }
    let mut opened = vec![0i32; files.len()];
    let mut got = vec![0i32; files.len()];
    let mut pending = 3 * files.len();
    while pending > 0 {
        if let Err(e) = wait(&batch.ring, pending) {
            // Reads may still be in flight into `buf`: leak it (leaving the
            // caller an empty one) and the ring.
            std::mem::forget(std::mem::replace(buf, AlignedBuf::new(0)));
            std::mem::forget(batch);
            return Err(e);
        }
        for c in batch.ring.completion() {
            pending -= 1;
            let i = (c.user_data() / 4) as usize;
            match c.user_data() % 4 {
                0 => opened[i] = c.result(),
                1 => got[i] = c.result(),
                _ => {}
            }
        }
    }
    BATCH.with(|c| *c.borrow_mut() = Some(batch));
    Ok((0..files.len())
        .map(|i| {
            if opened[i] < 0 {
                Err(io::Error::from_raw_os_error(-opened[i]))
            } else if got[i] < 0 {
                Err(io::Error::from_raw_os_error(-got[i]))
            } else {
                Ok(got[i] as usize)
            }
        })
        .collect())
}
