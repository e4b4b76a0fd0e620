//! Typed HIP parameters (RFC 7401 §5.2, RFC 7402 §5.1, RFC 8046 §4).

use super::{WireError, param_total_len};

/// Parameter type numbers, ascending.
pub mod ty {
    /// ESP_INFO (RFC 7402 §5.1.1).
    pub const ESP_INFO: u16 = 65;
    /// R1_COUNTER.
    pub const R1_COUNTER: u16 = 129;
    /// LOCATOR_SET (RFC 8046 §4).
    pub const LOCATOR_SET: u16 = 193;
    /// PUZZLE.
    pub const PUZZLE: u16 = 257;
    /// SOLUTION.
    pub const SOLUTION: u16 = 321;
    /// SEQ.
    pub const SEQ: u16 = 385;
    /// ACK.
    pub const ACK: u16 = 449;
    /// DH_GROUP_LIST.
    pub const DH_GROUP_LIST: u16 = 511;
    /// DIFFIE_HELLMAN.
    pub const DIFFIE_HELLMAN: u16 = 513;
    /// HIP_CIPHER.
    pub const HIP_CIPHER: u16 = 579;
    /// ENCRYPTED.
    pub const ENCRYPTED: u16 = 641;
    /// HOST_ID.
    pub const HOST_ID: u16 = 705;
    /// HIT_SUITE_LIST.
    pub const HIT_SUITE_LIST: u16 = 715;
    /// CERT.
    pub const CERT: u16 = 768;
    /// NOTIFICATION.
    pub const NOTIFICATION: u16 = 832;
    /// ECHO_REQUEST_SIGNED.
    pub const ECHO_REQUEST_SIGNED: u16 = 897;
    /// ECHO_RESPONSE_SIGNED.
    pub const ECHO_RESPONSE_SIGNED: u16 = 961;
    /// TRANSPORT_FORMAT_LIST.
    pub const TRANSPORT_FORMAT_LIST: u16 = 2049;
    /// ESP_TRANSFORM (RFC 7402 §5.1.2).
    pub const ESP_TRANSFORM: u16 = 4095;
    /// HIP_MAC (called HMAC in RFC 7401 §5.2.12).
    pub const HMAC: u16 = 61505;
    /// HIP_MAC_2.
    pub const HMAC_2: u16 = 61569;
    /// HIP_SIGNATURE_2.
    pub const HIP_SIGNATURE_2: u16 = 61633;
    /// HIP_SIGNATURE.
    pub const HIP_SIGNATURE: u16 = 61697;
    /// ECHO_RESPONSE_UNSIGNED.
    pub const ECHO_RESPONSE_UNSIGNED: u16 = 63425;
    /// ECHO_REQUEST_UNSIGNED.
    pub const ECHO_REQUEST_UNSIGNED: u16 = 63661;
}

/// The name of a parameter type, for messages.
pub fn param_name(t: u16) -> &'static str {
    match t {
        ty::ESP_INFO => "ESP_INFO",
        ty::R1_COUNTER => "R1_COUNTER",
        ty::LOCATOR_SET => "LOCATOR_SET",
        ty::PUZZLE => "PUZZLE",
        ty::SOLUTION => "SOLUTION",
        ty::SEQ => "SEQ",
        ty::ACK => "ACK",
        ty::DH_GROUP_LIST => "DH_GROUP_LIST",
        ty::DIFFIE_HELLMAN => "DIFFIE_HELLMAN",
        ty::HIP_CIPHER => "HIP_CIPHER",
        ty::ENCRYPTED => "ENCRYPTED",
        ty::HOST_ID => "HOST_ID",
        ty::HIT_SUITE_LIST => "HIT_SUITE_LIST",
        ty::CERT => "CERT",
        ty::NOTIFICATION => "NOTIFICATION",
        ty::ECHO_REQUEST_SIGNED => "ECHO_REQUEST_SIGNED",
        ty::ECHO_RESPONSE_SIGNED => "ECHO_RESPONSE_SIGNED",
        ty::TRANSPORT_FORMAT_LIST => "TRANSPORT_FORMAT_LIST",
        ty::ESP_TRANSFORM => "ESP_TRANSFORM",
        ty::HMAC => "HIP_MAC",
        ty::HMAC_2 => "HIP_MAC_2",
        ty::HIP_SIGNATURE_2 => "HIP_SIGNATURE_2",
        ty::HIP_SIGNATURE => "HIP_SIGNATURE",
        ty::ECHO_RESPONSE_UNSIGNED => "ECHO_RESPONSE_UNSIGNED",
        ty::ECHO_REQUEST_UNSIGNED => "ECHO_REQUEST_UNSIGNED",
        _ => "unknown",
    }
}

