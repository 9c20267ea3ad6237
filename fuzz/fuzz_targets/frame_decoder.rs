//! A byte stream cut into arbitrary pieces: `FrameDecoder` agrees with the
//! blocking `read_frame`, and every frame body decodes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../capnp/tests/decode_checks/mod.rs"]
mod checks;

#[derive(Debug, libfuzzer_sys::arbitrary::Arbitrary)]
struct Input {
    cuts: Vec<u16>,
    small_max: bool,
    stream: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let max = if input.small_max {
        fleetsync_proto::frame::MAX_HANDSHAKE_FRAME
    } else {
        fleetsync_proto::frame::MAX_FRAME
    };
    checks::frame_stream(&input.stream, &input.cuts, max);
});
