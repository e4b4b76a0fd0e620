//! The end-to-end scenario of `cargo xtask demo` and the `vm_call` tests: the draft's
//! Figure 1 in network namespaces — alice, the atlanta.com and biloxi.com proxies
//! (Kamailio), bob — two agents with HIP, XFRM offload and the eBPF datapath, a call
//! from alice to bob, RTP between the HITs, and the hang-up.
//!
//! Needs a kernel with ESP (the VM). Every step waits on a condition read back from the
//! agents or the kernel, never on a fixed delay.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    NetNs, new_host_identity,
    sip::{Agent, Trapezoid, scratch, wait_calls_ended},
    wait_until,
};

/// Addresses of the draft's example (192.0.2.1–.4).
pub const ALICE_IP: &str = "192.0.2.1";
/// bob's address.
pub const BOB_IP: &str = "192.0.2.4";
/// The RTP port each agent announces.
pub const RTP_PORT: u16 = 16384;

/// Options of a scenario run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Let the biloxi.com proxy replace bob's HIT in his answer by this one (32 hex
    /// digits): the draft's §4 man in the middle on the signalling path.
    pub rewrite_bob_hit: Option<String>,
    /// Extra TOML appended to both agents' configurations.
    pub extra_config: String,
    /// How long bob rings before he answers (default 300 ms, so the 180 and the 200
    /// travel apart as in the draft's flow; benchmarks use 0).
    pub ring_ms: Option<u64>,
    /// Put alice behind a NAT ([`Trapezoid::with_nat`]): she is
    /// [`ALICE_PRIVATE_IP`](crate::sip::ALICE_PRIVATE_IP) and 192.0.2.1 is the NAT's.
    pub alice_behind_nat: bool,
    /// Put bob behind a NAT ([`Trapezoid::with_nat_before_bob`]): he is
    /// [`BOB_PRIVATE_IP`](crate::sip::BOB_PRIVATE_IP) and 192.0.2.4 is the NAT's.
    pub bob_behind_nat: bool,
}

/// A running scenario; dropping it stops everything and deletes the namespaces.
pub struct Scenario {
    /// The namespaces (dropped last).
    pub net: Trapezoid,
    /// Scratch directory (configs, keys, logs, capture).
    pub dir: PathBuf,
    /// alice's agent.
    pub alice: Agent,
    /// bob's agent.
    pub bob: Agent,
    /// alice's HIT (IPv6 text).
    pub alice_hit: String,
    /// bob's HIT (IPv6 text).
    pub bob_hit: String,
    capture: Option<Child>,
    /// The packet capture on the bridge.
    pub pcap: PathBuf,
}

/// What the RTP receiver reported.
#[derive(Clone, Debug)]
pub struct RtpReport {
    /// Datagrams sent.
    pub sent: u32,
    /// The receiver's JSON report (`received`, `intact`, `in_order`, `from`, `ssrcs`).
    pub received: Value,
}

/// Starts tcpdump on the trapezoid's bridge, writing `dir/bridge.pcap`; returns once it
/// listens. Stop it with SIGINT so that the file is complete.
pub fn capture_bridge(net: &Trapezoid, dir: &std::path::Path) -> Result<(Child, PathBuf)> {
    let pcap = dir.join("bridge.pcap");
    let cap_log = dir.join("tcpdump.log");
    let capture = Command::new("ip")
        .args([
            "netns",
            "exec",
            net.lan.name(),
            "tcpdump",
            "-i",
            "br0",
            "-n",
            "-U",
            // Each packet to tcpdump at once: without it the last ring-buffer block (up
            // to a second of packets, e.g. a BYE just before the stop) can be lost when
            // SIGINT ends the capture.
            "--immediate-mode",
            "-w",
        ])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&cap_log)?)
        .spawn()
        .context("starting tcpdump")?;
    wait_until(Duration::from_secs(30), "tcpdump to listen", || {
        std::fs::read_to_string(&cap_log)
            .ok()
            .filter(|s| s.contains("listening on"))
    })?;
    Ok((capture, pcap))
}

