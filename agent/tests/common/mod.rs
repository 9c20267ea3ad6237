//! A minimal blocking client standing in for the server.
#![allow(dead_code)]

use std::io::{BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use fleetsync_agent::{Agent, AgentHandle};
use fleetsync_proto::{auth, frame, ChecksumResult, FileEntry, ItemResult, Msg, Op, Role};

pub const TOKEN: &[u8] = b"test-token";

pub fn start_agent(root: &Path) -> AgentHandle {
    let agent = Agent::new(root, Some(TOKEN.to_vec()), None).unwrap();
    agent
        .serve(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap()
}

pub struct Client {
    pub r: BufReader<TcpStream>,
    pub w: BufWriter<TcpStream>,
    next_id: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr, role: Role) -> Client {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        auth::connect(&mut s, Some(TOKEN), role).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: BufWriter::new(s),
            next_id: 1,
        }
    }

    pub fn send(&mut self, m: &Msg) {
        frame::write_frame(&mut self.w, &m.encode()).unwrap();
        self.w.flush().unwrap();
    }

    pub fn recv(&mut self) -> Option<Msg> {
        frame::read_frame(&mut self.r)
            .unwrap()
            .map(|b| Msg::decode(&b).unwrap())
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn list(&mut self) -> Vec<FileEntry> {
        self.list_with_digests("")
    }

    /// The listing, each regular file with the digest in `algorithm` that the agent's
    /// checksum cache holds for it (empty: none).
    pub fn list_with_digests(&mut self, algorithm: &str) -> Vec<FileEntry> {
        let request_id = self.id();
        self.send(&Msg::ListRequest {
            request_id,
            classification: Default::default(),
            batch_size: 3,
            sweep_partials: false,
            cached_digests: algorithm.into(),
        });
        let mut all = Vec::new();
        loop {
            match self.recv().expect("list reply") {
                Msg::ListBatch { entries, last, .. } => {
                    all.extend(entries);
                    if last {
                        return all;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    pub fn checksums(&mut self, paths: &[&[u8]]) -> Vec<ChecksumResult> {
        let request_id = self.id();
        self.send(&Msg::ChecksumRequest {
            request_id,
            algorithm: "crc32".into(),
            paths: paths.iter().map(|p| p.to_vec()).collect(),
            fresh: false,
        });
        let mut all = Vec::new();
        loop {
            match self.recv().expect("checksum reply") {
                Msg::ChecksumReply { results, last, .. } => {
                    all.extend(results);
                    if last {
                        return all;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Sends a request answered by itemResults* + done; returns the results.
    pub fn items(&mut self, m: Msg) -> Vec<ItemResult> {
        self.send(&m);
        let mut all = Vec::new();
        loop {
            match self.recv().expect("reply") {
                Msg::ItemResults { results, .. } => all.extend(results),
                Msg::Progress(_) => {}
                Msg::Done(_) => return all,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    pub fn apply(&mut self, ops: Vec<Op>) -> Vec<ItemResult> {
        let request_id = self.id();
        self.items(Msg::ApplyRequest { request_id, ops })
    }

    pub fn send_order(&mut self, target: SocketAddr, paths: &[&[u8]]) -> Vec<ItemResult> {
        let request_id = self.id();
        self.items(Msg::SendOrder {
            request_id,
            target: target.to_string(),
            algorithm: "crc32".into(),
            paths: paths.iter().map(|p| p.to_vec()).collect(),
            lock_timeout_ms: None,
            stage: String::new(),
            transfer: Default::default(),
            bases: Vec::new(),
            sizes: Vec::new(),
            ticket: Vec::new(),
            relays: Vec::new(),
        })
    }
}
