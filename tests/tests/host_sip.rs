//! The agent's SIP side against real peers, each test in namespaces of its own:
//! SIPp as caller and as callee (HITs cross in SDP and land in the known-HITs pool),
//! malformed SIP at the listening socket, and the draft's trapezoid through two Kamailio
//! proxies with digest-authenticated registration (F1–F12).

use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use hip_tests::{
    VethPair, agent_bin,
    sip::{
        Agent, Trapezoid, hit_from_hex, hit_hex, scratch, sipp, sipp_dir, tls_table,
        wait_calls_ended,
    },
    wait_until,
};
use serde_json::Value;

const SIPP_HIT: &str = "7214148E0433AFE2FA2D48003D31172E"; // Alice's HIT in the draft
const SIPP_UAS_HIT: &str = "44A5C522D7EDEDF962E55A0677DB1346"; // Bob's HIT in the draft

/// SIPp calling bob at `target` from `local_ip`:5070 with the `uac_hit.xml` scenario (its
/// offer carries [`SIPP_HIT`]) and the SIPp options `extra`; returns its message log.
fn sipp_calls_bob(
    ns: &str,
    dir: &Path,
    local_ip: &str,
    target: &str,
    extra: &[&str],
) -> anyhow::Result<String> {
    let scenario = sipp_dir().join("uac_hit.xml");
    let mut args = vec!["-sf", scenario.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "-key", "hit", SIPP_HIT, "-s", "bob", "-i", local_ip, "-p", "5070", target, "-m", "1",
    ]);
    sipp(ns, dir, &args)
}

