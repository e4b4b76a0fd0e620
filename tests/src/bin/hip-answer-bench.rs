//! `hip-answer-bench [CALLS] [RING_MS]`: the post-answer media delay of a phone call
//! through two hip agents in edge mode (issue 15, "the first word is not lost"): from the
//! callee phone's 200 OK to the first audio packet delivered at the caller's phone, the
//! median of CALLS calls (default 5) in each of three set-ups, in the same run:
//!
//! * **baseline**: the same edges with HIP off (`[hip] enabled = false`: a plain proxy,
//!   SDP untouched, media in the clear between the phones' own addresses);
//! * **at the answer**: HIP on, `[edge] early_hip = false` — the base exchange starts when
//!   the 200 reaches the caller's agent, and media waits for it and for the SAs;
//! * **early**: HIP on, `early_hip = true` (the default) — HIP runs while the phone rings
//!   (RING_MS, default 1500 ms), so the SAs are in the kernel when the call is answered.
//!
//! The phones: alice's is SIPp (`answer_bench_uac.xml`, digest at atlanta.com, IPv6 media
//! at fd00:2::1 port 10000), bob's is this program — it answers after RING_MS and starts sending RTP (one
//! packet every 5 ms, from port 20000, to the address its INVITE's SDP named) the
//! moment its 200 OK leaves; a socket in alice's namespace on port 10000 takes the first
//! packet's arrival. Both clocks are the same (one host), so the delay is a difference of
//! two `SystemTime` readings. Kamailio is the trapezoid's two proxies; the kernel does
//! ESP (needs root and ESP: `cargo xtask bench` runs it in the VM).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use hip_tests::{
    NetNs,
    call::{ALICE_IP, BOB_IP, xfrm_counts},
    enter_netns, new_host_identity,
    phone::md5_proxies,
    sip::{Agent, Trapezoid, alice_phone_calls_bob, register_at, scratch},
    wait_until,
};
use serde_json::json;

/// The phones' own media addresses (IPv6, as hip requires of phones; added to the
/// trapezoid's LAN so that they reach each other when HIP is off).
const ALICE_MEDIA: &str = "fd00:2::1";
const BOB_MEDIA: &str = "fd00:2::4";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    HipOff,
    AtAnswer,
    Early,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::HipOff => "edge, HIP off (baseline)",
            Mode::AtAnswer => "HIP, exchange at the answer",
            Mode::Early => "HIP, early (while ringing)",
        }
    }
}

fn agent(ns: &NetNs, dir: &std::path::Path, who: &str, mode: Mode) -> Result<Agent> {
    let (domain, ip, media, proxy) = if who == "alice" {
        ("atlanta.com", ALICE_IP, ALICE_MEDIA, "192.0.2.2")
    } else {
        ("biloxi.com", BOB_IP, BOB_MEDIA, "192.0.2.3")
    };
    let key = new_host_identity(dir, who, "ecdsa-p256")?.path;
    let hip = match mode {
        Mode::HipOff => "[hip]\nenabled = false\n".to_owned(),
        _ => format!(
            "[datapath]\ninterfaces = [\"v{who}\"]\npin_dir = \"/sys/fs/bpf/hip-test-{}\"\n",
            ns.name()
        ),
    };
    Agent::start(
        ns,
        key.to_str().context("key path")?,
        &format!("user = \"{who}\"\ndomain = \"{domain}\"\nlisten = [\"udp:{ip}:5060\"]"),
        &format!(
            "{hip}[edge]\nlisten = [\"udp:{ip}:5070\"]\nclients = [\"{ip}\", \"{media}\"]\n\
             next_hop = \"udp:{proxy}:5060\"\nnotify_phone = false\nearly_hip = {}\n",
            mode == Mode::Early
        ),
    )
}

/// The headers of a SIP message named `name` (full form; what the edge and Kamailio send).
fn headers<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .split("\r\n")
        .skip(1)
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .collect()
}

