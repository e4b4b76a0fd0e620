//! The datapath benchmark behind `cargo xtask bench` (needs root): per-packet cost
//! of each program from the kernel's own accounting (`kernel.bpf_stats_enabled`,
//! `run_time_ns / run_cnt` of `bpf_prog_info`), and the UDP packet rate across a veth
//! pair with the programs attached versus detached, interleaved in the same run so
//! that the ratio compares like with like.
//!
//! Two scenarios, each the path a real packet takes:
//! * `guard-v4`: IPv4 RTP to a verified locator (egress media guard: parse, one hash
//!   lookup, pass; ingress: parse, not HIT-addressed);
//! * `flow-hit`: IPv6 RTP between HITs (ingress flow accounting: XFRM-state helper,
//!   association lookup, LRU flow update with A.1/A.8 arithmetic; egress with the
//!   guard off, since clear-text HIT traffic would be dropped by design).

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

use crate::{
    AssocState, AssociationSpec, Datapath, DatapathOptions, Hook, LocatorState, MediaConfig,
    PeerLocator,
};

/// Result of one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioReport {
    pub name: &'static str,
    /// Mean sender rate (packets/s) over the detached rounds and the attached rounds.
    pub detached_pps: f64,
    pub attached_pps: f64,
    /// attached / detached.
    pub ratio: f64,
    /// Kernel-accounted mean cost per run (ns) of the egress program on the sender's
    /// veth and the ingress program on the receiver's, with their run counts.
    pub egress_ns: f64,
    pub egress_runs: u64,
    pub ingress_ns: f64,
    pub ingress_runs: u64,
}

/// Options: packets per round and rounds per mode (attached and detached alternate).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub packets: u64,
    pub rounds: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            packets: 100_000,
            rounds: 3,
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

/// Sends `n` packets as fast as possible; returns packets per second at the sender
/// (veth delivery runs in the sender's context, so this is the end-to-end cost).
fn blast(tx: &UdpSocket, dst: SocketAddr, n: u64) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let _ = tx.send_to(&rtp(i as u16), dst);
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Runs the benchmark in two namespaces of its own and returns one report per scenario.
pub fn run(opts: &BenchOptions) -> anyhow::Result<Vec<ScenarioReport>> {
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
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_before = fs::read_to_string(stats_path).unwrap_or_else(|_| "0".into());
    fs::write(stats_path, "1")?;
    let res = (|| {
        let mut reports = Vec::new();
        for (name, v4) in [("guard-v4", true), ("flow-hit", false)] {
            reports.push(scenario(name, v4, &na, &nb, opts)?);
        }
        Ok(reports)
    })();
    let _ = fs::write(stats_path, stats_before.trim());
    res
}

fn scenario(
    name: &'static str,
    v4: bool,
    na: &str,
    nb: &str,
    opts: &BenchOptions,
) -> anyhow::Result<ScenarioReport> {
    let (src, dst): (IpAddr, IpAddr) = if v4 {
        ("10.80.0.1".parse()?, "10.80.0.2".parse()?)
    } else {
        ("2001:20::a".parse()?, "2001:20::b".parse()?)
    };
    let dst_sa = SocketAddr::new(dst, 20010);
    let rx = in_ns(nb, || UdpSocket::bind(dst_sa))??;
    let tx = in_ns(na, || UdpSocket::bind(SocketAddr::new(src, 20000)))??;
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
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Neighbour resolution before timing anything.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: warm-up packet never arrived"
        );
        let _ = tx.send_to(&[0u8; 20], dst_sa);
        std::thread::sleep(Duration::from_millis(50));
    }

    let pid = std::process::id();
    let mut detached = Vec::new();
    let mut attached = Vec::new();
    let (mut eg_t, mut eg_n, mut in_t, mut in_n) = (0u128, 0u64, 0u128, 0u64);
    for _ in 0..opts.rounds {
        detached.push(blast(&tx, dst_sa, opts.packets));
        let media = |guard| MediaConfig {
            guard,
            ports: 20000..=20100,
            ..MediaConfig::default()
        };
        let mut dpa = in_ns(na, || {
            Datapath::start(&DatapathOptions {
                interfaces: vec!["va".into()],
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/hipb-a-{pid}")),
                media: media(v4),
            })
        })??;
        let mut dpb = in_ns(nb, || {
            Datapath::start(&DatapathOptions {
                interfaces: vec!["vb".into()],
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/hipb-b-{pid}")),
                media: media(true),
            })
        })??;
        dpa.upsert_association(&AssociationSpec {
            peer_hit: "2001:20::b".parse()?,
            local_hit: "2001:20::a".parse()?,
            locators: vec![PeerLocator {
                addr: "10.80.0.2".parse()?,
                state: LocatorState::Active,
            }],
            spi_in: 0x2002,
            spi_out: 0x1001,
            state: AssocState::Established,
        })?;
        dpb.upsert_association(&AssociationSpec {
            peer_hit: "2001:20::a".parse()?,
            local_hit: "2001:20::b".parse()?,
            locators: vec![PeerLocator {
                addr: "2001:db8:9::1".parse()?,
                state: LocatorState::Active,
            }],
            spi_in: 0x1001,
            spi_out: 0x2002,
            state: AssocState::Established,
        })?;
        attached.push(blast(&tx, dst_sa, opts.packets));
        let (t, n) = dpa.program_run_stats(Hook::Egress)?;
        eg_t += t.as_nanos();
        eg_n += n;
        let (t, n) = dpb.program_run_stats(Hook::Ingress)?;
        in_t += t.as_nanos();
        in_n += n;
        dpa.shutdown()?;
        dpb.shutdown()?;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (d, a) = (mean(&detached), mean(&attached));
    Ok(ScenarioReport {
        name,
        detached_pps: d,
        attached_pps: a,
        ratio: a / d,
        egress_ns: if eg_n == 0 {
            0.0
        } else {
            eg_t as f64 / eg_n as f64
        },
        egress_runs: eg_n,
        ingress_ns: if in_n == 0 {
            0.0
        } else {
            in_t as f64 / in_n as f64
        },
        ingress_runs: in_n,
    })
}
