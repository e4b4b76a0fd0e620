//! HI decoding and the legacy XML import: never panic.
#![no_main]

use hip_proto::{HostId, legacy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 2 {
        let alg = u16::from_be_bytes([data[0], data[1]]);
        if let Ok(h) = HostId::from_hi_bytes(alg, &data[2..]) {
            // A decoded HI re-encodes to something that decodes to the same key.
            let again = HostId::from_hi_bytes(alg, &h.to_hi_bytes()).expect("re-encoded HI");
            assert_eq!(again, h);
            let _ = h.verify(data, data);
        }
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(ids) = legacy::parse_host_identities(s)
    {
        for i in ids {
            if let Ok(k) = i.key {
                let _ = k.legacy_hit();
            }
        }
    }
});
