//! Types shared by the eBPF programs in `hip-ebpf` and the agent.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, and has **no implicit padding**
//! (explicit `_pad` fields instead, checked by the `const` assertions at the bottom):
//! the kernel copies map values byte for byte, so padding the compiler left
//! uninitialised would leak stack bytes into maps and make keys compare unequal. With
//! the `user` feature the types implement `aya::Pod` so the agent can use them in
//! typed aya maps.
//!
//! Addresses are 16 bytes in network byte order: IPv6 as is, IPv4 as an IPv4-mapped
//! IPv6 address (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2), so one map holds both families.
//!
//! Byte order: SPIs are kept in **host** byte order in keys and values; ports and SSRCs
//! too. The programs convert once when they parse a header.
#![no_std]

// ---------------------------------------------------------------------------------------
// Names in the object file (programs and maps). The maps are pinned under the pin
// directory by these names, so `bpftool map dump pinned /sys/fs/bpf/hip/HIP_FLOWS` works.
// ---------------------------------------------------------------------------------------

/// Per-direction packet/byte counters of every packet the programs see
/// (`PERCPU_ARRAY` indexed by [`Direction`]).
pub const MAP_IFACE_STATS: &str = "HIP_IFACE_STATS";
/// Datapath counters (`PERCPU_ARRAY<u64>` indexed by [`Stat`]).
pub const MAP_STATS: &str = "HIP_STATS";
/// The one-entry configuration array ([`Config`]).
pub const MAP_CONFIG: &str = "HIP_CONFIG";
/// Associations: peer HIT ([`Addr`]) → [`Association`]. Written by the agent only.
pub const MAP_ASSOCS: &str = "HIP_ASSOCS";
/// Reverse index for the media guard: peer locator ([`Addr`]) → [`LocatorEntry`].
/// Written by the agent only, kept in step with [`MAP_ASSOCS`].
pub const MAP_LOCATORS: &str = "HIP_LOCATORS";
/// ESP SPIs: [`SpiKey`] → [`SpiSlot`], the index of the SPI's entries in
/// [`MAP_SPI_STATE`] and [`MAP_SPI_COUNTERS`]. Written by the agent only.
pub const MAP_SPIS: &str = "HIP_SPIS";
/// Per-SPI shared state ([`SpiEntry`], `ARRAY` of [`MAX_SPIS`] indexed by slot).
/// Seeded by the agent when it assigns the slot, then written by the programs.
pub const MAP_SPI_STATE: &str = "HIP_SPI_STATE";
/// Per-SPI counters ([`SpiStats`], `PERCPU_ARRAY` of [`MAX_SPIS`] indexed by slot):
/// per CPU so the programs count without atomics and without writing a line other
/// CPUs read; the agent sums the counts and takes the latest time.
pub const MAP_SPI_COUNTERS: &str = "HIP_SPI_COUNTERS";
/// The programs' per-CPU cache of [`MAP_SPIS`] ([`SpiCacheEntry`], `PERCPU_ARRAY` of
/// [`SPI_CACHE_SLOTS`]); entries are valid while their generation equals
/// [`Config::maps_gen`].
pub const MAP_SPI_CACHE: &str = "HIP_SPI_CACHE";
/// HIT-addressed RTP flows: [`FlowKey`] → [`FlowStats`] (`LRU_HASH`).
pub const MAP_FLOWS: &str = "HIP_FLOWS";
/// Media-guard drops per destination: [`Addr`] → [`GuardDrop`] (`LRU_HASH`).
pub const MAP_GUARD_DROPS: &str = "HIP_GUARD_DROPS";
/// Ring buffer of [`Event`]s for the agent.
pub const MAP_EVENTS: &str = "HIP_EVENTS";
/// The media guard's per-CPU cache of recent verdicts ([`GuardCacheEntry`],
/// `PERCPU_ARRAY` of [`GUARD_CACHE_SLOTS`]). Written by the egress program only;
/// entries are valid while their generation equals [`Config::maps_gen`].
pub const MAP_GUARD_CACHE: &str = "HIP_GUARD_CACHE";

