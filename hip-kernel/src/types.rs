//! Typed parameters of the kernel-IPsec interface (strongSwan's `kernel_ipsec.h` in
//! spirit): HIT pairs, locators, SPIs, ESP transforms and keys, lifetimes, policies.
//!
//! These types know nothing of HIP packets: the HIP core's `Established` event is mapped
//! into them by the agent, so that this crate and `hip-proto` evolve independently.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{XfrmError, owner};

/// An ESP transform of RFC 7402 §5.1.2 (the ESP_TRANSFORM suite IDs of the IANA
/// "HIP ESP Transform Suite IDs" registry), as far as hip supports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EspTransform {
    /// Suite 8: AES-128-CBC (RFC 3602) with HMAC-SHA-256-128 (RFC 4868).
    AesCbc128HmacSha256,
    /// Suite 13: AES-GCM with a 16-octet ICV (RFC 4106), 128-bit key.
    AesGcm128Icv16,
    /// Suite 7: NULL encryption (RFC 2410) with HMAC-SHA-256-128 (RFC 4868); debugging
    /// only, the payload is readable on the wire.
    NullHmacSha256,
}

/// Kernel algorithm names and lengths of one transform (what `ip xfrm state` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KernelAlgs {
    /// `enc` algorithm (`XFRMA_ALG_CRYPT`), if not AEAD.
    pub enc: Option<&'static str>,
    /// `auth-trunc` algorithm (`XFRMA_ALG_AUTH_TRUNC`) and its truncation in bits.
    pub auth: Option<(&'static str, u32)>,
    /// `aead` algorithm (`XFRMA_ALG_AEAD`) and its ICV length in bits.
    pub aead: Option<(&'static str, u32)>,
}

impl EspTransform {
    /// All supported transforms, most preferred first.
    pub const ALL: [EspTransform; 3] = [
        EspTransform::AesGcm128Icv16,
        EspTransform::AesCbc128HmacSha256,
        EspTransform::NullHmacSha256,
    ];

    /// The RFC 7402 suite ID carried in ESP_TRANSFORM.
    pub const fn suite_id(self) -> u16 {
        match self {
            EspTransform::NullHmacSha256 => 7,
            EspTransform::AesCbc128HmacSha256 => 8,
            EspTransform::AesGcm128Icv16 => 13,
        }
    }

    /// The transform for an RFC 7402 suite ID, if hip supports it.
    pub fn from_suite_id(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.suite_id() == id)
    }

    /// A short name.
    pub const fn name(self) -> &'static str {
        match self {
            EspTransform::AesCbc128HmacSha256 => "aes-128-cbc+hmac-sha-256-128",
            EspTransform::AesGcm128Icv16 => "aes-gcm-128-icv16",
            EspTransform::NullHmacSha256 => "null+hmac-sha-256-128",
        }
    }

    /// Octets of the encryption key. For AES-GCM this is the 16-octet key followed by
    /// the 4-octet salt, which RFC 4106 §8.1 draws from KEYMAT together with the key.
    pub const fn enc_key_len(self) -> usize {
        match self {
            EspTransform::AesCbc128HmacSha256 => 16,
            EspTransform::AesGcm128Icv16 => 20,
            EspTransform::NullHmacSha256 => 0,
        }
    }

    /// Octets of the integrity key (zero for AEAD transforms).
    pub const fn auth_key_len(self) -> usize {
        match self {
            EspTransform::AesCbc128HmacSha256 | EspTransform::NullHmacSha256 => 32,
            EspTransform::AesGcm128Icv16 => 0,
        }
    }

    /// KEYMAT octets one direction consumes.
    pub const fn keymat_len(self) -> usize {
        self.enc_key_len() + self.auth_key_len()
    }

    pub(crate) const fn kernel_algs(self) -> KernelAlgs {
        match self {
            EspTransform::AesCbc128HmacSha256 => KernelAlgs {
                enc: Some("cbc(aes)"),
                auth: Some(("hmac(sha256)", 128)),
                aead: None,
            },
            EspTransform::AesGcm128Icv16 => KernelAlgs {
                enc: None,
                auth: None,
                aead: Some(("rfc4106(gcm(aes))", 128)),
            },
            // The kernel's ESP needs an encryption algorithm even for NULL (RFC 2410).
            EspTransform::NullHmacSha256 => KernelAlgs {
                enc: Some("ecb(cipher_null)"),
                auth: Some(("hmac(sha256)", 128)),
                aead: None,
            },
        }
    }

    /// The transform whose kernel algorithm names these are (for reading SAs back).
    pub(crate) fn from_kernel_names(
        enc: Option<&str>,
        auth: Option<&str>,
        aead: Option<&str>,
    ) -> Option<Self> {
        Self::ALL.into_iter().find(|t| {
            let k = t.kernel_algs();
            k.enc == enc && k.auth.map(|a| a.0) == auth && k.aead.map(|a| a.0) == aead
        })
    }
}

