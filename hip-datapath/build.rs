//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built with the nightly toolchain for `bpfel-unknown-none`, which a plain
//! `cargo build` on stable cannot do. So this script only *embeds* it: from `$HIP_EBPF_OBJECT`
//! if set, else from the path `cargo xtask build-ebpf` writes. When neither exists the crate
//! still builds (so `cargo build`/`cargo doc` work on stable) and the loader reports
//! [`DatapathError::ObjectMissing`] at run time.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hip_ebpf_missing)");
    println!("cargo::rerun-if-env-changed=HIP_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../target/ebpf/bpfel-unknown-none/release/hip-ebpf");
    let src = env::var_os("HIP_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo::rerun-if-changed={}", src.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("hip-ebpf.o");
    match fs::read(&src) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded eBPF object"),
        Err(_) => {
            fs::write(&out, b"").expect("write empty eBPF placeholder");
            println!("cargo::rustc-cfg=hip_ebpf_missing");
            println!(
                "cargo::warning=eBPF object {} not found: run `cargo xtask build-ebpf` (the agent will refuse to load its datapath)",
                src.display()
            );
        }
    }
}
