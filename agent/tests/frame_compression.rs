//! Compressed frames between server and agent: an agent agrees to them only when asked, then
//! sends its big frames (a file list) compressed, and takes compressed requests.

mod common;

use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::time::Duration;

use fleetsync_proto::{auth, frame, FileKind, Msg, Role};

/// Connects as the server, asking for compressed frames or not: whether the agent agreed,
/// and the connection.
fn connect(addr: std::net::SocketAddr, ask: bool) -> (bool, BufReader<TcpStream>, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let welcomed = auth::connect_with(&mut s, Some(common::TOKEN), Role::Server, ask).unwrap();
    (
        welcomed.frame_compression,
        BufReader::new(s.try_clone().unwrap()),
        s,
    )
}

fn list_request(request_id: u64) -> Msg {
    Msg::ListRequest {
        request_id,
        classification: Default::default(),
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    }
}

/// The listing's batches as raw frame bodies.
fn batches(r: &mut BufReader<TcpStream>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let body = frame::read_frame(r).unwrap().expect("a batch");
        let last = match Msg::decode_inflating(&body).unwrap() {
            Msg::ListBatch { last, .. } => last,
            other => panic!("unexpected {other:?}"),
        };
        out.push(body);
        if last {
            return out;
        }
    }
}

#[test]
fn an_agent_asked_for_compressed_frames_lists_in_them_and_takes_compressed_requests() {
    let dir = tempfile::tempdir().unwrap();
    for d in 0..20 {
        let sub = dir.path().join(format!("lib/python3/site-packages/pkg{d}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..50 {
            std::fs::write(sub.join(format!("module_{f}.py")), format!("{d} {f}")).unwrap();
        }
    }
    let agent = common::start_agent(dir.path());

    // Not asked: plain frames only.
    let (agreed, mut r, mut w) = connect(agent.local_addr(), false);
    assert!(!agreed);
    frame::write_frame(&mut w, &list_request(1).encode()).unwrap();
    let plain = batches(&mut r);
    for b in &plain {
        assert!(frame::inflate(&frame::parse(b).unwrap()).unwrap().is_none());
    }
    let plain_bytes: usize = plain.iter().map(Vec::len).sum();

    // Asked: the agent agrees, its list comes compressed, and the same.
    let (agreed, mut r, w) = connect(agent.local_addr(), true);
    assert!(agreed, "the agent did not agree to compressed frames");
    // The request itself goes compressed too (big enough with a long classification).
    let mut z = frame::FrameCompressor::new().unwrap();
    let mut req = list_request(2);
    if let Msg::ListRequest { classification, .. } = &mut req {
        classification.rules = (0..200)
            .map(|i| fleetsync_proto::FilterRule {
                exclude: true,
                pattern: format!("never-matches-{i}/**"),
            })
            .collect();
    }
    let mut w = BufWriter::new(w);
    let packed_request = z.encode_frame(&req.encode()).unwrap();
    assert!(frame::inflate(&frame::parse(&packed_request[4..]).unwrap())
        .unwrap()
        .is_some());
    w.write_all(&packed_request).unwrap();
    w.flush().unwrap();
    let packed = batches(&mut r);
    let packed_bytes: usize = packed.iter().map(Vec::len).sum();
    assert!(
        packed
            .iter()
            .any(|b| frame::inflate(&frame::parse(b).unwrap()).unwrap().is_some()),
        "no batch came compressed"
    );
    let entries = |bodies: &[Vec<u8>]| -> Vec<_> {
        bodies
            .iter()
            .flat_map(|b| match Msg::decode_inflating(b).unwrap() {
                Msg::ListBatch { entries, .. } => entries,
                _ => unreachable!(),
            })
            .collect()
    };
    let (a, b) = (entries(&plain), entries(&packed));
    assert_eq!(a, b);
    assert_eq!(a.iter().filter(|e| e.kind == FileKind::File).count(), 1000);
    eprintln!(
        "listing of {} entries: {plain_bytes} bytes plain, {packed_bytes} compressed",
        a.len()
    );
    assert!(
        packed_bytes * 3 < plain_bytes,
        "{packed_bytes} vs {plain_bytes}"
    );
    agent.stop();
}
