//! SIP test fixtures: the agent as a child process, SIPp runs, Kamailio proxies, and the
//! draft's trapezoid (Figure 1) in network namespaces.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{HostIdentityFile, NetNs, VethPair, agent_bin, new_host_identity, wait_until};

static N: AtomicU32 = AtomicU32::new(0);

pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "hipt-sip-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn sipp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sipp")
}

/// The HIT `ipv6` (IPv6 text) as 32 upper-case hex digits, the form of SDP's `k=` line.
pub fn hit_hex(ipv6: &str) -> String {
    let a: std::net::Ipv6Addr = ipv6.parse().expect("IPv6 HIT");
    a.octets().iter().map(|b| format!("{b:02X}")).collect()
}

/// A HIT written as 32 hex digits (other characters, such as tshark's `:` between
/// bytes, are skipped) as IPv6 text; `None` unless there are exactly 32 digits.
pub fn hit_from_hex(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(char::is_ascii_hexdigit).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, b) in o.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(std::net::Ipv6Addr::from(o).to_string())
}

/// An ES256 (P-256) key pair for SIP Identity written by openssl, an implementation
/// independent of the agent's: (`DIR/NAME.es256.pem` private PKCS#8 with mode 0600,
/// `DIR/NAME.es256.pub.pem` public SPKI).
pub fn es256_key(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let (key, public) = (
        dir.join(format!("{name}.es256.pem")),
        dir.join(format!("{name}.es256.pub.pem")),
    );
    let k = key.to_str().context("key path")?;
    crate::run(
        "openssl",
        [
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            k,
        ],
    )?;
    // The agent refuses key files others can read.
    crate::run("chmod", ["600", k])?;
    crate::run(
        "openssl",
        [
            "pkey",
            "-in",
            k,
            "-pubout",
            "-out",
            public.to_str().context("key path")?,
        ],
    )?;
    Ok((key, public))
}

/// A `[sip.tls]` table for agents at `ips`: one self-signed end-entity certificate
/// (openssl, `DIR/cert.pem` and `DIR/key.pem`) naming every address, trusted as the CA
/// too, so the same table serves both ends.
pub fn tls_table(dir: &Path, ips: &[&str]) -> Result<String> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
    crate::run(
        "openssl",
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=hip-test",
            "-addext",
            &format!("subjectAltName={}", san.join(",")),
            // An end-entity certificate (webpki refuses a CA certificate as one).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth,clientAuth",
            "-keyout",
            key.to_str().context("key path")?,
            "-out",
            cert.to_str().context("cert path")?,
        ],
    )?;
    Ok(format!(
        "[sip.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        cert.display(),
        key.display(),
        cert.display()
    ))
}

/// Writes an agent configuration `DIR/agent.toml` with its pool and control socket
/// (`DIR/agent.sock`) in `dir`, `sip` as the `[sip]` table body and `extra` tables after
/// it; `hit` is the agent's HIT, or the path of its identity key file. Returns the
/// configuration's and the socket's paths.
pub fn write_config(dir: &Path, hit: &str, sip: &str, extra: &str) -> Result<(PathBuf, PathBuf)> {
    let sock = dir.join("agent.sock");
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}pool = \"{}\"\ncontrol_socket = \"{}\"\n[sip]\n{sip}\n{extra}",
            if hit.starts_with('/') {
                format!("identity = \"{hit}\"\n")
            } else {
                format!("hit = \"{hit}\"\n")
            },
            dir.join("pool.json").display(),
            sock.display()
        ),
    )?;
    Ok((cfg, sock))
}

/// A running `hip-agent run` inside a namespace; killed on drop.
pub struct Agent {
    /// The agent process.
    pub child: Child,
    /// Its scratch directory (config, pool, log).
    pub dir: PathBuf,
    /// Its control socket.
    pub sock: PathBuf,
    /// Its configuration file.
    pub cfg: PathBuf,
    /// The namespace it runs in.
    pub ns: String,
}

impl Agent {
    /// Starts the agent in `ns` with `sip` as the `[sip]` table body (plus `extra` tables).
    /// `hit` is the agent's HIT, or the path of its identity key file.
    pub fn start(ns: &NetNs, hit: &str, sip: &str, extra: &str) -> Result<Self> {
        let dir = scratch("agent");
        let (cfg, sock) = write_config(&dir, hit, sip, extra)?;
        let child = Self::spawn(ns.name(), &cfg, &dir)?;
        let mut a = Self {
            child,
            dir,
            sock,
            cfg,
            ns: ns.name().to_owned(),
        };
        a.wait_ready()?;
        Ok(a)
    }

