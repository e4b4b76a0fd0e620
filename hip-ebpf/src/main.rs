//! hip's tc programs: they see every packet of a HIP association on the configured
//! interfaces, classify ESP by SPI and decrypted HIT-addressed RTP by flow, report
//! locator changes, and enforce the media guard.
//!
//! # Why tc ingress and tc egress (and nothing else)
//!
//! * **Egress.** On output the XFRM transform runs *before* the packet reaches the
//!   device: `ip6_output`/`ip_output` → `dst_output()` on the xfrm dst bundle →
//!   `xfrm_output()` (net/xfrm/xfrm_output.c) encrypts → `dev_queue_xmit()` →
//!   `sch_handle_egress()` (clsact, kernels < 6.6) or `tcx_run()` (tcx, ≥ 6.6). So tc
//!   egress sees protected media only as ESP (we count it per outbound SPI) and sees
//!   in clear text exactly what XFRM did **not** protect: that is where the media guard
//!   must sit. Anything earlier (cgroup/skb, LSM) would see packets before XFRM and
//!   could not tell protected from unprotected media.
//! * **Ingress.** `__netif_receive_skb_core()` runs `sch_handle_ingress()` (clsact) or
//!   `tcx_run()` (tcx, ≥ 6.6) *before* the IP layer, so tc ingress sees the ESP packet
//!   with its outer (locator) addresses: we count it per inbound SPI and notice a
//!   new outer source (locator change). Then `xfrm6_rcv()`/`xfrm4_rcv()` →
//!   `xfrm_input()` decrypts; BEET is a "tunnel-like" mode (`XFRM_MODE_FLAG_TUNNEL` in
//!   the mode table of net/xfrm/xfrm_state.c), so after
//!   `xfrm_inner_mode_encap_remove()` (→ `xfrm{4,6}_remove_beet_encap()`, which
//!   rebuilds the MAC header) `xfrm_input()` re-injects the inner HIT-addressed packet
//!   on the *same* device with `gro_cells_receive()` (which falls back to
//!   `netif_rx()`), and it crosses tc ingress a second time, now with the skb's
//!   sec_path still attached (`xfrm_input()` only clears `sp->olen`). That second pass
//!   is where flows are classified; `bpf_skb_get_xfrm_state()` (tc helper since 4.18)
//!   reads the SPI and the outer remote address from that sec_path. Seen on the 6.1
//!   guest kernel (netlink clsact); the same path exists in 6.18 (tcx).
//! * XDP is not used: the re-injected inner packet never passes XDP, and XDP has no
//!   egress hook.
//!
//! # ESP in UDP (NAT traversal, issue 13)
//!
//! Behind a NAT the SAs are UDP-encapsulated (RFC 3948, `encap espinudp`) on the
//! HIP-over-UDP port (`Config::esp_udp_port`, 10500 by default, RFC 9028 §4.1; 0 =
//! off), which also carries HIP control packets behind a 32-bit zero non-ESP marker
//! and 1-byte 0xFF NAT keepalives. Such a datagram is demultiplexed as the kernel's
//! `UDP_ENCAP_ESPINUDP` receive path does it (`xfrm4_udp_encap_rcv()`,
//! `xfrm6_udp_encap_rcv()`): ESP when the payload is longer than the 8-byte ESP
//! header and its first word, the SPI, is not zero; then it takes the same per-SPI
//! path as plain ESP (slot cache, counters, last-seen, locator change by outer
//! source address). A zero word is HIP (`Stat::EspUdpHip`), one 0xFF byte a
//! keepalive (`Stat::EspUdpKeepalive`), anything else on the port malformed (an
//! 8-byte payload with a non-zero SPI too: the kernel hands it to the socket, not
//! to XFRM).
//!
//! * **Which port.** Ingress: the *destination* port (our encapsulation socket's;
//!   the source is whatever the peer's NAT mapped). Egress: the *source* port: XFRM
//!   adds the UDP header in the ESP transform (`esp_output_head()`,
//!   `esp6_output_head()`), before the device, so tc egress sees IP/UDP/ESP leaving
//!   from the SA's encap source port, ours; the destination is the peer's, possibly
//!   mapped. Only the source port exempts a datagram from the media guard: a
//!   hostile SDP can name 10500 as its RTP port, but cannot make our media leave
//!   *from* it (the agent's socket holds it). This is narrower than "either port",
//!   deliberately.
//! * **Ingress, second pass.** The ESP comes out of the UDP socket's `encap_rcv`
//!   into the same `xfrm_input()`, and the decrypted BEET packet crosses tc ingress
//!   again as with plain ESP (seen on the 6.1 guest, netlink clsact: 10 datagrams
//!   HIT to HIT over `encap espinudp 10500 10500` counted 10 times as ESP on ingress
//!   and 10 times as HIT-addressed UDP, with the HIP packet and keepalive sent on
//!   the encapsulation socket counted as such on both ends). It is HIT-addressed:
//!   flows as usual; HIT-to-HIT UDP is never taken for ESP in UDP (its outer
//!   addresses are locators).
//!
//! # Verdicts
//!
//! Every packet continues (`TC_ACT_PIPE`: the next filter or tcx program runs, then
//! the stack; under tcx `tcx_action_code()` maps it to `TCX_NEXT`) except clear-text
//! RTP that the media guard drops (`TC_ACT_SHOT`). Truncated or malformed headers
//! always continue untouched and are never counted as RTP.
//!
//! # Concurrency
//!
//! Counters that several CPUs can hit at once are per-CPU array slots (per-SPI and
//! per-interface packets/bytes, statistics) or atomic adds (`BPF_XADD`: per-flow
//! packets/bytes). The per-flow sequence/jitter state is read-modify-write without a
//! lock: packets of one UDP flow arrive on one RX queue (RSS hashes the
//! 5-tuple) and so one CPU at a time; a rare interleaving only perturbs the jitter
//! estimate, never the packet counts. A locator change is reported by the one CPU
//! whose compare-and-swap (`BPF_CMPXCHG`, kernel 5.12) takes the SPI's sequence lock
//! (`SpiEntry::src_seq`), so CPUs racing on the same new source report it once.
//!
//! # Cost per packet
//!
//! Measured by `hip-datapath-bench` (kernel run-time statistics, and
//! `BPF_PROG_TEST_RUN` with `--micro`). On the development machine every kernel
//! function return goes through the SRSO "safe RET" thunk, so a helper call or a
//! hash-map lookup (several nested calls: `__htab_map_lookup_elem()`,
//! `htab_map_hash()`, `lookup_nulls_elem_raw()`, `memcmp()`) costs far more than the
//! straight-line code around it. Hence:
//! * headers are read in place with direct packet access (no `bpf_skb_load_bytes`),
//!   and only the fields a path needs, when it needs them;
//! * counters live in per-CPU arrays, whose lookups the verifier inlines (no call);
//! * packets that are neither ESP nor UDP leave after the IP header; UDP outside
//!   the media port range and not on the HIP-over-UDP port leaves after the UDP
//!   header (on ingress, UDP between locators used to leave after the IP header:
//!   now its destination port is read and compared first; on egress, one compare
//!   of the source port more, before the media check);
//! * the media guard keeps a per-CPU cache of its verdicts, and ESP a per-CPU cache
//!   of SPI slots, both tagged with the generation of the agent's index maps: they
//!   look up `HIP_LOCATORS` / `HIP_SPIS` only on a miss;
//! * per-SPI packet and byte counters are per-CPU array slots (no atomics);
//! * per-SPI "last seen" times read the coarse clock once per jiffy and CPU
//!   (`coarse_now`: `bpf_jiffies64()` is inlined, the clock helper is a call), so an
//!   ESP packet makes no helper call at all once its SPI is cached;
//! * RTP timestamps come from nanoseconds with one multiplication
//!   (`Config::clock_mult`), not two divisions;
//! * a flow's SPI and locator come from the packet's XFRM state (one helper call);
//!   the association map is consulted only for a new flow without one.
//!
//! What remains per HIT-addressed RTP packet on ingress is what flow accounting
//! cannot do without: `bpf_ktime_get_ns()` (the jitter needs a precise clock), the
//! XFRM-state helper, one `LRU_HASH` lookup with the 40-byte flow key and two atomic
//! adds. `hip_tc_probe` prices exactly these; the bench reports them next to
//! `hip_tc_ingress`.
//!
//! # Limits
//!
//! * Verdict and slot caches: a cached entry is used until the program reads the
//!   new generation, the same window an in-flight hash lookup has. Each cache is 16
//!   direct-mapped slots per CPU: more concurrent destinations (or SPIs) sharing low
//!   bits evict each other and fall back to hash lookups (correct, slower).
//! * SPI slots (agent side): a freed slot is reused only after every other slot, so
//!   a packet a CPU counted on it at the moment its SPI was deleted cannot land on a
//!   new SPI in practice; another process opening the pinned maps starts its
//!   round-robin after the highest slot in use, without that history.
//! * Locator change: one event per change when CPUs race with the same new source.
//!   If two *different* new sources race, the loser's source is reported on its
//!   next packet; a packet that finds the sequence lock held skips the check.
//! * A flow without XFRM state keeps the association's SPI and locator as of its
//!   first packet (a rekey without ESP on the link is not followed); decrypted flows
//!   follow their SA packet by packet.
//! * Per-SPI last-seen times and locator-change event times have tick resolution,
//!   and may lag by one more tick (see `coarse_now`).
//! * The RTP clock multiplier is rounded to 2⁻³² units/ns (< 1 ppm of any rate
//!   ≥ 8 kHz); A.8 only uses differences between consecutive packets.
//! * Wider loads at any alignment need `CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`
//!   (x86-64, arm64); elsewhere the verifier refuses the object at load time.
//! * ESP in UDP: a locator change is a new outer source *address*; a NAT
//!   rebinding that keeps the address and changes the port is not one here (the
//!   kernel reports it as `XFRM_MSG_MAPPING`). Whatever leaves from the HIP-over-UDP
//!   port passes the media guard unjudged: right while the agent's socket holds the
//!   port; with that socket off, the agent should set the port to 0. Datagrams on
//!   the port with fewer than 12 payload bytes (keepalives) are read with
//!   `bpf_skb_load_bytes()`, a helper call (see `short_load`).
#![no_std]
#![no_main]
// `atomic_xadd`/`atomic_cxchg`: the bpfel target has no compare-and-swap in `core`'s
// atomics (`atomic_cas: false`), so `core` offers no `AtomicU64`; the intrinsics lower
// to `BPF_XADD` (result unused) and `BPF_CMPXCHG` (see .cargo/config.toml).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    mem::size_of,
};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_PIPE, TC_ACT_SHOT, bpf_xfrm_state},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_skb_get_xfrm_state},
    },
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::info;
use hip_common::{
    Addr, AssocState, Association, Config, Counters, Direction, EVENT_GUARD_DROP,
    EVENT_LOCATOR_CHANGE, EVENTS_BYTES, Event, FLOW_VIA_ASSOC, FLOW_VIA_XFRM, FlowKey, FlowStats,
    GUARD_CACHE_SLOTS, GuardCacheEntry, GuardDrop, IFACE_STATS_ENTRIES, LocatorEntry, LocatorState,
    MAX_ASSOCS, MAX_FLOWS, MAX_GUARD_DROPS, MAX_LOCATOR_ENTRIES, MAX_SPIS, PROBE_ATOMICS,
    PROBE_KTIME, PROBE_LOOKUP, PROBE_XFRM, SPI_CACHE_SLOTS, SPI_DIR_IN, SPI_DIR_OUT, SPI_SLOT_NONE,
    STATS_ENTRIES, SpiCacheEntry, SpiEntry, SpiKey, SpiSlot, SpiStats, Stat,
};

