//! hip's XFRM control plane on a kernel with ESP (run inside the VM): BEET SAs and
//! policies installed through `hip_kernel` carry HIT-to-HIT UDP between two namespaces,
//! the wire shows only ESP with the SPIs hip reports, `ip xfrm` shows exactly hip's
//! objects, removal leaves nothing, a SIGKILLed agent's leftovers are reconciled away
//! without touching foreign objects, and a soft expiry leads to a rekey with traffic
//! continuing.
//!
//! Keys come from a KEYMAT the test makes up (the HIP core provides the real one).

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    time::Duration,
};

use hip_kernel::{
    AssociationParams, EspKeyPair, EspTransform, FailClosed, Guard, KernelEvent, KernelIpsec,
    Lifetimes, LocatorPair, Prefix, Reqid, SaParams, Spi, UdpEncap, XfrmNetlink,
    install_association, install_guard, rekey_association, remove_association, remove_guard,
};
use hip_tests::{
    NetNs, VethPair, agent_bin, run_agent, wait_until,
    xfrm::{
        HIT_A, HIT_B, LOC_A, LOC_B, TEST_AUTH_KEY, TEST_ENC_KEY, add_beet_sa, beet_policy,
        events_in, hit_routes_in, runtime, wait_event, xfrm_in, xfrm_list, xfrm_list_len,
    },
};
use tokio::runtime::Runtime;

/// Namespaces a/b, veth va/vb with the locators, and through hip's rtnetlink helpers
/// the HITs as /128 on lo and a route to the peer HIT following the locator's route (the
/// BEET SA then rewrites the outer addresses).
fn topology(tag: &str, rt: &Runtime) -> VethPair {
    let p = VethPair::new(tag, &[&format!("{LOC_A}/64")], &[&format!("{LOC_B}/64")]).unwrap();
    for (ns, hit, peer_hit, peer_loc) in [(&p.a, HIT_A, HIT_B, LOC_B), (&p.b, HIT_B, HIT_A, LOC_A)]
    {
        let r = hit_routes_in(ns, rt);
        let (hit, peer_hit) = (hit.parse().unwrap(), peer_hit.parse().unwrap());
        rt.block_on(r.add_local_hit(hit)).unwrap();
        rt.block_on(r.add_peer_route(peer_hit, hit, peer_loc.parse().unwrap()))
            .unwrap();
    }
    p
}

/// A made-up KEYMAT: both sides derive their key pair from the same octets.
fn keymat(t: EspTransform, seed: u8) -> Vec<u8> {
    (0..2 * t.keymat_len())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One side's association, as the agent would build it from HIP's `Established`.
#[allow(clippy::too_many_arguments)]
fn side(
    t: EspTransform,
    seed: u8,
    local: (&str, &str),
    peer: (&str, &str),
    spi_in: Spi,
    spi_out: Spi,
    lifetimes: Lifetimes,
    fail_closed: FailClosed,
) -> AssociationParams {
    let (lh, ph): (Ipv6Addr, Ipv6Addr) = (local.0.parse().unwrap(), peer.0.parse().unwrap());
    AssociationParams {
        local_hit: lh,
        peer_hit: ph,
        local_locator: local.1.parse().unwrap(),
        peer_locator: peer.1.parse().unwrap(),
        spi_in,
        spi_out,
        keys: EspKeyPair::from_keymat(t, &keymat(t, seed), lh, ph).unwrap(),
        reqid: Reqid::hip(42),
        replay_window: replay_window(t),
        lifetimes,
        fail_closed,
        encap: None,
    }
}

/// The anti-replay window per transform: GCM gets one above the 32-packet bitmap of
/// the SA info (it goes in `XFRMA_REPLAY_ESN_VAL`), the others the classic one.
fn replay_window(t: EspTransform) -> u32 {
    match t {
        EspTransform::AesGcm128Icv16 => 1024,
        _ => 32,
    }
}

/// Allocates inbound SPIs on both sides and builds the two mirrored associations.
fn pair(
    rt: &Runtime,
    ka: &XfrmNetlink,
    kb: &XfrmNetlink,
    t: EspTransform,
    seed: u8,
    lifetimes: Lifetimes,
) -> (AssociationParams, AssociationParams) {
    let (la, lb) = (LOC_A.parse().unwrap(), LOC_B.parse().unwrap());
    let reqid = Reqid::hip(42);
    let spi_a = rt
        .block_on(ka.alloc_spi(LocatorPair { src: lb, dst: la }, reqid))
        .unwrap();
    let spi_b = rt
        .block_on(kb.alloc_spi(LocatorPair { src: la, dst: lb }, reqid))
        .unwrap();
    let fc = FailClosed::PerPeer;
    (
        side(
            t,
            seed,
            (HIT_A, LOC_A),
            (HIT_B, LOC_B),
            spi_a,
            spi_b,
            lifetimes,
            fc,
        ),
        side(
            t,
            seed,
            (HIT_B, LOC_B),
            (HIT_A, LOC_A),
            spi_b,
            spi_a,
            lifetimes,
            fc,
        ),
    )
}

/// An AF_PACKET socket on one interface: sees every frame the interface sends
/// (`PACKET_OUTGOING`) — which is what goes on the wire. Received frames are not used:
/// after BEET decapsulation the kernel re-injects the clear inner packet on the same
/// device, so a receive-side capture shows it although it never crossed the wire.
struct Capture(OwnedFd);

impl Capture {
    fn open(ns: &NetNs, ifname: &str) -> Self {
        let name = std::ffi::CString::new(ifname).unwrap();
        ns.run_in(|| {
            // SAFETY: plain socket calls with valid arguments; the fd is owned at once.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto));
                assert!(fd >= 0, "{}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                assert!(sll.sll_ifindex > 0);
                let r = libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                Capture(fd)
            }
        })
        .unwrap()
    }

    /// IPv6 packets this interface sent since the last call.
    fn sent_ipv6(&self) -> Vec<Vec<u8>> {
        self.sent(libc::ETH_P_IPV6 as u16)
    }

    /// Packets of `ethertype` this interface sent since the last call.
    fn sent(&self, ethertype: u16) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: buffer and address outlive the call; sizes are correct.
            let (n, sll) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                (n, sll)
            };
            if n < 0 {
                break;
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING
                && u16::from_be(sll.sll_protocol) == ethertype
            {
                out.push(buf[..n as usize].to_vec());
            }
        }
        out
    }
}

