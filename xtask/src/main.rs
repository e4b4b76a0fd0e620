//! Project tasks for hip: `cargo xtask <task>`.
//!
//! Every task that needs tools calls [`setup::run`] first, so a newcomer on a fresh
//! Debian 12 machine never provisions anything by hand.

mod bench;
mod demo;
mod ebpf;
mod fuzz;
mod interop;
mod setup;
mod soak;
mod test;
mod util;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "hip project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the project needs (apt/PyPI packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none) into target/ebpf.
    BuildEbpf,
    /// Build, load and attach the eBPF programs to IFACE; pin the maps under bpffs.
    BuildAndLoad(ebpf::LoadArgs),
    /// Run a command as root in a virtme-ng VM on a Debian kernel that has ESP.
    Vm(vm::VmArgs),
    /// Run every test: unit, privileged host tests, VM tests; prints `N passed, N failed`.
    Test(test::TestArgs),
    /// The main job: show hip working end to end.
    Demo,
    /// Run the benchmarks and print ratios against their baselines.
    Bench,
    /// Developer tool, not in CI: live base exchanges against a local cutehip checkout
    /// (every HI × DH group, both directions, unpatched and with cutehip-fixes.patch).
    Interop(interop::InteropArgs),
    /// Developer tool, not in CI: every fuzz target to 10 M executions (cargo-fuzz, nightly).
    Fuzz(fuzz::FuzzArgs),
    /// Not in CI: legitimate calls under rotating floods for N minutes (default 30), with
    /// RSS, descriptors, calls and records checked for bounds.
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => setup::run().and_then(|()| ebpf::build()),
        Task::BuildAndLoad(a) => setup::run().and_then(|()| ebpf::build_and_load(&a)),
        Task::Vm(a) => setup::run().and_then(|()| vm::run(&a)),
        Task::Test(a) => test::run(&a),
        Task::Demo => setup::run().and_then(|()| demo::run()),
        Task::Bench => setup::run().and_then(|()| bench::run()),
        Task::Interop(a) => interop::run(&a),
        Task::Fuzz(a) => fuzz::run(&a),
        Task::Soak(a) => setup::run().and_then(|()| soak::run(&a)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
