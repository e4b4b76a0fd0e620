//! `hip-agent`: the root agent and its operator CLI.

mod cmd_dns;
mod cmd_flows;
mod cmd_hi;
mod cmd_hip;
mod cmd_sip;
mod cmd_xfrm;

// `--cfg fuzzing` swaps hip-proto's signatures and ECDH for hash stand-ins
// (`hip_proto::crypto::fuzzing`): never in an agent.
#[cfg(fuzzing)]
compile_error!("hip-agent must not be built with `--cfg fuzzing` (hip-proto's crypto stand-ins)");

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hip_datapath::{Datapath, Direction};

#[derive(Parser)]
#[command(
    name = "hip-agent",
    version,
    about = "SIP calls secured with HIP, media kept in the kernel"
)]
struct Cli {
    /// Run in this network namespace (`/run/netns/NAME`) without changing the mount namespace.
    #[arg(long, global = true, env = "HIP_NETNS")]
    netns: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load, attach, inspect and unload the eBPF datapath.
    #[command(subcommand)]
    Datapath(DatapathCmd),
    /// List hip's XFRM SAs and policies (`--json`), reconcile to a spec, or benchmark.
    Xfrm(cmd_xfrm::XfrmArgs),
    /// Print the eBPF datapath's RTP flow table (asks the agent; `--direct` reads the maps).
    Flows {
        /// Read the maps pinned under `--pin-dir` instead of asking the agent (works
        /// without a running agent, e.g. after `datapath attach`).
        #[arg(long)]
        direct: bool,
        /// Where the maps are pinned (with `--direct`).
        #[arg(long, default_value = hip_datapath::PIN_DIR, env = "HIP_PIN_DIR")]
        pin_dir: PathBuf,
        /// The agent's control socket.
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = cmd_sip::SOCKET)]
        socket: PathBuf,
        /// JSON array of flows (fields of `hip_datapath::Flow`).
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Sip(cmd_sip::SipCmd),
    /// Host Identities: generate, show, import the legacy XML format.
    #[command(subcommand)]
    Hi(cmd_hi::HiCmd),
    /// HIP base exchanges over raw sockets (listen / connect).
    #[command(subcommand)]
    Hip(cmd_hip::HipCmd),
    /// Host Identities in DNS (RFC 8005): publish, withdraw, show, lookup.
    #[command(subcommand)]
    Dns(cmd_dns::DnsCmd),
}