impl fmt::Display for EspTransform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The keys of one ESP SA (one direction). `Debug` does not print them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspKeys {
    transform: EspTransform,
    #[serde(with = "hex_bytes")]
    enc: Vec<u8>,
    #[serde(with = "hex_bytes")]
    auth: Vec<u8>,
}

impl EspKeys {
    /// Keys for `transform`, checked against its key lengths.
    pub fn new(transform: EspTransform, enc: &[u8], auth: &[u8]) -> Result<Self, XfrmError> {
        if enc.len() != transform.enc_key_len() {
            return Err(XfrmError::BadKeyLength {
                transform: transform.name(),
                which: "encryption",
                expected: transform.enc_key_len(),
                got: enc.len(),
            });
        }
        if auth.len() != transform.auth_key_len() {
            return Err(XfrmError::BadKeyLength {
                transform: transform.name(),
                which: "integrity",
                expected: transform.auth_key_len(),
                got: auth.len(),
            });
        }
        Ok(Self {
            transform,
            enc: enc.to_vec(),
            auth: auth.to_vec(),
        })
    }

    /// Checks lengths again (after deserialising, where `new` was bypassed).
    pub fn validate(&self) -> Result<(), XfrmError> {
        Self::new(self.transform, &self.enc, &self.auth).map(|_| ())
    }

    /// The transform.
    pub fn transform(&self) -> EspTransform {
        self.transform
    }

    /// The encryption key (AES-GCM: key ‖ salt).
    pub fn enc(&self) -> &[u8] {
        &self.enc
    }

    /// The integrity key.
    pub fn auth(&self) -> &[u8] {
        &self.auth
    }
}

impl fmt::Debug for EspKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EspKeys")
            .field("transform", &self.transform)
            .field("enc", &format_args!("[{} octets]", self.enc.len()))
            .field("auth", &format_args!("[{} octets]", self.auth.len()))
            .finish()
    }
}

/// Keys of both directions of one association.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspKeyPair {
    /// Keys of the SA that carries our traffic to the peer.
    pub outbound: EspKeys,
    /// Keys of the SA that carries the peer's traffic to us.
    pub inbound: EspKeys,
}

impl EspKeyPair {
    /// Draws the ESP keys from KEYMAT in RFC 7402 §7's order: for the SA from the host
    /// with the greater HIT to the one with the lower HIT ("SA-gl") the encryption key
    /// then the integrity key, then the same for "SA-lg". HITs compare as 128-bit
    /// unsigned integers in network byte order (RFC 7401 §6.5).
    ///
    /// `keymat` starts at the first octet reserved for ESP (the index the ESP_INFO
    /// parameter announces, RFC 7402 §5.1.1).
    pub fn from_keymat(
        transform: EspTransform,
        keymat: &[u8],
        local_hit: Ipv6Addr,
        peer_hit: Ipv6Addr,
    ) -> Result<Self, XfrmError> {
        let (el, al) = (transform.enc_key_len(), transform.auth_key_len());
        let need = 2 * (el + al);
        if keymat.len() < need {
            return Err(XfrmError::KeymatTooShort {
                transform: transform.name(),
                need,
                got: keymat.len(),
            });
        }
        if local_hit == peer_hit {
            return Err(XfrmError::InvalidParam(
                "local and peer HIT are equal".into(),
            ));
        }
        let gl = EspKeys::new(transform, &keymat[..el], &keymat[el..el + al])?;
        let o = el + al;
        let lg = EspKeys::new(transform, &keymat[o..o + el], &keymat[o + el..o + el + al])?;
        if u128::from(local_hit) > u128::from(peer_hit) {
            Ok(Self {
                outbound: gl,
                inbound: lg,
            })
        } else {
            Ok(Self {
                outbound: lg,
                inbound: gl,
            })
        }
    }
}

