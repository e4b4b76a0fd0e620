//! `hip-agent hip listen|connect`: run HIP base exchanges over raw sockets from the CLI
//! (between two network namespaces, for instance), printing one JSON line per event.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use hip_agent::hip_driver::{HipDriver, Sockets, os_rng};
use hip_proto::{
    Hit, HostId,
    crypto::DhGroup,
    endpoint::{Config, Endpoint, Established, Event, Rekeyed, SequentialSpis},
    esp::EspSuite,
    keyfile,
};
use sha2::{Digest, Sha256};

/// HIP base exchange commands.
#[derive(Subcommand)]
pub enum HipCmd {
    /// Answer base exchanges; print each established association as a JSON line.
    Listen {
        #[command(flatten)]
        common: Common,
        /// Accept only initiators with these HITs (repeatable; default: any).
        #[arg(long = "accept-hit")]
        accept: Vec<Hit>,
        /// Exit after this many associations were established (and, with --wait-close,
        /// closed again).
        #[arg(long)]
        count: Option<usize>,
        /// Wait for the peer to close each association before counting it.
        #[arg(long)]
        wait_close: bool,
    },
    /// Run one base exchange with the peer at --locator, or with the host NAME's HIP RR
    /// and address (RFC 8005, DNSSEC-validated); print it as a JSON line.
    Connect {
        #[command(flatten)]
        common: Common,
        /// The peer's DNS name: its HIP RR gives the HIT, its A/AAAA the locator.
        #[arg(conflicts_with_all = ["peer_hit", "locator"])]
        name: Option<String>,
        #[command(flatten)]
        dns: crate::cmd_dns::DnsOpts,
        /// Accept a HIP RR that is not DNSSEC-validated (with NAME).
        #[arg(long)]
        insecure: bool,
        /// The HIT the responder must prove (omit for opportunistic mode).
        #[arg(long)]
        peer_hit: Option<Hit>,
        /// The peer's IP address.
        #[arg(long, required_unless_present = "name")]
        locator: Option<IpAddr>,
        /// Our source address (default: the routed one).
        #[arg(long)]
        local: Option<IpAddr>,
        /// Rekey the ESP SAs once (UPDATE with ESP_INFO) after the exchange.
        #[arg(long)]
        rekey: bool,
        /// Then announce this new local address (UPDATE with LOCATOR_SET, RFC 8046) and
        /// wait until the peer has verified it.
        #[arg(long)]
        move_to: Option<IpAddr>,
        /// Finally close the association (CLOSE / CLOSE_ACK).
        #[arg(long)]
        close: bool,
        /// Send the I1 to the null HIT and check --peer-hit on R1 (what the agent does
        /// for calls, `[hip] i1_to_null_hit`).
        #[arg(long, requires = "peer_hit")]
        i1_to_null_hit: bool,
    },
}

/// What `connect` does after the base exchange, in order.
enum Step {
    Rekey,
    Move(IpAddr),
    Close,
}

/// Starts the next step; `false` when there is none left.
async fn next_step(d: &HipDriver, peer: Hit, steps: &mut Vec<Step>) -> Result<bool> {
    if steps.is_empty() {
        return Ok(false);
    }
    match steps.remove(0) {
        Step::Rekey => d.rekey(peer).await?,
        Step::Move(a) => d.update_locators(peer, a).await?,
        Step::Close => d.close(peer).await?,
    }
    Ok(true)
}

fn locators_json(peer: Hit, local: IpAddr, remote: IpAddr) -> serde_json::Value {
    serde_json::json!({
        "event": "locators_changed",
        "peer_hit": peer.to_string(),
        "local_locator": local.to_string(),
        "peer_locator": remote.to_string(),
    })
}

