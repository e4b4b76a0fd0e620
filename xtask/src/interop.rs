//! `cargo xtask interop --cutehip DIR`: live HIPv2 base exchanges between hip and
//! cutehip, the independent Python implementation (github.com/dmitriykuptsov/cutehip),
//! in network namespaces on this host; every HI (RSA, ECDSA P-256, ECDSA P-384) × DH
//! group (P-256, P-384, MODP-3072), both directions; one table per cutehip build.
//!
//! A developer tool, not part of `cargo xtask test`: CI cannot fetch cutehip (no GitHub
//! access there), and what the tool measures is another project's behaviour. What it
//! found is kept as test vectors instead (`hip-proto/tests/data/cutehip/`, made with
//! `--record`).
//!
//! Per run: two fresh namespaces joined by a veth (hip at 10.139.0.1, cutehip at
//! 10.139.0.2, IPv4: cutehip's ESP is IPv4-only); tcpdump on hip's side; cutehip runs
//! from a copy of the checkout (its own defaults, except the key, the one DH group, the
//! hosts/firewall files naming hip's HIT, and `EC = 1`: its R2-SENT → ESTABLISHED
//! timeout, 120 s by default, after which it sends ESP) under `interop/cutehip_observe.py`,
//! which logs its SAs' SPIs and key fingerprints; hip is `hip-agent hip connect|listen`.
//! cutehip initiates when a packet for hip's HIT enters its TUN device; then it and
//! hip's listener exchange I1..R2. A run is `ok` when both ends established, cutehip's
//! two SAs carry hip's SPIs and the same key fingerprints (both directions), an ESP
//! packet from cutehip carries hip's inbound SPI, and every packet hip sent is clean in
//! tshark (checksum good, nothing malformed). Otherwise the cell names how far the
//! exchange got and why, mapped to the cutehip defect when it is a known one.
//!
//! `--run patched` applies `xtask/interop/cutehip-fixes.patch` (fixes of cutehip's own
//! defects, listed in its header) to the copy; `unpatched` runs the checkout as is.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util;

/// `cargo xtask interop` arguments.
#[derive(clap::Args)]
pub struct InteropArgs {
    /// A cutehip checkout (`git clone https://github.com/dmitriykuptsov/cutehip`); it is
    /// copied, never modified.
    #[arg(long)]
    cutehip: PathBuf,
    /// Which cutehip to run: as checked out, with cutehip-fixes.patch, or both.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    run: Which,
    /// Only these Host Identity algorithms (rsa, ecdsa-p256, ecdsa-p384).
    #[arg(long, value_delimiter = ',')]
    hi: Vec<String>,
    /// Only these DH groups (p256, p384, modp3072).
    #[arg(long, value_delimiter = ',')]
    dh: Vec<String>,
    /// Only these directions (hip-initiates, cutehip-initiates).
    #[arg(long, value_delimiter = ',')]
    direction: Vec<String>,
    /// Also try the choices RFC 7401 leaves open that hip makes configurable (HOST_ID
    /// encrypted, R1_COUNTER sent, a puzzle of K = 8 from hip, the I1 to the null HIT),
    /// each away from hip's default, for ECDSA P-256 × P-256.
    #[arg(long)]
    variants: bool,
    /// Keep every run's files (capture, logs, hip's JSON, keys) under this directory, and
    /// make hip's side replayable (`--insecure-rng-seed`), for test vectors.
    #[arg(long)]
    record: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Unpatched,
    Patched,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Hi {
    Rsa,
    EcdsaP256,
    EcdsaP384,
}

impl Hi {
    const ALL: [Hi; 3] = [Hi::Rsa, Hi::EcdsaP256, Hi::EcdsaP384];
    fn name(self) -> &'static str {
        match self {
            Hi::Rsa => "rsa",
            Hi::EcdsaP256 => "ecdsa-p256",
            Hi::EcdsaP384 => "ecdsa-p384",
        }
    }
    /// cutehip's `sig_alg` and `hash_alg` settings for this HI.
    fn cutehip_algs(self) -> (u8, u8) {
        match self {
            Hi::Rsa => (5, 1),
            _ => (7, 2),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Dh {
    P256,
    P384,
    Modp3072,
}

impl Dh {
    const ALL: [Dh; 3] = [Dh::P256, Dh::P384, Dh::Modp3072];
    fn name(self) -> &'static str {
        match self {
            Dh::P256 => "p256",
            Dh::P384 => "p384",
            Dh::Modp3072 => "modp3072",
        }
    }
    fn id(self) -> u8 {
        match self {
            Dh::P256 => 7,
            Dh::P384 => 8,
            Dh::Modp3072 => 4,
        }
    }
}

/// A choice away from hip's defaults (`--variants`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Variant {
    Default,
    /// hip initiates with `--host-id-in-i2 encrypted`.
    HostIdEncrypted,
    /// cutehip initiates; hip's R1 carries R1_COUNTER.
    R1Counter,
    /// cutehip initiates; hip's R1 asks for K = 8.
    Puzzle8,
    /// hip initiates with its I1 to the null HIT (the agent's default for calls).
    NullHitI1,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Default => "defaults",
            Variant::HostIdEncrypted => "hip sends HOST_ID inside ENCRYPTED",
            Variant::R1Counter => "hip's R1 carries R1_COUNTER",
            Variant::Puzzle8 => "hip's R1 asks for K = 8",
            Variant::NullHitI1 => "hip's I1 goes to the null HIT",
        }
    }
    fn hip_initiates(self) -> Option<bool> {
        match self {
            Variant::Default => None,
            Variant::HostIdEncrypted | Variant::NullHitI1 => Some(true),
            Variant::R1Counter | Variant::Puzzle8 => Some(false),
        }
    }
    fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Default => &[],
            Variant::HostIdEncrypted => &["--host-id-in-i2", "encrypted"],
            Variant::R1Counter => &["--r1-counter"],
            Variant::Puzzle8 => &["--puzzle-difficulty", "8"],
            Variant::NullHitI1 => &["--i1-to-null-hit"],
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    patched: bool,
    hip_initiates: bool,
    hi: Hi,
    dh: Dh,
    variant: Variant,
}

