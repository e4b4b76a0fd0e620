use super::*;

const INFO: &str = "https://atlanta.com/cert.pem";
const ALICE: &str = "<sip:alice@atlanta.com>";
const BOB: &str = "sip:bob@biloxi.com";
const NOW: i64 = 1_750_000_000;

fn key(n: u8) -> SigningKey {
    SigningKey::from_scalar(&[n; 32]).unwrap()
}

fn hit(s: &str) -> Hit {
    s.parse().unwrap()
}

/// The draft's two HITs (§3.3, F1 and F9).
fn alice_hit() -> Hit {
    hit("7214148E0433AFE2FA2D48003D31172E")
}
fn bob_hit() -> Hit {
    hit("44A5C522D7EDEDF962E55A0677DB1346")
}

fn claims(iat: i64, hits: Vec<Hit>) -> Claims {
    Claims {
        orig: canonical(ALICE).unwrap(),
        dest: vec![canonical(BOB).unwrap()],
        iat,
        hits,
    }
}

fn expected(sdp: &[Hit]) -> Expected<'_> {
    Expected {
        from_uri: ALICE,
        to_uri: BOB,
        sdp_hits: sdp,
        now: NOW,
        window: 60,
    }
}

/// A trust store with `k` for atlanta.com only.
fn trust(k: &VerifyingKey) -> Trust {
    let mut t = Trust::default();
    t.insert("Atlanta.com", k.clone());
    t
}

#[test]
fn baseline_encoding_reproduces_rfc8225_appendix_a() {
    // RFC 8225 Appendix A: header and payload of the example PASSporT (the signature
    // differs: ours is deterministic with our key). With no HIT the token is baseline.
    let c = Claims {
        orig: Canonical::Tn("12155551212".into()),
        dest: vec![Canonical::Uri("sip:alice@example.com".into())],
        iat: 1_471_375_418,
        hits: vec![],
    };
    let jws = sign_jws(&key(1), &c, "https://cert.example.org/passport.cer");
    let (input, _) = jws.rsplit_once('.').unwrap();
    assert_eq!(
        input,
        concat!(
            "eyJhbGciOiJFUzI1NiIsInR5cCI6InBhc3Nwb3J0IiwieDV1IjoiaHR0cHM6Ly9j",
            "ZXJ0LmV4YW1wbGUub3JnL3Bhc3Nwb3J0LmNlciJ9.",
            "eyJkZXN0Ijp7InVyaSI6WyJzaXA6YWxpY2VAZXhhbXBsZS5jb20iXX0sImlhdCI",
            "6MTQ3MTM3NTQxOCwib3JpZyI6eyJ0biI6IjEyMTU1NTUxMjEyIn19"
        )
    );
}

