//! Edge mode with real softphones and real audio (issue 15), inside the VM (a kernel with
//! ESP): baresip ↔ baresip, each unmodified and configured only with its local hip agent
//! as outbound proxy and its digest credentials, through the draft's Kamailio trapezoid.
//! alice's phone plays 1000 Hz, bob's 1500 Hz; each records what it receives, checked
//! per 200 ms block. Between the hosts only SIP, HIP and ESP (with the agents' SPIs);
//! after alice hangs up, no SA, policy or edge call is left.

use std::{path::Path, process::Command, time::Duration};

use hip_tests::{
    NetNs,
    call::{self, xfrm_counts},
    new_host_identity,
    phone::{Baresip, PhoneConfig, md5_proxies, tone_report, write_tone},
    sip::{Agent, Trapezoid, scratch},
    wait_until,
};
use serde_json::Value;

fn agent(ns: &NetNs, dir: &Path, who: &str, domain: &str, ip: &str, proxy: &str) -> Agent {
    let key = new_host_identity(dir, who, "ecdsa-p256").unwrap().path;
    let pin = format!("/sys/fs/bpf/hip-test-{}", ns.name());
    Agent::start(
        ns,
        key.to_str().unwrap(),
        &format!("user = \"{who}\"\ndomain = \"{domain}\"\nlisten = [\"udp:{ip}:5060\"]"),
        &format!(
            "[datapath]\ninterfaces = [\"v{who}\"]\npin_dir = \"{pin}\"\n\
             [edge]\nlisten = [\"udp:[::1]:5070\", \"udp:{ip}:5070\"]\nclients = [\"::1\"]\n\
             next_hop = \"udp:{proxy}:5060\"\n"
        ),
    )
    .unwrap()
}

/// The edge call's security block once its association is in the kernel.
fn established(a: &Agent) -> Value {
    wait_until(Duration::from_secs(120), "the edge call's SAs", || {
        let st = a.status();
        let c = st["edge"]["calls"].as_array()?.first()?.clone();
        (!c["security"]["association"]["kernel"].is_null()).then_some(c)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()))
}

