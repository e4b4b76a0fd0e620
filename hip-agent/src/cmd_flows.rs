//! `hip-agent flows [--json] [--direct]`: the flow table (from the agent, or read from
//! the pinned maps), and
//! `hip-agent datapath run`: the datapath alone in the foreground (load, attach, wait
//! for SIGINT/SIGTERM, detach and unpin), as the agent runs it.

use std::{ops::RangeInclusive, path::Path};

use anyhow::{Context, Result, bail};
use hip_agent::{control::Request, inspect};
use hip_datapath::{Datapath, DatapathOptions, Flow, Maps, MediaConfig};

use crate::cmd_sip::ask;

/// Prints the flow table: the agent's (over its control socket), or with `direct` the
/// one pinned under that directory.
pub fn flows(direct: Option<&Path>, socket: &Path, json: bool) -> Result<()> {
    let flows: Vec<Flow> = match direct {
        Some(pin_dir) => Maps::open_pinned(pin_dir)
            .with_context(|| format!("opening the maps pinned under {}", pin_dir.display()))?
            .flows()?,
        None => {
            let mut v = ask(socket, Request::Flows).context(
                "asking the agent for its flow table (`--direct` reads the pinned maps without one)",
            )?;
            serde_json::from_value(v["flows"].take()).context("the agent's flow table")?
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&flows)?);
    } else {
        print!("{}", inspect::flows_text(&flows));
    }
    Ok(())
}

/// Parses `LOW-HIGH` (inclusive) for `--media-ports`.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>> {
    let (lo, hi) = s
        .split_once('-')
        .with_context(|| format!("port range {s:?}: expected LOW-HIGH"))?;
    let (lo, hi): (u16, u16) = (lo.trim().parse()?, hi.trim().parse()?);
    if lo == 0 || lo > hi {
        bail!("port range {s:?}: need 1 <= LOW <= HIGH");
    }
    Ok(lo..=hi)
}

/// Runs the datapath in the foreground until SIGINT or SIGTERM: cleans up what a
/// killed earlier run left, loads, attaches to `ifaces`, prints `ready` on stdout,
/// prints each datapath event as a JSON line, and detaches and unpins on the signal.
pub fn run(ifaces: Vec<String>, pin_dir: &Path, guard: bool, ports: &str) -> Result<()> {
    let opts = DatapathOptions {
        interfaces: ifaces,
        pin_dir: pin_dir.to_owned(),
        media: MediaConfig {
            guard,
            ports: parse_port_range(ports)?,
            ..MediaConfig::default()
        },
    };
    // Block the signals before anything else so that they are only ever taken by
    // `sigtimedwait` below (this process has a single thread).
    // SAFETY: plain libc calls on a local, initialised sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mut dp = Datapath::start(&opts).context("starting the datapath")?;
    let mut events = dp.events()?;
    println!("ready");
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: valid set and timespec; a null siginfo pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        for ev in events.drain() {
            println!("{}", serde_json::to_string(&ev)?);
        }
        dp.flush_logs();
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            break;
        }
    }
    drop(events);
    dp.shutdown().context("detaching the datapath")?;
    println!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("16384-32767").unwrap(), 16384..=32767);
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("20-10").is_err());
        assert!(parse_port_range("abc").is_err());
    }
}
