//! Embeds the eBPF object built by `cargo xtask build-ebpf`, and refuses a stale one.
//!
//! The object is built with the nightly toolchain for `bpfel-unknown-none`, which a plain
//! `cargo build` on stable cannot do. So this script only *embeds* it: from `$HIP_EBPF_OBJECT`
//! if set, else from the path `cargo xtask build-ebpf` writes. When neither exists the crate
//! still builds (so `cargo build`/`cargo doc` work on stable) and the loader reports
//! [`DatapathError::ObjectMissing`] at run time. When the object is older than any file of
//! `hip-ebpf` or `hip-common` (see `stale.rs`), it is not embedded: the build warns and the
//! loader reports [`DatapathError::ObjectStale`], so an agent never ships an old datapath.
use std::{env, fs, path::PathBuf};

#[path = "stale.rs"]
mod stale;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hip_ebpf_missing)");
    println!("cargo::rustc-check-cfg=cfg(hip_ebpf_stale)");
    println!("cargo::rerun-if-env-changed=HIP_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/hip-ebpf");
    let src = env::var_os("HIP_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo::rerun-if-changed={}", src.display());
    let roots = stale::source_roots(&manifest);
    for r in &roots {
        println!("cargo::rerun-if-changed={}", r.display());
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("hip-ebpf.o");
    let placeholder = || fs::write(&out, b"").expect("write empty eBPF placeholder");
    let mut stale_by = String::new();
    match fs::read(&src) {
        Ok(bytes) => match stale::newer_source(&src, &roots) {
            None => fs::write(&out, bytes).expect("write embedded eBPF object"),
            Some(newer) => {
                placeholder();
                stale_by = newer.display().to_string();
                println!("cargo::rustc-cfg=hip_ebpf_stale");
                println!(
                    "cargo::warning=eBPF object {} is older than {stale_by}: not embedded; run `cargo xtask build-ebpf` (the agent will refuse to load its datapath)",
                    src.display()
                );
            }
        },
        Err(_) => {
            placeholder();
            println!("cargo::rustc-cfg=hip_ebpf_missing");
            println!(
                "cargo::warning=eBPF object {} not found: run `cargo xtask build-ebpf` (the agent will refuse to load its datapath)",
                src.display()
            );
        }
    }
    println!("cargo::rustc-env=HIP_EBPF_STALE_BY={stale_by}");
}
