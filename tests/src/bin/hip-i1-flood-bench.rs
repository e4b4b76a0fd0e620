//! `hip-i1-flood-bench [CALLS] [RATE]`: a legitimate base exchange's time while spoofed
//! I1s forging the legitimate caller's address arrive at RATE a second (default 10,000),
//! as a ratio against the same exchange without the flood, in the same run (the
//! reliability issue's finding 6; goal ≤ 2×).
//!
//! Two real agents (`hip-agent`, `$HIP_AGENT_BIN`) in namespaces, HIP over raw sockets,
//! no kernel offload (the host has no ESP; the exchange is the same). alice calls bob
//! CALLS times (default 40) with no flood, then CALLS times while a thread in alice's
//! namespace sends bob I1s from random HITs with alice's own address as source (the
//! kernel writes it: the forger needs no other host), then CALLS times with no flood
//! again. The exchange's time is alice's own record of it (`timing_ms`: I1 sent →
//! `Established`), so neither SIP nor the CLI's polling is in it. Reported: medians and
//! the ratio flood / no flood, the flood's achieved rate, and bob's R1 lane counters.

use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hip_tests::{
    attack::{self, RawHip},
    sip::{Agent, agent_pair, wait_calls_ended},
    wait_until,
};

/// One call: its base exchange's duration in ms, from alice's record.
fn one_call(alice: &Agent, bob: &Agent) -> Result<u64> {
    let call = alice.ctl(&["call", "sip:bob@biloxi.com"])?;
    let rec = wait_until(Duration::from_secs(30), "alice's association", || {
        let st = alice.status();
        let c = st["calls"].as_array()?.first()?.clone();
        c["security"]["associations"]
            .as_array()?
            .iter()
            .find(|r| r["state"] == "established")
            .cloned()
    })
    .with_context(|| {
        alice
            .log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let t = &rec["timing_ms"];
    let (Some(s), Some(e)) = (t["started"].as_u64(), t["established"].as_u64()) else {
        bail!("no timing in {rec}");
    };
    alice.ctl(&["hangup", call.trim()])?;
    wait_calls_ended(&[alice, bob], Duration::from_secs(30))?;
    Ok(e - s)
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    }
}

fn mean(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
}

fn series(alice: &Agent, bob: &Agent, n: usize) -> Result<Vec<u64>> {
    (0..n).map(|_| one_call(alice, bob)).collect()
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map_or(Ok(40), |a| a.parse())?;
    let rate: u32 = args.next().map_or(Ok(10_000), |a| a.parse())?;
    hip_tests::on_interrupt(hip_tests::cleanup_own_namespaces);
    let (a_ip, b_ip): (Ipv4Addr, Ipv4Addr) = ("10.121.0.1".parse()?, "10.121.0.2".parse()?);
    // The calls follow each other as fast as they complete, all from alice's address: bob's
    // INVITE rate per source is raised so that SIP admission never refuses one (this
    // measures HIP, and the flood is I1s, not INVITEs).
    let (p, alice, bob) = agent_pair(
        "i1fb",
        "10.121.0",
        "",
        "[limits]\ninvites_per_source_per_sec = 10000\ninvite_burst_per_source = 10000\n",
    );
    let bob_hit = hip_proto::Hit(
        bob.status()["hit"]
            .as_str()
            .context("bob's HIT")?
            .parse::<std::net::Ipv6Addr>()?
            .octets(),
    );

    // Warm-up (first exchange: caches, the pool entry), not counted.
    one_call(&alice, &bob)?;
    let before = series(&alice, &bob, calls)?;

    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let flood = std::thread::scope(|s| -> Result<(Vec<u64>, u64, Duration)> {
        let h = s.spawn(|| {
            p.a.run_in(move || {
                let raw = RawHip::new(b_ip).expect("raw socket");
                let mut rng = attack::rng(6);
                // Pre-built packets: the sender must keep up with the rate on a shared core.
                let pkts: Vec<Vec<u8>> = (0..4096)
                    .map(|i| {
                        let to = if i % 2 == 0 {
                            bob_hit
                        } else {
                            hip_proto::Hit([0; 16])
                        };
                        attack::i1(attack::random_hit(&mut rng), to, a_ip, b_ip)
                    })
                    .collect();
                let t0 = Instant::now();
                let n = attack::paced(
                    rate,
                    || st.load(Ordering::Relaxed),
                    |i| {
                        raw.send(&pkts[(i % 4096) as usize]);
                    },
                );
                (n, t0.elapsed())
            })
            .expect("alice's namespace")
        });
        // Let the flood run for a while first (buckets drained, queues full).
        std::thread::sleep(Duration::from_secs(3));
        let during = series(&alice, &bob, calls);
        stop.store(true, Ordering::Relaxed);
        let (n, took) = h.join().expect("flood thread");
        Ok((during?, n, took))
    });
    let (during, sent, took) = flood?;
    let after = series(&alice, &bob, calls)?;

    let lanes = bob.status()["limits"]["hip"].clone();
    let base: Vec<u64> = before.iter().chain(&after).copied().collect();
    let (m0, m1) = (median(base.clone()), median(during.clone()));
    // Whole milliseconds, and an exchange takes a few: the median is the measure; the mean
    // of the exchanges that needed no retransmission (an I1 or I2 resent after the 1 s RTO)
    // resolves it finer, and the retransmitted ones are counted apart.
    let quick = |v: &[u64]| v.iter().copied().filter(|t| *t < 500).collect::<Vec<_>>();
    let slow = |v: &[u64]| v.iter().filter(|t| **t >= 500).count();
    let (a0, a1) = (mean(&quick(&base)), mean(&quick(&during)));
    let ratio = m1 / m0.max(1.0);
    let achieved = sent as f64 / took.as_secs_f64();
    println!(
        "spoofed I1 flood forging the caller's address: {sent} I1s in {:.1} s = {achieved:.0}/s (asked {rate}/s)",
        took.as_secs_f64()
    );
    println!("  base exchange without flood (ms, before/after): {before:?} / {after:?}");
    println!("  base exchange during flood (ms): {during:?}");
    println!(
        "  median: {m0:.1} ms without, {m1:.1} ms with: ratio {ratio:.2} (goal <= 2.0); mean without retransmissions {a0:.2} / {a1:.2} ms (ratio {:.2}); retransmitted: {} of {} without, {} of {} with",
        a1 / a0.max(0.5),
        slow(&base),
        base.len(),
        slow(&during),
        during.len()
    );
    println!(
        "  bob's HIP driver: {} datagrams received, R1s sent to expected HITs {}, to others {}, I1s refused per address {}, for the strangers' budget {}, batches cut {}",
        lanes["received"],
        lanes["r1_sent_expected"],
        lanes["r1_sent_unexpected"],
        lanes["r1_rate_limited_address"],
        lanes["r1_rate_limited_unexpected"],
        lanes["batches_cut"]
    );
    drop((alice, bob, p));
    if achieved < f64::from(rate) * 0.9 {
        bail!("the flood reached only {achieved:.0}/s of {rate}/s");
    }
    if ratio > 2.0 {
        bail!("goal missed: ratio {ratio:.2} > 2");
    }
    Ok(())
}
