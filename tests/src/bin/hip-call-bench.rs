//! `hip-call-bench [CALLS]`: call set-up time from INVITE to media flowing over the SAs,
//! split into SIP, base exchange and kernel programming (the agents' own timestamps in
//! `status`, and the first RTP packet's arrival at bob), next to the sum of those parts'
//! floors measured in the same run:
//!
//! * SIP: the same call through the same proxies with HIP off (the agents' SIP alone);
//! * base exchange: its crypto floor — the sign/verify/DH/KDF/puzzle operations of one
//!   ECDSA P-256 / P-256 exchange timed alone, in this process (`hip_proto::bench`);
//! * kernel: installing one association (2 BEET SAs + 4 policies, per-peer fail-closed as
//!   the agent does) through hip's netlink code, in a fresh namespace.
//!
//! Needs root and ESP (`cargo xtask bench` runs it in the VM). Prints a table and a JSON line.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hip_kernel::{
    AssociationParams, EspKeyPair, EspKeys, EspTransform, FailClosed, Lifetimes, Reqid, XfrmNetlink,
};
use hip_tests::{
    NetNs,
    call::{self, Options, Scenario},
};
use serde_json::{Value, json};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn ms(v: &Value) -> Option<f64> {
    v.as_u64().map(|x| x as f64)
}

struct Setup {
    sip: f64,
    hip: f64,
    kernel: f64,
    /// The kernel part's own split (the agent's `install_us`): SAs and policies, route,
    /// datapath maps; ms.
    k_xfrm: f64,
    k_route: f64,
    k_maps: f64,
    media: f64,
    total: f64,
}

