//! The HIP RR codec against two independent implementations: dnspython 2.3 (Debian's
//! `python3-dnspython`, which builds and parses HIP RRs itself) and BIND 9.18's
//! `named-compilezone` (which turns our wire form, given in RFC 3597 generic syntax, into
//! its own HIP presentation form). Both are installed by `cargo xtask setup`.

use std::process::Command;

use hip_dns::{HipRdata, Name};
use hip_proto::{Algorithm, HostIdentity};
use rand_core::SeedableRng;

/// Debian's interpreter: `python3-dnspython` is installed for it, whatever `python3` is first
/// on PATH.
const PYTHON: &str = "/usr/bin/python3";

fn records() -> Vec<(Algorithm, HipRdata)> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8005);
    Algorithm::ALL
        .iter()
        .enumerate()
        .map(|(i, &alg)| {
            let id = HostIdentity::generate(alg, &mut rng).unwrap();
            // 0, 1, 2 … rendezvous servers, so each count is covered.
            let rvs = (0..i)
                .map(|k| Name::from_ascii(format!("rvs{k}.Example.com.")).unwrap())
                .collect();
            (alg, HipRdata::from_host_id(id.host_id(), rvs))
        })
        .collect()
}

fn python(script: &str) -> String {
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .output()
        .expect("run /usr/bin/python3 (cargo xtask setup installs python3-dnspython)");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dnspython_builds_the_same_wire_from_our_presentation_form() {
    for (alg, rd) in records() {
        let text = rd.to_presentation();
        let hex = python(&format!(
            "import dns.rdata\nr = dns.rdata.from_text('IN', 'HIP', {text:?})\nprint(r.to_wire().hex())"
        ));
        assert_eq!(
            hex.trim(),
            hex::encode(rd.encode().unwrap()),
            "{alg:?}: {text}"
        );
    }
}

#[test]
fn dnspython_parses_our_wire_into_the_same_fields() {
    for (alg, rd) in records() {
        let wire = hex::encode(rd.encode().unwrap());
        let out = python(&format!(
            "import dns.rdata, dns.rdataclass, dns.rdatatype, base64\n\
             r = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.HIP, bytes.fromhex('{wire}'), 0, {len})\n\
             print(r.algorithm)\nprint(r.hit.hex())\nprint(base64.b64encode(r.key).decode())\n\
             print(' '.join(s.to_text() for s in r.servers))",
            len = wire.len() / 2
        ));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], rd.pk_algorithm.to_string(), "{alg:?}");
        assert_eq!(lines[1], hex::encode(&rd.hit), "{alg:?}");
        use base64::Engine as _;
        assert_eq!(
            lines[2],
            base64::engine::general_purpose::STANDARD.encode(&rd.public_key),
            "{alg:?}"
        );
        let ours: Vec<String> = rd.rendezvous_servers.iter().map(|n| n.to_ascii()).collect();
        assert_eq!(
            lines.get(3).copied().unwrap_or(""),
            ours.join(" "),
            "{alg:?}"
        );
        // And the decoded record is the one we built.
        assert_eq!(HipRdata::decode(&rd.encode().unwrap()).unwrap(), rd);
    }
}

#[test]
fn bind_reads_our_wire_as_the_record_we_meant() {
    let dir = std::env::temp_dir().join(format!("hip-dns-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut zone = String::from(
        "$TTL 300\n@ IN SOA ns.hip.test. root.hip.test. 1 3600 600 86400 300\n@ IN NS ns\nns IN A 192.0.2.53\n",
    );
    let recs = records();
    for (i, (_, rd)) in recs.iter().enumerate() {
        let wire = rd.encode().unwrap();
        zone.push_str(&format!(
            "h{i} IN TYPE55 \\# {} {}\n",
            wire.len(),
            hex::encode(&wire)
        ));
    }
    let path = dir.join("hip.test.db");
    std::fs::write(&path, zone).unwrap();
    let out = Command::new("named-compilezone")
        .args(["-q", "-o", "-", "hip.test"])
        .arg(&path)
        .output()
        .expect("named-compilezone (bind9-utils, installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for (i, (alg, rd)) in recs.iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("h{i}.hip.test.")))
            .unwrap_or_else(|| panic!("h{i} missing in {text}"));
        let rdata = line
            .split("HIP")
            .nth(1)
            .expect("BIND printed it as HIP")
            .trim();
        let bind: Vec<String> = rdata.split_whitespace().map(str::to_string).collect();
        let ours: Vec<String> = rd
            .to_presentation()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert_eq!(bind.len(), ours.len(), "{alg:?}: {line}");
        assert_eq!(bind[0], ours[0], "{alg:?} PK algorithm");
        assert!(
            bind[1].eq_ignore_ascii_case(&ours[1]),
            "{alg:?} HIT: {line}"
        );
        assert_eq!(bind[2], ours[2], "{alg:?} key");
        for (b, o) in bind[3..].iter().zip(&ours[3..]) {
            assert!(b.eq_ignore_ascii_case(o), "{alg:?} rvs: {line}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn our_decoder_reads_what_bind_compiles_from_presentation_form() {
    // The other direction: BIND parses the presentation form and writes it in its raw
    // format; `named-compilezone -F text` prints it again; our decoder is then fed the
    // generic form produced by dnspython from BIND's text.
    let dir = std::env::temp_dir().join(format!("hip-dns-oracle2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let recs = records();
    let mut zone = String::from(
        "$TTL 300\n@ IN SOA ns.hip.test. root.hip.test. 1 3600 600 86400 300\n@ IN NS ns\nns IN A 192.0.2.53\n",
    );
    for (i, (_, rd)) in recs.iter().enumerate() {
        zone.push_str(&format!("h{i} IN HIP ( {} )\n", rd.to_presentation()));
    }
    let src = dir.join("in.db");
    let raw = dir.join("out.raw");
    std::fs::write(&src, zone).unwrap();
    let st = Command::new("named-compilezone")
        .args(["-q", "-F", "raw", "-o"])
        .arg(&raw)
        .arg("hip.test")
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("named-compilezone")
        .args(["-q", "-f", "raw", "-o", "-", "hip.test"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for (i, (alg, rd)) in recs.iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("h{i}.hip.test.")))
            .unwrap();
        let rdata = line.split("HIP").nth(1).unwrap().trim();
        let hex = python(&format!(
            "import dns.rdata\nprint(dns.rdata.from_text('IN', 'HIP', {rdata:?}).to_wire().hex())"
        ));
        let wire = hex::decode(hex.trim()).unwrap();
        let back = HipRdata::decode(&wire).unwrap();
        assert_eq!(back.hit, rd.hit, "{alg:?}");
        assert_eq!(back.public_key, rd.public_key, "{alg:?}");
        assert_eq!(back.pk_algorithm, rd.pk_algorithm, "{alg:?}");
        assert_eq!(back.rendezvous_servers.len(), rd.rendezvous_servers.len());
        back.verified().unwrap();
    }
    std::fs::remove_dir_all(&dir).ok();
}
