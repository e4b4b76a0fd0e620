//! A call between two unmodified softphones, each behind its own hip agent in edge mode,
//! through the draft's Kamailio trapezoid (issue 15): what `vm_phones` asserts and what
//! `cargo xtask demo` shows. baresip at alice plays 1000 Hz, baresip at bob 1500 Hz; each
//! records what it receives. Needs root and a kernel with ESP (the VM).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    NetNs,
    call::{self, Packet, xfrm_counts},
    new_host_identity,
    phone::{
        Baresip, LinphoneConfig, Linphonec, PhoneConfig, ToneReport, md5_proxies, tone_report,
        write_tone,
    },
    sip::{Agent, Trapezoid, scratch},
    wait_until,
};

/// What one phone call showed.
#[derive(Debug)]
pub struct EdgeCall {
    /// alice's and bob's edge call (`status.edge.calls[0]`) once its SAs were in the kernel.
    pub alice: Value,
    pub bob: Value,
    /// bob's tone (1500 Hz) in alice's recording, alice's (1000 Hz) in bob's.
    pub at_alice: ToneReport,
    pub at_bob: ToneReport,
    /// Whether each phone's SIP trace holds the MESSAGE with the level and its SAS.
    pub sas_shown: [bool; 2],
    /// (SAs, policies) in alice's and bob's namespace after the hang-up.
    pub kernel_after: [(usize, usize); 2],
    /// Routes to the peer's HIT left after the hang-up, both hosts.
    pub routes_left: Vec<String>,
    /// eBPF flow map entries left after the hang-up, both agents.
    pub flows_left: usize,
    /// SPIs seen between the hosts, and those the agents reported.
    pub spis_on_wire: BTreeSet<u32>,
    pub spis_reported: BTreeSet<u32>,
    /// ESP packets between the hosts.
    pub esp_packets: usize,
    /// Packets between the hosts that are neither SIP, HIP nor ESP.
    pub clear: Vec<Packet>,
    /// The phones' logs (baresip's console and SIP trace).
    pub phone_logs: [String; 2],
}

fn agent(
    ns: &NetNs,
    dir: &Path,
    who: &str,
    domain: &str,
    ip: &str,
    proxy: &str,
    extra: &str,
) -> Result<Agent> {
    let key = new_host_identity(dir, who, "ecdsa-p256")?.path;
    let pin = format!("/sys/fs/bpf/hip-test-{}", ns.name());
    Agent::start(
        ns,
        key.to_str().context("key path")?,
        &format!("user = \"{who}\"\ndomain = \"{domain}\"\nlisten = [\"udp:{ip}:5060\"]"),
        &format!(
            "{extra}[datapath]\ninterfaces = [\"v{who}\"]\npin_dir = \"{pin}\"\n\
             [edge]\nlisten = [\"udp:[::1]:5070\", \"udp:{ip}:5070\"]\nclients = [\"::1\"]\n\
             next_hop = \"udp:{proxy}:5060\"\n"
        ),
    )
}

/// Both agents of the trapezoid, alice's and bob's, with `extra` configuration each.
fn agents(t: &Trapezoid, dir: &Path, extra: (&str, &str)) -> Result<(Agent, Agent)> {
    Ok((
        agent(
            &t.hosts[0],
            dir,
            "alice",
            "atlanta.com",
            call::ALICE_IP,
            "192.0.2.2",
            extra.0,
        )?,
        agent(
            &t.hosts[3],
            dir,
            "bob",
            "biloxi.com",
            call::BOB_IP,
            "192.0.2.3",
            extra.1,
        )?,
    ))
}

/// What the kernels and agents hold after a call's hang-up.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// (SAs, policies) in alice's and bob's namespace.
    pub kernel: [(usize, usize); 2],
    /// Routes to the peer's HIT, both hosts.
    pub routes: Vec<String>,
    /// eBPF flow map entries, both agents.
    pub flows: usize,
}

