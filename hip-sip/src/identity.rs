//! SIP Identity (RFC 8224) whose PASSporT (RFC 8225) binds the Host Identity Tags of the
//! SDP it travels with: the draft's §4 protection of the HIT exchange, for the caller's
//! INVITE and for the callee's UPDATE of §4.1 (a response cannot carry RFC 8224 Identity).
//!
//! # The `hip` PASSporT extension (project-defined)
//!
//! No RFC defines a PASSporT claim for HITs; RFC 8225 §8 lets specifications extend the
//! claim set, naming the extension in a `ppt` header parameter (§8.1) and stating which
//! claims it adds (§8.3). This project defines, for its own use only (it is not in the
//! IANA PASSporT Extensions registry):
//!
//! * `ppt` value **`hip`**, in the JWS protected header and in the Identity header's
//!   `ppt` parameter (RFC 8224 §4), so a verifier that does not know it refuses the token
//!   instead of accepting it without checking the HITs;
//! * claim **`hit`**: a JSON array of the HITs of the request's SDP, each as the draft's
//!   §3.2 `host-identity-tag` value (32 upper-case hex digits), in SDP order without
//!   duplicates. The verifier compares it as a set with the HITs of the SDP it received.
//!
//! With the baseline claims `orig`, `dest` and `iat` (RFC 8225 §5.1–5.2) the token then
//! says: *the domain of `orig` vouches that its user, calling `dest` at time `iat`, offers
//! these HITs.* A proxy that swaps the HIT in the SDP breaks the comparison; one that swaps
//! the HIT in the claim breaks the signature.
//!
//! # Encoding
//!
//! ES256 only (RFC 8224 §12 mandatory algorithm), full form only: the compact form (RFC
//! 8224 §4.1, header and payload left out and rebuilt by the verifier) cannot carry the
//! `hit` claim, so it is refused. JSON is written in RFC 8225 §9's deterministic form
//! (keys in lexicographic order, no white space); with no HITs the token is a baseline
//! PASSporT, which reproduces RFC 8225 Appendix A byte for byte (tested).
//!
//! Trust is configured, never fetched: the verifier maps the `From` domain to a public
//! key. The `info`/`x5u` URI is carried as RFC 8224 §4 requires and shown to operators,
//! but no certificate is dereferenced.
//!
//! `sipx-sip` (our SIP parser) has an RFC 8224 module, but behind a feature that pulls a
//! second major version of `p256`, and its verifier refuses every `ppt` extension and every
//! claim beyond the baseline — the very claim this module exists for. The Identity header
//! grammar and the canonical identities are therefore written here, on top of sipx's URI
//! parser; the cryptography is RustCrypto's `p256` (ES256 = ECDSA P-256 SHA-256, RFC 7518
//! §3.4).

use std::fmt;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use p256::ecdsa::{
    Signature,
    signature::{Signer as _, Verifier as _},
};
use serde_json::Value;

use crate::sdp::Hit;

/// The `ppt` value of the project's HIT extension (see the module docs).
pub const PPT: &str = "hip";
/// The claim that carries the HITs (see the module docs).
pub const HIT_CLAIM: &str = "hit";
/// The one algorithm implemented (RFC 8224 §12: ES256 is mandatory to implement).
pub const ALG: &str = "ES256";

