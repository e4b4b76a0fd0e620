//! The Host Identity lines of draft-tschofenig-hiprg-host-identities §3.2:
//!
//! ```text
//! k=host-identity:<base64 HI>            a=key-mgmt:host-identity <base64 HI>
//! k=host-identity-tag:<HIT>              a=key-mgmt:host-identity-tag <HIT>
//! ```
//!
//! at session level or inside a media description (several devices/streams may each have
//! their own). A HIT is written as 32 hex digits (the draft's example) or as IPv6 text
//! (a HIT is an IPv6 address, RFC 7401 §3). `k=` is deprecated by RFC 8866 §5.12, so the
//! default for what we send is the `a=key-mgmt:` form of RFC 4567.

use std::{fmt, net::Ipv6Addr, str::FromStr};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{Sdp, SdpError};

/// `k=` method / `a=key-mgmt:` protocol id for a full Host Identity (draft §3.2).
pub const METHOD_HI: &str = "host-identity";
/// `k=` method / `a=key-mgmt:` protocol id for a Host Identity Tag (draft §3.2).
pub const METHOD_HIT: &str = "host-identity-tag";

/// A Host Identity Tag: 128 bits, an IPv6 address in form (RFC 7401 §3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hit(pub [u8; 16]);

impl Hit {
    /// The HIT as 32 upper-case hex digits, the draft's notation.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02X}")).collect()
    }

    /// The HIT as an IPv6 address.
    pub fn to_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.0)
    }

    /// Writes the HIT in `format`.
    pub fn format(&self, format: HitFormat) -> String {
        match format {
            HitFormat::Hex => self.to_hex(),
            HitFormat::Ipv6 => self.to_ipv6().to_string(),
        }
    }
}

impl From<Ipv6Addr> for Hit {
    fn from(a: Ipv6Addr) -> Self {
        Self(a.octets())
    }
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_ipv6(), f)
    }
}

impl fmt::Debug for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hit({})", self.to_ipv6())
    }
}

/// Why a HIT value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HitParseError {
    /// Nothing was given.
    #[error("empty")]
    Empty,
    /// A character that is not a hex digit in the 32-digit form.
    #[error("not a hex digit: {0:?}")]
    BadHex(char),
    /// The hex form does not have exactly 32 digits.
    #[error("{0} hex digits, expected 32")]
    WrongLength(usize),
    /// Contains `:` but is not IPv6 text (RFC 4291 §2.2).
    #[error("not an IPv6 address")]
    NotIpv6,
}

impl FromStr for Hit {
    type Err = HitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(HitParseError::Empty);
        }
        if s.contains(':') {
            return Ipv6Addr::from_str(s)
                .map(Self::from)
                .map_err(|_| HitParseError::NotIpv6);
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(HitParseError::BadHex(c));
        }
        if s.len() != 32 {
            return Err(HitParseError::WrongLength(s.len()));
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            // ASCII hex checked above, so every 2-byte slice is on a char boundary.
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| HitParseError::BadHex('?'))?;
        }
        Ok(Self(out))
    }
}

impl Serialize for Hit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.to_ipv6())
    }
}

impl<'de> Deserialize<'de> for Hit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a HIT is written in what we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HitFormat {
    /// 32 upper-case hex digits, as in the draft's example.
    #[default]
    Hex,
    /// IPv6 text (RFC 5952).
    Ipv6,
}

/// Which SDP line carries an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// `a=key-mgmt:host-identity[-tag] …` (RFC 4567 attribute; the default, since `k=` is
    /// deprecated by RFC 8866 §5.12).
    #[default]
    KeyMgmt,
    /// `k=host-identity[-tag]:…` (the draft's example).
    K,
}

/// Where an identity applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "level", content = "index")]
pub enum Scope {
    /// Session level: every media description that has none of its own.
    Session,
    /// Media description number N (0-based, in `m=` order).
    Media(usize),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Session => f.write_str("session"),
            Self::Media(i) => write!(f, "media {i}"),
        }
    }
}

/// What a line carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A Host Identity Tag only.
    Hit,
    /// A full Host Identity (its HIT derived from it).
    Hi,
}

