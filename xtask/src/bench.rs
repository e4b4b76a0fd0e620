//! `cargo xtask bench` (benchmarks are added per subsystem).
use anyhow::Result;
pub fn run() -> Result<()> {
    anyhow::bail!("bench not written yet")
}
