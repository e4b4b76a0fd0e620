//! The HIP state machine (RFC 7401 §4.4) behind a sans-IO [`Endpoint`].
//!
//! # Call order
//!
//! The owner (a driver with sockets and a clock, or a test with simulated time) does:
//!
//! 1. [`Endpoint::new`] with the local identity, a [`Config`], an RNG and the current time;
//!    this precomputes the R1 pool (one signed R1 per DH group and pool slot).
//! 2. For each received HIP packet: [`Endpoint::handle_packet`]`(now, src, dst, bytes)`
//!    with the IP source and destination (needed for the checksum), or, for HIP over UDP
//!    (RFC 9028 §4.1/RFC 5770 §5.1, the non-ESP marker already stripped),
//!    [`Endpoint::handle_udp_packet`]`(now, src, dst, bytes)` with both socket addresses.
//!    An `Err` means the packet was dropped for that reason and changed nothing.
//! 3. Commands at any time: [`Endpoint::initiate`], [`Endpoint::close`].
//! 4. After every input or command, drain the outputs: [`Endpoint::poll_transmit`] until
//!    `None` (send each datagram from `src` to `dst` as IP protocol 139, or over UDP
//!    between the ports in [`Transmit::udp`] behind the 4-byte non-ESP marker),
//!    [`Endpoint::poll_event`] until `None`, then read [`Endpoint::poll_timeout`] and arm a
//!    timer for it.
//! 5. When that timer fires: [`Endpoint::handle_timeout`]`(now)`, then drain again (4).
//!
//! Nothing inside reads a clock, opens a socket or draws randomness from anywhere but the
//! RNG handed to [`Endpoint::new`]. The inbound ESP SPI comes from a [`SpiAllocator`]
//! (the agent's allocates it in the kernel with `XFRM_MSG_ALLOCSPI`), and a
//! [`PeerPolicy`] decides which initiators may associate.

mod assoc;
mod r1pool;
mod ratelimit;
mod update;

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::{
    crypto::{CryptoError, DhGroup, HipCipher, Keymat},
    esp::{EspKeys, EspSuite},
    hit::{Hit, HitSuite},
    identity::{HostId, HostIdentity, IdentityError},
    wire::{self, Packet, PacketType, WireError},
};

use assoc::Assoc;
pub use assoc::State;
use r1pool::R1Pool;
pub use update::Rekeyed;

/// Protocol errors: why a packet was dropped or an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The packet is malformed or its checksum is wrong.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A Host Identity problem (unsupported or malformed HI).
    #[error("host identity: {0}")]
    Identity(String),
    /// A crypto-layer failure (bad DH value, unsupported group, bad ciphertext).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The receiver HIT is neither ours nor (for I1) the null HIT.
    #[error("packet for HIT {0}, which is not ours")]
    NotForUs(Hit),
    /// A packet that the association's state does not accept.
    #[error("{packet_type:?} not accepted in state {state:?}")]
    Unexpected {
        /// Packet type.
        packet_type: PacketType,
        /// Association state.
        state: State,
    },
    /// A packet for an association that does not exist.
    #[error("no association with {0}")]
    NoAssociation(Hit),
    /// The responder's HI does not hash to the HIT the initiation expected (the HIT
    /// learned from SIP): the exchange is aborted.
    #[error("peer HI hashes to {actual}, expected {expected}")]
    HitMismatch {
        /// The expected peer HIT.
        expected: Hit,
        /// The HIT of the HI the peer presented.
        actual: Hit,
    },
    /// A HOST_ID that does not hash to the sender HIT of its packet.
    #[error("HOST_ID hashes to {computed}, packet claims {claimed}")]
    InvalidHit {
        /// Sender HIT in the header.
        claimed: Hit,
        /// HIT of the HOST_ID.
        computed: Hit,
    },
    /// A HIP_SIGNATURE or HIP_SIGNATURE_2 that does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A HIP_MAC or HIP_MAC_2 that does not verify.
    #[error("bad HMAC")]
    BadHmac,
    /// A HIP_MAC or HIP_MAC_2 computed with the integrity key of the other direction (the
    /// key that protects what *we* send, RFC 7401 §6.5), as cutehip does. Refused like
    /// any bad MAC; told apart only so that the log names the peer's bug.
    #[error(
        "HMAC computed with the key of the other direction (the peer used our outgoing \
         HIP-gl/lg integrity key, RFC 7401 §6.5)"
    )]
    HmacWrongDirection,
    /// The packet carries the other signature parameter than its type requires (RFC 7401
    /// §5.3: HIP_SIGNATURE_2 in R1 only, HIP_SIGNATURE in I2, R2 and later packets), e.g.
    /// an R2 signed with HIP_SIGNATURE_2. Never accepted: the two sign different images.
    #[error("{packet:?} carries {found} where RFC 7401 §5.3 requires {expected}")]
    WrongSignatureParameter {
        /// The packet type.
        packet: PacketType,
        /// The parameter required.
        expected: &'static str,
        /// The parameter found instead.
        found: &'static str,
    },
    /// The puzzle's #I was not issued by this responder, or has expired.
    #[error("puzzle not issued by us or expired")]
    BadPuzzle,
    /// The SOLUTION does not solve the puzzle.
    #[error("wrong puzzle solution")]
    BadSolution,
    /// The responder asks for a puzzle harder than we accept.
    #[error("puzzle difficulty {0} exceeds our maximum")]
    PuzzleTooHard(u8),
    /// The solver hit its bound without a solution.
    #[error("puzzle not solved within the attempt bound")]
    PuzzleUnsolved,
    /// An I2 whose puzzle solution was already used.
    #[error("replayed I2")]
    ReplayedI2,
    /// No DH group in common.
    #[error("no DH group in common")]
    NoCommonDhGroup,
    /// The responder chose a DH group other than the one the lists dictate (an I1 whose
    /// DH_GROUP_LIST was tampered with, RFC 7401 §4.1.3).
    #[error("DH downgrade: responder chose group {chosen}, expected {expected}")]
    DhDowngrade {
        /// Group chosen in R1.
        chosen: u8,
        /// Group the lists dictate.
        expected: u8,
    },
    /// No HIP_CIPHER in common.
    #[error("no HIP cipher in common")]
    NoCommonCipher,
    /// The I2 chose a HIP_CIPHER the R1 did not offer.
    #[error("HIP cipher {0} was not offered")]
    InvalidCipherChosen(u16),
    /// No ESP transform in common.
    #[error("no ESP transform in common")]
    NoCommonEspTransform,
    /// The I2 chose an ESP transform the R1 did not offer.
    #[error("ESP transform {0} was not offered")]
    InvalidEspTransformChosen(u16),
    /// The peer's HIT suite is not one we accept (or ours is not in the R1's list).
    #[error("HIT suite {0} not accepted")]
    UnsupportedHitSuite(u8),
    /// Our policy refuses this initiator.
    #[error("initiator {0} refused by policy")]
    BlockedByPolicy(Hit),
    /// The SPI allocator failed.
    #[error("SPI allocation failed: {0}")]
    SpiAllocation(String),
    /// Too many I1s from this address: no R1 sent (RFC 7401 §6.7).
    #[error("R1 rate limit reached for {0}")]
    RateLimited(IpAddr),
    /// Retransmissions exhausted.
    #[error("no answer to {0:?} after all retransmissions")]
    Timeout(PacketType),
    /// An I1 to the null HIT while opportunistic mode is off.
    #[error("opportunistic mode is disabled")]
    OpportunisticDisabled,
    /// A command for a peer that already has an association in progress or established.
    #[error("already associated with {0}")]
    AlreadyAssociated(Hit),
    /// The ENCRYPTED parameter does not hold a HOST_ID.
    #[error("ENCRYPTED does not decrypt to a HOST_ID")]
    BadEncrypted,
    /// An UPDATE exchange with this peer is already in progress.
    #[error("an UPDATE with {0} is in progress")]
    UpdateInProgress(Hit),
    /// An ECHO_RESPONSE_SIGNED that does not match our request, or from another address.
    #[error("echo response does not match the address check")]
    BadEcho,
    /// Configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// The association table is full ([`Config::max_associations`]): a new peer is
    /// refused before any state or SPI exists for it.
    #[error("association table full")]
    AtCapacity,
    /// A NOTIFY whose signature could not be checked (no HI known for its sender):
    /// counted, no event (an unauthenticated sender must not make us do work per packet).
    #[error("unverifiable NOTIFY")]
    UnverifiedNotify,
}

