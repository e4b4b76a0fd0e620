//! Two endpoints on simulated time, over a perfect and over a lossy link.

use std::{
    net::IpAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

use super::*;
use crate::{
    identity::Algorithm,
    wire::{Param, notify, ty},
};

/// One PEM per algorithm, generated once (RSA-3072 generation is slow).
fn pem(alg: Algorithm, which: u8) -> String {
    static KEYS: OnceLock<std::sync::Mutex<HashMap<(Algorithm, u8), String>>> = OnceLock::new();
    let m = KEYS.get_or_init(Default::default);
    let mut m = m.lock().unwrap();
    m.entry((alg, which))
        .or_insert_with(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(100 + which as u64);
            HostIdentity::generate(alg, &mut rng)
                .unwrap()
                .to_pkcs8_pem()
                .unwrap()
        })
        .clone()
}

pub(crate) fn identity(alg: Algorithm, which: u8) -> HostIdentity {
    HostIdentity::from_pkcs8_pem(&pem(alg, which)).unwrap()
}

pub(crate) const LOC_A: &str = "2001:db8::a";
pub(crate) const LOC_B: &str = "2001:db8::b";

fn loc(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn fast_config() -> Config {
    Config {
        puzzle_difficulty: 4,
        ..Config::default()
    }
}

struct Link {
    loss: f64,
    dup: f64,
    /// Maximum extra delay, which reorders packets.
    jitter_ms: u64,
}

const PERFECT: Link = Link {
    loss: 0.0,
    dup: 0.0,
    jitter_ms: 0,
};

type Tamper = Box<dyn FnMut(bool, &mut Transmit) -> bool>;

struct Sim {
    a: Endpoint,
    b: Endpoint,
    now: Instant,
    rng: ChaCha20Rng,
    link: Link,
    inflight: Vec<(Instant, bool, Transmit)>, // (deliver at, to_b, packet)
    events_a: Vec<Event>,
    events_b: Vec<Event>,
    errors_a: Vec<ProtocolError>,
    errors_b: Vec<ProtocolError>,
    /// Every packet put on the wire, in order (for inspection).
    wire: Vec<(bool, Transmit)>,
    /// Hook to rewrite packets in flight (e.g. tamper with one).
    tamper: Option<Tamper>,
}

impl Sim {
    fn new(a: Endpoint, b: Endpoint, link: Link, seed: u64, now: Instant) -> Self {
        Sim {
            a,
            b,
            now,
            rng: ChaCha20Rng::seed_from_u64(seed),
            link,
            inflight: Vec::new(),
            events_a: Vec::new(),
            events_b: Vec::new(),
            errors_a: Vec::new(),
            errors_b: Vec::new(),
            wire: Vec::new(),
            tamper: None,
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() as f64 / u64::MAX as f64) < p
    }

    fn collect(&mut self) {
        for to_b in [true, false] {
            loop {
                let t = if to_b {
                    self.a.poll_transmit()
                } else {
                    self.b.poll_transmit()
                };
                let Some(mut t) = t else { break };
                if let Some(f) = self.tamper.as_mut()
                    && !f(to_b, &mut t)
                {
                    continue;
                }
                self.wire.push((to_b, t.clone()));
                if self.chance(self.link.loss) {
                    continue;
                }
                let copies = if self.chance(self.link.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    let j = if self.link.jitter_ms > 0 {
                        self.rng.next_u64() % self.link.jitter_ms
                    } else {
                        0
                    };
                    let at = self.now + Duration::from_millis(5 + j);
                    self.inflight.push((at, to_b, t.clone()));
                }
            }
        }
        while let Some(e) = self.a.poll_event() {
            self.events_a.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            self.events_b.push(e);
        }
    }

    /// Runs until `done` or simulated `limit`.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            self.collect();
            if done(self) {
                return true;
            }
            let next_pkt = self.inflight.iter().map(|p| p.0).min();
            let next = [next_pkt, self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next else { return false };
            if next > end {
                return false;
            }
            self.now = self.now.max(next);
            if next_pkt == Some(next) {
                let i = self.inflight.iter().position(|p| p.0 == next).unwrap();
                let (_, to_b, t) = self.inflight.remove(i);
                let (ep, errs) = if to_b {
                    (&mut self.b, &mut self.errors_b)
                } else {
                    (&mut self.a, &mut self.errors_a)
                };
                if let Err(e) = ep.handle_packet(self.now, t.src, t.dst, &t.payload) {
                    errs.push(e);
                }
            } else {
                let now = self.now;
                self.a.handle_timeout(now);
                self.b.handle_timeout(now);
            }
        }
    }

    fn established(&self) -> (Option<&Established>, Option<&Established>) {
        let ea = self.events_a.iter().find_map(|e| match e {
            Event::Established(x) => Some(&**x),
            _ => None,
        });
        let eb = self.events_b.iter().find_map(|e| match e {
            Event::Established(x) => Some(&**x),
            _ => None,
        });
        (ea, eb)
    }

    fn both_established(&self) -> bool {
        let (a, b) = self.established();
        a.is_some() && b.is_some()
    }
}

fn endpoint(alg: Algorithm, which: u8, config: Config, seed: u64, now: Instant) -> Endpoint {
    Endpoint::new(
        config,
        identity(alg, which),
        Box::new(ChaCha20Rng::seed_from_u64(seed)),
        now,
    )
    .unwrap()
}

fn pair(alg_a: Algorithm, alg_b: Algorithm, ca: Config, cb: Config, link: Link, seed: u64) -> Sim {
    let now = Instant::now();
    let a = endpoint(alg_a, 1, ca, seed * 3 + 1, now);
    let mut b = endpoint(alg_b, 2, cb, seed * 3 + 2, now);
    b.set_spi_allocator(Box::new(SequentialSpis(0x2000_0000)));
    Sim::new(a, b, link, seed, now)
}

fn assert_consistent(a: &Established, b: &Established) {
    assert_eq!(a.local_locator, b.peer_locator);
    assert_keys_agree(a, b);
}

