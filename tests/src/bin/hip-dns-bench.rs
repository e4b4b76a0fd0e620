//! `hip-dns-bench [N] [BASELINE]`: publish and look up N (default 10,000) HIP RRs against a
//! real BIND (signed zone, inline signing) in a namespace, with hip-dns — updates batched
//! (100 names per TSIG-signed RFC 2136 update, over TCP) and 64 lookups in flight (each
//! lookup asks HIP, A and AAAA) — against the baseline of one `nsupdate` process per
//! record and one `dig` process per lookup (a single HIP query each), measured on BASELINE
//! (default 300) records in the same run. Prints per-record times and the ratios.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hip_dns::{HipRdata, Name, Resolver, TsigKey, UpdateTarget, client};
use hip_proto::{Algorithm, HostIdentity};
use hip_tests::{
    VethPair,
    dns::{Bind, ZONE},
    enter_netns,
    sip::scratch,
};
use rand_core::SeedableRng;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let base_n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(300);
    let p = VethPair::new("dnsb", &["10.81.0.1/24"], &["10.81.0.53/24"])?;
    let dir = scratch("dns-bench");
    let bind = Bind::start(
        &p.b,
        "10.81.0.53",
        &dir.join("named"),
        &[("bench", "*.bench.hip.test")],
        "",
    )?;
    // Records: a handful of real identities (key generation is not what is measured),
    // each name with one of them.
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8005);
    let ids: Vec<HipRdata> = (0..16)
        .map(|_| {
            let id = HostIdentity::generate(Algorithm::EcdsaP256, &mut rng).unwrap();
            HipRdata::from_host_id(id.host_id(), vec![])
        })
        .collect();
    // The clients run on a thread inside alice's namespace (so that the namespace's
    // clean-up, which kills what runs inside, never kills this process).
    let ns = p.a.name().to_owned();
    let r = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            enter_netns(&ns)?;
            body(&bind, &ids, n, base_n)
        })
        .join()
        .expect("bench thread panicked")
    });
    drop(bind);
    r
}

async fn visible(r: &Resolver, n: &Name) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if r.lookup(n).await.is_ok_and(|l| !l.hip.is_empty()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("{n} not served within 120 s")
}

fn name(i: usize, set: &str) -> Name {
    Name::from_ascii(format!("h{i}.{set}.bench.{ZONE}.")).unwrap()
}

fn body(bind: &Bind, ids: &[HipRdata], n: usize, base_n: usize) -> Result<()> {
    let key_path = bind.key("bench");
    let target = UpdateTarget {
        server: bind.addr,
        zone: Name::from_ascii(format!("{ZONE}.")).unwrap(),
        key: TsigKey::from_file(&key_path)?,
        timeout: Duration::from_secs(30),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // hip-dns: publish N.
    let records: Vec<(Name, HipRdata)> = (0..n)
        .map(|i| (name(i, "a"), ids[i % ids.len()].clone()))
        .collect();
    let t = Instant::now();
    rt.block_on(async {
        for chunk in records.chunks(100) {
            client::publish_many(&target, 300, chunk).await?;
        }
        anyhow::Ok(())
    })?;
    // Published means served: inline signing answers from the signed copy, which follows
    // the updates; wait until the last record is there (the same wait ends the baseline).
    let resolver = Resolver {
        server: bind.addr,
        trust_anchor: None,
        timeout: Duration::from_secs(10),
    };
    rt.block_on(visible(&resolver, &records[n - 1].0))?;
    let ours_pub = t.elapsed();

    // hip-dns: look up N (64 in flight), every answer checked.
    let t = Instant::now();
    let found = rt.block_on(async {
        let mut found = 0usize;
        let mut set = tokio::task::JoinSet::new();
        let mut next = 0;
        while next < n || !set.is_empty() {
            while next < n && set.len() < 64 {
                let (r, nm, want) = (
                    resolver.clone(),
                    records[next].0.clone(),
                    records[next].1.clone(),
                );
                set.spawn(async move {
                    r.lookup(&nm)
                        .await
                        .map(|l| l.hip.iter().any(|a| a.rdata == want))
                });
                next += 1;
            }
            if let Some(res) = set.join_next().await
                && res??
            {
                found += 1;
            }
        }
        anyhow::Ok(found)
    })?;
    let ours_look = t.elapsed();
    if found != n {
        bail!("{found} of {n} records found as published");
    }

    // Baseline: one nsupdate process per record, one dig per lookup.
    let t = Instant::now();
    for (i, rd) in ids.iter().cycle().take(base_n).enumerate() {
        let mut c = Command::new("nsupdate")
            .arg("-k")
            .arg(&key_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("nsupdate (dnsutils)")?;
        let nm = name(i, "b");
        write!(
            c.stdin.take().unwrap(),
            "server {}\nzone {ZONE}.\nupdate delete {nm} HIP\nupdate add {nm} 300 HIP {}\nsend\n",
            bind.addr.ip(),
            rd.to_presentation()
        )?;
        let out = c.wait_with_output()?;
        if !out.status.success() {
            bail!("nsupdate: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    rt.block_on(visible(&resolver, &name(base_n - 1, "b")))?;
    let base_pub = t.elapsed();
    let t = Instant::now();
    for i in 0..base_n {
        let out = Command::new("dig")
            .args([
                &format!("@{}", bind.addr.ip()),
                "+short",
                "HIP",
                &name(i, "b").to_ascii(),
            ])
            .output()?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("dig found no HIP RR for {}", name(i, "b"));
        }
    }
    let base_look = t.elapsed();

    let per = |d: Duration, k: usize| d.as_secs_f64() * 1e6 / k as f64;
    let (op, ol, bp, bl) = (
        per(ours_pub, n),
        per(ours_look, n),
        per(base_pub, base_n),
        per(base_look, base_n),
    );
    println!("records: {n} with hip-dns; baseline on {base_n} (one process per record)");
    println!(
        "publish: hip-dns {op:.0} us/record ({:.1} s total), nsupdate {bp:.0} us/record: {:.1}x",
        ours_pub.as_secs_f64(),
        bp / op
    );
    println!(
        "lookup:  hip-dns {ol:.0} us/record ({:.1} s total, HIP+A+AAAA each), dig {bl:.0} us/record (HIP only): {:.1}x",
        ours_look.as_secs_f64(),
        bl / ol
    );
    println!(
        "ratio (publish + lookup, baseline / hip-dns): {:.1}x",
        (bp + bl) / (op + ol)
    );
    Ok(())
}
