//! R1 precomputation (RFC 7401 §4.1.4 and §5.3.2): the responder keeps no state per I1.
//!
//! Each generation holds, per DH group, signed R1 templates whose HIP_SIGNATURE_2 was
//! computed with the receiver HIT and the puzzle's #I and Opaque fields zeroed, so an I1
//! is answered by copying a template, filling those fields and the checksum. #I is not
//! random but `HMAC-RHASH(generation secret, HIT-I | HIT-R | Opaque)`, so an I2 can be
//! checked against the puzzle it answers without remembering it; Opaque names the
//! template (DH group, slot). As in RFC 7401 Appendix A, the two IP addresses are hashed
//! in too, so a puzzle solved for one address pair is worthless from another.
//! The previous generation stays valid for I2s, and the solutions
//! (HIT-I, #I, #J) already used are remembered per generation to refuse replayed I2s.

use std::{
    collections::HashSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use rand_core::CryptoRng;

use super::{Config, ProtocolError, Transmit, UdpPorts};
use crate::{
    crypto::{DhGroup, DhSecret, Rhash},
    hit::Hit,
    identity::HostIdentity,
    wire::{self, PacketBuilder, PacketType, Param},
};

#[derive(Clone)]
pub(super) struct Slot {
    pub dh: DhSecret,
    template: Vec<u8>,
    puzzle_off: usize,
}

#[derive(Clone)]
pub(super) struct Generation {
    pub counter: u64,
    secret: [u8; 32],
    slots: Vec<(DhGroup, Vec<Slot>)>,
    created: Instant,
    used: HashSet<(Hit, Vec<u8>)>,
}

#[derive(Clone)]
pub(super) struct R1Pool {
    cur: Generation,
    prev: Option<Generation>,
    rr: usize,
    pub rhash: Rhash,
}

impl Generation {
    fn build(
        counter: u64,
        config: &Config,
        id: &HostIdentity,
        hi_param: &Param,
        rhash: Rhash,
        rng: &mut (impl CryptoRng + ?Sized),
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let mut slots = Vec::new();
        for &g in &config.dh_groups {
            let mut v = Vec::new();
            for _ in 0..config.r1_pool_size {
                let dh = DhSecret::generate(g, rng);
                let mut b = PacketBuilder::new(PacketType::R1, 0, id.hit(), Hit::ZERO);
                if config.send_r1_counter {
                    b.push(&Param::R1Counter(counter))?;
                }
                let puzzle_off = b.covered().len();
                b.push(&Param::Puzzle {
                    k: config.puzzle_difficulty,
                    lifetime: config.puzzle_lifetime,
                    opaque: [0, 0],
                    random_i: vec![0; rhash.len()],
                })?;
                b.push(&Param::DhGroupList(
                    config.dh_groups.iter().map(|g| g.id()).collect(),
                ))?;
                b.push(&Param::DiffieHellman {
                    group: g.id(),
                    public: dh.public_value(),
                })?;
                b.push(&Param::HipCipher(
                    config.hip_ciphers.iter().map(|c| c.id()).collect(),
                ))?;
                b.push(hi_param)?;
                b.push(&Param::HitSuiteList(
                    config.hit_suites.iter().map(|s| s.list_octet()).collect(),
                ))?;
                b.push(&Param::TransportFormatList(vec![wire::ty::ESP_TRANSFORM]))?;
                b.push(&Param::EspTransform(
                    config.esp_suites.iter().map(|s| s.id()).collect(),
                ))?;
                // RFC 7401 §5.2.15: receiver HIT, checksum, #I and Opaque are zero in
                // the signed image; the header length excludes HIP_SIGNATURE_2.
                let sig = id.sign(b.covered())?;
                b.push(&Param::Signature2 {
                    algorithm: id.host_id().algorithm() as u16,
                    signature: sig,
                })?;
                v.push(Slot {
                    dh,
                    template: b.finish(),
                    puzzle_off,
                });
            }
            slots.push((g, v));
        }
        Ok(Generation {
            counter,
            secret,
            slots,
            created: now,
            used: HashSet::new(),
        })
    }

    fn puzzle_i(
        &self,
        rhash: Rhash,
        hit_i: Hit,
        hit_r: Hit,
        ip_i: IpAddr,
        ip_r: IpAddr,
        opaque: [u8; 2],
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(66);
        m.extend_from_slice(&hit_i.0);
        m.extend_from_slice(&hit_r.0);
        for ip in [ip_i, ip_r] {
            match ip {
                IpAddr::V4(a) => m.extend_from_slice(&a.to_ipv6_mapped().octets()),
                IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
            }
        }
        m.extend_from_slice(&opaque);
        rhash.hmac(&self.secret, &m)
    }

    fn slot(&self, opaque: [u8; 2]) -> Option<&Slot> {
        let g = DhGroup::from_id(opaque[0])?;
        self.slots
            .iter()
            .find(|(gg, _)| *gg == g)
            .and_then(|(_, v)| v.get(opaque[1] as usize))
    }
}

/// What an I2's SOLUTION resolved to.
pub(super) struct Issued<'a> {
    pub generation: u64,
    pub slot: &'a Slot,
}

