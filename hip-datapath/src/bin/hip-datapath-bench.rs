//! `hip-datapath-bench [PACKETS [ROUNDS]]`: the datapath benchmark (root; creates
//! and removes two network namespaces of its own). Prints one line per scenario and
//! the same as JSON on the last line.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
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
            "datapath {}: {:.0} pps attached vs {:.0} pps detached = {:.3} of detached (goal >= 0.95); \
             egress {:.1} ns/packet over {} runs, ingress {:.1} ns/packet over {} runs (goal < 100)",
            r.name,
            r.attached_pps,
            r.detached_pps,
            r.ratio,
            r.egress_ns,
            r.egress_runs,
            r.ingress_ns,
            r.ingress_runs
        );
    }
    println!("{}", serde_json::to_string(&reports)?);
    Ok(())
}
