//! A SIP user agent core (RFC 3261), sans-IO.
//!
//! [`UserAgent`] owns the transactions (RFC 3261 §17 with RFC 6026, from `sipx-sip`),
//! the dialogs (§12), registration (§10) and digest authentication (RFC 8760). It never
//! reads a clock or touches a socket. The driver (the agent's SIP service):
//!
//! 1. feeds received bytes with [`UserAgent::handle_datagram`] / [`UserAgent::handle_stream`],
//!    fired timers with [`UserAgent::handle_timeout`], and commands (`call`, `answer`,
//!    `hangup`, `register`, …), each with the current time;
//! 2. then drains [`UserAgent::poll_transmit`] (bytes to put on the wire),
//!    [`UserAgent::poll_event`] (what happened) and arms one timer at
//!    [`UserAgent::poll_timeout`].
//!
//! `sipx-sip` is used behind this interface only: its messages and transaction keys do not
//! appear in the public API, so it can be patched or replaced without touching the agent.
//!
//! Limits, by design: no DNS (RFC 3263) in the core — next hops must be IP literals (the
//! driver resolves configured proxy names once); loose routing only (`;lr`, RFC 3261 §16.12);
//! no 100rel/PRACK; no forking of our own INVITEs.

mod admission;
mod digest;
pub mod edge;
mod malformed;
mod nat;
mod timers;
mod ua;

#[cfg(test)]
mod tests;

use std::{fmt, net::SocketAddr, time::Duration};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use admission::{AdmissionStats, Limits};
pub use digest::{DigestAlgorithm, DigestChallenge, digest_response};
pub use nat::KeepAlive;
pub use ua::{KeepAliveStatus, UserAgent};

/// A SIP transport (RFC 3261 §18; TLS per §26.2 for `sips:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP: unreliable, so the transactions retransmit.
    Udp,
    /// TCP: reliable; messages framed by Content-Length.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// The token used in `Via` (RFC 3261 §20.42).
    pub fn via_token(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
        }
    }

    /// Whether the transport delivers reliably (decides the §17 timer columns).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Self::Udp)
    }

    /// Default port: 5060, or 5061 for TLS (RFC 3261 §19.1.2).
    pub fn default_port(self) -> u16 {
        match self {
            Self::Tls => 5061,
            _ => 5060,
        }
    }

    fn from_token(t: &[u8]) -> Option<Self> {
        match t.to_ascii_uppercase().as_slice() {
            b"UDP" => Some(Self::Udp),
            b"TCP" => Some(Self::Tcp),
            b"TLS" => Some(Self::Tls),
            _ => None,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.via_token())
    }
}

/// Identifies one stream connection of the driver (TCP or TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Where bytes go: a transport, an address, and for streams the connection the driver
/// should use if it still exists (responses go back on the connection the request came
/// in on, RFC 3261 §18.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dest {
    /// The transport.
    pub transport: Transport,
    /// The peer's address.
    pub addr: SocketAddr,
    /// The stream connection to use, if any.
    pub conn: Option<ConnId>,
}

/// Bytes for the driver to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// Where to.
    pub dest: Dest,
    /// One complete SIP message.
    pub data: Bytes,
}

/// A call as seen by the agent (the handle is local, not the Call-ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CallHandle(pub u64);

impl fmt::Display for CallHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who started the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// We sent the INVITE (UAC).
    Outgoing,
    /// We received the INVITE (UAS).
    Incoming,
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallState {
    /// INVITE sent, no answer yet / INVITE received, not answered.
    Initiating,
    /// A provisional response with a To tag (early dialog, RFC 3261 §12.1).
    Early,
    /// 2xx sent, waiting for the ACK (UAS only).
    Answered,
    /// Dialog confirmed: ACK sent (UAC) or received (UAS).
    Confirmed,
    /// BYE or CANCEL sent, waiting for its answer.
    Terminating,
}

