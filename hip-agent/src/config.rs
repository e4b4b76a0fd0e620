//! The daemon's TOML configuration (`hip-agent run --config FILE`).
//!
//! Every table is `deny_unknown_fields`: a misspelt key is an error naming the key and its
//! line, never a silently ignored setting. The `[hip]`, `[kernel]` and `[datapath]` tables
//! exist (empty) so that they are accepted now; their fields are added by the subsystems
//! that own them.
//!
//! ```toml
//! identity = "/etc/hip/identity.pem"   # or: hit = "2001:20::1" (no HI sent then)
//! pool = "/var/lib/hip/pool.json"
//! control_socket = "/run/hip/agent.sock"
//!
//! [sip]
//! user = "alice"
//! domain = "atlanta.com"
//! password = "secret"
//! outbound_proxy = "udp:192.0.2.2:5060"
//! contact_host = "192.0.2.1"
//! listen = ["udp:0.0.0.0:5060", "tcp:0.0.0.0:5060"]
//!
//! [sip.answer]
//! mode = "auto"        # auto | reject | manual
//!
//! [sip.sdp]
//! form = "key-mgmt"    # key-mgmt | k
//!
//! [security]           # the draft's §4: what authenticates the HITs in SDP
//! identity_key = "/etc/hip/atlanta.com-es256.pem"   # sign our SDP (RFC 8224 Identity)
//! identity_info = "https://atlanta.com/cert.pem"
//! trusted_identities = { "biloxi.com" = "/etc/hip/biloxi.com-es256.pub.pem" }
//! trust_sips_proxies = false
//!
//! [dns]                # Host Identities in DNS (RFC 8005), see `DnsSection`
//! server = "192.0.2.53:53"
//! zone = "hip.example."
//! name = "alice.hip.example."
//! tsig_key = "/etc/hip/alice.tsig"
//! trust_anchor = "/etc/hip/hip.example.dnskey"
//! peers = { "sip:bob@biloxi.com" = "bob.hip.example." }
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
};

use hip_sip::{
    sdp::{Form, Hit, HitFormat, IdentityPolicy},
    sip::{TimerConfig, Transport},
};
use serde::{Deserialize, Deserializer};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type (the message names the key
    /// and the line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message.
        message: String,
    },
    /// Values that parse but do not fit together.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// `transport:address:port`, e.g. `udp:192.0.2.2:5060` or `tls:[2001:db8::1]:5061`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportAddr {
    /// The transport.
    pub transport: Transport,
    /// The socket address.
    pub addr: SocketAddr,
}

impl FromStr for TransportAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (transport, a) = split_transport(s)?;
        let addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address with a port"))?;
        Ok(Self { transport, addr })
    }
}

/// `transport:rest` → the transport and `rest`.
fn split_transport(s: &str) -> Result<(Transport, &str), String> {
    let (t, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected transport:address:port"))?;
    let transport = match t.to_ascii_lowercase().as_str() {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        other => {
            return Err(format!(
                "{s:?}: unknown transport {other:?} (udp, tcp, tls)"
            ));
        }
    };
    Ok((transport, rest))
}

impl TransportAddr {
    /// Like [`FromStr`], but the host may also be a DNS name (`udp:proxy.atlanta.com:5060`),
    /// resolved now through the system resolver (A/AAAA; the first address wins). RFC
    /// 3263's NAPTR and SRV steps are not done: the transport and port are the ones given.
    pub fn resolve(s: &str) -> Result<Self, String> {
        if let Ok(t) = s.parse() {
            return Ok(t);
        }
        let (transport, rest) = split_transport(s)?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected transport:host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .map_err(|e| format!("{s:?}: cannot resolve {host:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{s:?}: {host:?} has no address"))?;
        Ok(Self { transport, addr })
    }
}

/// `outbound_proxy` and `registrar`: a [`TransportAddr`] whose host may be a DNS name.
fn de_resolved<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TransportAddr>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|s| TransportAddr::resolve(&s))
        .transpose()
        .map_err(serde::de::Error::custom)
}

impl fmt::Display for TransportAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.transport.via_token().to_ascii_lowercase(),
            self.addr
        )
    }
}

impl<'de> Deserialize<'de> for TransportAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn de_hit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Hit>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| {
        s.parse::<Hit>()
            .map_err(|e| serde::de::Error::custom(format!("hit {s:?}: {e}")))
    })
    .transpose()
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our Host Identity key file (PKCS#8 PEM, `hip_proto::keyfile`). Its HIT and HI are
    /// what we put in SDP.
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// Our HIT when no identity file is given (only the HIT is sent then).
    #[serde(default, deserialize_with = "de_hit")]
    pub hit: Option<Hit>,
    /// The known-HITs pool file (JSON, written atomically).
    #[serde(default = "default_pool")]
    pub pool: PathBuf,
    /// The control socket (root-only, mode 0600).
    #[serde(default = "default_socket")]
    pub control_socket: PathBuf,
    /// SIP account, transports and call policy.
    pub sip: SipSection,
    /// HIP settings (filled in by the HIP integration).
    #[serde(default)]
    pub hip: HipSection,
    /// Kernel IPsec settings (filled in by the kernel integration).
    #[serde(default)]
    pub kernel: KernelSection,
    /// eBPF datapath settings (filled in by the datapath integration).
    #[serde(default)]
    pub datapath: DatapathSection,
    /// How SIP protects the HITs in SDP (the draft's §4): SIP Identity keys, SIPS trust.
    #[serde(default)]
    pub security: SecuritySection,
    /// Host Identities in DNS (RFC 8005): publishing ours, checking peers' (absent: off).
    #[serde(default)]
    pub dns: Option<DnsSection>,
    /// Caps that keep the agent's state and output bounded under unauthenticated load.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Edge mode: the SIP proxy for local phones (absent: off).
    #[serde(default)]
    pub edge: Option<EdgeSection>,
    /// The operator's metrics endpoint (Prometheus/OpenMetrics text; absent: off).
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// `[edge]`: the agent as the SIP edge of local user agents (softphones, a PBX trunk),
/// a transaction-stateful proxy (`hip_sip::sip::edge`, the agent's `edge` module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSection {
    /// Where the phones (and, through Path and Record-Route, the network) reach the
    /// edge: `udp:` or `tcp:` addresses, ports given (not those of `[sip] listen`).
    pub listen: Vec<TransportAddr>,
    /// The networks whose user agents the edge serves (`192.0.2.4`, `fd00::/64`,
    /// `127.0.0.0/8`). Requests from elsewhere are forwarded only to these.
    pub clients: Vec<String>,
    /// The phones' real outbound proxy or registrar (a name is resolved at start-up).
    #[serde(deserialize_with = "de_resolved_required")]
    pub next_hop: TransportAddr,
    /// A call from a peer whose offer has no HIT: `refuse` (default, 488 with the
    /// reason) or `clear` (passes unprotected; the phone is told).
    #[serde(default)]
    pub inbound_without_hit: hip_sip::sip::edge::NoHitPolicy,
    /// A call of our phone answered without a HIT: `refuse` (default) or `clear`.
    #[serde(default)]
    pub outbound_without_hit: hip_sip::sip::edge::NoHitPolicy,
    /// Send the phone a SIP MESSAGE with the call's verification level and short
    /// authentication string when it becomes known (default true).
    #[serde(default = "yes")]
    pub notify_phone: bool,
    /// Start HIP while the phone rings, so that the SAs are in place when the call is
    /// answered and its first word is not lost (default true). As callee, the caller's
    /// HITs from the INVITE's offer may initiate from then on, not only once our phone
    /// answers; as caller, an I1 to the null HIT goes to the far agent's locator on its
    /// first ringing response, and the responder is checked against the answer's HIT
    /// (nothing rests on it before). `false`: HIP starts at the answer.
    #[serde(default = "yes")]
    pub early_hip: bool,
}

