//! The I/O edge: RFC 2136 updates signed with TSIG, and DNSSEC-validated lookups.
//!
//! Messages, TSIG (RFC 8945) and the DNSSEC validation (RFC 4035 §5) are hickory's; updates
//! go out on one UDP socket of ours (falling back to TCP on truncation) so that a refusal's
//! RCODE and TSIG error reach the caller intact, and lookups go through hickory-net's
//! `DnssecDnsHandle` against a configured trust anchor. Every operation has a deadline.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hickory_net::client::Client;
use hickory_net::dnssec::DnssecDnsHandle;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::dnssec::{Proof, TrustAnchors};
use hickory_proto::op::{
    DnsRequest, DnsRequestOptions, DnsResponse, Message, OpCode, Query, ResponseCode, UpdateMessage,
};
use hickory_proto::rr::rdata::NULL;
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::rdata::{HIP_RR_TYPE, HipRdata, RdataError};

/// The HIP RR type as hickory names it (it has no HIP type of its own).
pub fn hip_type() -> RecordType {
    RecordType::Unknown(HIP_RR_TYPE)
}

/// A TSIG key as `tsig-keygen` writes it (`key "NAME" { algorithm ALG; secret "B64"; };`).
#[derive(Clone)]
pub struct TsigKey {
    /// The key's name (must match the server's).
    pub name: Name,
    /// HMAC algorithm.
    pub algorithm: TsigAlgorithm,
    /// The shared secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TsigKey({}, {})", self.name, self.algorithm)
    }
}

/// Errors of the DNS edge.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// A key file does not parse.
    #[error("TSIG key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The trust anchor file does not parse.
    #[error("trust anchor file {path}: {reason}")]
    TrustAnchor {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The server refused the update; nothing changed (RFC 2136 §3: an update is atomic).
    #[error("DNS update of {name} refused by {server}: {}{tsig} — {cause}", rcode_name(*.rcode))]
    Refused {
        /// The name updated.
        name: String,
        /// The server.
        server: SocketAddr,
        /// The response code.
        rcode: ResponseCode,
        /// The TSIG error, if any (`, TSIG BADKEY`).
        tsig: String,
        /// What that usually means.
        cause: &'static str,
    },
    /// The answer's TSIG did not verify (not the server we share the key with).
    #[error("DNS response from {server} failed TSIG verification: {reason}")]
    BadResponseSignature {
        /// The server.
        server: SocketAddr,
        /// The verifier's reason.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("DNS server {server} did not answer within {timeout:?}")]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
    /// Socket error.
    #[error("DNS I/O with {server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Message encoding/decoding, TSIG signing.
    #[error("DNS protocol: {0}")]
    Proto(String),
    /// A lookup failed (network, SERVFAIL …).
    #[error("DNS lookup of {name} {rtype}: {reason}")]
    Lookup {
        /// The name.
        name: String,
        /// The type.
        rtype: String,
        /// The reason.
        reason: String,
    },
    /// A HIP RR did not decode.
    #[error("HIP RR at {name}: {source}")]
    Rdata {
        /// The name.
        name: String,
        /// The error.
        #[source]
        source: RdataError,
    },
}

impl TsigKey {
    /// Parses BIND's key statement (the output of `tsig-keygen`, or `rndc-confgen -a`'s).
    pub fn parse(text: &str) -> Result<Self, String> {
        // Tokens: words, quoted strings, and `{ } ;`. Comments (`#`, `//` to the end of the
        // line) are skipped, but only outside quotes: a base64 secret may hold `//`.
        let mut toks = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                c if c.is_whitespace() => {}
                '"' => toks.push(chars.by_ref().take_while(|&c| c != '"').collect()),
                '{' | '}' | ';' => toks.push(c.to_string()),
                '#' => while chars.next_if(|&c| c != '\n').is_some() {},
                '/' if chars.peek() == Some(&'/') => {
                    while chars.next_if(|&c| c != '\n').is_some() {}
                }
                c => {
                    let mut s = String::from(c);
                    while let Some(c) =
                        chars.next_if(|&c| !c.is_whitespace() && !"{};\"#".contains(c))
                    {
                        s.push(c);
                    }
                    toks.push(s);
                }
            }
        }
        let mut it = toks.iter().map(String::as_str);
        if it.next() != Some("key") {
            return Err("expected `key \"NAME\" { algorithm …; secret \"…\"; };`".into());
        }
        let name = it.next().ok_or("missing key name")?;
        if it.next() != Some("{") {
            return Err("expected `{` after the key name".into());
        }
        let (mut algorithm, mut secret) = (None, None);
        loop {
            match it.next() {
                Some("algorithm") => algorithm = it.next(),
                Some("secret") => secret = it.next(),
                Some(";") => {}
                Some("}") | None => break,
                Some(other) => return Err(format!("unexpected `{other}` in the key statement")),
            }
        }
        let algorithm = match algorithm.ok_or("no `algorithm`")? {
            a if a.eq_ignore_ascii_case("hmac-sha256") => TsigAlgorithm::HmacSha256,
            a if a.eq_ignore_ascii_case("hmac-sha384") => TsigAlgorithm::HmacSha384,
            a if a.eq_ignore_ascii_case("hmac-sha512") => TsigAlgorithm::HmacSha512,
            a => {
                return Err(format!(
                    "algorithm {a} not supported (hmac-sha256/384/512 are)"
                ));
            }
        };
        use base64::Engine as _;
        let secret = base64::engine::general_purpose::STANDARD
            .decode(secret.ok_or("no `secret`")?)
            .map_err(|e| format!("secret is not base64: {e}"))?;
        if secret.is_empty() {
            return Err("empty secret".into());
        }
        let name = Name::from_ascii(name).map_err(|e| format!("key name {name}: {e}"))?;
        Ok(Self {
            name,
            algorithm,
            secret,
        })
    }

    /// Reads and parses a key file.
    pub fn from_file(path: &Path) -> Result<Self, DnsError> {
        let err = |reason: String| DnsError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    fn signer(&self) -> Result<TSigner, DnsError> {
        TSigner::new(
            self.secret.clone(),
            self.algorithm.clone(),
            self.name.clone(),
            300,
        )
        .map_err(|e| DnsError::Proto(e.to_string()))
    }
}