#[map(name = "HIP_IFACE_STATS")]
static HIP_IFACE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(IFACE_STATS_ENTRIES, 0);
#[map(name = "HIP_STATS")]
static HIP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);
#[map(name = "HIP_CONFIG")]
static HIP_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "HIP_ASSOCS")]
static HIP_ASSOCS: HashMap<Addr, Association> = HashMap::with_max_entries(MAX_ASSOCS, 0);
#[map(name = "HIP_LOCATORS")]
static HIP_LOCATORS: HashMap<Addr, LocatorEntry> =
    HashMap::with_max_entries(MAX_LOCATOR_ENTRIES, 0);
#[map(name = "HIP_SPIS")]
static HIP_SPIS: HashMap<SpiKey, SpiSlot> = HashMap::with_max_entries(MAX_SPIS, 0);
#[map(name = "HIP_SPI_STATE")]
static HIP_SPI_STATE: Array<SpiEntry> = Array::with_max_entries(MAX_SPIS, 0);
#[map(name = "HIP_SPI_COUNTERS")]
static HIP_SPI_COUNTERS: PerCpuArray<SpiStats> = PerCpuArray::with_max_entries(MAX_SPIS, 0);
#[map(name = "HIP_SPI_CACHE")]
static HIP_SPI_CACHE: PerCpuArray<SpiCacheEntry> =
    PerCpuArray::with_max_entries(SPI_CACHE_SLOTS, 0);
#[map(name = "HIP_FLOWS")]
static HIP_FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map(name = "HIP_GUARD_DROPS")]
static HIP_GUARD_DROPS: LruHashMap<Addr, GuardDrop> =
    LruHashMap::with_max_entries(MAX_GUARD_DROPS, 0);
