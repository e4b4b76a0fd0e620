//! Regression tests for what an attacker and an unlucky network found: exchanges that
//! wedge the association table, SPIs that leak, peers that lost their state, and floods
//! of I1s that starve a known caller.

use std::sync::{Arc, Mutex};

use super::*;

/// An allocator that records what it handed out and what came back.
#[derive(Default)]
struct Ledger {
    allocated: Vec<u32>,
    released: Vec<u32>,
}

#[derive(Clone, Default)]
struct RecordingSpis(Arc<Mutex<Ledger>>);

impl RecordingSpis {
    fn allocated(&self) -> Vec<u32> {
        self.0.lock().unwrap().allocated.clone()
    }
    fn released(&self) -> Vec<u32> {
        self.0.lock().unwrap().released.clone()
    }
}

impl SpiAllocator for RecordingSpis {
    fn allocate(&mut self, _: Hit, _: Hit, _: IpAddr) -> Result<u32, String> {
        let mut g = self.0.lock().unwrap();
        let spi = 0x5000_0001 + g.allocated.len() as u32;
        g.allocated.push(spi);
        Ok(spi)
    }
    fn release(&mut self, spi: u32) {
        self.0.lock().unwrap().released.push(spi);
    }
}

fn p256_pair(seed: u64) -> Sim {
    pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        seed,
    )
}

#[test]
fn a_wrong_hit_listed_before_the_right_one_does_not_stop_the_exchange() {
    // A 200 OK carried a fake HIT first and the callee's real one second: one I1 to the
    // null HIT, and the R1 is accepted because its HI hashes to one of them.
    let mut s = p256_pair(51);
    let (fake, real) = (identity(Algorithm::EcdsaP256, 3).hit(), s.b.hit());
    let now = s.now;
    s.a.initiate_expecting_any(now, loc(LOC_A), loc(LOC_B), &[fake, real])
        .unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    assert_eq!(s.a.state(&real), Some(State::Established));
    assert_eq!(s.a.state(&fake), None);
    assert!(
        !s.events_a.iter().any(|e| matches!(e, Event::Failed { .. })),
        "{:?}",
        s.events_a
    );
    // None of them being the responder's is still a mismatch.
    let mut s = p256_pair(52);
    let other = identity(Algorithm::EcdsaP256, 4).hit();
    let now = s.now;
    s.a.initiate_expecting_any(now, loc(LOC_A), loc(LOC_B), &[fake, other])
        .unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    assert!(s.events_a.iter().any(|e| matches!(
        e,
        Event::Failed {
            error: ProtocolError::HitMismatch { .. },
            ..
        }
    )));
    assert!(
        s.a.initiate_expecting_any(now, loc(LOC_A), loc(LOC_B), &[])
            .is_err()
    );
}

#[test]
fn a_failed_exchange_does_not_wedge_the_locator() {
    // Before: the E-FAILED attempt lingered keyed by the locator, and every initiation
    // towards it failed with "already associated with ::" for the linger time.
    let mut s = p256_pair(53);
    let c = identity(Algorithm::EcdsaP256, 3).hit();
    let now = s.now;
    s.a.initiate_expecting(now, loc(LOC_A), loc(LOC_B), c)
        .unwrap();
    s.run_until(Duration::from_secs(2), |s| {
        s.events_a.iter().any(|e| matches!(e, Event::Failed { .. }))
    });
    let b = s.b.hit();
    let now = s.now;
    s.a.initiate_expecting(now, loc(LOC_A), loc(LOC_B), b)
        .expect("a new initiation replaces the failed one at once");
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
}

#[test]
fn abandoning_an_exchange_frees_it_for_the_next_call() {
    // The responder never answers (all packets to B lost): a hang-up abandons the
    // exchange, and the next initiation is not "already associated".
    let mut s = p256_pair(54);
    s.tamper = Some(Box::new(|to_b, _| !to_b));
    let b = s.b.hit();
    let now = s.now;
    s.a.initiate_expecting(now, loc(LOC_A), loc(LOC_B), b)
        .unwrap();
    s.run_until(Duration::from_millis(1500), |_| false);
    assert!(matches!(
        s.a.initiate_expecting(s.now, loc(LOC_A), loc(LOC_B), b),
        Err(ProtocolError::AlreadyAssociated(_))
    ));
    assert!(s.a.abandon_initiation(Some(b), Some(loc(LOC_B))));
    assert_eq!(s.a.association_count(), 0);
    assert!(
        !s.a.abandon_initiation(Some(b), Some(loc(LOC_B))),
        "nothing left"
    );
    // Abandoned means silent: no further retransmission.
    let mark = s.wire.len();
    s.run_until(Duration::from_secs(10), |_| false);
    assert_eq!(s.wire.len(), mark);
    s.tamper = None;
    let now = s.now;
    s.a.initiate_expecting(now, loc(LOC_A), loc(LOC_B), b)
        .unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    // An I2-SENT exchange (SPI allocated) gives its SPI back when abandoned.
    let mut s = p256_pair(55);
    let spis = RecordingSpis::default();
    s.a.set_spi_allocator(Box::new(spis.clone()));
    s.tamper = Some(Box::new(|to_b, t| {
        to_b || t.packet_type() != Some(wire::PacketType::R2)
    }));
    let b = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(b)).unwrap();
    s.run_until(Duration::from_millis(300), |_| false);
    assert_eq!(s.a.state(&b), Some(State::I2Sent));
    assert!(s.a.abandon_initiation(Some(b), None));
    assert_eq!(spis.allocated(), spis.released());
    assert_eq!(spis.allocated().len(), 1);
}