/// Names of the tc programs in the object file.
pub const PROG_TC_INGRESS: &str = "hip_tc_ingress";
pub const PROG_TC_EGRESS: &str = "hip_tc_egress";
/// An empty tc program (returns `TC_ACT_OK`): the benchmark's baseline, never
/// attached by the agent.
pub const PROG_TC_FLOOR: &str = "hip_tc_floor";
/// The benchmark's probe, never attached by the agent: the operations of per-packet
/// flow accounting selected by the global [`PROBE_OPS_GLOBAL`] (`PROBE_*` bits), on a
/// table of its own. With [`PROBE_ALL`] it is the minimum a flow program costs.
pub const PROG_TC_PROBE: &str = "hip_tc_probe";
/// Name of the probe's `u32` global (set with `EbpfLoader::set_global`).
pub const PROBE_OPS_GLOBAL: &str = "PROBE_OPS";
/// Probe operation: `bpf_ktime_get_ns()`.
pub const PROBE_KTIME: u32 = 1;
/// Probe operation: `bpf_skb_get_xfrm_state()`.
pub const PROBE_XFRM: u32 = 2;
/// Probe operation: one `LRU_HASH` lookup with a 40-byte key taken from the frame.
pub const PROBE_LOOKUP: u32 = 4;
/// Probe operation (with [`PROBE_LOOKUP`]): two atomic adds on the value found.
pub const PROBE_ATOMICS: u32 = 8;
/// All probe operations: what flow accounting cannot do without.
pub const PROBE_ALL: u32 = PROBE_KTIME | PROBE_XFRM | PROBE_LOOKUP | PROBE_ATOMICS;

/// Directory under bpffs where the agent pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/hip";

/// Sizes of the maps.
pub const MAX_ASSOCS: u32 = 1024;
/// Two locators per association and some slack for the reverse index.
pub const MAX_LOCATOR_ENTRIES: u32 = 4 * MAX_ASSOCS;
/// Inbound and outbound SPIs of every association, plus one rekey's worth of both.
pub const MAX_SPIS: u32 = 4 * MAX_ASSOCS;
/// Flows are LRU: a full table evicts the least recently seen flow instead of
/// refusing new ones.
pub const MAX_FLOWS: u32 = 8192;
/// Destinations remembered by the media guard (LRU).
pub const MAX_GUARD_DROPS: u32 = 1024;
/// Ring buffer size in bytes (a power of two and a multiple of the page size).
pub const EVENTS_BYTES: u32 = 64 * 1024;
/// Slots of the guard's per-CPU verdict cache (direct-mapped by destination; a
/// power of two).
pub const GUARD_CACHE_SLOTS: u32 = 16;
/// Slots of the per-CPU SPI cache (direct-mapped by SPI and direction; a power of
/// two).
pub const SPI_CACHE_SLOTS: u32 = 16;
/// [`SpiCacheEntry::slot`] of an SPI that [`MAP_SPIS`] does not have (cached too, so
/// unknown SPIs cost no hash lookup either).
pub const SPI_SLOT_NONE: u32 = u32::MAX;

/// Locators kept per association (the preferred one first).
pub const MAX_LOCATORS: usize = 2;

/// The HIP-over-UDP port of RFC 9028 §4.1 (and [`Config::esp_udp_port`]'s default in
/// `hip-datapath`): HIP control packets behind a 32-bit zero non-ESP marker,
/// UDP-encapsulated ESP (RFC 3948 §2, the kernel's `UDP_ENCAP_ESPINUDP`) and 1-byte
/// 0xFF NAT keepalives share it.
pub const HIP_UDP_PORT: u16 = 10500;

/// RTP clock rate used when [`Config::clock_hz`] has none for a payload type:
/// 8000 Hz, the rate of PCMU/PCMA (RFC 3551 §4.5.14, §6 table 4).
pub const DEFAULT_CLOCK_HZ: u32 = 8000;