/// One locator of a LOCATOR_SET (RFC 8046 §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Traffic Type (0: both, 1: signaling, 2: data).
    pub traffic_type: u8,
    /// Locator Type (0: IPv6 or IPv4-mapped address; 1: ESP SPI + address).
    pub locator_type: u8,
    /// The P (preferred) bit.
    pub preferred: bool,
    /// Locator Lifetime, seconds.
    pub lifetime: u32,
    /// The locator itself (a multiple of 4 octets).
    pub locator: Vec<u8>,
}

impl Locator {
    /// The address carried by a type 0 or type 1 locator (IPv4-mapped addresses become
    /// IPv4).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        let a: [u8; 16] = match (self.locator_type, self.locator.len()) {
            (0, 16) => self.locator[..].try_into().ok()?,
            (1, 20) => self.locator[4..].try_into().ok()?,
            _ => return None,
        };
        let v6 = std::net::Ipv6Addr::from(a);
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => v6.into(),
        })
    }

    /// The SPI of a type 1 locator.
    pub fn spi(&self) -> Option<u32> {
        (self.locator_type == 1 && self.locator.len() == 20).then(|| {
            u32::from_be_bytes([
                self.locator[0],
                self.locator[1],
                self.locator[2],
                self.locator[3],
            ])
        })
    }
}

