//! ESP transforms for HIP (RFC 7402) and drawing their keys from KEYMAT (RFC 7402 §7).

use zeroize::Zeroizing;

use crate::{
    crypto::{CryptoError, Keymat},
    hit::Hit,
};

/// ESP_TRANSFORM suite IDs (RFC 7402 §5.1.2, IANA "ESP Transform Suite IDs").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EspSuite {
    /// NULL encryption with HMAC-SHA-256 (ID 7).
    NullHmacSha256,
    /// AES-128-CBC with HMAC-SHA-256 (ID 8).
    Aes128CbcHmacSha256,
    /// AES-256-CBC with HMAC-SHA-256 (ID 9).
    Aes256CbcHmacSha256,
    /// AES-GCM with a 16-octet ICV (ID 13), here with a 128-bit key.
    AesGcm128Icv16,
}

impl EspSuite {
    /// All supported, in default preference order.
    pub const ALL: [EspSuite; 4] = [
        EspSuite::AesGcm128Icv16,
        EspSuite::Aes128CbcHmacSha256,
        EspSuite::Aes256CbcHmacSha256,
        EspSuite::NullHmacSha256,
    ];

    /// The default offer: the encrypting suites only. RFC 7402 §3.3.5 forbids accepting
    /// an authentication-only suite (NULL) unless local policy explicitly allows it.
    pub const DEFAULT: [EspSuite; 3] = [
        EspSuite::AesGcm128Icv16,
        EspSuite::Aes128CbcHmacSha256,
        EspSuite::Aes256CbcHmacSha256,
    ];

    /// Wire ID.
    pub fn id(self) -> u16 {
        match self {
            EspSuite::NullHmacSha256 => 7,
            EspSuite::Aes128CbcHmacSha256 => 8,
            EspSuite::Aes256CbcHmacSha256 => 9,
            EspSuite::AesGcm128Icv16 => 13,
        }
    }

    /// From the wire ID.
    pub fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            7 => EspSuite::NullHmacSha256,
            8 => EspSuite::Aes128CbcHmacSha256,
            9 => EspSuite::Aes256CbcHmacSha256,
            13 => EspSuite::AesGcm128Icv16,
            _ => return None,
        })
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            EspSuite::NullHmacSha256 => "null-hmac-sha256",
            EspSuite::Aes128CbcHmacSha256 => "aes128-cbc-hmac-sha256",
            EspSuite::Aes256CbcHmacSha256 => "aes256-cbc-hmac-sha256",
            EspSuite::AesGcm128Icv16 => "aes128-gcm16",
        }
    }

    /// Parses a short name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == s)
    }

    /// Octets of the encryption key drawn from KEYMAT. For AES-GCM this is the 16-octet
    /// AES key followed by the 4-octet salt of RFC 4106 §8.1 (the form Linux's
    /// `rfc4106(gcm(aes))` takes as one key).
    pub fn enc_key_len(self) -> usize {
        match self {
            EspSuite::NullHmacSha256 => 0,
            EspSuite::Aes128CbcHmacSha256 => 16,
            EspSuite::Aes256CbcHmacSha256 => 32,
            EspSuite::AesGcm128Icv16 => 20,
        }
    }

    /// Octets of the integrity key drawn from KEYMAT (0 for combined-mode ciphers).
    pub fn auth_key_len(self) -> usize {
        match self {
            EspSuite::AesGcm128Icv16 => 0,
            _ => 32,
        }
    }

    /// ICV length in bits (HMAC-SHA-256-128 per RFC 4868; 128 for GCM-16).
    pub fn icv_bits(self) -> u32 {
        128
    }
}

/// Keys of one ESP SA direction.
#[derive(Clone, PartialEq, Eq)]
pub struct EspKeys {
    /// Encryption key (with salt for AES-GCM).
    pub enc: Zeroizing<Vec<u8>>,
    /// Integrity key (empty for AES-GCM).
    pub auth: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for EspKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EspKeys(enc {} octets, auth {} octets)",
            self.enc.len(),
            self.auth.len()
        )
    }
}

/// Draws both directions' ESP keys starting at KEYMAT `index` (RFC 7402 §7: "SA-gl ESP
/// encryption key, SA-gl ESP authentication key, SA-lg ESP encryption key, SA-lg ESP
/// authentication key", gl being the outgoing traffic of the host with the greater HIT,
/// HITs compared as unsigned 128-bit integers). Returns (inbound, outbound) for the
/// host whose HIT is `local`, and the index after the drawn keys.
pub fn draw_esp_keys(
    keymat: &Keymat,
    index: usize,
    suite: EspSuite,
    local: Hit,
    peer: Hit,
) -> Result<(EspKeys, EspKeys, usize), CryptoError> {
    let (e, a) = (suite.enc_key_len(), suite.auth_key_len());
    let block = keymat.draw(index, 2 * (e + a))?;
    let gl = EspKeys {
        enc: Zeroizing::new(block[..e].to_vec()),
        auth: Zeroizing::new(block[e..e + a].to_vec()),
    };
    let lg = EspKeys {
        enc: Zeroizing::new(block[e + a..2 * e + a].to_vec()),
        auth: Zeroizing::new(block[2 * e + a..].to_vec()),
    };
    let (inbound, outbound) = if local > peer { (lg, gl) } else { (gl, lg) };
    Ok((inbound, outbound, index + 2 * (e + a)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Rhash;

    #[test]
    fn both_ends_draw_mirrored_keys() {
        let a: Hit = "2001:20::a".parse().unwrap();
        let b: Hit = "2001:20::b".parse().unwrap();
        let k = Keymat::derive(Rhash::Sha384, &[1; 48], &[2; 48], &[3; 48], a, b);
        for s in EspSuite::ALL {
            let (a_in, a_out, next) = draw_esp_keys(&k, 96, s, a, b).unwrap();
            let (b_in, b_out, _) = draw_esp_keys(&k, 96, s, b, a).unwrap();
            assert_eq!(a_in, b_out);
            assert_eq!(a_out, b_in);
            assert_ne!(a_in, a_out);
            assert_eq!(a_in.enc.len(), s.enc_key_len());
            assert_eq!(next, 96 + 2 * (s.enc_key_len() + s.auth_key_len()));
            // b has the greater HIT: its outbound keys are the first drawn (SA-gl).
            assert_eq!(&b_out.enc[..], &k.draw(96, s.enc_key_len()).unwrap()[..]);
            assert_eq!(EspSuite::from_id(s.id()), Some(s));
        }
    }
}
