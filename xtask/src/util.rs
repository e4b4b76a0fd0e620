//! Running commands with their command line echoed, and workspace paths.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// Where the project keeps tools it builds itself (bpf-linker): `<root>/.tools`.
pub fn tools_dir() -> PathBuf {
    root().join(".tools")
}

/// A `Command` with the environment `cargo run` gave xtask removed, so that a nested
/// cargo (possibly another toolchain) starts clean.
pub fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        c.env_remove(var);
    }
    c.current_dir(root());
    c
}

/// Prints the command, runs it with inherited stdio, fails on a non-zero exit.
pub fn run(c: &mut Command) -> Result<()> {
    eprintln!("+ {}", show(c));
    let st = c
        .status()
        .with_context(|| format!("spawning {}", show(c)))?;
    if !st.success() {
        bail!("{} failed: {st}", show(c));
    }
    Ok(())
}

/// Runs the command quietly and returns whether it succeeded.
pub fn ok(c: &mut Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the command and returns its stdout (fails on a non-zero exit).
pub fn output(c: &mut Command) -> Result<String> {
    let out = c
        .output()
        .with_context(|| format!("spawning {}", show(c)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}\n{}",
            show(c),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line, for messages.
pub fn show(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Fails unless running as root (the kernel work needs it).
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN): run it as root");
    }
    Ok(())
}