/// A typed HIP parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// ESP_INFO: KEYMAT index, old and new SPI (RFC 7402 §5.1.1).
    EspInfo {
        /// Index of the first unused KEYMAT octet.
        keymat_index: u16,
        /// Old SPI (0 in the base exchange).
        old_spi: u32,
        /// New SPI.
        new_spi: u32,
    },
    /// R1_COUNTER: the R1 generation counter.
    R1Counter(u64),
    /// LOCATOR_SET.
    LocatorSet(Vec<Locator>),
    /// PUZZLE.
    Puzzle {
        /// Difficulty K.
        k: u8,
        /// Lifetime exponent (2^(value-32) seconds).
        lifetime: u8,
        /// Opaque data.
        opaque: [u8; 2],
        /// Random #I (RHASH_len/8 octets).
        random_i: Vec<u8>,
    },
    /// SOLUTION.
    Solution {
        /// Difficulty K.
        k: u8,
        /// Opaque data copied from PUZZLE.
        opaque: [u8; 2],
        /// Random #I.
        random_i: Vec<u8>,
        /// Solution #J.
        solution_j: Vec<u8>,
    },
    /// SEQ: Update ID.
    Seq(u32),
    /// ACK: peer Update IDs.
    Ack(Vec<u32>),
    /// DH_GROUP_LIST.
    DhGroupList(Vec<u8>),
    /// DIFFIE_HELLMAN.
    DiffieHellman {
        /// Group ID.
        group: u8,
        /// Public value.
        public: Vec<u8>,
    },
    /// HIP_CIPHER: cipher suite IDs, preferred first.
    HipCipher(Vec<u16>),
    /// ENCRYPTED: IV followed by the ciphertext (the split depends on the cipher).
    Encrypted(Vec<u8>),
    /// HOST_ID.
    HostId {
        /// HI algorithm.
        algorithm: u16,
        /// The "Host Identity" field.
        hi: Vec<u8>,
        /// DI-Type (4 bits).
        di_type: u8,
        /// Domain Identifier.
        di: Vec<u8>,
    },
    /// HIT_SUITE_LIST (octets, suite ID in the high nibble).
    HitSuiteList(Vec<u8>),
    /// NOTIFICATION.
    Notification {
        /// Notify Message Type.
        msg_type: u16,
        /// Notification Data.
        data: Vec<u8>,
    },
    /// ECHO_REQUEST_SIGNED.
    EchoRequestSigned(Vec<u8>),
    /// ECHO_RESPONSE_SIGNED.
    EchoResponseSigned(Vec<u8>),
    /// TRANSPORT_FORMAT_LIST: parameter types of transport formats, preferred first.
    TransportFormatList(Vec<u16>),
    /// ESP_TRANSFORM: suite IDs, preferred first (RFC 7402 §5.1.2).
    EspTransform(Vec<u16>),
    /// HIP_MAC.
    Hmac(Vec<u8>),
    /// HIP_MAC_2.
    Hmac2(Vec<u8>),
    /// HIP_SIGNATURE_2.
    Signature2 {
        /// Signature algorithm (an HI algorithm ID).
        algorithm: u16,
        /// Signature.
        signature: Vec<u8>,
    },
    /// HIP_SIGNATURE.
    Signature {
        /// Signature algorithm (an HI algorithm ID).
        algorithm: u16,
        /// Signature.
        signature: Vec<u8>,
    },
    /// ECHO_RESPONSE_UNSIGNED.
    EchoResponseUnsigned(Vec<u8>),
    /// ECHO_REQUEST_UNSIGNED.
    EchoRequestUnsigned(Vec<u8>),
    /// Any other parameter, kept verbatim.
    Unknown {
        /// Type.
        ty: u16,
        /// Contents.
        contents: Vec<u8>,
    },
}