impl R1Pool {
    pub fn new(
        config: &Config,
        id: &HostIdentity,
        hi_param: &Param,
        rng: &mut (impl CryptoRng + ?Sized),
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        let rhash = Rhash::for_suite(id.host_id().hit_suite())?;
        Ok(Self {
            cur: Generation::build(1, config, id, hi_param, rhash, rng, now)?,
            prev: None,
            rr: 0,
            rhash,
        })
    }

    pub fn next_rotation(&self, config: &Config) -> Instant {
        self.cur.created + config.r1_generation_lifetime.max(Duration::from_secs(1))
    }

    pub fn rotate(
        &mut self,
        config: &Config,
        id: &HostIdentity,
        hi_param: &Param,
        rng: &mut (impl CryptoRng + ?Sized),
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let next = Generation::build(
            self.cur.counter + 1,
            config,
            id,
            hi_param,
            self.rhash,
            rng,
            now,
        )?;
        self.prev = Some(std::mem::replace(&mut self.cur, next));
        Ok(())
    }

    /// The current R1 generation counter.
    pub fn counter(&self) -> u64 {
        self.cur.counter
    }

    /// Answers an I1 from `hit_i` (at `peer`, received on `local`, over `udp` when it
    /// came over UDP) with a filled-in R1 for `group`.
    pub fn respond(
        &mut self,
        group: DhGroup,
        hit_i: Hit,
        local: IpAddr,
        peer: IpAddr,
        udp: Option<UdpPorts>,
    ) -> Option<Transmit> {
        let rhash = self.rhash;
        let (_, slots) = self.cur.slots.iter().find(|(g, _)| *g == group)?;
        self.rr = self.rr.wrapping_add(1);
        let idx = self.rr % slots.len();
        let slot = &slots[idx];
        let opaque = [group.id(), idx as u8];
        let hit_r = Hit(slot.template[8..24].try_into().ok()?);
        let i = self.cur.puzzle_i(rhash, hit_i, hit_r, peer, local, opaque);
        let mut p = slot.template.clone();
        p[24..40].copy_from_slice(&hit_i.0);
        let o = slot.puzzle_off;
        p[o + 6..o + 8].copy_from_slice(&opaque);
        p[o + 8..o + 8 + i.len()].copy_from_slice(&i);
        Some(Transmit::framed(local, peer, udp, p))
    }

    /// Finds the template an I2's puzzle answers: #I must be the one we would have issued
    /// for these HITs, addresses and Opaque, in the current or the previous generation.
    pub fn lookup(
        &self,
        (hit_i, hit_r): (Hit, Hit),
        (ip_i, ip_r): (IpAddr, IpAddr),
        opaque: [u8; 2],
        i: &[u8],
    ) -> Option<Issued<'_>> {
        for g in std::iter::once(&self.cur).chain(self.prev.iter()) {
            let expect = g.puzzle_i(self.rhash, hit_i, hit_r, ip_i, ip_r, opaque);
            if constant_time_eq(&expect, i) {
                return g.slot(opaque).map(|slot| Issued {
                    generation: g.counter,
                    slot,
                });
            }
        }
        None
    }

    /// Whether the solution `ij` (#I ‖ #J) from `hit_i` in generation `generation` was
    /// already used by an accepted I2. #I alone repeats when the same initiator starts
    /// again within a generation; #J is drawn afresh by each solver run.
    pub fn was_used(&self, generation: u64, hit_i: Hit, ij: &[u8]) -> bool {
        std::iter::once(&self.cur)
            .chain(self.prev.iter())
            .find(|g| g.counter == generation)
            .is_some_and(|g| g.used.contains(&(hit_i, ij.to_vec())))
    }

    /// Records a solution as used.
    pub fn mark_used(&mut self, generation: u64, hit_i: Hit, ij: &[u8]) {
        if self.cur.counter == generation {
            self.cur.used.insert((hit_i, ij.to_vec()));
        } else if let Some(p) = self.prev.as_mut().filter(|p| p.counter == generation) {
            p.used.insert((hit_i, ij.to_vec()));
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
