//! The daemon: one event loop that joins the SIP user agent (UDP/TCP/TLS), the known-HITs
//! pool, the control socket, DNS verification of peer HITs, and [`Security`] — the HIP
//! driver, the XFRM/eBPF offload of each association and the host's address changes. It
//! applies the draft's §4 call policy (Identity, signed UPDATE, SIPS, the verification
//! level) and turns call outcomes into HIP actions.
//!
//! # The seam for HIP
//!
//! Every call outcome that matters beyond SIP becomes an [`AgentEvent`], handed to
//! `Daemon::dispatch` on the loop's task:
//!
//! * [`AgentEvent::PeerHitsLearned`] when a dialog is confirmed (UAC: 2xx received and ACK
//!   sent; UAS: ACK received) or new SDP arrives in it (UPDATE/re-INVITE), after the pool was
//!   updated — the place to start the HIP base exchange with the expected peer HIT;
//! * [`AgentEvent::CallEnded`] on BYE/CANCEL/rejection/timeout — the place to close the HIP
//!   association and remove SAs, policies and map entries.
//!
//! `dispatch` is the one place to hook in; observers outside the loop (tests, metrics) can
//! [`Daemon::subscribe`] to a broadcast of the same events.
//!
//! # What vouches for the HITs (the draft's §4)
//!
//! Each call's [`SipAssurance`] is computed here from the `[security]` table:
//!
//! * caller: with an identity key our INVITE carries a SIP Identity header binding our HIT
//!   (own HIT protected); the callee's HIT counts as authenticated once its §4.1 UPDATE
//!   arrives with an Identity that verifies against the same HITs;
//! * callee: the INVITE's Identity is verified against its SDP (peer authenticated); with
//!   an identity key we follow the ACK with a signed UPDATE carrying our SDP again (own HIT
//!   protected once the UPDATE is accepted);
//! * SIPS (§4.2): a `sips:` Request-URI over TLS protects both, if `trust_sips_proxies`.
//!
//! A valid Identity that binds other HITs than the SDP carries (or than the answer
//! carried, for the caller's view of the UPDATE) is tampering: the call is flagged
//! `failed` and `[hip] on_failure` applies (for an unanswered INVITE: 438 Invalid
//! Identity Header, RFC 8224 §6.2.2). Any other Identity failure leaves the peer
//! unauthenticated, with the reason in `sip_assurance.peer_detail`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hip_sip::{
    identity,
    sdp::{self, Form, Hit, HostIdentity as SdpIdentity, IdentityEntry, Sdp, SdpError},
    sip::{
        CallHandle, CallInfo, Direction, EndReason, Event, KeepAlive, RequestAuth, Transport,
        UaConfig, UserAgent,
    },
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    config::{AnswerMode, Config, FailureAction},
    control::{self, Request},
    pool::{self, Pool},
    secure::{self, Input, Mechanism, Outcome, Security, SipAssurance, Verification},
    sip_service::{Inbound, SipService},
};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Our identity could not be loaded or does not match the configured HIT.
    #[error("identity: {0}")]
    Identity(String),
    /// `[dns]` could not be set up (trust anchor, TSIG key, identity).
    #[error("[dns] {0}")]
    Dns(String),
    /// The pool file is unusable.
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    /// A transport could not be set up.
    #[error(transparent)]
    Transport(#[from] crate::sip_service::TransportError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The metrics endpoint could not be set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// HIP or its kernel offload could not start (the message says what is missing).
    #[error(transparent)]
    Security(#[from] secure::SecurityError),
    /// A `[security]` key file could not be used.
    #[error("[security] {path}: {message}")]
    SipIdentity {
        /// The key file.
        path: String,
        /// Why.
        message: String,
    },
}

/// The draft's §4 mechanisms as configured in `[security]`, keys loaded.
pub struct SipSecurity {
    /// Our domain's ES256 key and the `info` URI of our Identity headers.
    pub(crate) signer: Option<(identity::SigningKey, String)>,
    /// Who may sign for which domain.
    pub(crate) trust: identity::Trust,
    /// `iat` window, seconds.
    pub(crate) window: u64,
    /// Count SIPS over TLS as protection (§4.2).
    trust_sips: bool,
}

fn read_key_file(path: &std::path::Path, private: bool) -> Result<String, DaemonError> {
    let err = |message: String| DaemonError::SipIdentity {
        path: path.display().to_string(),
        message,
    };
    if private {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        // A signing key others can read lets them speak for our domain.
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(err(format!(
                "private key is readable by group or others (mode {:o}): chmod 600",
                meta.permissions().mode() & 0o777
            )));
        }
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

impl SipSecurity {
    /// Loads the keys named in `[security]`.
    pub fn load(cfg: &Config) -> Result<Self, DaemonError> {
        let sec = &cfg.security;
        let err = |path: &std::path::Path, e: identity::IdentityError| DaemonError::SipIdentity {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let signer = match (&sec.identity_key, &sec.identity_info) {
            (Some(path), Some(info)) => {
                let key = identity::SigningKey::from_pem(&read_key_file(path, true)?)
                    .map_err(|e| err(path, e))?;
                Some((key, info.clone()))
            }
            _ => None,
        };
        let mut trust = identity::Trust::default();
        for (domain, path) in &sec.trusted_identities {
            let key = identity::VerifyingKey::from_pem(&read_key_file(path, false)?)
                .map_err(|e| err(path, e))?;
            trust.insert(domain, key);
        }
        Ok(Self {
            signer,
            trust,
            window: sec.identity_freshness_secs,
            trust_sips: sec.trust_sips_proxies,
        })
    }
}

/// Seconds since the Unix epoch (PASSporT `iat`, RFC 8225 §5.1.1).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// SIPS (draft §4.2): a `sips:` Request-URI with TLS on the hop we see protects both HITs,
/// if the operator trusts the proxies.
fn apply_sips(sec: &SipSecurity, a: &mut SipAssurance, sips: bool, transport: Option<Transport>) {
    if !sips {
        return;
    }
    if transport != Some(Transport::Tls) {
        a.peer_note(format!(
            "sips: Request-URI, but our hop is {}: no SIPS protection",
            transport.map_or("unknown".to_owned(), |t| t.to_string())
        ));
        return;
    }
    if !sec.trust_sips {
        a.peer_note("SIPS over TLS, not counted: [security] trust_sips_proxies is off".into());
        return;
    }
    let d = "SIPS: sips: Request-URI and TLS on our hop; every proxy trusted (draft §4.2)";
    a.peer_by(Mechanism::Sips, d.into());
    a.own_by(Mechanism::Sips, d.into());
}

fn distinct_sdp_hits(ids: &[IdentityEntry]) -> Vec<Hit> {
    let mut v: Vec<Hit> = Vec::new();
    for i in ids {
        if !v.contains(&i.hit) {
            v.push(i.hit);
        }
    }
    v
}

/// What the daemon's loop reports to the rest of the agent (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum AgentEvent {
    /// A confirmed dialog told us the peer's HIT(s); the pool now holds them.
    PeerHitsLearned {
        /// The call.
        call: CallHandle,
        /// Who started it.
        direction: Direction,
        /// The peer's SIP URI the HITs are bound to.
        peer_uri: String,
        /// Call-ID.
        call_id: String,
        /// The peer's Contact (a locator hint for HIP).
        peer_contact: Option<String>,
        /// Every identity from the peer's SDP (HIT, HI if sent, scope, form).
        identities: Vec<IdentityEntry>,
    },
    /// The call is over.
    CallEnded {
        /// The call.
        call: CallHandle,
        /// The peer's SIP URI.
        peer_uri: String,
        /// Call-ID.
        call_id: String,
        /// Why.
        reason: EndReason,
    },
}

/// Our own Host Identity as it goes into SDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnIdentity {
    /// Our HIT.
    pub hit: Hit,
    /// Our HI (2-octet HI algorithm ID, RFC 7401 §5.2.9, then the HOST_ID "Host Identity"
    /// field), when loaded from a key file.
    pub hi: Option<Vec<u8>>,
}

/// Loads our identity: the key file through `hip_proto::keyfile` (HIT and HI), or the HIT
/// from the config. If both are given they must agree.
pub fn load_own_identity(cfg: &Config) -> Result<OwnIdentity, DaemonError> {
    let from_file = match &cfg.identity {
        Some(path) => {
            let id = hip_proto::keyfile::load(path)
                .map_err(|e| DaemonError::Identity(format!("{}: {e}", path.display())))?;
            let mut hi = (id.host_id().algorithm() as u16).to_be_bytes().to_vec();
            hi.extend_from_slice(&id.host_id().to_hi_bytes());
            Some(OwnIdentity {
                hit: Hit(id.hit().0),
                hi: Some(hi),
            })
        }
        None => None,
    };
    match (from_file, cfg.hit) {
        (Some(f), Some(h)) if f.hit != h => Err(DaemonError::Identity(format!(
            "configured hit {h} is not the key file's HIT {}",
            f.hit
        ))),
        (Some(f), _) => Ok(f),
        (None, Some(hit)) => Ok(OwnIdentity { hit, hi: None }),
        (None, None) => Err(DaemonError::Identity(
            "no identity or hit configured".into(),
        )),
    }
}

/// HI → HIT for SDP checks: the HI in SDP is the 2-octet algorithm ID followed by the
/// HOST_ID "Host Identity" field; the HIT comes from `hip_proto` (RFC 7401 §3.2 ORCHID).
pub fn derive_hit(hi: &[u8]) -> Result<Hit, String> {
    let (alg, key) = hi
        .split_first_chunk::<2>()
        .ok_or_else(|| "shorter than its 2-octet algorithm ID".to_owned())?;
    let id = hip_proto::HostId::from_hi_bytes(u16::from_be_bytes(*alg), key)
        .map_err(|e| e.to_string())?;
    Ok(Hit(id.hit().0))
}

/// Parses an SDP body and its Host Identity lines.
pub fn identities_in(body: &[u8]) -> Result<(Sdp, Vec<IdentityEntry>), SdpError> {
    let s = Sdp::parse_bytes(body)?;
    let ids = sdp::find_identities(&s, &derive_hit)?;
    Ok((s, ids))
}

#[derive(Debug, Default, Serialize)]
struct Stats {
    calls_in: u64,
    calls_out: u64,
    confirmed: u64,
    ended: u64,
    rejected_bad_sdp: u64,
    bad_input_answered: u64,
    bad_input_dropped: u64,
}

#[derive(Debug, Default, Serialize)]
struct Registration {
    registered: bool,
    expires: Option<u32>,
    error: Option<String>,
}

/// The daemon's state, owned by its loop.
pub struct Daemon {
    cfg: Config,
    own: OwnIdentity,
    ua: UserAgent,
    svc: SipService,
    inbound: Option<mpsc::Receiver<Inbound>>,
    pool: Pool,
    events: broadcast::Sender<AgentEvent>,
    /// Identities from the peer's offer, until the dialog is confirmed.
    offered: HashMap<CallHandle, (Vec<IdentityEntry>, Option<Form>)>,
    /// Delayed answers (`ring_ms`).
    answer_at: BTreeMap<(Instant, CallHandle), ()>,
    /// Calls we placed whose callee's HIT must be verified by then, and INVITEs held for
    /// the caller's DNS record (`[security] require_verified_peer`).
    verify_by: BTreeMap<(Instant, CallHandle), ()>,
    /// The address our SIP signalling used went away; it moves when another one reaches
    /// the next hop.
    sip_address_lost: bool,
    sdp_version: u64,
    stats: Stats,
    registration: Registration,
    /// HIP and its kernel offload (`None` when HIP is off).
    security: Option<Security>,
    /// What HIP needs to know of each call.
    call_sec: HashMap<CallHandle, CallSecurity>,
    /// The last calls that ended, newest last (for `status`).
    history: VecDeque<Value>,
    /// Agent events HIP still has to act on (dispatch is synchronous, HIP is not).
    hip_todo: VecDeque<AgentEvent>,
    /// SIP Identity keys and SIPS trust (the draft's §4).
    sipsec: SipSecurity,
    /// Host Identities in DNS (`[dns]`), when configured.
    dns: Option<crate::dns_verify::DnsVerifier>,
    /// Edge mode (`[edge]`): the SIP proxy for local phones.
    edge: Option<crate::edge::Edge>,
    /// What the metrics endpoint shows that is observed as it happens.
    metrics: crate::metrics::Recorder,
}

/// How many ended calls `status` keeps.
const HISTORY: usize = 32;

/// HIP's view of one call.
#[derive(Debug, Clone, Default)]
struct CallSecurity {
    /// The peer's HITs from its SDP.
    peer_hits: Vec<hip_proto::Hit>,
    /// Whether we accepted its HITs as initiators (we answered, or the callee starts HIP).
    authorized: bool,
    /// The base exchange runs the other way round: the callee, behind a NAT, starts it
    /// (`a=hip-nat:initiate` in its answer, issue 13) and the caller answers it.
    nat_reversed: bool,
    /// What SIP established about the SDP's integrity (draft §4).
    sip: SipAssurance,
    /// The peer's media address and port from its SDP.
    remote_media: Option<(String, u16)>,
    /// Set when HIP refused the peer, or SIP proved its SDP was altered.
    failure: Option<String>,
    /// Set when `[security] require_verified_peer` refused the call: why.
    refused: Option<String>,
    /// An INVITE held for the caller's DNS record (`require_verified_peer`, nothing else
    /// vouched): the refusal to send if DNS does not vouch by `verify_by`.
    dns_hold: Option<(u16, &'static str)>,
    /// Set when its established association ended on its own (dead peer, kernel refusal).
    association_lost: Option<String>,
    /// The peer's HITs as signalling last carried them (answer, offer or UPDATE), kept
    /// apart from `peer_hits` (HIP's view, updated asynchronously) to compare with a
    /// signed UPDATE.
    signalled_hits: Vec<Hit>,
    /// We answered and our signed UPDATE (draft §4.1) is waiting for its answer.
    signed_update_pending: bool,
    /// When the call started (our INVITE sent, or theirs received), Unix milliseconds.
    started_ms: Option<u64>,
    /// When the dialog was confirmed and the peer's HITs learned, Unix milliseconds.
    confirmed_ms: Option<u64>,
}

/// Milliseconds since the Unix epoch (call timing in `status`, for set-up measurements).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn proto_hit(h: Hit) -> hip_proto::Hit {
    hip_proto::Hit(h.0)
}

/// The host of a SIP URI (`sip:bob@192.0.2.4:5060;transport=udp` → `192.0.2.4`).
pub fn uri_host(uri: &str) -> Option<IpAddr> {
    let rest = uri.trim().trim_start_matches('<');
    let rest = rest.split_once(':').map(|(_, r)| r)?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let rest = rest.split([';', '>', '?']).next()?;
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    rest.split(':').next()?.parse().ok()
}

impl Daemon {
    /// Loads the identity and the pool and binds the SIP transports.
    pub async fn new(cfg: Config) -> Result<Self, DaemonError> {
        let own = load_own_identity(&cfg)?;
        let sipsec = SipSecurity::load(&cfg)?;
        let security = if cfg.hip_enabled() {
            let s = Security::start(&cfg).await?;
            if s.local_hit().0 != own.hit.0 {
                return Err(DaemonError::Identity(
                    "the HIP identity's HIT differs from the SDP identity's".into(),
                ));
            }
            Some(s)
        } else {
            None
        };
        let pool = Pool::open(&cfg.pool)?;
        if let Some(s) = &security {
            // Known peers' I1s get their own lane under a flood (RFC 7401 §4.1.1).
            s.expect(pool.entries().flat_map(|e| e.hits()).map(proto_hit));
        }
        let (svc, inbound) = SipService::bind(&cfg).await?;
        let host = cfg
            .contact_host()
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut uc = UaConfig::new(&cfg.sip.user, &cfg.sip.domain, &host, 0);
        uc.ports = svc.local.iter().map(|(t, a)| (*t, a.port())).collect();
        uc.display_name = cfg.sip.display_name.clone();
        uc.auth_user = cfg.sip.auth_user.clone();
        uc.password = cfg.sip.password.clone();
        uc.outbound_proxy = cfg.sip.outbound_proxy.map(|t| (t.transport, t.addr));
        uc.registrar = cfg.sip.registrar.map(|t| (t.transport, t.addr));
        uc.register_expires = cfg.sip.register_expires;
        uc.keepalive = match cfg.sip.keepalive_secs {
            None => KeepAlive::Rfc5626,
            Some(0) => KeepAlive::Off,
            Some(n) => KeepAlive::Every(Duration::from_secs(n)),
        };
        uc.timers = cfg.sip.timers;
        uc.limits = cfg.limits.sip();
        uc.seed = rand::random();
        let (events, _) = broadcast::channel(1024);
        let dns = crate::dns_verify::start(&cfg, &own)?;
        let edge = crate::edge::Edge::bind(&cfg, &own, &sipsec).await?;
        Ok(Self {
            edge,
            ua: UserAgent::new(uc),
            own,
            svc,
            inbound: Some(inbound),
            pool,
            events,
            offered: HashMap::new(),
            answer_at: BTreeMap::new(),
            verify_by: BTreeMap::new(),
            sip_address_lost: false,
            sdp_version: 1,
            stats: Stats::default(),
            registration: Registration::default(),
            security,
            call_sec: HashMap::new(),
            history: VecDeque::new(),
            hip_todo: VecDeque::new(),
            sipsec,
            dns,
            metrics: crate::metrics::Recorder::default(),
            cfg,
        })
    }

    /// Receives every [`AgentEvent`] (for observers outside the loop).
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Local transport addresses actually bound.
    pub fn local_addrs(&self) -> &[(hip_sip::sip::Transport, SocketAddr)] {
        &self.svc.local
    }

    /// Runs until `shutdown` resolves; then flushes the pool and removes the socket.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        let listener = control::bind(&self.cfg.control_socket)?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<control::Incoming>(64);
        let metrics_task = match self.cfg.metrics.listen {
            Some(addr) => Some(tokio::spawn(crate::metrics::serve(
                crate::metrics::bind(addr)?,
                ctl_tx.clone(),
            ))),
            None => None,
        };
        let ctl_task = tokio::spawn(control::serve(listener, ctl_tx));
        let mut inbound = self.inbound.take().expect("run once");
        if self.cfg.sip.register
            && let Err(e) = self.ua.register(Instant::now())
        {
            self.registration.error = Some(e.to_string());
        }
        let mut flush = tokio::time::interval(Duration::from_millis(200));
        tokio::pin!(shutdown);
        tracing::info!(
            hit = %self.own.hit,
            listen = ?self.svc.local,
            "hip-agent running as sip:{}@{}",
            self.cfg.sip.user,
            self.cfg.sip.domain
        );
        loop {
            self.drain().await;
            let next = [
                self.ua.poll_timeout(),
                self.answer_at.keys().next().map(|(t, _)| *t),
                self.verify_by.keys().next().map(|(t, _)| *t),
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = inbound.recv() => {
                    let Some(ev) = ev else { break };
                    self.on_inbound(ev);
                    // Take what else is already queued before sending anything (batching).
                    for _ in 0..64 {
                        match inbound.try_recv() {
                            Ok(ev) => self.on_inbound(ev),
                            Err(_) => break,
                        }
                    }
                }
                Some((req, reply)) = ctl_rx.recv() => {
                    let v = self.on_control(req).await;
                    let _ = reply.send(v);
                }
                () = sleep => self.on_timers(),
                _ = flush.tick() => {
                    self.flush_pool();
                    // A message begun on a connection and not finished in time (a drip,
                    // or a request half-sent and abandoned) costs the connection.
                    for conn in self.ua.expired_streams(Instant::now()) {
                        tracing::info!(?conn, "closing a connection: its SIP message did not complete in time");
                        self.svc.close(conn);
                    }
                }
                answer = async {
                    match &mut self.dns {
                        Some(d) => d.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.on_dns(answer),
                input = async {
                    match &mut self.edge {
                        Some(e) => e.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(e) = &mut self.edge {
                        e.handle(input, self.security.as_mut(), &mut self.pool).await;
                    }
                }
                input = async {
                    match &mut self.security {
                        Some(s) => s.wait().await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Handled outside the select: kernel programming must not be cancelled.
                    if let Input::Address(change) = input {
                        self.on_local_address(change).await;
                    }
                    if let Some(s) = &mut self.security {
                        let out = s.handle(input).await;
                        self.on_security(out).await;
                    }
                }
                () = &mut shutdown => break,
            }
        }
        ctl_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(s) = self.security.take() {
            s.shutdown().await;
        }
        self.flush_pool();
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        tracing::info!("hip-agent stopped");
        Ok(())
    }

    /// The host's addresses changed (mobility). HIP moves the media (an UPDATE with the
    /// new LOCATOR_SET, in `Security`); this moves the signalling when the address it used
    /// is gone: the UDP listener is bound again at the address that now reaches the next
    /// hop, later messages carry it in Via and Contact, the registration is renewed, and
    /// each confirmed call gets a target refresh (an UPDATE without SDP, RFC 3311) so that
    /// the peer's in-dialog requests — its BYE — find us. No re-INVITE: media is
    /// addressed to HITs and does not change.
    async fn on_local_address(&mut self, change: hip_kernel::AddressEvent) {
        let Ok(current) = self.ua.config().contact_host.parse::<IpAddr>() else {
            return;
        };
        if change == hip_kernel::AddressEvent::Removed(current) {
            tracing::warn!(%current, "the address our SIP signalling uses was removed");
            self.sip_address_lost = true;
        }
        if !self.sip_address_lost {
            return;
        }
        let hop = self
            .cfg
            .sip
            .outbound_proxy
            .or(self.cfg.sip.registrar)
            .map(|t| t.addr.ip())
            .or_else(|| {
                self.ua
                    .calls()
                    .iter()
                    .find_map(|c| c.remote_target.as_deref().and_then(uri_host))
            });
        let Some(hop) = hop else {
            tracing::warn!("no next hop to choose a new SIP address by");
            return;
        };
        let new = match crate::hip_driver::source_for(hop) {
            Ok(a) if a != current => a,
            Ok(_) => return,
            Err(e) => {
                tracing::info!(%hop, "no address reaches the next hop yet: {e}");
                return;
            }
        };
        match self.svc.move_udp(current, new).await {
            Ok(moved) => tracing::info!(from = %current, to = %new, ?moved, "SIP signalling moves"),
            Err(e) => {
                tracing::error!(to = %new, "moving the SIP listener: {e}");
                return;
            }
        }
        self.sip_address_lost = false;
        self.ua.set_contact_host(&new.to_string());
        let now = Instant::now();
        if self.cfg.sip.register
            && let Err(e) = self.ua.register(now)
        {
            tracing::error!("re-REGISTER after the move: {e}");
        }
        let confirmed: Vec<CallHandle> = self
            .ua
            .calls()
            .iter()
            .filter(|c| c.state == hip_sip::sip::CallState::Confirmed)
            .map(|c| c.handle)
            .collect();
        for h in confirmed {
            if let Err(e) = self.ua.refresh_target(now, h) {
                tracing::error!(call = %h, "target refresh after the move: {e}");
            }
        }
    }

    fn flush_pool(&mut self) {
        if let Err(e) = self.pool.flush() {
            tracing::error!("{e}");
        }
    }

    /// Sends what the UA produced and handles its events, until both are empty.
    async fn drain(&mut self) {
        loop {
            let mut did = false;
            while let Some(t) = self.ua.poll_transmit() {
                did = true;
                self.svc.send(t).await;
            }
            while let Some(e) = self.ua.poll_event() {
                did = true;
                self.on_sip_event(e);
            }
            while let Some(ev) = self.hip_todo.pop_front() {
                did = true;
                self.on_agent_event(ev).await;
            }
            if !did {
                break;
            }
        }
    }

    fn on_inbound(&mut self, ev: Inbound) {
        self.svc.observe(&ev);
        let now = Instant::now();
        match ev {
            Inbound::Datagram { peer, data } => {
                self.ua
                    .handle_datagram(now, hip_sip::sip::Transport::Udp, peer, &data);
            }
            Inbound::Stream {
                conn,
                transport,
                peer,
                data,
            } => {
                if !self.ua.handle_stream(now, transport, conn, peer, &data) {
                    self.svc.close(conn);
                }
            }
            Inbound::Closed { conn } => self.ua.connection_closed(conn),
            Inbound::Opened { .. } => {}
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        self.ua.handle_timeout(now);
        while let Some((&(t, h), ())) = self.answer_at.iter().next() {
            if t > now {
                break;
            }
            self.answer_at.remove(&(t, h));
            self.answer(h);
        }
        while let Some((&(t, h), ())) = self.verify_by.iter().next() {
            if t > now {
                break;
            }
            self.verify_by.remove(&(t, h));
            let Some(cs) = self.call_sec.get_mut(&h) else {
                continue;
            };
            if cs.sip.peer_authenticated {
                continue;
            }
            if cs.dns_hold.is_some() {
                let why = format!(
                    "the caller's DNS record did not vouch for its HIT within {} ms: {}",
                    self.cfg.security.peer_verify_timeout_ms,
                    cs.sip.peer_detail.as_deref().unwrap_or("no answer")
                );
                self.refuse_held(h, why);
                continue;
            }
            let why = format!(
                "the callee's HIT was not verified within {} ms of the answer ([security] require_verified_peer): {}",
                self.cfg.security.peer_verify_timeout_ms,
                cs.sip
                    .peer_detail
                    .as_deref()
                    .unwrap_or("nothing vouched for it")
            );
            tracing::warn!(call = %h, "hanging up: {why}");
            cs.refused = Some(why);
            let _ = self.ua.hangup(now, h);
        }
    }

    /// Our SDP: an offer, or an answer to `offer` (`hip_sip::sdp::offer`: one `m=` per
    /// offered stream, audio accepted on our RTP port), with our identity in the
    /// configured or mirrored form. With HIP, media goes HIT to HIT: the addresses are our
    /// HIT, and the kernel carries it through the BEET SAs (the draft's §3.2 discussion:
    /// HITs in `c=` lines survive address changes without a re-INVITE).
    /// Our offer or answer; with `nat_initiator`, marked `a=hip-nat:initiate` (we are
    /// behind a NAT and start HIP ourselves).
    fn local_sdp(
        &mut self,
        offer: Option<&Sdp>,
        offer_form: Option<Form>,
        nat_initiator: bool,
    ) -> Bytes {
        let host = match &self.security {
            Some(s) => s.local_hit().to_string(),
            None => self
                .cfg
                .contact_host()
                .map(|h| h.to_string())
                .unwrap_or_default(),
        };
        self.sdp_version += 1;
        let id = SdpIdentity {
            hit: self.own.hit,
            hi: self.own.hi.clone(),
        };
        let local = sdp::offer::LocalMedia {
            user: &self.cfg.sip.user,
            version: self.sdp_version,
            address: &host,
            rtp_port: self.cfg.sip.sdp.rtp_port,
            identity: Some((&id, self.cfg.sip.sdp.identity())),
        };
        match sdp::offer::build(&local, offer, offer_form) {
            Ok(mut s) => {
                if nat_initiator {
                    sdp::mark_nat_initiator(&mut s);
                }
                Bytes::from(s.emit())
            }
            Err(e) => {
                // Our own lines always parse; an identity that cannot be inserted is a bug.
                tracing::error!("building our SDP: {e}");
                Bytes::new()
            }
        }
    }

    /// An incoming call passed its checks: ring, answer (or reject) as `[sip] answer` says.
    fn proceed_incoming(&mut self, h: CallHandle) {
        let now = Instant::now();
        match self.cfg.sip.answer.mode {
            AnswerMode::Reject => {
                let _ = self
                    .ua
                    .reject(now, h, self.cfg.sip.answer.reject_status, "Busy Here");
            }
            AnswerMode::Manual => {
                let _ = self.ua.ring(now, h, 180);
            }
            AnswerMode::Auto => {
                let _ = self.ua.ring(now, h, 180);
                let delay = self.cfg.sip.answer.ring_ms;
                if delay == 0 {
                    self.answer(h);
                } else {
                    self.answer_at
                        .insert((now + Duration::from_millis(delay), h), ());
                }
            }
        }
    }

    /// A held INVITE (`dns_hold`) that DNS did not vouch for in time, or whose answer did
    /// not vouch: refused as `require_verified_peer` says.
    fn refuse_held(&mut self, h: CallHandle, why: String) {
        let Some(cs) = self.call_sec.get_mut(&h) else {
            return;
        };
        let Some((code, reason)) = cs.dns_hold.take() else {
            return;
        };
        let why = format!("refused with {code} ([security] require_verified_peer): {why}");
        tracing::warn!(call = %h, "{why}");
        cs.refused = Some(why);
        let _ = self.ua.reject(Instant::now(), h, code, reason);
    }

    fn answer(&mut self, h: CallHandle) {
        let now = Instant::now();
        let (offer, form) = match self.ua.call_sdp(h) {
            Some((_, Some(remote))) => {
                let parsed = Sdp::parse_bytes(&remote).ok();
                let form = self.offered.get(&h).and_then(|(_, f)| *f);
                (parsed, form)
            }
            _ => (None, None),
        };
        // Behind a NAT towards the caller, no I1 of its reaches us: we start HIP once the
        // ACK confirms the dialog (by then the caller holds our HITs), and our answer says
        // so.
        let caller = self
            .ua
            .call_info(h)
            .and_then(|i| i.remote_target)
            .as_deref()
            .and_then(uri_host);
        let behind_nat = match (&self.security, caller) {
            (Some(sec), Some(loc)) if sec.behind_nat_towards(loc) => {
                tracing::info!(call = %h, caller = %loc, "behind a NAT towards the caller: we start the base exchange, over UDP, once the call is confirmed");
                self.call_sec.entry(h).or_default().nat_reversed = true;
                true
            }
            _ => false,
        };
        let sdp = self.local_sdp(offer.as_ref(), form, behind_nat);
        // The caller may send I1 as soon as our 200 is out, before its ACK reaches us:
        // its HITs from the offer are accepted from now on (draft §3.3: the known-HITs pool).
        if let (Some(sec), Some((ids, _))) = (&mut self.security, self.offered.get(&h)) {
            let hits = secure::distinct(ids.iter().map(|i| proto_hit(i.hit)));
            sec.authorize(&hits);
            let cs = self.call_sec.entry(h).or_default();
            cs.peer_hits = hits;
            cs.authorized = true;
        }
        if let Err(e) = self.ua.answer(now, h, Some(sdp)) {
            tracing::info!("answer {h}: {e}");
        }
    }

    /// A SIP Identity header value for a request from `from_uri` to `to_uri` whose SDP
    /// carries our HIT, or why there can be none.
    fn sign_own(&self, from_uri: &str, to_uri: &str) -> Result<String, String> {
        let (key, info) = self
            .sipsec
            .signer
            .as_ref()
            .ok_or("no [security] identity_key")?;
        // RFC 8224 §6.1: an authentication service signs only for identities of its domain.
        let ours = self.cfg.sip.domain.to_ascii_lowercase();
        match identity::domain_of(from_uri) {
            Some(d) if d == ours => {}
            other => {
                return Err(format!(
                    "our HIT is not signed: the From {from_uri} is in {}, our key signs for {ours} ([sip] domain)",
                    other.as_deref().unwrap_or("no domain")
                ));
            }
        }
        let claims = identity::Claims {
            orig: identity::canonical(from_uri).map_err(|e| e.to_string())?,
            dest: vec![identity::canonical(to_uri).map_err(|e| e.to_string())?],
            iat: unix_now(),
            hits: vec![self.own.hit],
        };
        Ok(identity::sign(key, &claims, info))
    }

    fn check_identity(
        &self,
        auth: &RequestAuth,
        hits: &[Hit],
    ) -> Option<Result<identity::Verified, identity::IdentityError>> {
        identity::verify_any(
            &auth.identity,
            &self.sipsec.trust,
            &identity::Expected {
                from_uri: &auth.from_uri,
                to_uri: &auth.to_uri,
                sdp_hits: hits,
                now: unix_now(),
                window: self.sipsec.window,
            },
        )
    }

    /// The callee's view of an INVITE (draft §4): its Identity against the offer's HITs,
    /// and SIPS, and (`[dns]`) the caller's HIP RR. Returns `false` when the call was
    /// refused (proven tampering with `on_failure = hangup`, nothing vouching with
    /// `require_verified_peer`) or is held until DNS answers (`dns_hold`).
    fn assess_offer(
        &mut self,
        call: &CallInfo,
        has_sdp: bool,
        auth: &RequestAuth,
        hits: &[Hit],
    ) -> bool {
        let mut a = SipAssurance::default();
        let mut failure = None;
        let mut identity_sent = false;
        if !has_sdp {
            a.peer_not("the INVITE has no SDP (late offer): its Identity binds no HIT".into());
        } else {
            let checked = self.check_identity(auth, hits);
            identity_sent = checked.is_some();
            match checked {
                None => a.peer_not("no Identity header in the INVITE (RFC 8224)".into()),
                Some(Ok(v)) => a.peer_by(
                    Mechanism::Identity,
                    format!(
                        "INVITE Identity verified: {} with {}'s key, signed {} s ago",
                        v.orig,
                        v.domain,
                        unix_now() - v.iat
                    ),
                ),
                Some(Err(e)) if e.is_tampering() => {
                    let f = format!(
                        "SIP Identity of the INVITE: {e}: the offer was altered on the path"
                    );
                    a.peer_not(f.clone());
                    failure = Some(f);
                }
                Some(Err(e)) => a.peer_not(format!("INVITE Identity not verified: {e}")),
            }
        }
        a.own_not(if self.sipsec.signer.is_some() {
            "our HIT is signed in an UPDATE after the ACK (draft §4.1)".into()
        } else {
            "no [security] identity_key: our HIT is not signed".into()
        });
        apply_sips(&self.sipsec, &mut a, auth.sips, auth.transport);
        // The caller's record: from the cache now, or looked up while we decide (a
        // lookup started here also serves the check after the ACK).
        let (mut dns_pending, mut dns_failed) = (false, false);
        if has_sdp
            && failure.is_none()
            && let Some(d) = &mut self.dns
            && d.want(call.handle, &call.remote_uri, None).is_some()
        {
            let phits: Vec<hip_proto::Hit> = hits.iter().map(|h| proto_hit(*h)).collect();
            match d.verdict(&call.remote_uri, &phits) {
                None => dns_pending = d.can_vouch(&call.remote_uri),
                Some(_) => {
                    failure = d.apply(&call.remote_uri, &phits, &mut a);
                    dns_failed = failure.is_some();
                }
            }
        }
        let cs = self.call_sec.entry(call.handle).or_default();
        cs.sip = a;
        cs.signalled_hits = hits.to_vec();
        if let Some(f) = failure {
            cs.failure = Some(f.clone());
            tracing::error!(call = %call.handle, peer = %call.remote_uri, "call flagged: {f}");
            if self.cfg.hip.on_failure == FailureAction::Hangup {
                // RFC 8224 §6.2.2: 438 Invalid Identity Header; a DNSSEC-validated record
                // with other HITs: 403.
                let (code, reason) = if dns_failed {
                    (403, "Forbidden")
                } else {
                    (438, "Invalid Identity Header")
                };
                let _ = self.ua.reject(Instant::now(), call.handle, code, reason);
                return false;
            }
        }
        if self.cfg.security.require_verified_peer && !cs.sip.peer_authenticated {
            // RFC 8224 §6.2.2: 428 asks for an Identity, 438 says the one sent failed; a
            // late offer has no SDP for an Identity to bind.
            let (code, reason) = match (has_sdp, identity_sent) {
                (false, _) => (488, "Not Acceptable Here"),
                (true, false) => (428, "Use Identity Header"),
                (true, true) => (438, "Invalid Identity Header"),
            };
            if dns_pending && cs.failure.is_none() {
                // DNS may still vouch: hold the INVITE until its answer (bounded by the
                // lookup's own `[dns] timeout_ms`, and by `peer_verify_timeout_ms`).
                tracing::info!(call = %call.handle, peer = %call.remote_uri, "INVITE held for the caller's DNS record (require_verified_peer)");
                cs.dns_hold = Some((code, reason));
                let wait = Duration::from_millis(self.cfg.security.peer_verify_timeout_ms);
                self.verify_by
                    .insert((Instant::now() + wait, call.handle), ());
                return false;
            }
            let why = format!(
                "refused with {code} ([security] require_verified_peer): {}",
                cs.sip
                    .peer_detail
                    .as_deref()
                    .unwrap_or("the caller's HIT is not verified")
            );
            tracing::warn!(call = %call.handle, peer = %call.remote_uri, "{why}");
            cs.refused = Some(why);
            let _ = self.ua.reject(Instant::now(), call.handle, code, reason);
            return false;
        }
        true
    }

    /// The caller's view of the answer: a 2xx cannot carry RFC 8224 Identity, so only SIPS
    /// can vouch for it now; a signed UPDATE may follow (draft §4.1).
    fn assess_answer(&mut self, call: &CallInfo) {
        let cs = self.call_sec.entry(call.handle).or_default();
        if !cs.sip.peer_authenticated {
            cs.sip.peer_not(
                "no Identity: a response cannot carry RFC 8224 Identity; waiting for a signed UPDATE (draft §4.1)"
                    .into(),
            );
        }
        apply_sips(&self.sipsec, &mut cs.sip, call.sips, Some(call.transport));
    }

    /// New SDP from the peer in a request inside the dialog (the callee's §4.1 UPDATE, for
    /// the caller): verifies its Identity, against its SDP and against the HITs signalling
    /// carried before. Returns `false` when the SDP must not be used (tampering).
    fn assess_update(
        &mut self,
        call: &CallInfo,
        auth: &RequestAuth,
        ids: &[IdentityEntry],
    ) -> bool {
        let hits = distinct_sdp_hits(ids);
        let checked = self.check_identity(auth, &hits);
        let cs = self.call_sec.entry(call.handle).or_default();
        let same = |a: &[Hit], b: &[Hit]| {
            a.iter().all(|h| b.contains(h)) && b.iter().all(|h| a.contains(h))
        };
        let before = std::mem::replace(&mut cs.signalled_hits, hits.clone());
        let changed = !before.is_empty() && !same(&before, &hits);
        let list = |v: &[Hit]| v.iter().map(Hit::to_string).collect::<Vec<_>>().join(", ");
        let mut failure = None;
        match checked {
            Some(Ok(v)) if changed => {
                failure = Some(format!(
                    "{} signed HIT(s) {} in its UPDATE, but its earlier SDP carried {}: that SDP was altered on the path (draft §4.1)",
                    v.domain,
                    list(&hits),
                    list(&before)
                ));
            }
            Some(Ok(v)) => cs.sip.peer_by(
                Mechanism::Identity,
                format!(
                    "UPDATE Identity verified (draft §4.1): {} with {}'s key, signed {} s ago",
                    v.orig,
                    v.domain,
                    unix_now() - v.iat
                ),
            ),
            Some(Err(e)) if e.is_tampering() => {
                failure = Some(format!(
                    "SIP Identity of the UPDATE: {e}: its SDP was altered on the path"
                ));
            }
            Some(Err(e)) if changed || !cs.sip.peer_authenticated => cs
                .sip
                .peer_not(format!("UPDATE Identity not verified: {e}")),
            Some(Err(e)) => cs
                .sip
                .peer_note(format!("a later UPDATE's Identity did not verify: {e}")),
            None if changed && cs.sip.peer_via != Some(Mechanism::Sips) => cs
                .sip
                .peer_not("the peer's HITs changed in an UPDATE without Identity".into()),
            None => {}
        }
        let Some(f) = failure else {
            return true;
        };
        cs.sip.peer_not(f.clone());
        cs.failure = Some(f.clone());
        tracing::error!(call = %call.handle, peer = %call.remote_uri, "call flagged: {f}");
        if self.cfg.hip.on_failure == FailureAction::Hangup {
            let _ = self.ua.hangup(Instant::now(), call.handle);
        }
        false
    }

    /// The callee's half of the draft's §4.1: our SDP again, in an UPDATE we can sign.
    fn send_signed_update(&mut self, call: &CallInfo) {
        if self.sipsec.signer.is_none() || call.direction != Direction::Incoming {
            return;
        }
        let h = call.handle;
        let sent = (|| {
            if self.ua.peer_allows(h, "UPDATE") == Some(false) {
                return Err(
                    "our HIT is not signed: the caller does not allow UPDATE (RFC 3311 §5.1)"
                        .to_owned(),
                );
            }
            let sdp = self
                .ua
                .call_sdp(h)
                .and_then(|(ours, _)| ours)
                .ok_or("our HIT is not signed: no SDP of ours to re-send")?;
            let v = self.sign_own(&call.local_uri, &call.remote_uri)?;
            self.ua
                .update_signed(Instant::now(), h, sdp, Some(v))
                .map_err(|e| format!("our signed UPDATE could not be sent: {e}"))
        })();
        let cs = self.call_sec.entry(h).or_default();
        match sent {
            Ok(()) => {
                cs.signed_update_pending = true;
                if !cs.sip.own_protected {
                    cs.sip.own_detail =
                        Some("signed UPDATE sent (draft §4.1), waiting for its answer".into());
                }
            }
            Err(e) => {
                tracing::warn!(call = %h, "{e}");
                cs.sip.own_not(e);
            }
        }
    }

    fn learn(&mut self, call: &CallInfo, ids: Vec<IdentityEntry>) {
        if ids.is_empty() {
            tracing::warn!(call = %call.handle, peer = %call.remote_uri, "peer sent no Host Identity");
            return;
        }
        self.pool
            .learn(pool::entry_from_sdp(&call.remote_uri, &call.call_id, &ids));
        if let Some(s) = &self.security {
            s.expect(ids.iter().map(|i| proto_hit(i.hit)));
        }
        tracing::info!(
            call = %call.handle,
            peer = %call.remote_uri,
            hits = ?ids.iter().map(|i| i.hit.to_string()).collect::<Vec<_>>(),
            "peer HITs learned"
        );
        self.dispatch(AgentEvent::PeerHitsLearned {
            call: call.handle,
            direction: call.direction,
            peer_uri: call.remote_uri.clone(),
            call_id: call.call_id.clone(),
            peer_contact: call.remote_target.clone(),
            identities: ids,
        });
    }

    /// The one place where call outcomes leave the SIP side (see the module docs).
    fn dispatch(&mut self, ev: AgentEvent) {
        let _ = self.events.send(ev.clone());
        self.hip_todo.push_back(ev);
    }

    /// HIP's part of a call event: PeerHitsLearned → base exchange towards the learned
    /// HIT (we called) or wait for the caller's (we answered); CallEnded → CLOSE and
    /// removal of SAs, policies and map entries.
    async fn on_agent_event(&mut self, ev: AgentEvent) {
        match ev {
            AgentEvent::PeerHitsLearned {
                call,
                direction,
                ref peer_uri,
                ref peer_contact,
                ref identities,
                ..
            } => {
                let hits = secure::distinct(identities.iter().map(|i| proto_hit(i.hit)));
                let remote = self
                    .ua
                    .call_sdp(call)
                    .and_then(|(_, r)| r)
                    .and_then(|b| Sdp::parse_bytes(&b).ok());
                let media = remote.as_ref().and_then(sdp::offer::audio_target);
                let peer_starts = direction == Direction::Outgoing
                    && remote.as_ref().is_some_and(sdp::nat_initiator);
                let cs = self.call_sec.entry(call).or_default();
                cs.confirmed_ms.get_or_insert_with(unix_ms);
                let before = std::mem::replace(&mut cs.peer_hits, hits.clone());
                cs.remote_media = media;
                if let Some(d) = &mut self.dns
                    && d.want(call, peer_uri, Some(ev.clone())).is_some()
                    && let Some(f) = d.apply(peer_uri, &cs.peer_hits, &mut cs.sip)
                {
                    tracing::error!(%call, peer = %peer_uri, "call flagged: {f}");
                    cs.failure = Some(f);
                    if self.cfg.hip.on_failure == FailureAction::Hangup {
                        let _ = self.ua.hangup(Instant::now(), call);
                        return;
                    }
                }
                let Some(sec) = &mut self.security else {
                    return;
                };
                if direction != Direction::Outgoing && !cs.nat_reversed {
                    return;
                }
                if direction == Direction::Outgoing
                    && self.cfg.security.require_verified_peer
                    && !cs.sip.peer_authenticated
                {
                    // No base exchange (and so no media) until the callee's HIT is
                    // verified: its signed UPDATE brings the HITs again (PeerHitsLearned).
                    tracing::info!(%call, "HIP waits for the callee's HIT to be verified (require_verified_peer)");
                    return;
                }
                let Some(locator) = peer_contact.as_deref().and_then(uri_host) else {
                    tracing::warn!(%call, ?peer_contact, "no IP address in the peer's Contact: no HIP locator");
                    return;
                };
                if peer_starts {
                    // The callee is behind a NAT: our I1 would not reach it. Its I1 comes
                    // to us instead, and its I2 is accepted only from the answer's HITs
                    // (proved by the exchange as our R1 check would).
                    // (A later answer, e.g. the signed UPDATE, may name other HITs: the
                    // authorization follows it.)
                    cs.nat_reversed = true;
                    if cs.authorized {
                        sec.deauthorize(&before);
                    }
                    sec.authorize(&hits);
                    cs.authorized = true;
                    tracing::info!(%call, %locator, "the callee is behind a NAT (a=hip-nat:initiate): waiting for its base exchange");
                    return;
                }
                // One exchange for all the HITs the SDP carried: the responder proves one
                // of them (a wrong HIT listed first costs nothing).
                if let Err(e) = sec.initiate(locator, &hits).await {
                    tracing::error!(%call, "HIP initiate: {e}");
                }
            }
            AgentEvent::CallEnded {
                call,
                peer_uri,
                reason,
                ..
            } => {
                let cs = self.call_sec.remove(&call).unwrap_or_default();
                let still_used: Vec<hip_proto::Hit> = self
                    .call_sec
                    .values()
                    .flat_map(|c| c.peer_hits.iter().copied())
                    .collect();
                // The record of the call as it ended, before its association goes: the
                // level it shows is the one it earned while it lasted.
                let mut summary = self.call_json(call, &cs);
                let mut flows = Vec::new();
                if let Some(sec) = &mut self.security {
                    for h in &cs.peer_hits {
                        flows.extend(sec.flows_of(h));
                    }
                    if cs.authorized {
                        sec.deauthorize(&cs.peer_hits);
                    }
                    for h in &cs.peer_hits {
                        if !still_used.contains(h) {
                            sec.release(*h).await;
                        }
                    }
                }
                summary["remote_uri"] = json!(peer_uri);
                summary["end_reason"] = json!(reason);
                summary["flows"] = json!(flows);
                self.history.push_back(summary);
                while self.history.len() > HISTORY {
                    self.history.pop_front();
                }
            }
        }
    }

    /// A DNS lookup finished: the calls that waited for it take its verdict; a caller that
    /// waits for a verified peer (`require_verified_peer`) now starts HIP, and a held INVITE
    /// rings or is refused.
    fn on_dns(&mut self, answer: crate::dns_verify::Answer) {
        let Some(d) = &mut self.dns else { return };
        let answered = d.answered(answer);
        for (call, event) in answered {
            let (Some(d), Some(cs)) = (&self.dns, self.call_sec.get_mut(&call)) else {
                continue;
            };
            let Some(uri) = self.ua.call_info(call).map(|i| i.remote_uri) else {
                continue;
            };
            let was = cs.sip.peer_authenticated;
            // A held INVITE has no HIP view of the call yet: its HITs are the offer's.
            let hits = if cs.peer_hits.is_empty() {
                cs.signalled_hits.iter().map(|h| proto_hit(*h)).collect()
            } else {
                cs.peer_hits.clone()
            };
            let held = cs.dns_hold.is_some();
            if held && d.verdict(&uri, &hits).is_none() {
                // Another name's answer (our own record's): the caller's is still to come.
                continue;
            }
            let failure = d.apply(&uri, &hits, &mut cs.sip);
            if let Some(f) = failure {
                tracing::error!(%call, peer = %uri, "call flagged: {f}");
                cs.failure = Some(f.clone());
                if held {
                    self.refuse_held(call, f);
                } else if self.cfg.hip.on_failure == FailureAction::Hangup {
                    let _ = self.ua.hangup(Instant::now(), call);
                }
            } else if held {
                if cs.sip.peer_authenticated {
                    cs.dns_hold = None;
                    self.verify_by.retain(|(_, h), ()| *h != call);
                    self.proceed_incoming(call);
                } else {
                    let why = cs
                        .sip
                        .peer_detail
                        .clone()
                        .unwrap_or_else(|| "DNS did not vouch for the caller's HIT".into());
                    self.refuse_held(call, why);
                }
            } else if !was
                && cs.sip.peer_authenticated
                && self.cfg.security.require_verified_peer
                && let Some(ev) = event
            {
                self.hip_todo.push_back(ev);
            }
        }
    }

    /// What HIP reported.
    async fn on_security(&mut self, out: Outcome) {
        if let (Some(e), Some(s)) = (&mut self.edge, &self.security) {
            e.on_security(&out, s).await;
        }
        match &out {
            Outcome::Established { peer } => {
                if let Some(r) = self.security.as_ref().and_then(|s| s.get(peer)) {
                    self.metrics.established(&r.timing_ms);
                }
            }
            Outcome::Failed { .. } => self.metrics.outcome("failed"),
            Outcome::Lost { .. } => self.metrics.outcome("lost"),
            Outcome::Closed { .. } => self.metrics.outcome("closed"),
            Outcome::Nothing => {}
        }
        let (peer, error, mismatch) = match out {
            Outcome::Failed {
                peer,
                error,
                mismatch,
            } => (peer, error, mismatch),
            Outcome::Closed { peer } => {
                if !self.call_sec.values().any(|c| c.peer_hits.contains(&peer))
                    && let Some(s) = &mut self.security
                {
                    s.forget_if_over(peer);
                }
                return;
            }
            Outcome::Lost { peer, reason } => {
                self.association_lost(peer, reason).await;
                return;
            }
            Outcome::Established { .. } | Outcome::Nothing => return,
        };
        let calls: Vec<CallHandle> = self
            .call_sec
            .iter()
            .filter(|(_, c)| c.peer_hits.contains(&peer))
            .map(|(h, _)| *h)
            .collect();
        for h in calls {
            if let Some(c) = self.call_sec.get_mut(&h) {
                c.failure = Some(error.clone());
            }
            tracing::error!(call = %h, %peer, mismatch, "call flagged: HIP verification failed: {error}");
            if self.cfg.hip.on_failure == FailureAction::Hangup {
                let _ = self.ua.hangup(Instant::now(), h);
            }
        }
    }

    /// An established association with `peer` ended on its own (dead peer, kernel
    /// refusal). Each call that still needs it is told (`association_lost` in `status`);
    /// a call we placed runs a new exchange at once — a peer that restarted answers it,
    /// and its media resumes — while a call we answered waits for the caller's.
    async fn association_lost(&mut self, peer: hip_proto::Hit, reason: String) {
        let calls: Vec<CallHandle> = self
            .call_sec
            .iter()
            .filter(|(_, c)| c.peer_hits.contains(&peer))
            .map(|(h, _)| *h)
            .collect();
        for h in calls {
            let Some(info) = self.ua.call_info(h) else {
                continue;
            };
            let Some(cs) = self.call_sec.get_mut(&h) else {
                continue;
            };
            cs.association_lost = Some(reason.clone());
            tracing::warn!(call = %h, %peer, "the call's HIP association was lost: {reason}");
            // Whoever started the exchange starts it again: the caller, or the callee
            // behind a NAT.
            let we_start = (info.direction == Direction::Outgoing) != cs.nat_reversed;
            if !we_start || info.state != hip_sip::sip::CallState::Confirmed {
                continue;
            }
            let hits = cs.peer_hits.clone();
            let Some(locator) = info.remote_target.as_deref().and_then(uri_host) else {
                continue;
            };
            if let Some(sec) = &mut self.security
                && let Err(e) = sec.initiate(locator, &hits).await
            {
                tracing::error!(call = %h, "HIP re-initiate after the loss: {e}");
            }
        }
    }

    /// The datapath's flow table (empty without one), read once for a whole `status`.
    fn flow_table(&self) -> Vec<hip_datapath::Flow> {
        self.security
            .as_ref()
            .and_then(|s| s.offload()?.flows()?.ok())
            .unwrap_or_default()
    }

    /// A call's security as `status` shows it.
    fn security_json(&self, cs: &CallSecurity) -> Value {
        self.security_json_in(cs, &self.flow_table())
    }

    /// [`Daemon::security_json`] with the flow table already read: `status` reads it once
    /// for all calls, not once per call (a map dump costs two syscalls per entry, so per
    /// call it made `status` quadratic in the number of calls).
    fn security_json_in(&self, cs: &CallSecurity, table: &[hip_datapath::Flow]) -> Value {
        let sec = self.security.as_ref();
        let assocs: Vec<Value> = cs
            .peer_hits
            .iter()
            .filter_map(|h| sec.and_then(|s| s.get(h)))
            .map(|r| json!(r))
            .collect();
        let best = secure::best_record(
            cs.peer_hits
                .iter()
                .filter_map(|h| sec.and_then(|s| s.get(h))),
        );
        let level = if cs.failure.is_some() {
            Verification::Failed
        } else {
            secure::verification(best, &cs.sip)
        };
        let sas = match (sec, cs.peer_hits.first()) {
            (Some(s), Some(p)) => Some(secure::short_auth_string(s.local_hit(), *p)),
            _ => None,
        };
        let flows: Vec<&hip_datapath::Flow> = cs
            .peer_hits
            .iter()
            .flat_map(|h| {
                let h = std::net::Ipv6Addr::from(h.0);
                table
                    .iter()
                    .filter(move |f| f.src_hit == h || f.dst_hit == h)
            })
            .collect();
        json!({
            "peer_hits": cs.peer_hits.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            "verification": level,
            "sas": sas,
            "sip_assurance": &cs.sip,
            "failure": cs.failure,
            "refused": cs.refused,
            "association_lost": cs.association_lost,
            "associations": assocs,
            "remote_media": cs.remote_media.as_ref().map(|(a, p)| json!({"address": a, "port": p})),
            "flows": flows,
            "timing_ms": {
                "started": cs.started_ms,
                "sip_confirmed": cs.confirmed_ms,
            },
        })
    }

    fn call_json(&self, call: CallHandle, cs: &CallSecurity) -> Value {
        let mut v = match self.ua.call_info(call) {
            Some(info) => json!(info),
            None => json!({"handle": call.0}),
        };
        v["security"] = self.security_json(cs);
        v
    }

    fn on_sip_event(&mut self, e: Event) {
        let now = Instant::now();
        match e {
            Event::IncomingCall {
                call,
                remote_sdp,
                auth,
            } => {
                self.stats.calls_in += 1;
                let h = call.handle;
                let mut hits = Vec::new();
                if let Some(body) = &remote_sdp {
                    match identities_in(body) {
                        Ok((_, ids)) => {
                            hits = distinct_sdp_hits(&ids);
                            let form = sdp::form_used(&ids);
                            self.offered.insert(h, (ids, form));
                        }
                        Err(err) => {
                            // Draft §3.2: HI and HIT must agree; malformed values are refused.
                            self.stats.rejected_bad_sdp += 1;
                            tracing::warn!(call = %h, peer = %call.remote_uri, "rejecting: {err}");
                            let _ = self.ua.reject(now, h, 488, "Not Acceptable Here");
                            return;
                        }
                    }
                }
                if self.assess_offer(&call, remote_sdp.is_some(), &auth, &hits) {
                    self.proceed_incoming(h);
                }
            }
            Event::Confirmed { call } => {
                self.stats.confirmed += 1;
                let ids = match self.offered.remove(&call.handle) {
                    Some((ids, _)) => ids,
                    // Late offer: the peer's SDP came in the ACK.
                    None => self
                        .ua
                        .call_sdp(call.handle)
                        .and_then(|(_, r)| r)
                        .and_then(|b| identities_in(&b).ok())
                        .map(|(_, ids)| ids)
                        .unwrap_or_default(),
                };
                self.learn(&call, ids);
                // The draft's §4.1: our answer could not be signed; re-send our SDP in a
                // signed UPDATE now that the dialog is confirmed.
                self.send_signed_update(&call);
            }
            Event::Answered { call, remote_sdp } => {
                self.stats.confirmed += 1;
                self.assess_answer(&call);
                if self.cfg.security.require_verified_peer
                    && self
                        .call_sec
                        .get(&call.handle)
                        .is_some_and(|cs| !cs.sip.peer_authenticated)
                {
                    let wait = Duration::from_millis(self.cfg.security.peer_verify_timeout_ms);
                    self.verify_by.insert((now + wait, call.handle), ());
                }
                match remote_sdp.as_deref().map(identities_in) {
                    Some(Ok((_, ids))) => {
                        if let Some(cs) = self.call_sec.get_mut(&call.handle) {
                            cs.signalled_hits = distinct_sdp_hits(&ids);
                        }
                        self.learn(&call, ids)
                    }
                    Some(Err(err)) => {
                        self.stats.rejected_bad_sdp += 1;
                        tracing::warn!(call = %call.handle, "hanging up: bad Host Identity in answer: {err}");
                        let _ = self.ua.hangup(now, call.handle);
                    }
                    None => tracing::warn!(call = %call.handle, "answer without SDP"),
                }
            }
            Event::RemoteSdp {
                call,
                sdp: body,
                auth,
            } => {
                if let (Some(info), Ok((_, ids))) = (self.ua.call_info(call), identities_in(&body))
                {
                    if let Some(auth) = auth
                        && !self.assess_update(&info, &auth, &ids)
                    {
                        return;
                    }
                    self.learn(&info, ids);
                }
            }
            Event::UpdateResult { call, status } => {
                if let Some(cs) = self.call_sec.get_mut(&call)
                    && cs.signed_update_pending
                {
                    cs.signed_update_pending = false;
                    match status {
                        Some(s) if (200..300).contains(&s) => cs.sip.own_by(
                            Mechanism::Identity,
                            format!("our HIT signed in an UPDATE (draft §4.1), accepted with {s}"),
                        ),
                        Some(s) => cs
                            .sip
                            .own_not(format!("our signed UPDATE was refused with {s}")),
                        None => cs.sip.own_not("our signed UPDATE got no answer".into()),
                    }
                }
            }
            Event::Ended { call, reason } => {
                self.stats.ended += 1;
                self.offered.remove(&call.handle);
                self.answer_at.retain(|(_, h), ()| *h != call.handle);
                self.verify_by.retain(|(_, h), ()| *h != call.handle);
                tracing::info!(call = %call.handle, peer = %call.remote_uri, ?reason, "call ended");
                self.dispatch(AgentEvent::CallEnded {
                    call: call.handle,
                    peer_uri: call.remote_uri,
                    call_id: call.call_id,
                    reason,
                });
            }
            Event::Ringing { call, status } => {
                tracing::info!(call = %call, status, "ringing");
            }
            Event::Registered { expires } => {
                tracing::info!(expires, "registered");
                self.registration = Registration {
                    registered: expires > 0,
                    expires: Some(expires),
                    error: None,
                };
            }
            Event::RegistrationFailed { status, reason } => {
                tracing::warn!(?status, %reason, "registration failed");
                self.registration.registered = false;
                self.registration.error = Some(match status {
                    Some(s) => format!("{s} {reason}"),
                    None => reason,
                });
            }
            Event::BadInput {
                peer,
                answered,
                reason,
            } => {
                match answered {
                    Some(_) => self.stats.bad_input_answered += 1,
                    None => self.stats.bad_input_dropped += 1,
                }
                tracing::debug!(%peer, ?answered, %reason, "bad SIP input");
            }
            Event::OptionsResult { .. } => {}
        }
    }

    async fn on_control(&mut self, req: Request) -> Value {
        let now = Instant::now();
        let fail = |e: &dyn std::fmt::Display| json!({"ok": false, "error": e.to_string()});
        match req {
            Request::Call { uri } => {
                if let Some(d) = &mut self.dns {
                    d.prefetch(&uri);
                }
                let sdp = self.local_sdp(None, None, false);
                let mut own = SipAssurance::default();
                let signed = match self.sipsec.signer {
                    None => {
                        own.own_not("no [security] identity_key: our HIT is not signed".into());
                        None
                    }
                    Some(_) => match self.sign_own(&self.ua.aor(), &uri) {
                        Ok(v) => {
                            own.own_by(
                                Mechanism::Identity,
                                "our HIT signed in the INVITE's Identity (RFC 8224)".into(),
                            );
                            Some(v)
                        }
                        Err(e) => {
                            own.own_not(e);
                            None
                        }
                    },
                };
                match self.ua.call_signed(now, &uri, Some(sdp), signed) {
                    Ok(h) => {
                        let cs = self.call_sec.entry(h).or_default();
                        cs.sip = own;
                        cs.started_ms = Some(unix_ms());
                        self.stats.calls_out += 1;
                        json!({"ok": true, "call": h.0})
                    }
                    Err(e) => fail(&e),
                }
            }
            Request::Hangup { call } => match self.ua.hangup(now, CallHandle(call)) {
                Ok(()) => json!({"ok": true}),
                Err(e) => fail(&e),
            },
            Request::Answer { call } => {
                let h = CallHandle(call);
                match self.ua.call_info(h) {
                    Some(c) if c.direction == Direction::Incoming => {
                        self.answer(h);
                        json!({"ok": true})
                    }
                    _ => fail(&hip_sip::sip::SipError::NoSuchCall(h)),
                }
            }
            Request::Status => json!({
                "ok": true,
                "aor": format!("sip:{}@{}", self.cfg.sip.user, self.cfg.sip.domain),
                "hit": self.own.hit,
                "hit_hex": self.own.hit.to_hex(),
                "listen": self.svc.local.iter().map(|(t, a)| format!("{}:{a}", t.via_token().to_ascii_lowercase())).collect::<Vec<_>>(),
                "registration": ({
                    let mut r = json!(self.registration);
                    if let Some(k) = self.ua.keepalive_status() {
                        r["keepalive"] = json!({
                            "sent": k.sent,
                            "last_secs_ago": k.last.map(|t| now.saturating_duration_since(t).as_secs()),
                            "next_in_secs": k.next.map(|t| t.saturating_duration_since(now).as_secs()),
                        });
                    }
                    r
                }),
                "calls": ({
                    let table = self.flow_table();
                    self.ua.calls().into_iter().map(|c| {
                        let cs = self.call_sec.get(&c.handle).cloned().unwrap_or_default();
                        let mut v = json!(c);
                        v["security"] = self.security_json_in(&cs, &table);
                        v
                    }).collect::<Vec<_>>()
                }),
                "ended_calls": self.history,
                "hip": self.security.as_ref().map(|s| json!({
                    "hit": s.local_hit().to_string(),
                    "kernel_offload": s.offloading(),
                })),
                "stats": self.stats,
                "edge": self.edge.as_ref().map(|e| e.status(self.security.as_ref())),
                "pool_entries": self.pool.entries().count(),
                "dns": self.dns.as_ref().map(|d| d.status_json()),
                "limits": {
                    "sip": self.ua.admission_stats(),
                    "connections": self.svc.conn_stats(),
                    "calls": self.ua.calls().len(),
                    "pending_incoming_calls": self.ua.calls().iter().filter(|c| c.direction == Direction::Incoming && c.state != hip_sip::sip::CallState::Confirmed).count(),
                    "association_records": self.security.as_ref().map_or(0, |s| s.records().count()),
                    "hip": match &self.security { Some(s) => s.stats().await.map(|st| json!(st)), None => None },
                },
            }),
            Request::Hits => json!({
                "ok": true,
                "hits": self.pool.entries().collect::<Vec<_>>(),
            }),
            Request::Assoc => json!({
                "ok": true,
                "associations": self.security.as_ref().map(|s| s.records().cloned().collect::<Vec<_>>()).unwrap_or_default(),
            }),
            Request::Flows => match self.security.as_ref().and_then(|s| s.offload()?.flows()) {
                Some(Ok(flows)) => json!({"ok": true, "flows": flows}),
                Some(Err(e)) => fail(&e),
                None => fail(&"this agent runs no eBPF datapath ([datapath] or [kernel] disabled)"),
            },
            Request::Xfrm => {
                let Some(o) = self.security.as_ref().and_then(|s| s.offload()) else {
                    return fail(
                        &"this agent offloads nothing to the kernel ([kernel] enabled = false)",
                    );
                };
                match o.list_owned().await {
                    Ok(owned) => {
                        let v = crate::inspect::xfrm_view(owned, |hit| self.pool.peer_uri(hit));
                        json!({"ok": true, "xfrm": v})
                    }
                    Err(e) => fail(&e),
                }
            }
            Request::Metrics { openmetrics } => self.metrics_reply(openmetrics).await,
        }
    }

    /// One scrape of the metrics endpoint, from the state `status`, `assoc`, `xfrm` and
    /// `flows` show.
    async fn metrics_reply(&mut self, openmetrics: bool) -> Value {
        use crate::metrics::{DatapathView, KernelCounts, Snapshot};
        let status = Box::pin(self.on_control(Request::Status)).await;
        let sec = self.security.as_ref();
        let associations: Vec<_> = sec
            .map(|s| s.records().cloned().collect())
            .unwrap_or_default();
        let offload = sec.and_then(|s| s.offload());
        let kernel = match offload {
            Some(o) => Some(
                o.list_owned()
                    .await
                    .map(|k| KernelCounts {
                        sas: k.sas.len(),
                        policies: k.policies.len(),
                    })
                    .map_err(|e| e.to_string()),
            ),
            None => None,
        };
        let datapath = offload.and_then(|o| o.datapath()).map(|dp| {
            (|| {
                Ok::<_, hip_datapath::DatapathError>(DatapathView {
                    stats: dp.stats()?,
                    spis: dp.spi_counters()?,
                    guard: dp.maps().guard_drops()?,
                    flows: dp.flows()?,
                })
            })()
            .map_err(|e| e.to_string())
        });
        let (text, content_type) = crate::metrics::render(
            &self.metrics,
            &Snapshot {
                status: &status,
                associations: &associations,
                kernel,
                datapath,
            },
            openmetrics,
        );
        json!({"ok": true, "text": text, "content_type": content_type})
    }
}

/// Reply type of a control request, for tests.
pub type Reply = oneshot::Sender<Value>;

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    /// An EdDSA HI (RFC 9374 §3.4): algorithm 13, curve 1 (Ed25519), and RFC 8032 §7.1's
    /// first test public key.
    fn ed25519_hi() -> Vec<u8> {
        let pk = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let mut v = vec![0, 13, 0, 1];
        v.extend((0..32).map(|i| u8::from_str_radix(&pk[2 * i..2 * i + 2], 16).unwrap()));
        v
    }

    #[test]
    fn hi_in_sdp_is_checked_against_its_hit_with_hip_proto() {
        let hi = ed25519_hi();
        let hit = derive_hit(&hi).unwrap();
        // ORCHIDv2 prefix 2001:20::/28 with the EdDSA/cSHAKE128 suite (OGA 5, RFC 9374).
        assert_eq!(&hit.0[..3], &[0x20, 0x01, 0x00]);
        assert_eq!(hit.0[3] & 0xf0, 0x20);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&hi);
        let head = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=audio 1 RTP/AVP 0\r\n";
        let good = format!(
            "{head}a=key-mgmt:host-identity {b64}\r\na=key-mgmt:host-identity-tag {}\r\n",
            hit.to_hex()
        );
        let (_, ids) = identities_in(good.as_bytes()).unwrap();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|i| i.hit == hit));
        let bad = format!("{head}k=host-identity:{b64}\r\nk=host-identity-tag:2001:20::1\r\n");
        assert!(matches!(
            identities_in(bad.as_bytes()),
            Err(SdpError::HiHitMismatch { line: 7, .. })
        ));
        // An HI of an unknown algorithm, and one too short for its algorithm ID.
        let e = derive_hit(&[0, 99, 0, 1, 2]).unwrap_err();
        assert!(e.contains("99"), "{e}");
        assert!(matches!(
            identities_in(format!("{head}a=key-mgmt:host-identity AA==\r\n").as_bytes()),
            Err(SdpError::BadHostIdentity { .. })
        ));
    }
}