impl Scenario {
    /// Builds the network, starts both proxies and both agents, and waits until both are
    /// registered.
    pub fn start(opts: &Options) -> Result<Self> {
        let net = match (opts.alice_behind_nat, opts.bob_behind_nat) {
            (true, false) => Trapezoid::with_nat()?,
            (false, true) => Trapezoid::with_nat_before_bob()?,
            (false, false) => Trapezoid::new()?,
            (true, true) => bail!("one NAT per scenario"),
        };
        let dir = scratch("call");
        // An independent view of everything on the wire, read back after the call.
        let (capture, pcap) = capture_bridge(&net, &dir)?;

        let alice_id = new_host_identity(&dir, "alice", "ecdsa-p256")?;
        let bob_id = new_host_identity(&dir, "bob", "ecdsa-p256")?;
        let (alice_key, alice_hit) = (alice_id.path, alice_id.hit);
        let (bob_key, bob_hit, bob_hit_hex) = (bob_id.path, bob_id.hit, bob_id.hit_hex);
        let rewrite = match &opts.rewrite_bob_hit {
            Some(fake) => format!(
                "onreply_route {{\n    if (has_body(\"application/sdp\")) {{\n        subst_body(\"/{}/{}/ig\");\n    }}\n}}\n",
                bob_hit_hex, fake
            ),
            None => String::new(),
        };
        net.start_proxies(&dir, &rewrite)?;

        let agent = |ns: &NetNs,
                     who: &str,
                     key: &PathBuf,
                     ip: &str,
                     proxy: &str,
                     domain: &str,
                     natted: bool| {
            // Behind the NAT, the registration's binding is kept by keep-alives sent more
            // often than the NAT forgets it.
            let keepalive = if natted {
                format!("\nkeepalive_secs = {}", crate::sip::NAT_UDP_TIMEOUT_S / 2)
            } else {
                String::new()
            };
            let pin = format!("/sys/fs/bpf/hip-test-{}", ns.name());
            Agent::start(
                ns,
                key.to_str().unwrap(),
                &format!(
                    "user = \"{who}\"\ndomain = \"{domain}\"\npassword = \"{who}-pw\"\n\
                     outbound_proxy = \"udp:{proxy}:5060\"\nregister = true\nregister_expires = 300\n\
                     listen = [\"udp:{ip}:5060\"]{keepalive}"
                ),
                &format!(
                    "[sip.sdp]\nhit_format = \"hex\"\nrtp_port = {RTP_PORT}\n\
                     [sip.answer]\nring_ms = {}\n\
                     [datapath]\ninterfaces = [\"v{who}\"]\npin_dir = \"{pin}\"\n{}",
                    opts.ring_ms.unwrap_or(300),
                    opts.extra_config
                ),
            )
        };
        let alice_ip = if opts.alice_behind_nat {
            crate::sip::ALICE_PRIVATE_IP
        } else {
            ALICE_IP
        };
        let alice = agent(
            &net.hosts[0],
            "alice",
            &alice_key,
            alice_ip,
            "192.0.2.2",
            "atlanta.com",
            opts.alice_behind_nat,
        )?;
        let bob_ip = if opts.bob_behind_nat {
            crate::sip::BOB_PRIVATE_IP
        } else {
            BOB_IP
        };
        let bob = agent(
            &net.hosts[3],
            "bob",
            &bob_key,
            bob_ip,
            "192.0.2.3",
            "biloxi.com",
            opts.bob_behind_nat,
        )?;
        for (who, a) in [("alice", &alice), ("bob", &bob)] {
            a.wait_registered(who, Duration::from_secs(60))?;
        }
        Ok(Self {
            net,
            dir,
            alice,
            bob,
            alice_hit,
            bob_hit,
            capture: Some(capture),
            pcap,
        })
    }

    /// alice's namespace.
    pub fn alice_ns(&self) -> &NetNs {
        &self.net.hosts[0]
    }

    /// bob's namespace.
    pub fn bob_ns(&self) -> &NetNs {
        &self.net.hosts[3]
    }

    /// alice calls bob; returns alice's call handle.
    pub fn call(&self) -> Result<String> {
        Ok(self
            .alice
            .ctl(&["call", "sip:bob@biloxi.com"])?
            .trim()
            .to_owned())
    }

    /// The security block of `agent`'s only call (active or ended), once `pred` holds
    /// (as [`Agent::wait_call_security`]).
    pub fn wait_call_security(
        agent: &Agent,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        agent.wait_call_security(what, timeout, pred)
    }