impl EdgeSection {
    /// The client networks, parsed.
    pub fn networks(&self) -> Result<Vec<hip_sip::sip::edge::Net>, String> {
        self.clients.iter().map(|c| c.parse()).collect()
    }

    fn validate(&self, sip_listen: &[TransportAddr]) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err(
                "[edge] listen is empty: give the address(es) the phones use as outbound proxy"
                    .into(),
            );
        }
        for l in &self.listen {
            if l.transport == Transport::Tls {
                return Err(format!(
                    "[edge] listen {l}: TLS is not supported by the edge yet (udp, tcp)"
                ));
            }
            if l.addr.port() == 0 || l.addr.ip().is_unspecified() {
                return Err(format!(
                    "[edge] listen {l}: give an address and a port (Record-Route and Path name them)"
                ));
            }
            if sip_listen.iter().any(|s| {
                s.transport == l.transport
                    && s.addr.port() == l.addr.port()
                    && (s.addr.ip() == l.addr.ip() || s.addr.ip().is_unspecified())
            }) {
                return Err(format!("[edge] listen {l}: [sip] listen already uses it"));
            }
        }
        let nets = self
            .networks()
            .map_err(|e| format!("[edge] clients: {e}"))?;
        if nets.is_empty() {
            return Err("[edge] clients is empty: name the phones' addresses or networks".into());
        }
        if let Some(n) = nets.iter().find(|n| n.to_string().ends_with("/0")) {
            return Err(format!(
                "[edge] clients: {n} would serve everyone: the edge must never be an open relay"
            ));
        }
        if self.next_hop.transport == Transport::Tls {
            return Err("[edge] next_hop: TLS is not supported by the edge yet (udp, tcp)".into());
        }
        Ok(())
    }
}

fn de_resolved_required<'de, D: Deserializer<'de>>(d: D) -> Result<TransportAddr, D::Error> {
    let s = String::deserialize(d)?;
    TransportAddr::resolve(&s).map_err(serde::de::Error::custom)
}

/// `[metrics]`: an HTTP endpoint serving `GET /metrics` in the Prometheus text format
/// (OpenMetrics when the scraper asks for it), with what `status`, `assoc`, `xfrm` and
/// `flows` show. Every metric is documented in `hip-agent/src/metrics.rs`. The endpoint
/// has no authentication and names peers' HITs: bind it to loopback or a management
/// address, never a wildcard.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `ADDRESS:PORT` to serve on, e.g. `127.0.0.1:9464` (absent: no endpoint).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[limits]`: what an unauthenticated sender can make the agent hold or send. Every cap
/// has a counter in `status` (`limits`), so an operator sees when one bites.
///
/// The defaults suit a host with a few phones or a small PBX; raise them for a busy
/// trunk. A refused INVITE gets one stateless `503 Service Unavailable` with
/// `Retry-After` (no transaction, no retransmission).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Incoming calls not yet confirmed by an ACK, at once (a forged source never ACKs,
    /// so these are the calls an attacker can hold).
    #[serde(default = "default_pending_calls")]
    pub max_pending_incoming_calls: usize,
    /// Calls in every state, at once.
    #[serde(default = "default_max_calls")]
    pub max_calls: usize,
    /// New INVITEs admitted per second from one source address (sustained).
    #[serde(default = "default_invite_rate")]
    pub invites_per_source_per_sec: u32,
    /// Burst of new INVITEs from one source address.
    #[serde(default = "default_invite_burst")]
    pub invite_burst_per_source: u32,
    /// HIP associations held at once, in every state (the responder refuses new peers
    /// beyond it before any state or SPI exists for them).
    #[serde(default = "default_max_assocs")]
    pub max_associations: usize,
    /// TCP/TLS connections at once, accepted and opened.
    #[serde(default = "default_max_conns")]
    pub max_connections: usize,
    /// Accepted TCP/TLS connections at once from one source address.
    #[serde(default = "default_max_conns_per_source")]
    pub max_connections_per_source: usize,
    /// A TCP/TLS connection with no byte received for this long is closed (RFC 5626
    /// keep-alives every 30 s or so keep a registered phone's connection open).
    #[serde(default = "default_idle_secs")]
    pub connection_idle_secs: u64,
    /// A SIP message begun on a connection must be complete within this time.
    #[serde(default = "default_message_secs")]
    pub message_timeout_secs: u64,
    /// Largest SIP message accepted on a connection (headers and body).
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
}

fn default_pending_calls() -> usize {
    64
}
fn default_max_calls() -> usize {
    1024
}
fn default_invite_rate() -> u32 {
    10
}
fn default_invite_burst() -> u32 {
    20
}
fn default_max_assocs() -> usize {
    1024
}
fn default_max_conns() -> usize {
    256
}
fn default_max_conns_per_source() -> usize {
    16
}
fn default_idle_secs() -> u64 {
    300
}
fn default_message_secs() -> u64 {
    10
}
fn default_max_message() -> usize {
    64 * 1024
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_pending_incoming_calls: default_pending_calls(),
            max_calls: default_max_calls(),
            invites_per_source_per_sec: default_invite_rate(),
            invite_burst_per_source: default_invite_burst(),
            max_associations: default_max_assocs(),
            max_connections: default_max_conns(),
            max_connections_per_source: default_max_conns_per_source(),
            connection_idle_secs: default_idle_secs(),
            message_timeout_secs: default_message_secs(),
            max_message_bytes: default_max_message(),
        }
    }
}

impl LimitsSection {
    /// The SIP core's part.
    pub fn sip(&self) -> hip_sip::sip::Limits {
        hip_sip::sip::Limits {
            max_pending_incoming: self.max_pending_incoming_calls,
            max_calls: self.max_calls,
            invites_per_source: self.invites_per_source_per_sec,
            invite_burst_per_source: self.invite_burst_per_source,
            max_message_bytes: self.max_message_bytes,
            stream_message_timeout: std::time::Duration::from_secs(self.message_timeout_secs),
        }
    }
}

