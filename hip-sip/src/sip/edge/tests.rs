//! The edge proxy on simulated time: a phone at 192.0.2.4:5062 (and [fd00::4]), the edge at
//! 192.0.2.4:5070, the next hop at 192.0.2.3:5060, the far side's agent at 192.0.2.1:5070.

use super::*;

const PHONE: &str = "192.0.2.4:5062";
const EDGE: &str = "192.0.2.4:5070";
const HOP: &str = "192.0.2.3:5060";
const OWN_HIT: &str = "2001:20::4";
const PEER_HIT: &str = "2001:20::1";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn cfg() -> EdgeConfig {
    EdgeConfig {
        listeners: vec![(Transport::Udp, sa(EDGE))],
        clients: vec!["192.0.2.4".parse().unwrap(), "fd00::/64".parse().unwrap()],
        next_hop: (Transport::Udp, sa(HOP)),
        own: HostIdentity {
            hit: Hit(OWN_HIT.parse::<Ipv6Addr>().unwrap().octets()),
            hi: None,
        },
        policy: IdentityPolicy::default(),
        inbound_without_hit: NoHitPolicy::Refuse,
        outbound_without_hit: NoHitPolicy::Refuse,
        derive: |_| Err("no HIs in these tests".into()),
        timers: TimerConfig::default(),
        max_calls: 8,
        max_transactions: 64,
        seed: 7,
        identity: None,
        protect: true,
    }
}

fn local() -> (Transport, SocketAddr) {
    (Transport::Udp, sa(EDGE))
}

fn sent(p: &mut EdgeProxy) -> Vec<(SocketAddr, String)> {
    std::iter::from_fn(|| p.poll_transmit())
        .map(|t| {
            assert_eq!(t.from, local());
            (t.dest.addr, String::from_utf8(t.data.to_vec()).unwrap())
        })
        .collect()
}

fn events(p: &mut EdgeProxy) -> Vec<EdgeEvent> {
    std::iter::from_fn(|| p.poll_event()).collect()
}

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n\r\n")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

fn body(msg: &str) -> &str {
    msg.split_once("\r\n\r\n").unwrap().1
}

fn with_body(head: &str, body: &str) -> String {
    format!(
        "{head}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

const PHONE_SDP: &str = "v=0\r\no=- 11 22 IN IP6 fd00::4\r\ns=-\r\nc=IN IP6 fd00::4\r\nt=0 0\r\n\
    m=audio 10002 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

fn peer_sdp() -> String {
    format!(
        "v=0\r\no=- 5 5 IN IP6 {PEER_HIT}\r\ns=-\r\nc=IN IP6 {PEER_HIT}\r\nt=0 0\r\n\
         m=audio 4000 RTP/AVP 0\r\na=key-mgmt:host-identity-tag {}\r\n",
        Hit(PEER_HIT.parse::<Ipv6Addr>().unwrap().octets()).to_hex()
    )
}

fn invite_from_phone(sdp: &str) -> String {
    with_body(
        "INVITE sip:bob@biloxi.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bKph1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@atlanta.com>;tag=a1\r\nTo: <sip:bob@biloxi.com>\r\n\
         Call-ID: call-1\r\nCSeq: 2 INVITE\r\nContact: <sip:alice@192.0.2.4:5062>\r\n\
         Proxy-Authorization: Digest username=\"alice\", realm=\"atlanta.com\", nonce=\"n1\", uri=\"sip:bob@biloxi.com\", response=\"0123456789abcdef0123456789abcdef\"\r\n",
        sdp,
    )
}

/// The network's answer to a forwarded request: our Via on top, as the next hop sends it.
fn answer(forwarded: &str, status: &str, extra: &str, sdp: Option<&str>) -> String {
    let mut head = format!("SIP/2.0 {status}\r\n");
    for v in header(forwarded, "Via") {
        head.push_str(&format!("Via: {v}\r\n"));
    }
    for rr in header(forwarded, "Record-Route") {
        head.push_str(&format!("Record-Route: {rr}\r\n"));
    }
    for n in ["From", "Call-ID", "CSeq"] {
        head.push_str(&format!("{n}: {}\r\n", header(forwarded, n)[0]));
    }
    head.push_str(&format!(
        "To: {};tag=b1\r\n{extra}",
        header(forwarded, "To")[0]
    ));
    match sdp {
        Some(s) => with_body(&head, s),
        None => format!("{head}Content-Length: 0\r\n\r\n"),
    }
}

#[test]
fn register_goes_to_the_next_hop_with_path_and_its_digest_untouched() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    let auth = "Digest username=\"alice\", realm=\"atlanta.com\", nonce=\"abc\", uri=\"sip:atlanta.com\", response=\"00112233445566778899aabbccddeeff\", algorithm=MD5";
    let reg = format!(
        "REGISTER sip:atlanta.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bKr1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@atlanta.com>;tag=r\r\nTo: <sip:alice@atlanta.com>\r\n\
         Call-ID: reg-1\r\nCSeq: 3 REGISTER\r\nContact: <sip:alice@192.0.2.4:5062>\r\n\
         Authorization: {auth}\r\nContent-Length: 0\r\n\r\n"
    );
    p.handle_datagram(now, local(), sa(PHONE), reg.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out.len(), 1, "{out:?}");
    let (to, fwd) = &out[0];
    assert_eq!(*to, sa(HOP));
    assert_eq!(header(fwd, "Authorization"), vec![auth]);
    assert_eq!(
        header(fwd, "Path"),
        vec!["<sip:192.0.2.4:5070;transport=udp;lr;hip-edge>"]
    );
    assert_eq!(header(fwd, "Max-Forwards"), vec!["69"]);
    let vias = header(fwd, "Via");
    assert!(vias[0].starts_with("SIP/2.0/UDP 192.0.2.4:5070;branch=z9hG4bKhe"));
    assert_eq!(vias[1], "SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bKr1");
    // A retransmission is not forwarded as a new request, but our copy goes again.
    p.handle_datagram(now, local(), sa(PHONE), reg.as_bytes());
    assert_eq!(sent(&mut p), out);
    // The registrar's answer comes back to the phone without our Via.
    let ok = answer(
        fwd,
        "200 OK",
        "Contact: <sip:alice@192.0.2.4:5062>;expires=3600\r\n",
        None,
    );
    p.handle_datagram(now, local(), sa(HOP), ok.as_bytes());
    let back = sent(&mut p);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].0, sa(PHONE));
    assert_eq!(
        header(&back[0].1, "Via"),
        vec!["SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bKr1"]
    );
}