/// A 16-byte address: an IPv6 address, or an IPv4 address mapped into IPv6.
///
/// 8-byte aligned (every struct that holds one already places it at a multiple of 8,
/// so no layout changes): the programs copy and compare addresses as two 64-bit
/// words, and the verifier requires aligned stack accesses.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// The all-zero address (“none”).
    pub const UNSPECIFIED: Addr = Addr([0; 16]);

    /// Maps an IPv4 address (4 bytes, network order) into `::ffff:a.b.c.d`.
    pub const fn from_v4(a: [u8; 4]) -> Self {
        Addr([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ])
    }

    /// True for an IPv4-mapped address.
    pub const fn is_v4_mapped(&self) -> bool {
        let b = &self.0;
        b[0] == 0
            && b[1] == 0
            && b[2] == 0
            && b[3] == 0
            && b[4] == 0
            && b[5] == 0
            && b[6] == 0
            && b[7] == 0
            && b[8] == 0
            && b[9] == 0
            && b[10] == 0xff
            && b[11] == 0xff
    }

    /// True for a HIT: ORCHIDv2 `2001:20::/28` (RFC 7343 §6, used by HIPv2,
    /// RFC 7401 §3) or the legacy ORCHID `2001:10::/28` (RFC 4843, HIPv1).
    pub const fn is_hit(&self) -> bool {
        self.0[0] == 0x20
            && self.0[1] == 0x01
            && self.0[2] == 0x00
            && (self.0[3] & 0xf0 == 0x20 || self.0[3] & 0xf0 == 0x10)
    }
}

/// Index into [`MAP_IFACE_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// Number of entries of [`MAP_IFACE_STATS`].
pub const IFACE_STATS_ENTRIES: u32 = 2;

/// Packets and bytes seen by one tc program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Index into [`MAP_STATS`]: what the programs counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// ESP packets received for an SPI in [`MAP_SPIS`] (plain or UDP-encapsulated,
    /// here and in the three below).
    EspIn = 0,
    /// ESP packets received for an SPI the agent does not know.
    EspInUnknownSpi = 1,
    /// ESP packets sent for an SPI in [`MAP_SPIS`].
    EspOut = 2,
    /// ESP packets sent for an SPI the agent does not know.
    EspOutUnknownSpi = 3,
    /// Received HIT-addressed RTP packets accounted in [`MAP_FLOWS`].
    RtpIn = 4,
    /// Received HIT-addressed UDP packets that are not RTP (wrong port, version, RTCP).
    HitUdpNotRtp = 5,
    /// Clear-text RTP sent to a verified locator of an established association.
    GuardPassed = 6,
    /// Clear-text RTP dropped by the media guard.
    GuardDropped = 7,
    /// Packets whose IP/UDP/ESP headers claim more bytes than the packet has, or
    /// headers that are invalid (IPv4 IHL < 5), and datagrams on
    /// [`Config::esp_udp_port`] that are neither ESP (too short for its header and
    /// some payload), nor HIP, nor a keepalive: passed untouched, never RTP.
    Malformed = 8,
    /// Locator changes seen (ESP for a known SPI from a new outer address).
    LocatorChanges = 9,
    /// Events that did not fit into the ring buffer.
    EventsLost = 10,
    /// A new flow could not be inserted (only under map-update failure).
    FlowInsertFailed = 11,
    /// HIP control packets over UDP on [`Config::esp_udp_port`] (zero non-ESP marker,
    /// RFC 9028 §4.1; HIP's own NAT keepalives, NOTIFYs, among them), either
    /// direction: not ESP.
    EspUdpHip = 12,
    /// NAT keepalives (a 1-byte 0xFF payload, RFC 3948 §2.3) on
    /// [`Config::esp_udp_port`], either direction: not ESP.
    EspUdpKeepalive = 13,
}

/// Number of entries of [`MAP_STATS`].
pub const STATS_ENTRIES: u32 = 14;

