//! Pure converters between hip's typed parameters and `netlink-packet-xfrm` messages
//! (strongSwan's `kernel_netlink_ipsec.c` keeps the same split: build/parse without I/O).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use netlink_packet_xfrm::{
    Address, Alg, AlgAead, AlgAuth, EncapTmpl, IPPROTO_ESP, LifetimeConfig, ReplayEsn,
    UDP_ENCAP_ESPINUDP, UserPolicyId, UserPolicyInfo, UserSaId, UserSaInfo, UserSpiInfo,
    UserTemplate, XFRM_INF, XFRM_MODE_BEET, XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD,
    XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_SHARE_ANY, XfrmAttrs, XfrmMessage,
    constants::{AF_INET, AF_INET6},
    policy::{DelGetMessage as PolicyDelGet, ModifyMessage as PolicyModify},
    state::{AllocSpiMessage, DelGetMessage as StateDelGet, ModifyMessage as StateModify},
};

use crate::{
    EspTransform, HitPair, KernelEvent, LEGACY_REPLAY_WINDOW, Lifetimes, LocatorPair, PolicyAction,
    PolicyDir, PolicyEntry, PolicyId, PolicyParams, Prefix, Reqid, SaEntry, SaId, SaParams, Spi,
    UdpEncap,
};

fn addr_back(a: &Address, fam: u16) -> IpAddr {
    if fam == AF_INET {
        IpAddr::V4(a.to_ipv4())
    } else {
        IpAddr::V6(a.to_ipv6())
    }
}

fn name64(s: &str) -> [u8; 64] {
    let mut n = [0u8; 64];
    n[..s.len()].copy_from_slice(s.as_bytes());
    n
}

fn name_back(n: &[u8; 64]) -> String {
    let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
    String::from_utf8_lossy(&n[..end]).into_owned()
}

fn inf(v: u64) -> u64 {
    if v == 0 { XFRM_INF } else { v }
}

fn lifetime_cfg(l: &Lifetimes) -> LifetimeConfig {
    LifetimeConfig {
        soft_byte_limit: inf(l.soft_bytes),
        hard_byte_limit: inf(l.hard_bytes),
        // Packet limits are not configurable: byte and time limits cover rekeying.
        soft_packet_limit: XFRM_INF,
        hard_packet_limit: XFRM_INF,
        // For the time limits the kernel's "no limit" is 0, not XFRM_INF.
        soft_add_expires_seconds: l.soft_secs,
        hard_add_expires_seconds: l.hard_secs,
        soft_use_expires_seconds: 0,
        hard_use_expires_seconds: 0,
    }
}

fn lifetimes_back(c: &LifetimeConfig) -> Lifetimes {
    let fin = |v: u64| if v == XFRM_INF { 0 } else { v };
    Lifetimes {
        soft_secs: c.soft_add_expires_seconds,
        hard_secs: c.hard_add_expires_seconds,
        soft_bytes: fin(c.soft_byte_limit),
        hard_bytes: fin(c.hard_byte_limit),
    }
}

fn selector(src: Prefix, dst: Prefix) -> netlink_packet_xfrm::Selector {
    netlink_packet_xfrm::Selector {
        saddr: Address::from_ipv6(&src.addr),
        daddr: Address::from_ipv6(&dst.addr),
        prefixlen_s: src.len,
        prefixlen_d: dst.len,
        family: AF_INET6,
        ..Default::default()
    }
}

fn selector_back(s: &netlink_packet_xfrm::Selector) -> Option<(Prefix, Prefix)> {
    // hip's selectors are IPv6 (HITs); anything else is not hip's shape.
    if s.family != AF_INET6 {
        return None;
    }
    Some((
        Prefix {
            addr: s.saddr.to_ipv6(),
            len: s.prefixlen_s,
        },
        Prefix {
            addr: s.daddr.to_ipv6(),
            len: s.prefixlen_d,
        },
    ))
}

