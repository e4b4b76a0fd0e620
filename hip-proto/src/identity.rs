//! Host Identities: key generation, the HI wire encoding of RFC 7401 §5.2.9 (EdDSA:
//! RFC 9374 §3.4), signatures per HIT suite, and PKCS#8 serialization.

use std::fmt;

use ed25519_dalek::Signer as _;
use p256::elliptic_curve::Generate as _;
use pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand_core::CryptoRng;
use sha2::{Digest, Sha384};
use signature::hazmat::{PrehashSigner, PrehashVerifier};

use crate::hit::{Hit, HitSuite};

/// Errors about Host Identities, HITs and key files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Text that is neither an IPv6 address nor 32 hex digits.
    #[error("not a HIT (IPv6 text or 32 hex digits): {0:?}")]
    BadHit(String),
    /// An HI algorithm this implementation does not handle.
    #[error("unsupported HI algorithm {0}")]
    UnsupportedAlgorithm(u16),
    /// An ECC / EdDSA curve ID this implementation does not handle.
    #[error("unsupported curve {curve} for HI algorithm {algorithm}")]
    UnsupportedCurve {
        /// HI algorithm ID.
        algorithm: u16,
        /// Curve ID.
        curve: u16,
    },
    /// The HI bytes do not decode as a public key of their algorithm.
    #[error("malformed {0} host identity")]
    MalformedHi(&'static str),
    /// A signature did not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// Key generation or signing failed inside the crypto library.
    #[error("crypto library failure: {0}")]
    Crypto(String),
    /// A key file could not be decoded.
    #[error("key file: {0}")]
    KeyFile(String),
    /// A key file is readable or writable by group or others.
    #[error(
        "key file {path} has mode {mode:o}: it must not be accessible by group or others (chmod 600)"
    )]
    KeyFileTooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// I/O on a key file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Legacy XML identity input is malformed.
    #[error("host_identity XML: {0}")]
    Xml(String),
}

/// HI algorithm IDs (RFC 7401 §5.2.9, RFC 9374 §3.4 for EdDSA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum HiAlgorithm {
    /// DSA (RFC 2536), legacy.
    Dsa = 3,
    /// RSA (RFC 3110).
    Rsa = 5,
    /// ECDSA (RFC 4754 curves P-256 / P-384).
    Ecdsa = 7,
    /// ECDSA_LOW (SECP160R1), not supported.
    EcdsaLow = 9,
    /// EdDSA (RFC 8032).
    EdDsa = 13,
}

impl HiAlgorithm {
    /// From the wire value.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            3 => Self::Dsa,
            5 => Self::Rsa,
            7 => Self::Ecdsa,
            9 => Self::EcdsaLow,
            13 => Self::EdDsa,
            _ => return None,
        })
    }
}

/// The key types this implementation generates and uses in exchanges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA over NIST P-256 (the default).
    EcdsaP256,
    /// ECDSA over NIST P-384.
    EcdsaP384,
    /// RSA, 3072-bit modulus by default.
    Rsa,
    /// EdDSA over edwards25519.
    Ed25519,
}

impl Algorithm {
    /// All generatable algorithms.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::EcdsaP256,
        Algorithm::EcdsaP384,
        Algorithm::Rsa,
        Algorithm::Ed25519,
    ];

    /// The CLI / JSON name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::EcdsaP256 => "ecdsa-p256",
            Algorithm::EcdsaP384 => "ecdsa-p384",
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }

    /// Parses a CLI name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// ECC curve IDs inside an ECDSA HI (RFC 7401 §5.2.9).
const ECDSA_CURVE_P256: u16 = 1;
const ECDSA_CURVE_P384: u16 = 2;
/// EdDSA curve IDs inside an EdDSA HI (RFC 9374 §3.4.1).
const EDDSA_CURVE_ED25519: u16 = 1;

/// A public Host Identity.
#[derive(Clone, PartialEq, Eq)]
pub enum HostId {
    /// ECDSA P-256 public key.
    EcdsaP256(p256::ecdsa::VerifyingKey),
    /// ECDSA P-384 public key.
    EcdsaP384(p384::ecdsa::VerifyingKey),
    /// RSA public key (big-endian modulus and exponent without leading zeros).
    Rsa {
        /// Modulus.
        n: Vec<u8>,
        /// Public exponent.
        e: Vec<u8>,
    },
    /// Ed25519 public key.
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId({}, {})", self.algorithm_name(), self.hit())
    }
}

