//! Untrusted SDP: parsing never panics; an accepted body re-emits byte for byte; adding our
//! identity and removing it again restores it; identities found are well-formed.
#![no_main]

use hip_sip::sdp::{self, Form, Hit, HitFormat, HostIdentity, Scope, Sdp};
use libfuzzer_sys::fuzz_target;

fn derive(hi: &[u8]) -> Result<Hit, String> {
    let b: [u8; 16] = hi.get(..16).ok_or("short")?.try_into().map_err(|_| "len")?;
    Ok(Hit(b))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = Sdp::parse_bytes(data) else {
        return;
    };
    assert_eq!(s.emit().as_bytes(), data);
    let _ = sdp::find_identities(&s, &derive);
    let id = HostIdentity { hit: Hit([0x20; 16]), hi: Some(vec![1, 2, 3]) };
    for scope in [Scope::Session, Scope::Media(0)] {
        let mut t = s.clone();
        if sdp::insert_identity(&mut t, scope, Form::KeyMgmt, HitFormat::Ipv6, &id).is_ok() {
            let again = Sdp::parse(&t.emit()).expect("our edit stays valid SDP");
            assert_eq!(again, t);
        }
    }
});