/// Configuration written by the agent (the single entry of [`MAP_CONFIG`]).
///
/// A zeroed config (as the kernel creates it) means: media guard off, port range
/// empty (no packet is recognised as RTP), no UDP-encapsulated ESP, default clock
/// rate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Non-zero: the media guard drops clear-text RTP to unverified addresses.
    pub guard_enabled: u32,
    /// Media UDP port range, inclusive: a packet is RTP only if its source or
    /// destination port lies in it. Either port counts: on egress our own RTP source
    /// port is in the range while the destination port is whatever the peer's SDP
    /// said, and a guard keyed on the destination port alone would let a hostile SDP
    /// aim our media at a victim simply by choosing a port outside the range.
    pub port_min: u16,
    pub port_max: u16,
    /// Clock rate for payload types whose [`Config::clock_hz`] entry is 0.
    pub default_clock_hz: u32,
    /// Generation of the agent-written index maps ([`MAP_LOCATORS`], [`MAP_SPIS`]):
    /// the agent moves it on every change of either (after the change), which
    /// invalidates the programs' per-CPU caches of them ([`MAP_GUARD_CACHE`],
    /// [`MAP_SPI_CACHE`]). Successive values are successive Gray codes, so they
    /// differ in one bit: a program reading the field while the agent rewrites the
    /// config (a plain `memcpy` in `array_map_update_elem()`) sees the old or the
    /// new value, never a mix that could equal an older generation.
    pub maps_gen: u32,
    /// Our HIP-over-UDP port (RFC 9028; [`HIP_UDP_PORT`] by default in
    /// `hip-datapath`), 0 = no UDP-encapsulated ESP. A UDP datagram leaving from
    /// this port or arriving at it (the encapsulation socket's port; the peer's side
    /// may be any port a NAT mapped) is ESP when its payload is longer than the
    /// 8-byte ESP header and its first 32-bit word (the SPI) is not zero, the
    /// kernel's own test (`xfrm4_udp_encap_rcv()`, `xfrm6_udp_encap_rcv()`): counted
    /// per SPI like plain ESP, and never taken for RTP. A zero word is the non-ESP
    /// marker of a HIP control packet, a single 0xFF byte a NAT keepalive
    /// ([`Stat::EspUdpHip`], [`Stat::EspUdpKeepalive`]). Host order; next to the
    /// other fields every packet reads, in the first cache line.
    pub esp_udp_port: u16,
    pub _pad: [u8; 6],
    /// RTP clock rate per payload type 0..=127 (RFC 3551 §6 for the static ones;
    /// dynamic ones come from SDP `a=rtpmap`); 0 = use `default_clock_hz`.
    pub clock_hz: [u32; 128],
    /// Per payload type, the effective clock rate (the entry of `clock_hz`, or
    /// `default_clock_hz`) as a 32.32 fixed-point rate per nanosecond:
    /// `round(hz × 2³² / 10⁹)`. The programs turn nanoseconds into RTP timestamp units
    /// with one multiplication (`ns × mult >> 32`, exact modulo 2³² units, which is
    /// all the A.8 transit arithmetic needs) instead of two 64-bit divisions.
    pub clock_mult: [u64; 128],
}

/// One slot of [`MAP_GUARD_CACHE`]: the guard's verdict for one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCacheEntry {
    /// Destination address.
    pub dst: Addr,
    /// [`Config::maps_gen`] read *before* the lookup this verdict came from.
    pub gen_: u32,
    /// 1: pass (an ACTIVE locator of an ESTABLISHED association); 0: drop.
    pub pass: u8,
    /// 1 once the slot was filled (a zeroed slot matches nothing).
    pub valid: u8,
    pub _pad: [u8; 2],
}

impl Default for Config {
    fn default() -> Self {
        Self {
            guard_enabled: 0,
            port_min: 0,
            port_max: 0,
            default_clock_hz: DEFAULT_CLOCK_HZ,
            maps_gen: 0,
            esp_udp_port: 0,
            _pad: [0; 6],
            clock_hz: [0; 128],
            clock_mult: [clock_mult(DEFAULT_CLOCK_HZ); 128],
        }
    }
}

/// `round(hz × 2³² / 10⁹)`: see [`Config::clock_mult`].
pub const fn clock_mult(hz: u32) -> u64 {
    (((hz as u64) << 32) + 500_000_000) / 1_000_000_000
}

/// The next value of [`Config::maps_gen`]: the Gray code following `gen`.
pub const fn next_gray(gen_: u32) -> u32 {
    // Decode (prefix XOR), add one, encode.
    let mut n = gen_;
    let mut shift = 1;
    while shift < 32 {
        n ^= n >> shift;
        shift <<= 1;
    }
    let n = n.wrapping_add(1);
    n ^ (n >> 1)
}

/// HIP association state as the datapath needs it (RFC 7401 §4.4.2 states; only
/// `Established` enables the media guard's pass verdict).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AssocState {
    Unassociated = 0,
    I1Sent = 1,
    I2Sent = 2,
    R2Sent = 3,
    Established = 4,
    Closing = 5,
    Closed = 6,
}

impl AssocState {
    /// Parses the raw byte stored in the maps.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Unassociated,
            1 => Self::I1Sent,
            2 => Self::I2Sent,
            3 => Self::R2Sent,
            4 => Self::Established,
            5 => Self::Closing,
            6 => Self::Closed,
            _ => return None,
        })
    }
}

