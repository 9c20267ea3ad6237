//! A TCP proxy on 127.0.0.1 that damages one byte in transit, for the tests of stream
//! integrity: every connection it accepts is forwarded to a target, and on every connection
//! whose client→target direction carries more than `flip_at` bytes, the byte at offset
//! `flip_at` of that direction is inverted (all 8 bits). The other direction is copied as is.
//!
//! It also counts the bytes each connection carried client→target: what actually crossed
//! the "link", measured outside fleetsync.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

/// A running proxy; stops accepting when dropped (open connections run to their end).
pub struct CorruptingProxy {
    /// Where to connect instead of the target, `127.0.0.1:PORT`.
    pub addr: String,
    flips: Arc<AtomicUsize>,
    carried: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl CorruptingProxy {
    /// Listens on 127.0.0.1:0 and forwards to `target` (`host:port`), inverting the byte
    /// at offset `flip_at` of each connection's client→target direction.
    pub fn start(target: &str, flip_at: u64) -> CorruptingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let flips = Arc::new(AtomicUsize::new(0));
        let carried = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (target, flips, carried, stop) = (
                target.to_owned(),
                flips.clone(),
                carried.clone(),
                stop.clone(),
            );
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(upstream) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let slot = {
                        let mut c = carried.lock().unwrap();
                        c.push(0);
                        c.len() - 1
                    };
                    let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                    let (flips, carried) = (flips.clone(), carried.clone());
                    thread::spawn(move || {
                        pump(client, upstream, Some((flip_at, &flips)), |n| {
                            carried.lock().unwrap()[slot] += n
                        })
                    });
                    thread::spawn(move || pump(u2, c2, None, |_| {}));
                }
            })
        };
        CorruptingProxy {
            addr,
            flips,
            carried,
            stop,
            accept: Some(accept),
        }
    }

    /// How many bytes were inverted so far (one per connection that reached the offset).
    pub fn flips(&self) -> usize {
        self.flips.load(Ordering::SeqCst)
    }

    /// Bytes carried client→target so far, per connection in the order accepted.
    pub fn carried(&self) -> Vec<u64> {
        self.carried.lock().unwrap().clone()
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` to `to` until either ends, inverting the byte at offset `flip.0` (counted
/// in `flip.1`); `count` is told the bytes copied. Ends by half-closing `to` (or closing
/// both on an error), as the peers would see a real link end.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    flip: Option<(u64, &AtomicUsize)>,
    mut count: impl FnMut(u64),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        };
        if let Some((off, flips)) = flip {
            if (at..at + n as u64).contains(&off) {
                buf[(off - at) as usize] ^= 0xff;
                flips.fetch_add(1, Ordering::SeqCst);
            }
        }
        at += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
        count(n as u64);
    }
    let _ = to.shutdown(Shutdown::Write);
}