impl HostId {
    /// The generatable algorithm this key belongs to.
    pub fn kind(&self) -> Algorithm {
        match self {
            HostId::EcdsaP256(_) => Algorithm::EcdsaP256,
            HostId::EcdsaP384(_) => Algorithm::EcdsaP384,
            HostId::Rsa { .. } => Algorithm::Rsa,
            HostId::Ed25519(_) => Algorithm::Ed25519,
        }
    }

    /// Name of the algorithm (as on the CLI).
    pub fn algorithm_name(&self) -> &'static str {
        self.kind().name()
    }

    /// The HI algorithm ID on the wire.
    pub fn algorithm(&self) -> HiAlgorithm {
        match self {
            HostId::EcdsaP256(_) | HostId::EcdsaP384(_) => HiAlgorithm::Ecdsa,
            HostId::Rsa { .. } => HiAlgorithm::Rsa,
            HostId::Ed25519(_) => HiAlgorithm::EdDsa,
        }
    }

    /// The HIT suite this HI belongs to (RFC 7401 §5.2.10: RSA → 1, ECDSA → 2;
    /// RFC 9374: EdDSA → 5).
    pub fn hit_suite(&self) -> HitSuite {
        match self {
            HostId::EcdsaP256(_) | HostId::EcdsaP384(_) => HitSuite::EcdsaSha384,
            HostId::Rsa { .. } => HitSuite::RsaDsaSha256,
            HostId::Ed25519(_) => HitSuite::EddsaCshake128,
        }
    }

    /// The "Host Identity" field of HOST_ID.
    ///
    /// * RSA: RFC 3110 §2 (exponent length in one octet, or a zero octet and two octets
    ///   when it exceeds 255; exponent; modulus).
    /// * ECDSA: curve ID (2 octets) then the public key as a SEC1 uncompressed octet
    ///   string (0x04 ‖ x ‖ y), RFC 7401 §5.2.9 referring to RFC 6090's octet-string form.
    /// * EdDSA: curve ID (2 octets) then the RFC 8032 public key (RFC 9374 §3.4.1).
    pub fn to_hi_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        match self {
            HostId::EcdsaP256(k) => {
                v.extend_from_slice(&ECDSA_CURVE_P256.to_be_bytes());
                v.extend_from_slice(&k.to_sec1_bytes());
            }
            HostId::EcdsaP384(k) => {
                v.extend_from_slice(&ECDSA_CURVE_P384.to_be_bytes());
                v.extend_from_slice(&k.to_sec1_bytes());
            }
            HostId::Rsa { n, e } => {
                if e.len() <= 255 {
                    v.push(e.len() as u8);
                } else {
                    v.push(0);
                    v.extend_from_slice(&(e.len() as u16).to_be_bytes());
                }
                v.extend_from_slice(e);
                v.extend_from_slice(n);
            }
            HostId::Ed25519(k) => {
                v.extend_from_slice(&EDDSA_CURVE_ED25519.to_be_bytes());
                v.extend_from_slice(k.as_bytes());
            }
        }
        v
    }

    /// Decodes the "Host Identity" field of a HOST_ID for HI algorithm `alg`.
    pub fn from_hi_bytes(alg: u16, hi: &[u8]) -> Result<Self, IdentityError> {
        match HiAlgorithm::from_u16(alg) {
            Some(HiAlgorithm::Ecdsa) => {
                let (curve, key) = split_curve(hi, "ECDSA")?;
                match curve {
                    ECDSA_CURVE_P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map(HostId::EcdsaP256)
                        .map_err(|_| IdentityError::MalformedHi("ECDSA P-256")),
                    ECDSA_CURVE_P384 => p384::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map(HostId::EcdsaP384)
                        .map_err(|_| IdentityError::MalformedHi("ECDSA P-384")),
                    c => Err(IdentityError::UnsupportedCurve {
                        algorithm: alg,
                        curve: c,
                    }),
                }
            }
            Some(HiAlgorithm::EdDsa) => {
                let (curve, key) = split_curve(hi, "EdDSA")?;
                if curve != EDDSA_CURVE_ED25519 {
                    return Err(IdentityError::UnsupportedCurve {
                        algorithm: alg,
                        curve,
                    });
                }
                let arr: [u8; 32] = key
                    .try_into()
                    .map_err(|_| IdentityError::MalformedHi("Ed25519"))?;
                ed25519_dalek::VerifyingKey::from_bytes(&arr)
                    .map(HostId::Ed25519)
                    .map_err(|_| IdentityError::MalformedHi("Ed25519"))
            }
            Some(HiAlgorithm::Rsa) => {
                let bad = || IdentityError::MalformedHi("RSA");
                let (elen, rest) = match hi.split_first().ok_or_else(bad)? {
                    (0, rest) => {
                        if rest.len() < 2 {
                            return Err(bad());
                        }
                        let l = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                        // RFC 3110 §2: the three-octet form is for exponents over 255
                        // octets; anything else is not canonical (and would not survive
                        // a re-encoding).
                        if l <= 255 {
                            return Err(bad());
                        }
                        (l, &rest[2..])
                    }
                    (l, rest) => (*l as usize, rest),
                };
                if rest.len() <= elen {
                    return Err(bad());
                }
                let (e, n) = rest.split_at(elen);
                if e.first() == Some(&0) || n.first() == Some(&0) || n.len() < 128 {
                    // Leading zeros are not canonical (RFC 3110); moduli under 1024 bits
                    // are refused outright.
                    return Err(bad());
                }
                Ok(HostId::Rsa {
                    n: n.to_vec(),
                    e: e.to_vec(),
                })
            }
            _ => Err(IdentityError::UnsupportedAlgorithm(alg)),
        }
    }

    /// How long this HI's signatures are (for the fuzzing stand-in, `crypto::fuzzing`).
    #[cfg(fuzzing)]
    fn signature_len(&self) -> usize {
        match self {
            HostId::EcdsaP256(_) | HostId::Ed25519(_) => 64,
            HostId::EcdsaP384(_) => 96,
            HostId::Rsa { n, .. } => n.iter().skip_while(|&&b| b == 0).count(),
        }
    }

    /// The HIT of this HI.
    pub fn hit(&self) -> Hit {
        Hit::from_hi(self.hit_suite(), &self.to_hi_bytes())
    }

    /// Verifies `sig` over `msg` as produced by [`HostIdentity::sign`].
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), IdentityError> {
        #[cfg(fuzzing)]
        return if sig.len() == self.signature_len()
            && sig == crate::crypto::fuzzing::signature(&self.to_hi_bytes(), msg, sig.len())
        {
            Ok(())
        } else {
            Err(IdentityError::BadSignature)
        };
        #[allow(unreachable_code)]
        let bad = |_| IdentityError::BadSignature;
        match self {
            HostId::EcdsaP256(k) => {
                let s = p256::ecdsa::Signature::from_slice(sig).map_err(bad)?;
                k.verify_prehash(&Sha384::digest(msg), &s).map_err(bad)
            }
            HostId::EcdsaP384(k) => {
                let s = p384::ecdsa::Signature::from_slice(sig).map_err(bad)?;
                k.verify_prehash(&Sha384::digest(msg), &s).map_err(bad)
            }
            HostId::Ed25519(k) => {
                let s = ed25519_dalek::Signature::from_slice(sig).map_err(bad)?;
                k.verify_strict(msg, &s).map_err(bad)
            }
            HostId::Rsa { n, e } => {
                let pk = aws_lc_rs::signature::RsaPublicKeyComponents { n, e };
                pk.verify(&aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256, msg, sig)
                    .map_err(|_| IdentityError::BadSignature)
            }
        }
    }
}