/// [`assert_consistent`] without the locators (a NAT between them rewrites one).
fn assert_keys_agree(a: &Established, b: &Established) {
    assert_eq!(a.local_hit, b.peer_hit);
    assert_eq!(a.peer_hit, b.local_hit);
    assert_eq!(a.peer_hi.hit(), a.peer_hit);
    assert_eq!(b.peer_hi.hit(), b.peer_hit);
    assert_eq!(a.spi_outbound, b.spi_inbound);
    assert_eq!(a.spi_inbound, b.spi_outbound);
    assert_eq!(a.keys_outbound, b.keys_inbound);
    assert_eq!(a.keys_inbound, b.keys_outbound);
    assert_ne!(a.keys_inbound, a.keys_outbound);
    assert_eq!(a.esp_suite, b.esp_suite);
    assert_eq!(a.dh_group, b.dh_group);
    assert_eq!(a.hip_cipher, b.hip_cipher);
    assert!(a.initiator && !b.initiator);
    assert_eq!(a.keys_outbound.enc.len(), a.esp_suite.enc_key_len());
}

fn exchange(alg_a: Algorithm, alg_b: Algorithm, group: DhGroup, link: Link, seed: u64) {
    let cfg = Config {
        dh_groups: vec![group],
        ..fast_config()
    };
    let mut s = pair(alg_a, alg_b, cfg.clone(), cfg, link, seed);
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(
        s.run_until(Duration::from_secs(60), Sim::both_established),
        "{alg_a}/{alg_b}/{group:?} seed {seed}: no exchange; a: {:?} {:?}; b: {:?} {:?}",
        s.events_a,
        s.errors_a,
        s.events_b,
        s.errors_b
    );
    let (ea, eb) = s.established();
    let (ea, eb) = (ea.unwrap(), eb.unwrap());
    assert_consistent(ea, eb);
    assert_eq!(ea.dh_group, group);
    // Let the responder's R2-SENT timer run out: both end ESTABLISHED.
    s.run_until(Duration::from_secs(30), |_| false);
    assert_eq!(s.a.state(&hb), Some(State::Established));
    assert_eq!(s.b.state(&s.a.hit()), Some(State::Established));
    // Exactly one Established per side despite duplicates.
    let count = |v: &[Event]| {
        v.iter()
            .filter(|e| matches!(e, Event::Established(_)))
            .count()
    };
    assert_eq!(count(&s.events_a), 1);
    assert_eq!(count(&s.events_b), 1);
}

#[test]
fn reset_returns_to_the_snapshot_and_replays_an_exchange_exactly() {
    // Endpoint::reset (used by the fuzz targets): a second session on reset endpoints, at
    // the same instant and with the same RNG seeds, gives the same wire bytes and keys as
    // the first, and nothing of the first session is left.
    let mut s = pair(
        Algorithm::Ed25519,
        Algorithm::Ed25519,
        fast_config(),
        fast_config(),
        PERFECT,
        9,
    );
    let (snap_a, snap_b) = (s.a.snapshot(), s.b.snapshot());
    let (hb, t0) = (s.b.hit(), s.now);
    let run = |s: &mut Sim| {
        s.a.initiate(t0, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
        assert!(s.run_until(Duration::from_secs(10), Sim::both_established));
        let (ea, eb) = s.established();
        (ea.unwrap().clone(), eb.unwrap().clone(), s.wire.clone())
    };
    s.a.reset(&snap_a, Box::new(ChaCha20Rng::seed_from_u64(40)));
    s.b.reset(&snap_b, Box::new(ChaCha20Rng::seed_from_u64(41)));
    let first = run(&mut s);
    s.a.reset(&snap_a, Box::new(ChaCha20Rng::seed_from_u64(40)));
    s.b.reset(&snap_b, Box::new(ChaCha20Rng::seed_from_u64(41)));
    assert_eq!(s.a.association_count() + s.b.association_count(), 0);
    assert!(s.a.poll_transmit().is_none() && s.b.poll_event().is_none());
    assert_eq!(s.b.stats(), Stats::default());
    s.b.set_spi_allocator(Box::new(SequentialSpis(0x2000_0000)));
    s.a.set_spi_allocator(Box::new(SequentialSpis::default()));
    (s.now, s.events_a, s.events_b, s.wire) = (t0, Vec::new(), Vec::new(), Vec::new());
    let second = run(&mut s);
    assert_eq!(first.0.keys_outbound, second.0.keys_outbound);
    assert_eq!(first.1.keys_inbound, second.1.keys_inbound);
    let bytes =
        |w: &[(bool, Transmit)]| w.iter().map(|(_, t)| t.payload.clone()).collect::<Vec<_>>();
    assert_eq!(bytes(&first.2), bytes(&second.2));
}

#[test]
fn base_exchange_every_hi_and_dh_group() {
    for alg in Algorithm::ALL {
        for g in DhGroup::ALL {
            exchange(alg, alg, g, PERFECT, 1);
        }
    }
}

#[test]
fn base_exchange_mixed_identities() {
    exchange(
        Algorithm::Ed25519,
        Algorithm::Rsa,
        DhGroup::NistP256,
        PERFECT,
        2,
    );
    exchange(
        Algorithm::EcdsaP384,
        Algorithm::Ed25519,
        DhGroup::NistP384,
        PERFECT,
        3,
    );
}

#[test]
fn base_exchange_over_a_lossy_link() {
    // 30 % loss, 20 % duplication, up to 300 ms of reordering jitter: seeded, so
    // reproducible; several seeds per combination.
    for (i, alg) in Algorithm::ALL.into_iter().enumerate() {
        for (j, g) in DhGroup::ALL.into_iter().enumerate() {
            for seed in 0..3u64 {
                let lossy = Link {
                    loss: 0.3,
                    dup: 0.2,
                    jitter_ms: 300,
                };
                exchange(alg, alg, g, lossy, 1000 + seed * 100 + (i * 10 + j) as u64);
            }
        }
    }
}

#[test]
fn the_wire_carries_the_four_packets_in_order() {
    // The defaults (HOST_ID in the clear, no R1_COUNTER), then the other choice of both.
    for (encrypt, counter) in [(false, false), (true, true)] {
        let cfg = Config {
            encrypt_host_id: encrypt,
            send_r1_counter: counter,
            ..fast_config()
        };
        let mut s = pair(
            Algorithm::EcdsaP256,
            Algorithm::EcdsaP256,
            cfg.clone(),
            cfg,
            PERFECT,
            5,
        );
        let hb = s.b.hit();
        let now = s.now;
        s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
        assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
        let types: Vec<_> = s
            .wire
            .iter()
            .map(|(_, t)| t.packet_type().unwrap())
            .collect();
        use crate::wire::PacketType::*;
        assert_eq!(types, vec![I1, R1, I2, R2]);
        for (_, t) in &s.wire {
            assert!(crate::wire::verify_checksum(&t.payload, t.src, t.dst));
            let p = crate::wire::Packet::parse(&t.payload).unwrap();
            for r in &p.params {
                r.parse().unwrap();
            }
        }
        let r1 = crate::wire::Packet::parse(&s.wire[1].1.payload).unwrap();
        let i2 = crate::wire::Packet::parse(&s.wire[2].1.payload).unwrap();
        // The HI goes encrypted or in the clear, never both.
        assert_eq!(i2.find(ty::ENCRYPTED).is_some(), encrypt);
        assert_eq!(i2.find(ty::HOST_ID).is_some(), !encrypt);
        // R1_COUNTER only when configured, and then echoed in I2.
        assert_eq!(r1.find(ty::R1_COUNTER).is_some(), counter);
        assert_eq!(
            i2.find(ty::R1_COUNTER).map(|r| r.contents),
            r1.find(ty::R1_COUNTER).map(|r| r.contents)
        );
    }
}

#[test]
fn opportunistic_initiation() {
    let mut s = pair(
        Algorithm::Ed25519,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        6,
    );
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), None).unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    let (ea, eb) = s.established();
    assert_eq!(ea.unwrap().peer_hit, s.b.hit());
    assert_consistent(ea.unwrap(), eb.unwrap());
}

