//! Edge mode (`[edge]`): the agent as the SIP edge of unmodified local phones.
//!
//! The protocol is `hip_sip::sip::edge::EdgeProxy` (sans-IO); this module gives it sockets
//! (one [`SipService`] per listener, so that each message leaves from the address its
//! Via, Record-Route and Path name) and connects what it reports to HIP with the same
//! machinery as the agent's own calls: the peer's HITs go into the pool bound to its URI
//! and become expected (`Security::expect`); when our phone answers, the caller's HITs
//! are accepted as Initiators (`Security::authorize`); when the far end answers our
//! phone, the base exchange starts towards it (`Security::initiate`, the responder must
//! prove the HIT its SDP carried); the call's end releases the association, which
//! removes SAs, policies, route and map entries. With `[security]` keys the SIP Identity
//! of each direction (our phone's INVITE, or the callee edge's signed UPDATE, draft §4.1)
//! goes into the call's `SipAssurance`. When the level becomes known or changes the phone
//! gets a SIP MESSAGE with it and the short authentication string.

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use hip_sip::sip::{
    Transport,
    edge::{EdgeConfig, EdgeEvent, EdgeIdentity, EdgeProxy, EdgeTransmit},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    config::{Config, FailureAction},
    daemon::{OwnIdentity, SipSecurity},
    pool::{self, Pool},
    secure::{self, Mechanism, Outcome, Security, SipAssurance, Verification},
    sip_service::{Inbound, SipService, TransportError},
};

/// One input of the edge, for the daemon's loop.
#[derive(Debug)]
pub struct EdgeInput(Input);

#[derive(Debug)]
enum Input {
    /// Something arrived on listener `n`.
    Net(usize, Inbound),
    /// A proxy timer is due.
    Timer,
}

/// HIP's view of one edge call.
#[derive(Debug, Clone, Default)]
struct CallHip {
    peer_hits: Vec<hip_proto::Hit>,
    authorized: bool,
    /// The last level told to the phone.
    told: Option<Verification>,
    /// What SIP Identity established for the call's HITs (draft §4.1).
    sip: SipAssurance,
    /// Where an early base exchange went (the far end rang; see `[edge] early_hip`),
    /// and the responder it reached: nothing rests on it until the answer names that HIT.
    early: Option<std::net::IpAddr>,
    early_peer: Option<hip_proto::Hit>,
    /// Proof that signalling was tampered with (`[hip] on_failure = "keep"` lets the call
    /// go on): the level is `failed` whatever HIP did.
    failure: Option<String>,
}

impl CallHip {
    /// What a SIP Identity from the peer (its INVITE's, or the callee edge's UPDATE's)
    /// proved of its HIT; a proof of tampering flags the call.
    fn peer_identity(
        &mut self,
        call_id: &str,
        what: &str,
        result: Result<hip_sip::identity::Verified, String>,
        tampering: bool,
    ) {
        if tampering && let Err(why) = &result {
            tracing::error!(%call_id, "edge: call flagged: {why}");
            self.failure = Some(why.clone());
        }
        match result {
            Ok(v) => self.sip.peer_by(
                Mechanism::Identity,
                format!("{what}: {} with {}'s key", v.orig, v.domain),
            ),
            Err(why) => self.sip.peer_not(why),
        }
    }
}

/// The edge: proxy core, sockets, and what HIP knows of its calls.
pub struct Edge {
    proxy: EdgeProxy,
    services: Vec<((Transport, SocketAddr), SipService)>,
    rx: mpsc::Receiver<(usize, Inbound)>,
    calls: HashMap<String, CallHip>,
    notify_phone: bool,
    early_hip: bool,
    /// Calls that ended, newest last (for `status`).
    ended: Vec<Value>,
}

fn proto_hit(h: hip_sip::sdp::Hit) -> hip_proto::Hit {
    hip_proto::Hit(h.0)
}

