//! hip's XFRM control plane on the host kernel, which has XFRM policies and ALLOCSPI but
//! no ESP: policies and SPIs work through hip's netlink code, SA installation fails with
//! a clear "no ESP support" error and leaves nothing behind, the fail-closed block
//! policies stop clear-text HIT traffic, and reconciliation never touches foreign
//! objects. Each test runs in namespaces of its own.

use std::{net::UdpSocket, time::Duration};

use hip_kernel::{
    AssociationParams, EspKeyPair, EspKeys, EspTransform, FailClosed, Guard, KernelEvent,
    KernelIpsec, Lifetimes, LocatorPair, PolicyAction, Prefix, Reqid, XfrmError,
    install_association, install_guard, owner, reconcile, remove_guard,
};
use hip_tests::{
    NetNs, VethPair,
    xfrm::{
        HIT_A, HIT_B, LOC_A, LOC_B, add_hit_and_route_with_ip, beet_policy, events_in,
        hit_routes_in, runtime, wait_event, xfrm_in, xfrm_list, xfrm_list_len,
    },
};

fn assoc(spi_in: u32, fail_closed: FailClosed) -> AssociationParams {
    let t = EspTransform::AesCbc128HmacSha256;
    let keymat: Vec<u8> = (0..2 * t.keymat_len()).map(|i| i as u8).collect();
    AssociationParams {
        local_hit: HIT_A.parse().unwrap(),
        peer_hit: HIT_B.parse().unwrap(),
        local_locator: LOC_A.parse().unwrap(),
        peer_locator: LOC_B.parse().unwrap(),
        spi_in,
        spi_out: 0x4242,
        keys: EspKeyPair::from_keymat(t, &keymat, HIT_A.parse().unwrap(), HIT_B.parse().unwrap())
            .unwrap(),
        reqid: Reqid::hip(1),
        replay_window: 32,
        lifetimes: Lifetimes::UNLIMITED,
        fail_closed,
        encap: None,
    }
}

#[test]
fn allocspi_works_and_sa_install_fails_cleanly_without_esp() {
    let ns = NetNs::new("xfrmnoesp").unwrap();
    let rt = runtime();
    let k = xfrm_in(&ns, &rt);
    let a = assoc(0, FailClosed::PerPeer);
    let locs_in = LocatorPair {
        src: a.peer_locator,
        dst: a.local_locator,
    };
    let spi = rt.block_on(k.alloc_spi(locs_in, a.reqid)).unwrap();
    assert!(spi >= 0x100, "SPI {spi:#x} in the unreserved range");
    // The larval SA is there, with hip's reqid, and `ip` sees it too.
    let owned = rt.block_on(k.list_owned()).unwrap();
    assert_eq!(owned.sas.len(), 1, "{owned:?}");
    assert_eq!(owned.sas[0].id.spi, spi);
    assert_eq!(owned.sas[0].reqid, a.reqid);
    assert!(xfrm_list(&ns, "state").contains(&format!("spi {spi:#010x}")));

    let a = AssociationParams { spi_in: spi, ..a };
    let err = rt.block_on(install_association(&k, &a)).unwrap_err();
    assert!(matches!(err, XfrmError::NoEspSupport { .. }), "{err:?}");
    assert!(
        err.to_string().contains("kernel has no ESP support"),
        "{err}"
    );
    // Rolled back: the block policies installed first and the larval SA are gone.
    assert_eq!(
        xfrm_list_len(&ns, "state"),
        0,
        "{}",
        xfrm_list(&ns, "state")
    );
    assert_eq!(
        xfrm_list_len(&ns, "policy"),
        0,
        "{}",
        xfrm_list(&ns, "policy")
    );
    let owned = rt.block_on(k.list_owned()).unwrap();
    assert!(
        owned.sas.is_empty() && owned.policies.is_empty(),
        "{owned:?}"
    );
}

