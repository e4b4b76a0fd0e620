//! `hip-handover-bench [MOVES]` (issue 16 item 4): the media gap when a host moves
//! mid-call and HIP moves the call (RFC 8046 UPDATE with LOCATOR_SET, the SAs re-added at
//! the new addresses), without any SIP re-INVITE.
//!
//! The draft's trapezoid (`call::Scenario`): alice calls bob, RTP flows both ways between
//! the HITs every 5 ms; then alice's host changes address (the new one added, the old one
//! removed, as a DHCP renumbering or a network change does). Per move, in each direction:
//! the time from the old address's removal to the first packet after the gap (the
//! receiver's clock and this process's are the same machine's), the longest silence, and
//! the packets never received. Repeated MOVES times (default 3), each to a fresh address.
//!
//! Not measured here (yet): the same move done the way plain SIP would (a re-INVITE with
//! a new `c=` through the proxies), the draft's §1 comparison; and an XFRM_MSG_MIGRATE
//! variant of the SA move.
//!
//! Needs root and ESP (`cargo xtask bench` runs it in the VM). Prints a table and a JSON line.

use std::{
    io::BufRead,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hip_tests::call::{self, Options, Scenario};
use serde_json::{Value, json};

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A receiver of one direction's stream: started, announced, read back when it ends.
struct Rx {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Rx {
    fn start(ns: &str, bind: &str) -> Result<Self> {
        let mut child = Command::new(hip_tests::rtp_bin())
            .args(["--netns", ns, "recv", "--announce", "--bind", bind])
            .args([
                "--count",
                "1000000",
                "--timeout-s",
                "300",
                "--idle-ms",
                "1500",
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("receiver said {line:?}");
        }
        Ok(Self { child, out })
    }

    fn report(mut self) -> Result<Value> {
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        self.child.wait()?;
        serde_json::from_str(line.trim()).with_context(|| format!("receiver said {line:?}"))
    }
}

fn sender(ns: &str, from: &str, to: &str) -> Result<Child> {
    Ok(Command::new(hip_tests::rtp_bin())
        .args([
            "--netns",
            ns,
            "send",
            "--ignore-errors",
            "--interval-ms",
            "5",
        ])
        .args(["--count", "60000", "--from", from, "--to", to])
        .stdout(Stdio::null())
        .spawn()?)
}

fn stop(mut c: Child) -> Result<()> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    c.wait()?;
    Ok(())
}

fn flow_packets(sec: &Value) -> u64 {
    sec["flows"]
        .as_array()
        .and_then(|f| f.iter().filter_map(|f| f["packets"].as_u64()).max())
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let moves: u32 = std::env::args()
        .nth(1)
        .map_or(Ok(3), |a| a.parse())
        .context("MOVES")?;
    let s = Scenario::start(&Options {
        ring_ms: Some(0),
        ..Options::default()
    })?;
    s.call()?;
    s.wait_established()?;
    let (_, bob_port) = s.bob_media()?;
    let alice_at = format!("[{}]:{}", s.alice_hit, call::RTP_PORT);
    let bob_at = format!("[{}]:{bob_port}", s.bob_hit);
    // Each side sends from the next RTP port pair: the receiver holds the announced one.
    let alice_from = format!("[{}]:{}", s.alice_hit, call::RTP_PORT + 2);
    let bob_from = format!("[{}]:{}", s.bob_hit, bob_port + 2);
    let (an, bn) = (s.alice_ns().name().to_owned(), s.bob_ns().name().to_owned());
    s.alice_ns().exec(
        "sysctl",
        ["-qw", "net.ipv4.conf.valice.promote_secondaries=1"],
    )?;
    println!("handover: alice's address changes mid-call; HIP UPDATE moves the call, no re-INVITE");
    println!(
        "{:>5} {:>14} {:>10} {:>8} {:>14} {:>10} {:>8}",
        "move", "b→a resumed", "b→a gap", "b→a lost", "a→b resumed", "a→b gap", "a→b lost"
    );
    let mut old = call::ALICE_IP.to_owned();
    let mut rows = Vec::new();
    for k in 0..moves {
        let new = format!("192.0.2.{}", 11 + k);
        let rx_a = Rx::start(&an, &alice_at)?;
        let rx_b = Rx::start(&bn, &bob_at)?;
        let tx_b = sender(&bn, &bob_from, &alice_at)?;
        let tx_a = sender(&an, &alice_from, &bob_at)?;
        let before = flow_packets(&Scenario::wait_call_security(
            &s.alice,
            "media before the move",
            Duration::from_secs(60),
            |sec| flow_packets(sec) >= 100,
        )?);
        s.alice_ns()
            .ip(["addr", "add", &format!("{new}/24"), "dev", "valice"])?;
        s.alice_ns()
            .ip(["addr", "del", &format!("{old}/24"), "dev", "valice"])?;
        // The old address is gone when `ip` returns (a little after the kernel's change:
        // the figure errs short by that much, not long by a process start).
        let t_move = unix_ms();
        Scenario::wait_call_security(
            &s.bob,
            "bob to follow alice",
            Duration::from_secs(60),
            |sec| sec["associations"][0]["kernel"]["peer_locator"] == new.as_str(),
        )?;
        Scenario::wait_call_security(
            &s.alice,
            "media after the move",
            Duration::from_secs(60),
            |sec| flow_packets(sec) >= before + 200,
        )?;
        stop(tx_a)?;
        stop(tx_b)?;
        let (ra, rb) = (rx_a.report()?, rx_b.report()?);
        let resumed = |r: &Value| {
            r["max_gap_end_ms"]
                .as_u64()
                .map_or(f64::NAN, |e| e as f64 - t_move as f64)
        };
        let row = json!({
            "move": k + 1, "from": old, "to": new,
            "bob_to_alice": {"resumed_ms": resumed(&ra), "max_gap_ms": ra["max_gap_ms"], "lost": ra["missing"], "received": ra["received"]},
            "alice_to_bob": {"resumed_ms": resumed(&rb), "max_gap_ms": rb["max_gap_ms"], "lost": rb["missing"], "received": rb["received"]},
        });
        println!(
            "{:>5} {:>11.0} ms {:>7.0} ms {:>8} {:>11.0} ms {:>7.0} ms {:>8}",
            k + 1,
            resumed(&ra),
            ra["max_gap_ms"].as_f64().unwrap_or(f64::NAN),
            ra["missing"],
            resumed(&rb),
            rb["max_gap_ms"].as_f64().unwrap_or(f64::NAN),
            rb["missing"],
        );
        rows.push(row);
        old = new;
    }
    println!(
        "(resumed: from the old address's removal to the first packet after the longest silence; gap: that silence; lost: packets never received; RTP every 5 ms)"
    );
    println!("{}", json!({"bench": "handover", "moves": rows}));
    Ok(())
}
