//! The HIP RR's RDATA (RFC 8005 §5, `hip_dns::rdata`) from an untrusted DNS answer: decoding
//! never panics; what decodes re-encodes to the same bytes (names are uncompressed, so
//! the wire form is canonical up to the case hickory keeps) and decodes to the same
//! record; a record that verifies has a HIT that is its key's HIT, and the record built
//! back from that key is the one that verified.
#![no_main]

use hip_dns::HipRdata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // RDATA is at most 65,535 octets (RFC 1035 §3.2.1); more is no longer a DNS answer.
    if data.len() > u16::MAX as usize {
        return;
    }
    let Ok(rd) = HipRdata::decode(data) else {
        return;
    };
    let wire = rd.encode().expect("a decoded record re-encodes");
    let again = HipRdata::decode(&wire).expect("re-encoded RDATA decodes");
    assert_eq!(again, rd);
    assert_eq!(again.encode().expect("encodes"), wire);
    let _ = rd.to_presentation();
    if let Ok((hi, hit)) = rd.verified() {
        assert_eq!(hi.hit(), hit);
        assert_eq!(&rd.hit[..], &hit.0[..]);
        let built = HipRdata::from_host_id(&hi, rd.rendezvous_servers.clone());
        assert_eq!(built.pk_algorithm, rd.pk_algorithm);
        assert_eq!(built.hit, rd.hit);
        // The key re-encodes to the same HI (the RFC 8005 form carries nothing else).
        assert_eq!(built.verified().expect("our own record verifies").0, hi);
    }
});
