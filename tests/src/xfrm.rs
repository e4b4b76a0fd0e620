//! XFRM test fixtures shared by `host_xfrm`, `vm_xfrm`, `vm_harness` and `vm_datapath`:
//! the HITs and locators of the two-namespace topology, hip's netlink handles opened
//! inside a namespace, and BEET SAs, policies, HIT addresses and routes set with `ip`
//! (iproute2, independent of hip's own netlink code), read back as `ip xfrm` lists them.
//!
//! The fixtures panic on failure, like the tests that call them.

use std::time::Duration;

use hip_kernel::{Events, HitRoutes, KernelEvent, KernelIpsec, XfrmNetlink};
use tokio::runtime::Runtime;

use crate::NetNs;

/// Host A's HIT (an ORCHIDv2 address, 2001:20::/28).
pub const HIT_A: &str = "2001:20::a";
/// Host B's HIT.
pub const HIT_B: &str = "2001:20::b";
/// Host A's locator (on `va`).
pub const LOC_A: &str = "2001:db8::1";
/// Host B's locator (on `vb`).
pub const LOC_B: &str = "2001:db8::2";

/// The hmac(sha256) key of SAs the tests add by hand (`auth-trunc … 128`).
pub const TEST_AUTH_KEY: &str =
    "0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20";
/// The cbc(aes) key of SAs the tests add by hand.
pub const TEST_ENC_KEY: &str = "0xa0a1a2a3a4a5a6a7a8a9aaabacadaeaf";

/// A tokio runtime with one worker for hip's netlink connections.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A netlink XFRM connection whose socket lives in `ns`.
pub fn xfrm_in(ns: &NetNs, rt: &Runtime) -> XfrmNetlink {
    ns.run_in(|| {
        let _g = rt.enter();
        XfrmNetlink::new().unwrap()
    })
    .unwrap()
}

/// The kernel's XFRM events (acquire, expire, deletions) in `ns`, through `k`.
pub fn events_in(ns: &NetNs, rt: &Runtime, k: &XfrmNetlink) -> Events {
    ns.run_in(|| {
        let _g = rt.enter();
        k.subscribe().unwrap()
    })
    .unwrap()
}

/// hip's rtnetlink helpers (HIT addresses, routes to peer HITs) with their socket in `ns`.
pub fn hit_routes_in(ns: &NetNs, rt: &Runtime) -> HitRoutes {
    ns.run_in(|| {
        let _g = rt.enter();
        HitRoutes::new().unwrap()
    })
    .unwrap()
}

/// What `ip xfrm WHAT list` prints in `ns` (`WHAT`: `state` or `policy`).
pub fn xfrm_list(ns: &NetNs, what: &str) -> String {
    String::from_utf8_lossy(&ns.ip(["xfrm", what, "list"]).unwrap().stdout).into_owned()
}

/// How many objects `ip xfrm WHAT list` shows in `ns` (each starts with a `src …` line).
pub fn xfrm_list_len(ns: &NetNs, what: &str) -> usize {
    xfrm_list(ns, what)
        .lines()
        .filter(|l| l.starts_with("src "))
        .count()
}

/// `ip xfrm state add` of a BEET-mode ESP SA from `locators.0` to `locators.1` whose
/// selector is the host pair `hits` (/128 each), with hmac(sha256) and cbc(aes) keys
/// `keys` (hex, `0x…`).
pub fn add_beet_sa(
    ns: &NetNs,
    locators: (&str, &str),
    spi: u32,
    reqid: u32,
    hits: (&str, &str),
    keys: (&str, &str),
) {
    let (spi, reqid) = (format!("{spi:#x}"), reqid.to_string());
    let (sel_src, sel_dst) = (format!("{}/128", hits.0), format!("{}/128", hits.1));
    ns.ip([
        "xfrm",
        "state",
        "add",
        "src",
        locators.0,
        "dst",
        locators.1,
        "proto",
        "esp",
        "spi",
        &spi,
        "reqid",
        &reqid,
        "mode",
        "beet",
        "sel",
        "src",
        &sel_src,
        "dst",
        &sel_dst,
        "auth-trunc",
        "hmac(sha256)",
        keys.0,
        "128",
        "enc",
        "cbc(aes)",
        keys.1,
    ])
    .unwrap();
}

/// `ip xfrm policy OP` (`add` or `update`) in direction `dir` for host pair `hits`
/// (/128 each) through a BEET ESP template between the locators `tmpl`.
pub fn beet_policy(
    ns: &NetNs,
    op: &str,
    dir: &str,
    hits: (&str, &str),
    tmpl: (&str, &str),
    reqid: u32,
) {
    let (src, dst) = (format!("{}/128", hits.0), format!("{}/128", hits.1));
    ns.ip([
        "xfrm",
        "policy",
        op,
        "src",
        &src,
        "dst",
        &dst,
        "dir",
        dir,
        "tmpl",
        "src",
        tmpl.0,
        "dst",
        tmpl.1,
        "proto",
        "esp",
        "mode",
        "beet",
        "reqid",
        &reqid.to_string(),
    ])
    .unwrap();
}

/// With `ip`: `hit`/128 on `lo`, and a route to `peer_hit`/128 via the peer's locator
/// on `ifc` with `hit` as source address (what hip's `HitRoutes` does by netlink).
pub fn add_hit_and_route_with_ip(ns: &NetNs, ifc: &str, hit: &str, peer_hit: &str, peer_loc: &str) {
    ns.ip(["addr", "add", &format!("{hit}/128"), "dev", "lo"])
        .unwrap();
    ns.ip([
        "route",
        "add",
        &format!("{peer_hit}/128"),
        "via",
        peer_loc,
        "dev",
        ifc,
        "src",
        hit,
    ])
    .unwrap();
}

/// Waits up to `timeout` for the first event of `ev` that matches `f` (earlier ones are
/// passed over); panics naming `what` if none comes or the stream ends.
pub fn wait_event(
    rt: &Runtime,
    ev: &mut Events,
    timeout: Duration,
    what: &str,
    f: impl Fn(&KernelEvent) -> bool,
) -> KernelEvent {
    rt.block_on(async {
        tokio::time::timeout(timeout, async {
            loop {
                let e = ev.next().await.expect("event stream open");
                if f(&e) {
                    return e;
                }
            }
        })
        .await
    })
    .unwrap_or_else(|_| panic!("no {what} event within {timeout:?}"))
}