/// Source and destination HIT: the inner addresses of a BEET SA (its selector).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HitPair {
    /// Inner source address.
    pub src: Ipv6Addr,
    /// Inner destination address.
    pub dst: Ipv6Addr,
}

impl HitPair {
    /// The reverse direction.
    pub fn reversed(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
        }
    }
}

/// Source and destination locator: the outer addresses of a BEET SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LocatorPair {
    /// Outer source address.
    pub src: IpAddr,
    /// Outer destination address.
    pub dst: IpAddr,
}

impl LocatorPair {
    /// The reverse direction.
    pub fn reversed(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
        }
    }

    pub(crate) fn check(&self) -> Result<(), XfrmError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(XfrmError::InvalidParam(format!(
                "locators {} and {} are of different address families",
                self.src, self.dst
            )));
        }
        Ok(())
    }
}

/// An ESP Security Parameter Index (host byte order).
pub type Spi = u32;

/// An XFRM request ID: ties policy templates to SAs. hip's are in
/// [`owner::REQID_FIRST`]`..=`[`owner::REQID_LAST`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reqid(pub u32);

impl Reqid {
    /// The `n`th reqid of hip's range (wrapping inside it).
    pub const fn hip(n: u32) -> Self {
        Reqid(owner::REQID_FIRST + n % (owner::REQID_LAST - owner::REQID_FIRST + 1))
    }

    /// True if this reqid is in hip's range.
    pub const fn is_hip(self) -> bool {
        owner::is_owned_reqid(self.0)
    }
}

/// SA lifetimes (from the agent's configuration). Zero means "no limit".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lifetimes {
    /// Seconds after installation at which the kernel reports a soft expiry (rekey now).
    pub soft_secs: u64,
    /// Seconds after installation at which the kernel deletes the SA.
    pub hard_secs: u64,
    /// Octets after which the kernel reports a soft expiry.
    pub soft_bytes: u64,
    /// Octets after which the kernel deletes the SA.
    pub hard_bytes: u64,
}

impl Lifetimes {
    /// No limits: the SA lives until deleted.
    pub const UNLIMITED: Lifetimes = Lifetimes {
        soft_secs: 0,
        hard_secs: 0,
        soft_bytes: 0,
        hard_bytes: 0,
    };

    pub(crate) fn check(&self) -> Result<(), XfrmError> {
        let bad = |s: u64, h: u64| h != 0 && (s == 0 || s >= h);
        if bad(self.soft_secs, self.hard_secs) || bad(self.soft_bytes, self.hard_bytes) {
            return Err(XfrmError::InvalidParam(format!(
                "soft lifetime must be set and below the hard one: {self:?}"
            )));
        }
        Ok(())
    }
}

/// The largest replay window that fits `struct xfrm_replay_state`'s 32-bit bitmap; a
/// larger one travels in `XFRMA_REPLAY_ESN_VAL` (a bitmap of any length, used without
/// extended sequence numbers: the kernel's `XFRM_REPLAY_MODE_BMP`).
pub const LEGACY_REPLAY_WINDOW: u32 = 32;

/// The largest replay window the kernel accepts (`XFRMA_REPLAY_ESN_MAX`, 4096 bits of
/// bitmap; `verify_replay()` in net/xfrm/xfrm_user.c).
pub const MAX_REPLAY_WINDOW: u32 = 4096;