#[test]
fn simultaneous_open_yields_one_association() {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        7,
    );
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.b.initiate(now, loc(LOC_B), loc(LOC_A), Some(ha)).unwrap();
    assert!(s.run_until(Duration::from_secs(10), Sim::both_established));
    s.run_until(Duration::from_secs(30), |_| false);
    let (ea, eb) = s.established();
    let (ea, eb) = (ea.unwrap(), eb.unwrap());
    // The host with the smaller HIT initiates.
    let (i, r) = if ea.initiator { (ea, eb) } else { (eb, ea) };
    assert_eq!(i.local_hit, ha.min(hb));
    assert_consistent(i, r);
    assert_eq!(s.a.state(&hb), Some(State::Established));
    assert_eq!(s.b.state(&ha), Some(State::Established));
}

#[test]
fn close_and_close_ack() {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::Ed25519,
        fast_config(),
        fast_config(),
        Link {
            loss: 0.2,
            dup: 0.1,
            jitter_ms: 50,
        },
        8,
    );
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(60), Sim::both_established));
    let now = s.now;
    s.b.close(now, ha).unwrap();
    let closed = |v: &[Event], by_peer: bool| {
        v.iter()
            .any(|e| matches!(e, Event::Closed { by_peer: p, .. } if *p == by_peer))
    };
    assert!(
        s.run_until(Duration::from_secs(60), |s| closed(&s.events_b, false)
            && closed(&s.events_a, true))
    );
    assert_eq!(s.a.state(&hb), Some(State::Closed));
    assert_eq!(s.b.state(&ha), Some(State::Closed));
    // Both forget the association after lingering.
    s.run_until(Duration::from_secs(120), |_| false);
    assert_eq!(s.a.state(&hb), None);
    assert_eq!(s.b.state(&ha), None);
    assert!(
        s.errors_a
            .iter()
            .chain(&s.errors_b)
            .all(|e| !matches!(e, ProtocolError::BadHmac | ProtocolError::BadSignature))
    );
    // A new exchange works afterwards.
    let now = s.now;
    s.events_a.clear();
    s.events_b.clear();
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(60), Sim::both_established));
}

#[test]
fn i1_retransmissions_then_failure() {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        Link {
            loss: 1.0,
            dup: 0.0,
            jitter_ms: 0,
        },
        9,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(600), |_| false);
    let i1s = s.wire.iter().filter(|(to_b, _)| *to_b).count();
    assert_eq!(i1s as u32, 1 + s.a.config().i1_retries);
    assert!(s.events_a.iter().any(|e| matches!(
        e,
        Event::Failed {
            error: ProtocolError::Timeout(wire::PacketType::I1),
            ..
        }
    )));
    assert_eq!(s.a.association_count(), 0, "forgotten after lingering");
}

// ---- negative tests: each asserts the specific error and that nothing was established.

fn no_association(s: &Sim) {
    let (a, b) = s.established();
    assert!(a.is_none() && b.is_none());
    assert_ne!(s.a.state(&s.b.hit()), Some(State::Established));
    assert_eq!(s.b.state(&s.a.hit()), None);
}

/// Recomputes the checksum after tampering.
fn fix(t: &mut Transmit) {
    wire::set_checksum(&mut t.payload, t.src, t.dst);
}

/// Offset of parameter `ty` in a packet.
fn param_at(p: &[u8], t: u16) -> (usize, usize) {
    let pkt = wire::Packet::parse(p).unwrap();
    let r = pkt.find(t).unwrap();
    (r.offset, r.contents.len())
}

fn tampered(kind: wire::PacketType, f: impl FnMut(&mut Transmit) + 'static) -> Sim {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        11,
    );
    let mut f = f;
    s.tamper = Some(Box::new(move |_, t| {
        if t.packet_type() == Some(kind) {
            f(t);
        }
        true
    }));
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(2), |_| false);
    s
}

#[test]
fn bad_checksum_is_dropped() {
    let s = tampered(wire::PacketType::I2, |t| t.payload[4] ^= 0xff);
    assert!(
        s.errors_b
            .contains(&ProtocolError::Wire(wire::WireError::BadChecksum))
    );
    no_association(&s);
}

#[test]
fn wrong_puzzle_solution() {
    let s = tampered(wire::PacketType::I2, |t| {
        let (o, len) = param_at(&t.payload, ty::SOLUTION);
        let j_start = o + 4 + 4 + (len - 4) / 2;
        // Find a #J that does not solve the puzzle (K = 4: most values do not).
        let p = wire::Packet::parse(&t.payload).unwrap();
        let Param::Solution { random_i, k, .. } = p.required(ty::SOLUTION).unwrap() else {
            unreachable!()
        };
        let (hi, hr) = (p.header.sender, p.header.receiver);
        drop(p);
        for v in 0..=255u8 {
            t.payload[j_start] = v;
            let j = t.payload[j_start..j_start + random_i.len()].to_vec();
            if !crate::crypto::puzzle::verify(
                crate::crypto::Rhash::Sha384,
                &random_i,
                hi,
                hr,
                &j,
                k,
            ) {
                break;
            }
        }
        fix(t);
    });
    assert!(
        s.errors_b.contains(&ProtocolError::BadSolution),
        "{:?}",
        s.errors_b
    );
    no_association(&s);
}