/// One identity line found in an SDP body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityEntry {
    /// Session or media index.
    pub scope: Scope,
    /// `k=` or `a=key-mgmt:`.
    pub form: Form,
    /// HIT or HI line.
    pub kind: Kind,
    /// The HIT: as written, or derived from the HI.
    pub hit: Hit,
    /// The HI bytes (decoded base64) when the line carried one.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_b64")]
    pub hi: Option<Vec<u8>>,
    /// 1-based line number in the body.
    pub line: usize,
}

fn ser_b64<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
        None => s.serialize_none(),
    }
}

/// An identity to put into SDP: our HIT and, optionally, our HI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// The HIT.
    pub hit: Hit,
    /// The HI as carried in a HIP HOST_ID parameter, if it is to be sent too.
    pub hi: Option<Vec<u8>>,
}

/// Offer/answer rules for what we send (configurable; see the daemon's `[sip.sdp]` config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityPolicy {
    /// Line form in an offer.
    pub form: Form,
    /// In an answer, use the form the offer used (falls back to `form` if the offer had none).
    pub mirror_offer_form: bool,
    /// How the HIT is written.
    pub hit_format: HitFormat,
    /// Per media description (as in the draft's example) or once at session level.
    pub per_media: bool,
    /// Also send the full HI (so the peer can check the HIT itself).
    pub send_hi: bool,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        Self {
            form: Form::KeyMgmt,
            mirror_offer_form: true,
            hit_format: HitFormat::Hex,
            per_media: true,
            send_hi: false,
        }
    }
}

/// Parses one line as a Host Identity line; `Ok(None)` for every other line.
fn classify(kind: char, value: &str) -> Option<(Form, Kind, &str)> {
    let (form, method, data) = match kind {
        // RFC 8866 §5.12: k=<method>:<encryption key>
        'k' => {
            let (m, d) = value.split_once(':')?;
            (Form::K, m.trim(), d)
        }
        // RFC 4567 §3.1: a=key-mgmt:<prtcl-id> <keymgmt-data>
        'a' => {
            let (attr, rest) = value.split_once(':')?;
            if !attr.eq_ignore_ascii_case("key-mgmt") {
                return None;
            }
            let rest = rest.trim_start();
            // Any whitespace ends the method, as `trim` does for `k=`: a body cut right
            // after a CR leaves it at the end of the last line's text, and the line must
            // read the same once a line is appended after it (found by fuzz/sdp_parse).
            let (m, d) = rest
                .split_once(|c: char| c.is_ascii_whitespace())
                .unwrap_or((rest, ""));
            (Form::KeyMgmt, m, d)
        }
        _ => return None,
    };
    let kind = if method.eq_ignore_ascii_case(METHOD_HIT) {
        Kind::Hit
    } else if method.eq_ignore_ascii_case(METHOD_HI) {
        Kind::Hi
    } else {
        return None;
    };
    Some((form, kind, data.trim()))
}

/// Finds every Host Identity line in `sdp`.
///
/// `derive` turns an HI (the bytes of the HOST_ID parameter's HI, RFC 7401 §5.2.9) into its
/// HIT; the HIP core provides it. Fails on the first malformed value, and when a scope holds
/// both HIs and HITs and some HIT matches none of the HIs (the draft requires them to agree).
pub fn find_identities(
    sdp: &Sdp,
    derive: &dyn Fn(&[u8]) -> Result<Hit, String>,
) -> Result<Vec<IdentityEntry>, SdpError> {
    let mut found = Vec::new();
    for (line, scope, kind, value) in sdp.typed_lines() {
        let Some((form, kind, data)) = classify(kind, value) else {
            continue;
        };
        let entry = match kind {
            Kind::Hit => {
                let hit = data.parse::<Hit>().map_err(|reason| SdpError::BadHit {
                    line,
                    value: data.to_owned(),
                    reason,
                })?;
                IdentityEntry {
                    scope,
                    form,
                    kind,
                    hit,
                    hi: None,
                    line,
                }
            }
            Kind::Hi => {
                let bad = || SdpError::BadBase64 {
                    line,
                    value: data.chars().take(40).collect(),
                };
                if data.is_empty() {
                    return Err(bad());
                }
                let hi = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(|_| bad())?;
                let hit =
                    derive(&hi).map_err(|reason| SdpError::BadHostIdentity { line, reason })?;
                IdentityEntry {
                    scope,
                    form,
                    kind,
                    hit,
                    hi: Some(hi),
                    line,
                }
            }
        };
        found.push(entry);
    }
    // An HI and a HIT given together must agree (draft §3.2: the HIT is the hash of the HI).
    for e in found.iter().filter(|e| e.kind == Kind::Hit) {
        let his: Vec<&IdentityEntry> = found
            .iter()
            .filter(|o| o.scope == e.scope && o.kind == Kind::Hi)
            .collect();
        if !his.is_empty() && !his.iter().any(|h| h.hit == e.hit) {
            return Err(SdpError::HiHitMismatch {
                line: e.line,
                hit: e.hit,
                scope: e.scope,
            });
        }
    }
    Ok(found)
}