fn entry_hits(e: &Value) -> Vec<String> {
    e["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["hit"].as_str().unwrap().to_owned())
        .collect()
}

fn ipv6_of_hex(h: &str) -> String {
    hit_from_hex(h).unwrap()
}

#[test]
fn sipp_calls_the_agent_and_the_hits_cross() {
    let p = VethPair::new("sipuac", &["10.61.0.1/24"], &["10.61.0.2/24"]).unwrap();
    let agent_hit = "2001:20::b0b";
    let agent = Agent::start(
        &p.b,
        agent_hit,
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:10.61.0.2:5060\"]",
        "",
    )
    .unwrap();
    let dir = scratch("sipp-uac");
    let msgs = sipp_calls_bob(p.a.name(), &dir, "10.61.0.1", "10.61.0.2:5060", &[])
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    // INVITE / 100? / 180 / 200 / ACK / BYE / 200 completed (SIPp exited 0). The agent's
    // answer carried its own HIT, in the form of SIPp's offer (k=, mirrored by default).
    assert!(
        msgs.contains(&format!("k=host-identity-tag:{}", hit_hex(agent_hit))),
        "agent HIT missing from its SDP:\n{msgs}"
    );
    assert!(msgs.contains("SIP/2.0 180 Ringing"));
    // SIPp's HIT is in the pool, bound to SIPp's From URI, on media 0, in k= form.
    let e = agent.wait_for_pool_entry("sip:sipp@10.61.0.1:5070");
    assert_eq!(entry_hits(&e), vec![ipv6_of_hex(SIPP_HIT)]);
    assert_eq!(e["identities"][0]["media"], 0);
    assert_eq!(e["identities"][0]["form"], "k");
    assert!(e["call_id"].as_str().unwrap().ends_with("@10.61.0.1"));
    let st = agent.status();
    assert_eq!(st["stats"]["calls_in"], 1);
    assert_eq!(st["stats"]["confirmed"], 1);
    // This agent runs without HIP offload: the inspection commands say so instead of
    // printing an empty table.
    let e = format!("{:#}", agent.ctl(&["flows", "--json"]).unwrap_err());
    assert!(e.contains("runs no eBPF datapath"), "{e}");
    let e = format!("{:#}", agent.ctl(&["xfrm", "--json"]).unwrap_err());
    assert!(e.contains("offloads nothing to the kernel"), "{e}");
    wait_until(Duration::from_secs(5), "the call to end", || {
        (agent.status()["stats"]["ended"] == 1).then_some(())
    })
    .unwrap();
    assert_eq!(agent.status()["calls"].as_array().unwrap().len(), 0);
    // The pool survives a restart of the agent (persisted, atomically written).
    let pool = agent.dir.join("pool.json");
    wait_until(Duration::from_secs(5), "the pool file", || {
        std::fs::read_to_string(&pool)
            .ok()
            .filter(|s| s.contains(&ipv6_of_hex(SIPP_HIT)))
    })
    .unwrap();
}

#[test]
fn the_agent_calls_sipp_and_the_hits_cross() {
    let p = VethPair::new("sipuas", &["10.62.0.1/24"], &["10.62.0.2/24"]).unwrap();
    let agent_hit = "2001:20::a11c";
    let agent = Agent::start(
        &p.a,
        agent_hit,
        "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:10.62.0.1:5060\"]",
        "",
    )
    .unwrap();
    let dir = scratch("sipp-uas");
    let uas = {
        let (ns_cmd_dir, scen) = (dir.clone(), sipp_dir().join("uas_hit.xml"));
        let ns = p.b.name().to_owned();
        std::thread::spawn(move || {
            sipp(
                &ns,
                &ns_cmd_dir,
                &[
                    "-sf",
                    scen.to_str().unwrap(),
                    "-key",
                    "hit",
                    SIPP_UAS_HIT,
                    "-i",
                    "10.62.0.2",
                    "-p",
                    "5080",
                    "-m",
                    "1",
                ],
            )
        })
    };
    // SIPp may still be starting: the INVITE is retransmitted (Timer A) until it answers.
    let call = agent.ctl(&["call", "sip:sipp@10.62.0.2:5080"]).unwrap();
    let call = call.trim().to_owned();
    let e = agent.wait_for_pool_entry("sip:sipp@10.62.0.2:5080");
    assert_eq!(entry_hits(&e), vec![ipv6_of_hex(SIPP_UAS_HIT)]);
    assert_eq!(e["identities"][0]["form"], "k");
    let st = agent.status();
    let c = &st["calls"][0];
    assert_eq!(c["state"], "confirmed");
    assert_eq!(c["direction"], "outgoing");
    assert_eq!(c["handle"].to_string(), call);
    agent.ctl(&["hangup", &call]).unwrap();
    let msgs = uas
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    // The agent's offer carried its HIT in the default a=key-mgmt form.
    assert!(
        msgs.contains(&format!(
            "a=key-mgmt:host-identity-tag {}",
            hit_hex(agent_hit)
        )),
        "agent HIT missing from its offer:\n{msgs}"
    );
    wait_until(Duration::from_secs(5), "the call to end", || {
        agent.status()["calls"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .unwrap();
}

#[test]
fn malformed_sip_gets_400_or_is_dropped_and_a_call_still_completes() {
    let p = VethPair::new("sipbad", &["10.63.0.1/24"], &["10.63.0.2/24"]).unwrap();
    let agent = Agent::start(
        &p.b,
        "2001:20::bad",
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:10.63.0.2:5060\"]",
        "",
    )
    .unwrap();
    let replies = p
        .a
        .run_in(|| -> Vec<String> {
            let s = UdpSocket::bind("10.63.0.1:5099").unwrap();
            // Bounded wait for each reply; the agent answers in well under a second.
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let to = "10.63.0.2:5060";
            let req = |first: &str, cid: &str, cseq: &str, extra: &str| {
                format!(
                    "{first}\r\nVia: SIP/2.0/UDP 10.63.0.1:5099;branch=z9hG4bK{cid}\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:t@10.63.0.1>;tag=t1\r\nCall-ID: {cid}\r\nCSeq: {cseq}\r\nMax-Forwards: 70\r\n{extra}"
                )
            };
            let sends = [
                // RFC 4475 §3.1.2.9-style: extra spaces in the request line → 400.
                req("OPTIONS  sip:bob@10.63.0.2 SIP/2.0", "bad1", "1 OPTIONS", "Content-Length: 0\r\n\r\n"),
                // CSeq method differs from the request method (RFC 4475 §3.1.2.17) → 400.
                req("OPTIONS sip:bob@10.63.0.2 SIP/2.0", "bad2", "1 INVITE", "Content-Length: 0\r\n\r\n"),
                // Body shorter than Content-Length on UDP (RFC 3261 §18.3) → 400.
                req("INVITE sip:bob@10.63.0.2 SIP/2.0", "bad3", "1 INVITE", "Content-Length: 900\r\n\r\nv=0\r\n"),
                // Unanswerable: binary junk, a malformed response, a request without Call-ID.
                "\u{0}\u{1}\u{2}junk".to_owned(),
                "SIP/2.0 2000 OK\r\nVia: SIP/2.0/UDP 10.63.0.2;branch=z9hG4bKx\r\n\r\n".to_owned(),
                "OPTIONS sip:bob@10.63.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 10.63.0.1:5099;branch=z9hG4bKbad6\r\nTo: <sip:bob@biloxi.com>\r\nFrom: <sip:t@x>;tag=1\r\nCSeq: 1 OPTIONS\r\n\r\n".to_owned(),
                // Then a valid OPTIONS: its 200 must be the next reply, proving nothing was
                // answered to the three before it.
                req("OPTIONS sip:bob@10.63.0.2 SIP/2.0", "good7", "1 OPTIONS", "Content-Length: 0\r\n\r\n"),
            ];
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            for (i, m) in sends.iter().enumerate() {
                s.send_to(m.as_bytes(), to).unwrap();
                if matches!(i, 0 | 1 | 2 | 6) {
                    let (n, _) = s.recv_from(&mut buf).expect("a reply");
                    got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            got
        })
        .unwrap();
    for (r, cid) in replies.iter().zip(["bad1", "bad2", "bad3"]) {
        assert!(r.starts_with("SIP/2.0 400 Bad Request\r\n"), "{r}");
        assert!(r.contains(&format!("Call-ID: {cid}\r\n")), "{r}");
        assert!(r.contains("Warning: 399"), "{r}");
    }
    assert!(
        replies[3].starts_with("SIP/2.0 200 OK\r\n"),
        "{}",
        replies[3]
    );
    assert!(replies[3].contains("Call-ID: good7\r\n"));
    let st = agent.status();
    assert_eq!(st["stats"]["bad_input_answered"], 3, "{st}");
    assert_eq!(st["stats"]["bad_input_dropped"], 3, "{st}");
    assert!(st["calls"].as_array().unwrap().is_empty());
    assert!(agent.hits().as_array().unwrap().is_empty());
    // A normal call completes afterwards.
    let dir = scratch("sipp-after-bad");
    sipp_calls_bob(p.a.name(), &dir, "10.63.0.1", "10.63.0.2:5060", &[])
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    agent.wait_for_pool_entry("sip:sipp@10.63.0.1:5070");
}

/// One SIP message seen on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    src: String,
    dst: String,
    /// Method, or status code.
    what: String,
    cseq_method: String,
    call_id: String,
}

#[test]
fn trapezoid_through_two_kamailio_proxies_reproduces_f1_to_f12() {
    let t = Trapezoid::new().unwrap();
    let dir = scratch("trapezoid");
    let (alice_ns, bob_ns) = (&t.hosts[0], &t.hosts[3]);

    // Capture on the bridge: an independent view of every message (tshark).
    let pcap = dir.join("trapezoid.pcap");
    let cap_err = dir.join("tshark.err");
    let mut cap = Command::new("ip")
        .args([
            "netns",
            "exec",
            t.lan.name(),
            "tshark",
            "-i",
            "br0",
            "-f",
            "udp port 5060",
            "-w",
        ])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&cap_err).unwrap())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "tshark to capture", || {
        std::fs::read_to_string(&cap_err)
            .ok()
            .filter(|s| s.contains("Capturing on"))
    })
    .unwrap();

    // atlanta.com: MD5 digest; biloxi.com: SHA-256 digest (RFC 8760).
    t.start_proxies(&dir, "").unwrap();

    // The draft's HITs, in the draft's k= form.
    let alice = Agent::start(
        alice_ns,
        "7214148E0433AFE2FA2D48003D31172E",
        "user = \"alice\"\ndomain = \"atlanta.com\"\ndisplay_name = \"Alice\"\npassword = \"alice-pw\"\n\
         outbound_proxy = \"udp:192.0.2.2:5060\"\nregister = true\nregister_expires = 300\n\
         listen = [\"udp:192.0.2.1:5060\"]",
        "[sip.sdp]\nform = \"k\"\n",
    )
    .unwrap();
    let bob = Agent::start(
        bob_ns,
        "44A5C522D7EDEDF962E55A0677DB1346",
        "user = \"bob\"\ndomain = \"biloxi.com\"\ndisplay_name = \"Bob\"\npassword = \"bob-pw\"\n\
         outbound_proxy = \"udp:192.0.2.3:5060\"\nregister = true\nregister_expires = 300\n\
         listen = [\"udp:192.0.2.4:5060\"]",
        // Bob rings before he answers, as in the draft's flow: with a 200 right behind
        // the 180, a proxy worker may forward the 200 first and then drop the late 180.
        "[sip.sdp]\nform = \"k\"\n[sip.answer]\nring_ms = 300\n",
    )
    .unwrap();
    for (who, a) in [("alice", &alice), ("bob", &bob)] {
        a.wait_registered(who, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    let call = alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let bob_entry = alice.wait_for_pool_entry("sip:bob@biloxi.com");
    let alice_entry = bob.wait_for_pool_entry("sip:alice@atlanta.com");
    // Each pool holds the other's HIT bound to the other's URI (draft §3.3, end of F12).
    assert_eq!(
        entry_hits(&bob_entry),
        vec![ipv6_of_hex("44A5C522D7EDEDF962E55A0677DB1346")]
    );
    assert_eq!(
        entry_hits(&alice_entry),
        vec![ipv6_of_hex("7214148E0433AFE2FA2D48003D31172E")]
    );
    assert_eq!(bob_entry["identities"][0]["media"], 0);
    assert_eq!(bob_entry["call_id"], alice_entry["call_id"]);
    alice.ctl(&["hangup", call.trim()]).unwrap();
    wait_calls_ended(&[&alice, &bob], Duration::from_secs(10)).unwrap();

    // The capture has seen the whole call, BYE and its 200 included (Alice to Bob directly).
    wait_until(
        Duration::from_secs(10),
        "the BYE's 200 in the capture",
        || {
            let o = Command::new("tshark")
                .arg("-r")
                .arg(&pcap)
                .args(["-Y", "sip.CSeq.method == \"BYE\" && sip.Status-Code == 200"])
                .args(["-T", "fields", "-e", "ip.src", "-e", "ip.dst"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&o.stdout)
                .contains("192.0.2.4\t192.0.2.1")
                .then_some(())
        },
    )
    .unwrap();
    // Stop the capture cleanly (SIGINT lets tshark finish the file).
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(cap.id() as i32, libc::SIGINT) };
    let _ = cap.wait();
    let out = Command::new("tshark")
        .arg("-r")
        .arg(&pcap)
        .args([
            "-Y",
            "sip",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "sip.Method",
            "-e",
            "sip.Status-Code",
            "-e",
            "sip.CSeq.method",
            "-e",
            "sip.Call-ID",
        ])
        .output()
        .unwrap();
    let seen: Vec<Seen> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            Some(Seen {
                src: f.first()?.to_string(),
                dst: f.get(1)?.to_string(),
                what: if f.get(2)?.is_empty() {
                    f.get(3)?.to_string()
                } else {
                    f.get(2)?.to_string()
                },
                cseq_method: f.get(4)?.to_string(),
                call_id: f.get(5)?.to_string(),
            })
        })
        .collect();
    let call_id = bob_entry["call_id"].as_str().unwrap();
    let dialog: Vec<&Seen> = seen.iter().filter(|s| s.call_id == call_id).collect();
    let (a, atl, bil, b) = ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4");
    // Atlanta challenges the first INVITE (outbound proxy digest); the flow of the draft
    // starts with the authenticated one.
    let first = |src: &str, dst: &str, what: &str, from: usize| -> usize {
        dialog
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, s)| s.src == src && s.dst == dst && s.what == what && s.cseq_method != "BYE")
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("no {what} {src} -> {dst} after #{from} in {dialog:#?}"))
    };
    let challenge = first(atl, a, "407", 0);
    let f1 = first(a, atl, "INVITE", challenge);
    let f2 = first(atl, a, "100", f1);
    let f3 = first(atl, bil, "INVITE", f1);
    let f4 = first(bil, atl, "100", f3);
    let f5 = first(bil, b, "INVITE", f3);
    let f6 = first(b, bil, "180", f5);
    let f7 = first(bil, atl, "180", f6);
    let f8 = first(atl, a, "180", f7);
    let f9 = first(b, bil, "200", f6);
    let f10 = first(bil, atl, "200", f9);
    let f11 = first(atl, a, "200", f10);
    let f12 = first(a, b, "ACK", f11);
    let _ = (f2, f4, f8, f12);
    // Each of F1..F12 exactly once (no retransmission was needed on this link), and the
    // ACK went straight from Alice to Bob, not through the proxies.
    for (src, dst, what) in [
        (a, atl, "INVITE"),
        (atl, bil, "INVITE"),
        (bil, b, "INVITE"),
        (b, bil, "180"),
        (bil, atl, "180"),
        (atl, a, "180"),
        (b, bil, "200"),
        (bil, atl, "200"),
        (atl, a, "200"),
    ] {
        let n = dialog[f1..]
            .iter()
            .filter(|s| s.src == src && s.dst == dst && s.what == what && s.cseq_method == "INVITE")
            .count();
        assert_eq!(n, 1, "{what} {src} -> {dst} seen {n} times: {dialog:#?}");
    }
    assert!(
        !dialog[f11..]
            .iter()
            .any(|s| s.what == "ACK" && s.src == a && s.dst == atl),
        "the ACK for the 2xx must go straight to Bob: {dialog:#?}"
    );

    // The SDP of F1/F3/F5 carries Alice's HIT and that of F9/F10/F11 Bob's, in k= form.
    let with = |needle: &str| -> Vec<(String, String, String)> {
        let o = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args([
                "-Y",
                &format!("sip && frame contains \"{needle}\""),
                "-T",
                "fields",
                "-E",
                "separator=|",
                "-e",
                "ip.src",
                "-e",
                "ip.dst",
                "-e",
                "sip.Method",
                "-e",
                "sip.Status-Code",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                (f[0].into(), f[1].into(), format!("{}{}", f[2], f[3]))
            })
            .collect()
    };
    let alice_hit = with("k=host-identity-tag:7214148E0433AFE2FA2D48003D31172E");
    for hop in [(a, atl), (atl, bil), (bil, b)] {
        assert!(
            alice_hit.contains(&(hop.0.into(), hop.1.into(), "INVITE".into())),
            "{alice_hit:?}"
        );
    }
    let bob_hit = with("k=host-identity-tag:44A5C522D7EDEDF962E55A0677DB1346");
    assert_eq!(
        bob_hit,
        vec![
            (b.into(), bil.into(), "200".into()),
            (bil.into(), atl.into(), "200".into()),
            (atl.into(), a.into(), "200".into())
        ]
    );
    // REGISTER was challenged and then accepted at both proxies.
    for (ua, proxy) in [(a, atl), (b, bil)] {
        assert!(seen.iter().any(|s| s.src == proxy
            && s.dst == ua
            && s.what == "401"
            && s.cseq_method == "REGISTER"));
        assert!(seen.iter().any(|s| s.src == proxy
            && s.dst == ua
            && s.what == "200"
            && s.cseq_method == "REGISTER"));
    }
}

