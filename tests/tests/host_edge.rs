//! Edge mode (issue 15) on the host: unmodified phones (SIPp playing the phones, with
//! their own IPv6 media addresses and digest credentials) register and call through
//! their local hip agents and the draft's Kamailio trapezoid. HIP runs between the agents
//! (the host has no ESP: `[kernel] enabled = false`).
//!
//! alice's phone and agent: 192.0.2.1 (edge at :5070, phone at :5062); atlanta.com
//! (192.0.2.2) and biloxi.com (192.0.2.3) are Kamailio with MD5 digest and Path;
//! bob's phone and agent: 192.0.2.4.

use std::{
    net::UdpSocket,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use hip_tests::{
    NetNs,
    phone::md5_proxies,
    sip::{
        Agent, NO_OFFLOAD, Trapezoid, alice_phone_calls_bob, hip_key, register_at, scenario,
        scratch, signed_both,
    },
    wait_until,
};
use serde_json::Value;

fn edge_agent(ns: &NetNs, key: &str, user: &str, domain: &str, ip: &str, hop: &str) -> Agent {
    edge_agent_with(ns, key, user, domain, ip, hop, "")
}

/// An edge agent with `extra` configuration (e.g. a `[security]` table).
fn edge_agent_with(
    ns: &NetNs,
    key: &str,
    user: &str,
    domain: &str,
    ip: &str,
    hop: &str,
    extra: &str,
) -> Agent {
    Agent::start(
        ns,
        key,
        &format!("user = \"{user}\"\ndomain = \"{domain}\"\nlisten = [\"udp:{ip}:5060\"]"),
        &format!(
            "{NO_OFFLOAD}{extra}[edge]\nlisten = [\"udp:{ip}:5070\"]\nclients = [\"{ip}\", \"::1\"]\n\
             next_hop = \"udp:{hop}:5060\"\n"
        ),
    )
    .unwrap()
}

/// A phone registering through its edge with its digest credentials.
/// The scenario refreshes the binding once (the same Call-ID, challenged again), so the
/// calls that follow reach the phone through the refreshed binding and its Path.
fn register(ns: &NetNs, ip: &str, user: &str, domain: &str, pw: &str) -> Result<String> {
    let log = register_at(ns, ip, user, domain, pw, &format!("{ip}:5070"))?;
    anyhow::ensure!(
        messages_starting(&log, "SIP/2.0 200 OK")
            .iter()
            .any(|m| m.contains("CSeq: 4 REGISTER")),
        "the registration refresh got no 200 through the edge:\n{log}"
    );
    Ok(log)
}

/// A phone answering one call in the background (SIPp as UAS, MESSAGEs answered).
struct Callee {
    child: Child,
    dir: PathBuf,
}

impl Callee {
    /// The phone rings for `ring_ms` before it answers.
    fn start(ns: &NetNs, ip: &str, user: &str, ring_ms: u64) -> Result<Self> {
        let dir = scratch(&format!("uas-{user}"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "sipp", "-sf"])
            .arg(scenario("edge_phone_uas.xml"))
            .args(["-d", &ring_ms.to_string()])
            .args(["-key", "media", "::1", "-key", "user", user])
            .args(["-i", ip, "-p", "5062", "-m", "1", "-nostdin"])
            .args(["-trace_msg", "-message_file"])
            .arg(dir.join("messages.log"))
            .args(["-trace_err", "-error_file"])
            .arg(dir.join("errors.log"))
            .args(["-timeout", "40", "-timeout_error"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("sipp uas")?;
        Ok(Self { child, dir })
    }

    fn messages(&self) -> String {
        std::fs::read_to_string(self.dir.join("messages.log")).unwrap_or_default()
    }

    fn wait(&mut self) -> Result<String> {
        let st = wait_until(Duration::from_secs(45), "the callee's SIPp", || {
            self.child.try_wait().ok().flatten()
        })?;
        if !st.success() {
            bail!(
                "callee sipp failed ({st}): {}\nmessages:\n{}",
                std::fs::read_to_string(self.dir.join("errors.log")).unwrap_or_default(),
                self.messages()
            );
        }
        Ok(self.messages())
    }
}

impl Drop for Callee {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SIP messages of a SIPp message log that start with `first` (a request or status line).
fn messages_starting<'a>(log: &'a str, first: &str) -> Vec<&'a str> {
    log.split("\n\n")
        .flat_map(|chunk| chunk.split("----------------------------------------------"))
        .filter_map(|m| {
            let start = m.find(first)?;
            Some(&m[start..])
        })
        .collect()
}

fn own_hit(a: &Agent) -> String {
    a.status()["hit"].as_str().unwrap().to_owned()
}

fn ended_call(a: &Agent) -> Option<Value> {
    a.status()["edge"]["ended_calls"]
        .as_array()
        .and_then(|v| v.last().cloned())
}

/// The trapezoid with both edges, both phones registered, and one call from alice's
/// phone to bob's (hung up by alice after 3 s). `edge_key` is bob's HIP key (so that a
/// test can name his HIT to the proxies), `biloxi_reply_route` Kamailio script for
/// biloxi.com's replies.
struct Call {
    _t: Trapezoid,
    alice: Agent,
    bob: Agent,
    caller_log: String,
    callee_log: String,
}

fn call_through_the_edges(biloxi_reply_route: impl Fn(&str) -> String) -> Call {
    call_through_the_edges_with(biloxi_reply_route, false, 0, |_, _| {})
}

/// As [`call_through_the_edges`]; with `signed`, both agents have `[security]` keys (each
/// signs for its domain and trusts the other's); bob's phone rings `ring_ms` before it
/// answers, and `while_calling` runs with both agents while the call is being made.
fn call_through_the_edges_with(
    biloxi_reply_route: impl Fn(&str) -> String,
    signed: bool,
    ring_ms: u64,
    while_calling: impl FnOnce(&Agent, &Agent),
) -> Call {
    let t = Trapezoid::new().unwrap();
    let dir = scratch("edge");
    let bob_key = hip_key(&dir, "bob");
    md5_proxies(&t, &dir, &biloxi_reply_route(&bob_key.hit_hex)).unwrap();
    let (sec_a, sec_b) = if signed {
        signed_both(&dir)
    } else {
        Default::default()
    };
    let alice = edge_agent_with(
        &t.hosts[0],
        hip_key(&dir, "alice").path.to_str().unwrap(),
        "alice",
        "atlanta.com",
        "192.0.2.1",
        "192.0.2.2",
        &sec_a,
    );
    let bob = edge_agent_with(
        &t.hosts[3],
        bob_key.path.to_str().unwrap(),
        "bob",
        "biloxi.com",
        "192.0.2.4",
        "192.0.2.3",
        &sec_b,
    );

    // Digest between each phone and its registrar passes through the edge untouched.
    register(&t.hosts[3], "192.0.2.4", "bob", "biloxi.com", "bob-pw").unwrap();
    register(&t.hosts[0], "192.0.2.1", "alice", "atlanta.com", "alice-pw").unwrap();

    let mut callee = Callee::start(&t.hosts[3], "192.0.2.4", "bob", ring_ms).unwrap();
    let caller_dir = scratch("uac-alice");
    let caller_ns = t.hosts[0].name().to_owned();
    let caller = std::thread::spawn(move || {
        let ooc = scenario("edge_phone_ooc.xml");
        alice_phone_calls_bob(
            &caller_ns,
            &caller_dir,
            "edge_phone_uac.xml",
            "::1",
            &["-oocsf", &ooc],
        )
    });
    while_calling(&alice, &bob);
    let caller_log = caller.join().expect("caller thread").unwrap_or_else(|e| {
        panic!(
            "{e}\nalice's agent:\n{}\nbob's agent:\n{}",
            alice.log(),
            bob.log()
        )
    });
    let callee_log = callee
        .wait()
        .unwrap_or_else(|e| panic!("{e}\nbob's agent:\n{}", bob.log()));
    Call {
        _t: t,
        alice,
        bob,
        caller_log,
        callee_log,
    }
}

#[test]
fn phones_register_and_call_through_their_edges_and_the_trapezoid() {
    let Call {
        _t,
        alice,
        bob,
        caller_log,
        callee_log,
    } = call_through_the_edges(|_| String::new());
    let (alice_hit, bob_hit) = (own_hit(&alice), own_hit(&bob));

    // What the far phone received: alice's media on alice's HIT, alice's HIT in the SDP.
    let invite = messages_starting(&callee_log, "INVITE sip:bob@192.0.2.4:5062")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no INVITE at bob's phone:\n{callee_log}"));
    assert!(
        invite.contains(&format!("c=IN IP6 {alice_hit}")),
        "{invite}"
    );
    assert!(
        invite.contains(&format!("o=phone 1 2 IN IP6 {alice_hit}")),
        "{invite}"
    );
    assert!(
        invite.contains("m=audio 10000 RTP/AVP 0"),
        "ports kept: {invite}"
    );
    let alice_hex: String = alice.status()["hit_hex"].as_str().unwrap().to_owned();
    assert!(
        invite.contains(&format!("a=key-mgmt:host-identity-tag {alice_hex}")),
        "{invite}"
    );
    assert!(
        !invite.contains("::1"),
        "the phone's own address is gone: {invite}"
    );
    // And alice's phone got bob's media on bob's HIT.
    let ok = messages_starting(&caller_log, "SIP/2.0 200 OK")
        .into_iter()
        .find(|m| m.contains("INVITE"))
        .unwrap_or_else(|| panic!("no 200 for the INVITE:\n{caller_log}"));
    assert!(ok.contains(&format!("c=IN IP6 {bob_hit}")), "{ok}");
    assert!(ok.contains("m=audio 20000 RTP/AVP 0"), "{ok}");

    // HIP ran between the agents; each phone was told the level and the SAS.
    for (who, log, agent) in [("alice", &caller_log, &alice), ("bob", &callee_log, &bob)] {
        let msgs = messages_starting(log, "MESSAGE sip:");
        let text = msgs
            .iter()
            .find(|m| m.contains("verification"))
            .unwrap_or_else(|| {
                panic!(
                    "{who}'s phone got no MESSAGE with the level:\n{log}\n{}",
                    agent.log()
                )
            });
        assert!(text.contains("verification unverified"), "{text}");
        let ended = wait_until(Duration::from_secs(10), "the call in ended_calls", || {
            ended_call(agent)
        })
        .unwrap();
        let sas = ended["security"]["sas"]
            .as_str()
            .unwrap_or_else(|| panic!("{ended}"));
        assert!(text.contains(sas), "{who}: {text} lacks the SAS {sas}");
        assert_eq!(ended["security"]["verification"], "unverified", "{ended}");
        assert_eq!(ended["end_reason"], "BYE");
    }

    // BYE passed both edges and cleaned up: no edge call, no association left.
    for a in [&alice, &bob] {
        wait_until(Duration::from_secs(10), "the association released", || {
            let st = a.status();
            let assoc = a.json(&["assoc", "--json"]);
            let live = assoc
                .as_array()
                .is_some_and(|v| v.iter().any(|r| r["state"] == "established"));
            (st["edge"]["calls"].as_array().is_some_and(Vec::is_empty) && !live).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {}", a.log()));
        let txs = a.status()["edge"]["transactions"].as_u64().unwrap();
        assert!(txs < 16, "{txs} edge transactions held after the call");
    }
}

#[test]
fn with_sip_identity_both_edges_prove_their_hits_and_each_call_is_mutual() {
    // Each agent signs its phone's INVITE for its domain and verifies the other's; no
    // response can carry Identity, so bob's edge follows the ACK with an UPDATE signed over
    // its HIT, which alice's edge verifies against the answer and keeps from her phone
    // (draft §4.1): both directions proven.
    let Call {
        _t,
        alice,
        bob,
        caller_log,
        callee_log,
    } = call_through_the_edges_with(|_| String::new(), true, 0, |_, _| {});
    // What bob's phone received carries alice's agent's PASSporT.
    let invite = messages_starting(&callee_log, "INVITE sip:bob@192.0.2.4:5062")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no INVITE at bob's phone:\n{callee_log}"));
    assert!(invite.contains("\nIdentity: "), "{invite}");
    for (who, log, agent, detail) in [
        ("alice", &caller_log, &alice, "UPDATE Identity verified"),
        ("bob", &callee_log, &bob, "accepted by the caller's edge"),
    ] {
        let ended = wait_until(Duration::from_secs(10), "the call in ended_calls", || {
            ended_call(agent)
        })
        .unwrap();
        let sec = &ended["security"];
        assert_eq!(sec["verification"], "mutual", "{who}: {ended}");
        assert_eq!(sec["sip"]["own_via"], "identity", "{who}: {ended}");
        assert_eq!(sec["sip"]["peer_via"], "identity", "{who}: {ended}");
        let text = sec["sip"].to_string();
        assert!(text.contains(detail), "{who}: {text}");
        // The edges' UPDATE never reaches either phone (their dialogs know nothing of it).
        assert!(
            messages_starting(log, "UPDATE ").is_empty(),
            "{who}'s phone got the edges' UPDATE:\n{log}"
        );
        let msgs = messages_starting(log, "MESSAGE sip:");
        assert!(
            msgs.iter().any(|m| m.contains("verification mutual")),
            "{who}'s phone was not told mutual:\n{log}\n{}",
            agent.log()
        );
    }
}

#[test]
fn the_edge_refuses_to_relay_for_outsiders() {
    let t = Trapezoid::new().unwrap();
    let dir = scratch("edge-relay");
    let alice = edge_agent(
        &t.hosts[0],
        hip_key(&dir, "alice").path.to_str().unwrap(),
        "alice",
        "atlanta.com",
        "192.0.2.1",
        "192.0.2.2",
    );
    // From atlanta.com's host (not a client) to a third party through alice's edge.
    let reply = t.hosts[1]
        .run_in(|| -> Result<String> {
            let s = UdpSocket::bind("192.0.2.2:5099")?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let inv = "INVITE sip:victim@198.51.100.9 SIP/2.0\r\n\
                Via: SIP/2.0/UDP 192.0.2.2:5099;branch=z9hG4bKrelay1\r\nMax-Forwards: 70\r\n\
                From: <sip:spam@192.0.2.2>;tag=s1\r\nTo: <sip:victim@198.51.100.9>\r\n\
                Call-ID: relay-test\r\nCSeq: 1 INVITE\r\nContact: <sip:spam@192.0.2.2:5099>\r\n\
                Content-Length: 0\r\n\r\n";
            s.send_to(inv.as_bytes(), "192.0.2.1:5070")?;
            let mut buf = [0u8; 4096];
            let (n, _) = s.recv_from(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .unwrap()
        .unwrap();
    assert!(reply.starts_with("SIP/2.0 403 Forbidden\r\n"), "{reply}");
    assert!(reply.contains("not a relay"), "{reply}");
    // The operator sees the edge in `status`, and no call was created.
    let text = alice.ctl(&["status"]).unwrap();
    assert!(
        text.contains("edge: listen [\"udp:192.0.2.1:5070\"] next hop udp:192.0.2.2:5060"),
        "{text}"
    );
    assert!(!text.contains("edge call"), "{text}");
}

#[test]
fn a_proxy_that_rewrites_the_callees_hit_makes_the_call_fail_visibly_at_the_phone() {
    // biloxi.com replaces bob's HIT in his answer (the draft's §4 man in the middle).
    let fake = "20010020000000000000000000000BAD";
    let Call {
        _t,
        alice,
        caller_log,
        ..
    } = call_through_the_edges(|bob_hex| {
        format!(
            "onreply_route {{\n    if (has_body(\"application/sdp\")) {{\n        subst_body(\"/{bob_hex}/{fake}/ig\");\n    }}\n}}\n"
        )
    });
    // alice's phone was told, and its media went to the HIT it was given, which no SA
    // carries (no association was established with it).
    let msgs = messages_starting(&caller_log, "MESSAGE sip:");
    let text = msgs
        .iter()
        .find(|m| m.contains("verification failed"))
        .unwrap_or_else(|| panic!("alice's phone was not told:\n{caller_log}\n{}", alice.log()));
    assert!(text.contains("hip: verification failed"), "{text}");
    let ended = wait_until(Duration::from_secs(10), "the call in ended_calls", || {
        ended_call(&alice)
    })
    .unwrap();
    assert_eq!(ended["security"]["verification"], "failed", "{ended}");
    assert!(
        ended["security"]["sas"].is_null(),
        "no SAS for a failed call: {ended}"
    );
}

#[test]
fn a_call_to_a_phone_without_hip_is_refused_with_the_reason_and_the_far_end_hung_up() {
    let t = Trapezoid::new().unwrap();
    let dir = scratch("edge-nohit");
    md5_proxies(&t, &dir, "").unwrap();
    let alice = edge_agent(
        &t.hosts[0],
        hip_key(&dir, "alice").path.to_str().unwrap(),
        "alice",
        "atlanta.com",
        "192.0.2.1",
        "192.0.2.2",
    );
    // bob's phone has no hip: it registers at biloxi.com directly and answers in the clear.
    register_at(
        &t.hosts[3],
        "192.0.2.4",
        "bob",
        "biloxi.com",
        "bob-pw",
        "192.0.2.3:5060",
    )
    .unwrap();
    register(&t.hosts[0], "192.0.2.1", "alice", "atlanta.com", "alice-pw").unwrap();
    let mut callee = Callee::start(&t.hosts[3], "192.0.2.4", "bob", 0).unwrap();
    let caller_log = alice_phone_calls_bob(
        t.hosts[0].name(),
        &scratch("uac-refused"),
        "edge_phone_uac_refused.xml",
        "::1",
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", alice.log()));
    // The phone's 488 says why, in the reason phrase and the Warning.
    let refusal = messages_starting(&caller_log, "SIP/2.0 488")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{caller_log}"));
    assert!(
        refusal.starts_with("SIP/2.0 488 Not Acceptable Here: callee has no HIP identity"),
        "{refusal}"
    );
    assert!(
        refusal.contains("outbound_without_hit = refuse"),
        "{refusal}"
    );
    // bob's phone was acknowledged and hung up by alice's edge (its scenario ends with
    // the BYE), and alice's edge holds no call.
    let callee_log = callee
        .wait()
        .unwrap_or_else(|e| panic!("{e}\n{}", alice.log()));
    assert!(
        !messages_starting(&callee_log, "BYE sip:").is_empty(),
        "{callee_log}"
    );
    let ended = wait_until(Duration::from_secs(10), "the call in ended_calls", || {
        ended_call(&alice)
    })
    .unwrap();
    assert!(
        ended["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains("callee sent no HIP Host Identity")),
        "{ended}"
    );
    assert!(
        alice.status()["edge"]["calls"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Issue 15 item 4 ("the first word is not lost"): while bob's phone rings (3 s), alice's
/// agent starts HIP at bob's agent (an I1 to the null HIT on the 180) and bob's agent
/// accepts alice's HIT from the INVITE's offer; the association is established before
/// anyone answers, and the answer's HIT confirms it — the call reads as a call whose
/// exchange ran after the answer would.
#[test]
fn hip_is_established_while_the_phone_rings_and_the_answer_confirms_it() {
    let mut early: Option<(Value, Value, Value)> = None;
    let last = std::cell::RefCell::new(Value::Null);
    let Call {
        _t,
        alice,
        bob,
        callee_log,
        ..
    } = call_through_the_edges_with(
        |_| String::new(),
        false,
        3000,
        |alice, bob| {
            early = wait_until(Duration::from_secs(20), "HIP up while ringing", || {
                let a = alice.status()["edge"]["calls"].as_array()?.first()?.clone();
                *last.borrow_mut() = a.clone();
                if a["answered"] != false || a["security"]["early_hip"]["state"] != "established" {
                    return None;
                }
                let b = bob.status()["edge"]["calls"].as_array()?.first()?.clone();
                let responder = a["security"]["early_hip"]["responder"].as_str()?;
                let assoc = alice.json(&["assoc", "--json"]);
                let at_bob = bob.json(&["assoc", "--json"]);
                let bob_side = at_bob
                    .as_array()?
                    .iter()
                    .find(|r| r["state"] == "established" && r["initiator"] == false)?
                    .clone();
                let ours = assoc
                    .as_array()?
                    .iter()
                    .find(|r| r["peer_hit"] == responder && r["initiator"] == true)?
                    .clone();
                (b["answered"] == false).then_some((a, bob_side, ours))
            })
            .ok();
        },
    );
    let (alice_hit, bob_hit) = (own_hit(&alice), own_hit(&bob));
    let (a, bob_side, ours) = early.unwrap_or_else(|| {
        panic!(
            "no association before the answer (alice's call last read {})\nalice:\n{}\nbob:\n{}",
            last.borrow(),
            alice.log(),
            bob.log()
        )
    });
    // Before the answer alice's agent could not name bob's HIT; the exchange found it.
    assert_eq!(a["peer_hits"], serde_json::json!([]), "{a}");
    assert_eq!(a["security"]["early_hip"]["responder"], bob_hit, "{a}");
    assert_eq!(a["security"]["early_hip"]["locator"], "192.0.2.4", "{a}");
    assert_eq!(bob_side["peer_hit"], alice_hit, "{bob_side}");
    // Nothing rested on it before the answer: no level from an unnamed responder.
    assert_eq!(a["security"]["verification"], "pending", "{a}");

    // The answer named that HIT: the call's association is the early one (not a second
    // exchange), and it reads as any verified-by-HIP call does.
    let ended = wait_until(Duration::from_secs(10), "alice's ended call", || {
        ended_call(&alice)
    })
    .unwrap();
    let rec = &ended["security"]["association"];
    assert_eq!(rec["peer_hit"], bob_hit, "{ended}");
    assert_eq!(rec["reached_established"], true, "{ended}");
    assert_eq!(
        rec["timing_ms"]["established"], ours["timing_ms"]["established"],
        "one exchange, the early one: {ended}\n{ours}"
    );
    assert_eq!(ended["security"]["verification"], "unverified", "{ended}");
    let ok = messages_starting(&callee_log, "SIP/2.0 200 OK")
        .into_iter()
        .find(|m| m.contains("INVITE"))
        .unwrap_or_else(|| panic!("no 200 at bob's phone:\n{callee_log}"));
    assert!(ok.contains("m=audio 20000"), "{ok}");
    for ag in [&alice, &bob] {
        wait_until(Duration::from_secs(10), "the association released", || {
            let assoc = ag.json(&["assoc", "--json"]);
            assoc
                .as_array()
                .is_some_and(|v| v.iter().all(|r| r["state"] != "established"))
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {}", ag.log()));
    }
}
