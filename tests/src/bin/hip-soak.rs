//! `hip-soak [--minutes N]` (default 30): legitimate calls between two real agents in
//! namespaces while an attacker on the caller's link runs, in turn, the floods and
//! barrages of the reliability tests (`tests/tests/host_reliability.rs`): never-ACKed
//! INVITEs from several addresses, half-open and dripping TCP connections, a HIP barrage
//! (bad checksums, unverifiable NOTIFYs), spoofed I1s forging the caller's address, and
//! malformed SIP and HIP. Run by `cargo xtask soak`, never in CI.
//!
//! Every 5 s both agents are sampled: RSS and descriptors from `/proc`, calls, calls
//! waiting for their ACK and association records from `status`. The run fails unless:
//!
//! * RSS, descriptors, calls and records stay bounded (no growth from the first third of
//!   the run to the last beyond a small slack; calls and records under their caps), and
//!   once the attacks stop everything drains back to no call and no record;
//! * every legitimate call completes: SIP confirmed, HIP established against bob's HIT,
//!   hung up, ended on both sides;
//! * no call, live or ended, ever reports a level it did not earn: nothing is `mutual` or
//!   `single-sided` (neither agent has `[security]` keys), and a level that claims HIP
//!   proof (`unverified` and up) rests on an association record that reached ESTABLISHED.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hip_tests::{
    VethPair,
    attack::{self, RawHip},
    sip::{Agent, NO_OFFLOAD, hip_key, scratch},
    wait_until,
};
use serde_json::Value;

const A_IP: &str = "10.123.0.1";
const B_IP: &str = "10.123.0.2";
/// Addresses of the attacker's other sources, on alice's link.
const SOURCES: u8 = 8;
const PHASE: Duration = Duration::from_secs(20);
const QUIET: Duration = Duration::from_secs(5);
const SAMPLE: Duration = Duration::from_secs(5);

/// bob's caps: the INVITE flood (8 sources × 50/s, 5/s each admitted, held 64·T1 = 3.2 s)
/// fills under half of the pending cap, so a legitimate INVITE is never refused for load.
const BOB_LIMITS: &str = "[limits]\nmax_pending_incoming_calls = 300\nmax_calls = 512\n\
    invites_per_source_per_sec = 5\ninvite_burst_per_source = 5\nmax_connections = 64\n\
    max_connections_per_source = 8\nmessage_timeout_secs = 2\nconnection_idle_secs = 5\n\
    [sip.timers]\nt1 = 50\nt2 = 400\nt4 = 500\n";

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at_s: u64,
    rss_kb: u64,
    fds: usize,
    calls: u64,
    pending: u64,
    records: u64,
}

#[derive(Default)]
struct Findings {
    violations: Vec<String>,
}

impl Findings {
    fn add(&mut self, v: String) {
        if self.violations.len() < 50 {
            eprintln!("!! {v}");
            self.violations.push(v);
        }
    }
}

/// Checks every call an agent shows, live or ended, for a level it did not earn.
fn check_levels(who: &str, st: &Value, f: &mut Findings) {
    let calls = st["calls"].as_array().into_iter().flatten();
    let ended = st["ended_calls"].as_array().into_iter().flatten();
    for c in calls.chain(ended) {
        let sec = &c["security"];
        let level = sec["verification"].as_str().unwrap_or("");
        let proved = sec["associations"]
            .as_array()
            .is_some_and(|v| v.iter().any(|r| r["reached_established"] == true));
        if matches!(level, "mutual" | "single-sided") {
            f.add(format!(
                "{who}: a call reads {level} with no [security] keys: {c}"
            ));
        } else if level == "unverified" && !proved {
            f.add(format!(
                "{who}: a call reads unverified without an established association: {c}"
            ));
        }
    }
}

