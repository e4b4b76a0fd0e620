//! Typed access to the datapath's maps, from the loading process or from their pins.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
    ops::RangeInclusive,
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf};
use hip_common::{
    Addr, AssocState, Association, Config, Counters, DEFAULT_CLOCK_HZ, Direction, FLOW_VIA_ASSOC,
    FLOW_VIA_XFRM, FlowKey, FlowStats, GuardDrop, HIP_UDP_PORT, LocatorEntry, LocatorState,
    MAP_ASSOCS, MAP_CONFIG, MAP_EVENTS, MAP_FLOWS, MAP_GUARD_CACHE, MAP_GUARD_DROPS,
    MAP_IFACE_STATS, MAP_LOCATORS, MAP_SPI_CACHE, MAP_SPI_COUNTERS, MAP_SPI_STATE, MAP_SPIS,
    MAP_STATS, MAX_LOCATORS, MAX_SPIS, SPI_DIR_IN, SPI_DIR_OUT, SpiEntry, SpiKey, SpiSlot,
    SpiStats, Stat, clock_mult, next_gray,
};
use serde::{Deserialize, Serialize};

use crate::DatapathError;

/// `BPF_NOEXIST` (`include/uapi/linux/bpf.h`).
const BPF_NOEXIST: u64 = 1;

/// Converts a map address into an IP address (IPv4-mapped → IPv4).
pub fn addr_to_ip(a: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(a.0);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Converts an IP address into the maps' 16-byte form.
pub fn ip_to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => Addr(v6.octets()),
    }
}

fn opt_ip(a: Addr) -> Option<IpAddr> {
    (a != Addr::UNSPECIFIED).then(|| addr_to_ip(a))
}

/// The media configuration the programs enforce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaConfig {
    /// Drop clear-text RTP towards addresses that are not verified locators.
    pub guard: bool,
    /// UDP ports (source or destination) that carry RTP.
    pub ports: RangeInclusive<u16>,
    /// Clock rate for payload types without an entry in `clock_hz`.
    pub default_clock_hz: u32,
    /// RTP clock rate per payload type (static ones from RFC 3551 §6, dynamic ones
    /// from SDP `a=rtpmap`).
    pub clock_hz: Vec<(u8, u32)>,
    /// Our HIP-over-UDP port ([`Config::esp_udp_port`]): UDP leaving from it or
    /// arriving at it is UDP-encapsulated ESP (counted per SPI like plain ESP, never
    /// media), HIP or a NAT keepalive. 0 = ESP runs over IP only.
    pub esp_udp_port: u16,
}

/// Static payload types of RFC 3551 §6 (table 4 and 5) whose clock is not 8000 Hz.
pub const RFC3551_CLOCKS: &[(u8, u32)] = &[
    (6, 16_000),
    (10, 44_100),
    (11, 44_100),
    (14, 90_000),
    (16, 11_025),
    (17, 22_050),
    (25, 90_000),
    (26, 90_000),
    (28, 90_000),
    (31, 90_000),
    (32, 90_000),
    (33, 90_000),
    (34, 90_000),
];

impl Default for MediaConfig {
    /// Guard on, ports 16384–32767 (the range many SIP user agents allocate RTP
    /// ports from), 8000 Hz default clock (PCMU/PCMA), RFC 3551's other static clocks,
    /// ESP-in-UDP on 10500 ([`HIP_UDP_PORT`], RFC 9028 §4.1).
    fn default() -> Self {
        Self {
            guard: true,
            ports: 16384..=32767,
            default_clock_hz: DEFAULT_CLOCK_HZ,
            clock_hz: RFC3551_CLOCKS.to_vec(),
            esp_udp_port: HIP_UDP_PORT,
        }
    }
}

impl MediaConfig {
    pub(crate) fn to_raw(&self) -> Result<Config, DatapathError> {
        if self.ports.is_empty() || *self.ports.start() == 0 {
            return Err(DatapathError::InvalidConfig(
                "media port range must be non-empty and exclude port 0",
            ));
        }
        if self.default_clock_hz == 0 {
            return Err(DatapathError::InvalidConfig(
                "default RTP clock rate must be > 0",
            ));
        }
        let mut c = Config {
            guard_enabled: u32::from(self.guard),
            port_min: *self.ports.start(),
            port_max: *self.ports.end(),
            default_clock_hz: self.default_clock_hz,
            esp_udp_port: self.esp_udp_port,
            ..Config::default()
        };
        for &(pt, hz) in &self.clock_hz {
            if pt > 127 || hz == 0 {
                return Err(DatapathError::InvalidConfig(
                    "clock rates need a payload type 0..=127 and a rate > 0",
                ));
            }
            c.clock_hz[pt as usize] = hz;
        }
        for (m, &hz) in c.clock_mult.iter_mut().zip(&c.clock_hz) {
            *m = clock_mult(if hz != 0 { hz } else { self.default_clock_hz });
        }
        Ok(c)
    }
}

