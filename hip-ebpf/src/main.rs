//! hip's tc programs. They never modify a packet unless a rule says so, and
//! always let it continue (`TC_ACT_PIPE`) otherwise.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use hip_common::{Counters, Direction, IFACE_STATS_ENTRIES};

#[map(name = "HIP_IFACE_STATS")]
static HIP_IFACE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(IFACE_STATS_ENTRIES, 0);

#[classifier]
pub fn hip_tc_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_PIPE
}

#[classifier]
pub fn hip_tc_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress);
    TC_ACT_PIPE
}

#[inline(always)]
fn count(ctx: &TcContext, dir: Direction) {
    // Per-CPU slots: no atomics needed (BPF has no 64-bit fetch_add in `core`); the agent
    // sums the CPUs when it reads the map.
    if let Some(c) = HIP_IFACE_STATS.get_ptr_mut(dir as u32) {
        // SAFETY: the pointer comes from the map and is valid and exclusive to this CPU
        // for the program's run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
