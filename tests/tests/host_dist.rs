//! What an operator installs: the systemd unit and the example configuration, and the
//! agent's start-up checks (kernel features, capabilities) as an operator meets them.

use std::{path::PathBuf, process::Command};

use hip_tests::{
    NetNs, agent_bin, new_host_identity,
    sip::{scratch, write_config},
};

fn dist(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(name)
}

#[test]
fn the_systemd_unit_verifies_and_a_broken_one_does_not() {
    let unit = std::fs::read_to_string(dist("hip-agent.service")).unwrap();
    // systemd-analyze checks that ExecStart's binary exists: point it at the build.
    let unit = unit.replace("/usr/local/bin/hip-agent", agent_bin().to_str().unwrap());
    let dir = scratch("unit");
    let good = dir.join("hip-agent.service");
    std::fs::write(&good, &unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The check can fail: a misspelt directive is reported.
    let bad = dir.join("hip-broken.service");
    std::fs::write(&bad, unit.replace("NoNewPrivileges", "NoNewPrivilegez")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NoNewPrivilegez"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_example_configuration_is_valid() {
    let cfg = hip_agent::config::Config::load(&dist("agent.example.toml")).unwrap();
    assert!(cfg.hip_enabled() && cfg.kernel_enabled() && cfg.datapath_enabled());
    assert_eq!(cfg.datapath.interfaces, ["eth0"]);
}

/// Writes a configuration with a fresh identity for an agent in `ns`.
fn config(ns: &NetNs, extra: &str) -> PathBuf {
    let dir = scratch("start");
    let key = new_host_identity(&dir, "id", "ecdsa-p256").unwrap();
    ns.ip(["addr", "add", "10.55.0.1/32", "dev", "lo"]).unwrap();
    let (cfg, _socket) = write_config(
        &dir,
        key.path.to_str().unwrap(),
        "user = \"a\"\ndomain = \"d\"\nlisten = [\"udp:10.55.0.1:5060\"]",
        extra,
    )
    .unwrap();
    cfg
}

#[test]
fn on_a_kernel_without_esp_the_agent_says_so_and_installs_nothing() {
    let ns = NetNs::new("noesp").unwrap();
    let cfg = config(&ns, "[datapath]\nenabled = false\n");
    let out = Command::new(agent_bin())
        .args(["--netns", ns.name(), "run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no ESP support"), "{err}");
    assert!(
        err.contains("[kernel] enabled = false"),
        "the way out is named: {err}"
    );
    // Nothing of the probe or the reconcile stayed behind.
    let st = ns.ip(["xfrm", "state", "list"]).unwrap();
    let po = ns.ip(["xfrm", "policy", "list"]).unwrap();
    assert!(st.stdout.is_empty() && po.stdout.is_empty());
}

#[test]
fn a_missing_capability_is_named_before_anything_starts() {
    let ns = NetNs::new("caps").unwrap();
    let cfg = config(&ns, "[kernel]\nenabled = false\n");
    // Root without CAP_NET_RAW in its bounding set: no raw HIP sockets.
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-net_raw", "--"])
        .arg(agent_bin())
        .args(["--netns", ns.name(), "run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CAP_NET_RAW"), "{err}");
    assert!(
        !err.contains("CAP_NET_ADMIN"),
        "only what is missing: {err}"
    );
}
