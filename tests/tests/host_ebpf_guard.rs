//! The datapath attached to real veths in test namespaces (host kernel, tcx, no ESP):
//! the media guard's verdicts on real traffic with exact counts, the flow
//! statistics of a generated RTP stream with known gaps and known timing, and ESP in
//! UDP counted per SPI both ways.

use std::{
    net::{IpAddr, Ipv6Addr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use hip_datapath::{
    AssocState, AssociationSpec, Datapath, DatapathEvent, DatapathOptions, LocatorState,
    MediaConfig, PeerLocator,
};
use hip_tests::{VethPair, wait_until};

fn rtp(seq: u16, ts: u32, ssrc: u32, payload: usize) -> Vec<u8> {
    let mut r = vec![0x80, 0x00];
    r.extend_from_slice(&seq.to_be_bytes());
    r.extend_from_slice(&ts.to_be_bytes());
    r.extend_from_slice(&ssrc.to_be_bytes());
    r.resize(12 + payload, 0xd5);
    r
}

fn media() -> MediaConfig {
    MediaConfig {
        guard: true,
        ports: 20000..=20100,
        ..MediaConfig::default()
    }
}

fn pin_dir(tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/hipt-{tag}-{}", std::process::id()))
}

/// The datapath on `iface` with the guard on ([`media`]), maps pinned at `pin`.
fn start(iface: String, pin: PathBuf) -> Datapath {
    Datapath::start(&DatapathOptions {
        interfaces: vec![iface],
        pin_dir: pin,
        media: media(),
    })
    .unwrap()
}

/// Receives datagrams until `n` have arrived (waiting on the condition, 5 s at most).
fn recv_n(sock: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    sock.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    wait_until(Duration::from_secs(5), &format!("{n} datagrams"), || {
        while let Ok(len) = sock.recv(&mut buf) {
            got.push(buf[..len].to_vec());
        }
        (got.len() >= n).then_some(())
    })
    .unwrap();
    got
}

#[test]
fn media_guard_drops_rtp_to_unverified_addresses_on_a_veth() {
    let p = VethPair::new("gd", &["10.78.0.1/24"], &["10.78.0.2/24", "10.78.0.3/24"]).unwrap();
    let rx_ok =
        p.b.run_in(|| UdpSocket::bind("10.78.0.2:20010"))
            .unwrap()
            .unwrap();
    let rx_bad =
        p.b.run_in(|| UdpSocket::bind("10.78.0.3:20010"))
            .unwrap()
            .unwrap();
    let rx_port =
        p.b.run_in(|| UdpSocket::bind("10.78.0.3:5004"))
            .unwrap()
            .unwrap();
    let pin = pin_dir("gd");
    let if_a = p.if_a.clone();

    const OK: u16 = 20;
    const BAD: u16 = 15;
    const OTHER_PORT: u16 = 10;
    const NOT_RTP: u16 = 5;
    const ODD_PORT: u16 = 4;
    let (stats, drops, events) =
        p.a.run_in(move || {
            let mut dp = start(if_a, pin);
            dp.upsert_association(&AssociationSpec {
                peer_hit: "2001:20::b".parse().unwrap(),
                local_hit: "2001:20::a".parse().unwrap(),
                locators: vec![PeerLocator {
                    addr: "10.78.0.2".parse().unwrap(),
                    state: LocatorState::Active,
                }],
                spi_in: 0x1001,
                spi_out: 0x2002,
                state: AssocState::Established,
            })
            .unwrap();
            let mut events = dp.events().unwrap();
            let s = UdpSocket::bind("10.78.0.1:20000").unwrap();
            for i in 0..OK {
                s.send_to(&rtp(i, 160 * u32::from(i), 7, 160), "10.78.0.2:20010")
                    .unwrap();
            }
            for i in 0..BAD {
                // Dropped in tc egress: the send itself succeeds.
                s.send_to(&rtp(i, 160 * u32::from(i), 8, 160), "10.78.0.3:20010")
                    .unwrap();
            }
            // From a port outside the media range to one outside it: not media, passes.
            let s_other = UdpSocket::bind("10.78.0.1:5000").unwrap();
            for i in 0..OTHER_PORT {
                s_other
                    .send_to(&rtp(i, 0, 9, 160), "10.78.0.3:5004")
                    .unwrap();
            }
            // From our media port to a port the peer chose outside the range: still
            // media (the source port is ours), so still guarded.
            for i in 0..ODD_PORT {
                s.send_to(&rtp(i, 0, 10, 160), "10.78.0.3:5004").unwrap();
            }
            for _ in 0..NOT_RTP {
                // First octet 0x00: version 0, not RTP; sent last, after the drops.
                s.send_to(&[0u8; 40], "10.78.0.3:20010").unwrap();
            }
            let stats = dp.stats().unwrap();
            let drops = dp.maps().guard_drops().unwrap();
            let evs = events.drain();
            drop(events);
            dp.shutdown().unwrap();
            (stats, drops, evs)
        })
        .unwrap();

    assert_eq!(stats.guard_passed, u64::from(OK));
    assert_eq!(stats.guard_dropped, u64::from(BAD + ODD_PORT));
    assert_eq!(drops.len(), 1);
    assert_eq!(drops[0].dst, "10.78.0.3".parse::<IpAddr>().unwrap());
    assert_eq!(drops[0].packets, u64::from(BAD + ODD_PORT));
    assert_eq!(
        drops[0].bytes,
        u64::from(BAD + ODD_PORT) * (20 + 8 + 12 + 160)
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(
        events[0],
        DatapathEvent::GuardDrop {
            dst_port: 20010,
            ..
        }
    ));

    // The receivers see exactly what passed. The veth delivers in order, so once the
    // non-RTP datagrams sent after the dropped ones have arrived, a leaked RTP packet
    // would have arrived before them.
    let ok = recv_n(&rx_ok, usize::from(OK));
    assert_eq!(ok.len(), usize::from(OK));
    let bad = recv_n(&rx_bad, usize::from(NOT_RTP));
    assert_eq!(bad.len(), usize::from(NOT_RTP));
    assert!(
        bad.iter().all(|d| d[0] == 0),
        "no RTP reached 10.78.0.3:20010"
    );
    // Only the SSRC-9 stream (non-media source port) reached port 5004.
    let port = recv_n(&rx_port, usize::from(OTHER_PORT));
    assert_eq!(port.len(), usize::from(OTHER_PORT));
    assert!(port.iter().all(|d| d[8..12] == 9u32.to_be_bytes()));
}

/// RFC 3550 A.8 on the sender's own CLOCK_MONOTONIC send times (the clock
/// `bpf_ktime_get_ns` reads): the jitter the receiver should compute, up to the
/// per-packet delay variation between `sendto` and tc ingress on the peer veth.
fn reference_jitter_q4(sends: &[(u64, u32)], clock_hz: u64) -> i64 {
    let t0 = sends[0].0;
    let mut j: i64 = 0;
    let mut last_transit: Option<i64> = None;
    for &(t, ts) in sends {
        let arrival = ((t - t0) * clock_hz / 1_000_000_000) as i64;
        let transit = arrival - i64::from(ts);
        if let Some(prev) = last_transit {
            let d = (transit - prev).abs();
            j += d - ((j + 8) >> 4);
        }
        last_transit = Some(transit);
    }
    j
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn rtp_stream_with_known_gaps_and_timing_gives_exact_counts_and_jitter() {
    let p = VethPair::new("fl", &["2001:db8:1::1/64"], &["2001:db8:1::2/64"]).unwrap();
    let hit_a: Ipv6Addr = "2001:20::a".parse().unwrap();
    let hit_b: Ipv6Addr = "2001:20::b".parse().unwrap();
    p.a.ip(["addr", "add", "2001:20::a/128", "dev", "lo", "nodad"])
        .unwrap();
    p.b.ip(["addr", "add", "2001:20::b/128", "dev", "lo", "nodad"])
        .unwrap();
    p.a.ip([
        "-6",
        "route",
        "add",
        "2001:20::b/128",
        "via",
        "2001:db8:1::2",
        "dev",
        &p.if_a,
    ])
    .unwrap();
    p.b.ip([
        "-6",
        "route",
        "add",
        "2001:20::a/128",
        "via",
        "2001:db8:1::1",
        "dev",
        &p.if_b,
    ])
    .unwrap();
    let pin = pin_dir("fl");
    let if_b = p.if_b.clone();
    let mut dp =
        p.b.run_in(move || {
            Datapath::start(&DatapathOptions {
                interfaces: vec![if_b],
                pin_dir: pin,
                media: media(),
            })
        })
        .unwrap()
        .unwrap();
    dp.upsert_association(&AssociationSpec {
        peer_hit: hit_a,
        local_hit: hit_b,
        locators: vec![PeerLocator {
            addr: "2001:db8:1::1".parse().unwrap(),
            state: LocatorState::Active,
        }],
        spi_in: 0x1001,
        spi_out: 0x2002,
        state: AssocState::Established,
    })
    .unwrap();
    let rx =
        p.b.run_in(move || UdpSocket::bind((hit_b, 20002)))
            .unwrap()
            .unwrap();

    // 60 packets of a 20 ms PCMU stream (timestamp step 160); 7 sequence numbers are
    // never sent; every third packet leaves 6 ms late (48 timestamp units), so the
    // jitter is well above zero and known.
    const TOTAL: u16 = 60;
    const PAYLOAD: usize = 160;
    let gaps = [5u16, 6, 17, 30, 31, 32, 44];
    let tx =
        p.a.run_in(move || UdpSocket::bind((hit_a, 20000)))
            .unwrap()
            .unwrap();
    // Neighbour discovery first (it waits for the link-local address's DAD): a
    // non-RTP datagram (version 0) must arrive before the timed stream starts, or the
    // stream would sit in the neighbour queue and arrive in one burst.
    tx.send_to(&[0u8; 20], (hit_b, 20002)).unwrap();
    assert_eq!(recv_n(&rx, 1)[0][0], 0);
    let sends =
        p.a.run_in(move || {
            let s = tx;
            let start = std::time::Instant::now();
            let mut sends = Vec::new();
            for seq in 0..TOTAL {
                if gaps.contains(&seq) {
                    continue;
                }
                let ts = u32::from(seq) * 160;
                let due = Duration::from_millis(u64::from(seq) * 20)
                    + if seq % 3 == 0 {
                        Duration::from_millis(6)
                    } else {
                        Duration::ZERO
                    };
                // Pacing the stimulus (not waiting for a result): sleep until due.
                if let Some(d) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(d);
                }
                let t = monotonic_ns();
                s.send_to(&rtp(seq, ts, 0x5eed, PAYLOAD), (hit_b, 20002))
                    .unwrap();
                sends.push((t, ts));
            }
            sends
        })
        .unwrap();
    let sent = sends.len() as u64;
    recv_n(&rx, sends.len());
    let flows = wait_until(Duration::from_secs(5), "flow counted", || {
        let f = dp.flows().ok()?;
        (f.len() == 1 && f[0].packets == sent).then_some(f)
    })
    .unwrap();
    let f = &flows[0];
    assert_eq!((f.src_hit, f.dst_hit), (hit_a, hit_b));
    assert_eq!((f.src_port, f.dst_port, f.ssrc), (20000, 20002, 0x5eed));
    assert_eq!(f.packets, sent);
    assert_eq!(f.lost, gaps.len() as i64);
    assert_eq!(f.bytes, sent * (40 + 8 + 12 + PAYLOAD as u64));
    assert_eq!(f.spi, 0x1001);
    assert_eq!(f.locator, Some("2001:db8:1::1".parse().unwrap()));
    assert_eq!(
        f.via, "association",
        "no ESP on the host: SPI from the association"
    );
    // Tolerance: 2 timestamp units (250 µs at 8 kHz) on J, i.e. 32 in the ×16 value.
    let expected = reference_jitter_q4(&sends, 8000);
    assert!(
        expected > 16 * 10,
        "the stimulus must create real jitter (expected {expected})"
    );
    assert!(
        (i64::from(f.jitter_q4) - expected).abs() <= 32,
        "jitter_q4 {} vs reference {expected}: {f:?}",
        f.jitter_q4
    );
    let st = dp.stats().unwrap();
    assert_eq!(st.rtp_in, sent);
    dp.shutdown().unwrap();
}

/// Two HITs behind one address (hosts behind one NAT, or two identities on one host):
/// both associations are accepted, and clear-text media to the address passes while
/// either of them is ESTABLISHED there, and only then.
#[test]
fn two_associations_at_one_address_share_its_guard_verdict() {
    let p = VethPair::new("gs", &["10.79.0.1/24"], &["10.79.0.2/24"]).unwrap();
    let pin = pin_dir("gs");
    let if_a = p.if_a.clone();
    let steps =
        p.a.run_in(move || {
            let mut dp = start(if_a, pin);
            let spec = |hit: &str, spi: u32, state| AssociationSpec {
                peer_hit: hit.parse().unwrap(),
                local_hit: "2001:20::a".parse().unwrap(),
                locators: vec![PeerLocator {
                    addr: "10.79.0.2".parse().unwrap(),
                    state: LocatorState::Active,
                }],
                spi_in: spi,
                spi_out: spi + 1,
                state,
            };
            let s = UdpSocket::bind("10.79.0.1:20000").unwrap();
            let mut seq = 0u16;
            // Sends 5 RTP packets to the shared address; returns (passed, dropped) by them.
            let mut burst = |dp: &Datapath| {
                let before = dp.stats().unwrap();
                for _ in 0..5 {
                    s.send_to(&rtp(seq, 0, 7, 160), "10.79.0.2:20010").unwrap();
                    seq += 1;
                }
                let after = dp.stats().unwrap();
                (
                    after.guard_passed - before.guard_passed,
                    after.guard_dropped - before.guard_dropped,
                )
            };
            let b1: Ipv6Addr = "2001:20::b1".parse().unwrap();
            let b2: Ipv6Addr = "2001:20::b2".parse().unwrap();
            let mut v = Vec::new();
            dp.upsert_association(&spec("2001:20::b1", 0x1000, AssocState::Established))
                .unwrap();
            v.push(("b1 established", burst(&dp)));
            dp.upsert_association(&spec("2001:20::b2", 0x2000, AssocState::I2Sent))
                .expect("a second association at the same address is accepted");
            v.push(("b2 still exchanging beside b1", burst(&dp)));
            dp.remove_association(b1).unwrap();
            v.push(("b1 gone, b2 not established", burst(&dp)));
            dp.upsert_association(&spec("2001:20::b2", 0x2000, AssocState::Established))
                .unwrap();
            v.push(("b2 established", burst(&dp)));
            dp.upsert_association(&spec("2001:20::b1", 0x1000, AssocState::Established))
                .unwrap();
            // Written last, b2's entry is the one the address holds; b2 leaves
            // ESTABLISHED, and b1 still verifies the address.
            dp.upsert_association(&spec("2001:20::b2", 0x2000, AssocState::Established))
                .unwrap();
            dp.upsert_association(&spec("2001:20::b2", 0x2000, AssocState::Closing))
                .unwrap();
            v.push(("b2 closing, b1 established", burst(&dp)));
            dp.remove_association(b2).unwrap();
            v.push(("b1 back, b2 gone", burst(&dp)));
            dp.remove_association(b1).unwrap();
            v.push(("both gone", burst(&dp)));
            dp.shutdown().unwrap();
            v
        })
        .unwrap();
    let expect = [
        ("b1 established", (5, 0)),
        ("b2 still exchanging beside b1", (5, 0)),
        ("b1 gone, b2 not established", (0, 5)),
        ("b2 established", (5, 0)),
        ("b2 closing, b1 established", (5, 0)),
        ("b1 back, b2 gone", (5, 0)),
        ("both gone", (0, 5)),
    ];
    assert_eq!(steps, expect);
}

/// ESP header (SPI, sequence) and 100 bytes of "ciphertext".
fn esp(spi: u32, seq: u32) -> Vec<u8> {
    let mut e = spi.to_be_bytes().to_vec();
    e.extend_from_slice(&seq.to_be_bytes());
    e.resize(108, 0x5a);
    e
}

#[test]
fn esp_in_udp_counted_per_spi_on_a_veth_both_ways() {
    // a: us, with the datapath and a socket on the HIP-over-UDP port; b: the peer,
    // sending from a port its NAT would have mapped.
    let p = VethPair::new("eu", &["10.79.0.1/24"], &["10.79.0.2/24"]).unwrap();
    let pin = pin_dir("eu");
    let if_a = p.if_a.clone();
    let mut dp = p.a.run_in(move || start(if_a, pin)).unwrap();
    dp.upsert_association(&AssociationSpec {
        peer_hit: "2001:20::b".parse().unwrap(),
        local_hit: "2001:20::a".parse().unwrap(),
        locators: vec![PeerLocator {
            addr: "10.79.0.2".parse().unwrap(),
            state: LocatorState::Active,
        }],
        spi_in: 0x1001,
        spi_out: 0x2002,
        state: AssocState::Established,
    })
    .unwrap();
    let ours =
        p.a.run_in(|| UdpSocket::bind("10.79.0.1:10500"))
            .unwrap()
            .unwrap();
    let peer =
        p.b.run_in(|| UdpSocket::bind("10.79.0.2:40000"))
            .unwrap()
            .unwrap();
    let hip = [0u8, 0, 0, 0, 0x3b, 4, 0x11, 0x02, 0, 0, 0, 0];

    const OUT: u32 = 12;
    const IN: u32 = 9;
    for i in 0..OUT {
        ours.send_to(&esp(0x2002, i + 1), "10.79.0.2:40000")
            .unwrap();
    }
    ours.send_to(&[0xff], "10.79.0.2:40000").unwrap();
    ours.send_to(&hip, "10.79.0.2:40000").unwrap();
    for i in 0..IN {
        peer.send_to(&esp(0x1001, i + 1), "10.79.0.1:10500")
            .unwrap();
    }
    peer.send_to(&[0xff], "10.79.0.1:10500").unwrap();
    peer.send_to(&hip, "10.79.0.1:10500").unwrap();
    // Everything arrives (the guard judged none of it as media).
    assert_eq!(recv_n(&peer, OUT as usize + 2).len(), OUT as usize + 2);
    assert_eq!(recv_n(&ours, IN as usize + 2).len(), IN as usize + 2);

    let st = dp.stats().unwrap();
    assert_eq!((st.esp_out, st.esp_in), (u64::from(OUT), u64::from(IN)));
    assert_eq!((st.esp_out_unknown_spi, st.esp_in_unknown_spi), (0, 0));
    assert_eq!((st.esp_udp_keepalive, st.esp_udp_hip), (2, 2));
    assert_eq!((st.guard_passed, st.guard_dropped, st.malformed), (0, 0, 0));
    let spis = dp.spi_counters().unwrap();
    let of = |spi: u32| spis.iter().find(|c| c.spi == spi).unwrap();
    assert_eq!(of(0x2002).packets, u64::from(OUT));
    assert_eq!(of(0x1001).packets, u64::from(IN));
    // Frame bytes: Ethernet + IPv4 + UDP + 108.
    assert_eq!(of(0x1001).bytes, u64::from(IN) * (14 + 20 + 8 + 108));
    assert_eq!(of(0x1001).locator_changes, 0);
    assert_eq!(
        of(0x1001).last_src,
        Some("10.79.0.2".parse::<IpAddr>().unwrap())
    );
    dp.shutdown().unwrap();
}