#[test]
fn a_call_from_the_phone_leaves_on_our_hit_and_the_answer_arrives_on_the_peers() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    let inv = invite_from_phone(PHONE_SDP);
    p.handle_datagram(now, local(), sa(PHONE), inv.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out.len(), 2, "{out:?}");
    let (to, fwd) = &out[0];
    assert_eq!(*to, sa(HOP));
    assert!(out[1].1.starts_with("SIP/2.0 100 Trying"));
    assert_eq!(out[1].0, sa(PHONE));
    // Digest is end to end.
    assert_eq!(
        header(fwd, "Proxy-Authorization"),
        header(&inv, "Proxy-Authorization")
    );
    assert_eq!(
        header(fwd, "Record-Route"),
        vec!["<sip:192.0.2.4:5070;transport=udp;lr;hip-edge>"]
    );
    let b = body(fwd);
    assert!(b.contains(&format!("c=IN IP6 {OWN_HIT}\r\n")), "{b}");
    assert!(
        b.contains(&format!("o=- 11 22 IN IP6 {OWN_HIT}\r\n")),
        "{b}"
    );
    assert!(
        b.contains("m=audio 10002 RTP/AVP 0 101\r\n"),
        "ports kept: {b}"
    );
    assert!(b.contains("a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"));
    let own_hex = cfg().own.hit.to_hex();
    assert!(
        b.contains(&format!("a=key-mgmt:host-identity-tag {own_hex}\r\n")),
        "{b}"
    );
    assert_eq!(
        header(fwd, "Content-Length"),
        vec![b.len().to_string().as_str()]
    );
    assert!(!b.contains("fd00::4"));

    // The far side's agent Record-Routes too: its entry is the locator for HIP.
    let fwd_rr = fwd.replacen(
        "Record-Route:",
        "Record-Route: <sip:192.0.2.1:5070;transport=udp;lr;hip-edge>\r\nRecord-Route:",
        1,
    );
    // Its ringing names that locator before any HIT is known: early HIP can start there,
    // once per call.
    let ringing = answer(
        &fwd_rr,
        "180 Ringing",
        "Contact: <sip:bob@[fd00::9]:5062>\r\n",
        None,
    );
    for n in 0..2 {
        p.handle_datagram(now, local(), sa(HOP), ringing.as_bytes());
        assert_eq!(sent(&mut p).len(), 1, "the 180 reaches the phone");
        let evs = events(&mut p);
        if n == 0 {
            assert_eq!(
                evs,
                vec![EdgeEvent::PeerRinging {
                    call_id: "call-1".into(),
                    locator: Some("192.0.2.1".parse().unwrap())
                }]
            );
        } else {
            assert!(evs.is_empty(), "{evs:?}");
        }
    }
    let ok = answer(
        &fwd_rr,
        "200 OK",
        "Contact: <sip:bob@[fd00::9]:5062>\r\n",
        Some(&peer_sdp()),
    );
    p.handle_datagram(now, local(), sa(HOP), ok.as_bytes());
    let back = sent(&mut p);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].0, sa(PHONE));
    let b = body(&back[0].1);
    assert!(b.contains(&format!("c=IN IP6 {PEER_HIT}\r\n")), "{b}");
    let evs = events(&mut p);
    assert!(
        matches!(&evs[0], EdgeEvent::PeerHits { call_id, phone_is_caller: true, peer_uri, stage: SdpStage::Answer, identities, .. }
            if call_id == "call-1" && peer_uri == "sip:bob@biloxi.com" && identities[0].hit.to_ipv6() == PEER_HIT.parse::<Ipv6Addr>().unwrap()),
        "{evs:?}"
    );
    assert_eq!(
        evs[1],
        EdgeEvent::PeerAnswered {
            call_id: "call-1".into(),
            locator: Some("192.0.2.1".parse().unwrap())
        }
    );
    assert!(p.call("call-1").unwrap().answered);

    // A BYE from the far side along the route set reaches the phone and ends the call.
    let bye = "BYE sip:alice@192.0.2.4:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKfar\r\n\
        Max-Forwards: 69\r\nRoute: <sip:192.0.2.4:5070;transport=udp;lr;hip-edge>\r\n\
        From: <sip:bob@biloxi.com>;tag=b1\r\nTo: <sip:alice@atlanta.com>;tag=a1\r\nCall-ID: call-1\r\n\
        CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n";
    p.handle_datagram(now, local(), sa("192.0.2.1:5070"), bye.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, sa(PHONE));
    assert!(
        header(&out[0].1, "Route").is_empty(),
        "our Route entry is consumed"
    );
    assert_eq!(
        events(&mut p),
        vec![EdgeEvent::Ended {
            call_id: "call-1".into(),
            reason: "BYE".into()
        }]
    );
    assert!(p.call("call-1").is_none());
}