// ----------------------------------------------------------------------------- TCP, TLS

#[test]
fn sipp_over_tcp_calls_the_agent() {
    let p = VethPair::new("siptcp", &["10.64.0.1/24"], &["10.64.0.2/24"]).unwrap();
    let agent = Agent::start(
        &p.b,
        "2001:20::7c9",
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"tcp:10.64.0.2:5060\"]",
        "",
    )
    .unwrap();
    let dir = scratch("sipp-tcp");
    let msgs = sipp_calls_bob(
        p.a.name(),
        &dir,
        "10.64.0.1",
        "10.64.0.2:5060",
        &["-t", "t1"],
    )
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    assert!(msgs.contains("TCP message received"), "{msgs}");
    assert!(msgs.contains(&format!("k=host-identity-tag:{}", hit_hex("2001:20::7c9"))));
    assert!(
        msgs.contains("Contact: <sip:bob@10.64.0.2:5060;transport=tcp>"),
        "{msgs}"
    );
    let e = agent.wait_for_pool_entry("sip:sipp@10.64.0.1:5070");
    assert_eq!(entry_hits(&e), vec![ipv6_of_hex(SIPP_HIT)]);
}

#[test]
fn two_agents_call_over_tls() {
    let p = VethPair::new("siptls", &["10.65.0.1/24"], &["10.65.0.2/24"]).unwrap();
    let dir = scratch("tls");
    // One self-signed certificate naming both addresses, trusted by both agents.
    let tls = tls_table(&dir, &["10.65.0.1", "10.65.0.2"]).unwrap();
    let alice = Agent::start(
        &p.a,
        "2001:20::a",
        "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"tls:10.65.0.1:5061\"]",
        &tls,
    )
    .unwrap();
    let bob = Agent::start(
        &p.b,
        "2001:20::b",
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"tls:10.65.0.2:5061\"]",
        &tls,
    )
    .unwrap();
    let call = alice.ctl(&["call", "sips:bob@10.65.0.2:5061"]).unwrap();
    assert_eq!(
        entry_hits(&alice.wait_for_pool_entry("sips:bob@10.65.0.2:5061")),
        vec!["2001:20::b"]
    );
    assert_eq!(
        entry_hits(&bob.wait_for_pool_entry("sip:alice@atlanta.com")),
        vec!["2001:20::a"]
    );
    // Bob saw the call arrive over TLS: its remote target is a sips: URI.
    let st = bob.status();
    assert!(
        st["calls"][0]["remote_target"]
            .as_str()
            .unwrap()
            .starts_with("sips:alice@10.65.0.1:5061"),
        "{st}"
    );
    alice.ctl(&["hangup", call.trim()]).unwrap();
    wait_calls_ended(&[&alice, &bob], Duration::from_secs(10)).unwrap();
}

