//! One HIP association in the kernel: two BEET SAs and the policies for both directions,
//! installed and removed in an order that never lets HIT traffic out in clear text.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr},
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    EspKeyPair, HitPair, KernelIpsec, Lifetimes, LocatorPair, Owned, PolicyAction, PolicyDir,
    PolicyId, PolicyParams, Prefix, Reqid, SaParams, Spi, UdpEncap, XfrmError, owner,
};

/// How traffic to a peer HIT is kept from leaving in clear text while its SAs are
/// missing (before install, during removal, after a hard expiry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailClosed {
    /// Each association brings two block policies for its peer HIT (out: to the peer
    /// HIT from anywhere; in: from the peer HIT to anywhere), installed first and removed
    /// last. After removal nothing of the association stays in the kernel.
    #[default]
    PerPeer,
    /// The agent keeps one prefix-wide [`Guard`] (block 2001:20::/28 both ways, allow its
    /// own HITs); associations add exactly 2 SAs + 2 policies.
    Guard,
}

/// Everything the kernel needs for one association (the agent maps HIP's
/// `Established` event into this).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssociationParams {
    /// Our HIT.
    pub local_hit: Ipv6Addr,
    /// The peer's HIT.
    pub peer_hit: Ipv6Addr,
    /// Our locator.
    pub local_locator: IpAddr,
    /// The peer's locator.
    pub peer_locator: IpAddr,
    /// SPI of the inbound SA (ours, from [`KernelIpsec::alloc_spi`], sent in ESP_INFO).
    pub spi_in: Spi,
    /// SPI of the outbound SA (the peer's ESP_INFO).
    pub spi_out: Spi,
    /// Keys of both directions.
    pub keys: EspKeyPair,
    /// The association's reqid (from a [`ReqidPool`]).
    pub reqid: Reqid,
    /// Anti-replay window.
    pub replay_window: u32,
    /// SA lifetimes.
    pub lifetimes: Lifetimes,
    /// Fail-closed scheme.
    #[serde(default)]
    pub fail_closed: FailClosed,
    /// UDP encapsulation of both SAs (RFC 3948 ESP-in-UDP, as RFC 9028 runs ESP through
    /// NATs); `None`: plain ESP. Seen from **our** side: `sport` is our local UDP port
    /// (where our encapsulation socket listens), `dport` the peer's UDP port as we reach
    /// it (behind a NAT: the port the NAT mapped, with `peer_locator` the NAT's public
    /// address). The outbound SA takes it as is, the inbound SA swapped
    /// ([`UdpEncap::reversed`]: the packets come from the peer's port to ours).
    #[serde(default)]
    pub encap: Option<UdpEncap>,
}

impl AssociationParams {
    fn hits_out(&self) -> HitPair {
        HitPair {
            src: self.local_hit,
            dst: self.peer_hit,
        }
    }

    fn locators_out(&self) -> LocatorPair {
        LocatorPair {
            src: self.local_locator,
            dst: self.peer_locator,
        }
    }

    /// The inbound SA (peer → us).
    pub fn sa_in(&self) -> SaParams {
        SaParams {
            locators: self.locators_out().reversed(),
            hits: self.hits_out().reversed(),
            spi: self.spi_in,
            reqid: self.reqid,
            keys: self.keys.inbound.clone(),
            replay_window: self.replay_window,
            lifetimes: self.lifetimes,
            encap: self.encap.map(UdpEncap::reversed),
        }
    }

    /// The outbound SA (us → peer).
    pub fn sa_out(&self) -> SaParams {
        SaParams {
            locators: self.locators_out(),
            hits: self.hits_out(),
            spi: self.spi_out,
            reqid: self.reqid,
            keys: self.keys.outbound.clone(),
            replay_window: self.replay_window,
            lifetimes: self.lifetimes,
            encap: self.encap,
        }
    }

