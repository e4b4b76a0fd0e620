//! Untrusted bytes into the SIP side, the way the agent's SIP service meets them:
//!
//! * the raw parser (`sipx-sip`, which `hip-sip` keeps behind its own interface) gets every
//!   message as a datagram and as stream chunks;
//! * the sans-IO user agent core (`UserAgent::handle_datagram` / `handle_stream` /
//!   `handle_timeout`) gets a *session* of several messages on simulated time, while it
//!   places, answers, rejects, updates and hangs up calls and registers with digest
//!   credentials, so responses can meet its own client transactions and requests its
//!   dialogs;
//! * what the agent does with an incoming offer or answer: the SDP layer and RFC 8224
//!   Identity verification of the request.
//!
//! Nothing may panic; every message the UA builds itself must parse again; once every
//! timer has run out no transaction may be left behind.
//!
//! Input: byte 0 chooses the scenario (bits below). The rest is split at `\n%%\n` into
//! steps; a step's first byte says how it is delivered (bit 0: TCP stream, else UDP
//! datagram; bits 1–3: simulated time to let pass first, × 400 ms) and the rest is the
//! message. In a message, SIPp's `[last_Via:]`, `[last_From:]`, `[last_To:]`,
//! `[last_Call-ID:]`, `[last_CSeq:]` become those header lines of the last message the UA
//! sent (its branches and tags come from a fixed seed), and `[len]` the length of what
//! follows the blank line, so seed files read like SIPp scenarios (`fuzz/seeds/README.md`).
#![no_main]

use std::{
    net::SocketAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use bytes::Bytes;
use hip_sip::{
    identity::{self, Expected, SigningKey, Trust},
    sdp::{self, Hit, Sdp},
    sip::{ConnId, Event, Transport, UaConfig, UserAgent},
};
use libfuzzer_sys::fuzz_target;
// The harness's own byte searches: `windows(n).any(..)` made one traced memcmp per byte,
// and that tracing was most of an execution.
use memchr::memmem;
use sipx_sip::{Limits, StreamParser, parse_datagram};

const PLACE_CALL: u8 = 1;
const REGISTER: u8 = 1 << 1;
const ANSWER: u8 = 1 << 2;
/// Hang up every call after each step (CANCEL, BYE, 603 at every stage of a call).
const HANG_UP: u8 = 1 << 3;
const OPTIONS: u8 = 1 << 4;
const UPDATE: u8 = 1 << 5;
const REJECT: u8 = 1 << 6;
/// Admission caps of one (`hip_sip::sip::Limits`): a second INVITE, or one from a source
/// past its burst, gets the stateless 503; a stream message over 600 bytes is refused.
const TIGHT_LIMITS: u8 = 1 << 7;

const STEP_SEP: &[u8] = b"\n%%\n";
const MAX_STEPS: usize = 16;
/// The verifier's clock for Identity checks (seconds since the epoch); fixed.
const NOW_UNIX: i64 = 1_700_000_000;

const OFFER: &[u8] = b"v=0\r\no=bob 1 1 IN IP4 192.0.2.4\r\ns=-\r\nc=IN IP4 192.0.2.4\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 0\r\na=key-mgmt:host-identity-tag 2001:20::b\r\n";

fn trust() -> &'static Trust {
    static T: OnceLock<Trust> = OnceLock::new();
    T.get_or_init(|| {
        let key = SigningKey::from_scalar(&[7; 32]).expect("fixed scalar");
        let mut t = Trust::default();
        t.insert("atlanta.com", key.verifying_key());
        t
    })
}

/// HI → HIT as the agent's daemon does it (hip-proto's ORCHID).
fn derive_hit(hi: &[u8]) -> Result<Hit, String> {
    let (alg, key) = hi.split_first_chunk::<2>().ok_or("short")?;
    let id = hip_proto::HostId::from_hi_bytes(u16::from_be_bytes(*alg), key)
        .map_err(|e| e.to_string())?;
    Ok(Hit(id.hit().0))
}

