//! Packet and parameter parsing: never panics; every parameter that parses re-emits to
//! bytes that parse back to the same value.
#![no_main]

use hip_proto::wire::{self, Packet, Param};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let src = "2001:db8::1".parse().unwrap();
    let dst = "2001:db8::2".parse().unwrap();
    let _ = wire::verify_checksum(data, src, dst);
    if let Ok(pkt) = Packet::parse(data) {
        for raw in &pkt.params {
            if let Ok(p) = raw.parse() {
                let bytes = p.to_bytes();
                assert_eq!(bytes.len() % 8, 0);
                let len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
                let again =
                    Param::parse(p.ty(), &bytes[4..4 + len]).expect("emitted parameter parses");
                assert_eq!(again, p);
            }
            let _ = pkt.covered_prefix(raw.offset);
        }
    }
});
