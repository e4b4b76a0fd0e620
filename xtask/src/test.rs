//! `cargo xtask test`: every test of the project, in stages, with one closing summary.
//!
//! 1. lint: rustfmt, clippy (warnings are errors), rustdoc;
//! 2. unit: `cargo test` of the workspace (pure code, no privileges);
//! 3. host: the privileged integration tests `tests/tests/host_*.rs` (root, network
//!    namespaces, the real eBPF loader, SIPp, Kamailio, tshark);
//! 4. vm: the tests `tests/tests/vm_*.rs`, all in one boot of a VM whose kernel has ESP.
//!
//! Counts come from libtest's own `test result:` lines. A stage that fails without
//! such a line (a crash, a build error, a VM that did not boot) counts as one failure:
//! nothing is skipped silently.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{ebpf, util, vm};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip the VM stage (for quick local iterations; reported as skipped, and the run fails).
    #[arg(long)]
    no_vm: bool,
    /// Skip the privileged host stage (same caveat).
    #[arg(long)]
    no_host: bool,
    /// Skip lint (same caveat).
    #[arg(long)]
    no_lint: bool,
}

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    stages: Vec<(String, bool, Duration, String)>,
}

impl Tally {
    /// Parses a libtest summary line:
    /// `test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; …`
    fn parse(line: &str) -> Option<(u64, u64, u64)> {
        let rest = line.trim().strip_prefix("test result: ")?;
        let num = |key: &str| -> Option<u64> {
            rest.split(';')
                .find_map(|part| part.trim().strip_suffix(key).map(str::trim))
                .and_then(|n| n.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
        };
        Some((num(" passed")?, num(" failed")?, num(" ignored")?))
    }
}

/// Runs `c`, streaming its stdout, and adds its libtest counts to the tally.
fn stage(t: &mut Tally, name: &str, c: &mut Command) -> Result<()> {
    eprintln!("\n== test stage: {name}");
    eprintln!("+ {}", util::show(c));
    let start = Instant::now();
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawning {}", util::show(c)))?;
    let (mut p, mut f, mut i) = (0, 0, 0);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        println!("{line}");
        if let Some((a, b, c)) = Tally::parse(&line) {
            p += a;
            f += b;
            i += c;
        }
    }
    let st = child.wait()?;
    finish_stage(t, name, st.success(), start, p, f, i);
    Ok(())
}

fn finish_stage(
    t: &mut Tally,
    name: &str,
    success: bool,
    start: Instant,
    p: u64,
    mut f: u64,
    i: u64,
) {
    if !success && f == 0 {
        f = 1;
        eprintln!(
            "!! stage {name} failed without a failing test to show for it (build error, crash, or no VM)"
        );
    }
    t.passed += p;
    t.failed += f;
    t.ignored += i;
    let ok = success && f == 0;
    t.stages.push((
        name.to_owned(),
        ok,
        start.elapsed(),
        format!(
            "{p} passed, {f} failed{}",
            if i > 0 {
                format!(", {i} ignored")
            } else {
                String::new()
            }
        ),
    ));
}

/// One pass/fail check that is not a libtest binary (rustfmt, clippy, rustdoc).
fn check(t: &mut Tally, name: &str, c: &mut Command) {
    eprintln!("\n== check: {name}\n+ {}", util::show(c));
    let start = Instant::now();
    let ok = c.status().is_ok_and(|s| s.success());
    finish_stage(t, name, ok, start, u64::from(ok), u64::from(!ok), 0);
}

/// Test files `tests/tests/<prefix>*.rs`, as `--test NAME` targets.
fn test_targets(prefix: &str) -> Result<Vec<String>> {
    let dir = util::root().join("tests/tests");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let stem = n.strip_suffix(".rs")?;
            stem.starts_with(prefix).then(|| stem.to_owned())
        })
        .collect();
    v.sort();
    Ok(v)
}