#[test]
fn es256_verifies_rfc7515_appendix_a3() {
    // RFC 7515 Appendix A.3: an ES256 JWS with its public key given as JWK x/y.
    let x = URL_SAFE_NO_PAD
        .decode("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU")
        .unwrap();
    let y = URL_SAFE_NO_PAD
        .decode("x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0")
        .unwrap();
    let mut point = vec![4];
    point.extend(x);
    point.extend(y);
    let k = VerifyingKey::from_sec1(&point).unwrap();
    let input = concat!(
        "eyJhbGciOiJFUzI1NiJ9.",
        "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt",
        "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    );
    let sig = URL_SAFE_NO_PAD
        .decode(concat!(
            "DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSA",
            "pmWQxfKTUJqPP3-Kg6NU1Q"
        ))
        .unwrap();
    assert!(es256_verify(&k, input.as_bytes(), &sig));
    let mut bad = sig.clone();
    bad[10] ^= 1;
    assert!(!es256_verify(&k, input.as_bytes(), &bad));
    assert!(!es256_verify(&k, b"other input", &sig));
}

#[test]
fn a_signed_hit_verifies_and_the_header_has_the_rfc8224_form() {
    let k = key(7);
    let v = sign(&k, &claims(NOW - 5, vec![alice_hit()]), INFO);
    assert!(
        v.ends_with(";info=<https://atlanta.com/cert.pem>;alg=ES256;ppt=hip"),
        "{v}"
    );
    // The claim is the draft's hex form; the header names the extension.
    let pp = parse(&v).unwrap();
    assert_eq!(pp.ppt.as_deref(), Some("hip"));
    let payload = String::from_utf8(
        URL_SAFE_NO_PAD
            .decode(v.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        payload,
        format!(
            "{{\"dest\":{{\"uri\":[\"sip:bob@biloxi.com\"]}},\"hit\":[\"7214148E0433AFE2FA2D48003D31172E\"],\"iat\":{},\"orig\":{{\"uri\":\"sip:alice@atlanta.com\"}}}}",
            NOW - 5
        )
    );
    let pk = k.verifying_key();
    let ok = verify(&v, &trust(&pk), &expected(&[alice_hit()])).unwrap();
    assert_eq!(ok.domain, "atlanta.com");
    assert_eq!(ok.orig, "sip:alice@atlanta.com");
    assert_eq!(ok.hits, vec![alice_hit()]);
    assert_eq!(ok.info, INFO);
    // Several HITs compare as a set; duplicates in the SDP do not matter.
    let v2 = sign(&k, &claims(NOW, vec![alice_hit(), bob_hit()]), INFO);
    verify(
        &v2,
        &trust(&pk),
        &expected(&[bob_hit(), alice_hit(), bob_hit()]),
    )
    .unwrap();
}

#[test]
fn a_wrong_or_missing_key_fails_without_claiming_tampering() {
    let v = sign(&key(7), &claims(NOW, vec![alice_hit()]), INFO);
    let other = key(8).verifying_key();
    let e = verify(&v, &trust(&other), &expected(&[alice_hit()])).unwrap_err();
    assert_eq!(e, IdentityError::Signature("atlanta.com".into()));
    assert!(!e.is_tampering());
    let e = verify(&v, &Trust::default(), &expected(&[alice_hit()])).unwrap_err();
    assert_eq!(e, IdentityError::UntrustedDomain("atlanta.com".into()));
    // A flipped bit in the signature.
    let pk = key(7).verifying_key();
    let mut b = v.into_bytes();
    let at = b.iter().position(|c| *c == b';').unwrap() - 3;
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    let e = verify(
        &String::from_utf8(b).unwrap(),
        &trust(&pk),
        &expected(&[alice_hit()]),
    )
    .unwrap_err();
    assert!(matches!(e, IdentityError::Signature(_)), "{e}");
}

#[test]
fn iat_outside_the_window_is_refused_both_ways() {
    let k = key(7);
    let pk = k.verifying_key();
    for (iat, ok) in [
        (NOW - 60, true),
        (NOW - 61, false),
        (NOW + 60, true),
        (NOW + 3600, false),
    ] {
        let v = sign(&k, &claims(iat, vec![alice_hit()]), INFO);
        let r = verify(&v, &trust(&pk), &expected(&[alice_hit()]));
        assert_eq!(r.is_ok(), ok, "iat {iat}: {r:?}");
        if let Err(e) = r {
            assert!(matches!(e, IdentityError::Stale { window: 60, .. }), "{e}");
        }
    }
}

#[test]
fn orig_and_dest_must_be_the_requests_from_and_to() {
    let k = key(7);
    let pk = k.verifying_key();
    let v = sign(&k, &claims(NOW, vec![alice_hit()]), INFO);
    let sdp = [alice_hit()];
    let mut x = expected(&sdp);
    x.to_uri = "sip:carol@biloxi.com";
    let e = verify(&v, &trust(&pk), &x).unwrap_err();
    assert!(
        matches!(&e, IdentityError::Dest { to, .. } if to == "sip:carol@biloxi.com"),
        "{e}"
    );
    let mut x = expected(&sdp);
    x.from_uri = "sip:mallory@atlanta.com";
    let e = verify(&v, &trust(&pk), &x).unwrap_err();
    assert!(matches!(e, IdentityError::Orig { .. }), "{e}");
    // Port, parameters, display names and host case are not part of the identity.
    let mut x = expected(&sdp);
    x.from_uri = "\"Alice\" <sip:alice@ATLANTA.com:5060;transport=udp>";
    x.to_uri = "<sip:bob@biloxi.com;user=ip>";
    verify(&v, &trust(&pk), &x).unwrap();
}

#[test]
fn a_hit_that_differs_from_the_sdp_is_tampering() {
    let k = key(7);
    let pk = k.verifying_key();
    let v = sign(&k, &claims(NOW, vec![alice_hit()]), INFO);
    let e = verify(&v, &trust(&pk), &expected(&[bob_hit()])).unwrap_err();
    assert!(e.is_tampering(), "{e}");
    assert_eq!(
        e,
        IdentityError::HitMismatch {
            signed: vec![alice_hit().to_hex()],
            sdp: vec![bob_hit().to_hex()],
        }
    );
    // One HIT more in the SDP than signed is a mismatch too.
    let e = verify(&v, &trust(&pk), &expected(&[alice_hit(), bob_hit()])).unwrap_err();
    assert!(e.is_tampering());
    // But only a token that is otherwise valid can prove tampering: a stale one reports
    // its age.
    let old = sign(&k, &claims(NOW - 600, vec![alice_hit()]), INFO);
    let e = verify(&old, &trust(&pk), &expected(&[bob_hit()])).unwrap_err();
    assert!(matches!(e, IdentityError::Stale { .. }), "{e}");
}

#[test]
fn a_baseline_passport_or_another_extension_binds_no_hit() {
    let k = key(7);
    let pk = k.verifying_key();
    let base = sign(&k, &claims(NOW, vec![]), INFO);
    assert!(!base.contains("ppt"), "{base}");
    assert_eq!(
        verify(&base, &trust(&pk), &expected(&[alice_hit()])).unwrap_err(),
        IdentityError::Extension(String::new())
    );
    // A token of another extension (RFC 8588 `shaken`), correctly signed.
    let header = URL_SAFE_NO_PAD.encode(format!(
        "{{\"alg\":\"ES256\",\"ppt\":\"shaken\",\"typ\":\"passport\",\"x5u\":\"{INFO}\"}}"
    ));
    let payload = URL_SAFE_NO_PAD.encode(payload_json(&claims(NOW, vec![alice_hit()])));
    let input = format!("{header}.{payload}");
    let sig: Signature = k.0.sign(input.as_bytes());
    let v = format!(
        "{input}.{};info=<{INFO}>;ppt=shaken",
        URL_SAFE_NO_PAD.encode(sig.to_bytes())
    );
    assert_eq!(
        verify(&v, &trust(&pk), &expected(&[alice_hit()])).unwrap_err(),
        IdentityError::Extension("shaken".into())
    );
}

#[test]
fn malformed_headers_are_refused_with_a_reason_and_never_panic() {
    let good = sign(&key(7), &claims(NOW, vec![alice_hit()]), INFO);
    let jws = good.split(';').next().unwrap();
    let (h, rest) = jws.split_once('.').unwrap();
    let (p, s) = rest.split_once('.').unwrap();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "no info"),
        (format!("garbage;info=<{INFO}>"), "parts"),
        (jws.into(), "no info"),
        (format!("{jws};info=https://x"), "info is not"),
        (format!("{jws};info=<{INFO}>;info=<{INFO}>"), "repeated"),
        (format!("{jws};info=<{INFO}"), "unclosed"),
        (format!("..{s};info=<{INFO}>"), "compact"),
        (format!("{h}.{p}.;info=<{INFO}>"), "empty JWS part"),
        (format!("{h}.!!!.{s};info=<{INFO}>"), "base64url"),
        (
            format!("{}.{p}.{s};info=<{INFO}>", URL_SAFE_NO_PAD.encode("{")),
            "JWS header",
        ),
        (
            format!("{h}.{}.{s};info=<{INFO}>", URL_SAFE_NO_PAD.encode("[1]")),
            "no orig",
        ),
        (format!("{jws};info=<https://elsewhere/>"), "x5u"),
        (format!("{jws};info=<{INFO}>;alg=RS256"), "RS256"),
        (
            format!("{jws};info=<{INFO}>;ppt=div"),
            "ppt parameter differs",
        ),
    ];
    let pk = key(7).verifying_key();
    for (v, why) in &cases {
        let e = verify(v, &trust(&pk), &expected(&[alice_hit()])).unwrap_err();
        assert!(
            e.to_string().contains(why),
            "{v:?}: expected {why:?} in {e}"
        );
    }
    // Every prefix of a valid header: an error or (the whole) a success, never a panic.
    for n in 0..good.len() {
        let _ = verify(&good[..n], &trust(&pk), &expected(&[alice_hit()]));
    }
    let bad_claims = URL_SAFE_NO_PAD.encode(
        "{\"dest\":{\"uri\":[\"sip:bob@biloxi.com\"]},\"hit\":[\"xyz\"],\"iat\":1,\"orig\":{\"uri\":\"sip:a@b\"}}",
    );
    let e = parse(&format!("{h}.{bad_claims}.{s};info=<{INFO}>")).unwrap_err();
    assert!(e.to_string().contains("hit claim"), "{e}");
}