/// `[dns]`: Host Identities in DNS (RFC 8005).
///
/// * **Publishing**: with `name` and `tsig_key`, the agent keeps its HIP RR (HIT, HI,
///   `rendezvous_servers`) at `name`: when it starts and then every `refresh_secs` it asks
///   `server` for the HIP RRset there (one plain query), and when that is not exactly its
///   record (first start, a new identity or new rendezvous servers, deleted or replaced
///   behind its back) it sends one RFC 2136 update signed with the TSIG key that replaces
///   the RRset. A refused update changes nothing; it is logged with its cause, counted in
///   `status` (`dns.publish.failures`, `last_error`) and tried again at the next check.
///   `hip-agent dns publish`, `withdraw` and `show` do the same by hand.
/// * **Checking peers**: the peer's DNS name comes from `peers` (its SIP URI → name) or
///   else from `peer_name_template` — both derived from the identity the call is with, never
///   from Contact or Record-Route, which whoever can rewrite the SDP can rewrite too (they
///   would point us at a name whose record they control). Its HIP RRset is looked up at
///   `resolver` (default `server`) in a task of its own, within `timeout_ms`, and validated
///   with DNSSEC from `trust_anchor`. Only a `secure` answer counts: its HITs containing the
///   HIT SIP carried make `dns` the mechanism that authenticated the peer; a secure record
///   with other HITs makes the call `failed`; `insecure`, `bogus` or `indeterminate` answers
///   (and timeouts) are noted in `status` and change nothing. Our own HIT counts as
///   protected through DNS when our own name's record is `secure` and carries our HIT.
/// * Lookups never hold a call up: HIP runs meanwhile. With `[security]
///   require_verified_peer`, a callee whose caller nothing else vouched for holds the
///   INVITE (no 180 yet) until DNS answers — within `timeout_ms`, and at most
///   `peer_verify_timeout_ms` — then rings or refuses it (428/438); a caller starts HIP when
///   DNS (or the callee's signed UPDATE) verified the callee, and hangs up when nothing has
///   within `peer_verify_timeout_ms` of the answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// The zone's primary server (`address:port`): updates go here, and lookups unless
    /// `resolver` is set.
    pub server: SocketAddr,
    /// Where lookups go (a validating setup needs a server that returns RRSIGs: the zone's
    /// authoritative server, or a recursive resolver).
    #[serde(default)]
    pub resolver: Option<SocketAddr>,
    /// The zone that `name` is in (the RFC 2136 zone section).
    #[serde(default)]
    pub zone: Option<String>,
    /// Our DNS name; publishing needs it and `tsig_key`.
    #[serde(default)]
    pub name: Option<String>,
    /// TSIG key file in BIND's syntax (`tsig-keygen NAME`), hmac-sha256/384/512.
    #[serde(default)]
    pub tsig_key: Option<PathBuf>,
    /// TTL of the published record, seconds.
    #[serde(default = "default_dns_ttl")]
    pub ttl: u32,
    /// Rendezvous servers put in our record (RFC 8005 §5.4), in order of preference.
    #[serde(default)]
    pub rendezvous_servers: Vec<String>,
    /// Publish at start-up (default: when `name` and `tsig_key` are set).
    #[serde(default)]
    pub publish: Option<bool>,
    /// How often the agent checks that the primary still holds exactly our record and
    /// publishes it again if not (deleted or replaced behind our back), seconds. Default:
    /// half the TTL (at least 1).
    #[serde(default)]
    pub refresh_secs: Option<u64>,
    /// DNSSEC trust anchor: a file of DNSKEY records (the zone's KSK, as BIND's `K….key`
    /// file has it). Without it no answer is `secure`, so DNS never raises a level.
    #[serde(default)]
    pub trust_anchor: Option<PathBuf>,
    /// Deadline of one lookup (all its queries and the validation), milliseconds.
    #[serde(default = "default_dns_timeout")]
    pub timeout_ms: u64,
    /// Peer SIP URI (`sip:user@domain`, no parameters) → DNS name of its HIP RR.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// For peers not in `peers`: a name made from the peer's URI, `{user}` and `{host}`
    /// replaced (e.g. `"{user}.hip.{host}."`). Unset: only `peers` are checked.
    #[serde(default)]
    pub peer_name_template: Option<String>,
}

fn default_dns_ttl() -> u32 {
    300
}

fn default_dns_timeout() -> u64 {
    2000
}

impl DnsSection {
    /// Publishing is on.
    pub fn publishes(&self) -> bool {
        self.publish
            .unwrap_or(self.name.is_some() && self.tsig_key.is_some())
    }

    /// Where lookups go.
    pub fn lookup_server(&self) -> SocketAddr {
        self.resolver.unwrap_or(self.server)
    }

    /// The interval of the check-and-republish of our record.
    pub fn refresh(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.refresh_secs
                .unwrap_or((u64::from(self.ttl) / 2).max(1)),
        )
    }

    fn validate(&self) -> Result<(), String> {
        let name_ok = |what: &str, n: &str| {
            hip_dns::Name::from_ascii(n)
                .map(|_| ())
                .map_err(|e| format!("[dns] {what} {n:?} is not a DNS name: {e}"))
        };
        if let Some(n) = &self.name {
            name_ok("name", n)?;
        }
        if let Some(z) = &self.zone {
            name_ok("zone", z)?;
        }
        for r in &self.rendezvous_servers {
            name_ok("rendezvous_servers entry", r)?;
        }
        for (uri, n) in &self.peers {
            name_ok(&format!("peers[{uri:?}]"), n)?;
        }
        if self.publishes() {
            let (Some(name), Some(zone)) = (&self.name, &self.zone) else {
                return Err("[dns] publishing needs `name`, `zone` and `tsig_key`".into());
            };
            if self.tsig_key.is_none() {
                return Err(
                    "[dns] publishing needs `tsig_key` (RFC 2136 updates are TSIG-signed)".into(),
                );
            }
            let (n, z) = (
                hip_dns::Name::from_ascii(name).map_err(|e| e.to_string())?,
                hip_dns::Name::from_ascii(zone).map_err(|e| e.to_string())?,
            );
            if !z.zone_of(&n) {
                return Err(format!("[dns] name {name} is not inside zone {zone}"));
            }
        }
        if self.timeout_ms == 0 || self.timeout_ms > 30_000 {
            return Err("[dns] timeout_ms must be 1..=30000".into());
        }
        if self.refresh_secs.is_some_and(|r| r == 0 || r > 86_400) {
            return Err("[dns] refresh_secs must be 1..=86400".into());
        }
        if let Some(t) = &self.peer_name_template
            && !t.contains("{user}")
            && !t.contains("{host}")
        {
            return Err("[dns] peer_name_template has neither {user} nor {host}".into());
        }
        Ok(())
    }
}

/// `[security]`: the draft's §4 — what vouches for the HIT each side put in its SDP.
///
/// * **SIP Identity** (RFC 8224, §4 and §4.1 of the draft): with `identity_key`, our
///   INVITEs carry an `Identity` header whose PASSporT binds our HIT (see
///   `hip_sip::identity` for the project-defined `hip` extension), and when we answer a
///   call we follow our 200 OK with a signed UPDATE carrying our SDP again, since a
///   response cannot carry RFC 8224 Identity. A peer's Identity is verified with the key
///   `trusted_identities` gives for the domain of its From URI; nothing is fetched from
///   its `info` URI.
/// * **SIPS** (§4.2): with `trust_sips_proxies`, a call whose Request-URI is `sips:` and
///   whose hop we see is TLS counts as protecting both HITs. TLS only protects hop by
///   hop: every proxy on the path can still change the SDP, so this trusts them all —
///   the draft's own caveat, repeated in `status`.
///
/// Keys are ES256 (P-256) PEM files, e.g. made with
/// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem` and
/// `openssl pkey -in key.pem -pubout -out pub.pem`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// Our domain's ES256 private key (PKCS#8 or SEC1 PEM, mode 0600); it signs for
    /// `[sip] domain`.
    #[serde(default)]
    pub identity_key: Option<PathBuf>,
    /// The `info` URI of our Identity headers (RFC 8224 §4: where our certificate is).
    #[serde(default)]
    pub identity_info: Option<String>,
    /// Domain → ES256 public key (SPKI PEM) trusted to sign for it.
    #[serde(default)]
    pub trusted_identities: BTreeMap<String, PathBuf>,
    /// How far a PASSporT's `iat` may be from our clock, seconds (RFC 8224 §6.2.2
    /// recommends 60).
    #[serde(default = "default_freshness")]
    pub identity_freshness_secs: u64,
    /// Count `sips:` calls over TLS as protecting both HITs (trusts every proxy, §4.2).
    #[serde(default)]
    pub trust_sips_proxies: bool,
    /// Refuse calls whose peer HIT nothing vouches for (no verified SIP Identity, no
    /// trusted SIPS): as the callee, answer such an INVITE with 428 Use Identity Header
    /// (438 Invalid Identity Header when its Identity does not verify, RFC 8224 §6.2.2);
    /// as the caller, start HIP only once the callee's HIT is verified (its §4.1 UPDATE)
    /// and hang up if that has not happened within `peer_verify_timeout_ms`.
    #[serde(default)]
    pub require_verified_peer: bool,
    /// How long a caller with `require_verified_peer` waits after the answer for the
    /// callee's HIT to be verified, milliseconds.
    #[serde(default = "default_verify_timeout")]
    pub peer_verify_timeout_ms: u64,
}