/// Why a PASSporT could not be made or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A key file is not a P-256 key in PEM (PKCS#8 or SEC1 private, SPKI public).
    #[error("not a P-256 {what} key in PEM: {why}")]
    Key {
        /// `private` or `public`.
        what: &'static str,
        /// The decoder's message.
        why: String,
    },
    /// A URI has no canonical identity (RFC 8224 §8): not `sip:`/`sips:`/`tel:`, or no user.
    #[error("no canonical identity for {0:?} (RFC 8224 §8)")]
    Uri(String),
    /// The Identity header or its PASSporT does not parse (grammar, base64url, JSON, claims).
    #[error("malformed Identity header: {0}")]
    Malformed(String),
    /// The compact form (RFC 8224 §4.1) has no room for the `hit` claim.
    #[error("compact-form PASSporT: it cannot carry the `hit` claim")]
    Compact,
    /// `alg` is not ES256.
    #[error("unsupported algorithm {0:?} (only ES256)")]
    Algorithm(String),
    /// The token names a PASSporT extension other than `hip`, or none (RFC 8225 §8.1).
    #[error("PASSporT extension {0:?} is not \"hip\": it does not bind HITs")]
    Extension(String),
    /// No key is configured for the domain of `From`.
    #[error("no trusted key for domain {0:?} ([security] trusted_identities)")]
    UntrustedDomain(String),
    /// The signature does not verify with the domain's key.
    #[error("signature does not verify with the key trusted for {0:?}")]
    Signature(String),
    /// `orig` is not the request's From.
    #[error("orig {claimed:?} is not the From identity {from:?}")]
    Orig {
        /// What the token says.
        claimed: String,
        /// What the request says.
        from: String,
    },
    /// `dest` does not name the request's To.
    #[error("dest {claimed:?} does not name the To identity {to:?}")]
    Dest {
        /// What the token says.
        claimed: Vec<String>,
        /// What the request says.
        to: String,
    },
    /// `iat` is outside the freshness window (RFC 8224 §6.2.2 recommends 60 s).
    #[error("iat {iat} is {age} s from now ({now}); the window is {window} s")]
    Stale {
        /// The token's time.
        iat: i64,
        /// The verifier's time.
        now: i64,
        /// |now − iat|.
        age: u64,
        /// The accepted window.
        window: u64,
    },
    /// The token is valid but binds other HITs than the SDP carries: the SDP was changed
    /// after the sender's domain signed it (the draft's §4 man in the middle).
    #[error("signed HITs {signed:?} differ from the SDP's {sdp:?}")]
    HitMismatch {
        /// HITs in the `hit` claim.
        signed: Vec<String>,
        /// HITs in the SDP.
        sdp: Vec<String>,
    },
}

impl IdentityError {
    /// Whether this failure proves tampering (a valid signature over other HITs), as opposed
    /// to a token that simply cannot be checked or trusted.
    pub fn is_tampering(&self) -> bool {
        matches!(self, Self::HitMismatch { .. })
    }
}

/// An ES256 private key (the authentication service's, RFC 8224 §6.1). Its `Debug` shows
/// no key material.
#[derive(Clone)]
pub struct SigningKey(p256::ecdsa::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a P-256 private key: PKCS#8 (`BEGIN PRIVATE KEY`, what
    /// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes) or SEC1
    /// (`BEGIN EC PRIVATE KEY`, `openssl ecparam -genkey`).
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        use p256::pkcs8::DecodePrivateKey as _;
        let secret = p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|e| p256::SecretKey::from_sec1_pem(pem).map_err(|_| e))
            .map_err(|e| IdentityError::Key {
                what: "private",
                why: e.to_string(),
            })?;
        Ok(Self(secret.into()))
    }

    /// A key from its 32-octet scalar (the caller supplies OS randomness to make a new one).
    pub fn from_scalar(bytes: &[u8]) -> Result<Self, IdentityError> {
        p256::ecdsa::SigningKey::from_slice(bytes)
            .map(Self)
            .map_err(|e| IdentityError::Key {
                what: "private",
                why: e.to_string(),
            })
    }

    /// The key in PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<String, IdentityError> {
        use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
        p256::SecretKey::from(&self.0)
            .to_pkcs8_pem(LineEnding::LF)
            .map(|z| z.to_string())
            .map_err(|e| IdentityError::Key {
                what: "private",
                why: e.to_string(),
            })
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(*self.0.verifying_key())
    }
}

