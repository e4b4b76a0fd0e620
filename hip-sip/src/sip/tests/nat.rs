//! SIP through a NAT: the `received`/`rport` stamp (RFC 3581) and the keep-alives of the
//! registration flow (RFC 5626).

use super::*;

const NATTED: &str = "203.0.113.5:40123";

fn options_from_behind_a_nat() -> String {
    "OPTIONS sip:alice@192.0.2.1 SIP/2.0\r\n\
     Via: SIP/2.0/UDP 10.0.0.7:5060;rport;branch=z9hG4bKnat1\r\nMax-Forwards: 70\r\n\
     To: <sip:alice@atlanta.com>\r\nFrom: <sip:carol@chicago.com>;tag=n1\r\n\
     Call-ID: nat-options\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        .to_owned()
}

#[test]
fn a_request_from_behind_a_nat_is_answered_at_its_source_with_received_and_rport() {
    let mut sim = Sim::new(vec![ua("alice", "atlanta.com", ALICE, 1)]);
    sim.inject(0, NATTED, &options_from_behind_a_nat());
    let answer = sim.log.last().expect("an answer");
    assert_eq!(answer.first_line(), "SIP/2.0 200 OK");
    // To where the request came from, not to the private sent-by.
    assert_eq!(answer.to, addr(NATTED));
    let text = String::from_utf8_lossy(&answer.data).into_owned();
    assert_eq!(
        header(&text, "Via"),
        Some("SIP/2.0/UDP 10.0.0.7:5060;branch=z9hG4bKnat1;received=203.0.113.5;rport=40123")
    );
}

/// A registration answered 200 at once, with `extra` headers; returns the sim.
fn registered(extra: &str, keepalive: KeepAlive) -> Sim {
    let (mut sim, _) = registrar_sim("MD5");
    let mut cfg = sim.nodes[0].ua.config().clone();
    cfg.keepalive = keepalive;
    sim.nodes[0].ua = UserAgent::new(cfg);
    let now = sim.now;
    sim.nodes[0].ua.register(now).unwrap();
    sim.settle();
    let req = String::from_utf8_lossy(&sim.log[0].data).into_owned();
    sim.inject(0, "192.0.2.2:5060", &reply_to(&req, "200 OK", extra));
    assert!(
        sim.events(0)
            .iter()
            .any(|e| matches!(e, Event::Registered { .. }))
    );
    sim
}

/// Every gap between keep-alives (the first counted from the start) is `lo`–`hi` s.
fn assert_gaps(times: &[Duration], lo: u64, hi: u64) {
    let mut last = Duration::ZERO;
    for t in times {
        let gap = *t - last;
        assert!(
            (Duration::from_secs(lo)..=Duration::from_secs(hi)).contains(&gap),
            "gap {gap:?} in {times:?}"
        );
        last = *t;
    }
}

fn keepalive_times(sim: &Sim) -> Vec<Duration> {
    sim.log
        .iter()
        .filter(|w| w.to == addr("192.0.2.2:5060") && &w.data[..] == b"\r\n\r\n")
        .map(|w| w.at)
        .collect()
}

#[test]
fn a_registration_over_udp_is_kept_alive_every_24_to_29_seconds_until_removed() {
    let mut sim = registered(
        "Contact: <sip:alice@192.0.2.1:5060>;expires=600\r\n",
        KeepAlive::Rfc5626,
    );
    sim.run_until(Duration::from_secs(200));
    let times = keepalive_times(&sim);
    assert!(times.len() >= 6, "{times:?}");
    assert_gaps(&times, 24, 29);
    let st = sim.nodes[0].ua.keepalive_status().unwrap();
    assert_eq!(st.sent, times.len() as u64);
    assert_eq!(st.last.map(|l| l - sim.t0), times.last().copied());
    assert!(st.next.is_some());
    // Removing the registration stops them.
    let now = sim.now;
    sim.nodes[0].ua.unregister(now).unwrap();
    sim.settle();
    assert_eq!(sim.nodes[0].ua.keepalive_status().unwrap().next, None);
    let before = keepalive_times(&sim).len();
    sim.run_until(Duration::from_secs(400));
    assert_eq!(keepalive_times(&sim).len(), before);
}

#[test]
fn the_registrars_flow_timer_sets_the_interval_and_off_sends_none() {
    let mut sim = registered(
        "Contact: <sip:alice@192.0.2.1:5060>;expires=600\r\nFlow-Timer: 10\r\n",
        KeepAlive::Rfc5626,
    );
    sim.run_until(Duration::from_secs(60));
    let times = keepalive_times(&sim);
    assert!(times.len() >= 6, "{times:?}");
    assert_gaps(&times, 8, 10);
    let mut sim = registered(
        "Contact: <sip:alice@192.0.2.1:5060>;expires=600\r\nFlow-Timer: 10\r\n",
        KeepAlive::Off,
    );
    sim.run_until(Duration::from_secs(200));
    assert!(keepalive_times(&sim).is_empty());
    assert_eq!(sim.nodes[0].ua.keepalive_status().unwrap().next, None);
}

#[test]
fn a_ping_on_a_stream_gets_a_pong_and_the_next_request_still_parses() {
    let mut u = ua("alice", "atlanta.com", ALICE, 1);
    let t0 = Instant::now();
    let conn = ConnId(7);
    let peer = addr(NATTED);
    assert!(u.handle_stream(t0, Transport::Tcp, conn, peer, b"\r\n\r\n"));
    let pong = u.poll_transmit().expect("a pong");
    assert_eq!(&pong.data[..], b"\r\n");
    assert_eq!((pong.dest.addr, pong.dest.conn), (peer, Some(conn)));
    let req = options_from_behind_a_nat().replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    assert!(u.handle_stream(t0, Transport::Tcp, conn, peer, req.as_bytes()));
    let answer = u.poll_transmit().expect("an answer");
    assert!(answer.data.starts_with(b"SIP/2.0 200 OK"));
    // The CRLFs that end a message being received are part of it, not a ping.
    let head = &req[..req.len() - 4];
    assert!(u.handle_stream(t0, Transport::Tcp, conn, peer, head.as_bytes()));
    assert!(u.poll_transmit().is_none());
    assert!(u.handle_stream(t0, Transport::Tcp, conn, peer, b"\r\n\r\n"));
    let answer = u.poll_transmit().expect("an answer, no pong");
    assert!(answer.data.starts_with(b"SIP/2.0 200 OK"));
    assert!(u.poll_transmit().is_none());
    // A pong the registrar sends back to our own ping is no message and no error.
    assert!(u.handle_stream(t0, Transport::Tcp, conn, peer, b"\r\n"));
    assert!(u.poll_transmit().is_none());
    let again = req.replace("z9hG4bKnat1", "z9hG4bKnat2");
    assert!(u.handle_stream(t0, Transport::Tcp, conn, peer, again.as_bytes()));
    let answer = u.poll_transmit().expect("an answer after the pong");
    assert!(answer.data.starts_with(b"SIP/2.0 200 OK"));
}