impl Case {
    fn tag(&self) -> String {
        let mut t = format!(
            "{}-{}-{}-{}",
            if self.patched { "patched" } else { "unpatched" },
            if self.hip_initiates {
                "hip-initiates"
            } else {
                "cutehip-initiates"
            },
            self.hi.name(),
            self.dh.name()
        );
        if self.variant != Variant::Default {
            write!(t, "-{:?}", self.variant).unwrap();
        }
        t.to_lowercase()
    }
}

const HIP_ADDR: &str = "10.139.0.1";
const CUTEHIP_ADDR: &str = "10.139.0.2";
/// Longest a run may take (cutehip retransmits I2 after 20 s; one try is enough to judge).
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Everything the runs share.
struct Env {
    agent: PathBuf,
    python: PathBuf,
    observe: PathBuf,
    work: PathBuf,
    keys: BTreeMap<Hi, Keys>,
    cutehip_commit: String,
    record: Option<PathBuf>,
}

struct Keys {
    ours: PathBuf,
    our_hit: String,
    cutehip_private: PathBuf,
    cutehip_public: PathBuf,
    cutehip_hit: String,
}

pub fn run(a: &InteropArgs) -> Result<()> {
    util::require_root("cargo xtask interop (network namespaces, raw sockets)")?;
    for tool in [
        "ip", "tcpdump", "tshark", "git", "openssl", "python3", "ifconfig",
    ] {
        if !util::ok(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            bail!(
                "`{tool}` is missing (cutehip needs ifconfig from net-tools; the rest comes with `cargo xtask setup`)"
            );
        }
    }
    let src = fs::canonicalize(&a.cutehip)
        .with_context(|| format!("cutehip checkout {}", a.cutehip.display()))?;
    if !src.join("cutehipd.py").is_file() {
        bail!(
            "{} has no cutehipd.py: not a cutehip checkout",
            src.display()
        );
    }
    let commit = util::output(
        Command::new("git")
            .arg("-C")
            .arg(&src)
            .args(["rev-parse", "HEAD"]),
    )
    .context("reading the checkout's commit")?
    .trim()
    .to_owned();
    let dirty = !util::output(Command::new("git").arg("-C").arg(&src).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))?
    .trim()
    .is_empty();

    util::run(util::cmd("cargo").args(["build", "-p", "hip-agent"]))?;
    let target = util::root().join("target");
    let agent = target.join("debug/hip-agent");
    let work = target.join("interop");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let python = venv(&target.join("interop-venv"))?;

    let his: Vec<Hi> = pick(&a.hi, &Hi::ALL, Hi::name)?;
    let dhs: Vec<Dh> = pick(&a.dh, &Dh::ALL, Dh::name)?;
    let dirs: Vec<bool> = pick(&a.direction, &[true, false], |d| {
        if d {
            "hip-initiates"
        } else {
            "cutehip-initiates"
        }
    })?;
    let mut keys = BTreeMap::new();
    for &hi in his.iter().chain(a.variants.then_some(&Hi::EcdsaP256)) {
        if let std::collections::btree_map::Entry::Vacant(v) = keys.entry(hi) {
            v.insert(make_keys(&agent, &work.join("keys"), hi)?);
        }
    }
    if let Some(r) = &a.record {
        fs::create_dir_all(r)?;
        copy_dir(&work.join("keys"), &r.join("keys"))?;
    }
    let env = Env {
        agent,
        python,
        observe: util::root().join("xtask/interop/cutehip_observe.py"),
        work: work.clone(),
        keys,
        cutehip_commit: commit.clone(),
        record: a.record.clone(),
    };

    let builds: &[bool] = match a.run {
        Which::Unpatched => &[false],
        Which::Patched => &[true],
        Which::Both => &[false, true],
    };
    let mut report = String::new();
    for &patched in builds {
        let copy = work.join(if patched {
            "cutehip-patched"
        } else {
            "cutehip-unpatched"
        });
        util::run(Command::new("cp").arg("-a").arg(&src).arg(&copy))?;
        if patched {
            util::run(
                Command::new("git")
                    .arg("-C")
                    .arg(&copy)
                    .arg("apply")
                    .arg(util::root().join("xtask/interop/cutehip-fixes.patch")),
            )?;
        }
        let mut cases = Vec::new();
        for &hi in &his {
            for &dh in &dhs {
                for &hip_initiates in &dirs {
                    cases.push(Case {
                        patched,
                        hip_initiates,
                        hi,
                        dh,
                        variant: Variant::Default,
                    });
                }
            }
        }
        if a.variants {
            for v in [
                Variant::HostIdEncrypted,
                Variant::NullHitI1,
                Variant::R1Counter,
                Variant::Puzzle8,
            ] {
                cases.push(Case {
                    patched,
                    hip_initiates: v.hip_initiates().unwrap(),
                    hi: Hi::EcdsaP256,
                    dh: Dh::P256,
                    variant: v,
                });
            }
        }
        let mut results = Vec::new();
        for (i, c) in cases.iter().enumerate() {
            eprintln!("== interop {}/{}: {}", i + 1, cases.len(), c.tag());
            let o = run_case(&env, &copy, c, i).unwrap_or_else(|e| Outcome {
                cell: format!("tool error: {e:#}"),
                ok: false,
                defects: Vec::new(),
            });
            eprintln!("   {}", o.cell);
            results.push((*c, o));
        }
        report.push_str(&table(&env, patched, dirty, &results));
    }
    println!("{report}");
    if let Some(r) = &a.record {
        fs::write(r.join("interop-report.md"), &report)?;
    }
    Ok(())
}