#[map(name = "HIP_GUARD_CACHE")]
static HIP_GUARD_CACHE: PerCpuArray<GuardCacheEntry> =
    PerCpuArray::with_max_entries(GUARD_CACHE_SLOTS, 0);
#[map(name = "HIP_EVENTS")]
static HIP_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// Per CPU: the coarse clock as read in one jiffy ([`coarse_now`]). Not pinned:
/// program-private, a fresh (zeroed) one only costs one helper call per CPU.
#[map(name = "COARSE_CLOCK")]
static COARSE_CLOCK: PerCpuArray<CoarseClock> = PerCpuArray::with_max_entries(1, 0);

/// A value of [`COARSE_CLOCK`]. A zeroed entry matches no jiffy: jiffies start at
/// `INITIAL_JIFFIES` (5 minutes before wrapping 32 bits) and only grow.
#[repr(C)]
#[derive(Clone, Copy)]
struct CoarseClock {
    jiffies: u64,
    ns: u64,
}

/// The flow table of `hip_tc_probe` (benchmark only; not pinned; one key is
/// ever used, the size leaves the LRU free lists room on every CPU).
#[map(name = "BENCH_FLOW")]
static BENCH_FLOW: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(256, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ESP: u8 = 50;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// Fixed RTP header (RFC 3550 §5.1).
const RTP_HLEN: usize = 12;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// RFC 3550 A.1: a forward jump below this is in-order (with loss); a backward one
/// within `MAX_MISORDER` is a duplicate or reordered packet.
const MAX_DROPOUT: u16 = 3000;
const MAX_MISORDER: u16 = 100;

#[classifier]
pub fn hip_tc_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, Direction::Ingress);
    ingress(&ctx);
    TC_ACT_PIPE
}

#[classifier]
pub fn hip_tc_egress(ctx: TcContext) -> i32 {
    count_iface(&ctx, Direction::Egress);
    egress(&ctx)
}

/// The benchmark's baseline, never attached by the agent: an empty tc program
/// attached the same way as the two above. Its kernel-accounted cost is the floor
/// every program pays on this machine (the tcx/clsact dispatch plus the two
/// `sched_clock()` reads that `kernel.bpf_stats_enabled` adds around each run,
/// `__bpf_prog_run()` in include/linux/filter.h), so the bench reports our programs
/// both as measured and minus this floor.
#[classifier]
pub fn hip_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Which operations `hip_tc_probe` performs (`hip_common::PROBE_*`), set by the
/// benchmark's loader; frozen read-only data, so the verifier prunes the others.
#[unsafe(no_mangle)]
static PROBE_OPS: u32 = 0;