#[test]
fn several_identity_headers_the_first_valid_one_wins_and_tampering_is_reported() {
    let k = key(7);
    let pk = k.verifying_key();
    let good = sign(&k, &claims(NOW, vec![alice_hit()]), INFO);
    let other_hit = sign(&k, &claims(NOW, vec![bob_hit()]), INFO);
    let sdp = [alice_hit()];
    let x = expected(&sdp);
    assert!(verify_any(&[], &trust(&pk), &x).is_none());
    let r = verify_any(&["junk".into(), good.clone()], &trust(&pk), &x).unwrap();
    assert!(r.is_ok());
    let r = verify_any(&["junk".into(), other_hit], &trust(&pk), &x).unwrap();
    assert!(r.unwrap_err().is_tampering());
}

#[test]
fn canonical_identities_follow_rfc8224_section_8() {
    let c = |s: &str| canonical(s).map(|c| (c.kind(), c.value().to_owned()));
    assert_eq!(
        c("\"A\" <sips:Alice@Atlanta.COM:5061;transport=tls>").unwrap(),
        ("uri", "sips:Alice@atlanta.com".into())
    );
    assert_eq!(
        c("sip:al%69ce@atlanta.com").unwrap(),
        ("uri", "sip:alice@atlanta.com".into())
    );
    assert_eq!(
        c("sip:+1-215-555-1212@atlanta.com;user=phone").unwrap(),
        ("tn", "12155551212".into())
    );
    assert_eq!(
        c("tel:+1-215-555-1212").unwrap(),
        ("tn", "12155551212".into())
    );
    for bad in ["sip:atlanta.com", "mailto:a@b", "not a uri", ""] {
        assert!(
            matches!(canonical(bad), Err(IdentityError::Uri(_))),
            "{bad}"
        );
    }
    assert_eq!(
        domain_of("<sip:alice@Atlanta.com:5060>").as_deref(),
        Some("atlanta.com")
    );
    assert_eq!(
        domain_of("sip:bob@[2001:db8::1]").as_deref(),
        Some("[2001:db8::1]")
    );
    assert_eq!(domain_of("tel:+1"), None);
}

