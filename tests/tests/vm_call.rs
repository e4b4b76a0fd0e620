//! The agent end to end (issue 6), inside the VM (a kernel with ESP): the draft's
//! Figure 1 with two Kamailio proxies, a call from alice to bob, the HIP base exchange
//! against the HIT learned through SIP, BEET SAs in the kernel, RTP between the HITs,
//! and the teardown.

use std::time::Duration;

use hip_tests::{
    call::{self, Options, Scenario, xfrm_counts},
    sip::{es256_key, scratch, wait_calls_ended},
};

#[test]
fn a_call_is_secured_end_to_end_and_leaves_nothing_behind() {
    let mut s = Scenario::start(&Options {
        extra_config: hip_tests::metrics::CONFIG.into(),
        ..Options::default()
    })
    .unwrap();
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
    // The operator's view, from the agent over its socket: hip's SAs with their peer HIT
    // and, from the agent's pool, its SIP URI.
    let listing = s.alice.json(&["xfrm", "--json"]);
    let assocs = listing["associations"].as_array().unwrap();
    assert_eq!(assocs.len(), 1, "{listing}");
    assert_eq!(assocs[0]["peer_hit"], s.bob_hit.as_str(), "{listing}");
    assert_eq!(assocs[0]["sip_uri"], "sip:bob@biloxi.com", "{listing}");
    let spis: std::collections::BTreeSet<(String, u64)> = assocs[0]["sas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sa| {
            // The agent's default anti-replay window (RFC 4303 §3.4.3's preferred 64).
            assert_eq!(sa["replay_window"], 64, "{sa}");
            let dir = sa["direction"].as_str().unwrap_or("?").to_owned();
            (dir, sa["id"]["spi"].as_u64().unwrap())
        })
        .collect();
    let want: std::collections::BTreeSet<(String, u64)> = [
        ("in".to_owned(), ka["spi_in"].as_u64().unwrap()),
        ("out".to_owned(), ka["spi_out"].as_u64().unwrap()),
    ]
    .into();
    assert_eq!(spis, want, "{listing}");

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
    // `hip-agent flows`, answered by bob's agent, shows the same flow.
    let cli: Vec<serde_json::Value> =
        serde_json::from_value(s.bob.json(&["flows", "--json"])).unwrap();
    let same = cli
        .iter()
        .find(|f| f["ssrc"] == flow["ssrc"])
        .unwrap_or_else(|| panic!("{cli:?}"));
    assert_eq!(same["spi"], flow["spi"]);
    assert!(same["packets"].as_u64() >= Some(u64::from(N)), "{same}");

    // The metrics endpoint shows the same kernel objects, SA counters and flow.
    let m = hip_tests::metrics::scrape(s.bob_ns()).unwrap();
    let get = |k: &str| hip_tests::metrics::get(&m, k);
    assert_eq!(get("hip_kernel_sas"), 2.0);
    assert_eq!(get("hip_kernel_policies"), 4.0);
    let spi_in = format!("0x{:08x}", kb["spi_in"].as_u64().unwrap());
    let esp_in = get(&format!(
        "hip_esp_packets_total{{spi=\"{spi_in}\",direction=\"in\",peer_hit=\"{}\"}}",
        s.alice_hit
    ));
    assert!(
        esp_in >= f64::from(N),
        "{esp_in} ESP packets counted on {spi_in}"
    );
    let flow_series = format!(
        "{{src_hit=\"{}\",dst_hit=\"{}\",src_port=\"{}\",dst_port=\"{}\",ssrc=\"{}\"}}",
        flow["src_hit"].as_str().unwrap(),
        flow["dst_hit"].as_str().unwrap(),
        flow["src_port"],
        flow["dst_port"],
        flow["ssrc"]
    );
    assert!(get(&format!("hip_rtp_packets_total{flow_series}")) >= f64::from(N));
    assert_eq!(get(&format!("hip_rtp_lost{flow_series}")), 0.0);
    assert!(get("hip_datapath_events_total{event=\"rtp_in\"}") >= f64::from(N));
    assert_eq!(get("hip_associations{state=\"established\"}"), 1.0);
    assert_eq!(get("hip_kernel_install_seconds_count"), 1.0);
    assert!(
        !m.keys().any(|k| k.starts_with("hip_scrape_error")),
        "{m:#?}"
    );

    s.hangup(&call).unwrap();
    s.wait_kernel_empty().unwrap();
    let m = hip_tests::metrics::scrape(s.alice_ns()).unwrap();
    assert_eq!(hip_tests::metrics::get(&m, "hip_kernel_sas"), 0.0);
    assert_eq!(hip_tests::metrics::get(&m, "hip_kernel_policies"), 0.0);

    // The capture: between the hosts only HIP, ESP (with the reported SPIs) and SIP.
    let pcap = s.stop_capture().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    let direct = call::between(&pkts, call::ALICE_IP, call::BOB_IP);
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
    let (key, public) = es256_key(&dir, "hip.test").unwrap();
    let k = key.to_str().unwrap();
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

