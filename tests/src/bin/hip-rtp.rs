//! A small RTP sender/receiver for the demo and the end-to-end tests: the media
//! endpoints are ordinary processes, never the agent.
//!
//! ```text
//! hip-rtp send --netns NS --from [HIT]:PORT --to [HIT]:PORT --count N [--interval-ms 20] [--ssrc X]
//! hip-rtp recv --netns NS --bind [HIT]:PORT --count N [--timeout-s 20] [--until-seq S] [--idle-ms MS]
//! ```
//!
//! Packets are RTP version 2, payload type 0 (PCMU), 160 payload octets whose content is
//! derived from the sequence number, so the receiver can tell that every packet arrived
//! intact; `recv` prints one JSON line with what it got.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    /// Network namespace to run in.
    #[arg(long, global = true)]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send an RTP stream.
    Send {
        #[arg(long)]
        from: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u32,
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        #[arg(long, default_value_t = 0x4849_5050)]
        ssrc: u32,
        /// Keep going when a send fails (e.g. EPERM while a fail-closed policy blocks the
        /// peer HIT before its SAs exist): for measuring when media starts to flow.
        #[arg(long)]
        ignore_errors: bool,
    },
    /// Receive an RTP stream and report it as JSON.
    Recv {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 20)]
        timeout_s: u64,
        /// Print `ready` once bound (for scripts waiting on it).
        #[arg(long)]
        announce: bool,
        /// Also stop when the packet with this sequence number (the stream's last) has
        /// arrived, for streams that may lose packets on the way.
        #[arg(long)]
        until_seq: Option<u16>,
        /// Also stop when, after the first packet, none has come for this long (the
        /// sender was stopped): for streams of unknown length.
        #[arg(long)]
        idle_ms: Option<u64>,
    },
}

const PAYLOAD: usize = 160;

fn payload(seq: u16) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    p
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(ns) = &cli.netns {
        hip_tests::enter_netns(ns)?;
    }
    match cli.cmd {
        Cmd::Send {
            from,
            to,
            count,
            interval_ms,
            ssrc,
            ignore_errors,
        } => {
            let s = UdpSocket::bind(from).with_context(|| format!("bind {from}"))?;
            let start = Instant::now();
            for i in 0..count {
                let seq = i as u16;
                let ts = i.wrapping_mul(160);
                let mut pkt = Vec::with_capacity(12 + PAYLOAD);
                pkt.extend_from_slice(&[0x80, 0x00]);
                pkt.extend_from_slice(&seq.to_be_bytes());
                pkt.extend_from_slice(&ts.to_be_bytes());
                pkt.extend_from_slice(&ssrc.to_be_bytes());
                pkt.extend_from_slice(&payload(seq));
                match s.send_to(&pkt, to) {
                    Ok(_) => {}
                    Err(_) if ignore_errors => {}
                    Err(e) => bail!("send to {to}: {e}"),
                }
                let due = start + Duration::from_millis(interval_ms * u64::from(i + 1));
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            println!("{{\"sent\":{count},\"ssrc\":{ssrc}}}");
        }
        Cmd::Recv {
            bind,
            count,
            timeout_s,
            announce,
            until_seq,
            idle_ms,
        } => {
            let s = UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))?;
            if announce {
                println!("ready");
            }
            let deadline = Instant::now() + Duration::from_secs(timeout_s);
            let (mut got, mut intact, mut in_order, mut last) = (0u32, 0u32, true, None::<u16>);
            let mut from = None;
            let mut first_ms = None;
            let mut ssrcs = Vec::new();
            let mut buf = [0u8; 2048];
            // The longest silence between two arrivals, and when it ended (unix ms): a
            // handover's media gap. Sequence numbers seen, for the packets never received.
            let (mut prev_at, mut max_gap, mut gap_end_ms) =
                (None::<Instant>, Duration::ZERO, None);
            let mut seen = std::collections::BTreeSet::new();
            let mut first_seq = None;
            while got < count {
                let mut left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if let Some(idle) = idle_ms.filter(|_| got > 0) {
                    left = left.min(Duration::from_millis(idle));
                }
                s.set_read_timeout(Some(left))?;
                let (n, src) = match s.recv_from(&mut buf) {
                    Ok(x) => x,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break;
                    }
                    Err(e) => bail!("recv: {e}"),
                };
                if n < 12 || buf[0] >> 6 != 2 {
                    continue;
                }
                got += 1;
                from = Some(src);
                let now = Instant::now();
                if let Some(p) = prev_at
                    && now - p > max_gap
                {
                    max_gap = now - p;
                    gap_end_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64);
                }
                prev_at = Some(now);
                first_ms.get_or_insert_with(|| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                });
                let seq = u16::from_be_bytes([buf[2], buf[3]]);
                let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                first_seq.get_or_insert(seq);
                seen.insert(seq.wrapping_sub(first_seq.unwrap_or(seq)));
                if !ssrcs.contains(&ssrc) {
                    ssrcs.push(ssrc);
                }
                if n == 12 + PAYLOAD && buf[12..n] == payload(seq) {
                    intact += 1;
                }
                if last.is_some_and(|l| seq != l.wrapping_add(1)) {
                    in_order = false;
                }
                last = Some(seq);
                if until_seq == Some(seq) {
                    break;
                }
            }
            println!(
                "{}",
                serde_json::json!({
                    "received": got, "intact": intact, "in_order": in_order,
                    "from": from.map(|f| f.to_string()), "ssrcs": ssrcs,
                    "first_ms": first_ms,
                    "last_seq": last,
                    "max_gap_ms": max_gap.as_secs_f64() * 1e3,
                    "max_gap_end_ms": gap_end_ms,
                    // Between the first and the last packet (16-bit offsets from the
                    // first: streams here are shorter than 65,536 packets).
                    "missing": seen.last().map_or(0, |l| u32::from(*l) + 1 - seen.len() as u32),
                })
            );
        }
    }
    Ok(())
}
