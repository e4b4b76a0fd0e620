//! The HIP RR's RDATA (RFC 8005 §5), hand-written.
//!
//! hickory-proto (the DNS crate everything else in this crate is built on) has no HIP
//! record type: type 55 comes and goes as `RData::Unknown` with opaque bytes. This module is
//! the only DNS wire code written by hand here; names inside it (the rendezvous servers) are
//! still read and written by hickory's `Name`.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  HIT length   | PK algorithm  |          PK length            |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ~                           HIT                                 ~
//! ~                       Public Key                              ~
//! ~                   Rendezvous Servers                          ~
//! ```
//!
//! The PK algorithm values come from the IPSECKEY registry (RFC 4025 §2.4, which RFC 8005
//! §5 reuses): 1 DSA, 2 RSA, 3 ECDSA (added by RFC 8005), 4 EdDSA (RFC 9373). The public
//! key formats are those of the matching DNSSEC key records, as RFC 8005 §5 says: RSA as
//! RFC 3110 §2 (which is also HIP's own RSA HI format), ECDSA as RFC 6605 §4 (`x ‖ y`, the
//! curve given by the length: 64 octets P-256, 96 octets P-384), EdDSA as RFC 8080 §3 (the
//! 32-octet Ed25519 key).

use hickory_proto::rr::Name;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hip_proto::{Hit, HostId};

/// The HIP RR type code (RFC 8005 §8).
pub const HIP_RR_TYPE: u16 = 55;

/// IPSECKEY/HIP RR public key algorithm numbers (RFC 4025 §2.4, RFC 8005 §5, RFC 9373).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PkAlgorithm {
    /// DSA (RFC 2536); not an algorithm hip supports.
    Dsa = 1,
    /// RSA (RFC 3110).
    Rsa = 2,
    /// ECDSA (RFC 6605 key format).
    Ecdsa = 3,
    /// EdDSA (RFC 8080 key format), RFC 9373.
    EdDsa = 4,
}

impl PkAlgorithm {
    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Dsa,
            2 => Self::Rsa,
            3 => Self::Ecdsa,
            4 => Self::EdDsa,
            _ => return None,
        })
    }
}

/// Errors decoding or interpreting a HIP RR.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RdataError {
    /// The RDATA ends before the fields its lengths announce.
    #[error("HIP RDATA truncated: need {need} octets, have {have}")]
    Truncated {
        /// Octets the header announces.
        need: usize,
        /// Octets present.
        have: usize,
    },
    /// HIT length zero (RFC 8005 §5: the HIT is required).
    #[error("HIP RDATA has a zero-length HIT")]
    EmptyHit,
    /// PK length zero: RFC 8005 §5 requires the public key.
    #[error("HIP RDATA has no public key")]
    EmptyKey,
    /// A rendezvous server name does not parse.
    #[error("HIP RDATA rendezvous server name: {0}")]
    BadName(String),
    /// A field too long for its length octet(s).
    #[error("HIP RDATA field too long: {0}")]
    TooLong(&'static str),
    /// The PK algorithm is not one hip can use.
    #[error("HIP RR public key algorithm {0} is not supported (RSA 2, ECDSA 3, EdDSA 4 are)")]
    UnsupportedAlgorithm(u8),
    /// The key does not decode for its algorithm.
    #[error("HIP RR public key: {0}")]
    BadKey(String),
    /// The HIT is not the one the public key hashes to (RFC 7343 ORCHIDv2).
    #[error("HIP RR's HIT {rr} is not the HIT of its public key ({computed})")]
    HitMismatch {
        /// The HIT the record carries.
        rr: String,
        /// The HIT computed from the record's public key.
        computed: String,
    },
}

/// One HIP RR's RDATA, as it is on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HipRdata {
    /// PK algorithm octet (see [`PkAlgorithm`]).
    pub pk_algorithm: u8,
    /// The HIT (16 octets for ORCHIDv2, but the field has its own length).
    pub hit: Vec<u8>,
    /// The public key, in the format the PK algorithm implies.
    pub public_key: Vec<u8>,
    /// Rendezvous servers, in order of preference (RFC 8005 §5.4).
    pub rendezvous_servers: Vec<Name>,
}

