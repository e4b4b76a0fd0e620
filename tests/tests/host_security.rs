//! The draft's §4 between two real agents on the host, each in its own namespace: what
//! vouches for the HIT each side put in its SDP, and the verification level each side
//! reports once HIP has proved the peer's HIT (raw HIP sockets work on the host; the
//! kernel offload is off because the host kernel has no ESP).
//!
//! * SIP Identity both ways (the caller's INVITE, the callee's §4.1 UPDATE): `mutual`;
//! * only the caller signs (§4.4): `single-sided` on both sides, the callee seeing the
//!   caller authenticated and the caller seeing only its own HIT protected;
//! * nobody signs: `unverified`;
//! * an Identity the callee cannot verify (a key it does not trust for the domain): the
//!   callee reports why and does not count the caller as authenticated;
//! * SIPS over TLS with `trust_sips_proxies`: `mutual` through SIPS, with the §4.2 caveat;
//! * a real proxy (Kamailio) that rewrites the caller's HIT in the signed INVITE: the
//!   callee proves the tampering, flags the call `failed` and refuses it with 438.
//! * `require_verified_peer`: a callee refuses an unsigned INVITE with 428 and one whose
//!   Identity it cannot verify with 438; a caller starts no base exchange until the
//!   callee's HIT is verified and hangs up when that does not happen in time; a fully
//!   signed call passes.
//!
//! Keys for SIP Identity are made by `openssl` (an independent ES256 implementation); the
//! agent's PASSporTs are verified by the other agent only with the public key configured
//! for the signer's domain.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use hip_tests::{
    NetNs, VethPair,
    sip::{
        self, Agent, NO_OFFLOAD, agent_pair as pair, hip_key, scratch, security_table as security,
        wait_calls_ended,
    },
};
use serde_json::Value;

/// An ES256 key pair written by openssl: (private PKCS#8 PEM, public SPKI PEM).
fn es256_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    sip::es256_key(dir, name).unwrap()
}

/// The security block of `agent`'s call once `pred` holds on it.
fn wait_security(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    agent
        .wait_call_security(what, Duration::from_secs(30), pred)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Both sides' security blocks once HIP is established and the level is `level` (a later
/// change would have to come from SIP; the tests say why none can).
fn wait_level(alice: &Agent, bob: &Agent, level: &str) -> (Value, Value) {
    let done = |s: &Value| {
        s["verification"] == level
            && s["associations"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["state"] == "established"))
    };
    (
        wait_security(alice, &format!("alice: {level}"), done),
        wait_security(bob, &format!("bob: {level}"), done),
    )
}

fn hang_up(alice: &Agent, bob: &Agent, call: &str) {
    alice.ctl(&["hangup", call.trim()]).unwrap();
    wait_calls_ended(&[alice, bob], Duration::from_secs(15)).unwrap();
}

