//! `cargo run --release -p hip-kernel --example xfrm_bench -- [N…] [--ip-limit M] [--policies-only] [--json]`
//!
//! Times installing N associations (2 SAs + 2 policies each) through hip's netlink path
//! against one `ip xfrm` command per object, in fresh namespaces of the same run. Needs
//! root and a kernel with ESP (run it in the VM). The same code backs
//! `hip-agent xfrm bench`.

fn main() {
    let mut sizes = Vec::new();
    let mut ip_limit = usize::MAX;
    let mut json = false;
    let mut shape = hip_kernel::bench::Shape::Full;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--policies-only" => shape = hip_kernel::bench::Shape::PoliciesOnly,
            "--ip-limit" => {
                ip_limit = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--ip-limit takes a number")
            }
            n => sizes.push(n.parse().expect("association counts are numbers")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1000, 10000];
    }
    let rows = match hip_kernel::bench::run(&sizes, ip_limit, shape) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xfrm bench: {e}");
            std::process::exit(1);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("serialisable")
        );
        return;
    }
    for r in &rows {
        println!(
            "xfrm install {:?} N={:>6} ({} objects): netlink {:.3} s ({:.1} us/assoc), ip xfrm {:.3} s \
             ({:.1} us/assoc, {} really run), ratio {:.1}x",
            r.shape,
            r.n,
            r.objects,
            r.netlink_secs,
            r.netlink_us_per_assoc,
            r.ip_secs,
            r.ip_us_per_assoc,
            r.ip_sampled,
            r.ratio
        );
    }
}
