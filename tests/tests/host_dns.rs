//! Host Identities in DNS (RFC 8005) against a real BIND 9.18 in a namespace, its zone
//! signed by `dnssec-policy`, updates allowed per TSIG key by its
//! `update-policy`:
//!
//! * `hip-agent dns publish` / `lookup` / `withdraw` for every HI algorithm, the answer
//!   DNSSEC-validated against the zone's key as trust anchor;
//! * refused updates — unknown key, wrong secret, another host's name, a zone the server
//!   does not serve, a frozen zone — are errors naming the cause, and the old record stays;
//! * a man in the middle that replaces the HIP RR or strips the signatures gets a `bogus`
//!   answer (at once, not a timeout), never a `secure` one;
//! * two agents that publish their records and look each other up reach `mutual` through
//!   the `dns` mechanism alone (no SIP Identity), both with `require_verified_peer` (the
//!   callee holds the INVITE for the lookup); with DNS unreachable the held INVITE is
//!   refused when the lookup gives up; a validated record with another HIT makes the call
//!   `failed`; a tampered answer leaves the call `unverified`;
//! * the agent checks its record at the primary and publishes it again when it is gone
//!   (counting refused updates), or at start-up when it differs;
//! * `hip-agent hip connect NAME` runs the base exchange against the HIT from DNS;
//! * Knot 3.2, which has no HIP type, serves a zone whose HIP RRs are in RFC 3597's
//!   generic form (`TYPE55 \# …`), takes our updates and signs them.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use hip_tests::{
    HostIdentityFile, VethPair, agent_bin,
    dns::{Bind, Knot, Mitm, Tamper, ZONE},
    new_host_identity,
    sip::{Agent, scratch, wait_calls_ended},
    wait_until,
};
use serde_json::Value;

const NO_OFFLOAD: &str = "[kernel]\nenabled = false\n";

/// Alice at `.1`, bob at `.2`, named at `.53` (in bob's namespace) of `net`.
fn net(tag: &str, net: &str) -> VethPair {
    VethPair::new(
        tag,
        &[&format!("{net}.1/24")],
        &[&format!("{net}.2/24"), &format!("{net}.53/24")],
    )
    .unwrap()
}

fn bind(p: &VethPair, net: &str, dir: &Path, extra: &str) -> Bind {
    Bind::start(
        &p.b,
        &format!("{net}.53"),
        &dir.join("named"),
        &[
            ("alice", &format!("alice.{ZONE}")),
            ("bob", &format!("bob.{ZONE}")),
            ("carol", &format!("carol.{ZONE}")),
            ("bench", &format!("*.bench.{ZONE}")),
        ],
        extra,
    )
    .unwrap()
}

/// A `[dns]` table.
fn dns_table(
    b: &Bind,
    name: &str,
    key: &Path,
    peers: &[(&str, &str)],
    resolver: Option<SocketAddr>,
) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|(u, n)| format!("\"{u}\" = \"{n}\""))
        .collect();
    let mut t = format!(
        "[dns]\nserver = \"{}\"\nzone = \"{ZONE}.\"\nname = \"{name}\"\ntsig_key = \"{}\"\n\
         trust_anchor = \"{}\"\nrendezvous_servers = [\"rvs.{ZONE}.\"]\ntimeout_ms = 3000\npeers = {{ {} }}\n",
        b.addr,
        key.display(),
        b.trust_anchor().unwrap().display(),
        peers.join(", ")
    );
    if let Some(r) = resolver {
        t.push_str(&format!("resolver = \"{r}\"\n"));
    }
    t
}

/// A configuration file for the CLI (`dns publish --config`): identity + `[dns]`.
fn cli_config(dir: &Path, file: &str, id: &HostIdentityFile, dns: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(
        &path,
        format!(
            "identity = \"{}\"\n[sip]\nuser = \"x\"\ndomain = \"example.com\"\nlisten = [\"udp:127.0.0.1:5060\"]\n{NO_OFFLOAD}{dns}",
            id.path.display()
        ),
    )
    .unwrap();
    path
}

