//! Chunk compression of the file stream: each `fileChunk` (≤ 1 MiB) is coded alone as one
//! zstd frame, so that a receiver decodes every chunk on its own (no stream state to lose)
//! and the sender may switch level or go raw between any two chunks.
//!
//! Two things keep compression from costing more than it saves:
//! - **Incompressible data goes raw**: a frame larger than 97% of its chunk is dropped and the
//!   chunk sent as is; after a few such chunks in a row within a file, only every 16th chunk of
//!   that file is tried again (media, archives and packed binaries stay cheap).
//! - **`auto` follows the bottleneck**: compression pays only when the socket is what the
//!   sender waits for. The stream reports after each frame written how long the write blocked
//!   ([`ChunkCoder::observe_write`]); over windows of 4 MiB the coder compares that with the
//!   time it spent compressing and with the wall time per byte it achieved at the neighbouring
//!   levels, and climbs or descends the ladder raw → 1 → 3 → 6 → 9 → 12 → 15 → 19. A sender
//!   whose writes do not block (loopback, a fast link) never leaves raw.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use fleetsync_proto::frame::MAX_CHUNK;
use tracing::debug;
use zstd::bulk::{Compressor, Decompressor};
use zstd::zstd_safe;

/// The level `zstd` alone stands for (zstd's own default).
const DEFAULT_LEVEL: i32 = 3;
/// Highest level accepted in `zstd:N`.
const MAX_LEVEL: i32 = 19;

/// How a stream compresses its chunks (`--compress auto|off|zstd[:LEVEL]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Never compress.
    Off,
    /// Compress when the link is the bottleneck, at a level adapted to it.
    #[default]
    Auto,
    /// Always compress at this zstd level (1..=19), incompressible chunks excepted.
    Level(i32),
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(Self::Auto),
            "off" => return Ok(Self::Off),
            "zstd" => return Ok(Self::Level(DEFAULT_LEVEL)),
            _ => {}
        }
        let bad = || {
            format!(
                "invalid compression {s:?}: expected auto, off, zstd or zstd:LEVEL \
                 with LEVEL in 1..={MAX_LEVEL}"
            )
        };
        let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
        match level.parse::<i32>() {
            Ok(n) if (1..=MAX_LEVEL).contains(&n) => Ok(Self::Level(n)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Compression {
    /// The text [`FromStr`] reads back: `auto`, `off`, `zstd:N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Auto => f.write_str("auto"),
            Self::Level(n) => write!(f, "zstd:{n}"),
        }
    }
}

/// A frame larger than this share of its chunk (in percent) is not worth sending.
const KEEP_PERCENT: usize = 97;
/// After this many incompressible chunks in a row within a file...
const INCOMPRESSIBLE_RUN: u32 = 4;
/// ...only every this many-th chunk of the file is tried again.
const PROBE_EVERY: u32 = 16;

/// Levels `auto` moves between; index 0 is raw.
const LADDER: [i32; 8] = [0, 1, 3, 6, 9, 12, 15, 19];
/// Raw bytes per evaluation window of `auto`.
const WINDOW: u64 = 4 << 20;
/// A window is link-bound when writes blocked at least this share of its wall time...
const LINK_BOUND: f64 = 0.2;
/// ...and CPU-bound when they blocked less than this share (in between: stay).
const CPU_BOUND: f64 = 0.05;
/// Going up a level needs the current compression (plus everything else the sender does) to
/// stay below this share of the wall time: the next level costs roughly twice as much and
/// must still leave the link the bottleneck.
const ROOM_TO_CLIMB: f64 = 0.45;
/// A level measured within this many windows is known; older figures are probed again.
const FRESH_WINDOWS: u64 = 8;
/// A neighbour must be this much faster (wall time per byte) to be moved to.
const BETTER: f64 = 0.95;

/// Codes the chunks of one stream, file after file; reuses one zstd context and buffer.
pub(crate) struct ChunkCoder {
    mode: Compression,
    /// Created on first use (`None` also when zstd could not allocate one: then raw).
    compressor: Option<Compressor<'static>>,
    /// The level `compressor` is set to (0: not set yet).
    compressor_level: i32,
    out: Vec<u8>,
    /// Incompressible chunks in a row in the current file.
    incompressible: u32,
    /// Chunks passed over since the run of incompressible chunks began.
    skipped: u32,
    adapt: Adapt,
}

