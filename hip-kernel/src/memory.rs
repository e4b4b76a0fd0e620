//! An in-memory [`KernelIpsec`]: the kernel's SA and policy databases as hip uses them,
//! with a log of every operation, a snapshot after each change, and injected failures.
//!
//! It lets the ordering rules of [`crate::install_association`],
//! [`crate::remove_association`], [`crate::rekey_association`] and the agent's own
//! sequences (locator moves, rollback after a refusal) be checked by plain `cargo test`,
//! without a kernel with ESP. Written by hand: no crate models XFRM. It models what
//! [`crate::XfrmNetlink`] guarantees and the kernel does — upserts on hip's objects,
//! [`XfrmError::ForeignConflict`] on anyone else's, `ESRCH` for a missing SA to move, the
//! sequence numbers carried over by a move (which may also change, add or remove UDP
//! encapsulation), `EINVAL` for an update that adds or removes encapsulation (the
//! kernel's `UPDSA` cannot), larval SAs from `ALLOCSPI`, and policy
//! lookup by priority (the lowest number wins, as in `xfrm_policy_lookup_bytype`) — and
//! nothing else: no packets, no lifetimes, no events.
//!
//! Only with the `memory` feature (or in this crate's tests).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::Mutex,
};

use crate::{
    Events, KernelIpsec, LocatorPair, Owned, PolicyAction, PolicyDir, PolicyEntry, PolicyId,
    PolicyParams, Reqid, SaEntry, SaId, SaParams, Spi, XfrmError, owner,
};

/// One operation as the in-memory kernel saw it (successful or refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `XFRM_MSG_ALLOCSPI`: a larval SA.
    AllocSpi(SaId),
    /// An SA added or brought up to date.
    AddSa(SaId),
    /// An SA updated in place.
    UpdateSa(SaId),
    /// An SA moved to new addresses (`from` → `to`).
    MoveSa {
        /// The old SA.
        from: SaId,
        /// The new one.
        to: SaId,
    },
    /// An SA deleted (or found absent).
    DelSa(SaId),
    /// A policy added or replaced.
    AddPolicy(PolicyId),
    /// A policy deleted (or found absent).
    DelPolicy(PolicyId),
}

/// An SA as the in-memory kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemSa {
    /// Its parameters; `None` while larval (from `ALLOCSPI`, not yet completed).
    pub params: Option<SaParams>,
    /// Its outer addresses.
    pub locators: LocatorPair,
    /// Its reqid (a foreign one for objects seeded with [`MemoryIpsec::seed_foreign_sa`]).
    pub reqid: Reqid,
    /// The last sequence number sent (outbound SAs).
    pub seq_out: u32,
    /// The highest sequence number received (inbound SAs).
    pub seq_in: u32,
}

/// The databases at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// SAs by (destination, SPI).
    pub sas: HashMap<SaId, MemSa>,
    /// Policies by selector and direction.
    pub policies: HashMap<PolicyId, PolicyParams>,
}

/// What the kernel would do with a packet between two HITs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No policy matches, or an allow policy wins: the packet goes (or is taken) in
    /// clear text.
    Clear,
    /// A block policy wins: dropped.
    Block,
    /// An IPsec policy wins and a complete SA matches its template: protected.
    Protected,
    /// An IPsec policy wins but no complete SA matches: dropped (with an ACQUIRE).
    NoSa,
}