#[test]
fn identity_both_ways_is_mutual() {
    let dir = scratch("sec-keys");
    let (ka, pa) = es256_key(&dir, "atlanta");
    let (kb, pb) = es256_key(&dir, "biloxi");
    // Both require a verified peer: the policy lets a fully signed call through, alice's
    // base exchange starting once bob's signed UPDATE verified his HIT.
    let (_p, alice, bob) = pair(
        "secmu",
        "10.71.0",
        &(security(Some((&ka, "atlanta.com")), &[("biloxi.com", &pb)], false) + REQUIRE),
        &(security(Some((&kb, "biloxi.com")), &[("atlanta.com", &pa)], false) + REQUIRE),
    );
    let call = alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let (a, b) = wait_level(&alice, &bob, "mutual");
    let (sa, sb) = (&a["sip_assurance"], &b["sip_assurance"]);
    // Alice: her INVITE was signed; bob's HIT came signed in his §4.1 UPDATE.
    assert_eq!(sa["own_via"], "identity", "{a}");
    assert_eq!(sa["peer_via"], "identity", "{a}");
    assert!(
        sa["peer_detail"]
            .as_str()
            .unwrap()
            .contains("UPDATE Identity verified"),
        "{a}"
    );
    assert!(
        sa["peer_detail"].as_str().unwrap().contains("biloxi.com"),
        "{a}"
    );
    // Bob: alice's INVITE verified with atlanta.com's key; his UPDATE was accepted.
    assert_eq!(sb["peer_via"], "identity", "{b}");
    assert!(
        sb["peer_detail"]
            .as_str()
            .unwrap()
            .contains("INVITE Identity verified: sip:alice@atlanta.com"),
        "{b}"
    );
    assert_eq!(sb["own_via"], "identity", "{b}");
    assert!(
        sb["own_detail"]
            .as_str()
            .unwrap()
            .contains("accepted with 200"),
        "{b}"
    );
    for s in [sa, sb] {
        assert_eq!(s["peer_authenticated"], true);
        assert_eq!(s["own_protected"], true);
        assert!(s["caveat"].is_null(), "no SIPS trust relied upon: {s}");
    }
    assert_eq!(a["failure"], Value::Null);
    assert_eq!(a["refused"], Value::Null);
    assert!(
        alice
            .log()
            .contains("HIP waits for the callee's HIT to be verified"),
        "{}",
        alice.log()
    );
    assert_eq!(a["sas"], b["sas"]);
    // The human status names the mechanism.
    let human = alice.ctl(&["status"]).unwrap();
    assert!(human.contains("verification mutual"), "{human}");
    assert!(
        human.contains("peer HIT authenticated (SIP Identity)"),
        "{human}"
    );
    assert!(
        human.contains("our HIT  protected (SIP Identity)"),
        "{human}"
    );
    hang_up(&alice, &bob, &call);
}

#[test]
fn only_the_caller_signs_single_sided_and_each_side_sees_its_half() {
    let dir = scratch("sec-keys");
    let (ka, pa) = es256_key(&dir, "atlanta");
    // Bob has no key: his HIT goes unsigned, and so he sends no UPDATE at all.
    let (_p, alice, bob) = pair(
        "secss",
        "10.72.0",
        &security(Some((&ka, "atlanta.com")), &[], false),
        &security(None, &[("atlanta.com", &pa)], false),
    );
    let call = alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let (a, b) = wait_level(&alice, &bob, "single-sided");
    let (sa, sb) = (&a["sip_assurance"], &b["sip_assurance"]);
    // Bob knows he talks to alice (her INVITE verified), his own HIT is unprotected.
    assert_eq!(sb["peer_authenticated"], true, "{b}");
    assert_eq!(sb["peer_via"], "identity", "{b}");
    assert_eq!(sb["own_protected"], false, "{b}");
    assert!(
        sb["own_detail"]
            .as_str()
            .unwrap()
            .contains("no [security] identity_key"),
        "{b}"
    );
    // Alice only knows her own HIT went out signed; bob's answer was not authenticated.
    assert_eq!(sa["own_protected"], true, "{a}");
    assert_eq!(sa["own_via"], "identity", "{a}");
    assert_eq!(sa["peer_authenticated"], false, "{a}");
    assert_eq!(sa["peer_via"], Value::Null, "{a}");
    assert!(
        sa["peer_detail"]
            .as_str()
            .unwrap()
            .contains("waiting for a signed UPDATE"),
        "{a}"
    );
    // Bob, having no key, sent no §4.1 UPDATE.
    assert!(!bob.log().contains("signed UPDATE sent"), "{}", bob.log());
    hang_up(&alice, &bob, &call);
}

/// `[security] require_verified_peer` (appended to a `security()` table).
const REQUIRE: &str = "require_verified_peer = true\npeer_verify_timeout_ms = 1500\n";

/// The ended call in `agent`'s status once there is one.
fn ended_call(agent: &Agent) -> Value {
    hip_tests::wait_until(Duration::from_secs(20), "an ended call", || {
        agent.status()["ended_calls"]
            .as_array()
            .and_then(|e| e.first())
            .cloned()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()))
}