fn default_freshness() -> u64 {
    60
}

fn default_verify_timeout() -> u64 {
    5000
}

impl Default for SecuritySection {
    fn default() -> Self {
        Self {
            identity_key: None,
            identity_info: None,
            trusted_identities: BTreeMap::new(),
            identity_freshness_secs: default_freshness(),
            trust_sips_proxies: false,
            require_verified_peer: false,
            peer_verify_timeout_ms: default_verify_timeout(),
        }
    }
}

/// Default pool file.
pub fn default_pool() -> PathBuf {
    PathBuf::from("/var/lib/hip/pool.json")
}

/// Default control socket.
pub fn default_socket() -> PathBuf {
    PathBuf::from("/run/hip/agent.sock")
}

/// `[hip]`: the HIP base exchange (RFC 7401).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HipSection {
    /// Run HIP for calls. Needs an `identity` key file (a bare `hit` cannot sign).
    /// Default: on when `identity` is set.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Which initiators a responder accepts: `known` (HITs learned through SIP for a call
    /// we answered — the draft's known-HITs pool) or `opportunistic` (any).
    #[serde(default)]
    pub accept: AcceptPolicy,
    /// Our locator for HIP and ESP. Default: the address the kernel routes from towards
    /// the peer.
    #[serde(default)]
    pub locator: Option<IpAddr>,
    /// ESP transforms offered, preferred first (RFC 7402 suite names, see
    /// [`EspChoice`]).
    #[serde(default = "default_esp")]
    pub esp_transforms: Vec<EspChoice>,
    /// Address the initiator's I1 to the null HIT and check the responder's HI against
    /// the SIP-learned HIT on R1 (RFC 7401 §4.1.8). A mismatch is then reported at once
    /// as `HitMismatch`; with `false` the I1 goes to the learned HIT, and a responder
    /// that is not that HIT stays silent until the I1 retries run out.
    #[serde(default = "yes")]
    pub i1_to_null_hit: bool,
    /// What to do with a call whose peer fails HIP verification (HIT mismatch, failed
    /// exchange): `hangup` (BYE) or `keep` (the call stays up, flagged `failed`, and the
    /// fail-closed policies keep its media from leaving in clear text).
    #[serde(default)]
    pub on_failure: FailureAction,
    /// Puzzle difficulty K put in our R1s.
    #[serde(default)]
    pub puzzle_difficulty: Option<u8>,
    /// Dead peer detection: an established association whose inbound ESP has been silent
    /// this long (per the eBPF per-SPI counters) is checked with a liveness probe (UPDATE
    /// with ECHO_REQUEST_SIGNED); unanswered, it is removed and its calls are told. A
    /// new call to a peer we already hold an association with is always probed first.
    #[serde(default = "default_dpd_idle")]
    pub dead_peer_idle_secs: u64,
    /// Where our HOST_ID goes in I2 when we initiate (RFC 7401 §5.3.3 allows both):
    /// `clear` (default) or `encrypted` (inside ENCRYPTED, under the negotiated
    /// HIP_CIPHER). As responder we accept either.
    ///
    /// `clear` by default because independent implementations expect it (cutehip drops
    /// an I2 without a clear HOST_ID), and it weakens nothing the agent relies on: the HI
    /// is a public key, its hash is our HIT in every packet header (and in our SDP), and
    /// HIP_MAC and HIP_SIGNATURE protect the HOST_ID either way. `encrypted` only hides
    /// the key from a passive observer of the I2.
    #[serde(default)]
    pub host_id_in_i2: HostIdInI2,
    /// Put R1_COUNTER into our R1s (RFC 7401 §5.2.3, optional). Default `false`: cutehip
    /// crashes echoing it, and our responder never uses the echo — it finds the R1
    /// generation an I2 answers from the puzzle's #I, an HMAC under that generation's
    /// secret, which an initiator cannot forge. As initiator we echo an R1_COUNTER
    /// whenever a responder sends one.
    #[serde(default)]
    pub r1_counter: bool,
    /// HIP over UDP and UDP-encapsulated ESP (RFC 9028, the framing of its
    /// UDP-ENCAPSULATION mode), for hosts behind a NAT: `auto` (default) initiates over
    /// UDP when our address towards the peer is a private one (RFC 1918, RFC 6598 shared
    /// space, IPv6 ULA) and the peer's is not — a NAT is then on the path — and over raw
    /// HIP otherwise; `always` initiates over UDP; `never` opens no UDP socket. As
    /// responder the agent answers on whichever transport an I1 came (unless `never`).
    #[serde(default)]
    pub udp: UdpMode,
    /// The UDP port for HIP over UDP, ours and the peer's (RFC 9028 §4.1: 10500).
    #[serde(default = "default_udp_port")]
    pub udp_port: u16,
}

fn default_udp_port() -> u16 {
    hip_proto::endpoint::HIP_UDP_PORT
}

/// See [`HipSection::udp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UdpMode {
    /// UDP towards public peers from a private address; raw HIP otherwise.
    #[default]
    Auto,
    /// Always initiate over UDP.
    Always,
    /// No HIP over UDP at all.
    Never,
}

fn default_dpd_idle() -> u64 {
    30
}

/// See [`HipSection::host_id_in_i2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostIdInI2 {
    /// HOST_ID in the clear.
    #[default]
    Clear,
    /// HOST_ID inside ENCRYPTED.
    Encrypted,
}

impl Default for HipSection {
    fn default() -> Self {
        Self {
            enabled: None,
            accept: AcceptPolicy::default(),
            locator: None,
            esp_transforms: default_esp(),
            i1_to_null_hit: true,
            on_failure: FailureAction::default(),
            puzzle_difficulty: None,
            host_id_in_i2: HostIdInI2::default(),
            r1_counter: false,
            dead_peer_idle_secs: default_dpd_idle(),
            udp: UdpMode::default(),
            udp_port: default_udp_port(),
        }
    }
}

fn default_esp() -> Vec<EspChoice> {
    vec![EspChoice::AesGcm128, EspChoice::Aes128CbcHmacSha256]
}

/// Responder policy for I2s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcceptPolicy {
    /// Only HITs offered in the SDP of a call we answered.
    #[default]
    Known,
    /// Any initiator (opportunistic HIP).
    Opportunistic,
}

/// See [`HipSection::on_failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    /// End the call with BYE.
    #[default]
    Hangup,
    /// Keep the call, flagged.
    Keep,
}

/// ESP transforms hip can offer (RFC 7402 §5.1.2 suite IDs; the kernel names follow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EspChoice {
    /// Suite 8: `cbc(aes)` 128 + `hmac(sha256)` truncated to 128 bits.
    #[serde(rename = "aes-128-cbc-hmac-sha256")]
    Aes128CbcHmacSha256,
    /// Suite 13: `rfc4106(gcm(aes))` 128 with a 16-octet ICV.
    #[serde(rename = "aes-gcm-128")]
    AesGcm128,
    /// Suite 7: no encryption, `hmac(sha256)` — for debugging only.
    NullHmacSha256,
}