/// What crossed the wire: SPIs of ESP packets and the number of clear-text UDP packets
/// between the HITs.
#[derive(Debug, Default)]
struct Wire {
    esp_spis: Vec<u32>,
    clear_udp: usize,
}

fn wire(frames: &[Vec<u8>]) -> Wire {
    let mut w = Wire::default();
    let (ha, hb): (Ipv6Addr, Ipv6Addr) = (HIT_A.parse().unwrap(), HIT_B.parse().unwrap());
    for f in frames {
        if f.len() < 48 {
            continue;
        }
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&f[8..24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&f[24..40]).unwrap());
        match f[6] {
            50 => w
                .esp_spis
                .push(u32::from_be_bytes(f[40..44].try_into().unwrap())),
            17 if [src, dst].contains(&ha) || [src, dst].contains(&hb) => w.clear_udp += 1,
            _ => {}
        }
    }
    w
}

/// Sends `n` datagrams HIT a → HIT b and `n` back; asserts they arrive intact.
fn exchange(p: &VethPair, n: usize, tag: &str) {
    let rx_b =
        p.b.run_in(|| UdpSocket::bind(format!("[{HIT_B}]:5004")).unwrap())
            .unwrap();
    let rx_a =
        p.a.run_in(|| UdpSocket::bind(format!("[{HIT_A}]:5006")).unwrap())
            .unwrap();
    for s in [&rx_a, &rx_b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    for (tx_ns, rx, from, to) in [
        (&p.a, &rx_b, HIT_A, format!("[{HIT_B}]:5004")),
        (&p.b, &rx_a, HIT_B, format!("[{HIT_A}]:5006")),
    ] {
        let tx = tx_ns
            .run_in(|| UdpSocket::bind(format!("[{from}]:0")).unwrap())
            .unwrap();
        let mut buf = [0u8; 256];
        for i in 0..n {
            let msg = format!("{tag} datagram {i} from {from}");
            tx.send_to(msg.as_bytes(), &to).unwrap();
            let (len, src) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], msg.as_bytes(), "intact");
            assert_eq!(src.ip().to_string(), from, "inner source is the HIT");
        }
    }
}