/// Verification state of a peer locator (RFC 8046 §5.2 / RFC 5206: a locator is
/// UNVERIFIED until a return-routability check succeeds, then ACTIVE; DEPRECATED
/// ones are no longer used for new traffic).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocatorState {
    None = 0,
    Unverified = 1,
    Active = 2,
    Deprecated = 3,
}

impl LocatorState {
    /// Parses the raw byte stored in the maps.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::Unverified,
            2 => Self::Active,
            3 => Self::Deprecated,
            _ => return None,
        })
    }
}

/// Value of [`MAP_ASSOCS`], keyed by the peer's HIT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Association {
    /// Our HIT in this association.
    pub local_hit: Addr,
    /// Peer locators, preferred first; unused slots are [`Addr::UNSPECIFIED`].
    pub locators: [Addr; MAX_LOCATORS],
    /// SPI of the inbound SA (chosen by us), host order.
    pub spi_in: u32,
    /// SPI of the outbound SA (chosen by the peer), host order.
    pub spi_out: u32,
    /// [`AssocState`] as a byte.
    pub state: u8,
    /// [`LocatorState`] of each entry of `locators`.
    pub locator_state: [u8; MAX_LOCATORS],
    pub _pad: [u8; 5],
}

/// Value of [`MAP_LOCATORS`]: what the media guard needs about one peer locator.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocatorEntry {
    /// The association this locator belongs to.
    pub peer_hit: Addr,
    /// Outbound SPI of that association, host order.
    pub spi_out: u32,
    /// [`LocatorState`] of this locator.
    pub state: u8,
    /// [`AssocState`] of the association.
    pub assoc_state: u8,
    pub _pad: [u8; 2],
}

/// Direction of an SPI in [`SpiKey`].
pub const SPI_DIR_IN: u32 = 0;
/// Direction of an SPI in [`SpiKey`].
pub const SPI_DIR_OUT: u32 = 1;

/// Key of [`MAP_SPIS`]. The direction is part of the key because the peer chooses our
/// outbound SPI and may pick the same number as one of our inbound ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpiKey {
    /// SPI in host order.
    pub spi: u32,
    /// [`SPI_DIR_IN`] or [`SPI_DIR_OUT`].
    pub dir: u32,
}

/// Value of [`MAP_SPIS`]: where the SPI's state and counters live.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpiSlot {
    /// Index into [`MAP_SPI_STATE`] and [`MAP_SPI_COUNTERS`] (< [`MAX_SPIS`]).
    pub slot: u32,
    pub _pad: u32,
}

/// Value of [`MAP_SPI_STATE`]: what CPUs share about one SPI.
///
/// The agent writes it (`last_src` = the peer's preferred locator) and zeroes the
/// slot's counters before it publishes the slot in [`MAP_SPIS`]; from then on only
/// the programs write it. On rekey the agent gives the new SPI a fresh slot and
/// deletes the old SPI; it reuses a freed slot only after every other slot (a CPU
/// may still count a packet on a slot it found just before the delete).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpiEntry {
    /// The association's peer HIT.
    pub peer_hit: Addr,
    /// Outer source address of the last inbound ESP packet (inbound SPIs only).
    pub last_src: Addr,
    /// Number of locator changes seen on this SPI.
    pub locator_changes: u64,
    /// Sequence lock over `last_src` (even: stable; odd: a program is rewriting it).
    /// The program that moves it from even to odd with a compare-and-swap is the
    /// only one to report a locator change, so two CPUs seeing the same new source
    /// at once report it once. The agent creates entries with 0.
    pub src_seq: u64,
}

/// Value of [`MAP_SPI_COUNTERS`] (one per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpiStats {
    pub packets: u64,
    /// Bytes of the outer packets, as the tc program sees them (with L2 header).
    pub bytes: u64,
    /// CLOCK_MONOTONIC of this CPU's last packet at tick resolution
    /// (`bpf_ktime_get_coarse_ns()`, 1/CONFIG_HZ, read once per jiffy and CPU: up to
    /// one more tick behind).
    pub last_seen_ns: u64,
}