/// `XFRM_MSG_NEWSA`/`UPDSA` body for one BEET SA (`update` picks the message type).
pub(crate) fn sa_message(p: &SaParams, update: bool) -> XfrmMessage {
    let mut info = UserSaInfo::default();
    info.source(&p.locators.src);
    info.destination(&p.locators.dst);
    info.id.spi = p.spi;
    info.id.proto = IPPROTO_ESP;
    info.selector = selector(Prefix::host(p.hits.src), Prefix::host(p.hits.dst));
    info.reqid = p.reqid.0;
    info.mode = XFRM_MODE_BEET;
    info.lifetime_cfg = lifetime_cfg(&p.lifetimes);
    let algs = p.keys.transform().kernel_algs();
    let mut nlas = Vec::new();
    // Up to 32 packets the window fits the SA info's bitmap; a larger one goes in its own
    // attribute, and then the kernel wants 0 in the SA info (verify_replay()).
    match u8::try_from(p.replay_window) {
        Ok(w) if p.replay_window <= LEGACY_REPLAY_WINDOW => info.replay_window = w,
        _ => {
            let words = p.replay_window.div_ceil(32);
            nlas.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
                bmp_len: words,
                replay_window: p.replay_window,
                bmp: vec![0; words as usize],
                ..ReplayEsn::default()
            }));
        }
    }
    if let Some((name, trunc)) = algs.auth {
        nlas.push(XfrmAttrs::AuthenticationAlgTrunc(AlgAuth {
            alg_name: name64(name),
            alg_key_len: (p.keys.auth().len() * 8) as u32,
            alg_trunc_len: trunc,
            alg_key: p.keys.auth().to_vec(),
        }));
    }
    if let Some(name) = algs.enc {
        nlas.push(XfrmAttrs::EncryptionAlg(Alg {
            alg_name: name64(name),
            alg_key_len: (p.keys.enc().len() * 8) as u32,
            alg_key: p.keys.enc().to_vec(),
        }));
    }
    if let Some((name, icv)) = algs.aead {
        nlas.push(XfrmAttrs::EncryptionAlgAead(AlgAead {
            alg_name: name64(name),
            alg_key_len: (p.keys.enc().len() * 8) as u32,
            alg_icv_len: icv,
            alg_key: p.keys.enc().to_vec(),
        }));
    }
    if let Some(e) = &p.encap {
        nlas.push(encap_attr(e));
    }
    let m = StateModify {
        user_sa_info: info,
        nlas,
    };
    if update {
        XfrmMessage::UpdateSa(m)
    } else {
        XfrmMessage::AddSa(m)
    }
}

/// `XFRMA_ENCAP` for RFC 3948 UDP encapsulation (`struct xfrm_encap_tmpl`: type
/// `UDP_ENCAP_ESPINUDP`, the ports in network byte order — the crate converts them —
/// and an all-zero original address, which serves IPv4 and IPv6 outer addresses alike).
fn encap_attr(e: &UdpEncap) -> XfrmAttrs {
    XfrmAttrs::EncapsulationTemplate(EncapTmpl {
        encap_type: UDP_ENCAP_ESPINUDP,
        encap_sport: e.sport,
        encap_dport: e.dport,
        encap_oa: Address::default(),
    })
}

/// The `encap_type` of an SA's `XFRMA_ENCAP`; `None` for plain ESP.
pub(crate) fn encap_type(nlas: &[XfrmAttrs]) -> Option<u16> {
    nlas.iter().find_map(|n| match n {
        XfrmAttrs::EncapsulationTemplate(t) => Some(t.encap_type),
        _ => None,
    })
}

/// True unless `p` adds or removes encapsulation relative to the installed SA whose
/// attributes are `nlas` (or changes its type): what the kernel's `UPDSA` refuses with
/// `EINVAL` (`xfrm_state_update()`, net/xfrm/xfrm_state.c, copies the template only
/// between two encapsulations of the same type).
pub(crate) fn same_encap_kind(nlas: &[XfrmAttrs], p: &SaParams) -> bool {
    encap_type(nlas) == p.encap.map(|_| UDP_ENCAP_ESPINUDP)
}

/// True if the installed, complete SA `cur` (same destination and SPI as `p`) becomes
/// `p` through `XFRM_MSG_UPDSA`, which keeps everything of the kernel's state but the
/// lifetime limits and the encapsulation's ports: the keys, selector, reqid, source,
/// mode and replay window are `p`'s already, and both or neither are UDP-encapsulated.
/// Anything else needs a new SA.
pub(crate) fn updatable_to(cur: &StateModify, p: &SaParams) -> bool {
    let XfrmMessage::AddSa(want) = sa_message(p, false) else {
        unreachable!("sa_message(_, false) is an AddSa")
    };
    alg_attrs(&cur.nlas) == alg_attrs(&want.nlas)
        && cur.user_sa_info.selector == want.user_sa_info.selector
        && cur.user_sa_info.reqid == want.user_sa_info.reqid
        && cur.user_sa_info.saddr == want.user_sa_info.saddr
        && cur.user_sa_info.family == want.user_sa_info.family
        && cur.user_sa_info.mode == want.user_sa_info.mode
        && sa_entry(&cur.user_sa_info, &cur.nlas).map(|e| e.replay_window) == Some(p.replay_window)
        && same_encap_kind(&cur.nlas, p)
}

/// An SA's replay state as the kernel reports it: `XFRMA_REPLAY_VAL` (a window of up to
/// 32) or `XFRMA_REPLAY_ESN_VAL` — its outbound and inbound sequence numbers and window
/// bitmap.
pub(crate) fn replay_state(nlas: &[XfrmAttrs]) -> Option<&XfrmAttrs> {
    nlas.iter()
        .find(|n| matches!(n, XfrmAttrs::ReplayState(_) | XfrmAttrs::ReplayStateEsn(_)))
}

