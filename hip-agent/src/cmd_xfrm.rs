//! `hip-agent xfrm`: inspect and drive hip's XFRM objects.
//!
//! * `hip-agent xfrm [--json]` lists the SAs and policies hip owns (reqid/priority
//!   ranges of `hip_kernel::owner`), grouped by association with the peer HIT and, if
//!   the known-HITs pool knows it, the peer's SIP URI. `ip xfrm state` and
//!   `ip xfrm policy` show the same objects.
//! * `hip-agent xfrm install --spec FILE [--hold]` reconciles the kernel to exactly the
//!   associations in FILE (JSON: `{"associations": [...], "guard": {...} | null}`),
//!   printing what it removed; with `--hold` it then stays running and prints kernel
//!   events as JSON lines (used by the SIGKILL/restart test, and handy for debugging).
//! * `hip-agent xfrm bench` times installing N associations through netlink against one
//!   `ip xfrm` command per object (needs a kernel with ESP: run it in the VM).

use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv6Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hip_kernel::{
    AssociationParams, Guard, KernelIpsec, Owned, PolicyAction, PolicyDir, PolicyEntry, SaEntry,
    XfrmNetlink, reconcile,
};
use serde::{Deserialize, Serialize};

/// `hip-agent xfrm`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct XfrmArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The agent's known-HITs pool, to name each association's SIP URI.
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

/// Finds the SIP URI for a HIT (the known-HITs pool); the lead wires `pool.rs` in here.
pub type UriLookup<'a> = &'a dyn Fn(&Ipv6Addr) -> Option<String>;

/// Runs `hip-agent xfrm …` in the current network namespace.
pub fn run(args: XfrmArgs, uris: UriLookup<'_>) -> Result<()> {
    match args.cmd {
        None => list(args.json, uris),
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

#[derive(Serialize)]
struct AssocView {
    reqid: u32,
    local_hit: Option<Ipv6Addr>,
    peer_hit: Option<Ipv6Addr>,
    sip_uri: Option<String>,
    sas: Vec<SaView>,
    policies: Vec<PolicyEntry>,
}

impl AssocView {
    fn new(reqid: u32) -> Self {
        Self {
            reqid,
            local_hit: None,
            peer_hit: None,
            sip_uri: None,
            sas: vec![],
            policies: vec![],
        }
    }
}

#[derive(Serialize)]
struct SaView {
    direction: Option<&'static str>,
    #[serde(flatten)]
    sa: SaEntry,
}

#[derive(Serialize)]
struct ListView {
    associations: Vec<AssocView>,
    /// hip's policies that belong to no association (per-peer blocks left alone, guard).
    other_policies: Vec<PolicyEntry>,
}

/// Groups hip's objects by association (reqid; block policies join by peer HIT).
fn view(o: Owned, uris: UriLookup<'_>) -> ListView {
    let mut by: BTreeMap<u32, AssocView> = BTreeMap::new();
    let mut others = Vec::new();
    for p in &o.policies {
        if let PolicyAction::Ipsec { reqid, .. } = p.params.action {
            let a = by.entry(reqid.0).or_insert_with(|| AssocView::new(reqid.0));
            if p.params.id.dir == PolicyDir::Out {
                a.local_hit = Some(p.params.id.src.addr);
                a.peer_hit = Some(p.params.id.dst.addr);
            }
            a.policies.push(p.clone());
        }
    }
    for s in o.sas {
        let a = by
            .entry(s.reqid.0)
            .or_insert_with(|| AssocView::new(s.reqid.0));
        let direction = match (s.hits, a.local_hit) {
            (Some(h), Some(l)) if h.src == l => Some("out"),
            (Some(h), Some(l)) if h.dst == l => Some("in"),
            _ => None,
        };
        a.sas.push(SaView { direction, sa: s });
    }
    // Block policies carry no reqid: attach a per-peer block (a /128 on one side) to the
    // association with that peer HIT.
    for p in o.policies {
        if matches!(p.params.action, PolicyAction::Ipsec { .. }) {
            continue;
        }
        let (s, d) = (p.params.id.src, p.params.id.dst);
        let peer = match p.params.id.dir {
            PolicyDir::Out if d.len == 128 && s.len == 0 => Some(d.addr),
            PolicyDir::In if s.len == 128 && d.len == 0 => Some(s.addr),
            _ => None,
        };
        match peer.and_then(|h| by.values_mut().find(|a| a.peer_hit == Some(h))) {
            Some(a) => a.policies.push(p),
            None => others.push(p),
        }
    }
    for a in by.values_mut() {
        a.sip_uri = a.peer_hit.as_ref().and_then(uris);
    }
    ListView {
        associations: by.into_values().collect(),
        other_policies: others,
    }
}

fn list(json: bool, uris: UriLookup<'_>) -> Result<()> {
    let rt = runtime()?;
    let owned = rt.block_on(async { XfrmNetlink::new()?.list_owned().await })?;
    let v = view(owned, uris);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if v.associations.is_empty() && v.other_policies.is_empty() {
        println!("no XFRM objects of hip's");
    }
    for a in &v.associations {
        let hit = |h: Option<Ipv6Addr>| h.map_or("?".to_owned(), |h| h.to_string());
        println!(
            "association reqid {:#x}: {} -> {}{}",
            a.reqid,
            hit(a.local_hit),
            hit(a.peer_hit),
            a.sip_uri
                .as_ref()
                .map(|u| format!(" ({u})"))
                .unwrap_or_default()
        );
        for s in &a.sas {
            println!(
                "  SA {:<3} {} -> {} spi {:#010x} {} {} packets {} bytes",
                s.direction.unwrap_or("?"),
                s.sa.src,
                s.sa.id.dst,
                s.sa.id.spi,
                s.sa.transform.map_or("larval", |t| t.name()),
                s.sa.packets,
                s.sa.bytes
            );
        }
        for p in &a.policies {
            println!(
                "  policy {} {:?} priority {:#x}",
                p.params.id, p.params.action, p.params.priority
            );
        }
    }
    for p in &v.other_policies {
        println!(
            "policy {} {:?} priority {:#x}",
            p.params.id, p.params.action, p.params.priority
        );
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
