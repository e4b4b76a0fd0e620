//! The HIP packet format (RFC 7401 §5): header, TLV parameters, checksum.
//!
//! Parsing is checked and never panics: [`Packet::parse`] validates the header, every
//! parameter's bounds, its padding and the ascending type order (RFC 7401 §5.2.1), and
//! [`Param::parse`] turns one parameter's contents into a typed value after checking
//! every length field. [`Param::emit`] is the exact inverse (parse ∘ emit round-trips
//! byte for byte), and [`PacketBuilder`] assembles packets in order.

mod param;

use std::net::IpAddr;

pub use param::*;

use crate::hit::Hit;

/// IP protocol number of HIP (RFC 7401 §5.1).
pub const IPPROTO_HIP: u8 = 139;
/// IPPROTO_NONE, the Next Header value of HIP packets that carry no payload.
pub const IPPROTO_NONE: u8 = 59;
/// Fixed header length.
pub const HEADER_LEN: usize = 40;
/// HIP version implemented (RFC 7401).
pub const VERSION: u8 = 2;
/// Largest HIP packet the header length field can describe: (255 + 1) × 8 octets.
pub const MAX_PACKET_LEN: usize = 2048;

/// Errors found while parsing HIP packets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer octets than the fixed header.
    #[error("packet shorter than the 40-octet HIP header ({0} octets)")]
    TooShort(usize),
    /// The header length field disagrees with the number of octets received.
    #[error("header length field says {declared} octets, packet has {actual}")]
    LengthMismatch {
        /// Octets declared by the header.
        declared: usize,
        /// Octets present.
        actual: usize,
    },
    /// A HIP version other than 2.
    #[error("HIP version {0} (only 2 is implemented)")]
    Version(u8),
    /// The fixed bits of the header are wrong.
    #[error("fixed header bits are wrong (byte 2 bit 0 must be 0, byte 3 bit 7 must be 1)")]
    FixedBits,
    /// A packet type not defined by the RFCs implemented here.
    #[error("unknown packet type {0}")]
    UnknownPacketType(u8),
    /// The checksum over the pseudo-header does not verify.
    #[error("bad checksum")]
    BadChecksum,
    /// A parameter's TLV header or body runs past the end of the packet.
    #[error("parameter type {ty} at offset {offset} is truncated")]
    TruncatedParam {
        /// Parameter type.
        ty: u16,
        /// Offset of the TLV in the packet.
        offset: usize,
    },
    /// Parameters not in ascending type order (RFC 7401 §5.2.1).
    #[error("parameter type {ty} follows type {prev}: parameters must be in ascending order")]
    OutOfOrder {
        /// Offending type.
        ty: u16,
        /// Preceding type.
        prev: u16,
    },
    /// A parameter whose length field is wrong for its type.
    #[error("parameter {name} ({ty}): {why}")]
    BadParam {
        /// Parameter type.
        ty: u16,
        /// Parameter name.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A parameter that must be present is missing.
    #[error("missing parameter {0}")]
    Missing(&'static str),
    /// A parameter appears more often than allowed.
    #[error("parameter {0} appears more than once")]
    Duplicate(&'static str),
    /// A critical parameter this implementation does not understand (RFC 7401 §5.2.1).
    #[error("unsupported critical parameter type {0}")]
    UnsupportedCritical(u16),
    /// The packet being built would exceed what the header length can describe.
    #[error("packet of {0} octets exceeds the 2048-octet maximum")]
    TooLong(usize),
}

/// HIP packet types (RFC 7401 §5.3, RFC 7401 §5.3.5-8 for UPDATE/NOTIFY/CLOSE/CLOSE_ACK).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// I1: the initiator's trigger.
    I1 = 1,
    /// R1: the responder's puzzle and DH value.
    R1 = 2,
    /// I2: the solution and the initiator's DH value.
    I2 = 3,
    /// R2: the responder's confirmation.
    R2 = 4,
    /// UPDATE (RFC 7401 §5.3.5).
    Update = 16,
    /// NOTIFY (RFC 7401 §5.3.6).
    Notify = 17,
    /// CLOSE (RFC 7401 §5.3.7).
    Close = 18,
    /// CLOSE_ACK (RFC 7401 §5.3.8).
    CloseAck = 19,
}

impl PacketType {
    /// From the 7-bit wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::I1,
            2 => Self::R1,
            3 => Self::I2,
            4 => Self::R2,
            16 => Self::Update,
            17 => Self::Notify,
            18 => Self::Close,
            19 => Self::CloseAck,
            _ => return None,
        })
    }
}