/// Loads a trust anchor file: DNSKEY records in zone-file syntax (a zone's KSK as BIND's
/// `K….key` file has it, or `dig DNSKEY` output).
pub fn load_trust_anchor(path: &Path) -> Result<Arc<TrustAnchors>, DnsError> {
    let err = |reason: String| DnsError::TrustAnchor {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    // BIND writes `;` comment lines; the parser takes DNSKEY records only.
    let records: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with(';') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    let anchors: TrustAnchors = records.parse().map_err(|e| err(format!("{e}")))?;
    if anchors.is_empty() && !records.contains("DNSKEY") {
        return Err(err("no DNSKEY record".into()));
    }
    Ok(Arc::new(anchors))
}

/// Where and how to send updates.
#[derive(Clone, Debug)]
pub struct UpdateTarget {
    /// The primary server (its update port).
    pub server: SocketAddr,
    /// The zone (RFC 2136 zone section).
    pub zone: Name,
    /// The key that signs updates.
    pub key: TsigKey,
    /// Deadline for one update.
    pub timeout: Duration,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The RFC mnemonic of a response code (`NOTAUTH`), with its text.
fn rcode_name(r: ResponseCode) -> String {
    let m = match r {
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::YXDomain => "YXDOMAIN",
        ResponseCode::YXRRSet => "YXRRSET",
        ResponseCode::NXRRSet => "NXRRSET",
        ResponseCode::NotAuth => "NOTAUTH",
        ResponseCode::NotZone => "NOTZONE",
        _ => return r.to_string(),
    };
    format!("{m} ({r})")
}

fn refusal_cause(rcode: ResponseCode, tsig: Option<&TsigError>) -> &'static str {
    match (rcode, tsig) {
        (_, Some(TsigError::BadKey)) => {
            "the server does not know this TSIG key (key name or algorithm), or (Knot) its ACL does not let this key update this name"
        }
        (_, Some(TsigError::BadSig)) => "the TSIG secret does not match the server's",
        (_, Some(TsigError::BadTime)) => "the clocks of this host and the server differ",
        (ResponseCode::NotAuth, _) => {
            "the server is not authoritative for the zone, or the key is not allowed to update it"
        }
        (ResponseCode::NotZone, _) => "the name is not inside the zone",
        (ResponseCode::Refused, _) => {
            "the update policy does not allow this key to change this name, or the zone does not take updates"
        }
        (ResponseCode::ServFail, _) => "the server could not apply it (zone frozen or not loaded?)",
        (ResponseCode::YXRRSet | ResponseCode::NXRRSet, _) => "a prerequisite did not hold",
        _ => "see the server's log",
    }
}

/// One update: a message with the zone section set and the given update records, TSIG-signed,
/// sent, its answer checked (RCODE, TSIG). RFC 2136 §3.7: the server applies all of it or none.
async fn send_update(
    target: &UpdateTarget,
    name: &Name,
    prerequisites: Vec<Record>,
    updates: Vec<Record>,
) -> Result<(), DnsError> {
    let mut zone = Query::new();
    zone.set_name(target.zone.clone())
        .set_query_class(DNSClass::IN)
        .set_query_type(RecordType::SOA);
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.metadata.op_code = OpCode::Update;
    msg.metadata.recursion_desired = false;
    msg.add_zone(zone);
    for p in prerequisites {
        msg.add_pre_requisite(p);
    }
    msg.add_updates(updates);
    let signer = target.key.signer()?;
    let mut verifier = msg
        .finalize(&signer, now_secs())
        .map_err(|e| DnsError::Proto(e.to_string()))?;
    let bytes = msg.to_vec().map_err(|e| DnsError::Proto(e.to_string()))?;
    let resp_bytes = exchange(target.server, &bytes, target.timeout).await?;
    let resp = Message::from_vec(&resp_bytes).map_err(|e| DnsError::Proto(e.to_string()))?;
    let tsig_err = resp.signature().and_then(|s| s.data.error);
    let rcode = resp.metadata.response_code;
    if rcode != ResponseCode::NoError || tsig_err.is_some() {
        return Err(DnsError::Refused {
            name: name.to_string(),
            server: target.server,
            rcode,
            tsig: match &tsig_err {
                Some(t) => format!(", TSIG {t:?}").to_uppercase(),
                None => String::new(),
            },
            cause: refusal_cause(rcode, tsig_err.as_ref()),
        });
    }
    // A success must come from the server that holds the key (RFC 8945 §5.3).
    if let Some(v) = verifier.as_mut() {
        v.verify(&resp_bytes)
            .map_err(|e| DnsError::BadResponseSignature {
                server: target.server,
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

fn rand_id() -> u16 {
    // Message ids only need to be unpredictable enough to pair answers with requests on a
    // connected socket; the TSIG MAC authenticates the answer.
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t ^ (t >> 16)) as u16 ^ std::process::id() as u16
}

/// One request/response over UDP on a connected socket; TCP when the answer is truncated.
async fn exchange(server: SocketAddr, msg: &[u8], timeout: Duration) -> Result<Vec<u8>, DnsError> {
    let io = |source| DnsError::Io { server, source };
    let work = async {
        if msg.len() > 1232 {
            return tcp_exchange(server, msg).await;
        }
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = tokio::net::UdpSocket::bind(bind).await.map_err(io)?;
        sock.connect(server).await.map_err(io)?;
        sock.send(msg).await.map_err(io)?;
        let id = &msg[..2];
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            if n < 12 || &buf[..2] != id {
                continue; // not our answer
            }
            if buf[2] & 0x02 != 0 {
                break; // TC: retry over TCP
            }
            return Ok(buf[..n].to_vec());
        }
        tcp_exchange(server, msg).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| DnsError::Timeout { server, timeout })?
}

/// RFC 1035 §4.2.2 / RFC 7766: one message over TCP, two-octet length prefix. Large
/// updates (more than fits a 1232-octet datagram, RFC 9715) go this way directly.
async fn tcp_exchange(server: SocketAddr, msg: &[u8]) -> Result<Vec<u8>, DnsError> {
    let io = |source| DnsError::Io { server, source };
    let len = u16::try_from(msg.len())
        .map_err(|_| DnsError::Proto("message over 65535 octets".into()))?;
    let mut tcp = tokio::net::TcpStream::connect(server).await.map_err(io)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    tcp.write_all(&framed).await.map_err(io)?;
    let len = tcp.read_u16().await.map_err(io)? as usize;
    let mut out = vec![0u8; len];
    tcp.read_exact(&mut out).await.map_err(io)?;
    Ok(out)
}

fn hip_record(name: &Name, ttl: u32, rdata: &HipRdata) -> Result<Record, DnsError> {
    let bytes = rdata.encode().map_err(|source| DnsError::Rdata {
        name: name.to_string(),
        source,
    })?;
    Ok(Record::from_rdata(
        name.clone(),
        ttl,
        RData::Unknown {
            code: hip_type(),
            rdata: NULL::with(bytes),
        },
    ))
}

/// RFC 2136 §2.5.2 "Delete an RRset": class ANY, TTL 0, empty RDATA.
fn delete_hip_rrset(name: &Name) -> Record {
    let mut r = Record::update0(name.clone(), 0, hip_type()).into_record_of_rdata();
    r.dns_class = DNSClass::ANY;
    r
}

/// Publishes `rdata` as the only HIP RR at `name`: one update that deletes the HIP RRset and
/// adds the new record, so the name never has zero or two records, and a refusal leaves the
/// old one in place.
pub async fn publish(
    target: &UpdateTarget,
    name: &Name,
    ttl: u32,
    rdata: &HipRdata,
) -> Result<(), DnsError> {
    let add = hip_record(name, ttl, rdata)?;
    send_update(target, name, vec![], vec![delete_hip_rrset(name), add]).await
}

/// Publishes many records in one update (used by the bench, and for an operator who
/// provisions hosts in bulk): each name's HIP RRset is replaced.
pub async fn publish_many(
    target: &UpdateTarget,
    ttl: u32,
    records: &[(Name, HipRdata)],
) -> Result<(), DnsError> {
    let mut updates = Vec::with_capacity(records.len() * 2);
    for (name, rdata) in records {
        updates.push(delete_hip_rrset(name));
        updates.push(hip_record(name, ttl, rdata)?);
    }
    let first = records.first().map(|(n, _)| n.clone()).unwrap_or_default();
    send_update(target, &first, vec![], updates).await
}

/// Removes the HIP RRset at `name` (nothing else there is touched).
pub async fn withdraw(target: &UpdateTarget, name: &Name) -> Result<(), DnsError> {
    send_update(target, name, vec![], vec![delete_hip_rrset(name)]).await
}

/// The HIP RRs the primary holds at `name` now: one non-recursive query to `server`,
/// unvalidated. This only decides whether our record needs publishing again (a record
/// deleted or replaced behind our back); the update that follows is what TSIG protects.
/// RDATA that does not decode is returned as `Err` (it is not ours either).
pub async fn published(
    server: SocketAddr,
    name: &Name,
    timeout: Duration,
) -> Result<Vec<Result<HipRdata, RdataError>>, DnsError> {
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.metadata.recursion_desired = false;
    msg.add_query(Query::query(name.clone(), hip_type()));
    let bytes = msg.to_vec().map_err(|e| DnsError::Proto(e.to_string()))?;
    let resp = exchange(server, &bytes, timeout).await?;
    let resp = Message::from_vec(&resp).map_err(|e| DnsError::Proto(e.to_string()))?;
    match resp.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        r => {
            return Err(DnsError::Lookup {
                name: name.to_string(),
                rtype: "HIP".into(),
                reason: format!("{} from {server}", rcode_name(r)),
            });
        }
    }
    Ok(resp
        .answers
        .iter()
        .filter(|r| r.record_type() == hip_type() && r.name == *name)
        .filter_map(|r| match &r.data {
            RData::Unknown { rdata, .. } => Some(HipRdata::decode(&rdata.anything)),
            _ => None,
        })
        .collect())
}

/// DNSSEC validation state of an answer (RFC 4035 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Validation {
    /// Chain of trust from the configured anchor verified.
    Secure,
    /// Provably unsigned (no DS on the way down).
    Insecure,
    /// Signatures missing, wrong or expired where they must be present.
    Bogus,
    /// Not validated: no trust anchor configured, or the chain could not be built.
    Indeterminate,
}

impl Validation {
    fn from_proof(p: Proof) -> Self {
        match p {
            Proof::Secure => Self::Secure,
            Proof::Insecure => Self::Insecure,
            Proof::Bogus => Self::Bogus,
            Proof::Indeterminate => Self::Indeterminate,
        }
    }

    /// Lower case name, as `status` and `--json` show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Secure => "secure",
            Self::Insecure => "insecure",
            Self::Bogus => "bogus",
            Self::Indeterminate => "indeterminate",
        }
    }
}

