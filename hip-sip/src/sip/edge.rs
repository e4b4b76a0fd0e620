//! Edge mode: a transaction-stateful SIP proxy (RFC 3261 §16) in front of unmodified local
//! user agents (softphones, a PBX trunk), sans-IO.
//!
//! The phone points its outbound proxy at us. Every request it sends goes to the
//! configured next hop (its real outbound proxy or registrar) and every response comes
//! back; REGISTER gets a `Path` (RFC 3327) and a dialog-creating INVITE a `Record-Route`
//! (two when the request changes listener, RFC 5658), so that the registrar's requests
//! for the phone and every later request of the dialog (ACK, re-INVITE, UPDATE, BYE) pass
//! here too. Digest credentials are never touched: the phone answers its registrar's
//! challenges itself, end to end.
//!
//! What the proxy adds is the SDP: a phone's SDP leaves with its `c=`/`o=` addresses moved
//! to our HIT and our HIT inserted in the draft's §3.2 form ([`crate::sdp::rewrite`],
//! [`crate::sdp::insert_identity`]); a peer's SDP arrives with its HITs learned (reported as
//! [`EdgeEvent::PeerHits`]) and its addresses moved to the peer's HIT, so that the phone
//! sends its RTP to the HIT, from ours, through the kernel's SAs.
//!
//! With [`EdgeConfig::identity`], our phones' INVITEs leave signed over our HIT (RFC 8224),
//! those from the network are verified against their offers, and for a call our phone
//! answered the edge follows the ACK with a signed UPDATE addressed to the caller's edge,
//! which verifies it against the answer and keeps it from its phone (the draft's §4.1
//! between two proxies; `ARCHITECTURE.md` has why).
//!
//! Only configured client networks are served: requests from a client go to the next hop
//! (or along their dialog's route); requests from anywhere else are forwarded only to a
//! client. The edge is never an open relay.
//!
//! Call order: feed [`EdgeProxy::handle_datagram`] / [`EdgeProxy::handle_stream`] /
//! [`EdgeProxy::handle_timeout`] (and [`EdgeProxy::notify`]), then drain
//! [`EdgeProxy::poll_transmit`], [`EdgeProxy::poll_event`] and arm [`EdgeProxy::poll_timeout`].

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sipx_sip::{
    self as sx, HeaderName, Message, Method, Request, Response, StatusCode,
    headers::{self as sh, Address},
    parser::{Limits, StreamParser},
};

use super::{ConnId, Dest, RequestAuth, TimerConfig, Transport, malformed, ua::uri_dest};
use crate::identity;
use crate::sdp::{
    self, Form, Hit, HostIdentity, IdentityEntry, IdentityPolicy, Scope, Sdp, rewrite,
};

/// Our branch parameters: forwarded requests, and the requests we originate.
const FWD_PREFIX: &str = "z9hG4bKhe";
const OWN_PREFIX: &str = "z9hG4bKho";
/// The URI parameter that marks our Record-Route and Path entries.
const MARK: &str = "hip-edge";

/// An IP network: `192.0.2.0/24`, `2001:db8::/32`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What to do with a call whose peer sent no Host Identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoHitPolicy {
    /// Refuse the call with a status and reason phrase that say why (default).
    #[default]
    Refuse,
    /// Let it through unprotected, and tell the phone so.
    Clear,
}

/// What a request's Identity proved (RFC 8224 §6.2).
struct Judgement {
    /// What verified, or why not.
    result: Result<identity::Verified, String>,
    /// A valid signature over other HITs: the SDP was altered on the path.
    tampering: bool,
    /// The refusal when it did not verify: 428 without Identity, 438 otherwise.
    status: u16,
    reason: &'static str,
}

/// Verifies the Identity headers of a request (`what`: "INVITE", "callee's UPDATE")
/// against the HITs of the SDP they should bind (`sdp`: "offer", "answer").
fn judge(id: &EdgeIdentity, auth: &RequestAuth, hits: &[Hit], what: &str, sdp: &str) -> Judgement {
    let invalid = |result, tampering| Judgement {
        result,
        tampering,
        status: 438,
        reason: "Invalid Identity Header",
    };
    match identity::verify_any(
        &auth.identity,
        &id.trust,
        &identity::Expected {
            from_uri: &auth.from_uri,
            to_uri: &auth.to_uri,
            sdp_hits: hits,
            now: (id.unix_now)(),
            window: id.window,
        },
    ) {
        None => Judgement {
            result: Err(format!("no Identity header in the {what} (RFC 8224)")),
            tampering: false,
            status: 428,
            reason: "Use Identity Header",
        },
        Some(Ok(v)) => invalid(Ok(v), false),
        Some(Err(e)) if e.is_tampering() => invalid(
            Err(format!(
                "SIP Identity of the {what}: {e}: the {sdp} was altered on the path"
            )),
            true,
        ),
        Some(Err(e)) => invalid(Err(format!("{what} Identity not verified: {e}")), false),
    }
}

/// The edge's configuration (from the agent's `[edge]` table).
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Where we listen. Record-Route and Path name these addresses.
    pub listeners: Vec<(Transport, SocketAddr)>,
    /// The networks of the user agents we serve.
    pub clients: Vec<Net>,
    /// Where the phones' requests outside a dialog go (their real outbound proxy/registrar).
    pub next_hop: (Transport, SocketAddr),
    /// Our Host Identity as it goes into SDP.
    pub own: HostIdentity,
    /// How it is written (the draft's §3.2 forms).
    pub policy: IdentityPolicy,
    /// A call from the network whose offer has no HIT.
    pub inbound_without_hit: NoHitPolicy,
    /// A call of our phone whose answer has no HIT.
    pub outbound_without_hit: NoHitPolicy,
    /// HI → HIT, for HIs in a peer's SDP (the HIP core provides it).
    pub derive: fn(&[u8]) -> Result<Hit, String>,
    /// Transaction timers (T1 for our own retransmissions).
    pub timers: TimerConfig,
    /// Calls held at once; more INVITEs get 503.
    pub max_calls: usize,
    /// Transactions held at once; more requests get 503.
    pub max_transactions: usize,
    /// Seed for branches, tags and Call-IDs.
    pub seed: u64,
    /// SIP Identity (RFC 8224, the draft's §4.1) for edge calls: `None` for none.
    pub identity: Option<EdgeIdentity>,
    /// Protect calls with HIP: put our HIT in our phones' SDP and move media to HITs.
    /// `false` (an agent with `[hip] enabled = false`): a plain stateful proxy that passes
    /// SDP untouched, every call [`EdgeEvent::Unprotected`] — what the post-answer delay
    /// bench measures HIP against.
    pub protect: bool,
}

/// RFC 8224 at the edge: the INVITEs our phones place leave signed over our HIT (we are the
/// authentication service of `domain`), and the Identity of the INVITEs that reach them is
/// verified against the offer's HITs; one proving that the offer was altered is refused
/// with 438.
#[derive(Debug, Clone)]
pub struct EdgeIdentity {
    /// Our domain's ES256 key and the `info` URI of our Identity headers; `None`: we only
    /// verify.
    pub signer: Option<(identity::SigningKey, String)>,
    /// The domain our key signs for (a phone's From must be in it).
    pub domain: String,
    /// Who may sign for which domain.
    pub trust: identity::Trust,
    /// How far `iat` may be from our clock, seconds.
    pub window: u64,
    /// The wall clock, seconds since the Unix epoch (PASSporT `iat`).
    pub unix_now: fn() -> i64,
    /// Refuse an INVITE whose Identity proves its offer altered (438); otherwise it goes
    /// on, flagged (`PeerIdentity` with `tampering`).
    pub refuse_tampered: bool,
    /// Refuse an INVITE from the network whose Identity does not verify (428, 438; 488
    /// for a late offer).
    pub require_verified: bool,
}

/// Bytes to send, and the listener to send them from.
#[derive(Debug, Clone)]
pub struct EdgeTransmit {
    /// The listener (its socket) to send from.
    pub from: (Transport, SocketAddr),
    /// Where to.
    pub dest: Dest,
    /// One SIP message.
    pub data: Bytes,
}

/// Where an SDP body of the peer came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SdpStage {
    /// An offer (INVITE, re-INVITE, UPDATE).
    Offer,
    /// An answer (a response, or an ACK for a late offer).
    Answer,
}