/// The selected items of `all`, by name (all when none named).
fn pick<T: Copy>(names: &[String], all: &[T], name: impl Fn(T) -> &'static str) -> Result<Vec<T>> {
    if names.is_empty() {
        return Ok(all.to_vec());
    }
    names
        .iter()
        .map(|n| {
            all.iter()
                .copied()
                .find(|t| name(*t) == n)
                .with_context(|| format!("unknown {n:?}"))
        })
        .collect()
}

/// A virtualenv with cutehip's dependencies from PyPI (created once, then reused).
fn venv(dir: &Path) -> Result<PathBuf> {
    let python = dir.join("bin/python");
    let ready = dir.join(".cutehip-deps");
    if !ready.exists() {
        util::run(Command::new("python3").args(["-m", "venv"]).arg(dir))?;
        util::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q"])
                .args(["pycryptodome", "netifaces", "tinyec"]),
        )?;
        fs::write(&ready, "pycryptodome netifaces tinyec\n")?;
    }
    Ok(python)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

/// `hip-agent hi new` for both sides (cutehip reads PKCS#8 PEM too), and the HITs.
fn make_keys(agent: &Path, dir: &Path, hi: Hi) -> Result<Keys> {
    fs::create_dir_all(dir)?;
    let new = |who: &str| -> Result<(PathBuf, String)> {
        let path = dir.join(format!("{who}-{}.pem", hi.name()));
        util::output(
            Command::new(agent)
                .args(["hi", "new", "--algorithm", hi.name(), "--out"])
                .arg(&path),
        )?;
        let v: Value = serde_json::from_str(&util::output(
            Command::new(agent)
                .args(["hi", "show", "--json"])
                .arg(&path),
        )?)?;
        let hit = v["hit"].as_str().context("hi show: no hit")?.to_owned();
        Ok((path, hit))
    };
    let (ours, our_hit) = new("hip")?;
    let (cutehip_private, cutehip_hit) = new("cutehip")?;
    let cutehip_public = dir.join(format!("cutehip-{}.pub.pem", hi.name()));
    util::output(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&cutehip_private)
            .arg("-out")
            .arg(&cutehip_public),
    )?;
    Ok(Keys {
        ours,
        our_hit,
        cutehip_private,
        cutehip_public,
        cutehip_hit,
    })
}

