//! The user agent core: transactions routed to dialogs, calls, registration.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use sipx_sip::{
    self as sx, HeaderName, Message, Method, Request, RequestBuilder, Response, StatusCode,
    TransactionKey, TransactionLayer,
    headers::{self as sh, CSeq},
    parser::{Limits, StreamParser},
    transaction::{Output, TuEvent},
};

use super::{
    AdmissionStats, CallHandle, CallInfo, CallState, ConnId, Dest, Direction, EndReason, Event,
    RequestAuth, SipError, Transmit, Transport, UaConfig, admission, digest, malformed,
};

/// Server nonces whose nonce-count we remember (RFC 7616 §3.4: one per nonce in use;
/// older nonces are forgotten, a server that reuses one just sees nc restart).
const NONCES_KEPT: usize = 16;

const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TimerKey {
    /// A §17 transaction timer.
    Tx(TransactionKey, sx::Timer),
    /// UAS 2xx retransmission (RFC 3261 §13.3.1.4): T1 doubling to T2 until the ACK.
    Retransmit2xx(CallHandle),
    /// UAS gives up waiting for the ACK after 64·T1 (§13.3.1.4) and sends BYE.
    AckTimeout(CallHandle),
    /// Registration refresh (RFC 3261 §10.2.4).
    RegisterRefresh,
    /// Keep-alive of the registration flow through NATs (RFC 5626 §4.4.1).
    KeepAlive,
    /// UAC gives up on a cancelled INVITE 64·T1 after the CANCEL if no final response came
    /// (RFC 3261 §9.1): a client transaction in Proceeding has no timer of its own.
    CancelGiveUp(CallHandle),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Invite,
    Bye,
    Cancel,
    Update,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Call(CallHandle, Purpose),
    Register,
    Options(u64),
}

#[derive(Debug)]
struct Call {
    handle: CallHandle,
    direction: Direction,
    state: CallState,
    call_id: String,
    local_tag: String,
    remote_tag: Option<String>,
    local_uri: String,
    remote_uri: String,
    /// Full From value for requests we send in this dialog (with our tag).
    from_value: String,
    /// Full To value for requests we send in this dialog (with their tag once known).
    to_value: String,
    /// The INVITE's Request-URI (UAC).
    request_uri: String,
    local_cseq: u32,
    remote_target: Option<String>,
    /// Route header values in the order to send them (RFC 3261 §12.1.1/§12.1.2).
    route_set: Vec<String>,
    transport: Transport,
    /// Where the initial INVITE (and its CANCEL) went.
    first_hop: Option<Dest>,
    /// UAC: the INVITE in flight; UAS: the INVITE received.
    invite: Option<Request>,
    invite_key: Option<TransactionKey>,
    /// UAS: where responses to the INVITE go.
    uas_dest: Option<Dest>,
    local_sdp: Option<Bytes>,
    remote_sdp: Option<Bytes>,
    auth_tries: u32,
    auth_header: Option<(HeaderName, String)>,
    provisional_seen: bool,
    cancel_pending: bool,
    cancel_sent: bool,
    /// UAS hung up before the ACK for its 2xx: BYE when it arrives (RFC 3261 §15).
    bye_on_ack: bool,
    /// UAS: the 2xx being retransmitted, and the current interval.
    final_2xx: Option<(Response, Duration)>,
    /// UAC: the ACK for the 2xx, re-sent on every retransmitted 2xx (RFC 3261 §13.2.2.4).
    ack: Option<(Bytes, Dest)>,
    /// UAC: the `Identity` header value (RFC 8224) our INVITE carries, kept for its
    /// re-sends after an authentication challenge.
    identity: Option<String>,
    /// The peer's `Allow` list (from its INVITE, or the 2xx to ours), when it sent one.
    remote_allow: Option<String>,
    /// Whether the Request-URI is a SIPS URI.
    sips: bool,
}

impl Call {
    fn info(&self) -> CallInfo {
        CallInfo {
            handle: self.handle,
            direction: self.direction,
            state: self.state,
            call_id: self.call_id.clone(),
            local_uri: self.local_uri.clone(),
            remote_uri: self.remote_uri.clone(),
            remote_target: self.remote_target.clone(),
            transport: self.transport,
            sips: self.sips,
        }
    }
}

#[derive(Debug)]
struct Registration {
    call_id: String,
    from_tag: String,
    cseq: u32,
    expires: u32,
    auth_tries: u32,
    auth_header: Option<(HeaderName, String)>,
    dest: Dest,
    /// The registrar's `Flow-Timer` (RFC 5626 §4.4.1), seconds.
    flow_timer: Option<u32>,
    keepalives_sent: u64,
    last_keepalive: Option<Instant>,
}

/// The SIP user agent core. See the [module docs](super) for the call order.
#[derive(Debug)]
pub struct UserAgent {
    cfg: UaConfig,
    layer: TransactionLayer,
    timers: super::timers::TimerQueue<TimerKey>,
    rng: StdRng,
    /// Destination of each transaction's sends (client: next hop; server: the request's source).
    tx_dest: HashMap<TransactionKey, Dest>,
    tx_owner: HashMap<TransactionKey, Owner>,
    calls: HashMap<CallHandle, Call>,
    /// (Call-ID, local tag) → call.
    dialogs: HashMap<(String, String), CallHandle>,
    next_handle: u64,
    registration: Option<Registration>,
    /// nonce → nonce-count, oldest first, at most [`NONCES_KEPT`].
    nonce_counts: VecDeque<(String, u32)>,
    /// Each stream connection's parser, and since when it holds an incomplete message.
    stream_parsers: HashMap<ConnId, (StreamParser, Option<Instant>)>,
    /// New-INVITE rate per source.
    invite_buckets: admission::Buckets,
    admission: AdmissionStats,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

fn hval(h: &sx::Headers, n: &HeaderName) -> Option<String> {
    h.value(n).map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn to_tag(h: &sx::Headers) -> Option<String> {
    let to = h.typed::<sh::To>()?.ok()?;
    to.tag().map(|t| String::from_utf8_lossy(t).into_owned())
}

/// The URI of a message's Contact (a dialog's remote target).
fn contact_uri(h: &sx::Headers) -> Option<String> {
    h.typed::<sh::Contact>()?.ok().map(|c| c.uri.to_string())
}

fn from_tag(h: &sx::Headers) -> Option<String> {
    let f = h.typed::<sh::From>()?.ok()?;
    f.tag().map(|t| String::from_utf8_lossy(t).into_owned())
}

fn build_err(e: impl std::fmt::Display) -> SipError {
    SipError::Build(e.to_string())
}

/// The Identity headers, From/To URIs and arrival of a request we received.
fn request_auth(req: &Request, transport: Option<Transport>) -> RequestAuth {
    RequestAuth {
        identity: req
            .headers
            .get_all(&HeaderName::Identity)
            .map(|h| String::from_utf8_lossy(&h.value()).into_owned())
            .collect(),
        from_uri: req
            .headers
            .typed::<sh::From>()
            .and_then(Result::ok)
            .map(|a| a.uri.to_string())
            .unwrap_or_default(),
        to_uri: req
            .headers
            .typed::<sh::To>()
            .and_then(Result::ok)
            .map(|a| a.uri.to_string())
            .unwrap_or_default(),
        transport,
        sips: req.uri.scheme().is_secure(),
    }
}

/// Resolves a URI to a next hop: IP literal host only (no RFC 3263 DNS in the core).
pub(super) fn uri_dest(uri: &sx::Uri, default_transport: Transport) -> Option<Dest> {
    let ip = match uri.host()? {
        sx::Host::Ip(ip) => *ip,
        sx::Host::Name(_) => return None,
    };
    let transport = if uri.scheme().is_secure() {
        Transport::Tls
    } else {
        uri.transport()
            .and_then(Transport::from_token)
            .unwrap_or(default_transport)
    };
    Some(Dest {
        transport,
        addr: SocketAddr::new(ip, uri.port().unwrap_or(transport.default_port())),
        conn: None,
    })
}

/// The URI inside a name-addr header value (`"x" <sip:a@b;lr>;p=1` → `sip:a@b;lr`).
fn addr_uri(value: &str) -> Option<sx::Uri> {
    sh::Address::parse(value.as_bytes(), "Route")
        .ok()
        .map(|a| a.uri)
}

impl UserAgent {
    /// A user agent with `cfg`. Nothing is sent until a command or input arrives.
    pub fn new(cfg: UaConfig) -> Self {
        let timers = sx::Timers {
            t1: cfg.timers.t1,
            t2: cfg.timers.t2,
            t4: cfg.timers.t4,
        };
        Self {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            layer: TransactionLayer::new(timers),
            timers: super::timers::TimerQueue::new(),
            tx_dest: HashMap::new(),
            tx_owner: HashMap::new(),
            calls: HashMap::new(),
            dialogs: HashMap::new(),
            next_handle: 1,
            registration: None,
            nonce_counts: VecDeque::new(),
            stream_parsers: HashMap::new(),
            invite_buckets: admission::Buckets::default(),
            admission: AdmissionStats::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Our configuration.
    pub fn config(&self) -> &UaConfig {
        &self.cfg
    }

    // ---------------------------------------------------------------- outputs

    /// The next message to put on the wire.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Calls in progress.
    pub fn calls(&self) -> Vec<CallInfo> {
        let mut v: Vec<CallInfo> = self.calls.values().map(Call::info).collect();
        v.sort_by_key(|c| c.handle);
        v
    }

    /// One call.
    pub fn call_info(&self, call: CallHandle) -> Option<CallInfo> {
        self.calls.get(&call).map(Call::info)
    }

    /// The SDP we sent and the SDP we received for a call.
    pub fn call_sdp(&self, call: CallHandle) -> Option<(Option<Bytes>, Option<Bytes>)> {
        self.calls
            .get(&call)
            .map(|c| (c.local_sdp.clone(), c.remote_sdp.clone()))
    }

    /// Whether the peer of `call` listed `method` in its `Allow` header; `None` when it sent
    /// no `Allow` (RFC 3261 §20.5: then nothing is known) or the call is unknown.
    pub fn peer_allows(&self, call: CallHandle, method: &str) -> Option<bool> {
        let allow = self.calls.get(&call)?.remote_allow.as_ref()?;
        Some(
            allow
                .split(',')
                .any(|m| m.trim().eq_ignore_ascii_case(method)),
        )
    }

    /// Transactions in flight as (client, server): a leak shows up here first.
    pub fn transaction_count(&self) -> (usize, usize) {
        self.layer.len()
    }

    /// Server nonces whose nonce-count is remembered (bounded: a leak check like
    /// [`UserAgent::transaction_count`]).
    pub fn nonces_remembered(&self) -> usize {
        self.nonce_counts.len()
    }

    /// Timers armed.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    // ---------------------------------------------------------------- inputs

    /// Time passed: fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                TimerKey::Tx(tx, timer) => {
                    let out = self.layer.on_timer(&tx, timer);
                    self.process(now, &tx, out);
                }
                TimerKey::Retransmit2xx(h) => self.retransmit_2xx(now, h),
                TimerKey::AckTimeout(h) => self.ack_timeout(now, h),
                TimerKey::CancelGiveUp(h) => self.cancel_give_up(now, h),
                TimerKey::RegisterRefresh => {
                    let _ = self.register(now);
                }
                TimerKey::KeepAlive => self.send_keepalive(now),
            }
        }
    }