impl ProtocolError {
    /// A short, stable name for the reason (drop counters, rate-limited logs).
    pub fn kind(&self) -> &'static str {
        match self {
            ProtocolError::Wire(WireError::BadChecksum) => "bad-checksum",
            ProtocolError::Wire(_) => "malformed",
            ProtocolError::Identity(_) => "bad-host-identity",
            ProtocolError::Crypto(_) => "crypto",
            ProtocolError::NotForUs(_) => "not-for-us",
            ProtocolError::Unexpected { .. } => "unexpected-in-state",
            ProtocolError::NoAssociation(_) => "no-association",
            ProtocolError::HitMismatch { .. } => "hit-mismatch",
            ProtocolError::InvalidHit { .. } => "invalid-hit",
            ProtocolError::BadSignature => "bad-signature",
            ProtocolError::BadHmac => "bad-hmac",
            ProtocolError::HmacWrongDirection => "hmac-wrong-direction",
            ProtocolError::WrongSignatureParameter { .. } => "wrong-signature-parameter",
            ProtocolError::BadPuzzle => "bad-puzzle",
            ProtocolError::BadSolution => "bad-solution",
            ProtocolError::PuzzleTooHard(_) => "puzzle-too-hard",
            ProtocolError::PuzzleUnsolved => "puzzle-unsolved",
            ProtocolError::ReplayedI2 => "replayed-i2",
            ProtocolError::NoCommonDhGroup => "no-common-dh-group",
            ProtocolError::DhDowngrade { .. } => "dh-downgrade",
            ProtocolError::NoCommonCipher => "no-common-cipher",
            ProtocolError::InvalidCipherChosen(_) => "invalid-cipher",
            ProtocolError::NoCommonEspTransform => "no-common-esp-transform",
            ProtocolError::InvalidEspTransformChosen(_) => "invalid-esp-transform",
            ProtocolError::UnsupportedHitSuite(_) => "unsupported-hit-suite",
            ProtocolError::BlockedByPolicy(_) => "blocked-by-policy",
            ProtocolError::SpiAllocation(_) => "spi-allocation",
            ProtocolError::RateLimited(_) => "r1-rate-limited",
            ProtocolError::Timeout(_) => "timeout",
            ProtocolError::OpportunisticDisabled => "opportunistic-disabled",
            ProtocolError::AlreadyAssociated(_) => "already-associated",
            ProtocolError::BadEncrypted => "bad-encrypted",
            ProtocolError::UpdateInProgress(_) => "update-in-progress",
            ProtocolError::BadEcho => "bad-echo",
            ProtocolError::Config(_) => "config",
            ProtocolError::AtCapacity => "at-capacity",
            ProtocolError::UnverifiedNotify => "unverified-notify",
        }
    }
}

impl From<IdentityError> for ProtocolError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::BadSignature => ProtocolError::BadSignature,
            e => ProtocolError::Identity(e.to_string()),
        }
    }
}

