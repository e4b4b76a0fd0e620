//! HIP for the agent's calls: the base exchange towards the HIT learned through SIP, the
//! responder's acceptance policy (the draft's known-HITs pool), the kernel offload of
//! established associations, and how well each peer was verified (the draft's §4).
//!
//! The daemon's loop owns one [`Security`] and calls it from [`crate::daemon`]'s
//! `dispatch`: [`Security::initiate`] when a call we placed is answered,
//! [`Security::authorize`] when we answer one, [`Security::release`] when no call uses a peer any more; it
//! waits on [`Security::wait`] and passes what arrives to [`Security::handle`] for what happened (an association established, refused,
//! closed) and updates the calls it shows.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use hip_kernel::{AddressEvent, AddressEvents, KernelEvent};
use hip_proto::{
    Hit, HostId,
    endpoint::{self, Endpoint, Event, PeerLocator, ProtocolError},
    esp::EspSuite,
    keyfile,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    config::{AcceptPolicy, Config, HostIdInI2, UdpMode},
    hip_driver::{self, DriverError, HipDriver, Sockets},
    offload::{Installed, Offload, OffloadError},
};

/// Errors starting HIP.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The identity key file could not be loaded.
    #[error("identity {path}: {message}")]
    Identity {
        /// The key file.
        path: String,
        /// Why.
        message: String,
    },
    /// The HIP endpoint refused its configuration.
    #[error("HIP: {0}")]
    Protocol(#[from] ProtocolError),
    /// The raw sockets could not be opened (needs CAP_NET_RAW).
    #[error("HIP driver: {0}")]
    Driver(#[from] DriverError),
    /// The kernel offload could not start; the message says what is missing.
    #[error(transparent)]
    Offload(#[from] OffloadError),
}

/// Where an association is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssocState {
    /// I1/R1/I2/R2 under way (we initiated), or waiting for the caller's I2.
    Exchanging,
    /// Base exchange done; SAs installed (when the kernel offload is on).
    Established,
    /// CLOSE sent.
    Closing,
    /// Closed; nothing of it is left in the kernel.
    Closed,
    /// Refused or failed (see `error`).
    Failed,
}

/// One association as operators see it (`hip-agent assoc`, `status`).
#[derive(Clone, Debug, Serialize)]
pub struct AssocRecord {
    /// The peer's HIT (the one learned through SIP).
    pub peer_hit: String,
    /// Our HIT.
    pub local_hit: String,
    /// State.
    pub state: AssocState,
    /// Whether this association reached ESTABLISHED with this HIT proved (its HI hashed
    /// to it and it signed the exchange). A verification level rests on this alone: a
    /// record that merely ends `closed` proves nothing.
    pub reached_established: bool,
    /// Why an established association ended on its own (dead peer, kernel refusal).
    pub lost: Option<String>,
    /// Whether we sent I1.
    pub initiator: bool,
    /// The peer's locator.
    pub peer_locator: Option<IpAddr>,
    /// Our locator.
    pub local_locator: Option<IpAddr>,
    /// Set when the association runs over UDP (RFC 9028: HIP and ESP through a NAT).
    pub nat: Option<NatPath>,
    /// Negotiated ESP transform (RFC 7402 suite name).
    pub esp_transform: Option<String>,
    /// What the kernel holds for it (SPIs, reqid), when offloaded.
    pub kernel: Option<Installed>,
    /// Why it failed.
    pub error: Option<String>,
    /// The HIT the responder really had, when it was not the expected one.
    pub actual_peer_hit: Option<String>,
    /// When the base exchange completed (seconds since the epoch).
    pub established_at: Option<u64>,
    /// Set-up timing in Unix milliseconds: exchange started (I1 sent, or the record made
    /// for an answered call), base exchange completed, kernel programming done.
    pub timing_ms: Timing,
    /// Rekeys done.
    pub rekeys: u32,
}

/// How an association over UDP runs (see [`AssocRecord::nat`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NatPath {
    /// Our UDP port (HIP and UDP-encapsulated ESP).
    pub local_port: u16,
    /// The peer's UDP port as seen on the wire (behind a NAT: its mapped port).
    pub peer_port: u16,
    /// Whether the path goes through a relay (RFC 9028 §4.5); never yet: direct.
    pub relayed: bool,
    /// Interval of the NAT keepalives both sides send (RFC 9028 §5.3).
    pub keepalive_interval_s: u64,
    /// How often the peer's UDP path changed during the association (a NAT that rebound,
    /// a move to another NAT), each time after HIP verified the new path.
    pub path_changes: u32,
    /// For the last change the kernel found first (ESP from the new path,
    /// `XFRM_MSG_MAPPING`): milliseconds from that report to our SAs moved — the part of
    /// the media gap towards the peer that is ours. Absent while the peer announced every
    /// change itself (UPDATE).
    pub last_follow_ms: Option<u64>,
}

impl NatPath {
    fn of(u: Option<endpoint::UdpPorts>) -> Option<Self> {
        u.map(|u| Self {
            local_port: u.local,
            peer_port: u.peer,
            relayed: false,
            keepalive_interval_s: endpoint::Config::default().udp_keepalive.as_secs(),
            path_changes: 0,
            last_follow_ms: None,
        })
    }

    /// The path after a verified move from `prev` (the peer at `old_peer`) to `udp` with
    /// the peer at `new_peer`; `reported`: when the kernel first saw ESP on the new path,
    /// if it did. A report left from a check that never completed is counted only with a
    /// change that happens.
    fn moved(
        prev: Option<Self>,
        old_peer: Option<IpAddr>,
        new_peer: IpAddr,
        udp: Option<endpoint::UdpPorts>,
        reported: Option<Instant>,
    ) -> Option<Self> {
        let mut next = Self::of(udp)?;
        if let Some(p) = prev {
            let changed = p.peer_port != next.peer_port || old_peer != Some(new_peer);
            next.path_changes = p.path_changes + u32::from(changed);
            next.last_follow_ms = reported
                .filter(|_| changed)
                .map(|t| t.elapsed().as_millis() as u64)
                .or(p.last_follow_ms);
        }
        Some(next)
    }
}

/// See [`AssocRecord::timing_ms`].
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Timing {
    /// I1 sent (initiator) or call answered (responder).
    pub started: Option<u64>,
    /// `Established` from the HIP core.
    pub established: Option<u64>,
    /// SAs, policies, route and datapath entry installed.
    pub offloaded: Option<u64>,
}

/// What [`Security::handle`] reports to the daemon.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The association with `peer` is established (and offloaded if configured).
    Established {
        /// The peer.
        peer: Hit,
    },
    /// The exchange towards `expected` (or with `peer`) failed; `mismatch` when the
    /// responder's HI did not hash to the HIT learned through SIP.
    Failed {
        /// The peer HIT the record is filed under.
        peer: Hit,
        /// Why.
        error: String,
        /// Whether it was a HIT mismatch (the draft's MITM case).
        mismatch: bool,
    },
    /// The association closed.
    Closed {
        /// The peer.
        peer: Hit,
    },
    /// An established association ended on its own (see [`AssocRecord::lost`]); a call
    /// that still needs it must run a new exchange.
    Lost {
        /// The peer.
        peer: Hit,
        /// Why.
        reason: String,
    },
    /// Nothing the daemon needs to act on.
    Nothing,
}