fn sample(agent: &Agent, t0: Instant) -> (Sample, Value) {
    let st = agent.status();
    let l = &st["limits"];
    (
        Sample {
            at_s: t0.elapsed().as_secs(),
            rss_kb: attack::rss_kb(agent.child.id()),
            fds: attack::fd_count(agent.child.id()),
            calls: l["calls"].as_u64().unwrap_or(0),
            pending: l["pending_incoming_calls"].as_u64().unwrap_or(0),
            records: l["association_records"].as_u64().unwrap_or(0),
        },
        st,
    )
}

/// One legitimate call from alice to bob, to the end; the error says what did not happen.
fn legit_call(alice: &Agent, bob: &Agent, bob_hit: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let call = alice.ctl(&["call", "sip:bob@biloxi.com"])?;
    let call = call.trim();
    let handle: u64 = call
        .parse()
        .with_context(|| format!("call handle {call:?}"))?;
    let rec = wait_until(
        Duration::from_secs(30),
        "alice's association established",
        || {
            let st = alice.status();
            let c = st["calls"]
                .as_array()?
                .iter()
                .find(|c| c["handle"] == handle)?
                .clone();
            c["security"]["associations"]
                .as_array()?
                .iter()
                .find(|r| r["state"] == "established")
                .cloned()
        },
    )?;
    let took = t0.elapsed();
    if rec["peer_hit"] != bob_hit {
        bail!("alice established with {} instead of bob", rec["peer_hit"]);
    }
    alice.ctl(&["hangup", call])?;
    let ended = wait_until(
        Duration::from_secs(30),
        "the call to end on both sides",
        || {
            let a = alice.status();
            if !a["calls"].as_array()?.is_empty() {
                return None;
            }
            let b = bob.status();
            let bob_busy = b["calls"].as_array()?.iter().any(|c| {
                c["remote_uri"]
                    .as_str()
                    .is_some_and(|u| u.contains("alice"))
            });
            (!bob_busy).then(|| a["ended_calls"].as_array().and_then(|e| e.last().cloned()))?
        },
    )?;
    let level = &ended["security"]["verification"];
    if level != "unverified" {
        bail!("the ended call reads {level}, expected unverified: {ended}");
    }
    Ok(took)
}

struct Attacker {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<(String, u64)>>>,
}