/// `XFRM_MSG_NEWSA` for `p` that continues `carried`'s replay state (from
/// [`replay_state`] of the SA it replaces, same SPI and keys, new addresses). The kernel
/// copies an `XFRMA_REPLAY_ESN_VAL` whole into the new state
/// (`xfrm_alloc_replay_state_esn()`) and applies an `XFRMA_REPLAY_VAL` over the fresh
/// one (`xfrm_update_ae_params()`, net/xfrm/xfrm_user.c), so the outbound sequence number
/// goes on — with AES-GCM the IV is derived from it (`seqiv`), so a restart would reuse
/// nonces under the same key — and packets seen before stay refused as replays.
pub(crate) fn sa_message_continuing(p: &SaParams, carried: &XfrmAttrs) -> XfrmMessage {
    let mut m = sa_message(p, false);
    if let XfrmMessage::AddSa(s) = &mut m {
        s.nlas
            .retain(|n| !matches!(n, XfrmAttrs::ReplayState(_) | XfrmAttrs::ReplayStateEsn(_)));
        s.nlas.push(carried.clone());
    }
    m
}

/// `XFRM_MSG_ALLOCSPI` body: a larval SA from `locators.src` to `locators.dst` whose SPI
/// the kernel picks in `min..=max`.
pub(crate) fn allocspi_message(
    locators: LocatorPair,
    reqid: Reqid,
    min: Spi,
    max: Spi,
) -> XfrmMessage {
    let mut spi = UserSpiInfo::default();
    spi.info.source(&locators.src);
    spi.info.destination(&locators.dst);
    spi.info.reqid = reqid.0;
    spi.info.mode = XFRM_MODE_BEET;
    spi.protocol(IPPROTO_ESP);
    spi.spi_range(min, max);
    XfrmMessage::AllocSpi(AllocSpiMessage {
        spi_info: spi,
        nlas: vec![],
    })
}

fn sa_id(id: &SaId) -> UserSaId {
    let mut u = UserSaId::default();
    u.destination(&id.dst);
    u.spi = id.spi;
    u.proto = IPPROTO_ESP;
    u
}

/// `XFRM_MSG_DELSA` body.
pub(crate) fn del_sa_message(id: &SaId) -> XfrmMessage {
    XfrmMessage::DeleteSa(StateDelGet {
        user_sa_id: sa_id(id),
        nlas: vec![],
    })
}

/// `XFRM_MSG_GETSA` body (one SA).
pub(crate) fn get_sa_message(id: &SaId) -> XfrmMessage {
    XfrmMessage::GetSa(StateDelGet {
        user_sa_id: sa_id(id),
        nlas: vec![],
    })
}

fn dir_code(d: PolicyDir) -> u8 {
    match d {
        PolicyDir::In => XFRM_POLICY_IN,
        PolicyDir::Out => XFRM_POLICY_OUT,
        PolicyDir::Fwd => XFRM_POLICY_FWD,
    }
}

fn dir_back(d: u8) -> Option<PolicyDir> {
    match d {
        XFRM_POLICY_IN => Some(PolicyDir::In),
        XFRM_POLICY_OUT => Some(PolicyDir::Out),
        XFRM_POLICY_FWD => Some(PolicyDir::Fwd),
        _ => None,
    }
}

/// `XFRM_MSG_NEWPOLICY`/`UPDPOLICY` body.
pub(crate) fn policy_message(p: &PolicyParams, update: bool) -> XfrmMessage {
    let mut info = UserPolicyInfo {
        selector: selector(p.id.src, p.id.dst),
        lifetime_cfg: LifetimeConfig::default(),
        ..Default::default()
    };
    info.priority = p.priority;
    info.direction = dir_code(p.id.dir);
    info.share = XFRM_SHARE_ANY;
    let mut nlas = Vec::new();
    match p.action {
        PolicyAction::Ipsec { locators, reqid } => {
            info.action = XFRM_POLICY_ALLOW;
            let mut t = UserTemplate::default();
            t.source(&locators.src);
            t.destination(&locators.dst);
            t.protocol(IPPROTO_ESP);
            t.mode(XFRM_MODE_BEET);
            t.reqid(reqid.0);
            // "level required": a missing SA drops the packet (and raises ACQUIRE);
            // it never lets it out in clear text.
            t.optional(false);
            nlas.push(XfrmAttrs::Template(vec![t]));
        }
        PolicyAction::Block => info.action = XFRM_POLICY_BLOCK,
        PolicyAction::Allow => info.action = XFRM_POLICY_ALLOW,
    }
    let m = PolicyModify {
        user_policy_info: info,
        nlas,
    };
    if update {
        XfrmMessage::UpdatePolicy(m)
    } else {
        XfrmMessage::AddPolicy(m)
    }
}

fn policy_id(id: &PolicyId) -> UserPolicyId {
    UserPolicyId {
        selector: selector(id.src, id.dst),
        index: 0,
        direction: dir_code(id.dir),
    }
}

/// `XFRM_MSG_DELPOLICY` body.
pub(crate) fn del_policy_message(id: &PolicyId) -> XfrmMessage {
    XfrmMessage::DeletePolicy(PolicyDelGet {
        user_policy_id: policy_id(id),
        nlas: vec![],
    })
}

/// `XFRM_MSG_GETPOLICY` body (one policy).
pub(crate) fn get_policy_message(id: &PolicyId) -> XfrmMessage {
    XfrmMessage::GetPolicy(PolicyDelGet {
        user_policy_id: policy_id(id),
        nlas: vec![],
    })
}