fn bad(t: u16, why: impl Into<String>) -> WireError {
    WireError::BadParam {
        ty: t,
        name: param_name(t),
        why: why.into(),
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn exact(t: u16, c: &[u8], n: usize) -> Result<(), WireError> {
    if c.len() != n {
        return Err(bad(t, format!("length {} (expected {n})", c.len())));
    }
    Ok(())
}

fn u16_list(t: u16, c: &[u8]) -> Result<Vec<u16>, WireError> {
    if c.is_empty() || !c.len().is_multiple_of(2) {
        return Err(bad(
            t,
            format!("length {} is not a non-zero multiple of 2", c.len()),
        ));
    }
    Ok(c.chunks_exact(2).map(be16).collect())
}

impl Param {
    /// The parameter's type number.
    pub fn ty(&self) -> u16 {
        match self {
            Param::EspInfo { .. } => ty::ESP_INFO,
            Param::R1Counter(_) => ty::R1_COUNTER,
            Param::LocatorSet(_) => ty::LOCATOR_SET,
            Param::Puzzle { .. } => ty::PUZZLE,
            Param::Solution { .. } => ty::SOLUTION,
            Param::Seq(_) => ty::SEQ,
            Param::Ack(_) => ty::ACK,
            Param::DhGroupList(_) => ty::DH_GROUP_LIST,
            Param::DiffieHellman { .. } => ty::DIFFIE_HELLMAN,
            Param::HipCipher(_) => ty::HIP_CIPHER,
            Param::Encrypted(_) => ty::ENCRYPTED,
            Param::HostId { .. } => ty::HOST_ID,
            Param::HitSuiteList(_) => ty::HIT_SUITE_LIST,
            Param::Notification { .. } => ty::NOTIFICATION,
            Param::EchoRequestSigned(_) => ty::ECHO_REQUEST_SIGNED,
            Param::EchoResponseSigned(_) => ty::ECHO_RESPONSE_SIGNED,
            Param::TransportFormatList(_) => ty::TRANSPORT_FORMAT_LIST,
            Param::EspTransform(_) => ty::ESP_TRANSFORM,
            Param::Hmac(_) => ty::HMAC,
            Param::Hmac2(_) => ty::HMAC_2,
            Param::Signature2 { .. } => ty::HIP_SIGNATURE_2,
            Param::Signature { .. } => ty::HIP_SIGNATURE,
            Param::EchoResponseUnsigned(_) => ty::ECHO_RESPONSE_UNSIGNED,
            Param::EchoRequestUnsigned(_) => ty::ECHO_REQUEST_UNSIGNED,
            Param::Unknown { ty, .. } => *ty,
        }
    }

    /// Parses the contents of a parameter of type `t`. Every length is checked; nothing
    /// here panics on any input.
    pub fn parse(t: u16, c: &[u8]) -> Result<Param, WireError> {
        Ok(match t {
            ty::ESP_INFO => {
                exact(t, c, 12)?;
                Param::EspInfo {
                    keymat_index: be16(&c[2..]),
                    old_spi: be32(&c[4..]),
                    new_spi: be32(&c[8..]),
                }
            }
            ty::R1_COUNTER => {
                exact(t, c, 12)?;
                Param::R1Counter(u64::from_be_bytes(c[4..12].try_into().expect("8 octets")))
            }
            ty::LOCATOR_SET => {
                let mut v = Vec::new();
                let mut rest = c;
                while !rest.is_empty() {
                    if rest.len() < 8 {
                        return Err(bad(t, "truncated locator header"));
                    }
                    let n = rest[2] as usize * 4;
                    if rest.len() < 8 + n {
                        return Err(bad(t, format!("locator of {n} octets is truncated")));
                    }
                    v.push(Locator {
                        traffic_type: rest[0],
                        locator_type: rest[1],
                        preferred: rest[3] & 1 == 1,
                        lifetime: be32(&rest[4..]),
                        locator: rest[8..8 + n].to_vec(),
                    });
                    rest = &rest[8 + n..];
                }
                if v.is_empty() {
                    return Err(bad(t, "no locator"));
                }
                Param::LocatorSet(v)
            }
            ty::PUZZLE => {
                if c.len() < 5 || c.len() > 4 + 64 {
                    return Err(bad(t, format!("length {} out of range 5..=68", c.len())));
                }
                Param::Puzzle {
                    k: c[0],
                    lifetime: c[1],
                    opaque: [c[2], c[3]],
                    random_i: c[4..].to_vec(),
                }
            }
            ty::SOLUTION => {
                if c.len() < 6 || !(c.len() - 4).is_multiple_of(2) || c.len() > 4 + 128 {
                    return Err(bad(t, format!("length {} is not 4 + 2n", c.len())));
                }
                let n = (c.len() - 4) / 2;
                Param::Solution {
                    k: c[0],
                    opaque: [c[2], c[3]],
                    random_i: c[4..4 + n].to_vec(),
                    solution_j: c[4 + n..].to_vec(),
                }
            }
            ty::SEQ => {
                exact(t, c, 4)?;
                Param::Seq(be32(c))
            }
            ty::ACK => {
                if c.is_empty() || !c.len().is_multiple_of(4) {
                    return Err(bad(t, format!("length {} is not a multiple of 4", c.len())));
                }
                Param::Ack(c.chunks_exact(4).map(be32).collect())
            }
            ty::DH_GROUP_LIST => {
                if c.is_empty() {
                    return Err(bad(t, "empty list"));
                }
                Param::DhGroupList(c.to_vec())
            }
            ty::DIFFIE_HELLMAN => {
                if c.len() < 3 {
                    return Err(bad(t, "shorter than its fixed fields"));
                }
                let n = be16(&c[1..]) as usize;
                if c.len() != 3 + n || n == 0 {
                    return Err(bad(
                        t,
                        format!(
                            "public value length {n} does not match parameter length {}",
                            c.len()
                        ),
                    ));
                }
                Param::DiffieHellman {
                    group: c[0],
                    public: c[3..].to_vec(),
                }
            }
            ty::HIP_CIPHER => Param::HipCipher(u16_list(t, c)?),
            ty::ENCRYPTED => {
                if c.len() < 4 {
                    return Err(bad(t, "shorter than its reserved field"));
                }
                Param::Encrypted(c[4..].to_vec())
            }
            ty::HOST_ID => {
                if c.len() < 6 {
                    return Err(bad(t, "shorter than its fixed fields"));
                }
                let hi_len = be16(c) as usize;
                let di_type = c[2] >> 4;
                let di_len = (be16(&c[2..]) & 0x0fff) as usize;
                let algorithm = be16(&c[4..]);
                if 6 + hi_len + di_len != c.len() {
                    return Err(bad(
                        t,
                        format!(
                            "HI length {hi_len} + DI length {di_len} + 6 != parameter length {}",
                            c.len()
                        ),
                    ));
                }
                Param::HostId {
                    algorithm,
                    hi: c[6..6 + hi_len].to_vec(),
                    di_type,
                    di: c[6 + hi_len..].to_vec(),
                }
            }
            ty::HIT_SUITE_LIST => {
                if c.is_empty() {
                    return Err(bad(t, "empty list"));
                }
                Param::HitSuiteList(c.to_vec())
            }
            ty::NOTIFICATION => {
                if c.len() < 4 {
                    return Err(bad(t, "shorter than its fixed fields"));
                }
                Param::Notification {
                    msg_type: be16(&c[2..]),
                    data: c[4..].to_vec(),
                }
            }
            ty::ECHO_REQUEST_SIGNED => Param::EchoRequestSigned(c.to_vec()),
            ty::ECHO_RESPONSE_SIGNED => Param::EchoResponseSigned(c.to_vec()),
            ty::TRANSPORT_FORMAT_LIST => Param::TransportFormatList(u16_list(t, c)?),
            ty::ESP_TRANSFORM => {
                if c.len() < 4 || !c.len().is_multiple_of(2) {
                    return Err(bad(t, format!("length {} is not 2 + 2n, n >= 1", c.len())));
                }
                Param::EspTransform(c[2..].chunks_exact(2).map(be16).collect())
            }
            ty::HMAC | ty::HMAC_2 => {
                if c.is_empty() {
                    return Err(bad(t, "empty"));
                }
                if t == ty::HMAC {
                    Param::Hmac(c.to_vec())
                } else {
                    Param::Hmac2(c.to_vec())
                }
            }
            ty::HIP_SIGNATURE | ty::HIP_SIGNATURE_2 => {
                if c.len() < 3 {
                    return Err(bad(t, "shorter than its fixed fields"));
                }
                let algorithm = be16(c);
                let signature = c[2..].to_vec();
                if t == ty::HIP_SIGNATURE {
                    Param::Signature {
                        algorithm,
                        signature,
                    }
                } else {
                    Param::Signature2 {
                        algorithm,
                        signature,
                    }
                }
            }
            ty::ECHO_RESPONSE_UNSIGNED => Param::EchoResponseUnsigned(c.to_vec()),
            ty::ECHO_REQUEST_UNSIGNED => Param::EchoRequestUnsigned(c.to_vec()),
            _ => Param::Unknown {
                ty: t,
                contents: c.to_vec(),
            },
        })
    }

    /// Writes the TLV (type, length, contents, zero padding to 8 octets) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.ty().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        match self {
            Param::EspInfo {
                keymat_index,
                old_spi,
                new_spi,
            } => {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&keymat_index.to_be_bytes());
                out.extend_from_slice(&old_spi.to_be_bytes());
                out.extend_from_slice(&new_spi.to_be_bytes());
            }
            Param::R1Counter(c) => {
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&c.to_be_bytes());
            }
            Param::LocatorSet(v) => {
                for l in v {
                    out.push(l.traffic_type);
                    out.push(l.locator_type);
                    out.push((l.locator.len() / 4) as u8);
                    out.push(l.preferred as u8);
                    out.extend_from_slice(&l.lifetime.to_be_bytes());
                    out.extend_from_slice(&l.locator);
                }
            }
            Param::Puzzle {
                k,
                lifetime,
                opaque,
                random_i,
            } => {
                out.extend_from_slice(&[*k, *lifetime, opaque[0], opaque[1]]);
                out.extend_from_slice(random_i);
            }
            Param::Solution {
                k,
                opaque,
                random_i,
                solution_j,
            } => {
                out.extend_from_slice(&[*k, 0, opaque[0], opaque[1]]);
                out.extend_from_slice(random_i);
                out.extend_from_slice(solution_j);
            }
            Param::Seq(s) => out.extend_from_slice(&s.to_be_bytes()),
            Param::Ack(v) => v
                .iter()
                .for_each(|a| out.extend_from_slice(&a.to_be_bytes())),
            Param::DhGroupList(v) | Param::HitSuiteList(v) => out.extend_from_slice(v),
            Param::DiffieHellman { group, public } => {
                out.push(*group);
                out.extend_from_slice(&(public.len() as u16).to_be_bytes());
                out.extend_from_slice(public);
            }
            Param::HipCipher(v) | Param::TransportFormatList(v) => v
                .iter()
                .for_each(|a| out.extend_from_slice(&a.to_be_bytes())),
            Param::Encrypted(d) => {
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(d);
            }
            Param::HostId {
                algorithm,
                hi,
                di_type,
                di,
            } => {
                out.extend_from_slice(&(hi.len() as u16).to_be_bytes());
                let di_field = ((*di_type as u16 & 0xf) << 12) | (di.len() as u16 & 0x0fff);
                out.extend_from_slice(&di_field.to_be_bytes());
                out.extend_from_slice(&algorithm.to_be_bytes());
                out.extend_from_slice(hi);
                out.extend_from_slice(di);
            }
            Param::Notification { msg_type, data } => {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&msg_type.to_be_bytes());
                out.extend_from_slice(data);
            }
            Param::EspTransform(v) => {
                out.extend_from_slice(&[0, 0]);
                v.iter()
                    .for_each(|a| out.extend_from_slice(&a.to_be_bytes()))
            }
            Param::EchoRequestSigned(d)
            | Param::EchoResponseSigned(d)
            | Param::EchoRequestUnsigned(d)
            | Param::EchoResponseUnsigned(d)
            | Param::Hmac(d)
            | Param::Hmac2(d) => out.extend_from_slice(d),
            Param::Signature2 {
                algorithm,
                signature,
            }
            | Param::Signature {
                algorithm,
                signature,
            } => {
                out.extend_from_slice(&algorithm.to_be_bytes());
                out.extend_from_slice(signature);
            }
            Param::Unknown { contents, .. } => out.extend_from_slice(contents),
        }
        let len = out.len() - start - 4;
        out[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
        let total = param_total_len(len);
        out.resize(start + total, 0);
    }

    /// The TLV as a byte vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.emit(&mut v);
        v
    }
}