#[test]
fn a_callee_requiring_a_verified_peer_answers_an_unsigned_invite_with_428() {
    let dir = scratch("sec-keys");
    let (_, pa) = es256_key(&dir, "atlanta");
    let (_p, alice, bob) = pair(
        "secrq",
        "10.84.0",
        &security(None, &[], false),
        &(security(None, &[("atlanta.com", &pa)], false) + REQUIRE),
    );
    alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let a = ended_call(&alice);
    assert_eq!(a["end_reason"]["kind"], "rejected", "{a}");
    assert_eq!(a["end_reason"]["status"], 428, "{a}");
    assert_eq!(a["end_reason"]["reason"], "Use Identity Header", "{a}");
    let b = ended_call(&bob);
    let refused = b["security"]["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("refused with 428"), "{b}");
    assert!(refused.contains("no Identity header in the INVITE"), "{b}");
    // Refused before it rang: nothing confirmed, no HIP association on either side.
    let st = bob.status();
    assert_eq!(st["stats"]["confirmed"], 0, "{st}");
    for s in [&a["security"], &b["security"]] {
        assert_eq!(s["associations"], serde_json::json!([]), "{s}");
    }
}

#[test]
fn a_callee_requiring_a_verified_peer_answers_an_untrusted_identity_with_438() {
    let dir = scratch("sec-keys");
    let (ka, _) = es256_key(&dir, "atlanta");
    // Bob trusts another key for atlanta.com than the one alice signs with.
    let (_, other) = es256_key(&dir, "impostor");
    let (_p, alice, bob) = pair(
        "secrr",
        "10.85.0",
        &security(Some((&ka, "atlanta.com")), &[], false),
        &(security(None, &[("atlanta.com", &other)], false) + REQUIRE),
    );
    alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let a = ended_call(&alice);
    assert_eq!(a["end_reason"]["status"], 438, "{a}");
    let b = ended_call(&bob);
    let refused = b["security"]["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("refused with 438"), "{b}");
    assert!(refused.contains("INVITE Identity not verified"), "{b}");
}

#[test]
fn a_caller_requiring_a_verified_peer_starts_no_hip_and_hangs_up_when_the_callee_does_not_sign() {
    let dir = scratch("sec-keys");
    let (_, pb) = es256_key(&dir, "biloxi");
    // Bob has no key: he sends no signed UPDATE, so his HIT is never verified.
    let (_p, alice, bob) = pair(
        "secrc",
        "10.86.0",
        &(security(None, &[("biloxi.com", &pb)], false) + REQUIRE),
        &security(None, &[], false),
    );
    alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let a = ended_call(&alice);
    let refused = a["security"]["refused"].as_str().unwrap_or_default();
    assert!(refused.contains("not verified within 1500 ms"), "{a}");
    assert!(refused.contains("waiting for a signed UPDATE"), "{a}");
    assert_eq!(a["end_reason"]["kind"], "local-bye", "{a}");
    // The call was answered, yet no base exchange ran: no media could have flowed.
    assert_eq!(bob.status()["stats"]["confirmed"], 1);
    assert_eq!(a["security"]["associations"], serde_json::json!([]), "{a}");
    let log = alice.log();
    assert!(log.contains("HIP waits for the callee's HIT"), "{log}");
    assert!(!log.contains("HIP association established"), "{log}");
    wait_calls_ended(&[&alice, &bob], Duration::from_secs(15)).unwrap();
    assert!(!bob.log().contains("HIP association established"));
}

#[test]
fn nobody_signs_unverified() {
    let (_p, alice, bob) = pair(
        "secun",
        "10.73.0",
        &security(None, &[], false),
        &security(None, &[], false),
    );
    let call = alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let (a, b) = wait_level(&alice, &bob, "unverified");
    for s in [&a["sip_assurance"], &b["sip_assurance"]] {
        assert_eq!(s["peer_authenticated"], false, "{s}");
        assert_eq!(s["own_protected"], false, "{s}");
    }
    assert!(
        b["sip_assurance"]["peer_detail"]
            .as_str()
            .unwrap()
            .contains("no Identity header in the INVITE"),
        "{b}"
    );
    hang_up(&alice, &bob, &call);
}

#[test]
fn an_identity_signed_with_an_untrusted_key_is_reported_not_trusted() {
    let dir = scratch("sec-keys");
    let (ka, _pa) = es256_key(&dir, "atlanta");
    let (kb, pb) = es256_key(&dir, "biloxi");
    // Bob is configured with another key for atlanta.com than the one alice signs with.
    let (_mallory, pm) = es256_key(&dir, "mallory");
    let (_p, alice, bob) = pair(
        "secut",
        "10.74.0",
        &security(Some((&ka, "atlanta.com")), &[("biloxi.com", &pb)], false),
        &security(Some((&kb, "biloxi.com")), &[("atlanta.com", &pm)], false),
    );
    let call = alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    // Alice verifies bob's UPDATE (mutual from her side); bob cannot verify alice.
    let (a, b) = (
        wait_security(&alice, "alice: mutual", |s| s["verification"] == "mutual"),
        wait_security(&bob, "bob: single-sided", |s| {
            s["verification"] == "single-sided" && s["sip_assurance"]["own_protected"] == true
        }),
    );
    let sb = &b["sip_assurance"];
    assert_eq!(sb["peer_authenticated"], false, "{b}");
    let why = sb["peer_detail"].as_str().unwrap();
    assert!(
        why.contains("INVITE Identity not verified")
            && why.contains("signature does not verify with the key trusted for \"atlanta.com\""),
        "{b}"
    );
    // A signature that does not verify is not proof of tampering: not `failed`.
    assert_eq!(b["failure"], Value::Null, "{b}");
    assert_eq!(a["sip_assurance"]["peer_authenticated"], true, "{a}");
    hang_up(&alice, &bob, &call);
}

/// alice (`NET.1`) calls `sips:bob@NET.2:5061` over TLS, with one self-signed
/// certificate trusted by both and `trust_sips_proxies` set to `trust`; returns the call
/// handle with the namespaces and agents.
fn sips_call(tag: &str, net: &str, trust: bool) -> (VethPair, Agent, Agent, String) {
    let (a_ip, b_ip) = (format!("{net}.1"), format!("{net}.2"));
    let p = VethPair::new(tag, &[&format!("{a_ip}/24")], &[&format!("{b_ip}/24")]).unwrap();
    let dir = scratch(&format!("sec-{tag}"));
    let tls = format!(
        "{}{NO_OFFLOAD}",
        sip::tls_table(&dir, &[&a_ip, &b_ip]).unwrap()
    );
    let start = |ns: &NetNs, who: &str, domain: &str, ip: &str| {
        Agent::start(
            ns,
            hip_key(&dir, who).path.to_str().unwrap(),
            &format!("user = \"{who}\"\ndomain = \"{domain}\"\nlisten = [\"tls:{ip}:5061\"]"),
            &format!("{tls}{}", security(None, &[], trust)),
        )
        .unwrap()
    };
    let alice = start(&p.a, "alice", "atlanta.com", &a_ip);
    let bob = start(&p.b, "bob", "biloxi.com", &b_ip);
    let call = alice
        .ctl(&["call", &format!("sips:bob@{b_ip}:5061")])
        .unwrap();
    (p, alice, bob, call)
}

#[test]
fn sips_with_trusted_proxies_is_mutual_with_the_caveat() {
    let (_p, alice, bob, call) = sips_call("secsips", "10.75.0", true);
    let (a, b) = wait_level(&alice, &bob, "mutual");
    for s in [&a["sip_assurance"], &b["sip_assurance"]] {
        assert_eq!(s["peer_via"], "sips", "{s}");
        assert_eq!(s["own_via"], "sips", "{s}");
        assert!(
            s["caveat"].as_str().unwrap().contains("trusts all of them"),
            "{s}"
        );
    }
    let human = bob.ctl(&["status"]).unwrap();
    assert!(human.contains("peer HIT authenticated (SIPS)"), "{human}");
    assert!(human.contains("caveat: SIPS protects each hop"), "{human}");
    hang_up(&alice, &bob, &call);
}

#[test]
fn sips_is_not_counted_unless_the_proxies_are_trusted() {
    // The same call over TLS to a sips: URI, without trust_sips_proxies: unverified, and
    // the status says why.
    let (_p, alice, bob, call) = sips_call("secsipsn", "10.76.0", false);
    let (_a, b) = wait_level(&alice, &bob, "unverified");
    assert!(
        b["sip_assurance"]["peer_detail"]
            .as_str()
            .unwrap()
            .contains("trust_sips_proxies is off"),
        "{b}"
    );
    hang_up(&alice, &bob, &call);
}

/// A stateful Kamailio relay in the caller's namespace that swaps one HIT for another in
/// every SDP it relays, in INVITEs and in responses: the draft's §4 man in the middle on
/// the signalling path, as a real proxy.
const MITM_CFG: &str = r#"#!KAMAILIO
debug=2
log_stderror=yes
children=1
auto_aliases=no
listen=udp:@IP@:5070
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "maxfwd.so"
request_route {
    if (!mf_process_maxfwd_header("10")) {
        sl_send_reply("483", "Too Many Hops");
        exit;
    }
    if (is_method("ACK")) {
        if (t_check_trans()) {
            t_relay();
        }
        exit;
    }
    if (is_method("INVITE") && has_body("application/sdp")) {
        subst_body("/@REAL@/@FAKE@/ig");
    }
    $du = "sip:@NEXT@:5060";
    t_relay();
}
onreply_route {
    if (has_body("application/sdp")) {
        subst_body("/@REAL@/@FAKE@/ig");
    }
}
"#;

/// Starts the relay in `ns` at `ip`:5070, forwarding to `next`:5060 and swapping `real`
/// for `fake` (32 hex digits each).
fn mitm(ns: &NetNs, dir: &Path, ip: &str, next: &str, real: &str, fake: &str) {
    let cfg = MITM_CFG
        .replace("@IP@", ip)
        .replace("@NEXT@", next)
        .replace("@REAL@", real)
        .replace("@FAKE@", fake);
    let cfg_path = dir.join("mitm.cfg");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::File::create(dir.join("mitm.log")).unwrap();
    let st = Command::new("ip")
        .args(["netns", "exec", ns.name(), "kamailio", "-f"])
        .arg(&cfg_path)
        .arg("-P")
        .arg(dir.join("mitm.pid"))
        .args(["-m", "32", "-M", "8", "-E"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(st.success(), "kamailio: {st}");
}

#[test]
fn a_proxy_rewriting_the_signed_hit_is_caught_and_the_call_refused() {
    let dir = scratch("sec-mitm");
    let (ka, pa) = es256_key(&dir, "atlanta");
    let p = VethPair::new("secmitm", &["10.77.0.1/24"], &["10.77.0.2/24"]).unwrap();
    let alice_id = hip_key(&dir, "alice");
    let (alice_key, alice_hex) = (alice_id.path, alice_id.hit_hex);
    let fake = "2001001F0000000000000000DEADBEEF";
    mitm(&p.a, &dir, "10.77.0.1", "10.77.0.2", &alice_hex, fake);
    // Alice signs and sends through the relay (her outbound proxy); bob trusts her key.
    let alice = Agent::start(
        &p.a,
        alice_key.to_str().unwrap(),
        "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:10.77.0.1:5060\"]\n\
         outbound_proxy = \"udp:10.77.0.1:5070\"",
        &format!(
            "{NO_OFFLOAD}{}",
            security(Some((&ka, "atlanta.com")), &[], false)
        ),
    )
    .unwrap();
    let bob = Agent::start(
        &p.b,
        hip_key(&dir, "bob").path.to_str().unwrap(),
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:10.77.0.2:5060\"]",
        &format!(
            "{NO_OFFLOAD}{}",
            security(None, &[("atlanta.com", &pa)], false)
        ),
    )
    .unwrap();
    alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    // Bob: the Identity is valid but binds alice's real HIT, not the SDP's: failed.
    let b = wait_security(&bob, "bob to flag the call", |s| {
        s["verification"] == "failed"
    });
    let f = b["failure"].as_str().unwrap();
    assert!(f.contains("altered on the path"), "{b}");
    assert!(f.contains(&alice_hex) && f.contains(fake), "{b}");
    assert_eq!(b["sip_assurance"]["peer_authenticated"], false, "{b}");
    // ...and refused it with 438 (RFC 8224 §6.2.2) before any answer: alice's call ended.
    wait_calls_ended(&[&alice], Duration::from_secs(15)).unwrap();
    assert!(
        alice.log().contains("status: 438"),
        "alice's log:\n{}",
        alice.log()
    );
    // Nothing of the forged HIT reached bob's pool or HIP.
    assert!(bob.hits().as_array().unwrap().is_empty(), "{}", bob.hits());
    assert!(b["associations"].as_array().unwrap().is_empty(), "{b}");
}

#[test]
fn a_proxy_rewriting_the_answers_hit_is_exposed_by_the_callees_signed_update() {
    // The draft's §4.1 case: the 200 OK cannot be signed, so a proxy swaps bob's HIT in
    // it; bob's signed UPDATE, sent straight to alice, carries his real HIT.
    let dir = scratch("sec-mitm2");
    let (kb, pb) = es256_key(&dir, "biloxi");
    let p = VethPair::new("secmitm2", &["10.78.0.1/24"], &["10.78.0.2/24"]).unwrap();
    let bob_id = hip_key(&dir, "bob");
    let (bob_key, bob_hit, bob_hex) = (bob_id.path, bob_id.hit, bob_id.hit_hex);
    let fake = "2001001F0000000000000000DEADBEEF";
    mitm(&p.a, &dir, "10.78.0.1", "10.78.0.2", &bob_hex, fake);
    let alice = Agent::start(
        &p.a,
        hip_key(&dir, "alice").path.to_str().unwrap(),
        "user = \"alice\"\ndomain = \"atlanta.com\"\nlisten = [\"udp:10.78.0.1:5060\"]\n\
         outbound_proxy = \"udp:10.78.0.1:5070\"",
        // I1 to the forged HIT: bob's host stays silent (it is not that HIT), so HIP
        // reports nothing for seconds and the UPDATE is what exposes the forgery.
        &format!(
            "{NO_OFFLOAD}[hip]\ni1_to_null_hit = false\n{}",
            security(None, &[("biloxi.com", &pb)], false)
        ),
    )
    .unwrap();
    let bob = Agent::start(
        &p.b,
        bob_key.to_str().unwrap(),
        "user = \"bob\"\ndomain = \"biloxi.com\"\nlisten = [\"udp:10.78.0.2:5060\"]",
        &format!(
            "{NO_OFFLOAD}{}",
            security(Some((&kb, "biloxi.com")), &[], false)
        ),
    )
    .unwrap();
    alice.ctl(&["call", "sip:bob@biloxi.com"]).unwrap();
    let a = wait_security(&alice, "alice to flag the call", |s| {
        s["verification"] == "failed"
    });
    let f = a["failure"].as_str().unwrap();
    assert!(f.contains("altered on the path (draft §4.1)"), "{a}");
    let fake_v6 = "2001:1f::dead:beef";
    assert!(f.contains(&bob_hit) && f.contains(fake_v6), "{a}");
    assert_eq!(a["sip_assurance"]["peer_authenticated"], false, "{a}");
    // on_failure = hangup: alice ends the call.
    wait_calls_ended(&[&alice, &bob], Duration::from_secs(15)).unwrap();
}