    /// One UDP datagram from `peer`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        transport: Transport,
        peer: SocketAddr,
        data: &[u8],
    ) {
        // RFC 5626 §3.5.1 keep-alives (CRLF / double CRLF) carry no message.
        if data.iter().all(|b| matches!(b, b'\r' | b'\n')) {
            return;
        }
        let src = Dest {
            transport,
            addr: peer,
            conn: None,
        };
        match sx::parse_datagram(Bytes::copy_from_slice(data), &Limits::datagram()) {
            Ok(msg) => self.handle_message(now, src, msg),
            Err(e) => self.unparseable(src, data, &e.to_string()),
        }
    }

    /// Bytes from a stream connection. Returns `false` when the framing is lost and the
    /// driver must close the connection (RFC 3261 §18.3).
    pub fn handle_stream(
        &mut self,
        now: Instant,
        transport: Transport,
        conn: ConnId,
        peer: SocketAddr,
        data: &[u8],
    ) -> bool {
        let src = Dest {
            transport,
            addr: peer,
            conn: Some(conn),
        };
        let max = self.cfg.limits.max_message_bytes;
        let (parser, partial_since) = self.stream_parsers.entry(conn).or_insert_with(|| {
            (
                StreamParser::new(Limits {
                    max_message_bytes: max,
                    max_body_bytes: max,
                    ..Limits::stream()
                }),
                None,
            )
        });
        // RFC 5626 §3.5.1: a double-CRLF ping between messages gets a CRLF pong.
        if data == super::nat::PING && parser.pending() == 0 {
            self.transmits.push_back(Transmit {
                dest: src,
                data: Bytes::from_static(super::nat::PONG),
            });
        }
        match parser.push(data) {
            Ok(msgs) => {
                // The clock for a message starts with its first byte and stops when the
                // buffer is empty again (see `expired_streams`).
                if parser.pending() == 0 {
                    *partial_since = None;
                } else if !msgs.is_empty() || partial_since.is_none() {
                    *partial_since = Some(now);
                }
                for m in msgs {
                    self.handle_message(now, src, m);
                }
                true
            }
            Err(e) => {
                self.stream_parsers.remove(&conn);
                self.unparseable(src, data, &e.to_string());
                false
            }
        }
    }

    /// The driver closed a stream connection.
    pub fn connection_closed(&mut self, conn: ConnId) {
        self.stream_parsers.remove(&conn);
    }

    /// Stream connections holding a message begun more than
    /// [`super::Limits::stream_message_timeout`] ago and still incomplete: the driver
    /// closes them (a request dripped byte by byte, or half-sent and abandoned, must not
    /// hold a connection for ever). Their parsers are dropped here.
    pub fn expired_streams(&mut self, now: Instant) -> Vec<ConnId> {
        let max = self.cfg.limits.stream_message_timeout;
        let v: Vec<ConnId> = self
            .stream_parsers
            .iter()
            .filter(|(_, (_, since))| {
                since.is_some_and(|t| now.saturating_duration_since(t) >= max)
            })
            .map(|(c, _)| *c)
            .collect();
        for c in &v {
            self.stream_parsers.remove(c);
        }
        self.admission.stream_timeouts += v.len() as u64;
        v
    }

    /// What admission control refused so far.
    pub fn admission_stats(&self) -> AdmissionStats {
        self.admission
    }

    /// Admission of a new INVITE (see [`super::Limits`]): `Err` with the reason when it
    /// must be refused.
    fn admit(&mut self, now: Instant, src: std::net::IpAddr) -> Result<(), &'static str> {
        let l = self.cfg.limits;
        let pending = self
            .calls
            .values()
            .filter(|c| c.direction == Direction::Incoming && c.state != CallState::Confirmed)
            .count();
        if pending >= l.max_pending_incoming || self.calls.len() >= l.max_calls {
            self.admission.refused_busy += 1;
            return Err("too many calls in progress");
        }
        if !self
            .invite_buckets
            .allow(now, src, l.invites_per_source, l.invite_burst_per_source)
        {
            self.admission.refused_rate += 1;
            return Err("too many new calls from this address");
        }
        Ok(())
    }

    fn unparseable(&mut self, src: Dest, data: &[u8], why: &str) {
        let tag = self.token(10);
        match malformed::error_response(data, 400, "Bad Request", &tag, why) {
            Some(resp) => {
                self.transmits.push_back(Transmit {
                    dest: src,
                    data: Bytes::from(resp),
                });
                self.events.push_back(Event::BadInput {
                    peer: src.addr,
                    answered: Some(400),
                    reason: why.to_owned(),
                });
            }
            None => self.events.push_back(Event::BadInput {
                peer: src.addr,
                answered: None,
                reason: why.to_owned(),
            }),
        }
    }

    fn bad_request(&mut self, src: Dest, msg: &Message, status: u16, reason: &str, why: &str) {
        if let Message::Request(r) = msg
            && r.method != Method::Ack
        {
            let tag = self.token(10);
            if let Some(resp) =
                malformed::error_response(&msg.to_bytes(), status, reason, &tag, why)
            {
                self.transmits.push_back(Transmit {
                    dest: src,
                    data: Bytes::from(resp),
                });
                self.events.push_back(Event::BadInput {
                    peer: src.addr,
                    answered: Some(status),
                    reason: why.to_owned(),
                });
                return;
            }
        }
        self.events.push_back(Event::BadInput {
            peer: src.addr,
            answered: None,
            reason: why.to_owned(),
        });
    }

    /// Checks what RFC 3261 §8.1.1 / §8.2 require before a message reaches a transaction.
    fn validate(msg: &Message) -> Result<(), (u16, &'static str, String)> {
        let h = msg.headers();
        let bad = |w: String| Err((400, "Bad Request", w));
        match h.typed::<sh::Via>() {
            None => return bad("missing Via".into()),
            Some(Err(e)) => return bad(format!("bad Via: {e}")),
            Some(Ok(_)) => {}
        }
        match h.typed::<sh::From>() {
            None => return bad("missing From".into()),
            Some(Err(e)) => return bad(format!("bad From: {e}")),
            Some(Ok(_)) => {}
        }
        match h.typed::<sh::To>() {
            None => return bad("missing To".into()),
            Some(Err(e)) => return bad(format!("bad To: {e}")),
            Some(Ok(_)) => {}
        }
        match h.typed::<sh::CallId>() {
            None => return bad("missing Call-ID".into()),
            Some(Err(e)) => return bad(format!("bad Call-ID: {e}")),
            Some(Ok(_)) => {}
        }
        let cseq = match h.typed::<CSeq>() {
            None => return bad("missing CSeq".into()),
            Some(Err(e)) => return bad(format!("bad CSeq: {e}")),
            Some(Ok(c)) => c,
        };
        if let Message::Request(r) = msg {
            // Every response echoes these (RFC 3261 §8.2.6.2, §12.1.1 for Record-Route),
            // and sipx-sip's builder refuses NUL, CR and LF in a value (its header-injection
            // guard): a request carrying one could never be answered, and its server
            // transaction would wait for a response for ever.
            for name in [
                HeaderName::Via,
                HeaderName::From,
                HeaderName::To,
                HeaderName::CallId,
                HeaderName::CSeq,
                HeaderName::RecordRoute,
            ] {
                if h.get_all(&name)
                    .any(|v| v.value().iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n')))
                {
                    return bad(format!("NUL, CR or LF in {name}"));
                }
            }
            if !r.version.is_supported() {
                return Err((505, "Version Not Supported", "SIP version".into()));
            }
            // RFC 4475 §3.1.2.17: the CSeq method must match the request line.
            if cseq.method != r.method {
                return bad("CSeq method does not match the request method".into());
            }
            if !r.uri.scheme().is_sip() {
                return Err((416, "Unsupported URI Scheme", "Request-URI scheme".into()));
            }
            if let Some(Err(e)) = h.typed::<sh::ContentLength>() {
                return bad(format!("bad Content-Length: {e}"));
            }
        }
        Ok(())
    }

    fn handle_message(&mut self, now: Instant, src: Dest, mut msg: Message) {
        if let Err((status, reason, why)) = Self::validate(&msg) {
            self.bad_request(src, &msg, status, reason, &why);
            return;
        }
        // RFC 3581 §4: where the request really came from goes in its top Via, and so into
        // every response (which goes to that source, not to the Via's sent-by).
        if let Message::Request(r) = &mut msg {
            super::nat::stamp_via(&mut r.headers, src.addr);
        }
        // A new INVITE (no To tag, a Call-ID we do not know: not a retransmission) is
        // admitted first; refused, it gets one stateless 503 and leaves nothing behind.
        if let Message::Request(r) = &msg
            && r.method == Method::Invite
            && to_tag(&r.headers).is_none()
        {
            let call_id = hval(&r.headers, &HeaderName::CallId).unwrap_or_default();
            if !self.calls.values().any(|c| c.call_id == call_id)
                && let Err(why) = self.admit(now, src.addr.ip())
            {
                let tag = self.token(10);
                let extra = [
                    (HeaderName::RetryAfter, "5".to_owned()),
                    (HeaderName::Warning, format!("399 hip-agent \"{why}\"")),
                ];
                if let Ok(resp) =
                    self.response(r, 503, "Service Unavailable", Some(&tag), &extra, None)
                {
                    self.transmits.push_back(Transmit {
                        dest: src,
                        data: Message::Response(resp).to_bytes(),
                    });
                }
                self.events.push_back(Event::BadInput {
                    peer: src.addr,
                    answered: Some(503),
                    reason: why.to_owned(),
                });
                return;
            }
        }
        // A request whose top Via carries one of our own client transactions' branch and
        // sent-by (our request looped back, or a forger copying our Via) would get a server
        // transaction under the same key as that client transaction. Their timers are keyed
        // alike, so ending one would cancel the other's, and a server transaction without
        // its timer is never freed. RFC 3261 §8.2.2.2: refuse it as a loop, statelessly.
        if let Message::Request(r) = &msg
            && r.method != Method::Ack
            && let Some(k) = TransactionKey::from_request(r)
            && self.layer.client_request(&k).is_some()
        {
            self.bad_request(
                src,
                &msg,
                482,
                "Loop Detected",
                "a request carrying the branch of our own transaction",
            );
            return;
        }
        let reliability = if src.transport.is_reliable() {
            sx::Reliability::Reliable
        } else {
            sx::Reliability::Unreliable
        };
        match self.layer.receive(msg, reliability) {
            sx::transaction::Dispatch::Created { key, outputs } => {
                self.tx_dest.insert(key.clone(), src);
                self.process(now, &key, outputs);
            }
            sx::transaction::Dispatch::Matched { key, outputs } => self.process(now, &key, outputs),
            sx::transaction::Dispatch::Unmatched(m) => match *m {
                Message::Request(r) if r.method == Method::Ack => self.on_ack(now, &r),
                Message::Request(r) => {
                    let m = Message::Request(r);
                    self.bad_request(src, &m, 400, "Bad Request", "no usable Via branch");
                }
                Message::Response(r) => self.stray_response(&r),
            },
        }
    }

    fn process(&mut self, now: Instant, key: &TransactionKey, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Send(m) => {
                    if let Some(dest) = self.tx_dest.get(key).copied() {
                        self.transmits.push_back(Transmit {
                            dest,
                            data: m.to_bytes(),
                        });
                    }
                }
                Output::SetTimer { timer, after } => {
                    self.timers
                        .set(TimerKey::Tx(key.clone(), timer), now + after);
                }
                Output::ClearTimer(timer) => self.timers.clear(&TimerKey::Tx(key.clone(), timer)),
                Output::ToTu(ev) => match *ev {
                    TuEvent::Request(r) => self.on_request(now, key, *r),
                    TuEvent::Response(r) => self.on_response(now, key, *r),
                    TuEvent::Ack(a) => self.on_ack(now, &a),
                    TuEvent::Timeout | TuEvent::TransportError => self.on_tx_failure(now, key),
                    _ => {}
                },
                Output::Terminated(_) => {
                    for t in sx::Timer::ALL {
                        self.timers.clear(&TimerKey::Tx(key.clone(), t));
                    }
                    self.tx_dest.remove(key);
                    self.tx_owner.remove(key);
                }
                _ => {}
            }
        }
    }

    // ---------------------------------------------------------------- helpers

    fn token(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b"0123456789abcdef"[self.rng.random_range(0..16)]))
            .collect()
    }

    fn port_for(&self, t: Transport) -> Result<u16, SipError> {
        self.cfg
            .ports
            .iter()
            .find(|(tt, _)| *tt == t)
            .map(|(_, p)| *p)
            .ok_or(SipError::NoTransport(t))
    }

    fn host_port(&self, t: Transport) -> Result<String, SipError> {
        let port = self.port_for(t)?;
        let host = if self.cfg.contact_host.contains(':') && !self.cfg.contact_host.starts_with('[')
        {
            format!("[{}]", self.cfg.contact_host)
        } else {
            self.cfg.contact_host.clone()
        };
        Ok(format!("{host}:{port}"))
    }

    fn via(&mut self, t: Transport) -> Result<String, SipError> {
        let branch = self.token(16);
        // RFC 3581 rport: responses come back to the port we sent from, through NATs too.
        Ok(format!(
            "SIP/2.0/{} {};branch=z9hG4bK{branch};rport",
            t.via_token(),
            self.host_port(t)?
        ))
    }

    fn contact(&self, t: Transport) -> Result<String, SipError> {
        let scheme = if t == Transport::Tls { "sips" } else { "sip" };
        let param = match t {
            Transport::Udp => "",
            Transport::Tcp => ";transport=tcp",
            Transport::Tls => ";transport=tls",
        };
        Ok(format!(
            "<{scheme}:{}@{}{param}>",
            self.cfg.user,
            self.host_port(t)?
        ))
    }

    /// Our address of record, `sip:user@domain` (the From of the requests we start).
    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.cfg.user, self.cfg.domain)
    }

    fn local_name_addr(&self) -> String {
        match &self.cfg.display_name {
            Some(d) => format!("\"{}\" <{}>", d.replace(['"', '\\'], ""), self.aor()),
            None => format!("<{}>", self.aor()),
        }
    }

    fn send_request(
        &mut self,
        now: Instant,
        req: Request,
        dest: Dest,
        owner: Owner,
    ) -> Option<TransactionKey> {
        let rel = if dest.transport.is_reliable() {
            sx::Reliability::Reliable
        } else {
            sx::Reliability::Unreliable
        };
        let (key, out) = self.layer.send_request(req, rel)?;
        self.tx_dest.insert(key.clone(), dest);
        self.tx_owner.insert(key.clone(), owner);
        self.process(now, &key, out);
        Some(key)
    }

    /// Builds a response to `req` (RFC 3261 §8.2.6): Via/From/Call-ID/CSeq copied, To with
    /// `to_tag` added when it has none (not for 100, §8.2.6.2).
    fn response(
        &self,
        req: &Request,
        status: u16,
        reason: &str,
        to_tag: Option<&str>,
        extra: &[(HeaderName, String)],
        body: Option<&Bytes>,
    ) -> Result<Response, SipError> {
        let code = StatusCode::new(status).ok_or(SipError::BadStatus(status))?;
        let mut b = sx::ResponseBuilder::new(code, reason.to_owned()).map_err(build_err)?;
        for h in req.headers.get_all(&HeaderName::Via) {
            b = b
                .header(HeaderName::Via, Bytes::copy_from_slice(&h.value()))
                .map_err(build_err)?;
        }
        let to = hval(&req.headers, &HeaderName::To).unwrap_or_default();
        let to = match to_tag {
            Some(t) if status > 100 && to_tag_of(&req.headers).is_none() => {
                format!("{to};tag={t}")
            }
            _ => to,
        };
        for (n, v) in [
            (
                HeaderName::From,
                hval(&req.headers, &HeaderName::From).unwrap_or_default(),
            ),
            (HeaderName::To, to),
            (
                HeaderName::CallId,
                hval(&req.headers, &HeaderName::CallId).unwrap_or_default(),
            ),
            (
                HeaderName::CSeq,
                hval(&req.headers, &HeaderName::CSeq).unwrap_or_default(),
            ),
        ] {
            b = b.header(n, v).map_err(build_err)?;
        }
        for (n, v) in extra {
            b = b.header(n.clone(), v.clone()).map_err(build_err)?;
        }
        b = b
            .header(HeaderName::Server, self.cfg.user_agent.clone())
            .map_err(build_err)?;
        if let Some(body) = body {
            b = b
                .header(HeaderName::ContentType, "application/sdp")
                .map_err(build_err)?
                .body(body.clone());
        }
        Ok(b.build())
    }

    fn respond(&mut self, now: Instant, key: &TransactionKey, resp: Response) {
        let out = self.layer.send_response(key, resp);
        self.process(now, key, out);
    }

    fn simple_reply(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        req: &Request,
        status: u16,
        reason: &str,
        extra: &[(HeaderName, String)],
    ) {
        let tag = self.token(10);
        if let Ok(r) = self.response(req, status, reason, Some(&tag), extra, None) {
            self.respond(now, key, r);
        }
    }

    fn dialog_of(&self, h: &sx::Headers) -> Option<CallHandle> {
        let call_id = hval(h, &HeaderName::CallId)?;
        let local = to_tag(h)?;
        self.dialogs.get(&(call_id, local)).copied()
    }

    fn end_call(&mut self, h: CallHandle, reason: EndReason) {
        if let Some(c) = self.calls.remove(&h) {
            self.dialogs
                .remove(&(c.call_id.clone(), c.local_tag.clone()));
            self.timers.clear(&TimerKey::Retransmit2xx(h));
            self.timers.clear(&TimerKey::AckTimeout(h));
            self.timers.clear(&TimerKey::CancelGiveUp(h));
            let mut info = c.info();
            info.state = c.state;
            self.events.push_back(Event::Ended { call: info, reason });
        }
    }

    // ---------------------------------------------------------------- UAS side

    fn on_request(&mut self, now: Instant, key: &TransactionKey, req: Request) {
        match req.method {
            Method::Invite => self.on_invite(now, key, req),
            Method::Bye => match self.dialog_of(&req.headers) {
                Some(h) => {
                    self.simple_reply(now, key, &req, 200, "OK", &[]);
                    // RFC 3261 §15.1.2: a BYE in an early dialog leaves the INVITE pending;
                    // it gets a 487, or its server transaction would wait for good.
                    self.terminate_pending_invite(now, h);
                    self.end_call(h, EndReason::RemoteBye);
                }
                None => {
                    self.simple_reply(now, key, &req, 481, "Call/Transaction Does Not Exist", &[])
                }
            },
            Method::Cancel => self.on_cancel(now, key, &req),
            Method::Update => self.on_update(now, key, &req),
            Method::Options => {
                let extra = [
                    (HeaderName::Allow, ALLOW.to_owned()),
                    (HeaderName::Accept, "application/sdp".to_owned()),
                ];
                self.simple_reply(now, key, &req, 200, "OK", &extra);
            }
            Method::Other(_) => self.simple_reply(
                now,
                key,
                &req,
                501,
                "Not Implemented",
                &[(HeaderName::Allow, ALLOW.to_owned())],
            ),
            _ => self.simple_reply(
                now,
                key,
                &req,
                405,
                "Method Not Allowed",
                &[(HeaderName::Allow, ALLOW.to_owned())],
            ),
        }
    }

    fn on_invite(&mut self, now: Instant, key: &TransactionKey, req: Request) {
        let body = (!req.body().is_empty()).then(|| req.body().clone());
        if body.is_some() {
            let is_sdp = req
                .headers
                .typed::<sh::ContentType>()
                .and_then(Result::ok)
                .is_some_and(|ct| ct.is("application", "sdp"));
            if !is_sdp {
                self.simple_reply(
                    now,
                    key,
                    &req,
                    415,
                    "Unsupported Media Type",
                    &[(HeaderName::Accept, "application/sdp".into())],
                );
                return;
            }
        }
        // Re-INVITE inside a dialog (RFC 3261 §14.2): accept, answer with our current SDP.
        if to_tag(&req.headers).is_some() {
            let Some(h) = self.dialog_of(&req.headers) else {
                self.simple_reply(now, key, &req, 481, "Call/Transaction Does Not Exist", &[]);
                return;
            };
            self.in_dialog_offer(now, key, &req, h, body);
            return;
        }
        let call_id = hval(&req.headers, &HeaderName::CallId).unwrap_or_default();
        let remote_tag = from_tag(&req.headers);
        // RFC 3261 §8.2.2.2: the same request arriving again by another path is a merge.
        if self.calls.values().any(|c| {
            c.direction == Direction::Incoming
                && c.call_id == call_id
                && c.remote_tag == remote_tag
                && c.invite_key.as_ref() != Some(key)
        }) {
            self.simple_reply(now, key, &req, 482, "Loop Detected", &[]);
            return;
        }
        let handle = CallHandle(self.next_handle);
        self.next_handle += 1;
        let local_tag = self.token(10);
        let src = self.tx_dest.get(key).copied();
        let auth = request_auth(&req, src.map(|d| d.transport));
        let transport = src.map_or(Transport::Udp, |d| d.transport);
        let remote_target = contact_uri(&req.headers);
        let route_set: Vec<String> = req
            .headers
            .get_all(&HeaderName::RecordRoute)
            .flat_map(|h| sh::RecordRoute::parse_list(&h.value()).unwrap_or_default())
            .map(|a| format!("<{}>", a.uri))
            .collect();
        let from_hdr = hval(&req.headers, &HeaderName::From).unwrap_or_default();
        let to_hdr = hval(&req.headers, &HeaderName::To).unwrap_or_default();
        let uri_of = |h: &sx::Headers, to: bool| -> String {
            if to {
                h.typed::<sh::To>()
                    .and_then(Result::ok)
                    .map(|a| a.uri.to_string())
            } else {
                h.typed::<sh::From>()
                    .and_then(Result::ok)
                    .map(|a| a.uri.to_string())
            }
            .unwrap_or_default()
        };
        let call = Call {
            handle,
            direction: Direction::Incoming,
            state: CallState::Initiating,
            call_id: call_id.clone(),
            local_tag: local_tag.clone(),
            remote_tag,
            local_uri: uri_of(&req.headers, true),
            remote_uri: uri_of(&req.headers, false),
            from_value: format!("{to_hdr};tag={local_tag}"),
            to_value: from_hdr,
            request_uri: req.uri.to_string(),
            local_cseq: self.rng.random_range(1..10_000),
            remote_target,
            route_set,
            transport,
            first_hop: None,
            remote_allow: hval(&req.headers, &HeaderName::Allow),
            sips: req.uri.scheme().is_secure(),
            identity: None,
            invite: Some(req),
            invite_key: Some(key.clone()),
            uas_dest: src,
            local_sdp: None,
            remote_sdp: body.clone(),
            auth_tries: 0,
            auth_header: None,
            provisional_seen: false,
            cancel_pending: false,
            cancel_sent: false,
            bye_on_ack: false,
            final_2xx: None,
            ack: None,
        };
        let info = call.info();
        self.dialogs.insert((call_id, local_tag), handle);
        self.calls.insert(handle, call);
        self.events.push_back(Event::IncomingCall {
            call: info,
            remote_sdp: body,
            auth,
        });
    }

    fn in_dialog_offer(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        req: &Request,
        h: CallHandle,
        body: Option<Bytes>,
    ) {
        let (local_sdp, tag, contact_t) = match self.calls.get_mut(&h) {
            Some(c) => {
                if let Some(b) = &body {
                    c.remote_sdp = Some(b.clone());
                }
                // UPDATE and re-INVITE are target refresh requests: their Contact replaces
                // the dialog's remote target (RFC 3261 §12.2.2, RFC 3311 §5.2).
                if let Some(t) = contact_uri(&req.headers) {
                    c.remote_target = Some(t);
                }
                (c.local_sdp.clone(), c.local_tag.clone(), c.transport)
            }
            None => return,
        };
        let contact = self.contact(contact_t).unwrap_or_default();
        let answer = if body.is_some() {
            local_sdp.as_ref()
        } else {
            None
        };
        if let Ok(r) = self.response(
            req,
            200,
            "OK",
            Some(&tag),
            &[(HeaderName::Contact, contact)],
            answer,
        ) {
            self.respond(now, key, r);
        }
        if let Some(sdp) = body {
            let transport = self.tx_dest.get(key).map(|d| d.transport);
            self.events.push_back(Event::RemoteSdp {
                call: h,
                sdp,
                auth: Some(request_auth(req, transport)),
            });
        }
    }

    fn on_update(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        match self.dialog_of(&req.headers) {
            Some(h) => {
                let body = (!req.body().is_empty()).then(|| req.body().clone());
                self.in_dialog_offer(now, key, req, h, body);
            }
            None => self.simple_reply(now, key, req, 481, "Call/Transaction Does Not Exist", &[]),
        }
    }

    fn on_cancel(&mut self, now: Instant, key: &TransactionKey, req: &Request) {
        let invite_key = TransactionKey::for_cancelled_invite(req);
        let found = self
            .calls
            .values()
            .find(|c| {
                c.invite_key.is_some()
                    && c.invite_key == invite_key
                    && c.direction == Direction::Incoming
            })
            .map(|c| (c.handle, c.state, c.local_tag.clone()));
        let Some((h, state, tag)) = found else {
            self.simple_reply(now, key, req, 481, "Call/Transaction Does Not Exist", &[]);
            return;
        };
        // RFC 3261 §9.2: 200 to the CANCEL; if no final response was sent, 487 to the INVITE.
        if let Ok(r) = self.response(req, 200, "OK", Some(&tag), &[], None) {
            self.respond(now, key, r);
        }
        if matches!(state, CallState::Initiating | CallState::Early) {
            self.terminate_pending_invite(now, h);
            self.end_call(h, EndReason::Cancelled);
        }
    }

    /// 487 to the INVITE of an incoming call that has had no final response yet (after a
    /// CANCEL, RFC 3261 §9.2, or a BYE in the early dialog, §15.1.2).
    fn terminate_pending_invite(&mut self, now: Instant, h: CallHandle) {
        let Some(c) = self.calls.get(&h) else {
            return;
        };
        if c.direction != Direction::Incoming
            || !matches!(c.state, CallState::Initiating | CallState::Early)
        {
            return;
        }
        let (tag, invite, invite_key) =
            (c.local_tag.clone(), c.invite.clone(), c.invite_key.clone());
        if let (Some(inv), Some(ik)) = (invite, invite_key)
            && let Ok(r) = self.response(&inv, 487, "Request Terminated", Some(&tag), &[], None)
        {
            self.respond(now, &ik, r);
        }
    }

    fn on_ack(&mut self, now: Instant, ack: &Request) {
        let Some(h) = self.dialog_of(&ack.headers) else {
            return;
        };
        let Some(c) = self.calls.get_mut(&h) else {
            return;
        };
        if c.state != CallState::Answered {
            return; // a retransmitted ACK
        }
        c.state = CallState::Confirmed;
        c.final_2xx = None;
        if !ack.body().is_empty() {
            c.remote_sdp = Some(ack.body().clone());
        }
        let info = c.info();
        let bye = c.bye_on_ack;
        self.timers.clear(&TimerKey::Retransmit2xx(h));
        self.timers.clear(&TimerKey::AckTimeout(h));
        self.events.push_back(Event::Confirmed { call: info });
        if bye {
            let _ = self.bye_or_end(now, h);
        }
    }

    fn retransmit_2xx(&mut self, now: Instant, h: CallHandle) {
        let t2 = self.cfg.timers.t2;
        let Some(c) = self.calls.get_mut(&h) else {
            return;
        };
        if c.state != CallState::Answered {
            return;
        }
        let (Some((resp, interval)), Some(key), Some(dest)) =
            (c.final_2xx.as_mut(), c.invite_key.clone(), c.uas_dest)
        else {
            return;
        };
        *interval = (*interval * 2).min(t2);
        let next = *interval;
        let resp = resp.clone();
        self.timers.set(TimerKey::Retransmit2xx(h), now + next);
        // Through the transaction while it lives (it is in Accepted, RFC 6026), else directly.
        let out = self.layer.send_response(&key, resp.clone());
        if out.is_empty() {
            self.transmits.push_back(Transmit {
                dest,
                data: Message::Response(resp).to_bytes(),
            });
        } else {
            self.process(now, &key, out);
        }
    }

    fn ack_timeout(&mut self, now: Instant, h: CallHandle) {
        let answered = self
            .calls
            .get(&h)
            .is_some_and(|c| c.state == CallState::Answered);
        if answered {
            // RFC 3261 §13.3.1.4: no ACK within 64·T1 — confirm and terminate with BYE.
            let _ = self.send_bye(now, h);
            self.end_call(h, EndReason::Timeout);
        }
    }

    // ---------------------------------------------------------------- UAC side

    fn on_response(&mut self, now: Instant, key: &TransactionKey, resp: Response) {
        let Some(owner) = self.tx_owner.get(key).copied() else {
            return;
        };
        let status = resp.status.code();
        match owner {
            Owner::Call(h, Purpose::Invite) => self.on_invite_response(now, key, h, resp),
            Owner::Call(h, Purpose::Bye) => {
                if status >= 200 {
                    if matches!(status, 401 | 407) && self.retry_in_dialog(now, key, h, &resp) {
                        return;
                    }
                    self.end_call(h, EndReason::LocalBye);
                }
            }
            Owner::Call(_, Purpose::Cancel) => {}
            Owner::Call(h, Purpose::Update) => {
                if status < 200 {
                    return;
                }
                // A 2xx to a target refresh request refreshes our view of the peer's
                // target too (RFC 3261 §12.2.1.2).
                if resp.status.is_success()
                    && let (Some(c), Some(t)) = (self.calls.get_mut(&h), contact_uri(&resp.headers))
                {
                    c.remote_target = Some(t);
                }
                if resp.status.is_success() && !resp.body().is_empty() {
                    let sdp = resp.body().clone();
                    if let Some(c) = self.calls.get_mut(&h) {
                        c.remote_sdp = Some(sdp.clone());
                    }
                    self.events.push_back(Event::RemoteSdp {
                        call: h,
                        sdp,
                        auth: None,
                    });
                }
                self.events.push_back(Event::UpdateResult {
                    call: h,
                    status: Some(status),
                });
            }
            Owner::Register => self.on_register_response(now, key, &resp),
            Owner::Options(id) => {
                if status >= 200 {
                    self.events.push_back(Event::OptionsResult {
                        id,
                        status: Some(status),
                    });
                }
            }
        }
    }

    fn on_invite_response(
        &mut self,
        now: Instant,
        key: &TransactionKey,
        h: CallHandle,
        resp: Response,
    ) {
        let status = resp.status.code();
        let Some(c) = self.calls.get_mut(&h) else {
            return;
        };
        if resp.status.is_provisional() {
            // RFC 3261 §9.1: any provisional response, 100 Trying included, lets a CANCEL go.
            c.provisional_seen = true;
            if status == 100 {
                if c.cancel_pending {
                    self.send_cancel(now, h);
                }
                return;
            }
            if let Some(t) = to_tag(&resp.headers) {
                c.remote_tag = Some(t);
                if c.state == CallState::Initiating {
                    c.state = CallState::Early;
                }
            }
            let cancel = c.cancel_pending;
            self.events.push_back(Event::Ringing { call: h, status });
            if cancel {
                self.send_cancel(now, h);
            }
            return;
        }
        if resp.status.is_success() {
            if c.ack.is_some() {
                // A retransmitted 2xx: the ACK got lost (RFC 3261 §13.2.2.4).
                if let Some((bytes, dest)) = c.ack.clone() {
                    self.transmits.push_back(Transmit { dest, data: bytes });
                }
                return;
            }
            c.remote_tag = to_tag(&resp.headers);
            c.to_value = hval(&resp.headers, &HeaderName::To).unwrap_or_default();
            c.remote_allow = hval(&resp.headers, &HeaderName::Allow);
            c.remote_target = contact_uri(&resp.headers);
            // RFC 3261 §12.1.2: the route set is the Record-Route list in reverse.
            let mut rr: Vec<String> = resp
                .headers
                .get_all(&HeaderName::RecordRoute)
                .flat_map(|x| sh::RecordRoute::parse_list(&x.value()).unwrap_or_default())
                .map(|a| format!("<{}>", a.uri))
                .collect();
            rr.reverse();
            c.route_set = rr;
            if !resp.body().is_empty() {
                c.remote_sdp = Some(resp.body().clone());
            }
            let hang_up = c.cancel_pending || c.cancel_sent || c.state == CallState::Terminating;
            c.state = CallState::Confirmed;
            let invite_cseq = c.local_cseq;
            match self.build_in_dialog(h, Method::Ack, Some(invite_cseq), None) {
                Ok((req, dest)) => {
                    let data = Message::Request(req).to_bytes();
                    self.transmits.push_back(Transmit {
                        dest,
                        data: data.clone(),
                    });
                    if let Some(c) = self.calls.get_mut(&h) {
                        c.ack = Some((data, dest));
                    }
                }
                Err(_) => {
                    self.end_call(h, EndReason::TransportError);
                    return;
                }
            }
            if hang_up {
                // Our CANCEL lost the race against the 2xx: ACK, then BYE (RFC 3261 §9.1).
                let _ = self.bye_or_end(now, h);
                return;
            }
            let (info, sdp) = match self.calls.get(&h) {
                Some(c) => (c.info(), c.remote_sdp.clone()),
                None => return,
            };
            self.events.push_back(Event::Answered {
                call: info,
                remote_sdp: sdp,
            });
            return;
        }
        // Final non-2xx: the transaction already sent the ACK (RFC 3261 §17.1.1.3).
        if matches!(status, 401 | 407) && self.retry_invite(now, key, h, &resp) {
            return;
        }
        let cancelled = self
            .calls
            .get(&h)
            .is_some_and(|c| c.cancel_sent || c.cancel_pending);
        let reason = if status == 487 && cancelled {
            EndReason::Cancelled
        } else {
            EndReason::Rejected {
                status,
                reason: String::from_utf8_lossy(&resp.reason).into_owned(),
            }
        };
        self.end_call(h, reason);
    }

    /// Builds the Authorization/Proxy-Authorization value answering `resp` for `method` on
    /// `uri`, or `None` when there is nothing we can answer.
    fn answer_challenge(
        &mut self,
        resp: &Response,
        method: &str,
        uri: &str,
    ) -> Option<(HeaderName, String)> {
        let password = self.cfg.password.clone()?;
        let proxy = resp.status.code() == 407;
        let (challenge_hdr, answer_hdr) = if proxy {
            (
                HeaderName::ProxyAuthenticate,
                HeaderName::ProxyAuthorization,
            )
        } else {
            (HeaderName::WwwAuthenticate, HeaderName::Authorization)
        };
        let values: Vec<Vec<u8>> = resp
            .headers
            .get_all(&challenge_hdr)
            .map(|h| h.value().to_vec())
            .collect();
        let ch = digest::pick(values.iter().map(Vec::as_slice), proxy)?;
        let nc = match self.nonce_counts.iter_mut().find(|(n, _)| *n == ch.nonce) {
            Some((_, c)) => {
                *c += 1;
                *c
            }
            None => {
                if self.nonce_counts.len() >= NONCES_KEPT {
                    self.nonce_counts.pop_front();
                }
                self.nonce_counts.push_back((ch.nonce.clone(), 1));
                1
            }
        };
        let cnonce = self.token(16);
        let user = self
            .cfg
            .auth_user
            .clone()
            .unwrap_or_else(|| self.cfg.user.clone());
        let value = digest::digest_response(&ch, &user, &password, method, uri, nc, &cnonce);
        Some((answer_hdr, value))
    }

    fn retry_invite(
        &mut self,
        now: Instant,
        _key: &TransactionKey,
        h: CallHandle,
        resp: &Response,
    ) -> bool {
        let Some(c) = self.calls.get(&h) else {
            return false;
        };
        // Two attempts: a second challenge after credentials means they are wrong (or stale).
        if c.auth_tries >= 2 || c.cancel_pending || c.cancel_sent {
            return false;
        }
        let uri = c.request_uri.clone();
        let Some(auth) = self.answer_challenge(resp, "INVITE", &uri) else {
            return false;
        };
        let Some(c) = self.calls.get_mut(&h) else {
            return false;
        };
        c.auth_tries += 1;
        c.auth_header = Some(auth);
        // RFC 3261 §22.2: a new request, same Call-ID/From tag, CSeq incremented.
        c.local_cseq += 1;
        let (Ok(req), Some(dest)) = (
            self.build_invite(h),
            self.calls.get(&h).and_then(|c| c.first_hop),
        ) else {
            return false;
        };
        self.start_invite(now, h, req, dest)
    }

    fn retry_in_dialog(
        &mut self,
        now: Instant,
        _key: &TransactionKey,
        h: CallHandle,
        resp: &Response,
    ) -> bool {
        let Some(c) = self.calls.get(&h) else {
            return false;
        };
        if c.auth_tries >= 4 {
            return false;
        }
        let uri = c
            .remote_target
            .clone()
            .unwrap_or_else(|| c.request_uri.clone());
        let Some(auth) = self.answer_challenge(resp, "BYE", &uri) else {
            return false;
        };
        if let Some(c) = self.calls.get_mut(&h) {
            c.auth_tries += 1;
            c.auth_header = Some(auth);
        }
        self.send_bye(now, h).is_ok()
    }

    fn build_invite(&mut self, h: CallHandle) -> Result<Request, SipError> {
        let c = self.calls.get(&h).ok_or(SipError::NoSuchCall(h))?;
        let (t, ruri, from, to, call_id, cseq, sdp, auth, identity) = (
            c.transport,
            c.request_uri.clone(),
            c.from_value.clone(),
            c.to_value.clone(),
            c.call_id.clone(),
            c.local_cseq,
            c.local_sdp.clone(),
            c.auth_header.clone(),
            c.identity.clone(),
        );
        let uri = sx::Uri::parse(Bytes::from(ruri.clone())).map_err(|_| SipError::BadUri(ruri))?;
        let mut b = RequestBuilder::new(Method::Invite, uri)
            .header(HeaderName::Via, self.via(t)?)
            .map_err(build_err)?
            .max_forwards(70)
            .header(HeaderName::From, from)
            .map_err(build_err)?
            .header(HeaderName::To, to)
            .map_err(build_err)?
            .header(HeaderName::CallId, call_id)
            .map_err(build_err)?
            .cseq(cseq, &Method::Invite)
            .map_err(build_err)?
            .header(HeaderName::Contact, self.contact(t)?)
            .map_err(build_err)?
            .header(HeaderName::Allow, ALLOW)
            .map_err(build_err)?
            .header(HeaderName::UserAgent, self.cfg.user_agent.clone())
            .map_err(build_err)?;
        if let Some((n, v)) = auth {
            b = b.header(n, v).map_err(build_err)?;
        }
        if let Some(v) = identity {
            b = b.header(HeaderName::Identity, v).map_err(build_err)?;
        }
        if let Some(sdp) = sdp {
            b = b
                .header(HeaderName::ContentType, "application/sdp")
                .map_err(build_err)?
                .body(sdp);
        }
        Ok(b.build())
    }

    fn start_invite(&mut self, now: Instant, h: CallHandle, req: Request, dest: Dest) -> bool {
        if let Some(c) = self.calls.get_mut(&h) {
            c.invite = Some(req.clone());
        }
        match self.send_request(now, req, dest, Owner::Call(h, Purpose::Invite)) {
            Some(k) => {
                if let Some(c) = self.calls.get_mut(&h) {
                    c.invite_key = Some(k);
                }
                true
            }
            None => false,
        }
    }

    /// Builds an in-dialog request (RFC 3261 §12.2.1.1) and its next hop. `cseq` is given for
    /// ACK (the INVITE's number); otherwise the local CSeq is incremented.
    fn build_in_dialog(
        &mut self,
        h: CallHandle,
        method: Method,
        cseq: Option<u32>,
        body: Option<Bytes>,
    ) -> Result<(Request, Dest), SipError> {
        self.build_in_dialog_with(h, method, cseq, body, None)
    }

    /// [`Self::build_in_dialog`] with an `Identity` header (RFC 8224) added.
    fn build_in_dialog_with(
        &mut self,
        h: CallHandle,
        method: Method,
        cseq: Option<u32>,
        body: Option<Bytes>,
        identity: Option<String>,
    ) -> Result<(Request, Dest), SipError> {
        let c = self.calls.get_mut(&h).ok_or(SipError::NoSuchCall(h))?;
        let seq = match cseq {
            Some(s) => s,
            None => {
                c.local_cseq += 1;
                c.local_cseq
            }
        };
        let target = c
            .remote_target
            .clone()
            .unwrap_or_else(|| c.request_uri.clone());
        let (t, from, to, call_id, routes, auth) = (
            c.transport,
            c.from_value.clone(),
            c.to_value.clone(),
            c.call_id.clone(),
            c.route_set.clone(),
            c.auth_header.clone(),
        );
        let uri = sx::Uri::parse(Bytes::from(target.clone()))
            .map_err(|_| SipError::BadUri(target.clone()))?;
        // Loose routing (RFC 3261 §12.2.1.1, `;lr`): the request goes to the first route.
        let hop_uri = match routes.first() {
            Some(r) => addr_uri(r).ok_or_else(|| SipError::BadUri(r.clone()))?,
            None => uri.clone(),
        };
        let dest = uri_dest(&hop_uri, t).ok_or_else(|| SipError::NoRoute(hop_uri.to_string()))?;
        let mut b = RequestBuilder::new(method.clone(), uri)
            .header(HeaderName::Via, self.via(dest.transport)?)
            .map_err(build_err)?
            .max_forwards(70);
        for r in routes {
            b = b.header(HeaderName::Route, r).map_err(build_err)?;
        }
        b = b
            .header(HeaderName::From, from)
            .map_err(build_err)?
            .header(HeaderName::To, to)
            .map_err(build_err)?
            .header(HeaderName::CallId, call_id)
            .map_err(build_err)?
            .cseq(seq, &method)
            .map_err(build_err)?;
        if method == Method::Update {
            b = b
                .header(HeaderName::Contact, self.contact(dest.transport)?)
                .map_err(build_err)?;
        }
        if method == Method::Bye
            && let Some((n, v)) = auth
        {
            b = b.header(n, v).map_err(build_err)?;
        }
        if let Some(v) = identity {
            b = b.header(HeaderName::Identity, v).map_err(build_err)?;
        }
        if let Some(body) = body {
            b = b
                .header(HeaderName::ContentType, "application/sdp")
                .map_err(build_err)?
                .body(body);
        }
        Ok((b.build(), dest))
    }

    /// BYE for a call that is to end here. RFC 3261 §15.1.1 ends the session when a BYE
    /// gets no answer; one that cannot even leave (a remote target this core cannot route:
    /// a host name, no RFC 3263 DNS here) ends it too, or a hung-up call would stay up.
    fn bye_or_end(&mut self, now: Instant, h: CallHandle) -> Result<(), SipError> {
        self.send_bye(now, h)
            .inspect_err(|_| self.end_call(h, EndReason::TransportError))
    }

    fn send_bye(&mut self, now: Instant, h: CallHandle) -> Result<(), SipError> {
        let (req, dest) = self.build_in_dialog(h, Method::Bye, None, None)?;
        if let Some(c) = self.calls.get_mut(&h) {
            c.state = CallState::Terminating;
        }
        self.send_request(now, req, dest, Owner::Call(h, Purpose::Bye));
        Ok(())
    }

    fn send_cancel(&mut self, now: Instant, h: CallHandle) {
        let Some(c) = self.calls.get_mut(&h) else {
            return;
        };
        let (Some(inv), Some(dest)) = (c.invite.clone(), c.first_hop) else {
            return;
        };
        c.cancel_pending = false;
        c.cancel_sent = true;
        c.state = CallState::Terminating;
        // RFC 3261 §9.1: same Request-URI, Call-ID, To, From, CSeq number and top Via
        // (so the same branch) as the INVITE; Route copied.
        let mut b = RequestBuilder::new(Method::Cancel, inv.uri.clone()).max_forwards(70);
        let mut ok = true;
        let mut add = |b: RequestBuilder, n: HeaderName, v: Option<String>| match v {
            Some(v) => b.header(n, v).unwrap_or_else(|_| {
                ok = false;
                RequestBuilder::new(Method::Cancel, inv.uri.clone())
            }),
            None => b,
        };
        let top_via = inv
            .headers
            .get(&HeaderName::Via)
            .map(|v| String::from_utf8_lossy(&v.value()).into_owned());
        b = add(b, HeaderName::Via, top_via);
        for r in inv.headers.get_all(&HeaderName::Route) {
            let v = Some(String::from_utf8_lossy(&r.value()).into_owned());
            b = add(b, HeaderName::Route, v);
        }
        b = add(b, HeaderName::From, hval(&inv.headers, &HeaderName::From));
        b = add(b, HeaderName::To, hval(&inv.headers, &HeaderName::To));
        b = add(
            b,
            HeaderName::CallId,
            hval(&inv.headers, &HeaderName::CallId),
        );
        let seq = inv
            .headers
            .typed::<CSeq>()
            .and_then(Result::ok)
            .map_or(1, |c| c.sequence);
        let Ok(b) = b.cseq(seq, &Method::Cancel) else {
            return;
        };
        if ok {
            self.send_request(now, b.build(), dest, Owner::Call(h, Purpose::Cancel));
            self.timers
                .set(TimerKey::CancelGiveUp(h), now + 64 * self.cfg.timers.t1);
        }
    }

    /// RFC 3261 §9.1: "If no final response has been received after 64*T1 seconds, the
    /// client SHOULD then consider the original transaction cancelled and SHOULD destroy the
    /// client transaction handling the original request." Only while that INVITE is still
    /// unanswered: a 2xx that won the race has confirmed the call and its BYE is under way.
    fn cancel_give_up(&mut self, now: Instant, h: CallHandle) {
        let Some(key) = self.calls.get(&h).and_then(|c| c.invite_key.clone()) else {
            return;
        };
        if !matches!(
            self.layer.client_state(&key),
            Some(sx::transaction::ClientState::Calling | sx::transaction::ClientState::Proceeding)
        ) {
            return;
        }
        self.end_call(h, EndReason::Cancelled);
        // sipx-sip destroys a client transaction through its transport-failure input; the
        // call is gone already, so the failure reaches no one.
        let out = self.layer.on_transport_error(&key);
        self.process(now, &key, out);
    }

    fn on_tx_failure(&mut self, _now: Instant, key: &TransactionKey) {
        match self.tx_owner.get(key).copied() {
            // Only if this is still the call's INVITE (not one superseded by an auth retry).
            Some(Owner::Call(h, Purpose::Invite))
                if self.calls.get(&h).is_some_and(|c| {
                    c.invite_key.as_ref() == Some(key) && c.state != CallState::Confirmed
                }) =>
            {
                self.end_call(h, EndReason::Timeout);
            }
            Some(Owner::Call(h, Purpose::Bye)) => self.end_call(h, EndReason::LocalBye),
            Some(Owner::Call(h, Purpose::Update)) => self.events.push_back(Event::UpdateResult {
                call: h,
                status: None,
            }),
            Some(Owner::Register) => self.events.push_back(Event::RegistrationFailed {
                status: None,
                reason: "no response from the registrar".into(),
            }),
            Some(Owner::Options(id)) => self
                .events
                .push_back(Event::OptionsResult { id, status: None }),
            _ => {}
        }
    }

    fn stray_response(&mut self, resp: &Response) {
        // A 2xx retransmitted after the INVITE transaction ended (Timer M): re-send the ACK.
        if !resp.status.is_success() {
            return;
        }
        let call_id = hval(&resp.headers, &HeaderName::CallId).unwrap_or_default();
        let Some(local) = from_tag(&resp.headers) else {
            return;
        };
        if let Some(h) = self.dialogs.get(&(call_id, local))
            && let Some((data, dest)) = self.calls.get(h).and_then(|c| c.ack.clone())
        {
            self.transmits.push_back(Transmit { dest, data });
        }
    }

    // ---------------------------------------------------------------- commands

    /// Places a call to `target` (a `sip:`/`sips:` URI) with `sdp` as the offer.
    pub fn call(
        &mut self,
        now: Instant,
        target: &str,
        sdp: Option<Bytes>,
    ) -> Result<CallHandle, SipError> {
        self.call_signed(now, target, sdp, None)
    }

    /// [`Self::call`] with an `Identity` header (RFC 8224) on the INVITE (and on its re-sends
    /// after a digest challenge). The caller signs: the header's PASSporT names our address
    /// of record ([`Self::aor`]) and `target`, and the time, which this core does not read.
    pub fn call_signed(
        &mut self,
        now: Instant,
        target: &str,
        sdp: Option<Bytes>,
        identity: Option<String>,
    ) -> Result<CallHandle, SipError> {
        let uri = sx::Uri::parse(Bytes::copy_from_slice(target.trim().as_bytes()))
            .map_err(|_| SipError::BadUri(target.to_owned()))?;
        if !uri.scheme().is_sip() {
            return Err(SipError::BadUri(target.to_owned()));
        }
        let dest = match self.cfg.outbound_proxy {
            Some((t, addr)) => Dest {
                transport: t,
                addr,
                conn: None,
            },
            None => uri_dest(&uri, Transport::Udp)
                .ok_or_else(|| SipError::NoRoute(target.to_owned()))?,
        };
        self.port_for(dest.transport)?;
        let handle = CallHandle(self.next_handle);
        self.next_handle += 1;
        let local_tag = self.token(10);
        let call_id = format!("{}@{}", self.token(20), self.cfg.contact_host);
        let call = Call {
            handle,
            direction: Direction::Outgoing,
            state: CallState::Initiating,
            call_id: call_id.clone(),
            local_tag: local_tag.clone(),
            remote_tag: None,
            local_uri: self.aor(),
            remote_uri: uri.to_string(),
            from_value: format!("{};tag={local_tag}", self.local_name_addr()),
            to_value: format!("<{uri}>"),
            request_uri: uri.to_string(),
            local_cseq: self.rng.random_range(1..10_000),
            remote_target: None,
            route_set: Vec::new(),
            transport: dest.transport,
            first_hop: Some(dest),
            invite: None,
            invite_key: None,
            uas_dest: None,
            local_sdp: sdp,
            remote_sdp: None,
            auth_tries: 0,
            auth_header: None,
            provisional_seen: false,
            cancel_pending: false,
            cancel_sent: false,
            bye_on_ack: false,
            final_2xx: None,
            ack: None,
            identity,
            remote_allow: None,
            sips: uri.scheme().is_secure(),
        };
        self.calls.insert(handle, call);
        self.dialogs.insert((call_id, local_tag), handle);
        let req = match self.build_invite(handle) {
            Ok(r) => r,
            Err(e) => {
                self.calls.remove(&handle);
                return Err(e);
            }
        };
        self.start_invite(now, handle, req, dest);
        Ok(handle)
    }

    fn uas_call(&self, h: CallHandle, what: &'static str) -> Result<&Call, SipError> {
        let c = self.calls.get(&h).ok_or(SipError::NoSuchCall(h))?;
        if c.direction != Direction::Incoming
            || !matches!(c.state, CallState::Initiating | CallState::Early)
        {
            return Err(SipError::WrongState {
                call: h,
                state: c.state,
                what,
            });
        }
        Ok(c)
    }

    /// Sends a provisional response (180 Ringing, 183…) to an incoming call.
    pub fn ring(&mut self, now: Instant, h: CallHandle, status: u16) -> Result<(), SipError> {
        if !(101..200).contains(&status) {
            return Err(SipError::BadStatus(status));
        }
        let c = self.uas_call(h, "ring")?;
        let (inv, key, tag, t) = (
            c.invite.clone(),
            c.invite_key.clone(),
            c.local_tag.clone(),
            c.transport,
        );
        let (Some(inv), Some(key)) = (inv, key) else {
            return Err(SipError::NoSuchCall(h));
        };
        let mut extra = vec![(HeaderName::Contact, self.contact(t)?)];
        for rr in inv.headers.get_all(&HeaderName::RecordRoute) {
            extra.push((
                HeaderName::RecordRoute,
                String::from_utf8_lossy(&rr.value()).into_owned(),
            ));
        }
        let reason = if status == 180 {
            "Ringing"
        } else {
            "Session Progress"
        };
        let r = self.response(&inv, status, reason, Some(&tag), &extra, None)?;
        self.respond(now, &key, r);
        if let Some(c) = self.calls.get_mut(&h) {
            c.state = CallState::Early;
        }
        Ok(())
    }

    /// Answers an incoming call with 200 OK and `sdp`; the 2xx is retransmitted until the ACK
    /// arrives (RFC 3261 §13.3.1.4).
    pub fn answer(
        &mut self,
        now: Instant,
        h: CallHandle,
        sdp: Option<Bytes>,
    ) -> Result<(), SipError> {
        let c = self.uas_call(h, "answer")?;
        let (inv, key, tag, t) = (
            c.invite.clone(),
            c.invite_key.clone(),
            c.local_tag.clone(),
            c.transport,
        );
        let (Some(inv), Some(key)) = (inv, key) else {
            return Err(SipError::NoSuchCall(h));
        };
        let mut extra = vec![
            (HeaderName::Contact, self.contact(t)?),
            (HeaderName::Allow, ALLOW.to_owned()),
        ];
        // RFC 3261 §12.1.1: Record-Route copied into 2xx in the same order.
        for rr in inv.headers.get_all(&HeaderName::RecordRoute) {
            extra.push((
                HeaderName::RecordRoute,
                String::from_utf8_lossy(&rr.value()).into_owned(),
            ));
        }
        let r = self.response(&inv, 200, "OK", Some(&tag), &extra, sdp.as_ref())?;
        let t1 = self.cfg.timers.t1;
        let timeout = t1 * 64;
        if let Some(c) = self.calls.get_mut(&h) {
            c.state = CallState::Answered;
            c.local_sdp = sdp;
            c.final_2xx = Some((r.clone(), t1));
        }
        self.respond(now, &key, r);
        if !t.is_reliable() {
            self.timers.set(TimerKey::Retransmit2xx(h), now + t1);
        }
        self.timers.set(TimerKey::AckTimeout(h), now + timeout);
        Ok(())
    }

    /// Rejects an incoming call with a final status (300–699).
    pub fn reject(
        &mut self,
        now: Instant,
        h: CallHandle,
        status: u16,
        reason: &str,
    ) -> Result<(), SipError> {
        if !(300..700).contains(&status) {
            return Err(SipError::BadStatus(status));
        }
        let c = self.uas_call(h, "reject")?;
        let (inv, key, tag) = (c.invite.clone(), c.invite_key.clone(), c.local_tag.clone());
        let (Some(inv), Some(key)) = (inv, key) else {
            return Err(SipError::NoSuchCall(h));
        };
        let r = self.response(&inv, status, reason, Some(&tag), &[], None)?;
        self.respond(now, &key, r);
        self.end_call(h, EndReason::LocalReject { status });
        Ok(())
    }

    /// Ends a call: CANCEL before an answer (after a provisional, RFC 3261 §9.1), BYE once
    /// answered, 603 Decline for an unanswered incoming call.
    pub fn hangup(&mut self, now: Instant, h: CallHandle) -> Result<(), SipError> {
        let c = self.calls.get(&h).ok_or(SipError::NoSuchCall(h))?;
        match (c.direction, c.state) {
            (Direction::Outgoing, CallState::Initiating) if !c.provisional_seen => {
                // §9.1: a CANCEL SHOULD NOT be sent before a provisional response.
                if let Some(c) = self.calls.get_mut(&h) {
                    c.cancel_pending = true;
                }
                Ok(())
            }
            (Direction::Outgoing, CallState::Initiating | CallState::Early) => {
                self.send_cancel(now, h);
                Ok(())
            }
            (Direction::Incoming, CallState::Initiating | CallState::Early) => {
                self.reject(now, h, 603, "Decline")
            }
            // RFC 3261 §15: the callee does not send BYE before the ACK for its 2xx (or the
            // ACK timeout, which sends it anyway).
            (Direction::Incoming, CallState::Answered) => {
                if let Some(c) = self.calls.get_mut(&h) {
                    c.bye_on_ack = true;
                }
                Ok(())
            }
            (_, CallState::Answered | CallState::Confirmed) => self.bye_or_end(now, h),
            (_, state) => Err(SipError::WrongState {
                call: h,
                state,
                what: "hang up",
            }),
        }
    }

    /// Sends UPDATE (RFC 3311) with new SDP inside a confirmed dialog. The outcome comes as
    /// [`Event::UpdateResult`].
    pub fn update(&mut self, now: Instant, h: CallHandle, sdp: Bytes) -> Result<(), SipError> {
        self.update_signed(now, h, sdp, None)
    }

    /// [`Self::update`] with an `Identity` header (RFC 8224): the draft's §4.1, where the
    /// callee re-sends its HIT in an UPDATE it can sign, since a response cannot carry
    /// RFC 8224 Identity.
    pub fn update_signed(
        &mut self,
        now: Instant,
        h: CallHandle,
        sdp: Bytes,
        identity: Option<String>,
    ) -> Result<(), SipError> {
        let c = self.calls.get(&h).ok_or(SipError::NoSuchCall(h))?;
        if c.state != CallState::Confirmed {
            return Err(SipError::WrongState {
                call: h,
                state: c.state,
                what: "update",
            });
        }
        let (req, dest) =
            self.build_in_dialog_with(h, Method::Update, None, Some(sdp.clone()), identity)?;
        if let Some(c) = self.calls.get_mut(&h) {
            c.local_sdp = Some(sdp);
        }
        self.send_request(now, req, dest, Owner::Call(h, Purpose::Update));
        Ok(())
    }

    /// Our address changed (the host moved; HIP's UPDATE moves the media, RFC 8046): the
    /// requests and responses we send from now on carry `host` in Via and Contact. Follow
    /// it with [`Self::register`] and [`Self::refresh_target`] for each confirmed call.
    pub fn set_contact_host(&mut self, host: &str) {
        self.cfg.contact_host = host.to_owned();
    }

    /// Tells the peer of a confirmed call where we are now: an UPDATE without an offer
    /// (RFC 3311 §5.1), a target refresh request whose Contact becomes the dialog's
    /// remote target at the peer (RFC 3261 §12.2.2). The media is not renegotiated. Its
    /// answer comes as [`Event::UpdateResult`].
    pub fn refresh_target(&mut self, now: Instant, h: CallHandle) -> Result<(), SipError> {
        let c = self.calls.get(&h).ok_or(SipError::NoSuchCall(h))?;
        if c.state != CallState::Confirmed {
            return Err(SipError::WrongState {
                call: h,
                state: c.state,
                what: "refresh target",
            });
        }
        let (req, dest) = self.build_in_dialog_with(h, Method::Update, None, None, None)?;
        self.send_request(now, req, dest, Owner::Call(h, Purpose::Update));
        Ok(())
    }

    /// Sends an out-of-dialog OPTIONS to `target`; the answer comes as
    /// [`Event::OptionsResult`] with the returned id.
    pub fn options(&mut self, now: Instant, target: &str) -> Result<u64, SipError> {
        let uri = sx::Uri::parse(Bytes::copy_from_slice(target.as_bytes()))
            .map_err(|_| SipError::BadUri(target.to_owned()))?;
        let dest = match self.cfg.outbound_proxy {
            Some((t, addr)) => Dest {
                transport: t,
                addr,
                conn: None,
            },
            None => uri_dest(&uri, Transport::Udp)
                .ok_or_else(|| SipError::NoRoute(target.to_owned()))?,
        };
        let id = self.next_handle;
        self.next_handle += 1;
        let tag = self.token(10);
        let call_id = format!("{}@{}", self.token(20), self.cfg.contact_host);
        let req = RequestBuilder::new(Method::Options, uri.clone())
            .header(HeaderName::Via, self.via(dest.transport)?)
            .map_err(build_err)?
            .max_forwards(70)
            .header(
                HeaderName::From,
                format!("{};tag={tag}", self.local_name_addr()),
            )
            .map_err(build_err)?
            .header(HeaderName::To, format!("<{uri}>"))
            .map_err(build_err)?
            .header(HeaderName::CallId, call_id)
            .map_err(build_err)?
            .cseq(1, &Method::Options)
            .map_err(build_err)?
            .header(HeaderName::Accept, "application/sdp")
            .map_err(build_err)?
            .build();
        self.send_request(now, req, dest, Owner::Options(id));
        Ok(id)
    }

    /// Registers (or refreshes) our contact with the registrar (RFC 3261 §10.2).
    pub fn register(&mut self, now: Instant) -> Result<(), SipError> {
        let expires = self.cfg.register_expires;
        self.send_register(now, expires, true)
    }

    /// Removes our registration (Expires: 0).
    pub fn unregister(&mut self, now: Instant) -> Result<(), SipError> {
        self.timers.clear(&TimerKey::RegisterRefresh);
        self.timers.clear(&TimerKey::KeepAlive);
        self.send_register(now, 0, true)
    }

    fn send_register(
        &mut self,
        now: Instant,
        expires: u32,
        fresh_auth: bool,
    ) -> Result<(), SipError> {
        let (t, addr) = self
            .cfg
            .registrar
            .or(self.cfg.outbound_proxy)
            .ok_or(SipError::NoRegistrar)?;
        let dest = Dest {
            transport: t,
            addr,
            conn: None,
        };
        if self.registration.is_none() {
            let call_id = format!("{}@{}", self.token(20), self.cfg.contact_host);
            let from_tag = self.token(10);
            self.registration = Some(Registration {
                call_id,
                from_tag,
                cseq: 0,
                expires,
                auth_tries: 0,
                auth_header: None,
                dest,
                flow_timer: None,
                keepalives_sent: 0,
                last_keepalive: None,
            });
        }
        let contact = self.contact(t)?;
        let via = self.via(t)?;
        let aor = self.aor();
        let name_addr = self.local_name_addr();
        let ua = self.cfg.user_agent.clone();
        let reg = self.registration.as_mut().ok_or(SipError::NoRegistrar)?;
        reg.cseq += 1;
        reg.expires = expires;
        reg.dest = dest;
        if fresh_auth {
            reg.auth_tries = 0;
        }
        let ruri = format!("sip:{}", self.cfg.domain);
        let uri = sx::Uri::parse(Bytes::from(ruri.clone())).map_err(|_| SipError::BadUri(ruri))?;
        let mut b = RequestBuilder::new(Method::Register, uri)
            .header(HeaderName::Via, via)
            .map_err(build_err)?
            .max_forwards(70)
            .header(
                HeaderName::From,
                format!("{name_addr};tag={}", reg.from_tag),
            )
            .map_err(build_err)?
            .header(HeaderName::To, format!("<{aor}>"))
            .map_err(build_err)?
            .header(HeaderName::CallId, reg.call_id.clone())
            .map_err(build_err)?
            .cseq(reg.cseq, &Method::Register)
            .map_err(build_err)?
            .header(HeaderName::Contact, contact)
            .map_err(build_err)?
            .header(HeaderName::Expires, expires.to_string())
            .map_err(build_err)?
            .header(HeaderName::UserAgent, ua)
            .map_err(build_err)?;
        if let Some((n, v)) = reg.auth_header.clone() {
            b = b.header(n, v).map_err(build_err)?;
        }
        self.send_request(now, b.build(), dest, Owner::Register);
        Ok(())
    }

    fn on_register_response(&mut self, now: Instant, _key: &TransactionKey, resp: &Response) {
        let status = resp.status.code();
        if status < 200 {
            return;
        }
        let Some(reg) = self.registration.as_ref() else {
            return;
        };
        let requested = reg.expires;
        if resp.status.is_success() {
            // RFC 3261 §10.2.4: the granted expiry is in the Contact's expires or Expires.
            let granted = resp
                .headers
                .typed::<sh::Contact>()
                .and_then(Result::ok)
                .and_then(|c| {
                    c.param("expires")
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                })
                .or_else(|| {
                    resp.headers
                        .typed::<sh::Expires>()
                        .and_then(Result::ok)
                        .map(|e| e.0)
                })
                .unwrap_or(requested);
            if requested > 0 && granted > 0 {
                // Refresh at half the lifetime, so a lost refresh can still be retried in time.
                let refresh = Duration::from_secs(u64::from(granted).div_ceil(2));
                self.timers.set(TimerKey::RegisterRefresh, now + refresh);
                let flow_timer = resp
                    .headers
                    .value(&HeaderName::FlowTimer)
                    .and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok());
                if let Some(reg) = self.registration.as_mut() {
                    reg.flow_timer = flow_timer;
                }
                self.schedule_keepalive(now);
            } else {
                self.timers.clear(&TimerKey::KeepAlive);
            }
            self.events.push_back(Event::Registered {
                expires: if requested == 0 { 0 } else { granted },
            });
            return;
        }
        if matches!(status, 401 | 407) && reg.auth_tries < 2 {
            let ruri = format!("sip:{}", self.cfg.domain);
            if let Some(auth) = self.answer_challenge(resp, "REGISTER", &ruri)
                && let Some(reg) = self.registration.as_mut()
            {
                reg.auth_tries += 1;
                reg.auth_header = Some(auth);
                if self.send_register(now, requested, false).is_ok() {
                    return;
                }
            }
        }
        self.timers.clear(&TimerKey::KeepAlive);
        self.events.push_back(Event::RegistrationFailed {
            status: Some(status),
            reason: String::from_utf8_lossy(&resp.reason).into_owned(),
        });
    }

    /// Arms the next keep-alive of the registration flow, if [`UaConfig::keepalive`] wants one.
    fn schedule_keepalive(&mut self, now: Instant) {
        let Some(reg) = self.registration.as_ref() else {
            return;
        };
        let bounds = self
            .cfg
            .keepalive
            .bounds(reg.dest.transport.is_reliable(), reg.flow_timer);
        match bounds {
            Some((lo, hi)) => {
                let after = if lo >= hi {
                    lo
                } else {
                    self.rng.random_range(lo..=hi)
                };
                self.timers.set(TimerKey::KeepAlive, now + after);
            }
            None => self.timers.clear(&TimerKey::KeepAlive),
        }
    }

    /// A double-CRLF ping to the registrar (RFC 5626 §3.5.1, §4.4.1): it crosses every NAT
    /// on the flow and refreshes its binding; a registrar ignores it on UDP and answers a
    /// CRLF pong on a stream.
    fn send_keepalive(&mut self, now: Instant) {
        let Some(reg) = self.registration.as_mut() else {
            return;
        };
        reg.keepalives_sent += 1;
        reg.last_keepalive = Some(now);
        self.transmits.push_back(Transmit {
            dest: reg.dest,
            data: Bytes::from_static(super::nat::PING),
        });
        self.schedule_keepalive(now);
    }

    /// The registration flow's keep-alives; `None` without a registration.
    pub fn keepalive_status(&self) -> Option<KeepAliveStatus> {
        let reg = self.registration.as_ref()?;
        Some(KeepAliveStatus {
            sent: reg.keepalives_sent,
            last: reg.last_keepalive,
            next: self.timers.deadline(&TimerKey::KeepAlive),
        })
    }
}

/// What [`UserAgent::keepalive_status`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAliveStatus {
    /// Keep-alives sent on the registration flow.
    pub sent: u64,
    /// When the last one went.
    pub last: Option<Instant>,
    /// When the next one is due (`None`: not registered, or keep-alives off).
    pub next: Option<Instant>,
}

fn to_tag_of(h: &sx::Headers) -> Option<String> {
    to_tag(h)
}