#[test]
fn policies_are_upserts_and_read_back_like_ip_shows_them() {
    let ns = NetNs::new("xfrmpol").unwrap();
    let rt = runtime();
    let k = xfrm_in(&ns, &rt);
    let a = assoc(0x1000, FailClosed::PerPeer);
    for _ in 0..2 {
        for p in a.policies() {
            rt.block_on(k.add_policy(&p)).unwrap();
        }
    }
    assert_eq!(
        xfrm_list_len(&ns, "policy"),
        4,
        "{}",
        xfrm_list(&ns, "policy")
    );
    let text = xfrm_list(&ns, "policy");
    assert!(
        text.contains("src 2001:20::a/128 dst 2001:20::b/128 \n\tdir out priority 1212747776"),
        "{text}"
    );
    assert!(
        text.contains("proto esp reqid 1212743681 mode beet"),
        "{text}"
    );
    assert!(text.contains("action block"), "{text}");
    let owned = rt.block_on(k.list_owned()).unwrap();
    let mut got: Vec<_> = owned.policies.iter().map(|p| p.params).collect();
    let mut want = a.policies();
    got.sort_by_key(|p| format!("{p:?}"));
    want.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(got, want);

    // An upsert with another template replaces in place.
    let mut moved = a.ipsec_policies()[0];
    if let PolicyAction::Ipsec { locators, .. } = &mut moved.action {
        locators.dst = "2001:db8::99".parse().unwrap();
    }
    rt.block_on(k.add_policy(&moved)).unwrap();
    assert_eq!(xfrm_list_len(&ns, "policy"), 4);
    assert!(xfrm_list(&ns, "policy").contains("dst 2001:db8::99"));

    for p in a.policies() {
        assert!(rt.block_on(k.del_policy(&p.id)).unwrap(), "deleted");
        assert!(!rt.block_on(k.del_policy(&p.id)).unwrap(), "already gone");
    }
    assert_eq!(xfrm_list_len(&ns, "policy"), 0);
}

#[test]
fn block_policies_keep_hit_traffic_from_leaving_in_clear_text() {
    let p = VethPair::new("xfrmblk", &["2001:db8::1/64"], &["2001:db8::2/64"]).unwrap();
    for (ns, ifc, hit, peer_hit, peer_loc) in [
        (&p.a, &p.if_a, HIT_A, HIT_B, LOC_B),
        (&p.b, &p.if_b, HIT_B, HIT_A, LOC_A),
    ] {
        add_hit_and_route_with_ip(ns, ifc, hit, peer_hit, peer_loc);
    }
    let rx =
        p.b.run_in(|| UdpSocket::bind(format!("[{HIT_B}]:5004")).unwrap())
            .unwrap();
    rx.set_nonblocking(true).unwrap();
    let tx =
        p.a.run_in(|| UdpSocket::bind(format!("[{HIT_A}]:0")).unwrap())
            .unwrap();
    let dst = format!("[{HIT_B}]:5004");
    // Without any policy, clear text flows (this is what the block must prevent).
    tx.send_to(b"clear", &dst).unwrap();
    let mut buf = [0u8; 64];
    let n = hip_tests::wait_until(Duration::from_secs(5), "clear-text datagram", || {
        rx.recv_from(&mut buf).ok().map(|(n, _)| n)
    })
    .unwrap();
    assert_eq!(&buf[..n], b"clear");

    let rt = runtime();
    let k = xfrm_in(&p.a, &rt);
    let mut ev = events_in(&p.a, &rt, &k);
    let a = assoc(0x1000, FailClosed::PerPeer);
    for b in a.block_policies() {
        rt.block_on(k.add_policy(&b)).unwrap();
    }
    let e = tx.send_to(b"blocked", &dst).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");

    // IPsec policies without SAs: packets are held back and the kernel asks for SAs.
    for pol in a.ipsec_policies() {
        rt.block_on(k.add_policy(&pol)).unwrap();
    }
    let _ = tx.send_to(b"needs-sa", &dst);
    let acquire = wait_event(&rt, &mut ev, Duration::from_secs(10), "ACQUIRE", |e| {
        matches!(e, KernelEvent::Acquire { .. })
    });
    assert!(acquire.is_owned(), "{acquire:?}");
    let KernelEvent::Acquire { hits, reqid, .. } = acquire else {
        unreachable!()
    };
    assert_eq!(hits.dst, HIT_B.parse::<std::net::Ipv6Addr>().unwrap());
    assert_eq!(reqid, a.reqid);
    // Nothing arrived in clear text in b.
    assert!(rx.recv_from(&mut buf).is_err(), "no datagram leaked");

    // Deleting a policy is reported on the monitor socket.
    let out_policy = a.ipsec_policies()[0].id;
    rt.block_on(k.del_policy(&out_policy)).unwrap();
    let del = wait_event(&rt, &mut ev, Duration::from_secs(10), "DELPOLICY", |e| {
        matches!(e, KernelEvent::PolicyDeleted { .. })
    });
    assert_eq!(
        del,
        KernelEvent::PolicyDeleted {
            id: out_policy,
            priority: Some(owner::PRIORITY_IPSEC)
        }
    );
}

