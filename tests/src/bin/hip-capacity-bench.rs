//! `hip-capacity-bench [STEP…]` (issue 16 item 1): how many secured calls one agent sets
//! up per second and holds at once, with the full path — SIP, the base exchange, XFRM SAs
//! and policies, routes and eBPF map entries — and what each held call costs.
//!
//! Topology: two namespaces on a veth. In one, bob's agent (UAS, eBPF datapath attached,
//! `[limits]` raised past the largest step). In the other, this process is N callers,
//! each with a Host Identity of its own: it sends each caller's INVITE (its HIT in the SDP),
//! ACKs the answer and runs that caller's base exchange against the HIT bob answered with,
//! through one `hip_proto::Endpoint` per caller on a raw socket. So every call is a
//! different peer to bob, with its own association and kernel objects, as on a PBX's host
//! (calls between two agents share one association, which would hide the per-call cost).
//!
//! Calls are added in steps (default 10, 100, 1000; each step adds calls up to its total,
//! at most `WINDOW` set-ups in flight) and held. At each step, read from bob's metrics
//! endpoint (which is thereby tested by use) and from the kernel directly:
//!
//! * set-up rate (calls/s) of the calls added, against two baselines of the same run:
//!   the same callers with HIP off at both ends (SIP alone), and the crypto floor — the
//!   signatures and DH one exchange needs, timed alone in this process, on the VM's cores;
//! * bob's memory per call (RSS), kernel objects per call (SAs, policies, routes, flow
//!   entries: counted with `ip` and the agent's `flows`);
//! * bob's CPU while idle with the calls held (media never touches the agent);
//! * latency of `status`, `xfrm`, `flows` and a metrics scrape, against the same at 0 calls;
//! * at the end, teardown of every call to zero objects, timed.
//!
//! Needs root and ESP (`cargo xtask bench` runs it in the VM). Prints a table and a JSON line.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hip_proto::{
    Algorithm, Hit, HostIdentity,
    crypto::DhGroup,
    endpoint::{Config, Endpoint, Event, SequentialSpis},
};
use hip_tests::{
    VethPair,
    attack::{RawHip, rss_kb},
    metrics, new_host_identity,
    sip::{Agent, scratch},
    wait_until,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::json;

const GEN_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const BOB_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GEN_SIP_PORT: u16 = 5070;

/// Caller `i`'s own address: every caller is a host of its own to bob (its HIP locator).
fn caller_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}
/// Call set-ups in flight at once (INVITE sent, association not yet up).
const WINDOW: usize = 8;
/// The largest number of calls bob is configured to hold.
const CAP: usize = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Created, INVITE not yet sent.
    Idle,
    Inviting,
    /// ACKed; base exchange running (HIP on).
    Answered,
    /// SIP confirmed and (HIP on) the association established at our side.
    Up,
    Byeing,
    Done,
    Failed,
}

struct Caller {
    ep: Option<Endpoint>,
    addr: Ipv4Addr,
    phase: Phase,
    invite: String,
    bye: Option<String>,
    /// When the last request was sent, and how often (retransmission over UDP).
    sent_at: Instant,
    sends: u32,
    to_tag: Option<String>,
}

/// The N callers: one SIP socket, one raw HIP socket, one endpoint per caller.
struct Callers {
    hip: bool,
    /// The callers' namespace (their addresses are added there as they are created).
    ns: String,
    sip: UdpSocket,
    raw: RawHip,
    calls: Vec<Caller>,
    by_call_id: HashMap<String, usize>,
    by_hit: HashMap<Hit, usize>,
    failed: Vec<String>,
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n")
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
}

