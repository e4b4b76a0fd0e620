//! One association and the packet handlers of the state machine (RFC 7401 §4.4.4 and
//! the processing rules of §6.6-6.15).

use std::{
    collections::VecDeque,
    net::IpAddr,
    time::{Duration, Instant},
};

use zeroize::Zeroizing;

use super::{Config, Endpoint, Established, Event, ProtocolError, Secret, Transmit, UdpPorts};
use crate::{
    crypto::{CryptoError, DhGroup, DhSecret, HipCipher, Keymat, Rhash, puzzle},
    esp::{EspSuite, draw_esp_keys},
    hit::Hit,
    identity::{HostId, HostIdentity},
    wire::{self, Packet, PacketBuilder, PacketType, Param, RawParam, notify, ty},
};

/// Parameter types this implementation understands (critical ones outside this list fail
/// the packet, RFC 7401 §5.2.1).
pub(super) const KNOWN_PARAMS: &[u16] = &[
    ty::ESP_INFO,
    ty::R1_COUNTER,
    ty::LOCATOR_SET,
    ty::PUZZLE,
    ty::SOLUTION,
    ty::SEQ,
    ty::ACK,
    ty::DH_GROUP_LIST,
    ty::DIFFIE_HELLMAN,
    ty::HIP_CIPHER,
    ty::ENCRYPTED,
    ty::HOST_ID,
    ty::HIT_SUITE_LIST,
    ty::NOTIFICATION,
    ty::ECHO_REQUEST_SIGNED,
    ty::ECHO_RESPONSE_SIGNED,
    ty::TRANSPORT_FORMAT_LIST,
    ty::ESP_TRANSFORM,
    ty::HMAC,
    ty::HMAC_2,
    ty::HIP_SIGNATURE_2,
    ty::HIP_SIGNATURE,
    ty::ECHO_RESPONSE_UNSIGNED,
    ty::ECHO_REQUEST_UNSIGNED,
];

/// Association states (RFC 7401 §4.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// No state (never stored: an absent association).
    Unassociated,
    /// I1 sent, waiting for R1.
    I1Sent,
    /// I2 sent, waiting for R2.
    I2Sent,
    /// R2 sent, waiting for the first authenticated packet or a timeout.
    R2Sent,
    /// The association is up.
    Established,
    /// CLOSE sent, waiting for CLOSE_ACK.
    Closing,
    /// Closed, lingering to answer retransmitted CLOSEs.
    Closed,
    /// The exchange failed, lingering before the state is forgotten.
    EFailed,
}

pub(super) struct SessionKeys {
    pub keymat: Keymat,
    pub rhash: Rhash,
    pub cipher: HipCipher,
    pub esp: EspSuite,
    pub dh_group: DhGroup,
    pub enc_out: Secret,
    pub enc_in: Secret,
    pub hmac_out: Secret,
    pub hmac_in: Secret,
    pub esp_index: usize,
    /// Puzzle #I and #J of the base exchange: the HIP-KDF salt, kept for KEYMATs made
    /// from a new DH exchange in UPDATE (RFC 7401 §6.5: "Both hosts have to store #I and
    /// #J values for the HIP association for future use").
    pub salt_i: Vec<u8>,
    pub salt_j: Vec<u8>,
}

impl SessionKeys {
    /// Lays out the HIP keys at the start of KEYMAT (RFC 7401 §6.5): HIP-gl encryption,
    /// HIP-gl integrity, HIP-lg encryption, HIP-lg integrity; gl keys protect what the host
    /// with the greater HIT (HOST_g) sends, its ENCRYPTED parameter included. ESP keys
    /// follow (RFC 7402 §7).
    #[allow(clippy::too_many_arguments)]
    fn new(
        keymat: Keymat,
        (cipher, esp, dh_group): (HipCipher, EspSuite, DhGroup),
        (salt_i, salt_j): (&[u8], &[u8]),
        local: Hit,
        peer: Hit,
    ) -> Result<Self, CryptoError> {
        let rhash = keymat.rhash();
        let (e, i) = (cipher.key_len(), rhash.len());
        let k = keymat.draw(0, 2 * (e + i))?;
        let enc_gl = Zeroizing::new(k[..e].to_vec());
        let int_gl = Zeroizing::new(k[e..e + i].to_vec());
        let enc_lg = Zeroizing::new(k[e + i..2 * e + i].to_vec());
        let int_lg = Zeroizing::new(k[2 * e + i..].to_vec());
        let (enc_out, enc_in, hmac_out, hmac_in) = if local > peer {
            (enc_gl, enc_lg, int_gl, int_lg)
        } else {
            (enc_lg, enc_gl, int_lg, int_gl)
        };
        Ok(Self {
            keymat,
            rhash,
            cipher,
            esp,
            dh_group,
            enc_out,
            enc_in,
            hmac_out,
            hmac_in,
            esp_index: 2 * (e + i),
            salt_i: salt_i.to_vec(),
            salt_j: salt_j.to_vec(),
        })
    }
}

pub(super) struct Assoc {
    pub state: State,
    pub local_hit: Hit,
    pub peer_hit: Hit,
    /// HITs the responder must prove (any of them); empty: none expected.
    pub expected: Vec<Hit>,
    pub local_loc: IpAddr,
    pub peer_loc: IpAddr,
    /// `Some` when this association's packets (and ESP) run over UDP.
    pub udp: Option<UdpPorts>,
    pub initiator: bool,
    pub i1_groups: Vec<u8>,
    pub peer_hi: Option<HostId>,
    pub keys: Option<SessionKeys>,
    pub spi_in: Option<u32>,
    pub spi_out: Option<u32>,
    /// Responder: the generation and #I ‖ #J of the I2 that created this state.
    pub solution: Option<(u64, Vec<u8>)>,
    pub last: Option<Transmit>,
    pub retries: u32,
    pub rto: Duration,
    pub timer: Option<Instant>,
    pub close_nonce: Vec<u8>,
    /// Initiator: the Responder's HOST_ID parameter as received in R1 (for HIP_MAC_2).
    pub peer_host_id_tlv: Vec<u8>,
    /// UPDATE state (RFC 7401 §6.11).
    pub upd: super::update::UpdateState,
    /// Over UDP: when the next NAT keepalive is due ([`Config::udp_keepalive`]).
    pub keepalive: Option<Instant>,
    /// Over UDP: when the peer's last verified keepalive arrived.
    pub keepalive_seen: Option<Instant>,
}

