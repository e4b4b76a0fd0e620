//! HIP base exchanges between two `hip-agent` processes in two network namespaces, over
//! raw IPv6 and raw IPv4 (IP protocol 139), checked by tshark as an independent decoder.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hip_tests::{NetNs, VethPair, agent_bin, new_host_identity, wait_until};
use serde_json::Value;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("hip-host-hip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// `hip-agent hi new`, returning the key file and its HIT.
fn new_key(dir: &Path, name: &str, alg: &str) -> Result<(PathBuf, String)> {
    new_host_identity(dir, name, alg).map(|k| (k.path, k.hit))
}

/// A child process whose stderr lines are collected, killed on drop.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        Ok(Self { child, stderr })
    }

    fn wait_stderr(&self, needle: &str, what: &str) -> Result<()> {
        wait_until(Duration::from_secs(20), what, || {
            self.stderr.lock().unwrap().contains(needle).then_some(())
        })
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit (bounded), returning stdout.
    fn finish(mut self, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        let status = wait_until(timeout, "process exit", || {
            self.child.try_wait().ok().flatten()
        })?;
        let mut out = String::new();
        use std::io::Read;
        self.child.stdout.take().unwrap().read_to_string(&mut out)?;
        Ok((status, out))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn in_ns(ns: &NetNs, args: &[&str]) -> Command {
    let mut c = ns.command(agent_bin());
    c.args(args).env("RUST_BACKTRACE", "0");
    c
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs tshark on a capture and returns, per frame, (packet type, checksum status).
fn tshark_fields(pcap: &Path) -> Result<Vec<(u8, String)>> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "hip.packet_type",
            "-e",
            "hip.checksum.status",
        ])
        .output()
        .context("running tshark (apt-get install tshark)")?;
    if !out.status.success() {
        bail!("tshark: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut v = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = l.split('\t');
        let ty = f.next().unwrap_or("").parse::<u8>().context(l.to_owned())?;
        v.push((ty, f.next().unwrap_or("").to_owned()));
    }
    Ok(v)
}

/// Frames tshark reports as malformed.
fn tshark_malformed(pcap: &Path) -> Result<String> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(["-Y", "_ws.malformed"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mac(ns: &NetNs, ifc: &str) -> Result<String> {
    let out = ns.ip(["-br", "link", "show", ifc])?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .context("no MAC address")
}

fn static_neighbours(p: &VethPair) -> Result<()> {
    let (ma, mb) = (mac(&p.a, &p.if_a)?, mac(&p.b, &p.if_b)?);
    for (ns, ifc, peer_mac, peers) in [
        (&p.a, &p.if_a, &mb, ["10.77.9.2", "2001:db8:77::2"]),
        (&p.b, &p.if_b, &ma, ["10.77.9.1", "2001:db8:77::1"]),
    ] {
        for addr in peers {
            ns.ip([
                "neigh",
                "replace",
                addr,
                "lladdr",
                peer_mac,
                "dev",
                ifc,
                "nud",
                "permanent",
            ])?;
        }
    }
    Ok(())
}

/// One base exchange (and CLOSE) over `family` between fresh namespaces, captured on the
/// initiator's veth; `options` go to both ends' command lines.
#[allow(clippy::too_many_arguments)]
fn exchange(
    tag: &str,
    init_alg: &str,
    resp_alg: &str,
    dh: &str,
    v6: bool,
    rekey: bool,
    move_to: Option<&str>,
    options: &[&str],
) -> Result<()> {
    let p = VethPair::new(
        tag,
        &["10.77.9.1/24", "2001:db8:77::1/64"],
        &["10.77.9.2/24", "2001:db8:77::2/64"],
    )?;
    let (loc_a, loc_b) = if v6 {
        ("2001:db8:77::1", "2001:db8:77::2")
    } else {
        ("10.77.9.1", "10.77.9.2")
    };
    let dir = tempdir(tag);
    let (ka, hit_a) = new_key(&dir.0, "a", init_alg)?;
    let (kb, hit_b) = new_key(&dir.0, "b", resp_alg)?;
    let pcap = dir.0.join("hip.pcap");

    let mut td = p.a.command("tcpdump");
    // --immediate-mode: hand each packet to tcpdump at once (no ring-buffer timeout).
    td.args(["-i", &p.if_a, "-U", "--immediate-mode", "-n", "-w"])
        .arg(&pcap)
        .args(["ip proto 139 or ip6 proto 139"]);
    let tcpdump = Proc::spawn(td)?;
    tcpdump.wait_stderr("listening on", "tcpdump to start")?;

    // Static neighbour entries: a packet sent before the peer answers ARP/ND waits in
    // the kernel (a just-created veth can take a second to answer), and the I1
    // retransmission timer would then put two I1s on the wire.
    static_neighbours(&p)?;
    if let Some(new) = move_to {
        // A second address for A, reachable from B without neighbour discovery.
        p.a.ip(["addr", "add", &format!("{new}/64"), "dev", &p.if_a, "nodad"])?;
        let ma = mac(&p.a, &p.if_a)?;
        p.b.ip([
            "neigh",
            "replace",
            new,
            "lladdr",
            &ma,
            "dev",
            &p.if_b,
            "nud",
            "permanent",
        ])?;
    }

    let listener = Proc::spawn(in_ns(
        &p.b,
        &[
            "hip",
            "listen",
            "--key",
            kb.to_str().unwrap(),
            "--count",
            "1",
            "--wait-close",
            "--dh",
            dh,
        ]
        .into_iter()
        .chain(options.iter().copied())
        .collect::<Vec<_>>(),
    ))?;
    listener.wait_stderr("listening as", "the listener's raw sockets")?;

    let out = in_ns(
        &p.a,
        &[
            "hip",
            "connect",
            "--key",
            ka.to_str().unwrap(),
            "--peer-hit",
            &hit_b,
            "--locator",
            loc_b,
            "--local",
            loc_a,
            "--dh",
            dh,
            "--close",
            "--timeout",
            "20",
        ]
        .into_iter()
        .chain(rekey.then_some("--rekey"))
        .chain(options.iter().copied())
        .chain(move_to.into_iter().flat_map(|a| ["--move-to", a]))
        .collect::<Vec<_>>(),
    )
    .output()?;
    if !out.status.success() {
        bail!(
            "connect failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let init = json_lines(&String::from_utf8_lossy(&out.stdout));
    let (st, lout) = listener.finish(Duration::from_secs(20))?;
    assert!(st.success(), "listener: {lout}");
    let resp = json_lines(&lout);

    // Both ends established with each other, with mirrored SPIs and keys.
    let (ia, ra) = (&init[0], &resp[0]);
    assert_eq!(ia["event"], "established");
    assert_eq!(ra["event"], "established");
    assert_eq!(ia["peer_hit"], hit_b.as_str());
    assert_eq!(ra["peer_hit"], hit_a.as_str());
    assert_eq!(ia["local_locator"], loc_a);
    assert_eq!(ra["peer_locator"], loc_a);
    assert_eq!(ia["initiator"], true);
    assert_eq!(ra["initiator"], false);
    assert_eq!(ia["peer_hi_algorithm"], resp_alg);
    assert_eq!(ra["peer_hi_algorithm"], init_alg);
    assert_eq!(ia["spi_outbound"], ra["spi_inbound"]);
    assert_eq!(ia["spi_inbound"], ra["spi_outbound"]);
    assert_eq!(ia["key_outbound_enc_sha256"], ra["key_inbound_enc_sha256"]);
    assert_eq!(ia["key_inbound_enc_sha256"], ra["key_outbound_enc_sha256"]);
    assert_ne!(ia["key_inbound_enc_sha256"], ia["key_outbound_enc_sha256"]);
    assert_eq!(ia["esp_transform"], ra["esp_transform"]);
    let (mut init, mut resp) = (init[1..].iter(), resp[1..].iter());
    if rekey {
        // UPDATE with ESP_INFO: both report the new SA pair, mirrored, replacing the old.
        let (ik, rk) = (init.next().unwrap(), resp.next().unwrap());
        assert_eq!(ik["event"], "rekeyed");
        assert_eq!(rk["event"], "rekeyed");
        assert_eq!(ik["old_spi_inbound"], ia["spi_inbound"]);
        assert_eq!(ik["spi_outbound"], rk["spi_inbound"]);
        assert_eq!(ik["spi_inbound"], rk["spi_outbound"]);
        assert_ne!(ik["spi_inbound"], ia["spi_inbound"]);
        assert_eq!(ik["key_outbound_enc_sha256"], rk["key_inbound_enc_sha256"]);
        assert_ne!(ik["key_outbound_enc_sha256"], ia["key_outbound_enc_sha256"]);
    }
    if let Some(new) = move_to {
        // UPDATE with LOCATOR_SET, checked by B with an echo to the new address.
        let (il, rl) = (init.next().unwrap(), resp.next().unwrap());
        assert_eq!(il["event"], "locators_changed");
        assert_eq!(il["local_locator"], new);
        assert_eq!(rl["event"], "locators_changed");
        assert_eq!(rl["peer_locator"], new);
    }
    // Then CLOSE / CLOSE_ACK.
    let (ic, rc) = (init.next().unwrap(), resp.next().unwrap());
    assert_eq!(ic["event"], "closed");
    assert_eq!(rc["event"], "closed");
    assert_eq!(rc["by_peer"], true);

    // Wait until all packets are in the capture file (three UPDATEs for a rekey), then
    // stop tcpdump.
    let n_updates = 3 * (rekey as usize + move_to.is_some() as usize);
    let expect_n = 6 + n_updates;
    let _ = wait_until(Duration::from_secs(10), "all packets captured", || {
        tshark_fields(&pcap).ok().filter(|f| f.len() >= expect_n)
    });
    tcpdump.signal(libc::SIGINT);
    tcpdump.finish(Duration::from_secs(10))?;
    let frames = tshark_fields(&pcap)?;
    let mut types: Vec<u8> = frames.iter().map(|f| f.0).collect();
    // I1, R1, I2, R2, [UPDATE ×3,] CLOSE, CLOSE_ACK in this order. A retransmission (the
    // link was made reachable first, so there should be none) would repeat a type in place.
    let updates = types.iter().filter(|t| **t == 16).count();
    types.dedup();
    assert_eq!(updates, n_updates, "{frames:?}");
    if n_updates > 0 {
        assert_eq!(types, vec![1, 2, 3, 4, 16, 18, 19], "{frames:?}");
    } else {
        assert_eq!(types, vec![1, 2, 3, 4, 18, 19], "{frames:?}");
    }
    if let Some(new) = move_to {
        // tshark decodes our LOCATOR_SET (type 1: SPI + address, 5 × 4 octets), and the
        // CLOSE left from the new address.
        let out = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args([
                "-Y",
                "hip.tlv.locator_type",
                "-T",
                "fields",
                "-e",
                "hip.tlv.locator_type",
                "-e",
                "hip.tlv.locator_len",
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), "1\t5", "{text}");
        let out = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args([
                "-Y",
                "hip.packet_type == 18",
                "-T",
                "fields",
                "-e",
                "ipv6.src",
            ])
            .output()?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), new);
    }
    for (ty, status) in &frames {
        // Wireshark's checksum status 1 is "Good".
        assert_eq!(status, "1", "packet type {ty}: checksum status {status}");
    }
    let malformed = tshark_malformed(&pcap)?;
    assert!(malformed.trim().is_empty(), "malformed: {malformed}");
    Ok(())
}

#[test]
fn base_exchange_rekey_and_move_over_raw_ipv6() {
    exchange(
        "hip6",
        "ed25519",
        "ecdsa-p256",
        "p256",
        true,
        true,
        Some("2001:db8:77::11"),
        &[],
    )
    .unwrap();
}

#[test]
fn base_exchange_over_raw_ipv4() {
    exchange(
        "hip4",
        "ecdsa-p384",
        "rsa",
        "p384,p256",
        false,
        false,
        None,
        &[],
    )
    .unwrap();
}

/// The other side of each choice RFC 7401 leaves open (issue 10): HOST_ID inside
/// ENCRYPTED, R1_COUNTER in R1 (echoed in I2), a puzzle with K > 0, MODP-3072. The
/// packets stay clean in tshark and the exchange completes.
#[test]
fn base_exchange_with_encrypted_host_id_and_r1_counter() {
    exchange(
        "hipe",
        "ecdsa-p256",
        "ecdsa-p256",
        "modp3072",
        false,
        false,
        None,
        &[
            "--host-id-in-i2",
            "encrypted",
            "--r1-counter",
            "--puzzle-difficulty",
            "6",
        ],
    )
    .unwrap();
}

/// The recorded exchanges with cutehip (hip-proto/tests/data/cutehip): every packet hip
/// sent there, and every packet of cutehip's, decodes in tshark with a good checksum and
/// no malformed warning; the ECDH values are x ‖ y, which tshark shows as the lengths
/// RFC 5903 §7 gives.
#[test]
fn recorded_cutehip_exchanges_are_clean_in_tshark() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hip-proto/tests/data/cutehip");
    let mut seen = 0;
    for e in std::fs::read_dir(&data).unwrap() {
        let pcap = e.unwrap().path().join("capture.pcap");
        if !pcap.exists() {
            continue;
        }
        // (The captures also hold cutehip's ESP packets: only HIP frames here.)
        let out = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args([
                "-Y",
                "hip",
                "-T",
                "fields",
                "-e",
                "ip.src",
                "-e",
                "hip.packet_type",
            ])
            .args(["-e", "hip.checksum.status"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().count() >= 3, "{}: {text}", pcap.display());
        for l in text.lines() {
            assert!(
                l.ends_with("\t1"),
                "{}: checksum status of {l}",
                pcap.display()
            );
        }
        let malformed = tshark_malformed(&pcap).unwrap();
        assert!(
            malformed.trim().is_empty(),
            "{}: {malformed}",
            pcap.display()
        );
        let out = Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args(["-Y", "hip.packet_type == 2 or hip.packet_type == 3"])
            .args([
                "-T",
                "fields",
                "-e",
                "hip.tlv.dh_group_id",
                "-e",
                "hip.tlv.dh_pv_length",
            ])
            .output()
            .unwrap();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = l.split('\t').collect();
            if let [g, len] = f[..] {
                let want = match g {
                    "7" => "64",
                    "8" => "96",
                    _ => "384",
                };
                assert_eq!(len, want, "{}: group {g}", pcap.display());
            }
        }
        seen += 1;
    }
    assert!(seen >= 9, "recorded captures found: {seen}");
}

#[test]
fn expected_hit_mismatch_fails_cleanly() {
    let p = VethPair::new("hipx", &["2001:db8:78::1/64"], &["2001:db8:78::2/64"]).unwrap();
    let dir = tempdir("hipx");
    let (ka, _) = new_key(&dir.0, "a", "ecdsa-p256").unwrap();
    let (kb, _) = new_key(&dir.0, "b", "ecdsa-p256").unwrap();
    let (_, hit_c) = new_key(&dir.0, "c", "ecdsa-p256").unwrap();
    let listener = Proc::spawn(in_ns(
        &p.b,
        &["hip", "listen", "--key", kb.to_str().unwrap()],
    ))
    .unwrap();
    listener
        .wait_stderr("listening as", "the listener's raw sockets")
        .unwrap();
    // The listener only answers I1s for its own HIT: an I1 for C goes unanswered, and
    // the initiator gives up with a clear error instead of associating with B.
    let out = in_ns(
        &p.a,
        &[
            "hip",
            "connect",
            "--key",
            ka.to_str().unwrap(),
            "--peer-hit",
            &hit_c,
            "--locator",
            "2001:db8:78::2",
            "--timeout",
            "3",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(json_lines(&String::from_utf8_lossy(&out.stdout)).is_empty());
    assert!(
        listener
            .stderr
            .lock()
            .unwrap()
            .lines()
            .all(|l| !l.contains("Established")),
        "no association on the listener"
    );
}

/// `hip-agent hi new|show|import-xml` as an operator uses them.
#[test]
fn hi_cli_new_show_and_import_xml() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir("hicli");
    for alg in ["ecdsa-p256", "ecdsa-p384", "rsa", "ed25519"] {
        let (f, hit) = new_key(&dir.0, alg, alg).unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let out = Command::new(agent_bin())
            .args(["hi", "show", "--json"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["algorithm"], alg);
        assert_eq!(v["hit"], hit.as_str());
        assert!(hit.starts_with("2001:2"), "ORCHIDv2 prefix: {hit}");
        let hi = v["hi"].as_str().unwrap();
        assert!(hi.len() > 40, "base64 HI: {hi}");
        // Never overwritten.
        let again = Command::new(agent_bin())
            .args(["hi", "new", "--algorithm", alg, "--out"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(!again.status.success());
        // Readable by others: refused, with a clear message.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new(agent_bin())
            .args(["hi", "show"])
            .arg(&f)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    }
    // The draft's two identities.
    let xml = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../hip-proto/tests/data/draft-host-identities.xml");
    let out = Command::new(agent_bin())
        .args(["hi", "import-xml", "--json"])
        .arg(&xml)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    // Alice's key is damaged in the draft: the command reports it and fails.
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (alice, bob) = (&v[0], &v[1]);
    assert_eq!(alice["name"], "sip:alice@atlanta.com");
    assert_eq!(alice["hit_declared"], "7214148E0433AFE2FA2D48003D31172E");
    assert_eq!(alice["matches"], false);
    assert!(alice["error"].as_str().unwrap().contains("<P>"));
    assert_eq!(bob["name"], "sip:bob@biloxi.com");
    assert_eq!(bob["algorithm"], "DSA");
    assert_eq!(bob["hit_computed"], "44A5C522D7EDEDF962E55A0677DB1346");
    assert_eq!(bob["matches"], true);
    // Malformed input names the field.
    let bad = dir.0.join("bad.xml");
    std::fs::write(
        &bad,
        "<host_identity alg=\"DSA\"><name>x</name><P>00</P><Q>00</Q><G>00</G></host_identity>",
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args(["hi", "import-xml", "--json"])
        .arg(&bad)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("<PUB>"));
}
