//! The HIP crypto suite (RFC 7401 §5.2.7-8, §6.5, §4.1.2): Diffie-Hellman groups,
//! RHASH/HMAC per HIT suite, HIP-KDF, HIP_CIPHER and the puzzle.
//!
//! Every primitive comes from RustCrypto crates (p256, p384, crypto-bigint, sha1/sha2,
//! hmac, hkdf, aes, cbc). What is written here are the protocol constructions around them:
//! value encodings, the puzzle loop and key layout.

use crypto_bigint::{
    Odd, U256, U1536, U2048, U3072, Uint,
    modular::{FixedMontyForm, FixedMontyParams},
};
use hmac::{Hmac, KeyInit, Mac};
use rand_core::CryptoRng;
use sha2::{Digest, Sha256, Sha384};
use zeroize::Zeroizing;

use crate::hit::{Hit, HitSuite};

/// Errors of the crypto layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A DH group ID this implementation does not support.
    #[error("unsupported DH group {0}")]
    UnsupportedDhGroup(u8),
    /// A peer's DH public value is not valid for its group.
    #[error("invalid DH public value for group {0}")]
    BadDhPublic(u8),
    /// A HIP_CIPHER ID this implementation does not support.
    #[error("unsupported HIP cipher {0}")]
    UnsupportedCipher(u16),
    /// Ciphertext whose length is not a whole number of blocks, or a missing IV.
    #[error("ciphertext length {0} is not valid for the cipher")]
    BadCiphertext(usize),
    /// A HIT suite that cannot be used for RHASH/HMAC here.
    #[error("unsupported HIT suite {0}")]
    UnsupportedHitSuite(u8),
    /// The KDF was asked for more than it can produce (255 × hash length).
    #[error("KEYMAT request of {0} octets is too long")]
    KeymatTooLong(usize),
}

/// DH group IDs (RFC 7401 §5.2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DhGroup {
    /// 1536-bit MODP group (RFC 3526 group 5), ID 3: mandatory to implement (RFC 7401
    /// §5.2.7), last in the default preference.
    Modp1536,
    /// 2048-bit MODP group (RFC 3526 group 14), ID 11.
    Modp2048,
    /// 3072-bit MODP group (RFC 3526 group 15), ID 4.
    Modp3072,
    /// NIST P-256, ID 7.
    NistP256,
    /// NIST P-384, ID 8.
    NistP384,
}

impl DhGroup {
    /// All supported groups, in this implementation's default preference order.
    pub const ALL: [DhGroup; 5] = [
        DhGroup::NistP256,
        DhGroup::NistP384,
        DhGroup::Modp3072,
        DhGroup::Modp2048,
        DhGroup::Modp1536,
    ];

    /// The wire ID.
    pub fn id(self) -> u8 {
        match self {
            DhGroup::Modp1536 => 3,
            DhGroup::Modp3072 => 4,
            DhGroup::NistP256 => 7,
            DhGroup::NistP384 => 8,
            DhGroup::Modp2048 => 11,
        }
    }

    /// From the wire ID.
    pub fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            3 => DhGroup::Modp1536,
            4 => DhGroup::Modp3072,
            7 => DhGroup::NistP256,
            8 => DhGroup::NistP384,
            11 => DhGroup::Modp2048,
            _ => return None,
        })
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            DhGroup::Modp1536 => "modp1536",
            DhGroup::Modp2048 => "modp2048",
            DhGroup::Modp3072 => "modp3072",
            DhGroup::NistP256 => "p256",
            DhGroup::NistP384 => "p384",
        }
    }

    /// Parses a short name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == s)
    }
}

/// The MODP primes of RFC 3526 (§2 group 5, §3 group 14, §4 group 15; generator 2), as
/// printed there (checked against OpenSSL's `modp_1536`, `modp_2048`, `modp_3072`).
const MODP1536_P: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF";
const MODP2048_P: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF";
const MODP3072_P: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF";

/// Secret exponents are 256 bits: RFC 3526 §8 asks for twice the security level in
/// bits, and none of these groups reaches 128-bit security.
const MODP_EXPONENT_BITS: usize = 256;

fn modp_params<const L: usize>(hex: &str) -> FixedMontyParams<L> {
    let p = Uint::<L>::from_be_hex(hex);
    FixedMontyParams::new_vartime(Odd::new(p).expect("the MODP primes are odd"))
}

/// g^x mod p, big-endian, padded to the prime's length.
fn modp_public<const L: usize>(hex: &str, x: &U256) -> Vec<u8> {
    let g = FixedMontyForm::new(&Uint::<L>::from_u8(2), &modp_params(hex));
    g.pow(x).retrieve().to_be_bytes().to_vec()
}

