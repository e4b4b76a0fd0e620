//! Proves the VM harness reaches a kernel with ESP: a BEET-mode ESP SA is added and read
//! back, and UDP between two HITs crosses a veth through a pair of BEET SAs.
//!
//! These run inside the VM (`cargo xtask test`, stage vm); on the host kernel, which
//! has no ESP, the SA add fails with "Requested type not found".

use std::net::UdpSocket;

use hip_tests::{NetNs, VethPair};

const AUTH: &str = "0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20";
const ENC: &str = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeaf";

fn add_sa(ns: &NetNs, src: &str, dst: &str, spi: &str, hsrc: &str, hdst: &str) {
    ns.ip([
        "xfrm",
        "state",
        "add",
        "src",
        src,
        "dst",
        dst,
        "proto",
        "esp",
        "spi",
        spi,
        "reqid",
        "7",
        "mode",
        "beet",
        "sel",
        "src",
        hsrc,
        "dst",
        hdst,
        "auth-trunc",
        "hmac(sha256)",
        AUTH,
        "128",
        "enc",
        "cbc(aes)",
        ENC,
    ])
    .unwrap();
}

fn add_policies(ns: &NetNs, me: (&str, &str), peer: (&str, &str)) {
    for (dir, s, d, ts, td) in [
        ("out", me.0, peer.0, me.1, peer.1),
        ("in", peer.0, me.0, peer.1, me.1),
    ] {
        ns.ip([
            "xfrm",
            "policy",
            "add",
            "src",
            &format!("{s}/128"),
            "dst",
            &format!("{d}/128"),
            "dir",
            dir,
            "tmpl",
            "src",
            ts,
            "dst",
            td,
            "proto",
            "esp",
            "mode",
            "beet",
            "reqid",
            "7",
        ])
        .unwrap();
    }
}

#[test]
fn beet_sa_is_added_and_read_back() {
    let ns = NetNs::new("beet").unwrap();
    add_sa(
        &ns,
        "2001:db8::1",
        "2001:db8::2",
        "0x1001",
        "2001:20::a",
        "2001:20::b",
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
        ns.ip(["addr", "add", &format!("{hit}/128"), "dev", "lo"])
            .unwrap();
        ns.ip([
            "route",
            "add",
            &format!("{peer_hit}/128"),
            "via",
            peer_loc,
            "dev",
            ifc,
            "src",
            hit,
        ])
        .unwrap();
    }
    for ns in [&p.a, &p.b] {
        add_sa(ns, la, lb, "0x2001", ha, hb);
        add_sa(ns, lb, la, "0x2002", hb, ha);
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
