//! Our answer to an untrusted offer (`hip_sip::sdp::offer::build`, what the agent sends in
//! its 200 OK), and the media target the agent reads from a peer's SDP: never panics; the
//! answer is valid SDP with one `m=` line per offered stream in the offer's order (RFC
//! 3264 §6), at most one stream accepted (audio, non-zero port, the offered transport),
//! every other one refused with port 0, and exactly our identity in it, where the policy
//! says; an offer we build ourselves has the same properties.
//!
//! Byte 0 picks the identity policy (form, mirroring, HIT format, per media or session,
//! HI sent) and the address family of our address; the rest is the offer.
#![no_main]

use hip_sip::sdp::{
    self, Form, Hit, HitFormat, HostIdentity, IdentityPolicy, Scope, Sdp,
    offer::{self, LocalMedia},
};
use libfuzzer_sys::fuzz_target;

/// Stand-in HI → HIT: the HI's first 16 bytes (ours is built to match).
fn derive(hi: &[u8]) -> Result<Hit, String> {
    let b: [u8; 16] = hi.get(..16).ok_or("short")?.try_into().map_err(|_| "len")?;
    Ok(Hit(b))
}

const OUR_HIT: Hit = Hit([
    0x20, 0x01, 0x00, 0x20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
]);

fn port(m: &str) -> Option<u16> {
    m.split_whitespace().nth(1)?.split('/').next()?.parse().ok()
}

fn check(answer: &Sdp, offer: Option<&Sdp>, policy: &IdentityPolicy, send_hi: bool) {
    // Valid SDP that parses back to itself.
    let text = answer.emit();
    assert_eq!(&Sdp::parse(&text).expect("our SDP parses"), answer);
    let n = offer.map_or(1, Sdp::media_count);
    assert_eq!(
        answer.media_count(),
        n,
        "one m= line per offered stream:\n{text}"
    );
    let mut accepted = Vec::new();
    for i in 0..n {
        let a = answer.media_line(i).expect("counted");
        let af: Vec<&str> = a.split_whitespace().collect();
        if let Some(o) = offer {
            let of: Vec<&str> = o
                .media_line(i)
                .expect("counted")
                .split_whitespace()
                .collect();
            assert_eq!(af[0], of[0], "same media");
            assert_eq!(af.get(2), of.get(2), "same transport");
            if port(a) != Some(0) {
                assert!(of[0] == "audio" && port(&of.join(" ")).is_some_and(|p| p != 0));
            }
        }
        if port(a) != Some(0) {
            assert_eq!(port(a), Some(4000));
            accepted.push(i);
        }
    }
    assert!(accepted.len() <= 1, "{text}");
    let ids = sdp::find_identities(answer, &derive).expect("our identity lines are valid");
    for e in &ids {
        assert_eq!(e.hit, OUR_HIT, "{text}");
        match e.scope {
            Scope::Session => assert!(!policy.per_media),
            Scope::Media(i) => assert!(policy.per_media && accepted.contains(&i)),
        }
        if !policy.mirror_offer_form || offer.is_none() {
            assert_eq!(e.form, policy.form);
        }
    }
    let expected_lines = if policy.per_media { accepted.len() } else { 1 };
    let per_scope = if send_hi { 2 } else { 1 };
    assert_eq!(ids.len(), expected_lines * per_scope, "{text}");
    if let Some((addr, p)) = offer::audio_target(answer) {
        assert_eq!(p, 4000);
        assert!(!addr.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, body)) = data.split_first() else {
        return;
    };
    if body.len() > 8 * 1024 {
        return;
    }
    let policy = IdentityPolicy {
        form: if how & 1 == 0 { Form::KeyMgmt } else { Form::K },
        mirror_offer_form: how & 2 != 0,
        hit_format: if how & 4 == 0 {
            HitFormat::Hex
        } else {
            HitFormat::Ipv6
        },
        per_media: how & 8 != 0,
        send_hi: how & 16 != 0,
    };
    let ours = HostIdentity {
        hit: OUR_HIT,
        hi: Some([&OUR_HIT.0[..], &[7, 7, 7]].concat()),
    };
    let address = if how & 32 == 0 {
        "2001:20:1:2:3:4:5:6"
    } else {
        "192.0.2.4"
    };
    let local = LocalMedia {
        user: "bob",
        version: u64::from(how),
        address,
        rtp_port: 4000,
        identity: Some((&ours, policy)),
    };
    // Our own offer first (no peer input): always well-formed.
    let own = offer::build(&local, None, None).expect("our offer");
    check(&own, None, &policy, policy.send_hi);

    let Ok(offer_sdp) = Sdp::parse_bytes(body) else {
        return;
    };
    // Offers whose m= lines are not `media port proto [fmt…]` are refused, not answered.
    let offer_form = sdp::find_identities(&offer_sdp, &derive)
        .ok()
        .and_then(|ids| sdp::form_used(&ids));
    let _ = offer::audio_target(&offer_sdp);
    match offer::build(&local, Some(&offer_sdp), offer_form) {
        Ok(answer) => check(&answer, Some(&offer_sdp), &policy, policy.send_hi),
        Err(_) => {}
    }
});