/// A response to `req` with `status`, a To tag, and `body` (SDP) if any.
fn response(req: &str, status: &str, contact: &str, body: Option<&str>) -> String {
    let mut r = format!("SIP/2.0 {status}\r\n");
    for v in headers(req, "Via") {
        r.push_str(&format!("Via: {v}\r\n"));
    }
    if req.starts_with("INVITE ") {
        for rr in headers(req, "Record-Route") {
            r.push_str(&format!("Record-Route: {rr}\r\n"));
        }
    }
    for n in ["From", "Call-ID", "CSeq"] {
        r.push_str(&format!(
            "{n}: {}\r\n",
            headers(req, n).first().unwrap_or(&"")
        ));
    }
    let to = headers(req, "To").first().copied().unwrap_or("");
    if to.contains(";tag=") {
        r.push_str(&format!("To: {to}\r\n"));
    } else {
        r.push_str(&format!("To: {to};tag=bobphone\r\n"));
    }
    r.push_str(&format!("Contact: <{contact}>\r\n"));
    match body {
        Some(b) => r.push_str(&format!(
            "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => r.push_str("Content-Length: 0\r\n\r\n"),
    }
    r
}

/// Where the SDP of `msg` wants audio: its `c=` address and `m=audio` port.
fn media_of(msg: &str) -> Option<SocketAddr> {
    let body = msg.split_once("\r\n\r\n")?.1;
    let mut addr = None;
    let mut port = None;
    for l in body.lines() {
        if let Some(c) = l.strip_prefix("c=IN ") {
            addr = c.split_whitespace().nth(1)?.parse::<IpAddr>().ok();
        } else if let Some(m) = l.strip_prefix("m=audio ") {
            port = m.split_whitespace().next()?.parse::<u16>().ok();
        }
    }
    Some(SocketAddr::new(addr?, port?))
}

/// Bob's phone for one call: answers after `ring`, sends RTP from the moment its 200 OK
/// leaves, reports when that was, and ends with the caller's BYE.
fn bob_phone(ns: String, ring: Duration, answered: mpsc::Sender<SystemTime>) -> Result<()> {
    enter_netns(&ns)?;
    let sock = UdpSocket::bind((BOB_IP, 5062)).context("bob's phone socket")?;
    sock.set_read_timeout(Some(Duration::from_secs(40)))?;
    let contact = format!("sip:bob@{BOB_IP}:5062");
    let sdp = format!(
        "v=0\r\no=bob 1 1 IN IP6 {BOB_MEDIA}\r\ns=-\r\nc=IN IP6 {BOB_MEDIA}\r\nt=0 0\r\n\
         m=audio 20000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    );
    let mut buf = vec![0u8; 65536];
    let mut sender: Option<thread::JoinHandle<()>> = None;
    let stop = Arc::new(AtomicBool::new(false));
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .context("bob's phone: no request")?;
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.starts_with("INVITE ") && sender.is_none() {
            let dest = media_of(&msg).context("the INVITE has no audio address")?;
            sock.send_to(
                response(&msg, "180 Ringing", &contact, None).as_bytes(),
                from,
            )?;
            thread::sleep(ring);
            let ok = response(&msg, "200 OK", &contact, Some(&sdp));
            let at = SystemTime::now();
            sock.send_to(ok.as_bytes(), from)?;
            let _ = answered.send(at);
            let (ns, stop) = (ns.clone(), stop.clone());
            sender = Some(thread::spawn(move || {
                let _ = send_rtp(&ns, dest, &stop);
            }));
        } else if msg.starts_with("ACK ") || msg.starts_with("SIP/2.0") {
        } else if msg.starts_with("INVITE ") {
            // A retransmission: the 200 already left.
        } else {
            sock.send_to(response(&msg, "200 OK", &contact, None).as_bytes(), from)?;
            if msg.starts_with("BYE ") {
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
    }
    if let Some(s) = sender {
        let _ = s.join();
    }
    Ok(())
}

/// How long a call lasts after the answer (the caller then hangs up); bob's phone sends
/// RTP until then.
const CALL_MS: u64 = 8000;

/// Bob's phone's packet interval: a quarter of a real phone's 20 ms, for resolution,
/// slow enough that the sends the kernel refuses before the SAs exist (each an XFRM
/// acquire to the agent) do not load the machine that is being measured.
const RTP_INTERVAL: Duration = Duration::from_millis(5);

/// One RTP packet every `RTP_INTERVAL` to `dest` until `stop` (the BYE); sends refused while the fail-closed
/// policies hold the peer's HIT (no SA yet) are skipped, as a phone's would be lost.
fn send_rtp(ns: &str, dest: SocketAddr, stop: &AtomicBool) -> Result<()> {
    enter_netns(ns)?;
    let local: SocketAddr = if dest.is_ipv6() {
        "[::]:20000".parse()?
    } else {
        "0.0.0.0:20000".parse()?
    };
    // Not connected: before the SAs there is no route to the peer's HIT, and a connect
    // would fail for good; each send looks the route up, as the phone's would.
    let s = UdpSocket::bind(local)?;
    let start = Instant::now();
    let mut seq: u16 = 0;
    let mut pkt = [0u8; 172];
    pkt[0] = 0x80;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_millis(CALL_MS * 2) {
        pkt[2..4].copy_from_slice(&seq.to_be_bytes());
        let _ = s.send_to(&pkt, dest);
        seq = seq.wrapping_add(1);
        thread::sleep(RTP_INTERVAL);
    }
    Ok(())
}

/// Alice's phone's media socket: when the first packet arrived.
fn first_packet(ns: String, ready: mpsc::Sender<()>) -> Result<SystemTime> {
    enter_netns(&ns)?;
    let s = UdpSocket::bind("[::]:10000").context("alice's media socket")?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = ready.send(());
    let mut buf = [0u8; 2048];
    s.recv(&mut buf).context("no media reached alice's phone")?;
    Ok(SystemTime::now())
}

struct Run {
    delays_ms: Vec<f64>,
    /// Calls whose SAs were in both kernels before the answer.
    ready_at_answer: usize,
}

fn measure(mode: Mode, calls: usize, ring: Duration) -> Result<Run> {
    let t = Trapezoid::new()?;
    let dir = scratch("answer-bench");
    md5_proxies(&t, &dir, "")?;
    for (ns, dev, a) in [
        (&t.hosts[0], "valice", ALICE_MEDIA),
        (&t.hosts[3], "vbob", BOB_MEDIA),
    ] {
        ns.ip(["-6", "addr", "add", &format!("{a}/64"), "dev", dev, "nodad"])?;
    }
    let alice = agent(&t.hosts[0], &dir, "alice", mode)?;
    let bob = agent(&t.hosts[3], &dir, "bob", mode)?;
    // Under TCG a slow first answer can cross SIPp's retransmission (two 401s); the
    // registration is set-up, not what is measured: try again.
    let mut registered = Err(anyhow::anyhow!("not tried"));
    for _ in 0..3 {
        registered = register_at(
            &t.hosts[3],
            BOB_IP,
            "bob",
            "biloxi.com",
            "bob-pw",
            &format!("{BOB_IP}:5070"),
        );
        if registered.is_ok() {
            break;
        }
    }
    registered.with_context(|| bob.log())?;
    let mut run = Run {
        delays_ms: Vec::new(),
        ready_at_answer: 0,
    };
    for n in 0..calls {
        let (ready_tx, ready_rx) = mpsc::channel();
        let a_ns = t.hosts[0].name().to_owned();
        let rx = thread::spawn(move || first_packet(a_ns, ready_tx));
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("alice's media socket")?;
        let (ans_tx, ans_rx) = mpsc::channel();
        let b_ns = t.hosts[3].name().to_owned();
        let phone = thread::spawn(move || bob_phone(b_ns, ring, ans_tx));
        let (a_ns, d) = (t.hosts[0].name().to_owned(), dir.clone());
        let uac = thread::spawn(move || caller(&a_ns, &d, n));
        let fail =
            |e: anyhow::Error| e.context(format!("alice:\n{}\nbob:\n{}", alice.log(), bob.log()));
        let answered = ans_rx
            .recv_timeout(ring + Duration::from_secs(30))
            .context("bob's phone never answered")
            .map_err(fail)?;
        let first = rx.join().expect("receiver thread").map_err(fail)?;
        let d = first
            .duration_since(answered)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        run.delays_ms.push(d);
        // While the call is up: were the SAs in both kernels before the answer?
        if mode != Mode::HipOff {
            let answered_ms = answered.duration_since(SystemTime::UNIX_EPOCH)?.as_millis() as u64;
            let offloaded = [&alice, &bob].map(|ag| {
                ag.status()["edge"]["calls"][0]["security"]["association"]["timing_ms"]["offloaded"]
                    .as_u64()
            });
            if offloaded
                .iter()
                .all(|o| o.is_some_and(|o| o <= answered_ms))
            {
                run.ready_at_answer += 1;
            }
        }
        uac.join().expect("caller thread").map_err(fail)?;
        phone.join().expect("phone thread").map_err(fail)?;
        // The next call starts from nothing: no association, no SA.
        for (ag, ns) in [(&alice, &t.hosts[0]), (&bob, &t.hosts[3])] {
            wait_until(Duration::from_secs(30), "the call torn down", || {
                let st = ag.status();
                let calls_done = st["edge"]["calls"].as_array().is_some_and(Vec::is_empty);
                let none = ag
                    .json(&["assoc", "--json"])
                    .as_array()
                    .is_none_or(|v| v.iter().all(|r| r["state"] != "established"));
                (calls_done && none && xfrm_counts(ns).ok()? == (0, 0)).then_some(())
            })
            .with_context(|| ag.log())?;
        }
    }
    Ok(run)
}

fn caller(ns: &str, dir: &std::path::Path, n: usize) -> Result<String> {
    let d = dir.join(format!("uac-{n}"));
    std::fs::create_dir_all(&d)?;
    alice_phone_calls_bob(
        ns,
        &d,
        "answer_bench_uac.xml",
        ALICE_MEDIA,
        &["-d", &CALL_MS.to_string()],
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let ring = Duration::from_millis(args.next().map(|a| a.parse()).transpose()?.unwrap_or(1500));
    if calls == 0 {
        bail!("CALLS must be at least 1");
    }
    hip_tests::cleanup_own_namespaces();
    let mut rows = Vec::new();
    for mode in [Mode::HipOff, Mode::AtAnswer, Mode::Early] {
        let r = measure(mode, calls, ring).with_context(|| mode.label())?;
        rows.push((mode, r));
    }
    let base = median(rows[0].1.delays_ms.clone());
    println!(
        "post-answer media delay: 200 OK at bob's phone -> first RTP at alice's phone; median of {calls} calls, ring {} ms",
        ring.as_millis()
    );
    let mut out = json!({"calls": calls, "ring_ms": ring.as_millis() as u64});
    for (mode, r) in &rows {
        let m = median(r.delays_ms.clone());
        let extra = if *mode == Mode::HipOff {
            String::new()
        } else {
            format!(
                "   SAs in both kernels before the answer: {}/{calls} calls",
                r.ready_at_answer
            )
        };
        println!(
            "  {:<30} {m:8.2} ms   {:6.2}x baseline   (all: {}){extra}",
            mode.label(),
            m / base,
            r.delays_ms
                .iter()
                .map(|d| format!("{d:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        out[format!("{mode:?}")] = json!({
            "median_ms": m,
            "ratio": m / base,
            "all_ms": r.delays_ms,
            "ready_at_answer": (*mode != Mode::HipOff).then_some(r.ready_at_answer),
        });
    }
    println!("{out}");
    Ok(())
}
