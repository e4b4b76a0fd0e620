//! Types shared by the eBPF programs in `hip-ebpf` and the agent.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, and has no padding that the
//! kernel could leave uninitialised: the eBPF side and the userspace side read
//! the same bytes. With the `user` feature the types implement `aya::Pod` so the
//! agent can use them in typed aya maps.
#![no_std]

/// Name of the per-interface traffic counter map (a `PERCPU_ARRAY` indexed by [`Direction`]).
pub const MAP_IFACE_STATS: &str = "HIP_IFACE_STATS";

/// Names of the tc programs in the object file.
pub const PROG_TC_INGRESS: &str = "hip_tc_ingress";
pub const PROG_TC_EGRESS: &str = "hip_tc_egress";

/// Directory under bpffs where the agent pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/hip";

/// Index into [`MAP_IFACE_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// Number of entries of [`MAP_IFACE_STATS`].
pub const IFACE_STATS_ENTRIES: u32 = 2;

/// Packets and bytes seen by one tc program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `#[repr(C)]`, only `u64` fields, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::Counters {}
}