/// The HITs that apply to media description `index`: its own if it has any, else the
/// session-level ones (RFC 8866 §5: media-level lines override session-level ones).
/// Duplicates (an HI and its HIT) appear once.
pub fn hits_for_media(entries: &[IdentityEntry], index: usize) -> Vec<Hit> {
    let pick = |scope: Scope| {
        let mut v: Vec<Hit> = Vec::new();
        for e in entries.iter().filter(|e| e.scope == scope) {
            if !v.contains(&e.hit) {
                v.push(e.hit);
            }
        }
        v
    };
    let own = pick(Scope::Media(index));
    if own.is_empty() {
        pick(Scope::Session)
    } else {
        own
    }
}

/// Removes every Host Identity line from `scope` (to replace ours in a re-offer).
pub fn remove_identities(sdp: &mut Sdp, scope: Scope) -> Result<usize, SdpError> {
    let range = sdp.section(scope).ok_or(match scope {
        Scope::Media(i) => SdpError::NoSuchMedia(i),
        Scope::Session => SdpError::Empty,
    })?;
    let before = sdp.lines.len();
    let mut idx = 0usize;
    sdp.lines.retain(|l| {
        let keep =
            !(range.contains(&idx) && l.kind().and_then(|k| classify(k, l.value())).is_some());
        idx += 1;
        keep
    });
    Ok(before - sdp.lines.len())
}

/// Adds `id` to `scope` in `form`: the HIT line, then the HI line if `id.hi` is set.
///
/// `k=` goes before the section's first `a=` line (RFC 8866 §5 order: … `k=` `a=`), and
/// `a=key-mgmt:` at the end of the section; nothing else moves.
pub fn insert_identity(
    sdp: &mut Sdp,
    scope: Scope,
    form: Form,
    format: HitFormat,
    id: &HostIdentity,
) -> Result<(), SdpError> {
    let range = sdp.section(scope).ok_or(match scope {
        Scope::Media(i) => SdpError::NoSuchMedia(i),
        Scope::Session => SdpError::Empty,
    })?;
    let mut texts = vec![match form {
        Form::K => format!("k={METHOD_HIT}:{}", id.hit.format(format)),
        Form::KeyMgmt => format!("a=key-mgmt:{METHOD_HIT} {}", id.hit.format(format)),
    }];
    if let Some(hi) = &id.hi {
        let b64 = base64::engine::general_purpose::STANDARD.encode(hi);
        texts.push(match form {
            Form::K => format!("k={METHOD_HI}:{b64}"),
            Form::KeyMgmt => format!("a=key-mgmt:{METHOD_HI} {b64}"),
        });
    }
    // Blank trailing lines stay trailing: insert before them.
    let mut end = range.end;
    while end > range.start && sdp.lines.get(end - 1).is_some_and(|l| l.text.is_empty()) {
        end -= 1;
    }
    let at = match form {
        Form::K => sdp.lines[range.start..end]
            .iter()
            .position(|l| l.kind() == Some('a'))
            .map_or(end, |p| range.start + p),
        Form::KeyMgmt => end,
    };
    for (n, t) in texts.into_iter().enumerate() {
        sdp.insert_line(at + n, t);
    }
    Ok(())
}

/// The form the peer used, if it sent any identity (for mirroring in an answer).
pub fn form_used(entries: &[IdentityEntry]) -> Option<Form> {
    entries.first().map(|e| e.form)
}