/// An ES256 public key a verifier trusts for one domain.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey(p256::ecdsa::VerifyingKey);

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sec1 = self.0.to_sec1_point(true);
        let hex: String = sec1.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "VerifyingKey({hex})")
    }
}

impl VerifyingKey {
    /// Reads a P-256 public key in SPKI PEM (`BEGIN PUBLIC KEY`, what
    /// `openssl pkey -pubout` writes).
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        use p256::pkcs8::DecodePublicKey as _;
        p256::ecdsa::VerifyingKey::from_public_key_pem(pem)
            .map(Self)
            .map_err(|e| IdentityError::Key {
                what: "public",
                why: e.to_string(),
            })
    }

    /// The key in SPKI PEM.
    pub fn to_pem(&self) -> Result<String, IdentityError> {
        use p256::pkcs8::{EncodePublicKey as _, LineEnding};
        self.0
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| IdentityError::Key {
                what: "public",
                why: e.to_string(),
            })
    }

    /// A key from an uncompressed or compressed SEC1 point (for JWK-style test vectors).
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, IdentityError> {
        p256::ecdsa::VerifyingKey::from_sec1_bytes(bytes)
            .map(Self)
            .map_err(|e| IdentityError::Key {
                what: "public",
                why: e.to_string(),
            })
    }
}

/// The verifier's trust: one public key per domain (RFC 8224 §6.2 "the credential of the
/// domain of the identity"), configured rather than fetched from `info`.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: std::collections::BTreeMap<String, VerifyingKey>,
}

impl Trust {
    /// Trusts `key` for `domain` (compared case-insensitively).
    pub fn insert(&mut self, domain: &str, key: VerifyingKey) {
        self.keys.insert(domain.to_ascii_lowercase(), key);
    }

    /// The key trusted for `domain`.
    pub fn get(&self, domain: &str) -> Option<&VerifyingKey> {
        self.keys.get(&domain.to_ascii_lowercase())
    }

    /// The domains with a key.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether no domain is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A canonical originating or destination identity (RFC 8225 §5.2.1, RFC 8224 §8).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Canonical {
    /// A SIP/SIPS address of record `scheme:user@host`, without port, parameters or headers,
    /// the host in lower case (RFC 8224 §8: URI parameters and port are not part of the
    /// identity; DNS names compare case-insensitively).
    Uri(String),
    /// A telephone number: its digits, `*` and `#` only (RFC 8224 §8.3), from a `tel:` URI
    /// or a SIP URI with `user=phone`.
    Tn(String),
}

impl Canonical {
    fn kind(&self) -> &'static str {
        match self {
            Self::Uri(_) => "uri",
            Self::Tn(_) => "tn",
        }
    }

    /// The identity as the claim carries it.
    pub fn value(&self) -> &str {
        match self {
            Self::Uri(v) | Self::Tn(v) => v,
        }
    }
}

impl fmt::Display for Canonical {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.value())
    }
}

fn parse_uri(uri: &str) -> Option<sipx_sip::Uri> {
    let s = uri.trim();
    if s.contains('<') {
        // A name-addr (display name, `<URI>`, header parameters): sipx's header grammar.
        sipx_sip::headers::Address::parse(s.as_bytes(), "From")
            .ok()
            .map(|a| a.uri)
    } else {
        sipx_sip::Uri::parse(Bytes::copy_from_slice(s.as_bytes())).ok()
    }
}

fn tn_digits(raw: &[u8]) -> Option<String> {
    let number: String = raw
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .iter()
        .filter(|b| b.is_ascii_digit() || matches!(b, b'*' | b'#'))
        .map(|b| char::from(*b))
        .collect();
    (!number.is_empty()).then_some(number)
}

