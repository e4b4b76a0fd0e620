//! The agent end to end (issue 6), inside the VM (a kernel with ESP): the draft's
//! Figure 1 with two Kamailio proxies, a call from alice to bob, the HIP base exchange
//! against the HIT learned through SIP, BEET SAs in the kernel, RTP between the HITs,
//! and the teardown.

use std::time::Duration;

use hip_tests::{
    call::{self, Options, Scenario, xfrm_counts},
    sip::scratch,
    wait_until,
};

#[test]
fn a_call_is_secured_end_to_end_and_leaves_nothing_behind() {
    let mut s = Scenario::start(&Options::default()).unwrap();
    let call = s.call().unwrap();
    let (a, b) = s.wait_established().unwrap();

    // No SIP Identity, no SIPS: HIP proved each HIT, nothing authenticated the SDP.
    assert_eq!(a["verification"], "unverified", "{a}");
    assert_eq!(b["verification"], "unverified", "{b}");
    assert_eq!(
        a["sas"], b["sas"],
        "both sides derive the same short authentication string"
    );
    // The HITs in each side's SDP view are the other side's real HITs.
    assert_eq!(a["peer_hits"][0], s.bob_hit.as_str());
    assert_eq!(b["peer_hits"][0], s.alice_hit.as_str());
    let (ka, kb) = (
        &a["associations"][0]["kernel"],
        &b["associations"][0]["kernel"],
    );
    assert_eq!(
        ka["spi_out"], kb["spi_in"],
        "alice's outbound SPI is bob's inbound"
    );
    assert_eq!(ka["spi_in"], kb["spi_out"]);
    for ns in [s.alice_ns(), s.bob_ns()] {
        let (states, policies) = xfrm_counts(ns).unwrap();
        assert_eq!(states, 2, "two BEET SAs in {}", ns.name());
        assert_eq!(policies, 4, "2 IPsec + 2 block policies in {}", ns.name());
    }
    // The operator's view: hip's SAs with their peer HIT and, from the pool, its SIP URI.
    let listing = wait_until(Duration::from_secs(30), "xfrm --json to name bob", || {
        let out = std::process::Command::new(hip_tests::agent_bin())
            .args(["--netns", s.alice_ns().name(), "xfrm", "--json", "--pool"])
            .arg(s.alice.dir.join("pool.json"))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("sip:bob@biloxi.com").then_some(text)
    })
    .unwrap();
    assert!(listing.contains(&s.bob_hit), "{listing}");
    assert!(listing.contains(&ka["spi_out"].to_string()), "{listing}");

    const N: u32 = 50;
    let rtp = s.stream_rtp(N).unwrap();
    assert_eq!(rtp.received["received"], N, "{:?}", rtp.received);
    assert_eq!(rtp.received["intact"], N, "{:?}", rtp.received);
    assert_eq!(
        rtp.received["from"],
        format!("[{}]:{}", s.alice_hit, call::RTP_PORT)
    );

    // bob's eBPF flow table saw the stream decrypted with his inbound SPI, from alice's locator.
    let flow = Scenario::wait_call_security(&s.bob, "bob's flow", Duration::from_secs(30), |sec| {
        sec["flows"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["packets"] == N))
    })
    .unwrap()["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["packets"] == N)
        .cloned()
        .unwrap();
    assert_eq!(flow["spi"], kb["spi_in"], "{flow}");
    assert_eq!(flow["locator"], call::ALICE_IP, "{flow}");
    assert_eq!(flow["src_hit"], s.alice_hit.as_str());
    assert_eq!(flow["lost"], 0);

    s.hangup(&call).unwrap();
    for ns in [s.alice_ns(), s.bob_ns()] {
        wait_until(Duration::from_secs(30), "SAs and policies removed", || {
            (xfrm_counts(ns).ok()? == (0, 0)).then_some(())
        })
        .unwrap();
    }

    // The capture: between the hosts only HIP, ESP (with the reported SPIs) and SIP.
    let pcap = s.stop_capture().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    let direct: Vec<_> = pkts
        .iter()
        .filter(|p| {
            let ends = [p.src.as_str(), p.dst.as_str()];
            ends.contains(&call::ALICE_IP) && ends.contains(&call::BOB_IP)
        })
        .collect();
    let esp: Vec<_> = direct.iter().filter(|p| p.proto == 50).collect();
    assert!(esp.len() as u32 >= N, "{} ESP packets", esp.len());
    let spis: std::collections::BTreeSet<u32> = esp.iter().filter_map(|p| p.spi).collect();
    let reported: std::collections::BTreeSet<u32> = [&ka["spi_out"], &ka["spi_in"]]
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert!(
        spis.is_subset(&reported),
        "SPIs on the wire {spis:x?} vs reported {reported:x?}"
    );
    let clear: Vec<_> = direct
        .iter()
        .filter(|p| {
            p.proto != 50
                && p.proto != 139
                && !(p.proto == 17 && (p.sport == 5060 || p.dport == 5060))
        })
        .collect();
    assert!(
        clear.is_empty(),
        "clear-text packets between the hosts: {clear:?}"
    );
    let hip: Vec<u8> = direct.iter().filter_map(|p| p.hip_type).collect();
    for t in [1, 2, 3, 4] {
        assert!(hip.contains(&t), "HIP packet type {t} on the wire: {hip:?}");
    }
    // The HITs that ran the base exchange are the ones the SDP carried.
    let senders: std::collections::BTreeSet<String> =
        direct.iter().filter_map(|p| p.hip_sender.clone()).collect();
    assert!(
        senders.contains(&s.alice_hit) && senders.contains(&s.bob_hit),
        "{senders:?}"
    );

    // Agents stop cleanly: nothing pinned, nothing attached, nothing in XFRM.
    for a in [&mut s.alice, &mut s.bob] {
        assert!(a.stop().unwrap().success());
    }
    for ns in [s.alice_ns(), s.bob_ns()] {
        assert_eq!(xfrm_counts(ns).unwrap(), (0, 0));
        assert!(!std::path::Path::new(&format!("/sys/fs/bpf/hip-test-{}", ns.name())).exists());
    }
    // And the namespaces go with the scenario.
    let names: Vec<String> = s.net.hosts.iter().map(|n| n.name().to_owned()).collect();
    drop(s);
    let list = hip_tests::ip(["netns", "list"]).unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in names {
        assert!(!list.contains(&n), "{n} still exists: {list}");
    }
}