/// The benchmark's probe, never attached by the agent: the operations per-packet
/// flow accounting cannot do without (a timestamp, the packet's XFRM state, one
/// flow-table lookup with a 40-byte key, two atomic counter adds), each selected by
/// `PROBE_OPS`, on a table of its own. All of them together are the floor of a flow
/// program; one at a time they price each operation on the machine at hand.
#[classifier]
pub fn hip_tc_probe(ctx: TcContext) -> i32 {
    let ops = unsafe { core::ptr::read_volatile(&PROBE_OPS) };
    let now = if ops & PROBE_KTIME != 0 {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let spi = if ops & PROBE_XFRM != 0 {
        xfrm_state(&ctx).map_or(0, |xs| xs.spi)
    } else {
        0
    };
    if ops & PROBE_LOOKUP == 0 {
        return TC_ACT_OK;
    }
    // The key comes from the frame's first 40 bytes, as hip's comes from its headers
    // (a constant key would be built by a byte-wise memset subprogram instead).
    let Some(p) = bytes_at(&ctx, 0, size_of::<FlowKey>()) else {
        return TC_ACT_OK;
    };
    let key = FlowKey {
        src_hit: ld_addr(p, 0),
        dst_hit: ld_addr(p, 16),
        src_port: ld::<u16>(p, 32),
        dst_port: ld::<u16>(p, 34),
        ssrc: ld::<u32>(p, 36),
    };
    match BENCH_FLOW.get_ptr_mut(key) {
        // SAFETY: map value pointer, fields naturally aligned.
        Some(f) => unsafe {
            if ops & PROBE_ATOMICS != 0 {
                add(&raw mut (*f).packets, 1);
                add(&raw mut (*f).bytes, u64::from(ctx.len()));
            }
            (*f).last_seen_ns = now;
            (*f).spi = spi;
        },
        None => {
            let init = FlowStats {
                first_seen_ns: now,
                ..FlowStats::default()
            };
            let _ = BENCH_FLOW.insert(key, init, 0);
        }
    }
    TC_ACT_OK
}

#[inline(always)]
fn count_iface(ctx: &TcContext, dir: Direction) {
    // Per-CPU slots: no atomics needed; the agent sums the CPUs when it reads the map.
    if let Some(c) = HIP_IFACE_STATS.get_ptr_mut(dir as u32) {
        // SAFETY: map value pointer, valid and exclusive to this CPU during the run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
}

#[inline(always)]
fn stat(s: Stat) {
    if let Some(c) = HIP_STATS.get_ptr_mut(s as u32) {
        // SAFETY: per-CPU map value pointer.
        unsafe { *c += 1 };
    }
}

/// CLOCK_MONOTONIC at tick resolution (`bpf_ktime_get_coarse_ns`, kernel 5.11):
/// enough for "last seen" times, and it reads no clocksource (`bpf_ktime_get_ns`
/// reads the TSC through `ktime_get_mono_fast_ns()`, which costs more than the rest
/// of the per-SPI work). Flows keep the precise clock: the jitter needs it.
///
/// The coarse clock only moves on a tick, so each CPU reads it once per jiffy and
/// keeps it in [`COARSE_CLOCK`] with the jiffy it was read in: `bpf_jiffies64()` is
/// a plain load that the verifier inlines on 64-bit JITs (no call), the helper is a
/// call. A CPU that reads the new jiffy just before the tick has updated the
/// timekeeper keeps the previous tick's time for that jiffy: at most one more tick
/// behind.
#[inline(always)]
fn coarse_now() -> u64 {
    let j = unsafe { bpf_jiffies64() };
    let Some(c) = COARSE_CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU map value, exclusive to this CPU during the run.
    unsafe {
        if (*c).jiffies == j {
            return (*c).ns;
        }
        let ns = bpf_ktime_get_coarse_ns();
        *c = CoarseClock { jiffies: j, ns };
        ns
    }
}

/// Atomic add on a map value field (`BPF_XADD`, result unused: valid on every BPF ISA
/// version the kernels we support accept).
#[inline(always)]
fn add(field: *mut u64, v: u64) {
    // SAFETY: `field` points into a map value, 8-byte aligned (all our u64 fields are).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, v) };
}

/// A pointer to `len` bytes of packet at `off`, or `None` if the packet is shorter.
/// Headers outside the linear area are pulled in first (`bpf_skb_pull_data`), which
/// does not change the packet's content. A pull invalidates every packet pointer
/// taken before it, so callers read what they need through the returned pointer
/// before they call this again.
#[inline(always)]
fn bytes_at(ctx: &TcContext, off: usize, len: usize) -> Option<*const u8> {
    // The bound is checked on the very pointer that is returned (`p + len`), so the
    // verifier's packet-range tracking applies to later accesses through `p`.
    let p = ctx.data() + off;
    if p + len <= ctx.data_end() {
        return Some(p as *const u8);
    }
    if (ctx.len() as usize) < off + len {
        return None;
    }
    ctx.pull_data((off + len) as u32).ok()?;
    let p = ctx.data() + off;
    if p + len <= ctx.data_end() {
        Some(p as *const u8)
    } else {
        None
    }
}

/// Reads a `T` at `p + off`, at any alignment. Built with
/// `+allows-misaligned-mem-access`, this is one load of `T`'s width: packet headers
/// sit at any alignment, and x86-64 and arm64 (`HAVE_EFFICIENT_UNALIGNED_ACCESS`)
/// let the verifier accept misaligned packet, stack and map accesses.
#[inline(always)]
fn ld<T: Copy>(p: *const u8, off: usize) -> T {
    // SAFETY: callers checked `off + size_of::<T>()` bytes with `bytes_at`.
    unsafe { core::ptr::read_unaligned(p.add(off).cast::<T>()) }
}

#[inline(always)]
fn be16(p: *const u8, off: usize) -> u16 {
    u16::from_be(ld::<u16>(p, off))
}

#[inline(always)]
fn be32(p: *const u8, off: usize) -> u32 {
    u32::from_be(ld::<u32>(p, off))
}

/// 16-byte address equality in two 64-bit compares.
#[inline(always)]
fn addr_eq(a: &Addr, b: &Addr) -> bool {
    let (a, b) = (a.0.as_ptr(), b.0.as_ptr());
    ld::<u64>(a, 0) == ld::<u64>(b, 0) && ld::<u64>(a, 8) == ld::<u64>(b, 8)
}

/// The IP header of a packet: what every path needs from it. Addresses are read
/// only by the paths that use them ([`src_dst`]).
struct Ip {
    l4_proto: u8,
    /// Offset of the transport header from the start of the frame.
    l4_off: usize,
    /// Bytes from the transport header to the end of the IP payload (IP length field).
    l4_len: usize,
    /// Bytes of the IP packet (header included).
    ip_len: u32,
    v6: bool,
}

enum Parsed {
    Ip(Ip),
    /// Not IP, or an IP packet without a transport header to look at (non-first
    /// fragment): nothing for us.
    Other,
    /// Claims an IP header it does not have, or an invalid one.
    Malformed,
}

/// Parses the IP header after a 14-byte Ethernet header. The L3 type comes from
/// `skb->protocol`, not from the Ethernet header: after BEET decapsulation changed
/// the family (IPv6 inner in IPv4 outer), the rebuilt MAC header still carries the
/// outer EtherType while `skb->protocol` is the inner one.
#[inline(always)]
fn parse_ip(ctx: &TcContext) -> Parsed {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    if proto == ETH_P_IPV6 {
        let Some(p) = bytes_at(ctx, ETH_HLEN, IPV6_HLEN) else {
            return Parsed::Malformed;
        };
        // Version (4 bits), payload length at 4, next header at 6.
        if ld::<u8>(p, 0) >> 4 != 6 {
            return Parsed::Malformed;
        }
        let payload = be16(p, 4) as usize;
        Parsed::Ip(Ip {
            l4_proto: ld::<u8>(p, 6),
            l4_off: ETH_HLEN + IPV6_HLEN,
            l4_len: payload,
            ip_len: (IPV6_HLEN + payload) as u32,
            v6: true,
        })
    } else if proto == ETH_P_IP {
        let Some(p) = bytes_at(ctx, ETH_HLEN, IPV4_HLEN) else {
            return Parsed::Malformed;
        };
        let vihl = ld::<u8>(p, 0);
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < IPV4_HLEN {
            return Parsed::Malformed;
        }
        let total = be16(p, 2) as usize;
        if total < ihl {
            return Parsed::Malformed;
        }
        if be16(p, 6) & 0x1fff != 0 {
            // A non-first fragment carries no transport header (RFC 791).
            return Parsed::Other;
        }
        Parsed::Ip(Ip {
            l4_proto: ld::<u8>(p, 9),
            l4_off: ETH_HLEN + ihl,
            l4_len: total - ihl,
            ip_len: total as u32,
            v6: false,
        })
    } else {
        Parsed::Other
    }
}

/// The 16 bytes at `p + off` as an address, in two 64-bit loads (a `[u8; 16]`
/// temporary would be byte-aligned, and the verifier refuses the misaligned stack
/// accesses LLVM then emits for it).
#[inline(always)]
fn ld_addr(p: *const u8, off: usize) -> Addr {
    // SAFETY: `Addr` is 16 plain bytes, 8-byte aligned, like `[u64; 2]`.
    unsafe { core::mem::transmute::<[u64; 2], Addr>([ld::<u64>(p, off), ld::<u64>(p, off + 8)]) }
}

/// The 4 bytes at `p + off` as an IPv4-mapped address (`::ffff:a.b.c.d`). Built in
/// little-endian words: this object is only ever built for `bpfel`.
#[inline(always)]
fn ld_addr4(p: *const u8, off: usize) -> Addr {
    let lo = 0xffff_0000u64 | (u64::from(ld::<u32>(p, off)) << 32);
    // SAFETY: as in `ld_addr`.
    unsafe { core::mem::transmute::<[u64; 2], Addr>([0, lo]) }
}

/// Source and destination address (IPv4 mapped into IPv6), read in place.
#[inline(always)]
fn src_dst(ctx: &TcContext, ip: &Ip) -> Option<(Addr, Addr)> {
    if ip.v6 {
        let p = bytes_at(ctx, ETH_HLEN + 8, 32)?;
        Some((ld_addr(p, 0), ld_addr(p, 16)))
    } else {
        let p = bytes_at(ctx, ETH_HLEN + 12, 8)?;
        Some((ld_addr4(p, 0), ld_addr4(p, 4)))
    }
}

/// An RTP packet: UDP ports and the fixed RTP header fields.
struct Rtp {
    sport: u16,
    dport: u16,
    seq: u16,
    ts: u32,
    ssrc: u32,
    pt: u8,
}

enum Udp {
    Rtp(Rtp),
    NotRtp,
    Malformed,
}

/// A UDP header as read in place, and where its payload starts when the packet
/// has at least the fixed RTP header's worth of it.
struct UdpHdr {
    sport: u16,
    dport: u16,
    /// The UDP length field (not checked yet).
    ulen: usize,
    /// `RTP_HLEN` payload bytes, bounds-checked; `None` when the packet ends sooner
    /// (a short datagram, or one the length field lies about).
    r: Option<*const u8>,
}

/// Reads the UDP header, or `None` if the packet is cut inside it.
#[inline(always)]
fn udp_hdr(ctx: &TcContext, ip: &Ip) -> Option<UdpHdr> {
    // One bounds check for the UDP and the fixed RTP header together when the packet
    // has them (every RTP and every ESP-in-UDP packet), two otherwise.
    let (u, r) = match bytes_at(ctx, ip.l4_off, UDP_HLEN + RTP_HLEN) {
        Some(u) => (u, Some(u.wrapping_add(UDP_HLEN))),
        None => (bytes_at(ctx, ip.l4_off, UDP_HLEN)?, None),
    };
    Some(UdpHdr {
        sport: be16(u, 0),
        dport: be16(u, 2),
        ulen: be16(u, 4) as usize,
        r,
    })
}

/// Recognises RTP in a UDP datagram: a media port (source or destination in the
/// configured range), version 2 (RFC 3550 §5.1), not RTCP (second octet 192..=223,
/// RFC 5761 §4), and long enough for the fixed header, the CSRC list and, when the X
/// bit is set, the extension header word.
#[inline(always)]
fn parse_rtp(h: &UdpHdr, ip: &Ip, cfg: &Config) -> Udp {
    let (sport, dport, ulen) = (h.sport, h.dport, h.ulen);
    if ulen < UDP_HLEN || ulen > ip.l4_len {
        return Udp::Malformed;
    }
    let in_range = |p: u16| p != 0 && p >= cfg.port_min && p <= cfg.port_max;
    if !in_range(sport) && !in_range(dport) {
        return Udp::NotRtp;
    }
    let payload = ulen - UDP_HLEN;
    if payload < RTP_HLEN {
        return Udp::NotRtp;
    }
    let Some(r) = h.r else {
        // The UDP length promised these bytes: the packet is truncated.
        return Udp::Malformed;
    };
    let (b0, b1) = (ld::<u8>(r, 0), ld::<u8>(r, 1));
    if b0 >> 6 != 2 || (192..=223).contains(&b1) {
        return Udp::NotRtp;
    }
    let mut need = RTP_HLEN + 4 * (b0 & 0x0f) as usize;
    if b0 & 0x10 != 0 {
        need += 4;
    }
    if payload < need {
        return Udp::NotRtp;
    }
    Udp::Rtp(Rtp {
        sport,
        dport,
        seq: be16(r, 2),
        ts: be32(r, 4),
        ssrc: be32(r, 8),
        pt: b1 & 0x7f,
    })
}

/// What a datagram on our HIP-over-UDP port ([`Config::esp_udp_port`]) carries.
enum EspUdp {
    /// UDP-encapsulated ESP (RFC 3948 §2.1), with its SPI (host order).
    Esp(u32),
    /// A HIP control packet behind the zero non-ESP marker (RFC 9028 §4.1).
    Hip,
    /// A NAT keepalive: one 0xFF byte (RFC 3948 §2.3).
    Keepalive,
    /// None of these: a bad UDP length, or too short for what its first bytes say.
    Malformed,
}

/// Demultiplexes a datagram on the HIP-over-UDP port the way the kernel's
/// `UDP_ENCAP_ESPINUDP` receive path does (`xfrm4_udp_encap_rcv()`,
/// `xfrm6_udp_encap_rcv()`): ESP only when the payload is longer than the 8-byte
/// ESP header and its first word (the SPI) is not zero. An 8-byte payload with a
/// non-zero SPI goes to the socket there, not to XFRM: it is no ESP packet, and is
/// counted as malformed here. Decided on the UDP length (the frame may carry
/// Ethernet padding beyond it), read through the pointers that were bounds-checked.
#[inline(always)]
fn esp_udp(ctx: &TcContext, ip: &Ip, h: &UdpHdr) -> EspUdp {
    let ulen = h.ulen;
    if ulen < UDP_HLEN || ulen > ip.l4_len {
        return EspUdp::Malformed;
    }
    let payload = ulen - UDP_HLEN;
    if payload < 4 {
        if payload != 1 {
            return EspUdp::Malformed;
        }
        let one = match h.r {
            Some(r) => ld::<u8>(r, 0),
            None => match short_load::<u8>(ctx, ip.l4_off + UDP_HLEN) {
                Some(b) => b,
                None => return EspUdp::Malformed,
            },
        };
        return if one == 0xff {
            EspUdp::Keepalive
        } else {
            EspUdp::Malformed
        };
    }
    let word = match h.r {
        Some(r) => ld::<u32>(r, 0),
        // The UDP length promised more than the packet has: truncated.
        None if payload >= RTP_HLEN => return EspUdp::Malformed,
        None => match short_load::<u32>(ctx, ip.l4_off + UDP_HLEN) {
            Some(w) => w,
            None => return EspUdp::Malformed,
        },
    };
    if word == 0 {
        EspUdp::Hip
    } else if payload > 8 {
        EspUdp::Esp(u32::from_be(word))
    } else {
        EspUdp::Malformed
    }
}

/// A `T` at `off` through `bpf_skb_load_bytes()`, for the few bytes of a datagram
/// shorter than `UDP_HLEN + RTP_HLEN` (keepalives, HIP packets cut short): a helper
/// call, but only there. Direct access would need a bounds check that may end at
/// the packet's last byte; for one byte LLVM emits it as `p < data_end`, from which
/// the verifier derives no packet range when `p`'s constant offset is 0 (the IP
/// header length makes the offset variable).
#[inline(always)]
fn short_load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Counts a datagram on the HIP-over-UDP port that is not ESP.
#[inline(always)]
fn not_esp(e: EspUdp) {
    match e {
        EspUdp::Esp(_) => {}
        EspUdp::Hip => stat(Stat::EspUdpHip),
        EspUdp::Keepalive => stat(Stat::EspUdpKeepalive),
        EspUdp::Malformed => stat(Stat::Malformed),
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    HIP_CONFIG.get(0)
}

#[inline(always)]
fn ingress(ctx: &TcContext) {
    let ip = match parse_ip(ctx) {
        Parsed::Ip(ip) => ip,
        Parsed::Other => return,
        Parsed::Malformed => return stat(Stat::Malformed),
    };
    // Plain and UDP-encapsulated ESP end in the same per-SPI path (one copy of it).
    let (spi, cfg) = match ip.l4_proto {
        IPPROTO_ESP => {
            let Some(spi) = esp_spi(ctx, &ip) else {
                return stat(Stat::Malformed);
            };
            let Some(cfg) = config() else { return };
            (spi, cfg)
        }
        IPPROTO_UDP => {
            let Some(cfg) = config() else { return };
            if ip.v6 {
                // HIT-to-HIT datagrams are flows (never ESP-in-UDP: its outer
                // addresses are locators); the address check comes first because it
                // is cheaper than the UDP/RTP header checks.
                let Some((src, dst)) = src_dst(ctx, &ip) else {
                    return;
                };
                if src.is_hit() && dst.is_hit() {
                    let Some(h) = udp_hdr(ctx, &ip) else {
                        return stat(Stat::Malformed);
                    };
                    return match parse_rtp(&h, &ip, cfg) {
                        Udp::Rtp(rtp) => flow_in(ctx, &ip, src, dst, &rtp, cfg),
                        Udp::NotRtp => stat(Stat::HitUdpNotRtp),
                        Udp::Malformed => stat(Stat::Malformed),
                    };
                }
            }
            // Between locators: only ESP-in-UDP to our HIP-over-UDP port is ours
            // (any source port: a NAT may have mapped the peer's).
            let port = cfg.esp_udp_port;
            if port == 0 {
                return;
            }
            let Some(h) = udp_hdr(ctx, &ip) else { return };
            if h.dport != port {
                return;
            }
            match esp_udp(ctx, &ip, &h) {
                EspUdp::Esp(spi) => (spi, cfg),
                other => return not_esp(other),
            }
        }
        _ => return,
    };
    esp_in(ctx, &ip, spi, cfg);
}

#[inline(always)]
fn esp_spi(ctx: &TcContext, ip: &Ip) -> Option<u32> {
    // ESP header: SPI (4) + sequence number (4), RFC 4303 §2.
    if ip.l4_len < 8 {
        return None;
    }
    let p = bytes_at(ctx, ip.l4_off, 8)?;
    Some(be32(p, 0))
}

/// The slot of an SPI: from this CPU's cache when it holds the SPI at the current
/// generation, else from `HIP_SPIS` (then cached, unknown SPIs included). The same
/// generation protocol as the guard's cache ([`guard_pass`]).
#[inline(always)]
fn spi_slot(spi: u32, dir: u32, cfg: &Config) -> Option<u32> {
    let gen_ = unsafe { core::ptr::read_volatile(&cfg.maps_gen) };
    let idx = (spi ^ (dir << 3)) & (SPI_CACHE_SLOTS - 1);
    let c = HIP_SPI_CACHE.get_ptr_mut(idx);
    if let Some(c) = c {
        // SAFETY: per-CPU map value, exclusive to this CPU during the run.
        unsafe {
            if (*c).valid != 0 && (*c).gen_ == gen_ && (*c).spi == spi && (*c).dir == dir {
                let slot = (*c).slot;
                return (slot != SPI_SLOT_NONE).then_some(slot);
            }
        }
    }
    let slot = match unsafe { HIP_SPIS.get(SpiKey { spi, dir }) } {
        Some(s) => s.slot,
        None => SPI_SLOT_NONE,
    };
    if let Some(c) = c {
        // SAFETY: as above.
        unsafe {
            *c = SpiCacheEntry {
                spi,
                dir,
                slot,
                gen_,
                valid: 1,
                _pad: 0,
            };
        }
    }
    (slot != SPI_SLOT_NONE).then_some(slot)
}

/// Counts one ESP packet on its SPI's per-CPU counters (no atomics, no shared
/// cache line written).
#[inline(always)]
fn count_spi(ctx: &TcContext, slot: u32, now: u64) {
    if let Some(c) = HIP_SPI_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU map value, exclusive to this CPU during the run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
            (*c).last_seen_ns = now;
        }
    }
}

/// Counts one inbound ESP packet (plain or UDP-encapsulated) on its SPI and checks
/// its outer source against the SPI's last one.
#[inline(always)]
fn esp_in(ctx: &TcContext, ip: &Ip, spi: u32, cfg: &Config) {
    let Some(slot) = spi_slot(spi, SPI_DIR_IN, cfg) else {
        return stat(Stat::EspInUnknownSpi);
    };
    stat(Stat::EspIn);
    let now = coarse_now();
    count_spi(ctx, slot, now);
    let Some(e) = HIP_SPI_STATE.get_ptr_mut(slot) else {
        return;
    };
    let Some((src, _)) = src_dst(ctx, ip) else {
        return;
    };
    // SAFETY: map value pointer; the u64 fields are 8-byte aligned.
    unsafe {
        // Sequence lock: read the sequence before `last_src`; an odd value means
        // another CPU is rewriting `last_src` right now (and reporting the change).
        let seq = core::ptr::read_volatile(&raw const (*e).src_seq);
        if seq & 1 != 0 {
            return;
        }
        let old = (*e).last_src;
        if addr_eq(&old, &src) {
            return;
        }
        let (_, won) = atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*e).src_seq,
            seq,
            seq + 1,
        );
        if !won {
            // Another CPU took the lock since we read `seq` (or `old` was torn by
            // its write): the change is theirs to report.
            return;
        }
        (*e).last_src = src;
        add(&raw mut (*e).src_seq, 1);
        // The agent seeds `last_src` with the peer's locator; an unseeded entry
        // learns its first source silently.
        if addr_eq(&old, &Addr::UNSPECIFIED) {
            return;
        }
        add(&raw mut (*e).locator_changes, 1);
        stat(Stat::LocatorChanges);
        let ev = Event {
            kind: EVENT_LOCATOR_CHANGE,
            spi,
            ts_ns: now,
            peer_hit: (*e).peer_hit,
            old_addr: old,
            new_addr: src,
            src_port: 0,
            dst_port: 0,
            _pad: 0,
        };
        if HIP_EVENTS.output::<Event>(&ev, 0).is_err() {
            stat(Stat::EventsLost);
        }
        info!(ctx, "hip: locator change on SPI {:x}", spi);
    }
}

