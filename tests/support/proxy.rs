//! A TCP proxy on 127.0.0.1 that damages one byte in transit, for the tests of stream
//! integrity: every connection it accepts is forwarded to a target, and on every connection
//! whose client→target direction carries more than `flip_at` bytes, the byte at offset
//! `flip_at` of that direction is inverted (all 8 bits). The other direction is copied as is.
//!
//! Or, made with [`CorruptingProxy::cutting`], it cuts every connection whose client→target
//! direction reaches a given offset, as a link that drops.
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
        Self::with_fault(target, Fault::Flip(flip_at))
    }

    /// Listens on 127.0.0.1:0 and forwards to `target`, closing both sides of each connection
    /// once its client→target direction carried `cut_at` bytes (the bytes before go through).
    pub fn cutting(target: &str, cut_at: u64) -> CorruptingProxy {
        Self::with_fault(target, Fault::Cut(cut_at))
    }

    fn with_fault(target: &str, fault: Fault) -> CorruptingProxy {
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
                        pump(client, upstream, Some((fault, &flips)), |n| {
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

    /// How many faults happened so far: bytes inverted, or connections cut (one per
    /// connection that reached the offset).
    pub fn faults(&self) -> usize {
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

/// What the proxy does to a connection at an offset of its client→target direction.
#[derive(Clone, Copy)]
enum Fault {
    /// Inverts the byte there.
    Flip(u64),
    /// Closes both sides there.
    Cut(u64),
}

/// Copies `from` to `to` until either ends, doing `fault.0` (counted in `fault.1`); `count`
/// is told the bytes copied. Ends by half-closing `to` (or closing both on an error or a
/// cut), as the peers would see a real link end.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    fault: Option<(Fault, &AtomicUsize)>,
    mut count: impl FnMut(u64),
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    loop {
        let mut n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        };
        let mut cut = false;
        match fault {
            Some((Fault::Flip(off), faults)) if (at..at + n as u64).contains(&off) => {
                buf[(off - at) as usize] ^= 0xff;
                faults.fetch_add(1, Ordering::SeqCst);
            }
            Some((Fault::Cut(off), faults)) if at + n as u64 >= off => {
                n = (off - at) as usize;
                cut = true;
                faults.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        at += n as u64;
        let wrote = to.write_all(&buf[..n]).is_ok();
        if wrote {
            count(n as u64);
        }
        if !wrote || cut {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
