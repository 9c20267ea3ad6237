//! Page-aligned read buffers, and a small per-thread pool of them.
//!
//! Why aligned: the kernel copies page-cache data into a read buffer with
//! `rep movsb`, which on the AMD EPYC machines we measure on runs about 4x
//! slower when the destination is not 64-byte aligned, and glibc's `malloc`
//! returns big blocks 16 bytes past a page boundary (a 256 KiB `pread` took
//! 121 µs instead of 36 µs). So every read buffer is page-aligned here, not
//! by a global allocator: embedders get the speed too, and the `fleetsync`
//! binary's own buffers (the agent's send buffer) use [`AlignedBuf`]. A
//! page-aligning global allocator was tried and dropped: it made fresh big
//! blocks fault in under `memset` (an embedded 1 GiB sync took ~2x as long).
//!
//! Why pooled: hashing a tree of small files one by one allocated (and
//! zeroed, for a safe `&mut [u8]`) a buffer per file; `perf` put the
//! `memset` alone at 4-5% of a no-change `fleetsync sync`. A pooled buffer
//! is zeroed once, when the thread first needs it.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Alignment of every buffer (a page; also a multiple of the 64-byte line).
pub(crate) const ALIGN: usize = 4096;

/// One page of bytes, aligned to a page: the unit the buffers are made of,
/// so that the allocation itself is aligned without a custom allocator.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A zero-initialised, page-aligned byte buffer of a fixed length: a read
/// buffer the kernel copies page-cache data into at full speed.
///
/// ```
/// let mut buf = fleetsync_engine::AlignedBuf::new(1 << 20);
/// assert_eq!(buf.len(), 1 << 20);
/// assert_eq!(buf.as_ptr() as usize % 4096, 0);
/// buf[0] = 7;
/// ```
pub struct AlignedBuf {
    pages: Box<[Page]>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes starting on a page boundary.
    pub fn new(len: usize) -> Self {
        let pages = vec![Page([0; ALIGN]); len.div_ceil(ALIGN)].into_boxed_slice();
        AlignedBuf { pages, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `pages` is `len.div_ceil(ALIGN)` initialised `Page`s, each
        // `ALIGN` plain bytes with no padding (`repr(C)`, size == align), laid
        // out contiguously, so its first `len` bytes are initialised `u8`s
        // borrowed for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique, and any
        // byte pattern is a valid `Page`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Length of the pooled buffers: the most one sequential read asks for.
pub(crate) const POOL_BUF: usize = 1 << 20;
/// Buffers a thread keeps; more are only needed when rayon nests work (a
/// thread waiting in a `join` may start another file).
const POOL_KEEP: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<AlignedBuf>> = const { RefCell::new(Vec::new()) };
}

/// A [`POOL_BUF`]-byte buffer from this thread's pool (made on first use).
/// Give it back with [`give`].
pub(crate) fn take() -> AlignedBuf {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| AlignedBuf::new(POOL_BUF))
}

/// Returns a buffer from [`take`] to this thread's pool.
pub(crate) fn give(buf: AlignedBuf) {
    debug_assert_eq!(buf.len(), POOL_BUF);
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOL_KEEP {
            pool.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_zeroed_and_of_the_asked_length() {
        for len in [0, 1, 100, ALIGN, ALIGN + 1, 3 * ALIGN - 7] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn pooled_buffers_are_reused_on_the_same_thread() {
        let mut a = take();
        a[0] = 7;
        let ptr = a.as_ptr();
        give(a);
        let b = take();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), POOL_BUF);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        give(b);
    }
}
