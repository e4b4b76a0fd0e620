//! Strictness that interoperability must not soften (issue 10).
//!
//! cutehip, the independent HIPv2 implementation, gets three things wrong that we must
//! never accept: it MACs with the integrity key of the other direction, signs R2 with
//! HIP_SIGNATURE_2, and hashes the puzzle as `I | HIT-R | HIT-I | J`. Each test below
//! rebuilds a packet with exactly one of these defects and everything else right, and
//! has a control: the same construction without the defect is accepted. So a refusal
//! comes from the check under test, and removing that check makes the test fail.
//! (Recorded cutehip packets exercise the same checks in `tests/cutehip.rs`.)

use super::*;
use crate::{
    crypto::{DhSecret, Rhash, puzzle},
    wire::{Packet, PacketBuilder, PacketType},
};

/// How a foreign Initiator hashes the puzzle.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// RFC 7401 §4.1.2: `RHASH(I | HIT-I | HIT-R | J)`.
    Rfc,
    /// cutehip's `RHASH(I | HIT-R | HIT-I | J)`.
    Reversed,
}

/// Which integrity key a foreign sender MACs with.
#[derive(Clone, Copy, PartialEq)]
enum MacKey {
    /// Its own outgoing key (RFC 7401 §6.5).
    Own,
    /// The key of the other direction (cutehip).
    Peers,
}

fn solves(rhash: Rhash, i: &[u8], hit_i: Hit, hit_r: Hit, j: &[u8], k: u8, o: Order) -> bool {
    match o {
        Order::Rfc => puzzle::verify(rhash, i, hit_i, hit_r, j, k),
        Order::Reversed => puzzle::verify(rhash, i, hit_r, hit_i, j, k),
    }
}

/// A #J that solves the puzzle in `order` and, for `Reversed`, not in the RFC order.
fn solve_in(rhash: Rhash, i: &[u8], hit_i: Hit, hit_r: Hit, k: u8, order: Order) -> Vec<u8> {
    let mut j = vec![0u8; i.len()];
    for n in 0u64.. {
        j[..8].copy_from_slice(&n.to_be_bytes());
        if solves(rhash, i, hit_i, hit_r, &j, k, order)
            && (order == Order::Rfc || !solves(rhash, i, hit_i, hit_r, &j, k, Order::Rfc))
        {
            return j;
        }
    }
    unreachable!()
}

/// The four HIP keys at the start of KEYMAT (RFC 7401 §6.5): HIP-gl encryption, HIP-gl
/// integrity, HIP-lg encryption, HIP-lg integrity; returns (encryption, integrity) for
/// what `sender` sends to `receiver`.
fn sender_keys(k: &Keymat, cipher: HipCipher, sender: Hit, receiver: Hit) -> (Secret, Secret) {
    let (e, i) = (cipher.key_len(), k.rhash().len());
    let m = k.draw(0, 2 * (e + i)).unwrap();
    let off = if sender > receiver { 0 } else { e + i };
    (
        Zeroizing::new(m[off..off + e].to_vec()),
        Zeroizing::new(m[off + e..off + e + i].to_vec()),
    )
}