#[test]
fn an_agent_with_a_key_file_sends_its_hi_and_the_peer_checks_it() {
    let p = VethPair::new("siphi", &["10.66.0.1/24"], &["10.66.0.2/24"]).unwrap();
    let dir = scratch("hi");
    let key = dir.join("alice.pem");
    hip_tests::run(
        "openssl",
        [
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            key.to_str().unwrap(),
        ],
    )
    .unwrap();
    // hip_proto::keyfile refuses key files others can read.
    hip_tests::run("chmod", ["600", key.to_str().unwrap()]).unwrap();
    let alice = Agent::start(
        &p.a,
        key.to_str().unwrap(),
        "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:10.66.0.1:5060\"]",
        // The host kernel has no ESP: HIP runs, the kernel offload is off.
        "[sip.sdp]\nsend_hi = true\nhit_format = \"ipv6\"\n[kernel]\nenabled = false\n",
    )
    .unwrap();
    let bob = Agent::start(
        &p.b,
        "2001:20::b",
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:10.66.0.2:5060\"]",
        "",
    )
    .unwrap();
    let alice_hit = alice.status()["hit"].as_str().unwrap().to_owned();
    // An ORCHIDv2 HIT (2001:20::/28), derived from the key by hip_proto.
    assert!(alice_hit.starts_with("2001:2"), "{alice_hit}");
    let call = alice.ctl(&["call", "sip:bob@10.66.0.2"]).unwrap();
    let e = bob.wait_for_pool_entry("sip:alice@atlanta.com");
    // Bob got the HIT line and the HI line; the HI's own HIT (derived by Bob) matched.
    let ids = e["identities"].as_array().unwrap();
    assert_eq!(ids.len(), 2, "{e}");
    assert!(ids.iter().all(|i| i["hit"] == alice_hit.as_str()), "{e}");
    assert!(
        ids.iter()
            .any(|i| i["hi"].as_str().is_some_and(|h| h.len() > 40)),
        "{e}"
    );
    alice.ctl(&["hangup", call.trim()]).unwrap();
}

