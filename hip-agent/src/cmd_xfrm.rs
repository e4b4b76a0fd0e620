//! `hip-agent xfrm`: inspect and drive hip's XFRM objects.
//!
//! * `hip-agent xfrm [--json] [--direct]` lists the SAs and policies hip owns
//!   (reqid/priority ranges of `hip_kernel::owner`), grouped by association with the peer
//!   HIT and, if the known-HITs pool knows it, the peer's SIP URI — as the running agent
//!   reports them over its control socket, or with `--direct` as this process reads them
//!   from the kernel. `ip xfrm state` and `ip xfrm policy` show the same objects.
//! * `hip-agent xfrm install --spec FILE [--hold]` reconciles the kernel to exactly the
//!   associations in FILE (JSON: `{"associations": [...], "guard": {...} | null}`),
//!   printing what it removed; with `--hold` it then stays running and prints kernel
//!   events as JSON lines (used by the SIGKILL/restart test, and handy for debugging).
//! * `hip-agent xfrm bench` times installing N associations through netlink against one
//!   `ip xfrm` command per object (needs a kernel with ESP: run it in the VM).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hip_agent::{
    control::Request,
    inspect::{self, XfrmView},
};
use hip_kernel::{AssociationParams, Guard, KernelIpsec, XfrmNetlink, reconcile};
use serde::{Deserialize, Serialize};

use crate::cmd_sip::ask;

/// `hip-agent xfrm`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct XfrmArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Read the kernel's objects instead of asking the agent (works without a running
    /// agent; SIP URIs then come from `--pool`).
    #[arg(long)]
    direct: bool,
    /// The agent's control socket.
    #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = crate::cmd_sip::SOCKET)]
    socket: PathBuf,
    /// The known-HITs pool that names each association's SIP URI (with `--direct`).
    #[arg(
        long,
        global = true,
        env = "HIP_POOL",
        default_value = "/var/lib/hip/pool.json"
    )]
    pub pool: PathBuf,
    #[command(subcommand)]
    cmd: Option<XfrmCmd>,
}

#[derive(Subcommand, Debug)]
enum XfrmCmd {
    /// Reconcile the kernel to exactly the associations of a spec file.
    Install {
        /// JSON file: `{"associations": [AssociationParams…], "guard": Guard | null}`.
        #[arg(long)]
        spec: PathBuf,
        /// Keep running afterwards, printing kernel events as JSON lines.
        #[arg(long)]
        hold: bool,
    },
    /// Benchmark installing N associations via netlink vs one `ip xfrm` per object.
    Bench {
        /// Association counts (repeatable).
        #[arg(long = "n", default_values_t = [1000usize, 10000])]
        sizes: Vec<usize>,
        /// The `ip` baseline installs at most this many associations and is
        /// extrapolated linearly beyond (one process per object is slow under TCG).
        #[arg(long, default_value_t = usize::MAX)]
        ip_limit: usize,
        /// Install only the 2 policies per association (runs without ESP, on the host).
        #[arg(long)]
        policies_only: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `install --spec` reads.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct XfrmSpec {
    /// The live associations.
    #[serde(default)]
    pub associations: Vec<AssociationParams>,
    /// The prefix guard, if the agent runs with `FailClosed::Guard`.
    #[serde(default)]
    pub guard: Option<Guard>,
}

/// Runs `hip-agent xfrm …` in the current network namespace.
pub fn run(args: XfrmArgs) -> Result<()> {
    match args.cmd {
        None => list(&args),
        Some(XfrmCmd::Install { spec, hold }) => install(&spec, hold),
        Some(XfrmCmd::Bench {
            sizes,
            ip_limit,
            policies_only,
            json,
        }) => bench(&sizes, ip_limit, policies_only, json),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn list(args: &XfrmArgs) -> Result<()> {
    let v: XfrmView = if args.direct {
        let owned = runtime()?.block_on(async { XfrmNetlink::new()?.list_owned().await })?;
        // The pool binds peer HITs to SIP URIs; a missing or unreadable pool only leaves
        // the URIs out.
        let pool = hip_agent::pool::Pool::open(&args.pool).ok();
        inspect::xfrm_view(owned, |hit| pool.as_ref()?.peer_uri(hit))
    } else {
        let mut v = ask(&args.socket, Request::Xfrm).context(
            "asking the agent for its XFRM objects (`--direct` reads the kernel without one)",
        )?;
        serde_json::from_value(v["xfrm"].take()).context("the agent's XFRM listing")?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", inspect::xfrm_text(&v));
    }
    Ok(())
}

fn read_spec(path: &Path) -> Result<XfrmSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let spec: XfrmSpec =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for a in &spec.associations {
        a.keys.inbound.validate()?;
        a.keys.outbound.validate()?;
    }
    Ok(spec)
}

fn install(spec: &Path, hold: bool) -> Result<()> {
    let spec = read_spec(spec)?;
    let rt = runtime()?;
    rt.block_on(async {
        let k = XfrmNetlink::new()?;
        // Subscribe before changing anything so no event of ours is missed.
        let mut events = if hold { Some(k.subscribe()?) } else { None };
        let report = reconcile(&k, &spec.associations, spec.guard.as_ref()).await?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            serde_json::json!({"ready": true, "reconcile": report})
        )?;
        out.flush()?;
        drop(out);
        let Some(ev) = events.as_mut() else {
            return Ok(());
        };
        while let Some(e) = ev.next().await {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
            out.flush()?;
        }
        bail!("the kernel event socket closed")
    })
}

fn bench(sizes: &[usize], ip_limit: usize, policies_only: bool, json: bool) -> Result<()> {
    let shape = if policies_only {
        hip_kernel::bench::Shape::PoliciesOnly
    } else {
        hip_kernel::bench::Shape::Full
    };
    let rows = hip_kernel::bench::run(sizes, ip_limit, shape).map_err(anyhow::Error::msg)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    for r in &rows {
        println!(
            "xfrm install {:?} N={:>6} ({} objects): netlink {:.3} s ({:.1} µs/assoc), ip xfrm {:.3} s \
             ({:.1} µs/assoc{}), ratio {:.1}x",
            r.shape,
            r.n,
            r.objects,
            r.netlink_secs,
            r.netlink_us_per_assoc,
            r.ip_secs,
            r.ip_us_per_assoc,
            if r.ip_sampled < r.n {
                format!(", extrapolated from {}", r.ip_sampled)
            } else {
                String::new()
            },
            r.ratio
        );
    }
    Ok(())
}