impl Assoc {
    pub fn new_initiator(
        config: &Config,
        local_hit: Hit,
        expected: Option<Hit>,
        local_loc: IpAddr,
        peer_loc: IpAddr,
        udp: Option<UdpPorts>,
    ) -> Self {
        Assoc {
            state: State::I1Sent,
            local_hit,
            peer_hit: expected.unwrap_or(Hit::ZERO),
            expected: expected.into_iter().collect(),
            local_loc,
            peer_loc,
            udp,
            initiator: true,
            i1_groups: config.dh_groups.iter().map(|g| g.id()).collect(),
            peer_hi: None,
            keys: None,
            spi_in: None,
            spi_out: None,
            solution: None,
            last: None,
            retries: 0,
            rto: config.rto_initial,
            timer: None,
            close_nonce: Vec::new(),
            peer_host_id_tlv: Vec::new(),
            upd: Default::default(),
            keepalive: None,
            keepalive_seen: None,
        }
    }

    pub(super) fn transmit(&self, payload: Vec<u8>) -> Transmit {
        Transmit::framed(self.local_loc, self.peer_loc, self.udp, payload)
    }

    pub fn build_i1(&self, _config: &Config) -> Transmit {
        let mut b = PacketBuilder::new(PacketType::I1, 0, self.local_hit, self.peer_hit);
        b.push(&Param::DhGroupList(self.i1_groups.clone()))
            .expect("one parameter fits");
        self.transmit(b.finish())
    }

    /// Sends `t` and arms the retransmission timer.
    pub fn send_reliably(
        &mut self,
        now: Instant,
        config: &Config,
        t: Transmit,
        out: &mut VecDeque<Transmit>,
    ) {
        self.retries = 0;
        self.rto = config.rto_initial;
        self.timer = Some(now + self.rto);
        self.last = Some(t.clone());
        out.push_back(t);
    }

    /// Appends HIP_MAC (when keys exist) and HIP_SIGNATURE, and checksums.
    pub(super) fn finish_authenticated(
        &self,
        mut b: PacketBuilder,
        id: &HostIdentity,
    ) -> Result<Transmit, ProtocolError> {
        if let Some(k) = &self.keys {
            let tag = k.rhash.hmac(&k.hmac_out, b.covered());
            b.push(&Param::Hmac(tag))?;
        }
        push_signature(&mut b, id)?;
        Ok(self.transmit(b.finish()))
    }

    pub fn build_close(
        &mut self,
        id: &HostIdentity,
        rng: &mut (dyn rand_core::CryptoRng + Send),
    ) -> Result<Transmit, ProtocolError> {
        let mut nonce = vec![0u8; 16];
        rng.fill_bytes(&mut nonce);
        self.close_nonce = nonce.clone();
        let mut b = PacketBuilder::new(PacketType::Close, 0, self.local_hit, self.peer_hit);
        b.push(&Param::EchoRequestSigned(nonce))?;
        self.finish_authenticated(b, id)
    }

    /// Verifies the HIP_MAC and HIP_SIGNATURE of an authenticated packet.
    pub(super) fn verify_authenticated(&self, pkt: &Packet) -> Result<(), ProtocolError> {
        let (Some(k), Some(hi)) = (&self.keys, &self.peer_hi) else {
            return Err(ProtocolError::Unexpected {
                packet_type: pkt.header.packet_type,
                state: self.state,
            });
        };
        verify_hmac(pkt, ty::HMAC, k)?;
        verify_signature(pkt, ty::HIP_SIGNATURE, hi)
    }

    /// Timer expiry. Returns true when the association must be forgotten.
    pub fn on_timer(
        &mut self,
        now: Instant,
        config: &Config,
        out: &mut VecDeque<Transmit>,
        events: &mut VecDeque<Event>,
        release: &mut Vec<u32>,
    ) -> bool {
        match self.state {
            State::I1Sent | State::I2Sent | State::Closing => {
                let max = match self.state {
                    State::I1Sent => config.i1_retries,
                    State::I2Sent => config.i2_retries,
                    _ => config.close_retries,
                };
                if self.retries < max {
                    self.retries += 1;
                    self.rto = (self.rto * 2).min(config.rto_max);
                    self.timer = Some(now + self.rto);
                    if let Some(t) = &self.last {
                        out.push_back(t.clone());
                    }
                } else if self.state == State::Closing {
                    self.state = State::Closed;
                    self.timer = Some(now + config.linger);
                    self.last = None;
                    events.push_back(Event::Closed {
                        peer_hit: self.peer_hit,
                        by_peer: false,
                    });
                } else {
                    let ty = if self.state == State::I1Sent {
                        PacketType::I1
                    } else {
                        PacketType::I2
                    };
                    self.state = State::EFailed;
                    self.timer = Some(now + config.linger);
                    self.last = None;
                    events.push_back(Event::Failed {
                        peer_hit: (!self.peer_hit.is_zero()).then_some(self.peer_hit),
                        peer_locator: self.peer_loc,
                        error: ProtocolError::Timeout(ty),
                    });
                }
                false
            }
            State::R2Sent => {
                // RFC 7401 §4.4.4: R2-SENT moves to ESTABLISHED when its timer expires.
                self.state = State::Established;
                self.timer = None;
                false
            }
            State::Closed | State::EFailed | State::Unassociated => true,
            State::Established => {
                self.on_update_timer(now, config, out, events, release);
                false
            }
        }
    }
}