#[test]
fn sdp_inspect_lists_the_drafts_identities() {
    let f1 = "v=0\no=alice 53655765 2353687637 IN IP4 pc33.atlanta.com\ns=Session SDP\nt=0 0\nc=IN IP4 pc33.atlanta.com\nm=audio 3456 RTP/AVP 0 1 3 99\na=rtpmap:0 PCMU/8000\nk=host-identity-tag:7214148E0433AFE2FA2D48003D31172E\n";
    let run = |args: &[&str], input: &str| {
        use std::io::Write as _;
        let mut c = Command::new(agent_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let out = run(&["sdp", "inspect", "--json"], f1);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["media"], 1);
    assert_eq!(v["identities"][0]["hit"], ipv6_of_hex(SIPP_HIT));
    assert_eq!(
        v["identities"][0]["scope"],
        serde_json::json!({"level": "media", "index": 0})
    );
    assert_eq!(v["identities"][0]["form"], "k");
    assert_eq!(v["identities"][0]["kind"], "hit");
    let out = run(&["sdp", "inspect"], f1);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("line 8: HIT 7214:148e:433:afe2:fa2d:4800:3d31:172e")
    );
    // A bad HIT: a clear error and a failing exit status.
    let out = run(&["sdp", "inspect"], &f1.replace("172E", "172G"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 8"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
