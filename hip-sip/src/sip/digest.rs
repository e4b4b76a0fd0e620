//! Digest authentication (RFC 3261 §22.4, RFC 7616 formulas, RFC 8760 algorithms for SIP).
//!
//! The hashing is `sipx-sip`'s (`auth::respond`, RustCrypto md-5/sha2 inside); this module
//! keeps its types out of the public API and adds the nonce-count bookkeeping per nonce.

use sipx_sip::auth;

/// Digest algorithms (RFC 8760 §2: MD5, SHA-256, SHA-512/256, and the `-sess` variants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    /// MD5 (RFC 2617; what most registrars still offer).
    Md5,
    /// MD5-sess.
    Md5Sess,
    /// SHA-256 (RFC 7616, RFC 8760).
    Sha256,
    /// SHA-256-sess.
    Sha256Sess,
    /// SHA-512-256.
    Sha512_256,
    /// SHA-512-256-sess.
    Sha512_256Sess,
}

impl DigestAlgorithm {
    fn from_sipx(a: auth::Algorithm) -> Self {
        match a {
            auth::Algorithm::Md5Sess => Self::Md5Sess,
            auth::Algorithm::Sha256 => Self::Sha256,
            auth::Algorithm::Sha256Sess => Self::Sha256Sess,
            auth::Algorithm::Sha512_256 => Self::Sha512_256,
            auth::Algorithm::Sha512_256Sess => Self::Sha512_256Sess,
            _ => Self::Md5,
        }
    }

    fn to_sipx(self) -> auth::Algorithm {
        match self {
            Self::Md5 => auth::Algorithm::Md5,
            Self::Md5Sess => auth::Algorithm::Md5Sess,
            Self::Sha256 => auth::Algorithm::Sha256,
            Self::Sha256Sess => auth::Algorithm::Sha256Sess,
            Self::Sha512_256 => auth::Algorithm::Sha512_256,
            Self::Sha512_256Sess => auth::Algorithm::Sha512_256Sess,
        }
    }
}

/// One parsed `WWW-Authenticate` / `Proxy-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestChallenge {
    /// Protection space.
    pub realm: String,
    /// Server nonce.
    pub nonce: String,
    /// Opaque value echoed back.
    pub opaque: Option<String>,
    /// Algorithm (absent = MD5).
    pub algorithm: DigestAlgorithm,
    /// Whether `qop=auth` was offered.
    pub qop_auth: bool,
    /// From a proxy (407 → `Proxy-Authorization`) or a UAS/registrar (401 → `Authorization`).
    pub from_proxy: bool,
}

impl DigestChallenge {
    /// Parses one challenge header value; `None` if it is not a Digest challenge we support
    /// (RFC 8760 §2.4: a client ignores challenges it does not understand).
    pub fn parse(value: &[u8], from_proxy: bool) -> Option<Self> {
        let c = auth::Challenge::parse(value, from_proxy)?;
        Some(Self {
            realm: c.realm,
            nonce: c.nonce,
            opaque: c.opaque,
            algorithm: DigestAlgorithm::from_sipx(c.algorithm),
            qop_auth: c.qop_auth,
            from_proxy: c.from_proxy,
        })
    }

    fn to_sipx(&self) -> auth::Challenge {
        auth::Challenge {
            realm: self.realm.clone(),
            nonce: self.nonce.clone(),
            opaque: self.opaque.clone(),
            algorithm: self.algorithm.to_sipx(),
            qop_auth: self.qop_auth,
            stale: false,
            from_proxy: self.from_proxy,
        }
    }

    /// Strength rank for picking among several challenges (stronger wins; RFC 8760 §3 warns
    /// that honouring the server's order opens a downgrade to MD5).
    fn strength(&self) -> u8 {
        self.algorithm.to_sipx().strength()
    }
}

/// The credentials header value answering `challenge` for `method` on `uri` (the
/// Request-URI), with nonce count `nc` and client nonce `cnonce`.
pub fn digest_response(
    challenge: &DigestChallenge,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    auth::respond(
        &challenge.to_sipx(),
        &auth::Credentials::new(username, password),
        method,
        uri,
        nc,
        cnonce,
    )
}

/// Picks the strongest supported challenge among header values.
pub(crate) fn pick<'a>(
    values: impl Iterator<Item = &'a [u8]>,
    from_proxy: bool,
) -> Option<DigestChallenge> {
    values
        .filter_map(|v| DigestChallenge::parse(v, from_proxy))
        .reduce(|best, next| {
            if next.strength() > best.strength() {
                next
            } else {
                best
            }
        })
}
