//! SDP line layer and Host Identity lines: the draft's own bodies, every form at both
//! levels, several streams, lossless round trips and malformed values.

use base64::Engine as _;

use super::*;

/// F1 of draft-tschofenig-hiprg-host-identities-05 §3.3, exactly as printed (note `t=`
/// before `c=` and `k=` after `a=`).
const F1: &str = "v=0
o=alice 53655765 2353687637 IN IP4 pc33.atlanta.com
s=Session SDP
t=0 0
c=IN IP4 pc33.atlanta.com
m=audio 3456 RTP/AVP 0 1 3 99
a=rtpmap:0 PCMU/8000
k=host-identity-tag:7214148E0433AFE2FA2D48003D31172E
";

/// F9 of the same section, exactly as printed.
const F9: &str = "v=0
o=bob 2890844527 2890844527 IN IP4 192.0.2.4
s=Session SDP
c=IN IP4 192.0.2.4
t=3034423619 0
m=audio 3456 RTP/AVP 0
a=rtpmap:0 PCMU/8000
k=host-identity-tag:44A5C522D7EDEDF962E55A0677DB1346
";

/// Stand-in for the HIP core's HI→HIT derivation (RFC 7401 §3.2 ORCHID), which the agent
/// passes in: here the HIT is the first 16 bytes of the HI, so tests can build matching and
/// mismatching pairs. What is tested is the SDP layer's use of it, not the hash.
fn derive(hi: &[u8]) -> Result<Hit, String> {
    let b: [u8; 16] = hi
        .get(..16)
        .ok_or("HI shorter than 16 bytes")?
        .try_into()
        .map_err(|_| "len")?;
    Ok(Hit(b))
}

fn hit(s: &str) -> Hit {
    s.parse().unwrap()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn draft_f1_yields_alices_hit_on_the_audio_stream() {
    let sdp = Sdp::parse(F1).unwrap();
    assert_eq!(sdp.emit(), F1, "F1 must round-trip byte for byte");
    assert_eq!(sdp.media_count(), 1);
    let ids = find_identities(&sdp, &derive).unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].scope, Scope::Media(0));
    assert_eq!(ids[0].form, Form::K);
    assert_eq!(ids[0].kind, Kind::Hit);
    assert_eq!(ids[0].hit.to_hex(), "7214148E0433AFE2FA2D48003D31172E");
    assert_eq!(ids[0].line, 8);
    assert_eq!(
        hits_for_media(&ids, 0),
        vec![hit("7214148E0433AFE2FA2D48003D31172E")]
    );
}

#[test]
fn draft_f9_yields_bobs_hit_on_the_audio_stream() {
    let sdp = Sdp::parse(F9).unwrap();
    assert_eq!(sdp.emit(), F9);
    let ids = find_identities(&sdp, &derive).unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].scope, Scope::Media(0));
    assert_eq!(ids[0].form, Form::K);
    assert_eq!(ids[0].hit.to_hex(), "44A5C522D7EDEDF962E55A0677DB1346");
}

#[test]
fn crlf_bodies_round_trip_too() {
    let crlf = F1.replace('\n', "\r\n");
    let sdp = Sdp::parse(&crlf).unwrap();
    assert_eq!(sdp.emit(), crlf);
    // And a body without a final newline.
    let trimmed = crlf.trim_end();
    assert_eq!(Sdp::parse(trimmed).unwrap().emit(), trimmed);
}

#[test]
fn hex_and_ipv6_forms_are_the_same_hit() {
    let a = hit("2001:20::a");
    assert_eq!(a, hit("2001002000000000000000000000000a"));
    assert_eq!(a.to_hex(), "2001002000000000000000000000000A");
    assert_eq!(a.format(HitFormat::Ipv6), "2001:20::a");
}