/// The fixed header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Packet type.
    pub packet_type: PacketType,
    /// Controls (bit 0x0001: anonymous HI, RFC 7401 §5.1.1).
    pub controls: u16,
    /// Checksum as received.
    pub checksum: u16,
    /// Sender's HIT.
    pub sender: Hit,
    /// Receiver's HIT.
    pub receiver: Hit,
}

/// One parameter located inside a received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawParam<'a> {
    /// Type.
    pub ty: u16,
    /// The contents (the Length field's worth of octets, without padding).
    pub contents: &'a [u8],
    /// Offset of the TLV header in the packet.
    pub offset: usize,
    /// Length of the whole TLV including padding.
    pub total_len: usize,
}

impl RawParam<'_> {
    /// Whether the critical bit (the type's lowest bit, RFC 7401 §5.2.1) is set.
    pub fn is_critical(&self) -> bool {
        self.ty & 1 == 1
    }

    /// Parses the contents into a typed parameter.
    pub fn parse(&self) -> Result<Param, WireError> {
        Param::parse(self.ty, self.contents)
    }
}

/// A received HIP packet whose structure has been checked.
#[derive(Clone, Debug)]
pub struct Packet<'a> {
    /// The header.
    pub header: Header,
    /// The parameters, in packet order (ascending type).
    pub params: Vec<RawParam<'a>>,
    /// The whole packet.
    pub bytes: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses and structurally validates a HIP packet (not its checksum: see
    /// [`verify_checksum`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        if bytes.len() < HEADER_LEN {
            return Err(WireError::TooShort(bytes.len()));
        }
        let declared = (bytes[1] as usize + 1) * 8;
        if declared != bytes.len() {
            return Err(WireError::LengthMismatch {
                declared,
                actual: bytes.len(),
            });
        }
        if bytes[2] & 0x80 != 0 || bytes[3] & 0x01 != 1 {
            return Err(WireError::FixedBits);
        }
        let version = bytes[3] >> 4;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let packet_type =
            PacketType::from_u8(bytes[2]).ok_or(WireError::UnknownPacketType(bytes[2]))?;
        let mut sender = [0u8; 16];
        sender.copy_from_slice(&bytes[8..24]);
        let mut receiver = [0u8; 16];
        receiver.copy_from_slice(&bytes[24..40]);
        let header = Header {
            packet_type,
            checksum: u16::from_be_bytes([bytes[4], bytes[5]]),
            controls: u16::from_be_bytes([bytes[6], bytes[7]]),
            sender: Hit(sender),
            receiver: Hit(receiver),
        };
        let mut params = Vec::new();
        let mut off = HEADER_LEN;
        let mut prev: Option<u16> = None;
        while off < bytes.len() {
            let rest = &bytes[off..];
            if rest.len() < 4 {
                return Err(WireError::TruncatedParam { ty: 0, offset: off });
            }
            let ty = u16::from_be_bytes([rest[0], rest[1]]);
            let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
            let total = param_total_len(len);
            if total > rest.len() {
                return Err(WireError::TruncatedParam { ty, offset: off });
            }
            if let Some(p) = prev
                && ty < p
            {
                return Err(WireError::OutOfOrder { ty, prev: p });
            }
            prev = Some(ty);
            params.push(RawParam {
                ty,
                contents: &rest[4..4 + len],
                offset: off,
                total_len: total,
            });
            off += total;
        }
        Ok(Packet {
            header,
            params,
            bytes,
        })
    }

    /// The first parameter of type `ty`.
    pub fn find(&self, ty: u16) -> Option<&RawParam<'a>> {
        self.params.iter().find(|p| p.ty == ty)
    }

    /// The single parameter of type `ty`, parsed; an error if it is absent or repeated.
    pub fn required(&self, ty: u16) -> Result<Param, WireError> {
        self.optional(ty)?.ok_or(WireError::Missing(param_name(ty)))
    }

    /// The parameter of type `ty` if present, parsed; an error if repeated or malformed.
    pub fn optional(&self, ty: u16) -> Result<Option<Param>, WireError> {
        let mut it = self.params.iter().filter(|p| p.ty == ty);
        let Some(first) = it.next() else {
            return Ok(None);
        };
        if it.next().is_some() {
            return Err(WireError::Duplicate(param_name(ty)));
        }
        first.parse().map(Some)
    }

    /// The packet as it is covered by an HMAC or signature placed at `param_offset`: the
    /// octets before that parameter, with the header length adjusted as if the packet
    /// ended there and the checksum zeroed (RFC 7401 §5.2.12-15, §6.4.1).
    pub fn covered_prefix(&self, param_offset: usize) -> Vec<u8> {
        let mut v = self.bytes[..param_offset].to_vec();
        v[1] = (param_offset / 8 - 1) as u8;
        v[4] = 0;
        v[5] = 0;
        v
    }

    /// Rejects critical parameters not in `known` (RFC 7401 §5.2.1: a critical parameter
    /// that is not understood fails the whole packet).
    pub fn check_critical(&self, known: &[u16]) -> Result<(), WireError> {
        for p in &self.params {
            if p.is_critical() && !known.contains(&p.ty) {
                return Err(WireError::UnsupportedCritical(p.ty));
            }
        }
        Ok(())
    }
}

