//! `hip-datapath-bench [PACKETS [ROUNDS]]`: the datapath benchmark (root; creates
//! and removes two network namespaces of its own). Prints one line per scenario and
//! the same as JSON on the last line.
//!
//! `hip-datapath-bench --micro [--object FILE] [REPEAT [TRIALS]]`: only the
//! programs' cost on each scenario's frame under `BPF_PROG_TEST_RUN`, and their sizes
//! (seconds, no namespaces; for comparing program versions: `--object` measures
//! another build of `hip-ebpf` with the same map layouts instead of the embedded one),
//! then the price of each operation a flow program needs (`hip_tc_probe`).

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--micro") {
        args.next();
        let obj = if args.peek().map(String::as_str) == Some("--object") {
            args.next();
            let path = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--object needs a file"))?;
            Some(std::fs::read(&path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?)
        } else {
            None
        };
        let repeat = args
            .next()
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(200_000);
        let trials = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
        let reports = hip_datapath::bench::micro(repeat, trials, obj.as_deref())?;
        for r in &reports {
            let flow_floor = r
                .floor_flow_ns
                .map(|f| format!(", minimal flow program {f:.1}"))
                .unwrap_or_default();
            println!(
                "micro {} {}: {:.1} ns/run ({:.1} over the empty program's {:.1}{}), verdict {}, \
                 xlated {} B, jited {} B, {} insns verified",
                r.scenario,
                r.hook,
                r.ns,
                r.ns - r.floor_ns,
                r.floor_ns,
                flow_floor,
                r.verdict,
                r.xlated_bytes,
                r.jited_bytes,
                r.verified_insns
            );
        }
        let probes = hip_datapath::bench::probes(repeat, trials)?;
        for p in &probes {
            println!(
                "probe {}: {:.1} ns/run ({:.1} over the empty program's {:.1})",
                p.ops,
                p.ns,
                p.ns - p.floor_ns,
                p.floor_ns
            );
        }
        println!(
            "{}",
            serde_json::json!({ "micro": reports, "probes": probes })
        );
        return Ok(());
    }
    let mut opts = hip_datapath::bench::BenchOptions::default();
    if let Some(p) = args.next() {
        opts.packets = p.parse()?;
    }
    if let Some(r) = args.next() {
        opts.rounds = r.parse()?;
    }
    let reports = hip_datapath::bench::run(&opts)?;
    for r in &reports {
        println!(
            "datapath {}: rate attached/detached {:.3} (goal >= 0.95; per CPU-second of the \
             sender, median of {} rounds, {:.0} vs {:.0} pps; wall-clock {:.3}), \
             empty program attached/detached {:.3}{}, attached/empty {:.3}; the programs' \
             kernel-accounted time is {:.1}% of a detached packet's CPU time",
            r.name,
            r.ratio,
            r.round_ratios.len(),
            r.attached.cpu_pps,
            r.detached.cpu_pps,
            r.ratio_wall,
            r.floor_ratio,
            r.floor_flow_ratio
                .map(|f| format!(", minimal flow program attached/detached {f:.3}"))
                .unwrap_or_default(),
            r.ratio_vs_floor,
            100.0 * r.cost_share(),
        );
        println!(
            "datapath {}: egress {:.1} ns/packet ({:.1} over the empty program's {:.1}), \
             ingress {:.1} ns/packet ({:.1} over the empty program's {:.1}{}) (goal < 100); \
             runs {}/{}/{}/{}",
            r.name,
            r.egress.ns,
            r.egress_net_ns(),
            r.floor_egress.ns,
            r.ingress.ns,
            r.ingress_net_ns(),
            r.floor_ingress.ns,
            r.floor_flow_ingress
                .map(|f| format!("; minimal flow program {:.1}", f.ns))
                .unwrap_or_default(),
            r.egress.runs,
            r.ingress.runs,
            r.floor_egress.runs,
            r.floor_ingress.runs,
        );
    }
    println!("{}", serde_json::to_string(&reports)?);
    Ok(())
}