#[test]
fn every_form_at_both_levels_and_several_streams() {
    let hi_video = {
        let mut v = hit("2001:20::f00d").0.to_vec();
        v.extend_from_slice(b"rest of the key");
        v
    };
    let body = format!(
        "v=0\r\n\
         o=- 1 1 IN IP6 2001:db8::1\r\n\
         s=-\r\n\
         c=IN IP6 2001:db8::1\r\n\
         t=0 0\r\n\
         k=host-identity-tag:2001:20::1\r\n\
         a=tool:x\r\n\
         m=audio 5004 RTP/AVP 0\r\n\
         a=key-mgmt:host-identity-tag 20010020000000000000000000000002\r\n\
         a=key-mgmt:host-identity-tag 2001:20::3\r\n\
         m=video 5006 RTP/AVP 96\r\n\
         a=key-mgmt:host-identity {}\r\n\
         a=key-mgmt:host-identity-tag 2001:20::f00d\r\n\
         m=text 5008 RTP/AVP 98\r\n\
         k=host-identity:{}\r\n\
         a=key-mgmt:mikey AQAFgM0XflABAAAAAAAAAAAAAAsAyO\r\n",
        b64(&hi_video),
        b64(&hi_video),
    );
    let sdp = Sdp::parse(&body).unwrap();
    assert_eq!(sdp.emit(), body);
    let ids = find_identities(&sdp, &derive).unwrap();
    let summary: Vec<(Scope, Form, Kind, String)> = ids
        .iter()
        .map(|e| (e.scope, e.form, e.kind.clone(), e.hit.to_string()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Scope::Session, Form::K, Kind::Hit, "2001:20::1".into()),
            (
                Scope::Media(0),
                Form::KeyMgmt,
                Kind::Hit,
                "2001:20::2".into()
            ),
            (
                Scope::Media(0),
                Form::KeyMgmt,
                Kind::Hit,
                "2001:20::3".into()
            ),
            (
                Scope::Media(1),
                Form::KeyMgmt,
                Kind::Hi,
                "2001:20::f00d".into()
            ),
            (
                Scope::Media(1),
                Form::KeyMgmt,
                Kind::Hit,
                "2001:20::f00d".into()
            ),
            (Scope::Media(2), Form::K, Kind::Hi, "2001:20::f00d".into()),
        ]
    );
    assert_eq!(ids[3].hi.as_deref(), Some(&hi_video[..]));
    // The MIKEY key-mgmt line is not ours and is left alone.
    assert_eq!(ids.len(), 6);
    assert_eq!(
        hits_for_media(&ids, 0),
        vec![hit("2001:20::2"), hit("2001:20::3")]
    );
    assert_eq!(hits_for_media(&ids, 1), vec![hit("2001:20::f00d")]);
    assert_eq!(hits_for_media(&ids, 2), vec![hit("2001:20::f00d")]);
    // A stream without lines of its own inherits the session-level HIT.
    let only_session = "v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\nk=host-identity-tag:2001:20::1\nt=0 0\nm=audio 1 RTP/AVP 0\n";
    let ids = find_identities(&Sdp::parse(only_session).unwrap(), &derive).unwrap();
    assert_eq!(hits_for_media(&ids, 0), vec![hit("2001:20::1")]);
}

#[test]
fn sdp_without_identities_yields_none() {
    let body = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\nk=clear:secret\r\na=key-mgmt:mikey AAAA\r\n";
    let ids = find_identities(&Sdp::parse(body).unwrap(), &derive).unwrap();
    assert!(ids.is_empty());
}

