//! Host Identity Tags: ORCHIDv2 (RFC 7343) under the HIT suites of RFC 7401 §5.2.10 and
//! RFC 9374 §3.2, and their printable forms.

use std::{fmt, net::Ipv6Addr, str::FromStr};

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384};

use crate::identity::IdentityError;

/// A 128-bit Host Identity Tag.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hit(pub [u8; 16]);

/// The ORCHIDv2 prefix 2001:20::/28 (RFC 7343 §2; IANA).
pub const ORCHID_V2_PREFIX: [u8; 4] = [0x20, 0x01, 0x00, 0x20];

/// The HIP context ID used as ORCHID hash input prefix (RFC 7401 §3.2).
pub const HIP_CONTEXT_ID: [u8; 16] = [
    0xF0, 0xEF, 0xF0, 0x2F, 0xBF, 0xF4, 0x3D, 0x0F, 0xE7, 0x93, 0x0C, 0x3C, 0x6E, 0x61, 0x74, 0xEA,
];

/// HIT suite (RFC 7401 §5.2.10; EdDSA added by RFC 9374 §3.2). The numeric value is the
/// 4-bit OGA ID of the ORCHID; in HIT_SUITE_LIST it occupies the high nibble of an octet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HitSuite {
    /// RSA or DSA HIs, SHA-256 as RHASH (ID 1).
    RsaDsaSha256,
    /// ECDSA HIs (P-256 and P-384), SHA-384 as RHASH (ID 2).
    EcdsaSha384,
    /// ECDSA_LOW (SECP160R1) HIs, SHA-1 (ID 3). Recognised, never negotiated.
    EcdsaLowSha1,
    /// EdDSA HIs, cSHAKE128 for the ORCHID (ID 5, RFC 9374).
    EddsaCshake128,
}

impl HitSuite {
    /// The 4-bit suite / OGA ID.
    pub fn id(self) -> u8 {
        match self {
            HitSuite::RsaDsaSha256 => 1,
            HitSuite::EcdsaSha384 => 2,
            HitSuite::EcdsaLowSha1 => 3,
            HitSuite::EddsaCshake128 => 5,
        }
    }

    /// The suite for a 4-bit ID.
    pub fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            1 => HitSuite::RsaDsaSha256,
            2 => HitSuite::EcdsaSha384,
            3 => HitSuite::EcdsaLowSha1,
            5 => HitSuite::EddsaCshake128,
            _ => return None,
        })
    }

    /// The octet used in HIT_SUITE_LIST: the ID in the four high-order bits (RFC 7401
    /// §5.2.10: "the current four-bit HIT Suite IDs only use the four higher-order bits").
    pub fn list_octet(self) -> u8 {
        self.id() << 4
    }

    /// The suite from a HIT_SUITE_LIST octet.
    pub fn from_list_octet(o: u8) -> Option<Self> {
        if o & 0x0f != 0 {
            return None;
        }
        Self::from_id(o >> 4)
    }
}

impl Hit {
    /// The all-zero HIT (opportunistic mode receiver HIT, RFC 7401 §4.1.8).
    pub const ZERO: Hit = Hit([0; 16]);

