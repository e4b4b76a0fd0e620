//! HIPv2 (RFC 7401) as a deterministic, sans-IO library.
//!
//! * [`hit`], [`identity`], [`keyfile`], [`legacy`]: Host Identities and their tags.
//! * [`wire`]: checked packet and parameter views, emit, checksum.
//! * [`crypto`]: DH groups, HIP-KDF, HIP_CIPHER, puzzle, HMAC.
//! * [`esp`]: ESP transform suites and KEYMAT drawing (RFC 7402).
//! * [`endpoint`]: the RFC 7401 §4.4 state machine behind a quinn-proto-style
//!   `Endpoint` (inputs `handle_*`, outputs `poll_*`, time passed in).
//!
//! Nothing here reads a clock, opens a socket or draws from a global RNG (key files in
//! [`keyfile`] are the one exception to "no I/O", and the protocol never calls it).
//!
//! # Encodings where the RFC text leaves room
//!
//! Written down so that interoperability questions have one place to look:
//!
//! * ECDSA Host Identities (RFC 7401 §5.2.9, "octet-string format" of RFC 6090) are SEC1
//!   uncompressed points, 0x04 ‖ x ‖ y, as HIPL and cutehip send them.
//! * ECDH public values (§5.2.7) are `x ‖ y` without a prefix: §5.2.7 defines groups 7
//!   and 8 by reference to RFC 5903, whose §7 specifies that concatenation (HIPL's HIPv2
//!   code and cutehip send it). 0x04 ‖ x ‖ y, what hip sent before, is still accepted;
//!   the two are told apart by their length. Kij is the x coordinate at full field size
//!   (RFC 5903 §7), MODP Kij is padded to the prime's length: never shortened.
//! * HI Length in HOST_ID counts the Host Identity field only, not the Algorithm field.
//! * EdDSA (RFC 9374): the HI is curve ID ‖ RFC 8032 public key; the ORCHID hash is
//!   cSHAKE128 with the HIP context ID as customization over Prefix ‖ OGA ‖ HI, read for 96
//!   bits (RFC 9374 §3.5 gives this construction for DETs with 64 bits); its RHASH for the
//!   puzzle, HMACs and HIP-KDF is SHA-256, since no RFC defines one for suite 5.
//! * RSA signatures are RSASSA-PSS with SHA-256 (§5.2.9: PSS "MUST be used").
//! * ENCRYPTED carries IV ‖ AES-CBC(HOST_ID TLV, zero-padded to the block size); the
//!   receiver parses the TLV and ignores the padding after it.
//! * AES-GCM-16 ESP keys are 20 octets from KEYMAT (128-bit key ‖ 32-bit salt, RFC 4106
//!   §8.1), the form Linux's `rfc4106(gcm(aes))` takes.
//! * Puzzle #I is `HMAC-RHASH(secret, HIT-I | HIT-R | IP-I | IP-R | Opaque)` (RFC 7401
//!   Appendix A's idea, keyed); Opaque names the precomputed R1 (DH group, slot).

pub mod bench;
pub mod crypto;
pub mod endpoint;
pub mod esp;
pub mod hit;
pub mod identity;
pub mod keyfile;
pub mod legacy;
pub mod wire;

pub use hit::{Hit, HitSuite};
pub use identity::{Algorithm, HostId, HostIdentity, IdentityError};