#[test]
fn unrelated_lines_round_trip_unchanged_through_an_edit() {
    // Unknown letters, an attribute without value, multicast TTL, port/count, odd t=, an
    // empty line: all must come out exactly as they went in, with only our line added.
    let body = "v=0\r\n\
                o=carol 1 2 IN IP4 host.example\r\n\
                s=Odd but real\r\n\
                i=info\r\n\
                u=http://example.com/x\r\n\
                e=carol@example.com\r\n\
                c=IN IP4 224.2.1.1/127/3\r\n\
                b=AS:128\r\n\
                t=garbage here\r\n\
                r=7d 1h 0 25h\r\n\
                z=2882844526 -1h\r\n\
                y=0123456789\r\n\
                a=recvonly\r\n\
                m=audio 49170/2 RTP/AVP 0 8\r\n\
                i=stream\r\n\
                a=rtpmap:0 PCMU/8000\r\n\
                x=unknown letter kept\r\n";
    let mut sdp = Sdp::parse(body).unwrap();
    assert_eq!(sdp.emit(), body);
    let me = HostIdentity {
        hit: hit("2001:20::a"),
        hi: None,
    };
    insert_identity(
        &mut sdp,
        Scope::Media(0),
        Form::KeyMgmt,
        HitFormat::Hex,
        &me,
    )
    .unwrap();
    let expected =
        format!("{body}a=key-mgmt:host-identity-tag 2001002000000000000000000000000A\r\n");
    assert_eq!(sdp.emit(), expected);
    // k= goes before the first a= of its section.
    let mut sdp = Sdp::parse(body).unwrap();
    insert_identity(&mut sdp, Scope::Session, Form::K, HitFormat::Ipv6, &me).unwrap();
    assert!(
        sdp.emit()
            .contains("y=0123456789\r\nk=host-identity-tag:2001:20::a\r\na=recvonly\r\n")
    );
    // Removing it restores the original exactly.
    assert_eq!(remove_identities(&mut sdp, Scope::Session).unwrap(), 1);
    assert_eq!(sdp.emit(), body);
}

#[test]
fn inserted_lines_follow_the_bodys_line_endings_and_parse_back() {
    // F9 without Bob's k= line and without the final newline.
    let body = F9.trim_end().rsplit_once('\n').unwrap().0;
    let mut sdp = Sdp::parse(body).unwrap();
    let me = HostIdentity {
        hit: hit("2001:20::b"),
        hi: Some({
            let mut v = hit("2001:20::b").0.to_vec();
            v.push(7);
            v
        }),
    };
    insert_identity(
        &mut sdp,
        Scope::Media(0),
        Form::KeyMgmt,
        HitFormat::Ipv6,
        &me,
    )
    .unwrap();
    let text = sdp.emit();
    assert!(!text.contains('\r'), "an LF body gets LF lines: {text:?}");
    assert!(text.ends_with(
        "a=key-mgmt:host-identity-tag 2001:20::b\na=key-mgmt:host-identity IAEAIAAAAAAAAAAAAAAACwc="
    ));
    let ids = find_identities(&Sdp::parse(&text).unwrap(), &derive).unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|e| e.scope == Scope::Media(0)));
    assert!(insert_identity(&mut sdp, Scope::Media(1), Form::K, HitFormat::Hex, &me).is_err());
}

/// Fuzz finding (`fuzz/` target `sdp_parse`): a body cut right after the CR of its last
/// line's CRLF. A line added after it completes that CR to a CRLF, and the edited SDP must
/// hold the lines that its own text reads back as.
#[test]
fn a_line_added_after_a_final_bare_cr_reads_back_as_the_same_lines() {
    let mut sdp = Sdp::parse("v=0\no=bob 1 1 IN IP4 192.0.2.4\r").unwrap();
    let me = HostIdentity {
        hit: hit("2001:20::b"),
        hi: None,
    };
    insert_identity(
        &mut sdp,
        Scope::Session,
        Form::KeyMgmt,
        HitFormat::Ipv6,
        &me,
    )
    .unwrap();
    let text = sdp.emit();
    assert_eq!(
        text,
        "v=0\no=bob 1 1 IN IP4 192.0.2.4\r\na=key-mgmt:host-identity-tag 2001:20::b"
    );
    assert_eq!(Sdp::parse(&text).unwrap(), sdp);
}