#[test]
fn a_call_from_outside_reaches_the_phone_on_the_peers_hit_and_the_answer_leaves_on_ours() {
    let now = Instant::now();
    // As a registrar with Path sends it: our Path entry as Route, the phone's Contact as
    // Request-URI.
    let inv = with_body(
        "INVITE sip:bob@[fd00::4]:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5060;branch=z9hG4bKk1\r\n\
         Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bKa1\r\nMax-Forwards: 68\r\n\
         Route: <sip:192.0.2.4:5070;transport=udp;lr;hip-edge>\r\n\
         Record-Route: <sip:192.0.2.1:5070;transport=udp;lr;hip-edge>\r\n\
         From: <sip:alice@atlanta.com>;tag=a9\r\nTo: <sip:bob@biloxi.com>\r\nCall-ID: in-1\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.1:5062>\r\n",
        &peer_sdp(),
    );
    let mut c = cfg();
    c.listeners.push((Transport::Udp, sa("[fd00::1]:5070")));
    let mut p2 = EdgeProxy::new(c);
    p2.handle_datagram(now, local(), sa(HOP), inv.as_bytes());
    let out: Vec<EdgeTransmit> = std::iter::from_fn(|| p2.poll_transmit()).collect();
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0].dest.addr, sa("[fd00::4]:5062"));
    assert_eq!(out[0].from, (Transport::Udp, sa("[fd00::1]:5070")));
    let fwd = String::from_utf8(out[0].data.to_vec()).unwrap();
    // Two listeners: double Record-Route (RFC 5658), the phone's side first.
    assert_eq!(
        header(&fwd, "Record-Route"),
        vec![
            "<sip:[fd00::1]:5070;transport=udp;lr;hip-edge>",
            "<sip:192.0.2.4:5070;transport=udp;lr;hip-edge>",
            "<sip:192.0.2.1:5070;transport=udp;lr;hip-edge>"
        ]
    );
    assert!(body(&fwd).contains(&format!("c=IN IP6 {PEER_HIT}\r\n")));
    let evs: Vec<EdgeEvent> = std::iter::from_fn(|| p2.poll_event()).collect();
    assert!(
        matches!(&evs[0], EdgeEvent::PeerHits { phone_is_caller: false, stage: SdpStage::Offer, auth: Some(a), .. } if a.from_uri == "sip:alice@atlanta.com"),
        "{evs:?}"
    );
    // The phone answers; its SDP leaves with our HIT, in the form of the offer.
    let ok = answer(
        &fwd,
        "200 OK",
        "Contact: <sip:bob@[fd00::4]:5062>\r\n",
        Some(PHONE_SDP),
    );
    p2.handle_datagram(
        now,
        (Transport::Udp, sa("[fd00::1]:5070")),
        sa("[fd00::4]:5062"),
        ok.as_bytes(),
    );
    let out: Vec<EdgeTransmit> = std::iter::from_fn(|| p2.poll_transmit()).collect();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].dest.addr, sa(HOP));
    assert_eq!(out[0].from, local());
    let resp = String::from_utf8(out[0].data.to_vec()).unwrap();
    assert!(body(&resp).contains(&format!("c=IN IP6 {OWN_HIT}\r\n")));
    assert_eq!(
        header(&resp, "Via")[0],
        "SIP/2.0/UDP 192.0.2.3:5060;branch=z9hG4bKk1"
    );
    let evs: Vec<EdgeEvent> = std::iter::from_fn(|| p2.poll_event()).collect();
    assert_eq!(
        evs,
        vec![EdgeEvent::PhoneAnswered {
            call_id: "in-1".into()
        }]
    );
}

#[test]
fn the_edge_is_no_open_relay() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    let inv = with_body(
        "INVITE sip:victim@198.51.100.9 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKx\r\n\
         Max-Forwards: 70\r\nFrom: <sip:spam@203.0.113.5>;tag=s\r\nTo: <sip:victim@198.51.100.9>\r\n\
         Call-ID: relay-1\r\nCSeq: 1 INVITE\r\nContact: <sip:spam@203.0.113.5>\r\n",
        &peer_sdp(),
    );
    p.handle_datagram(now, local(), sa("203.0.113.5:5060"), inv.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, sa("203.0.113.5:5060"));
    assert!(
        out[0].1.starts_with("SIP/2.0 403 Forbidden\r\n"),
        "{}",
        out[0].1
    );
    assert!(header(&out[0].1, "Warning")[0].contains("not a relay"));
    assert!(p.call("relay-1").is_none());
    assert_eq!(p.transaction_count(), 0);
    // A REGISTER from outside goes nowhere either (only clients reach the next hop).
    let reg = "REGISTER sip:atlanta.com SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bKy\r\n\
        From: <sip:x@atlanta.com>;tag=1\r\nTo: <sip:x@atlanta.com>\r\nCall-ID: r\r\nCSeq: 1 REGISTER\r\n\
        Content-Length: 0\r\n\r\n";
    p.handle_datagram(now, local(), sa("203.0.113.5:5060"), reg.as_bytes());
    let out = sent(&mut p);
    assert!(out[0].1.starts_with("SIP/2.0 403"), "{out:?}");
}

#[test]
fn a_caller_without_a_hit_is_refused_with_the_reason_or_let_through_in_the_clear() {
    let clear_sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let inv = with_body(
        "INVITE sip:bob@192.0.2.4:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5060;branch=z9hG4bKk2\r\n\
         Max-Forwards: 68\r\nFrom: <sip:carol@atlanta.com>;tag=c\r\nTo: <sip:bob@biloxi.com>\r\n\
         Call-ID: nohit-1\r\nCSeq: 1 INVITE\r\nContact: <sip:carol@192.0.2.1:5062>\r\n",
        clear_sdp,
    );
    let now = Instant::now();
    let mut p = EdgeProxy::new(cfg());
    p.handle_datagram(now, local(), sa(HOP), inv.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(
        out[0]
            .1
            .starts_with("SIP/2.0 488 Not Acceptable Here: caller has no HIP identity\r\n"),
        "{}",
        out[0].1
    );
    assert!(header(&out[0].1, "Warning")[0].contains("inbound_without_hit = refuse"));
    assert!(p.call("nohit-1").is_none());

    let mut c = cfg();
    c.inbound_without_hit = NoHitPolicy::Clear;
    let mut p = EdgeProxy::new(c);
    p.handle_datagram(now, local(), sa(HOP), inv.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out[0].0, sa(PHONE));
    assert_eq!(body(&out[0].1), clear_sdp, "passed unchanged");
    assert!(matches!(
        &events(&mut p)[0],
        EdgeEvent::Unprotected { call_id, why } if call_id == "nohit-1" && why.contains("clear")
    ));
    assert!(p.call("nohit-1").unwrap().unprotected);
}

#[test]
fn an_answer_without_a_hit_is_refused_at_the_phone_and_the_far_end_is_hung_up() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    p.handle_datagram(
        now,
        local(),
        sa(PHONE),
        invite_from_phone(PHONE_SDP).as_bytes(),
    );
    let fwd = sent(&mut p).remove(0).1;
    let clear = "v=0\r\no=- 1 1 IN IP4 192.0.2.9\r\ns=-\r\nc=IN IP4 192.0.2.9\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let ok = answer(
        &fwd,
        "200 OK",
        "Contact: <sip:bob@192.0.2.9:5060>\r\n",
        Some(clear),
    );
    p.handle_datagram(now, local(), sa(HOP), ok.as_bytes());
    let out = sent(&mut p);
    let lines: Vec<&str> = out.iter().map(|(_, m)| m.lines().next().unwrap()).collect();
    assert_eq!(
        lines,
        vec![
            "ACK sip:bob@192.0.2.9:5060 SIP/2.0",
            "BYE sip:bob@192.0.2.9:5060 SIP/2.0",
            "SIP/2.0 488 Not Acceptable Here: callee has no HIP identity"
        ]
    );
    assert_eq!(out[0].0, sa("192.0.2.9:5060"));
    assert_eq!(out[2].0, sa(PHONE));
    assert_eq!(header(&out[1].1, "CSeq"), vec!["3 BYE"]);
    assert!(p.call("call-1").is_none());
}