    fn spawn(ns: &str, cfg: &Path, dir: &Path) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        Command::new(agent_bin())
            .args(["--netns", ns, "run", "--config"])
            .arg(cfg)
            // Benchmarks set HIP_TEST_AGENT_LOG (e.g. `warn`): debug logging of every
            // packet would be part of what they measure.
            .env(
                "HIP_LOG",
                std::env::var("HIP_TEST_AGENT_LOG")
                    .unwrap_or_else(|_| "debug,aya=info,aya_obj=info,netlink_proto=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning hip-agent")
    }

    fn wait_ready(&mut self) -> Result<()> {
        // Under TCG (the VM tests) start-up with the eBPF load takes seconds, and on a loaded
        // host a minute or more: the bound is generous, the wait ends as soon as it answers.
        let r = wait_until(
            Duration::from_secs(180),
            "the agent's control socket",
            || {
                if let Ok(Some(st)) = self.child.try_wait() {
                    panic!("agent exited early ({st}): {}", self.log());
                }
                self.ctl(&["status", "--json"]).ok()
            },
        );
        if let Err(e) = r {
            // What the agent was doing is the only clue to why it did not come up.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!("{e}; the agent's log ends with:\n{}", tail.join("\n"));
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL (no clean-up of its own) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the agent with SIGTERM and waits for its clean shutdown.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_until(Duration::from_secs(60), "the agent to stop", || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Starts the agent again with the same configuration (after [`Agent::kill`]).
    pub fn restart(&mut self) -> Result<()> {
        self.child = Self::spawn(&self.ns, &self.cfg, &self.dir)?;
        self.wait_ready()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs a CLI subcommand against this agent's socket.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(agent_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            bail!(
                "hip-agent {args:?} ({}): {}\n--- last lines of the agent's log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let text = self.ctl(args).unwrap_or_else(|e| panic!("{e:#}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    }

    pub fn status(&self) -> Value {
        self.json(&["status", "--json"])
    }

    pub fn hits(&self) -> Value {
        self.json(&["hits", "--json"])
    }

    /// Waits up to `timeout` until the agent reports its registration accepted.
    pub fn wait_registered(&self, who: &str, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("{who} registered"), || {
            (self.status()["registration"]["registered"] == true).then_some(())
        })
        .with_context(|| format!("{who}'s status: {}\nlog:\n{}", self.status(), self.log()))
    }

    /// The security block of this agent's call (active or ended) once `pred` holds on it.
    pub fn wait_call_security(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_until(timeout, what, || {
            let st = self.status();
            st["calls"]
                .as_array()
                .into_iter()
                .chain(st["ended_calls"].as_array())
                .flatten()
                .map(|c| &c["security"])
                .find(|s| pred(s))
                .cloned()
        })
        .with_context(|| format!("status: {}\nlog:\n{}", self.status(), self.log()))
    }

    /// The pool entry for `peer_uri`, once it is there.
    pub fn wait_for_pool_entry(&self, peer_uri: &str) -> Value {
        wait_until(
            Duration::from_secs(15),
            &format!("pool entry for {peer_uri}"),
            || {
                self.hits()
                    .as_array()?
                    .iter()
                    .find(|e| e["peer_uri"] == peer_uri)
                    .cloned()
            },
        )
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", self.log()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `timeout` until none of `agents` has a call left (each ended or refused).
pub fn wait_calls_ended(agents: &[&Agent], timeout: Duration) -> Result<()> {
    let what = if agents.len() == 1 {
        "the call to end"
    } else {
        "all calls to end"
    };
    wait_until(timeout, what, || {
        agents
            .iter()
            .all(|a| a.status()["calls"].as_array().is_some_and(Vec::is_empty))
            .then_some(())
    })
}

/// The path of SIPp scenario `name` (in `tests/sipp`).
pub fn scenario(name: &str) -> String {
    sipp_dir().join(name).to_string_lossy().into_owned()
}

/// A SIPp phone at `ip:5062` registering at `target` (its edge, or the registrar itself)
/// with its digest credentials; returns SIPp's message log.
pub fn register_at(
    ns: &NetNs,
    ip: &str,
    user: &str,
    domain: &str,
    pw: &str,
    target: &str,
) -> Result<String> {
    let dir = scratch(&format!("reg-{user}"));
    sipp(
        ns.name(),
        &dir,
        &[
            "-sf",
            &scenario("edge_phone_register.xml"),
            "-key",
            "user",
            user,
            "-key",
            "domain",
            domain,
            "-au",
            user,
            "-ap",
            pw,
            "-i",
            ip,
            "-p",
            "5062",
            target,
            "-m",
            "1",
        ],
    )
}

/// alice's SIPp phone (192.0.2.1:5062, digest `alice`/`alice-pw` at atlanta.com) calling
/// sip:bob@biloxi.com through its edge at 192.0.2.1:5070 with `scenario_file`, `media`
/// its media address, `extra` more SIPp arguments; returns SIPp's message log.
pub fn alice_phone_calls_bob(
    ns: &str,
    dir: &Path,
    scenario_file: &str,
    media: &str,
    extra: &[&str],
) -> Result<String> {
    let sf = scenario(scenario_file);
    let mut args = vec![
        "-sf",
        &sf,
        "-key",
        "user",
        "alice",
        "-key",
        "domain",
        "atlanta.com",
        "-au",
        "alice",
        "-ap",
        "alice-pw",
        "-key",
        "callee",
        "sip:bob@biloxi.com",
        "-key",
        "media",
        media,
        "-i",
        "192.0.2.1",
        "-p",
        "5062",
        "192.0.2.1:5070",
        "-m",
        "1",
    ];
    args.extend_from_slice(extra);
    sipp(ns, dir, &args)
}

/// Runs SIPp to completion inside namespace `ns`; returns its message log.
pub fn sipp(ns: &str, dir: &Path, args: &[&str]) -> Result<String> {
    let log = dir.join("sipp-messages.log");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sipp"])
        .args(args)
        .args(["-nostdin", "-trace_msg", "-message_file"])
        .arg(&log)
        .args(["-trace_err", "-error_file"])
        .arg(dir.join("sipp-errors.log"))
        // A global timeout that fails the run, so a stuck call cannot hang the test.
        .args(["-timeout", "30", "-timeout_error"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running sipp")?;
    let messages = std::fs::read_to_string(&log).unwrap_or_default();
    if !out.status.success() {
        bail!(
            "sipp failed ({}):\n{}\nerrors:\n{}\nmessages:\n{messages}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(dir.join("sipp-errors.log")).unwrap_or_default()
        );
    }
    Ok(messages)
}

// ----------------------------------------------------------------------------- trapezoid

/// The draft's network: Alice (pc33, 192.0.2.1), atlanta.com proxy (192.0.2.2), biloxi.com
/// proxy (192.0.2.3), Bob (192.0.2.4), each in its own namespace, joined by a bridge in a
/// fifth one where the capture runs.
pub struct Trapezoid {
    /// The namespace of the bridge (where captures run).
    pub lan: NetNs,
    /// alice, atlanta, biloxi, bob.
    pub hosts: Vec<NetNs>,
    /// With [`Trapezoid::with_nat`]: the router alice (or bob) sits behind.
    pub nat: Option<NetNs>,
    /// The private network behind [`Trapezoid::nat`] (`10.0.N.0/24`).
    nat_lan: String,
    /// With [`Trapezoid::add_second_nat_for_alice`]: the NAT alice moves behind.
    pub nat2: Option<NetNs>,
}

/// alice's address behind the NAT of [`Trapezoid::with_nat`].
pub const ALICE_PRIVATE_IP: &str = "10.0.1.2";
/// bob's address behind the NAT of [`Trapezoid::with_nat_before_bob`].
pub const BOB_PRIVATE_IP: &str = "10.0.4.2";
/// alice's address behind the second NAT ([`Trapezoid::add_second_nat_for_alice`]).
pub const ALICE_SECOND_PRIVATE_IP: &str = "10.0.2.2";

/// The UDP conntrack timeout the NAT of [`Trapezoid::with_nat`] keeps (both the
/// unreplied and the stream one): a binding idle longer than this is forgotten.
pub const NAT_UDP_TIMEOUT_S: u64 = 20;

/// Runs `cmd` through `sh -c` in the router namespace `nat`.
fn nat_sh(nat: &NetNs, cmd: &str) -> Result<()> {
    crate::run("ip", ["netns", "exec", nat.name(), "sh", "-c", cmd]).map(|_| ())
}

/// Makes `nat` a masquerading router: `public`/24 on its link `wan` (already there, on the
/// bridge), and a new link `host_link` from `host` to its `lan` with 10.0.`net`.1/24; UDP
/// bindings time out after [`NAT_UDP_TIMEOUT_S`]. Returns the private network.
fn nat_router(nat: &NetNs, public: &str, host: &NetNs, host_link: &str, net: u8) -> Result<String> {
    let lan = format!("10.0.{net}.0/24");
    nat.ip(["addr", "add", &format!("{public}/24"), "dev", "wan"])?;
    nat.ip(["link", "set", "wan", "up"])?;
    crate::ip([
        "link",
        "add",
        host_link,
        "netns",
        host.name(),
        "type",
        "veth",
        "peer",
        "name",
        "lan",
        "netns",
        nat.name(),
    ])?;
    nat.ip(["addr", "add", &format!("10.0.{net}.1/24"), "dev", "lan"])?;
    nat.ip(["link", "set", "lan", "up"])?;
    host.ip(["link", "set", host_link, "up"])?;
    let sh = |cmd: &str| nat_sh(nat, cmd);
    sh("sysctl -qw net.ipv4.ip_forward=1")?;
    let rules = format!(
        "table ip nat {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan\" ip saddr {lan} masquerade\n }}\n}}\n"
    );
    sh(&format!("printf '{rules}' | nft -f -"))?;
    // The conntrack sysctls are per namespace once the module is loaded (the rule above
    // loaded it).
    sh(&format!(
        "sysctl -qw net.netfilter.nf_conntrack_udp_timeout={NAT_UDP_TIMEOUT_S} \
         net.netfilter.nf_conntrack_udp_timeout_stream={NAT_UDP_TIMEOUT_S}"
    ))?;
    Ok(lan)
}

impl Trapezoid {
    /// The trapezoid with alice behind a NAT: a router namespace holds her public address
    /// 192.0.2.1 on the bridge and masquerades (nftables) everything from her private
    /// network 10.0.1.0/24, where she is [`ALICE_PRIVATE_IP`]; UDP bindings time out
    /// after [`NAT_UDP_TIMEOUT_S`].
    pub fn with_nat() -> Result<Self> {
        Self::with_nat_before(0, "alice", "192.0.2.1", 1)
    }

    /// [`Trapezoid::with_nat`] for bob: the router holds 192.0.2.4 and bob is
    /// [`BOB_PRIVATE_IP`] on 10.0.4.0/24.
    pub fn with_nat_before_bob() -> Result<Self> {
        Self::with_nat_before(3, "bob", "192.0.2.4", 4)
    }

    /// Moves host `index` (link `v{who}`, public address `public`) behind a masquerading
    /// router; the host gets 10.0.`net`.2/24, the router 10.0.`net`.1.
    fn with_nat_before(index: usize, who: &str, public: &str, net: u8) -> Result<Self> {
        let mut t = Self::new()?;
        let nat = NetNs::new("trnat")?;
        let host = &t.hosts[index];
        let link = format!("v{who}");
        // The host's link to the bridge moves to the router; the host gets a private link.
        host.ip(["link", "set", &link, "netns", nat.name()])?;
        nat.ip(["link", "set", &link, "name", "wan"])?;
        t.nat_lan = nat_router(&nat, public, host, &link, net)?;
        host.ip(["addr", "add", &format!("10.0.{net}.2/24"), "dev", &link])?;
        host.ip(["route", "add", "default", "via", &format!("10.0.{net}.1")])?;
        t.nat = Some(nat);
        Ok(t)
    }

    /// A second NAT for alice (with [`Trapezoid::with_nat`]): a router holding 192.0.2.11
    /// on the bridge, and a link `valice2` from alice to its private network 10.0.2.0/24,
    /// where she has no address yet — she moves there with [`ALICE_SECOND_PRIVATE_IP`].
    pub fn add_second_nat_for_alice(&mut self) -> Result<()> {
        let nat = NetNs::new("trnat2")?;
        crate::ip([
            "link",
            "add",
            "wan",
            "netns",
            nat.name(),
            "type",
            "veth",
            "peer",
            "name",
            "p4",
            "netns",
            self.lan.name(),
        ])?;
        self.lan.ip(["link", "set", "p4", "master", "br0", "up"])?;
        nat_router(&nat, "192.0.2.11", &self.hosts[0], "valice2", 2)?;
        self.nat2 = Some(nat);
        Ok(())
    }

    /// Makes the NAT of [`Trapezoid::with_nat`] behave as one that restarted with a new
    /// port range: every binding it held is forgotten (its conntrack table flushed over
    /// ctnetlink, `IPCTNL_MSG_CT_DELETE` without attributes) and new ones take ports from
    /// 20000–20999, so the host's next datagram leaves from another public port.
    pub fn rebind_nat(&self) -> Result<()> {
        let nat = self.nat.as_ref().context("no NAT in this trapezoid")?;
        let lan = &self.nat_lan;
        let rules = format!(
            "flush table ip nat\ntable ip nat {{\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n  oifname \"wan\" ip saddr {lan} meta l4proto udp masquerade to :20000-20999\n  oifname \"wan\" ip saddr {lan} masquerade\n }}\n}}\n"
        );
        nat_sh(nat, &format!("printf '{rules}' | nft -f -"))?;
        // No conntrack tool in the guest: the flush request by hand (nfnetlink header,
        // subsystem CTNETLINK = 1, message DELETE = 2, family AF_INET, no attributes).
        let flush = "import socket,struct; \
            s=socket.socket(socket.AF_NETLINK,socket.SOCK_RAW,12); \
            s.send(struct.pack('=IHHII',20,(1<<8)|2,0x5,1,0)+struct.pack('=BBH',2,0,0)); \
            e=struct.unpack('=i',s.recv(4096)[16:20])[0]; \
            assert e==0,e";
        crate::run("ip", ["netns", "exec", nat.name(), "python3", "-c", flush])?;
        Ok(())
    }

    pub fn new() -> Result<Self> {
        let lan = NetNs::new("trlan")?;
        // Ageing time 0: the bridge never learns addresses and floods every frame, so its own
        // interface sees every message exactly once (a learning bridge forwards unicast
        // port to port, past a capture on br0).
        lan.ip(["link", "add", "br0", "type", "bridge", "ageing_time", "0"])?;
        lan.ip(["link", "set", "br0", "up"])?;
        let mut hosts = Vec::new();
        for (i, name) in ["alice", "atlanta", "biloxi", "bob"].iter().enumerate() {
            let ns = NetNs::new(&format!("tr{name}"))?;
            let (inner, outer) = (format!("v{name}"), format!("p{i}"));
            crate::ip([
                "link",
                "add",
                &inner,
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &outer,
                "netns",
                lan.name(),
            ])?;
            lan.ip(["link", "set", &outer, "master", "br0", "up"])?;
            ns.ip([
                "addr",
                "add",
                &format!("192.0.2.{}/24", i + 1),
                "dev",
                &inner,
            ])?;
            ns.ip(["link", "set", &inner, "up"])?;
            hosts.push(ns);
        }
        Ok(Self {
            lan,
            hosts,
            nat: None,
            nat_lan: String::new(),
            nat2: None,
        })
    }

    /// Starts the two Kamailio proxies of the draft's Figure 1 (configs and logs in
    /// `dir`): atlanta.com (192.0.2.2), registrar for alice with MD5 digest, and biloxi.com
    /// (192.0.2.3), registrar for bob with SHA-256 digest (RFC 8760), each routing the
    /// other's domain to the other. `biloxi_reply_route` is Kamailio script added to
    /// biloxi.com's configuration (an `onreply_route`, or nothing).
    pub fn start_proxies(&self, dir: &Path, biloxi_reply_route: &str) -> Result<()> {
        kamailio(
            &self.hosts[1],
            dir,
            &[
                ("IP", "192.0.2.2"),
                ("DOMAIN", "atlanta.com"),
                ("USER", "alice"),
                ("PASSWORD", "alice-pw"),
                ("ALGORITHM", "MD5"),
                ("PEER_DOMAIN", "biloxi.com"),
                ("PEER_IP", "192.0.2.3"),
            ],
        )?;
        kamailio(
            &self.hosts[2],
            dir,
            &[
                ("IP", "192.0.2.3"),
                ("DOMAIN", "biloxi.com"),
                ("USER", "bob"),
                ("PASSWORD", "bob-pw"),
                ("ALGORITHM", "SHA-256"),
                ("PEER_DOMAIN", "atlanta.com"),
                ("PEER_IP", "192.0.2.2"),
                ("REPLY_ROUTE", biloxi_reply_route),
            ],
        )
    }
}

/// Starts Kamailio with `tests/kamailio/proxy.cfg` filled in; it daemonizes (the namespace's
/// drop kills it).
pub fn kamailio(ns: &NetNs, dir: &Path, vars: &[(&str, &str)]) -> Result<()> {
    let mut cfg = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kamailio/proxy.cfg"),
    )?;
    for (k, v) in vars {
        cfg = cfg.replace(&format!("@{k}@"), v);
    }
    cfg = cfg.replace("@REPLY_ROUTE@", "");
    let path = dir.join(format!("{}.cfg", ns.name()));
    std::fs::write(&path, cfg)?;
    let log = std::fs::File::create(dir.join(format!("{}.log", ns.name())))?;
    let st = Command::new("ip")
        .args(["netns", "exec", ns.name(), "kamailio", "-f"])
        .arg(&path)
        .arg("-P")
        .arg(dir.join(format!("{}.pid", ns.name())))
        .args(["-m", "64", "-M", "8", "-E"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    if !st.success() {
        bail!("kamailio in {} failed: {st}", ns.name());
    }
    Ok(())
}

/// A HIP identity key (so that the agent runs HIP).
pub fn hip_key(dir: &Path, name: &str) -> HostIdentityFile {
    new_host_identity(dir, name, "ecdsa-p256").unwrap()
}

/// The `[security]` table: our signing key (with its `info` URI) and whom we trust.
/// `[security]` tables for alice (atlanta.com) and bob (biloxi.com) that each sign (SIP
/// Identity both ways) and trust the other's domain key; the keys are made in `dir`.
pub fn signed_both(dir: &Path) -> (String, String) {
    let (ka, pa) = es256_key(dir, "atlanta").expect("atlanta.com's key");
    let (kb, pb) = es256_key(dir, "biloxi").expect("biloxi.com's key");
    (
        security_table(Some((&ka, "atlanta.com")), &[("biloxi.com", &pb)], false),
        security_table(Some((&kb, "biloxi.com")), &[("atlanta.com", &pa)], false),
    )
}

pub fn security_table(
    sign: Option<(&Path, &str)>,
    trusted: &[(&str, &Path)],
    sips: bool,
) -> String {
    let mut t = String::from("[security]\n");
    if let Some((key, domain)) = sign {
        t.push_str(&format!(
            "identity_key = \"{}\"\nidentity_info = \"https://{domain}/passport.pem\"\n",
            key.display()
        ));
    }
    let trusted: Vec<String> = trusted
        .iter()
        .map(|(d, p)| format!("\"{d}\" = \"{}\"", p.display()))
        .collect();
    t.push_str(&format!(
        "trusted_identities = {{ {} }}\ntrust_sips_proxies = {sips}\n",
        trusted.join(", ")
    ));
    t
}

/// HIP on, no kernel offload (the host has no ESP).
pub const NO_OFFLOAD: &str = "[kernel]\nenabled = false\n";

/// Two agents: alice@atlanta.com at `.1`, bob@biloxi.com at `.2` of `net`, alice's calls
/// going straight to bob (bob's address as her outbound proxy, so that she can dial
/// `sip:bob@biloxi.com`, the identity bob signs for).
pub fn agent_pair(
    tag: &str,
    net: &str,
    alice_extra: &str,
    bob_extra: &str,
) -> (VethPair, Agent, Agent) {
    let (a_ip, b_ip) = (format!("{net}.1"), format!("{net}.2"));
    let p = VethPair::new(tag, &[&format!("{a_ip}/24")], &[&format!("{b_ip}/24")]).unwrap();
    let dir = scratch(tag);
    let alice = Agent::start(
        &p.a,
        hip_key(&dir, "alice").path.to_str().unwrap(),
        &format!(
            "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:{a_ip}:5060\"]\n\
             outbound_proxy = \"udp:{b_ip}:5060\""
        ),
        &format!("{NO_OFFLOAD}{alice_extra}"),
    )
    .unwrap();
    let bob = Agent::start(
        &p.b,
        hip_key(&dir, "bob").path.to_str().unwrap(),
        &format!("user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:{b_ip}:5060\"]"),
        &format!("{NO_OFFLOAD}{bob_extra}"),
    )
    .unwrap();
    (p, alice, bob)
}