fn split_curve<'a>(hi: &'a [u8], what: &'static str) -> Result<(u16, &'a [u8]), IdentityError> {
    if hi.len() < 3 {
        return Err(IdentityError::MalformedHi(what));
    }
    Ok((u16::from_be_bytes([hi[0], hi[1]]), &hi[2..]))
}

enum PrivateKey {
    EcdsaP256(p256::ecdsa::SigningKey),
    EcdsaP384(p384::ecdsa::SigningKey),
    Rsa(Box<aws_lc_rs::rsa::KeyPair>),
    Ed25519(ed25519_dalek::SigningKey),
}

/// A private Host Identity: the key pair, its public HI and HIT.
pub struct HostIdentity {
    key: PrivateKey,
    public: HostId,
    hit: Hit,
}

impl fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostIdentity({}, {})",
            self.public.algorithm_name(),
            self.hit
        )
    }
}

impl HostIdentity {
    fn from_key(key: PrivateKey) -> Result<Self, IdentityError> {
        let public = match &key {
            PrivateKey::EcdsaP256(k) => HostId::EcdsaP256(*k.verifying_key()),
            PrivateKey::EcdsaP384(k) => HostId::EcdsaP384(*k.verifying_key()),
            PrivateKey::Ed25519(k) => HostId::Ed25519(k.verifying_key()),
            PrivateKey::Rsa(k) => {
                use aws_lc_rs::signature::KeyPair as _;
                let pk = k.public_key();
                let c = aws_lc_rs::signature::RsaPublicKeyComponents::<Vec<u8>>::from(pk);
                HostId::Rsa { n: c.n, e: c.e }
            }
        };
        let hit = public.hit();
        Ok(Self { key, public, hit })
    }

