//! The datapath benchmark behind `cargo xtask bench` (needs root): per-packet cost
//! of each program from the kernel's own accounting (`run_time_ns / run_cnt` of
//! `bpf_prog_info`, collected while `BPF_ENABLE_STATS` is held), and the UDP packet
//! rate across a veth pair with the programs attached versus detached, interleaved in
//! the same run so that the ratio compares like with like.
//!
//! # The floor
//!
//! Every scenario also attaches `hip_tc_floor`, an empty tc program, the same way
//! (tcx on ≥ 6.6, netlink clsact before) on the same hooks. Its kernel-accounted
//! cost is what *any* program costs on this machine: the two `sched_clock()` reads
//! that run-time statistics add around each run (`__bpf_prog_run()`,
//! include/linux/filter.h) plus the indirect call. hip's programs are reported both
//! as measured and minus that floor; likewise the packet rate with the empty program
//! attached shows what attaching anything at all costs (tcx enables its static key
//! and the per-packet `tcx_run()` walk).
//!
//! For the flow scenario a second baseline, `hip_tc_probe` with all operations, does
//! only what per-packet flow accounting cannot do without (a precise timestamp, the
//! XFRM-state helper, one flow lookup, two atomic adds): the floor of any flow
//! program. `--micro` prices each of those operations alone ([`probes`]).
//!
//! # The packet rate
//!
//! The rates are measured with run-time statistics **off** (as in production: the
//! statistics themselves cost two clock reads per run); the per-packet costs in
//! separate rounds with them on. Each round runs the three modes (detached, floor,
//! hip) back to back in an order that rotates from round to round, and the ratios
//! are the **median** of the per-round ratios: other processes on a shared machine
//! shift whole rounds, and a ratio of adjacent measurements cancels most of that.
//! Rates are packets per second of the sending thread's CPU time (the veth path up
//! to the receiving socket runs in its context), so time other processes take from
//! it does not count; wall-clock rates are reported too. The sender is pinned to
//! CPU 0 and the reader to CPU 1, and the reader polls without sleeping, so that no
//! packet pays for waking it (an IPI, a VM exit under virtualisation).
//!
//! # Scenarios
//!
//! Each is the path a real packet takes:
//! * `guard-v4`: IPv4 RTP to a verified locator (egress: the media guard's pass
//!   verdict, from its per-CPU cache; ingress: parse, not ESP, not HIT-addressed);
//! * `flow-hit`: IPv6 RTP between HITs (ingress flow accounting: XFRM-state helper,
//!   LRU flow update with A.1/A.8 arithmetic; egress with the guard off, since
//!   clear-text HIT traffic would be dropped by design);
//! * `esp-v6`: ESP between locators from a raw socket (per-SPI counting on egress
//!   and ingress, locator check on ingress; the host kernel has no ESP and drops the
//!   packets after tc ingress): what every protected media packet costs;
//! * `esp-udp-v4`: the same ESP packets UDP-encapsulated (RFC 3948) between the
//!   HIP-over-UDP ports 10500 over IPv4, as through a NAT (a plain UDP socket
//!   receives them: the host kernel has no ESP to decapsulate them).

use std::{
    fs,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, tc, tc::SchedClassifierLinkId},
};
use hip_common::{
    HIP_UDP_PORT, PROBE_ALL, PROBE_ATOMICS, PROBE_KTIME, PROBE_LOOKUP, PROBE_OPS_GLOBAL,
    PROBE_XFRM, PROG_TC_FLOOR, PROG_TC_PROBE,
};

use crate::{
    AssocState, AssociationSpec, Datapath, Hook, LocatorState, MediaConfig, PeerLocator,
    tc_uses_tcx,
};

/// Kernel-accounted cost of one program over the cost rounds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProgCost {
    /// Mean run time per run (ns).
    pub ns: f64,
    /// Runs counted.
    pub runs: u64,
}

/// Packet rates of one mode: means over the rounds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ModeRate {
    /// Packets per second of the sender's CPU time.
    pub cpu_pps: f64,
    /// Packets per second of wall time.
    pub wall_pps: f64,
}

