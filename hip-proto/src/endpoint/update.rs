//! UPDATE (RFC 7401 §5.3.5, §6.11): ESP rekeying without a new DH exchange (RFC 7402
//! §6.1, keys drawn further along KEYMAT) and locator changes with address verification
//! (RFC 8046 §5: LOCATOR_SET, answered by an ECHO_REQUEST_SIGNED sent to the new address).
//!
//! Every UPDATE carries HIP_MAC and HIP_SIGNATURE. An UPDATE with SEQ is retransmitted
//! until the peer's ACK names its Update ID; a repeated SEQ is answered with the reply
//! already sent, without processing it again.

use std::{collections::VecDeque, net::IpAddr, time::Instant};

use super::{
    Config, Endpoint, Event, ProtocolError, Transmit, UdpPorts,
    assoc::{Assoc, State},
};
use crate::{
    crypto::{DhSecret, Keymat},
    esp::{EspKeys, EspSuite, draw_esp_keys},
    hit::Hit,
    wire::{self, Locator, Packet, PacketBuilder, PacketType, Param, ty},
};

/// What our outstanding UPDATE (with SEQ) is waiting for.
#[derive(Clone)]
pub(super) enum Pending {
    /// We started a rekey: our new inbound SPI, the KEYMAT index offered, and our new DH
    /// key when the rekey makes a new KEYMAT.
    Rekey {
        seq: u32,
        new_spi_in: u32,
        index: usize,
        dh: Option<Box<DhSecret>>,
    },
    /// We announced a new local locator.
    Locator { seq: u32 },
    /// We asked the peer to prove it is reachable at `candidate`.
    Verify {
        seq: u32,
        nonce: Vec<u8>,
        candidate: IpAddr,
        /// The candidate's UDP ports, for an association over UDP (the source port the
        /// peer's UPDATE came from, as a NAT on the way mapped it).
        candidate_udp: Option<UdpPorts>,
    },
    /// We answered the peer's rekey with our own SEQ: waiting for its ACK, then the old
    /// SA pair (these SPIs) is done.
    Ack {
        seq: u32,
        old_spis: Option<(u32, u32)>,
    },
    /// A liveness check: the peer must echo `nonce` (RFC 7401 §5.2.20).
    Probe { seq: u32, nonce: Vec<u8> },
}

impl Pending {
    fn seq(&self) -> u32 {
        match self {
            Pending::Rekey { seq, .. }
            | Pending::Locator { seq }
            | Pending::Verify { seq, .. }
            | Pending::Ack { seq, .. }
            | Pending::Probe { seq, .. } => *seq,
        }
    }
}

/// Per-association UPDATE state.
#[derive(Default)]
pub(crate) struct UpdateState {
    /// Our next Update ID.
    next_seq: u32,
    /// The last peer Update ID processed.
    peer_seq: Option<u32>,
    /// Our reply to that Update ID (resent on a duplicate).
    last_reply: Option<Transmit>,
    pending: Option<Pending>,
    /// KEYMAT index from which the next ESP keys are drawn.
    pub esp_next: usize,
}

/// A completed rekey: everything to replace the SA pair.
#[derive(Clone, Debug)]
pub struct Rekeyed {
    /// Our HIT.
    pub local_hit: Hit,
    /// The peer's HIT.
    pub peer_hit: Hit,
    /// The ESP transform (unchanged).
    pub esp_suite: EspSuite,
    /// SPI of the inbound SA being replaced.
    pub old_spi_inbound: u32,
    /// SPI of the outbound SA being replaced.
    pub old_spi_outbound: u32,
    /// New inbound SPI.
    pub spi_inbound: u32,
    /// New outbound SPI.
    pub spi_outbound: u32,
    /// New inbound keys.
    pub keys_inbound: EspKeys,
    /// New outbound keys.
    pub keys_outbound: EspKeys,
    /// KEYMAT index after these keys.
    pub keymat_index: usize,
    /// Whether the new outbound SA is to be used at once (we started the rekey and the
    /// peer has answered), or only after [`Event::RekeyCompleted`] (RFC 7402 §3.3.2).
    pub outbound_active: bool,
}

impl Assoc {
    fn next_seq(&mut self) -> u32 {
        let s = self.upd.next_seq;
        self.upd.next_seq = self.upd.next_seq.wrapping_add(1);
        s
    }

