//! The SIP core on simulated time: two agents wired together, or one agent and a scripted
//! peer. No sockets, no sleeping; `Instant`s are a fixed origin plus offsets.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::*;

const ALICE: &str = "192.0.2.1:5060";
const BOB: &str = "192.0.2.4:5060";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Node {
    ua: UserAgent,
    addr: SocketAddr,
    /// (time, event)
    events: Vec<(Duration, Event)>,
    /// Auto-answer: ring, then answer with this SDP.
    auto_answer: Option<Bytes>,
}

/// A wire record: when, from, to, first line.
#[derive(Debug, Clone)]
struct Wire {
    at: Duration,
    from: SocketAddr,
    to: SocketAddr,
    data: Bytes,
}

impl Wire {
    fn first_line(&self) -> String {
        String::from_utf8_lossy(&self.data)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }
}

struct Sim {
    t0: Instant,
    now: Instant,
    nodes: Vec<Node>,
    /// Everything sent, including what was dropped or went nowhere.
    log: Vec<Wire>,
    /// Return true to drop a message on the wire.
    drop: Box<dyn FnMut(&Wire) -> bool>,
}

fn ua(user: &str, domain: &str, at: &str, seed: u64) -> UserAgent {
    let a = addr(at);
    let mut cfg = UaConfig::new(user, domain, &a.ip().to_string(), a.port());
    cfg.seed = seed;
    UserAgent::new(cfg)
}

