//! Kernel offload of established HIP associations: the XFRM BEET-mode ESP SAs and
//! policies (`hip-kernel`), the HIT address and routes, and the eBPF datapath's maps
//! (`hip-datapath`). The agent never touches a media packet: after [`Offload::install`]
//! the kernel carries RTP between the HITs.
//!
//! Start-up ([`Offload::start`]) checks the kernel (XFRM over netlink, ESP, BPF) and says
//! exactly what is missing, then reconciles: whatever a killed earlier run left of hip's
//! objects is removed (live associations do not survive a restart: their keys were in the
//! dead process's memory), foreign objects are never touched.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use hip_datapath::{
    AssocState, AssociationSpec, Datapath, DatapathError, DatapathOptions, Flow, LocatorState,
    MediaConfig, PeerLocator,
};
use hip_kernel::{
    AssociationParams, EspKeyPair, EspKeys, EspTransform, FailClosed, Guard, KernelEvent,
    KernelIpsec, Lifetimes, LocatorPair, Prefix, Reqid, ReqidPool, SaId, UdpEncap, XfrmError,
    XfrmNetlink,
};
use hip_proto::{
    Hit,
    endpoint::{Established, Rekeyed, SpiAllocator, UdpPorts},
    esp::EspSuite,
};
use serde::Serialize;

use crate::config::Config;

/// Errors of the offload subsystem.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// The kernel is missing something hip needs; the message says what and what to do.
    #[error("kernel check failed: {0}")]
    KernelCheck(String),
    /// An XFRM or rtnetlink operation failed.
    #[error(transparent)]
    Xfrm(#[from] XfrmError),
    /// The eBPF datapath failed.
    #[error("eBPF datapath: {0}")]
    Datapath(#[from] DatapathError),
    /// HIP negotiated something the kernel layer does not implement.
    #[error("ESP transform {0:?} has no kernel mapping")]
    Transform(EspSuite),
    /// No association with that peer is installed.
    #[error("no association with {0} is installed")]
    NotInstalled(Hit),
}

/// The HIP ESP suite as the kernel layer names it (RFC 7402 §5.1.2 IDs on both sides).
pub fn kernel_transform(s: EspSuite) -> Result<EspTransform, OffloadError> {
    EspTransform::from_suite_id(s.id()).ok_or(OffloadError::Transform(s))
}

fn v6(h: Hit) -> Ipv6Addr {
    Ipv6Addr::from(h.0)
}

/// What one installed association looks like to operators (`hip-agent assoc --json`).
#[derive(Clone, Debug, Serialize)]
pub struct Installed {
    /// XFRM reqid (hip's range).
    pub reqid: u32,
    /// Inbound SA's SPI.
    pub spi_in: u32,
    /// Outbound SA's SPI.
    pub spi_out: u32,
    /// Kernel transform name.
    pub transform: &'static str,
    /// Outer addresses.
    pub local_locator: IpAddr,
    /// Outer addresses.
    pub peer_locator: IpAddr,
    /// The SAs' UDP encapsulation (RFC 3948, for HIP over UDP through a NAT): our port as
    /// `sport`, the peer's as `dport`; absent for plain ESP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encap: Option<UdpEncap>,
    /// How long each part of the install took, in microseconds (where a call's kernel
    /// programming time goes; `hip-call-bench` reports it). Absent after a rekey or a
    /// move, which replace the SAs without a new install.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_us: Option<InstallSplit>,
}

/// The parts of [`Offload::install`], in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct InstallSplit {
    /// SAs and policies (netlink, `hip_kernel::install_association`).
    pub xfrm: u64,
    /// The route to the peer's HIT (rtnetlink).
    pub route: u64,
    /// The datapath's maps (association, locator, SPI entries).
    pub datapath: u64,
}