/// Fuzz finding (`sdp_parse`): a last line `a=key-mgmt:host-identity` cut right after its
/// CR read as no identity line (the CR stuck to the method), but as a malformed HI line once
/// a line was appended after it (the CR then ends the line). It reads the same both ways.
#[test]
fn a_key_mgmt_method_before_a_final_bare_cr_reads_the_same_after_an_edit() {
    let body = "v=\r\no=bo\nm=au]io 4000 rTP/AVP 0\r\na=key-mgmt:host-identity\r";
    let mut sdp = Sdp::parse(body).unwrap();
    let before = find_identities(&sdp, &derive);
    assert!(
        matches!(before, Err(SdpError::BadBase64 { line: 4, .. })),
        "{before:?}"
    );
    let me = HostIdentity {
        hit: hit("2001:20::b"),
        hi: None,
    };
    insert_identity(
        &mut sdp,
        Scope::Media(0),
        Form::KeyMgmt,
        HitFormat::Ipv6,
        &me,
    )
    .unwrap();
    let again = Sdp::parse(&sdp.emit()).unwrap();
    assert_eq!(again, sdp);
    assert_eq!(find_identities(&again, &derive), before);
    // A tab or a CR ends the method as a space does.
    for sep in ["\t", "\r"] {
        let b = format!("{HEAD}a=key-mgmt:host-identity-tag{sep}2001:20::b\n");
        let ids = find_identities(&Sdp::parse(&b).unwrap(), &derive).unwrap();
        assert_eq!(ids.len(), 1, "{sep:?}");
    }
}

fn err(body: &str) -> SdpError {
    find_identities(&Sdp::parse(body).unwrap(), &derive).unwrap_err()
}

const HEAD: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\n";

#[test]
fn malformed_hits_are_rejected_with_the_line() {
    let e = err(&format!(
        "{HEAD}k=host-identity-tag:7214148E0433AFE2FA2D48003D31172G\r\n"
    ));
    assert!(
        matches!(
            e,
            SdpError::BadHit {
                line: 6,
                reason: HitParseError::BadHex('G'),
                ..
            }
        ),
        "{e:?}"
    );
    let e = err(&format!(
        "{HEAD}a=key-mgmt:host-identity-tag 7214148E0433AFE2FA2D48003D3117\r\n"
    ));
    assert!(
        matches!(
            e,
            SdpError::BadHit {
                reason: HitParseError::WrongLength(30),
                ..
            }
        ),
        "{e:?}"
    );
    let e = err(&format!(
        "{HEAD}a=key-mgmt:host-identity-tag 7214148E0433AFE2FA2D48003D31172E00\r\n"
    ));
    assert!(matches!(
        e,
        SdpError::BadHit {
            reason: HitParseError::WrongLength(34),
            ..
        }
    ));
    let e = err(&format!(
        "{HEAD}a=key-mgmt:host-identity-tag 2001:20::zz\r\n"
    ));
    assert!(matches!(
        e,
        SdpError::BadHit {
            reason: HitParseError::NotIpv6,
            ..
        }
    ));
    let e = err(&format!("{HEAD}a=key-mgmt:host-identity-tag\r\n"));
    assert!(matches!(
        e,
        SdpError::BadHit {
            reason: HitParseError::Empty,
            ..
        }
    ));
    let e = err(&format!("{HEAD}k=host-identity-tag:\r\n"));
    assert!(matches!(
        e,
        SdpError::BadHit {
            reason: HitParseError::Empty,
            ..
        }
    ));
    assert!(e.to_string().contains("line 6"), "{e}");
}

#[test]
fn malformed_his_are_rejected() {
    let e = err(&format!("{HEAD}k=host-identity:not*base64!\r\n"));
    assert!(matches!(e, SdpError::BadBase64 { line: 6, .. }), "{e:?}");
    let e = err(&format!("{HEAD}a=key-mgmt:host-identity \r\n"));
    assert!(matches!(e, SdpError::BadBase64 { .. }), "{e:?}");
    // Valid base64, but too short for the HIP core to use.
    let e = err(&format!("{HEAD}a=key-mgmt:host-identity AAAA\r\n"));
    assert!(
        matches!(e, SdpError::BadHostIdentity { line: 6, .. }),
        "{e:?}"
    );
}