#[test]
fn ipv4_phone_media_and_unrewritable_sdp_are_refused_with_a_reason() {
    let now = Instant::now();
    for (sdp, want) in [
        (
            "v=0\r\no=- 1 1 IN IP4 192.0.2.4\r\ns=-\r\nc=IN IP4 192.0.2.4\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
            "IPv6",
        ),
        (
            "v=0\r\no=- 1 1 IN IP6 fd00::4\r\ns=-\r\nc=IN IP6 fd00::4\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=candidate:1 1 UDP 1 fd00::4 4000 typ host\r\n",
            "ICE",
        ),
        (
            "v=0\r\no=- 1 1 IN IP6 fd00::4\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
            "no connection address",
        ),
        (
            "v=0\r\no=- 1 1 IN IP6 2001:db8::77\r\ns=-\r\nc=IN IP6 2001:db8::77\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
            "not in [edge] clients",
        ),
    ] {
        let mut p = EdgeProxy::new(cfg());
        p.handle_datagram(now, local(), sa(PHONE), invite_from_phone(sdp).as_bytes());
        let out = sent(&mut p);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].1.starts_with("SIP/2.0 488 "), "{}", out[0].1);
        let w = header(&out[0].1, "Warning");
        assert!(w[0].contains(want), "{w:?} lacks {want}");
        assert!(p.call("call-1").is_none(), "no call left behind");
        assert_eq!(p.transaction_count(), 0);
    }
}

#[test]
fn a_message_tells_the_phone_and_is_retransmitted_until_answered() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    p.handle_datagram(
        now,
        local(),
        sa(PHONE),
        invite_from_phone(PHONE_SDP).as_bytes(),
    );
    let _ = sent(&mut p);
    p.notify(now, "call-1", "hip: mutual, SAS 123 456").unwrap();
    let out = sent(&mut p);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, sa(PHONE));
    assert!(
        out[0]
            .1
            .starts_with("MESSAGE sip:alice@192.0.2.4:5062 SIP/2.0\r\n")
    );
    assert_eq!(body(&out[0].1), "hip: mutual, SAS 123 456");
    // Timer E: again after T1 until a response arrives.
    let t = p.poll_timeout().unwrap();
    assert!(t <= now + Duration::from_millis(500));
    p.handle_timeout(now + Duration::from_millis(500));
    assert_eq!(sent(&mut p), out);
    let ok = answer(&out[0].1, "200 OK", "", None);
    p.handle_datagram(now, local(), sa(PHONE), ok.as_bytes());
    assert!(
        sent(&mut p).is_empty(),
        "our own transaction's answer is absorbed"
    );
    p.handle_timeout(now + Duration::from_secs(2));
    assert!(sent(&mut p).iter().all(|(_, m)| !m.starts_with("MESSAGE")));
    assert!(p.notify(now, "no-such-call", "x").is_err());
}

#[test]
fn a_phone_whose_contact_is_a_gruu_gets_its_message_where_its_invite_came_from() {
    // linphone's Contact is its public GRUU (RFC 5627), a name the registrar resolves.
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    let inv = invite_from_phone(PHONE_SDP).replace(
        "Contact: <sip:alice@192.0.2.4:5062>",
        "Contact: \"alice\" <sip:alice@atlanta.com;gr=urn:uuid:d49ef084>;+sip.instance=\"<urn:uuid:d49ef084>\"",
    );
    p.handle_datagram(now, local(), sa(PHONE), inv.as_bytes());
    let _ = sent(&mut p);
    p.notify(now, "call-1", "hip: mutual").unwrap();
    let out = sent(&mut p);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, sa(PHONE));
    assert!(
        out[0]
            .1
            .starts_with("MESSAGE sip:alice@atlanta.com;gr=urn:uuid:d49ef084 SIP/2.0\r\n"),
        "{}",
        out[0].1
    );
}

#[test]
fn malformed_input_gets_400_and_leaves_nothing() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    let bad = "INVITE sip:bob@biloxi.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bKb\r\n\
        From: <sip:alice@atlanta.com>;tag=a\r\nTo: <sip:bob@biloxi.com>\r\nCall-ID: m\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n";
    p.handle_datagram(now, local(), sa(PHONE), bad.as_bytes());
    let out = sent(&mut p);
    assert!(out[0].1.starts_with("SIP/2.0 400"), "{out:?}");
    // An SDP that does not parse.
    p.handle_datagram(
        now,
        local(),
        sa(PHONE),
        invite_from_phone("x=nonsense\r\n").as_bytes(),
    );
    let out = sent(&mut p);
    assert!(out[0].1.starts_with("SIP/2.0 400"), "{out:?}");
    assert_eq!(p.transaction_count(), 0);
    assert_eq!(p.calls().count(), 0);
}

#[test]
fn networks_parse_and_match() {
    let n: Net = "192.0.2.0/24".parse().unwrap();
    assert!(n.contains("192.0.2.200".parse().unwrap()));
    assert!(!n.contains("192.0.3.1".parse().unwrap()));
    assert!(n.contains("::ffff:192.0.2.9".parse().unwrap()));
    let n: Net = "fd00::/64".parse().unwrap();
    assert!(n.contains("fd00::4".parse().unwrap()));
    assert!(!n.contains("fd01::4".parse().unwrap()));
    assert!("10.0.0.0/33".parse::<Net>().is_err());
    assert!("nonsense".parse::<Net>().is_err());
    let all: Net = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("203.0.113.1".parse().unwrap()));
}