/// One slot of [`MAP_SPI_CACHE`]: what [`MAP_SPIS`] said about one SPI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpiCacheEntry {
    pub spi: u32,
    pub dir: u32,
    /// The SPI's slot, or [`SPI_SLOT_NONE`].
    pub slot: u32,
    /// [`Config::maps_gen`] read *before* the lookup this entry came from.
    pub gen_: u32,
    /// 1 once the slot was filled (a zeroed slot matches nothing).
    pub valid: u32,
    pub _pad: u32,
}

/// Key of [`MAP_FLOWS`]: one RTP stream between two HITs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_hit: Addr,
    pub dst_hit: Addr,
    /// UDP ports, host order.
    pub src_port: u16,
    pub dst_port: u16,
    /// RTP synchronisation source (RFC 3550 §5.1), host order.
    pub ssrc: u32,
}

/// The flow's SPI and locator came from the packet's XFRM state
/// (`bpf_skb_get_xfrm_state`): it was really decrypted from ESP.
pub const FLOW_VIA_XFRM: u8 = 1;
/// The flow's SPI and locator came from the association map (no XFRM state on the
/// packet, e.g. HIT-addressed traffic on a link without ESP).
pub const FLOW_VIA_ASSOC: u8 = 2;

/// Value of [`MAP_FLOWS`]: receive statistics of one RTP stream (RFC 3550 §6.4.1
/// and Appendix A.1, A.3, A.8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// RTP packets received (duplicates included, as RFC 3550 A.3 counts them).
    pub packets: u64,
    /// Bytes of the inner IP packets (from the IP header on).
    pub bytes: u64,
    /// Cumulative packets lost: expected − received (RFC 3550 A.3); negative with
    /// duplicates.
    pub lost: i64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first and last packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Interarrival jitter per RFC 3550 A.8, in RTP timestamp units × 16 (four
    /// fractional bits, exactly the `rtp->jitter` variable of A.8): divide by 16 for
    /// timestamp units, by 16 × clock rate for seconds.
    pub jitter_q4: u32,
    /// Relative transit time of the last packet (A.8 `rtp->transit`), as `i32` bits.
    pub transit: u32,
    /// Extended (with cycle count) sequence number of the first packet, A.1 `base_seq`.
    pub base_seq: u32,
    /// Extended highest sequence number received, A.1 `cycles | max_seq`.
    pub max_seq: u32,
    /// Clock rate used for the jitter (Hz).
    pub clock_hz: u32,
    /// SPI (host order) of the SA the packets were decrypted with; 0 if unknown.
    pub spi: u32,
    /// Outer source address (peer locator) the packets came from; zero if unknown.
    pub locator: Addr,
    /// RTP payload type of the last packet.
    pub payload_type: u8,
    /// [`FLOW_VIA_XFRM`] or [`FLOW_VIA_ASSOC`] or 0.
    pub via: u8,
    pub _pad: [u8; 6],
}

/// Value of [`MAP_GUARD_DROPS`]: clear-text RTP dropped towards one destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardDrop {
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// [`Event::kind`]: ESP for a known inbound SPI arrived from a new outer address.
pub const EVENT_LOCATOR_CHANGE: u32 = 1;
/// [`Event::kind`]: the media guard dropped its first packet towards a destination
/// (later drops are summed in [`MAP_GUARD_DROPS`] without an event).
pub const EVENT_GUARD_DROP: u32 = 2;

/// A record of the [`MAP_EVENTS`] ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    /// SPI (host order) for a locator change; 0 otherwise.
    pub spi: u32,
    /// CLOCK_MONOTONIC when it happened: `bpf_ktime_get_ns()` for a guard drop,
    /// tick resolution (`bpf_ktime_get_coarse_ns()`) for a locator change.
    pub ts_ns: u64,
    /// Peer HIT of the association (locator change), zero otherwise.
    pub peer_hit: Addr,
    /// Locator change: the previous outer source. Guard drop: the source address.
    pub old_addr: Addr,
    /// Locator change: the new outer source. Guard drop: the destination address.
    pub new_addr: Addr,
    /// Guard drop: UDP ports (host order).
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
}