/// How deep the validator may recurse (hickory's default is 26). Each zone between the
/// trust anchor and the name costs two levels (its DS, then its DNSKEY), so 12 covers five
/// delegations below the anchor.
const MAX_VALIDATION_DEPTH: usize = 12;

/// Most queries one validated lookup (one name and type) may send, the proofs included.
/// A secure answer needs a handful (the RRset, the DNSKEYs, per delegation its DS). An
/// answer stripped of its signatures makes hickory look for the DS that would prove the
/// zone unsigned, and each unsigned proof on the way sends it looking again: a fan-out of
/// about three per level that at depth 12 outlasts any deadline (measured: depth 6 took
/// seconds, 8 never finished within 3 s). With the budget spent every further query
/// fails at once, the missing proofs end as `bogus`, and the answer comes back as such in
/// milliseconds instead of as a timeout.
const QUERY_BUDGET: usize = 64;

/// The transport under the validator, counting down [`QUERY_BUDGET`].
#[derive(Clone)]
struct Budgeted<H> {
    inner: H,
    left: Arc<AtomicUsize>,
}

impl<H: DnsHandle> DnsHandle for Budgeted<H> {
    type Response = futures::future::Either<
        H::Response,
        futures::stream::Once<futures::future::Ready<Result<DnsResponse, hickory_net::NetError>>>,
    >;
    type Runtime = H::Runtime;

