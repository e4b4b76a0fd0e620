//! The association sequences of [`crate::assoc`] against the in-memory kernel: fail-closed
//! order at every step, rollback after a refusal at every step, rekey and locator moves.

use std::net::{IpAddr, Ipv6Addr};

use crate::{
    AssociationParams, EspKeyPair, EspKeys, EspTransform, FailClosed, Guard, KernelIpsec,
    LocatorPair, PolicyDir, Prefix, Reqid, UdpEncap, XfrmError, install_association, install_guard,
    memory::{MemoryIpsec, Op, Snapshot, Verdict},
    reconcile, rekey_association, remove_association,
};

/// The association of `assoc`'s own tests, with the given fail-closed scheme.
fn assoc(fail_closed: FailClosed) -> AssociationParams {
    AssociationParams {
        fail_closed,
        ..crate::assoc::tests::assoc()
    }
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn hits(a: &AssociationParams) -> (Ipv6Addr, Ipv6Addr) {
    (a.local_hit, a.peer_hit)
}

/// Fail-closed: in every snapshot of `k`'s history in which the association has a key in
/// the kernel (a complete SA), its traffic cannot pass in clear text either way.
fn never_clear(k: &MemoryIpsec, a: &AssociationParams) {
    let (l, p) = hits(a);
    for (i, (op, snap)) in k.history().iter().enumerate() {
        assert!(
            !snap.keyed_between(l, p) || snap.closed_between(l, p),
            "after step {i} ({op:?}) traffic between the HITs is in clear text: {snap:#?}"
        );
    }
}

fn protected(s: &Snapshot, a: &AssociationParams) -> bool {
    let (l, p) = hits(a);
    s.verdict(PolicyDir::Out, l, p) == Verdict::Protected
        && s.verdict(PolicyDir::In, p, l) == Verdict::Protected
}

#[test]
fn install_goes_block_policies_first_and_is_never_open() {
    let a = assoc(FailClosed::PerPeer);
    let k = MemoryIpsec::new();
    run(install_association(&k, &a)).unwrap();
    let ops = k.ops();
    // Block policies, inbound SA, outbound SA, IPsec policies.
    assert!(matches!(ops[0], Op::AddPolicy(_)) && matches!(ops[1], Op::AddPolicy(_)));
    assert_eq!(ops[2], Op::AddSa(a.sa_in().id()));
    assert_eq!(ops[3], Op::AddSa(a.sa_out().id()));
    assert_eq!(ops.len(), 6, "{ops:?}");
    never_clear(&k, &a);
    assert!(protected(&k.snapshot(), &a));
}

#[test]
fn install_under_the_guard_is_never_open() {
    let a = assoc(FailClosed::Guard);
    let k = MemoryIpsec::new();
    let g = Guard {
        prefix: Prefix::ORCHID_V2,
        local_hits: vec![a.local_hit],
    };
    run(install_guard(&k, &g)).unwrap();
    k.clear_log();
    run(install_association(&k, &a)).unwrap();
    assert_eq!(k.ops().len(), 4, "2 SAs + 2 IPsec policies: {:?}", k.ops());
    never_clear(&k, &a);
    assert!(protected(&k.snapshot(), &a));
    // Removal keeps it closed too: the guard's block stays behind.
    k.clear_log();
    run(remove_association(&k, &a)).unwrap();
    never_clear(&k, &a);
}

#[test]
fn a_refusal_at_any_step_rolls_back_to_nothing() {
    let a = assoc(FailClosed::PerPeer);
    let steps = {
        let k = MemoryIpsec::new();
        run(install_association(&k, &a)).unwrap();
        k.ops().len()
    };
    for n in 0..steps {
        let k = MemoryIpsec::new();
        // The inbound SPI came from ALLOCSPI: a larval SA is there before the install.
        let spi = run(k.alloc_spi(
            LocatorPair {
                src: a.peer_locator,
                dst: a.local_locator,
            },
            a.reqid,
        ))
        .unwrap();
        let a = AssociationParams {
            spi_in: spi,
            ..a.clone()
        };
        k.clear_log();
        k.fail_nth(n, libc::ENOBUFS);
        let err = run(install_association(&k, &a)).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOBUFS), "step {n}: {err}");
        let s = k.snapshot();
        assert!(
            s.sas.is_empty() && s.policies.is_empty(),
            "refused at step {n}: left behind {s:#?}"
        );
        never_clear(&k, &a);
    }
}

