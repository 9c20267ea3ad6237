//! Initial copy through agents only (no comparison server): list the master,
//! create the directories on each remote, then one send order per remote, all
//! at once. Prints the wall time, for side-by-side runs with `rsync -a`.
//!
//! `cargo run --release -p fleetsync-agent --example transfer_bench -- MASTER REMOTE...`

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use fleetsync_agent::{Agent, AgentHandle};
use fleetsync_proto::{auth, frame, Attrs, FileKind, Msg, Op, OpKind, Role};

const TOKEN: &[u8] = b"bench";

struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        let mut s = TcpStream::connect(addr).unwrap();
        auth::connect(&mut s, Some(TOKEN), Role::Server).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: BufWriter::new(s),
        }
    }
    fn send(&mut self, m: &Msg) {
        frame::write_frame(&mut self.w, &m.encode()).unwrap();
        self.w.flush().unwrap();
    }
    fn recv(&mut self) -> Msg {
        Msg::decode(&frame::read_frame(&mut self.r).unwrap().unwrap()).unwrap()
    }
}

fn agent(root: &PathBuf) -> AgentHandle {
    let no_fsync = std::env::var_os("NO_FSYNC").is_some();
    let backend = fleetsync_agent::PosixBackend::new(root)
        .unwrap()
        .with_fsync(!no_fsync);
    Agent::new(
        root,
        Some(TOKEN.to_vec()),
        Some(std::sync::Arc::new(backend)),
    )
    .unwrap()
    .serve(TcpListener::bind("127.0.0.1:0").unwrap())
    .unwrap()
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    assert!(args.len() >= 2, "usage: transfer_bench MASTER REMOTE...");
    let master = agent(&args[0]);
    let remotes: Vec<AgentHandle> = args[1..].iter().map(agent).collect();
    let t0 = Instant::now();
    let mut m = Conn::new(master.local_addr());
    m.send(&Msg::ListRequest {
        request_id: 1,
        classification: Default::default(),
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    });
    let mut entries = Vec::new();
    loop {
        match m.recv() {
            Msg::ListBatch {
                entries: e, last, ..
            } => {
                entries.extend(e);
                if last {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    let listed = t0.elapsed();
    let dirs: Vec<Op> = entries
        .iter()
        .filter(|e| e.kind == FileKind::Dir && !e.path.is_empty())
        .map(|e| Op {
            path: e.path.clone(),
            kind: OpKind::Mkdir(Attrs {
                mode: Some(e.mode),
                owner: None,
                mtime: Some((e.mtime_sec, e.mtime_nsec)),
            }),
        })
        .collect();
    let files: Vec<Vec<u8>> = entries
        .iter()
        .filter(|e| e.kind == FileKind::File)
        .map(|e| e.path.clone())
        .collect();
    let bytes: u64 = entries
        .iter()
        .filter(|e| e.kind == FileKind::File)
        .map(|e| e.size)
        .sum();
    let mut rconns: Vec<Conn> = remotes.iter().map(|r| Conn::new(r.local_addr())).collect();
    if std::env::var_os("CHECKSUM_ONLY").is_some() {
        // No-change re-sync: every tree checksums every file, all at once.
        let alg = std::env::var("ALG").unwrap_or_else(|_| "crc32".into());
        let t1 = Instant::now();
        let mut all: Vec<&mut Conn> = vec![&mut m];
        all.extend(rconns.iter_mut());
        for c in all.iter_mut() {
            c.send(&Msg::ChecksumRequest {
                request_id: 3,
                algorithm: alg.clone(),
                paths: files.clone(),
                fresh: false,
            });
        }
        let mut errors = 0;
        for c in all.iter_mut() {
            loop {
                match c.recv() {
                    Msg::ChecksumReply { results, last, .. } => {
                        errors += results.iter().filter(|r| r.digest.is_err()).count();
                        if last {
                            break;
                        }
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        println!(
            "checksums of {} files x {} trees: {:.2?} (list {:.2?}), errors {errors}",
            files.len(),
            remotes.len() + 1,
            t1.elapsed(),
            listed
        );
        return;
    }
    for c in &mut rconns {
        c.send(&Msg::ApplyRequest {
            request_id: 2,
            ops: dirs.clone(),
        });
    }
    for c in &mut rconns {
        while !matches!(c.recv(), Msg::Done(_)) {}
    }
    for (i, r) in remotes.iter().enumerate() {
        m.send(&Msg::SendOrder {
            request_id: 10 + i as u64,
            target: r.local_addr().to_string(),
            algorithm: "crc32".into(),
            paths: files.clone(),
            lock_timeout_ms: None,
            stage: String::new(),
            transfer: Default::default(),
            bases: Vec::new(),
            sizes: Vec::new(),
            ticket: Vec::new(),
            relays: Vec::new(),
        });
    }
    let mut left = remotes.len();
    let mut failed = 0;
    while left > 0 {
        match m.recv() {
            Msg::Done(d) => {
                failed += d.failed;
                left -= 1;
            }
            Msg::ItemResults { .. } | Msg::Progress(_) => {}
            other => panic!("{other:?}"),
        }
    }
    let total = t0.elapsed();
    println!(
        "{} files, {} MiB, {} remotes: list {:.2?}, total {:.2?}, failed {failed}",
        files.len(),
        bytes >> 20,
        remotes.len(),
        listed,
        total
    );
}