fn datapath(t: EspTransform) {
    let rt = runtime();
    let p = topology(&format!("x{}", t.suite_id()), &rt);
    let (ka, kb) = (xfrm_in(&p.a, &rt), xfrm_in(&p.b, &rt));
    let (aa, ab) = pair(&rt, &ka, &kb, t, 7, Lifetimes::UNLIMITED);
    rt.block_on(install_association(&ka, &aa)).unwrap();
    rt.block_on(install_association(&kb, &ab)).unwrap();
    // Idempotent: a second install changes nothing.
    rt.block_on(install_association(&ka, &aa)).unwrap();

    let (cap_a, cap_b) = (Capture::open(&p.a, &p.if_a), Capture::open(&p.b, &p.if_b));
    const N: usize = 10;
    exchange(&p, N, t.name());

    let mut frames = cap_a.sent_ipv6();
    frames.extend(cap_b.sent_ipv6());
    let w = wire(&frames);
    assert_eq!(
        w.clear_udp, 0,
        "no clear-text UDP between the HITs on the wire"
    );
    let seen: BTreeSet<u32> = w.esp_spis.iter().copied().collect();
    // a sends with b's inbound SPI and vice versa: exactly the SPIs hip reported.
    assert_eq!(seen, BTreeSet::from([aa.spi_in, ab.spi_in]), "{w:?}");
    assert!(w.esp_spis.len() >= 2 * N, "{w:?}");

    for (ns, k, a) in [(&p.a, &ka, &aa), (&p.b, &kb, &ab)] {
        // `ip xfrm` shows exactly hip's objects: 2 BEET SAs with HIT selectors, 4 policies.
        let st = xfrm_list(ns, "state");
        assert_eq!(xfrm_list_len(ns, "state"), 2, "{st}");
        assert_eq!(st.matches("mode beet").count(), 2, "{st}");
        assert!(
            st.contains(&format!(
                "sel src {}/128 dst {}/128",
                a.peer_hit, a.local_hit
            )),
            "{st}"
        );
        assert!(st.contains(&format!("spi {:#010x}", a.spi_in)), "{st}");
        assert!(st.contains(&format!("spi {:#010x}", a.spi_out)), "{st}");
        assert_eq!(
            xfrm_list_len(ns, "policy"),
            4,
            "{}",
            xfrm_list(ns, "policy")
        );
        // hip's read-back agrees and counted the packets on the inbound SA.
        let o = rt.block_on(k.list_owned()).unwrap();
        assert_eq!(o.sas.len(), 2);
        assert_eq!(o.policies.len(), 4);
        let inbound = o.sas.iter().find(|s| s.id.spi == a.spi_in).unwrap();
        assert_eq!(inbound.transform, Some(t));
        assert!(inbound.packets >= N as u64, "{inbound:?}");
        // The kernel took the window, in whichever form it needs.
        assert_eq!(inbound.replay_window, replay_window(t), "{inbound:?}");
        let stats =
            String::from_utf8_lossy(&ns.ip(["-s", "xfrm", "state", "list"]).unwrap().stdout)
                .into_owned();
        let shown = match replay_window(t) {
            w if w > 32 => format!("replay_window {w},"),
            w => format!("replay-window {w}"),
        };
        assert!(stats.contains(&shown), "{shown:?} in {stats}");
    }

    rt.block_on(remove_association(&ka, &aa)).unwrap();
    rt.block_on(remove_association(&kb, &ab)).unwrap();
    for ns in [&p.a, &p.b] {
        assert_eq!(xfrm_list_len(ns, "state"), 0, "{}", xfrm_list(ns, "state"));
        assert_eq!(
            xfrm_list_len(ns, "policy"),
            0,
            "{}",
            xfrm_list(ns, "policy")
        );
    }
}

#[test]
fn udp_between_hits_crosses_only_as_esp_aes_cbc_hmac_sha256() {
    datapath(EspTransform::AesCbc128HmacSha256);
}

#[test]
fn udp_between_hits_crosses_only_as_esp_aes_gcm_128() {
    datapath(EspTransform::AesGcm128Icv16);
}

#[test]
fn udp_between_hits_crosses_only_as_esp_null_hmac_sha256() {
    datapath(EspTransform::NullHmacSha256);
}

/// `hip-agent xfrm install --spec FILE` in `ns` (reconcile to the file; no agent stays).
fn install_spec(ns: &NetNs, file: &std::path::Path) -> std::process::Output {
    run_agent([
        "--netns",
        ns.name(),
        "xfrm",
        "install",
        "--spec",
        file.to_str().unwrap(),
    ])
    .unwrap()
}

fn spec(assocs: &[&AssociationParams]) -> String {
    serde_json::json!({ "associations": assocs, "guard": null }).to_string()
}