#[test]
fn a_re_invite_for_hold_is_rewritten_like_the_first_offer_and_follows_the_route() {
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    p.handle_datagram(
        now,
        local(),
        sa(PHONE),
        invite_from_phone(PHONE_SDP).as_bytes(),
    );
    let fwd = sent(&mut p).remove(0).1;
    let ok = answer(
        &fwd,
        "200 OK",
        "Contact: <sip:bob@192.0.2.9:5062>\r\n",
        Some(&peer_sdp()),
    );
    p.handle_datagram(now, local(), sa(HOP), ok.as_bytes());
    let _ = sent(&mut p);
    let _ = events(&mut p);
    // The phone puts the call on hold: its route set is our entry then the far edge's.
    let hold = PHONE_SDP
        .replace("a=sendrecv", "a=sendonly")
        .replace("11 22", "11 23");
    let reinvite = with_body(
        "INVITE sip:bob@192.0.2.9:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.4:5062;branch=z9hG4bKph2\r\n\
         Max-Forwards: 70\r\nRoute: <sip:192.0.2.4:5070;transport=udp;lr;hip-edge>, <sip:192.0.2.1:5070;transport=udp;lr;hip-edge>\r\n\
         From: <sip:alice@atlanta.com>;tag=a1\r\nTo: <sip:bob@biloxi.com>;tag=b1\r\nCall-ID: call-1\r\n\
         CSeq: 4 INVITE\r\nContact: <sip:alice@192.0.2.4:5062>\r\n",
        &hold,
    );
    p.handle_datagram(now, local(), sa(PHONE), reinvite.as_bytes());
    let out = sent(&mut p);
    assert_eq!(
        out[0].0,
        sa("192.0.2.1:5070"),
        "along the route set: {out:?}"
    );
    assert_eq!(
        header(&out[0].1, "Route"),
        vec!["<sip:192.0.2.1:5070;transport=udp;lr;hip-edge>"]
    );
    assert!(
        header(&out[0].1, "Record-Route").is_empty(),
        "not dialog-creating"
    );
    let b = body(&out[0].1);
    assert!(
        b.contains(&format!("c=IN IP6 {OWN_HIT}\r\n")) && b.contains("a=sendonly\r\n"),
        "{b}"
    );
    assert!(p.call("call-1").is_some(), "the call goes on");
}

#[test]
fn a_phone_behind_a_nat_has_its_real_address_stamped_in_its_via() {
    // The phone writes its private address and asks for rport (RFC 3581); it reaches the
    // edge through a NAT as 192.0.2.4:40000.
    let mut p = EdgeProxy::new(cfg());
    let now = Instant::now();
    let reg = "REGISTER sip:atlanta.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.0.2:5062;rport;branch=z9hG4bKn1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@atlanta.com>;tag=r\r\nTo: <sip:alice@atlanta.com>\r\n\
         Call-ID: reg-nat\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.9.0.2:5062>\r\n\
         Content-Length: 0\r\n\r\n";
    p.handle_datagram(now, local(), sa("192.0.2.4:40000"), reg.as_bytes());
    let out = sent(&mut p);
    assert_eq!(out.len(), 1, "{out:?}");
    let (_, fwd) = &out[0];
    let vias = header(fwd, "Via");
    assert_eq!(
        vias[1],
        "SIP/2.0/UDP 10.9.0.2:5062;branch=z9hG4bKn1;received=192.0.2.4;rport=40000"
    );
    // The answer goes back to the NAT's mapping, with the stamp the phone can learn from.
    let ok = answer(fwd, "200 OK", "", None);
    p.handle_datagram(now, local(), sa(HOP), ok.as_bytes());
    let back = sent(&mut p);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].0, sa("192.0.2.4:40000"));
    assert_eq!(header(&back[0].1, "Via"), vec![vias[1]]);
}

const IAT: i64 = 1_700_000_000;

fn fixed_clock() -> i64 {
    IAT
}

/// atlanta.com's key (scalar 0x07…07), trusted for atlanta.com; we sign as atlanta.com.
fn with_identity(mut c: EdgeConfig) -> (EdgeConfig, identity::SigningKey) {
    let key = identity::SigningKey::from_scalar(&[7; 32]).unwrap();
    let mut trust = identity::Trust::default();
    trust.insert("atlanta.com", key.verifying_key());
    c.identity = Some(EdgeIdentity {
        signer: Some((key.clone(), "https://atlanta.com/id.pem".into())),
        domain: "atlanta.com".into(),
        trust,
        window: 60,
        unix_now: fixed_clock,
        refuse_tampered: true,
        require_verified: false,
    });
    (c, key)
}

/// Our phone's INVITE through the edge: what went to the next hop.
fn forwarded_from_phone(p: &mut EdgeProxy, now: Instant) -> String {
    p.handle_datagram(
        now,
        local(),
        sa(PHONE),
        invite_from_phone(PHONE_SDP).as_bytes(),
    );
    sent(p)
        .into_iter()
        .find(|(to, _)| *to == sa(HOP))
        .expect("forwarded")
        .1
}

fn hit_of(s: &str) -> Hit {
    Hit(s.parse::<Ipv6Addr>().unwrap().octets())
}

#[test]
fn our_phones_invite_leaves_signed_over_our_hit() {
    let (c, key) = with_identity(cfg());
    let mut p = EdgeProxy::new(c);
    let now = Instant::now();
    let fwd = &forwarded_from_phone(&mut p, now);
    let ids: Vec<String> = header(fwd, "Identity")
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{fwd}");
    // An independent check with the verifier's own function: the PASSporT binds our HIT,
    // the phone's From and To.
    let mut trust = identity::Trust::default();
    trust.insert("atlanta.com", key.verifying_key());
    let v = identity::verify_any(
        &ids,
        &trust,
        &identity::Expected {
            from_uri: "sip:alice@atlanta.com",
            to_uri: "sip:bob@biloxi.com",
            sdp_hits: &[hit_of(OWN_HIT)],
            now: IAT,
            window: 60,
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!((v.domain.as_str(), v.iat), ("atlanta.com", IAT));
    assert!(events(&mut p).iter().any(|e| matches!(
        e,
        EdgeEvent::OwnSigned { result: Ok(d), .. } if d == "atlanta.com"
    )));
}

#[test]
fn a_phone_outside_our_domain_is_not_signed_for_and_says_why() {
    let (mut c, _) = with_identity(cfg());
    c.identity.as_mut().unwrap().domain = "biloxi.com".into();
    let mut p = EdgeProxy::new(c);
    let fwd = &forwarded_from_phone(&mut p, Instant::now());
    assert!(header(fwd, "Identity").is_empty(), "{fwd}");
    let evs = events(&mut p);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            EdgeEvent::OwnSigned { result: Err(why), .. } if why.contains("biloxi.com")
        )),
        "{evs:?}"
    );
}

fn invite_from_network(identity_value: &str) -> String {
    let head = invite_from_network_head();
    with_body(
        &format!("{head}Identity: {identity_value}\r\n"),
        &peer_sdp(),
    )
}

fn invite_from_network_head() -> &'static str {
    "INVITE sip:bob@192.0.2.4:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5060;branch=z9hG4bKk7\r\n\
     Max-Forwards: 68\r\nRecord-Route: <sip:192.0.2.1:5070;transport=udp;lr;hip-edge>\r\n\
     From: <sip:alice@atlanta.com>;tag=a9\r\nTo: <sip:bob@biloxi.com>\r\nCall-ID: in-7\r\n\
     CSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.1:5062>\r\n"
}