/// Reserves inbound SPIs in the kernel for the HIP endpoint (`XFRM_MSG_ALLOCSPI`), so that
/// the SPI HIP announces in ESP_INFO is one the kernel will accept for the SA.
///
/// The endpoint calls this synchronously from inside the driver task; the netlink request
/// runs on the runtime through `block_in_place` (the daemon's runtime is multi-threaded).
pub struct KernelSpis {
    xfrm: Arc<XfrmNetlink>,
    reqids: Arc<Mutex<ReqidPool>>,
    by_spi: Arc<Mutex<HashMap<u32, (Reqid, LocatorPair)>>>,
    handle: tokio::runtime::Handle,
    local_locator: Option<IpAddr>,
}

impl SpiAllocator for KernelSpis {
    fn allocate(&mut self, _local: Hit, _peer: Hit, peer_locator: IpAddr) -> Result<u32, String> {
        let local = match self.local_locator {
            Some(l) => l,
            None => crate::hip_driver::source_for(peer_locator).map_err(|e| e.to_string())?,
        };
        let locators = LocatorPair {
            src: peer_locator,
            dst: local,
        };
        let reqid = self
            .reqids
            .lock()
            .expect("reqid pool")
            .alloc()
            .ok_or("hip's reqid range is exhausted")?;
        let xfrm = self.xfrm.clone();
        let handle = self.handle.clone();
        let r = tokio::task::block_in_place(move || {
            handle.block_on(async move { xfrm.alloc_spi(locators, reqid).await })
        });
        match r {
            Ok(spi) => {
                self.by_spi
                    .lock()
                    .expect("spi map")
                    .insert(spi, (reqid, locators));
                Ok(spi)
            }
            Err(e) => {
                self.reqids.lock().expect("reqid pool").release(reqid);
                Err(e.to_string())
            }
        }
    }

    fn release(&mut self, spi: u32) {
        if let Some((reqid, locators)) = self.by_spi.lock().expect("spi map").remove(&spi) {
            self.reqids.lock().expect("reqid pool").release(reqid);
            let xfrm = self.xfrm.clone();
            // The larval SA would expire by itself after 30 s; remove it now.
            self.handle.spawn(async move {
                let _ = xfrm
                    .del_sa(&SaId {
                        dst: locators.dst,
                        spi,
                    })
                    .await;
            });
        }
    }
}

/// The kernel side of the agent.
pub struct Offload {
    xfrm: Arc<XfrmNetlink>,
    routes: hip_kernel::HitRoutes,
    reqids: Arc<Mutex<ReqidPool>>,
    by_spi: Arc<Mutex<HashMap<u32, (Reqid, LocatorPair)>>>,
    installed: HashMap<Hit, AssociationParams>,
    /// A rekey whose new outbound SA waits for `RekeyCompleted` (RFC 7402 §3.3.2).
    pending_rekey: HashMap<Hit, AssociationParams>,
    datapath: Option<Datapath>,
    events: Option<hip_kernel::Events>,
    local_hit: Ipv6Addr,
    local_locator: Option<IpAddr>,
    fail_closed: FailClosed,
    guard: Option<Guard>,
    replay_window: u32,
    lifetimes: Lifetimes,
}