#[test]
fn sigkill_and_restart_leaves_no_stale_objects_and_spares_foreign_ones() {
    let ns = NetNs::new("xfrmkill").unwrap();
    // Foreign objects: another reqid, default priority.
    add_beet_sa(
        &ns,
        (LOC_A, "2001:db8::77"),
        0x777,
        77,
        (HIT_A, "2001:20::77"),
        (TEST_AUTH_KEY, TEST_ENC_KEY),
    );
    beet_policy(
        &ns,
        "add",
        "out",
        (HIT_A, "2001:20::77"),
        (LOC_A, "2001:db8::77"),
        77,
    );
    let (foreign_sa, foreign_pol) = (xfrm_list(&ns, "state"), xfrm_list(&ns, "policy"));

    let t = EspTransform::AesGcm128Icv16;
    let mk = |i: u32, peer: &'static str| {
        let mut a = side(
            t,
            i as u8,
            (HIT_A, LOC_A),
            (peer, LOC_B),
            0x5000 + 2 * i,
            0x5001 + 2 * i,
            Lifetimes::UNLIMITED,
            FailClosed::PerPeer,
        );
        a.reqid = Reqid::hip(i);
        a
    };
    let (a1, a2) = (mk(1, "2001:20::1"), mk(2, "2001:20::2"));
    let dir = std::env::temp_dir().join(format!("hip-xfrm-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (s12, s1) = (dir.join("both.json"), dir.join("one.json"));
    std::fs::write(&s12, spec(&[&a1, &a2])).unwrap();
    std::fs::write(&s1, spec(&[&a1])).unwrap();

    let mut agent = Command::new(agent_bin())
        .args(["--netns", ns.name(), "xfrm", "install", "--hold", "--spec"])
        .arg(&s12)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(agent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"ready\":true"), "agent said: {line:?}");
    assert_eq!(xfrm_list_len(&ns, "state"), 4 + 1);
    assert_eq!(xfrm_list_len(&ns, "policy"), 8 + 1);
    agent.kill().unwrap(); // SIGKILL: no cleanup runs.
    agent.wait().unwrap();
    assert_eq!(
        xfrm_list_len(&ns, "state"),
        4 + 1,
        "objects outlive the agent"
    );

    // The restarted agent knows only a1 as live: a2's objects are stale.
    let out = install_spec(&ns, &s1);
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["reconcile"]["removed_sas"], 2, "{rep}");
    assert_eq!(rep["reconcile"]["removed_policies"], 4, "{rep}");
    assert_eq!(rep["reconcile"]["kept_sas"], 2, "{rep}");
    assert_eq!(
        xfrm_list_len(&ns, "state"),
        2 + 1,
        "{}",
        xfrm_list(&ns, "state")
    );
    assert_eq!(
        xfrm_list_len(&ns, "policy"),
        4 + 1,
        "{}",
        xfrm_list(&ns, "policy")
    );
    let st = xfrm_list(&ns, "state");
    assert!(st.contains("reqid 77"), "foreign SA kept: {st}");
    assert!(!st.contains("spi 0x00005004"), "a2's SA gone: {st}");

    // The inspection CLI (reading the kernel: no agent runs here) lists exactly a1's
    // objects, with its peer HIT.
    let out = run_agent(["--netns", ns.name(), "xfrm", "--json", "--direct"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let assocs = v["associations"].as_array().unwrap();
    assert_eq!(assocs.len(), 1, "{v}");
    assert_eq!(assocs[0]["peer_hit"], "2001:20::1");
    assert_eq!(assocs[0]["sas"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(assocs[0]["policies"].as_array().unwrap().len(), 4, "{v}");
    let spis: BTreeSet<u64> = assocs[0]["sas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"]["spi"].as_u64().unwrap())
        .collect();
    assert_eq!(spis, BTreeSet::from([0x5002, 0x5003]));

    // Nothing live: everything of hip's goes, the foreign objects stay byte for byte.
    std::fs::write(&s1, spec(&[])).unwrap();
    install_spec(&ns, &s1);
    assert_eq!(xfrm_list(&ns, "state"), foreign_sa);
    assert_eq!(xfrm_list(&ns, "policy"), foreign_pol);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn soft_expiry_leads_to_a_rekey_and_traffic_continues() {
    let rt = runtime();
    let p = topology("xrekey", &rt);
    let (ka, kb) = (xfrm_in(&p.a, &rt), xfrm_in(&p.b, &rt));
    let (mut ev_a, mut ev_b) = (events_in(&p.a, &rt, &ka), events_in(&p.b, &rt, &kb));
    let t = EspTransform::AesCbc128HmacSha256;
    let short = Lifetimes {
        soft_secs: 2,
        hard_secs: 60,
        ..Lifetimes::UNLIMITED
    };
    let (aa, ab) = pair(&rt, &ka, &kb, t, 1, short);
    rt.block_on(install_association(&ka, &aa)).unwrap();
    rt.block_on(install_association(&kb, &ab)).unwrap();
    exchange(&p, 3, "before");

    // The kernel reports the soft expiry of hip's SAs: the HIP layer's cue to rekey.
    for (ev, a) in [(&mut ev_a, &aa), (&mut ev_b, &ab)] {
        let e = wait_event(&rt, ev, Duration::from_secs(30), "soft expire", |e| {
            matches!(e, KernelEvent::Expire { hard: false, .. })
        });
        assert!(e.is_owned(), "{e:?}");
        let KernelEvent::Expire { sa, reqid, .. } = e else {
            unreachable!()
        };
        assert_eq!(reqid, a.reqid);
        assert!([a.spi_in, a.spi_out].contains(&sa.spi), "{sa:?}");
    }

    // Rekey (what HIP UPDATE with new ESP_INFO does): new SPIs, new KEYMAT.
    let (na, nb) = pair(&rt, &ka, &kb, t, 99, Lifetimes::UNLIMITED);
    assert_ne!(na.keys, aa.keys);
    rt.block_on(rekey_association(&ka, &aa, &na)).unwrap();
    rt.block_on(rekey_association(&kb, &ab, &nb)).unwrap();
    // The old SAs' deletion is reported.
    let e = wait_event(
        &rt,
        &mut ev_a,
        Duration::from_secs(30),
        "SA deletion",
        |e| matches!(e, KernelEvent::SaDeleted { sa, .. } if sa.spi == aa.spi_in),
    );
    assert!(e.is_owned(), "{e:?}");

    let (cap_a, cap_b) = (Capture::open(&p.a, &p.if_a), Capture::open(&p.b, &p.if_b));
    exchange(&p, 5, "after");
    let mut frames = cap_a.sent_ipv6();
    frames.extend(cap_b.sent_ipv6());
    let w = wire(&frames);
    assert_eq!(w.clear_udp, 0);
    let seen: BTreeSet<u32> = w.esp_spis.iter().copied().collect();
    assert_eq!(
        seen,
        BTreeSet::from([na.spi_in, nb.spi_in]),
        "new SPIs only: {w:?}"
    );
    for (ns, a) in [(&p.a, &na), (&p.b, &nb)] {
        let st = xfrm_list(ns, "state");
        assert_eq!(xfrm_list_len(ns, "state"), 2, "{st}");
        assert!(st.contains(&format!("spi {:#010x}", a.spi_in)), "{st}");
    }
}

#[test]
fn hard_expiry_is_reported_and_the_sa_is_gone() {
    let ns = NetNs::new("xhard").unwrap();
    let rt = runtime();
    let k = xfrm_in(&ns, &rt);
    let mut ev = events_in(&ns, &rt, &k);
    let t = EspTransform::NullHmacSha256;
    let a = side(
        t,
        3,
        (HIT_A, LOC_A),
        (HIT_B, LOC_B),
        0x6000,
        0x6001,
        Lifetimes {
            soft_secs: 1,
            hard_secs: 2,
            ..Lifetimes::UNLIMITED
        },
        FailClosed::PerPeer,
    );
    let sa: SaParams = a.sa_out();
    rt.block_on(k.add_sa(&sa)).unwrap();
    assert_eq!(xfrm_list_len(&ns, "state"), 1);
    let e = wait_event(&rt, &mut ev, Duration::from_secs(30), "hard expire", |e| {
        matches!(e, KernelEvent::Expire { hard: true, .. })
    });
    assert_eq!(
        e,
        KernelEvent::Expire {
            sa: sa.id(),
            hits: sa.hits,
            reqid: sa.reqid,
            hard: true
        }
    );
    wait_until(Duration::from_secs(10), "SA removed by the kernel", || {
        (xfrm_list_len(&ns, "state") == 0).then_some(())
    })
    .unwrap();
}

#[test]
fn sa_upserts_replace_hips_keys_and_refuse_foreign_sas() {
    let ns = NetNs::new("xupsert").unwrap();
    let rt = runtime();
    let k = xfrm_in(&ns, &rt);
    let t = EspTransform::AesCbc128HmacSha256;
    let mk = |seed| {
        side(
            t,
            seed,
            (HIT_A, LOC_A),
            (HIT_B, LOC_B),
            0x7000,
            0x7001,
            Lifetimes::UNLIMITED,
            FailClosed::PerPeer,
        )
        .sa_out()
    };
    let (v1, v2) = (mk(1), mk(2));
    let key_hex = |s: &SaParams| {
        s.keys
            .enc()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    rt.block_on(k.add_sa(&v1)).unwrap();
    assert!(xfrm_list(&ns, "state").contains(&key_hex(&v1)));
    // Same SPI, other keys: hip's own SA is replaced (the kernel's UPDSA keeps keys).
    rt.block_on(k.add_sa(&v2)).unwrap();
    let st = xfrm_list(&ns, "state");
    assert_eq!(xfrm_list_len(&ns, "state"), 1, "{st}");
    assert!(st.contains(&key_hex(&v2)), "{st}");
    assert!(!st.contains(&key_hex(&v1)), "{st}");
    rt.block_on(k.del_sa(&v2.id())).unwrap();

    // A foreign SA in the same slot is never changed or deleted.
    add_beet_sa(
        &ns,
        (LOC_A, LOC_B),
        0x7001,
        77,
        (HIT_A, HIT_B),
        (TEST_AUTH_KEY, TEST_ENC_KEY),
    );
    let foreign = xfrm_list(&ns, "state");
    let e = rt.block_on(k.add_sa(&v1)).unwrap_err();
    assert!(
        matches!(e, hip_kernel::XfrmError::ForeignConflict { .. }),
        "{e:?}"
    );
    let e = rt.block_on(k.del_sa(&v1.id())).unwrap_err();
    assert!(
        matches!(e, hip_kernel::XfrmError::ForeignConflict { .. }),
        "{e:?}"
    );
    // And an association whose outbound SA hits it is rolled back completely.
    let a = side(
        t,
        1,
        (HIT_A, LOC_A),
        (HIT_B, LOC_B),
        0x7002,
        0x7001,
        Lifetimes::UNLIMITED,
        FailClosed::PerPeer,
    );
    let e = rt.block_on(install_association(&k, &a)).unwrap_err();
    assert!(
        matches!(e, hip_kernel::XfrmError::ForeignConflict { .. }),
        "{e:?}"
    );
    assert_eq!(xfrm_list(&ns, "state"), foreign);
    assert_eq!(
        xfrm_list_len(&ns, "policy"),
        0,
        "{}",
        xfrm_list(&ns, "policy")
    );
}

#[test]
fn prefix_guard_blocks_until_the_association_is_up_and_after_it_is_gone() {
    let rt = runtime();
    let p = topology("xguard", &rt);
    let (ka, kb) = (xfrm_in(&p.a, &rt), xfrm_in(&p.b, &rt));
    for (k, hit) in [(&ka, HIT_A), (&kb, HIT_B)] {
        let g = Guard {
            prefix: Prefix::ORCHID_V2,
            local_hits: vec![hit.parse().unwrap()],
        };
        rt.block_on(install_guard(k, &g)).unwrap();
    }
    let tx =
        p.a.run_in(|| UdpSocket::bind(format!("[{HIT_A}]:0")).unwrap())
            .unwrap();
    // No association yet: traffic to the peer HIT is refused, not sent in clear text.
    let e = tx
        .send_to(b"too early", format!("[{HIT_B}]:5004"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // The host's own HIT stays usable.
    let me =
        p.a.run_in(|| UdpSocket::bind(format!("[{HIT_A}]:5008")).unwrap())
            .unwrap();
    me.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tx.send_to(b"to myself", format!("[{HIT_A}]:5008")).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = me.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"to myself");

    let t = EspTransform::AesGcm128Icv16;
    let (mut aa, mut ab) = pair(&rt, &ka, &kb, t, 5, Lifetimes::UNLIMITED);
    aa.fail_closed = FailClosed::Guard;
    ab.fail_closed = FailClosed::Guard;
    rt.block_on(install_association(&ka, &aa)).unwrap();
    rt.block_on(install_association(&kb, &ab)).unwrap();
    for ns in [&p.a, &p.b] {
        // 2 SAs; 2 IPsec policies + 2 guard blocks + 2 local-HIT allows.
        assert_eq!(xfrm_list_len(ns, "state"), 2, "{}", xfrm_list(ns, "state"));
        assert_eq!(
            xfrm_list_len(ns, "policy"),
            6,
            "{}",
            xfrm_list(ns, "policy")
        );
    }
    let (cap_a, cap_b) = (Capture::open(&p.a, &p.if_a), Capture::open(&p.b, &p.if_b));
    exchange(&p, 5, "guarded");
    let mut frames = cap_a.sent_ipv6();
    frames.extend(cap_b.sent_ipv6());
    let w = wire(&frames);
    assert_eq!(w.clear_udp, 0);
    assert_eq!(
        w.esp_spis.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([aa.spi_in, ab.spi_in])
    );

    rt.block_on(remove_association(&ka, &aa)).unwrap();
    rt.block_on(remove_association(&kb, &ab)).unwrap();
    let e = tx
        .send_to(b"too late", format!("[{HIT_B}]:5004"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    for (ns, k, hit) in [(&p.a, &ka, HIT_A), (&p.b, &kb, HIT_B)] {
        assert_eq!(xfrm_list_len(ns, "state"), 0);
        assert_eq!(xfrm_list_len(ns, "policy"), 4, "only the guard is left");
        let g = Guard {
            prefix: Prefix::ORCHID_V2,
            local_hits: vec![hit.parse().unwrap()],
        };
        rt.block_on(remove_guard(k, &g)).unwrap();
        assert_eq!(xfrm_list_len(ns, "policy"), 0);
    }
}

/// Host A's IPv4 locator for the UDP-encapsulation test (RFC 5737 documentation range).
const LOC4_A: &str = "192.0.2.1";
/// Host B's IPv4 locator.
const LOC4_B: &str = "192.0.2.2";
/// `UDP_ENCAP_ESPINUDP` (include/uapi/linux/udp.h; not in the libc crate).
const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// A UDP socket on `port` in `ns` with `UDP_ENCAP` = `UDP_ENCAP_ESPINUDP`: the kernel
/// decapsulates the ESP-in-UDP packets that arrive there (without one it answers port
/// unreachable). Sending needs none.
fn encap_socket(ns: &NetNs, port: u16) -> UdpSocket {
    ns.run_in(|| {
        let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
        let v = UDP_ENCAP_ESPINUDP;
        // SAFETY: setsockopt on a socket we own with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_UDP,
                libc::UDP_ENCAP,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        s
    })
    .unwrap()
}

/// What crossed the wire over IPv4: (UDP source port, destination port, SPI) of each
/// ESP-in-UDP packet, and the SPIs of plain ESP packets.
#[derive(Debug, Default)]
struct Wire4 {
    udp_esp: Vec<(u16, u16, u32)>,
    esp: Vec<u32>,
}

fn wire4(frames: &[Vec<u8>]) -> Wire4 {
    let mut w = Wire4::default();
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    for f in frames {
        if f.len() < 20 {
            continue;
        }
        let ihl = usize::from(f[0] & 0xf) * 4;
        match f[9] {
            // An SPI of 0 is the non-ESP marker of HIP control packets (RFC 9028 §4.1).
            17 if f.len() >= ihl + 12 && be32(&f[ihl + 8..]) != 0 => {
                w.udp_esp
                    .push((be16(&f[ihl..]), be16(&f[ihl + 2..]), be32(&f[ihl + 8..])))
            }
            50 if f.len() >= ihl + 4 => w.esp.push(be32(&f[ihl..])),
            _ => {}
        }
    }
    w
}

/// The SA with `spi` as hip reads it back.
fn owned_sa(rt: &Runtime, k: &XfrmNetlink, spi: Spi) -> hip_kernel::SaEntry {
    let o = rt.block_on(k.list_owned()).unwrap();
    o.sas
        .into_iter()
        .find(|s| s.id.spi == spi)
        .unwrap_or_else(|| panic!("no SA with spi {spi:#x}"))
}

/// Moves both SAs of `from` to `to`'s parameters (same SPIs and keys).
fn move_both(rt: &Runtime, k: &XfrmNetlink, from: &AssociationParams, to: &AssociationParams) {
    rt.block_on(async {
        k.move_sa(&from.sa_out().id(), &to.sa_out()).await?;
        k.move_sa(&from.sa_in().id(), &to.sa_in()).await
    })
    .unwrap();
}

#[test]
fn udp_encapsulated_sas_over_ipv4_carry_traffic_move_ports_and_report_mappings() {
    let rt = runtime();
    let p = VethPair::new(
        "xencap",
        &[&format!("{LOC4_A}/24")],
        &[&format!("{LOC4_B}/24")],
    )
    .unwrap();
    // HIT inner, IPv4 outer: the peer HIT still needs its /128 route over the device.
    for (ns, hit, peer_hit, peer_loc) in
        [(&p.a, HIT_A, HIT_B, LOC4_B), (&p.b, HIT_B, HIT_A, LOC4_A)]
    {
        let r = hit_routes_in(ns, &rt);
        let (hit, peer_hit) = (hit.parse().unwrap(), peer_hit.parse().unwrap());
        rt.block_on(r.add_local_hit(hit)).unwrap();
        rt.block_on(r.add_peer_route(peer_hit, hit, peer_loc.parse().unwrap()))
            .unwrap();
    }
    let (ka, kb) = (xfrm_in(&p.a, &rt), xfrm_in(&p.b, &rt));
    let mut ev_a = events_in(&p.a, &rt, &ka);
    let t = EspTransform::AesGcm128Icv16;
    let port = UdpEncap::HIP_NAT_PORT;
    let (la, lb): (IpAddr, IpAddr) = (LOC4_A.parse().unwrap(), LOC4_B.parse().unwrap());
    let reqid = Reqid::hip(42);
    let spi_a = rt
        .block_on(ka.alloc_spi(LocatorPair { src: lb, dst: la }, reqid))
        .unwrap();
    let spi_b = rt
        .block_on(kb.alloc_spi(LocatorPair { src: la, dst: lb }, reqid))
        .unwrap();
    let mk = |local, peer, spi_in, spi_out, peer_port| AssociationParams {
        encap: Some(UdpEncap {
            sport: port,
            dport: peer_port,
        }),
        ..side(
            t,
            11,
            local,
            peer,
            spi_in,
            spi_out,
            Lifetimes::UNLIMITED,
            FailClosed::PerPeer,
        )
    };
    let aa = mk((HIT_A, LOC4_A), (HIT_B, LOC4_B), spi_a, spi_b, port);
    let ab = mk((HIT_B, LOC4_B), (HIT_A, LOC4_A), spi_b, spi_a, port);
    // Each side's encapsulation socket (the HIP driver's, in the agent), and one more on
    // b for after a's move to b's "new" port.
    let _sockets = [
        encap_socket(&p.a, port),
        encap_socket(&p.b, port),
        encap_socket(&p.b, 40000),
    ];
    // The larval SAs from ALLOCSPI become encapsulated ones.
    rt.block_on(install_association(&ka, &aa)).unwrap();
    rt.block_on(install_association(&kb, &ab)).unwrap();
    rt.block_on(install_association(&ka, &aa)).unwrap();

    let (cap_a, cap_b) = (Capture::open(&p.a, &p.if_a), Capture::open(&p.b, &p.if_b));
    const N: usize = 5;
    exchange(&p, N, "espinudp");
    let ipv4 = libc::ETH_P_IP as u16;
    let (fa, fb) = (cap_a.sent(ipv4), cap_b.sent(ipv4));
    let mut w = wire4(&fa);
    w.udp_esp.extend(wire4(&fb).udp_esp);
    assert!(w.esp.is_empty(), "no plain ESP: {w:?}");
    assert!(w.udp_esp.len() >= 2 * N, "{w:?}");
    let seen: BTreeSet<(u16, u16, u32)> = w.udp_esp.iter().copied().collect();
    assert_eq!(
        seen,
        BTreeSet::from([(port, port, ab.spi_in), (port, port, aa.spi_in)]),
        "ESP in UDP 10500 → 10500 with the SPIs hip reported"
    );
    let mut v6 = cap_a.sent_ipv6();
    v6.extend(cap_b.sent_ipv6());
    assert_eq!(wire(&v6).clear_udp, 0, "no clear-text HIT traffic");

    for (ns, k, a) in [(&p.a, &ka, &aa), (&p.b, &kb, &ab)] {
        let st = xfrm_list(ns, "state");
        assert_eq!(xfrm_list_len(ns, "state"), 2, "{st}");
        assert_eq!(
            st.matches("encap type espinudp sport 10500 dport 10500")
                .count(),
            2,
            "{st}"
        );
        for sa in [a.sa_out(), a.sa_in()] {
            let e = owned_sa(&rt, k, sa.spi);
            assert_eq!(
                e.encap,
                Some(UdpEncap {
                    sport: port,
                    dport: port
                }),
                "{e:?}"
            );
            assert_eq!(e.other_encap_type, None);
            assert_eq!(e.src, sa.locators.src);
        }
    }
    let sent = owned_sa(&rt, &ka, aa.spi_out).seq_out;
    assert!(sent >= N as u32, "{sent}");

    // UPDSA cannot drop the encapsulation (the kernel says EINVAL); nothing changes.
    let before = xfrm_list(&p.a, "state");
    let plain_out = SaParams {
        encap: None,
        ..aa.sa_out()
    };
    let e = rt.block_on(ka.update_sa(&plain_out)).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert_eq!(xfrm_list(&p.a, "state"), before);

    // a learns another port for b (40000): both SAs move in place, the inbound one with
    // the ports swapped; the outbound one goes on counting.
    let a2 = AssociationParams {
        encap: Some(UdpEncap {
            sport: port,
            dport: 40000,
        }),
        ..aa.clone()
    };
    move_both(&rt, &ka, &aa, &a2);
    let st = xfrm_list(&p.a, "state");
    assert_eq!(xfrm_list_len(&p.a, "state"), 2, "{st}");
    assert!(
        st.contains("encap type espinudp sport 10500 dport 40000"),
        "{st}"
    );
    assert!(
        st.contains("encap type espinudp sport 40000 dport 10500"),
        "{st}"
    );
    let out = owned_sa(&rt, &ka, aa.spi_out);
    assert_eq!(out.encap, a2.encap, "{out:?}");
    assert_eq!(out.seq_out, sent, "sequence numbers kept: {out:?}");
    let inb = owned_sa(&rt, &ka, aa.spi_in);
    assert_eq!(inb.encap, a2.encap.map(UdpEncap::reversed), "{inb:?}");

    // Traffic follows: a sends to b's port 40000. b still sends from 10500, which a's
    // inbound SA does not expect now: the kernel takes the packets and reports a mapping.
    exchange(&p, 3, "moved");
    let w = wire4(&cap_a.sent(ipv4));
    assert!(
        w.udp_esp
            .iter()
            .all(|&(s, d, spi)| (s, d, spi) == (port, 40000, aa.spi_out)),
        "{w:?}"
    );
    assert!(!w.udp_esp.is_empty(), "{w:?}");
    assert!(owned_sa(&rt, &ka, aa.spi_out).seq_out >= sent + 3);
    let earlier = std::cell::RefCell::new(Vec::new());
    let m = wait_event(&rt, &mut ev_a, Duration::from_secs(10), "mapping", |e| {
        earlier.borrow_mut().push(e.clone());
        matches!(e, KernelEvent::Mapping { .. })
    });
    // The port move was an update in place (UPDSA), not a deletion and a new SA.
    assert!(
        !earlier
            .borrow()
            .iter()
            .any(|e| matches!(e, KernelEvent::SaDeleted { .. })),
        "{earlier:?}"
    );
    assert!(m.is_owned(), "{m:?}");
    assert_eq!(
        m,
        KernelEvent::Mapping {
            sa: a2.sa_in().id(),
            reqid,
            old: SocketAddr::new(lb, 40000),
            new: SocketAddr::new(lb, port),
        }
    );

    // Back to plain ESP on both sides: deleted and re-added (UPDSA cannot remove
    // encapsulation), sequence numbers carried over.
    let sent = owned_sa(&rt, &ka, aa.spi_out).seq_out;
    let (a3, b3) = (
        AssociationParams {
            encap: None,
            ..aa.clone()
        },
        AssociationParams {
            encap: None,
            ..ab.clone()
        },
    );
    move_both(&rt, &ka, &a2, &a3);
    move_both(&rt, &kb, &ab, &b3);
    wait_event(
        &rt,
        &mut ev_a,
        Duration::from_secs(10),
        "re-add",
        |e| matches!(e, KernelEvent::SaDeleted { sa, .. } if sa.spi == aa.spi_out),
    );
    for (ns, k, a) in [(&p.a, &ka, &a3), (&p.b, &kb, &b3)] {
        let st = xfrm_list(ns, "state");
        assert_eq!(xfrm_list_len(ns, "state"), 2, "{st}");
        assert!(!st.contains("encap"), "{st}");
        for sa in [a.sa_out(), a.sa_in()] {
            assert_eq!(owned_sa(&rt, k, sa.spi).encap, None);
        }
    }
    assert_eq!(owned_sa(&rt, &ka, aa.spi_out).seq_out, sent, "carried over");
    exchange(&p, 3, "plain");
    let mut w = wire4(&cap_a.sent(ipv4));
    w.esp.extend(wire4(&cap_b.sent(ipv4)).esp);
    assert!(w.udp_esp.is_empty(), "{w:?}");
    assert_eq!(
        w.esp.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([aa.spi_in, ab.spi_in]),
        "{w:?}"
    );
    assert!(owned_sa(&rt, &ka, aa.spi_out).seq_out >= sent + 3);

    rt.block_on(remove_association(&ka, &a3)).unwrap();
    rt.block_on(remove_association(&kb, &b3)).unwrap();
    for ns in [&p.a, &p.b] {
        assert_eq!(xfrm_list_len(ns, "state"), 0, "{}", xfrm_list(ns, "state"));
        assert_eq!(
            xfrm_list_len(ns, "policy"),
            0,
            "{}",
            xfrm_list(ns, "policy")
        );
    }
}