/// What happened, for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeEvent {
    /// The peer's SDP carried these Host Identities; the phone now gets the peer's HIT.
    PeerHits {
        /// Call-ID.
        call_id: String,
        /// Whether our phone placed the call.
        phone_is_caller: bool,
        /// The peer's SIP URI (the HITs are bound to it).
        peer_uri: String,
        /// Every identity from the peer's SDP.
        identities: Vec<IdentityEntry>,
        /// Offer or answer.
        stage: SdpStage,
        /// The request's Identity headers and arrival, when a request carried the SDP.
        auth: Option<RequestAuth>,
    },
    /// Our phone answered a call from the network (its 2xx left): HIP accepts the caller.
    PhoneAnswered {
        /// Call-ID.
        call_id: String,
    },
    /// The far end rings for our phone's call (its first provisional response with a
    /// To tag arrived): its agent's HIT is not known yet (it comes with the answer), but
    /// its locator is, so HIP may start towards it opportunistically and be confirmed
    /// against the answer's HIT ("the first word is not lost").
    PeerRinging {
        /// Call-ID.
        call_id: String,
        /// Where the peer's agent is, as for [`EdgeEvent::PeerAnswered`].
        locator: Option<IpAddr>,
    },
    /// The far end answered our phone's call (its 2xx arrived): HIP starts towards it.
    PeerAnswered {
        /// Call-ID.
        call_id: String,
        /// Where the peer's agent is: the host of the first Record-Route, else of the
        /// Contact.
        locator: Option<IpAddr>,
    },
    /// A call goes through without HIP, as `[edge] *_without_hit = "clear"` allows.
    Unprotected {
        /// Call-ID.
        call_id: String,
        /// Why.
        why: String,
    },
    /// The call is over (BYE, CANCEL, a final error, or our own refusal).
    Ended {
        /// Call-ID.
        call_id: String,
        /// Why.
        reason: String,
    },
    /// Our phone's INVITE left signed over our HIT (`Ok`, with the signer's domain), or
    /// why it did not.
    OwnSigned {
        /// Call-ID.
        call_id: String,
        /// The signer's domain, or why nothing was signed.
        result: Result<String, String>,
    },
    /// The Identity of an INVITE from the network, checked against its offer's HITs: what
    /// verified, or why nothing did (absent, untrusted, stale, …). Refused instead (no
    /// event) under [`EdgeIdentity::refuse_tampered`] / [`EdgeIdentity::require_verified`].
    PeerIdentity {
        /// Call-ID.
        call_id: String,
        /// What verified, or why not.
        result: Result<identity::Verified, String>,
        /// The Identity proves that the offer was altered on the path (a valid signature
        /// over other HITs).
        tampering: bool,
    },
    /// The callee's half of the draft's §4.1 for our phone's call: the far edge's signed
    /// UPDATE (absorbed here, never passed to the phone), checked against the HITs of the
    /// answer: what verified, or why not. We answered it 200 when it verified, with an
    /// error otherwise.
    PeerUpdate {
        /// Call-ID.
        call_id: String,
        /// What verified, or why not.
        result: Result<identity::Verified, String>,
        /// The Identity proves that the answer was altered on the path.
        tampering: bool,
    },
    /// Our signed UPDATE for a call our phone answered (the draft's §4.1): accepted by
    /// the caller's edge (`Ok`, with the signer's domain), or why it was not sent or not
    /// accepted.
    OwnUpdate {
        /// Call-ID.
        call_id: String,
        /// The signer's domain, or why our HIT is not signed.
        result: Result<String, String>,
    },
    /// Something was refused or dropped, and the status we sent (if any).
    Refused {
        /// Who sent it.
        peer: SocketAddr,
        /// The status we answered, or `None` when dropped.
        status: Option<u16>,
        /// Why.
        reason: String,
    },
}

/// One call through the edge, as HIP needs to know it.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeCall {
    /// Call-ID.
    pub call_id: String,
    /// Whether our phone placed it.
    pub phone_is_caller: bool,
    /// Our phone's URI.
    pub local_uri: String,
    /// The peer's URI.
    pub remote_uri: String,
    /// The peer's HITs from its SDP.
    pub peer_hits: Vec<Hit>,
    /// Passing in the clear (policy `clear`).
    pub unprotected: bool,
    /// A 2xx for the INVITE went through.
    pub answered: bool,
    /// The far end's ringing was reported ([`EdgeEvent::PeerRinging`]).
    #[serde(skip)]
    ringing: bool,
    /// Our phone's Contact URI (the Request-URI of a MESSAGE to it).
    #[serde(skip)]
    phone_contact: Option<String>,
    /// Where our phone's messages come from or go to: a MESSAGE goes there, so that a
    /// Contact that is no address (a GRUU, RFC 5627, as linphone uses) still reaches it.
    #[serde(skip)]
    phone_addr: Option<Dest>,
    /// The form the peer's SDP used (for mirroring in our phone's answer).
    #[serde(skip)]
    peer_form: Option<Form>,
    /// A call from the network: how a request reaches the caller's hip edge (the nearest
    /// Record-Route entry with our mark, and the entries before it), for our signed UPDATE.
    #[serde(skip)]
    peer_edge: Option<(String, Vec<String>)>,
    /// Our signed UPDATE left (or could not).
    #[serde(skip)]
    update_sent: bool,
    /// Our phone's call: the far edge's signed UPDATE seen (CSeq, and our answer), so
    /// that a retransmission gets the same answer and reports nothing twice.
    #[serde(skip)]
    peer_update: Option<(u32, u16, &'static str)>,
}

/// A forwarded request waiting for its responses, or one we originated.
#[derive(Debug)]
struct ClientTx {
    method: Method,
    call_id: String,
    /// Where the request came from (`None` for one we originated).
    upstream: Option<(Dest, (Transport, SocketAddr))>,
    /// The request as it arrived, for the final responses we make ourselves.
    original: Option<Request>,
    /// Where it went, and from which listener.
    downstream: Dest,
    out: (Transport, SocketAddr),
    /// The bytes we sent (retransmissions).
    sent: Bytes,
    /// Request from a client (a phone) rather than from the network.
    from_client: bool,
    /// Next retransmission and its interval (UDP downstream when nobody upstream retransmits).
    retransmit: Option<(Instant, Duration)>,
    /// A response arrived (stops INVITE retransmissions).
    answered: bool,
    /// A final response arrived.
    finished: bool,
    /// The transaction is forgotten then.
    expires: Instant,
}

/// The proxy core. See the module docs for the call order.
pub struct EdgeProxy {
    cfg: EdgeConfig,
    txs: HashMap<(String, bool), ClientTx>,
    calls: HashMap<String, EdgeCall>,
    parsers: HashMap<ConnId, StreamParser>,
    transmits: VecDeque<EdgeTransmit>,
    events: VecDeque<EdgeEvent>,
    counter: u64,
}

fn hval(h: &sx::Headers, n: &HeaderName) -> Option<String> {
    h.value(n).map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn to_tag(h: &sx::Headers) -> Option<String> {
    let to = h.typed::<sh::To>()?.ok()?;
    to.tag().map(|t| String::from_utf8_lossy(t).into_owned())
}

fn host_port(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    }
}

/// Every address of a list header (Route, Record-Route), in order.
fn addresses(h: &sx::Headers, name: &HeaderName, label: &'static str) -> Vec<Address> {
    h.get_all(name)
        .flat_map(|v| Address::parse_list(&v.value(), label).unwrap_or_default())
        .collect()
}

/// Replaces the first header `name` in place (or appends one).
fn set_header(h: &mut sx::Headers, name: HeaderName, value: String) {
    let Ok(new) = sx::Header::build(name.clone(), value) else {
        return;
    };
    let mut out = sx::Headers::new();
    let mut done = false;
    for x in h.iter() {
        if !done && x.name() == &name {
            out.push(new.clone());
            done = true;
        } else {
            out.push(x.clone());
        }
    }
    if !done {
        out.push(new);
    }
    *h = out;
}

/// Removes the topmost Via value (RFC 3261 §16.7 step 3 in reverse, for responses).
fn pop_via(h: &mut sx::Headers) {
    let mut out = sx::Headers::new();
    let mut done = false;
    for x in h.iter() {
        if !done && x.name() == &HeaderName::Via {
            done = true;
            let v = x.value();
            let end = sh::via::first_hop_end(&v);
            let rest = String::from_utf8_lossy(v.get(end + 1..).unwrap_or_default())
                .trim()
                .to_owned();
            if !rest.is_empty()
                && let Ok(hd) = sx::Header::build(HeaderName::Via, rest)
            {
                out.push(hd);
            }
        } else {
            out.push(x.clone());
        }
    }
    *h = out;
}

