//! `cargo xtask soak [--minutes N]`: legitimate calls between two agents in namespaces
//! while the floods and barrages of the reliability tests run in turn (`hip-soak`, in the
//! tests crate); RSS, descriptors, calls and association records sampled and checked
//! for bounds, every legitimate call checked to complete at the level it earned.
//! Default 30 minutes; never part of `cargo xtask test` or CI. The figures are printed
//! and written to `target/bench/soak.txt`.

use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
};

use anyhow::{Context, Result, bail};

use crate::util;

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the calls and attacks run.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
}

pub fn run(a: &SoakArgs) -> Result<()> {
    util::require_root("the soak (network namespaces, raw sockets)")?;
    // HIP over raw sockets with the kernel offload off: no eBPF object is needed.
    util::run(util::cmd("cargo").args([
        "build",
        "--release",
        "-p",
        "hip-agent",
        "--bin",
        "hip-agent",
        "-p",
        "hip-tests",
        "--bin",
        "hip-soak",
    ]))?;
    let root = util::root();
    let rel = root.join("target/release");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("soak.txt");
    let mut file = std::fs::File::create(&path).context("soak report")?;
    let mut c = util::cmd(rel.join("hip-soak").to_str().context("path")?);
    c.args(["--minutes", &a.minutes.to_string()])
        .env("HIP_AGENT_BIN", rel.join("hip-agent"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("+ {}", util::show(&c));
    let mut ch = c.spawn().context("starting hip-soak")?;
    for l in BufReader::new(ch.stdout.take().context("stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        println!("{l}");
        let _ = writeln!(file, "{l}");
    }
    let st = ch.wait()?;
    println!("report written to {}", path.display());
    if !st.success() {
        bail!("the soak failed ({st})");
    }
    Ok(())
}