#[test]
fn a_failed_rollback_is_reported_with_both_errors() {
    let a = assoc(FailClosed::PerPeer);
    let k = MemoryIpsec::new();
    // The outbound SA is refused, then the first undo step (deleting it) too.
    k.fail(1, |o| matches!(o, Op::AddSa(_)), libc::EINVAL);
    k.fail(0, |o| matches!(o, Op::DelSa(_)), libc::EBUSY);
    match run(install_association(&k, &a)).unwrap_err() {
        XfrmError::RollbackFailed { source, rollback } => {
            assert_eq!(source.errno(), Some(libc::EINVAL));
            assert_eq!(rollback.errno(), Some(libc::EBUSY));
        }
        e => panic!("expected RollbackFailed, got {e}"),
    }
    // The rest of the undo still ran: the policies are gone, the block policies last.
    assert!(k.snapshot().policies.is_empty(), "{:#?}", k.snapshot());
}

#[test]
fn foreign_objects_are_never_touched() {
    let a = assoc(FailClosed::PerPeer);
    let k = MemoryIpsec::new();
    k.seed_foreign_sa(a.sa_out().id(), a.local_locator);
    let before = k.snapshot().sas[&a.sa_out().id()].clone();
    let err = run(install_association(&k, &a)).unwrap_err();
    assert!(matches!(err, XfrmError::ForeignConflict { .. }), "{err}");
    let s = k.snapshot();
    assert_eq!(s.sas.len(), 1, "only the foreign SA stays: {s:#?}");
    assert_eq!(s.sas[&a.sa_out().id()], before);
    assert!(s.policies.is_empty());
}

#[test]
fn a_rekey_always_has_an_sa_for_the_policies_and_drops_the_old_pair() {
    let old = assoc(FailClosed::PerPeer);
    let k = MemoryIpsec::new();
    run(install_association(&k, &old)).unwrap();
    let k2 = |b| EspKeys::new(EspTransform::AesCbc128HmacSha256, &[b; 16], &[b; 32]).unwrap();
    let new = AssociationParams {
        spi_in: 0x3000,
        spi_out: 0x4000,
        keys: EspKeyPair {
            outbound: k2(3),
            inbound: k2(4),
        },
        ..old.clone()
    };
    k.clear_log();
    run(rekey_association(&k, &old, &new)).unwrap();
    // At every step both directions are protected by some SA: no drop, no clear text.
    for (i, (op, snap)) in k.history().iter().enumerate() {
        assert!(
            protected(snap, &old),
            "after step {i} ({op:?}) a direction has no SA"
        );
    }
    let s = k.snapshot();
    let spis: std::collections::BTreeSet<u32> = s.sas.keys().map(|id| id.spi).collect();
    assert_eq!(spis, [0x3000, 0x4000].into(), "only the new pair stays");
    // The same rekey without new SPIs is refused before any change.
    k.clear_log();
    assert!(run(rekey_association(&k, &new, &new)).is_err());
    assert!(k.log().is_empty());
}

