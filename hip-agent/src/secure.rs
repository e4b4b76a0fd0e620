//! HIP for the agent's calls: the base exchange towards the HIT learned through SIP, the
//! responder's acceptance policy (the draft's known-HITs pool), the kernel offload of
//! established associations, and how well each peer was verified (the draft's §4).
//!
//! The daemon's loop owns one [`Security`] and calls it from [`crate::daemon`]'s
//! `dispatch`: [`Security::initiate`] when a call we placed is answered,
//! [`Security::authorize`] when we answer one, [`Security::close`] when a call ends; it
//! waits on [`Security::wait`] and passes what arrives to [`Security::handle`] for what happened (an association established, refused,
//! closed) and updates the calls it shows.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use hip_kernel::{AddressEvent, AddressEvents, KernelEvent};
use hip_proto::{
    Hit, HostId,
    endpoint::{self, Endpoint, Event, ProtocolError},
    esp::EspSuite,
    keyfile,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    config::{AcceptPolicy, Config},
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
    /// Whether we sent I1.
    pub initiator: bool,
    /// The peer's locator.
    pub peer_locator: Option<IpAddr>,
    /// Our locator.
    pub local_locator: Option<IpAddr>,
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
}

/// The HITs a responder accepts I2s from: the HITs offered in calls we answered, counted
/// per call (two calls with the same peer host share its HIT).
#[derive(Clone, Default)]
struct Authorized(Arc<Mutex<HashMap<Hit, u32>>>);