    /// Sends the NAT keepalive that is due (RFC 9028 §5.3: a NOTIFY with message type
    /// NAT_KEEPALIVE, no data, signed as every NOTIFY is, RFC 7401 §5.3.6) and arms the
    /// next; `true` if one went out. None before ESTABLISHED or while an UPDATE is being
    /// retransmitted (those packets keep the binding).
    pub(super) fn send_keepalive(
        &mut self,
        now: Instant,
        config: &Config,
        id: &crate::identity::HostIdentity,
        out: &mut VecDeque<Transmit>,
    ) -> bool {
        if self.udp.is_none() {
            self.keepalive = None;
            return false;
        }
        self.keepalive = Some(now + config.udp_keepalive);
        if !matches!(self.state, State::Established | State::R2Sent) || self.upd.pending.is_some() {
            return false;
        }
        let built = (|| -> Result<Transmit, ProtocolError> {
            let mut b = PacketBuilder::new(PacketType::Notify, 0, self.local_hit, self.peer_hit);
            b.push(&Param::Notification {
                msg_type: wire::notify::NAT_KEEPALIVE,
                data: Vec::new(),
            })?;
            super::assoc::push_signature(&mut b, id)?;
            Ok(self.transmit(b.finish()))
        })();
        // A failure to sign only skips this keepalive; the next one is armed.
        match built {
            Ok(t) => {
                out.push_back(t);
                true
            }
            Err(_) => false,
        }
    }

    /// Builds an authenticated UPDATE with `params` (ascending types), sent to `dst` over
    /// the association's transport.
    fn update_packet(
        &self,
        id: &crate::identity::HostIdentity,
        params: &[Param],
        dst: IpAddr,
    ) -> Result<Transmit, ProtocolError> {
        self.update_packet_via(id, params, dst, self.udp)
    }

    /// [`Assoc::update_packet`] to `dst` over `udp` (a candidate path being verified).
    fn update_packet_via(
        &self,
        id: &crate::identity::HostIdentity,
        params: &[Param],
        dst: IpAddr,
        udp: Option<UdpPorts>,
    ) -> Result<Transmit, ProtocolError> {
        let mut b = PacketBuilder::new(PacketType::Update, 0, self.local_hit, self.peer_hit);
        for p in params {
            b.push(p)?;
        }
        let t = self.finish_authenticated(b, id)?;
        Ok(if dst != t.dst || udp != t.udp {
            Transmit::framed(t.src, dst, udp, t.payload)
        } else {
            t
        })
    }

    /// Retransmits the pending UPDATE, or gives it up. The SPI of an abandoned rekey goes
    /// into `release`; an unanswered probe leaves the association E-FAILED (forgotten
    /// after the linger time) and reports [`Event::PeerUnreachable`].
    pub(super) fn on_update_timer(
        &mut self,
        now: Instant,
        config: &Config,
        out: &mut VecDeque<Transmit>,
        events: &mut VecDeque<Event>,
        release: &mut Vec<u32>,
    ) {
        let Some(pending) = &self.upd.pending else {
            self.timer = None;
            return;
        };
        let max = match pending {
            Pending::Probe { .. } => config.probe_retries,
            _ => config.update_retries,
        };
        if self.retries < max {
            self.retries += 1;
            self.rto = (self.rto * 2).min(config.rto_max);
            self.timer = Some(now + self.rto);
            if let Some(t) = &self.last {
                out.push_back(t.clone());
            }
            return;
        }
        self.timer = None;
        self.last = None;
        match self.upd.pending.take() {
            Some(Pending::Probe { .. }) => {
                // Its SAs are installed: the owner removes them on the event; the SPI
                // is not the allocator's to give out again.
                self.spi_in = None;
                self.state = State::EFailed;
                self.timer = Some(now + config.linger);
                events.push_back(Event::PeerUnreachable {
                    peer_hit: self.peer_hit,
                });
            }
            p => {
                let abandoned_spi = match p {
                    Some(Pending::Rekey { new_spi_in, .. }) => Some(new_spi_in),
                    _ => None,
                };
                release.extend(abandoned_spi);
                events.push_back(Event::UpdateFailed {
                    peer_hit: self.peer_hit,
                    abandoned_spi,
                });
            }
        }
    }
}