impl HipRdata {
    /// The record for a Host Identity: its HIT (ORCHIDv2), its key in the RFC 8005 format.
    pub fn from_host_id(hi: &HostId, rendezvous_servers: Vec<Name>) -> Self {
        let hit = hi.hit().0.to_vec();
        let bytes = hi.to_hi_bytes();
        let (pk_algorithm, public_key) = match hi {
            // HIP's HI: curve id (2) ‖ 0x04 ‖ x ‖ y; RFC 6605: x ‖ y.
            HostId::EcdsaP256(_) | HostId::EcdsaP384(_) => {
                (PkAlgorithm::Ecdsa, bytes[3..].to_vec())
            }
            // HIP's RSA HI is already RFC 3110.
            HostId::Rsa { .. } => (PkAlgorithm::Rsa, bytes),
            // HIP's HI: curve id (2) ‖ key; RFC 8080: key.
            HostId::Ed25519(_) => (PkAlgorithm::EdDsa, bytes[2..].to_vec()),
        };
        Self {
            pk_algorithm: pk_algorithm as u8,
            hit,
            public_key,
            rendezvous_servers,
        }
    }

    /// The Host Identity the public key encodes (HIT not checked: see [`Self::verified`]).
    pub fn host_id(&self) -> Result<HostId, RdataError> {
        let bad = |e: hip_proto::IdentityError| RdataError::BadKey(e.to_string());
        match PkAlgorithm::from_u8(self.pk_algorithm) {
            Some(PkAlgorithm::Ecdsa) => {
                let curve: u16 = match self.public_key.len() {
                    64 => 1,
                    96 => 2,
                    n => {
                        return Err(RdataError::BadKey(format!(
                            "ECDSA key of {n} octets (64 for P-256, 96 for P-384)"
                        )));
                    }
                };
                let mut hi = curve.to_be_bytes().to_vec();
                hi.push(0x04);
                hi.extend_from_slice(&self.public_key);
                HostId::from_hi_bytes(7, &hi).map_err(bad)
            }
            Some(PkAlgorithm::Rsa) => HostId::from_hi_bytes(5, &self.public_key).map_err(bad),
            Some(PkAlgorithm::EdDsa) => {
                if self.public_key.len() != 32 {
                    return Err(RdataError::BadKey(format!(
                        "EdDSA key of {} octets (only Ed25519, 32, is supported)",
                        self.public_key.len()
                    )));
                }
                let mut hi = 1u16.to_be_bytes().to_vec();
                hi.extend_from_slice(&self.public_key);
                HostId::from_hi_bytes(13, &hi).map_err(bad)
            }
            _ => Err(RdataError::UnsupportedAlgorithm(self.pk_algorithm)),
        }
    }

    /// The Host Identity and HIT, after checking that the record's HIT is the one its key
    /// hashes to (a record whose HIT and key disagree is refused, never half-used).
    pub fn verified(&self) -> Result<(HostId, Hit), RdataError> {
        let hi = self.host_id()?;
        let computed = hi.hit();
        if computed.0[..] != self.hit[..] {
            return Err(RdataError::HitMismatch {
                rr: hex::encode(&self.hit),
                computed: computed.to_hex32(),
            });
        }
        Ok((hi, computed))
    }

    /// Decodes RDATA. Never panics; names must be uncompressed (RFC 8005 §5: "MUST NOT be
    /// compressed"), which holds since the decoder sees the RDATA alone.
    pub fn decode(rdata: &[u8]) -> Result<Self, RdataError> {
        if rdata.len() < 4 {
            return Err(RdataError::Truncated {
                need: 4,
                have: rdata.len(),
            });
        }
        let hit_len = rdata[0] as usize;
        let pk_algorithm = rdata[1];
        let pk_len = u16::from_be_bytes([rdata[2], rdata[3]]) as usize;
        if hit_len == 0 {
            return Err(RdataError::EmptyHit);
        }
        if pk_len == 0 {
            return Err(RdataError::EmptyKey);
        }
        let need = 4 + hit_len + pk_len;
        if rdata.len() < need {
            return Err(RdataError::Truncated {
                need,
                have: rdata.len(),
            });
        }
        let hit = rdata[4..4 + hit_len].to_vec();
        let public_key = rdata[4 + hit_len..need].to_vec();
        let mut rendezvous_servers = Vec::new();
        let mut decoder = BinDecoder::new(&rdata[need..]);
        while !decoder.is_empty() {
            let name = Name::read(&mut decoder).map_err(|e| RdataError::BadName(e.to_string()))?;
            rendezvous_servers.push(name);
        }
        Ok(Self {
            pk_algorithm,
            hit,
            public_key,
            rendezvous_servers,
        })
    }