impl ChunkCoder {
    /// A coder for `c` (a `Level` outside 1..=19 is clamped).
    pub(crate) fn new(c: Compression) -> Self {
        let mode = match c {
            Compression::Level(n) => Compression::Level(n.clamp(1, MAX_LEVEL)),
            other => other,
        };
        Self {
            mode,
            compressor: None,
            compressor_level: 0,
            out: Vec::new(),
            incompressible: 0,
            skipped: 0,
            adapt: Adapt::new(),
        }
    }

    /// New file: reset per-file state (incompressibility detection).
    pub(crate) fn start_file(&mut self) {
        self.incompressible = 0;
        self.skipped = 0;
    }

    /// Codes one chunk: `Some(zstd frame)` to send instead of raw, `None` = send `raw` as is.
    pub(crate) fn encode(&mut self, raw: &[u8]) -> Option<&[u8]> {
        let level = self.level();
        if self.mode == Compression::Auto {
            self.adapt.take(raw.len());
        }
        if level == 0 || raw.is_empty() {
            return None;
        }
        if self.incompressible >= INCOMPRESSIBLE_RUN {
            self.skipped += 1;
            if !self.skipped.is_multiple_of(PROBE_EVERY) {
                return None;
            }
        }
        let started = Instant::now();
        let n = self.compress(raw, level);
        self.adapt.comp += started.elapsed();
        match n {
            Some(n) if n * 100 <= raw.len() * KEEP_PERCENT => {
                self.incompressible = 0;
                self.skipped = 0;
                Some(&self.out[..n])
            }
            _ => {
                self.incompressible += 1;
                None
            }
        }
    }

    /// Compresses `raw` at `level` into `self.out`; its length, or `None` if zstd failed.
    fn compress(&mut self, raw: &[u8], level: i32) -> Option<usize> {
        if self.compressor.is_none() {
            let mut c = Compressor::default();
            // A checksum per frame (4 bytes per MiB) names a corrupted chunk where it is
            // received, before the file's digest does.
            c.set_parameter(zstd_safe::CParameter::ChecksumFlag(true))
                .ok()?;
            self.compressor = Some(c);
        }
        let c = self.compressor.as_mut()?;
        if self.compressor_level != level {
            c.set_parameter(zstd_safe::CParameter::CompressionLevel(level))
                .ok()?;
            self.compressor_level = level;
        }
        let bound = zstd_safe::compress_bound(raw.len().max(MAX_CHUNK));
        if self.out.capacity() < bound {
            self.out.reserve_exact(bound - self.out.len());
        }
        self.out.clear();
        c.compress_to_buffer(raw, &mut self.out).ok()
    }

    /// Feedback after writing a frame to the socket: wire bytes and how long the write blocked.
    pub(crate) fn observe_write(&mut self, wire_bytes: usize, blocked: Duration) {
        if self.mode == Compression::Auto {
            self.adapt.observe(wire_bytes, blocked);
        }
    }

    /// Current level (0 = not compressing), for reports.
    pub(crate) fn level(&self) -> i32 {
        match self.mode {
            Compression::Off => 0,
            Compression::Level(n) => n,
            Compression::Auto => LADDER[self.adapt.step],
        }
    }
}

/// The state of `auto`: hill climbing on wall time per raw byte, gated by whether the
/// writes block.
struct Adapt {
    /// Index into [`LADDER`].
    step: usize,
    /// When the current window's first chunk was taken (`None`: no chunk yet).
    started: Option<Instant>,
    raw: u64,
    wire: u64,
    comp: Duration,
    blocked: Duration,
    /// Windows evaluated so far.
    windows: u64,
    /// Per ladder step: the wall time per raw byte last measured there, and in which window.
    seen: [Option<(f64, u64)>; LADDER.len()],
}

impl Adapt {
    fn new() -> Self {
        Self {
            step: 0,
            started: None,
            raw: 0,
            wire: 0,
            comp: Duration::ZERO,
            blocked: Duration::ZERO,
            windows: 0,
            seen: [None; LADDER.len()],
        }
    }