fn passport(key: &identity::SigningKey, hit: &str) -> String {
    identity::sign(
        key,
        &identity::Claims {
            orig: identity::canonical("sip:alice@atlanta.com").unwrap(),
            dest: vec![identity::canonical("sip:bob@biloxi.com").unwrap()],
            iat: IAT,
            hits: vec![hit_of(hit)],
        },
        "https://atlanta.com/id.pem",
    )
}

#[test]
fn the_identity_of_an_invite_from_the_network_is_verified_against_its_offer() {
    let (c, key) = with_identity(cfg());
    let mut p = EdgeProxy::new(c);
    p.handle_datagram(
        Instant::now(),
        local(),
        sa(HOP),
        invite_from_network(&passport(&key, PEER_HIT)).as_bytes(),
    );
    let out = sent(&mut p);
    assert!(
        out.iter()
            .any(|(to, m)| *to == sa(PHONE) && m.starts_with("INVITE ")),
        "{out:?}"
    );
    let evs = events(&mut p);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            EdgeEvent::PeerIdentity { result: Ok(v), .. }
                if v.domain == "atlanta.com" && v.hits == vec![hit_of(PEER_HIT)]
        )),
        "{evs:?}"
    );
}

#[test]
fn an_invite_whose_identity_proves_the_offer_altered_is_refused_with_438() {
    let (c, key) = with_identity(cfg());
    let mut p = EdgeProxy::new(c);
    // Signed over another HIT than the SDP's: someone swapped the HIT on the path.
    p.handle_datagram(
        Instant::now(),
        local(),
        sa(HOP),
        invite_from_network(&passport(&key, "2001:20::66")).as_bytes(),
    );
    let out = sent(&mut p);
    assert!(
        !out.iter().any(|(to, _)| *to == sa(PHONE)),
        "reached the phone: {out:?}"
    );
    let refusal = out
        .iter()
        .find(|(to, _)| *to == sa(HOP))
        .map(|(_, m)| m.lines().next().unwrap_or("").to_owned());
    assert_eq!(
        refusal.as_deref(),
        Some("SIP/2.0 438 Invalid Identity Header")
    );
    assert!(p.calls().next().is_none(), "a call was left behind");
    let evs = events(&mut p);
    assert!(
        !evs.iter()
            .any(|e| matches!(e, EdgeEvent::PeerIdentity { .. })),
        "{evs:?}"
    );
}

#[test]
fn with_tampering_allowed_the_call_goes_on_flagged() {
    let (mut c, key) = with_identity(cfg());
    c.identity.as_mut().unwrap().refuse_tampered = false;
    let mut p = EdgeProxy::new(c);
    p.handle_datagram(
        Instant::now(),
        local(),
        sa(HOP),
        invite_from_network(&passport(&key, "2001:20::66")).as_bytes(),
    );
    assert!(sent(&mut p).iter().any(|(to, _)| *to == sa(PHONE)));
    let evs = events(&mut p);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            EdgeEvent::PeerIdentity { result: Err(why), tampering: true, .. } if why.contains("altered")
        )),
        "{evs:?}"
    );
}

#[test]
fn require_verified_refuses_an_invite_without_identity_with_428() {
    let (mut c, _) = with_identity(cfg());
    c.identity.as_mut().unwrap().require_verified = true;
    let mut p = EdgeProxy::new(c);
    let inv = with_body(invite_from_network_head(), &peer_sdp());
    p.handle_datagram(Instant::now(), local(), sa(HOP), inv.as_bytes());
    let out = sent(&mut p);
    assert!(!out.iter().any(|(to, _)| *to == sa(PHONE)), "{out:?}");
    let first = out
        .iter()
        .find(|(to, _)| *to == sa(HOP))
        .map(|(_, m)| m.lines().next().unwrap_or("").to_owned());
    assert_eq!(first.as_deref(), Some("SIP/2.0 428 Use Identity Header"));
    assert!(p.calls().next().is_none());
}

#[test]
fn with_hip_off_the_edge_passes_sdp_untouched_and_says_the_call_is_unprotected() {
    let mut p = EdgeProxy::new(EdgeConfig {
        protect: false,
        ..cfg()
    });
    let now = Instant::now();
    let inv = invite_from_phone(PHONE_SDP);
    p.handle_datagram(now, local(), sa(PHONE), inv.as_bytes());
    let out = sent(&mut p);
    let fwd = &out[0].1;
    assert_eq!(body(fwd), body(&inv), "SDP untouched");
    let evs = events(&mut p);
    assert!(
        matches!(&evs[..], [EdgeEvent::Unprotected { why, .. }] if why.contains("HIP is off")),
        "{evs:?}"
    );
    // Neither ringing nor the answer starts HIP.
    let fwd_rr = fwd.replacen(
        "Record-Route:",
        "Record-Route: <sip:192.0.2.1:5070;transport=udp;lr;hip-edge>\r\nRecord-Route:",
        1,
    );
    for (status, sdp) in [("180 Ringing", None), ("200 OK", Some(PHONE_SDP))] {
        let r = answer(
            &fwd_rr,
            status,
            "Contact: <sip:bob@[fd00::9]:5062>\r\n",
            sdp,
        );
        p.handle_datagram(now, local(), sa(HOP), r.as_bytes());
        let back = sent(&mut p);
        assert_eq!(back.len(), 1, "{back:?}");
        if let Some(s) = sdp {
            assert_eq!(body(&back[0].1), s, "answer untouched");
        }
        assert_eq!(events(&mut p), vec![], "{status}");
    }
    assert!(p.call("call-1").unwrap().unprotected);
}

// The callee's signed UPDATE between two edges (draft §4.1): alice's edge (the usual one,
// signing for atlanta.com) and bob's at 192.0.2.1:5070 (phone 192.0.2.5:5062, signing for
// biloxi.com); the proxies between them pass messages through unchanged.

const BOB_EDGE: &str = "192.0.2.1:5070";
const BOB_PHONE: &str = "192.0.2.5:5062";

fn keys() -> (identity::SigningKey, identity::SigningKey, identity::Trust) {
    let a = identity::SigningKey::from_scalar(&[7; 32]).unwrap();
    let b = identity::SigningKey::from_scalar(&[9; 32]).unwrap();
    let mut trust = identity::Trust::default();
    trust.insert("atlanta.com", a.verifying_key());
    trust.insert("biloxi.com", b.verifying_key());
    (a, b, trust)
}

