//! Benchmark: time to install N associations (2 SAs + 2 policies each, the
//! [`FailClosed::Guard`] shape) through [`XfrmNetlink`], against one `ip xfrm` command
//! per object in the same run. SAs need ESP, so the full shape runs in the VM;
//! [`Shape::PoliciesOnly`] (2 policies per association) runs on the host kernel.
//!
//! Before measuring, one association is installed in a scratch namespace so the kernel
//! has loaded the crypto modules (`cbc(aes)`, `hmac(sha256)`…; under TCG the first
//! load takes seconds) for both contenders alike.
//!
//! Each measurement runs in a fresh network namespace of its own (created with
//! `ip netns add`, deleted afterwards), so the runs do not see each other's objects.

use std::{
    fs::File,
    net::Ipv6Addr,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde::Serialize;

use crate::{
    AssociationParams, EspKeyPair, EspKeys, EspTransform, FailClosed, KernelIpsec, Lifetimes,
    PolicyAction, PolicyDir, PolicyParams, Reqid, SaParams, XfrmNetlink, install_associations,
};

/// What each association installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// 2 SAs + 2 policies (needs ESP).
    Full,
    /// 2 policies (runs on a kernel without ESP).
    PoliciesOnly,
}

/// One row of the result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// What each association installs.
    pub shape: Shape,
    /// Associations installed.
    pub n: usize,
    /// Objects installed (4 or 2 per association).
    pub objects: usize,
    /// Wall time through hip's netlink path.
    pub netlink_secs: f64,
    /// Wall time of the `ip xfrm` baseline (extrapolated linearly if `ip_sampled < n`).
    pub ip_secs: f64,
    /// Associations the baseline really installed.
    pub ip_sampled: usize,
    /// `ip_secs / netlink_secs`.
    pub ratio: f64,
    /// Microseconds per association through netlink.
    pub netlink_us_per_assoc: f64,
    /// Microseconds per association with `ip`.
    pub ip_us_per_assoc: f64,
}

/// The `i`th benchmark association: distinct peer HITs, one pair of locators.
pub fn association(i: usize) -> AssociationParams {
    let i32_ = i as u32;
    let k = |b: u8| {
        EspKeys::new(
            EspTransform::AesCbc128HmacSha256,
            &[b; 16],
            &[b.wrapping_add(1); 32],
        )
        .expect("fixed lengths")
    };
    AssociationParams {
        local_hit: "2001:20::1".parse().expect("literal"),
        peer_hit: Ipv6Addr::from(
            u128::from(Ipv6Addr::new(0x2001, 0x21, 0, 0, 0, 0, 0, 0)) + i as u128,
        ),
        local_locator: "2001:db8::1".parse().expect("literal"),
        peer_locator: "2001:db8::2".parse().expect("literal"),
        spi_in: 0x10_0000 + 2 * i32_,
        spi_out: 0x10_0001 + 2 * i32_,
        keys: EspKeyPair {
            outbound: k(i as u8),
            inbound: k(i as u8 ^ 0x55),
        },
        reqid: Reqid::hip(i32_),
        replay_window: 32,
        lifetimes: Lifetimes::UNLIMITED,
        fail_closed: FailClosed::Guard,
        encap: None,
    }
}

/// A scratch network namespace, deleted on drop.
struct ScratchNs(String);