/// `hip-agent --netns NS ARGS…`: (success, stdout, stderr).
fn cli(ns: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(agent_bin())
        .args(["--netns", ns])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn publish(ns: &str, cfg: &Path) -> (bool, String) {
    let (ok, out, err) = cli(ns, &["dns", "publish", "--config", cfg.to_str().unwrap()]);
    (ok, format!("{out}{err}"))
}

fn lookup(ns: &str, name: &str, server: SocketAddr, anchor: &Path) -> Value {
    let (ok, out, err) = cli(
        ns,
        &[
            "dns",
            "lookup",
            name,
            "--server",
            &server.to_string(),
            "--trust-anchor",
            anchor.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(ok, "dns lookup {name}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The HITs of the HIP RRs a lookup found.
fn hits(v: &Value) -> Vec<String> {
    v["hip"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["hit"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `name` has a `secure` HIP RR with `hit` (inline signing has signed the
/// update).
fn wait_secure(ns: &str, name: &str, server: SocketAddr, anchor: &Path, hit: &str) -> Value {
    wait_until(
        Duration::from_secs(20),
        &format!("{name} secure with {hit}"),
        || {
            let v = lookup(ns, name, server, anchor);
            (v["validation"] == "secure" && hits(&v) == vec![hit.to_owned()]).then_some(v)
        },
    )
    .unwrap()
}

#[test]
fn publish_lookup_withdraw_for_every_algorithm() {
    let n = "10.74.0";
    let p = net("dnsp", n);
    let dir = scratch("dns-pub");
    let b = bind(&p, n, &dir, &format!("alice IN A {n}.1\n"));
    let anchor = b.trust_anchor().unwrap();
    let a = p.a.name();
    // Alice's own name, with her address from the zone file.
    let id = new_host_identity(&dir, "alice", "ecdsa-p256").unwrap();
    let cfg = cli_config(
        &dir,
        "alice.toml",
        &id,
        &dns_table(&b, &format!("alice.{ZONE}."), &b.key("alice"), &[], None),
    );
    let (ok, out) = publish(a, &cfg);
    assert!(ok, "{out}\n{}", b.log());
    let v = wait_secure(a, &format!("alice.{ZONE}."), b.addr, &anchor, &id.hit);
    let r = &v["hip"][0];
    assert_eq!(r["hit_matches_hi"], true, "{v}");
    assert_eq!(r["pk_algorithm"], 3, "{v}");
    assert_eq!(r["hi_algorithm"], "ecdsa-p256", "{v}");
    assert_eq!(
        r["rendezvous_servers"],
        serde_json::json!([format!("rvs.{ZONE}.")]),
        "{v}"
    );
    assert_eq!(v["addresses"], serde_json::json!([format!("{n}.1")]), "{v}");
    assert_eq!(v["addresses_validation"], "secure", "{v}");
    // BIND itself serves it as a HIP RR with our HIT (an independent reading of the update).
    let dig = b.dig(&["+short", "HIP", &format!("alice.{ZONE}")]).unwrap();
    assert!(dig.to_uppercase().contains(&id.hit_hex), "{dig}");
    // `show` compares what DNS has with what we would publish.
    let (ok, out, err) = cli(
        a,
        &["dns", "show", "--config", cfg.to_str().unwrap(), "--json"],
    );
    assert!(ok, "{err}");
    let show: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(show["published"], true, "{show}");

    // Every HI algorithm, each at its own name below bench.hip.test.
    for (alg, pk) in [("ecdsa-p384", 3), ("ed25519", 4), ("rsa", 2)] {
        let idx = new_host_identity(&dir, alg, alg).unwrap();
        let name = format!("{alg}.bench.{ZONE}.");
        let c = cli_config(
            &dir,
            &format!("{alg}.toml"),
            &idx,
            &dns_table(&b, &name, &b.key("bench"), &[], None),
        );
        let (ok, out) = publish(a, &c);
        assert!(ok, "{alg}: {out}");
        let v = wait_secure(a, &name, b.addr, &anchor, &idx.hit);
        assert_eq!(v["hip"][0]["pk_algorithm"], pk, "{v}");
        assert_eq!(v["hip"][0]["hi_algorithm"], alg, "{v}");
        assert_eq!(v["hip"][0]["hit_matches_hi"], true, "{v}");
    }

    // A new identity replaces the record (one atomic update: never two HIP RRs).
    let id2 = new_host_identity(&dir, "alice2", "ed25519").unwrap();
    let cfg2 = cli_config(
        &dir,
        "alice2.toml",
        &id2,
        &dns_table(&b, &format!("alice.{ZONE}."), &b.key("alice"), &[], None),
    );
    assert!(publish(a, &cfg2).0);
    wait_secure(a, &format!("alice.{ZONE}."), b.addr, &anchor, &id2.hit);

    // Withdraw: no HIP RR left, the A record untouched.
    let (ok, _, err) = cli(a, &["dns", "withdraw", "--config", cfg2.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v = wait_until(Duration::from_secs(20), "the HIP RR gone", || {
        let v = lookup(a, &format!("alice.{ZONE}."), b.addr, &anchor);
        hits(&v).is_empty().then_some(v)
    })
    .unwrap();
    assert_eq!(v["addresses"], serde_json::json!([format!("{n}.1")]), "{v}");
}

#[test]
fn refused_updates_name_the_cause_and_leave_the_old_record() {
    let n = "10.75.0";
    let p = net("dnsr", n);
    let dir = scratch("dns-refuse");
    let b = bind(&p, n, &dir, "");
    let anchor = b.trust_anchor().unwrap();
    let a = p.a.name();
    let name = format!("alice.{ZONE}.");
    let old = new_host_identity(&dir, "old", "ecdsa-p256").unwrap();
    let new = new_host_identity(&dir, "new", "ecdsa-p256").unwrap();
    let good = cli_config(
        &dir,
        "good.toml",
        &old,
        &dns_table(&b, &name, &b.key("alice"), &[], None),
    );
    assert!(publish(a, &good).0);
    wait_secure(a, &name, b.addr, &anchor, &old.hit);

    // Each attempt to put `new` there fails, says why, and `old` stays.
    let keys = dir.join("other-keys");
    std::fs::create_dir_all(&keys).unwrap();
    // A key the server does not know.
    let unknown = hip_tests::dns::tsig_key(&keys, "mallory").unwrap();
    // The right key name with another secret.
    let wrong = hip_tests::dns::tsig_key(&keys, "alice").unwrap();
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "unknown key",
            dns_table(&b, &name, &unknown, &[], None),
            &["NOTAUTH", "BADKEY", "does not know this TSIG key"],
        ),
        (
            "wrong secret",
            dns_table(&b, &name, &wrong, &[], None),
            &["NOTAUTH", "BADSIG", "secret does not match"],
        ),
        (
            "bob's key for alice's name",
            dns_table(&b, &name, &b.key("bob"), &[], None),
            &["REFUSED", "update policy"],
        ),
        (
            "a zone the server does not serve",
            dns_table(&b, &name, &b.key("alice"), &[], None)
                .replace(&format!("zone = \"{ZONE}.\""), "zone = \"test.\""),
            &["NOTAUTH", "not authoritative"],
        ),
    ];
    for (what, table, needles) in &cases {
        let cfg = cli_config(&dir, "bad.toml", &new, table);
        let (ok, out) = publish(a, &cfg);
        assert!(!ok, "{what}: publish succeeded: {out}");
        for needle in *needles {
            assert!(out.contains(needle), "{what}: {needle:?} not in: {out}");
        }
        let v = lookup(a, &name, b.addr, &anchor);
        assert_eq!(hits(&v), vec![old.hit.clone()], "{what}: {v}");
    }
    // A frozen zone takes no updates.
    b.rndc(&["freeze", ZONE]).unwrap();
    let cfg = cli_config(
        &dir,
        "frozen.toml",
        &new,
        &dns_table(&b, &name, &b.key("alice"), &[], None),
    );
    let (ok, out) = publish(a, &cfg);
    assert!(!ok, "frozen: {out}");
    assert!(out.contains("REFUSED") || out.contains("SERVFAIL"), "{out}");
    b.rndc(&["thaw", ZONE]).unwrap();
    let v = lookup(a, &name, b.addr, &anchor);
    assert_eq!(hits(&v), vec![old.hit.clone()], "frozen: {v}");
    // And the good key still works afterwards.
    assert!(publish(a, &cfg).0);
    wait_secure(a, &name, b.addr, &anchor, &new.hit);
}

/// A HIP RR of an identity that is not alice's, as the tamperer's replacement RDATA.
fn mallory_rdata(dir: &Path) -> (HostIdentityFile, Vec<u8>) {
    let m = new_host_identity(dir, "mallory", "ecdsa-p256").unwrap();
    let hi = hip_proto::keyfile::load(&m.path).unwrap();
    let rd = hip_dns::HipRdata::from_host_id(hi.host_id(), vec![]);
    (m, rd.encode().unwrap())
}

#[test]
fn tampered_or_stripped_answers_are_never_secure() {
    let n = "10.76.0";
    let p = net("dnst", n);
    let dir = scratch("dns-tamper");
    let b = bind(&p, n, &dir, "");
    let anchor = b.trust_anchor().unwrap();
    let a = p.a.name();
    let name = format!("alice.{ZONE}.");
    let id = new_host_identity(&dir, "alice", "ecdsa-p256").unwrap();
    let cfg = cli_config(
        &dir,
        "alice.toml",
        &id,
        &dns_table(&b, &name, &b.key("alice"), &[], None),
    );
    assert!(publish(a, &cfg).0);
    wait_secure(a, &name, b.addr, &anchor, &id.hit);
    let (m, replacement) = mallory_rdata(&dir);
    for (port, tamper) in [(5301, Tamper::ReplaceHip), (5302, Tamper::StripSignatures)] {
        let listen: SocketAddr = format!("{n}.1:{port}").parse().unwrap();
        let _mitm = Mitm::start(&p.a, listen, b.addr, tamper, replacement.clone()).unwrap();
        let t0 = std::time::Instant::now();
        let (ok, out, err) = cli(
            a,
            &[
                "dns",
                "lookup",
                &name,
                "--server",
                &listen.to_string(),
                "--trust-anchor",
                anchor.to_str().unwrap(),
                "--timeout-ms",
                "3000",
                "--json",
            ],
        );
        // An answer, not a timeout: the forgery and the stripped copy both arrived, and
        // the zone's trust anchor says signatures must be there.
        assert!(ok, "{tamper:?}: {err}");
        assert!(
            t0.elapsed() < Duration::from_millis(2500),
            "{tamper:?}: took {:?}, deadline 3 s",
            t0.elapsed()
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["validation"], "bogus", "{tamper:?}: {v}");
        if tamper == Tamper::ReplaceHip {
            // The forgery did arrive (so the test tests something): a well-formed record
            // whose HIT matches its own key, just not signed by the zone.
            assert_eq!(hits(&v), vec![m.hit.clone()], "{v}");
            assert_eq!(v["hip"][0]["hit_matches_hi"], true, "{v}");
        } else {
            assert_eq!(hits(&v), vec![id.hit.clone()], "{v}");
        }
    }
    // Without a trust anchor nothing is ever `secure` either.
    let (ok, out, _) = cli(
        a,
        &[
            "dns",
            "lookup",
            &name,
            "--server",
            &b.addr.to_string(),
            "--json",
        ],
    );
    assert!(ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["validation"], "indeterminate", "{v}");
}

/// Two agents publishing at start-up; alice's calls go straight to bob.
struct Pair {
    _p: VethPair,
    bind: Bind,
    alice: Agent,
    bob: Agent,
    dir: PathBuf,
    ids: (HostIdentityFile, HostIdentityFile),
}

/// Bob's side of a [`pair`]: extra tables, where his lookups go, his `[dns] timeout_ms`.
#[derive(Default)]
struct BobOpts<'a> {
    extra: &'a str,
    resolver: Option<SocketAddr>,
    timeout_ms: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
fn pair(
    tag: &str,
    n: &str,
    alice_peers: &[(&str, &str)],
    alice_resolver: Option<SocketAddr>,
    alice_extra: &str,
    extra_records: &str,
    bob_opts: BobOpts<'_>,
    before: impl FnOnce(&VethPair, &Bind, &Path),
) -> Pair {
    let p = net(tag, n);
    let dir = scratch(tag);
    let b = bind(&p, n, &dir, extra_records);
    before(&p, &b, &dir);
    let ia = new_host_identity(&dir, "alice", "ecdsa-p256").unwrap();
    let ib = new_host_identity(&dir, "bob", "ecdsa-p256").unwrap();
    let alice = Agent::start(
        &p.a,
        ia.path.to_str().unwrap(),
        &format!(
            "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:{n}.1:5060\"]\noutbound_proxy = \"udp:{n}.2:5060\""
        ),
        &format!(
            "{NO_OFFLOAD}{alice_extra}{}",
            dns_table(&b, &format!("alice.{ZONE}."), &b.key("alice"), alice_peers, alice_resolver)
        ),
    )
    .unwrap();
    let mut bob_dns = dns_table(
        &b,
        &format!("bob.{ZONE}."),
        &b.key("bob"),
        &[("sip:alice@atlanta.com", &format!("alice.{ZONE}."))],
        bob_opts.resolver,
    );
    if let Some(t) = bob_opts.timeout_ms {
        bob_dns = bob_dns.replace("timeout_ms = 3000", &format!("timeout_ms = {t}"));
    }
    let bob = Agent::start(
        &p.b,
        ib.path.to_str().unwrap(),
        &format!("user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:{n}.2:5060\"]"),
        &format!("{NO_OFFLOAD}{}{bob_dns}", bob_opts.extra),
    )
    .unwrap();
    let anchor = b.trust_anchor().unwrap();
    // Both agents published at start-up.
    wait_secure(
        p.a.name(),
        &format!("alice.{ZONE}."),
        b.addr,
        &anchor,
        &ia.hit,
    );
    wait_secure(
        p.a.name(),
        &format!("bob.{ZONE}."),
        b.addr,
        &anchor,
        &ib.hit,
    );
    Pair {
        _p: p,
        bind: b,
        alice,
        bob,
        dir,
        ids: (ia, ib),
    }
}

fn wait_security(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_call_security(what, Duration::from_secs(30), pred)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()))
}

fn established(s: &Value) -> bool {
    s["associations"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x["state"] == "established"))
}

/// Both sides require a verified peer; only DNS can vouch (no SIP Identity, no SIPS).
const REQUIRE: &str = "[security]\nrequire_verified_peer = true\npeer_verify_timeout_ms = 8000\n";

#[test]
fn dns_alone_makes_a_call_mutual_on_both_sides() {
    let bob_name = format!("bob.{ZONE}.");
    // Both require a verified peer: bob holds alice's INVITE until DNS has vouched for her
    // HIT (nothing else can), and alice starts HIP only once DNS has vouched for bob's.
    let t = pair(
        "dnsm",
        "10.77.0",
        &[("sip:bob@biloxi.com", &bob_name)],
        None,
        REQUIRE,
        "",
        BobOpts {
            extra: REQUIRE,
            ..BobOpts::default()
        },
        |_, _, _| {},
    );
    let call = t.alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let done = |s: &Value| s["verification"] == "mutual" && established(s);
    let a = wait_security(&t.alice, "alice: mutual", done);
    let b = wait_security(&t.bob, "bob: mutual", done);
    for (who, s) in [("alice", &a), ("bob", &b)] {
        let sa = &s["sip_assurance"];
        assert_eq!(sa["peer_via"], "dns", "{who}: {s}");
        assert_eq!(sa["own_via"], "dns", "{who}: {s}");
        assert!(
            sa["peer_detail"]
                .as_str()
                .unwrap()
                .contains("DNSSEC-validated"),
            "{who}: {s}"
        );
        assert!(s["failure"].is_null(), "{who}: {s}");
        assert!(s["refused"].is_null(), "{who}: {s}");
    }
    assert_eq!(a["peer_hits"], serde_json::json!([t.ids.1.hit]), "{a}");
    assert_eq!(b["peer_hits"], serde_json::json!([t.ids.0.hit]), "{b}");
    t.alice.ctl(&["hangup", call.trim()]).unwrap();
    wait_calls_ended(&[&t.alice, &t.bob], Duration::from_secs(15)).unwrap();
    let _ = (&t.bind, &t.dir);
}

#[test]
fn a_validated_record_with_another_hit_fails_the_call() {
    // Alice maps bob's URI to carol's name, whose validated record carries carol's HIT:
    // the HIT SIP delivered (bob's) is not the one DNS vouches for.
    let carol = format!("carol.{ZONE}.");
    let t = pair(
        "dnsx",
        "10.78.0",
        &[("sip:bob@biloxi.com", &carol)],
        None,
        "",
        "",
        BobOpts::default(),
        |p, b, dir| {
            let ic = new_host_identity(dir, "carol", "ecdsa-p256").unwrap();
            let cfg = cli_config(
                dir,
                "carol.toml",
                &ic,
                &dns_table(b, &carol, &b.key("carol"), &[], None),
            );
            let (ok, out) = publish(p.a.name(), &cfg);
            assert!(ok, "{out}");
            wait_secure(
                p.a.name(),
                &carol,
                b.addr,
                &b.trust_anchor().unwrap(),
                &ic.hit,
            );
        },
    );
    t.alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let a = wait_security(&t.alice, "alice: failed", |s| s["verification"] == "failed");
    let f = a["failure"].as_str().unwrap_or("");
    assert!(f.contains("DNSSEC-validated") && f.contains(&carol), "{a}");
    assert_eq!(a["sip_assurance"]["peer_authenticated"], false, "{a}");
}

#[test]
fn a_tampered_answer_in_a_call_never_raises_the_level() {
    let n = "10.79.0";
    let bob_name = format!("bob.{ZONE}.");
    let listen: SocketAddr = format!("{n}.1:5303").parse().unwrap();
    let mitm = Arc::new(Mutex::new(None));
    let m2 = Arc::clone(&mitm);
    let t = pair(
        "dnsw",
        n,
        &[("sip:bob@biloxi.com", &bob_name)],
        Some(listen),
        "",
        "",
        BobOpts::default(),
        move |p, b, _| {
            // Alice's resolver path strips the signatures: she gets bob's real record,
            // with bob's real HIT, but unsigned. It must not count.
            *m2.lock().unwrap() =
                Some(Mitm::start(&p.a, listen, b.addr, Tamper::StripSignatures, vec![]).unwrap());
        },
    );
    let call = t.alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    // HIP completes; bob (who asks named directly) sees alice through DNS, but alice's
    // answer about bob was stripped of its signatures: bob stays unauthenticated.
    let a = wait_security(&t.alice, "alice: DNS answer noted", |s| {
        established(s)
            && s["sip_assurance"]["peer_detail"]
                .as_str()
                .is_some_and(|d| d.contains("dns:") && d.contains("not used"))
    });
    // Classified as what it is — signatures missing where the anchor says they must be —
    // not as a lookup that timed out.
    let detail = a["sip_assurance"]["peer_detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        detail.contains(&format!("HIP RR at {bob_name} is bogus")),
        "{a}"
    );
    assert!(
        t.alice.status()["dns"]["lookups"]["bogus"].as_u64() >= Some(1),
        "{}",
        t.alice.status()["dns"]
    );
    assert_ne!(a["sip_assurance"]["peer_via"], "dns", "{a}");
    assert_eq!(a["sip_assurance"]["peer_authenticated"], false, "{a}");
    assert!(
        a["failure"].is_null(),
        "a forged answer is not proof of tampering: {a}"
    );
    assert_ne!(a["verification"], "mutual", "{a}");
    t.alice.ctl(&["hangup", call.trim()]).unwrap();
    wait_calls_ended(&[&t.alice, &t.bob], Duration::from_secs(15)).unwrap();
    drop(mitm);
}

#[test]
fn hip_connect_by_name_uses_the_hit_from_dns() {
    let n = "10.80.0";
    let p = net("dnsc", n);
    let dir = scratch("dns-connect");
    let b = bind(&p, n, &dir, &format!("bob IN A {n}.2\n"));
    let anchor = b.trust_anchor().unwrap();
    let ib = new_host_identity(&dir, "bob", "ecdsa-p256").unwrap();
    let ia = new_host_identity(&dir, "alice", "ecdsa-p256").unwrap();
    let bob_name = format!("bob.{ZONE}.");
    let cfg_b = cli_config(
        &dir,
        "bob.toml",
        &ib,
        &dns_table(&b, &bob_name, &b.key("bob"), &[], None),
    );
    assert!(publish(p.b.name(), &cfg_b).0);
    wait_secure(p.a.name(), &bob_name, b.addr, &anchor, &ib.hit);
    let mut listener = Command::new(agent_bin())
        .args([
            "--netns",
            p.b.name(),
            "hip",
            "listen",
            "--count",
            "1",
            "--key",
        ])
        .arg(&ib.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = listener.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    wait_until(Duration::from_secs(20), "the listener", || {
        rx.try_iter()
            .any(|l| l.contains("listening as"))
            .then_some(())
    })
    .unwrap();
    let cfg_a = cli_config(
        &dir,
        "alice.toml",
        &ia,
        &dns_table(&b, &format!("alice.{ZONE}."), &b.key("alice"), &[], None),
    );
    let out = Command::new(agent_bin())
        .args(["--netns", p.a.name(), "hip", "connect", &bob_name, "--key"])
        .arg(&ia.path)
        .arg("--config")
        .arg(&cfg_a)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(ev["event"], "established", "{ev}");
    assert_eq!(ev["peer_hit"], ib.hit, "{ev}");
    assert_eq!(ev["peer_locator"], format!("{n}.2"), "{ev}");
    let st = listener.wait().unwrap();
    assert!(st.success());
    // Without DNSSEC (no trust anchor) the CLI refuses to use the record.
    let no_anchor = cli_config(
        &dir,
        "alice-na.toml",
        &ia,
        &dns_table(&b, &format!("alice.{ZONE}."), &b.key("alice"), &[], None)
            .lines()
            .filter(|l| !l.starts_with("trust_anchor"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let out = Command::new(agent_bin())
        .args([
            "--netns",
            p.a.name(),
            "hip",
            "connect",
            &bob_name,
            "--timeout",
            "5",
            "--key",
        ])
        .arg(&ia.path)
        .arg("--config")
        .arg(&no_anchor)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not DNSSEC-validated"));
}

#[test]
fn with_dns_unreachable_a_held_invite_is_refused_within_the_bound() {
    let n = "10.81.0";
    // Bob's resolver takes queries and never answers (unreachable, not refusing).
    let hole: SocketAddr = format!("{n}.2:5399").parse().unwrap();
    let sink = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&sink);
    let t = pair(
        "dnsu",
        n,
        &[],
        None,
        "",
        "",
        BobOpts {
            extra: REQUIRE,
            resolver: Some(hole),
            timeout_ms: Some(1500),
        },
        move |p, _, _| {
            *s2.lock().unwrap() = Some(
                p.b.run_in(|| std::net::UdpSocket::bind(hole))
                    .unwrap()
                    .unwrap(),
            );
        },
    );
    let t0 = std::time::Instant::now();
    t.alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let a = wait_until(Duration::from_secs(20), "alice's call refused", || {
        t.alice.status()["ended_calls"]
            .as_array()
            .and_then(|e| e.first())
            .cloned()
    })
    .unwrap();
    let took = t0.elapsed();
    assert_eq!(a["end_reason"]["kind"], "rejected", "{a}");
    assert_eq!(a["end_reason"]["status"], 428, "{a}");
    // Held while the lookup could still vouch (not refused at once), refused when it gave
    // up at bob's `[dns] timeout_ms` (1.5 s) — long before peer_verify_timeout_ms (8 s).
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(4000),
        "refused after {took:?}"
    );
    let b = wait_until(Duration::from_secs(10), "bob's refused call", || {
        t.bob.status()["ended_calls"]
            .as_array()
            .and_then(|e| e.first())
            .cloned()
    })
    .unwrap();
    let refused = b["security"]["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("refused with 428"), "{b}");
    assert!(
        refused.contains(&format!("lookup of alice.{ZONE}. failed"))
            && refused.contains("not used"),
        "{b}"
    );
    // Nothing was answered: no HIP, nothing confirmed.
    let st = t.bob.status();
    assert_eq!(st["stats"]["confirmed"], 0, "{st}");
    assert_eq!(b["security"]["associations"], serde_json::json!([]), "{b}");
    assert!(st["dns"]["lookups"]["failed"].as_u64() >= Some(1), "{st}");
    drop(sink);
}

/// `[dns] publish` of the agent: `(updates, failures, in_dns)` once `pred` holds.
fn wait_publish(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_until(Duration::from_secs(20), what, || {
        let p = agent.status()["dns"]["publish"].clone();
        pred(&p).then_some(p)
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", agent.status()["dns"], agent.log()))
}

#[test]
fn the_agent_keeps_its_record_published() {
    let n = "10.82.0";
    let p = net("dnsk", n);
    let dir = scratch("dns-keep");
    // `admin` may change every name in the zone (the operator behind the agent's back).
    let b = Bind::start(
        &p.b,
        &format!("{n}.53"),
        &dir.join("named"),
        &[
            ("alice", &format!("alice.{ZONE}")),
            ("admin", &format!("*.{ZONE}")),
        ],
        "",
    )
    .unwrap();
    let anchor = b.trust_anchor().unwrap();
    let a = p.a.name();
    let name = format!("alice.{ZONE}.");
    let id = new_host_identity(&dir, "alice", "ecdsa-p256").unwrap();
    let table = dns_table(&b, &name, &b.key("alice"), &[], None) + "refresh_secs = 1\n";
    let admin = cli_config(
        &dir,
        "admin.toml",
        &id,
        &dns_table(&b, &name, &b.key("admin"), &[], None),
    );
    // The record is in place as the agent would publish it: starting costs the zone no
    // update.
    assert!(publish(a, &admin).0);
    wait_secure(a, &name, b.addr, &anchor, &id.hit);
    let sip = format!("user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:{n}.1:5060\"]");
    let mut agent = Agent::start(
        &p.a,
        id.path.to_str().unwrap(),
        &sip,
        &format!("{NO_OFFLOAD}{table}"),
    )
    .unwrap();
    let st = wait_publish(&agent, "the first check", |p| {
        p["checks"].as_u64() >= Some(1)
    });
    assert_eq!(st["updates"], 0, "{st}");
    assert_eq!(st["in_dns"], true, "{st}");

    // Deleted behind its back: it is back within a refresh.
    let (ok, _, err) = cli(a, &["dns", "withdraw", "--config", admin.to_str().unwrap()]);
    assert!(ok, "{err}");
    wait_publish(&agent, "republished", |p| p["updates"] == 1);
    wait_secure(a, &name, b.addr, &anchor, &id.hit);

    // While the server refuses the agent's key, the record stays gone and each refused
    // update is counted; once it accepts the key again, the record comes back.
    let conf = b.dir.join("named.conf");
    let orig = std::fs::read_to_string(&conf).unwrap();
    let grant = format!("grant alice name alice.{ZONE}.");
    assert!(orig.contains(&grant), "{orig}");
    std::fs::write(
        &conf,
        orig.replace(&grant, &format!("grant alice name nobody.{ZONE}.")),
    )
    .unwrap();
    b.rndc(&["reconfig"]).unwrap();
    let (ok, _, err) = cli(a, &["dns", "withdraw", "--config", admin.to_str().unwrap()]);
    assert!(ok, "{err}");
    let st = wait_publish(&agent, "a refused update counted", |p| {
        p["failures"].as_u64() >= Some(2)
    });
    assert_eq!(st["in_dns"], false, "{st}");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("REFUSED"),
        "{st}"
    );
    assert!(hits(&lookup(a, &name, b.addr, &anchor)).is_empty());
    std::fs::write(&conf, &orig).unwrap();
    b.rndc(&["reconfig"]).unwrap();
    wait_publish(&agent, "republished after the refusals", |p| {
        p["updates"] == 2 && p["in_dns"] == true
    });
    wait_secure(a, &name, b.addr, &anchor, &id.hit);

    // A restart with other rendezvous servers replaces the record at once.
    agent.stop().unwrap();
    let cfg = std::fs::read_to_string(&agent.cfg).unwrap();
    std::fs::write(
        &agent.cfg,
        cfg.replace(
            &format!("rendezvous_servers = [\"rvs.{ZONE}.\"]"),
            &format!("rendezvous_servers = [\"rvs2.{ZONE}.\"]"),
        ),
    )
    .unwrap();
    agent.restart().unwrap();
    let st = wait_publish(&agent, "republished with the new RVS", |p| {
        p["updates"] == 1
    });
    assert_eq!(st["failures"], 0, "{st}");
    let v = wait_until(Duration::from_secs(20), "the new RVS in DNS", || {
        let v = lookup(a, &name, b.addr, &anchor);
        (v["validation"] == "secure"
            && v["hip"][0]["rendezvous_servers"] == serde_json::json!([format!("rvs2.{ZONE}.")]))
        .then_some(v)
    })
    .unwrap();
    assert_eq!(hits(&v), vec![id.hit.clone()], "{v}");
}

fn lower_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn knot_with_a_type55_zone_takes_and_serves_the_generic_form() {
    let n = "10.83.0";
    let p = net("dnsn", n);
    let dir = scratch("dns-knot");
    // Bob's record is in the zone file as Knot needs it, in RFC 3597's generic form,
    // written from our encoder.
    let ib = new_host_identity(&dir, "bob", "ecdsa-p256").unwrap();
    let hi = hip_proto::keyfile::load(&ib.path).unwrap();
    let rd = hip_dns::HipRdata::from_host_id(hi.host_id(), vec![])
        .encode()
        .unwrap();
    let records = format!(
        "bob IN TYPE55 \\# {} {}\nalice IN A {n}.1\n",
        rd.len(),
        lower_hex(&rd)
    );
    let k = Knot::start(
        &p.b,
        &format!("{n}.53"),
        &dir.join("knot"),
        &["alice"],
        &records,
    )
    .unwrap();
    let anchor = k.trust_anchor().unwrap();
    let a = p.a.name();
    let v = wait_secure(a, &format!("bob.{ZONE}."), k.addr, &anchor, &ib.hit);
    assert_eq!(v["hip"][0]["hit_matches_hi"], true, "{v}");

    // Alice publishes by a TSIG-signed update of type 55 and finds it signed by Knot.
    let ia = new_host_identity(&dir, "alice", "ed25519").unwrap();
    let table = |name: &str| {
        format!(
            "[dns]\nserver = \"{}\"\nzone = \"{ZONE}.\"\nname = \"{name}\"\ntsig_key = \"{}\"\n\
             trust_anchor = \"{}\"\nrendezvous_servers = [\"rvs.{ZONE}.\"]\n",
            k.addr,
            k.key("alice").display(),
            anchor.display()
        )
    };
    let cfg = cli_config(&dir, "alice.toml", &ia, &table(&format!("alice.{ZONE}.")));
    let (ok, out) = publish(a, &cfg);
    assert!(ok, "{out}\n{}", k.log());
    let v = wait_secure(a, &format!("alice.{ZONE}."), k.addr, &anchor, &ia.hit);
    assert_eq!(v["hip"][0]["hi_algorithm"], "ed25519", "{v}");
    assert_eq!(
        v["hip"][0]["rendezvous_servers"],
        serde_json::json!([format!("rvs.{ZONE}.")]),
        "{v}"
    );
    assert_eq!(v["addresses"], serde_json::json!([format!("{n}.1")]), "{v}");
    assert_eq!(v["addresses_validation"], "secure", "{v}");
    // Knot holds it as opaque type-55 data, and it is our record byte for byte.
    let ours = hip_dns::HipRdata::from_host_id(
        hip_proto::keyfile::load(&ia.path).unwrap().host_id(),
        vec![hip_dns::Name::from_ascii(format!("rvs.{ZONE}.")).unwrap()],
    )
    .encode()
    .unwrap();
    let zr = k
        .knotc(&["zone-read", ZONE, &format!("alice.{ZONE}."), "TYPE55"])
        .unwrap();
    let flat: String = zr.split_whitespace().collect::<Vec<_>>().join("");
    assert!(
        zr.contains("TYPE55") && flat.to_lowercase().contains(&lower_hex(&ours)),
        "{zr}"
    );
    let (ok, out, err) = cli(
        a,
        &["dns", "show", "--config", cfg.to_str().unwrap(), "--json"],
    );
    assert!(ok, "{err}");
    let show: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(show["published"], true, "{show}");

    // Alice's key may change alice's name only: bob's record stays. (Knot refuses an
    // update its ACL does not allow with NOTAUTH and TSIG BADKEY.)
    let (ok, out) = publish(
        a,
        &cli_config(&dir, "alice-bob.toml", &ia, &table(&format!("bob.{ZONE}."))),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("NOTAUTH") && out.contains("BADKEY") && out.contains("ACL"),
        "{out}"
    );
    let v = lookup(a, &format!("bob.{ZONE}."), k.addr, &anchor);
    assert_eq!(hits(&v), vec![ib.hit.clone()], "{v}");
}