impl Authorized {
    fn add(&self, h: Hit) {
        *self.0.lock().expect("authorized").entry(h).or_insert(0) += 1;
    }
    fn remove(&self, h: Hit) {
        let mut m = self.0.lock().expect("authorized");
        if let Some(n) = m.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                m.remove(&h);
            }
        }
    }
    fn contains(&self, h: &Hit) -> bool {
        self.0.lock().expect("authorized").contains_key(h)
    }
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
    /// Opportunistic I1s (null HIT) sent, keyed by peer locator → the HIT SIP told us.
    expected_at: HashMap<IpAddr, Hit>,
    /// The host's address changes (RFC 8046 mobility); `None` with a fixed `[hip] locator`.
    addrs: Option<AddressEvents>,
    /// Locator moves announced (UPDATE sent) and not yet confirmed, per peer.
    moving: HashMap<Hit, IpAddr>,
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
            ..endpoint::Config::default()
        };
        if let Some(k) = cfg.hip.puzzle_difficulty {
            ecfg.puzzle_difficulty = k;
        }
        ecfg.opportunistic = true;
        let mut ep = Endpoint::new(
            ecfg,
            identity,
            hip_driver::os_rng()?,
            std::time::Instant::now(),
        )?;
        if let Some(o) = &offload {
            ep.set_spi_allocator(Box::new(o.spi_allocator()));
        }
        let authorized = Authorized::default();
        if cfg.hip.accept == AcceptPolicy::Known {
            let a = authorized.clone();
            ep.set_policy(Box::new(move |h: &Hit, _: &HostId| {
                let ok = a.contains(h);
                if !ok {
                    tracing::warn!(peer = %h, "refusing I2: HIT not offered in a call we answered (known-HITs pool)");
                }
                ok
            }));
        }
        let driver = HipDriver::spawn(ep, Sockets::open()?);
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
            addrs,
            moving: HashMap::new(),
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
            initiator,
            peer_locator: locator,
            local_locator: None,
            esp_transform: None,
            kernel: None,
            error: None,
            actual_peer_hit: None,
            established_at: None,
            timing_ms: Timing {
                started: Some(crate::daemon::unix_ms()),
                ..Timing::default()
            },
            rekeys: 0,
        })
    }

    /// Starts a base exchange with the host at `locator`, which must prove it holds the
    /// key behind `expected` (the HIT its SDP carried).
    pub async fn initiate(&mut self, locator: IpAddr, expected: Hit) -> Result<(), String> {
        if matches!(
            self.records.get(&expected).map(|r| r.state),
            Some(AssocState::Established | AssocState::Exchanging)
        ) {
            return Ok(());
        }
        self.records.remove(&expected);
        self.record(expected, true, Some(locator));
        // With `i1_to_null_hit`, the I1 goes to the null HIT and the endpoint checks the
        // responder's HI against `expected` on R1 (a mismatch fails before any I2).
        tracing::info!(peer = %expected, %locator, via_null = self.i1_to_null, "starting HIP base exchange");
        let r = if self.i1_to_null {
            self.expected_at.insert(locator, expected);
            self.driver
                .initiate_expecting(self.local_locator, locator, expected)
                .await
        } else {
            self.driver
                .initiate(self.local_locator, locator, Some(expected))
                .await
        };
        if let Err(e) = r {
            self.expected_at.remove(&locator);
            let rec = self.record(expected, true, Some(locator));
            rec.state = AssocState::Failed;
            rec.error = Some(e.to_string());
            return Err(e.to_string());
        }
        Ok(())
    }

    /// Lets `hits` (offered in a call we answer) associate with us as initiators.
    pub fn authorize(&mut self, hits: &[Hit]) {
        for h in hits {
            self.authorized.add(*h);
            self.record(*h, false, None);
        }
    }

    /// Undoes [`Security::authorize`] for a call that ended.
    pub fn deauthorize(&mut self, hits: &[Hit]) {
        for h in hits {
            self.authorized.remove(*h);
        }
    }

    /// Ends the association with `peer` (CLOSE; the kernel objects go when it is closed,
    /// or at once if there was nothing to close).
    pub async fn close(&mut self, peer: Hit) {
        let state = self.records.get(&peer).map(|r| r.state);
        match state {
            Some(AssocState::Established) => {
                if let Err(e) = self.driver.close(peer).await {
                    tracing::warn!(%peer, "CLOSE: {e}; removing the kernel state directly");
                    self.closed(peer).await;
                } else if let Some(r) = self.records.get_mut(&peer) {
                    r.state = AssocState::Closing;
                }
            }
            Some(AssocState::Exchanging) => {
                let _ = self.driver.close(peer).await;
                self.closed(peer).await;
            }
            _ => {}
        }
    }

    async fn closed(&mut self, peer: Hit) {
        if let Some(o) = &mut self.offload
            && let Err(e) = o.remove(peer).await
        {
            tracing::error!(%peer, "removing the association from the kernel: {e}");
        }
        if let Some(r) = self.records.get_mut(&peer)
            && r.state != AssocState::Failed
        {
            r.state = AssocState::Closed;
        }
    }

    /// The record of the association with `peer`.
    pub fn get(&self, peer: &Hit) -> Option<&AssocRecord> {
        self.records.get(peer)
    }

    /// Every association record.
    pub fn records(&self) -> impl Iterator<Item = &AssocRecord> {
        self.records.values()
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
                    self.expected_at.remove(&e.peer_locator);
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
                r.initiator = e.initiator;
                r.peer_locator = Some(e.peer_locator);
                r.local_locator = Some(e.local_locator);
                r.esp_transform = Some(format!("{:?}", e.esp_suite));
                r.kernel = kernel;
                r.error = None;
                r.timing_ms.established = Some(established_ms);
                r.timing_ms.offloaded = r.kernel.as_ref().map(|_| crate::daemon::unix_ms());
                r.established_at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
                tracing::info!(%peer, locator = %e.peer_locator, spi_in = format_args!("{:#x}", e.spi_inbound), spi_out = format_args!("{:#x}", e.spi_outbound), "HIP association established");
                Outcome::Established { peer }
            }
            Event::Failed {
                peer_hit,
                peer_locator,
                error,
            } => {
                let expected = self.expected_at.remove(&peer_locator);
                let peer = match (expected, peer_hit) {
                    (Some(x), _) => x,
                    (None, Some(p)) => p,
                    (None, None) => return Outcome::Nothing,
                };
                let mismatch = matches!(error, ProtocolError::HitMismatch { .. });
                let text = if mismatch {
                    format!("HIT mismatch (the peer is not who its SDP said): {error}")
                } else {
                    error.to_string()
                };
                let r = self.record(peer, true, Some(peer_locator));
                r.state = AssocState::Failed;
                r.error = Some(text.clone());
                if let ProtocolError::HitMismatch { actual, .. } = &error {
                    r.actual_peer_hit = Some(actual.to_string());
                }
                tracing::error!(%peer, %peer_locator, "HIP exchange failed: {text}");
                Outcome::Failed {
                    peer,
                    error: text,
                    mismatch,
                }
            }
            Event::Closed { peer_hit, by_peer } => {
                tracing::info!(peer = %peer_hit, by_peer, "HIP association closed");
                self.closed(peer_hit).await;
                Outcome::Closed { peer: peer_hit }
            }
            Event::Rekeyed(r) => {
                if let Some(o) = &mut self.offload {
                    match o.rekeyed(&r).await {
                        Ok(i) => {
                            if let Some(rec) = self.records.get_mut(&r.peer_hit) {
                                rec.kernel = Some(i);
                            }
                        }
                        Err(e) => tracing::error!(peer = %r.peer_hit, "rekey in the kernel: {e}"),
                    }
                }
                Outcome::Nothing
            }
            Event::RekeyCompleted {
                peer_hit,
                old_spi_inbound,
                ..
            } => {
                if let Some(o) = &mut self.offload {
                    if let Err(e) = o.rekey_completed(peer_hit, old_spi_inbound).await {
                        tracing::error!(peer = %peer_hit, "completing the rekey in the kernel: {e}");
                    }
                    if let Some(rec) = self.records.get_mut(&peer_hit) {
                        rec.kernel = o.get(&peer_hit);
                        rec.rekeys += 1;
                    }
                }
                tracing::info!(peer = %peer_hit, "ESP SAs rekeyed");
                Outcome::Nothing
            }
            Event::LocatorsChanged {
                peer_hit,
                local_locator,
                peer_locator,
            } => {
                tracing::info!(peer = %peer_hit, %local_locator, %peer_locator, "locators changed (UPDATE)");
                self.moving.remove(&peer_hit);
                if let Some(o) = &mut self.offload {
                    match o
                        .locators_changed(peer_hit, local_locator, peer_locator)
                        .await
                    {
                        Ok(i) => {
                            if let Some(rec) = self.records.get_mut(&peer_hit) {
                                rec.kernel = Some(i);
                            }
                        }
                        Err(e) => tracing::error!(peer = %peer_hit, "moving the SAs: {e}"),
                    }
                }
                if let Some(rec) = self.records.get_mut(&peer_hit) {
                    rec.local_locator = Some(local_locator);
                    rec.peer_locator = Some(peer_locator);
                }
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
                tracing::error!(%sa, "hard lifetime reached: the kernel deleted the SA; the peer HIT stays blocked until a new exchange");
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

/// The verification level of a call from its HIP state and its SIP assurance.
pub fn verification(hip: Option<AssocState>, sip: &SipAssurance) -> Verification {
    match hip {
        Some(AssocState::Failed) => Verification::Failed,
        Some(AssocState::Established | AssocState::Closing | AssocState::Closed) => {
            match (sip.peer_authenticated, sip.own_protected) {
                (true, true) => Verification::Mutual,
                (true, false) | (false, true) => Verification::SingleSided,
                (false, false) => Verification::Unverified,
            }
        }
        _ => Verification::Pending,
    }
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

    #[test]
    fn sas_is_symmetric_and_depends_on_both_hits() {
        let (a, b, c) = (hit("2001:20::a"), hit("2001:20::b"), hit("2001:20::c"));
        assert_eq!(short_auth_string(a, b), short_auth_string(b, a));
        assert_ne!(short_auth_string(a, b), short_auth_string(a, c));
        let s = short_auth_string(a, b);
        assert_eq!(s.len(), 7);
        assert!(s.chars().all(|ch| ch.is_ascii_digit() || ch == ' '));
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
        let est = Some(AssocState::Established);
        assert_eq!(verification(est, &both), Verification::Mutual);
        assert_eq!(verification(est, &callee), Verification::SingleSided);
        assert_eq!(verification(est, &caller), Verification::SingleSided);
        assert_eq!(
            verification(est, &SipAssurance::default()),
            Verification::Unverified
        );
        // A closed association keeps the level it reached.
        assert_eq!(
            verification(Some(AssocState::Closed), &both),
            Verification::Mutual
        );
        assert_eq!(
            verification(Some(AssocState::Failed), &both),
            Verification::Failed
        );
        assert_eq!(
            verification(Some(AssocState::Exchanging), &both),
            Verification::Pending
        );
        assert_eq!(verification(None, &both), Verification::Pending);
    }

    #[test]
    fn identity_outranks_sips_and_sips_carries_its_caveat() {
        let mut a = SipAssurance::default();
        a.peer_by(Mechanism::Sips, "sips over TLS".into());
        a.own_by(Mechanism::Sips, "sips over TLS".into());
        assert_eq!(a.caveat.as_deref(), Some(SIPS_CAVEAT));
        assert_eq!(
            verification(Some(AssocState::Established), &a),
            Verification::Mutual
        );
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
        assert_eq!(
            verification(Some(AssocState::Established), &b),
            Verification::Unverified
        );
    }
}
