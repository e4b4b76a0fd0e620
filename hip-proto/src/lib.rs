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
