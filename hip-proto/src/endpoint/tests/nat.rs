//! HIP over UDP through a NAT, on simulated time: alice (10.0.0.2) behind a NAT that
//! maps her 10500 to 192.0.2.1:`port`, bob (198.51.100.2) on a public address. The NAT
//! rewrites addresses and ports as a real one does, so the HIP checksum could not survive
//! it: over UDP it must be zero and the endpoints must not check it.

use std::net::SocketAddr;

use super::*;

const ALICE_PRIVATE: &str = "10.0.0.2";
const NAT_PUBLIC: &str = "192.0.2.1";
const BOB: &str = "198.51.100.2";

struct Nat {
    a: Endpoint,
    b: Endpoint,
    now: Instant,
    /// The NAT's current public port for alice's 10500.
    port: u16,
    events_a: Vec<Event>,
    events_b: Vec<Event>,
    errors_b: Vec<ProtocolError>,
    /// Every packet that crossed the NAT: (alice → bob, the packet as sent).
    wire: Vec<(bool, Transmit)>,
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(loc(ip), port)
}

impl Nat {
    fn new(seed: u64) -> Self {
        let now = Instant::now();
        let a = endpoint(Algorithm::EcdsaP256, 1, fast_config(), seed * 3 + 1, now);
        let mut b = endpoint(Algorithm::EcdsaP256, 2, fast_config(), seed * 3 + 2, now);
        b.set_spi_allocator(Box::new(SequentialSpis(0x2000_0000)));
        Nat {
            a,
            b,
            now,
            port: 40001,
            events_a: Vec::new(),
            events_b: Vec::new(),
            errors_b: Vec::new(),
            wire: Vec::new(),
        }
    }

