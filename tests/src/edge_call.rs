//! A call between two unmodified softphones, each behind its own hip agent in edge mode,
//! through the draft's Kamailio trapezoid (issue 15): what `vm_phones` asserts and what
//! `cargo xtask demo` shows. baresip at alice plays 1000 Hz, baresip at bob 1500 Hz; each
//! records what it receives. Needs root and a kernel with ESP (the VM).

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    NetNs,
    call::{self, Packet, xfrm_counts},
    new_host_identity,
    phone::{Baresip, PhoneConfig, ToneReport, md5_proxies, tone_report, write_tone},
    sip::{Agent, Trapezoid, scratch},
    wait_until,
};

/// What one phone call showed.
#[derive(Debug)]
pub struct EdgeCall {
    /// alice's and bob's edge call (`status.edge.calls[0]`) once its SAs were in the kernel.
    pub alice: Value,
    pub bob: Value,
    /// bob's tone (1500 Hz) in alice's recording, alice's (1000 Hz) in bob's.
    pub at_alice: ToneReport,
    pub at_bob: ToneReport,
    /// Whether each phone's SIP trace holds the MESSAGE with the level and its SAS.
    pub sas_shown: [bool; 2],
    /// (SAs, policies) in alice's and bob's namespace after the hang-up.
    pub kernel_after: [(usize, usize); 2],
    /// Routes to the peer's HIT left after the hang-up, both hosts.
    pub routes_left: Vec<String>,
    /// eBPF flow map entries left after the hang-up, both agents.
    pub flows_left: usize,
    /// SPIs seen between the hosts, and those the agents reported.
    pub spis_on_wire: BTreeSet<u32>,
    pub spis_reported: BTreeSet<u32>,
    /// ESP packets between the hosts.
    pub esp_packets: usize,
    /// Packets between the hosts that are neither SIP, HIP nor ESP.
    pub clear: Vec<Packet>,
    /// The phones' logs (baresip's console and SIP trace).
    pub phone_logs: [String; 2],
}

fn agent(ns: &NetNs, dir: &Path, who: &str, domain: &str, ip: &str, proxy: &str) -> Result<Agent> {
    let key = new_host_identity(dir, who, "ecdsa-p256")?.path;
    let pin = format!("/sys/fs/bpf/hip-test-{}", ns.name());
    Agent::start(
        ns,
        key.to_str().context("key path")?,
        &format!("user = \"{who}\"\ndomain = \"{domain}\"\nlisten = [\"udp:{ip}:5060\"]"),
        &format!(
            "[datapath]\ninterfaces = [\"v{who}\"]\npin_dir = \"{pin}\"\n\
             [edge]\nlisten = [\"udp:[::1]:5070\", \"udp:{ip}:5070\"]\nclients = [\"::1\"]\n\
             next_hop = \"udp:{proxy}:5060\"\n"
        ),
    )
}

/// The edge call's block once its association is in the kernel.
fn established(a: &Agent) -> Result<Value> {
    wait_until(Duration::from_secs(120), "the edge call's SAs", || {
        let st = a.status();
        let c = st["edge"]["calls"].as_array()?.first()?.clone();
        (!c["security"]["association"]["kernel"].is_null()).then_some(c)
    })
    .with_context(|| a.log())
}

fn phone<'a>(who: &'a str, domain: &'a str, tone: &'a Path, auto: bool) -> PhoneConfig<'a> {
    PhoneConfig {
        user: who,
        domain,
        password: if who == "alice" { "alice-pw" } else { "bob-pw" },
        outbound: "[::1]:5070",
        listen: "[::1]:5062",
        media_ip: "::1",
        tone,
        auto_answer: auto,
        commands: &[],
        quit_after: None,
    }
}

