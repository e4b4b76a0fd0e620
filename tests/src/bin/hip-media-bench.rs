//! `hip-media-bench [SECS]`: what ESP costs the media (issue 16 item 2). For each ESP
//! transform the agent offers, a call between two agents through the trapezoid (full
//! path: SIP, HIP, BEET SAs, eBPF datapath), then UDP streams from bob to alice for SECS
//! seconds each (default 3), as fast as one sender thread can send:
//!
//! * **plaintext**: between the hosts' own addresses, before the call (the baseline, with
//!   the same eBPF programs attached);
//! * **ESP**: between the HITs, through the call's SAs.
//!
//! Two packet sizes: 172 octets (an RTP packet of 20 ms PCMU) for the packet rate, 1,200
//! for throughput. Reported: packets/s and Mbit/s received, ESP as a ratio of plaintext,
//! the agents' CPU during the ESP streams (from `/proc/PID/stat`; media never touches the
//! agent, so it should be what the same agents use idle with the call up, measured over
//! as long just before) and the eBPF programs' run time per packet and share of
//! the stream (`kernel.bpf_stats_enabled`, `bpftool prog show`). Needs root and ESP
//! (`cargo xtask bench` runs it in the VM); under TCG the absolute rates are an
//! emulator's, the ratios are what to read.
//!
//! Then the same ESP streams (AES-GCM-128) with alice behind a NAT (issue 13: HIP over
//! UDP, UDP-encapsulated ESP through nftables masquerade), as a ratio of the same call's
//! streams without NAT measured just before. (A plaintext baseline cannot cross the NAT
//! towards alice: nothing opened a binding for it.)

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hip_tests::{
    call::{ALICE_IP, BOB_IP, Options, Scenario},
    enter_netns,
};
use serde_json::{Value, json};

/// What one stream delivered.
#[derive(Clone, Copy, Debug)]
struct Stream {
    sent: u64,
    received: u64,
    /// First to last arrival.
    secs: f64,
    size: usize,
}

impl Stream {
    fn pps(&self) -> f64 {
        self.received as f64 / self.secs.max(1e-9)
    }
    fn mbps(&self) -> f64 {
        self.pps() * self.size as f64 * 8.0 / 1e6
    }
}

/// Sends `size`-octet datagrams from `src` (in `from_ns`) to `dst` (in `to_ns`) for
/// `secs`; counts what arrives.
fn stream(
    from_ns: &str,
    src: SocketAddr,
    to_ns: &str,
    dst: SocketAddr,
    size: usize,
    secs: f64,
) -> Result<Stream> {
    let done = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (to, d) = (to_ns.to_owned(), done.clone());
    let rx = thread::spawn(move || -> Result<(u64, f64)> {
        enter_netns(&to)?;
        let s = UdpSocket::bind(dst).context("receiver bind")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; 65536];
        let (mut n, mut first, mut last) = (0u64, None, Instant::now());
        loop {
            match s.recv(&mut buf) {
                Ok(_) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    n += 1;
                }
                Err(_) if d.load(Ordering::Relaxed) => break,
                Err(_) => {}
            }
        }
        Ok((n, first.map_or(0.0, |f| (last - f).as_secs_f64())))
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("receiver not ready")?;
    let from = from_ns.to_owned();
    let tx = thread::spawn(move || -> Result<u64> {
        enter_netns(&from)?;
        let s = UdpSocket::bind(src).context("sender bind")?;
        let pkt = vec![0x80u8; size];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            // ENOBUFS under load is a drop, as for any sender.
            if s.send_to(&pkt, dst).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    });
    let sent = tx.join().expect("sender")?;
    done.store(true, Ordering::Relaxed);
    let (received, secs) = rx.join().expect("receiver")?;
    Ok(Stream {
        sent,
        received,
        secs,
        size,
    })
}

/// CPU time (user + system) of `pid` so far, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1e3 / hz)
}