/// The XFRM state the inner packet was decrypted with (its sec_path), or `None`
/// when it was not decrypted here.
#[inline(always)]
fn xfrm_state(ctx: &TcContext) -> Option<bpf_xfrm_state> {
    // Left uninitialised: the helper's buffer argument is ARG_PTR_TO_UNINIT_MEM, and
    // zeroing it costs a byte-by-byte memset subprogram call per packet.
    let mut xs = core::mem::MaybeUninit::<bpf_xfrm_state>::uninit();
    // SAFETY: the helper writes at most `size` bytes into `xs` and fills it all on
    // success (`bpf_skb_get_xfrm_state()`, net/core/filter.c).
    let r = unsafe {
        bpf_skb_get_xfrm_state(
            ctx.skb.skb,
            0,
            xs.as_mut_ptr(),
            size_of::<bpf_xfrm_state>() as u32,
            0,
        )
    };
    // SAFETY: filled on success, see above.
    (r == 0).then(|| unsafe { xs.assume_init() })
}

/// The SPI (host order) and outer source address of an XFRM state. `spi` and the
/// addresses are in network order (`x->id.spi`, `x->props.saddr`), so the words of
/// the address are already in memory order.
#[inline(always)]
fn xfrm_origin(xs: &bpf_xfrm_state) -> (u32, Addr) {
    let spi = u32::from_be(xs.spi);
    // SAFETY: the union member is chosen by `family`; both are plain integers, and
    // `Addr` is 16 plain bytes like `[u32; 4]`.
    let addr = unsafe {
        match xs.family {
            AF_INET => {
                let lo = 0xffff_0000u64 | (u64::from(xs.__bindgen_anon_1.remote_ipv4) << 32);
                core::mem::transmute::<[u64; 2], Addr>([0, lo])
            }
            AF_INET6 => {
                // The union sits at offset 12 of the 4-byte aligned struct: read it
                // in 32-bit words (volatile, so LLVM cannot merge them into 64-bit
                // loads, which the verifier would refuse as misaligned stack reads).
                let w = &raw const xs.__bindgen_anon_1.remote_ipv6;
                let word = |i: usize| u64::from(core::ptr::read_volatile((w as *const u32).add(i)));
                core::mem::transmute::<[u64; 2], Addr>([
                    word(0) | (word(1) << 32),
                    word(2) | (word(3) << 32),
                ])
            }
            _ => Addr::UNSPECIFIED,
        }
    };
    (spi, addr)
}