    /// Computes the ORCHIDv2 HIT of an HI (the "Host Identity" field of HOST_ID, RFC 7401
    /// §5.2.9) under `suite`.
    ///
    /// RFC 7343 §2: `ORCHID := Prefix | OGA ID | Encode_96(Hash(Context ID | Input))`,
    /// Encode_96 taking the *middle* 96 bits of the hash output. For the EdDSA suite
    /// (RFC 9374 §3.5), the hash is the XOF cSHAKE128 with the context ID as customization
    /// string over `Prefix | OGA ID | HI`, read for exactly 96 bits (RFC 9374 applies the
    /// same construction to DETs with a 64-bit output; an XOF needs no middle extraction).
    pub fn from_hi(suite: HitSuite, hi: &[u8]) -> Hit {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&ORCHID_V2_PREFIX);
        out[3] |= suite.id();
        match suite {
            HitSuite::RsaDsaSha256 => {
                let h = Sha256::new()
                    .chain_update(HIP_CONTEXT_ID)
                    .chain_update(hi)
                    .finalize();
                out[4..].copy_from_slice(middle_96(&h));
            }
            HitSuite::EcdsaSha384 => {
                let h = Sha384::new()
                    .chain_update(HIP_CONTEXT_ID)
                    .chain_update(hi)
                    .finalize();
                out[4..].copy_from_slice(middle_96(&h));
            }
            HitSuite::EcdsaLowSha1 => {
                let h = Sha1::new()
                    .chain_update(HIP_CONTEXT_ID)
                    .chain_update(hi)
                    .finalize();
                out[4..].copy_from_slice(middle_96(&h));
            }
            HitSuite::EddsaCshake128 => {
                use cshake::CShake128;
                use sha2::digest::{ExtendableOutput, Update, XofReader};
                let mut x = CShake128::new_with_function_name(b"", &HIP_CONTEXT_ID);
                x.update(&out[..4]);
                x.update(hi);
                let mut r = x.finalize_xof();
                r.read(&mut out[4..]);
            }
        }
        Hit(out)
    }

    /// Whether the HIT lies in the ORCHIDv2 prefix 2001:20::/28.
    pub fn is_orchid_v2(&self) -> bool {
        self.0[..3] == ORCHID_V2_PREFIX[..3] && self.0[3] & 0xf0 == 0x20
    }

    /// The HIT suite named by the OGA ID, if this is an ORCHIDv2 with a known suite.
    pub fn suite(&self) -> Option<HitSuite> {
        if !self.is_orchid_v2() {
            return None;
        }
        HitSuite::from_id(self.0[3] & 0x0f)
    }

    /// The 32-hex-digit form used by the draft's SDP extension (upper case).
    pub fn to_hex32(&self) -> String {
        hex::encode_upper(self.0)
    }

    /// The IPv6 address form.
    pub fn to_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.0)
    }

    /// Whether this is the all-zero HIT.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

/// Encode_96 of RFC 7343 §2: the middle 96 bits of the hash (the hashes used here all
/// have a length in whole octets with an even number of surplus octets).
fn middle_96(h: &[u8]) -> &[u8] {
    let skip = (h.len() - 12) / 2;
    &h[skip..skip + 12]
}

impl From<Ipv6Addr> for Hit {
    fn from(a: Ipv6Addr) -> Self {
        Hit(a.octets())
    }
}

impl From<Hit> for Ipv6Addr {
    fn from(h: Hit) -> Self {
        h.to_ipv6()
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

impl FromStr for Hit {
    type Err = IdentityError;

    /// Accepts the IPv6 text form or the 32-hex-digit form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(a) = s.parse::<Ipv6Addr>() {
            return Ok(a.into());
        }
        if s.len() == 32 {
            let mut out = [0u8; 16];
            if hex::decode_to_slice(s, &mut out).is_ok() {
                return Ok(Hit(out));
            }
        }
        Err(IdentityError::BadHit(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_forms_round_trip() {
        let h: Hit = "2001:20::1".parse().unwrap();
        assert_eq!(h.to_hex32(), "20010020000000000000000000000001");
        assert_eq!(h.to_hex32().parse::<Hit>().unwrap(), h);
        assert_eq!(h.to_string(), "2001:20::1");
        assert!("2001:20::1:".parse::<Hit>().is_err());
        assert!("2001002000000000000000000000000G".parse::<Hit>().is_err());
    }

    #[test]
    fn orchid_prefix_and_suite() {
        for s in [
            HitSuite::RsaDsaSha256,
            HitSuite::EcdsaSha384,
            HitSuite::EcdsaLowSha1,
            HitSuite::EddsaCshake128,
        ] {
            let h = Hit::from_hi(s, b"some host identity");
            assert!(h.is_orchid_v2(), "{h}");
            assert_eq!(h.suite(), Some(s));
            // Different input, different HIT.
            assert_ne!(h, Hit::from_hi(s, b"some host identitz"));
        }
        assert_eq!(HitSuite::from_list_octet(0x20), Some(HitSuite::EcdsaSha384));
        assert_eq!(HitSuite::from_list_octet(0x21), None);
    }

    #[test]
    fn encode_96_takes_the_middle() {
        // SHA-256 output is 32 octets: the middle 12 start at octet 10.
        let hi = b"x";
        let h = Sha256::new()
            .chain_update(HIP_CONTEXT_ID)
            .chain_update(hi)
            .finalize();
        let hit = Hit::from_hi(HitSuite::RsaDsaSha256, hi);
        assert_eq!(&hit.0[4..], &h[10..22]);
        assert_eq!(&hit.0[..4], &[0x20, 0x01, 0x00, 0x21]);
    }
}