/// RFC 3948 UDP encapsulation of an SA's ESP packets (`UDP_ENCAP_ESPINUDP`, the kernel's
/// `XFRMA_ENCAP`; `ip xfrm state … encap espinudp SPORT DPORT 0.0.0.0`), as RFC 9028 runs
/// HIP and ESP over UDP through NATs.
///
/// The ports are as **the SA** sees them: `sport` is the outer UDP source port and
/// `dport` the outer UDP destination port of this SA's packets. So on an outbound SA
/// `sport` is our port and `dport` the peer's (behind a NAT: its mapped port); on an
/// inbound SA it is the other way round, and the kernel compares each arriving packet's
/// source address and port with the SA's (`locators.src`, `sport`): a difference makes it
/// report [`KernelEvent::Mapping`] (it still accepts the packet). The kernel sends with
/// these ports without any socket; receiving needs a UDP socket bound to our port with
/// the `UDP_ENCAP` socket option set to `UDP_ENCAP_ESPINUDP` (that socket is the HIP
/// driver's, not this crate's). The outer addresses are IPv4 or IPv6 alike; the
/// template's original address (`encap_oa`) is always all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UdpEncap {
    /// Outer UDP source port of this SA's packets.
    pub sport: u16,
    /// Outer UDP destination port of this SA's packets.
    pub dport: u16,
}

impl UdpEncap {
    /// The UDP port of HIP and ESP over UDP (RFC 9028 §4.1, IANA `hip-nat-t`).
    pub const HIP_NAT_PORT: u16 = 10500;

    /// The same ports seen from the SA of the other direction (source and destination
    /// swapped).
    pub const fn reversed(self) -> Self {
        UdpEncap {
            sport: self.dport,
            dport: self.sport,
        }
    }

    pub(crate) fn check(&self) -> Result<(), XfrmError> {
        if self.sport == 0 || self.dport == 0 {
            return Err(XfrmError::InvalidParam(format!(
                "UDP encapsulation port 0 ({self:?})"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for UdpEncap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "espinudp sport {} dport {}", self.sport, self.dport)
    }
}

/// One BEET-mode ESP SA (`ip xfrm state add … proto esp mode beet`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaParams {
    /// Outer addresses.
    pub locators: LocatorPair,
    /// Inner addresses (the SA's selector).
    pub hits: HitPair,
    /// The SPI (chosen by the receiver of this SA's traffic).
    pub spi: Spi,
    /// Request ID shared with the policy template.
    pub reqid: Reqid,
    /// Transform and keys.
    pub keys: EspKeys,
    /// Anti-replay window in packets (0..=[`MAX_REPLAY_WINDOW`]; inbound SAs use it).
    pub replay_window: u32,
    /// Soft and hard lifetimes.
    pub lifetimes: Lifetimes,
    /// UDP encapsulation (RFC 3948/RFC 9028), ports as this SA sees them; `None`: plain
    /// ESP (IP protocol 50).
    #[serde(default)]
    pub encap: Option<UdpEncap>,
}

impl SaParams {
    /// The SA's identity in the kernel.
    pub fn id(&self) -> SaId {
        SaId {
            dst: self.locators.dst,
            spi: self.spi,
        }
    }

    pub(crate) fn check(&self) -> Result<(), XfrmError> {
        self.locators.check()?;
        self.keys.validate()?;
        self.lifetimes.check()?;
        if let Some(e) = &self.encap {
            e.check()?;
        }
        if self.replay_window > MAX_REPLAY_WINDOW {
            return Err(XfrmError::InvalidParam(format!(
                "replay window {} above {MAX_REPLAY_WINDOW}",
                self.replay_window
            )));
        }
        // SPIs 1..=255 are reserved by IANA (RFC 4303 §2.1), 0 means "no SA".
        if self.spi < 256 {
            return Err(XfrmError::InvalidParam(format!(
                "SPI {:#x} is reserved",
                self.spi
            )));
        }
        if !self.reqid.is_hip() {
            return Err(XfrmError::InvalidParam(format!(
                "reqid {:#x} outside hip's range",
                self.reqid.0
            )));
        }
        Ok(())
    }
}

/// The kernel key of an ESP SA: destination address, SPI (protocol is always ESP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SaId {
    /// Outer destination address.
    pub dst: IpAddr,
    /// SPI.
    pub spi: Spi,
}

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SA {} spi {:#010x}", self.dst, self.spi)
    }
}