#[test]
fn puzzle_not_issued_by_us() {
    let s = tampered(wire::PacketType::I2, |t| {
        let (o, _) = param_at(&t.payload, ty::SOLUTION);
        t.payload[o + 8] ^= 1; // #I
        fix(t);
    });
    assert!(
        s.errors_b.contains(&ProtocolError::BadPuzzle),
        "{:?}",
        s.errors_b
    );
    no_association(&s);
}

#[test]
fn bad_hmac() {
    let s = tampered(wire::PacketType::I2, |t| {
        let (o, _) = param_at(&t.payload, ty::HMAC);
        t.payload[o + 10] ^= 1;
        fix(t);
    });
    assert!(
        s.errors_b.contains(&ProtocolError::BadHmac),
        "{:?}",
        s.errors_b
    );
    no_association(&s);
}

#[test]
fn bad_signature_in_i2_and_r1() {
    let s = tampered(wire::PacketType::I2, |t| {
        let (o, _) = param_at(&t.payload, ty::HIP_SIGNATURE);
        t.payload[o + 12] ^= 1;
        fix(t);
    });
    assert!(
        s.errors_b.contains(&ProtocolError::BadSignature),
        "{:?}",
        s.errors_b
    );
    no_association(&s);
    let s = tampered(wire::PacketType::R1, |t| {
        let (o, _) = param_at(&t.payload, ty::HIP_SIGNATURE_2);
        t.payload[o + 12] ^= 1;
        fix(t);
    });
    assert!(
        s.errors_a.contains(&ProtocolError::BadSignature),
        "{:?}",
        s.errors_a
    );
    // A forged R1 changes nothing: A is still waiting in I1-SENT.
    assert_eq!(s.a.state(&s.b.hit()), Some(State::I1Sent));
    no_association(&s);
}

#[test]
fn signed_r1_fields_cannot_be_altered() {
    // Strip a group from the R1's (signed) DH_GROUP_LIST: the signature fails.
    let s = tampered(wire::PacketType::R1, |t| {
        let (o, _) = param_at(&t.payload, ty::HIP_CIPHER);
        t.payload[o + 5] = 1; // first cipher becomes NULL
        fix(t);
    });
    assert!(s.errors_a.contains(&ProtocolError::BadSignature));
    no_association(&s);
}

#[test]
fn hi_not_matching_the_expected_hit() {
    // A expects C's HIT but reaches B, which answers I1s to any HIT (an attacker, or a
    // host that changed its identity): B's R1 is valid, but its HI is not C's.
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        12,
    );
    let c = identity(Algorithm::EcdsaP256, 3).hit();
    s.tamper = Some(Box::new(|to_b, t| {
        if to_b && t.packet_type() == Some(wire::PacketType::I1) {
            t.payload[24..40].fill(0);
            fix(t);
        }
        true
    }));
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(c)).unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    let want = ProtocolError::HitMismatch {
        expected: c,
        actual: s.b.hit(),
    };
    assert!(s.errors_a.contains(&want), "{:?}", s.errors_a);
    assert!(
        s.events_a
            .iter()
            .any(|e| matches!(e, Event::Failed { error, .. } if *error == want))
    );
    assert_eq!(s.a.state(&c), Some(State::EFailed));
    // No I2 was ever sent.
    assert!(
        !s.wire
            .iter()
            .any(|(_, t)| t.packet_type() == Some(wire::PacketType::I2))
    );
    no_association(&s);
}

#[test]
fn null_hit_i1_checks_the_expected_hit_on_r1() {
    // A learned C's HIT (through SIP) but B sits at the locator: with the I1 to the null
    // HIT, B answers and A refuses on R1 — no I2, no association.
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        13,
    );
    let c = identity(Algorithm::EcdsaP256, 3).hit();
    let now = s.now;
    s.a.initiate_expecting(now, loc(LOC_A), loc(LOC_B), c)
        .unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    let want = ProtocolError::HitMismatch {
        expected: c,
        actual: s.b.hit(),
    };
    assert!(
        s.events_a
            .iter()
            .any(|e| matches!(e, Event::Failed { error, .. } if *error == want)),
        "{:?}",
        s.events_a
    );
    assert!(
        !s.wire
            .iter()
            .any(|(_, t)| t.packet_type() == Some(wire::PacketType::I2))
    );
    no_association(&s);
}

#[test]
fn null_hit_i1_with_the_right_expected_hit_completes() {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        14,
    );
    let b = s.b.hit();
    let now = s.now;
    s.a.initiate_expecting(now, loc(LOC_A), loc(LOC_B), b)
        .unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    assert_eq!(s.a.state(&b), Some(State::Established));
    assert!(
        s.events_a
            .iter()
            .any(|e| matches!(e, Event::Established(x) if x.peer_hit == b))
    );
}

#[test]
fn unsupported_dh_group_only() {
    let ca = Config {
        dh_groups: vec![DhGroup::Modp3072],
        ..fast_config()
    };
    let cb = Config {
        dh_groups: vec![DhGroup::NistP256],
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        ca,
        cb,
        PERFECT,
        13,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(600), |_| false);
    // RFC 7401 §6.7 step 4: B answers with its own group anyway; A checks the signed R1,
    // finds no group of its I1 in B's list, and aborts (§4.1.3).
    assert!(
        s.errors_a.contains(&ProtocolError::NoCommonDhGroup),
        "{:?}",
        s.errors_a
    );
    assert!(s.events_a.iter().any(|e| matches!(
        e,
        Event::Failed {
            error: ProtocolError::NoCommonDhGroup,
            ..
        }
    )));
    assert!(s.errors_b.is_empty(), "{:?}", s.errors_b);
    assert!(
        !s.wire
            .iter()
            .any(|(_, t)| t.packet_type() == Some(wire::PacketType::I2))
    );
    no_association(&s);
}

