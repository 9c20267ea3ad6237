//! Bandwidth limits: a token bucket that streams ask before writing each frame
//! (`--bwlimit RATE` per remote stream, `--master-bwlimit RATE` shared by every
//! stream of the master agent), and the parser of `RATE`.
//!
//! Written by hand: `governor`, the usual crate, has no blocking wait (only an
//! async `until_ready`) and refuses a request larger than its burst, while a
//! frame here is up to 1 MiB and the burst must stay a few tens of milliseconds
//! of the rate to keep the 1 s average within 10%.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How far ahead of the rate a sender may be: this much of the rate's time.
/// Whatever the frame size, the bytes let through by any time `t` after the
/// start are at most `rate * (t + BURST)`; 20 ms keeps a 1 s average within 2%.
const BURST: Duration = Duration::from_millis(20);

/// The smallest burst in bytes, so that a very low rate still lets a small
/// frame through without a wait per frame.
const MIN_BURST_BYTES: f64 = 4096.0;

/// A shared byte-rate limit: every [`take`](RateLimiter::take) of every thread
/// draws on the same budget, so two streams sharing one limiter get the rate
/// between them.
///
/// How it works: the bytes granted so far are a running total (`granted`), and
/// the bytes the rate has "paid for" grow at the rate (`paid`, never more than
/// `granted`: idle time is not saved up). A `take(n)` adds `n` to `granted` and
/// waits until `paid` reaches its new total minus the burst. Takes are served
/// in the order they arrive; a frame larger than the burst is let through once
/// all but the burst of it is paid for, so the sender runs at most the burst
/// ahead of the rate however large its frames are.
pub(crate) struct RateLimiter {
    state: Mutex<State>,
    /// Signalled when the rate changes, so that waiters recompute their wait.
    changed: Condvar,
}

struct State {
    /// Bytes per second; 0: unlimited.
    rate: u64,
    granted: f64,
    paid: f64,
    /// When `paid` was last brought up to date.
    at: Instant,
}

impl State {
    /// Brings `paid` up to `now` at the current rate.
    fn catch_up(&mut self, now: Instant) {
        if self.rate == 0 {
            self.paid = self.granted;
        } else {
            let dt = now.saturating_duration_since(self.at).as_secs_f64();
            self.paid = (self.paid + dt * self.rate as f64).min(self.granted);
        }
        self.at = now;
    }