impl Edge {
    /// Binds the `[edge]` listeners; `None` when edge mode is off.
    pub async fn bind(
        cfg: &Config,
        own: &OwnIdentity,
        sipsec: &SipSecurity,
    ) -> Result<Option<Self>, TransportError> {
        let Some(e) = &cfg.edge else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::channel(4096);
        let mut services = Vec::new();
        for (n, l) in e.listen.iter().enumerate() {
            let (svc, mut inbound) =
                SipService::bind_listeners(std::slice::from_ref(l), None, &cfg.limits).await?;
            let local = svc.local.first().copied().unwrap_or((l.transport, l.addr));
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(ev) = inbound.recv().await {
                    if tx.send((n, ev)).await.is_err() {
                        break;
                    }
                }
            });
            services.push((local, svc));
        }
        let ecfg = EdgeConfig {
            listeners: services.iter().map(|(l, _)| *l).collect(),
            // Validated with the configuration.
            clients: e.networks().unwrap_or_default(),
            next_hop: (e.next_hop.transport, e.next_hop.addr),
            own: hip_sip::sdp::HostIdentity {
                hit: own.hit,
                hi: own.hi.clone(),
            },
            policy: cfg.sip.sdp.identity(),
            inbound_without_hit: e.inbound_without_hit,
            outbound_without_hit: e.outbound_without_hit,
            derive: crate::daemon::derive_hit,
            timers: cfg.sip.timers,
            max_calls: cfg.limits.max_calls,
            max_transactions: cfg.limits.max_calls.saturating_mul(4).max(64),
            seed: rand::random(),
            // SIP Identity (draft §4.1) with the agent's own `[security]` keys: as for its own
            // calls, nothing to sign with and nobody trusted means nothing to check.
            identity: (sipsec.signer.is_some() || !sipsec.trust.is_empty()).then(|| EdgeIdentity {
                signer: sipsec.signer.clone(),
                domain: cfg.sip.domain.to_ascii_lowercase(),
                trust: sipsec.trust.clone(),
                window: sipsec.window,
                unix_now: crate::daemon::unix_now,
                refuse_tampered: cfg.hip.on_failure == FailureAction::Hangup,
                // DNS cannot vouch for an edge call yet: an Identity must.
                require_verified: cfg.security.require_verified_peer,
            }),
            protect: cfg.hip_enabled(),
        };
        tracing::info!(listen = ?ecfg.listeners, next_hop = %e.next_hop, clients = ?e.clients, "edge mode");
        Ok(Some(Self {
            proxy: EdgeProxy::new(ecfg),
            services,
            rx,
            calls: HashMap::new(),
            notify_phone: e.notify_phone,
            early_hip: e.early_hip,
            ended: Vec::new(),
        }))
    }

    /// The next input (cancel-safe: a channel receive or a sleep).
    pub async fn recv(&mut self) -> EdgeInput {
        let at = self.proxy.poll_timeout();
        tokio::select! {
            Some((n, ev)) = self.rx.recv() => EdgeInput(Input::Net(n, ev)),
            () = async {
                match at {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => EdgeInput(Input::Timer),
        }
    }

    /// Handles one input and everything it causes.
    pub async fn handle(
        &mut self,
        input: EdgeInput,
        security: Option<&mut Security>,
        pool: &mut Pool,
    ) {
        let now = Instant::now();
        match input.0 {
            Input::Timer => self.proxy.handle_timeout(now),
            Input::Net(n, ev) => {
                let Some((local, svc)) = self.services.get_mut(n) else {
                    return;
                };
                let local = *local;
                svc.observe(&ev);
                match ev {
                    Inbound::Datagram { peer, data } => {
                        self.proxy.handle_datagram(now, local, peer, &data)
                    }
                    Inbound::Stream {
                        conn, peer, data, ..
                    } => {
                        if !self.proxy.handle_stream(now, local, conn, peer, &data) {
                            svc.close(conn);
                        }
                    }
                    Inbound::Closed { conn } => self.proxy.connection_closed(conn),
                    Inbound::Opened { .. } => {}
                }
            }
        }
        self.drain(security, pool).await;
    }

    async fn send(&mut self, t: EdgeTransmit) {
        let Some((_, svc)) = self.services.iter_mut().find(|(l, _)| *l == t.from) else {
            return;
        };
        svc.send(hip_sip::sip::Transmit {
            dest: t.dest,
            data: t.data,
        })
        .await;
    }

    async fn drain(&mut self, mut security: Option<&mut Security>, pool: &mut Pool) {
        loop {
            let mut did = false;
            while let Some(t) = self.proxy.poll_transmit() {
                did = true;
                self.send(t).await;
            }
            while let Some(ev) = self.proxy.poll_event() {
                did = true;
                self.on_event(ev, security.as_deref_mut(), pool).await;
            }
            if !did {
                break;
            }
        }
    }

    async fn on_event(&mut self, ev: EdgeEvent, security: Option<&mut Security>, pool: &mut Pool) {
        match ev {
            EdgeEvent::PeerHits {
                call_id,
                peer_uri,
                identities,
                stage,
                phone_is_caller,
                ..
            } => {
                pool.learn(pool::entry_from_sdp(&peer_uri, &call_id, &identities));
                let hits = secure::distinct(identities.iter().map(|i| proto_hit(i.hit)));
                if let Some(s) = &security {
                    s.expect(hits.iter().copied());
                }
                tracing::info!(%call_id, peer = %peer_uri, ?stage, hits = ?hits.iter().map(|h| h.to_string()).collect::<Vec<_>>(), "edge: peer HITs learned");
                let c = self.calls.entry(call_id.clone()).or_default();
                for h in hits {
                    if !c.peer_hits.contains(&h) {
                        c.peer_hits.push(h);
                    }
                }
                // Early HIP, callee side: the INVITE passed every check the edge makes
                // (its Identity under `[security]`), so its HITs may initiate while our
                // phone rings.
                if self.early_hip
                    && !phone_is_caller
                    && stage == hip_sip::sip::edge::SdpStage::Offer
                    && !c.authorized
                    && let Some(s) = security
                {
                    s.authorize(&c.peer_hits);
                    c.authorized = true;
                    tracing::info!(%call_id, "edge: the caller's HITs may initiate HIP while our phone rings");
                }
            }
            EdgeEvent::OwnSigned { call_id, result } => {
                let c = self.calls.entry(call_id.clone()).or_default();
                match result {
                    Ok(domain) => c.sip.own_by(
                        Mechanism::Identity,
                        format!(
                            "our HIT signed in the INVITE's Identity with {domain}'s key (RFC 8224)"
                        ),
                    ),
                    Err(why) => c.sip.own_not(why),
                }
                if !c.sip.peer_authenticated {
                    c.sip.peer_not(
                        "no Identity yet: a response cannot carry RFC 8224 Identity; waiting for the callee's signed UPDATE (draft §4.1)"
                            .into(),
                    );
                }
                tracing::info!(%call_id, own = ?c.sip.own_detail, "edge: SIP Identity of our phone's INVITE");
            }
            EdgeEvent::PeerIdentity {
                call_id,
                result,
                tampering,
            } => {
                let c = self.calls.entry(call_id.clone()).or_default();
                c.peer_identity(&call_id, "INVITE Identity verified", result, tampering);
                if !c.sip.own_protected {
                    c.sip.own_not(
                        "our HIT is not signed yet: a response cannot carry RFC 8224 Identity; our signed UPDATE follows the ACK (draft §4.1)"
                            .into(),
                    );
                }
                tracing::info!(%call_id, peer = ?c.sip.peer_detail, "edge: SIP Identity of the INVITE");
            }
            EdgeEvent::PeerUpdate {
                call_id,
                result,
                tampering,
            } => {
                let c = self.calls.entry(call_id.clone()).or_default();
                c.peer_identity(
                    &call_id,
                    "UPDATE Identity verified (draft §4.1)",
                    result,
                    tampering,
                );
                tracing::info!(%call_id, peer = ?c.sip.peer_detail, "edge: the callee's signed UPDATE");
                if let Some(s) = security {
                    self.retell(&call_id, s).await;
                }
            }
            EdgeEvent::OwnUpdate { call_id, result } => {
                let c = self.calls.entry(call_id.clone()).or_default();
                match result {
                    Ok(domain) => c.sip.own_by(
                        Mechanism::Identity,
                        format!(
                            "our HIT signed in an UPDATE (draft §4.1) with {domain}'s key, accepted by the caller's edge"
                        ),
                    ),
                    Err(why) => c.sip.own_not(why),
                }
                tracing::info!(%call_id, own = ?c.sip.own_detail, "edge: our signed UPDATE");
                if let Some(s) = security {
                    self.retell(&call_id, s).await;
                }
            }
            EdgeEvent::PhoneAnswered { call_id } => {
                let c = self.calls.entry(call_id.clone()).or_default();
                if let Some(s) = security
                    && !c.peer_hits.is_empty()
                    && !c.authorized
                {
                    // The caller may send I1 as soon as the 200 is out.
                    s.authorize(&c.peer_hits);
                    c.authorized = true;
                    tracing::info!(%call_id, "edge: our phone answered; the caller's HITs may initiate HIP");
                }
            }
            EdgeEvent::PeerRinging { call_id, locator } => {
                let (Some(s), Some(loc), true) = (security, locator, self.early_hip) else {
                    return;
                };
                match s.initiate_early(loc).await {
                    Ok(started) => {
                        tracing::info!(%call_id, %loc, started, "edge: the far end rings; HIP starts early");
                        if started {
                            self.calls.entry(call_id).or_default().early = Some(loc);
                        }
                    }
                    Err(e) => tracing::warn!(%call_id, %loc, "edge: early HIP: {e}"),
                }
            }
            EdgeEvent::PeerAnswered { call_id, locator } => {
                let hits = self
                    .calls
                    .get(&call_id)
                    .map(|c| c.peer_hits.clone())
                    .unwrap_or_default();
                let Some(s) = security else { return };
                match locator {
                    Some(loc) if !hits.is_empty() => {
                        tracing::info!(%call_id, %loc, "edge: the far end answered; HIP starts");
                        if let Err(e) = s.initiate(loc, &hits).await {
                            tracing::error!(%call_id, "edge: HIP initiate: {e}");
                        }
                        // An early exchange may have completed before the answer named
                        // the HITs: its outcome found no HIT to judge then, so the phone
                        // hears the level now (nothing is sent while it is pending).
                        self.retell(&call_id, s).await;
                    }
                    _ => tracing::warn!(%call_id, ?locator, "edge: no HIT or no locator for HIP"),
                }
            }
            EdgeEvent::Unprotected { call_id, why } => {
                tracing::warn!(%call_id, "edge: call NOT protected: {why}");
                if self.notify_phone {
                    let text = format!("hip: this call is NOT protected: {why}");
                    if let Err(e) = self.proxy.notify(Instant::now(), &call_id, &text) {
                        tracing::info!(%call_id, "edge: cannot tell the phone: {e}");
                    }
                }
            }
            EdgeEvent::Ended { call_id, reason } => {
                let c = self.calls.remove(&call_id).unwrap_or_default();
                let mut summary = json!({"call_id": call_id, "end_reason": reason});
                if let Some(s) = security {
                    summary["security"] = Self::level_json(s, &c);
                    if c.authorized {
                        s.deauthorize(&c.peer_hits);
                    }
                    if let Some(loc) = c.early {
                        s.cancel_early(loc).await;
                    }
                    let still: Vec<hip_proto::Hit> = self
                        .calls
                        .values()
                        .flat_map(|o| o.peer_hits.iter().chain(&o.early_peer).copied())
                        .collect();
                    for h in c.peer_hits.iter().chain(&c.early_peer) {
                        if !still.contains(h) {
                            s.release(*h).await;
                        }
                    }
                }
                tracing::info!(%call_id, %reason, "edge: call ended");
                self.ended.push(summary);
                if self.ended.len() > 32 {
                    self.ended.remove(0);
                }
            }
            EdgeEvent::Refused {
                peer,
                status,
                reason,
            } => tracing::info!(%peer, ?status, "edge: refused: {reason}"),
        }
    }

    fn level(s: &Security, c: &CallHip) -> Verification {
        if c.failure.is_some() {
            return Verification::Failed;
        }
        let rec = secure::best_record(c.peer_hits.iter().filter_map(|h| s.get(h)));
        secure::verification(rec, &c.sip)
    }

    fn level_json(s: &Security, c: &CallHip) -> Value {
        let rec = secure::best_record(c.peer_hits.iter().filter_map(|h| s.get(h)));
        let sas = rec
            .filter(|r| r.reached_established)
            .and_then(|r| r.peer_hit.parse::<std::net::Ipv6Addr>().ok())
            .map(|p| secure::short_auth_string(s.local_hit(), hip_proto::Hit(p.octets())));
        json!({
            "verification": Self::level(s, c),
            "sip": c.sip,
            "failure": c.failure,
            "sas": sas,
            "association": rec,
            "early_hip": c.early.map(|loc| json!({
                "locator": loc,
                "responder": c.early_peer.map(|h| h.to_string()),
                "state": c.early_peer.and_then(|h| s.get(&h)).map(|r| r.state),
            })),
        })
    }

    /// What HIP reported: the phones of the calls it concerns are told their level.
    pub async fn on_security(&mut self, out: &Outcome, s: &Security) {
        let peer = match out {
            Outcome::Established { peer } | Outcome::Failed { peer, .. } => *peer,
            Outcome::Lost { peer, .. } => *peer,
            _ => return,
        };
        if let Outcome::Established { peer } = out
            && let Some(loc) = s.get(peer).and_then(|r| r.peer_locator)
        {
            for c in self.calls.values_mut() {
                if c.early == Some(loc) && c.early_peer.is_none() {
                    c.early_peer = Some(*peer);
                }
            }
        }
        let calls: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| c.peer_hits.contains(&peer))
            .map(|(id, _)| id.clone())
            .collect();
        self.tell(&calls, s).await;
    }

    /// The SIP side of a call changed (a signed UPDATE): its phone hears the new level.
    async fn retell(&mut self, call_id: &str, s: &Security) {
        self.tell(&[call_id.to_owned()], s).await;
    }

    /// Each of `calls` whose level is known and changed since its phone was last told:
    /// a MESSAGE with the level and the short authentication string.
    async fn tell(&mut self, calls: &[String], s: &Security) {
        let mut notes = Vec::new();
        for call_id in calls {
            let Some(c) = self.calls.get_mut(call_id) else {
                continue;
            };
            let level = Self::level(s, c);
            if c.told == Some(level) || level == Verification::Pending {
                continue;
            }
            c.told = Some(level);
            let v = Self::level_json(s, c);
            let name = serde_json::to_value(level)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let text = match v["sas"].as_str() {
                Some(sas) if level != Verification::Failed => format!(
                    "hip: call secured, verification {name}; short authentication string {sas} (compare it by voice)"
                ),
                _ => format!(
                    "hip: verification {name}: {}",
                    v["failure"]
                        .as_str()
                        .or(v["association"]["error"].as_str())
                        .unwrap_or("the peer did not prove its HIT; no media is protected")
                ),
            };
            tracing::info!(%call_id, "edge: {text}");
            notes.push((call_id.clone(), text));
        }
        if !self.notify_phone {
            return;
        }
        let now = Instant::now();
        for (call_id, text) in notes {
            if let Err(e) = self.proxy.notify(now, &call_id, &text) {
                tracing::info!(%call_id, "edge: cannot tell the phone: {e}");
            }
        }
        while let Some(t) = self.proxy.poll_transmit() {
            self.send(t).await;
        }
    }

    /// The `edge` block of `status`.
    pub fn status(&self, security: Option<&Security>) -> Value {
        json!({
            "listen": self.proxy.config().listeners.iter().map(|(t, a)| format!("{}:{a}", t.via_token().to_ascii_lowercase())).collect::<Vec<_>>(),
            "next_hop": format!("{}:{}", self.proxy.config().next_hop.0.via_token().to_ascii_lowercase(), self.proxy.config().next_hop.1),
            "transactions": self.proxy.transaction_count(),
            "calls": self.proxy.calls().map(|c| {
                let mut v = json!(c);
                if let Some(s) = security {
                    let hip = self.calls.get(&c.call_id).cloned().unwrap_or_default();
                    v["security"] = Self::level_json(s, &hip);
                }
                v
            }).collect::<Vec<_>>(),
            "ended_calls": self.ended,
        })
    }
}