    /// Delivers everything both sides have to send, through the NAT, until quiet.
    fn run(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.a.poll_transmit() {
                moved = true;
                let u = t.udp.expect("alice sends only over UDP");
                assert_eq!(t.src, loc(ALICE_PRIVATE));
                self.wire.push((true, t.clone()));
                // Outbound through the NAT: the source becomes the public address/port.
                let r = self.b.handle_udp_packet(
                    self.now,
                    sock(NAT_PUBLIC, self.port),
                    SocketAddr::new(t.dst, u.peer),
                    &t.payload,
                );
                if let Err(e) = r {
                    self.errors_b.push(e);
                }
            }
            while let Some(t) = self.b.poll_transmit() {
                moved = true;
                let u = t.udp.expect("bob answers over UDP");
                self.wire.push((false, t.clone()));
                // Inbound: only the current mapping reaches alice.
                if t.dst != loc(NAT_PUBLIC) || u.peer != self.port {
                    continue;
                }
                let _ = self.a.handle_udp_packet(
                    self.now,
                    SocketAddr::new(t.src, u.local),
                    sock(ALICE_PRIVATE, HIP_UDP_PORT),
                    &t.payload,
                );
            }
            while let Some(e) = self.a.poll_event() {
                self.events_a.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.events_b.push(e);
            }
            if !moved {
                break;
            }
        }
    }

    /// Advances simulated time to `t`, firing timers on the way.
    fn advance_to(&mut self, t: Instant) {
        loop {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|d| *d <= t)
                .min();
            let Some(d) = next else { break };
            self.now = self.now.max(d);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.run();
        }
        self.now = t;
    }

    fn established(&mut self) -> (Established, Established) {
        self.a
            .initiate(
                self.now,
                loc(ALICE_PRIVATE),
                sock(BOB, HIP_UDP_PORT),
                Some(self.b.hit()),
            )
            .unwrap();
        self.run();
        let get = |v: &[Event]| {
            v.iter()
                .find_map(|e| match e {
                    Event::Established(e) => Some((**e).clone()),
                    _ => None,
                })
                .expect("established")
        };
        (get(&self.events_a), get(&self.events_b))
    }

    fn locator_changes_b(&self) -> Vec<(IpAddr, Option<UdpPorts>)> {
        self.events_b
            .iter()
            .filter_map(|e| match e {
                Event::LocatorsChanged {
                    peer_locator, udp, ..
                } => Some((*peer_locator, *udp)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_host_behind_a_nat_completes_the_exchange_over_udp() {
    let mut n = Nat::new(1);
    let (ea, eb) = n.established();
    // alice sees bob as he is; bob sees alice as the NAT maps her.
    assert_eq!(ea.peer_locator, loc(BOB));
    assert_eq!(
        ea.udp,
        Some(UdpPorts {
            local: HIP_UDP_PORT,
            peer: HIP_UDP_PORT
        })
    );
    assert_eq!(eb.peer_locator, loc(NAT_PUBLIC));
    assert_eq!(
        eb.udp,
        Some(UdpPorts {
            local: HIP_UDP_PORT,
            peer: 40001
        })
    );
    assert_keys_agree(&ea, &eb);
    // I1, R1, I2, R2 — all over UDP, all with the HIP checksum zero.
    let types: Vec<_> = n.wire.iter().map(|(_, t)| t.packet_type()).collect();
    assert_eq!(
        types,
        [
            Some(PacketType::I1),
            Some(PacketType::R1),
            Some(PacketType::I2),
            Some(PacketType::R2)
        ]
    );
    assert!(n.wire.iter().all(|(_, t)| t.payload[4..6] == [0, 0]));
    assert!(n.errors_b.is_empty(), "{:?}", n.errors_b);
}

#[test]
fn a_raw_exchange_is_unchanged_and_a_checksummed_udp_packet_is_refused() {
    let mut n = Nat::new(2);
    n.a.initiate(n.now, loc(ALICE_PRIVATE), loc(BOB), Some(n.b.hit()))
        .unwrap();
    let i1 = n.a.poll_transmit().unwrap();
    assert_eq!(i1.udp, None, "an IpAddr locator means raw HIP");
    assert!(wire::verify_checksum(&i1.payload, i1.src, i1.dst));
    // The same bytes (a pseudo-header checksum in them) over UDP: refused, no state.
    let r = n.b.handle_udp_packet(
        n.now,
        sock(NAT_PUBLIC, 40001),
        sock(BOB, HIP_UDP_PORT),
        &i1.payload,
    );
    assert_eq!(r, Err(WireError::BadChecksum.into()));
    assert!(n.b.poll_transmit().is_none());
    assert_eq!(n.b.association_count(), 0);
}

#[test]
fn keepalives_keep_coming_and_change_nothing() {
    let mut n = Nat::new(3);
    n.established();
    let start = n.wire.len();
    let t0 = n.now;
    n.advance_to(t0 + Duration::from_secs(46));
    let after: Vec<_> = n.wire[start..].iter().collect();
    // Three keepalives from each side in 46 s (every 15 s), each a signed NOTIFY
    // NAT_KEEPALIVE that the other verifies and does not answer.
    for dir in [true, false] {
        let k: Vec<_> = after.iter().filter(|(d, _)| *d == dir).collect();
        assert_eq!(k.len(), 3, "keepalives {dir}: {k:?}");
        for (_, t) in k {
            assert_eq!(t.packet_type(), Some(PacketType::Notify));
            let p = Packet::parse(&t.payload).unwrap();
            assert_eq!(
                p.required(ty::NOTIFICATION).unwrap(),
                Param::Notification {
                    msg_type: notify::NAT_KEEPALIVE,
                    data: vec![]
                }
            );
            assert!(p.optional(ty::HIP_SIGNATURE).unwrap().is_some());
        }
    }
    assert_eq!(n.a.stats().keepalives_received, 3);
    // The last one came at 45 s; the clock now reads 46 s.
    let paths = n.b.udp_paths(n.now);
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0].0, n.a.hit());
    assert_eq!(paths[0].2, Some(Duration::from_secs(1)));
    assert_eq!(n.b.stats().keepalives_received, 3);
    assert!(
        n.events_a
            .iter()
            .all(|e| !matches!(e, Event::Notified { .. }))
    );
    assert!(n.errors_b.is_empty(), "{:?}", n.errors_b);
    assert!(n.locator_changes_b().is_empty());
}

#[test]
fn a_nat_rebinding_is_verified_then_followed() {
    let mut n = Nat::new(4);
    n.established();
    // The NAT forgets alice's binding and maps her anew.
    n.port = 40002;
    let t0 = n.now;
    n.advance_to(t0 + Duration::from_secs(16));
    // bob heard alice's keepalive from the new port, checked that path with an echo
    // (which alice answered there), and only then moved to it.
    assert_eq!(
        n.locator_changes_b(),
        [(
            loc(NAT_PUBLIC),
            Some(UdpPorts {
                local: HIP_UDP_PORT,
                peer: 40002
            })
        )]
    );
    let echo = n
        .wire
        .iter()
        .filter(|(to_b, t)| !to_b && t.packet_type() == Some(PacketType::Update))
        .find(|(_, t)| {
            Packet::parse(&t.payload)
                .unwrap()
                .optional(ty::ECHO_REQUEST_SIGNED)
                .unwrap()
                .is_some()
        })
        .expect("an echo request from bob");
    assert_eq!(echo.1.udp.unwrap().peer, 40002);
}

#[test]
fn a_replayed_keepalive_from_elsewhere_moves_nothing() {
    let mut n = Nat::new(5);
    n.established();
    let t0 = n.now;
    n.advance_to(t0 + Duration::from_secs(16));
    let keepalive = n
        .wire
        .iter()
        .rev()
        .find(|(to_b, t)| *to_b && t.packet_type() == Some(PacketType::Notify))
        .map(|(_, t)| t.payload.clone())
        .expect("a keepalive from alice");
    // A forged one (its signature broken) is dropped and counted, nothing sent.
    let mut forged = keepalive.clone();
    let (at, len) = param_at(&forged, ty::HIP_SIGNATURE);
    forged[at + 4 + len - 1] ^= 1;
    let r = n.b.handle_udp_packet(
        n.now,
        sock("203.0.113.66", 5555),
        sock(BOB, HIP_UDP_PORT),
        &forged,
    );
    assert_eq!(r, Err(ProtocolError::BadSignature));
    assert!(n.b.poll_transmit().is_none());
    // An attacker replays a real one from its own address: bob asks that address to
    // echo a nonce, which it cannot sign; bob's path to alice stays.
    n.b.handle_udp_packet(
        n.now,
        sock("203.0.113.66", 5555),
        sock(BOB, HIP_UDP_PORT),
        &keepalive,
    )
    .unwrap();
    let probe =
        n.b.poll_transmit()
            .expect("an echo request to the new path");
    assert_eq!(probe.dst, loc("203.0.113.66"));
    // Nobody answers; the retries run out.
    n.advance_to(t0 + Duration::from_secs(120));
    assert!(n.locator_changes_b().is_empty());
    // And ESP, keepalives and everything else still go to the NAT's mapping.
    let last_to_alice = n
        .wire
        .iter()
        .rev()
        .find(|(to_b, t)| !to_b && t.dst == loc(NAT_PUBLIC))
        .expect("bob still talks to alice");
    assert_eq!(last_to_alice.1.udp.unwrap().peer, 40001);
    assert!(
        n.events_b
            .iter()
            .any(|e| matches!(e, Event::UpdateFailed { .. }))
    );
}

#[test]
fn a_mapping_seen_by_the_kernel_starts_the_same_verification() {
    let mut n = Nat::new(6);
    n.established();
    n.port = 40003;
    // bob's kernel reports ESP from alice at the new port: bob checks that path at once
    // (no waiting for her next keepalive), and moves when she answers from it.
    n.b.path_observed(n.now, n.a.hit(), sock(NAT_PUBLIC, 40003))
        .unwrap();
    n.run();
    assert_eq!(
        n.locator_changes_b(),
        [(
            loc(NAT_PUBLIC),
            Some(UdpPorts {
                local: HIP_UDP_PORT,
                peer: 40003
            })
        )]
    );
    // The same report again: already the path, nothing sent.
    n.b.path_observed(n.now, n.a.hit(), sock(NAT_PUBLIC, 40003))
        .unwrap();
    assert!(n.b.poll_transmit().is_none());
    // A report for an unknown peer is refused.
    assert!(
        n.b.path_observed(n.now, Hit::ZERO, sock(NAT_PUBLIC, 1))
            .is_err()
    );
}