impl Snapshot {
    /// The verdict for a packet from `src` to `dst` in direction `dir`, as the kernel's
    /// policy lookup gives it: among matching policies the lowest priority number wins;
    /// for `Out`, the SA is found by the template's outer addresses and reqid; for `In`,
    /// any complete SA from the template's source to its destination with that reqid.
    pub fn verdict(&self, dir: PolicyDir, src: Ipv6Addr, dst: Ipv6Addr) -> Verdict {
        let best = self
            .policies
            .values()
            .filter(|p| p.id.dir == dir && p.id.src.contains(src) && p.id.dst.contains(dst))
            .min_by_key(|p| p.priority);
        match best.map(|p| p.action) {
            None | Some(PolicyAction::Allow) => Verdict::Clear,
            Some(PolicyAction::Block) => Verdict::Block,
            Some(PolicyAction::Ipsec { locators, reqid }) => {
                let found = self.sas.values().any(|s| {
                    s.params.is_some()
                        && s.locators == locators
                        && s.reqid == reqid
                        && s.params.as_ref().is_some_and(|p| {
                            // BEET: the SA's inner addresses are the HITs.
                            (p.hits.src, p.hits.dst) == (src, dst)
                        })
                });
                if found {
                    Verdict::Protected
                } else {
                    Verdict::NoSa
                }
            }
        }
    }

    /// True unless our traffic with the peer would pass in clear text: `Out` from
    /// `local` to `peer` and `In` from `peer` to `local` are each blocked or demand ESP.
    pub fn closed_between(&self, local: Ipv6Addr, peer: Ipv6Addr) -> bool {
        self.verdict(PolicyDir::Out, local, peer) != Verdict::Clear
            && self.verdict(PolicyDir::In, peer, local) != Verdict::Clear
    }

    /// True if a complete SA between the two HITs (either way) is installed.
    pub fn keyed_between(&self, a: Ipv6Addr, b: Ipv6Addr) -> bool {
        self.sas.values().any(|s| {
            s.params.as_ref().is_some_and(|p| {
                (p.hits.src, p.hits.dst) == (a, b) || (p.hits.src, p.hits.dst) == (b, a)
            })
        })
    }
}

/// When an injected failure strikes.
#[derive(Clone, Debug)]
struct Fault {
    /// Fails the `nth` (0-based) operation from now that `matches`.
    nth: usize,
    matches: fn(&Op) -> bool,
    errno: i32,
}

#[derive(Debug, Default)]
struct Inner {
    db: Snapshot,
    log: Vec<(Op, Result<(), i32>)>,
    history: Vec<(Op, Snapshot)>,
    faults: Vec<Fault>,
    next_spi: Spi,
}

/// The in-memory kernel. Cheap to create; one per test.
#[derive(Debug)]
pub struct MemoryIpsec {
    inner: Mutex<Inner>,
}

impl Default for MemoryIpsec {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryIpsec {
    /// An empty kernel.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                next_spi: 0x0100_0000,
                ..Inner::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock already failed; the data is still
        // what it was.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the `nth` operation (0-based, counted from now) that `matches` fail with
    /// `errno`, changing nothing. Several faults may be pending.
    pub fn fail(&self, nth: usize, matches: fn(&Op) -> bool, errno: i32) {
        self.lock().faults.push(Fault {
            nth,
            matches,
            errno,
        });
    }

    /// Makes the `nth` operation from now, whatever it is, fail with `errno`.
    pub fn fail_nth(&self, nth: usize, errno: i32) {
        self.fail(nth, |_| true, errno);
    }

    /// Every operation so far, with `Err(errno)` for refused ones.
    pub fn log(&self) -> Vec<(Op, Result<(), i32>)> {
        self.lock().log.clone()
    }

    /// The successful operations so far.
    pub fn ops(&self) -> Vec<Op> {
        self.lock()
            .log
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(o, _)| o.clone())
            .collect()
    }

    /// The databases after each successful change, oldest first.
    pub fn history(&self) -> Vec<(Op, Snapshot)> {
        self.lock().history.clone()
    }