#[test]
fn reconcile_removes_only_hips_stale_objects() {
    let ns = NetNs::new("xfrmrec").unwrap();
    // Foreign objects, added by hand with another reqid and the default priority.
    beet_policy(&ns, "add", "out", (HIT_A, "2001:20::c"), (LOC_A, LOC_B), 77);
    ns.ip([
        "xfrm",
        "policy",
        "add",
        "src",
        "::/0",
        "dst",
        "2001:20::d/128",
        "dir",
        "out",
        "action",
        "block",
    ])
    .unwrap();
    ns.ip([
        "xfrm", "state", "allocspi", "src", LOC_B, "dst", LOC_A, "proto", "esp", "reqid", "77",
        "mode", "beet",
    ])
    .unwrap();
    let foreign_state = xfrm_list(&ns, "state");
    let foreign_policy = xfrm_list(&ns, "policy");

    let rt = runtime();
    let k = xfrm_in(&ns, &rt);
    // hip's objects of an association that no longer exists (as after SIGKILL), the
    // guard, and a larval SA of hip's.
    let stale = assoc(0x1000, FailClosed::PerPeer);
    for p in stale.policies() {
        rt.block_on(k.add_policy(&p)).unwrap();
    }
    let guard = Guard {
        prefix: Prefix::ORCHID_V2,
        local_hits: vec![HIT_A.parse().unwrap()],
    };
    rt.block_on(install_guard(&k, &guard)).unwrap();
    rt.block_on(k.alloc_spi(
        LocatorPair {
            src: stale.peer_locator,
            dst: stale.local_locator,
        },
        Reqid::hip(9),
    ))
    .unwrap();
    assert_eq!(xfrm_list_len(&ns, "state"), 2);
    assert_eq!(xfrm_list_len(&ns, "policy"), 2 + 4 + 4);

    // A foreign selector is never overwritten or deleted by hip.
    let mut clash = stale.ipsec_policies()[0];
    clash.id.dst = Prefix::host("2001:20::c".parse().unwrap());
    let e = rt.block_on(k.add_policy(&clash)).unwrap_err();
    assert!(matches!(e, XfrmError::ForeignConflict { .. }), "{e:?}");
    let e = rt.block_on(k.del_policy(&clash.id)).unwrap_err();
    assert!(matches!(e, XfrmError::ForeignConflict { .. }), "{e:?}");

    // Restart with the guard still wanted and no live association.
    let rep = rt.block_on(reconcile(&k, &[], Some(&guard))).unwrap();
    assert_eq!(rep.removed_policies, 4, "{rep:?}");
    assert_eq!(rep.removed_sas, 1, "{rep:?}");
    assert_eq!(rep.kept_policies, 4, "{rep:?}");
    assert_eq!(xfrm_list_len(&ns, "state"), 1);
    assert_eq!(xfrm_list_len(&ns, "policy"), 2 + 4);
    // Running it again changes nothing.
    let rep = rt.block_on(reconcile(&k, &[], Some(&guard))).unwrap();
    assert_eq!((rep.removed_policies, rep.removed_sas), (0, 0));

    rt.block_on(remove_guard(&k, &guard)).unwrap();
    assert_eq!(xfrm_list(&ns, "state"), foreign_state);
    assert_eq!(xfrm_list(&ns, "policy"), foreign_policy);
    let owned = rt.block_on(k.list_owned()).unwrap();
    assert!(
        owned.sas.is_empty() && owned.policies.is_empty(),
        "{owned:?}"
    );
}

