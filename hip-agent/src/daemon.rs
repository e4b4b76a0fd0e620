//! The daemon: one event loop that joins the SIP user agent, the known-HITs pool and the
//! control socket — and, later, HIP, XFRM and the eBPF datapath.
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

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hip_sip::{
    sdp::{self, Form, Hit, HostIdentity as SdpIdentity, IdentityEntry, Scope, Sdp, SdpError},
    sip::{CallHandle, CallInfo, Direction, EndReason, Event, UaConfig, UserAgent},
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{
    config::{AnswerMode, Config},
    control::{self, Request},
    pool::{self, Pool},
    sip_service::{Inbound, SipService},
};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Our identity could not be loaded or does not match the configured HIT.
    #[error("identity: {0}")]
    Identity(String),
    /// The pool file is unusable.
    #[error(transparent)]
    Pool(#[from] pool::PoolError),
    /// A transport could not be set up.
    #[error(transparent)]
    Transport(#[from] crate::sip_service::TransportError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] control::ControlError),
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
    sdp_version: u64,
    stats: Stats,
    registration: Registration,
}

impl Daemon {
    /// Loads the identity and the pool and binds the SIP transports.
    pub async fn new(cfg: Config) -> Result<Self, DaemonError> {
        let own = load_own_identity(&cfg)?;
        let pool = Pool::open(&cfg.pool)?;
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
        uc.timers = cfg.sip.timers;
        uc.seed = rand::random();
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            ua: UserAgent::new(uc),
            own,
            svc,
            inbound: Some(inbound),
            pool,
            events,
            offered: HashMap::new(),
            answer_at: BTreeMap::new(),
            sdp_version: 1,
            stats: Stats::default(),
            registration: Registration::default(),
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
                    let v = self.on_control(req);
                    let _ = reply.send(v);
                }
                () = sleep => self.on_timers(),
                _ = flush.tick() => self.flush_pool(),
                () = &mut shutdown => break,
            }
        }
        ctl_task.abort();
        self.flush_pool();
        let _ = std::fs::remove_file(&self.cfg.control_socket);
        tracing::info!("hip-agent stopped");
        Ok(())
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
    }

    /// Our SDP: an offer, or an answer with one `m=` per offered stream (RFC 3264 §6), audio
    /// accepted on our RTP port and other media refused with port 0; our identity per
    /// accepted stream or at session level, in the configured or mirrored form.
    fn local_sdp(&mut self, offer: Option<&Sdp>, offer_form: Option<Form>) -> Bytes {
        let host = self
            .cfg
            .contact_host()
            .map(|h| h.to_string())
            .unwrap_or_default();
        let ip = if host.contains(':') { "IP6" } else { "IP4" };
        self.sdp_version += 1;
        let mut text = format!(
            "v=0\r\no={} {} {} IN {ip} {host}\r\ns=hip-agent\r\nc=IN {ip} {host}\r\nt=0 0\r\n",
            self.cfg.sip.user, self.sdp_version, self.sdp_version
        );
        let mut accepted = Vec::new();
        let streams: Vec<Vec<String>> = match offer {
            Some(o) => (0..o.media_count())
                .filter_map(|i| o.media_line(i))
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect(),
            None => vec![vec![
                "audio".into(),
                "0".into(),
                "RTP/AVP".into(),
                "0".into(),
            ]],
        };
        for (i, m) in streams.iter().enumerate() {
            let (media, proto, fmt) = (
                m.first().map_or("audio", String::as_str),
                m.get(2).map_or("RTP/AVP", String::as_str),
                m.get(3).map_or("0", String::as_str),
            );
            if media == "audio" && accepted.is_empty() {
                text.push_str(&format!(
                    "m=audio {} {proto} {fmt}\r\n",
                    self.cfg.sip.sdp.rtp_port
                ));
                if fmt == "0" {
                    text.push_str("a=rtpmap:0 PCMU/8000\r\n");
                }
                accepted.push(i);
            } else {
                text.push_str(&format!("m={media} 0 {proto} {fmt}\r\n"));
            }
        }
        let policy = self.cfg.sip.sdp.identity();
        let form = match offer_form {
            Some(f) if offer.is_some() && policy.mirror_offer_form => f,
            _ => policy.form,
        };
        let id = SdpIdentity {
            hit: self.own.hit,
            hi: if policy.send_hi {
                self.own.hi.clone()
            } else {
                None
            },
        };
        let mut s = Sdp::parse(&text).expect("our own SDP parses");
        let scopes: Vec<Scope> = if policy.per_media {
            accepted.iter().map(|i| Scope::Media(*i)).collect()
        } else {
            vec![Scope::Session]
        };
        for scope in scopes {
            let _ = sdp::insert_identity(&mut s, scope, form, policy.hit_format, &id);
        }
        Bytes::from(s.emit())
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
        let sdp = self.local_sdp(offer.as_ref(), form);
        if let Err(e) = self.ua.answer(now, h, Some(sdp)) {
            tracing::info!("answer {h}: {e}");
        }
    }

    fn learn(&mut self, call: &CallInfo, ids: Vec<IdentityEntry>) {
        if ids.is_empty() {
            tracing::warn!(call = %call.handle, peer = %call.remote_uri, "peer sent no Host Identity");
            return;
        }
        self.pool
            .learn(pool::entry_from_sdp(&call.remote_uri, &call.call_id, &ids));
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
        // HIP (issue 6) hooks in here: PeerHitsLearned → base exchange with the expected
        // HIT; CallEnded → CLOSE, remove SAs/policies/map entries.
        let _ = self.events.send(ev);
    }

    fn on_sip_event(&mut self, e: Event) {
        let now = Instant::now();
        match e {
            Event::IncomingCall { call, remote_sdp } => {
                self.stats.calls_in += 1;
                let h = call.handle;
                if let Some(body) = &remote_sdp {
                    match identities_in(body) {
                        Ok((_, ids)) => {
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
                match self.cfg.sip.answer.mode {
                    AnswerMode::Reject => {
                        let _ =
                            self.ua
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
            }
            Event::Answered { call, remote_sdp } => {
                self.stats.confirmed += 1;
                match remote_sdp.as_deref().map(identities_in) {
                    Some(Ok((_, ids))) => self.learn(&call, ids),
                    Some(Err(err)) => {
                        self.stats.rejected_bad_sdp += 1;
                        tracing::warn!(call = %call.handle, "hanging up: bad Host Identity in answer: {err}");
                        let _ = self.ua.hangup(now, call.handle);
                    }
                    None => tracing::warn!(call = %call.handle, "answer without SDP"),
                }
            }
            Event::RemoteSdp { call, sdp: body } => {
                if let (Some(info), Ok((_, ids))) = (self.ua.call_info(call), identities_in(&body))
                {
                    self.learn(&info, ids);
                }
            }
            Event::Ended { call, reason } => {
                self.stats.ended += 1;
                self.offered.remove(&call.handle);
                self.answer_at.retain(|(_, h), ()| *h != call.handle);
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

    fn on_control(&mut self, req: Request) -> Value {
        let now = Instant::now();
        let fail = |e: &dyn std::fmt::Display| json!({"ok": false, "error": e.to_string()});
        match req {
            Request::Call { uri } => {
                let sdp = self.local_sdp(None, None);
                match self.ua.call(now, &uri, Some(sdp)) {
                    Ok(h) => {
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
                "registration": self.registration,
                "calls": self.ua.calls(),
                "stats": self.stats,
                "pool_entries": self.pool.entries().count(),
            }),
            Request::Hits => json!({
                "ok": true,
                "hits": self.pool.entries().collect::<Vec<_>>(),
            }),
        }
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
