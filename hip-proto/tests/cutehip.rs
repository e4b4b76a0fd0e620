//! Recorded base exchanges with cutehip, the independent HIPv2 implementation, as test
//! vectors (how they were made: `tests/data/cutehip/README.md`).
//!
//! Every recorded packet is parsed, its checksum and signature checked; then each
//! exchange is replayed into our [`Endpoint`], rebuilt exactly as it ran (same key, same
//! configuration, the same seeded RNG the recording used), as far as the recorded
//! packets allow: what we sent must come out again, what cutehip sent must be accepted
//! — or refused, for the runs against an unpatched cutehip, with the reason that names
//! its bug. The ESP keys our endpoint derives must match the fingerprints both sides
//! logged while the exchange ran, and KEYMAT must follow from cutehip's own DH secret.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use hip_proto::{
    Hit, HostId, HostIdentity,
    crypto::{DhGroup, Keymat, Rhash, puzzle},
    endpoint::{BoxRng, Config, Endpoint, Established, Event, ProtocolError, State},
    wire::{self, Packet, Param, ty},
};
use rand_core::SeedableRng;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cutehip")
}

/// One recorded packet.
struct Pkt {
    ty: String,
    src: IpAddr,
    dst: IpAddr,
    bytes: Vec<u8>,
}

/// One recorded run.
struct Vector {
    tag: &'static str,
    run: Value,
    packets: Vec<Pkt>,
    /// Our `hip-agent hip connect|listen` output during the run.
    ours: Option<Value>,
    /// cutehip's SAs as it installed them (SPI, key fingerprints).
    cutehip_sas: Vec<Value>,
    /// cutehip's DH secret Kij, from its log.
    cutehip_kij: Option<Vec<u8>>,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn load(tag: &'static str) -> Vector {
    let dir = data().join(tag);
    let run: Value = serde_json::from_str(&read(&dir.join("run.json"))).unwrap();
    let packets = read(&dir.join("packets.txt"))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Pkt {
                ty: f[0].to_owned(),
                src: f[1].parse().unwrap(),
                dst: f[2].parse().unwrap(),
                bytes: hex::decode(f[3]).unwrap(),
            }
        })
        .collect();
    let ours = read(&dir.join("hip.json"))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "established");
    let sa = dir.join("cutehip-sa.jsonl");
    let cutehip_sas = (if sa.exists() {
        read(&sa)
    } else {
        String::new()
    })
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let kij = dir.join("cutehip-kij.txt");
    let cutehip_kij = kij
        .exists()
        .then(|| hex::decode(read(&kij).trim()).unwrap());
    Vector {
        tag,
        run,
        packets,
        ours,
        cutehip_sas,
        cutehip_kij,
    }
}

const VECTORS: [&str; 9] = [
    "patched-hip-initiates-ecdsa-p256-p256",
    "patched-cutehip-initiates-ecdsa-p256-p256",
    "patched-hip-initiates-rsa-modp3072",
    "patched-cutehip-initiates-rsa-modp3072",
    "patched-hip-initiates-ecdsa-p384-p384",
    "patched-cutehip-initiates-ecdsa-p384-p384",
    "unpatched-hip-initiates-ecdsa-p256-p256",
    "unpatched-cutehip-initiates-ecdsa-p256-p256",
    "unpatched-cutehip-initiates-ecdsa-p256-p256-puzzle8",
];

impl Vector {
    fn s(&self, k: &str) -> &str {
        self.run[k].as_str().unwrap()
    }
    fn hip_initiates(&self) -> bool {
        self.run["hip_initiates"].as_bool().unwrap()
    }
    fn hip_loc(&self) -> IpAddr {
        self.s("hip_locator").parse().unwrap()
    }
    fn cutehip_loc(&self) -> IpAddr {
        self.s("cutehip_locator").parse().unwrap()
    }
    fn identity(&self, key: &str) -> HostIdentity {
        HostIdentity::from_pkcs8_pem(&read(&data().join("keys").join(self.s(key)))).unwrap()
    }
    fn hip_hit(&self) -> Hit {
        self.s("hip_hit").parse().unwrap()
    }
    fn cutehip_hit(&self) -> Hit {
        self.s("cutehip_hit").parse().unwrap()
    }
    fn sent_by_hip(&self, p: &Pkt) -> bool {
        p.src == self.hip_loc()
    }
    /// The first recorded packet of type `ty`.
    fn first(&self, ty: &str) -> &Pkt {
        self.packets
            .iter()
            .find(|p| p.ty == ty)
            .unwrap_or_else(|| panic!("{}: no {ty}", self.tag))
    }