fn is_sdp(h: &sx::Headers, body: &[u8]) -> bool {
    if body.is_empty() {
        return false;
    }
    match hval(h, &HeaderName::ContentType) {
        Some(t) => t.trim().to_ascii_lowercase().starts_with("application/sdp"),
        None => body.starts_with(b"v="),
    }
}

/// Why an SDP body was refused: the status, its reason phrase, and a Warning text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// SIP status (488 for media we cannot protect).
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Longer explanation (Warning header, RFC 3261 §20.43).
    pub why: String,
}

impl Refusal {
    fn sdp(why: impl Into<String>) -> Self {
        Self {
            status: 488,
            reason: "Not Acceptable Here".into(),
            why: why.into(),
        }
    }
}

/// A phone's SDP on its way out: addresses moved to our HIT, our HIT inserted. `form` is
/// the form of the peer's offer when this is an answer (for mirroring).
pub fn outbound_sdp(
    cfg: &EdgeConfig,
    body: &[u8],
    answer_to: Option<Option<Form>>,
) -> Result<Bytes, Refusal> {
    let mut s = Sdp::parse_bytes(body).map_err(|e| Refusal {
        status: 400,
        reason: "Bad Request".into(),
        why: format!("the phone's SDP does not parse: {e}"),
    })?;
    let found = rewrite::media_host(&s).map_err(|e| {
        Refusal::sdp(format!(
            "hip cannot move the phone's media onto its HIT: {e}"
        ))
    })?;
    if let Some(host) = found.host {
        if host.is_ipv4() {
            return Err(Refusal::sdp(format!(
                "the phone's media is IPv4 ({host}); hip carries media between HITs, which are IPv6: \
                 configure the phone for IPv6 media (baresip: net_interface set to an IPv6 address; linphone: use_ipv6=1)"
            )));
        }
        if !cfg.clients.iter().any(|n| n.contains(host)) {
            return Err(Refusal::sdp(format!(
                "the phone's media address {host} is not in [edge] clients: its RTP would not be on this host's HITs"
            )));
        }
    }
    for scope in std::iter::once(Scope::Session).chain((0..s.media_count()).map(Scope::Media)) {
        let _ = sdp::remove_identities(&mut s, scope);
    }
    rewrite::move_to(&mut s, cfg.own.hit.to_ipv6())
        .map_err(|e| Refusal::sdp(format!("hip cannot move the phone's media: {e}")))?;
    let form = match answer_to {
        Some(Some(f)) if cfg.policy.mirror_offer_form => f,
        _ => cfg.policy.form,
    };
    let id = HostIdentity {
        hit: cfg.own.hit,
        hi: if cfg.policy.send_hi {
            cfg.own.hi.clone()
        } else {
            None
        },
    };
    let scopes: Vec<Scope> = if cfg.policy.per_media {
        (0..s.media_count())
            .filter(|i| {
                s.media_line(*i)
                    .and_then(|m| m.split_whitespace().nth(1))
                    .and_then(|p| p.split('/').next()?.parse::<u16>().ok())
                    .is_some_and(|p| p != 0)
            })
            .map(Scope::Media)
            .collect()
    } else {
        vec![Scope::Session]
    };
    for scope in scopes {
        sdp::insert_identity(&mut s, scope, form, cfg.policy.hit_format, &id)
            .map_err(|e| Refusal::sdp(format!("inserting our HIT: {e}")))?;
    }
    Ok(Bytes::from(s.emit()))
}

/// What a peer's SDP became on its way to the phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Addresses moved to the peer's HIT.
    Moved {
        /// The body for the phone.
        body: Bytes,
        /// The identities the peer sent.
        identities: Vec<IdentityEntry>,
    },
    /// The peer sent no Host Identity: the body is unchanged.
    NoHit,
}

/// A peer's SDP on its way to the phone: HITs found, addresses moved to the peer's HIT.
pub fn inbound_sdp(cfg: &EdgeConfig, body: &[u8]) -> Result<Inbound, Refusal> {
    let mut s = Sdp::parse_bytes(body).map_err(|e| Refusal {
        status: 400,
        reason: "Bad Request".into(),
        why: format!("the peer's SDP does not parse: {e}"),
    })?;
    let ids = sdp::find_identities(&s, &cfg.derive).map_err(|e| Refusal {
        status: 400,
        reason: "Bad Request".into(),
        why: format!("the peer's Host Identity lines: {e}"),
    })?;
    if ids.is_empty() {
        return Ok(Inbound::NoHit);
    }
    let mut hits: Vec<Hit> = Vec::new();
    for i in 0..s.media_count() {
        for h in sdp::hits_for_media(&ids, i) {
            if !hits.contains(&h) {
                hits.push(h);
            }
        }
    }
    if hits.is_empty() {
        hits = ids.iter().map(|i| i.hit).collect();
        hits.dedup();
    }
    if hits.len() != 1 {
        let list: Vec<String> = hits.iter().map(Hit::to_string).collect();
        return Err(Refusal::sdp(format!(
            "the peer's SDP carries several HITs ({}): the phone can send to one address only",
            list.join(", ")
        )));
    }
    rewrite::move_to(&mut s, hits[0].to_ipv6()).map_err(|e| {
        Refusal::sdp(format!(
            "hip cannot move the peer's media onto its HIT: {e}"
        ))
    })?;
    Ok(Inbound::Moved {
        body: Bytes::from(s.emit()),
        identities: ids,
    })
}

/// The RFC 8224 Identity headers, From/To URIs and arrival of a request.
fn auth_of(req: &Request, transport: Transport) -> RequestAuth {
    let uri = |a: Option<Result<Address, sx::HeaderError>>| {
        a.and_then(Result::ok)
            .map(|a| a.uri.to_string())
            .unwrap_or_default()
    };
    RequestAuth {
        identity: req
            .headers
            .get_all(&HeaderName::Identity)
            .map(|h| String::from_utf8_lossy(&h.value()).into_owned())
            .collect(),
        from_uri: uri(req.headers.typed::<sh::From>().map(|r| r.map(|a| a.0))),
        to_uri: uri(req.headers.typed::<sh::To>().map(|r| r.map(|a| a.0))),
        transport: Some(transport),
        sips: req.uri.scheme().is_secure(),
    }
}

impl EdgeProxy {
    /// A proxy with `cfg`; nothing is sent until input arrives.
    pub fn new(cfg: EdgeConfig) -> Self {
        Self {
            cfg,
            txs: HashMap::new(),
            calls: HashMap::new(),
            parsers: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counter: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &EdgeConfig {
        &self.cfg
    }

    /// The calls through the edge.
    pub fn calls(&self) -> impl Iterator<Item = &EdgeCall> {
        self.calls.values()
    }

    /// One call.
    pub fn call(&self, call_id: &str) -> Option<&EdgeCall> {
        self.calls.get(call_id)
    }

    /// Transactions held (forwarded and our own).
    pub fn transaction_count(&self) -> usize {
        self.txs.len()
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<EdgeTransmit> {
        self.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<EdgeEvent> {
        self.events.pop_front()
    }

    /// When [`EdgeProxy::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.txs
            .values()
            .flat_map(|t| [Some(t.expires), t.retransmit.map(|r| r.0)])
            .flatten()
            .min()
    }

    /// Retransmissions and expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        let t2 = self.cfg.timers.t2;
        let mut expired = Vec::new();
        for (k, t) in &mut self.txs {
            if t.expires <= now {
                expired.push(k.clone());
                continue;
            }
            if let Some((at, every)) = t.retransmit
                && at <= now
            {
                self.transmits.push_back(EdgeTransmit {
                    from: t.out,
                    dest: t.downstream,
                    data: t.sent.clone(),
                });
                let next = if t.method == Method::Invite {
                    every * 2
                } else {
                    (every * 2).min(t2)
                };
                t.retransmit = Some((now + next, next));
            }
        }
        for k in expired {
            let Some(t) = self.txs.remove(&k) else {
                continue;
            };
            if t.method == Method::Update && t.upstream.is_none() && !t.finished {
                self.events.push_back(EdgeEvent::OwnUpdate {
                    call_id: t.call_id,
                    result: Err("our signed UPDATE (draft §4.1) got no answer".into()),
                });
                continue;
            }
            if t.method == Method::Invite
                && !t.finished
                && let Some(((up, listener), req)) = t.upstream.zip(t.original)
            {
                // Timer C (RFC 3261 §16.8): nobody answered; the phone hears why.
                self.reply_to(&req, up, listener, 408, "Request Timeout", None);
                self.end_call(&t.call_id, "no final response (Timer C)");
            }
        }
    }

    /// A datagram arrived on listener `local`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        local: (Transport, SocketAddr),
        peer: SocketAddr,
        data: &[u8],
    ) {
        if data.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            return;
        }
        let src = Dest {
            transport: local.0,
            addr: peer,
            conn: None,
        };
        match sx::parse_datagram(Bytes::copy_from_slice(data), &Limits::datagram()) {
            Ok(m) => self.handle_message(now, local, src, m),
            Err(e) => self.unparseable(local, src, data, &e.to_string()),
        }
    }