fn edge_pair() -> (EdgeProxy, EdgeProxy) {
    let (a, b, trust) = keys();
    let id = |key: identity::SigningKey, domain: &str| EdgeIdentity {
        signer: Some((key, format!("https://{domain}/id.pem"))),
        domain: domain.into(),
        trust: trust.clone(),
        window: 60,
        unix_now: fixed_clock,
        refuse_tampered: false,
        require_verified: false,
    };
    let alice = EdgeConfig {
        identity: Some(id(a, "atlanta.com")),
        ..cfg()
    };
    let bob = EdgeConfig {
        listeners: vec![(Transport::Udp, sa(BOB_EDGE))],
        clients: vec!["192.0.2.5".parse().unwrap(), "fd00::/64".parse().unwrap()],
        own: HostIdentity {
            hit: hit_of(PEER_HIT),
            hi: None,
        },
        identity: Some(id(b, "biloxi.com")),
        seed: 8,
        ..cfg()
    };
    (EdgeProxy::new(alice), EdgeProxy::new(bob))
}

fn out_of(p: &mut EdgeProxy) -> Vec<(SocketAddr, String)> {
    std::iter::from_fn(|| p.poll_transmit())
        .map(|t| (t.dest.addr, String::from_utf8(t.data.to_vec()).unwrap()))
        .collect()
}

fn only_to(out: &[(SocketAddr, String)], to: &str) -> String {
    let m: Vec<&String> = out
        .iter()
        .filter(|(d, _)| *d == sa(to))
        .map(|(_, m)| m)
        .collect();
    assert_eq!(m.len(), 1, "to {to}: {out:?}");
    m[0].clone()
}

/// A call from alice's phone to bob's through both edges, up to the ACK at bob's edge;
/// `on_answer` may alter bob's 200 on its way. Returns what bob's edge sent after the ACK.
fn call_to_the_ack(
    alice: &mut EdgeProxy,
    bob: &mut EdgeProxy,
    on_answer: impl Fn(String) -> String,
) -> Vec<(SocketAddr, String)> {
    let now = Instant::now();
    let inv = forwarded_from_phone(alice, now);
    // The registrar sends it to bob's phone: its Contact as Request-URI.
    let inv = inv.replacen(
        "INVITE sip:bob@biloxi.com ",
        &format!("INVITE sip:bob@{BOB_PHONE} "),
        1,
    );
    bob.handle_datagram(now, (Transport::Udp, sa(BOB_EDGE)), sa(HOP), inv.as_bytes());
    let at_phone = only_to(&out_of(bob), BOB_PHONE);
    let ok = answer(
        &at_phone,
        "200 OK",
        &format!("Contact: <sip:bob@{BOB_PHONE}>\r\n"),
        Some(PHONE_SDP),
    );
    bob.handle_datagram(
        now,
        (Transport::Udp, sa(BOB_EDGE)),
        sa(BOB_PHONE),
        ok.as_bytes(),
    );
    let ok = on_answer(only_to(&out_of(bob), HOP));
    alice.handle_datagram(now, local(), sa(HOP), ok.as_bytes());
    let at_alice = only_to(&out_of(alice), PHONE);
    assert!(at_alice.starts_with("SIP/2.0 200 OK\r\n"), "{at_alice}");
    // Alice's phone acknowledges along the route set (the reversed Record-Route).
    let mut routes: Vec<&str> = header(&at_alice, "Record-Route");
    routes.reverse();
    let ack = format!(
        "ACK sip:bob@{BOB_PHONE} SIP/2.0\r\nVia: SIP/2.0/UDP {PHONE};branch=z9hG4bKack1\r\n\
         Max-Forwards: 70\r\nRoute: {}\r\nFrom: {}\r\nTo: {}\r\nCall-ID: call-1\r\nCSeq: 2 ACK\r\n\
         Content-Length: 0\r\n\r\n",
        routes.join(", "),
        header(&at_alice, "From")[0],
        header(&at_alice, "To")[0],
    );
    alice.handle_datagram(now, local(), sa(PHONE), ack.as_bytes());
    let ack = only_to(&out_of(alice), BOB_EDGE);
    bob.handle_datagram(
        now,
        (Transport::Udp, sa(BOB_EDGE)),
        sa(EDGE),
        ack.as_bytes(),
    );
    out_of(bob)
}

#[test]
fn the_callees_edge_signs_an_update_that_the_callers_edge_verifies_and_keeps_from_its_phone() {
    let (mut alice, mut bob) = edge_pair();
    let after_ack = call_to_the_ack(&mut alice, &mut bob, |m| m);
    // The ACK reaches bob's phone, and an UPDATE leaves for alice's edge, signed over
    // bob's HIT for bob's identity.
    let _ = only_to(&after_ack, BOB_PHONE);
    let update = only_to(&after_ack, EDGE);
    assert!(
        update.starts_with("UPDATE sip:192.0.2.4:5070;transport=udp;lr;hip-edge SIP/2.0\r\n"),
        "{update}"
    );
    let ids: Vec<String> = header(&update, "Identity")
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (_, _, trust) = keys();
    let v = identity::verify_any(
        &ids,
        &trust,
        &identity::Expected {
            from_uri: "sip:bob@biloxi.com",
            to_uri: "sip:alice@atlanta.com",
            sdp_hits: &[hit_of(PEER_HIT)],
            now: IAT,
            window: 60,
        },
    )
    .unwrap()
    .unwrap();
    assert_eq!(v.domain, "biloxi.com");
    let now = Instant::now();
    let _ = events(&mut alice);
    let _ = events(&mut bob);

    // Someone else's UPDATE in the same dialog (another From) is refused and proves nothing.
    let forged = update
        .replacen("sip:bob@biloxi.com", "sip:mallory@biloxi.com", 1)
        .replacen("CSeq: 1 UPDATE", "CSeq: 7 UPDATE", 1);
    alice.handle_datagram(now, local(), sa(BOB_EDGE), forged.as_bytes());
    let r = only_to(&out_of(&mut alice), BOB_EDGE);
    assert!(r.starts_with("SIP/2.0 403 "), "{r}");
    assert!(matches!(
        &events(&mut alice)[..],
        [EdgeEvent::PeerUpdate { result: Err(why), tampering: false, .. }] if why.contains("not this call's callee")
    ));

    // The real one verifies against the answer's HIT; its 200 goes back, nothing to the phone.
    alice.handle_datagram(now, local(), sa(BOB_EDGE), update.as_bytes());
    let out = out_of(&mut alice);
    assert_eq!(out.len(), 1, "{out:?}");
    let ok = only_to(&out, BOB_EDGE);
    assert!(ok.starts_with("SIP/2.0 200 OK\r\n"), "{ok}");
    let evs = events(&mut alice);
    assert!(
        matches!(&evs[..], [EdgeEvent::PeerUpdate { call_id, result: Ok(v), tampering: false }]
            if call_id == "call-1" && v.domain == "biloxi.com" && v.hits == vec![hit_of(PEER_HIT)]),
        "{evs:?}"
    );
    // A retransmission gets the same answer and reports nothing again.
    alice.handle_datagram(now, local(), sa(BOB_EDGE), update.as_bytes());
    let again = only_to(&out_of(&mut alice), BOB_EDGE);
    assert!(again.starts_with("SIP/2.0 200 OK\r\n"), "{again}");
    assert_eq!(events(&mut alice), vec![]);

    // Bob's edge hears that its HIT reached the caller signed; the UPDATE stops.
    bob.handle_datagram(now, (Transport::Udp, sa(BOB_EDGE)), sa(EDGE), ok.as_bytes());
    assert_eq!(
        events(&mut bob),
        vec![EdgeEvent::OwnUpdate {
            call_id: "call-1".into(),
            result: Ok("biloxi.com".into())
        }]
    );
    bob.handle_timeout(now + Duration::from_secs(60));
    assert!(
        out_of(&mut bob).is_empty(),
        "retransmitted after its answer"
    );
    assert_eq!(events(&mut bob), vec![], "reported again when it expired");
}

