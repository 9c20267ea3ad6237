//! The binary's global allocator: the system allocator, except that big
//! blocks (read buffers) start on a page boundary.
//!
//! Why: the kernel copies page-cache data into a read buffer with `rep movsb`,
//! which on the AMD EPYC machines we measure on runs about 4x slower when the
//! destination is not cache-line aligned — and glibc's `malloc` returns big
//! blocks 16 bytes past a page boundary. A 256 KiB `pread` into such a buffer
//! took 121 µs instead of 36 µs (`dd bs=256K`), capping every pread/io_uring
//! hash at ~2 GB/s. Page-aligning blocks of 64 KiB and more fixes every buffer
//! the engine allocates without changing it.
//!
//! Since then the engine aligns its own pread, stream and tree buffers
//! (`engine/src/io/buf.rs`), and for those this allocator changes nothing:
//! `bench -a crc32 --io pread --size 256MiB --runs 10`, 5 alternating rounds,
//! best 36.5 GB/s with it, 36.0 without (noise: 25-36 in both). It is kept
//! because the engine's io_uring buffers (`engine/src/io/uring.rs`,
//! `vec![0u8; PIECE]`) are still plain allocations: `bench -a crc32 --io uring
//! --size 256MiB --runs 10`, 6 alternating rounds, 28.6-32.0 GB/s with it and
//! 27.2-29.3 without, slower in every round (~9%). The agents' transfer and
//! check buffers (`agent/src/transfer.rs`, `agent/src/consistency.rs`) rely on
//! it too.
//!
//! Its cost: an embedded `sync --no-fsync --no-checksum-cache` of one 1 GiB
//! file into an empty tree takes 1.02-1.14 s with it and 0.40-0.57 s without
//! (5 alternating rounds); `perf` puts 8.5% of it in `exc_page_fault` (fresh
//! anonymous pages faulted in under `memset`) with it, next to none without.
//! Once the engine's io_uring buffers are aligned like its others, this
//! allocator should go.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this big are page-aligned.
const BIG: usize = 64 << 10;
/// Their alignment.
const PAGE: usize = 4096;

/// [`System`], with blocks of [`BIG`] bytes or more aligned to [`PAGE`].
pub struct PageAlignedBig;

/// The layout actually requested from [`System`] for `layout`.
fn adjusted(layout: Layout) -> Layout {
    if layout.size() >= BIG && layout.align() < PAGE {
        // PAGE is a power of two and `size` was valid with a smaller alignment,
        // so it stays valid (≤ isize::MAX once rounded) in all practical cases;
        // fall back to the original layout if not.
        Layout::from_size_align(layout.size(), PAGE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every method forwards to `System` with the layout `adjusted` gives,
// and `adjusted` is a pure function of the caller's layout, so `dealloc` and
// `realloc` always hand `System` the same layout the block was allocated with.
unsafe impl GlobalAlloc for PageAlignedBig {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `adjusted` keeps the size (non-zero, as the caller guarantees)
        // and only raises the alignment.
        unsafe { System.alloc(adjusted(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(adjusted(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` with this same adjusted layout.
        unsafe { System.dealloc(ptr, adjusted(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = adjusted(layout);
        // The caller guarantees `new_size` with `layout.align()` is a valid layout.
        let Ok(wanted) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = adjusted(wanted);
        if old.align() == new.align() {
            // SAFETY: `ptr` was allocated by `System` with `old`; the new block
            // keeps that alignment, as `dealloc` will expect for `new_size`.
            return unsafe { System.realloc(ptr, old, new_size) };
        }
        // The block crosses BIG: move it to a block of the other alignment.
        // SAFETY: `new` has a non-zero size (`new_size` > 0 per the contract).
        let fresh = unsafe { System.alloc(new) };
        if !fresh.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and
            // do not overlap; `ptr` is then freed with the layout it was made with.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_blocks_are_page_aligned_and_small_ones_untouched() {
        let big = Layout::from_size_align(256 << 10, 1).unwrap();
        assert_eq!(adjusted(big).align(), PAGE);
        let small = Layout::from_size_align(100, 8).unwrap();
        assert_eq!(adjusted(small), small);
        let v = vec![0u8; 256 << 10];
        assert_eq!(v.as_ptr() as usize % PAGE, 0);
    }

    #[test]
    fn growing_across_the_threshold_keeps_the_contents() {
        let mut v: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        v.resize(BIG * 3, 7);
        assert_eq!(v.as_ptr() as usize % PAGE, 0);
        assert!(v[..1000].iter().enumerate().all(|(i, b)| *b == i as u8));
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(v, (0..10u8).collect::<Vec<_>>());
    }
}
