//! Host Identities in DNS (RFC 8005).
//!
//! - [`rdata`]: the HIP RR's RDATA, the one piece of DNS wire format written by hand
//!   (hickory has no HIP type); sans-IO.
//! - [`client`]: the I/O edge — RFC 2136 updates signed with TSIG, lookups validated with
//!   DNSSEC against a configured trust anchor, each within a deadline.

pub mod client;
pub mod rdata;

pub use client::{DnsError, HipAnswer, Lookup, Resolver, TsigKey, UpdateTarget, Validation};
pub use hickory_proto::rr::Name;
pub use rdata::{HIP_RR_TYPE, HipRdata, PkAlgorithm, RdataError};