/// Length of a TLV with `len` octets of contents, padded to a multiple of 8
/// (RFC 7401 §5.2.1: `11 + Length - (Length + 3) % 8`).
pub fn param_total_len(len: usize) -> usize {
    11 + len - (len + 3) % 8
}

/// Builds a HIP packet parameter by parameter.
#[derive(Clone, Debug)]
pub struct PacketBuilder {
    buf: Vec<u8>,
    last_ty: Option<u16>,
}

impl PacketBuilder {
    /// Starts a packet with the given header fields.
    pub fn new(ty: PacketType, controls: u16, sender: Hit, receiver: Hit) -> Self {
        let mut buf = Vec::with_capacity(512);
        buf.extend_from_slice(&[IPPROTO_NONE, 4, ty as u8, (VERSION << 4) | 1, 0, 0]);
        buf.extend_from_slice(&controls.to_be_bytes());
        buf.extend_from_slice(&sender.0);
        buf.extend_from_slice(&receiver.0);
        Self { buf, last_ty: None }
    }

    /// Appends a parameter. Parameters must be pushed in ascending type order; pushing
    /// one out of order is a programming error reported as [`WireError::OutOfOrder`].
    pub fn push(&mut self, p: &Param) -> Result<&mut Self, WireError> {
        let ty = p.ty();
        if let Some(prev) = self.last_ty
            && ty < prev
        {
            return Err(WireError::OutOfOrder { ty, prev });
        }
        self.last_ty = Some(ty);
        p.emit(&mut self.buf);
        if self.buf.len() > MAX_PACKET_LEN {
            return Err(WireError::TooLong(self.buf.len()));
        }
        self.fix_len();
        Ok(self)
    }

    fn fix_len(&mut self) {
        self.buf[1] = (self.buf.len() / 8 - 1) as u8;
    }

    /// The packet so far, with the header length covering it and a zero checksum: the
    /// input of an HMAC or signature about to be appended.
    pub fn covered(&self) -> &[u8] {
        &self.buf
    }

    /// The finished packet with a zero checksum (use [`set_checksum`] once the locators
    /// are known).
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Computes the HIP checksum of `packet` between `src` and `dst` (RFC 7401 §5.1.1: the
/// Internet checksum over the IPv4 or IPv6 pseudo-header and the whole HIP packet, with
/// the checksum field taken as zero). Mixed address families yield `None`, and so does
/// a packet longer than an IPv4 datagram's length field can say over IPv4.
///
/// The sum is kept in 64 bits and folded at the end: 32 bits overflowed for inputs over
/// 128 KiB (longer than any datagram, but the function takes any slice; found by
/// `fuzz/fuzz_targets/hip_packet_parse.rs`).
pub fn checksum(src: IpAddr, dst: IpAddr, packet: &[u8]) -> Option<u16> {
    let mut sum: u64 = 0;
    let mut add = |data: &[u8]| {
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [b] = chunks.remainder() {
            sum += u64::from(*b) << 8;
        }
    };
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            add(&s.octets());
            add(&d.octets());
            add(&(packet.len() as u32).to_be_bytes());
            add(&[0, 0, 0, IPPROTO_HIP]);
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
            add(&[0, IPPROTO_HIP]);
            add(&u16::try_from(packet.len()).ok()?.to_be_bytes());
        }
        _ => return None,
    }
    // The checksum field (octets 4..6) counts as zero.
    if packet.len() >= 6 {
        add(&packet[..4]);
        add(&packet[6..]);
    } else {
        add(packet);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    Some(!(sum as u16))
}

/// Writes the checksum into `packet`.
pub fn set_checksum(packet: &mut [u8], src: IpAddr, dst: IpAddr) {
    if packet.len() < HEADER_LEN {
        return;
    }
    let c = checksum(src, dst, packet).unwrap_or(0);
    packet[4..6].copy_from_slice(&c.to_be_bytes());
}

/// Whether the checksum of `packet` is right for `src` → `dst`.
pub fn verify_checksum(packet: &[u8], src: IpAddr, dst: IpAddr) -> bool {
    packet.len() >= HEADER_LEN
        && checksum(src, dst, packet) == Some(u16::from_be_bytes([packet[4], packet[5]]))
}

#[cfg(test)]
mod tests;
