//! File bytes → spool records: the segment decoder that recovery and `edgerelay spool inspect`
//! run over whatever is on disk. Must never panic; items come in file order, each record or
//! corrupt frame lies inside the input, a torn tail is the last item, and a record re-encodes
//! to exactly the frame it was read from.
#![no_main]

use edgerelay::spool::segment::{self, Decoder, Item, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut next = 0u64;
    let mut torn = false;
    for item in Decoder::new(data, 0) {
        assert!(!torn, "nothing after a torn tail");
        match &item {
            Item::Record { offset, len, record } => {
                assert_eq!(*offset, next);
                let end = (offset + HEADER_BYTES as u64 + u64::from(*len)) as usize;
                assert!(end <= data.len());
                // Protobuf may encode a record more than one way; the canonical form must
                // frame the same record again (or be empty: unknown fields only).
                match segment::encode(record) {
                    Ok(again) => {
                        let back: Vec<Item> = Decoder::new(&again, 0).collect();
                        assert!(
                            matches!(&back[..], [Item::Record { record: r, .. }] if r == record)
                        );
                    }
                    Err(segment::EncodeError::Empty) => assert_eq!(*record, Default::default()),
                    Err(e) => panic!("{e}: canonical form longer than the frame it came from"),
                }
            }
            Item::Corrupt { offset, len, .. } => {
                assert_eq!(*offset, next);
                assert!(*len <= segment::MAX_RECORD_BYTES);
                assert!(offset + HEADER_BYTES as u64 + u64::from(*len) <= data.len() as u64);
            }
            Item::Torn { offset, .. } => {
                assert_eq!(*offset, next);
                assert!(*offset < data.len() as u64);
                torn = true;
            }
        }
        next = item.next_offset().unwrap_or(next);
    }
    let _ = segment::scan(data, |_, _| {});
});
