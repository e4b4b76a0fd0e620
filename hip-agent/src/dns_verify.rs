//! Host Identities in DNS for calls (`[dns]`, RFC 8005): publishing our HIP RR and checking
//! the peer's HIT against its DNSSEC-validated HIP RR.
//!
//! The daemon's loop never waits on DNS: [`DnsVerifier::want`] answers from the cache or
//! starts a lookup in a task of its own (bounded by `[dns] timeout_ms`), whose answer comes
//! back through [`DnsVerifier::recv`] as one more input of the loop; [`DnsVerifier::apply`]
//! then turns it into the call's [`SipAssurance`].
//!
//! Which name: `[dns] peers` (SIP URI → name), else `peer_name_template` over the peer's
//! URI — the identity the call is with and the user sees. Not the Contact or Record-Route
//! host: whoever can rewrite the SDP's HIT on the path can rewrite those headers too, and
//! would point us at a name whose (validly signed) record carries their own HIT.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hip_dns::client::{self, load_trust_anchor};
use hip_dns::{HipRdata, Lookup, Name, Resolver, TsigKey, UpdateTarget, Validation};
use hip_proto::{Hit, HostId};
use hip_sip::sip::CallHandle;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::config::DnsSection;
use crate::daemon::AgentEvent;
use crate::secure::{Mechanism, SipAssurance};

/// Cache bound (entries); expired ones go first.
const CACHE_MAX: usize = 4096;
/// Longest time an answer is kept, whatever its TTL.
const CACHE_TTL_MAX: Duration = Duration::from_secs(3600);
/// How long a failed lookup (timeout, SERVFAIL) is remembered before it is tried again.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// What a lookup established about one name.
#[derive(Clone, Debug)]
pub struct Checked {
    /// Validation state of the HIP RRset.
    pub validation: Validation,
    /// HITs of records whose HIT is the one their key hashes to.
    pub hits: Vec<Hit>,
    /// Records refused (HIT/key disagreement, unsupported key).
    pub refused: Vec<String>,
    /// The lookup failed (timeout, network, SERVFAIL): why.
    pub error: Option<String>,
}

impl Checked {
    fn from_lookup(l: &Lookup) -> Self {
        let mut hits = Vec::new();
        let mut refused = Vec::new();
        for a in &l.hip {
            match &a.verified {
                Ok((_, hit)) => hits.push(*hit),
                Err(e) => refused.push(e.to_string()),
            }
        }
        Self {
            validation: l.validation,
            hits,
            refused,
            error: None,
        }
    }
}

/// A finished lookup, fed back into the daemon's loop.
#[derive(Debug)]
pub struct Answer {
    name: Name,
    result: Result<(Checked, Duration), String>,
}

/// What DNS says about a call's peer HIT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A DNSSEC-validated HIP RR carries the HIT SIP gave us.
    Match(String),
    /// A DNSSEC-validated HIP RRset carries other HITs only: the SDP was altered, or the
    /// peer is not who its URI says.
    Mismatch(String),
    /// Nothing usable (no record, not validated, lookup failed): noted, changes nothing.
    NotUsed(String),
}

struct Cached {
    checked: Checked,
    until: Instant,
}

/// A waiting call: the event to re-dispatch once its peer is verified (a caller with
/// `require_verified_peer` starts HIP only then).
struct Waiting {
    call: CallHandle,
    event: Option<AgentEvent>,
}

/// The DNS side of the agent (one per daemon).
pub struct DnsVerifier {
    cfg: DnsSection,
    resolver: Resolver,
    own_name: Option<Name>,
    own_hit: Hit,
    cache: HashMap<Name, Cached>,
    inflight: HashSet<Name>,
    waiting: HashMap<Name, Vec<Waiting>>,
    tx: mpsc::Sender<Answer>,
    rx: mpsc::Receiver<Answer>,
    /// Our record's upkeep (`None`: not publishing), written by its task.
    publish: Option<Arc<Mutex<PublishStatus>>>,
    /// The task that publishes our record and keeps it there.
    keeper: Option<tokio::task::JoinHandle<()>>,
    /// Finished lookups by outcome (`secure`, `insecure`, `bogus`, `indeterminate`,
    /// `failed`), for `status`.
    outcomes: BTreeMap<&'static str, u64>,
}