/// Endpoint configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// DH groups, preferred first (sent in I1's and R1's DH_GROUP_LIST).
    pub dh_groups: Vec<DhGroup>,
    /// HIP ciphers, preferred first.
    pub hip_ciphers: Vec<HipCipher>,
    /// ESP transforms, preferred first.
    pub esp_suites: Vec<EspSuite>,
    /// HIT suites accepted from peers (R1's HIT_SUITE_LIST).
    pub hit_suites: Vec<HitSuite>,
    /// Puzzle difficulty K put in R1.
    pub puzzle_difficulty: u8,
    /// Puzzle lifetime exponent (2^(value-32) seconds, RFC 7401 §5.2.4).
    pub puzzle_lifetime: u8,
    /// The hardest puzzle this initiator attempts.
    pub max_puzzle_difficulty: u8,
    /// Bound on RHASH computations when solving one puzzle.
    pub puzzle_max_attempts: u64,
    /// Send the Initiator's HOST_ID inside ENCRYPTED in I2 instead of in the clear (RFC
    /// 7401 §5.3.3 allows either; a Responder here accepts both).
    ///
    /// Default `false`, for interoperability: cutehip looks for HOST_ID in the clear and
    /// drops an I2 without it. Nothing is given away that matters here: the HI is a
    /// public key, its hash (our HIT) is in the header of every packet, the agent puts
    /// the HIT (and optionally the HI) into SDP, and the HOST_ID is covered by HIP_MAC
    /// and HIP_SIGNATURE either way. ENCRYPTED only hides the key from a passive observer
    /// of the I2.
    pub encrypt_host_id: bool,
    /// Put R1_COUNTER into our R1s (RFC 7401 §5.2.3; optional in R1, §5.3.2).
    ///
    /// Default `false`, for interoperability: cutehip crashes echoing it. Nothing is lost:
    /// this Responder never reads the echoed counter — it finds the R1 generation an I2
    /// answers by recomputing #I (an HMAC under each live generation's secret, see the
    /// R1 pool), which is a stronger check than a counter the Initiator copies; and an
    /// Initiator gets nothing from the counter that the signed R1 does not give it.
    /// As Initiator we echo an R1_COUNTER whenever a Responder sends one (§5.3.3).
    pub send_r1_counter: bool,
    /// Signed R1s kept per DH group.
    pub r1_pool_size: usize,
    /// Lifetime of an R1 generation (DH keys, puzzle secret); I2s answering the previous
    /// generation are still accepted.
    pub r1_generation_lifetime: Duration,
    /// First retransmission timeout; doubled on every retransmission.
    pub rto_initial: Duration,
    /// Cap of the retransmission timeout.
    pub rto_max: Duration,
    /// Retransmissions of I1 before giving up.
    pub i1_retries: u32,
    /// Retransmissions of I2 before giving up.
    pub i2_retries: u32,
    /// Retransmissions of CLOSE before giving up.
    pub close_retries: u32,
    /// Retransmissions of an UPDATE before giving up.
    pub update_retries: u32,
    /// Retransmissions of a liveness probe ([`Endpoint::probe`]) before the peer is
    /// declared unreachable.
    pub probe_retries: u32,
    /// Time in R2-SENT before moving to ESTABLISHED without further packets.
    pub r2_sent_timeout: Duration,
    /// Time an association stays in CLOSED or E-FAILED before it is forgotten.
    pub linger: Duration,
    /// Answer I1s sent to the null HIT (opportunistic mode, RFC 7401 §4.1.8).
    pub opportunistic: bool,
    /// R1s per second answered to one IP address (RFC 7401 §6.7: an R1 sender MUST
    /// rate-limit R1s sent to an address), sustained rate.
    pub r1_rate_per_address: u32,
    /// Burst of R1s one address may receive before the rate applies.
    pub r1_burst_per_address: u32,
    /// R1s per second answered, in all, to I1s from initiators we do not expect (a
    /// budget a flood from spoofed addresses cannot exceed).
    pub r1_rate_unexpected: u32,
    /// Burst of that budget.
    pub r1_burst_unexpected: u32,
    /// R1s per second answered to one initiator HIT we expect ([`PeerPolicy::expected`]):
    /// their own lane, which spoofed I1s from other HITs cannot drain (a flood that
    /// forges the expected caller's address as well only makes us answer the caller).
    pub r1_rate_expected: u32,
    /// Burst of that lane.
    pub r1_burst_expected: u32,
    /// Associations held at once, in every state: a new peer beyond it is refused
    /// ([`ProtocolError::AtCapacity`]) before any SPI or state exists for it.
    pub max_associations: usize,
    /// Our UDP port for HIP over UDP (the source of what we initiate over UDP).
    pub udp_port: u16,
    /// Interval of the NAT keepalives on an association over UDP: a signed NOTIFY of
    /// type NAT_KEEPALIVE (RFC 9028 §4.10: every 15 s, never more often; §5.3 format).
    pub udp_keepalive: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dh_groups: DhGroup::ALL.to_vec(),
            hip_ciphers: HipCipher::DEFAULT.to_vec(),
            esp_suites: EspSuite::DEFAULT.to_vec(),
            hit_suites: vec![
                HitSuite::EcdsaSha384,
                HitSuite::RsaDsaSha256,
                HitSuite::EddsaCshake128,
            ],
            // RFC 7401 §7: "If a Responder is not under high load, #K SHOULD be 0."
            puzzle_difficulty: 0,
            puzzle_lifetime: 37,
            max_puzzle_difficulty: 28,
            puzzle_max_attempts: 1 << 26,
            encrypt_host_id: false,
            send_r1_counter: false,
            r1_pool_size: 1,
            r1_generation_lifetime: Duration::from_secs(600),
            rto_initial: Duration::from_secs(1),
            rto_max: Duration::from_secs(16),
            i1_retries: 5,
            i2_retries: 5,
            close_retries: 5,
            update_retries: 5,
            probe_retries: 3,
            r2_sent_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(30),
            opportunistic: true,
            r1_rate_per_address: 10,
            r1_burst_per_address: 20,
            r1_rate_unexpected: 500,
            r1_burst_unexpected: 1000,
            r1_rate_expected: 10,
            r1_burst_expected: 20,
            max_associations: 4096,
            udp_port: HIP_UDP_PORT,
            udp_keepalive: Duration::from_secs(15),
        }
    }
}