#[test]
fn baresip_calls_baresip_through_the_edges_with_the_tone_both_ways() {
    let t = Trapezoid::new().unwrap();
    let dir = scratch("phones");
    let pcap = dir.join("bridge.pcap");
    let cap_log = dir.join("tcpdump.log");
    let mut capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            t.lan.name(),
            "tcpdump",
            "-i",
            "br0",
            "-n",
            "-U",
            "-w",
        ])
        .arg(&pcap)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&cap_log).unwrap())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "tcpdump", || {
        std::fs::read_to_string(&cap_log)
            .ok()
            .filter(|s| s.contains("listening on"))
    })
    .unwrap();
    md5_proxies(&t, &dir, "").unwrap();
    let alice = agent(
        &t.hosts[0],
        &dir,
        "alice",
        "atlanta.com",
        call::ALICE_IP,
        "192.0.2.2",
    );
    let bob = agent(
        &t.hosts[3],
        &dir,
        "bob",
        "biloxi.com",
        call::BOB_IP,
        "192.0.2.3",
    );
    let (a_tone, b_tone) = (dir.join("alice-1000.wav"), dir.join("bob-1500.wav"));
    write_tone(&a_tone, 1000.0, 60).unwrap();
    write_tone(&b_tone, 1500.0, 60).unwrap();

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
    let mut bp = Baresip::start(
        &t.hosts[3],
        &dir.join("bob-phone"),
        &phone("bob", "biloxi.com", &b_tone, true),
    )
    .unwrap();
    wait_until(Duration::from_secs(120), "bob's phone registered", || {
        bp.log().contains("200 OK (kamailio").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", bp.log(), bob.log()));
    let mut cfg = phone("alice", "atlanta.com", &a_tone, false);
    let dial = ["/dial sip:bob@biloxi.com"];
    cfg.commands = &dial;
    let mut ap = Baresip::start(&t.hosts[0], &dir.join("alice-phone"), &cfg).unwrap();

    let (a, b) = (established(&alice), established(&bob));
    let (ka, kb) = (
        &a["security"]["association"]["kernel"],
        &b["security"]["association"]["kernel"],
    );
    assert_eq!(ka["spi_out"], kb["spi_in"], "{a}\n{b}");
    // Talk for 8 s of media, counted from when the SAs are in (ESP carried it).
    let talk_from = std::time::Instant::now();
    wait_until(Duration::from_secs(30), "8 s of call", || {
        (talk_from.elapsed() >= Duration::from_secs(8)).then_some(())
    })
    .unwrap();
    ap.stop(); // alice hangs up: baresip ends its call with BYE when it quits
    for (who, ag) in [("alice", &alice), ("bob", &bob)] {
        wait_until(Duration::from_secs(60), "the edge call to end", || {
            ag.status()["edge"]["calls"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{who}: {e}\n{}", ag.log()));
    }
    // In each namespace: no SA, no policy, no route to the peer's HIT.
    for (ns, peer) in [
        (&t.hosts[0], &a["peer_hits"][0]),
        (&t.hosts[3], &b["peer_hits"][0]),
    ] {
        wait_until(Duration::from_secs(30), "SAs and policies removed", || {
            (xfrm_counts(ns).ok()? == (0, 0)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e} in {}", ns.name()));
        let routes = ns
            .exec("ip", ["-6", "route", "show", "table", "all"])
            .unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        let peer = peer.as_str().unwrap();
        assert!(
            !routes.lines().any(|l| l.starts_with(peer)),
            "route to {peer} left: {routes}"
        );
    }
    for ag in [&alice, &bob] {
        let flows = ag.json(&["flows", "--json"]);
        assert!(
            flows.as_array().is_some_and(Vec::is_empty),
            "flow map entries left: {flows}"
        );
    }
    bp.stop();

    // What each phone heard: the other's tone in ≥ 95 % of 200 ms blocks of the call.
    let report = |who: &str, p: &Baresip, hz: f64| {
        let wav = p
            .received()
            .unwrap_or_else(|| panic!("{who}'s phone recorded nothing:\n{}", p.log()));
        let r = tone_report(&wav, hz).unwrap();
        eprintln!(
            "{who}'s phone: {hz} Hz in {} of {} blocks ({} recorded, first at block {:?})",
            r.found, r.span, r.total, r.first
        );
        r
    };
    let at_bob = report("bob", &bp, 1000.0);
    let at_alice = report("alice", &ap, 1500.0);
    for (who, r) in [("bob", at_bob), ("alice", at_alice)] {
        assert!(r.span >= 30, "{who}: only {} blocks of tone: {r:?}", r.span);
        assert!(
            r.found * 100 >= r.span * 95,
            "{who}: the tone in {} of {} blocks",
            r.found,
            r.span
        );
    }
    // Each phone was told the level and the SAS (its SIP trace shows the MESSAGE it took).
    for (who, p, sec) in [("alice", &ap, &a), ("bob", &bp, &b)] {
        let sas = sec["security"]["sas"]
            .as_str()
            .unwrap_or_else(|| panic!("{sec}"));
        let log = p.log();
        assert!(
            log.contains(&format!(
                "verification unverified; short authentication string {sas}"
            )),
            "{who}'s phone got no MESSAGE with the SAS {sas}:\n{log}"
        );
    }

    // Between the hosts: SIP, HIP and ESP with the agents' SPIs only.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    capture.wait().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    let direct: Vec<_> = pkts
        .iter()
        .filter(|p| {
            let ends = [p.src.as_str(), p.dst.as_str()];
            ends.contains(&call::ALICE_IP) && ends.contains(&call::BOB_IP)
        })
        .collect();
    let spis: std::collections::BTreeSet<u32> = direct.iter().filter_map(|p| p.spi).collect();
    let reported: std::collections::BTreeSet<u32> = [&ka["spi_out"], &ka["spi_in"]]
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert!(
        !spis.is_empty() && spis.is_subset(&reported),
        "SPIs on the wire {spis:x?} vs the agents' {reported:x?}"
    );
    let esp = direct.iter().filter(|p| p.proto == 50).count();
    assert!(
        esp >= 2 * 8 * 50 * 9 / 10,
        "{esp} ESP packets for 8 s of audio both ways"
    );
    let clear: Vec<_> = direct
        .iter()
        .filter(|p| {
            let sip = p.proto == 17
                && [5060, 5070]
                    .iter()
                    .any(|port| p.sport == *port || p.dport == *port);
            p.proto != 50 && p.proto != 139 && !sip
        })
        .collect();
    assert!(clear.is_empty(), "clear text between the hosts: {clear:?}");
}