/// Result of one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioReport {
    pub name: &'static str,
    /// Rates with nothing attached, the empty program attached, hip's programs attached.
    pub detached: ModeRate,
    pub floor: ModeRate,
    pub attached: ModeRate,
    /// Median over the rounds of hip attached / detached, CPU-time rates (the issue's
    /// goal: ≥ 0.95).
    pub ratio: f64,
    /// The same from wall-time rates (noisy on a shared machine).
    pub ratio_wall: f64,
    /// Median over the rounds of empty program attached / detached (CPU time).
    pub floor_ratio: f64,
    /// Median over the rounds of hip attached / empty program attached (CPU time).
    pub ratio_vs_floor: f64,
    /// Median over the rounds of minimal flow program attached (ingress; empty
    /// program on egress) / detached: the best any flow program can do here. Flow
    /// scenario only.
    pub floor_flow_ratio: Option<f64>,
    /// Per-round hip attached / detached (CPU time), in round order (spread = noise).
    pub round_ratios: Vec<f64>,
    /// hip's egress program on the sender's veth, ingress program on the receiver's.
    pub egress: ProgCost,
    pub ingress: ProgCost,
    /// The empty program on the same two hooks.
    pub floor_egress: ProgCost,
    pub floor_ingress: ProgCost,
    /// `hip_tc_probe` with all operations on the ingress hook: the irreducible part
    /// of per-packet flow accounting (timestamp, XFRM state, one flow lookup, two
    /// atomic adds). Flow scenario only.
    pub floor_flow_ingress: Option<ProgCost>,
}

impl ScenarioReport {
    /// The programs' kernel-accounted time per packet (egress + ingress, run-time
    /// statistics included) as a share of a detached packet's CPU time: a low-noise
    /// bound on what attaching them can cost the packet rate (`1 − share`, before
    /// cache effects), next to the measured, noisier [`ScenarioReport::ratio`].
    pub fn cost_share(&self) -> f64 {
        (self.egress.ns + self.ingress.ns) * 1e-9 * self.detached.cpu_pps
    }

    /// hip's egress cost minus the empty program's (ns/packet).
    pub fn egress_net_ns(&self) -> f64 {
        self.egress.ns - self.floor_egress.ns
    }

    /// hip's ingress cost minus the empty program's (ns/packet).
    pub fn ingress_net_ns(&self) -> f64 {
        self.ingress.ns - self.floor_ingress.ns
    }
}

/// Options: packets per measurement and rounds (each round measures every mode).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub packets: u64,
    pub rounds: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            packets: 20_000,
            rounds: 20,
        }
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let fd = fs::File::open(&path)?;
            // SAFETY: valid fd; affects only this thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                anyhow::bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