/// What the agent knows about a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallInfo {
    /// Local handle.
    pub handle: CallHandle,
    /// Who started it.
    pub direction: Direction,
    /// Where it is.
    pub state: CallState,
    /// The Call-ID (RFC 3261 §8.1.1.4).
    pub call_id: String,
    /// Our URI (From of our INVITE, or To of theirs).
    pub local_uri: String,
    /// The peer's URI (To of our INVITE, or From of theirs): the identity the HIT is bound to.
    pub remote_uri: String,
    /// The peer's Contact (remote target), once known.
    pub remote_target: Option<String>,
    /// The transport of our hop: to the first hop for a call we placed, the one the INVITE
    /// arrived on for a call we answered.
    pub transport: Transport,
    /// Whether the Request-URI is a SIPS URI (RFC 3261 §26.2.2: TLS on every hop).
    pub sips: bool,
}

/// What a received request offers to authenticate its sender and its SDP (the draft's §4):
/// its SIP Identity headers (RFC 8224) and how it reached us (for SIPS, §4.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestAuth {
    /// Every `Identity` header value, in order (RFC 8224 §4 allows several).
    pub identity: Vec<String>,
    /// The request's From URI.
    pub from_uri: String,
    /// The request's To URI.
    pub to_uri: String,
    /// The transport it arrived on.
    pub transport: Option<Transport>,
    /// Whether its Request-URI is a SIPS URI.
    pub sips: bool,
}

/// Why a call ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum EndReason {
    /// We sent BYE (and it was answered or timed out).
    LocalBye,
    /// The peer sent BYE.
    RemoteBye,
    /// The INVITE got a final non-2xx response.
    Rejected {
        /// Status code.
        status: u16,
        /// Reason phrase.
        reason: String,
    },
    /// We rejected the peer's INVITE.
    LocalReject {
        /// Status code we sent.
        status: u16,
    },
    /// CANCEL ended the INVITE before it was answered (either side).
    Cancelled,
    /// No final response within 64·T1 (Timer B), or no ACK for our 2xx (RFC 3261 §13.3.1.4).
    Timeout,
    /// The transport reported a failure.
    TransportError,
}

/// What happened, for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// REGISTER got a 2xx (RFC 3261 §10.2.4); refresh is scheduled internally.
    Registered {
        /// Granted expiry in seconds.
        expires: u32,
    },
    /// REGISTER failed (final non-2xx after authentication, or timeout).
    RegistrationFailed {
        /// Status code, or `None` on timeout/transport error.
        status: Option<u16>,
        /// Reason phrase or cause.
        reason: String,
    },
    /// A new INVITE arrived. Answer with [`UserAgent::ring`], [`UserAgent::answer`] or
    /// [`UserAgent::reject`].
    IncomingCall {
        /// The call.
        call: CallInfo,
        /// The offer, if the INVITE had a body.
        remote_sdp: Option<Bytes>,
        /// The INVITE's Identity headers and transport.
        auth: RequestAuth,
    },
    /// 180 Ringing (or another 1xx > 100) for our INVITE.
    Ringing {
        /// The call.
        call: CallHandle,
        /// Status code (180, 183…).
        status: u16,
    },
    /// Our INVITE got a 2xx and the ACK went out: dialog confirmed on our side.
    Answered {
        /// The call (state `Confirmed`).
        call: CallInfo,
        /// The answer SDP.
        remote_sdp: Option<Bytes>,
    },
    /// The ACK for our 2xx arrived: dialog confirmed on our side.
    Confirmed {
        /// The call.
        call: CallInfo,
    },
    /// New SDP from the peer inside the dialog (UPDATE, RFC 3311, or re-INVITE); we answered
    /// it with our current SDP.
    RemoteSdp {
        /// The call.
        call: CallHandle,
        /// The new SDP.
        sdp: Bytes,
        /// The request that carried it (UPDATE or re-INVITE from the peer); `None` when it
        /// came in the answer to our own UPDATE.
        auth: Option<RequestAuth>,
    },
    /// Our UPDATE (RFC 3311) got its final response, or timed out.
    UpdateResult {
        /// The call.
        call: CallHandle,
        /// Final status, `None` on timeout or transport error.
        status: Option<u16>,
    },
    /// The call is over; its handle is no longer valid.
    Ended {
        /// The call (last known state).
        call: CallInfo,
        /// Why.
        reason: EndReason,
    },
    /// An out-of-dialog OPTIONS we sent was answered (or not).
    OptionsResult {
        /// The id [`UserAgent::options`] returned.
        id: u64,
        /// Status code, `None` on timeout.
        status: Option<u16>,
    },
    /// Input that could not be used: answered with an error or dropped.
    BadInput {
        /// Who sent it.
        peer: SocketAddr,
        /// Status sent back (400, 481, 483…), or `None` when dropped.
        answered: Option<u16>,
        /// What was wrong.
        reason: String,
    },
}