/// y^x mod p after checking 1 < y < p - 1 (RFC 2631 §2.1.5-style range check). `peer`
/// may be shorter than the prime (leading zero octets left out); never longer.
fn modp_agree<const L: usize>(hex: &str, x: &U256, peer: &[u8]) -> Option<Vec<u8>> {
    if peer.is_empty() || peer.len() > Uint::<L>::BYTES {
        return None;
    }
    let params = modp_params::<L>(hex);
    // `from_be_slice` wants exactly the full width: left-pad the value.
    let mut full = vec![0u8; Uint::<L>::BYTES];
    full[Uint::<L>::BYTES - peer.len()..].copy_from_slice(peer);
    let y = Uint::<L>::from_be_slice(&full);
    let pm1 = params.modulus().get().wrapping_sub(&Uint::<L>::ONE);
    if y <= Uint::<L>::ONE || y >= pm1 {
        return None;
    }
    Some(
        FixedMontyForm::new(&y, &params)
            .pow(x)
            .retrieve()
            .to_be_bytes()
            .to_vec(),
    )
}

/// The SEC1 uncompressed point (0x04 ‖ x ‖ y) for an ECDH public value received as
/// `x ‖ y` (RFC 5903 §7) or already as 0x04 ‖ x ‖ y; `None` for any other length or
/// prefix (compressed points included). `field` is the coordinate size in octets. The
/// curve check is the caller's (`PublicKey::from_sec1_bytes`).
fn ecdh_sec1_point(peer: &[u8], field: usize) -> Option<Vec<u8>> {
    if peer.len() == 2 * field {
        let mut v = Vec::with_capacity(1 + 2 * field);
        v.push(0x04);
        v.extend_from_slice(peer);
        Some(v)
    } else if peer.len() == 2 * field + 1 && peer[0] == 0x04 {
        Some(peer.to_vec())
    } else {
        None
    }
}

/// A local DH key pair. One pair may be reused across exchanges (R1 precomputation,
/// RFC 7401 §6.7.1 lets the Responder reuse an R1 for a while).
#[derive(Clone)]
pub enum DhSecret {
    /// P-256.
    P256(p256::SecretKey),
    /// P-384.
    P384(p384::SecretKey),
    /// A MODP group: the secret exponent and the public value.
    Modp {
        /// Which group.
        group: DhGroup,
        /// Secret exponent.
        x: Box<U256>,
        /// g^x mod p, as long as the prime.
        public: Vec<u8>,
    },
}

impl DhSecret {
    /// Generates a key pair.
    pub fn generate<R: CryptoRng + ?Sized>(group: DhGroup, rng: &mut R) -> Self {
        use p256::elliptic_curve::Generate as _;
        let modp = |rng: &mut R| {
            let mut b = [0u8; MODP_EXPONENT_BITS / 8];
            rng.fill_bytes(&mut b);
            b[0] |= 0x80;
            Box::new(U256::from_be_slice(&b))
        };
        match group {
            DhGroup::NistP256 => DhSecret::P256(p256::SecretKey::generate_from_rng(rng)),
            DhGroup::NistP384 => DhSecret::P384(p384::SecretKey::generate_from_rng(rng)),
            DhGroup::Modp1536 => {
                let x = modp(rng);
                let public = modp_public::<{ U1536::LIMBS }>(MODP1536_P, &x);
                DhSecret::Modp { group, x, public }
            }
            DhGroup::Modp2048 => {
                let x = modp(rng);
                let public = modp_public::<{ U2048::LIMBS }>(MODP2048_P, &x);
                DhSecret::Modp { group, x, public }
            }
            DhGroup::Modp3072 => {
                let x = modp(rng);
                let public = modp_public::<{ U3072::LIMBS }>(MODP3072_P, &x);
                DhSecret::Modp { group, x, public }
            }
        }
    }

    /// The group.
    pub fn group(&self) -> DhGroup {
        match self {
            DhSecret::P256(_) => DhGroup::NistP256,
            DhSecret::P384(_) => DhGroup::NistP384,
            DhSecret::Modp { group, .. } => *group,
        }
    }

    /// The public value as carried in DIFFIE_HELLMAN (RFC 7401 §5.2.7):
    ///
    /// * ECDH (groups 7, 8): `x ‖ y`, each coordinate big-endian and zero-padded to the
    ///   field size (32 / 48 octets), **without** the SEC1 0x04 prefix. RFC 7401 §5.2.7
    ///   defines these groups by reference to RFC 5903, whose §7 ("ECP Key Exchange Data
    ///   Formats") specifies exactly this concatenation; HIPL's HIPv2 code and cutehip
    ///   send it too. (Until issue 10, hip sent 0x04 ‖ x ‖ y; [`DhSecret::agree`] still
    ///   takes that form.)
    /// * MODP: the big-endian value padded to the prime's length.
    pub fn public_value(&self) -> Vec<u8> {
        #[cfg(fuzzing)]
        if let Some(v) = fuzzing::dh_public(self) {
            return v;
        }
        match self {
            // `to_sec1_bytes` is uncompressed for these curves (no point compression by
            // default): 0x04 ‖ x ‖ y, of which the coordinates are sent.
            DhSecret::P256(k) => k.public_key().to_sec1_bytes()[1..].to_vec(),
            DhSecret::P384(k) => k.public_key().to_sec1_bytes()[1..].to_vec(),
            DhSecret::Modp { public, .. } => public.clone(),
        }
    }