/// What the agent does with SDP a peer sent, and the Identity of the request that carried it.
fn check_remote(body: &[u8], auth: Option<&hip_sip::sip::RequestAuth>) {
    let hits: Vec<Hit> = match Sdp::parse_bytes(body) {
        Ok(s) => match sdp::find_identities(&s, &derive_hit) {
            Ok(ids) => ids.iter().map(|e| e.hit).collect(),
            Err(_) => return,
        },
        Err(_) => return,
    };
    if let Some(auth) = auth {
        let exp = Expected {
            from_uri: &auth.from_uri,
            to_uri: &auth.to_uri,
            sdp_hits: &hits,
            now: NOW_UNIX,
            window: 60,
        };
        let _ = identity::verify_any(&auth.identity, trust(), &exp);
    }
}

/// The header lines named `name` (or its compact form) of a message, folding included.
fn header_lines(msg: &[u8], name: &str, compact: Option<u8>) -> Vec<u8> {
    let head_end = memmem::find(msg, b"\r\n\r\n").unwrap_or(msg.len());
    let mut out = Vec::new();
    let mut taking = false;
    for line in msg[..head_end].split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if matches!(line.first(), Some(b' ' | b'\t')) {
            if taking {
                out.extend_from_slice(line);
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        let n = line.split(|&b| b == b':').next().unwrap_or_default();
        let n = n.trim_ascii();
        taking = n.eq_ignore_ascii_case(name.as_bytes())
            || (n.len() == 1 && compact.is_some_and(|c| n[0].eq_ignore_ascii_case(&c)));
        if taking {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    // The placeholder stands for whole lines without the final CRLF.
    if out.ends_with(b"\r\n") {
        out.truncate(out.len() - 2);
    }
    out
}

fn replace_all(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    for at in memmem::find_iter(hay, needle) {
        out.extend_from_slice(&hay[i..at]);
        out.extend_from_slice(with);
        i = at + needle.len();
    }
    out.extend_from_slice(&hay[i..]);
    out
}

/// Expands SIPp-style keywords against the last message the UA sent.
fn expand(msg: &[u8], last_sent: &[u8]) -> Vec<u8> {
    if memchr::memchr(b'[', msg).is_none() {
        return msg.to_vec();
    }
    let mut m = msg.to_vec();
    for (key, name, compact) in [
        (&b"[last_Via:]"[..], "Via", Some(b'v')),
        (b"[last_From:]", "From", Some(b'f')),
        (b"[last_To:]", "To", Some(b't')),
        (b"[last_Call-ID:]", "Call-ID", Some(b'i')),
        (b"[last_CSeq:]", "CSeq", None),
    ] {
        if memmem::find(&m, key).is_some() {
            m = replace_all(&m, key, &header_lines(last_sent, name, compact));
        }
    }
    if memmem::find(&m, b"[len]").is_some() {
        // The keyword stands in the head, so replacing it leaves the body's length as is.
        let body = memmem::find(&m, b"\r\n\r\n").map_or(0, |e| m.len() - (e + 4));
        m = replace_all(&m, b"[len]", body.to_string().as_bytes());
    }
    m
}

/// Messages the UA builds itself must parse again (keep-alives aside). Its lenient 400 for a request the parser
/// refused copies the sender's raw Via/From/To/Call-ID/CSeq (RFC 3261 §8.2.6.2), so it can
/// only be as well-formed as they were: it is marked by its 399 Warning.
fn check_sent(data: &Bytes) {
    // RFC 5626 keep-alives: the double-CRLF ping to the registrar, the CRLF pong on a stream.
    if data[..] == b"\r\n\r\n"[..] || data[..] == b"\r\n"[..] {
        return;
    }
    assert!(
        data.starts_with(b"SIP/2.0 ") || memmem::find(data, b" SIP/2.0").is_some(),
        "not a SIP message: {:?}",
        String::from_utf8_lossy(data)
    );
    let lenient = memmem::find(data, b"Warning: 399 hip-agent").is_some();
    if !lenient && let Err(e) = parse_datagram(data.clone(), &Limits::stream()) {
        panic!(
            "the UA sent a message that does not parse ({e}):\n{}",
            String::from_utf8_lossy(data)
        );
    }
}

/// `HIP_FUZZ_TRACE=1` prints each session (to check what a seed reaches).
fn trace() -> bool {
    static T: OnceLock<bool> = OnceLock::new();
    *T.get_or_init(|| std::env::var_os("HIP_FUZZ_TRACE").is_some())
}

struct Session {
    ua: UserAgent,
    now: Instant,
    flags: u8,
    last_sent: Vec<u8>,
}

impl Session {
    fn drain(&mut self) {
        // Commands issued on events queue more to send and more events: until quiet.
        for _ in 0..16 {
            let mut quiet = true;
            while let Some(t) = self.ua.poll_transmit() {
                quiet = false;
                check_sent(&t.data);
                if trace() {
                    eprintln!("<< {:?}\n{}", t.dest, String::from_utf8_lossy(&t.data));
                }
                self.last_sent = t.data.to_vec();
            }
            while let Some(ev) = self.ua.poll_event() {
                quiet = false;
                if trace() {
                    eprintln!("event: {ev:?}");
                }
                self.on_event(ev);
            }
            if quiet {
                return;
            }
        }
    }

    /// What the agent's daemon does with an event, in short.
    fn on_event(&mut self, ev: Event) {
        let now = self.now;
        match ev {
            Event::IncomingCall {
                call,
                remote_sdp,
                auth,
            } => {
                if let Some(b) = &remote_sdp {
                    check_remote(b, Some(&auth));
                }
                let _ = self.ua.ring(now, call.handle, 180);
                if self.flags & ANSWER != 0 {
                    let _ = self
                        .ua
                        .answer(now, call.handle, Some(Bytes::from_static(OFFER)));
                } else if self.flags & REJECT != 0 {
                    let _ = self.ua.reject(now, call.handle, 486, "Busy Here");
                }
            }
            Event::RemoteSdp { sdp, auth, .. } => check_remote(&sdp, auth.as_ref()),
            Event::Answered { call, remote_sdp } => {
                if let Some(b) = &remote_sdp {
                    check_remote(b, None);
                }
                if self.flags & UPDATE != 0 {
                    let _ = self.ua.update(now, call.handle, Bytes::from_static(OFFER));
                }
            }
            Event::Confirmed { call } if self.flags & UPDATE != 0 => {
                let _ = self.ua.update(now, call.handle, Bytes::from_static(OFFER));
            }
            _ => {}
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.ua.handle_timeout(self.now);
        self.drain();
    }
}

fn hang_up_all(s: &mut Session) {
    for c in s.ua.calls() {
        let _ = s.ua.hangup(s.now, c.handle);
    }
    s.drain();
}

/// The raw parser on its own: one datagram, and the same bytes split on a stream.
fn raw_parse(msg: &[u8], cut: usize) {
    if let Ok(m) = parse_datagram(Bytes::copy_from_slice(msg), &Limits::datagram()) {
        let _ = parse_datagram(m.to_bytes(), &Limits::stream());
        let _ = (m.headers().len(), m.body().len());
    }
    let mut sp = StreamParser::new(Limits::stream());
    let cut = cut.min(msg.len());
    if sp.push(&msg[..cut]).is_ok() {
        let _ = sp.push(&msg[cut..]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let peer: SocketAddr = "192.0.2.9:5060".parse().unwrap();
    let mut cfg = UaConfig::new("bob", "biloxi.com", "192.0.2.4", 5060);
    cfg.ports.push((Transport::Tcp, 5060));
    cfg.ports.push((Transport::Tls, 5061));
    if flags & TIGHT_LIMITS != 0 {
        cfg.limits = hip_sip::sip::Limits {
            max_pending_incoming: 1,
            max_calls: 2,
            invites_per_source: 1,
            invite_burst_per_source: 1,
            max_message_bytes: 600,
            stream_message_timeout: Duration::from_secs(2),
        };
    }
    if flags & REGISTER != 0 {
        cfg.registrar = Some((Transport::Udp, peer));
        cfg.password = Some("secret".into());
    }
    let mut s = Session {
        ua: UserAgent::new(cfg),
        now: Instant::now(),
        flags,
        last_sent: Vec::new(),
    };
    let now = s.now;
    if flags & REGISTER != 0 {
        s.ua.register(now).expect("registrar configured");
    }
    if flags & PLACE_CALL != 0 {
        s.ua.call(now, "sip:alice@192.0.2.9", Some(Bytes::from_static(OFFER)))
            .expect("IP-literal target");
    }
    if flags & OPTIONS != 0 {
        s.ua.options(now, "sip:alice@192.0.2.9")
            .expect("IP-literal target");
    }
    s.drain();

    let mut steps = Vec::new();
    let mut rest = rest;
    while steps.len() < MAX_STEPS {
        match memmem::find(rest, STEP_SEP) {
            Some(p) => {
                steps.push(&rest[..p]);
                rest = &rest[p + STEP_SEP.len()..];
            }
            None => {
                steps.push(rest);
                break;
            }
        }
    }
    for step in steps {
        let Some((&how, msg)) = step.split_first() else {
            continue;
        };
        let wait = u64::from((how >> 1) & 7);
        if wait > 0 {
            s.advance(Duration::from_millis(400 * wait));
        }
        let msg = expand(msg, &s.last_sent);
        if trace() {
            eprintln!(">> ({how:#04x})\n{}", String::from_utf8_lossy(&msg));
        }
        raw_parse(&msg, usize::from(how >> 4) * 16);
        let now = s.now;
        if how & 1 == 0 {
            s.ua.handle_datagram(now, Transport::Udp, peer, &msg);
        } else {
            // Split in two on the stream, as TCP may deliver it.
            let cut = usize::from(how >> 4) * msg.len() / 16;
            let ok =
                s.ua.handle_stream(now, Transport::Tcp, ConnId(1), peer, &msg[..cut])
                    && s.ua
                        .handle_stream(now, Transport::Tcp, ConnId(1), peer, &msg[cut..]);
            if !ok {
                // RFC 3261 §18.3: framing lost; the driver closes the connection.
                s.ua.connection_closed(ConnId(1));
            }
        }
        s.drain();
        if flags & HANG_UP != 0 {
            hang_up_all(&mut s);
        }
    }

    // The session is over: the driver hangs up whatever is left (an unanswered incoming
    // call too: a UAS core never gives up on its own, RFC 3261 §13.3.1.1), then every
    // timer runs out: 10 simulated minutes, past 64·T1 and Timers D/K.
    hang_up_all(&mut s);
    // In steps of at least 10 s, as before, but straight to the next timer when nothing is
    // due sooner (most sessions have none or a few left: this was most of an execution).
    let end = s.now + Duration::from_secs(600);
    while s.now < end {
        let step = s.now + Duration::from_secs(10);
        let next = s.ua.poll_timeout().map_or(end, |t| t.max(step)).min(end);
        let by = next - s.now;
        s.advance(by);
    }
    // A registration refreshes itself (every second if the registrar said so); anything
    // else must be gone by now.
    if flags & REGISTER == 0 {
        assert_eq!(
            s.ua.transaction_count(),
            (0, 0),
            "transactions left after all timers ran out"
        );
        assert_eq!(
            s.ua.calls(),
            Vec::new(),
            "calls left after hang-up and timeouts"
        );
    }
});