/// RFC 3261 §17 timer constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerConfig {
    /// RTT estimate (default 500 ms).
    #[serde(with = "millis")]
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses (4 s).
    #[serde(with = "millis")]
    pub t2: Duration,
    /// Maximum time a message stays in the network (5 s).
    #[serde(with = "millis")]
    pub t4: Duration,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The user agent's identity and where it sends things.
#[derive(Debug, Clone)]
pub struct UaConfig {
    /// User part of our address of record (`sip:user@domain`).
    pub user: String,
    /// Domain of our address of record.
    pub domain: String,
    /// Display name for From.
    pub display_name: Option<String>,
    /// Digest username (defaults to `user`).
    pub auth_user: Option<String>,
    /// Digest password; without it challenges fail the request.
    pub password: Option<String>,
    /// Outbound proxy for requests outside a dialog (RFC 3261 §8.1.2).
    pub outbound_proxy: Option<(Transport, SocketAddr)>,
    /// Registrar (REGISTER goes here; defaults to the outbound proxy).
    pub registrar: Option<(Transport, SocketAddr)>,
    /// Requested registration lifetime in seconds.
    pub register_expires: u32,
    /// Host written in Via and Contact (an IP literal the peers can reach).
    pub contact_host: String,
    /// Our listening port for each transport we have.
    pub ports: Vec<(Transport, u16)>,
    /// Transaction timers.
    pub timers: TimerConfig,
    /// `User-Agent`/`Server` header value.
    pub user_agent: String,
    /// Seed for tags, branches and Call-IDs (the driver passes OS randomness; tests a constant).
    pub seed: u64,
    /// Caps on what unauthenticated requests may make us hold and send.
    pub limits: Limits,
    /// Keep-alives on the registration flow, so a NAT keeps its binding (RFC 5626 §4.4.1).
    pub keepalive: KeepAlive,
}

impl UaConfig {
    /// A minimal config for `user@domain` on UDP `host:port`.
    pub fn new(user: &str, domain: &str, contact_host: &str, udp_port: u16) -> Self {
        Self {
            user: user.into(),
            domain: domain.into(),
            display_name: None,
            auth_user: None,
            password: None,
            outbound_proxy: None,
            registrar: None,
            register_expires: 3600,
            contact_host: contact_host.into(),
            ports: vec![(Transport::Udp, udp_port)],
            timers: TimerConfig::default(),
            user_agent: concat!("hip-agent/", env!("CARGO_PKG_VERSION")).into(),
            seed: 0,
            limits: Limits::default(),
            keepalive: KeepAlive::Rfc5626,
        }
    }
}

/// Errors of the SIP core's commands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SipError {
    /// A URI given by the operator does not parse (RFC 3261 §19.1).
    #[error("invalid SIP URI {0:?}")]
    BadUri(String),
    /// No next hop: no outbound proxy and the target host is not an IP literal (no DNS here).
    #[error("no route to {0}: configure an outbound proxy or use an IP address")]
    NoRoute(String),
    /// The call handle is unknown or the call is over.
    #[error("no such call {0}")]
    NoSuchCall(CallHandle),
    /// The command does not fit the call's state (e.g. answering an outgoing call).
    #[error("call {call} is {state:?}: cannot {what}")]
    WrongState {
        /// The call.
        call: CallHandle,
        /// Its state.
        state: CallState,
        /// What was attempted.
        what: &'static str,
    },
    /// No registrar or outbound proxy is configured.
    #[error("no registrar configured")]
    NoRegistrar,
    /// We have no listening port for the transport needed.
    #[error("no local {0} transport configured")]
    NoTransport(Transport),
    /// A header value would not build (CR/LF injection guard of sipx-sip).
    #[error("cannot build message: {0}")]
    Build(String),
    /// The status code is not a final error status (300–699).
    #[error("status {0} is not a final non-2xx status")]
    BadStatus(u16),
}
