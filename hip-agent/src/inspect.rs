//! What the operator's inspection commands show (`hip-agent xfrm`, `hip-agent flows`):
//! the same views whether the daemon answers over its control socket or the CLI reads
//! the kernel itself (`--direct`, for hosts where no agent runs).

use std::{collections::BTreeMap, net::Ipv6Addr};

use hip_datapath::Flow;
use hip_kernel::{Owned, PolicyAction, PolicyDir, PolicyEntry, SaEntry};
use serde::{Deserialize, Serialize};

/// hip's XFRM objects of one association (one reqid).
#[derive(Debug, Serialize, Deserialize)]
pub struct AssocView {
    /// The association's reqid (hip's band, `hip_kernel::owner`).
    pub reqid: u32,
    /// Our HIT (from the outbound policy).
    pub local_hit: Option<Ipv6Addr>,
    /// The peer's HIT (from the outbound policy).
    pub peer_hit: Option<Ipv6Addr>,
    /// The peer's SIP URI, if the known-HITs pool binds its HIT to one.
    pub sip_uri: Option<String>,
    /// Its SAs.
    pub sas: Vec<SaView>,
    /// Its IPsec policies and the per-peer block policies of its peer HIT.
    pub policies: Vec<PolicyEntry>,
}

impl AssocView {
    fn new(reqid: u32) -> Self {
        Self {
            reqid,
            local_hit: None,
            peer_hit: None,
            sip_uri: None,
            sas: vec![],
            policies: vec![],
        }
    }
}

/// One SA with its direction as seen from this host.
#[derive(Debug, Serialize, Deserialize)]
pub struct SaView {
    /// `"in"`, `"out"`, or `None` (larval SA, or no policy to tell).
    pub direction: Option<String>,
    /// The SA as the kernel reports it.
    #[serde(flatten)]
    pub sa: SaEntry,
}

/// What `hip-agent xfrm --json` prints, whether the daemon or the kernel answered.
#[derive(Debug, Serialize, Deserialize)]
pub struct XfrmView {
    /// hip's objects grouped by association.
    pub associations: Vec<AssocView>,
    /// hip's policies that belong to no association (per-peer blocks left alone, guard).
    pub other_policies: Vec<PolicyEntry>,
}

/// Groups hip's objects by association (reqid; block policies join by peer HIT) and
/// names each peer's SIP URI through `uris`.
pub fn xfrm_view(o: Owned, uris: impl Fn(&Ipv6Addr) -> Option<String>) -> XfrmView {
    let mut by: BTreeMap<u32, AssocView> = BTreeMap::new();
    let mut others = Vec::new();
    for p in &o.policies {
        if let PolicyAction::Ipsec { reqid, .. } = p.params.action {
            let a = by.entry(reqid.0).or_insert_with(|| AssocView::new(reqid.0));
            if p.params.id.dir == PolicyDir::Out {
                a.local_hit = Some(p.params.id.src.addr);
                a.peer_hit = Some(p.params.id.dst.addr);
            }
            a.policies.push(p.clone());
        }
    }
    for s in o.sas {
        let a = by
            .entry(s.reqid.0)
            .or_insert_with(|| AssocView::new(s.reqid.0));
        let direction = match (s.hits, a.local_hit) {
            (Some(h), Some(l)) if h.src == l => Some("out".to_owned()),
            (Some(h), Some(l)) if h.dst == l => Some("in".to_owned()),
            _ => None,
        };
        a.sas.push(SaView { direction, sa: s });
    }
    // Block policies carry no reqid: attach a per-peer block (a /128 on one side) to the
    // association with that peer HIT.
    for p in o.policies {
        if matches!(p.params.action, PolicyAction::Ipsec { .. }) {
            continue;
        }
        let (s, d) = (p.params.id.src, p.params.id.dst);
        let peer = match p.params.id.dir {
            PolicyDir::Out if d.len == 128 && s.len == 0 => Some(d.addr),
            PolicyDir::In if s.len == 128 && d.len == 0 => Some(s.addr),
            _ => None,
        };
        match peer.and_then(|h| by.values_mut().find(|a| a.peer_hit == Some(h))) {
            Some(a) => a.policies.push(p),
            None => others.push(p),
        }
    }
    for a in by.values_mut() {
        a.sip_uri = a.peer_hit.as_ref().and_then(&uris);
    }
    XfrmView {
        associations: by.into_values().collect(),
        other_policies: others,
    }
}

/// The human form of [`XfrmView`].
pub fn xfrm_text(v: &XfrmView) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if v.associations.is_empty() && v.other_policies.is_empty() {
        out.push_str("no XFRM objects of hip's\n");
    }
    for a in &v.associations {
        let hit = |h: Option<Ipv6Addr>| h.map_or("?".to_owned(), |h| h.to_string());
        let _ = writeln!(
            out,
            "association reqid {:#x}: {} -> {}{}",
            a.reqid,
            hit(a.local_hit),
            hit(a.peer_hit),
            a.sip_uri
                .as_ref()
                .map(|u| format!(" ({u})"))
                .unwrap_or_default()
        );
        for s in &a.sas {
            let _ = writeln!(
                out,
                "  SA {:<3} {} -> {} spi {:#010x} {} {} packets {} bytes",
                s.direction.as_deref().unwrap_or("?"),
                s.sa.src,
                s.sa.id.dst,
                s.sa.id.spi,
                s.sa.transform.map_or("larval", |t| t.name()),
                s.sa.packets,
                s.sa.bytes
            );
        }
        for p in &a.policies {
            let _ = writeln!(
                out,
                "  policy {} {:?} priority {:#x}",
                p.params.id, p.params.action, p.params.priority
            );
        }
    }
    for p in &v.other_policies {
        let _ = writeln!(
            out,
            "policy {} {:?} priority {:#x}",
            p.params.id, p.params.action, p.params.priority
        );
    }
    out
}

/// The human form of a flow table.
pub fn flows_text(flows: &[Flow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if flows.is_empty() {
        out.push_str("no flows\n");
    }
    for f in flows {
        let _ = writeln!(
            out,
            "[{}]:{} -> [{}]:{} ssrc {:08x} pt {}: {} pkts {} bytes, lost {}, jitter {:.2} ms; spi {:08x} via {} ({})",
            f.src_hit,
            f.src_port,
            f.dst_hit,
            f.dst_port,
            f.ssrc,
            f.payload_type,
            f.packets,
            f.bytes,
            f.lost,
            f.jitter_ms,
            f.spi,
            f.locator.map_or_else(|| "-".into(), |l| l.to_string()),
            f.via,
        );
    }
    out
}