fn body(msg: &str) -> &str {
    msg.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// The HIT in an SDP body (`k=host-identity-tag:` or `a=key-mgmt:host-identity-tag`,
/// 32 hex digits or IPv6 text).
fn sdp_hit(sdp: &str) -> Option<Hit> {
    sdp.lines().find_map(|l| {
        let v = l.split("host-identity-tag").nth(1)?;
        let v = v.trim_start_matches([':', ' ']).trim();
        if let Ok(a) = v.parse::<std::net::Ipv6Addr>() {
            return Some(Hit::from(a));
        }
        let n = u128::from_str_radix(v, 16).ok()?;
        (v.len() == 32).then(|| Hit(n.to_be_bytes()))
    })
}

fn invite(i: usize, hit: Hit) -> String {
    let h6 = hit.to_ipv6();
    let sdp = format!(
        "v=0\r\no=- {i} 1 IN IP6 {h6}\r\ns=-\r\nc=IN IP6 {h6}\r\nt=0 0\r\n\
         m=audio 16384 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n\
         a=key-mgmt:host-identity-tag {}\r\n",
        hit.to_hex32()
    );
    format!(
        "INVITE sip:bob@{BOB_IP} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {GEN_IP}:{GEN_SIP_PORT};branch=z9hG4bKcap{i}i\r\n\
         Max-Forwards: 70\r\nTo: <sip:bob@bench.example>\r\n\
         From: <sip:c{i}@callers.example>;tag=c{i}\r\nCall-ID: cap-{i}@callers.example\r\n\
         CSeq: 1 INVITE\r\nContact: <sip:c{i}@{GEN_IP}:{GEN_SIP_PORT}>\r\n\
         Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

fn in_dialog(i: usize, method: &str, cseq: u32, branch: &str, to_tag: &str) -> String {
    format!(
        "{method} sip:bob@{BOB_IP} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {GEN_IP}:{GEN_SIP_PORT};branch=z9hG4bKcap{i}{branch}\r\n\
         Max-Forwards: 70\r\nTo: <sip:bob@bench.example>;tag={to_tag}\r\n\
         From: <sip:c{i}@callers.example>;tag=c{i}\r\nCall-ID: cap-{i}@callers.example\r\n\
         CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    )
}

/// A 200 OK to a request bob sent us (an in-dialog request: answered, not interpreted).
fn ok_to(req: &str) -> String {
    let mut out = String::from("SIP/2.0 200 OK\r\n");
    for l in req.split("\r\n").take_while(|l| !l.is_empty()).skip(1) {
        let k = l
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if ["via", "from", "to", "call-id", "cseq"].contains(&k.as_str()) {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

fn endpoint_config() -> Config {
    Config {
        dh_groups: vec![DhGroup::NistP256],
        r1_pool_size: 1,
        ..Config::default()
    }
}

impl Callers {
    fn new(hip: bool, gen_ns: &hip_tests::NetNs) -> Result<Self> {
        let (sip, raw) = gen_ns.run_in(|| -> io::Result<(UdpSocket, RawHip)> {
            let s = UdpSocket::bind((GEN_IP, GEN_SIP_PORT))?;
            s.set_nonblocking(true)?;
            Ok((s, RawHip::with_header(BOB_IP)?))
        })??;
        Ok(Self {
            hip,
            ns: gen_ns.name().to_owned(),
            sip,
            raw,
            calls: Vec::new(),
            by_call_id: HashMap::new(),
            by_hit: HashMap::new(),
            failed: Vec::new(),
        })
    }

    /// Creates callers up to `n` in all (identities and endpoints made before any timing).
    fn prepare(&mut self, n: usize) -> Result<()> {
        let batch: String = (self.calls.len()..n)
            .map(|i| format!("addr add {}/32 dev va\n", caller_ip(i)))
            .collect();
        let mut ip = Command::new("ip")
            .args(["-n", &self.ns, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(ip.stdin.as_mut().unwrap(), batch.as_bytes())?;
        drop(ip.stdin.take());
        if !ip.wait()?.success() {
            bail!("adding the callers' addresses failed");
        }
        let now = Instant::now();
        while self.calls.len() < n {
            let i = self.calls.len();
            let mut rng = ChaCha20Rng::seed_from_u64(0xca11 + i as u64);
            let id = HostIdentity::generate(Algorithm::EcdsaP256, &mut rng)?;
            let hit = id.hit();
            let ep = if self.hip {
                let mut ep = Endpoint::new(
                    endpoint_config(),
                    id,
                    Box::new(ChaCha20Rng::seed_from_u64(0xe9 + i as u64)),
                    now,
                )?;
                // Each caller's inbound SPIs apart from every other's: bob's outbound SAs
                // all go to our one address, and (dst, SPI) names an SA.
                ep.set_spi_allocator(Box::new(SequentialSpis(0x2000_0000 + 16 * i as u32)));
                Some(ep)
            } else {
                None
            };
            self.by_call_id
                .insert(format!("cap-{i}@callers.example"), i);
            self.by_hit.insert(hit, i);
            self.calls.push(Caller {
                ep,
                addr: caller_ip(i),
                phase: Phase::Idle,
                invite: invite(i, hit),
                bye: None,
                sent_at: now,
                sends: 0,
                to_tag: None,
            });
        }
        Ok(())
    }

    fn send_sip(&self, m: &str) {
        let _ = self
            .sip
            .send_to(m.as_bytes(), SocketAddr::from((BOB_IP, 5060)));
    }

    fn in_flight(&self, p: Phase) -> usize {
        self.calls.iter().filter(|c| c.phase == p).count()
    }

    /// Handles everything received, retransmits, runs the endpoints' timers and sends what
    /// they produced; waits at most `wait` for something to arrive.
    fn pump(&mut self, wait: Duration) -> Result<()> {
        let now = Instant::now();
        let mut buf = [0u8; 65536];
        while let Ok((n, _)) = self.sip.recv_from(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.on_sip(&m, now);
        }
        if let Some((src, dst, pkt)) = self.raw.recv(wait)? {
            let mut pkts = vec![(src, dst, pkt)];
            while let Some(p) = self.raw.recv(Duration::ZERO)? {
                pkts.push(p);
            }
            for (src, dst, pkt) in pkts {
                let Some(recv) = pkt.get(24..40) else {
                    continue;
                };
                let hit = Hit(recv.try_into().unwrap());
                if let Some(&i) = self.by_hit.get(&hit)
                    && let Some(ep) = self.calls[i].ep.as_mut()
                {
                    let _ = ep.handle_packet(now, src.into(), dst.into(), &pkt);
                }
            }
        }
        let now = Instant::now();
        for i in 0..self.calls.len() {
            let c = &mut self.calls[i];
            // SIP retransmission (RFC 3261 Timer A/E, simplified: every 500 ms, 7 times).
            let req = match c.phase {
                Phase::Inviting => Some(c.invite.clone()),
                Phase::Byeing => c.bye.clone(),
                _ => None,
            };
            if let Some(r) = req
                && now.duration_since(c.sent_at) > Duration::from_millis(500)
            {
                if c.sends >= 7 {
                    c.phase = Phase::Failed;
                    self.failed
                        .push(format!("call {i}: no answer to its request"));
                    continue;
                }
                c.sends += 1;
                c.sent_at = now;
                let _ = self
                    .sip
                    .send_to(r.as_bytes(), SocketAddr::from((BOB_IP, 5060)));
            }
            let Some(ep) = c.ep.as_mut() else { continue };
            if ep.poll_timeout().is_some_and(|t| t <= now) {
                ep.handle_timeout(now);
            }
            while let Some(t) = ep.poll_transmit() {
                if let (IpAddr::V4(s), IpAddr::V4(d)) = (t.src, t.dst) {
                    self.raw.send_from(&t.payload, s, d);
                }
            }
            while let Some(e) = ep.poll_event() {
                match e {
                    Event::Established(_) if c.phase == Phase::Answered => c.phase = Phase::Up,
                    Event::Failed { error, .. } => {
                        c.phase = Phase::Failed;
                        self.failed
                            .push(format!("call {i}: base exchange: {error}"));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn on_sip(&mut self, m: &str, now: Instant) {
        let Some(&i) = header(m, "Call-ID").and_then(|c| self.by_call_id.get(c)) else {
            return;
        };
        if !m.starts_with("SIP/2.0 ") {
            // A request bob sent in the dialog (none expected): answered, not interpreted.
            self.send_sip(&ok_to(m));
            return;
        }
        let code: u16 = m[8..11].parse().unwrap_or(0);
        let method = header(m, "CSeq")
            .and_then(|c| c.split_whitespace().nth(1))
            .unwrap_or("");
        let to_tag = header(m, "To")
            .and_then(|t| t.split(";tag=").nth(1))
            .map(|t| t.split(';').next().unwrap_or(t).to_owned());
        let c = &mut self.calls[i];
        match (method, code) {
            ("INVITE", 200..=299) => {
                let tag = to_tag.unwrap_or_default();
                let ack = in_dialog(i, "ACK", 1, "a", &tag);
                let _ = self
                    .sip
                    .send_to(ack.as_bytes(), SocketAddr::from((BOB_IP, 5060)));
                if c.phase != Phase::Inviting {
                    return; // a retransmitted 200: ACKed again
                }
                c.to_tag = Some(tag);
                match (c.ep.as_mut(), sdp_hit(body(m))) {
                    (None, _) => c.phase = Phase::Up,
                    (Some(ep), Some(bob)) => {
                        match ep.initiate(now, c.addr.into(), IpAddr::from(BOB_IP), Some(bob)) {
                            Ok(()) => c.phase = Phase::Answered,
                            Err(e) => {
                                c.phase = Phase::Failed;
                                self.failed.push(format!("call {i}: initiate: {e}"));
                            }
                        }
                    }
                    (Some(_), None) => {
                        c.phase = Phase::Failed;
                        self.failed
                            .push(format!("call {i}: no HIT in bob's answer"));
                    }
                }
            }
            ("INVITE", 300..) => {
                c.phase = Phase::Failed;
                self.failed
                    .push(format!("call {i}: INVITE answered {code}"));
            }
            ("BYE", 200..) if c.phase == Phase::Byeing => c.phase = Phase::Done,
            _ => {}
        }
    }

    /// Sets up calls until `n` are up (at most WINDOW in flight); returns the seconds taken.
    fn grow(&mut self, n: usize, timeout: Duration) -> Result<f64> {
        self.prepare(n)?;
        let start = Instant::now();
        loop {
            let busy = self.in_flight(Phase::Inviting) + self.in_flight(Phase::Answered);
            let mut room = WINDOW.saturating_sub(busy);
            let now = Instant::now();
            for c in self.calls.iter_mut().filter(|c| c.phase == Phase::Idle) {
                if room == 0 {
                    break;
                }
                room -= 1;
                c.phase = Phase::Inviting;
                c.sent_at = now;
                c.sends = 0;
                let _ = self
                    .sip
                    .send_to(c.invite.as_bytes(), SocketAddr::from((BOB_IP, 5060)));
            }
            self.pump(Duration::from_millis(2))?;
            if !self.failed.is_empty() {
                bail!(
                    "calls failed: {:?}",
                    &self.failed[..self.failed.len().min(5)]
                );
            }
            if self.in_flight(Phase::Up) == n {
                return Ok(start.elapsed().as_secs_f64());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} of {n} calls up after {timeout:?}",
                    self.in_flight(Phase::Up)
                );
            }
        }
    }

    /// Hangs every call up (BYE, at most WINDOW in flight) until all are done.
    fn hang_up_all(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut room = WINDOW.saturating_sub(self.in_flight(Phase::Byeing));
            let now = Instant::now();
            for i in 0..self.calls.len() {
                if room == 0 {
                    break;
                }
                let c = &mut self.calls[i];
                if c.phase != Phase::Up {
                    continue;
                }
                room -= 1;
                let bye = in_dialog(i, "BYE", 2, "b", c.to_tag.as_deref().unwrap_or(""));
                c.phase = Phase::Byeing;
                c.sent_at = now;
                c.sends = 0;
                let _ = self
                    .sip
                    .send_to(bye.as_bytes(), SocketAddr::from((BOB_IP, 5060)));
                c.bye = Some(bye);
            }
            self.pump(Duration::from_millis(2))?;
            if !self.failed.is_empty() {
                bail!(
                    "hang-ups failed: {:?}",
                    &self.failed[..self.failed.len().min(5)]
                );
            }
            if self.calls.iter().all(|c| c.phase == Phase::Done) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("hang-ups not done after {timeout:?}");
            }
        }
    }

    /// Keeps answering (bob's CLOSEs, probes) for `d`.
    fn pump_for(&mut self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump(Duration::from_millis(5))?;
        }
        Ok(())
    }
}

/// Kernel objects in `ns`: (SAs, policies, routes in every table).
fn kernel_objects(ns: &str) -> Result<(usize, usize, usize)> {
    let count = |args: &[&str], prefix: &str| -> Result<usize> {
        let o = Command::new("ip").args(["-n", ns]).args(args).output()?;
        if !o.status.success() {
            bail!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| prefix.is_empty() || l.starts_with(prefix))
            .count())
    };
    Ok((
        count(&["xfrm", "state", "list"], "src ")?,
        count(&["xfrm", "policy", "list"], "src ")?,
        count(&["-6", "route", "show", "table", "all"], "")?
            + count(&["-4", "route", "show", "table", "all"], "")?,
    ))
}

/// CPU time (user + system) of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median wall time (ms) of `f` over 3 runs.
fn latency_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(v))
}

struct Latencies {
    status: f64,
    xfrm: f64,
    flows: f64,
    scrape: f64,
}

fn latencies(bob: &Agent, ns: &hip_tests::NetNs) -> Result<Latencies> {
    Ok(Latencies {
        status: latency_ms(|| bob.ctl(&["status", "--json"]).map(drop))?,
        xfrm: latency_ms(|| bob.ctl(&["xfrm", "--json"]).map(drop))?,
        flows: latency_ms(|| bob.ctl(&["flows", "--json"]).map(drop))?,
        scrape: latency_ms(|| metrics::scrape(ns).map(drop))?,
    })
}

fn bob_config(hip: bool) -> String {
    format!(
        "[sip.sdp]\nhit_format = \"hex\"\nrtp_port = 16384\n[sip.answer]\nring_ms = 0\n\
         [limits]\nmax_pending_incoming_calls = {CAP}\nmax_calls = {CAP}\n\
         invites_per_source_per_sec = 1000000\ninvite_burst_per_source = 1000000\n\
         max_associations = {CAP}\n{}{}",
        metrics::CONFIG,
        if hip {
            // Dead peer detection probes an association whose inbound ESP has been
            // silent for dead_peer_idle_secs (default 30): these calls carry no media,
            // calls that do are never probed. An hour keeps the probes out of the idle
            // figure; their cost is a signed UPDATE round trip per silent association.
            "[hip]\ndead_peer_idle_secs = 3600\n\
             [datapath]\ninterfaces = [\"vb\"]\npin_dir = \"/sys/fs/bpf/hip-capacity\"\n"
        } else {
            "[hip]\nenabled = false\n[kernel]\nenabled = false\n"
        }
    )
}

fn start_bob(net: &VethPair, hip: bool) -> Result<Agent> {
    // One neighbour entry per caller: the default table (gc_thresh3 = 1024) would start
    // dropping entries, and with them packets, past a thousand peers. The thresholds are
    // global (not per namespace); this runs in the VM, which is ours.
    for (k, v) in [
        ("gc_thresh1", "16384"),
        ("gc_thresh2", "32768"),
        ("gc_thresh3", "65536"),
    ] {
        hip_tests::run(
            "sysctl",
            ["-qw", &format!("net.ipv4.neigh.default.{k}={v}")],
        )?;
    }
    let dir = scratch("capacity");
    let id = new_host_identity(&dir, "bob", "ecdsa-p256")?;
    Agent::start(
        &net.b,
        id.path.to_str().unwrap(),
        &format!("user = \"bob\"\ndomain = \"bench.example\"\nlisten = [\"udp:{BOB_IP}:5060\"]"),
        &bob_config(hip),
    )
}

/// SIP alone: `n` calls set up with HIP off at both ends; calls/s.
fn sip_baseline(n: usize) -> Result<f64> {
    let net = VethPair::new("capsip", &["10.77.0.1/16"], &["10.77.0.2/16"])?;
    let mut bob = start_bob(&net, false)?;
    let mut c = Callers::new(false, &net.a)?;
    let secs = c.grow(n, Duration::from_secs(600))?;
    c.hang_up_all(Duration::from_secs(600))?;
    bob.stop()?;
    Ok(n as f64 / secs)
}

fn main() -> Result<()> {
    let mut steps: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("STEP"))
        .collect::<Result<_>>()?;
    if steps.is_empty() {
        steps = vec![10, 100, 1000];
    }
    steps.sort_unstable();
    let max = *steps.last().unwrap();
    if max > CAP {
        bail!("at most {CAP} calls");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    eprintln!("baseline: crypto floor of one ECDSA P-256 / P-256 exchange…");
    let crypto =
        hip_proto::bench::exchange_vs_crypto_floor(Algorithm::EcdsaP256, DhGroup::NistP256, 8, 5);
    let floor_s = crypto.crypto_floor.as_secs_f64();
    // Both ends' crypto of one exchange runs on this machine's cores (callers and bob).
    let floor_rate = cores as f64 / floor_s;
    eprintln!("baseline: {max} calls with HIP off (SIP alone)…");
    let sip_rate = sip_baseline(max)?;

    let net = VethPair::new("cap", &["10.77.0.1/16"], &["10.77.0.2/16"])?;
    let mut bob = start_bob(&net, true)?;
    let pid = bob.child.id();
    let mut callers = Callers::new(true, &net.a)?;
    let base_objects = kernel_objects(net.b.name())?;
    let base_rss = rss_kb(pid);
    let base_lat = latencies(&bob, &net.b)?;
    println!(
        "capacity: one agent (bob) holding N secured calls, each from a different peer; {cores} cores"
    );
    println!(
        "baselines: crypto floor {:.1} ms per exchange (both ends) = {floor_rate:.0} calls/s on {cores} cores; SIP alone (HIP off) {sip_rate:.0} calls/s ({max} calls)",
        floor_s * 1e3
    );
    println!(
        "at 0 calls: RSS {base_rss} kB; {} SAs, {} policies, {} routes; status {:.0} ms, xfrm {:.0} ms, flows {:.0} ms, scrape {:.0} ms",
        base_objects.0,
        base_objects.1,
        base_objects.2,
        base_lat.status,
        base_lat.xfrm,
        base_lat.flows,
        base_lat.scrape
    );
    println!(
        "{:>6} {:>9} {:>6} {:>6} {:>8} {:>9} {:>7} {:>7} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "calls",
        "calls/s",
        "/floor",
        "/sip",
        "kB/call",
        "SAs/call",
        "pol/c",
        "rts/c",
        "flows/c",
        "idle%",
        "status",
        "xfrm",
        "flows",
        "scrape"
    );
    let mut rows = Vec::new();
    let mut prev = 0usize;
    for &n in &steps {
        let secs = callers.grow(n, Duration::from_secs(1800))?;
        let rate = (n - prev) as f64 / secs;
        // Up at our end; wait until bob reports every association offloaded.
        let m = wait_until(Duration::from_secs(300), "bob's SAs for every call", || {
            callers.pump_for(Duration::from_millis(50)).ok()?;
            let m = metrics::scrape(&net.b).ok()?;
            (metrics::get(&m, "hip_kernel_sas") as usize >= 2 * n).then_some(m)
        })
        .map_err(|e| {
            let log = bob.log();
            let warn: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            anyhow::anyhow!(
                "{e}; bob's warnings and errors (last 30):\n{}",
                warn[warn.len().saturating_sub(30)..].join("\n")
            )
        })?;
        let est = m
            .get("hip_associations{state=\"established\"}")
            .copied()
            .unwrap_or(0.0) as usize;
        let calls: f64 = m
            .iter()
            .filter(|(k, _)| k.starts_with("hip_calls{"))
            .map(|(_, v)| v)
            .sum();
        if est != n || calls as usize != n {
            bail!("bob holds {est} established associations and {calls} calls, not {n}");
        }
        let flows = metrics::get(&m, "hip_rtp_flows") as usize;
        let (sas, pols, routes) = kernel_objects(net.b.name())?;
        let per = |x: usize, b: usize| x.saturating_sub(b) as f64 / n as f64;
        let rss = rss_kb(pid);
        // Idle: calls held, nothing new; the callers keep answering whatever bob sends.
        let c0 = cpu_secs(pid);
        let t0 = Instant::now();
        callers.pump_for(Duration::from_secs(3))?;
        let idle = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
        let lat = latencies(&bob, &net.b)?;
        println!(
            "{n:>6} {rate:>9.1} {:>6.2} {:>6.2} {:>8.1} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {idle:>6.2} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            rate / floor_rate,
            rate / sip_rate,
            (rss.saturating_sub(base_rss)) as f64 / n as f64,
            per(sas, base_objects.0),
            per(pols, base_objects.1),
            per(routes, base_objects.2),
            flows as f64 / n as f64,
            lat.status,
            lat.xfrm,
            lat.flows,
            lat.scrape
        );
        rows.push(json!({
            "calls": n, "setup_calls_per_s": rate, "over_crypto_floor": rate / floor_rate,
            "over_sip_alone": rate / sip_rate, "rss_kb": rss, "sas": sas, "policies": pols,
            "routes": routes, "flows": flows, "idle_cpu_percent": idle,
            "status_ms": lat.status, "xfrm_ms": lat.xfrm, "flows_ms": lat.flows,
            "scrape_ms": lat.scrape,
        }));
        prev = n;
    }
    let t = Instant::now();
    callers.hang_up_all(Duration::from_secs(1800))?;
    wait_until(
        Duration::from_secs(300),
        "bob's kernel objects removed",
        || {
            callers.pump_for(Duration::from_millis(50)).ok()?;
            (kernel_objects(net.b.name()).ok()? == base_objects).then_some(())
        },
    )?;
    let down = t.elapsed().as_secs_f64();
    let m = metrics::scrape(&net.b)?;
    let left_flows = metrics::get(&m, "hip_rtp_flows");
    callers.pump_for(Duration::from_millis(200))?;
    println!(
        "teardown: {max} calls hung up to {} SAs, {} policies, {} routes (as before the calls), {left_flows} flow entries, in {down:.1} s ({:.0} calls/s)",
        base_objects.0,
        base_objects.1,
        base_objects.2,
        max as f64 / down
    );
    println!(
        "{}",
        json!({
            "bench": "capacity", "cores": cores, "crypto_floor_ms": floor_s * 1e3,
            "crypto_floor_calls_per_s": floor_rate, "sip_alone_calls_per_s": sip_rate,
            "rss_kb_idle": base_rss, "base_latency_ms": {"status": base_lat.status,
            "xfrm": base_lat.xfrm, "flows": base_lat.flows, "scrape": base_lat.scrape},
            "steps": rows, "teardown_s": down,
        })
    );
    bob.stop()?;
    if left_flows != 0.0 {
        bail!("{left_flows} flow entries left after the hang-up");
    }
    Ok(())
}