#[test]
fn dh_downgrade_is_detected() {
    // An attacker strips P-256 from A's I1 list, so B picks P-384 although both prefer
    // P-256: A sees B's signed list containing P-256 and aborts.
    let ca = Config {
        dh_groups: vec![DhGroup::NistP256, DhGroup::NistP384],
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        ca.clone(),
        ca,
        PERFECT,
        14,
    );
    s.tamper = Some(Box::new(|to_b, t| {
        if to_b && t.packet_type() == Some(wire::PacketType::I1) {
            let mut b = wire::PacketBuilder::new(
                wire::PacketType::I1,
                0,
                Hit(t.payload[8..24].try_into().unwrap()),
                Hit(t.payload[24..40].try_into().unwrap()),
            );
            b.push(&Param::DhGroupList(vec![8])).unwrap();
            t.payload = b.finish();
            fix(t);
        }
        true
    }));
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    assert!(
        s.errors_a.contains(&ProtocolError::DhDowngrade {
            chosen: 8,
            expected: 7
        }),
        "{:?}",
        s.errors_a
    );
    no_association(&s);
}

#[test]
fn replayed_i2() {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        15,
    );
    let hb = s.b.hit();
    let ha = s.a.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    let i2 = s
        .wire
        .iter()
        .find(|(_, t)| t.packet_type() == Some(wire::PacketType::I2))
        .unwrap()
        .1
        .clone();
    // In R2-SENT a repeated I2 is a lost-R2 retransmission: B resends R2 only.
    let before = s.events_b.len();
    s.b.handle_packet(s.now, i2.src, i2.dst, &i2.payload)
        .unwrap();
    assert_eq!(
        s.b.poll_transmit().and_then(|t| t.packet_type()),
        Some(wire::PacketType::R2)
    );
    // Once ESTABLISHED, the same I2 is a replay.
    s.run_until(Duration::from_secs(30), |_| false);
    assert_eq!(s.b.state(&ha), Some(State::Established));
    let r = s.b.handle_packet(s.now, i2.src, i2.dst, &i2.payload);
    assert_eq!(r, Err(ProtocolError::ReplayedI2));
    assert!(s.b.poll_transmit().is_none());
    s.collect();
    assert_eq!(s.events_b.len(), before, "no new association");
    // After the peer forgets the association (CLOSE), the replay is still refused.
    let now = s.now;
    s.a.close(now, hb).unwrap();
    s.run_until(Duration::from_secs(200), |_| false);
    assert_eq!(s.b.state(&ha), None);
    let r = s.b.handle_packet(s.now, i2.src, i2.dst, &i2.payload);
    assert_eq!(r, Err(ProtocolError::ReplayedI2));
    assert_eq!(s.b.state(&ha), None);
}

#[test]
fn truncated_out_of_order_and_oversized() {
    // Truncated: a HOST_ID whose HI length runs past the parameter.
    let s = tampered(wire::PacketType::R1, |t| {
        let (o, _) = param_at(&t.payload, ty::HOST_ID);
        t.payload[o + 4..o + 6].copy_from_slice(&500u16.to_be_bytes());
        fix(t);
    });
    assert!(
        s.errors_a.iter().any(|e| matches!(
            e,
            ProtocolError::Wire(wire::WireError::BadParam {
                ty: ty::HOST_ID,
                ..
            })
        )),
        "{:?}",
        s.errors_a
    );
    assert_eq!(s.a.state(&s.b.hit()), Some(State::I1Sent));
    no_association(&s);
    // Oversized: a parameter length beyond the packet.
    let s = tampered(wire::PacketType::I2, |t| {
        let (o, _) = param_at(&t.payload, ty::SOLUTION);
        t.payload[o + 2..o + 4].copy_from_slice(&4000u16.to_be_bytes());
        fix(t);
    });
    assert!(
        s.errors_b.iter().any(|e| matches!(
            e,
            ProtocolError::Wire(wire::WireError::TruncatedParam { .. })
        )),
        "{:?}",
        s.errors_b
    );
    no_association(&s);
    // Out of order: swap the first two parameters of the R1.
    let s = tampered(wire::PacketType::R1, |t| {
        let p = wire::Packet::parse(&t.payload).unwrap();
        let (a, b) = (p.params[0], p.params[1]);
        let mut v = t.payload[..a.offset].to_vec();
        v.extend_from_slice(&t.payload[b.offset..b.offset + b.total_len]);
        v.extend_from_slice(&t.payload[a.offset..a.offset + a.total_len]);
        v.extend_from_slice(&t.payload[b.offset + b.total_len..]);
        t.payload = v;
        fix(t);
    });
    assert!(
        s.errors_a
            .iter()
            .any(|e| matches!(e, ProtocolError::Wire(wire::WireError::OutOfOrder { .. }))),
        "{:?}",
        s.errors_a
    );
    no_association(&s);
}

#[test]
fn policy_refuses_unknown_initiators_with_a_notify() {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        fast_config(),
        fast_config(),
        PERFECT,
        16,
    );
    let allowed = identity(Algorithm::Ed25519, 3).hit();
    s.b.set_policy(Box::new(move |h: &Hit, _: &HostId| *h == allowed));
    let hb = s.b.hit();
    let ha = s.a.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(600), |_| false);
    assert!(s.errors_b.contains(&ProtocolError::BlockedByPolicy(ha)));
    // A knows B's HI from R1, so the NOTIFY is verified.
    assert!(s.events_a.iter().any(|e| matches!(
        e,
        Event::Notified { msg_type, verified: true, .. } if *msg_type == notify::BLOCKED_BY_POLICY
    )));
    // NOTIFY is informational (RFC 7401 §6.13): A keeps retrying its I2 until it gives up.
    assert!(s.events_a.iter().any(|e| matches!(
        e,
        Event::Failed {
            error: ProtocolError::Timeout(wire::PacketType::I2),
            ..
        }
    )));
    no_association(&s);
}

#[test]
fn i2_hit_suite_and_critical_parameter_checks() {
    // B accepts only RSA-suite initiators: A's ECDSA HIT suite is refused.
    let cb = Config {
        hit_suites: vec![
            crate::hit::HitSuite::RsaDsaSha256,
            crate::hit::HitSuite::EcdsaSha384,
        ],
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::Ed25519,
        Algorithm::EcdsaP256,
        fast_config(),
        cb,
        PERFECT,
        17,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    // A sees its suite missing from R1's HIT_SUITE_LIST and stops before I2.
    assert!(
        s.errors_a.contains(&ProtocolError::UnsupportedHitSuite(5)),
        "{:?}",
        s.errors_a
    );
    no_association(&s);

    // An unknown critical parameter fails the packet.
    let mut b = wire::PacketBuilder::new(wire::PacketType::I1, 0, Hit([0x20; 16]), Hit::ZERO);
    b.push(&Param::DhGroupList(vec![7])).unwrap();
    b.push(&Param::Unknown {
        ty: 1001,
        contents: vec![1],
    })
    .unwrap();
    let mut p = b.finish();
    wire::set_checksum(&mut p, loc(LOC_A), loc(LOC_B));
    let r = s.b.handle_packet(s.now, loc(LOC_A), loc(LOC_B), &p);
    assert_eq!(
        r,
        Err(ProtocolError::Wire(wire::WireError::UnsupportedCritical(
            1001
        )))
    );
}

// ---- UPDATE: rekeying and locator changes.

fn established_pair(link: Link, seed: u64) -> Sim {
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::Ed25519,
        fast_config(),
        fast_config(),
        link,
        seed,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(60), Sim::both_established));
    // Until B's R2-SENT timer has moved it to ESTABLISHED.
    s.run_until(Duration::from_secs(30), |_| false);
    assert_eq!(s.b.state(&s.a.hit()), Some(State::Established));
    s
}

