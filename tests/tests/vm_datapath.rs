//! Real ESP (VM kernel): an RTP stream between two HITs over BEET SAs set with
//! `ip xfrm`; the receiver's flow table shows the SPI and peer locator the packets
//! were decrypted with (from the skb's XFRM state) and counts exactly what was sent;
//! moving the sender's locator produces exactly one locator-change event.
//!
//! The SAs are set with `ip xfrm` here until the agent's own netlink XFRM code
//! (`hip-kernel`) is wired into the tests.

use std::{
    net::{IpAddr, Ipv6Addr, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use hip_datapath::{
    AssocState, AssociationSpec, Datapath, DatapathEvent, DatapathOptions, LocatorState,
    MediaConfig, PeerLocator,
};
use hip_tests::{
    NetNs, VethPair, wait_until,
    xfrm::{HIT_A, HIT_B, LOC_A, LOC_B, add_beet_sa, beet_policy},
};

const LOC_A2: &str = "2001:db8::11";
const SPI_AB: u32 = 0x1001;
const SPI_BA: u32 = 0x2002;
const AUTH_AB: &str = "0x1111111111111111111111111111111111111111111111111111111111111111";
const ENC_AB: &str = "0x22222222222222222222222222222222";
const AUTH_BA: &str = "0x3333333333333333333333333333333333333333333333333333333333333333";
const ENC_BA: &str = "0x44444444444444444444444444444444";

fn del_sa(ns: &NetNs, src: &str, dst: &str, spi: u32) {
    ns.ip([
        "xfrm",
        "state",
        "delete",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "spi",
        &format!("{spi:#x}"),
    ])
    .unwrap();
}

fn rtp(seq: u16, ssrc: u32) -> Vec<u8> {
    let mut r = vec![0x80, 0x00];
    r.extend_from_slice(&seq.to_be_bytes());
    r.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    r.extend_from_slice(&ssrc.to_be_bytes());
    r.resize(12 + 160, 0xd5);
    r
}

fn recv_n(sock: &UdpSocket, n: usize) {
    sock.set_nonblocking(true).unwrap();
    let mut got = 0;
    let mut buf = [0u8; 2048];
    wait_until(Duration::from_secs(20), &format!("{n} datagrams"), || {
        while sock.recv(&mut buf).is_ok() {
            got += 1;
        }
        (got >= n).then_some(())
    })
    .unwrap();
    assert_eq!(got, n);
}

#[test]
fn rtp_over_beet_esp_is_mapped_to_spi_and_locator_and_a_move_reports_once() {
    let p = VethPair::new("vd", &[&format!("{LOC_A}/64")], &[&format!("{LOC_B}/64")]).unwrap();
    let (a, b) = (&p.a, &p.b);
    a.ip(["addr", "add", &format!("{HIT_A}/128"), "dev", "lo", "nodad"])
        .unwrap();
    b.ip(["addr", "add", &format!("{HIT_B}/128"), "dev", "lo", "nodad"])
        .unwrap();
    a.ip([
        "-6",
        "route",
        "add",
        &format!("{HIT_B}/128"),
        "via",
        LOC_B,
        "dev",
        &p.if_a,
    ])
    .unwrap();
    b.ip([
        "-6",
        "route",
        "add",
        &format!("{HIT_A}/128"),
        "via",
        LOC_A,
        "dev",
        &p.if_b,
    ])
    .unwrap();
    for ns in [a, b] {
        add_beet_sa(
            ns,
            (LOC_A, LOC_B),
            SPI_AB,
            1,
            (HIT_A, HIT_B),
            (AUTH_AB, ENC_AB),
        );
        add_beet_sa(
            ns,
            (LOC_B, LOC_A),
            SPI_BA,
            2,
            (HIT_B, HIT_A),
            (AUTH_BA, ENC_BA),
        );
    }
    beet_policy(a, "add", "out", (HIT_A, HIT_B), (LOC_A, LOC_B), 1);
    beet_policy(a, "add", "in", (HIT_B, HIT_A), (LOC_B, LOC_A), 2);
    beet_policy(b, "add", "in", (HIT_A, HIT_B), (LOC_A, LOC_B), 1);
    beet_policy(b, "add", "out", (HIT_B, HIT_A), (LOC_B, LOC_A), 2);

    let pin = PathBuf::from(format!("/sys/fs/bpf/hipt-vd-{}", std::process::id()));
    let if_b = p.if_b.clone();
    let mut dp = b
        .run_in(move || {
            Datapath::start(&DatapathOptions {
                interfaces: vec![if_b],
                pin_dir: pin,
                media: MediaConfig {
                    guard: true,
                    ports: 20000..=20100,
                    ..MediaConfig::default()
                },
            })
        })
        .unwrap()
        .unwrap();
    let hit_a: Ipv6Addr = HIT_A.parse().unwrap();
    let hit_b: Ipv6Addr = HIT_B.parse().unwrap();
    let mut spec = AssociationSpec {
        peer_hit: hit_a,
        local_hit: hit_b,
        locators: vec![PeerLocator {
            addr: LOC_A.parse().unwrap(),
            state: LocatorState::Active,
        }],
        spi_in: SPI_AB,
        spi_out: SPI_BA,
        state: AssocState::Established,
    };
    dp.upsert_association(&spec).unwrap();
    let mut events = dp.events().unwrap();

    let rx = b
        .run_in(move || UdpSocket::bind((hit_b, 20002)))
        .unwrap()
        .unwrap();
    let tx = a
        .run_in(move || UdpSocket::bind((hit_a, 20000)))
        .unwrap()
        .unwrap();
    // Warm-up (version-0 datagram, not RTP) through ESP: neighbour discovery done.
    tx.send_to(&[0u8; 20], (hit_b, 20002)).unwrap();
    recv_n(&rx, 1);

    const N: u16 = 40;
    for seq in 0..N {
        tx.send_to(&rtp(seq, 0xc0ffee), (hit_b, 20002)).unwrap();
    }
    recv_n(&rx, usize::from(N));
    let flows = dp.flows().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = &flows[0];
    assert_eq!((f.src_hit, f.dst_hit, f.ssrc), (hit_a, hit_b, 0xc0ffee));
    assert_eq!(f.packets, u64::from(N));
    assert_eq!(f.lost, 0);
    assert_eq!(f.bytes, u64::from(N) * (40 + 8 + 12 + 160));
    assert_eq!(f.spi, SPI_AB);
    assert_eq!(f.locator, Some(LOC_A.parse().unwrap()));
    assert_eq!(f.via, "xfrm", "SPI and locator from the packet's own SA");
    let spi_in = |dp: &Datapath| {
        dp.spi_counters()
            .unwrap()
            .into_iter()
            .find(|c| c.spi == SPI_AB && c.direction == "in")
            .unwrap()
    };
    // Warm-up + stream, each one ESP packet on vb's ingress.
    assert_eq!(spi_in(&dp).packets, u64::from(N) + 1);
    assert!(events.drain().is_empty());

    // Move the sender: new outer address, SA and policy follow (as a HIP UPDATE
    // would make them); the receiver's SA and policy are updated too.
    a.ip([
        "addr",
        "add",
        &format!("{LOC_A2}/64"),
        "dev",
        &p.if_a,
        "nodad",
    ])
    .unwrap();
    del_sa(a, LOC_A, LOC_B, SPI_AB);
    add_beet_sa(
        a,
        (LOC_A2, LOC_B),
        SPI_AB,
        1,
        (HIT_A, HIT_B),
        (AUTH_AB, ENC_AB),
    );
    beet_policy(a, "update", "out", (HIT_A, HIT_B), (LOC_A2, LOC_B), 1);
    del_sa(b, LOC_A, LOC_B, SPI_AB);
    add_beet_sa(
        b,
        (LOC_A2, LOC_B),
        SPI_AB,
        1,
        (HIT_A, HIT_B),
        (AUTH_AB, ENC_AB),
    );
    beet_policy(b, "update", "in", (HIT_A, HIT_B), (LOC_A2, LOC_B), 1);

    const M: u16 = 25;
    for seq in N..N + M {
        tx.send_to(&rtp(seq, 0xc0ffee), (hit_b, 20002)).unwrap();
    }
    recv_n(&rx, usize::from(M));
    let evs = events.drain();
    assert_eq!(evs.len(), 1, "exactly one locator change: {evs:?}");
    assert_eq!(
        evs[0],
        DatapathEvent::LocatorChange {
            spi: SPI_AB,
            peer_hit: hit_a,
            old: LOC_A.parse().unwrap(),
            new: LOC_A2.parse().unwrap(),
            ts_ns: match evs[0] {
                DatapathEvent::LocatorChange { ts_ns, .. } => ts_ns,
                _ => unreachable!(),
            },
        }
    );
    let f = &dp.flows().unwrap()[0];
    assert_eq!(f.packets, u64::from(N + M));
    assert_eq!(f.lost, 0);
    assert_eq!(f.locator, Some(LOC_A2.parse::<IpAddr>().unwrap()));
    assert_eq!(f.spi, SPI_AB);
    let c = spi_in(&dp);
    assert_eq!((c.packets, c.locator_changes), (u64::from(N + M) + 1, 1));

    // The agent records the verified new locator: no further event.
    spec.locators[0].addr = LOC_A2.parse().unwrap();
    dp.upsert_association(&spec).unwrap();
    tx.send_to(&rtp(N + M, 0xc0ffee), (hit_b, 20002)).unwrap();
    recv_n(&rx, 1);
    assert!(events.drain().is_empty());
    assert_eq!(dp.stats().unwrap().locator_changes, 1);
    drop(events);
    // Shut down from this (root-namespace) thread: the netlink filters of the 6.1
    // kernel must still be removed from namespace b.
    dp.shutdown().unwrap();
    for dir in ["ingress", "egress"] {
        let out = b
            .exec("tc", ["filter", "show", "dev", &p.if_b, dir])
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(!out.contains("hip_tc_"), "{dir} filter left: {out}");
    }
}