fn rtp(seq: u16) -> [u8; 172] {
    let mut r = [0xd5u8; 172];
    r[0] = 0x80;
    r[1] = 0;
    r[2..4].copy_from_slice(&seq.to_be_bytes());
    r[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    r[8..12].copy_from_slice(&0x000b_e7c4_u32.to_be_bytes());
    r
}

/// CPU time consumed by the calling thread (`CLOCK_THREAD_CPUTIME_ID`: the
/// scheduler's precise `sum_exec_runtime`, which includes softirq work done in the
/// thread's context, since this kernel has no `CONFIG_IRQ_TIME_ACCOUNTING`).
fn thread_cpu() -> Duration {
    // SAFETY: all-zero is a valid timespec; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One measurement: packets per second of wall time and per second of the sending
/// thread's CPU time.
#[derive(Clone, Copy, Default)]
struct Rate {
    wall: f64,
    cpu: f64,
}

/// Sends `n` packets as fast as possible. veth delivery (`veth_xmit()` →
/// `__netif_rx()`, then the NET_RX softirq run by `local_bh_enable()` at the end of
/// `__dev_queue_xmit()`) happens in the sender's context, so the sender's time covers
/// both programs and the whole path up to the receiving socket. The CPU-time rate is
/// what a dedicated core would sustain: other processes on a shared machine take
/// wall time from the sender, not CPU time.
fn blast(tx: &Tx, n: u64, seq: &mut u16) -> Rate {
    let (t, c) = (Instant::now(), thread_cpu());
    for _ in 0..n {
        tx.send(*seq);
        *seq = seq.wrapping_add(1);
    }
    let cpu = (thread_cpu() - c).as_secs_f64();
    Rate {
        wall: n as f64 / t.elapsed().as_secs_f64(),
        cpu: if cpu > 0.0 { n as f64 / cpu } else { 0.0 },
    }
}

/// Pins the calling thread to one CPU (best effort; with fewer CPUs it stays free).
/// The sender on CPU 0 and the reader on CPU 1 keep the veth path (which runs in
/// the sender's context) on one CPU with warm caches and the reader out of its way.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity get valid
    // pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The empty program, loaded from the same object and attached on one hook.
struct Floor {
    ebpf: Ebpf,
    /// `PROG_TC_FLOOR` or `PROG_TC_PROBE`.
    name: &'static str,
    iface: &'static str,
    kind: TcAttachType,
    link: Option<SchedClassifierLinkId>,
}

impl Floor {
    fn load(name: &'static str, iface: &'static str, kind: TcAttachType) -> anyhow::Result<Self> {
        Self::load_with(name, 0, iface, kind)
    }

    /// `hip_tc_probe` with the `PROBE_*` operations in `ops`.
    fn probe(ops: u32, iface: &'static str, kind: TcAttachType) -> anyhow::Result<Self> {
        Self::load_with(PROG_TC_PROBE, ops, iface, kind)
    }

    fn load_with(
        name: &'static str,
        ops: u32,
        iface: &'static str,
        kind: TcAttachType,
    ) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global(PROBE_OPS_GLOBAL, &ops, true)
            .load(crate::object()?)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow::anyhow!("{name} missing from the object"))?
            .try_into()?;
        prog.load()?;
        Ok(Self {
            ebpf,
            name,
            iface,
            kind,
            link: None,
        })
    }

    fn prog(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(self.name)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Floor::load")
    }

    /// Attaches; call from the interface's namespace.
    fn attach(&mut self) -> anyhow::Result<()> {
        if !tc_uses_tcx() {
            // Netlink attachment needs clsact; EEXIST means it is there already.
            let _ = tc::qdisc_add_clsact(self.iface);
        }
        let (iface, kind) = (self.iface, self.kind);
        self.link = Some(self.prog().attach(iface, kind)?);
        Ok(())
    }

    /// Detaches; call from the interface's namespace.
    fn detach(&mut self) -> anyhow::Result<()> {
        if let Some(id) = self.link.take() {
            self.prog().detach(id)?;
        }
        Ok(())
    }

    /// Mean run time of `repeat` runs on `frame` under `BPF_PROG_TEST_RUN`.
    fn test_run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
        use aya::programs::{TestRun, TestRunOptions};
        let prog: &SchedClassifier = self
            .ebpf
            .program(self.name)
            .ok_or_else(|| anyhow::anyhow!("{} missing", self.name))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::new()
        })?;
        Ok(res.duration)
    }

    fn run_stats(&self) -> anyhow::Result<(Duration, u64)> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(self.name)
            .ok_or_else(|| anyhow::anyhow!("{} missing", self.name))?
            .try_into()?;
        let info = prog.info()?;
        Ok((info.run_time(), info.run_count()))
    }
}

/// Runs the benchmark in two namespaces of its own and returns one report per scenario.
pub fn run(opts: &BenchOptions) -> anyhow::Result<Vec<ScenarioReport>> {
    anyhow::ensure!(
        opts.packets > 0 && opts.rounds > 0,
        "packets and rounds must be > 0"
    );
    let pid = std::process::id();
    let (na, nb) = (format!("hipb-a-{pid}"), format!("hipb-b-{pid}"));
    sh(&["ip", "netns", "add", &na])?;
    let _ga = Ns(na.clone());
    sh(&["ip", "netns", "add", &nb])?;
    let _gb = Ns(nb.clone());
    sh(&[
        "ip", "link", "add", "va", "netns", &na, "type", "veth", "peer", "name", "vb", "netns", &nb,
    ])?;
    for (ns, ifc, v4, v6, hit, peer_hit, peer_v6) in [
        (
            &na,
            "va",
            "10.80.0.1/24",
            "2001:db8:9::1/64",
            "2001:20::a/128",
            "2001:20::b/128",
            "2001:db8:9::2",
        ),
        (
            &nb,
            "vb",
            "10.80.0.2/24",
            "2001:db8:9::2/64",
            "2001:20::b/128",
            "2001:20::a/128",
            "2001:db8:9::1",
        ),
    ] {
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", ns, "addr", "add", v4, "dev", ifc])?;
        sh(&["ip", "-n", ns, "addr", "add", v6, "dev", ifc, "nodad"])?;
        sh(&["ip", "-n", ns, "addr", "add", hit, "dev", "lo", "nodad"])?;
        sh(&["ip", "-n", ns, "link", "set", ifc, "up"])?;
        sh(&[
            "ip", "-n", ns, "-6", "route", "add", peer_hit, "via", peer_v6, "dev", ifc,
        ])?;
    }
    let mut reports = Vec::new();
    for kind in Kind::ALL {
        reports.push(scenario(kind, &na, &nb, opts)?);
    }
    Ok(reports)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Detached,
    /// The empty program on both hooks.
    Floor,
    /// The empty program on egress, the minimal flow program on ingress.
    FloorFlow,
    Hip,
}