/// An I2 built from scratch by an Initiator other than ours, answering `r1`, with the
/// HOST_ID in the clear (as cutehip sends it).
fn foreign_i2(r1: &Transmit, id: &HostIdentity, order: Order, mac: MacKey) -> Transmit {
    let p = Packet::parse(&r1.payload).unwrap();
    let (hit_r, hit_i) = (p.header.sender, p.header.receiver);
    assert_eq!(hit_i, id.hit());
    let Param::Puzzle {
        k,
        opaque,
        random_i,
        ..
    } = p.required(ty::PUZZLE).unwrap()
    else {
        unreachable!()
    };
    let Param::DiffieHellman { group, public } = p.required(ty::DIFFIE_HELLMAN).unwrap() else {
        unreachable!()
    };
    let Param::HostId { algorithm, hi, .. } = p.required(ty::HOST_ID).unwrap() else {
        unreachable!()
    };
    let rhash =
        Rhash::for_suite(HostId::from_hi_bytes(algorithm, &hi).unwrap().hit_suite()).unwrap();
    let j = solve_in(rhash, &random_i, hit_i, hit_r, k, order);
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let dh = DhSecret::generate(DhGroup::from_id(group).unwrap(), &mut rng);
    let kij = dh.agree(&public).unwrap();
    let km = Keymat::derive(rhash, &random_i, &j, &kij, hit_i, hit_r);
    let cipher = HipCipher::Aes128Cbc;
    let mac_key = match mac {
        MacKey::Own => sender_keys(&km, cipher, hit_i, hit_r).1,
        MacKey::Peers => sender_keys(&km, cipher, hit_r, hit_i).1,
    };
    let mut b = PacketBuilder::new(PacketType::I2, 0, hit_i, hit_r);
    b.push(&Param::EspInfo {
        keymat_index: (2 * (cipher.key_len() + rhash.len())) as u16,
        old_spi: 0,
        new_spi: 0x3000_0000,
    })
    .unwrap();
    for param in [
        Param::Solution {
            k,
            opaque,
            random_i,
            solution_j: j,
        },
        Param::DiffieHellman {
            group,
            public: dh.public_value(),
        },
        Param::HipCipher(vec![cipher.id()]),
        Param::HostId {
            algorithm: id.host_id().algorithm() as u16,
            hi: id.host_id().to_hi_bytes(),
            di_type: 0,
            di: Vec::new(),
        },
        Param::TransportFormatList(vec![ty::ESP_TRANSFORM]),
        Param::EspTransform(vec![EspSuite::Aes128CbcHmacSha256.id()]),
    ] {
        b.push(&param).unwrap();
    }
    b.push(&Param::Hmac(rhash.hmac(&mac_key, b.covered())))
        .unwrap();
    b.push(&Param::Signature {
        algorithm: id.host_id().algorithm() as u16,
        signature: id.sign(b.covered()).unwrap(),
    })
    .unwrap();
    let mut payload = b.finish();
    wire::set_checksum(&mut payload, r1.dst, r1.src);
    Transmit {
        src: r1.dst,
        dst: r1.src,
        udp: None,
        payload,
    }
}

fn one(ep: &mut Endpoint) -> Transmit {
    let t = ep.poll_transmit().expect("a packet to send");
    assert!(ep.poll_transmit().is_none(), "exactly one packet");
    t
}

fn deliver(to: &mut Endpoint, now: Instant, t: &Transmit) -> Result<(), ProtocolError> {
    to.handle_packet(now, t.src, t.dst, &t.payload)
}

fn established(ep: &mut Endpoint) -> bool {
    std::iter::from_fn(|| ep.poll_event()).any(|e| matches!(e, Event::Established(_)))
}

/// A (initiator, ECDSA P-256, identity 1) and B (responder with puzzle difficulty `k`),
/// run up to B's R1.
fn up_to_r1(k: u8) -> (Endpoint, Endpoint, Instant, Transmit) {
    let now = Instant::now();
    let mut a = endpoint(Algorithm::EcdsaP256, 1, fast_config(), 1, now);
    let cfg = Config {
        puzzle_difficulty: k,
        ..fast_config()
    };
    let mut b = endpoint(Algorithm::EcdsaP256, 2, cfg, 2, now);
    b.set_spi_allocator(Box::new(SequentialSpis(0x2000_0000)));
    let hb = b.hit();
    a.initiate(now, loc(LOC_A), loc(LOC_B), Some(hb)).unwrap();
    deliver(&mut b, now, &one(&mut a)).unwrap();
    let r1 = one(&mut b);
    (a, b, now, r1)
}

