//! Start-up check of the capabilities the configuration needs, so that a missing one is
//! named before anything half-starts (the kernel's own EPERM would not say which).

use crate::config::Config;

/// Capability numbers (`include/uapi/linux/capability.h`).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process (`CapEff` in `/proc/self/status`).
pub fn effective() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// What `cfg` needs and `caps` lacks, each with the reason, as `CAP_X (why)`.
pub fn missing(cfg: &Config, caps: u64) -> Vec<String> {
    let has = |c: u32| caps & (1 << c) != 0;
    let mut need: Vec<(u32, &str, &str)> = Vec::new();
    if cfg.hip_enabled() {
        need.push((
            CAP_NET_RAW,
            "CAP_NET_RAW",
            "raw IP sockets for HIP, protocol 139",
        ));
    }
    if cfg.kernel_enabled() {
        need.push((
            CAP_NET_ADMIN,
            "CAP_NET_ADMIN",
            "XFRM SAs and policies, HIT routes",
        ));
    }
    if cfg.datapath_enabled() {
        need.push((CAP_NET_ADMIN, "CAP_NET_ADMIN", "attaching tc programs"));
        // CAP_BPF since Linux 5.8; before, loading programs needs CAP_SYS_ADMIN.
        if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
            need.push((CAP_BPF, "CAP_BPF", "loading the eBPF programs and maps"));
        }
    }
    let mut out: Vec<String> = Vec::new();
    for (c, name, why) in need {
        if !has(c) && !out.iter().any(|o| o.starts_with(name)) {
            out.push(format!("{name} ({why})"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::parse(
            &format!(
                "identity = \"/k.pem\"\n[sip]\nuser = \"a\"\ndomain = \"d\"\nlisten = [\"udp:192.0.2.1:5060\"]\n{extra}"
            ),
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn names_exactly_what_is_missing() {
        let c = cfg("[datapath]\ninterfaces = [\"eth0\"]\n");
        let all = (1u64 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_BPF);
        assert!(missing(&c, all).is_empty());
        let m = missing(&c, all & !(1 << CAP_NET_RAW));
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("CAP_NET_RAW"), "{m:?}");
        let m = missing(&c, 0);
        assert_eq!(m.len(), 3, "{m:?}");
        // CAP_SYS_ADMIN stands in for CAP_BPF (kernels before 5.8).
        let old = (1u64 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_SYS_ADMIN);
        assert!(missing(&c, old).is_empty());
        // HIP without offload needs raw sockets only.
        let c = cfg("[kernel]\nenabled = false\n");
        assert_eq!(missing(&c, 1 << CAP_NET_RAW), Vec::<String>::new());
    }
}