/// The sender's and receiver's datapaths and floors, attached or not.
struct Rig<'a> {
    na: &'a str,
    nb: &'a str,
    dpa: Datapath,
    dpb: Datapath,
    fa: Floor,
    fb: Floor,
    fb_flow: Floor,
}

impl Rig<'_> {
    fn attach(&mut self, mode: Mode) -> anyhow::Result<()> {
        let (dpa, fa) = (&mut self.dpa, &mut self.fa);
        in_ns(self.na, || -> anyhow::Result<()> {
            match mode {
                Mode::Detached => {}
                Mode::Floor | Mode::FloorFlow => fa.attach()?,
                Mode::Hip => dpa.attach("va")?,
            }
            Ok(())
        })??;
        let (dpb, fb, fb_flow) = (&mut self.dpb, &mut self.fb, &mut self.fb_flow);
        in_ns(self.nb, || -> anyhow::Result<()> {
            match mode {
                Mode::Detached => {}
                Mode::Floor => fb.attach()?,
                Mode::FloorFlow => fb_flow.attach()?,
                Mode::Hip => dpb.attach("vb")?,
            }
            Ok(())
        })?
    }

    fn detach(&mut self, mode: Mode) -> anyhow::Result<()> {
        let (dpa, fa) = (&mut self.dpa, &mut self.fa);
        in_ns(self.na, || -> anyhow::Result<()> {
            match mode {
                Mode::Detached => {}
                Mode::Floor | Mode::FloorFlow => fa.detach()?,
                Mode::Hip => dpa.detach("va")?,
            }
            Ok(())
        })??;
        let (dpb, fb, fb_flow) = (&mut self.dpb, &mut self.fb, &mut self.fb_flow);
        in_ns(self.nb, || -> anyhow::Result<()> {
            match mode {
                Mode::Detached => {}
                Mode::Floor => fb.detach()?,
                Mode::FloorFlow => fb_flow.detach()?,
                Mode::Hip => dpb.detach("vb")?,
            }
            Ok(())
        })?
    }

    /// (egress on the sender, ingress on the receiver) run time and count, for hip's
    /// programs, the empty program, and the minimal flow program (ingress).
    fn run_stats(&self) -> anyhow::Result<[(Duration, u64); 5]> {
        Ok([
            self.dpa.program_run_stats(Hook::Egress)?,
            self.dpb.program_run_stats(Hook::Ingress)?,
            self.fa.run_stats()?,
            self.fb.run_stats()?,
            self.fb_flow.run_stats()?,
        ])
    }
}

/// The traffic of one scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// IPv4 RTP to a verified locator: the media guard's pass path on egress, an
    /// early exit (not ESP, not HIT-addressed) on ingress.
    GuardV4,
    /// IPv6 RTP between HITs: flow accounting on ingress (no XFRM state on the
    /// host: the association supplies SPI and locator); egress with the guard off.
    FlowHit,
    /// ESP between locators (raw IPv6 sockets; the host kernel has no ESP and drops
    /// it after tc ingress): per-SPI counting on egress and ingress, the path every
    /// protected media packet takes.
    EspV6,
    /// The same ESP in UDP between the HIP-over-UDP ports (IPv4, as behind a NAT):
    /// the UDP demultiplexing before the same per-SPI counting.
    EspUdpV4,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::GuardV4, Kind::FlowHit, Kind::EspV6, Kind::EspUdpV4];

    fn name(self) -> &'static str {
        match self {
            Kind::GuardV4 => "guard-v4",
            Kind::FlowHit => "flow-hit",
            Kind::EspV6 => "esp-v6",
            Kind::EspUdpV4 => "esp-udp-v4",
        }
    }

    /// UDP source and destination port of the scenario's packets.
    fn ports(self) -> (u16, u16) {
        match self {
            Kind::EspUdpV4 => (HIP_UDP_PORT, HIP_UDP_PORT),
            _ => (20000, 20010),
        }
    }

    /// Source and destination address of the scenario's packets.
    fn addrs(self) -> (IpAddr, IpAddr) {
        let p = |s: &str| s.parse::<IpAddr>().expect("literal address");
        match self {
            Kind::GuardV4 | Kind::EspUdpV4 => (p("10.80.0.1"), p("10.80.0.2")),
            Kind::FlowHit => (p("2001:20::a"), p("2001:20::b")),
            Kind::EspV6 => (p("2001:db8:9::1"), p("2001:db8:9::2")),
        }
    }
}