    /// Computes the shared secret Kij with the peer's public value: the x-coordinate for
    /// ECDH (RFC 5903 §7: the x value of the common point, always the full field size),
    /// g^xy mod p padded to the prime's length for MODP. Never shortened by leading
    /// zeros: Kij is the HIP-KDF input, and a stripped value would give other keys.
    ///
    /// Accepted encodings of the peer's value, told apart by their length alone:
    ///
    /// * ECDH: `x ‖ y` (2 × field size, RFC 5903 §7, what RFC 7401 specifies) or the SEC1
    ///   uncompressed point `0x04 ‖ x ‖ y` (2 × field size + 1, what hip sent before).
    ///   Compressed points, the point at infinity and points off the curve are refused.
    /// * MODP: up to the prime's length, big-endian; a shorter value is the same integer
    ///   without its leading zero octets (RFC 7401 does not require the padding) and is
    ///   taken as such. The value must lie in 2..=p-2 either way.
    pub fn agree(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let g = self.group().id();
        let bad = || CryptoError::BadDhPublic(g);
        #[cfg(fuzzing)]
        if let Some(r) = fuzzing::dh_agree(self, peer) {
            return r.ok_or_else(bad);
        }
        match self {
            DhSecret::P256(k) => {
                let sec1 = ecdh_sec1_point(peer, 32).ok_or_else(bad)?;
                let pk = p256::PublicKey::from_sec1_bytes(&sec1).map_err(|_| bad())?;
                Ok(Zeroizing::new(
                    k.diffie_hellman(&pk).raw_secret_bytes().to_vec(),
                ))
            }
            DhSecret::P384(k) => {
                let sec1 = ecdh_sec1_point(peer, 48).ok_or_else(bad)?;
                let pk = p384::PublicKey::from_sec1_bytes(&sec1).map_err(|_| bad())?;
                Ok(Zeroizing::new(
                    k.diffie_hellman(&pk).raw_secret_bytes().to_vec(),
                ))
            }
            DhSecret::Modp { group, x, .. } => {
                let s = match group {
                    DhGroup::Modp1536 => modp_agree::<{ U1536::LIMBS }>(MODP1536_P, x, peer),
                    DhGroup::Modp2048 => modp_agree::<{ U2048::LIMBS }>(MODP2048_P, x, peer),
                    _ => modp_agree::<{ U3072::LIMBS }>(MODP3072_P, x, peer),
                };
                s.map(Zeroizing::new).ok_or_else(bad)
            }
        }
    }
}

/// The hash function of a HIT suite (RHASH, RFC 7401 §5.2.10), used for the puzzle, the
/// HMACs and HIP-KDF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rhash {
    /// SHA-256 (suite RSA,DSA/SHA-256).
    Sha256,
    /// SHA-384 (suite ECDSA/SHA-384).
    Sha384,
}

impl Rhash {
    /// RHASH for a HIT suite. ECDSA_LOW/SHA-1 is refused (SHA-1 is too weak to negotiate).
    /// For EdDSA/cSHAKE128 (RFC 9374) no RFC defines a keyed base-exchange hash (a
    /// KMAC-based one is only drafted in draft-moskowitz-hip-new-crypto), so SHA-256 is
    /// used; both ends of this implementation agree, others may not.
    pub fn for_suite(s: HitSuite) -> Result<Self, CryptoError> {
        match s {
            HitSuite::RsaDsaSha256 | HitSuite::EddsaCshake128 => Ok(Rhash::Sha256),
            HitSuite::EcdsaSha384 => Ok(Rhash::Sha384),
            HitSuite::EcdsaLowSha1 => Err(CryptoError::UnsupportedHitSuite(s.id())),
        }
    }

    /// Output length in octets (RHASH_len / 8).
    pub fn len(self) -> usize {
        match self {
            Rhash::Sha256 => 32,
            Rhash::Sha384 => 48,
        }
    }

    /// Always false; present for the `len` convention.
    pub fn is_empty(self) -> bool {
        false
    }

    /// RHASH(data).
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        match self {
            Rhash::Sha256 => {
                let mut h = Sha256::new();
                parts.iter().for_each(|p| h.update(p));
                h.finalize().to_vec()
            }
            Rhash::Sha384 => {
                let mut h = Sha384::new();
                parts.iter().for_each(|p| h.update(p));
                h.finalize().to_vec()
            }
        }
    }

    /// HMAC-RHASH(key, data).
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Rhash::Sha256 => {
                let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Rhash::Sha384 => {
                let mut m = <Hmac<Sha384> as KeyInit>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    /// Constant-time HMAC check.
    pub fn verify_hmac(self, key: &[u8], data: &[u8], tag: &[u8]) -> bool {
        match self {
            Rhash::Sha256 => {
                let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.verify_slice(tag).is_ok()
            }
            Rhash::Sha384 => {
                let mut m = <Hmac<Sha384> as KeyInit>::new_from_slice(key).expect("any key length");
                m.update(data);
                m.verify_slice(tag).is_ok()
            }
        }
    }
}

/// KEYMAT as produced by HIP-KDF (RFC 7401 §6.5):
///
/// `KEYMAT = KDF(salt = I | J, IKM = Kij, info = sort(HIT-I | HIT-R), L)` where the KDF is
/// the extract-and-expand construction of RFC 5869 with HMAC-RHASH — which is exactly what
/// the `hkdf` crate implements. The PRK is kept so that keys can be drawn further along
/// KEYMAT later (rekeying without a new DH exchange, RFC 7402 §6.1) without storing it all.
#[derive(Clone)]
pub struct Keymat {
    rhash: Rhash,
    prk: Zeroizing<Vec<u8>>,
    info: [u8; 32],
}

impl std::fmt::Debug for Keymat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keymat({:?}, …)", self.rhash)
    }
}