#[test]
fn an_abandoned_rekey_gives_its_spi_back() {
    // Before: the new inbound SPI of a rekey whose UPDATE was never answered was only
    // named in UpdateFailed, and the agent ignored it: a reserved SPI and reqid leaked.
    let mut s = established_pair(PERFECT, 56);
    let spis = RecordingSpis::default();
    s.a.set_spi_allocator(Box::new(spis.clone()));
    s.tamper = Some(Box::new(|to_b, _| !to_b));
    let hb = s.b.hit();
    let now = s.now;
    s.a.rekey(now, hb).unwrap();
    assert!(s.run_until(Duration::from_secs(120), |s| {
        s.events_a
            .iter()
            .any(|e| matches!(e, Event::UpdateFailed { .. }))
    }));
    assert_eq!(spis.allocated().len(), 1);
    assert_eq!(spis.released(), spis.allocated());
    assert_eq!(
        s.a.state(&hb),
        Some(State::Established),
        "the association stays"
    );
}

#[test]
fn a_probe_of_a_live_peer_is_answered() {
    let mut s = established_pair(PERFECT, 57);
    let hb = s.b.hit();
    let mark = s.wire.len();
    let now = s.now;
    s.a.probe(now, hb).unwrap();
    s.run_until(Duration::from_secs(30), |_| false);
    assert!(
        !s.events_a
            .iter()
            .any(|e| matches!(e, Event::PeerUnreachable { .. }))
    );
    assert_eq!(s.a.state(&hb), Some(State::Established));
    // One UPDATE each way: request, then the echo.
    let updates: Vec<bool> = s.wire[mark..]
        .iter()
        .filter(|(_, t)| t.packet_type() == Some(wire::PacketType::Update))
        .map(|(to_b, _)| *to_b)
        .collect();
    assert_eq!(updates, vec![true, false]);
    // A new probe can start: nothing is left pending.
    s.a.probe(s.now, hb).unwrap();
}

#[test]
fn a_peer_that_lost_its_state_is_detected_and_replaced() {
    // B is killed and restarts with the same identity and no state: A's probe goes
    // unanswered (B drops UPDATEs of an association it does not have), A forgets the
    // association, and a new exchange establishes at once.
    let mut s = established_pair(PERFECT, 58);
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let now = s.now;
    s.b = endpoint(Algorithm::Ed25519, 2, fast_config(), 99, now);
    s.events_a.clear();
    s.a.probe(now, hb).unwrap();
    assert!(
        s.run_until(Duration::from_secs(60), |s| s.events_a.iter().any(
            |e| matches!(e, Event::PeerUnreachable { peer_hit } if *peer_hit == hb)
        ))
    );
    assert_eq!(s.a.state(&hb), Some(State::EFailed));
    assert!(
        s.errors_b
            .iter()
            .any(|e| matches!(e, ProtocolError::NoAssociation(h) if *h == ha))
    );
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(10), |s| {
        s.a.state(&hb) == Some(State::Established)
    }));
}

#[test]
fn a_restarted_peer_that_initiates_replaces_the_stale_association() {
    // RFC 7401 §4.4.2 / §6.9: in ESTABLISHED an I1 is answered with R1, and a valid I2
    // replaces the association; the old SA pair is named for removal.
    let mut s = established_pair(PERFECT, 59);
    let eb_old = s.established().1.unwrap().clone();
    let ha = s.a.hit();
    let now = s.now;
    // This time the responder (B) restarts and calls A.
    s.b = endpoint(Algorithm::Ed25519, 2, fast_config(), 98, now);
    s.b.set_spi_allocator(Box::new(SequentialSpis(0x4000_0000)));
    s.events_a.clear();
    s.events_b.clear();
    s.b.initiate(now, loc(LOC_B), loc(LOC_A), Some(ha)).unwrap();
    assert!(s.run_until(Duration::from_secs(10), Sim::both_established));
    let (na, _) = s.established();
    let na = na.unwrap();
    assert_eq!(
        na.replaced_spis,
        Some((eb_old.spi_outbound, eb_old.spi_inbound)),
        "A names its old SA pair (inbound, outbound) for removal"
    );
}