    fn is_verifying_dnssec(&self) -> bool {
        self.inner.is_verifying_dnssec()
    }

    fn is_using_edns(&self) -> bool {
        self.inner.is_using_edns()
    }

    fn send(&self, request: DnsRequest) -> Self::Response {
        let spent = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_err();
        if spent {
            return futures::future::Either::Right(futures::stream::once(futures::future::ready(
                Err(hickory_net::NetError::from(
                    "query budget of this lookup spent (proofs missing)",
                )),
            )));
        }
        futures::future::Either::Left(self.inner.send(request))
    }
}

/// Where lookups go.
#[derive(Clone)]
pub struct Resolver {
    /// Server asked (a recursive resolver or the zone's authoritative server).
    pub server: SocketAddr,
    /// Trust anchors; `None` means answers are never `secure`.
    pub trust_anchor: Option<Arc<TrustAnchors>>,
    /// Deadline for a whole lookup (all queries, validation included).
    pub timeout: Duration,
}

/// One HIP RR found, checked.
#[derive(Clone, Debug)]
pub struct HipAnswer {
    /// The record.
    pub rdata: HipRdata,
    /// Its key and HIT, or why they do not agree.
    pub verified: Result<(hip_proto::HostId, hip_proto::Hit), RdataError>,
    /// TTL of the answer.
    pub ttl: u32,
}