impl Keymat {
    /// Derives KEYMAT from the puzzle values, the DH secret and both HITs.
    pub fn derive(rhash: Rhash, i: &[u8], j: &[u8], kij: &[u8], hit_i: Hit, hit_r: Hit) -> Self {
        let mut salt = Vec::with_capacity(i.len() + j.len());
        salt.extend_from_slice(i);
        salt.extend_from_slice(j);
        let (lo, hi) = if hit_i <= hit_r {
            (hit_i, hit_r)
        } else {
            (hit_r, hit_i)
        };
        let mut info = [0u8; 32];
        info[..16].copy_from_slice(&lo.0);
        info[16..].copy_from_slice(&hi.0);
        let prk = match rhash {
            Rhash::Sha256 => hkdf::Hkdf::<Sha256>::extract(Some(&salt), kij).0.to_vec(),
            Rhash::Sha384 => hkdf::Hkdf::<Sha384>::extract(Some(&salt), kij).0.to_vec(),
        };
        Keymat {
            rhash,
            prk: Zeroizing::new(prk),
            info,
        }
    }

    /// KEYMAT octets `[offset, offset + len)`.
    pub fn draw(&self, offset: usize, len: usize) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let total = offset + len;
        if total > 255 * self.rhash.len() {
            return Err(CryptoError::KeymatTooLong(total));
        }
        let mut okm = Zeroizing::new(vec![0u8; total]);
        let ok = match self.rhash {
            Rhash::Sha256 => hkdf::Hkdf::<Sha256>::from_prk(&self.prk)
                .map(|h| h.expand(&self.info, &mut okm).is_ok()),
            Rhash::Sha384 => hkdf::Hkdf::<Sha384>::from_prk(&self.prk)
                .map(|h| h.expand(&self.info, &mut okm).is_ok()),
        };
        if !matches!(ok, Ok(true)) {
            return Err(CryptoError::KeymatTooLong(total));
        }
        Ok(Zeroizing::new(okm[offset..].to_vec()))
    }

    /// The RHASH this KEYMAT was derived with.
    pub fn rhash(&self) -> Rhash {
        self.rhash
    }
}

/// HIP_CIPHER suites (RFC 7401 §5.2.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HipCipher {
    /// NULL-ENCRYPT (ID 1).
    Null,
    /// AES-128-CBC (ID 2).
    Aes128Cbc,
    /// AES-256-CBC (ID 4).
    Aes256Cbc,
}

impl HipCipher {
    /// All supported. NULL-ENCRYPT is for testing only: RFC 7401 §5.2.8 forbids offering
    /// or accepting it unless explicitly configured, so [`HipCipher::DEFAULT`] leaves it
    /// out.
    pub const ALL: [HipCipher; 3] = [HipCipher::Aes128Cbc, HipCipher::Aes256Cbc, HipCipher::Null];

    /// The default offer, preferred first (AES-128-CBC is mandatory to implement).
    pub const DEFAULT: [HipCipher; 2] = [HipCipher::Aes128Cbc, HipCipher::Aes256Cbc];

    /// Wire ID.
    pub fn id(self) -> u16 {
        match self {
            HipCipher::Null => 1,
            HipCipher::Aes128Cbc => 2,
            HipCipher::Aes256Cbc => 4,
        }
    }