/// NOTIFICATION message types (RFC 7401 §5.2.19), one table.
pub mod notify {
    /// UNSUPPORTED_CRITICAL_PARAMETER_TYPE.
    pub const UNSUPPORTED_CRITICAL_PARAMETER_TYPE: u16 = 1;
    /// INVALID_SYNTAX.
    pub const INVALID_SYNTAX: u16 = 7;
    /// NO_DH_PROPOSAL_CHOSEN.
    pub const NO_DH_PROPOSAL_CHOSEN: u16 = 14;
    /// INVALID_DH_CHOSEN.
    pub const INVALID_DH_CHOSEN: u16 = 15;
    /// NO_HIP_PROPOSAL_CHOSEN.
    pub const NO_HIP_PROPOSAL_CHOSEN: u16 = 16;
    /// INVALID_HIP_CIPHER_CHOSEN.
    pub const INVALID_HIP_CIPHER_CHOSEN: u16 = 17;
    /// NO_ESP_PROPOSAL_CHOSEN (RFC 7402 §5.1.3).
    pub const NO_ESP_PROPOSAL_CHOSEN: u16 = 18;
    /// INVALID_ESP_TRANSFORM_CHOSEN (RFC 7402 §5.1.3).
    pub const INVALID_ESP_TRANSFORM_CHOSEN: u16 = 19;
    /// UNSUPPORTED_HIT_SUITE.
    pub const UNSUPPORTED_HIT_SUITE: u16 = 20;
    /// NO_VALID_NAT_TRAVERSAL_MODE_PARAMETER (RFC 9028 §5.10).
    pub const NO_VALID_NAT_TRAVERSAL_MODE_PARAMETER: u16 = 60;
    /// NAT_KEEPALIVE (RFC 9028 §5.3): an empty, signed NOTIFY every 15 s over UDP.
    pub const NAT_KEEPALIVE: u16 = 16385;
    /// AUTHENTICATION_FAILED.
    pub const AUTHENTICATION_FAILED: u16 = 24;
    /// CHECKSUM_FAILED.
    pub const CHECKSUM_FAILED: u16 = 26;
    /// HIP_MAC_FAILED.
    pub const HIP_MAC_FAILED: u16 = 28;
    /// ENCRYPTION_FAILED.
    pub const ENCRYPTION_FAILED: u16 = 32;
    /// INVALID_HIT.
    pub const INVALID_HIT: u16 = 40;
    /// BLOCKED_BY_POLICY.
    pub const BLOCKED_BY_POLICY: u16 = 42;
    /// RESPONDER_BUSY_PLEASE_RETRY.
    pub const RESPONDER_BUSY_PLEASE_RETRY: u16 = 44;
    /// I2_ACKNOWLEDGEMENT (status type).
    pub const I2_ACKNOWLEDGEMENT: u16 = 16384;