impl EspChoice {
    /// The RFC 7402 suite ID.
    pub const fn suite_id(self) -> u16 {
        match self {
            EspChoice::NullHmacSha256 => 7,
            EspChoice::Aes128CbcHmacSha256 => 8,
            EspChoice::AesGcm128 => 13,
        }
    }
}

/// `[kernel]`: XFRM BEET-mode ESP offload (RFC 7402).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// Install SAs and policies for established associations. With `false`, HIP still
    /// authenticates the peer but media is not protected by the kernel (for hosts without
    /// ESP; the start-up check tells when that is the case).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How HIT traffic is kept from leaving in clear text while SAs are missing:
    /// `per-peer` block policies (default) or one prefix-wide `guard`.
    #[serde(default)]
    pub fail_closed: hip_kernel::FailClosed,
    /// Anti-replay window in packets (at most 4096; RFC 4303 §3.4.3 prefers 64).
    #[serde(default = "default_replay")]
    pub replay_window: u32,
    /// Seconds after which the kernel asks for a rekey (soft expiry); 0: none.
    #[serde(default = "default_soft_secs")]
    pub soft_lifetime_secs: u64,
    /// Seconds after which the kernel deletes an SA (hard expiry); 0: none.
    #[serde(default = "default_hard_secs")]
    pub hard_lifetime_secs: u64,
    /// Octets after which a rekey is asked for; 0: none.
    #[serde(default)]
    pub soft_lifetime_bytes: u64,
    /// Octets after which an SA is deleted; 0: none.
    #[serde(default)]
    pub hard_lifetime_bytes: u64,
}

impl Default for KernelSection {
    fn default() -> Self {
        Self {
            enabled: true,
            fail_closed: hip_kernel::FailClosed::default(),
            replay_window: default_replay(),
            soft_lifetime_secs: default_soft_secs(),
            hard_lifetime_secs: default_hard_secs(),
            soft_lifetime_bytes: 0,
            hard_lifetime_bytes: 0,
        }
    }
}

fn default_replay() -> u32 {
    64
}
fn default_soft_secs() -> u64 {
    3300
}
fn default_hard_secs() -> u64 {
    3600
}

impl KernelSection {
    /// The SA lifetimes.
    pub fn lifetimes(&self) -> hip_kernel::Lifetimes {
        hip_kernel::Lifetimes {
            soft_secs: self.soft_lifetime_secs,
            hard_secs: self.hard_lifetime_secs,
            soft_bytes: self.soft_lifetime_bytes,
            hard_bytes: self.hard_lifetime_bytes,
        }
    }
}

/// `[datapath]`: the eBPF tc programs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathSection {
    /// Load the programs (needs `interfaces`).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Interfaces the programs attach to (the ones that carry ESP to peers).
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Where the maps are pinned (`bpftool map dump pinned DIR/NAME`).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Drop clear-text RTP towards addresses HIP has not verified (the draft's §1 DoS rule).
    #[serde(default = "yes")]
    pub media_guard: bool,
    /// UDP ports that carry RTP, `LOW-HIGH`.
    #[serde(default = "default_media_ports")]
    pub media_ports: String,
}

impl Default for DatapathSection {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
            pin_dir: default_pin_dir(),
            media_guard: true,
            media_ports: default_media_ports(),
        }
    }
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(hip_datapath::PIN_DIR)
}

fn default_media_ports() -> String {
    "16384-32767".into()
}

impl DatapathSection {
    /// The media port range.
    pub fn port_range(&self) -> Result<std::ops::RangeInclusive<u16>, String> {
        let (a, b) = self
            .media_ports
            .split_once('-')
            .ok_or_else(|| format!("media_ports {:?}: expected LOW-HIGH", self.media_ports))?;
        let (a, b): (u16, u16) = (
            a.trim()
                .parse()
                .map_err(|_| format!("media_ports: {a:?} is not a port"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("media_ports: {b:?} is not a port"))?,
        );
        if a == 0 || a > b {
            return Err(format!(
                "media_ports {}: need 0 < LOW <= HIGH",
                self.media_ports
            ));
        }
        Ok(a..=b)
    }
}

/// `[sip]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipSection {
    /// User part of our address of record.
    pub user: String,
    /// Domain of our address of record.
    pub domain: String,
    /// Display name in From.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Digest username (default: `user`).
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Digest password.
    #[serde(default)]
    pub password: Option<String>,
    /// Outbound proxy for calls and OPTIONS; its host may be a DNS name, resolved when the
    /// configuration is loaded.
    #[serde(default, deserialize_with = "de_resolved")]
    pub outbound_proxy: Option<TransportAddr>,
    /// Registrar (default: the outbound proxy); a name is resolved like the proxy's.
    #[serde(default, deserialize_with = "de_resolved")]
    pub registrar: Option<TransportAddr>,
    /// Register at start-up (needs a registrar or outbound proxy).
    #[serde(default)]
    pub register: bool,
    /// Requested registration lifetime, seconds.
    #[serde(default = "default_expires")]
    pub register_expires: u32,
    /// Keep-alives (double CRLF, RFC 5626 §3.5.1) to the registrar while registered, so a
    /// NAT on the way keeps its binding: absent, RFC 5626 §4.4.1's intervals (24–29 s over
    /// UDP, 95–120 s over TCP/TLS, or 80–100 % of the registrar's `Flow-Timer`); `0`, none;
    /// `N`, every N seconds.
    #[serde(default)]
    pub keepalive_secs: Option<u64>,
    /// The address peers reach us at (Via, Contact, SDP `c=`). Default: the first listen
    /// address if it is not a wildcard.
    #[serde(default)]
    pub contact_host: Option<IpAddr>,
    /// Where to listen.
    #[serde(default = "default_listen")]
    pub listen: Vec<TransportAddr>,
    /// TLS certificate and key for `tls:` listeners, and CA for verifying TLS peers.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// RFC 3261 timers T1/T2/T4 in milliseconds.
    #[serde(default)]
    pub timers: TimerConfig,
    /// What to do with incoming calls.
    #[serde(default)]
    pub answer: AnswerSection,
    /// What to put in SDP.
    #[serde(default)]
    pub sdp: SdpSection,
}

fn default_expires() -> u32 {
    3600
}

fn default_listen() -> Vec<TransportAddr> {
    vec![TransportAddr {
        transport: Transport::Udp,
        addr: SocketAddr::from(([0, 0, 0, 0], 5060)),
    }]
}

/// `[sip.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain for our TLS listener.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key for our TLS listener.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// PEM CA certificates trusted for TLS connections we open.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Server name to verify when connecting (default: the peer's IP address).
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Incoming-call policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerMode {
    /// 180 Ringing, then 200 OK after `ring_ms`.
    #[default]
    Auto,
    /// Reject with `reject_status`.
    Reject,
    /// 180 Ringing; the operator answers (`hip-agent answer`) or hangs up.
    Manual,
}

/// `[sip.answer]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerSection {
    /// The policy.
    #[serde(default)]
    pub mode: AnswerMode,
    /// Delay between 180 and 200 in `auto` mode, milliseconds.
    #[serde(default)]
    pub ring_ms: u64,
    /// Status for `reject` mode.
    #[serde(default = "default_reject")]
    pub reject_status: u16,
}

fn default_reject() -> u16 {
    486
}

impl Default for AnswerSection {
    fn default() -> Self {
        Self {
            mode: AnswerMode::Auto,
            ring_ms: 0,
            reject_status: default_reject(),
        }
    }
}