#[test]
fn an_update_that_proves_the_answer_altered_is_refused_and_flags_the_call() {
    let (mut alice, mut bob) = edge_pair();
    // A proxy swaps bob's HIT in his answer for its own (same length, so Content-Length holds).
    let fake = hit_of("2001:20::66").to_hex();
    let bob_hex = hit_of(PEER_HIT).to_hex();
    let after_ack = call_to_the_ack(&mut alice, &mut bob, |m| m.replace(&bob_hex, &fake));
    let update = only_to(&after_ack, EDGE);
    let _ = events(&mut alice);
    let _ = events(&mut bob);
    let now = Instant::now();
    alice.handle_datagram(now, local(), sa(BOB_EDGE), update.as_bytes());
    let r = only_to(&out_of(&mut alice), BOB_EDGE);
    assert!(
        r.starts_with("SIP/2.0 438 Invalid Identity Header\r\n"),
        "{r}"
    );
    assert!(
        r.contains("altered on the path"),
        "the Warning says why: {r}"
    );
    let evs = events(&mut alice);
    assert!(
        matches!(&evs[..], [EdgeEvent::PeerUpdate { result: Err(why), tampering: true, .. }] if why.contains("altered")),
        "{evs:?}"
    );
    bob.handle_datagram(now, (Transport::Udp, sa(BOB_EDGE)), sa(EDGE), r.as_bytes());
    let evs = events(&mut bob);
    assert!(
        matches!(&evs[..], [EdgeEvent::OwnUpdate { result: Err(why), .. }] if why.contains("438")),
        "{evs:?}"
    );
}

#[test]
fn without_a_hip_edge_beside_the_caller_no_update_is_sent_and_the_reason_is_given() {
    let (_, mut bob) = edge_pair();
    let (a, _, _) = keys();
    let now = Instant::now();
    // A caller with a HIT but no hip edge in its Record-Route (a hip agent as UA).
    let inv = with_body(
        &format!(
            "INVITE sip:bob@{BOB_PHONE} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5060;branch=z9hG4bKk8\r\n\
             Max-Forwards: 68\r\nFrom: <sip:alice@atlanta.com>;tag=a9\r\nTo: <sip:bob@biloxi.com>\r\n\
             Call-ID: in-8\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.3:5062>\r\nIdentity: {}\r\n",
            passport(&a, "2001:20::4")
        ),
        &format!(
            "v=0\r\no=- 5 5 IN IP6 {OWN_HIT}\r\ns=-\r\nc=IN IP6 {OWN_HIT}\r\nt=0 0\r\n\
             m=audio 4000 RTP/AVP 0\r\na=key-mgmt:host-identity-tag {}\r\n",
            hit_of(OWN_HIT).to_hex()
        ),
    );
    bob.handle_datagram(now, (Transport::Udp, sa(BOB_EDGE)), sa(HOP), inv.as_bytes());
    let at_phone = only_to(&out_of(&mut bob), BOB_PHONE);
    let ok = answer(
        &at_phone,
        "200 OK",
        &format!("Contact: <sip:bob@{BOB_PHONE}>\r\n"),
        Some(PHONE_SDP),
    );
    bob.handle_datagram(
        now,
        (Transport::Udp, sa(BOB_EDGE)),
        sa(BOB_PHONE),
        ok.as_bytes(),
    );
    let _ = out_of(&mut bob);
    let _ = events(&mut bob);
    let ack = format!(
        "ACK sip:bob@{BOB_PHONE} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5060;branch=z9hG4bKack8\r\n\
         Max-Forwards: 70\r\nRoute: <sip:{BOB_EDGE};transport=udp;lr;hip-edge>\r\n\
         From: <sip:alice@atlanta.com>;tag=a9\r\nTo: <sip:bob@biloxi.com>;tag=b1\r\nCall-ID: in-8\r\n\
         CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    );
    bob.handle_datagram(now, (Transport::Udp, sa(BOB_EDGE)), sa(HOP), ack.as_bytes());
    let out = out_of(&mut bob);
    assert!(
        !out.iter().any(|(_, m)| m.starts_with("UPDATE ")),
        "{out:?}"
    );
    let evs = events(&mut bob);
    assert!(
        matches!(&evs[..], [EdgeEvent::OwnUpdate { result: Err(why), .. }] if why.contains("no hip edge beside the caller")),
        "{evs:?}"
    );
}

#[test]
fn an_unanswered_update_is_retransmitted_then_reported() {
    let (mut alice, mut bob) = edge_pair();
    let after_ack = call_to_the_ack(&mut alice, &mut bob, |m| m);
    let update = only_to(&after_ack, EDGE);
    let _ = events(&mut bob);
    let start = Instant::now();
    let mut copies = 0;
    let mut t = start;
    while t < start + Duration::from_secs(40) {
        t += Duration::from_millis(250);
        bob.handle_timeout(t);
        copies += out_of(&mut bob)
            .iter()
            .filter(|(_, m)| *m == update)
            .count();
    }
    assert!(copies >= 5, "{copies} retransmissions");
    let evs = events(&mut bob);
    assert!(
        matches!(&evs[..], [EdgeEvent::OwnUpdate { result: Err(why), .. }] if why.contains("no answer")),
        "{evs:?}"
    );
}
