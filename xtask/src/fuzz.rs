//! `cargo xtask fuzz [TARGET…] [--runs N] [--seconds S]`: every fuzz target of `fuzz/`
//! (cargo-fuzz, nightly), one after the other, each until N executions (default
//! 10,000,000) or S seconds (default 3,600), on its committed seeds plus the corpus it
//! grows in `fuzz/corpus/TARGET` (ignored by git). A developer task, not in CI: it takes
//! hours. Installs cargo-fuzz when missing. Prints per target executions, exec/s, corpus
//! size and time, and fails on the first crash (the input is in `fuzz/artifacts/`).
//!
//! Built without a sanitizer (`-s none`): the code is safe Rust (the few `unsafe` blocks
//! are in the agent's I/O, which no target reaches), so AddressSanitizer adds nothing but
//! a slowdown (and a second build of everything); panics and the targets' assertions are
//! what find bugs here.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, cmd};

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Targets to run (default: every one in fuzz/Cargo.toml).
    pub targets: Vec<String>,
    /// Executions per target.
    #[arg(long, default_value_t = 10_000_000)]
    pub runs: u64,
    /// Time limit per target, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub seconds: u64,
}

fn all_targets() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(util::root().join("fuzz/Cargo.toml"))?;
    Ok(text
        .split("[[bin]]")
        .skip(1)
        .filter_map(|b| {
            let l = b.lines().find(|l| l.trim_start().starts_with("name"))?;
            Some(l.split('"').nth(1)?.to_owned())
        })
        .collect())
}

pub fn run(a: &FuzzArgs) -> Result<()> {
    if !util::ok(cmd("cargo").args(["fuzz", "--version"])) {
        util::run(cmd("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz = util::root().join("fuzz");
    let targets = if a.targets.is_empty() {
        all_targets()?
    } else {
        a.targets.clone()
    };
    let mut c = cmd("cargo");
    c.current_dir(&fuzz)
        .args(["+nightly", "fuzz", "build", "-s", "none"]);
    util::run(&mut c)?;
    let mut summary = Vec::new();
    for t in &targets {
        let corpus = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut c = cmd("cargo");
        c.current_dir(&fuzz)
            .args(["+nightly", "fuzz", "run", "-s", "none", t]);
        c.arg(&corpus);
        let seeds = fuzz.join("seeds").join(t);
        if seeds.is_dir() {
            c.arg(&seeds);
        }
        c.args([
            "--",
            &format!("-runs={}", a.runs),
            &format!("-max_total_time={}", a.seconds),
            "-print_final_stats=1",
        ]);
        eprintln!("+ {}", util::show(&c));
        let t0 = Instant::now();
        let mut ch = c
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .context("cargo fuzz run")?;
        let mut execs = String::from("?");
        let mut rate = String::from("?");
        for l in BufReader::new(ch.stderr.take().context("stderr")?)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{l}");
            if let Some(v) = l.strip_prefix("stat::number_of_executed_units:") {
                execs = v.trim().to_owned();
            }
            if let Some(v) = l.strip_prefix("stat::average_exec_per_sec:") {
                rate = v.trim().to_owned();
            }
        }
        let st = ch.wait()?;
        let files = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
        let line = format!(
            "{t}: {execs} executions, {rate} exec/s, corpus {files} inputs, {:.0} s",
            t0.elapsed().as_secs_f64()
        );
        println!("{line}");
        summary.push(line);
        if !st.success() {
            bail!("{t} failed ({st}): see fuzz/artifacts/{t}/");
        }
    }
    println!("\n== fuzz summary");
    for l in &summary {
        println!("{l}");
    }
    Ok(())
}