fn raw<'p, 'a>(pkt: &'p Packet<'a>, t: u16) -> Result<&'p RawParam<'a>, ProtocolError> {
    pkt.find(t)
        .ok_or(ProtocolError::Wire(wire::WireError::Missing(
            wire::param_name(t),
        )))
}

fn verify_hmac(pkt: &Packet, t: u16, k: &SessionKeys) -> Result<(), ProtocolError> {
    let p = raw(pkt, t)?;
    let covered = pkt.covered_prefix(p.offset);
    check_mac(k, &covered, p.contents)
}

/// Checks a HIP_MAC / HIP_MAC_2 with the peer's integrity key (`hmac_in`), and only that
/// key. On failure, one more HMAC tells whether the peer used *our* key, the key of the
/// other direction (cutehip's bug): still refused, but reported as such. (This second
/// computation happens after the DH and, for I2, the decryption, so it adds nothing
/// that matters to the cost of a bogus packet.)
fn check_mac(k: &SessionKeys, covered: &[u8], tag: &[u8]) -> Result<(), ProtocolError> {
    if k.rhash.verify_hmac(&k.hmac_in, covered, tag) {
        Ok(())
    } else if k.rhash.verify_hmac(&k.hmac_out, covered, tag) {
        Err(ProtocolError::HmacWrongDirection)
    } else {
        Err(ProtocolError::BadHmac)
    }
}

/// Signs what `b` holds so far with our HI and appends the HIP_SIGNATURE (RFC 7401
/// §5.2.15: UPDATE, CLOSE, CLOSE_ACK, NOTIFY and R2 carry it).
pub(super) fn push_signature(
    b: &mut PacketBuilder,
    id: &HostIdentity,
) -> Result<(), ProtocolError> {
    let sig = id.sign(b.covered())?;
    b.push(&Param::Signature {
        algorithm: id.host_id().algorithm() as u16,
        signature: sig,
    })?;
    Ok(())
}

fn verify_signature(pkt: &Packet, t: u16, hi: &HostId) -> Result<(), ProtocolError> {
    let other = if t == ty::HIP_SIGNATURE {
        ty::HIP_SIGNATURE_2
    } else {
        ty::HIP_SIGNATURE
    };
    if pkt.find(t).is_none() && pkt.find(other).is_some() {
        // RFC 7401 §5.3: the packet type fixes the signature parameter. The other one
        // signs another image (HIP_SIGNATURE_2 zeroes the receiver HIT and #I), so it
        // is never taken instead, even if it verifies.
        return Err(ProtocolError::WrongSignatureParameter {
            packet: pkt.header.packet_type,
            expected: wire::param_name(t),
            found: wire::param_name(other),
        });
    }
    let p = raw(pkt, t)?;
    let (alg, sig) = match p.parse()? {
        Param::Signature {
            algorithm,
            signature,
        }
        | Param::Signature2 {
            algorithm,
            signature,
        } => (algorithm, signature),
        _ => unreachable!("type checked"),
    };
    if alg != hi.algorithm() as u16 {
        return Err(ProtocolError::BadSignature);
    }
    let mut covered = pkt.covered_prefix(p.offset);
    if t == ty::HIP_SIGNATURE_2 {
        // RFC 7401 §5.2.15: receiver HIT, #I and Opaque zeroed in the signed image.
        covered[24..40].fill(0);
        if let Some(pz) = pkt.find(ty::PUZZLE)
            && pz.offset + 4 + pz.contents.len() <= covered.len()
        {
            covered[pz.offset + 6..pz.offset + 4 + pz.contents.len()].fill(0);
        }
    }
    hi.verify(&covered, &sig)
        .map_err(|_| ProtocolError::BadSignature)
}

/// The image HIP_MAC_2 covers (RFC 7401 §6.4.1): the R2 up to HIP_MAC_2, then the
/// Responder's HOST_ID parameter exactly as it was sent in R1 appended at the end, the
/// header length covering it and the checksum zeroed.
fn hmac2_image(pkt: &Packet, mac2_off: usize, host_id_tlv: &[u8]) -> Vec<u8> {
    let mut v = pkt.bytes[..mac2_off].to_vec();
    v.extend_from_slice(host_id_tlv);
    v[1] = (v.len() / 8 - 1) as u8;
    v[4] = 0;
    v[5] = 0;
    v
}

fn host_id_of(p: Param) -> Result<HostId, ProtocolError> {
    match p {
        Param::HostId { algorithm, hi, .. } => Ok(HostId::from_hi_bytes(algorithm, &hi)?),
        _ => unreachable!("type checked"),
    }
}

/// First entry of `theirs` (their preference order) that we support.
fn pick<T: PartialEq + Copy>(theirs: &[u16], ours: &[T], id: impl Fn(T) -> u16) -> Option<T> {
    theirs
        .iter()
        .find_map(|t| ours.iter().copied().find(|o| id(*o) == *t))
}

enum R1Key {
    Known(Hit),
    Opportunistic(IpAddr),
}

impl Endpoint {
    fn assoc_mut(&mut self, key: &R1Key) -> Option<&mut Assoc> {
        match key {
            R1Key::Known(h) => self.assocs.get_mut(h),
            R1Key::Opportunistic(l) => self.opportunistic.get_mut(l),
        }
    }

    /// Moves an association to E-FAILED and reports it.
    fn fail(&mut self, now: Instant, key: &R1Key, error: ProtocolError) -> ProtocolError {
        let linger = self.config.linger;
        let mut release = None;
        if let Some(a) = self.assoc_mut(key) {
            a.state = State::EFailed;
            a.timer = Some(now + linger);
            a.last = None;
            release = a.spi_in.take();
            let ev = Event::Failed {
                peer_hit: (!a.peer_hit.is_zero()).then_some(a.peer_hit),
                peer_locator: a.peer_loc,
                error: error.clone(),
            };
            self.events.push_back(ev);
        }
        if let Some(s) = release {
            self.spis.release(s);
        }
        error
    }

