//! A real BIND 9 (`named`) in a network namespace, serving a zone signed by `dnssec-policy`
//! (a dynamic zone: BIND signs each update as it applies it; with `inline-signing yes` 9.18
//! left batched updates unsigned, "receive_secure_serial: unchanged") with an `update-policy` that lets each agent's TSIG key change only its
//! own name; plus a DNS man in the middle that tampers with answers.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{NetNs, wait_until};

/// The test zone.
pub const ZONE: &str = "hip.test";

/// A running `named`; killed on drop.
pub struct Bind {
    child: Child,
    /// Its directory (config, zone, keys, log).
    pub dir: PathBuf,
    /// Where it listens (port 53).
    pub addr: SocketAddr,
    /// The namespace it runs in.
    pub ns: String,
}

/// A TSIG key made by `tsig-keygen`: (name, file).
pub fn tsig_key(dir: &Path, name: &str) -> Result<PathBuf> {
    let out = Command::new("tsig-keygen")
        .args(["-a", "hmac-sha256", name])
        .output()
        .context("tsig-keygen (bind9-utils, installed by cargo xtask setup)")?;
    if !out.status.success() {
        bail!("tsig-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = dir.join(format!("{name}.tsig"));
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

impl Bind {
    /// Starts `named` in `ns` at `ip`:53 for [`ZONE`], with one TSIG key per entry of
    /// `grants` (key name, the name it may update — its HIP, A and AAAA RRsets, or with a
    /// leading `*.` every name below), and `extra_records` in the zone file. Returns once the
    /// zone is signed (its DNSKEY RRset has an RRSIG).
    pub fn start(
        ns: &NetNs,
        ip: &str,
        dir: &Path,
        grants: &[(&str, &str)],
        extra_records: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir.join("keys"))?;
        let mut keys = String::new();
        let mut policy = String::new();
        for (key, name) in grants {
            let path = tsig_key(dir, key)?;
            keys.push_str(&std::fs::read_to_string(&path)?);
            match name.strip_prefix("*.") {
                Some(sub) => policy.push_str(&format!(
                    "        grant {key} subdomain {sub}. HIP A AAAA;\n"
                )),
                None => policy.push_str(&format!("        grant {key} name {name}. HIP A AAAA;\n")),
            }
        }
        let rndc = tsig_key(dir, "rndc-key")?;
        let rndc_key = std::fs::read_to_string(&rndc)?;
        std::fs::write(
            dir.join("rndc.conf"),
            format!(
                "{rndc_key}options {{ default-key \"rndc-key\"; default-server {ip}; default-port 953; }};\n"
            ),
        )?;
        let d = dir.display();
        std::fs::write(
            dir.join("named.conf"),
            format!(
                r#"options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    listen-on port 53 {{ {ip}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    allow-transfer {{ none; }};
    notify no;
}};
{keys}{rndc_key}controls {{ inet {ip} port 953 allow {{ any; }} keys {{ "rndc-key"; }}; }};
dnssec-policy "hiptest" {{
    keys {{ csk key-directory lifetime unlimited algorithm ecdsap256sha256; }};
    dnskey-ttl 300;
    max-zone-ttl 3600;
    signatures-validity 14d;
    signatures-refresh 5d;
}};
zone "{ZONE}" {{
    type primary;
    file "{d}/{ZONE}.db";
    key-directory "{d}/keys";
    dnssec-policy "hiptest";
    update-policy {{
{policy}    }};
}};
logging {{
    channel log {{ file "{d}/named.log"; severity info; print-time yes; }};
    category default {{ log; }};
    category update {{ log; }};
    category update-security {{ log; }};
    category dnssec {{ log; }};
}};
"#
            ),
        )?;
        std::fs::write(
            dir.join(format!("{ZONE}.db")),
            format!(
                "$TTL 300\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60\n@ IN NS ns\nns IN A {ip}\n{extra_records}"
            ),
        )?;
        let child = ns
            .command("named")
            .args(["-f", "-4", "-c"])
            .arg(dir.join("named.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("named.stderr"))?)
            .spawn()
            .context("named (bind9, installed by cargo xtask setup)")?;
        let bind = Self {
            child,
            dir: dir.to_owned(),
            addr: SocketAddr::new(ip.parse()?, 53),
            ns: ns.name().to_owned(),
        };
        wait_until(Duration::from_secs(60), "named to sign the zone", || {
            let out = bind.dig(&["DNSKEY", ZONE, "+dnssec", "+norec"]).ok()?;
            out.contains("RRSIG").then_some(())
        })
        .with_context(|| bind.log())?;
        Ok(bind)
    }

    /// `dig @named ARGS…` from inside its namespace.
    pub fn dig(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "dig",
                &format!("@{}", self.addr.ip()),
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("dig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `rndc ARGS…` (freeze, thaw …).
    pub fn rndc(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "rndc", "-c"])
            .arg(self.dir.join("rndc.conf"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "rndc {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The trust anchor: the zone's key (the CSK) as a DNSKEY file, as BIND wrote it.
    pub fn trust_anchor(&self) -> Result<PathBuf> {
        for e in std::fs::read_dir(self.dir.join("keys"))? {
            let p = e?.path();
            let f = p.file_name().unwrap().to_string_lossy().into_owned();
            if f.starts_with(&format!("K{ZONE}.+013+")) && f.ends_with(".key") {
                return Ok(p);
            }
        }
        bail!("no K{ZONE}.+013+*.key in {}/keys", self.dir.display())
    }

    /// The path of a key file made by [`Bind::start`].
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.tsig"))
    }

    /// named's log.
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("named.log")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("named.stderr")).unwrap_or_default());
        s
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the man in the middle changes answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// Every HIP RR's RDATA is replaced by the given one (the RRSIG stays: it no longer
    /// verifies).
    ReplaceHip,
    /// Every RRSIG is removed from every section.
    StripSignatures,
}

/// A DNS forwarder on UDP that tampers with what passes: bound inside a namespace, it
/// relays each query to `upstream` and the changed answer back. Stops on drop.
pub struct Mitm {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mitm {
    /// Starts the forwarder at `listen` in `ns`.
    pub fn start(
        ns: &NetNs,
        listen: SocketAddr,
        upstream: SocketAddr,
        tamper: Tamper,
        replacement: Vec<u8>,
    ) -> Result<Self> {
        let (sock, up) = ns.run_in(|| -> Result<(UdpSocket, UdpSocket)> {
            let s = UdpSocket::bind(listen)?;
            let u = UdpSocket::bind(SocketAddr::new(listen.ip(), 0))?;
            u.connect(upstream)?;
            Ok((s, u))
        })??;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        up.set_read_timeout(Some(Duration::from_secs(2)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65535];
            let mut ans = vec![0u8; 65535];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if up.send(&buf[..n]).is_err() {
                    continue;
                }
                let Ok(m) = up.recv(&mut ans) else { continue };
                let out = tamper_message(&ans[..m], tamper, &replacement)
                    .unwrap_or_else(|| ans[..m].to_vec());
                let _ = sock.send_to(&out, from);
            }
        });
        Ok(Self {
            addr: listen,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Rewrites a DNS message record by record. Every name is written out uncompressed, so
/// that changing one RDATA's length cannot break a later compression pointer.
fn tamper_message(msg: &[u8], tamper: Tamper, replacement: &[u8]) -> Option<Vec<u8>> {
    if msg.len() < 12 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([msg[4 + 2 * i], msg[5 + 2 * i]]) as usize;
    let (qd, an, ns, ar) = (count(0), count(1), count(2), count(3));
    let mut pos = 12;
    let mut out = msg[..12].to_vec();
    for _ in 0..qd {
        out.extend(read_name(msg, &mut pos)?);
        out.extend_from_slice(msg.get(pos..pos + 4)?);
        pos += 4;
    }
    let mut counts = [an, ns, ar];
    for (sec, c) in [an, ns, ar].into_iter().enumerate() {
        for _ in 0..c {
            let name = read_name(msg, &mut pos)?;
            let fixed = msg.get(pos..pos + 10)?;
            let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
            let rdlen = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
            let rdata_start = pos + 10;
            msg.get(rdata_start..rdata_start + rdlen)?;
            pos = rdata_start + rdlen;
            if tamper == Tamper::StripSignatures && rtype == 46 {
                counts[sec] -= 1;
                continue;
            }
            // Names inside RDATA of the types we see here (SOA, NS, RRSIG, NSEC) may be
            // compressed against earlier offsets: re-encode them uncompressed.
            let new_rdata = if tamper == Tamper::ReplaceHip && rtype == 55 {
                replacement.to_vec()
            } else {
                expand_rdata(msg, rtype, rdata_start, rdlen)?
            };
            out.extend(name);
            out.extend_from_slice(&fixed[..8]);
            out.extend_from_slice(&(new_rdata.len() as u16).to_be_bytes());
            out.extend(new_rdata);
        }
    }
    for (i, c) in counts.iter().enumerate() {
        out[6 + 2 * i..8 + 2 * i].copy_from_slice(&(*c as u16).to_be_bytes());
    }
    Some(out)
}

/// A (possibly compressed) name at `*pos`, returned uncompressed; `*pos` moves past it.
fn read_name(msg: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut p = *pos;
    let mut jumped = false;
    for _ in 0..128 {
        let len = *msg.get(p)? as usize;
        if len & 0xc0 == 0xc0 {
            let ptr = ((len & 0x3f) << 8) | *msg.get(p + 1)? as usize;
            if !jumped {
                *pos = p + 2;
            }
            jumped = true;
            p = ptr;
            continue;
        }
        out.push(len as u8);
        if len == 0 {
            if !jumped {
                *pos = p + 1;
            }
            return Some(out);
        }
        out.extend_from_slice(msg.get(p + 1..p + 1 + len)?);
        p += 1 + len;
    }
    None
}

fn expand_rdata(msg: &[u8], rtype: u16, start: usize, len: usize) -> Option<Vec<u8>> {
    let end = start + len;
    let mut p = start;
    let mut out = Vec::new();
    match rtype {
        // NS, CNAME, PTR: one name.
        2 | 5 | 12 => out.extend(read_name(msg, &mut p)?),
        // SOA: two names, then 20 octets.
        6 => {
            out.extend(read_name(msg, &mut p)?);
            out.extend(read_name(msg, &mut p)?);
            out.extend_from_slice(msg.get(p..end)?);
        }
        // MX: preference, name.
        15 => {
            out.extend_from_slice(msg.get(p..p + 2)?);
            p += 2;
            out.extend(read_name(msg, &mut p)?);
        }
        // Everything else (RRSIG and NSEC names are never compressed, RFC 4034 §3.1.7).
        _ => out.extend_from_slice(msg.get(start..end)?),
    }
    Some(out)
}

/// A running Knot DNS (`knotd`) in a network namespace serving [`ZONE`], signed by its
/// automatic DNSSEC (one ECDSA P-256 CSK), with dynamic updates allowed to each TSIG key
/// for the name equal to the key's own name (`update-owner: key`). Knot 3.2 has no HIP
/// type: HIP RRs exist for it only in RFC 3597's generic form (`TYPE55 \# …`), in the
/// zone file and in updates alike. Killed on drop.
pub struct Knot {
    child: Child,
    /// Its directory (config, zone, databases, log).
    pub dir: PathBuf,
    /// Where it listens (port 53).
    pub addr: SocketAddr,
    /// The namespace it runs in.
    pub ns: String,
}

impl Knot {
    /// Starts `knotd` in `ns` at `ip`:53 with one TSIG key per name of `hosts` (the key's
    /// name is the host's name in [`ZONE`]; its file is [`Knot::key`]), and `records` in
    /// the zone file. Returns once the zone is signed.
    pub fn start(ns: &NetNs, ip: &str, dir: &Path, hosts: &[&str], records: &str) -> Result<Self> {
        std::fs::create_dir_all(dir.join("db"))?;
        let d = dir.display();
        let mut keys = String::from("key:\n");
        let mut acl_ids = Vec::new();
        let mut acls = String::from("acl:\n");
        for h in hosts {
            let key_name = format!("{h}.{ZONE}.");
            let path = tsig_key(dir, &key_name)?;
            let secret = std::fs::read_to_string(&path)?
                .split('"')
                .nth(3)
                .context("tsig-keygen output without a secret")?
                .to_owned();
            keys.push_str(&format!(
                "  - id: {key_name}\n    algorithm: hmac-sha256\n    secret: {secret}\n"
            ));
            acls.push_str(&format!(
                "  - id: update-{h}\n    key: {key_name}\n    action: update\n    update-owner: key\n    update-owner-match: equal\n"
            ));
            acl_ids.push(format!("update-{h}"));
        }
        std::fs::write(
            dir.join("knot.conf"),
            format!(
                "server:\n    rundir: \"{d}\"\n    listen: {ip}@53\n\
                 log:\n  - target: \"{d}/knot.log\"\n    any: info\n\
                 database:\n    storage: \"{d}/db\"\n\
                 {keys}{acls}\
                 policy:\n  - id: csk\n    algorithm: ecdsap256sha256\n    single-type-signing: on\n    dnskey-ttl: 300\n    zone-max-ttl: 3600\n\
                 zone:\n  - domain: {ZONE}\n    file: \"{d}/{ZONE}.zone\"\n    dnssec-signing: on\n    dnssec-policy: csk\n    zonefile-sync: -1\n    acl: [{}]\n",
                acl_ids.join(", ")
            ),
        )?;
        std::fs::write(
            dir.join(format!("{ZONE}.zone")),
            format!(
                "$TTL 300\n@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60\n@ IN NS ns\nns IN A {ip}\n{records}"
            ),
        )?;
        let child = ns
            .command("knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("knotd.stderr"))?)
            .spawn()
            .context("knotd (knot, installed by cargo xtask setup)")?;
        let knot = Self {
            child,
            dir: dir.to_owned(),
            addr: SocketAddr::new(ip.parse()?, 53),
            ns: ns.name().to_owned(),
        };
        wait_until(Duration::from_secs(60), "knotd to sign the zone", || {
            let out = knot.dig(&["DNSKEY", ZONE, "+dnssec", "+norec"]).ok()?;
            out.contains("RRSIG").then_some(())
        })
        .with_context(|| knot.log())?;
        Ok(knot)
    }

    /// `dig @knotd ARGS…` from inside its namespace.
    pub fn dig(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "dig",
                &format!("@{}", self.addr.ip()),
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("dig {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `knotc ARGS…` over its control socket.
    pub fn knotc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("knotc")
            .arg("-c")
            .arg(self.dir.join("knot.conf"))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "knotc {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The trust anchor: the zone's DNSKEY RRset as it serves it (dig's zone-file syntax).
    pub fn trust_anchor(&self) -> Result<PathBuf> {
        let out = self.dig(&["+noall", "+answer", "DNSKEY", ZONE])?;
        if !out.contains("DNSKEY") {
            bail!("no DNSKEY for {ZONE}: {out}");
        }
        let path = self.dir.join(format!("{ZONE}.dnskey"));
        std::fs::write(&path, out)?;
        Ok(path)
    }

    /// The TSIG key file of `host` (made by [`Knot::start`]).
    pub fn key(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.{ZONE}..tsig"))
    }

    /// knotd's log.
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("knot.log")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("knotd.stderr")).unwrap_or_default());
        s
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