/// An input for [`Security::handle`].
#[derive(Debug)]
pub enum Input {
    /// From the HIP endpoint.
    Hip(Event),
    /// From the kernel's XFRM monitor.
    Kernel(KernelEvent),
    /// The host's addresses changed.
    Address(AddressEvent),
    /// Time for dead peer detection.
    Tick,
}

/// The HITs a responder accepts I2s from — the HITs offered in calls we answered, counted
/// per call (two calls with the same peer host share its HIT) — and the HITs whose I1s are
/// expected (those, and every HIT the known-HITs pool binds to a SIP URI): they get R1s
/// in a lane of their own under a flood (see `hip_proto::endpoint::PeerPolicy::expected`).
#[derive(Default)]
struct Known {
    /// HIT → calls we answered that offered it.
    authorized: HashMap<Hit, u32>,
    /// HITs bound to a SIP URI in the pool.
    pooled: HashSet<Hit>,
}

#[derive(Clone, Default)]
struct Authorized(Arc<Mutex<Known>>);

impl Authorized {
    fn add(&self, h: Hit) {
        *self
            .0
            .lock()
            .expect("authorized")
            .authorized
            .entry(h)
            .or_insert(0) += 1;
    }
    fn remove(&self, h: Hit) {
        let mut g = self.0.lock().expect("authorized");
        if let Some(n) = g.authorized.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                g.authorized.remove(&h);
            }
        }
    }
    fn contains(&self, h: &Hit) -> bool {
        self.0
            .lock()
            .expect("authorized")
            .authorized
            .contains_key(h)
    }
    fn expect(&self, h: Hit) {
        self.0.lock().expect("authorized").pooled.insert(h);
    }
    fn expected(&self, h: &Hit) -> bool {
        let g = self.0.lock().expect("authorized");
        g.authorized.contains_key(h) || g.pooled.contains(h)
    }
}

/// The responder's policy ([`AcceptPolicy`]) and the expected-initiator lane.
struct Policy {
    authorized: Authorized,
    known_only: bool,
}

impl endpoint::PeerPolicy for Policy {
    fn accept(&self, h: &Hit, _: &HostId) -> bool {
        let ok = !self.known_only || self.authorized.contains(h);
        if !ok {
            tracing::warn!(peer = %h, "refusing I2: HIT not offered in a call we answered (known-HITs pool)");
        }
        ok
    }
    fn expected(&self, h: &Hit) -> bool {
        self.authorized.expected(h)
    }
}

/// How often established associations are checked for ESP silence (dead peers).
const DPD_TICK: Duration = Duration::from_secs(5);