    /// Waits until both sides report the association established; returns (alice's,
    /// bob's) call security blocks.
    pub fn wait_established(&self) -> Result<(Value, Value)> {
        let est = |s: &Value| {
            s["associations"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["state"] == "established" && !x["kernel"].is_null())
            })
        };
        let a = Self::wait_call_security(
            &self.alice,
            "alice's association",
            Duration::from_secs(120),
            est,
        )?;
        let b = Self::wait_call_security(
            &self.bob,
            "bob's association",
            Duration::from_secs(120),
            est,
        )?;
        Ok((a, b))
    }

    /// bob's media address and port as his SDP gave them to alice (once she has them).
    pub fn bob_media(&self) -> Result<(String, u64)> {
        let sec = Self::wait_call_security(
            &self.alice,
            "bob's media in alice's view",
            Duration::from_secs(30),
            |s| !s["remote_media"].is_null(),
        )?;
        Ok((
            sec["remote_media"]["address"]
                .as_str()
                .context("media address")?
                .to_owned(),
            sec["remote_media"]["port"].as_u64().context("media port")?,
        ))
    }

    /// Streams `count` RTP packets (20 ms apart) from alice's HIT to bob's HIT and the
    /// port bob's SDP announced; bob's side receives them with an ordinary UDP socket.
    pub fn stream_rtp(&self, count: u32) -> Result<RtpReport> {
        self.stream(false, count)
    }

    /// [`Scenario::stream_rtp`] the other way: from bob's HIT (the port above his media
    /// port, which his own receiver may hold) to alice's HIT and her media port.
    pub fn stream_rtp_to_alice(&self, count: u32) -> Result<RtpReport> {
        self.stream(true, count)
    }

    fn stream(&self, to_alice: bool, count: u32) -> Result<RtpReport> {
        let (addr, port) = self.bob_media()?;
        if addr != self.bob_hit {
            bail!(
                "bob's SDP media address {addr} is not his HIT {}",
                self.bob_hit
            );
        }
        let (rx_ns, tx_ns, from, to) = if to_alice {
            (
                self.alice_ns(),
                self.bob_ns(),
                format!("[{addr}]:{}", port + 2),
                format!("[{}]:{RTP_PORT}", self.alice_hit),
            )
        } else {
            (
                self.bob_ns(),
                self.alice_ns(),
                format!("[{}]:{RTP_PORT}", self.alice_hit),
                format!("[{addr}]:{port}"),
            )
        };
        let rtp = crate::rtp_bin();
        let mut rx = Command::new(&rtp)
            .args(["--netns", rx_ns.name(), "recv", "--announce", "--bind"])
            .arg(&to)
            .args(["--count", &count.to_string(), "--timeout-s", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the RTP receiver")?;
        let mut out = std::io::BufReader::new(rx.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        if line.trim() != "ready" {
            bail!("RTP receiver did not start: {line}");
        }
        crate::run(
            rtp.to_str().unwrap(),
            [
                "--netns",
                tx_ns.name(),
                "send",
                "--from",
                &from,
                "--to",
                &to,
                "--count",
                &count.to_string(),
            ],
        )?;
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line)?;
        rx.wait()?;
        Ok(RtpReport {
            sent: count,
            received: serde_json::from_str(line.trim())
                .with_context(|| format!("receiver said {line:?}"))?,
        })
    }

    /// alice hangs up `call`; waits until both sides have ended it.
    pub fn hangup(&self, call: &str) -> Result<()> {
        self.alice.ctl(&["hangup", call])?;
        for (who, a) in [("alice", &self.alice), ("bob", &self.bob)] {
            wait_calls_ended(&[a], Duration::from_secs(60))
                .with_context(|| format!("{who}'s call to end"))?;
        }
        Ok(())
    }

    /// Waits until neither namespace holds an SA or policy (after the call ended).
    pub fn wait_kernel_empty(&self) -> Result<()> {
        for ns in [self.alice_ns(), self.bob_ns()] {
            wait_until(Duration::from_secs(30), "SAs and policies removed", || {
                (xfrm_counts(ns).ok()? == (0, 0)).then_some(())
            })
            .with_context(|| format!("in {}", ns.name()))?;
        }
        Ok(())
    }

    /// Stops the capture (flushing it) and returns the pcap's path.
    pub fn stop_capture(&mut self) -> Result<PathBuf> {
        if let Some(mut c) = self.capture.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            c.wait()?;
        }
        Ok(self.pcap.clone())
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(mut c) = self.capture.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Counts hip's XFRM states and policies in a namespace (`ip xfrm state/policy`).
pub fn xfrm_counts(ns: &NetNs) -> Result<(usize, usize)> {
    let st = ns.ip(["xfrm", "state", "list"])?;
    let po = ns.ip(["xfrm", "policy", "list"])?;
    let count = |b: &[u8], head: &str| {
        String::from_utf8_lossy(b)
            .lines()
            .filter(|l| l.starts_with(head))
            .count()
    };
    Ok((count(&st.stdout, "src "), count(&po.stdout, "src ")))
}

/// One packet of the capture, as tshark decodes it.
#[derive(Clone, Debug, Default)]
pub struct Packet {
    /// Seconds since the first packet of the capture.
    pub time: f64,
    /// Outer source.
    pub src: String,
    /// Outer destination.
    pub dst: String,
    /// IP protocol number.
    pub proto: u8,
    /// UDP ports (0 if not UDP).
    pub sport: u16,
    /// UDP destination port.
    pub dport: u16,
    /// ESP SPI (hex text, e.g. `0x48490001`), if ESP.
    pub spi: Option<u32>,
    /// ESP sequence number, if ESP.
    pub esp_seq: Option<u32>,
    /// HIP packet type (1 I1, 2 R1, 3 I2, 4 R2, …), if HIP.
    pub hip_type: Option<u8>,
    /// HIP sender HIT.
    pub hip_sender: Option<String>,
    /// SIP method or status.
    pub sip: Option<String>,
    /// Whether it carries an SDP body.
    pub sdp: bool,
}

/// The packets of a capture whose outer addresses are `a` and `b` (either way).
pub fn between<'p>(pkts: &'p [Packet], a: &str, b: &str) -> Vec<&'p Packet> {
    pkts.iter()
        .filter(|p| {
            let ends = [p.src.as_str(), p.dst.as_str()];
            ends.contains(&a) && ends.contains(&b)
        })
        .collect()
}

