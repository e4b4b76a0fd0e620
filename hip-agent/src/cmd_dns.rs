//! `hip-agent dns publish|withdraw|show|lookup`: Host Identities in DNS (RFC 8005) from the
//! command line, with the `[dns]` table of the agent's configuration (or flags).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hip_agent::{config::Config, dns_verify};
use hip_dns::{Lookup, Resolver, Validation, client};
use serde_json::json;

/// Where lookups go and how they are validated.
#[derive(Args, Clone)]
pub struct DnsOpts {
    /// The agent's configuration (its `[dns]` table, and `identity` for publishing).
    #[arg(long, env = "HIP_CONFIG")]
    pub config: Option<PathBuf>,
    /// DNS server to ask (overrides `[dns] resolver`/`server`).
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// DNSSEC trust anchor file (DNSKEY records; overrides `[dns] trust_anchor`).
    #[arg(long)]
    pub trust_anchor: Option<PathBuf>,
    /// Deadline of the whole lookup, milliseconds (default `[dns] timeout_ms`, or 2000).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
}

/// `dns` subcommands.
#[derive(Subcommand)]
pub enum DnsCmd {
    /// Publish our HIP RR (replacing the HIP RRset at `[dns] name`), TSIG-signed.
    Publish {
        /// The agent's configuration.
        #[arg(long, env = "HIP_CONFIG")]
        config: PathBuf,
    },
    /// Remove the HIP RRset at `[dns] name`.
    Withdraw {
        /// The agent's configuration.
        #[arg(long, env = "HIP_CONFIG")]
        config: PathBuf,
    },
    /// The record we publish, and what DNS has at our name now.
    Show {
        /// The agent's configuration.
        #[arg(long, env = "HIP_CONFIG")]
        config: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Look NAME up: HI, HIT (checked against the HI), rendezvous servers, addresses, and
    /// the DNSSEC validation state.
    Lookup {
        /// The name.
        name: String,
        #[command(flatten)]
        opts: DnsOpts,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

fn load(config: &std::path::Path) -> Result<(Config, hip_agent::config::DnsSection)> {
    let cfg = Config::load(config)?;
    let dns = cfg
        .dns
        .clone()
        .with_context(|| format!("{}: no [dns] table", config.display()))?;
    Ok((cfg, dns))
}

/// The resolver for `opts`.
pub fn resolver(opts: &DnsOpts) -> Result<Resolver> {
    let section = match &opts.config {
        Some(p) => Some(load(p)?.1),
        None => None,
    };
    let mut r = match &section {
        Some(s) => dns_verify::resolver(s).map_err(anyhow::Error::msg)?,
        None => Resolver {
            server: opts
                .server
                .context("give --server (or --config with a [dns] table)")?,
            trust_anchor: None,
            timeout: Duration::from_millis(2000),
        },
    };
    if let Some(s) = opts.server {
        r.server = s;
    }
    if let Some(t) = &opts.trust_anchor {
        r.trust_anchor = Some(client::load_trust_anchor(t)?);
    }
    if let Some(ms) = opts.timeout_ms {
        r.timeout = Duration::from_millis(ms);
    }
    Ok(r)
}

/// A lookup as JSON.
pub fn lookup_json(l: &Lookup) -> serde_json::Value {
    let hip: Vec<_> = l
        .hip
        .iter()
        .map(|a| {
            let (hi, hit_ok, error) = match &a.verified {
                Ok((hi, _)) => (Some(hi.algorithm_name()), true, None),
                Err(e) => (None, false, Some(e.to_string())),
            };
            json!({
                "hit": hex_hit(&a.rdata.hit),
                "pk_algorithm": a.rdata.pk_algorithm,
                "hi_algorithm": hi,
                "public_key": base64_of(&a.rdata.public_key),
                "hit_matches_hi": hit_ok,
                "error": error,
                "rendezvous_servers": a.rdata.rendezvous_servers.iter().map(|n| n.to_ascii()).collect::<Vec<_>>(),
                "ttl": a.ttl,
            })
        })
        .collect();
    json!({
        "name": l.name.to_ascii(),
        "validation": l.validation,
        "hip": hip,
        "addresses": l.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "addresses_validation": l.addresses_validation,
    })
}

fn hex_hit(h: &[u8]) -> String {
    match <[u8; 16]>::try_from(h) {
        Ok(b) => std::net::Ipv6Addr::from(b).to_string(),
        Err(_) => hex::encode(h),
    }
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn print_lookup(l: &Lookup) {
    println!("{} (DNSSEC: {})", l.name.to_ascii(), l.validation.as_str());
    if l.hip.is_empty() {
        println!("  no HIP RR");
    }
    for a in &l.hip {
        match &a.verified {
            Ok((hi, hit)) => println!("  HIT {hit} (matches its {} HI)", hi.algorithm_name()),
            Err(e) => println!("  HIT {} REFUSED: {e}", hex_hit(&a.rdata.hit)),
        }
        for r in &a.rdata.rendezvous_servers {
            println!("  rendezvous server {}", r.to_ascii());
        }
    }
    for a in &l.addresses {
        println!(
            "  address {a} (DNSSEC: {})",
            l.addresses_validation.as_str()
        );
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs a `dns` subcommand.
pub fn run(cmd: DnsCmd) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        match cmd {
            DnsCmd::Publish { config } => {
                let (cfg, dns) = load(&config)?;
                let key = cfg
                    .identity
                    .as_deref()
                    .context("publishing needs `identity` (the record carries the HI)")?;
                let hi = dns_verify::load_host_id(key).map_err(anyhow::Error::msg)?;
                let rd = dns_verify::own_record(&dns, &hi).map_err(anyhow::Error::msg)?;
                let target = dns_verify::update_target(&dns).map_err(anyhow::Error::msg)?;
                let name = dns_verify::name(dns.name.as_deref().context("[dns] name is not set")?)
                    .map_err(anyhow::Error::msg)?;
                client::publish(&target, &name, dns.ttl, &rd).await?;
                println!(
                    "published {} {} IN HIP {}",
                    name.to_ascii(),
                    dns.ttl,
                    rd.to_presentation()
                );
            }
            DnsCmd::Withdraw { config } => {
                let (_, dns) = load(&config)?;
                let target = dns_verify::update_target(&dns).map_err(anyhow::Error::msg)?;
                let name = dns_verify::name(dns.name.as_deref().context("[dns] name is not set")?)
                    .map_err(anyhow::Error::msg)?;
                client::withdraw(&target, &name).await?;
                println!("withdrew the HIP RRset at {}", name.to_ascii());
            }
            DnsCmd::Show { config, json } => {
                let (cfg, dns) = load(&config)?;
                let name = dns_verify::name(dns.name.as_deref().context("[dns] name is not set")?)
                    .map_err(anyhow::Error::msg)?;
                let ours = match cfg.identity.as_deref() {
                    Some(k) => {
                        let hi = dns_verify::load_host_id(k).map_err(anyhow::Error::msg)?;
                        Some(dns_verify::own_record(&dns, &hi).map_err(anyhow::Error::msg)?)
                    }
                    None => None,
                };
                let r = dns_verify::resolver(&dns).map_err(anyhow::Error::msg)?;
                let now = r.lookup(&name).await;
                let published = match (&now, &ours) {
                    (Ok(l), Some(o)) => l.hip.iter().any(|a| a.rdata == *o),
                    _ => false,
                };
                if json {
                    println!(
                        "{}",
                        json!({
                            "name": name.to_ascii(),
                            "record": ours.as_ref().map(|o| o.to_presentation()),
                            "published": published,
                            "in_dns": now.as_ref().map(lookup_json).ok(),
                            "error": now.as_ref().err().map(|e| e.to_string()),
                        })
                    );
                } else {
                    if let Some(o) = &ours {
                        println!(
                            "our record: {} {} IN HIP {}",
                            name.to_ascii(),
                            dns.ttl,
                            o.to_presentation()
                        );
                    }
                    match &now {
                        Ok(l) => {
                            print_lookup(l);
                            println!("published: {}", if published { "yes" } else { "no" });
                        }
                        Err(e) => println!("in DNS: {e}"),
                    }
                }
            }
            DnsCmd::Lookup { name, opts, json } => {
                let r = resolver(&opts)?;
                let n = dns_verify::name(&name).map_err(anyhow::Error::msg)?;
                let l = r.lookup(&n).await?;
                if json {
                    println!("{}", lookup_json(&l));
                } else {
                    print_lookup(&l);
                }
            }
        }
        Ok(())
    })
}

/// For `hip connect NAME`: the peer's HIT (from a HIP RR whose HIT matches its HI) and its
/// first address. Unless `insecure`, the HIP RR must be DNSSEC-validated.
pub async fn resolve_peer(
    opts: &DnsOpts,
    name: &str,
    insecure: bool,
) -> Result<(hip_proto::Hit, std::net::IpAddr)> {
    let r = resolver(opts)?;
    let n = dns_verify::name(name).map_err(anyhow::Error::msg)?;
    let l = r.lookup(&n).await?;
    if l.validation != Validation::Secure && !insecure {
        bail!(
            "the HIP RR at {name} is {} (not DNSSEC-validated); configure a trust anchor, or pass --insecure",
            l.validation.as_str()
        );
    }
    let hit = l
        .hip
        .iter()
        .find_map(|a| a.verified.as_ref().ok().map(|(_, h)| *h))
        .with_context(|| format!("no usable HIP RR at {name}"))?;
    let addr = *l
        .addresses
        .first()
        .with_context(|| format!("no A/AAAA record at {name}"))?;
    eprintln!(
        "{name}: HIT {hit}, address {addr} (DNSSEC: {})",
        l.validation.as_str()
    );
    Ok((hit, addr))
}