/// SPI of the ESP scenario: the sender's outbound SPI and the receiver's inbound one
/// in the bench's associations.
const BENCH_SPI: u32 = 0x1001;

/// ESP header (SPI, sequence number, RFC 4303 §2) and 160 bytes of "ciphertext".
fn esp(seq: u16) -> [u8; 168] {
    let mut e = [0x5au8; 168];
    e[0..4].copy_from_slice(&BENCH_SPI.to_be_bytes());
    e[4..8].copy_from_slice(&u32::from(seq).to_be_bytes());
    e
}

/// The scenario's sending socket.
enum Tx {
    /// A UDP socket, its destination, and whether it carries [`esp`] (else [`rtp`]).
    Udp(UdpSocket, SocketAddr, bool),
    /// A raw IPv6 socket for next header 50 and its destination.
    Esp(std::os::fd::OwnedFd, libc::sockaddr_in6),
}

impl Tx {
    fn open(kind: Kind, ns: &str) -> anyhow::Result<Self> {
        let (src, dst) = kind.addrs();
        let (sport, dport) = kind.ports();
        if kind != Kind::EspV6 {
            let tx = in_ns(ns, || UdpSocket::bind(SocketAddr::new(src, sport)))??;
            return Ok(Tx::Udp(
                tx,
                SocketAddr::new(dst, dport),
                kind == Kind::EspUdpV4,
            ));
        }
        let IpAddr::V6(dst6) = dst else {
            unreachable!("the ESP scenario is IPv6")
        };
        let fd = in_ns(ns, || {
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ESP) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh, valid fd that nothing else owns.
            Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        })??;
        // SAFETY: all-zero is a valid sockaddr_in6.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = dst6.octets();
        Ok(Tx::Esp(fd, sa))
    }

    fn send(&self, seq: u16) {
        match self {
            Tx::Udp(s, dst, false) => {
                let _ = s.send_to(&rtp(seq), dst);
            }
            Tx::Udp(s, dst, true) => {
                let _ = s.send_to(&esp(seq), dst);
            }
            Tx::Esp(fd, sa) => {
                let p = esp(seq);
                // SAFETY: valid fd, buffer and address.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        p.as_ptr().cast(),
                        p.len(),
                        0,
                        (sa as *const libc::sockaddr_in6).cast(),
                        size_of::<libc::sockaddr_in6>() as u32,
                    )
                };
            }
        }
    }
}

fn scenario(kind: Kind, na: &str, nb: &str, opts: &BenchOptions) -> anyhow::Result<ScenarioReport> {
    let name = kind.name();
    let tx = Tx::open(kind, na)?;
    // The receiving UDP socket; for ESP (which no socket receives) a UDP socket on
    // the same addresses only serves the neighbour-resolution warm-up.
    let (src, dst) = kind.addrs();
    let dst_sa = SocketAddr::new(dst, kind.ports().1);
    let rx = in_ns(nb, || UdpSocket::bind(dst_sa))??;
    let warm_tx = match &tx {
        Tx::Udp(s, ..) => s.try_clone()?,
        Tx::Esp(..) => in_ns(na, || UdpSocket::bind(SocketAddr::new(src, 20000)))??,
    };
    // A large receive buffer (SO_RCVBUFFORCE: root may exceed rmem_max).
    let sz: libc::c_int = 32 << 20;
    // SAFETY: valid socket and option pointer.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&sz as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    // The reader polls without ever sleeping: a sleeping reader makes every packet
    // wake it (an IPI to the other CPU, a VM exit under virtualisation) from the
    // sender's context, and whether it sleeps depends on the scheduler, not on the
    // programs under test.
    rx.set_nonblocking(true)?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            pin_to_cpu(1);
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                match rx.recv(&mut buf) {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::hint::spin_loop(),
                }
            }
        })
    };
    let res = (|| {
        pin_to_cpu(0);
        // Neighbour resolution before timing anything.
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Relaxed) == 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name}: warm-up packet never arrived"
            );
            let _ = warm_tx.send_to(&[0u8; 20], dst_sa);
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut rig = rig(kind, na, nb, crate::object()?)?;
        measure(kind, &mut rig, &tx, opts)
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    res
}