/// Options shared by `listen` and `connect`.
#[derive(Args)]
pub struct Common {
    /// Host Identity key file (`hip-agent hi new`).
    #[arg(long)]
    key: PathBuf,
    /// DH groups, preferred first (p256, p384, modp3072).
    #[arg(long = "dh", value_delimiter = ',')]
    dh: Vec<String>,
    /// ESP transforms, preferred first (aes128-gcm16, aes128-cbc-hmac-sha256,
    /// aes256-cbc-hmac-sha256, null-hmac-sha256).
    #[arg(long = "esp", value_delimiter = ',')]
    esp: Vec<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// First inbound SPI handed out (until the kernel allocates SPIs).
    #[arg(long, default_value_t = 0x1000_0000)]
    first_spi: u32,
    /// Where our HOST_ID goes in I2 (as `[hip] host_id_in_i2`).
    #[arg(long, value_enum, default_value_t = HostIdPlace::Clear)]
    host_id_in_i2: HostIdPlace,
    /// Put R1_COUNTER into our R1s (as `[hip] r1_counter`).
    #[arg(long)]
    r1_counter: bool,
    /// Puzzle difficulty K in our R1s (as `[hip] puzzle_difficulty`).
    #[arg(long)]
    puzzle_difficulty: Option<u8>,
    /// TEST VECTORS ONLY: draw every DH key, puzzle secret and #J from a ChaCha20 stream
    /// seeded with this number instead of the OS, so that a recorded exchange can be
    /// replayed byte for byte (hip-proto/tests/data/cutehip). Anyone who knows the seed
    /// knows the session keys.
    #[arg(long, hide = true)]
    insecure_rng_seed: Option<u64>,
}

/// `--host-id-in-i2`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum HostIdPlace {
    /// In the clear.
    Clear,
    /// Inside ENCRYPTED.
    Encrypted,
}

fn fingerprint(k: &[u8]) -> String {
    hex::encode(&Sha256::digest(k)[..8])
}

fn hi_name(h: &HostId) -> &'static str {
    h.algorithm_name()
}

fn established_json(e: &Established) -> serde_json::Value {
    serde_json::json!({
        "event": "established",
        "local_hit": e.local_hit.to_string(),
        "peer_hit": e.peer_hit.to_string(),
        "peer_hi_algorithm": hi_name(&e.peer_hi),
        "local_locator": e.local_locator.to_string(),
        "peer_locator": e.peer_locator.to_string(),
        "initiator": e.initiator,
        "esp_transform": e.esp_suite.id(),
        "esp_transform_name": e.esp_suite.name(),
        "dh_group": e.dh_group.id(),
        "spi_inbound": e.spi_inbound,
        "spi_outbound": e.spi_outbound,
        // Fingerprints, not keys: enough to check that both ends agree.
        "key_inbound_enc_sha256": fingerprint(&e.keys_inbound.enc),
        "key_inbound_auth_sha256": fingerprint(&e.keys_inbound.auth),
        "key_outbound_enc_sha256": fingerprint(&e.keys_outbound.enc),
        "key_outbound_auth_sha256": fingerprint(&e.keys_outbound.auth),
    })
}

fn rekeyed_json(r: &Rekeyed) -> serde_json::Value {
    serde_json::json!({
        "event": "rekeyed",
        "peer_hit": r.peer_hit.to_string(),
        "old_spi_inbound": r.old_spi_inbound,
        "old_spi_outbound": r.old_spi_outbound,
        "spi_inbound": r.spi_inbound,
        "spi_outbound": r.spi_outbound,
        "keymat_index": r.keymat_index,
        "outbound_active": r.outbound_active,
        "key_inbound_enc_sha256": fingerprint(&r.keys_inbound.enc),
        "key_outbound_enc_sha256": fingerprint(&r.keys_outbound.enc),
    })
}

fn endpoint(c: &Common) -> Result<Endpoint> {
    let id = keyfile::load(&c.key)?;
    let mut config = Config::default();
    if !c.dh.is_empty() {
        config.dh_groups =
            c.dh.iter()
                .map(|s| DhGroup::from_name(s).with_context(|| format!("unknown DH group {s:?}")))
                .collect::<Result<_>>()?;
    }
    if !c.esp.is_empty() {
        config.esp_suites = c
            .esp
            .iter()
            .map(|s| EspSuite::from_name(s).with_context(|| format!("unknown ESP transform {s:?}")))
            .collect::<Result<_>>()?;
    }
    config.encrypt_host_id = c.host_id_in_i2 == HostIdPlace::Encrypted;
    config.send_r1_counter = c.r1_counter;
    if let Some(k) = c.puzzle_difficulty {
        config.puzzle_difficulty = k;
    }
    let rng: hip_proto::endpoint::BoxRng = match c.insecure_rng_seed {
        Some(seed) => {
            eprintln!("warning: --insecure-rng-seed {seed}: session keys are predictable");
            Box::new(<rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::seed_from_u64(seed))
        }
        None => os_rng()?,
    };
    let mut ep = Endpoint::new(config, id, rng, std::time::Instant::now())?;
    ep.set_spi_allocator(Box::new(SequentialSpis(c.first_spi)));
    Ok(ep)
}