/// RTP arrival time in timestamp units since the flow's first packet (A.8
/// `arrival`), modulo 2³²: `elapsed × mult` modulo 2⁶⁴ has the same bits 32..63 as
/// the full product, and those are the units (see `Config::clock_mult`).
#[inline(always)]
fn arrival_units(elapsed_ns: u64, mult: u64) -> u32 {
    (elapsed_ns.wrapping_mul(mult) >> 32) as u32
}

// `&key`, `&init`: by value, `impl Borrow<K>` makes LLVM copy the 40-byte key twice
// more on the stack per packet; the borrow is for the code, not the types.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn flow_in(ctx: &TcContext, ip: &Ip, src: Addr, dst: Addr, rtp: &Rtp, cfg: &Config) {
    let now = unsafe { bpf_ktime_get_ns() };
    let xs = xfrm_state(ctx);
    let pt = (rtp.pt & 0x7f) as usize;
    let (clock, mult) = match (cfg.clock_hz.get(pt), cfg.clock_mult.get(pt)) {
        (Some(&c), Some(&m)) => (if c != 0 { c } else { cfg.default_clock_hz }, m),
        _ => (cfg.default_clock_hz, 0),
    };
    let key = FlowKey {
        src_hit: src,
        dst_hit: dst,
        src_port: rtp.sport,
        dst_port: rtp.dport,
        ssrc: rtp.ssrc,
    };
    let (f, new) = match HIP_FLOWS.get_ptr_mut(&key) {
        Some(f) => (f, false),
        None => {
            // A new flow: where it came from is the packet's SA or, without one, the
            // association's current SPI and preferred locator.
            let (spi, locator, via) = match &xs {
                Some(xs) => {
                    let (spi, a) = xfrm_origin(xs);
                    (spi, a, FLOW_VIA_XFRM)
                }
                None => match unsafe { HIP_ASSOCS.get(src) } {
                    Some(a) => (a.spi_in, a.locators[0], FLOW_VIA_ASSOC),
                    None => (0, Addr::UNSPECIFIED, 0),
                },
            };
            let init = FlowStats {
                packets: 0,
                bytes: 0,
                lost: 0,
                first_seen_ns: now,
                last_seen_ns: now,
                jitter_q4: 0,
                transit: 0,
                base_seq: u32::from(rtp.seq),
                max_seq: u32::from(rtp.seq),
                clock_hz: clock,
                spi,
                locator,
                payload_type: rtp.pt,
                via,
                _pad: [0; 6],
            };
            // NOEXIST: if another CPU created it meanwhile, use theirs.
            let _ = HIP_FLOWS.insert(&key, &init, BPF_NOEXIST as u64);
            match HIP_FLOWS.get_ptr_mut(&key) {
                Some(f) => (f, true),
                None => return stat(Stat::FlowInsertFailed),
            }
        }
    };
    stat(Stat::RtpIn);
    // SAFETY: map value pointer, fields naturally aligned.
    unsafe {
        add(&raw mut (*f).packets, 1);
        add(&raw mut (*f).bytes, u64::from(ip.ip_len));
        let received = (*f).packets;
        // Sequence numbers, RFC 3550 A.1 (without the probation of new sources: a
        // flow starts counting at its first packet).
        if !new {
            let max = (*f).max_seq;
            let udelta = rtp.seq.wrapping_sub(max as u16);
            if udelta < MAX_DROPOUT {
                let mut cycles = max & 0xffff_0000;
                if rtp.seq < max as u16 {
                    cycles = cycles.wrapping_add(0x1_0000);
                }
                (*f).max_seq = cycles | u32::from(rtp.seq);
            } else if udelta <= u16::MAX - MAX_MISORDER {
                // A large jump: the sender restarted its sequence. A.1 waits for a
                // second packet to confirm; we re-base at once and keep the loss
                // counted so far (expected − received stays as it was).
                let ext = (max & 0xffff_0000) | u32::from(rtp.seq);
                let lost_before = (*f).lost;
                (*f).max_seq = ext;
                (*f).base_seq = ext.wrapping_sub((received as i64 + lost_before - 1) as u32);
            }
            // Otherwise a duplicate or reordered packet: counted, max unchanged.
        }
        let expected = (*f).max_seq.wrapping_sub((*f).base_seq) as i64 + 1;
        (*f).lost = expected - received as i64;
        // Interarrival jitter, RFC 3550 A.8, in timestamp units × 16.
        let arrival = arrival_units(now.wrapping_sub((*f).first_seen_ns), mult);
        let transit = arrival.wrapping_sub(rtp.ts);
        if !new {
            let d = (transit.wrapping_sub((*f).transit) as i32).unsigned_abs();
            let j = (*f).jitter_q4;
            (*f).jitter_q4 = j.wrapping_add(d).wrapping_sub((j + 8) >> 4);
        }
        (*f).transit = transit;
        (*f).last_seen_ns = now;
        if let Some(xs) = &xs {
            // Follows rekeys and locator changes packet by packet.
            let (spi, locator) = xfrm_origin(xs);
            (*f).spi = spi;
            (*f).locator = locator;
            (*f).via = FLOW_VIA_XFRM;
        }
        (*f).payload_type = rtp.pt;
        (*f).clock_hz = clock;
    }
}

