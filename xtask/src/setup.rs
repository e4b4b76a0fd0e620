//! `cargo xtask setup`: idempotent provisioning of a fresh Debian 12 machine.
//!
//! Each step says what it checks, and is skipped when already done. What the steps
//! install, and why, is recorded in the repository's README ("Prerequisites").

use std::{fs, os::unix::fs::symlink, path::Path};

use anyhow::{Context, Result, bail};

use crate::util::{self, cmd, ok, output};

/// Debian packages the tests, the demo and the benchmarks use.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "the VM that has a kernel with ESP"),
    ("busybox-static", "virtme-ng's guest init"),
    (
        "linux-image-amd64",
        "the generic Debian kernel booted in the VM",
    ),
    ("iproute2", "ip netns, ip xfrm"),
    ("tshark", "independent HIP dissector and captures"),
    ("tcpdump", "captures on veths"),
    (
        "nftables",
        "nft: the masquerading NATs of the NAT traversal tests (issue 13)",
    ),
    ("sip-tester", "SIPp, the SIP test peer"),
    (
        "baresip-core",
        "an unmodified softphone behind the edge (issue 15)",
    ),
    (
        "linphone-cli",
        "linphonec, the second unmodified softphone behind the edge (issue 15)",
    ),
    ("kamailio", "the SIP proxies of the trapezoid"),
    ("bpftool", "inspecting eBPF maps and programs"),
    ("strongswan", "reference IKE daemon programming XFRM"),
    ("python3-pip", "installing virtme-ng"),
    ("openssl", "test certificates for SIPS (TLS)"),
    (
        "bind9",
        "named: the authoritative server of the HIP RR tests and bench (RFC 8005)",
    ),
    (
        "bind9-utils",
        "named-compilezone, tsig-keygen, dnssec tools: a zone for the DNS tests",
    ),
    (
        "dnsutils",
        "nsupdate and dig: the one-process-per-record baseline of the DNS bench",
    ),
    (
        "python3-dnspython",
        "independent oracle for the HIP RR wire format",
    ),
    (
        "knot",
        "knotd: a DNS server without the HIP type (generic TYPE55 form) in the DNS tests",
    ),
];

/// virtme-ng (PyPI), verified here.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// bpf-linker release that links against LLVM 22 (the nightly toolchain's).
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    eprintln!("== setup (each step is skipped when already done)");
    apt()?;
    virtme_ng()?;
    nightly_components()?;
    bpf_linker()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(cmd("dpkg-query").args(["-W", "-f", "${Status}", pkg]))
        .is_ok_and(|s| s.trim() == "install ok installed")
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: apt packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    util::require_root("installing apt packages")?;
    eprintln!("setup: apt packages: installing {}", missing.join(" "));
    util::run(
        cmd("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    util::run(
        cmd("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    for p in &missing {
        if !installed(p) {
            bail!("apt package {p} is still not installed after apt-get install");
        }
    }
    Ok(())
}

/// `vng` on PATH, or where pip puts scripts.
pub fn vng_path() -> Option<String> {
    if ok(cmd("vng").arg("--version")) {
        return Some("vng".into());
    }
    let user_base = output(cmd("python3").args(["-m", "site", "--user-base"])).ok()?;
    [
        format!("{}/bin/vng", user_base.trim()),
        "/usr/local/bin/vng".to_owned(),
    ]
    .into_iter()
    .find(|cand| Path::new(cand).exists())
}

fn virtme_ng() -> Result<()> {
    if let Some(v) = vng_path() {
        eprintln!("setup: virtme-ng: present ({v})");
        return Ok(());
    }
    eprintln!("setup: virtme-ng: installing {VIRTME_NG} from PyPI");
    // Debian 12's system Python refuses plain `pip install` (PEP 668); the flag is
    // harmless for a pyenv or venv Python.
    let mut c = cmd("python3");
    c.args(["-m", "pip", "install", "-q", VIRTME_NG]);
    if ok(cmd("python3").args(["-m", "pip", "install", "--help"]))
        && output(cmd("python3").args(["-m", "pip", "install", "--help"]))
            .is_ok_and(|h| h.contains("--break-system-packages"))
    {
        c.arg("--break-system-packages");
    }
    util::run(&mut c)?;
    // pyenv keeps shims that must be refreshed to see new scripts.
    let _ = ok(cmd("pyenv").arg("rehash"));
    vng_path().context("virtme-ng installed but `vng` is not on PATH")?;
    Ok(())
}

/// The nightly components the eBPF crate needs: rust-src (`-Z build-std=core`), and
/// rustfmt and clippy for its lint checks in `cargo xtask test`.
fn nightly_components() -> Result<()> {
    let have =
        output(cmd("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
            .context(
                "the nightly toolchain is needed for the eBPF build (`rustup toolchain list`)",
            )?;
    for component in ["rust-src", "rustfmt", "clippy"] {
        if have.lines().any(|l| l.starts_with(component)) {
            eprintln!("setup: {component} for nightly: present");
            continue;
        }
        eprintln!("setup: {component} for nightly: installing");
        util::run(cmd("rustup").args(["component", "add", component, "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// Path of the project's bpf-linker.
pub fn bpf_linker() -> Result<()> {
    let bin = util::tools_dir().join("bin/bpf-linker");
    if output(cmd(bin.to_str().unwrap()).arg("--version"))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        eprintln!(
            "setup: bpf-linker {BPF_LINKER_VERSION}: present ({})",
            bin.display()
        );
        return Ok(());
    }
    eprintln!(
        "setup: bpf-linker {BPF_LINKER_VERSION}: building against the nightly toolchain's LLVM into {}",
        util::tools_dir().display()
    );
    // No prebuilt bpf-linker and no LLVM 22 package exist here; the nightly toolchain's
    // own libLLVM is exactly the LLVM that emits the bitcode bpf-linker must read.
    let sysroot = output(cmd("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm_so = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.ends_with("-nightly"))
        })
        .with_context(|| format!("no libLLVM.so.*-nightly in {}", lib.display()))?;
    let prefix = util::tools_dir();
    let plib = prefix.join("lib");
    fs::create_dir_all(&plib)?;
    for name in [
        "libLLVM.so".to_owned(),
        llvm_so.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = plib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm_so, &link).with_context(|| format!("symlink {}", link.display()))?;
    }
    util::run(
        cmd("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(&prefix)
            .env("LLVM_PREFIX", &prefix),
    )
}