    /// From the wire ID.
    pub fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            1 => HipCipher::Null,
            2 => HipCipher::Aes128Cbc,
            4 => HipCipher::Aes256Cbc,
            _ => return None,
        })
    }

    /// Key length in octets (the "natural size", RFC 7401 §6.5).
    pub fn key_len(self) -> usize {
        match self {
            HipCipher::Null => 0,
            HipCipher::Aes128Cbc => 16,
            HipCipher::Aes256Cbc => 32,
        }
    }

    /// IV length in octets.
    pub fn iv_len(self) -> usize {
        match self {
            HipCipher::Null => 0,
            _ => 16,
        }
    }

    /// Encrypts `plain` (zero-padded here to the block size) and returns IV ‖ ciphertext,
    /// the contents of ENCRYPTED after its reserved field (RFC 7401 §5.2.18).
    pub fn encrypt<R: CryptoRng + ?Sized>(self, key: &[u8], plain: &[u8], rng: &mut R) -> Vec<u8> {
        use cbc::cipher::{BlockModeEncrypt, KeyIvInit, block_padding::NoPadding};
        let mut iv = [0u8; 16];
        let mut buf = plain.to_vec();
        if self != HipCipher::Null {
            rng.fill_bytes(&mut iv);
            buf.resize(plain.len().div_ceil(16) * 16, 0);
        }
        let n = buf.len();
        match self {
            HipCipher::Null => return buf,
            HipCipher::Aes128Cbc => {
                cbc::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
                    .expect("key and IV lengths")
                    .encrypt_padded::<NoPadding>(&mut buf, n)
                    .expect("block-aligned");
            }
            HipCipher::Aes256Cbc => {
                cbc::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
                    .expect("key and IV lengths")
                    .encrypt_padded::<NoPadding>(&mut buf, n)
                    .expect("block-aligned");
            }
        }
        let mut out = iv.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// Decrypts IV ‖ ciphertext. The result may carry padding after the parameter it
    /// holds; the caller parses the TLV and ignores what follows.
    pub fn decrypt(self, key: &[u8], data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        use cbc::cipher::{BlockModeDecrypt, KeyIvInit, block_padding::NoPadding};
        if self == HipCipher::Null {
            return Ok(data.to_vec());
        }
        if data.len() < 32 || !data.len().is_multiple_of(16) {
            return Err(CryptoError::BadCiphertext(data.len()));
        }
        let (iv, ct) = data.split_at(16);
        let mut buf = ct.to_vec();
        let r = match self {
            HipCipher::Aes128Cbc => cbc::Decryptor::<aes::Aes128>::new_from_slices(key, iv)
                .expect("key and IV lengths")
                .decrypt_padded::<NoPadding>(&mut buf)
                .map(|_| ()),
            HipCipher::Aes256Cbc => cbc::Decryptor::<aes::Aes256>::new_from_slices(key, iv)
                .expect("key and IV lengths")
                .decrypt_padded::<NoPadding>(&mut buf)
                .map(|_| ()),
            HipCipher::Null => Ok(()),
        };
        r.map_err(|_| CryptoError::BadCiphertext(data.len()))?;
        Ok(buf)
    }
}

/// The puzzle (RFC 7401 §4.1.2): find J such that the K lowest-order bits of
/// `RHASH(I | HIT-I | HIT-R | J)` are zero.
pub mod puzzle {
    use super::*;

    /// Whether the K lowest-order bits of `h` are zero.
    fn low_bits_zero(h: &[u8], k: u8) -> bool {
        let k = k as usize;
        if k > h.len() * 8 {
            return false;
        }
        let full = k / 8;
        let rest = k % 8;
        let n = h.len();
        if h[n - full..].iter().any(|b| *b != 0) {
            return false;
        }
        rest == 0 || h[n - full - 1] & ((1u8 << rest) - 1) == 0
    }

    /// Whether `j` solves the puzzle.
    pub fn verify(rhash: Rhash, i: &[u8], hit_i: Hit, hit_r: Hit, j: &[u8], k: u8) -> bool {
        let h = rhash.digest(&[i, &hit_i.0, &hit_r.0, j]);
        low_bits_zero(&h, k)
    }

    /// Searches for a solution, trying at most `max_attempts` random candidates (the
    /// solver is bounded: the core has no clock, so the bound is a count of RHASH
    /// computations, which the caller sizes from the puzzle lifetime). `None` when the
    /// bound is reached.
    pub fn solve<R: CryptoRng + ?Sized>(
        rhash: Rhash,
        i: &[u8],
        hit_i: Hit,
        hit_r: Hit,
        k: u8,
        max_attempts: u64,
        rng: &mut R,
    ) -> Option<Vec<u8>> {
        let mut j = vec![0u8; i.len()];
        rng.fill_bytes(&mut j);
        for _ in 0..max_attempts {
            if verify(rhash, i, hit_i, hit_r, &j, k) {
                return Some(j);
            }
            // Counter increment of the random start: fresh candidates, no RNG per try.
            for b in j.iter_mut().rev() {
                *b = b.wrapping_add(1);
                if *b != 0 {
                    break;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn dh_agreement_in_every_group() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for g in DhGroup::ALL {
            let a = DhSecret::generate(g, &mut rng);
            let b = DhSecret::generate(g, &mut rng);
            let ka = a.agree(&b.public_value()).unwrap();
            let kb = b.agree(&a.public_value()).unwrap();
            assert_eq!(ka, kb, "{g:?}");
            let expect_len = match g {
                DhGroup::NistP256 => 64,
                DhGroup::NistP384 => 96,
                DhGroup::Modp1536 => 192,
                DhGroup::Modp2048 => 256,
                DhGroup::Modp3072 => 384,
            };
            assert_eq!(a.public_value().len(), expect_len);
            let mut bad = b.public_value();
            bad[5] ^= 1;
            if matches!(g, DhGroup::NistP256 | DhGroup::NistP384) {
                assert!(a.agree(&bad).is_err());
                assert!(a.agree(&bad[..10]).is_err());
            }
            // (A short MODP value is a smaller integer: see the test below.)
            let mut over = vec![0u8];
            over.extend_from_slice(&b.public_value());
            assert!(a.agree(&over).is_err());
        }
        let m = DhSecret::generate(DhGroup::Modp3072, &mut rng);
        let mut one = vec![0u8; 384];
        one[383] = 1;
        assert_eq!(m.agree(&one).unwrap_err(), CryptoError::BadDhPublic(4));
        assert_eq!(
            m.agree(&[0xff; 384]).unwrap_err(),
            CryptoError::BadDhPublic(4)
        );
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '\n'], "")).unwrap()
    }

