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