/// `[sip.sdp]`: the Host Identity policy plus our media description.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdpSection {
    /// Line form in offers: `key-mgmt` (default) or `k`.
    #[serde(default)]
    pub form: Form,
    /// Answer in the form the offer used (default true).
    #[serde(default = "yes")]
    pub mirror_offer_form: bool,
    /// `hex` (32 digits, default) or `ipv6`.
    #[serde(default)]
    pub hit_format: HitFormat,
    /// One line per media description (default, as in the draft) or one at session level.
    #[serde(default = "yes")]
    pub per_media: bool,
    /// Also send our HI (needs an identity file).
    #[serde(default)]
    pub send_hi: bool,
    /// RTP port we advertise.
    #[serde(default = "default_rtp")]
    pub rtp_port: u16,
}

fn yes() -> bool {
    true
}

fn default_rtp() -> u16 {
    16384
}

impl SdpSection {
    /// The policy for `hip_sip::sdp`.
    pub fn identity(&self) -> IdentityPolicy {
        IdentityPolicy {
            form: self.form,
            mirror_offer_form: self.mirror_offer_form,
            hit_format: self.hit_format,
            per_media: self.per_media,
            send_hi: self.send_hi,
        }
    }
}

impl Default for SdpSection {
    fn default() -> Self {
        let p = IdentityPolicy::default();
        Self {
            form: p.form,
            mirror_offer_form: p.mirror_offer_form,
            hit_format: p.hit_format,
            per_media: p.per_media,
            send_hi: p.send_hi,
            rtp_port: default_rtp(),
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text (`path` only labels errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |m: String| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: m,
            })
        };
        if self.identity.is_none() && self.hit.is_none() {
            return invalid(
                "set `identity` (key file) or `hit`: the agent needs its own HIT".into(),
            );
        }
        if self.sip.listen.is_empty() {
            return invalid("[sip] listen is empty".into());
        }
        let mut seen = Vec::new();
        for l in &self.sip.listen {
            if seen.contains(&l.transport) {
                return invalid(format!(
                    "[sip] listen: more than one {} listener",
                    l.transport
                ));
            }
            seen.push(l.transport);
        }
        if self
            .sip
            .listen
            .iter()
            .any(|l| l.transport == Transport::Tls)
            && self
                .sip
                .tls
                .as_ref()
                .is_none_or(|t| t.cert.is_none() || t.key.is_none())
        {
            return invalid("a tls: listener needs [sip.tls] cert and key".into());
        }
        if self.contact_host().is_none() {
            return invalid(
                "[sip] contact_host is needed when listening on a wildcard address".into(),
            );
        }
        if self.sip.register && self.sip.registrar.or(self.sip.outbound_proxy).is_none() {
            return invalid("[sip] register = true needs a registrar or outbound_proxy".into());
        }
        for (name, t) in [
            ("outbound_proxy", self.sip.outbound_proxy),
            ("registrar", self.sip.registrar),
        ] {
            if let Some(t) = t
                && !seen.contains(&t.transport)
            {
                return invalid(format!(
                    "[sip] {name} uses {} but there is no {} listener",
                    t.transport, t.transport
                ));
            }
        }
        if !(300..700).contains(&self.sip.answer.reject_status) {
            return invalid(format!(
                "[sip.answer] reject_status {} is not 300-699",
                self.sip.answer.reject_status
            ));
        }
        if self.sip.timers.t1.is_zero() || self.sip.timers.t2 < self.sip.timers.t1 {
            return invalid("[sip.timers] need t1 > 0 and t2 >= t1".into());
        }
        if self.hip.enabled == Some(true) && self.identity.is_none() {
            return invalid("[hip] enabled = true needs an `identity` key file (a bare `hit` cannot sign HIP packets)".into());
        }
        if let Some(d) = &self.dns
            && let Err(m) = d.validate()
        {
            return invalid(m);
        }
        if self.hip.esp_transforms.is_empty() {
            return invalid("[hip] esp_transforms is empty".into());
        }
        let l = &self.limits;
        for (name, v) in [
            ("max_pending_incoming_calls", l.max_pending_incoming_calls),
            ("max_calls", l.max_calls),
            ("max_associations", l.max_associations),
            ("max_connections", l.max_connections),
            ("max_connections_per_source", l.max_connections_per_source),
            (
                "invite_burst_per_source",
                l.invite_burst_per_source as usize,
            ),
            (
                "invites_per_source_per_sec",
                l.invites_per_source_per_sec as usize,
            ),
            ("connection_idle_secs", l.connection_idle_secs as usize),
            ("message_timeout_secs", l.message_timeout_secs as usize),
        ] {
            if v == 0 {
                return invalid(format!("[limits] {name} must be at least 1"));
            }
        }
        if l.max_message_bytes < 4096 {
            return invalid(
                "[limits] max_message_bytes below 4096 would refuse ordinary SIP messages".into(),
            );
        }
        if self.hip.dead_peer_idle_secs == 0 {
            return invalid("[hip] dead_peer_idle_secs must be at least 1".into());
        }
        if let Some(a) = self.metrics.listen {
            if a.ip().is_unspecified() {
                return invalid(format!(
                    "[metrics] listen {a}: the endpoint has no authentication and names peers' HITs; \
                     bind it to a specific address (127.0.0.1 or a management interface's)"
                ));
            }
            if a.port() == 0 {
                return invalid(format!("[metrics] listen {a}: needs a port"));
            }
        }
        if self.kernel.replay_window > hip_kernel::MAX_REPLAY_WINDOW {
            return invalid(format!(
                "[kernel] replay_window {} is above {}",
                self.kernel.replay_window,
                hip_kernel::MAX_REPLAY_WINDOW
            ));
        }
        let l = self.kernel.lifetimes();
        for (what, soft, hard) in [
            ("secs", l.soft_secs, l.hard_secs),
            ("bytes", l.soft_bytes, l.hard_bytes),
        ] {
            if hard != 0 && (soft == 0 || soft >= hard) {
                return invalid(format!(
                    "[kernel] soft_lifetime_{what} ({soft}) must be set and below hard_lifetime_{what} ({hard})"
                ));
            }
        }
        if let Err(e) = self.datapath.port_range() {
            return invalid(format!("[datapath] {e}"));
        }
        let sec = &self.security;
        match (&sec.identity_key, &sec.identity_info) {
            (Some(_), None) => {
                return invalid(
                    "[security] identity_key needs identity_info (the URI of our certificate, RFC 8224 §4)"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return invalid("[security] identity_info without identity_key".into());
            }
            (Some(_), Some(info))
                if !info.contains(':')
                    || info
                        .chars()
                        .any(|c| c.is_whitespace() || c == '>' || c == '<') =>
            {
                return invalid(format!(
                    "[security] identity_info {info:?} is not an absolute URI"
                ));
            }
            _ => {}
        }
        if sec.identity_freshness_secs == 0 {
            return invalid("[security] identity_freshness_secs must be above 0".into());
        }
        if sec.require_verified_peer && sec.peer_verify_timeout_ms == 0 {
            return invalid("[security] peer_verify_timeout_ms must be above 0".into());
        }
        let dns_vouches = self.dns.as_ref().is_some_and(|d| {
            d.trust_anchor.is_some() && (!d.peers.is_empty() || d.peer_name_template.is_some())
        });
        if sec.require_verified_peer
            && sec.trusted_identities.is_empty()
            && !sec.trust_sips_proxies
            && !dns_vouches
        {
            return invalid(
                "[security] require_verified_peer would refuse every call: no trusted_identities, trust_sips_proxies is off, and no [dns] peers with a trust_anchor"
                    .into(),
            );
        }
        if let Some(d) = sec.trusted_identities.keys().find(|d| {
            d.is_empty()
                || d.chars()
                    .any(|c| c.is_whitespace() || matches!(c, '@' | ':' | '<' | '>'))
        }) {
            return invalid(format!(
                "[security] trusted_identities: {d:?} is not a domain"
            ));
        }
        if let Some(e) = &self.edge
            && let Err(m) = e.validate(&self.sip.listen)
        {
            return invalid(m);
        }
        if self.datapath_enabled() && self.datapath.interfaces.is_empty() {
            return invalid("[datapath] interfaces is empty: name the interfaces that carry ESP, or set [datapath] enabled = false".into());
        }
        Ok(())
    }

