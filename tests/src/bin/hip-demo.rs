//! `hip-demo`: the scenario `cargo xtask demo` shows — the draft's Figure 1 in network
//! namespaces, a SIP call from alice to bob through two Kamailio proxies, the HIP base
//! exchange against the HIT bob's SDP carried, BEET SAs in the kernel, RTP between the
//! HITs, the hang-up — printed as a timeline read back from an independent capture
//! (tshark), the agents' status and the kernel.
//!
//! Needs root and a kernel with ESP; `cargo xtask demo` runs it in the VM when the host
//! kernel has none. Interrupting it (Ctrl-C, SIGTERM) removes everything it created.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use hip_tests::{
    call::{self, Options, Packet, Scenario, xfrm_counts},
    edge_call,
};
use serde_json::Value;

const RTP_PACKETS: u32 = 150;

fn name(ip: &str) -> &str {
    match ip {
        "192.0.2.1" => "alice",
        "192.0.2.2" => "atlanta.com",
        "192.0.2.3" => "biloxi.com",
        "192.0.2.4" => "bob",
        other => other,
    }
}

fn hip_name(t: u8) -> String {
    match t {
        1 => "I1".into(),
        2 => "R1".into(),
        3 => "I2".into(),
        4 => "R2".into(),
        16 => "UPDATE".into(),
        17 => "NOTIFY".into(),
        18 => "CLOSE".into(),
        19 => "CLOSE_ACK".into(),
        t => format!("type {t}"),
    }
}

/// The draft's F1–F12 (section 3.3): sender, receiver, method or status.
const FLOW: [(&str, &str, &str); 12] = [
    ("192.0.2.1", "192.0.2.2", "INVITE"),
    ("192.0.2.2", "192.0.2.1", "100"),
    ("192.0.2.2", "192.0.2.3", "INVITE"),
    ("192.0.2.3", "192.0.2.2", "100"),
    ("192.0.2.3", "192.0.2.4", "INVITE"),
    ("192.0.2.4", "192.0.2.3", "180"),
    ("192.0.2.3", "192.0.2.2", "180"),
    ("192.0.2.2", "192.0.2.1", "180"),
    ("192.0.2.4", "192.0.2.3", "200"),
    ("192.0.2.3", "192.0.2.2", "200"),
    ("192.0.2.2", "192.0.2.1", "200"),
    ("192.0.2.1", "192.0.2.4", "ACK"),
];

/// Labels the packets of the call's INVITE transaction with the draft's F-numbers: F1 is
/// the last INVITE alice sent before atlanta forwarded one (the first may have been
/// challenged with 407), the others the first match after it.
fn label_flow(pkts: &[Packet]) -> BTreeMap<usize, usize> {
    let sip = |i: usize, f: usize| {
        let p = &pkts[i];
        let (s, d, w) = FLOW[f];
        p.src == s && p.dst == d && p.sip.as_deref() == Some(w)
    };
    let mut labels = BTreeMap::new();
    let Some(f3) = (0..pkts.len()).find(|&i| sip(i, 2)) else {
        return labels;
    };
    let Some(f1) = (0..f3).rev().find(|&i| sip(i, 0)) else {
        return labels;
    };
    labels.insert(f1, 1);
    let mut from = f1 + 1;
    for f in 1..FLOW.len() {
        if let Some(i) = (from..pkts.len()).find(|&i| sip(i, f) && !labels.contains_key(&i)) {
            labels.insert(i, f + 1);
            from = if f == 1 { from } else { i + 1 };
        }
    }
    labels
}

fn spi_of(v: &Value, key: &str) -> String {
    v[key].as_u64().map_or("?".into(), |s| format!("{s:#010x}"))
}