impl Offload {
    /// Checks the kernel, reconciles hip's leftovers, puts our HIT on `lo`, installs the
    /// prefix guard if configured, and loads the eBPF datapath.
    pub async fn start(cfg: &Config, local_hit: Hit) -> Result<Self, OffloadError> {
        let xfrm = Arc::new(XfrmNetlink::new().map_err(|e| {
            OffloadError::KernelCheck(format!(
                "cannot open an XFRM netlink socket ({e}): the kernel needs CONFIG_XFRM_USER and the agent CAP_NET_ADMIN"
            ))
        })?);
        probe_esp(&xfrm).await?;
        let local_hit = v6(local_hit);
        let guard = (cfg.kernel.fail_closed == FailClosed::Guard).then(|| Guard {
            prefix: Prefix::ORCHID_V2,
            local_hits: vec![local_hit],
        });
        let report = hip_kernel::reconcile(&*xfrm, &[], guard.as_ref()).await?;
        if report.removed_sas + report.removed_policies > 0 {
            tracing::warn!(
                sas = report.removed_sas,
                policies = report.removed_policies,
                "removed what an earlier run left in the kernel"
            );
        }
        let routes = hip_kernel::HitRoutes::new()?;
        routes.add_local_hit(local_hit).await?;
        let events = match xfrm.subscribe() {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!("no XFRM event subscription (no rekey on soft expiry): {e}");
                None
            }
        };
        let datapath = if cfg.datapath_enabled() {
            let ports = cfg
                .datapath
                .port_range()
                .map_err(OffloadError::KernelCheck)?;
            let opts = DatapathOptions {
                interfaces: cfg.datapath.interfaces.clone(),
                pin_dir: cfg.datapath.pin_dir.clone(),
                media: MediaConfig {
                    guard: cfg.datapath.media_guard,
                    ports,
                    // UDP-encapsulated ESP is counted on the HIP-over-UDP port, if any.
                    esp_udp_port: match cfg.hip.udp {
                        crate::config::UdpMode::Never => 0,
                        _ => cfg.hip.udp_port,
                    },
                    ..MediaConfig::default()
                },
            };
            Some(Datapath::start(&opts).map_err(|e| match e {
                DatapathError::ObjectMissing => OffloadError::KernelCheck(
                    "this hip-agent build has no eBPF object: build it with `cargo xtask build-ebpf`, or set [datapath] enabled = false".into(),
                ),
                e @ DatapathError::ObjectStale(_) => OffloadError::KernelCheck(format!(
                    "{e}; or set [datapath] enabled = false"
                )),
                e => OffloadError::KernelCheck(format!(
                    "loading the eBPF datapath failed ({e}): the kernel needs BPF and tc (clsact/tcx) support and the agent CAP_BPF + CAP_NET_ADMIN"
                )),
            })?)
        } else {
            None
        };
        Ok(Self {
            xfrm,
            routes,
            reqids: Arc::new(Mutex::new(ReqidPool::default())),
            by_spi: Arc::new(Mutex::new(HashMap::new())),
            installed: HashMap::new(),
            pending_rekey: HashMap::new(),
            datapath,
            events,
            local_hit,
            local_locator: cfg.hip.locator,
            fail_closed: cfg.kernel.fail_closed,
            guard,
            replay_window: cfg.kernel.replay_window,
            lifetimes: cfg.kernel.lifetimes(),
        })
    }

    /// The SPI allocator to give the HIP endpoint.
    pub fn spi_allocator(&self) -> KernelSpis {
        KernelSpis {
            xfrm: self.xfrm.clone(),
            reqids: self.reqids.clone(),
            by_spi: self.by_spi.clone(),
            handle: tokio::runtime::Handle::current(),
            local_locator: self.local_locator,
        }
    }

    fn keys(suite: EspSuite, k: &hip_proto::esp::EspKeys) -> Result<EspKeys, OffloadError> {
        Ok(EspKeys::new(kernel_transform(suite)?, &k.enc, &k.auth)?)
    }

    /// Installs an established association: SAs and policies (fail-closed order, rolled
    /// back on error), the route to the peer HIT, and the datapath's association entry.
    pub async fn install(&mut self, e: &Established) -> Result<Installed, OffloadError> {
        let reqid = match self.by_spi.lock().expect("spi map").remove(&e.spi_inbound) {
            Some((r, _)) => r,
            None => self
                .reqids
                .lock()
                .expect("reqid pool")
                .alloc()
                .ok_or_else(|| XfrmError::InvalidParam("hip's reqid range is exhausted".into()))?,
        };
        let params = AssociationParams {
            local_hit: v6(e.local_hit),
            peer_hit: v6(e.peer_hit),
            local_locator: e.local_locator,
            peer_locator: e.peer_locator,
            spi_in: e.spi_inbound,
            spi_out: e.spi_outbound,
            keys: EspKeyPair {
                outbound: Self::keys(e.esp_suite, &e.keys_outbound)?,
                inbound: Self::keys(e.esp_suite, &e.keys_inbound)?,
            },
            reqid,
            replay_window: self.replay_window,
            lifetimes: self.lifetimes,
            fail_closed: self.fail_closed,
            encap: encap_of(e.udp),
        };
        let mut split = InstallSplit::default();
        let t = std::time::Instant::now();
        let us = |t: std::time::Instant| t.elapsed().as_micros() as u64;
        if let Err(err) = hip_kernel::install_association(&*self.xfrm, &params).await {
            self.reqids.lock().expect("reqid pool").release(reqid);
            return Err(err.into());
        }
        split.xfrm = us(t);
        let t = std::time::Instant::now();
        if let Err(err) = self
            .routes
            .add_peer_route(params.peer_hit, params.local_hit, params.peer_locator)
            .await
        {
            let _ = hip_kernel::remove_association(&*self.xfrm, &params).await;
            self.reqids.lock().expect("reqid pool").release(reqid);
            return Err(err.into());
        }
        split.route = us(t);
        let t = std::time::Instant::now();
        if let Some(dp) = &mut self.datapath
            && let Err(err) = dp.upsert_association(&spec(&params))
        {
            let _ = self.routes.del_peer_route(params.peer_hit).await;
            let _ = hip_kernel::remove_association(&*self.xfrm, &params).await;
            self.reqids.lock().expect("reqid pool").release(reqid);
            return Err(err.into());
        }
        split.datapath = us(t);
        let mut info = installed(&params);
        info.install_us = Some(split);
        if let Some(old) = self.installed.insert(e.peer_hit, params) {
            // A new base exchange replaced the association (the peer restarted, RFC 7401
            // §6.9, or we re-established after losing it): the policies now point at the
            // new reqid and SAs; the old SA pair and its reqid go. The route and the
            // datapath entry were updated in place above.
            self.pending_rekey.remove(&e.peer_hit);
            for sa in [old.sa_in().id(), old.sa_out().id()] {
                if let Err(err) = self.xfrm.del_sa(&sa).await {
                    tracing::warn!(peer = %e.peer_hit, %sa, "removing the replaced SA: {err}");
                }
            }
            self.reqids.lock().expect("reqid pool").release(old.reqid);
            tracing::info!(peer = %e.peer_hit, old_spi_in = format_args!("{:#x}", old.spi_in), "association replaced by a new base exchange; old SAs removed");
        }
        Ok(info)
    }

    /// When inbound ESP last arrived from each installed peer, as CLOCK_MONOTONIC
    /// nanoseconds (the datapath's per-SPI counters; 0: never). `None` without a datapath.
    pub fn inbound_last_seen(&self) -> Option<HashMap<Hit, u64>> {
        let dp = self.datapath.as_ref()?;
        let counters = dp.spi_counters().ok()?;
        let by_spi: HashMap<u32, u64> = counters
            .iter()
            .filter(|c| c.direction == "in")
            .map(|c| (c.spi, c.last_seen_ns))
            .collect();
        Some(
            self.installed
                .iter()
                .map(|(h, p)| (*h, by_spi.get(&p.spi_in).copied().unwrap_or(0)))
                .collect(),
        )
    }

    /// Removes everything of the association with `peer`; returns its final flows (from
    /// the datapath) for the call's record. Removing what is not installed is a no-op.
    pub async fn remove(&mut self, peer: Hit) -> Result<Vec<Flow>, OffloadError> {
        self.pending_rekey.remove(&peer);
        let Some(params) = self.installed.remove(&peer) else {
            return Ok(Vec::new());
        };
        let mut first: Option<OffloadError> = None;
        let flows = match &mut self.datapath {
            Some(dp) => dp.remove_association(params.peer_hit).unwrap_or_else(|e| {
                first.get_or_insert(e.into());
                Vec::new()
            }),
            None => Vec::new(),
        };
        if let Err(e) = hip_kernel::remove_association(&*self.xfrm, &params).await {
            first.get_or_insert(e.into());
        }
        if let Err(e) = self.routes.del_peer_route(params.peer_hit).await {
            first.get_or_insert(e.into());
        }
        self.reqids
            .lock()
            .expect("reqid pool")
            .release(params.reqid);
        match first {
            None => Ok(flows),
            Some(e) => Err(e),
        }
    }

    /// A rekey (RFC 7402 §6): the new inbound SA goes in now; the new outbound SA too when
    /// `outbound_active`, else at [`Offload::rekey_completed`].
    pub async fn rekeyed(&mut self, r: &Rekeyed) -> Result<Installed, OffloadError> {
        let old = self
            .installed
            .get(&r.peer_hit)
            .cloned()
            .ok_or(OffloadError::NotInstalled(r.peer_hit))?;
        let mut new = old.clone();
        new.spi_in = r.spi_inbound;
        new.spi_out = r.spi_outbound;
        new.keys = EspKeyPair {
            outbound: Self::keys(r.esp_suite, &r.keys_outbound)?,
            inbound: Self::keys(r.esp_suite, &r.keys_inbound)?,
        };
        // The reqid stays (the policies' templates match SAs by reqid); forget the one the
        // allocator reserved for the new inbound SPI.
        if let Some((reqid, _)) = self.by_spi.lock().expect("spi map").remove(&r.spi_inbound) {
            self.reqids.lock().expect("reqid pool").release(reqid);
        }
        self.xfrm.add_sa(&new.sa_in()).await?;
        if r.outbound_active {
            self.switch_outbound(&old, &new).await?;
        } else {
            self.pending_rekey.insert(r.peer_hit, new.clone());
        }
        Ok(installed(&new))
    }

    /// The rekey is complete on both sides: use the new outbound SA and drop the old pair.
    pub async fn rekey_completed(
        &mut self,
        peer: Hit,
        old_spi_in: u32,
    ) -> Result<(), OffloadError> {
        let cur = self
            .installed
            .get(&peer)
            .cloned()
            .ok_or(OffloadError::NotInstalled(peer))?;
        if let Some(new) = self.pending_rekey.remove(&peer) {
            self.switch_outbound(&cur, &new).await?;
        }
        let sa = SaId {
            dst: cur.local_locator,
            spi: old_spi_in,
        };
        self.xfrm.del_sa(&sa).await?;
        Ok(())
    }

    async fn switch_outbound(
        &mut self,
        old: &AssociationParams,
        new: &AssociationParams,
    ) -> Result<(), OffloadError> {
        // The kernel picks the newest matching SA for the policy template (same reqid), so
        // adding the new outbound SA switches traffic to it; then the old one goes.
        self.xfrm.add_sa(&new.sa_out()).await?;
        self.xfrm.del_sa(&old.sa_out().id()).await?;
        if let Some(dp) = &mut self.datapath {
            dp.upsert_association(&spec(new))?;
        }
        self.installed
            .insert(Hit(new.peer_hit.octets()), new.clone());
        Ok(())
    }

    /// The locators changed (RFC 8046 UPDATE): the SAs move to the new outer addresses
    /// (XFRM cannot change an SA's addresses in place without MIGRATE, so the pair is
    /// re-added and the old one removed), the policies' templates are replaced in place,
    /// and the datapath's verified locator follows.
    ///
    /// Over UDP a NAT's rebinding changes only the ports (`udp`): the kernel updates both
    /// SAs' encapsulation in place, keys and counters untouched; a path that gains or
    /// loses encapsulation re-adds the pair.
    pub async fn locators_changed(
        &mut self,
        peer: Hit,
        local: IpAddr,
        peer_locator: IpAddr,
        udp: Option<UdpPorts>,
    ) -> Result<Installed, OffloadError> {
        let old = self
            .installed
            .get(&peer)
            .cloned()
            .ok_or(OffloadError::NotInstalled(peer))?;
        let mut new = old.clone();
        new.local_locator = local;
        new.peer_locator = peer_locator;
        new.encap = encap_of(udp);
        // The policies' templates first: from then on the kernel picks no SA at the old
        // addresses for sending (templates match on them), so the old outbound SA's
        // counter is frozen when `move_sa` copies it — otherwise a packet sent in between
        // would reuse a sequence number, and with AES-GCM a nonce. Packets in the short gap
        // are dropped (the policy still demands ESP), never sent in clear text.
        for p in new.ipsec_policies() {
            self.xfrm.add_policy(&p).await?;
        }
        // Same SPIs and keys at the new addresses, sequence numbers and replay windows
        // carried over. (An inbound SA whose destination stays may still take a packet
        // between the copy and the delete; that one packet could be replayed once.)
        for (o, n) in [(old.sa_out(), new.sa_out()), (old.sa_in(), new.sa_in())] {
            if o.locators != n.locators || o.encap != n.encap {
                self.xfrm.move_sa(&o.id(), &n).await?;
            }
        }
        self.routes
            .add_peer_route(new.peer_hit, new.local_hit, new.peer_locator)
            .await?;
        if let Some(dp) = &mut self.datapath {
            dp.upsert_association(&spec(&new))?;
        }
        let info = installed(&new);
        self.installed.insert(peer, new);
        Ok(info)
    }

    /// What is installed for `peer`.
    pub fn get(&self, peer: &Hit) -> Option<Installed> {
        self.installed.get(peer).map(installed)
    }

    /// The peer whose association owns an SA with this (destination, SPI).
    pub fn peer_of_sa(&self, sa: &SaId) -> Option<Hit> {
        self.installed
            .iter()
            .find_map(|(h, p)| (p.sa_in().id() == *sa || p.sa_out().id() == *sa).then_some(*h))
    }

    /// The whole flow table; `None` when the datapath is disabled.
    pub fn flows(&self) -> Option<Result<Vec<Flow>, OffloadError>> {
        self.datapath
            .as_ref()
            .map(|dp| dp.flows().map_err(OffloadError::from))
    }

    /// The eBPF datapath, when it runs (the metrics endpoint reads its maps).
    pub fn datapath(&self) -> Option<&Datapath> {
        self.datapath.as_ref()
    }

    /// hip's SAs and policies as the kernel holds them now.
    pub async fn list_owned(&self) -> Result<hip_kernel::Owned, OffloadError> {
        Ok(self.xfrm.list_owned().await?)
    }

    /// The datapath's flows involving `peer`'s HIT.
    pub fn flows_of(&self, peer: &Hit) -> Vec<Flow> {
        let peer = v6(*peer);
        self.datapath
            .as_ref()
            .and_then(|dp| dp.flows().ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f.src_hit == peer || f.dst_hit == peer)
            .collect()
    }

    /// The next kernel XFRM event concerning hip's objects (pending forever without a
    /// subscription).
    pub async fn next_kernel_event(&mut self) -> KernelEvent {
        loop {
            let ev = match &mut self.events {
                Some(e) => e.next().await,
                None => std::future::pending().await,
            };
            match ev {
                Some(ev) if ev.is_owned() => return ev,
                Some(_) => {}
                None => {
                    tracing::error!(
                        "the XFRM event socket closed; soft expiries will not trigger rekeys"
                    );
                    self.events = None;
                }
            }
        }
    }

    /// Removes every association, the guard, our HIT on `lo`, and the datapath.
    pub async fn shutdown(mut self) {
        let peers: Vec<Hit> = self.installed.keys().copied().collect();
        for p in peers {
            if let Err(e) = self.remove(p).await {
                tracing::error!(peer = %p, "removing association at shutdown: {e}");
            }
        }
        if let Some(g) = &self.guard
            && let Err(e) = hip_kernel::remove_guard(&*self.xfrm, g).await
        {
            tracing::error!("removing the fail-closed guard: {e}");
        }
        let _ = self.routes.del_local_hit(self.local_hit).await;
        if let Some(dp) = self.datapath.take()
            && let Err(e) = dp.shutdown()
        {
            tracing::error!("datapath shutdown: {e}");
        }
    }
}