impl Drop for DnsVerifier {
    fn drop(&mut self) {
        if let Some(k) = &self.keeper {
            k.abort();
        }
    }
}

/// How our record fares (`status` → `dns.publish`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PublishStatus {
    /// The primary held exactly our record at the last check (or took our update).
    pub in_dns: bool,
    /// Updates the primary accepted: at start-up when its copy was missing or not ours
    /// (another identity, other rendezvous servers), and each time a check found it so.
    pub updates: u64,
    /// Updates refused or unanswered (`last_error` says why); the next check tries again.
    pub failures: u64,
    /// Checks of the primary's copy made.
    pub checks: u64,
    /// Checks that got no usable answer (the update is sent anyway).
    pub check_failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the last accepted update was sent, Unix milliseconds.
    pub last_update_ms: Option<u64>,
    /// The check interval, seconds.
    pub refresh_secs: u64,
}

/// Parses a configured name (validated at config load).
pub fn name(s: &str) -> Result<Name, String> {
    let mut n = Name::from_ascii(s).map_err(|e| format!("{s:?} is not a DNS name: {e}"))?;
    n.set_fqdn(true);
    Ok(n)
}

/// The resolver `[dns]` describes (trust anchor loaded).
pub fn resolver(cfg: &DnsSection) -> Result<Resolver, String> {
    let trust_anchor = match &cfg.trust_anchor {
        Some(p) => Some(load_trust_anchor(p).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok(Resolver {
        server: cfg.lookup_server(),
        trust_anchor,
        timeout: Duration::from_millis(cfg.timeout_ms),
    })
}

/// The update target `[dns]` describes.
pub fn update_target(cfg: &DnsSection) -> Result<UpdateTarget, String> {
    let key_path = cfg.tsig_key.as_deref().ok_or("[dns] tsig_key is not set")?;
    let zone = cfg.zone.as_deref().ok_or("[dns] zone is not set")?;
    Ok(UpdateTarget {
        server: cfg.server,
        zone: name(zone)?,
        key: TsigKey::from_file(key_path).map_err(|e| e.to_string())?,
        timeout: Duration::from_millis(cfg.timeout_ms),
    })
}

/// Our record: the HI from the key file, the configured rendezvous servers.
pub fn own_record(cfg: &DnsSection, hi: &HostId) -> Result<HipRdata, String> {
    let rvs = cfg
        .rendezvous_servers
        .iter()
        .map(|r| name(r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HipRdata::from_host_id(hi, rvs))
}

/// Our HostId from the key file.
pub fn load_host_id(path: &Path) -> Result<HostId, String> {
    hip_proto::keyfile::load(path)
        .map(|id| id.host_id().clone())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `sip:bob@biloxi.com:5060;transport=udp` or `<sip:bob@biloxi.com>` → `sip:bob@biloxi.com`.
pub fn aor(uri: &str) -> String {
    let u = uri.trim();
    let u = match (u.find('<'), u.find('>')) {
        (Some(a), Some(b)) if a < b => &u[a + 1..b],
        _ => u,
    };
    let u = u.split([';', '?']).next().unwrap_or(u);
    let (scheme, rest) = u.split_once(':').unwrap_or(("sip", u));
    let (user, host) = match rest.rsplit_once('@') {
        Some((user, host)) => (Some(user), host),
        None => (None, rest),
    };
    let host = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    // `sips:` names the same identity as `sip:` (RFC 3261 §19.1): one mapping for both.
    let _ = scheme;
    match user {
        Some(user) => format!("sip:{user}@{}", host.to_ascii_lowercase()),
        None => format!("sip:{}", host.to_ascii_lowercase()),
    }
}

impl DnsVerifier {
    /// Builds the verifier; publishes our record (when configured) and looks up our own
    /// name in the background.
    pub fn start(cfg: &DnsSection, own_hit: Hit, hi: Option<&HostId>) -> Result<Self, String> {
        let resolver = resolver(cfg)?;
        let own_name = cfg.name.as_deref().map(name).transpose()?;
        let (tx, rx) = mpsc::channel(256);
        let mut v = Self {
            cfg: cfg.clone(),
            resolver,
            own_name,
            own_hit,
            cache: HashMap::new(),
            inflight: HashSet::new(),
            waiting: HashMap::new(),
            tx,
            rx,
            publish: None,
            keeper: None,
            outcomes: BTreeMap::new(),
        };
        let publish = if cfg.publishes() {
            let hi = hi.ok_or(
                "[dns] publishing needs an `identity` key file (the record carries the HI)",
            )?;
            let target = update_target(cfg)?;
            let rd = own_record(cfg, hi)?;
            let n = v.own_name.clone().ok_or("[dns] publishing needs `name`")?;
            let st = Arc::new(Mutex::new(PublishStatus {
                refresh_secs: cfg.refresh().as_secs(),
                ..PublishStatus::default()
            }));
            v.publish = Some(Arc::clone(&st));
            Some((target, n, rd, st))
        } else {
            None
        };
        let (ttl, every) = (cfg.ttl, cfg.refresh());
        let own = v.own_name.clone();
        let (res, txc) = (v.resolver.clone(), v.tx.clone());
        if let Some(n) = &own {
            v.inflight.insert(n.clone());
        }
        v.keeper = Some(tokio::spawn(async move {
            let mut first = true;
            loop {
                if let Some((target, n, rd, st)) = &publish {
                    keep_published(target, n, ttl, rd, st).await;
                }
                if first && let Some(n) = own.clone() {
                    let result = lookup(&res, &n).await;
                    let _ = txc.send(Answer { name: n, result }).await;
                }
                first = false;
                if publish.is_none() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        }));
        Ok(v)
    }
}

/// One round of our record's upkeep: is the primary's HIP RRset exactly our record? If
/// not (first start, a new identity or other rendezvous servers, or deleted or replaced
/// behind our back), publish it. A check is one unsigned query to the primary, so a
/// record that is in place costs the zone nothing (no update, no new serial, no
/// re-signing).
async fn keep_published(
    target: &UpdateTarget,
    n: &Name,
    ttl: u32,
    rd: &HipRdata,
    st: &Mutex<PublishStatus>,
) {
    let check = client::published(target.server, n, target.timeout).await;
    let ours = matches!(&check, Ok(v) if v.len() == 1 && v[0].as_ref() == Ok(rd));
    {
        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
        s.checks += 1;
        if let Err(e) = &check {
            s.check_failures += 1;
            tracing::warn!(name = %n, "checking our HIP RR at the primary: {e}");
        }
        if ours {
            s.in_dns = true;
            return;
        }
    }
    let why = match &check {
        Ok(v) if v.is_empty() => "missing",
        Ok(_) => "not ours",
        Err(_) => "unknown",
    };
    let result = client::publish(target, n, ttl, rd).await;
    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(()) => {
            tracing::info!(name = %n, hit = %hex::encode(&rd.hit), was = why, "published our HIP RR");
            s.in_dns = true;
            s.updates += 1;
            s.last_update_ms = Some(crate::daemon::unix_ms());
        }
        Err(e) => {
            tracing::error!(name = %n, was = why, "publishing our HIP RR: {e}");
            s.in_dns = false;
            s.failures += 1;
            s.last_error = Some(e.to_string());
        }
    }
}

/// The daemon's verifier, when `[dns]` is configured: our HIT and HI from `own`.
pub fn start(
    cfg: &crate::config::Config,
    own: &crate::daemon::OwnIdentity,
) -> Result<Option<DnsVerifier>, crate::daemon::DaemonError> {
    let Some(d) = &cfg.dns else { return Ok(None) };
    let hi = own
        .hi
        .as_deref()
        .filter(|b| b.len() > 2)
        .and_then(|b| HostId::from_hi_bytes(u16::from_be_bytes([b[0], b[1]]), &b[2..]).ok());
    DnsVerifier::start(d, Hit(own.hit.0), hi.as_ref())
        .map(Some)
        .map_err(crate::daemon::DaemonError::Dns)
}

impl DnsVerifier {
    /// The DNS name checked for a peer URI, if any.
    pub fn peer_name(&self, peer_uri: &str) -> Option<Name> {
        let a = aor(peer_uri);
        if let Some(n) = self.cfg.peers.get(&a) {
            return name(n).ok();
        }
        let t = self.cfg.peer_name_template.as_deref()?;
        let rest = a.strip_prefix("sip:")?;
        let (user, host) = rest.rsplit_once('@').unwrap_or(("", rest));
        name(&t.replace("{user}", user).replace("{host}", host)).ok()
    }

    /// Whether DNS can vouch for this peer at all: it has a name, and answers can be
    /// validated (a trust anchor). Only then is a call worth holding for DNS.
    pub fn can_vouch(&self, peer_uri: &str) -> bool {
        self.resolver.trust_anchor.is_some() && self.peer_name(peer_uri).is_some()
    }

    /// Starts looking the peer's record up now (a call we place), so that its answer is
    /// likely cached when the callee's HITs arrive.
    pub fn prefetch(&mut self, peer_uri: &str) {
        if let Some(n) = self.peer_name(peer_uri)
            && self.fresh(&n).is_none()
        {
            self.start_lookup(&n);
        }
    }

    /// A call learned its peer's HITs: `Some(name)` when DNS has something to say about the
    /// peer; the lookup starts now unless a fresh answer is cached (then [`Self::apply`]
    /// can be called at once). `event` is re-dispatched by the daemon when the answer
    /// authenticates the peer of a waiting caller.
    pub fn want(
        &mut self,
        call: CallHandle,
        peer_uri: &str,
        event: Option<AgentEvent>,
    ) -> Option<Name> {
        let n = self.peer_name(peer_uri)?;
        if self.fresh(&n).is_none() {
            self.waiting
                .entry(n.clone())
                .or_default()
                .push(Waiting { call, event });
            self.start_lookup(&n);
        }
        // Our own record: until a secure answer with our HIT is cached (it may still have
        // been unsigned when we looked right after publishing), ask again, and let this
        // call take the answer.
        if let Some(own) = self.own_name.clone()
            && !self.own_secure(&own)
        {
            self.waiting
                .entry(own.clone())
                .or_default()
                .push(Waiting { call, event: None });
            self.start_lookup(&own);
        }
        Some(n)
    }

    fn own_secure(&self, own: &Name) -> bool {
        self.fresh(own)
            .is_some_and(|c| c.validation == Validation::Secure && c.hits.contains(&self.own_hit))
    }

    fn fresh(&self, n: &Name) -> Option<&Checked> {
        self.cache
            .get(n)
            .filter(|c| c.until > Instant::now())
            .map(|c| &c.checked)
    }

    fn start_lookup(&mut self, n: &Name) {
        if !self.inflight.insert(n.clone()) {
            return;
        }
        let (res, tx, n) = (self.resolver.clone(), self.tx.clone(), n.clone());
        tokio::spawn(async move {
            let result = lookup(&res, &n).await;
            let _ = tx.send(Answer { name: n, result }).await;
        });
    }

    /// The next finished lookup (cancel-safe: an mpsc receive).
    pub async fn recv(&mut self) -> Answer {
        match self.rx.recv().await {
            Some(a) => a,
            // We hold a sender ourselves, so the channel never closes.
            None => std::future::pending().await,
        }
    }

    /// Takes an answer into the cache; returns the calls that waited for it (with the event
    /// to re-dispatch, if any).
    pub fn answered(&mut self, a: Answer) -> Vec<(CallHandle, Option<AgentEvent>)> {
        self.inflight.remove(&a.name);
        let (checked, ttl) = match a.result {
            // Only a secure answer is kept for its TTL: one that is not (yet) signed is
            // asked again soon.
            Ok((c, ttl)) if c.validation == Validation::Secure => (c, ttl.min(CACHE_TTL_MAX)),
            Ok((c, _)) => (c, NEGATIVE_TTL),
            Err(e) => (
                Checked {
                    validation: Validation::Indeterminate,
                    hits: vec![],
                    refused: vec![],
                    error: Some(e),
                },
                NEGATIVE_TTL,
            ),
        };
        let outcome = match checked.error {
            Some(_) => "failed",
            None => checked.validation.as_str(),
        };
        *self.outcomes.entry(outcome).or_default() += 1;
        tracing::info!(name = %a.name, validation = checked.validation.as_str(), hits = ?checked.hits.iter().map(|h| h.to_string()).collect::<Vec<_>>(), error = ?checked.error, "DNS HIP RR looked up");
        if self.cache.len() >= CACHE_MAX {
            let now = Instant::now();
            self.cache.retain(|_, c| c.until > now);
            if self.cache.len() >= CACHE_MAX {
                self.cache.clear();
            }
        }
        self.cache.insert(
            a.name.clone(),
            Cached {
                checked,
                until: Instant::now() + ttl,
            },
        );
        self.waiting
            .remove(&a.name)
            .unwrap_or_default()
            .into_iter()
            .map(|w| (w.call, w.event))
            .collect()
    }

    /// What the cache says about `peer_hits` of a peer at `peer_uri` (`None`: no name, or
    /// no answer yet).
    pub fn verdict(&self, peer_uri: &str, peer_hits: &[Hit]) -> Option<Verdict> {
        let n = self.peer_name(peer_uri)?;
        let c = self.fresh(&n)?;
        Some(verdict(&n, c, peer_hits))
    }

    /// Applies the cached answers for a call to its assurance. Returns a failure reason
    /// when a validated record contradicts SIP (the call is `failed`).
    pub fn apply(
        &self,
        peer_uri: &str,
        peer_hits: &[Hit],
        sip: &mut SipAssurance,
    ) -> Option<String> {
        let mut failure = None;
        match self.verdict(peer_uri, peer_hits) {
            Some(Verdict::Match(d)) => {
                if sip.peer_via == Some(Mechanism::Identity) {
                    sip.peer_note(format!("also {d}"));
                } else {
                    sip.peer_by(Mechanism::Dns, d);
                }
            }
            Some(Verdict::Mismatch(d)) => {
                sip.peer_not(d.clone());
                failure = Some(d);
            }
            Some(Verdict::NotUsed(d)) => sip.peer_note(d),
            None => {}
        }
        if failure.is_none()
            && let Some(own) = &self.own_name
            && let Some(c) = self.fresh(own)
            && c.validation == Validation::Secure
            && c.hits.contains(&self.own_hit)
            && sip.own_via != Some(Mechanism::Identity)
        {
            sip.own_by(
                Mechanism::Dns,
                format!(
                    "our HIT is in the DNSSEC-validated HIP RR at {own}: a peer that checks it sees any rewrite"
                ),
            );
        }
        failure
    }

    /// Where lookups go (for status).
    pub fn server(&self) -> SocketAddr {
        self.resolver.server
    }

    /// `status` → `dns`: our record's upkeep, lookups by outcome, the cache.
    pub fn status_json(&self) -> Value {
        json!({
            "name": self.own_name.as_ref().map(|n| n.to_string()),
            "server": self.cfg.server,
            "resolver": self.resolver.server,
            "validating": self.resolver.trust_anchor.is_some(),
            "publish": self.publish.as_ref().map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            "lookups": self.outcomes,
            "lookups_in_flight": self.inflight.len(),
            "cache_entries": self.cache.len(),
            "calls_waiting": self.waiting.values().map(Vec::len).sum::<usize>(),
        })
    }
}

fn verdict(n: &Name, c: &Checked, peer_hits: &[Hit]) -> Verdict {
    if let Some(e) = &c.error {
        return Verdict::NotUsed(format!("dns: lookup of {n} failed ({e}): not used"));
    }
    if c.validation != Validation::Secure {
        return Verdict::NotUsed(format!(
            "dns: HIP RR at {n} is {} (not DNSSEC-validated): not used",
            c.validation.as_str()
        ));
    }
    if c.hits.is_empty() {
        let why = if c.refused.is_empty() {
            "no HIP RR".to_string()
        } else {
            c.refused.join("; ")
        };
        return Verdict::NotUsed(format!("dns: {n}: {why}: not used"));
    }
    let list = |v: &[Hit]| v.iter().map(Hit::to_string).collect::<Vec<_>>().join(", ");
    if peer_hits.iter().any(|h| c.hits.contains(h)) {
        Verdict::Match(format!(
            "dns: the DNSSEC-validated HIP RR at {n} carries the peer's HIT ({})",
            list(&c.hits)
        ))
    } else {
        Verdict::Mismatch(format!(
            "dns: the DNSSEC-validated HIP RR at {n} carries {} but SIP carried {}: the SDP was altered or the peer is not {n}",
            list(&c.hits),
            list(peer_hits)
        ))
    }
}

async fn lookup(res: &Resolver, n: &Name) -> Result<(Checked, Duration), String> {
    let l = res.lookup(n).await.map_err(|e| e.to_string())?;
    let ttl = l.hip.iter().map(|a| a.ttl).min().unwrap_or(60);
    Ok((
        Checked::from_lookup(&l),
        Duration::from_secs(u64::from(ttl)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(s: &str) -> Hit {
        Hit(s.parse::<std::net::Ipv6Addr>().unwrap().octets())
    }

    #[test]
    fn aor_drops_everything_but_user_and_host() {
        assert_eq!(
            aor("<sip:bob@Biloxi.com:5060;transport=udp>;tag=x"),
            "sip:bob@biloxi.com"
        );
        assert_eq!(aor("sips:bob@biloxi.com"), "sip:bob@biloxi.com");
        assert_eq!(aor("sip:[2001:db8::1]:5060"), "sip:[2001:db8::1]");
    }

    #[test]
    fn only_a_secure_answer_decides() {
        let n = name("bob.hip.test").unwrap();
        let (a, b) = (hit("2001:20::a"), hit("2001:20::b"));
        let mut c = Checked {
            validation: Validation::Secure,
            hits: vec![a],
            refused: vec![],
            error: None,
        };
        assert!(matches!(verdict(&n, &c, &[a]), Verdict::Match(_)));
        assert!(matches!(verdict(&n, &c, &[b]), Verdict::Mismatch(_)));
        for v in [
            Validation::Bogus,
            Validation::Insecure,
            Validation::Indeterminate,
        ] {
            c.validation = v;
            assert!(
                matches!(verdict(&n, &c, &[a]), Verdict::NotUsed(_)),
                "{v:?}"
            );
            assert!(
                matches!(verdict(&n, &c, &[b]), Verdict::NotUsed(_)),
                "{v:?}"
            );
        }
        c.validation = Validation::Secure;
        c.error = Some("timeout".into());
        assert!(matches!(verdict(&n, &c, &[b]), Verdict::NotUsed(_)));
    }
}