/// The result of looking a name up.
#[derive(Clone, Debug)]
pub struct Lookup {
    /// The name.
    pub name: Name,
    /// HIP RRs at the name (empty: none).
    pub hip: Vec<HipAnswer>,
    /// Validation state of the HIP RRset (or of its denial).
    pub validation: Validation,
    /// A and AAAA addresses.
    pub addresses: Vec<IpAddr>,
    /// Validation state of the address RRsets (the weakest of the non-empty ones).
    pub addresses_validation: Validation,
}

impl Resolver {
    async fn query(
        &self,
        name: &Name,
        rtype: RecordType,
    ) -> Result<(Vec<Record>, Validation), DnsError> {
        let stream = UdpClientStream::builder(self.server, TokioRuntimeProvider::default())
            .with_timeout(Some(self.timeout))
            .build();
        let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(stream);
        let bg = tokio::spawn(bg);
        let query = Query::query(name.clone(), rtype);
        let mut opts = DnsRequestOptions::default();
        opts.use_edns = true;
        opts.max_request_depth = MAX_VALIDATION_DEPTH;
        let lookup_err = |reason: String| DnsError::Lookup {
            name: name.to_string(),
            rtype: rtype_name(rtype),
            reason,
        };
        let result = match &self.trust_anchor {
            Some(anchor) => {
                opts.edns_set_dnssec_ok = true;
                let left = Arc::new(AtomicUsize::new(QUERY_BUDGET));
                let budgeted = Budgeted {
                    inner: client,
                    left: Arc::clone(&left),
                };
                let h = DnssecDnsHandle::with_trust_anchor(budgeted, Arc::clone(anchor));
                let r = h.lookup(query, opts).next().await;
                tracing::debug!(%name, rtype = %rtype_name(rtype), queries = QUERY_BUDGET - left.load(Ordering::Relaxed), "validated lookup");
                r
            }
            None => client.lookup(query, opts).next().await,
        };
        bg.abort();
        let resp = match result {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                // A denial (NXDOMAIN/NODATA) is an answer, not a failure.
                if let hickory_net::NetError::Dns(hickory_net::DnsError::NoRecordsFound(nr)) = &e {
                    let proof = nr
                        .authorities
                        .as_ref()
                        .and_then(|a| a.first().map(|r| r.proof))
                        .unwrap_or_default();
                    let v = if self.trust_anchor.is_some() {
                        Validation::from_proof(proof)
                    } else {
                        Validation::Indeterminate
                    };
                    return Ok((vec![], v));
                }
                // A denial whose proof did not validate (NSEC stripped or forged): no records,
                // in the state the validator found. It can only ever hide a record, which
                // never raises a level.
                if let hickory_net::NetError::Dns(hickory_net::DnsError::Nsec { proof, .. }) = &e
                    && self.trust_anchor.is_some()
                {
                    return Ok((vec![], Validation::from_proof(*proof)));
                }
                if let hickory_net::NetError::Dns(hickory_net::DnsError::DnssecBogus) = &e {
                    return Ok((vec![], Validation::Bogus));
                }
                return Err(lookup_err(e.to_string()));
            }
            None => return Err(lookup_err("no response".into())),
        };
        let answers: Vec<Record> = resp
            .answers
            .iter()
            .filter(|r| r.record_type() == rtype)
            .cloned()
            .collect();
        let validation = if self.trust_anchor.is_none() {
            Validation::Indeterminate
        } else {
            // The weakest proof among the records of the set (they share one RRSIG).
            answers
                .iter()
                .map(|r| r.proof)
                .min_by_key(|p| *p as u8)
                .map(Validation::from_proof)
                .unwrap_or(Validation::Indeterminate)
        };
        Ok((answers, validation))
    }

    /// Looks up the HIP RRset (and A/AAAA) at `name`, all within `self.timeout`.
    pub async fn lookup(&self, name: &Name) -> Result<Lookup, DnsError> {
        let timeout = self.timeout;
        let work = async {
            let (hip, validation) = self.query(name, hip_type()).await?;
            let mut hip_answers = Vec::new();
            for r in hip {
                if let RData::Unknown { rdata, .. } = &r.data {
                    let rd =
                        HipRdata::decode(&rdata.anything).map_err(|source| DnsError::Rdata {
                            name: name.to_string(),
                            source,
                        })?;
                    hip_answers.push(HipAnswer {
                        verified: rd.verified(),
                        rdata: rd,
                        ttl: r.ttl,
                    });
                }
            }
            let (a, va) = self.query(name, RecordType::A).await?;
            let (aaaa, vaaaa) = self.query(name, RecordType::AAAA).await?;
            let mut addresses = Vec::new();
            for r in a.iter().chain(aaaa.iter()) {
                match &r.data {
                    RData::A(a) => addresses.push(IpAddr::V4(a.0)),
                    RData::AAAA(a) => addresses.push(IpAddr::V6(a.0)),
                    _ => {}
                }
            }
            let weakest = |x: Validation, y: Validation| {
                let rank = |v| match v {
                    Validation::Bogus => 0,
                    Validation::Indeterminate => 1,
                    Validation::Insecure => 2,
                    Validation::Secure => 3,
                };
                if rank(x) <= rank(y) { x } else { y }
            };
            // An empty RRset (no AAAA, say) says nothing about the addresses there are.
            let addresses_validation = match (a.is_empty(), aaaa.is_empty()) {
                (false, false) => weakest(va, vaaaa),
                (false, true) => va,
                (true, false) => vaaaa,
                (true, true) => Validation::Indeterminate,
            };
            Ok(Lookup {
                name: name.clone(),
                hip: hip_answers,
                validation,
                addresses,
                addresses_validation,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| DnsError::Timeout {
                server: self.server,
                timeout,
            })?
    }
}

fn rtype_name(t: RecordType) -> String {
    if t == hip_type() {
        "HIP".into()
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tsig_keygen_statement_parses() {
        let k = TsigKey::parse(
            "key \"alice.hip.test.\" {\n\talgorithm hmac-sha256;\n\tsecret \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\";\n};\n",
        )
        .unwrap();
        assert_eq!(k.name.to_ascii(), "alice.hip.test.");
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(k.secret, (0u8..32).collect::<Vec<_>>());
    }

    /// A base64 secret may hold `//` (and `+`); comment markers inside quotes are data.
    /// CI once drew such a secret from `tsig-keygen` and the parser cut it at the `//`.
    #[test]
    fn comment_markers_inside_the_secret_are_part_of_it() {
        let secret = [0xffu8, 0xff, 0xff, 0xfb, 0xef, 0xbe];
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        assert!(b64.contains("//"), "{b64}");
        let k = TsigKey::parse(&format!(
            "# made by hand\nkey \"k.\" {{ // a comment\n algorithm hmac-sha512; secret \"{b64}\"; }};"
        ))
        .unwrap();
        assert_eq!(k.secret, secret);
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha512);
    }

    #[test]
    fn a_bad_statement_is_refused_with_its_cause() {
        let e = TsigKey::parse("key \"k.\" { algorithm hmac-md5; secret \"AAAA\"; };").unwrap_err();
        assert!(e.contains("hmac-md5"), "{e}");
        let e =
            TsigKey::parse("key \"k.\" { algorithm hmac-sha256; secret \"#!\"; };").unwrap_err();
        assert!(e.contains("base64"), "{e}");
        let e = TsigKey::parse("options { };").unwrap_err();
        assert!(e.contains("expected `key"), "{e}");
    }
}
