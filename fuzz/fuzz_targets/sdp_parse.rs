//! Untrusted SDP: parsing never panics; an accepted body re-emits byte for byte; its
//! identities are read with the agent's real HI → HIT derivation and with a stand-in that
//! lets HI lines match; replacing the identities of a section with ours (what the agent
//! does in an offer or answer) gives valid SDP that carries exactly ours there and leaves
//! every other section's identities as they were.
#![no_main]

use hip_sip::sdp::{self, Form, Hit, HitFormat, HostIdentity, IdentityEntry, Kind, Scope, Sdp};
use libfuzzer_sys::fuzz_target;

/// Stand-in derivation: the HIT is the HI's first 16 bytes, so the fuzzer can write an HI
/// that matches a HIT (the real one is a hash, below).
fn derive(hi: &[u8]) -> Result<Hit, String> {
    let b: [u8; 16] = hi.get(..16).ok_or("short")?.try_into().map_err(|_| "len")?;
    Ok(Hit(b))
}

/// The agent's derivation (RFC 7401 §3.2 ORCHID, through hip-proto).
fn derive_real(hi: &[u8]) -> Result<Hit, String> {
    let (alg, key) = hi.split_first_chunk::<2>().ok_or("short")?;
    let id = hip_proto::HostId::from_hi_bytes(u16::from_be_bytes(*alg), key)
        .map_err(|e| e.to_string())?;
    Ok(Hit(id.hit().0))
}

/// Entries without their line numbers, which an edit shifts.
fn strip(v: &[IdentityEntry], keep: impl Fn(Scope) -> bool) -> Vec<(Scope, Form, Kind, Hit)> {
    v.iter()
        .filter(|e| keep(e.scope))
        .map(|e| (e.scope, e.form, e.kind.clone(), e.hit))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = Sdp::parse_bytes(data) else {
        return;
    };
    assert_eq!(s.emit().as_bytes(), data);
    if let Ok(ids) = sdp::find_identities(&s, &derive_real) {
        for i in 0..s.media_count() {
            let _ = sdp::hits_for_media(&ids, i);
        }
    }
    let found = sdp::find_identities(&s, &derive);
    if let Ok(ids) = &found {
        let _ = sdp::form_used(ids);
        for i in 0..s.media_count() {
            let _ = sdp::hits_for_media(ids, i);
        }
    }
    let ours = HostIdentity {
        hit: Hit([0x20; 16]),
        hi: Some([[0x20; 16].as_slice(), &[1, 2, 3]].concat()),
    };
    let last = s.media_count().saturating_sub(1);
    for (n, scope) in [Scope::Session, Scope::Media(0), Scope::Media(last)]
        .into_iter()
        .enumerate()
    {
        let (form, format) = if n % 2 == 0 {
            (Form::KeyMgmt, HitFormat::Ipv6)
        } else {
            (Form::K, HitFormat::Hex)
        };
        let mut t = s.clone();
        if sdp::remove_identities(&mut t, scope).is_err() {
            continue;
        }
        sdp::insert_identity(&mut t, scope, form, format, &ours).expect("the section exists");
        let again = Sdp::parse(&t.emit()).expect("our edit stays valid SDP");
        assert_eq!(again, t);
        let Ok(before) = &found else {
            continue;
        };
        let after = sdp::find_identities(&again, &derive).expect("only our lines changed");
        assert_eq!(
            strip(&after, |sc| sc == scope),
            vec![
                (scope, form, Kind::Hit, ours.hit),
                (scope, form, Kind::Hi, ours.hit)
            ]
        );
        assert_eq!(
            strip(&after, |sc| sc != scope),
            strip(before, |sc| sc != scope)
        );
    }
});