impl Config {
    fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |s: &str| Err(ProtocolError::Config(s.to_owned()));
        if self.dh_groups.is_empty() {
            return bad("no DH group");
        }
        if self.hip_ciphers.is_empty() {
            return bad("no HIP cipher");
        }
        if self.esp_suites.is_empty() {
            return bad("no ESP transform");
        }
        if self.hit_suites.is_empty() {
            return bad("no HIT suite");
        }
        if self.r1_pool_size == 0 || self.r1_pool_size > 256 {
            return bad("r1_pool_size must be 1..=256");
        }
        if self.max_associations == 0 {
            return bad("max_associations must be at least 1");
        }
        Ok(())
    }
}

/// The UDP port HIP over UDP uses (RFC 9028 §4.1, IANA "hip-nat-t"), for control
/// packets and UDP-encapsulated ESP alike.
pub const HIP_UDP_PORT: u16 = 10500;

/// The UDP ports of a HIP path that runs over UDP (RFC 9028 §4.1; RFC 5770 §4.1
/// "UDP-ENCAPSULATION" mode): ours, and the peer's as seen on the wire — behind a NAT,
/// the port the NAT mapped it to, never what the peer believes its own port is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpPorts {
    /// Our port.
    pub local: u16,
    /// The peer's port.
    pub peer: u16,
}

/// Where a peer is reached when we initiate: its address and, for HIP over UDP, its UDP
/// port. An `IpAddr` converts into a raw-HIP locator (IP protocol 139), a `SocketAddr`
/// into a UDP one; our own UDP port is [`Config::udp_port`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerLocator {
    /// The peer's address.
    pub addr: IpAddr,
    /// The peer's UDP port; `None`: raw HIP.
    pub udp_port: Option<u16>,
}

impl From<IpAddr> for PeerLocator {
    fn from(addr: IpAddr) -> Self {
        Self {
            addr,
            udp_port: None,
        }
    }
}

impl From<SocketAddr> for PeerLocator {
    fn from(s: SocketAddr) -> Self {
        Self {
            addr: s.ip(),
            udp_port: Some(s.port()),
        }
    }
}

/// A datagram to send: the HIP packet (checksum filled in) and its IP addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Source locator (ours).
    pub src: IpAddr,
    /// Destination locator.
    pub dst: IpAddr,
    /// `None`: send as IP protocol 139. `Some`: send over UDP from `local` to `peer`,
    /// the payload behind the 32-bit zero non-ESP marker (RFC 9028 §4.1).
    pub udp: Option<UdpPorts>,
    /// The HIP packet.
    pub payload: Vec<u8>,
}

impl Transmit {
    /// Frames `payload` for its transport: over raw IP the HIP checksum covers the
    /// pseudo-header of `src` → `dst` (RFC 7401 §5.1.1); over UDP it is zero (RFC 5770
    /// §5.1, kept by RFC 9028 §4.1: the UDP checksum protects the packet, and a NAT on
    /// the path rewrites the addresses a HIP checksum would cover).
    pub(crate) fn framed(
        src: IpAddr,
        dst: IpAddr,
        udp: Option<UdpPorts>,
        mut payload: Vec<u8>,
    ) -> Self {
        match udp {
            None => wire::set_checksum(&mut payload, src, dst),
            Some(_) => {
                if let Some(c) = payload.get_mut(4..6) {
                    c.fill(0);
                }
            }
        }
        Self {
            src,
            dst,
            udp,
            payload,
        }
    }

    /// The packet type (from the payload).
    pub fn packet_type(&self) -> Option<PacketType> {
        self.payload.get(2).and_then(|t| PacketType::from_u8(*t))
    }
}

/// Everything the kernel layer needs once a base exchange has completed.
#[derive(Clone, Debug)]
pub struct Established {
    /// Our HIT.
    pub local_hit: Hit,
    /// The peer's HIT (verified: its HI hashes to it and it signed the exchange).
    pub peer_hit: Hit,
    /// The peer's Host Identity.
    pub peer_hi: HostId,
    /// Our locator.
    pub local_locator: IpAddr,
    /// The peer's locator.
    pub peer_locator: IpAddr,
    /// `Some` when the association runs over UDP (its ESP then goes UDP-encapsulated
    /// between the same ports, RFC 9028 §5).
    pub udp: Option<UdpPorts>,
    /// Whether we initiated.
    pub initiator: bool,
    /// The negotiated ESP transform (RFC 7402 suite ID via [`EspSuite::id`]).
    pub esp_suite: EspSuite,
    /// SPI of the inbound SA (ours, allocated by the [`SpiAllocator`]).
    pub spi_inbound: u32,
    /// SPI of the outbound SA (the peer's).
    pub spi_outbound: u32,
    /// Keys of the inbound SA (peer → us).
    pub keys_inbound: EspKeys,
    /// Keys of the outbound SA (us → peer).
    pub keys_outbound: EspKeys,
    /// KEYMAT, for drawing further keys on rekeying.
    pub keymat: Keymat,
    /// KEYMAT index after the ESP keys drawn here.
    pub keymat_index: usize,
    /// The negotiated DH group.
    pub dh_group: DhGroup,
    /// The negotiated HIP cipher.
    pub hip_cipher: HipCipher,
    /// When this exchange replaced an established association with the same peer (it
    /// rebooted, RFC 7401 §6.9 step 20): the (inbound, outbound) SPIs of the old SA pair,
    /// to remove.
    pub replaced_spis: Option<(u32, u32)>,
}