#[derive(Subcommand)]
enum DatapathCmd {
    /// Load the programs, attach them to IFACE and pin the maps (persisting after exit).
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = hip_datapath::PIN_DIR, env = "HIP_PIN_DIR")]
        pin_dir: PathBuf,
        /// UDP port counted as UDP-encapsulated ESP (0 = ESP over IP only).
        ///
        /// `datapath attach` reads no agent configuration file (no `datapath`
        /// subcommand does), so this option stands in for what the daemon writes from
        /// `[hip]`: its `udp_port` (default 10500, RFC 9028 §4.1), or 0 with
        /// `udp = "never"`.
        #[arg(long, default_value_t = hip_common::HIP_UDP_PORT, value_name = "PORT")]
        esp_udp_port: u16,
    },
    /// Detach the programs from IFACE and remove the pins.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = hip_datapath::PIN_DIR, env = "HIP_PIN_DIR")]
        pin_dir: PathBuf,
    },
    /// Run the datapath in the foreground until SIGINT/SIGTERM, then detach and unpin
    /// (cleans up what a killed earlier run left first).
    Run {
        /// Interface to attach to (repeatable).
        #[arg(long, required = true)]
        iface: Vec<String>,
        #[arg(long, default_value = hip_datapath::PIN_DIR, env = "HIP_PIN_DIR")]
        pin_dir: PathBuf,
        /// Turn the media guard off.
        #[arg(long)]
        no_guard: bool,
        /// UDP ports carrying RTP, LOW-HIGH.
        #[arg(long, default_value = "16384-32767")]
        media_ports: String,
    },
    /// Print the interface counters from the pinned maps.
    Stats {
        #[arg(long, default_value = hip_datapath::PIN_DIR, env = "HIP_PIN_DIR")]
        pin_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HIP_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(ns) = &cli.netns {
        hip_agent::netns::enter(ns)?;
    }
    match cli.cmd {
        Cmd::Xfrm(a) => cmd_xfrm::run(a)?,
        Cmd::Datapath(DatapathCmd::Attach {
            iface,
            pin_dir,
            esp_udp_port,
        }) => {
            let mut dp = Datapath::load(&pin_dir).context("loading the datapath")?;
            // Before attaching, so that the programs count ESP in UDP from the first
            // packet; the rest of the configuration stays zeroed (guard off, no RTP).
            dp.set_esp_udp_port(esp_udp_port)
                .context("writing the datapath's ESP-in-UDP port")?;
            let links = dp
                .attach_persistent(&iface)
                .with_context(|| format!("attaching to {iface}"))?;
            println!(
                "attached {} and {} to {iface} ({}); maps pinned under {}",
                hip_common::PROG_TC_INGRESS,
                hip_common::PROG_TC_EGRESS,
                if hip_datapath::tc_uses_tcx() {
                    "tcx"
                } else {
                    "netlink clsact"
                },
                pin_dir.display()
            );
            for l in links {
                println!("link pinned at {}", l.display());
            }
            // The maps stay pinned and the programs attached; this process may exit.
            std::mem::forget(dp);
        }
        Cmd::Flows {
            direct,
            pin_dir,
            socket,
            json,
        } => cmd_flows::flows(direct.then_some(pin_dir.as_path()), &socket, json)?,
        Cmd::Sip(c) => cmd_sip::run(c)?,
        Cmd::Hi(c) => cmd_hi::run(c)?,
        Cmd::Hip(c) => cmd_hip::run(c)?,
        Cmd::Dns(c) => cmd_dns::run(c)?,
        Cmd::Datapath(DatapathCmd::Run {
            iface,
            pin_dir,
            no_guard,
            media_ports,
        }) => cmd_flows::run(iface, &pin_dir, !no_guard, &media_ports)?,
        Cmd::Datapath(DatapathCmd::Detach { iface, pin_dir }) => {
            hip_datapath::unload(&iface, &pin_dir)?;
            println!("detached from {iface}; removed {}", pin_dir.display());
        }
        Cmd::Datapath(DatapathCmd::Stats { pin_dir, json }) => {
            let ing = hip_datapath::read_pinned_counters(&pin_dir, Direction::Ingress)?;
            let eg = hip_datapath::read_pinned_counters(&pin_dir, Direction::Egress)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ingress": {"packets": ing.packets, "bytes": ing.bytes},
                        "egress": {"packets": eg.packets, "bytes": eg.bytes},
                    })
                );
            } else {
                println!("ingress: {} packets, {} bytes", ing.packets, ing.bytes);
                println!("egress:  {} packets, {} bytes", eg.packets, eg.bytes);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn attach_port(args: &[&str]) -> u16 {
        let cli = Cli::try_parse_from(
            ["hip-agent", "datapath", "attach", "--iface", "eth0"]
                .iter()
                .chain(args),
        )
        .unwrap();
        match cli.cmd {
            Cmd::Datapath(DatapathCmd::Attach { esp_udp_port, .. }) => esp_udp_port,
            _ => panic!("not datapath attach"),
        }
    }

    #[test]
    fn attach_counts_esp_in_udp_where_the_daemon_would() {
        // The daemon's default `[hip] udp_port`.
        assert_eq!(attach_port(&[]), hip_proto::endpoint::HIP_UDP_PORT);
        assert_eq!(attach_port(&[]), 10500);
        assert_eq!(attach_port(&["--esp-udp-port", "4500"]), 4500);
        // `udp = "never"`.
        assert_eq!(attach_port(&["--esp-udp-port", "0"]), 0);
        assert!(
            Cli::try_parse_from([
                "hip-agent",
                "datapath",
                "attach",
                "--iface",
                "eth0",
                "--esp-udp-port",
                "70000"
            ])
            .is_err()
        );
    }
}