/// A peer locator and its verification state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PeerLocator {
    pub addr: IpAddr,
    #[serde(serialize_with = "ser_locator_state")]
    pub state: LocatorState,
}

fn ser_locator_state<S: serde::Serializer>(s: &LocatorState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(match s {
        LocatorState::None => "none",
        LocatorState::Unverified => "unverified",
        LocatorState::Active => "active",
        LocatorState::Deprecated => "deprecated",
    })
}

fn ser_assoc_state<S: serde::Serializer>(s: &AssocState, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(&format!("{s:?}").to_lowercase())
}

/// What the agent tells the datapath about one association.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AssociationSpec {
    pub peer_hit: Ipv6Addr,
    pub local_hit: Ipv6Addr,
    /// Peer locators, preferred first (at most [`MAX_LOCATORS`]).
    pub locators: Vec<PeerLocator>,
    /// SPI of the inbound SA (we chose it).
    pub spi_in: u32,
    /// SPI of the outbound SA (the peer chose it).
    pub spi_out: u32,
    #[serde(serialize_with = "ser_assoc_state")]
    pub state: AssocState,
}

impl AssociationSpec {
    fn validate(&self) -> Result<(), DatapathError> {
        let bad = DatapathError::InvalidAssociation;
        if !Addr(self.peer_hit.octets()).is_hit() || !Addr(self.local_hit.octets()).is_hit() {
            return Err(bad("peer and local HIT must be ORCHID addresses"));
        }
        if self.locators.is_empty() || self.locators.len() > MAX_LOCATORS {
            return Err(bad("an association needs 1 or 2 peer locators"));
        }
        let uniq: BTreeSet<_> = self.locators.iter().map(|l| l.addr).collect();
        if uniq.len() != self.locators.len() {
            return Err(bad("duplicate peer locator"));
        }
        for l in &self.locators {
            if l.addr.is_unspecified() || Addr(ip_to_addr(l.addr).0).is_hit() {
                return Err(bad("a locator must be a routable address, not a HIT"));
            }
        }
        // SPIs 0..=255 are reserved (RFC 4303 §2.1).
        if self.spi_in < 256 || self.spi_out < 256 {
            return Err(bad("SPIs 0..=255 are reserved (RFC 4303 §2.1)"));
        }
        Ok(())
    }

    fn to_raw(&self) -> Association {
        let mut locators = [Addr::UNSPECIFIED; MAX_LOCATORS];
        let mut states = [0u8; MAX_LOCATORS];
        for (i, l) in self.locators.iter().enumerate() {
            locators[i] = ip_to_addr(l.addr);
            states[i] = l.state as u8;
        }
        Association {
            local_hit: Addr(self.local_hit.octets()),
            locators,
            spi_in: self.spi_in,
            spi_out: self.spi_out,
            state: self.state as u8,
            locator_state: states,
            _pad: [0; 5],
        }
    }

    fn from_raw(peer: Addr, a: &Association) -> Self {
        let locators = a
            .locators
            .iter()
            .zip(a.locator_state)
            .filter(|(l, _)| **l != Addr::UNSPECIFIED)
            .map(|(l, s)| PeerLocator {
                addr: addr_to_ip(*l),
                state: LocatorState::from_u8(s).unwrap_or(LocatorState::None),
            })
            .collect();
        Self {
            peer_hit: Ipv6Addr::from(peer.0),
            local_hit: Ipv6Addr::from(a.local_hit.0),
            locators,
            spi_in: a.spi_in,
            spi_out: a.spi_out,
            state: AssocState::from_u8(a.state).unwrap_or(AssocState::Unassociated),
        }
    }
}