/// Dead peer detection state of one association.
#[derive(Clone, Copy, Debug, Default)]
struct Liveness {
    /// CLOCK_MONOTONIC ns when it was established (silence is counted from there).
    since_ns: u64,
    /// CLOCK_MONOTONIC ns of our last probe.
    probed_ns: Option<u64>,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the datapath's per-SPI `last_seen_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) only writes the timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// HIP and its kernel offload for the daemon.
pub struct Security {
    driver: HipDriver,
    offload: Option<Offload>,
    authorized: Authorized,
    records: HashMap<Hit, AssocRecord>,
    local_hit: Hit,
    local_locator: Option<IpAddr>,
    i1_to_null: bool,
    /// Base exchanges we started, keyed by peer locator → the HITs SIP told us (any of
    /// them may answer; with `i1_to_null_hit = false`, the ones still to try in order).
    expected_at: HashMap<IpAddr, Vec<Hit>>,
    /// Early exchanges ([`Security::initiate_early`]) still running, by peer locator →
    /// the HITs an answer named meanwhile (empty until it comes): the responder must be
    /// one of them, or the exchange the answer asks for runs after it.
    early: HashMap<IpAddr, Vec<Hit>>,
    /// The host's address changes (RFC 8046 mobility); `None` with a fixed `[hip] locator`.
    addrs: Option<AddressEvents>,
    /// Locator moves announced (UPDATE sent) and not yet confirmed, per peer.
    moving: HashMap<Hit, IpAddr>,
    /// Dead peer detection: per established peer, and the silence that triggers a probe.
    liveness: HashMap<Hit, Liveness>,
    /// When the kernel first reported ESP from a new UDP path per peer (until it is
    /// verified and followed, or the association goes).
    mapping_seen: HashMap<Hit, Instant>,
    dpd_idle_ns: u64,
    dpd_tick: tokio::time::Interval,
    /// HIP over UDP: the mode, and our (and the peers') port when the socket is open.
    udp_mode: UdpMode,
    udp_port: Option<u16>,
}

/// An address a NAT usually stands in front of: RFC 1918 private, RFC 6598 shared (CGN)
/// and IPv6 unique local (RFC 4193) space.
fn private_use(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

impl Security {
    /// Loads the identity, checks the kernel and starts the offload (if configured), opens
    /// the raw HIP sockets and spawns the driver.
    pub async fn start(cfg: &Config) -> Result<Self, SecurityError> {
        let path = cfg
            .identity
            .as_ref()
            .expect("validated: HIP needs an identity file");
        let identity = keyfile::load(path).map_err(|e| SecurityError::Identity {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let local_hit = identity.hit();
        let offload = if cfg.kernel_enabled() {
            Some(Offload::start(cfg, local_hit).await?)
        } else {
            tracing::warn!(
                "[kernel] enabled = false: HIP authenticates peers, but no SA protects media"
            );
            None
        };
        let mut ecfg = endpoint::Config {
            esp_suites: cfg
                .hip
                .esp_transforms
                .iter()
                .filter_map(|c| EspSuite::from_id(c.suite_id()))
                .collect(),
            max_associations: cfg.limits.max_associations,
            ..endpoint::Config::default()
        };
        if let Some(k) = cfg.hip.puzzle_difficulty {
            ecfg.puzzle_difficulty = k;
        }
        ecfg.encrypt_host_id = cfg.hip.host_id_in_i2 == HostIdInI2::Encrypted;
        ecfg.send_r1_counter = cfg.hip.r1_counter;
        ecfg.opportunistic = true;
        let mut ep = Endpoint::new(ecfg, identity, hip_driver::os_rng()?, Instant::now())?;
        if let Some(o) = &offload {
            ep.set_spi_allocator(Box::new(o.spi_allocator()));
        }
        let authorized = Authorized::default();
        ep.set_policy(Box::new(Policy {
            authorized: authorized.clone(),
            known_only: cfg.hip.accept == AcceptPolicy::Known,
        }));
        let mut sockets = Sockets::open()?;
        let udp_port = match cfg.hip.udp {
            UdpMode::Never => None,
            mode => match sockets.add_udp(cfg.hip.udp_port) {
                Ok(()) => Some(cfg.hip.udp_port),
                Err(e) if mode == UdpMode::Auto => {
                    tracing::warn!(
                        port = cfg.hip.udp_port,
                        "no HIP over UDP (peers behind NATs cannot reach us): {e}"
                    );
                    None
                }
                Err(e) => return Err(DriverError::Io(e).into()),
            },
        };
        let driver = HipDriver::spawn(ep, sockets);
        // With a configured locator there is nothing to follow; otherwise an address
        // monitor lets associations move when the host's address changes.
        let addrs = match cfg.hip.locator {
            Some(_) => None,
            None => match AddressEvents::subscribe() {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!("no address monitor (no HIP mobility): {e}");
                    None
                }
            },
        };
        let mut dpd_tick = tokio::time::interval(DPD_TICK);
        dpd_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(hit = %local_hit, offload = offload.is_some(), "HIP ready");
        Ok(Self {
            driver,
            offload,
            authorized,
            records: HashMap::new(),
            local_hit,
            local_locator: cfg.hip.locator,
            i1_to_null: cfg.hip.i1_to_null_hit,
            expected_at: HashMap::new(),
            early: HashMap::new(),
            addrs,
            moving: HashMap::new(),
            liveness: HashMap::new(),
            mapping_seen: HashMap::new(),
            dpd_idle_ns: cfg.hip.dead_peer_idle_secs.saturating_mul(1_000_000_000),
            dpd_tick,
            udp_mode: cfg.hip.udp,
            udp_port,
        })
    }

    /// Our HIT.
    pub fn local_hit(&self) -> Hit {
        self.local_hit
    }

    /// Whether established associations are offloaded to the kernel.
    pub fn offloading(&self) -> bool {
        self.offload.is_some()
    }

    fn record(&mut self, peer: Hit, initiator: bool, locator: Option<IpAddr>) -> &mut AssocRecord {
        let local = self.local_hit;
        self.records.entry(peer).or_insert_with(|| AssocRecord {
            peer_hit: peer.to_string(),
            local_hit: local.to_string(),
            state: AssocState::Exchanging,
            reached_established: false,
            initiator,
            peer_locator: locator,
            local_locator: None,
            nat: None,
            esp_transform: None,
            kernel: None,
            error: None,
            lost: None,
            actual_peer_hit: None,
            established_at: None,
            timing_ms: Timing {
                started: Some(crate::daemon::unix_ms()),
                ..Timing::default()
            },
            rekeys: 0,
        })
    }

    /// Marks HITs as expected initiators (the known-HITs pool): their I1s are answered in
    /// their own lane under a flood. It does not authorize them.
    pub fn expect(&self, hits: impl IntoIterator<Item = Hit>) {
        for h in hits {
            self.authorized.expect(h);
        }
    }

    /// Starts a base exchange with the host at `locator`, which must prove it holds the
    /// key behind one of `expected` (the HITs its SDP carried, in order).
    ///
    /// * An association already established with one of them is reused, after a
    ///   liveness probe: a peer that lost its state (restarted) does not answer it, and
    ///   the association is then replaced by a new exchange ([`Outcome::Lost`]).
    /// * One in progress is left to finish; one closing is cut short (a new call must not
    ///   wait for the last call's CLOSE to time out).
    /// * With `i1_to_null_hit` one I1 goes to the null HIT and an R1 proving any of the
    ///   HITs is accepted; without, they are tried one after the other.
    pub async fn initiate(&mut self, locator: IpAddr, expected: &[Hit]) -> Result<(), String> {
        if expected.is_empty() {
            return Err("no peer HIT to expect".into());
        }
        for h in expected {
            match self.records.get(h).map(|r| r.state) {
                Some(AssocState::Established) => {
                    tracing::info!(peer = %h, "reusing the established association; checking that the peer still holds it");
                    if let Err(e) = self.driver.probe(*h).await {
                        tracing::warn!(peer = %h, "liveness probe: {e}");
                    }
                    return Ok(());
                }
                Some(AssocState::Exchanging) if self.records[h].initiator => return Ok(()),
                Some(AssocState::Closing) => {
                    tracing::info!(peer = %h, "a new call needs the association being closed: dropping it now");
                    let _ = self.driver.abort(*h).await;
                    self.remove_kernel_state(*h).await;
                    self.records.remove(h);
                }
                _ => {}
            }
        }
        if let Some(waiting) = self.early.get_mut(&locator) {
            // The early exchange there finishes first; its responder is checked against
            // these HITs then (and the normal exchange runs if it is none of them).
            tracing::info!(peers = ?expected.iter().map(Hit::to_string).collect::<Vec<_>>(), %locator, "the early base exchange is still running: its responder must be one of these");
            *waiting = expected.to_vec();
            for h in expected {
                self.records.remove(h);
                let r = self.record(*h, true, Some(locator));
                r.peer_locator = Some(locator);
            }
            return Ok(());
        }
        for h in expected {
            if !matches!(
                self.records.get(h).map(|r| r.state),
                Some(AssocState::Exchanging)
            ) {
                self.records.remove(h);
            }
            let r = self.record(*h, true, Some(locator));
            r.initiator = true;
            r.peer_locator = Some(locator);
        }
        // With `i1_to_null_hit`, the I1 goes to the null HIT and the endpoint checks the
        // responder's HI against `expected` on R1 (a mismatch fails before any I2).
        tracing::info!(peers = ?expected.iter().map(Hit::to_string).collect::<Vec<_>>(), %locator, via_null = self.i1_to_null, "starting HIP base exchange");
        self.expected_at.insert(locator, expected.to_vec());
        let path = self.path_to(locator);
        if path.udp_port.is_some() {
            tracing::info!(%locator, "HIP over UDP (a NAT is likely on the path)");
        }
        let r = if self.i1_to_null {
            self.driver
                .initiate_expecting_any(self.local_locator, path, expected.to_vec())
                .await
        } else {
            self.driver
                .initiate(self.local_locator, path, Some(expected[0]))
                .await
        };
        if let Err(e) = r {
            self.expected_at.remove(&locator);
            for h in expected {
                let rec = self.record(*h, true, Some(locator));
                rec.state = AssocState::Failed;
                rec.error = Some(e.to_string());
            }
            return Err(e.to_string());
        }
        Ok(())
    }

    /// How to reach `locator` when we initiate: over UDP (RFC 9028) when `[hip] udp`
    /// says so — always, or (`auto`) when our address towards it is a private one and
    /// its is not, so a NAT must be in between — over raw HIP otherwise.
    fn path_to(&self, locator: IpAddr) -> PeerLocator {
        let Some(port) = self.udp_port else {
            return locator.into();
        };
        let over_udp = match self.udp_mode {
            UdpMode::Always => true,
            UdpMode::Never => false,
            UdpMode::Auto => self.behind_nat_towards(locator),
        };
        if over_udp {
            std::net::SocketAddr::new(locator, port).into()
        } else {
            locator.into()
        }
    }

    /// Whether a NAT must be between us and `locator` (`[hip] udp = "auto"`): our address
    /// towards it is a private one and its is not. Such a host cannot be reached by an I1
    /// from the peer, so it starts the base exchange itself, over UDP, whichever side of
    /// the call it is (`a=hip-nat:initiate` in its SDP tells the peer).
    pub fn behind_nat_towards(&self, locator: IpAddr) -> bool {
        if self.udp_port.is_none() || self.udp_mode != UdpMode::Auto {
            return false;
        }
        let local = self
            .local_locator
            .map(Ok)
            .unwrap_or_else(|| hip_driver::source_for(locator));
        local.is_ok_and(|l| private_use(l) && !private_use(locator))
    }

    /// Starts a base exchange with the host at `locator` before its HIT is known (our
    /// phone's call rings there; the HIT comes with the answer): one I1 to the null HIT
    /// (RFC 7401 §4.1.8), any responder accepted. Nothing rests on it until
    /// [`Security::initiate`] names the HITs of the answer: a responder that is one of
    /// them is the call's association (the exchange proved that HIT as a normal one
    /// would), any other is closed and the normal exchange runs. `Ok(false)`: nothing
    /// started (an association with that locator exists or is being made).
    pub async fn initiate_early(&mut self, locator: IpAddr) -> Result<bool, String> {
        let busy = self.early.contains_key(&locator)
            || self.expected_at.contains_key(&locator)
            || self.records.values().any(|r| {
                r.peer_locator == Some(locator)
                    && matches!(r.state, AssocState::Established | AssocState::Exchanging)
            });
        if busy {
            return Ok(false);
        }
        tracing::info!(%locator, "starting HIP early (the peer rings; its HIT comes with the answer)");
        self.driver
            .initiate(self.local_locator, self.path_to(locator), None)
            .await
            .map_err(|e| e.to_string())?;
        self.early.insert(locator, Vec::new());
        Ok(true)
    }

    /// The early exchange towards `locator` is no longer wanted (its call ended before an
    /// answer): abandoned if still running.
    pub async fn cancel_early(&mut self, locator: IpAddr) {
        if self.early.remove(&locator).is_some() && self.driver.abandon(None, Some(locator)).await {
            tracing::info!(%locator, "early base exchange abandoned: its call ended");
        }
    }

    /// Lets `hits` (offered in a call we answer) associate with us as initiators.
    pub fn authorize(&mut self, hits: &[Hit]) {
        for h in hits {
            self.authorized.add(*h);
            if matches!(
                self.records.get(h).map(|r| r.state),
                Some(AssocState::Closed | AssocState::Failed)
            ) {
                // A record of an earlier call must not lend its state to this one.
                self.records.remove(h);
            }
            self.record(*h, false, None);
        }
    }

    /// Undoes [`Security::authorize`] for a call that ended.
    pub fn deauthorize(&mut self, hits: &[Hit]) {
        for h in hits {
            self.authorized.remove(*h);
        }
    }

    /// No call uses `peer` any more: the association ends (CLOSE when established; an
    /// exchange in progress is abandoned at once), and its record is freed — at once, or
    /// when the CLOSE completes.
    pub async fn release(&mut self, peer: Hit) {
        let Some(rec) = self.records.get(&peer) else {
            return;
        };
        match rec.state {
            AssocState::Established => {
                if let Err(e) = self.driver.close(peer).await {
                    tracing::warn!(%peer, "CLOSE: {e}; removing the kernel state directly");
                    let _ = self.driver.abort(peer).await;
                    self.remove_kernel_state(peer).await;
                    self.records.remove(&peer);
                } else if let Some(r) = self.records.get_mut(&peer) {
                    r.state = AssocState::Closing;
                }
            }
            AssocState::Closing => {}
            AssocState::Exchanging => {
                let (initiator, locator) = (rec.initiator, rec.peer_locator);
                if initiator {
                    // Hanging up abandons the exchange: retransmissions stop and the next
                    // call to this peer can start at once.
                    if self.driver.abandon(Some(peer), locator).await {
                        tracing::info!(%peer, "base exchange abandoned: its call ended");
                    }
                    if let Some(l) = locator
                        && let Some(c) = self.expected_at.get_mut(&l)
                    {
                        c.retain(|h| *h != peer);
                        if c.is_empty() {
                            self.expected_at.remove(&l);
                        }
                    }
                } else {
                    // A responder that got as far as R2 holds state: CLOSE it.
                    let _ = self.driver.close(peer).await;
                }
                self.remove_kernel_state(peer).await;
                self.records.remove(&peer);
            }
            AssocState::Closed | AssocState::Failed => {
                self.records.remove(&peer);
            }
        }
        self.liveness.remove(&peer);
        self.mapping_seen.remove(&peer);
    }

    /// Frees the record of `peer` if its association is over (closed or failed): for a
    /// peer no call uses, e.g. one that closed an association opened opportunistically.
    pub fn forget_if_over(&mut self, peer: Hit) {
        if matches!(
            self.records.get(&peer).map(|r| r.state),
            Some(AssocState::Closed | AssocState::Failed)
        ) {
            self.records.remove(&peer);
        }
    }

    /// An early exchange reached a responder that is none of the HITs the answer named
    /// (`waiting`): that association serves no call and is closed (unless SIP bound its
    /// HIT elsewhere), and the answer's own exchange runs — with `i1_to_null_hit` the
    /// same host then fails it at once as a HIT mismatch, as without early HIP.
    async fn early_not_answered(
        &mut self,
        peer: Hit,
        locator: IpAddr,
        waiting: Vec<Hit>,
    ) -> Outcome {
        tracing::warn!(%peer, %locator, answered = ?waiting.iter().map(Hit::to_string).collect::<Vec<_>>(), "the early responder is not the HIT the answer named");
        if !self.authorized.expected(&peer) {
            self.release(peer).await;
        }
        for h in &waiting {
            self.records.remove(h);
        }
        if let Err(e) = self.initiate(locator, &waiting).await {
            tracing::error!("HIP initiate: {e}");
        }
        Outcome::Nothing
    }

    async fn remove_kernel_state(&mut self, peer: Hit) {
        if let Some(o) = &mut self.offload
            && let Err(e) = o.remove(peer).await
        {
            tracing::error!(%peer, "removing the association from the kernel: {e}");
        }
    }

    async fn closed(&mut self, peer: Hit) {
        self.remove_kernel_state(peer).await;
        self.liveness.remove(&peer);
        self.mapping_seen.remove(&peer);
        if let Some(r) = self.records.get_mut(&peer)
            && r.state != AssocState::Failed
        {
            r.state = AssocState::Closed;
        }
    }

    /// The association ended for a reason of its own (dead peer, the kernel refused a
    /// rekey or a move): everything of it goes, the record says why, and the calls are
    /// told ([`Outcome::Lost`]). It keeps `reached_established`: what it proved stays
    /// proved.
    async fn lost(&mut self, peer: Hit, why: String, tell_peer: bool) -> Outcome {
        tracing::error!(%peer, "HIP association lost: {why}");
        if tell_peer {
            let _ = self.driver.close(peer).await;
        }
        let _ = self.driver.abort(peer).await;
        self.remove_kernel_state(peer).await;
        self.liveness.remove(&peer);
        self.mapping_seen.remove(&peer);
        if let Some(r) = self.records.get_mut(&peer) {
            r.state = AssocState::Closed;
            r.lost = Some(why.clone());
            r.kernel = None;
        }
        Outcome::Lost { peer, reason: why }
    }

    /// The record of the association with `peer`.
    pub fn get(&self, peer: &Hit) -> Option<&AssocRecord> {
        self.records.get(peer)
    }

    /// Every association record.
    pub fn records(&self) -> impl Iterator<Item = &AssocRecord> {
        self.records.values()
    }

    /// What the HIP driver counted (drops by reason, R1 lanes, capacity).
    pub async fn stats(&self) -> Option<hip_driver::DriverStats> {
        self.driver.stats().await.ok()
    }

    /// The datapath's RTP flows with `peer`.
    pub fn flows_of(&self, peer: &Hit) -> Vec<hip_datapath::Flow> {
        self.offload
            .as_ref()
            .map(|o| o.flows_of(peer))
            .unwrap_or_default()
    }

    /// The kernel offload, if enabled (for inspection).
    pub fn offload(&self) -> Option<&Offload> {
        self.offload.as_ref()
    }

    /// Waits for the next input (a HIP event or a kernel event). Cancel-safe: the daemon
    /// selects on it with its other inputs; the work happens in [`Security::handle`],
    /// which must not be cancelled half-way (netlink requests in flight).
    pub async fn wait(&mut self) -> Input {
        let kernel = async {
            match &mut self.offload {
                Some(o) => o.next_kernel_event().await,
                None => std::future::pending().await,
            }
        };
        let addrs = async {
            match &mut self.addrs {
                Some(a) => a.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(a) = addrs => Input::Address(a),
            ev = self.driver.next_event() => match ev {
                Some(ev) => Input::Hip(ev),
                None => {
                    tracing::error!("the HIP driver stopped");
                    std::future::pending().await
                }
            },
            kev = kernel => Input::Kernel(kev),
            _ = self.dpd_tick.tick() => Input::Tick,
        }
    }

    /// Handles what [`Security::wait`] returned.
    pub async fn handle(&mut self, input: Input) -> Outcome {
        match input {
            Input::Hip(ev) => self.on_event(ev).await,
            Input::Kernel(kev) => {
                self.on_kernel_event(kev).await;
                Outcome::Nothing
            }
            Input::Address(a) => {
                self.on_address_change(a).await;
                Outcome::Nothing
            }
            Input::Tick => {
                self.check_liveness().await;
                Outcome::Nothing
            }
        }
    }

    /// Dead peer detection: an established association whose inbound ESP has been silent
    /// for `[hip] dead_peer_idle_secs` (eBPF per-SPI last-seen times) gets a liveness
    /// probe, once per such interval; an unanswered probe ends it
    /// ([`Event::PeerUnreachable`]). Without the datapath there is no silence to measure
    /// and only new calls probe.
    async fn check_liveness(&mut self) {
        let Some(seen) = self.offload.as_ref().and_then(Offload::inbound_last_seen) else {
            return;
        };
        let now = monotonic_ns();
        let idle = self.dpd_idle_ns;
        let mut probe = Vec::new();
        for (peer, l) in &mut self.liveness {
            let last = seen.get(peer).copied().unwrap_or(0).max(l.since_ns);
            let quiet = now.saturating_sub(last) >= idle;
            let probed_recently = l.probed_ns.is_some_and(|p| now.saturating_sub(p) < idle);
            if quiet && !probed_recently {
                l.probed_ns = Some(now);
                probe.push(*peer);
            }
        }
        for peer in probe {
            tracing::info!(%peer, "no ESP from the peer for a while: liveness probe");
            if let Err(e) = self.driver.probe(peer).await {
                tracing::debug!(%peer, "liveness probe: {e}");
            }
        }
    }

    /// The host's addresses changed: every established association whose peer the kernel
    /// now reaches from another local address moves there — an UPDATE with our new
    /// LOCATOR_SET (RFC 8046 §5); the SAs follow when the peer has acknowledged it
    /// ([`Event::LocatorsChanged`]). No SIP re-INVITE is needed: media is addressed to
    /// HITs.
    async fn on_address_change(&mut self, change: AddressEvent) {
        tracing::debug!(?change, "local address change");
        let moves: Vec<(Hit, IpAddr, IpAddr)> = self
            .records
            .iter()
            .filter(|(_, r)| r.state == AssocState::Established)
            .filter_map(|(h, r)| {
                let (local, peer) = (r.local_locator?, r.peer_locator?);
                let now = hip_driver::source_for(peer).ok()?;
                (now != local && self.moving.get(h) != Some(&now)).then_some((*h, local, now))
            })
            .collect();
        for (peer, from, to) in moves {
            tracing::info!(%peer, %from, %to, "our locator changed: UPDATE with LOCATOR_SET");
            match self.driver.update_locators(peer, to).await {
                Ok(()) => {
                    self.moving.insert(peer, to);
                }
                Err(e) => tracing::error!(%peer, "locator UPDATE: {e}"),
            }
        }
    }

    async fn on_event(&mut self, ev: Event) -> Outcome {
        match ev {
            Event::Established(e) => {
                let peer = e.peer_hit;
                if e.initiator {
                    // The other HITs the signalling offered for this locator were not the
                    // responder's: their records go (they were never tried on their own).
                    if let Some(cands) = self.expected_at.remove(&e.peer_locator) {
                        for h in cands.into_iter().filter(|h| *h != peer) {
                            if self.records.get(&h).is_some_and(|r| {
                                r.state == AssocState::Exchanging && r.initiator
                            }) {
                                self.records.remove(&h);
                            }
                        }
                    }
                }
                let established_ms = crate::daemon::unix_ms();
                let kernel = match &mut self.offload {
                    Some(o) => match o.install(&e).await {
                        Ok(i) => Some(i),
                        Err(err) => {
                            tracing::error!(%peer, "installing the association in the kernel: {err}");
                            let _ = self.driver.close(peer).await;
                            let r = self.record(peer, e.initiator, Some(e.peer_locator));
                            r.state = AssocState::Failed;
                            r.error = Some(format!("kernel offload: {err}"));
                            return Outcome::Failed {
                                peer,
                                error: format!("kernel offload: {err}"),
                                mismatch: false,
                            };
                        }
                    },
                    None => None,
                };
                let r = self.record(peer, e.initiator, Some(e.peer_locator));
                r.state = AssocState::Established;
                r.reached_established = true;
                r.initiator = e.initiator;
                r.peer_locator = Some(e.peer_locator);
                r.local_locator = Some(e.local_locator);
                r.nat = NatPath::of(e.udp);
                r.esp_transform = Some(format!("{:?}", e.esp_suite));
                r.kernel = kernel;
                r.error = None;
                r.lost = None;
                r.timing_ms.established = Some(established_ms);
                r.timing_ms.offloaded = r.kernel.as_ref().map(|_| crate::daemon::unix_ms());
                r.established_at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                self.liveness.insert(
                    peer,
                    Liveness {
                        since_ns: monotonic_ns(),
                        probed_ns: None,
                    },
                );
                tracing::info!(%peer, locator = %e.peer_locator, spi_in = format_args!("{:#x}", e.spi_inbound), spi_out = format_args!("{:#x}", e.spi_outbound), replaced = e.replaced_spis.is_some(), "HIP association established");
                if e.initiator
                    && let Some(waiting) = self.early.remove(&e.peer_locator)
                    && !waiting.is_empty()
                    && !waiting.contains(&peer)
                {
                    return self.early_not_answered(peer, e.peer_locator, waiting).await;
                }
                Outcome::Established { peer }
            }
            Event::Failed {
                peer_hit,
                peer_locator,
                error,
            } => {
                let mismatch = matches!(error, ProtocolError::HitMismatch { .. });
                let text = if mismatch {
                    format!("HIT mismatch (the peer is not who its SDP said): {error}")
                } else {
                    error.to_string()
                };
                if let Some(waiting) = self.early.remove(&peer_locator) {
                    tracing::info!(%peer_locator, "early base exchange failed ({text}); the answer's exchange will run");
                    if !waiting.is_empty() {
                        for h in &waiting {
                            self.records.remove(h);
                        }
                        if let Err(e) = self.initiate(peer_locator, &waiting).await {
                            tracing::error!("HIP initiate: {e}");
                        }
                    }
                    return Outcome::Nothing;
                }
                let candidates = self.expected_at.remove(&peer_locator);
                let failed: Vec<Hit> = match (candidates, peer_hit) {
                    (Some(c), _) if self.i1_to_null => c,
                    (Some(mut c), _) => {
                        // Tried one at a time: the next one gets its turn.
                        let first = c.remove(0);
                        if !c.is_empty() {
                            tracing::info!(peer = %first, %peer_locator, "HIP exchange failed ({text}); trying the next HIT the signalling offered");
                            self.records.remove(&first);
                            if let Err(e) = self.initiate(peer_locator, &c).await {
                                tracing::error!("HIP initiate: {e}");
                            }
                            return Outcome::Nothing;
                        }
                        vec![first]
                    }
                    (None, Some(p)) => vec![p],
                    (None, None) => return Outcome::Nothing,
                };
                for peer in &failed {
                    let r = self.record(*peer, true, Some(peer_locator));
                    r.state = AssocState::Failed;
                    r.error = Some(text.clone());
                    if let ProtocolError::HitMismatch { actual, .. } = &error {
                        r.actual_peer_hit = Some(actual.to_string());
                    }
                }
                tracing::error!(peers = ?failed.iter().map(Hit::to_string).collect::<Vec<_>>(), %peer_locator, "HIP exchange failed: {text}");
                Outcome::Failed {
                    peer: failed[0],
                    error: text,
                    mismatch,
                }
            }
            Event::Closed { peer_hit, by_peer } => {
                tracing::info!(peer = %peer_hit, by_peer, "HIP association closed");
                self.closed(peer_hit).await;
                Outcome::Closed { peer: peer_hit }
            }
            Event::PeerUnreachable { peer_hit } => {
                self.lost(
                    peer_hit,
                    "the peer did not answer a liveness check (its HIP state is gone, or it is down)".into(),
                    false,
                )
                .await
            }
            Event::Rekeyed(r) => {
                let Some(o) = &mut self.offload else {
                    return Outcome::Nothing;
                };
                match o.rekeyed(&r).await {
                    Ok(i) => {
                        if let Some(rec) = self.records.get_mut(&r.peer_hit) {
                            rec.kernel = Some(i);
                        }
                        Outcome::Nothing
                    }
                    // HIP and the kernel would diverge (the peer already uses the new
                    // SPIs): close, so that the next call starts clean.
                    Err(e) => {
                        self.lost(r.peer_hit, format!("the kernel refused the rekey: {e}"), true)
                            .await
                    }
                }
            }
            Event::RekeyCompleted {
                peer_hit,
                old_spi_inbound,
                ..
            } => {
                let Some(o) = &mut self.offload else {
                    return Outcome::Nothing;
                };
                if let Err(e) = o.rekey_completed(peer_hit, old_spi_inbound).await {
                    return self
                        .lost(
                            peer_hit,
                            format!("the kernel refused to complete the rekey: {e}"),
                            true,
                        )
                        .await;
                }
                if let Some(rec) = self.records.get_mut(&peer_hit) {
                    rec.kernel = o.get(&peer_hit);
                    rec.rekeys += 1;
                }
                tracing::info!(peer = %peer_hit, "ESP SAs rekeyed");
                Outcome::Nothing
            }
            Event::LocatorsChanged {
                peer_hit,
                local_locator,
                peer_locator,
                udp,
            } => {
                tracing::info!(peer = %peer_hit, %local_locator, %peer_locator, ?udp, "locators changed (UPDATE)");
                self.moving.remove(&peer_hit);
                if let Some(o) = &mut self.offload {
                    match o
                        .locators_changed(peer_hit, local_locator, peer_locator, udp)
                        .await
                    {
                        Ok(i) => {
                            if let Some(rec) = self.records.get_mut(&peer_hit) {
                                rec.kernel = Some(i);
                            }
                        }
                        Err(e) => {
                            return self
                                .lost(
                                    peer_hit,
                                    format!("the kernel refused to move the SAs: {e}"),
                                    true,
                                )
                                .await;
                        }
                    }
                }
                let reported = self.mapping_seen.remove(&peer_hit);
                if let Some(rec) = self.records.get_mut(&peer_hit) {
                    rec.local_locator = Some(local_locator);
                    rec.nat = NatPath::moved(rec.nat, rec.peer_locator, peer_locator, udp, reported);
                    rec.peer_locator = Some(peer_locator);
                    if let Some(n) = rec.nat.filter(|_| reported.is_some()) {
                        tracing::info!(peer = %peer_hit, follow_ms = ?n.last_follow_ms, changes = n.path_changes, "SAs followed the peer's new UDP path");
                    }
                }
                Outcome::Nothing
            }
            Event::UpdateFailed { peer_hit, .. } => {
                // Its SPI, if any, is already back with the allocator (and the kernel).
                tracing::warn!(peer = %peer_hit, "an UPDATE got no answer and was given up");
                self.moving.remove(&peer_hit);
                Outcome::Nothing
            }
            other => {
                tracing::debug!("HIP event: {other:?}");
                Outcome::Nothing
            }
        }
    }

    async fn on_kernel_event(&mut self, ev: KernelEvent) {
        match ev {
            KernelEvent::Expire {
                sa, hard: false, ..
            } => {
                let peer = self.offload.as_ref().and_then(|o| o.peer_of_sa(&sa));
                if let Some(peer) = peer {
                    tracing::info!(%peer, %sa, "soft lifetime reached: rekeying (UPDATE with ESP_INFO)");
                    if let Err(e) = self.driver.rekey(peer).await {
                        tracing::error!(%peer, "rekey: {e}");
                    }
                }
            }
            KernelEvent::Expire { sa, hard: true, .. } => {
                let peer = self.offload.as_ref().and_then(|o| o.peer_of_sa(&sa));
                match peer {
                    Some(peer) => {
                        let _ = self
                            .lost(
                                peer,
                                format!("the kernel deleted SA {sa} at its hard lifetime"),
                                true,
                            )
                            .await;
                    }
                    None => tracing::debug!(%sa, "hard expiry of an SA no association uses"),
                }
            }
            KernelEvent::Mapping { sa, old, new, .. } => {
                // Authenticated ESP from another UDP path: a NAT rebound. HIP verifies the
                // path before the SAs follow (LocatorsChanged); the kernel repeats the
                // event per packet until then, and the endpoint starts one check only.
                let peer = self.offload.as_ref().and_then(|o| o.peer_of_sa(&sa));
                // Packets already in flight when the SAs moved report the path they now
                // have: nothing to do for those.
                let current = peer.and_then(|p| self.records.get(&p)).is_some_and(|r| {
                    r.peer_locator == Some(new.ip())
                        && r.nat.is_some_and(|n| n.peer_port == new.port())
                });
                if let Some(peer) = peer.filter(|_| !current) {
                    self.mapping_seen.entry(peer).or_insert_with(Instant::now);
                    tracing::info!(%peer, %old, %new, "ESP from a new UDP path (NAT mapping): verifying it");
                    if let Err(e) = self.driver.path_observed(peer, new).await {
                        tracing::debug!(%peer, "path check: {e}");
                    }
                }
            }
            other => tracing::debug!("kernel event: {other:?}"),
        }
    }

    /// Removes everything from the kernel and stops the driver.
    pub async fn shutdown(self) {
        let Self {
            driver, offload, ..
        } = self;
        if let Some(o) = offload {
            o.shutdown().await;
        }
        let _ = driver.shutdown().await;
    }
}

/// A short authentication string two people can compare by voice (the draft's §4.4):
/// six decimal digits from SHA-256 over both HITs in a fixed order. A MITM who replaced
/// a HIT on the signalling path makes the two sides see different strings.
pub fn short_auth_string(a: Hit, b: Hit) -> String {
    let (lo, hi) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut h = Sha256::new();
    h.update(b"hip-sas-v1");
    h.update(lo.0);
    h.update(hi.0);
    let d = h.finalize();
    let n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1_000_000;
    format!("{:03} {:03}", n / 1000, n % 1000)
}

/// How well the peer of a call was verified (the draft's §4).
///
/// HIP proves that the peer holds the private key behind the HIT its SDP carried; SIP
/// tells whether that SDP — and the HIT in it — really came from the party named in the
/// call, and whether ours reached the peer intact ([`SipAssurance`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verification {
    /// HIP has not completed yet.
    Pending,
    /// HIP proved the peer's HIT, the peer's HIT reached us authenticated, and ours
    /// reached the peer protected (SIP Identity both ways with the draft's §4.1 UPDATE, or
    /// SIPS through trusted proxies).
    Mutual,
    /// Only one direction was protected (the draft's §4.4): e.g. only the caller signs, so
    /// the callee knows it talks to the caller while the caller only knows that whoever
    /// answered can check for a man in the middle. `sip_assurance` says which side.
    SingleSided,
    /// HIP proved the peer holds the HIT from SDP, but nothing authenticated the SDP.
    Unverified,
    /// HIP failed or found another HIT than the SDP's (HIT mismatch), or a SIP Identity
    /// that is valid in every other respect signed other HITs than the SDP carried (proof
    /// that the SDP was altered on the path). A SIP Identity that merely cannot be
    /// checked (untrusted domain, bad signature, stale) is not `failed`: it only leaves
    /// the peer unauthenticated, with the reason in `sip_assurance`.
    Failed,
}

/// What protected a HIT on the signalling path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    /// A verified SIP Identity header (RFC 8224) whose PASSporT binds the HIT.
    Identity,
    /// SIPS: TLS on every hop (RFC 3261 §26.2.2), every proxy trusted (draft §4.2).
    Sips,
    /// The HIT is in the DNSSEC-validated HIP RR (RFC 8005) at the name configured for the
    /// SIP identity (`[dns]`, see `dns_verify`).
    Dns,
}

/// The caveat of SIPS (draft §4.2), shown wherever it is relied upon.
pub const SIPS_CAVEAT: &str = "SIPS protects each hop with TLS but every proxy on the path can still change the SDP: this trusts all of them (draft §4.2)";

/// What the SIP side could establish about a call's SDP (the draft's §4.1–4.2).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SipAssurance {
    /// The peer's HIT reached us integrity-protected and bound to its authenticated SIP
    /// identity (a verified SIP Identity header, RFC 8224, or SIPS through trusted proxies).
    pub peer_authenticated: bool,
    /// Our HIT reached the peer likewise (we signed it, or SIPS through trusted proxies).
    pub own_protected: bool,
    /// What authenticated the peer's HIT.
    pub peer_via: Option<Mechanism>,
    /// What protected ours.
    pub own_via: Option<Mechanism>,
    /// Why the peer's HIT is (not) authenticated, for operators.
    pub peer_detail: Option<String>,
    /// Why ours is (not) protected.
    pub own_detail: Option<String>,
    /// The trust this relies on, when it is more than the signer's key (SIPS).
    pub caveat: Option<String>,
}

impl SipAssurance {
    /// The peer's HIT is authenticated by `via`. SIP Identity outranks SIPS: it does not
    /// depend on the proxies.
    pub fn peer_by(&mut self, via: Mechanism, detail: String) {
        if self.peer_via == Some(Mechanism::Identity) && via == Mechanism::Sips {
            return;
        }
        self.peer_authenticated = true;
        self.peer_via = Some(via);
        self.peer_detail = Some(detail);
        self.note_caveat();
    }

