//! io_uring reads: registered buffers (`READ_FIXED`) with several reads in
//! flight for big files, and a per-thread ring for single small reads.
//!
//! Ownership rule: a buffer handed to the kernel is not touched (nor freed,
//! nor sent to a hasher) until its completion has been reaped; every exit
//! path drains the ring first.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::OnceLock;

use io_uring::{opcode, squeue, types, IoUring};

use super::pread::shrank;
use super::Block;

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

/// A read in flight: which part of which buffer it fills.
struct InFlight {
    block: Block,
    /// Bytes already in `block.data`.
    filled: usize,
}

/// Reader-thread side for big files: reads `[0, size)` in `block`-sized
/// pieces with up to `depth` reads in flight into registered buffers, and
/// sends each filled block (in file order if `ordered`, else as completed).
/// Buffers come back through `free`. Stops early when the consumer hangs up.
pub(crate) fn produce(
    file: &File,
    size: u64,
    block: usize,
    depth: usize,
    ordered: bool,
    tx: &SyncSender<io::Result<Block>>,
    free: &Receiver<Block>,
) {
    let result = run(file, size, block, depth, ordered, tx, free);
    if let Err(e) = result {
        let _ = tx.send(Err(e));
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    file: &File,
    size: u64,
    block: usize,
    depth: usize,
    ordered: bool,
    tx: &SyncSender<io::Result<Block>>,
    free: &Receiver<Block>,
) -> io::Result<()> {
    let depth = depth.clamp(1, 64);
    let mut ring = IoUring::new((depth as u32).next_power_of_two())?;
    let mut spare: Vec<Block> = (0..depth)
        .map(|slot| Block {
            slot,
            offset: 0,
            data: vec![0; block],
        })
        .collect();
    let iovecs: Vec<libc::iovec> = spare
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.data.as_mut_ptr().cast(),
            iov_len: b.data.len(),
        })
        .collect();
    // SAFETY: every iovec points at a live buffer of `block` bytes whose
    // capacity never changes; the buffers outlive the ring's use of them:
    // reads are only issued into a slot's own buffer while this function
    // holds it, and the ring is drained before returning.
    let fixed = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();

    let fd = types::Fd(file.as_raw_fd());
    let mut in_flight: Vec<Option<InFlight>> = (0..depth).map(|_| None).collect();
    let mut n_in_flight = 0usize;
    let mut next_offset = 0u64;
    let mut next_deliver = 0u64;
    let mut done: BTreeMap<u64, Block> = BTreeMap::new();
    let mut failure: Option<io::Error> = None;
    let mut hung_up = false;

    loop {
        // Take back buffers the hashers are done with.
        loop {
            match free.try_recv() {
                Ok(b) => spare.push(b),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if next_offset < size {
                        hung_up = true;
                    }
                    break;
                }
            }
        }
        // Issue reads into every spare buffer.
        while failure.is_none() && !hung_up && next_offset < size {
            let Some(mut b) = spare.pop() else { break };
            let want = block.min((size - next_offset) as usize);
            b.data.resize(block, 0);
            b.data.truncate(want);
            b.offset = next_offset;
            next_offset += want as u64;
            let slot = b.slot;
            in_flight[slot] = Some(InFlight {
                block: b,
                filled: 0,
            });
            // SAFETY: the buffer now lives in `in_flight[slot]` and is not
            // touched until its completion is reaped below.
            unsafe {
                push_read(
                    &mut ring,
                    fd,
                    in_flight[slot].as_mut().unwrap(),
                    fixed,
                    !ordered,
                )
            }?;
            n_in_flight += 1;
        }
        if n_in_flight == 0 {
            if failure.is_some() || hung_up || (next_offset >= size && done.is_empty()) {
                break;
            }
            // Every buffer is with the hashers (or waiting in `done`, which
            // cannot happen when nothing is in flight): wait for one back.
            match free.recv() {
                Ok(b) => {
                    spare.push(b);
                    continue;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = wait(&ring, 1) {
            // Cannot reap: the kernel may still own buffers, so they must
            // not be freed. Leak them rather than risk a write into freed
            // memory.
            for f in in_flight.iter_mut().filter_map(Option::take) {
                std::mem::forget(f.block);
            }
            return Err(e);
        }
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in completions {
            let slot = slot as usize;
            n_in_flight -= 1;
            let mut f = in_flight[slot].take().expect("completion for an idle slot");
            if res < 0 {
                failure.get_or_insert(io::Error::from_raw_os_error(-res));
                spare.push(f.block);
                continue;
            }
            if res == 0 {
                failure.get_or_insert(shrank());
                spare.push(f.block);
                continue;
            }
            f.filled += res as usize;
            if f.filled < f.block.data.len() && failure.is_none() && !hung_up {
                // Short read: ask for the rest.
                in_flight[slot] = Some(f);
                // SAFETY: as above, the buffer stays in `in_flight[slot]`.
                unsafe {
                    push_read(
                        &mut ring,
                        fd,
                        in_flight[slot].as_mut().unwrap(),
                        fixed,
                        !ordered,
                    )
                }?;
                n_in_flight += 1;
                continue;
            }
            if failure.is_some() || hung_up {
                spare.push(f.block);
                continue;
            }
            if ordered {
                done.insert(f.block.offset, f.block);
            } else if tx.send(Ok(f.block)).is_err() {
                hung_up = true;
            }
        }
        while let Some(b) = done.remove(&next_deliver) {
            next_deliver += b.data.len() as u64;
            if tx.send(Ok(b)).is_err() {
                hung_up = true;
                break;
            }
        }
    }
    if fixed {
        let _ = ring.submitter().unregister_buffers();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Queues the read that fills the rest of `f`'s buffer, and submits it.
///
/// # Safety
/// `f.block.data` must stay alive, unmoved and untouched until the
/// completion for `f.block.slot` is reaped.
unsafe fn push_read(
    ring: &mut IoUring,
    fd: types::Fd,
    f: &mut InFlight,
    fixed: bool,
    punt: bool,
) -> io::Result<()> {
    let slot = f.block.slot;
    let len = (f.block.data.len() - f.filled) as u32;
    // SAFETY: `filled < data.len()`, so the pointer stays inside the buffer.
    let ptr = unsafe { f.block.data.as_mut_ptr().add(f.filled) };
    let offset = f.block.offset + f.filled as u64;
    let entry = if fixed {
        opcode::ReadFixed::new(fd, ptr, len, slot as u16)
            .offset(offset)
            .build()
    } else {
        opcode::Read::new(fd, ptr, len).offset(offset).build()
    }
    .user_data(slot as u64);
    // Unordered (parallel) mode: let io-wq kernel threads do the page-cache
    // copies, so they run on several cores instead of inline on this one.
    let entry = if punt {
        entry.flags(squeue::Flags::ASYNC)
    } else {
        entry
    };
    push(ring, &entry)
}

/// Pushes one entry, submitting first when the queue is full.
fn push(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: the caller guarantees what the entry points at outlives
        // its completion.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return ring.submit().map(|_| ());
        }
        ring.submit()?;
    }
}

thread_local! {
    /// One small ring per thread for single reads of small files.
    static SMALL_RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Reads `buf.len()` bytes at `offset` with one io_uring read at a time on
/// this thread's ring, waiting for each to complete.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    SMALL_RING.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(IoUring::new(4)?);
        }
        let ring = cell.as_mut().expect("ring just made");
        let fd = types::Fd(file.as_raw_fd());
        let mut filled = 0usize;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            let entry = opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                .offset(offset + filled as u64)
                .build()
                .user_data(1);
            push(ring, &entry)?;
            if let Err(e) = wait(ring, 1) {
                // The read may still be in flight with `buf`; drop this
                // ring (the kernel cancels and waits for its requests on
                // exit) before `buf` can be reused.
                *cell = None;
                return Err(e);
            }
            let res = ring
                .completion()
                .next()
                .map(|c| c.result())
                .unwrap_or(-libc::EIO);
            if res < 0 {
                return Err(io::Error::from_raw_os_error(-res));
            }
            if res == 0 {
                return Err(shrank());
            }
            filled += res as usize;
        }
        Ok(())
    })
}