/// Waits for both agents to end their edge call, then reads what is left of it (`a`, `b`:
/// the call blocks, for the peer HITs).
fn after_hangup(
    t: &Trapezoid,
    alice: &Agent,
    bob: &Agent,
    a: &Value,
    b: &Value,
) -> Result<Leftovers> {
    for ag in [alice, bob] {
        wait_until(Duration::from_secs(60), "the edge call to end", || {
            ag.status()["edge"]["calls"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        })
        .with_context(|| ag.log())?;
    }
    let mut left = Leftovers::default();
    for (i, (ns, peer)) in [
        (&t.hosts[0], &a["peer_hits"][0]),
        (&t.hosts[3], &b["peer_hits"][0]),
    ]
    .into_iter()
    .enumerate()
    {
        // Teardown is asynchronous to the BYE: wait for it, then read what is left.
        let _ = wait_until(Duration::from_secs(30), "SAs and policies removed", || {
            (xfrm_counts(ns).ok()? == (0, 0)).then_some(())
        });
        left.kernel[i] = xfrm_counts(ns)?;
        let routes = ns.exec("ip", ["-6", "route", "show", "table", "all"])?;
        let peer = peer.as_str().unwrap_or("?");
        left.routes.extend(
            String::from_utf8_lossy(&routes.stdout)
                .lines()
                .filter(|l| l.starts_with(peer))
                .map(|l| format!("{}: {l}", ns.name())),
        );
    }
    left.flows = [alice, bob]
        .iter()
        .map(|ag| ag.json(&["flows", "--json"]).as_array().map_or(0, Vec::len))
        .sum();
    Ok(left)
}

/// What went between alice's and bob's hosts.
#[derive(Debug, Default)]
pub struct Wire {
    /// SPIs seen between the hosts.
    pub spis: BTreeSet<u32>,
    /// ESP packets between the hosts.
    pub esp_packets: usize,
    /// Packets between the hosts that are neither SIP, HIP nor ESP.
    pub clear: Vec<Packet>,
}

fn stop_capture(mut capture: std::process::Child, pcap: &Path) -> Result<Wire> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(capture.id() as i32, libc::SIGINT) };
    capture.wait()?;
    let direct: Vec<Packet> = call::read_pcap(pcap)?
        .into_iter()
        .filter(|p| {
            let ends = [p.src.as_str(), p.dst.as_str()];
            ends.contains(&call::ALICE_IP) && ends.contains(&call::BOB_IP)
        })
        .collect();
    Ok(Wire {
        spis: direct.iter().filter_map(|p| p.spi).collect(),
        esp_packets: direct.iter().filter(|p| p.proto == 50).count(),
        clear: direct
            .into_iter()
            .filter(|p| {
                let sip = p.proto == 17
                    && [5060, 5070]
                        .iter()
                        .any(|port| p.sport == *port || p.dport == *port);
                p.proto != 50 && p.proto != 139 && !sip
            })
            .collect(),
    })
}

/// The SPIs of a call block's association.
fn spis_of(c: &Value) -> impl Iterator<Item = u32> + '_ {
    let k = &c["security"]["association"]["kernel"];
    [&k["spi_out"], &k["spi_in"]]
        .into_iter()
        .filter_map(|v| v.as_u64())
        .map(|v| v as u32)
}

/// The edge call's block once its association is in the kernel.
fn established(a: &Agent) -> Result<Value> {
    wait_until(Duration::from_secs(120), "the edge call's SAs", || {
        let st = a.status();
        let c = st["edge"]["calls"].as_array()?.first()?.clone();
        (!c["security"]["association"]["kernel"].is_null()).then_some(c)
    })
    .with_context(|| a.log())
}

fn phone<'a>(who: &'a str, domain: &'a str, tone: &'a Path, auto: bool) -> PhoneConfig<'a> {
    PhoneConfig {
        user: who,
        domain,
        password: if who == "alice" { "alice-pw" } else { "bob-pw" },
        outbound: "[::1]:5070",
        listen: "[::1]:5062",
        media_ip: "::1",
        tone,
        auto_answer: auto,
        commands: &[],
        quit_after: None,
    }
}

/// bob's baresip (auto-answer, playing `tone`), once registered through bob's agent.
fn bob_baresip(t: &Trapezoid, dir: &Path, tone: &Path, bob: &Agent) -> Result<Baresip> {
    let bp = Baresip::start(
        &t.hosts[3],
        &dir.join("bob-phone"),
        &phone("bob", "biloxi.com", tone, true),
    )?;
    wait_until(Duration::from_secs(120), "bob's phone registered", || {
        bp.log().contains("200 OK (kamailio").then_some(())
    })
    .with_context(|| format!("{}\n{}", bp.log(), bob.log()))?;
    Ok(bp)
}

