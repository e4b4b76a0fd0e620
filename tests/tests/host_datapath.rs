//! The eBPF tc programs of `hip-ebpf`, loaded by the agent's own loader on a veth in a
//! test namespace, count exactly the packets that cross it.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
};

use hip_datapath::Direction;
use hip_tests::{VethPair, run_agent};

/// Makes the link quiet: no IPv6 (no MLD/RS/ND chatter) and static ARP entries, so the
/// only packets crossing it are the ones the test sends.
fn quiet(p: &VethPair, mac_a: &str, mac_b: &str) -> anyhow::Result<()> {
    p.a.ip([
        "neigh",
        "replace",
        "10.77.0.2",
        "lladdr",
        mac_b,
        "dev",
        &p.if_a,
        "nud",
        "permanent",
    ])?;
    p.b.ip([
        "neigh",
        "replace",
        "10.77.0.1",
        "lladdr",
        mac_a,
        "dev",
        &p.if_b,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

fn mac(ns: &hip_tests::NetNs, ifc: &str) -> String {
    let out = ns.ip(["-br", "link", "show", ifc]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_owned()
}

/// `hip-agent datapath VERB` (`attach` or `detach`) on `vb` in namespace b; fails the
/// test if the agent exits non-zero.
fn datapath_cli(p: &VethPair, verb: &str, pin_dir: &Path) {
    run_agent([
        "--netns",
        p.b.name(),
        "datapath",
        verb,
        "--iface",
        &p.if_b,
        "--pin-dir",
        pin_dir.to_str().unwrap(),
    ])
    .unwrap_or_else(|e| panic!("{verb} failed: {e:#}"));
}

#[test]
fn tc_programs_count_packets_on_a_veth() {
    let p = VethPair::new("dp", &["10.77.0.1/24"], &["10.77.0.2/24"]).unwrap();
    for (ns, ifc) in [(&p.a, &p.if_a), (&p.b, &p.if_b)] {
        ns.exec(
            "sysctl",
            ["-qw", &format!("net.ipv6.conf.{ifc}.disable_ipv6=1")],
        )
        .unwrap();
    }
    quiet(&p, &mac(&p.a, &p.if_a), &mac(&p.b, &p.if_b)).unwrap();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/hip-test-{}", p.b.name()));
    let _guard = hip_tests::PinDir(pin_dir.clone());

    datapath_cli(&p, "attach", &pin_dir);

    // A receiver in b, so that no ICMP port-unreachable goes back out of vb.
    let rx =
        p.b.run_in(|| UdpSocket::bind("10.77.0.2:5004").unwrap())
            .unwrap();
    const N: u64 = 25;
    const PAYLOAD: usize = 100;
    p.a.run_in(|| {
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        for _ in 0..N {
            s.send_to(&[0xab; PAYLOAD], "10.77.0.2:5004").unwrap();
        }
    })
    .unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..N {
        assert_eq!(rx.recv(&mut buf).unwrap(), PAYLOAD);
    }

    let ing = hip_datapath::read_pinned_counters(&pin_dir, Direction::Ingress).unwrap();
    let eg = hip_datapath::read_pinned_counters(&pin_dir, Direction::Egress).unwrap();
    // Ethernet 14 + IPv4 20 + UDP 8 + payload.
    assert_eq!(ing.packets, N, "ingress packets");
    assert_eq!(
        ing.bytes,
        N * (14 + 20 + 8 + PAYLOAD as u64),
        "ingress bytes"
    );
    assert_eq!(eg.packets, 0, "egress packets");

    datapath_cli(&p, "detach", &pin_dir);
    assert!(!pin_dir.exists(), "pins removed");
    let tc =
        p.b.exec("tc", ["filter", "show", "dev", &p.if_b, "ingress"])
            .unwrap();
    assert!(
        !String::from_utf8_lossy(&tc.stdout).contains("hip_tc"),
        "no filter left"
    );
}