#[test]
fn a_spoofed_i1_flood_from_the_callers_address_does_not_starve_the_caller() {
    // 10,000 I1s from random HITs with A's own address as source: the per-address bucket
    // and the global budget for strangers run dry, but A's HIT is expected (a call B
    // answered) and has a lane of its own.
    let mut s = p256_pair(60);
    let ha = s.a.hit();
    struct Expect(Hit);
    impl PeerPolicy for Expect {
        fn accept(&self, h: &Hit, _: &HostId) -> bool {
            *h == self.0
        }
        fn expected(&self, h: &Hit) -> bool {
            *h == self.0
        }
    }
    s.b.set_policy(Box::new(Expect(ha)));
    let hb = s.b.hit();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let now = s.now;
    let mut answered = 0;
    for _ in 0..10_000 {
        let mut h = [0u8; 16];
        rng.fill_bytes(&mut h);
        h[..4].copy_from_slice(&[0x20, 0x01, 0x00, 0x20]);
        let mut pb = wire::PacketBuilder::new(wire::PacketType::I1, 0, Hit(h), hb);
        pb.push(&Param::DhGroupList(vec![7])).unwrap();
        let mut p = pb.finish();
        wire::set_checksum(&mut p, loc(LOC_A), loc(LOC_B));
        let _ = s.b.handle_packet(now, loc(LOC_A), loc(LOC_B), &p);
        while s.b.poll_transmit().is_some() {
            answered += 1;
        }
    }
    let st = s.b.stats();
    assert_eq!(answered, fast_config().r1_burst_per_address as usize);
    assert_eq!(
        st.r1_rate_limited_address + st.r1_sent_unexpected,
        10_000,
        "{st:?}"
    );
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    assert_eq!(s.b.stats().r1_sent_expected, 1);
    // Strangers from many addresses share one budget.
    let mut b = endpoint(Algorithm::Ed25519, 2, fast_config(), 61, now);
    let mut sent = 0u32;
    for i in 0..5_000u32 {
        let src = IpAddr::from(std::net::Ipv6Addr::from(
            0x2001_0db8_0000_0000_0000_0000_0001_0000u128 + u128::from(i),
        ));
        let mut h = [0u8; 16];
        rng.fill_bytes(&mut h);
        let mut pb = wire::PacketBuilder::new(wire::PacketType::I1, 0, Hit(h), b.hit());
        pb.push(&Param::DhGroupList(vec![7])).unwrap();
        let mut p = pb.finish();
        wire::set_checksum(&mut p, src, loc(LOC_B));
        let _ = b.handle_packet(now, src, loc(LOC_B), &p);
        while b.poll_transmit().is_some() {
            sent += 1;
        }
    }
    assert_eq!(sent, fast_config().r1_burst_unexpected);
    assert_eq!(
        b.stats().r1_rate_limited_unexpected,
        5_000 - u64::from(sent)
    );
}

#[test]
fn the_association_table_is_bounded() {
    let cfg = Config {
        max_associations: 1,
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        cfg.clone(),
        PERFECT,
        62,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    // A third host's exchange with B is refused before any SPI is taken.
    let mut c = endpoint(Algorithm::EcdsaP256, 3, fast_config(), 63, now);
    let spis = RecordingSpis::default();
    s.b.set_spi_allocator(Box::new(spis.clone()));
    let now = s.now;
    c.initiate(now, loc("2001:db8::c"), loc(LOC_B), Some(hb))
        .unwrap();
    let mut refused = false;
    for _ in 0..4 {
        while let Some(t) = c.poll_transmit() {
            match s.b.handle_packet(now, t.src, t.dst, &t.payload) {
                Err(ProtocolError::AtCapacity) => refused = true,
                _ => {
                    while let Some(r) = s.b.poll_transmit() {
                        if r.dst == loc("2001:db8::c") {
                            let _ = c.handle_packet(now, r.src, r.dst, &r.payload);
                        }
                    }
                }
            }
        }
    }
    assert!(refused);
    assert!(spis.allocated().is_empty());
    assert_eq!(s.b.stats().refused_at_capacity, 1);
    // And the initiator side too.
    let mut a = endpoint(Algorithm::EcdsaP256, 1, cfg, 64, now);
    a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert_eq!(
        a.initiate(now, loc(LOC_A), loc("2001:db8::c"), Some(c.hit())),
        Err(ProtocolError::AtCapacity)
    );
}