    /// RFC 5903 §8.1 and §8.2 (the IKEv2 ECP test vectors; RFC 7401 §5.2.7 defines
    /// groups 7 and 8 by reference to RFC 5903): private i and r, public g^i and g^r as
    /// x ‖ y, shared secret the x coordinate of g^ir.
    #[test]
    fn ecdh_matches_rfc5903_vectors() {
        struct V {
            group: DhGroup,
            i: &'static str,
            gi: &'static str,
            r: &'static str,
            gr: &'static str,
            girx: &'static str,
        }
        let vectors = [
            V {
                group: DhGroup::NistP256,
                i: "C88F01F5 10D9AC3F 70A292DA A2316DE5 44E9AAB8 AFE84049 C62A9C57 862D1433",
                gi: "DAD0B653 94221CF9 B051E1FE CA5787D0 98DFE637 FC90B9EF 945D0C37 72581180
                     5271A046 1CDB8252 D61F1C45 6FA3E59A B1F45B33 ACCF5F58 389E0577 B8990BB3",
                r: "C6EF9C5D 78AE012A 011164AC B397CE20 88685D8F 06BF9BE0 B283AB46 476BEE53",
                gr: "D12DFB52 89C8D4F8 1208B702 70398C34 2296970A 0BCCB74C 736FC755 4494BF63
                     56FBF3CA 366CC23E 8157854C 13C58D6A AC23F046 ADA30F83 53E74F33 039872AB",
                girx: "D6840F6B 42F6EDAF D13116E0 E1256520 2FEF8E9E CE7DCE03 812464D0 4B9442DE",
            },
            V {
                group: DhGroup::NistP384,
                i: "099F3C70 34D4A2C6 99884D73 A375A67F 7624EF7C 6B3C0F16 0647B674 14DCE655
                    E35B5380 41E649EE 3FAEF896 783AB194",
                gi: "667842D7 D180AC2C DE6F74F3 7551F557 55C7645C 20EF73E3 1634FE72 B4C55EE6
                     DE3AC808 ACB4BDB4 C88732AE E95F41AA 9482ED1F C0EEB9CA FC498462 5CCFC23F
                     65032149 E0E144AD A0241815 35A0F38E EB9FCFF3 C2C947DA E69B4C63 4573A81C",
                r: "41CB0779 B4BDB85D 47846725 FBEC3C94 30FAB46C C8DC5060 855CC9BD A0AA2942
                    E0308312 916B8ED2 960E4BD5 5A7448FC",
                gr: "E558DBEF 53EECDE3 D3FCCFC1 AEA08A89 A987475D 12FD950D 83CFA417 32BC509D
                     0D1AC43A 0336DEF9 6FDA41D0 774A3571 DCFBEC7A ACF31964 72169E83 8430367F
                     66EEBE3C 6E70C416 DD5F0C68 759DD1FF F83FA401 42209DFF 5EAAD96D B9E6386C",
                girx: "11187331 C279962D 93D60424 3FD592CB 9D0A926F 422E4718 7521287E 7156C5C4
                       D6031355 69B9E9D0 9CF5D4A2 70F59746",
            },
        ];
        for v in vectors {
            let secret = |hex: &str| match v.group {
                DhGroup::NistP256 => {
                    DhSecret::P256(p256::SecretKey::from_slice(&unhex(hex)).unwrap())
                }
                _ => DhSecret::P384(p384::SecretKey::from_slice(&unhex(hex)).unwrap()),
            };
            let (i, r) = (secret(v.i), secret(v.r));
            // What goes on the wire is RFC 5903's x ‖ y.
            assert_eq!(i.public_value(), unhex(v.gi), "{:?} g^i", v.group);
            assert_eq!(r.public_value(), unhex(v.gr), "{:?} g^r", v.group);
            // Kij is the x coordinate, from either encoding of the peer's value.
            let want = unhex(v.girx);
            assert_eq!(&i.agree(&unhex(v.gr)).unwrap()[..], &want[..]);
            let mut sec1 = vec![0x04];
            sec1.extend_from_slice(&unhex(v.gr));
            assert_eq!(&i.agree(&sec1).unwrap()[..], &want[..]);
            assert_eq!(&r.agree(&unhex(v.gi)).unwrap()[..], &want[..]);
        }
    }