impl ScratchNs {
    fn new(tag: &str) -> std::io::Result<Self> {
        let name = format!("hipbench-{}-{tag}", std::process::id());
        let st = Command::new("ip").args(["netns", "add", &name]).status()?;
        if !st.success() {
            return Err(std::io::Error::other(format!("ip netns add {name} failed")));
        }
        Ok(Self(name))
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn hex(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

/// The `ip` arguments (after `ip -n NS`) that install one SA like hip does.
pub fn ip_sa_args(s: &SaParams) -> Vec<String> {
    let mut v: Vec<String> = [
        "xfrm",
        "state",
        "add",
        "src",
        &s.locators.src.to_string(),
        "dst",
        &s.locators.dst.to_string(),
        "proto",
        "esp",
        "spi",
        &format!("{:#x}", s.spi),
        "reqid",
        &s.reqid.0.to_string(),
        "mode",
        "beet",
        "replay-window",
        &s.replay_window.to_string(),
        "sel",
        "src",
        &s.hits.src.to_string(),
        "dst",
        &s.hits.dst.to_string(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let a = s.keys.transform().kernel_algs();
    if let Some((n, t)) = a.auth {
        v.extend([
            "auth-trunc".into(),
            n.into(),
            hex(s.keys.auth()),
            t.to_string(),
        ]);
    }
    if let Some(n) = a.enc {
        v.extend(["enc".into(), n.into(), hex(s.keys.enc())]);
    }
    if let Some((n, icv)) = a.aead {
        v.extend(["aead".into(), n.into(), hex(s.keys.enc()), icv.to_string()]);
    }
    v
}

/// The `ip` arguments that install one policy like hip does.
pub fn ip_policy_args(p: &PolicyParams) -> Vec<String> {
    let dir = match p.id.dir {
        PolicyDir::In => "in",
        PolicyDir::Out => "out",
        PolicyDir::Fwd => "fwd",
    };
    let mut v: Vec<String> = [
        "xfrm",
        "policy",
        "add",
        "src",
        &p.id.src.to_string(),
        "dst",
        &p.id.dst.to_string(),
        "dir",
        dir,
        "priority",
        &p.priority.to_string(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    match p.action {
        PolicyAction::Ipsec { locators, reqid } => v.extend(
            [
                "tmpl",
                "src",
                &locators.src.to_string(),
                "dst",
                &locators.dst.to_string(),
                "proto",
                "esp",
                "reqid",
                &reqid.0.to_string(),
                "mode",
                "beet",
            ]
            .iter()
            .map(|x| x.to_string()),
        ),
        PolicyAction::Block => v.extend(["action".into(), "block".into()]),
        PolicyAction::Allow => v.extend(["action".into(), "allow".into()]),
    }
    v
}

fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || {
            let fd = File::open(&path)?;
            // SAFETY: valid fd for the duration of the call; affects only this thread.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .expect("bench thread panicked")
    })
}

/// Installs `n` associations through netlink in a fresh namespace; returns the time
/// and checks that the kernel then holds exactly 2n SAs and 2n policies of hip's.
pub fn measure_netlink(n: usize, shape: Shape) -> Result<Duration, String> {
    let assocs: Vec<AssociationParams> = (0..n).map(association).collect();
    let policies: Vec<PolicyParams> = assocs.iter().flat_map(|a| a.ipsec_policies()).collect();
    let ns = ScratchNs::new(&format!("nl{n}")).map_err(|e| e.to_string())?;
    in_netns(&ns.0, || -> Result<Duration, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let k = XfrmNetlink::new().map_err(|e| e.to_string())?;
            let t = Instant::now();
            let res = match shape {
                Shape::Full => install_associations(&k, &assocs, 128).await,
                Shape::PoliciesOnly => {
                    futures::stream::iter(policies.iter().map(|p| k.add_policy(p)))
                        .buffered(128)
                        .collect()
                        .await
                }
            };
            let el = t.elapsed();
            if let Some(e) = res.into_iter().find_map(Result::err) {
                return Err(e.to_string());
            }
            let o = k.list_owned().await.map_err(|e| e.to_string())?;
            let want_sas = if shape == Shape::Full { 2 * n } else { 0 };
            if o.sas.len() != want_sas || o.policies.len() != 2 * n {
                return Err(format!(
                    "expected {want_sas} SAs and {} policies, kernel has {} and {}",
                    2 * n,
                    o.sas.len(),
                    o.policies.len()
                ));
            }
            Ok(el)
        })
    })
    .map_err(|e| e.to_string())?
}

/// Installs the first `n` associations with one `ip xfrm` process per object.
pub fn measure_ip(n: usize, shape: Shape) -> Result<Duration, String> {
    let ns = ScratchNs::new(&format!("ip{n}")).map_err(|e| e.to_string())?;
    let mut cmds = Vec::with_capacity(4 * n);
    for i in 0..n {
        let a = association(i);
        if shape == Shape::Full {
            cmds.push(ip_sa_args(&a.sa_in()));
            cmds.push(ip_sa_args(&a.sa_out()));
        }
        for p in a.ipsec_policies() {
            cmds.push(ip_policy_args(&p));
        }
    }
    let t = Instant::now();
    for c in &cmds {
        let st = Command::new("ip")
            .arg("-n")
            .arg(&ns.0)
            .args(c)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("ip {} failed", c.join(" ")));
        }
    }
    Ok(t.elapsed())
}

/// Runs the benchmark for each N; the `ip` baseline installs at most `ip_limit`
/// associations and is extrapolated linearly beyond (say so when reporting).
pub fn run(sizes: &[usize], ip_limit: usize, shape: Shape) -> Result<Vec<BenchRow>, String> {
    // Warm-up: crypto modules loaded, code paths paged in, for both contenders.
    measure_netlink(1, shape)?;
    let mut rows = Vec::new();
    for &n in sizes {
        let nl = measure_netlink(n, shape)?.as_secs_f64();
        let sampled = n.min(ip_limit.max(1));
        let ip = measure_ip(sampled, shape)?.as_secs_f64() * n as f64 / sampled as f64;
        rows.push(BenchRow {
            shape,
            n,
            objects: if shape == Shape::Full { 4 * n } else { 2 * n },
            netlink_secs: nl,
            ip_secs: ip,
            ip_sampled: sampled,
            ratio: ip / nl,
            netlink_us_per_assoc: nl * 1e6 / n as f64,
            ip_us_per_assoc: ip * 1e6 / n as f64,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_associations_are_distinct_and_valid() {
        let a = association(0);
        let b = association(1);
        assert_ne!(a.peer_hit, b.peer_hit);
        assert_ne!(a.spi_in, b.spi_out);
        assert_eq!(a.policies().len(), 2);
        let args = ip_sa_args(&a.sa_in()).join(" ");
        assert!(args.contains("mode beet"), "{args}");
        assert!(args.contains("auth-trunc hmac(sha256)"), "{args}");
    }
}