/// Outputs other than datagrams.
#[derive(Clone, Debug)]
pub enum Event {
    /// A base exchange completed (for a responder: when R2 is sent).
    Established(Box<Established>),
    /// An exchange failed (E-FAILED). For an expected-HIT mismatch, `error` is
    /// [`ProtocolError::HitMismatch`].
    Failed {
        /// The peer HIT, when known.
        peer_hit: Option<Hit>,
        /// The peer locator.
        peer_locator: IpAddr,
        /// Why.
        error: ProtocolError,
    },
    /// An association was closed (CLOSE/CLOSE_ACK, or the CLOSE retransmissions ran out).
    Closed {
        /// The peer.
        peer_hit: Hit,
        /// Whether the peer sent the CLOSE.
        by_peer: bool,
    },
    /// The ESP SAs are being rekeyed (UPDATE with ESP_INFO, RFC 7402 §3.3.2): install the
    /// new pair now. Its outbound SA is to be used at once when
    /// [`Rekeyed::outbound_active`]; otherwise (we answered the peer's rekey) only from
    /// [`Event::RekeyCompleted`] on.
    Rekeyed(Box<Rekeyed>),
    /// A rekey completed on both sides (RFC 7402 §6.8: parameters sent, peer's received,
    /// our UPDATE acknowledged): use the new outbound SA; the old pair may be removed.
    RekeyCompleted {
        /// The peer.
        peer_hit: Hit,
        /// The replaced inbound SPI.
        old_spi_inbound: u32,
        /// The replaced outbound SPI.
        old_spi_outbound: u32,
    },
    /// The locators in use changed (RFC 8046): ours after the peer acknowledged our
    /// LOCATOR_SET, the peer's after its new address answered our echo request.
    LocatorsChanged {
        /// The peer.
        peer_hit: Hit,
        /// Our locator now.
        local_locator: IpAddr,
        /// The peer's locator now.
        peer_locator: IpAddr,
        /// The UDP ports now, when the association runs over UDP (a NAT's rebinding
        /// changes only these).
        udp: Option<UdpPorts>,
    },
    /// An UPDATE was retransmitted without answer and given up; the association stays.
    UpdateFailed {
        /// The peer.
        peer_hit: Hit,
        /// The new inbound SPI of an abandoned rekey (already given back to the
        /// [`SpiAllocator`]).
        abandoned_spi: Option<u32>,
    },
    /// A liveness check ([`Endpoint::probe`]) went unanswered: the peer lost its state
    /// or is gone. The association is forgotten (nothing is sent); its SAs are to be
    /// removed, and a new base exchange is needed to talk to the peer again.
    PeerUnreachable {
        /// The peer.
        peer_hit: Hit,
    },
    /// A NOTIFY arrived.
    Notified {
        /// Sender HIT.
        peer_hit: Hit,
        /// Notify Message Type.
        msg_type: u16,
        /// Notification Data.
        data: Vec<u8>,
        /// Whether its signature was verified with a known HI of the sender.
        verified: bool,
    },
}

/// Supplies the SPI of each new inbound ESP SA.
pub trait SpiAllocator: Send {
    /// Allocates an SPI for an inbound SA from `peer_hit` (the agent calls the kernel's
    /// `XFRM_MSG_ALLOCSPI`).
    fn allocate(
        &mut self,
        local_hit: Hit,
        peer_hit: Hit,
        peer_locator: IpAddr,
    ) -> Result<u32, String>;
    /// Returns an SPI that will not be used (the exchange failed).
    fn release(&mut self, _spi: u32) {}
}

/// A deterministic allocator for tests and in-process use: 0x1000_0000, 0x1000_0001, …
#[derive(Debug, Clone)]
pub struct SequentialSpis(pub u32);

impl Default for SequentialSpis {
    fn default() -> Self {
        SequentialSpis(0x1000_0000)
    }
}

impl SpiAllocator for SequentialSpis {
    fn allocate(&mut self, _: Hit, _: Hit, _: IpAddr) -> Result<u32, String> {
        let s = self.0;
        self.0 = self.0.wrapping_add(1).max(256);
        Ok(s)
    }
}

/// Decides whether an initiator (its verified HIT and HI) may associate with us.
pub trait PeerPolicy: Send {
    /// `true` to accept.
    fn accept(&self, peer_hit: &Hit, peer_hi: &HostId) -> bool;
    /// Whether I1s from `peer_hit` are expected (a call we answered, a known peer): they
    /// are answered in a lane of their own, ahead of unexpected initiators, so that a
    /// flood of I1s cannot starve them (RFC 7401 §4.1.1 leaves the means to the host).
    fn expected(&self, _peer_hit: &Hit) -> bool {
        false
    }
}

/// Accepts every initiator (opportunistic).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl PeerPolicy for AcceptAll {
    fn accept(&self, _: &Hit, _: &HostId) -> bool {
        true
    }
}

impl<F: Fn(&Hit, &HostId) -> bool + Send> PeerPolicy for F {
    fn accept(&self, h: &Hit, hi: &HostId) -> bool {
        self(h, hi)
    }
}

/// Counters of what the endpoint refused or dropped without an error to a caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// I1s not answered: the per-address R1 rate was exceeded.
    pub r1_rate_limited_address: u64,
    /// I1s not answered: the budget for unexpected initiators was spent.
    pub r1_rate_limited_unexpected: u64,
    /// I1s not answered: an expected initiator's own lane was exceeded.
    pub r1_rate_limited_expected: u64,
    /// R1s sent to expected initiators.
    pub r1_sent_expected: u64,
    /// R1s sent to other initiators.
    pub r1_sent_unexpected: u64,
    /// New peers refused because the association table was full.
    pub refused_at_capacity: u64,
    /// NOTIFYs dropped because nothing could verify them.
    pub unverified_notify: u64,
    /// Verified NAT keepalives received (RFC 9028 §5.3); a forged one fails its
    /// signature and counts as a drop instead.
    pub keepalives_received: u64,
    /// NAT keepalives sent.
    pub keepalives_sent: u64,
}