    /// The peer's HIT is not (or no longer) authenticated, because of `detail`.
    pub fn peer_not(&mut self, detail: String) {
        self.peer_authenticated = false;
        self.peer_via = None;
        self.peer_detail = Some(detail);
        self.note_caveat();
    }

    /// A note on the peer's HIT that does not change what authenticated it (e.g. a
    /// failed Identity when SIPS still holds).
    pub fn peer_note(&mut self, detail: String) {
        match &mut self.peer_detail {
            Some(d) => {
                d.push_str("; ");
                d.push_str(&detail);
            }
            d => *d = Some(detail),
        }
    }

    /// Our HIT is protected by `via`.
    pub fn own_by(&mut self, via: Mechanism, detail: String) {
        if self.own_via == Some(Mechanism::Identity) && via == Mechanism::Sips {
            return;
        }
        self.own_protected = true;
        self.own_via = Some(via);
        self.own_detail = Some(detail);
        self.note_caveat();
    }

    /// Our HIT is not protected, because of `detail` (keeps a SIPS protection if any).
    pub fn own_not(&mut self, detail: String) {
        if self.own_via == Some(Mechanism::Sips) {
            self.own_detail = Some(format!("{detail}; protected by SIPS only"));
            return;
        }
        self.own_protected = false;
        self.own_via = None;
        self.own_detail = Some(detail);
    }

