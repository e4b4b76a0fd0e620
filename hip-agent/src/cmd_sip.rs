//! CLI for the SIP side: `run` (the daemon), `call`, `hangup`, `answer`, `status`, `hits`
//! (clients of the control socket) and the offline `sdp inspect`.

use std::{io::Read as _, path::PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use hip_agent::{
    config::Config,
    control::{self, Request},
    daemon::{self, Daemon},
};
use serde_json::Value;

/// Default control socket, overridable by `--socket` or `HIP_CONTROL_SOCKET`.
pub const SOCKET: &str = "/run/hip/agent.sock";

#[derive(Subcommand)]
pub enum SipCmd {
    /// Run the agent daemon (SIP user agent, known-HITs pool, control socket).
    Run {
        /// TOML configuration file.
        #[arg(long, short, env = "HIP_CONFIG")]
        config: PathBuf,
    },
    /// Place a call to a SIP URI; prints the call handle.
    Call {
        /// `sip:user@host` or `sips:…`.
        uri: String,
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = SOCKET)]
        socket: PathBuf,
    },
    /// Hang up a call (CANCEL, BYE or decline, whichever fits).
    Hangup {
        /// Call handle (from `call` or `status`).
        call: u64,
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = SOCKET)]
        socket: PathBuf,
    },
    /// Answer a ringing incoming call (answer mode `manual`).
    Answer {
        /// Call handle.
        call: u64,
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = SOCKET)]
        socket: PathBuf,
    },
    /// Agent status: identity, registration, calls, counters.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = SOCKET)]
        socket: PathBuf,
    },
    /// The known-HITs pool: peer URI ↔ HIT(s).
    Hits {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = SOCKET)]
        socket: PathBuf,
    },
    /// HIP associations: peer HIT, state, SPIs, locators, transform, errors.
    Assoc {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "HIP_CONTROL_SOCKET", default_value = SOCKET)]
        socket: PathBuf,
    },
    /// Offline SDP tools.
    #[command(subcommand)]
    Sdp(SdpCmd),
}

#[derive(Subcommand)]
pub enum SdpCmd {
    /// List the Host Identities in an SDP body (stdin, or FILE): where and in which form.
    Inspect {
        #[arg(long)]
        json: bool,
        /// Read this file instead of stdin.
        file: Option<PathBuf>,
    },
}

/// Sends `req` to the agent; an `{"ok": false}` reply becomes the error.
pub fn ask(socket: &std::path::Path, req: Request) -> Result<Value> {
    let v = control::request(socket, &req)?;
    if v.get("ok") != Some(&Value::Bool(true)) {
        bail!(
            "{}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
        );
    }
    Ok(v)
}