/// Builds the trapezoid, registers bob's phone, lets alice's phone dial bob, talks for
/// `talk` of media counted from when the SAs are in, hangs up at alice's phone and reports.
/// `Err` only when the call could not be made at all; what it showed is for the caller to
/// judge.
pub fn baresip_to_baresip(talk: Duration) -> Result<EdgeCall> {
    let t = Trapezoid::new()?;
    let dir = scratch("phones");
    let (capture, pcap) = call::capture_bridge(&t, &dir)?;
    md5_proxies(&t, &dir, "")?;
    let (alice, bob) = agents(&t, &dir, ("", ""))?;
    let (a_tone, b_tone) = (dir.join("alice-1000.wav"), dir.join("bob-1500.wav"));
    let secs = u32::try_from(talk.as_secs())
        .unwrap_or(u32::MAX)
        .saturating_add(50);
    write_tone(&a_tone, 1000.0, secs)?;
    write_tone(&b_tone, 1500.0, secs)?;

    let mut bp = bob_baresip(&t, &dir, &b_tone, &bob)?;
    let mut cfg = phone("alice", "atlanta.com", &a_tone, false);
    let dial = ["/dial sip:bob@biloxi.com"];
    cfg.commands = &dial;
    let mut ap = Baresip::start(&t.hosts[0], &dir.join("alice-phone"), &cfg)?;

    let (a, b) = (established(&alice)?, established(&bob)?);
    let talk_from = std::time::Instant::now();
    wait_until(talk + Duration::from_secs(30), "the talk", || {
        (talk_from.elapsed() >= talk).then_some(())
    })?;
    ap.stop(); // alice hangs up: baresip ends its call with BYE when it quits
    let left = after_hangup(&t, &alice, &bob, &a, &b)?;
    bp.stop();

    let heard = |who: &str, p: &Baresip, hz: f64| -> Result<ToneReport> {
        let wav = p
            .received()
            .with_context(|| format!("{who}'s phone recorded nothing:\n{}", p.log()))?;
        tone_report(&wav, hz)
    };
    let at_bob = heard("bob", &bp, 1000.0)?;
    let at_alice = heard("alice", &ap, 1500.0)?;
    let sas_shown = [(&ap, &a), (&bp, &b)].map(|(p, sec)| {
        sec["security"]["sas"].as_str().is_some_and(|sas| {
            p.log().contains(&format!(
                "verification unverified; short authentication string {sas}"
            ))
        })
    });

    let wire = stop_capture(capture, &pcap)?;
    Ok(EdgeCall {
        spis_reported: spis_of(&a).collect(),
        alice: a,
        bob: b,
        at_alice,
        at_bob,
        sas_shown,
        kernel_after: left.kernel,
        routes_left: left.routes,
        flows_left: left.flows,
        spis_on_wire: wire.spis,
        esp_packets: wire.esp_packets,
        clear: wire.clear,
        phone_logs: [ap.log(), bp.log()],
    })
}

/// One call of [`linphonec_and_baresip`], as each side saw it.
#[derive(Debug)]
pub struct PhoneCall {
    /// alice's and bob's edge call once its SAs were in the kernel.
    pub alice: Value,
    pub bob: Value,
    /// alice's and bob's summary of it once ended (`status.edge.ended_calls`).
    pub alice_ended: Value,
    pub bob_ended: Value,
    /// bob's tone (1500 Hz) in alice's recording, alice's (1000 Hz) in bob's (summed over
    /// bob's recordings of the call: baresip starts one at each stream update).
    pub at_alice: ToneReport,
    pub at_bob: ToneReport,
    /// What was left after its hang-up.
    pub left: Leftovers,
}

/// What [`linphonec_and_baresip`] showed.
#[derive(Debug)]
pub struct LinphoneCalls {
    /// 1: alice's linphonec calls bob's baresip, alice hangs up. 2: right after, bob's
    /// baresip calls alice's linphonec, which puts the call on hold and resumes it; bob
    /// hangs up.
    pub calls: [PhoneCall; 2],
    /// linphonec reported the call paused, then its media running again.
    pub paused: bool,
    pub resumed: bool,
    /// re-INVITEs that reached bob's baresip (hold and resume).
    pub reinvites_at_bob: usize,
    /// ESP packets into alice's and bob's hosts in the 2 s after the resume.
    pub esp_in_after_resume: [u64; 2],
    /// The level and SAS lines each phone printed (alice, bob).
    pub told: [Vec<String>; 2],
    /// What went between the hosts over both calls, and the SPIs the agents reported.
    pub wire: Wire,
    pub spis_reported: BTreeSet<u32>,
    /// The phones' logs (linphonec's output, baresip's console).
    pub phone_logs: [String; 2],
    /// What the agents logged of their edge calls (alice, bob).
    pub edge_logs: [String; 2],
}