fn installed(p: &AssociationParams) -> Installed {
    Installed {
        reqid: p.reqid.0,
        spi_in: p.spi_in,
        spi_out: p.spi_out,
        transform: p.keys.inbound.transform().name(),
        local_locator: p.local_locator,
        peer_locator: p.peer_locator,
        encap: p.encap,
        install_us: None,
    }
}

/// The SAs' encapsulation for an association over UDP: our port is the source of what
/// we send.
fn encap_of(u: Option<UdpPorts>) -> Option<UdpEncap> {
    u.map(|u| UdpEncap {
        sport: u.local,
        dport: u.peer,
    })
}

fn spec(p: &AssociationParams) -> AssociationSpec {
    AssociationSpec {
        peer_hit: p.peer_hit,
        local_hit: p.local_hit,
        locators: vec![PeerLocator {
            addr: p.peer_locator,
            state: LocatorState::Active,
        }],
        spi_in: p.spi_in,
        spi_out: p.spi_out,
        state: AssocState::Established,
    }
}

/// Tells whether the kernel can hold ESP SAs: adds a throw-away SA in hip's range
/// (documentation addresses, RFC 5737) and deletes it again. Hosts whose kernel lacks
/// ESP answer `EPROTONOSUPPORT`, which hip-kernel reports as `NoEspSupport`.
async fn probe_esp(xfrm: &XfrmNetlink) -> Result<(), OffloadError> {
    let transform = EspTransform::AesCbc128HmacSha256;
    let sa = hip_kernel::SaParams {
        locators: LocatorPair {
            src: IpAddr::from([192, 0, 2, 254]),
            dst: IpAddr::from([192, 0, 2, 253]),
        },
        hits: hip_kernel::HitPair {
            src: "2001:20::fe".parse().expect("literal"),
            dst: "2001:20::fd".parse().expect("literal"),
        },
        spi: 0xffff_fe01,
        reqid: Reqid(hip_kernel::owner::REQID_LAST),
        keys: EspKeys::new(
            transform,
            &vec![0u8; transform.enc_key_len()],
            &vec![0u8; transform.auth_key_len()],
        )?,
        replay_window: 0,
        lifetimes: Lifetimes::UNLIMITED,
        encap: None,
    };
    match xfrm.add_sa(&sa).await {
        Ok(()) => {
            xfrm.del_sa(&sa.id()).await?;
            Ok(())
        }
        Err(e @ XfrmError::NoEspSupport { .. }) => Err(OffloadError::KernelCheck(format!(
            "{e}. hip needs CONFIG_INET_ESP and CONFIG_INET6_ESP (modules esp4/esp6) for its BEET SAs; on this kernel run with [kernel] enabled = false (HIP still authenticates peers, media is then not protected by the kernel)"
        ))),
        Err(e @ XfrmError::AlgorithmUnavailable { .. }) => Err(OffloadError::KernelCheck(format!(
            "{e}: the kernel lacks cbc(aes)/hmac(sha256) (CONFIG_CRYPTO_CBC, CONFIG_CRYPTO_SHA256)"
        ))),
        Err(e) => Err(e.into()),
    }
}
