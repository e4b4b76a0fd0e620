//! `cargo xtask bench`: every benchmark of the project, each against a baseline measured
//! side by side in the same process or script (these machines are noisy: ratios, not
//! absolute times, are what to compare).
//!
//! | bench | what | baseline |
//! | --- | --- | --- |
//! | `hip-proto-bench` | base exchange between two in-process peers; R1s/s from the pool | the exchange's crypto alone; signing every R1 |
//! | `hip-datapath-bench` | eBPF ns/packet (kernel accounting), veth UDP rate | empty program; programs detached |
//! | `xfrm_bench` (host, policies) and (VM, SAs + policies) | installing N associations | one `ip xfrm` per object |
//! | `tests/sipp/bench.sh` | calls/s with the agent as UAS | SIPp's own UAS |
//! | `tests/sipp/edge_bench.sh` | calls/s through the edge proxy, HIP off and on | Kamailio relaying the same flow |
//! | `hip-i1-flood-bench` | a legitimate base exchange between two agents while 10,000 spoofed I1/s forge the caller's address | the same exchange without the flood |
//! | `hip-dns-bench` | publish + look up 10,000 HIP RRs on BIND (batched TSIG updates, concurrent lookups) | one `nsupdate` / `dig` process per record |
//! | `hip-call-bench` (VM) | INVITE → media over the SAs, split SIP / HIP / kernel | each part's floor |
//! | `hip-answer-bench` (VM) | phones through two edges: callee's 200 OK → first RTP at the caller, HIP at the answer and early (while ringing) | the same edges with HIP off |
//! | `hip-capacity-bench` (VM) | 10, 100, 1,000 calls held by one agent, each from a peer of its own: set-up rate, memory, kernel objects, idle CPU, `status`/`xfrm`/`flows`/scrape latency, teardown | the exchange's crypto floor; the same calls with HIP off; the same commands at 0 calls |
//! | `hip-handover-bench` (VM) | media gap and loss each way when a host changes address mid-call (HIP UPDATE moves it) | — (the re-INVITE comparison is not built yet) |
//! | `hip-media-bench` (VM) | UDP between HITs through each ESP transform; agents' CPU; eBPF run time | plaintext between the same hosts; the agents idle |
//!
//! Everything is printed and also written to `target/bench/report.txt`.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{ebpf, util, vm};

struct Report {
    file: std::fs::File,
    failed: Vec<String>,
}

impl Report {
    fn line(&mut self, l: &str) {
        println!("{l}");
        let _ = writeln!(self.file, "{l}");
    }

    /// Runs a bench command, streaming and recording its stdout.
    fn run(&mut self, name: &str, c: &mut Command) {
        self.line(&format!("\n== bench: {name}"));
        eprintln!("+ {}", util::show(c));
        let child = c.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn();
        let ok = match child {
            Ok(mut ch) => {
                for l in BufReader::new(ch.stdout.take().unwrap())
                    .lines()
                    .map_while(Result::ok)
                {
                    self.line(&l);
                }
                ch.wait().is_ok_and(|s| s.success())
            }
            Err(e) => {
                self.line(&format!("could not start: {e}"));
                false
            }
        };
        if !ok {
            self.line(&format!("!! {name} failed"));
            self.failed.push(name.to_owned());
        }
    }
}

