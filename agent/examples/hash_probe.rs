//! Times `PosixBackend::checksum` over every file of a tree on one thread.

use fleetsync_agent::{Backend, PosixBackend};
use std::time::Instant;

fn main() {
    let root = std::env::args().nth(1).expect("ROOT");
    let b = PosixBackend::new(root.as_ref()).unwrap();
    let mut files = Vec::new();
    b.list(&|_, _| fleetsync_select::Decision::Include, &mut |e| {
        if e.kind == fleetsync_proto::FileKind::File {
            files.push(e.path);
        }
        Ok(())
    })
    .unwrap();
    let info = fleetsync_engine::Registry::with_builtins()
        .info("crc32")
        .unwrap();
    let t = Instant::now();
    let mut bytes = 0;
    for f in &files {
        bytes += b.checksum(f, &info, false).unwrap().1;
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{} files, {} MiB in {s:.2}s = {:.0} MiB/s",
        files.len(),
        bytes >> 20,
        (bytes >> 20) as f64 / s
    );
}