/// A console line without its terminal escape sequences (baresip colours its output).
fn without_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte (@ to ~).
            if chars.peek() == Some(&'[') {
                chars.next();
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The lines of an agent's log about its edge calls.
fn edge_lines(a: &Agent) -> String {
    a.log()
        .lines()
        .filter(|l| l.contains("edge"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tone reports of several recordings of one call, added up (`None`: no recording).
fn summed(recordings: &[PathBuf], hz: f64) -> Result<Option<ToneReport>> {
    let mut sum: Option<ToneReport> = None;
    for p in recordings {
        let r = tone_report(p, hz)?;
        sum = Some(match sum {
            None => r,
            Some(a) => ToneReport {
                found: a.found + r.found,
                span: a.span + r.span,
                total: a.total + r.total,
                first: a.first,
            },
        });
    }
    Ok(sum)
}

/// ESP packets received by the host of `a` (its inbound SAs' counters).
fn esp_in(a: &Agent) -> u64 {
    a.json(&["xfrm", "--json"])["associations"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|x| x["sas"].as_array().cloned().unwrap_or_default())
        .filter(|sa| sa["direction"] == "in")
        .filter_map(|sa| sa["packets"].as_u64())
        .sum()
}

fn last_ended(a: &Agent) -> Value {
    a.status()["edge"]["ended_calls"]
        .as_array()
        .and_then(|v| v.last().cloned())
        .unwrap_or_default()
}

fn pause_for(d: Duration) -> Result<()> {
    let from = std::time::Instant::now();
    wait_until(d + Duration::from_secs(30), "the talk", || {
        (from.elapsed() >= d).then_some(())
    })
}

/// Two calls between different unmodified phones, each behind its agent in edge mode with
/// `[security]` keys (each signs for its domain and trusts the other's), through the
/// trapezoid: linphonec at alice (1000 Hz), baresip at bob (1500 Hz, auto-answer). Call 1:
/// linphonec dials bob, talks `talk`, hangs up. Call 2, right after: baresip dials alice,
/// linphonec answers, holds for a second after `talk / 2` and resumes, the call goes on
/// for 2 s + `talk`, baresip hangs up. baresip's recording of call 2 holds only what came
/// before the hold (its `sndfile` starts over at each stream update and keeps no more of
/// it), so the media after the resume is shown by the kernel's ESP counters both ways.
pub fn linphonec_and_baresip(talk: Duration) -> Result<LinphoneCalls> {
    let t = Trapezoid::new()?;
    let dir = scratch("linphone");
    let (capture, pcap) = call::capture_bridge(&t, &dir)?;
    md5_proxies(&t, &dir, "")?;
    let (sec_a, sec_b) = crate::sip::signed_both(&dir);
    let (alice, bob) = agents(&t, &dir, (&sec_a, &sec_b))?;
    let (a_tone, b_tone) = (dir.join("alice-1000.wav"), dir.join("bob-1500.wav"));
    let secs = u32::try_from(talk.as_secs())
        .unwrap_or(u32::MAX)
        .saturating_mul(2)
        .saturating_add(60);
    write_tone(&a_tone, 1000.0, secs)?;
    write_tone(&b_tone, 1500.0, secs)?;

    let mut bp = bob_baresip(&t, &dir, &b_tone, &bob)?;
    let mut lp = Linphonec::start(
        &t.hosts[0],
        &dir.join("alice-phone"),
        &LinphoneConfig {
            user: "alice",
            domain: "atlanta.com",
            password: "alice-pw",
            outbound: "[::1]:5070",
            sip_port: 5062,
            tone: &a_tone,
        },
    )?;
    // linphonec tells its registration only when asked (`status register`).
    let mut asked = std::time::Instant::now() - Duration::from_secs(1);
    wait_until(
        Duration::from_secs(120),
        "alice's linphonec registered",
        || {
            if asked.elapsed() >= Duration::from_secs(1) {
                asked = std::time::Instant::now();
                let _ = lp.send("status register");
            }
            lp.log().contains("registered, identity=").then_some(())
        },
    )
    .with_context(|| format!("{}\n{}", lp.log(), alice.log()))?;

    // Call 1: linphonec calls, and hangs up.
    let rec = [dir.join("alice-call1.wav"), dir.join("alice-call2.wav")];
    lp.send(&format!("record {}", rec[0].display()))?;
    lp.send("call sip:bob@biloxi.com")?;
    let (a1, b1) = (
        established(&alice).with_context(|| lp.log())?,
        established(&bob)?,
    );
    pause_for(talk)?;
    lp.send("terminate")?;
    let left1 = after_hangup(&t, &alice, &bob, &a1, &b1)?;
    let (a1_end, b1_end) = (last_ended(&alice), last_ended(&bob));

    // Call 2, right after: baresip calls; linphonec holds and resumes.
    lp.send(&format!("record {}", rec[1].display()))?;
    lp.send("autoanswer enable")?;
    bp.command(&t.hosts[3], "/dial sip:alice@atlanta.com")?;
    let (a2, b2) = (
        established(&alice).with_context(|| lp.log())?,
        established(&bob)?,
    );
    pause_for(talk / 2)?;
    lp.send("pause")?;
    let paused = wait_until(Duration::from_secs(20), "the hold", || {
        lp.log().contains("is now paused").then_some(())
    })
    .is_ok();
    pause_for(Duration::from_secs(1))?;
    let media_runs = |lp: &Linphonec| lp.log().matches("Media streams established").count();
    let before = media_runs(&lp);
    lp.send("resume")?;
    let resumed = wait_until(Duration::from_secs(20), "the resume", || {
        (media_runs(&lp) > before).then_some(())
    })
    .is_ok();
    let esp0 = [esp_in(&alice), esp_in(&bob)];
    pause_for(Duration::from_secs(2))?;
    let esp_in_after_resume = [
        esp_in(&alice).saturating_sub(esp0[0]),
        esp_in(&bob).saturating_sub(esp0[1]),
    ];
    pause_for(talk)?;
    bp.command(&t.hosts[3], "/hangup")?;
    let left2 = after_hangup(&t, &alice, &bob, &a2, &b2)?;
    let (a2_end, b2_end) = (last_ended(&alice), last_ended(&bob));
    lp.stop();
    bp.stop();

    let at_bob = bp.recordings();
    let report = |path: Option<&PathBuf>, who: &str, hz: f64| -> Result<ToneReport> {
        tone_report(
            path.with_context(|| format!("{who}'s phone recorded nothing"))?,
            hz,
        )
    };
    let told = [lp.log(), bp.log()].map(|log| {
        log.lines()
            .filter(|l| {
                l.contains("short authentication string") || l.contains("hip: verification")
            })
            .map(without_escapes)
            .collect()
    });
    let wire = stop_capture(capture, &pcap)?;
    let calls = [
        PhoneCall {
            at_alice: report(Some(&rec[0]), "alice", 1500.0)?,
            at_bob: report(at_bob.first(), "bob", 1000.0)?,
            alice: a1,
            bob: b1,
            alice_ended: a1_end,
            bob_ended: b1_end,
            left: left1,
        },
        PhoneCall {
            at_alice: report(Some(&rec[1]), "alice", 1500.0)?,
            // baresip starts a new recording when the stream is updated (hold, resume).
            at_bob: summed(at_bob.get(1..).unwrap_or_default(), 1000.0)?
                .context("bob's phone recorded nothing of call 2")?,
            alice: a2,
            bob: b2,
            alice_ended: a2_end,
            bob_ended: b2_end,
            left: left2,
        },
    ];
    Ok(LinphoneCalls {
        spis_reported: calls
            .iter()
            .flat_map(|c| spis_of(&c.alice).collect::<Vec<_>>())
            .collect(),
        calls,
        paused,
        resumed,
        reinvites_at_bob: bp.log().matches("got re-INVITE").count(),
        esp_in_after_resume,
        told,
        wire,
        phone_logs: [lp.log(), bp.log()],
        edge_logs: [edge_lines(&alice), edge_lines(&bob)],
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_escapes_are_removed_and_the_text_kept() {
        assert_eq!(
            super::without_escapes("\u{1b}[32mhip: call secured\u{1b}[;m"),
            "hip: call secured"
        );
        assert_eq!(super::without_escapes("plain [text]"), "plain [text]");
    }
}