/// An endpoint's R1 pool at one moment, for [`Endpoint::reset`].
#[derive(Clone)]
pub struct Snapshot {
    pool: R1Pool,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

/// A boxed RNG.
pub type BoxRng = Box<dyn CryptoRng + Send>;

/// The HIP endpoint: our identity, the associations keyed by peer HIT, the R1 pool.
pub struct Endpoint {
    config: Config,
    identity: HostIdentity,
    hi_param: wire::Param,
    rng: BoxRng,
    spis: Box<dyn SpiAllocator>,
    policy: Box<dyn PeerPolicy>,
    assocs: HashMap<Hit, Assoc>,
    /// Opportunistic initiations (peer HIT unknown until R1), keyed by peer locator.
    opportunistic: HashMap<IpAddr, Assoc>,
    pool: R1Pool,
    r1_limiter: ratelimit::Limiter<IpAddr>,
    r1_expected: ratelimit::Limiter<Hit>,
    r1_unexpected: ratelimit::Limiter<()>,
    stats: Stats,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// The UDP ports of the packet being handled (set only inside
    /// [`Endpoint::handle_udp_packet`]): where stateless answers (R1, NOTIFY) and new
    /// responder associations go.
    rx_udp: Option<UdpPorts>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("hit", &self.identity.hit())
            .field("associations", &self.assocs.len())
            .finish()
    }
}

impl Endpoint {
    /// Creates an endpoint and precomputes its R1 pool.
    pub fn new(
        config: Config,
        identity: HostIdentity,
        mut rng: BoxRng,
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        config.validate()?;
        let suite = identity.host_id().hit_suite();
        crate::crypto::Rhash::for_suite(suite)?;
        let hid = identity.host_id();
        let hi_param = wire::Param::HostId {
            algorithm: hid.algorithm() as u16,
            hi: hid.to_hi_bytes(),
            di_type: 0,
            di: Vec::new(),
        };
        let pool = R1Pool::new(&config, &identity, &hi_param, &mut *rng, now)?;
        Ok(Self {
            config,
            identity,
            hi_param,
            rng,
            spis: Box::new(SequentialSpis::default()),
            policy: Box::new(AcceptAll),
            assocs: HashMap::new(),
            opportunistic: HashMap::new(),
            pool,
            r1_limiter: ratelimit::Limiter::default(),
            r1_expected: ratelimit::Limiter::default(),
            r1_unexpected: ratelimit::Limiter::default(),
            stats: Stats::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            rx_udp: None,
        })
    }