#[test]
fn i2_mac_made_with_the_responders_key_is_refused() {
    let (a, mut b, now, r1) = up_to_r1(4);
    let id = identity(Algorithm::EcdsaP256, 1);
    let bad = foreign_i2(&r1, &id, Order::Rfc, MacKey::Peers);
    assert_eq!(
        deliver(&mut b, now, &bad),
        Err(ProtocolError::HmacWrongDirection)
    );
    assert_eq!(b.state(&a.hit()), None, "nothing changed");
    assert!(b.poll_transmit().is_none() && !established(&mut b));
    // Control: the same I2 MACed with the Initiator's own key is taken.
    let good = foreign_i2(&r1, &id, Order::Rfc, MacKey::Own);
    deliver(&mut b, now, &good).unwrap();
    assert!(established(&mut b));
    assert_eq!(one(&mut b).packet_type(), Some(PacketType::R2));
}

#[test]
fn responder_refuses_a_solution_in_reversed_hash_order() {
    // K = 8: a #J found for I | HIT-R | HIT-I | J (and checked not to solve the RFC
    // order) is refused, though everything else in the I2 is right.
    let (a, mut b, now, r1) = up_to_r1(8);
    let id = identity(Algorithm::EcdsaP256, 1);
    let bad = foreign_i2(&r1, &id, Order::Reversed, MacKey::Own);
    assert_eq!(deliver(&mut b, now, &bad), Err(ProtocolError::BadSolution));
    assert_eq!(b.state(&a.hit()), None);
    assert!(b.poll_transmit().is_none() && !established(&mut b));
    let good = foreign_i2(&r1, &id, Order::Rfc, MacKey::Own);
    deliver(&mut b, now, &good).unwrap();
    assert!(established(&mut b));
}

#[test]
fn initiator_solves_only_in_rfc_order() {
    // Our solver, over many puzzles: every #J solves I | HIT-I | HIT-R | J. (A solver
    // that took either order would, for about half of them, return a #J that only
    // solves the reversed one.)
    let (hi, hr) = (identity(Algorithm::EcdsaP256, 1).hit(), Hit([0x20; 16]));
    for seed in 0..32u64 {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut i = [0u8; 48];
        rng.fill_bytes(&mut i);
        let j = puzzle::solve(Rhash::Sha384, &i, hi, hr, 8, 1 << 20, &mut rng).unwrap();
        assert!(
            puzzle::verify(Rhash::Sha384, &i, hi, hr, &j, 8),
            "seed {seed}"
        );
    }
    // And the #J our Initiator puts into its I2 is one.
    let (mut a, b, now, r1) = up_to_r1(8);
    deliver(&mut a, now, &r1).unwrap();
    let i2 = one(&mut a);
    let p = Packet::parse(&i2.payload).unwrap();
    let Param::Solution {
        random_i,
        solution_j,
        k,
        ..
    } = p.required(ty::SOLUTION).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(k, 8);
    assert!(puzzle::verify(
        Rhash::Sha384,
        &random_i,
        a.hit(),
        b.hit(),
        &solution_j,
        k
    ));
}

/// B's R2 to A's I2, and B's HIP keys.
fn up_to_r2() -> (Endpoint, Endpoint, Instant, Transmit) {
    let (mut a, mut b, now, r1) = up_to_r1(4);
    deliver(&mut a, now, &r1).unwrap();
    deliver(&mut b, now, &one(&mut a)).unwrap();
    let r2 = one(&mut b);
    (a, b, now, r2)
}

/// Rebuilds `r2` (from `b`) with HIP_MAC_2 under `mac` and the signature in `sig_ty`.
fn rebuilt_r2(b: &Endpoint, r2: &Transmit, mac: MacKey, sig_ty: u16) -> Transmit {
    let p = Packet::parse(&r2.payload).unwrap();
    let peer = p.header.receiver;
    let keys = b.assocs[&peer].keys.as_ref().unwrap();
    let key = match mac {
        MacKey::Own => &keys.hmac_out,
        MacKey::Peers => &keys.hmac_in,
    };
    let mut bld = PacketBuilder::new(PacketType::R2, 0, b.hit(), peer);
    bld.push(&p.required(ty::ESP_INFO).unwrap()).unwrap();
    // HIP_MAC_2 covers the R2 so far with the Responder's HOST_ID appended (§6.4.1).
    let mut img = bld.covered().to_vec();
    img.extend_from_slice(&b.hi_param.to_bytes());
    img[1] = (img.len() / 8 - 1) as u8;
    bld.push(&Param::Hmac2(keys.rhash.hmac(key, &img))).unwrap();
    let (algorithm, signature) = (
        b.identity.host_id().algorithm() as u16,
        b.identity.sign(bld.covered()).unwrap(),
    );
    bld.push(&if sig_ty == ty::HIP_SIGNATURE {
        Param::Signature {
            algorithm,
            signature,
        }
    } else {
        Param::Signature2 {
            algorithm,
            signature,
        }
    })
    .unwrap();
    let mut payload = bld.finish();
    wire::set_checksum(&mut payload, r2.src, r2.dst);
    Transmit {
        payload,
        ..r2.clone()
    }
}