#[test]
fn keys_round_trip_through_pem_and_bad_pem_is_named() {
    let k = key(9);
    let pem = k.to_pem().unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let back = SigningKey::from_pem(&pem).unwrap();
    assert_eq!(back.verifying_key(), k.verifying_key());
    let pub_pem = k.verifying_key().to_pem().unwrap();
    assert_eq!(VerifyingKey::from_pem(&pub_pem).unwrap(), k.verifying_key());
    // SEC1 (`BEGIN EC PRIVATE KEY`) is read too.
    let sec1 = p256::SecretKey::from(&k.0)
        .to_sec1_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    assert_eq!(
        SigningKey::from_pem(&sec1).unwrap().verifying_key(),
        k.verifying_key()
    );
    let e = SigningKey::from_pem(&pub_pem).unwrap_err();
    assert!(e.to_string().contains("private"), "{e}");
    let e = VerifyingKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        .unwrap_err();
    assert!(e.to_string().contains("public"), "{e}");
    assert!(!format!("{k:?}").contains(&pem[30..40]));
}

#[test]
fn random_corruptions_of_a_valid_header_never_verify_and_never_panic() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let k = key(7);
    let pk = k.verifying_key();
    let good = sign(&k, &claims(NOW, vec![alice_hit()]), INFO);
    let jws_len = good.find(';').unwrap();
    let sdp = [alice_hit()];
    let mut rng = StdRng::seed_from_u64(8224);
    for _ in 0..3000 {
        let mut b = good.clone().into_bytes();
        let mut in_jws = false;
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..b.len());
            let old = b[at];
            b[at] = rng.random();
            in_jws |= at < jws_len && b[at] != old;
        }
        let v = String::from_utf8_lossy(&b);
        let r = verify(&v, &trust(&pk), &expected(&sdp));
        // Every octet of the JWS is covered by the signature (base64url is decoded
        // strictly, so even the spare bits of a last character count).
        if in_jws {
            assert!(r.is_err(), "{v:?} verified");
        }
    }
}