#[test]
fn a_proxy_rewriting_the_hit_makes_the_exchange_fail_and_installs_nothing() {
    let s = Scenario::start(&Options {
        rewrite_bob_hit: Some("2001001F0000000000000000DEADBEEF".into()),
        ..Options::default()
    })
    .unwrap();
    s.call().unwrap();
    let a = Scenario::wait_call_security(
        &s.alice,
        "alice to flag the call",
        Duration::from_secs(120),
        |sec| sec["verification"] == "failed",
    )
    .unwrap();
    let err = a["failure"].as_str().unwrap_or_default();
    assert!(err.contains("HIT mismatch"), "{a}");
    assert!(
        err.to_lowercase().contains(&s.bob_hit.to_lowercase())
            || a.to_string().contains(&s.bob_hit),
        "the real HIT is named: {a}"
    );
    let (states, _) = xfrm_counts(s.alice_ns()).unwrap();
    assert_eq!(states, 0, "no SA installed at alice");
}

#[test]
fn a_killed_agent_restarts_and_reconciles_the_kernel() {
    let mut s = Scenario::start(&Options::default()).unwrap();
    s.call().unwrap();
    s.wait_established().unwrap();
    assert_eq!(xfrm_counts(s.alice_ns()).unwrap(), (2, 4));
    s.alice.kill();
    // The killed agent's objects are still in the kernel...
    assert_eq!(xfrm_counts(s.alice_ns()).unwrap(), (2, 4));
    s.alice.restart().unwrap();
    // ...and the restarted one removed them (its keys died with the old process).
    assert_eq!(xfrm_counts(s.alice_ns()).unwrap(), (0, 0));
    assert!(
        s.alice.log().contains("removed what an earlier run left"),
        "{}",
        s.alice.log()
    );
}

#[test]
fn sip_identity_through_both_proxies_makes_the_call_mutual() {
    // The draft's §4 with §4.1 through the trapezoid: alice's signed INVITE crosses both
    // Kamailio proxies (and atlanta's digest challenge, which makes alice send it twice);
    // bob's signed UPDATE goes straight to alice. Both agents get the same `[security]`
    // table (the scenario has one for both), so one ES256 key signs for both domains here;
    // verification with distinct per-domain keys is covered by `host_security`.
    let dir = scratch("vm-identity");
    let (key, public) = (dir.join("es256.pem"), dir.join("es256.pub.pem"));
    let k = key.to_str().unwrap();
    hip_tests::run(
        "openssl",
        [
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            k,
        ],
    )
    .unwrap();
    hip_tests::run("chmod", ["600", k]).unwrap();
    hip_tests::run(
        "openssl",
        [
            "pkey",
            "-in",
            k,
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    )
    .unwrap();
    let p = public.display();
    let s = Scenario::start(&Options {
        extra_config: format!(
            "[security]\nidentity_key = \"{k}\"\nidentity_info = \"https://hip.test/passport.pem\"\n\
             trusted_identities = {{ \"atlanta.com\" = \"{p}\", \"biloxi.com\" = \"{p}\" }}\n"
        ),
        ..Options::default()
    })
    .unwrap();
    let call = s.call().unwrap();
    s.wait_established().unwrap();
    let mutual = |sec: &serde_json::Value| sec["verification"] == "mutual";
    let timeout = Duration::from_secs(60);
    let a = Scenario::wait_call_security(&s.alice, "alice: mutual", timeout, mutual).unwrap();
    let b = Scenario::wait_call_security(&s.bob, "bob: mutual", timeout, mutual).unwrap();
    let (sa, sb) = (&a["sip_assurance"], &b["sip_assurance"]);
    for sec in [sa, sb] {
        assert_eq!(sec["peer_via"], "identity", "{sec}");
        assert_eq!(sec["own_via"], "identity", "{sec}");
    }
    assert!(
        sb["peer_detail"]
            .as_str()
            .unwrap()
            .contains("INVITE Identity verified: sip:alice@atlanta.com"),
        "{b}"
    );
    assert!(
        sa["peer_detail"]
            .as_str()
            .unwrap()
            .contains("UPDATE Identity verified (draft §4.1): sip:bob@biloxi.com"),
        "{a}"
    );
    s.hangup(&call).unwrap();
}