    /// Bytes on a stream connection accepted by listener `local`. `false`: framing lost,
    /// close the connection.
    pub fn handle_stream(
        &mut self,
        now: Instant,
        local: (Transport, SocketAddr),
        conn: ConnId,
        peer: SocketAddr,
        data: &[u8],
    ) -> bool {
        let src = Dest {
            transport: local.0,
            addr: peer,
            conn: Some(conn),
        };
        let p = self
            .parsers
            .entry(conn)
            .or_insert_with(|| StreamParser::new(Limits::stream()));
        match p.push(data) {
            Ok(msgs) => {
                for m in msgs {
                    self.handle_message(now, local, src, m);
                }
                true
            }
            Err(e) => {
                self.parsers.remove(&conn);
                self.unparseable(local, src, data, &e.to_string());
                false
            }
        }
    }

    /// A stream connection closed.
    pub fn connection_closed(&mut self, conn: ConnId) {
        self.parsers.remove(&conn);
    }

    fn unparseable(&mut self, local: (Transport, SocketAddr), src: Dest, data: &[u8], why: &str) {
        let tag = self.token();
        let answered = malformed::error_response(data, 400, "Bad Request", &tag, why).map(|r| {
            self.transmits.push_back(EdgeTransmit {
                from: local,
                dest: src,
                data: Bytes::from(r),
            });
            400
        });
        self.events.push_back(EdgeEvent::Refused {
            peer: src.addr,
            status: answered,
            reason: why.to_owned(),
        });
    }

    fn token(&mut self) -> String {
        self.counter += 1;
        let mut h = std::hash::DefaultHasher::new();
        (self.cfg.seed, self.counter).hash(&mut h);
        format!("{:016x}", h.finish())
    }

    fn is_client(&self, ip: IpAddr) -> bool {
        self.cfg.clients.iter().any(|n| n.contains(ip))
    }

    fn is_ours(&self, uri: &sx::Uri) -> bool {
        let Some(sx::Host::Ip(ip)) = uri.host() else {
            return false;
        };
        self.cfg
            .listeners
            .iter()
            .any(|(t, a)| a.ip() == *ip && uri.port().unwrap_or(t.default_port()) == a.port())
    }

    /// The listener to send to `dest` from: same transport and address family, loopback
    /// for loopback.
    fn listener_for(&self, dest: &Dest) -> Option<(Transport, SocketAddr)> {
        let same = |(t, a): &&(Transport, SocketAddr)| {
            *t == dest.transport && a.is_ipv4() == dest.addr.is_ipv4()
        };
        let lo = dest.addr.ip().is_loopback();
        self.cfg
            .listeners
            .iter()
            .filter(same)
            .find(|(_, a)| a.ip().is_loopback() == lo)
            .or_else(|| self.cfg.listeners.iter().find(same))
            .copied()
    }

    /// Our branch for a request forwarded with upstream top Via `via`: derived, so that a
    /// CANCEL and the ACK of a non-2xx get the INVITE's (RFC 3261 §16.11).
    fn derive_branch(&self, via: &str) -> String {
        let mut h = std::hash::DefaultHasher::new();
        (self.cfg.seed, via, 1u8).hash(&mut h);
        let a = h.finish();
        let mut h = std::hash::DefaultHasher::new();
        (self.cfg.seed, via, 2u8).hash(&mut h);
        format!("{FWD_PREFIX}{a:016x}{:016x}", h.finish())
    }

    fn reply_to(
        &mut self,
        req: &Request,
        dest: Dest,
        from: (Transport, SocketAddr),
        status: u16,
        reason: &str,
        warning: Option<&str>,
    ) {
        let tag = self.token();
        let Some(code) = StatusCode::new(status) else {
            return;
        };
        let Ok(mut b) = sx::ResponseBuilder::to_request(req, code, reason.to_owned()) else {
            return;
        };
        if status > 100 && to_tag(&req.headers).is_none() {
            let to = hval(&req.headers, &HeaderName::To).unwrap_or_default();
            b = match b.set_header(&HeaderName::To, format!("{to};tag={tag}")) {
                Ok(b) => b,
                Err(_) => return,
            };
        }
        if let Some(w) = warning {
            let text = w.replace(['"', '\\'], "'");
            b = match b.header(
                HeaderName::Warning,
                format!("399 {} \"{text}\"", host_port(from.1)),
            ) {
                Ok(b) => b,
                Err(_) => return,
            };
        }
        self.transmits.push_back(EdgeTransmit {
            from,
            dest,
            data: Message::Response(b.build()).to_bytes(),
        });
    }

    fn refuse(
        &mut self,
        req: &Request,
        src: Dest,
        local: (Transport, SocketAddr),
        status: u16,
        reason: &str,
        why: &str,
    ) {
        if req.method != Method::Ack {
            self.reply_to(req, src, local, status, reason, Some(why));
        }
        self.events.push_back(EdgeEvent::Refused {
            peer: src.addr,
            status: (req.method != Method::Ack).then_some(status),
            reason: why.to_owned(),
        });
    }