    /// Sends a NOTIFY (NOTIFICATION + HIP_SIGNATURE, RFC 7401 §5.3.6).
    fn send_notify(
        &mut self,
        local: IpAddr,
        peer: IpAddr,
        peer_hit: Hit,
        msg_type: u16,
        data: Vec<u8>,
    ) -> Result<(), ProtocolError> {
        let mut b = PacketBuilder::new(PacketType::Notify, 0, self.hit(), peer_hit);
        b.push(&Param::Notification { msg_type, data })?;
        push_signature(&mut b, &self.identity)?;
        // A NOTIFY answers the packet being handled: it goes back the way that came.
        let t = Transmit::framed(local, peer, self.rx_udp, b.finish());
        self.transmits.push_back(t);
        Ok(())
    }

    pub(super) fn on_i1(
        &mut self,
        now: Instant,
        src: IpAddr,
        dst: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        let hit_i = pkt.header.sender;
        let recv = pkt.header.receiver;
        if recv != self.hit() {
            if !recv.is_zero() {
                return Err(ProtocolError::NotForUs(recv));
            }
            if !self.config.opportunistic {
                return Err(ProtocolError::OpportunisticDisabled);
            }
        }
        if hit_i == self.hit() || hit_i.is_zero() {
            return Err(ProtocolError::NotForUs(hit_i));
        }
        // Simultaneous open (RFC 7401 §4.4.4, I1-SENT): the host with the smaller HIT
        // drops the peer's I1 and stays initiator; the greater one answers it.
        if let Some(a) = self.assocs.get(&hit_i)
            && a.state == State::I1Sent
            && self.hit() < hit_i
        {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::I1,
                state: State::I1Sent,
            });
        }
        let Param::DhGroupList(list) = pkt.required(ty::DH_GROUP_LIST)? else {
            unreachable!("type checked")
        };
        // RFC 7401 §5.2.6: the Responder picks the first group of its own list that the
        // Initiator offered; with none in common, its most preferred group anyway
        // (§6.7 step 4), and the Initiator decides what to do with that.
        let group = self
            .config
            .dh_groups
            .iter()
            .copied()
            .find(|g| list.contains(&g.id()))
            .unwrap_or(self.config.dh_groups[0]);
        // Two lanes (RFC 7401 §6.7 rate limiting, §4.1.1 on prioritising under load): an
        // initiator we expect has a bucket of its own, keyed by its HIT, that I1s from
        // other HITs cannot drain, even from its own (spoofed) address; everyone else
        // shares a per-address bucket and one global budget.
        let c = &self.config;
        let expected = self.policy.expected(&hit_i);
        if expected {
            if !self
                .r1_expected
                .allow(now, hit_i, c.r1_rate_expected, c.r1_burst_expected)
            {
                self.stats.r1_rate_limited_expected += 1;
                return Err(ProtocolError::RateLimited(src));
            }
        } else {
            if !self
                .r1_limiter
                .allow(now, src, c.r1_rate_per_address, c.r1_burst_per_address)
            {
                self.stats.r1_rate_limited_address += 1;
                return Err(ProtocolError::RateLimited(src));
            }
            if !self
                .r1_unexpected
                .allow(now, (), c.r1_rate_unexpected, c.r1_burst_unexpected)
            {
                self.stats.r1_rate_limited_unexpected += 1;
                return Err(ProtocolError::RateLimited(src));
            }
        }
        let t = self
            .pool
            .respond(group, hit_i, dst, src, self.rx_udp)
            .ok_or(ProtocolError::NoCommonDhGroup)?;
        if expected {
            self.stats.r1_sent_expected += 1;
        } else {
            self.stats.r1_sent_unexpected += 1;
        }
        self.transmits.push_back(t);
        Ok(())
    }

    pub(super) fn on_r1(
        &mut self,
        now: Instant,
        src: IpAddr,
        _dst: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        if pkt.header.receiver != self.hit() {
            return Err(ProtocolError::NotForUs(pkt.header.receiver));
        }
        let sender = pkt.header.sender;
        let key = match self.assocs.get(&sender).map(|a| a.state) {
            Some(State::I1Sent) => R1Key::Known(sender),
            Some(s) if !self.opportunistic.contains_key(&src) => {
                return Err(ProtocolError::Unexpected {
                    packet_type: PacketType::R1,
                    state: s,
                });
            }
            _ if self
                .opportunistic
                .get(&src)
                .is_some_and(|a| a.state == State::I1Sent) =>
            {
                R1Key::Opportunistic(src)
            }
            _ => {
                // An R1 from another HIT than the one our I1 went to, at the locator we
                // sent it to: it answers that initiation, and the HIT check below fails it.
                match self
                    .assocs
                    .iter()
                    .find(|(_, a)| a.state == State::I1Sent && a.peer_loc == src)
                {
                    Some((k, _)) => R1Key::Known(*k),
                    None => return Err(ProtocolError::NoAssociation(sender)),
                }
            }
        };
        let (expected, i1_groups, local_loc) = {
            let a = self.assoc_mut(&key).expect("found above");
            (a.expected.clone(), a.i1_groups.clone(), a.local_loc)
        };

        // Identity and signature first: nothing below is trusted before this.
        let hid = host_id_of(pkt.required(ty::HOST_ID)?)?;
        let host_id_tlv = {
            let r = raw(pkt, ty::HOST_ID)?;
            pkt.bytes[r.offset..r.offset + r.total_len].to_vec()
        };
        verify_signature(pkt, ty::HIP_SIGNATURE_2, &hid)?;
        let actual = hid.hit();
        if let Some(&first) = expected.first()
            && !expected.contains(&actual)
        {
            return Err(self.fail(
                now,
                &key,
                ProtocolError::HitMismatch {
                    expected: first,
                    actual,
                },
            ));
        }
        if actual != sender {
            return Err(ProtocolError::InvalidHit {
                claimed: sender,
                computed: actual,
            });
        }
        let rhash = Rhash::for_suite(hid.hit_suite())?;

        // Echoed verbatim, Reserved field included (RFC 7401 §5.2.3); parsed to check it.
        pkt.optional(ty::R1_COUNTER)?;
        let r1_counter = pkt.find(ty::R1_COUNTER).map(|r| Param::Unknown {
            ty: ty::R1_COUNTER,
            contents: r.contents.to_vec(),
        });
        let Param::Puzzle {
            k,
            opaque,
            random_i,
            ..
        } = pkt.required(ty::PUZZLE)?
        else {
            unreachable!()
        };
        if random_i.len() != rhash.len() {
            return Err(ProtocolError::Wire(wire::WireError::BadParam {
                ty: ty::PUZZLE,
                name: "PUZZLE",
                why: format!(
                    "#I of {} octets for RHASH of {}",
                    random_i.len(),
                    rhash.len()
                ),
            }));
        }
        let Param::DhGroupList(r1_groups) = pkt.required(ty::DH_GROUP_LIST)? else {
            unreachable!()
        };
        let Param::DiffieHellman { group, public } = pkt.required(ty::DIFFIE_HELLMAN)? else {
            unreachable!()
        };
        let Param::HipCipher(ciphers) = pkt.required(ty::HIP_CIPHER)? else {
            unreachable!()
        };
        let Param::HitSuiteList(suites) = pkt.required(ty::HIT_SUITE_LIST)? else {
            unreachable!()
        };
        let Param::EspTransform(esps) = pkt.required(ty::ESP_TRANSFORM)? else {
            unreachable!()
        };

        // Downgrade protection (RFC 7401 §4.1.3, §6.8 step 7): the signed R1 lists the
        // Responder's groups in its order of preference; the group it chose must be the
        // first of that list that our I1 offered.
        let expected_group = r1_groups.iter().find(|g| i1_groups.contains(g)).copied();
        let Some(expected_group) = expected_group else {
            return Err(self.fail(now, &key, ProtocolError::NoCommonDhGroup));
        };
        if group != expected_group {
            return Err(self.fail(
                now,
                &key,
                ProtocolError::DhDowngrade {
                    chosen: group,
                    expected: expected_group,
                },
            ));
        }
        let Some(dh_group) = DhGroup::from_id(group) else {
            return Err(self.fail(now, &key, CryptoError::UnsupportedDhGroup(group).into()));
        };
        let Some(cipher) = pick(&ciphers, &self.config.hip_ciphers, HipCipher::id) else {
            self.send_notify(
                local_loc,
                src,
                sender,
                notify::NO_HIP_PROPOSAL_CHOSEN,
                vec![],
            )?;
            return Err(self.fail(now, &key, ProtocolError::NoCommonCipher));
        };
        let Some(esp) = pick(&esps, &self.config.esp_suites, EspSuite::id) else {
            // RFC 7402 §3.3.5: abandon, and tell the peer.
            self.send_notify(
                local_loc,
                src,
                sender,
                notify::NO_ESP_PROPOSAL_CHOSEN,
                vec![],
            )?;
            return Err(self.fail(now, &key, ProtocolError::NoCommonEspTransform));
        };
        let our_suite = self.identity.host_id().hit_suite();
        if !suites.contains(&our_suite.list_octet()) {
            return Err(self.fail(
                now,
                &key,
                ProtocolError::UnsupportedHitSuite(our_suite.id()),
            ));
        }
        if k > self.config.max_puzzle_difficulty {
            return Err(self.fail(now, &key, ProtocolError::PuzzleTooHard(k)));
        }
        let local_hit = self.hit();
        let Some(j) = puzzle::solve(
            rhash,
            &random_i,
            local_hit,
            sender,
            k,
            self.config.puzzle_max_attempts,
            &mut *self.rng,
        ) else {
            return Err(self.fail(now, &key, ProtocolError::PuzzleUnsolved));
        };
        let dh = DhSecret::generate(dh_group, &mut *self.rng);
        let kij = match dh.agree(&public) {
            Ok(k) => k,
            Err(e) => return Err(self.fail(now, &key, e.into())),
        };
        let keymat = Keymat::derive(rhash, &random_i, &j, &kij, local_hit, sender);
        let keys = SessionKeys::new(
            keymat,
            (cipher, esp, dh_group),
            (&random_i, &j),
            local_hit,
            sender,
        )?;
        let spi_in = match self.spis.allocate(local_hit, sender, src) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(now, &key, ProtocolError::SpiAllocation(e))),
        };

        // I2 (RFC 7401 §5.3.3, RFC 7402 §4.1). From here on an error gives the SPI back:
        // it is reserved in the kernel.
        let built = (|| -> Result<PacketBuilder, ProtocolError> {
            let mut b = PacketBuilder::new(PacketType::I2, 0, local_hit, sender);
            b.push(&Param::EspInfo {
                keymat_index: keys.esp_index as u16,
                old_spi: 0,
                new_spi: spi_in,
            })?;
            if let Some(c) = &r1_counter {
                b.push(c)?;
            }
            b.push(&Param::Solution {
                k,
                opaque,
                random_i: random_i.clone(),
                solution_j: j,
            })?;
            b.push(&Param::DiffieHellman {
                group,
                public: dh.public_value(),
            })?;
            b.push(&Param::HipCipher(vec![cipher.id()]))?;
            if self.config.encrypt_host_id {
                let plain = self.hi_param.to_bytes();
                let ct = cipher.encrypt(&keys.enc_out, &plain, &mut *self.rng);
                b.push(&Param::Encrypted(ct))?;
            } else {
                b.push(&self.hi_param)?;
            }
            b.push(&Param::TransportFormatList(vec![ty::ESP_TRANSFORM]))?;
            b.push(&Param::EspTransform(vec![esp.id()]))?;
            Ok(b)
        })();

        let id = &self.identity;
        let a = match &key {
            R1Key::Known(h) => self.assocs.get_mut(h),
            R1Key::Opportunistic(l) => self.opportunistic.get_mut(l),
        }
        .expect("found above");
        let previous_keys = a.keys.replace(keys);
        let t = match built.and_then(|b| a.finish_authenticated(b, id)) {
            Ok(t) => t,
            Err(e) => {
                // Dropped: the association is as it was, and the SPI is free again.
                a.keys = previous_keys;
                self.spis.release(spi_in);
                return Err(e);
            }
        };
        a.peer_hit = sender;
        a.peer_host_id_tlv = host_id_tlv;
        a.peer_hi = Some(hid);
        a.spi_in = Some(spi_in);
        a.state = State::I2Sent;
        a.send_reliably(now, &self.config, t, &mut self.transmits);
        if let R1Key::Opportunistic(l) = key {
            let a = self.opportunistic.remove(&l).expect("found above");
            self.assocs.insert(sender, a);
        }
        Ok(())
    }

    pub(super) fn on_i2(
        &mut self,
        now: Instant,
        src: IpAddr,
        dst: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        let local_hit = self.hit();
        if pkt.header.receiver != local_hit {
            return Err(ProtocolError::NotForUs(pkt.header.receiver));
        }
        let hit_i = pkt.header.sender;
        let Param::Solution {
            k,
            opaque,
            random_i,
            solution_j,
        } = pkt.required(ty::SOLUTION)?
        else {
            unreachable!()
        };
        let ij = [&random_i[..], &solution_j[..]].concat();
        if let Some(a) = self.assocs.get(&hit_i) {
            match a.state {
                // RFC 7401 §6.9 step 5: with crossing I2s, the host with the smaller HIT
                // drops the peer's I2 and stays the Initiator.
                State::I2Sent if local_hit < hit_i => {
                    return Err(ProtocolError::Unexpected {
                        packet_type: PacketType::I2,
                        state: State::I2Sent,
                    });
                }
                State::R2Sent | State::Established
                    if a.solution.as_ref().is_some_and(|(_, s)| *s == ij) =>
                {
                    if a.state == State::R2Sent {
                        // The Initiator lost our R2 (RFC 7401 §6.9 item 3): resend it.
                        if let Some(t) = a.last.clone() {
                            self.transmits.push_back(t);
                        }
                        return Ok(());
                    }
                    return Err(ProtocolError::ReplayedI2);
                }
                _ => {}
            }
        }
        let rhash = self.pool.rhash;
        let Some(issued) = self
            .pool
            .lookup((hit_i, local_hit), (src, dst), opaque, &random_i)
        else {
            return Err(ProtocolError::BadPuzzle);
        };
        let generation = issued.generation;
        if k != self.config.puzzle_difficulty {
            return Err(ProtocolError::BadSolution);
        }
        if !puzzle::verify(rhash, &random_i, hit_i, local_hit, &solution_j, k) {
            return Err(ProtocolError::BadSolution);
        }
        if self.pool.was_used(generation, hit_i, &ij) {
            return Err(ProtocolError::ReplayedI2);
        }
        let Param::DiffieHellman { group, public } = pkt.required(ty::DIFFIE_HELLMAN)? else {
            unreachable!()
        };
        if group != issued.slot.dh.group().id() {
            return Err(CryptoError::UnsupportedDhGroup(group).into());
        }
        let dh_group = issued.slot.dh.group();
        let kij = issued.slot.dh.agree(&public)?;
        let Param::HipCipher(c) = pkt.required(ty::HIP_CIPHER)? else {
            unreachable!()
        };
        let cipher = match c.as_slice() {
            [one] => HipCipher::from_id(*one).filter(|c| self.config.hip_ciphers.contains(c)),
            _ => None,
        };
        let Some(cipher) = cipher else {
            self.send_notify(dst, src, hit_i, notify::INVALID_HIP_CIPHER_CHOSEN, vec![])?;
            return Err(ProtocolError::InvalidCipherChosen(
                c.first().copied().unwrap_or(0),
            ));
        };
        let Param::EspTransform(e) = pkt.required(ty::ESP_TRANSFORM)? else {
            unreachable!()
        };
        let esp = match e.as_slice() {
            [one] => EspSuite::from_id(*one).filter(|s| self.config.esp_suites.contains(s)),
            _ => None,
        };
        let Some(esp) = esp else {
            // The puzzle was checked, so a NOTIFY is in order (RFC 7401 §6.9.1).
            self.send_notify(
                dst,
                src,
                hit_i,
                notify::INVALID_ESP_TRANSFORM_CHOSEN,
                vec![],
            )?;
            return Err(ProtocolError::InvalidEspTransformChosen(
                e.first().copied().unwrap_or(0),
            ));
        };
        let Param::EspInfo { new_spi, .. } = pkt.required(ty::ESP_INFO)? else {
            unreachable!()
        };
        let keymat = Keymat::derive(rhash, &random_i, &solution_j, &kij, hit_i, local_hit);
        let keys = SessionKeys::new(
            keymat,
            (cipher, esp, dh_group),
            (&random_i, &solution_j),
            local_hit,
            hit_i,
        )?;

        // The Initiator's HI, encrypted or in the clear.
        let host_id_param = match pkt.optional(ty::ENCRYPTED)? {
            Some(Param::Encrypted(ct)) => {
                let plain = cipher
                    .decrypt(&keys.enc_in, &ct)
                    .map_err(|_| ProtocolError::BadEncrypted)?;
                if plain.len() < 4 || u16::from_be_bytes([plain[0], plain[1]]) != ty::HOST_ID {
                    return Err(ProtocolError::BadEncrypted);
                }
                let len = u16::from_be_bytes([plain[2], plain[3]]) as usize;
                if 4 + len > plain.len() {
                    return Err(ProtocolError::BadEncrypted);
                }
                Param::parse(ty::HOST_ID, &plain[4..4 + len])?
            }
            _ => pkt.required(ty::HOST_ID)?,
        };
        let hid = host_id_of(host_id_param)?;
        let computed = hid.hit();
        if computed != hit_i {
            return Err(ProtocolError::InvalidHit {
                claimed: hit_i,
                computed,
            });
        }
        if !self.config.hit_suites.contains(&hid.hit_suite()) {
            // RFC 7401 §6.9 step 3: silently dropped.
            return Err(ProtocolError::UnsupportedHitSuite(hid.hit_suite().id()));
        }
        verify_hmac(pkt, ty::HMAC, &keys)?;
        verify_signature(pkt, ty::HIP_SIGNATURE, &hid)?;
        if !self.policy.accept(&hit_i, &hid) {
            self.send_notify(dst, src, hit_i, notify::BLOCKED_BY_POLICY, vec![])?;
            return Err(ProtocolError::BlockedByPolicy(hit_i));
        }
        // State is bounded: a new peer beyond the cap is refused before anything is
        // reserved (a peer we already hold state for may replace it, RFC 7401 §6.9).
        if !self.assocs.contains_key(&hit_i)
            && self.association_count() >= self.config.max_associations
        {
            self.stats.refused_at_capacity += 1;
            return Err(ProtocolError::AtCapacity);
        }
        let spi_in = self
            .spis
            .allocate(local_hit, hit_i, src)
            .map_err(ProtocolError::SpiAllocation)?;
        // From here on an error gives the SPI back: it is reserved in the kernel.
        let built = (|| -> Result<_, ProtocolError> {
            let (keys_in, keys_out, next) =
                draw_esp_keys(&keys.keymat, keys.esp_index, esp, local_hit, hit_i)?;

            // R2 (RFC 7401 §5.3.4): ESP_INFO, HIP_MAC_2 (over the packet plus our
            // HOST_ID), HIP_SIGNATURE.
            let mut b = PacketBuilder::new(PacketType::R2, 0, local_hit, hit_i);
            b.push(&Param::EspInfo {
                keymat_index: keys.esp_index as u16,
                old_spi: 0,
                new_spi: spi_in,
            })?;
            let img = {
                let tmp = b.clone().finish();
                let p = Packet::parse(&tmp)?;
                hmac2_image(&p, tmp.len(), &self.hi_param.to_bytes())
            };
            b.push(&Param::Hmac2(keys.rhash.hmac(&keys.hmac_out, &img)))?;
            let sig = self.identity.sign(b.covered())?;
            b.push(&Param::Signature {
                algorithm: self.identity.host_id().algorithm() as u16,
                signature: sig,
            })?;
            Ok((keys_in, keys_out, next, b.finish()))
        })();
        let (keys_in, keys_out, next, r2) = match built {
            Ok(v) => v,
            Err(e) => {
                self.spis.release(spi_in);
                return Err(e);
            }
        };
        let udp = self.rx_udp;
        let t = Transmit::framed(dst, src, udp, r2);
        self.pool.mark_used(generation, hit_i, &ij);
        let mut replaced_spis = None;
        if let Some(old) = self.assocs.get_mut(&hit_i)
            && let Some(s) = old.spi_in.take()
        {
            if matches!(
                old.state,
                State::Established | State::R2Sent | State::Closing
            ) {
                // Its SAs exist in the kernel: the new Established says which to remove.
                replaced_spis = Some((s, old.spi_out.unwrap_or(0)));
            } else {
                self.spis.release(s);
            }
        }
        let ev = Established {
            local_hit,
            peer_hit: hit_i,
            peer_hi: hid.clone(),
            local_locator: dst,
            peer_locator: src,
            udp,
            initiator: false,
            esp_suite: esp,
            spi_inbound: spi_in,
            spi_outbound: new_spi,
            keys_inbound: keys_in,
            keys_outbound: keys_out,
            keymat: keys.keymat.clone(),
            keymat_index: next,
            dh_group,
            hip_cipher: cipher,
            replaced_spis,
        };
        let mut a = Assoc {
            state: State::R2Sent,
            local_hit,
            peer_hit: hit_i,
            expected: Vec::new(),
            local_loc: dst,
            peer_loc: src,
            udp,
            initiator: false,
            i1_groups: Vec::new(),
            peer_hi: Some(hid),
            keys: Some(keys),
            spi_in: Some(spi_in),
            spi_out: Some(new_spi),
            solution: Some((generation, ij)),
            last: Some(t.clone()),
            retries: 0,
            rto: self.config.rto_initial,
            timer: Some(now + self.config.r2_sent_timeout),
            close_nonce: Vec::new(),
            peer_host_id_tlv: Vec::new(),
            upd: Default::default(),
            keepalive: udp.map(|_| now + self.config.udp_keepalive),
            keepalive_seen: None,
        };
        a.upd.esp_next = next;
        self.assocs.insert(hit_i, a);
        self.transmits.push_back(t);
        self.events.push_back(Event::Established(Box::new(ev)));
        Ok(())
    }

    pub(super) fn on_r2(&mut self, now: Instant, pkt: &Packet) -> Result<(), ProtocolError> {
        if pkt.header.receiver != self.hit() {
            return Err(ProtocolError::NotForUs(pkt.header.receiver));
        }
        let peer = pkt.header.sender;
        let a = self
            .assocs
            .get(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        if a.state != State::I2Sent {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::R2,
                state: a.state,
            });
        }
        let (Some(keys), Some(hi)) = (&a.keys, &a.peer_hi) else {
            unreachable!("I2-SENT has keys and the peer HI")
        };
        let mac2 = raw(pkt, ty::HMAC_2)?;
        let img = hmac2_image(pkt, mac2.offset, &a.peer_host_id_tlv);
        check_mac(keys, &img, mac2.contents)?;
        verify_signature(pkt, ty::HIP_SIGNATURE, hi)?;
        let Param::EspInfo { new_spi, .. } = pkt.required(ty::ESP_INFO)? else {
            unreachable!()
        };
        let (keys_in, keys_out, next) =
            draw_esp_keys(&keys.keymat, keys.esp_index, keys.esp, a.local_hit, peer)?;
        let ev = Established {
            local_hit: a.local_hit,
            peer_hit: peer,
            peer_hi: hi.clone(),
            local_locator: a.local_loc,
            peer_locator: a.peer_loc,
            udp: a.udp,
            initiator: true,
            esp_suite: keys.esp,
            spi_inbound: a.spi_in.expect("allocated with I2"),
            spi_outbound: new_spi,
            keys_inbound: keys_in,
            keys_outbound: keys_out,
            keymat: keys.keymat.clone(),
            keymat_index: next,
            dh_group: keys.dh_group,
            hip_cipher: keys.cipher,
            replaced_spis: None,
        };
        let a = self.assocs.get_mut(&peer).expect("found above");
        a.spi_out = Some(new_spi);
        a.upd.esp_next = next;
        a.state = State::Established;
        a.timer = None;
        a.last = None;
        a.keepalive = a.udp.map(|_| now + self.config.udp_keepalive);
        self.events.push_back(Event::Established(Box::new(ev)));
        Ok(())
    }

    pub(super) fn on_notify(
        &mut self,
        now: Instant,
        src: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        let peer = pkt.header.sender;
        let Param::Notification { msg_type, data } = pkt.required(ty::NOTIFICATION)? else {
            unreachable!()
        };
        // Only a NOTIFY we can verify (its sender's HI is known from an exchange) raises
        // an event: an unauthenticated sender must not make us do work per packet.
        let Some(hi) = self.assocs.get(&peer).and_then(|a| a.peer_hi.as_ref()) else {
            self.stats.unverified_notify += 1;
            return Err(ProtocolError::UnverifiedNotify);
        };
        verify_signature(pkt, ty::HIP_SIGNATURE, hi)?;
        if msg_type == notify::NAT_KEEPALIVE {
            // RFC 9028 §5.3: it only keeps the NAT binding. Coming from another UDP path
            // than the association's, it starts that path's verification (a NAT that
            // rebound); no event, the owner has nothing to do per keepalive.
            self.stats.keepalives_received += 1;
            if let Some(a) = self.assocs.get_mut(&peer) {
                a.keepalive_seen = Some(now);
            }
            return self.verify_observed_path(now, peer, src);
        }
        self.events.push_back(Event::Notified {
            peer_hit: peer,
            msg_type,
            data,
            verified: true,
        });
        // RFC 7401 §6.13: NOTIFY is informational; no state changes on it alone (the
        // owner may act on the event, e.g. abort).
        Ok(())
    }

    pub(super) fn on_close(
        &mut self,
        now: Instant,
        _src: IpAddr,
        _dst: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        if pkt.header.receiver != self.hit() {
            return Err(ProtocolError::NotForUs(pkt.header.receiver));
        }
        let peer = pkt.header.sender;
        let a = self
            .assocs
            .get(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        if !matches!(
            a.state,
            State::Established | State::R2Sent | State::Closing | State::Closed
        ) {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::Close,
                state: a.state,
            });
        }
        a.verify_authenticated(pkt)?;
        let Param::EchoRequestSigned(nonce) = pkt.required(ty::ECHO_REQUEST_SIGNED)? else {
            unreachable!()
        };
        let mut b = PacketBuilder::new(PacketType::CloseAck, 0, self.hit(), peer);
        b.push(&Param::EchoResponseSigned(nonce))?;
        let t = a.finish_authenticated(b, &self.identity)?;
        let linger = self.config.linger;
        let a = self.assocs.get_mut(&peer).expect("found above");
        let was_closed = a.state == State::Closed;
        a.state = State::Closed;
        a.timer = Some(now + linger);
        a.last = None;
        self.transmits.push_back(t);
        if !was_closed {
            self.events.push_back(Event::Closed {
                peer_hit: peer,
                by_peer: true,
            });
        }
        Ok(())
    }

    pub(super) fn on_close_ack(&mut self, now: Instant, pkt: &Packet) -> Result<(), ProtocolError> {
        if pkt.header.receiver != self.hit() {
            return Err(ProtocolError::NotForUs(pkt.header.receiver));
        }
        let peer = pkt.header.sender;
        let a = self
            .assocs
            .get(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        if !matches!(a.state, State::Closing | State::Closed) {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::CloseAck,
                state: a.state,
            });
        }
        a.verify_authenticated(pkt)?;
        let Param::EchoResponseSigned(nonce) = pkt.required(ty::ECHO_RESPONSE_SIGNED)? else {
            unreachable!()
        };
        if nonce != a.close_nonce {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::CloseAck,
                state: a.state,
            });
        }
        if a.state == State::Closed {
            // Crossing CLOSEs (RFC 7401 §6.15): already closed by the peer's CLOSE.
            return Ok(());
        }
        let linger = self.config.linger;
        let a = self.assocs.get_mut(&peer).expect("found above");
        a.state = State::Closed;
        a.timer = Some(now + linger);
        a.last = None;
        self.events.push_back(Event::Closed {
            peer_hit: peer,
            by_peer: false,
        });
        Ok(())
    }
}
