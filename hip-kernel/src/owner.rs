//! How hip recognises its own XFRM objects.
//!
//! The kernel has no "owner" field, so hip tags what it installs with values no one else
//! is expected to use, and every read-back filters on them:
//!
//! * **SAs** carry a reqid in `0x4849_0000..=0x4849_ffff` (`0x4849` is "HI"). Each
//!   association gets its own reqid; its policy templates carry the same one.
//! * **Policies** carry a priority in `0x4849_0000..=0x4849_ffff`. Block and allow
//!   policies have no template and so no reqid: the priority band is their only tag.
//!   Inside the band, lower values win (the kernel picks the lowest priority value):
//!   IPsec policies ([`PRIORITY_IPSEC`]) beat the fail-closed blocks
//!   ([`PRIORITY_BLOCK_PEER`], [`PRIORITY_GUARD`]). Policies of other software at the
//!   common default priority 0 take precedence over all of hip's.
//!
//! hip never uses XFRM marks: an SA or policy with a mark only matches marked packets,
//! which would change what the kernel does, not just label the object.
//!
//! Reconciliation, upserts and deletions act only on objects inside these ranges; an
//! object outside them is never modified or deleted ([`crate::XfrmError::ForeignConflict`]).

/// First reqid of hip's range.
pub const REQID_FIRST: u32 = 0x4849_0000;
/// Last reqid of hip's range.
pub const REQID_LAST: u32 = 0x4849_ffff;

/// First policy priority of hip's range.
pub const PRIORITY_FIRST: u32 = 0x4849_0000;
/// Last policy priority of hip's range.
pub const PRIORITY_LAST: u32 = 0x4849_ffff;

/// Priority of the HIT-to-HIT IPsec policies of an association (and of the local-HIT
/// allow policies of the guard).
pub const PRIORITY_IPSEC: u32 = 0x4849_1000;
/// Priority of the per-peer fail-closed block policies.
pub const PRIORITY_BLOCK_PEER: u32 = 0x4849_2000;
/// Priority of the prefix-wide guard (block everything to/from 2001:20::/28).
pub const PRIORITY_GUARD: u32 = 0x4849_3000;

/// True if `reqid` is one hip hands out.
pub const fn is_owned_reqid(reqid: u32) -> bool {
    reqid >= REQID_FIRST && reqid <= REQID_LAST
}

/// True if `priority` is in hip's policy band.
pub const fn is_owned_priority(priority: u32) -> bool {
    priority >= PRIORITY_FIRST && priority <= PRIORITY_LAST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(is_owned_reqid(0x4849_0001));
        assert!(!is_owned_reqid(1));
        assert!(!is_owned_reqid(0x484a_0000));
        assert!(is_owned_priority(PRIORITY_GUARD));
        assert!(!is_owned_priority(0));
        const { assert!(PRIORITY_IPSEC < PRIORITY_BLOCK_PEER && PRIORITY_BLOCK_PEER < PRIORITY_GUARD) };
    }
}
