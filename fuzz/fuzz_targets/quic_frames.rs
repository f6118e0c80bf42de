//! Network bytes → native QUIC protocol frames (`edgerelay/1`): the length-prefix decoder and
//! the `PublishRequest` inside each frame. Must never panic, never return a frame longer than
//! the limit, and never consume more than it was given.
#![no_main]

use bytes::BytesMut;
use edgerelay::ingest::framing::FrameDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoder = FrameDecoder::new(4096);
    let mut buf = BytesMut::from(data);
    let mut taken = 0;
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        assert!(frame.len() <= 4096);
        taken += frame.len();
        let _ = edgerelay::ingest::decode_publish_request(frame, 1000);
    }
    assert!(taken <= data.len());
});