/// Total (run time ns, runs) of the datapath's programs (named `hip_*`).
fn bpf_runtime() -> Result<(u64, u64)> {
    let out = hip_tests::run("bpftool", ["prog", "show", "--json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let (mut ns, mut cnt) = (0, 0);
    for p in v.as_array().into_iter().flatten() {
        if p["name"].as_str().is_some_and(|n| n.starts_with("hip_")) {
            ns += p["run_time_ns"].as_u64().unwrap_or(0);
            cnt += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok((ns, cnt))
}

const SIZES: [usize; 2] = [172, 1200];

fn measure(transform: &str, secs: f64) -> Result<Value> {
    let s = Scenario::start(&Options {
        extra_config: format!("[hip]\nesp_transforms = [\"{transform}\"]\n"),
        ring_ms: Some(0),
        ..Options::default()
    })?;
    let (a_ns, b_ns) = (s.alice_ns().name().to_owned(), s.bob_ns().name().to_owned());
    let plain: Vec<Stream> = SIZES
        .iter()
        .map(|&size| {
            stream(
                &b_ns,
                format!("{BOB_IP}:0").parse()?,
                &a_ns,
                format!("{ALICE_IP}:40000").parse()?,
                size,
                secs,
            )
        })
        .collect::<Result<_>>()?;
    let call = s.call()?;
    let (sec, _) = s.wait_established()?;
    let pids = [s.alice.child.id(), s.bob.child.id()];
    // The agents' CPU with the call up and no media, over as long as the streams take:
    // what the streams add is the difference.
    let idle_for = Duration::from_secs_f64(secs * SIZES.len() as f64);
    let idle0 = pids.map(|p| cpu_ms(p).unwrap_or(f64::NAN));
    thread::sleep(idle_for);
    let idle1 = pids.map(|p| cpu_ms(p).unwrap_or(f64::NAN));
    let cpu0 = pids.map(|p| cpu_ms(p).unwrap_or(f64::NAN));
    let bpf0 = bpf_runtime()?;
    let t0 = Instant::now();
    let esp = esp_streams(&s, secs)?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let bpf1 = bpf_runtime()?;
    let cpu1 = pids.map(|p| cpu_ms(p).unwrap_or(f64::NAN));
    s.hangup(&call)?;
    if esp.iter().any(|e| e.received == 0) {
        bail!("{transform}: no ESP stream arrived: {esp:?}");
    }
    let bpf_ns = bpf1.0.saturating_sub(bpf0.0);
    let bpf_runs = bpf1.1.saturating_sub(bpf0.1);
    let negotiated = sec["associations"][0]["esp_transform"].clone();
    Ok(json!({
        "transform": transform,
        "negotiated": negotiated,
        "streams": SIZES.iter().zip(plain.iter().zip(&esp)).map(|(size, (p, e))| json!({
            "size": size,
            "plain_pps": p.pps(), "plain_mbps": p.mbps(), "plain_sent": p.sent, "plain_received": p.received,
            "esp_pps": e.pps(), "esp_mbps": e.mbps(), "esp_sent": e.sent, "esp_received": e.received,
            "ratio": e.pps() / p.pps(),
        })).collect::<Vec<_>>(),
        "agent_cpu_ms": [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]],
        "agent_idle_cpu_ms": [idle1[0] - idle0[0], idle1[1] - idle0[1]],
        "idle_wall_ms": idle_for.as_secs_f64() * 1e3,
        "stream_wall_ms": wall_ms,
        "bpf_runs": bpf_runs,
        "bpf_ns_per_run": if bpf_runs > 0 { bpf_ns as f64 / bpf_runs as f64 } else { f64::NAN },
        "bpf_share_of_wall": bpf_ns as f64 / 1e6 / wall_ms,
    }))
}

fn main() -> Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3.0);
    hip_tests::cleanup_own_namespaces();
    hip_tests::run("sysctl", ["-q", "-w", "kernel.bpf_stats_enabled=1"])?;
    println!(
        "media through ESP vs plaintext between the same hosts, bob -> alice, {secs} s per stream"
    );
    let mut all = Vec::new();
    for t in ["aes-gcm-128", "aes-128-cbc-hmac-sha256", "null-hmac-sha256"] {
        let r = measure(t, secs).with_context(|| t.to_owned())?;
        for st in r["streams"].as_array().into_iter().flatten() {
            println!(
                "  {:<24} {:>5} B  plain {:>9.0} pps {:>7.1} Mbit/s   ESP {:>9.0} pps {:>7.1} Mbit/s   ratio {:.2}",
                t,
                st["size"],
                st["plain_pps"].as_f64().unwrap_or(0.0),
                st["plain_mbps"].as_f64().unwrap_or(0.0),
                st["esp_pps"].as_f64().unwrap_or(0.0),
                st["esp_mbps"].as_f64().unwrap_or(0.0),
                st["ratio"].as_f64().unwrap_or(0.0),
            );
        }
        println!(
            "  {:<24} agents' CPU during the ESP streams: alice {:.0} ms, bob {:.0} ms of {:.0} ms (idle, call up, no media: {:.0} / {:.0} ms of {:.0} ms); eBPF {:.0} ns/run over {} runs, {:.1}% of the time",
            t,
            r["agent_cpu_ms"][0].as_f64().unwrap_or(f64::NAN),
            r["agent_cpu_ms"][1].as_f64().unwrap_or(f64::NAN),
            r["stream_wall_ms"].as_f64().unwrap_or(f64::NAN),
            r["agent_idle_cpu_ms"][0].as_f64().unwrap_or(f64::NAN),
            r["agent_idle_cpu_ms"][1].as_f64().unwrap_or(f64::NAN),
            r["idle_wall_ms"].as_f64().unwrap_or(f64::NAN),
            r["bpf_ns_per_run"].as_f64().unwrap_or(f64::NAN),
            r["bpf_runs"],
            r["bpf_share_of_wall"].as_f64().unwrap_or(f64::NAN) * 100.0,
        );
        all.push(r);
    }
    let nat = through_nat(secs)?;
    let direct = all
        .iter()
        .find(|r| r["transform"] == "aes-gcm-128")
        .context("the AES-GCM run")?;
    println!(
        "ESP through a NAT (alice behind nftables masquerade, UDP-encapsulated) vs without, aes-gcm-128:"
    );
    let mut nat_rows = Vec::new();
    for (size, n) in SIZES.iter().zip(&nat) {
        let d = direct["streams"]
            .as_array()
            .and_then(|v| v.iter().find(|s| s["size"] == *size))
            .context("direct stream")?;
        let d_pps = d["esp_pps"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:>5} B  through the NAT {:>9.0} pps {:>7.1} Mbit/s   without {:>9.0} pps   ratio {:.2}",
            size,
            n.pps(),
            n.mbps(),
            d_pps,
            n.pps() / d_pps
        );
        nat_rows.push(json!({"size": size, "nat_pps": n.pps(), "nat_mbps": n.mbps(), "direct_pps": d_pps, "ratio": n.pps() / d_pps}));
    }
    println!("{}", json!({ "media": all, "through_nat": nat_rows }));
    Ok(())
}

