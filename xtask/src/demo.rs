//! `cargo xtask demo`: the main job — a SIP call secured with HIP whose media never
//! leaves the kernel, shown end to end (`tests/src/bin/hip-demo.rs` runs the scenario and
//! prints its timeline and summary).
//!
//! The scenario needs a kernel with ESP. When the host kernel has none (the development
//! machines here), the demo says so and runs itself inside the VM harness.

use std::{process::Command, time::Duration};

use anyhow::{Result, bail};

use crate::{ebpf, util, vm};

/// Whether this kernel can hold an ESP SA: adds one in a throw-away namespace.
/// (`ip xfrm state add … proto esp` fails with "Requested type not found" without ESP.)
fn host_has_esp() -> bool {
    let ns = format!("hipdemo-probe-{}", std::process::id());
    if !util::ok(Command::new("ip").args(["netns", "add", &ns])) {
        return false;
    }
    let (auth, enc) = (
        format!("0x{}", "00".repeat(32)),
        format!("0x{}", "00".repeat(16)),
    );
    let ok = util::ok(Command::new("ip").args([
        "-n",
        &ns,
        "xfrm",
        "state",
        "add",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "spi",
        "0x1000",
        "mode",
        "beet",
        "sel",
        "src",
        "2001:20::1",
        "dst",
        "2001:20::2",
        "auth-trunc",
        "hmac(sha256)",
        &auth,
        "128",
        "enc",
        "cbc(aes)",
        &enc,
    ]));
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    ok
}

pub fn run() -> Result<()> {
    util::require_root("the demo")?;
    ebpf::build()?;
    let agent = ebpf::build_agent(false)?;
    let demo = agent.with_file_name("hip-demo");
    if host_has_esp() {
        eprintln!("== demo: this kernel has ESP; running on the host");
        let st = util::cmd(demo.to_str().unwrap())
            .env("HIP_AGENT_BIN", &agent)
            .status()?;
        if !st.success() {
            bail!("the demo failed ({st})");
        }
        return Ok(());
    }
    println!(
        "== demo: this host's kernel has no ESP (XFRM refuses ESP SAs), so the demo runs inside a VM\n   \
         (virtme-ng on the Debian kernel {}, software emulation: it takes a few minutes)",
        vm::kernel()?.display()
    );
    let script = format!(
        "HIP_AGENT_BIN={} {}",
        vm::shell_quote(&agent.to_string_lossy()),
        vm::shell_quote(&demo.to_string_lossy())
    );
    let st = vm::run_script(&script, "2G", Duration::from_secs(20 * 60), |l| {
        // The guest's console prints only the demo's output.
        println!("{l}")
    })?;
    if !st.success() {
        bail!("the demo failed in the VM ({st})");
    }
    Ok(())
}