fn rekeyed(v: &[Event]) -> Vec<&Rekeyed> {
    v.iter()
        .filter_map(|e| match e {
            Event::Rekeyed(r) => Some(&**r),
            _ => None,
        })
        .collect()
}

#[test]
fn rekey_over_a_lossy_link_both_directions() {
    let mut s = established_pair(
        Link {
            loss: 0.25,
            dup: 0.2,
            jitter_ms: 100,
        },
        21,
    );
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let (ea, eb) = s.established();
    let (ea, eb) = (ea.unwrap().clone(), eb.unwrap().clone());
    let now = s.now;
    s.b.rekey(now, ha).unwrap();
    assert_eq!(s.b.rekey(now, ha), Err(ProtocolError::UpdateInProgress(ha)));
    assert!(s.run_until(
        Duration::from_secs(120),
        |s| !rekeyed(&s.events_a).is_empty() && !rekeyed(&s.events_b).is_empty()
    ));
    // Let retransmissions settle: nothing more may happen.
    s.run_until(Duration::from_secs(120), |_| false);
    let (ra, rb) = (rekeyed(&s.events_a), rekeyed(&s.events_b));
    assert_eq!((ra.len(), rb.len()), (1, 1), "exactly one rekey each");
    let (ra, rb) = (ra[0].clone(), rb[0].clone());
    assert_eq!(ra.old_spi_inbound, ea.spi_inbound);
    assert_eq!(ra.old_spi_outbound, ea.spi_outbound);
    assert_eq!(rb.old_spi_inbound, eb.spi_inbound);
    assert_eq!(ra.spi_outbound, rb.spi_inbound);
    assert_eq!(ra.spi_inbound, rb.spi_outbound);
    assert_ne!(ra.spi_inbound, ea.spi_inbound);
    assert_eq!(ra.keys_outbound, rb.keys_inbound);
    assert_eq!(ra.keys_inbound, rb.keys_outbound);
    assert_ne!(ra.keys_inbound, ea.keys_inbound, "fresh keys");
    assert_eq!(ra.keymat_index, rb.keymat_index);
    assert!(ra.keymat_index > ea.keymat_index);
    // B started it: B uses its new outbound SA at once, A (the answering side) only once
    // B's ACK arrived, which both report with RekeyCompleted.
    assert!(rb.outbound_active && !ra.outbound_active);
    let completed = |v: &[Event]| {
        v.iter()
            .filter(|e| matches!(e, Event::RekeyCompleted { old_spi_inbound, .. } if *old_spi_inbound == ea.spi_inbound || *old_spi_inbound == eb.spi_inbound))
            .count()
    };
    assert_eq!((completed(&s.events_a), completed(&s.events_b)), (1, 1));
    // And once more from the other side: keys move further along KEYMAT.
    let now = s.now;
    s.a.rekey(now, hb).unwrap();
    assert!(
        s.run_until(Duration::from_secs(120), |s| rekeyed(&s.events_a).len()
            == 2
            && rekeyed(&s.events_b).len() == 2)
    );
    let (ra2, rb2) = (
        rekeyed(&s.events_a)[1].clone(),
        rekeyed(&s.events_b)[1].clone(),
    );
    assert_eq!(ra2.old_spi_inbound, ra.spi_inbound);
    assert_eq!(ra2.keys_outbound, rb2.keys_inbound);
    assert_ne!(ra2.keys_outbound, ra.keys_outbound);
    assert!(ra2.keymat_index > ra.keymat_index);
    assert_eq!(s.a.state(&hb), Some(State::Established));
}

#[test]
fn simultaneous_rekey_resolves_to_one() {
    let mut s = established_pair(PERFECT, 22);
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let now = s.now;
    s.a.rekey(now, hb).unwrap();
    s.b.rekey(now, ha).unwrap();
    assert!(s.run_until(
        Duration::from_secs(60),
        |s| !rekeyed(&s.events_a).is_empty() && !rekeyed(&s.events_b).is_empty()
    ));
    s.run_until(Duration::from_secs(60), |_| false);
    let (ra, rb) = (rekeyed(&s.events_a), rekeyed(&s.events_b));
    assert_eq!((ra.len(), rb.len()), (1, 1));
    assert_eq!(ra[0].spi_outbound, rb[0].spi_inbound);
    assert_eq!(ra[0].keys_outbound, rb[0].keys_inbound);
    assert!(
        !s.events_a
            .iter()
            .chain(&s.events_b)
            .any(|e| matches!(e, Event::UpdateFailed { .. }))
    );
}

#[test]
fn locator_change_is_verified_before_use() {
    let mut s = established_pair(PERFECT, 23);
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let a2: IpAddr = "2001:db8:1::a".parse().unwrap();
    let now = s.now;
    let mark = s.wire.len();
    s.a.update_locators(now, hb, a2).unwrap();
    let moved = |v: &[Event]| {
        v.iter().find_map(|e| match e {
            Event::LocatorsChanged {
                local_locator,
                peer_locator,
                ..
            } => Some((*local_locator, *peer_locator)),
            _ => None,
        })
    };
    assert!(
        s.run_until(Duration::from_secs(30), |s| moved(&s.events_a).is_some()
            && moved(&s.events_b).is_some())
    );
    assert_eq!(moved(&s.events_a), Some((a2, loc(LOC_B))));
    assert_eq!(moved(&s.events_b), Some((loc(LOC_B), a2)));
    // B's echo request went to the new address, and A answered from it.
    let after: Vec<_> = s.wire[mark..]
        .iter()
        .map(|(to_b, t)| (*to_b, t.src, t.dst))
        .collect();
    assert!(after.contains(&(false, loc(LOC_B), a2)), "{after:?}");
    assert!(after.contains(&(true, a2, loc(LOC_B))), "{after:?}");
    // Later packets use the new locator: a CLOSE from B goes to A's new address.
    let now = s.now;
    s.b.close(now, ha).unwrap();
    let t = s.b.poll_transmit().unwrap();
    assert_eq!(t.dst, a2);
}