/// An IPv6 prefix of a policy selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Prefix {
    /// Address.
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub len: u8,
}

impl Prefix {
    /// A /128 for one address.
    pub const fn host(addr: Ipv6Addr) -> Self {
        Prefix { addr, len: 128 }
    }

    /// `::/0`.
    pub const ANY: Prefix = Prefix {
        addr: Ipv6Addr::UNSPECIFIED,
        len: 0,
    };

    /// The ORCHIDv2 prefix HITs live in, 2001:20::/28 (RFC 7343 §6).
    pub const ORCHID_V2: Prefix = Prefix {
        addr: Ipv6Addr::new(0x2001, 0x20, 0, 0, 0, 0, 0, 0),
        len: 28,
    };

    /// True if `a` is inside the prefix.
    pub fn contains(&self, a: Ipv6Addr) -> bool {
        if self.len == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - u32::from(self.len.min(128)));
        u128::from(a) & mask == u128::from(self.addr) & mask
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Policy direction (`dir in|out|fwd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyDir {
    /// Traffic delivered locally.
    In,
    /// Traffic sent by this host.
    Out,
    /// Traffic forwarded by this host.
    Fwd,
}

/// What a policy does with matching packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "action")]
pub enum PolicyAction {
    /// Require BEET-mode ESP through an SA with `reqid` between `locators`.
    Ipsec {
        /// Outer addresses of the template (`tmpl src … dst …`).
        locators: LocatorPair,
        /// The SAs' reqid.
        reqid: Reqid,
    },
    /// Drop (`action block`): the fail-closed rule.
    Block,
    /// Let through without IPsec (`action allow`, no template).
    Allow,
}

/// A policy's kernel key: direction and selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyId {
    /// Direction.
    pub dir: PolicyDir,
    /// Selector source.
    pub src: Prefix,
    /// Selector destination.
    pub dst: Prefix,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = match self.dir {
            PolicyDir::In => "in",
            PolicyDir::Out => "out",
            PolicyDir::Fwd => "fwd",
        };
        write!(f, "policy src {} dst {} dir {d}", self.src, self.dst)
    }
}

/// One XFRM policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyParams {
    /// Direction and selector.
    pub id: PolicyId,
    /// Action and template.
    pub action: PolicyAction,
    /// Priority (lower wins). hip's are in [`owner::PRIORITY_FIRST`]`..=`
    /// [`owner::PRIORITY_LAST`], which is also how its policies are recognised.
    pub priority: u32,
}

impl PolicyParams {
    pub(crate) fn check(&self) -> Result<(), XfrmError> {
        if !owner::is_owned_priority(self.priority) {
            return Err(XfrmError::InvalidParam(format!(
                "policy priority {:#x} outside hip's range",
                self.priority
            )));
        }
        if self.id.src.len > 128 || self.id.dst.len > 128 {
            return Err(XfrmError::InvalidParam("prefix length above 128".into()));
        }
        if let PolicyAction::Ipsec { locators, reqid } = self.action {
            locators.check()?;
            if !reqid.is_hip() {
                return Err(XfrmError::InvalidParam(format!(
                    "reqid {:#x} outside hip's range",
                    reqid.0
                )));
            }
        }
        Ok(())
    }
}

/// An SA as read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaEntry {
    /// Kernel key.
    pub id: SaId,
    /// Outer source address.
    pub src: IpAddr,
    /// Selector (inner addresses); `None` for a larval SA from `ALLOCSPI`.
    pub hits: Option<HitPair>,
    /// Request ID.
    pub reqid: Reqid,
    /// True for BEET mode.
    pub beet: bool,
    /// The transform, if it is one hip knows (`None` for larval SAs).
    pub transform: Option<EspTransform>,
    /// Lifetime configuration.
    pub lifetimes: Lifetimes,
    /// Octets processed so far.
    pub bytes: u64,
    /// Packets processed so far.
    pub packets: u64,
    /// Anti-replay window in packets.
    pub replay_window: u32,
    /// The last ESP sequence number sent with this SA (`oseq`; outbound SAs).
    pub seq_out: u32,
    /// The highest ESP sequence number received (`seq`; inbound SAs).
    pub seq_in: u32,
    /// UDP encapsulation (`XFRMA_ENCAP` of type `UDP_ENCAP_ESPINUDP`), ports as this SA
    /// sees them; `None` for plain ESP — and for an encapsulation of another type, which
    /// [`SaEntry::other_encap_type`] then names.
    #[serde(default)]
    pub encap: Option<UdpEncap>,
    /// The `encap_type` of an `XFRMA_ENCAP` hip never installs
    /// (`UDP_ENCAP_ESPINUDP_NON_IKE` = 1, `TCP_ENCAP_ESPINTCP` = 7, …), so that such an SA
    /// does not pass for plain ESP; `None` for plain ESP and for [`SaEntry::encap`].
    #[serde(default)]
    pub other_encap_type: Option<u16>,
}

/// A policy as read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// The policy.
    #[serde(flatten)]
    pub params: PolicyParams,
    /// Kernel-assigned index.
    pub index: u32,
}

/// What hip owns in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    /// hip's SAs (reqid in hip's range).
    pub sas: Vec<SaEntry>,
    /// hip's policies (priority in hip's range).
    pub policies: Vec<PolicyEntry>,
}

/// A kernel XFRM event (from the `XFRMNLGRP_*` multicast groups).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum KernelEvent {
    /// A packet matched an IPsec policy that has no SA (`XFRM_MSG_ACQUIRE`).
    Acquire {
        /// Inner addresses of the packet's flow.
        hits: HitPair,
        /// Template's outer addresses.
        locators: LocatorPair,
        /// Template's reqid (0 if the kernel sent none).
        reqid: Reqid,
    },
    /// An SA reached its soft (`hard == false`: rekey now) or hard (`hard == true`:
    /// the kernel deletes it) lifetime (`XFRM_MSG_EXPIRE`).
    Expire {
        /// The SA.
        sa: SaId,
        /// Its selector.
        hits: HitPair,
        /// Its reqid.
        reqid: Reqid,
        /// Hard or soft.
        hard: bool,
    },
    /// An SA was deleted (`XFRM_MSG_DELSA`).
    SaDeleted {
        /// The SA.
        sa: SaId,
        /// Its reqid, if the kernel included the SA.
        reqid: Option<Reqid>,
    },
    /// An inbound UDP-encapsulated SA received a packet (one whose ICV verified) from
    /// another outer source address or port than the SA's (`XFRM_MSG_MAPPING`, group
    /// `XFRMNLGRP_MAPPING`): a NAT rebinding, or the peer moved. The kernel accepted the
    /// packet but follows nothing itself: the outbound SA keeps sending to `old` until it
    /// is moved ([`crate::KernelIpsec::move_sa`] with the new locator and encap `dport`),
    /// and the inbound SA reports again until its `sport`/source are updated too. A
    /// replayed packet can be resent from anywhere, so the address is a hint for the HIP
    /// layer to verify (as RFC 8046 verifies a new locator), not a move by itself.
    Mapping {
        /// The inbound SA that received the packet.
        sa: SaId,
        /// Its reqid.
        reqid: Reqid,
        /// The SA's outer source address and encapsulation source port (where the peer's
        /// packets were expected from).
        old: SocketAddr,
        /// Where this packet came from.
        new: SocketAddr,
    },
    /// A policy was deleted (`XFRM_MSG_DELPOLICY`).
    PolicyDeleted {
        /// The policy.
        id: PolicyId,
        /// Its priority, if the kernel included the policy.
        priority: Option<u32>,
    },
}

impl KernelEvent {
    /// True if the event concerns an object hip owns.
    pub fn is_owned(&self) -> bool {
        match self {
            KernelEvent::Acquire { reqid, .. }
            | KernelEvent::Expire { reqid, .. }
            | KernelEvent::Mapping { reqid, .. } => reqid.is_hip(),
            KernelEvent::SaDeleted { reqid, .. } => reqid.is_some_and(Reqid::is_hip),
            KernelEvent::PolicyDeleted { priority, .. } => {
                priority.is_some_and(owner::is_owned_priority)
            }
        }
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keymat(n: usize) -> Vec<u8> {
        (0..n).map(|i| i as u8).collect()
    }

    #[test]
    fn suite_ids_round_trip() {
        for t in EspTransform::ALL {
            assert_eq!(EspTransform::from_suite_id(t.suite_id()), Some(t));
        }
        assert_eq!(EspTransform::from_suite_id(1), None);
        assert_eq!(EspTransform::AesGcm128Icv16.suite_id(), 13);
    }

    #[test]
    fn keymat_order_follows_rfc7402() {
        let t = EspTransform::AesCbc128HmacSha256;
        let km = keymat(2 * t.keymat_len());
        let lo: Ipv6Addr = "2001:20::a".parse().unwrap();
        let hi: Ipv6Addr = "2001:20::b".parse().unwrap();
        // From the greater HIT's side, outbound is SA-gl: the first enc+auth keys.
        let g = EspKeyPair::from_keymat(t, &km, hi, lo).unwrap();
        assert_eq!(g.outbound.enc(), &km[..16]);
        assert_eq!(g.outbound.auth(), &km[16..48]);
        assert_eq!(g.inbound.enc(), &km[48..64]);
        assert_eq!(g.inbound.auth(), &km[64..96]);
        // The lower HIT's side sees the same SAs the other way round.
        let l = EspKeyPair::from_keymat(t, &km, lo, hi).unwrap();
        assert_eq!(l.outbound, g.inbound);
        assert_eq!(l.inbound, g.outbound);
    }

    #[test]
    fn gcm_keys_carry_the_salt() {
        let t = EspTransform::AesGcm128Icv16;
        let km = keymat(40);
        let p = EspKeyPair::from_keymat(
            t,
            &km,
            "2001:20::1".parse().unwrap(),
            "2001:20::2".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(p.inbound.enc(), &km[..20]);
        assert!(p.inbound.auth().is_empty());
    }

    #[test]
    fn short_keymat_and_bad_keys_are_rejected() {
        let t = EspTransform::AesCbc128HmacSha256;
        let e = EspKeyPair::from_keymat(
            t,
            &keymat(95),
            "2001:20::1".parse().unwrap(),
            "2001:20::2".parse().unwrap(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                XfrmError::KeymatTooShort {
                    need: 96,
                    got: 95,
                    ..
                }
            ),
            "{e}"
        );
        let e = EspKeys::new(t, &[0; 15], &[0; 32]).unwrap_err();
        assert!(matches!(
            e,
            XfrmError::BadKeyLength {
                expected: 16,
                got: 15,
                ..
            }
        ));
    }

    #[test]
    fn debug_hides_keys() {
        let k = EspKeys::new(EspTransform::NullHmacSha256, &[], &[0xab; 32]).unwrap();
        assert!(!format!("{k:?}").contains("171"));
        assert!(!format!("{k:?}").contains("ab"));
    }

    #[test]
    fn prefix_contains() {
        assert!(Prefix::ORCHID_V2.contains("2001:2f::1".parse().unwrap()));
        assert!(!Prefix::ORCHID_V2.contains("2001:30::1".parse().unwrap()));
        assert!(Prefix::ANY.contains("::1".parse().unwrap()));
    }

    #[test]
    fn lifetimes_need_soft_below_hard() {
        assert!(
            Lifetimes {
                soft_secs: 5,
                hard_secs: 10,
                ..Lifetimes::UNLIMITED
            }
            .check()
            .is_ok()
        );
        assert!(
            Lifetimes {
                soft_secs: 10,
                hard_secs: 10,
                ..Lifetimes::UNLIMITED
            }
            .check()
            .is_err()
        );
        assert!(
            Lifetimes {
                hard_secs: 10,
                ..Lifetimes::UNLIMITED
            }
            .check()
            .is_err()
        );
    }
}