    /// The address we advertise.
    /// Whether HIP runs for calls (see [`HipSection::enabled`]).
    pub fn hip_enabled(&self) -> bool {
        self.hip.enabled.unwrap_or(self.identity.is_some())
    }

    /// Whether established associations are offloaded to the kernel.
    pub fn kernel_enabled(&self) -> bool {
        self.hip_enabled() && self.kernel.enabled
    }

    /// Whether the eBPF datapath is loaded.
    pub fn datapath_enabled(&self) -> bool {
        self.kernel_enabled() && self.datapath.enabled
    }

    pub fn contact_host(&self) -> Option<IpAddr> {
        self.sip.contact_host.or_else(|| {
            self.sip
                .listen
                .first()
                .map(|l| l.addr.ip())
                .filter(|ip| !ip.is_unspecified())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.toml"))
    }

    const MIN: &str = "hit = \"2001:20::1\"\n[sip]\nuser = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:192.0.2.1:5060\"]\n";

    #[test]
    fn edge_section_is_validated() {
        let edge = |body: &str| parse(&format!("{MIN}[edge]\n{body}"));
        let ok = edge(
            "listen = [\"udp:[::1]:5070\", \"tcp:192.0.2.1:5070\"]\nclients = [\"::1\", \"192.0.2.1\"]\nnext_hop = \"udp:192.0.2.2:5060\"\n",
        )
        .unwrap();
        let e = ok.edge.unwrap();
        assert_eq!(e.networks().unwrap().len(), 2);
        assert_eq!(
            e.inbound_without_hit,
            hip_sip::sip::edge::NoHitPolicy::Refuse
        );
        assert!(e.notify_phone);
        for (body, want) in [
            (
                "listen = []\nclients = [\"::1\"]\nnext_hop = \"udp:192.0.2.2:5060\"",
                "listen is empty",
            ),
            (
                "listen = [\"udp:[::1]:5070\"]\nclients = []\nnext_hop = \"udp:192.0.2.2:5060\"",
                "clients is empty",
            ),
            (
                "listen = [\"udp:[::1]:5070\"]\nclients = [\"0.0.0.0/0\"]\nnext_hop = \"udp:192.0.2.2:5060\"",
                "open relay",
            ),
            (
                "listen = [\"udp:[::1]:5070\"]\nclients = [\"nonsense\"]\nnext_hop = \"udp:192.0.2.2:5060\"",
                "not an IP address",
            ),
            (
                "listen = [\"udp:192.0.2.1:5060\"]\nclients = [\"::1\"]\nnext_hop = \"udp:192.0.2.2:5060\"",
                "already uses it",
            ),
            (
                "listen = [\"tls:[::1]:5071\"]\nclients = [\"::1\"]\nnext_hop = \"udp:192.0.2.2:5060\"",
                "TLS",
            ),
            (
                "listen = [\"udp:0.0.0.0:5070\"]\nclients = [\"::1\"]\nnext_hop = \"udp:192.0.2.2:5060\"",
                "give an address",
            ),
        ] {
            let err = edge(body).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
        let err = edge("listen = [\"udp:[::1]:5070\"]\nclients = [\"::1\"]\nnext_hop = \"udp:192.0.2.2:5060\"\nopen = true")
            .unwrap_err()
            .to_string();
        assert!(err.contains("open"), "{err}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.hit, Some("2001:20::1".parse().unwrap()));
        assert_eq!(c.control_socket, PathBuf::from("/run/hip/agent.sock"));
        assert_eq!(c.sip.answer.mode, AnswerMode::Auto);
        assert_eq!(c.sip.sdp.identity(), IdentityPolicy::default());
        assert_eq!(c.contact_host(), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(c.sip.timers, TimerConfig::default());
        // The interoperable choices of RFC 7401 (issue 10).
        assert_eq!(c.hip.host_id_in_i2, HostIdInI2::Clear);
        assert!(!c.hip.r1_counter);
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            "identity = \"/etc/hip/id.pem\"\npool = \"/tmp/p.json\"\ncontrol_socket = \"/tmp/s\"\n\
             [sip]\nuser = \"bob\"\ndomain = \"biloxi.com\"\npassword = \"pw\"\n\
             outbound_proxy = \"udp:192.0.2.3:5060\"\nregister = true\nregister_expires = 60\n\
             contact_host = \"192.0.2.4\"\nlisten = [\"udp:0.0.0.0:5060\", \"tcp:0.0.0.0:5060\"]\n\
             timers = { t1 = 100, t2 = 1000, t4 = 2000 }\n\
             [sip.answer]\nmode = \"manual\"\nring_ms = 200\n\
             [sip.sdp]\nform = \"k\"\nhit_format = \"ipv6\"\nsend_hi = true\nper_media = false\nrtp_port = 4000\n\
             [hip]\naccept = \"opportunistic\"\nesp_transforms = [\"aes-128-cbc-hmac-sha256\"]\non_failure = \"keep\"\n\
             host_id_in_i2 = \"encrypted\"\nr1_counter = true\n\
             [kernel]\nfail_closed = \"guard\"\nsoft_lifetime_secs = 50\nhard_lifetime_secs = 60\n\
             [datapath]\ninterfaces = [\"eth0\"]\nmedia_ports = \"20000-20099\"\n",
        )
        .unwrap();
        assert!(c.hip_enabled() && c.kernel_enabled() && c.datapath_enabled());
        assert_eq!(c.hip.accept, AcceptPolicy::Opportunistic);
        assert_eq!(c.hip.on_failure, FailureAction::Keep);
        assert_eq!(c.hip.host_id_in_i2, HostIdInI2::Encrypted);
        assert!(c.hip.r1_counter);
        assert_eq!(c.kernel.fail_closed, hip_kernel::FailClosed::Guard);
        assert_eq!(c.kernel.lifetimes().soft_secs, 50);
        assert_eq!(c.datapath.port_range().unwrap(), 20000..=20099);
        assert_eq!(
            c.sip.outbound_proxy.unwrap().to_string(),
            "udp:192.0.2.3:5060"
        );
        assert_eq!(c.sip.answer.mode, AnswerMode::Manual);
        assert_eq!(c.sip.sdp.form, Form::K);
        assert!(c.sip.sdp.send_hi);
        assert_eq!(c.sip.sdp.rtp_port, 4000);
        assert_eq!(c.sip.timers.t1, std::time::Duration::from_millis(100));
    }

    #[test]
    fn proxies_may_be_named_and_are_resolved_at_load() {
        // `localhost` comes from /etc/hosts: no DNS server is involved.
        let c = parse(&format!(
            "{MIN}outbound_proxy = \"udp:localhost:5070\"\nregistrar = \"udp:localhost:5080\"\n"
        ))
        .unwrap();
        let p = c.sip.outbound_proxy.unwrap();
        assert_eq!(p.transport, Transport::Udp);
        assert_eq!(p.addr.port(), 5070);
        assert!(p.addr.ip().is_loopback(), "{p}");
        assert_eq!(c.sip.registrar.unwrap().addr.port(), 5080);
        // IP literals need no resolver; malformed forms fail before any lookup.
        assert_eq!(
            TransportAddr::resolve("tls:[2001:db8::1]:5061")
                .unwrap()
                .to_string(),
            "tls:[2001:db8::1]:5061"
        );
        for (bad, word) in [
            ("sctp:localhost:5060", "unknown transport"),
            ("udp:localhost:sip", "not a port"),
            ("udp:localhost", "transport:host:port"),
            ("localhost", "transport:address:port"),
        ] {
            let e = TransportAddr::resolve(bad).unwrap_err();
            assert!(e.contains(word), "{bad}: {e}");
        }
    }

    #[test]
    fn offload_settings_that_do_not_fit_are_refused() {
        let id = MIN.replace("hit = \"2001:20::1\"", "identity = \"/etc/hip/id.pem\"");
        // HIP with the datapath on needs interfaces.
        let e = parse(&id).unwrap_err().to_string();
        assert!(e.contains("interfaces"), "{e}");
        let ok = format!("{id}[datapath]\nenabled = false\n");
        assert!(parse(&ok).unwrap().kernel_enabled());
        for (extra, word) in [
            ("[kernel]\nreplay_window = 5000\n", "replay_window"),
            (
                "[kernel]\nsoft_lifetime_secs = 90\nhard_lifetime_secs = 60\n",
                "soft_lifetime_secs",
            ),
            (
                "[datapath]\ninterfaces = [\"e\"]\nmedia_ports = \"9-3\"\n",
                "media_ports",
            ),
            ("[hip]\nesp_transforms = []\n", "esp_transforms"),
        ] {
            let e = parse(&format!("{id}{extra}")).unwrap_err().to_string();
            assert!(e.contains(word), "{extra}: {e}");
        }
        // A bare HIT cannot run HIP.
        let e = parse(&format!("{MIN}[hip]\nenabled = true\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("identity"), "{e}");
        assert!(!parse(MIN).unwrap().hip_enabled());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_them() {
        let e = parse(&format!("{MIN}usr = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("usr"), "{e}");
        let e = parse(&MIN.replace("[sip]", "bogus = 1\n[sip]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse(&format!("{MIN}[hip]\nfoo = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("foo"), "{e}");
        for (bad, word) in [
            ("host_id_in_i2 = \"plain\"\n", "plain"),
            ("host_id_in_i2 = true\n", "host_id_in_i2"),
            ("r1_counter = \"yes\"\n", "r1_counter"),
        ] {
            let e = parse(&format!("{MIN}[hip]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{bad}: {e}");
        }
        let e = parse(&format!("{MIN}[sip.sdp]\nform = \"z\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("z"), "{e}");
        let e = parse(&MIN.replace("udp:192.0.2.1:5060", "sctp:192.0.2.1:5060"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sctp"), "{e}");
        let e = parse(&MIN.replace("2001:20::1", "xyz"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xyz"), "{e}");
    }

    #[test]
    fn dns_refresh_defaults_to_half_the_ttl_and_is_checked() {
        let dns = |extra: &str| format!("{MIN}[dns]\nserver = \"192.0.2.53:53\"\n{extra}");
        let c = parse(&dns("")).unwrap();
        assert_eq!(
            c.dns.unwrap().refresh(),
            std::time::Duration::from_secs(150)
        );
        let c = parse(&dns("ttl = 1\n")).unwrap();
        assert_eq!(c.dns.unwrap().refresh(), std::time::Duration::from_secs(1));
        let c = parse(&dns("refresh_secs = 7\n")).unwrap();
        assert_eq!(c.dns.unwrap().refresh(), std::time::Duration::from_secs(7));
        for bad in ["refresh_secs = 0\n", "refresh_secs = 86401\n"] {
            let e = parse(&dns(bad)).unwrap_err().to_string();
            assert!(e.contains("refresh_secs"), "{bad}: {e}");
        }
    }

    #[test]
    fn security_table_parses_and_is_checked() {
        let c = parse(MIN).unwrap();
        assert!(c.security.identity_key.is_none());
        assert_eq!(c.security.identity_freshness_secs, 60);
        assert!(!c.security.trust_sips_proxies);
        assert!(!c.security.require_verified_peer);
        assert_eq!(c.security.peer_verify_timeout_ms, 5000);
        let c = parse(&format!(
            "{MIN}[security]\nidentity_key = \"/k.pem\"\nidentity_info = \"https://atlanta.com/c.pem\"\n\
             trusted_identities = {{ \"biloxi.com\" = \"/b.pem\", \"atlanta.com\" = \"/a.pem\" }}\n\
             identity_freshness_secs = 30\ntrust_sips_proxies = true\n"
        ))
        .unwrap();
        assert_eq!(c.security.trusted_identities.len(), 2);
        assert_eq!(
            c.security.trusted_identities["biloxi.com"],
            PathBuf::from("/b.pem")
        );
        assert_eq!(c.security.identity_freshness_secs, 30);
        assert!(c.security.trust_sips_proxies);
        for (extra, word) in [
            ("identity_key = \"/k.pem\"\n", "identity_info"),
            ("identity_info = \"https://a/c\"\n", "without identity_key"),
            (
                "identity_key = \"/k\"\nidentity_info = \"no uri\"\n",
                "absolute URI",
            ),
            ("identity_freshness_secs = 0\n", "identity_freshness_secs"),
            (
                "require_verified_peer = true\ntrust_sips_proxies = true\npeer_verify_timeout_ms = 0\n",
                "peer_verify_timeout_ms",
            ),
            ("require_verified_peer = true\n", "would refuse every call"),
            (
                "trusted_identities = { \"a b\" = \"/x\" }\n",
                "not a domain",
            ),
            ("trust_sip_proxies = true\n", "trust_sip_proxies"),
        ] {
            let e = parse(&format!("{MIN}[security]\n{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{extra}: {e}");
        }
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        let e = parse(&MIN.replace("hit = \"2001:20::1\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("own HIT"), "{e}");
        let e = parse(&MIN.replace("192.0.2.1:5060", "0.0.0.0:5060"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("contact_host"), "{e}");
        let e = parse(&format!("{MIN}register = true\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("registrar"), "{e}");
        let e = parse(&format!("{MIN}outbound_proxy = \"tcp:192.0.2.2:5060\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no TCP listener"), "{e}");
        let e = parse(&MIN.replace("[\"udp:192.0.2.1:5060\"]", "[\"tls:192.0.2.1:5061\"]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[sip.tls]"), "{e}");
    }

    #[test]
    fn metrics_endpoint_is_off_by_default_and_never_on_a_wildcard() {
        assert_eq!(parse(MIN).unwrap().metrics.listen, None);
        let c = parse(&format!("{MIN}[metrics]\nlisten = \"127.0.0.1:9464\"\n")).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        for (listen, word) in [
            ("0.0.0.0:9464", "no authentication"),
            ("[::]:9464", "no authentication"),
            ("127.0.0.1:0", "needs a port"),
        ] {
            let e = parse(&format!("{MIN}[metrics]\nlisten = \"{listen}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{listen}: {e}");
        }
        let e = parse(&format!("{MIN}[metrics]\nlisten = \"localhost\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        let e = parse(&format!("{MIN}[metrics]\nport = 9464\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }
}