#[test]
fn update_needs_valid_hmac_and_duplicates_are_answered_not_reprocessed() {
    let mut s = established_pair(PERFECT, 24);
    let (ha, hb) = (s.a.hit(), s.b.hit());
    let now = s.now;
    s.a.rekey(now, hb).unwrap();
    let upd = s.a.poll_transmit().unwrap();
    // Tampered HMAC: refused, no reply.
    let mut bad = upd.clone();
    let (o, _) = param_at(&bad.payload, ty::HMAC);
    bad.payload[o + 9] ^= 1;
    fix(&mut bad);
    assert_eq!(
        s.b.handle_packet(now, bad.src, bad.dst, &bad.payload),
        Err(ProtocolError::BadHmac)
    );
    assert!(s.b.poll_transmit().is_none());
    // The real one, twice: one Rekeyed, two identical replies.
    s.b.handle_packet(now, upd.src, upd.dst, &upd.payload)
        .unwrap();
    let r1 = s.b.poll_transmit().unwrap();
    s.b.handle_packet(now, upd.src, upd.dst, &upd.payload)
        .unwrap();
    let r2 = s.b.poll_transmit().unwrap();
    assert_eq!(r1, r2);
    let mut n = 0;
    while let Some(e) = s.b.poll_event() {
        n += matches!(e, Event::Rekeyed(_)) as usize;
    }
    assert_eq!(n, 1);
    assert_eq!(s.b.state(&ha), Some(State::Established));
}