pub fn run(a: &TestArgs) -> Result<()> {
    let total = Instant::now();
    let mut t = Tally::default();
    let step = Instant::now();
    crate::setup::run()?;
    t.stages
        .push(("setup".into(), true, step.elapsed(), "provisioned".into()));
    let step = Instant::now();
    ebpf::build()?;
    t.stages.push((
        "ebpf".into(),
        true,
        step.elapsed(),
        "eBPF object built".into(),
    ));

    if a.no_lint {
        t.stages.push((
            "lint".into(),
            false,
            Duration::ZERO,
            "SKIPPED by --no-lint".into(),
        ));
    } else {
        check(
            &mut t,
            "rustfmt",
            util::cmd("cargo").args(["fmt", "--all", "--check"]),
        );
        check(
            &mut t,
            "clippy",
            util::cmd("cargo").args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        );
        // The eBPF crate is its own workspace (nightly, bpfel): linted on its own.
        check(
            &mut t,
            "rustfmt-ebpf",
            util::cmd("cargo")
                .current_dir(util::root().join("hip-ebpf"))
                .args(["+nightly", "fmt", "--check"]),
        );
        check(
            &mut t,
            "clippy-ebpf",
            ebpf::cargo("clippy").args(["--", "-D", "warnings"]),
        );
        check(
            &mut t,
            "rustdoc",
            util::cmd("cargo")
                .args(["doc", "--workspace", "--no-deps"])
                .env("RUSTDOCFLAGS", "-D warnings"),
        );
    }

    stage(
        &mut t,
        "unit",
        util::cmd("cargo").args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "hip-tests",
        ]),
    )?;

    let step = Instant::now();
    let agent = ebpf::build_agent(false)?;
    t.stages.push((
        "agent".into(),
        true,
        step.elapsed(),
        "hip-agent built".into(),
    ));

    if a.no_host {
        t.stages.push((
            "host".into(),
            false,
            Duration::ZERO,
            "SKIPPED by --no-host".into(),
        ));
    } else {
        util::require_root("the privileged host tests")?;
        let targets = test_targets("host_")?;
        let mut c = util::cmd("cargo");
        c.args(["test", "--no-fail-fast", "-p", "hip-tests"]);
        for tg in &targets {
            c.args(["--test", tg]);
        }
        c.args(["--", "--test-threads=1"])
            .env("HIP_AGENT_BIN", &agent);
        stage(&mut t, "host", &mut c)?;
    }

    if a.no_vm {
        t.stages.push((
            "vm".into(),
            false,
            Duration::ZERO,
            "SKIPPED by --no-vm".into(),
        ));
    } else {
        vm_stage(&mut t, &agent)?;
    }

    eprintln!("\n== summary ({:.0?} in all)", total.elapsed());
    for (name, ok, d, what) in &t.stages {
        eprintln!(
            "  {:<8} {:<5} {:>6.1?}  {what}",
            name,
            if *ok { "ok" } else { "FAIL" },
            d
        );
    }
    let skipped = t.stages.iter().any(|s| s.3.starts_with("SKIPPED"));
    println!(
        "{} passed, {} failed{}",
        t.passed,
        t.failed,
        if t.ignored > 0 {
            format!(", {} ignored (not allowed)", t.ignored)
        } else {
            String::new()
        }
    );
    if t.failed > 0 || t.ignored > 0 || skipped {
        bail!(
            "test run failed{}",
            if skipped {
                " (stages were skipped by flag)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Builds the VM test binaries on the host, then runs them all in one VM boot.
fn vm_stage(t: &mut Tally, agent: &std::path::Path) -> Result<()> {
    let targets = test_targets("vm_")?;
    let start = Instant::now();
    eprintln!(
        "\n== test stage: vm ({} test files in one boot)",
        targets.len()
    );
    let mut c = util::cmd("cargo");
    c.args([
        "test",
        "-p",
        "hip-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for tg in &targets {
        c.args(["--test", tg]);
    }
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .context("building the VM tests")?;
    if !out.status.success() {
        finish_stage(t, "vm", false, start, 0, 0, 0);
        return Ok(());
    }
    let mut exes: Vec<(String, PathBuf)> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|x| x == "test"));
        if v["reason"] == "compiler-artifact"
            && is_test
            && let (Some(name), Some(exe)) =
                (v["target"]["name"].as_str(), v["executable"].as_str())
        {
            exes.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if exes.len() != targets.len() {
        bail!(
            "expected {} VM test binaries, cargo built {}",
            targets.len(),
            exes.len()
        );
    }
    // The guest sees the host's filesystem (read-only 9p root, writable /tmp overlay):
    // the binaries run in place.
    let mut script = String::from("export RUST_BACKTRACE=1; ");
    script.push_str(&format!(
        "export HIP_AGENT_BIN={}; ",
        vm::shell_quote(&agent.to_string_lossy())
    ));
    for (name, exe) in &exes {
        script.push_str(&format!(
            "echo '== vm test file {name}'; {} --test-threads=1; echo \"== vm exit {name} $?\"; ",
            vm::shell_quote(&exe.to_string_lossy())
        ));
    }
    let (mut p, mut f, mut i) = (0, 0, 0);
    let mut exits = 0;
    let res = vm::run_script(&script, "2G", Duration::from_secs(40 * 60), |line| {
        println!("{line}");
        if let Some((a, b, c)) = Tally::parse(line) {
            p += a;
            f += b;
            i += c;
        }
        if let Some(rest) = line.strip_prefix("== vm exit ") {
            exits += 1;
            if !rest.ends_with(" 0") && f == 0 {
                // A binary that crashed before printing its summary.
                f += 1;
            }
        }
    });
    let ok = match res {
        Ok(st) => st.success() && exits == exes.len(),
        Err(e) => {
            eprintln!("!! vm: {e:#}");
            false
        }
    };
    finish_stage(t, "vm", ok && f == 0, start, p, f, i);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn parses_libtest_summaries() {
        assert_eq!(
            Tally::parse(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some((12, 0, 1))
        );
        assert_eq!(
            Tally::parse(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((3, 2, 0))
        );
        assert_eq!(Tally::parse("running 3 tests"), None);
    }
}