pub fn run(cmd: SipCmd) -> Result<()> {
    match cmd {
        SipCmd::Run { config } => {
            let cfg = Config::load(&config)?;
            if let Some(caps) = hip_agent::privileges::effective() {
                let m = hip_agent::privileges::missing(&cfg, caps);
                if !m.is_empty() {
                    bail!(
                        "missing capabilities for this configuration: {} (run as root, or grant them; see dist/hip-agent.service)",
                        m.join(", ")
                    );
                }
            }
            // Multi-threaded: the HIP endpoint's SPI allocator blocks on a netlink request
            // (`block_in_place`), which needs another worker to keep the loop going.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let d = Daemon::new(cfg).await?;
                let shutdown = async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("SIGTERM handler");
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                };
                d.run(shutdown).await?;
                anyhow::Ok(())
            })?;
        }
        SipCmd::Call { uri, socket } => {
            let v = ask(&socket, Request::Call { uri })?;
            println!("{}", v["call"]);
        }
        SipCmd::Hangup { call, socket } => {
            ask(&socket, Request::Hangup { call })?;
        }
        SipCmd::Answer { call, socket } => {
            ask(&socket, Request::Answer { call })?;
        }
        SipCmd::Status { json, socket } => {
            let v = ask(&socket, Request::Status)?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "{}  HIT {}",
                    v["aor"].as_str().unwrap_or(""),
                    v["hit"].as_str().unwrap_or("")
                );
                println!("listen: {}", v["listen"]);
                let r = &v["registration"];
                println!(
                    "registration: {}",
                    if r["registered"] == Value::Bool(true) {
                        format!("registered (expires {})", r["expires"])
                    } else {
                        format!("not registered {}", r["error"].as_str().unwrap_or(""))
                    }
                );
                for c in v["calls"].as_array().into_iter().flatten() {
                    println!(
                        "call {} {} {} {} ({})",
                        c["handle"],
                        c["direction"].as_str().unwrap_or(""),
                        c["state"].as_str().unwrap_or(""),
                        c["remote_uri"].as_str().unwrap_or(""),
                        c["call_id"].as_str().unwrap_or("")
                    );
                    print_security(&c["security"]);
                }
                if !v["edge"].is_null() {
                    println!(
                        "edge: listen {} next hop {}",
                        v["edge"]["listen"],
                        v["edge"]["next_hop"].as_str().unwrap_or("")
                    );
                }
                for c in v["edge"]["calls"].as_array().into_iter().flatten() {
                    let sec = &c["security"];
                    println!(
                        "edge call {} {} {}: {}{}",
                        if c["phone_is_caller"] == Value::Bool(true) {
                            "to"
                        } else {
                            "from"
                        },
                        c["remote_uri"].as_str().unwrap_or(""),
                        c["call_id"].as_str().unwrap_or(""),
                        if c["unprotected"] == Value::Bool(true) {
                            "NOT PROTECTED".to_owned()
                        } else {
                            sec["verification"].as_str().unwrap_or("pending").to_owned()
                        },
                        sec["sas"]
                            .as_str()
                            .map_or(String::new(), |s| format!(", SAS {s}"))
                    );
                }
                let ended = v["ended_calls"].as_array().map_or(0, Vec::len);
                if ended > 0 {
                    println!("{ended} ended call(s) kept in `status --json`");
                }
                println!("stats: {}", v["stats"]);
            }
        }
        SipCmd::Hits { json, socket } => {
            let v = ask(&socket, Request::Hits)?;
            if json {
                println!("{}", v["hits"]);
            } else {
                for e in v["hits"].as_array().into_iter().flatten() {
                    let hits: Vec<&str> = e["identities"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i["hit"].as_str())
                        .collect();
                    println!(
                        "{}  {}  (call {})",
                        e["peer_uri"].as_str().unwrap_or(""),
                        hits.join(", "),
                        e["call_id"].as_str().unwrap_or("")
                    );
                }
            }
        }
        SipCmd::Assoc { json, socket } => {
            let v = ask(&socket, Request::Assoc)?;
            if json {
                println!("{}", v["associations"]);
            } else {
                for a in v["associations"].as_array().into_iter().flatten() {
                    print_assoc(a);
                }
            }
        }
        SipCmd::Sdp(SdpCmd::Inspect { json, file }) => {
            let body = match file {
                Some(f) => std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
                None => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
            };
            let (sdp, ids) = daemon::identities_in(&body).context("SDP rejected")?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"media": sdp.media_count(), "identities": ids})
                );
            } else if ids.is_empty() {
                println!(
                    "no Host Identity in {} media description(s)",
                    sdp.media_count()
                );
            } else {
                for i in ids {
                    let scope = match i.scope {
                        hip_sip::sdp::Scope::Session => "session".to_owned(),
                        hip_sip::sdp::Scope::Media(m) => {
                            format!("media {m} ({})", sdp.media_line(m).unwrap_or(""))
                        }
                    };
                    let form = match i.form {
                        hip_sip::sdp::Form::K => "k=",
                        hip_sip::sdp::Form::KeyMgmt => "a=key-mgmt:",
                    };
                    let kind = if i.hi.is_some() { "HI" } else { "HIT" };
                    println!(
                        "line {}: {kind} {} ({}) in {scope}, form {form}",
                        i.line,
                        i.hit,
                        i.hit.to_hex()
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_security(s: &Value) {
    if s.is_null() {
        return;
    }
    println!(
        "  verification {}  SAS {}  peer HIT(s) {}",
        s["verification"].as_str().unwrap_or("?"),
        s["sas"].as_str().unwrap_or("-"),
        s["peer_hits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    print_sip_assurance(&s["sip_assurance"]);
    if let Some(f) = s["failure"].as_str() {
        println!("  FAILED: {f}");
    }
    if let Some(r) = s["refused"].as_str() {
        println!("  REFUSED: {r}");
    }
    for a in s["associations"].as_array().into_iter().flatten() {
        print_assoc(a);
    }
    for f in s["flows"].as_array().into_iter().flatten() {
        println!(
            "  flow [{}]:{} -> [{}]:{} ssrc {:#x}: {} packets, {} lost, jitter {:.2} ms, spi {:#x}",
            f["src_hit"].as_str().unwrap_or(""),
            f["src_port"],
            f["dst_hit"].as_str().unwrap_or(""),
            f["dst_port"],
            f["ssrc"].as_u64().unwrap_or(0),
            f["packets"],
            f["lost"],
            f["jitter_ms"].as_f64().unwrap_or(0.0),
            f["spi"].as_u64().unwrap_or(0)
        );
    }
}

/// What vouched for each HIT on the signalling path (the draft's §4).
fn print_sip_assurance(a: &Value) {
    if a.is_null() {
        return;
    }
    for (who, flag, via, detail, yes, no) in [
        (
            "peer HIT",
            "peer_authenticated",
            "peer_via",
            "peer_detail",
            "authenticated",
            "not authenticated",
        ),
        (
            "our HIT ",
            "own_protected",
            "own_via",
            "own_detail",
            "protected",
            "not protected",
        ),
    ] {
        let state = if a[flag] == Value::Bool(true) {
            match a[via].as_str() {
                Some(v) => format!(
                    "{yes} ({})",
                    if v == "sips" { "SIPS" } else { "SIP Identity" }
                ),
                None => yes.to_owned(),
            }
        } else {
            no.to_owned()
        };
        match a[detail].as_str() {
            Some(d) => println!("  {who} {state}: {d}"),
            None => println!("  {who} {state}"),
        }
    }
    if let Some(c) = a["caveat"].as_str() {
        println!("  caveat: {c}");
    }
}

fn print_assoc(a: &Value) {
    let k = &a["kernel"];
    println!(
        "  HIP {} {} peer {} at {}{}",
        a["state"].as_str().unwrap_or("?"),
        if a["initiator"] == Value::Bool(true) {
            "(initiator)"
        } else {
            "(responder)"
        },
        a["peer_hit"].as_str().unwrap_or(""),
        a["peer_locator"].as_str().unwrap_or("?"),
        if k.is_null() {
            String::new()
        } else {
            format!(
                ", {} SPI in {:#x} out {:#x} reqid {:#x}",
                k["transform"].as_str().unwrap_or(""),
                k["spi_in"].as_u64().unwrap_or(0),
                k["spi_out"].as_u64().unwrap_or(0),
                k["reqid"].as_u64().unwrap_or(0)
            )
        }
    );
    if let Some(e) = a["error"].as_str() {
        println!("    error: {e}");
    }
}