#[test]
fn authentication_only_esp_is_not_accepted_by_default() {
    // A insists on NULL encryption; B's default offer has no authentication-only suite
    // (RFC 7402 §3.3.5): A abandons and tells B with a NOTIFY.
    let ca = Config {
        esp_suites: vec![crate::esp::EspSuite::NullHmacSha256],
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        ca,
        fast_config(),
        PERFECT,
        25,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    s.run_until(Duration::from_secs(5), |_| false);
    assert!(
        s.errors_a.contains(&ProtocolError::NoCommonEspTransform),
        "{:?}",
        s.errors_a
    );
    // B, a stateless responder, cannot verify A's NOTIFY (it holds no HI of A): it is
    // counted and raises no event (an unauthenticated sender must not cost per packet).
    assert!(
        !s.events_b
            .iter()
            .any(|e| matches!(e, Event::Notified { .. })),
        "{:?}",
        s.events_b
    );
    assert!(s.b.stats().unverified_notify >= 1);
    assert!(
        s.errors_b.contains(&ProtocolError::UnverifiedNotify),
        "{:?}",
        s.errors_b
    );
    no_association(&s);
    // Explicitly configured on both sides, it works.
    let c = Config {
        esp_suites: vec![crate::esp::EspSuite::NullHmacSha256],
        hip_ciphers: vec![HipCipher::Null],
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP256,
        c.clone(),
        c,
        PERFECT,
        26,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    let (ea, eb) = s.established();
    assert_eq!(ea.unwrap().esp_suite, crate::esp::EspSuite::NullHmacSha256);
    assert_eq!(ea.unwrap().hip_cipher, HipCipher::Null);
    assert_consistent(ea.unwrap(), eb.unwrap());
}

#[test]
fn r1_generations_rotate_and_stale_puzzles_are_refused() {
    let cfg = Config {
        r1_generation_lifetime: Duration::from_secs(60),
        ..fast_config()
    };
    for (rotations, accepted) in [(1u32, true), (2, false)] {
        let now = Instant::now();
        let mut a = endpoint(Algorithm::EcdsaP256, 1, cfg.clone(), 31, now);
        let mut b = endpoint(Algorithm::EcdsaP256, 2, cfg.clone(), 32, now);
        a.initiate(now, loc(LOC_A), loc(LOC_B), Some(b.hit()))
            .unwrap();
        let i1 = a.poll_transmit().unwrap();
        b.handle_packet(now, i1.src, i1.dst, &i1.payload).unwrap();
        let r1 = b.poll_transmit().unwrap();
        a.handle_packet(now, r1.src, r1.dst, &r1.payload).unwrap();
        let i2 = a.poll_transmit().unwrap();
        let gen0 = b.r1_generation();
        let mut t = now;
        for _ in 0..rotations {
            t += Duration::from_secs(61);
            b.handle_timeout(t);
        }
        assert_eq!(b.r1_generation(), gen0 + rotations as u64);
        let r = b.handle_packet(t, i2.src, i2.dst, &i2.payload);
        if accepted {
            r.unwrap();
            assert_eq!(b.state(&a.hit()), Some(State::R2Sent));
        } else {
            assert_eq!(r, Err(ProtocolError::BadPuzzle));
            assert_eq!(b.state(&a.hit()), None);
        }
    }
}

#[test]
fn r1s_are_rate_limited_per_address() {
    let now = Instant::now();
    let mut b = endpoint(Algorithm::Ed25519, 2, fast_config(), 41, now);
    let mut i1 = |hit_last: u8, src: &str| {
        let mut h = [0x20u8; 16];
        h[15] = hit_last;
        let mut pb = wire::PacketBuilder::new(wire::PacketType::I1, 0, Hit(h), b.hit());
        pb.push(&Param::DhGroupList(vec![7])).unwrap();
        let mut p = pb.finish();
        wire::set_checksum(&mut p, loc(src), loc(LOC_B));
        let r = b.handle_packet(now, loc(src), loc(LOC_B), &p);
        (r, b.poll_transmit().is_some())
    };
    let mut sent = 0;
    for k in 0..50u8 {
        match i1(k, LOC_A) {
            (Ok(()), true) => sent += 1,
            (Err(ProtocolError::RateLimited(a)), false) => assert_eq!(a, loc(LOC_A)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sent, fast_config().r1_burst_per_address);
    // Another address is answered.
    assert_eq!(i1(99, "2001:db8::c"), (Ok(()), true));
}

fn rekey_round(s: &mut Sim, from_a: bool, dh: bool) -> (Rekeyed, Rekeyed) {
    let (na, nb) = (rekeyed(&s.events_a).len(), rekeyed(&s.events_b).len());
    let now = s.now;
    let (ha, hb) = (s.a.hit(), s.b.hit());
    match (from_a, dh) {
        (true, false) => s.a.rekey(now, hb).unwrap(),
        (true, true) => s.a.rekey_with_new_dh(now, hb).unwrap(),
        (false, false) => s.b.rekey(now, ha).unwrap(),
        (false, true) => s.b.rekey_with_new_dh(now, ha).unwrap(),
    }
    assert!(
        s.run_until(Duration::from_secs(60), |s| rekeyed(&s.events_a).len() > na
            && rekeyed(&s.events_b).len() > nb)
    );
    // Let the final ACK arrive.
    s.run_until(Duration::from_millis(100), |_| false);
    (
        rekeyed(&s.events_a)[na].clone(),
        rekeyed(&s.events_b)[nb].clone(),
    )
}

#[test]
fn rekey_with_a_new_diffie_hellman_exchange() {
    let mut s = established_pair(
        Link {
            loss: 0.2,
            dup: 0.1,
            jitter_ms: 50,
        },
        27,
    );
    let mark = s.wire.len();
    let (ra, rb) = rekey_round(&mut s, true, true);
    // Both UPDATEs of the rekey carried a DIFFIE_HELLMAN.
    let with_dh = s.wire[mark..]
        .iter()
        .filter(|(_, t)| {
            wire::Packet::parse(&t.payload)
                .map(|p| p.find(ty::DIFFIE_HELLMAN).is_some())
                .unwrap_or(false)
        })
        .map(|(to_b, _)| *to_b)
        .collect::<std::collections::HashSet<_>>();
    assert_eq!(with_dh.len(), 2, "sent in both directions");
    assert_eq!(ra.keys_outbound, rb.keys_inbound);
    assert_eq!(ra.keys_inbound, rb.keys_outbound);
    assert_eq!(ra.spi_outbound, rb.spi_inbound);
    // Keys from the start of a new KEYMAT.
    let esp = ra.esp_suite;
    assert_eq!(
        ra.keymat_index,
        2 * (esp.enc_key_len() + esp.auth_key_len())
    );
    let (ea, _) = s.established();
    assert_ne!(ra.keys_inbound, ea.unwrap().keys_inbound);
    // HIP_MAC keys did not change: a later UPDATE and a CLOSE still authenticate.
    let (ra2, rb2) = rekey_round(&mut s, false, false);
    assert_eq!(ra2.keys_inbound, rb2.keys_outbound);
    assert!(ra2.keymat_index > ra.keymat_index);
}

#[test]
fn keymat_exhaustion_switches_to_a_dh_rekey() {
    let cfg = Config {
        esp_suites: vec![crate::esp::EspSuite::Aes256CbcHmacSha256],
        ..fast_config()
    };
    let mut s = pair(
        Algorithm::Ed25519,
        Algorithm::Ed25519,
        cfg.clone(),
        cfg,
        PERFECT,
        28,
    );
    let hb = s.b.hit();
    let now = s.now;
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(5), Sim::both_established));
    s.run_until(Duration::from_secs(30), |_| false);
    let mut last = s.established().0.unwrap().keymat_index;
    let mut restarted = false;
    for i in 0..200 {
        let (ra, rb) = rekey_round(&mut s, i % 2 == 0, false);
        assert_eq!(ra.keys_outbound, rb.keys_inbound, "round {i}");
        assert_eq!(ra.keymat_index, rb.keymat_index);
        if ra.keymat_index < last {
            // SHA-256 HKDF gives 255 × 32 octets: the rekey made a new KEYMAT.
            assert_eq!(ra.keymat_index, 2 * (32 + 32));
            restarted = true;
            break;
        }
        last = ra.keymat_index;
    }
    assert!(restarted, "KEYMAT never ran out");
}

#[test]
fn a_rebooted_initiator_replaces_the_association() {
    let mut s = established_pair(PERFECT, 29);
    let (ea, eb) = s.established();
    let (ea, eb) = (ea.unwrap().clone(), eb.unwrap().clone());
    let hb = s.b.hit();
    // A loses all state (reboot) and starts over with the same identity.
    let now = s.now;
    s.a = endpoint(Algorithm::EcdsaP256, 1, fast_config(), 77, now);
    s.a.set_spi_allocator(Box::new(SequentialSpis(0x3000_0000)));
    s.events_a.clear();
    s.events_b.clear();
    s.a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    assert!(s.run_until(Duration::from_secs(10), Sim::both_established));
    let (na, nb) = s.established();
    let (na, nb) = (na.unwrap(), nb.unwrap());
    assert_consistent(na, nb);
    assert_eq!(nb.replaced_spis, Some((eb.spi_inbound, eb.spi_outbound)));
    assert_eq!(na.replaced_spis, None);
    assert_ne!(na.keys_outbound, ea.keys_outbound);
}

#[test]
fn a_late_old_update_is_acknowledged_not_reprocessed() {
    let mut s = established_pair(PERFECT, 30);
    let hb = s.b.hit();
    let mark = s.wire.len();
    rekey_round(&mut s, true, false);
    let first = s.wire[mark..]
        .iter()
        .find(|(to_b, t)| *to_b && t.packet_type() == Some(wire::PacketType::Update))
        .unwrap()
        .1
        .clone();
    rekey_round(&mut s, true, false);
    let n = rekeyed(&s.events_b).len();
    // The first rekey's UPDATE (Update ID 0) arrives again after ID 1 was processed.
    s.b.handle_packet(s.now, first.src, first.dst, &first.payload)
        .unwrap();
    let reply = s.b.poll_transmit().unwrap();
    let p = wire::Packet::parse(&reply.payload).unwrap();
    assert_eq!(p.required(ty::ACK).unwrap(), Param::Ack(vec![0]));
    assert!(p.find(ty::ESP_INFO).is_none() && p.find(ty::SEQ).is_none());
    s.collect();
    assert_eq!(rekeyed(&s.events_b).len(), n, "not processed again");
    assert_eq!(s.a.state(&hb), Some(State::Established));
}

/// Strictness kept against interoperability pressure (issue 10).
mod strict;

/// Exchanges that must not wedge or leak, and floods (the reliability issue).
mod reliability;

/// HIP over UDP through a simulated NAT (RFC 9028 / RFC 5770 UDP encapsulation).
mod nat;