/// The canonical identity of a URI (a From or To URI, with or without `<>`).
pub fn canonical(uri: &str) -> Result<Canonical, IdentityError> {
    let bad = || IdentityError::Uri(uri.to_owned());
    let u = parse_uri(uri).ok_or_else(bad)?;
    let scheme = u.scheme();
    if matches!(scheme, sipx_sip::Scheme::Tel) {
        return tn_digits(u.opaque().unwrap_or_default())
            .map(Canonical::Tn)
            .ok_or_else(bad);
    }
    if !scheme.is_sip() {
        return Err(bad());
    }
    let user = u.decoded_user().ok_or_else(bad)?;
    let phone = u
        .params()
        .and_then(|p| p.value("user"))
        .is_some_and(|v| v.eq_ignore_ascii_case(b"phone"));
    if phone {
        return tn_digits(&user).map(Canonical::Tn).ok_or_else(bad);
    }
    let user = String::from_utf8(user).map_err(|_| bad())?;
    if user.is_empty() || user.chars().any(|c| c.is_control() || c == '@') {
        return Err(bad());
    }
    let host = u.host().ok_or_else(bad)?.to_string().to_ascii_lowercase();
    let scheme = if scheme.is_secure() { "sips" } else { "sip" };
    Ok(Canonical::Uri(format!("{scheme}:{user}@{host}")))
}

/// The domain a URI belongs to: its host in lower case (IPv6 in brackets), whose key a
/// verifier looks up (RFC 8224 §6.2: the authentication service signs for its domain).
pub fn domain_of(uri: &str) -> Option<String> {
    let u = parse_uri(uri)?;
    if !u.scheme().is_sip() {
        return None;
    }
    Some(u.host()?.to_string().to_ascii_lowercase())
}

/// What a PASSporT of the `hip` extension asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `orig`: the identity in From.
    pub orig: Canonical,
    /// `dest`: the identity in To (RFC 8225 allows several; we send one).
    pub dest: Vec<Canonical>,
    /// `iat`: when it was signed, seconds since the Unix epoch.
    pub iat: i64,
    /// `hit`: the HITs of the SDP, in order, without duplicates.
    pub hits: Vec<Hit>,
}