    fn note_caveat(&mut self) {
        let sips = self.peer_via == Some(Mechanism::Sips) || self.own_via == Some(Mechanism::Sips);
        self.caveat = sips.then(|| SIPS_CAVEAT.to_owned());
    }
}

/// The verification level of a call from its HIP record and its SIP assurance.
///
/// A level other than `pending` and `failed` rests only on an association that reached
/// ESTABLISHED with the checked HIT ([`AssocRecord::reached_established`]); closing it
/// later keeps what it proved, and a record that is merely `closed` — an exchange
/// abandoned or never answered — proves nothing and stays `pending`.
pub fn verification(hip: Option<&AssocRecord>, sip: &SipAssurance) -> Verification {
    match hip {
        Some(r) if r.state == AssocState::Failed => Verification::Failed,
        Some(r) if r.reached_established => match (sip.peer_authenticated, sip.own_protected) {
            (true, true) => Verification::Mutual,
            (true, false) | (false, true) => Verification::SingleSided,
            (false, false) => Verification::Unverified,
        },
        _ => Verification::Pending,
    }
}

/// The record a call's level rests on, among those of its peer HITs: one that proved its
/// HIT, else a failed one, else any.
pub fn best_record<'a>(
    records: impl IntoIterator<Item = &'a AssocRecord>,
) -> Option<&'a AssocRecord> {
    let mut best: Option<&AssocRecord> = None;
    for r in records {
        let rank = |r: &AssocRecord| match (r.reached_established, r.state) {
            (true, _) => 2,
            (false, AssocState::Failed) => 1,
            _ => 0,
        };
        if best.is_none_or(|b| rank(r) > rank(b)) {
            best = Some(r);
        }
    }
    best
}

