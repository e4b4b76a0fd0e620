//! Proves the VM harness reaches a kernel with ESP: a BEET-mode ESP SA is added and read
//! back, and UDP between two HITs crosses a veth through a pair of BEET SAs.
//!
//! These run inside the VM (`cargo xtask test`, stage vm); on the host kernel, which
//! has no ESP, the SA add fails with "Requested type not found".

use std::net::UdpSocket;

use hip_tests::{
    NetNs, VethPair,
    xfrm::{TEST_AUTH_KEY, TEST_ENC_KEY, add_beet_sa, add_hit_and_route_with_ip, beet_policy},
};

/// The BEET SAs and policies of these tests carry reqid 7.
const REQID: u32 = 7;
/// Their authentication and encryption keys.
const KEYS: (&str, &str) = (TEST_AUTH_KEY, TEST_ENC_KEY);

/// Outbound and inbound policies between `me` and `peer` (HIT, locator) through BEET.
fn add_policies(ns: &NetNs, me: (&str, &str), peer: (&str, &str)) {
    beet_policy(ns, "add", "out", (me.0, peer.0), (me.1, peer.1), REQID);
    beet_policy(ns, "add", "in", (peer.0, me.0), (peer.1, me.1), REQID);
}

#[test]
fn beet_sa_is_added_and_read_back() {
    let ns = NetNs::new("beet").unwrap();
    add_beet_sa(
        &ns,
        ("2001:db8::1", "2001:db8::2"),
        0x1001,
        REQID,
        ("2001:20::a", "2001:20::b"),
        KEYS,
    );
    let out = ns.ip(["xfrm", "state", "list"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("proto esp spi 0x00001001"), "{text}");
    assert!(text.contains("mode beet"), "{text}");
    assert!(
        text.contains("sel src 2001:20::a/128 dst 2001:20::b/128"),
        "{text}"
    );
    ns.ip(["xfrm", "state", "flush"]).unwrap();
    let out = ns.ip(["xfrm", "state", "list"]).unwrap();
    assert!(out.stdout.is_empty(), "flushed");
}

#[test]
fn udp_between_hits_crosses_beet_sas() {
    let p = VethPair::new("beet", &["2001:db8::1/64"], &["2001:db8::2/64"]).unwrap();
    let (la, lb, ha, hb) = ("2001:db8::1", "2001:db8::2", "2001:20::a", "2001:20::b");
    for (ns, ifc, hit, peer_hit, peer_loc) in
        [(&p.a, &p.if_a, ha, hb, lb), (&p.b, &p.if_b, hb, ha, la)]
    {
        add_hit_and_route_with_ip(ns, ifc, hit, peer_hit, peer_loc);
    }
    for ns in [&p.a, &p.b] {
        add_beet_sa(ns, (la, lb), 0x2001, REQID, (ha, hb), KEYS);
        add_beet_sa(ns, (lb, la), 0x2002, REQID, (hb, ha), KEYS);
    }
    add_policies(&p.a, (ha, la), (hb, lb));
    add_policies(&p.b, (hb, lb), (ha, la));

    let rx =
        p.b.run_in(|| UdpSocket::bind("[2001:20::b]:5004").unwrap())
            .unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    const N: usize = 10;
    p.a.run_in(|| {
        let s = UdpSocket::bind("[2001:20::a]:0").unwrap();
        for i in 0..N {
            s.send_to(format!("datagram {i}").as_bytes(), "[2001:20::b]:5004")
                .unwrap();
        }
    })
    .unwrap();
    let mut buf = [0u8; 256];
    for i in 0..N {
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("datagram {i}").as_bytes());
        assert_eq!(from.ip().to_string(), ha, "inner source is the HIT");
    }
    // The kernel counted them on the inbound SA of b.
    let out =
        p.b.ip([
            "-s", "xfrm", "state", "get", "src", la, "dst", lb, "proto", "esp", "spi", "0x2001",
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{N}(packets)")), "{text}");
}