    /// A chunk of `n` raw bytes enters the window.
    fn take(&mut self, n: usize) {
        self.started.get_or_insert_with(Instant::now);
        self.raw += n as u64;
    }

    /// A frame was written; closes the window once it holds [`WINDOW`] raw bytes.
    fn observe(&mut self, wire_bytes: usize, blocked: Duration) {
        self.wire += wire_bytes as u64;
        self.blocked += blocked;
        if self.raw >= WINDOW {
            let elapsed = self.started.map_or(Duration::ZERO, |s| s.elapsed());
            self.close_window(elapsed);
        }
    }

    /// Evaluates the window that took `elapsed` and moves on the ladder.
    fn close_window(&mut self, elapsed: Duration) {
        // Compressing and blocking are disjoint parts of the window, so their sum never
        // exceeds the wall time in a real stream; the max keeps simulated feedback coherent.
        let wall = elapsed.max(self.comp + self.blocked).as_secs_f64();
        let comp = self.comp.as_secs_f64();
        let blocked = self.blocked.as_secs_f64();
        let per_byte = wall / self.raw as f64;
        let link_bound = blocked >= LINK_BOUND * wall;
        self.windows += 1;
        let now = self.windows;
        let k = self.step;
        self.seen[k] = Some((per_byte, now));
        let fresh = |s: Option<(f64, u64)>| s.filter(|&(_, at)| now - at <= FRESH_WINDOWS);
        let down = k.checked_sub(1).and_then(|d| fresh(self.seen[d]));
        let up = self.seen.get(k + 1).and_then(|&s| fresh(s));
        let next = if k == 0 {
            // Raw: compressing can only help if the sender waits for the socket; a recent
            // try at level 1 that was not faster is not repeated until it is stale.
            let tried_worse = up.is_some_and(|(t, _)| t * BETTER >= per_byte);
            if link_bound && !tried_worse {
                1
            } else {
                0
            }
        } else if down.is_some_and(|(t, _)| t < per_byte * BETTER) {
            // The level below was faster: this one costs more CPU than it saves on the link.
            k - 1
        } else if blocked < CPU_BOUND * wall {
            // The sender hardly waits for the socket: compressing less is faster.
            k - 1
        } else if link_bound {
            let other = (wall - comp - blocked).max(0.0);
            let room = (other + comp) < ROOM_TO_CLIMB * wall;
            let up_worse = up.is_some_and(|(t, _)| t * BETTER >= per_byte);
            if room && !up_worse && k + 1 < LADDER.len() {
                k + 1
            } else {
                k
            }
        } else {
            k
        };
        debug!(
            "compression window: {} raw -> {} wire bytes in {wall:.3}s (compress {comp:.3}s, \
             blocked {blocked:.3}s): level {} -> {}",
            self.raw, self.wire, LADDER[k], LADDER[next]
        );
        self.step = next;
        self.started = None;
        self.raw = 0;
        self.wire = 0;
        self.comp = Duration::ZERO;
        self.blocked = Duration::ZERO;
    }
}

/// Decodes the chunks of one stream; reuses one zstd context and buffer.
pub(crate) struct ChunkDecoder {
    decompressor: Decompressor<'static>,
    buf: Vec<u8>,
}

impl ChunkDecoder {
    /// A decoder with no buffer yet (it grows to the largest `max_out` asked).
    pub(crate) fn new() -> Self {
        Self {
            decompressor: Decompressor::default(),
            buf: Vec::new(),
        }
    }

    /// Decodes one chunk's frame into at most `max_out` bytes; an error names what is wrong
    /// with the frame (corrupt, or larger than `max_out`).
    pub(crate) fn decode(&mut self, frame: &[u8], max_out: usize) -> Result<&[u8], String> {
        if frame.is_empty() {
            // zstd reads no frame at all as no data; a coder never sends that.
            return Err("bad compressed chunk: empty".to_owned());
        }
        if self.buf.len() < max_out {
            self.buf.resize(max_out, 0);
        }
        let n = self
            .decompressor
            .decompress_to_buffer(frame, &mut self.buf[..max_out])
            .map_err(|e| {
                format!(
                    "bad compressed chunk ({} bytes, at most {max_out} expected): {e}",
                    frame.len()
                )
            })?;
        Ok(&self.buf[..n])
    }
}