    /// The IPsec policies: `dir out` local HIT → peer HIT and `dir in` back.
    pub fn ipsec_policies(&self) -> [PolicyParams; 2] {
        let (l, p) = (Prefix::host(self.local_hit), Prefix::host(self.peer_hit));
        [
            PolicyParams {
                id: PolicyId {
                    dir: PolicyDir::Out,
                    src: l,
                    dst: p,
                },
                action: PolicyAction::Ipsec {
                    locators: self.locators_out(),
                    reqid: self.reqid,
                },
                priority: owner::PRIORITY_IPSEC,
            },
            PolicyParams {
                id: PolicyId {
                    dir: PolicyDir::In,
                    src: p,
                    dst: l,
                },
                action: PolicyAction::Ipsec {
                    locators: self.locators_out().reversed(),
                    reqid: self.reqid,
                },
                priority: owner::PRIORITY_IPSEC,
            },
        ]
    }

    /// The per-peer block policies ([`FailClosed::PerPeer`]), empty otherwise.
    pub fn block_policies(&self) -> Vec<PolicyParams> {
        if self.fail_closed != FailClosed::PerPeer {
            return vec![];
        }
        let p = Prefix::host(self.peer_hit);
        vec![
            PolicyParams {
                id: PolicyId {
                    dir: PolicyDir::Out,
                    src: Prefix::ANY,
                    dst: p,
                },
                action: PolicyAction::Block,
                priority: owner::PRIORITY_BLOCK_PEER,
            },
            PolicyParams {
                id: PolicyId {
                    dir: PolicyDir::In,
                    src: p,
                    dst: Prefix::ANY,
                },
                action: PolicyAction::Block,
                priority: owner::PRIORITY_BLOCK_PEER,
            },
        ]
    }

    /// All policies of the association.
    pub fn policies(&self) -> Vec<PolicyParams> {
        let mut v = self.block_policies();
        v.extend(self.ipsec_policies());
        v
    }

    fn check(&self) -> Result<(), XfrmError> {
        if self.local_hit == self.peer_hit {
            return Err(XfrmError::InvalidParam(
                "local and peer HIT are equal".into(),
            ));
        }
        if self.keys.inbound.transform() != self.keys.outbound.transform() {
            return Err(XfrmError::InvalidParam(
                "inbound and outbound transforms differ".into(),
            ));
        }
        self.sa_in().check()?;
        self.sa_out().check()?;
        for p in self.policies() {
            p.check()?;
        }
        Ok(())
    }
}

/// Undo log of an install in progress.
enum Done {
    Policy(PolicyId),
    Sa(crate::SaId),
}