    /// What [`Endpoint::reset`] returns to: the R1 pool as it is now (its DH keys, puzzle
    /// secret and signed R1s). Take it right after [`Endpoint::new`].
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pool: self.pool.clone(),
        }
    }

    /// Returns to the state of `snap`, as if the endpoint had just been created with that
    /// pool and `rng`: every association, queued transmit and event, rate-limit bucket and
    /// counter is forgotten; identity, configuration, SPI allocator and policy stay.
    /// Simulations and the fuzz targets run many sessions on one endpoint this way
    /// without paying for the pool's signatures and DH keys each time.
    pub fn reset(&mut self, snap: &Snapshot, rng: BoxRng) {
        self.pool = snap.pool.clone();
        self.rng = rng;
        self.assocs.clear();
        self.opportunistic.clear();
        self.r1_limiter = ratelimit::Limiter::default();
        self.r1_expected = ratelimit::Limiter::default();
        self.r1_unexpected = ratelimit::Limiter::default();
        self.stats = Stats::default();
        self.transmits.clear();
        self.events.clear();
    }

    /// Replaces the SPI allocator.
    pub fn set_spi_allocator(&mut self, a: Box<dyn SpiAllocator>) {
        self.spis = a;
    }

    /// Replaces the policy deciding which initiators may associate.
    pub fn set_policy(&mut self, p: Box<dyn PeerPolicy>) {
        self.policy = p;
    }

    /// Our HIT.
    pub fn hit(&self) -> Hit {
        self.identity.hit()
    }

    /// Our identity.
    pub fn identity(&self) -> &HostIdentity {
        &self.identity
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The state of the association with `peer`, if any.
    pub fn state(&self, peer: &Hit) -> Option<State> {
        self.assocs.get(peer).map(|a| a.state)
    }

    /// Whether we initiated the association with `peer`.
    pub fn is_initiator(&self, peer: &Hit) -> Option<bool> {
        self.assocs.get(peer).map(|a| a.initiator)
    }

    /// The current R1 generation counter (sent in R1_COUNTER with
    /// [`Config::send_r1_counter`]).
    pub fn r1_generation(&self) -> u64 {
        self.pool.counter()
    }

    /// Associations over UDP: each peer, its ports, and how long ago its last verified
    /// NAT keepalive arrived (`None`: none yet).
    pub fn udp_paths(&self, now: Instant) -> Vec<(Hit, UdpPorts, Option<Duration>)> {
        self.assocs
            .iter()
            .filter_map(|(h, a)| {
                let age = a.keepalive_seen.map(|t| now.saturating_duration_since(t));
                a.udp.map(|u| (*h, u, age))
            })
            .collect()
    }

    /// Number of associations (all states, opportunistic ones included).
    pub fn association_count(&self) -> usize {
        self.assocs.len() + self.opportunistic.len()
    }

    /// What was refused or dropped so far (see [`Stats`]).
    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn check_capacity(&mut self) -> Result<(), ProtocolError> {
        if self.association_count() >= self.config.max_associations {
            self.stats.refused_at_capacity += 1;
            return Err(ProtocolError::AtCapacity);
        }
        Ok(())
    }

    /// Starts a base exchange with the host at `peer_locator`, sending I1 from
    /// `local_locator`. With `expected_peer_hit`, the I1 is addressed to that HIT and the
    /// exchange aborts with [`ProtocolError::HitMismatch`] unless the responder's HI
    /// hashes to it; without, the I1 goes to the null HIT (opportunistic mode).
    ///
    /// `peer` is an address (raw HIP) or, for HIP over UDP, a socket address (our source
    /// port is then [`Config::udp_port`]); the association keeps that transport.
    pub fn initiate(
        &mut self,
        now: Instant,
        local_locator: IpAddr,
        peer: impl Into<PeerLocator>,
        expected_peer_hit: Option<Hit>,
    ) -> Result<(), ProtocolError> {
        let peer = peer.into();
        let peer_locator = peer.addr;
        if let Some(h) = expected_peer_hit {
            if let Some(a) = self.assocs.get(&h)
                && !matches!(a.state, State::Closed | State::EFailed)
            {
                return Err(ProtocolError::AlreadyAssociated(h));
            }
        } else if self.opportunistic.contains_key(&peer_locator) {
            return Err(ProtocolError::AlreadyAssociated(Hit::ZERO));
        }
        if expected_peer_hit.is_none_or(|h| !self.assocs.contains_key(&h)) {
            self.check_capacity()?;
        }
        let mut a = Assoc::new_initiator(
            &self.config,
            self.hit(),
            expected_peer_hit,
            local_locator,
            peer_locator,
            self.udp_for(peer),
        );
        let i1 = a.build_i1(&self.config);
        a.send_reliably(now, &self.config, i1, &mut self.transmits);
        match expected_peer_hit {
            Some(h) => {
                self.assocs.insert(h, a);
            }
            None => {
                self.opportunistic.insert(peer_locator, a);
            }
        }
        Ok(())
    }

    /// Like [`Endpoint::initiate`] with an expected HIT, but the I1 goes to the null HIT
    /// (RFC 7401 §4.1.8) and the expectation is checked on R1: a host at `peer_locator`
    /// that is not `expected` still answers, and the exchange fails at once with
    /// [`ProtocolError::HitMismatch`] — before any I2, SPI or key exists — instead of the
    /// I1 going unanswered until its retries run out. This is how the agent enforces a
    /// HIT learned through SIP when a proxy may have rewritten it (the draft's §4).
    pub fn initiate_expecting(
        &mut self,
        now: Instant,
        local_locator: IpAddr,
        peer: impl Into<PeerLocator>,
        expected_peer_hit: Hit,
    ) -> Result<(), ProtocolError> {
        self.initiate_expecting_any(now, local_locator, peer, &[expected_peer_hit])
    }

    /// [`Endpoint::initiate_expecting`] for a peer whose signalling named several HITs (an
    /// SDP may carry more than one): one I1 to the null HIT, and the R1 is accepted if the
    /// responder's HI hashes to any of `expected`. A wrong HIT placed before the real one
    /// thus costs nothing, and no second exchange has to wait for the first to fail.
    pub fn initiate_expecting_any(
        &mut self,
        now: Instant,
        local_locator: IpAddr,
        peer: impl Into<PeerLocator>,
        expected: &[Hit],
    ) -> Result<(), ProtocolError> {
        let peer = peer.into();
        let peer_locator = peer.addr;
        let Some(&first) = expected.first() else {
            return Err(ProtocolError::Config("no expected peer HIT".into()));
        };
        for h in expected {
            if let Some(a) = self.assocs.get(h)
                && !matches!(a.state, State::Closed | State::EFailed)
            {
                return Err(ProtocolError::AlreadyAssociated(*h));
            }
        }
        // A failed or closed opportunistic attempt at this locator only lingers: a new
        // initiation replaces it (it must not wedge the locator for the linger time).
        if let Some(a) = self.opportunistic.get(&peer_locator) {
            if !matches!(a.state, State::Closed | State::EFailed) {
                return Err(ProtocolError::AlreadyAssociated(Hit::ZERO));
            }
            self.opportunistic.remove(&peer_locator);
        }
        self.check_capacity()?;
        let mut a = Assoc::new_initiator(
            &self.config,
            self.hit(),
            Some(first),
            local_locator,
            peer_locator,
            self.udp_for(peer),
        );
        a.expected = expected.to_vec();
        // Addressed to the null HIT; `expected` stays set for the R1 check.
        a.peer_hit = Hit::ZERO;
        let i1 = a.build_i1(&self.config);
        a.send_reliably(now, &self.config, i1, &mut self.transmits);
        self.opportunistic.insert(peer_locator, a);
        Ok(())
    }

    fn udp_for(&self, peer: PeerLocator) -> Option<UdpPorts> {
        peer.udp_port.map(|p| UdpPorts {
            local: self.config.udp_port,
            peer: p,
        })
    }

    /// Abandons a base exchange we initiated that has not completed (I1-SENT or
    /// I2-SENT), with `peer` or, for an I1 sent to the null HIT, towards `peer_locator`:
    /// nothing is sent (the peer holds no state for us before R2), retransmissions stop,
    /// and the inbound SPI goes back to the allocator. Returns whether anything was
    /// abandoned. A call that is hung up while its exchange runs uses this, so that the
    /// next call to the same peer does not find it "already associated".
    pub fn abandon_initiation(&mut self, peer: Option<Hit>, peer_locator: Option<IpAddr>) -> bool {
        let in_progress =
            |a: &Assoc| a.initiator && matches!(a.state, State::I1Sent | State::I2Sent);
        let mut done = false;
        if let Some(h) = peer
            && self.assocs.get(&h).is_some_and(in_progress)
            && let Some(mut a) = self.assocs.remove(&h)
        {
            if let Some(spi) = a.spi_in.take() {
                self.spis.release(spi);
            }
            done = true;
        }
        if let Some(l) = peer_locator
            && self
                .opportunistic
                .get(&l)
                .is_some_and(|a| in_progress(a) && peer.is_none_or(|h| a.expected.contains(&h)))
        {
            self.opportunistic.remove(&l);
            done = true;
        }
        done
    }

    /// Closes the association with `peer` (CLOSE, RFC 7401 §5.3.7).
    pub fn close(&mut self, now: Instant, peer: Hit) -> Result<(), ProtocolError> {
        let Some(a) = self.assocs.get_mut(&peer) else {
            return Err(ProtocolError::NoAssociation(peer));
        };
        match a.state {
            State::Established | State::R2Sent => {
                let pkt = a.build_close(&self.identity, &mut *self.rng)?;
                a.state = State::Closing;
                a.retries = 0;
                a.rto = self.config.rto_initial;
                a.send_reliably(now, &self.config, pkt, &mut self.transmits);
                Ok(())
            }
            State::I1Sent | State::I2Sent => {
                // Nothing to tell the peer yet: abandon the exchange.
                if let Some(spi) = a.spi_in.take() {
                    self.spis.release(spi);
                }
                self.assocs.remove(&peer);
                Ok(())
            }
            s => Err(ProtocolError::Unexpected {
                packet_type: PacketType::Close,
                state: s,
            }),
        }
    }

    /// Forgets the association with `peer` at once, sending nothing (for a local failure,
    /// e.g. the kernel refused its SAs). Its inbound SPI goes back to the allocator.
    pub fn abort(&mut self, peer: Hit) -> Result<(), ProtocolError> {
        let mut a = self
            .assocs
            .remove(&peer)
            .ok_or(ProtocolError::NoAssociation(peer))?;
        if let Some(spi) = a.spi_in.take() {
            self.spis.release(spi);
        }
        Ok(())
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.assocs
            .values()
            .flat_map(|a| [a.timer, a.keepalive])
            .flatten()
            .chain(self.opportunistic.values().filter_map(|a| a.timer))
            .chain(std::iter::once(self.pool.next_rotation(&self.config)))
            .min()
    }

    /// Advances timers: retransmissions, R2-SENT → ESTABLISHED, forgetting closed and
    /// failed associations, R1 pool rotation.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.pool.next_rotation(&self.config) {
            // Should signing fail inside the crypto library, the current generation stays
            // in use: answering with older R1s beats not answering.
            let _ = self.pool.rotate(
                &self.config,
                &self.identity,
                &self.hi_param,
                &mut *self.rng,
                now,
            );
        }
        let mut gone = Vec::new();
        let mut release = Vec::new();
        for (k, a) in self.assocs.iter_mut() {
            if a.keepalive.is_some_and(|t| t <= now)
                && a.send_keepalive(now, &self.config, &self.identity, &mut self.transmits)
            {
                self.stats.keepalives_sent += 1;
            }
            if a.timer.is_some_and(|t| t <= now)
                && a.on_timer(
                    now,
                    &self.config,
                    &mut self.transmits,
                    &mut self.events,
                    &mut release,
                )
            {
                gone.push(*k);
            }
        }
        for k in gone {
            if let Some(mut a) = self.assocs.remove(&k)
                && let Some(spi) = a.spi_in.take()
                && a.state != State::Closed
            {
                self.spis.release(spi);
            }
        }
        let mut gone = Vec::new();
        for (k, a) in self.opportunistic.iter_mut() {
            if a.timer.is_some_and(|t| t <= now)
                && a.on_timer(
                    now,
                    &self.config,
                    &mut self.transmits,
                    &mut self.events,
                    &mut release,
                )
            {
                gone.push(*k);
            }
        }
        for k in gone {
            self.opportunistic.remove(&k);
        }
        // SPIs of abandoned rekeys: reserved in the kernel, never to be used.
        for spi in release {
            self.spis.release(spi);
        }
    }

    /// Processes one received HIP packet from `src` to `dst`. `Err` tells why it was
    /// dropped; a dropped packet changes no state.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        src: IpAddr,
        dst: IpAddr,
        bytes: &[u8],
    ) -> Result<(), ProtocolError> {
        if !wire::verify_checksum(bytes, src, dst) {
            // A structurally broken packet reports its structural error first.
            Packet::parse(bytes)?;
            return Err(WireError::BadChecksum.into());
        }
        self.rx_udp = None;
        let pkt = Packet::parse(bytes)?;
        self.dispatch(now, src, dst, &pkt)
    }

    /// Processes one HIP packet received over UDP from `src` to `dst` (RFC 9028 §4.1),
    /// the non-ESP marker already removed. The HIP checksum must be zero (RFC 5770
    /// §5.1); answers and any association this packet creates use the same two ports.
    /// `Err` tells why it was dropped; a dropped packet changes no state.
    pub fn handle_udp_packet(
        &mut self,
        now: Instant,
        src: SocketAddr,
        dst: SocketAddr,
        bytes: &[u8],
    ) -> Result<(), ProtocolError> {
        let pkt = Packet::parse(bytes)?;
        if pkt.header.checksum != 0 {
            return Err(WireError::BadChecksum.into());
        }
        self.rx_udp = Some(UdpPorts {
            local: dst.port(),
            peer: src.port(),
        });
        let r = self.dispatch(now, src.ip(), dst.ip(), &pkt);
        self.rx_udp = None;
        r
    }

    fn dispatch(
        &mut self,
        now: Instant,
        src: IpAddr,
        dst: IpAddr,
        pkt: &Packet,
    ) -> Result<(), ProtocolError> {
        pkt.check_critical(assoc::KNOWN_PARAMS)?;
        match pkt.header.packet_type {
            PacketType::I1 => self.on_i1(now, src, dst, pkt),
            PacketType::R1 => self.on_r1(now, src, dst, pkt),
            PacketType::I2 => self.on_i2(now, src, dst, pkt),
            PacketType::R2 => self.on_r2(now, pkt),
            PacketType::Notify => self.on_notify(now, src, pkt),
            PacketType::Close => self.on_close(now, src, dst, pkt),
            PacketType::CloseAck => self.on_close_ack(now, pkt),
            PacketType::Update => self.on_update(now, src, dst, pkt),
        }
    }
}

/// Zeroizing byte vector alias.
pub(crate) type Secret = Zeroizing<Vec<u8>>;

#[cfg(test)]
mod tests;