/// Runs a `hip` subcommand.
pub fn run(cmd: HipCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            HipCmd::Listen {
                common,
                accept,
                count,
                wait_close,
            } => {
                let mut ep = endpoint(&common)?;
                if !accept.is_empty() {
                    ep.set_policy(Box::new(move |h: &Hit, _: &HostId| accept.contains(h)));
                }
                let mut d = HipDriver::spawn(ep, Sockets::open()?);
                eprintln!("listening as {}", d.hit());
                let mut done = 0;
                while let Some(ev) = d.next_event().await {
                    match &ev {
                        Event::Established(e) => {
                            println!("{}", established_json(e));
                            if !wait_close {
                                done += 1;
                            }
                        }
                        Event::Rekeyed(r) => println!("{}", rekeyed_json(r)),
                        Event::LocatorsChanged {
                            peer_hit,
                            local_locator,
                            peer_locator,
                            ..
                        } => println!(
                            "{}",
                            locators_json(*peer_hit, *local_locator, *peer_locator)
                        ),
                        Event::Closed { peer_hit, by_peer } => {
                            println!(
                                "{}",
                                serde_json::json!({"event": "closed", "peer_hit": peer_hit.to_string(), "by_peer": by_peer})
                            );
                            if wait_close {
                                done += 1;
                            }
                        }
                        other => eprintln!("{other:?}"),
                    }
                    if count.is_some_and(|c| done >= c) {
                        break;
                    }
                }
                d.shutdown().await?;
                Ok(())
            }
            HipCmd::Connect {
                common,
                name,
                dns,
                insecure,
                peer_hit,
                locator,
                local,
                rekey,
                move_to,
                close,
                i1_to_null_hit,
            } => {
                let mut steps: Vec<Step> = [
                    rekey.then_some(Step::Rekey),
                    move_to.map(Step::Move),
                    close.then_some(Step::Close),
                ]
                .into_iter()
                .flatten()
                .collect();
                let (peer_hit, locator) = match &name {
                    Some(n) => {
                        let (h, a) = crate::cmd_dns::resolve_peer(&dns, n, insecure).await?;
                        (Some(h), a)
                    }
                    None => (peer_hit, locator.context("--locator or NAME is needed")?),
                };
                let ep = endpoint(&common)?;
                let mut d = HipDriver::spawn(ep, Sockets::open()?);
                match peer_hit {
                    Some(h) if i1_to_null_hit => d.initiate_expecting(local, locator, h).await?,
                    _ => d.initiate(local, locator, peer_hit).await?,
                }
                let deadline = tokio::time::Instant::now() + Duration::from_secs(common.timeout);
                let mut established: Option<Hit> = None;
                loop {
                    let ev = tokio::time::timeout_at(deadline, d.next_event())
                        .await
                        .context("timed out waiting for the base exchange")?;
                    match ev {
                        None => bail!("driver stopped"),
                        Some(Event::Established(e)) => {
                            println!("{}", established_json(&e));
                            established = Some(e.peer_hit);
                            if !next_step(&d, e.peer_hit, &mut steps).await? {
                                break;
                            }
                        }
                        Some(Event::Rekeyed(r)) => {
                            println!("{}", rekeyed_json(&r));
                            if !next_step(&d, r.peer_hit, &mut steps).await? {
                                break;
                            }
                        }
                        Some(Event::LocatorsChanged {
                            peer_hit,
                            local_locator,
                            peer_locator,
                            ..
                        }) => {
                            println!("{}", locators_json(peer_hit, local_locator, peer_locator));
                            if !next_step(&d, peer_hit, &mut steps).await? {
                                break;
                            }
                        }
                        Some(Event::Closed { peer_hit, by_peer }) if established == Some(peer_hit) => {
                            println!(
                                "{}",
                                serde_json::json!({"event": "closed", "peer_hit": peer_hit.to_string(), "by_peer": by_peer})
                            );
                            break;
                        }
                        Some(Event::Failed { error, .. }) => bail!("base exchange failed: {error}"),
                        Some(other) => eprintln!("{other:?}"),
                    }
                }
                d.shutdown().await?;
                Ok(())
            }
        }
    })
}