/// A HIT as cutehip writes it (eight groups of four hex digits).
fn cutehip_hit_form(hit: &str) -> Result<String> {
    let a: std::net::Ipv6Addr = hit.parse().context("HIT")?;
    Ok(a.segments()
        .iter()
        .map(|s| format!("{s:04x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// cutehip's `config/config.py` for one run: its own defaults, with the key, one DH
/// group and `EC = 1` (see the module doc).
fn cutehip_config(hi: Hi, dh: Dh) -> String {
    let (sig, hash) = hi.cutehip_algs();
    format!(
        r#"# Written by `cargo xtask interop` (hip): cutehip's defaults, one DH group, EC = 1.
config = {{
	"network": {{ "tun_name": "hip0", "mtu": 1400 }},
	"security": {{
		"public_key": "./config/public.pem",
		"private_key": "./config/private.pem",
		"sig_alg": {sig},
		"hash_alg": {hash},
		"puzzle_difficulty": 0x10,
		"puzzle_lifetime_exponent": 37,
		"supported_DH_groups": [{g}],
		"supported_ciphers": [0x4, 0x2, 0x1],
		"supported_hit_suits": [0x10, 0x20, 0x30],
		"supported_transports": [0x0FFF],
		"supported_signatures": [0x5, 0x7, 0x9],
		"supported_esp_transform_suits": [0x9, 0x8, 0x7]
	}},
	"resolver": {{
		"hosts_file": "./config/hosts",
		"domain_identifier": {{ "type": 0x2, "value": "dmitriy.kuptsov@strangebit.io" }}
	}},
	"general": {{
		"i1_timeout_s": 20, "i1_retries": 3, "i2_retries": 3, "i2_timeout_s": 20,
		"update_timeout_s": 120, "close_timeout_s": 30, "UAL": 120, "MSL": 120,
		"EC": 1, "failed_timeout": 120, "rekey_after_packets": 100
	}},
	"firewall": {{ "rules_file": "./config/rules" }}
}}
"#,
        g = dh.id()
    )
}

/// Two namespaces and a veth, removed (with whatever still runs in them) on drop.
struct Netns {
    hip: String,
    cutehip: String,
    veth_hip: String,
}

impl Netns {
    fn new(i: usize) -> Result<Self> {
        let pid = std::process::id();
        let n = Netns {
            hip: format!("hipio-{pid}-{i}-h"),
            cutehip: format!("hipio-{pid}-{i}-c"),
            veth_hip: format!("vhio{i}"),
        };
        let veth_c = format!("vcio{i}");
        for ns in [&n.hip, &n.cutehip] {
            util::output(Command::new("ip").args(["netns", "add", ns]))?;
            util::output(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
        }
        util::output(Command::new("ip").args([
            "link",
            "add",
            &n.veth_hip,
            "netns",
            &n.hip,
            "type",
            "veth",
            "peer",
            "name",
            &veth_c,
            "netns",
            &n.cutehip,
        ]))?;
        for (ns, dev, addr) in [
            (&n.hip, &n.veth_hip, HIP_ADDR),
            (&n.cutehip, &veth_c, CUTEHIP_ADDR),
        ] {
            util::output(Command::new("ip").args([
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]))?;
            util::output(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]))?;
        }
        // cutehip takes its source address from the default route's interface.
        util::output(
            Command::new("ip").args(["-n", &n.cutehip, "route", "add", "default", "via", HIP_ADDR]),
        )?;
        Ok(n)
    }

    fn exec(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.hip, &self.cutehip] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A child killed on drop.
struct Proc(Child);

impl Proc {
    fn spawn(c: &mut Command, out: &Path, err: &Path) -> Result<Self> {
        let child = c
            .stdin(Stdio::null())
            .stdout(fs::File::create(out)?)
            .stderr(fs::File::create(err)?)
            .spawn()
            .with_context(|| format!("spawning {}", util::show(c)))?;
        Ok(Proc(child))
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
    fn stop(&mut self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, sig) };
        let end = Instant::now() + Duration::from_secs(3);
        while self.exited().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

/// Polls `f` every 100 ms until it returns `Some` or `limit` passes.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Without terminal colour codes.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One frame of the capture, as tshark decodes it.
struct Frame {
    src: String,
    hip_type: Option<u8>,
    checksum_ok: bool,
    esp_spi: Option<u32>,
}

fn frames(pcap: &Path) -> Result<Vec<Frame>> {
    let out = util::output(Command::new("tshark").arg("-r").arg(pcap).args([
        "-T",
        "fields",
        "-E",
        "separator=,",
        "-e",
        "ip.src",
        "-e",
        "hip.packet_type",
        "-e",
        "hip.checksum.status",
        "-e",
        "esp.spi",
    ]))?;
    Ok(out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let g = |i: usize| f.get(i).copied().unwrap_or("");
            Frame {
                src: g(0).to_owned(),
                hip_type: g(1).parse().ok(),
                checksum_ok: g(2) == "1",
                esp_spi: u32::from_str_radix(g(3).trim_start_matches("0x"), 16).ok(),
            }
        })
        .collect())
}

/// The HIP packets of a capture, one line each — `TYPE SRC DST HEX` — as tshark (the
/// independent decoder) delimits them: the form the replay tests read
/// (hip-proto/tests/cutehip.rs), so that no test has to parse pcap.
fn hip_packets(pcap: &Path) -> Result<String> {
    let out = util::output(
        Command::new("tshark")
            .arg("-r")
            .arg(pcap)
            .args(["-Y", "hip", "-T", "json", "-x"]),
    )?;
    let v: Value = serde_json::from_str(&out).context("tshark -T json")?;
    let mut s = String::new();
    for p in v.as_array().context("tshark -T json: not a list")? {
        let l = &p["_source"]["layers"];
        let ty: u8 = l["hip"]["hip.packet_type"]
            .as_str()
            .and_then(|t| t.parse().ok())
            .context("hip.packet_type")?;
        let hex = l["hip_raw"][0].as_str().context("hip_raw")?;
        writeln!(
            s,
            "{} {} {} {hex}",
            type_name(ty),
            l["ip"]["ip.src"].as_str().context("ip.src")?,
            l["ip"]["ip.dst"].as_str().context("ip.dst")?
        )?;
    }
    Ok(s)
}

fn malformed(pcap: &Path) -> Result<usize> {
    Ok(util::output(
        Command::new("tshark")
            .arg("-r")
            .arg(pcap)
            .args(["-Y", "_ws.malformed"]),
    )?
    .lines()
    .count())
}

fn type_name(t: u8) -> &'static str {
    match t {
        1 => "I1",
        2 => "R1",
        3 => "I2",
        4 => "R2",
        16 => "UPDATE",
        17 => "NOTIFY",
        18 => "CLOSE",
        19 => "CLOSE_ACK",
        _ => "?",
    }
}

/// The known cutehip defects, as evidence in the logs → (defect, what it breaks).
const DEFECTS: &[(&str, &str, &str)] = &[
    (
        "a",
        "puzzle hashed as I | HIT-R | HIT-I | J",
        "RFC 7401 §4.1.2, §5.2.4: RHASH(I | HIT-I | HIT-R | J)",
    ),
    (
        "b",
        "HIP_MAC / HIP_MAC_2 with the other direction's integrity key",
        "RFC 7401 §6.5: each host MACs with its own outgoing HIP-gl/lg key",
    ),
    (
        "c",
        "R2 signed with HIP_SIGNATURE_2, and only that taken in R2",
        "RFC 7401 §5.3.4: R2 carries HIP_SIGNATURE",
    ),
    (
        "d",
        "leading zero octets of Kij dropped (1 exchange in 256)",
        "RFC 7401 §5.2.7 / RFC 5903 §7: Kij at full length",
    ),
    (
        "e",
        "crash (list + bytearray) echoing R1_COUNTER; echo placed before ESP_INFO",
        "RFC 7401 §5.3.3 (R1_COUNTER echoed), §5.2.1 (ascending order)",
    ),
    (
        "f",
        "I1 to the null HIT answered with the null HIT as sender (crashes on its OGA)",
        "RFC 7401 §4.1.8, §5.3.2: R1 from the Responder's HIT",
    ),
    (
        "g",
        "HOST_ID required in the clear in I2 (not fixed by the patch)",
        "RFC 7401 §5.3.3: ENCRYPTED { HOST_ID } or HOST_ID",
    ),
];

/// Which defect a piece of evidence points at.
fn defect_of(evidence: &str) -> Option<&'static str> {
    let e = evidence;
    Some(
        if e.contains("key of the other direction") || e.contains("Invalid HMAC") {
            "b"
        } else if e.contains("HIP_SIGNATURE_2 where") || e.contains("Missing signature parameter") {
            // (cutehip's "missing" signature in R2 is our HIP_SIGNATURE: it wants _2.)
            "c"
        } else if e.contains("Puzzle was not solved") || e.contains("wrong puzzle solution") {
            // (hip's "wrong puzzle solution" for cutehip's I2 to a puzzle with K > 0.)
            "a"
        } else if e.contains("concat") && e.contains("list") {
            // The TypeError of `list + bytearray`, in the words of the Python version.
            "e"
        } else if e.contains("Unknwon hash algorithm") || e.contains("Blocked by firewall") {
            // (sic: cutehip's message, raised on the null HIT's OGA; its firewall rules, which
            // allow both HITs here, do not match the null HIT either.)
            "f"
        } else if e.contains("Missing HI parameter") {
            "g"
        } else {
            return None;
        },
    )
}

struct Outcome {
    cell: String,
    ok: bool,
    defects: Vec<&'static str>,
}

fn run_case(env: &Env, copy: &Path, c: &Case, i: usize) -> Result<Outcome> {
    let keys = &env.keys[&c.hi];
    let dir = env.work.join(c.tag());
    fs::create_dir_all(&dir)?;
    // cutehip's configuration for this run.
    let cfg = copy.join("config");
    fs::write(cfg.join("config.py"), cutehip_config(c.hi, c.dh))?;
    fs::copy(&keys.cutehip_private, cfg.join("private.pem"))?;
    fs::copy(&keys.cutehip_public, cfg.join("public.pem"))?;
    let (oh, ch) = (
        cutehip_hit_form(&keys.our_hit)?,
        cutehip_hit_form(&keys.cutehip_hit)?,
    );
    fs::write(cfg.join("hosts"), format!("{oh} {HIP_ADDR}\n"))?;
    fs::write(
        cfg.join("rules"),
        format!("{oh} {ch} allow\n{ch} {oh} allow\n"),
    )?;
    let _ = fs::remove_file(copy.join("hip.log"));

    let ns = Netns::new(i)?;
    let pcap = dir.join("capture.pcap");
    let mut td = Proc::spawn(
        ns.exec(&ns.hip, Path::new("tcpdump")).args([
            "-i",
            &ns.veth_hip,
            "-U",
            "--immediate-mode",
            "-n",
            "-w",
            pcap.to_str().unwrap(),
            "ip proto 139 or ip proto 50",
        ]),
        &dir.join("tcpdump.out"),
        &dir.join("tcpdump.err"),
    )?;
    wait_for(Duration::from_secs(10), || {
        read(&dir.join("tcpdump.err"))
            .contains("listening on")
            .then_some(())
    })
    .context("tcpdump did not start")?;

    let sa_log = dir.join("cutehip-sa.jsonl");
    let mut cute = Proc::spawn(
        ns.exec(&ns.cutehip, &env.python)
            .arg(&env.observe)
            .current_dir(copy)
            .env("HIP_INTEROP_SA_LOG", &sa_log),
        &dir.join("cutehip.out"),
        &dir.join("cutehip.err"),
    )?;
    wait_for(Duration::from_secs(20), || {
        read(&copy.join("hip.log"))
            .contains("Starting the TUN interface loop")
            .then_some(())
    })
    .with_context(|| {
        format!(
            "cutehip did not start: {}",
            read(&dir.join("cutehip.out"))
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    })?;

    let seed = (0x1ce0_0000u64 + i as u64).to_string();
    let mut hip = ns.exec(&ns.hip, &env.agent);
    hip.env("HIP_LOG", "debug")
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0");
    if c.hip_initiates {
        hip.args(["hip", "connect", "--key"])
            .arg(&keys.ours)
            .args(["--peer-hit", &keys.cutehip_hit, "--locator", CUTEHIP_ADDR])
            .args(["--local", HIP_ADDR, "--timeout", "25"]);
    } else {
        hip.args(["hip", "listen", "--key"])
            .arg(&keys.ours)
            .args(["--count", "1"]);
    }
    hip.args(["--dh", c.dh.name()]).args(c.variant.flags());
    if env.record.is_some() {
        hip.args(["--insecure-rng-seed", &seed]);
    }
    let (hip_out, hip_err) = (dir.join("hip.json"), dir.join("hip.err"));
    let hip_cmd = util::show(&hip);
    let mut hp = Proc::spawn(&mut hip, &hip_out, &hip_err)?;
    if !c.hip_initiates {
        wait_for(Duration::from_secs(30), || {
            read(&hip_err).contains("listening as").then_some(())
        })
        .context("hip-agent hip listen did not start")?;
    }

    // Drive: packets for hip's HIT into cutehip's TUN device (they start cutehip's
    // exchange, and once it is established they leave as ESP), until the run is decided.
    let poke = format!("echo hip-interop > /dev/udp/{}/9", keys.our_hit);
    let start = Instant::now();
    let mut failing_since: Option<Instant> = None;
    let mut last_poke = Instant::now() - Duration::from_secs(5);
    loop {
        let ours = read(&hip_out);
        let established = ours.contains("\"established\"");
        if (!c.hip_initiates || established) && last_poke.elapsed() >= Duration::from_secs(1) {
            let _ = Command::new("ip")
                .args(["netns", "exec", &ns.cutehip, "bash", "-c", &poke])
                .stderr(Stdio::null())
                .status();
            last_poke = Instant::now();
        }
        let sas = read(&sa_log).lines().count();
        let esp = established && sas >= 2 && {
            let spi = serde_json::from_str::<Value>(ours.lines().next().unwrap_or(""))
                .ok()
                .and_then(|v| v["spi_inbound"].as_u64());
            frames(&pcap)
                .unwrap_or_default()
                .iter()
                .any(|f| f.esp_spi.map(u64::from) == spi)
        };
        if esp {
            break;
        }
        let log = read(&copy.join("hip.log"));
        let failing = read(&hip_err).contains("HIP packet dropped")
            || hp.exited().is_some_and(|s| !s.success())
            || [
                "Puzzle was not solved",
                "Invalid HMAC",
                "Missing",
                "Exception occured",
            ]
            .iter()
            .any(|w| log.contains(w));
        if failing {
            // Give the other side a moment to say its piece, then decide.
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        if start.elapsed() > RUN_LIMIT || (c.hip_initiates && hp.exited().is_some() && !established)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    hp.stop(libc::SIGTERM);
    cute.stop(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    td.stop(libc::SIGINT);
    drop(ns);
    fs::copy(copy.join("hip.log"), dir.join("cutehip.log"))?;
    fs::write(dir.join("commands.txt"), format!("{hip_cmd}\n"))?;
    let o = judge(&dir, &pcap, &sa_log)?;
    if let Some(r) = &env.record {
        fs::write(dir.join("packets.txt"), hip_packets(&pcap)?)?;
        copy_dir(&dir, &r.join(c.tag()))?;
        fs::write(
            r.join(c.tag()).join("run.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cutehip_commit": env.cutehip_commit,
                "patched": c.patched,
                "hip_initiates": c.hip_initiates,
                "hi": c.hi.name(),
                "dh": c.dh.name(),
                "variant": format!("{:?}", c.variant),
                "hip_command": hip_cmd,
                "insecure_rng_seed": seed,
                "hip_key": keys.ours.file_name().unwrap().to_string_lossy(),
                "hip_hit": keys.our_hit,
                "cutehip_key": keys.cutehip_private.file_name().unwrap().to_string_lossy(),
                "cutehip_hit": keys.cutehip_hit,
                "hip_locator": HIP_ADDR,
                "cutehip_locator": CUTEHIP_ADDR,
                "ok": o.ok,
                "result": o.cell,
            }))?,
        )?;
    }
    Ok(o)
}

/// Decides a run from its files.
fn judge(dir: &Path, pcap: &Path, sa_log: &Path) -> Result<Outcome> {
    let frames = frames(pcap)?;
    let ours: Option<Value> = read(&dir.join("hip.json"))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "established");
    let sas: Vec<Value> = read(sa_log)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let hip_err = plain(&read(&dir.join("hip.err")));
    let log = read(&dir.join("cutehip.log"));

    let mut evidence: Vec<String> = Vec::new();
    for l in hip_err.lines() {
        if let Some((_, why)) = l.split_once("HIP packet dropped: ") {
            let why = why.split(" src=").next().unwrap_or(why).trim();
            evidence.push(format!("hip: {why}"));
        } else if l.contains("base exchange failed") || l.starts_with("Error:") {
            evidence.push(format!("hip: {}", l.trim()));
        }
    }
    for l in log.lines() {
        let Some((_, msg)) = l.split_once("] ") else {
            continue;
        };
        let interesting = (l.contains("[CRITICAL]") && !msg.contains("Cannot resolve HIT"))
            || msg.contains("Puzzle was not solved");
        if interesting && !msg.starts_with("Exception occured") {
            evidence.push(format!("cutehip: {}", msg.trim()));
        }
    }
    evidence.dedup();
    let mut seen = std::collections::HashSet::new();
    evidence.retain(|e| seen.insert(e.clone()));
    let defects: Vec<&'static str> = {
        let mut d: Vec<_> = evidence.iter().filter_map(|e| defect_of(e)).collect();
        d.sort();
        d.dedup();
        d
    };

    // Our packets must be clean whatever happened.
    let ours_bad = frames
        .iter()
        .filter(|f| f.src == HIP_ADDR && f.hip_type.is_some() && !f.checksum_ok)
        .count();
    let n_malformed = malformed(pcap)?;
    let furthest = frames
        .iter()
        .filter_map(|f| f.hip_type)
        .filter(|t| (1..=4).contains(t))
        .max();

    let mut problems = Vec::new();
    if ours_bad > 0 {
        problems.push(format!("{ours_bad} of hip's packets with a bad checksum"));
    }
    if n_malformed > 0 {
        problems.push(format!("{n_malformed} malformed frames"));
    }
    let mut ok = false;
    if let Some(e) = &ours {
        let out = sas
            .iter()
            .find(|s| s["source"].as_str().is_some_and(|x| x.contains(':')));
        // cutehip keys its inbound SA by (sender IP, receiver IP), its outbound one by HITs.
        let inb = sas.iter().find(|s| s["source"].as_str() == Some(HIP_ADDR));
        match (out, inb) {
            (Some(out), Some(inb)) => {
                let same = |s: &Value, spi: &str, enc: &str, auth: &str| {
                    s["spi"] == e[spi] && s["enc_sha256"] == e[enc] && s["auth_sha256"] == e[auth]
                };
                if !same(
                    out,
                    "spi_inbound",
                    "key_inbound_enc_sha256",
                    "key_inbound_auth_sha256",
                ) {
                    problems.push("cutehip→hip SA: SPI or keys differ".into());
                }
                if !same(
                    inb,
                    "spi_outbound",
                    "key_outbound_enc_sha256",
                    "key_outbound_auth_sha256",
                ) {
                    problems.push("hip→cutehip SA: SPI or keys differ".into());
                }
                let spi = e["spi_inbound"].as_u64();
                if !frames
                    .iter()
                    .any(|f| f.src == CUTEHIP_ADDR && f.esp_spi.map(u64::from) == spi)
                {
                    problems.push("no ESP from cutehip with hip's SPI".into());
                }
                ok = problems.is_empty();
            }
            _ => problems.push("hip established, cutehip did not".into()),
        }
    } else if !sas.is_empty() {
        problems.push("cutehip established, hip did not".into());
    }
    let cell = if ok {
        let e = ours.as_ref().unwrap();
        format!(
            "ok (ESP {}, SPIs {:#x}/{:#x}, keys match)",
            e["esp_transform"],
            e["spi_inbound"].as_u64().unwrap_or(0),
            e["spi_outbound"].as_u64().unwrap_or(0)
        )
    } else {
        let at = furthest.map(type_name).unwrap_or("nothing sent");
        let mut s = format!("FAIL after {at}");
        if !defects.is_empty() {
            write!(s, " [{}]", defects.join(",")).unwrap();
        }
        let short = |e: &String| match e.char_indices().nth(100) {
            Some((i, _)) => format!("{}…", &e[..i]),
            None => e.clone(),
        };
        let why: Vec<String> = problems
            .iter()
            .cloned()
            .chain(evidence.iter().take(2).map(short))
            .collect();
        if !why.is_empty() {
            write!(s, ": {}", why.join("; ")).unwrap();
        }
        s
    };
    Ok(Outcome { cell, ok, defects })
}

fn table(env: &Env, patched: bool, dirty: bool, results: &[(Case, Outcome)]) -> String {
    let mut s = String::new();
    let short = &env.cutehip_commit[..env.cutehip_commit.len().min(12)];
    let ok = results.iter().filter(|(_, o)| o.ok).count();
    writeln!(
        s,
        "\n### cutehip {short}{}, {}: {ok}/{} established on both sides\n",
        if dirty {
            " (checkout has local changes)"
        } else {
            ""
        },
        if patched {
            "with xtask/interop/cutehip-fixes.patch"
        } else {
            "unpatched"
        },
        results.len()
    )
    .unwrap();
    writeln!(s, "| HI | DH | hip initiates | cutehip initiates |").unwrap();
    writeln!(s, "| --- | --- | --- | --- |").unwrap();
    let mut rows: BTreeMap<(Hi, Dh), [String; 2]> = BTreeMap::new();
    for (c, o) in results
        .iter()
        .filter(|(c, _)| c.variant == Variant::Default)
    {
        rows.entry((c.hi, c.dh)).or_default()[usize::from(!c.hip_initiates)] = o.cell.clone();
    }
    for ((hi, dh), [a, b]) in &rows {
        writeln!(s, "| {} | {} | {a} | {b} |", hi.name(), dh.name()).unwrap();
    }
    let variants: Vec<_> = results
        .iter()
        .filter(|(c, _)| c.variant != Variant::Default)
        .collect();
    if !variants.is_empty() {
        writeln!(s, "\nOther choices (ECDSA P-256 × P-256):\n").unwrap();
        writeln!(s, "| choice | initiator | result |").unwrap();
        writeln!(s, "| --- | --- | --- |").unwrap();
        for (c, o) in variants {
            writeln!(
                s,
                "| {} | {} | {} |",
                c.variant.label(),
                if c.hip_initiates { "hip" } else { "cutehip" },
                o.cell
            )
            .unwrap();
        }
    }
    let mut used: Vec<&str> = results
        .iter()
        .flat_map(|(_, o)| o.defects.clone())
        .collect();
    used.sort();
    used.dedup();
    if !used.is_empty() {
        writeln!(s, "\ncutehip defects seen:\n").unwrap();
        for (id, what, rfc) in DEFECTS.iter().filter(|d| used.contains(&d.0)) {
            writeln!(s, "- ({id}) {what} — {rfc}").unwrap();
        }
    }
    s
}