    /// Our endpoint as `hip-agent hip connect|listen` built it for this run (see
    /// `hip-agent/src/cmd_hip.rs`): default configuration, the run's DH group and
    /// options, the run's key, SPIs from 0x10000000, and the seeded RNG.
    fn endpoint(&self) -> Endpoint {
        let mut config = Config {
            dh_groups: vec![DhGroup::from_name(self.s("dh")).unwrap()],
            ..Config::default()
        };
        match self.s("variant") {
            "Default" => {}
            "Puzzle8" => config.puzzle_difficulty = 8,
            v => panic!("variant {v} not replayed here"),
        }
        let seed: u64 = self.s("insecure_rng_seed").parse().unwrap();
        let rng: BoxRng = Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(seed));
        Endpoint::new(config, self.identity("hip_key"), rng, Instant::now()).unwrap()
    }
}

fn sha(k: &[u8]) -> String {
    hex::encode(&Sha256::digest(k)[..8])
}

/// The signed image of a HIP_SIGNATURE_2 (RFC 7401 §5.2.15): receiver HIT, #I and
/// Opaque zeroed, header length ending before the signature, checksum zeroed.
fn sig2_image(p: &Packet, sig_off: usize) -> Vec<u8> {
    let mut v = p.covered_prefix(sig_off);
    v[24..40].fill(0);
    let pz = p.find(ty::PUZZLE).unwrap();
    v[pz.offset + 6..pz.offset + 4 + pz.contents.len()].fill(0);
    v
}

fn signature(p: &Packet, t: u16) -> (usize, Vec<u8>) {
    let r = p.find(t).unwrap();
    let sig = match r.parse().unwrap() {
        Param::Signature { signature, .. } | Param::Signature2 { signature, .. } => signature,
        _ => unreachable!(),
    };
    (r.offset, sig)
}

fn host_id(p: &Packet) -> HostId {
    match p.required(ty::HOST_ID).unwrap() {
        Param::HostId { algorithm, hi, .. } => HostId::from_hi_bytes(algorithm, &hi).unwrap(),
        _ => unreachable!(),
    }
}