fn rig<'a>(kind: Kind, na: &'a str, nb: &'a str, obj: &[u8]) -> anyhow::Result<Rig<'a>> {
    let pid = std::process::id();
    let name = kind.name();
    let media = |guard| MediaConfig {
        guard,
        ports: 20000..=20100,
        ..MediaConfig::default()
    };
    let mut dpa = Datapath::load_object(
        obj,
        &PathBuf::from(format!("/sys/fs/bpf/hipb-a-{pid}-{name}")),
    )?;
    // Clear-text HIT-addressed RTP would be dropped by design: the flow scenario
    // measures the sender's egress with the guard off.
    dpa.set_media_config(&media(kind != Kind::FlowHit))?;
    let mut dpb = Datapath::load_object(
        obj,
        &PathBuf::from(format!("/sys/fs/bpf/hipb-b-{pid}-{name}")),
    )?;
    dpb.set_media_config(&media(true))?;
    dpa.upsert_association(&AssociationSpec {
        peer_hit: "2001:20::b".parse()?,
        local_hit: "2001:20::a".parse()?,
        locators: vec![PeerLocator {
            addr: "10.80.0.2".parse()?,
            state: LocatorState::Active,
        }],
        spi_in: 0x2002,
        spi_out: BENCH_SPI,
        state: AssocState::Established,
    })?;
    dpb.upsert_association(&AssociationSpec {
        peer_hit: "2001:20::a".parse()?,
        local_hit: "2001:20::b".parse()?,
        locators: vec![PeerLocator {
            addr: "2001:db8:9::1".parse()?,
            state: LocatorState::Active,
        }],
        spi_in: BENCH_SPI,
        spi_out: 0x2002,
        state: AssocState::Established,
    })?;
    Ok(Rig {
        na,
        nb,
        dpa,
        dpb,
        fa: Floor::load(PROG_TC_FLOOR, "va", TcAttachType::Egress)?,
        fb: Floor::load(PROG_TC_FLOOR, "vb", TcAttachType::Ingress)?,
        fb_flow: Floor::probe(PROBE_ALL, "vb", TcAttachType::Ingress)?,
    })
}