fn json_str(s: &str) -> String {
    // serde_json escapes exactly what JSON needs; a `String` always serializes.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// RFC 8225 §9 deterministic JSON of the protected header: `alg`, `ppt`, `typ`, `x5u`.
fn header_json(info: &str, ppt: bool) -> String {
    let ppt = if ppt {
        format!(",\"ppt\":{}", json_str(PPT))
    } else {
        String::new()
    };
    format!(
        "{{\"alg\":\"{ALG}\"{ppt},\"typ\":\"passport\",\"x5u\":{}}}",
        json_str(info)
    )
}

/// RFC 8225 §9 deterministic JSON of the claims: `dest`, `hit`, `iat`, `orig`.
fn payload_json(c: &Claims) -> String {
    let mut dest_by_kind: Vec<(&str, Vec<String>)> = Vec::new();
    for d in &c.dest {
        match dest_by_kind.iter_mut().find(|(k, _)| *k == d.kind()) {
            Some((_, v)) => v.push(json_str(d.value())),
            None => dest_by_kind.push((d.kind(), vec![json_str(d.value())])),
        }
    }
    dest_by_kind.sort_by(|a, b| a.0.cmp(b.0));
    let dest: Vec<String> = dest_by_kind
        .iter()
        .map(|(k, v)| format!("\"{k}\":[{}]", v.join(",")))
        .collect();
    let hit = if c.hits.is_empty() {
        String::new()
    } else {
        let v: Vec<String> = c.hits.iter().map(|h| json_str(&h.to_hex())).collect();
        format!(",\"{HIT_CLAIM}\":[{}]", v.join(","))
    };
    format!(
        "{{\"dest\":{{{}}}{hit},\"iat\":{},\"orig\":{{\"{}\":{}}}}}",
        dest.join(","),
        c.iat,
        c.orig.kind(),
        json_str(c.orig.value())
    )
}

fn distinct(hits: &[Hit]) -> Vec<Hit> {
    let mut v: Vec<Hit> = Vec::with_capacity(hits.len());
    for h in hits {
        if !v.contains(h) {
            v.push(*h);
        }
    }
    v
}

/// The full-form JWS `header.payload.signature` (RFC 7515 §7.1) of `claims`.
pub fn sign_jws(key: &SigningKey, claims: &Claims, info: &str) -> String {
    let claims = Claims {
        hits: distinct(&claims.hits),
        ..claims.clone()
    };
    let header = URL_SAFE_NO_PAD.encode(header_json(info, !claims.hits.is_empty()));
    let payload = URL_SAFE_NO_PAD.encode(payload_json(&claims));
    let input = format!("{header}.{payload}");
    // RFC 7518 §3.4: ES256 is ECDSA P-256 over SHA-256, the signature R ‖ S (64 octets).
    // p256 signs deterministically (RFC 6979).
    let sig: Signature = key.0.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

/// The value of an Identity header (RFC 8224 §4) carrying `claims`, signed with `key`;
/// `info` is the URI of the signer's credential.
pub fn sign(key: &SigningKey, claims: &Claims, info: &str) -> String {
    let jws = sign_jws(key, claims, info);
    if claims.hits.is_empty() {
        format!("{jws};info=<{info}>;alg={ALG}")
    } else {
        format!("{jws};info=<{info}>;alg={ALG};ppt={PPT}")
    }
}

/// A parsed, not yet verified, Identity header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passport {
    /// The `info` parameter (the credential's URI).
    pub info: String,
    /// The `ppt` of the JWS header, if any.
    pub ppt: Option<String>,
    /// The claims.
    pub claims: Claims,
    signing_input: String,
    signature: Vec<u8>,
}

fn malformed(s: impl Into<String>) -> IdentityError {
    IdentityError::Malformed(s.into())
}

/// Splits `a;b=<x;y>;c` at the semicolons outside angle brackets.
fn split_params(v: &str) -> Result<Vec<&str>, IdentityError> {
    let mut out = Vec::new();
    let (mut start, mut depth) = (0usize, false);
    for (i, b) in v.bytes().enumerate() {
        match b {
            b'<' if !depth => depth = true,
            b'>' if depth => depth = false,
            b';' if !depth => {
                out.push(&v[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth {
        return Err(malformed("unclosed '<' in a parameter"));
    }
    out.push(&v[start..]);
    Ok(out)
}

fn b64(part: &str, what: &str) -> Result<Vec<u8>, IdentityError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| malformed(format!("{what}: not base64url: {e}")))
}

fn canonical_claim(v: &Value, what: &str) -> Result<Vec<Canonical>, IdentityError> {
    let obj = v
        .as_object()
        .ok_or_else(|| malformed(format!("{what} is not an object")))?;
    let mut out = Vec::new();
    for (k, val) in obj {
        let items: Vec<&Value> = match val {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for item in items {
            let s = item
                .as_str()
                .ok_or_else(|| malformed(format!("{what}.{k} is not a string")))?;
            out.push(match k.as_str() {
                "uri" => Canonical::Uri(s.to_owned()),
                "tn" => Canonical::Tn(s.to_owned()),
                other => return Err(malformed(format!("{what} has unknown kind {other:?}"))),
            });
        }
    }
    if out.is_empty() {
        return Err(malformed(format!("{what} is empty")));
    }
    Ok(out)
}

/// Parses an Identity header value and its PASSporT, checking form, algorithm and
/// extension, but not the signature or the claims' meaning ([`verify`] does).
pub fn parse(value: &str) -> Result<Passport, IdentityError> {
    let parts = split_params(value.trim())?;
    let jws = parts.first().map(|s| s.trim()).unwrap_or_default();
    let mut info = None;
    let mut alg = None;
    let mut ppt_param = None;
    for p in &parts[1..] {
        let (name, val) = p.split_once('=').unwrap_or((p, ""));
        let (name, val) = (name.trim().to_ascii_lowercase(), val.trim());
        match name.as_str() {
            "info" => {
                let uri = val
                    .strip_prefix('<')
                    .and_then(|v| v.strip_suffix('>'))
                    .ok_or_else(|| malformed("info is not <URI>"))?;
                if uri.is_empty() || info.replace(uri.to_owned()).is_some() {
                    return Err(malformed("info empty or repeated"));
                }
            }
            "alg" => alg = Some(val.to_owned()),
            "ppt" => ppt_param = Some(val.trim_matches('"').to_owned()),
            _ => {} // RFC 8224 §4: other parameters are extensions; ignored.
        }
    }
    let info = info.ok_or_else(|| malformed("no info parameter (RFC 8224 §4)"))?;
    if let Some(a) = &alg
        && a != ALG
    {
        return Err(IdentityError::Algorithm(a.clone()));
    }
    let segs: Vec<&str> = jws.split('.').collect();
    let [h, p, s] = segs.as_slice() else {
        return Err(malformed(format!(
            "the PASSporT has {} dot-separated parts, not 3",
            segs.len()
        )));
    };
    if h.is_empty() && p.is_empty() {
        return Err(IdentityError::Compact);
    }
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(malformed("an empty JWS part"));
    }
    let header: Value = serde_json::from_slice(&b64(h, "JWS header")?)
        .map_err(|e| malformed(format!("JWS header: {e}")))?;
    let payload: Value = serde_json::from_slice(&b64(p, "JWS payload")?)
        .map_err(|e| malformed(format!("JWS payload: {e}")))?;
    let signature = b64(s, "JWS signature")?;
    let hget = |k: &str| header.get(k).and_then(Value::as_str);
    match hget("alg") {
        Some(ALG) => {}
        Some(other) => return Err(IdentityError::Algorithm(other.to_owned())),
        None => return Err(malformed("JWS header has no alg")),
    }
    if hget("typ") != Some("passport") {
        return Err(malformed("JWS header typ is not \"passport\""));
    }
    // RFC 8224 §4: the info parameter names the same credential as x5u.
    if hget("x5u") != Some(info.as_str()) {
        return Err(malformed("x5u differs from the info parameter"));
    }
    let ppt = hget("ppt").map(str::to_owned);
    if ppt != ppt_param && ppt_param.is_some() {
        return Err(malformed(
            "the ppt parameter differs from the JWS header's ppt",
        ));
    }
    let orig = canonical_claim(
        payload
            .get("orig")
            .ok_or_else(|| malformed("no orig claim"))?,
        "orig",
    )?;
    let [orig] = <[Canonical; 1]>::try_from(orig)
        .map_err(|_| malformed("orig names more than one identity"))?;
    let dest = canonical_claim(
        payload
            .get("dest")
            .ok_or_else(|| malformed("no dest claim"))?,
        "dest",
    )?;
    let iat = payload
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or_else(|| malformed("no integer iat claim"))?;
    let hits = match payload.get(HIT_CLAIM) {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| malformed("a hit is not a string"))?
                    .parse::<Hit>()
                    .map_err(|e| malformed(format!("hit claim: {e}")))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(malformed("the hit claim is not an array")),
    };
    Ok(Passport {
        info,
        ppt,
        claims: Claims {
            orig,
            dest,
            iat,
            hits,
        },
        signing_input: format!("{h}.{p}"),
        signature,
    })
}

impl Passport {
    /// Checks the ES256 signature with `key`.
    pub fn verify_signature(&self, key: &VerifyingKey) -> bool {
        es256_verify(key, self.signing_input.as_bytes(), &self.signature)
    }
}

/// ES256 (RFC 7518 §3.4) over a JWS signing input; `sig` is R ‖ S.
fn es256_verify(key: &VerifyingKey, input: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    if key.0.verify(input, &sig).is_ok() {
        return true;
    }
    // JWS does not require low-S signatures; accept the normalized twin of a high-S one.
    let low = sig.normalize_s();
    low != sig && key.0.verify(input, &low).is_ok()
}

/// What the verifier knows of the request the Identity header came with.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// The request's From URI.
    pub from_uri: &'a str,
    /// The request's To URI.
    pub to_uri: &'a str,
    /// The HITs in the request's SDP.
    pub sdp_hits: &'a [Hit],
    /// The verifier's clock, seconds since the Unix epoch.
    pub now: i64,
    /// How far `iat` may be from `now`, in seconds, either way.
    pub window: u64,
}

/// A PASSporT that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The domain whose key verified it.
    pub domain: String,
    /// The authenticated identity (`orig`).
    pub orig: String,
    /// When it was signed.
    pub iat: i64,
    /// The HITs it binds (equal, as a set, to the SDP's).
    pub hits: Vec<Hit>,
    /// The signer's credential URI (`info`).
    pub info: String,
}

/// Verifies one Identity header value against the request it came with (RFC 8224 §6.2):
/// extension, the From domain's trusted key, signature, `orig` = From, `dest` ∋ To, `iat`
/// fresh, and — last, so that only an otherwise valid token can prove tampering — the
/// signed HITs equal the SDP's.
pub fn verify(value: &str, trusted: &Trust, exp: &Expected<'_>) -> Result<Verified, IdentityError> {
    let pp = parse(value)?;
    match pp.ppt.as_deref() {
        Some(PPT) => {}
        Some(other) => return Err(IdentityError::Extension(other.to_owned())),
        None => return Err(IdentityError::Extension(String::new())),
    }
    let domain = domain_of(exp.from_uri).ok_or_else(|| IdentityError::Uri(exp.from_uri.into()))?;
    let key = trusted
        .get(&domain)
        .ok_or_else(|| IdentityError::UntrustedDomain(domain.clone()))?;
    if !pp.verify_signature(key) {
        return Err(IdentityError::Signature(domain));
    }
    let from = canonical(exp.from_uri)?;
    if pp.claims.orig != from {
        return Err(IdentityError::Orig {
            claimed: pp.claims.orig.value().to_owned(),
            from: from.value().to_owned(),
        });
    }
    let to = canonical(exp.to_uri)?;
    if !pp.claims.dest.contains(&to) {
        return Err(IdentityError::Dest {
            claimed: pp
                .claims
                .dest
                .iter()
                .map(|d| d.value().to_owned())
                .collect(),
            to: to.value().to_owned(),
        });
    }
    let age = exp.now.abs_diff(pp.claims.iat);
    if age > exp.window {
        return Err(IdentityError::Stale {
            iat: pp.claims.iat,
            now: exp.now,
            age,
            window: exp.window,
        });
    }
    let mut signed = distinct(&pp.claims.hits);
    let mut sdp = distinct(exp.sdp_hits);
    signed.sort();
    sdp.sort();
    if signed != sdp {
        return Err(IdentityError::HitMismatch {
            signed: pp.claims.hits.iter().map(Hit::to_hex).collect(),
            sdp: exp.sdp_hits.iter().map(Hit::to_hex).collect(),
        });
    }
    Ok(Verified {
        domain,
        orig: from.value().to_owned(),
        iat: pp.claims.iat,
        hits: pp.claims.hits,
        info: pp.info,
    })
}

/// Verifies every Identity header of a request (RFC 8224 §4 allows several) and returns
/// the first that verifies; otherwise the most telling failure (tampering first), or
/// `None` when there was no header at all.
pub fn verify_any(
    values: &[String],
    trusted: &Trust,
    exp: &Expected<'_>,
) -> Option<Result<Verified, IdentityError>> {
    let mut first_err = None;
    for v in values {
        match verify(v, trusted, exp) {
            Ok(ok) => return Some(Ok(ok)),
            Err(e) if e.is_tampering() => first_err = Some(e),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    first_err.map(Err)
}

#[cfg(test)]
mod tests;
