//! Every message survives encode -> frame -> decode unchanged.

use fleetsync_proto::frame::{self, FrameDecoder};
use fleetsync_proto::*;

fn entry(path: &[u8]) -> FileEntry {
    FileEntry {
        path: path.to_vec(),
        kind: FileKind::Symlink,
        mode: 0o777,
        uid: 1000,
        gid: 100,
        inode: 123456789,
        dev: 2049,
        nlink: 1,
        size: 7,
        mtime_sec: -5,
        mtime_nsec: 999_999_999,
        link_target: Some(b"\xff target".to_vec()),
        rdev: 0,
        digest: None,
    }
}

fn all_messages() -> Vec<Msg> {
    let attrs = Attrs {
        mode: Some(0o644),
        owner: Some((1, 2)),
        mtime: Some((1_700_000_000, 5)),
    };
    let class = ClassificationSpec {
        rules: vec![FilterRule {
            exclude: true,
            pattern: "*.o".into(),
        }],
        select: Some(Selector::And(vec![
            Selector::Ext("rs".into()),
            Selector::Not(Box::new(Selector::Or(vec![
                Selector::Name("x*".into()),
                Selector::Path("a/**".into()),
                Selector::All,
            ]))),
        ])),
    };
    vec![
        Msg::Hello {
            protocol: 1,
            nonce: vec![1; 32],
        },
        Msg::Auth {
            protocol: 1,
            role: Role::Server,
            mac: vec![2; 32],
            nonce: vec![3; 32],
            frame_compression: true,
        },
        Msg::Welcome {
            mac: vec![4; 32],
            can_chown: true,
            frame_compression: true,
            tree: TreeIdentity {
                host: "0123abcd".into(),
                chain: vec![(64769, 1234), (64769, 2)],
            },
        },
        Msg::ListRequest {
            request_id: 1,
            classification: class.clone(),
            batch_size: 10,
            sweep_partials: true,
            cached_digests: "sha256".into(),
        },
        Msg::ListRequest {
            request_id: 1,
            classification: ClassificationSpec::default(),
            batch_size: 0,
            sweep_partials: false,
            cached_digests: String::new(),
        },
        Msg::ListBatch {
            request_id: 1,
            entries: vec![
                entry(b"a/b\n c\xfe"),
                FileEntry {
                    link_target: None,
                    kind: FileKind::BlockDevice,
                    rdev: 77,
                    ..entry(b"")
                },
                FileEntry {
                    link_target: None,
                    kind: FileKind::File,
                    digest: Some(vec![0xde, 0xad, 0, 1]),
                    ..entry(b"f")
                },
            ],
            last: true,
        },
        Msg::ChecksumRequest {
            request_id: 2,
            algorithm: "crc32".into(),
            paths: vec![b"x".to_vec(), b"\x80".to_vec()],
            fresh: true,
        },
        Msg::ChecksumReply {
            request_id: 2,
            results: vec![
                ChecksumResult {
                    path: b"x".to_vec(),
                    size: 3,
                    digest: Ok(vec![1, 2, 3, 4]),
                },
                ChecksumResult {
                    path: b"y".to_vec(),
                    size: 0,
                    digest: Err("gone".into()),
                },
            ],
            last: false,
        },
        Msg::SendOrder {
            request_id: 3,
            target: "127.0.0.1:1".into(),
            algorithm: "crc32".into(),
            paths: vec![b"p".to_vec(), b"q".to_vec()],
            lock_timeout_ms: Some(1_500),
            stage: "s-1".into(),
            transfer: TransferOptions {
                compress: "zstd:5".into(),
                bwlimit: 1_250_000,
                master_bwlimit: 12_500_000,
                no_delta: true,
            },
            bases: vec![b"p".to_vec(), Vec::new()],
            sizes: vec![1 << 40, 0],
            ticket: vec![7, 8, 9],
            relays: vec![fleetsync_proto::RelayNode {
                target: "b:2".into(),
                request_id: 9,
                children: vec![fleetsync_proto::RelayNode {
                    target: "c:3".into(),
                    request_id: 10,
                    children: vec![],
                    ticket: vec![4, 5],
                }],
                ticket: Vec::new(),
            }],
        },
        Msg::BasisQuery {
            request_id: 3,
            algorithm: "xxh3".into(),
            items: vec![
                BasisItem {
                    path: b"lib/a-2.so".to_vec(),
                    basis: b"lib/a-1.so".to_vec(),
                    known: vec![Version {
                        size: 9,
                        digest: vec![1, 2],
                    }],
                    signature: true,
                },
                BasisItem::default(),
            ],
        },
        Msg::BasisReply {
            request_id: 3,
            items: vec![BasisFound {
                index: 1,
                basis_size: 99,
                basis_digest: vec![3],
                signature: vec![4; 100],
                partial_size: 5,
                partial_digest: vec![6],
            }],
        },
        Msg::BlockBegin {
            request_id: 9,
            stage: "s-1".into(),
            block: "config".into(),
        },
        Msg::BlockCommit {
            request_id: 10,
            stage: "s-1".into(),
            ops: vec![
                Op {
                    path: b"etc/a.conf".to_vec(),
                    kind: OpKind::Put {
                        attrs: Attrs {
                            mode: Some(0o640),
                            owner: None,
                            mtime: Some((5, 6)),
                        },
                        size: 77,
                    },
                },
                Op {
                    path: b"etc/old".to_vec(),
                    kind: OpKind::Delete { recursive: false },
                },
            ],
            abort: true,
        },
        Msg::ApplyRequest {
            request_id: 4,
            ops: vec![
                Op {
                    path: b"d".to_vec(),
                    kind: OpKind::Mkdir(attrs),
                },
                Op {
                    path: b"e".to_vec(),
                    kind: OpKind::Delete { recursive: true },
                },
                Op {
                    path: b"f".to_vec(),
                    kind: OpKind::SetAttrs(Attrs::default()),
                },
                Op {
                    path: b"g".to_vec(),
                    kind: OpKind::Symlink {
                        target: b"../t".to_vec(),
                        attrs,
                    },
                },
                Op {
                    path: b"h".to_vec(),
                    kind: OpKind::HardLink {
                        existing: b"f".to_vec(),
                    },
                },
            ],
        },
        Msg::ItemResults {
            request_id: 4,
            results: vec![ItemResult {
                path: b"d".to_vec(),
                outcome: Outcome::Skipped,
                message: "not root".into(),
                bytes: 9,
                digest: vec![0xde, 0xad],
                wire_bytes: 4,
                coding: "patch".into(),
            }],
        },
        Msg::Progress(Progress {
            request_id: 3,
            items: 1,
            bytes: 2,
            total_items: 3,
            total_bytes: 4,
        }),
        Msg::Done(Done {
            request_id: 3,
            ok: 1,
            failed: 2,
            skipped: 3,
        }),
        Msg::FileStart {
            request_id: 3,
            entry: entry(b"f"),
            algorithm: "crc32".into(),
            lock_timeout_ms: Some(0),
            stage: String::new(),
            coding: Coding::Patch,
            basis: b"old".to_vec(),
            basis_size: 77,
        },
        Msg::FileChunk {
            data: vec![7; frame::MAX_CHUNK],
            zstd: true,
        },
        Msg::FileEnd {
            size: 10,
            digest: vec![1],
            aborted: false,
            error: String::new(),
        },
        Msg::StreamEnd,
        Msg::StreamTicket {
            ticket: vec![1, 2, 3],
        },
        Msg::Forward {
            request_id: 12,
            children: vec![fleetsync_proto::RelayNode {
                target: "d:4".into(),
                request_id: 11,
                children: Vec::new(),
                ticket: vec![6],
            }],
        },
        Msg::SyncRequest(SyncRequest {
            master: "m:1".into(),
            remotes: vec!["r:1".into(), "r:2".into()],
            algorithm: "md5".into(),
            delete: true,
            dry_run: true,
            classification: class,
            verify: true,
            lock_timeout_ms: Some(2_000),
            max_rounds: 3,
            lock_resync_ms: Some(2_000),
            blocks: vec![fleetsync_proto::BlockDef {
                name: "config".into(),
                select: "path:etc/**".into(),
                after: vec!["bin".into(), "lib".into()],
            }],
            transfer: TransferOptions {
                compress: "off".into(),
                bwlimit: 1,
                master_bwlimit: 2,
                no_delta: false,
            },
            fanout: 3,
        }),
        Msg::PlanItems(vec![PlanItem {
            remote: 1,
            path: b"z".to_vec(),
            action: Action::HardLink,
            size: 5,
            detail: "why".into(),
        }]),
        Msg::RemoteResult(RemoteResult {
            remote: 1,
            ok: false,
            error: "boom".into(),
            transferred: 1,
            bytes: 2,
            deleted: 3,
            changed: 4,
            failures: vec![Failure {
                path: b"q".to_vec(),
                message: "m".into(),
            }],
            rounds: 3,
            resynced: 5,
            inconsistent: vec![Failure {
                path: b"etc/app.conf".to_vec(),
                message: "modified [recorded-state]".into(),
            }],
            source: "r:2".into(),
            wire_bytes: 6,
        }),
        Msg::ConsistencyRequest {
            request_id: 9,
            algorithm: "crc32".into(),
            files: vec![
                ExpectedFile {
                    path: b"a/b".to_vec(),
                    digest: vec![1, 2, 3, 4],
                    size: 17,
                },
                ExpectedFile::default(),
            ],
        },
        Msg::ConsistencyReply {
            request_id: 9,
            inconsistent: vec![InconsistentFile {
                path: b"a/\xffb".to_vec(),
                check: "recorded-state".into(),
                message: "size changed from 17 to 3".into(),
            }],
            checked: 2,
            last: true,
        },
        Msg::SyncProgress(SyncProgress {
            remote: 0,
            done_files: 1,
            total_files: 2,
            done_bytes: 3,
            total_bytes: 4,
        }),
        Msg::SyncDone {
            ok: true,
            message: "in sync".into(),
        },
        Msg::Error {
            request_id: 0,
            message: "bad".into(),
        },
    ]
}