/// Decodes a capture with tshark (an independent dissector).
pub fn read_pcap(pcap: &std::path::Path) -> Result<Vec<Packet>> {
    let out = crate::run(
        "tshark",
        [
            "-r",
            pcap.to_str().unwrap(),
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "frame.time_relative",
            "-e",
            "ip.src",
            "-e",
            "ip.dst",
            "-e",
            "ip.proto",
            "-e",
            "udp.srcport",
            "-e",
            "udp.dstport",
            "-e",
            "esp.spi",
            "-e",
            "hip.packet_type",
            "-e",
            "hip.hit_sndr",
            "-e",
            "sip.Method",
            "-e",
            "sip.Status-Code",
            "-e",
            "sdp.version",
            "-e",
            "esp.sequence",
        ],
    )?;
    let mut v = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split('|').collect();
        if f.len() < 13 || f[1].is_empty() {
            continue;
        }
        let time = f[0].parse().unwrap_or(0.0);
        let f = &f[1..];
        let first = |s: &str| s.split(',').next().unwrap_or("").to_owned();
        let num = |s: &str| -> Option<u64> {
            let s = first(s);
            if s.is_empty() {
                return None;
            }
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        };
        v.push(Packet {
            time,
            src: first(f[0]),
            dst: first(f[1]),
            proto: num(f[2]).unwrap_or(0) as u8,
            sport: num(f[3]).unwrap_or(0) as u16,
            dport: num(f[4]).unwrap_or(0) as u16,
            spi: num(f[5]).map(|x| x as u32),
            hip_type: num(f[6]).map(|x| x as u8),
            hip_sender: crate::sip::hit_from_hex(&first(f[7])),
            sip: Some(first(f[8]))
                .filter(|s| !s.is_empty())
                .or_else(|| Some(first(f[9])).filter(|s| !s.is_empty())),
            sdp: !f[10].is_empty(),
            esp_seq: num(f[11]).map(|x| x as u32),
        });
    }
    Ok(v)
}