/// `XFRM_MSG_GETSA` dump request.
pub(crate) fn dump_sa_message() -> XfrmMessage {
    XfrmMessage::GetDumpSa(Default::default())
}

/// `XFRM_MSG_GETPOLICY` dump request.
pub(crate) fn dump_policy_message() -> XfrmMessage {
    XfrmMessage::GetPolicy(Default::default())
}

/// Reads an SA (`NEWSA` reply of a dump, `GETSA` or `ALLOCSPI`) back into hip's terms.
/// Returns `None` for non-ESP SAs.
pub(crate) fn sa_entry(info: &UserSaInfo, nlas: &[XfrmAttrs]) -> Option<SaEntry> {
    if info.id.proto != IPPROTO_ESP {
        return None;
    }
    let dst = addr_back(&info.id.daddr, info.family);
    let src = addr_back(&info.saddr, info.family);
    let hits = selector_back(&info.selector).and_then(|(s, d)| {
        (s.len == 128 && d.len == 128).then_some(HitPair {
            src: s.addr,
            dst: d.addr,
        })
    });
    let (mut enc, mut auth, mut aead) = (None, None, None);
    let mut replay_window = u32::from(info.replay_window);
    let (mut seq_out, mut seq_in) = (0, 0);
    let (mut encap, mut other_encap_type) = (None, None);
    for n in nlas {
        match n {
            XfrmAttrs::EncapsulationTemplate(t) if t.encap_type == UDP_ENCAP_ESPINUDP => {
                encap = Some(UdpEncap {
                    sport: t.encap_sport,
                    dport: t.encap_dport,
                });
            }
            XfrmAttrs::EncapsulationTemplate(t) => other_encap_type = Some(t.encap_type),
            XfrmAttrs::ReplayStateEsn(r) => {
                replay_window = r.replay_window;
                (seq_out, seq_in) = (r.oseq, r.seq);
            }
            XfrmAttrs::ReplayState(r) => (seq_out, seq_in) = (r.oseq, r.seq),
            XfrmAttrs::EncryptionAlg(a) => enc = Some(name_back(&a.alg_name)),
            XfrmAttrs::AuthenticationAlgTrunc(a) => auth = Some(name_back(&a.alg_name)),
            XfrmAttrs::EncryptionAlgAead(a) => aead = Some(name_back(&a.alg_name)),
            _ => {}
        }
    }
    let transform =
        EspTransform::from_kernel_names(enc.as_deref(), auth.as_deref(), aead.as_deref())
            .filter(|_| enc.is_some() || aead.is_some());
    Some(SaEntry {
        id: SaId {
            dst,
            spi: info.id.spi,
        },
        src,
        hits,
        reqid: Reqid(info.reqid),
        beet: info.mode == XFRM_MODE_BEET,
        transform,
        lifetimes: lifetimes_back(&info.lifetime_cfg),
        bytes: info.lifetime_cur.bytes,
        packets: info.lifetime_cur.packets,
        replay_window,
        seq_out,
        seq_in,
        encap,
        other_encap_type,
    })
}

/// The algorithm attributes of an SA message, for comparing an installed SA with the
/// wanted one (keys included).
pub(crate) fn alg_attrs(nlas: &[XfrmAttrs]) -> Vec<&XfrmAttrs> {
    let mut v: Vec<&XfrmAttrs> = nlas
        .iter()
        .filter(|n| {
            matches!(
                n,
                XfrmAttrs::EncryptionAlg(_)
                    | XfrmAttrs::AuthenticationAlgTrunc(_)
                    | XfrmAttrs::EncryptionAlgAead(_)
            )
        })
        .collect();
    v.sort_by_key(|n| netlink_packet_core::Nla::kind(*n));
    v
}