#[test]
fn bad_parameters_change_nothing() {
    let ns = NetNs::new("xfrmbad").unwrap();
    let rt = runtime();
    let k = xfrm_in(&ns, &rt);
    let mut a = assoc(0x1000, FailClosed::PerPeer);
    a.reqid = Reqid(77);
    let e = rt.block_on(install_association(&k, &a)).unwrap_err();
    assert!(matches!(e, XfrmError::InvalidParam(_)), "{e:?}");
    let mut a = assoc(0x1000, FailClosed::PerPeer);
    a.keys.inbound = EspKeys::new(EspTransform::NullHmacSha256, &[], &[1; 32]).unwrap();
    let e = rt.block_on(install_association(&k, &a)).unwrap_err();
    assert!(matches!(e, XfrmError::InvalidParam(_)), "{e:?}");
    assert_eq!(xfrm_list_len(&ns, "state"), 0);
    assert_eq!(xfrm_list_len(&ns, "policy"), 0);
}

#[test]
fn hit_addresses_and_routes_are_set_through_rtnetlink() {
    let p = VethPair::new("xfrmrt", &["2001:db8::1/64"], &["2001:db8::2/64"]).unwrap();
    let rt = runtime();
    let r = hit_routes_in(&p.a, &rt);
    let (ha, hb) = (HIT_A.parse().unwrap(), HIT_B.parse().unwrap());
    for _ in 0..2 {
        rt.block_on(r.add_local_hit(ha)).unwrap();
        rt.block_on(r.add_peer_route(hb, ha, LOC_B.parse().unwrap()))
            .unwrap();
    }
    let addrs =
        String::from_utf8_lossy(&p.a.ip(["-6", "addr", "show", "dev", "lo"]).unwrap().stdout)
            .into_owned();
    assert!(addrs.contains("inet6 2001:20::a/128"), "{addrs}");
    let routes = String::from_utf8_lossy(&p.a.ip(["-6", "route", "show", HIT_B]).unwrap().stdout)
        .into_owned();
    assert_eq!(routes.lines().count(), 1, "{routes}");
    assert!(
        routes.contains("2001:20::b via 2001:db8::2 dev va") && routes.contains("src 2001:20::a"),
        "{routes}"
    );
    // The kernel now picks the HIT as source towards the peer HIT.
    let get = String::from_utf8_lossy(&p.a.ip(["-6", "route", "get", HIT_B]).unwrap().stdout)
        .into_owned();
    assert!(get.contains("src 2001:20::a"), "{get}");

    assert!(rt.block_on(r.del_peer_route(hb)).unwrap());
    assert!(!rt.block_on(r.del_peer_route(hb)).unwrap());
    assert!(rt.block_on(r.del_local_hit(ha)).unwrap());
    assert!(!rt.block_on(r.del_local_hit(ha)).unwrap());
    let routes = p.a.ip(["-6", "route", "show", HIT_B]).unwrap().stdout;
    assert!(routes.is_empty());
    // An unreachable locator is a clear error, not a silent no-op.
    let e = rt
        .block_on(r.add_peer_route(hb, ha, "2001:db9::9".parse().unwrap()))
        .unwrap_err();
    assert!(e.to_string().contains("2001:db9::9"), "{e}");
}
