//! A byte stream cut into arbitrary pieces: `FrameDecoder` agrees with the
//! blocking `read_frame`, and every frame body decodes without panicking.
//!
//! Input: byte 0 = options (bit 0: handshake-size maximum), byte 1 = seed of
//! the piece sizes, then the stream (so a seed is `[0, 0]` + frames).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../proto/tests/decode_checks/mod.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    let [opts, seed, stream @ ..] = data else {
        return;
    };
    let max = if opts & 1 == 1 {
        fleetsync_proto::frame::MAX_HANDSHAKE_FRAME
    } else {
        fleetsync_proto::frame::MAX_FRAME
    };
    // Piece sizes from a tiny generator: 1 byte up to the whole stream.
    let mut x = u32::from(*seed) | 0x100;
    let cuts: Vec<u16> = (0..64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 700) as u16
        })
        .collect();
    checks::frame_stream(stream, &cuts, max);
});
