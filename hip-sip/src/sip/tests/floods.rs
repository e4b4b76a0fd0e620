//! What an unauthenticated sender can make the UA hold and send (regressions of the
//! INVITE flood, the TCP drip and the nonce table).

use super::*;

fn invite_from(src: &str, n: u32) -> String {
    invite_from_peer(&format!("z9hG4bKf{n}"), &format!("flood-{n}@x"))
        .replace("192.0.2.9:5060", src)
}

fn first_lines(u: &mut UserAgent) -> Vec<String> {
    let mut v = Vec::new();
    while let Some(t) = u.poll_transmit() {
        v.push(
            String::from_utf8_lossy(&t.data)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        );
    }
    v
}

#[test]
fn an_invite_flood_holds_a_bounded_number_of_calls_and_gets_one_503_each() {
    // 3,000 well-formed INVITEs, never ACKed, from 3,000 addresses.
    let mut cfg = ua("bob", "biloxi.com", BOB, 2).config().clone();
    cfg.limits.max_pending_incoming = 50;
    let mut u = UserAgent::new(cfg);
    let t0 = Instant::now();
    let mut refused = 0;
    for n in 0..3000u32 {
        let src = format!("198.51.{}.{}:5060", n / 250, n % 250 + 1);
        let peer: SocketAddr = src.parse().unwrap();
        u.handle_datagram(t0, Transport::Udp, peer, invite_from(&src, n).as_bytes());
        let out = first_lines(&mut u);
        match out.as_slice() {
            [] => {}
            [one] if one == "SIP/2.0 503 Service Unavailable" => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(u.calls().len(), 50);
    assert_eq!(refused, 2950);
    assert_eq!(u.admission_stats().refused_busy, 2950);
    // The refused left no transaction behind: only the 50 admitted have one.
    assert_eq!(u.transaction_count().1, 50);
    // And nothing is retransmitted for them later.
    u.handle_timeout(t0 + Duration::from_secs(40));
    assert!(first_lines(&mut u).iter().all(|l| !l.contains("503")));
}

#[test]
fn one_source_cannot_start_calls_faster_than_its_rate() {
    let mut cfg = ua("bob", "biloxi.com", BOB, 2).config().clone();
    cfg.limits.invites_per_source = 2;
    cfg.limits.invite_burst_per_source = 4;
    let mut u = UserAgent::new(cfg);
    let t0 = Instant::now();
    let src = "192.0.2.9:5060";
    let peer: SocketAddr = src.parse().unwrap();
    let mut admitted = 0;
    for n in 0..20 {
        u.handle_datagram(t0, Transport::Udp, peer, invite_from(src, n).as_bytes());
        admitted += usize::from(!first_lines(&mut u).iter().any(|l| l.contains("503")));
    }
    assert_eq!(admitted, 4);
    assert_eq!(u.admission_stats().refused_rate, 16);
    // A retransmission of an admitted INVITE is not a new call: it is never refused.
    u.handle_datagram(t0, Transport::Udp, peer, invite_from(src, 0).as_bytes());
    assert!(!first_lines(&mut u).iter().any(|l| l.contains("503")));
    // Another source is not affected; and the rate refills.
    let other: SocketAddr = "192.0.2.10:5060".parse().unwrap();
    u.handle_datagram(
        t0,
        Transport::Udp,
        other,
        invite_from("192.0.2.10:5060", 100).as_bytes(),
    );
    assert!(!first_lines(&mut u).iter().any(|l| l.contains("503")));
    let t1 = t0 + Duration::from_secs(1);
    u.handle_datagram(t1, Transport::Udp, peer, invite_from(src, 200).as_bytes());
    assert!(!first_lines(&mut u).iter().any(|l| l.contains("503")));
}

#[test]
fn a_dripped_or_half_sent_request_is_cut_off_and_big_ones_refused() {
    let mut cfg = ua("bob", "biloxi.com", BOB, 2).config().clone();
    cfg.ports.push((Transport::Tcp, 5060));
    cfg.limits.max_message_bytes = 4096;
    let mut u = UserAgent::new(cfg);
    let t0 = Instant::now();
    let peer = addr("192.0.2.9:40000");
    let msg = options_from_peer("z9hG4bKd1").replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    // One byte a second: still incomplete after the timeout.
    for (i, b) in msg.as_bytes()[..20].iter().enumerate() {
        let now = t0 + Duration::from_secs(i as u64);
        assert!(u.handle_stream(now, Transport::Tcp, ConnId(1), peer, &[*b]));
        let expired = u.expired_streams(now);
        if i < 10 {
            assert!(expired.is_empty(), "at {i} s");
        } else {
            assert_eq!(expired, vec![ConnId(1)], "at {i} s");
            break;
        }
    }
    // A complete message resets the clock: a healthy connection is never cut.
    let t1 = t0 + Duration::from_secs(100);
    assert!(u.handle_stream(t1, Transport::Tcp, ConnId(2), peer, msg.as_bytes()));
    assert!(u.expired_streams(t1 + Duration::from_secs(60)).is_empty());
    assert_eq!(u.admission_stats().stream_timeouts, 1);
    // A header section growing past the cap is refused before it ends: framing is
    // lost, the driver closes the connection, nothing more is buffered.
    let head = msg.split("Content-Length").next().unwrap();
    assert!(u.handle_stream(t1, Transport::Tcp, ConnId(3), peer, head.as_bytes()));
    let pad = format!("X-Pad: {}\r\n", "a".repeat(1000));
    let mut open = true;
    for _ in 0..5 {
        open &= u.handle_stream(t1, Transport::Tcp, ConnId(3), peer, pad.as_bytes());
    }
    assert!(!open, "5 KB of header section, cap 4 KB");
}

#[test]
fn nonce_counts_are_bounded() {
    // Before: one entry per server nonce for the life of the daemon. A registrar that
    // hands out a fresh nonce on every refresh (each accepted) must not grow the table.
    let (mut sim, _) = registrar_sim("MD5");
    for i in 0..200u32 {
        let now = sim.now;
        sim.nodes[0].ua.register(now).unwrap();
        sim.settle();
        let req = String::from_utf8_lossy(&sim.log.last().unwrap().data).into_owned();
        sim.inject(
            0,
            "192.0.2.2:5060",
            &reply_to(
                &req,
                "401 Unauthorized",
                &format!("WWW-Authenticate: Digest realm=\"atlanta.com\", nonce=\"n{i}\"\r\n"),
            ),
        );
        let auth = String::from_utf8_lossy(&sim.log.last().unwrap().data).into_owned();
        assert!(header(&auth, "Authorization").is_some());
        sim.inject(
            0,
            "192.0.2.2:5060",
            &reply_to(
                &auth,
                "200 OK",
                "Contact: <sip:alice@192.0.2.1:5060>;expires=600\r\n",
            ),
        );
    }
    assert!(sim.nodes[0].ua.nonces_remembered() <= 16);
    assert!(sim.nodes[0].ua.nonces_remembered() > 0);
}
