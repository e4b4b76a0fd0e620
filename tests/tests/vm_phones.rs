//! Edge mode with real softphones and real audio (issue 15), inside the VM (a kernel with
//! ESP): baresip ↔ baresip, each unmodified and configured only with its local hip agent
//! as outbound proxy and its digest credentials, through the draft's Kamailio trapezoid.
//! alice's phone plays 1000 Hz, bob's 1500 Hz; each records what it receives, checked
//! per 200 ms block. Between the hosts only SIP, HIP and ESP (with the agents' SPIs);
//! after alice hangs up, no SA, policy or edge call is left. The call itself is
//! `hip_tests::edge_call`, which `cargo xtask demo` shows too.

use std::time::Duration;

use hip_tests::edge_call::baresip_to_baresip;

#[test]
fn baresip_calls_baresip_through_the_edges_with_the_tone_both_ways() {
    let talk = Duration::from_secs(8);
    let c = baresip_to_baresip(talk).unwrap();
    let (ka, kb) = (
        &c.alice["security"]["association"]["kernel"],
        &c.bob["security"]["association"]["kernel"],
    );
    assert_eq!(ka["spi_out"], kb["spi_in"], "{}\n{}", c.alice, c.bob);
    // In each namespace: no SA, no policy, no route to the peer's HIT, no flow entry.
    assert_eq!(c.kernel_after, [(0, 0), (0, 0)]);
    assert!(c.routes_left.is_empty(), "routes left: {:?}", c.routes_left);
    assert_eq!(c.flows_left, 0, "flow map entries left");

    // What each phone heard: the other's tone in ≥ 95 % of 200 ms blocks of the call.
    for (who, r) in [("bob", c.at_bob), ("alice", c.at_alice)] {
        eprintln!(
            "{who}'s phone: the tone in {} of {} blocks ({} recorded, first at block {:?})",
            r.found, r.span, r.total, r.first
        );
        assert!(r.span >= 30, "{who}: only {} blocks of tone: {r:?}", r.span);
        assert!(
            r.found * 100 >= r.span * 95,
            "{who}: the tone in {} of {} blocks",
            r.found,
            r.span
        );
    }
    // Each phone was told the level and the SAS (its SIP trace shows the MESSAGE it took).
    for (i, who) in ["alice", "bob"].iter().enumerate() {
        assert!(
            c.sas_shown[i],
            "{who}'s phone got no MESSAGE with the SAS:\n{}",
            c.phone_logs[i]
        );
    }

    // Between the hosts: SIP, HIP and ESP with the agents' SPIs only.
    assert!(
        !c.spis_on_wire.is_empty() && c.spis_on_wire.is_subset(&c.spis_reported),
        "SPIs on the wire {:x?} vs the agents' {:x?}",
        c.spis_on_wire,
        c.spis_reported
    );
    let min = 2 * talk.as_secs() as usize * 50 * 9 / 10;
    assert!(
        c.esp_packets >= min,
        "{} ESP packets for {talk:?} of audio both ways",
        c.esp_packets
    );
    assert!(
        c.clear.is_empty(),
        "clear text between the hosts: {:?}",
        c.clear
    );
}

/// baresip ↔ linphonec, both ways, with `[security]` keys at both agents: a call from
/// linphonec, then at once a call from baresip that linphonec holds and resumes. Each
/// phone hears the other's tone, is told `mutual` with the SAS, and every call leaves
/// nothing behind; between the hosts only SIP, HIP and ESP.
#[test]
fn linphonec_and_baresip_call_each_other_hold_resume_and_read_mutual() {
    let talk = Duration::from_secs(6);
    let r = hip_tests::edge_call::linphonec_and_baresip(talk).unwrap();
    let logs = || format!("{}\n----\n{}", r.phone_logs[0], r.phone_logs[1]);
    for (n, c) in r.calls.iter().enumerate() {
        let n = n + 1;
        let (ka, kb) = (
            &c.alice["security"]["association"]["kernel"],
            &c.bob["security"]["association"]["kernel"],
        );
        assert_eq!(
            ka["spi_out"], kb["spi_in"],
            "call {n}: {}\n{}",
            c.alice, c.bob
        );
        for (who, e) in [("alice", &c.alice_ended), ("bob", &c.bob_ended)] {
            assert_eq!(
                e["security"]["verification"], "mutual",
                "call {n}, {who}: {e}"
            );
        }
        assert_eq!(c.left.kernel, [(0, 0), (0, 0)], "call {n}");
        assert!(c.left.routes.is_empty(), "call {n}: {:?}", c.left.routes);
        assert_eq!(c.left.flows, 0, "call {n}: flow map entries left");
        for (who, t) in [("alice", c.at_alice), ("bob", c.at_bob)] {
            eprintln!(
                "call {n}, {who}'s phone: the tone in {} of {} blocks ({} recorded)",
                t.found, t.span, t.total
            );
            // baresip keeps only the part of call 2 before the hold (3 s of talk).
            let least = if n == 2 && who == "bob" { 10 } else { 20 };
            assert!(t.span >= least, "call {n}, {who}: {t:?}\n{}", logs());
        }
    }
    // Call 1 ran straight through: the tone in ≥ 95 % of its blocks at each end.
    for (who, t) in [("alice", r.calls[0].at_alice), ("bob", r.calls[0].at_bob)] {
        assert!(t.found * 100 >= t.span * 95, "call 1, {who}: {t:?}");
    }
    // Call 2 was held and resumed through both edges: linphonec saw it, baresip got both
    // re-INVITEs, and bob's media came back through the SAs.
    assert!(
        r.paused && r.resumed,
        "hold/resume at linphonec:\n{}",
        logs()
    );
    assert!(
        r.reinvites_at_bob >= 2,
        "{} re-INVITEs at bob",
        r.reinvites_at_bob
    );
    // Media after the resume, both ways, through the SAs (RTP every 20 ms: 100 in 2 s).
    assert!(
        r.esp_in_after_resume.iter().all(|n| *n >= 50),
        "ESP packets into alice's and bob's hosts in 2 s after the resume: {:?}",
        r.esp_in_after_resume
    );
    // Each phone was told `mutual` and the SAS, once per call.
    for (who, lines, c) in [
        ("alice", &r.told[0], &r.calls[0].alice),
        ("bob", &r.told[1], &r.calls[0].bob),
    ] {
        let sas = c["security"]["sas"].as_str().unwrap_or("?");
        let want = format!("verification mutual; short authentication string {sas}");
        let n = lines.iter().filter(|l| l.contains(&want)).count();
        assert!(
            n >= 2,
            "{who} was told {lines:?}, wanted {want:?} twice\n{}\n----\n{}",
            logs(),
            r.edge_logs.join("\n----\n")
        );
    }
    assert!(
        !r.wire.spis.is_empty() && r.wire.spis.is_subset(&r.spis_reported),
        "SPIs on the wire {:x?} vs the agents' {:x?}",
        r.wire.spis,
        r.spis_reported
    );
    assert!(
        r.wire.clear.is_empty(),
        "clear text between the hosts: {:?}",
        r.wire.clear
    );
}