async fn undo<K: KernelIpsec>(k: &K, done: Vec<Done>) -> Result<(), XfrmError> {
    let mut first = None;
    for d in done.into_iter().rev() {
        let r = match d {
            Done::Policy(id) => k.del_policy(&id).await.map(|_| ()),
            Done::Sa(id) => k.del_sa(&id).await.map(|_| ()),
        };
        match r {
            // Not hip's: the failed step did not create it, and it is not ours to remove.
            Ok(()) | Err(XfrmError::ForeignConflict { .. }) => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Installs (or brings up to date: every step is an upsert) one association.
///
/// Order: block policies (with [`FailClosed::PerPeer`]), inbound SA, outbound SA, then
/// the IPsec policies. If a step fails, the steps already done are undone (including
/// the larval SA [`KernelIpsec::alloc_spi`] left for `spi_in`), so nothing stays half
/// installed; the error of the failing step is returned.
pub async fn install_association<K: KernelIpsec>(
    k: &K,
    a: &AssociationParams,
) -> Result<(), XfrmError> {
    a.check()?;
    let sa_in = a.sa_in();
    let mut done = Vec::new();
    let r = async {
        for p in a.block_policies() {
            done.push(Done::Policy(p.id));
            k.add_policy(&p).await?;
        }
        // Pushed before the attempt: a failed add must still remove the larval SA.
        done.push(Done::Sa(sa_in.id()));
        k.add_sa(&sa_in).await?;
        let sa_out = a.sa_out();
        done.push(Done::Sa(sa_out.id()));
        k.add_sa(&sa_out).await?;
        for p in a.ipsec_policies() {
            done.push(Done::Policy(p.id));
            k.add_policy(&p).await?;
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            // A block policy refused: the larval SA that ALLOCSPI left for `spi_in` goes
            // too (first, before the block policies; deleting an absent SA is fine).
            if !done.iter().any(|d| matches!(d, Done::Sa(_))) {
                done.push(Done::Sa(sa_in.id()));
            }
            match undo(k, done).await {
                Ok(()) => Err(e),
                Err(rb) => Err(XfrmError::RollbackFailed {
                    source: Box::new(e),
                    rollback: Box::new(rb),
                }),
            }
        }
    }
}

/// Installs many associations with up to `concurrency` in flight on the one netlink
/// connection (each association's steps stay in order). Returns one result per input.
pub async fn install_associations<K: KernelIpsec>(
    k: &K,
    assocs: &[AssociationParams],
    concurrency: usize,
) -> Vec<Result<(), XfrmError>> {
    futures::stream::iter(assocs.iter().map(|a| install_association(k, a)))
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// Removes an association: IPsec policies first (the block policies or the guard keep
/// the peer HIT closed), then the SAs, then the block policies. Objects already gone are
/// fine; every step is tried, the first error is returned.
pub async fn remove_association<K: KernelIpsec>(
    k: &K,
    a: &AssociationParams,
) -> Result<(), XfrmError> {
    let mut first = None;
    let mut keep = |r: Result<bool, XfrmError>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    for p in a.ipsec_policies().iter().rev() {
        keep(k.del_policy(&p.id).await);
    }
    keep(k.del_sa(&a.sa_out().id()).await);
    keep(k.del_sa(&a.sa_in().id()).await);
    for p in a.block_policies().iter().rev() {
        keep(k.del_policy(&p.id).await);
    }
    first.map_or(Ok(()), Err)
}

/// Replaces an association's SAs by new ones (new SPIs and keys, RFC 7402 §6.9 UPDATE):
/// the new inbound SA first (the peer may switch at once), then the new outbound SA,
/// then the policies (same templates: the kernel picks the SA by reqid), then the old
/// SAs are deleted. Traffic never lacks an SA, so nothing is dropped or leaked.
pub async fn rekey_association<K: KernelIpsec>(
    k: &K,
    old: &AssociationParams,
    new: &AssociationParams,
) -> Result<(), XfrmError> {
    if (old.local_hit, old.peer_hit, old.reqid) != (new.local_hit, new.peer_hit, new.reqid) {
        return Err(XfrmError::InvalidParam(
            "a rekey keeps the HITs and the reqid".into(),
        ));
    }
    if old.spi_in == new.spi_in || old.spi_out == new.spi_out {
        return Err(XfrmError::InvalidParam("a rekey needs new SPIs".into()));
    }
    install_association(k, new).await?;
    k.del_sa(&old.sa_out().id()).await?;
    k.del_sa(&old.sa_in().id()).await?;
    // Locators may have changed with the rekey (mobility); drop old policies that the new
    // association did not overwrite.
    let new_ids: HashSet<PolicyId> = new.policies().iter().map(|p| p.id).collect();
    for p in old.policies() {
        if !new_ids.contains(&p.id) {
            k.del_policy(&p.id).await?;
        }
    }
    Ok(())
}

/// The prefix-wide fail-closed guard ([`FailClosed::Guard`]): blocks all traffic to and
/// from the HIT prefix, except the host's own HITs (loopback use of a local HIT).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// Blocked prefix, normally [`Prefix::ORCHID_V2`].
    pub prefix: Prefix,
    /// The host's HITs, left open.
    pub local_hits: Vec<Ipv6Addr>,
}

impl Guard {
    /// The guard's policies.
    pub fn policies(&self) -> Vec<PolicyParams> {
        let mut v = vec![
            PolicyParams {
                id: PolicyId {
                    dir: PolicyDir::Out,
                    src: Prefix::ANY,
                    dst: self.prefix,
                },
                action: PolicyAction::Block,
                priority: owner::PRIORITY_GUARD,
            },
            PolicyParams {
                id: PolicyId {
                    dir: PolicyDir::In,
                    src: self.prefix,
                    dst: Prefix::ANY,
                },
                action: PolicyAction::Block,
                priority: owner::PRIORITY_GUARD,
            },
        ];
        for h in &self.local_hits {
            for (dir, src, dst) in [
                (PolicyDir::Out, Prefix::ANY, Prefix::host(*h)),
                (PolicyDir::In, Prefix::host(*h), Prefix::ANY),
            ] {
                v.push(PolicyParams {
                    id: PolicyId { dir, src, dst },
                    action: PolicyAction::Allow,
                    priority: owner::PRIORITY_IPSEC,
                });
            }
        }
        v
    }
}

/// Installs the guard (idempotent): the allow policies first, so the host's own HITs
/// never see a block.
pub async fn install_guard<K: KernelIpsec>(k: &K, g: &Guard) -> Result<(), XfrmError> {
    let mut ps = g.policies();
    ps.reverse();
    for p in &ps {
        k.add_policy(p).await?;
    }
    Ok(())
}

/// Removes the guard.
pub async fn remove_guard<K: KernelIpsec>(k: &K, g: &Guard) -> Result<(), XfrmError> {
    for p in g.policies() {
        k.del_policy(&p.id).await?;
    }
    Ok(())
}

/// What [`reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    /// hip SAs that matched a live association and were kept.
    pub kept_sas: usize,
    /// hip policies that matched and were kept.
    pub kept_policies: usize,
    /// Stale hip SAs removed.
    pub removed_sas: usize,
    /// Stale hip policies removed.
    pub removed_policies: usize,
}

/// Brings the kernel to exactly `live` (+ `guard`) as far as hip's objects go: removes
/// hip's SAs and policies that belong to no live association (after a crash or
/// SIGKILL), keeps the rest, then upserts the live associations so missing pieces come
/// back. Objects outside hip's ranges are not looked at.
pub async fn reconcile<K: KernelIpsec>(
    k: &K,
    live: &[AssociationParams],
    guard: Option<&Guard>,
) -> Result<ReconcileReport, XfrmError> {
    let Owned { sas, policies } = k.list_owned().await?;
    let want_sas: HashSet<(crate::SaId, Reqid)> = live
        .iter()
        .flat_map(|a| [a.sa_in(), a.sa_out()])
        .map(|s| (s.id(), s.reqid))
        .collect();
    let mut want_pols: HashSet<PolicyParams> = live.iter().flat_map(|a| a.policies()).collect();
    if let Some(g) = guard {
        want_pols.extend(g.policies());
    }
    let mut rep = ReconcileReport::default();
    // Policies first, as in remove_association: an IPsec policy must not outlive its SA
    // check window longer than needed, and blocks go last.
    let mut stale: Vec<_> = policies
        .iter()
        .filter(|p| !want_pols.contains(&p.params))
        .collect();
    stale.sort_by_key(|p| p.params.priority);
    for p in stale {
        if k.del_policy(&p.params.id).await? {
            rep.removed_policies += 1;
        }
    }
    rep.kept_policies = policies.len() - rep.removed_policies;
    for s in &sas {
        if want_sas.contains(&(s.id, s.reqid)) {
            rep.kept_sas += 1;
        } else if k.del_sa(&s.id).await? {
            rep.removed_sas += 1;
        }
    }
    if let Some(g) = guard {
        install_guard(k, g).await?;
    }
    for a in live {
        install_association(k, a).await?;
    }
    Ok(rep)
}

/// Hands out reqids of hip's range, skipping those in use.
#[derive(Clone, Debug, Default)]
pub struct ReqidPool {
    used: HashSet<Reqid>,
    next: u32,
}

impl ReqidPool {
    /// A pool that avoids the reqids of `owned` (hip's objects already in the kernel).
    pub fn from_owned(owned: &Owned) -> Self {
        let mut used: HashSet<Reqid> = owned.sas.iter().map(|s| s.reqid).collect();
        for p in &owned.policies {
            if let PolicyAction::Ipsec { reqid, .. } = p.params.action {
                used.insert(reqid);
            }
        }
        Self { used, next: 1 }
    }

    /// A fresh reqid, or `None` if all 65,536 are in use.
    pub fn alloc(&mut self) -> Option<Reqid> {
        let span = owner::REQID_LAST - owner::REQID_FIRST + 1;
        for _ in 0..span {
            let r = Reqid::hip(self.next);
            self.next = self.next.wrapping_add(1) % span;
            if self.used.insert(r) {
                return Some(r);
            }
        }
        None
    }

    /// Returns a reqid after its association is removed.
    pub fn release(&mut self, r: Reqid) {
        self.used.remove(&r);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{EspKeys, EspTransform};

    pub(crate) fn assoc() -> AssociationParams {
        let k = |b| EspKeys::new(EspTransform::AesCbc128HmacSha256, &[b; 16], &[b; 32]).unwrap();
        AssociationParams {
            local_hit: "2001:20::a".parse().unwrap(),
            peer_hit: "2001:20::b".parse().unwrap(),
            local_locator: "2001:db8::1".parse().unwrap(),
            peer_locator: "2001:db8::2".parse().unwrap(),
            spi_in: 0x1000,
            spi_out: 0x2000,
            keys: EspKeyPair {
                outbound: k(1),
                inbound: k(2),
            },
            reqid: Reqid::hip(7),
            replay_window: 32,
            lifetimes: Lifetimes::UNLIMITED,
            fail_closed: FailClosed::PerPeer,
            encap: None,
        }
    }

    #[test]
    fn directions_are_mirrored() {
        let a = assoc();
        let (i, o) = (a.sa_in(), a.sa_out());
        assert_eq!(i.locators.dst, a.local_locator);
        assert_eq!(i.hits.dst, a.local_hit);
        assert_eq!(o.locators.dst, a.peer_locator);
        assert_eq!(i.keys, a.keys.inbound);
        assert_eq!(a.policies().len(), 4);
        let g = AssociationParams {
            fail_closed: FailClosed::Guard,
            ..a
        };
        assert_eq!(g.policies().len(), 2);
    }

    #[test]
    fn encapsulation_is_swapped_for_the_inbound_sa_and_optional_in_json() {
        let a = AssociationParams {
            encap: Some(UdpEncap {
                sport: 10500,
                dport: 40000,
            }),
            ..assoc()
        };
        assert_eq!(a.sa_out().encap, a.encap);
        assert_eq!(
            a.sa_in().encap,
            Some(UdpEncap {
                sport: 40000,
                dport: 10500
            })
        );
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v["encap"],
            serde_json::json!({"sport": 10500, "dport": 40000})
        );
        // Specs written before encapsulation existed still read, as plain ESP.
        let mut v = serde_json::to_value(assoc()).unwrap();
        v.as_object_mut().unwrap().remove("encap");
        let back: AssociationParams = serde_json::from_value(v).unwrap();
        assert_eq!(back, assoc());
    }

    #[test]
    fn bad_associations_are_refused() {
        let mut a = assoc();
        a.reqid = Reqid(5);
        assert!(a.check().is_err());
        let mut a = assoc();
        a.peer_hit = a.local_hit;
        assert!(a.check().is_err());
    }

    #[test]
    fn reqid_pool_skips_used() {
        let mut owned = Owned::default();
        owned.policies.push(crate::PolicyEntry {
            params: assoc().ipsec_policies()[0],
            index: 0,
        });
        let mut p = ReqidPool::from_owned(&owned);
        let got: Vec<Reqid> = (0..8).map(|_| p.alloc().unwrap()).collect();
        assert!(!got.contains(&Reqid::hip(7)));
        assert!(got.iter().all(|r| r.is_hip()));
    }
}
