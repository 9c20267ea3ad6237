//! Positioned reads (`pread`), the portable backend.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{Receiver, SyncSender};

use super::Block;

/// Fills `buf` from `offset`; a file shorter than that is an error (it
/// shrank while being hashed).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            shrank()
        } else {
            e
        }
    })
}

/// The error for a file that got shorter while it was being read.
pub(crate) fn shrank() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being read")
}

/// Reader-thread side of double buffering: reads `[0, size)` in `block`
/// sized pieces, in order, into `depth` buffers that the consumer returns
/// through `free`. Stops early when the consumer hangs up.
pub(crate) fn produce(
    file: &File,
    size: u64,
    block: usize,
    depth: usize,
    tx: &SyncSender<io::Result<Block>>,
    free: &Receiver<Block>,
) {
    let mut spare: Vec<Block> = (0..depth)
        .map(|_| Block {
            offset: 0,
            data: super::buf::AlignedBuf::new(block),
            len: 0,
        })
        .collect();
    let mut offset = 0u64;
    while offset < size {
        let mut b = match spare.pop() {
            Some(b) => b,
            None => match free.recv() {
                Ok(b) => b,
                Err(_) => return,
            },
        };
        let want = block.min((size - offset) as usize);
        b.len = want;
        b.offset = offset;
        let result = read_exact_at(file, &mut b.data[..want], offset).map(|()| b);
        let failed = result.is_err();
        if tx.send(result).is_err() || failed {
            return;
        }
        offset += want as u64;
    }
}