    /// Generates a new identity. RSA keys are 3072-bit and come from aws-lc's own RNG
    /// (aws-lc-rs takes no caller RNG for RSA key generation); the others use `rng`.
    pub fn generate<R: CryptoRng + ?Sized>(
        alg: Algorithm,
        rng: &mut R,
    ) -> Result<Self, IdentityError> {
        let key = match alg {
            Algorithm::EcdsaP256 => {
                PrivateKey::EcdsaP256(p256::ecdsa::SigningKey::generate_from_rng(rng))
            }
            Algorithm::EcdsaP384 => {
                PrivateKey::EcdsaP384(p384::ecdsa::SigningKey::generate_from_rng(rng))
            }
            Algorithm::Ed25519 => PrivateKey::Ed25519(ed25519_dalek::SigningKey::generate(rng)),
            Algorithm::Rsa => PrivateKey::Rsa(Box::new(
                aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072)
                    .map_err(|e| IdentityError::Crypto(e.to_string()))?,
            )),
        };
        Self::from_key(key)
    }

    /// The public HI.
    pub fn host_id(&self) -> &HostId {
        &self.public
    }

    /// The HIT.
    pub fn hit(&self) -> Hit {
        self.hit
    }

    /// Signs `msg` with the algorithm of this identity's HIT suite (RFC 7401 §5.2.10):
    /// ECDSA with SHA-384 (the signature as fixed-size r ‖ s, RFC 6090 / RFC 4754),
    /// RSASSA-PSS with SHA-256 (RFC 7401 §5.2.9: "the Probabilistic Signature Scheme
    /// (PSS) method of padding MUST be used"; aws-lc draws the salt itself), pure Ed25519
    /// (RFC 8032).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, IdentityError> {
        #[cfg(fuzzing)]
        return Ok(crate::crypto::fuzzing::signature(
            &self.public.to_hi_bytes(),
            msg,
            self.public.signature_len(),
        ));
        #[allow(unreachable_code)]
        let err = |e: signature::Error| IdentityError::Crypto(e.to_string());
        Ok(match &self.key {
            PrivateKey::EcdsaP256(k) => {
                let s: p256::ecdsa::Signature =
                    k.sign_prehash(&Sha384::digest(msg)).map_err(err)?;
                s.to_bytes().to_vec()
            }
            PrivateKey::EcdsaP384(k) => {
                let s: p384::ecdsa::Signature =
                    k.sign_prehash(&Sha384::digest(msg)).map_err(err)?;
                s.to_bytes().to_vec()
            }
            PrivateKey::Ed25519(k) => k.sign(msg).to_bytes().to_vec(),
            PrivateKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(
                    &aws_lc_rs::signature::RSA_PSS_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    msg,
                    &mut sig,
                )
                .map_err(|e| IdentityError::Crypto(e.to_string()))?;
                sig
            }
        })
    }

    /// The private key as a PKCS#8 PEM document ("PRIVATE KEY").
    pub fn to_pkcs8_pem(&self) -> Result<String, IdentityError> {
        let err = |e: pkcs8::Error| IdentityError::KeyFile(e.to_string());
        let pem = match &self.key {
            PrivateKey::EcdsaP256(k) => k.to_pkcs8_pem(LineEnding::LF).map_err(err)?,
            PrivateKey::EcdsaP384(k) => k.to_pkcs8_pem(LineEnding::LF).map_err(err)?,
            PrivateKey::Ed25519(k) => k.to_pkcs8_pem(LineEnding::LF).map_err(err)?,
            PrivateKey::Rsa(k) => {
                use aws_lc_rs::encoding::AsDer;
                let der = k
                    .as_der()
                    .map_err(|e| IdentityError::KeyFile(e.to_string()))?;
                let doc = pkcs8::SecretDocument::try_from(der.as_ref())
                    .map_err(|e| IdentityError::KeyFile(e.to_string()))?;
                doc.to_pem("PRIVATE KEY", LineEnding::LF)
                    .map_err(|e| IdentityError::KeyFile(e.to_string()))?
            }
        };
        Ok(pem.to_string())
    }

    /// Reads a PKCS#8 PEM private key of any supported algorithm.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, IdentityError> {
        if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Self::from_key(PrivateKey::EcdsaP256(k));
        }
        if let Ok(k) = p384::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Self::from_key(PrivateKey::EcdsaP384(k));
        }
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Self::from_key(PrivateKey::Ed25519(k));
        }
        let (label, doc) = pkcs8::SecretDocument::from_pem(pem)
            .map_err(|e| IdentityError::KeyFile(format!("not a PEM document: {e}")))?;
        if label != "PRIVATE KEY" {
            return Err(IdentityError::KeyFile(format!(
                "PEM label {label:?}, expected \"PRIVATE KEY\" (PKCS#8)"
            )));
        }
        let k = aws_lc_rs::rsa::KeyPair::from_pkcs8(doc.as_bytes()).map_err(|e| {
            IdentityError::KeyFile(format!(
                "not an ECDSA P-256/P-384, Ed25519 or RSA PKCS#8 key ({e})"
            ))
        })?;
        Self::from_key(PrivateKey::Rsa(Box::new(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn rng() -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(7)
    }

    #[test]
    fn every_algorithm_signs_verifies_and_round_trips() {
        for alg in Algorithm::ALL {
            let id = HostIdentity::generate(alg, &mut rng()).unwrap();
            let hi = id.host_id().to_hi_bytes();
            let back = HostId::from_hi_bytes(id.host_id().algorithm() as u16, &hi).unwrap();
            assert_eq!(&back, id.host_id(), "{alg}");
            assert_eq!(back.hit(), id.hit());
            assert_eq!(id.hit().suite(), Some(id.host_id().hit_suite()));
            let sig = id.sign(b"message").unwrap();
            back.verify(b"message", &sig).unwrap();
            assert!(matches!(
                back.verify(b"messagf", &sig),
                Err(IdentityError::BadSignature)
            ));
            let pem = id.to_pkcs8_pem().unwrap();
            let again = HostIdentity::from_pkcs8_pem(&pem).unwrap();
            assert_eq!(again.hit(), id.hit(), "{alg}");
        }
    }

    #[test]
    fn hi_wire_sizes() {
        let p256 = HostIdentity::generate(Algorithm::EcdsaP256, &mut rng()).unwrap();
        assert_eq!(p256.host_id().to_hi_bytes().len(), 2 + 65);
        let ed = HostIdentity::generate(Algorithm::Ed25519, &mut rng()).unwrap();
        assert_eq!(ed.host_id().to_hi_bytes().len(), 2 + 32);
    }

    #[test]
    fn malformed_hi_is_an_error() {
        assert!(HostId::from_hi_bytes(7, &[0, 1, 4, 1, 2]).is_err());
        assert!(HostId::from_hi_bytes(7, &[0, 9, 4]).is_err());
        assert!(HostId::from_hi_bytes(13, &[0, 1, 1, 2]).is_err());
        assert!(HostId::from_hi_bytes(5, &[]).is_err());
        assert!(HostId::from_hi_bytes(5, &[0]).is_err());
        assert!(HostId::from_hi_bytes(5, &[3, 1, 0, 1]).is_err());
        // Found by the hip_identity_decode fuzz target: a three-octet exponent length of
        // zero was accepted and did not survive re-encoding.
        let mut long = vec![0, 0, 0, 0x10];
        long.extend_from_slice(&[0x61; 200]);
        assert!(HostId::from_hi_bytes(5, &long).is_err());
        let mut short_form_in_long = vec![0, 0, 3, 1, 0, 1];
        short_form_in_long.extend_from_slice(&[0x61; 200]);
        assert!(HostId::from_hi_bytes(5, &short_form_in_long).is_err());
        assert!(matches!(
            HostId::from_hi_bytes(42, &[1, 2, 3]),
            Err(IdentityError::UnsupportedAlgorithm(42))
        ));
    }

    #[test]
    fn garbage_pem_is_an_error() {
        assert!(HostIdentity::from_pkcs8_pem("hello").is_err());
        assert!(
            HostIdentity::from_pkcs8_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            )
            .is_err()
        );
    }
}
