//! Host Identities in SIP/SDP (draft-tschofenig-hiprg-host-identities §3) and a sans-IO SIP
//! user agent core.
//!
//! * [`sdp`]: a lossless line-level SDP layer and the `k=`/`a=key-mgmt:` Host Identity lines.
//! * [`identity`]: SIP Identity (RFC 8224) with a PASSporT (RFC 8225) that binds the SDP's
//!   HITs (the draft's §4), signing and verification.
//! * [`sip`]: the SIP user agent (RFC 3261): transactions with the §17 timers, dialogs,
//!   digest authentication, registration. Pure state machine: time and received bytes go in,
//!   bytes to send, timer deadlines and events come out. Sockets live in the agent.

pub mod identity;
pub mod sdp;
pub mod sip;