fn measure(
    kind: Kind,
    rig: &mut Rig<'_>,
    tx: &Tx,
    opts: &BenchOptions,
) -> anyhow::Result<ScenarioReport> {
    let name = kind.name();
    let mut seq = 0u16;
    // Warm the flow entry and caches once with hip attached (not measured).
    rig.attach(Mode::Hip)?;
    blast(tx, opts.packets.min(1000), &mut seq);
    rig.detach(Mode::Hip)?;

    // Packet rates, run-time statistics off.
    // The flow scenario also measures the minimal flow program: the best rate any
    // flow program can reach here.
    let modes: &[Mode] = if kind == Kind::FlowHit {
        &[Mode::Detached, Mode::Floor, Mode::Hip, Mode::FloorFlow]
    } else {
        &[Mode::Detached, Mode::Floor, Mode::Hip]
    };
    let mut rates: [Vec<Rate>; 4] = Default::default();
    for r in 0..opts.rounds as usize {
        for k in 0..modes.len() {
            let i = (r + k) % modes.len();
            rig.attach(modes[i])?;
            let res = blast(tx, opts.packets, &mut seq);
            rig.detach(modes[i])?;
            rates[i].push(res);
        }
    }

    // Per-packet cost, run-time statistics on (held by this fd; off when it closes).
    let before = rig.run_stats()?;
    {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
        // The minimal flow program is a baseline for the flow scenario only (its key
        // comes from the frame's first bytes, constant only for that traffic).
        let modes: &[Mode] = if kind == Kind::FlowHit {
            &[Mode::Floor, Mode::FloorFlow, Mode::Hip]
        } else {
            &[Mode::Floor, Mode::Hip]
        };
        for r in 0..opts.rounds as usize {
            for k in 0..modes.len() {
                let m = modes[(r + k) % modes.len()];
                rig.attach(m)?;
                blast(tx, opts.packets, &mut seq);
                rig.detach(m)?;
            }
        }
    }
    let after = rig.run_stats()?;
    let cost = |i: usize| {
        let runs = after[i].1 - before[i].1;
        let t = after[i].0.saturating_sub(before[i].0).as_nanos();
        ProgCost {
            ns: if runs == 0 {
                0.0
            } else {
                t as f64 / runs as f64
            },
            runs,
        }
    };
    let mode_rate = |v: &[Rate]| ModeRate {
        cpu_pps: v.iter().map(|r| r.cpu).sum::<f64>() / v.len() as f64,
        wall_pps: v.iter().map(|r| r.wall).sum::<f64>() / v.len() as f64,
    };
    let per_round = |a: &[Rate], b: &[Rate], f: fn(&Rate) -> f64| {
        a.iter()
            .zip(b)
            .map(|(x, y)| f(x) / f(y))
            .collect::<Vec<_>>()
    };
    let [det, flo, hip, flow_floor] = &rates;
    let round_ratios = per_round(hip, det, |r| r.cpu);
    Ok(ScenarioReport {
        name,
        detached: mode_rate(det),
        floor: mode_rate(flo),
        attached: mode_rate(hip),
        ratio: median(&round_ratios),
        ratio_wall: median(&per_round(hip, det, |r| r.wall)),
        floor_ratio: median(&per_round(flo, det, |r| r.cpu)),
        ratio_vs_floor: median(&per_round(hip, flo, |r| r.cpu)),
        round_ratios,
        egress: cost(0),
        ingress: cost(1),
        floor_egress: cost(2),
        floor_ingress: cost(3),
        floor_flow_ingress: (kind == Kind::FlowHit).then(|| cost(4)),
        floor_flow_ratio: (kind == Kind::FlowHit)
            .then(|| median(&per_round(flow_floor, det, |r| r.cpu))),
    })
}

/// One program on one crafted frame under `BPF_PROG_TEST_RUN`, and its size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MicroReport {
    pub scenario: &'static str,
    /// `egress` or `ingress`.
    pub hook: &'static str,
    /// Median over the trials of the kernel's mean time per repetition (ns): the
    /// program alone, without the clock reads of run-time statistics.
    pub ns: f64,
    /// The same for the empty program on the same frame.
    pub floor_ns: f64,
    /// The same for `hip_tc_probe` with all operations (flow scenario, ingress only).
    pub floor_flow_ns: Option<f64>,
    /// Verdict (3 = `TC_ACT_PIPE`, 2 = `TC_ACT_SHOT`).
    pub verdict: i32,
    /// Sizes the kernel reports: translated (xlated) and JIT-compiled bytes, and the
    /// instructions the verifier processed.
    pub xlated_bytes: u32,
    pub jited_bytes: u32,
    pub verified_insns: u32,
}

fn eth_frame(ethertype: u16, ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// The frame each scenario sends: UDP 20000 → 20010 carrying [`rtp`], [`esp`], or
/// UDP 10500 → 10500 carrying [`esp`].
fn scenario_frame(kind: Kind) -> Vec<u8> {
    let (src, dst) = kind.addrs();
    let (sport, dport) = kind.ports();
    let l4 = if kind == Kind::EspV6 {
        esp(7).to_vec()
    } else {
        let payload = if kind == Kind::EspUdpV4 {
            esp(7).to_vec()
        } else {
            rtp(7).to_vec()
        };
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&payload);
        udp
    };
    let proto = if kind == Kind::EspV6 { 50 } else { 17 };
    let mut ip = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&l4);
            eth_frame(0x0800, &ip)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(&l4);
            eth_frame(0x86dd, &ip)
        }
        _ => unreachable!("scenario addresses are of one family"),
    }
}