    /// The databases now.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().db.clone()
    }

    /// Forgets the log and history (the databases stay).
    pub fn clear_log(&self) {
        let mut g = self.lock();
        g.log.clear();
        g.history.clear();
    }

    /// Puts an SA that is not hip's (reqid outside hip's range) at `id`.
    pub fn seed_foreign_sa(&self, id: SaId, src: IpAddr) {
        self.lock().db.sas.insert(
            id,
            MemSa {
                params: None,
                locators: LocatorPair { src, dst: id.dst },
                reqid: Reqid(1),
                seq_out: 0,
                seq_in: 0,
            },
        );
    }

    /// Puts a policy that is not hip's (priority outside hip's range) at `id`.
    pub fn seed_foreign_policy(&self, id: PolicyId) {
        self.lock().db.policies.insert(
            id,
            PolicyParams {
                id,
                action: PolicyAction::Allow,
                priority: 100,
            },
        );
    }

    /// Sets an SA's sequence counters, as traffic through it would.
    pub fn set_seq(&self, id: &SaId, seq_out: u32, seq_in: u32) {
        if let Some(s) = self.lock().db.sas.get_mut(id) {
            s.seq_out = seq_out;
            s.seq_in = seq_in;
        }
    }

    /// Deletes an SA behind hip's back (as an operator's `ip xfrm state delete` would).
    pub fn remove_behind_back(&self, id: &SaId) {
        self.lock().db.sas.remove(id);
    }

    /// Runs one operation: checks the pending faults, then applies `f` to the databases;
    /// logs the outcome and, on success, the snapshot after it.
    fn apply<T>(
        &self,
        op: Op,
        what: &str,
        f: impl FnOnce(&mut Snapshot) -> Result<T, XfrmError>,
    ) -> Result<T, XfrmError> {
        let mut g = self.lock();
        let mut struck = None;
        for (i, fault) in g.faults.iter_mut().enumerate() {
            if (fault.matches)(&op) {
                if fault.nth == 0 {
                    struck = Some((i, fault.errno));
                    break;
                }
                fault.nth -= 1;
            }
        }
        if let Some((i, errno)) = struck {
            g.faults.remove(i);
            g.log.push((op, Err(errno)));
            return Err(XfrmError::kernel(what, errno));
        }
        let mut db = g.db.clone();
        match f(&mut db) {
            Ok(v) => {
                g.db = db.clone();
                g.log.push((op.clone(), Ok(())));
                g.history.push((op, db));
                Ok(v)
            }
            Err(e) => {
                g.log.push((op, Err(e.errno().unwrap_or(0))));
                Err(e)
            }
        }
    }
}

fn foreign_sa(db: &Snapshot, id: &SaId) -> Result<(), XfrmError> {
    match db.sas.get(id) {
        Some(s) if !owner::is_owned_reqid(s.reqid.0) => Err(XfrmError::ForeignConflict {
            what: format!("SA {} spi {:#x}", id.dst, id.spi),
        }),
        _ => Ok(()),
    }
}

fn foreign_policy(db: &Snapshot, id: &PolicyId) -> Result<(), XfrmError> {
    match db.policies.get(id) {
        Some(p) if !owner::is_owned_priority(p.priority) => Err(XfrmError::ForeignConflict {
            what: format!("policy {id:?}"),
        }),
        _ => Ok(()),
    }
}

fn complete(sa: &SaParams, seq_out: u32, seq_in: u32) -> MemSa {
    MemSa {
        params: Some(sa.clone()),
        locators: sa.locators,
        reqid: sa.reqid,
        seq_out,
        seq_in,
    }
}

impl KernelIpsec for MemoryIpsec {
    async fn alloc_spi(&self, locators: LocatorPair, reqid: Reqid) -> Result<Spi, XfrmError> {
        let spi = {
            let mut g = self.lock();
            let s = g.next_spi;
            g.next_spi += 1;
            s
        };
        let id = SaId {
            dst: locators.dst,
            spi,
        };
        self.apply(Op::AllocSpi(id), "allocspi", |db| {
            db.sas.insert(
                id,
                MemSa {
                    params: None,
                    locators,
                    reqid,
                    seq_out: 0,
                    seq_in: 0,
                },
            );
            Ok(spi)
        })
    }