    #[test]
    fn ecdh_encodings_told_apart_by_length_others_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        for (g, field) in [(DhGroup::NistP256, 32), (DhGroup::NistP384, 48)] {
            let a = DhSecret::generate(g, &mut rng);
            let b = DhSecret::generate(g, &mut rng);
            let xy = b.public_value();
            assert_eq!(xy.len(), 2 * field);
            let mut sec1 = vec![0x04];
            sec1.extend_from_slice(&xy);
            let k = a.agree(&xy).unwrap();
            assert_eq!(
                a.agree(&sec1).unwrap(),
                k,
                "{g:?}: both encodings, one point"
            );
            // SEC1 compressed form (0x02/0x03 ‖ x), a wrong prefix on the long form, the
            // point at infinity (0x00), truncated and over-long values: all refused.
            let bad = CryptoError::BadDhPublic(g.id());
            let y_odd = xy[2 * field - 1] & 1;
            let mut compressed = vec![0x02 | y_odd];
            compressed.extend_from_slice(&xy[..field]);
            let mut wrong_prefix = sec1.clone();
            wrong_prefix[0] = 0x06;
            let mut long = sec1.clone();
            long.push(0);
            for v in [
                compressed,
                wrong_prefix,
                vec![0x00],
                xy[..2 * field - 1].to_vec(),
                long,
            ] {
                assert_eq!(a.agree(&v).unwrap_err(), bad, "{g:?}: {} octets", v.len());
            }
            // x ‖ y of a point that is not on the curve.
            let mut off = xy.clone();
            off[2 * field - 1] ^= 1;
            assert_eq!(a.agree(&off).unwrap_err(), bad);
        }
    }

    /// Kij keeps its leading zero octets (RFC 5903 §7: the x value at full field size).
    /// A peer that strips them (cutehip does, see tests/data/cutehip) derives other keys
    /// in 1 of 256 exchanges: that is its bug, never matched here.
    #[test]
    fn shared_secret_is_never_shortened() {
        for (g, len) in [
            (DhGroup::NistP256, 32),
            (DhGroup::NistP384, 48),
            (DhGroup::Modp1536, 192),
        ] {
            let mut rng = ChaCha20Rng::seed_from_u64(12);
            let a = DhSecret::generate(g, &mut rng);
            let found = (0..4000).find_map(|_| {
                let b = DhSecret::generate(g, &mut rng);
                let k = a.agree(&b.public_value()).unwrap();
                (k[0] == 0).then_some(k)
            });
            let k = found.expect("a secret with a leading zero octet within 4000 tries");
            assert_eq!(k.len(), len, "{g:?}");
        }
    }

    #[test]
    fn modp_public_value_may_omit_leading_zeros() {
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let a = DhSecret::generate(DhGroup::Modp1536, &mut rng);
        let b = DhSecret::generate(DhGroup::Modp1536, &mut rng);
        let k = a.agree(&b.public_value()).unwrap();
        // 2^1024 mod p = 2^1024 itself: a value with 63 leading zero octets.
        let mut small = vec![0u8; 192];
        small[192 - 129] = 1;
        let short = &small[192 - 129..];
        assert_eq!(
            a.agree(&small).unwrap(),
            a.agree(short).unwrap(),
            "padded and unpadded encodings of one integer"
        );
        assert_ne!(a.agree(&small).unwrap(), k);
        // Longer than the prime: refused, even with a zero in front.
        let mut long = vec![0u8];
        long.extend_from_slice(&b.public_value());
        assert_eq!(a.agree(&long).unwrap_err(), CryptoError::BadDhPublic(3));
        // The range check applies to short values too.
        assert_eq!(a.agree(&[1]).unwrap_err(), CryptoError::BadDhPublic(3));
    }

    #[test]
    fn modp_matches_known_small_cases() {
        // 2^1 mod p = 2 and 2^10 mod p = 1024 in every group.
        for x in [1u64, 10] {
            let want = 1u64 << x;
            let v = modp_public::<{ U1536::LIMBS }>(MODP1536_P, &U256::from_u64(x));
            assert_eq!(U1536::from_be_slice(&v), U1536::from_u64(want));
            let v = modp_public::<{ U3072::LIMBS }>(MODP3072_P, &U256::from_u64(x));
            assert_eq!(U3072::from_be_slice(&v), U3072::from_u64(want));
        }
        // Every prime is the size its group says.
        assert_eq!(MODP1536_P.len() * 4, 1536);
        assert_eq!(MODP2048_P.len() * 4, 2048);
        assert_eq!(MODP3072_P.len() * 4, 3072);
    }

    #[test]
    fn kdf_is_hkdf_and_prefix_stable() {
        let hi: Hit = "2001:20::1".parse().unwrap();
        let hr: Hit = "2001:20::2".parse().unwrap();
        let k = Keymat::derive(Rhash::Sha256, &[1; 32], &[2; 32], &[3; 32], hr, hi);
        let k2 = Keymat::derive(Rhash::Sha256, &[1; 32], &[2; 32], &[3; 32], hi, hr);
        let a = k.draw(0, 100).unwrap();
        assert_eq!(a, k2.draw(0, 100).unwrap(), "info sorts the HITs");
        assert_eq!(&a[40..60], &k.draw(40, 20).unwrap()[..]);
        // Independent check with the RFC 5869 definition written out.
        let salt = [[1u8; 32], [2u8; 32]].concat();
        let prk = Rhash::Sha256.hmac(&salt, &[3; 32]);
        let mut info = hi.0.to_vec();
        info.extend_from_slice(&hr.0);
        info.push(1);
        let t1 = Rhash::Sha256.hmac(&prk, &info);
        assert_eq!(&a[..32], &t1[..]);
        assert!(k.draw(0, 255 * 32 + 1).is_err());
    }

    #[test]
    fn cipher_round_trip() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        for c in HipCipher::ALL {
            let key = vec![7u8; c.key_len()];
            let plain = vec![9u8; 40];
            let ct = c.encrypt(&key, &plain, &mut rng);
            let pt = c.decrypt(&key, &ct).unwrap();
            assert_eq!(&pt[..40], &plain[..]);
            if c != HipCipher::Null {
                assert_ne!(&ct[16..56], &plain[..]);
                assert!(c.decrypt(&key, &ct[..31]).is_err());
            }
        }
    }

    #[test]
    fn puzzle_solve_and_verify() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (hi, hr) = (Hit([1; 16]), Hit([2; 16]));
        let i = [0x55u8; 48];
        let j = puzzle::solve(Rhash::Sha384, &i, hi, hr, 10, 1 << 20, &mut rng).unwrap();
        assert!(puzzle::verify(Rhash::Sha384, &i, hi, hr, &j, 10));
        assert!(
            !puzzle::verify(Rhash::Sha384, &i, hr, hi, &j, 10)
                || !puzzle::verify(Rhash::Sha384, &i, hr, hi, &j, 11)
        );
        // Bounded: an impossible difficulty within 100 attempts fails cleanly.
        assert!(puzzle::solve(Rhash::Sha384, &i, hi, hr, 40, 100, &mut rng).is_none());
        // K = 0 is always solved.
        assert!(puzzle::verify(Rhash::Sha256, &[0; 32], hi, hr, &[1; 32], 0));
    }
}

