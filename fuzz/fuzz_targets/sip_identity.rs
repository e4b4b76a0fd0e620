//! Untrusted `Identity` header values (RFC 8224) through `hip_sip::identity`: parsing and
//! verification against a fixed trusted key, From/To and SDP HITs, as the agent checks an
//! INVITE or UPDATE (the draft's §4).
//!
//! A fuzzer cannot forge an ES256 signature, so a value that parses is also re-signed
//! with the trusted key: verification of that token then runs every check after the
//! signature (`orig`, `dest`, `iat`, the `hit` claim) on fuzzer-chosen claims.
//!
//! An input that starts with `{` is written in the clear instead: the JWS header JSON, a
//! line feed, the payload JSON, a line feed, then the header parameters (`;info=<…>;…`).
//! The target base64url-encodes both and signs them with the trusted key, so the fuzzer
//! explores the JSON and the claims directly rather than through base64 and a signature.
//!
//! Nothing may panic; a token re-signed from parsed claims parses back to the same
//! claims; whatever verifies agrees with the request it was checked against.
#![no_main]

use std::{borrow::Cow, sync::OnceLock};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use hip_sip::{
    identity::{self, Canonical, Expected, IdentityError, SigningKey, Trust},
    sdp::Hit,
};
use libfuzzer_sys::fuzz_target;

const FROM: &str = "sip:alice@atlanta.com";
const TO: &str = "sip:bob@biloxi.com";
/// The F1 HIT of the draft's §3.3.
const HIT: Hit = Hit([
    0x72, 0x14, 0x14, 0x8E, 0x04, 0x33, 0xAF, 0xE2, 0xFA, 0x2D, 0x48, 0x00, 0x3D, 0x31, 0x17, 0x2E,
]);
const NOW: i64 = 1_700_000_000;
const WINDOW: u64 = 60;

fn key() -> &'static (SigningKey, Trust) {
    static K: OnceLock<(SigningKey, Trust)> = OnceLock::new();
    K.get_or_init(|| {
        let k = SigningKey::from_scalar(&[7; 32]).expect("fixed scalar");
        let mut t = Trust::default();
        t.insert("atlanta.com", k.verifying_key());
        (k, t)
    })
}

fn expected() -> Expected<'static> {
    static HITS: [Hit; 1] = [HIT];
    Expected {
        from_uri: FROM,
        to_uri: TO,
        sdp_hits: &HITS,
        now: NOW,
        window: WINDOW,
    }
}

/// What an accepted token must agree with.
fn check_verified(v: &identity::Verified) {
    assert_eq!(v.domain, "atlanta.com");
    assert_eq!(v.orig, FROM);
    assert!(NOW.abs_diff(v.iat) <= WINDOW);
    assert!(!v.hits.is_empty() && v.hits.iter().all(|h| *h == HIT));
}

/// `header JSON \n payload JSON \n params` → a full-form Identity value signed with the
/// trusted key (ES256, RFC 7518 §3.4).
fn signed_in_the_clear(data: &[u8]) -> String {
    use p256::ecdsa::{Signature, signature::Signer as _};
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let params = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let key = p256::ecdsa::SigningKey::from_slice(&[7; 32]).expect("fixed scalar");
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}{params}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

fuzz_target!(|data: &[u8]| {
    // The agent hands header values over as lossy UTF-8 (`RequestAuth::identity`).
    let value = if data.first() == Some(&b'{') {
        Cow::Owned(signed_in_the_clear(data))
    } else {
        String::from_utf8_lossy(data)
    };
    let (sk, trust) = key();
    let exp = expected();

    // The same bytes as a From/To URI: canonical identities and domains never panic.
    let _ = identity::canonical(&value);
    let _ = identity::domain_of(&value);

    let first = identity::verify(&value, trust, &exp);
    if std::env::var_os("HIP_FUZZ_TRACE").is_some() {
        eprintln!("{value}\n=> {first:?}");
    }
    match first {
        Ok(v) => check_verified(&v),
        Err(e) => {
            let _ = (e.to_string(), e.is_tampering());
        }
    }
    let Ok(pp) = identity::parse(&value) else {
        return;
    };
    // Re-sign what parsed: the claims survive a sign/parse round trip (HITs without
    // duplicates, as `sign` writes them).
    let resigned = identity::sign(sk, &pp.claims, &pp.info);
    let back = identity::parse(&resigned)
        .unwrap_or_else(|e| panic!("re-signed token does not parse: {e}\n{resigned}"));
    let mut hits: Vec<Hit> = Vec::new();
    for h in &pp.claims.hits {
        if !hits.contains(h) {
            hits.push(*h);
        }
    }
    assert_eq!(back.claims.hits, hits);
    assert_eq!(back.claims.orig, pp.claims.orig);
    assert_eq!(back.claims.iat, pp.claims.iat);
    let mut d1 = back.claims.dest.clone();
    let mut d2 = pp.claims.dest.clone();
    let key = |c: &Canonical| (matches!(c, Canonical::Tn(_)), c.value().to_owned());
    d1.sort_by_key(key);
    d2.sort_by_key(key);
    assert_eq!(d1, d2);
    assert_eq!(back.info, pp.info);
    assert!(back.verify_signature(&sk.verifying_key()));

    // Every check after the signature, on the fuzzer's claims.
    let r = identity::verify(&resigned, trust, &exp);
    match &r {
        Ok(v) => check_verified(v),
        Err(IdentityError::Signature(_)) => panic!("a token signed with the trusted key fails"),
        Err(_) => {}
    }
    // Several Identity headers: the best answer wins, and a tampering proof is kept.
    let any = identity::verify_any(&[value.into_owned(), resigned], trust, &exp);
    match (any, r) {
        (Some(Ok(v)), _) => check_verified(&v),
        (Some(Err(_)), Ok(_)) => panic!("verify_any refused what verify accepted"),
        (None, _) => panic!("verify_any saw no header"),
        _ => {}
    }
});