impl Endpoint {
    fn established_mut(&mut self, peer: Hit) -> Result<&mut Assoc, ProtocolError> {
        let a = self
            .assocs
            .get_mut(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        if a.state != State::Established {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::Update,
                state: a.state,
            });
        }
        if a.upd.pending.is_some() {
            return Err(ProtocolError::UpdateInProgress(peer));
        }
        Ok(a)
    }

    /// Starts rekeying the ESP SAs with `peer` (RFC 7402 §6.1): new SPIs, keys drawn
    /// further along KEYMAT. When KEYMAT has no room left for another key set (its 16-bit
    /// index, or HKDF's 255 blocks), a new DH exchange rides along and makes a new KEYMAT,
    /// as [`Endpoint::rekey_with_new_dh`] does. Completes with [`Event::Rekeyed`] on both
    /// sides.
    pub fn rekey(&mut self, now: Instant, peer: Hit) -> Result<(), ProtocolError> {
        let a = self.established_mut(peer)?;
        let keys = a.keys.as_ref().expect("established");
        let need = 2 * (keys.esp.enc_key_len() + keys.esp.auth_key_len());
        let room = (u16::MAX as usize).min(255 * keys.rhash.len());
        let new_dh = a.upd.esp_next + need > room;
        self.start_rekey(now, peer, new_dh)
    }

    /// Rekeys with a new Diffie-Hellman exchange in the UPDATEs (RFC 7402 §6.8): both
    /// sides derive a new KEYMAT from the new Kij (salt #I | #J of the base exchange,
    /// RFC 7401 §6.5) and draw the ESP keys from its start (KEYMAT Index 0).
    pub fn rekey_with_new_dh(&mut self, now: Instant, peer: Hit) -> Result<(), ProtocolError> {
        self.established_mut(peer)?;
        self.start_rekey(now, peer, true)
    }

    fn start_rekey(&mut self, now: Instant, peer: Hit, new_dh: bool) -> Result<(), ProtocolError> {
        let local = self.hit();
        let peer_loc = self.established_mut(peer)?.peer_loc;
        let new_spi_in = self
            .spis
            .allocate(local, peer, peer_loc)
            .map_err(ProtocolError::SpiAllocation)?;
        let a = self.assocs.get_mut(&peer).expect("checked above");
        let group = a.keys.as_ref().expect("established").dh_group;
        let dh = new_dh.then(|| Box::new(DhSecret::generate(group, &mut *self.rng)));
        let seq = a.next_seq();
        let index = if dh.is_some() { 0 } else { a.upd.esp_next };
        let mut params = vec![
            Param::EspInfo {
                keymat_index: index as u16,
                old_spi: a.spi_in.unwrap_or(0),
                new_spi: new_spi_in,
            },
            Param::Seq(seq),
        ];
        if let Some(d) = &dh {
            params.push(Param::DiffieHellman {
                group: group.id(),
                public: d.public_value(),
            });
        }
        let t = match a.update_packet(&self.identity, &params, a.peer_loc) {
            Ok(t) => t,
            Err(e) => {
                // The SPI is reserved in the kernel: give it back.
                self.spis.release(new_spi_in);
                return Err(e);
            }
        };
        a.upd.pending = Some(Pending::Rekey {
            seq,
            new_spi_in,
            index,
            dh,
        });
        a.send_reliably(now, &self.config, t, &mut self.transmits);
        Ok(())
    }

    /// Checks that `peer` still holds the association (dead peer detection): an UPDATE
    /// with SEQ and ECHO_REQUEST_SIGNED (RFC 7401 §5.3.5), which a live peer acknowledges
    /// with ECHO_RESPONSE_SIGNED. Unanswered after [`Config::probe_retries`]
    /// retransmissions, it reports [`Event::PeerUnreachable`]. While another UPDATE is
    /// outstanding that one serves as the probe, and this does nothing.
    pub fn probe(&mut self, now: Instant, peer: Hit) -> Result<(), ProtocolError> {
        match self.established_mut(peer) {
            Ok(_) => {}
            Err(ProtocolError::UpdateInProgress(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut nonce = vec![0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let a = self.assocs.get_mut(&peer).expect("checked above");
        let seq = a.next_seq();
        let params = [Param::Seq(seq), Param::EchoRequestSigned(nonce.clone())];
        let t = a.update_packet(&self.identity, &params, a.peer_loc)?;
        a.upd.pending = Some(Pending::Probe { seq, nonce });
        a.send_reliably(now, &self.config, t, &mut self.transmits);
        Ok(())
    }

    /// Announces that we now use `new_local` (RFC 8046 §5.1, one SA pair kept: ESP_INFO
    /// with OLD SPI = NEW SPI, and a LOCATOR_SET with our inbound SPI and the address).
    /// The peer verifies the address before moving; both sides then report
    /// [`Event::LocatorsChanged`].
    pub fn update_locators(
        &mut self,
        now: Instant,
        peer: Hit,
        new_local: IpAddr,
    ) -> Result<(), ProtocolError> {
        self.established_mut(peer)?;
        let a = self.assocs.get_mut(&peer).expect("checked above");
        let spi = a.spi_in.unwrap_or(0);
        let seq = a.next_seq();
        let addr = match new_local {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        };
        let mut loc = spi.to_be_bytes().to_vec();
        loc.extend_from_slice(&addr.octets());
        let params = [
            Param::EspInfo {
                keymat_index: a.upd.esp_next as u16,
                old_spi: spi,
                new_spi: spi,
            },
            Param::LocatorSet(vec![Locator {
                traffic_type: 0,
                locator_type: 1,
                preferred: true,
                lifetime: 600,
                locator: loc,
            }]),
            Param::Seq(seq),
        ];
        a.local_loc = new_local;
        let t = a.update_packet(&self.identity, &params, a.peer_loc)?;
        a.upd.pending = Some(Pending::Locator { seq });
        a.send_reliably(now, &self.config, t, &mut self.transmits);
        Ok(())
    }

    pub(super) fn on_update(
        &mut self,
        now: Instant,
        src: IpAddr,
        dst: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        if pkt.header.receiver != self.hit() {
            return Err(ProtocolError::NotForUs(pkt.header.receiver));
        }
        let peer = pkt.header.sender;
        let local_hit = self.hit();
        let a = self
            .assocs
            .get(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        if !matches!(a.state, State::Established | State::R2Sent) {
            return Err(ProtocolError::Unexpected {
                packet_type: PacketType::Update,
                state: a.state,
            });
        }
        a.verify_authenticated(pkt)?;
        let seq = match pkt.optional(ty::SEQ)? {
            Some(Param::Seq(s)) => Some(s),
            _ => None,
        };
        let acks = match pkt.optional(ty::ACK)? {
            Some(Param::Ack(v)) => v,
            _ => Vec::new(),
        };
        let esp_info = match pkt.optional(ty::ESP_INFO)? {
            Some(Param::EspInfo {
                keymat_index,
                old_spi,
                new_spi,
            }) => Some((keymat_index as usize, old_spi, new_spi)),
            _ => None,
        };
        let locators = match pkt.optional(ty::LOCATOR_SET)? {
            Some(Param::LocatorSet(v)) => v,
            _ => Vec::new(),
        };
        let peer_dh = match pkt.optional(ty::DIFFIE_HELLMAN)? {
            Some(Param::DiffieHellman { group, public }) => Some((group, public)),
            _ => None,
        };
        let echo_req = match pkt.optional(ty::ECHO_REQUEST_SIGNED)? {
            Some(Param::EchoRequestSigned(d)) => Some(d),
            _ => None,
        };
        let echo_resp = match pkt.optional(ty::ECHO_RESPONSE_SIGNED)? {
            Some(Param::EchoResponseSigned(d)) => Some(d),
            _ => None,
        };

        // A duplicate of the last request: answer again, change nothing. An older one
        // (a late retransmission, Update IDs compared in circular space, RFC 7401 §6.12):
        // acknowledge it again without processing it.
        if let (Some(s), Some(last)) = (seq, a.upd.peer_seq) {
            if s == last {
                if let Some(t) = a.upd.last_reply.clone() {
                    self.transmits.push_back(t);
                }
                return Ok(());
            }
            if (last.wrapping_sub(s) as i32) > 0 {
                let t = a.update_packet(&self.identity, &[Param::Ack(vec![s])], src)?;
                self.transmits.push_back(t);
                return Ok(());
            }
        }
        let pending = a.upd.pending.clone();
        let acked = pending.as_ref().is_some_and(|p| acks.contains(&p.seq()));
        let peer_starts_rekey =
            seq.is_some() && esp_info.is_some_and(|(_, old, new)| old != new) && !acked;
        if let Some(Pending::Rekey { new_spi_in, .. }) = &pending
            && peer_starts_rekey
        {
            // Both started a rekey: the host with the greater HIT keeps its own.
            if local_hit > peer {
                return Err(ProtocolError::UpdateInProgress(peer));
            }
            self.spis.release(*new_spi_in);
            let a = self.assocs.get_mut(&peer).expect("found above");
            a.upd.pending = None;
            a.timer = None;
            a.last = None;
        }

        let a = self.assocs.get_mut(&peer).expect("found above");
        if a.state == State::R2Sent {
            // An authenticated UPDATE confirms the Initiator has the keys (§4.4.4).
            a.state = State::Established;
            a.timer = None;
        }
        let mut events = Vec::new();

        // 1. Our outstanding UPDATE acknowledged.
        if acked {
            match pending.clone().expect("acked implies pending") {
                Pending::Rekey {
                    new_spi_in,
                    index,
                    dh,
                    ..
                } => {
                    let Some((peer_index, _, peer_new)) = esp_info else {
                        return Err(ProtocolError::Wire(wire::WireError::Missing("ESP_INFO")));
                    };
                    let (index, new_keymat) = match (&dh, &peer_dh) {
                        (Some(d), Some((g, public))) if *g == d.group().id() => {
                            let kij = d.agree(public)?;
                            (0, Some(new_keymat(a, local_hit, &kij)))
                        }
                        (Some(_), _) => {
                            return Err(ProtocolError::Wire(wire::WireError::Missing(
                                "DIFFIE_HELLMAN",
                            )));
                        }
                        (None, _) => (index.max(peer_index), None),
                    };
                    let ev = complete_rekey(
                        a,
                        local_hit,
                        (new_spi_in, peer_new),
                        index,
                        new_keymat,
                        true,
                    )?;
                    let done = Event::RekeyCompleted {
                        peer_hit: peer,
                        old_spi_inbound: ev.old_spi_inbound,
                        old_spi_outbound: ev.old_spi_outbound,
                    };
                    events.push(Event::Rekeyed(Box::new(ev)));
                    events.push(done);
                }
                Pending::Locator { .. } => {
                    events.push(Event::LocatorsChanged {
                        peer_hit: peer,
                        local_locator: a.local_loc,
                        peer_locator: a.peer_loc,
                        udp: a.udp,
                    });
                }
                Pending::Verify {
                    nonce,
                    candidate,
                    candidate_udp,
                    ..
                } => {
                    // The echo must come back from the very path it was sent to: the
                    // address, and over UDP the port too.
                    let same_path = src == candidate && candidate_udp == self.rx_udp;
                    if echo_resp.as_deref() == Some(&nonce[..]) && same_path {
                        a.peer_loc = candidate;
                        a.local_loc = dst;
                        if a.udp.is_none() != candidate_udp.is_none() {
                            a.keepalive = candidate_udp.map(|_| now + self.config.udp_keepalive);
                        }
                        a.udp = candidate_udp;
                        events.push(Event::LocatorsChanged {
                            peer_hit: peer,
                            local_locator: a.local_loc,
                            peer_locator: a.peer_loc,
                            udp: a.udp,
                        });
                    } else {
                        return Err(ProtocolError::BadEcho);
                    }
                }
                Pending::Probe { nonce, .. } => {
                    if echo_resp.as_deref() != Some(&nonce[..]) {
                        return Err(ProtocolError::BadEcho);
                    }
                }
                Pending::Ack { old_spis, .. } => {
                    if let Some((i, o)) = old_spis {
                        events.push(Event::RekeyCompleted {
                            peer_hit: peer,
                            old_spi_inbound: i,
                            old_spi_outbound: o,
                        });
                    }
                }
            }
            a.upd.pending = None;
            a.timer = None;
            a.last = None;
        }

        // 2. A new request from the peer.
        if let Some(s) = seq {
            let ack = Param::Ack(vec![s]);
            if peer_starts_rekey {
                let (peer_index, _, peer_new) = esp_info.expect("checked");
                let peer_loc = a.peer_loc;
                let new_in = self
                    .spis
                    .allocate(local_hit, peer, peer_loc)
                    .map_err(ProtocolError::SpiAllocation)?;
                let a = self.assocs.get_mut(&peer).expect("found above");
                // From here on an error gives the new SPI back (reserved in the kernel).
                let answered = (|| -> Result<_, ProtocolError> {
                    // With a DIFFIE_HELLMAN, answer with ours and make a new KEYMAT
                    // (RFC 7402 §4.1.3: "the reply packet MUST also contain" one).
                    let mut my_dh = None;
                    let mut keymat = None;
                    if let Some((g, public)) = &peer_dh {
                        let group = a.keys.as_ref().expect("established").dh_group;
                        if *g != group.id() {
                            return Err(crate::crypto::CryptoError::UnsupportedDhGroup(*g).into());
                        }
                        let d = DhSecret::generate(group, &mut *self.rng);
                        let kij = d.agree(public)?;
                        keymat = Some(new_keymat(a, local_hit, &kij));
                        my_dh = Some(d);
                    }
                    let index = if keymat.is_some() {
                        0
                    } else {
                        a.upd.esp_next.max(peer_index)
                    };
                    let my_seq = a.upd.next_seq;
                    let mut params = vec![
                        Param::EspInfo {
                            keymat_index: index as u16,
                            old_spi: a.spi_in.unwrap_or(0),
                            new_spi: new_in,
                        },
                        Param::Seq(my_seq),
                        ack,
                    ];
                    if let Some(d) = &my_dh {
                        params.push(Param::DiffieHellman {
                            group: d.group().id(),
                            public: d.public_value(),
                        });
                    }
                    let t = a.update_packet(&self.identity, &params, a.peer_loc)?;
                    let ev =
                        complete_rekey(a, local_hit, (new_in, peer_new), index, keymat, false)?;
                    a.next_seq();
                    Ok((t, ev, my_seq))
                })();
                let (t, ev, my_seq) = match answered {
                    Ok(v) => v,
                    Err(e) => {
                        self.spis.release(new_in);
                        return Err(e);
                    }
                };
                a.upd.pending = Some(Pending::Ack {
                    seq: my_seq,
                    old_spis: Some((ev.old_spi_inbound, ev.old_spi_outbound)),
                });
                events.push(Event::Rekeyed(Box::new(ev)));
                a.upd.peer_seq = Some(s);
                a.upd.last_reply = Some(t.clone());
                a.send_reliably(now, &self.config, t, &mut self.transmits);
            } else if let Some((candidate, candidate_udp)) =
                self.candidate_path(peer, src, &locators)
            {
                // RFC 8046 §5.2: verify the new address before sending data there.
                let mut nonce = vec![0u8; 16];
                self.rng.fill_bytes(&mut nonce);
                let a = self.assocs.get_mut(&peer).expect("found above");
                let my_seq = a.next_seq();
                let params = [
                    Param::Seq(my_seq),
                    ack,
                    Param::EchoRequestSigned(nonce.clone()),
                ];
                let t = a.update_packet_via(&self.identity, &params, candidate, candidate_udp)?;
                a.upd.pending = Some(Pending::Verify {
                    seq: my_seq,
                    nonce,
                    candidate,
                    candidate_udp,
                });
                a.upd.peer_seq = Some(s);
                a.upd.last_reply = Some(t.clone());
                a.send_reliably(now, &self.config, t, &mut self.transmits);
            } else {
                let a = self.assocs.get_mut(&peer).expect("found above");
                let mut params = vec![ack];
                if let Some(n) = echo_req {
                    params.push(Param::EchoResponseSigned(n));
                }
                let t = a.update_packet(&self.identity, &params, src)?;
                a.upd.peer_seq = Some(s);
                a.upd.last_reply = Some(t.clone());
                self.transmits.push_back(t);
            }
        }
        // 3. An authenticated packet without a request of its own (a NAT keepalive) from
        //    another UDP path than the association's: the NAT rebound, or the peer moved
        //    behind another. Verify the new path (RFC 8046 §5.2's echo, from us) before
        //    any ESP goes there.
        if seq.is_none() {
            self.verify_observed_path(now, peer, src)?;
        }
        self.events.extend(events);
        Ok(())
    }

    /// The path an UPDATE announcing locators is to be verified on: over UDP, the path
    /// the UPDATE itself came on (the peer cannot know the address and port a NAT maps it
    /// to, RFC 9028 §5.4's "server reflexive" candidate, so its LOCATOR_SET is not used),
    /// also when only the observed path changed; over raw HIP, its preferred (or first)
    /// locator. `None`: nothing new to verify.
    fn candidate_path(
        &self,
        peer: Hit,
        src: IpAddr,
        locators: &[Locator],
    ) -> Option<(IpAddr, Option<UdpPorts>)> {
        let a = self.assocs.get(&peer)?;
        if let Some(rx) = self.rx_udp {
            let moved = src != a.peer_loc || Some(rx) != a.udp;
            return (moved || !locators.is_empty()).then_some((src, Some(rx)));
        }
        locators
            .iter()
            .find(|l| l.preferred)
            .or(locators.first())
            .and_then(Locator::address)
            .map(|c| (c, None))
    }

    /// The kernel saw authenticated ESP of `peer`'s association arrive from `from`, not
    /// from the UDP path the association has (`XFRM_MSG_MAPPING`: a NAT rebound, RFC
    /// 3948 §3 leaves following it to the key manager). Like a keepalive from there, it
    /// starts the verification of that path (RFC 8046 §5.2's echo); nothing moves before
    /// the peer answers from it. `Ok` also when nothing was to be done (the path is
    /// already the association's, or a verification is running).
    pub fn path_observed(
        &mut self,
        now: Instant,
        peer: Hit,
        from: std::net::SocketAddr,
    ) -> Result<(), ProtocolError> {
        let a = self
            .assocs
            .get(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        let Some(u) = a.udp else {
            return Ok(());
        };
        self.rx_udp = Some(UdpPorts {
            local: u.local,
            peer: from.port(),
        });
        let r = self.verify_observed_path(now, peer, from.ip());
        self.rx_udp = None;
        r
    }

    /// Starts verifying the UDP path an authenticated packet of `peer`'s arrived on, when
    /// it is not the association's and no other UPDATE is outstanding.
    pub(super) fn verify_observed_path(
        &mut self,
        now: Instant,
        peer: Hit,
        src: IpAddr,
    ) -> Result<(), ProtocolError> {
        let Some(rx) = self.rx_udp else {
            return Ok(());
        };
        let Some(a) = self.assocs.get(&peer) else {
            return Ok(());
        };
        if !matches!(a.state, State::Established | State::R2Sent)
            || a.upd.pending.is_some()
            || (src == a.peer_loc && Some(rx) == a.udp)
        {
            return Ok(());
        }
        let mut nonce = vec![0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let a = self.assocs.get_mut(&peer).expect("found above");
        let my_seq = a.next_seq();
        let params = [Param::Seq(my_seq), Param::EchoRequestSigned(nonce.clone())];
        let t = a.update_packet_via(&self.identity, &params, src, Some(rx))?;
        a.upd.pending = Some(Pending::Verify {
            seq: my_seq,
            nonce,
            candidate: src,
            candidate_udp: Some(rx),
        });
        a.send_reliably(now, &self.config, t, &mut self.transmits);
        Ok(())
    }
}

/// A KEYMAT from a new Kij, with the base exchange's salt (#I | #J) and HITs.
fn new_keymat(a: &Assoc, local_hit: Hit, kij: &[u8]) -> Keymat {
    let keys = a.keys.as_ref().expect("established");
    Keymat::derive(
        keys.rhash,
        &keys.salt_i,
        &keys.salt_j,
        kij,
        local_hit,
        a.peer_hit,
    )
}

fn complete_rekey(
    a: &mut Assoc,
    local_hit: Hit,
    (new_in, new_out): (u32, u32),
    index: usize,
    new_keymat: Option<Keymat>,
    outbound_active: bool,
) -> Result<Rekeyed, ProtocolError> {
    if let Some(k) = new_keymat {
        // Only the ESP keys come from the new KEYMAT; HIP_MAC keys stay (RFC 7402 §7).
        a.keys.as_mut().expect("established").keymat = k;
    }
    let keys = a.keys.as_ref().expect("established");
    let (keys_in, keys_out, next) =
        draw_esp_keys(&keys.keymat, index, keys.esp, local_hit, a.peer_hit)?;
    let ev = Rekeyed {
        local_hit,
        peer_hit: a.peer_hit,
        esp_suite: keys.esp,
        old_spi_inbound: a.spi_in.unwrap_or(0),
        old_spi_outbound: a.spi_out.unwrap_or(0),
        spi_inbound: new_in,
        spi_outbound: new_out,
        keys_inbound: keys_in,
        keys_outbound: keys_out,
        keymat_index: next,
        outbound_active,
    };
    a.spi_in = Some(new_in);
    a.spi_out = Some(new_out);
    a.upd.esp_next = next;
    Ok(ev)
}
