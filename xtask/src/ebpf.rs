//! Building the eBPF object and the operator's `build-and-load`.

use std::path::PathBuf;

use anyhow::Result;

use crate::util::{self, cmd, run};

/// Where `build` leaves the object; `hip-datapath/build.rs` embeds it from here.
pub fn object_path() -> PathBuf {
    util::root().join("target/ebpf/bpfel-unknown-none/release/hip-ebpf")
}

/// `cargo +nightly SUBCOMMAND` in `hip-ebpf` for bpfel-unknown-none (its own workspace),
/// with the project's bpf-linker on PATH.
pub fn cargo(subcommand: &str) -> std::process::Command {
    let tools_bin = util::tools_dir().join("bin");
    let path = format!(
        "{}:{}",
        tools_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = cmd("cargo");
    c.current_dir(util::root().join("hip-ebpf"))
        .args([
            "+nightly",
            subcommand,
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(util::root().join("target/ebpf"))
        .env("PATH", path);
    c
}

/// `cargo +nightly build` of `hip-ebpf` for bpfel-unknown-none, linked by the project's
/// bpf-linker.
pub fn build() -> Result<()> {
    eprintln!("== build-ebpf");
    run(&mut cargo("build"))?;
    eprintln!("eBPF object: {}", object_path().display());
    Ok(())
}

/// Builds the agent (embedding the object) in the given profile; returns the binary path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    let mut c = cmd("cargo");
    // hip-datapath's build.rs embeds `object_path()` by default. The test tools (the
    // `hip-rtp` media endpoint) are built alongside, into the same directory.
    c.args(["build", "-p", "hip-agent", "-p", "hip-tests", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(util::root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("hip-agent"))
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Interface to attach the tc programs to.
    #[arg(long)]
    iface: String,
    /// Network namespace the interface lives in (`ip netns` name).
    #[arg(long)]
    netns: Option<String>,
    /// Where to pin the maps (and tcx links).
    #[arg(long, default_value = "/sys/fs/bpf/hip")]
    pin_dir: PathBuf,
    /// Detach the programs and remove the pins instead.
    #[arg(long)]
    unload: bool,
}

pub fn build_and_load(a: &LoadArgs) -> Result<()> {
    util::require_root("build-and-load")?;
    build()?;
    let agent = build_agent(false)?;
    let mut c = cmd(agent.to_str().unwrap());
    if let Some(ns) = &a.netns {
        c.args(["--netns", ns]);
    }
    c.args([
        "datapath",
        if a.unload { "detach" } else { "attach" },
        "--iface",
        &a.iface,
    ]);
    c.arg("--pin-dir").arg(&a.pin_dir);
    run(&mut c)?;
    if !a.unload {
        eprintln!(
            "inspect with: bpftool map show; bpftool map dump pinned {}/HIP_IFACE_STATS",
            a.pin_dir.display()
        );
    }
    Ok(())
}