    async fn add_sa(&self, sa: &SaParams) -> Result<(), XfrmError> {
        sa.check()?;
        let id = sa.id();
        self.apply(Op::AddSa(id), "add SA", |db| {
            foreign_sa(db, &id)?;
            let (o, i) = db.sas.get(&id).map_or((0, 0), |s| (s.seq_out, s.seq_in));
            db.sas.insert(id, complete(sa, o, i));
            Ok(())
        })
    }

    async fn update_sa(&self, sa: &SaParams) -> Result<(), XfrmError> {
        sa.check()?;
        let id = sa.id();
        self.apply(Op::UpdateSa(id), "update SA", |db| {
            foreign_sa(db, &id)?;
            let Some(cur) = db.sas.get(&id) else {
                return Err(XfrmError::kernel("update SA", libc::ESRCH));
            };
            // A larval SA is replaced whole; a complete one keeps its encapsulation kind.
            if let Some(p) = &cur.params
                && p.encap.is_some() != sa.encap.is_some()
            {
                return Err(crate::netlink::encap_change_refused(format!("update {id}")));
            }
            let m = complete(sa, cur.seq_out, cur.seq_in);
            db.sas.insert(id, m);
            Ok(())
        })
    }

    async fn move_sa(&self, old: &SaId, new: &SaParams) -> Result<(), XfrmError> {
        new.check()?;
        let to = new.id();
        self.apply(
            Op::MoveSa { from: *old, to },
            &format!("move {}", old.dst),
            |db| {
                foreign_sa(db, old)?;
                let Some(cur) = db.sas.remove(old) else {
                    return Err(XfrmError::kernel("move", libc::ESRCH));
                };
                if to != *old {
                    foreign_sa(db, &to)?;
                }
                db.sas.insert(to, complete(new, cur.seq_out, cur.seq_in));
                Ok(())
            },
        )
    }

    async fn del_sa(&self, id: &SaId) -> Result<bool, XfrmError> {
        self.apply(Op::DelSa(*id), "delete SA", |db| {
            foreign_sa(db, id)?;
            Ok(db.sas.remove(id).is_some())
        })
    }

    async fn add_policy(&self, p: &PolicyParams) -> Result<(), XfrmError> {
        p.check()?;
        self.apply(Op::AddPolicy(p.id), "add policy", |db| {
            foreign_policy(db, &p.id)?;
            db.policies.insert(p.id, *p);
            Ok(())
        })
    }

    async fn del_policy(&self, id: &PolicyId) -> Result<bool, XfrmError> {
        self.apply(Op::DelPolicy(*id), "delete policy", |db| {
            foreign_policy(db, id)?;
            Ok(db.policies.remove(id).is_some())
        })
    }

    async fn list_owned(&self) -> Result<Owned, XfrmError> {
        let g = self.lock();
        let sas =
            g.db.sas
                .iter()
                .filter(|(_, s)| owner::is_owned_reqid(s.reqid.0))
                .map(|(id, s)| SaEntry {
                    id: *id,
                    src: s.locators.src,
                    hits: s.params.as_ref().map(|p| p.hits),
                    reqid: s.reqid,
                    beet: s.params.is_some(),
                    transform: s.params.as_ref().map(|p| p.keys.transform()),
                    lifetimes: s
                        .params
                        .as_ref()
                        .map_or(crate::Lifetimes::UNLIMITED, |p| p.lifetimes),
                    bytes: 0,
                    packets: 0,
                    replay_window: s.params.as_ref().map_or(0, |p| p.replay_window),
                    seq_out: s.seq_out,
                    seq_in: s.seq_in,
                    encap: s.params.as_ref().and_then(|p| p.encap),
                    other_encap_type: None,
                })
                .collect();
        let policies =
            g.db.policies
                .values()
                .filter(|p| owner::is_owned_priority(p.priority))
                .enumerate()
                .map(|(i, p)| PolicyEntry {
                    params: *p,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                })
                .collect();
        Ok(Owned { sas, policies })
    }

    fn subscribe(&self) -> Result<Events, XfrmError> {
        Err(XfrmError::InvalidParam(
            "the in-memory kernel sends no events".into(),
        ))
    }
}