#[test]
fn every_message_round_trips_through_blocking_frames() {
    let mut wire = Vec::new();
    let msgs = all_messages();
    for m in &msgs {
        frame::write_frame(&mut wire, &m.encode()).unwrap();
    }
    let mut r = &wire[..];
    for m in &msgs {
        let body = frame::read_frame(&mut r).unwrap().unwrap();
        assert_eq!(&Msg::decode(&body).unwrap(), m);
    }
    assert!(frame::read_frame(&mut r).unwrap().is_none());
}

#[test]
fn every_message_round_trips_through_the_decoder_byte_by_byte() {
    let msgs = all_messages();
    let mut wire = Vec::new();
    for m in &msgs {
        wire.extend(m.to_frame().unwrap());
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    // Feed in odd-sized pieces.
    for piece in wire.chunks(4093) {
        dec.push(piece);
        while let Some(body) = dec.next_frame().unwrap() {
            got.push(Msg::decode(&body).unwrap());
        }
    }
    assert_eq!(got, msgs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn list_batch_entries_borrow_without_copies() {
    let e = entry(b"a\xffb");
    let m = Msg::ListBatch {
        request_id: 9,
        entries: vec![e.clone(), e.clone()],
        last: true,
    };
    let f = m.to_frame().unwrap();
    let reader = frame::parse(&f[4..]).unwrap();
    let (id, last, it) = list_batch_entries(&reader).unwrap().unwrap();
    assert_eq!((id, last), (9, true));
    let got: Vec<FileEntry> = it.map(|r| r.unwrap().to_owned()).collect();
    assert_eq!(got, vec![e.clone(), e]);
}

#[test]
fn encode_file_chunk_matches_msg() {
    let data = vec![5u8; 1000];
    for zstd in [false, true] {
        let f = frame::encode_frame(&encode_file_chunk(&data, zstd)).unwrap();
        assert_eq!(
            Msg::decode(&f[4..]).unwrap(),
            Msg::FileChunk {
                data: data.clone(),
                zstd
            }
        );
    }
}

#[test]
fn oversize_prefix_is_rejected_before_allocation() {
    let mut dec = FrameDecoder::new();
    dec.push(&(u32::MAX).to_le_bytes());
    assert!(matches!(
        dec.next_frame(),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    let bytes = (frame::MAX_FRAME as u32 + 1).to_le_bytes();
    assert!(matches!(
        frame::read_frame(&mut &bytes[..]),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn truncated_frame_is_an_error_not_eof() {
    let f = Msg::StreamEnd.to_frame().unwrap();
    let cut = &f[..f.len() - 1];
    assert!(matches!(
        frame::read_frame(&mut &cut[..]),
        Err(ProtoError::Truncated)
    ));
    assert!(matches!(
        frame::read_frame(&mut &f[..2]),
        Err(ProtoError::Truncated)
    ));
}

#[test]
fn oversize_message_is_refused_on_send() {
    let m = Msg::ChecksumRequest {
        request_id: 1,
        algorithm: "crc32".into(),
        paths: vec![vec![0u8; 1024 * 1024]; 17],
        fresh: false,
    };
    assert!(matches!(
        m.to_frame(),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn frame_buf_reads_and_parses_in_place() {
    let msgs = all_messages();
    let mut wire = Vec::new();
    for m in &msgs {
        wire.extend(m.to_frame().unwrap());
    }
    let mut r = &wire[..];
    let mut buf = frame::FrameBuf::new();
    for m in &msgs {
        assert!(buf.read(&mut r, frame::MAX_FRAME).unwrap());
        let reader = buf.parse().unwrap();
        assert_eq!(&Msg::from_reader(reader.get_root().unwrap()).unwrap(), m);
        assert_eq!(&Msg::decode(buf.bytes()).unwrap(), m);
    }
    assert!(!buf.read(&mut r, frame::MAX_FRAME).unwrap());
}

/// A listing batch as an agent sends it: paths with long common prefixes, equal owners.
fn listing(n: usize) -> Msg {
    let entries = (0..n)
        .map(|i| {
            let mut e =
                entry(format!("usr/lib/python3/site-packages/pkg{}/mod{i}.py", i / 50).as_bytes());
            e.kind = FileKind::File;
            e.link_target = None;
            e.size = (i * 37 % 5000) as u64;
            e.inode += i as u64;
            e
        })
        .collect();
    Msg::ListBatch {
        request_id: 9,
        entries,
        last: false,
    }
}

#[test]
fn compressed_frames_come_back_as_the_messages_they_hold_and_small_ones_go_plain() {
    let mut z = frame::FrameCompressor::new().unwrap();
    let big = listing(2000);
    let plain = big.to_frame().unwrap();
    let packed = z.encode_frame(&big.encode()).unwrap();
    eprintln!(
        "listing of 2000: {} bytes plain, {} compressed",
        plain.len(),
        packed.len()
    );
    assert!(
        packed.len() * 4 < plain.len(),
        "{} vs {}",
        packed.len(),
        plain.len()
    );
    // A small message goes as it is (and plain decoding takes it).
    let small = Msg::Done(Done {
        request_id: 3,
        ok: 1,
        ..Done::default()
    });
    let small_frame = z.encode_frame(&small.encode()).unwrap();
    assert_eq!(small_frame, small.to_frame().unwrap());
    // Through a decoder, as the server reads them.
    let mut dec = FrameDecoder::new();
    dec.push(&packed);
    dec.push(&small_frame);
    let body = dec.next_frame().unwrap().unwrap();
    assert!(
        Msg::decode(&body).is_err(),
        "a zstd frame where none was agreed on"
    );
    assert_eq!(Msg::decode_inflating(&body).unwrap(), big);
    let reader = frame::parse(&body).unwrap();
    let inner = frame::inflate(&reader).unwrap().unwrap();
    assert_eq!(Msg::decode(&inner).unwrap(), big);
    let body = dec.next_frame().unwrap().unwrap();
    assert!(frame::inflate(&frame::parse(&body).unwrap())
        .unwrap()
        .is_none());
    assert_eq!(Msg::decode_inflating(&body).unwrap(), small);
}

/// A `zstd` message holding `data`, as a frame body.
fn zstd_body(data: &[u8]) -> Vec<u8> {
    let mut b = capnp::message::Builder::new_default();
    b.init_root::<fleetsync_capnp::message::Builder>()
        .set_zstd(data);
    let f = frame::encode_frame(&b).unwrap();
    f[4..].to_vec()
}

#[test]
fn bad_compressed_frames_are_errors_that_name_what_is_wrong() {
    let msg_body = |m: &Msg| m.to_frame().unwrap()[4..].to_vec();
    let inner = msg_body(&listing(100));
    let err = |body: &[u8]| Msg::decode_inflating(body).unwrap_err().to_string();
    // Nested.
    let once = zstd::bulk::compress(&inner, 1).unwrap();
    let twice = zstd::bulk::compress(&zstd_body(&once), 1).unwrap();
    assert!(
        err(&zstd_body(&twice)).contains("zstd frame where none may be"),
        "{}",
        err(&zstd_body(&twice))
    );
    // Not zstd at all; truncated; no content size; a size over the frame limit.
    assert!(err(&zstd_body(b"not zstd")).contains("not a zstd frame"));
    assert!(err(&zstd_body(&once[..once.len() / 2])).contains("zstd frame"));
    let mut no_size = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    no_size.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut no_size, &inner).unwrap();
    let no_size = no_size.finish().unwrap();
    assert!(err(&zstd_body(&no_size)).contains("no content size"));
    let huge = vec![0u8; frame::MAX_FRAME + 1];
    let bomb = zstd::bulk::compress(&huge, 19).unwrap();
    assert!(bomb.len() < 4096);
    assert!(matches!(
        Msg::decode_inflating(&zstd_body(&bomb)),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}