#[inline(always)]
fn egress(ctx: &TcContext) -> i32 {
    let ip = match parse_ip(ctx) {
        Parsed::Ip(ip) => ip,
        Parsed::Other => return TC_ACT_PIPE,
        Parsed::Malformed => {
            stat(Stat::Malformed);
            return TC_ACT_PIPE;
        }
    };
    // Plain and UDP-encapsulated ESP end in the same per-SPI path (one copy of it).
    let (spi, cfg) = match ip.l4_proto {
        IPPROTO_ESP => {
            let Some(spi) = esp_spi(ctx, &ip) else {
                stat(Stat::Malformed);
                return TC_ACT_PIPE;
            };
            let Some(cfg) = config() else {
                return TC_ACT_PIPE;
            };
            (spi, cfg)
        }
        IPPROTO_UDP => {
            let Some(cfg) = config() else {
                return TC_ACT_PIPE;
            };
            let port = cfg.esp_udp_port;
            if cfg.guard_enabled == 0 && port == 0 {
                return TC_ACT_PIPE;
            }
            let Some(h) = udp_hdr(ctx, &ip) else {
                if cfg.guard_enabled != 0 {
                    stat(Stat::Malformed);
                }
                return TC_ACT_PIPE;
            };
            // Before the media check: what leaves from our HIP-over-UDP port is
            // ESP-in-UDP (XFRM's encapsulation leaves from the SA's encap source
            // port, ours), HIP or a keepalive, never clear-text media, even if the media range
            // covered the port. Only the *source* port counts: the destination is
            // whatever a peer (or a hostile SDP) names, and a datagram aimed at the
            // peer's HIP port from a media port is still judged as media.
            if port != 0 && h.sport == port {
                match esp_udp(ctx, &ip, &h) {
                    EspUdp::Esp(spi) => (spi, cfg),
                    other => {
                        not_esp(other);
                        return TC_ACT_PIPE;
                    }
                }
            } else if cfg.guard_enabled == 0 {
                return TC_ACT_PIPE;
            } else {
                return guard(ctx, &ip, &h, cfg);
            }
        }
        _ => return TC_ACT_PIPE,
    };
    esp_out(ctx, spi, cfg);
    TC_ACT_PIPE
}