#[test]
fn hi_and_hit_in_one_scope_must_agree() {
    let mut hi = hit("2001:20::1").0.to_vec();
    hi.extend_from_slice(b"key");
    let good = format!(
        "{HEAD}a=key-mgmt:host-identity {}\r\na=key-mgmt:host-identity-tag 2001:20::1\r\n",
        b64(&hi)
    );
    assert_eq!(
        find_identities(&Sdp::parse(&good).unwrap(), &derive)
            .unwrap()
            .len(),
        2
    );
    let bad = format!(
        "{HEAD}k=host-identity:{}\r\nk=host-identity-tag:2001:20::2\r\n",
        b64(&hi)
    );
    let e = err(&bad);
    assert!(
        matches!(
            e,
            SdpError::HiHitMismatch {
                line: 7,
                scope: Scope::Media(0),
                ..
            }
        ),
        "{e:?}"
    );
    // In different scopes they are independent (several devices).
    let split = format!(
        "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nk=host-identity:{}\r\nm=audio 1 RTP/AVP 0\r\nk=host-identity-tag:2001:20::2\r\n",
        b64(&hi)
    );
    assert_eq!(
        find_identities(&Sdp::parse(&split).unwrap(), &derive)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn malformed_sdp_is_rejected() {
    assert_eq!(Sdp::parse(""), Err(SdpError::Empty));
    assert_eq!(Sdp::parse("\n\n"), Err(SdpError::Empty));
    assert!(matches!(
        Sdp::parse("o=- 1 1 IN IP4 a\n"),
        Err(SdpError::NoVersion(_))
    ));
    assert!(matches!(
        Sdp::parse("v=0\no=- 1 1 IN IP4 a\nthis is not sdp\n"),
        Err(SdpError::MalformedLine { line: 3, .. })
    ));
    assert!(matches!(Sdp::parse("v=0\ns=-\n"), Err(SdpError::NoOrigin)));
    assert!(matches!(
        Sdp::parse("v=0\no=- 1 1 IN IP4 a\nm=audio x RTP/AVP 0\n"),
        Err(SdpError::MalformedMedia { line: 3, .. })
    ));
    assert!(matches!(
        Sdp::parse("v=0\no=- 1 1 IN IP4 a\nm=audio 1 RTP/AVP\n"),
        Err(SdpError::MalformedMedia { .. })
    ));
    assert_eq!(Sdp::parse_bytes(b"v=0\n\xff\n"), Err(SdpError::NotUtf8));
}

#[test]
fn hit_serde_is_ipv6_text_and_accepts_hex() {
    let h = hit("7214148E0433AFE2FA2D48003D31172E");
    let j = serde_json::to_string(&h).unwrap();
    assert_eq!(j, "\"7214:148e:433:afe2:fa2d:4800:3d31:172e\"");
    assert_eq!(serde_json::from_str::<Hit>(&j).unwrap(), h);
    assert_eq!(
        serde_json::from_str::<Hit>("\"7214148E0433AFE2FA2D48003D31172E\"").unwrap(),
        h
    );
}

/// `a=hip-nat:initiate` goes into the session section, before the first `m=`, once; it is
/// read only there (a media-level one, or another value, is not the mark) and the rest of
/// the body is left as it was.
#[test]
fn the_nat_initiator_mark_is_session_level_and_added_once() {
    let body = "v=0\r\no=- 1 1 IN IP6 ::1\r\ns=-\r\nc=IN IP6 ::1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=hip-nat:initiate\r\n";
    let mut s = Sdp::parse(body).unwrap();
    assert!(!nat_initiator(&s), "media level is not the mark");
    mark_nat_initiator(&mut s);
    mark_nat_initiator(&mut s);
    assert!(nat_initiator(&s));
    assert_eq!(
        s.emit(),
        body.replace("t=0 0\r\n", "t=0 0\r\na=hip-nat:initiate\r\n")
    );
    let other = Sdp::parse("v=0\no=- 1 1 IN IP4 a\na=hip-nat:relay\na=hip-nat\n").unwrap();
    assert!(!nat_initiator(&other));
    assert_eq!(
        other.session_attributes(NAT_ATTRIBUTE).collect::<Vec<_>>(),
        vec!["relay", ""]
    );
    // A body without media and without a final newline: the mark is its last line.
    let mut bare = Sdp::parse("v=0\no=- 1 1 IN IP4 a").unwrap();
    mark_nat_initiator(&mut bare);
    assert_eq!(bare.emit(), "v=0\no=- 1 1 IN IP4 a\na=hip-nat:initiate");
    assert!(nat_initiator(&Sdp::parse(&bare.emit()).unwrap()));
}