/// The ESP streams of every size, bob's HIT → alice's HIT, through the call's SAs.
fn esp_streams(s: &Scenario, secs: f64) -> Result<Vec<Stream>> {
    let (a_ns, b_ns) = (s.alice_ns().name(), s.bob_ns().name());
    SIZES
        .iter()
        .map(|&size| {
            stream(
                b_ns,
                format!("[{}]:0", s.bob_hit).parse()?,
                a_ns,
                format!("[{}]:40000", s.alice_hit).parse()?,
                size,
                secs,
            )
        })
        .collect()
}

/// ESP streams bob → alice with alice behind a NAT.
fn through_nat(secs: f64) -> Result<Vec<Stream>> {
    let s = Scenario::start(&Options {
        extra_config: "[hip]\nesp_transforms = [\"aes-gcm-128\"]\n".into(),
        ring_ms: Some(0),
        alice_behind_nat: true,
        ..Options::default()
    })?;
    let call = s.call()?;
    let (sec, _) = s.wait_established()?;
    if sec["associations"][0]["nat"].is_null() {
        bail!("the call did not go over UDP: {sec}");
    }
    let esp = esp_streams(&s, secs)?;
    s.hangup(&call)?;
    if esp.iter().any(|e| e.received == 0) {
        bail!("no ESP stream crossed the NAT: {esp:?}");
    }
    Ok(esp)
}