#[test]
fn a_move_keeps_sequence_numbers_and_a_missing_sa_is_refused() {
    let a = assoc(FailClosed::PerPeer);
    let k = MemoryIpsec::new();
    run(install_association(&k, &a)).unwrap();
    k.set_seq(&a.sa_out().id(), 500, 0);
    let moved = AssociationParams {
        peer_locator: "2001:db8::11".parse::<IpAddr>().unwrap(),
        ..a.clone()
    };
    // The agent's move (hip-agent `Offload::locators_changed`): the policies' templates
    // first, then the SAs.
    run(async {
        for p in moved.ipsec_policies() {
            k.add_policy(&p).await?;
        }
        k.move_sa(&a.sa_out().id(), &moved.sa_out()).await?;
        k.move_sa(&a.sa_in().id(), &moved.sa_in()).await
    })
    .unwrap();
    let s = k.snapshot();
    assert_eq!(
        s.sas[&moved.sa_out().id()].seq_out,
        500,
        "counter carried over"
    );
    assert!(!s.sas.contains_key(&a.sa_out().id()));
    assert!(protected(&s, &moved));
    never_clear(&k, &a);

    // An SA deleted behind hip's back cannot be moved: ESRCH, and nothing else changes.
    k.remove_behind_back(&moved.sa_out().id());
    let before = k.snapshot();
    let back = AssociationParams {
        peer_locator: "2001:db8::2".parse().unwrap(),
        ..moved.clone()
    };
    let err = run(k.move_sa(&moved.sa_out().id(), &back.sa_out())).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ESRCH), "{err}");
    assert_eq!(k.snapshot(), before);
}

#[test]
fn reconcile_keeps_the_live_and_removes_the_stale() {
    let live = assoc(FailClosed::PerPeer);
    let stale = AssociationParams {
        peer_hit: "2001:20::c".parse().unwrap(),
        peer_locator: "2001:db8::9".parse().unwrap(),
        spi_in: 0x5000,
        spi_out: 0x6000,
        reqid: Reqid::hip(8),
        ..live.clone()
    };
    let k = MemoryIpsec::new();
    run(install_association(&k, &live)).unwrap();
    run(install_association(&k, &stale)).unwrap();
    k.seed_foreign_sa(
        crate::SaId {
            dst: "192.0.2.77".parse().unwrap(),
            spi: 9,
        },
        "192.0.2.1".parse().unwrap(),
    );
    let r = run(reconcile(&k, std::slice::from_ref(&live), None)).unwrap();
    assert_eq!((r.removed_sas, r.removed_policies), (2, 4), "{r:?}");
    let s = k.snapshot();
    assert!(protected(&s, &live));
    assert_eq!(s.sas.len(), 3, "live pair + the foreign SA: {s:#?}");
}

/// `assoc`'s association over IPv4 outer addresses with UDP encapsulation: our port
/// 10500, the peer's `peer_port`.
fn encapsulated(peer_port: u16) -> AssociationParams {
    AssociationParams {
        local_locator: "192.0.2.1".parse().unwrap(),
        peer_locator: "198.51.100.2".parse().unwrap(),
        encap: Some(UdpEncap {
            sport: UdpEncap::HIP_NAT_PORT,
            dport: peer_port,
        }),
        ..assoc(FailClosed::PerPeer)
    }
}

fn encap_of(k: &MemoryIpsec, id: &crate::SaId) -> Option<UdpEncap> {
    run(k.list_owned())
        .unwrap()
        .sas
        .into_iter()
        .find(|s| s.id == *id)
        .unwrap_or_else(|| panic!("no {id}"))
        .encap
}

#[test]
fn an_encapsulated_association_reads_back_with_its_ports_per_direction() {
    let a = encapsulated(40000);
    let k = MemoryIpsec::new();
    run(install_association(&k, &a)).unwrap();
    // Outbound: from our port to the peer's; inbound: from the peer's port to ours.
    let out = UdpEncap {
        sport: 10500,
        dport: 40000,
    };
    assert_eq!(encap_of(&k, &a.sa_out().id()), Some(out));
    assert_eq!(encap_of(&k, &a.sa_in().id()), Some(out.reversed()));
    assert!(protected(&k.snapshot(), &a));
    never_clear(&k, &a);
    // Port 0 is no port.
    let bad = AssociationParams {
        encap: Some(UdpEncap {
            sport: 10500,
            dport: 0,
        }),
        ..a.clone()
    };
    assert!(matches!(
        run(install_association(&k, &bad)),
        Err(XfrmError::InvalidParam(_))
    ));
}