#[test]
fn every_recorded_packet_parses_checksums_and_verifies() {
    for tag in VECTORS {
        let v = load(tag);
        assert!(!v.packets.is_empty(), "{tag}");
        let mut responder_hi = None;
        for (n, k) in v.packets.iter().enumerate() {
            let what = format!("{tag} #{n} {} from {}", k.ty, k.src);
            assert!(
                wire::verify_checksum(&k.bytes, k.src, k.dst),
                "{what}: checksum"
            );
            let p = Packet::parse(&k.bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            for r in &p.params {
                r.parse().unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            match k.ty.as_str() {
                "R1" => {
                    let hi = host_id(&p);
                    assert_eq!(hi.hit(), p.header.sender, "{what}: HI ↔ HIT");
                    let (off, sig) = signature(&p, ty::HIP_SIGNATURE_2);
                    hi.verify(&sig2_image(&p, off), &sig)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    // ECDH public values are x ‖ y (RFC 5903 §7), whoever sent them.
                    if let Param::DiffieHellman { group, public } =
                        p.required(ty::DIFFIE_HELLMAN).unwrap()
                    {
                        let want = match group {
                            7 => 64,
                            8 => 96,
                            _ => 384,
                        };
                        assert_eq!(public.len(), want, "{what}: DH value of group {group}");
                    }
                    responder_hi = Some(hi);
                }
                "I2" if p.find(ty::HOST_ID).is_some() => {
                    let hi = host_id(&p);
                    assert_eq!(hi.hit(), p.header.sender, "{what}");
                    let (off, sig) = signature(&p, ty::HIP_SIGNATURE);
                    hi.verify(&p.covered_prefix(off), &sig)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                }
                "R2" => {
                    let hi = responder_hi.as_ref().expect("R1 before R2");
                    let (off, sig) = signature(&p, ty::HIP_SIGNATURE);
                    hi.verify(&p.covered_prefix(off), &sig)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                }
                _ => {}
            }
        }
    }
}

/// Compares a packet we emit again with the recorded one: byte for byte, except an RSA
/// signature (RSASSA-PSS draws its salt from aws-lc's own RNG, not the seeded one) and
/// therefore the checksum.
fn assert_same(v: &Vector, ours: &[u8], recorded: &Pkt) {
    let what = format!("{}: our {}", v.tag, recorded.ty);
    if v.s("hi") != "rsa" {
        assert_eq!(hex::encode(ours), hex::encode(&recorded.bytes), "{what}");
        return;
    }
    let (a, b) = (
        Packet::parse(ours).unwrap(),
        Packet::parse(&recorded.bytes).unwrap(),
    );
    assert_eq!(a.header.sender, b.header.sender, "{what}");
    assert_eq!(a.header.receiver, b.header.receiver, "{what}");
    assert_eq!(a.params.len(), b.params.len(), "{what}");
    for (x, y) in a.params.iter().zip(&b.params) {
        assert_eq!(x.ty, y.ty, "{what}");
        if ![ty::HIP_SIGNATURE, ty::HIP_SIGNATURE_2].contains(&x.ty) {
            assert_eq!(x.contents, y.contents, "{what}: parameter {}", x.ty);
        }
    }
}

fn established(ep: &mut Endpoint) -> Option<Box<Established>> {
    let mut found = None;
    while let Some(e) = ep.poll_event() {
        if let Event::Established(x) = e {
            assert!(found.is_none(), "one Established");
            found = Some(x);
        }
    }
    found
}

/// The established association agrees with what both sides logged during the run.
fn check_keys(v: &Vector, e: &Established) {
    let ours = v.ours.as_ref().expect("hip established in this run");
    for (field, got) in [
        ("spi_inbound", e.spi_inbound.to_string()),
        ("spi_outbound", e.spi_outbound.to_string()),
        ("key_inbound_enc_sha256", sha(&e.keys_inbound.enc)),
        ("key_inbound_auth_sha256", sha(&e.keys_inbound.auth)),
        ("key_outbound_enc_sha256", sha(&e.keys_outbound.enc)),
        ("key_outbound_auth_sha256", sha(&e.keys_outbound.auth)),
    ] {
        assert_eq!(
            ours[field].to_string().trim_matches('"'),
            got,
            "{}: {field}",
            v.tag
        );
    }
    // cutehip's outbound SA is keyed by HITs, its inbound one by (our IP, its IP).
    let out = v
        .cutehip_sas
        .iter()
        .find(|s| s["source"].as_str().unwrap().contains(':'))
        .unwrap();
    let inb = v
        .cutehip_sas
        .iter()
        .find(|s| s["source"].as_str().unwrap() == v.s("hip_locator"))
        .unwrap();
    assert_eq!(out["spi"], e.spi_inbound, "{}", v.tag);
    assert_eq!(out["enc_sha256"], sha(&e.keys_inbound.enc), "{}", v.tag);
    assert_eq!(out["auth_sha256"], sha(&e.keys_inbound.auth), "{}", v.tag);
    assert_eq!(inb["spi"], e.spi_outbound, "{}", v.tag);
    assert_eq!(inb["enc_sha256"], sha(&e.keys_outbound.enc), "{}", v.tag);
    assert_eq!(inb["auth_sha256"], sha(&e.keys_outbound.auth), "{}", v.tag);
}

/// KEYMAT from the recorded packets and cutehip's own DH secret (HIP-KDF, RFC 7401
/// §6.5: salt #I ‖ #J from R1 and I2) equals the KEYMAT our endpoint derived from its
/// DH secret — both ends computed the same Kij — and its first octets are as recorded
/// in `keymat.txt`.
fn check_keymat(v: &Vector, e: &Established) {
    let kij = v.cutehip_kij.as_ref().expect("cutehip-kij.txt");
    let r1 = Packet::parse(&v.first("R1").bytes).unwrap();
    let i2 = Packet::parse(&v.first("I2").bytes).unwrap();
    let Param::Solution {
        random_i,
        solution_j,
        ..
    } = i2.required(ty::SOLUTION).unwrap()
    else {
        unreachable!()
    };
    let rhash = Rhash::for_suite(host_id(&r1).hit_suite()).unwrap();
    let (hit_i, hit_r) = (i2.header.sender, i2.header.receiver);
    let k = Keymat::derive(rhash, &random_i, &solution_j, kij, hit_i, hit_r);
    let n = 2 * e.keymat_index;
    assert_eq!(
        k.draw(0, n).unwrap(),
        e.keymat.draw(0, n).unwrap(),
        "{}: KEYMAT",
        v.tag
    );
    let want = read(&data().join(v.tag).join("keymat.txt"));
    assert_eq!(hex::encode(&e.keymat.draw(0, 64).unwrap()[..]), want.trim());
}

fn deliver(ep: &mut Endpoint, p: &Pkt) -> Result<(), ProtocolError> {
    ep.handle_packet(Instant::now(), p.src, p.dst, &p.bytes)
}

fn one(ep: &mut Endpoint) -> Vec<u8> {
    let t = ep.poll_transmit().expect("a packet");
    assert!(ep.poll_transmit().is_none(), "one packet");
    t.payload
}

/// We initiate: our I1 and I2 come out as recorded; cutehip's R1 and R2 are accepted.
fn replay_hip_initiates(tag: &'static str) -> (Vector, Box<Established>) {
    let v = load(tag);
    assert!(v.hip_initiates());
    let mut ep = v.endpoint();
    ep.initiate(
        Instant::now(),
        v.hip_loc(),
        v.cutehip_loc(),
        Some(v.cutehip_hit()),
    )
    .unwrap();
    assert_same(&v, &one(&mut ep), v.first("I1"));
    deliver(&mut ep, v.first("R1")).unwrap();
    assert_same(&v, &one(&mut ep), v.first("I2"));
    let mut got = None;
    for r2 in v.packets.iter().filter(|p| p.ty == "R2") {
        let r = deliver(&mut ep, r2);
        match got {
            None => {
                r.unwrap();
                got = Some(established(&mut ep).expect("Established on R2"));
            }
            // cutehip answers a retransmitted I2 again: the second R2 changes nothing.
            Some(_) => assert!(r.is_err() && established(&mut ep).is_none()),
        }
    }
    assert_eq!(ep.state(&v.cutehip_hit()), Some(State::Established));
    let e = got.unwrap();
    assert!(e.initiator);
    (v, e)
}

/// cutehip initiates: our R1 and R2 come out as recorded; its I1 and I2 are accepted.
fn replay_cutehip_initiates(tag: &'static str) -> (Vector, Box<Established>) {
    let v = load(tag);
    assert!(!v.hip_initiates());
    let mut ep = v.endpoint();
    deliver(&mut ep, v.first("I1")).unwrap();
    assert_same(&v, &one(&mut ep), v.first("R1"));
    deliver(&mut ep, v.first("I2")).unwrap();
    assert_same(&v, &one(&mut ep), v.first("R2"));
    let e = established(&mut ep).expect("Established on I2");
    assert!(!e.initiator);
    assert_eq!(e.peer_hit, v.cutehip_hit());
    (v, e)
}

#[test]
fn hip_initiates_ecdsa_p256_with_p256() {
    let (v, e) = replay_hip_initiates("patched-hip-initiates-ecdsa-p256-p256");
    check_keys(&v, &e);
    check_keymat(&v, &e);
}

#[test]
fn cutehip_initiates_ecdsa_p256_with_p256() {
    let (v, e) = replay_cutehip_initiates("patched-cutehip-initiates-ecdsa-p256-p256");
    check_keys(&v, &e);
    check_keymat(&v, &e);
}

#[test]
fn hip_initiates_rsa_with_modp3072() {
    let (v, e) = replay_hip_initiates("patched-hip-initiates-rsa-modp3072");
    check_keys(&v, &e);
    check_keymat(&v, &e);
}

#[test]
fn cutehip_initiates_rsa_with_modp3072() {
    let (v, e) = replay_cutehip_initiates("patched-cutehip-initiates-rsa-modp3072");
    check_keys(&v, &e);
    check_keymat(&v, &e);
}

#[test]
fn hip_initiates_ecdsa_p384_with_p384() {
    let (v, e) = replay_hip_initiates("patched-hip-initiates-ecdsa-p384-p384");
    check_keys(&v, &e);
    check_keymat(&v, &e);
}

#[test]
fn cutehip_initiates_ecdsa_p384_with_p384() {
    let (v, e) = replay_cutehip_initiates("patched-cutehip-initiates-ecdsa-p384-p384");
    check_keys(&v, &e);
    check_keymat(&v, &e);
}

/// Unpatched cutehip as Initiator MACs its I2 with the Responder's key (our outgoing
/// HIP-gl/lg integrity key): refused, and nothing changes.
#[test]
fn unpatched_cutehip_i2_mac_of_the_other_direction_is_refused() {
    let v = load("unpatched-cutehip-initiates-ecdsa-p256-p256");
    let mut ep = v.endpoint();
    deliver(&mut ep, v.first("I1")).unwrap();
    assert_same(&v, &one(&mut ep), v.first("R1"));
    for i2 in v.packets.iter().filter(|p| p.ty == "I2") {
        assert_eq!(deliver(&mut ep, i2), Err(ProtocolError::HmacWrongDirection));
    }
    assert!(ep.poll_transmit().is_none() && established(&mut ep).is_none());
    assert_eq!(ep.state(&v.cutehip_hit()), None);
}

/// Unpatched cutehip solves our K = 8 puzzle as RHASH(I | HIT-R | HIT-I | J): the
/// recorded #J does solve that, not the RFC's RHASH(I | HIT-I | HIT-R | J), and we
/// refuse it.
#[test]
fn unpatched_cutehip_reversed_puzzle_solution_is_refused() {
    let v = load("unpatched-cutehip-initiates-ecdsa-p256-p256-puzzle8");
    let mut ep = v.endpoint();
    deliver(&mut ep, v.first("I1")).unwrap();
    assert_same(&v, &one(&mut ep), v.first("R1"));
    let i2 = v.first("I2");
    let p = Packet::parse(&i2.bytes).unwrap();
    let Param::Solution {
        k,
        random_i,
        solution_j,
        ..
    } = p.required(ty::SOLUTION).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(k, 8);
    let (hi, hr) = (v.cutehip_hit(), v.hip_hit());
    assert!(puzzle::verify(
        Rhash::Sha384,
        &random_i,
        hr,
        hi,
        &solution_j,
        k
    ));
    assert!(!puzzle::verify(
        Rhash::Sha384,
        &random_i,
        hi,
        hr,
        &solution_j,
        k
    ));
    assert_eq!(deliver(&mut ep, i2), Err(ProtocolError::BadSolution));
    assert!(ep.poll_transmit().is_none() && established(&mut ep).is_none());
    assert_eq!(ep.state(&hi), None);
}

/// Against unpatched cutehip's R1 (K = 16, x ‖ y ECDH value) our I2 comes out as
/// recorded, with a #J for the RFC's hash order only — cutehip then refused it, checking
/// the reversed order; we never adapt to that.
#[test]
fn unpatched_cutehip_r1_gets_an_rfc_order_solution() {
    let v = load("unpatched-hip-initiates-ecdsa-p256-p256");
    let mut ep = v.endpoint();
    ep.initiate(
        Instant::now(),
        v.hip_loc(),
        v.cutehip_loc(),
        Some(v.cutehip_hit()),
    )
    .unwrap();
    assert_same(&v, &one(&mut ep), v.first("I1"));
    deliver(&mut ep, v.first("R1")).unwrap();
    let i2 = one(&mut ep);
    assert_same(&v, &i2, v.first("I2"));
    let p = Packet::parse(&i2).unwrap();
    let Param::Solution {
        k,
        random_i,
        solution_j,
        ..
    } = p.required(ty::SOLUTION).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(k, 16);
    let (hi, hr) = (v.hip_hit(), v.cutehip_hit());
    assert!(puzzle::verify(
        Rhash::Sha384,
        &random_i,
        hi,
        hr,
        &solution_j,
        k
    ));
    assert!(!puzzle::verify(
        Rhash::Sha384,
        &random_i,
        hr,
        hi,
        &solution_j,
        k
    ));
    // cutehip never answered: no R2 was recorded, we stay in I2-SENT.
    assert!(v.packets.iter().all(|p| p.ty != "R2"));
    assert_eq!(ep.state(&hr), Some(State::I2Sent));
    assert!(
        v.packets
            .iter()
            .all(|p| v.sent_by_hip(p) == (p.ty == "I1" || p.ty == "I2"))
    );
}