/// Reads a policy back into hip's terms; `None` if it is not of a shape hip installs
/// (non-IPv6 selector, unknown direction, several templates).
pub(crate) fn policy_entry(info: &UserPolicyInfo, nlas: &[XfrmAttrs]) -> Option<PolicyEntry> {
    let (src, dst) = selector_back(&info.selector)?;
    let dir = dir_back(info.direction)?;
    let tmpls: Vec<&UserTemplate> = nlas
        .iter()
        .filter_map(|n| match n {
            XfrmAttrs::Template(t) => Some(t.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let action = match (info.action, tmpls.as_slice()) {
        (XFRM_POLICY_BLOCK, []) => PolicyAction::Block,
        (XFRM_POLICY_ALLOW, []) => PolicyAction::Allow,
        (XFRM_POLICY_ALLOW, [t]) => PolicyAction::Ipsec {
            locators: LocatorPair {
                src: addr_back(&t.saddr, t.family),
                dst: addr_back(&t.id.daddr, t.family),
            },
            reqid: Reqid(t.reqid),
        },
        _ => return None,
    };
    Some(PolicyEntry {
        params: PolicyParams {
            id: PolicyId { dir, src, dst },
            action,
            priority: info.priority,
        },
        index: info.index,
    })
}

/// Maps a multicast message to an event; `None` for messages hip does not report.
pub(crate) fn event(m: &XfrmMessage) -> Option<KernelEvent> {
    match m {
        XfrmMessage::Acquire(a) => {
            let sel = &a.acquire.selector;
            let reqid = a
                .nlas
                .iter()
                .find_map(|n| match n {
                    XfrmAttrs::Template(t) => t.first().map(|t| t.reqid),
                    _ => None,
                })
                .unwrap_or(0);
            Some(KernelEvent::Acquire {
                hits: HitPair {
                    src: v6(&sel.saddr, sel.family),
                    dst: v6(&sel.daddr, sel.family),
                },
                locators: LocatorPair {
                    src: addr_back(&a.acquire.saddr, tmpl_family(&a.nlas).unwrap_or(sel.family)),
                    dst: addr_back(
                        &a.acquire.id.daddr,
                        tmpl_family(&a.nlas).unwrap_or(sel.family),
                    ),
                },
                reqid: Reqid(reqid),
            })
        }
        XfrmMessage::Expire(e) => {
            let s = &e.expire.state;
            Some(KernelEvent::Expire {
                sa: SaId {
                    dst: addr_back(&s.id.daddr, s.family),
                    spi: s.id.spi,
                },
                hits: HitPair {
                    src: v6(&s.selector.saddr, s.selector.family),
                    dst: v6(&s.selector.daddr, s.selector.family),
                },
                reqid: Reqid(s.reqid),
                hard: e.expire.hard != 0,
            })
        }
        XfrmMessage::DeleteSa(d) => {
            let reqid = d.nlas.iter().find_map(|n| match n {
                XfrmAttrs::SaInfo(i) => Some(Reqid(i.reqid)),
                _ => None,
            });
            Some(KernelEvent::SaDeleted {
                sa: SaId {
                    dst: addr_back(&d.user_sa_id.daddr, d.user_sa_id.family),
                    spi: d.user_sa_id.spi,
                },
                reqid,
            })
        }
        XfrmMessage::Mapping(m) => {
            // The addresses carry no family of their own: the SA's (`id.family`) is theirs.
            let m = &m.map;
            let fam = m.id.family;
            Some(KernelEvent::Mapping {
                sa: SaId {
                    dst: addr_back(&m.id.daddr, fam),
                    spi: m.id.spi,
                },
                reqid: Reqid(m.reqid),
                old: SocketAddr::new(addr_back(&m.old_saddr, fam), m.old_sport),
                new: SocketAddr::new(addr_back(&m.new_saddr, fam), m.new_sport),
            })
        }
        XfrmMessage::DeletePolicy(d) => {
            let (src, dst) = selector_back(&d.user_policy_id.selector)?;
            let dir = dir_back(d.user_policy_id.direction)?;
            let priority = d.nlas.iter().find_map(|n| match n {
                XfrmAttrs::PolicyInfo(i) => Some(i.priority),
                _ => None,
            });
            Some(KernelEvent::PolicyDeleted {
                id: PolicyId { dir, src, dst },
                priority,
            })
        }
        _ => None,
    }
}

fn tmpl_family(nlas: &[XfrmAttrs]) -> Option<u16> {
    nlas.iter().find_map(|n| match n {
        XfrmAttrs::Template(t) => t.first().map(|t| t.family),
        _ => None,
    })
}

fn v6(a: &Address, fam: u16) -> Ipv6Addr {
    match addr_back(a, fam) {
        IpAddr::V6(v) => v,
        IpAddr::V4(v) => v.to_ipv6_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EspKeys, MAX_REPLAY_WINDOW, owner};
    use netlink_packet_core::{Emitable, NetlinkMessage, ParseableParametrized};

    fn sa() -> SaParams {
        SaParams {
            locators: LocatorPair {
                src: "2001:db8::1".parse().unwrap(),
                dst: "2001:db8::2".parse().unwrap(),
            },
            hits: HitPair {
                src: "2001:20::a".parse().unwrap(),
                dst: "2001:20::b".parse().unwrap(),
            },
            spi: 0x1234,
            reqid: Reqid::hip(1),
            keys: EspKeys::new(EspTransform::AesCbc128HmacSha256, &[1; 16], &[2; 32]).unwrap(),
            replay_window: 32,
            lifetimes: Lifetimes {
                soft_secs: 10,
                hard_secs: 20,
                ..Lifetimes::UNLIMITED
            },
            encap: None,
        }
    }

    fn round_trip(m: &XfrmMessage) -> XfrmMessage {
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        XfrmMessage::parse_with_param(&buf, m.message_type()).unwrap()
    }

    #[test]
    fn sa_message_reads_back_as_the_same_sa() {
        let p = sa();
        let m = round_trip(&sa_message(&p, false));
        let XfrmMessage::AddSa(s) = m else {
            panic!("{m:?}")
        };
        let e = sa_entry(&s.user_sa_info, &s.nlas).unwrap();
        assert_eq!(e.id, p.id());
        assert_eq!(e.hits, Some(p.hits));
        assert_eq!(e.reqid, p.reqid);
        assert!(e.beet);
        assert_eq!(e.transform, Some(EspTransform::AesCbc128HmacSha256));
        assert_eq!(e.lifetimes, p.lifetimes);
        assert_eq!(e.replay_window, 32);
        assert_eq!(s.user_sa_info.replay_window, 32);
        // Byte limits must be "infinite", not 0 (0 would expire at once).
        assert_eq!(s.user_sa_info.lifetime_cfg.hard_byte_limit, XFRM_INF);
    }

    #[test]
    fn windows_above_32_travel_in_their_own_attribute() {
        for (w, words) in [(33, 2), (64, 2), (1024, 32), (MAX_REPLAY_WINDOW, 128)] {
            let mut p = sa();
            p.replay_window = w;
            let XfrmMessage::AddSa(s) = round_trip(&sa_message(&p, false)) else {
                unreachable!()
            };
            // The kernel refuses a window in both places (verify_replay()).
            assert_eq!(s.user_sa_info.replay_window, 0);
            let esn: Vec<_> = s
                .nlas
                .iter()
                .filter_map(|n| match n {
                    XfrmAttrs::ReplayStateEsn(r) => Some(r),
                    _ => None,
                })
                .collect();
            assert_eq!(esn.len(), 1, "{:?}", s.nlas);
            assert_eq!((esn[0].replay_window, esn[0].bmp_len), (w, words));
            assert_eq!(esn[0].bmp.len(), words as usize);
            assert_eq!(sa_entry(&s.user_sa_info, &s.nlas).unwrap().replay_window, w);
        }
        let mut p = sa();
        p.replay_window = MAX_REPLAY_WINDOW + 1;
        assert!(p.check().is_err());
    }

    #[test]
    fn a_moved_sa_continues_the_old_ones_sequence_numbers() {
        use netlink_packet_xfrm::Replay;
        for window in [32, 1024] {
            let mut old = sa();
            old.replay_window = window;
            // What the kernel reports for the old SA after traffic: 500 sent, 480 seen.
            let XfrmMessage::AddSa(mut reported) = sa_message(&old, false) else {
                unreachable!()
            };
            for n in &mut reported.nlas {
                if let XfrmAttrs::ReplayStateEsn(r) = n {
                    (r.oseq, r.seq, r.bmp[0]) = (500, 480, 0xffff_0000);
                }
            }
            if window <= 32 {
                reported.nlas.push(XfrmAttrs::ReplayState(Replay {
                    oseq: 500,
                    seq: 480,
                    bitmap: 0xffff_0000,
                }));
            }
            let carried = replay_state(&reported.nlas).unwrap().clone();
            let mut new = old.clone();
            new.locators.dst = "2001:db8::9".parse().unwrap();
            let XfrmMessage::AddSa(m) = round_trip(&sa_message_continuing(&new, &carried)) else {
                unreachable!()
            };
            let states: Vec<_> = m
                .nlas
                .iter()
                .filter(|n| matches!(n, XfrmAttrs::ReplayState(_) | XfrmAttrs::ReplayStateEsn(_)))
                .collect();
            assert_eq!(states, vec![&carried], "exactly the carried state");
            let e = sa_entry(&m.user_sa_info, &m.nlas).unwrap();
            assert_eq!((e.seq_out, e.seq_in, e.replay_window), (500, 480, window));
            assert_eq!(e.id.dst, new.locators.dst);
            // The window sits in one place only, as verify_replay() wants.
            let in_info = u32::from(m.user_sa_info.replay_window);
            assert_eq!(in_info, if window <= 32 { window } else { 0 });
        }
    }

    #[test]
    fn gcm_and_null_map_to_kernel_names() {
        for t in EspTransform::ALL {
            let mut p = sa();
            p.keys =
                EspKeys::new(t, &vec![3; t.enc_key_len()], &vec![4; t.auth_key_len()]).unwrap();
            let XfrmMessage::AddSa(s) = sa_message(&p, false) else {
                unreachable!()
            };
            assert_eq!(
                sa_entry(&s.user_sa_info, &s.nlas).unwrap().transform,
                Some(t)
            );
        }
    }

    #[test]
    fn ipsec_policy_reads_back() {
        let p = PolicyParams {
            id: PolicyId {
                dir: PolicyDir::Out,
                src: Prefix::host("2001:20::a".parse().unwrap()),
                dst: Prefix::host("2001:20::b".parse().unwrap()),
            },
            action: PolicyAction::Ipsec {
                locators: sa().locators,
                reqid: Reqid::hip(1),
            },
            priority: owner::PRIORITY_IPSEC,
        };
        let XfrmMessage::AddPolicy(m) = round_trip(&policy_message(&p, false)) else {
            panic!()
        };
        assert_eq!(
            policy_entry(&m.user_policy_info, &m.nlas).unwrap().params,
            p
        );
        let b = PolicyParams {
            action: PolicyAction::Block,
            ..p
        };
        let XfrmMessage::UpdatePolicy(m) = round_trip(&policy_message(&b, true)) else {
            panic!()
        };
        assert_eq!(
            policy_entry(&m.user_policy_info, &m.nlas).unwrap().params,
            b
        );
    }

    fn sa_v4(encap: Option<UdpEncap>) -> SaParams {
        SaParams {
            locators: LocatorPair {
                src: "192.0.2.1".parse().unwrap(),
                dst: "198.51.100.2".parse().unwrap(),
            },
            encap,
            ..sa()
        }
    }

    fn encap_attrs(nlas: &[XfrmAttrs]) -> Vec<&EncapTmpl> {
        nlas.iter()
            .filter_map(|n| match n {
                XfrmAttrs::EncapsulationTemplate(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn udp_encapsulation_is_written_as_the_kernel_lays_it_out() {
        let e = UdpEncap {
            sport: 10500,
            dport: 40000,
        };
        // struct nlattr { u16 len = 4 + 24, u16 type = XFRMA_ENCAP (4) } then struct
        // xfrm_encap_tmpl { u16 encap_type; be16 sport; be16 dport; (2 octets of padding:
        // xfrm_address_t is 4-aligned) xfrm_address_t encap_oa; }.
        let a = encap_attr(&e);
        let mut buf = vec![0xee; a.buffer_len()];
        a.emit(&mut buf);
        let mut want = Vec::new();
        want.extend_from_slice(&28u16.to_ne_bytes());
        want.extend_from_slice(&4u16.to_ne_bytes());
        want.extend_from_slice(&2u16.to_ne_bytes());
        want.extend_from_slice(&[0x29, 0x04, 0x9c, 0x40, 0, 0]);
        want.extend_from_slice(&[0; 16]);
        assert_eq!(buf, want);
    }

    #[test]
    fn udp_encapsulation_round_trips_over_ipv4_and_ipv6_outer() {
        let e = UdpEncap {
            sport: 10500,
            dport: 40000,
        };
        for p in [
            sa_v4(Some(e)),
            SaParams {
                encap: Some(e),
                ..sa()
            },
        ] {
            for update in [false, true] {
                let (XfrmMessage::AddSa(s) | XfrmMessage::UpdateSa(s)) =
                    round_trip(&sa_message(&p, update))
                else {
                    unreachable!()
                };
                let t = encap_attrs(&s.nlas);
                assert_eq!(t.len(), 1, "{:?}", s.nlas);
                assert_eq!(t[0].encap_type, UDP_ENCAP_ESPINUDP);
                assert_eq!(
                    t[0].encap_oa,
                    Address::default(),
                    "original address all zero"
                );
                let back = sa_entry(&s.user_sa_info, &s.nlas).unwrap();
                assert_eq!((back.encap, back.other_encap_type), (Some(e), None));
                assert_eq!((back.id, back.src), (p.id(), p.locators.src));
            }
        }
        // Plain ESP carries no XFRMA_ENCAP and reads back as such.
        let XfrmMessage::AddSa(s) = round_trip(&sa_message(&sa_v4(None), false)) else {
            unreachable!()
        };
        assert!(encap_attrs(&s.nlas).is_empty());
        let back = sa_entry(&s.user_sa_info, &s.nlas).unwrap();
        assert_eq!((back.encap, back.other_encap_type), (None, None));
        // A moved SA keeps its encapsulation next to the carried replay state.
        let carried = XfrmAttrs::ReplayState(netlink_packet_xfrm::Replay {
            oseq: 9,
            seq: 0,
            bitmap: 0,
        });
        let XfrmMessage::AddSa(m) = round_trip(&sa_message_continuing(&sa_v4(Some(e)), &carried))
        else {
            unreachable!()
        };
        let back = sa_entry(&m.user_sa_info, &m.nlas).unwrap();
        assert_eq!((back.encap, back.seq_out), (Some(e), 9));
    }

    #[test]
    fn another_encapsulation_type_stays_visible() {
        let XfrmMessage::AddSa(mut s) = sa_message(&sa_v4(None), false) else {
            unreachable!()
        };
        // ESP in TCP (RFC 8229), as another IKE daemon might install it.
        s.nlas.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
            encap_type: netlink_packet_xfrm::TCP_ENCAP_ESPINTCP,
            encap_sport: 4500,
            encap_dport: 4500,
            encap_oa: Address::default(),
        }));
        let XfrmMessage::AddSa(s) = round_trip(&XfrmMessage::AddSa(s)) else {
            unreachable!()
        };
        let back = sa_entry(&s.user_sa_info, &s.nlas).unwrap();
        assert_eq!(back.encap, None);
        assert_eq!(back.other_encap_type, Some(7));
        // hip never updates it into a UDP one (or plain ESP) in place.
        assert!(!updatable_to(&s, &sa_v4(None)));
        let udp = UdpEncap {
            sport: 4500,
            dport: 4500,
        };
        assert!(!updatable_to(&s, &sa_v4(Some(udp))));
    }

    #[test]
    fn updsa_is_chosen_only_where_the_kernel_takes_it() {
        let (e1, e2) = (
            UdpEncap {
                sport: 10500,
                dport: 10500,
            },
            UdpEncap {
                sport: 10500,
                dport: 40000,
            },
        );
        let installed = |p: &SaParams| {
            let XfrmMessage::AddSa(s) = round_trip(&sa_message(p, false)) else {
                unreachable!()
            };
            s
        };
        let cur = installed(&sa_v4(Some(e1)));
        // New ports: xfrm_state_update() copies the template.
        assert!(updatable_to(&cur, &sa_v4(Some(e2))));
        assert!(updatable_to(&cur, &sa_v4(Some(e1))));
        // Encapsulation removed or added: EINVAL in the kernel, so a new SA instead.
        assert!(!updatable_to(&cur, &sa_v4(None)));
        assert!(!updatable_to(&installed(&sa_v4(None)), &sa_v4(Some(e1))));
        assert!(updatable_to(&installed(&sa_v4(None)), &sa_v4(None)));
        // Another source address is a new SA too (UPDSA keeps the old one's).
        let mut moved = sa_v4(Some(e2));
        moved.locators.src = "192.0.2.9".parse().unwrap();
        assert!(!updatable_to(&cur, &moved));
    }

    /// An `XFRM_MSG_MAPPING` as the kernel sends it (`xfrm_send_mapping()`,
    /// net/xfrm/xfrm_user.c), byte by byte from include/uapi/linux/xfrm.h.
    fn mapping_bytes(fam: u16, daddr: &[u8], old: &[u8], new: &[u8], reqid: u32) -> Vec<u8> {
        let addr = |a: &[u8]| {
            let mut v = [0u8; 16];
            v[..a.len()].copy_from_slice(a);
            v
        };
        let mut body = Vec::new();
        // struct xfrm_usersa_id { xfrm_address_t daddr; __be32 spi; __u16 family;
        // __u8 proto; } — 23 octets, padded to 24.
        body.extend_from_slice(&addr(daddr));
        body.extend_from_slice(&0x0102_0304u32.to_be_bytes());
        body.extend_from_slice(&fam.to_ne_bytes());
        body.push(IPPROTO_ESP);
        body.push(0);
        // __u32 reqid; xfrm_address_t old_saddr, new_saddr; __be16 old_sport, new_sport.
        body.extend_from_slice(&reqid.to_ne_bytes());
        body.extend_from_slice(&addr(old));
        body.extend_from_slice(&addr(new));
        body.extend_from_slice(&10500u16.to_be_bytes());
        body.extend_from_slice(&40000u16.to_be_bytes());
        assert_eq!(body.len(), 64, "sizeof(struct xfrm_user_mapping)");
        // struct nlmsghdr { u32 len; u16 type = XFRM_MSG_MAPPING (0x26); u16 flags;
        // u32 seq; u32 pid; }
        let mut m = Vec::new();
        m.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
        m.extend_from_slice(&0x26u16.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn parse_event(bytes: &[u8]) -> Option<KernelEvent> {
        let m = NetlinkMessage::<XfrmMessage>::deserialize(bytes).unwrap();
        let netlink_packet_core::NetlinkPayload::InnerMessage(x) = m.payload else {
            panic!("{m:?}")
        };
        event(&x)
    }

    #[test]
    fn mapping_events_parse_from_the_kernels_bytes() {
        let reqid = Reqid::hip(7);
        let ev = parse_event(&mapping_bytes(
            AF_INET,
            &[192, 0, 2, 1],
            &[198, 51, 100, 2],
            &[203, 0, 113, 9],
            reqid.0,
        ))
        .unwrap();
        assert_eq!(
            ev,
            KernelEvent::Mapping {
                sa: SaId {
                    dst: "192.0.2.1".parse().unwrap(),
                    spi: 0x0102_0304,
                },
                reqid,
                old: "198.51.100.2:10500".parse().unwrap(),
                new: "203.0.113.9:40000".parse().unwrap(),
            }
        );
        assert!(ev.is_owned());

        let (d, o, n): (Ipv6Addr, Ipv6Addr, Ipv6Addr) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            "2001:db8::3".parse().unwrap(),
        );
        let ev = parse_event(&mapping_bytes(
            AF_INET6,
            &d.octets(),
            &o.octets(),
            &n.octets(),
            1,
        ))
        .unwrap();
        let KernelEvent::Mapping {
            sa,
            old,
            new,
            reqid,
            ..
        } = ev.clone()
        else {
            panic!("{ev:?}")
        };
        assert_eq!(sa.dst, IpAddr::V6(d));
        assert_eq!(old, "[2001:db8::2]:10500".parse().unwrap());
        assert_eq!(new, "[2001:db8::3]:40000".parse().unwrap());
        assert_eq!(reqid, Reqid(1));
        assert!(!ev.is_owned(), "reqid 1 is not hip's");
    }

    #[test]
    fn expire_event_maps() {
        let p = sa();
        let XfrmMessage::AddSa(s) = sa_message(&p, false) else {
            unreachable!()
        };
        let m = XfrmMessage::Expire(netlink_packet_xfrm::monitor::ExpireMessage {
            expire: netlink_packet_xfrm::UserExpire {
                state: s.user_sa_info,
                hard: 0,
            },
        });
        let ev = event(&round_trip(&m)).unwrap();
        assert_eq!(
            ev,
            KernelEvent::Expire {
                sa: p.id(),
                hits: p.hits,
                reqid: p.reqid,
                hard: false
            }
        );
        assert!(ev.is_owned());
    }
}