    fn end_call(&mut self, call_id: &str, reason: &str) {
        if self.calls.remove(call_id).is_some() {
            self.events.push_back(EdgeEvent::Ended {
                call_id: call_id.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }

    fn handle_message(
        &mut self,
        now: Instant,
        local: (Transport, SocketAddr),
        src: Dest,
        msg: Message,
    ) {
        let h = msg.headers();
        let missing = [
            (HeaderName::Via, "Via"),
            (HeaderName::From, "From"),
            (HeaderName::To, "To"),
            (HeaderName::CallId, "Call-ID"),
            (HeaderName::CSeq, "CSeq"),
        ]
        .into_iter()
        .find(|(n, _)| h.get(n).is_none());
        match msg {
            Message::Request(req) => {
                if let Some((_, name)) = missing {
                    let why = format!("missing {name}");
                    let tag = self.token();
                    let r = malformed::error_response(
                        &Message::Request(req).to_bytes(),
                        400,
                        "Bad Request",
                        &tag,
                        &why,
                    );
                    if let Some(r) = r {
                        self.transmits.push_back(EdgeTransmit {
                            from: local,
                            dest: src,
                            data: Bytes::from(r),
                        });
                    }
                    self.events.push_back(EdgeEvent::Refused {
                        peer: src.addr,
                        status: Some(400),
                        reason: why,
                    });
                    return;
                }
                self.on_request(now, local, src, req);
            }
            Message::Response(resp) => {
                if missing.is_none() {
                    self.on_response(now, resp);
                }
            }
        }
    }

    fn on_request(
        &mut self,
        now: Instant,
        local: (Transport, SocketAddr),
        src: Dest,
        mut req: Request,
    ) {
        let h = &req.headers;
        let Some(Ok(cseq)) = h.typed::<sh::CSeq>() else {
            return self.refuse(&req, src, local, 400, "Bad Request", "bad CSeq");
        };
        if cseq.method != req.method {
            return self.refuse(&req, src, local, 400, "Bad Request", "CSeq method differs");
        }
        let Some(Ok(top_via)) = h.typed::<sh::Via>() else {
            return self.refuse(&req, src, local, 400, "Bad Request", "bad Via");
        };
        let call_id = hval(h, &HeaderName::CallId).unwrap_or_default();
        let in_dialog = to_tag(h).is_some();
        let from_client = self.is_client(src.addr.ip());

        // Loop detection and Max-Forwards (RFC 3261 §16.3, §16.6 step 3).
        let mf = match hval(h, &HeaderName::MaxForwards) {
            None => 70,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(v) => v,
                Err(_) => {
                    return self.refuse(&req, src, local, 400, "Bad Request", "bad Max-Forwards");
                }
            },
        };
        if mf == 0 {
            return self.refuse(&req, src, local, 483, "Too Many Hops", "Max-Forwards is 0");
        }

        // A retransmission of a request we forwarded: send our copy again.
        let upstream_via = String::from_utf8_lossy(&h.value(&HeaderName::Via).unwrap_or_default())
            .chars()
            .take(512)
            .collect::<String>();
        let top = {
            let v = upstream_via.as_bytes();
            String::from_utf8_lossy(&v[..sh::via::first_hop_end(v)]).into_owned()
        };
        let _ = top_via;
        let branch = self.derive_branch(&top);
        let key = (branch.clone(), req.method == Method::Cancel);
        if req.method != Method::Ack
            && let Some(t) = self.txs.get(&key)
        {
            self.transmits.push_back(EdgeTransmit {
                from: t.out,
                dest: t.downstream,
                data: t.sent.clone(),
            });
            return;
        }

        // Routing (RFC 3261 §16.4: our own Route entries go first).
        while let Some(first) = addresses(&req.headers, &HeaderName::Route, "Route").first() {
            if !self.is_ours(&first.uri) {
                break;
            }
            if req
                .headers
                .remove_address_value(&HeaderName::Route, 0)
                .is_err()
            {
                return self.refuse(&req, src, local, 400, "Bad Request", "bad Route");
            }
        }
        let next_route = addresses(&req.headers, &HeaderName::Route, "Route")
            .into_iter()
            .next()
            .map(|a| a.uri);
        // The far edge's signed UPDATE for our phone's call (draft §4.1): addressed to us,
        // answered here, never passed to the phone (whose dialog knows nothing of it).
        if req.method == Method::Update
            && !from_client
            && in_dialog
            && next_route.is_none()
            && self.is_ours(&req.uri)
        {
            return self.on_signed_update(src, local, &req, &call_id, cseq.sequence);
        }
        // A CANCEL and the ACK of a non-2xx follow their INVITE (same branch).
        let invite_key = (branch.clone(), false);
        let follows_invite = matches!(req.method, Method::Cancel | Method::Ack)
            && self
                .txs
                .get(&invite_key)
                .is_some_and(|t| t.method == Method::Invite);
        let dest = if follows_invite {
            self.txs.get(&invite_key).map(|t| t.downstream)
        } else if from_client && !in_dialog && next_route.is_none() {
            Some(Dest {
                transport: self.cfg.next_hop.0,
                addr: self.cfg.next_hop.1,
                conn: None,
            })
        } else {
            let target = next_route.as_ref().unwrap_or(&req.uri);
            uri_dest(target, Transport::Udp)
        };
        // Never an open relay: from outside, only to our clients.
        if !from_client && !dest.is_some_and(|d| self.is_client(d.addr.ip())) {
            let to = dest.map_or_else(|| "a name".to_owned(), |d| d.addr.ip().to_string());
            return self.refuse(
                &req,
                src,
                local,
                403,
                "Forbidden",
                &format!(
                    "not a relay: {to} is not an [edge] client, and requests from outside go only to clients"
                ),
            );
        }
        let Some(dest) = dest else {
            return self.refuse(
                &req,
                src,
                local,
                502,
                "Bad Gateway",
                "the next hop is not an IP address (no DNS in the edge)",
            );
        };
        let Some(out) = self.listener_for(&dest) else {
            return self.refuse(
                &req,
                src,
                local,
                503,
                "Service Unavailable",
                &format!("no {} listener for {}", dest.transport, dest.addr),
            );
        };
        if req.method != Method::Ack && self.txs.len() >= self.cfg.max_transactions {
            return self.refuse(
                &req,
                src,
                local,
                503,
                "Service Unavailable",
                "too many transactions",
            );
        }
        let original = req.clone();

        // The SDP.
        let dialog_creating = req.method == Method::Invite && !in_dialog;
        if dialog_creating && !self.calls.contains_key(&call_id) {
            if self.calls.len() >= self.cfg.max_calls {
                return self.refuse(
                    &req,
                    src,
                    local,
                    503,
                    "Service Unavailable",
                    "too many calls",
                );
            }
            let uri = |a: Option<Result<Address, sx::HeaderError>>| {
                a.and_then(Result::ok)
                    .map(|a| a.uri.to_string())
                    .unwrap_or_default()
            };
            let from = uri(req.headers.typed::<sh::From>().map(|r| r.map(|a| a.0)));
            let to = uri(req.headers.typed::<sh::To>().map(|r| r.map(|a| a.0)));
            let contact = req
                .headers
                .typed::<sh::Contact>()
                .and_then(Result::ok)
                .map(|c| c.uri.to_string());
            self.calls.insert(
                call_id.clone(),
                EdgeCall {
                    call_id: call_id.clone(),
                    phone_is_caller: from_client,
                    local_uri: if from_client {
                        from.clone()
                    } else {
                        to.clone()
                    },
                    remote_uri: if from_client { to } else { from },
                    peer_hits: Vec::new(),
                    unprotected: false,
                    answered: false,
                    ringing: false,
                    phone_contact: if from_client {
                        contact
                    } else {
                        Some(req.uri.to_string())
                    },
                    phone_addr: if from_client {
                        Some(src)
                    } else {
                        uri_dest(&req.uri, Transport::Udp)
                    },
                    peer_form: None,
                    peer_edge: (!from_client)
                        .then(|| self.edge_route(&req.headers))
                        .flatten(),
                    update_sent: false,
                    peer_update: None,
                },
            );
            if !self.cfg.protect
                && let Some(c) = self.calls.get_mut(&call_id)
            {
                c.unprotected = true;
                self.events.push_back(EdgeEvent::Unprotected {
                    call_id: call_id.clone(),
                    why: "HIP is off at this edge ([hip] enabled = false)".into(),
                });
            }
        }
        let known_call = self.calls.contains_key(&call_id);
        if known_call && self.cfg.protect && is_sdp(&req.headers, req.body()) {
            let stage = if req.method == Method::Ack {
                SdpStage::Answer
            } else {
                SdpStage::Offer
            };
            let body = req.body().clone();
            let result = if from_client {
                let form = self.calls.get(&call_id).and_then(|c| c.peer_form);
                let answer_to = (stage == SdpStage::Answer).then_some(form);
                outbound_sdp(&self.cfg, &body, answer_to).map(Some)
            } else {
                let auth = auth_of(&req, src.transport);
                self.take_inbound(&call_id, &body, stage, Some(auth))
            };
            match result {
                Ok(Some(b)) => {
                    set_header(
                        &mut req.headers,
                        HeaderName::ContentLength,
                        b.len().to_string(),
                    );
                    req.set_body(b);
                }
                Ok(None) => {}
                Err(r) => {
                    self.refuse(&original, src, local, r.status, &r.reason, &r.why);
                    if dialog_creating {
                        self.end_call(&call_id, &r.why);
                    }
                    return;
                }
            }
        }

        if dialog_creating && self.cfg.protect && self.calls.contains_key(&call_id) {
            if from_client {
                self.sign_invite(&call_id, &mut req);
            } else if let Err(r) = self.check_identity(&call_id, &req, src.transport) {
                self.refuse(&original, src, local, r.status, &r.reason, &r.why);
                self.end_call(&call_id, &r.why);
                return;
            }
        }

        // Forward (RFC 3261 §16.6): the sender's real address in its Via (RFC 3581 §4, so
        // the next hops see a phone's NAT), Max-Forwards, Record-Route / Path, our Via.
        super::nat::stamp_via(&mut req.headers, src.addr);
        set_header(
            &mut req.headers,
            HeaderName::MaxForwards,
            (mf - 1).to_string(),
        );
        let rr = |(t, a): (Transport, SocketAddr)| {
            format!(
                "<sip:{};transport={};lr;{MARK}>",
                host_port(a),
                t.via_token().to_ascii_lowercase()
            )
        };
        if dialog_creating {
            // RFC 5658: the entry seen by each side names the listener that side uses.
            let mut values = vec![rr(out)];
            if out != local {
                values.push(rr(local));
            }
            for v in values.into_iter().rev() {
                if let Ok(hd) = sx::Header::build(HeaderName::RecordRoute, v) {
                    req.headers.push_front(hd);
                }
            }
        }
        if req.method == Method::Register
            && from_client
            && let Ok(hd) = sx::Header::build(HeaderName::Path, rr(out))
        {
            req.headers.push_front(hd);
        }
        let via = format!(
            "SIP/2.0/{} {};branch={branch}",
            out.0.via_token(),
            host_port(out.1)
        );
        let Ok(vh) = sx::Header::build(HeaderName::Via, via) else {
            return;
        };
        req.headers.push_front(vh);
        let data = Message::Request(req).to_bytes();
        self.transmits.push_back(EdgeTransmit {
            from: out,
            dest,
            data: data.clone(),
        });
        match original.method {
            Method::Ack => {
                if !from_client {
                    // The dialog is confirmed at both edges: the caller's has the answer.
                    self.send_signed_update(now, &call_id, &original);
                }
                return;
            }
            Method::Invite => {
                // RFC 3261 §16.2: a stateful proxy answers an INVITE with 100 itself.
                self.reply_to(&original, src, local, 100, "Trying", None);
            }
            Method::Bye => self.end_call(&call_id, "BYE"),
            _ => {}
        }
        let t1 = self.cfg.timers.t1;
        let linger = if original.method == Method::Invite {
            Duration::from_secs(180)
        } else {
            t1 * 64
        };
        self.txs.insert(
            key,
            ClientTx {
                method: original.method.clone(),
                call_id,
                upstream: Some((src, local)),
                original: Some(original),
                downstream: dest,
                out,
                sent: data,
                from_client,
                retransmit: (dest.transport == Transport::Udp && src.transport.is_reliable())
                    .then_some((now + t1, t1)),
                answered: false,
                finished: false,
                expires: now + linger,
            },
        );
    }

    /// A peer's SDP: HITs learned and addresses moved, or the no-HIT policy. `Ok(None)`:
    /// forward unchanged (in the clear, as the policy allows).
    /// The authentication service's part (RFC 8224 §6.1) for our phone's INVITE, whose SDP
    /// now carries our HIT.
    fn sign_invite(&mut self, call_id: &str, req: &mut Request) {
        let Some(id) = &self.cfg.identity else {
            return;
        };
        let result = (|| {
            let (key, info) = id.signer.as_ref().ok_or("no [security] identity_key")?;
            if !is_sdp(&req.headers, req.body()) {
                return Err(
                    "the INVITE has no SDP (late offer): an Identity would bind no HIT".into(),
                );
            }
            let auth = auth_of(req, Transport::Udp);
            let value = self.passport(id, key, info, &auth.from_uri, &auth.to_uri, "From")?;
            let h = sx::Header::build(HeaderName::Identity, value).map_err(|e| e.to_string())?;
            // A phone's own Identity (it signed its address, not our HIT) cannot be kept
            // beside ours: the offer it signed is gone.
            req.headers.remove_all(&HeaderName::Identity);
            req.headers.push(h);
            Ok(id.domain.clone())
        })();
        self.events.push_back(EdgeEvent::OwnSigned {
            call_id: call_id.to_owned(),
            result,
        });
    }

    /// The authentication service's PASSporT (RFC 8224 §6.1) binding our HIT to our
    /// phone's identity `orig` (`what`: where that came from, for the refusal), towards
    /// `dest`; refused when `orig` is not in the domain our key signs for.
    fn passport(
        &self,
        id: &EdgeIdentity,
        key: &identity::SigningKey,
        info: &str,
        orig: &str,
        dest: &str,
        what: &str,
    ) -> Result<String, String> {
        match identity::domain_of(orig) {
            Some(d) if d.eq_ignore_ascii_case(&id.domain) => {}
            other => {
                return Err(format!(
                    "not signed: the phone's {what} {orig} is in {}, our key signs for {}",
                    other.as_deref().unwrap_or("no domain"),
                    id.domain
                ));
            }
        }
        let claims = identity::Claims {
            orig: identity::canonical(orig).map_err(|e| e.to_string())?,
            dest: vec![identity::canonical(dest).map_err(|e| e.to_string())?],
            iat: (id.unix_now)(),
            hits: vec![self.cfg.own.hit],
        };
        Ok(identity::sign(key, &claims, info))
    }

    /// The verifier's part (RFC 8224 §6.2) for an INVITE from the network, against the
    /// HITs of its offer. `Err` refuses it: 438 when the Identity proves that the offer was
    /// altered on the path.
    fn check_identity(
        &mut self,
        call_id: &str,
        req: &Request,
        transport: Transport,
    ) -> Result<(), Refusal> {
        let Some(id) = &self.cfg.identity else {
            return Ok(());
        };
        let hits = self
            .calls
            .get(call_id)
            .map(|c| c.peer_hits.clone())
            .unwrap_or_default();
        let auth = auth_of(req, transport);
        // (status, reason) of the refusal `require_verified` asks for when nothing verified
        // (RFC 8224 §6.2.2: 428 asks for an Identity, 438 says the one sent failed; a late
        // offer has no SDP for an Identity to bind).
        let (result, tampering, refusal) = if !is_sdp(&req.headers, req.body()) {
            (
                Err("the INVITE has no SDP (late offer): its Identity binds no HIT".to_owned()),
                false,
                (488, "Not Acceptable Here"),
            )
        } else {
            let j = judge(id, &auth, &hits, "INVITE", "offer");
            (j.result, j.tampering, (j.status, j.reason))
        };
        if let Err(why) = &result
            && ((tampering && id.refuse_tampered) || id.require_verified)
        {
            let (status, reason) = refusal;
            let why = if tampering {
                why.clone()
            } else {
                format!("refused ([security] require_verified_peer): {why}")
            };
            return Err(Refusal {
                status,
                reason: reason.into(),
                why,
            });
        }
        self.events.push_back(EdgeEvent::PeerIdentity {
            call_id: call_id.to_owned(),
            result,
            tampering,
        });
        Ok(())
    }

    fn take_inbound(
        &mut self,
        call_id: &str,
        body: &[u8],
        stage: SdpStage,
        auth: Option<RequestAuth>,
    ) -> Result<Option<Bytes>, Refusal> {
        let Some(call) = self.calls.get(call_id) else {
            return Ok(None);
        };
        let phone_is_caller = call.phone_is_caller;
        match inbound_sdp(&self.cfg, body)? {
            Inbound::Moved { body, identities } => {
                let call = self.calls.get_mut(call_id).expect("checked");
                call.peer_form = sdp::form_used(&identities);
                for i in &identities {
                    if !call.peer_hits.contains(&i.hit) {
                        call.peer_hits.push(i.hit);
                    }
                }
                self.events.push_back(EdgeEvent::PeerHits {
                    call_id: call_id.to_owned(),
                    phone_is_caller,
                    peer_uri: call.remote_uri.clone(),
                    identities,
                    stage,
                    auth,
                });
                Ok(Some(body))
            }
            Inbound::NoHit => {
                let (policy, who, key) = if phone_is_caller {
                    (
                        self.cfg.outbound_without_hit,
                        "callee",
                        "outbound_without_hit",
                    )
                } else {
                    (
                        self.cfg.inbound_without_hit,
                        "caller",
                        "inbound_without_hit",
                    )
                };
                let why = format!(
                    "the {who} sent no HIP Host Identity: the call cannot be protected ([edge] {key} = {})",
                    match policy {
                        NoHitPolicy::Refuse => "refuse",
                        NoHitPolicy::Clear => "clear",
                    }
                );
                match policy {
                    NoHitPolicy::Refuse => Err(Refusal {
                        status: 488,
                        reason: format!("Not Acceptable Here: {who} has no HIP identity"),
                        why,
                    }),
                    NoHitPolicy::Clear => {
                        let call = self.calls.get_mut(call_id).expect("checked");
                        if !call.unprotected {
                            call.unprotected = true;
                            self.events.push_back(EdgeEvent::Unprotected {
                                call_id: call_id.to_owned(),
                                why,
                            });
                        }
                        Ok(None)
                    }
                }
            }
        }
    }

    fn on_response(&mut self, now: Instant, mut resp: Response) {
        let Some(Ok(via)) = resp.headers.typed::<sh::Via>() else {
            return;
        };
        let Some(branch) = via
            .branch()
            .map(|b| String::from_utf8_lossy(b).into_owned())
        else {
            return;
        };
        let Some(Ok(cseq)) = resp.headers.typed::<sh::CSeq>() else {
            return;
        };
        let key = (branch.clone(), cseq.method == Method::Cancel);
        let status = resp.status.code();
        if branch.starts_with(OWN_PREFIX) {
            // Ours (a MESSAGE, the ACK/BYE of a refused answer, our signed UPDATE): absorbed.
            if status >= 200
                && let Some(t) = self.txs.remove(&key)
                && t.method == Method::Update
            {
                let result = if (200..300).contains(&status) {
                    self.cfg
                        .identity
                        .as_ref()
                        .map(|i| i.domain.clone())
                        .ok_or_else(|| "accepted, but we have no [security] identity".to_owned())
                } else {
                    Err(format!(
                        "our signed UPDATE (draft §4.1) was refused with {status} {}{}",
                        String::from_utf8_lossy(&resp.reason),
                        hval(&resp.headers, &HeaderName::Warning)
                            .map(|w| format!(" ({w})"))
                            .unwrap_or_default()
                    ))
                };
                self.events.push_back(EdgeEvent::OwnUpdate {
                    call_id: t.call_id,
                    result,
                });
            }
            return;
        }
        let Some(t) = self.txs.get_mut(&key) else {
            // RFC 6026 §8.4 would forward a 2xx without a transaction statelessly; we
            // keep INVITE transactions long enough that this is a stray.
            return;
        };
        t.answered = true;
        if t.method == Method::Invite || status >= 200 {
            t.retransmit = None;
        }
        let first_final = status >= 200 && !t.finished;
        if status >= 200 {
            t.finished = true;
            if t.method != Method::Invite || status >= 300 {
                t.expires = t.expires.min(now + self.cfg.timers.t4);
            } else {
                // Keep matching the 2xx's retransmissions (RFC 6026 Timer L).
                t.expires = now + self.cfg.timers.t1 * 64;
            }
        }
        let (Some((up, listener)), from_client, method, call_id) = (
            t.upstream,
            t.from_client,
            t.method.clone(),
            t.call_id.clone(),
        ) else {
            return;
        };
        let initial_invite = method == Method::Invite
            && t.original
                .as_ref()
                .is_some_and(|r| to_tag(&r.headers).is_none());
        let original = t.original.clone();
        pop_via(&mut resp.headers);

        if self.cfg.protect
            && self.calls.contains_key(&call_id)
            && is_sdp(&resp.headers, resp.body())
        {
            let body = resp.body().clone();
            let stage = SdpStage::Answer;
            let result = if from_client {
                self.take_inbound(&call_id, &body, stage, None)
            } else {
                let form = self.calls.get(&call_id).and_then(|c| c.peer_form);
                outbound_sdp(&self.cfg, &body, Some(form)).map(Some)
            };
            match result {
                Ok(Some(b)) => {
                    set_header(
                        &mut resp.headers,
                        HeaderName::ContentLength,
                        b.len().to_string(),
                    );
                    resp.set_body(b);
                }
                Ok(None) => {}
                Err(r) if status < 200 => {
                    // Early media we cannot protect is not passed on: the 1xx goes
                    // without its SDP.
                    self.events.push_back(EdgeEvent::Refused {
                        peer: up.addr,
                        status: None,
                        reason: format!("SDP of a {status} removed: {}", r.why),
                    });
                    resp.headers.remove_all(&HeaderName::ContentType);
                    set_header(&mut resp.headers, HeaderName::ContentLength, "0".into());
                    resp.set_body(Bytes::new());
                }
                Err(r) => {
                    if first_final {
                        self.abandon(&resp, &r, (up, listener), original.as_ref(), &call_id);
                    }
                    return;
                }
            }
        }
        if method == Method::Invite
            && initial_invite
            && from_client
            && (101..200).contains(&status)
            && to_tag(&resp.headers).is_some()
        {
            let locator = self.peer_agent_locator(&resp);
            if let Some(c) = self.calls.get_mut(&call_id)
                && !c.answered
                && !c.ringing
                && !c.unprotected
            {
                c.ringing = true;
                self.events.push_back(EdgeEvent::PeerRinging {
                    call_id: call_id.clone(),
                    locator,
                });
            }
        }
        if method == Method::Invite && initial_invite && first_final {
            if (200..300).contains(&status) {
                let locator = self.peer_agent_locator(&resp);
                let call = self.calls.get_mut(&call_id);
                if let Some(c) = call
                    && !c.answered
                {
                    c.answered = true;
                    let protect = self.cfg.protect;
                    if protect && from_client {
                        self.events.push_back(EdgeEvent::PeerAnswered {
                            call_id: call_id.clone(),
                            locator,
                        });
                    } else if protect {
                        self.events.push_back(EdgeEvent::PhoneAnswered {
                            call_id: call_id.clone(),
                        });
                    }
                }
            } else if status >= 300 {
                self.end_call(
                    &call_id,
                    &format!("{status} {}", String::from_utf8_lossy(&resp.reason)),
                );
            }
        }
        self.transmits.push_back(EdgeTransmit {
            from: listener,
            dest: up,
            data: Message::Response(resp).to_bytes(),
        });
    }

    /// The route to the caller's hip edge from an INVITE's Record-Route: the nearest entry
    /// with our mark (the edge beside the caller's phone, or the nearest of a chain) as the
    /// target, and the entries before it as Route. `None` when no hip edge record-routed.
    fn edge_route(&self, h: &sx::Headers) -> Option<(String, Vec<String>)> {
        let rr = addresses(h, &HeaderName::RecordRoute, "Record-Route");
        let at = rr.iter().position(|a| {
            !self.is_ours(&a.uri) && a.uri.params().is_some_and(|p| p.contains(MARK))
        })?;
        let routes = rr[..at]
            .iter()
            .filter(|a| !self.is_ours(&a.uri))
            .map(|a| format!("<{}>", a.uri))
            .collect();
        Some((rr[at].uri.to_string(), routes))
    }

    /// The callee's half of the draft's §4.1 for a call our phone answered: once the ACK
    /// passed, an UPDATE whose Identity binds our HIT to our phone's identity, addressed
    /// to the caller's hip edge (which answers it and keeps it from the caller's phone, so
    /// that neither phone's CSeq space is touched). Reported as [`EdgeEvent::OwnUpdate`].
    fn send_signed_update(&mut self, now: Instant, call_id: &str, ack: &Request) {
        let Some(id) = self.cfg.identity.clone() else {
            return;
        };
        let Some(call) = self.calls.get_mut(call_id) else {
            return;
        };
        if call.phone_is_caller
            || !call.answered
            || call.unprotected
            || call.update_sent
            || !self.cfg.protect
        {
            return;
        }
        call.update_sent = true;
        let (local_uri, remote_uri, peer_edge) = (
            call.local_uri.clone(),
            call.remote_uri.clone(),
            call.peer_edge.clone(),
        );
        let result = (|| {
            let (key, info) = id
                .signer
                .as_ref()
                .ok_or("no [security] identity_key: our HIT reaches the caller unsigned")?;
            let (target, routes) = peer_edge.ok_or(
                "no hip edge beside the caller (none in the Record-Route): nobody could take our signed UPDATE without touching the caller phone's dialog",
            )?;
            let value = self.passport(&id, key, info, &local_uri, &remote_uri, "URI")?;
            let first = routes.first().map_or(target.as_str(), |r| {
                r.trim_start_matches('<').trim_end_matches('>')
            });
            let dest = sx::Uri::parse(Bytes::from(first.to_owned()))
                .ok()
                .and_then(|u| uri_dest(&u, Transport::Udp))
                .ok_or_else(|| format!("the caller's edge {first} is not an IP address"))?;
            let out = self
                .listener_for(&dest)
                .ok_or_else(|| format!("no {} listener for {}", dest.transport, dest.addr))?;
            // The dialog seen from our phone: the ACK's To is ours, its From the caller's.
            let from = hval(&ack.headers, &HeaderName::To).unwrap_or_default();
            let to = hval(&ack.headers, &HeaderName::From).unwrap_or_default();
            let mut text = self.own_request_head("UPDATE", &target, out, &routes);
            text.push_str(&format!(
                "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 UPDATE\r\n\
                 Contact: <sip:{}>\r\nIdentity: {value}\r\nContent-Length: 0\r\n\r\n",
                host_port(out.1)
            ));
            self.own_request(now, true, Method::Update, call_id, out, dest, text);
            Ok(())
        })();
        if let Err(why) = result {
            self.events.push_back(EdgeEvent::OwnUpdate {
                call_id: call_id.to_owned(),
                result: Err(why),
            });
        }
    }

    /// The far edge's signed UPDATE for our phone's call, verified against the HITs of
    /// the answer (RFC 8224 §6.2 with the callee as signer, the draft's §4.1), and answered.
    fn on_signed_update(
        &mut self,
        src: Dest,
        local: (Transport, SocketAddr),
        req: &Request,
        call_id: &str,
        cseq: u32,
    ) {
        let Some(call) = self
            .calls
            .get(call_id)
            .filter(|c| c.phone_is_caller && c.answered)
        else {
            return self.refuse(
                req,
                src,
                local,
                481,
                "Call/Transaction Does Not Exist",
                "an UPDATE for the edge, but no answered call of our phone has this Call-ID",
            );
        };
        if let Some((seq, status, reason)) = call.peer_update
            && seq == cseq
        {
            // A retransmission: the same answer, nothing reported again.
            return self.reply_to(req, src, local, status, reason, None);
        }
        let auth = auth_of(req, src.transport);
        let same = |a: &str, b: &str| matches!((identity::canonical(a), identity::canonical(b)), (Ok(x), Ok(y)) if x == y);
        let (result, tampering, status, reason) = if !same(&auth.from_uri, &call.remote_uri)
            || !same(&auth.to_uri, &call.local_uri)
        {
            (
                Err(format!(
                    "an UPDATE from {} to {} in a call between {} and {}: not this call's callee",
                    auth.from_uri, auth.to_uri, call.remote_uri, call.local_uri
                )),
                false,
                403,
                "Forbidden",
            )
        } else if let Some(id) = &self.cfg.identity {
            let j = judge(id, &auth, &call.peer_hits, "callee's UPDATE", "answer");
            let (status, reason) = if j.result.is_ok() {
                (200, "OK")
            } else {
                (j.status, j.reason)
            };
            (j.result, j.tampering, status, reason)
        } else {
            (
                Err(
                    "the callee's edge signed an UPDATE, but we trust no signer ([security])"
                        .to_owned(),
                ),
                false,
                438,
                "Invalid Identity Header",
            )
        };
        if let Some(c) = self.calls.get_mut(call_id) {
            c.peer_update = Some((cseq, status, reason));
        }
        let warning = result.as_ref().err().cloned();
        self.reply_to(req, src, local, status, reason, warning.as_deref());
        self.events.push_back(EdgeEvent::PeerUpdate {
            call_id: call_id.to_owned(),
            result: result.map_err(|e| e.to_string()),
            tampering,
        });
    }

    /// Where the far end's agent is: the host of the first Record-Route that is not ours
    /// (the agent beside the far phone record-routes), else of the Contact.
    fn peer_agent_locator(&self, resp: &Response) -> Option<IpAddr> {
        let rr = addresses(&resp.headers, &HeaderName::RecordRoute, "Record-Route");
        rr.iter()
            .map(|a| &a.uri)
            .find(|u| !self.is_ours(u))
            .and_then(|u| match u.host() {
                Some(sx::Host::Ip(ip)) => Some(*ip),
                _ => None,
            })
            .or_else(|| {
                let c = resp.headers.typed::<sh::Contact>()?.ok()?;
                match c.uri.host() {
                    Some(sx::Host::Ip(ip)) => Some(*ip),
                    _ => None,
                }
            })
    }

    /// A final response whose SDP we refuse: a 2xx is acknowledged and the dialog ended
    /// with BYE towards its sender; upstream gets our refusal as the final response.
    fn abandon(
        &mut self,
        resp: &Response,
        r: &Refusal,
        (up, listener): (Dest, (Transport, SocketAddr)),
        original: Option<&Request>,
        call_id: &str,
    ) {
        let status = resp.status.code();
        if (200..300).contains(&status) {
            let dest_uri = resp
                .headers
                .typed::<sh::Contact>()
                .and_then(Result::ok)
                .map(|c| c.uri.clone());
            let mut route: Vec<Address> =
                addresses(&resp.headers, &HeaderName::RecordRoute, "Record-Route");
            route.reverse();
            route.retain(|a| !self.is_ours(&a.uri));
            let cseq = resp
                .headers
                .typed::<sh::CSeq>()
                .and_then(Result::ok)
                .map_or(1, |c| c.sequence);
            if let Some(target) = dest_uri {
                let first = route
                    .first()
                    .map(|a| a.uri.clone())
                    .unwrap_or(target.clone());
                if let Some(dest) = uri_dest(&first, Transport::Udp)
                    && let Some(out) = self.listener_for(&dest)
                {
                    let routes: Vec<String> =
                        route.iter().map(|a| format!("<{}>", a.uri)).collect();
                    let from = hval(&resp.headers, &HeaderName::From).unwrap_or_default();
                    let to = hval(&resp.headers, &HeaderName::To).unwrap_or_default();
                    for (method, n) in [("ACK", cseq), ("BYE", cseq + 1)] {
                        let mut text =
                            self.own_request_head(method, &target.to_string(), out, &routes);
                        text.push_str(&format!(
                            "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {n} {method}\r\nReason: SIP;cause={};text=\"{}\"\r\nContent-Length: 0\r\n\r\n",
                            r.status,
                            r.reason.replace('"', "'")
                        ));
                        let m = if method == "BYE" {
                            Method::Bye
                        } else {
                            Method::Ack
                        };
                        self.own_request(
                            Instant::now(),
                            method == "BYE",
                            m,
                            call_id,
                            out,
                            dest,
                            text,
                        );
                    }
                }
            }
        }
        if let Some(req) = original {
            self.reply_to(req, up, listener, r.status, &r.reason, Some(&r.why));
        }
        self.events.push_back(EdgeEvent::Refused {
            peer: up.addr,
            status: Some(r.status),
            reason: r.why.clone(),
        });
        self.end_call(call_id, &r.why);
    }

    /// The request line, our Via (a fresh branch of ours), Max-Forwards and the Route of a
    /// request we originate in a dialog.
    fn own_request_head(
        &mut self,
        method: &str,
        target: &str,
        out: (Transport, SocketAddr),
        routes: &[String],
    ) -> String {
        let branch = format!("{OWN_PREFIX}{}", self.token());
        let mut text = format!(
            "{method} {target} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={branch}\r\nMax-Forwards: 70\r\n",
            out.0.via_token(),
            host_port(out.1)
        );
        if !routes.is_empty() {
            text.push_str(&format!("Route: {}\r\n", routes.join(", ")));
        }
        text
    }

    #[allow(clippy::too_many_arguments)]
    fn own_request(
        &mut self,
        now: Instant,
        keep: bool,
        method: Method,
        call_id: &str,
        out: (Transport, SocketAddr),
        dest: Dest,
        text: String,
    ) {
        let data = Bytes::from(text);
        self.transmits.push_back(EdgeTransmit {
            from: out,
            dest,
            data: data.clone(),
        });
        if !keep {
            return;
        }
        // The branch is the Via's: find it back from the bytes we built.
        let branch = String::from_utf8_lossy(&data)
            .split("branch=")
            .nth(1)
            .and_then(|r| r.split(['\r', ';']).next())
            .unwrap_or_default()
            .to_owned();
        let t1 = self.cfg.timers.t1;
        self.txs.insert(
            (branch, false),
            ClientTx {
                method,
                call_id: call_id.to_owned(),
                upstream: None,
                original: None,
                downstream: dest,
                out,
                sent: data,
                from_client: false,
                retransmit: (dest.transport == Transport::Udp).then_some((now + t1, t1)),
                answered: false,
                finished: false,
                expires: now + t1 * 64,
            },
        );
    }

    /// Sends our phone in call `call_id` a SIP MESSAGE (RFC 3428) with `text`: how the
    /// person learns the call's verification level and short authentication string.
    pub fn notify(&mut self, now: Instant, call_id: &str, text: &str) -> Result<(), String> {
        let call = self
            .calls
            .get(call_id)
            .ok_or_else(|| format!("no edge call {call_id}"))?;
        let contact = call
            .phone_contact
            .clone()
            .ok_or("the phone's Contact is unknown")?;
        let aor = call.local_uri.clone();
        let uri = sx::Uri::parse(Bytes::from(contact.clone()))
            .map_err(|e| format!("the phone's Contact {contact:?}: {e}"))?;
        let dest = call
            .phone_addr
            .or_else(|| uri_dest(&uri, Transport::Udp))
            .ok_or_else(|| format!("the phone's Contact {contact:?} is not an IP address"))?;
        if !self.is_client(dest.addr.ip()) {
            return Err(format!(
                "the phone's Contact {contact:?} is not an [edge] client"
            ));
        }
        let out = self
            .listener_for(&dest)
            .ok_or_else(|| format!("no listener for {}", dest.addr))?;
        let text = text.replace(['\r', '\n'], " ");
        let branch = format!("{OWN_PREFIX}{}", self.token());
        let tag = self.token();
        let cid = format!("{}@hip-edge", self.token());
        let msg = format!(
            "MESSAGE {contact} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={branch}\r\nMax-Forwards: 70\r\n\
             From: \"hip\" <sip:hip@{}>;tag={tag}\r\nTo: <{aor}>\r\nCall-ID: {cid}\r\nCSeq: 1 MESSAGE\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            out.0.via_token(),
            host_port(out.1),
            host_port(out.1),
            text.len()
        );
        self.own_request(now, true, Method::Message, "", out, dest, msg);
        Ok(())
    }

    /// Our HIT as the phone's media now uses it.
    pub fn own_hit(&self) -> Ipv6Addr {
        self.cfg.own.hit.to_ipv6()
    }
}

#[cfg(test)]
mod tests;