#[test]
fn a_moved_caller_keeps_its_media_without_a_reinvite() {
    let mut s = Scenario::start(&Options::default()).unwrap();
    s.call().unwrap();
    let (a, _) = s.wait_established().unwrap();
    assert_eq!(a["associations"][0]["local_locator"], call::ALICE_IP);

    // bob → alice: the direction that breaks when alice's address goes away, until bob's
    // SAs follow her to the new one.
    // A stream long enough to outlast any move (60 s); it is stopped once media has been
    // seen flowing after the move.
    const N: u32 = 3000;
    let rtp = hip_tests::rtp_bin();
    let alice_media = format!("[{}]:{}", s.alice_hit, call::RTP_PORT);
    let mut rx = std::process::Command::new(&rtp)
        .args([
            "--netns",
            s.alice_ns().name(),
            "recv",
            "--announce",
            "--bind",
            &alice_media,
        ])
        .args(["--count", &N.to_string(), "--timeout-s", "120"])
        // The stream ends when the sender is stopped.
        .args(["--idle-ms", "2000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let mut tx = std::process::Command::new(&rtp)
        .args([
            "--netns",
            s.bob_ns().name(),
            "send",
            "--ignore-errors",
            "--count",
            &N.to_string(),
        ])
        .args([
            "--from",
            &format!("[{}]:{}", s.bob_hit, call::RTP_PORT),
            "--to",
            &alice_media,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Media flows before the move (alice's eBPF flow table counts it)...
    Scenario::wait_call_security(
        &s.alice,
        "media before the move",
        Duration::from_secs(60),
        |sec| {
            sec["flows"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["packets"].as_u64() >= Some(10)))
        },
    )
    .unwrap();
    // ...then alice's host changes address: the old one goes away.
    let ns = s.alice_ns();
    // (Promote the new address when the old primary goes: by default Linux deletes an
    // interface's secondary addresses of the same subnet with its primary.)
    ns.exec(
        "sysctl",
        ["-qw", "net.ipv4.conf.valice.promote_secondaries=1"],
    )
    .unwrap();
    ns.ip(["addr", "add", "192.0.2.11/24", "dev", "valice"])
        .unwrap();
    ns.ip(["addr", "del", "192.0.2.1/24", "dev", "valice"])
        .unwrap();
    // HIP UPDATE (LOCATOR_SET, echo check) moves bob's view and SAs to the new locator.
    let b = Scenario::wait_call_security(
        &s.bob,
        "bob to follow alice",
        Duration::from_secs(60),
        |sec| {
            sec["associations"][0]["peer_locator"] == "192.0.2.11"
                && sec["associations"][0]["kernel"]["peer_locator"] == "192.0.2.11"
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n--- alice's log ---\n{}", s.alice.log()));
    assert_eq!(b["associations"][0]["state"], "established");
    // The stream goes on after the move: alice's flow table counts 50 more packets.
    let flow_packets = |sec: &serde_json::Value| {
        sec["flows"]
            .as_array()
            .and_then(|f| f.iter().filter_map(|f| f["packets"].as_u64()).max())
            .unwrap_or(0)
    };
    let at_move = flow_packets(
        &Scenario::wait_call_security(&s.alice, "alice's flow", Duration::from_secs(10), |_| true)
            .unwrap(),
    );
    Scenario::wait_call_security(
        &s.alice,
        "media after the move",
        Duration::from_secs(60),
        |sec| flow_packets(sec) >= at_move + 50,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- bob's log ---\n{}\n--- bob's SAs ---\n{}",
            s.bob.log(),
            String::from_utf8_lossy(&s.bob_ns().ip(["-s", "xfrm", "state"]).unwrap().stdout)
        )
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tx.id() as i32, libc::SIGTERM) };
    tx.wait().unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    rx.wait().unwrap();
    let got: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    // The receiving process saw the same: the stream crossed the move, every packet that
    // arrived was intact (those sent while alice had no address are lost).
    assert!(got["received"].as_u64() >= Some(at_move + 50), "{got}");
    assert!(got["last_seq"].as_u64() >= Some(at_move + 50), "{got}");
    assert_eq!(got["intact"], got["received"], "{got}");
    let a = Scenario::wait_call_security(
        &s.alice,
        "alice's new locator",
        Duration::from_secs(30),
        |sec| sec["associations"][0]["local_locator"] == "192.0.2.11",
    )
    .unwrap();
    assert_eq!(
        a["associations"][0]["kernel"]["local_locator"],
        "192.0.2.11"
    );

    // The signalling followed her too: her SIP listener moved, and bob's BYE finds her at
    // the new address; the call ends on both sides and leaves nothing in the kernel.
    let st = s.alice.status();
    assert_eq!(st["listen"][0], "udp:192.0.2.11:5060", "{st}");
    let bob_call = s.bob.status()["calls"][0]["handle"].to_string();
    s.bob.ctl(&["hangup", &bob_call]).unwrap();
    wait_calls_ended(&[&s.alice, &s.bob], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n--- alice's log ---\n{}", s.alice.log()));
    s.wait_kernel_empty().unwrap();

    // On the wire: HIP UPDATE moved the media; SIP only refreshed the dialog's target (an
    // UPDATE without SDP) and the registration — no re-INVITE, no new offer.
    let pcap = s.stop_capture().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    assert!(
        pkts.iter().any(|p| p.hip_type == Some(16)),
        "a HIP UPDATE on the wire"
    );
    let moved_at = pkts
        .iter()
        .find(|p| p.src == "192.0.2.11")
        .map(|p| p.time)
        .expect("packets from alice's new address");
    let late: Vec<_> = pkts.iter().filter(|p| p.time >= moved_at).collect();
    let sip_from = |method: &str| -> Vec<&&call::Packet> {
        late.iter()
            .filter(|p| p.src == "192.0.2.11" && p.sip.as_deref() == Some(method))
            .collect()
    };
    assert!(
        !late.iter().any(|p| p.sip.as_deref() == Some("INVITE")),
        "no re-INVITE after the move"
    );
    let refresh = sip_from("UPDATE");
    assert!(!refresh.is_empty(), "a target refresh from the new address");
    assert!(refresh.iter().all(|p| !p.sdp), "no offer: {refresh:?}");
    assert!(!sip_from("REGISTER").is_empty(), "registered again");
    assert!(
        late.iter()
            .any(|p| p.sip.as_deref() == Some("BYE") && p.dst == "192.0.2.11"),
        "bob's BYE reaches alice's new address"
    );
    assert!(
        pkts.iter()
            .any(|p| p.proto == 50 && p.src == call::BOB_IP && p.dst == "192.0.2.11"),
        "ESP from bob reaches alice's new address"
    );
    // The moved SAs went on counting: each SPI's sequence numbers after the move are
    // above those before it. (With AES-GCM the IV is derived from the sequence number:
    // a restart would reuse nonces under the same key.)
    let bob_esp = |to: &str| -> std::collections::BTreeMap<u32, Vec<u32>> {
        let mut m = std::collections::BTreeMap::<u32, Vec<u32>>::new();
        for p in pkts
            .iter()
            .filter(|p| p.proto == 50 && p.src == call::BOB_IP && p.dst == to)
        {
            m.entry(p.spi.unwrap())
                .or_default()
                .push(p.esp_seq.unwrap());
        }
        m
    };
    let (before, after) = (bob_esp(call::ALICE_IP), bob_esp("192.0.2.11"));
    let moved: Vec<_> = after.keys().filter(|s| before.contains_key(s)).collect();
    assert!(!moved.is_empty(), "the same SPI before and after the move");
    for spi in moved {
        let last = before[spi].iter().max().unwrap();
        let next = after[spi].iter().min().unwrap();
        assert!(
            next > last,
            "SPI {spi:#x}: sequence numbers restarted after the move ({last} then {next})"
        );
    }
}

/// Issue 12, finding 11: when the kernel refuses to move the SAs (here: bob's outbound SA
/// was deleted behind the agent's back, so there is nothing to move), HIP and the kernel
/// must not diverge. Bob closes the association (CLOSE to alice), his call says why, and
/// neither kernel keeps anything of it: no half-moved SA pair that HIP no longer tracks.
#[test]
fn a_kernel_that_refuses_the_move_closes_the_association_and_says_why() {
    let s = Scenario::start(&Options::default()).unwrap();
    s.call().unwrap();
    let (_, b) = s.wait_established().unwrap();
    let old_out = b["associations"][0]["kernel"]["spi_out"].as_u64().unwrap();
    // Bob's outbound SA (towards alice's current address) goes.
    s.bob_ns()
        .ip([
            "xfrm",
            "state",
            "delete",
            "src",
            call::BOB_IP,
            "dst",
            call::ALICE_IP,
            "proto",
            "esp",
            "spi",
            &format!("{old_out:#x}"),
        ])
        .unwrap();
    // Alice moves: her UPDATE asks bob's kernel to move an SA it no longer has.
    let ns = s.alice_ns();
    ns.exec(
        "sysctl",
        ["-qw", "net.ipv4.conf.valice.promote_secondaries=1"],
    )
    .unwrap();
    ns.ip(["addr", "add", "192.0.2.11/24", "dev", "valice"])
        .unwrap();
    ns.ip(["addr", "del", "192.0.2.1/24", "dev", "valice"])
        .unwrap();
    let lost = Scenario::wait_call_security(
        &s.bob,
        "bob's call to learn the association was lost",
        Duration::from_secs(60),
        |sec| !sec["association_lost"].is_null(),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n--- bob's log ---\n{}", s.bob.log()));
    let why = lost["association_lost"].as_str().unwrap();
    assert!(why.contains("refused to move"), "{lost}");
    // Bob's record says so too, and is no longer established.
    let rec = &lost["associations"][0];
    assert_eq!(rec["state"], "closed", "{lost}");
    assert!(
        rec["lost"]
            .as_str()
            .is_some_and(|l| l.contains("refused to move")),
        "{lost}"
    );
    // Alice got the CLOSE: her association ends as well.
    Scenario::wait_call_security(
        &s.alice,
        "alice's association closed",
        Duration::from_secs(60),
        |sec| {
            sec["associations"]
                .as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(|x| x["state"] == "closed"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n--- alice's log ---\n{}", s.alice.log()));
    // Nothing of the association is left in either kernel (SAs, policies).
    s.wait_kernel_empty().unwrap();
    let bob_call = s.bob.status()["calls"][0]["handle"].to_string();
    s.bob.ctl(&["hangup", &bob_call]).unwrap();
    wait_calls_ended(&[&s.alice, &s.bob], Duration::from_secs(60)).unwrap();
}

/// Issue 13 (a): alice behind a NAT (nftables masquerade, UDP bindings forgotten after
/// 20 s) calls bob on a public address. HIP runs over UDP 10500 (RFC 9028 framing), the
/// SAs are UDP-encapsulated (the kernel's `espinudp`), and the NAT's public side carries
/// only SIP, HIP over UDP and UDP-encapsulated ESP. Keepalives hold the binding through
/// an idle gap longer than its timeout.
#[test]
fn a_caller_behind_a_nat_gets_a_secured_call_through_it() {
    use hip_tests::sip::{ALICE_PRIVATE_IP, NAT_UDP_TIMEOUT_S};
    let (mut s, call, a, b) = established_call(
        Options {
            alice_behind_nat: true,
            ..Options::default()
        },
        false,
    );
    let (aa, ab) = (&a["associations"][0], &b["associations"][0]);
    // alice sees bob as he is; bob sees alice at the NAT's address and mapped port; both
    // SAs on each side are UDP-encapsulated, with the same ports.
    let mapped = assert_nat_views(
        (aa, s.alice_ns(), ALICE_PRIVATE_IP),
        (ab, s.bob_ns(), call::BOB_IP),
        call::ALICE_IP,
    );

    const N: u32 = 50;
    let check = |r: call::RtpReport, what: &str| all_intact(&r, N, what);
    media_both_ways(&s, N, "at first");
    // bob's eBPF programs counted the encapsulated ESP on his inbound SPI and classified
    // the decrypted stream, from the NAT's address.
    let flows =
        Scenario::wait_call_security(&s.bob, "bob's flow", Duration::from_secs(30), |sec| {
            sec["flows"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["packets"] == N))
        })
        .unwrap();
    let flow = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["packets"] == N)
        .unwrap();
    assert_eq!(flow["spi"], ab["kernel"]["spi_in"], "{flow}");
    assert_eq!(flow["locator"], call::ALICE_IP, "{flow}");

    // Idle for longer than the NAT keeps an unused binding: only the keepalives (every
    // 15 s, RFC 9028 §4.10) cross it. The idle time itself is what is tested here.
    let before = s.bob.status()["limits"]["hip"]["keepalives_received"]
        .as_u64()
        .unwrap();
    std::thread::sleep(Duration::from_secs(NAT_UDP_TIMEOUT_S + 6));
    let st_a = s.alice.status();
    let st_b = s.bob.status();
    assert!(
        st_a["limits"]["hip"]["keepalives_sent"].as_u64() >= Some(1),
        "{}",
        st_a["limits"]["hip"]
    );
    assert!(
        st_b["limits"]["hip"]["keepalives_received"].as_u64() > Some(before),
        "{}",
        st_b["limits"]["hip"]
    );
    // The operator's view: when alice's last keepalive came, per association.
    let age = st_b["limits"]["hip"]["keepalive_age_ms"][s.alice_hit.as_str()].as_u64();
    assert!(
        age.is_some_and(|ms| ms <= 16_000),
        "{}",
        st_b["limits"]["hip"]
    );
    // Media still gets through both ways, on the same binding (no re-exchange).
    media_both_ways(&s, N, "after the idle gap");
    let (_, b2) = s.wait_established().unwrap();
    assert_eq!(b2["associations"][0]["nat"]["peer_port"], mapped, "{b2}");

    // The NAT restarts: its bindings are gone and alice's next datagram gets another
    // public port. bob's kernel takes her ESP from there and reports it
    // (XFRM_MSG_MAPPING); bob checks the new path with an echo, and only then moves his
    // SAs to it — so his media reaches her again, without a new exchange or re-INVITE.
    s.net.rebind_nat().unwrap();
    let rebound = std::time::Instant::now();
    check(
        s.stream_rtp(N).unwrap(),
        "alice → bob after the NAT rebound",
    );
    let moved = Scenario::wait_call_security(
        &s.bob,
        "bob to follow the new mapping",
        Duration::from_secs(60),
        |sec| {
            sec["associations"][0]["nat"]["peer_port"]
                .as_u64()
                .is_some_and(|p| (20000..21000).contains(&p))
        },
    )
    .unwrap();
    println!(
        "NAT rebinding followed {} ms after the NAT restarted (alice's stream of {N} packets, 20 ms apart, started at once)",
        rebound.elapsed().as_millis()
    );
    let log = s.bob.log();
    for l in log.lines().filter(|l| {
        l.contains("NAT mapping") || l.contains("locators changed") || l.contains("verif")
    }) {
        println!("bob: {l}");
    }
    let new_port = moved["associations"][0]["nat"]["peer_port"]
        .as_u64()
        .unwrap();
    // bob's status reports the change and his part of the gap: from the kernel's first
    // report of ESP on the new path to his SAs moved.
    let nat = &moved["associations"][0]["nat"];
    assert_eq!(nat["path_changes"], 1, "{nat}");
    let follow = nat["last_follow_ms"].as_u64().expect("last_follow_ms");
    println!("bob's SAs followed {follow} ms after his kernel reported the new path");
    let st = s.bob_ns().ip(["xfrm", "state", "list"]).unwrap();
    let st = String::from_utf8_lossy(&st.stdout).into_owned();
    assert!(
        st.contains(&format!("sport 10500 dport {new_port}")),
        "{st}"
    );
    assert!(
        st.contains(&format!("sport {new_port} dport 10500")),
        "{st}"
    );
    check(
        s.stream_rtp_to_alice(N).unwrap(),
        "bob → alice after the NAT rebound",
    );
    assert_eq!(
        moved["associations"][0]["kernel"]["spi_in"], ab["kernel"]["spi_in"],
        "the same SAs, moved"
    );

    s.hangup(&call).unwrap();
    s.wait_kernel_empty().unwrap();

    // The NAT's public side, decoded by tshark: between the NAT's address and bob only
    // SIP, HIP over UDP and UDP-encapsulated ESP — no raw HIP, no raw ESP, no clear RTP.
    let pcap = s.stop_capture().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    let direct = call::between(&pkts, call::ALICE_IP, call::BOB_IP);
    // (ICMP errors are allowed: the NAT answers bob's packets to a binding it forgot
    // with port unreachable, quoting them — until bob follows the new one.)
    let wrong: Vec<_> = direct
        .iter()
        .filter(|p| {
            let sip_or_hip_udp =
                [p.sport, p.dport].contains(&10500) || p.sport == 5060 || p.dport == 5060;
            !(p.proto == 1 || p.proto == 17 && sip_or_hip_udp)
        })
        .collect();
    assert!(wrong.is_empty(), "not SIP or UDP 10500: {wrong:?}");
    let encap: Vec<_> = direct
        .iter()
        .filter(|p| [p.sport, p.dport].contains(&10500))
        .collect();
    assert!(
        encap.len() as u32 >= 4 * N,
        "{} datagrams on 10500 for {} RTP packets",
        encap.len(),
        4 * N
    );
    assert!(
        !pkts
            .iter()
            .any(|p| p.proto == 17 && [p.sport, p.dport].contains(&call::RTP_PORT)),
        "clear RTP on the wire"
    );
}

/// Issue 13, case (b): bob is behind a NAT and alice calls him. His registration is
/// saved with the NAT's binding (Kamailio's nathelper), the INVITE reaches him through it,
/// and his answer says he starts HIP (`a=hip-nat:initiate`): no I1 of alice's could reach
/// him. He runs the base exchange over UDP once the ACK confirms the call; alice answers it
/// as a responder, accepting only the HITs of his answer.
#[test]
fn a_callee_behind_a_nat_starts_hip_itself_and_its_call_is_secured() {
    use hip_tests::sip::{BOB_PRIVATE_IP, NAT_UDP_TIMEOUT_S};
    let (mut s, call, a, b) = established_call(
        Options {
            bob_behind_nat: true,
            ..Options::default()
        },
        false,
    );
    let (aa, ab) = (&a["associations"][0], &b["associations"][0]);
    // The roles of the exchange are reversed: bob, the callee, initiated it.
    assert_eq!(ab["initiator"], true, "{ab}");
    assert_eq!(aa["initiator"], false, "{aa}");
    // bob sees alice as she is; alice sees bob at the NAT's address and mapped port.
    assert_nat_views(
        (ab, s.bob_ns(), BOB_PRIVATE_IP),
        (aa, s.alice_ns(), call::ALICE_IP),
        call::BOB_IP,
    );
    // HIP proved each side's HIT from SDP (no SIP Identity here: nothing signed the SDP).
    for (who, sec) in [("alice", &a), ("bob", &b)] {
        assert_eq!(sec["verification"], "unverified", "{who}: {sec}");
    }

    const N: u32 = 50;
    media_both_ways(&s, N, "at first");

    // Idle for longer than the NAT keeps an unused binding: bob's HIP keepalives keep
    // his path, his SIP keepalives his registration's binding.
    std::thread::sleep(Duration::from_secs(NAT_UDP_TIMEOUT_S + 6));
    let st_a = s.alice.status();
    let age = st_a["limits"]["hip"]["keepalive_age_ms"][s.bob_hit.as_str()].as_u64();
    assert!(
        age.is_some_and(|ms| ms <= 16_000),
        "{}",
        st_a["limits"]["hip"]
    );
    media_both_ways(&s, N, "after the idle gap");

    // alice hangs up: her BYE follows the route set through bob's proxy, which reaches
    // him through the NAT's binding of his registration (it ends his call too).
    s.hangup(&call).unwrap();
    s.wait_kernel_empty().unwrap();

    // Between alice and the NAT only HIP over UDP and UDP-encapsulated ESP (and ICMP);
    // SIP goes through the proxies; no raw HIP, raw ESP or clear RTP anywhere.
    let pcap = s.stop_capture().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    let direct = call::between(&pkts, call::ALICE_IP, call::BOB_IP);
    let wrong: Vec<_> = direct
        .iter()
        .filter(|p| !(p.proto == 1 || p.proto == 17 && [p.sport, p.dport].contains(&10500)))
        .collect();
    assert!(wrong.is_empty(), "not UDP 10500: {wrong:?}");
    assert!(
        direct.len() as u32 >= 4 * N,
        "{} datagrams on 10500 for {} RTP packets",
        direct.len(),
        4 * N
    );
    assert!(
        !pkts.iter().any(|p| p.proto == 139
            || p.proto == 50
            || p.proto == 17 && [p.sport, p.dport].contains(&call::RTP_PORT)),
        "raw HIP, raw ESP or clear RTP on the wire"
    );
    // The BYE crossed the NAT to bob (from his proxy, after the idle gap).
    assert!(
        pkts.iter().any(|p| p.sip.as_deref() == Some("BYE")
            && p.src == "192.0.2.3"
            && p.dst == call::BOB_IP),
        "the BYE from bob's proxy to the NAT"
    );
}

/// Issue 13, item 5: alice, behind one NAT, moves behind another (a new private address,
/// a new public one). Her HIP UPDATE goes over UDP through the new NAT; bob checks the new
/// path (the NAT's address and port it came from) with an echo before he moves his SAs
/// there — so media flows again both ways without a new exchange or a re-INVITE.
#[test]
fn a_caller_moving_from_one_nat_to_another_keeps_its_call() {
    use hip_tests::sip::{ALICE_PRIVATE_IP, ALICE_SECOND_PRIVATE_IP};
    let (mut s, call, a, b) = established_call(
        Options {
            alice_behind_nat: true,
            ..Options::default()
        },
        true,
    );
    assert_eq!(a["associations"][0]["local_locator"], ALICE_PRIVATE_IP);
    assert_eq!(b["associations"][0]["peer_locator"], call::ALICE_IP);
    let spi_in = b["associations"][0]["kernel"]["spi_in"].clone();
    const N: u32 = 50;
    let check = |r: call::RtpReport, what: &str| all_intact(&r, N, what);
    check(s.stream_rtp(N).unwrap(), "alice → bob before the move");

    // alice's host joins the second NAT's network, routes through it, and leaves the
    // first one.
    let ns = s.alice_ns();
    ns.ip([
        "addr",
        "add",
        &format!("{ALICE_SECOND_PRIVATE_IP}/24"),
        "dev",
        "valice2",
    ])
    .unwrap();
    ns.ip([
        "route", "replace", "default", "via", "10.0.2.1", "dev", "valice2",
    ])
    .unwrap();
    ns.ip([
        "addr",
        "del",
        &format!("{ALICE_PRIVATE_IP}/24"),
        "dev",
        "valice",
    ])
    .unwrap();
    let left = std::time::Instant::now();
    let moved = Scenario::wait_call_security(
        &s.bob,
        "bob to follow alice to the second NAT",
        Duration::from_secs(60),
        |sec| {
            sec["associations"][0]["peer_locator"] == "192.0.2.11"
                && sec["associations"][0]["kernel"]["peer_locator"] == "192.0.2.11"
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- alice's log ---\n{}\n--- bob's log ---\n{}",
            s.alice.log(),
            s.bob.log()
        )
    });
    println!(
        "bob's SAs followed alice to the second NAT {} ms after she left the first",
        left.elapsed().as_millis()
    );
    let ab = &moved["associations"][0];
    assert_eq!(ab["state"], "established", "{ab}");
    assert_eq!(ab["kernel"]["spi_in"], spi_in, "the same SAs, moved: {ab}");
    assert_eq!(ab["nat"]["path_changes"], 1, "{ab}");
    let port = ab["nat"]["peer_port"].as_u64().expect("the new NAT's port");
    let st = s.bob_ns().ip(["xfrm", "state", "list"]).unwrap();
    let st = String::from_utf8_lossy(&st.stdout).into_owned();
    assert!(st.contains("192.0.2.11"), "{st}");
    assert!(st.contains(&format!("sport 10500 dport {port}")), "{st}");
    Scenario::wait_call_security(
        &s.alice,
        "alice's new locator",
        Duration::from_secs(30),
        |sec| sec["associations"][0]["local_locator"] == ALICE_SECOND_PRIVATE_IP,
    )
    .unwrap();
    media_both_ways(&s, N, "after the move");
    s.hangup(&call).unwrap();
    s.wait_kernel_empty().unwrap();

    // No new exchange and no re-INVITE: one I1 in the whole capture, no INVITE after it,
    // and the move was a HIP UPDATE from the second NAT's address.
    let pcap = s.stop_capture().unwrap();
    let pkts = call::read_pcap(&pcap).unwrap();
    let i1s: Vec<_> = pkts.iter().filter(|p| p.hip_type == Some(1)).collect();
    assert_eq!(i1s.len(), 1, "one I1: {i1s:?}");
    assert!(
        !pkts
            .iter()
            .any(|p| p.sip.as_deref() == Some("INVITE") && p.time > i1s[0].time),
        "no re-INVITE"
    );
    assert!(
        pkts.iter()
            .any(|p| p.hip_type == Some(16) && p.src == "192.0.2.11"),
        "a HIP UPDATE from the second NAT"
    );
}

/// Both SAs in `ns` are BEET SAs encapsulated in UDP between our port 10500 and the
/// peer's `peer_port` (each direction swapped).
fn assert_encapsulated(ns: &hip_tests::NetNs, peer_port: u64) {
    let st = ns.ip(["xfrm", "state", "list"]).unwrap();
    let st = String::from_utf8_lossy(&st.stdout).into_owned();
    assert_eq!(st.matches("mode beet").count(), 2, "{st}");
    assert_eq!(st.matches("encap type espinudp").count(), 2, "{st}");
    for dir in [
        format!("sport 10500 dport {peer_port}"),
        format!("sport {peer_port} dport 10500"),
    ] {
        assert!(st.contains(&dir), "{dir} in {}: {st}", ns.name());
    }
}

/// The receiver got all `n` packets of a stream, intact.
fn all_intact(r: &call::RtpReport, n: u32, what: &str) {
    assert_eq!(r.received["received"], n, "{what}: {:?}", r.received);
    assert_eq!(r.received["intact"], n, "{what}: {:?}", r.received);
}

/// `n` RTP packets alice → bob, then bob → alice, each stream complete and intact.
fn media_both_ways(s: &Scenario, n: u32, when: &str) {
    all_intact(&s.stream_rtp(n).unwrap(), n, &format!("alice → bob {when}"));
    all_intact(
        &s.stream_rtp_to_alice(n).unwrap(),
        n,
        &format!("bob → alice {when}"),
    );
}

/// A scenario started with `opts` (and alice's second NAT ready, with `second_nat`), alice's
/// call to bob placed and its association established on both sides: the scenario, the
/// call's handle, alice's and bob's call security blocks.
fn established_call(
    opts: Options,
    second_nat: bool,
) -> (Scenario, String, serde_json::Value, serde_json::Value) {
    let mut s = Scenario::start(&opts).unwrap();
    if second_nat {
        s.net.add_second_nat_for_alice().unwrap();
    }
    let call = s.call().unwrap();
    let (a, b) = s.wait_established().unwrap();
    (s, call, a, b)
}

/// An association across one NAT, as each end sees it: the host `inside` (its association
/// record, namespace and private address) reaches the peer as it is, on port 10500 at both
/// ends; the peer `outside` (record, namespace, address) sees it at `nat_ip` and the NAT's
/// mapped port, directly (no relay). Both SAs on each side are encapsulated accordingly.
/// Returns the mapped port.
fn assert_nat_views(
    inside: (&serde_json::Value, &hip_tests::NetNs, &str),
    outside: (&serde_json::Value, &hip_tests::NetNs, &str),
    nat_ip: &str,
) -> u64 {
    let ((i, i_ns, private_ip), (o, o_ns, public_ip)) = (inside, outside);
    assert_eq!(i["local_locator"], private_ip, "{i}");
    assert_eq!(i["peer_locator"], public_ip, "{i}");
    assert_eq!(i["nat"]["local_port"], 10500, "{i}");
    assert_eq!(i["nat"]["peer_port"], 10500, "{i}");
    assert_eq!(o["peer_locator"], nat_ip, "the NAT's address: {o}");
    assert_eq!(o["nat"]["relayed"], false, "{o}");
    let mapped = o["nat"]["peer_port"].as_u64().expect("the mapped port");
    assert_encapsulated(i_ns, 10500);
    assert_encapsulated(o_ns, mapped);
    mapped
}