// No implicit padding: each size equals the sum of the field sizes.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Addr>() == 16);
    assert!(core::mem::align_of::<Addr>() == 8);
    assert!(size_of::<Counters>() == 16);
    assert!(size_of::<Config>() == 4 + 2 + 2 + 4 + 4 + 2 + 6 + 4 * 128 + 8 * 128);
    assert!(core::mem::offset_of!(Config, esp_udp_port) == 16);
    assert!(size_of::<GuardCacheEntry>() == 16 + 4 + 1 + 1 + 2);
    assert!(size_of::<Association>() == 16 * 3 + 4 + 4 + 1 + 2 + 5);
    assert!(size_of::<LocatorEntry>() == 16 + 4 + 1 + 1 + 2);
    assert!(size_of::<SpiKey>() == 8);
    assert!(size_of::<SpiEntry>() == 32 + 8 * 2);
    assert!(size_of::<SpiStats>() == 8 * 3);
    assert!(size_of::<SpiSlot>() == 8);
    assert!(size_of::<SpiCacheEntry>() == 4 * 6);
    assert!(size_of::<FlowKey>() == 32 + 2 + 2 + 4);
    assert!(size_of::<FlowStats>() == 8 * 5 + 4 * 6 + 16 + 1 + 1 + 6);
    assert!(size_of::<GuardDrop>() == 32);
    assert!(size_of::<Event>() == 4 + 4 + 8 + 48 + 2 + 2 + 4);
};

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): `#[repr(C)]`, integer/byte-array fields only, no implicit padding
    // (asserted above), every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Association {}
    unsafe impl aya::Pod for super::LocatorEntry {}
    unsafe impl aya::Pod for super::SpiKey {}
    unsafe impl aya::Pod for super::SpiEntry {}
    unsafe impl aya::Pod for super::SpiSlot {}
    unsafe impl aya::Pod for super::SpiStats {}
    unsafe impl aya::Pod for super::SpiCacheEntry {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::GuardDrop {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::GuardCacheEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_prefixes() {
        let orchid2 = Addr([0x20, 0x01, 0x00, 0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let orchid1 = Addr([0x20, 0x01, 0x00, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let doc = Addr([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let next = Addr([0x20, 0x01, 0x00, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(orchid2.is_hit());
        assert!(orchid1.is_hit());
        assert!(!doc.is_hit());
        assert!(!next.is_hit());
    }

    #[test]
    fn v4_mapping() {
        let a = Addr::from_v4([192, 0, 2, 7]);
        assert!(a.is_v4_mapped());
        assert_eq!(&a.0[12..], &[192, 0, 2, 7]);
        assert!(!Addr::UNSPECIFIED.is_v4_mapped());
    }

    #[test]
    fn gray_generations_differ_in_one_bit() {
        let mut g = 0u32;
        let mut seen = [false; 4096];
        for _ in 0..4095 {
            let n = next_gray(g);
            assert_eq!((n ^ g).count_ones(), 1, "{g:#x} -> {n:#x}");
            assert!(!seen[n as usize], "{n:#x} repeats");
            seen[n as usize] = true;
            g = n;
        }
        // The last code wraps to the first.
        assert_eq!(next_gray(0x8000_0000), 0);
    }

    #[test]
    fn clock_multipliers() {
        // 8000 Hz: 125 µs per unit.
        let m = clock_mult(8000);
        assert_eq!((125_000u64 * m) >> 32, 1);
        assert_eq!((1_000_000_000u64 * m) >> 32, 8000);
        // 90 kHz: a 20 ms step within one unit; an hour within 1 ppm (the rounding of
        // the multiplier), which A.8 never sees: it only uses differences between
        // consecutive packets.
        let m = clock_mult(90_000);
        let step = ((20_000_000u64 * m) >> 32) as u32;
        assert!(step.abs_diff(1800) <= 1, "{step}");
        let hour = (3_600_000_000_000u64.wrapping_mul(m) >> 32) as u32;
        let exact = 3_600u32 * 90_000;
        assert!(
            f64::from(hour.abs_diff(exact)) < 1e-6 * f64::from(exact),
            "{hour} vs {exact}"
        );
    }

    #[test]
    fn states_round_trip() {
        for v in 0..=6 {
            assert_eq!(AssocState::from_u8(v).map(|s| s as u8), Some(v));
        }
        assert_eq!(AssocState::from_u8(7), None);
        for v in 0..=3 {
            assert_eq!(LocatorState::from_u8(v).map(|s| s as u8), Some(v));
        }
        assert_eq!(LocatorState::from_u8(4), None);
    }
}