    fn burst(&self) -> f64 {
        (self.rate as f64 * BURST.as_secs_f64()).max(MIN_BURST_BYTES)
    }
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec` (0: unlimited).
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            state: Mutex::new(State {
                rate: bytes_per_sec,
                granted: 0.0,
                paid: 0.0,
                at: Instant::now(),
            }),
            changed: Condvar::new(),
        }
    }

    /// Changes the rate (0: unlimited); takes waiting now continue at the new rate.
    #[cfg(test)]
    pub(crate) fn set_rate(&self, bytes_per_sec: u64) {
        let mut st = self.state.lock().expect("poisoned");
        st.catch_up(Instant::now());
        st.rate = bytes_per_sec;
        drop(st);
        self.changed.notify_all();
    }

    /// The rate in bytes per second (0: unlimited).
    #[cfg(test)]
    pub(crate) fn rate(&self) -> u64 {
        self.state.lock().expect("poisoned").rate
    }

    /// Blocks until `n` bytes may be sent (call before writing each frame, `n`
    /// up to 1 MiB and more); returns at once when unlimited.
    pub(crate) fn take(&self, n: usize) {
        let mut st = self.state.lock().expect("poisoned");
        if st.rate == 0 {
            return;
        }
        st.catch_up(Instant::now());
        st.granted += n as f64;
        let ticket = st.granted;
        loop {
            st.catch_up(Instant::now());
            if st.rate == 0 {
                return;
            }
            let short = ticket - st.burst() - st.paid;
            if short <= 0.0 {
                return;
            }
            let wait = Duration::from_secs_f64(short / st.rate as f64);
            st = self.changed.wait_timeout(st, wait).expect("poisoned").0;
        }
    }
}

/// Parses a rate as `--bwlimit` takes it into bytes per second (`0`: unlimited).
///
/// A number (a fraction is fine), then an optional unit, then optionally `/s`:
/// - no unit, or `B`: bytes per second;
/// - `K`, `M`, `G`, `T` (either case) with or without `B`: decimal multiples of
///   bytes (`100M` = `100MB` = 100,000,000 bytes/s);
/// - `KiB`, `MiB`, `GiB`, `TiB` (or `Ki`, `Mi`, ...): binary multiples of bytes
///   (`1MiB` = 1,048,576 bytes/s);
/// - `bit`, `kbit`, `mbit`, `gbit`, `tbit` (any case; `bits` too): decimal
///   multiples of bits, as `tc` writes link rates (`100mbit` = 12,500,000 bytes/s);
///   `kibit`, `mibit`, ...: binary multiples of bits.
///
/// A lowercase `b` alone (`10mb`, `10Mbps`) is refused as ambiguous: write
/// `mbit` for bits or `MB` for bytes.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("bad rate {s:?}: {why}");
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("expected a number, e.g. 10mbit, 100M, 1.5MB/s, 500k"));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| bad(&format!("{num:?} is not a number")))?;
    let unit = unit.trim_start();
    let (prefix, rest) = match unit.chars().next() {
        Some(c) if "kKmMgGtT".contains(c) => (Some(c.to_ascii_lowercase()), &unit[1..]),
        _ => (None, unit),
    };
    let (binary, rest) = match (prefix, rest.strip_prefix('i')) {
        (Some(_), Some(r)) => (true, r),
        _ => (false, rest),
    };
    let bits =
        match rest {
            "" | "B" => false,
            r if r.eq_ignore_ascii_case("bit") || r.eq_ignore_ascii_case("bits") => true,
            "b" | "bps" | "Bps" => return Err(bad(
                "'b' is ambiguous: write 'bit' (e.g. 10mbit) for bits or 'B' (e.g. 10MB) for bytes",
            )),
            _ => {
                return Err(bad(&format!(
                    "unknown unit {unit:?} (use B, K, M, G, KiB, MiB, GiB, kbit, mbit, gbit)"
                )))
            }
        };
    let power = match prefix {
        None => 0,
        Some('k') => 1,
        Some('m') => 2,
        Some('g') => 3,
        _ => 4,
    };
    let base: f64 = if binary { 1024.0 } else { 1000.0 };
    let mut bytes = value * base.powi(power);
    if bits {
        bytes /= 8.0;
    }
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    let rounded = bytes.round() as u64;
    if rounded == 0 && value > 0.0 {
        return Err(bad("below 1 byte per second (use 0 for no limit)"));
    }
    Ok(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parses_bit_and_byte_units() {
        // Reference values: tc(8) "mbit" = 10^6 bits/s; SI and IEC prefixes.
        let cases: &[(&str, u64)] = &[
            ("10mbit", 1_250_000),
            ("100mbit", 12_500_000),
            ("1Gbit", 125_000_000),
            ("1gbit/s", 125_000_000),
            ("8bit", 1),
            ("800kbits", 100_000),
            ("1mibit", 131_072),
            ("100M", 100_000_000),
            ("100m", 100_000_000),
            ("1.5MB/s", 1_500_000),
            ("500k", 500_000),
            ("500 kB", 500_000),
            ("2KiB", 2048),
            ("1MiB/s", 1_048_576),
            ("1.5Mi", 1_572_864),
            ("1GiB", 1_073_741_824),
            ("1234", 1234),
            ("1234B", 1234),
            ("0", 0),
            (" 3T ", 3_000_000_000_000),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_rates_are_named_in_the_error() {
        for s in [
            "",
            "fast",
            "10mb",
            "10Mbps",
            "10 parsecs",
            "1.2.3M",
            "-5M",
            "1bit",
            "1e3",
        ] {
            let e = parse_rate(s).expect_err(s);
            assert!(e.contains(&format!("{s:?}")), "{s}: {e}");
        }
        assert!(parse_rate("10mb").unwrap_err().contains("ambiguous"));
    }

    #[test]
    fn unlimited_never_waits() {
        let l = RateLimiter::new(0);
        let t = Instant::now();
        for _ in 0..1000 {
            l.take(1 << 20);
        }
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn big_takes_keep_the_rate() {
        // 4 MiB in 1 MiB takes at 8 MiB/s: 0.5 s less the 20 ms burst.
        let l = RateLimiter::new(8 << 20);
        let t = Instant::now();
        for _ in 0..4 {
            l.take(1 << 20);
        }
        let s = t.elapsed().as_secs_f64();
        assert!((0.45..0.6).contains(&s), "{s} s");
    }

    #[test]
    fn two_threads_share_the_rate() {
        // 2 x 2 MiB in 64 KiB takes sharing 8 MiB/s: 0.5 s in all, not 0.25 s.
        let l = Arc::new(RateLimiter::new(8 << 20));
        let t = Instant::now();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..32 {
                        l.take(64 << 10);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        assert!((0.45..0.6).contains(&s), "{s} s");
    }

    #[test]
    fn a_new_rate_applies_to_a_waiting_take() {
        // 1 MiB at 1 KiB/s would wait ~17 min; raised to unlimited, it goes at once.
        let l = Arc::new(RateLimiter::new(1024));
        let l2 = l.clone();
        let t = Instant::now();
        let th = std::thread::spawn(move || l2.take(1 << 20));
        std::thread::sleep(Duration::from_millis(50));
        l.set_rate(0);
        th.join().unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(l.rate(), 0);
    }

    #[test]
    fn idle_time_is_not_saved_up() {
        let l = RateLimiter::new(8 << 20);
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        for _ in 0..2 {
            l.take(1 << 20);
        }
        // 2 MiB at 8 MiB/s: 0.25 s less the burst, whatever the idle time before.
        let s = t.elapsed().as_secs_f64();
        assert!((0.2..0.35).contains(&s), "{s} s");
    }
}
