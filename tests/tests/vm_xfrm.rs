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
    net::{Ipv6Addr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    time::Duration,
};

use hip_kernel::{
    AssociationParams, EspKeyPair, EspTransform, FailClosed, Guard, KernelEvent, KernelIpsec,
    Lifetimes, LocatorPair, Prefix, Reqid, SaParams, Spi, XfrmNetlink, install_association,
    install_guard, rekey_association, remove_association, remove_guard,
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
                && u16::from_be(sll.sll_protocol) == libc::ETH_P_IPV6 as u16
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