    /// Encodes RDATA (rendezvous server names uncompressed).
    pub fn encode(&self) -> Result<Vec<u8>, RdataError> {
        let hit_len = u8::try_from(self.hit.len()).map_err(|_| RdataError::TooLong("HIT"))?;
        let pk_len =
            u16::try_from(self.public_key.len()).map_err(|_| RdataError::TooLong("public key"))?;
        let mut out = vec![hit_len, self.pk_algorithm];
        out.extend_from_slice(&pk_len.to_be_bytes());
        out.extend_from_slice(&self.hit);
        out.extend_from_slice(&self.public_key);
        let mut names = Vec::new();
        {
            let mut enc = BinEncoder::new(&mut names);
            enc.set_name_encoding(hickory_proto::serialize::binary::NameEncoding::Uncompressed);
            for n in &self.rendezvous_servers {
                let mut n = n.clone();
                n.set_fqdn(true);
                n.emit(&mut enc)
                    .map_err(|e| RdataError::BadName(e.to_string()))?;
            }
        }
        out.extend_from_slice(&names);
        if out.len() > u16::MAX as usize {
            return Err(RdataError::TooLong("RDATA"));
        }
        Ok(out)
    }

    /// Presentation format (RFC 8005 §6): `PK-ALG HIT-HEX KEY-BASE64 [RVS…]`, as BIND's
    /// zone files and `nsupdate` take it.
    pub fn to_presentation(&self) -> String {
        use base64::Engine as _;
        let mut s = format!(
            "{} {} {}",
            self.pk_algorithm,
            hex::encode_upper(&self.hit),
            base64::engine::general_purpose::STANDARD.encode(&self.public_key)
        );
        for n in &self.rendezvous_servers {
            let mut n = n.clone();
            n.set_fqdn(true);
            s.push(' ');
            s.push_str(&n.to_ascii());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hip_proto::{Algorithm, HostIdentity};
    use rand_core::SeedableRng;

    fn identity(alg: Algorithm) -> HostIdentity {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(alg as u64 + 7);
        HostIdentity::generate(alg, &mut rng).unwrap()
    }

    #[test]
    fn every_algorithm_round_trips_and_verifies() {
        for alg in Algorithm::ALL {
            let id = identity(alg);
            let rvs = vec![Name::from_ascii("rvs1.example.com.").unwrap()];
            let rd = HipRdata::from_host_id(id.host_id(), rvs.clone());
            let wire = rd.encode().unwrap();
            let back = HipRdata::decode(&wire).unwrap();
            assert_eq!(back, rd, "{alg:?}");
            assert_eq!(back.rendezvous_servers, rvs);
            let (hi, hit) = back.verified().unwrap();
            assert_eq!(hit, id.hit());
            assert_eq!(&hi, id.host_id());
        }
    }

    #[test]
    fn pk_algorithm_numbers_and_key_lengths() {
        let cases = [
            (Algorithm::EcdsaP256, 3, Some(64)),
            (Algorithm::EcdsaP384, 3, Some(96)),
            (Algorithm::Ed25519, 4, Some(32)),
            (Algorithm::Rsa, 2, None),
        ];
        for (alg, pk, len) in cases {
            let rd = HipRdata::from_host_id(identity(alg).host_id(), vec![]);
            assert_eq!(rd.pk_algorithm, pk, "{alg:?}");
            assert_eq!(rd.hit.len(), 16);
            if let Some(len) = len {
                assert_eq!(rd.public_key.len(), len, "{alg:?}");
            }
        }
    }

    #[test]
    fn a_hit_that_is_not_the_keys_is_refused() {
        let mut rd = HipRdata::from_host_id(identity(Algorithm::EcdsaP256).host_id(), vec![]);
        rd.hit[15] ^= 1;
        assert!(matches!(rd.verified(), Err(RdataError::HitMismatch { .. })));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let rd = HipRdata::from_host_id(
            identity(Algorithm::Ed25519).host_id(),
            vec![Name::from_ascii("a.b.").unwrap()],
        );
        let wire = rd.encode().unwrap();
        for n in 0..wire.len() {
            // Every prefix either fails cleanly or (when it ends on a name boundary) decodes.
            let _ = HipRdata::decode(&wire[..n]);
        }
        assert!(matches!(
            HipRdata::decode(&wire[..10]),
            Err(RdataError::Truncated { .. })
        ));
        assert_eq!(
            HipRdata::decode(&[0, 2, 0, 1, 0]),
            Err(RdataError::EmptyHit)
        );
        assert_eq!(HipRdata::decode(&[16, 2, 0, 0]), Err(RdataError::EmptyKey));
        let mut junk = wire.clone();
        junk.push(0xc0); // a compression pointer with no target
        assert!(matches!(
            HipRdata::decode(&junk),
            Err(RdataError::BadName(_))
        ));
        let mut dsa = rd.clone();
        dsa.pk_algorithm = 1;
        assert_eq!(dsa.host_id(), Err(RdataError::UnsupportedAlgorithm(1)));
    }
}