/// One call with HIP: returns its split.
fn one_call(s: &Scenario) -> Result<Setup> {
    let rtp = hip_tests::rtp_bin();
    let to = format!("[{}]:{}", s.bob_hit, call::RTP_PORT);
    let mut rx = Command::new(&rtp)
        .args([
            "--netns",
            s.bob_ns().name(),
            "recv",
            "--announce",
            "--count",
            "1",
            "--timeout-s",
            "120",
            "--bind",
            &to,
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    // Media is sent from before the INVITE, every 2 ms; the fail-closed policy blocks it
    // (EPERM, ignored) until the SAs exist.
    let mut tx = Command::new(&rtp)
        .args([
            "--netns",
            s.alice_ns().name(),
            "send",
            "--ignore-errors",
            "--interval-ms",
            "2",
            "--count",
            "60000",
        ])
        .args([
            "--from",
            &format!("[{}]:{}", s.alice_hit, call::RTP_PORT),
            "--to",
            &to,
        ])
        .stdout(Stdio::null())
        .spawn()?;
    let handle = s.call()?;
    let (a, _) = s.wait_established()?;
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    rx.wait()?;
    let _ = tx.kill();
    let _ = tx.wait();
    let first = serde_json::from_str::<Value>(line.trim())?["first_ms"]
        .as_u64()
        .context("no media arrived")? as f64;
    s.hangup(&handle)?;
    let t = &a["timing_ms"];
    let at = &a["associations"][0]["timing_ms"];
    let split = &a["associations"][0]["kernel"]["install_us"];
    let part = |k: &str| split[k].as_f64().map(|us| us / 1e3).context("install_us");
    let (started, confirmed) = (
        ms(&t["started"]).context("started")?,
        ms(&t["sip_confirmed"]).context("confirmed")?,
    );
    let (hs, he, ho) = (
        ms(&at["started"]).context("hip started")?,
        ms(&at["established"]).context("established")?,
        ms(&at["offloaded"]).context("offloaded")?,
    );
    Ok(Setup {
        sip: confirmed - started,
        hip: he - hs,
        kernel: ho - he,
        k_xfrm: part("xfrm")?,
        k_route: part("route")?,
        k_maps: part("datapath")?,
        media: first - ho,
        total: first - started,
    })
}

/// SIP alone: the same call with HIP off.
fn sip_only(n: usize) -> Result<f64> {
    let s = Scenario::start(&Options {
        extra_config: "[hip]\nenabled = false\n".into(),
        ring_ms: Some(0),
        ..Options::default()
    })?;
    let mut v = Vec::new();
    // One warm-up call (first use of every code path under emulation), not counted.
    for i in 0..=n {
        let h = s.call()?;
        let a = Scenario::wait_call_security(
            &s.alice,
            "the call confirmed",
            Duration::from_secs(60),
            |sec| !sec["timing_ms"]["sip_confirmed"].is_null(),
        )?;
        let t = &a["timing_ms"];
        if i > 0 {
            v.push(ms(&t["sip_confirmed"]).unwrap() - ms(&t["started"]).unwrap());
        }
        s.hangup(&h)?;
    }
    Ok(median(v))
}

/// One association through hip's netlink path, in a fresh namespace; milliseconds. With
/// `like_agent`, on a runtime built as the agent's (multi-threaded, 2 workers) instead of
/// one thread: the difference is what the runtime's thread hops cost the netlink round
/// trips (a diagnostic beside the floor, not a floor).
fn kernel_floor(n: usize, like_agent: bool) -> Result<f64> {
    let ns = NetNs::new("kfloor")?;
    let name = ns.name().to_owned();
    let rt = if like_agent {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    let times = ns.run_in(move || -> Result<Vec<f64>> {
        let _ = &name;
        rt.block_on(async {
            let x = XfrmNetlink::new()?;
            let t = EspTransform::AesGcm128Icv16;
            let keys =
                |b: u8| EspKeys::new(t, &vec![b; t.enc_key_len()], &vec![b; t.auth_key_len()]);
            let mut v = Vec::new();
            for i in 0..n as u32 {
                let a = AssociationParams {
                    local_hit: "2001:20::a".parse()?,
                    peer_hit: format!("2001:20::{:x}", 0x100 + i).parse()?,
                    local_locator: "192.0.2.1".parse()?,
                    peer_locator: "192.0.2.4".parse()?,
                    spi_in: 0x1000 + 2 * i,
                    spi_out: 0x1001 + 2 * i,
                    keys: EspKeyPair {
                        outbound: keys(1)?,
                        inbound: keys(2)?,
                    },
                    reqid: Reqid(hip_kernel::owner::REQID_FIRST + i),
                    replay_window: 32,
                    lifetimes: Lifetimes::UNLIMITED,
                    fail_closed: FailClosed::PerPeer,
                    encap: None,
                };
                let start = Instant::now();
                hip_kernel::install_association(&x, &a).await?;
                v.push(start.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(v)
        })
    })??;
    Ok(median(times))
}

fn main() -> Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .map_or(Ok(5), |a| a.parse())
        .context("CALLS")?;
    eprintln!("floors: kernel programming (one association, netlink)…");
    let kernel_like_agent = kernel_floor(50, true)?;
    let kernel_floor = kernel_floor(50, false)?;
    eprintln!("floors: HIP crypto of one ECDSA P-256 / P-256 exchange…");
    let crypto = hip_proto::bench::exchange_vs_crypto_floor(
        hip_proto::Algorithm::EcdsaP256,
        hip_proto::crypto::DhGroup::NistP256,
        8,
        5,
    );
    let hip_floor = crypto.crypto_floor.as_secs_f64() * 1e3;
    eprintln!("floors: SIP alone ({calls} calls with HIP off)…");
    let sip_floor = sip_only(calls)?;
    eprintln!("{calls} secured calls…");
    let s = Scenario::start(&Options {
        ring_ms: Some(0),
        ..Options::default()
    })?;
    let mut rows = Vec::new();
    for i in 0..=calls {
        let r = one_call(&s).with_context(|| format!("call {i}"))?;
        if i == 0 {
            eprintln!("  warm-up call: total {:.0} ms (not counted)", r.total);
            continue;
        }
        eprintln!(
            "  call {i}: SIP {:.0} ms, base exchange {:.0} ms, kernel {:.0} ms, media {:.0} ms after, total {:.0} ms",
            r.sip, r.hip, r.kernel, r.media, r.total
        );
        rows.push(r);
    }
    drop(s);
    let m = |f: fn(&Setup) -> f64| median(rows.iter().map(f).collect());
    let (sip, hip, kern, media, total) = (
        m(|r| r.sip),
        m(|r| r.hip),
        m(|r| r.kernel),
        m(|r| r.media),
        m(|r| r.total),
    );
    let (k_xfrm, k_route, k_maps) = (m(|r| r.k_xfrm), m(|r| r.k_route), m(|r| r.k_maps));
    let floors = sip_floor + hip_floor + kernel_floor;
    let parts = sip + hip + kern;
    println!("call set-up, median of {calls} (ms)   measured   floor");
    println!("  SIP INVITE → ACK            {sip:>9.1}  {sip_floor:>7.1}  (same call, HIP off)");
    println!("  HIP base exchange           {hip:>9.1}  {hip_floor:>7.1}  (its crypto alone)");
    println!(
        "  kernel programming          {kern:>9.1}  {kernel_floor:>7.1}  (one association via netlink)"
    );
    println!(
        "    of which SAs + policies   {k_xfrm:>9.1}  {kernel_floor:>7.1}  (the same work alone)"
    );
    println!(
        "      (the same work alone on a runtime built as the agent's: {kernel_like_agent:.1})"
    );
    println!("    of which the route        {k_route:>9.1}");
    println!("    of which the eBPF maps    {k_maps:>9.1}");
    println!(
        "  sum of the parts            {parts:>9.1}  {floors:>7.1}  ratio {:.2}",
        parts / floors
    );
    println!(
        "  first RTP vs programming end {media:>8.1}         (sender every 2 ms; < 0: media flowed before the route/map bookkeeping ended)"
    );
    println!("  INVITE → media flowing      {total:>9.1}");
    println!(
        "{}",
        json!({
            "bench": "call_setup", "calls": calls,
            "sip_ms": sip, "hip_ms": hip, "kernel_ms": kern,
            "kernel_xfrm_ms": k_xfrm, "kernel_route_ms": k_route, "kernel_maps_ms": k_maps, "media_ms": media, "total_ms": total,
            "sip_floor_ms": sip_floor, "hip_crypto_floor_ms": hip_floor, "kernel_floor_ms": kernel_floor,
            "kernel_multi_thread_ms": kernel_like_agent,
            "parts_over_floors": parts / floors,
        })
    );
    if !(parts.is_finite() && floors.is_finite()) {
        bail!("incomplete measurement");
    }
    // Issue 13: the same calls with alice behind a NAT (HIP over UDP, UDP-encapsulated
    // SAs), then with bob behind one (he starts HIP), against the calls above.
    for (who, opts) in [
        (
            "alice (the caller)",
            Options {
                ring_ms: Some(0),
                alice_behind_nat: true,
                ..Options::default()
            },
        ),
        (
            "bob (the callee, who starts HIP)",
            Options {
                ring_ms: Some(0),
                bob_behind_nat: true,
                ..Options::default()
            },
        ),
    ] {
        eprintln!("{calls} secured calls with {who} behind a NAT…");
        let s = Scenario::start(&opts)?;
        let mut nat_rows = Vec::new();
        for i in 0..=calls {
            let r = one_call(&s).with_context(|| format!("call {i} with {who} behind the NAT"))?;
            if i > 0 {
                nat_rows.push(r);
            }
        }
        drop(s);
        let mn = |f: fn(&Setup) -> f64| median(nat_rows.iter().map(f).collect());
        let (n_hip, n_kern, n_total) = (mn(|r| r.hip), mn(|r| r.kernel), mn(|r| r.total));
        println!("{who} behind a NAT, median of {calls} (ms)   NAT   without   ratio");
        println!(
            "  HIP base exchange           {n_hip:>7.1}  {hip:>7.1}   {:.2}",
            n_hip / hip
        );
        println!(
            "  kernel programming          {n_kern:>7.1}  {kern:>7.1}   {:.2}",
            n_kern / kern
        );
        println!(
            "  INVITE → media flowing      {n_total:>7.1}  {total:>7.1}   {:.2}",
            n_total / total
        );
        let natted = if opts.bob_behind_nat {
            "callee"
        } else {
            "caller"
        };
        println!(
            "{}",
            json!({"bench": "call_setup_nat", "behind_nat": natted, "calls": calls, "hip_ms": n_hip, "kernel_ms": n_kern, "total_ms": n_total, "total_ratio": n_total / total})
        );
    }
    Ok(())
}