fn main() {
    // A signal wakes a thread that cleans up (destructors do not run on a signal). The
    // handler only writes to a pipe; the signal mask stays untouched, so the agents,
    // proxies and captures this process starts get SIGTERM/SIGINT normally.
    hip_tests::on_interrupt(|| {
        eprintln!("\ninterrupted: removing the demo's namespaces, proxies and agents");
        hip_tests::cleanup_own_namespaces();
    });
    if let Err(e) = run() {
        eprintln!("hip-demo: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    println!("hip demo — the draft's Figure 1 (draft-tschofenig-hiprg-host-identities §3.3)");
    println!(
        "building the network: alice, atlanta.com proxy, biloxi.com proxy, bob (namespaces + a bridge)\n"
    );
    let mut s = Scenario::start(&Options::default()).context("starting the scenario")?;
    println!(
        "  alice   sip:alice@atlanta.com  {}  HIT {}",
        call::ALICE_IP,
        s.alice_hit
    );
    println!("  atlanta.com proxy (Kamailio, MD5 digest)      192.0.2.2");
    println!("  biloxi.com proxy (Kamailio, SHA-256 digest)   192.0.2.3");
    println!(
        "  bob     sip:bob@biloxi.com     {}  HIT {}",
        call::BOB_IP,
        s.bob_hit
    );
    println!("both agents registered (digest authentication); alice calls bob\n");

    let handle = s.call()?;
    let (a, b) = s.wait_established()?;
    let ka = a["associations"][0]["kernel"].clone();
    let kb = b["associations"][0]["kernel"].clone();
    let states_during = [xfrm_counts(s.alice_ns())?, xfrm_counts(s.bob_ns())?];
    println!(
        "streaming {RTP_PACKETS} RTP packets (20 ms apart) from [{}]:{} to [{}]:{} — ordinary UDP sockets, not the agent",
        s.alice_hit,
        call::RTP_PORT,
        s.bob_hit,
        call::RTP_PORT
    );
    let rtp = s.stream_rtp(RTP_PACKETS)?;
    let flow =
        Scenario::wait_call_security(&s.bob, "bob's flow", Duration::from_secs(30), |sec| {
            sec["flows"].as_array().is_some_and(|f| {
                f.iter()
                    .any(|f| f["packets"].as_u64() >= Some(u64::from(RTP_PACKETS)))
            })
        })?["flows"][0]
            .clone();
    s.hangup(&handle)?;
    let states_after = [xfrm_counts(s.alice_ns())?, xfrm_counts(s.bob_ns())?];
    let pcap = s.stop_capture()?;
    let pkts = call::read_pcap(&pcap)?;
    let labels = label_flow(&pkts);

    println!("\n== timeline (capture on the LAN bridge, decoded by tshark)");
    let mut esp: BTreeMap<(String, String, u32), (f64, u64)> = BTreeMap::new();
    for (i, p) in pkts.iter().enumerate() {
        let (src, dst) = (name(&p.src), name(&p.dst));
        if p.proto == 50 {
            let e = esp
                .entry((src.to_owned(), dst.to_owned(), p.spi.unwrap_or(0)))
                .or_insert((p.time, 0));
            e.1 += 1;
            if e.1 == 1 {
                println!(
                    "  {:7.3}s       ESP   {src:>11} → {dst:<11} SPI {:#010x} (first packet)",
                    p.time,
                    p.spi.unwrap_or(0)
                );
            }
            continue;
        }
        if let Some(t) = p.hip_type {
            println!(
                "  {:7.3}s       HIP   {src:>11} → {dst:<11} {}",
                p.time,
                hip_name(t)
            );
            continue;
        }
        if let Some(m) = &p.sip {
            let f = labels.get(&i).map_or(String::new(), |f| format!("F{f}"));
            println!("  {:7.3}s {f:>4}  SIP   {src:>11} → {dst:<11} {m}", p.time);
        }
    }
    println!("\n== ESP between the hosts (kernel BEET SAs; the agents never touch these packets)");
    for ((src, dst, spi), (_, n)) in &esp {
        println!("  {src:>5} → {dst:<5} SPI {spi:#010x}: {n} packets");
    }
    println!("\n== kernel state during the call (ip xfrm)");
    println!(
        "  alice: {} SAs, {} policies; {} SPI in {} out {} reqid {}",
        states_during[0].0,
        states_during[0].1,
        ka["transform"].as_str().unwrap_or("?"),
        spi_of(&ka, "spi_in"),
        spi_of(&ka, "spi_out"),
        spi_of(&ka, "reqid")
    );
    println!(
        "  bob:   {} SAs, {} policies; {} SPI in {} out {} reqid {}",
        states_during[1].0,
        states_during[1].1,
        kb["transform"].as_str().unwrap_or("?"),
        spi_of(&kb, "spi_in"),
        spi_of(&kb, "spi_out"),
        spi_of(&kb, "reqid")
    );
    println!("\n== RTP statistics (bob's eBPF flow table)");
    println!(
        "  [{}]:{} → [{}]:{} SSRC {:#x}: {} packets, {} bytes, {} lost, jitter {:.3} ms, SPI {}, from locator {}",
        flow["src_hit"].as_str().unwrap_or(""),
        flow["src_port"],
        flow["dst_hit"].as_str().unwrap_or(""),
        flow["dst_port"],
        flow["ssrc"].as_u64().unwrap_or(0),
        flow["packets"],
        flow["bytes"],
        flow["lost"],
        flow["jitter_ms"].as_f64().unwrap_or(0.0),
        spi_of(&flow, "spi"),
        flow["locator"].as_str().unwrap_or("?")
    );

    let direct: Vec<&Packet> = pkts
        .iter()
        .filter(|p| {
            let ends = [p.src.as_str(), p.dst.as_str()];
            ends.contains(&call::ALICE_IP) && ends.contains(&call::BOB_IP)
        })
        .collect();
    let clear = direct
        .iter()
        .filter(|p| p.proto != 50 && p.proto != 139 && !(p.sport == 5060 || p.dport == 5060))
        .count();
    for a in [&mut s.alice, &mut s.bob] {
        let st = a.stop()?;
        if !st.success() {
            bail!("an agent did not stop cleanly: {st}");
        }
    }
    let pins_left = [s.alice_ns(), s.bob_ns()]
        .iter()
        .filter(|ns| std::path::Path::new(&format!("/sys/fs/bpf/hip-test-{}", ns.name())).exists())
        .count();

    println!("\n== summary");
    println!(
        "  call: INVITE … 200 … ACK (F1–F12: {} of 12 seen), BYE; HIP {} on the wire",
        labels.len(),
        ["I1", "R1", "I2", "R2"]
            .iter()
            .zip(1u8..)
            .filter(|(_, t)| direct.iter().any(|p| p.hip_type == Some(*t)))
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  verification: alice sees bob {}, bob sees alice {}; short authentication string: alice {}, bob {}",
        a["verification"].as_str().unwrap_or("?"),
        b["verification"].as_str().unwrap_or("?"),
        a["sas"].as_str().unwrap_or("?"),
        b["sas"].as_str().unwrap_or("?")
    );
    println!(
        "  the HITs in the SDP ran the base exchange: alice's view of bob {} (bob's key: {}), bob's view of alice {} (alice's key: {})",
        a["peer_hits"][0].as_str().unwrap_or("?"),
        s.bob_hit,
        b["peer_hits"][0].as_str().unwrap_or("?"),
        s.alice_hit
    );
    println!(
        "  media: {}/{RTP_PACKETS} RTP packets received intact at bob; {} ESP packets and {clear} clear-text non-SIP packets between the hosts",
        rtp.received["intact"],
        direct.iter().filter(|p| p.proto == 50).count()
    );
    println!(
        "  teardown: after BYE alice holds {} SAs/{} policies, bob {} SAs/{} policies; after the agents stopped {pins_left} pinned map directories remain",
        states_after[0].0, states_after[0].1, states_after[1].0, states_after[1].1
    );
    let ok = rtp.received["intact"] == RTP_PACKETS
        && clear == 0
        && states_after == [(0, 0), (0, 0)]
        && pins_left == 0
        && a["peer_hits"][0] == s.bob_hit.as_str()
        && b["peer_hits"][0] == s.alice_hit.as_str();
    drop(s);
    println!("  namespaces removed");
    if !ok {
        bail!("the demo's checks failed (see the summary)");
    }
    phones()?;
    println!(
        "\nOK: SIP calls secured with HIP, between the agents and between real softphones, their media carried by the kernel only."
    );
    Ok(())
}

/// Part two: people's phones. Two different unmodified softphones, linphonec at alice and
/// baresip at bob, each with only its local agent as outbound proxy and `[security]` keys
/// at both agents, call each other through the same trapezoid: alice calls bob, then bob
/// calls alice, who holds and resumes. Each phone plays a tone and records what it hears.
fn phones() -> Result<()> {
    const TALK: Duration = Duration::from_secs(8);
    println!(
        "\n== calls between two softphones: linphonec at alice (plays 1000 Hz) and baresip at bob (plays 1500 Hz)"
    );
    println!(
        "   each phone's outbound proxy is its local hip agent in edge mode ([::1]:5070); the agents carry the calls to the same trapezoid and sign for their domains"
    );
    let r = edge_call::linphonec_and_baresip(TALK).context("the softphone calls")?;
    let sec = |v: &serde_json::Value, k: &str| v["security"][k].as_str().unwrap_or("?").to_owned();
    // baresip keeps only the part of call 2 before the hold: 10 blocks, not 20, there.
    let heard = |t: hip_tests::phone::ToneReport, least: usize| {
        t.span >= least && t.found * 100 >= t.span * 95
    };
    let mut ok = r.paused && r.resumed && r.esp_in_after_resume.iter().all(|n| *n >= 50);
    for (n, c) in r.calls.iter().enumerate() {
        println!(
            "  call {}: {}",
            n + 1,
            if n == 0 {
                "linphonec at alice calls bob; alice hangs up"
            } else {
                "baresip at bob calls alice; linphonec holds and resumes; bob hangs up"
            }
        );
        println!(
            "    verification: alice {} , bob {} (SAS {})",
            sec(&c.alice_ended, "verification"),
            sec(&c.bob_ended, "verification"),
            sec(&c.alice, "sas"),
        );
        for (who, hz, t) in [
            ("bob's phone", 1000, c.at_bob),
            ("alice's phone", 1500, c.at_alice),
        ] {
            println!(
                "    {who} heard {hz} Hz in {} of {} 200 ms blocks of the call ({} blocks recorded)",
                t.found, t.span, t.total
            );
        }
        println!(
            "    after the hang-up: alice {} SAs/{} policies, bob {} SAs/{} policies, {} routes and {} flow entries left",
            c.left.kernel[0].0,
            c.left.kernel[0].1,
            c.left.kernel[1].0,
            c.left.kernel[1].1,
            c.left.routes.len(),
            c.left.flows
        );
        ok &= heard(c.at_alice, 20)
            && heard(c.at_bob, if n == 1 { 10 } else { 20 })
            && sec(&c.alice_ended, "verification") == "mutual"
            && sec(&c.bob_ended, "verification") == "mutual"
            && c.left.kernel == [(0, 0), (0, 0)]
            && c.left.routes.is_empty()
            && c.left.flows == 0;
    }
    for (who, lines) in [
        ("alice's linphonec", &r.told[0]),
        ("bob's baresip", &r.told[1]),
    ] {
        println!("  what {who} showed:");
        for l in lines {
            println!("    {}", l.trim());
        }
    }
    println!(
        "  hold and resume: linphonec {} / {}, {} re-INVITEs at bob's phone, ESP packets in the 2 s after the resume: {} to alice, {} to bob",
        if r.paused { "paused" } else { "NOT paused" },
        if r.resumed { "resumed" } else { "NOT resumed" },
        r.reinvites_at_bob,
        r.esp_in_after_resume[0],
        r.esp_in_after_resume[1]
    );
    println!(
        "  between the hosts: {} ESP packets, SPIs {:x?} (the agents' SAs: {:x?}), {} clear-text non-SIP packets",
        r.wire.esp_packets,
        r.wire.spis,
        r.spis_reported,
        r.wire.clear.len()
    );
    ok &= r.wire.clear.is_empty()
        && !r.wire.spis.is_empty()
        && r.wire.spis.is_subset(&r.spis_reported);
    if !ok {
        bail!("the softphone calls' checks failed (see above)");
    }
    Ok(())
}