/// Counts one outbound ESP packet (plain or UDP-encapsulated) on its SPI.
#[inline(always)]
fn esp_out(ctx: &TcContext, spi: u32, cfg: &Config) {
    let Some(slot) = spi_slot(spi, SPI_DIR_OUT, cfg) else {
        return stat(Stat::EspOutUnknownSpi);
    };
    stat(Stat::EspOut);
    count_spi(ctx, slot, coarse_now());
}

/// The guard's verdict for `dst`: from this CPU's cache when the slot holds `dst`
/// at the current locator generation, else from `HIP_LOCATORS` (then cached).
///
/// The generation is read *before* the lookup and stored with its result, and the
/// agent moves it *after* changing the map: a verdict that may predate a change is
/// tagged with the old generation and never used once the change is visible. The
/// window in which a just-revoked locator still passes is the same as without the
/// cache (a lookup that ran just before the agent's delete).
#[inline(always)]
fn guard_pass(dst: &Addr, cfg: &Config) -> bool {
    let gen_ = unsafe { core::ptr::read_volatile(&cfg.maps_gen) };
    // Direct-mapped by the address's last byte (host part of IPv4 and of most IPv6
    // interface identifiers), so a handful of concurrent destinations rarely collide.
    let slot = u32::from(dst.0[15]) & (GUARD_CACHE_SLOTS - 1);
    let c = HIP_GUARD_CACHE.get_ptr_mut(slot);
    if let Some(c) = c {
        // SAFETY: per-CPU map value, exclusive to this CPU during the run.
        unsafe {
            if (*c).valid != 0 && (*c).gen_ == gen_ && addr_eq(&(*c).dst, dst) {
                return (*c).pass != 0;
            }
        }
    }
    let pass = match unsafe { HIP_LOCATORS.get(dst) } {
        Some(l) => {
            l.state == LocatorState::Active as u8 && l.assoc_state == AssocState::Established as u8
        }
        None => false,
    };
    if let Some(c) = c {
        // SAFETY: as above.
        unsafe {
            *c = GuardCacheEntry {
                dst: *dst,
                gen_,
                pass: u8::from(pass),
                valid: 1,
                _pad: [0; 2],
            };
        }
    }
    pass
}

/// The media guard (draft §5: media only to addresses HIP has verified). Clear-text
/// RTP leaving the host passes only towards an ACTIVE locator of an ESTABLISHED
/// association; everything else that is RTP is dropped and counted.
#[inline(always)]
fn guard(ctx: &TcContext, ip: &Ip, h: &UdpHdr, cfg: &Config) -> i32 {
    let rtp = match parse_rtp(h, ip, cfg) {
        Udp::Rtp(rtp) => rtp,
        Udp::NotRtp => return TC_ACT_PIPE,
        Udp::Malformed => {
            stat(Stat::Malformed);
            return TC_ACT_PIPE;
        }
    };
    let Some((src, dst)) = src_dst(ctx, ip) else {
        // parse_ip checked these bytes already; unreachable in practice.
        return TC_ACT_PIPE;
    };
    if guard_pass(&dst, cfg) {
        stat(Stat::GuardPassed);
        return TC_ACT_PIPE;
    }
    stat(Stat::GuardDropped);
    let now = unsafe { bpf_ktime_get_ns() };
    match HIP_GUARD_DROPS.get_ptr_mut(dst) {
        Some(g) => unsafe {
            add(&raw mut (*g).packets, 1);
            add(&raw mut (*g).bytes, u64::from(ip.ip_len));
            (*g).last_ns = now;
        },
        None => {
            let g = GuardDrop {
                packets: 1,
                bytes: u64::from(ip.ip_len),
                first_ns: now,
                last_ns: now,
            };
            if HIP_GUARD_DROPS.insert(dst, g, BPF_NOEXIST as u64).is_err() {
                // Another CPU created it first: add to theirs, no second event.
                if let Some(g) = HIP_GUARD_DROPS.get_ptr_mut(dst) {
                    unsafe {
                        add(&raw mut (*g).packets, 1);
                        add(&raw mut (*g).bytes, u64::from(ip.ip_len));
                    }
                }
                return TC_ACT_SHOT;
            }
            let ev = Event {
                kind: EVENT_GUARD_DROP,
                spi: 0,
                ts_ns: now,
                peer_hit: Addr::UNSPECIFIED,
                old_addr: src,
                new_addr: dst,
                src_port: rtp.sport,
                dst_port: rtp.dport,
                _pad: 0,
            };
            if HIP_EVENTS.output::<Event>(&ev, 0).is_err() {
                stat(Stat::EventsLost);
            }
            info!(ctx, "hip: media guard dropped RTP to an unverified address");
        }
    }
    TC_ACT_SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