#[test]
fn an_update_changes_encap_ports_but_cannot_add_or_remove_encapsulation() {
    let a = encapsulated(10500);
    let k = MemoryIpsec::new();
    run(install_association(&k, &a)).unwrap();
    let id = a.sa_out().id();
    k.set_seq(&id, 77, 0);
    // New ports in place: counters stay.
    let rebound = encapsulated(40000);
    run(k.update_sa(&rebound.sa_out())).unwrap();
    assert_eq!(encap_of(&k, &id), rebound.encap);
    assert_eq!(k.snapshot().sas[&id].seq_out, 77);
    // Removing (or adding) encapsulation is refused as the kernel refuses it, changing
    // nothing.
    let before = k.snapshot();
    let plain = AssociationParams {
        encap: None,
        ..rebound.clone()
    };
    let err = run(k.update_sa(&plain.sa_out())).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert!(err.to_string().contains("UDP encapsulation"), "{err}");
    assert_eq!(k.snapshot(), before);

    let k = MemoryIpsec::new();
    run(install_association(&k, &plain)).unwrap();
    let err = run(k.update_sa(&rebound.sa_out())).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert_eq!(encap_of(&k, &id), None);
}

#[test]
fn a_move_changes_adds_and_removes_encapsulation_keeping_sequence_numbers() {
    let plain = AssociationParams {
        encap: None,
        ..encapsulated(10500)
    };
    let k = MemoryIpsec::new();
    run(install_association(&k, &plain)).unwrap();
    let (out, inb) = (plain.sa_out().id(), plain.sa_in().id());
    k.set_seq(&out, 500, 0);
    k.set_seq(&inb, 0, 480);
    // Plain → encapsulated (a NAT appeared) → other peer port (a rebinding) → plain.
    let mut cur = plain.clone();
    for next in [encapsulated(10500), encapsulated(40000), plain.clone()] {
        run(async {
            k.move_sa(&cur.sa_out().id(), &next.sa_out()).await?;
            k.move_sa(&cur.sa_in().id(), &next.sa_in()).await
        })
        .unwrap();
        let s = k.snapshot();
        assert_eq!((s.sas[&out].seq_out, s.sas[&inb].seq_in), (500, 480));
        assert_eq!(encap_of(&k, &out), next.encap);
        assert_eq!(encap_of(&k, &inb), next.encap.map(UdpEncap::reversed));
        assert!(protected(&s, &next));
        cur = next;
    }
    never_clear(&k, &plain);
}

#[test]
fn a_rekey_carries_the_encapsulation_to_the_new_pair() {
    let old = encapsulated(10500);
    let k = MemoryIpsec::new();
    run(install_association(&k, &old)).unwrap();
    let k2 = |b| EspKeys::new(EspTransform::AesCbc128HmacSha256, &[b; 16], &[b; 32]).unwrap();
    // The peer's port changed with the rekey.
    let new = AssociationParams {
        spi_in: 0x3000,
        spi_out: 0x4000,
        keys: EspKeyPair {
            outbound: k2(3),
            inbound: k2(4),
        },
        ..encapsulated(40000)
    };
    run(rekey_association(&k, &old, &new)).unwrap();
    let o = run(k.list_owned()).unwrap();
    assert_eq!(o.sas.len(), 2, "{o:?}");
    assert_eq!(encap_of(&k, &new.sa_out().id()), new.encap);
    assert_eq!(
        encap_of(&k, &new.sa_in().id()),
        new.encap.map(UdpEncap::reversed)
    );
}