/// One RTP flow of the flow table, as the agent and `hip-agent flows --json` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub src_hit: Ipv6Addr,
    pub dst_hit: Ipv6Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ssrc: u32,
    pub packets: u64,
    pub bytes: u64,
    /// Cumulative loss (expected − received, RFC 3550 A.3).
    pub lost: i64,
    /// Interarrival jitter (RFC 3550 A.8) in RTP timestamp units, and the raw ×16 value.
    pub jitter: f64,
    pub jitter_q4: u32,
    /// Jitter in milliseconds (timestamp units / clock rate).
    pub jitter_ms: f64,
    pub clock_hz: u32,
    pub payload_type: u8,
    /// Extended highest sequence number received.
    pub max_seq: u32,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// SPI the packets were decrypted with (0: unknown).
    pub spi: u32,
    /// Peer locator (outer source) they came from.
    pub locator: Option<IpAddr>,
    /// Where `spi`/`locator` come from: "xfrm" (the packet's own SA), "association"
    /// (no SA on the packet; the association map), or "unknown".
    pub via: String,
}

impl Flow {
    fn from_raw(k: &FlowKey, v: &FlowStats) -> Self {
        let jitter = f64::from(v.jitter_q4) / 16.0;
        Self {
            src_hit: Ipv6Addr::from(k.src_hit.0),
            dst_hit: Ipv6Addr::from(k.dst_hit.0),
            src_port: k.src_port,
            dst_port: k.dst_port,
            ssrc: k.ssrc,
            packets: v.packets,
            bytes: v.bytes,
            lost: v.lost,
            jitter,
            jitter_q4: v.jitter_q4,
            jitter_ms: if v.clock_hz == 0 {
                0.0
            } else {
                jitter * 1000.0 / f64::from(v.clock_hz)
            },
            clock_hz: v.clock_hz,
            payload_type: v.payload_type,
            max_seq: v.max_seq,
            first_seen_ns: v.first_seen_ns,
            last_seen_ns: v.last_seen_ns,
            spi: v.spi,
            locator: opt_ip(v.locator),
            via: match v.via {
                FLOW_VIA_XFRM => "xfrm",
                FLOW_VIA_ASSOC => "association",
                _ => "unknown",
            }
            .into(),
        }
    }
}

/// Per-SPI counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpiCounters {
    pub spi: u32,
    /// "in" or "out".
    pub direction: &'static str,
    pub peer_hit: Ipv6Addr,
    /// Outer source of the last inbound packet.
    pub last_src: Option<IpAddr>,
    pub packets: u64,
    pub bytes: u64,
    pub locator_changes: u64,
    pub last_seen_ns: u64,
}

/// Clear-text RTP the media guard dropped towards one destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuardDrops {
    pub dst: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// The programs' counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DatapathStats {
    pub ingress_packets: u64,
    pub ingress_bytes: u64,
    pub egress_packets: u64,
    pub egress_bytes: u64,
    pub esp_in: u64,
    pub esp_in_unknown_spi: u64,
    pub esp_out: u64,
    pub esp_out_unknown_spi: u64,
    pub rtp_in: u64,
    pub hit_udp_not_rtp: u64,
    pub guard_passed: u64,
    pub guard_dropped: u64,
    pub malformed: u64,
    pub locator_changes: u64,
    pub events_lost: u64,
    pub flow_insert_failed: u64,
    /// HIP control packets on the HIP-over-UDP port (zero non-ESP marker).
    pub esp_udp_hip: u64,
    /// 1-byte 0xFF NAT keepalives on the HIP-over-UDP port.
    pub esp_udp_keepalive: u64,
}

/// Handles on every map of the datapath (owned file descriptors).
pub struct Maps {
    iface: PerCpuArray<MapData, Counters>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    assocs: HashMap<MapData, Addr, Association>,
    locators: HashMap<MapData, Addr, LocatorEntry>,
    spis: HashMap<MapData, SpiKey, SpiSlot>,
    spi_state: Array<MapData, SpiEntry>,
    spi_counters: PerCpuArray<MapData, SpiStats>,
    /// Where the round-robin slot allocator continues (see [`SpiEntry`]); `None`
    /// until the first allocation of this handle, which starts after the highest
    /// slot in use.
    next_slot: Option<u32>,
    flows: HashMap<MapData, FlowKey, FlowStats>,
    guard_drops: HashMap<MapData, Addr, GuardDrop>,
    pub(crate) events: Option<RingBuf<MapData>>,
    /// The associations listing each locator, built from `HIP_ASSOCS` on first use and
    /// kept in step with every write: several HITs may share one address (hosts behind
    /// one NAT, several identities on one host), and the guard's entry for that address
    /// stays while any of them lists it.
    sharers: Option<std::collections::HashMap<Addr, BTreeSet<Addr>>>,
    /// The SPI slots in use, built from `HIP_SPIS` on first use and kept with every
    /// write: finding a free slot must not walk the whole map (two walks per association
    /// made setting up the thousandth call cost a thousand times the first's syscalls).
    slots: Option<BTreeSet<u32>>,
}

