//! Memory-mapped reads; used only when asked for ([`crate::IoMode::Mmap`]),
//! since a mapping of a huge file counts against the address space and the
//! page cache pressure is out of our hands.

use std::fs::File;
use std::io;

/// A read-only map of the first `size` bytes of `file` (`None` when empty:
/// zero-length maps are invalid).
pub(crate) fn map(file: &File, size: u64) -> io::Result<Option<memmap2::Mmap>> {
    if size == 0 {
        return Ok(None);
    }
    let len = usize::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too big to map"))?;
    // SAFETY: the map is read-only and private to this call; if another
    // process truncates the file meanwhile, reads past the new end raise
    // SIGBUS, the documented risk of `IoMode::Mmap` that callers opt into.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(Some(map))
}