#[test]
fn r2_mac_made_with_the_initiators_key_is_refused() {
    let (mut a, b, now, r2) = up_to_r2();
    let bad = rebuilt_r2(&b, &r2, MacKey::Peers, ty::HIP_SIGNATURE);
    assert_eq!(
        deliver(&mut a, now, &bad),
        Err(ProtocolError::HmacWrongDirection)
    );
    assert_eq!(a.state(&b.hit()), Some(State::I2Sent));
    assert!(!established(&mut a));
    let good = rebuilt_r2(&b, &r2, MacKey::Own, ty::HIP_SIGNATURE);
    deliver(&mut a, now, &good).unwrap();
    assert!(established(&mut a));
}

#[test]
fn r2_signed_with_hip_signature_2_is_refused() {
    let (mut a, b, now, r2) = up_to_r2();
    // Signed over exactly what a HIP_SIGNATURE would cover, as cutehip does: the
    // signature verifies, the parameter is still the wrong one.
    let bad = rebuilt_r2(&b, &r2, MacKey::Own, ty::HIP_SIGNATURE_2);
    assert_eq!(
        deliver(&mut a, now, &bad),
        Err(ProtocolError::WrongSignatureParameter {
            packet: PacketType::R2,
            expected: "HIP_SIGNATURE",
            found: "HIP_SIGNATURE_2",
        })
    );
    assert_eq!(a.state(&b.hit()), Some(State::I2Sent));
    assert!(!established(&mut a));
    let good = rebuilt_r2(&b, &r2, MacKey::Own, ty::HIP_SIGNATURE);
    deliver(&mut a, now, &good).unwrap();
    assert!(established(&mut a));
}

#[test]
fn r1_signed_with_hip_signature_is_refused() {
    let (mut a, b, now, r1) = up_to_r1(4);
    // The R1 re-signed with HIP_SIGNATURE over the whole packet: refused as the wrong
    // parameter (an R1 is signed with HIP_SIGNATURE_2, RFC 7401 §5.3.2).
    let p = Packet::parse(&r1.payload).unwrap();
    let sig2 = p.find(ty::HIP_SIGNATURE_2).unwrap().offset;
    let mut bld = PacketBuilder::new(PacketType::R1, 0, b.hit(), a.hit());
    for r in p.params.iter().filter(|r| r.offset < sig2) {
        bld.push(&r.parse().unwrap()).unwrap();
    }
    let signature = b.identity.sign(bld.covered()).unwrap();
    bld.push(&Param::Signature {
        algorithm: b.identity.host_id().algorithm() as u16,
        signature,
    })
    .unwrap();
    let mut payload = bld.finish();
    wire::set_checksum(&mut payload, r1.src, r1.dst);
    let bad = Transmit {
        payload,
        ..r1.clone()
    };
    assert_eq!(
        deliver(&mut a, now, &bad),
        Err(ProtocolError::WrongSignatureParameter {
            packet: PacketType::R1,
            expected: "HIP_SIGNATURE_2",
            found: "HIP_SIGNATURE",
        })
    );
    assert_eq!(a.state(&b.hit()), Some(State::I1Sent));
    deliver(&mut a, now, &r1).unwrap();
    assert_eq!(a.state(&b.hit()), Some(State::I2Sent));
}