    /// The name of a message type.
    pub fn name(t: u16) -> &'static str {
        match t {
            UNSUPPORTED_CRITICAL_PARAMETER_TYPE => "UNSUPPORTED_CRITICAL_PARAMETER_TYPE",
            INVALID_SYNTAX => "INVALID_SYNTAX",
            NO_DH_PROPOSAL_CHOSEN => "NO_DH_PROPOSAL_CHOSEN",
            INVALID_DH_CHOSEN => "INVALID_DH_CHOSEN",
            NO_HIP_PROPOSAL_CHOSEN => "NO_HIP_PROPOSAL_CHOSEN",
            INVALID_HIP_CIPHER_CHOSEN => "INVALID_HIP_CIPHER_CHOSEN",
            NO_ESP_PROPOSAL_CHOSEN => "NO_ESP_PROPOSAL_CHOSEN",
            INVALID_ESP_TRANSFORM_CHOSEN => "INVALID_ESP_TRANSFORM_CHOSEN",
            UNSUPPORTED_HIT_SUITE => "UNSUPPORTED_HIT_SUITE",
            AUTHENTICATION_FAILED => "AUTHENTICATION_FAILED",
            CHECKSUM_FAILED => "CHECKSUM_FAILED",
            HIP_MAC_FAILED => "HIP_MAC_FAILED",
            ENCRYPTION_FAILED => "ENCRYPTION_FAILED",
            INVALID_HIT => "INVALID_HIT",
            BLOCKED_BY_POLICY => "BLOCKED_BY_POLICY",
            RESPONDER_BUSY_PLEASE_RETRY => "RESPONDER_BUSY_PLEASE_RETRY",
            I2_ACKNOWLEDGEMENT => "I2_ACKNOWLEDGEMENT",
            _ => "unknown",
        }
    }
}