/// The distinct HITs of a call's SDP identities, in order.
pub fn distinct(hits: impl IntoIterator<Item = Hit>) -> Vec<Hit> {
    let mut seen = HashSet::new();
    hits.into_iter().filter(|h| seen.insert(*h)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(s: &str) -> Hit {
        Hit(s.parse::<std::net::Ipv6Addr>().unwrap().octets())
    }

    /// A verified move counts as a path change only when the peer's address or port
    /// changed; the follow time comes from the kernel's first report and is kept until
    /// the next reported change.
    #[test]
    fn nat_path_changes_are_counted_and_timed_from_the_kernels_report() {
        let ports = |peer| Some(endpoint::UdpPorts { local: 10500, peer });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.11".parse().unwrap();
        let first = NatPath::of(ports(40000));
        assert_eq!(first.unwrap().path_changes, 0);
        // The same path again (an UPDATE that listed it): nothing changed.
        let same = NatPath::moved(first, Some(a), a, ports(40000), None).unwrap();
        assert_eq!((same.path_changes, same.last_follow_ms), (0, None));
        // A NAT rebinding the kernel reported 40 ms ago.
        let seen = Instant::now() - Duration::from_millis(40);
        let rebound = NatPath::moved(Some(same), Some(a), a, ports(20001), Some(seen)).unwrap();
        assert_eq!(rebound.path_changes, 1);
        assert!(
            rebound.last_follow_ms.is_some_and(|ms| ms >= 40),
            "{rebound:?}"
        );
        // A move the peer announced itself: counted, the last reported time kept.
        let moved = NatPath::moved(Some(rebound), Some(a), b, ports(20001), None).unwrap();
        assert_eq!(moved.path_changes, 2);
        assert_eq!(moved.last_follow_ms, rebound.last_follow_ms);
        // Leaving UDP (raw HIP again) leaves no NAT path.
        assert_eq!(NatPath::moved(Some(moved), Some(b), b, None, None), None);
    }

    #[test]
    fn sas_is_symmetric_and_depends_on_both_hits() {
        let (a, b, c) = (hit("2001:20::a"), hit("2001:20::b"), hit("2001:20::c"));
        assert_eq!(short_auth_string(a, b), short_auth_string(b, a));
        assert_ne!(short_auth_string(a, b), short_auth_string(a, c));
        let s = short_auth_string(a, b);
        assert_eq!(s.len(), 7);
        assert!(s.chars().all(|ch| ch.is_ascii_digit() || ch == ' '));
    }

    fn rec(state: AssocState, reached: bool) -> AssocRecord {
        AssocRecord {
            peer_hit: "2001:20::b".into(),
            local_hit: "2001:20::a".into(),
            state,
            reached_established: reached,
            lost: None,
            initiator: true,
            peer_locator: None,
            local_locator: None,
            nat: None,
            esp_transform: None,
            kernel: None,
            error: None,
            actual_peer_hit: None,
            established_at: None,
            timing_ms: Timing::default(),
            rekeys: 0,
        }
    }

    #[test]
    fn verification_levels_follow_the_drafts_section_4() {
        let mut both = SipAssurance::default();
        both.peer_by(Mechanism::Identity, "INVITE signed".into());
        both.own_by(Mechanism::Identity, "UPDATE signed".into());
        // Only the caller signs (§4.4): the callee sees the caller authenticated...
        let mut callee = SipAssurance::default();
        callee.peer_by(Mechanism::Identity, "INVITE signed".into());
        // ...the caller only knows its own HIT went out signed.
        let mut caller = SipAssurance::default();
        caller.own_by(Mechanism::Identity, "INVITE signed".into());
        let est = rec(AssocState::Established, true);
        let est = Some(&est);
        assert_eq!(verification(est, &both), Verification::Mutual);
        assert_eq!(verification(est, &callee), Verification::SingleSided);
        assert_eq!(verification(est, &caller), Verification::SingleSided);
        assert_eq!(
            verification(est, &SipAssurance::default()),
            Verification::Unverified
        );
        // A closed association keeps the level it reached.
        let closed = rec(AssocState::Closed, true);
        assert_eq!(verification(Some(&closed), &both), Verification::Mutual);
        assert_eq!(
            verification(Some(&rec(AssocState::Failed, false)), &both),
            Verification::Failed
        );
        assert_eq!(
            verification(Some(&rec(AssocState::Exchanging, false)), &both),
            Verification::Pending
        );
        assert_eq!(verification(None, &both), Verification::Pending);
    }

    #[test]
    fn a_closed_record_that_never_reached_established_proves_nothing() {
        // Regression (reliability issue, finding 1): an exchange that was abandoned or
        // never answered ends `closed`; with both Identities verified it used to read
        // `mutual`. It stays `pending`, live and after the call, whatever SIP says.
        let mut both = SipAssurance::default();
        both.peer_by(Mechanism::Identity, "INVITE signed".into());
        both.own_by(Mechanism::Identity, "UPDATE signed".into());
        for state in [
            AssocState::Closed,
            AssocState::Closing,
            AssocState::Exchanging,
        ] {
            assert_eq!(
                verification(Some(&rec(state, false)), &both),
                Verification::Pending,
                "{state:?}"
            );
        }
        // The record a call's level rests on: the one that proved its HIT.
        let (a, b, c) = (
            rec(AssocState::Closed, false),
            rec(AssocState::Established, true),
            rec(AssocState::Failed, false),
        );
        assert!(std::ptr::eq(best_record([&a, &b, &c]).unwrap(), &b));
        assert!(std::ptr::eq(best_record([&a, &c]).unwrap(), &c));
        assert!(best_record(std::iter::empty()).is_none());
    }

    #[test]
    fn identity_outranks_sips_and_sips_carries_its_caveat() {
        let mut a = SipAssurance::default();
        a.peer_by(Mechanism::Sips, "sips over TLS".into());
        a.own_by(Mechanism::Sips, "sips over TLS".into());
        assert_eq!(a.caveat.as_deref(), Some(SIPS_CAVEAT));
        let est = rec(AssocState::Established, true);
        assert_eq!(verification(Some(&est), &a), Verification::Mutual);
        // A verified Identity replaces SIPS for the peer; SIPS does not replace Identity.
        a.peer_by(Mechanism::Identity, "signed".into());
        a.peer_by(Mechanism::Sips, "sips".into());
        assert_eq!(a.peer_via, Some(Mechanism::Identity));
        assert_eq!(a.peer_detail.as_deref(), Some("signed"));
        // Our unsigned UPDATE does not undo SIPS on our side.
        a.own_not("UPDATE refused".into());
        assert!(a.own_protected);
        assert!(a.own_detail.as_deref().unwrap().contains("SIPS only"));
        assert_eq!(a.caveat.as_deref(), Some(SIPS_CAVEAT), "still relied upon");
        // Without SIPS, a failure to deliver our signed UPDATE leaves us unprotected.
        let mut b = SipAssurance::default();
        b.own_by(Mechanism::Identity, "UPDATE sent".into());
        b.own_not("UPDATE timed out".into());
        assert!(!b.own_protected);
        assert_eq!(b.own_via, None);
        assert_eq!(b.caveat, None);
        // Losing the peer's authentication clears its mechanism.
        b.peer_by(Mechanism::Identity, "ok".into());
        b.peer_not("HITs changed in an unsigned UPDATE".into());
        assert!(!b.peer_authenticated);
        assert_eq!(b.peer_via, None);
        assert_eq!(verification(Some(&est), &b), Verification::Unverified);
    }
}