/// Stand-ins for the curve arithmetic in fuzzing builds only (`--cfg fuzzing`, which
/// cargo-fuzz sets and nothing else does; `hip-agent` refuses to compile with it).
///
/// A fuzzer explores the protocol, not the curves (RustCrypto fuzzes those itself), and
/// one base exchange's signatures and ECDH were nearly all of an execution of
/// `hip_endpoint_exchange`: it ran at 265 executions/s. With these, the same state machine
/// runs, byte for byte the same packet layouts and lengths, on hashes: a signature is a
/// SHA-256 expansion of the signer's HI and the message, an ECDH public value one of the
/// secret scalar, and the shared secret one of both public values in sorted order. A
/// flipped bit in a signed packet still fails its signature, and a public value of the
/// wrong length is still refused; what the stand-ins cannot refuse is a point off the
/// curve. MODP groups keep their real arithmetic.
#[cfg(fuzzing)]
pub(crate) mod fuzzing {
    use sha2::{Digest as _, Sha256};
    use zeroize::Zeroizing;

    use super::{DhSecret, ecdh_sec1_point};

    /// `len` octets of SHA-256(`label` ‖ counter ‖ parts…).
    pub(crate) fn expand(label: &[u8], parts: &[&[u8]], len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        let mut i = 0u32;
        while out.len() < len {
            let mut h = Sha256::new();
            h.update(label);
            h.update(i.to_be_bytes());
            for p in parts {
                h.update((p.len() as u32).to_be_bytes());
                h.update(p);
            }
            out.extend_from_slice(&h.finalize());
            i += 1;
        }
        out.truncate(len);
        out
    }

    fn ec(s: &DhSecret) -> Option<(Zeroizing<Vec<u8>>, usize)> {
        match s {
            DhSecret::P256(k) => Some((Zeroizing::new(k.to_bytes().to_vec()), 32)),
            DhSecret::P384(k) => Some((Zeroizing::new(k.to_bytes().to_vec()), 48)),
            DhSecret::Modp { .. } => None,
        }
    }

    pub(crate) fn dh_public(s: &DhSecret) -> Option<Vec<u8>> {
        let (x, field) = ec(s)?;
        Some(expand(b"fuzz-ecdh-public", &[&x], 2 * field))
    }

    /// `None`: not an ECDH group (real arithmetic); `Some(None)`: a refused public value.
    pub(crate) fn dh_agree(s: &DhSecret, peer: &[u8]) -> Option<Option<Zeroizing<Vec<u8>>>> {
        let (x, field) = ec(s)?;
        let Some(sec1) = ecdh_sec1_point(peer, field) else {
            return Some(None);
        };
        let ours = expand(b"fuzz-ecdh-public", &[&x], 2 * field);
        let theirs = &sec1[1..];
        let (a, b) = if ours.as_slice() <= theirs {
            (ours.as_slice(), theirs)
        } else {
            (theirs, ours.as_slice())
        };
        Some(Some(Zeroizing::new(expand(
            b"fuzz-ecdh-shared",
            &[a, b],
            field,
        ))))
    }

    /// The stand-in signature of `msg` by the HI `hi`, `len` octets long.
    pub(crate) fn signature(hi: &[u8], msg: &[u8], len: usize) -> Vec<u8> {
        expand(b"fuzz-signature", &[hi, msg], len)
    }
}