pub fn run() -> Result<()> {
    util::require_root("the benchmarks (namespaces, XFRM, eBPF)")?;
    ebpf::build()?;
    let root = util::root();
    util::run(util::cmd("cargo").args([
        "build",
        "--release",
        "-p",
        "hip-agent",
        "-p",
        "hip-tests",
        "--bins",
        "-p",
        "hip-proto",
        "--bin",
        "hip-proto-bench",
        "-p",
        "hip-datapath",
        "--bin",
        "hip-datapath-bench",
    ]))?;
    util::run(util::cmd("cargo").args([
        "build",
        "--release",
        "-p",
        "hip-kernel",
        "--example",
        "xfrm_bench",
    ]))?;
    let rel = root.join("target/release");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let mut r = Report {
        file: std::fs::File::create(dir.join("report.txt")).context("report file")?,
        failed: Vec::new(),
    };
    r.line("hip benchmarks (ratios against baselines measured in the same run)");

    r.run(
        "HIP base exchange vs its crypto floor; R1 pool vs signing each R1 (goal: ratio <= 1.3)",
        &mut util::cmd(rel.join("hip-proto-bench").to_str().unwrap()),
    );
    r.run(
        "eBPF programs: ns/packet over the empty-program floor, UDP rate attached/detached (goals: < 100 ns, >= 0.95)",
        util::cmd(rel.join("hip-datapath-bench").to_str().unwrap()).args(["20000", "20"]),
    );
    r.run(
        "XFRM on the host (no ESP): N associations' policies via netlink vs one `ip xfrm` each (goal: >= 20x)",
        util::cmd(rel.join("examples/xfrm_bench").to_str().unwrap()).args(["--policies-only", "1000", "10000"]),
    );
    r.run(
        "SIP: calls/s with hip-agent as UAS vs SIPp's own UAS (goal: ratio >= 0.8, 0 failed)",
        util::cmd("bash")
            .arg(root.join("tests/sipp/bench.sh"))
            .env("HIP_AGENT_BIN", rel.join("hip-agent")),
    );
    r.run(
        "SIP edge: calls/s through hip's edge proxy (HIP off; HIP on) vs Kamailio as a stateful relay of the same flow (goal: >= 0.8x, 0 failed)",
        util::cmd("bash")
            .arg(root.join("tests/sipp/edge_bench.sh"))
            .env("HIP_AGENT_BIN", rel.join("hip-agent")),
    );
    r.run(
        "HIP: a legitimate base exchange during 10,000 spoofed I1/s forging the caller's address vs without (goal: ratio <= 2)",
        util::cmd(rel.join("hip-i1-flood-bench").to_str().unwrap())
            .args(["40", "10000"])
            .env("HIP_AGENT_BIN", rel.join("hip-agent")),
    );

    r.run(
        "DNS (RFC 8005): publish + look up 10,000 HIP RRs on BIND with hip-dns vs one nsupdate/dig process per record (sampled on 300)",
        util::cmd(rel.join("hip-dns-bench").to_str().unwrap()).args(["10000", "300"]),
    );

    // One VM boot for what needs ESP.
    r.line("\n== bench (VM, kernel with ESP): XFRM SAs + policies via netlink vs `ip xfrm`; call set-up split vs floors; post-answer media delay vs HIP off; media vs plaintext; capacity curve");
    let script = format!(
        // The agents log at their default level (info), as installed: the tests' debug
        // logging of every packet is not part of what an operator runs.
        "export HIP_TEST_AGENT_LOG=info; \
         echo '-- xfrm_bench (2 SAs + 2 policies per association; ip baseline sampled on 100, scaled linearly)'; \
         {xfrm} 1000 10000 --ip-limit 100 || echo '!! xfrm_bench failed'; \
         echo '-- hip-call-bench'; HIP_AGENT_BIN={agent} {call} 5 || echo '!! hip-call-bench failed'; \
         echo '-- hip-answer-bench (phones through edges; 200 OK -> first RTP at the caller)'; \
         HIP_AGENT_BIN={agent} {answer} 5 3000 || echo '!! hip-answer-bench failed'; \
         echo '-- hip-media-bench (ESP transforms vs plaintext between the same hosts)'; \
         HIP_AGENT_BIN={agent} {media} 3 || echo '!! hip-media-bench failed'; \
         echo '-- hip-handover-bench (media gap when a host moves mid-call, HIP UPDATE, no re-INVITE)'; \
         HIP_AGENT_BIN={agent} {handover} 3 || echo '!! hip-handover-bench failed'; \
         echo '-- hip-capacity-bench (calls held by one agent, each from its own peer: set-up rate vs crypto floor and SIP alone, cost per call)'; \
         HIP_AGENT_BIN={agent} {capacity} 10 100 1000 || echo '!! hip-capacity-bench failed'",
        xfrm = vm::shell_quote(&rel.join("examples/xfrm_bench").to_string_lossy()),
        agent = vm::shell_quote(&rel.join("hip-agent").to_string_lossy()),
        call = vm::shell_quote(&rel.join("hip-call-bench").to_string_lossy()),
        answer = vm::shell_quote(&rel.join("hip-answer-bench").to_string_lossy()),
        media = vm::shell_quote(&rel.join("hip-media-bench").to_string_lossy()),
        capacity = vm::shell_quote(&rel.join("hip-capacity-bench").to_string_lossy()),
        handover = vm::shell_quote(&rel.join("hip-handover-bench").to_string_lossy()),
    );
    let mut lines = Vec::new();
    let st = vm::run_script(&script, "2G", Duration::from_secs(60 * 60), |l| {
        println!("{l}");
        lines.push(l.to_owned());
    })?;
    for l in &lines {
        let _ = writeln!(r.file, "{l}");
        if l.starts_with("!! ") {
            r.failed.push(l.clone());
        }
    }
    if !st.success() {
        r.failed.push(format!("VM benches ({st})"));
    }
    r.line(&format!(
        "\nreport written to {}",
        dir.join("report.txt").display()
    ));
    if !r.failed.is_empty() {
        bail!("benchmarks failed: {}", r.failed.join("; "));
    }
    Ok(())
}