impl Sim {
    fn new(uas: Vec<UserAgent>) -> Self {
        let t0 = Instant::now();
        Self {
            t0,
            now: t0,
            nodes: uas
                .into_iter()
                .map(|ua| {
                    let c = ua.config();
                    let addr = SocketAddr::new(c.contact_host.parse().unwrap(), c.ports[0].1);
                    Node {
                        ua,
                        addr,
                        events: Vec::new(),
                        auto_answer: None,
                    }
                })
                .collect(),
            log: Vec::new(),
            drop: Box::new(|_| false),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Delivers everything queued and handles events, at the current instant.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(t) = self.nodes[i].ua.poll_transmit() {
                    moved = true;
                    let w = Wire {
                        at: self.elapsed(),
                        from: self.nodes[i].addr,
                        to: t.dest.addr,
                        data: t.data.clone(),
                    };
                    self.log.push(w.clone());
                    if (self.drop)(&w) {
                        continue;
                    }
                    let now = self.now;
                    if let Some(n) = self.nodes.iter_mut().find(|n| n.addr == t.dest.addr) {
                        n.ua.handle_datagram(now, Transport::Udp, w.from, &t.data);
                    }
                }
                while let Some(e) = self.nodes[i].ua.poll_event() {
                    moved = true;
                    let now = self.now;
                    let node = &mut self.nodes[i];
                    if let (Event::IncomingCall { call, .. }, Some(sdp)) = (&e, &node.auto_answer) {
                        node.ua.ring(now, call.handle, 180).unwrap();
                        node.ua.answer(now, call.handle, Some(sdp.clone())).unwrap();
                    }
                    node.events.push((now - self.t0, e));
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Runs timers and deliveries until `t` after the start.
    fn run_until(&mut self, t: Duration) {
        let end = self.t0 + t;
        self.settle();
        loop {
            let next = self.nodes.iter().filter_map(|n| n.ua.poll_timeout()).min();
            match next {
                Some(d) if d <= end => {
                    self.now = self.now.max(d);
                    let now = self.now;
                    for n in &mut self.nodes {
                        n.ua.handle_timeout(now);
                    }
                    self.settle();
                }
                _ => break,
            }
        }
        self.now = self.now.max(end);
        self.settle();
    }

    fn run_for(&mut self, d: Duration) {
        let t = self.elapsed() + d;
        self.run_until(t);
    }

    /// Injects raw bytes into node `i` from `from`.
    fn inject(&mut self, i: usize, from: &str, data: &str) {
        let now = self.now;
        self.nodes[i]
            .ua
            .handle_datagram(now, Transport::Udp, addr(from), data.as_bytes());
        self.settle();
    }

    fn sent_by(&self, from: SocketAddr) -> Vec<&Wire> {
        self.log.iter().filter(|w| w.from == from).collect()
    }

    fn times_of(&self, from: SocketAddr, first_line_prefix: &str) -> Vec<Duration> {
        self.sent_by(from)
            .into_iter()
            .filter(|w| w.first_line().starts_with(first_line_prefix))
            .map(|w| w.at)
            .collect()
    }

    fn events(&self, i: usize) -> Vec<&Event> {
        self.nodes[i].events.iter().map(|(_, e)| e).collect()
    }
}

fn sdp(user: &str, hit: &str) -> Bytes {
    Bytes::from(format!(
        "v=0\r\no={user} 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 3456 RTP/AVP 0\r\na=key-mgmt:host-identity-tag {hit}\r\n"
    ))
}

/// alice (node 0) and bob (node 1), bob answering every call with his SDP.
fn alice_and_bob() -> Sim {
    let mut sim = Sim::new(vec![
        ua("alice", "atlanta.com", ALICE, 1),
        ua("bob", "biloxi.com", BOB, 2),
    ]);
    sim.nodes[1].auto_answer = Some(sdp("bob", "2001:20::b"));
    sim
}

/// [`alice_and_bob`] after alice's call to bob was answered and acknowledged (10 ms).
fn answered_call() -> (Sim, CallHandle) {
    let mut sim = alice_and_bob();
    let now = sim.now;
    let h = sim.nodes[0]
        .ua
        .call(now, "sip:bob@192.0.2.4", Some(sdp("alice", "2001:20::a")))
        .unwrap();
    sim.run_for(ms(10));
    (sim, h)
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn a_call_between_two_agents_completes_and_leaves_nothing_behind() {
    let (mut sim, h) = answered_call();
    let lines: Vec<String> = sim.log.iter().map(Wire::first_line).collect();
    assert_eq!(
        lines,
        vec![
            "INVITE sip:bob@192.0.2.4 SIP/2.0",
            "SIP/2.0 180 Ringing",
            "SIP/2.0 200 OK",
            "ACK sip:bob@192.0.2.4:5060 SIP/2.0",
        ]
    );
    // Alice saw ringing and the answer with Bob's SDP; Bob saw the offer and the ACK.
    let a = sim.events(0);
    assert!(matches!(a[0], Event::Ringing { status: 180, .. }));
    match a[1] {
        Event::Answered { call, remote_sdp } => {
            assert_eq!(call.state, CallState::Confirmed);
            assert_eq!(call.remote_uri, "sip:bob@192.0.2.4");
            assert!(String::from_utf8_lossy(remote_sdp.as_ref().unwrap()).contains("2001:20::b"));
        }
        e => panic!("{e:?}"),
    }
    let b = sim.events(1);
    match b[0] {
        Event::IncomingCall {
            call, remote_sdp, ..
        } => {
            assert_eq!(call.remote_uri, "sip:alice@atlanta.com");
            assert_eq!(call.direction, Direction::Incoming);
            assert!(String::from_utf8_lossy(remote_sdp.as_ref().unwrap()).contains("2001:20::a"));
        }
        e => panic!("{e:?}"),
    }
    assert!(matches!(b[1], Event::Confirmed { .. }));
    // Dialog identifiers match on both sides.
    let ai = sim.nodes[0].ua.call_info(h).unwrap();
    let bi = sim.nodes[1].ua.calls()[0].clone();
    assert_eq!(ai.call_id, bi.call_id);

    // Alice hangs up: BYE / 200, both calls end.
    let now = sim.now;
    sim.nodes[0].ua.hangup(now, h).unwrap();
    sim.run_for(ms(10));
    assert_eq!(sim.log[4].first_line().split(' ').next(), Some("BYE"));
    assert_eq!(sim.log[5].first_line(), "SIP/2.0 200 OK");
    assert!(matches!(
        sim.events(0).last(),
        Some(Event::Ended {
            reason: EndReason::LocalBye,
            ..
        })
    ));
    assert!(matches!(
        sim.events(1).last(),
        Some(Event::Ended {
            reason: EndReason::RemoteBye,
            ..
        })
    ));
    assert!(sim.nodes[0].ua.calls().is_empty() && sim.nodes[1].ua.calls().is_empty());
    // After the absorption timers (L, M, J, K: at most 64·T1), no transaction or timer is left.
    sim.run_for(Duration::from_secs(40));
    for n in &sim.nodes {
        assert_eq!(n.ua.transaction_count(), (0, 0));
        assert_eq!(n.ua.timer_count(), 0);
    }
    // Nothing was retransmitted on a lossless link.
    assert_eq!(sim.log.len(), 6);
}

#[test]
fn timer_a_doubles_invite_retransmissions_and_timer_b_ends_the_call() {
    let mut sim = Sim::new(vec![ua("alice", "atlanta.com", ALICE, 1)]);
    let now = sim.now;
    sim.nodes[0]
        .ua
        .call(now, "sip:nobody@192.0.2.99", None)
        .unwrap();
    sim.run_until(Duration::from_secs(40));
    let times = sim.times_of(addr(ALICE), "INVITE");
    // RFC 3261 §17.1.1.2: T1, 2T1, 4T1… with no cap, until Timer B = 64·T1.
    let expect: Vec<Duration> = [0, 500, 1500, 3500, 7500, 15500, 31500].map(ms).to_vec();
    assert_eq!(times, expect);
    let (at, e) = sim.nodes[0].events.last().unwrap();
    assert_eq!(*at, Duration::from_secs(32));
    assert!(
        matches!(
            e,
            Event::Ended {
                reason: EndReason::Timeout,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

#[test]
fn timer_e_caps_at_t2_and_timer_f_ends_a_non_invite_request() {
    let mut sim = Sim::new(vec![ua("alice", "atlanta.com", ALICE, 1)]);
    let now = sim.now;
    let id = sim.nodes[0].ua.options(now, "sip:192.0.2.99").unwrap();
    sim.run_until(Duration::from_secs(40));
    let times = sim.times_of(addr(ALICE), "OPTIONS");
    // §17.1.2.2: T1 doubling, capped at T2 = 4 s, until Timer F = 64·T1.
    let expect: Vec<Duration> = [
        0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500,
    ]
    .map(ms)
    .to_vec();
    assert_eq!(times, expect);
    assert_eq!(
        sim.nodes[0].events.last().unwrap(),
        &(
            Duration::from_secs(32),
            Event::OptionsResult { id, status: None }
        )
    );
}

fn invite_from_peer(branch: &str, call_id: &str) -> String {
    format!(
        "INVITE sip:bob@192.0.2.4 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.9:5060;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         To: <sip:bob@biloxi.com>\r\n\
         From: <sip:carol@chicago.com>;tag=c1\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:carol@192.0.2.9>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn ack_from_peer(branch: &str, call_id: &str, to_tag: &str) -> String {
    format!(
        "ACK sip:bob@192.0.2.4 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.9:5060;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         To: <sip:bob@biloxi.com>;tag={to_tag}\r\n\
         From: <sip:carol@chicago.com>;tag=c1\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn incoming(sim: &Sim, node: usize) -> CallHandle {
    sim.events(node)
        .iter()
        .find_map(|e| match e {
            Event::IncomingCall { call, .. } => Some(call.handle),
            _ => None,
        })
        .expect("an incoming call")
}

fn to_tag_in(w: &Wire) -> String {
    let s = String::from_utf8_lossy(&w.data).into_owned();
    header(&s, "To")
        .unwrap()
        .split("tag=")
        .nth(1)
        .unwrap()
        .to_owned()
}

#[test]
fn timer_g_retransmits_a_rejection_until_the_ack_then_timer_i_absorbs() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    sim.inject(0, "192.0.2.9:5060", &invite_from_peer("z9hG4bKg1", "g@x"));
    let h = incoming(&sim, 0);
    let now = sim.now;
    sim.nodes[0].ua.reject(now, h, 486, "Busy Here").unwrap();
    sim.run_until(ms(5000));
    // §17.2.1: 486 at 0, then Timer G at T1, 2T1, 4T1 (capped at T2).
    assert_eq!(
        sim.times_of(addr(BOB), "SIP/2.0 486"),
        [0, 500, 1500, 3500].map(ms).to_vec()
    );
    let tag = to_tag_in(sim.sent_by(addr(BOB))[0]);
    sim.inject(
        0,
        "192.0.2.9:5060",
        &ack_from_peer("z9hG4bKg1", "g@x", &tag),
    );
    sim.run_until(ms(9000));
    // The ACK stopped Timer G; the transaction waits Timer I = T4 (5 s) for ACK copies.
    assert_eq!(sim.times_of(addr(BOB), "SIP/2.0 486").len(), 4);
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 1));
    sim.run_until(ms(10_001));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

#[test]
fn timer_h_gives_up_when_no_ack_comes() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    sim.inject(0, "192.0.2.9:5060", &invite_from_peer("z9hG4bKh1", "h@x"));
    let h = incoming(&sim, 0);
    let now = sim.now;
    sim.nodes[0].ua.reject(now, h, 603, "Decline").unwrap();
    sim.run_until(ms(31_999));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 1));
    let times = sim.times_of(addr(BOB), "SIP/2.0 603");
    assert_eq!(
        times,
        [
            0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
        .map(ms)
        .to_vec()
    );
    sim.run_until(ms(32_000));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

fn options_from_peer(branch: &str) -> String {
    format!(
        "OPTIONS sip:bob@192.0.2.4 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.9:5060;branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         To: <sip:bob@biloxi.com>\r\n\
         From: <sip:carol@chicago.com>;tag=o1\r\n\
         Call-ID: opt@x\r\n\
         CSeq: 7 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn timer_j_answers_retransmitted_requests_from_the_transaction() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    sim.inject(0, "192.0.2.9:5060", &options_from_peer("z9hG4bKj1"));
    let first = sim.sent_by(addr(BOB))[0].data.clone();
    assert!(String::from_utf8_lossy(&first).starts_with("SIP/2.0 200 OK"));
    assert!(
        String::from_utf8_lossy(&first)
            .contains("Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE")
    );
    sim.run_until(ms(1000));
    sim.inject(0, "192.0.2.9:5060", &options_from_peer("z9hG4bKj1"));
    // The retransmission got the very same response back, not a new one (§17.2.2).
    assert_eq!(sim.sent_by(addr(BOB)).len(), 2);
    assert_eq!(sim.sent_by(addr(BOB))[1].data, first);
    sim.run_until(ms(31_999));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 1));
    sim.run_until(ms(32_000));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

#[test]
fn timer_k_and_d_absorb_response_retransmissions() {
    // Alice sends OPTIONS to Bob; Bob answers at once. Alice's transaction lingers Timer K
    // (T4) for copies of the response.
    let mut sim = Sim::new(vec![
        ua("alice", "atlanta.com", ALICE, 1),
        ua("bob", "biloxi.com", BOB, 2),
    ]);
    let now = sim.now;
    let id = sim.nodes[0].ua.options(now, "sip:bob@192.0.2.4").unwrap();
    sim.run_until(ms(1));
    assert!(sim.events(0).contains(&&Event::OptionsResult {
        id,
        status: Some(200)
    }));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (1, 0));
    sim.run_until(ms(4999));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (1, 0));
    sim.run_until(ms(5000));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));

    // Alice calls; Bob rejects. Alice's transaction ACKs the 486 itself and stays in Timer
    // D (32 s), re-ACKing a retransmitted 486 without telling the TU again.
    let now = sim.now;
    sim.nodes[0]
        .ua
        .call(now, "sip:bob@192.0.2.4", None)
        .unwrap();
    sim.settle();
    let h = incoming(&sim, 1);
    let now = sim.now;
    sim.nodes[1].ua.reject(now, h, 486, "Busy Here").unwrap();
    sim.run_for(ms(10));
    let acks = |s: &Sim| s.times_of(addr(ALICE), "ACK").len();
    assert_eq!(acks(&sim), 1);
    let ended = sim
        .events(0)
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Ended {
                    reason: EndReason::Rejected { status: 486, .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(ended, 1);
    // Bob's 486 reached Alice and was ACKed, so Bob does not retransmit; replay it by hand.
    let resp = sim
        .sent_by(addr(BOB))
        .into_iter()
        .find(|w| w.first_line().starts_with("SIP/2.0 486"))
        .unwrap()
        .data
        .clone();
    let now = sim.now;
    sim.nodes[0]
        .ua
        .handle_datagram(now, Transport::Udp, addr(BOB), &resp);
    sim.settle();
    assert_eq!(acks(&sim), 2, "the retransmitted 486 is ACKed again");
    assert_eq!(sim.nodes[0].ua.transaction_count().0, 1);
    sim.run_for(Duration::from_secs(33));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

#[test]
fn a_lossy_link_still_completes_the_call_through_retransmissions() {
    let mut sim = alice_and_bob();
    // Lose the first INVITE, the first 200 OK and the first ACK.
    let mut lost = (false, false, false);
    sim.drop = Box::new(move |w| {
        let l = w.first_line();
        if l.starts_with("INVITE") && !lost.0 {
            lost.0 = true;
            return true;
        }
        if l.starts_with("SIP/2.0 200") && !lost.1 {
            lost.1 = true;
            return true;
        }
        if l.starts_with("ACK") && !lost.2 {
            lost.2 = true;
            return true;
        }
        false
    });
    let now = sim.now;
    sim.nodes[0]
        .ua
        .call(now, "sip:bob@192.0.2.4", Some(sdp("alice", "2001:20::a")))
        .unwrap();
    sim.run_until(ms(3000));
    // INVITE retransmitted by Timer A at 500 ms; Bob's 2xx retransmitted by its TU
    // (§13.3.1.4) at +500 ms; the lost ACK is re-sent on the next 2xx copy (at +1500 ms).
    assert_eq!(sim.times_of(addr(ALICE), "INVITE"), vec![ms(0), ms(500)]);
    assert_eq!(
        sim.times_of(addr(BOB), "SIP/2.0 200"),
        vec![ms(500), ms(1000), ms(2000)]
    );
    assert_eq!(sim.times_of(addr(ALICE), "ACK"), vec![ms(1000), ms(2000)]);
    assert!(
        sim.events(0)
            .iter()
            .any(|e| matches!(e, Event::Answered { .. }))
    );
    let confirmed: Vec<Duration> = sim.nodes[1]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Confirmed { .. }))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(confirmed, vec![ms(2000)]);
    // Exactly one Answered despite the duplicate 2xx.
    assert_eq!(
        sim.events(0)
            .iter()
            .filter(|e| matches!(e, Event::Answered { .. }))
            .count(),
        1
    );
}

#[test]
fn no_ack_for_a_2xx_ends_the_call_with_bye_after_64_t1() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    sim.nodes[0].auto_answer = Some(sdp("bob", "2001:20::b"));
    sim.inject(0, "192.0.2.9:5060", &invite_from_peer("z9hG4bKn1", "n@x"));
    sim.run_until(Duration::from_secs(33));
    let times = sim.times_of(addr(BOB), "SIP/2.0 200");
    assert_eq!(
        times,
        [
            0, 500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500
        ]
        .map(ms)
        .to_vec()
    );
    // The BYE goes out at 64·T1 (and is itself retransmitted by Timer E, unanswered here).
    assert_eq!(
        sim.times_of(addr(BOB), "BYE"),
        vec![Duration::from_secs(32), ms(32_500)]
    );
    let bye = sim
        .sent_by(addr(BOB))
        .into_iter()
        .find(|w| w.first_line().starts_with("BYE"))
        .unwrap();
    assert_eq!(bye.first_line(), "BYE sip:carol@192.0.2.9 SIP/2.0");
    assert_eq!(bye.to, addr("192.0.2.9:5060"));
    assert!(matches!(
        sim.nodes[0].events.last().unwrap().1,
        Event::Ended {
            reason: EndReason::Timeout,
            ..
        }
    ));
}

#[test]
fn cancel_before_answer_ends_both_sides() {
    let mut sim = Sim::new(vec![
        ua("alice", "atlanta.com", ALICE, 1),
        ua("bob", "biloxi.com", BOB, 2),
    ]);
    let now = sim.now;
    let h = sim.nodes[0]
        .ua
        .call(now, "sip:bob@192.0.2.4", None)
        .unwrap();
    // Hang up before any provisional: the CANCEL waits for one (§9.1).
    sim.nodes[0].ua.hangup(now, h).unwrap();
    sim.settle();
    let b = incoming(&sim, 1);
    assert!(sim.times_of(addr(ALICE), "CANCEL").is_empty());
    let now = sim.now;
    sim.nodes[1].ua.ring(now, b, 180).unwrap();
    sim.run_for(ms(10));
    let lines: Vec<String> = sim.log.iter().map(Wire::first_line).collect();
    assert_eq!(
        lines,
        vec![
            "INVITE sip:bob@192.0.2.4 SIP/2.0",
            "SIP/2.0 180 Ringing",
            "CANCEL sip:bob@192.0.2.4 SIP/2.0",
            "SIP/2.0 200 OK",
            "SIP/2.0 487 Request Terminated",
            "ACK sip:bob@192.0.2.4 SIP/2.0",
        ]
    );
    // CANCEL carries the INVITE's branch (§9.1).
    let branch = |w: &Wire| {
        let s = String::from_utf8_lossy(&w.data).into_owned();
        header(&s, "Via")
            .unwrap()
            .split("branch=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(branch(&sim.log[0]), branch(&sim.log[2]));
    assert!(matches!(
        sim.events(0).last(),
        Some(Event::Ended {
            reason: EndReason::Cancelled,
            ..
        })
    ));
    assert!(matches!(
        sim.events(1).last(),
        Some(Event::Ended {
            reason: EndReason::Cancelled,
            ..
        })
    ));
}

#[test]
fn update_carries_new_sdp_both_ways() {
    let (mut sim, h) = answered_call();
    let now = sim.now;
    sim.nodes[0]
        .ua
        .update(now, h, sdp("alice", "2001:20::aa"))
        .unwrap();
    sim.run_for(ms(10));
    let up = sim
        .log
        .iter()
        .find(|w| w.first_line().starts_with("UPDATE"))
        .unwrap();
    let s = String::from_utf8_lossy(&up.data).into_owned();
    assert!(header(&s, "To").unwrap().contains("tag="), "in-dialog: {s}");
    assert!(sim.events(1).iter().any(|e| matches!(e, Event::RemoteSdp { sdp, .. } if String::from_utf8_lossy(sdp).contains("2001:20::aa"))));
    assert!(sim.events(0).iter().any(|e| matches!(e, Event::RemoteSdp { sdp, .. } if String::from_utf8_lossy(sdp).contains("2001:20::b"))));
}

/// Mobility: alice's host moves to a new address. An UPDATE without an offer carries her
/// new Contact (a target refresh, RFC 3311 §5.1), after which bob's in-dialog requests go
/// there — his BYE reaches her at the new address. No re-INVITE, no SDP.
#[test]
fn a_target_refresh_moves_the_dialog_to_the_new_address() {
    let (mut sim, h) = answered_call();
    let bob_call = sim.nodes[1].ua.calls()[0].handle;
    let bob_target = |sim: &Sim| sim.nodes[1].ua.call_info(bob_call).unwrap().remote_target;
    assert_eq!(
        bob_target(&sim).as_deref(),
        Some("sip:alice@192.0.2.1:5060")
    );
    // Refused before the dialog is confirmed, and for unknown calls.
    assert!(
        sim.nodes[0]
            .ua
            .refresh_target(sim.now, CallHandle(99))
            .is_err()
    );

    const MOVED: &str = "192.0.2.11:5060";
    sim.nodes[0].ua.set_contact_host("192.0.2.11");
    sim.nodes[0].addr = addr(MOVED);
    let before = sim.log.len();
    let now = sim.now;
    sim.nodes[0].ua.refresh_target(now, h).unwrap();
    sim.run_for(ms(10));
    let up = &sim.log[before];
    let text = String::from_utf8_lossy(&up.data).into_owned();
    assert!(up.first_line().starts_with("UPDATE sip:bob@"), "{text}");
    assert_eq!(
        header(&text, "Contact"),
        Some("<sip:alice@192.0.2.11:5060>")
    );
    assert!(
        header(&text, "Via").unwrap().contains("192.0.2.11:5060"),
        "{text}"
    );
    assert_eq!(
        header(&text, "Content-Length"),
        Some("0"),
        "no offer: {text}"
    );
    assert_eq!(sim.log[before + 1].first_line(), "SIP/2.0 200 OK");
    assert_eq!(sim.log[before + 1].to, addr(MOVED));
    assert_eq!(
        bob_target(&sim).as_deref(),
        Some("sip:alice@192.0.2.11:5060")
    );
    // No SDP travelled: bob saw no new offer, alice got her UpdateResult.
    assert!(
        !sim.events(1)
            .iter()
            .any(|e| matches!(e, Event::RemoteSdp { .. }))
    );
    assert!(sim.events(0).iter().any(|e| matches!(
        e,
        Event::UpdateResult {
            status: Some(200),
            ..
        }
    )));

    // Bob hangs up: the BYE goes to alice's new address and ends both calls.
    let now = sim.now;
    sim.nodes[1].ua.hangup(now, bob_call).unwrap();
    sim.run_for(ms(10));
    let bye = sim
        .log
        .iter()
        .rev()
        .find(|w| w.first_line().starts_with("BYE"))
        .unwrap();
    assert_eq!(bye.to, addr(MOVED));
    assert!(sim.nodes[0].ua.calls().is_empty() && sim.nodes[1].ua.calls().is_empty());
}

/// The draft's §4.1: the caller's INVITE carries SIP Identity; the callee, whose 200 cannot
/// (RFC 8224 signs requests), follows its answer with a signed UPDATE. Signed and verified
/// here with `crate::identity` end to end over the simulated wire.
#[test]
fn identity_rides_on_the_invite_and_on_the_callees_update() {
    use crate::identity::{self, Claims, Expected, SigningKey, Trust};
    let (ka, kb) = (
        SigningKey::from_scalar(&[3; 32]).unwrap(),
        SigningKey::from_scalar(&[4; 32]).unwrap(),
    );
    let mut trust = Trust::default();
    trust.insert("atlanta.com", ka.verifying_key());
    trust.insert("192.0.2.4", kb.verifying_key());
    let (hit_a, hit_b): (crate::sdp::Hit, crate::sdp::Hit) =
        ("2001:20::a".parse().unwrap(), "2001:20::b".parse().unwrap());
    let mut sim = alice_and_bob();
    let target = "sip:bob@192.0.2.4";
    let claims = |orig: &str, dest: &str, hit| Claims {
        orig: identity::canonical(orig).unwrap(),
        dest: vec![identity::canonical(dest).unwrap()],
        iat: 1000,
        hits: vec![hit],
    };
    let now = sim.now;
    let aor = sim.nodes[0].ua.aor();
    assert_eq!(aor, "sip:alice@atlanta.com");
    let signed = identity::sign(&ka, &claims(&aor, target, hit_a), "https://atlanta.com/c");
    let h = sim.nodes[0]
        .ua
        .call_signed(
            now,
            target,
            Some(sdp("alice", "2001:20::a")),
            Some(signed.clone()),
        )
        .unwrap();
    sim.run_for(ms(10));
    let verify = |auth: &RequestAuth, hit| {
        identity::verify_any(
            &auth.identity,
            &trust,
            &Expected {
                from_uri: &auth.from_uri,
                to_uri: &auth.to_uri,
                sdp_hits: &[hit],
                now: 1010,
                window: 60,
            },
        )
    };
    let (bob_call, auth) = sim
        .events(1)
        .into_iter()
        .find_map(|e| match e {
            Event::IncomingCall { call, auth, .. } => Some((call.clone(), auth.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(auth.identity, vec![signed]);
    assert_eq!(auth.transport, Some(Transport::Udp));
    assert!(!auth.sips && !bob_call.sips);
    assert_eq!(
        verify(&auth, hit_a).unwrap().unwrap().orig,
        "sip:alice@atlanta.com"
    );
    // Alice sent Allow with UPDATE; so did Bob's 200.
    assert_eq!(
        sim.nodes[1].ua.peer_allows(bob_call.handle, "UPDATE"),
        Some(true)
    );
    assert_eq!(sim.nodes[0].ua.peer_allows(h, "update"), Some(true));
    assert_eq!(sim.nodes[0].ua.peer_allows(h, "PRACK"), Some(false));

    // Bob's UPDATE: From is his dialog URI (Alice's To), To is Alice.
    let bob_sdp = sim.nodes[1]
        .ua
        .call_sdp(bob_call.handle)
        .unwrap()
        .0
        .unwrap();
    let up = identity::sign(
        &kb,
        &claims(&bob_call.local_uri, &bob_call.remote_uri, hit_b),
        "https://biloxi.com/c",
    );
    let now = sim.now;
    sim.nodes[1]
        .ua
        .update_signed(now, bob_call.handle, bob_sdp, Some(up))
        .unwrap();
    sim.run_for(ms(10));
    let auth = sim
        .events(0)
        .into_iter()
        .find_map(|e| match e {
            Event::RemoteSdp { auth: Some(a), .. } => Some(a.clone()),
            _ => None,
        })
        .expect("alice got the UPDATE's SDP with its request");
    assert_eq!(auth.from_uri, "sip:bob@192.0.2.4");
    assert_eq!(auth.to_uri, "sip:alice@atlanta.com");
    assert_eq!(verify(&auth, hit_b).unwrap().unwrap().domain, "192.0.2.4");
    // Bob learns that his UPDATE was accepted; the answer's SDP came without a request.
    let b = sim.events(1);
    assert!(
        b.iter().any(|e| matches!(
            e,
            Event::UpdateResult {
                status: Some(200),
                ..
            }
        )),
        "{b:?}"
    );
    assert!(
        b.iter()
            .any(|e| matches!(e, Event::RemoteSdp { auth: None, .. }))
    );
}

#[test]
fn an_unanswered_update_is_reported() {
    let (mut sim, h) = answered_call();
    // From now on nothing reaches Bob.
    sim.drop = Box::new(|w| w.to == addr(BOB));
    let now = sim.now;
    sim.nodes[0]
        .ua
        .update(now, h, sdp("alice", "2001:20::aa"))
        .unwrap();
    sim.run_for(Duration::from_secs(40));
    assert!(
        sim.events(0)
            .iter()
            .any(|e| matches!(e, Event::UpdateResult { status: None, .. })),
        "{:?}",
        sim.events(0)
    );
}

// ------------------------------------------------------------------------- digest

/// RFC 2617 §3.5's example (MD5, qop=auth) and RFC 7616 §3.9.1's (SHA-256 and MD5).
#[test]
fn digest_matches_the_rfc_examples() {
    let ch = |realm: &str, nonce: &str, alg, opaque: Option<&str>| DigestChallenge {
        realm: realm.into(),
        nonce: nonce.into(),
        opaque: opaque.map(Into::into),
        algorithm: alg,
        qop_auth: true,
        from_proxy: false,
    };
    let r = digest_response(
        &ch(
            "testrealm@host.com",
            "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            DigestAlgorithm::Md5,
            None,
        ),
        "Mufasa",
        "Circle Of Life",
        "GET",
        "/dir/index.html",
        1,
        "0a4f113b",
    );
    assert!(
        r.contains("response=\"6629fae49393a05397450978507c4ef1\""),
        "{r}"
    );
    let nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    let cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
    let opaque = Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS");
    let r = digest_response(
        &ch(
            "http-auth@example.org",
            nonce,
            DigestAlgorithm::Sha256,
            opaque,
        ),
        "Mufasa",
        "Circle of Life",
        "GET",
        "/dir/index.html",
        1,
        cnonce,
    );
    assert!(
        r.contains("response=\"753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1\""),
        "{r}"
    );
    assert!(r.contains("algorithm=SHA-256"));
    let r = digest_response(
        &ch("http-auth@example.org", nonce, DigestAlgorithm::Md5, opaque),
        "Mufasa",
        "Circle of Life",
        "GET",
        "/dir/index.html",
        1,
        cnonce,
    );
    assert!(
        r.contains("response=\"8ca523f5e9506fed4657c9700eebdbec\""),
        "{r}"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn param<'a>(v: &'a str, name: &str) -> &'a str {
    v.split(',')
        .find_map(|p| {
            let (n, val) = p.trim().split_once('=')?;
            (n.trim() == name).then(|| val.trim().trim_matches('"'))
        })
        .unwrap_or_else(|| panic!("{name} missing in {v}"))
}

fn registrar_sim(alg: &str) -> (Sim, SocketAddr) {
    let mut u = ua("alice", "atlanta.com", ALICE, 1);
    let mut cfg = u.config().clone();
    let registrar = addr("192.0.2.2:5060");
    cfg.registrar = Some((Transport::Udp, registrar));
    cfg.password = Some("s3cret".into());
    cfg.register_expires = 600;
    u = UserAgent::new(cfg);
    let _ = alg;
    (Sim::new(vec![u]), registrar)
}

fn reply_to(req: &str, status: &str, extra: &str) -> String {
    let mut out = format!("SIP/2.0 {status}\r\n");
    for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
        if let Some(v) = header(req, name) {
            if name == "To" && !v.contains("tag=") {
                out.push_str(&format!("To: {v};tag=reg1\r\n"));
            } else {
                out.push_str(&format!("{name}: {v}\r\n"));
            }
        }
    }
    out.push_str(extra);
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

#[test]
fn register_answers_a_sha256_challenge_and_refreshes_at_half_the_lifetime() {
    let (mut sim, registrar) = registrar_sim("SHA-256");
    let now = sim.now;
    sim.nodes[0].ua.register(now).unwrap();
    sim.settle();
    let first = String::from_utf8_lossy(&sim.log[0].data).into_owned();
    assert!(first.starts_with("REGISTER sip:atlanta.com SIP/2.0"));
    assert_eq!(sim.log[0].to, registrar);
    assert!(header(&first, "Authorization").is_none());
    sim.inject(
        0,
        "192.0.2.2:5060",
        &reply_to(&first, "401 Unauthorized", "WWW-Authenticate: Digest realm=\"atlanta.com\", nonce=\"abc123\", qop=\"auth\", algorithm=MD5\r\nWWW-Authenticate: Digest realm=\"atlanta.com\", nonce=\"abc123\", qop=\"auth\", algorithm=SHA-256\r\n"),
    );
    let second = String::from_utf8_lossy(&sim.log[1].data).into_owned();
    assert_eq!(header(&second, "Call-ID"), header(&first, "Call-ID"));
    assert_eq!(header(&second, "CSeq"), Some("2 REGISTER"));
    let auth = header(&second, "Authorization").expect("credentials");
    // The stronger algorithm was chosen, and the response is what the RFC 7616 §3.4.1
    // formula gives, computed here independently.
    assert_eq!(param(auth, "algorithm"), "SHA-256");
    let h = |s: String| hex(&Sha256::digest(s.as_bytes()));
    let ha1 = h("alice:atlanta.com:s3cret".into());
    let ha2 = h("REGISTER:sip:atlanta.com".into());
    let expected = h(format!(
        "{ha1}:abc123:{}:{}:auth:{ha2}",
        param(auth, "nc"),
        param(auth, "cnonce")
    ));
    assert_eq!(param(auth, "response"), expected);
    assert_eq!(param(auth, "uri"), "sip:atlanta.com");
    sim.inject(
        0,
        "192.0.2.2:5060",
        &reply_to(
            &second,
            "200 OK",
            "Contact: <sip:alice@192.0.2.1:5060>;expires=120\r\n",
        ),
    );
    assert!(sim.events(0).contains(&&Event::Registered { expires: 120 }));
    // Refresh at 60 s, not before.
    sim.run_until(Duration::from_secs(59));
    assert_eq!(sim.times_of(addr(ALICE), "REGISTER").len(), 2);
    sim.run_until(Duration::from_secs(60));
    assert_eq!(
        sim.times_of(addr(ALICE), "REGISTER").last(),
        Some(&Duration::from_secs(60))
    );
}

#[test]
fn register_fails_cleanly_on_wrong_credentials() {
    let (mut sim, _) = registrar_sim("MD5");
    let now = sim.now;
    sim.nodes[0].ua.register(now).unwrap();
    sim.settle();
    for i in 0..3 {
        let req = String::from_utf8_lossy(&sim.log[i].data).into_owned();
        sim.inject(
            0,
            "192.0.2.2:5060",
            &reply_to(
                &req,
                "401 Unauthorized",
                &format!("WWW-Authenticate: Digest realm=\"atlanta.com\", nonce=\"n{i}\"\r\n"),
            ),
        );
    }
    // Two authenticated attempts, then a clear failure, no loop.
    assert_eq!(sim.times_of(addr(ALICE), "REGISTER").len(), 3);
    assert!(sim.events(0).contains(&&Event::RegistrationFailed {
        status: Some(401),
        reason: "Unauthorized".into()
    }));
}

#[test]
fn invite_answers_a_proxy_md5_challenge_with_a_new_transaction() {
    let mut u = ua("alice", "atlanta.com", ALICE, 1);
    let mut cfg = u.config().clone();
    cfg.outbound_proxy = Some((Transport::Udp, addr("192.0.2.2:5060")));
    cfg.password = Some("pw".into());
    u = UserAgent::new(cfg);
    let mut sim = Sim::new(vec![u]);
    let now = sim.now;
    sim.nodes[0]
        .ua
        .call_signed(
            now,
            "sip:bob@biloxi.com",
            Some(sdp("alice", "2001:20::a")),
            Some("aGVhZGVy.cGF5bG9hZA.c2ln;info=<https://atlanta.com/c.pem>".into()),
        )
        .unwrap();
    sim.settle();
    let first = String::from_utf8_lossy(&sim.log[0].data).into_owned();
    assert_eq!(
        sim.log[0].to,
        addr("192.0.2.2:5060"),
        "via the outbound proxy"
    );
    sim.inject(
        0,
        "192.0.2.2:5060",
        &reply_to(
            &first,
            "407 Proxy Authentication Required",
            "Proxy-Authenticate: Digest realm=\"atlanta.com\", nonce=\"xyz\"\r\n",
        ),
    );
    let lines: Vec<String> = sim.log.iter().map(Wire::first_line).collect();
    assert_eq!(lines[1], "ACK sip:bob@biloxi.com SIP/2.0");
    assert_eq!(lines[2], "INVITE sip:bob@biloxi.com SIP/2.0");
    let second = String::from_utf8_lossy(&sim.log[2].data).into_owned();
    let seq = |s: &str| {
        header(s, "CSeq")
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(seq(&second), seq(&first) + 1);
    assert_eq!(header(&second, "Call-ID"), header(&first, "Call-ID"));
    assert_eq!(header(&second, "From"), header(&first, "From"));
    assert!(
        second.ends_with("a=key-mgmt:host-identity-tag 2001:20::a\r\n"),
        "body kept"
    );
    // The Identity header (RFC 8224) is on the re-sent INVITE too.
    assert_eq!(header(&second, "Identity"), header(&first, "Identity"));
    assert!(
        header(&second, "Identity")
            .unwrap()
            .starts_with("aGVhZGVy.")
    );
    let auth = header(&second, "Proxy-Authorization").unwrap();
    // No qop: the RFC 2069 form, MD5(HA1:nonce:HA2).
    let h = |s: String| hex(&Md5::digest(s.as_bytes()));
    let expected = h(format!(
        "{}:xyz:{}",
        h("alice:atlanta.com:pw".into()),
        h("INVITE:sip:bob@biloxi.com".into())
    ));
    assert_eq!(param(auth, "response"), expected);
}

// ------------------------------------------------------------------------- bad input

#[test]
fn malformed_requests_get_400_and_garbage_is_dropped() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    let peer = "192.0.2.9:5060";
    // Bad start line (two spaces), but the five headers a response needs are there.
    sim.inject(0, peer, "INVITE  sip:bob@192.0.2.4 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKm1\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:x@y>;tag=1\r\nCall-ID: m1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n");
    // CSeq method does not match (RFC 4475 §3.1.2.17 wants 400).
    sim.inject(0, peer, "OPTIONS sip:bob@192.0.2.4 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKm2\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:x@y>;tag=1\r\nCall-ID: m2\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n");
    // Body shorter than Content-Length on UDP (RFC 3261 §18.3: 400 for a request).
    sim.inject(0, peer, "OPTIONS sip:bob@192.0.2.4 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKm3\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:x@y>;tag=1\r\nCall-ID: m3\r\nCSeq: 1 OPTIONS\r\nContent-Length: 500\r\n\r\nshort");
    let sent: Vec<String> = sim
        .log
        .iter()
        .map(|w| String::from_utf8_lossy(&w.data).into_owned())
        .collect();
    assert_eq!(sent.len(), 3, "{sent:#?}");
    for (s, cid) in sent.iter().zip(["m1", "m2", "m3"]) {
        assert!(s.starts_with("SIP/2.0 400 Bad Request\r\n"), "{s}");
        assert_eq!(header(s, "Call-ID"), Some(cid));
        assert!(header(s, "To").unwrap().contains("tag="));
        assert!(header(s, "Warning").is_some());
    }
    // Unanswerable: garbage, a malformed response, a request without Call-ID, a bad ACK.
    for junk in [
        "\u{1}\u{2}garbage",
        "SIP/2.0 2000 OK\r\nVia: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bKq\r\n\r\n",
        "OPTIONS sip:bob@192.0.2.4 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKm4\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:x@y>;tag=1\r\nCSeq: 1 OPTIONS\r\n\r\n",
        "ACK  sip:bob@192.0.2.4 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKm5\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:x@y>;tag=1\r\nCall-ID: m5\r\nCSeq: 1 ACK\r\n\r\n",
    ] {
        sim.inject(0, peer, junk);
    }
    assert_eq!(sim.log.len(), 3, "nothing answered to unanswerable input");
    let dropped = sim
        .events(0)
        .iter()
        .filter(|e| matches!(e, Event::BadInput { answered: None, .. }))
        .count();
    assert_eq!(dropped, 4);
    // An unknown dialog's BYE gets 481; no call or transaction state was created by any of it.
    sim.inject(0, peer, "BYE sip:bob@192.0.2.4 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bKm6\r\nTo: <sip:bob@biloxi.com>;tag=zz\r\nFrom: <sip:x@y>;tag=1\r\nCall-ID: m6\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n");
    assert!(sim.log[3].first_line().starts_with("SIP/2.0 481"));
    assert!(sim.nodes[0].ua.calls().is_empty());
    // A normal call still works afterwards.
    sim.nodes[0].auto_answer = Some(sdp("bob", "2001:20::b"));
    sim.inject(0, peer, &invite_from_peer("z9hG4bKok", "ok@x"));
    assert!(sim.log.iter().any(|w| w.first_line() == "SIP/2.0 200 OK"));
}

#[test]
fn stream_transport_frames_messages_and_reports_lost_framing() {
    let mut u = ua("bob", "biloxi.com", BOB, 2);
    let mut cfg = u.config().clone();
    cfg.ports.push((Transport::Tcp, 5060));
    u = UserAgent::new(cfg);
    let t0 = Instant::now();
    let peer = addr("192.0.2.9:40000");
    let msg = options_from_peer("z9hG4bKs1").replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    // Split across two reads, with a second message glued to the first.
    let both = format!("{msg}{}", msg.replace("z9hG4bKs1", "z9hG4bKs2"));
    let (a, b) = both.split_at(37);
    assert!(u.handle_stream(t0, Transport::Tcp, ConnId(7), peer, a.as_bytes()));
    assert!(u.poll_transmit().is_none());
    assert!(u.handle_stream(t0, Transport::Tcp, ConnId(7), peer, b.as_bytes()));
    let t1 = u.poll_transmit().unwrap();
    let t2 = u.poll_transmit().unwrap();
    assert_eq!(
        t1.dest.conn,
        Some(ConnId(7)),
        "responses go back on the same connection"
    );
    assert_eq!(t2.dest.transport, Transport::Tcp);
    // Reliable transport: Timer J is zero, the transactions are gone immediately.
    u.handle_timeout(t0);
    assert_eq!(u.transaction_count(), (0, 0));
    // Content-Length that is not a number: framing lost, close the connection.
    assert!(!u.handle_stream(
        t0,
        Transport::Tcp,
        ConnId(8),
        peer,
        b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: x\r\n\r\n"
    ));
}

#[test]
fn commands_refuse_what_does_not_fit() {
    let mut u = ua("alice", "atlanta.com", ALICE, 1);
    let t = Instant::now();
    assert!(matches!(
        u.call(t, "not a uri", None),
        Err(SipError::BadUri(_))
    ));
    assert!(matches!(
        u.call(t, "sip:bob@biloxi.com", None),
        Err(SipError::NoRoute(_))
    ));
    assert!(matches!(
        u.call(t, "sip:bob@192.0.2.4;transport=tcp", None),
        Err(SipError::NoTransport(Transport::Tcp))
    ));
    assert!(matches!(
        u.hangup(t, CallHandle(99)),
        Err(SipError::NoSuchCall(_))
    ));
    assert!(matches!(u.register(t), Err(SipError::NoRegistrar)));
    let h = u.call(t, "sip:bob@192.0.2.4", None).unwrap();
    assert!(matches!(
        u.answer(t, h, None),
        Err(SipError::WrongState { .. })
    ));
    assert!(matches!(
        u.update(t, h, Bytes::new()),
        Err(SipError::WrongState { .. })
    ));
    // None of the refused commands sent anything.
    let mut n = 0;
    while u.poll_transmit().is_some() {
        n += 1;
    }
    assert_eq!(n, 1, "only the one valid INVITE");
}

#[test]
fn a_callee_hanging_up_before_the_ack_sends_bye_only_after_it() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    sim.inject(0, "192.0.2.9:5060", &invite_from_peer("z9hG4bKb1", "b@x"));
    let h = incoming(&sim, 0);
    let now = sim.now;
    sim.nodes[0]
        .ua
        .answer(now, h, Some(sdp("bob", "2001:20::b")))
        .unwrap();
    sim.nodes[0].ua.hangup(now, h).unwrap();
    sim.run_until(ms(700));
    assert!(
        sim.times_of(addr(BOB), "BYE").is_empty(),
        "no BYE before the ACK"
    );
    let tag = to_tag_in(sim.sent_by(addr(BOB))[0]);
    sim.inject(
        0,
        "192.0.2.9:5060",
        &ack_from_peer("z9hG4bKb2", "b@x", &tag),
    );
    assert_eq!(sim.times_of(addr(BOB), "BYE"), vec![ms(700)]);
}

/// Fuzz finding (`fuzz/` target `sip_parse`): a caller whose Contact is a host name (and no
/// Record-Route) leaves this core, which has no DNS, no route for a BYE. Hanging up must
/// still end the call — before the ACK (BYE due on the ACK) and once confirmed — instead
/// of leaving it up for ever.
#[test]
fn a_hang_up_with_no_route_for_the_bye_still_ends_the_call() {
    let by_name = |branch: &str, call_id: &str| {
        invite_from_peer(branch, call_id).replace(
            "Contact: <sip:carol@192.0.2.9>",
            "Contact: <sip:carol@pc33.chicago.com>",
        )
    };
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);

    // Hung up while the 2xx waits for its ACK: the BYE is due when the ACK comes.
    sim.inject(0, "192.0.2.9:5060", &by_name("z9hG4bKn1", "n1@x"));
    let h = incoming(&sim, 0);
    let now = sim.now;
    sim.nodes[0]
        .ua
        .answer(now, h, Some(sdp("bob", "2001:20::b")))
        .unwrap();
    sim.nodes[0].ua.hangup(now, h).unwrap();
    sim.settle();
    let tag = to_tag_in(sim.sent_by(addr(BOB))[0]);
    sim.inject(
        0,
        "192.0.2.9:5060",
        &ack_from_peer("z9hG4bKn2", "n1@x", &tag),
    );
    assert!(
        sim.times_of(addr(BOB), "BYE").is_empty(),
        "nowhere to send it"
    );
    assert_eq!(sim.nodes[0].ua.call_info(h), None, "the call is over");
    assert!(sim.events(0).iter().any(|e| matches!(
        e,
        Event::Ended { call, reason: EndReason::TransportError } if call.handle == h
    )));

    // Hung up once confirmed: the caller learns why, and the call is over all the same.
    sim.inject(0, "192.0.2.9:5060", &by_name("z9hG4bKn3", "n3@x"));
    let h = sim
        .events(0)
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::IncomingCall { call, .. } => Some(call.handle),
            _ => None,
        })
        .unwrap();
    let now = sim.now;
    sim.nodes[0]
        .ua
        .answer(now, h, Some(sdp("bob", "2001:20::b")))
        .unwrap();
    sim.settle();
    let tag = to_tag_in(sim.sent_by(addr(BOB)).last().unwrap());
    sim.inject(
        0,
        "192.0.2.9:5060",
        &ack_from_peer("z9hG4bKn4", "n3@x", &tag),
    );
    assert_eq!(
        sim.nodes[0].ua.call_info(h).map(|c| c.state),
        Some(CallState::Confirmed)
    );
    let now = sim.now;
    assert!(matches!(
        sim.nodes[0].ua.hangup(now, h),
        Err(SipError::NoRoute(_))
    ));
    assert_eq!(sim.nodes[0].ua.call_info(h), None, "the call is over");
    sim.run_for(Duration::from_secs(64));
    assert!(sim.nodes[0].ua.calls().is_empty());
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

/// Fuzz finding (`fuzz/` target `sip_parse`): a callee that rang and then answers neither
/// our CANCEL nor with a final response. An INVITE client transaction in Proceeding has no
/// timer of its own, so RFC 3261 §9.1 has the UAC give up 64·T1 after the CANCEL: the
/// transaction is destroyed and the call ends, instead of both staying for ever.
#[test]
fn a_cancel_that_gets_no_final_response_ends_the_call_after_64_t1() {
    let mut sim = Sim::new(vec![ua("alice", "atlanta.com", ALICE, 1)]);
    let now = sim.now;
    let h = sim.nodes[0]
        .ua
        .call(now, "sip:bob@192.0.2.9", None)
        .unwrap();
    sim.settle();
    let invite = String::from_utf8_lossy(&sim.log[0].data).into_owned();
    sim.inject(0, "192.0.2.9:5060", &reply_to(&invite, "180 Ringing", ""));
    sim.run_for(Duration::from_secs(1));
    let now = sim.now;
    sim.nodes[0].ua.hangup(now, h).unwrap();
    sim.settle();
    assert_eq!(sim.times_of(addr(ALICE), "CANCEL").len(), 1);
    // CANCEL retransmits until its own Timer F (64·T1); nothing answers.
    sim.run_for(Duration::from_secs(31));
    assert_eq!(
        sim.nodes[0].ua.call_info(h).map(|c| c.state),
        Some(CallState::Terminating),
        "still waiting within 64·T1"
    );
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.nodes[0].ua.call_info(h), None);
    assert!(matches!(
        sim.events(0).last(),
        Some(Event::Ended {
            reason: EndReason::Cancelled,
            ..
        })
    ));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
    assert_eq!(sim.nodes[0].ua.timer_count(), 0);
}

/// Fuzz finding (`fuzz/` target `sip_parse`): 100 Trying is a provisional response, so after
/// it a hang-up sends CANCEL at once (RFC 3261 §9.1) instead of waiting for a 180 that may
/// never come while the INVITE, in Proceeding, has no timer left to end it.
#[test]
fn a_hang_up_after_100_trying_cancels_at_once() {
    let mut sim = Sim::new(vec![ua("alice", "atlanta.com", ALICE, 1)]);
    let now = sim.now;
    let h = sim.nodes[0]
        .ua
        .call(now, "sip:bob@192.0.2.9", None)
        .unwrap();
    sim.settle();
    let invite = String::from_utf8_lossy(&sim.log[0].data).into_owned();
    let trying = reply_to(&invite, "100 Trying", "").replace(";tag=reg1", "");
    sim.inject(0, "192.0.2.9:5060", &trying);
    assert!(
        sim.events(0).is_empty(),
        "100 is not reported as ringing: {:?}",
        sim.events(0)
    );
    let now = sim.now;
    sim.nodes[0].ua.hangup(now, h).unwrap();
    sim.settle();
    assert_eq!(sim.times_of(addr(ALICE), "CANCEL"), vec![Duration::ZERO]);
    // Nobody answers at all: the call still ends (§9.1, 64·T1 after the CANCEL).
    sim.run_for(Duration::from_secs(40));
    assert_eq!(sim.nodes[0].ua.call_info(h), None);
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
}

/// Fuzz finding (`fuzz/` target `sip_parse`): a request whose Call-ID (or another header
/// every response echoes) holds a NUL can never be answered — the message builder refuses
/// NUL, CR and LF as header injection — so it must not start a call and a server
/// transaction that would wait for ever. It is dropped as bad input; with the NUL only in
/// a header no 400 needs (Record-Route), a 400 still goes back.
#[test]
fn a_request_that_no_response_could_echo_is_refused_up_front() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    let invite = invite_from_peer("z9hG4bKz1", "z1@x").replace("Call-ID: z1@x", "Call-ID: z1\0@x");
    sim.inject(0, "192.0.2.9:5060", &invite);
    assert!(sim.sent_by(addr(BOB)).is_empty());
    assert!(matches!(
        sim.events(0).as_slice(),
        [Event::BadInput { answered: None, .. }]
    ));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
    assert!(sim.nodes[0].ua.calls().is_empty());

    let invite = invite_from_peer("z9hG4bKz2", "z2@x").replace(
        "Max-Forwards: 70\r\n",
        "Max-Forwards: 70\r\nRecord-Route: <sip:p1.example.com;lr>\0\r\n",
    );
    sim.inject(0, "192.0.2.9:5060", &invite);
    let sent = sim.sent_by(addr(BOB));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].first_line(), "SIP/2.0 400 Bad Request");
    assert!(sim.nodes[0].ua.calls().is_empty());
}

mod floods;
mod nat;

/// Found by the `sip_parse` fuzz target: a request whose top Via carries the branch and
/// sent-by of our own INVITE (our request looped back, or forged from it) used to get a
/// server transaction under the same key as our client transaction. When the client
/// transaction ended, the timers of both went (they are keyed alike), and the server
/// transaction, waiting for Timer H, stayed for good. Now it is refused as a loop.
#[test]
fn a_request_with_our_own_via_branch_is_refused_and_leaves_nothing() {
    let mut sim = Sim::new(vec![ua("alice", "atlanta.com", ALICE, 1)]);
    let now = sim.now;
    sim.nodes[0]
        .ua
        .call(now, "sip:nobody@192.0.2.99", None)
        .unwrap();
    sim.run_for(ms(10));
    let ours = String::from_utf8_lossy(&sim.log[0].data).into_owned();
    let via = header(&ours, "Via").unwrap().to_owned();
    let looped = format!(
        "INVITE sip:alice@192.0.2.1 SIP/2.0\r\nVia: {via}\r\nTo: <sip:alice@atlanta.com>\r\n\
         From: <sip:x@y>;tag=1\r\nCall-ID: loop1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    );
    sim.inject(0, "192.0.2.9:5060", &looped);
    let answer = sim
        .log
        .iter()
        .find(|w| w.to == addr("192.0.2.9:5060"))
        .expect("an answer to the looped request");
    assert_eq!(answer.first_line(), "SIP/2.0 482 Loop Detected");
    assert_eq!(
        sim.nodes[0].ua.transaction_count(),
        (1, 0),
        "only our INVITE"
    );
    // Our INVITE times out (Timer B); nothing is left behind.
    sim.run_until(Duration::from_secs(70));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
    assert!(sim.nodes[0].ua.calls().is_empty());
}

/// Found by fuzzing (`fuzz/seeds/sip_parse/regress_bye_in_early_dialog`): a BYE in the
/// early dialog of an unanswered incoming call ended the call but left its INVITE server
/// transaction without a final response for good. RFC 3261 §15.1.2: the pending INVITE
/// gets a 487 too.
#[test]
fn a_bye_in_an_early_dialog_ends_the_pending_invite_with_487() {
    let mut sim = Sim::new(vec![ua("bob", "biloxi.com", BOB, 2)]);
    let invite = "INVITE sip:bob@192.0.2.4 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKearly1\r\nMax-Forwards: 70\r\n\
         To: <sip:bob@biloxi.com>\r\nFrom: <sip:alice@atlanta.com>;tag=a1\r\n\
         Call-ID: early-bye\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@192.0.2.9>\r\n\
         Content-Length: 0\r\n\r\n";
    sim.inject(0, "192.0.2.9:5060", invite);
    let b = incoming(&sim, 0);
    let now = sim.now;
    sim.nodes[0].ua.ring(now, b, 180).unwrap();
    sim.settle();
    let ringing = sim.log.last().unwrap().clone();
    assert_eq!(ringing.first_line(), "SIP/2.0 180 Ringing");
    let tag = to_tag_in(&ringing);
    let bye = format!(
        "BYE sip:bob@192.0.2.4 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKearly2\r\nMax-Forwards: 70\r\n\
         To: <sip:bob@biloxi.com>;tag={tag}\r\nFrom: <sip:alice@atlanta.com>;tag=a1\r\n\
         Call-ID: early-bye\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    sim.inject(0, "192.0.2.9:5060", &bye);
    let lines: Vec<String> = sim.log.iter().map(Wire::first_line).collect();
    assert_eq!(
        lines,
        vec![
            "SIP/2.0 180 Ringing",
            "SIP/2.0 200 OK",
            "SIP/2.0 487 Request Terminated",
        ]
    );
    assert!(matches!(
        sim.events(0).last(),
        Some(Event::Ended {
            reason: EndReason::RemoteBye,
            ..
        })
    ));
    // The 487 is retransmitted until Timer H: the ACK never comes, and then nothing is left.
    sim.run_until(Duration::from_secs(70));
    assert_eq!(sim.nodes[0].ua.transaction_count(), (0, 0));
    assert!(sim.nodes[0].ua.calls().is_empty());
}