/// The programs' cost on each scenario's frame under `BPF_PROG_TEST_RUN` (no
/// attachment, no namespaces, no run-time statistics): a precise, repeatable number
/// for comparing program versions, next to the empty program's on the same frame.
/// `repeat` runs per trial, the median of `trials`. `obj`: another build of the
/// object to measure instead of the embedded one (the floor always comes from the
/// embedded one).
pub fn micro(repeat: u32, trials: u32, obj: Option<&[u8]>) -> anyhow::Result<Vec<MicroReport>> {
    anyhow::ensure!(repeat > 0 && trials > 0, "repeat and trials must be > 0");
    let obj = match obj {
        Some(o) => o,
        None => crate::object()?,
    };
    let mut out = Vec::new();
    for kind in Kind::ALL {
        let name = kind.name();
        let rig = rig(kind, "", "", obj)?;
        let frame = scenario_frame(kind);
        let flow_floor = (kind == Kind::FlowHit).then_some(&rig.fb_flow);
        for (hook, dp, floor, flow_floor) in [
            (Hook::Egress, &rig.dpa, &rig.fa, None),
            (Hook::Ingress, &rig.dpb, &rig.fb, flow_floor),
        ] {
            let (mut t, mut tf, mut tff) = (Vec::new(), Vec::new(), Vec::new());
            let mut verdict = 0;
            for _ in 0..trials {
                let (v, d) = dp.test_run_repeat(hook, &frame, repeat)?;
                verdict = v;
                t.push(d.as_nanos() as f64);
                tf.push(floor.test_run(&frame, repeat)?.as_nanos() as f64);
                if let Some(ff) = flow_floor {
                    tff.push(ff.test_run(&frame, repeat)?.as_nanos() as f64);
                }
            }
            let info = dp.program_info(hook)?;
            out.push(MicroReport {
                scenario: name,
                hook: match hook {
                    Hook::Egress => "egress",
                    Hook::Ingress => "ingress",
                },
                ns: median(&t),
                floor_ns: median(&tf),
                floor_flow_ns: flow_floor.map(|_| median(&tff)),
                verdict,
                xlated_bytes: info.size_translated().unwrap_or(0),
                jited_bytes: info.size_jitted(),
                verified_insns: info.verified_instruction_count().unwrap_or(0),
            });
        }
    }
    Ok(out)
}

/// The price of one operation of flow accounting on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeReport {
    /// The `PROBE_*` operations, e.g. `ktime` or `lookup+atomics`.
    pub ops: String,
    /// Median over the trials of the kernel's mean time per repetition (ns).
    pub ns: f64,
    /// The empty program in the same trials.
    pub floor_ns: f64,
}

/// `hip_tc_probe` under `BPF_PROG_TEST_RUN` on the flow scenario's frame, one
/// operation at a time and all together, next to the empty program: what each
/// operation a flow program needs costs here.
pub fn probes(repeat: u32, trials: u32) -> anyhow::Result<Vec<ProbeReport>> {
    anyhow::ensure!(repeat > 0 && trials > 0, "repeat and trials must be > 0");
    let frame = scenario_frame(Kind::FlowHit);
    let floor = Floor::load(PROG_TC_FLOOR, "", TcAttachType::Ingress)?;
    let mut out = Vec::new();
    for ops in [
        PROBE_KTIME,
        PROBE_XFRM,
        PROBE_LOOKUP,
        PROBE_LOOKUP | PROBE_ATOMICS,
        PROBE_ALL,
    ] {
        let probe = Floor::probe(ops, "", TcAttachType::Ingress)?;
        let (mut t, mut tf) = (Vec::new(), Vec::new());
        for _ in 0..trials {
            t.push(probe.test_run(&frame, repeat)?.as_nanos() as f64);
            tf.push(floor.test_run(&frame, repeat)?.as_nanos() as f64);
        }
        let names: Vec<&str> = [
            (PROBE_KTIME, "ktime"),
            (PROBE_XFRM, "xfrm-state"),
            (PROBE_LOOKUP, "lookup"),
            (PROBE_ATOMICS, "atomics"),
        ]
        .iter()
        .filter(|(b, _)| ops & b != 0)
        .map(|(_, n)| *n)
        .collect();
        out.push(ProbeReport {
            ops: names.join("+"),
            ns: median(&t),
            floor_ns: median(&tf),
        });
    }
    Ok(out)
}