/// The media guard's verdict for a locator entry, as the programs compute it.
fn guard_passes(e: &LocatorEntry) -> bool {
    e.state == LocatorState::Active as u8 && e.assoc_state == AssocState::Established as u8
}

fn merr(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl Maps {
    /// The names of all maps, as pinned.
    pub const NAMES: [&'static str; 13] = [
        MAP_IFACE_STATS,
        MAP_STATS,
        MAP_CONFIG,
        MAP_ASSOCS,
        MAP_LOCATORS,
        MAP_SPIS,
        MAP_SPI_STATE,
        MAP_SPI_COUNTERS,
        MAP_SPI_CACHE,
        MAP_FLOWS,
        MAP_GUARD_DROPS,
        MAP_GUARD_CACHE,
        MAP_EVENTS,
    ];

    /// Builds the handles from maps taken out of a loaded object (or opened from pins).
    pub(crate) fn from_maps(
        mut take: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        macro_rules! typed {
            ($name:expr) => {
                take($name)?.try_into().map_err(merr($name))?
            };
        }
        Ok(Self {
            iface: typed!(MAP_IFACE_STATS),
            stats: typed!(MAP_STATS),
            config: typed!(MAP_CONFIG),
            assocs: typed!(MAP_ASSOCS),
            locators: typed!(MAP_LOCATORS),
            spis: typed!(MAP_SPIS),
            spi_state: typed!(MAP_SPI_STATE),
            spi_counters: typed!(MAP_SPI_COUNTERS),
            next_slot: None,
            flows: typed!(MAP_FLOWS),
            guard_drops: typed!(MAP_GUARD_DROPS),
            events: Some(typed!(MAP_EVENTS)),
            sharers: None,
            slots: None,
        })
    }

    /// Opens the maps pinned under `pin_dir` by a running (or persistent) datapath.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::from_maps(|name| {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(merr(name))?;
            Map::from_map_data(data).map_err(merr(name))
        })
    }

    /// Writes the media configuration (keeping the locator generation).
    pub fn set_media_config(&mut self, cfg: &MediaConfig) -> Result<(), DatapathError> {
        let mut raw = cfg.to_raw()?;
        raw.maps_gen = self.media_config()?.maps_gen;
        self.config.set(0, raw, 0).map_err(merr(MAP_CONFIG))
    }

    /// Changes only [`Config::esp_udp_port`] (0 = off), e.g. once the agent knows
    /// whether and where its HIP-over-UDP socket listens; the rest of the
    /// configuration stays as written.
    pub fn set_esp_udp_port(&mut self, port: u16) -> Result<(), DatapathError> {
        let mut raw = self.media_config()?;
        raw.esp_udp_port = port;
        self.config.set(0, raw, 0).map_err(merr(MAP_CONFIG))
    }

    /// Moves [`Config::maps_gen`] on: called after every change of the locator or
    /// SPI map, it invalidates the programs' per-CPU caches of them.
    fn bump_maps_gen(&mut self) -> Result<(), DatapathError> {
        let mut raw = self.media_config()?;
        raw.maps_gen = next_gray(raw.maps_gen);
        self.config.set(0, raw, 0).map_err(merr(MAP_CONFIG))
    }

    /// A free slot for a new SPI, round-robin from where the last one was taken:
    /// a freed slot comes back only after all others, so a packet that a CPU
    /// counted on it just after its SPI was deleted never lands on a new SPI in
    /// practice (that window is one program run).
    fn alloc_spi_slot(&mut self) -> Result<u32, DatapathError> {
        let next = self.next_slot;
        let used = self.used_slots()?;
        let start = match next {
            Some(n) => n,
            None => used.last().map_or(0, |m| (m + 1) % MAX_SPIS),
        };
        let slot = (0..MAX_SPIS)
            .map(|i| (start + i) % MAX_SPIS)
            .find(|s| !used.contains(s))
            .ok_or(DatapathError::InvalidAssociation("no free SPI slot"))?;
        self.next_slot = Some((slot + 1) % MAX_SPIS);
        Ok(slot)
    }

    /// Publishes a new SPI: state and zeroed counters first, then the index entry
    /// (`BPF_NOEXIST`: an SPI that exists keeps its slot, counters and `last_src`).
    fn add_spi(&mut self, key: SpiKey, entry: SpiEntry) -> Result<(), DatapathError> {
        match self.spis.get(&key, 0) {
            Ok(_) => return Ok(()),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(merr(MAP_SPIS)(e)),
        }
        let slot = self.alloc_spi_slot()?;
        self.spi_state
            .set(slot, entry, 0)
            .map_err(merr(MAP_SPI_STATE))?;
        // One zeroed value per possible CPU (what `nr_cpus()` reads).
        let zero = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .and_then(|n| PerCpuValues::try_from(vec![SpiStats::default(); n]))
            .map_err(|source| DatapathError::Io {
                path: "/sys/devices/system/cpu/possible".into(),
                source,
            })?;
        self.spi_counters
            .set(slot, zero, 0)
            .map_err(merr(MAP_SPI_COUNTERS))?;
        match self
            .spis
            .insert(key, SpiSlot { slot, _pad: 0 }, BPF_NOEXIST)
        {
            Ok(()) => {
                self.used_slots()?.insert(slot);
                Ok(())
            }
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(merr(MAP_SPIS)(e)),
        }
    }

    /// The slots in use ([`Maps::slots`]), built by one walk of `HIP_SPIS` when first
    /// needed.
    fn used_slots(&mut self) -> Result<&mut BTreeSet<u32>, DatapathError> {
        if self.slots.is_none() {
            let used = self
                .spis
                .iter()
                .map(|r| r.map(|(_, v)| v.slot))
                .collect::<Result<_, _>>()
                .map_err(merr(MAP_SPIS))?;
            self.slots = Some(used);
        }
        Ok(self.slots.as_mut().expect("built above"))
    }

    /// Removes an SPI from the index and frees its slot (absent: nothing to do).
    fn remove_spi(&mut self, key: &SpiKey) -> Result<(), DatapathError> {
        let slot = match self.spis.get(key, 0) {
            Ok(v) => v.slot,
            Err(MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(merr(MAP_SPIS)(e)),
        };
        remove_ok(self.spis.remove(key)).map_err(merr(MAP_SPIS))?;
        self.used_slots()?.remove(&slot);
        Ok(())
    }

    /// The SPI's state and its counters over all CPUs (counts summed, the latest
    /// time).
    fn spi_entry(&self, slot: u32) -> Result<(SpiEntry, SpiStats), DatapathError> {
        let e = self.spi_state.get(&slot, 0).map_err(merr(MAP_SPI_STATE))?;
        let per_cpu = self
            .spi_counters
            .get(&slot, 0)
            .map_err(merr(MAP_SPI_COUNTERS))?;
        let c = per_cpu.iter().fold(SpiStats::default(), |acc, c| SpiStats {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
            last_seen_ns: acc.last_seen_ns.max(c.last_seen_ns),
        });
        Ok((e, c))
    }

    /// Reads the media configuration back.
    pub fn media_config(&self) -> Result<Config, DatapathError> {
        self.config.get(&0, 0).map_err(merr(MAP_CONFIG))
    }

    /// Adds an association (on ESTABLISHED) or updates it (rekey, locator change,
    /// state change). Validates first, so bad input changes nothing.
    ///
    /// Order matters for the media guard: new locators are added before stale ones
    /// are removed, so a locator that stays verified is never missing. SPI entries are
    /// only *created* (`BPF_NOEXIST`): an existing one keeps the counters and the
    /// `last_src` the programs maintain; an SPI that is no longer used is removed.
    pub fn upsert_association(&mut self, spec: &AssociationSpec) -> Result<(), DatapathError> {
        spec.validate()?;
        let peer = Addr(spec.peer_hit.octets());
        let raw = spec.to_raw();
        let old = match self.assocs.get(&peer, 0) {
            Ok(a) => Some(a),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(merr(MAP_ASSOCS)(e)),
        };
        let res = self.write_association(peer, raw, old);
        // Whatever was written, the programs' cached verdicts and slots may be stale.
        let bumped = self.bump_maps_gen();
        res.and(bumped)
    }

    /// The writing half of [`Maps::upsert_association`] (validated input).
    fn write_association(
        &mut self,
        peer: Addr,
        raw: Association,
        old: Option<Association>,
    ) -> Result<(), DatapathError> {
        self.assocs.insert(peer, raw, 0).map_err(merr(MAP_ASSOCS))?;
        for l in raw.locators.iter().filter(|l| **l != Addr::UNSPECIFIED) {
            self.sharers()?.entry(*l).or_default().insert(peer);
            self.refresh_locator(l)?;
        }
        for (spi, dir) in [(raw.spi_in, SPI_DIR_IN), (raw.spi_out, SPI_DIR_OUT)] {
            let e = SpiEntry {
                peer_hit: peer,
                last_src: if dir == SPI_DIR_IN {
                    raw.locators[0]
                } else {
                    Addr::UNSPECIFIED
                },
                ..SpiEntry::default()
            };
            self.add_spi(SpiKey { spi, dir }, e)?;
        }
        if let Some(old) = old {
            for l in old.locators.iter().filter(|l| **l != Addr::UNSPECIFIED) {
                if !raw.locators.contains(l) {
                    self.release_locator(l, peer)?;
                }
            }
            if old.spi_in != raw.spi_in {
                self.remove_spi(&SpiKey {
                    spi: old.spi_in,
                    dir: SPI_DIR_IN,
                })?;
            }
            if old.spi_out != raw.spi_out {
                self.remove_spi(&SpiKey {
                    spi: old.spi_out,
                    dir: SPI_DIR_OUT,
                })?;
            }
        }
        Ok(())
    }

    /// The locator index ([`Maps::sharers`]), built by one pass over `HIP_ASSOCS` the
    /// first time it is needed.
    fn sharers(
        &mut self,
    ) -> Result<&mut std::collections::HashMap<Addr, BTreeSet<Addr>>, DatapathError> {
        if self.sharers.is_none() {
            let mut m: std::collections::HashMap<Addr, BTreeSet<Addr>> = Default::default();
            for r in self.assocs.iter() {
                let (peer, a) = r.map_err(merr(MAP_ASSOCS))?;
                for l in a.locators.iter().filter(|l| **l != Addr::UNSPECIFIED) {
                    m.entry(*l).or_default().insert(peer);
                }
            }
            self.sharers = Some(m);
        }
        Ok(self.sharers.as_mut().expect("built above"))
    }

    /// `peer` no longer lists locator `l`: the guard's entry for it is recomputed from
    /// the associations that still do.
    fn release_locator(&mut self, l: &Addr, peer: Addr) -> Result<(), DatapathError> {
        let m = self.sharers()?;
        if let Some(set) = m.get_mut(l) {
            set.remove(&peer);
            if set.is_empty() {
                m.remove(l);
            }
        }
        self.refresh_locator(l)
    }

    /// Writes the guard's entry for locator `l` from every association listing it (in
    /// `HIP_ASSOCS` as they are now): one that lets media pass if there is one, else any;
    /// none left, the entry goes. The guard's verdict is per address, whichever of the
    /// HITs behind it changed.
    fn refresh_locator(&mut self, l: &Addr) -> Result<(), DatapathError> {
        let listers: Vec<Addr> = self
            .sharers()?
            .get(l)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let entries: Vec<LocatorEntry> = listers
            .into_iter()
            .filter_map(|peer| {
                let a = self.assocs.get(&peer, 0).ok()?;
                let i = a.locators.iter().position(|x| x == l)?;
                Some(LocatorEntry {
                    peer_hit: peer,
                    spi_out: a.spi_out,
                    state: a.locator_state[i],
                    assoc_state: a.state,
                    _pad: [0; 2],
                })
            })
            .collect();
        match entries.iter().find(|e| guard_passes(e)).or(entries.first()) {
            Some(e) => self.locators.insert(l, *e, 0).map_err(merr(MAP_LOCATORS)),
            None => remove_ok(self.locators.remove(l)).map_err(merr(MAP_LOCATORS)),
        }
    }

    /// Removes an association (on CLOSE): its locators, SPIs and flows. Returns the
    /// flows' last statistics. Removing an unknown peer is not an error (idempotent).
    pub fn remove_association(&mut self, peer_hit: Ipv6Addr) -> Result<Vec<Flow>, DatapathError> {
        let peer = Addr(peer_hit.octets());
        let old = match self.assocs.get(&peer, 0) {
            Ok(a) => Some(a),
            Err(MapError::KeyNotFound) => None,
            Err(e) => return Err(merr(MAP_ASSOCS)(e)),
        };
        // Guard entries first: from here on, clear-text media to the peer is dropped.
        if let Some(old) = &old {
            for l in old.locators.iter().filter(|l| **l != Addr::UNSPECIFIED) {
                self.release_locator(l, peer)?;
            }
            self.bump_maps_gen()?;
        }
        // The association's SPIs are its current pair (a rekey replaces both in one
        // write); only for a peer without an association entry is the index walked.
        let candidates: Vec<SpiKey> = match &old {
            Some(a) => vec![
                SpiKey {
                    spi: a.spi_in,
                    dir: SPI_DIR_IN,
                },
                SpiKey {
                    spi: a.spi_out,
                    dir: SPI_DIR_OUT,
                },
            ],
            None => self
                .spis
                .iter()
                .filter_map(Result::ok)
                .map(|(k, _)| k)
                .collect(),
        };
        let spis: Vec<SpiKey> = candidates
            .into_iter()
            .filter(|k| {
                self.spis.get(k, 0).is_ok_and(|v| {
                    self.spi_state
                        .get(&v.slot, 0)
                        .is_ok_and(|e| e.peer_hit == peer)
                })
            })
            .collect();
        for k in &spis {
            self.remove_spi(k)?;
        }
        if !spis.is_empty() {
            self.bump_maps_gen()?;
        }
        let flows: Vec<(FlowKey, FlowStats)> = self
            .flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.src_hit == peer || k.dst_hit == peer)
            .collect();
        for (k, _) in &flows {
            remove_ok(self.flows.remove(k)).map_err(merr(MAP_FLOWS))?;
        }
        remove_ok(self.assocs.remove(&peer)).map_err(merr(MAP_ASSOCS))?;
        Ok(flows.iter().map(|(k, v)| Flow::from_raw(k, v)).collect())
    }

    /// All associations.
    pub fn associations(&self) -> Result<Vec<AssociationSpec>, DatapathError> {
        self.assocs
            .iter()
            .map(|r| {
                r.map(|(k, v)| AssociationSpec::from_raw(k, &v))
                    .map_err(merr(MAP_ASSOCS))
            })
            .collect()
    }

    /// The flow table, sorted by HITs, ports and SSRC.
    pub fn flows(&self) -> Result<Vec<Flow>, DatapathError> {
        let mut v: Vec<(FlowKey, FlowStats)> = self
            .flows
            .iter()
            .collect::<Result<_, _>>()
            .map_err(merr(MAP_FLOWS))?;
        v.sort_by_key(|(k, _)| (k.src_hit, k.dst_hit, k.src_port, k.dst_port, k.ssrc));
        Ok(v.iter().map(|(k, s)| Flow::from_raw(k, s)).collect())
    }

    /// Per-SPI counters, sorted by SPI.
    pub fn spi_counters(&self) -> Result<Vec<SpiCounters>, DatapathError> {
        let index: Vec<(SpiKey, SpiSlot)> = self
            .spis
            .iter()
            .collect::<Result<_, _>>()
            .map_err(merr(MAP_SPIS))?;
        let mut v = Vec::with_capacity(index.len());
        for (k, s) in index {
            let (e, c) = self.spi_entry(s.slot)?;
            v.push(SpiCounters {
                spi: k.spi,
                direction: if k.dir == SPI_DIR_IN { "in" } else { "out" },
                peer_hit: Ipv6Addr::from(e.peer_hit.0),
                last_src: opt_ip(e.last_src),
                packets: c.packets,
                bytes: c.bytes,
                locator_changes: e.locator_changes,
                last_seen_ns: c.last_seen_ns,
            });
        }
        v.sort_by_key(|c| (c.spi, c.direction));
        Ok(v)
    }

    /// Guard drops per destination.
    pub fn guard_drops(&self) -> Result<Vec<GuardDrops>, DatapathError> {
        let mut v: Vec<GuardDrops> = self
            .guard_drops
            .iter()
            .map(|r| {
                r.map(|(k, g)| GuardDrops {
                    dst: addr_to_ip(k),
                    packets: g.packets,
                    bytes: g.bytes,
                    first_ns: g.first_ns,
                    last_ns: g.last_ns,
                })
                .map_err(merr(MAP_GUARD_DROPS))
            })
            .collect::<Result<_, _>>()?;
        v.sort_by_key(|g| g.dst);
        Ok(v)
    }

    /// Interface counters of one direction, summed over CPUs.
    pub fn iface_counters(&self, dir: Direction) -> Result<Counters, DatapathError> {
        let per_cpu = self
            .iface
            .get(&(dir as u32), 0)
            .map_err(merr(MAP_IFACE_STATS))?;
        Ok(per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    fn stat(&self, s: Stat) -> Result<u64, DatapathError> {
        let v: PerCpuValues<u64> = self.stats.get(&(s as u32), 0).map_err(merr(MAP_STATS))?;
        Ok(v.iter().sum())
    }

    /// All counters.
    pub fn stats(&self) -> Result<DatapathStats, DatapathError> {
        let ing = self.iface_counters(Direction::Ingress)?;
        let eg = self.iface_counters(Direction::Egress)?;
        Ok(DatapathStats {
            ingress_packets: ing.packets,
            ingress_bytes: ing.bytes,
            egress_packets: eg.packets,
            egress_bytes: eg.bytes,
            esp_in: self.stat(Stat::EspIn)?,
            esp_in_unknown_spi: self.stat(Stat::EspInUnknownSpi)?,
            esp_out: self.stat(Stat::EspOut)?,
            esp_out_unknown_spi: self.stat(Stat::EspOutUnknownSpi)?,
            rtp_in: self.stat(Stat::RtpIn)?,
            hit_udp_not_rtp: self.stat(Stat::HitUdpNotRtp)?,
            guard_passed: self.stat(Stat::GuardPassed)?,
            guard_dropped: self.stat(Stat::GuardDropped)?,
            malformed: self.stat(Stat::Malformed)?,
            locator_changes: self.stat(Stat::LocatorChanges)?,
            events_lost: self.stat(Stat::EventsLost)?,
            flow_insert_failed: self.stat(Stat::FlowInsertFailed)?,
            esp_udp_hip: self.stat(Stat::EspUdpHip)?,
            esp_udp_keepalive: self.stat(Stat::EspUdpKeepalive)?,
        })
    }
}

fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AssociationSpec {
        AssociationSpec {
            peer_hit: "2001:20::b".parse().unwrap(),
            local_hit: "2001:20::a".parse().unwrap(),
            locators: vec![PeerLocator {
                addr: "192.0.2.2".parse().unwrap(),
                state: LocatorState::Active,
            }],
            spi_in: 0x1000,
            spi_out: 0x2000,
            state: AssocState::Established,
        }
    }

    #[test]
    fn address_round_trip() {
        for s in ["192.0.2.1", "2001:db8::1", "2001:20::1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(addr_to_ip(ip_to_addr(ip)), ip);
        }
    }

    #[test]
    fn association_round_trip_and_validation() {
        let s = spec();
        s.validate().unwrap();
        let raw = s.to_raw();
        assert_eq!(
            AssociationSpec::from_raw(Addr(s.peer_hit.octets()), &raw),
            s
        );

        let mut bad = spec();
        bad.peer_hit = "2001:db8::1".parse().unwrap();
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.spi_in = 7;
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.locators.clear();
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.locators.push(bad.locators[0]);
        assert!(bad.validate().is_err());
        let mut bad = spec();
        bad.locators[0].addr = "2001:20::c".parse().unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn media_config_validation() {
        let c = MediaConfig::default().to_raw().unwrap();
        assert_eq!(c.guard_enabled, 1);
        assert_eq!((c.port_min, c.port_max), (16384, 32767));
        assert_eq!(c.clock_hz[0], 0, "PCMU uses the default");
        assert_eq!(c.clock_hz[34], 90_000);
        assert_eq!(
            c.clock_mult[0],
            clock_mult(8000),
            "the default's multiplier"
        );
        assert_eq!(c.clock_mult[34], clock_mult(90_000));
        assert_eq!(c.esp_udp_port, 10500);
        let off = MediaConfig {
            esp_udp_port: 0,
            ..MediaConfig::default()
        };
        assert_eq!(off.to_raw().unwrap().esp_udp_port, 0);
        let bad = MediaConfig {
            ports: 0..=10,
            ..MediaConfig::default()
        };
        assert!(bad.to_raw().is_err());
        let bad = MediaConfig {
            clock_hz: vec![(128, 8000)],
            ..MediaConfig::default()
        };
        assert!(bad.to_raw().is_err());
    }
}