/// Builds the trapezoid, registers bob's phone, lets alice's phone dial bob, talks for
/// `talk` of media counted from when the SAs are in, hangs up at alice's phone and reports.
/// `Err` only when the call could not be made at all; what it showed is for the caller to
/// judge.
pub fn baresip_to_baresip(talk: Duration) -> Result<EdgeCall> {
    let t = Trapezoid::new()?;
    let dir = scratch("phones");
    let (mut capture, pcap) = call::capture_bridge(&t, &dir)?;
    md5_proxies(&t, &dir, "")?;
    let alice = agent(
        &t.hosts[0],
        &dir,
        "alice",
        "atlanta.com",
        call::ALICE_IP,
        "192.0.2.2",
    )?;
    let bob = agent(
        &t.hosts[3],
        &dir,
        "bob",
        "biloxi.com",
        call::BOB_IP,
        "192.0.2.3",
    )?;
    let (a_tone, b_tone) = (dir.join("alice-1000.wav"), dir.join("bob-1500.wav"));
    let secs = u32::try_from(talk.as_secs())
        .unwrap_or(u32::MAX)
        .saturating_add(50);
    write_tone(&a_tone, 1000.0, secs)?;
    write_tone(&b_tone, 1500.0, secs)?;

    let mut bp = Baresip::start(
        &t.hosts[3],
        &dir.join("bob-phone"),
        &phone("bob", "biloxi.com", &b_tone, true),
    )?;
    wait_until(Duration::from_secs(120), "bob's phone registered", || {
        bp.log().contains("200 OK (kamailio").then_some(())
    })
    .with_context(|| format!("{}\n{}", bp.log(), bob.log()))?;
    let mut cfg = phone("alice", "atlanta.com", &a_tone, false);
    let dial = ["/dial sip:bob@biloxi.com"];
    cfg.commands = &dial;
    let mut ap = Baresip::start(&t.hosts[0], &dir.join("alice-phone"), &cfg)?;

    let (a, b) = (established(&alice)?, established(&bob)?);
    let talk_from = std::time::Instant::now();
    wait_until(talk + Duration::from_secs(30), "the talk", || {
        (talk_from.elapsed() >= talk).then_some(())
    })?;
    ap.stop(); // alice hangs up: baresip ends its call with BYE when it quits
    for ag in [&alice, &bob] {
        wait_until(Duration::from_secs(60), "the edge call to end", || {
            ag.status()["edge"]["calls"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        })
        .with_context(|| ag.log())?;
    }
    let mut kernel_after = [(0, 0); 2];
    let mut routes_left = Vec::new();
    for (i, (ns, peer)) in [
        (&t.hosts[0], &a["peer_hits"][0]),
        (&t.hosts[3], &b["peer_hits"][0]),
    ]
    .into_iter()
    .enumerate()
    {
        // Teardown is asynchronous to the BYE: wait for it, then read what is left.
        let _ = wait_until(Duration::from_secs(30), "SAs and policies removed", || {
            (xfrm_counts(ns).ok()? == (0, 0)).then_some(())
        });
        kernel_after[i] = xfrm_counts(ns)?;
        let routes = ns.exec("ip", ["-6", "route", "show", "table", "all"])?;
        let peer = peer.as_str().unwrap_or("?");
        routes_left.extend(
            String::from_utf8_lossy(&routes.stdout)
                .lines()
                .filter(|l| l.starts_with(peer))
                .map(|l| format!("{}: {l}", ns.name())),
        );
    }
    let flows_left = [&alice, &bob]
        .iter()
        .map(|ag| ag.json(&["flows", "--json"]).as_array().map_or(0, Vec::len))
        .sum();
    bp.stop();

    let heard = |who: &str, p: &Baresip, hz: f64| -> Result<ToneReport> {
        let wav = p
            .received()
            .with_context(|| format!("{who}'s phone recorded nothing:\n{}", p.log()))?;
        tone_report(&wav, hz)
    };
    let at_bob = heard("bob", &bp, 1000.0)?;
    let at_alice = heard("alice", &ap, 1500.0)?;
    let sas_shown = [(&ap, &a), (&bp, &b)].map(|(p, sec)| {
        sec["security"]["sas"].as_str().is_some_and(|sas| {
            p.log().contains(&format!(
                "verification unverified; short authentication string {sas}"
            ))
        })
    });

    // SAFETY: signalling our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    capture.wait()?;
    let pkts = call::read_pcap(&pcap)?;
    let direct: Vec<Packet> = pkts
        .into_iter()
        .filter(|p| {
            let ends = [p.src.as_str(), p.dst.as_str()];
            ends.contains(&call::ALICE_IP) && ends.contains(&call::BOB_IP)
        })
        .collect();
    let spis_on_wire = direct.iter().filter_map(|p| p.spi).collect();
    let ka = &a["security"]["association"]["kernel"];
    let spis_reported = [&ka["spi_out"], &ka["spi_in"]]
        .iter()
        .filter_map(|v| v.as_u64())
        .map(|v| v as u32)
        .collect();
    let esp_packets = direct.iter().filter(|p| p.proto == 50).count();
    let clear = direct
        .into_iter()
        .filter(|p| {
            let sip = p.proto == 17
                && [5060, 5070]
                    .iter()
                    .any(|port| p.sport == *port || p.dport == *port);
            p.proto != 50 && p.proto != 139 && !sip
        })
        .collect();
    Ok(EdgeCall {
        alice: a,
        bob: b,
        at_alice,
        at_bob,
        sas_shown,
        kernel_after,
        routes_left,
        flows_left,
        spis_on_wire,
        spis_reported,
        esp_packets,
        clear,
        phone_logs: [ap.log(), bp.log()],
    })
}