/// Runs the attack phases in turn on a thread in alice's namespace until `stop`.
fn attack(p: &VethPair, bob_hit: hip_proto::Hit, a: &Attacker) {
    let (a_ip, b_ip): (Ipv4Addr, Ipv4Addr) = (A_IP.parse().unwrap(), B_IP.parse().unwrap());
    let dst = format!("{B_IP}:5060");
    let sip_dst: SocketAddr = dst.parse().unwrap();
    let sources: Vec<SocketAddr> = (1..=SOURCES)
        .map(|i| format!("10.123.1.{i}:5060").parse().unwrap())
        .collect();
    let stop = a.stop.clone();
    let sent = a.sent.clone();
    p.a.run_in(move || {
        let socks: Vec<UdpSocket> = sources
            .iter()
            .map(|s| {
                let u = UdpSocket::bind(s).expect("source address");
                u.set_nonblocking(true).unwrap();
                u
            })
            .collect();
        let drain = |socks: &[UdpSocket]| {
            let mut buf = [0u8; 2048];
            for s in socks {
                while s.recv_from(&mut buf).is_ok() {}
            }
        };
        let raw = RawHip::new(b_ip).expect("raw socket");
        let mut rng = attack::rng(12);
        let n = AtomicU64::new(0);
        let mut phase = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let end = Instant::now() + PHASE;
            let done = || stop.load(Ordering::Relaxed) || Instant::now() >= end;
            let (name, count) = match phase % 5 {
                0 => ("INVITE flood (8 sources x 50/s)", {
                    attack::paced(400, done, |i| {
                        let k = n.fetch_add(1, Ordering::Relaxed) as u32;
                        let s = (i % u64::from(SOURCES)) as usize;
                        let _ = socks[s].send_to(attack::flood_invite(sources[s], &dst, k).as_bytes(), &dst);
                        if i % 64 == 0 {
                            drain(&socks);
                        }
                    })
                }),
                1 => ("TCP half-open (50 every 3 s) and a 1 byte/s drip", {
                    let mut opened = 0u64;
                    let half = format!("OPTIONS sip:bob@{B_IP} SIP/2.0\r\nVia: SIP/2.0/TCP {A_IP}:5999;branch=z9hG4bKh\r\n");
                    let mut drip = TcpStream::connect_timeout(&sip_dst, Duration::from_secs(2)).ok();
                    let mut drip_bytes = half.bytes().cycle();
                    while !done() {
                        let conns: Vec<TcpStream> = (0..50)
                            .filter_map(|_| {
                                let mut c = TcpStream::connect_timeout(&sip_dst, Duration::from_secs(2)).ok()?;
                                let _ = c.write_all(half.as_bytes());
                                opened += 1;
                                Some(c)
                            })
                            .collect();
                        for _ in 0..3 {
                            if let Some(d) = drip.as_mut()
                                && d.write_all(&[drip_bytes.next().unwrap()]).is_err()
                            {
                                // Cut, as it should be: start another one.
                                drip = TcpStream::connect_timeout(&sip_dst, Duration::from_secs(2)).ok();
                                opened += 1;
                            }
                            std::thread::sleep(Duration::from_secs(1));
                        }
                        drop(conns);
                    }
                    opened
                }),
                2 => ("HIP barrage (bad checksums and unverifiable NOTIFYs, 5,000/s)", {
                    let bad = attack::bad_checksum_i1(bob_hit, a_ip, b_ip);
                    let notify = attack::unverified_notify(bob_hit, a_ip, b_ip);
                    attack::paced(5_000, done, |i| raw.send(if i % 10 == 0 { &notify } else { &bad }))
                }),
                3 => ("spoofed I1s forging alice's address (10,000/s)", {
                    let pkts: Vec<Vec<u8>> = (0..2048)
                        .map(|_| attack::i1(attack::random_hit(&mut rng), bob_hit, a_ip, b_ip))
                        .collect();
                    attack::paced(10_000, done, |i| raw.send(&pkts[(i % 2048) as usize]))
                }),
                _ => ("malformed SIP (500/s) and HIP (2,000/s)", {
                    let pkts: Vec<Vec<u8>> = (0..1024)
                        .map(|_| attack::malformed_hip(&mut rng, bob_hit, a_ip, b_ip))
                        .collect();
                    attack::paced(2_500, done, |i| {
                        if i % 5 == 0 {
                            let k = n.fetch_add(1, Ordering::Relaxed) as u32;
                            let s = (i % u64::from(SOURCES)) as usize;
                            let _ = socks[s].send_to(&attack::malformed_sip(sources[s], &dst, k), &dst);
                            if i % 320 == 0 {
                                drain(&socks);
                            }
                        } else {
                            raw.send(&pkts[(i % 1024) as usize]);
                        }
                    })
                }),
            };
            sent.lock().unwrap().push((name.to_owned(), count));
            phase += 1;
            let quiet = Instant::now() + QUIET;
            while Instant::now() < quiet && !stop.load(Ordering::Relaxed) {
                drain(&socks);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })
    .expect("alice's namespace");
}

fn max_by(s: &[Sample], f: impl Fn(&Sample) -> u64) -> u64 {
    s.iter().map(f).max().unwrap_or(0)
}

fn report_agent(who: &str, s: &[Sample]) -> String {
    let first = s.first().copied().unwrap_or_default();
    let last = s.last().copied().unwrap_or_default();
    format!(
        "{who}: RSS {} → max {} → end {} kB; fds {} → max {} → end {}; calls max {}; pending max {}; association records max {} (samples: {})",
        first.rss_kb,
        max_by(s, |x| x.rss_kb),
        last.rss_kb,
        first.fds,
        max_by(s, |x| x.fds as u64),
        last.fds,
        max_by(s, |x| x.calls),
        max_by(s, |x| x.pending),
        max_by(s, |x| x.records),
        s.len()
    )
}

/// Growth check: the last third's peak against the first third's, with slack.
fn bounded(
    who: &str,
    what: &str,
    s: &[Sample],
    slack: u64,
    f: impl Fn(&Sample) -> u64,
    out: &mut Findings,
) {
    let third = (s.len() / 3).max(1);
    let early = s[..third].iter().map(&f).max().unwrap_or(0);
    let late = s[s.len() - third..].iter().map(&f).max().unwrap_or(0);
    if late > early + slack {
        out.add(format!(
            "{who}: {what} grew: first third's peak {early}, last third's {late} (slack {slack})"
        ));
    }
}

fn main() -> Result<()> {
    let mut minutes: u64 = 30;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => minutes = args.next().context("--minutes N")?.parse()?,
            other => bail!("unknown argument {other:?} (usage: hip-soak [--minutes N])"),
        }
    }
    hip_tests::on_interrupt(hip_tests::cleanup_own_namespaces);
    let p = VethPair::new("soak", &[&format!("{A_IP}/24")], &[&format!("{B_IP}/24")])?;
    for i in 1..=SOURCES {
        p.a.ip(["addr", "add", &format!("10.123.1.{i}/16"), "dev", &p.if_a])?;
    }
    p.b.ip(["route", "add", "10.123.1.0/24", "dev", &p.if_b])?;
    let dir = scratch("soak");
    let alice = Agent::start(
        &p.a,
        hip_key(&dir, "alice").path.to_str().unwrap(),
        &format!(
            "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:{A_IP}:5060\"]\n\
             outbound_proxy = \"udp:{B_IP}:5060\""
        ),
        NO_OFFLOAD,
    )?;
    let bob = Agent::start(
        &p.b,
        hip_key(&dir, "bob").path.to_str().unwrap(),
        &format!(
            "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:{B_IP}:5060\", \"tcp:{B_IP}:5060\"]"
        ),
        &format!("{NO_OFFLOAD}{BOB_LIMITS}"),
    )?;
    let bob_hit_s = bob.status()["hit"]
        .as_str()
        .context("bob's HIT")?
        .to_owned();
    let bob_hit = hip_proto::Hit(bob_hit_s.parse::<std::net::Ipv6Addr>()?.octets());
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(minutes * 60);
    println!(
        "soak: {minutes} min, legitimate calls alice → bob under rotating attacks ({PHASE:?} each, {QUIET:?} apart)"
    );

    let attacker = Attacker {
        stop: Arc::new(AtomicBool::new(false)),
        sent: Arc::new(Mutex::new(Vec::new())),
    };
    let findings = Mutex::new(Findings::default());
    let samples: Mutex<(Vec<Sample>, Vec<Sample>)> = Mutex::new((Vec::new(), Vec::new()));
    let sampling = AtomicBool::new(true);
    let (mut ok, mut failed, mut times) = (0u64, 0u64, Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| attack(&p, bob_hit, &attacker));
        s.spawn(|| {
            while sampling.load(Ordering::Relaxed) {
                let (sa, st_a) = sample(&alice, t0);
                let (sb, st_b) = sample(&bob, t0);
                {
                    let mut f = findings.lock().unwrap();
                    check_levels("alice", &st_a, &mut f);
                    check_levels("bob", &st_b, &mut f);
                }
                let mut g = samples.lock().unwrap();
                g.0.push(sa);
                g.1.push(sb);
                if g.0.len().is_multiple_of(60) {
                    eprintln!("soak: {} s, {sb:?}", sb.at_s);
                }
                drop(g);
                let next = Instant::now() + SAMPLE;
                while Instant::now() < next && sampling.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        while Instant::now() < deadline {
            match legit_call(&alice, &bob, &bob_hit_s) {
                Ok(t) => {
                    ok += 1;
                    times.push(t.as_millis() as u64);
                }
                Err(e) => {
                    failed += 1;
                    findings.lock().unwrap().add(format!(
                        "legitimate call {} failed at {} s: {e:#}",
                        ok + failed,
                        t0.elapsed().as_secs()
                    ));
                    // Whatever is left of it must not block the next one.
                    for c in alice.status()["calls"].as_array().into_iter().flatten() {
                        let _ = alice.ctl(&["hangup", &c["handle"].to_string()]);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        attacker.stop.store(true, Ordering::Relaxed);
        sampling.store(false, Ordering::Relaxed);
    });
    let mut findings = findings.into_inner().unwrap();
    // With the attacks over, everything drains: no call and no record left on either side.
    let drained = wait_until(Duration::from_secs(60), "both agents to drain", || {
        let (a, b) = (alice.status(), bob.status());
        let idle =
            |st: &Value| st["limits"]["calls"] == 0 && st["limits"]["association_records"] == 0;
        (idle(&a) && idle(&b)).then_some(())
    });
    if let Err(e) = drained {
        findings.add(format!(
            "{e:#}: alice {} / bob {}",
            alice.status()["limits"],
            bob.status()["limits"]
        ));
    }
    let (sa, sb) = samples.into_inner().unwrap();
    let (fa, fb) = (sample(&alice, t0).0, sample(&bob, t0).0);
    for (who, s) in [("alice", &sa), ("bob", &sb)] {
        if s.len() >= 6 {
            bounded(who, "RSS (kB)", s, 8 * 1024, |x| x.rss_kb, &mut findings);
            bounded(who, "descriptors", s, 16, |x| x.fds as u64, &mut findings);
            bounded(
                who,
                "association records",
                s,
                50,
                |x| x.records,
                &mut findings,
            );
        }
        if max_by(s, |x| x.calls) > 512 {
            findings.add(format!("{who}: more calls than max_calls"));
        }
        if max_by(s, |x| x.fds as u64) > 64 + 64 {
            findings.add(format!("{who}: descriptors beyond the connection cap"));
        }
    }
    times.sort_unstable();
    let pct = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!("\n== soak figures ({} s)", t0.elapsed().as_secs());
    println!(
        "legitimate calls: {ok} completed, {failed} failed; INVITE → HIP established: median {} ms, p95 {} ms, max {} ms",
        pct(0.5),
        pct(0.95),
        times.last().copied().unwrap_or(0)
    );
    let mut by_phase: Vec<(String, u64, u64)> = Vec::new();
    for (name, n) in attacker.sent.lock().unwrap().iter() {
        match by_phase.iter_mut().find(|(k, _, _)| k == name) {
            Some(e) => {
                e.1 += 1;
                e.2 += n;
            }
            None => by_phase.push((name.clone(), 1, *n)),
        }
    }
    for (name, runs, n) in &by_phase {
        println!("attack: {name}: {runs} phases, {n} sent");
    }
    println!("{}", report_agent("alice", &sa));
    println!("{}", report_agent("bob", &sb));
    println!("after the attacks: alice {fa:?}; bob {fb:?}");
    let st = bob.status();
    println!("bob's limits counters: {}", st["limits"]);
    println!(
        "checks: bounded state, every legitimate call completes, no unearned level: {}",
        if findings.violations.is_empty() && failed == 0 {
            "all hold".to_owned()
        } else {
            format!("{} violations", findings.violations.len())
        }
    );
    for v in &findings.violations {
        println!("!! {v}");
    }
    drop((alice, bob, p));
    if !findings.violations.is_empty() || ok == 0 {
        bail!("soak failed");
    }
    Ok(())
}
